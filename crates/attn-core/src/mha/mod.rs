//! Multi-head and single-head attention that own their weights, with PyTorch's
//! `nn.MultiheadAttention` semantics and state-dict names.
//!
//! Shapes: query `[B, S, E]`, key `[B, T, kdim]`, value `[B, T, vdim]` (batch first; the
//! sequence-first layout `[S, B, E]` is read and written in place through [`Layout::SeqFirst`])
//! -> output `[B, S, E]` in the query's layout, weights `[B, S, T]` (averaged) or
//! `[B, H, S, T]`.
//!
//! How a call flows: the input rows are projected by GEMMs (one fused `[3E, E]` GEMM for
//! self-attention), heads are strided views of the projections (no split copies), the flash
//! kernel writes each head straight into `[tokens, H·Dv]`, and the output projection reads that
//! buffer as it is (no merge copy). Weights, when asked for, come in the same call: the flash
//! kernel keeps its masked scores and turns each finished row into
//! `exp(s − lse)` (`attn_kernels::attention_with_weights`; a second pass over the LSE where it
//! cannot). What this leaves out: dropout (inference only).

mod backward;
mod config;
mod forward;
mod masks;
mod options;
mod packs;
mod train;
mod weights;

use config::Dims;
pub use config::MhaConfig;
use forward::Source;
use masks::MaskSet;
pub use options::{Layout, MhaOptions, MhaOutput, NeedWeights, Sequence};
pub use train::{MhaInputGrads, MhaInputs, MhaTape, Packing};
pub use weights::{linear, linear_bf16, linear_packed};
use weights::{random_state_dict, Core};

use attn_kernels::{Par, View4};
use serde::{Deserialize, Serialize};

use crate::error::shape_error;
use crate::tensor::StateDict;
use crate::{AttnError, KvCache, Precision, Result};

/// Multi-head attention owning its weights: PyTorch's `nn.MultiheadAttention` (inference), with
/// grouped-query heads, RoPE and ALiBi as extensions.
///
/// ```
/// use attn_core::{MhaConfig, MhaOptions, MultiHeadAttention, Sequence};
/// use attn_core::kernels::Par;
/// let mut config = MhaConfig::new(8, 2);
/// config.batch_first = true;
/// let mha = MultiHeadAttention::with_seed(config, 7).unwrap();
/// let x = vec![0.1f32; 3 * 8]; // [B=1, S=3, E=8]
/// let out = mha.forward_self(Sequence::batch_first(&x, 1, 3, 8), &MhaOptions::default(), Par::Seq).unwrap();
/// assert_eq!(out.output.len(), 3 * 8);
/// ```
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    config: MhaConfig,
    core: Core,
}

impl MultiHeadAttention {
    /// Builds the module from `nn.MultiheadAttention.state_dict()` tensors: `in_proj_weight`
    /// `[3E, E]` (or `q_proj_weight` `[E, E]`, `k_proj_weight` `[E, kdim]`, `v_proj_weight`
    /// `[E, vdim]` when `kdim` or `vdim` differ from `E`), `in_proj_bias` `[3E]`,
    /// `out_proj.weight` `[E, E]`, `out_proj.bias` `[E]`, `bias_k` and `bias_v` `[1, 1, E]`. With
    /// `num_kv_heads = G`, the key and value parts have `G·E/H` rows. A missing, misshapen or
    /// unknown tensor is an error naming it.
    pub fn from_state_dict(config: MhaConfig, dict: StateDict) -> Result<Self> {
        let dims = config.dims()?;
        let mut core = Core::from_state_dict(dims, dict, config.bias, config.add_bias_kv, config.add_zero_attn)?;
        core.rope = config.rope;
        core.alibi = config.alibi.then(|| crate::alibi_slopes(dims.h));
        Ok(MultiHeadAttention { config, core })
    }

    /// A module with deterministic pseudo-random weights (uniform in `±1/sqrt(fan_in)`), for
    /// tests, demos and benchmarks.
    pub fn with_seed(config: MhaConfig, seed: u64) -> Result<Self> {
        let dims = config.dims()?;
        let dict = random_state_dict(&dims, config.bias, config.add_bias_kv, seed);
        Self::from_state_dict(config, dict)
    }

    /// The tensors under their PyTorch names, for saving.
    pub fn state_dict(&self) -> StateDict {
        self.core.state_dict()
    }

    /// The configuration.
    pub fn config(&self) -> &MhaConfig {
        &self.config
    }

    /// The precision of the four projections and of attention's products ([`Precision`]).
    pub fn precision(&self) -> Precision {
        self.core.precision()
    }

    /// Bytes of weights the module holds: its tensors ([`Tensor::bytes_held`](crate::Tensor::bytes_held): 4 per f32 value,
    /// 2 per bf16 value) and, in bf16, their packed copies.
    pub fn bytes_held(&self) -> usize {
        self.core.bytes_held()
    }

    /// Sets the precision of the four projections and of attention's two products: `Bf16`
    /// rounds and packs the current weights once (about half their f32 size again) and runs
    /// attention on bf16 operands (`AttentionOptions::precision`); `F32` drops the packed
    /// copies.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.core.set_precision(precision)
    }

    /// `[E, H, G, D]`.
    pub fn dims(&self) -> [usize; 4] {
        let d = self.core.dims;
        [d.e, d.h, d.g, d.d]
    }

    /// Cross- or general attention: query `[B, S, E]`, key `[B, T, kdim]`, value `[B, T, vdim]`
    /// (each in its [`Layout`]) -> output `[B, S, E]` and optional weights.
    pub fn forward(
        &self,
        query: Sequence<'_>,
        key: Sequence<'_>,
        value: Sequence<'_>,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        for (name, seq) in [("query", &query), ("key", &key), ("value", &value)] {
            seq.check_layout(name, self.config.batch_first)?;
        }
        self.core.forward(&query, Source::Cross(key, value), options, par)
    }

    /// Self-attention, `x: [B, S, E]` -> `[B, S, E]`: one fused QKV GEMM, heads as strided views.
    pub fn forward_self(&self, x: Sequence<'_>, options: &MhaOptions<'_>, par: Par) -> Result<MhaOutput> {
        x.check_layout("query", self.config.batch_first)?;
        self.core.forward(&x, Source::SelfAttention, options, par)
    }

    /// Self-attention over packed sequences of different lengths, without padding: `x: [N, E]`
    /// holds the token rows of every sequence back to back, sequence `i` being rows
    /// `starts[i]..starts[i + 1]` -> `[N, E]`. Each sequence attends only to itself; `causal`
    /// makes that attention causal. The projections run once over all `N` rows, so the cost
    /// follows the real token count.
    pub fn forward_self_packed(&self, x: &[f32], starts: &[usize], causal: bool, par: Par) -> Result<Vec<f32>> {
        self.core.forward_packed(x, starts, causal, par)
    }

    /// Incremental self-attention: `x: [B, n, E]` are the next `n` positions; their keys and
    /// values join `cache`, and each new query attends every cached position up to its own.
    /// Decoding N tokens one at a time equals one causal `forward_self` over the N tokens.
    pub fn forward_append(
        &self,
        x: Sequence<'_>,
        cache: &mut KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        let mut options = *options;
        options.is_causal = true;
        x.check_layout("query", self.config.batch_first)?;
        self.core.forward(&x, Source::Append(cache), &options, par)
    }

    /// Projects `key: [B, T, kdim]` and `value: [B, T, vdim]` once and appends them to `cache`,
    /// for cross-attention over a fixed memory (an encoder's output) at every decoding step.
    pub fn append_to_cache(&self, key: Sequence<'_>, value: Sequence<'_>, cache: &mut KvCache, par: Par) -> Result<()> {
        let op = "multihead_attention";
        key.check(op, "key", self.core.dims.kdim)?;
        value.check(op, "value", self.core.dims.vdim)?;
        key.check_layout("key", self.config.batch_first)?;
        value.check_layout("value", self.config.batch_first)?;
        if key.batch != value.batch || key.len != value.len {
            return Err(shape_error(
                op,
                "value",
                format!("[B, T] = [{}, {}]", key.batch, key.len),
                &[value.batch, value.len],
            ));
        }
        let Dims { g, d, dv, .. } = self.core.dims;
        let (mut k_buf, v_buf, t) = self.core.project_kv(&key, &value, par)?;
        let b = key.batch;
        if let Some(rope) = &self.core.rope {
            let offset = cache.len();
            rope.apply(&mut k_buf, g * d, 0, g, d, |r| offset + r % t.max(1), b * t);
        }
        cache.append(
            View4::new(&k_buf, [b, g, t, d], [t * g * d, d, g * d, 1])?,
            View4::new(&v_buf, [b, g, t, dv], [t * g * dv, dv, g * dv, 1])?,
        )
    }

    /// Attention of `query: [B, S, E]` over keys and values already in `cache` (see
    /// [`append_to_cache`](Self::append_to_cache)), which is left unchanged -> `[B, S, E]`.
    /// Masks refer to the cached positions.
    pub fn forward_over_cache(
        &self,
        query: Sequence<'_>,
        cache: &KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        query.check_layout("query", self.config.batch_first)?;
        self.core.forward(&query, Source::Memory(cache), options, par)
    }

    /// The old name of [`forward_append`](Self::forward_append).
    #[deprecated(
        since = "0.1.0",
        note = "renamed `forward_append`: it appends to the cache, then attends"
    )]
    pub fn forward_cached(
        &self,
        x: Sequence<'_>,
        cache: &mut KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.forward_append(x, cache, options, par)
    }

    /// The old name of [`append_to_cache`](Self::append_to_cache).
    #[deprecated(since = "0.1.0", note = "renamed `append_to_cache`")]
    pub fn fill_cache(&self, key: Sequence<'_>, value: Sequence<'_>, cache: &mut KvCache, par: Par) -> Result<()> {
        self.append_to_cache(key, value, cache, par)
    }

    /// The old name of [`forward_over_cache`](Self::forward_over_cache).
    #[deprecated(
        since = "0.1.0",
        note = "renamed `forward_over_cache`: it reads the cache and leaves it unchanged"
    )]
    pub fn forward_with_cache(
        &self,
        query: Sequence<'_>,
        cache: &KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.forward_over_cache(query, cache, options, par)
    }

    /// Bytes that [`forward`](Self::forward) (or `forward_self` with `t = s`) allocates for
    /// `batch` queries of length `s` over keys of length `t`: projections, attention output,
    /// weights when asked for, the flash kernel's packed keys and values
    /// ([`SdpaShape::packed_bytes`](crate::SdpaShape::packed_bytes)), and the output. Callers
    /// that cap memory check this first.
    pub fn forward_bytes(&self, batch: usize, s: usize, t: usize, need_weights: NeedWeights) -> u128 {
        self.core.forward_bytes(batch, s, t, need_weights)
    }

    /// An empty cache sized for this module and `batch` sequences, in the module's precision:
    /// a module in [`Precision::Bf16`] keeps bf16 bits ([`KvCache::new_in`]), half the bytes, with
    /// the same outputs (its attention rounds keys and values to bf16 as it reads them anyway).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let d = self.core.dims;
        KvCache::new_in(self.precision(), batch, d.g, d.d, d.dv, capacity)
    }
}

/// Configuration of a single-head [`Attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// Query input width.
    pub embed_dim: usize,
    /// Key input width.
    pub kdim: usize,
    /// Value input width.
    pub vdim: usize,
    /// D, the width of queries and keys after projection.
    pub head_dim: usize,
    /// Dv, the width of values after projection (and of the output).
    pub v_head_dim: usize,
    /// Biases on the projections.
    pub bias: bool,
}

/// Single-head attention owning its Q, K and V projections: query `[B, S, E]`, key
/// `[B, T, kdim]`, value `[B, T, vdim]` -> `[B, S, Dv]`. It has no output projection; a
/// multi-head module is the concatenation of its heads followed by one.
///
/// State-dict names follow `nn.MultiheadAttention`'s separate form: `q_proj_weight` `[D, E]`,
/// `k_proj_weight` `[D, kdim]`, `v_proj_weight` `[Dv, vdim]`, `in_proj_bias` `[2D + Dv]`.
#[derive(Debug, Clone)]
pub struct Attention {
    core: Core,
}

impl Attention {
    /// Builds the head from its tensors (see the type's docs for names and shapes).
    pub fn from_state_dict(config: AttentionConfig, dict: StateDict) -> Result<Self> {
        let dims = Dims {
            e: config.embed_dim,
            kdim: config.kdim,
            vdim: config.vdim,
            h: 1,
            g: 1,
            d: config.head_dim,
            dv: config.v_head_dim,
            out: None,
        };
        if [dims.e, dims.kdim, dims.vdim, dims.d, dims.dv].contains(&0) {
            return Err(AttnError::InvalidConfig {
                field: "attention dims",
                got: format!("{config:?}"),
                expected: "all at least 1".into(),
            });
        }
        let core = Core::from_state_dict_separate(dims, dict, config.bias)?;
        Ok(Attention { core })
    }

    /// The precision of the three projections and of attention's products ([`Precision`]).
    pub fn precision(&self) -> Precision {
        self.core.precision()
    }

    /// Bytes of weights held, as [`MultiHeadAttention::bytes_held`].
    pub fn bytes_held(&self) -> usize {
        self.core.bytes_held()
    }

    /// Sets the precision of the three projections, as [`MultiHeadAttention::set_precision`].
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.core.set_precision(precision)
    }

    /// Single-head attention, `query: [B, S, E]`, `key: [B, T, kdim]`, `value: [B, T, vdim]` ->
    /// `[B, S, Dv]`.
    pub fn forward(
        &self,
        query: Sequence<'_>,
        key: Sequence<'_>,
        value: Sequence<'_>,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.core.forward(&query, Source::Cross(key, value), options, par)
    }
}

/// Runs `f` on every packed sequence's job (the inference forward's and the training
/// pass's): with many sequences one per task, each sequential; with
/// few one after another, each parallel. Either way each sequence is one call, so the bits do
/// not depend on the thread count.
fn for_each_sequence<J: Send>(jobs: Vec<J>, par: Par, f: impl Fn(J, Par) -> Result<()> + Sync + Send) -> Result<()> {
    use rayon::prelude::*;
    if par == Par::Rayon && jobs.len() >= 2 * rayon::current_num_threads() {
        jobs.into_par_iter().try_for_each(|j| f(j, Par::Seq))
    } else {
        jobs.into_iter().try_for_each(|j| f(j, par))
    }
}
