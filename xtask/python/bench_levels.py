"""attn at two SIMD levels of one machine, interleaved: each round runs `attn bench sdpa --json` with
ATTN_SIMD=avx2, then with ATTN_SIMD=avx512; medians. Usage: bench_levels.py ATTN_BINARY [ROUNDS].
"""
import json, subprocess, statistics, os, sys
attn = sys.argv[1]
shapes = [("SDPA [1,8,512,64]", ["--batch","1","--heads","8","--seq","512","--head-dim","64"]),
          ("SDPA [1,8,2048,64]", ["--batch","1","--heads","8","--seq","2048","--head-dim","64"]),
          ("SDPA [1,8,2048,64] causal", ["--batch","1","--heads","8","--seq","2048","--head-dim","64","--causal"]),
          ("SDPA [4,12,128,64]", ["--batch","4","--heads","12","--seq","128","--head-dim","64"]),
          ("decode H32 G8 T4096 D128", ["--batch","1","--heads","32","--kv-heads","8","--seq","1","--kv-seq","4096","--head-dim","128"]),
          ("unfused [1,8,1024,64]", ["--batch","1","--heads","8","--seq","1024","--head-dim","64","--path","unfused"]),
          ("flash [1,8,1024,64]", ["--batch","1","--heads","8","--seq","1024","--head-dim","64"])]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
print("| work | avx2 ms | avx512 ms | avx512 / avx2 speed |\n|---|---|---|---|")
for name, args in shapes:
    t = {"avx2": [], "avx512": []}
    for _ in range(rounds):
        for level in ["avx2", "avx512"]:
            env = dict(os.environ, ATTN_SIMD=level)
            out = subprocess.run([attn, "bench", "sdpa", "--threads", "2", "--min-seconds", "0.3", "--json", *args], env=env, capture_output=True, text=True, check=True).stdout
            j = json.loads(out)
            assert j["simd"].startswith(level), j["simd"]
            t[level].append(j["median_s"])
    a, b = statistics.median(t["avx2"]), statistics.median(t["avx512"])
    print(f"| {name} | {a*1e3:.2f} | {b*1e3:.2f} | {a/b:.2f} |")
