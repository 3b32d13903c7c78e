//! Text files of one input a line, as `attn embed --input` and `attn translate --input` read
//! them: UTF-8 (a byte that is not names its line), a final newline ends the last line rather
//! than starting another, and a `\r` before a newline is not part of the line.

use std::path::Path;

use anyhow::{Context, Result};

/// Lines of text held in one buffer: a file's lines without a `String` each (10 million short
/// lines would add 40 B of allocation to every one), or the texts given as arguments.
#[derive(Debug, Default, Clone)]
pub struct Lines {
    text: String,
    spans: Vec<(usize, usize)>,
}

impl Lines {
    /// The lines of the UTF-8 file at `path`: split at `\n` and `\r\n`, a final newline ending
    /// the last line rather than starting another, and a lone `\r` at a line's end dropped.
    pub fn read(path: &Path) -> Result<Lines> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count();
            anyhow::anyhow!(
                "{}: line {line} is not UTF-8 text (invalid byte at offset {valid})",
                path.display()
            )
        })?;
        let base = text.as_ptr() as usize;
        let spans = text
            .lines()
            .map(|l| {
                let l = l.strip_suffix('\r').unwrap_or(l);
                let start = l.as_ptr() as usize - base;
                (start, start + l.len())
            })
            .collect();
        Ok(Lines { text, spans })
    }

    /// The texts, one line each (a text may hold newlines of its own).
    pub fn from_texts<S: AsRef<str>>(texts: &[S]) -> Lines {
        let mut lines = Lines::default();
        for t in texts {
            let start = lines.text.len();
            lines.text.push_str(t.as_ref());
            lines.spans.push((start, lines.text.len()));
        }
        lines
    }

    /// How many lines.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Line `i`; panics when `i >= len()`.
    pub fn get(&self, i: usize) -> &str {
        let (start, end) = self.spans[i];
        &self.text[start..end]
    }

    /// Lines `range`, borrowed.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Vec<&str> {
        range.map(|i| self.get(i)).collect()
    }

    /// Every line, borrowed.
    pub fn all(&self) -> Vec<&str> {
        self.slice(0..self.len())
    }
}

/// `e`, with an input that a call given inputs `first..` names by its index
/// (`NnError::NonFinite`) named as the user gave it: by its line of the file `input`, or as the
/// argument it was, counted from 1. Other errors pass unchanged.
pub fn name_input(e: anyhow::Error, first: usize, input: Option<&Path>) -> anyhow::Error {
    let Some(attn_nn::NnError::NonFinite { index, what }) = e.downcast_ref::<attn_nn::NnError>() else {
        return e;
    };
    let n = first + index + 1;
    match input {
        Some(path) => anyhow::anyhow!("{}: line {n}: {what}", path.display()),
        None => anyhow::anyhow!("argument {n}: {what}"),
    }
}

/// The lines of the UTF-8 file at `path` ([`Lines::read`]), each its own `String`.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let lines = Lines::read(path)?;
    Ok((0..lines.len()).map(|i| lines.get(i).to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_endings_and_bad_bytes() {
        let path = std::env::temp_dir().join(format!("attn-text-{}.txt", std::process::id()));
        std::fs::write(&path, "a\r\n\nb\n").unwrap();
        assert_eq!(read_lines(&path).unwrap(), vec!["a", "", "b"]);
        // A lone `\r` before the end of a line or of the file goes; one inside a line stays.
        std::fs::write(&path, "é\r\r\nx\ry\n\n\nlast\r").unwrap();
        let lines = Lines::read(&path).unwrap();
        assert_eq!(lines.all(), vec!["é", "x\ry", "", "", "last"]);
        assert_eq!(
            (lines.len(), lines.get(1), lines.slice(3..5)),
            (5, "x\ry", vec!["", "last"])
        );
        std::fs::write(&path, "").unwrap();
        assert!(Lines::read(&path).unwrap().is_empty());
        let given = Lines::from_texts(&["two\nlines", "", "ü"]);
        assert_eq!(given.all(), vec!["two\nlines", "", "ü"]);
        std::fs::write(&path, b"ok\nf\xff\n").unwrap();
        let err = read_lines(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2 is not UTF-8 text (invalid byte at offset 4)"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
