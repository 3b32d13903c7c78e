//! The sequence-to-sequence Transformer of "Attention Is All You Need" as PyTorch spells it
//! (docs/CLI.md, "Sequence-to-sequence models"): character vocabularies, embeddings
//! scaled by `sqrt(d_model)` plus the sinusoidal position table, `nn.Transformer(...,
//! batch_first=True)` and a `generator` to logits. State-dict names: `src_embed.weight`,
//! `tgt_embed.weight`, `transformer.*`, `generator.weight`, `generator.bias`.
//!
//! Training: [`Seq2Seq::packed_batch`] builds the batch once, without padding;
//! [`Seq2Seq::forward_train`] keeps what [`Seq2Seq::backward`] needs (the embeddings' input to
//! the Transformer, the Transformer's tape and output; the backward takes the batch again); the
//! loss is
//! `F.cross_entropy(logits, labels, ignore_index=<pad>, label_smoothing)`. Decoding:
//! [`Seq2Seq::greedy`] and [`Seq2Seq::beam`], incremental through the KV caches (self-attention
//! cached, cross-attention keys and values computed once).

use attn_core::kernels::rng::SplitMix64;
use attn_core::kernels::{self, arena};
use attn_core::{insert_prefixed, AttnError, Grads, ParamPath, ParamStore, Parameters, Precision, StateDict, Tensor};

use crate::layers::Linear;
use crate::optim::AdamW;
use crate::transformer::sub_module;
use crate::{NnError, Result, Transformer};

mod checkpoint;
mod data;
mod decode;
mod train;

pub use checkpoint::CHECKPOINT_METADATA_KEY;
pub use data::{Batch, Packed, Seq2SeqConfig, Vocab, BOS, EOS, MAX_POSITION_VALUES, PAD, SPECIALS, UNK};
pub use decode::Decoded;
pub use train::{Seq2SeqTape, StepLoss, TrainStep};

/// The model. Its parameters live in one [`ParamStore`], built when the model is built or
/// loaded: [`Seq2Seq::grads`] gives gradients of its layout and [`Seq2Seq::update`] runs the
/// optimizer over all of them in one flat pass.
///
/// ```
/// use attn_nn::prelude::*;
/// // The shipped date translator's format: `attn train` writes it, `attn translate --model` reads it.
/// let pairs = [("28 Nov 2026", "2026-11-28"), ("1 Jan 1999", "1999-01-01")];
/// let mut config = Seq2SeqConfig::for_pairs(&pairs);
/// config.transformer.layer.d_model = 16;
/// config.transformer.layer.nhead = 2;
/// let model = Seq2Seq::with_seed(config, 1).unwrap();
/// let out = model.greedy(&["28 Nov 2026"], 12, false, Par::Seq).unwrap(); // untrained: any text
/// assert!(out[0].tokens.len() <= 12);
/// let again = Seq2Seq::from_checkpoint(&model.to_checkpoint(&Default::default()).unwrap()).unwrap();
/// assert_eq!(again.state_dict(), model.state_dict());
/// ```
#[derive(Debug)]
pub struct Seq2Seq {
    store: ParamStore,
    /// Whether some weights are bf16 bits kept from a BF16 checkpoint
    /// ([`Seq2Seq::from_checkpoint_in`] in bf16): then there is no store, and no training.
    bits: bool,
    config: Seq2SeqConfig,
    src_embed: Tensor,
    tgt_embed: Tensor,
    transformer: Transformer,
    generator: Linear,
    /// `[max_len, E]`.
    positions: Vec<f32>,
}

impl Clone for Seq2Seq {
    /// A copy with a store of its own, in the same precision (adopting the store hands the
    /// weights out mutably, which drops packed copies, so the weights are packed again as
    /// [`Seq2Seq::set_precision`] packs them).
    fn clone(&self) -> Self {
        let copy = Seq2Seq {
            store: ParamStore::default(),
            bits: self.bits,
            config: self.config.clone(),
            src_embed: self.src_embed.clone(),
            tgt_embed: self.tgt_embed.clone(),
            transformer: self.transformer.clone(),
            generator: self.generator.clone(),
            positions: self.positions.clone(),
        };
        if self.bits {
            // The bits and their packed copies, shared: nothing to adopt.
            return copy;
        }
        let mut copy = copy.with_store();
        copy.set_precision(self.precision())
            .expect("the same weights packed again");
        copy
    }
}

impl Parameters for Seq2Seq {
    /// `src_embed.weight`, `tgt_embed.weight`, `transformer.*`, `generator.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        f(&path.join("src_embed.weight"), &mut self.src_embed);
        f(&path.join("tgt_embed.weight"), &mut self.tgt_embed);
        self.transformer.visit_params(&path.join("transformer."), f);
        self.generator.visit_params(&path.join("generator."), f);
    }

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        f(&path.join("src_embed.weight"), &mut self.src_embed);
        f(&path.join("tgt_embed.weight"), &mut self.tgt_embed);
        self.transformer.update_params(&path.join("transformer."), f)?;
        self.generator.update_params(&path.join("generator."), f)
    }
}

/// The sinusoidal table `PE[p, 2i] = sin(p / 10000^(2i/d))`, `PE[p, 2i+1] = cos(...)`, in f64.
pub fn sinusoidal_positions(max_len: usize, d: usize) -> Vec<f32> {
    let mut pe = vec![0.0f32; max_len * d];
    for p in 0..max_len {
        for i in (0..d).step_by(2) {
            let angle = p as f64 / 10_000f64.powf(i as f64 / d as f64);
            pe[p * d + i] = angle.sin() as f32;
            if i + 1 < d {
                pe[p * d + i + 1] = angle.cos() as f32;
            }
        }
    }
    pe
}

impl Seq2Seq {
    /// The precision of the linear maps (the generator's; [`Seq2Seq::set_precision`] sets all).
    pub fn precision(&self) -> Precision {
        self.generator.precision()
    }

    /// Sets the precision of the linear maps: every layer's projections and feed-forward
    /// blocks, and the generator ([`Precision`]); embeddings, norms and attention stay f32.
    /// Handing the weights out mutably ([`Parameters::visit_params`]) returns the model to f32;
    /// an update ([`Seq2Seq::update`], [`Parameters::update_params`]) keeps its precision.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.transformer.set_precision(precision)?;
        self.generator.set_precision(precision)
    }

    /// A model with fresh weights: Xavier-uniform matrices (as `nn.Transformer` resets its
    /// own), PyTorch's defaults for biases and norms, from `seed`.
    pub fn with_seed(config: Seq2SeqConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let e = config.transformer.layer.d_model;
        let mut dict = StateDict::new();
        let transformer = Transformer::with_seed(config.transformer.clone(), seed)?;
        insert_prefixed(&mut dict, "transformer.", transformer.state_dict());
        let (vs, vt) = (config.src_vocab.len(), config.tgt_vocab.len());
        dict.insert("src_embed.weight".into(), Tensor::zeros(vec![vs, e]));
        dict.insert("tgt_embed.weight".into(), Tensor::zeros(vec![vt, e]));
        dict.insert("generator.weight".into(), Tensor::zeros(vec![vt, e]));
        dict.insert("generator.bias".into(), Tensor::zeros(vec![vt]));
        let mut model = Self::from_state_dict(config, dict)?;
        let mut rng = SplitMix64::new(seed);
        for (_, tensor) in model.params_mut("") {
            if let [rows, cols] = *tensor.shape() {
                let bound = (6.0 / (rows + cols) as f32).sqrt();
                tensor
                    .data_mut()
                    .iter_mut()
                    .for_each(|x| *x = rng.next_signed() * bound);
            }
        }
        Ok(model)
    }

    /// The model from its tensors (every one used, none missing).
    pub fn from_state_dict(config: Seq2SeqConfig, dict: StateDict) -> Result<Self> {
        Ok(Self::from_parts(config, dict)?.with_store())
    }

    /// The model of [`Seq2Seq::from_state_dict`] before its parameters move to a store.
    fn from_parts(config: Seq2SeqConfig, mut dict: StateDict) -> Result<Self> {
        config.validate()?;
        let e = config.d_model();
        let (vs, vt) = (config.src_vocab.len(), config.tgt_vocab.len());
        let src_embed = attn_core::take(&mut dict, "src_embed.weight", &[vs, e])?;
        let tgt_embed = attn_core::take(&mut dict, "tgt_embed.weight", &[vt, e])?;
        let generator = Linear::load(&mut dict, "generator.", e, vt, true)?;
        let transformer = sub_module(&mut dict, "transformer.", |d| {
            Transformer::from_state_dict(config.transformer.clone(), std::mem::take(d))
        })?;
        if let Some(name) = dict.keys().next() {
            return Err(AttnError::UnexpectedTensor {
                name: name.clone(),
                known: "src_embed.*, tgt_embed.*, transformer.*, generator.*".into(),
            }
            .into());
        }
        let positions = sinusoidal_positions(config.max_len, e);
        Ok(Seq2Seq {
            store: ParamStore::default(),
            bits: false,
            config,
            src_embed,
            tgt_embed,
            transformer,
            generator,
            positions,
        })
    }

    /// The model with its parameters moved into a store of their own.
    fn with_store(mut self) -> Self {
        self.store = ParamStore::adopt(&mut self);
        self
    }

    /// The store holding the parameters.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Zeroed gradients in the layout of the model's store.
    pub fn grads(&self) -> Grads {
        Grads::for_store(&self.store)
    }

    /// Whether some weights are bf16 bits ([`Seq2Seq::from_checkpoint_in`] of a BF16
    /// checkpoint in bf16): such a model computes, but does not train.
    pub fn holds_bf16_bits(&self) -> bool {
        self.bits
    }

    /// An error unless the model can train (f32 weights in a store).
    pub(crate) fn check_trainable(&self) -> Result<()> {
        if self.bits {
            return Err(NnError::NotTrainable {
                what: "the model's weights are bf16 bits, read from a BF16 checkpoint in bf16; training \
                       updates f32 weights: read the checkpoint in f32 (`Seq2Seq::from_checkpoint`) to \
                       train it"
                    .into(),
            });
        }
        Ok(())
    }

    /// One optimizer step over every parameter at learning rate `lr`, from gradients made by
    /// [`Seq2Seq::grads`] (others are an error): in f32 one pass over the flat buffers
    /// ([`AdamW::update`]). The f32 weights are the master copy: a model in bf16
    /// (mixed-precision training) steps tensor by tensor ([`AdamW::update_each`]), each linear
    /// map packing its bf16 copies (for the forward, and for the backward once it has run)
    /// again right after its weight's update, while the new values are in cache; the bits of
    /// a whole-buffer pass followed by [`Seq2Seq::set_precision`].
    pub fn update(&mut self, adam: &mut AdamW, grads: &Grads, lr: f32) -> Result<()> {
        self.check_trainable()?;
        let store = self.store.clone();
        match self.precision() {
            Precision::F32 => adam.update(&store, self, grads, lr),
            Precision::Bf16 => adam.update_each(&store, self, grads, lr),
        }
    }

    /// The tensors under their names.
    pub fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        dict.insert("src_embed.weight".into(), self.src_embed.clone());
        dict.insert("tgt_embed.weight".into(), self.tgt_embed.clone());
        insert_prefixed(&mut dict, "transformer.", self.transformer.state_dict());
        self.generator.save(&mut dict, "generator.");
        dict
    }

    /// The configuration.
    pub fn config(&self) -> &Seq2SeqConfig {
        &self.config
    }

    /// `E[id]·sqrt(d) + PE[position]` for `[B, L]` ids.
    fn embed(&self, table: &Tensor, ids: &[usize], len: usize) -> Result<Vec<f32>> {
        let positions: Vec<usize> = (0..ids.len()).map(|r| r % len).collect();
        self.embed_at(table, ids, &positions)
    }

    /// `E[ids[r]]·sqrt(d) + PE[positions[r]]`.
    fn embed_at(&self, table: &Tensor, ids: &[usize], positions: &[usize]) -> Result<Vec<f32>> {
        let e = self.config.d_model();
        let mut x = arena::zeroed(ids.len() * e);
        if table.is_bf16() {
            // A table kept as bits: each row widened as it is looked up.
            let rows = table.shape()[0];
            for (out, &id) in x.chunks_exact_mut(e).zip(ids) {
                if id >= rows {
                    // `kernels::embedding`'s error.
                    return Err(AttnError::from(kernels::KernelError::InvalidArgument {
                        op: "embedding",
                        what: "a token id",
                        got: id.to_string(),
                        expected: "below the table's row count",
                    })
                    .into());
                }
                out.copy_from_slice(&table.row(id));
            }
        } else {
            kernels::embedding(&mut x, table.data(), ids, e).map_err(AttnError::from)?;
        }
        let scale = (e as f32).sqrt();
        for (row, &p) in x.chunks_exact_mut(e).zip(positions) {
            let pe = &self.positions[p * e..][..e];
            row.iter_mut().zip(pe).for_each(|(v, &p)| *v = *v * scale + p);
        }
        Ok(x)
    }

    /// The table (`src_embed.` or `tgt_embed.`) of an embedding, by its place.
    fn table(&self, place: &str) -> &Tensor {
        if place == "src_embed." {
            &self.src_embed
        } else {
            &self.tgt_embed
        }
    }

    /// Bytes of weights held: every tensor (4 bytes per f32 value, 2 per bf16 value kept from a
    /// BF16 checkpoint, [`Seq2Seq::from_checkpoint_in`]) and, in bf16, the packed copies of the
    /// linear maps.
    pub fn bytes_held(&self) -> usize {
        self.src_embed.bytes_held()
            + self.tgt_embed.bytes_held()
            + self.transformer.bytes_held()
            + self.generator.bytes_held()
    }

    /// Parameters (scalars) in the model.
    pub fn parameter_count(&self) -> usize {
        self.state_dict().values().map(Tensor::len).sum()
    }
}
