//! Which kernel a bf16 call takes ([`rounds_into_f32`], [`rounds_in_tiles`],
//! [`rounds_while_loading`]), and the f32 kernel's ways of multiplying rounded operands giving
//! the same bits.

use super::*;
use crate::{Causal, ForwardInputs};

/// The f32 kernel on rounded copies serves bf16 calls without bf16 instructions, and on
/// Intel's AVX512-BF16 level every call but decoding in place; never at AMX.
#[test]
fn bf16_calls_take_the_f32_kernel_where_it_is_faster() {
    let contiguous = [0, 0, 0, 1];
    let route = |[h, g, s, t]: [usize; 4]| {
        let plan = Plan::new([1, h, s, 64], [g, t, 64]);
        rounds_into_f32(decodes_in_place(&plan, contiguous, contiguous))
    };
    let large = route([8, 8, 512, 512]);
    let [small, decoding] = [route([12, 12, 128, 128]), route([32, 8, 1, 4096])];
    let level = crate::bf16_level();
    match level {
        crate::Bf16Level::None => assert!(large && small && decoding),
        crate::Bf16Level::Amx => assert!(!large && !small && !decoding),
        crate::Bf16Level::Avx512Bf16 => {
            let intel = crate::bf16::Route::of(level) == crate::bf16::Route::Widened;
            assert_eq!([large, small, decoding], [intel, intel, false]);
        }
    }
}

/// Rounding the operands in the f32 kernel's tiles gives the bits of the f32 kernel on rounded
/// copies (the path it replaces): as the call packs K and V (several row tiles) and as a single
/// row tile puts each block in panels (9 to 64 rows per key/value head); causal alignments,
/// key lengths, GQA, an explicit scale, odd head dims, ragged key blocks, strided queries, and
/// K and V stored `[B, T, G, D]` (rows apart by `G·D`) or transposed (`[B, G, D, T]`, read a
/// column at a time).
#[test]
fn rounding_in_tiles_gives_the_bits_of_rounded_copies() {
    if !crate::simd::simd_level().is_vector() {
        eprintln!("note: scalar level: the kernel rounds copies only; nothing to compare");
        return;
    }
    let lengths = [700, 1];
    let some = Some(&lengths[..]);
    let (none, right, left) = (Causal::None, Causal::BottomRight, Causal::TopLeft);
    // `[B, H, G, S, T, D, Dv]`, the mask, and how K and V are stored: 0 contiguous,
    // 1 `[B, T, G, D]`, 2 transposed.
    for (dims, causal, key_lengths, scale, stored) in [
        ([1, 4, 2, 130, 150, 40, 24], none, None, None, 0),
        ([2, 2, 1, 70, 700, 64, 64], right, some, Some(0.3), 0),
        ([1, 8, 8, 65, 1000, 17, 33], left, None, None, 1),
        ([1, 4, 1, 3, 600, 40, 24], none, None, None, 0),
        ([2, 8, 2, 16, 700, 64, 64], right, some, Some(0.3), 1),
        ([1, 6, 3, 5, 300, 17, 33], left, None, None, 2),
    ] {
        let [b, h, g, s, t, d, dv] = dims;
        let q = crate::testing::random_vec(b * h * s * d, 21);
        let k = crate::testing::random_vec(b * g * t * d, 22);
        let v = crate::testing::random_vec(b * g * t * dv, 23);
        let qv = View4::contiguous(&q, [b, s, h, d])
            .unwrap()
            .permuted([0, 2, 1, 3])
            .unwrap();
        let (kv, vv) = (
            stored_view(&k, [b, g, t, d], stored),
            stored_view(&v, [b, g, t, dv], stored),
        );
        let options = AttentionOptions {
            causal,
            key_lengths,
            scale,
            precision: crate::Precision::Bf16,
            ..Default::default()
        };
        let plan = Plan::new([b, h, s, d], [g, t, dv]);
        assert!(rounds_in_tiles(&plan) && !rounds_while_loading(&plan, &kv, &vv));
        let [rounding, rounded] = rounded_two_ways([qv, kv, vv], &options);
        assert!(
            rounding == rounded,
            "{dims:?} {causal:?} stored {stored}: the bits differ"
        );
    }
}

/// `x` as `[B, G, T, width]`, stored contiguous (`stored` 0), as `[B, T, G, width]` (1) or as
/// `[B, G, width, T]` (2).
pub(super) fn stored_view<T>(x: &[T], [b, g, t, width]: [usize; 4], stored: usize) -> View4<'_, T> {
    match stored {
        0 => View4::contiguous(x, [b, g, t, width]).unwrap(),
        1 => View4::contiguous(x, [b, t, g, width])
            .unwrap()
            .permuted([0, 2, 1, 3])
            .unwrap(),
        _ => View4::contiguous(x, [b, g, width, t])
            .unwrap()
            .permuted([0, 1, 3, 2])
            .unwrap(),
    }
}

/// Decoding rounds f32 K and V as its kernels load them, with the bits of the f32 kernel on
/// rounded copies (the path it replaces): grouped heads, keys split across tasks, eight rows per
/// key/value head, `D` with a tail and `Dv` not a whole number of panels (widened into the
/// tile's panels), key lengths, ALiBi and an explicit scale, and keys and values of every size
/// (subnormals, values that round up into the next binade, ties).
#[test]
fn rounding_while_loading_gives_the_bits_of_rounded_copies() {
    if !crate::simd::simd_level().is_vector() {
        eprintln!("note: scalar level: the kernel rounds copies only; nothing to compare");
        return;
    }
    let lengths = [300, 7];
    let slopes: Vec<f32> = (0..8).map(|i| 0.5f32.powi(i + 1)).collect();
    for (b, h, g, s, t, d, dv, key_lengths, alibi) in [
        (1, 32, 8, 1, 1100, 64, 64, None, false),
        (2, 4, 2, 1, 300, 40, 24, Some(&lengths[..]), true),
        (1, 4, 1, 2, 77, 16, 16, None, true),
    ] {
        let special = |x: f32, i: usize| match i % 13 {
            3 => f32::from_bits(0x0000_0101 + i as u32),
            5 => f32::from_bits(0x3F80_8000),
            7 => f32::from_bits(0xBF7F_FFFF),
            _ => x,
        };
        let q = crate::testing::random_vec(b * h * s * d, 31);
        let k: Vec<f32> = crate::testing::random_vec(b * g * t * d, 32)
            .iter()
            .enumerate()
            .map(|(i, &x)| special(x, i))
            .collect();
        let v: Vec<f32> = crate::testing::random_vec(b * g * t * dv, 33)
            .iter()
            .enumerate()
            .map(|(i, &x)| special(x, i))
            .collect();
        let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
        let (kv, vv) = (
            View4::contiguous(&k, [b, g, t, d]).unwrap(),
            View4::contiguous(&v, [b, g, t, dv]).unwrap(),
        );
        let options = AttentionOptions {
            key_lengths,
            alibi_slopes: alibi.then(|| &slopes[..h]),
            scale: alibi.then_some(0.3),
            precision: crate::Precision::Bf16,
            ..Default::default()
        };
        let plan = Plan::new([b, h, s, d], [g, t, dv]);
        assert!(rounds_while_loading(&plan, &kv, &vv) && !rounds_in_tiles(&plan));
        let [rounding, rounded] = rounded_two_ways([qv, kv, vv], &options);
        assert!(
            rounding == rounded,
            "[{b}, {h}, {g}, {s}, {t}, {d}, {dv}]: the bits differ"
        );
    }
}

/// The bits of `out` and `lse` of a bf16 call run by the f32 kernel rounding its operands
/// itself ([`Operation::RoundingF32`]) and on rounded copies ([`Operation::RoundedF32`]).
fn rounded_two_ways([q, k, v]: [View4<'_, f32>; 3], options: &AttentionOptions<'_>) -> [(Vec<u32>, Vec<u32>); 2] {
    let ([b, h, s, d], dv) = (q.shape(), v.shape()[3]);
    [Operation::RoundingF32, Operation::RoundedF32].map(|operation| {
        let mut out = vec![f32::NAN; b * h * s * dv];
        let mut lse = vec![f32::NAN; b * h * s];
        let mut out_view = ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap();
        let mut lse_view = Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap());
        let plan = validate("test", out_view.shape(), Some([b, h, s]), &q, &k, &v, options).unwrap();
        let scale = crate::mask::resolve_scale(options, d);
        let dst = Dst::new(&mut out_view, &mut lse_view, &mut None);
        if operation == Operation::RoundingF32 {
            attend(
                &plan,
                ForwardInputs::new(q, k, v),
                options,
                scale,
                operation,
                dst,
                None,
                Par::Rayon,
            );
        } else {
            let copies = super::rounded_copies(&[(&q, scale), (&k, 1.0), (&v, 1.0)], Par::Rayon);
            let (qr, rest) = copies.split_at(q.shape().iter().product());
            let (kr, vr) = rest.split_at(k.shape().iter().product());
            let inputs = ForwardInputs::new(
                View4::contiguous(qr, q.shape()).unwrap(),
                View4::contiguous(kr, k.shape()).unwrap(),
                View4::contiguous(vr, v.shape()).unwrap(),
            );
            attend(&plan, inputs, options, 1.0, operation, dst, None, Par::Rayon);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (bits(&out), bits(&lse))
    })
}
