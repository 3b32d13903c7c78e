//! The step context: what one training step's forward and backward share.
//!
//! A module's training forward and backward take one [`Step`] instead of a list of arguments:
//! the step's number, its dropout (probability and seed), where the work runs, the gradients the
//! backward adds into, and the module's place in the model ([`ParamPath`]). The place does two things
//! without building a string: it keys the module's dropout sites (the hash of
//! `encoder.layers.0.` + `dropout1`, so every site draws its own masks, the same on any thread
//! count and in the backward), and it names gradients kept by name and errors. A module hands
//! its submodules the same step at their own place with [`Step::at`].
//!
//! The activations' storage is not a field: it is [`kernels::arena`], a pool per thread that
//! every training forward takes its buffers from and every tape's `recycle` gives them back
//! to, so a buffer taken on a rayon worker needs no lock and a steady-state step allocates
//! nothing large.

use attn_core::kernels::{self, Par};
use attn_core::{AttnError, Grads, ParamPath};

use crate::Result;

/// Inverted dropout for training, with a counter-based generator: the mask of an element
/// depends only on `seed`, the dropout site and the element's index, so a step replays
/// exactly from its seed on any thread count, and a backward re-derives the mask instead of
/// storing it (the ReLU feed-forward block reads it off its kept output, which is zero where
/// an element was dropped). `p = 0` (the default) is no dropout.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dropout {
    /// The probability of zeroing an element.
    pub p: f32,
    /// The step's seed.
    pub seed: u64,
}

impl Dropout {
    /// No dropout.
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    /// The dropout of step `number` of a run seeded with `run_seed`: each step its own seed,
    /// `run_seed · 0x2545F4914F6CDD1D ^ number` (the derivation `attn train` has used since its
    /// first checkpoint, so resumed runs draw the same masks).
    pub fn for_step(p: f32, run_seed: u64, number: u64) -> Dropout {
        Dropout {
            p,
            seed: run_seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ number,
        }
    }

    /// The dropout of micro-batch `j` of this step: each micro-batch its own masks (micro-batch
    /// 0 keeps the step's, so a step of one micro-batch draws what it always drew).
    pub fn for_micro_batch(self, j: usize) -> Dropout {
        if j == 0 {
            return self;
        }
        Dropout {
            seed: self.seed ^ kernels::rng::SplitMix64::new(j as u64).next_u64(),
            ..self
        }
    }

    /// Applies the mask of `site` (a name unique within the model, such as
    /// `encoder.layers.0.dropout1`) to `x` in place. The backward is the same call on the
    /// gradient. Training code names its sites by place instead ([`Step::dropout`](crate::Step::dropout)),
    /// with the same masks.
    pub fn apply(&self, x: &mut [f32], site: &str, par: Par) -> Result<()> {
        self.apply_keyed(x, ParamPath::Root(site).hash_with(""), par)
    }

    /// Applies the mask of the site whose key is `site_hash` (FNV-1a of its name: each site
    /// its own stream of counters).
    pub(crate) fn apply_keyed(&self, x: &mut [f32], site_hash: u64, par: Par) -> Result<()> {
        if self.p == 0.0 {
            return Ok(());
        }
        let seed = self.seed ^ site_hash;
        kernels::dropout(x, self.p, seed, 0, par).map_err(AttnError::from)?;
        Ok(())
    }
}

/// What one training step's forward and backward share: see the module documentation.
#[derive(Debug)]
pub struct Step<'s> {
    /// The step's number in its run (1-based; 0 for a step outside a run).
    pub number: u64,
    /// Dropout's probability and this step's seed.
    pub dropout: Dropout,
    /// Where the work runs.
    pub par: Par,
    /// The module's place in the model's state dict (the root for the model itself).
    pub path: &'s ParamPath<'s>,
    /// The gradients the backward adds into.
    pub grads: &'s mut Grads,
}

impl<'s> Step<'s> {
    /// A step outside a run (number 0) of the model at the root of its state dict, with the
    /// given dropout.
    pub fn new(dropout: Dropout, par: Par, grads: &'s mut Grads) -> Self {
        Step {
            number: 0,
            dropout,
            par,
            path: &ParamPath::ROOT,
            grads,
        }
    }

    /// Step `number` (1-based) of a run seeded with `run_seed`, with dropout `p`
    /// ([`Dropout::for_step`]), of the model at the root of its state dict.
    pub fn of_run(number: u64, p: f32, run_seed: u64, par: Par, grads: &'s mut Grads) -> Self {
        Step {
            number,
            ..Step::new(Dropout::for_step(p, run_seed, number), par, grads)
        }
    }

    /// The same step for the submodule at `path` (made from `self.path`).
    pub fn at<'t>(&'t mut self, path: &'t ParamPath<'t>) -> Step<'t> {
        Step {
            number: self.number,
            dropout: self.dropout,
            par: self.par,
            path,
            grads: &mut *self.grads,
        }
    }

    /// Applies this module's dropout site `leaf` (`"dropout1"`) to `x` in place; the backward
    /// applies the same call to the gradient.
    pub fn dropout(&self, x: &mut [f32], leaf: &str) -> Result<()> {
        self.dropout.apply_keyed(x, self.path.hash_with(leaf), self.par)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds `attn train` derives (a resumed run must draw the masks it drew before),
    /// pinned to values computed outside Rust (in Python: 42 · 0x2545F4914F6CDD1D mod 2⁶⁴ ^ 7;
    /// the first output of the workspace's SplitMix64 for seed 1, whose state starts at
    /// 1 · 0x9E3779B97F4A7C15 + 1; FNV-1a of the site's name).
    #[test]
    fn dropout_seeds_are_the_documented_derivations() {
        let step = Dropout::for_step(0.5, 42, 7);
        assert_eq!(
            step,
            Dropout {
                p: 0.5,
                seed: 0x1d7a_1fd7_07dc_46c5
            }
        );
        assert_eq!(step.for_micro_batch(0), step);
        assert_eq!(step.for_micro_batch(1).seed, 0xa391_9276_6252_aaa2);
        assert_eq!(step.for_micro_batch(1).p, 0.5);
        assert_ne!(step.for_micro_batch(2).seed, step.for_micro_batch(1).seed);
        let mut grads = Grads::new();
        let run = Step::of_run(7, 0.5, 42, Par::Seq, &mut grads);
        assert_eq!((run.number, run.dropout), (7, step));

        // A site's mask: the kernel's stream at the step's seed ^ FNV-1a("encoder.layers.0.dropout1").
        let x: Vec<f32> = (1..=64).map(|i| i as f32).collect();
        let mut want = x.clone();
        kernels::dropout(&mut want, 0.5, 0x5039_8c16_a4e2_7554, 0, Par::Seq).unwrap();
        assert!(want.contains(&0.0) && want.iter().any(|&v| v != 0.0));
        let mut by_name = x.clone();
        step.apply(&mut by_name, "encoder.layers.0.dropout1", Par::Seq).unwrap();
        assert_eq!(by_name, want);
        // The same site named by place, as training code names it.
        let (root, mut grads) = (ParamPath::Root("encoder.layers.0."), Grads::new());
        let mut by_place = x.clone();
        let mut outer = Step::new(step, Par::Seq, &mut grads);
        outer.at(&root).dropout(&mut by_place, "dropout1").unwrap();
        assert_eq!(by_place, want);
        // p = 0 leaves x alone.
        let mut kept = x.clone();
        Dropout::NONE
            .apply(&mut kept, "encoder.layers.0.dropout1", Par::Seq)
            .unwrap();
        assert_eq!(kept, x);
    }
}
