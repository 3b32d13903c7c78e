//! `attn demo`: attention at work, offline and in seconds.
//!
//! By default, the date translator that ships inside the binary (trained by `attn train`)
//! translates a few dates, draws its cross-attention (which source characters each output
//! character looked at), says where each part of the answer came from, and checks incremental
//! decoding against the full forward. With `--model DIR` (a BERT-family folder), it draws one
//! head of one layer of that model on `--text` and says where each head of the layer looks;
//! `--toy` shows the hand-set heads below.
//!
//! Four heads with hand-set projections, each with a job a reader can check by eye: attend to
//! the previous word, to the same word, to the next word, and to the recent past (a causal
//! mask with an ALiBi-style distance penalty). The demo draws each head's weights, says where each
//! head looks most, checks the flash kernel and the unfused path against the f64 reference, and
//! times fused against unfused attention.

use anyhow::{bail, Result};
use attn_nn::core::kernels::{
    attention_reference, attention_unfused, flash_attention, gemm, masked_softmax, simd_level, Accum, AttentionOptions,
    Causal, ForwardInputs, Mask, Par, View2, View4, ViewMut2, ViewMut4,
};

use crate::commands::embed::Embedder;
use crate::support::dtype::Dtype;
use crate::support::heatmap::{render, Style};
use crate::support::timing::{measure, random_vec, Budget, SdpaBench};
use std::path::{Path, PathBuf};

pub const DEFAULT_TEXT: &str = "the cat sat on the mat because the cat was tired";
const HEAD_DIM: usize = 16;
const HEADS: [&str; 4] = [
    "previous word",
    "same word",
    "next word",
    "recent past (causal, distance penalty)",
];
const MAX_TOKENS: usize = 40;
/// Length of the projection vectors: sets how sharply a head picks its target.
const SHARPNESS: f32 = 5.0;

fn unit_vector(seed: u64) -> Vec<f32> {
    let v = random_vec(HEAD_DIM, seed);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// A stable seed per word: FNV-1a of its bytes.
fn word_seed(word: &str) -> u64 {
    crate::support::fnv::fnv1a(word.bytes())
}

/// Builds `q, k, v: [1, 4, S, 16]` and the additive mask `[1, 4, S, S]` of the four heads.
fn build_heads(tokens: &[String]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = tokens.len();
    let n_heads = HEADS.len();
    let (mut q, mut k) = (
        vec![0.0f32; n_heads * s * HEAD_DIM],
        vec![0.0f32; n_heads * s * HEAD_DIM],
    );
    let mut mask = vec![0.0f32; n_heads * s * s];
    let position = |p: i64| unit_vector((1_000 + p) as u64);
    for i in 0..s {
        let at = |head: usize| (head * s + i) * HEAD_DIM;
        let put = |buf: &mut Vec<f32>, head: usize, vec: Vec<f32>| {
            buf[at(head)..at(head) + HEAD_DIM]
                .iter_mut()
                .zip(vec)
                .for_each(|(x, y)| *x = SHARPNESS * y);
        };
        put(&mut q, 0, position(i as i64 - 1));
        put(&mut k, 0, position(i as i64));
        put(&mut q, 1, unit_vector(word_seed(&tokens[i])));
        put(&mut k, 1, unit_vector(word_seed(&tokens[i])));
        put(&mut q, 2, position(i as i64 + 1));
        put(&mut k, 2, position(i as i64));
        // Head 3: zero q and k; all of its shape comes from the additive mask.
        for j in 0..s {
            mask[(3 * s + i) * s + j] = if j > i {
                f32::NEG_INFINITY
            } else {
                -0.7 * (i - j) as f32
            };
        }
    }
    let v: Vec<f32> = (0..n_heads * s)
        .flat_map(|r| unit_vector(word_seed(&tokens[r % s]) ^ 0x55))
        .collect();
    (q, k, v, mask)
}

/// `attn demo` (and plain `attn`).
#[derive(Debug, Default, clap::Args)]
#[command(
    after_help = "Examples:\n  attn demo\n  attn demo --text \"8.5.1911\" --attention view.html\n  attn demo --model DIR --text \"the bank of the river\" --layer 2 --head 5\n  attn demo --toy\n\nBy default, the date translator inside the binary (trained by `attn train`) translates a few\ndates (or --text), draws its cross-attention and checks incremental decoding; it answers `?`\n(\"not a date it can read\") where it has no answer. --model DIR shows one head of a BERT-family\nmodel instead (all-MiniLM-L6-v2 after `cargo xtask fetch-model`), --toy four hand-set heads\nwhose jobs can be checked by eye. Reference: docs/CLI.md."
)]
pub struct Args {
    /// What to look at: a date for the shipped translator, a sentence with --model or --toy.
    #[arg(long)]
    text: Option<String>,
    /// A BERT-family model folder: show its self-attention instead of the date translator.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With the date translator: also write every layer's and head's cross-attention to
    /// OUT.html (or the mean to OUT.png).
    #[arg(long, conflicts_with_all = ["model", "toy"], value_parser = crate::support::flags::png_or_html)]
    attention: Option<PathBuf>,
    /// The hand-set heads even when a model is there.
    #[arg(long, conflicts_with = "model")]
    toy: bool,
    /// With --model: the layer to show [default: the last]
    #[arg(long, requires = "model")]
    layer: Option<usize>,
    /// With --model: the head to draw [default: 0]
    #[arg(long, requires = "model")]
    head: Option<usize>,
    /// Plain characters instead of colour, whatever the terminal.
    #[arg(long)]
    plain: bool,
    /// Number format of the models' linear maps (the date translator's, or --model's); the toy
    /// heads are attention alone, in f32.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    threads: crate::support::threads::Threads,
}

impl Args {
    /// What plain `attn` runs: the demo with its defaults.
    pub fn plain_attn() -> Self {
        Args::default()
    }
}

/// Runs `attn demo`.
pub fn main(args: Args) -> Result<()> {
    args.threads.install(|_| {
        let style = Style::detect(args.plain);
        let text = args.text.as_deref();
        let dtype = if args.toy {
            Dtype::F32
        } else {
            args.dtype.effective(true)
        };
        match (&args.model, args.toy) {
            (Some(dir), _) => {
                model_view(
                    dir,
                    text.unwrap_or(DEFAULT_TEXT),
                    (args.layer, args.head.unwrap_or(0)),
                    dtype,
                    style,
                )?;
                toy_heads(DEFAULT_TEXT, style, false)
            }
            (None, true) => toy_heads(text.unwrap_or(DEFAULT_TEXT), style, true),
            (None, false) => crate::commands::demo_dates::run(text, args.attention.as_deref(), dtype, style),
        }
    })
}

/// Layer `layer`, head `head` of a BERT-family model on `text`, and where every head looks.
fn model_view(dir: &Path, text: &str, (layer, head): (Option<usize>, usize), dtype: Dtype, style: Style) -> Result<()> {
    let embedder = Embedder::load_as(dir, dtype)?;
    let model = embedder.model();
    let (ids, tokens) = embedder.tokens(text)?;
    if tokens.len() > MAX_TOKENS {
        bail!(
            "--text has {} tokens; the terminal view shows at most {MAX_TOKENS}",
            tokens.len()
        );
    }
    let n_layers = model.num_layers();
    let layer = layer.unwrap_or(n_layers.saturating_sub(1));
    if layer >= n_layers {
        bail!(
            "--layer is {layer}, expected 0 to {} (the model has {n_layers} layers)",
            n_layers - 1
        );
    }
    let h = model.config().num_attention_heads;
    if head >= h {
        bail!("--head is {head}, expected 0 to {} (the model has {h} heads)", h - 1);
    }
    let s = tokens.len();
    let weights = model.attention_map(&ids, layer, Par::Rayon)?;
    println!(
        "attn demo: {} ({n_layers} layers, {h} heads), SIMD {}",
        dir.display(),
        simd_level()
    );
    println!("text: {text}\ntokens: {}\n", tokens.join(" "));
    println!("layer {layer}, head {head}   (rows: queries, columns: keys; --layer, --head choose)");
    print!(
        "{}",
        render(&tokens, &tokens, &weights[head * s * s..(head + 1) * s * s], style)
    );
    println!("\nlayer {layer}, every head: mean weight on the special tokens ([CLS], [SEP]), on itself, on the");
    println!("previous token, and the word it attends most besides the special tokens:");
    for hi in 0..h {
        let HeadSummary {
            special,
            diagonal,
            previous,
            word,
        } = HeadSummary::of(&weights[hi * s * s..(hi + 1) * s * s], s);
        let word = word.map_or("-".to_string(), |(j, w)| format!("{} {:.2}", tokens[j], w));
        println!("  head {hi:>2}: special {special:.2}   self {diagonal:.2}   previous {previous:.2}   word {word}");
    }
    println!();
    Ok(())
}

/// Where one head of a BERT-family model looks, as `attn demo --model` prints it: means over
/// the queries of the weight on the special tokens (the first and the last, `[CLS]` and
/// `[SEP]`), on the query itself, and on the previous token (none for the first), and the
/// word between the special tokens with the largest mean weight (the first of equals; none
/// when there is none).
#[derive(Debug, PartialEq)]
struct HeadSummary {
    special: f32,
    diagonal: f32,
    previous: f32,
    word: Option<(usize, f32)>,
}

impl HeadSummary {
    /// The summary of one head's map `[S, S]` (rows: queries).
    fn of(map: &[f32], s: usize) -> Self {
        let mean = |f: &dyn Fn(usize) -> f32| (0..s).map(f).sum::<f32>() / s as f32;
        let word = (1..s.saturating_sub(1)).map(|j| (j, mean(&|i| map[i * s + j]))).fold(
            None,
            |best: Option<(usize, f32)>, c| if best.is_none_or(|b| c.1 > b.1) { Some(c) } else { best },
        );
        HeadSummary {
            special: mean(&|i| map[i * s] + map[i * s + s - 1]),
            diagonal: mean(&|i| map[i * s + i]),
            previous: mean(&|i| if i > 0 { map[i * s + i - 1] } else { 0.0 }),
            word,
        }
    }
}

/// The hand-set heads on `text`: drawn when `show` (else only computed), then checked against
/// the f64 reference and timed.
fn toy_heads(text: &str, style: Style, show: bool) -> Result<()> {
    let tokens: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    if tokens.is_empty() {
        bail!("--text is empty: give a sentence of 1 to {MAX_TOKENS} words");
    }
    if tokens.len() > MAX_TOKENS {
        bail!(
            "--text has {} words; the terminal view shows at most {MAX_TOKENS}",
            tokens.len()
        );
    }
    let (s, h, d) = (tokens.len(), HEADS.len(), HEAD_DIM);
    let (q, k, v, mask) = build_heads(&tokens);
    let shape = [1, h, s, d];
    let qv = View4::contiguous(&q, shape)?;
    let kv = View4::contiguous(&k, shape)?;
    let vv = View4::contiguous(&v, shape)?;
    let options = AttentionOptions {
        mask: Mask::Additive(View4::contiguous(&mask, [1, h, s, s])?),
        ..Default::default()
    };

    let weights = kernel_weights(&q, &k, [h, s, d], &options)?;
    if show {
        show_heads(&tokens, &weights, style);
    }
    check_against_reference(&tokens, [qv, kv, vv], &options, &weights)?;
    timing()
}

/// The heads' weights through the kernels: `scores = scale·q·kᵀ` per head, then the fused
/// masked softmax -> `[H, S, S]`.
fn kernel_weights(q: &[f32], k: &[f32], [h, s, d]: [usize; 3], options: &AttentionOptions<'_>) -> Result<Vec<f32>> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut weights = vec![0.0f32; h * s * s];
    for head in 0..h {
        let rows = &q[head * s * d..(head + 1) * s * d];
        let keys = &k[head * s * d..(head + 1) * s * d];
        gemm(
            ViewMut2::contiguous(&mut weights[head * s * s..(head + 1) * s * s], [s, s])?,
            Accum::Replace,
            View2::contiguous(rows, [s, d])?,
            View2::contiguous(keys, [s, d])?.permuted([1, 0])?,
            scale,
            Par::Seq,
        )?;
    }
    let softmax_options = AttentionOptions {
        scale: Some(1.0),
        ..*options
    };
    masked_softmax(
        ViewMut4::contiguous(&mut weights, [1, h, s, s])?,
        None,
        &softmax_options,
        Par::Rayon,
    )?;

    Ok(weights)
}

/// Each head's map with where each word looks most.
fn show_heads(tokens: &[String], weights: &[f32], style: Style) {
    let (s, h, d) = (tokens.len(), HEADS.len(), HEAD_DIM);
    println!(
        "attn demo: {} tokens, {h} hand-set heads of dim {d}, SIMD {}",
        s,
        simd_level()
    );
    println!("sentence: {}\n", tokens.join(" "));
    for (head, name) in HEADS.iter().enumerate() {
        println!("head {head}: {name}   (rows: queries, columns: keys)");
        print!(
            "{}",
            render(tokens, tokens, &weights[head * s * s..(head + 1) * s * s], style)
        );
        let looks: Vec<String> = (0..s)
            .map(|i| {
                let row = &weights[(head * s + i) * s..(head * s + i + 1) * s];
                let (j, w) = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |best, (j, &w)| if w > best.1 { (j, w) } else { best });
                format!("{}→{} {:.2}", tokens[i], tokens[j], w)
            })
            .collect();
        println!("looks most at: {}\n", looks.join(", "));
    }
}

/// The flash kernel, the unfused path and the fused softmax against the f64 reference.
fn check_against_reference(
    tokens: &[String],
    [qv, kv, vv]: [View4<'_, f32>; 3],
    options: &AttentionOptions<'_>,
    weights: &[f32],
) -> Result<()> {
    let shape = qv.shape();
    let [_, h, s, d] = shape;
    let reference = attention_reference(qv, kv, vv, options);
    let mut out = vec![0.0f32; h * s * d];
    let max_err = |name: &str, got: &[f32], want: &[f64]| {
        let err = crate::support::numerics::max_abs(got, want);
        println!("  {name:<28} max |error| vs f64 reference: {err:.2e}");
    };
    println!("check (hand-set heads on \"{}\"):", tokens.join(" "));
    flash_attention(
        ViewMut4::contiguous(&mut out, shape)?,
        None,
        ForwardInputs::new(qv, kv, vv),
        options,
        Par::Rayon,
    )?;
    max_err("flash kernel output", &out, &reference.out);
    attention_unfused(
        ViewMut4::contiguous(&mut out, shape)?,
        None,
        ForwardInputs::new(qv, kv, vv),
        options,
        Par::Rayon,
    )?;
    max_err("unfused path output", &out, &reference.out);
    max_err("fused softmax weights", weights, &reference.weights);

    Ok(())
}

/// A short timing: flash against unfused at a realistic size, and against the naive f64 loops
/// at a small one; each timed in turn, medians.
fn timing() -> Result<()> {
    let budget = Budget {
        min_runs: 5,
        min_seconds: 0.3,
    };
    let mut spec = SdpaBench {
        batch: 1,
        heads: 8,
        kv_heads: 8,
        seq: 1024,
        kv_seq: 1024,
        head_dim: 64,
        causal: false,
        path: crate::support::timing::Path::Flash,
        backward: None,
        dtype: Dtype::F32,
        kv_bf16: false,
    };
    let fused = spec.run(budget)?;
    spec.path = crate::support::timing::Path::Unfused;
    let unfused = spec.run(budget)?;
    let small = [1, 2, 128, 64];
    let (sq, sk) = (
        random_vec(small.iter().product(), 7),
        random_vec(small.iter().product(), 8),
    );
    let sv = View4::contiguous(&sq, small)?;
    let skv = View4::contiguous(&sk, small)?;
    let naive = measure(
        Budget {
            min_runs: 3,
            min_seconds: 0.0,
        },
        || {
            std::hint::black_box(attention_reference(
                sv,
                skv,
                skv,
                &AttentionOptions {
                    causal: Causal::None,
                    ..Default::default()
                },
            ));
        },
    );
    let mut small_out = vec![0.0f32; small.iter().product()];
    let fused_small = measure(
        Budget {
            min_runs: 5,
            min_seconds: 0.05,
        },
        || {
            let o = ViewMut4::contiguous(&mut small_out, small).expect("valid shape");
            flash_attention(
                o,
                None,
                ForwardInputs::new(sv, skv, skv),
                &AttentionOptions::default(),
                Par::Rayon,
            )
            .expect("valid shapes");
        },
    );
    println!("\ntiming ({} threads):", rayon::current_num_threads());
    println!(
        "  B=1 H=8 S=T=1024 D=64   flash {:.2} ms ({:.1} GFLOP/s)   unfused {:.2} ms   {}",
        fused.median_s * 1e3,
        spec.flops() / fused.median_s / 1e9,
        unfused.median_s * 1e3,
        which_is_faster(("flash", fused.median_s), ("unfused", unfused.median_s))
    );
    let chosen = attn_nn::core::kernels::chosen_path(simd_level(), [1, 8, 1024, 64], [8, 1024]);
    println!("  (attn's own entry, `attention`, takes the {chosen} path for this shape at this level)");
    println!(
        "  B=1 H=2 S=T=128 D=64    flash {:.3} ms   naive f64 loops {:.2} ms   {}",
        fused_small.median_s * 1e3,
        naive.median_s * 1e3,
        which_is_faster(("flash", fused_small.median_s), ("the naive loops", naive.median_s))
    );
    Ok(())
}

/// "A is 1.30× faster than B" for the quicker of two timings, whichever it is.
fn which_is_faster((a, a_s): (&str, f64), (b, b_s): (&str, f64)) -> String {
    let (fast, fast_s, slow, slow_s) = if a_s <= b_s { (a, a_s, b, b_s) } else { (b, b_s, a, a_s) };
    let ratio = slow_s / fast_s;
    if ratio < 1.05 {
        return format!("{a} and {b} take the same time (within 5%)");
    }
    let digits = if ratio < 10.0 { 2 } else { 0 };
    format!("{fast} is {ratio:.digits$}× faster than {slow}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_summarised_by_where_its_queries_look() {
        // [CLS] a b [SEP]; rows are queries. Values in quarters, so the means are exact.
        #[rustfmt::skip]
        let map = [
            0.5, 0.25, 0.0, 0.25,
            0.0, 0.25, 0.75, 0.0,
            0.25, 0.5, 0.25, 0.0,
            0.0, 0.0, 0.75, 0.25,
        ];
        assert_eq!(
            HeadSummary::of(&map, 4),
            HeadSummary {
                special: (0.75 + 0.0 + 0.25 + 0.25) / 4.0,
                diagonal: (0.5 + 0.25 + 0.25 + 0.25) / 4.0,
                previous: (0.0 + 0.0 + 0.5 + 0.75) / 4.0,
                word: Some((2, (0.0 + 0.75 + 0.25 + 0.75) / 4.0)),
            }
        );
        // Equal means: the first word. No word between the special tokens: none.
        let flat = [0.25f32; 16];
        assert_eq!(HeadSummary::of(&flat, 4).word, Some((1, 0.25)));
        assert_eq!(HeadSummary::of(&[0.5, 0.5, 0.5, 0.5], 2).word, None);
        assert_eq!(HeadSummary::of(&[1.0], 1).word, None);
    }

    #[test]
    fn words_are_seeded_by_fnv1a() {
        // A published FNV-1a (64-bit) vector: the same word gets the same vectors on every run.
        assert_eq!(word_seed("foobar"), 0x8594_4171_f739_67e8);
    }

    /// Each hand-set head holds what its job needs: the previous-word head's query at `i` is
    /// the key at `i − 1`, the next-word head's the key at `i + 1`, the same-word head's query
    /// equals every key of the same word and no other; queries and keys are `SHARPNESS` long,
    /// values unit vectors of the word; the recent-past head is all mask.
    #[test]
    fn the_hand_set_heads_are_built_for_their_jobs() {
        let tokens: Vec<String> = DEFAULT_TEXT.split_whitespace().map(String::from).collect();
        let s = tokens.len();
        let (q, k, v, mask) = build_heads(&tokens);
        assert_eq!([q.len(), k.len(), v.len()], [4 * s * HEAD_DIM; 3]);
        assert_eq!(mask.len(), 4 * s * s);
        let row = |buf: &[f32], head: usize, i: usize| buf[(head * s + i) * HEAD_DIM..][..HEAD_DIM].to_vec();
        let norm = |x: &[f32]| x.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
        for i in 0..s {
            for head in 0..3 {
                for buf in [&q, &k] {
                    let n = norm(&row(buf, head, i));
                    assert!((n - f64::from(SHARPNESS)).abs() < 1e-5, "head {head} row {i}: {n}");
                }
            }
            assert!(row(&q, 3, i).iter().chain(&row(&k, 3, i)).all(|&x| x == 0.0));
            for head in 0..4 {
                assert!((norm(&row(&v, head, i)) - 1.0).abs() < 1e-6);
                assert_eq!(row(&v, head, i), row(&v, 0, i));
            }
            for j in 0..s {
                assert_eq!(row(&q, 0, i) == row(&k, 0, j), j + 1 == i, "previous word, {i} {j}");
                assert_eq!(row(&q, 2, i) == row(&k, 2, j), i + 1 == j, "next word, {i} {j}");
                let same = tokens[i] == tokens[j];
                assert_eq!(row(&q, 1, i) == row(&k, 1, j), same, "same word, {i} {j}");
                assert_eq!(row(&v, 0, i) == row(&v, 0, j), same, "values, {i} {j}");
                for head in 0..3 {
                    assert_eq!(mask[(head * s + i) * s + j], 0.0);
                }
                let want = if j > i {
                    f32::NEG_INFINITY
                } else {
                    -0.7 * (i - j) as f32
                };
                assert_eq!(mask[(3 * s + i) * s + j], want, "recent past, {i} {j}");
            }
        }
    }

    #[test]
    fn the_timing_line_names_the_faster_path() {
        // The old line said "flash is 0.77x faster" when flash was slower.
        assert_eq!(
            which_is_faster(("flash", 1.3), ("unfused", 1.0)),
            "unfused is 1.30× faster than flash"
        );
        assert_eq!(
            which_is_faster(("flash", 1.0), ("unfused", 2.5)),
            "flash is 2.50× faster than unfused"
        );
        assert_eq!(
            which_is_faster(("flash", 0.001), ("the naive loops", 0.5)),
            "flash is 500× faster than the naive loops"
        );
        assert_eq!(
            which_is_faster(("flash", 1.0), ("unfused", 1.02)),
            "flash and unfused take the same time (within 5%)"
        );
        // At the edges: 5% is a difference, ten times is printed whole, equal times are equal.
        assert_eq!(which_is_faster(("a", 1.0), ("b", 1.05)), "a is 1.05× faster than b");
        assert_eq!(which_is_faster(("a", 10.0), ("b", 1.0)), "b is 10× faster than a");
        assert_eq!(
            which_is_faster(("a", 1.0), ("b", 1.0)),
            "a and b take the same time (within 5%)"
        );
    }
}
