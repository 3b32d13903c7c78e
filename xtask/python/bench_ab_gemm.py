"""Two attn binaries' `attn bench gemm`, or one against PyTorch's `matmul`, interleaved round by
round on the layers' shapes; the median of the per-round speed ratios (on a machine whose speed
moves by 2x between minutes, a ratio within a round is steadier than each side's median).

Usage: python bench_ab_gemm.py BEFORE AFTER|torch|packed ROUNDS THREADS [--weight] [--packed] [--bf16] [MxNxK ...]
With `torch` as AFTER, each round times `torch.matmul(a, b, out=c)` in this process for as long
as attn's run (at least 0.3 s and 5 runs) and the ratio is attn / torch speed. With `packed` as
AFTER, BEFORE is timed without and with `--packed` (B packed once before the timing) and the
ratio is packed / unpacked speed. `--weight` passes `--weight` to attn (B = Wᵀ of a row-major
[N, K] weight; PyTorch then multiplies by `w.t()`); `--packed` passes `--packed` to every attn
run; `--bf16` times attn's bf16 GEMM (`--dtype bf16`, f32 output) and PyTorch's `matmul` on bf16
tensors.
"""

import json
import statistics
import subprocess
import sys
import time

SHAPES = [(1024, 1024, 1024), (2048, 512, 512), (2048, 1536, 512), (2048, 2048, 512), (2048, 512, 2048)]


def attn_seconds(binary, m, n, k, threads, weight, packed, bf16=False):
    args = [binary, "bench", "gemm", "--m", str(m), "--n", str(n), "--k", str(k), "--threads", str(threads),
            "--min-seconds", "0.3", "--json"] + (["--weight"] if weight else []) + (["--packed"] if packed else [])
    args += ["--dtype", "bf16"] if bf16 else []
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)["median_s"]


def main():
    before, after, rounds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    weight, packed, bf16 = "--weight" in sys.argv[5:], "--packed" in sys.argv[5:], "--bf16" in sys.argv[5:]
    packed_side = after == "packed"
    if packed_side:
        after = before
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[5:] if not s.startswith("--")] or SHAPES
    torch_side = after == "torch"
    if torch_side:
        import torch
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, ", end="")
    print(f"{threads} thread(s), {rounds} interleaved rounds, B {'= Wᵀ' if weight else 'row-major'}"
          + (", B packed" if packed else "") + (", bf16" if bf16 else ""))
    what = "attn / torch" if torch_side else "packed / unpacked" if packed_side else "after / before"
    print(f"| M×N×K | {what} speed, median of rounds | quartiles |")
    print("|---|---|---|")
    for m, n, k in shapes:
        if torch_side:
            dtype = torch.bfloat16 if bf16 else torch.float32
            a = torch.randn(m, k).to(dtype)
            b = (torch.randn(n, k).t() if weight else torch.randn(k, n)).to(dtype)
            c = torch.empty(m, n, dtype=dtype)
        ratios = []
        for _ in range(rounds):
            first = attn_seconds(before, m, n, k, threads, weight, packed, bf16)
            if torch_side:
                times, start = [], time.perf_counter()
                while time.perf_counter() - start < 0.3 or len(times) < 5:
                    t0 = time.perf_counter()
                    torch.matmul(a, b, out=c)
                    times.append(time.perf_counter() - t0)
                second = statistics.median(times)
                ratios.append(second / first)
            else:
                second = attn_seconds(after, m, n, k, threads, weight, packed or packed_side, bf16)
                ratios.append(first / second)
        ratios.sort()
        q = len(ratios) // 4
        print(f"| {m}×{n}×{k} | {statistics.median(ratios):.3f} | {ratios[q]:.2f}–{ratios[-1 - q]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
