//! A module's weight matrices packed once: for the forward in f32 ([`F32Panels`], where attn's
//! own GEMM reads them) or in bf16, and in bf16 for the backward as well.

use std::ops::Range;
use std::sync::OnceLock;

use attn_kernels::{Bf16Panels, F32Panels, View2};

use crate::{pack_weight_f32, pack_weight_of, Result, Tensor};

/// Which weight matrix a projection applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proj {
    /// All of `q|k|v` at once (fused weights).
    Fused,
    /// Query (0), key (1) or value (2) rows.
    Part(usize),
    /// The output projection.
    Out,
}

/// What the packs read of a module's weight matrices (the module implements it).
pub(super) trait ProjWeights {
    /// The tensor and rows of the matrix `proj` names, if the module has it.
    fn matrix(&self, proj: Proj) -> Option<(&Tensor, Range<usize>)>;
    /// The matrix `proj` names as row-major rows of its f32 values: `(w, rows, in_dim)`.
    fn rows(&self, proj: Proj) -> (&[f32], Range<usize>, usize);
}

/// A packed copy of rows of a weight `[out, in]`, as the right operand `Wᵀ` of a product.
pub(super) trait PackedWeight: Sized {
    /// Whether [`ForwardPacks`] packs each matrix at the first product that reads it rather
    /// than when the precision is set.
    const LAZY: bool;
    /// Rows `rows` of `w` packed, or `None` where products of this shape would not read them.
    fn pack(w: &Tensor, rows: Range<usize>) -> Result<Option<Self>>;
    /// Bytes held.
    fn bytes(&self) -> usize;
}

impl PackedWeight for Bf16Panels {
    const LAZY: bool = false;
    fn pack(w: &Tensor, rows: Range<usize>) -> Result<Option<Self>> {
        pack_weight_of(w, rows).map(Some)
    }
    fn bytes(&self) -> usize {
        self.size_in_bytes()
    }
}

impl PackedWeight for F32Panels {
    // Only products of enough rows read the f32 panels ([`F32Panels::read_by`]): a module that
    // only decodes (a few rows a call) never holds them.
    const LAZY: bool = true;
    fn pack(w: &Tensor, rows: Range<usize>) -> Result<Option<Self>> {
        let in_dim = w.shape().get(1).copied().unwrap_or(0);
        if !F32Panels::worth_packing([in_dim, rows.len()]) {
            return Ok(None);
        }
        pack_weight_f32(w, rows).map(Some)
    }
    fn bytes(&self) -> usize {
        self.size_in_bytes()
    }
}

/// The matrices of the forward packed as `P` (those [`PackedWeight::pack`] packs): the fused
/// `q|k|v` rows (when fused), the rows of each of `q`, `k`, `v` (`Core::weight`), and the
/// output projection. With fused weights the parts serve only calls whose query, key and value
/// differ, so they are packed at the first such call (self-attention never holds them twice).
/// Where `P` is [`PackedWeight::LAZY`] every matrix is packed at the first call that asks for
/// it.
#[derive(Debug)]
pub(super) struct ForwardPacks<P> {
    fused: OnceLock<Option<P>>,
    parts: OnceLock<[Option<P>; 3]>,
    out: OnceLock<Option<P>>,
}

impl<P: PackedWeight> ForwardPacks<P> {
    /// The module's current weights, packed now unless `P` is lazy.
    pub(super) fn new(core: &impl ProjWeights) -> Result<Self> {
        let packs = ForwardPacks {
            fused: OnceLock::new(),
            parts: OnceLock::new(),
            out: OnceLock::new(),
        };
        if !P::LAZY {
            let pack = |proj| core.matrix(proj).map_or(Ok(None), |(w, rows)| P::pack(w, rows));
            let _ = packs.fused.set(pack(Proj::Fused)?);
            let _ = packs.out.set(pack(Proj::Out)?);
            if core.matrix(Proj::Fused).is_none() {
                let _ = packs.parts.set(Self::pack_parts(core));
            }
        }
        Ok(packs)
    }

    /// The module's current weights, packed now (as [`ForwardPacks::new`]), and the query,
    /// key and value parts of a fused matrix as well if `had` holds them: the packs of `had`
    /// made again after the weights changed.
    fn repacked(core: &impl ProjWeights, had: &Self) -> Result<Self> {
        let packs = Self::new(core)?;
        if had.parts.get().is_some() && packs.parts.get().is_none() {
            let _ = packs.parts.set(Self::pack_parts(core));
        }
        Ok(packs)
    }

    /// The matrix `proj` names packed, if the module has it and `P` packs it.
    fn pack_one(core: &impl ProjWeights, proj: Proj) -> Option<P> {
        let (w, rows) = core.matrix(proj)?;
        P::pack(w, rows).expect("a projection's rows lie within its [out, in] weight")
    }

    /// The Q, K and V rows packed.
    fn pack_parts(core: &impl ProjWeights) -> [Option<P>; 3] {
        [0, 1, 2].map(|which| {
            let (w, rows) = core
                .matrix(Proj::Part(which))
                .expect("every module has Q, K and V rows");
            P::pack(w, rows).expect("a projection's rows lie within its [out, in] weight")
        })
    }

    /// The packed matrix `proj` names, if `P` packs it (packed now if it is not yet).
    pub(super) fn get(&self, core: &impl ProjWeights, proj: Proj) -> Option<&P> {
        match proj {
            Proj::Fused => self.fused.get_or_init(|| Self::pack_one(core, proj)).as_ref(),
            Proj::Part(which) => self.parts.get_or_init(|| Self::pack_parts(core))[which].as_ref(),
            Proj::Out => self.out.get_or_init(|| Self::pack_one(core, proj)).as_ref(),
        }
    }

    /// Bytes held by the packs made so far.
    pub(super) fn bytes(&self) -> usize {
        let parts = self.parts.get().into_iter().flatten().flatten();
        let (fused, out) = (
            self.fused.get().into_iter().flatten(),
            self.out.get().into_iter().flatten(),
        );
        fused.chain(parts).chain(out).map(P::bytes).sum()
    }
}

/// A module's matrices in bf16: [`ForwardPacks`] of `Wᵀ`, packed when the precision is set,
/// and the same matrices packed as they are (`W: [out, in]`), the right operand of the
/// backward's `dx = dy·W` (mixed-precision training): each packed at the first backward that
/// reads it, so inference never pays for them, and self-attention, which reads the fused
/// matrix, never holds its three parts as well.
#[derive(Debug)]
pub(super) struct Bf16Weights {
    pub(super) forward: ForwardPacks<Bf16Panels>,
    backward: BackwardPacks,
}

/// [`Bf16Weights`] packed for the backward (`W`, not `Wᵀ`), each when first read.
#[derive(Debug, Default)]
struct BackwardPacks {
    fused: OnceLock<Bf16Panels>,
    parts: [OnceLock<Bf16Panels>; 3],
    out: OnceLock<Bf16Panels>,
}

impl Bf16Weights {
    /// The module's current weights packed for the forward.
    pub(super) fn new(core: &impl ProjWeights) -> Result<Self> {
        Ok(Bf16Weights {
            forward: ForwardPacks::new(core)?,
            backward: BackwardPacks::default(),
        })
    }

    /// The module's weights packed again after they changed: every pack `had` holds (the
    /// forward's, and those the backward made on demand), the bits [`Bf16Weights::new`] and the
    /// same later calls would give. Packing them as each module's update ends, while the new
    /// values are in cache, is what [`crate::Parameters::update_params`] is for.
    pub(super) fn repacked(core: &impl ProjWeights, had: &Self) -> Result<Self> {
        let packs = Bf16Weights {
            forward: ForwardPacks::repacked(core, &had.forward)?,
            backward: BackwardPacks::default(),
        };
        let (old, new) = (&had.backward, &packs.backward);
        let slots = [(Proj::Fused, &old.fused, &new.fused), (Proj::Out, &old.out, &new.out)]
            .into_iter()
            .chain((0..3).map(|i| (Proj::Part(i), &old.parts[i], &new.parts[i])));
        for (proj, old, new) in slots {
            if old.get().is_some() {
                let _ = new.set(pack_backward(core, proj));
            }
        }
        Ok(packs)
    }

    /// Bytes held by the packs made so far.
    pub(super) fn bytes(&self) -> usize {
        let b = &self.backward;
        let backward: usize = [&b.fused, &b.out]
            .into_iter()
            .chain(&b.parts)
            .filter_map(OnceLock::get)
            .map(Bf16Panels::size_in_bytes)
            .sum();
        self.forward.bytes() + backward
    }

    /// `W` of `proj` packed for the backward (packed at its first call).
    ///
    /// # Panics
    /// For a projection the module does not have (a fused matrix or an output projection it
    /// lacks).
    pub(super) fn backward(&self, core: &impl ProjWeights, proj: Proj) -> &Bf16Panels {
        assert!(
            core.matrix(proj).is_some(),
            "packed for every projection the module has"
        );
        let slot = match proj {
            Proj::Fused => &self.backward.fused,
            Proj::Part(which) => &self.backward.parts[which],
            Proj::Out => &self.backward.out,
        };
        slot.get_or_init(|| pack_backward(core, proj))
    }
}

/// `W` of `proj` packed for the backward's `dx = dy·W`.
fn pack_backward(core: &impl ProjWeights, proj: Proj) -> Bf16Panels {
    let (w, rows, in_dim) = core.rows(proj);
    let view = View2::contiguous(&w[rows.start * in_dim..rows.end * in_dim], [rows.len(), in_dim])
        .expect("a weight's rows are a contiguous [rows, in] matrix");
    Bf16Panels::pack(view)
}
