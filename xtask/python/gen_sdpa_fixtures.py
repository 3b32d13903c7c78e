"""Golden fixtures for `attn sdpa` from PyTorch's scaled_dot_product_attention.

Writes one `<case>.in.safetensors` (q, k, v, optional mask) and one `<case>.want.safetensors`
(out from PyTorch in float32, lse computed in float64 then rounded) per case, plus
`cases.json` with the command-line flags of each case. Run by `cargo xtask codegen`.

Where PyTorch returns NaN for a row with nothing to attend to, the expected row is zeros and
its lse -inf: attn's documented behaviour (docs/SEMANTICS.md).

For `attn sdpa --backward`, each case also gets `<case>.backward.in.safetensors` (the inputs and
a random `grad.out`) and `<case>.backward.want.safetensors` (`grad.q`, `grad.k`, `grad.v`):
PyTorch autograd in float64 through the same attention written with torch ops, where a row with
nothing to attend to has weights 0 (so it passes no gradient, attn's semantics; PyTorch's own
kernels give NaN there). On the cases without such rows the gradients agree with autograd
through `F.scaled_dot_product_attention` in float64 to 1e-12 (checked here).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def lse_reference(q, k, v, mask, scale, causal):
    """Log-sum-exp of each row of the masked, scaled scores, in float64."""
    b, h, s, d = q.shape
    g, t = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(h // g, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    if causal is not None:
        offset = 0 if causal == "top-left" else t - s
        allowed = torch.ones(s, t, dtype=torch.bool).tril(diagonal=offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def attention_f64(q, k, v, mask, scale, causal):
    """Attention in float64 with torch ops, differentiable, rows that see nothing giving 0."""
    b, h, s, d = q.shape
    g, t = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(h // g, dim=1)
    vv = v.repeat_interleave(h // g, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    if causal is not None:
        offset = 0 if causal == "top-left" else t - s
        allowed = torch.ones(s, t, dtype=torch.bool).tril(diagonal=offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    z = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(z == 0, torch.ones_like(z), z)
    return p @ vv


def gradients(q, k, v, mask, scale, causal, dout, kwargs, attn_mask):
    """grad.q, grad.k, grad.v of sum(out * dout) in float64, rounded to float32."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = attention_f64(*leaves, mask, scale, causal)
    out.backward(dout.double())
    grads = [x.grad for x in leaves]
    if causal == "bottom-right":
        # The same mask as a tensor (CausalBias objects do not take float64 inputs here).
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(diagonal=k.shape[2] - q.shape[2])
    if not torch.isnan(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)).any():
        # No empty rows: PyTorch's own SDPA autograd in float64 must give the same.
        check = [x.double().requires_grad_() for x in (q, k, v)]
        m = attn_mask.double() if torch.is_tensor(attn_mask) and attn_mask.dtype != torch.bool else attn_mask
        F.scaled_dot_product_attention(*check, attn_mask=m, **kwargs).backward(dout.double())
        for ours, theirs in zip(grads, (x.grad for x in check)):
            assert torch.allclose(ours, theirs, atol=1e-12, rtol=1e-10), "autograd paths disagree"
    return {f"grad.{n}": gr.float().contiguous() for n, gr in zip("qkv", grads)}


def case(name, b, h, g, s, t, d, dv, *, mask=None, causal=None, scale=None, magnitude=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.rand(b, h, s, d, generator=gen) * 2 - 1) * magnitude
    k = torch.rand(b, g, t, d, generator=gen) * 2 - 1
    v = torch.rand(b, g, t, dv, generator=gen) * 2 - 1
    m = None
    if mask == "bool2d":
        m = torch.rand(s, t, generator=gen) > 0.3
        m[1, :] = False  # a fully masked row
    elif mask == "bool4d":
        m = torch.rand(b, h, s, t, generator=gen) > 0.5
    elif mask == "float_padding":
        m = torch.zeros(b, 1, 1, t)
        m[0, ..., t // 2:] = float("-inf")
        m[-1, ..., :3] = -1e9
    elif mask == "float3d":
        m = torch.randn(h, s, t, generator=gen) * 2
    kwargs = {}
    if g != h:
        kwargs["enable_gqa"] = True
    if scale is not None:
        kwargs["scale"] = scale
    attn_mask = m
    if causal == "top-left":
        kwargs["is_causal"] = True
    elif causal == "bottom-right":
        from torch.nn.attention.bias import causal_lower_right
        attn_mask = causal_lower_right(s, t)
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    eff_scale = scale if scale is not None else 1.0 / d ** 0.5
    lse = lse_reference(q, k, v, m, eff_scale, causal)
    empty = torch.isinf(lse) & (lse < 0)
    out = torch.where(empty[..., None], torch.zeros_like(out), out)
    assert not torch.isnan(out).any(), name
    inputs = {"q": q, "k": k, "v": v}
    if m is not None:
        inputs["mask"] = m
    flags = []
    if causal is not None:
        flags += ["--causal", causal]
    if scale is not None:
        flags += ["--scale", repr(scale)]
    dout = torch.rand(b, h, s, dv, generator=gen) * 2 - 1
    backward_in = dict(inputs, **{"grad.out": dout})
    backward_want = gradients(q, k, v, m, eff_scale, causal, dout, kwargs, attn_mask)
    want = {"out": out.contiguous(), "lse": lse.float().contiguous()}
    return name, inputs, want, flags, backward_in, backward_want


CASES = [
    case("mha", 2, 4, 4, 17, 17, 16, 16),
    case("gqa", 1, 8, 2, 33, 65, 32, 32, seed=1),
    case("mqa_dv", 2, 4, 1, 9, 40, 8, 24, seed=2),
    case("bool2d_fully_masked_row", 1, 2, 2, 6, 70, 16, 16, mask="bool2d", seed=3),
    case("bool4d", 2, 2, 1, 15, 16, 16, 8, mask="bool4d", seed=4),
    case("float_padding", 2, 3, 3, 12, 20, 8, 8, mask="float_padding", seed=5),
    case("float3d", 1, 2, 2, 7, 11, 4, 4, mask="float3d", seed=6),
    case("causal_top_left", 1, 2, 2, 20, 30, 16, 16, causal="top-left", seed=7),
    case("causal_bottom_right", 1, 2, 1, 5, 130, 16, 16, causal="bottom-right", seed=8),
    case("causal_square", 1, 4, 4, 129, 129, 64, 64, causal="top-left", seed=9),
    case("custom_scale", 1, 2, 2, 10, 10, 16, 16, scale=0.05, seed=10),
    case("large_logits", 1, 2, 2, 16, 64, 16, 16, magnitude=1e3, seed=11),
    case("decode_long", 1, 4, 1, 1, 1100, 32, 32, seed=12),
    # Block edges of the backward pass (64-row tiles, 128-key blocks, one pass up to 512 keys).
    case("edges_1", 1, 2, 2, 1, 1, 8, 8, seed=13),
    case("edges_15_17", 2, 2, 1, 15, 17, 16, 24, seed=14),
    case("edges_63_127", 1, 4, 2, 63, 127, 16, 16, mask="bool4d", seed=15),
    case("edges_64_128", 1, 2, 2, 64, 128, 64, 32, causal="bottom-right", seed=16),
    case("edges_65_129", 1, 4, 1, 65, 129, 32, 32, mask="float3d", seed=17),
    case("edges_127_600_two_pass", 1, 4, 2, 127, 600, 16, 16, causal="bottom-right", seed=18),
    case("edges_129_513_two_pass", 1, 2, 2, 129, 513, 8, 8, mask="float_padding", seed=19),
]


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, inputs, want, flags, backward_in, backward_want in CASES:
        save_file(inputs, str(out_dir / f"{name}.in.safetensors"))
        save_file(want, str(out_dir / f"{name}.want.safetensors"))
        save_file(backward_in, str(out_dir / f"{name}.backward.in.safetensors"))
        save_file(backward_want, str(out_dir / f"{name}.backward.want.safetensors"))
        manifest[name] = flags
    (out_dir / "cases.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(CASES)} sdpa cases to {out_dir} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
