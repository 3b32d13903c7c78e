//! The validated entry point to the attention kernels, with masks typed so they cannot be misread.
//!
//! A boolean mask always says what `true` means ([`BoolMeaning`]): SDPA's `true` = may attend,
//! PyTorch modules' `true` = masked out. Key padding is its own kind of mask, by lengths or by a
//! `[B, T]` mask. Everything is checked here once; errors name the tensor and both shapes.

use attn_kernels::{
    broadcast_to, flash_attention, AttentionOptions, Causal, KernelError, Mask, Par, View4, ViewMut, ViewMut4,
};

use crate::error::shape_error;
use crate::{AttnError, Result};

/// What `true` means in a boolean mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolMeaning {
    /// `true` = this query may attend this key (`scaled_dot_product_attention`).
    MayAttend,
    /// `true` = this key is masked out (`nn.MultiheadAttention`, `nn.Transformer*`).
    MaskedOut,
}

/// A mask over the scores, broadcast to `[B, H, S, T]` by PyTorch's rules (right-aligned, size-1
/// dims broadcast; a 2-D mask is `[S, T]`).
#[derive(Debug, Clone, Copy, Default)]
pub enum ScoreMask<'a> {
    /// No mask.
    #[default]
    None,
    /// A boolean mask and what its `true` means.
    Bool {
        /// Row-major elements.
        data: &'a [bool],
        /// Its shape, rank 0 to 4.
        shape: &'a [usize],
        /// What `true` means.
        meaning: BoolMeaning,
    },
    /// Added to the scaled scores (`-inf` masks out).
    Additive {
        /// Row-major elements.
        data: &'a [f32],
        /// Its shape, rank 0 to 4.
        shape: &'a [usize],
    },
}

/// Which keys of each batch entry are padding.
#[derive(Debug, Clone, Copy, Default)]
pub enum KeyPadding<'a> {
    /// No padding.
    #[default]
    None,
    /// Batch `b` has `lengths[b]` real keys, then padding; length `B`.
    Lengths(&'a [usize]),
    /// A `[B, T]` boolean mask and what its `true` means.
    Bool {
        /// Row-major `[B, T]`.
        data: &'a [bool],
        /// What `true` means.
        meaning: BoolMeaning,
    },
    /// A `[B, T]` additive mask.
    Additive(&'a [f32]),
}

/// Options of [`sdpa`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SdpaOptions<'a> {
    /// Multiplies `q·k`; `None` is `1/sqrt(D)`.
    pub scale: Option<f32>,
    /// Causal masking and its alignment.
    pub causal: Causal,
    /// A mask over the scores.
    pub mask: ScoreMask<'a>,
    /// Key padding.
    pub key_padding: KeyPadding<'a>,
    /// ALiBi slopes, one per query head (see [`alibi_slopes`](crate::alibi_slopes)).
    pub alibi_slopes: Option<&'a [f32]>,
}

/// The outputs of [`sdpa`].
#[derive(Debug, Clone)]
pub struct SdpaOutput {
    /// `[B, H, S, Dv]`.
    pub out: Vec<f32>,
    /// `[B, H, S]`: natural log of each row's softmax denominator, `-inf` for empty rows.
    pub lse: Vec<f32>,
}

impl<'a> SdpaOptions<'a> {
    /// The kernel options for scores of shape `[B, H, S, T]`, or an error naming the mask.
    pub fn to_kernel(&self, [b, h, s, t]: [usize; 4]) -> Result<AttentionOptions<'a>> {
        let target = [b, h, s, t];
        let broadcast_error = |tensor: &str, shape: &[usize]| {
            shape_error(
                "sdpa",
                tensor,
                format!("a shape broadcastable to [B, H, S, T] = {target:?}"),
                shape,
            )
        };
        let mask = match self.mask {
            ScoreMask::None => Mask::None,
            ScoreMask::Bool { data, shape, meaning } => {
                let view = broadcast_to(data, shape, target).map_err(|e| match e {
                    KernelError::ShapeMismatch { .. } => AttnError::BadTensorData {
                        name: "mask".into(),
                        shape: shape.to_vec(),
                        needed: shape.iter().product(),
                        len: data.len(),
                    },
                    _ => broadcast_error("mask", shape),
                })?;
                match meaning {
                    BoolMeaning::MayAttend => Mask::Allowed(view),
                    BoolMeaning::MaskedOut => Mask::Disallowed(view),
                }
            }
            ScoreMask::Additive { data, shape } => {
                Mask::Additive(broadcast_to(data, shape, target).map_err(|e| match e {
                    KernelError::ShapeMismatch { .. } => AttnError::BadTensorData {
                        name: "mask".into(),
                        shape: shape.to_vec(),
                        needed: shape.iter().product(),
                        len: data.len(),
                    },
                    _ => broadcast_error("mask", shape),
                })?)
            }
        };
        let padding_view = |len: usize| {
            if len != b * t {
                return Err(shape_error(
                    "sdpa",
                    "key_padding",
                    format!("[B, T] = [{b}, {t}]"),
                    &[len],
                ));
            }
            Ok([b, 1, 1, t])
        };
        let (key_mask, key_lengths) = match self.key_padding {
            KeyPadding::None => (Mask::None, None),
            KeyPadding::Lengths(lengths) => (Mask::None, Some(lengths)),
            KeyPadding::Bool { data, meaning } => {
                let view = broadcast_to(data, &padding_view(data.len())?, target)?;
                let mask = match meaning {
                    BoolMeaning::MayAttend => Mask::Allowed(view),
                    BoolMeaning::MaskedOut => Mask::Disallowed(view),
                };
                (mask, None)
            }
            KeyPadding::Additive(data) => (
                Mask::Additive(broadcast_to(data, &padding_view(data.len())?, target)?),
                None,
            ),
        };
        Ok(AttentionOptions {
            scale: self.scale,
            mask,
            key_mask,
            causal: self.causal,
            key_lengths,
            alibi_slopes: self.alibi_slopes,
        })
    }
}

/// Scaled dot-product attention with PyTorch's semantics: `q: [B, H, S, D]`, `k: [B, G, T, D]`,
/// `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]` and `lse: [B, H, S]`.
///
/// `G` must divide `H` (grouped-query attention without copying K or V). A row with nothing to
/// attend to gets zeros and `lse = -inf`.
///
/// ```
/// use attn_core::{sdpa, BoolMeaning, ScoreMask, SdpaOptions};
/// use attn_core::kernels::{Par, View4};
/// let q = vec![0.5f32; 2 * 3 * 4];
/// let view = View4::contiguous(&q, [1, 2, 3, 4]).unwrap();
/// // Query 2 may not attend key 0.
/// let allowed = [true, true, true, true, true, true, false, true, true];
/// let options = SdpaOptions {
///     mask: ScoreMask::Bool { data: &allowed, shape: &[3, 3], meaning: BoolMeaning::MayAttend },
///     ..Default::default()
/// };
/// let result = sdpa(view, view, view, &options, Par::Seq).unwrap();
/// assert_eq!(result.out.len(), 2 * 3 * 4);
/// ```
pub fn sdpa(
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &SdpaOptions<'_>,
    par: Par,
) -> Result<SdpaOutput> {
    let [b, h, s, _] = q.shape();
    let dv = v.shape()[3];
    let mut out = vec![0.0f32; b * h * s * dv];
    let mut lse = vec![0.0f32; b * h * s];
    sdpa_into(
        ViewMut4::contiguous(&mut out, [b, h, s, dv])?,
        Some(ViewMut::contiguous(&mut lse, [b, h, s])?),
        q,
        k,
        v,
        options,
        par,
    )?;
    Ok(SdpaOutput { out, lse })
}

/// [`sdpa`] into caller-provided (possibly strided) destinations: `out: [B, H, S, Dv]`,
/// `lse: [B, H, S]`.
pub fn sdpa_into(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &SdpaOptions<'_>,
    par: Par,
) -> Result<()> {
    let [b, h, s, _] = q.shape();
    let t = k.shape()[2];
    let kernel_options = options.to_kernel([b, h, s, t])?;
    flash_attention(out, lse, q, k, v, &kernel_options, par)?;
    Ok(())
}
