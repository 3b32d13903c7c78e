//! Where `attn embed` puts its rows, written as they come so that memory does not grow with
//! the input: a safetensors file (written atomically), `{"embeddings": [[...], ...]}` on stdout,
//! or a table on stdout. Each is the same bytes as the whole output written at once. Nothing
//! reaches stdout before the first rows, so a run that fails in its first round prints nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::support::tensors::StreamedF32;

/// Rows shown in full in the table's cosine similarities.
const PAIRS: usize = 5;

/// The destination of `N` rows of `E` values, given in order.
pub enum Output {
    /// `embeddings` `[N, E]` in a safetensors file.
    File {
        file: StreamedF32,
        path: PathBuf,
        shape: [usize; 2],
    },
    /// `{"embeddings": [[...], ...]}` and a newline on stdout.
    Json {
        out: std::io::BufWriter<std::io::Stdout>,
        rows: usize,
        e: usize,
    },
    /// Each sentence with its first values, then the cosines of the first [`PAIRS`] rows.
    Table {
        out: std::io::BufWriter<std::io::Stdout>,
        rows: usize,
        first: Vec<Vec<f32>>,
        n: usize,
        e: usize,
    },
}

impl Output {
    /// Opens the destination of `n` rows of `e` values: the file at `path` (a path that cannot
    /// be written fails here, before any row is computed), else JSON when `json`, else the table.
    pub fn open(path: Option<&Path>, json: bool, n: usize, e: usize) -> Result<Output> {
        let out = || std::io::BufWriter::with_capacity(1 << 16, std::io::stdout());
        Ok(match path {
            Some(path) => Output::File {
                file: StreamedF32::create(path, "embeddings", &[n, e])?,
                path: path.to_path_buf(),
                shape: [n, e],
            },
            None if json => Output::Json { out: out(), rows: 0, e },
            None => Output::Table {
                out: out(),
                rows: 0,
                first: Vec::new(),
                n,
                e,
            },
        })
    }

    /// The next rows: `values` holds one row of `E` for each of `sentences`.
    pub fn rows(&mut self, sentences: &[&str], values: &[f32]) -> Result<()> {
        match self {
            Output::File { file, .. } => file.write(values)?,
            Output::Json { out, rows, e } => {
                if *rows == 0 {
                    out.write_all(b"{\"embeddings\":[")?;
                }
                for row in values.chunks((*e).max(1)).take(sentences.len()) {
                    out.write_all(if *rows == 0 { b"[" } else { b",[" })?;
                    for (j, &x) in row.iter().enumerate() {
                        if j > 0 {
                            out.write_all(b",")?;
                        }
                        // As serde_json writes an f32 held in a `Value`: the f64 of the same
                        // value (every digit of it), and `null` for NaN and infinities.
                        serde_json::to_writer(&mut *out, &(x as f64))?;
                    }
                    out.write_all(b"]")?;
                    *rows += 1;
                }
            }
            Output::Table { out, rows, first, n, e } => {
                if *rows == 0 {
                    out.write_all(table_header(*n, *e).as_bytes())?;
                }
                for (sentence, row) in sentences.iter().zip(values.chunks((*e).max(1))) {
                    out.write_all(table_row(*rows, sentence, row).as_bytes())?;
                    if first.len() < PAIRS {
                        first.push(row.to_vec());
                    }
                    *rows += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends what stdout's rows hold so far (a file is written as it goes).
    pub fn flush(&mut self) -> Result<()> {
        match self {
            Output::File { .. } => {}
            Output::Json { out, .. } | Output::Table { out, .. } => out.flush()?,
        }
        Ok(())
    }

    /// Ends the output: renames the finished file into place (and says so on stdout), closes
    /// the JSON, or prints the table's cosines.
    pub fn finish(self) -> Result<()> {
        match self {
            Output::File { file, path, shape } => {
                file.finish()?;
                println!("wrote {}: embeddings {shape:?}", path.display());
            }
            Output::Json { mut out, rows, .. } => {
                out.write_all(if rows == 0 { b"{\"embeddings\":[]}\n" } else { b"]}\n" })?;
                out.flush()?;
            }
            Output::Table {
                mut out,
                rows,
                first,
                n,
                e,
            } => {
                if rows == 0 {
                    out.write_all(table_header(n, e).as_bytes())?;
                }
                out.write_all(cosines(&first, n).as_bytes())?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// The table's first line.
fn table_header(n: usize, e: usize) -> String {
    format!("{n} sentences, {e} dimensions (--json or --output for every value)\n")
}

/// Row `i` of the table: the sentence (clipped to 40 characters) and its first values.
fn table_row(i: usize, sentence: &str, v: &[f32]) -> String {
    const SHOWN: usize = 6;
    let mut clipped: String = sentence.chars().take(40).collect();
    if sentence.chars().nth(40).is_some() {
        clipped.push('…');
    }
    let head: Vec<String> = v.iter().take(SHOWN).map(|x| format!("{x:+.4}")).collect();
    format!("{i:>3}  {clipped:<41} [{}, …]\n", head.join(", "))
}

/// The table's pairwise cosine similarities of its `first` rows (of `n` in all), when there are
/// at least two.
fn cosines(first: &[Vec<f32>], n: usize) -> String {
    let shown = first.len();
    if shown < 2 {
        return String::new();
    }
    let of_first = if n > shown { " of the first 5" } else { "" };
    let mut text = format!("\ncosine similarity{of_first}:\n     ");
    text.push_str(&(0..shown).map(|j| format!("{j:>7}")).collect::<String>());
    text.push('\n');
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    for (i, a) in first.iter().enumerate() {
        text.push_str(&format!("{i:>3}  "));
        for b in first {
            let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
            text.push_str(&format!("{:>7.3}", dot / (norm(a) * norm(b)).max(1e-30)));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON rows are the bytes `serde_json::json!` gives for the same `f32` rows, awkward
    /// values included (NaN and infinities become `null`, as there).
    #[test]
    fn json_values_are_written_as_a_json_value_writes_them() {
        let values = [
            0.1f32,
            -0.0,
            1e-45,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.05391864,
            3.0,
        ];
        let mut ours = Vec::new();
        for &x in &values {
            serde_json::to_writer(&mut ours, &(x as f64)).unwrap();
            ours.push(b',');
        }
        let mut theirs = Vec::new();
        for &x in &values {
            theirs.extend(serde_json::json!(x).to_string().into_bytes());
            theirs.push(b',');
        }
        assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(theirs).unwrap());
    }

    /// The table's rows clip at 40 characters (counted as characters, not bytes), and cosines
    /// appear from two rows on, naming "the first 5" only when there are more rows.
    #[test]
    fn table_rows_and_cosines() {
        let row = table_row(3, &"é".repeat(41), &[0.5, -0.25, 1.0, 2.0, 0.0, 0.0, 9.0]);
        assert_eq!(
            row,
            format!(
                "  3  {}… [+0.5000, -0.2500, +1.0000, +2.0000, +0.0000, +0.0000, …]\n",
                "é".repeat(40)
            )
        );
        assert_eq!(cosines(&[vec![1.0, 0.0]], 1), "");
        let text = cosines(&[vec![1.0, 0.0], vec![0.0, 2.0], vec![-3.0, 0.0]], 3);
        assert_eq!(
            text,
            "\ncosine similarity:\n           0      1      2\n  0    1.000  0.000 -1.000\n  1    0.000  1.000  0.000\n  2   -1.000  0.000  1.000\n"
        );
        assert!(cosines(&[vec![1.0], vec![1.0]], 9).starts_with("\ncosine similarity of the first 5:"));
        // A zero row has cosine 0, not NaN.
        assert!(cosines(&[vec![0.0], vec![1.0]], 2).contains("  0.000"));
    }
}
