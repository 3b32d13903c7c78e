//! attn's own packed f32 GEMM at the AVX-512 level, for row-major destinations.
//!
//! The blocking is BLIS's, turned for a row-major `C`: the micro-kernel keeps [`MR`] = 8 rows ×
//! three zmm ([`NR`] = 48 columns) of `C` in 24 accumulators; each step of the depth loads three
//! vectors of a packed `B` panel and broadcasts eight values of a packed `A` sliver (11 loads per
//! 24 FMAs; against 12 × 32, 14 loads, it measured 1.01–1.05× alone and 0.98–1.06× in this GEMM on
//! Intel's model 207; `examples/gemm_kernel_shapes.rs` times the shapes). Per block of [`KC`] steps
//! of depth, every sliver of the thread's rows of `A` is packed once, step-major (the [`MR`] values
//! of a step side by side, so the broadcasts are one base register and eight displacements in one
//! cache line); then `B` is packed [`NC`] columns at a time (792 KiB, in L2) into 48-column panels
//! whose rows are contiguous, and each sliver passes over every panel of the block. The kernel
//! prefetches its rows of `C` before the depth loop, so the read-modify-write at its end does not
//! wait on memory, and its panel [`PF`] steps ahead, because the panel streams from L2.
//!
//! A `B` packed once beforehand ([`crate::F32Panels`], a model's weight) is read in place
//! instead, and the first sliver over a block of it prefetches the next panel into L2. The
//! micro-kernel stays a function of its own: inlined into these loops it spilled an accumulator
//! on every step.
//!
//! Every element of `C` is summed in the same order whatever the thread count: the depth in
//! [`KC`] blocks, each block a chain of FMAs from zero, added to `C` (times `alpha`) in order.
//! Threads split `C` by rows (or by columns when it has few rows), never the depth.

mod pack;

use pack::{pack_a, widen_b};
pub(crate) use pack::{pack_b, round_row_to_bf16};

use crate::buffer::Buffer;
use crate::gemm::Par;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of the micro-kernel: 8 rows × three zmm is 24 accumulators.
pub(crate) const MR: usize = 8;
/// Columns of the micro-kernel and of a packed `B` panel.
pub(crate) const NR: usize = 48;
/// Vectors in a row of a panel.
const V: usize = NR / 16;
/// How many steps of depth ahead the kernel prefetches its `B` panel.
const PF: usize = 8;
/// Depth of a packed block: 512, so that the layers' 512-deep products take one pass over `C`
/// (against 384, which cut them 256 + 256: 1.01–1.04× on the five layer shapes at 2 threads,
/// 0.95–1.07× at 1, on an Intel Xeon; PERFORMANCE.md).
const KC: usize = 512;
/// Columns of a packed `B` block (`KC × NC` floats = 1056 KiB, in a 2 MiB L2): eleven panels,
/// so a layer 512 wide is one block.
const NC: usize = 11 * NR;
/// Packing buffers a thread keeps between calls only up to this many floats (16 MiB).
const RETAIN_FLOATS: usize = 4 << 20;

thread_local! {
    /// This thread's packing buffers for `A` and `B`, kept between calls.
    static PACKS: RefCell<[Option<Buffer>; 2]> = const { RefCell::new([None, None]) };
}

/// Whether a product of this shape goes to this GEMM rather than faer's: an Intel CPU or AMD's
/// Zen 4 ([`by_default`]; `ATTN_GEMM` overrides), at least [`MIN_ROWS`]
/// rows (six slivers: with fewer, packing `B` is paid for few rows, and a matrix-vector
/// product is bound by reading `B`, which packing reads twice), at least [`MIN_COLS`] columns
/// (each packed sliver of `A` serves `n / 48` panels: attention's backward products, 64 or 128
/// columns wide, measured 5–6% slower here than on faer, which packs less), and enough work
/// (2²⁰ FMAs) to pay for packing both operands.
pub(crate) fn worth_it([m, n, k]: [usize; 3]) -> bool {
    shape_worth_it([m, n, k]) && chosen()
}

/// Whether this GEMM serves some products with a right operand `[k, n]` on this CPU: Intel's
/// or Zen 4 ([`by_default`]), unless `ATTN_GEMM` names faer (or `own` on any CPU), and wide and deep enough (the level is
/// the caller's to check).
pub(crate) fn serves_rhs([k, n]: [usize; 2]) -> bool {
    rhs_worth_it([k, n]) && chosen()
}

/// Whether this CPU and `ATTN_GEMM` send products of a fit shape here.
fn chosen() -> bool {
    match crate::gemm::requested_gemm().ok().flatten() {
        Some(crate::gemm::GemmChoice::Faer) => false,
        Some(crate::gemm::GemmChoice::Own) => true,
        None => by_default(),
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

/// Whether this GEMM takes the products it serves without `ATTN_GEMM`: on Intel, and on AMD's
/// family 25 (Zen 3 and 4; of these only Zen 4 has AVX-512). Measured on a Zen 4 EPYC
/// (PERFORMANCE.md): against faer, on products by a weight packed once, 1.08–1.13× on the
/// feed-forward block's 256-row products and 1.04–1.16× on the encoder layer; 0.95–0.99× on
/// large products packed per call. AMD's Zen 5 (family 26) stays on faer, which measured faster
/// there than this GEMM's earlier 12 × 32 kernel; this one was not measured there.
fn by_default() -> bool {
    let (vendor, family) = cpu();
    intel() || (&vendor == b"AuthenticAMD" && family == 25)
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
    unsafe fn at_column(self, j: usize) -> Rhs {
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
struct Dst(*mut f32);
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
    unsafe fn at_column(self, j: usize) -> Start {
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
/// # Safety
/// The running CPU must have AVX-512 F; `a` (`[m, k]`) and `b` (`[k, n]`) readable with their
/// strides (a bf16 `b`: `⌈n / 16⌉` panels of `⌈k / 2⌉` pair rows); a bias readable for `n`
/// values; `c` writable at `i·ldc + j` for `i < m`, `j < n`, not overlapping the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
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
    let by_rows = m.div_ceil(MR) >= 2 * threads || m >= n;
    let (extent, unit) = if by_rows { (m, MR) } else { (n, NR) };
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
                band(
                    dst.get().add(lo * ldc),
                    ldc,
                    [hi - lo, n, k],
                    start,
                    (a, values),
                    b,
                    alpha,
                );
            } else {
                band(
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
unsafe fn band(c: *mut f32, ldc: usize, mnk: [usize; 3], start: Start, a: (Operand, LhsValues), b: Rhs, alpha: f32) {
    let [m, n, _] = mnk;
    // A packed `B` is read in place: no block buffer.
    let b_len = match b {
        Rhs::Packed { .. } => 0,
        _ => KC * NC.min(n.div_ceil(NR) * NR),
    };
    let lens = [m.div_ceil(MR) * MR * KC, b_len];
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
    unsafe { band_with(&mut ap, &mut bp, c, ldc, mnk, start, a, b, alpha) };
    PACKS.with(|packs| {
        if let Ok(mut packs) = packs.try_borrow_mut() {
            packs[0] = (ap.len() <= RETAIN_FLOATS).then_some(ap);
            packs[1] = (bp.len() <= RETAIN_FLOATS).then_some(bp);
        }
    });
}

/// [`band`] with its packing buffers: `ap` holds every sliver of the band's rows (`⌈m / MR⌉ ·
/// MR · KC`), `bp` a block of panels (`KC · min(NC, n rounded up to NR)`).
///
/// # Safety
/// As for [`gemm`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn band_with(
    ap: &mut [f32],
    bp: &mut [f32],
    c: *mut f32,
    ldc: usize,
    [m, n, k]: [usize; 3],
    start: Start,
    (a, values): (Operand, LhsValues),
    b: Rhs,
    alpha: f32,
) {
    let slivers = m.div_ceil(MR);
    // The depth in equal blocks of at most KC (768 is 384 + 384, not 512 + 256): a short last
    // block pays a whole pass over `C` for little work.
    let step = k.div_ceil(k.div_ceil(KC));
    for pc in (0..k).step_by(step) {
        let kc = (k - pc).min(step);
        let first = if pc == 0 { start } else { Start::Dst };
        for jc in (0..n).step_by(NC) {
            let nc = (n - jc).min(NC);
            // SAFETY: the block `[pc, pc + kc) × [jc, jc + nc)` is inside `b`.
            unsafe {
                match b {
                    Rhs::F32(b) => pack_b(bp, KC, b.ptr.add(pc * b.rs + jc * b.cs), b.rs, b.cs, kc, nc),
                    Rhs::Rounded(b) => {
                        pack_b(bp, KC, b.ptr.add(pc * b.rs + jc * b.cs), b.rs, b.cs, kc, nc);
                        for q in 0..nc.div_ceil(NR) {
                            round_row_to_bf16(&mut bp[q * KC * NR..q * KC * NR + kc * NR]);
                        }
                    }
                    Rhs::Bf16 { words, panel } => widen_b(bp, words.add(jc / 16 * panel), panel, pc, kc, nc),
                    Rhs::Packed { .. } => {}
                }
            };
            // The panel of columns from `col` (a multiple of NR) at depth `pc`, read in place.
            let in_place = |col: usize| match b {
                Rhs::Packed { ptr, k } => Some(ptr.wrapping_add(col / NR * k * NR + pc * NR)),
                _ => None,
            };
            // Panel `jr / NR` of the block: in place, or in `bp` (`KC · NR` floats apart).
            let panel = |jr: usize| in_place(jc + jr).unwrap_or_else(|| bp.as_ptr().wrapping_add(jr * KC));
            for s in 0..slivers {
                let ir = s * MR;
                if jc == 0 {
                    // Every sliver of the band for this depth block, packed as the first column
                    // block reaches it (so that reading `a` overlaps the last sliver's products)
                    // and read from L2/L3 by the later blocks instead of from the caller's `a`.
                    // SAFETY: rows `[ir, ir + mr)` and depth `[pc, pc + kc)` are inside `a`.
                    unsafe { pack_sliver(&mut ap[s * MR * KC..][..kc * MR], (a, values), [ir, pc], [m, kc]) };
                }
                for jr in (0..nc).step_by(NR) {
                    let shape = [kc, (m - ir).min(MR), (nc - jr).min(NR)];
                    let args = (
                        shape,
                        ap.as_ptr().wrapping_add(s * MR * KC),
                        panel(jr),
                        c.wrapping_add(ir * ldc + jc + jr),
                    );
                    // The first sliver over panels read in place (from L3 or memory, where
                    // the weights rest between calls) brings the next panel into L2 as it goes.
                    let next = (s == 0 && jc + jr + NR < n).then(|| in_place(jc + jr + NR)).flatten();
                    // A ragged last panel (16 of 1024's 48 columns, 32 of 512's) runs an
                    // instance that does only the FMAs of its own vectors: the full instance's
                    // code is unchanged (the kernel is out of line).
                    // SAFETY: the sliver and the panel hold `kc` steps; the block of `c` is
                    // `mr × cols` at `(ir, jc + jr)`, inside `c`.
                    unsafe {
                        let at = first.at_column(jc + jr);
                        match (next, shape[2].div_ceil(16)) {
                            (Some(next), V) => kernel::<true, V>(args, next, ldc, at, alpha),
                            (Some(next), 2) => kernel::<true, 2>(args, next, ldc, at, alpha),
                            (Some(next), _) => kernel::<true, 1>(args, next, ldc, at, alpha),
                            (None, V) => kernel::<false, V>(args, args.2, ldc, at, alpha),
                            (None, 2) => kernel::<false, 2>(args, args.2, ldc, at, alpha),
                            (None, _) => kernel::<false, 1>(args, args.2, ldc, at, alpha),
                        }
                    };
                }
            }
        }
    }
}

/// Packs rows `[ir, ir + MR)` (those below `m`) and depth `[pc, pc + kc)` of `a` into `dst`
/// step-major, rounded to bf16 for [`LhsValues::Bf16`].
///
/// # Safety
/// Those rows and steps are inside `a`; `dst` holds `kc · MR` floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_sliver(dst: &mut [f32], (a, values): (Operand, LhsValues), [ir, pc]: [usize; 2], [m, kc]: [usize; 2]) {
    // SAFETY: by the caller's guarantee.
    unsafe { pack_a(dst, a.ptr.add(ir * a.rs + pc * a.cs), a.rs, a.cs, (m - ir).min(MR), kc) };
    if values == LhsValues::Bf16 {
        round_row_to_bf16(dst);
    }
}

/// `c[0..mr, 0..cols] = alpha · Σ_p a[p·MR + i] · b[p·NR + j]` added to `start` (nothing, `c`
/// or the bias from this block's first column), for `([kc, mr, cols], a, b, c) = args`, over the
/// first `VECS` vectors of each panel row (`cols ≤ 16·VECS`). With `WARM`, each step also
/// prefetches the same row of the panel at `next` into L2.
///
/// # Safety
/// `VECS ≤ V`; `a` holds `kc` steps of [`MR`] values; `b` holds `kc` rows of [`NR`]; `c`
/// writable at `i·ldc + j` for `i < mr`, `j < cols`; a bias readable for `cols` values.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn kernel<const WARM: bool, const VECS: usize>(
    args: ([usize; 3], *const f32, *const f32, *mut f32),
    next: *const f32,
    ldc: usize,
    start: Start,
    alpha: f32,
) {
    let ([kc, mr, cols], a, b, c) = args;
    // SAFETY: every offset stays inside the ranges the caller guarantees.
    unsafe {
        // The lines of the block's rows (a narrow last block's may lie past `c`: a prefetch
        // never faults, and `wrapping_add` makes no claim on the address).
        for r in 0..mr {
            for j in [0, 16, 32, NR - 1] {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + j).cast());
            }
        }
        let mut acc = [[_mm512_setzero_ps(); VECS]; MR];
        for p in 0..kc {
            // The panel streams from L2: ask for its rows `PF` steps ahead (past the panel's
            // end this reads the next panel or nothing: a prefetch never faults).
            let ahead = b.wrapping_add((p + PF) * NR);
            for v in 0..VECS {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * v).cast());
                if WARM {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(p * NR + 16 * v).cast());
                }
            }
            let bv: [__m512; VECS] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(p * NR + 16 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(p * MR + r));
                for (acc_rv, &bv) in acc_r.iter_mut().zip(&bv) {
                    *acc_rv = _mm512_fmadd_ps(x, bv, *acc_rv);
                }
            }
        }
        let masks = masks(cols);
        let alpha = _mm512_set1_ps(alpha);
        for (r, acc_r) in acc.iter().enumerate() {
            if r < mr {
                let row = c.add(r * ldc);
                // A vector wholly past `cols` (a ragged last panel) is skipped: its pointer could
                // lie past the end of `c` or of the bias.
                for (v, (&acc_rv, mask)) in acc_r.iter().zip(masks).enumerate().filter(|(_, (_, m))| *m != 0) {
                    let out = row.add(16 * v);
                    let value = match start {
                        Start::Zero => _mm512_mul_ps(alpha, acc_rv),
                        Start::Dst => _mm512_fmadd_ps(alpha, acc_rv, _mm512_maskz_loadu_ps(mask, out)),
                        Start::Bias(bias) => {
                            _mm512_fmadd_ps(alpha, acc_rv, _mm512_maskz_loadu_ps(mask, bias.add(16 * v)))
                        }
                    };
                    _mm512_mask_storeu_ps(out, mask, value);
                }
            }
        }
    }
}

/// The masks of the first `cols` (at most [`NR`]) lanes of a panel row's [`V`] vectors.
fn masks(cols: usize) -> [__mmask16; V] {
    std::array::from_fn(|v| {
        let n = cols.saturating_sub(16 * v);
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    })
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

    fn check(m: usize, n: usize, k: usize, layouts: (Layout, Layout), begin: Begin, par: Par) -> Vec<f32> {
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
        // SAFETY: AVX-512 F checked by the caller; the operands and `c` cover the shapes.
        unsafe {
            gemm(
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
        let what = format!("own gemm {m}x{n}x{k} {layouts:?} {begin:?} {par:?}");
        assert_close(&got, &want, 8e-5, 8e-5, &what);
        for (i, (x, y)) in c.iter().zip(&before).enumerate() {
            if i % ldc >= n {
                assert_eq!(x.to_bits(), y.to_bits(), "{what}: padding at {i} written");
            }
        }
        got
    }

    /// Whole and ragged slivers (8 rows) and panels (48 columns; ragged last panels of one,
    /// two and three vectors, whole and masked), one and several depth blocks (512) and column
    /// blocks (528), and bands split by rows and by columns (20 rows).
    const EDGES: [(usize, usize, usize); 7] = [
        (48, 32, 16),
        (61, 45, 17),
        (61, 75, 17),
        (100, 530, 400),
        (130, 64, 800),
        (49, 1100, 33),
        (20, 1100, 33),
    ];

    fn has_avx512() -> bool {
        let has = std::arch::is_x86_feature_detected!("avx512f");
        if !has {
            eprintln!("note: no AVX-512 on this CPU; attn's own f32 GEMM is not checked");
        }
        has
    }

    #[test]
    fn own_gemm_matches_the_reference_on_every_layout_and_edge() {
        if !has_avx512() {
            return;
        }
        use Layout::*;
        for &(m, n, k) in &EDGES {
            for layouts in [
                (RowMajor, RowMajor),
                (ColMajor, ColMajor),
                (RowMajor, ColMajor),
                (Strided, Strided),
            ] {
                check(m, n, k, layouts, Begin::Replace, Par::Seq);
                check(m, n, k, layouts, Begin::Add, Par::Rayon);
                check(m, n, k, layouts, Begin::Bias, Par::Rayon);
            }
        }
    }

    #[test]
    fn own_gemm_gives_the_same_bits_on_any_thread_count() {
        if !has_avx512() {
            return;
        }
        // Bands by rows (many rows) and by columns (few rows, many columns).
        for (m, n, k) in [(200, 96, 500), (50, 1500, 40)] {
            let layouts = (Layout::RowMajor, Layout::ColMajor);
            let one = check(m, n, k, layouts, Begin::Bias, Par::Seq);
            for threads in [2, 3, 4] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let many = pool.install(|| check(m, n, k, layouts, Begin::Bias, Par::Rayon));
                let same = one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}x{n}x{k}: {threads} threads changed the bits");
            }
        }
    }

    /// `B` read in place from [`crate::F32Panels`] gives the bits of `B` packed per block, on
    /// every start, one and several depth and column blocks, ragged slivers and panels, and
    /// bands by rows and by columns (checked wherever AVX-512 F runs, Intel or not).
    #[test]
    fn panels_read_in_place_give_the_bits_of_packing_per_block() {
        if !has_avx512() {
            return;
        }
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
                        // SAFETY: AVX-512 F was detected; the operands and `c` cover the shapes.
                        unsafe {
                            gemm(
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
                    assert!(same, "{m}x{n}x{k} {par:?}: the panels changed the bits");
                }
            }
        }
    }

    /// The vector rounding has the bits of the scalar one on every class of value: random bit
    /// patterns (every exponent, NaNs with payloads, subnormals), ties either way, the largest
    /// finite values, and a ragged tail.
    #[test]
    fn rounding_a_row_has_the_scalar_bits() {
        if !has_avx512() {
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(41);
        let mut values: Vec<f32> = (0..40_000)
            .map(|_| f32::from_bits((rng.next_u64() >> 32) as u32))
            .collect();
        values.extend(
            [
                0x0000_0001u32,
                0x807F_FFFF,
                0x0000_8000,
                0x3F80_8000,
                0x3F81_8000,
                0x3F80_8001,
                0x7F7F_FFFF,
                0xFF7F_8000,
                0x7F80_0000,
                0xFF80_0001,
                0x7FC0_0000,
                0x8000_0000,
            ]
            .map(f32::from_bits),
        );
        let mut got = values.clone();
        // SAFETY: AVX-512 F was detected.
        unsafe { round_row_to_bf16(&mut got) };
        for (x, y) in values.iter().zip(&got) {
            let want = crate::round_to_bf16(*x).to_bits();
            assert_eq!(y.to_bits(), want, "{:#010x}", x.to_bits());
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
                let zen4 = info.contains("AuthenticAMD") && family == 25;
                assert_eq!(by_default(), intel() || zen4);
            }
        }
    }
}
