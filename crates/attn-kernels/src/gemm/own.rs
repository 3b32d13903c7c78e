//! attn's own packed f32 GEMM for row-major destinations: what every level shares.
//!
//! The blocking is BLIS's, turned for a row-major `C`. Per block of depth, every sliver of a
//! thread's rows of `A` is packed once, step-major (a level's [`Level::MR`] values of a step side
//! by side, so the broadcasts are one base register and constant displacements in one cache
//! line); then `B` is packed a block of columns at a time into [`NR`]-column panels whose rows
//! are contiguous, and each sliver passes over every panel of the block. The panels are 48
//! columns wide at every level, so a `B` packed once beforehand ([`crate::F32Panels`], a
//! model's weight) is read in place by any of them. Each level ([`Level`]) brings its
//! micro-kernel, its sliver height, its block sizes and the loop over one band: AVX-512
//! ([`super::avx512`], 8 × 48) and AVX2 ([`super::avx2`], 6 × 16, three per panel).
//!
//! Every element of `C` is summed in the same order whatever the thread count: the depth in
//! blocks of the level's depth, each block a chain of FMAs from zero, added to `C` (times
//! `alpha`) in order. Threads split `C` by rows (or by columns when it has few rows), never the
//! depth.

use crate::buffer::Buffer;
use crate::gemm::Par;
use rayon::prelude::*;
use std::arch::x86_64::__cpuid;
use std::cell::RefCell;

/// Columns of a packed `B` panel at every level (the AVX-512 micro-kernel's width; three of
/// the AVX2 kernel's).
pub(crate) const NR: usize = 48;
/// Packing buffers a thread keeps between calls only up to this many floats (16 MiB).
const RETAIN_FLOATS: usize = 4 << 20;

thread_local! {
    /// This thread's packing buffers for `A` and `B`, kept between calls.
    static PACKS: RefCell<[Option<Buffer>; 2]> = const { RefCell::new([None, None]) };
}

/// One SIMD level's part of the own GEMM.
pub(crate) trait Level {
    /// Rows of the micro-kernel, and of a packed sliver of `A`.
    const MR: usize;
    /// Depth of a packed block.
    const KC: usize;
    /// Columns of a packed `B` block (a multiple of [`NR`]).
    const NC: usize;

    /// The product of one band on the calling thread, into its packing buffers: `ap` holds
    /// every sliver of the band's rows (`⌈m / MR⌉ · MR · KC`), `bp` a block of panels (`KC ·
    /// min(NC, n rounded up to NR)`; empty for a [`Rhs::Packed`] operand).
    ///
    /// # Safety
    /// As for [`gemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn band_with(
        ap: &mut [f32],
        bp: &mut [f32],
        c: *mut f32,
        ldc: usize,
        mnk: [usize; 3],
        start: Start,
        a: (Operand, LhsValues),
        b: Rhs,
        alpha: f32,
    );
}

/// Whether a product of this shape goes to this GEMM rather than faer's at the running level:
/// a CPU and level it is the default on ([`by_default`]; `ATTN_GEMM` overrides), at least [`MIN_ROWS`]
/// rows (six slivers: with fewer, packing `B` is paid for few rows, and a matrix-vector
/// product is bound by reading `B`, which packing reads twice), at least [`MIN_COLS`] columns
/// (each packed sliver of `A` serves `n / 48` panels: attention's backward products, 64 or 128
/// columns wide, measured 5–6% slower here than on faer, which packs less), and enough work
/// (2²⁰ FMAs) to pay for packing both operands. `packing` says whether the right operand comes
/// packed once ([`Packing::Once`], a weight's [`crate::F32Panels`]) or is packed by the call.
pub(crate) fn worth_it([m, n, k]: [usize; 3], packing: Packing) -> bool {
    shape_worth_it([m, n, k]) && chosen(packing)
}

/// Whether this GEMM serves some products by a right operand `[k, n]` packed once
/// ([`Packing::Once`]) on this CPU at the running level ([`by_default`]), unless `ATTN_GEMM`
/// names faer (or `own` on any CPU at a vector level), and wide and deep enough.
pub(crate) fn serves_rhs([k, n]: [usize; 2]) -> bool {
    rhs_worth_it([k, n]) && chosen(Packing::Once)
}

/// How a product's right operand reaches the GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packing {
    /// Packed by each call from its values at their strides.
    PerCall,
    /// Packed once into a [`crate::F32Panels`] (a weight), read by many calls.
    Once,
}

/// Whether this CPU, the running level and `ATTN_GEMM` send products of a fit shape here.
fn chosen(packing: Packing) -> bool {
    let level = crate::simd::simd_level();
    if !level.is_vector() {
        return false;
    }
    match crate::gemm::requested_gemm().ok().flatten() {
        Some(crate::gemm::GemmChoice::Faer) => false,
        Some(crate::gemm::GemmChoice::Own) => true,
        None => by_default(level, packing),
    }
}

/// The shape half of [`worth_it`].
fn shape_worth_it([m, n, k]: [usize; 3]) -> bool {
    m >= MIN_ROWS && rhs_worth_it([k, n]) && m * n * k >= 1 << 20
}

/// The right operand's half of [`shape_worth_it`].
fn rhs_worth_it([k, n]: [usize; 2]) -> bool {
    n >= MIN_COLS && k >= 16
}

/// The fewest columns a product needs to come here (see [`worth_it`]).
const MIN_COLS: usize = 256;
/// The fewest rows a product needs to come here (see [`worth_it`]).
const MIN_ROWS: usize = 48;

/// The CPU's vendor string (cpuid leaf 0) and family (leaf 1: the base family, plus the
/// extended family when the base is 15), read once.
fn cpu() -> ([u8; 12], u32) {
    static CPU: std::sync::OnceLock<([u8; 12], u32)> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        let (id, sig) = (__cpuid(0), __cpuid(1).eax);
        let mut vendor = [0u8; 12];
        for (chunk, r) in vendor.chunks_exact_mut(4).zip([id.ebx, id.edx, id.ecx]) {
            chunk.copy_from_slice(&r.to_le_bytes());
        }
        let base = (sig >> 8) & 0xf;
        let family = if base == 0xf { base + ((sig >> 20) & 0xff) } else { base };
        (vendor, family)
    })
}

/// Whether the CPU is Intel's.
pub(crate) fn intel() -> bool {
    &cpu().0 == b"GenuineIntel"
}

/// Whether this GEMM takes the products it serves without `ATTN_GEMM` at `level`, by a right
/// operand that arrives as `packing` says.
///
/// At AVX-512: on Intel, and on AMD's family 25 (Zen 4 is the one with AVX-512). Measured on a
/// Zen 4 EPYC (PERFORMANCE.md): against faer, on products by a weight packed once, 1.08–1.13×
/// on the feed-forward block's 256-row products and 1.04–1.16× on the encoder layer; 0.95–0.99×
/// on large products packed per call. On AMD's Zen 5 (family 26) only products by a weight
/// packed once: measured there against faer, 1.09–1.15× on `nn.MultiheadAttention` and the
/// encoder layer, but 0.96–0.98× on the layer shapes packed per call and 0.97–0.98× on the
/// training steps (whose weights change every step).
///
/// At AVX2: on AMD's family 25 (Zen 3, or Zen 4 held to AVX2). Measured on a Zen 3 EPYC
/// against faer: 1.04–1.07× on the layer shapes at one thread, level at two; the encoder
/// layer 1.01–1.17× and the d512 training step 1.14× (faer's 2-thread products there swing
/// between two speeds from run to run; this GEMM's do not). Intel's AVX2 CPUs and Zen 5 held
/// to AVX2 stay on faer: not measured.
fn by_default(level: crate::SimdLevel, packing: Packing) -> bool {
    let (vendor, family) = cpu();
    let amd = &vendor == b"AuthenticAMD";
    let zen34 = amd && family == 25;
    let zen5 = amd && family == 26;
    match level {
        crate::SimdLevel::Avx512 => intel() || zen34 || (zen5 && packing == Packing::Once),
        _ => zen34,
    }
}

/// Raw operand description: a pointer with row and column strides (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

// SAFETY: the pointers are only read, and the caller of `gemm` guarantees they stay valid and
// unaliased by writes for the call.
unsafe impl Send for Operand {}
// SAFETY: as for `Send`: shared reads only.
unsafe impl Sync for Operand {}

/// The right operand of [`gemm`].
#[derive(Clone, Copy)]
pub(crate) enum Rhs {
    /// f32 values at their strides.
    F32(Operand),
    /// f32 values at their strides, each rounded to bf16 as it is packed (the bits of
    /// [`crate::round_to_bf16`]).
    Rounded(Operand),
    /// The words of [`crate::Bf16Panels`]: panels of 16 columns `panel` words apart, each
    /// `[pairs][16]` words holding rows `2q` (low half) and `2q + 1` (high half), zero past
    /// the columns. Widened to f32 (exactly) as they are packed.
    Bf16 { words: *const u32, panel: usize },
    /// The floats of [`super::F32Panels`]: the whole depth `k` of each [`NR`]-column panel
    /// packed as [`pack_b`] packs a block, panels `k · NR` floats apart. Read in place.
    Packed { ptr: *const f32, k: usize },
}

// SAFETY: as for `Operand`: the pointers are only read.
unsafe impl Send for Rhs {}
// SAFETY: as for `Send`: shared reads only.
unsafe impl Sync for Rhs {}

impl Rhs {
    /// This operand from column `j` on (for `Bf16`, `j` a multiple of 16; for `Packed`, of
    /// [`NR`]).
    ///
    /// # Safety
    /// Column `j` inside the operand.
    pub(super) unsafe fn at_column(self, j: usize) -> Rhs {
        // SAFETY: the caller keeps `j` inside the operand.
        unsafe {
            match self {
                Rhs::F32(b) => Rhs::F32(Operand {
                    ptr: b.ptr.add(j * b.cs),
                    ..b
                }),
                Rhs::Rounded(b) => Rhs::Rounded(Operand {
                    ptr: b.ptr.add(j * b.cs),
                    ..b
                }),
                Rhs::Bf16 { words, panel } => {
                    debug_assert_eq!(j % 16, 0);
                    Rhs::Bf16 {
                        words: words.add(j / 16 * panel),
                        panel,
                    }
                }
                Rhs::Packed { ptr, k } => {
                    debug_assert_eq!(j % NR, 0);
                    Rhs::Packed {
                        ptr: ptr.add(j / NR * k * NR),
                        k,
                    }
                }
            }
        }
    }
}

/// How [`gemm`] reads its left operand.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum LhsValues {
    /// As it is.
    F32,
    /// Each value rounded to bf16 as it is packed (the bits of [`crate::round_to_bf16`]).
    Bf16,
}

#[derive(Clone, Copy)]
pub(crate) struct Dst(*mut f32);
// SAFETY: tasks write disjoint blocks of the destination.
unsafe impl Send for Dst {}
// SAFETY: as for `Send`: each task writes its own band only.
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// What the sums of the first depth block are added to.
#[derive(Clone, Copy)]
pub(crate) enum Start {
    /// Nothing: `c = alpha · a · b`, `c` not read.
    Zero,
    /// `c` itself: `c += alpha · a · b`.
    Dst,
    /// A row of `n` values added to every row: `c = alpha · a · b + bias`, `c` not read; the
    /// bits of writing `bias` into every row of `c` first and starting from [`Start::Dst`].
    Bias(*const f32),
}

// SAFETY: the bias pointer is only read, and the caller of `gemm` guarantees it stays valid.
unsafe impl Send for Start {}
// SAFETY: as for `Send`: shared reads only.
unsafe impl Sync for Start {}

impl Start {
    /// This start for the columns from `j` on.
    ///
    /// # Safety
    /// `j` at most the bias's length.
    pub(super) unsafe fn at_column(self, j: usize) -> Start {
        match self {
            // SAFETY: the caller keeps `j` inside the bias.
            Start::Bias(bias) => Start::Bias(unsafe { bias.add(j) }),
            other => other,
        }
    }
}

/// `c[m, n] = alpha · a · b` started from `start`, `c` row-major with leading dimension `ldc`.
/// `a` is read as `values` says; a bf16 `b` is widened, so `a` rounded and `b` from
/// [`crate::Bf16Panels`] give the bits of this product of the rounded and widened f32 values.
///
/// The micro-kernel, the blocking and the packing are `L`'s ([`Level`]).
///
/// # Safety
/// The running CPU must have `L`'s features, and `L` must take `values` and `b`'s kind
/// ([`Level::band_with`]); `a` (`[m, k]`) and `b` (`[k, n]`) readable with their
/// strides (a bf16 `b`: `⌈n / 16⌉` panels of `⌈k / 2⌉` pair rows); a bias readable for `n`
/// values; `c` writable at `i·ldc + j` for `i < m`, `j < n`, not overlapping the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<L: Level>(
    c: *mut f32,
    ldc: usize,
    [m, n, k]: [usize; 3],
    start: Start,
    (a, values): (Operand, LhsValues),
    b: Rhs,
    alpha: f32,
    par: Par,
) {
    let threads = par.threads();
    let dst = Dst(c);
    // Row bands of whole slivers, or column bands of whole panels when rows are few.
    let by_rows = m.div_ceil(L::MR) >= 2 * threads || m >= n;
    let (extent, unit) = if by_rows { (m, L::MR) } else { (n, NR) };
    let units = extent.div_ceil(unit);
    let tasks = if threads == 1 { 1 } else { units.min(threads) };
    let run = |t: usize| {
        let lo = units * t / tasks * unit;
        let hi = (units * (t + 1) / tasks * unit).min(extent);
        if lo >= hi {
            return;
        }
        // SAFETY: each task gets a disjoint band of `c`; the caller guarantees the rest.
        unsafe {
            if by_rows {
                let a = Operand {
                    ptr: a.ptr.add(lo * a.rs),
                    ..a
                };
                band::<L>(
                    dst.get().add(lo * ldc),
                    ldc,
                    [hi - lo, n, k],
                    start,
                    (a, values),
                    b,
                    alpha,
                );
            } else {
                band::<L>(
                    dst.get().add(lo),
                    ldc,
                    [m, hi - lo, k],
                    start.at_column(lo),
                    (a, values),
                    b.at_column(lo),
                    alpha,
                );
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// One band of [`gemm`] on the calling thread, with this thread's packing buffers.
///
/// # Safety
/// As for [`gemm`].
unsafe fn band<L: Level>(
    c: *mut f32,
    ldc: usize,
    mnk: [usize; 3],
    start: Start,
    a: (Operand, LhsValues),
    b: Rhs,
    alpha: f32,
) {
    let [m, n, _] = mnk;
    // A packed `B` is read in place: no block buffer.
    let b_len = match b {
        Rhs::Packed { .. } => 0,
        _ => L::KC * L::NC.min(n.div_ceil(NR) * NR),
    };
    let lens = [m.div_ceil(L::MR) * L::MR * L::KC, b_len];
    let take = |kept: Option<Buffer>, len: usize| match kept {
        Some(buffer) if buffer.len() >= len => buffer,
        _ => Buffer::zeroed(len),
    };
    // A nested call on this thread (none today) would find the buffers taken and allocate.
    let [ap, bp] = PACKS.with(|packs| {
        packs
            .try_borrow_mut()
            .map(|mut p| [p[0].take(), p[1].take()])
            .unwrap_or_default()
    });
    let (mut ap, mut bp) = (take(ap, lens[0]), take(bp, lens[1]));
    // SAFETY: the buffers hold `lens`; the caller guarantees the rest.
    unsafe { L::band_with(&mut ap, &mut bp, c, ldc, mnk, start, a, b, alpha) };
    PACKS.with(|packs| {
        if let Ok(mut packs) = packs.try_borrow_mut() {
            packs[0] = (ap.len() <= RETAIN_FLOATS).then_some(ap);
            packs[1] = (bp.len() <= RETAIN_FLOATS).then_some(bp);
        }
    });
}

/// The body of each level's `pack_a`: `a[0..mr, 0..kc]` step-major, BLIS's layout, `dst[p·MR +
/// i] = a[i, p]`, rows past `mr` zero (never stored, zeroed as `B`'s padding is). The kernel's
/// broadcasts of a step then share one cache line, and a sliver is one contiguous stream that
/// the hardware prefetcher brings back from L2 after each panel has pushed it out of L1 (rows
/// at a stride measured 4–5% slower). Row-major `a` is transposed 8 × 8 in registers;
/// column-major `a` (the transposed `dyᵀ` of a weight gradient) is copied a step at a time.
///
/// # Safety
/// AVX2 available (the caller's level has it); `a` readable at `i·rs + p·cs` for `i < mr`, `p <
/// kc`; `dst` holds `kc · MR`.
#[inline(always)]
pub(crate) unsafe fn pack_a_body<const MR: usize>(
    dst: &mut [f32],
    a: *const f32,
    rs: usize,
    cs: usize,
    mr: usize,
    kc: usize,
) {
    let dst = &mut dst[..kc * MR];
    if mr < MR {
        dst.fill(0.0);
    }
    let out = dst.as_mut_ptr();
    // SAFETY: reads inside the `mr × kc` block by the caller's guarantee, writes inside `dst`.
    unsafe {
        if cs == 1 {
            crate::tile::avx2::transpose(mr, kc, a, rs, out, MR);
        } else if rs == 1 {
            for p in 0..kc {
                std::ptr::copy_nonoverlapping(a.add(p * cs), out.add(p * MR), mr);
            }
        } else {
            for p in 0..kc {
                for i in 0..mr {
                    *out.add(p * MR + i) = *a.add(i * rs + p * cs);
                }
            }
        }
    }
}

/// The part of each level's `pack_b` for a `b` whose columns are not contiguous: one panel,
/// `panel[p·NR + j] = src[p·rs + j·cs]` for `p < kc`, `j < cols`, zero for `j ≥ cols`.
/// Column-major `src` (a transposed weight, `x · Wᵀ`) is transposed 8 × 8 in registers, any
/// other strides copied one value at a time.
///
/// # Safety
/// AVX2 available (the caller's level has it); `src` readable at `p·rs + j·cs` for `p < kc`,
/// `j < cols ≤ NR`; `panel` holds `kc · NR`.
#[inline(always)]
pub(crate) unsafe fn pack_b_strided(panel: &mut [f32], src: *const f32, rs: usize, cs: usize, kc: usize, cols: usize) {
    // SAFETY: by the caller's guarantee.
    unsafe {
        if rs == 1 {
            crate::tile::avx2::transpose(cols, kc, src, cs, panel.as_mut_ptr(), NR);
            if cols < NR {
                panel.chunks_exact_mut(NR).for_each(|row| row[cols..].fill(0.0));
            }
        } else {
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j < cols { *src.add(p * rs + j * cs) } else { 0.0 };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::{gemm_reference, Accum};
    use crate::testing::{assert_close, random_vec};
    use crate::View2;

    /// The operand layouts a caller passes: row-major, column-major (a transposed view) and a
    /// strided view with neither stride 1 (the scalar packing path).
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        RowMajor,
        ColMajor,
        Strided,
    }

    /// `[rows, cols]` values in `layout`, their storage, and the view's strides.
    fn operand(rows: usize, cols: usize, layout: Layout, seed: u64) -> (Vec<f32>, [usize; 2]) {
        match layout {
            Layout::RowMajor => (random_vec(rows * cols, seed), [cols, 1]),
            Layout::ColMajor => (random_vec(rows * cols, seed), [1, rows]),
            Layout::Strided => (random_vec(rows * cols * 6, seed), [cols * 3, 2]),
        }
    }

    /// One product through this GEMM against the f64 reference, into a row-major destination
    /// with a leading dimension past its width, whose padding must be left alone.
    /// What a checked product starts from: [`Start`]'s three cases.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Begin {
        Replace,
        Add,
        Bias,
    }

    fn check<L: Level>(m: usize, n: usize, k: usize, layouts: (Layout, Layout), begin: Begin, par: Par) -> Vec<f32> {
        let (a, a_st) = operand(m, k, layouts.0, 1);
        let (b, b_st) = operand(k, n, layouts.1, 2);
        let bias = random_vec(n, 4);
        let ldc = n + 3;
        let mut c = random_vec(m * ldc, 3);
        if begin != Begin::Add {
            // Replace never reads the destination: a NaN there must not reach the result.
            c.iter_mut()
                .enumerate()
                .filter(|(i, _)| i % ldc < n)
                .for_each(|(_, x)| *x = f32::NAN);
        }
        let before = c.clone();
        let lhs = View2::new(&a[..], [m, k], a_st).unwrap();
        let rhs = View2::new(&b[..], [k, n], b_st).unwrap();
        let mut want: Vec<f64> = match begin {
            Begin::Replace => vec![0.0; m * n],
            Begin::Add => (0..m * n).map(|i| before[i / n * ldc + i % n] as f64).collect(),
            Begin::Bias => (0..m * n).map(|i| bias[i % n] as f64).collect(),
        };
        gemm_reference(&mut want, Accum::Add, lhs, rhs, 0.75);
        let start = match begin {
            Begin::Replace => Start::Zero,
            Begin::Add => Start::Dst,
            Begin::Bias => Start::Bias(bias.as_ptr()),
        };
        let operand = |v: &[f32], [rs, cs]: [usize; 2]| Operand {
            ptr: v.as_ptr(),
            rs,
            cs,
        };
        // SAFETY: `L`'s features checked by the caller ([`levels`]); the operands and `c` cover
        // the shapes.
        unsafe {
            gemm::<L>(
                c.as_mut_ptr(),
                ldc,
                [m, n, k],
                start,
                (operand(&a, a_st), LhsValues::F32),
                Rhs::F32(operand(&b, b_st)),
                0.75,
                par,
            )
        };
        let got: Vec<f32> = (0..m * n).map(|i| c[i / n * ldc + i % n]).collect();
        // Measured at most 8.3e-6 relative to 1 + |want| (800 products of values in [-1, 1],
        // several depth blocks added in f32); the bound is about 10x.
        let what = format!(
            "own gemm {} {m}x{n}x{k} {layouts:?} {begin:?} {par:?}",
            std::any::type_name::<L>()
        );
        assert_close(&got, &want, 8e-5, 8e-5, &what);
        for (i, (x, y)) in c.iter().zip(&before).enumerate() {
            if i % ldc >= n {
                assert_eq!(x.to_bits(), y.to_bits(), "{what}: padding at {i} written");
            }
        }
        got
    }

    /// Whole and ragged slivers (8 rows at AVX-512, 6 at AVX2) and panels (48 columns; ragged
    /// last panels of one, two and three zmm, whole and masked; at AVX2 ragged thirds of one and
    /// two ymm, whole and masked), one and several depth blocks (512) and column blocks (528 at
    /// AVX-512, 96 at AVX2), and bands split by rows and by columns (20 rows).
    const EDGES: [(usize, usize, usize); 7] = [
        (48, 32, 16),
        (61, 45, 17),
        (61, 75, 17),
        (100, 530, 400),
        (130, 64, 800),
        (49, 1100, 33),
        (20, 1100, 33),
    ];

    /// Runs `$body::<L>()` at each level of the own GEMM this CPU has, and says on stderr which
    /// it lacks.
    macro_rules! at_each_level {
        ($body:ident) => {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                $body::<super::super::avx2::Avx2>();
            } else {
                eprintln!("note: no AVX2 and FMA on this CPU; the own GEMM's AVX2 level is not checked");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                $body::<super::super::avx512::Avx512>();
            } else {
                eprintln!("note: no AVX-512 F on this CPU; the own GEMM's AVX-512 level is not checked");
            }
        };
    }

    #[test]
    fn own_gemm_matches_the_reference_on_every_layout_and_edge() {
        at_each_level!(own_gemm_matches_the_reference_on_every_layout_and_edge_at);
    }

    fn own_gemm_matches_the_reference_on_every_layout_and_edge_at<L: Level>() {
        use Layout::*;
        for &(m, n, k) in &EDGES {
            for layouts in [
                (RowMajor, RowMajor),
                (ColMajor, ColMajor),
                (RowMajor, ColMajor),
                (Strided, Strided),
            ] {
                check::<L>(m, n, k, layouts, Begin::Replace, Par::Seq);
                check::<L>(m, n, k, layouts, Begin::Add, Par::Rayon);
                check::<L>(m, n, k, layouts, Begin::Bias, Par::Rayon);
            }
        }
    }

    #[test]
    fn own_gemm_gives_the_same_bits_on_any_thread_count() {
        at_each_level!(own_gemm_gives_the_same_bits_on_any_thread_count_at);
    }

    fn own_gemm_gives_the_same_bits_on_any_thread_count_at<L: Level>() {
        // Bands by rows (many rows) and by columns (few rows, many columns).
        for (m, n, k) in [(200, 96, 500), (50, 1500, 40)] {
            let layouts = (Layout::RowMajor, Layout::ColMajor);
            let one = check::<L>(m, n, k, layouts, Begin::Bias, Par::Seq);
            for threads in [2, 3, 4] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let many = pool.install(|| check::<L>(m, n, k, layouts, Begin::Bias, Par::Rayon));
                let same = one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{} {m}x{n}x{k}: {threads} threads changed the bits",
                    std::any::type_name::<L>()
                );
            }
        }
    }

    /// `B` read in place from [`crate::F32Panels`] gives the bits of `B` packed per block, on
    /// every start, one and several depth and column blocks, ragged slivers and panels, and
    /// bands by rows and by columns (at every level the CPU has, whatever its vendor).
    #[test]
    fn panels_read_in_place_give_the_bits_of_packing_per_block() {
        at_each_level!(panels_read_in_place_give_the_bits_of_packing_per_block_at);
    }

    fn panels_read_in_place_give_the_bits_of_packing_per_block_at<L: Level>() {
        for &(m, n, k) in &EDGES {
            let (a, w, bias) = (random_vec(m * k, 1), random_vec(n * k, 2), random_vec(n, 4));
            // `B = Wᵀ`, column-major, as a linear map reads it.
            let b_view = View2::new(&w[..], [k, n], [1, k]).unwrap();
            let packed = crate::F32Panels::pack(b_view);
            let a_op = Operand {
                ptr: a.as_ptr(),
                rs: k,
                cs: 1,
            };
            let rhs = [
                Rhs::F32(Operand {
                    ptr: w.as_ptr(),
                    rs: 1,
                    cs: k,
                }),
                Rhs::Packed {
                    ptr: packed.floats().as_ptr(),
                    k,
                },
            ];
            for start in [Start::Zero, Start::Dst, Start::Bias(bias.as_ptr())] {
                for par in [Par::Seq, Par::Rayon] {
                    let [per_block, in_place] = rhs.map(|b| {
                        let mut c = random_vec(m * n, 3);
                        // SAFETY: `L`'s features were detected; the operands and `c` cover the
                        // shapes.
                        unsafe {
                            gemm::<L>(
                                c.as_mut_ptr(),
                                n,
                                [m, n, k],
                                start,
                                (a_op, LhsValues::F32),
                                b,
                                0.75,
                                par,
                            )
                        };
                        c
                    });
                    let same = per_block.iter().zip(&in_place).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{} {m}x{n}x{k} {par:?}: the panels changed the bits",
                        std::any::type_name::<L>()
                    );
                }
            }
        }
    }

    #[test]
    fn only_products_worth_packing_come_here() {
        assert!(shape_worth_it([48, 256, 1024]) && shape_worth_it([2048, 512, 512]));
        // A matrix-vector product, too few rows, too few columns (attention's backward), too
        // little work.
        assert!(!shape_worth_it([1, 4096, 4096]) && !shape_worth_it([47, 4096, 4096]));
        assert!(!shape_worth_it([4096, 128, 4096]) && !shape_worth_it([64, 256, 32]));
        // The vendor and family agree with the kernel's own names for the CPU.
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
            assert_eq!(intel(), info.contains("GenuineIntel"));
            let family = info
                .lines()
                .find_map(|l| l.strip_prefix("cpu family"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().parse::<u32>().unwrap());
            if let Some(family) = family {
                assert_eq!(cpu().1, family);
                let zen34 = info.contains("AuthenticAMD") && family == 25;
                let zen5 = info.contains("AuthenticAMD") && family == 26;
                for packing in [Packing::PerCall, Packing::Once] {
                    let once = packing == Packing::Once;
                    assert_eq!(
                        by_default(crate::SimdLevel::Avx512, packing),
                        intel() || zen34 || (zen5 && once)
                    );
                    assert_eq!(by_default(crate::SimdLevel::Avx2Fma, packing), zen34);
                }
            }
        }
    }
}
