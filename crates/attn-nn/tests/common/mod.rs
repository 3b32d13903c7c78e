//! Helpers shared by the attn-nn integration tests.

/// `n` values in `[-scale, scale)` from the workspace's one generator.
#[allow(dead_code)]
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut values = attn_core::kernels::testing::random_vec(n, seed);
    values.iter_mut().for_each(|x| *x *= scale);
    values
}

/// A safetensors file of `tensors` stored as 16-bit floats of `dtype` (`F16` or `BF16`), each
/// value converted by `bits`, with `metadata`.
#[allow(dead_code)]
pub fn half_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a attn_core::Tensor)>,
    dtype: safetensors::Dtype,
    bits: fn(f32) -> u16,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Vec<u8> {
    use safetensors::tensor::TensorView;
    let halves: Vec<(&str, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let bytes = t.data().iter().flat_map(|&x| bits(x).to_le_bytes()).collect();
            (name.as_str(), t.shape().to_vec(), bytes)
        })
        .collect();
    let views = halves
        .iter()
        .map(|(name, shape, bytes)| (*name, TensorView::new(dtype, shape.clone(), bytes).unwrap()));
    safetensors::serialize(views, metadata).unwrap()
}
