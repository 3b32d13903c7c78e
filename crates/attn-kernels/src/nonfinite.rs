//! What a non-finite input may reach, and the repair that makes every path keep to it.
//!
//! # The policy
//! Key `t` is *visible* to query row `(b, h, s)` unless a boolean mask, a `-inf` additive mask
//! value, the causal limit or the batch's key length hides it (and a score of `-inf` from any
//! other source removes the key the same way). Then, on every path:
//! - a row with no visible key is zeros (`lse = -inf`), whatever its inputs hold;
//! - a NaN in `q[b, h, s]`, or in a visible key `k[b, g, t]`, or a visible score of `+inf` or NaN
//!   (an overflowing `q·k`, a `+inf` additive mask), makes the whole row NaN, as its softmax is;
//! - a NaN or `±inf` in a visible value `v[b, g, t, c]` makes `out[b, h, s, c]` non-finite, and
//!   nothing else;
//! - a non-finite value in a key or value that a row cannot see never reaches that row.
//!
//! PyTorch's math path breaks the last rule: `p·v` with `p = 0` for a masked key multiplies
//! `0·NaN = NaN`, so one NaN in a padded position can spoil every row of the batch, while its
//! fused kernels may skip the block and not. Masking with `-inf` alone cannot prevent it: the
//! products happen inside the `p·v` GEMM.
//!
//! # How the fast paths keep to it
//! The score side is exact by construction: masks replace a score by `-inf` (never add to a NaN
//! score). The value side is repaired after the fact, so clean inputs pay only a finiteness test
//! of each output row: when a row comes out non-finite although its softmax was finite (so its
//! scores were clean), [`repair_values`] runs the same path again on a copy of `v` whose
//! non-finite entries are zero, keeps that result for every row that the first run spoiled, and
//! adds back each visible non-finite value as `p·v`. Rows and columns that no non-finite value
//! may reach are bit-identical to a call whose non-finite values were zeros.

use crate::mask::mask_row;
use crate::{AttentionOptions, KernelError, View4, ViewMut, ViewMut4};

/// Whether `out` row `[b, h, s]` must be repaired: written non-finite while its softmax
/// (running max `m` and sum `l`) was finite and not empty.
#[inline]
pub(crate) fn spoiled(m: f32, l: f32, row_has_non_finite: bool) -> bool {
    row_has_non_finite && l > 0.0 && l.is_finite() && m.is_finite()
}

/// The non-finite entries of one key/value row: `(b, g, t)` and its `(column, value)`s.
struct BadRow {
    bgt: [usize; 3],
    entries: Vec<(usize, f32)>,
}

/// Repairs the rows of `out` that a non-finite value of a key they cannot see reached through
/// `0·v` (see the module docs). `rerun(out, lse, v)` runs the same path with the same `q`, `k`,
/// options and parallelism, without repair.
pub(crate) fn repair_values(
    out: &mut ViewMut4<'_, f32>,
    q: &View4<'_, f32>,
    k: &View4<'_, f32>,
    v: &View4<'_, f32>,
    options: &AttentionOptions<'_>,
    scale: f32,
    rerun: impl FnOnce(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>, View4<'_, f32>) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let [b_n, h_n, s_n, d] = q.shape();
    let [_, g_n, t_n, dv] = v.shape();
    let rep = h_n / g_n;
    // The values with their non-finite entries zeroed, and where those entries were.
    let mut clean = vec![0.0f32; b_n * g_n * t_n * dv];
    let mut bad: Vec<BadRow> = Vec::new();
    for (i, row) in clean.chunks_mut(dv.max(1)).enumerate().take(b_n * g_n * t_n) {
        let (b, g, t) = (i / (g_n * t_n), i / t_n % g_n, i % t_n);
        let mut entries = Vec::new();
        for (c, x) in row.iter_mut().enumerate() {
            let value = v.get([b, g, t, c]);
            if value.is_finite() {
                *x = value;
            } else {
                entries.push((c, value));
            }
        }
        if !entries.is_empty() {
            bad.push(BadRow {
                bgt: [b, g, t],
                entries,
            });
        }
    }
    if bad.is_empty() {
        // The non-finite output came from finite values (an overflowing sum): nothing to repair.
        return Ok(());
    }
    let mut fixed = vec![0.0f32; b_n * h_n * s_n * dv];
    let mut lse = vec![0.0f32; b_n * h_n * s_n];
    rerun(
        ViewMut4::contiguous(&mut fixed, [b_n, h_n, s_n, dv])?,
        ViewMut::contiguous(&mut lse, [b_n, h_n, s_n])?,
        View4::contiguous(&clean, [b_n, g_n, t_n, dv])?,
    )?;
    let out_st = out.strides();
    let out_data = out.data_mut();
    let at = |[b, h, s]: [usize; 3], c: usize| b * out_st[0] + h * out_st[1] + s * out_st[2] + c * out_st[3];
    let mut score = [0.0f32];
    for b in 0..b_n {
        let key_length = options.key_lengths.map_or(t_n, |l| l[b]);
        for h in 0..h_n {
            let g = h / rep;
            // `bad` is in (b, g, t) order: this group's rows are one slice of it.
            let from = bad.partition_point(|r| r.bgt[..2] < [b, g][..]);
            let to = bad.partition_point(|r| r.bgt[..2] <= [b, g][..]);
            let bad_keys = &bad[from..to];
            for s in 0..s_n {
                let row = (b * h_n + h) * s_n + s;
                let fixed_row = &fixed[row * dv..(row + 1) * dv];
                let spoilt = (0..dv).any(|c| !out_data[at([b, h, s], c)].is_finite());
                // A row that is still non-finite on clean values was spoilt by its scores (or by
                // an overflowing sum): it stays as the first run wrote it.
                if !spoilt || !fixed_row.iter().all(|x| x.is_finite()) {
                    continue;
                }
                for (c, &x) in fixed_row.iter().enumerate() {
                    out_data[at([b, h, s], c)] = x;
                }
                let limit = options.causal.key_limit(s, s_n, t_n).min(key_length);
                for bad_row in bad_keys {
                    let t = bad_row.bgt[2];
                    // Visible? A zero score through the row's masks tells, without a dot product.
                    score[0] = 0.0;
                    mask_row(&mut score, options, [b, h, s], t, limit, [s_n, t_n]);
                    if score[0] == f32::NEG_INFINITY {
                        continue;
                    }
                    let dot: f64 = (0..d)
                        .map(|j| q.get([b, h, s, j]) as f64 * k.get([b, g, t, j]) as f64)
                        .sum();
                    score[0] = (dot * scale as f64) as f32;
                    mask_row(&mut score, options, [b, h, s], t, limit, [s_n, t_n]);
                    let p = ((score[0] as f64) - lse[row] as f64).exp() as f32;
                    for &(c, value) in &bad_row.entries {
                        out_data[at([b, h, s], c)] += p * value;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::testing::random_vec;
    use crate::{broadcast_to, AttentionOptions, ForwardInputs, Mask, Par, View4, ViewMut4};

    /// The repair is load-bearing: with it switched off, a NaN in the value row of a key that
    /// the mask hides reaches the visible rows through `0·NaN` in the `p·v` product, on the flash
    /// path (a key block mixing visible and hidden keys) and on the unfused path; with it on, no
    /// output is touched. (The poison tests in `tests/nonfinite.rs` check the policy in full.)
    #[test]
    fn without_the_repair_a_hidden_value_poisons_visible_rows() {
        let (s, t, d) = (3, 130, 8);
        let q = random_vec(s * d, 1);
        let k = random_vec(t * d, 2);
        let mut v = random_vec(t * d, 3);
        v[5 * d + 2] = f32::NAN; // key 5, hidden from every row
        let allowed: Vec<bool> = (0..t).map(|j| j != 5).collect();
        let options = AttentionOptions {
            mask: Mask::Allowed(broadcast_to(&allowed, &[t], [1, 1, s, t]).unwrap()),
            ..Default::default()
        };
        let (qv, kv, vv) = (
            View4::contiguous(&q, [1, 1, s, d]).unwrap(),
            View4::contiguous(&k, [1, 1, t, d]).unwrap(),
            View4::contiguous(&v, [1, 1, t, d]).unwrap(),
        );
        for path in ["flash", "unfused"] {
            let run = |repair: bool| {
                let mut out = vec![0.0f32; s * d];
                let o = ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap();
                let inputs = ForwardInputs::new(qv, kv, vv);
                if path == "flash" {
                    crate::flash::flash_impl(o, [None, None], inputs, &options, Par::Seq, repair, None)
                } else {
                    crate::softmax::unfused_impl(o, [None, None], inputs, &options, Par::Seq, repair)
                }
                .unwrap();
                out
            };
            let (without, with) = (run(false), run(true));
            assert!(
                without.iter().any(|x| x.is_nan()),
                "{path}: without the repair the hidden NaN should reach a row: {without:?}"
            );
            assert!(with.iter().all(|x| x.is_finite()), "{path}: {with:?}");
        }
    }
}
