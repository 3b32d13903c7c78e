//! Weights from a safetensors file (PyTorch's and Hugging Face's format): its bytes -> a
//! [`StateDict`]. No file IO here: callers read the bytes.
//!
//! F32 tensors are taken as they are; F16 and BF16 are widened to F32 exactly; F64 is rounded
//! to the nearest F32 (attn computes in F32). Other dtypes (integers, booleans) are refused by
//! name, unless the caller skips them (`embeddings.position_ids` in BERT checkpoints is an
//! integer buffer, not a weight).

use safetensors::{Dtype, SafeTensors};

use crate::{AttnError, Result, StateDict, Tensor};

/// Reading a [`StateDict`] from the bytes of a safetensors file.
///
/// ```
/// use attn_core::{FromSafetensors, StateDict};
/// # let bytes = safetensors::serialize(
/// #     [("w", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &[0u8; 8]).unwrap())],
/// #     None,
/// # ).unwrap();
/// let dict = StateDict::from_safetensors(&bytes).unwrap();
/// assert_eq!(dict["w"].shape(), &[2]);
/// ```
pub trait FromSafetensors: Sized {
    /// Every tensor of the file, as F32.
    fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        Self::from_safetensors_skipping(bytes, |_| false)
    }

    /// Every tensor whose name `skip` refuses, as F32 (skipped tensors may have any dtype).
    fn from_safetensors_skipping(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self>;
}

impl FromSafetensors for StateDict {
    fn from_safetensors_skipping(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| AttnError::Safetensors {
            what: format!("not a valid safetensors file: {e}"),
        })?;
        let mut dict = StateDict::new();
        for (name, view) in file.iter() {
            if skip(name) {
                continue;
            }
            let shape = view.shape().to_vec();
            let data =
                floats_to_f32(name, view.dtype(), &shape, view.data())?.ok_or_else(|| AttnError::Safetensors {
                    what: format!(
                        "tensor `{name}` has dtype {:?}, expected F32, F16, BF16 or F64",
                        view.dtype()
                    ),
                })?;
            dict.insert(name.to_string(), Tensor::new(name, shape, data)?);
        }
        Ok(dict)
    }
}

/// The elements of a float tensor as F32 (F16 and BF16 exactly, F64 rounded); `None` for a
/// dtype that is not a float. Fails when `bytes` does not hold `shape`'s element count.
pub fn floats_to_f32(name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<Option<Vec<f32>>> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F64 => 8,
        _ => return Ok(None),
    };
    let needed = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|c| c.checked_mul(width));
    if needed != Some(bytes.len()) {
        return Err(AttnError::Safetensors {
            what: format!(
                "tensor `{name}` of dtype {dtype:?} and shape {shape:?} has {} bytes, expected {}",
                bytes.len(),
                needed.map_or("more than fit in memory".to_string(), |n| n.to_string())
            ),
        });
    }
    let data = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
    };
    Ok(Some(data))
}

/// IEEE half precision to single, exactly (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, renormalised.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        // Every finite half value against the definition m · 2^(e - 25) (or its subnormal form).
        for h in 0u16..=u16::MAX {
            let (e, m) = ((h >> 10) & 0x1f, f64::from(h & 0x3ff));
            let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
            let want = match e {
                0 => sign * m * 2f64.powi(-24),
                0x1f => continue,
                e => sign * (1024.0 + m) * 2f64.powi(i32::from(e) - 25),
            };
            assert_eq!(f64::from(f16_to_f32(h)), want, "{h:#06x}");
        }
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn dtypes_convert_and_others_are_refused_by_name() {
        let f16 = [0x00u8, 0x3c, 0x00, 0xc0]; // 1.0, -2.0
        let bf16 = [0x80u8, 0x3f, 0x40, 0x40]; // 1.0, 3.0
        let f64s: Vec<u8> = [0.1f64, -7.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ints = [1u8, 0, 0, 0, 0, 0, 0, 0];
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(dtype, shape, data).unwrap()
        }
        let bytes = safetensors::serialize(
            [
                ("half", view(Dtype::F16, vec![2], &f16)),
                ("brain", view(Dtype::BF16, vec![2], &bf16)),
                ("double", view(Dtype::F64, vec![2], &f64s)),
                ("position_ids", view(Dtype::I64, vec![1], &ints)),
            ],
            None,
        )
        .unwrap();
        let err = StateDict::from_safetensors(&bytes).unwrap_err().to_string();
        assert!(err.contains("`position_ids`") && err.contains("I64"), "{err}");
        let dict = StateDict::from_safetensors_skipping(&bytes, |name| name == "position_ids").unwrap();
        assert_eq!(dict["half"].data(), &[1.0, -2.0]);
        assert_eq!(dict["brain"].data(), &[1.0, 3.0]);
        assert_eq!(dict["double"].data(), &[0.1f32, -7.0]);
        // 2^62 elements fit a usize, their 2^65 bytes do not: an error, not an overflow.
        let err = floats_to_f32("huge", Dtype::F64, &[1 << 31, 1 << 31], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`huge`") && err.contains("more than fit in memory"),
            "{err}"
        );
        let err = StateDict::from_safetensors(b"not a file").unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }
}
