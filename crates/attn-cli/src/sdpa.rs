//! `attn sdpa`: PyTorch `scaled_dot_product_attention` on tensors from a safetensors file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::{
    broadcast_to, flash_attention, AttentionOptions, Causal, Mask, Par, View4, ViewMut, ViewMut4,
};

use crate::tensors::{write_f32, Tensor, TensorFile};

/// The validated shapes of an sdpa problem.
#[derive(Debug, Clone, Copy)]
pub struct SdpaShape {
    pub b: usize,
    pub h: usize,
    pub g: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
    pub dv: usize,
}

impl SdpaShape {
    /// Checks `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` and names the tensor at fault.
    pub fn check(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let [b, h, s, d] = q[..] else {
            bail!("tensor `q` has shape {q:?}, expected [B, H, S, D]")
        };
        let [kb, g, t, kd] = k[..] else {
            bail!("tensor `k` has shape {k:?}, expected [B, G, T, D]")
        };
        let [vb, vg, vt, dv] = v[..] else {
            bail!("tensor `v` has shape {v:?}, expected [B, G, T, Dv]")
        };
        if kb != b || kd != d {
            bail!("tensor `k` has shape {k:?}, expected [{b}, G, T, {d}] to match `q` [B, H, S, D] = {q:?}");
        }
        if g == 0 || h % g != 0 {
            bail!("tensor `k` has G = {g} key/value heads, which does not divide the H = {h} query heads of `q`");
        }
        if [vb, vg, vt] != [b, g, t] {
            bail!("tensor `v` has shape {v:?}, expected [{b}, {g}, {t}, Dv] to match `k` {k:?}");
        }
        if d == 0 || dv == 0 {
            bail!("head dims must be at least 1: `q` has D = {d}, `v` has Dv = {dv}");
        }
        Ok(SdpaShape { b, h, g, s, t, d, dv })
    }
}

/// Parses `--causal`.
pub fn parse_causal(value: Option<&str>) -> Result<Causal> {
    Ok(match value {
        None => Causal::None,
        Some("top-left") => Causal::TopLeft,
        Some("bottom-right") => Causal::BottomRight,
        Some(other) => bail!("--causal is `{other}`, expected `top-left` or `bottom-right`"),
    })
}

pub fn run(input: &Path, output: &Path, causal: Causal, scale: Option<f32>) -> Result<()> {
    let file = TensorFile::read(input)?;
    let (shape, out, lse) = compute(&file, causal, scale)?;
    let SdpaShape { b, h, s, dv, .. } = shape;
    write_f32(output, &[("out", &[b, h, s, dv], &out), ("lse", &[b, h, s], &lse)])
}

/// The attention of `file`'s `q`, `k`, `v` and optional `mask`: its shape, `out` and `lse`.
pub fn compute(file: &TensorFile, causal: Causal, scale: Option<f32>) -> Result<(SdpaShape, Vec<f32>, Vec<f32>)> {
    let input = file.path();
    file.only(&["q", "k", "v", "mask"])?;
    let (q_shape, q) = file.f32("q", 4, "[B, H, S, D]")?;
    let (k_shape, k) = file.f32("k", 4, "[B, G, T, D]")?;
    let (v_shape, v) = file.f32("v", 4, "[B, G, T, Dv]")?;
    let shape = SdpaShape::check(q_shape, k_shape, v_shape).with_context(|| input.display().to_string())?;
    let SdpaShape { b, h, g, s, t, d, dv } = shape;
    if let Some(scale) = scale {
        if !scale.is_finite() {
            bail!("--scale is {scale}, expected a finite number");
        }
    }
    let target = [b, h, s, t];
    let mask = match file.get("mask") {
        None => Mask::None,
        Some(tensor) => {
            let not_broadcastable = || {
                anyhow::anyhow!(
                    "{}: tensor `mask` has shape {:?}, expected a shape broadcastable to [B, H, S, T] = {target:?}",
                    input.display(),
                    tensor.shape()
                )
            };
            match tensor {
                Tensor::Bool { shape, data } => {
                    Mask::Allowed(broadcast_to(data, shape, target).map_err(|_| not_broadcastable())?)
                }
                Tensor::F32 { shape, data } => {
                    Mask::Additive(broadcast_to(data, shape, target).map_err(|_| not_broadcastable())?)
                }
            }
        }
    };
    let options = AttentionOptions {
        scale,
        mask,
        causal,
        ..Default::default()
    };
    // `out` is `[B, H, S, Dv]`: larger than any input when `Dv` is large and `S` long.
    crate::memory::check(
        crate::memory::f32_bytes(&[b, h, s, dv]).saturating_add(crate::memory::f32_bytes(&[b, h, s])),
        "sdpa (out, lse)",
    )?;
    let mut out = vec![0.0f32; b * h * s * dv];
    let mut lse = vec![0.0f32; b * h * s];
    flash_attention(
        ViewMut4::contiguous(&mut out, [b, h, s, dv])?,
        Some(ViewMut::contiguous(&mut lse, [b, h, s])?),
        View4::contiguous(q, [b, h, s, d])?,
        View4::contiguous(k, [b, g, t, d])?,
        View4::contiguous(v, [b, g, t, dv])?,
        &options,
        Par::Rayon,
    )?;
    Ok((shape, out, lse))
}
