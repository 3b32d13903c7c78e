"""Two attn binaries' `attn bench run` on the modules of bench_modules.py (its files, written
once to a temporary folder), interleaved round by round; the median of the per-round speed
ratios after / before. `--bf16` runs both in bf16 (`attn bench run --dtype bf16`).
`--second-pass` runs `nn.MultiheadAttention` with averaged weights instead, at shapes whose
weights come from `attention_weights`' second pass on 2 threads (one row tile) and one whose
flash kernel keeps its scores.

Usage: python bench_ab_modules.py BEFORE AFTER ROUNDS [THREADS] [--bf16] [--second-pass]
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

import bench_modules


def main():
    dtype = "bf16" if "--bf16" in sys.argv else "f32"
    cases = bench_modules.CASES
    if "--second-pass" in sys.argv:
        shapes = [(1, 64, 512, 8), (1, 40, 384, 12), (2, 200, 512, 8)]
        cases = [lambda shape=shape: bench_modules.mha_case(True, shape) for shape in shapes]
    args = [a for a in sys.argv[1:] if a not in ("--bf16", "--second-pass")]
    before, after, rounds = args[0], args[1], int(args[2])
    threads = int(args[3]) if len(args) > 3 else 2
    print(f"{threads} threads, {rounds} interleaved rounds, {dtype}")
    print("| module | before ms | after ms | after / before speed, median of rounds | range |")
    print("|---|---|---|---|---|")
    for make in cases:
        label, module, config, inputs, _ = make()
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "m.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "w.safetensors"))
            save_file({k: v.clone().contiguous() for k, v in inputs.items()}, str(d / "in.safetensors"))
            first, second = [], []
            for _ in range(rounds):
                first.append(bench_modules.attn_bench_run(before, threads, d, dtype))
                second.append(bench_modules.attn_bench_run(after, threads, d, dtype))
        ratios = sorted(x / y for x, y in zip(first, second))
        print(f"| {label} | {statistics.median(first)*1e3:.2f} | {statistics.median(second)*1e3:.2f} | "
              f"{statistics.median(ratios):.3f} | {ratios[0]:.2f}–{ratios[-1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
