"""Reference sentence embeddings of all-MiniLM-L6-v2 from sentence-transformers.

Writes `sentences.txt` (one sentence per line) and `reference.safetensors` (`embeddings`
[N, 384]) for `crates/attn-cli/tests/embed_cli.rs`. Needs `sentence-transformers` and the model
folder (`cargo xtask fetch-model`, or ATTN_MODEL_DIR). Run by `cargo xtask codegen`.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
import torch  # noqa: E402

LONG = " ".join(f"word{i} and the quick brown fox number {i} jumps over the lazy dog." for i in range(60))
MEDIUM = ("Attention weighs every position of the input when producing each output, " * 12).strip()

SENTENCES = [
    "",
    "a",
    "Hello world",
    "The cat sat on the mat.",
    "A man is playing a guitar on the stage.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs are running through a grassy field.",
    "The stock market fell sharply after the announcement.",
    "Quantum computers may break today's public-key cryptography.",
    "How do I reset my password?",
    "What's the weather like in Paris tomorrow?",
    "I can't believe it's not butter!!!",
    "Wait... what?! No way — that's impossible.",
    "e-mail: someone@example.com, phone: +1 (555) 123-4567",
    "https://www.example.org/path?query=value&other=1#fragment",
    "fn main() { println!(\"hello\"); }",
    "SELECT * FROM users WHERE id = 42;",
    "3.14159 is approximately pi, and 2.71828 is e.",
    "In 1969, Apollo 11 landed on the Moon.",
    "COVID-19 vaccines were developed in record time.",
    "The mitochondria is the powerhouse of the cell.",
    "Rust's borrow checker prevents data races at compile time.",
    "PyTorch and TensorFlow are popular deep learning frameworks.",
    "She sells sea shells by the sea shore.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
    "Colorless green ideas sleep furiously.",
    "The the the the the the the the.",
    "!!!???...,,,;;;:::",
    "😀 😃 😄 😁 emoji are fun 🎉",
    "Le chat est assis sur le tapis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Il gatto dorme sul divano.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "我喜欢学习机器学习和自然语言处理。",
    "東京は日本の首都です。",
    "서울은 한국의 수도입니다.",
    "القطة تجلس على السجادة.",
    "यह एक परीक्षण वाक्य है।",
    "Ελληνικά: η γρήγορη καφέ αλεπού.",
    "naïve café résumé coöperate façade",
    "MixedCASE WoRdS in a SeNtEnCe",
    "   leading and trailing spaces   ",
    "tab\tseparated\tvalues",
    "A sentence with a very long wordthatisnotinthevocabularyatallreallyreallylong.",
    "Supercalifragilisticexpialidocious is a long word.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The transformer architecture relies entirely on self-attention.",
    "Encoder layers apply self-attention followed by a feed-forward network.",
    "Layer normalization stabilizes the training of deep networks.",
    "Cosine similarity measures the angle between two vectors.",
    "Sentence embeddings map text to points in a vector space.",
    "I love this movie; it was fantastic.",
    "I hated this movie; it was terrible.",
    "The service at the restaurant was slow but friendly.",
    "Please turn off the lights when you leave the room.",
    "He said: \"I'll be back\" — and left.",
    "[CLS] [SEP] [PAD] [MASK] [UNK] special tokens as text",
    MEDIUM,
    LONG,
]


def main():
    out_dir = Path(sys.argv[1])
    model_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SENTENCES:
        assert "\n" not in s
    model = SentenceTransformer(str(model_dir), device="cpu")
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=16, convert_to_tensor=True, normalize_embeddings=False)
    (out_dir / "sentences.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    save_file({"embeddings": emb.float().contiguous()}, str(out_dir / "reference.safetensors"))
    lengths = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    print(f"wrote {len(SENTENCES)} reference embeddings (max tokens before truncation {max(lengths)}, "
          f"max_seq_length {model.max_seq_length})")


if __name__ == "__main__":
    main()
