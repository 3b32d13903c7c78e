//! The model's data: vocabularies, its configuration (the `attn.seq2seq` metadata), and batches of
//! pairs, padded and packed.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::invalid;
use crate::{Result, TransformerConfig};

use super::Seq2Seq;

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

/// The most values of a model's position table (`max_len × d_model`, 1 GiB of f32):
/// [`Seq2SeqConfig::validate`] refuses a longer `max_len`.
pub const MAX_POSITION_VALUES: usize = 1 << 28;

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
    /// The configuration `attn train` gives `pairs` without model flags: d_model 128, 4 heads,
    /// 2 + 2 layers, feed-forward 512, dropout 0.1, ReLU, post-norm, batch-first; vocabularies
    /// of the pairs' characters; `max_len` twice the longest text plus 2, at least 32. Change
    /// fields before [`Seq2Seq::with_seed`].
    pub fn for_pairs(pairs: &[(&str, &str)]) -> Self {
        let mut layer = crate::LayerConfig::new(128, 4);
        layer.dim_feedforward = 512;
        let longest = pairs
            .iter()
            .map(|(s, t)| s.chars().count().max(t.chars().count()))
            .max()
            .unwrap_or(0);
        Seq2SeqConfig {
            transformer: TransformerConfig {
                layer,
                num_encoder_layers: 2,
                num_decoder_layers: 2,
            },
            // Room for inputs twice the longest seen (the sinusoids cost nothing).
            max_len: (2 * longest + 2).max(32),
            src_vocab: Vocab::from_texts(pairs.iter().map(|(s, _)| *s)),
            tgt_vocab: Vocab::from_texts(pairs.iter().map(|(_, t)| *t)),
        }
    }

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
        // The position table is made from the configuration alone (`max_len × d_model` f32
        // values), not read from the checkpoint: a `max_len` no file backs must not allocate
        // past what the machine has.
        let most = MAX_POSITION_VALUES / self.d_model().max(1);
        if self.max_len > most {
            return Err(invalid(
                "max_len",
                self.max_len,
                format!(
                    "at most {most} at d_model {} (the position table holds max_len × d_model values, at most 2^28)",
                    self.d_model()
                ),
            ));
        }
        Ok(())
    }

    /// The model's parameters, counted from the configuration alone (what
    /// [`Seq2Seq::parameter_count`] gives once the model exists), in `u128` so no width
    /// overflows it: the embeddings, `nn.Transformer`'s layers and final norms, the generator.
    pub fn parameter_count(&self) -> u128 {
        let l = &self.transformer.layer;
        let (e, ff, bias) = (l.d_model as u128, l.dim_feedforward as u128, u128::from(l.bias));
        // Every width is below 2^64, but a product of two may pass u128: saturate.
        let sum = |terms: &[u128]| terms.iter().fold(0u128, |a, &b| a.saturating_add(b));
        let mul = |a: u128, b: u128| a.saturating_mul(b);
        let attention = sum(&[mul(4 * e, e), 4 * e * bias]);
        let feed_forward = sum(&[mul(2 * e, ff), (ff + e) * bias]);
        let norm = e + e * bias;
        let encoder = sum(&[attention, feed_forward, 2 * norm]);
        let decoder = sum(&[mul(2, attention), feed_forward, 3 * norm]);
        let (vs, vt) = (self.src_vocab.len() as u128, self.tgt_vocab.len() as u128);
        sum(&[
            mul(vs + 2 * vt, e),
            vt,
            mul(self.transformer.num_encoder_layers as u128, encoder),
            mul(self.transformer.num_decoder_layers as u128, decoder),
            2 * norm,
        ])
    }

    /// At most how many bytes training holds on micro-batches of up to `tokens` tokens (source
    /// and target positions, `<eos>` and `<bos>` included), for a memory cap checked before the
    /// model exists: 24 bytes a parameter (the f32 weights, their gradients, AdamW's two
    /// moments, bf16 copies for mixed precision), and per token 4 bytes times `12·d_model +
    /// 2·dim_feedforward` a layer and 3 target vocabularies (the activations a layer's backward
    /// keeps and its temporaries, the logits and their gradient). Measured against an
    /// allocator's peak, beyond the kernels' per-thread buffers (`tests/training_memory.rs`).
    pub fn training_bytes(&self, tokens: usize) -> u128 {
        let l = &self.transformer.layer;
        let layers = self.transformer.num_encoder_layers as u128 + self.transformer.num_decoder_layers as u128;
        let width = 12 * l.d_model as u128 + 2 * l.dim_feedforward as u128;
        let per_token = layers
            .saturating_mul(width)
            .saturating_add(3 * self.tgt_vocab.len() as u128);
        let activations = (4 * tokens as u128).saturating_mul(per_token);
        self.parameter_count().saturating_mul(24).saturating_add(activations)
    }

    pub(super) fn d_model(&self) -> usize {
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

impl Packed {
    /// Target tokens that count in the loss.
    pub fn target_tokens(&self) -> usize {
        self.labels.len()
    }
}

/// One sequence's token ids.
type Ids = Vec<usize>;
impl Seq2Seq {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(tokens: &[&str]) -> Vec<String> {
        tokens.iter().map(|t| t.to_string()).collect()
    }

    /// The specials first, whatever the length: fewer than four entries or the wrong four are
    /// errors (never a panic), the four alone are a vocabulary without characters.
    #[test]
    fn vocabularies_start_with_the_specials() {
        let message = |tokens: &[&str]| Vocab::from_tokens(strings(tokens), "vocab").unwrap_err().to_string();
        assert!(message(&["<pad>", "<bos>"]).contains("<pad>"));
        let err = message(&["<pad>", "<bos>", "<unk>", "<eos>", "a"]);
        assert!(err.contains("vocab") && err.contains("\"<eos>\", \"<unk>\""), "{err}");
        assert!(message(&["<pad>", "<bos>", "<eos>", "<unk>", "ab"]).contains("one character"));
        assert!(message(&["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"]).contains("twice"));
        let bare = Vocab::from_tokens(strings(&SPECIALS), "vocab").unwrap();
        assert_eq!((bare.len(), bare.is_empty()), (4, false));
        assert_eq!(bare.encode("x"), vec![UNK]);
        let vocab = Vocab::from_texts(["ba", "c"]);
        assert_eq!(vocab.tokens()[4..], strings(&["a", "b", "c"]));
        assert!(!vocab.is_empty());
    }

    /// `decode` stops at the first `<eos>` and skips the other specials and ids past the
    /// vocabulary.
    #[test]
    fn decode_skips_specials_and_unknown_ids() {
        let vocab = Vocab::from_texts(["abc"]);
        let (a, b, c) = (4, 5, 6);
        assert_eq!(vocab.encode("cab?"), vec![c, a, b, UNK]);
        let ids = [BOS, a, PAD, b, UNK, vocab.len(), vocab.len() + 7, c, EOS, a];
        assert_eq!(vocab.decode(&ids), "abc");
        assert_eq!(vocab.decode(&[EOS, a]), "");
    }

    /// A pair fits when its longer side with `<eos>` is at most `max_len` tokens; one token
    /// more is an error naming the pair, in the padded and the packed batch alike.
    #[test]
    fn pairs_longer_than_the_position_table_are_refused() {
        let mut config = Seq2SeqConfig::for_pairs(&[("abcdef", "abcdef")]);
        config.transformer.layer = crate::LayerConfig::new(8, 2);
        config.max_len = 5;
        let model = Seq2Seq::with_seed(config, 1).unwrap();
        for pairs in [[("abcd", "a")], [("a", "abcd")]] {
            let batch = model.batch(&pairs).unwrap();
            assert_eq!(batch.s.max(batch.t), 5);
            assert_eq!(
                model.packed_batch(&pairs).unwrap().target_tokens(),
                pairs[0].1.len() + 1
            );
        }
        for pairs in [[("abcde", "a")], [("a", "abcde")]] {
            for err in [
                model.batch(&pairs).unwrap_err(),
                model.packed_batch(&pairs).unwrap_err(),
            ] {
                let err = err.to_string();
                assert!(
                    err.contains("max_len") && err.contains("at least 6 for pair 0"),
                    "{err}"
                );
            }
        }
    }

    /// `for_pairs`' position table: twice the longest text plus 2, at least 32; `validate`
    /// takes a `max_len` of 2 and refuses 1 and 0.
    #[test]
    fn position_tables_cover_twice_the_longest_text() {
        let long = "x".repeat(40);
        assert_eq!(Seq2SeqConfig::for_pairs(&[("ab", long.as_str())]).max_len, 82);
        assert_eq!(Seq2SeqConfig::for_pairs(&[(long.as_str(), "a")]).max_len, 82);
        assert_eq!(Seq2SeqConfig::for_pairs(&[("ab", "c")]).max_len, 32);
        assert_eq!(Seq2SeqConfig::for_pairs(&[]).max_len, 32);
        let mut config = Seq2SeqConfig::for_pairs(&[("ab", "c")]);
        config.max_len = 2;
        config.validate().unwrap();
        for bad in [0, 1] {
            config.max_len = bad;
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("max_len") && err.contains("at least 2"), "{err}");
        }
        // The table is made from the configuration alone: its size is bounded before it is
        // allocated (a checkpoint's `max_len` of 2^40 asked for 512 TiB and aborted).
        let most = MAX_POSITION_VALUES / 128;
        config.max_len = most;
        config.validate().unwrap();
        for bad in [most + 1, 1 << 40, usize::MAX] {
            config.max_len = bad;
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains("max_len") && err.contains(&format!("at most {most} at d_model 128")),
                "{err}"
            );
        }
    }
}
