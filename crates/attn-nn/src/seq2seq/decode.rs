//! Inference: teacher-forced logits, greedy and beam decoding through the caches, and the cross-
//! attention picture.

use attn_core::kernels::Par;
use attn_core::{KeyPadding, Sequence};

use crate::error::invalid;
use crate::{BlockMasks, NnError, Result, TransformerMasks};

use super::data::{Batch, BOS, EOS, PAD};
use super::Seq2Seq;

/// One decoded sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Output ids up to and including `<eos>` (without it when `max_len` cut the sequence).
    pub tokens: Vec<usize>,
    /// The sum of the chosen tokens' log-probabilities.
    pub log_prob: f64,
    /// With greedy decoding and `keep_logits`: the logits of every step, `[steps][Vt]`.
    pub logits: Vec<Vec<f32>>,
}

impl Decoded {
    /// Fails, naming input `index`, unless the log-probability is finite: with logits that are
    /// not (activations that overflowed), the chosen tokens mean nothing, and no output is
    /// given rather than one scored NaN.
    fn check_finite(&self, index: usize) -> Result<()> {
        if self.log_prob.is_finite() {
            return Ok(());
        }
        Err(NnError::NonFinite {
            index,
            what: format!(
                "its log-probability is {}: the model's logits are not finite, so it has no output to give",
                self.log_prob
            ),
        })
    }
}

impl Seq2Seq {
    /// Logits `[B·T, Vt]` of a batch, teacher-forced, without dropout (inference).
    pub fn logits(&self, batch: &Batch, par: Par) -> Result<Vec<f32>> {
        let e = self.config.d_model();
        let src_x = self.embed(&self.src_embed, &batch.src, batch.s)?;
        let tgt_x = self.embed(&self.tgt_embed, &batch.tgt_in, batch.t)?;
        let masks = Self::masks(batch);
        let decoded = self.transformer.forward(
            Sequence::batch_first(&src_x, batch.b, batch.s, e),
            Sequence::batch_first(&tgt_x, batch.b, batch.t, e),
            &masks.src,
            &masks.tgt,
            &masks.memory,
            par,
        )?;
        self.generator.forward(&decoded, par)
    }

    /// The encoder's memory `[B, S, E]` of sources (padded, `<eos>` after each) and its
    /// lengths.
    fn encode(&self, sources: &[&str], par: Par) -> Result<(Vec<f32>, Batch)> {
        let pairs: Vec<(&str, &str)> = sources.iter().map(|s| (*s, "")).collect();
        let batch = self.batch(&pairs)?;
        let e = self.config.d_model();
        let src_x = self.embed(&self.src_embed, &batch.src, batch.s)?;
        let masks = Self::masks(&batch);
        let memory =
            self.transformer
                .encoder
                .forward(Sequence::batch_first(&src_x, batch.b, batch.s, e), &masks.src, par)?;
        Ok((memory, batch))
    }

    /// Greedy decoding of every source at once, one token per step through the KV caches, up
    /// to `max_len` output tokens (at most the position table's length). Each step takes the
    /// most probable id from `<eos>` on (never `<pad>` or `<bos>`; the first on ties); the
    /// reported log-probability is under the softmax over every id.
    pub fn greedy(&self, sources: &[&str], max_len: usize, keep_logits: bool, par: Par) -> Result<Vec<Decoded>> {
        let b = sources.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let e = self.config.d_model();
        let max_len = max_len.min(self.config.max_len);
        let (memory, batch) = self.encode(sources, par)?;
        let memory_seq = Sequence::batch_first(&memory, b, batch.s, e);
        let memory_masks = BlockMasks {
            key_padding: KeyPadding::Lengths(&batch.src_lengths),
            ..Default::default()
        };
        let mut cache = self.transformer.decoder.start_decoding(memory_seq, max_len, par)?;
        let mut out: Vec<Decoded> = vec![
            Decoded {
                tokens: Vec::new(),
                log_prob: 0.0,
                logits: Vec::new(),
            };
            b
        ];
        let mut current = vec![BOS; b];
        let vt = self.config.tgt_vocab.len();
        for step in 0..max_len {
            let logits = self.step_logits(&current, step, &mut cache, &memory_masks, par)?;
            let mut all_done = true;
            for (i, row) in logits.chunks_exact(vt).enumerate() {
                let done = out[i].tokens.last() == Some(&EOS);
                if done {
                    current[i] = PAD;
                    continue;
                }
                let (best, log_prob) = argmax_log_softmax(row);
                out[i].tokens.push(best);
                out[i].log_prob += log_prob;
                if keep_logits {
                    out[i].logits.push(row.to_vec());
                }
                current[i] = best;
                all_done &= best == EOS;
            }
            if all_done {
                break;
            }
        }
        for (i, decoded) in out.iter().enumerate() {
            decoded.check_finite(i)?;
        }
        Ok(out)
    }

    /// Logits `[B, Vt]` of the next position from the tokens `current` at `step`.
    fn step_logits(
        &self,
        current: &[usize],
        step: usize,
        cache: &mut crate::DecoderCache,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<Vec<f32>> {
        let e = self.config.d_model();
        let b = current.len();
        let scale = (e as f32).sqrt();
        let pe = &self.positions[step * e..][..e];
        let mut x = vec![0.0f32; b * e];
        for (row, &id) in x.chunks_exact_mut(e).zip(current) {
            // One row, widened alone from a table kept as bf16 bits.
            for ((v, &w), &p) in row.iter_mut().zip(self.tgt_embed.row(id).iter()).zip(pe) {
                *v = w * scale + p;
            }
        }
        let h = self
            .transformer
            .decoder
            .decode_step(Sequence::batch_first(&x, b, 1, e), cache, memory_masks, par)?;
        self.generator.forward(&h, par)
    }

    /// At most how many bytes decoding holds at once: [`Seq2Seq::greedy`] of `rows` sources, or
    /// [`Seq2Seq::beam`] of width `rows` (one source at a time), for sources of up to
    /// `source_len` characters and `max_len` output tokens (capped at the model's `max_len`, as
    /// decoding caps it). Per row it counts the encoder's output and a beam's copy of it, every
    /// decoder layer's key/value caches (self-attention over `max_len` positions,
    /// cross-attention over the source's) at 4 bytes a value, a step's logits and a beam's
    /// candidates (every id of every hypothesis), the logits greedy decoding keeps, and the
    /// tokens; then the encoder's activations. An upper bound for a memory cap (beyond the
    /// kernels' per-thread buffers, made on first use and kept), in `u128` so no width
    /// overflows it: the caches are allocated whole when decoding starts.
    pub fn decoding_bytes(&self, rows: usize, source_len: usize, max_len: usize) -> u128 {
        let c = &self.config;
        let layer = &c.transformer.layer;
        let (rows, e) = (rows as u128, layer.d_model as u128);
        let s = source_len as u128 + 1;
        let t = max_len.min(c.max_len) as u128;
        let (layers, vt) = (c.transformer.num_decoder_layers as u128, c.tgt_vocab.len() as u128);
        // f32 values: the memory and its copy, the caches, the kept logits; a candidate is
        // `(usize, usize, f64)`; two vectors of token ids.
        let values = 2 * s * e + layers * 2 * (t + s) * e + (t + 1) * vt;
        let per_row = 4 * values + 24 * vt + 16 * t;
        let encoder = layer.forward_bytes(usize::try_from(rows * s).unwrap_or(usize::MAX));
        rows.saturating_mul(per_row).saturating_add(encoder)
    }

    /// Beam search with `beam` hypotheses per source, scored by log-probability divided by
    /// length (length-normalised, `<eos>` counted); each source decoded on its own caches.
    ///
    /// Each step extends every live hypothesis by every id from `<eos>` on (never `<pad>` or
    /// `<bos>`) and keeps the `beam` most probable extensions that do not end in `<eos>` (ties
    /// to the earlier hypothesis, then the lower id); the extensions by `<eos>` ranked above
    /// the last one kept are finished. The search stops when no hypothesis is live, at
    /// `max_len` tokens, or once `beam` hypotheses have finished and the best of them scores at
    /// least as high as the best live one (a heuristic, as Hugging Face's default: a live
    /// hypothesis could still overtake it). The answer is the highest-scoring finished
    /// hypothesis, or of those cut at `max_len` tokens (the first of equal scores, finished
    /// before cut). With `beam` 1 this is [`Seq2Seq::greedy`].
    pub fn beam(&self, sources: &[&str], beam: usize, max_len: usize, par: Par) -> Result<Vec<Decoded>> {
        if beam == 0 {
            return Err(invalid("beam", 0, "at least 1"));
        }
        sources
            .iter()
            .enumerate()
            .map(|(i, source)| {
                let decoded = self.beam_one(source, beam, max_len, par)?;
                decoded.check_finite(i)?;
                Ok(decoded)
            })
            .collect()
    }

    fn beam_one(&self, source: &str, beam: usize, max_len: usize, par: Par) -> Result<Decoded> {
        let e = self.config.d_model();
        let max_len = max_len.min(self.config.max_len);
        let vt = self.config.tgt_vocab.len();
        let (memory, batch) = self.encode(&[source], par)?;
        // The memory repeated once per hypothesis.
        let memory: Vec<f32> = memory.iter().copied().cycle().take(memory.len() * beam).collect();
        let lengths = vec![batch.src_lengths[0]; beam];
        let memory_masks = BlockMasks {
            key_padding: KeyPadding::Lengths(&lengths),
            ..Default::default()
        };
        let memory_seq = Sequence::batch_first(&memory, beam, batch.s, e);
        // Hypotheses: tokens, log-probability, and the cache row each one reads.
        let mut cache = self.transformer.decoder.start_decoding(memory_seq, max_len, par)?;
        let mut live: Vec<(Vec<usize>, f64)> = vec![(Vec::new(), 0.0)];
        let mut finished: Vec<(Vec<usize>, f64)> = Vec::new();
        let score = |tokens: &[usize], lp: f64| lp / tokens.len().max(1) as f64;
        for step in 0..max_len {
            // Every cache row steps; rows past the live hypotheses repeat the first.
            let current: Vec<usize> = (0..beam)
                .map(|i| live.get(i).map_or(BOS, |(t, _)| t.last().copied().unwrap_or(BOS)))
                .collect();
            let logits = self.step_logits(&current, step, &mut cache, &memory_masks, par)?;
            let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
            for (i, (_, lp)) in live.iter().enumerate() {
                let row = &logits[i * vt..(i + 1) * vt];
                let log_softmax = LogSoftmax::of(row);
                for (id, &x) in row.iter().enumerate().skip(EOS) {
                    candidates.push((i, id, lp + log_softmax.at(x)));
                }
            }
            candidates.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
            let mut next: Vec<(Vec<usize>, f64)> = Vec::new();
            let mut parents = Vec::new();
            for (i, id, lp) in candidates {
                if next.len() == beam {
                    break;
                }
                let mut tokens = live[i].0.clone();
                tokens.push(id);
                if id == EOS {
                    finished.push((tokens, lp));
                } else {
                    next.push((tokens, lp));
                    parents.push(i);
                }
            }
            let best_finished = finished
                .iter()
                .map(|(t, lp)| score(t, *lp))
                .fold(f64::NEG_INFINITY, f64::max);
            let best_live = next
                .iter()
                .map(|(t, lp)| score(t, *lp))
                .fold(f64::NEG_INFINITY, f64::max);
            if next.is_empty() || (finished.len() >= beam && best_finished >= best_live) {
                // Every live hypothesis was extended this step: none of them is an answer.
                live.clear();
                break;
            }
            cache.reorder(&parents)?;
            live = next;
        }
        finished.extend(live);
        // The first of the highest scores (`max_by` would take the last).
        let (tokens, log_prob) = finished
            .into_iter()
            .rev()
            .max_by(|a, b| score(&a.0, a.1).total_cmp(&score(&b.0, b.1)))
            .expect("at least one hypothesis");
        Ok(Decoded {
            tokens,
            log_prob,
            logits: Vec::new(),
        })
    }

    /// The cross-attention of `target` (output text) over `source`: per decoder layer, the
    /// weights `[H, T, S]` with which each decoder position (`<bos>` then the target's
    /// characters, predicting the target's characters then `<eos>`) looked at each source
    /// position (the source's characters, then `<eos>`).
    pub fn cross_attention(&self, source: &str, target: &str, par: Par) -> Result<Vec<Vec<f32>>> {
        let e = self.config.d_model();
        let batch = self.batch(&[(source, target)])?;
        let src_x = self.embed(&self.src_embed, &batch.src, batch.s)?;
        let tgt_x = self.embed(&self.tgt_embed, &batch.tgt_in, batch.t)?;
        let masks = Self::masks(&batch);
        let memory = self
            .transformer
            .encoder
            .forward(Sequence::batch_first(&src_x, 1, batch.s, e), &masks.src, par)?;
        let (_, weights) = self.transformer.decoder.forward_with_cross_weights(
            Sequence::batch_first(&tgt_x, 1, batch.t, e),
            Sequence::batch_first(&memory, 1, batch.s, e),
            &masks.tgt,
            &masks.memory,
            par,
        )?;
        Ok(weights)
    }

    fn masks<'a>(batch: &'a Batch) -> TransformerMasks<'a> {
        TransformerMasks {
            src: BlockMasks {
                key_padding: KeyPadding::Lengths(&batch.src_lengths),
                ..Default::default()
            },
            tgt: BlockMasks {
                key_padding: KeyPadding::Lengths(&batch.tgt_lengths),
                is_causal: true,
                ..Default::default()
            },
            memory: BlockMasks {
                key_padding: KeyPadding::Lengths(&batch.src_lengths),
                ..Default::default()
            },
        }
    }
}

/// A row's log-softmax, `log p(x) = (x - max) - ln Σ exp(x_i - max)`: the difference to the
/// row's largest logit is taken first, so logits as large as 1e34, all equal, give
/// `-ln(len)` each, not 0 (`x - (max + ln Σ)` rounds the sum away there and called every
/// token certain).
struct LogSoftmax {
    max: f64,
    ln_sum: f64,
}

impl LogSoftmax {
    fn of(row: &[f32]) -> LogSoftmax {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let ln_sum = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        LogSoftmax { max, ln_sum }
    }

    /// The log-probability of logit `x` of the row.
    fn at(&self, x: f32) -> f64 {
        (x as f64 - self.max) - self.ln_sum
    }
}

/// The arg-max of a row of logits over the ids a decoder emits, `<eos>` and after (never
/// `<pad>` or `<bos>`; the first on ties), and its log-probability under the whole row.
fn argmax_log_softmax(row: &[f32]) -> (usize, f64) {
    let (best, &x) =
        row.iter().enumerate().skip(EOS).fold(
            (EOS, &f32::NEG_INFINITY),
            |acc, (i, x)| if *x > *acc.1 { (i, x) } else { acc },
        );
    (best, LogSoftmax::of(row).at(x))
}
