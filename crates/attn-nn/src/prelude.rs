//! What a first program with layers and models needs, in one `use attn_nn::prelude::*`: attn-core's
//! prelude, the layers and stacks, the sequence-to-sequence model and its training, BERT and
//! sentence embeddings.

pub use attn_core::prelude::*;

pub use crate::layers::Dropout;
pub use crate::parallel::{Collective, GradientTree, MicroBatches, SingleProcess};
#[cfg(feature = "tokenizers")]
pub use crate::{default_model_dir, EmbedOptions, Embeddings, TextEmbedder};
pub use crate::{
    AdamW, BertModel, BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, NnError, Pooling,
    Schedule, SentenceEmbedder, Seq2Seq, Seq2SeqConfig, Step, TrainStep, Transformer, TransformerConfig,
    TransformerMasks, Vocab,
};
