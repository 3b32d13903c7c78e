"""Two attn binaries against each other by CPU time: the same fixed work (`--min-runs RUNS
--min-seconds 0`) run by each in turn, round by round, which side first alternating; the ratio
is BEFORE's user + system time over AFTER's (above 1: AFTER uses less CPU). Time the hypervisor
steals from the guest does not count as the process's CPU time, so on a shared VM this ratio
is steadier than one of wall times; setup (inputs, page faults) is in both sides alike.

Usage: python bench_ab_cpu.py BEFORE AFTER ROUNDS RUNS -- ATTN_ARGS...
e.g.   python bench_ab_cpu.py old/attn new/attn 9 30 -- bench sdpa --batch 1 --heads 8 --seq 1024 --head-dim 64 --threads 2 --backward
"""

import resource
import statistics
import subprocess
import sys


def cpu_seconds(binary, args, runs):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([binary, *args, "--min-runs", runs, "--min-seconds", "0", "--json"], check=True,
                   capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    if "--" not in sys.argv:
        sys.exit(__doc__)
    before, after, rounds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    args = sys.argv[sys.argv.index("--") + 1:]
    ratios, times = [], {"before": [], "after": []}
    for r in range(rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        got = {side: cpu_seconds(before if side == "before" else after, args, runs) for side in order}
        for side in got:
            times[side].append(got[side])
        ratios.append(got["before"] / got["after"])
    print(f"CPU s before {statistics.median(times['before']):.3f} after {statistics.median(times['after']):.3f}; "
          f"before / after per round: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}")


if __name__ == "__main__":
    main()
