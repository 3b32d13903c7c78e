"""A training step on 2 MPI processes × 1 thread against 1 process × 2 threads, interleaved round by round, medians.

Usage: mpi_train_ab.py ROUNDS BINARY (attn built with the mpi feature; ATTN_TRAIN_DATA names the pairs file, default
/tmp/ab/train.tsv, made by `attn dates --split train --kind mixed --count 3000 --seed 1`). Prints, per model size, the
median step time of each way, the ratio, and the median time the 2 processes spent passing gradients.
"""
import json, os, statistics, subprocess, sys

rounds, attn = int(sys.argv[1]), sys.argv[2]
data = os.environ.get("ATTN_TRAIN_DATA", "/tmp/ab/train.tsv")
mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
shapes = {"d128": ["--steps", "50"], "d512": ["--steps", "10", "--d-model", "512", "--nhead", "8", "--dim-feedforward", "2048"]}
ways = {
    "1 process x 2 threads": ([attn], ["--threads", "2"]),
    "1 process x 2 threads, --micro-batch 32": ([attn], ["--threads", "2", "--micro-batch", "32"]),
    "2 processes x 1 thread, --micro-batch 32": (mpirun + [attn], ["--threads", "1", "--micro-batch", "32"]),
}
for name, extra in shapes.items():
    t = {k: [] for k in ways}
    comm = []
    for _ in range(rounds):
        for k, (cmd, flags) in ways.items():
            out = subprocess.run(cmd + ["bench", "train", "--data", data, "--json", *extra, *flags], capture_output=True, text=True, check=True).stdout
            j = json.loads(out)
            t[k].append(j["median_s"])
            if j.get("processes", 1) > 1:
                comm.append(j["communication_median_s"])
    base = list(ways)[0]
    for k in ways:
        ratios = [t[base][i] / t[k][i] for i in range(rounds)]
        print(f"{name} {k}: median {statistics.median(t[k])*1e3:.1f} ms, speed vs the first {statistics.median(ratios):.3f}")
    print(f"{name} passing gradients between the 2 processes: median {statistics.median(comm)*1e3:.2f} ms a step")
