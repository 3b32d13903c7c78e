//! The default `attn demo`: the date translator shipped inside the binary at work. It
//! translates a few dates, draws the cross-attention of one (output characters down, source
//! characters across), says where each part of the answer looked, and checks incremental
//! decoding (cached keys and values, one token at a time) against the full forward.

use std::path::Path;

use anyhow::Result;
use attn_nn::core::kernels::{simd_level, Par};
use attn_nn::Seq2Seq;

use crate::commands::translate::{cross_attention, draw_attention, shipped};
use crate::support::dtype::Dtype;
use crate::support::heatmap::{render, Style};
use crate::support::seq2seq_html::averaged;

const SAMPLES: [&str; 6] = [
    "Saturday, 28 November 2026",
    "the 4th of July 1976",
    "08.05.1911",
    "feb 29, 2000",
    "30 February 2001",
    "see you next week",
];

/// What the shipped model answers where it has no answer (docs/CLI.md).
pub const UNANSWERED: &str = "?";

/// The model's output as the demo prints it: `?` is spelled out.
pub fn answer(output: &str) -> String {
    if output == UNANSWERED {
        "?  (not a date it can read)".to_string()
    } else {
        output.to_string()
    }
}

/// Runs the date demo on `text` (or the samples).
pub fn run(text: Option<&str>, picture: Option<&Path>, dtype: Dtype, style: Style) -> Result<()> {
    let mut model = shipped()?;
    model.set_precision(dtype.precision())?;
    let c = model.config();
    let t = &c.transformer;
    println!(
        "attn demo: a date translator trained by `attn train` (d_model {}, {} heads, {}+{} layers, {} parameters), SIMD {}{}",
        t.layer.d_model,
        t.layer.nhead,
        t.num_encoder_layers,
        t.num_decoder_layers,
        model.parameter_count(),
        simd_level(),
        if dtype == Dtype::Bf16 { ", linear maps in bf16" } else { "" }
    );
    let sources: Vec<&str> = match text {
        Some(text) => vec![text],
        None => SAMPLES.to_vec(),
    };
    let decoded = model.greedy(&sources, c.max_len, true, Par::Rayon)?;
    let outputs: Vec<String> = decoded.iter().map(|d| c.tgt_vocab.decode(&d.tokens)).collect();
    let width = sources.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    println!();
    for (s, o) in sources.iter().zip(&outputs) {
        println!("  {s:>width$}  ->  {}", answer(o));
    }
    let (source, output) = (sources[0], outputs[0].as_str());
    let attention = cross_attention(&model, source, output)?;
    let (rows, cols, weights) = &attention;
    let mean = averaged(weights, rows.len(), cols.len());
    println!(
        "\ncross-attention of \"{source}\" (mean of {} layers x {} heads): rows are output characters, columns source characters",
        weights.len(),
        t.layer.nhead
    );
    print!("{}", render(rows, cols, &mean, style));
    if output == UNANSWERED {
        println!("\nthe model answered `?`: it reads no date in this text, so no part of an answer looked anywhere");
    } else {
        println!("\nwhere each part of the answer looked (the source span holding most of its attention):");
        for line in where_it_looked(source, output, &mean, cols.len()) {
            println!("  {line}");
        }
    }
    let (worst, steps) = incremental_against_full(&model, source, &decoded[0].logits)?;
    println!(
        "\ncheck: incremental decoding (KV cache, one token at a time) against the full forward, {steps} steps: largest logit difference {worst:.1e} ({})",
        if worst < 1e-3 { "ok" } else { "MISMATCH" }
    );
    if let Some(path) = picture {
        draw_attention(&model, path, source, output, &attention)?;
    }
    println!("\ntry: attn demo --text \"your date\"   |   attn demo --attention view.html   |   attn translate --help");
    println!("     {}", bert_hint());
    Ok(())
}

/// Where `attn demo --model` looks by default (all-MiniLM-L6-v2 from `cargo xtask fetch-model`).
pub fn bert_hint() -> String {
    let dir = crate::commands::embed::default_model_dir();
    if dir.join("config.json").exists() {
        format!("a BERT model's heads: attn demo --model {}", dir.display())
    } else {
        "a BERT model's heads: cargo xtask fetch-model, then attn demo --model DIR".to_string()
    }
}

/// One line per part of the answer (year, month, day, split at `-`): the source span its
/// characters attended most (widened to whole words), and the share of their attention inside
/// it.
pub fn where_it_looked(source: &str, output: &str, mean: &[f32], s: usize) -> Vec<String> {
    let src: Vec<char> = source.chars().collect();
    let out: Vec<char> = output.chars().collect();
    let mut lines = Vec::new();
    let mut start = 0;
    for end in (0..=out.len()).filter(|&i| i == out.len() || out[i] == '-') {
        if end > start {
            let rows = start..end;
            // The source positions each output character attends most.
            let best: Vec<usize> = rows
                .clone()
                .map(|i| {
                    let row = &mean[i * s..(i + 1) * s];
                    (0..s).fold(0, |b, j| if row[j] > row[b] { j } else { b })
                })
                .collect();
            let (mut lo, mut hi) = (*best.iter().min().expect("a row"), *best.iter().max().expect("a row"));
            // Widen to whole words of the source ("v" of "November" names "November").
            let in_word = |j: usize| src.get(j).is_some_and(|c| c.is_alphanumeric());
            while lo > 0 && in_word(lo) && in_word(lo - 1) {
                lo -= 1;
            }
            while in_word(hi) && in_word(hi + 1) {
                hi += 1;
            }
            let share: f32 = rows
                .clone()
                .map(|i| mean[i * s + lo..=i * s + hi].iter().sum::<f32>())
                .sum::<f32>()
                / rows.len() as f32;
            let part: String = out[rows].iter().collect();
            let span: String = (lo..=hi).map(|j| src.get(j).copied().unwrap_or('$')).collect();
            lines.push(format!("{part} <- '{span}' in the source, {share:.2}"));
        }
        start = end + 1;
    }
    lines
}

/// The largest difference between the greedy steps' logits (incremental, through the caches)
/// and the teacher-forced full forward on the same output.
fn incremental_against_full(model: &Seq2Seq, source: &str, steps: &[Vec<f32>]) -> Result<(f32, usize)> {
    let vocab = &model.config().tgt_vocab;
    let tokens: Vec<usize> = steps
        .iter()
        .map(|row| (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b }))
        .collect();
    let target = vocab.decode(&tokens);
    let batch = model.batch(&[(source, target.as_str())])?;
    let full = model.logits(&batch, Par::Rayon)?;
    let v = vocab.len();
    let n = steps.len().min(batch.t);
    let worst = (0..n)
        .flat_map(|i| {
            steps[i]
                .iter()
                .zip(&full[i * v..(i + 1) * v])
                .map(|(a, b)| (a - b).abs())
        })
        .fold(0.0f32, f32::max);
    Ok((worst, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_the_answer_name_the_span_they_looked_at() {
        // Output "12-3" over source "3 x 12": the year-like part looks at "12", the day at "3".
        let (source, output) = ("3 x 12", "12-3");
        let s = source.chars().count() + 1;
        let t = output.chars().count() + 1;
        let mut mean = vec![0.0f32; t * s];
        let mut put = |i: usize, j: usize, w: f32| mean[i * s + j] = w;
        put(0, 4, 0.9);
        put(1, 5, 0.8);
        put(2, 6, 1.0);
        put(3, 0, 0.7);
        put(4, 6, 1.0);
        let lines = where_it_looked(source, output, &mean, s);
        assert_eq!(
            lines,
            vec!["12 <- '12' in the source, 0.85", "3 <- '3' in the source, 0.70"]
        );
    }

    /// The check reads every step: a step's logits moved by 0.5 (not its largest) shows as a
    /// difference of about 0.5, and the steps counted are the answer's characters and `<eos>`.
    #[test]
    fn the_incremental_check_compares_every_step_with_the_full_forward() {
        let model = shipped().unwrap();
        let c = model.config();
        let source = "28 November 2026";
        let decoded = model.greedy(&[source], c.max_len, true, Par::Seq).unwrap();
        assert_eq!(c.tgt_vocab.decode(&decoded[0].tokens), "2026-11-28");
        let steps = decoded[0].logits.clone();
        assert_eq!(steps.len(), "2026-11-28".len() + 1);
        let (worst, n) = incremental_against_full(&model, source, &steps).unwrap();
        assert_eq!(n, steps.len());
        assert!((0.0..1e-3).contains(&worst), "{worst}");
        for step in [0, steps.len() - 1] {
            let mut moved = steps.clone();
            let row = &mut moved[step];
            let top = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            let other = (top + 1) % row.len();
            row[other] -= 0.5;
            let (moved_worst, _) = incremental_against_full(&model, source, &moved).unwrap();
            assert!((moved_worst - 0.5).abs() <= worst + 1e-4, "step {step}: {moved_worst}");
        }
    }

    #[test]
    fn spans_widen_to_whole_words_and_ties_take_the_first_position() {
        // Source "8 Nov 2026" (positions 0-9, `<eos>` at 10), answer "2026-11-08".
        let (source, output) = ("8 Nov 2026", "2026-11-08");
        let s = source.chars().count() + 1;
        let mut mean = vec![0.0f32; (output.chars().count() + 1) * s];
        for (i, j, w) in [
            // "2026" looks at 7, 8, 7, 9: the span widens left to the word's start at 6.
            (0, 7, 0.5),
            (0, 8, 0.25),
            (1, 8, 0.75),
            (2, 7, 0.5),
            (2, 6, 0.25),
            (3, 9, 0.5),
            (3, 0, 0.25),
            // "11" looks at the "o" of "Nov": the span widens both ways to the whole word.
            (5, 3, 1.0),
            (6, 3, 0.5),
            (6, 4, 0.3),
            // "08": row 8 is tied between 0 and 6 and takes 0, so the span stays "8".
            (8, 0, 0.5),
            (8, 6, 0.5),
            (9, 0, 0.7),
        ] {
            mean[i * s + j] = w;
        }
        assert_eq!(
            where_it_looked(source, output, &mean, s),
            vec![
                "2026 <- '2026' in the source, 0.69",
                "11 <- 'Nov' in the source, 0.90",
                "08 <- '8' in the source, 0.60",
            ]
        );
        // An empty part (a leading `-`) gets no line.
        let mean = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(
            where_it_looked("5", "-5", &mean, 2),
            vec!["5 <- '5' in the source, 1.00"]
        );
    }
}
