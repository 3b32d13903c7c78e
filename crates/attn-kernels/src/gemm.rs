//! GEMM on strided f32 views, and its f64 reference.
//!
//! Products big enough to pay for packing (at least 48 rows, 256 columns and 2²⁰ multiply-adds)
//! into a row-major destination run on attn's own packed GEMM ([`own`]) where it measured the
//! faster: on an Intel CPU or AMD's Zen 4 at the AVX-512 level ([`avx512`]: 8 × 48
//! micro-kernel), 0.91–0.96× MKL's on the layer shapes at one thread on an Intel model 207, and
//! on Zen 4 0.95–0.99× faer's when it packs both operands but 1.08–1.13× on products by a
//! weight packed once; on AMD's Zen 3 at AVX2 ([`avx2`]: 6 × 16), 0.94–1.00× MKL's on the layer
//! shapes at 2 threads and 1.01–1.17× faer's on the encoder layer (docs/PERFORMANCE.md). Everything
//! else (other CPUs, among them Zen 5, where faer measured faster than an earlier version, and
//! Intel at AVX2, not measured; the scalar level; small or thin products; column-major
//! destinations) goes to faer's `matmul`, whose views are made without copying.
//! `ATTN_GEMM=faer` sends every product to faer, and `ATTN_GEMM=own` the products it serves to
//! the own GEMM on any CPU at a vector level, for comparison
//! ([`requested_gemm`]). Either way every element is summed in an order that does not depend on the
//! thread count. A right operand used on every call (a linear map's `Wᵀ`) can be packed once
//! into [`F32Panels`] and multiplied with [`gemm_packed`], which the own GEMM reads in place.

use crate::{KernelError, View2, ViewMut2};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod own;
mod packed;

pub use packed::{gemm_packed, F32Panels};

/// A GEMM named by the environment variable `ATTN_GEMM` (see [`requested_gemm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmChoice {
    /// `faer`: every f32 product goes to faer's `matmul`.
    Faer,
    /// `own`: attn's own packed GEMM takes the products it serves (at the AVX-512 or AVX2
    /// level, shapes as where it is the default) on any CPU, for comparison.
    Own,
}

/// The GEMM the environment variable `ATTN_GEMM` names (read once): `Ok(None)` when it is unset
/// or empty (the default: attn's own GEMM on Intel and Zen 4 at AVX-512 and on Zen 3 at AVX2,
/// faer's elsewhere), an
/// [`KernelError::InvalidArgument`] naming the accepted values when it names neither `faer` nor
/// `own` (the kernels then keep the default; the `attn` command refuses to start).
pub fn requested_gemm() -> Result<Option<GemmChoice>, KernelError> {
    static CHOICE: std::sync::OnceLock<Result<Option<GemmChoice>, KernelError>> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| parse_gemm(std::env::var("ATTN_GEMM"))).clone()
}

fn parse_gemm(var: Result<String, std::env::VarError>) -> Result<Option<GemmChoice>, KernelError> {
    crate::simd::env_choice(("gemm", "ATTN_GEMM", "faer or own"), var, |text| match text {
        "faer" => Some(GemmChoice::Faer),
        "own" => Some(GemmChoice::Own),
        _ => None,
    })
}

/// How much parallelism an operation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// On the calling thread only.
    Seq,
    /// On every thread of the current rayon pool (run inside `ThreadPool::install` to choose it).
    Rayon,
}

impl Par {
    /// The threads a call with this `Par` runs on: 1, or the current rayon pool's.
    pub(crate) fn threads(self) -> usize {
        match self {
            Par::Seq => 1,
            Par::Rayon => rayon::current_num_threads(),
        }
    }

    /// Runs `task(i)` for every `i < tasks`: in order on the calling thread (`Seq`), or on the
    /// current rayon pool as one job per task (`Rayon`), so that a thread that runs out of work
    /// can take single tasks from the others. Rayon's default splitting stops once a range is
    /// split about `threads` ways (unless stolen) and runs each part as one sequential job; the
    /// thread that finishes first then waits on the other's part, which on calls of a few
    /// hundred microseconds cost up to a tenth of a call (docs/PERFORMANCE.md). For tasks of a
    /// few microseconds or more: each is one rayon job.
    pub(crate) fn for_each_task(self, tasks: usize, task: impl Fn(usize) + Sync + Send) {
        use rayon::prelude::*;
        match self {
            Par::Seq => (0..tasks).for_each(task),
            Par::Rayon => (0..tasks).into_par_iter().with_max_len(1).for_each(task),
        }
    }

    pub(crate) fn to_faer(self) -> faer::Par {
        match self {
            Par::Seq => faer::Par::Seq,
            Par::Rayon => faer::Par::rayon(0),
        }
    }
}

/// Whether a GEMM overwrites its destination or adds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accum {
    /// `dst = alpha · lhs · rhs`.
    Replace,
    /// `dst += alpha · lhs · rhs`.
    Add,
}

/// `dst = alpha · lhs · rhs` (or `+=`, by `accum`): `lhs: [M, K]`, `rhs: [K, N]` -> `dst: [M, N]`.
///
/// Any strides work, including transposed views. faer allocates nothing here; attn's own GEMM
/// packs into buffers each thread keeps between calls.
///
/// ```
/// use attn_kernels::{gemm, Accum, Par, View2, ViewMut2};
/// let a = [1.0, 2.0, 3.0, 4.0f32]; // [[1, 2], [3, 4]]
/// let b = [1.0, 0.0, 0.0, 1.0f32];
/// let mut c = [0.0f32; 4];
/// gemm(
///     ViewMut2::contiguous(&mut c, [2, 2]).unwrap(),
///     Accum::Replace,
///     View2::contiguous(&a, [2, 2]).unwrap(),
///     View2::contiguous(&b, [2, 2]).unwrap(),
///     2.0,
///     Par::Seq,
/// )
/// .unwrap();
/// assert_eq!(c, [2.0, 4.0, 6.0, 8.0]);
/// ```
pub fn gemm(
    dst: ViewMut2<'_, f32>,
    accum: Accum,
    lhs: View2<'_, f32>,
    rhs: View2<'_, f32>,
    alpha: f32,
    par: Par,
) -> Result<(), KernelError> {
    let [m, n, k] = check_shapes("gemm", &dst, &lhs, &rhs)?;
    let mut dst = dst;
    let [dst_rs, dst_cs] = dst.strides();
    let dst_ptr = dst.data_mut().as_mut_ptr();
    // SAFETY: the views were bounds-checked on construction and `dst` does not overlap itself;
    // `dst` is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm_raw(
            dst_ptr,
            [dst_rs, dst_cs],
            [m, n, k],
            accum,
            lhs.data().as_ptr(),
            lhs.strides(),
            rhs.data().as_ptr(),
            rhs.strides(),
            alpha,
            par,
        )
    };
    Ok(())
}

/// `dst = lhs · rhs + bias`, the row `bias` (`[N]`) added to every row: `lhs: [M, K]`,
/// `rhs: [K, N]` -> `dst: [M, N]`, any strides. The bits are those of writing `bias` into every
/// row of `dst` and calling [`gemm`] with [`Accum::Add`] and `alpha = 1`; where attn's own GEMM
/// serves the product the bias is added as each block of `dst` is stored, so `dst` is written
/// once and never read.
///
/// ```
/// use attn_kernels::{gemm_bias, Par, View2, ViewMut2};
/// let a = [1.0, 2.0, 3.0, 4.0f32]; // [[1, 2], [3, 4]]
/// let b = [1.0, 0.0, 0.0, 1.0f32];
/// let mut c = [f32::NAN; 4]; // never read
/// gemm_bias(
///     ViewMut2::contiguous(&mut c, [2, 2]).unwrap(),
///     View2::contiguous(&a, [2, 2]).unwrap(),
///     View2::contiguous(&b, [2, 2]).unwrap(),
///     &[10.0, 20.0],
///     Par::Seq,
/// )
/// .unwrap();
/// assert_eq!(c, [11.0, 22.0, 13.0, 24.0]);
/// ```
pub fn gemm_bias(
    mut dst: ViewMut2<'_, f32>,
    lhs: View2<'_, f32>,
    rhs: View2<'_, f32>,
    bias: &[f32],
    par: Par,
) -> Result<(), KernelError> {
    let [m, n, k] = check_shapes("gemm_bias", &dst, &lhs, &rhs)?;
    crate::error::check_len("gemm_bias", "bias", n, bias.len())?;
    #[cfg(target_arch = "x86_64")]
    if own_gemm(dst.strides(), [m, n, k]) {
        let operand = |v: &View2<'_, f32>| {
            let [rs, cs] = v.strides();
            own::Operand {
                ptr: v.data().as_ptr(),
                rs,
                cs,
            }
        };
        let (ldc, c) = (dst.strides()[0], dst.data_mut().as_mut_ptr());
        let start = own::Start::Bias(bias.as_ptr());
        // SAFETY: `own_gemm` checked for a vector level; the views were bounds-checked on construction, `bias`
        // holds `n` values and `dst` is borrowed mutably, so it aliases nothing.
        unsafe {
            own_f32(
                c,
                ldc,
                [m, n, k],
                start,
                operand(&lhs),
                own::Rhs::F32(operand(&rhs)),
                1.0,
                par,
            )
        };
        return Ok(());
    }
    let [rs, cs] = dst.strides();
    let data = dst.data_mut();
    for i in 0..m {
        if cs == 1 {
            data[i * rs..i * rs + n].copy_from_slice(bias);
        } else {
            bias.iter().enumerate().for_each(|(j, &b)| data[i * rs + j * cs] = b);
        }
    }
    gemm(dst, Accum::Add, lhs, rhs, 1.0, par)
}

/// `[M, N, K]` of a product, or the typed error naming the operand whose shape does not fit.
fn check_shapes(
    op: &'static str,
    dst: &ViewMut2<'_, f32>,
    lhs: &View2<'_, f32>,
    rhs: &View2<'_, f32>,
) -> Result<[usize; 3], KernelError> {
    let [m, n] = dst.shape();
    let [lm, k] = lhs.shape();
    if lm != m {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "lhs",
            expected: vec![m, k],
            got: vec![lm, k],
        });
    }
    if rhs.shape() != [k, n] {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "rhs",
            expected: vec![k, n],
            got: rhs.shape().to_vec(),
        });
    }
    Ok([m, n, k])
}

/// The GEMM a product `[m, k] · [k, n]` into a row-major destination runs on at this level:
/// `"own"` (attn's packed GEMM) or `"faer"` (for `attn check` and the benchmarks' reports).
/// A product by panels packed once ([`gemm_packed`]) may go elsewhere: [`F32Panels::read_by`]
/// says whether it runs on the own GEMM (on Zen 5 only those do).
pub fn gemm_route([m, n, k]: [usize; 3]) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if own_gemm([n.max(1), 1], [m, n, k]) {
        return "own";
    }
    let _ = (m, n, k);
    "faer"
}

/// Whether attn's own GEMM serves a product into a destination with these strides: a
/// row-major destination, and a shape worth packing on this CPU at the running level
/// ([`own::worth_it`]), its right operand packed by the call.
#[cfg(target_arch = "x86_64")]
fn own_gemm(dst_strides: [usize; 2], mnk: [usize; 3]) -> bool {
    dst_strides[1] == 1 && own::worth_it(mnk, own::Packing::PerCall)
}

/// [`own_gemm`] for a product by a right operand packed once ([`F32Panels`]).
#[cfg(target_arch = "x86_64")]
fn own_gemm_packed(dst_strides: [usize; 2], mnk: [usize; 3]) -> bool {
    dst_strides[1] == 1 && own::worth_it(mnk, own::Packing::Once)
}

#[cfg(target_arch = "x86_64")]
/// [`own::gemm`] of f32 operands ([`Rhs::F32`] or [`Rhs::Packed`]) at the running level: AVX-512's
/// 8 × 48 kernel or AVX2's 6 × 16.
///
/// # Safety
/// As for [`own::gemm`]; the running level is a vector level and `b` is `F32` or `Packed`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn own_f32(
    c: *mut f32,
    ldc: usize,
    mnk: [usize; 3],
    start: own::Start,
    a: own::Operand,
    b: own::Rhs,
    alpha: f32,
    par: Par,
) {
    let a = (a, own::LhsValues::F32);
    // SAFETY: the caller's contract; each level is taken only where the CPU has it.
    unsafe {
        match crate::simd::simd_level() {
            crate::SimdLevel::Avx512 => own::gemm::<avx512::Avx512>(c, ldc, mnk, start, a, b, alpha, par),
            _ => own::gemm::<avx2::Avx2>(c, ldc, mnk, start, a, b, alpha, par),
        }
    }
}

/// The unchecked core of [`gemm`], for kernels that have validated their operands already.
///
/// # Safety
/// `dst` must be valid for writes of an `[m, n]` view with `dst_strides` that does not overlap
/// itself nor the operands; `lhs` (`[m, k]`) and `rhs` (`[k, n]`) must be valid for reads with
/// their strides.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm_raw(
    dst: *mut f32,
    dst_strides: [usize; 2],
    [m, n, k]: [usize; 3],
    accum: Accum,
    lhs: *const f32,
    lhs_strides: [usize; 2],
    rhs: *const f32,
    rhs_strides: [usize; 2],
    alpha: f32,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if own_gemm(dst_strides, [m, n, k]) {
        let operand = |ptr, [rs, cs]: [usize; 2]| own::Operand { ptr, rs, cs };
        // SAFETY: `own_gemm` checked for a vector level; the caller guarantees the views.
        unsafe {
            own_f32(
                dst,
                dst_strides[0],
                [m, n, k],
                match accum {
                    Accum::Replace => own::Start::Zero,
                    Accum::Add => own::Start::Dst,
                },
                operand(lhs, lhs_strides),
                own::Rhs::F32(operand(rhs, rhs_strides)),
                alpha,
                par,
            )
        };
        return;
    }
    // SAFETY: the caller guarantees the three views are in bounds and that `dst` is exclusive.
    let (dst, lhs, rhs) = unsafe {
        (
            faer::MatMut::<f32>::from_raw_parts_mut(dst, m, n, dst_strides[0] as isize, dst_strides[1] as isize),
            faer::MatRef::<f32>::from_raw_parts(lhs, m, k, lhs_strides[0] as isize, lhs_strides[1] as isize),
            faer::MatRef::<f32>::from_raw_parts(rhs, k, n, rhs_strides[0] as isize, rhs_strides[1] as isize),
        )
    };
    let beta = match accum {
        Accum::Replace => faer::Accum::Replace,
        Accum::Add => faer::Accum::Add,
    };
    faer::linalg::matmul::matmul(dst, beta, lhs, rhs, alpha, par.to_faer());
}

/// f64 reference of [`gemm`]: `dst = alpha · lhs · rhs (+ dst)`, accumulated in f64 in the
/// obvious order. `lhs: [M, K]`, `rhs: [K, N]`, `dst: [M, N]` row-major.
pub fn gemm_reference(dst: &mut [f64], accum: Accum, lhs: View2<'_, f32>, rhs: View2<'_, f32>, alpha: f64) {
    let [m, k] = lhs.shape();
    let n = rhs.shape()[1];
    assert_eq!(dst.len(), m * n, "gemm_reference: dst must be [M, N]");
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += lhs.get([i, p]) as f64 * rhs.get([p, j]) as f64;
            }
            let prev = if accum == Accum::Add { dst[i * n + j] } else { 0.0 };
            dst[i * n + j] = prev + alpha * acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    /// `for_each_task` runs every task once, on one thread or on every thread of the pool.
    #[test]
    fn for_each_task_runs_every_task_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for par in [Par::Seq, Par::Rayon] {
                for tasks in [0, 1, 2, 7, 96] {
                    let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                    pool.install(|| {
                        par.for_each_task(tasks, |i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                        })
                    });
                    let counts: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                    assert_eq!(counts, vec![1; tasks], "{par:?}, {threads} threads, {tasks} tasks");
                }
            }
        }
    }

    /// `ATTN_GEMM` names `faer`, `own` or nothing; anything else is an error naming the value
    /// and the accepted ones.
    #[test]
    fn attn_gemm_names_faer_own_or_nothing() {
        use std::env::VarError;
        assert_eq!(parse_gemm(Err(VarError::NotPresent)), Ok(None));
        assert_eq!(parse_gemm(Ok(String::new())), Ok(None));
        assert_eq!(parse_gemm(Ok("faer".into())), Ok(Some(GemmChoice::Faer)));
        assert_eq!(parse_gemm(Ok("own".into())), Ok(Some(GemmChoice::Own)));
        for bad in ["Faer", "mkl", " own"] {
            let e = parse_gemm(Ok(bad.into())).unwrap_err().to_string();
            assert!(
                e.contains("ATTN_GEMM") && e.contains(&format!("{bad:?}")) && e.contains("faer or own"),
                "{e}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let raw = std::ffi::OsString::from_vec(vec![0x66, 0xff]);
            let e = parse_gemm(Err(VarError::NotUnicode(raw))).unwrap_err().to_string();
            assert!(e.contains("ATTN_GEMM") && e.contains("\\xFF"), "{e}");
        }
    }

    fn check(m: usize, n: usize, k: usize, transposed: bool, accum: Accum, par: Par) {
        let a = random_vec(m * k, 1);
        let b = random_vec(k * n, 2);
        let lhs = if transposed {
            View2::contiguous(&a[..], [k, m]).unwrap().permuted([1, 0]).unwrap()
        } else {
            View2::contiguous(&a[..], [m, k]).unwrap()
        };
        let rhs = View2::contiguous(&b[..], [k, n]).unwrap();
        let init = random_vec(m * n, 3);
        let mut c = init.clone();
        // A column-major destination, to exercise destination strides too.
        let dst = ViewMut2::new(&mut c[..], [m, n], [1, m.max(1)]).unwrap();
        gemm(dst, accum, lhs, rhs, 0.5, par).unwrap();
        let mut want: Vec<f64> = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = init[j * m + i] as f64;
            }
        }
        gemm_reference(&mut want, accum, lhs, rhs, 0.5);
        let got: Vec<f32> = (0..m * n).map(|idx| c[(idx % n) * m + idx / n]).collect();
        // Measured 5.3e-7 (relative to 1 + |want|, sums of up to 300 products); the bound is
        // about 10x.
        assert_close(&got, &want, 5e-6, 5e-6, &format!("gemm {m}x{n}x{k} t={transposed}"));
    }

    #[test]
    fn gemm_matches_reference() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (15, 16, 17),
            (64, 65, 63),
            (3, 130, 9),
            (100, 1, 70),
            (0, 4, 3),
            (4, 4, 0),
        ] {
            for transposed in [false, true] {
                check(m, n, k, transposed, Accum::Replace, Par::Seq);
                check(m, n, k, transposed, Accum::Add, Par::Rayon);
            }
        }
    }

    #[test]
    fn gemm_bias_is_the_bias_written_first_then_gemm_add() {
        // A small product (faer's path everywhere) and large ones (attn's own GEMM where it is
        // the default; faer's elsewhere): the same bits as the two steps on every path, and the
        // destination (NaN) never read.
        for (m, n, k) in [(5, 7, 3), (100, 300, 70), (60, 530, 400)] {
            let (a, b, bias) = (random_vec(m * k, 1), random_vec(k * n, 2), random_vec(n, 3));
            let lhs = View2::contiguous(&a[..], [m, k]).unwrap();
            let rhs_t = View2::contiguous(&b[..], [n, k]).unwrap().permuted([1, 0]).unwrap();
            let mut two_steps: Vec<f32> = (0..m * n).map(|i| bias[i % n]).collect();
            let dst = ViewMut2::contiguous(&mut two_steps[..], [m, n]).unwrap();
            gemm(dst, Accum::Add, lhs, rhs_t, 1.0, Par::Rayon).unwrap();
            let mut fused = vec![f32::NAN; m * n];
            let dst = ViewMut2::contiguous(&mut fused[..], [m, n]).unwrap();
            gemm_bias(dst, lhs, rhs_t, &bias, Par::Rayon).unwrap();
            let same = fused.iter().zip(&two_steps).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{m}x{n}x{k}: gemm_bias differs from bias + gemm Add");
            let mut want: Vec<f64> = (0..m * n).map(|i| bias[i % n] as f64).collect();
            gemm_reference(&mut want, Accum::Add, lhs, rhs_t, 1.0);
            // Measured at most 5.8e-6 (400 products); the bound is about 10x.
            assert_close(&fused, &want, 6e-5, 6e-5, &format!("gemm_bias {m}x{n}x{k}"));
        }
        let (a, mut c) = ([0.0f32; 6], [0.0f32; 4]);
        let err = gemm_bias(
            ViewMut2::contiguous(&mut c[..], [2, 2]).unwrap(),
            View2::contiguous(&a[..], [2, 3]).unwrap(),
            View2::contiguous(&a[..], [3, 2]).unwrap(),
            &[1.0; 3],
            Par::Seq,
        )
        .unwrap_err();
        let want = KernelError::ShapeMismatch {
            op: "gemm_bias",
            tensor: "bias",
            expected: vec![2],
            got: vec![3],
        };
        assert_eq!(err, want);
    }

    #[test]
    fn gemm_shape_errors() {
        let a = [0.0f32; 6];
        let mut c = [0.0f32; 4];
        let err = gemm(
            ViewMut2::contiguous(&mut c[..], [2, 2]).unwrap(),
            Accum::Replace,
            View2::contiguous(&a[..], [3, 2]).unwrap(),
            View2::contiguous(&a[..], [2, 3]).unwrap(),
            1.0,
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::ShapeMismatch {
                op: "gemm",
                tensor: "lhs",
                expected: vec![2, 2],
                got: vec![3, 2]
            }
        );
    }
}
