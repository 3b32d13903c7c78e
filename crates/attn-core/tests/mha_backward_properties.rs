//! `MultiHeadAttention::backward` on what PyTorch's module has no counterpart for: grouped-query
//! heads, RoPE (both styles) and ALiBi. Checked two ways:
//! - against central differences of the forward, at sampled coordinates of every input and
//!   parameter;
//! - grouped-query attention against the same module with every key/value head repeated per
//!   query head, an exact identity: the grouped weight's gradient is the sum of the repeated
//!   rows' gradients.
//!
//! And the tape: its size against a count from the design, and its recycling.

use attn_core::kernels::testing::SplitMix64;
use attn_core::kernels::Par;
use attn_core::{
    Grads, Layout, MhaConfig, MhaInputs, MhaOptions, MultiHeadAttention, NeedWeights, ParamPath, Parameters, Rope,
    RopeStyle, Sequence, StateDict, Tensor,
};

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_signed()).collect()
}

/// `Σ output ∘ r`.
fn loss(mha: &MultiHeadAttention, inputs: &MhaInputs<'_>, r: &[f32]) -> f64 {
    let out = mha.forward_train(inputs, Par::Seq).unwrap().0.output;
    out.iter().zip(r).map(|(&o, &r)| o as f64 * r as f64).sum()
}

struct Case {
    name: &'static str,
    config: MhaConfig,
    cross: bool,
    causal: bool,
    layout: Layout,
}

fn cases() -> Vec<Case> {
    let rope = |style| Some(Rope { style, base: 10_000.0 });
    let mut half = MhaConfig::new(16, 4);
    half.batch_first = true;
    half.rope = rope(RopeStyle::HalfRotation);
    let mut interleaved_gqa = MhaConfig::new(16, 4);
    interleaved_gqa.num_kv_heads = Some(2);
    interleaved_gqa.batch_first = true;
    interleaved_gqa.rope = rope(RopeStyle::Interleaved);
    let mut alibi_mqa = MhaConfig::new(12, 3);
    alibi_mqa.num_kv_heads = Some(1);
    alibi_mqa.alibi = true;
    alibi_mqa.batch_first = false;
    let mut gqa_seq_first = MhaConfig::new(16, 4);
    gqa_seq_first.batch_first = false;
    gqa_seq_first.num_kv_heads = Some(2);
    gqa_seq_first.kdim = Some(6);
    gqa_seq_first.vdim = Some(10);
    // RoPE on seq-first rows: the backward's inverse rotation finds each row's position as
    // row / batch there, not row % len.
    let mut rope_cross_seq_first = MhaConfig::new(16, 4);
    rope_cross_seq_first.batch_first = false;
    rope_cross_seq_first.rope = rope(RopeStyle::Interleaved);
    // Self-attention with appended rows runs the general backward, not the fused one.
    let mut bias_kv_self = MhaConfig::new(16, 4);
    bias_kv_self.batch_first = true;
    bias_kv_self.add_bias_kv = true;
    bias_kv_self.add_zero_attn = true;
    let mut rope_seq_first = MhaConfig::new(16, 4);
    rope_seq_first.batch_first = false;
    rope_seq_first.rope = rope(RopeStyle::HalfRotation);
    vec![
        Case {
            name: "rope interleaved, cross-attention, seq-first",
            config: rope_cross_seq_first,
            cross: true,
            causal: false,
            layout: Layout::SeqFirst,
        },
        Case {
            name: "add_bias_kv and add_zero_attn, self-attention",
            config: bias_kv_self,
            cross: false,
            causal: false,
            layout: Layout::BatchFirst,
        },
        Case {
            name: "rope half-rotation, self-attention, seq-first",
            config: rope_seq_first,
            cross: false,
            causal: false,
            layout: Layout::SeqFirst,
        },
        Case {
            name: "rope half-rotation, fused self-attention, causal",
            config: half,
            cross: false,
            causal: true,
            layout: Layout::BatchFirst,
        },
        Case {
            name: "rope interleaved, GQA, cross-attention",
            config: interleaved_gqa,
            cross: true,
            causal: false,
            layout: Layout::BatchFirst,
        },
        Case {
            name: "alibi, MQA, self-attention, seq-first",
            config: alibi_mqa,
            cross: false,
            causal: true,
            layout: Layout::SeqFirst,
        },
        Case {
            name: "GQA, kdim/vdim, seq-first",
            config: gqa_seq_first,
            cross: true,
            causal: false,
            layout: Layout::SeqFirst,
        },
    ]
}

fn mha_inputs<'a>(data: &'a [Vec<f32>; 3], case: &Case, [b, s, t, e, kdim, vdim]: [usize; 6]) -> MhaInputs<'a> {
    let seq = |x: &'a [f32], len, dim| Sequence {
        data: x,
        batch: b,
        len,
        dim,
        layout: case.layout,
    };
    MhaInputs {
        query: seq(&data[0], s, e),
        key_value: case.cross.then(|| (seq(&data[1], t, kdim), seq(&data[2], t, vdim))),
        options: MhaOptions {
            is_causal: case.causal,
            ..Default::default()
        },
        packing: None,
    }
}

#[test]
fn gradients_match_central_differences() {
    let (b, s, t) = (2, 5, 4);
    for case in cases() {
        let mut rng = SplitMix64::new(7);
        let e = case.config.embed_dim;
        let kdim = case.config.kdim.unwrap_or(e);
        let vdim = case.config.vdim.unwrap_or(e);
        let mut mha = MultiHeadAttention::with_seed(case.config.clone(), 3).unwrap();
        let t = if case.cross { t } else { s };
        let mut data = [
            random(&mut rng, b * s * e),
            random(&mut rng, b * t * kdim),
            random(&mut rng, b * t * vdim),
        ];
        let r = random(&mut rng, b * s * e);
        let dims = [b, s, t, e, kdim, vdim];
        let owned = data.clone();
        let inputs = mha_inputs(&owned, &case, dims);
        let (_, tape) = mha.forward_train(&inputs, Par::Seq).unwrap();
        let mut grads = Grads::new();
        let d = mha
            .backward(&inputs, &tape, &r, &mut grads, &ParamPath::ROOT, Par::Seq)
            .unwrap();
        let largest = grads
            .iter()
            .flat_map(|(_, g)| g.data().iter())
            .chain(&d.query)
            .fold(0.0f32, |m, &g| m.max(g.abs())) as f64;

        // Central differences in f32 at step 1e-2: measured worst 3.5e-6 of the largest
        // gradient over these cases; a gradient missing a term (RoPE's inverse rotation, a
        // group's head) is off by its size, 1e-2 and more.
        let h = 1e-2f32;
        let tolerance = 4e-5 * largest;
        let mut worst = 0.0f64;
        let mut check = |what: &str, analytic: f32, numeric: f64| {
            let error = (analytic as f64 - numeric).abs();
            worst = worst.max(error / largest);
            assert!(
                error <= tolerance,
                "{}: {what}: analytic {analytic}, numeric {numeric}",
                case.name
            );
        };
        // Inputs.
        let analytic: Vec<&Vec<f32>> = if case.cross {
            vec![&d.query, d.key.as_ref().unwrap(), d.value.as_ref().unwrap()]
        } else {
            vec![&d.query]
        };
        for (which, grad) in analytic.into_iter().enumerate() {
            for _ in 0..12 {
                let i = (rng.next_u64() as usize) % grad.len();
                let x0 = data[which][i];
                data[which][i] = x0 + h;
                let plus = loss(&mha, &mha_inputs(&data, &case, dims), &r);
                data[which][i] = x0 - h;
                let minus = loss(&mha, &mha_inputs(&data, &case, dims), &r);
                data[which][i] = x0;
                check(
                    &format!("input {which}[{i}]"),
                    grad[i],
                    (plus - minus) / (2.0 * h as f64),
                );
            }
        }
        // Parameters.
        let names: Vec<String> = mha.params_mut("").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), grads.len(), "{}: a gradient per parameter", case.name);
        for name in names {
            let grad = grads.get(&name).unwrap().data().to_vec();
            for _ in 0..12 {
                let i = (rng.next_u64() as usize) % grad.len();
                let nudge = |mha: &mut MultiHeadAttention, by: f32| {
                    let mut params = mha.params_mut("");
                    let (_, p) = params.iter_mut().find(|(n, _)| *n == name).unwrap();
                    p.data_mut()[i] += by;
                };
                nudge(&mut mha, h);
                let plus = loss(&mha, &inputs, &r);
                nudge(&mut mha, -2.0 * h);
                let minus = loss(&mha, &inputs, &r);
                nudge(&mut mha, h);
                check(&format!("{name}[{i}]"), grad[i], (plus - minus) / (2.0 * h as f64));
            }
        }
        eprintln!("{}: worst {worst:.2e} of the largest gradient", case.name);
    }
}

/// Repeats each key/value head of a grouped state dict once per query head of its group.
fn expand_groups(dict: &StateDict, e: usize, h: usize, g: usize) -> StateDict {
    let d = e / h;
    let per = h / g;
    let mut out = dict.clone();
    let w = dict["in_proj_weight"].data();
    let b = dict["in_proj_bias"].data();
    let (mut w_new, mut b_new) = (w[..e * e].to_vec(), b[..e].to_vec());
    for part in 0..2 {
        let base = e + part * g * d;
        for head in 0..h {
            let src = base + (head / per) * d;
            w_new.extend_from_slice(&w[src * e..(src + d) * e]);
            b_new.extend_from_slice(&b[src..src + d]);
        }
    }
    out.insert(
        "in_proj_weight".into(),
        Tensor::new("w", vec![3 * e, e], w_new).unwrap(),
    );
    out.insert("in_proj_bias".into(), Tensor::new("b", vec![3 * e], b_new).unwrap());
    out
}

#[test]
fn grouped_query_gradients_are_sums_over_the_repeated_heads() {
    let (b, s, e, h, g) = (2, 7, 16, 4, 2);
    let d = e / h;
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    config.num_kv_heads = Some(g);
    let grouped = MultiHeadAttention::with_seed(config.clone(), 11).unwrap();
    config.num_kv_heads = None;
    let expanded = MultiHeadAttention::from_state_dict(config, expand_groups(&grouped.state_dict(), e, h, g)).unwrap();
    let mut rng = SplitMix64::new(5);
    let x = random(&mut rng, b * s * e);
    let r = random(&mut rng, b * s * e);
    let inputs = MhaInputs {
        query: Sequence::batch_first(&x, b, s, e),
        key_value: None,
        options: MhaOptions {
            is_causal: true,
            ..Default::default()
        },
        packing: None,
    };
    let run = |mha: &MultiHeadAttention| {
        let (_, tape) = mha.forward_train(&inputs, Par::Rayon).unwrap();
        let mut grads = Grads::new();
        let dx = mha
            .backward(&inputs, &tape, &r, &mut grads, &ParamPath::ROOT, Par::Rayon)
            .unwrap()
            .query;
        (dx, grads)
    };
    let (dx_g, grads_g) = run(&grouped);
    let (dx_e, grads_e) = run(&expanded);
    let close = |a: f32, b: f32, what: &str| assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
    for (i, (a, b)) in dx_g.iter().zip(&dx_e).enumerate() {
        close(*a, *b, &format!("d_query[{i}]"));
    }
    // Query rows and the output projection are the same parameters in both.
    let (wg, we) = (
        grads_g.get("in_proj_weight").unwrap().data(),
        grads_e.get("in_proj_weight").unwrap().data(),
    );
    for i in 0..e * e {
        close(wg[i], we[i], "query rows of in_proj_weight");
    }
    for name in ["out_proj.weight", "out_proj.bias"] {
        for (a, b) in grads_g
            .get(name)
            .unwrap()
            .data()
            .iter()
            .zip(grads_e.get(name).unwrap().data())
        {
            close(*a, *b, name);
        }
    }
    // Each grouped key/value row: the sum over the query heads of its group.
    let (bg, be) = (
        grads_g.get("in_proj_bias").unwrap().data(),
        grads_e.get("in_proj_bias").unwrap().data(),
    );
    let per = h / g;
    for part in 0..2 {
        for group in 0..g {
            for j in 0..d {
                let row_g = e + part * g * d + group * d + j;
                let rows_e: Vec<usize> = (0..per).map(|p| e + part * e + (group * per + p) * d + j).collect();
                let sum_b: f32 = rows_e.iter().map(|&r| be[r]).sum();
                close(bg[row_g], sum_b, "grouped bias row");
                for col in 0..e {
                    let sum_w: f32 = rows_e.iter().map(|&r| we[r * e + col]).sum();
                    close(wg[row_g * e + col], sum_w, "grouped weight row");
                }
            }
        }
    }
}

/// A backward given a gradient of the wrong size, or inputs other than its forward's, is a typed
/// error naming what was wrong.
#[test]
fn backward_rejects_mismatched_gradients_and_inputs() {
    let mut config = MhaConfig::new(8, 2);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 1).unwrap();
    let x = vec![0.25f32; 2 * 3 * 8];
    let inputs = MhaInputs {
        query: Sequence::batch_first(&x, 2, 3, 8),
        key_value: None,
        options: MhaOptions::default(),
        packing: None,
    };
    let (_, tape) = mha.forward_train(&inputs, Par::Seq).unwrap();
    let mut grads = Grads::new();
    let err = mha
        .backward(&inputs, &tape, &[0.0; 5], &mut grads, &ParamPath::ROOT, Par::Seq)
        .unwrap_err()
        .to_string();
    assert!(err.contains("d_output"), "{err}");
    // B·S + width elements (14) is as wrong as 5: the check multiplies.
    let err = mha
        .backward(
            &inputs,
            &tape,
            &[0.0; 2 * 3 + 8],
            &mut grads,
            &ParamPath::ROOT,
            Par::Seq,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("d_output") && err.contains("[B, S, 8]"), "{err}");
    let longer = vec![0.25f32; 2 * 4 * 8];
    let other = MhaInputs {
        query: Sequence::batch_first(&longer, 2, 4, 8),
        ..inputs
    };
    let err = mha
        .backward(&other, &tape, &[0.0; 64], &mut grads, &ParamPath::ROOT, Par::Seq)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the forward's [B, S, T] = [2, 3, 3]"), "{err}");
    assert!(grads.is_empty(), "nothing added on error");
}

/// Packed sequences (no padding) give what each sequence gives on its own: the outputs, the
/// inputs' gradients, and parameter gradients summed over the sequences; for self-attention
/// (fused, causal) and cross-attention (queries and keys packed with different starts).
#[test]
fn packed_sequences_equal_separate_calls() {
    let e = 16;
    let mut config = MhaConfig::new(e, 4);
    config.batch_first = true;
    config.num_kv_heads = Some(2);
    // ALiBi's bias follows each sequence's own positions in the packed calls too.
    config.alibi = true;
    let mha = MultiHeadAttention::with_seed(config, 21).unwrap();
    let mut rng = SplitMix64::new(8);
    // Every sequence non-empty, so that a sequence that starts a row early or late in either
    // packing shows in its own output (an empty one would hide a wrong start).
    let (q_starts, k_starts) = ([0usize, 5, 8, 12, 15], [0usize, 3, 9, 10, 17]);
    let (n, m) = (15, 17);
    let x = random(&mut rng, n * e);
    let mem = random(&mut rng, m * e);
    let r = random(&mut rng, n * e);
    let close = |a: &[f32], b: &[f32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    };
    for cross in [false, true] {
        let ks: &[usize] = if cross { &k_starts } else { &q_starts };
        let packed = MhaInputs {
            query: Sequence::batch_first(&x, 1, n, e),
            key_value: cross.then(|| {
                (
                    Sequence::batch_first(&mem, 1, m, e),
                    Sequence::batch_first(&mem, 1, m, e),
                )
            }),
            options: MhaOptions {
                is_causal: !cross,
                ..Default::default()
            },
            packing: Some(attn_core::Packing {
                query_starts: &q_starts,
                key_starts: ks,
            }),
        };
        let (out, tape) = mha.forward_train(&packed, Par::Rayon).unwrap();
        let mut grads = Grads::new();
        let d = mha
            .backward(&packed, &tape, &r, &mut grads, &ParamPath::ROOT, Par::Rayon)
            .unwrap();
        let mut separate = Grads::new();
        for i in 0..4 {
            let (q0, q1, k0, k1) = (q_starts[i], q_starts[i + 1], ks[i], ks[i + 1]);
            assert!(q1 > q0 && k1 > k0);
            let q = &x[q0 * e..q1 * e];
            let kv = &mem[k0 * e..k1 * e];
            let one = MhaInputs {
                query: Sequence::batch_first(q, 1, q1 - q0, e),
                key_value: cross.then(|| {
                    (
                        Sequence::batch_first(kv, 1, k1 - k0, e),
                        Sequence::batch_first(kv, 1, k1 - k0, e),
                    )
                }),
                options: packed.options,
                packing: None,
            };
            let (o, t) = mha.forward_train(&one, Par::Seq).unwrap();
            close(&out.output[q0 * e..q1 * e], &o.output, "output");
            let di = mha
                .backward(&one, &t, &r[q0 * e..q1 * e], &mut separate, &ParamPath::ROOT, Par::Seq)
                .unwrap();
            close(&d.query[q0 * e..q1 * e], &di.query, "d_query");
            if cross {
                let dk = d.key.as_ref().unwrap();
                // Memory rows shared by no other sequence: compare directly.
                close(&dk[k0 * e..k1 * e], di.key.as_ref().unwrap(), "d_key");
            }
        }
        for (name, g) in grads.iter() {
            close(g.data(), separate.get(name).unwrap().data(), name);
        }
    }
}

/// The training forward and backward write their buffers whole: on an arena whose kept buffers
/// are all NaN (`arena::poison`) they give the bits of a clean arena, packed and not, self- and
/// cross-attention. In the packed cross-attention one sequence has keys but no queries: its key
/// rows get a zero gradient (no kernel call writes them), not what the arena held.
#[test]
fn training_buffers_never_carry_what_the_arena_held() {
    use attn_core::kernels::arena;
    let (e, h, n, m) = (128, 4, 150, 200);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 31).unwrap();
    let mut rng = SplitMix64::new(9);
    let (x, mem, r) = (
        random(&mut rng, n * e),
        random(&mut rng, m * e),
        random(&mut rng, n * e),
    );
    let (q_starts, k_starts) = ([0usize, 100, 100, 150], [0usize, 60, 140, 200]);
    for (cross, packed) in [(false, false), (true, false), (false, true), (true, true)] {
        let ks: &[usize] = if cross { &k_starts } else { &q_starts };
        let inputs = MhaInputs {
            query: Sequence::batch_first(&x, 1, n, e),
            key_value: cross.then(|| {
                (
                    Sequence::batch_first(&mem, 1, m, e),
                    Sequence::batch_first(&mem, 1, m, e),
                )
            }),
            options: MhaOptions::default(),
            packing: packed.then_some(attn_core::Packing {
                query_starts: &q_starts,
                key_starts: ks,
            }),
        };
        let run = || {
            let (out, tape) = mha.forward_train(&inputs, Par::Seq).unwrap();
            let mut grads = Grads::new();
            let d = mha
                .backward(&inputs, &tape, &r, &mut grads, &ParamPath::ROOT, Par::Seq)
                .unwrap();
            let named: Vec<(String, Vec<f32>)> =
                grads.iter().map(|(k, g)| (k.to_string(), g.data().to_vec())).collect();
            let result = (
                out.output.clone(),
                d.query.clone(),
                d.key.clone(),
                d.value.clone(),
                named,
            );
            tape.recycle();
            [Some(out.output), Some(d.query), d.key, d.value]
                .into_iter()
                .flatten()
                .for_each(arena::give);
            result
        };
        arena::clear();
        let clean = run();
        assert!(arena::kept_floats() >= m * e, "the run kept its buffers");
        arena::poison();
        let dirty = run();
        arena::clear();
        let what = format!("cross {cross}, packed {packed}");
        assert!(clean.0.iter().chain(&clean.1).all(|v| v.is_finite()), "{what}");
        // Bit for bit, named by the first buffer that differs.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut pairs = vec![("output", &clean.0, &dirty.0), ("d_query", &clean.1, &dirty.1)];
        for (name, c, d) in [("d_key", &clean.2, &dirty.2), ("d_value", &clean.3, &dirty.3)] {
            assert_eq!(c.is_some(), d.is_some(), "{what}: {name}");
            if let (Some(c), Some(d)) = (c, d) {
                pairs.push((name, c, d));
            }
        }
        for ((name, c), (_, d)) in clean.4.iter().zip(&dirty.4) {
            pairs.push((name.as_str(), c, d));
        }
        assert_eq!(clean.4.len(), dirty.4.len(), "{what}: gradients");
        for (name, c, d) in pairs {
            let differ = bits(c).iter().zip(bits(d)).filter(|(a, b)| **a != *b).count();
            assert!(
                c.len() == d.len() && differ == 0,
                "{what}: {name} differs in {differ} of {} elements",
                c.len()
            );
        }
        if cross && packed {
            let unattended = |g: &Option<Vec<f32>>| g.as_ref().unwrap()[60 * e..140 * e].iter().all(|&v| v == 0.0);
            assert!(
                unattended(&dirty.2) && unattended(&dirty.3),
                "{what}: keys no query sees"
            );
        }
    }
}

/// The tape keeps what the backward needs, counted from the design: the projected queries,
/// keys and values (one fused `[N, 3E]` buffer for self-attention), the attention's `[N, E]`
/// output, and two floats a query row and head (the log-sum-exp and what rounding it lost);
/// `bytes` says so, and `recycle` hands every buffer of at least the arena's floor back.
#[test]
fn tapes_count_what_they_keep_and_give_it_back() {
    use attn_core::kernels::arena;
    // 128 query rows at E = 128: the [N, E] buffers reach the arena's KEEP_FLOATS.
    let (b, s, t, e, h) = (2, 64, 96, 128, 4);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 5).unwrap();
    let mut rng = SplitMix64::new(6);
    let (x, kv) = (random(&mut rng, b * s * e), random(&mut rng, b * t * e));
    let (n, m) = (b * s, b * t);
    assert!(n * e >= arena::KEEP_FLOATS && 2 * n * h < arena::KEEP_FLOATS);
    for cross in [false, true] {
        let inputs = MhaInputs {
            query: Sequence::batch_first(&x, b, s, e),
            key_value: cross.then(|| (Sequence::batch_first(&kv, b, t, e), Sequence::batch_first(&kv, b, t, e))),
            options: MhaOptions::default(),
            packing: None,
        };
        let (_, tape) = mha.forward_train(&inputs, Par::Seq).unwrap();
        let kv_rows = if cross { m } else { n };
        let floats = n * e + 2 * kv_rows * e + n * e + 2 * n * h;
        assert_eq!(tape.bytes(), 4 * floats, "cross {cross}");
        arena::clear();
        tape.recycle();
        let kept = arena::kept_floats();
        assert!(
            kept >= floats - 2 * n * h,
            "cross {cross}: {kept} floats kept of {floats}"
        );
    }
}

/// A packing that does not describe the call is a typed error naming what is wrong, in the
/// forward and the backward alike: a batched query, starts that do not cover the rows or go
/// backwards, self-attention keys packed unlike the queries, and what packing cannot carry
/// (masks, weights, RoPE, appended key rows).
#[test]
fn packings_that_do_not_fit_the_call_are_refused() {
    let e = 8;
    let mut config = MhaConfig::new(e, 2);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config.clone(), 1).unwrap();
    let x = vec![0.25f32; 6 * e];
    let good = [0usize, 2, 6];
    fn packed<'a>(query: Sequence<'a>, q: &'a [usize], k: &'a [usize], options: MhaOptions<'a>) -> MhaInputs<'a> {
        MhaInputs {
            query,
            key_value: None,
            options,
            packing: Some(attn_core::Packing {
                query_starts: q,
                key_starts: k,
            }),
        }
    }
    let x = &x[..];
    let rows = Sequence::batch_first(x, 1, 6, e);
    let both = |inputs: &MhaInputs<'_>, mha: &MultiHeadAttention, want: &str| {
        let err = mha.forward_train(inputs, Par::Seq).unwrap_err().to_string();
        assert!(err.contains(want), "forward: {err}");
        // The backward checks again, given the tape of the same rows unpacked (no packed
        // forward of these modules and options exists to take one from).
        let unpacked = MhaInputs {
            packing: None,
            options: MhaOptions::default(),
            ..*inputs
        };
        let (out, tape) = mha.forward_train(&unpacked, Par::Seq).unwrap();
        let d = vec![0.5f32; out.output.len()];
        let err = mha
            .backward(inputs, &tape, &d, &mut Grads::new(), &ParamPath::ROOT, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "backward: {err}");
    };
    assert!(mha
        .forward_train(&packed(rows, &good, &good, MhaOptions::default()), Par::Seq)
        .is_ok());
    both(
        &packed(
            Sequence::batch_first(x, 2, 3, e),
            &[0, 1, 3],
            &[0, 1, 3],
            MhaOptions::default(),
        ),
        &mha,
        "query_starts",
    );
    both(
        &packed(rows, &[0, 2, 5], &[0, 2, 5], MhaOptions::default()),
        &mha,
        "query_starts",
    );
    both(
        &packed(rows, &[1, 2, 6], &[1, 2, 6], MhaOptions::default()),
        &mha,
        "query_starts",
    );
    both(
        &packed(rows, &[0, 4, 2, 6], &[0, 4, 2, 6], MhaOptions::default()),
        &mha,
        "query_starts",
    );
    both(
        &packed(rows, &good, &[0, 3, 6], MhaOptions::default()),
        &mha,
        "key_starts",
    );
    let weights = MhaOptions {
        need_weights: NeedWeights::Averaged,
        ..Default::default()
    };
    both(&packed(rows, &good, &good, weights), &mha, "packing");
    // Cross-attention: keys packed as a different number of sequences.
    let memory = vec![0.5f32; 5 * e];
    let cross = MhaInputs {
        key_value: Some((
            Sequence::batch_first(&memory, 1, 5, e),
            Sequence::batch_first(&memory, 1, 5, e),
        )),
        ..packed(rows, &good, &[0, 5], MhaOptions::default())
    };
    let err = mha.forward_train(&cross, Par::Seq).unwrap_err().to_string();
    assert!(
        err.contains("key_starts") && err.contains("3 starts from 0 to M = 5"),
        "{err}"
    );
    let lengths = [6usize];
    let padded = MhaOptions {
        key_padding: attn_core::KeyPadding::Lengths(&lengths),
        ..Default::default()
    };
    both(&packed(rows, &good, &good, padded), &mha, "packing");
    let mask = vec![0.0f32; 36];
    let masked = MhaOptions {
        attn_mask: attn_core::ScoreMask::Additive {
            data: &mask,
            shape: &[6, 6],
        },
        ..Default::default()
    };
    both(&packed(rows, &good, &good, masked), &mha, "packing");
    config.rope = Some(Rope {
        style: RopeStyle::HalfRotation,
        base: 10_000.0,
    });
    let rotary = MultiHeadAttention::with_seed(config.clone(), 1).unwrap();
    both(&packed(rows, &good, &good, MhaOptions::default()), &rotary, "packing");
    config.rope = None;
    config.add_bias_kv = true;
    let appended = MultiHeadAttention::with_seed(config, 1).unwrap();
    both(&packed(rows, &good, &good, MhaOptions::default()), &appended, "packing");
}
