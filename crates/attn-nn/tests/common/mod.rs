//! Helpers shared by the attn-nn integration tests.

/// `n` values in `[-scale, scale)` from the workspace's one generator.
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut values = attn_core::kernels::testing::random_vec(n, seed);
    values.iter_mut().for_each(|x| *x *= scale);
    values
}
