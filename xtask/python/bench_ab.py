"""Two attn binaries against each other, interleaved round by round: `attn bench sdpa --json` on
the shapes below, medians. Usage: bench_ab.py BEFORE_BINARY AFTER_BINARY ROUNDS.
"""
import json, subprocess, statistics, sys
bins = {"before": sys.argv[1], "after": sys.argv[2]}
shapes = [("[1,8,512,64]", ["--batch","1","--heads","8","--seq","512","--head-dim","64"]),
          ("[1,8,2048,64]", ["--batch","1","--heads","8","--seq","2048","--head-dim","64"]),
          ("[1,8,2048,64] causal", ["--batch","1","--heads","8","--seq","2048","--head-dim","64","--causal"]),
          ("[4,12,128,64]", ["--batch","4","--heads","12","--seq","128","--head-dim","64"]),
          ("[1,16,2048,128] causal", ["--batch","1","--heads","16","--seq","2048","--head-dim","128","--causal"]),
          ("decode H32 G8 T4096 D128", ["--batch","1","--heads","32","--kv-heads","8","--seq","1","--kv-seq","4096","--head-dim","128"])]
rounds = int(sys.argv[3])
print("| shape | before ms | after ms | after / before speed |\n|---|---|---|---|")
for name, args in shapes:
    t = {k: [] for k in bins}
    for _ in range(rounds):
        for k, b in bins.items():
            out = subprocess.run([b, "bench", "sdpa", "--threads", "2", "--min-seconds", "0.3", "--json", *args], capture_output=True, text=True, check=True).stdout
            t[k].append(json.loads(out)["median_s"])
    a, b = statistics.median(t["before"]), statistics.median(t["after"])
    print(f"| {name} | {a*1e3:.2f} | {b*1e3:.2f} | {a/b:.3f} |")
