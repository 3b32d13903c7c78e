"""Interleaved comparison of `attn bench sdpa` with PyTorch's scaled_dot_product_attention.

For each shape, alternates rounds: one `attn bench sdpa --json` run (a fresh process, its own
median over >= 0.5 s), then PyTorch timed the same way in this process; repeats ROUNDS times and
reports the median of each side's medians and their ratio. Run by `cargo xtask bench`.

Usage: python bench_compare.py ATTN_BINARY THREADS ROUNDS [--json]
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


def flops(b, h, s, t, d, causal):
    f = 4.0 * b * h * s * t * d
    return f / 2 if causal and s == t else f


def time_torch(b, h, g, s, t, d, causal, min_seconds=0.5, min_runs=5):
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(b, h, s, d, generator=gen) * 2 - 1
    k = torch.rand(b, g, t, d, generator=gen) * 2 - 1
    v = torch.rand(b, g, t, d, generator=gen) * 2 - 1
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


def time_attn(binary, threads, b, h, g, s, t, d, causal):
    cmd = [binary, "bench", "sdpa", "--batch", str(b), "--heads", str(h), "--kv-heads", str(g), "--seq", str(s),
           "--kv-seq", str(t), "--head-dim", str(d), "--threads", str(threads), "--min-seconds", "0.5", "--json"]
    if causal:
        cmd.append("--causal")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    as_json = "--json" in sys.argv
    torch.set_num_threads(threads)
    rows = []
    for (b, h, g, s, t, d, causal) in SHAPES:
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(time_attn(binary, threads, b, h, g, s, t, d, causal))
            theirs.append(time_torch(b, h, g, s, t, d, causal))
        o, p = statistics.median(ours), statistics.median(theirs)
        fl = flops(b, h, s, t, d, causal)
        rows.append({"shape": [b, h, g, s, t, d], "causal": causal, "attn_s": o, "torch_s": p,
                     "attn_gflops": fl / o / 1e9, "torch_gflops": fl / p / 1e9, "speedup": p / o})
    if as_json:
        print(json.dumps({"torch": torch.__version__, "threads": threads, "rounds": rounds, "rows": rows}))
        return
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds, medians")
    print("| B,H,G,S,T,D | causal | attn ms | torch ms | attn GFLOP/s | torch GFLOP/s | attn / torch speed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {','.join(map(str, r['shape']))} | {'yes' if r['causal'] else 'no'} | {r['attn_s']*1e3:.2f} | "
              f"{r['torch_s']*1e3:.2f} | {r['attn_gflops']:.1f} | {r['torch_gflops']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
