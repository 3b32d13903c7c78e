//! `MhaConfig` (the constructor arguments) and the widths it resolves to.

use serde::{Deserialize, Serialize};

use crate::{AttnError, Result, Rope};

/// Configuration of [`MultiHeadAttention`](crate::MultiHeadAttention): `nn.MultiheadAttention`'s constructor arguments
/// with PyTorch's names and defaults, plus attn's extensions (`num_kv_heads`, `rope`, `alibi`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MhaConfig {
    /// E, the model dim.
    pub embed_dim: usize,
    /// H, query heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// G, key/value heads (grouped-query attention); must divide `num_heads`. Default `num_heads`.
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    /// Biases on the input and output projections.
    #[serde(default = "yes")]
    pub bias: bool,
    /// Learned key and value rows appended to every key and value sequence.
    #[serde(default)]
    pub add_bias_kv: bool,
    /// A zero key and value appended to every sequence (after `add_bias_kv`).
    #[serde(default)]
    pub add_zero_attn: bool,
    /// Width of the keys; default `embed_dim`.
    #[serde(default)]
    pub kdim: Option<usize>,
    /// Width of the values; default `embed_dim`.
    #[serde(default)]
    pub vdim: Option<usize>,
    /// Dropout probability: accepted for compatibility, ignored (inference).
    #[serde(default)]
    pub dropout: f64,
    /// Layout of inputs and outputs at the module's boundary (`batch_first` in PyTorch): every
    /// [`Sequence`](crate::Sequence) given to the module must be laid out so
    /// ([`Layout::from_batch_first`](crate::Layout::from_batch_first)), or
    /// the call fails; `B = 1` and `L = 1` are accepted either way (the bytes are the same).
    #[serde(default)]
    pub batch_first: bool,
    /// Rotary position embeddings on queries and keys.
    #[serde(default)]
    pub rope: Option<Rope>,
    /// ALiBi distance penalties with the standard slopes.
    #[serde(default)]
    pub alibi: bool,
}

pub(super) fn yes() -> bool {
    true
}

impl MhaConfig {
    /// `embed_dim` and `num_heads` with every other field at PyTorch's default, except
    /// `batch_first`, which is `true`: inputs built with [`Sequence::batch_first`](crate::Sequence::batch_first),
    /// the layout attn's models use. (A configuration read from JSON without the field gets
    /// PyTorch's `false`, as `nn.MultiheadAttention` does.)
    pub fn new(embed_dim: usize, num_heads: usize) -> Self {
        MhaConfig {
            embed_dim,
            num_heads,
            num_kv_heads: None,
            bias: true,
            add_bias_kv: false,
            add_zero_attn: false,
            kdim: None,
            vdim: None,
            dropout: 0.0,
            batch_first: true,
            rope: None,
            alibi: false,
        }
    }

    /// Checks every field against its domain, naming the field (`num_heads` must divide
    /// `embed_dim`, and so on). Loading weights checks this first.
    pub fn validate(&self) -> Result<()> {
        self.dims().map(drop)
    }

    pub(super) fn dims(&self) -> Result<Dims> {
        let invalid = |field: &'static str, got: String, expected: &str| AttnError::InvalidConfig {
            field,
            got,
            expected: expected.to_string(),
        };
        let (e, h) = (self.embed_dim, self.num_heads);
        if e == 0 {
            return Err(invalid("embed_dim", e.to_string(), "at least 1"));
        }
        if h == 0 || e % h != 0 {
            return Err(invalid(
                "num_heads",
                h.to_string(),
                &format!("a divisor of embed_dim = {e}"),
            ));
        }
        let g = self.num_kv_heads.unwrap_or(h);
        if g == 0 || h % g != 0 {
            return Err(invalid(
                "num_kv_heads",
                g.to_string(),
                &format!("a divisor of num_heads = {h}"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", self.dropout.to_string(), "a probability in [0, 1)"));
        }
        let kdim = self.kdim.unwrap_or(e);
        let vdim = self.vdim.unwrap_or(e);
        if kdim == 0 || vdim == 0 {
            return Err(invalid("kdim", format!("{kdim} (vdim {vdim})"), "at least 1"));
        }
        let d = e / h;
        if self.rope.is_some() && d % 2 != 0 {
            return Err(invalid(
                "rope",
                format!("head dim {d}"),
                "an even head dim (embed_dim / num_heads)",
            ));
        }
        if self.rope.is_some() && (self.add_bias_kv || self.add_zero_attn) {
            return Err(invalid(
                "rope",
                "set with add_bias_kv or add_zero_attn".into(),
                "rope without appended key rows",
            ));
        }
        Ok(Dims {
            e,
            kdim,
            vdim,
            h,
            g,
            d,
            dv: d,
            out: Some(e),
        })
    }
}

/// Resolved widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    /// Query input width.
    pub(super) e: usize,
    pub(super) kdim: usize,
    pub(super) vdim: usize,
    pub(super) h: usize,
    pub(super) g: usize,
    pub(super) d: usize,
    pub(super) dv: usize,
    /// Output projection width (`None`: no output projection, single-head `Attention`).
    pub(super) out: Option<usize>,
}

impl Dims {
    pub(super) fn q_width(&self) -> usize {
        self.h * self.d
    }
    pub(super) fn k_width(&self) -> usize {
        self.g * self.d
    }
    pub(super) fn v_width(&self) -> usize {
        self.g * self.dv
    }
    /// Whether Q, K and V share one input width, so one fused weight serves all three.
    pub(super) fn fused(&self) -> bool {
        self.kdim == self.e && self.vdim == self.e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RopeStyle;

    /// Every field out of its domain is refused by `validate`, naming the field, without a
    /// division by zero on the way.
    #[test]
    fn validate_names_the_field_out_of_its_domain() {
        let rope = Some(Rope {
            style: RopeStyle::HalfRotation,
            base: 10_000.0,
        });
        type Change = Box<dyn Fn(&mut MhaConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("embed_dim", Box::new(|c| c.embed_dim = 0)),
            ("num_heads", Box::new(|c| c.num_heads = 0)),
            ("num_heads", Box::new(|c| c.num_heads = 3)),
            ("num_kv_heads", Box::new(|c| c.num_kv_heads = Some(0))),
            ("num_kv_heads", Box::new(|c| c.num_kv_heads = Some(3))),
            ("dropout", Box::new(|c| c.dropout = 1.0)),
            ("kdim", Box::new(|c| c.kdim = Some(0))),
            ("kdim", Box::new(|c| c.vdim = Some(0))),
            ("rope", Box::new(move |c| (c.num_heads, c.rope) = (8, rope))),
            ("rope", Box::new(move |c| (c.add_bias_kv, c.rope) = (true, rope))),
            ("rope", Box::new(move |c| (c.add_zero_attn, c.rope) = (true, rope))),
        ];
        for (field, change) in cases {
            let mut config = MhaConfig::new(8, 4);
            assert!(config.validate().is_ok());
            change(&mut config);
            match config.validate() {
                Err(AttnError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{config:?}"),
                other => panic!("{config:?}: {other:?}"),
            }
        }
        let mut rope_ok = MhaConfig::new(8, 2);
        (rope_ok.rope, rope_ok.num_kv_heads) = (rope, Some(1));
        assert!(rope_ok.validate().is_ok());
    }

    /// One fused weight only when both key and value widths are the query's.
    #[test]
    fn fused_needs_both_widths_equal_to_the_query_width() {
        for (kdim, vdim, fused) in [(None, None, true), (Some(6), None, false), (None, Some(6), false)] {
            let mut config = MhaConfig::new(8, 2);
            (config.kdim, config.vdim) = (kdim, vdim);
            assert_eq!(config.dims().unwrap().fused(), fused, "{kdim:?} {vdim:?}");
        }
    }
}
