"""Two builds of attn-kernels' `decode_cache` example against each other, interleaved round by round.

Usage: decode_cache_ab.py BEFORE_BINARY AFTER_BINARY ROUNDS [T] [S]
Each round runs one round of each binary (`decode_cache 1 T S`), the two sides alternating which
runs first. For each of the example's four calls (f32 or bf16, on a bf16 or an f32 cache) it prints
both sides' medians with their ranges and the median (range) of the per-round speed ratios; then,
on the after side, the bf16 cache against the f32 one and the bf16 fallback on f32 K and V against
the f32 call, each as the median of per-round ratios. Build the binaries with
`cargo build --release -p attn-kernels --example decode_cache` (target/release/examples/decode_cache).
"""
import re, statistics, subprocess, sys

NAMES = ["f32, bf16 cache", "f32, f32 cache", "bf16, bf16 cache", "bf16, f32 cache"]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    bins = {"before": sys.argv[1], "after": sys.argv[2]}
    rounds = int(sys.argv[3])
    args = sys.argv[4:6]
    data = {k: [] for k in bins}
    for r in range(rounds):
        for k in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            out = subprocess.run([bins[k], "1", *args], capture_output=True, text=True, check=True).stdout
            line = out.strip().splitlines()[-1]
            times = [float(x) for x in re.findall(r"cache ([0-9.]+)", line)]
            if len(times) != len(NAMES):
                sys.exit(f"{bins[k]}: expected {len(NAMES)} times in {line!r}")
            data[k].append(times)
    print(f"{rounds} interleaved rounds, decode_cache 1 {' '.join(args)}; ms, medians (range)")
    print("| call | before ms | after ms | after / before speed |")
    print("|---|---|---|---|")
    for i, name in enumerate(NAMES):
        b = [d[i] for d in data["before"]]
        a = [d[i] for d in data["after"]]
        ratios = [x / y for x, y in zip(b, a)]
        print(f"| {name} | {statistics.median(b):.2f} ({min(b):.2f}-{max(b):.2f}) | "
              f"{statistics.median(a):.2f} ({min(a):.2f}-{max(a):.2f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    for fast, slow, what in [(0, 1, "f32: a bf16 cache against an f32 cache"),
                             (2, 3, "bf16: a bf16 cache against an f32 cache"),
                             (3, 1, "the bf16 fallback on f32 K and V against the f32 call")]:
        ratios = [d[slow] / d[fast] for d in data["after"]]
        print(f"after, {what}: speed {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
