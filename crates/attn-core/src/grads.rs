//! Gradient buffers named by state-dict names.
//!
//! A backward pass **adds** into the buffer of each parameter it reads, under the parameter's
//! full state-dict name (`encoder.layers.0.self_attn.in_proj_weight`), so gradients of a
//! parameter used twice sum, micro-batches accumulate, and the optimizer and checkpoints find
//! them by the names the weights have. A buffer is created, zeroed, the first time a backward
//! adds to it; [`Grads::zero`] clears every buffer for the next step and keeps the memory.

use std::collections::BTreeMap;

use crate::{AttnError, Result, StateDict, Tensor};

/// Gradients by state-dict name.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    map: BTreeMap<String, Tensor>,
}

impl Grads {
    /// No buffers yet.
    pub fn new() -> Self {
        Grads::default()
    }

    /// Sets every buffer to zero (keeping it), as `optimizer.zero_grad(set_to_none=False)`.
    pub fn zero(&mut self) {
        for t in self.map.values_mut() {
            t.data_mut().fill(0.0);
        }
    }

    /// The gradient of `name`, if a backward has added to it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// Every buffer, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.map.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Every buffer, by name, mutably (for clipping).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.map.iter_mut().map(|(n, t)| (n.as_str(), t))
    }

    /// How many buffers there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no backward has run.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The buffers as a state dict (for saving, or for `grad.NAME` outputs).
    pub fn into_state_dict(self) -> StateDict {
        self.map
    }

    /// The buffer `name` of `shape`, created zeroed if absent; an existing buffer of another
    /// shape is an error naming it.
    pub fn slot(&mut self, name: &str, shape: &[usize]) -> Result<&mut [f32]> {
        self.ensure(name, shape)?;
        Ok(self.map.get_mut(name).expect("ensured").data_mut())
    }

    /// Two distinct buffers at once (a weight and its bias): see [`Grads::slot`].
    pub fn slot_pair(&mut self, a: (&str, &[usize]), b: (&str, &[usize])) -> Result<(&mut [f32], &mut [f32])> {
        assert_ne!(a.0, b.0, "two different buffers");
        self.ensure(a.0, a.1)?;
        self.ensure(b.0, b.1)?;
        let (mut first, mut second) = (None, None);
        for (name, t) in self.map.iter_mut() {
            if name == a.0 {
                first = Some(t.data_mut());
            } else if name == b.0 {
                second = Some(t.data_mut());
            }
        }
        Ok((first.expect("ensured"), second.expect("ensured")))
    }

    /// The buffers of a weight and, when the module has one, its bias: see [`Grads::slot`].
    pub fn weight_and_bias(
        &mut self,
        weight: (&str, &[usize]),
        bias: Option<(&str, &[usize])>,
    ) -> Result<(&mut [f32], Option<&mut [f32]>)> {
        match bias {
            Some(bias) => {
                let (w, b) = self.slot_pair(weight, bias)?;
                Ok((w, Some(b)))
            }
            None => Ok((self.slot(weight.0, weight.1)?, None)),
        }
    }

    fn ensure(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        match self.map.get(name) {
            Some(t) if t.shape() != shape => Err(AttnError::ShapeMismatch {
                op: "backward",
                tensor: format!("gradient of {name}"),
                expected: format!("{shape:?}"),
                got: t.shape().to_vec(),
            }),
            Some(_) => Ok(()),
            None => {
                self.map.insert(name.to_string(), Tensor::zeros(shape.to_vec()));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_created_zeroed_and_keep_what_is_added() {
        let mut g = Grads::new();
        g.slot("w", &[2, 2]).unwrap()[3] += 1.5;
        g.slot("w", &[2, 2]).unwrap()[3] += 1.0;
        assert_eq!(g.get("w").unwrap().data(), &[0.0, 0.0, 0.0, 2.5]);
        let (w, b) = g.slot_pair(("w", &[2, 2]), ("b", &[2])).unwrap();
        w[0] = 1.0;
        b[1] = 2.0;
        assert_eq!(g.get("b").unwrap().data(), &[0.0, 2.0]);
        assert!(matches!(g.slot("w", &[4]), Err(AttnError::ShapeMismatch { .. })));
        g.zero();
        assert!(g.iter().all(|(_, t)| t.data().iter().all(|&x| x == 0.0)));
        assert_eq!(g.len(), 2);
    }
}
