//! The backward kernels of the layers around attention, and the pieces of a training step that
//! are kernels: linear maps, layer and RMS norms, activations, embedding lookup, softmax
//! cross-entropy with `ignore_index` and label smoothing, and dropout with a counter-based RNG.
//!
//! Conventions, as in llm.c: a backward takes what its forward kept (the forward's input, and
//! for the norms nothing more: their statistics are recomputed from the input in f64) and the
//! gradient of its output; parameter gradients are **added** to (`+=`), so a caller can sum
//! over micro-batches; input gradients are written unless the function says otherwise.
//!
//! Determinism: every sum over rows (bias, norm weights, embedding rows) is cut by shape, into
//! fixed chunks of rows reduced in chunk order, never by thread; results are bit-identical
//! whatever the thread count. The GEMMs are faer's, which splits output tiles across threads and
//! never the depth, so each output element is summed in one order.

use rayon::prelude::*;

use crate::error::{check_len, check_optional_lens};
use crate::gemm::gemm_raw;
use crate::layer::{erf, Activation};
use crate::{Accum, KernelError, Par};

/// Runs `f(args)`, an `#[inline(always)]` loop, compiled for the running SIMD level: the
/// compiler vectorises the same source at AVX-512, AVX2+FMA or the baseline. The closure is
/// `#[inline(always)]` too: a closure left out of line is compiled for the baseline, whatever
/// `level` enables (norm_backward's rows ran at SSE2 that way).
macro_rules! at_level {
    // `f(args)` in a function compiled with `$features`, which the caller's level has.
    (@on $features:literal, $f:ident($($arg:expr),*)) => {{
        #[target_feature(enable = $features)]
        fn level(f: impl FnOnce()) {
            f()
        }
        // SAFETY: `simd_level` reported a level with these features on this CPU.
        unsafe { level(#[inline(always)] || $f($($arg),*)) }
    }};
    ($f:ident($($arg:expr),*)) => {{
        match crate::simd::simd_level() {
            #[cfg(target_arch = "x86_64")]
            crate::SimdLevel::Avx512 => at_level!(@on "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma", $f($($arg),*)),
            #[cfg(target_arch = "x86_64")]
            crate::SimdLevel::Avx2Fma => at_level!(@on "avx2,fma", $f($($arg),*)),
            _ => $f($($arg),*),
        }
    }};
}

mod dropout;
mod norm;
pub use dropout::{dropout, dropout_uniform};
pub use norm::norm_backward;

/// Rows per chunk of the column sums (bias and norm-weight gradients).
const SUM_ROWS: usize = 64;

/// `dst[c] += Σ_n rows[n·width + c]`, summed in chunks of [`SUM_ROWS`] rows in f64, the chunks
/// added in order: the same bits whatever the thread count.
pub(crate) fn add_column_sums(dst: &mut [f32], rows: &[f32], width: usize, par: Par) {
    let chunk_sums = |chunk: &[f32]| {
        let mut sums = vec![0.0f64; width];
        at_level!(add_rows(&mut sums, chunk, width));
        sums
    };
    let partials: Vec<Vec<f64>> = match par {
        Par::Seq => rows.chunks(SUM_ROWS * width).map(chunk_sums).collect(),
        Par::Rayon => rows.par_chunks(SUM_ROWS * width).map(chunk_sums).collect(),
    };
    let mut total = vec![0.0f64; width];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, &x)| *t += x);
    }
    dst.iter_mut().zip(&total).for_each(|(d, &t)| *d += t as f32);
}

/// `sums[c] += rows[n·width + c]` for each row `n` in order, in f64: each column a lane, so
/// every SIMD level gives the same bits (compiled at the caller's level by [`at_level!`]).
#[inline(always)]
fn add_rows(sums: &mut [f64], rows: &[f32], width: usize) {
    for row in rows.chunks_exact(width) {
        sums.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
    }
}

/// Lanes of [`sum_of_squares`]: four zmm of f64, so that the additions of one lane wait on
/// nothing else and four chains hide the adder's latency.
const SQUARE_LANES: usize = 32;

/// `Σ x²` in f64, as 32 partial sums (element `i` into lane `i % 32`, each lane in
/// element order) added in lane order: the same bits at every SIMD level, one chain of
/// additions per lane instead of one for the whole slice (which ran at an element per four
/// cycles). The gradient norm of clipping (`attn_core::clip_grad_norm`).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; SQUARE_LANES];
    at_level!(add_squares(&mut lanes, x));
    lanes.iter().sum()
}

/// `lanes[i % 32] += x[i]²` for every `i`, in order (compiled at the caller's level by
/// [`at_level!`]).
#[inline(always)]
fn add_squares(lanes: &mut [f64; SQUARE_LANES], x: &[f32]) {
    let chunks = x.chunks_exact(SQUARE_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(s, &v)| *s += v as f64 * v as f64);
    }
    lanes.iter_mut().zip(tail).for_each(|(s, &v)| *s += v as f64 * v as f64);
}

/// The constants of one AdamW step (`torch.optim.AdamW`, single-tensor), for [`adamw_update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// β1.
    pub b1: f32,
    /// β2.
    pub b2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// `√(1 − β2^t)`.
    pub bias2_sqrt: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `1 − lr·weight_decay`.
    pub decay: f32,
}

/// One AdamW step over `x` with gradient `g` and moments `m`, `v` (equal lengths), element by
/// element, in PyTorch's order: `x ← x·decay`; `m ← m + (1 − β1)(g − m)`;
/// `v ← v·β2 + (1 − β2)·g·g`; `x ← x − step_size · m / (√v / bias2_sqrt + eps)`.
///
/// Compiled at the running SIMD level (the `at_level!` of the norms and clipping) with no
/// fused multiply-adds: square root and division are correctly rounded at every width, so
/// every level gives the bits of the scalar formula. Left to the baseline (SSE2, four
/// lanes), the optimizer of a mixed-precision step of 22 M parameters took 51–55 ms with the
/// bf16 packing after it, 24–27 ms compiled at AVX-512 (2 threads, a Zen 4 EPYC; `attn bench
/// train --d-model 512`, `optimizer_median_s`).
pub fn adamw_update(c: AdamWStep, x: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<(), KernelError> {
    let op = "adamw_update";
    check_len(op, "g", x.len(), g.len())?;
    check_len(op, "m", x.len(), m.len())?;
    check_len(op, "v", x.len(), v.len())?;
    at_level!(adamw_rows(c, x, g, m, v));
    Ok(())
}

/// [`adamw_update`]'s loop (compiled at the caller's level by [`at_level!`]).
#[inline(always)]
fn adamw_rows(c: AdamWStep, x: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let AdamWStep {
        b1,
        b2,
        eps,
        bias2_sqrt,
        step_size,
        decay,
    } = c;
    for (((x, &g), m), v) in x.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *x *= decay;
        *m += (1.0 - b1) * (g - *m);
        *v = *v * b2 + (1.0 - b2) * g * g;
        let denom = v.sqrt() / bias2_sqrt + eps;
        *x -= step_size * (*m / denom);
    }
}

/// The shapes of a linear map `y = x·Wᵀ + b`: `x: [n, in_dim]`, `w: [out_dim, in_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    /// Rows (tokens).
    pub n: usize,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

/// The backward of `y = x·Wᵀ + b`: `dx = dy·W` (written, when asked for), `dW += dyᵀ·x`,
/// `db += Σ_n dy[n]` (when the map has a bias). `dy: [n, out]`, `x: [n, in]`, `w: [out, in]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    sh: LinearShape,
    par: Par,
) -> Result<(), KernelError> {
    let op = "linear_backward";
    let LinearShape { n, in_dim, out_dim } = sh;
    check_len(op, "dy", n * out_dim, dy.len())?;
    check_len(op, "x", n * in_dim, x.len())?;
    check_len(op, "w", out_dim * in_dim, w.len())?;
    check_len(op, "dw", out_dim * in_dim, dw.len())?;
    check_optional_lens(op, [("dx", n * in_dim, dx.as_deref()), ("db", out_dim, db.as_deref())])?;
    if let Some(dx) = dx.filter(|dx| !dx.is_empty()) {
        if out_dim == 0 {
            // A sum over no outputs.
            dx.fill(0.0);
        } else {
            // SAFETY: `dx` [n, in], `dy` [n, out], `w` [out, in], lengths checked above.
            unsafe {
                gemm_raw(
                    dx.as_mut_ptr(),
                    [in_dim, 1],
                    [n, in_dim, out_dim],
                    Accum::Replace,
                    dy.as_ptr(),
                    [out_dim, 1],
                    w.as_ptr(),
                    [in_dim, 1],
                    1.0,
                    par,
                )
            };
        }
    }
    if n > 0 && in_dim > 0 && out_dim > 0 {
        // SAFETY: `dw` [out, in], `dy` read as [out, n] (transposed), `x` [n, in]; lengths
        // checked.
        unsafe {
            gemm_raw(
                dw.as_mut_ptr(),
                [in_dim, 1],
                [out_dim, in_dim, n],
                Accum::Add,
                dy.as_ptr(),
                [1, out_dim],
                x.as_ptr(),
                [in_dim, 1],
                1.0,
                par,
            )
        };
    }
    if let Some(db) = db.filter(|_| n > 0 && out_dim > 0) {
        add_column_sums(db, dy, out_dim, par);
    }
    Ok(())
}

/// `act'(u)`, the derivative at the activation's input.
#[inline(always)]
fn derivative(u: f32, act: Activation) -> f32 {
    match act {
        Activation::Identity => 1.0,
        // PyTorch's: 0 at u = 0.
        Activation::Relu => {
            if u > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            // Φ(u) + u·φ(u).
            let cdf = 0.5 * (1.0 + erf(u * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * u * u).exp() * 0.398_942_3;
            cdf + u * pdf
        }
        Activation::GeluTanh => {
            let c = 0.797_884_6f32;
            let inner = c * (u + 0.044_715 * u * u * u);
            let t = inner.tanh();
            0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * u * u)
        }
    }
}

/// The backward of `y = act(u)`: `du = dy · act'(u)` (written). `u` is the activation's input
/// (the linear map's output plus its bias), which the training forward keeps.
pub fn activation_backward(
    du: &mut [f32],
    dy: &[f32],
    u: &[f32],
    act: Activation,
    par: Par,
) -> Result<(), KernelError> {
    let op = "activation_backward";
    check_len(op, "dy", du.len(), dy.len())?;
    check_len(op, "u", du.len(), u.len())?;
    let body = |(d, (g, x)): (&mut [f32], (&[f32], &[f32]))| {
        // The chunk's gradient copied, then scaled in place while in cache: the same products.
        d.copy_from_slice(g);
        at_level!(activation_backward_in_place_run(d, x, act));
    };
    let n = 16 * 1024;
    match par {
        Par::Seq => du.chunks_mut(n).zip(dy.chunks(n).zip(u.chunks(n))).for_each(body),
        Par::Rayon => du
            .par_chunks_mut(n)
            .zip(dy.par_chunks(n).zip(u.par_chunks(n)))
            .for_each(body),
    }
    Ok(())
}

/// [`activation_backward`] written over its input: `g = g · act'(u)`. With ReLU, `u` may be the
/// activation's output instead of its input (the same sign, so the same derivative), which lets
/// a training forward keep `relu(u)` alone.
pub fn activation_backward_in_place(g: &mut [f32], u: &[f32], act: Activation, par: Par) -> Result<(), KernelError> {
    check_len("activation_backward_in_place", "u", g.len(), u.len())?;
    let body = |(g, x): (&mut [f32], &[f32])| {
        at_level!(activation_backward_in_place_run(g, x, act));
    };
    let n = 16 * 1024;
    match par {
        Par::Seq => g.chunks_mut(n).zip(u.chunks(n)).for_each(body),
        Par::Rayon => g.par_chunks_mut(n).zip(u.par_chunks(n)).for_each(body),
    }
    Ok(())
}

/// The backward of `dropout(relu(u))` (inverted dropout of probability `p`) from its output
/// `z` alone, over the gradient `g`: `g = g / (1 − p)` where `z > 0`, and `0` elsewhere.
/// Dropout zeros what it drops, so `z > 0` only where the element was kept and ReLU passed
/// it: no draw is replayed. Where `z > 0` these are the bits of [`dropout`] then
/// [`activation_backward_in_place`] (ReLU); elsewhere the result is `+0`, where those give
/// `0·g` (`−0` for a negative `g`, NaN for a non-finite one), as PyTorch's
/// `threshold_backward` does. `p` as for [`dropout`].
pub fn relu_dropout_backward(g: &mut [f32], z: &[f32], p: f32, par: Par) -> Result<(), KernelError> {
    check_len("relu_dropout_backward", "z", g.len(), z.len())?;
    let keep = dropout::keep_factor("relu_dropout_backward", p)?;
    let body = |(g, z): (&mut [f32], &[f32])| {
        at_level!(relu_dropout_backward_run(g, z, keep));
    };
    let n = 16 * 1024;
    match par {
        Par::Seq => g.chunks_mut(n).zip(z.chunks(n)).for_each(body),
        Par::Rayon => g.par_chunks_mut(n).zip(z.par_chunks(n)).for_each(body),
    }
    Ok(())
}

/// [`relu_dropout_backward`] over one chunk.
#[inline(always)]
fn relu_dropout_backward_run(g: &mut [f32], z: &[f32], keep: f32) {
    for (g, &z) in g.iter_mut().zip(z) {
        *g = if z > 0.0 { *g * keep } else { 0.0 };
    }
}

/// `g = g · act'(u)` over one chunk, a loop per activation so that each vectorises (the same
/// products as `g · derivative(u)` element by element: NaN and `−0` included).
#[inline(always)]
fn activation_backward_in_place_run(g: &mut [f32], u: &[f32], act: Activation) {
    #[inline(always)]
    fn each(g: &mut [f32], u: &[f32], f: impl Fn(f32) -> f32) {
        for (g, &x) in g.iter_mut().zip(u) {
            *g *= f(x);
        }
    }
    match act {
        Activation::Identity => each(g, u, |_| 1.0),
        Activation::Relu => each(g, u, |x| if x > 0.0 { 1.0 } else { 0.0 }),
        Activation::Gelu => each(g, u, |x| derivative(x, Activation::Gelu)),
        Activation::GeluTanh => each(g, u, |x| derivative(x, Activation::GeluTanh)),
    }
}

/// `y[n] = table[ids[n]]`: an embedding lookup, `table: [V, E]` -> `y: [N, E]`. An id past the
/// table is an error naming it, before any row is written.
pub fn embedding(y: &mut [f32], table: &[f32], ids: &[usize], e: usize) -> Result<(), KernelError> {
    let op = "embedding";
    check_len(op, "y", ids.len() * e, y.len())?;
    if e == 0 {
        return Ok(());
    }
    check_ids(op, ids, table.len() / e)?;
    for (row, &id) in y.chunks_exact_mut(e).zip(ids) {
        row.copy_from_slice(&table[id * e..(id + 1) * e]);
    }
    Ok(())
}

/// Every id below `vocab`, the table's row count, or an error naming the first that is not.
fn check_ids(op: &'static str, ids: &[usize], vocab: usize) -> Result<(), KernelError> {
    match ids.iter().find(|&&id| id >= vocab) {
        Some(&bad) => Err(KernelError::InvalidArgument {
            op,
            what: "a token id",
            got: bad.to_string(),
            expected: "below the table's row count",
        }),
        None => Ok(()),
    }
}

/// The backward of [`embedding`]: `dtable[ids[n]] += dy[n]`. Each thread owns a range of
/// columns and adds the rows in order, so repeated ids sum in the same order whatever the
/// thread count.
pub fn embedding_backward(
    dtable: &mut [f32],
    dy: &[f32],
    ids: &[usize],
    e: usize,
    par: Par,
) -> Result<(), KernelError> {
    let op = "embedding_backward";
    check_len(op, "dy", ids.len() * e, dy.len())?;
    if e == 0 {
        return Ok(());
    }
    let vocab = dtable.len() / e;
    check_ids(op, ids, vocab)?;
    let columns = 16;
    let table = crate::view::SharedMut(dtable.as_mut_ptr());
    let body = |c0: usize| {
        let c1 = (c0 + columns).min(e);
        for (n, &id) in ids.iter().enumerate() {
            for c in c0..c1 {
                // SAFETY: `id < vocab` (checked), `c < e`; the columns `c0..c1` belong to this
                // task alone.
                unsafe { *table.get().add(id * e + c) += dy[n * e + c] };
            }
        }
    };
    match par {
        Par::Seq => (0..e).step_by(columns).for_each(body),
        Par::Rayon => (0..e).into_par_iter().step_by(columns).for_each(body),
    }
    Ok(())
}

/// The result of [`cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    /// The mean loss over the rows whose target is not ignored (PyTorch's `reduction="mean"`);
    /// NaN when every row is ignored, as in PyTorch.
    pub loss: f64,
    /// How many rows counted.
    pub count: usize,
}

/// Softmax cross-entropy over rows of `logits: [N, V]` with PyTorch's `F.cross_entropy`
/// semantics: `targets[n] == ignore_index` rows add nothing; `label_smoothing = ε` mixes the
/// one-hot target with the uniform `ε/V`. Writes `dlogits = (softmax − q) / count` (zero on
/// ignored rows), the gradient of the mean loss, fused with the log-softmax: no `[N, V]`
/// probability buffer besides `dlogits`. A logit of −∞ (a class masked out) has probability
/// and gradient 0; as in PyTorch the loss is then +∞ only where the target puts weight on that
/// class (it is the target, or `label_smoothing > 0`), and finite otherwise.
pub fn cross_entropy(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    ignore_index: i64,
    label_smoothing: f32,
    par: Par,
) -> Result<CrossEntropy, KernelError> {
    cross_entropy_impl(dlogits, logits, targets, [ignore_index, -1], label_smoothing, par)
}

/// [`cross_entropy`] of a part of a larger batch: the loss and `dlogits` are divided by
/// `denominator`, the rows that count in the whole batch, instead of this call's own count, so
/// the parts' losses and gradients add up to the whole batch's mean (micro-batches of one
/// step). `loss` is the part's sum over `denominator`; `count` this call's rows.
pub fn cross_entropy_part(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    ignore_index: i64,
    label_smoothing: f32,
    denominator: usize,
    par: Par,
) -> Result<CrossEntropy, KernelError> {
    if denominator == 0 {
        return Err(KernelError::InvalidArgument {
            op: "cross_entropy_part",
            what: "denominator",
            got: "0".into(),
            expected: "the rows that count in the whole batch, at least 1",
        });
    }
    let denominator = i64::try_from(denominator).unwrap_or(i64::MAX);
    cross_entropy_impl(
        dlogits,
        logits,
        targets,
        [ignore_index, denominator],
        label_smoothing,
        par,
    )
}

/// The one body of [`cross_entropy`] and [`cross_entropy_part`]: `[ignore_index, denominator]`,
/// a negative denominator meaning this call's own count.
fn cross_entropy_impl(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    [ignore_index, denominator]: [i64; 2],
    label_smoothing: f32,
    par: Par,
) -> Result<CrossEntropy, KernelError> {
    let op = "cross_entropy";
    let n = targets.len();
    if n == 0 {
        return Err(KernelError::InvalidArgument {
            op,
            what: "the number of targets",
            got: "0".into(),
            expected: "at least 1",
        });
    }
    if !logits.len().is_multiple_of(n) {
        return Err(KernelError::shape(
            op,
            "logits",
            vec![n, logits.len().div_ceil(n)],
            vec![logits.len()],
        ));
    }
    if logits.is_empty() {
        return Err(KernelError::InvalidArgument {
            op,
            what: "the number of classes",
            got: "0".into(),
            expected: "at least 1",
        });
    }
    check_len(op, "dlogits", logits.len(), dlogits.len())?;
    let v = logits.len() / n;
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(KernelError::InvalidArgument {
            op,
            what: "label_smoothing",
            got: label_smoothing.to_string(),
            expected: "between 0 and 1",
        });
    }
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| t != ignore_index && !(0..v as i64).contains(&t))
    {
        return Err(KernelError::InvalidArgument {
            op,
            what: "a target",
            got: bad.to_string(),
            expected: "a class index below V, or ignore_index",
        });
    }
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    let divisor = if denominator < 0 { count } else { denominator as usize };
    let eps = label_smoothing as f64;
    let inv_count = if divisor == 0 { 0.0 } else { 1.0 / divisor as f64 };
    // Per row: its loss (f64), and dlogits written.
    let row = |(d, (x, &t)): (&mut [f32], (&[f32], &i64))| -> f64 {
        if t == ignore_index {
            d.fill(0.0);
            return 0.0;
        }
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &y| m.max(y)) as f64;
        let sum: f64 = x.iter().map(|&y| (y as f64 - m).exp()).sum();
        let log_z = m + sum.ln();
        let mean_logit = x.iter().map(|&y| y as f64).sum::<f64>() / v as f64;
        let nll = log_z - x[t as usize] as f64;
        let smooth = log_z - mean_logit;
        for (j, (dj, &y)) in d.iter_mut().zip(x).enumerate() {
            let p = (y as f64 - log_z).exp();
            let q = eps / v as f64 + if j == t as usize { 1.0 - eps } else { 0.0 };
            *dj = ((p - q) * inv_count) as f32;
        }
        // Each term only where its weight is not zero: with a logit of −∞ (a masked class)
        // `smooth` is +∞, and `0 · ∞` would make a finite loss NaN (PyTorch's is finite).
        let mut loss = 0.0;
        if eps < 1.0 {
            loss += (1.0 - eps) * nll;
        }
        if eps > 0.0 {
            loss += eps * smooth;
        }
        loss
    };
    let losses: Vec<f64> = match par {
        Par::Seq => dlogits
            .chunks_mut(v)
            .zip(logits.chunks(v).zip(targets))
            .map(row)
            .collect(),
        Par::Rayon => dlogits
            .par_chunks_mut(v)
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .map(row)
            .collect(),
    };
    let total: f64 = losses.iter().sum();
    Ok(CrossEntropy {
        loss: if divisor == 0 { f64::NAN } else { total / divisor as f64 },
        count,
    })
}

#[cfg(test)]
mod tests;
