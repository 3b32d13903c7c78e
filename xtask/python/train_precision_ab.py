"""bf16 against f32 training steps of attn binaries, interleaved: each round runs every binary's
`attn bench train --precision f32` and `--precision bf16` on `bench_train.py`'s two shapes (d128
batch 64, d512 batch 32, date pairs in file order), and prints per binary the bf16 / f32 speed
(the median of the per-round ratios, their range, and the ratio of the medians), then each
binary against the first per precision. Steadier than bench_train.py's ten-step runs on a noisy
machine: more steps per run, and the two precisions of one binary next to each other.

Usage: python train_precision_ab.py ROUNDS STEPS NAME=BINARY ...
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    "d128": ["--d-model", "128", "--nhead", "4", "--dim-feedforward", "512", "--batch-size", "64"],
    "d512": ["--d-model", "512", "--nhead", "8", "--encoder-layers", "3", "--decoder-layers", "3",
             "--dim-feedforward", "2048", "--batch-size", "32"],
}


def main():
    rounds, steps = int(sys.argv[1]), sys.argv[2]
    bins = dict(a.split("=", 1) for a in sys.argv[3:])
    first = next(iter(bins))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.tsv"
        data.write_text(subprocess.run([bins[first], "dates", "--split", "train", "--count", "5000", "--seed", "1"],
                                       capture_output=True, text=True, check=True).stdout)
        for name, args in SHAPES.items():
            t = {(b, p): [] for b in bins for p in ("f32", "bf16")}
            for _ in range(rounds):
                for (b, p) in t:
                    out = subprocess.run([bins[b], "bench", "train", "--data", str(data), *args, "--steps", steps,
                                          "--no-shuffle", "--threads", "2", "--precision", p, "--json"],
                                         capture_output=True, text=True, check=True).stdout
                    t[(b, p)].append(json.loads(out)["median_s"])
            for b in bins:
                f, h = t[(b, "f32")], t[(b, "bf16")]
                r = sorted(x / y for x, y in zip(f, h))
                print(f"{name} {b}: f32 {statistics.median(f) * 1e3:.1f} ms, bf16 {statistics.median(h) * 1e3:.1f} ms, "
                      f"bf16 / f32 speed: median of rounds {statistics.median(r):.3f} (range {r[0]:.2f}-{r[-1]:.2f}), "
                      f"ratio of medians {statistics.median(f) / statistics.median(h):.3f}")
            for b in list(bins)[1:]:
                for p in ("f32", "bf16"):
                    r = [x / y for x, y in zip(t[(first, p)], t[(b, p)])]
                    print(f"{name} {p} {b} against {first}: {statistics.median(r):.3f}")


if __name__ == "__main__":
    main()
