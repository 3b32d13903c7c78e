//! K and V packed per `(b, g)` by the tasks ([`packs_per_group`], [`attend_per_group`])
//! against K and V packed once for the call: the same bits, in f32 and in bf16, at this
//! machine's level; and when a thread reuses what it packed.

use super::per_group::{GroupPacked, FORCE_PACKING_FOR_THE_CALL, PER_GROUP_MAX_KEYS};
use super::tests::bits_eq;
use super::tests_bf16::each_bf16_kernel;
use super::*;
use crate::Causal;

/// K and V packed per `(b, g)` by the tasks ([`packs_per_group`]) and once for the call before
/// its tiles run give the same bits, in f32 and in bf16: two row tiles and two key blocks per
/// `(b, g)` (the second ragged), odd `D`, ragged `Dv`, GQA, each causal alignment, key lengths
/// that end inside a block, f32 values and bf16 bits (`attention_bf16_kv`), sequential and on
/// two threads.
#[test]
fn packing_per_group_gives_the_bits_of_packing_per_call() {
    each_bf16_kernel(|route| {
        eprintln!("packing_per_group_gives_the_bits_of_packing_per_call: {route}");
        packing_per_group_gives_the_bits_of_packing_per_call_once();
    });
}

fn packing_per_group_gives_the_bits_of_packing_per_call_once() {
    // Two key blocks in f32 (512 + 88 keys), three in bf16.
    let (b, h, g, s, t, d, dv) = (3, 8, 4, 50, 600, 33, 20);
    let plan = Plan::new([b, h, s, d], [g, t, dv]);
    assert!(packs_per_group(&plan));
    FORCE_PACKING_FOR_THE_CALL.with(|f| f.set(true));
    assert!(!packs_per_group(&plan), "the tests' switch packs for the call");
    FORCE_PACKING_FOR_THE_CALL.with(|f| f.set(false));
    // Calls of more keys, or with their keys split, pack for the call.
    assert!(!packs_per_group(&Plan::new(
        [b, h, s, d],
        [g, PER_GROUP_MAX_KEYS + 1, dv]
    )));
    assert!(!packs_per_group(&Plan::new([1, 8, 1, d], [8, 2048, dv])));
    // Nor those whose K and V of one `(b, g)` exceed what a thread keeps (eight batches: not split).
    assert!(packs_per_group(&Plan::new(
        [8, h, s, 128],
        [g, PER_GROUP_MAX_KEYS, 128]
    )));
    assert!(!packs_per_group(&Plan::new(
        [8, h, s, 128],
        [g, PER_GROUP_MAX_KEYS, 129]
    )));
    let q = crate::testing::random_vec(b * h * s * d, 21);
    let k = crate::testing::random_vec(b * g * t * d, 22);
    let v = crate::testing::random_vec(b * g * t * dv, 23);
    let [k_bits, v_bits] = [&k, &v].map(|x| x.iter().map(|&x| crate::f32_to_bf16(x)).collect::<Vec<u16>>());
    let lengths: Vec<usize> = (0..b).map(|i| t - 37 * i).collect();
    let forced = FORCE_VDPBF16PS.with(|f| f.get());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let calls = [Causal::None, Causal::TopLeft, Causal::BottomRight]
        .into_iter()
        .flat_map(|causal| [crate::Precision::F32, crate::Precision::Bf16].map(|p| (causal, p)));
    for (causal, precision) in calls {
        let options = AttentionOptions {
            precision,
            causal,
            key_lengths: Some(&lengths),
            ..Default::default()
        };
        let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
        let run = |bits: bool, per_call: bool, par: Par| {
            pool.install(|| {
                FORCE_VDPBF16PS.with(|f| f.set(forced));
                FORCE_PACKING_FOR_THE_CALL.with(|f| f.set(per_call));
                let (mut out, mut lse) = (vec![f32::NAN; b * h * s * dv], vec![f32::NAN; b * h * s]);
                let out_view = ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap();
                let lse_view = ViewMut::contiguous(&mut lse, [b, h, s]).unwrap();
                if bits {
                    let kv = View4::contiguous(&k_bits, [b, g, t, d]).unwrap();
                    let vv = View4::contiguous(&v_bits, [b, g, t, dv]).unwrap();
                    crate::attention_bf16_kv(out_view, Some(lse_view), qv, kv, vv, &options, par).unwrap();
                } else {
                    let kv = View4::contiguous(&k, [b, g, t, d]).unwrap();
                    let vv = View4::contiguous(&v, [b, g, t, dv]).unwrap();
                    flash_attention(out_view, Some(lse_view), ForwardInputs::new(qv, kv, vv), &options, par).unwrap();
                }
                FORCE_PACKING_FOR_THE_CALL.with(|f| f.set(false));
                (out, lse)
            })
        };
        for bits in [false, true] {
            let per_call = run(bits, true, Par::Seq);
            assert!(per_call.0.iter().all(|x| x.is_finite()) && per_call.0.iter().any(|&x| x != 0.0));
            for par in [Par::Seq, Par::Rayon] {
                let what = format!("{causal:?}, {precision}, bits {bits}, {par:?}");
                assert!(bits_eq(&run(bits, false, par), &per_call), "{what}");
            }
        }
    }
}

/// A thread reuses the K and V it packed for its last task only for the same `(b, g)` of the
/// same call: another call (other inputs, perhaps the same shape) or another `(b, g)` packs
/// again.
#[test]
fn a_thread_reuses_its_packing_for_the_same_group_of_the_same_call_only() {
    let held = GroupPacked {
        call: 7,
        bg: 3,
        buffers: [crate::buffer::Buffer::zeroed(1), crate::buffer::Buffer::zeroed(1)],
    };
    assert!(held.holds(7, 3));
    assert!(!held.holds(8, 3), "another call");
    assert!(!held.holds(7, 4), "another (b, g)");
}

/// The weights with K and V packed per `(b, g)` ([`super::weights::keeps_per_group`]): per head
/// with the tasks of `attend_per_group`, and averaged with one task per batch element, through
/// the cases' whole check (the f64 reference; `out`, `lse` and the weights with the bits of
/// `attention` and `attention_weights` sequentially and on 1, 2 and 3 threads, where on 3 an
/// average has too few batch elements and packs for the call): GQA, two row tiles and two key
/// blocks per `(b, g)`, causal, key lengths, masks, ALiBi and strided layouts.
#[test]
fn weights_with_packing_per_group_have_the_bits_of_the_second_pass() {
    use super::tests::{check, Case, MaskKind, MaskShape};
    use crate::weights::RawWeights;
    let (b, h, g, s, t, d) = (8, 4, 2, 50, 600, 16);
    let plan = Plan::new([b, h, s, d], [g, t, d]);
    assert!(packs_per_group(&plan) && plan.row_tiles == 2, "{plan:?}");
    let mut w = vec![0.0f32; b * h * s * t];
    let per_head = RawWeights::new(
        crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut w, [b, h, s, t]).unwrap()),
        h,
    );
    assert!(super::weights::keeps_per_group(&plan, &per_head, Par::Seq));
    let averaged = RawWeights::new(
        crate::WeightsDst::Averaged(ViewMut::contiguous(&mut w[..b * s * t], [b, s, t]).unwrap()),
        h,
    );
    let on = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    assert!(super::weights::keeps_per_group(&plan, &averaged, Par::Seq));
    assert!(on(2).install(|| super::weights::keeps_per_group(&plan, &averaged, Par::Rayon)));
    assert!(!on(3).install(|| super::weights::keeps_per_group(&plan, &averaged, Par::Rayon)));
    assert!(on(3).install(|| super::weights::keeps_per_group(&plan, &per_head, Par::Rayon)));

    check(Case::new(b, h, g, s, t, d, d + 4));
    let mut case = Case::new(b, h, g, s, t, d, d);
    case.causal = Causal::BottomRight;
    case.lengths = true;
    case.mask = MaskKind::Additive(MaskShape::Full);
    check(case);
    case.causal = Causal::TopLeft;
    case.key_mask = true;
    case.alibi = true;
    case.bshd = true;
    check(case);
}
