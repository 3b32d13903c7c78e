//! The contract's sequence-to-sequence model against PyTorch (`seq2seq/tiny.safetensors`,
//! written by `gen_crate_fixtures.py` from the model as a PyTorch user writes it): the
//! checkpoint loads under its names with its `attn.seq2seq` metadata, teacher-forced logits
//! and the label-smoothed loss equal PyTorch's, every parameter's gradient equals autograd's in
//! float64, and incremental decoding equals the teacher-forced logits of its own output.

use std::collections::BTreeMap;

use attn_core::kernels::Par;
use attn_core::{FromSafetensors, Grads, StateDict, ToSafetensors};
use attn_nn::layers::Dropout;
use attn_nn::{AdamW, Seq2Seq, Seq2SeqConfig, Step, TrainStep};
use safetensors::SafeTensors;

mod common;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/seq2seq/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run `cargo xtask codegen`)"))
}

fn metadata(bytes: &[u8], key: &str) -> String {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata().as_ref().unwrap()[key].clone()
}

fn load() -> (Seq2Seq, StateDict) {
    let bytes = fixture("tiny.safetensors");
    let config = Seq2SeqConfig::from_json(&metadata(&bytes, "attn.seq2seq")).unwrap();
    let dict = StateDict::from_safetensors(&bytes).unwrap();
    (Seq2Seq::from_state_dict(config, dict.clone()).unwrap(), dict)
}

/// The fixture's pairs, and its expected tensors by name.
type Expected = (Vec<(String, String)>, BTreeMap<String, Vec<f32>>);

fn expected() -> Expected {
    let bytes = fixture("tiny.expected.safetensors");
    let pairs: Vec<(String, String)> = serde_json::from_str(&metadata(&bytes, "pairs")).unwrap();
    let dict = StateDict::from_safetensors(&bytes).unwrap();
    (pairs, dict.into_iter().map(|(n, t)| (n, t.into_data())).collect())
}

/// `‖got − want‖₂ / ‖want‖₂`.
fn relative_norm(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let norm = |x: &mut dyn Iterator<Item = f64>| x.map(|v| v * v).sum::<f64>().sqrt();
    norm(&mut got.iter().zip(want).map(|(&g, &w)| g as f64 - w as f64)) / norm(&mut want.iter().map(|&w| w as f64))
}

fn relative_to_largest(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(0.0f64, f64::max)
        / scale
}

#[test]
fn checkpoint_logits_loss_and_gradients_equal_pytorch() {
    let (model, dict) = load();
    let (pairs, want) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    // The state dict round-trips under the same names and values.
    assert_eq!(model.state_dict(), dict);
    let batch = model.batch(&pairs).unwrap();
    // Measured 6e-7 of the largest logit; 2e-7 for the loss; 1.2e-6 for the gradients.
    let logits = model.logits(&batch, Par::Rayon).unwrap();
    let error = relative_to_largest(&logits, &want["logits"]);
    assert!(error < 1e-5, "logits: {error:e}");
    // The training forward runs the batch packed (no padding): its rows are the padded
    // logits' real positions, in order.
    let mut grads = Grads::new();
    let mut step = Step::new(Dropout::NONE, Par::Rayon, &mut grads);
    let packed = model.packed_batch(&pairs).unwrap();
    assert_eq!(format!("{packed:?}"), format!("{:?}", batch.packed()));
    let (train_logits, tape) = model.forward_train(&packed, &mut step).unwrap();
    let vt = model.config().tgt_vocab.len();
    let real: Vec<f32> = (0..batch.b)
        .flat_map(|i| {
            let start = i * batch.t * vt;
            logits[start..start + batch.tgt_lengths[i] * vt].to_vec()
        })
        .collect();
    let error = relative_to_largest(&train_logits, &real);
    assert!(
        error < 1e-5,
        "packed training logits against the padded forward: {error:e}"
    );
    let (padded_loss, _) = model.padded_loss(&batch, &logits, 0.1, Par::Rayon).unwrap();
    let (loss, d_logits) = model.loss(&packed, &train_logits, 0.1, Par::Rayon).unwrap();
    // Logits of another batch (one row): an error naming the shapes.
    let err = model
        .loss(&packed, &train_logits[..vt], 0.1, Par::Rayon)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a row per label"), "{err}");
    assert!((loss - padded_loss).abs() < 1e-6 * loss, "{loss} vs {padded_loss}");
    let want_loss = want["loss"][0] as f64;
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    // The backward refuses a batch other than the forward's.
    let other = model.packed_batch(&pairs[..1]).unwrap();
    let err = model
        .backward(&other, &tape, &d_logits, &mut step)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the forward's batch"), "{err}");
    model.backward(&packed, &tape, &d_logits, &mut step).unwrap();
    let mut worst = 0.0f64;
    let mut names = 0;
    for (name, got) in grads.iter() {
        let error = relative_to_largest(got.data(), &want[&format!("grad.{name}")]);
        worst = worst.max(error);
        assert!(error < 2e-5, "grad.{name}: {error:e}");
        names += 1;
    }
    assert_eq!(names, want.keys().filter(|k| k.starts_with("grad.")).count());
    eprintln!("worst gradient error {worst:.2e}");
}

#[test]
fn incremental_decoding_equals_teacher_forcing_and_beam_one_is_greedy() {
    let (model, _) = load();
    let sources = ["28 Nov 2026", "Monday, 3 March 1902", "July 4"];
    let decoded = model.greedy(&sources, 12, true, Par::Rayon).unwrap();
    let vt = model.config().tgt_vocab.len();
    let (mut forced_checks, mut beam_checks) = (0, 0);
    for (source, d) in sources.iter().zip(&decoded) {
        assert!(!d.tokens.is_empty() && d.tokens.len() <= 12);
        // Teacher-force the greedy output: the same logits at every step.
        let text: Vec<&str> = d
            .tokens
            .iter()
            .map(|&id| model.config().tgt_vocab.tokens()[id].as_str())
            .collect();
        let emitted: Vec<usize> = d.tokens.iter().copied().filter(|&id| id > 3).collect();
        if emitted.len() != d.tokens.len() - usize::from(d.tokens.last() == Some(&2)) {
            continue; // a special inside the output cannot be written back as text
        }
        let target = model.config().tgt_vocab.decode(&d.tokens);
        let batch = model.batch(&[(source, target.as_str())]).unwrap();
        let forced = model.logits(&batch, Par::Seq).unwrap();
        for (step, row) in d.logits.iter().enumerate().take(batch.t) {
            let error = relative_to_largest(row, &forced[step * vt..(step + 1) * vt]);
            assert!(error < 1e-5, "{source}: step {step} ({text:?}): {error:e}");
        }
        // Its reported log-probability is that of its tokens under teacher forcing too.
        let log_prob = forced_log_prob(&model, source, &d.tokens);
        assert!(
            (log_prob - d.log_prob).abs() < 1e-4,
            "{source}: greedy log_prob {} vs {log_prob}",
            d.log_prob
        );
        forced_checks += 1;
        let beam = model.beam(&[source], 1, 12, Par::Seq).unwrap();
        assert_eq!(beam[0].tokens, d.tokens, "{source}: beam 1");
        // A wider beam's reported log-probability is that of its tokens under teacher forcing.
        let wide = &model.beam(&[source], 4, 12, Par::Seq).unwrap()[0];
        if wide.tokens.iter().any(|&id| id <= 3 && id != 2) {
            continue;
        }
        let target = model.config().tgt_vocab.decode(&wide.tokens);
        let batch = model.batch(&[(source, target.as_str())]).unwrap();
        let forced = model.logits(&batch, Par::Seq).unwrap();
        let log_prob: f64 = wide
            .tokens
            .iter()
            .enumerate()
            .map(|(step, &id)| {
                let row = &forced[step * vt..(step + 1) * vt];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                row[id] as f64 - log_z
            })
            .sum();
        assert!(
            (log_prob - wide.log_prob).abs() < 1e-4,
            "{source}: beam 4 log_prob {} vs {log_prob}",
            wide.log_prob
        );
        beam_checks += 1;
    }
    assert!(
        forced_checks >= 2 && beam_checks >= 2,
        "{forced_checks} {beam_checks}: too few outputs checked"
    );
}

/// `batch_first` can only be true, so a configuration that leaves it out is batch-first; a
/// present `false` is refused, naming the field.
#[test]
fn batch_first_may_be_omitted_but_not_false() {
    let bytes = fixture("tiny.safetensors");
    let json = metadata(&bytes, "attn.seq2seq");
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(map.remove("batch_first"), Some(serde_json::Value::Bool(true)));
    let without = serde_json::Value::Object(map.clone()).to_string();
    let config = Seq2SeqConfig::from_json(&without).unwrap();
    assert!(config.transformer.layer.batch_first);
    assert_eq!(config, Seq2SeqConfig::from_json(&json).unwrap());
    map.insert("batch_first".into(), false.into());
    let err = Seq2SeqConfig::from_json(&serde_json::Value::Object(map).to_string()).unwrap_err();
    assert!(err.to_string().contains("batch_first"), "{err}");
}

/// The teacher-forced log-probability of `tokens` (output ids, `<eos>` included when there) for
/// `source`: the batch is built from the ids themselves, so any id (`<unk>` too) is scored.
fn forced_log_prob(model: &Seq2Seq, source: &str, tokens: &[usize]) -> f64 {
    let mut batch = model.batch(&[(source, "")]).unwrap();
    let t = tokens.len();
    batch.t = t;
    batch.tgt_in = std::iter::once(1).chain(tokens[..t - 1].iter().copied()).collect();
    batch.labels = tokens.iter().map(|&id| id as i64).collect();
    batch.tgt_lengths = vec![t];
    let logits = model.logits(&batch, Par::Seq).unwrap();
    let vt = model.config().tgt_vocab.len();
    tokens
        .iter()
        .enumerate()
        .map(|(step, &id)| {
            let row = &logits[step * vt..(step + 1) * vt];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            row[id] as f64 - log_z
        })
        .sum()
}

/// An untrained (PyTorch's initialisation, seeded) date translator with three decoder layers,
/// and 40 sources for it.
fn untrained_dates_model() -> (Seq2Seq, Vec<String>) {
    let mut layer = attn_nn::LayerConfig::new(32, 4);
    layer.dim_feedforward = 64;
    layer.dropout = 0.0;
    layer.batch_first = true;
    let config = Seq2SeqConfig {
        transformer: attn_nn::TransformerConfig {
            layer,
            num_encoder_layers: 1,
            num_decoder_layers: 3,
        },
        max_len: 40,
        src_vocab: attn_nn::Vocab::from_texts(["0123456789 abcdefghijklmnopqrstuvwxyz./,ABCDEFGHIJKLMNOPQRSTUVWXYZ"]),
        tgt_vocab: attn_nn::Vocab::from_texts(["0123456789-"]),
    };
    let model = Seq2Seq::with_seed(config, 1).unwrap();
    let days = [
        "3 March 1902",
        "28 Nov 2026",
        "July 4",
        "12.1.2000",
        "the 2nd of May 1950",
        "1999/12/31",
    ];
    let sources = (0..40).map(|i| format!("{} {}", days[i % days.len()], i)).collect();
    (model, sources)
}

/// The log-probabilities of every next id after `prefix` (output ids), by teacher forcing
/// the whole prefix: no cache. Kept by prefix in `memo`.
fn next_log_probs(
    model: &Seq2Seq,
    source: &str,
    prefix: &[usize],
    memo: &mut BTreeMap<Vec<usize>, Vec<f64>>,
) -> Vec<f64> {
    if let Some(row) = memo.get(prefix) {
        return row.clone();
    }
    let mut batch = model.batch(&[(source, "")]).unwrap();
    let t = prefix.len() + 1;
    batch.t = t;
    batch.tgt_in = std::iter::once(1).chain(prefix.iter().copied()).collect();
    batch.labels = vec![2; t];
    batch.tgt_lengths = vec![t];
    let vt = model.config().tgt_vocab.len();
    let logits = model.logits(&batch, Par::Seq).unwrap();
    let row = &logits[(t - 1) * vt..t * vt];
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let row: Vec<f64> = row.iter().map(|&x| x as f64 - log_z).collect();
    memo.insert(prefix.to_vec(), row.clone());
    row
}

/// The rules of [`Seq2Seq::beam`] as its documentation states them, and variants of them that
/// the test must tell apart.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BeamRule {
    Documented,
    /// Stops only when no hypothesis is live or at `max_len`.
    NeverEarly,
    /// Stops early without waiting for `beam` finished hypotheses.
    AnyFinished,
    /// Scores by log-probability, not divided by length.
    Unnormalised,
}

/// What a reference beam search found: the answer, or `None` where two compared
/// log-probabilities were closer than the two decoders' rounding (1e-4): the cached and the
/// teacher-forced sums may order them differently there.
type BeamAnswer = Option<(Vec<usize>, f64)>;

/// Beam search written from [`Seq2Seq::beam`]'s documentation, on teacher-forced
/// log-probabilities ([`next_log_probs`]) instead of the decoder's caches.
fn reference_beam(
    model: &Seq2Seq,
    source: &str,
    (beam, max_len): (usize, usize),
    rule: BeamRule,
    memo: &mut BTreeMap<Vec<usize>, Vec<f64>>,
) -> BeamAnswer {
    const EOS: usize = 2;
    const CLOSE: f64 = 1e-4;
    let score = |tokens: &[usize], lp: f64| match rule {
        BeamRule::Unnormalised => lp,
        _ => lp / tokens.len() as f64,
    };
    let mut live: Vec<(Vec<usize>, f64)> = vec![(Vec::new(), 0.0)];
    let mut finished: Vec<(Vec<usize>, f64)> = Vec::new();
    for _ in 0..max_len {
        let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
        for (i, (tokens, lp)) in live.iter().enumerate() {
            let next = next_log_probs(model, source, tokens, memo);
            candidates.extend((EOS..next.len()).map(|id| (i, id, lp + next[id])));
        }
        candidates.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        // Where the candidates are cut, the order must not hang on rounding.
        let kept = candidates.iter().scan(0, |n, c| {
            *n += usize::from(c.1 != EOS);
            Some(*n)
        });
        let cut = kept.take_while(|&n| n < beam).count() + 1;
        if cut < candidates.len() && candidates[cut - 1].2 - candidates[cut].2 < CLOSE {
            return None;
        }
        let mut next: Vec<(Vec<usize>, f64)> = Vec::new();
        for &(i, id, lp) in &candidates[..cut.min(candidates.len())] {
            let mut tokens = live[i].0.clone();
            tokens.push(id);
            if id == EOS {
                finished.push((tokens, lp));
            } else {
                next.push((tokens, lp));
            }
        }
        let best = |hypotheses: &[(Vec<usize>, f64)]| {
            hypotheses
                .iter()
                .map(|(t, lp)| score(t, *lp))
                .fold(f64::NEG_INFINITY, f64::max)
        };
        let (best_finished, best_live) = (best(&finished), best(&next));
        if (best_finished - best_live).abs() < CLOSE {
            return None;
        }
        let early = match rule {
            BeamRule::NeverEarly => false,
            BeamRule::AnyFinished => best_finished >= best_live,
            _ => finished.len() >= beam && best_finished >= best_live,
        };
        if next.is_empty() || early {
            live = Vec::new();
            break;
        }
        live = next;
    }
    finished.extend(live);
    let top = finished
        .iter()
        .map(|(t, lp)| score(t, *lp))
        .fold(f64::NEG_INFINITY, f64::max);
    if finished.iter().filter(|(t, lp)| top - score(t, *lp) < CLOSE).count() > 1 {
        return None;
    }
    finished.into_iter().find(|(t, lp)| score(t, *lp) == top)
}

/// Beam search's scoring and stopping, against a beam search written from its documentation
/// on teacher-forced log-probabilities: the same answer and log-probability for 40 sources at
/// widths 2, 3 and 5. The cases must tell the documented rules from their variants (no length
/// normalisation, no early stop, an early stop before `beam` hypotheses have finished): for
/// each variant, some answer differs from the documented one. The untrained model's
/// next-token distributions are nearly flat and `<eos>` is rare in them, so neither the length
/// nor the early stop decides an answer there (variants differ in 0, 0 and 3 answers); its
/// generator's weights doubled and 3 added to `<eos>`'s bias, they differ in 22, 22 and 38.
#[test]
fn beam_search_scores_by_length_and_stops_as_documented() {
    let (untrained, sources) = untrained_dates_model();
    let mut dict = untrained.state_dict();
    let weight = dict.get_mut("generator.weight").unwrap().data_mut();
    weight.iter_mut().for_each(|w| *w *= 2.0);
    dict.get_mut("generator.bias").unwrap().data_mut()[2] += 3.0;
    let model = Seq2Seq::from_state_dict(untrained.config().clone(), dict).unwrap();
    let max_len = 10;
    let variants = [BeamRule::NeverEarly, BeamRule::AnyFinished, BeamRule::Unnormalised];
    let (mut checked, mut close) = (0, 0);
    let mut told_apart = [0usize; 3];
    for width in [2, 3, 5] {
        for source in &sources {
            let mut memo = BTreeMap::new();
            let Some((tokens, log_prob)) =
                reference_beam(&model, source, (width, max_len), BeamRule::Documented, &mut memo)
            else {
                close += 1;
                continue;
            };
            let decoded = &model.beam(&[source.as_str()], width, max_len, Par::Seq).unwrap()[0];
            assert_eq!(decoded.tokens, tokens, "{source}, beam {width}");
            assert!(
                (decoded.log_prob - log_prob).abs() < 2e-6 * log_prob.abs().max(1.0),
                "{source}, beam {width}: log_prob {} against {log_prob}",
                decoded.log_prob
            );
            checked += 1;
            for (rule, count) in variants.iter().zip(&mut told_apart) {
                if let Some((other, _)) = reference_beam(&model, source, (width, max_len), *rule, &mut memo) {
                    *count += usize::from(other != tokens);
                }
            }
        }
    }
    eprintln!("{checked} answers checked, {close} with a near tie skipped; variants differ in {told_apart:?}");
    assert!(checked >= 100, "only {checked} of 120 answers checked");
    for (rule, count) in variants.iter().zip(told_apart) {
        assert!(count > 0, "no answer tells {rule:?} from the documented rules");
    }
}

/// Greedy decoding never emits `<pad>` or `<bos>`, as beam search never extends with them, even
/// where they are the most probable ids: it takes the arg-max from `<eos>` on, and its
/// log-probability is still under the whole softmax. So beam 1 is greedy on any model.
#[test]
fn greedy_never_emits_pad_or_bos() {
    let (untrained, sources) = untrained_dates_model();
    let mut dict = untrained.state_dict();
    let bias = dict.get_mut("generator.bias").unwrap().data_mut();
    bias[0] += 20.0;
    bias[1] += 20.0;
    let model = Seq2Seq::from_state_dict(untrained.config().clone(), dict).unwrap();
    for source in &sources[..6] {
        let greedy = &model.greedy(&[source.as_str()], 6, false, Par::Seq).unwrap()[0];
        let mut memo = BTreeMap::new();
        let mut log_prob = 0.0;
        for (step, &id) in greedy.tokens.iter().enumerate() {
            let next = next_log_probs(&model, source, &greedy.tokens[..step], &mut memo);
            let best = (2..next.len()).fold(2, |b, i| if next[i] > next[b] { i } else { b });
            assert!(
                next[0].min(next[1]) > next[best] + 10.0,
                "{source}: <pad> and <bos> are not the likely ids"
            );
            assert_eq!(id, best, "{source}, step {step}: {:?}", greedy.tokens);
            log_prob += next[id];
        }
        assert!(
            (greedy.log_prob - log_prob).abs() < 1e-6 * log_prob.abs(),
            "{source}: log_prob {} against {log_prob}",
            greedy.log_prob
        );
        let beam = &model.beam(&[source.as_str()], 1, 6, Par::Seq).unwrap()[0];
        assert_eq!(beam.tokens, greedy.tokens, "{source}");
    }
}

/// Beam search reads each hypothesis's own history from the KV caches: after every step the
/// cache rows follow the hypotheses they extend (`KvCache::reorder`, in every decoder layer).
/// The model is untrained (PyTorch's initialisation, seeded), so hypotheses overtake each other
/// all the time (64 of the 80 answers below are not greedy's): where the beam's answer differs
/// from the greedy one, it was not the best hypothesis at
/// some step, so it read a cache row that a reorder moved. Its log-probability must still equal
/// teacher forcing of its tokens; an identity reorder, or one that skips a layer, accumulates
/// other hypotheses' history and fails here.
#[test]
fn beam_hypotheses_keep_their_own_caches() {
    let (model, sources) = untrained_dates_model();
    let (mut worst, mut overtaken) = (0.0f64, 0);
    for width in [3, 5] {
        for source in &sources {
            let greedy = &model.greedy(&[source.as_str()], 10, false, Par::Seq).unwrap()[0];
            let decoded = &model.beam(&[source.as_str()], width, 10, Par::Seq).unwrap()[0];
            overtaken += usize::from(decoded.tokens != greedy.tokens);
            let forced = forced_log_prob(&model, source, &decoded.tokens);
            let error = (forced - decoded.log_prob).abs() / forced.abs().max(1.0);
            worst = worst.max(error);
            // Measured 2.1e-7.
            assert!(
                error < 2e-6,
                "{source}, beam {width}: log_prob {} but teacher forcing gives {forced} ({:?})",
                decoded.log_prob,
                decoded.tokens
            );
        }
    }
    assert!(
        overtaken >= 10,
        "only {overtaken} beam answers differ from greedy: the test checks too little"
    );
    eprintln!("worst relative log-probability difference {worst:.1e}, {overtaken} of 80 answers not greedy");
}

/// Three clipped AdamW steps of the model, with dropout: through its parameter store
/// (`Seq2Seq::grads`, `Grads::clip_norm`, `Seq2Seq::update`: flat passes) and through gradients
/// and moments kept by name (`Grads::new`, `clip_grad_norm`, `AdamW::step`). The two must give
/// the same bits, the store's on any thread count, and resuming the store's optimizer from its
/// moments by name must continue bit for bit.
#[test]
fn the_parameter_store_steps_as_parameters_by_name_do() {
    use attn_nn::{clip_grad_norm, AdamW, Param, Parameters};
    let (model, _) = load();
    let (pairs, _) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let batch = model.packed_batch(&pairs).unwrap();
    let adam = || AdamW::new((0.9, 0.98), 1e-9, 0.01).unwrap();
    let dropout = |step: u64| Dropout { p: 0.1, seed: step };
    let step_flat = |model: &mut Seq2Seq, adam: &mut AdamW, grads: &mut Grads, step: u64| -> f32 {
        grads.zero();
        let mut ctx = Step::new(dropout(step), Par::Rayon, grads);
        let (logits, tape) = model.forward_train(&batch, &mut ctx).unwrap();
        let (_, d_logits) = model.loss(&batch, &logits, 0.1, Par::Rayon).unwrap();
        model.backward(&batch, &tape, &d_logits, &mut ctx).unwrap();
        let norm = grads.clip_norm(0.05);
        model.update(adam, grads, 1e-2).unwrap();
        norm
    };
    let flat_run = |threads: usize, steps: u64| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut m = model.clone();
            let (mut a, mut g) = (adam(), m.grads());
            let norms: Vec<f32> = (1..=steps).map(|s| step_flat(&mut m, &mut a, &mut g, s)).collect();
            (m, a, norms)
        })
    };
    let (flat, flat_adam, flat_norms) = flat_run(2, 3);
    let (one_thread, _, one_thread_norms) = flat_run(1, 3);
    assert_eq!(flat.state_dict(), one_thread.state_dict());
    assert_eq!(flat_norms, one_thread_norms);

    let mut named = model.clone();
    let mut named_adam = adam();
    let mut grads = Grads::new();
    for step in 1..=3 {
        grads.zero();
        let mut ctx = Step::new(dropout(step), Par::Rayon, &mut grads);
        let (logits, tape) = named.forward_train(&batch, &mut ctx).unwrap();
        let (_, d_logits) = named.loss(&batch, &logits, 0.1, Par::Rayon).unwrap();
        named.backward(&batch, &tape, &d_logits, &mut ctx).unwrap();
        let mut all: Vec<&mut [f32]> = grads.iter_mut().map(|(_, g)| g).collect();
        let norm = clip_grad_norm(&mut all, 0.05);
        assert_eq!(norm, flat_norms[step as usize - 1], "step {step}");
        assert!(norm > 0.05, "clipping is active");
        let mut params = named.params_mut("");
        let mut bound: Vec<Param<'_>> = params
            .iter_mut()
            .map(|(name, t)| Param {
                name,
                value: t.data_mut(),
                grad: grads.get(name).unwrap().data(),
            })
            .collect();
        named_adam.step(&mut bound, 1e-2).unwrap();
    }
    assert_ne!(named.state_dict(), model.state_dict(), "the steps moved the weights");
    assert_eq!(flat.state_dict(), named.state_dict());
    let by_name = named_adam.all_moments();
    assert_eq!(flat_adam.all_moments(), by_name);

    // Resume: two flat steps, the moments saved by name, restored into a fresh optimizer.
    let (mut resumed, two, _) = flat_run(2, 2);
    let saved: BTreeMap<String, (Vec<f32>, Vec<f32>)> = two
        .all_moments()
        .into_iter()
        .map(|(n, m, v)| (n.to_string(), (m.to_vec(), v.to_vec())))
        .collect();
    let mut restored = adam();
    restored.restore(2, saved).unwrap();
    let mut g = resumed.grads();
    step_flat(&mut resumed, &mut restored, &mut g, 3);
    assert_eq!(resumed.state_dict(), flat.state_dict());

    // Gradients by name are refused by the flat update, naming what it needs.
    let err = named
        .update(&mut named_adam, &Grads::new(), 1e-2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Grads::for_store"), "{err}");
}

/// The packed training batch, built straight from pairs of different lengths, is the padded
/// batch without its padding; its token count is the loss's.
#[test]
fn the_packed_batch_is_the_padded_batch_without_padding() {
    let (model, _) = load();
    let (pairs, _) = expected();
    let cut = |text: &str, n: usize| text.chars().take(n).collect::<String>();
    let uneven: Vec<(String, String)> = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, t))| (cut(s, i + 1), cut(t, 2 * i)))
        .collect();
    let refs: Vec<(&str, &str)> = uneven.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let padded = model.batch(&refs).unwrap();
    assert!(padded.src_lengths.windows(2).any(|w| w[0] != w[1]), "lengths differ");
    let packed = model.packed_batch(&refs).unwrap();
    assert_eq!(format!("{packed:?}"), format!("{:?}", padded.packed()));
    assert_eq!(packed.target_tokens(), padded.target_tokens());
}

/// A checkpoint written by the library reads back as the same model (and as the PyTorch
/// fixture's tensors under the same names); bytes that are not one are typed errors that say
/// what is missing.
#[test]
fn checkpoints_round_trip_through_the_library() {
    let (model, dict) = load();
    let bytes = model.to_checkpoint(&Default::default()).unwrap();
    let again = Seq2Seq::from_checkpoint(&bytes).unwrap();
    assert_eq!(again.state_dict(), dict);
    assert_eq!(again.config().to_json(), model.config().to_json());
    // The same model, the same bytes; extra metadata is kept beside the configuration.
    assert_eq!(again.to_checkpoint(&Default::default()).unwrap(), bytes);
    let extra = std::collections::BTreeMap::from([("note".to_string(), "hi".to_string())]);
    assert_eq!(metadata(&model.to_checkpoint(&extra).unwrap(), "note"), "hi");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("attn-seq2seq-{}.safetensors", std::process::id()));
    model.save(&path).unwrap();
    assert_eq!(Seq2Seq::load(&path).unwrap().state_dict(), dict);
    std::fs::remove_file(&path).unwrap();
    let err = Seq2Seq::load(&path).unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
    let plain = dict.to_safetensors(&Default::default()).unwrap();
    let err = Seq2Seq::from_checkpoint(&plain).unwrap_err().to_string();
    assert!(err.contains("no `attn.seq2seq` metadata"), "{err}");
    let err = Seq2Seq::from_checkpoint(b"nonsense").unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

/// `Seq2Seq::set_precision(Bf16)` reaches every linear map: the logits move off f32's bits but
/// stay within bf16's error of them, relative to the largest logit (measured 5.3e-3 on the
/// tiny fixture; the bound is about 10×); back in f32 the f32 bits return.
#[test]
fn bf16_precision_reaches_every_linear_map() {
    use attn_core::Precision;
    let (mut model, _) = load();
    let (pairs, _) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let batch = model.batch(&pairs).unwrap();
    let f32_logits = model.logits(&batch, Par::Rayon).unwrap();
    model.set_precision(Precision::Bf16).unwrap();
    assert_eq!(model.precision(), Precision::Bf16);
    let bf16_logits = model.logits(&batch, Par::Rayon).unwrap();
    let error = relative_to_largest(&bf16_logits, &f32_logits);
    eprintln!("bf16 logits against f32: {error:.2e} of the largest");
    assert!(error > 0.0 && error < 5e-2, "{error:e}");
    // A clone keeps the precision (its new store drops the packed copies; they are repacked).
    let copy = model.clone();
    assert_eq!(copy.precision(), Precision::Bf16);
    assert_eq!(copy.logits(&batch, Par::Rayon).unwrap(), bf16_logits);
    model.set_precision(Precision::F32).unwrap();
    assert_eq!(model.logits(&batch, Par::Rayon).unwrap(), f32_logits);
}

/// A BF16 checkpoint read in bf16 (`Seq2Seq::from_checkpoint_in`) is not widened: after
/// teacher-forced logits, greedy and beam decoding, the model holds 2 bytes per value of every
/// matrix and table (4 more only for the biases and norm weights the forward reads), 2 bytes
/// per value less than the same file read in f32 and set to bf16, and it computes the same
/// bits as that model. It cannot train: that is an error naming the way out. Read in f32, the
/// same file is widened and trains.
#[test]
fn bf16_checkpoints_load_without_widening_in_bf16() {
    use attn_core::kernels::f32_to_bf16;
    use attn_core::Precision;
    let (model, dict) = load();
    let values: usize = dict.values().map(|t| t.len()).sum();
    let small: usize = dict.values().filter(|t| t.shape().len() == 1).map(|t| t.len()).sum();
    let meta = std::collections::HashMap::from([("attn.seq2seq".to_string(), model.config().to_json())]);
    let bytes = common::half_safetensors(&dict, safetensors::Dtype::BF16, f32_to_bf16, Some(meta));

    let kept = Seq2Seq::from_checkpoint_in(&bytes, Precision::Bf16).unwrap();
    let mut widened = Seq2Seq::from_checkpoint(&bytes).unwrap();
    assert!(kept.holds_bf16_bits() && !widened.holds_bf16_bits());
    widened.set_precision(Precision::Bf16).unwrap();
    assert_eq!(kept.precision(), Precision::Bf16);
    let (pairs, _) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let batch = kept.batch(&pairs).unwrap();
    let sources: Vec<&str> = pairs.iter().map(|(s, _)| *s).collect();
    for par in [Par::Seq, Par::Rayon] {
        assert_eq!(
            kept.logits(&batch, par).unwrap(),
            widened.logits(&batch, par).unwrap(),
            "{par:?}"
        );
        let [a, b] = [&kept, &widened].map(|m| m.greedy(&sources, 12, true, par).unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "greedy, {par:?}");
        let [a, b] = [&kept, &widened].map(|m| m.beam(&sources[..2], 3, 12, par).unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "beam, {par:?}");
    }
    // Every tensor is still bits (a clone of the state dict shows the storage, not what was
    // widened beside it: the byte count below does).
    for (name, t) in kept.state_dict() {
        assert!(t.is_bf16() && t.bytes_held() == 2 * t.len(), "{name}");
    }
    let read = kept.bytes_held() - (widened.bytes_held() - 2 * values);
    assert!(
        read <= 4 * small,
        "the f32 model holds 4 bytes per value; the kept one 2, 4 more for vectors read"
    );
    // A clone keeps the bits (not the widened vectors) and computes the same.
    let copy = kept.clone();
    assert!(copy.holds_bf16_bits());
    assert!(
        copy.bytes_held() <= kept.bytes_held(),
        "{} > {}",
        copy.bytes_held(),
        kept.bytes_held()
    );
    assert_eq!(
        copy.logits(&batch, Par::Seq).unwrap(),
        widened.logits(&batch, Par::Seq).unwrap()
    );
    // The weights are what the file holds.
    assert_eq!(kept.state_dict(), widened.state_dict());
    assert_eq!(kept.parameter_count(), values);

    // No training: the error names the way out, and nothing changed.
    let mut kept = kept;
    let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap(), kept.grads());
    let err = kept
        .train_step(&pairs, &TrainStep::default(), &mut adam, &mut grads, 1e-3)
        .unwrap_err();
    assert!(matches!(err, attn_nn::NnError::NotTrainable { .. }), "{err:?}");
    assert!(err.to_string().contains("read the checkpoint in f32"), "{err}");
    assert!(kept.update(&mut adam, &grads, 1e-3).is_err());
    assert_eq!(
        kept.logits(&batch, Par::Seq).unwrap(),
        widened.logits(&batch, Par::Seq).unwrap()
    );

    // In f32 the file is widened, as before, and the model trains; so does an F32 file read in
    // bf16 (its weights are f32, in a store).
    let mut f32_load = Seq2Seq::from_checkpoint_in(&bytes, Precision::F32).unwrap();
    assert_eq!(f32_load.precision(), Precision::F32);
    assert_eq!(f32_load.bytes_held(), 4 * values);
    let mut grads = f32_load.grads();
    f32_load
        .train_step(&pairs, &TrainStep::default(), &mut adam, &mut grads, 1e-3)
        .unwrap();
    let f32_file = model.to_checkpoint(&Default::default()).unwrap();
    let mut from_f32 = Seq2Seq::from_checkpoint_in(&f32_file, Precision::Bf16).unwrap();
    assert!(!from_f32.holds_bf16_bits() && from_f32.precision() == Precision::Bf16);
    let mut grads = from_f32.grads();
    let mut adam = AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap();
    from_f32
        .train_step(&pairs, &TrainStep::default(), &mut adam, &mut grads, 1e-3)
        .unwrap();
    // The file reader names the file.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("attn-seq2seq-bf16-{}.safetensors", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    assert!(Seq2Seq::load_in(&path, Precision::Bf16).unwrap().holds_bf16_bits());
    std::fs::remove_file(&path).unwrap();
    let err = Seq2Seq::load_in(&path, Precision::Bf16).unwrap_err().to_string();
    assert!(
        err.contains("cannot read") && err.contains("attn-seq2seq-bf16"),
        "{err}"
    );
}

/// Mixed-precision training (`Precision::Bf16` while training): a step's loss and every
/// gradient stay within bf16's error of the f32 step's (measured on the tiny fixture: loss
/// 4.3e-5 relative; gradients within 3.2e-2 in 2-norm, the largest at the source embedding,
/// at the end of the longest chain of rounded products and layer norms; the bounds are about
/// 10×: a gradient through a wrong weight is off by its whole norm), the step gives
/// the same bits on 1, 2, 3 and 8 threads, and the update keeps the model in bf16 with its copies
/// packed from the updated f32 weights (the next forward sees them).
#[test]
fn mixed_precision_training_stays_near_f32() {
    use attn_core::Precision;
    let (model, _) = load();
    let (pairs, _) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let settings = TrainStep::default();
    let step = |model: &mut Seq2Seq, par: Par| {
        let mut adam = AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap();
        let mut grads = model.grads();
        let settings = TrainStep { par, ..settings };
        let loss = model
            .train_step(&pairs, &settings, &mut adam, &mut grads, 1e-3)
            .unwrap();
        let named: Vec<(String, Vec<f32>)> = grads.iter().map(|(n, g)| (n.to_string(), g.data().to_vec())).collect();
        (loss.loss, named)
    };
    let mut f32_model = model.clone();
    let (f32_loss, f32_grads) = step(&mut f32_model, Par::Seq);
    let mut bf16_model = model.clone();
    bf16_model.set_precision(Precision::Bf16).unwrap();
    let before = bf16_model.clone();
    let (bf16_loss, bf16_grads) = step(&mut bf16_model, Par::Seq);
    let loss_error = ((bf16_loss - f32_loss) / f32_loss).abs();
    let mut worst = 0.0f64;
    for ((name, g), (_, w)) in bf16_grads.iter().zip(&f32_grads) {
        let error = relative_norm(g, w);
        worst = worst.max(error);
        assert!(error < 0.3, "gradient {name}: {error:e}");
    }
    eprintln!("bf16 training step against f32: loss {loss_error:.2e}, gradients {worst:.2e}");
    assert!(
        loss_error < 1e-3 && loss_error > 0.0,
        "loss {bf16_loss} against {f32_loss}"
    );
    assert_eq!(
        bf16_model.precision(),
        Precision::Bf16,
        "the update keeps the precision"
    );
    // The copies follow the update: a fresh pack of the updated weights gives the same logits.
    let batch = bf16_model.batch(&pairs).unwrap();
    let mut repacked = bf16_model.clone();
    repacked.set_precision(Precision::F32).unwrap();
    repacked.set_precision(Precision::Bf16).unwrap();
    let logits = bf16_model.logits(&batch, Par::Rayon).unwrap();
    assert_eq!(logits, repacked.logits(&batch, Par::Rayon).unwrap());
    assert_ne!(logits, before.logits(&batch, Par::Rayon).unwrap(), "the weights moved");
    // Threads change nothing.
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut threaded = before.clone();
        let (threaded_loss, threaded_grads) = pool.install(|| step(&mut threaded, Par::Rayon));
        assert_eq!(
            (threaded_loss, &threaded_grads),
            (bf16_loss, &bf16_grads),
            "{threads} threads"
        );
    }
}

/// The bf16 update (`Seq2Seq::update`, tensor by tensor) packs each linear map's copies again
/// right after its weight's update, the backward's too once a backward has run: it gives the
/// weights and moments of the flat f32 pass (`AdamW::update`) followed by `set_precision`,
/// holds the backward's copies already, and the next step's loss and gradients are the bits of
/// a model whose copies were all packed afresh.
#[test]
fn the_bf16_update_packs_again_the_copies_it_held() {
    use attn_core::Precision;
    use attn_nn::parallel::{GradientTree, MicroBatches, SingleProcess};
    let (mut model, _) = load();
    let (pairs, _) = expected();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let plan = MicroBatches::new(pairs.len(), pairs.len(), 1).unwrap();
    let gradients = |model: &Seq2Seq, number: u64| {
        let mut grads = model.grads();
        let settings = TrainStep {
            dropout: 0.1,
            ..TrainStep::at(number)
        };
        let loss = model
            .step_gradients(
                &pairs,
                &settings,
                (&plan, &mut GradientTree::new(), &SingleProcess),
                &mut grads,
            )
            .unwrap();
        (loss.loss, grads)
    };
    let named = |grads: &Grads| -> Vec<(String, Vec<f32>)> {
        grads.iter().map(|(n, g)| (n.to_string(), g.data().to_vec())).collect()
    };
    model.set_precision(Precision::Bf16).unwrap();
    let mut reference = model.clone();
    let (loss, grads) = gradients(&model, 1);
    let (reference_loss, reference_grads) = gradients(&reference, 1);
    assert_eq!((loss, named(&grads)), (reference_loss, named(&reference_grads)));
    let held = model.bytes_held();
    let mut adam = AdamW::new((0.9, 0.98), 1e-9, 0.01).unwrap();
    let mut reference_adam = adam.clone();

    model.update(&mut adam, &grads, 1e-2).unwrap();
    let store = reference.store().clone();
    reference_adam
        .update(&store, &mut reference, &reference_grads, 1e-2)
        .unwrap();
    assert_eq!(reference.precision(), Precision::F32, "the flat pass drops the copies");
    reference.set_precision(Precision::Bf16).unwrap();

    assert_eq!(model.precision(), Precision::Bf16);
    assert_eq!(model.state_dict(), reference.state_dict());
    assert_eq!(adam.all_moments(), reference_adam.all_moments());
    assert_eq!(model.bytes_held(), held, "every copy packed again");
    assert!(
        reference.bytes_held() < held,
        "set_precision packs the forward's copies only"
    );
    let (loss, grads) = gradients(&model, 2);
    let (reference_loss, reference_grads) = gradients(&reference, 2);
    assert_eq!((loss, named(&grads)), (reference_loss, named(&reference_grads)));
    assert_eq!(reference.bytes_held(), held);
}

/// `AdamW::update_each` refuses a module its store did not adopt, naming the first tensor out
/// of place, before updating it and without counting the step, and gradients of another store.
#[test]
fn update_each_refuses_a_module_out_of_place() {
    let (model, _) = load();
    let adam = || AdamW::new((0.9, 0.98), 1e-9, 0.01).unwrap();
    // Each clone holds its own store.
    let (mut a, mut b) = (model.clone(), model.clone());
    let (store_b, mut grads_b) = (b.store().clone(), b.grads());
    for (_, g) in grads_b.iter_mut() {
        g.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = 1e-2 * ((i % 5) as f32 - 2.0));
    }
    let mut refused = adam();
    let before = a.state_dict();
    let err = refused
        .update_each(&store_b, &mut a, &grads_b, 1e-2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`src_embed.weight` is not where the store put it"),
        "{err}"
    );
    assert_eq!(a.state_dict(), before);
    let err = refused
        .update_each(&store_b, &mut b, &a.grads(), 1e-2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Grads::for_store"), "{err}");
    // Not counted: its next update is a first step, as a fresh optimizer's (the bias
    // corrections differ from step to step).
    let mut fresh = b.clone();
    let (store_fresh, mut grads_fresh) = (fresh.store().clone(), fresh.grads());
    for ((_, g), (_, w)) in grads_fresh.iter_mut().zip(grads_b.iter()) {
        g.copy_from_slice(w.data());
    }
    refused.update_each(&store_b, &mut b, &grads_b, 1e-2).unwrap();
    adam()
        .update_each(&store_fresh, &mut fresh, &grads_fresh, 1e-2)
        .unwrap();
    assert_ne!(b.state_dict(), before);
    assert_eq!(b.state_dict(), fresh.state_dict());
}

/// The activation arena hands a caller that writes every element a kept buffer as its last use
/// left it (`arena::overwritten`): those leftovers never reach a result. A training step (loss
/// and every gradient) and the logits after it, on an arena holding a step's buffers filled
/// with NaN (`arena::poison`), are the bits of the same on an empty arena, in f32 and in bf16. (The tiny
/// fixture's buffers are below the arena's smallest kept size, so the model here is the
/// default d_model 128 on 64 pairs: about 800 token rows.)
#[test]
fn arena_leftovers_never_reach_a_result() {
    use attn_core::kernels::arena;
    use attn_core::Precision;
    let texts: Vec<(String, String)> = (0..64)
        .map(|i| {
            (
                format!("{:02}/{:02}/{}", i % 28 + 1, i % 12 + 1, 1990 + i),
                format!("{}-{:02}-{:02}", 1990 + i, i % 12 + 1, i % 28 + 1),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = texts.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let model = Seq2Seq::with_seed(Seq2SeqConfig::for_pairs(&pairs), 3).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let run = || {
            let mut model = model.clone();
            model.set_precision(precision).unwrap();
            let mut adam = AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap();
            let mut grads = model.grads();
            let settings = TrainStep {
                par: Par::Seq,
                ..TrainStep::default()
            };
            let loss = model
                .train_step(&pairs, &settings, &mut adam, &mut grads, 1e-3)
                .unwrap()
                .loss;
            let named: Vec<(String, Vec<f32>)> =
                grads.iter().map(|(n, g)| (n.to_string(), g.data().to_vec())).collect();
            let logits = model.logits(&model.batch(&pairs).unwrap(), Par::Seq).unwrap();
            (loss.to_bits(), named, logits)
        };
        // One worker, so the step's layers run on the thread whose arena is dirtied.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let (clean, dirty) = pool.install(|| {
            arena::clear();
            let clean = run();
            // The arena now holds the buffers of a step; the next step reuses them all.
            arena::poison();
            let dirty = run();
            arena::clear();
            (clean, dirty)
        });
        assert!(clean.2.iter().all(|x| x.is_finite()), "{precision}");
        assert_eq!(clean.0, dirty.0, "loss in {precision}");
        assert_eq!(clean.1, dirty.1, "gradients in {precision}");
        assert_eq!(clean.2, dirty.2, "logits in {precision}");
    }
}

/// A model sized for `pairs` at `d_model` with `nhead` heads, seed 0.
fn model_for(pairs: &[(&str, &str)], d_model: usize, nhead: usize) -> Seq2Seq {
    let mut config = Seq2SeqConfig::for_pairs(pairs);
    config.transformer.layer.d_model = d_model;
    config.transformer.layer.nhead = nhead;
    Seq2Seq::with_seed(config, 0).unwrap()
}

/// `TrainStep::at` sets the step's number and leaves the rest at the defaults; a training
/// forward's tape hands its buffers back to the activation arena when recycled (at least the
/// embedded source and target and the decoder's output, each `[tokens, E]`, large enough here
/// for the arena to keep).
#[test]
fn train_step_settings_and_the_tape_recycle() {
    let at = TrainStep::at(5);
    let default = TrainStep::default();
    assert_eq!(
        (at.number, at.dropout, at.seed, at.label_smoothing, at.par),
        (5, default.dropout, default.seed, default.label_smoothing, default.par)
    );
    use attn_core::kernels::arena;
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"];
    let reversed: Vec<String> = words.iter().map(|w| w.chars().rev().collect()).collect();
    let mut owned = Vec::new();
    for i in 0..40 {
        let (a, b) = (words[i % 8], words[(i / 8) % 8]);
        owned.push((
            format!("{a} {b}"),
            format!("{} {}", reversed[(i / 8) % 8], reversed[i % 8]),
        ));
    }
    let pairs: Vec<(&str, &str)> = owned.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let model = model_for(&pairs, 128, 4);
    let packed = model.packed_batch(&pairs).unwrap();
    let mut grads = model.grads();
    let mut step = Step::new(Dropout::NONE, Par::Seq, &mut grads);
    let (_, tape) = model.forward_train(&packed, &mut step).unwrap();
    let src_tokens: usize = pairs.iter().map(|(s, _)| s.chars().count()).sum();
    let tgt_tokens = packed.target_tokens();
    assert!(src_tokens.min(tgt_tokens) * 128 >= arena::KEEP_FLOATS);
    arena::clear();
    tape.recycle();
    let kept = arena::kept_floats();
    let own = (src_tokens + 2 * tgt_tokens) * 128;
    assert!(kept >= own, "{kept} floats kept, fewer than the tape's own {own}");
}

/// A backward given a batch other than its forward's is refused, naming both token counts,
/// when either side differs: the targets alone, or the sources alone.
#[test]
fn backward_refuses_another_batch_on_either_side() {
    let pairs = [("ab", "ba"), ("abc", "cba")];
    let model = model_for(&pairs, 16, 2);
    let batch = model.packed_batch(&pairs).unwrap();
    let mut grads = model.grads();
    let mut step = Step::new(Dropout::NONE, Par::Seq, &mut grads);
    let (logits, tape) = model.forward_train(&batch, &mut step).unwrap();
    let d_logits = vec![0.0f32; logits.len()];
    for other in [[("ab", "bab"), ("abc", "cba")], [("abb", "ba"), ("abc", "cba")]] {
        let other = model.packed_batch(&other).unwrap();
        let err = model
            .backward(&other, &tape, &d_logits, &mut step)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the forward's batch"), "{err}");
    }
    model.backward(&batch, &tape, &d_logits, &mut step).unwrap();
}

/// The cross-attention weights for pictures: one `[H, T, S]` block per decoder layer, `T` the
/// target's characters and `<bos>`, `S` the source's and `<eos>`; each row a distribution.
#[test]
fn cross_attention_weights_are_one_distribution_per_row() {
    let (model, _) = load();
    let (source, target) = ("July 4", "07-04");
    let layers = model.cross_attention(source, target, Par::Seq).unwrap();
    let transformer = &model.config().transformer;
    let (h, t, s) = (transformer.layer.nhead, target.len() + 1, source.len() + 1);
    assert_eq!(layers.len(), transformer.num_decoder_layers);
    for (l, weights) in layers.iter().enumerate() {
        assert_eq!(weights.len(), h * t * s, "layer {l}");
        for (r, row) in weights.chunks(s).enumerate() {
            let sum: f64 = row.iter().map(|&w| w as f64).sum();
            assert!(
                row.iter().all(|&w| (0.0..=1.0).contains(&w)),
                "layer {l} row {r}: {row:?}"
            );
            // Measured at most 1.9e-7 from 1; about 10x.
            assert!((sum - 1.0).abs() < 2e-6, "layer {l} row {r} sums to {sum}");
        }
    }
}

/// `train_step` refuses a step whose loss alone is not finite: a generator bias of −∞ on a
/// target character gives it probability 0 (an infinite loss) while every gradient stays
/// finite (the probabilities' gradient is bounded); the error names the loss, and the weights
/// are as they were.
#[test]
fn train_step_refuses_an_infinite_loss_with_finite_gradients() {
    let pairs = [("ab", "ba"), ("abc", "cba")];
    let model = model_for(&pairs, 16, 2);
    let mut dict = model.state_dict();
    let a = model.config().tgt_vocab.encode("a")[0];
    dict.get_mut("generator.bias").unwrap().data_mut()[a] = f32::NEG_INFINITY;
    let mut model = Seq2Seq::from_state_dict(model.config().clone(), dict).unwrap();
    let before = model.state_dict();
    // Without label smoothing, which would also weigh the −∞ logit's log-probability.
    let settings = TrainStep {
        label_smoothing: 0.0,
        ..TrainStep::default()
    };
    // The gradients of this step are finite: only the loss is not.
    let mut grads = model.grads();
    let step = model
        .step_gradients(
            &pairs,
            &settings,
            (
                &attn_nn::parallel::MicroBatches::new(2, 2, 1).unwrap(),
                &mut attn_nn::parallel::GradientTree::new(),
                &attn_nn::parallel::SingleProcess,
            ),
            &mut grads,
        )
        .unwrap();
    assert_eq!(step.loss, f64::INFINITY);
    assert!(grads.clip_norm(f32::INFINITY).is_finite());
    let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap(), model.grads());
    let err = model
        .train_step(&pairs, &settings, &mut adam, &mut grads, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loss inf") && err.contains("not updated"), "{err}");
    assert!(model.state_dict() == before, "the weights changed");
}

/// The sinusoidal table at even and odd widths is its definition element by element (an odd
/// width's last column is a sine, and no row writes into the next or past the table); a model's
/// store holds exactly its state dict: the same names and shapes, and as many floats.
#[test]
fn positions_at_any_width_and_the_store_of_a_model() {
    for d in [1, 4, 5] {
        let pe = attn_nn::seq2seq::sinusoidal_positions(7, d);
        assert_eq!(pe.len(), 7 * d);
        for p in 0..7 {
            for c in 0..d {
                let angle = p as f64 / 10_000f64.powf((c - c % 2) as f64 / d as f64);
                let want = if c % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
                assert_eq!(
                    pe[p * d + c].to_bits(),
                    want.to_bits(),
                    "d {d}, position {p}, column {c}"
                );
            }
        }
    }
    let (model, _) = untrained_dates_model();
    let dict = model.state_dict();
    let layout = model.store().layout();
    let names: Vec<&str> = layout.entries().iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, dict.keys().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(layout.numel(), dict.values().map(|t| t.data().len()).sum::<usize>());
    for entry in layout.entries() {
        assert_eq!(entry.shape, dict[&entry.name].shape(), "{}", entry.name);
    }
}

/// A model that has no answer gives none: a checkpoint with a NaN weight is refused, naming the
/// weight; logits that overflow fail the input they come from (greedy and beam), rather than
/// give tokens scored NaN; and logits that are huge but equal are a uniform guess, scored
/// `-ln(Vt)` a step, not the certainty (log-probability 0) that `x - (max + ln Σ)` gave.
#[test]
fn a_model_without_an_answer_gives_none() {
    let (model, sources) = untrained_dates_model();
    let sources: Vec<&str> = sources.iter().take(3).map(String::as_str).collect();
    let config = model.config().clone();
    let with = |name: &str, change: &dyn Fn(&mut [f32])| {
        let mut dict = model.state_dict();
        change(dict.get_mut(name).unwrap().data_mut());
        Seq2Seq::from_state_dict(config.clone(), dict).unwrap()
    };
    let nan = with("transformer.encoder.layers.0.linear1.weight", &|w| w[5] = f32::NAN);
    let bytes = nan.to_checkpoint(&Default::default()).unwrap();
    for precision in [attn_core::Precision::F32, attn_core::Precision::Bf16] {
        let err = Seq2Seq::from_checkpoint_in(&bytes, precision).unwrap_err().to_string();
        assert!(
            err.starts_with("tensor `transformer.encoder.layers.0.linear1.weight` holds NaN at [0, 5]"),
            "{err}"
        );
    }
    let err = Seq2Seq::from_checkpoint(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("a model whose weights are not finite has no answers to give"),
        "{err}"
    );
    // Rows of ±3e38: every logit is ±infinity, and their log-softmax NaN.
    let d = config.transformer.layer.d_model;
    let overflow = with("generator.weight", &|w| {
        for (i, v) in w.iter_mut().enumerate() {
            *v = if (i / d) % 2 == 0 { 3e38 } else { -3e38 };
        }
    });
    let greedy = overflow.greedy(&sources, 8, false, Par::Seq);
    let beam = overflow.beam(&sources, 2, 8, Par::Seq);
    for result in [greedy, beam] {
        match result {
            Err(attn_nn::NnError::NonFinite { index, what }) => {
                assert_eq!(index, 0);
                assert!(what.contains("the model's logits are not finite"), "{what}");
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
    let equal = {
        let mut dict = model.state_dict();
        dict.get_mut("generator.weight").unwrap().data_mut().fill(0.0);
        dict.get_mut("generator.bias").unwrap().data_mut().fill(1e34);
        Seq2Seq::from_state_dict(config.clone(), dict).unwrap()
    };
    let uniform = -(config.tgt_vocab.len() as f64).ln();
    for decoded in equal.greedy(&sources, 8, false, Par::Seq).unwrap() {
        // Every id ties: the first from `<eos>` is taken, and the sequence ends there.
        assert_eq!(decoded.tokens, [2]);
        assert!(
            (decoded.log_prob - uniform).abs() < 1e-12,
            "{} vs {uniform}",
            decoded.log_prob
        );
    }
    let beam = equal.beam(&sources[..1], 3, 8, Par::Seq).unwrap();
    assert!((beam[0].log_prob - uniform).abs() < 1e-12, "{}", beam[0].log_prob);
}
