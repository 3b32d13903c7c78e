//! Training's optimizer side: `AdamW` equal to `torch.optim.AdamW`, learning-rate schedules as
//! `LambdaLR` factors, and `clip_grad_norm` with `torch.nn.utils.clip_grad_norm_`'s semantics.
//!
//! Parameters and their gradients are visited by state-dict name ([`Param`]), so the optimizer
//! works for any module whose parameters can be listed, and its moments can be saved beside the
//! weights under the same names.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use attn_core::clip_grad_norm;
use attn_core::kernels::{adamw_update, AdamWStep};
use attn_core::{AlignedBuf, Grads, ParamLayout, ParamPath, ParamStore, Parameters, FLAT_CHUNK};
use rayon::prelude::*;

use crate::error::invalid;
use crate::{NnError, Result};

/// One parameter and its gradient, under its state-dict name.
#[derive(Debug)]
pub struct Param<'a> {
    /// The state-dict name, e.g. `encoder.layers.0.linear1.weight`.
    pub name: &'a str,
    /// The values, updated in place.
    pub value: &'a mut [f32],
    /// Its gradient, as the backward left it.
    pub grad: &'a [f32],
}

/// `torch.optim.AdamW`: Adam with decoupled weight decay and bias correction, evaluated in the
/// same order as PyTorch's single-tensor implementation, so the parameters agree to rounding:
/// `p ← p·(1 − lr·wd)`; `m ← m + (1 − β1)(g − m)`; `v ← β2·v + (1 − β2)·g²`;
/// `p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)`.
///
/// Two ways to step: [`AdamW::step`] over parameters listed by name (moments kept by name), and
/// [`AdamW::step_flat`] over a [`ParamStore`](attn_core::ParamStore)'s flat buffers (moments
/// kept flat in the same layout; one pass on rayon's threads, the same bits on any thread count
/// as a by-name step). Moments restored by name become flat at the first flat step.
///
/// A model that owns its store steps with one call, no names ([`Seq2Seq::update`](crate::Seq2Seq::update);
/// [`AdamW::update`] for any module adopted by a store):
///
/// ```
/// use attn_nn::core::kernels::Par;
/// use attn_nn::core::Sequence;
/// use attn_nn::{AdamW, BlockMasks, EncoderLayer, Grads, LayerConfig, ParamStore, Step};
/// let mut layer = EncoderLayer::with_seed(LayerConfig::new(8, 2), 0).unwrap();
/// let store = ParamStore::adopt(&mut layer);
/// let (mut adam, mut grads) = (AdamW::new((0.9, 0.999), 1e-8, 0.01).unwrap(), Grads::for_store(&store));
/// let x = vec![0.5f32; 3 * 8];
/// let seq = Sequence::batch_first(&x, 1, 3, 8);
/// let mut step = Step::new(Default::default(), Par::Seq, &mut grads);
/// let (out, tape) = layer.forward_train(seq, &BlockMasks::default(), &mut step).unwrap();
/// layer.backward(seq, &BlockMasks::default(), &tape, &out, &mut step).unwrap(); // loss ½·Σout²
/// let before = layer.state_dict();
/// adam.update(&store, &mut layer, &grads, 1e-2).unwrap();
/// assert_ne!(layer.state_dict(), before);
/// ```
#[derive(Debug, Clone)]
pub struct AdamW {
    /// β1, β2.
    pub betas: (f32, f32),
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (PyTorch's default 0.01).
    pub weight_decay: f32,
    step: u64,
    moments: Moments,
}

#[derive(Debug, Clone)]
enum Moments {
    ByName(BTreeMap<String, (Vec<f32>, Vec<f32>)>),
    Flat {
        layout: Arc<ParamLayout>,
        m: AlignedBuf,
        v: AlignedBuf,
    },
}

impl AdamW {
    /// An optimizer with no steps taken; the same argument checks as PyTorch's constructor.
    pub fn new(betas: (f32, f32), eps: f32, weight_decay: f32) -> Result<Self> {
        for (name, beta) in [("betas[0]", betas.0), ("betas[1]", betas.1)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(name, beta, "in [0, 1)"));
            }
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(invalid("eps", eps, "a finite number at least 0"));
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return Err(invalid("weight_decay", weight_decay, "a finite number at least 0"));
        }
        Ok(AdamW {
            betas,
            eps,
            weight_decay,
            step: 0,
            moments: Moments::ByName(BTreeMap::new()),
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments of a parameter, by name (after its first step).
    pub fn moments(&self, name: &str) -> Option<(&[f32], &[f32])> {
        match &self.moments {
            Moments::ByName(map) => map.get(name).map(|(m, v)| (&m[..], &v[..])),
            Moments::Flat { layout, m, v } => layout.entry(name).map(|e| (&m[e.range.clone()], &v[e.range.clone()])),
        }
    }

    /// Every parameter's first and second moments, by name, in the order of the names (to save
    /// the optimizer's state).
    pub fn all_moments(&self) -> Vec<(&str, &[f32], &[f32])> {
        match &self.moments {
            Moments::ByName(map) => map.iter().map(|(n, (m, v))| (n.as_str(), &m[..], &v[..])).collect(),
            Moments::Flat { layout, m, v } => layout
                .name_order()
                .iter()
                .map(|&i| {
                    let e = &layout.entries()[i];
                    (e.name.as_str(), &m[e.range.clone()], &v[e.range.clone()])
                })
                .collect(),
        }
    }

    /// Restores a saved state: the steps taken and each parameter's moments (equal lengths),
    /// so the next step is the one the saved optimizer would have taken.
    pub fn restore(&mut self, steps: u64, moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>) -> Result<()> {
        if let Some((name, _)) = moments.iter().find(|(_, (m, v))| m.len() != v.len()) {
            return Err(invalid("moments", name, "first and second moments of one length"));
        }
        self.step = steps;
        self.moments = Moments::ByName(moments);
        Ok(())
    }

    /// Counts the step and returns its constants; `lr` must be finite and at least 0.
    fn next_step(&mut self, lr: f32) -> Result<AdamWStep> {
        let c = self.constants(self.step + 1, lr)?;
        self.step += 1;
        Ok(c)
    }

    /// The constants of step `step` at learning rate `lr`.
    fn constants(&self, step: u64, lr: f32) -> Result<AdamWStep> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(invalid("lr", lr, "a finite number at least 0"));
        }
        let t = step as i32;
        let (b1, b2) = self.betas;
        Ok(AdamWStep {
            b1,
            b2,
            eps: self.eps,
            bias2_sqrt: (1.0 - b2.powi(t)).sqrt(),
            step_size: lr / (1.0 - b1.powi(t)),
            decay: 1.0 - lr * self.weight_decay,
        })
    }

    /// One step at learning rate `lr` over `params`, listed by name. A parameter seen for the
    /// first time gets zero moments; one whose size changed since is an error naming it.
    pub fn step(&mut self, params: &mut [Param<'_>], lr: f32) -> Result<()> {
        let Moments::ByName(moments) = &mut self.moments else {
            return Err(invalid(
                "params",
                "parameters by name",
                "the flat buffers of the store this optimizer stepped before (AdamW::step_flat)",
            ));
        };
        for p in params.iter() {
            if p.grad.len() != p.value.len() {
                return Err(NnError::ShapeMismatch {
                    op: "AdamW::step",
                    tensor: format!("grad.{}", p.name),
                    expected: format!("{} values, as the parameter", p.value.len()),
                    got: vec![p.grad.len()],
                });
            }
            if let Some((m, _)) = moments.get(p.name) {
                if m.len() != p.value.len() {
                    return Err(NnError::ShapeMismatch {
                        op: "AdamW::step",
                        tensor: p.name.to_string(),
                        expected: format!("{} values, as at the optimizer's earlier steps", m.len()),
                        got: vec![p.value.len()],
                    });
                }
            }
        }
        let c = self.next_step(lr)?;
        let Moments::ByName(moments) = &mut self.moments else {
            unreachable!("checked above")
        };
        for p in params.iter_mut() {
            let (m, v) = moments
                .entry(p.name.to_string())
                .or_insert_with(|| (vec![0.0; p.value.len()], vec![0.0; p.value.len()]));
            adamw_update(c, p.value, p.grad, m, v)?;
        }
        Ok(())
    }

    /// One step at learning rate `lr` over every parameter of a store at once: `params` and
    /// `grads` are flat buffers of `layout` (from [`ParamStore::flat_mut`](attn_core::ParamStore::flat_mut)
    /// and [`Grads::flat`](attn_core::Grads::flat)). The moments are flat buffers of the same
    /// layout, made at the first flat step from the moments restored by name (a parameter
    /// without any starts at zero; a name the layout lacks, or another size, is an error naming
    /// it). Every parameter is updated, as PyTorch updates every parameter whose gradient is a
    /// tensor (`zero_grad(set_to_none=False)`).
    pub fn step_flat(&mut self, layout: &Arc<ParamLayout>, params: &mut [f32], grads: &[f32], lr: f32) -> Result<()> {
        for (what, len) in [("params", params.len()), ("grads", grads.len())] {
            if len != layout.len() {
                return Err(NnError::ShapeMismatch {
                    op: "AdamW::step_flat",
                    tensor: what.into(),
                    expected: format!("{} floats, as the layout", layout.len()),
                    got: vec![len],
                });
            }
        }
        self.make_flat(layout)?;
        let c = self.next_step(lr)?;
        let Moments::Flat { m, v, .. } = &mut self.moments else {
            unreachable!("made flat above")
        };
        adamw_chunks(c, params, grads, m, v)
    }

    /// One step over every parameter of `module`, which `store` adopted, from gradients made
    /// for that store ([`Grads::for_store`]): [`AdamW::step_flat`] over the flat buffers, the
    /// parameters' bound by [`ParamStore::flat_mut`]. Gradients of another store (or by name)
    /// and a module the store does not hold are errors.
    pub fn update<M: Parameters + ?Sized>(
        &mut self,
        store: &ParamStore,
        module: &mut M,
        grads: &Grads,
        lr: f32,
    ) -> Result<()> {
        let (layout, g) = flat_grads(store, grads)?;
        let params = store.flat_mut(module)?;
        self.step_flat(layout, params, g, lr)
    }

    /// [`AdamW::update`] tensor by tensor, through [`Parameters::update_params`]: the same
    /// bits (the update is element by element), and a module holding packed copies of its
    /// weights (bf16) packs each again right after its update, while the new values are in
    /// cache, instead of dropping them. For mixed-precision training
    /// ([`Seq2Seq::update`](crate::Seq2Seq::update) in bf16): packing every weight after a
    /// whole-buffer pass read it back from memory.
    ///
    /// `module` must be the module `store` adopted, holding each of its tensors in place. The
    /// check is made tensor by tensor as the update reaches it ([`ParamStore::flat_mut`]'s
    /// check would visit the tensors mutably, which drops the packed copies): a tensor out of
    /// place is an error naming it, after the tensors before it were updated and before any
    /// after it is; the step is not counted.
    pub fn update_each<M: Parameters + ?Sized>(
        &mut self,
        store: &ParamStore,
        module: &mut M,
        grads: &Grads,
        lr: f32,
    ) -> Result<()> {
        let (layout, g) = flat_grads(store, grads)?;
        self.make_flat(layout)?;
        // The step is counted once every tensor has been updated.
        let c = self.constants(self.step + 1, lr)?;
        let Moments::Flat { m, v, .. } = &mut self.moments else {
            unreachable!("made flat above")
        };
        let entries = layout.entries();
        let (mut seen, mut failed) = (0usize, None);
        module.update_params(&ParamPath::Root(""), &mut |path, t| {
            let expected = entries.get(seen).map(|e| &e.range);
            seen += 1;
            if failed.is_some() {
                return;
            }
            let Some(r) = store.range_of(t).filter(|r| Some(r) == expected) else {
                failed = Some(out_of_place(path.to_string()));
                return;
            };
            if let Err(e) = adamw_chunks(c, t.data_mut(), &g[r.clone()], &mut m[r.clone()], &mut v[r]) {
                failed = Some(e);
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None if seen != entries.len() => Err(invalid(
                "module",
                format!("a module of {seen} parameters"),
                format!("the module the store adopted ({} parameters)", entries.len()),
            )),
            None => {
                self.step += 1;
                Ok(())
            }
        }
    }

    /// Moments in `layout`'s flat buffers: moved there from those kept by name.
    fn make_flat(&mut self, layout: &Arc<ParamLayout>) -> Result<()> {
        let by_name = match &mut self.moments {
            Moments::Flat { layout: have, .. } if Arc::ptr_eq(have, layout) || have == layout => return Ok(()),
            Moments::Flat { .. } => {
                return Err(invalid(
                    "layout",
                    "the layout of another store",
                    "the layout this optimizer stepped before",
                ))
            }
            Moments::ByName(map) => std::mem::take(map),
        };
        let (mut m, mut v) = (AlignedBuf::zeros(layout.len()), AlignedBuf::zeros(layout.len()));
        for (name, (mm, vv)) in &by_name {
            let Some(e) = layout.entry(name) else {
                return Err(invalid("moments", name, "a parameter of the model"));
            };
            if mm.len() != e.range.len() {
                return Err(NnError::ShapeMismatch {
                    op: "AdamW::step_flat",
                    tensor: format!("moments of {name}"),
                    expected: format!("{} values, as the parameter", e.range.len()),
                    got: vec![mm.len()],
                });
            }
            m[e.range.clone()].copy_from_slice(mm);
            v[e.range.clone()].copy_from_slice(vv);
        }
        self.moments = Moments::Flat {
            layout: Arc::clone(layout),
            m,
            v,
        };
        Ok(())
    }
}

/// The flat gradients of `grads` and their layout, or an error unless they were made for
/// `store`.
fn flat_grads<'g>(store: &ParamStore, grads: &'g Grads) -> Result<(&'g Arc<ParamLayout>, &'g [f32])> {
    match grads.flat() {
        Some(flat) if grads.is_for(store) => Ok(flat),
        _ => Err(invalid(
            "grads",
            "gradients of another layout",
            "gradients made for the store (Grads::for_store)",
        )),
    }
}

/// The error of a tensor the store did not put where the module holds it.
fn out_of_place(name: String) -> NnError {
    invalid(
        "parameter store",
        format!("`{name}` is not where the store put it"),
        "the module the store adopted, holding each of its tensors",
    )
}

/// [`adamw_update`] over matching [`FLAT_CHUNK`]-float chunks of the four buffers on rayon's
/// threads (the same bits on any thread count: the update is element by element).
fn adamw_chunks(c: AdamWStep, x: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
    x.par_chunks_mut(FLAT_CHUNK)
        .zip(g.par_chunks(FLAT_CHUNK))
        .zip(m.par_chunks_mut(FLAT_CHUNK))
        .zip(v.par_chunks_mut(FLAT_CHUNK))
        .try_for_each(|(((x, g), m), v)| adamw_update(c, x, g, m, v))?;
    Ok(())
}

/// A learning-rate schedule: `lr(step) = base · factor(step)` for the 1-based step about to be
/// taken, as `torch.optim.lr_scheduler.LambdaLR(opt, lambda e: factor(e + 1))`.
///
/// ```
/// use attn_nn::Schedule;
/// let cosine = Schedule::Cosine { warmup: 10, total: 110, min_factor: 0.0 };
/// assert_eq!(cosine.factor(5), 0.5); // half-way through the warm-up
/// assert_eq!(cosine.factor(10), 1.0);
/// assert!(cosine.factor(60) < 0.51 && cosine.factor(60) > 0.49); // half-way down
/// assert_eq!(cosine.factor(500), 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// 1 after a linear warm-up: `min(1, step / warmup)`.
    Constant {
        /// Steps of linear warm-up (0: none).
        warmup: u64,
    },
    /// "Attention Is All You Need": `d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)`.
    Noam {
        /// The model width.
        d_model: usize,
        /// Steps of warm-up (at least 1).
        warmup: u64,
    },
    /// Linear warm-up, then a half cosine from 1 down to `min_factor` at `total` steps.
    Cosine {
        /// Steps of linear warm-up.
        warmup: u64,
        /// The step where the cosine ends (held at `min_factor` after).
        total: u64,
        /// The final factor.
        min_factor: f32,
    },
}

impl Schedule {
    /// The factor at 1-based `step`.
    pub fn factor(self, step: u64) -> f32 {
        let s = step.max(1) as f64;
        let f = match self {
            Schedule::Constant { warmup } => {
                if warmup == 0 {
                    1.0
                } else {
                    (s / warmup as f64).min(1.0)
                }
            }
            Schedule::Noam { d_model, warmup } => {
                (d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * (warmup.max(1) as f64).powf(-1.5))
            }
            Schedule::Cosine {
                warmup,
                total,
                min_factor,
            } => {
                if step <= warmup && warmup > 0 {
                    s / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let progress = ((s - warmup as f64) / span).clamp(0.0, 1.0);
                    let min = min_factor as f64;
                    min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        };
        f as f32
    }
}
