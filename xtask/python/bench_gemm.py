"""Interleaved comparison of `attn bench gemm` with PyTorch's `matmul` on the layers' shapes.

For each shape `[M, K] · [K, N]` (row-major operands, a preallocated output on PyTorch's side
as on attn's), alternates rounds: one `attn bench gemm --json` run (a fresh process, its own
median over >= 0.5 s), then `torch.matmul(a, b, out=c)` timed the same way in this process;
repeats ROUNDS times and reports the median of each side's medians and their ratio. Run by
`cargo xtask bench`.

Usage: python bench_gemm.py ATTN_BINARY THREADS ROUNDS [--json]
"""

import json
import statistics
import subprocess
import sys
import time

import torch

# (M, N, K): the square reference, then a batch of 2,048 tokens through d_model 512 layers:
# one projection (512 -> 512), the fused QKV (512 -> 1536), the feed-forward's first layer
# (512 -> 2048) and its second (2048 -> 512).
SHAPES = [
    (1024, 1024, 1024),
    (2048, 512, 512),
    (2048, 1536, 512),
    (2048, 2048, 512),
    (2048, 512, 2048),
]


def time_torch(m, n, k, min_seconds=0.5, min_runs=5):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(m, k, generator=gen) * 2 - 1
    b = torch.rand(k, n, generator=gen) * 2 - 1
    c = torch.empty(m, n)
    with torch.inference_mode():
        torch.matmul(a, b, out=c)
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 1000):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_attn(binary, threads, m, n, k):
    cmd = [binary, "bench", "gemm", "--m", str(m), "--n", str(n), "--k", str(k), "--threads", str(threads),
           "--min-seconds", "0.5", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    as_json = "--json" in sys.argv
    torch.set_num_threads(threads)
    rows = []
    for (m, n, k) in SHAPES:
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(time_attn(binary, threads, m, n, k))
            theirs.append(time_torch(m, n, k))
        o, p = statistics.median(ours), statistics.median(theirs)
        fl = 2.0 * m * n * k
        rows.append({"mnk": [m, n, k], "attn_s": o, "torch_s": p, "attn_gflops": fl / o / 1e9,
                     "torch_gflops": fl / p / 1e9, "speedup": p / o})
    if as_json:
        print(json.dumps({"torch": torch.__version__, "threads": threads, "rounds": rounds, "rows": rows}))
        return
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds, medians")
    print("| M×N×K | attn ms | torch ms | attn GFLOP/s | torch GFLOP/s | attn / torch speed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'×'.join(map(str, r['mnk']))} | {r['attn_s']*1e3:.3f} | {r['torch_s']*1e3:.3f} | "
              f"{r['attn_gflops']:.1f} | {r['torch_gflops']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
