"""Two attn binaries against each other, interleaved round by round: `attn bench sdpa --json`,
medians. `ATTN_SIMD` in the environment reaches both.

Usage: bench_ab.py BEFORE_BINARY AFTER_BINARY ROUNDS [--threads=N] [--bf16] [SHAPE ...]
SHAPE is "B H G S T D" with an optional "causal" and "backward" (S = 1 is decoding); without shapes, the five
prefill shapes of issue 12 and the decode shape. `--threads=N` (default 2) and `--bf16` (`--dtype bf16`)
reach both binaries. `--kv-bf16` runs both on a bf16 KV cache (`--dtype bf16 --kv-dtype bf16`, which is
f32 attention on the bits on a CPU without bf16 instructions); `--kv-bf16=after` gives the cache to the
after side alone, so that `bench_ab.py BIN BIN N --bf16 --kv-bf16=after` sets a bf16 cache against an
f32 one in the same rounds. The two sides alternate which runs first; the speed column is the median of the
per-round ratios. Besides the medians, the table gives each side's fastest run: on a shared machine
whose medians move by 2x between minutes, the minimum shows what the code can do when it runs alone. The decode table of docs/PERFORMANCE.md came from
  bench_ab.py BEFORE AFTER 5 "1 32 8 1 4096 128" "1 8 8 1 4096 64" "8 16 16 1 1024 128" "1 32 32 1 256 128"
"""
import json, subprocess, statistics, sys

DEFAULT = ["1 8 8 512 512 64", "1 8 8 2048 2048 64", "1 8 8 2048 2048 64 causal", "4 12 12 128 128 64",
           "1 16 16 2048 2048 128 causal", "1 32 8 1 4096 128"]


def main():
    bins = {"before": sys.argv[1], "after": sys.argv[2]}
    rounds = int(sys.argv[3])
    flags = [a for a in sys.argv[4:] if a.startswith("--")]
    shapes = [a for a in sys.argv[4:] if not a.startswith("--")]
    threads = next((f.split("=", 1)[1] for f in flags if f.startswith("--threads=")), "2")
    kv_bf16 = next((f.split("=", 1)[1] if "=" in f else "both" for f in flags if f.startswith("--kv-bf16")), None)
    if kv_bf16 not in (None, "both", "after"):
        sys.exit(f"--kv-bf16={kv_bf16}: expected --kv-bf16 or --kv-bf16=after")
    extra = ["--dtype", "bf16"] if "--bf16" in flags or kv_bf16 else []
    side_extra = {k: ["--kv-dtype", "bf16"] if kv_bf16 == "both" or (kv_bf16 == "after" and k == "after") else []
                  for k in bins}
    print(f"{threads} thread(s){', bf16' if extra else ''}"
          f"{', bf16 KV cache on ' + ('both sides' if kv_bf16 == 'both' else 'the after side') if kv_bf16 else ''}, "
          f"{rounds} interleaved rounds")
    print("| shape | before ms | after ms | after / before speed (median of per-round ratios) | before min ms | after min ms | min ratio |")
    print("|---|---|---|---|---|---|---|")
    for spec in shapes or DEFAULT:
        f = spec.split()
        b, h, g, s, t, d = f[:6]
        causal = "causal" in f[6:]
        args = ["--batch", b, "--heads", h, "--kv-heads", g, "--seq", s, "--kv-seq", t, "--head-dim", d]
        if causal:
            args.append("--causal")
        if "backward" in f[6:]:
            args.append("--backward")
        times = {k: [] for k in bins}
        mins = {k: [] for k in bins}
        for r in range(rounds):
            # Alternate which side runs first, so neither always meets the machine a moment later.
            for k in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
                binary = bins[k]
                out = subprocess.run([binary, "bench", "sdpa", "--threads", threads, "--min-seconds", "0.3", "--json",
                                      *args, *extra, *side_extra[k]], capture_output=True, text=True, check=True).stdout
                times[k].append(json.loads(out)["median_s"])
                mins[k].append(json.loads(out)["min_s"])
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        ratio = statistics.median(b / a for b, a in zip(times["before"], times["after"]))
        name = f"[{b},{h},{g},{s},{t},{d}]" + (" causal" if causal else "") + (" fwd+bwd" if "backward" in f[6:] else "")
        lo_before, lo_after = min(mins["before"]), min(mins["after"])
        print(f"| {name} | {before*1e3:.3f} | {after*1e3:.3f} | {ratio:.3f} | {lo_before*1e3:.3f} | "
              f"{lo_after*1e3:.3f} | {lo_before/lo_after:.3f} |", flush=True)


if __name__ == "__main__":
    main()
