"""Golden fixtures for the library crates' own tests: attn-core (multi-head attention) and attn-nn
(encoder and decoder layers, stacks, `nn.Transformer`, BERT), so a bug in a crate fails a test of
that crate and not only the CLI's end-to-end goldens.

Each case is one safetensors file `<case>.safetensors`:
- metadata `config`: the MODULE.json of `attn run` (`"module"`, constructor fields, forward flags);
  metadata `self_attention`: `"true"` when query, key and value are one tensor (only `query` is
  stored), so the test takes the fused self-attention path as PyTorch does;
- `param.NAME`: the module's state dict; `input.NAME`: the forward's inputs under PyTorch's
  argument names (boolean masks as BOOL); `expected.NAME`: PyTorch's outputs.

Parameters are random (not PyTorch's init, whose zero biases and unit norm weights would hide
bugs), and the layer norms use epsilons other than PyTorch's default 1e-5, so an implementation
that ignores the configured epsilon fails. Run by `cargo xtask codegen` with
`crates/attn-core/tests/fixtures` and `crates/attn-nn/tests/fixtures` as arguments.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from gen_module_fixtures import decoder_case, encoder_case, mha_case, transformer_case  # noqa: E402

MHA_CASES = [
    # The fused self-attention path (one [3E, E] projection) with three heads, so a head swap
    # or a wrong head stride changes the output.
    (mha_case("self_fused_weights", {"embed_dim": 24, "num_heads": 3, "batch_first": True}, self_attn=True,
              b=2, s=6, seed=101), True),
    (mha_case("self_fused_seq_first_per_head_kpm_causal", {"embed_dim": 16, "num_heads": 4}, self_attn=True,
              mask="causal", kpm="bool", flags={"is_causal": True, "average_attn_weights": False}, s=9, seed=102),
     True),
    (mha_case("self_fused_float_mask_no_weights", {"embed_dim": 32, "num_heads": 4, "batch_first": True},
              self_attn=True, mask="float3d", flags={"need_weights": False}, s=7, seed=103), True),
    (mha_case("self_fused_no_bias", {"embed_dim": 16, "num_heads": 2, "bias": False, "batch_first": True},
              self_attn=True, s=5, seed=104), True),
    (mha_case("self_fused_block_edge", {"embed_dim": 64, "num_heads": 4, "batch_first": True}, self_attn=True,
              kpm="bool", b=2, s=130, seed=105), True),
    (mha_case("self_fused_unbatched", {"embed_dim": 16, "num_heads": 4}, self_attn=True, unbatched=True, s=6,
              seed=106), True),
    (mha_case("self_fused_fully_masked_row", {"embed_dim": 16, "num_heads": 4}, self_attn=True,
              mask="bool2d_fully_masked", s=7, seed=107), True),
    (mha_case("cross_kdim_vdim_per_head", {"embed_dim": 16, "num_heads": 4, "kdim": 12, "vdim": 20,
                                           "batch_first": True}, flags={"average_attn_weights": False}, seed=108), False),
    (mha_case("cross_bias_kv_zero_attn_kpm", {"embed_dim": 16, "num_heads": 2, "add_bias_kv": True,
                                              "add_zero_attn": True}, kpm="bool", seed=109), False),
    (mha_case("cross_float_kpm", {"embed_dim": 24, "num_heads": 6, "batch_first": True}, kpm="float", s=4, t=11,
              seed=110), False),
]


def causal_extra_key_cases():
    """`is_causal=True` with a causal `attn_mask` on modules that append key rows (`add_bias_kv`,
    `add_zero_attn`): every combination of mask kind, need_weights and key padding. PyTorch
    applies the causal mask over all keys, appended ones included, when neither weights nor key
    padding are asked for, and the padded `attn_mask` otherwise; the two disagree on whether a
    query sees the appended rows."""
    cases = []
    seed = 120
    for extra in ("bias_kv", "zero_attn", "bias_kv_zero_attn"):
        ctor = {"embed_dim": 8, "num_heads": 2, "batch_first": True,
                "add_bias_kv": "bias_kv" in extra, "add_zero_attn": "zero_attn" in extra}
        for mask in ("causal", "causal_bool"):
            for need in (True, False):
                for kpm in (None, "bool"):
                    seed += 1
                    name = f"causal_{extra}_{'float' if mask == 'causal' else 'bool'}_mask" \
                           f"_{'weights' if need else 'no_weights'}{'_kpm' if kpm else ''}"
                    cases.append((mha_case(name, ctor, self_attn=True, mask=mask, kpm=kpm, s=5,
                                           flags={"is_causal": True, "need_weights": need}, seed=seed), True))
    return cases


MHA_CASES += causal_extra_key_cases()

LAYER_CASES = [
    encoder_case("enc_post_relu_eps", {"layer_norm_eps": 1e-3, "batch_first": True}, mask="bool", seed=201),
    encoder_case("enc_pre_gelu_eps", {"norm_first": True, "activation": "gelu", "layer_norm_eps": 0.05},
                 kpm="bool", seed=202),
    encoder_case("enc_post_gelu_no_bias", {"activation": "gelu", "bias": False, "layer_norm_eps": 1e-4,
                                           "batch_first": True}, mask="float3d", kpm="float", seed=203),
    encoder_case("enc_pre_relu_causal", {"norm_first": True, "layer_norm_eps": 1e-3, "batch_first": True},
                 mask="causal", causal=True, seed=204),
    encoder_case("enc_post_relu_block_edge", {"d_model": 64, "nhead": 4, "dim_feedforward": 96,
                                              "layer_norm_eps": 2e-3, "batch_first": True}, b=2, s=131,
                 kpm="bool", seed=205),
    decoder_case("dec_post_relu_eps", {"layer_norm_eps": 1e-3}, tgt_mask="causal", tgt_causal=True,
                 memory_kpm="bool", seed=211),
    decoder_case("dec_pre_gelu_eps", {"norm_first": True, "activation": "gelu", "layer_norm_eps": 0.02,
                                      "batch_first": True}, tgt_mask="bool", memory_mask="float", tgt_kpm="bool",
                 seed=212),
    decoder_case("dec_post_gelu_no_bias", {"activation": "gelu", "bias": False, "layer_norm_eps": 1e-4,
                                           "batch_first": True}, tgt_mask="float3d", memory_kpm="float", seed=213),
    encoder_case("encoder_stack_pre_norm_final_norm", {"norm_first": True, "activation": "gelu",
                                                       "layer_norm_eps": 1e-3, "batch_first": True},
                 stack={"num_layers": 3, "norm": True}, kpm="bool", seed=221),
    encoder_case("encoder_stack_post_relu", {"layer_norm_eps": 1e-4}, stack={"num_layers": 2, "norm": False},
                 mask="float", seed=222),
    decoder_case("decoder_stack_post_norm", {"layer_norm_eps": 1e-3, "batch_first": True},
                 stack={"num_layers": 2, "norm": True}, tgt_mask="causal", tgt_causal=True, memory_kpm="bool",
                 seed=223),
    decoder_case("decoder_stack_pre_gelu", {"norm_first": True, "activation": "gelu", "layer_norm_eps": 0.01},
                 stack={"num_layers": 2, "norm": True}, tgt_mask="bool", seed=224),
    transformer_case("transformer_pre_gelu_eps", {"d_model": 24, "nhead": 3, "num_encoder_layers": 2,
                                                  "num_decoder_layers": 1, "dim_feedforward": 40, "norm_first": True,
                                                  "activation": "gelu", "layer_norm_eps": 1e-3,
                                                  "batch_first": True}, src_kpm="bool", memory_kpm="bool", seed=231),
    transformer_case("transformer_post_relu", {"d_model": 16, "nhead": 2, "num_encoder_layers": 1,
                                               "num_decoder_layers": 2, "dim_feedforward": 24,
                                               "layer_norm_eps": 1e-4}, seed=232),
]


def bert_case(name, *, hidden=32, heads=4, layers=2, intermediate=37, eps=1e-3, act="gelu", seed=0):
    """A tiny random BertModel (transformers) run on a padded batch: `expected.last_hidden_state`
    holds the real tokens' states (padding rows zeroed, they mean nothing)."""
    from transformers import BertConfig, BertModel

    gen = torch.Generator().manual_seed(seed)
    config = dict(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, hidden_act=act, max_position_embeddings=40, type_vocab_size=2,
                  layer_norm_eps=eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if pname.endswith("LayerNorm.weight") else 0.0))
    lengths = torch.tensor([9, 3, 14])
    b, s = len(lengths), int(lengths.max())
    ids = torch.randint(0, 60, (b, s), generator=gen)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = out * mask[:, :, None]
    meta = {"module": "bert", **config, "model_type": "bert", "architectures": ["BertModel"]}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    inputs = {"input_ids": ids.to(torch.float32), "lengths": lengths.to(torch.float32)}
    return name, meta, state, inputs, {"last_hidden_state": out.contiguous()}


BERT_CASES = [
    bert_case("bert_gelu_eps", seed=301),
    bert_case("bert_relu_odd_sizes", hidden=24, heads=3, layers=3, intermediate=29, eps=1e-2, act="relu", seed=302),
]


def write(out_dir, case, self_attention=False):
    name, config, state, inputs, want = case
    tensors = {f"param.{k}": v.contiguous() for k, v in state.items()}
    for k, v in inputs.items():
        if self_attention and k in ("key", "value"):
            continue
        tensors[f"input.{k}"] = v.clone().contiguous()
    tensors.update({f"expected.{k}": v.contiguous() for k, v in want.items()})
    meta = {"config": json.dumps(config, sort_keys=True)}
    if self_attention:
        meta["self_attention"] = "true"
    save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata=meta)
    return name


def noam(step, d_model=16, warmup=2):
    """The inverse-square-root schedule's factor at 1-based `step` (attn's `Schedule::Noam`)."""
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def adamw_fixture(out_dir):
    """Three steps of torch.optim.AdamW with clip_grad_norm_ and a noam LambdaLR: the initial
    parameters, each step's gradients, and the parameters, total norm and learning rate after
    each step, in `optim/adamw.safetensors` (not a module case: not in cases.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(401)
    shapes = {"layer.weight": (7, 5), "layer.bias": (7,), "norm.weight": (5,)}
    params = {n: torch.nn.Parameter(torch.randn(*s, generator=gen)) for n, s in shapes.items()}
    tensors = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=3e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: noam(epoch + 1))
    for step in range(3):
        # Step 1's gradients are small, so clipping leaves them alone there.
        scale = 0.01 if step == 1 else 1.0
        for n, p in params.items():
            p.grad = torch.randn(*shapes[n], generator=gen) * scale
            tensors[f"grad.{step}.{n}"] = p.grad.clone()
        total = torch.nn.utils.clip_grad_norm_(params.values(), max_norm=0.5)
        tensors[f"norm.{step}"] = total.reshape(1).float()
        tensors[f"lr.{step}"] = torch.tensor([opt.param_groups[0]["lr"]], dtype=torch.float32)
        opt.step()
        sched.step()
        for n, p in params.items():
            tensors[f"after.{step}.{n}"] = p.detach().clone()
    meta = {"config": json.dumps({"lr": 3e-2, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.05,
                                  "max_norm": 0.5, "schedule": {"noam": {"d_model": 16, "warmup": 2}}})}
    save_file(tensors, str(out_dir / "adamw.safetensors"), metadata=meta)


def transformer_adamw_fixture(out_dir):
    """Three training steps of a small nn.Transformer (2 encoder + 1 decoder layers, d_model 16,
    pre-norm, batch_first, dropout 0) in float64: loss = ½·Σ(output − target)², backward,
    clip_grad_norm_(1.0), torch.optim.AdamW. Writes the initial parameters, the inputs, and each
    step's loss, total gradient norm and parameters after the step, in
    `optim/transformer_adamw.safetensors` (float32).

    Adam divides each gradient by its own size, so an entry whose gradient is near rounding
    noise moves by noise: the fixture must be well-conditioned for a 1e-5 comparison to mean
    anything. Measured with PyTorch itself (its float32 run against its float64 run, key biases
    aside): pre-norm 1.1e-6, post-norm at the same scale 1.7e-4. Hence pre-norm; the post-norm
    gradients are checked module by module in the `attn run --backward` goldens."""
    gen = torch.Generator().manual_seed(402)
    ctor = {"d_model": 16, "nhead": 2, "num_encoder_layers": 2, "num_decoder_layers": 1,
            "dim_feedforward": 24, "dropout": 0.0, "batch_first": True, "activation": "gelu",
            "norm_first": True}
    model = torch.nn.Transformer(**ctor).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    # Parameters as float32 values, so attn starts from exactly the same numbers.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().double())
    b, s, t, e = 2, 5, 4, 16
    src = torch.randn(b, s, e, generator=gen).double()
    tgt = torch.randn(b, t, e, generator=gen).double()
    target = torch.randn(b, t, e, generator=gen).double()
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[1, -2:] = True
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    tensors = {f"init.{n}": p.detach().float().clone() for n, p in model.named_parameters()}
    tensors.update({"src": src.float(), "tgt": tgt.float(), "target": target.float(),
                    "src_key_padding_mask": padding, "tgt_mask": tgt_mask.float()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    for step in range(3):
        opt.zero_grad()
        out = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=padding,
                    memory_key_padding_mask=padding)
        loss = 0.5 * ((out - target) ** 2).sum()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        tensors[f"loss.{step}"] = loss.detach().float().reshape(1)
        tensors[f"norm.{step}"] = total.detach().float().reshape(1)
        for n, p in model.named_parameters():
            tensors[f"after.{step}.{n}"] = p.detach().float().clone()
    meta = {"config": json.dumps(ctor), "optimizer": json.dumps(
        {"lr": 1e-2, "betas": [0.9, 0.98], "eps": 1e-9, "weight_decay": 0.01, "max_norm": 1.0})}
    save_file(tensors, str(out_dir / "transformer_adamw.safetensors"), metadata=meta)


SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class ContractSeq2Seq(torch.nn.Module):
    """The sequence-to-sequence model of docs/CLI.md, as a PyTorch user writes it."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.d = d
        self.src_embed = torch.nn.Embedding(len(cfg["src_vocab"]), d)
        self.tgt_embed = torch.nn.Embedding(len(cfg["tgt_vocab"]), d)
        keys = ["d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "dropout",
                "activation", "layer_norm_eps", "norm_first"]
        self.transformer = torch.nn.Transformer(**{k: cfg[k] for k in keys}, batch_first=True)
        self.generator = torch.nn.Linear(d, len(cfg["tgt_vocab"]))
        pe = torch.zeros(cfg["max_len"], d, dtype=torch.float64)
        pos = torch.arange(cfg["max_len"], dtype=torch.float64)[:, None]
        div = 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        pe[:, 0::2] = torch.sin(pos / div)
        pe[:, 1::2] = torch.cos(pos / div)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, src, tgt_in, src_pad, tgt_pad):
        scale = self.d ** 0.5
        xs = self.src_embed(src) * scale + self.pe[: src.shape[1]].to(self.src_embed.weight.dtype)
        xt = self.tgt_embed(tgt_in) * scale + self.pe[: tgt_in.shape[1]].to(self.tgt_embed.weight.dtype)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=xs.dtype)
        out = self.transformer(xs, xt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                               tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        return self.generator(out)


def encode_pairs(pairs, src_vocab, tgt_vocab):
    """Source ids + <eos>, decoder input <bos> + target ids, labels target ids + <eos>, padded."""
    si = {c: i for i, c in enumerate(src_vocab)}
    ti = {c: i for i, c in enumerate(tgt_vocab)}
    src = [[si.get(c, 3) for c in s] + [2] for s, _ in pairs]
    tgt = [[ti.get(c, 3) for c in t] for _, t in pairs]
    s_len, t_len = max(map(len, src)), max(len(t) + 1 for t in tgt)
    pad = lambda rows, n: torch.tensor([r + [0] * (n - len(r)) for r in rows])
    src_ids = pad(src, s_len)
    tgt_in = pad([[1] + t for t in tgt], t_len)
    labels = pad([t + [2] for t in tgt], t_len)
    return src_ids, tgt_in, labels, src_ids == 0, torch.tensor([[j > len(t) for j in range(t_len)] for t in tgt])


def seq2seq_fixture(out_dir):
    """A small random model of the contract's shape saved as a checkpoint (tensors and the
    `attn.seq2seq` metadata), and, in float64, its teacher-forced logits on a few pairs, the
    loss with label smoothing 0.1, and every parameter's gradient: `seq2seq/tiny.safetensors`
    and `seq2seq/tiny.expected.safetensors`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [("28 Nov 2026", "2026-11-28"), ("1.2.1999", "1999-02-01"), ("Monday, 3 March 1902", "1902-03-03"),
             ("the 4th of July 2000", "2000-07-04")]
    src_vocab = SPECIALS + sorted({c for s, _ in pairs for c in s if c != "J"})  # 'J' left out: <unk>
    tgt_vocab = SPECIALS + sorted({c for _, t in pairs for c in t})
    cfg = {"d_model": 16, "nhead": 2, "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 32,
           "dropout": 0.0, "activation": "relu", "layer_norm_eps": 1e-5, "norm_first": False, "batch_first": True,
           "max_len": 32, "src_vocab": src_vocab, "tgt_vocab": tgt_vocab}
    gen = torch.Generator().manual_seed(403)
    model = ContractSeq2Seq(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "tiny.safetensors"), metadata={"attn.seq2seq": json.dumps(cfg)})
    model = model.double().train()
    src, tgt_in, labels, src_pad, tgt_pad = encode_pairs(pairs, src_vocab, tgt_vocab)
    logits = model(src, tgt_in, src_pad, tgt_pad)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=0, label_smoothing=0.1)
    loss.backward()
    expected = {"logits": logits.detach().float().contiguous(), "loss": loss.detach().float().reshape(1)}
    expected.update({f"grad.{n}": p.grad.float().contiguous() for n, p in model.named_parameters()})
    save_file(expected, str(out_dir / "tiny.expected.safetensors"), metadata={"pairs": json.dumps(pairs)})


def main():
    core_dir, nn_dir = Path(sys.argv[1]), Path(sys.argv[2])
    for d in (core_dir, nn_dir):
        d.mkdir(parents=True, exist_ok=True)
    core = [write(core_dir, case, self_attention) for case, self_attention in MHA_CASES]
    (core_dir / "cases.json").write_text(json.dumps(sorted(core), indent=1) + "\n")
    nn_names = [write(nn_dir, case) for case in LAYER_CASES + BERT_CASES]
    (nn_dir / "cases.json").write_text(json.dumps(sorted(nn_names), indent=1) + "\n")
    adamw_fixture(nn_dir / "optim")
    transformer_adamw_fixture(nn_dir / "optim")
    seq2seq_fixture(nn_dir / "seq2seq")
    print(f"wrote {len(core)} attn-core cases and {len(nn_names)} attn-nn cases (torch {torch.__version__})")


if __name__ == "__main__":
    main()
