"""Training steps of the contract's sequence-to-sequence model: `attn bench train` against the
same model in PyTorch (the `ContractSeq2Seq` of gen_crate_fixtures.py) on the same kind of
batches (date pairs from `attn dates`, in file order), forward + cross-entropy + backward +
AdamW, dropout 0.1. Alternated round by round; medians of the per-step times.

With --bf16: also `attn bench train --precision bf16` (mixed precision) against PyTorch's step
with its forward and loss under torch.autocast("cpu", dtype=torch.bfloat16), in the same rounds,
in a second table.

Usage: python bench_train.py ATTN_BINARY THREADS ROUNDS [--bf16]
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gen_crate_fixtures import SPECIALS, ContractSeq2Seq, encode_pairs  # noqa: E402

CONFIGS = [
    # (d_model, nhead, encoder layers, decoder layers, ff, batch)
    (128, 4, 2, 2, 512, 64),
    (512, 8, 3, 3, 2048, 32),
]
STEPS = 10


def torch_steps(pairs, d, h, ne, nd, ff, batch, autocast=False):
    src_vocab = SPECIALS + sorted({c for s, _ in pairs for c in s})
    tgt_vocab = SPECIALS + sorted({c for _, t in pairs for c in t})
    cfg = {"d_model": d, "nhead": h, "num_encoder_layers": ne, "num_decoder_layers": nd, "dim_feedforward": ff,
           "dropout": 0.1, "activation": "relu", "layer_norm_eps": 1e-5, "norm_first": False, "max_len": 64,
           "src_vocab": src_vocab, "tgt_vocab": tgt_vocab}
    model = ContractSeq2Seq(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    times = []
    for step in range(STEPS + 1):
        chunk = [pairs[(step * batch + j) % len(pairs)] for j in range(batch)]
        src, tgt_in, labels, src_pad, tgt_pad = encode_pairs(chunk, src_vocab, tgt_vocab)
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(src, tgt_in, src_pad, tgt_pad)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     labels.reshape(-1), ignore_index=0)
        loss.backward()
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attn_steps(binary, data, threads, d, h, ne, nd, ff, batch, precision="f32"):
    out = subprocess.run([binary, "bench", "train", "--data", data, "--d-model", str(d), "--nhead", str(h),
                          "--encoder-layers", str(ne), "--decoder-layers", str(nd), "--dim-feedforward", str(ff),
                          "--batch-size", str(batch), "--steps", str(STEPS), "--no-shuffle", "--threads", threads,
                          "--precision", precision, "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["median_s"]


def main():
    binary, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bf16 = "--bf16" in sys.argv
    torch.set_num_threads(int(threads))
    bf16_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.tsv"
        text = subprocess.run([binary, "dates", "--split", "train", "--count", "5000", "--seed", "1"],
                              capture_output=True, text=True, check=True).stdout
        data.write_text(text)
        pairs = [tuple(line.split("\t")) for line in text.splitlines()]
        print(f"torch {torch.__version__}, {threads} threads, {rounds} alternated rounds, medians")
        print("| d_model, layers, ff, batch | attn ms/step | torch ms/step | attn / torch speed |")
        print("|---|---|---|---|")
        for d, h, ne, nd, ff, batch in CONFIGS:
            a_all, t_all, ab_all, tb_all = [], [], [], []
            for _ in range(rounds):
                a_all.append(attn_steps(binary, str(data), threads, d, h, ne, nd, ff, batch))
                t_all.append(torch_steps(pairs, d, h, ne, nd, ff, batch))
                if bf16:
                    ab_all.append(attn_steps(binary, str(data), threads, d, h, ne, nd, ff, batch, "bf16"))
                    tb_all.append(torch_steps(pairs, d, h, ne, nd, ff, batch, autocast=True))
            a, t = statistics.median(a_all), statistics.median(t_all)
            print(f"| {d}, {ne}+{nd}, {ff}, {batch} | {1e3 * a:.1f} | {1e3 * t:.1f} | {t / a:.2f}x |", flush=True)
            if bf16:
                ab, tb = statistics.median(ab_all), statistics.median(tb_all)
                bf16_rows.append(f"| {d}, {ne}+{nd}, {ff}, {batch} | {1e3 * ab:.1f} | {1e3 * a:.1f} | {1e3 * tb:.1f} | "
                                 f"{a / ab:.2f}x | {tb / ab:.2f}x |")
    if bf16:
        print("\nattn --precision bf16 against attn f32 and PyTorch under torch.autocast bf16, the same rounds")
        print("| d_model, layers, ff, batch | attn bf16 ms/step | attn f32 ms/step | torch autocast ms/step | "
              "attn bf16 / attn f32 | attn bf16 / torch autocast |")
        print("|---|---|---|---|---|---|")
        print("\n".join(bf16_rows))


if __name__ == "__main__":
    main()
