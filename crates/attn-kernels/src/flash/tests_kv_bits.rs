//! [`attention_bf16_kv`] against [`crate::attention`] on the widened values: the same bits, at
//! this machine's level (CI runs these at `amx`, `avx512bf16`, `avx2` and `scalar`), with the
//! bits read in place where the call is decoding (by the bf16 kernels where the level has bf16
//! instructions, else by the f32 ones at every vector level). The bound of `tests_bf16.rs` then holds for the
//! bits as it does for the widened values.

use super::kv_bits::{route, KvRoute};
use crate::testing::random_vec;
use crate::{
    attention, attention_bf16_kv, bf16_to_f32, f32_to_bf16, AttentionOptions, Bf16Level, Causal, ForwardInputs, Mask,
    Par, Precision, View4, ViewMut, ViewMut4,
};

/// One call: `[B, H, G, S, T, D, Dv]`, and the capacity of the cache-like storage of K and V
/// (`cap ≥ T` positions per `(b, g)`, as `attn_core::KvCache` lays them out).
#[derive(Clone, Copy, Debug)]
struct Shape {
    dims: [usize; 7],
    cap: usize,
}

/// `[B, G, cap, width]` bits of random values in `[-2, 2)`.
fn cache_bits(seed: u64, [b, g, width]: [usize; 3], cap: usize) -> Vec<u16> {
    random_vec(b * g * cap * width, seed)
        .iter()
        .map(|&x| f32_to_bf16(2.0 * x))
        .collect()
}

fn cache_view(bits: &[u16], [b, g, t, width]: [usize; 4], cap: usize) -> View4<'_, u16> {
    View4::new(bits, [b, g, t, width], [g * cap * width, cap * width, width, 1]).unwrap()
}

/// `attention_bf16_kv` on the bits and `attention` on their widened values (contiguous), out
/// and LSE of each.
fn both(
    shape: Shape,
    q: &[f32],
    [k, v]: [&View4<'_, u16>; 2],
    options: &AttentionOptions<'_>,
    par: Par,
) -> [(Vec<f32>, Vec<f32>); 2] {
    let [b, h, _, s, _, _, dv] = shape.dims;
    let qv = View4::contiguous(q, [b, h, s, q.len() / (b * h * s)]).unwrap();
    let run = |call: &dyn Fn(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>)| {
        let (mut out, mut lse) = (vec![f32::NAN; b * h * s * dv], vec![f32::NAN; b * h * s]);
        call(
            ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
            ViewMut::contiguous(&mut lse, [b, h, s]).unwrap(),
        );
        (out, lse)
    };
    let got = run(&|o, l| attention_bf16_kv(o, Some(l), qv, *k, *v, options, par).unwrap());
    let widen = |x: &View4<'_, u16>| -> Vec<f32> {
        let [n0, n1, n2, n3] = x.shape();
        let mut out = Vec::new();
        for i in 0..n0 {
            for j in 0..n1 {
                for r in 0..n2 {
                    out.extend((0..n3).map(|c| bf16_to_f32(x.get([i, j, r, c]))));
                }
            }
        }
        out
    };
    let (kw, vw) = (widen(k), widen(v));
    let inputs = ForwardInputs::new(
        qv,
        View4::contiguous(&kw, k.shape()).unwrap(),
        View4::contiguous(&vw, v.shape()).unwrap(),
    );
    let want = run(&|o, l| attention(o, Some(l), inputs, options, par).unwrap());
    [got, want]
}

/// The plan of a call of `[B, H, G, S, T, D, Dv]`.
fn plan([b, h, g, s, t, d, dv]: [usize; 7]) -> super::Plan {
    super::Plan::new([b, h, s, d], [g, t, dv])
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

const SHAPES: [Shape; 7] = [
    // Decoding with grouped heads: 4 rows per key/value head, one key block plus a tail.
    Shape {
        dims: [1, 8, 2, 1, 300, 64, 64],
        cap: 512,
    },
    // Long keys: split across tasks (split-KV); D and Dv not multiples of 16.
    Shape {
        dims: [2, 4, 4, 1, 1100, 40, 24],
        cap: 1100,
    },
    // Eight rows per key/value head: the most read in place.
    Shape {
        dims: [1, 4, 1, 2, 77, 16, 16],
        cap: 80,
    },
    // Nine rows per head: packed for the call from the bits in bf16 (prefill's kernels).
    Shape {
        dims: [1, 2, 2, 9, 50, 16, 16],
        cap: 64,
    },
    // Prefill: two row tiles, two key blocks (the second ragged), whole and ragged panels of
    // 16 keys, Dv not a multiple of 16.
    Shape {
        dims: [1, 4, 2, 70, 300, 64, 40],
        cap: 320,
    },
    // One key.
    Shape {
        dims: [1, 2, 1, 1, 1, 8, 8],
        cap: 4,
    },
    // Many `(b, g)`, more than the threads: one row tile and two key blocks each.
    Shape {
        dims: [4, 16, 8, 20, 300, 24, 20],
        cap: 320,
    },
];

/// The bits of `attention` on the widened values, in both precisions, for every shape, with
/// and without each option that changes a row's keys or scores, sequential and parallel; and
/// decoding is read in place exactly where the level's kernels can: bf16's with bf16
/// instructions, the f32 ones at a vector level (on rounded operands in bf16 without bf16
/// instructions), with values of whole panels and not (`Dv` 64, 16, 24, 8).
#[test]
fn bits_give_the_bits_of_the_widened_values() {
    super::tests_bf16::each_bf16_kernel(|route| {
        eprintln!("bits_give_the_bits_of_the_widened_values: {route}");
        bits_give_the_bits_of_the_widened_values_once();
    });
}

fn bits_give_the_bits_of_the_widened_values_once() {
    // Calls read in place, in f32 and in bf16.
    let mut in_place_calls = [0, 0];
    for (n, shape) in SHAPES.iter().enumerate() {
        let [b, h, g, s, t, d, dv] = shape.dims;
        let seed = 10 * n as u64;
        let q = random_vec(b * h * s * d, seed);
        let k_bits = cache_bits(seed + 1, [b, g, d], shape.cap);
        let v_bits = cache_bits(seed + 2, [b, g, dv], shape.cap);
        let (k, v) = (
            cache_view(&k_bits, [b, g, t, d], shape.cap),
            cache_view(&v_bits, [b, g, t, dv], shape.cap),
        );
        let lengths: Vec<usize> = (0..b).map(|i| (t - i * t / 3).max(1)).collect();
        let additive = random_vec(b * h * s * t, seed + 3);
        let slopes: Vec<f32> = (0..h).map(|i| 0.5f32.powi(i as i32 + 1)).collect();
        let masks = [
            AttentionOptions::default(),
            AttentionOptions {
                causal: Causal::BottomRight,
                key_lengths: Some(&lengths),
                ..Default::default()
            },
            AttentionOptions {
                mask: Mask::Additive(View4::contiguous(&additive, [b, h, s, t]).unwrap()),
                alibi_slopes: Some(&slopes),
                scale: Some(0.3),
                ..Default::default()
            },
        ];
        for (m, base) in masks.iter().enumerate() {
            for precision in [Precision::F32, Precision::Bf16] {
                let options = AttentionOptions { precision, ..*base };
                let kernels = match precision {
                    Precision::Bf16 => crate::bf16_level() != Bf16Level::None || crate::simd_level().is_vector(),
                    Precision::F32 => crate::simd_level().is_vector(),
                };
                let expect_in_place = kernels && s * h / g <= crate::DECODE_ROWS;
                let chosen = route(&plan(shape.dims), &k, &v, &options);
                in_place_calls[usize::from(precision == Precision::Bf16)] +=
                    usize::from(chosen == KvRoute::ReadsInPlace(precision));
                assert_eq!(
                    chosen == KvRoute::ReadsInPlace(precision),
                    expect_in_place,
                    "{shape:?} {precision}: {chosen:?}"
                );
                if !expect_in_place {
                    assert_eq!(chosen, prefill_route(precision), "{shape:?} {precision}");
                }
                for par in [Par::Seq, Par::Rayon] {
                    let [got, want] = both(*shape, &q, [&k, &v], &options, par);
                    let what = format!("{shape:?} mask {m} {precision} {par:?}");
                    assert!(same_bits(&got.0, &want.0), "out of {what}");
                    assert!(same_bits(&got.1, &want.1), "lse of {what}");
                    assert!(got.0.iter().all(|x| x.is_finite()), "{what}");
                }
            }
        }
    }
    // Four decoding shapes, three masks each, in each precision, where the level has kernels
    // that read them (bf16 instructions for bf16's, or the vector f32 ones).
    if crate::simd_level().is_vector() {
        assert_eq!(in_place_calls, [4 * 3, 4 * 3]);
    } else {
        assert_eq!(in_place_calls, [0, 0]);
        println!("note: the portable level: every call widened (checked all the same)");
    }
}

/// The route of a call of more rows than decoding's, contiguous or strided: bf16's kernels on
/// packed bits where bf16 runs on bf16 instructions, else the f32 kernel converting the bits
/// in its tiles at a vector level, else copies.
fn prefill_route(precision: Precision) -> KvRoute {
    let bf16_kernels = crate::bf16_level() != Bf16Level::None && !super::rounds_into_f32(false);
    if precision == Precision::Bf16 && bf16_kernels {
        KvRoute::PacksBits
    } else if crate::simd_level().is_vector() {
        KvRoute::Converts(precision)
    } else {
        KvRoute::Widens
    }
}

/// Bits that read differently when mishandled: subnormals (in bf16 zeros of their sign, as
/// rounding gives; in f32 their values), negative zero, the largest finite bf16, and
/// infinities and NaN in keys past the key length and in values of masked keys (the
/// non-finite policy of `attention`: the repair). Both precisions.
#[test]
fn special_bits_read_as_their_widened_values() {
    super::tests_bf16::each_bf16_kernel(|kernel| {
        for precision in [Precision::F32, Precision::Bf16] {
            eprintln!("special_bits_read_as_their_widened_values: {kernel}, {precision}");
            // Values of whole panels (read in place when decoding) and not (widened into
            // panels first); one query row (decoding), twelve (24 rows per key/value head:
            // one row tile) and forty (two row tiles: K and V packed).
            for (s, dv) in [(1, 32), (1, 24), (12, 32), (12, 24), (40, 32), (40, 24)] {
                special_bits_read_as_their_widened_values_once(precision, s, dv);
            }
        }
    });
}

fn special_bits_read_as_their_widened_values_once(precision: Precision, s: usize, dv: usize) {
    let shape = Shape {
        dims: [1, 4, 2, s, 40, 32, dv],
        cap: 48,
    };
    let [b, h, g, s, t, d, dv] = shape.dims;
    let q = random_vec(b * h * s * d, 7);
    let mut k_bits = cache_bits(8, [b, g, d], shape.cap);
    let mut v_bits = cache_bits(9, [b, g, dv], shape.cap);
    v_bits[3] = 0x8000;
    v_bits[4] = 0x7F7F;
    v_bits[5] = 0xFF7F;
    let lengths = [30usize];
    let options = AttentionOptions {
        precision,
        key_lengths: Some(&lengths),
        ..Default::default()
    };
    let (k, v) = (
        cache_view(&k_bits, [b, g, t, d], shape.cap),
        cache_view(&v_bits, [b, g, t, dv], shape.cap),
    );
    let [got, want] = both(shape, &q, [&k, &v], &options, Par::Seq);
    assert!(
        same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1),
        "finite specials"
    );
    // Subnormal bits (a zero exponent) read as zeros of their sign. Keys all subnormal under
    // queries near 1e38 would give scores of order one if read as values (all zeros if not);
    // values subnormal in one column would give that column subnormal outputs (zeros if not).
    let mut tiny_k = k_bits.clone();
    for (i, x) in tiny_k.iter_mut().enumerate() {
        *x = (1 + i * 37 % 0x7F) as u16 | if i % 3 == 0 { 0x8000 } else { 0 };
    }
    let mut tiny_v = v_bits.clone();
    for row in tiny_v.chunks_mut(dv) {
        row[7] = 0x0040;
    }
    let big_q: Vec<f32> = q.iter().map(|x| x * 1e38).collect();
    let (k, v) = (
        cache_view(&tiny_k, [b, g, t, d], shape.cap),
        cache_view(&tiny_v, [b, g, t, dv], shape.cap),
    );
    let [got, want] = both(shape, &big_q, [&k, &v], &options, Par::Seq);
    assert!(
        same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1),
        "subnormal bits"
    );
    match precision {
        Precision::Bf16 => assert!(
            got.0.chunks(dv).all(|row| row[7] == 0.0),
            "subnormal values read as zeros"
        ),
        Precision::F32 => assert!(
            got.0.chunks(dv).all(|row| row[7] != 0.0),
            "subnormal values read as their values"
        ),
    }
    // Past the key length: an infinite key and a NaN value the rows never see.
    k_bits[35 * d] = 0x7F80;
    v_bits[36 * dv + 1] = 0x7FC0;
    let (k, v) = (
        cache_view(&k_bits, [b, g, t, d], shape.cap),
        cache_view(&v_bits, [b, g, t, dv], shape.cap),
    );
    let [got, want] = both(shape, &q, [&k, &v], &options, Par::Seq);
    assert!(
        same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1),
        "non-finite past the length"
    );
    assert!(
        got.0.iter().all(|x| x.is_finite()),
        "what the rows cannot see does not reach them"
    );
    // Inside it: the policy of `attention` on the widened values, NaN where it reaches.
    v_bits[2 * dv] = 0x7FC0;
    let v = cache_view(&v_bits, [b, g, t, dv], shape.cap);
    let [got, want] = both(shape, &q, [&k, &v], &options, Par::Seq);
    assert!(
        same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1),
        "NaN inside the length"
    );
    assert!(got.0.iter().any(|x| x.is_nan()), "a visible NaN value reaches its rows");
}

/// A strided last dimension is widened when decoding (the in-place kernels need contiguous
/// rows) and converted in the tiles otherwise, with the same bits either way; shapes that do
/// not match are typed errors naming the tensor.
#[test]
fn strided_bits_and_shape_errors() {
    let (b, h, g, s, t, d) = (1, 2, 2, 1, 20, 8);
    let q = random_vec(b * h * s * d, 1);
    let bits = cache_bits(2, [b, g, 2 * d], t);
    let strided = View4::new(&bits, [b, g, t, d], [g * t * 2 * d, t * 2 * d, 2 * d, 2]).unwrap();
    let options = AttentionOptions {
        precision: Precision::Bf16,
        ..Default::default()
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let options = AttentionOptions { precision, ..options };
        let chosen = route(&plan([b, h, g, s, t, d, d]), &strided, &strided, &options);
        assert_eq!(chosen, KvRoute::Widens, "{precision}");
    }
    let shape = Shape {
        dims: [b, h, g, s, t, d, d],
        cap: t,
    };
    for par in [Par::Seq, Par::Rayon] {
        let [got, want] = both(shape, &q, [&strided, &strided], &options, par);
        assert!(same_bits(&got.0, &want.0), "{par:?}");
    }
    // More rows (10 and 80 per key/value head: one row tile, and two packed for the call) over
    // K and V stored `[B, T, G, D]` and transposed, two key blocks: converted in the tiles.
    for (s, stored) in [(5, 1), (5, 2), (40, 1), (40, 2)] {
        let (t, d, dv) = (300, 24, 40);
        let shape = Shape {
            dims: [b, 4, g, s, t, d, dv],
            cap: t,
        };
        let (k_bits, v_bits) = (cache_bits(5, [b, g, d], t), cache_bits(6, [b, g, dv], t));
        let stored_view = super::tests_bf16_route::stored_view;
        let (k, v) = (
            stored_view(&k_bits, [b, g, t, d], stored),
            stored_view(&v_bits, [b, g, t, dv], stored),
        );
        let q = random_vec(b * 4 * s * d, 7);
        for precision in [Precision::F32, Precision::Bf16] {
            let options = AttentionOptions {
                precision,
                causal: Causal::BottomRight,
                ..Default::default()
            };
            let chosen = route(&plan(shape.dims), &k, &v, &options);
            assert_eq!(chosen, prefill_route(precision), "S {s} stored {stored} {precision}");
            for par in [Par::Seq, Par::Rayon] {
                let [got, want] = both(shape, &q, [&k, &v], &options, par);
                let what = format!("S {s} stored {stored} {precision} {par:?}");
                assert!(same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1), "{what}");
            }
        }
    }
    // Long enough for the widening to take several tasks on rayon's threads (`WIDEN_TASK`),
    // strided, and contiguous (widened in f32 at the portable level, in bf16 without bf16
    // instructions; read in place elsewhere), in f32 and in bf16.
    let long = 3 * super::kv_bits::WIDEN_TASK / d + 5;
    let long_bits = cache_bits(3, [b, g, 2 * d], long);
    let long_shape = Shape {
        dims: [b, h, g, s, long, d, d],
        cap: long,
    };
    let contiguous = cache_view(&long_bits, [b, g, long, 2 * d], long);
    let halves = View4::new(&long_bits, [b, g, long, d], [g * long * 2 * d, long * 2 * d, 2 * d, 2]).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let options = AttentionOptions {
            precision,
            ..Default::default()
        };
        let wide_shape = Shape {
            dims: [b, h, g, s, long, 2 * d, 2 * d],
            cap: long,
        };
        let q_wide = random_vec(b * h * s * 2 * d, 4);
        for par in [Par::Seq, Par::Rayon] {
            let [got, want] = both(wide_shape, &q_wide, [&contiguous, &contiguous], &options, par);
            assert!(same_bits(&got.0, &want.0), "contiguous, {precision} {par:?}");
            let [got, want] = both(long_shape, &q, [&halves, &halves], &options, par);
            assert!(same_bits(&got.0, &want.0), "strided, {precision} {par:?}");
        }
    }

    // No keys at all: the rows attend to nothing, as `attention` gives them (zeros, LSE -inf).
    let empty = Shape {
        dims: [b, h, g, s, 0, d, d],
        cap: 0,
    };
    let none = View4::new(&bits[..0], [b, g, 0, d], [0, 0, d, 1]).unwrap();
    let [got, want] = both(empty, &q, [&none, &none], &options, Par::Seq);
    assert!(same_bits(&got.0, &want.0) && same_bits(&got.1, &want.1));
    assert!(got.0.iter().all(|&x| x == 0.0) && got.1.iter().all(|&x| x == f32::NEG_INFINITY));

    let short = View4::new(&bits, [b, g, t - 1, d], [g * t * 2 * d, t * 2 * d, 2 * d, 1]).unwrap();
    let full = View4::new(&bits, [b, g, t, d], [g * t * 2 * d, t * 2 * d, 2 * d, 1]).unwrap();
    let mut out = vec![0.0f32; b * h * s * d];
    let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
    let out_view = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
    let err = attention_bf16_kv(out_view, None, qv, full, short, &options, Par::Seq).unwrap_err();
    assert!(
        matches!(err, crate::KernelError::ShapeMismatch { tensor: "v", .. }),
        "{err}"
    );
    let three_heads = View4::new(&bits, [b, 3, 4, d], [g * t * 2 * d, 4 * d, d, 1]).unwrap();
    let out_view = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
    let err = attention_bf16_kv(out_view, None, qv, three_heads, three_heads, &options, Par::Seq).unwrap_err();
    assert!(matches!(err, crate::KernelError::HeadsNotDivisible { .. }), "{err}");
}

/// K and V packed straight from their bits hold the words of the widened values packed
/// (`pack_keys_bits` against `pack_keys`, `pack_values_bits` against `pack_values`), in both
/// layouts (pairs for `vdpbf16ps`, whole AMX steps), special bits among them: subnormals,
/// negative zero, infinities, quiet and signalling NaN. Even and odd `D`, `Dv` a whole number
/// of panels or not, whole and ragged panels of 16 keys, one key block and two, and the bits
/// stored transposed (`[B, G, width, T]`, so a row's values are `T` apart).
#[test]
fn packed_bits_hold_the_words_of_the_packed_widened_values() {
    use super::bf16::{key_block_len, key_pairs, pack_keys, pack_keys_bits, pack_values, pack_values_bits};
    use super::bf16::{value_block_len, value_pairs};
    const SPECIAL: [u16; 8] = [0x0001, 0x8040, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFF85];
    for (d, dv, t) in [(64, 64, 300), (24, 32, 40), (33, 20, 50), (16, 16, 16)] {
        let (b, g) = (2, 2);
        let plan = super::Plan::for_precision([b, 2 * g, 20, d], [g, t, dv], Precision::Bf16);
        let bits = |seed, width: usize| {
            let mut x = cache_bits(seed, [b, g, width], t);
            for (i, h) in x.iter_mut().enumerate().filter(|(i, _)| i % 7 == 3) {
                *h = SPECIAL[i % SPECIAL.len()];
            }
            x
        };
        let (k_bits, v_bits) = (bits(31, d), bits(32, dv));
        let widen = |x: &[u16]| x.iter().map(|&h| bf16_to_f32(h)).collect::<Vec<f32>>();
        let (k_wide, v_wide) = (widen(&k_bits), widen(&v_bits));
        let kv = |width| [b, g, t, width];
        // The same values stored `[B, G, width, T]`, read through a transposed view.
        let transposed = |x: &[u16], width: usize| {
            let mut out = vec![0u16; x.len()];
            for (i, &h) in x.iter().enumerate() {
                let (bg, r, c) = (i / (t * width), i / width % t, i % width);
                out[bg * t * width + c * t + r] = h;
            }
            out
        };
        let (k_stored, v_stored) = (transposed(&k_bits, d), transposed(&v_bits, dv));
        fn view(x: &[u16], [b, g, t, width]: [usize; 4], strided: bool) -> View4<'_, u16> {
            if strided {
                View4::contiguous(x, [b, g, width, t])
                    .unwrap()
                    .permuted([0, 1, 3, 2])
                    .unwrap()
            } else {
                View4::contiguous(x, [b, g, t, width]).unwrap()
            }
        }
        for (amx, strided) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("D {d}, Dv {dv}, T {t}, amx {amx}, strided {strided}");
            let blocks = t.div_ceil(super::BF16_BLOCK_KEYS);
            let (k_in, v_in) = if strided {
                (&k_stored, &v_stored)
            } else {
                (&k_bits, &v_bits)
            };
            let from_bits = pack_keys_bits(&plan, &view(k_in, kv(d), strided), amx, Par::Seq);
            let from_wide = pack_keys(&plan, &View4::contiguous(&k_wide, kv(d)).unwrap(), amx, Par::Seq);
            let (len, pairs) = (key_block_len(&plan, amx), key_pairs(&plan, amx));
            for index in 0..b * g * blocks {
                let bc = (t - index % blocks * super::BF16_BLOCK_KEYS).min(super::BF16_BLOCK_KEYS);
                for j in 0..bc {
                    for p in 0..pairs {
                        let at = index * len + j / 16 * pairs * 16 + p * 16 + j % 16;
                        let (x, y) = (from_bits[at].to_bits(), from_wide[at].to_bits());
                        assert_eq!(x, y, "{what}: block {index}, key {j}, pair {p}");
                    }
                }
            }
            let from_bits = pack_values_bits(&plan, &view(v_in, kv(dv), strided), amx, Par::Seq);
            let from_wide = pack_values(&plan, &View4::contiguous(&v_wide, kv(dv)).unwrap(), amx, Par::Seq);
            let (len, pairs) = (value_block_len(&plan, amx), value_pairs(&plan, amx));
            for index in 0..b * g * blocks {
                let bc = (t - index % blocks * super::BF16_BLOCK_KEYS).min(super::BF16_BLOCK_KEYS);
                let read = if amx { pairs } else { bc.div_ceil(2) };
                for panel in 0..plan.dv_pad / 16 {
                    for p in 0..read {
                        for c in 0..16 {
                            let at = index * len + panel * pairs * 16 + p * 16 + c;
                            let (x, y) = (from_bits[at].to_bits(), from_wide[at].to_bits());
                            assert_eq!(x, y, "{what}: block {index}, panel {panel}, pair {p}, column {c}");
                        }
                    }
                }
            }
        }
    }
}
