"""Golden fixtures for `attn run` from PyTorch modules.

For each case writes `<case>.json` (the MODULE.json `attn run` reads: constructor fields and
forward flags), `<case>.weights.safetensors` (the module's state_dict), `<case>.in.safetensors`
(inputs) and `<case>.want.safetensors` (PyTorch's outputs). Parameters are drawn at random (not
PyTorch's init, whose zero biases would hide bias bugs). Run by `cargo xtask codegen`.

For `--backward`, `<case>.backward.in.safetensors` (the inputs and `grad.output`) and
`<case>.backward.want.safetensors` (`grad.NAME` of every sequence input and parameter): PyTorch
autograd in float64, the module in training mode with dropout 0, stored as float32.

Where PyTorch returns NaN for a query with no visible key, the expected output row (and weights
row) is zeros: attn's documented behaviour (docs/SEMANTICS.md).
"""

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file

FORWARD_FLAGS = {"need_weights", "average_attn_weights", "is_causal"}


def randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def seq(gen, batch, length, dim, batch_first, unbatched=False):
    if unbatched:
        return torch.randn(length, dim, generator=gen)
    shape = (batch, length, dim) if batch_first else (length, batch, dim)
    return torch.randn(*shape, generator=gen)


def mha_case(name, ctor, *, b=2, s=5, t=7, self_attn=False, flags=None, kpm=None, mask=None, unbatched=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flags = flags or {}
    module = nn.MultiheadAttention(**ctor).eval()
    randomize(module, gen)
    e = ctor["embed_dim"]
    h = ctor["num_heads"]
    kdim = ctor.get("kdim") or e
    vdim = ctor.get("vdim") or e
    bf = ctor.get("batch_first", False)
    if self_attn:
        t = s
    query = seq(gen, b, s, e, bf, unbatched)
    if self_attn:
        key = value = query
    else:
        key = seq(gen, b, t, kdim, bf, unbatched)
        value = seq(gen, b, t, vdim, bf, unbatched)
    inputs = {"query": query, "key": key, "value": value}
    kwargs = {}
    if kpm == "bool":
        m = torch.rand(b, t, generator=gen) > 0.7
        m[0, :] = False
        m[-1, -2:] = True
        kwargs["key_padding_mask"] = m
    elif kpm == "float":
        kwargs["key_padding_mask"] = torch.where(torch.rand(b, t, generator=gen) > 0.7, -1e9, 0.0)
    if mask == "bool2d_fully_masked":
        m = torch.rand(s, t, generator=gen) > 0.6
        m[1, :] = True  # query 1 sees nothing
        kwargs["attn_mask"] = m
    elif mask == "float3d":
        kwargs["attn_mask"] = torch.randn(b * h, s, t, generator=gen)
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(s)
    elif mask == "causal_bool":
        kwargs["attn_mask"] = torch.ones(s, t, dtype=torch.bool).triu(1)
    inputs.update(kwargs)
    call_flags = {"need_weights": flags.get("need_weights", True),
                  "average_attn_weights": flags.get("average_attn_weights", True),
                  "is_causal": flags.get("is_causal", False)}
    with torch.no_grad():
        out, weights = module(query, key, value, **kwargs, **call_flags)
    # A query with nothing to attend to: attn's attention output is zeros (PyTorch's is NaN), so
    # the module's output row is the output projection of zeros: its bias.
    nan_rows = torch.isnan(out).any(dim=-1, keepdim=True)
    bias = module.out_proj.bias if module.out_proj.bias is not None else torch.zeros(e)
    out = torch.where(nan_rows, bias.detach().expand_as(out), out)
    want = {"output": out.contiguous()}
    if call_flags["need_weights"]:
        want["attn_weights"] = torch.nan_to_num(weights, nan=0.0).contiguous()
    config = {"module": "multihead_attention", **ctor, **flags}
    state = {k: v.contiguous() for k, v in module.state_dict().items()}

    def call(m, x):
        kw = {k: x[k] for k in kwargs}
        if mask == "bool2d_fully_masked":
            # attn's semantics for a query with nothing to attend to (zeros from attention, so
            # the output row is out_proj's bias) in a form autograd can differentiate: the row
            # attends to everything, and its output is replaced by the bias.
            empty = kw["attn_mask"].all(dim=-1)
            kw["attn_mask"] = kw["attn_mask"] & ~empty[:, None]
            out = m(x["query"], x["key"], x["value"], **kw, **call_flags)[0]
            rows = empty[:, None, None] if not bf else empty[None, :, None]
            return torch.where(rows, m.out_proj.bias.expand_as(out), out)
        return m(x["query"], x["key"], x["value"], **kw, **call_flags)[0]

    return name, config, state, inputs, want, (module, call)


def masks(gen, kind, b, l, s_len, h):
    """An attn_mask-style mask: `causal` (float -inf above the diagonal), `bool`, `float`."""
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(l)
    if kind == "bool":
        m = torch.rand(l, s_len, generator=gen) > 0.75
        m[:, 0] = False  # every query keeps one key
        return m
    if kind == "float":
        return torch.randn(l, s_len, generator=gen)
    if kind == "float3d":
        return torch.randn(b * h, l, s_len, generator=gen)
    return None


def padding(gen, kind, b, t):
    if kind is None:
        return None
    m = torch.rand(b, t, generator=gen) > 0.7
    m[:, 0] = False
    if kind == "bool":
        return m
    return torch.where(m, -1e9, 0.0)


def layer_ctor(layer):
    ctor = {"d_model": 32, "nhead": 4, "dim_feedforward": 48}
    ctor.update(layer)
    return ctor


def encoder_case(name, layer, *, stack=None, b=2, s=9, mask=None, kpm=None, causal=False, unbatched=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ctor = layer_ctor(layer)
    module = nn.TransformerEncoderLayer(**ctor)
    config = {"module": "transformer_encoder_layer", **ctor}
    if stack is not None:
        norm = nn.LayerNorm(ctor["d_model"], eps=ctor.get("layer_norm_eps", 1e-5), bias=ctor.get("bias", True)) if stack["norm"] else None
        module = nn.TransformerEncoder(module, stack["num_layers"], norm=norm, enable_nested_tensor=False)
        config = {"module": "transformer_encoder", "layer": ctor, "num_layers": stack["num_layers"],
                  "norm": stack["norm"], "enable_nested_tensor": False}
    module.eval()
    randomize(module, gen)
    bf = ctor.get("batch_first", False)
    e, h = ctor["d_model"], ctor["nhead"]
    src = seq(gen, b, s, e, bf, unbatched)
    inputs = {"src": src}
    m = masks(gen, mask, b, s, s, h)
    p = padding(gen, kpm, b, s)
    kwargs = {}
    if m is not None:
        inputs["src_mask"] = kwargs["mask" if stack is not None else "src_mask"] = m
    if p is not None:
        p = p[0] if unbatched else p
        inputs["src_key_padding_mask"] = kwargs["src_key_padding_mask"] = p
    if causal:
        kwargs["is_causal"] = True
        config["is_causal"] = True
    with torch.no_grad():
        out = module(src, **kwargs)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}

    def call(m, x):
        kw = dict(kwargs)
        for k in ("mask", "src_mask"):
            if k in kw:
                kw[k] = x["src_mask"]
        if "src_key_padding_mask" in kw:
            kw["src_key_padding_mask"] = x["src_key_padding_mask"]
        return m(x["src"], **kw)

    return name, config, state, inputs, {"output": out.contiguous()}, (module, call)


def decoder_case(name, layer, *, stack=None, b=2, t=7, s=10, tgt_mask=None, memory_mask=None, tgt_kpm=None,
                 memory_kpm=None, tgt_causal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ctor = layer_ctor(layer)
    module = nn.TransformerDecoderLayer(**ctor)
    config = {"module": "transformer_decoder_layer", **ctor}
    if stack is not None:
        norm = nn.LayerNorm(ctor["d_model"], eps=ctor.get("layer_norm_eps", 1e-5)) if stack["norm"] else None
        module = nn.TransformerDecoder(module, stack["num_layers"], norm=norm)
        config = {"module": "transformer_decoder", "layer": ctor, "num_layers": stack["num_layers"], "norm": stack["norm"]}
    module.eval()
    randomize(module, gen)
    bf = ctor.get("batch_first", False)
    e, h = ctor["d_model"], ctor["nhead"]
    tgt = seq(gen, b, t, e, bf)
    memory = seq(gen, b, s, e, bf)
    inputs = {"tgt": tgt, "memory": memory}
    kwargs = {}
    for key, value in [("tgt_mask", masks(gen, tgt_mask, b, t, t, h)), ("memory_mask", masks(gen, memory_mask, b, t, s, h)),
                       ("tgt_key_padding_mask", padding(gen, tgt_kpm, b, t)),
                       ("memory_key_padding_mask", padding(gen, memory_kpm, b, s))]:
        if value is not None:
            inputs[key] = kwargs[key] = value
    if tgt_causal:
        kwargs["tgt_is_causal"] = True
        config["tgt_is_causal"] = True
    with torch.no_grad():
        out = module(tgt, memory, **kwargs)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}

    def call(m, x):
        kw = {k: (x[k] if k in x else v) for k, v in kwargs.items()}
        return m(x["tgt"], x["memory"], **kw)

    return name, config, state, inputs, {"output": out.contiguous()}, (module, call)


def transformer_case(name, ctor, *, b=2, s=8, t=6, src_kpm=None, tgt_causal=True, memory_kpm=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    module = nn.Transformer(**ctor).eval()
    randomize(module, gen)
    bf = ctor.get("batch_first", False)
    e = ctor["d_model"]
    src = seq(gen, b, s, e, bf)
    tgt = seq(gen, b, t, e, bf)
    inputs = {"src": src, "tgt": tgt}
    kwargs = {}
    config = {"module": "transformer", **ctor}
    if src_kpm:
        inputs["src_key_padding_mask"] = kwargs["src_key_padding_mask"] = padding(gen, src_kpm, b, s)
    if memory_kpm:
        inputs["memory_key_padding_mask"] = kwargs["memory_key_padding_mask"] = inputs.get("src_key_padding_mask", padding(gen, memory_kpm, b, s))
    if tgt_causal:
        inputs["tgt_mask"] = kwargs["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
        kwargs["tgt_is_causal"] = True
        config["tgt_is_causal"] = True
    with torch.no_grad():
        out = module(src, tgt, **kwargs)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}

    def call(m, x):
        kw = {k: (x[k] if k in x else v) for k, v in kwargs.items()}
        return m(x["src"], x["tgt"], **kw)

    return name, config, state, inputs, {"output": out.contiguous()}, (module, call)


CASES = [
    mha_case("mha_basic", {"embed_dim": 16, "num_heads": 4}, seed=1),
    mha_case("mha_batch_first_no_weights", {"embed_dim": 16, "num_heads": 2, "batch_first": True},
             flags={"need_weights": False}, seed=2),
    mha_case("mha_self_fused", {"embed_dim": 24, "num_heads": 3, "batch_first": True}, self_attn=True, seed=3),
    mha_case("mha_no_bias", {"embed_dim": 16, "num_heads": 4, "bias": False}, seed=4),
    mha_case("mha_bias_kv", {"embed_dim": 16, "num_heads": 4, "add_bias_kv": True}, seed=5),
    mha_case("mha_zero_attn", {"embed_dim": 16, "num_heads": 4, "add_zero_attn": True}, seed=6),
    mha_case("mha_bias_kv_zero_attn_kpm", {"embed_dim": 16, "num_heads": 2, "add_bias_kv": True, "add_zero_attn": True},
             kpm="bool", seed=7),
    mha_case("mha_kdim_vdim_per_head", {"embed_dim": 16, "num_heads": 4, "kdim": 12, "vdim": 20, "batch_first": True},
             flags={"average_attn_weights": False}, seed=8),
    mha_case("mha_bool_mask_fully_masked_row", {"embed_dim": 16, "num_heads": 4}, mask="bool2d_fully_masked", seed=9),
    mha_case("mha_float_mask_3d", {"embed_dim": 16, "num_heads": 4, "batch_first": True}, mask="float3d", seed=10),
    mha_case("mha_float_kpm", {"embed_dim": 16, "num_heads": 4}, kpm="float", seed=11),
    mha_case("mha_causal", {"embed_dim": 32, "num_heads": 4, "batch_first": True}, self_attn=True, mask="causal",
             flags={"is_causal": True, "need_weights": False}, seed=12),
    mha_case("mha_causal_weights_kpm", {"embed_dim": 16, "num_heads": 2, "batch_first": True}, self_attn=True,
             mask="causal", kpm="bool", flags={"is_causal": True, "average_attn_weights": False}, seed=13),
    mha_case("mha_unbatched", {"embed_dim": 16, "num_heads": 4}, unbatched=True, seed=14),
    mha_case("mha_dropout_ignored", {"embed_dim": 16, "num_heads": 4, "dropout": 0.1}, seed=15),
    mha_case("mha_long", {"embed_dim": 64, "num_heads": 4, "batch_first": True}, b=2, s=140, t=300,
             kpm="bool", seed=16),
    encoder_case("enc_layer_post_relu", {}, mask="bool", seed=20),
    encoder_case("enc_layer_pre_gelu_batch_first", {"norm_first": True, "activation": "gelu", "batch_first": True},
                 kpm="bool", seed=21),
    encoder_case("enc_layer_causal", {"batch_first": True}, mask="causal", causal=True, seed=22),
    encoder_case("enc_layer_no_bias_eps", {"bias": False, "layer_norm_eps": 1e-6}, mask="float3d", kpm="float", seed=23),
    encoder_case("enc_layer_unbatched", {}, unbatched=True, kpm="bool", seed=24),
    encoder_case("encoder_stack_norm", {"batch_first": True}, stack={"num_layers": 2, "norm": True}, kpm="bool", seed=25),
    encoder_case("encoder_stack_pre_norm", {"norm_first": True, "activation": "gelu"},
                 stack={"num_layers": 3, "norm": False}, mask="float", seed=26),
    decoder_case("dec_layer_post", {}, tgt_mask="causal", tgt_causal=True, memory_kpm="bool", seed=30),
    decoder_case("dec_layer_pre_gelu_batch_first", {"norm_first": True, "activation": "gelu", "batch_first": True},
                 tgt_mask="bool", memory_mask="float", tgt_kpm="bool", seed=31),
    decoder_case("dec_layer_masks_3d", {"batch_first": True}, tgt_mask="float3d", memory_mask="float3d",
                 memory_kpm="float", seed=32),
    decoder_case("decoder_stack_norm", {"batch_first": True}, stack={"num_layers": 2, "norm": True},
                 tgt_mask="causal", tgt_causal=True, memory_kpm="bool", seed=33),
    transformer_case("transformer_batch_first", {"d_model": 32, "nhead": 4, "num_encoder_layers": 2,
                     "num_decoder_layers": 2, "dim_feedforward": 48, "batch_first": True},
                     src_kpm="bool", memory_kpm="bool", seed=40),
    transformer_case("transformer_seq_first_pre_norm_gelu", {"d_model": 24, "nhead": 3, "num_encoder_layers": 1,
                     "num_decoder_layers": 2, "dim_feedforward": 40, "norm_first": True, "activation": "gelu"},
                     seed=41),
]


SEQUENCE_INPUTS = ("query", "key", "value", "src", "tgt", "memory")


def gradients(name, module, call, inputs, want, seed):
    """`grad.output` and PyTorch autograd's gradients in float64 of every sequence input and
    every parameter, the module in training mode with dropout 0 (the contract's `--backward`).
    Each input file tensor is its own leaf, even when the values are equal."""
    gen = torch.Generator().manual_seed(1000 + seed)
    m = copy.deepcopy(module).double().train()
    for sub in m.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if isinstance(sub, nn.MultiheadAttention):
            sub.dropout = 0.0
    x = {}
    for k, v in inputs.items():
        if v.dtype == torch.bool:
            x[k] = v
        else:
            x[k] = v.double().clone().requires_grad_(k in SEQUENCE_INPUTS)
    out = call(m, x)
    forward_error = (out.float() - want["output"]).abs().max().item()
    assert forward_error < 1e-4, f"{name}: float64 training forward is {forward_error} off the float32 eval output"
    grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_output)
    grads = {f"grad.{k}": v.grad for k, v in x.items() if k in SEQUENCE_INPUTS}
    grads.update({f"grad.{k}": p.grad for k, p in m.named_parameters()})
    for k, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), f"{name}: {k} is {g}"
    backward_in = {k: v.clone().contiguous() for k, v in inputs.items()}
    backward_in["grad.output"] = grad_output.float().contiguous()
    return backward_in, {k: g.float().contiguous() for k, g in grads.items()}


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for seed, (name, config, state, inputs, want, (module, call)) in enumerate(CASES):
        (out_dir / f"{name}.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        save_file(state, str(out_dir / f"{name}.weights.safetensors"))
        save_file({k: v.clone().contiguous() for k, v in inputs.items()}, str(out_dir / f"{name}.in.safetensors"))
        save_file(want, str(out_dir / f"{name}.want.safetensors"))
        backward_in, backward_want = gradients(name, module, call, inputs, want, seed)
        save_file(backward_in, str(out_dir / f"{name}.backward.in.safetensors"))
        save_file(backward_want, str(out_dir / f"{name}.backward.want.safetensors"))
        names.append(name)
    (out_dir / "cases.json").write_text(json.dumps(sorted(names), indent=1) + "\n")
    print(f"wrote {len(names)} module cases to {out_dir} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
