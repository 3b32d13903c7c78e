//! The constants of attn's `exp`, shared by the scalar path (`simd.rs`) and the vector bodies
//! (`lanes.rs`), so that both evaluate the same approximation: `e^x = 2^n · e^r` with
//! `n = round(x·log2 e)` and `r = x − n·ln 2` (ln 2 split in two for an exact product), then a
//! polynomial for `e^r`. Below [`EXP_LO`] the result is 0, above [`EXP_HI`] infinity.

/// Above this, `e^x` overflows f32.
pub(crate) const EXP_HI: f32 = 88.376_26;
/// Below this, `e^x` is taken as 0 (smaller than f32's least normal).
pub(crate) const EXP_LO: f32 = -87.336_54;
/// `log2 e`.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// The high part of ln 2 (exact in a product with any `n` in range).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
/// The low part of ln 2.
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// ln 2 rounded to f32 (1.9e-9 above it), the one constant of softmax's shorter reduction
/// `r = x − n·ln 2` in one FMA (`lanes::softmax_exp`): the product is exact inside the FMA, so
/// `r` is off by `n·1.9e-9`, a relative error of `e^x` of 5.5e-8 at `x = −20` and 2.4e-7 at
/// the bottom of the range.
pub(crate) const LN2: f32 = std::f32::consts::LN_2;
/// The degree-5 polynomial for `e^r - 1` on `[-ln2/2, ln2/2]`, `r·(E1 + r·(E2 + …))`: a
/// minimax fit for relative error (9.1e-8 before f32 rounding).
pub(crate) const E1: f32 = 0.999_999_7;
/// See [`E1`].
pub(crate) const E2: f32 = 0.499_991_5;
/// See [`E1`].
pub(crate) const E3: f32 = 0.166_676_36;
/// See [`E1`].
pub(crate) const E4: f32 = 0.041_897_93;
/// See [`E1`].
pub(crate) const E5: f32 = 0.008_290_315;

/// The degree-4 polynomial for `2^f − 1` on `[−1/2, 1/2]`, `f·(P1 + f·(P2 + …))`, of the bf16
/// kernels' shorter `exp` (the fused pass 2 of AMX and `vdpbf16ps`): a fit for relative error with the constant term
/// held at exactly 1, so `e^0 = 1`; 2.9e-6 evaluated in f32, a thousandth of bf16's unit
/// roundoff (2^-8), which the probabilities are rounded to next. With `n = round(x·log2 e)`
/// and `f = x·log2 e − n` (exact), `e^x = 2^n·2^f`: no split `ln 2`, one polynomial term fewer.
pub(crate) const P1: f32 = 0.693_124_2;
/// See [`P1`].
pub(crate) const P2: f32 = 0.240_240_99;
/// See [`P1`].
pub(crate) const P3: f32 = 0.055_906_378;
/// See [`P1`].
pub(crate) const P4: f32 = 0.009_582_827;
