"""Two attn binaries' `attn bench run` on the modules of bench_modules.py (its files, written
once to a temporary folder), interleaved round by round; the median of the per-round speed
ratios after / before.

Usage: python bench_ab_modules.py BEFORE AFTER ROUNDS [THREADS]
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

import bench_modules


def main():
    before, after, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    print(f"{threads} threads, {rounds} interleaved rounds")
    print("| module | before ms | after ms | after / before speed, median of rounds | range |")
    print("|---|---|---|---|---|")
    for make in bench_modules.CASES:
        label, module, config, inputs, _ = make()
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "m.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "w.safetensors"))
            save_file({k: v.clone().contiguous() for k, v in inputs.items()}, str(d / "in.safetensors"))
            first, second = [], []
            for _ in range(rounds):
                first.append(bench_modules.attn_bench_run(before, threads, d, "f32"))
                second.append(bench_modules.attn_bench_run(after, threads, d, "f32"))
        ratios = sorted(x / y for x, y in zip(first, second))
        print(f"| {label} | {statistics.median(first)*1e3:.2f} | {statistics.median(second)*1e3:.2f} | "
              f"{statistics.median(ratios):.3f} | {ratios[0]:.2f}–{ratios[-1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
