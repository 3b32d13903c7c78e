"""Training steps of attn binaries against each other, interleaved round by round (`attn bench train --json`), medians.

Usage: train_ab.py ROUNDS NAME=BINARY ... (the first is the baseline; ATTN_TRAIN_DATA names the pairs file, default /tmp/ab/train.tsv,
made by `attn dates --split train --kind mixed --count 3000 --seed 1`; ATTN_TRAIN_EXTRA adds arguments to every run, e.g.
"--precision bf16"; ATTN_TRAIN_SHAPES=d128 runs one shape). Each line gives the step, then the update alone (AdamW, the
clipping norm and, in bf16, packing every weight again: `optimizer_median_s`).
"""
import json, os, subprocess, statistics, sys
bins = dict(a.split("=") for a in sys.argv[2:])
rounds = int(sys.argv[1])
shapes = {"d128": ["--steps", "50"], "d512": ["--steps", "10", "--d-model", "512", "--nhead", "8", "--dim-feedforward", "2048"]}
extra_all = os.environ.get("ATTN_TRAIN_EXTRA", "").split()
only = os.environ.get("ATTN_TRAIN_SHAPES")
for name, extra in shapes.items():
    if only and name not in only.split(","):
        continue
    t = {k: [] for k in bins}
    u = {k: [] for k in bins}
    for _ in range(rounds):
        for k, b in bins.items():
            out = subprocess.run([b, "bench", "train", "--data", os.environ.get("ATTN_TRAIN_DATA", "/tmp/ab/train.tsv"), "--json", *extra, *extra_all], capture_output=True, text=True, check=True).stdout
            report = json.loads(out)
            t[k].append(report["median_s"])
            u[k].append(report["optimizer_median_s"])
    base = list(bins)[0]
    for k in bins:
        ratios = [t[base][i] / t[k][i] for i in range(rounds)]
        update = [u[base][i] / u[k][i] for i in range(rounds)]
        print(f"{name} {k}: median {statistics.median(t[k])*1e3:.1f} ms, speed vs {base} {statistics.median(ratios):.3f} (rounds {[round(x*1e3,1) for x in t[k]]}); "
              f"update {statistics.median(u[k])*1e3:.2f} ms, speed vs {base} {statistics.median(update):.3f}")
