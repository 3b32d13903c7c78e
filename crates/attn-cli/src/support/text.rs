//! Text files of one input a line, as `attn embed --input` and `attn translate --input` read
//! them: UTF-8 (a byte that is not names its line), a final newline ends the last line rather
//! than starting another, and a `\r` before a newline is not part of the line.

use std::path::Path;

use anyhow::{Context, Result};

/// The lines of the UTF-8 file at `path`.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!(
            "{}: line {line} is not UTF-8 text (invalid byte at offset {valid})",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_endings_and_bad_bytes() {
        let path = std::env::temp_dir().join(format!("attn-text-{}.txt", std::process::id()));
        std::fs::write(&path, "a\r\n\nb\n").unwrap();
        assert_eq!(read_lines(&path).unwrap(), vec!["a", "", "b"]);
        std::fs::write(&path, b"ok\nf\xff\n").unwrap();
        let err = read_lines(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2 is not UTF-8 text (invalid byte at offset 4)"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
