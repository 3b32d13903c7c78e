//! Sentence embeddings from text with all-MiniLM-L6-v2 (`default_model_dir`), and their cosine
//! similarities.
use attn_nn::prelude::*;

fn main() -> Result<(), NnError> {
    let embedder = TextEmbedder::default_model()?;
    let texts = [
        "a cat sat on the mat",
        "a kitten rested on a rug",
        "the stock market fell today",
    ];
    let e = embedder.embed(&texts)?;
    println!("{} sentences, {} dimensions", e.len(), e.dim);
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            println!("{:.3}  {:?} / {:?}", e.cosine(i, j), texts[i], texts[j]);
        }
    }
    assert!(e.cosine(0, 1) > e.cosine(0, 2));
    Ok(())
}
