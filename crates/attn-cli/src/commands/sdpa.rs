//! `attn sdpa`: PyTorch `scaled_dot_product_attention` on tensors from a safetensors file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::{Causal, Par, View4};
use attn_nn::core::{sdpa, sdpa_backward, BoolMeaning, ScoreMask, SdpaOptions, SdpaShape};

use crate::support::tensors::{write_f32, Tensor, TensorFile};
use crate::support::threads::Threads;

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
    after_help = "Examples:\n  attn sdpa --input qkv.safetensors --output out.safetensors\n  attn sdpa --input qkv.safetensors --output out.safetensors --causal bottom-right --threads 2\n\nIN holds q [B,H,S,D], k [B,G,T,D], v [B,G,T,Dv] (F32) and an optional mask broadcastable to\n[B,H,S,T]: BOOL (true = may attend) or F32 (added to the scaled scores).\nOUT holds out [B,H,S,Dv] and lse [B,H,S].\nWith --backward, IN also holds grad.out [B,H,S,Dv], and OUT also holds grad.q, grad.k, grad.v:\nthe gradients of sum(out * grad.out), as PyTorch's out.backward(grad_out) gives them."
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
    /// Also compute the gradients of sum(out * grad.out) (IN must hold grad.out)
    #[arg(long)]
    backward: bool,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn sdpa`; prints one line naming what it wrote.
pub fn main(args: Args) -> Result<()> {
    let causal = parse_causal(args.causal.as_deref())?;
    args.threads.install(|_| {
        let file = TensorFile::read(&args.input)?;
        let computed = compute(&file, causal, args.scale, args.backward)?;
        let SdpaShape { b, h, g, s, t, d, dv } = computed.shape;
        let (out_shape, lse_shape) = ([b, h, s, dv], [b, h, s]);
        let (q_shape, k_shape, v_shape) = ([b, h, s, d], [b, g, t, d], [b, g, t, dv]);
        let mut tensors: Vec<(&str, &[usize], &[f32])> =
            vec![("out", &out_shape, &computed.out), ("lse", &lse_shape, &computed.lse)];
        if let Some(grads) = &computed.grads {
            tensors.push(("grad.q", &q_shape, &grads.dq));
            tensors.push(("grad.k", &k_shape, &grads.dk));
            tensors.push(("grad.v", &v_shape, &grads.dv));
        }
        write_f32(&args.output, &tensors)?;
        let grads = if computed.grads.is_some() {
            ", grad.q, grad.k, grad.v"
        } else {
            ""
        };
        println!(
            "wrote {}: out {:?}, lse {:?}{grads}",
            args.output.display(),
            [b, h, s, dv],
            [b, h, s]
        );
        Ok(())
    })
}

/// What [`compute`] returns: the call's shape, `out`, `lse`, and the gradients when asked for.
pub struct Computed {
    pub shape: SdpaShape,
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub grads: Option<attn_nn::core::SdpaGradients>,
}

/// The attention of `file`'s `q`, `k`, `v` and optional `mask`: its shape, `out` and `lse`,
/// and with `backward` the gradients against `file`'s `grad.out`.
pub fn compute(file: &TensorFile, causal: Causal, scale: Option<f32>, backward: bool) -> Result<Computed> {
    let input = file.path().display().to_string();
    if backward {
        file.only(&["q", "k", "v", "mask", "grad.out"])?;
    } else {
        file.only(&["q", "k", "v", "mask"])?;
    }
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
        Some(Tensor::Bf16 { .. }) => bail!(
            "{}: tensor `mask` has dtype BF16, expected BOOL or F32",
            file.path().display()
        ),
    };
    let options = SdpaOptions {
        scale,
        causal,
        mask,
        ..Default::default()
    };
    // `out` is `[B, H, S, Dv]`: larger than any input when `Dv` is large and `S` long; the
    // packed K and V larger than `k` and `v` when `Dv` is below 16; the gradients are as large
    // as the inputs.
    let needed = shape
        .output_bytes()
        .saturating_add(shape.packed_bytes())
        .saturating_add(if backward { shape.input_bytes() } else { 0 });
    crate::support::memory::check(
        needed,
        if backward {
            "sdpa --backward (out, lse, packed k and v, gradients)"
        } else {
            "sdpa (out, lse, packed k and v)"
        },
    )?;
    let (qv, kv, vv) = (
        View4::contiguous(q, [b, h, s, d])?,
        View4::contiguous(k, [b, g, t, d])?,
        View4::contiguous(v, [b, g, t, dv])?,
    );
    let result = sdpa(qv, kv, vv, &options, Par::Rayon).with_context(|| input.clone())?;
    let grads = if backward {
        let (dout_shape, dout) = match file.get("grad.out") {
            Some(_) => file.f32("grad.out", 4, "[B, H, S, Dv]")?,
            None => bail!(
                "{input}: --backward needs `grad.out` [B, H, S, Dv] = {:?} in the input file",
                [b, h, s, dv]
            ),
        };
        if dout_shape != [b, h, s, dv] {
            bail!(
                "{input}: `grad.out` has shape {dout_shape:?}, expected the shape of out [B, H, S, Dv] = {:?}",
                [b, h, s, dv]
            );
        }
        let dout = View4::contiguous(dout, [b, h, s, dv])?;
        Some(sdpa_backward(qv, kv, vv, &result, dout, &options, Par::Rayon).with_context(|| input.clone())?)
    } else {
        None
    };
    Ok(Computed {
        shape,
        out: result.output,
        lse: result.lse,
        grads,
    })
}
