"""attn and PyTorch as fractions of the machine's f32 FMA ceiling, measured in the same rounds.

Each round runs, in turn: the `fma_peak` example (FMAs into independent registers on THREADS
threads at once, no loads: what no f32 kernel can pass), then for each work below attn and
PyTorch alternately (which goes first alternates by round). Each figure is that round's
GFLOP/s over that round's ceiling; the table gives the median over rounds and the range. On a
shared machine whose speed moves by 1.5x between minutes, a fraction of the same round's
ceiling is steadier than a GFLOP/s figure, and it says how much room a kernel has left:
a target of 1.2x PyTorch cannot be met where PyTorch already runs at more than 1/1.2 of the
ceiling.

The works: the layers' GEMM shapes of `bench_gemm.py` and the SDPA prefill shapes of
`bench_compare.py`, f32.

Usage: python bench_peak.py ATTN_BINARY THREADS ROUNDS [--fma-peak FMA_PEAK_BINARY]
FMA_PEAK_BINARY is what `cargo build --release -p attn-kernels --example fma_peak` builds; by
default `examples/fma_peak` beside ATTN_BINARY (both in target/release). Run by `cargo xtask
bench`.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import bench_compare
import bench_gemm


def peak(binary, threads):
    out = subprocess.run([binary, str(threads), "5"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_gflops"]


def works(binary, threads):
    """(name, flops, attn timer, torch timer) for each work; a timer returns seconds."""
    out = []
    for (m, n, k) in bench_gemm.SHAPES:
        out.append((f"GEMM {m}×{n}×{k}", 2.0 * m * n * k,
                    lambda m=m, n=n, k=k: bench_gemm.time_attn(binary, threads, m, n, k)[0],
                    lambda m=m, n=n, k=k: bench_gemm.time_torch(m, n, k)[0]))
    for (b, h, g, s, t, d, causal) in bench_compare.SHAPES:
        if s == 1:
            continue  # decoding is bound by memory, not by the FMA ceiling
        name = f"SDPA [{b},{h},{s},{d}]" + (" causal" if causal else "")
        out.append((name, bench_compare.flops(b, h, s, t, d, causal),
                    lambda a=(b, h, g, s, t, d, causal): bench_compare.time_attn(binary, threads, *a),
                    lambda a=(b, h, g, s, t, d, causal): bench_compare.time_torch(*a)))
    return out


def main():
    binary, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    peak_binary = str(Path(binary).parent / "examples" / "fma_peak")
    if "--fma-peak" in sys.argv:
        peak_binary = sys.argv[sys.argv.index("--fma-peak") + 1]
    torch.set_num_threads(threads)
    table = works(binary, threads)
    frac = {name: {"attn": [], "torch": []} for name, *_ in table}
    ceilings = []
    for r in range(rounds):
        ceiling = peak(peak_binary, threads)
        ceilings.append(ceiling)
        for name, fl, attn, torch_side in table:
            sides = [("attn", attn), ("torch", torch_side)]
            for side, timer in (sides if r % 2 == 0 else sides[::-1]):
                frac[name][side].append(fl / timer() / 1e9 / ceiling)
    print(f"torch {torch.__version__}, {threads} threads, {rounds} rounds; ceiling (fma_peak) "
          f"{statistics.median(ceilings):.0f} GFLOP/s median ({min(ceilings):.0f}–{max(ceilings):.0f})")
    print("| work | attn / ceiling | torch / ceiling | attn / torch (per round) | 1.2 × torch / ceiling |")
    print("|---|---|---|---|---|")
    for name, *_ in table:
        a, t = frac[name]["attn"], frac[name]["torch"]
        ratio = [x / y for x, y in zip(a, t)]
        print(f"| {name} | {statistics.median(a):.2f} ({min(a):.2f}–{max(a):.2f}) | "
              f"{statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | {statistics.median(ratio):.2f} "
              f"({min(ratio):.2f}–{max(ratio):.2f}) | {1.2 * statistics.median(t):.2f} |")


if __name__ == "__main__":
    main()
