//! What a first program with attention needs, in one `use attn_core::prelude::*`: the kernels'
//! prelude, `sdpa` with its typed masks, multi-head attention with its caches, and weights.

pub use crate::kernels::prelude::*;
pub use crate::{
    sdpa, AttnError, BoolMeaning, FromSafetensors, Grads, KeyPadding, KvCache, Layout, MhaConfig, MhaOptions,
    MhaOutput, MultiHeadAttention, NeedWeights, ParamStore, Parameters, ScoreMask, SdpaOptions, SdpaOutput, Sequence,
    StateDict, Tensor, ToSafetensors,
};
