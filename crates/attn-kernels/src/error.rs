//! The one error type of attn-kernels: what was wrong with a call, and what was expected.
//!
//! Kernels validate their views once at the public boundary and return these; below it they only
//! `debug_assert!`.

/// A typed error from a kernel's public entry point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A tensor's shape disagrees with what the operation needs.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// Which argument is wrong.
        tensor: &'static str,
        /// The shape the operation needs.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A view's strides reach outside its buffer.
    #[error(
        "{op}: view `{tensor}` of shape {shape:?} with strides {strides:?} needs {needed} elements, buffer has {len}"
    )]
    OutOfBounds {
        /// The operation that was called.
        op: &'static str,
        /// Which argument is wrong.
        tensor: &'static str,
        /// The view's shape.
        shape: Vec<usize>,
        /// The view's strides, in elements.
        strides: Vec<usize>,
        /// Elements the view needs.
        needed: usize,
        /// Elements the buffer has.
        len: usize,
    },
    /// A destination view whose strides make two indices share one element.
    #[error("{op}: destination `{tensor}` of shape {shape:?} with strides {strides:?} overlaps itself")]
    OverlappingDestination {
        /// The operation that was called.
        op: &'static str,
        /// Which argument is wrong.
        tensor: &'static str,
        /// The view's shape.
        shape: Vec<usize>,
        /// The view's strides, in elements.
        strides: Vec<usize>,
    },
    /// The number of query heads is not a multiple of the number of key/value heads.
    #[error("{op}: {n_heads} query heads are not a multiple of {n_kv_heads} key/value heads")]
    HeadsNotDivisible {
        /// The operation that was called.
        op: &'static str,
        /// H, query heads.
        n_heads: usize,
        /// G, key/value heads.
        n_kv_heads: usize,
    },
    /// A mask's shape does not broadcast to the scores' shape.
    #[error("{op}: mask of shape {got:?} does not broadcast to {target:?} (each dim must equal the target or be 1)")]
    MaskNotBroadcastable {
        /// The operation that was called.
        op: &'static str,
        /// The mask's shape.
        got: Vec<usize>,
        /// The shape it must broadcast to, `[B, H, S, T]`.
        target: Vec<usize>,
    },
    /// A key length is larger than the number of keys.
    #[error("{op}: key length {length} of batch {batch} exceeds the {n_keys} keys")]
    KeyLengthTooLarge {
        /// The operation that was called.
        op: &'static str,
        /// Batch index.
        batch: usize,
        /// The length that was given.
        length: usize,
        /// T, the number of keys.
        n_keys: usize,
    },
    /// A scalar argument outside its domain.
    #[error("{op}: {what} is {got}, expected {expected}")]
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// The argument.
        what: &'static str,
        /// Its value, printed.
        got: String,
        /// What it must be.
        expected: &'static str,
    },
}

impl KernelError {
    /// The same error, reported as one of `op`: for an API that calls a kernel, so that its
    /// user reads the name of what they called (`sdpa`), not of the kernel it reached.
    pub fn in_op(mut self, op: &'static str) -> Self {
        match &mut self {
            KernelError::ShapeMismatch { op: o, .. }
            | KernelError::OutOfBounds { op: o, .. }
            | KernelError::OverlappingDestination { op: o, .. }
            | KernelError::HeadsNotDivisible { op: o, .. }
            | KernelError::MaskNotBroadcastable { op: o, .. }
            | KernelError::KeyLengthTooLarge { op: o, .. }
            | KernelError::InvalidArgument { op: o, .. } => *o = op,
        }
        self
    }

    /// A [`KernelError::ShapeMismatch`].
    pub(crate) fn shape(op: &'static str, tensor: &'static str, expected: Vec<usize>, got: Vec<usize>) -> Self {
        KernelError::ShapeMismatch {
            op,
            tensor,
            expected,
            got,
        }
    }
}

/// `Ok` when a flat buffer holds `want` elements, else a shape error naming it.
pub(crate) fn check_len(op: &'static str, tensor: &'static str, want: usize, got: usize) -> Result<(), KernelError> {
    if want == got {
        Ok(())
    } else {
        Err(KernelError::shape(op, tensor, vec![want], vec![got]))
    }
}

/// The lengths of the optional destinations `(name, expected, buffer)` that are present.
pub(crate) fn check_optional_lens(
    op: &'static str,
    bufs: [(&'static str, usize, Option<&[f32]>); 2],
) -> Result<(), KernelError> {
    for (name, want, buf) in bufs {
        if let Some(buf) = buf {
            check_len(op, name, want, buf.len())?;
        }
    }
    Ok(())
}
