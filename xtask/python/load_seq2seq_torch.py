"""A checkpoint attn wrote (attn train, Seq2Seq::save) loaded into the contract's PyTorch model (gen_crate_fixtures.py's
ContractSeq2Seq, load_state_dict strict): its greedy logits against `attn translate --json --logits` for the same inputs.

Usage: load_seq2seq_torch.py CHECKPOINT ATTN_BINARY TEXT... (needs torch and safetensors). Prints the largest logit difference
and whether the greedy outputs agree; exits non-zero when they do not.
"""
import ast, json, pathlib, subprocess, sys, types

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# The model and the batch encoding exactly as the fixtures define them (only those definitions: the fixture module
# generates files when imported).
source = (pathlib.Path(__file__).parent / "gen_crate_fixtures.py").read_text()
wanted = [n for n in ast.parse(source).body if getattr(n, "name", None) in ("ContractSeq2Seq", "encode_pairs")]
fixtures = types.SimpleNamespace()
scope = {"torch": torch}
exec(compile(ast.Module(body=wanted, type_ignores=[]), "gen_crate_fixtures.py", "exec"), scope)
fixtures.ContractSeq2Seq, fixtures.encode_pairs = scope["ContractSeq2Seq"], scope["encode_pairs"]

path, attn, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
with safe_open(path, "pt") as f:
    cfg = json.loads(f.metadata()["attn.seq2seq"])
model = fixtures.ContractSeq2Seq(cfg)
model.load_state_dict(load_file(path), strict=True)
model.eval()
got = json.loads(subprocess.run([attn, "translate", "--model", path, "--json", "--logits", *texts],
                                capture_output=True, text=True, check=True).stdout)["translations"]
worst, agree = 0.0, True
for text, item in zip(texts, got):
    src, _, _, src_pad, _ = fixtures.encode_pairs([(text, "")], cfg["src_vocab"], cfg["tgt_vocab"])
    tgt_in = torch.tensor([[1] + item["tokens"][:-1]])  # <bos> and attn's output, teacher-forced
    with torch.no_grad():
        logits = model(src, tgt_in, src_pad, torch.zeros_like(tgt_in, dtype=torch.bool))[0]
    want = torch.tensor(item["logits"])
    worst = max(worst, (logits - want).abs().max().item())
    agree &= logits.argmax(-1).tolist() == item["tokens"]
print(f"{len(texts)} inputs: largest |logit difference| {worst:.2e}; greedy outputs agree: {agree}")
sys.exit(0 if agree and worst < 1e-4 else 1)
