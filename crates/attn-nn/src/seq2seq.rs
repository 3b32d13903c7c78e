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

use std::collections::HashMap;

use attn_core::kernels::rng::SplitMix64;
use attn_core::kernels::{self, arena, Par};
use attn_core::{
    insert_prefixed, AttnError, Grads, KeyPadding, Packing, ParamPath, ParamStore, Parameters, Sequence, StateDict,
    Tensor,
};
use serde_json::{Map, Value};

use crate::error::invalid;
use crate::layers::Linear;
use crate::optim::AdamW;
use crate::step::Step;
use crate::transformer::{sub_module, TransformerTape};
use crate::{
    BlockMasks, DecoderLayer, EncoderLayer, NnError, Result, Transformer, TransformerConfig, TransformerMasks,
};

/// `<pad>`: padding, ignored by the loss.
pub const PAD: usize = 0;
/// `<bos>`: the decoder's first input.
pub const BOS: usize = 1;
/// `<eos>`: the end of a sequence.
pub const EOS: usize = 2;
/// `<unk>`: a character the vocabulary lacks.
pub const UNK: usize = 3;
/// The special tokens, ids 0–3.
pub const SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<unk>"];

/// A character vocabulary: the four specials, then one character per entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    tokens: Vec<String>,
    index: HashMap<char, usize>,
}

impl Vocab {
    /// A vocabulary from its entries (as the checkpoint lists them): ids 0–3 must be the
    /// specials, every other entry one character, none twice.
    pub fn from_tokens(tokens: Vec<String>, which: &str) -> Result<Self> {
        if tokens.len() < 4 || tokens[..4] != SPECIALS {
            return Err(invalid(
                which,
                format!("{:?}", &tokens[..tokens.len().min(4)]),
                "a list starting with \"<pad>\", \"<bos>\", \"<eos>\", \"<unk>\"",
            ));
        }
        let mut index = HashMap::new();
        for (id, token) in tokens.iter().enumerate().skip(4) {
            let mut chars = token.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return Err(invalid(
                    which,
                    format!("entry {id} = {token:?}"),
                    "one character per entry",
                ));
            };
            if index.insert(c, id).is_some() {
                return Err(invalid(which, format!("{token:?} twice"), "each character once"));
            }
        }
        Ok(Vocab { tokens, index })
    }

    /// The vocabulary of `texts`: the specials, then their characters sorted by code point.
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut chars: Vec<char> = texts.into_iter().flat_map(str::chars).collect();
        chars.sort_unstable();
        chars.dedup();
        let tokens = SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(chars.iter().map(|c| c.to_string()))
            .collect();
        Vocab::from_tokens(tokens, "vocab").expect("specials, then distinct characters")
    }

    /// The entries, by id.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Never true: the specials are always there.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The ids of `text`'s characters (unknown ones are `<unk>`), without `<eos>`.
    pub fn encode(&self, text: &str) -> Vec<usize> {
        text.chars()
            .map(|c| self.index.get(&c).copied().unwrap_or(UNK))
            .collect()
    }

    /// The text of `ids`, up to the first `<eos>`; other specials are skipped.
    pub fn decode(&self, ids: &[usize]) -> String {
        ids.iter()
            .take_while(|&&id| id != EOS)
            .filter(|&&id| id > UNK && id < self.tokens.len())
            .map(|&id| self.tokens[id].as_str())
            .collect()
    }
}

/// The model's configuration: `nn.Transformer`'s constructor fields, `max_len` and the
/// vocabularies: the checkpoint's `attn.seq2seq` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqConfig {
    /// The Transformer's fields; `batch_first` must be true.
    pub transformer: TransformerConfig,
    /// The longest sequence (in tokens, `<eos>` or `<bos>` included) the position table covers.
    pub max_len: usize,
    /// Source characters.
    pub src_vocab: Vocab,
    /// Target characters.
    pub tgt_vocab: Vocab,
}

impl Seq2SeqConfig {
    /// The metadata JSON object.
    pub fn to_json(&self) -> String {
        let mut map = match serde_json::to_value(&self.transformer).expect("serialisable") {
            Value::Object(map) => map,
            _ => unreachable!("a struct serialises to an object"),
        };
        map.insert("max_len".into(), self.max_len.into());
        map.insert("src_vocab".into(), self.src_vocab.tokens.clone().into());
        map.insert("tgt_vocab".into(), self.tgt_vocab.tokens.clone().into());
        Value::Object(map).to_string()
    }

    /// Parses the metadata JSON object, naming the field at fault.
    pub fn from_json(json: &str) -> Result<Self> {
        let mut map: Map<String, Value> =
            serde_json::from_str(json).map_err(|e| invalid("attn.seq2seq", e, "a JSON object"))?;
        let mut take = |name: &str| map.remove(name).ok_or_else(|| invalid(name, "missing", "present"));
        let max_len = take("max_len")?
            .as_u64()
            .filter(|&n| n >= 2)
            .ok_or_else(|| invalid("max_len", "not an integer of at least 2", "an integer of at least 2"))?
            as usize;
        let mut vocab = |name: &str| -> Result<Vocab> {
            let list: Vec<String> =
                serde_json::from_value(take(name)?).map_err(|e| invalid(name, e, "a list of strings"))?;
            Vocab::from_tokens(list, name)
        };
        let (src_vocab, tgt_vocab) = (vocab("src_vocab")?, vocab("tgt_vocab")?);
        // The model is batch-first by definition, so a checkpoint may leave the field out;
        // a `false` that is present stays an error (`validate`).
        map.entry("batch_first").or_insert(Value::Bool(true));
        let transformer: TransformerConfig = serde_json::from_value(Value::Object(map))
            .map_err(|e| invalid("attn.seq2seq", e, "nn.Transformer's fields"))?;
        let config = Seq2SeqConfig {
            transformer,
            max_len,
            src_vocab,
            tgt_vocab,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the fields' domains.
    pub fn validate(&self) -> Result<()> {
        self.transformer.layer.validate()?;
        if !self.transformer.layer.batch_first {
            return Err(invalid(
                "batch_first",
                false,
                "true (the sequence-to-sequence model is batch-first)",
            ));
        }
        if self.max_len < 2 {
            return Err(invalid("max_len", self.max_len, "at least 2"));
        }
        Ok(())
    }

    fn d_model(&self) -> usize {
        self.transformer.layer.d_model
    }
}

/// A batch of pairs as the model reads it: source ids + `<eos>`, decoder input `<bos>` + target
/// ids, labels target ids + `<eos>`, each padded with `<pad>` to the batch's longest.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Sequences.
    pub b: usize,
    /// Source positions per sequence (the longest source + 1).
    pub s: usize,
    /// Target positions per sequence (the longest target + 1).
    pub t: usize,
    /// `[B, S]`.
    pub src: Vec<usize>,
    /// Real source positions of each sequence.
    pub src_lengths: Vec<usize>,
    /// `[B, T]`: the decoder's input.
    pub tgt_in: Vec<usize>,
    /// Real target positions of each sequence.
    pub tgt_lengths: Vec<usize>,
    /// `[B, T]`: what each decoder position must predict (`<pad>` = ignored).
    pub labels: Vec<i64>,
}

impl Batch {
    /// Target tokens that count in the loss.
    pub fn target_tokens(&self) -> usize {
        self.tgt_lengths.iter().sum()
    }

    /// The batch without padding: every sequence's real positions back to back.
    pub fn packed(&self) -> Packed {
        let pack = |ids: &[usize], len: usize, lengths: &[usize]| {
            let mut out = Vec::new();
            let mut positions = Vec::new();
            let mut starts = vec![0];
            for (i, &l) in lengths.iter().enumerate() {
                out.extend_from_slice(&ids[i * len..i * len + l]);
                positions.extend(0..l);
                starts.push(out.len());
            }
            (out, positions, starts)
        };
        let (src, src_positions, src_starts) = pack(&self.src, self.s, &self.src_lengths);
        let (tgt_in, tgt_positions, tgt_starts) = pack(&self.tgt_in, self.t, &self.tgt_lengths);
        let labels = self
            .tgt_lengths
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| self.labels[i * self.t..i * self.t + l].iter().copied())
            .collect();
        Packed {
            src,
            src_positions,
            src_starts,
            tgt_in,
            tgt_positions,
            tgt_starts,
            labels,
        }
    }
}

/// A [`Batch`] without padding: the real positions of every sequence back to back, as the
/// training forward runs it (the cost follows the real tokens).
#[derive(Debug, Clone)]
pub struct Packed {
    /// Source ids, `[Ns]`.
    pub src: Vec<usize>,
    /// Each source id's position in its sequence.
    pub src_positions: Vec<usize>,
    /// Sequence `i` is rows `src_starts[i]..src_starts[i + 1]`.
    pub src_starts: Vec<usize>,
    /// Decoder input ids, `[Nt]`.
    pub tgt_in: Vec<usize>,
    /// Each decoder input's position in its sequence.
    pub tgt_positions: Vec<usize>,
    /// Sequence `i` is rows `tgt_starts[i]..tgt_starts[i + 1]`.
    pub tgt_starts: Vec<usize>,
    /// `[Nt]`: what each decoder position must predict.
    pub labels: Vec<i64>,
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

impl Packed {
    /// Target tokens that count in the loss.
    pub fn target_tokens(&self) -> usize {
        self.labels.len()
    }
}

/// One sequence's token ids.
type Ids = Vec<usize>;

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

/// The model. Its parameters live in one [`ParamStore`], built when the model is built or
/// loaded: [`Seq2Seq::grads`] gives gradients of its layout and [`Seq2Seq::update`] runs the
/// optimizer over all of them in one flat pass.
#[derive(Debug)]
pub struct Seq2Seq {
    store: ParamStore,
    config: Seq2SeqConfig,
    src_embed: Tensor,
    tgt_embed: Tensor,
    transformer: Transformer,
    generator: Linear,
    /// `[max_len, E]`.
    positions: Vec<f32>,
}

impl Clone for Seq2Seq {
    /// A copy with a store of its own.
    fn clone(&self) -> Self {
        Seq2Seq {
            store: ParamStore::default(),
            config: self.config.clone(),
            src_embed: self.src_embed.clone(),
            tgt_embed: self.tgt_embed.clone(),
            transformer: self.transformer.clone(),
            generator: self.generator.clone(),
            positions: self.positions.clone(),
        }
        .with_store()
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
    /// A model with fresh weights: Xavier-uniform matrices (as `nn.Transformer` resets its
    /// own), PyTorch's defaults for biases and norms, from `seed`.
    pub fn with_seed(config: Seq2SeqConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let TransformerConfig {
            layer,
            num_encoder_layers,
            num_decoder_layers,
        } = &config.transformer;
        let e = layer.d_model;
        let mut dict = StateDict::new();
        for i in 0..*num_encoder_layers {
            let l = EncoderLayer::with_seed(layer.clone(), seed.wrapping_add(10 + i as u64))?;
            insert_prefixed(&mut dict, &format!("transformer.encoder.layers.{i}."), l.state_dict());
        }
        for i in 0..*num_decoder_layers {
            let l = DecoderLayer::with_seed(layer.clone(), seed.wrapping_add(100 + i as u64))?;
            insert_prefixed(&mut dict, &format!("transformer.decoder.layers.{i}."), l.state_dict());
        }
        for stack in ["encoder", "decoder"] {
            dict.insert(
                format!("transformer.{stack}.norm.weight"),
                Tensor::new("w", vec![e], vec![1.0; e])?,
            );
            if layer.bias {
                dict.insert(format!("transformer.{stack}.norm.bias"), Tensor::zeros(vec![e]));
            }
        }
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
    pub fn from_state_dict(config: Seq2SeqConfig, mut dict: StateDict) -> Result<Self> {
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
            config,
            src_embed,
            tgt_embed,
            transformer,
            generator,
            positions,
        }
        .with_store())
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

    /// One optimizer step over every parameter at learning rate `lr`, from gradients made by
    /// [`Seq2Seq::grads`] (others are an error): one pass over the flat buffers.
    pub fn update(&mut self, adam: &mut AdamW, grads: &Grads, lr: f32) -> Result<()> {
        let store = self.store.clone();
        adam.update(&store, self, grads, lr)
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

    /// The batch of `pairs` (source, target); a pair longer than `max_len` tokens (with its
    /// `<eos>`) is an error naming it.
    pub fn batch(&self, pairs: &[(&str, &str)]) -> Result<Batch> {
        let (src, tgt) = self.encode_pairs(pairs)?;
        let b = pairs.len();
        let s = src.iter().map(|x| x.len() + 1).max().unwrap_or(1);
        let t = tgt.iter().map(|x| x.len() + 1).max().unwrap_or(1);
        let mut batch = Batch {
            b,
            s,
            t,
            src: vec![PAD; b * s],
            src_lengths: Vec::with_capacity(b),
            tgt_in: vec![PAD; b * t],
            tgt_lengths: Vec::with_capacity(b),
            labels: vec![PAD as i64; b * t],
        };
        for (i, (x, y)) in src.iter().zip(&tgt).enumerate() {
            batch.src[i * s..i * s + x.len()].copy_from_slice(x);
            batch.src[i * s + x.len()] = EOS;
            batch.src_lengths.push(x.len() + 1);
            batch.tgt_in[i * t] = BOS;
            batch.tgt_in[i * t + 1..i * t + 1 + y.len()].copy_from_slice(y);
            for (j, &id) in y.iter().enumerate() {
                batch.labels[i * t + j] = id as i64;
            }
            batch.labels[i * t + y.len()] = EOS as i64;
            batch.tgt_lengths.push(y.len() + 1);
        }
        Ok(batch)
    }

    /// The ids of `pairs`' sources and targets; a pair longer than `max_len` tokens (with its
    /// `<eos>`) is an error naming it.
    fn encode_pairs(&self, pairs: &[(&str, &str)]) -> Result<(Vec<Ids>, Vec<Ids>)> {
        let src: Vec<Vec<usize>> = pairs.iter().map(|(s, _)| self.config.src_vocab.encode(s)).collect();
        let tgt: Vec<Vec<usize>> = pairs.iter().map(|(_, t)| self.config.tgt_vocab.encode(t)).collect();
        for (i, (s, t)) in src.iter().zip(&tgt).enumerate() {
            let longest = s.len().max(t.len()) + 1;
            if longest > self.config.max_len {
                return Err(invalid(
                    "max_len",
                    self.config.max_len,
                    format!("at least {longest} for pair {i} ({:?})", pairs[i]),
                ));
            }
        }
        Ok((src, tgt))
    }

    /// The training batch of `pairs`, without padding ([`Packed`]): built once from the pairs,
    /// read by [`forward_train`](Self::forward_train), [`loss`](Self::loss) and
    /// [`backward`](Self::backward). The same as [`Seq2Seq::batch`] then [`Batch::packed`].
    pub fn packed_batch(&self, pairs: &[(&str, &str)]) -> Result<Packed> {
        let (src, tgt) = self.encode_pairs(pairs)?;
        let mut p = Packed {
            src: Vec::new(),
            src_positions: Vec::new(),
            src_starts: vec![0],
            tgt_in: Vec::new(),
            tgt_positions: Vec::new(),
            tgt_starts: vec![0],
            labels: Vec::new(),
        };
        for (x, y) in src.iter().zip(&tgt) {
            p.src.extend(x.iter().copied().chain([EOS]));
            p.src_positions.extend(0..x.len() + 1);
            p.src_starts.push(p.src.len());
            p.tgt_in.extend([BOS].into_iter().chain(y.iter().copied()));
            p.tgt_positions.extend(0..y.len() + 1);
            p.tgt_starts.push(p.tgt_in.len());
            p.labels.extend(y.iter().map(|&id| id as i64).chain([EOS as i64]));
        }
        Ok(p)
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
        kernels::embedding(&mut x, table.data(), ids, e).map_err(AttnError::from)?;
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
        self.cross_entropy(&packed.labels, logits, label_smoothing, par)
    }

    /// The same for the padded logits `[B·T, Vt]` of [`logits`](Self::logits) and their batch.
    pub fn padded_loss(
        &self,
        batch: &Batch,
        logits: &[f32],
        label_smoothing: f32,
        par: Par,
    ) -> Result<(f64, Vec<f32>)> {
        self.cross_entropy(&batch.labels, logits, label_smoothing, par)
    }

    fn cross_entropy(&self, labels: &[i64], logits: &[f32], label_smoothing: f32, par: Par) -> Result<(f64, Vec<f32>)> {
        let v = self.config.tgt_vocab.len();
        if logits.len() != labels.len() * v {
            return Err(NnError::ShapeMismatch {
                op: "Seq2Seq::loss",
                tensor: "logits".into(),
                expected: format!("[{}, {v}]: a row per label of the batch", labels.len()),
                got: vec![logits.len()],
            });
        }
        let mut d_logits = arena::zeroed(logits.len());
        let ce = kernels::cross_entropy(&mut d_logits, logits, labels, PAD as i64, label_smoothing, par)
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
        let mut d_decoded = arena::zeroed(tape.decoded.len());
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
    /// to `max_len` output tokens (at most the position table's length).
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
        let table = self.tgt_embed.data();
        let scale = (e as f32).sqrt();
        let pe = &self.positions[step * e..][..e];
        let mut x = vec![0.0f32; b * e];
        for (row, &id) in x.chunks_exact_mut(e).zip(current) {
            for ((v, &w), &p) in row.iter_mut().zip(&table[id * e..][..e]).zip(pe) {
                *v = w * scale + p;
            }
        }
        let h = self
            .transformer
            .decoder
            .decode_step(Sequence::batch_first(&x, b, 1, e), cache, memory_masks, par)?;
        self.generator.forward(&h, par)
    }

    /// Beam search with `beam` hypotheses per source, scored by log-probability divided by
    /// length (length-normalised); each source decoded on its own caches.
    pub fn beam(&self, sources: &[&str], beam: usize, max_len: usize, par: Par) -> Result<Vec<Decoded>> {
        if beam == 0 {
            return Err(invalid("beam", 0, "at least 1"));
        }
        sources
            .iter()
            .map(|source| self.beam_one(source, beam, max_len, par))
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
                let log_z = log_sum_exp(row);
                for (id, &x) in row.iter().enumerate().skip(EOS) {
                    candidates.push((i, id, lp + (x as f64 - log_z)));
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
                break;
            }
            cache.reorder(&parents)?;
            live = next;
        }
        finished.extend(live);
        let (tokens, log_prob) = finished
            .into_iter()
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

    /// Parameters (scalars) in the model.
    pub fn parameter_count(&self) -> usize {
        self.state_dict().values().map(|t| t.data().len()).sum()
    }
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// The arg-max of a row of logits (the first on ties) and its log-probability.
fn argmax_log_softmax(row: &[f32]) -> (usize, f64) {
    let (best, &x) = row.iter().enumerate().fold(
        (0, &f32::NEG_INFINITY),
        |acc, (i, x)| if *x > *acc.1 { (i, x) } else { acc },
    );
    (best, x as f64 - log_sum_exp(row))
}
