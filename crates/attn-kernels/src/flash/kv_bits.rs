//! Attention over keys and values held as bf16 bits ([`attention_bf16_kv`]): a bf16 KV cache,
//! read in place by decoding's bf16 kernels at half the bytes of an f32 one.

use super::{
    attend_per_group, decodes_in_place, packs_per_group, run_operands, validate, Bf16Source, Dst, GroupPacking, Kv,
    Operands, Plan,
};
use crate::mask::resolve_scale;
use crate::scores::ScoreKernel;
use crate::{AttentionOptions, Bf16Level, ForwardInputs, KernelError, Par, Precision, View4, ViewMut, ViewMut4};

/// [`crate::attention`] with the keys `k: [B, G, T, D]` and the values `v: [B, G, T, Dv]` given
/// as bf16 bits (the upper half of an f32, as [`crate::f32_to_bf16`] makes them): the bits of
/// [`crate::attention`] on their widened values ([`crate::bf16_to_f32`]), in either precision.
///
/// Decoding in [`Precision::Bf16`] at the AVX512-BF16 and AMX levels (at most
/// [`DECODE_ROWS`] query rows per key/value head, each key and value row contiguous) reads
/// the bits in place, so K and V stream at half the bytes of f32 and nothing is widened. Other
/// calls in bf16 with those levels pack K and V straight from the bits (per `(b, g)` by the
/// tasks, or once for the call, as f32 K and V are packed): keys of an even `D` and values of
/// whole panels in contiguous rows are rearranged as words of bits without widening, the rest
/// widened exactly a block at a time into a small buffer and packed as f32 values are, so no
/// f32 copy of K and V is made. The rest (f32, or no bf16 instructions) widen K and V into f32
/// copies (on rayon's threads with [`Par::Rayon`]) and run [`crate::attention`] on them: the
/// same result, at the cost of the copies (decoding from a long cache about twice the time of
/// f32 K and V, which are read once where the copies are written and read again).
/// So does a call in which a non-finite value reached a row (the repair of
/// [`crate::attention`] then runs on the copies).
///
/// ```
/// use attn_kernels::{attention, attention_bf16_kv, f32_to_bf16, bf16_to_f32, AttentionOptions,
///                    ForwardInputs, Par, Precision, View4, ViewMut4};
/// let (h, t, d) = (2, 5, 4);
/// let q: Vec<f32> = (0..h * d).map(|i| (i as f32 * 0.3).sin()).collect();
/// let k: Vec<u16> = (0..h * t * d).map(|i| f32_to_bf16((i as f32 * 0.7).cos())).collect();
/// let v: Vec<u16> = (0..h * t * d).map(|i| f32_to_bf16(i as f32 * 0.01)).collect();
/// let options = AttentionOptions { precision: Precision::Bf16, ..Default::default() };
/// let qv = View4::contiguous(&q, [1, h, 1, d]).unwrap();
/// let mut out = vec![0.0f32; h * d];
/// attention_bf16_kv(
///     ViewMut4::contiguous(&mut out, [1, h, 1, d]).unwrap(),
///     None,
///     qv,
///     View4::contiguous(&k, [1, h, t, d]).unwrap(),
///     View4::contiguous(&v, [1, h, t, d]).unwrap(),
///     &options,
///     Par::Seq,
/// )
/// .unwrap();
/// // The same bits as attention on the widened values.
/// let (kw, vw): (Vec<f32>, Vec<f32>) = (k.iter().map(|&x| bf16_to_f32(x)).collect(), v.iter().map(|&x| bf16_to_f32(x)).collect());
/// let mut want = vec![0.0f32; h * d];
/// let inputs = ForwardInputs::new(qv, View4::contiguous(&kw, [1, h, t, d]).unwrap(), View4::contiguous(&vw, [1, h, t, d]).unwrap());
/// attention(ViewMut4::contiguous(&mut want, [1, h, 1, d]).unwrap(), None, inputs, &options, Par::Seq).unwrap();
/// assert_eq!(out, want);
/// ```
pub fn attention_bf16_kv(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    q: View4<'_, f32>,
    k: View4<'_, u16>,
    v: View4<'_, u16>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let op = "attention_bf16_kv";
    let plan = validate(op, out.shape(), lse.as_ref().map(|l| l.shape()), &q, &k, &v, options)?;
    let (mut out, mut lse) = (out, lse);
    if packs_bits(&plan, options) {
        // More query rows: K and V packed once for the call straight from the bits, a block
        // at a time, as `crate::attention` packs f32 K and V (the same words).
        // Or per `(b, g)` by the tasks, as `crate::attention` decides for f32 K and V.
        let amx = crate::bf16_level() == Bf16Level::Amx;
        let dst = Dst::new(&mut out, &mut lse, &mut None);
        let spoilt = if packs_per_group(&plan) {
            run_bits(&plan, q, [k, v], options, dst, par, (None, amx, false))
        } else {
            let (kt, vp) = (
                super::bf16::pack_keys_bits(&plan, &k, amx, par),
                super::bf16::pack_values_bits(&plan, &v, amx, par),
            );
            let source = Some(Bf16Source::Packed(&kt, &vp));
            let spoilt = run_bits(&plan, q, [k, v], options, dst, par, (source, amx, false));
            crate::buffer::give(kt);
            crate::buffer::give(vp);
            spoilt
        };
        if !spoilt {
            return Ok(());
        }
    }
    if reads_in_place(&plan, &k, &v, options) {
        // Decoding's kernels multiply rounded f32 probabilities, as for f32 K and V.
        let dst = Dst::new(&mut out, &mut lse, &mut None);
        if !run_bits(
            &plan,
            q,
            [k, v],
            options,
            dst,
            par,
            (Some(Bf16Source::InPlace), false, true),
        ) {
            return Ok(());
        }
    }
    let [kw, vw] = [&k, &v].map(|x| widened(x, par));
    let inputs = ForwardInputs::new(
        q,
        View4::contiguous(&kw, k.shape())?,
        View4::contiguous(&vw, v.shape())?,
    );
    crate::attention(out, lse, inputs, options, par)
}

/// The bf16 kernels on `q` and K and V as bits (`[k, v]`), the operands read from `source`
/// (`None`: packed per `(b, g)` by the tasks, [`super::attend_per_group`]), on AMX tiles when
/// `amx`, with the probabilities rounded in f32 when `round_p`; returns whether a row came out
/// non-finite from a finite softmax (the caller then widens).
fn run_bits(
    plan: &Plan,
    q: View4<'_, f32>,
    [k, v]: [View4<'_, u16>; 2],
    options: &AttentionOptions<'_>,
    dst: Dst,
    par: Par,
    (source, amx, round_p): (Option<Bf16Source<'_>>, bool, bool),
) -> bool {
    let ops = Operands {
        q,
        k: Kv::Bits(k),
        v: Kv::Bits(v),
        options,
        scale: resolve_scale(options, plan.d),
        kt_packed: None,
        v_packed: None,
        bf16: source,
        amx,
        round_p,
        round_q: false,
        micro: crate::simd::simd_level().is_vector(),
        score_kernel: ScoreKernel::for_call(plan.rows_per_group, true),
        keep_scores: false,
        packed_per_group: source.is_none().then_some(GroupPacking::Bf16),
    };
    if source.is_none() {
        attend_per_group(plan, &ops, dst, par)
    } else {
        run_operands(plan, &ops, dst, par)
    }
}

/// Whether [`attention_bf16_kv`] reads `k` and `v` in place for a call of `plan` (else it
/// widens them): in bf16, with bf16 instructions, when the f32 kernel would decode in place.
pub(super) fn reads_in_place(
    plan: &Plan,
    k: &View4<'_, u16>,
    v: &View4<'_, u16>,
    options: &AttentionOptions<'_>,
) -> bool {
    options.precision == Precision::Bf16
        && crate::bf16_level() != Bf16Level::None
        && decodes_in_place(plan, k.strides(), v.strides())
}

/// Whether [`attention_bf16_kv`] packs K and V from their bits (else it widens them or reads
/// them in place): in bf16, with bf16 instructions, for more query rows per key/value head
/// than decoding reads in place (for fewer, a strided K or V is widened into contiguous copies,
/// which [`crate::attention`] then decodes in place: other arithmetic than the packed kernels').
/// Where the f32 kernel serves bf16 calls that do not decode ([`super::rounds_into_f32`]), they
/// are widened instead.
fn packs_bits(plan: &Plan, options: &AttentionOptions<'_>) -> bool {
    options.precision == Precision::Bf16
        && crate::bf16_level() != Bf16Level::None
        && plan.rows_per_group > DECODE_ROWS
        && !super::rounds_into_f32(false)
}

/// The most query rows per key/value head that [`attention_bf16_kv`] reads in place: those of
/// decoding's kernels.
pub const DECODE_ROWS: usize = crate::tile::DECODE_ROWS_MAX;

/// The values of `x`'s bits, contiguous in its shape's order: a row at a time, a shift per
/// value where the row is contiguous (which the compiler vectorises), else one by one; on
/// rayon's threads with `Par::Rayon`, in tasks of at least [`WIDEN_TASK`] values, so that a
/// long cache's copy is written, and its fresh pages faulted in, by every thread.
fn widened(x: &View4<'_, u16>, par: Par) -> Vec<f32> {
    let [a, b, c, d] = x.shape();
    let (st, data) = (x.strides(), x.data());
    let len = a * b * c * d;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if d == 0 {
        return out;
    }
    let fill = |(row, dst): (usize, &mut [std::mem::MaybeUninit<f32>])| {
        let (i, j, r) = (row / (b * c), row / c % b, row % c);
        let base = i * st[0] + j * st[1] + r * st[2];
        if st[3] == 1 {
            for (o, &h) in dst.iter_mut().zip(&data[base..base + d]) {
                o.write(crate::bf16_to_f32(h));
            }
        } else {
            for (col, o) in dst.iter_mut().enumerate() {
                o.write(crate::bf16_to_f32(data[base + col * st[3]]));
            }
        }
    };
    let rows = &mut out.spare_capacity_mut()[..len];
    match par {
        Par::Rayon => {
            use rayon::prelude::*;
            let rows_per_task = WIDEN_TASK.div_ceil(d);
            rows.par_chunks_mut(d)
                .enumerate()
                .with_min_len(rows_per_task)
                .for_each(fill);
        }
        Par::Seq => rows.chunks_mut(d).enumerate().for_each(fill),
    }
    // SAFETY: the capacity holds `len` values, and the rows above wrote every one of them (the
    // `len / d` rows of `d`, each element of each row).
    unsafe { out.set_len(len) };
    out
}

/// The fewest values a task of [`widened`] converts.
pub(super) const WIDEN_TASK: usize = 1 << 14;
