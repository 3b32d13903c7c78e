//! Attention weights as a heatmap in the terminal: query tokens down the side, key tokens
//! (written vertically) across the top, one cell per weight.
//!
//! Colour uses the 24-step grey ramp of 256-colour terminals; plain mode uses ten characters of
//! increasing ink, so the picture survives a pipe or a log file.

/// How cells are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// ANSI 256-colour backgrounds.
    Color,
    /// ASCII shades.
    Plain,
}

impl Style {
    /// Colour when stdout is a terminal that is not `dumb` and `NO_COLOR` is unset.
    pub fn detect(force_plain: bool) -> Style {
        use std::io::IsTerminal;
        let term_ok = std::env::var("TERM").is_ok_and(|t| t != "dumb");
        if !force_plain && std::io::stdout().is_terminal() && term_ok && std::env::var_os("NO_COLOR").is_none() {
            Style::Color
        } else {
            Style::Plain
        }
    }
}

const SHADES: &[u8] = b" .:-=+*#%@";

fn cell(weight: f32, style: Style) -> String {
    let w = if weight.is_finite() {
        weight.clamp(0.0, 1.0)
    } else {
        0.0
    };
    match style {
        Style::Plain => {
            let c = SHADES[((w * (SHADES.len() - 1) as f32).round() as usize).min(SHADES.len() - 1)] as char;
            format!("{c}{c}{c}")
        }
        Style::Color => {
            // 232 is near black, 255 near white.
            let level = 232 + (w.sqrt() * 23.0).round() as u32;
            format!("\x1b[48;5;{level}m   \x1b[0m")
        }
    }
}

/// Renders `weights` (`[rows, cols]` row-major) with labels; `cols` labels go on top, vertically.
pub fn render(row_labels: &[String], col_labels: &[String], weights: &[f32], style: Style) -> String {
    let cols = col_labels.len();
    debug_assert_eq!(weights.len(), row_labels.len() * cols);
    let label_width = row_labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let col_height = col_labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for r in 0..col_height {
        out.push_str(&" ".repeat(label_width + 2));
        for label in col_labels {
            let c = label.chars().nth(r).unwrap_or(' ');
            out.push_str(&format!(" {c} "));
        }
        out.push('\n');
    }
    for (i, label) in row_labels.iter().enumerate() {
        out.push_str(&format!("{label:>label_width$}  "));
        for j in 0..cols {
            out.push_str(&cell(weights[i * cols + j], style));
        }
        out.push('\n');
    }
    if style == Style::Plain {
        out.push_str(&format!(
            "{}  scale: 0 '{}' .. 1 '{}'\n",
            " ".repeat(label_width),
            SHADES[0] as char,
            SHADES[SHADES.len() - 1] as char
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_heatmap_has_labels_and_shades() {
        let rows = vec!["a".to_string(), "bb".to_string()];
        let text = render(&rows, &rows, &[1.0, 0.0, 0.5, 0.5], Style::Plain);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "     a  b ");
        assert_eq!(lines[1], "        b ");
        assert_eq!(lines[2], " a  @@@   ");
        assert_eq!(lines[3], "bb  ++++++");
        assert!(lines[4].contains("scale"));
    }
}
