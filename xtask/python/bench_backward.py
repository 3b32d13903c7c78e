"""Forward + backward of attention: `attn bench sdpa --backward --json` against PyTorch's
`scaled_dot_product_attention` forward and `out.backward(dout)` (its CPU flash backward),
interleaved round by round, medians. Flops are 3.5× the forward's (the contract's count).

`--ragged` times RAGGED_SHAPES instead (lengths that are not multiples of 16, as
bench_compare.py's); `--cross` times CROSS_SHAPES, fewer query rows than keys (causal is
top-left there, PyTorch's `is_causal`, and the flops count the pairs a row sees).

Usage: python bench_backward.py ATTN_BINARY THREADS ROUNDS [--ragged | --cross]
"""

import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    # (B, H, S, D, causal): the three shapes of issue 13.
    (1, 8, 1024, 64, False),
    (4, 12, 128, 64, False),
    (1, 16, 2048, 128, True),
]

RAGGED_SHAPES = [
    # The date translator's attention at d_model 128 (encoder, and causal decoder), MiniLM's
    # sequence length, and a longer one.
    (64, 4, 24, 32, False),
    (64, 4, 12, 32, True),
    (32, 12, 36, 32, False),
    (4, 12, 100, 64, False),
]

CROSS_SHAPES = [
    # (B, H, S, T, D, causal): one or two heads with few rows against many keys, which the
    # one pass cuts into chunks of 64 to 128 rows, and a causal one whose rows see 512 keys.
    (1, 1, 256, 4096, 64, False),
    (1, 2, 128, 4096, 64, False),
    (1, 1, 384, 1024, 64, False),
    (1, 1, 512, 4096, 64, True),
]


def time_torch(b, h, s, t, d, causal, min_seconds=0.5, min_runs=3):
    gen = torch.Generator().manual_seed(0)
    q, k, v = [(torch.rand(b, h, n, d, generator=gen) * 2 - 1).requires_grad_() for n in (s, t, t)]
    dout = torch.rand(b, h, s, d, generator=gen) * 2 - 1

    def step():
        for x in (q, k, v):
            x.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

    step()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_attn(binary, threads, b, h, s, t, d, causal):
    cmd = [binary, "bench", "sdpa", "--backward", "--batch", str(b), "--heads", str(h), "--seq", str(s),
           "--kv-seq", str(t), "--head-dim", str(d), "--threads", str(threads), "--min-seconds", "0.5", "--json"]
    if causal:
        cmd.append("--causal")
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["median_s"]


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, {rounds} interleaved rounds, medians")
    cross = "--cross" in sys.argv
    print(f"| B,H,S,{'T,' if cross else ''}D | causal | attn ms | torch ms | attn GFLOP/s | torch GFLOP/s | "
          "attn / torch speed |")
    print("|---|---|---|---|---|---|---|")
    if cross:
        shapes = CROSS_SHAPES
    else:
        shapes = [(b, h, s, s, d, c) for b, h, s, d, c in (RAGGED_SHAPES if "--ragged" in sys.argv else SHAPES)]
    for b, h, s, t, d, causal in shapes:
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(time_attn(binary, threads, b, h, s, t, d, causal))
            theirs.append(time_torch(b, h, s, t, d, causal))
        o, p = statistics.median(ours), statistics.median(theirs)
        if not causal:
            pairs = s * t
        elif s == t:
            pairs = s * s / 2
        else:
            pairs = sum(min(i + 1, t) for i in range(s))
        flops = 3.5 * 4.0 * b * h * pairs * d
        dims = f"{b},{h},{s},{t},{d}" if cross else f"{b},{h},{s},{d}"
        print(f"| {dims} | {'yes' if causal else 'no'} | {o*1e3:.2f} | {p*1e3:.2f} | "
              f"{flops/o/1e9:.1f} | {flops/p/1e9:.1f} | {p/o:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
