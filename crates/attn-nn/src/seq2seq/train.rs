//! Training: the forward of a packed batch, the label-smoothed loss and the backward, with the tape
//! between them.

use attn_core::kernels::{self, arena, Par};
use attn_core::{AttnError, Packing, Sequence};

use crate::parallel::{Collective, GradientTree, MicroBatches, SingleProcess};
use crate::step::{Dropout, Step};
use crate::transformer::TransformerTape;
use crate::{BlockMasks, NnError, Result, TransformerMasks};
use attn_core::Grads;

use super::data::{Batch, Packed, PAD};
use super::Seq2Seq;

/// What [`Seq2Seq::forward_train`] keeps (not its batch: the backward takes it again). After
/// the backward, [`Seq2SeqTape::recycle`] hands its buffers to the next step.
#[derive(Debug)]
pub struct Seq2SeqTape {
    src_x: Vec<f32>,
    tgt_x: Vec<f32>,
    transformer: TransformerTape,
    /// The decoder's output, the generator's input, `[B·T, E]`.
    decoded: Vec<f32>,
}

impl Seq2SeqTape {
    /// Hands every buffer the tape holds back to the activation arena
    /// ([`attn_core::kernels::arena`]): the next step's forward and backward reuse them instead
    /// of allocating.
    pub fn recycle(self) {
        [self.src_x, self.tgt_x, self.decoded].into_iter().for_each(arena::give);
        self.transformer.recycle();
    }
}

/// The settings of one training step that are not its batch. The default: step 1, no dropout,
/// seed 0, no label smoothing, on rayon's threads.
#[derive(Debug, Clone, Copy)]
pub struct TrainStep {
    /// The step's number in its run, 1-based (it seeds the dropout masks).
    pub number: u64,
    /// Dropout's probability.
    pub dropout: f32,
    /// The run's seed.
    pub seed: u64,
    /// `F.cross_entropy`'s `label_smoothing`.
    pub label_smoothing: f32,
    /// Where each process's work runs.
    pub par: Par,
}

impl TrainStep {
    /// Step `number` with the other settings at their defaults.
    pub fn at(number: u64) -> Self {
        TrainStep {
            number,
            ..TrainStep::default()
        }
    }
}

impl Default for TrainStep {
    fn default() -> Self {
        TrainStep {
            number: 1,
            dropout: 0.0,
            seed: 0,
            label_smoothing: 0.0,
            par: Par::Rayon,
        }
    }
}

/// What [`Seq2Seq::step_gradients`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    /// The mean loss over the batch's target tokens.
    pub loss: f64,
    /// The batch's target tokens.
    pub tokens: usize,
}

impl Seq2Seq {
    /// The gradient of one training step's mean loss over `pairs` into `grads` (flat, from
    /// [`Seq2Seq::grads`], zeroed here), identical on every rank of `comm`: the batch in the
    /// micro-batches of `plan`, each computed whole by one rank, summed in
    /// [`GradientTree`]'s fixed tree (see [`crate::parallel`]). The bytes depend on the pairs,
    /// the settings and `plan.micro_batch`, not on the number of processes or threads; with one
    /// micro-batch this is [`packed_batch`](Self::packed_batch), [`forward_train`](Self::forward_train),
    /// [`loss`](Self::loss) and [`backward`](Self::backward) on the whole batch.
    ///
    /// Every rank of `comm` calls this with the same pairs, settings and plan.
    pub fn step_gradients(
        &self,
        pairs: &[(&str, &str)],
        settings: &TrainStep,
        (plan, tree, comm): (&MicroBatches, &mut GradientTree, &dyn Collective),
        grads: &mut Grads,
    ) -> Result<StepLoss> {
        if plan.batch != pairs.len() {
            return Err(crate::error::invalid(
                "MicroBatches::batch",
                plan.batch,
                format!("the step's {} pairs", pairs.len()),
            ));
        }
        // The labels of the whole step: one per target character (`Vocab::encode`), and `<eos>`.
        let tokens: usize = pairs.iter().map(|(_, t)| t.chars().count() + 1).sum();
        let step_dropout = Dropout::for_step(settings.dropout, settings.seed, settings.number);
        let values = tree.reduce(plan, comm, grads, |j, g| {
            let batch = self.packed_batch(&pairs[plan.pairs(j)])?;
            let mut step = Step {
                number: settings.number,
                ..Step::new(step_dropout.for_micro_batch(j), settings.par, g)
            };
            let (logits, tape) = self.forward_train(&batch, &mut step)?;
            let (loss, d_logits) = self.loss_part(&batch, &logits, settings.label_smoothing, tokens, settings.par)?;
            arena::give(logits);
            self.backward(&batch, &tape, &d_logits, &mut step)?;
            // The micro-batch's buffers go back to the activation arena for the next one.
            arena::give(d_logits);
            tape.recycle();
            Ok(loss)
        })?;
        Ok(StepLoss {
            loss: values.iter().sum(),
            tokens,
        })
    }

    /// One training step of `pairs` on this process: the gradient of the mean loss
    /// ([`step_gradients`](Self::step_gradients), one micro-batch) into `grads` (from
    /// [`Seq2Seq::grads`]), then one AdamW update at learning rate `lr`. A loss or gradient
    /// that is not finite is an error and leaves the weights as they were.
    ///
    /// ```
    /// use attn_nn::{AdamW, Seq2Seq, Seq2SeqConfig, TrainStep};
    /// let pairs = [("ab", "ba"), ("abc", "cba")];
    /// let mut config = Seq2SeqConfig::for_pairs(&pairs);
    /// config.transformer.layer.d_model = 16;
    /// config.transformer.layer.nhead = 2;
    /// let mut model = Seq2Seq::with_seed(config, 0).unwrap();
    /// let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap(), model.grads());
    /// let first = model.train_step(&pairs, &TrainStep::default(), &mut adam, &mut grads, 1e-3).unwrap();
    /// let second = model.train_step(&pairs, &TrainStep { number: 2, ..Default::default() }, &mut adam, &mut grads, 1e-3).unwrap();
    /// assert!(second.loss < first.loss);
    /// ```
    pub fn train_step(
        &mut self,
        pairs: &[(&str, &str)],
        settings: &TrainStep,
        adam: &mut crate::AdamW,
        grads: &mut Grads,
        lr: f32,
    ) -> Result<StepLoss> {
        let plan = MicroBatches::new(pairs.len(), pairs.len(), 1)?;
        let step = self.step_gradients(
            pairs,
            settings,
            (&plan, &mut GradientTree::new(), &SingleProcess),
            grads,
        )?;
        let norm = grads.clip_norm(f32::INFINITY);
        if !step.loss.is_finite() || !norm.is_finite() {
            return Err(crate::error::invalid(
                "train_step",
                format!(
                    "loss {} and gradient norm {norm} at step {}",
                    step.loss, settings.number
                ),
                "finite values; the weights were not updated (try a lower learning rate)",
            ));
        }
        self.update(adam, grads, lr)?;
        Ok(step)
    }

    /// [`loss`](Self::loss) of a micro-batch of a step with `tokens` target tokens in all: its
    /// loss and gradient divided by `tokens`, so the micro-batches add up to the step's mean.
    pub fn loss_part(
        &self,
        packed: &Packed,
        logits: &[f32],
        label_smoothing: f32,
        tokens: usize,
        par: Par,
    ) -> Result<(f64, Vec<f32>)> {
        self.cross_entropy(&packed.labels, logits, label_smoothing, Some(tokens), par)
    }

    /// The training embedding at `place` (`src_embed.` or `tgt_embed.`): [`Seq2Seq::embed_at`],
    /// then the dropout site `{place}dropout`.
    fn embed_train(&self, place: &str, ids: &[usize], positions: &[usize], step: &mut Step<'_>) -> Result<Vec<f32>> {
        let mut x = self.embed_at(self.table(place), ids, positions)?;
        let here = step.path.join(place);
        step.at(&here).dropout(&mut x, "dropout")?;
        Ok(x)
    }

    /// The backward of [`Seq2Seq::embed_train`]: `{place}weight[id] += sqrt(d)·dropout(dx)`.
    fn embed_backward(&self, place: &str, ids: &[usize], mut dx: Vec<f32>, step: &mut Step<'_>) -> Result<()> {
        let e = self.config.d_model();
        let par = step.par;
        let here = step.path.join(place);
        let step = step.at(&here);
        step.dropout(&mut dx, "dropout")?;
        let scale = (e as f32).sqrt();
        dx.iter_mut().for_each(|v| *v *= scale);
        let slot = step.grads.of(self.table(place), step.path, "weight")?;
        kernels::embedding_backward(slot, &dx, ids, e, par).map_err(AttnError::from)?;
        arena::give(dx);
        Ok(())
    }

    /// The packed masks of a batch: each sequence attends to itself, the decoder causally.
    fn packed_masks(p: &Packed) -> TransformerMasks<'_> {
        fn own(starts: &[usize]) -> Packing<'_> {
            Packing {
                query_starts: starts,
                key_starts: starts,
            }
        }
        TransformerMasks {
            src: BlockMasks {
                packing: Some(own(&p.src_starts)),
                ..Default::default()
            },
            tgt: BlockMasks {
                is_causal: true,
                packing: Some(own(&p.tgt_starts)),
                ..Default::default()
            },
            memory: BlockMasks {
                packing: Some(Packing {
                    query_starts: &p.tgt_starts,
                    key_starts: &p.src_starts,
                }),
                ..Default::default()
            },
        }
    }

    /// The training forward of a batch without padding ([`Seq2Seq::packed_batch`]: the cost
    /// follows the real tokens): logits `[Nt, Vt]`, one row per real target position in
    /// sequence order, and the tape.
    pub fn forward_train(&self, packed: &Packed, step: &mut Step<'_>) -> Result<(Vec<f32>, Seq2SeqTape)> {
        self.check_trainable()?;
        let e = self.config.d_model();
        let (ns, nt) = (packed.src.len(), packed.tgt_in.len());
        let src_x = self.embed_train("src_embed.", &packed.src, &packed.src_positions, step)?;
        let tgt_x = self.embed_train("tgt_embed.", &packed.tgt_in, &packed.tgt_positions, step)?;
        let masks = Self::packed_masks(packed);
        let here = step.path.join("transformer.");
        let (decoded, transformer) = self.transformer.forward_train(
            Sequence::batch_first(&src_x, 1, ns, e),
            Sequence::batch_first(&tgt_x, 1, nt, e),
            &masks,
            &mut step.at(&here),
        )?;
        let logits = self.generator.forward(&decoded, step.par)?;
        Ok((
            logits,
            Seq2SeqTape {
                src_x,
                tgt_x,
                transformer,
                decoded,
            },
        ))
    }

    /// The loss of the training forward's logits `[Nt, Vt]` against `packed`'s labels
    /// (`F.cross_entropy` with `ignore_index=<pad>` and `label_smoothing`), and its gradient.
    pub fn loss(&self, packed: &Packed, logits: &[f32], label_smoothing: f32, par: Par) -> Result<(f64, Vec<f32>)> {
        self.cross_entropy(&packed.labels, logits, label_smoothing, None, par)
    }

    /// The same for the padded logits `[B·T, Vt]` of [`logits`](Self::logits) and their batch.
    pub fn padded_loss(
        &self,
        batch: &Batch,
        logits: &[f32],
        label_smoothing: f32,
        par: Par,
    ) -> Result<(f64, Vec<f32>)> {
        self.cross_entropy(&batch.labels, logits, label_smoothing, None, par)
    }

    /// The loss and its gradient, divided by `denominator` (the target tokens of the whole step)
    /// or, without one, by the tokens of `labels`.
    fn cross_entropy(
        &self,
        labels: &[i64],
        logits: &[f32],
        label_smoothing: f32,
        denominator: Option<usize>,
        par: Par,
    ) -> Result<(f64, Vec<f32>)> {
        let v = self.config.tgt_vocab.len();
        if logits.len() != labels.len() * v {
            return Err(NnError::ShapeMismatch {
                op: "Seq2Seq::loss",
                tensor: "logits".into(),
                expected: format!("[{}, {v}]: a row per label of the batch", labels.len()),
                got: vec![logits.len()],
            });
        }
        // Every row written (ignored rows with zeros).
        let mut d_logits = arena::overwritten(logits.len());
        let pad = PAD as i64;
        let ce = match denominator {
            None => kernels::cross_entropy(&mut d_logits, logits, labels, pad, label_smoothing, par),
            Some(d) => kernels::cross_entropy_part(&mut d_logits, logits, labels, pad, label_smoothing, d, par),
        }
        .map_err(AttnError::from)?;
        Ok((ce.loss, d_logits))
    }

    /// The backward of [`forward_train`](Self::forward_train) from the logits' gradient, with
    /// the same batch and step: adds every parameter's gradient into `step.grads`. A batch
    /// other than the forward's (by its token counts) is an error.
    pub fn backward(&self, packed: &Packed, tape: &Seq2SeqTape, d_logits: &[f32], step: &mut Step<'_>) -> Result<()> {
        let e = self.config.d_model();
        if tape.src_x.len() != packed.src.len() * e || tape.tgt_x.len() != packed.tgt_in.len() * e {
            return Err(NnError::ShapeMismatch {
                op: "Seq2Seq::backward",
                tensor: "packed".into(),
                expected: format!(
                    "the forward's batch: {} source and {} target tokens",
                    tape.src_x.len() / e.max(1),
                    tape.tgt_x.len() / e.max(1)
                ),
                got: vec![packed.src.len(), packed.tgt_in.len()],
            });
        }
        let here = step.path;
        let mut d_decoded = arena::overwritten(tape.decoded.len());
        self.generator.backward(
            Some(&mut d_decoded),
            d_logits,
            &tape.decoded,
            &mut step.at(&here.join("generator.")),
        )?;
        let p = packed;
        let masks = Self::packed_masks(p);
        let (d_src, d_tgt) = self.transformer.backward(
            Sequence::batch_first(&tape.src_x, 1, p.src.len(), e),
            Sequence::batch_first(&tape.tgt_x, 1, p.tgt_in.len(), e),
            &masks,
            &tape.transformer,
            &d_decoded,
            &mut step.at(&here.join("transformer.")),
        )?;
        arena::give(d_decoded);
        self.embed_backward("src_embed.", &p.src, d_src, step)?;
        self.embed_backward("tgt_embed.", &p.tgt_in, d_tgt, step)?;
        Ok(())
    }
}
