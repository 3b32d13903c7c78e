//! `attn attend`: pictures of a real model's attention on a sentence: a PNG grid of every head
//! of a layer with token labels, and a self-contained HTML page (no network) where pointing at
//! a token shows where it attends, with layer and head selectors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;

use crate::embed::{default_model_dir, Embedder};
use crate::heatmap;
use crate::threads::Threads;

/// `attn attend`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  attn attend --text \"the bank of the river\" --png heads.png --html view.html\n  attn attend --text \"a cat sat on the mat\" --layer 2 --head 5\n\nNeeds a BERT-family model folder: all-MiniLM-L6-v2 from `cargo xtask fetch-model`, or --model DIR."
)]
pub struct Args {
    /// The sentence.
    #[arg(long)]
    text: String,
    /// A BERT-family model folder [default: all-MiniLM-L6-v2 where fetch-model puts it]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The layer of the PNG and the terminal view [default: the last]
    #[arg(long)]
    layer: Option<usize>,
    /// The head of the terminal view.
    #[arg(long, default_value_t = 0)]
    head: usize,
    /// Write a grid of every head of the layer, with token labels.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Write a self-contained HTML page with every layer and head.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Plain characters in the terminal view.
    #[arg(long)]
    plain: bool,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn attend`: the terminal view of one head, and the pictures asked for.
pub fn main(args: Args) -> Result<()> {
    args.threads.install(|_| {
        let dir = args.model.clone().unwrap_or_else(default_model_dir);
        let embedder = Embedder::load(&dir)?;
        let maps = maps(&embedder, &args.text)?;
        let n_layers = maps.layers.len();
        let layer = args.layer.unwrap_or(n_layers.saturating_sub(1));
        if layer >= n_layers {
            bail!(
                "--layer is {layer}, expected 0 to {} (the model has {n_layers} layers)",
                n_layers - 1
            );
        }
        let head = args.head;
        if head >= maps.heads {
            bail!(
                "--head is {head}, expected 0 to {} (the model has {} heads)",
                maps.heads - 1,
                maps.heads
            );
        }
        let s = maps.tokens.len();
        println!("layer {layer}, head {head}   (rows: queries, columns: keys)");
        let style = heatmap::Style::detect(args.plain);
        let map = &maps.layers[layer][head * s * s..(head + 1) * s * s];
        print!("{}", heatmap::render(&maps.tokens, &maps.tokens, map, style));
        if let Some(path) = &args.png {
            write_png(&maps, layer, path)?;
            println!("wrote {} (every head of layer {layer})", path.display());
        }
        if let Some(path) = &args.html {
            write_html(&maps, &args.text, path)?;
            println!(
                "wrote {} (every layer and head; open it in a browser, no network needed)",
                path.display()
            );
        }
        Ok(())
    })
}

/// Attention maps of every layer: `[layers][H · S · S]`, with the tokens.
pub struct Maps {
    pub tokens: Vec<String>,
    pub heads: usize,
    pub layers: Vec<Vec<f32>>,
}

/// Runs the model on `text` and keeps every layer's attention.
pub fn maps(embedder: &Embedder, text: &str) -> Result<Maps> {
    let (ids, tokens) = embedder.tokens(text)?;
    if tokens.len() > 128 {
        bail!("--text has {} tokens; the pictures show at most 128", tokens.len());
    }
    let model = embedder.model();
    let layers = (0..model.num_layers())
        .map(|l| Ok(model.attention_map(&ids, l, Par::Rayon)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Maps {
        tokens,
        heads: model.config().num_attention_heads,
        layers,
    })
}

const CELL: usize = 12;
const GAP: usize = 24;

fn glyph(c: char) -> [u8; 8] {
    use font8x8::UnicodeFonts;
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

/// An RGB image to draw into, saved as PNG.
pub struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    /// A white `width × height` image.
    pub fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    /// A filled rectangle.
    pub fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                let i = (yy * self.width + xx) * 3;
                self.rgb[i..i + 3].copy_from_slice(&colour);
            }
        }
    }

    /// Text with its top-left corner at `(x, y)`, 8 pixels a character; `vertical` writes
    /// downwards, one character under the other.
    pub fn text(&mut self, x: usize, y: usize, text: &str, vertical: bool) {
        for (n, c) in text.chars().enumerate() {
            let (cx, cy) = if vertical { (x, y + n * 8) } else { (x + n * 8, y) };
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.fill(cx + col, cy + row, 1, 1, [0, 0, 0]);
                    }
                }
            }
        }
    }
}

impl Canvas {
    /// A 2-pixel line from `a` to `b`.
    pub fn line(&mut self, (x0, y0): (usize, usize), (x1, y1): (usize, usize), colour: [u8; 3]) {
        let steps = x0.abs_diff(x1).max(y0.abs_diff(y1)).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let x = (x0 as f64 + (x1 as f64 - x0 as f64) * t).round() as usize;
            let y = (y0 as f64 + (y1 as f64 - y0 as f64) * t).round() as usize;
            self.fill(x, y, 2, 2, colour);
        }
    }

    /// Writes the image as an 8-bit RGB PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&self.rgb)?;
        Ok(())
    }
}

/// White (0) to dark blue (1).
fn shade(w: f32) -> [u8; 3] {
    let w = if w.is_finite() { w.clamp(0.0, 1.0).sqrt() } else { 0.0 };
    [(255.0 * (1.0 - w)) as u8, (255.0 * (1.0 - 0.8 * w)) as u8, 255]
}

/// A PNG grid of every head of `layer`, each heatmap with the tokens on both axes.
pub fn write_png(maps: &Maps, layer: usize, path: &Path) -> Result<()> {
    let s = maps.tokens.len();
    let label = maps.tokens.iter().map(|t| t.chars().count()).max().unwrap_or(1).min(12) * 8;
    let panel = label + s * CELL;
    let columns = (maps.heads as f64).sqrt().ceil() as usize;
    let rows = maps.heads.div_ceil(columns);
    let title = 16;
    let mut canvas = Canvas::new(columns * (panel + GAP) + GAP, title + rows * (panel + GAP + 12) + GAP);
    canvas.text(GAP, 4, &format!("layer {layer}: rows attend to columns"), false);
    let weights = &maps.layers[layer];
    for head in 0..maps.heads {
        let (px, py) = (
            GAP + (head % columns) * (panel + GAP),
            title + GAP + (head / columns) * (panel + GAP + 12),
        );
        canvas.text(px, py - 12, &format!("head {head}"), false);
        let short = |t: &String| t.chars().take(12).collect::<String>();
        for (i, token) in maps.tokens.iter().enumerate() {
            // Row labels on the left, column labels written downwards under the map.
            canvas.text(px, py + label + i * CELL + 2, &short(token), false);
            canvas.text(px + label + i * CELL + 2, py, &short(token), true);
        }
        for i in 0..s {
            for j in 0..s {
                let w = weights[(head * s + i) * s + j];
                canvas.fill(
                    px + label + j * CELL,
                    py + label + i * CELL,
                    CELL - 1,
                    CELL - 1,
                    shade(w),
                );
            }
        }
    }
    let file = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), canvas.width as u32, canvas.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(&canvas.rgb)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A self-contained HTML page: tokens twice, layer and head selectors; pointing at (or clicking)
/// a token on the left shades each token on the right by the weight it gets.
pub fn write_html(maps: &Maps, text: &str, path: &Path) -> Result<()> {
    let s = maps.tokens.len();
    // Four decimals are plenty for shading and keep the page small.
    let layers: Vec<Vec<Vec<Vec<f32>>>> = maps
        .layers
        .iter()
        .map(|w| {
            (0..maps.heads)
                .map(|h| {
                    (0..s)
                        .map(|i| {
                            w[(h * s + i) * s..(h * s + i + 1) * s]
                                .iter()
                                .map(|x| (x * 1e4).round() / 1e4)
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let data = serde_json::json!({ "text": text, "tokens": maps.tokens, "heads": maps.heads, "weights": layers });
    // `</` cannot close the script element from inside the JSON.
    let json = data.to_string().replace("</", "<\\/");
    let page = HTML.replace("__DATA__", &json);
    std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))
}

const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attn: attention view</title>
<style>
body { font: 15px system-ui, sans-serif; margin: 24px; color: #222; }
#controls { margin-bottom: 16px; }
#view { display: flex; gap: 80px; }
.col div { padding: 2px 8px; margin: 2px 0; border-radius: 4px; cursor: pointer; white-space: pre; }
#left div.selected { outline: 2px solid #c33; }
#info { margin-top: 16px; color: #555; }
</style></head>
<body>
<h2>attention</h2>
<div id="controls">layer <select id="layer"></select> head <select id="head"></select>
<span style="margin-left: 16px">point at or click a token on the left</span></div>
<div id="view"><div class="col" id="left"></div><div class="col" id="right"></div></div>
<div id="info"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById('data').textContent);
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
data.weights.forEach((_, l) => layerSel.add(new Option(String(l), String(l))));
headSel.add(new Option('mean of heads', 'mean'));
for (let h = 0; h < data.heads; h++) headSel.add(new Option(String(h), String(h)));
layerSel.value = String(data.weights.length - 1);
const left = document.getElementById('left'), right = document.getElementById('right');
data.tokens.forEach((t, i) => {
  const a = document.createElement('div'); a.textContent = t; a.dataset.index = i; left.appendChild(a);
  const b = document.createElement('div'); b.textContent = t; b.dataset.index = i; right.appendChild(b);
  a.addEventListener('mouseenter', () => show(i));
  a.addEventListener('click', () => show(i));
});
let current = 0;
function row(i) {
  const layer = data.weights[Number(layerSel.value)];
  if (headSel.value !== 'mean') return layer[Number(headSel.value)][i];
  return layer[0][i].map((_, j) => layer.reduce((s, h) => s + h[i][j], 0) / layer.length);
}
function show(i) {
  current = i;
  const w = row(i);
  [...left.children].forEach((d, k) => d.classList.toggle('selected', k === i));
  [...right.children].forEach((d, j) => {
    d.style.background = `rgba(40, 90, 220, ${Math.sqrt(w[j]).toFixed(3)})`;
    d.dataset.weight = w[j].toFixed(4);
    d.title = w[j].toFixed(4);
  });
  const top = w.map((x, j) => [x, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  document.getElementById('info').textContent = `"${data.tokens[i]}" attends most to ` +
    top.map(([x, j]) => `"${data.tokens[j]}" (${x.toFixed(3)})`).join(', ');
}
layerSel.addEventListener('change', () => show(current));
headSel.addEventListener('change', () => show(current));
// The address may choose the view: #layer=2&head=5&click=3 (the click goes through the handler).
const params = new URLSearchParams(location.hash.slice(1));
if (params.has('layer')) layerSel.value = params.get('layer');
if (params.has('head')) headSel.value = params.get('head');
show(0);
if (params.has('click')) left.children[Number(params.get('click'))].click();
</script></body></html>
"#;
