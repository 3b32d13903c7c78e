//! Attention over keys and values held as bf16 bits ([`attention_bf16_kv`]): a bf16 KV cache,
//! read in place by decoding's kernels (bf16, or f32 widening as they load) at half the bytes
//! of an f32 one.

use super::{
    attend_kv, attend_per_group, decodes_in_place, packs_per_group, run_operands, validate, Bf16Source, Dst,
    GroupPacking, Kv, Operands, Operation, Plan,
};
use crate::mask::resolve_scale;
use crate::scores::ScoreKernel;
use crate::{AttentionOptions, Bf16Level, ForwardInputs, KernelError, Par, Precision, View4, ViewMut, ViewMut4};

/// [`crate::attention`] with the keys `k: [B, G, T, D]` and the values `v: [B, G, T, Dv]` given
/// as bf16 bits (the upper half of an f32, as [`crate::f32_to_bf16`] makes them): the bits of
/// [`crate::attention`] on their widened values ([`crate::bf16_to_f32`]), in either precision.
///
/// Decoding (at most [`DECODE_ROWS`] query rows per key/value head, each key and value row
/// contiguous) reads the bits in place, so K and V stream at half the bytes of f32 and
/// nothing is widened: in [`Precision::Bf16`] by the bf16 decoding kernels at the AVX512-BF16
/// and AMX levels, and otherwise, as in [`Precision::F32`], by the f32 decoding kernels at
/// every vector level (AVX2 and AVX-512), which widen each key and value exactly as they load
/// it (and round it in bf16, as rounding its value gives). Other calls in bf16 with
/// bf16 instructions pack K and V straight from the bits (per `(b, g)` by the tasks, or once
/// for the call, as f32 K and V are packed): keys of an even `D` and values of whole panels in
/// contiguous rows are rearranged as words of bits without widening, the rest widened exactly
/// a block at a time into a small buffer and packed as f32 values are, so no f32 copy of K and
/// V is made. Calls of more rows in f32, or in bf16 where the f32 kernel serves it (no bf16
/// instructions), widen the bits (and round them in bf16) as the f32 kernel packs K and V, or,
/// with a single row tile per key/value head, as each tile transposes its key blocks and puts
/// its value blocks in panels, strided or not: no copy either. The rest (decoding from
/// strided rows, the portable level) widen K and V into f32 copies (on rayon's threads with
/// [`Par::Rayon`]) and run [`crate::attention`] on them: the same result, at the cost of the
/// copies (about twice the time of f32 K and V on a memory-bound call, which reads them once
/// where the copies are written and read again). So does a call in which a non-finite value
/// reached a row (the repair of [`crate::attention`] then runs on the copies).
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
    let spoilt = match route(&plan, &k, &v, options) {
        // More query rows: K and V packed once for the call straight from the bits, a block
        // at a time, as `crate::attention` packs f32 K and V (the same words).
        // Or per `(b, g)` by the tasks, as `crate::attention` decides for f32 K and V.
        KvRoute::PacksBits => {
            let amx = crate::bf16_level() == Bf16Level::Amx;
            let dst = Dst::new(&mut out, &mut lse, &mut None);
            if packs_per_group(&plan) {
                run_bits(&plan, q, [k, v], options, dst, par, Kernels::Bf16(None, amx))
            } else {
                let (kt, vp) = (
                    super::bf16::pack_keys_bits(&plan, &k, amx, par),
                    super::bf16::pack_values_bits(&plan, &v, amx, par),
                );
                let source = Some(Bf16Source::Packed(&kt, &vp));
                let spoilt = run_bits(&plan, q, [k, v], options, dst, par, Kernels::Bf16(source, amx));
                crate::buffer::give(kt);
                crate::buffer::give(vp);
                spoilt
            }
        }
        // Decoding's bf16 kernels multiply rounded f32 probabilities, as for f32 K and V;
        // without bf16 instructions the f32 kernels multiply the rounded operands (each key
        // and value rounded as it is loaded), as on rounded copies of f32 K and V.
        KvRoute::ReadsInPlace(Precision::Bf16) => {
            let dst = Dst::new(&mut out, &mut lse, &mut None);
            let kernels = if crate::bf16_level() == Bf16Level::None {
                Kernels::DecodeRounded
            } else {
                Kernels::DecodeBf16
            };
            run_bits(&plan, q, [k, v], options, dst, par, kernels)
        }
        // Decoding's f32 kernels, widening each key and value as they load it.
        KvRoute::ReadsInPlace(Precision::F32) => {
            let dst = Dst::new(&mut out, &mut lse, &mut None);
            run_bits(&plan, q, [k, v], options, dst, par, Kernels::DecodeF32)
        }
        // The f32 kernel, exact or on rounded operands, widening (and rounding) the bits as it
        // packs K and V or as its tiles put each block in panels.
        KvRoute::Converts(precision) => {
            let dst = Dst::new(&mut out, &mut lse, &mut None);
            let operation = match precision {
                Precision::F32 => Operation::F32,
                Precision::Bf16 => Operation::RoundingF32,
            };
            let scale = resolve_scale(options, plan.d);
            let kv = [Kv::Bits(k), Kv::Bits(v)];
            attend_kv(&plan, q, kv, options, scale, operation, dst, None, par)
        }
        KvRoute::Widens => true,
    };
    if !spoilt {
        return Ok(());
    }
    let [kw, vw] = [&k, &v].map(|x| widened(x, par));
    let inputs = ForwardInputs::new(
        q,
        View4::contiguous(&kw, k.shape())?,
        View4::contiguous(&vw, v.shape())?,
    );
    crate::attention(out, lse, inputs, options, par)
}

/// Which kernels [`run_bits`] runs on K and V as bits.
#[derive(Clone, Copy)]
enum Kernels<'o> {
    /// The bf16 kernels on K and V packed from the bits (`None`: per `(b, g)` by the tasks,
    /// [`super::attend_per_group`]), on AMX tiles when the flag says so.
    Bf16(Option<Bf16Source<'o>>, bool),
    /// Decoding's bf16 kernels on the bits in place, the probabilities rounded in f32.
    DecodeBf16,
    /// Decoding's f32 kernels on the bits in place, widened as they are loaded.
    DecodeF32,
    /// Decoding's f32 kernels on the bits in place, widened and rounded as they are loaded
    /// (their values rounded to bf16), on the scaled queries and the probabilities rounded:
    /// bf16 without bf16 instructions.
    DecodeRounded,
}

/// `kernels` on `q` and K and V as bits (`[k, v]`); returns whether a row came out
/// non-finite from a finite softmax (the caller then widens).
fn run_bits(
    plan: &Plan,
    q: View4<'_, f32>,
    [k, v]: [View4<'_, u16>; 2],
    options: &AttentionOptions<'_>,
    dst: Dst,
    par: Par,
    kernels: Kernels<'_>,
) -> bool {
    let (source, amx) = match kernels {
        Kernels::Bf16(source, amx) => (source, amx),
        Kernels::DecodeBf16 => (Some(Bf16Source::InPlace), false),
        Kernels::DecodeF32 | Kernels::DecodeRounded => (None, false),
    };
    let rounded = matches!(kernels, Kernels::DecodeRounded);
    let per_group = matches!(kernels, Kernels::Bf16(None, _));
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
        round_p: matches!(kernels, Kernels::DecodeBf16) || rounded,
        // The scaled query rows rounded as the tile loads them, and so K and V as the
        // kernels load them (`super::tile_convert`).
        round_q: rounded,
        micro: crate::simd::simd_level().is_vector(),
        score_kernel: ScoreKernel::for_call(plan.rows_per_group, true),
        keep_scores: false,
        packed_per_group: per_group.then_some(GroupPacking::Bf16),
    };
    if per_group {
        attend_per_group(plan, &ops, dst, par)
    } else {
        run_operands(plan, &ops, dst, par)
    }
}

/// How [`attention_bf16_kv`] runs a call of `plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KvRoute {
    /// K and V packed from their bits for the bf16 kernels: in bf16, with bf16 instructions,
    /// for more query rows per key/value head than decoding reads in place (for fewer, a
    /// strided K or V is widened into contiguous copies, which [`crate::attention`] then
    /// decodes in place: other arithmetic than the packed kernels'). Where the f32 kernel
    /// serves bf16 calls that do not decode ([`super::rounds_into_f32`]), it converts the bits
    /// instead ([`KvRoute::Converts`]).
    PacksBits,
    /// Decoding ([`decodes_in_place`]: at most [`DECODE_ROWS`] query rows per key/value head,
    /// contiguous rows) with the bits read in place by the decoding kernels of this
    /// precision: in bf16 by the bf16 kernels where the CPU has bf16 instructions, else by the
    /// f32 kernels on rounded operands at a vector level; in f32 by the f32 kernels at a
    /// vector level.
    ReadsInPlace(Precision),
    /// More query rows per key/value head than decoding's, at a vector level, in f32 or where
    /// bf16 runs the f32 kernel on rounded operands ([`super::rounds_into_f32`]): the f32
    /// kernel widens (and rounds) the bits as it packs K and V, or as each tile transposes its
    /// key blocks and puts its value blocks in panels, strided or not.
    Converts(Precision),
    /// Widened into f32 copies, on which [`crate::attention`] runs: the portable level, and
    /// decoding from strided rows (the copies are decoded in place, by other arithmetic than
    /// the tile kernel's).
    Widens,
}

/// The route of [`attention_bf16_kv`] for a call of `plan` on `k` and `v`.
pub(super) fn route(plan: &Plan, k: &View4<'_, u16>, v: &View4<'_, u16>, options: &AttentionOptions<'_>) -> KvRoute {
    let bf16_instructions = crate::bf16_level() != Bf16Level::None;
    let vector = crate::simd::simd_level().is_vector();
    let decodes = decodes_in_place(plan, k.strides(), v.strides());
    match options.precision {
        Precision::Bf16 if decodes && (bf16_instructions || vector) => KvRoute::ReadsInPlace(Precision::Bf16),
        Precision::Bf16 if bf16_instructions && plan.rows_per_group > DECODE_ROWS && !super::rounds_into_f32(false) => {
            KvRoute::PacksBits
        }
        Precision::F32 if decodes && vector => KvRoute::ReadsInPlace(Precision::F32),
        precision if vector && plan.rows_per_group > DECODE_ROWS => KvRoute::Converts(precision),
        _ => KvRoute::Widens,
    }
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
