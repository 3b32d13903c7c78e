//! The masks of one call, resolved to the kernel's terms by PyTorch's rules.
//!
//! Masks are views of the caller's data; only when key rows were appended (`add_bias_kv`,
//! `add_zero_attn`) is a mask copied, one allowed column wider per appended row, as PyTorch pads
//! it. The kernel options themselves come from the one resolver every caller shares,
//! [`SdpaOptions::to_kernel`].
//!
//! `is_causal` is PyTorch's hint that `attn_mask` is the causal mask, and which of the two
//! governs follows `F.multi_head_attention_forward`:
//! - no key padding and no weights asked for (PyTorch's SDPA branch): the causal mask over all
//!   keys, appended ones included (top-left aligned), and `attn_mask` is not read;
//! - otherwise (PyTorch's explicit-softmax branch, or key padding): `attn_mask`, padded with
//!   allowed columns, and the flag is not read.
//!
//! For a causal `attn_mask` the two agree unless rows were appended: then the first hides them
//! from the queries before them, the second shows them to every query. Without `attn_mask`
//! (which PyTorch requires; attn accepts) the flag stands for the causal mask `[S, T]`.

use std::borrow::Cow;

use attn_kernels::{AttentionOptions, Causal};

use super::{MhaOptions, NeedWeights};
use crate::error::shape_error;
use crate::{AttnError, BoolMeaning, KeyPadding, Result, ScoreMask, SdpaOptions};

/// A mask's elements: the caller's, or a padded copy.
enum Elements<'a> {
    None,
    Bool(Cow<'a, [bool]>, BoolMeaning),
    Additive(Cow<'a, [f32]>),
}

/// The masks of one call in the shapes the shared resolver broadcasts: `attn_mask` as `[S, T]`
/// or `[B, H, S, T]`, key padding as `[B, T]` or lengths.
pub(super) struct MaskSet<'a> {
    target: [usize; 4],
    mask: Elements<'a>,
    mask_shape: Vec<usize>,
    padding: Elements<'a>,
    lengths: Option<&'a [usize]>,
    causal: Causal,
}

/// `data` of `rows` rows of `t_real` columns, each row followed by `t - t_real` copies of `fill`.
fn pad_columns<T: Copy>(data: &[T], rows: usize, t_real: usize, t: usize, fill: T) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * t);
    for row in data.chunks_exact(t_real.max(1)).take(rows) {
        out.extend_from_slice(&row[..t_real]);
        out.resize(out.len() + t - t_real, fill);
    }
    out.resize(rows * t, fill);
    out
}

/// `Cow::Borrowed(data)` when nothing was appended, else the padded copy.
fn widen<T: Copy>(data: &[T], rows: usize, t_real: usize, t: usize, fill: T) -> Cow<'_, [T]> {
    if t == t_real {
        Cow::Borrowed(data)
    } else {
        Cow::Owned(pad_columns(data, rows, t_real, t, fill))
    }
}

impl<'a> MaskSet<'a> {
    /// Scores are `target = [B, H, S, T]`, of which the last `extra` keys were appended after
    /// the caller's `T - extra`. `decoding`: the queries are the last positions of a cached
    /// sequence (bottom-right causal).
    pub(super) fn new(options: &MhaOptions<'a>, target: [usize; 4], extra: usize, decoding: bool) -> Result<Self> {
        let op = "multihead_attention";
        let [b, h, s, t] = target;
        let t_real = t - extra;
        let mut set = MaskSet {
            target,
            mask: Elements::None,
            mask_shape: Vec::new(),
            padding: Elements::None,
            lengths: None,
            causal: Causal::None,
        };

        // attn_mask: `[S, T]` or `[B·H, S, T]` (read as `[B, H, S, T]`).
        let rows = match options.attn_mask {
            ScoreMask::None => 0,
            ScoreMask::Bool { shape, .. } | ScoreMask::Additive { shape, .. } => {
                let (rows, full) = match *shape {
                    [ms, mt] if [ms, mt] == [s, t_real] => (s, vec![s, t]),
                    [mb, ms, mt] if [mb, ms, mt] == [b * h, s, t_real] => (b * h * s, vec![b, h, s, t]),
                    _ => {
                        return Err(shape_error(
                            op,
                            "attn_mask",
                            format!("[S, T] = [{s}, {t_real}] or [B·H, S, T] = [{}, {s}, {t_real}]", b * h),
                            shape,
                        ))
                    }
                };
                set.mask_shape = full;
                rows
            }
        };
        let sdpa_causal = options.is_causal
            && matches!(options.key_padding, KeyPadding::None)
            && options.need_weights == NeedWeights::No;
        // When decoding, masks refer to the cached positions and the causal mask is implied.
        let read_mask = decoding || !sdpa_causal;
        match options.attn_mask {
            ScoreMask::None => {}
            ScoreMask::Bool { data, shape, meaning } => {
                check_len("attn_mask", shape, data.len())?;
                if read_mask {
                    let allowed = meaning == BoolMeaning::MayAttend;
                    set.mask = Elements::Bool(widen(data, rows, t_real, t, allowed), meaning);
                }
            }
            ScoreMask::Additive { data, shape } => {
                check_len("attn_mask", shape, data.len())?;
                if read_mask {
                    set.mask = Elements::Additive(widen(data, rows, t_real, t, 0.0));
                }
            }
        }
        let no_mask = matches!(options.attn_mask, ScoreMask::None);
        if decoding {
            // The new queries are the last positions of the cached sequence.
            set.causal = Causal::BottomRight;
        } else if sdpa_causal || (options.is_causal && no_mask && extra == 0) {
            set.causal = Causal::TopLeft;
        } else if options.is_causal && no_mask {
            // The causal mask `[S, T_real]`, padded: appended keys stay visible to every query.
            let causal: Vec<bool> = (0..s * t).map(|i| i % t < t_real && i % t > i / t).collect();
            set.mask = Elements::Bool(Cow::Owned(causal), BoolMeaning::MaskedOut);
            set.mask_shape = vec![s, t];
        }

        let padding_len = |len: usize| {
            if len != b * t_real {
                return Err(shape_error(
                    op,
                    "key_padding_mask",
                    format!("[B, T] = [{b}, {t_real}]"),
                    &[len],
                ));
            }
            Ok(())
        };
        match options.key_padding {
            KeyPadding::None => {}
            KeyPadding::Lengths(lengths) => {
                if lengths.len() != b {
                    return Err(shape_error(op, "key_lengths", format!("[B] = [{b}]"), &[lengths.len()]));
                }
                if let Some(&bad) = lengths.iter().find(|&&l| l > t_real) {
                    return Err(AttnError::InvalidConfig {
                        field: "key_lengths",
                        got: bad.to_string(),
                        expected: format!("at most T = {t_real}"),
                    });
                }
                if extra == 0 {
                    set.lengths = Some(lengths);
                } else {
                    // Appended keys come after the padding, so lengths become a mask.
                    let masked: Vec<bool> = (0..b * t)
                        .map(|i| (lengths[i / t]..t_real).contains(&(i % t)))
                        .collect();
                    set.padding = Elements::Bool(Cow::Owned(masked), BoolMeaning::MaskedOut);
                }
            }
            KeyPadding::Bool { data, meaning } => {
                padding_len(data.len())?;
                let allowed = meaning == BoolMeaning::MayAttend;
                set.padding = Elements::Bool(widen(data, b, t_real, t, allowed), meaning);
            }
            KeyPadding::Additive(data) => {
                padding_len(data.len())?;
                set.padding = Elements::Additive(widen(data, b, t_real, t, 0.0));
            }
        }
        Ok(set)
    }

    /// The kernel options, through the resolver that `sdpa` uses.
    pub(super) fn options<'s>(&'s self, alibi: Option<&'s [f32]>) -> Result<AttentionOptions<'s>> {
        let mask = match &self.mask {
            Elements::None => ScoreMask::None,
            Elements::Bool(data, meaning) => ScoreMask::Bool {
                data,
                shape: &self.mask_shape,
                meaning: *meaning,
            },
            Elements::Additive(data) => ScoreMask::Additive {
                data,
                shape: &self.mask_shape,
            },
        };
        let key_padding = match (&self.padding, self.lengths) {
            (Elements::Bool(data, meaning), _) => KeyPadding::Bool {
                data,
                meaning: *meaning,
            },
            (Elements::Additive(data), _) => KeyPadding::Additive(data),
            (Elements::None, Some(lengths)) => KeyPadding::Lengths(lengths),
            (Elements::None, None) => KeyPadding::None,
        };
        SdpaOptions {
            scale: None,
            causal: self.causal,
            mask,
            key_padding,
            alibi_slopes: alibi,
            precision: crate::Precision::F32,
        }
        .to_kernel(self.target)
    }
}

fn check_len(name: &str, shape: &[usize], len: usize) -> Result<()> {
    let needed: usize = shape.iter().product();
    if needed != len {
        return Err(AttnError::BadTensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            needed,
            len,
        });
    }
    Ok(())
}
