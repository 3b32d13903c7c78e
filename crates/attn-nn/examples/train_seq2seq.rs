//! Trains a small Seq2Seq to reverse strings, then saves it where `attn translate --model` reads
//! it (and PyTorch, through the contract's model): the path given, or `reverse.safetensors`.
use attn_nn::prelude::*;

fn main() -> Result<(), NnError> {
    let words = [
        "abc", "bca", "cab", "acb", "bac", "cba", "aab", "bba", "abb", "baa", "ccb", "bcc",
    ];
    let reversed: Vec<String> = words.iter().map(|w| w.chars().rev().collect()).collect();
    let pairs: Vec<(&str, &str)> = words.iter().zip(&reversed).map(|(s, t)| (*s, t.as_str())).collect();
    let mut model = Seq2Seq::with_seed(Seq2SeqConfig::for_pairs(&pairs), 0)?; // attn train's defaults
    let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0)?, model.grads());
    for number in 1..=200 {
        let step = model.train_step(&pairs, &TrainStep::at(number), &mut adam, &mut grads, 1e-3)?;
        if number % 50 == 0 {
            println!("step {number}: loss {:.4}", step.loss);
        }
    }
    let path = std::env::args().nth(1).unwrap_or_else(|| "reverse.safetensors".into());
    model.save(path.as_ref())?;
    let tokens = &model.greedy(&["abc"], 8, false, Par::Rayon)?[0].tokens;
    let out = model.config().tgt_vocab.decode(tokens);
    println!("abc -> {out}; saved to {path}");
    assert_eq!(out, "cba");
    Ok(())
}
