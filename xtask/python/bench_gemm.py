"""Interleaved comparison of `attn bench gemm` with PyTorch's `matmul` on the layers' shapes.

For each shape `[M, K] · [K, N]` (row-major operands, a preallocated output on PyTorch's side
as on attn's), alternates rounds: one `attn bench gemm --json` run (a fresh process, its own
median over >= 0.5 s), then `torch.matmul(a, b, out=c)` timed the same way in this process;
repeats ROUNDS times and reports the median of each side's medians and their ratio. Run by
`cargo xtask bench`.

With `--bf16`, each round also runs `attn bench gemm --dtype bf16` (B packed once outside the
timing, A rounded inside) and `torch.matmul` on bf16 tensors (bf16 output), and a second table
compares attn's bf16 with its f32 and with PyTorch's bf16.

With `--faer`, each round also runs the f32 side with `ATTN_GEMM=faer` (faer's GEMM in place of
attn's own packed GEMM, which serves these shapes on Intel at AVX-512), and a third table gives
the median of the per-round ratios own / faer. With `--best`, a column gives attn / torch by each
side's fastest run (the run the machine's neighbours disturbed least), the median over rounds.

Usage: python bench_gemm.py ATTN_BINARY THREADS ROUNDS [--bf16] [--faer] [--best] [--json]
"""

import json
import os
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


def time_torch(m, n, k, dtype=torch.float32, min_seconds=0.5, min_runs=5):
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(m, k, generator=gen) * 2 - 1).to(dtype)
    b = (torch.rand(k, n, generator=gen) * 2 - 1).to(dtype)
    c = torch.empty(m, n, dtype=dtype)
    with torch.inference_mode():
        torch.matmul(a, b, out=c)
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 1000):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def time_attn(binary, threads, m, n, k, dtype="f32", env=None):
    cmd = [binary, "bench", "gemm", "--m", str(m), "--n", str(n), "--k", str(k), "--threads", str(threads),
           "--dtype", dtype, "--min-seconds", "0.5", "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
    return out["median_s"], out["min_s"]


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    as_json = "--json" in sys.argv
    bf16 = "--bf16" in sys.argv
    faer = "--faer" in sys.argv
    best = "--best" in sys.argv
    faer_env = dict(os.environ, ATTN_GEMM="faer")
    torch.set_num_threads(threads)
    rows = []
    for (m, n, k) in SHAPES:
        # Each entry is (median, fastest run) of one round.
        times = {"attn": [], "torch": [], "attn_bf16": [], "torch_bf16": [], "attn_faer": []}
        for _ in range(rounds):
            times["attn"].append(time_attn(binary, threads, m, n, k))
            times["torch"].append(time_torch(m, n, k))
            if faer:
                times["attn_faer"].append(time_attn(binary, threads, m, n, k, env=faer_env))
            if bf16:
                times["attn_bf16"].append(time_attn(binary, threads, m, n, k, "bf16"))
                times["torch_bf16"].append(time_torch(m, n, k, torch.bfloat16))
        fl = 2.0 * m * n * k
        row = {"mnk": [m, n, k]}
        for side, ts in times.items():
            if ts:
                row[side + "_s"] = statistics.median(t[0] for t in ts)
                row[side + "_gflops"] = fl / row[side + "_s"] / 1e9
        row["speedup"] = row["torch_s"] / row["attn_s"]
        row["speedup_best"] = statistics.median(t[1] / a[1] for a, t in zip(times["attn"], times["torch"]))
        if faer:
            row["own_over_faer"] = statistics.median(f[0] / a[0] for a, f in zip(times["attn"], times["attn_faer"]))
        rows.append(row)
    if as_json:
        print(json.dumps({"torch": torch.__version__, "threads": threads, "rounds": rounds, "rows": rows}))
        return
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds, medians")
    print("| M×N×K | attn ms | torch ms | attn GFLOP/s | torch GFLOP/s | attn / torch speed |"
          + (" by fastest runs |" if best else ""))
    print("|---|---|---|---|---|---|" + ("---|" if best else ""))
    for r in rows:
        print(f"| {'×'.join(map(str, r['mnk']))} | {r['attn_s']*1e3:.3f} | {r['torch_s']*1e3:.3f} | "
              f"{r['attn_gflops']:.1f} | {r['torch_gflops']:.1f} | {r['speedup']:.2f}x |"
              + (f" {r['speedup_best']:.2f}x |" if best else ""))
    if faer:
        print("\nattn's GEMM against faer's (ATTN_GEMM=faer), the same rounds")
        print("| M×N×K | attn GFLOP/s | faer GFLOP/s | attn / faer speed (median of per-round ratios) |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {'×'.join(map(str, r['mnk']))} | {r['attn_gflops']:.1f} | {r['attn_faer_gflops']:.1f} | "
                  f"{r['own_over_faer']:.2f}x |")
    if bf16:
        print("\nbf16 (f32 sums), the same rounds")
        print("| M×N×K | attn bf16 GFLOP/s | attn f32 GFLOP/s | torch bf16 GFLOP/s | attn bf16 / attn f32 | attn bf16 / torch bf16 |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {'×'.join(map(str, r['mnk']))} | {r['attn_bf16_gflops']:.1f} | {r['attn_gflops']:.1f} | "
                  f"{r['torch_bf16_gflops']:.1f} | {r['attn_s']/r['attn_bf16_s']:.2f}x | "
                  f"{r['torch_bf16_s']/r['attn_bf16_s']:.2f}x |")


if __name__ == "__main__":
    main()
