"""Interleaved comparison of `attn bench sdpa` with PyTorch's scaled_dot_product_attention.

For each shape, alternates rounds: one `attn bench sdpa --json` run (a fresh process, its own
median over >= 0.5 s), then PyTorch timed the same way in this process; repeats ROUNDS times and
reports the median of each side's medians and their ratio. Run by `cargo xtask bench`.

With --bf16, attn runs `--dtype bf16` and PyTorch gets bf16 tensors (its bf16 SDPA); attn's f32
is timed in the same rounds too, for the bf16 / f32 ratio. The decoding shape (at most 8 query
rows per key/value head) holds K and V as bf16 bits on attn's side as well (`--kv-dtype bf16`,
a bf16 KV cache); the prefill shapes give attn f32 K and V, rounded inside its timing (the main
columns), and in the same rounds K and V as bf16 bits, as PyTorch's are (the last two columns;
attn's queries stay f32).

`--only-decode` times the decoding shape alone. `--ragged` times RAGGED_SHAPES instead: lengths
that are not multiples of 16, as the packed sequences of training and `attn embed` have (row
tails at every vector width).

Usage: python bench_compare.py ATTN_BINARY THREADS ROUNDS [--json] [--bf16] [--only-decode | --ragged]
"""

import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    # (B, H, G, S, T, D, causal)
    (1, 8, 8, 512, 512, 64, False),
    (1, 8, 8, 2048, 2048, 64, False),
    (1, 8, 8, 2048, 2048, 64, True),
    (4, 12, 12, 128, 128, 64, False),
    (1, 16, 16, 4096, 4096, 128, True),
    (1, 32, 8, 1, 4096, 128, False),
]

RAGGED_SHAPES = [
    # The date translator's attention at d_model 128 (4 heads of 32; sources of about 24
    # characters, targets of 12, causal), MiniLM's (12 heads of 32, 36 tokens), and two more.
    (64, 4, 4, 24, 24, 32, False),
    (64, 4, 4, 12, 12, 32, True),
    (32, 12, 12, 36, 36, 32, False),
    (4, 12, 12, 100, 100, 64, False),
    (1, 8, 8, 1000, 1000, 64, True),
]


def flops(b, h, s, t, d, causal):
    f = 4.0 * b * h * s * t * d
    return f / 2 if causal and s == t else f


def time_torch(b, h, g, s, t, d, causal, dtype=torch.float32, min_seconds=0.5, min_runs=5):
    gen = torch.Generator().manual_seed(0)
    q = (torch.rand(b, h, s, d, generator=gen) * 2 - 1).to(dtype)
    k = (torch.rand(b, g, t, d, generator=gen) * 2 - 1).to(dtype)
    v = (torch.rand(b, g, t, d, generator=gen) * 2 - 1).to(dtype)
    kwargs = {"is_causal": causal}
    if g != h:
        kwargs["enable_gqa"] = True
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v, **kwargs)
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 1000):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, **kwargs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decodes(h, g, s):
    return s * h // g <= 8


def time_attn(binary, threads, b, h, g, s, t, d, causal, dtype="f32", kv_bits=False):
    cmd = [binary, "bench", "sdpa", "--batch", str(b), "--heads", str(h), "--kv-heads", str(g), "--seq", str(s),
           "--kv-seq", str(t), "--head-dim", str(d), "--threads", str(threads), "--min-seconds", "0.5", "--json",
           "--dtype", dtype]
    if dtype == "bf16" and (kv_bits or decodes(h, g, s)):
        cmd += ["--kv-dtype", "bf16"]
    if causal:
        cmd.append("--causal")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    as_json = "--json" in sys.argv
    bf16 = "--bf16" in sys.argv
    torch.set_num_threads(threads)
    rows = []
    shapes = [x for x in SHAPES if decodes(x[1], x[2], x[3])] if "--only-decode" in sys.argv else SHAPES
    if "--ragged" in sys.argv:
        shapes = RAGGED_SHAPES
    for (b, h, g, s, t, d, causal) in shapes:
        ours, theirs, ours_f32, ours_kv = [], [], [], []
        for _ in range(rounds):
            if bf16:
                ours.append(time_attn(binary, threads, b, h, g, s, t, d, causal, "bf16"))
                theirs.append(time_torch(b, h, g, s, t, d, causal, torch.bfloat16))
                ours_f32.append(time_attn(binary, threads, b, h, g, s, t, d, causal, "f32"))
                if not decodes(h, g, s):
                    ours_kv.append(time_attn(binary, threads, b, h, g, s, t, d, causal, "bf16", kv_bits=True))
            elif len(ours) % 2 == 0:
                ours.append(time_attn(binary, threads, b, h, g, s, t, d, causal))
                theirs.append(time_torch(b, h, g, s, t, d, causal))
            else:
                theirs.append(time_torch(b, h, g, s, t, d, causal))
                ours.append(time_attn(binary, threads, b, h, g, s, t, d, causal))
        o, p = statistics.median(ours), statistics.median(theirs)
        fl = flops(b, h, s, t, d, causal)
        row = {"shape": [b, h, g, s, t, d], "causal": causal, "attn_s": o, "torch_s": p,
               "attn_gflops": fl / o / 1e9, "torch_gflops": fl / p / 1e9, "speedup": p / o,
               "round_speedups": sorted(x / y for x, y in zip(theirs, ours))}
        if bf16:
            row["attn_f32_s"] = statistics.median(ours_f32)
            row["bf16_over_f32"] = row["attn_f32_s"] / o
            if ours_kv:
                row["attn_kv_bits_s"] = statistics.median(ours_kv)
                row["kv_bits_round_speedups"] = sorted(x / y for x, y in zip(theirs, ours_kv))
        rows.append(row)
    if as_json:
        print(json.dumps({"torch": torch.__version__, "threads": threads, "rounds": rounds, "bf16": bf16,
                          "rows": rows}))
        return
    what = "bf16 (attn --dtype bf16, torch bf16 tensors)" if bf16 else "f32"
    print(f"torch {torch.__version__}, {what}, {threads} threads, {rounds} interleaved rounds, medians; "
          "'per round' is the median (range) of the per-round speed ratios")
    extra = " attn f32 ms | attn bf16 / f32 speed | attn, K V bf16 ms | its speed per round |" if bf16 else ""
    print(f"| B,H,G,S,T,D | causal | attn ms | torch ms | attn GFLOP/s | torch GFLOP/s | attn / torch speed "
          f"| per round |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if bf16 else ""))
    for r in rows:
        tail = ""
        if bf16:
            tail = f" {r['attn_f32_s']*1e3:.2f} | {r['bf16_over_f32']:.2f}x |"
            if "attn_kv_bits_s" in r:
                kv = r["kv_bits_round_speedups"]
                tail += (f" {r['attn_kv_bits_s']*1e3:.2f} | {statistics.median(kv):.2f}x "
                         f"({kv[0]:.2f}–{kv[-1]:.2f}) |")
            else:
                tail += " (the main columns) | |"
        ratios = r["round_speedups"]
        per_round = f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})"
        print(f"| {','.join(map(str, r['shape']))} | {'yes' if r['causal'] else 'no'} | {r['attn_s']*1e3:.2f} | "
              f"{r['torch_s']*1e3:.2f} | {r['attn_gflops']:.1f} | {r['torch_gflops']:.1f} | {r['speedup']:.2f}x "
              f"| {per_round} |{tail}")


if __name__ == "__main__":
    main()
