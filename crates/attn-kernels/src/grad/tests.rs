//! Every backward kernel against central differences of an f64 forward, and the sums against
//! thread counts.

use super::*;
use crate::layer::NormKind;
use crate::testing::random_vec;

/// `∂f/∂x[i]` by central differences in f64.
fn numeric(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    let h = 1e-6 * x[i].abs().max(1.0);
    let (mut up, mut down) = (x.to_vec(), x.to_vec());
    up[i] += h;
    down[i] -= h;
    (f(&up) - f(&down)) / (2.0 * h)
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `|got − want| / (1 + |want|)` over every element, the worst.
fn worst(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

fn pools() -> Vec<rayon::ThreadPool> {
    [1, 2, 3, 8]
        .map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap())
        .into()
}

#[test]
fn linear_backward_matches_finite_differences() {
    let sh = LinearShape {
        n: 70,
        in_dim: 9,
        out_dim: 5,
    };
    let x = random_vec(sh.n * sh.in_dim, 1);
    let w = random_vec(sh.out_dim * sh.in_dim, 2);
    let dy = random_vec(sh.n * sh.out_dim, 3);
    // L = Σ dy ∘ (x·Wᵀ + b) in f64, as a function of x, of W, of b.
    let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        let mut total = 0.0;
        for r in 0..sh.n {
            for o in 0..sh.out_dim {
                let y: f64 = (0..sh.in_dim)
                    .map(|i| x[r * sh.in_dim + i] * w[o * sh.in_dim + i])
                    .sum::<f64>()
                    + b[o];
                total += dy[r * sh.out_dim + o] as f64 * y;
            }
        }
        total
    };
    let (x64, w64, b64) = (widen(&x), widen(&w), vec![0.5; sh.out_dim]);
    let mut dx = vec![f32::NAN; x.len()];
    // dW and db start non-zero: the kernel adds to them.
    let mut dw = vec![1.0f32; w.len()];
    let mut db = vec![2.0f32; sh.out_dim];
    linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &w, sh, Par::Rayon).unwrap();
    let want_dx: Vec<f64> = (0..x.len())
        .map(|i| numeric(&|v| loss(v, &w64, &b64), &x64, i))
        .collect();
    let want_dw: Vec<f64> = (0..w.len())
        .map(|i| 1.0 + numeric(&|v| loss(&x64, v, &b64), &w64, i))
        .collect();
    let want_db: Vec<f64> = (0..sh.out_dim)
        .map(|i| 2.0 + numeric(&|v| loss(&x64, &w64, v), &b64, i))
        .collect();
    // f32 GEMMs over 70 rows: measured below 1e-6.
    assert!(worst(&dx, &want_dx) < 1e-5, "dx {}", worst(&dx, &want_dx));
    assert!(worst(&dw, &want_dw) < 1e-5, "dw {}", worst(&dw, &want_dw));
    assert!(worst(&db, &want_db) < 1e-5, "db {}", worst(&db, &want_db));
    for pool in pools() {
        let (mut dx2, mut dw2, mut db2) = (vec![0.0; x.len()], vec![1.0f32; w.len()], vec![2.0f32; sh.out_dim]);
        pool.install(|| linear_backward(Some(&mut dx2), &mut dw2, Some(&mut db2), &dy, &x, &w, sh, Par::Rayon))
            .unwrap();
        assert_eq!(
            (&dx2, &dw2, &db2),
            (&dx, &dw, &db),
            "{} threads",
            pool.current_num_threads()
        );
    }
    let err = linear_backward(None, &mut dw, None, &dy[1..], &x, &w, sh, Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("`dy` has shape [349], expected [350]"),
        "{err}"
    );
}

#[test]
fn norm_backward_matches_finite_differences() {
    let (rows, e) = (150, 12);
    let x: Vec<f32> = random_vec(rows * e, 4).iter().map(|v| 2.0 + 3.0 * v).collect();
    let w = random_vec(e, 5);
    let b = random_vec(e, 6);
    let dy = random_vec(rows * e, 7);
    for kind in [NormKind::LayerNorm, NormKind::RmsNorm] {
        let eps = 0.1f32;
        let center = kind == NormKind::LayerNorm;
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            let mut total = 0.0;
            for (r, row) in x.chunks(e).enumerate() {
                let mean = if center {
                    row.iter().sum::<f64>() / e as f64
                } else {
                    0.0
                };
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for j in 0..e {
                    let y = (row[j] - mean) * inv * w[j] + if center { b[j] } else { 0.0 };
                    total += dy[r * e + j] as f64 * y;
                }
            }
            total
        };
        let (x64, w64, b64) = (widen(&x), widen(&w), widen(&b));
        let mut dx = vec![0.25f32; x.len()];
        let mut dw = vec![0.0f32; e];
        let mut dbias = vec![0.0f32; e];
        let db = if center { Some(&mut dbias[..]) } else { None };
        norm_backward(&mut dx, &mut dw, db, &dy, &x, &w, (kind, eps), Par::Rayon).unwrap();
        // dx was 0.25 before: the kernel adds.
        let want_dx: Vec<f64> = (0..x.len())
            .map(|i| 0.25 + numeric(&|v| loss(v, &w64, &b64), &x64, i))
            .collect();
        let want_dw: Vec<f64> = (0..e).map(|i| numeric(&|v| loss(&x64, v, &b64), &w64, i)).collect();
        // Measured below 1e-7 (f64 inside, one f32 rounding).
        assert!(worst(&dx, &want_dx) < 1e-6, "{kind:?} dx {}", worst(&dx, &want_dx));
        assert!(worst(&dw, &want_dw) < 1e-6, "{kind:?} dw {}", worst(&dw, &want_dw));
        if center {
            let want_db: Vec<f64> = (0..e).map(|i| numeric(&|v| loss(&x64, &w64, v), &b64, i)).collect();
            assert!(worst(&dbias, &want_db) < 1e-6, "db {}", worst(&dbias, &want_db));
        }
        for pool in pools() {
            let (mut dx2, mut dw2, mut db2) = (vec![0.25f32; x.len()], vec![0.0f32; e], vec![0.0f32; e]);
            let db = if center { Some(&mut db2[..]) } else { None };
            pool.install(|| norm_backward(&mut dx2, &mut dw2, db, &dy, &x, &w, (kind, eps), Par::Rayon))
                .unwrap();
            assert_eq!(
                (&dx2, &dw2),
                (&dx, &dw),
                "{kind:?} {} threads",
                pool.current_num_threads()
            );
        }
    }
}

#[test]
fn activation_backward_matches_finite_differences() {
    let u: Vec<f32> = (0..4001).map(|i| -8.0 + 16.0 * i as f32 / 4000.0 + 1e-3).collect();
    let dy = random_vec(u.len(), 8);
    for act in [
        Activation::Identity,
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        let f = |x: f64| -> f64 {
            match act {
                Activation::Identity => x,
                Activation::Relu => x.max(0.0),
                Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
                Activation::GeluTanh => {
                    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
                }
            }
        };
        let mut du = vec![f32::NAN; u.len()];
        activation_backward(&mut du, &dy, &u, act, Par::Rayon).unwrap();
        for i in 0..u.len() {
            let x = u[i] as f64;
            let h = 1e-6;
            let want = dy[i] as f64 * (f(x + h) - f(x - h)) / (2.0 * h);
            // The f32 erf and exp: measured below 1e-6.
            assert!((du[i] as f64 - want).abs() < 1e-5, "{act:?}'({x}): {} vs {want}", du[i]);
        }
        // In place: the same bits, sequential or not.
        for par in [Par::Seq, Par::Rayon] {
            let mut g = dy.clone();
            activation_backward_in_place(&mut g, &u, act, par).unwrap();
            assert!(
                g.iter().zip(&du).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{act:?} in place, {par:?}"
            );
        }
    }
    // ReLU from its output (scaled by dropout's 1/(1 − p), some elements dropped), with the
    // gradient dropped where the output was: the bits of the derivative at the input, infinities
    // and NaN included.
    let mut u = u.clone();
    u.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30, -1e-30]);
    let mut dy = random_vec(u.len(), 11);
    let dropped = |i: usize| i.is_multiple_of(3);
    let mut out = vec![0.0f32; u.len()];
    for i in 0..u.len() {
        let relu = if u[i] > 0.0 || u[i].is_nan() { u[i] } else { 0.0 };
        (out[i], dy[i]) = if dropped(i) {
            (0.0, 0.0)
        } else {
            (relu * 1.25, dy[i] * 1.25)
        };
    }
    let mut from_input = vec![f32::NAN; u.len()];
    activation_backward(&mut from_input, &dy, &u, Activation::Relu, Par::Seq).unwrap();
    activation_backward_in_place(&mut dy, &out, Activation::Relu, Par::Rayon).unwrap();
    assert!(dy.iter().zip(&from_input).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(activation_backward_in_place(&mut [1.0; 3], &[1.0; 2], Activation::Relu, Par::Seq).is_err());
    // ReLU's derivative at 0 is PyTorch's 0 (the grid above never lands on 0).
    let mut du = [f32::NAN; 2];
    activation_backward(&mut du, &[1.0, 1.0], &[0.0, -0.0], Activation::Relu, Par::Seq).unwrap();
    assert_eq!(du, [0.0, 0.0]);
}

#[test]
fn embedding_and_its_backward() {
    let (vocab, e) = (11, 37);
    let table = random_vec(vocab * e, 9);
    // Repeated ids: their gradients add up.
    let ids = [3, 0, 3, 10, 3, 7];
    let mut y = vec![0.0f32; ids.len() * e];
    embedding(&mut y, &table, &ids, e).unwrap();
    assert_eq!(&y[2 * e..3 * e], &table[3 * e..4 * e]);
    let dy = random_vec(ids.len() * e, 10);
    let mut dtable = vec![0.0f32; vocab * e];
    embedding_backward(&mut dtable, &dy, &ids, e, Par::Seq).unwrap();
    for c in 0..e {
        let want = dy[c] + dy[2 * e + c] + dy[4 * e + c];
        assert_eq!(dtable[3 * e + c], want, "column {c}");
        assert_eq!(dtable[e + c], 0.0);
    }
    for pool in pools() {
        let mut again = vec![0.0f32; vocab * e];
        pool.install(|| embedding_backward(&mut again, &dy, &ids, e, Par::Rayon))
            .unwrap();
        assert_eq!(again, dtable);
    }
    // A bad id anywhere is refused before any row is written.
    let before = y.clone();
    let err = embedding(&mut y[..2 * e], &table, &[1, 11], e).unwrap_err();
    assert!(err.to_string().contains("a token id is 11"), "{err}");
    assert_eq!(y, before);
    assert!(embedding_backward(&mut dtable, &dy[..e], &[11], e, Par::Seq).is_err());
}

#[test]
fn cross_entropy_matches_its_definition_and_finite_differences() {
    let (n, v) = (9, 7);
    let logits: Vec<f32> = random_vec(n * v, 11).iter().map(|x| 4.0 * x).collect();
    let targets: Vec<i64> = vec![0, 6, -100, 3, 3, 1, -100, 5, 2];
    for smoothing in [0.0f32, 0.1] {
        let loss = |x: &[f64]| -> f64 {
            let mut total = 0.0;
            let mut count = 0;
            for (r, &t) in targets.iter().enumerate() {
                if t == -100 {
                    continue;
                }
                count += 1;
                let row = &x[r * v..(r + 1) * v];
                let log_z = row.iter().map(|y| y.exp()).sum::<f64>().ln();
                let nll = log_z - row[t as usize];
                let uniform = row.iter().map(|y| log_z - y).sum::<f64>() / v as f64;
                total += (1.0 - smoothing as f64) * nll + smoothing as f64 * uniform;
            }
            total / count as f64
        };
        let mut d = vec![f32::NAN; n * v];
        let result = cross_entropy(&mut d, &logits, &targets, -100, smoothing, Par::Rayon).unwrap();
        let x64 = widen(&logits);
        assert_eq!(result.count, 7);
        assert!(
            (result.loss - loss(&x64)).abs() < 1e-12,
            "loss {} vs {}",
            result.loss,
            loss(&x64)
        );
        let want: Vec<f64> = (0..n * v).map(|i| numeric(&loss, &x64, i)).collect();
        assert!(worst(&d, &want) < 1e-6, "dlogits {}", worst(&d, &want));
        assert!(
            d[2 * v..3 * v].iter().all(|&g| g == 0.0),
            "an ignored row has no gradient"
        );
    }
    // Every row ignored: NaN loss (as PyTorch), no gradient.
    let mut d = vec![1.0f32; 2 * v];
    let r = cross_entropy(&mut d, &logits[..2 * v], &[-100, -100], -100, 0.0, Par::Seq).unwrap();
    assert!(r.loss.is_nan() && r.count == 0 && d.iter().all(|&g| g == 0.0));
    let err = cross_entropy(&mut d, &logits[..2 * v], &[7, 0], -100, 0.0, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("a target is 7"), "{err}");
    assert!(cross_entropy(&mut d, &logits[..2 * v], &[1, 0], -100, 1.5, Par::Seq).is_err());
    // Logits that are not whole rows, no targets, and rows of no classes (even when every row
    // is ignored): errors naming what is wrong.
    let err = cross_entropy(&mut d[..13], &logits[..13], &[1, 0], -100, 0.0, Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("`logits` has shape [13], expected [2, 7]"),
        "{err}"
    );
    let err = cross_entropy(&mut [], &[], &[], -100, 0.0, Par::Seq).unwrap_err();
    assert!(
        err.to_string()
            .contains("the number of targets is 0, expected at least 1"),
        "{err}"
    );
    let err = cross_entropy(&mut [], &[], &[-100, -100], -100, 0.0, Par::Seq).unwrap_err();
    assert!(
        err.to_string()
            .contains("the number of classes is 0, expected at least 1"),
        "{err}"
    );
}

/// A logit of −∞ (a class masked out) has probability 0 and gradient 0, as in PyTorch: the loss
/// of a row whose target is another class stays finite without label smoothing, and is +∞ when
/// the target is the masked class or when smoothing gives the masked class a share of the
/// target; never NaN. The values are PyTorch 2.15's `F.cross_entropy` on `[[0, -inf, 1]]`.
#[test]
fn a_minus_infinity_logit_gives_pytorch_losses_and_gradients() {
    let logits = [0.0f32, f32::NEG_INFINITY, 1.0];
    let cases: [(i64, f32, f64, [f32; 3]); 5] = [
        (0, 0.0, 1.313_261_628_150_94, [-0.7310586, 0.0, 0.7310586]),
        (1, 0.0, f64::INFINITY, [0.26894143, -1.0, 0.7310586]),
        (0, 0.1, f64::INFINITY, [-0.6643919, -0.033333335, 0.69772524]),
        (1, 0.1, f64::INFINITY, [0.2356081, -0.93333334, 0.69772524]),
        (0, 1.0, f64::INFINITY, [-0.06439191, -0.33333334, 0.39772525]),
    ];
    for (target, smoothing, loss, grad) in cases {
        let mut d = [f32::NAN; 3];
        let got = cross_entropy(&mut d, &logits, &[target], -100, smoothing, Par::Seq).unwrap();
        let case = format!("target {target}, smoothing {smoothing}");
        if loss.is_finite() {
            assert!((got.loss - loss).abs() < 1e-6, "{case}: loss {} vs {loss}", got.loss);
        } else {
            assert_eq!(got.loss, loss, "{case}");
        }
        for (g, w) in d.iter().zip(grad) {
            assert!((g - w).abs() < 1e-6, "{case}: dlogits {d:?} vs {grad:?}");
        }
    }
}

/// `norm_backward` refuses a weight of no columns, an `x` that is not whole rows, and every
/// misshapen buffer, `dbias` included, before it adds anything to `dx` or `dweight`.
#[test]
fn norm_backward_refuses_misshapen_buffers_before_writing() {
    let (rows, e) = (3, 4);
    let (x, dy, w) = (random_vec(rows * e, 1), random_vec(rows * e, 2), random_vec(e, 3));
    let ok = [rows * e, rows * e, e, e, rows * e, e];
    let cases: [(&str, [usize; 6]); 7] = [
        (
            "`x` has shape [12], expected [12, 0]",
            [rows * e, rows * e, 0, e, rows * e, e],
        ),
        (
            "`x` has shape [11], expected [3, 4]",
            [rows * e, rows * e, e, e, rows * e - 1, e],
        ),
        ("`dy` has shape [11]", [rows * e - 1, rows * e, e, e, rows * e, e]),
        ("`dx` has shape [13]", [rows * e, rows * e + 1, e, e, rows * e, e]),
        ("`dweight` has shape [3]", [rows * e, rows * e, e, e - 1, rows * e, e]),
        ("`dbias` has shape [5]", [rows * e, rows * e, e, e, rows * e, e + 1]),
        ("", ok),
    ];
    for (want, [n_dy, n_dx, n_w, n_dw, n_x, n_db]) in cases {
        let (mut dx, mut dw, mut db) = (vec![0.5f32; n_dx], vec![0.5f32; n_dw], vec![0.5f32; n_db]);
        let result = norm_backward(
            &mut dx,
            &mut dw,
            Some(&mut db),
            &dy[..n_dy],
            &x[..n_x],
            &w[..n_w],
            (NormKind::LayerNorm, 1e-5),
            Par::Seq,
        );
        match result {
            Err(err) => {
                assert!(!want.is_empty() && err.to_string().contains(want), "{want}: {err}");
                assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == 0.5), "{want}: written");
            }
            Ok(()) => assert!(want.is_empty() && dx.iter().any(|&v| v != 0.5), "{want}: accepted"),
        }
    }
}

/// The stream is the documented one: SplitMix64's finaliser of the seed (for seed 0 its
/// published first output, 0xE220A8397B1DCDAF) keys two rounds of `lowbias32`. The draws below
/// were computed by an independent Python implementation of that definition, which gives that
/// published output. A run resumed by a later build draws the same masks only while they hold.
/// Also the boundaries: a draw equal to `p` is kept, and `offset + length` may reach 2^32.
#[test]
fn dropout_draws_are_the_documented_stream() {
    let scale = (1u32 << 24) as f32;
    for (seed, index, bits) in [
        (0u64, 0u32, 8_334_764u32),
        (42, 1000, 1_266_136),
        (7, 123_456, 8_566_890),
        (u64::MAX, u32::MAX, 13_722_416),
    ] {
        assert_eq!(
            dropout_uniform(seed, index),
            bits as f32 / scale,
            "seed {seed}, index {index}"
        );
    }
    let u = dropout_uniform(42, 1000);
    for (p, want) in [(u, 1.0 / (1.0 - u)), (u + 1.0 / scale, 0.0)] {
        let mut x = [1.0f32];
        dropout(&mut x, p, 42, 1000, Par::Seq).unwrap();
        assert_eq!(x[0], want, "p {p} against the draw {u}");
    }
    dropout(&mut [1.0; 3], 0.5, 42, 1 << 31, Par::Seq).unwrap();
    dropout(&mut [1.0], 0.5, 42, u32::MAX, Par::Seq).unwrap();
    let err = dropout(&mut [1.0; 2], 0.5, 42, u32::MAX, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("offset + length is 4294967297"), "{err}");
}

#[test]
fn dropout_is_counter_based_and_its_own_backward() {
    let n = 100_003;
    let x = random_vec(n, 12);
    let p = 0.3f32;
    let mut y = x.clone();
    dropout(&mut y, p, 42, 1000, Par::Seq).unwrap();
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    // A binomial fraction over 1e5 draws: the standard deviation is 1.4e-3.
    assert!((dropped - 0.3).abs() < 0.01, "dropped {dropped}");
    for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
        if b != 0.0 {
            assert_eq!(b, a * (1.0 / 0.7), "kept element {i} is scaled by 1/(1-p)");
        }
    }
    // The same seed and offset give the same mask on any thread count; the backward is the same
    // call on the gradient.
    for pool in pools() {
        let mut again = x.clone();
        pool.install(|| dropout(&mut again, p, 42, 1000, Par::Rayon)).unwrap();
        assert_eq!(again, y);
    }
    let mut grad = vec![1.0f32; n];
    dropout(&mut grad, p, 42, 1000, Par::Rayon).unwrap();
    for i in 0..n {
        if x[i] != 0.0 {
            assert_eq!(
                grad[i] == 0.0,
                y[i] == 0.0,
                "element {i}: the backward drops what the forward dropped"
            );
        }
    }
    // Another seed or offset, another mask.
    let mut other = x.clone();
    dropout(&mut other, p, 43, 1000, Par::Seq).unwrap();
    assert_ne!(other, y);
    let mut same = x.clone();
    dropout(&mut same, 0.0, 42, 0, Par::Seq).unwrap();
    assert_eq!(same, x);
    assert!(dropout(&mut same, 1.5, 42, 0, Par::Seq).is_err());
    assert!(
        dropout(&mut same, 0.5, 42, u32::MAX, Par::Seq).is_err(),
        "indices past 2^32"
    );
    // The integer threshold is the float comparison the docs state, on every element (the
    // counters run on across the chunks the work is cut into).
    for (i, &v) in y.iter().enumerate() {
        let u = dropout_uniform(42, 1000 + i as u32);
        assert_eq!(v == 0.0 && x[i] != 0.0, u < p, "element {i}: u = {u}");
    }
    // Neighbouring seeds (consecutive steps) give unrelated masks: about p² of the elements
    // dropped by both.
    let mut next = vec![1.0f32; n];
    dropout(&mut next, p, 43, 1000, Par::Seq).unwrap();
    let both = y.iter().zip(&next).filter(|(a, b)| **a == 0.0 && **b == 0.0).count() as f64 / n as f64;
    assert!((both - 0.09).abs() < 0.01, "dropped by both seeds: {both}");
}

#[test]
fn cross_entropy_parts_add_up_to_the_whole_batch() {
    let (n, v) = (9, 7);
    let logits = random_vec(n * v, 41);
    let targets: Vec<i64> = vec![3, -100, 0, 6, 2, -100, 1, 5, 4];
    let mut whole = vec![0.0f32; n * v];
    let all = cross_entropy(&mut whole, &logits, &targets, -100, 0.1, Par::Seq).unwrap();
    assert_eq!(all.count, 7);
    // Rows 0..4 and 4..9, each divided by the whole batch's 7 counted rows.
    let mut parts = vec![0.0f32; n * v];
    let (d0, d1) = parts.split_at_mut(4 * v);
    let a = cross_entropy_part(d0, &logits[..4 * v], &targets[..4], -100, 0.1, 7, Par::Seq).unwrap();
    let b = cross_entropy_part(d1, &logits[4 * v..], &targets[4..], -100, 0.1, 7, Par::Rayon).unwrap();
    assert_eq!((a.count, b.count), (3, 4));
    // Each row's gradient is the same arithmetic: the same bits.
    assert_eq!(parts, whole);
    assert!(
        (a.loss + b.loss - all.loss).abs() < 1e-15,
        "{} + {} vs {}",
        a.loss,
        b.loss,
        all.loss
    );
    // With its own count as the denominator, a part is the plain call.
    let mut plain = vec![0.0f32; 4 * v];
    let own = cross_entropy(&mut plain, &logits[..4 * v], &targets[..4], -100, 0.1, Par::Seq).unwrap();
    let mut d = vec![0.0f32; 4 * v];
    let same = cross_entropy_part(&mut d, &logits[..4 * v], &targets[..4], -100, 0.1, 3, Par::Seq).unwrap();
    assert_eq!((own, &plain[..]), (same, &d[..]));
    let err = cross_entropy_part(&mut d, &logits[..4 * v], &targets[..4], -100, 0.1, 0, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("denominator"), "{err}");
}

/// Empty dimensions in `linear_backward` and its bf16 twin: `dx` is a sum over no outputs
/// (zeros, written over what was there) when `out = 0`; `db` still gathers `Σ_n dy` when
/// `in = 0`; nothing changes when `n = 0`. A misshapen `dx` or `db` is an error naming it
/// whatever the sizes, so an empty batch does not hide a caller's wrong buffer.
#[test]
fn linear_backward_with_empty_dimensions() {
    type Backward = dyn Fn(
        Option<&mut [f32]>,
        &mut [f32],
        Option<&mut [f32]>,
        &[f32],
        &[f32],
        &[f32],
        LinearShape,
    ) -> Result<(), KernelError>;
    let f32_path: &Backward = &|dx, dw, db, dy, x, w, sh| linear_backward(dx, dw, db, dy, x, w, sh, Par::Rayon);
    let bf16_path: &Backward = &|dx, dw, db, dy, x, w, sh| {
        let packed = crate::Bf16Panels::pack(crate::View2::contiguous(w, [sh.out_dim, sh.in_dim])?);
        crate::linear_backward_bf16(dx, dw, db, dy, x, &packed, sh, Par::Rayon)
    };
    for (name, backward) in [("f32", f32_path), ("bf16", bf16_path)] {
        for (n, in_dim, out_dim) in [(3, 4, 0), (3, 0, 2), (0, 4, 2), (0, 0, 0)] {
            let sh = LinearShape { n, in_dim, out_dim };
            let what = format!("{name} n={n} in={in_dim} out={out_dim}");
            let (dy, x, w) = (
                random_vec(n * out_dim, 1),
                random_vec(n * in_dim, 2),
                random_vec(out_dim * in_dim, 3),
            );
            let mut dx = vec![f32::NAN; n * in_dim];
            let dw_before = random_vec(out_dim * in_dim, 4);
            let db_before = random_vec(out_dim, 5);
            let (mut dw, mut db) = (dw_before.clone(), db_before.clone());
            backward(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &w, sh).unwrap();
            assert!(dx.iter().all(|&v| v == 0.0), "{what}: dx {dx:?}");
            assert_eq!(dw, dw_before, "{what}: dW");
            for (o, (&got, &before)) in db.iter().zip(&db_before).enumerate() {
                let sum: f64 = (0..n).map(|i| dy[i * out_dim + o] as f64).sum();
                assert!((got as f64 - (before as f64 + sum)).abs() <= 1e-6, "{what}: db[{o}]");
            }
            let err = backward(Some(&mut [0.0; 1]), &mut dw, None, &dy, &x, &w, sh).unwrap_err();
            assert!(err.to_string().contains("dx"), "{what}: {err}");
            let err = backward(None, &mut dw, Some(&mut [0.0; 7]), &dy, &x, &w, sh).unwrap_err();
            assert!(err.to_string().contains("db"), "{what}: {err}");
        }
    }
}

/// `sum_of_squares` (the gradient norm of clipping): within f64 rounding of the exact sum, and
/// the bits of its documented arithmetic (32 lanes, each in element order, added in lane order)
/// at whatever level this run has (CI runs these tests at every level the CPU has), on lengths
/// with and without a tail, empty included, and with a value whose square overflows f32.
#[test]
fn sum_of_squares_is_its_lanes_in_order_at_every_level() {
    for len in [0, 1, 31, 32, 33, 1000, 4099] {
        let mut x = random_vec(len, len as u64 + 7);
        if len > 40 {
            x[40] = 3e30; // its square overflows f32, not f64
        }
        let mut lanes = [0.0f64; 32];
        for (i, &v) in x.iter().enumerate() {
            lanes[i % 32] += v as f64 * v as f64;
        }
        let want: f64 = lanes.iter().sum();
        let got = crate::sum_of_squares(&x);
        assert_eq!(got.to_bits(), want.to_bits(), "len {len}: {got} against {want}");
        let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!(
            (got - exact).abs() <= 1e-12 * exact.max(1.0),
            "len {len}: {got} against {exact}"
        );
    }
    assert!(crate::sum_of_squares(&[f32::NAN, 1.0]).is_nan());
    assert_eq!(crate::sum_of_squares(&[f32::INFINITY]), f64::INFINITY);
}

/// `adamw_update` at whatever level this run has (CI runs these tests at every level): the bits
/// of PyTorch's formula evaluated one element at a time in f32, within f32 rounding of the same
/// formula in f64, on lengths with and without a vector tail, with zero gradients and moments
/// among the values; and slices of other lengths are errors naming the slice.
#[test]
fn adamw_update_is_the_scalar_formula_at_every_level() {
    let c = AdamWStep {
        b1: 0.9,
        b2: 0.98,
        eps: 1e-9,
        bias2_sqrt: (1.0f32 - 0.98f32.powi(3)).sqrt(),
        step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
        decay: 1.0 - 1e-3 * 0.01,
    };
    for len in [0, 1, 15, 16, 17, 64, 1000, 4099] {
        let mut x = random_vec(len, len as u64 + 1);
        let mut g = random_vec(len, len as u64 + 2);
        let mut m: Vec<f32> = random_vec(len, len as u64 + 3).iter().map(|v| 0.1 * v).collect();
        let mut v: Vec<f32> = random_vec(len, len as u64 + 4).iter().map(|v| 0.01 * v * v).collect();
        for i in (0..len).step_by(7) {
            (g[i], m[i], v[i]) = (0.0, 0.0, 0.0);
        }
        let (mut want_x, mut want_m, mut want_v) = (x.clone(), m.clone(), v.clone());
        let mut exact = Vec::with_capacity(len);
        for i in 0..len {
            let (x0, g, m0, v0) = (x[i] as f64, g[i] as f64, m[i] as f64, v[i] as f64);
            let m1 = m0 + (1.0 - c.b1 as f64) * (g - m0);
            let v1 = v0 * c.b2 as f64 + (1.0 - c.b2 as f64) * g * g;
            let denom = v1.sqrt() / c.bias2_sqrt as f64 + c.eps as f64;
            exact.push(x0 * c.decay as f64 - c.step_size as f64 * (m1 / denom));
            want_x[i] *= c.decay;
            want_m[i] += (1.0 - c.b1) * (g as f32 - want_m[i]);
            want_v[i] = want_v[i] * c.b2 + (1.0 - c.b2) * g as f32 * g as f32;
            let denom = want_v[i].sqrt() / c.bias2_sqrt + c.eps;
            want_x[i] -= c.step_size * (want_m[i] / denom);
        }
        adamw_update(c, &mut x, &g, &mut m, &mut v).unwrap();
        let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x), bits(&want_x), "len {len}: parameters");
        assert_eq!(bits(&m), bits(&want_m), "len {len}: first moments");
        assert_eq!(bits(&v), bits(&want_v), "len {len}: second moments");
        // The step itself is about 1e-3: the parameters agree with f64 to a few ulps of 1.
        assert!(worst(&x, &exact) < 1e-6, "len {len}: {}", worst(&x, &exact));
    }
    let (mut x, mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4]);
    let err = adamw_update(c, &mut x, &[0.0; 3], &mut m, &mut v).unwrap_err();
    assert!(
        matches!(&err, KernelError::ShapeMismatch { tensor, .. } if *tensor == "g"),
        "{err}"
    );
    let err = adamw_update(c, &mut x, &[0.0; 4], &mut [0.0; 5], &mut v).unwrap_err();
    assert!(
        matches!(&err, KernelError::ShapeMismatch { tensor, .. } if *tensor == "m"),
        "{err}"
    );
    let err = adamw_update(c, &mut x, &[0.0; 4], &mut m, &mut [0.0; 2]).unwrap_err();
    assert!(
        matches!(&err, KernelError::ShapeMismatch { tensor, .. } if *tensor == "v"),
        "{err}"
    );
}

/// The backward of `dropout(relu(u))` from its output: where the output is positive, the bits
/// of replaying the mask ([`dropout`]) then ReLU's derivative; elsewhere `+0`, whatever the
/// gradient (negative, infinite, NaN). At `p` of 0, 0.3 and 1, over more than a chunk, and
/// with infinite and NaN inputs; sequential and on threads; bad `p` and lengths are errors.
#[test]
fn relu_dropout_backward_replays_no_draw() {
    let n = 40_003;
    let mut u = random_vec(n, 21);
    u[..5].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30, -0.0]);
    let mut g = random_vec(n, 22);
    g[5..9].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -3.0]);
    for p in [0.0f32, 0.3, 1.0] {
        // The training forward: `z = dropout(relu(u))`.
        let mut z = u.clone();
        crate::bias_activation(&mut z, n, None, Activation::Relu, Par::Seq).unwrap();
        dropout(&mut z, p, 7, 0, Par::Seq).unwrap();
        // The replayed backward.
        let mut replayed = g.clone();
        dropout(&mut replayed, p, 7, 0, Par::Seq).unwrap();
        activation_backward_in_place(&mut replayed, &z, Activation::Relu, Par::Seq).unwrap();
        for par in [Par::Seq, Par::Rayon] {
            let mut got = g.clone();
            relu_dropout_backward(&mut got, &z, p, par).unwrap();
            for i in 0..n {
                let want = if z[i] > 0.0 { replayed[i] } else { 0.0 };
                assert_eq!(
                    got[i].to_bits(),
                    want.to_bits(),
                    "p {p}, element {i}: z {} g {}",
                    z[i],
                    g[i]
                );
            }
            // Some elements of each kind at 0.3: kept and passed, dropped, kept but negative.
            if p == 0.3 {
                assert!(got.iter().zip(&g).any(|(a, b)| *a != 0.0 && *a == *b * (1.0 / 0.7)));
                assert!((0..n).any(|i| u[i] > 0.0 && z[i] == 0.0));
            }
        }
    }
    let err = relu_dropout_backward(&mut [1.0], &[1.0], 1.5, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("between 0 and 1"), "{err}");
    assert!(relu_dropout_backward(&mut [1.0; 3], &[1.0; 2], 0.1, Par::Seq).is_err());
}
