//! attn-kernels: the numerical kernels of attn, on rows, columns and strides.
//!
//! ```
//! use attn_kernels::prelude::*;
//! let (b, h, s, d) = (1, 2, 4, 8);
//! let x: Vec<f32> = (0..b * h * s * d).map(|i| (i as f32 * 0.1).sin()).collect();
//! let mut out = vec![0.0f32; x.len()];
//! let qkv = View4::contiguous(&x, [b, h, s, d]).unwrap(); // any strides work
//! let options = AttentionOptions { causal: Causal::TopLeft, ..Default::default() };
//! let dst = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
//! attention(dst, None, ForwardInputs::new(qkv, qkv, qkv), &options, Par::Rayon).unwrap();
//! assert_eq!(&out[..d], &x[..d]); // causal: the first query sees only the first key
//! ```
//!
//! Legend used in every doc comment: `B` batch, `H` query heads, `G` key/value heads, `S` query
//! length, `T` key length, `D` head dim (`Dv` for values), `E` model dim.
//!
//! - [`gemm`]: f32 GEMM on strided views (attn's own packed GEMM where it measured faster:
//!   Intel and Zen 4 at AVX-512, Zen 3 at AVX2; faer's matmul elsewhere), parallelism passed
//!   explicitly; [`gemm_bias`] with a bias row.
//! - [`masked_softmax`]: scale, mask and a stable softmax over rows in one pass.
//! - [`attention`]: the entry callers use; it runs the path [`chosen_path`] names (today
//!   [`flash_attention`] at every level and shape; [`attention_unfused`] stays for comparison).
//! - [`flash_attention`]: tiled attention with an online softmax, never forming `S×T`.
//! - [`attention_unfused`]: the textbook path, for comparison.
//! - [`attention_with_weights`]: [`attention`] that also writes the softmax weights (per head
//!   or averaged, as `nn.MultiheadAttention` returns them), from the scores the call's path
//!   computed where it can; [`attention_weights`] recomputes them from a call's LSE.
//! - [`norm_rows`], [`add_norm_rows`], [`bias_activation`], [`bias_activation_from`]: the row
//!   and pointwise kernels of the layers around attention (norms with the residual add fused,
//!   bias with activation, in place or from another buffer).
//! - [`attention_backward`]: the gradients of attention (FlashAttention-2's algorithm,
//!   deterministic), with [`attention_backward_reference`] in f64.
//! - [`linear_backward`], [`norm_backward`], [`activation_backward`], [`embedding_backward`],
//!   [`cross_entropy`], [`dropout`]: the rest of a training step's kernels (`grad.rs`).
//! - [`attention_reference`], [`gemm_reference`]: naive f64 definitions the tests compare with.
//!
//! This crate knows nothing about heads as learned projections, layers or files: it sees
//! strided views and returns typed [`KernelError`]s. SIMD is chosen at run time
//! ([`simd_level`]).
//!
//! # Non-finite inputs
//! Key `t` is *visible* to query row `(b, h, s)` unless a boolean mask, an additive `-inf`, the
//! causal limit or the key length hides it (a score of `-inf` from overflow removes it too).
//! Every attention path keeps to one policy:
//! - a row with no visible key is zeros, with `lse = -inf`;
//! - a NaN in the row's query, in a visible key, or a visible score of `+inf` or NaN makes the
//!   whole row NaN (weights: NaN on the visible keys, 0 on the others);
//! - a NaN or `±inf` in a visible value `v[b, g, t, c]` makes `out[.., c]` non-finite, nothing
//!   more;
//! - nothing in a key or value that a row cannot see reaches that row, not even through
//!   `0·NaN` in `p·v` (where PyTorch's math path spreads it).
//!
//! All other outputs are bit-identical to the call with the non-finite inputs zeroed. The
//! value side costs clean inputs one finiteness test per output element: a row that comes out
//! non-finite from a finite softmax is recomputed with the offending values zeroed, and the
//! visible ones added back. A call that needs this runs twice and allocates a copy of `v` and
//! of `out` for the second run.

pub mod arena;
mod backward;
mod bf16;
mod bf16_grad;
mod buffer;
mod error;
mod exp_poly;
mod f64_lanes;
mod flash;
mod gemm;
mod grad;
mod lanes;
mod layer;
mod mask;
mod nonfinite;
mod path;
mod reference;
mod scores;
mod simd;
mod softmax;
mod tile;
mod view;
mod weights;

/// Not public API: deterministic test data and tolerance checks, shared by the unit tests,
/// the integration tests and the examples.
pub mod prelude;
pub mod rng;
#[doc(hidden)]
pub mod testing;

pub use backward::{
    attention_backward, attention_backward_fused, attention_backward_path, backward_path, BackwardInputs, BackwardPath,
    FusedGradients, Gradients,
};
pub use bf16::{
    bf16_to_f32, f32_to_bf16, gemm_bf16, gemm_bf16_bias, gemm_bf16_route, round_to_bf16, Bf16Panels, Precision,
};
pub use bf16_grad::linear_backward_bf16;
pub use error::KernelError;
pub use flash::{attention_bf16_kv, flash_attention, BF16_BLOCK_KEYS, BLOCK_KEYS, BLOCK_ROWS, DECODE_ROWS, MIN_TASKS};
pub use gemm::{
    gemm, gemm_bias, gemm_packed, gemm_reference, gemm_route, requested_gemm, Accum, F32Panels, GemmChoice, Par,
};
pub use grad::{
    activation_backward, activation_backward_in_place, adamw_update, cross_entropy, cross_entropy_part, dropout,
    dropout_uniform, embedding, embedding_backward, linear_backward, norm_backward, relu_dropout_backward,
    sum_of_squares, AdamWStep, CrossEntropy, LinearShape,
};
pub use layer::{
    add_assign, add_norm_rows, add_then_norm_rows, bias_activation, bias_activation_from, erf, norm_rows, Activation,
    NormKind, NormParams,
};
pub use mask::{broadcast_to, AttentionOptions, Causal, Mask};
pub use path::{attention, attention_with_lse_lo, attention_with_weights, chosen_path, KernelPath};
pub use reference::{attention_backward_reference, attention_reference, ReferenceAttention, ReferenceGradients};
pub use simd::{
    bf16_level, exp_scalar, exp_slice, requested_simd_level, simd_level, Bf16Level, SimdLevel, SIMD_LEVEL_NAMES,
};
pub use softmax::{attention_unfused, attention_weights, masked_softmax, unfused_scratch_bytes};
pub use view::{contiguous_strides, ForwardInputs, View, View2, View4, ViewMut, ViewMut2, ViewMut4};
pub use weights::WeightsDst;

/// Not public API: times the tile micro-kernels for kernel development (`examples/`), `a`'s
/// rows `lda ≥ depth` floats apart.
#[doc(hidden)]
pub fn __tile_gemm_min_seconds(rows: usize, n: usize, depth: usize, lda: usize, reps: usize) -> f64 {
    assert!(lda >= depth, "lda = {lda} < depth = {depth}");
    let a = vec![0.5f32; rows * lda];
    let b = vec![0.25f32; depth * n];
    let mut c = vec![0.0f32; rows * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            #[cfg(target_arch = "x86_64")]
            if simd_level().is_vector() {
                assert_eq!(n % 16, 0, "n must be a multiple of 16");
                // SAFETY: AVX2+FMA are present; the buffers have exactly these shapes, and `n` is
                // a multiple of the kernel width.
                unsafe {
                    tile::gemm::<true, false>(
                        rows,
                        n,
                        depth,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        n,
                        tile::NR,
                        c.as_mut_ptr(),
                        n,
                    )
                };
            }
        }
        best = best.min(t0.elapsed().as_secs_f64() / 100.0);
    }
    std::hint::black_box(&c);
    best
}

/// Not public API: the row exp for kernel development (`examples/`).
#[doc(hidden)]
pub fn __exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    simd::exp_sub_sum(row, m)
}
