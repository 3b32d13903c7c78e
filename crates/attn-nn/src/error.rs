//! The error type of attn-nn.

use attn_core::AttnError;

/// A typed error from attn-nn: attention errors pass through; layers add their own.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NnError {
    /// From attention (shapes, masks, weights of an attention block).
    #[error(transparent)]
    Attention(#[from] AttnError),
    /// A configuration field out of its domain.
    #[error("invalid config: `{field}` is {got}, expected {expected}")]
    InvalidConfig {
        /// The field.
        field: String,
        /// Its value, printed.
        got: String,
        /// What it must be.
        expected: String,
    },
    /// Bytes that are not a checkpoint of the model asked for.
    #[error("{what}")]
    Checkpoint {
        /// What was wrong, and what was expected.
        what: String,
    },
    /// Training asked of a model that cannot train: its weights are bf16 bits read in bf16
    /// ([`crate::Seq2Seq::from_checkpoint_in`]), not the f32 master weights training updates.
    #[error("{what}")]
    NotTrainable {
        /// Why, and what to do instead.
        what: String,
    },
    /// A file of a model folder that cannot be read or parsed.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: String,
        /// What was wrong, and what was expected.
        what: String,
    },
    /// An output that is not finite: the model has no answer to give for input `index` (its
    /// activations overflowed), and gives none rather than NaN.
    #[error("input {index}: {what}")]
    NonFinite {
        /// The input, counted from 0 in the call.
        index: usize,
        /// What was not finite, and where.
        what: String,
    },
    /// An input with the wrong shape.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The input at fault.
        tensor: String,
        /// What it must be.
        expected: String,
        /// What it is.
        got: Vec<usize>,
    },
}

impl From<attn_core::kernels::KernelError> for NnError {
    fn from(e: attn_core::kernels::KernelError) -> Self {
        NnError::Attention(AttnError::Kernel(e))
    }
}

/// `Result` with [`NnError`].
pub type Result<T, E = NnError> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &str, got: impl ToString, expected: impl Into<String>) -> NnError {
    NnError::InvalidConfig {
        field: field.to_string(),
        got: got.to_string(),
        expected: expected.into(),
    }
}
