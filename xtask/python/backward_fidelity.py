"""attn's SDPA backward against PyTorch's float32 backward, both measured against PyTorch's float64
autograd on the same inputs: the largest error of each gradient relative to the largest
gradient, and their ratio (attn / PyTorch). Cases: a row whose only visible key holds all the
weight (where both must be exact), large logits (|q| up to 110), and random masked cases.

    $ATTN_PYTHON xtask/python/backward_fidelity.py target/release/attn

Needs torch and safetensors. Rows with nothing to attend to are zeros in attn (and pass no
gradient); PyTorch's NaN there is replaced by zeros before its backward, as attn defines them.
"""

import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

ATTN = sys.argv[1] if len(sys.argv) > 1 else "target/release/attn"
TMP = tempfile.mkdtemp()


def case(name, q, k, v, extra_mask, seed):
    b, h, s, d = q.shape
    t = k.shape[2]
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    mask = causal if extra_mask is None else causal & extra_mask
    dout = torch.randn(b, h, s, v.shape[3], generator=g)

    def grads(dtype):
        leaves = [x.to(dtype).clone().requires_grad_(True) for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask)
        torch.nan_to_num(out).backward(dout.to(dtype))
        return [x.grad.double() for x in leaves]

    want, torch_f32 = grads(torch.float64), grads(torch.float32)
    tensors = {"q": q, "k": k, "v": v, "grad.out": dout}
    if extra_mask is not None:
        tensors["mask"] = extra_mask
    src, dst = os.path.join(TMP, f"{name}.in.safetensors"), os.path.join(TMP, f"{name}.out.safetensors")
    save_file({n: x.contiguous() for n, x in tensors.items()}, src)
    subprocess.run([ATTN, "sdpa", "--input", src, "--output", dst, "--backward", "--causal", "bottom-right"],
                   check=True, capture_output=True)
    out = load_file(dst)
    got = [out[f"grad.{n}"].double() for n in "qkv"]
    for n, w, a, p in zip("qkv", want, got, torch_f32):
        scale = max(w.abs().max().item(), 1e-30)
        ea, ep = (a - w).abs().max().item() / scale, (p - w).abs().max().item() / scale
        if scale < 1e-9:
            # The exact gradient is zero (one key per row): absolute errors.
            ea, ep = (a - w).abs().max().item(), (p - w).abs().max().item()
        ratio = "exact, as PyTorch" if ea == 0 and ep == 0 else f"{ea / ep:.2f}" if ep > 0 else "PyTorch exact"
        print(f"| {name} | d{n} | {ea:.2e} | {ep:.2e} | {ratio} |")


print("| case | gradient | attn f32 error | PyTorch f32 error | attn / PyTorch |")
print("| --- | --- | --- | --- | --- |")
gen = torch.Generator().manual_seed(1)
q, k, v = torch.randn(3, 2, 17, 80, generator=gen), torch.randn(3, 2, 1, 80, generator=gen), torch.randn(3, 2, 1, 80, generator=gen)
case("one visible key [3,2,17,80]", q, k, v, torch.rand(3, 2, 17, 1, generator=gen) > 0.3, 2)
for top in [10.0, 30.0, 110.0]:
    q = torch.randn(1, 6, 65, 16, generator=gen)
    q = q / q.abs().max() * top
    k, v = torch.randn(1, 6, 300, 16, generator=gen), torch.randn(1, 6, 300, 64, generator=gen)
    case(f"|q| up to {top:g} [1,6,65,16] T=300", q, k, v, None, 3)
for seed in range(2):
    gg = torch.Generator().manual_seed(10 + seed)
    q = torch.randn(2, 4, 33, 32, generator=gg) * 20
    k, v = torch.randn(2, 4, 70, 32, generator=gg), torch.randn(2, 4, 70, 32, generator=gg)
    case(f"masked, q×20, seed {seed}", q, k, v, torch.rand(2, 1, 33, 70, generator=gg) > 0.2, 20 + seed)
