"""A TransformerEncoderLayer training step (forward + backward, dropout 0), attn against PyTorch,
interleaved round by round: `attn bench run --backward` against `module(x).backward(grad)`.
d_model 512, 8 heads, ff 2048, batch 8 x 128 tokens, batch_first, 2 threads.

Usage: python bench_layer_train.py   (from the repository root, after `cargo build --release`)
"""
import json, subprocess, statistics, sys, time, torch, warnings
from torch import nn
from safetensors.torch import save_file
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
B, S, E, H, F = 8, 128, 512, 8, 2048
gen = torch.Generator().manual_seed(0)
ctor = {"d_model": E, "nhead": H, "dim_feedforward": F, "dropout": 0.0, "batch_first": True}
m = nn.TransformerEncoderLayer(**ctor).train()
src = torch.randn(B, S, E, generator=gen); g = torch.randn(B, S, E, generator=gen)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "/tmp/enc_w.safetensors")
save_file({"src": src, "grad.output": g}, "/tmp/enc_in.safetensors")
open("/tmp/enc.json", "w").write(json.dumps({"module": "transformer_encoder_layer", **ctor}))
x = src.clone().requires_grad_()
def step():
    m.zero_grad(); x.grad = None
    m(x).backward(g)
def torch_time():
    step(); ts = []
    t0 = time.perf_counter()
    while len(ts) < 5 or time.perf_counter() - t0 < 1.0:
        a = time.perf_counter(); step(); ts.append(time.perf_counter() - a)
    return statistics.median(ts)
def attn_time():
    out = subprocess.run(["target/release/attn", "bench", "run", "--config", "/tmp/enc.json", "--weights", "/tmp/enc_w.safetensors",
        "--input", "/tmp/enc_in.safetensors", "--backward", "--threads", "2", "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["median_s"]
ratios = []
for r in range(3):
    a = attn_time(); t = torch_time(); ratios.append(t / a)
    print(f"round {r}: attn {a*1e3:.1f} ms, torch {t*1e3:.1f} ms, attn/torch speed {t/a:.2f}x", flush=True)
print("median", statistics.median(ratios))
