//! The training step: the batch order, the schedule, `Trainer` (model, optimizer, gradients)
//! and the validation pass.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::rng::SplitMix64;
use attn_nn::core::kernels::Par;
use attn_nn::core::{FromSafetensors, Grads, StateDict};
use attn_nn::parallel::{Collective, GradientTree, MicroBatches};
use attn_nn::{AdamW, Schedule, Seq2Seq, Seq2SeqConfig, TrainStep};

use super::{OptimFlags, ScheduleFlag};

/// The order batches are drawn in: file order, or a seeded shuffle per epoch.
struct Order {
    n: usize,
    seed: u64,
    shuffle: bool,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Order {
    /// Indices of batch `step` (0-based): positions `step·B … step·B + B − 1` of the endless
    /// stream of epochs.
    fn batch(&mut self, step: u64, b: usize) -> Vec<usize> {
        (0..b as u64)
            .map(|j| {
                let p = step * b as u64 + j;
                let (epoch, i) = (p / self.n as u64, (p % self.n as u64) as usize);
                if !self.shuffle {
                    return i;
                }
                if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
                    let mut perm: Vec<usize> = (0..self.n).collect();
                    let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
                    for k in (1..self.n).rev() {
                        perm.swap(k, (rng.next_u64() % (k as u64 + 1)) as usize);
                    }
                    self.epoch = Some((epoch, perm));
                }
                self.epoch.as_ref().expect("set above").1[i]
            })
            .collect()
    }
}

/// The schedule the flags name.
fn schedule(flags: &OptimFlags, d_model: usize, steps: u64) -> Schedule {
    match flags.schedule {
        ScheduleFlag::Constant => Schedule::Constant { warmup: flags.warmup },
        ScheduleFlag::Noam => Schedule::Noam {
            d_model,
            warmup: flags.warmup.max(1),
        },
        ScheduleFlag::Cosine => Schedule::Cosine {
            warmup: flags.warmup,
            total: steps,
            min_factor: 0.0,
        },
    }
}

/// Refuses a run whose model and steps would pass the memory cap (`ATTN_MAX_MEMORY`), before
/// the model is made: [`Seq2SeqConfig::training_bytes`] on micro-batches of the longest pair,
/// and a step's list of pairs. `--d-model 1000000`, `--encoder-layers 100000000` or
/// `--batch-size 100000000000` asked the allocator for terabytes and aborted.
pub fn check_memory(config: &Seq2SeqConfig, flags: &OptimFlags, pairs: &[(String, String)]) -> Result<()> {
    let longest = pairs
        .iter()
        .map(|(s, t)| s.chars().count() + t.chars().count() + 2)
        .max()
        .unwrap_or(0);
    let micro = flags.micro_batch.unwrap_or(flags.batch_size).min(flags.batch_size);
    // A step's indices and pairs: 40 bytes a sequence.
    let bytes = config
        .training_bytes(micro.saturating_mul(longest))
        .saturating_add(40 * flags.batch_size as u128);
    crate::support::memory::check(
        bytes,
        "training (the weights, gradients and AdamW's moments, a micro-batch's activations)",
    )
}

/// A model, its optimizer and everything one step needs.
pub struct Trainer {
    /// The model being trained.
    pub model: Seq2Seq,
    adam: AdamW,
    grads: Grads,
    schedule: Schedule,
    flags: OptimFlags,
    order: Order,
    pairs: Vec<(String, String)>,
    dropout: f32,
    /// The step's micro-batches and the processes that share them.
    plan: MicroBatches,
    tree: GradientTree,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The batch's mean loss.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f32,
    /// The gradients' global norm before clipping.
    pub grad_norm: f32,
    /// Target tokens in the batch (the loss's count).
    pub tokens: usize,
    /// Seconds spent clipping and in AdamW (the flat passes over the parameter store).
    pub optimizer_s: f64,
    /// Seconds spent passing gradients between processes (0 for one).
    pub communication_s: f64,
}

impl Trainer {
    /// A trainer over `pairs` (which must fit the model's vocabulary and `max_len`), one of
    /// `processes` that share each step.
    pub fn new(
        mut model: Seq2Seq,
        pairs: Vec<(String, String)>,
        flags: OptimFlags,
        steps: u64,
        processes: usize,
    ) -> Result<Self> {
        if flags.batch_size == 0 {
            bail!("--batch-size is 0, expected at least 1");
        }
        // The model exists (a checkpoint's configuration, or checked before it was made); its
        // steps have not run.
        check_memory(model.config(), &flags, &pairs)?;
        let micro = flags.micro_batch.unwrap_or(flags.batch_size);
        let plan = MicroBatches::new(flags.batch_size, micro, processes).map_err(|_| {
            anyhow::anyhow!(
                "--batch-size {} in micro-batches of {micro} gives {} for {processes} processes; expected at least one \
                 per process: pass --micro-batch {} or less (the bytes depend on --micro-batch, not on the process count)",
                flags.batch_size,
                flags.batch_size.div_ceil(micro.max(1)),
                flags.batch_size / processes.max(1)
            )
        })?;
        if !(0.0..=1.0).contains(&flags.label_smoothing) {
            bail!(
                "--label-smoothing is {}, expected between 0 and 1",
                flags.label_smoothing
            );
        }
        if !(flags.lr >= 0.0 && flags.lr.is_finite()) {
            bail!("--lr is {}, expected a finite number at least 0", flags.lr);
        }
        if let Some(c) = flags.clip_norm {
            if !(c > 0.0 && c.is_finite()) {
                bail!("--clip-norm is {c}, expected a positive number");
            }
        }
        let adam = AdamW::new(flags.betas, flags.eps, flags.weight_decay)?;
        // bf16 copies of the weights for the products (repacked by every update), or none.
        model.set_precision(flags.precision.effective(false).precision())?;
        let d_model = model.config().transformer.layer.d_model;
        let dropout = model.config().transformer.layer.dropout as f32;
        let order = Order {
            n: pairs.len(),
            seed: flags.seed,
            shuffle: !flags.no_shuffle,
            epoch: None,
        };
        Ok(Trainer {
            grads: model.grads(),
            model,
            adam,
            schedule: schedule(&flags, d_model, steps),
            flags,
            order,
            pairs,
            dropout,
            plan,
            tree: GradientTree::new(),
        })
    }

    /// Step `step` (1-based), with the other processes of `comm` (which run the same step):
    /// returns what it measured, the same on every process.
    pub fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepReport> {
        let indices = self.order.batch(step - 1, self.flags.batch_size);
        let pairs: Vec<(&str, &str)> = indices
            .iter()
            .map(|&i| (self.pairs[i].0.as_str(), self.pairs[i].1.as_str()))
            .collect();
        let settings = TrainStep {
            number: step,
            dropout: self.dropout,
            seed: self.flags.seed,
            label_smoothing: self.flags.label_smoothing,
            par: Par::Rayon,
        };
        let measured =
            self.model
                .step_gradients(&pairs, &settings, (&self.plan, &mut self.tree, comm), &mut self.grads)?;
        let loss = measured.loss;
        if !loss.is_finite() {
            bail!("step {step}: the loss is {loss}; the weights were not updated (try a lower --lr or --clip-norm)");
        }
        let optimizer_start = Instant::now();
        let grad_norm = self.grads.clip_norm(self.flags.clip_norm.unwrap_or(f32::INFINITY));
        if !grad_norm.is_finite() {
            bail!(
                "step {step}: the gradients' norm is {grad_norm}; the weights were not updated (try a lower --lr or --clip-norm)"
            );
        }
        let lr = self.flags.lr * self.schedule.factor(step);
        self.model.update(&mut self.adam, &self.grads, lr)?;
        Ok(StepReport {
            loss,
            lr,
            grad_norm,
            tokens: measured.tokens,
            optimizer_s: optimizer_start.elapsed().as_secs_f64(),
            communication_s: self.tree.communication_seconds(),
        })
    }

    /// The optimizer's state as named tensors (for `--resume`).
    pub(super) fn state(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut tensors = Vec::new();
        for (name, m, v) in self.adam.all_moments() {
            tensors.push((format!("m.{name}"), vec![m.len()], m.to_vec()));
            tensors.push((format!("v.{name}"), vec![v.len()], v.to_vec()));
        }
        tensors
    }

    /// Restores the optimizer from a state file; returns the step it was saved at.
    pub(super) fn restore(&mut self, path: &Path) -> Result<u64> {
        let bytes = std::fs::read(path).with_context(|| format!("--resume needs {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).context("the optimizer state")?;
        let step: u64 = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: no `step` metadata", path.display()))?;
        let dict = StateDict::from_safetensors(&bytes).with_context(|| path.display().to_string())?;
        let mut moments: BTreeMap<String, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
        for (name, t) in dict {
            if let Some(n) = name.strip_prefix("m.") {
                moments.entry(n.to_string()).or_default().0 = t.into_data();
            } else if let Some(n) = name.strip_prefix("v.") {
                moments.entry(n.to_string()).or_default().1 = t.into_data();
            }
        }
        self.adam.restore(step, moments)?;
        Ok(step)
    }
}

/// Exact-match accuracy (greedy) and mean loss of `pairs`.
pub fn evaluate(model: &Seq2Seq, pairs: &[(String, String)], label_smoothing: f32) -> Result<(f64, f64)> {
    let (mut correct, mut loss_sum, mut count) = (0usize, 0.0f64, 0usize);
    for chunk in pairs.chunks(256) {
        let sources: Vec<&str> = chunk.iter().map(|(s, _)| s.as_str()).collect();
        let max_len = model.config().max_len;
        let decoded = model.greedy(&sources, max_len, false, Par::Rayon)?;
        for (d, (_, t)) in decoded.iter().zip(chunk) {
            correct += usize::from(model.config().tgt_vocab.decode(&d.tokens) == *t && d.tokens.last() == Some(&2));
        }
        let refs: Vec<(&str, &str)> = chunk.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
        let batch = model.batch(&refs)?;
        let logits = model.logits(&batch, Par::Rayon)?;
        let (loss, _) = model.padded_loss(&batch, &logits, label_smoothing, Par::Rayon)?;
        let tokens = batch.target_tokens();
        loss_sum += loss * tokens as f64;
        count += tokens;
    }
    Ok((correct as f64 / pairs.len() as f64, loss_sum / count.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::dates::{generate, Kind, Split};

    fn order(n: usize, seed: u64, shuffle: bool) -> Order {
        Order {
            n,
            seed,
            shuffle,
            epoch: None,
        }
    }

    /// In file order batch `s` holds positions `s·B … s·B + B − 1`, wrapping; shuffled, each
    /// epoch is a permutation of the pairs drawn from the seed, cut into batches in order, and a
    /// batch that crosses an epoch's end continues into the next epoch's permutation.
    #[test]
    fn batches_walk_the_file_or_a_seeded_shuffle_per_epoch() {
        let mut plain = order(10, 3, false);
        assert_eq!(plain.batch(0, 4), [0, 1, 2, 3]);
        assert_eq!(plain.batch(2, 4), [8, 9, 0, 1]);
        assert_eq!(plain.batch(7, 3), [1, 2, 3]);

        let mut shuffled = order(12, 7, true);
        let epochs: Vec<Vec<usize>> = (0..3).map(|e| shuffled.batch(e, 12)).collect();
        for epoch in &epochs {
            let mut sorted = epoch.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..12).collect::<Vec<_>>(), "{epoch:?}");
            assert_ne!(*epoch, sorted, "shuffled");
        }
        assert!(epochs[0] != epochs[1] && epochs[1] != epochs[2] && epochs[0] != epochs[2]);
        let mut fresh = order(12, 7, true);
        let quarters: Vec<usize> = (0..4).flat_map(|s| fresh.batch(s, 3)).collect();
        assert_eq!(quarters, epochs[0], "batches of 3 cut the same permutation");
        let mut crossing = order(12, 7, true);
        let want = [epochs[0][10], epochs[0][11], epochs[1][0], epochs[1][1], epochs[1][2]];
        assert_eq!(crossing.batch(2, 5), want);
        assert_ne!(order(12, 8, true).batch(0, 12), epochs[0], "another seed");
    }

    /// The shuffled order of a seed never changes: a checkpoint trained by an earlier version
    /// is reproduced by this one (`--resume` included). FNV-1a over four epochs of 1,000 pairs
    /// for seeds 0, 1 and 2.
    #[test]
    fn the_shuffled_order_never_moves() {
        let mut bytes = Vec::new();
        for seed in 0..3 {
            let mut shuffled = order(1000, seed, true);
            for step in 0..4 {
                for i in shuffled.batch(step, 1000) {
                    bytes.extend((i as u32).to_le_bytes());
                }
            }
        }
        let digest = crate::support::fnv::fnv1a(bytes);
        assert_eq!(digest, 0xc064_fc67_ad49_43a9, "{digest:#x}");
    }

    /// `evaluate` on the shipped translator over 300 held-out dates (two chunks of its 256):
    /// the accuracy is the share of pairs whose greedy answer, decoded alone and ending in EOS,
    /// is the target, and the loss is the token-weighted mean that one batch of all 300 gives,
    /// with the label smoothing asked for. With the targets rotated by one (each wrong) no
    /// answer counts and the loss grows.
    #[test]
    fn evaluate_counts_exact_answers_and_weights_the_loss_by_tokens() {
        let model = crate::commands::translate::shipped().unwrap();
        let examples = generate(Split::Test, Kind::Date, 300, 11, None);
        let pairs: Vec<(String, String)> = examples.iter().map(|e| (e.source.clone(), e.target.clone())).collect();
        let max_len = model.config().max_len;
        let answered = |(source, target): &(String, String)| {
            let d = model
                .greedy(&[source.as_str()], max_len, false, Par::Seq)
                .unwrap()
                .remove(0);
            d.tokens.last() == Some(&2) && model.config().tgt_vocab.decode(&d.tokens) == *target
        };
        let reference_loss = |pairs: &[(String, String)], smoothing: f32| {
            let refs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
            let batch = model.batch(&refs).unwrap();
            let logits = model.logits(&batch, Par::Seq).unwrap();
            model.padded_loss(&batch, &logits, smoothing, Par::Seq).unwrap().0
        };
        let rotated: Vec<(String, String)> = (0..pairs.len())
            .map(|i| (pairs[i].0.clone(), pairs[(i + 1) % pairs.len()].1.clone()))
            .collect();
        assert!(rotated.iter().zip(&pairs).all(|(r, p)| r.1 != p.1));
        let mut losses = Vec::new();
        for (set, smoothing) in [(&pairs, 0.0), (&pairs, 0.1), (&rotated, 0.0)] {
            let (accuracy, loss) = evaluate(&model, set, smoothing).unwrap();
            let correct = set.iter().filter(|p| answered(p)).count();
            assert_eq!(accuracy, correct as f64 / set.len() as f64);
            let want = reference_loss(set, smoothing);
            // The chunks' f64 sums against one batch's: 0 to 3.4e-15 apart, relatively.
            assert!((loss - want).abs() <= 3e-14 * want.abs(), "{loss} against {want}");
            losses.push((accuracy, loss));
        }
        assert!(
            losses[0].0 > 0.9,
            "the shipped model answers held-out dates: {losses:?}"
        );
        assert_eq!(losses[2].0, 0.0);
        assert!(
            losses[1].1 > losses[0].1 && losses[2].1 > 10.0 * losses[0].1,
            "{losses:?}"
        );
    }
}
