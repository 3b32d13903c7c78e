//! `sdpa` with padded keys against attention written out naively, in f64.
use attn_core::prelude::*;

fn main() -> Result<(), AttnError> {
    let (b, h, s, d) = (2, 4, 6, 8);
    let x: Vec<f32> = (0..b * h * s * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let lengths = [6, 4]; // the second sequence's last two keys are padding
    let view = View4::contiguous(&x, [b, h, s, d])?;
    let options = SdpaOptions::default().key_padding(KeyPadding::Lengths(&lengths));
    let got = sdpa(view, view, view, &options, Par::Rayon)?.output;
    let row = |bh: usize, i: usize| x[(bh * s + i) * d..][..d].iter().map(|&v| v as f64);
    let mut worst = 0.0f64;
    for (bh, i) in (0..b * h).flat_map(|bh| (0..s).map(move |i| (bh, i))) {
        let keys = 0..lengths[bh / h];
        let dot = |j: usize| row(bh, i).zip(row(bh, j)).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt();
        let w: Vec<f64> = keys.clone().map(|j| dot(j).exp()).collect();
        for (c, got) in got[(bh * s + i) * d..][..d].iter().enumerate() {
            let want = keys.clone().map(|j| w[j] * x[(bh * s + j) * d + c] as f64).sum::<f64>() / w.iter().sum::<f64>();
            worst = worst.max((*got as f64 - want).abs());
        }
    }
    println!("sdpa against the naive f64 formula: largest difference {worst:.1e}");
    assert!(worst < 1e-5);
    Ok(())
}
