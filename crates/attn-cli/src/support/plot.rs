//! Pictures drawn with plotters and an embedded font (DejaVu Sans Condensed, its licence in
//! `assets/DejaVu-LICENSE.txt`): training curves and attention heatmaps with a title, labelled
//! axes and a colour bar.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansCondensed.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is ours and valid: registering cannot fail.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("cannot draw {}: {e}", path.display())
}

/// Writes an 8-bit RGB image to `path` as a PNG; an error names the file and the cause.
pub fn save_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(rgb))
        .map_err(|e| anyhow!("cannot encode {}: {e}", path.display()))?;
    std::fs::write(path, bytes).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// One line of a [`log2_lines`] chart: its legend, colour and points `(x, y)`.
pub struct Line<'a> {
    /// The legend's text.
    pub name: &'a str,
    /// The line's and markers' colour.
    pub colour: RGBColor,
    /// `(x, y)` points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Lines with markers over a log2 x axis (powers of two labelled as they are), y from 0, with a
/// title, axis descriptions and a legend, as a PNG.
pub fn log2_lines(path: &Path, title: &str, [x_desc, y_desc]: [&str; 2], lines: &[Line<'_>]) -> Result<()> {
    register_font();
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if !(lo.is_finite() && lo > 0.0) {
        bail!("no points to plot");
    }
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let (width, height) = (900u32, 520u32);
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let (l2lo, l2hi) = (lo.log2(), hi.log2().max(lo.log2() + 1.0));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .margin_right(24)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(l2lo - 0.2..l2hi + 0.2, 0.0..top)
            .map_err(err(path))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels((l2hi - l2lo) as usize + 1)
            .x_label_formatter(&|v| format!("{:.0}", v.exp2()))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        for line in lines {
            let colour = line.colour;
            let points: Vec<(f64, f64)> = line.points.iter().map(|&(x, y)| (x.log2(), y)).collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(err(path))?
                .label(line.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(err(path))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        root.present().map_err(err(path))?;
    }
    save_png(path, width, height, &rgb)
}

/// Training loss per step, and validation loss and exact-match accuracy at each evaluation,
/// as a PNG: loss on the left (log scale), accuracy on the right.
pub fn training_curves(path: &Path, train: &[(u64, f64)], valid: &[(u64, f64, f64)]) -> Result<()> {
    register_font();
    if train.is_empty() {
        bail!("no training steps to plot");
    }
    let (width, height) = (1100u32, 480u32);
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let (left, right) = root.split_horizontally(700);
        let last = train.last().map_or(1, |s| s.0).max(1);
        let first = train[0].0;
        let finite = train
            .iter()
            .map(|s| s.1)
            .chain(valid.iter().map(|v| v.1))
            .filter(|x| x.is_finite() && *x > 0.0);
        let (lo, hi) = finite.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (lo, hi) = if lo.is_finite() {
            (lo * 0.8, hi * 1.25)
        } else {
            (1e-3, 10.0)
        };
        let mut chart = ChartBuilder::on(&left)
            .caption("Loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(first..last, (lo..hi).log_scale())
            .map_err(err(path))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        // The raw curve is noisy; a moving average over 1% of the steps shows the trend.
        let window = (train.len() / 100).max(1);
        let smoothed: Vec<(u64, f64)> = train
            .iter()
            .enumerate()
            .map(|(i, &(step, _))| {
                let from = i.saturating_sub(window - 1);
                let slice = &train[from..=i];
                (step, slice.iter().map(|s| s.1).sum::<f64>() / slice.len() as f64)
            })
            .filter(|s| s.1.is_finite() && s.1 > 0.0)
            .collect();
        let light = RGBColor(160, 190, 230);
        chart
            .draw_series(LineSeries::new(
                train.iter().copied().filter(|s| s.1.is_finite() && s.1 > 0.0),
                light.stroke_width(1),
            ))
            .map_err(err(path))?
            .label("training (per step)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
        chart
            .draw_series(LineSeries::new(smoothed, BLUE.stroke_width(2)))
            .map_err(err(path))?
            .label(format!("training (mean of {window})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !valid.is_empty() {
            let orange = RGBColor(230, 120, 20);
            chart
                .draw_series(LineSeries::new(
                    valid.iter().map(|v| (v.0, v.1)),
                    orange.stroke_width(2),
                ))
                .map_err(err(path))?
                .label("validation")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
            chart
                .draw_series(valid.iter().map(|v| Circle::new((v.0, v.1), 3, orange.filled())))
                .map_err(err(path))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        let mut acc = ChartBuilder::on(&right)
            .caption("Validation exact match", ("sans-serif", 22))
            .margin(12)
            // Room for the last step's label at the right edge.
            .margin_right(28)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(first..last, 0.0..100.0)
            .map_err(err(path))?;
        acc.configure_mesh()
            .x_desc("step")
            .y_desc("%")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        if valid.is_empty() {
            right
                .draw(&Text::new("no --valid set", (140, 220), ("sans-serif", 18)))
                .map_err(err(path))?;
        } else {
            let green = RGBColor(30, 140, 60);
            acc.draw_series(LineSeries::new(
                valid.iter().map(|v| (v.0, 100.0 * v.2)),
                green.stroke_width(2),
            ))
            .map_err(err(path))?;
            acc.draw_series(valid.iter().map(|v| Circle::new((v.0, 100.0 * v.2), 3, green.filled())))
                .map_err(err(path))?;
        }
        root.present().map_err(err(path))?;
    }
    save_png(path, width, height, &rgb)
}

/// The width in pixels of `text` in the embedded font at `size`.
fn text_width(text: &str, size: u32) -> i32 {
    register_font();
    ("sans-serif", size)
        .into_font()
        .box_size(text)
        .map_or(text.chars().count() as i32 * size as i32 / 2, |(w, _)| w as i32)
}

/// `text` in lines no wider than `width` pixels at `size`, broken at spaces (a word wider than
/// the line stands alone on its line).
fn wrap_text(text: &str, width: i32, size: u32) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if !line.is_empty() && text_width(&candidate, size) > width {
            lines.push(std::mem::replace(&mut line, word.to_string()));
        } else {
            line = candidate;
        }
    }
    lines.push(line);
    lines
}

/// A heatmap of `weights` (`[rows, cols]`, values in 0..1) with row labels down the left,
/// column labels rotated along the top, a colour bar and a title, as a PNG.
pub fn heatmap(path: &Path, title: &str, rows: &[String], cols: &[String], weights: &[f32]) -> Result<()> {
    heatmap_grid(path, title, &[(String::new(), weights)], rows, cols)
}

/// Several heatmaps over the same labels (one per panel, each `[rows, cols]`, values in 0..1)
/// in a grid, each with its own title, row labels and rotated column labels, one colour bar,
/// and a title over all, as a PNG.
pub fn heatmap_grid(
    path: &Path,
    title: &str,
    panels: &[(String, &[f32])],
    rows: &[String],
    cols: &[String],
) -> Result<()> {
    register_font();
    if rows.is_empty() || cols.is_empty() || panels.is_empty() {
        bail!("cannot draw {}: nothing to draw", path.display());
    }
    if let Some((name, w)) = panels.iter().find(|(_, w)| w.len() != rows.len() * cols.len()) {
        bail!(
            "cannot draw {}: panel {name:?} has {} weights for {}×{} labels",
            path.display(),
            w.len(),
            rows.len(),
            cols.len()
        );
    }
    let short = |l: &String| l.chars().take(14).collect::<String>();
    let (rows, cols): (Vec<String>, Vec<String>) = (rows.iter().map(short).collect(), cols.iter().map(short).collect());
    let per_row = (panels.len() as f64).sqrt().ceil() as usize;
    let grid_rows = panels.len().div_ceil(per_row);
    // At least the labels' height, so that no two labels overlap however long the input.
    let cell = ((if panels.len() == 1 { 560 } else { 300 }) / cols.len().max(rows.len())).clamp(16, 40) as i32;
    let label_w = 14 + 8 * rows.iter().map(|r| r.chars().count()).max().unwrap_or(1) as i32;
    let label_h = 14 + 8 * cols.iter().map(|c| c.chars().count()).max().unwrap_or(1) as i32;
    let panel_title = if panels.len() == 1 { 0 } else { 22 };
    let panel_w = label_w + cell * cols.len() as i32 + 24;
    let panel_h = panel_title + label_h + cell * rows.len() as i32 + 24;
    // The title in as many lines as it needs at the grid's width (at least 700 pixels): the
    // picture is sized to hold it, and the colour bar, whatever the input's length.
    let content_w = panel_w * per_row as i32 + 110;
    let title_lines = wrap_text(title, content_w.max(700) - 24, 18);
    let title_w = title_lines.iter().map(|l| text_width(l, 18)).max().unwrap_or(0);
    let header = 24 + 24 * title_lines.len() as i32;
    let bar_h = (cell * rows.len() as i32).max(100);
    let w = content_w.max(title_w + 24).max(420);
    let h = (header + panel_h * grid_rows as i32).max(header + panel_title + label_h + bar_h + 24);
    let (width, height) = (w.max(420) as u32, h as u32);
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        for (i, line) in title_lines.iter().enumerate() {
            root.draw(&Text::new(
                line.clone(),
                (12, 12 + 24 * i as i32),
                ("sans-serif", 18).into_font(),
            ))
            .map_err(err(path))?;
        }
        let colour = |v: f32| {
            let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
            ViridisRGB::get_color(v as f64)
        };
        let rotated = ("sans-serif", 13).into_font().transform(FontTransform::Rotate270);
        for (p, (name, weights)) in panels.iter().enumerate() {
            let (ox, oy) = ((p % per_row) as i32 * panel_w, header + (p / per_row) as i32 * panel_h);
            if !name.is_empty() {
                root.draw(&Text::new(
                    name.clone(),
                    (ox + label_w, oy),
                    ("sans-serif", 15).into_font(),
                ))
                .map_err(err(path))?;
            }
            let (x0, y0) = (ox + label_w, oy + panel_title + label_h);
            for (i, label) in rows.iter().enumerate() {
                let y = y0 + i as i32 * cell;
                root.draw(&Text::new(
                    label.clone(),
                    (ox + 6, y + cell / 2 - 7),
                    ("sans-serif", 13).into_font(),
                ))
                .map_err(err(path))?;
                for j in 0..cols.len() {
                    let x = x0 + j as i32 * cell;
                    let c = colour(weights[i * cols.len() + j]);
                    root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], c.filled()))
                        .map_err(err(path))?;
                }
            }
            for (j, label) in cols.iter().enumerate() {
                let x = x0 + j as i32 * cell + cell / 2 - 7;
                root.draw(&Text::new(label.clone(), (x, y0 - 6), rotated.clone()))
                    .map_err(err(path))?;
            }
        }
        // One colour bar for all panels: 0 at the bottom, 1 at the top.
        let (bx, by, bh) = (content_w - 90, header + panel_title + label_h, bar_h);
        for k in 0..bh {
            let v = 1.0 - k as f32 / (bh - 1).max(1) as f32;
            root.draw(&Rectangle::new(
                [(bx, by + k), (bx + 18, by + k + 1)],
                colour(v).filled(),
            ))
            .map_err(err(path))?;
        }
        for (v, y) in [("1", by), ("0.5", by + bh / 2 - 7), ("0", by + bh - 14)] {
            root.draw(&Text::new(v, (bx + 24, y), ("sans-serif", 13).into_font()))
                .map_err(err(path))?;
        }
        root.present().map_err(err(path))?;
    }
    save_png(path, width, height, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is clipped: for inputs of 1 to 70 characters and titles short and long, the
    /// picture's outermost pixels are background, so the title, the labels and the colour bar
    /// all end inside it.
    #[test]
    fn heatmaps_hold_their_title_labels_and_colour_bar() {
        let dir = std::env::temp_dir().join(format!("attn-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (n_cols, n_rows, title_words) in [(1, 2, 3), (2, 2, 20), (27, 11, 20), (70, 2, 40), (12, 30, 1)] {
            let cols: Vec<String> = (0..n_cols)
                .map(|i| ((b'a' + (i % 26) as u8) as char).to_string())
                .collect();
            let rows: Vec<String> = (0..n_rows).map(|i| format!("{}", i % 10)).collect();
            let weights: Vec<f32> = (0..n_rows * n_cols).map(|i| (i % 7) as f32 / 6.0).collect();
            let title = vec!["cross-attention"; title_words].join(" ");
            let path = dir.join(format!("h{n_cols}.png"));
            heatmap(&path, &title, &rows, &cols, &weights).unwrap();
            let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
            let mut reader = decoder.read_info().unwrap();
            let mut rgb = vec![0u8; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut rgb).unwrap();
            let (w, h) = (info.width as usize, info.height as usize);
            let white = |x: usize, y: usize| rgb[(y * w + x) * 3..(y * w + x) * 3 + 3] == [255, 255, 255];
            for y in 0..h {
                for x in w - 3..w {
                    assert!(
                        white(x, y),
                        "{n_cols} columns: pixel ({x}, {y}) at the right edge is drawn on"
                    );
                }
            }
            for x in 0..w {
                for y in h - 3..h {
                    assert!(
                        white(x, y),
                        "{n_cols} columns: pixel ({x}, {y}) at the bottom edge is drawn on"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The sweep's chart: each line is drawn in its colour (pixels of exactly that colour are
    /// on the picture), the edges stay background, and a chart without points is an error.
    #[test]
    fn log2_lines_draws_every_line_inside_the_picture() {
        let path = std::env::temp_dir().join(format!("attn-lines-{}.png", std::process::id()));
        let colours = [RGBColor(30, 90, 220), RGBColor(200, 30, 30)];
        let lines: Vec<Line<'_>> = colours
            .iter()
            .enumerate()
            .map(|(i, &colour)| Line {
                name: if i == 0 { "one" } else { "two" },
                colour,
                points: [128.0, 256.0, 4096.0]
                    .iter()
                    .map(|&x| (x, 50.0 * (i + 1) as f64))
                    .collect(),
            })
            .collect();
        log2_lines(&path, "a title", ["x", "y"], &lines).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0u8; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut rgb).unwrap();
        let (w, h) = (info.width as usize, info.height as usize);
        let pixel = |x: usize, y: usize| [rgb[(y * w + x) * 3], rgb[(y * w + x) * 3 + 1], rgb[(y * w + x) * 3 + 2]];
        for c in colours {
            let drawn = (0..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .filter(|&(x, y)| pixel(x, y) == [c.0, c.1, c.2]);
            assert!(drawn.count() > 200, "the line of colour {c:?} is drawn");
        }
        assert!((0..w).all(|x| pixel(x, h - 1) == [255, 255, 255] && pixel(x, 0) == [255, 255, 255]));
        std::fs::remove_file(&path).unwrap();
        let none = [Line {
            name: "empty",
            colour: colours[0],
            points: Vec::new(),
        }];
        assert!(log2_lines(&path, "t", ["x", "y"], &none).is_err());
    }
}
