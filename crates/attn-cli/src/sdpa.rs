//! `attn sdpa`: PyTorch `scaled_dot_product_attention` on tensors from a safetensors file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::{Causal, Par, View4};
use attn_nn::core::{sdpa, BoolMeaning, ScoreMask, SdpaOptions, SdpaShape};

use crate::tensors::{write_f32, Tensor, TensorFile};
use crate::threads::Threads;

/// Parses `--causal`.
pub fn parse_causal(value: Option<&str>) -> Result<Causal> {
    Ok(match value {
        None => Causal::None,
        Some("top-left") => Causal::TopLeft,
        Some("bottom-right") => Causal::BottomRight,
        Some(other) => bail!("--causal is `{other}`, expected `top-left` or `bottom-right`"),
    })
}

/// `attn sdpa`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  attn sdpa --input qkv.safetensors --output out.safetensors\n  attn sdpa --input qkv.safetensors --output out.safetensors --causal bottom-right --threads 2\n\nIN holds q [B,H,S,D], k [B,G,T,D], v [B,G,T,Dv] (F32) and an optional mask broadcastable to\n[B,H,S,T]: BOOL (true = may attend) or F32 (added to the scaled scores).\nOUT holds out [B,H,S,Dv] and lse [B,H,S]."
)]
pub struct Args {
    /// Input safetensors file with q, k, v and optionally mask.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file for out and lse.
    #[arg(long)]
    output: PathBuf,
    /// Causal masking: top-left (PyTorch is_causal=True) or bottom-right (last query sees every key).
    #[arg(long, value_parser = ["top-left", "bottom-right"])]
    causal: Option<String>,
    /// Scale of q·k [default: 1/sqrt(D)]
    #[arg(long, allow_negative_numbers = true)]
    scale: Option<f32>,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn sdpa`; prints one line naming what it wrote.
pub fn main(args: Args) -> Result<()> {
    let causal = parse_causal(args.causal.as_deref())?;
    args.threads.install(|_| {
        let file = TensorFile::read(&args.input)?;
        let (shape, out, lse) = compute(&file, causal, args.scale)?;
        let SdpaShape { b, h, s, dv, .. } = shape;
        write_f32(
            &args.output,
            &[("out", &[b, h, s, dv], &out), ("lse", &[b, h, s], &lse)],
        )?;
        println!(
            "wrote {}: out {:?}, lse {:?}",
            args.output.display(),
            [b, h, s, dv],
            [b, h, s]
        );
        Ok(())
    })
}

/// The attention of `file`'s `q`, `k`, `v` and optional `mask`: its shape, `out` and `lse`.
pub fn compute(file: &TensorFile, causal: Causal, scale: Option<f32>) -> Result<(SdpaShape, Vec<f32>, Vec<f32>)> {
    let input = file.path().display().to_string();
    file.only(&["q", "k", "v", "mask"])?;
    let (q_shape, q) = file.f32("q", 4, "[B, H, S, D]")?;
    let (k_shape, k) = file.f32("k", 4, "[B, G, T, D]")?;
    let (v_shape, v) = file.f32("v", 4, "[B, G, T, Dv]")?;
    let shape = SdpaShape::check(q_shape, k_shape, v_shape).with_context(|| input.clone())?;
    let SdpaShape { b, h, g, s, t, d, dv } = shape;
    if let Some(scale) = scale {
        if !scale.is_finite() {
            bail!("--scale is {scale}, expected a finite number");
        }
    }
    // SDPA's conventions: a boolean mask says where a query may attend, a float mask is added.
    let mask = match file.get("mask") {
        None => ScoreMask::None,
        Some(Tensor::Bool { shape, data }) => ScoreMask::Bool {
            data,
            shape,
            meaning: BoolMeaning::MayAttend,
        },
        Some(Tensor::F32 { shape, data }) => ScoreMask::Additive { data, shape },
    };
    let options = SdpaOptions {
        scale,
        causal,
        mask,
        ..Default::default()
    };
    // `out` is `[B, H, S, Dv]`: larger than any input when `Dv` is large and `S` long.
    crate::memory::check(shape.output_bytes(), "sdpa (out, lse)")?;
    let result = sdpa(
        View4::contiguous(q, [b, h, s, d])?,
        View4::contiguous(k, [b, g, t, d])?,
        View4::contiguous(v, [b, g, t, dv])?,
        &options,
        Par::Rayon,
    )
    .with_context(|| input.clone())?;
    Ok((shape, result.out, result.lse))
}
