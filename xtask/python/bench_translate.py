"""Greedy translation of 1,000 dates with the shipped checkpoint: `attn translate --input`
(incremental decoding through the KV caches, batched) against PyTorch loading the same
checkpoint into the contract's model (`ContractSeq2Seq` of gen_crate_fixtures.py) and decoding
greedily, batched, the usual way with `nn.Transformer`: the whole prefix recomputed at every step.
Also checks that both give the same outputs. Alternated rounds; medians.

Usage: python bench_translate.py ATTN_BINARY THREADS ROUNDS
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from gen_crate_fixtures import ContractSeq2Seq  # noqa: E402

N = 1000


def load(path):
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["attn.seq2seq"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = ContractSeq2Seq(cfg)
    model.load_state_dict(state)
    return model.eval(), cfg


@torch.no_grad()
def torch_greedy(model, cfg, sources):
    si = {c: i for i, c in enumerate(cfg["src_vocab"])}
    vocab = cfg["tgt_vocab"]
    outputs = []
    for start in range(0, len(sources), 256):
        chunk = sources[start:start + 256]
        ids = [[si.get(c, 3) for c in s] + [2] for s in chunk]
        s_len = max(map(len, ids))
        src = torch.tensor([r + [0] * (s_len - len(r)) for r in ids])
        pad = src == 0
        scale = model.d ** 0.5
        memory = model.transformer.encoder(model.src_embed(src) * scale + model.pe[:s_len].float(),
                                           src_key_padding_mask=pad)
        tgt = torch.full((len(chunk), 1), 1)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        for step in range(cfg["max_len"]):
            t = tgt.shape[1]
            x = model.tgt_embed(tgt) * scale + model.pe[:t].float()
            causal = torch.nn.Transformer.generate_square_subsequent_mask(t)
            out = model.transformer.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True,
                                            memory_key_padding_mask=pad)
            nxt = model.generator(out[:, -1]).argmax(-1)
            tgt = torch.cat([tgt, nxt[:, None]], 1)
            done |= nxt == 2
            if done.all():
                break
        for row in tgt[:, 1:].tolist():
            text = ""
            for i in row:
                if i == 2:
                    break
                if i > 3:
                    text += vocab[i]
            outputs.append(text)
    return outputs


def main():
    binary, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dates.safetensors"
        subprocess.run([binary, "translate", "--export", str(ckpt)], check=True, capture_output=True)
        model, cfg = load(ckpt)
        text = subprocess.run([binary, "dates", "--split", "test", "--count", str(N), "--seed", "7"],
                              capture_output=True, text=True, check=True).stdout
        sources = [line.split("\t")[0] for line in text.splitlines()]
        inputs = Path(tmp) / "inputs.txt"
        inputs.write_text("\n".join(sources) + "\n")
        a_times, t_times = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = subprocess.run([binary, "translate", "--input", str(inputs), "--threads", threads],
                                 capture_output=True, text=True, check=True).stdout
            a_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = torch_greedy(model, cfg, sources)
            t_times.append(time.perf_counter() - t0)
        ours = out.splitlines()
        same = sum(a == b for a, b in zip(ours, theirs))
        a, t = statistics.median(a_times), statistics.median(t_times)
        print(f"torch {torch.__version__}, {threads} threads, {rounds} alternated rounds, medians; {N} dates")
        print(f"attn translate (whole process): {a:.2f} s, {N / a:.0f} sentences/s")
        print(f"PyTorch greedy (prefix recomputed, model loaded): {t:.2f} s, {N / t:.0f} sentences/s")
        print(f"attn / PyTorch speed: {t / a:.2f}x; identical outputs: {same}/{N}")


if __name__ == "__main__":
    main()
