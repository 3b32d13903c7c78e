//! The validated entry point to the attention kernels, with masks typed so they cannot be misread.
//!
//! A boolean mask always says what `true` means ([`BoolMeaning`]): SDPA's `true` = may attend,
//! PyTorch modules' `true` = masked out. Key padding is its own kind of mask, by lengths or by a
//! `[B, T]` mask. Everything is checked here once; errors name the tensor and both shapes.

use attn_kernels::{
    attention, attention_backward, attention_with_lse_lo, broadcast_to, AttentionOptions, BackwardInputs, Causal,
    ForwardInputs, Gradients, KernelError, Mask, Par, View, View4, ViewMut, ViewMut4,
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

/// The validated shapes of an attention problem: `q: [B, H, S, D]`, `k: [B, G, T, D]`,
/// `v: [B, G, T, Dv]` with `G` dividing `H`. Every caller of the kernels checks shapes here,
/// once, with errors that name the tensor at fault and both shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpaShape {
    /// B.
    pub b: usize,
    /// H.
    pub h: usize,
    /// G.
    pub g: usize,
    /// S.
    pub s: usize,
    /// T.
    pub t: usize,
    /// D.
    pub d: usize,
    /// Dv.
    pub dv: usize,
}

impl SdpaShape {
    /// Checks the shapes of `q`, `k` and `v` against each other.
    pub fn check(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let op = "sdpa";
        let [b, h, s, d] = q[..] else {
            return Err(shape_error(op, "q", "[B, H, S, D]", q));
        };
        let [kb, g, t, kd] = k[..] else {
            return Err(shape_error(op, "k", "[B, G, T, D]", k));
        };
        let [vb, vg, vt, dv] = v[..] else {
            return Err(shape_error(op, "v", "[B, G, T, Dv]", v));
        };
        if kb != b || kd != d {
            return Err(shape_error(
                op,
                "k",
                format!("[{b}, G, T, {d}] to match `q` [B, H, S, D] = {q:?}"),
                k,
            ));
        }
        if g == 0 || h % g != 0 {
            return Err(shape_error(
                op,
                "k",
                format!("G dividing H (G = {g} key/value heads, which does not divide the H = {h} query heads of `q`)"),
                k,
            ));
        }
        if [vb, vg, vt] != [b, g, t] {
            return Err(shape_error(
                op,
                "v",
                format!("[{b}, {g}, {t}, Dv] to match `k` {k:?}"),
                v,
            ));
        }
        if d == 0 || dv == 0 {
            return Err(shape_error(
                op,
                if d == 0 { "q" } else { "v" },
                format!("head dims must be at least 1: `q` has D = {d}, `v` has Dv = {dv}"),
                if d == 0 { q } else { v },
            ));
        }
        Ok(SdpaShape { b, h, g, s, t, d, dv })
    }

    /// Bytes of the inputs `q`, `k`, `v` (for callers that allocate them).
    pub fn input_bytes(&self) -> u128 {
        let SdpaShape { b, h, g, s, t, d, dv } = *self;
        f32_size_in_bytes(&[b, h, s, d])
            .saturating_add(f32_size_in_bytes(&[b, g, t, d]))
            .saturating_add(f32_size_in_bytes(&[b, g, t, dv]))
    }

    /// Bytes [`sdpa`] allocates: `out: [B, H, S, Dv]` and `lse: [B, H, S]`.
    pub fn output_bytes(&self) -> u128 {
        let SdpaShape { b, h, s, dv, .. } = *self;
        f32_size_in_bytes(&[b, h, s, dv]).saturating_add(f32_size_in_bytes(&[b, h, s]))
    }

    /// At most the bytes of the flash kernel's packed copies of K and V, which a call with
    /// several row tiles per key/value head makes (and the backward reuses): each key block
    /// transposed, each value block in panels of 16 columns, the keys rounded up to whole
    /// blocks ([`kernels::BLOCK_KEYS`](attn_kernels::BLOCK_KEYS), the largest). An upper bound
    /// whether or not the call packs. With `Dv` below 16 the value panels outgrow `v` itself:
    /// at `Dv = 1`, 16 times (a call over 2·10^7 keys held 1.5 GB for 160 MB of inputs).
    pub fn packed_bytes(&self) -> u128 {
        let SdpaShape { b, g, t, d, dv, .. } = *self;
        let block = attn_kernels::BLOCK_KEYS.max(attn_kernels::BF16_BLOCK_KEYS) as u128;
        let keys = (t as u128).div_ceil(block) * block;
        let width = d as u128 + (dv as u128).div_ceil(16) * 16;
        [b as u128, g as u128, keys, width, 4]
            .iter()
            .fold(1u128, |acc, &n| acc.saturating_mul(n))
    }
}

/// How many bytes an f32 tensor of shape `dims` takes, saturating (never overflows).
pub fn f32_size_in_bytes(dims: &[usize]) -> u128 {
    dims.iter()
        .fold(1u128, |acc, &n| acc.saturating_mul(n as u128))
        .saturating_mul(4)
}

/// The old name of [`f32_size_in_bytes`] (it counts bytes; it serialises nothing).
#[deprecated(since = "0.1.0", note = "renamed `f32_size_in_bytes`: it counts bytes")]
pub fn f32_bytes(dims: &[usize]) -> u128 {
    f32_size_in_bytes(dims)
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
    /// The number format of the two products (see [`Precision`](crate::Precision)); bf16 is
    /// forward only: [`sdpa_backward`] refuses it.
    pub precision: crate::Precision,
}

impl<'a> SdpaOptions<'a> {
    /// The two products in this precision.
    pub fn precision(self, precision: crate::Precision) -> Self {
        SdpaOptions { precision, ..self }
    }

    /// Causal masking, with the given alignment.
    pub fn causal(self, causal: Causal) -> Self {
        SdpaOptions { causal, ..self }
    }

    /// These keys are padding.
    pub fn key_padding(self, key_padding: KeyPadding<'a>) -> Self {
        SdpaOptions { key_padding, ..self }
    }

    /// This mask on the scores.
    pub fn mask(self, mask: ScoreMask<'a>) -> Self {
        SdpaOptions { mask, ..self }
    }
}

/// The outputs of [`sdpa`].
#[derive(Debug, Clone)]
pub struct SdpaOutput {
    /// `[B, H, S, Dv]`.
    pub output: Vec<f32>,
    /// `[B, H, S]`: natural log of each row's softmax denominator, `-inf` for empty rows.
    pub lse: Vec<f32>,
    /// `[B, H, S]`, or empty: what rounding `lse` to f32 lost. [`sdpa`] fills it, and
    /// [`sdpa_backward`] uses it when present to recompute the probabilities exactly with large
    /// logits; an output built from a saved `output` and `lse` may leave it empty.
    pub lse_lo: Vec<f32>,
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
                let view = broadcast_to(data, &padding_view(data.len())?, target).map_err(|e| e.in_op("sdpa"))?;
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
            precision: self.precision,
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
/// assert_eq!(result.output.len(), 2 * 3 * 4);
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
    let t = k.shape()[2];
    let mut out = vec![0.0f32; b * h * s * dv];
    let mut lse = vec![0.0f32; b * h * s];
    let mut lse_lo = vec![0.0f32; b * h * s];
    let kernel_options = options.to_kernel([b, h, s, t])?;
    attention_with_lse_lo(
        ViewMut4::contiguous(&mut out, [b, h, s, dv])?,
        ViewMut::contiguous(&mut lse, [b, h, s])?,
        ViewMut::contiguous(&mut lse_lo, [b, h, s])?,
        ForwardInputs::new(q, k, v),
        &kernel_options,
        par,
    )
    .map_err(|e| e.in_op("sdpa"))?;
    Ok(SdpaOutput {
        output: out,
        lse,
        lse_lo,
    })
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
    attention(out, lse, ForwardInputs::new(q, k, v), &kernel_options, par).map_err(|e| e.in_op("sdpa_into"))?;
    Ok(())
}

/// The gradients of [`sdpa`], each the shape of its input (row-major).
#[derive(Debug, Clone)]
pub struct SdpaGradients {
    /// `[B, H, S, D]`.
    pub dq: Vec<f32>,
    /// `[B, G, T, D]`: summed over the query heads that share each key head.
    pub dk: Vec<f32>,
    /// `[B, G, T, Dv]`: likewise.
    pub dv: Vec<f32>,
}

/// The gradients of `sum(out ∘ dout)` with respect to `q`, `k` and `v`, where `forward` is what
/// [`sdpa`] returned for these inputs and options: PyTorch's `out.backward(dout)`. FlashAttention-2's
/// algorithm (`attn_kernels::attention_backward`): no `S×T` matrix is stored, and the result is
/// bit-identical whatever the thread count. A row with nothing to attend to passes no gradient;
/// masks and ALiBi slopes get none.
///
/// ```
/// use attn_core::{sdpa, sdpa_backward, SdpaOptions};
/// use attn_core::kernels::{Par, View4};
/// let x: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32 * 0.3).sin()).collect();
/// let view = View4::contiguous(&x, [1, 2, 3, 4]).unwrap();
/// let options = SdpaOptions::default();
/// let forward = sdpa(view, view, view, &options, Par::Seq).unwrap();
/// let dout = vec![1.0f32; forward.output.len()];
/// let dout = View4::contiguous(&dout, [1, 2, 3, 4]).unwrap();
/// let grads = sdpa_backward(view, view, view, &forward, dout, &options, Par::Seq).unwrap();
/// // Each row's weights sum to 1, so the value gradients of a head add up to the sum of its
/// // `dout`: here 3 rows × 4 columns of ones, for each of the 2 heads.
/// let total: f32 = grads.dv.iter().sum();
/// assert!((total - 24.0).abs() < 1e-4, "{total}");
/// ```
pub fn sdpa_backward(
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    forward: &SdpaOutput,
    dout: View4<'_, f32>,
    options: &SdpaOptions<'_>,
    par: Par,
) -> Result<SdpaGradients> {
    let [b, h, s, _] = q.shape();
    let t = k.shape()[2];
    let dv_width = v.shape()[3];
    let out = View4::contiguous(&forward.output, [b, h, s, dv_width]).map_err(|_| {
        shape_error(
            "sdpa_backward",
            "forward.output",
            format!("[B, H, S, Dv] = {:?}", [b, h, s, dv_width]),
            &[forward.output.len()],
        )
    })?;
    let lse = View::contiguous(&forward.lse, [b, h, s]).map_err(|_| {
        shape_error(
            "sdpa_backward",
            "lse",
            format!("[B, H, S] = {:?}", [b, h, s]),
            &[forward.lse.len()],
        )
    })?;
    let lse_lo = if forward.lse_lo.is_empty() {
        None
    } else {
        Some(View::contiguous(&forward.lse_lo, [b, h, s]).map_err(|_| {
            shape_error(
                "sdpa_backward",
                "lse_lo",
                format!("[B, H, S] = {:?}, or empty", [b, h, s]),
                &[forward.lse_lo.len()],
            )
        })?)
    };
    let kernel_options = options.to_kernel([b, h, s, t])?;
    let mut dq = vec![0.0f32; q.shape().iter().product()];
    let mut dk = vec![0.0f32; k.shape().iter().product()];
    let mut dv = vec![0.0f32; v.shape().iter().product()];
    attention_backward(
        Gradients {
            dq: ViewMut4::contiguous(&mut dq, q.shape())?,
            dk: ViewMut4::contiguous(&mut dk, k.shape())?,
            dv: ViewMut4::contiguous(&mut dv, v.shape())?,
        },
        BackwardInputs {
            q,
            k,
            v,
            out,
            lse,
            lse_lo,
            dout,
        },
        &kernel_options,
        par,
    )
    .map_err(|e| e.in_op("sdpa_backward"))?;
    Ok(SdpaGradients { dq, dk, dv })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed copies: keys rounded up to blocks of 512, `D` plus `Dv` rounded up to 16,
    /// per `(b, g)`; saturating, never overflowing.
    #[test]
    fn packed_bytes_round_keys_to_blocks_and_values_to_panels() {
        let shape = SdpaShape {
            b: 2,
            h: 6,
            g: 3,
            s: 100,
            t: 513,
            d: 64,
            dv: 1,
        };
        assert_eq!(shape.packed_bytes(), 2 * 3 * 1024 * (64 + 16) * 4);
        let shape = SdpaShape {
            t: 512,
            dv: 48,
            ..shape
        };
        assert_eq!(shape.packed_bytes(), 2 * 3 * 512 * (64 + 48) * 4);
        let huge = SdpaShape {
            b: usize::MAX,
            g: usize::MAX,
            t: usize::MAX,
            ..shape
        };
        assert_eq!(huge.packed_bytes(), u128::MAX);
    }

    /// Errors the kernels find are reported under the name of the function the user called.
    #[test]
    fn kernel_errors_name_the_api_called() {
        let x = vec![0.5f32; 2 * 2 * 3 * 4];
        let view = View4::contiguous(&x, [2, 2, 3, 4]).unwrap();
        let lengths = [3]; // one length for two sequences
        let options = SdpaOptions {
            key_padding: KeyPadding::Lengths(&lengths),
            ..Default::default()
        };
        let err = sdpa(view, view, view, &options, Par::Seq).unwrap_err().to_string();
        assert!(err.starts_with("sdpa:"), "{err}");
        let mut out = vec![0.0f32; 2 * 2 * 3 * 3]; // Dv = 3, but v has 4
        let dst = ViewMut4::contiguous(&mut out, [2, 2, 3, 3]).unwrap();
        let err = sdpa_into(dst, None, view, view, view, &SdpaOptions::default(), Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("sdpa_into:") && !err.contains("flash"), "{err}");
    }

    #[test]
    fn shapes_are_checked_once_naming_the_tensor() {
        let ok = SdpaShape::check(&[2, 8, 5, 16], &[2, 2, 7, 16], &[2, 2, 7, 24]).unwrap();
        assert_eq!(
            ok,
            SdpaShape {
                b: 2,
                h: 8,
                g: 2,
                s: 5,
                t: 7,
                d: 16,
                dv: 24
            }
        );
        assert_eq!(ok.output_bytes(), 4 * (2 * 8 * 5 * 24 + 2 * 8 * 5));
        assert_eq!(ok.input_bytes(), 4 * (2 * 8 * 5 * 16 + 2 * 2 * 7 * 16 + 2 * 2 * 7 * 24));
        for (q, k, v, tensor, words) in [
            (
                vec![2, 8, 5],
                vec![2, 2, 7, 16],
                vec![2, 2, 7, 16],
                "`q`",
                "[B, H, S, D]",
            ),
            (
                vec![2, 8, 5, 16],
                vec![2, 3, 7, 16],
                vec![2, 3, 7, 16],
                "`k`",
                "does not divide",
            ),
            (
                vec![2, 8, 5, 16],
                vec![1, 2, 7, 16],
                vec![1, 2, 7, 16],
                "`k`",
                "to match `q`",
            ),
            (
                vec![2, 8, 5, 16],
                vec![2, 2, 7, 16],
                vec![2, 2, 6, 16],
                "`v`",
                "to match `k`",
            ),
            (
                vec![2, 8, 5, 0],
                vec![2, 2, 7, 0],
                vec![2, 2, 7, 4],
                "`q`",
                "at least 1",
            ),
        ] {
            let err = SdpaShape::check(&q, &k, &v).unwrap_err().to_string();
            assert!(err.contains(tensor) && err.contains(words), "{err}");
        }
        assert_eq!(f32_size_in_bytes(&[usize::MAX, usize::MAX, 4]), u128::MAX);
        #[allow(deprecated)]
        let old_name = f32_bytes(&[2, 3, 5]);
        assert_eq!(old_name, 120);
        // A zero head dim is blamed on the tensor that has it.
        for (q, v, tensor, shape) in [
            ([2, 8, 5, 0], [2, 2, 7, 4], "q", [2, 8, 5, 0]),
            ([2, 8, 5, 16], [2, 2, 7, 0], "v", [2, 2, 7, 0]),
        ] {
            let k = [2, 2, 7, q[3]];
            match SdpaShape::check(&q, &k, &v).unwrap_err() {
                AttnError::ShapeMismatch { tensor: t, got, .. } => {
                    assert_eq!((t.as_str(), &got[..]), (tensor, &shape[..]))
                }
                other => panic!("{other}"),
            }
        }
    }

    /// The builders set what they name; `to_kernel` passes it on.
    #[test]
    fn builders_set_their_option() {
        let (lengths, allowed) = ([2usize], [true, false, true]);
        let options = SdpaOptions::default()
            .causal(Causal::BottomRight)
            .key_padding(KeyPadding::Lengths(&lengths))
            .mask(ScoreMask::Bool {
                data: &allowed,
                shape: &[3],
                meaning: BoolMeaning::MayAttend,
            })
            .precision(crate::Precision::Bf16);
        assert!(matches!(options.key_padding, KeyPadding::Lengths([2])));
        assert!(matches!(options.mask, ScoreMask::Bool { shape: [3], .. }));
        let kernel = options.to_kernel([1, 2, 4, 3]).unwrap();
        assert_eq!(kernel.causal, Causal::BottomRight);
        assert_eq!(kernel.key_lengths, Some(&lengths[..]));
        assert!(matches!(kernel.mask, Mask::Allowed(view) if view.shape() == [1, 2, 4, 3]));
        assert_eq!(kernel.precision, crate::Precision::Bf16);
    }

    /// A mask whose data does not fill its own shape is bad data (named, with both counts); a
    /// whole mask that does not broadcast to the scores is a shape error naming the target.
    #[test]
    fn masks_that_do_not_fit_are_named() {
        let (bools, floats) = ([true; 10], [0.0f32; 10]);
        let mut masks = Vec::new();
        // Five elements for six; then ten for [5, 2], which does not broadcast to [.., 4, 3].
        for (shape, n) in [(&[2usize, 3][..], 5), (&[5, 2][..], 10)] {
            masks.push(ScoreMask::Bool {
                data: &bools[..n],
                shape,
                meaning: BoolMeaning::MaskedOut,
            });
            masks.push(ScoreMask::Additive {
                data: &floats[..n],
                shape,
            });
        }
        for (i, mask) in masks.into_iter().enumerate() {
            let options = SdpaOptions::default().mask(mask);
            match (i < 2, options.to_kernel([1, 1, 4, 3]).unwrap_err()) {
                (
                    true,
                    AttnError::BadTensorData {
                        name,
                        shape,
                        needed,
                        len,
                    },
                ) => {
                    assert_eq!((name.as_str(), &shape[..], needed, len), ("mask", &[2, 3][..], 6, 5));
                }
                (
                    false,
                    AttnError::ShapeMismatch {
                        tensor, expected, got, ..
                    },
                ) => {
                    assert_eq!((tensor.as_str(), &got[..]), ("mask", &[5, 2][..]));
                    assert!(expected.contains("[1, 1, 4, 3]"), "{expected}");
                }
                (_, other) => panic!("mask {i}: {other}"),
            }
        }
    }

    /// `sdpa_backward` refuses a forward result or a `dout` of the wrong size with an error
    /// naming it, and never panics.
    #[test]
    fn backward_errors_name_the_tensor() {
        let x = vec![0.25f32; 2 * 3 * 4];
        let view = View4::contiguous(&x, [1, 2, 3, 4]).unwrap();
        let options = SdpaOptions::default();
        let forward = sdpa(view, view, view, &options, Par::Seq).unwrap();
        let err = |forward: &SdpaOutput, dout: View4<'_, f32>| {
            sdpa_backward(view, view, view, forward, dout, &options, Par::Seq)
                .unwrap_err()
                .to_string()
        };
        let short = SdpaOutput {
            output: forward.output[1..].to_vec(),
            lse: forward.lse.clone(),
            lse_lo: vec![],
        };
        let message = err(&short, view);
        assert!(
            message.contains("`forward.output`") && message.contains("[1, 2, 3, 4]"),
            "{message}"
        );
        let no_lse = SdpaOutput {
            output: forward.output.clone(),
            lse: vec![],
            lse_lo: vec![],
        };
        let message = err(&no_lse, view);
        assert!(message.contains("`lse`") && message.contains("[1, 2, 3]"), "{message}");
        let dout = View4::contiguous(&x[..12], [1, 1, 3, 4]).unwrap();
        let message = err(&forward, dout);
        assert!(
            message.contains("`dout` has shape [1, 1, 3, 4], expected [1, 2, 3, 4]"),
            "{message}"
        );
    }
}
