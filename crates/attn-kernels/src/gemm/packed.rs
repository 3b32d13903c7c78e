//! A right operand packed once for attn's own f32 GEMM ([`F32Panels`]), and the product that
//! reads it in place ([`gemm_packed`]).
//!
//! A linear map multiplies by the same `Wᵀ` on every call. Packed per call, `Wᵀ` is transposed
//! 8 × 8 into 48-column panels by every thread that takes a band of rows, from a weight that
//! has usually left L2 since the last call: in `attn embed` (MiniLM, 32 sentences a batch, about
//! 500 rows a product) that was 12% of the time on Intel. Packed once at load, the product reads
//! the panels as they are. The values are copied, never rounded, so the sums are the bits of
//! packing per call.

use super::Par;
use crate::buffer::Buffer;
use crate::{KernelError, View2, ViewMut2};
use rayon::prelude::*;

/// Columns of a panel (the own GEMM's micro-kernel width).
#[cfg(target_arch = "x86_64")]
const NR: usize = super::own::NR;
#[cfg(not(target_arch = "x86_64"))]
const NR: usize = 48;

/// A `[K, N]` right operand packed once for attn's own f32 GEMM: panels of 48 columns, each
/// `[K][48]` floats (zero past `N`), from a 64-byte boundary. For a linear map's weight
/// `W: [out, in]`, pack `Wᵀ` (a permuted view) at load and multiply with [`gemm_packed`],
/// which gives the bits of the own GEMM packing the operand per call: those of
/// [`super::gemm_bias`] on the unpacked operand wherever [`super::gemm_route`] names the own
/// GEMM or [`F32Panels::read_by`] says the panels go unread. On Zen 5 at AVX-512, where the own
/// GEMM takes only products by packed panels (faer's measured faster packing per call), the
/// two differ in the last bits. The panels hold a copy: pack again after the operand changes
/// (a stale copy would give the old product).
pub struct F32Panels {
    k: usize,
    n: usize,
    data: Buffer,
}

impl std::fmt::Debug for F32Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("F32Panels")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish()
    }
}

impl F32Panels {
    /// Whether products by a right operand of this shape (`[K, N]`) read packed panels on this
    /// machine: attn's own f32 GEMM runs on this CPU at the current level (Intel, Zen 4 or
    /// Zen 5 at AVX-512, Zen 3 at AVX2; `ATTN_GEMM` not `faer`) and takes products this wide and deep (at least 256 columns and
    /// a depth of 16; how many rows is up to each call). Elsewhere [`gemm_packed`] multiplies
    /// by the unpacked operand, so a model need not pack (and hold twice its weights) for
    /// nothing.
    pub fn worth_packing(shape: [usize; 2]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::own::serves_rhs(shape)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = shape;
            false
        }
    }

    /// Whether a product of `m` rows by a right operand `[K, N]` (`[m, k, n]`) into a
    /// row-major destination reads packed panels ([`gemm_packed`] reads them exactly then): the
    /// operand is [`F32Panels::worth_packing`] and the product has enough rows and work for
    /// attn's own GEMM (at least 48 rows and 2²⁰ multiply-adds). A caller that packs lazily asks
    /// this before it packs, so products that never read the panels (decoding's few rows) never
    /// make them.
    pub fn read_by([m, k, n]: [usize; 3]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::own_gemm_packed([n.max(1), 1], [m, n, k])
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (m, k, n);
            false
        }
    }

    /// Packs `b: [K, N]`, any strides (in parallel on the current rayon pool, panel by panel;
    /// the same floats either way).
    pub fn pack(b: View2<'_, f32>) -> Self {
        let [k, n] = b.shape();
        let panel = k * NR;
        let mut data = Buffer::zeroed(n.div_ceil(NR) * panel);
        if panel > 0 {
            let fill = |(q, out): (usize, &mut [f32])| pack_panel(out, b, q * NR);
            if data.len() >= 1 << 16 {
                data.par_chunks_exact_mut(panel).enumerate().for_each(fill);
            } else {
                data.chunks_exact_mut(panel).enumerate().for_each(fill);
            }
        }
        F32Panels { k, n, data }
    }

    /// `[K, N]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// Bytes held (the padding of a ragged last panel included).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The panels: panel `q` at `q · K · 48`, its row `p` at `p · 48`.
    #[cfg(test)]
    pub(crate) fn floats(&self) -> &[f32] {
        &self.data
    }
}

/// Panel `out` (`[K][48]`, zeros) of `b`'s columns from `j0`.
fn pack_panel(out: &mut [f32], b: View2<'_, f32>, j0: usize) {
    let [k, n] = b.shape();
    let cols = (n - j0).min(NR);
    // At a vector level that level's packing (checked there), elsewhere a plain copy (checked
    // at the scalar level).
    #[cfg(target_arch = "x86_64")]
    {
        let [rs, cs] = b.strides();
        // SAFETY: the view was bounds-checked on construction, so `[0, k) × [j0, j0 + cols)`
        // is readable at its strides; `out` holds one panel of `k` rows; each level's packing
        // runs only where the CPU has it.
        unsafe {
            let src = b.data().as_ptr().add(j0 * cs);
            match crate::simd::simd_level() {
                crate::SimdLevel::Avx512 => return super::avx512::pack_b(out, k, src, rs, cs, k, cols),
                crate::SimdLevel::Avx2Fma => return super::avx2::pack_b(out, k, src, rs, cs, k, cols),
                crate::SimdLevel::Scalar => {}
            }
        }
    }
    for (p, row) in out.chunks_exact_mut(NR).enumerate() {
        for (j, x) in row[..cols].iter_mut().enumerate() {
            *x = b.get([p, j0 + j]);
        }
    }
}

/// `dst = lhs · rhs (+ bias)` with `packed` = [`F32Panels::pack`]`(rhs)`: `lhs: [M, K]`,
/// `rhs: [K, N]`, `bias: [N]` -> `dst: [M, N]`, any strides. The bits are those of
/// [`super::gemm_bias`] (with a bias) or [`super::gemm`] (`Replace`, `alpha = 1`) on `rhs`:
/// where attn's own GEMM serves the product it reads the panels in place of packing `rhs`,
/// elsewhere (other CPUs and levels, small products, a column-major `dst`) it multiplies by
/// `rhs`. `packed` must hold `rhs`'s current values; only its shape is checked.
///
/// ```
/// use attn_kernels::{gemm_packed, F32Panels, Par, View2, ViewMut2};
/// let x = [1.0, 2.0, 3.0, 4.0f32]; // [[1, 2], [3, 4]]
/// let w = [1.0, 0.0, 1.0, 1.0f32]; // W: [out 2, in 2]; the product is x·Wᵀ
/// let w_t = View2::contiguous(&w, [2, 2]).unwrap().permuted([1, 0]).unwrap();
/// let packed = F32Panels::pack(w_t);
/// let mut y = [0.0f32; 4];
/// let dst = ViewMut2::contiguous(&mut y, [2, 2]).unwrap();
/// let x = View2::contiguous(&x, [2, 2]).unwrap();
/// gemm_packed(dst, x, w_t, &packed, Some(&[10.0, 20.0]), Par::Seq).unwrap();
/// assert_eq!(y, [11.0, 23.0, 13.0, 27.0]);
/// ```
pub fn gemm_packed(
    mut dst: ViewMut2<'_, f32>,
    lhs: View2<'_, f32>,
    rhs: View2<'_, f32>,
    packed: &F32Panels,
    bias: Option<&[f32]>,
    par: Par,
) -> Result<(), KernelError> {
    let [m, n, k] = super::check_shapes("gemm_packed", &dst, &lhs, &rhs)?;
    if packed.shape() != [k, n] {
        return Err(KernelError::shape(
            "gemm_packed",
            "packed",
            vec![k, n],
            packed.shape().to_vec(),
        ));
    }
    if let Some(bias) = bias {
        crate::error::check_len("gemm_packed", "bias", n, bias.len())?;
    }
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && super::own_gemm_packed(dst.strides(), [m, n, k]) {
        use super::own::{Operand, Rhs, Start};
        let [rs, cs] = lhs.strides();
        let a = Operand {
            ptr: lhs.data().as_ptr(),
            rs,
            cs,
        };
        let start = bias.map_or(Start::Zero, |b| Start::Bias(b.as_ptr()));
        let b = Rhs::Packed {
            ptr: packed.data.as_ptr(),
            k,
        };
        let (ldc, c) = (dst.strides()[0], dst.data_mut().as_mut_ptr());
        // SAFETY: `own_gemm` checked for a vector level; the views were bounds-checked on
        // construction, the panels hold `⌈n / 48⌉` panels of `k` rows, a bias `n` values, and
        // `dst` is borrowed mutably, so it aliases nothing.
        unsafe { super::own_f32(c, ldc, [m, n, k], start, a, b, 1.0, par) };
        return Ok(());
    }
    match bias {
        Some(bias) => super::gemm_bias(dst, lhs, rhs, bias, par),
        None => super::gemm(dst, super::Accum::Replace, lhs, rhs, 1.0, par),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;
    use crate::{gemm, gemm_bias, Accum};

    /// `[rows, cols]` views of `data` in the three layouts a caller passes.
    fn views(data: &[f32], rows: usize, cols: usize) -> [View2<'_, f32>; 3] {
        [
            View2::new(&data[..rows * cols], [rows, cols], [cols, 1]).unwrap(),
            View2::new(&data[..rows * cols], [rows, cols], [1, rows]).unwrap(),
            View2::new(data, [rows, cols], [cols * 3, 2]).unwrap(),
        ]
    }

    #[test]
    fn packing_puts_each_value_in_its_panel_and_zeros_past_the_columns() {
        for (k, n) in [(1, 1), (7, 48), (33, 50), (384, 97), (5, 0), (0, 5)] {
            let data = random_vec(k * n * 6, 1);
            for b in views(&data, k, n) {
                let packed = F32Panels::pack(b);
                assert_eq!(packed.shape(), [k, n]);
                let floats = packed.floats();
                assert_eq!(floats.len(), n.div_ceil(NR) * k * NR);
                assert_eq!(packed.size_in_bytes(), floats.len() * 4, "{k}x{n}");
                for (i, &x) in floats.iter().enumerate() {
                    let (q, p, j) = (i / (k * NR), i / NR % k.max(1), i % NR);
                    let want = if q * NR + j < n { b.get([p, q * NR + j]) } else { 0.0 };
                    assert_eq!(x.to_bits(), want.to_bits(), "{k}x{n} {:?}: float {i}", b.strides());
                }
            }
        }
    }

    /// `dst = lhs · rhs (+ bias)` by the own GEMM packing `rhs` itself (whichever GEMM `gemm`
    /// would take).
    #[cfg(target_arch = "x86_64")]
    fn own_per_call(dst: &mut [f32], lhs: View2<'_, f32>, rhs: View2<'_, f32>, bias: Option<&[f32]>) {
        use crate::gemm::own::{Operand, Rhs, Start};
        let ([m, k], n) = (lhs.shape(), rhs.shape()[1]);
        assert_eq!(dst.len(), m * n);
        let operand = |v: View2<'_, f32>| {
            let [rs, cs] = v.strides();
            Operand {
                ptr: v.data().as_ptr(),
                rs,
                cs,
            }
        };
        let start = bias.map_or(Start::Zero, |b| Start::Bias(b.as_ptr()));
        // SAFETY: the callers ask only where the own GEMM reads panels (a vector level); the
        // views were bounds-checked, `dst` is `[m, n]` row-major and a bias holds `n` values.
        unsafe {
            crate::gemm::own_f32(
                dst.as_mut_ptr(),
                n,
                [m, n, k],
                start,
                operand(lhs),
                Rhs::F32(operand(rhs)),
                1.0,
                Par::Rayon,
            )
        };
    }

    /// Products through the panels have the bits of the unpacked operand's: where the own GEMM
    /// reads the panels, of the own GEMM packing the operand itself (which `gemm_bias` and
    /// `gemm` are wherever `gemm_route` names the own GEMM: packing once changes no bit);
    /// elsewhere of `gemm_bias` and `gemm`. On shapes below and above the own GEMM's floor
    /// (several depth blocks, column blocks and a ragged panel), on 1 and 2 threads (bands by
    /// rows and by columns).
    #[test]
    fn products_through_panels_have_the_bits_of_the_unpacked_operand() {
        for (m, n, k) in [(5, 7, 3), (100, 300, 70), (60, 530, 800), (50, 1500, 40)] {
            let (a, w, bias) = (random_vec(m * k, 1), random_vec(k * n, 2), random_vec(n, 3));
            let lhs = View2::contiguous(&a[..], [m, k]).unwrap();
            let w_t = View2::contiguous(&w[..], [n, k]).unwrap().permuted([1, 0]).unwrap();
            let packed = F32Panels::pack(w_t);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    for bias in [Some(&bias[..]), None] {
                        let mut want = vec![f32::NAN; m * n];
                        let reads = F32Panels::read_by([m, k, n]);
                        // A product the own GEMM takes per call, it takes by panels too.
                        assert!(reads || crate::gemm_route([m, n, k]) == "faer", "{m}x{n}x{k}");
                        #[cfg(target_arch = "x86_64")]
                        if reads {
                            own_per_call(&mut want, lhs, w_t, bias);
                        }
                        if !reads {
                            let dst = ViewMut2::contiguous(&mut want[..], [m, n]).unwrap();
                            match bias {
                                Some(bias) => gemm_bias(dst, lhs, w_t, bias, Par::Rayon).unwrap(),
                                None => gemm(dst, Accum::Replace, lhs, w_t, 1.0, Par::Rayon).unwrap(),
                            }
                        }
                        let mut got = vec![f32::NAN; m * n];
                        let dst = ViewMut2::contiguous(&mut got[..], [m, n]).unwrap();
                        gemm_packed(dst, lhs, w_t, &packed, bias, Par::Rayon).unwrap();
                        let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{m}x{n}x{k}, {threads} threads, bias {}", bias.is_some());
                    }
                });
            }
        }
    }

    #[test]
    fn a_packing_of_another_shape_is_a_typed_error() {
        let (x, w) = ([0.0f32; 6], [0.0f32; 12]);
        let mut y = [0.0f32; 8];
        let packed = F32Panels::pack(View2::contiguous(&w[..], [4, 3]).unwrap());
        let err = gemm_packed(
            ViewMut2::contiguous(&mut y[..], [2, 4]).unwrap(),
            View2::contiguous(&x[..], [2, 3]).unwrap(),
            View2::contiguous(&w[..], [3, 4]).unwrap(),
            &packed,
            None,
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(err, KernelError::shape("gemm_packed", "packed", vec![3, 4], vec![4, 3]));
        let packed = F32Panels::pack(View2::contiguous(&w[..], [3, 4]).unwrap());
        let err = gemm_packed(
            ViewMut2::contiguous(&mut y[..], [2, 4]).unwrap(),
            View2::contiguous(&x[..], [2, 3]).unwrap(),
            View2::contiguous(&w[..], [3, 4]).unwrap(),
            &packed,
            Some(&[0.0; 3]),
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(err, KernelError::shape("gemm_packed", "bias", vec![4], vec![3]));
    }
}
