//! What a first program with the kernels needs, in one `use attn_kernels::prelude::*`.

pub use crate::{
    attention, attention_backward, flash_attention, AttentionOptions, BackwardInputs, Causal, ForwardInputs, Gradients,
    KernelError, Mask, Par, View, View4, ViewMut, ViewMut4,
};
