//! The backward of a linear map in bf16 (mixed-precision training): the products of
//! [`crate::linear_backward`] with bf16 operands and f32 sums, f32 gradients.
//!
//! - `dx = dy·W`: `dy` rounded while it is packed (as [`crate::gemm_bf16`]'s left operand),
//!   `W` packed once per weight as a right operand `[out, in]` ([`Bf16Panels::pack`] of `W`
//!   itself, the forward's packing being of `Wᵀ`).
//! - `dW += dyᵀ·x`: both operands are activations, rounded and packed per call into pairs along
//!   the tokens `n` (two rows at a time: one `vcvtne2ps2bf16` and one `vpermw` per 16 columns),
//!   both in `Bf16Panels`' layout, then the same tile kernel with `Accum::Add`, which reads
//!   `dy`'s panels as `dyᵀ`'s rows in panels (no transpose); at the AMX level `dyᵀ` goes
//!   straight into A tiles and `x` into panels padded to whole steps, for
//!   [`crate::gemm_bf16`]'s AMX kernel.
//! - `db += Σ_n dy`: f32 (unrounded), as in f32.
//!
//! Each element is one chain of `vdpbf16ps` (or `tdpbf16ps`) over its depth in order, so the result does not
//! depend on the thread count. The error bound is [`crate::gemm_bf16`]'s, with `K` the depth
//! (`out` for `dx`, `n` for `dW`). On the widened route of [`crate::gemm_bf16`] (AVX512-BF16
//! on Intel, whose `vdpbf16ps` runs at half the f32 rate, and AVX-512 without bf16
//! instructions) both products run on attn's own f32 GEMM, the operands rounded as it packs
//! them. Below AVX-512 the same rounded values are multiplied by the f32 [`crate::gemm`].

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::bf16::amx::STEP_PAIRS;
use crate::bf16::{Route, PANEL};
#[cfg(not(target_arch = "x86_64"))]
const STEP_PAIRS: usize = 16;
use crate::error::{check_len, check_optional_lens};
use crate::grad::add_column_sums;
use crate::view::SharedMut;
use crate::{round_to_bf16, Accum, Bf16Panels, KernelError, LinearShape, Par, View2, ViewMut2};

/// [`crate::linear_backward`] with bf16 products: `dx = dy·W` (written, when asked for) with
/// `w_packed` the weight `W: [out, in]` packed by [`Bf16Panels::pack`] as it is (not
/// transposed), `dW += dyᵀ·x` with both rounded per call, and `db += Σ_n dy` in f32.
/// `dy: [n, out]`, `x: [n, in]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_bf16(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w_packed: &Bf16Panels,
    sh: LinearShape,
    par: Par,
) -> Result<(), KernelError> {
    let op = "linear_backward_bf16";
    let LinearShape { n, in_dim, out_dim } = sh;
    check_len(op, "dy", n * out_dim, dy.len())?;
    check_len(op, "x", n * in_dim, x.len())?;
    check_len(op, "dw", out_dim * in_dim, dw.len())?;
    if w_packed.shape() != [out_dim, in_dim] {
        return Err(KernelError::shape(
            op,
            "w_packed",
            vec![out_dim, in_dim],
            w_packed.shape().to_vec(),
        ));
    }
    check_optional_lens(op, [("dx", n * in_dim, dx.as_deref()), ("db", out_dim, db.as_deref())])?;
    if let Some(dx) = dx.filter(|dx| !dx.is_empty()) {
        if out_dim == 0 {
            // A sum over no outputs.
            dx.fill(0.0);
        } else {
            crate::gemm_bf16(
                ViewMut2::contiguous(dx, [n, in_dim])?,
                Accum::Replace,
                View2::contiguous(dy, [n, out_dim])?,
                w_packed,
                par,
            )?;
        }
    }
    if n > 0 && in_dim > 0 && out_dim > 0 {
        weight_gradient(Route::of(crate::bf16_level()), dw, dy, x, sh, par)?;
    }
    if let Some(db) = db.filter(|_| n > 0 && out_dim > 0) {
        add_column_sums(db, dy, out_dim, par);
    }
    Ok(())
}

/// `dw [out, in] += dyᵀ·x` with `dy: [n, out]` and `x: [n, in]` rounded to bf16, f32 sums.
pub(crate) fn weight_gradient(
    route: Route,
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    LinearShape { n, in_dim, out_dim }: LinearShape,
    par: Par,
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if route == Route::Amx && n > 0 && out_dim > 0 && in_dim > 0 {
        // `dyᵀ` as AMX A tiles and `x` as panels, both padded with zero pairs to whole steps of
        // the depth `n`, in aligned buffers whose every word `pack_pairs` writes (the padding
        // is read).
        let steps = crate::bf16::padded_pairs(n) / STEP_PAIRS;
        let a_len = out_dim.div_ceil(PANEL) * steps * STEP_PAIRS * PANEL;
        let b_panel = steps * STEP_PAIRS * PANEL;
        let mut a = crate::buffer::take(a_len);
        let mut b = crate::buffer::take(in_dim.div_ceil(PANEL) * b_panel);
        pack_pairs(&mut a, dy, [n, out_dim], Layout::Tiles(steps), par);
        pack_pairs(&mut b, x, [n, in_dim], Layout::PaddedPanels(steps * STEP_PAIRS), par);
        // SAFETY: AMX was detected; `a` holds the tiles of `dyᵀ: [out, n]`, `b` the panels of
        // `x: [n, in]` `b_panel` words apart (zeros past the depth), `dw` is `[out, in]`.
        unsafe {
            crate::bf16::amx::gemm(
                [out_dim, in_dim, steps],
                crate::bf16::amx::Lhs::Tiles(&a),
                bytemuck_words(&b),
                b_panel,
                dw.as_mut_ptr(),
                in_dim,
                crate::bf16::amx::Init::Dst,
                par,
            )
        };
        crate::buffer::give(a);
        crate::buffer::give(b);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if route == Route::Widened && n > 0 && out_dim > 0 && in_dim > 0 {
        use crate::gemm::avx512::{gemm, LhsValues, Operand, Rhs, Start};
        assert!(std::arch::is_x86_feature_detected!("avx512f"));
        let dy_t = Operand {
            ptr: dy.as_ptr(),
            rs: 1,
            cs: out_dim,
        };
        let x = Operand {
            ptr: x.as_ptr(),
            rs: in_dim,
            cs: 1,
        };
        // SAFETY: AVX-512 F (asserted); `dy` is `[n, out]` (so `dyᵀ` is `[out, n]` at strides
        // `[1, out]`), `x` is `[n, in]` and `dw` is `[out, in]` (lengths checked by the caller),
        // `dw` borrowed mutably.
        unsafe {
            gemm(
                dw.as_mut_ptr(),
                in_dim,
                [out_dim, in_dim, n],
                Start::Dst,
                (dy_t, LhsValues::Bf16),
                Rhs::Rounded(x),
                1.0,
                par,
            )
        };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if route == Route::Dpbf16 {
        let pairs = n.div_ceil(2);
        // `dy` and `x` both in the panels of `Bf16Panels` (pairs of rows along `n`, 16
        // columns a panel): `dy`'s panels are `dyᵀ`'s rows in panels, which the kernel reads
        // as they are (`Lhs::Panels`), so neither operand is transposed. From the
        // training step's arena, whose best fit serves every layer's sizes step after step;
        // `pack_pairs` writes every word of both (zeros past the columns).
        let mut a = crate::arena::overwritten(out_dim.div_ceil(PANEL) * pairs * PANEL);
        let mut b = crate::arena::overwritten(in_dim.div_ceil(PANEL) * pairs * PANEL);
        pack_pairs(&mut a, dy, [n, out_dim], Layout::Panels, par);
        pack_pairs(&mut b, x, [n, in_dim], Layout::Panels, par);
        let words: &[u32] = bytemuck_words(&b);
        // SAFETY: the level was detected; `a` holds the panels of `[n, out]` (whole panels of
        // `dyᵀ`'s rows), `b` the panels of `[n, in]`, and `dw` is `[out, in]` (length checked
        // by the caller).
        unsafe {
            crate::bf16::avx512bf16::gemm(
                out_dim,
                in_dim,
                pairs,
                crate::bf16::avx512bf16::Lhs::Panels(a.as_ptr().cast()),
                words,
                pairs * PANEL,
                dw.as_mut_ptr(),
                in_dim,
                Accum::Add,
                None,
                par,
            )
        };
        crate::arena::give(a);
        crate::arena::give(b);
        return Ok(());
    }
    let _ = route;
    let dy_r: Vec<f32> = dy.iter().map(|&v| round_to_bf16(v)).collect();
    let x_r: Vec<f32> = x.iter().map(|&v| round_to_bf16(v)).collect();
    let dy_t = View2::new(&dy_r, [out_dim, n], [1, out_dim])?;
    crate::gemm(
        ViewMut2::contiguous(dw, [out_dim, in_dim])?,
        Accum::Add,
        dy_t,
        View2::contiguous(&x_r, [n, in_dim])?,
        1.0,
        par,
    )
}

/// The words of a buffer of f32 slots holding packed pairs.
fn bytemuck_words(b: &[f32]) -> &[u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is a u32.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len()) }
}

/// Where [`pack_pairs`] puts the pair of rows `2p, 2p + 1` at column `c`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `dst[(c / 16)·pairs·16 + p·16 + c % 16]`: [`Bf16Panels`]' layout (a right operand).
    Panels,
    /// `dst[(c / 16)·stride·16 + p·16 + c % 16]`: panels `stride ≥ pairs` pairs apart (the
    /// AMX kernel's right operand, padded to whole steps).
    PaddedPanels(usize),
    /// The AMX kernel's A tiles of the transpose, `steps` steps per row tile:
    /// `dst[((c / 16)·steps + p / 16)·256 + (c % 16)·16 + p % 16]`.
    Tiles(usize),
}

/// Pairs `p0 .. p0 + count` of `src: [n, width]`'s rows at columns `c0 .. c0 + cols` into
/// `words`, 16 words per pair (zeros past `n` and `cols`): one vector call for the run at the
/// AVX512-BF16 level, else [`crate::bf16::pair_rows`] per pair.
fn interleave_rows(src: &[f32], at: [usize; 4], p0: usize, count: usize, words: &mut [f32]) {
    assert!(words.len() >= count * PANEL);
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        // SAFETY: the level was detected; `words` holds 16 words per pair (asserted).
        unsafe { crate::bf16::avx512bf16::interleave_rows(src, at, p0, count, words.as_mut_ptr()) };
        return;
    }
    let (mut lo_buf, mut hi_buf) = ([0.0f32; PANEL], [0.0f32; PANEL]);
    for (q, out) in words[..count * PANEL].chunks_exact_mut(PANEL).enumerate() {
        let p = p0 + q;
        let (lo, hi) = (row(src, 2 * p, at, &mut lo_buf), row(src, 2 * p + 1, at, &mut hi_buf));
        crate::bf16::pair_rows(lo, hi, out);
    }
}

/// `rows[l·ld + q] = block[q][l]` for `q < count` and `l < cols`: pairs `q` of 16 columns,
/// each column's pairs as `count` words of a row (the left operand's layout; with `ld` 16 and
/// a whole block, an AMX A tile whose row `l` holds column `l`'s pairs). A whole block goes
/// through [`crate::bf16::avx512bf16::transpose16`] straight into `rows`, a partial one
/// through a tile of its own, so that nothing past pair `count` of a row (another task's
/// words) is written.
fn columns_into_rows(block: &[[f32; PANEL]; STEP_PAIRS], [count, cols]: [usize; 2], rows: &mut [f32], ld: usize) {
    assert!(count <= STEP_PAIRS && cols <= PANEL && ld >= count);
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        if count == STEP_PAIRS && rows.len() >= (PANEL - 1) * ld + STEP_PAIRS {
            // SAFETY: the level has AVX-512F; row `l < 16` of the result is `rows[l·ld ..
            // l·ld + 16]`, inside `rows` (checked).
            unsafe { crate::bf16::avx512bf16::transpose16(block, rows.as_mut_ptr(), ld) };
            return;
        }
        let mut tile = [0.0f32; STEP_PAIRS * PANEL];
        // SAFETY: as above, into the 16 rows of 16 words of `tile`.
        unsafe { crate::bf16::avx512bf16::transpose16(block, tile.as_mut_ptr(), STEP_PAIRS) };
        for (l, words) in tile.chunks_exact(STEP_PAIRS).take(cols).enumerate() {
            rows[l * ld..l * ld + count].copy_from_slice(&words[..count]);
        }
        return;
    }
    columns_into_rows_scalar(block, [count, cols], rows, ld);
}

/// [`columns_into_rows`] one word at a time.
fn columns_into_rows_scalar(
    block: &[[f32; PANEL]; STEP_PAIRS],
    [count, cols]: [usize; 2],
    rows: &mut [f32],
    ld: usize,
) {
    for (q, words) in block[..count].iter().enumerate() {
        for (l, &word) in words.iter().enumerate().take(cols) {
            rows[l * ld + q] = word;
        }
    }
}

/// Row `j` of `src: [n, width]` at columns `c0..c0 + 16`: in place, a copy of a ragged end (of
/// `cols` columns) into `buf`, or zeros past `n`.
fn row<'a>(src: &'a [f32], j: usize, [n, width, c0, cols]: [usize; 4], buf: &'a mut [f32; PANEL]) -> &'a [f32] {
    if j >= n {
        return &[0.0; PANEL];
    }
    if cols == PANEL {
        return &src[j * width + c0..j * width + c0 + PANEL];
    }
    buf[..cols].copy_from_slice(&src[j * width + c0..j * width + c0 + cols]);
    &buf[..]
}

/// `src: [n, width]` rounded to bf16 as pairs of rows along `n` (a zero row after an odd `n`),
/// laid out by `layout`, with every word of the layout written (zeros in its padding).
///
/// One task per 16 pairs (32 rows of `src`), which writes into every panel's share: reading
/// a column strip down all the rows instead (a panel per task) strided across pages and
/// stalled on most loads. In panels (padded or not) at the AVX512-BF16 level the task goes a
/// pair of rows at a time across all the columns (`interleave_across`: two read streams, 1.7–2.5×
/// a panel at a time from memory, `examples/pack_speed.rs`); otherwise a panel at a time down
/// its 32 rows ([`interleave_rows`]), the AMX tiles through [`columns_into_rows`].
/// [`Bf16Panels::pack`] packs a dense operand here too.
pub(crate) fn pack_pairs(dst: &mut [f32], src: &[f32], [n, width]: [usize; 2], layout: Layout, par: Par) {
    let pairs = n.div_ceil(2);
    let panels = width.div_ceil(PANEL);
    let chunk = match layout {
        Layout::Panels => pairs * PANEL,
        Layout::PaddedPanels(stride) => stride * PANEL,
        Layout::Tiles(steps) => steps * STEP_PAIRS * PANEL,
    };
    let groups = pairs.div_ceil(STEP_PAIRS);
    if let Layout::Tiles(steps) = layout {
        assert_eq!(steps, groups, "A tiles of whole steps, no more");
    }
    if let Layout::PaddedPanels(stride) = layout {
        assert!(stride >= pairs);
    }
    let dst = &mut dst[..panels * chunk];
    if let Layout::PaddedPanels(stride) = layout {
        // The padding pairs up to each panel's whole steps, read by the AMX kernel.
        dst.chunks_exact_mut(chunk)
            .for_each(|panel| panel[pairs * PANEL..stride * PANEL].fill(0.0));
    }
    let out = SharedMut(dst.as_mut_ptr());
    let group = |g: usize| {
        let p0 = g * STEP_PAIRS;
        let count = (pairs - p0).min(STEP_PAIRS);
        #[cfg(target_arch = "x86_64")]
        if !matches!(layout, Layout::Tiles(_)) && crate::bf16_level().has_avx512bf16() {
            // SAFETY: the level was detected; the task writes pairs `p0 .. p0 + count` of every
            // panel, `chunk` words apart inside `dst` (which holds `panels` of them), and no
            // other task writes those words.
            unsafe { crate::bf16::avx512bf16::interleave_across(src, [n, width], p0, count, out.get(), chunk) };
            return;
        }
        // The A tile's staging block (only `Layout::Tiles` uses it).
        let mut block = [[0.0f32; PANEL]; STEP_PAIRS];
        for panel in 0..panels {
            let (c0, base) = (panel * PANEL, panel * chunk);
            let cols = (width - c0).min(PANEL);
            let at = [n, width, c0, cols];
            // SAFETY: `base + chunk <= dst.len()`; within a panel, this task alone writes the
            // words of pairs `p0 .. p0 + count` (the tile of group `g`, or those pairs' words
            // of each column), so no two tasks write the same word.
            unsafe {
                let panel_words = std::slice::from_raw_parts_mut(out.get().add(base), chunk);
                match layout {
                    Layout::Tiles(_) => {
                        interleave_rows(src, at, p0, count, block.as_flattened_mut());
                        // Zeros past the pairs; columns past `cols` are zeros already.
                        block[count..].iter_mut().for_each(|words| words.fill(0.0));
                        let tile = STEP_PAIRS * PANEL;
                        let tile_words = &mut panel_words[g * tile..(g + 1) * tile];
                        columns_into_rows(&block, [STEP_PAIRS, PANEL], tile_words, STEP_PAIRS);
                    }
                    Layout::Panels | Layout::PaddedPanels(_) => {
                        interleave_rows(src, at, p0, count, &mut panel_words[p0 * PANEL..(p0 + count) * PANEL])
                    }
                }
            }
        }
    };
    match par {
        Par::Seq => (0..groups).for_each(group),
        Par::Rayon => (0..groups).into_par_iter().for_each(group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    const U: f64 = 1.0 / 256.0;

    /// `dx` and `dW` against f64 sums of the rounded operands, within f32's summation error
    /// (`K·2^-24` of `Σ|a·b|`), and against the exact f32 operands within bf16's bound
    /// `(2u + u²)·Σ|a·b|` on top; `db` as the f32 backward gives it; the same bits on 1, 2, 3
    /// and 8 threads as sequentially. Shapes with odd and ragged sizes.
    #[test]
    fn linear_backward_bf16_matches_its_bound() {
        let r = |v: f32| round_to_bf16(v) as f64;
        for (n, in_dim, out_dim) in [(1, 1, 1), (7, 5, 3), (33, 17, 40), (100, 64, 48), (257, 96, 130)] {
            let sh = LinearShape { n, in_dim, out_dim };
            let (dy, x, w) = (
                random_vec(n * out_dim, 1),
                random_vec(n * in_dim, 2),
                random_vec(out_dim * in_dim, 3),
            );
            let packed = Bf16Panels::pack(View2::contiguous(&w, [out_dim, in_dim]).unwrap());
            let dw0 = random_vec(out_dim * in_dim, 4);
            let run = |par: Par| {
                let (mut dx, mut dw, mut db) = (vec![f32::NAN; n * in_dim], dw0.clone(), vec![0.5f32; out_dim]);
                linear_backward_bf16(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &packed, sh, par).unwrap();
                (dx, dw, db)
            };
            let (dx, dw, db) = run(Par::Seq);
            for threads in [1, 2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let threaded = pool.install(|| run(Par::Rayon));
                assert_eq!(
                    (&dx, &dw, &db),
                    (&threaded.0, &threaded.1, &threaded.2),
                    "{threads} threads"
                );
            }
            let check = |got: f32, terms: &mut dyn Iterator<Item = (f64, f64)>, base: f64, depth: usize, what: &str| {
                let (mut exact, mut rounded, mut mass) = (base, base, base.abs());
                for (a, b) in terms {
                    exact += a * b;
                    rounded += r(a as f32) * r(b as f32);
                    mass += (a * b).abs();
                }
                let gamma = (depth as f64 + 2.0) * f32::EPSILON as f64;
                let to_rounded = (got as f64 - rounded).abs();
                assert!(
                    to_rounded <= gamma * mass * 1.1 + 1e-30,
                    "{what}: {got} vs rounded {rounded}"
                );
                let to_exact = (got as f64 - exact).abs();
                assert!(
                    to_exact <= (2.0 * U + U * U + gamma) * mass * 1.1 + 1e-30,
                    "{what}: {got} vs {exact}"
                );
            };
            for i in 0..n {
                for c in 0..in_dim {
                    let mut terms = (0..out_dim).map(|o| (dy[i * out_dim + o] as f64, w[o * in_dim + c] as f64));
                    check(
                        dx[i * in_dim + c],
                        &mut terms,
                        0.0,
                        out_dim,
                        &format!("dx[{i}, {c}] of {sh:?}"),
                    );
                }
            }
            for o in 0..out_dim {
                for c in 0..in_dim {
                    let mut terms = (0..n).map(|i| (dy[i * out_dim + o] as f64, x[i * in_dim + c] as f64));
                    let base = dw0[o * in_dim + c] as f64;
                    check(
                        dw[o * in_dim + c],
                        &mut terms,
                        base,
                        n,
                        &format!("dW[{o}, {c}] of {sh:?}"),
                    );
                }
                let want: f64 = 0.5 + (0..n).map(|i| dy[i * out_dim + o] as f64).sum::<f64>();
                assert!((db[o] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "db[{o}]");
            }
        }
    }

    /// The weight gradient by every route this CPU runs (the f32 fallback, widened, `vdpbf16ps`, AMX)
    /// against f64 sums of the rounded operands, within f32's summation error: ragged tile
    /// rows and columns and depths that are not whole AMX steps, accumulating into a start.
    #[test]
    fn weight_gradient_matches_its_bound_at_every_level() {
        let r = |v: f32| round_to_bf16(v) as f64;
        for route in crate::bf16::available_routes() {
            for (n, in_dim, out_dim) in [(1, 1, 1), (33, 17, 40), (100, 64, 48), (257, 96, 130)] {
                let sh = LinearShape { n, in_dim, out_dim };
                let (dy, x) = (random_vec(n * out_dim, 5), random_vec(n * in_dim, 6));
                let mut dw = random_vec(out_dim * in_dim, 7);
                let start = dw.clone();
                weight_gradient(route, &mut dw, &dy, &x, sh, Par::Rayon).unwrap();
                for o in 0..out_dim {
                    for c in 0..in_dim {
                        let base = start[o * in_dim + c] as f64;
                        let (mut rounded, mut mass) = (base, base.abs());
                        for i in 0..n {
                            let (a, b) = (dy[i * out_dim + o], x[i * in_dim + c]);
                            rounded += r(a) * r(b);
                            mass += (r(a) * r(b)).abs();
                        }
                        let bound = (n as f64 + 2.0) * f32::EPSILON as f64 * mass;
                        let err = (dw[o * in_dim + c] as f64 - rounded).abs();
                        assert!(err <= bound, "{route} {sh:?} dW[{o}, {c}]: {err:e} > {bound:e}");
                    }
                }
            }
        }
    }

    /// The widened weight gradient is attn's own f32 GEMM of `dyᵀ` and `x` rounded to bf16:
    /// the same bits, on one and several threads, over several depth blocks (384 tokens) and
    /// ragged panels, with values the rounding changes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_widened_weight_gradient_is_the_f32_gemm_of_the_rounded_values() {
        use crate::gemm::avx512::{gemm, LhsValues, Operand, Rhs, Start};
        if crate::simd::detect() != crate::SimdLevel::Avx512 {
            eprintln!("note: no AVX-512 on this CPU; the widened weight gradient is not checked");
            return;
        }
        for (n, in_dim, out_dim) in [(1, 1, 1), (33, 17, 40), (800, 70, 300)] {
            let sh = LinearShape { n, in_dim, out_dim };
            let (mut dy, mut x) = (random_vec(n * out_dim, 8), random_vec(n * in_dim, 9));
            dy[0] = 1e-39;
            x[n * in_dim - 1] = f32::from_bits(0x3F80_8000);
            let (dy_r, x_r): (Vec<f32>, Vec<f32>) = (
                dy.iter().map(|&v| round_to_bf16(v)).collect(),
                x.iter().map(|&v| round_to_bf16(v)).collect(),
            );
            let start = random_vec(out_dim * in_dim, 10);
            let mut want = start.clone();
            // SAFETY: AVX-512 F was detected; `dyᵀ` is `[out, n]` at strides `[1, out]`, `x`
            // `[n, in]`, `want` `[out, in]`.
            unsafe {
                gemm(
                    want.as_mut_ptr(),
                    in_dim,
                    [out_dim, in_dim, n],
                    Start::Dst,
                    (
                        Operand {
                            ptr: dy_r.as_ptr(),
                            rs: 1,
                            cs: out_dim,
                        },
                        LhsValues::F32,
                    ),
                    Rhs::F32(Operand {
                        ptr: x_r.as_ptr(),
                        rs: in_dim,
                        cs: 1,
                    }),
                    1.0,
                    Par::Seq,
                )
            };
            for par in [Par::Seq, Par::Rayon] {
                let mut dw = start.clone();
                weight_gradient(Route::Widened, &mut dw, &dy, &x, sh, par).unwrap();
                let same = dw.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{sh:?} {par:?}");
            }
        }
    }

    /// `dyᵀ`'s rows (and AMX A tiles: the whole block at `ld` 16) from a block of pairs: whole
    /// and partial blocks, ragged columns, into rows wider than the block, give the words written one at a time, and leave every other word
    /// (another task's) as it was.
    #[test]
    fn columns_into_rows_is_the_transpose_and_writes_nothing_else() {
        let block: [[f32; PANEL]; STEP_PAIRS] =
            std::array::from_fn(|q| std::array::from_fn(|l| f32::from_bits((q * 100 + l) as u32 + 1)));
        for (count, cols, ld, offset) in [
            (16, 16, 16, 0),
            (16, 16, 40, 24),
            (16, 5, 33, 1),
            (7, 16, 23, 16),
            (1, 3, 17, 16),
        ] {
            let len = offset + 15 * ld + count;
            let mut got = vec![f32::from_bits(7); len];
            let mut want = got.clone();
            columns_into_rows(&block, [count, cols], &mut got[offset..], ld);
            columns_into_rows_scalar(&block, [count, cols], &mut want[offset..], ld);
            for l in 0..PANEL {
                for q in 0..ld.min(len - offset - l * ld) {
                    let i = offset + l * ld + q;
                    if l < cols && q < count {
                        assert_eq!(want[i].to_bits(), (q * 100 + l) as u32 + 1);
                    } else if count < STEP_PAIRS || l < cols || q >= STEP_PAIRS {
                        // Outside the block's words: untouched (a whole block may fill the
                        // padding rows past `cols`, never another pair's words).
                        assert_eq!(got[i].to_bits(), 7, "count {count} cols {cols}: word {l}, {q}");
                    }
                }
            }
            assert!(got[..offset].iter().all(|v| v.to_bits() == 7), "before the rows");
            let same = |i: usize| got[i].to_bits() == want[i].to_bits();
            for l in 0..cols {
                for q in 0..count {
                    assert!(same(offset + l * ld + q), "count {count} cols {cols}: word {l}, {q}");
                }
            }
        }
    }

    /// Every word the kernels read is written, the padding with zeros: packing into buffers
    /// full of NaN (the kernel crate's pool for AMX, the training arena for `vdpbf16ps`) gives
    /// the weight gradient of packing into fresh ones. Odd `n`, a ragged last panel of `dyᵀ`'s
    /// rows and of `x`'s columns, and a last group of fewer than 16 pairs.
    #[test]
    fn weight_gradient_reads_no_word_it_did_not_write() {
        let routes: Vec<Route> = crate::bf16::available_routes()
            .into_iter()
            .filter(|r| matches!(r, Route::Amx | Route::Dpbf16))
            .collect();
        if routes.is_empty() {
            eprintln!("note: no AMX or AVX512-BF16 here; their packings are not checked");
        }
        for route in routes {
            for (n, in_dim, out_dim) in [(37, 21, 19), (601, 70, 100)] {
                let sh = LinearShape { n, in_dim, out_dim };
                let (dy, x) = (random_vec(n * out_dim, 1), random_vec(n * in_dim, 2));
                let run = || {
                    let mut dw = vec![0.0f32; out_dim * in_dim];
                    weight_gradient(route, &mut dw, &dy, &x, sh, Par::Seq).unwrap();
                    dw
                };
                crate::arena::clear();
                let clean = run();
                // Dirty both pools: the next packings reuse these buffers as they are.
                let dirty: Vec<_> = (0..8)
                    .map(|_| {
                        let mut b = crate::buffer::take(4096);
                        b.fill(f32::NAN);
                        b
                    })
                    .collect();
                dirty.into_iter().for_each(crate::buffer::give);
                let pairs = n.div_ceil(2);
                for len in [
                    out_dim.div_ceil(PANEL) * PANEL * pairs,
                    in_dim.div_ceil(PANEL) * PANEL * pairs,
                ] {
                    crate::arena::give(vec![f32::NAN; len]);
                }
                let again = run();
                assert!(
                    again.iter().all(|v| v.is_finite()),
                    "{route} {sh:?}: padding left unwritten"
                );
                assert_eq!(clean, again, "{route} {sh:?}");
                crate::arena::clear();
            }
        }
    }

    /// `pack_pairs` into `Bf16Panels`' layout gives the words of `Bf16Panels::pack` (a separate
    /// packing, panel by panel) for each panel's pairs, and writes nothing past them: odd `n`,
    /// a ragged last panel, a last group of fewer than 16 pairs, sequential and on threads.
    #[test]
    fn pack_pairs_into_panels_gives_the_words_of_bf16_panels() {
        for (n, width) in [(1, 1), (37, 21), (64, 32), (601, 70)] {
            let src = random_vec(n * width, 9);
            let (pairs, panels) = (n.div_ceil(2), width.div_ceil(PANEL));
            // The reference from the generic route (a strided view), not from `pack_pairs`.
            let wide: Vec<f32> = src.iter().flat_map(|&x| [x, f32::NAN]).collect();
            let want = Bf16Panels::pack(View2::new(&wide, [n, width], [2 * width, 2]).unwrap());
            let want = want.words();
            let stride = crate::bf16::padded_pairs(n) * PANEL;
            for par in [Par::Seq, Par::Rayon] {
                let mut padded = vec![f32::NAN; panels * stride + 5];
                pack_pairs(&mut padded, &src, [n, width], Layout::PaddedPanels(stride / PANEL), par);
                assert_eq!(
                    bytemuck_words(&padded[..panels * stride]),
                    want,
                    "[{n}, {width}] padded"
                );
                assert!(
                    padded[panels * stride..].iter().all(|v| v.is_nan()),
                    "[{n}, {width}]: padded, wrote past"
                );
                let mut got = vec![f32::NAN; panels * pairs * PANEL + 5];
                pack_pairs(&mut got, &src, [n, width], Layout::Panels, par);
                for j in 0..panels {
                    let got = bytemuck_words(&got[j * pairs * PANEL..(j + 1) * pairs * PANEL]);
                    assert_eq!(
                        got,
                        &want[j * stride..j * stride + pairs * PANEL],
                        "[{n}, {width}] panel {j}"
                    );
                }
                assert!(
                    got[panels * pairs * PANEL..].iter().all(|v| v.is_nan()),
                    "[{n}, {width}]: wrote past the panels"
                );
            }
        }
    }

    #[test]
    fn linear_backward_bf16_checks_shapes() {
        let w = vec![0.0f32; 6];
        let packed = Bf16Panels::pack(View2::contiguous(&w, [2, 3]).unwrap());
        let sh = LinearShape {
            n: 1,
            in_dim: 2,
            out_dim: 3,
        };
        let err =
            linear_backward_bf16(None, &mut [0.0; 6], None, &[0.0; 3], &[0.0; 2], &packed, sh, Par::Seq).unwrap_err();
        assert!(err.to_string().contains("w_packed"), "{err}");
    }
}
