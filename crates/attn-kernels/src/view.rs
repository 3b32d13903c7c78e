//! Strided views: a buffer, a shape and a stride per dimension, checked once on construction.
//!
//! Strides are in elements and non-negative; a stride of 0 broadcasts a dimension. A view never
//! owns its data. What this leaves out: negative strides, and any notion of what a dimension means
//! (the kernels that take views say that in their docs).

use crate::KernelError;

/// A read-only view of `N` dimensions over a slice.
#[derive(Debug)]
pub struct View<'a, T, const N: usize> {
    data: &'a [T],
    shape: [usize; N],
    strides: [usize; N],
}

impl<T, const N: usize> Clone for View<'_, T, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T, const N: usize> Copy for View<'_, T, N> {}

/// A mutable view of `N` dimensions over a slice; its strides never make two indices alias.
#[derive(Debug)]
pub struct ViewMut<'a, T, const N: usize> {
    data: &'a mut [T],
    shape: [usize; N],
    strides: [usize; N],
}

/// A 2-D view: `[rows, cols]`.
pub type View2<'a, T> = View<'a, T, 2>;
/// A 4-D view, for attention usually `[B, H, S, D]`.
pub type View4<'a, T> = View<'a, T, 4>;
/// A mutable 2-D view.
pub type ViewMut2<'a, T> = ViewMut<'a, T, 2>;
/// A mutable 4-D view.
pub type ViewMut4<'a, T> = ViewMut<'a, T, 4>;

/// A raw pointer that parallel tasks share to write disjoint elements of one destination.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

impl SharedMut {
    /// The pointer (a method, so closures capture the wrapper, not the raw field).
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every user writes a disjoint set of elements (distinct rows of a destination checked
// not to overlap itself) from each task, and the pointer outlives the parallel loop.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// Row-major strides of a dense array of `shape`.
pub fn contiguous_strides<const N: usize>(shape: [usize; N]) -> [usize; N] {
    let mut strides = [0; N];
    let mut acc = 1usize;
    for dim in (0..N).rev() {
        strides[dim] = acc;
        acc = acc.saturating_mul(shape[dim]);
    }
    strides
}

/// A dense view of `shape` needs exactly `len` elements: the product of `shape`, without
/// overflow.
fn check_dense<const N: usize>(op: &'static str, len: usize, shape: [usize; N]) -> Result<(), KernelError> {
    let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if count != Some(len) {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "data",
            expected: shape.to_vec(),
            got: vec![len],
        });
    }
    Ok(())
}

/// Number of elements a view of `shape` and `strides` reaches (0 when any dim is empty), or
/// `None` when that number overflows `usize`.
pub(crate) fn span<const N: usize>(shape: [usize; N], strides: [usize; N]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for dim in 0..N {
        last = last.checked_add((shape[dim] - 1).checked_mul(strides[dim])?)?;
    }
    last.checked_add(1)
}

fn check_span<const N: usize>(
    op: &'static str,
    tensor: &'static str,
    len: usize,
    shape: [usize; N],
    strides: [usize; N],
) -> Result<(), KernelError> {
    match span(shape, strides) {
        Some(needed) if needed <= len => Ok(()),
        needed => Err(KernelError::OutOfBounds {
            op,
            tensor,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            needed: needed.unwrap_or(usize::MAX),
            len,
        }),
    }
}

/// True when no two in-bounds indices of the view map to one element: sorted by stride, each
/// dimension's stride must step over everything the smaller dimensions reach.
pub(crate) fn is_non_overlapping<const N: usize>(shape: [usize; N], strides: [usize; N]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut dims: Vec<usize> = (0..N).filter(|&d| shape[d] > 1).collect();
    dims.sort_by_key(|&d| strides[d]);
    let mut reach = 1usize;
    for d in dims {
        if strides[d] < reach {
            return false;
        }
        reach = match (shape[d] - 1)
            .checked_mul(strides[d])
            .and_then(|x| x.checked_add(reach))
        {
            Some(r) => r,
            None => return false,
        };
    }
    true
}

fn check_permutation<const N: usize>(perm: [usize; N]) -> Result<(), KernelError> {
    let mut seen = [false; N];
    for &p in &perm {
        if p >= N || seen[p] {
            return Err(KernelError::InvalidArgument {
                op: "permuted",
                what: "perm",
                got: format!("{perm:?}"),
                expected: "a permutation of 0..N",
            });
        }
        seen[p] = true;
    }
    Ok(())
}

impl<'a, T, const N: usize> View<'a, T, N> {
    /// A view of `shape` with `strides` (in elements) over `data`.
    ///
    /// Fails with [`KernelError::OutOfBounds`] if the view reaches past the end of `data`.
    pub fn new(data: &'a [T], shape: [usize; N], strides: [usize; N]) -> Result<Self, KernelError> {
        check_span("view", "data", data.len(), shape, strides)?;
        Ok(Self { data, shape, strides })
    }

    /// A dense row-major view of `shape` over `data`; `data.len()` must equal the product of `shape`.
    pub fn contiguous(data: &'a [T], shape: [usize; N]) -> Result<Self, KernelError> {
        check_dense("view", data.len(), shape)?;
        Ok(Self {
            data,
            shape,
            strides: contiguous_strides(shape),
        })
    }

    /// The view with its dimensions reordered: dimension `i` of the result is dimension `perm[i]`
    /// of `self`. `[B, S, H, D]` storage seen as `[B, H, S, D]` is `permuted([0, 2, 1, 3])`.
    ///
    /// Fails if `perm` is not a permutation of `0..N`.
    pub fn permuted(self, perm: [usize; N]) -> Result<Self, KernelError> {
        check_permutation(perm)?;
        Ok(Self {
            data: self.data,
            shape: perm.map(|p| self.shape[p]),
            strides: perm.map(|p| self.strides[p]),
        })
    }

    /// The shape.
    #[inline]
    pub fn shape(&self) -> [usize; N] {
        self.shape
    }
    /// The strides, in elements.
    #[inline]
    pub fn strides(&self) -> [usize; N] {
        self.strides
    }
    /// The underlying buffer.
    #[inline]
    pub fn data(&self) -> &'a [T] {
        self.data
    }
    /// Offset in `data` of the element at `index`.
    #[inline]
    pub fn offset(&self, index: [usize; N]) -> usize {
        debug_assert!(
            index.iter().zip(&self.shape).all(|(i, n)| i < n),
            "index {index:?} outside {:?}",
            self.shape
        );
        index.iter().zip(&self.strides).map(|(i, st)| i * st).sum()
    }
}

impl<T: Copy, const N: usize> View<'_, T, N> {
    /// The element at `index`.
    #[inline]
    pub fn get(&self, index: [usize; N]) -> T {
        self.data[self.offset(index)]
    }
}

impl<'a, T, const N: usize> ViewMut<'a, T, N> {
    /// A mutable view of `shape` with `strides` over `data`.
    ///
    /// Fails if the view reaches past `data` ([`KernelError::OutOfBounds`]) or if two indices
    /// would share an element ([`KernelError::OverlappingDestination`]).
    pub fn new(data: &'a mut [T], shape: [usize; N], strides: [usize; N]) -> Result<Self, KernelError> {
        check_span("view_mut", "data", data.len(), shape, strides)?;
        if !is_non_overlapping(shape, strides) {
            return Err(KernelError::OverlappingDestination {
                op: "view_mut",
                tensor: "data",
                shape: shape.to_vec(),
                strides: strides.to_vec(),
            });
        }
        Ok(Self { data, shape, strides })
    }

    /// A dense row-major mutable view of `shape` over `data`.
    pub fn contiguous(data: &'a mut [T], shape: [usize; N]) -> Result<Self, KernelError> {
        check_dense("view_mut", data.len(), shape)?;
        Ok(Self {
            data,
            shape,
            strides: contiguous_strides(shape),
        })
    }

    /// The mutable view with its dimensions reordered, as [`View::permuted`].
    pub fn permuted(self, perm: [usize; N]) -> Result<Self, KernelError> {
        check_permutation(perm)?;
        let shape = perm.map(|p| self.shape[p]);
        let strides = perm.map(|p| self.strides[p]);
        Ok(Self {
            data: self.data,
            shape,
            strides,
        })
    }

    /// The shape.
    #[inline]
    pub fn shape(&self) -> [usize; N] {
        self.shape
    }
    /// The strides, in elements.
    #[inline]
    pub fn strides(&self) -> [usize; N] {
        self.strides
    }
    /// A read-only view of the same elements.
    #[inline]
    pub fn rb(&self) -> View<'_, T, N> {
        View {
            data: self.data,
            shape: self.shape,
            strides: self.strides,
        }
    }
    /// The same view, reborrowed for a shorter lifetime.
    #[inline]
    pub fn rb_mut(&mut self) -> ViewMut<'_, T, N> {
        ViewMut {
            data: self.data,
            shape: self.shape,
            strides: self.strides,
        }
    }
    /// The underlying buffer.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [T] {
        self.data
    }
    /// Offset in the buffer of the element at `index`.
    #[inline]
    pub fn offset(&self, index: [usize; N]) -> usize {
        self.rb().offset(index)
    }
}

/// The inputs of a forward attention call ([`crate::attention`], [`crate::flash_attention`],
/// [`crate::attention_unfused`], [`crate::attention_with_lse_lo`]): queries `q: [B, H, S, D]`,
/// keys `k: [B, G, T, D]` and values `v: [B, G, T, Dv]`, `H` a multiple of `G` (grouped-query
/// attention; `G = H` is multi-head). Any strides; self-attention passes one view three times.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInputs<'a> {
    /// `[B, H, S, D]`.
    pub q: View4<'a, f32>,
    /// `[B, G, T, D]`.
    pub k: View4<'a, f32>,
    /// `[B, G, T, Dv]`.
    pub v: View4<'a, f32>,
}

impl<'a> ForwardInputs<'a> {
    /// `q`, `k` and `v`, in that order.
    pub fn new(q: View4<'a, f32>, k: View4<'a, f32>, v: View4<'a, f32>) -> Self {
        ForwardInputs { q, k, v }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_bounds_is_an_error() {
        let data = [0.0f32; 10];
        assert!(View::new(&data[..], [2, 5], [5, 1]).is_ok());
        let err = View::new(&data[..], [2, 6], [5, 1]).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::OutOfBounds {
                    needed: 11,
                    len: 10,
                    ..
                }
            ),
            "{err}"
        );
        let err = View::new(&data[..], [usize::MAX, 2], [usize::MAX, 1]).unwrap_err();
        assert!(matches!(err, KernelError::OutOfBounds { .. }));
    }

    #[test]
    fn overlapping_destination_is_an_error() {
        let mut data = [0.0f32; 10];
        assert!(ViewMut::new(&mut data[..], [2, 5], [5, 1]).is_ok());
        assert!(ViewMut::new(&mut data[..], [5, 2], [1, 5]).is_ok());
        let err = ViewMut::new(&mut data[..], [2, 5], [4, 1]).unwrap_err();
        assert!(matches!(err, KernelError::OverlappingDestination { .. }));
        let err = ViewMut::new(&mut data[..], [2, 5], [0, 1]).unwrap_err();
        assert!(matches!(err, KernelError::OverlappingDestination { .. }));
        // A broadcast dimension of extent 1 is fine.
        assert!(ViewMut::new(&mut data[..], [1, 5], [0, 1]).is_ok());
    }

    #[test]
    fn permuted_views_see_the_same_elements() {
        let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let bshd = View::contiguous(&data[..], [1, 3, 2, 4]).unwrap();
        let bhsd = bshd.permuted([0, 2, 1, 3]).unwrap();
        assert_eq!(bhsd.shape(), [1, 2, 3, 4]);
        assert_eq!(bhsd.get([0, 1, 2, 3]), bshd.get([0, 2, 1, 3]));
        assert!(bshd.permuted([0, 0, 1, 2]).is_err());
    }
}
