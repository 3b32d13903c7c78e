//! The error type of attn-core: what was wrong, naming the tensor or field, and what was expected.

use attn_kernels::KernelError;

/// A typed error from attn-core.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttnError {
    /// A tensor has the wrong shape.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The tensor at fault.
        tensor: String,
        /// The shape it must have, in words and numbers, e.g. `[B, S, 512]`.
        expected: String,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// A weight tensor the module needs is absent.
    #[error("missing tensor `{name}`, expected shape {expected:?}")]
    MissingTensor {
        /// Its state-dict name.
        name: String,
        /// Its shape.
        expected: Vec<usize>,
    },
    /// A weight tensor the module does not have.
    #[error("unexpected tensor `{name}` (this module has {known})")]
    UnexpectedTensor {
        /// Its state-dict name.
        name: String,
        /// The names the module knows, comma-separated.
        known: String,
    },
    /// A configuration field out of its domain.
    #[error("invalid config: `{field}` is {got}, expected {expected}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Its value, printed.
        got: String,
        /// What it must be.
        expected: String,
    },
    /// A tensor's element count does not match its shape.
    #[error("tensor `{name}` has {len} elements, its shape {shape:?} needs {needed}")]
    BadTensorData {
        /// The tensor.
        name: String,
        /// The shape.
        shape: Vec<usize>,
        /// Elements the shape needs.
        needed: usize,
        /// Elements given.
        len: usize,
    },
    /// A weights file that cannot be read as safetensors, or a tensor in it that is not a
    /// float tensor of consistent size.
    #[error("safetensors: {what}")]
    Safetensors {
        /// What was wrong, naming the tensor where there is one, and what was expected.
        what: String,
    },
    /// An error from a kernel.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// `Result` with [`AttnError`].
pub type Result<T, E = AttnError> = std::result::Result<T, E>;

pub(crate) fn shape_error(op: &'static str, tensor: &str, expected: impl Into<String>, got: &[usize]) -> AttnError {
    AttnError::ShapeMismatch {
        op,
        tensor: tensor.to_string(),
        expected: expected.into(),
        got: got.to_vec(),
    }
}
