//! Which kernel a bf16 call takes ([`rounds_into_f32`], [`rounds_while_packing`]), and the
//! f32 kernel's two ways of multiplying rounded operands giving the same bits.

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

/// Rounding the operands as the f32 kernel packs them gives the bits of the f32 kernel on
/// rounded copies (the path it replaces): causal alignments, key lengths, GQA, an explicit
/// scale, odd head dims, ragged key blocks, strided queries.
#[test]
fn rounding_while_packing_gives_the_bits_of_rounded_copies() {
    if !crate::simd::simd_level().is_vector() {
        eprintln!("note: scalar level: the kernel rounds copies only; nothing to compare");
        return;
    }
    let lengths = [700, 1];
    for (b, h, g, s, t, d, dv, causal, key_lengths, scale) in [
        (1, 4, 2, 130, 150, 40, 24, Causal::None, None, None),
        (
            2,
            2,
            1,
            70,
            700,
            64,
            64,
            Causal::BottomRight,
            Some(&lengths[..]),
            Some(0.3),
        ),
        (1, 8, 8, 65, 1000, 17, 33, Causal::TopLeft, None, None),
    ] {
        let q = crate::testing::random_vec(b * h * s * d, 21);
        let k = crate::testing::random_vec(b * g * t * d, 22);
        let v = crate::testing::random_vec(b * g * t * dv, 23);
        let qv = View4::contiguous(&q, [b, s, h, d])
            .unwrap()
            .permuted([0, 2, 1, 3])
            .unwrap();
        let (kv, vv) = (
            View4::contiguous(&k, [b, g, t, d]).unwrap(),
            View4::contiguous(&v, [b, g, t, dv]).unwrap(),
        );
        let options = AttentionOptions {
            causal,
            key_lengths,
            scale,
            precision: crate::Precision::Bf16,
            ..Default::default()
        };
        let run = |operation: Operation| {
            let mut out = vec![f32::NAN; b * h * s * dv];
            let mut lse = vec![f32::NAN; b * h * s];
            let mut out_view = ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap();
            let mut lse_view = Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap());
            let plan = validate("test", out_view.shape(), Some([b, h, s]), &qv, &kv, &vv, &options).unwrap();
            assert!(rounds_while_packing(&plan, &kv));
            let scale = crate::mask::resolve_scale(&options, d);
            let dst = Dst::new(&mut out_view, &mut lse_view, &mut None);
            if operation == Operation::RoundingF32 {
                attend(
                    &plan,
                    ForwardInputs::new(qv, kv, vv),
                    &options,
                    scale,
                    operation,
                    dst,
                    None,
                    Par::Rayon,
                );
            } else {
                let copies = super::rounded_copies(&[(&qv, scale), (&kv, 1.0), (&vv, 1.0)], Par::Rayon);
                let (qr, rest) = copies.split_at(b * h * s * d);
                let (kr, vr) = rest.split_at(b * g * t * d);
                let inputs = ForwardInputs::new(
                    View4::contiguous(qr, [b, h, s, d]).unwrap(),
                    View4::contiguous(kr, [b, g, t, d]).unwrap(),
                    View4::contiguous(vr, [b, g, t, dv]).unwrap(),
                );
                attend(&plan, inputs, &options, 1.0, operation, dst, None, Par::Rayon);
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            (bits(&out), bits(&lse))
        };
        let while_packing = run(Operation::RoundingF32);
        assert!(
            while_packing == run(Operation::RoundedF32),
            "[{b}, {h}, {g}, {s}, {t}, {d}, {dv}] {causal:?}: the bits differ"
        );
    }
}
