"""Tiny seeds for the `run_input` fuzz target: every module kind of `attn run` at d_model 4.

Each seed is one fuzz input in the format of `attn_cli::fuzzing::split_run_input`: two
little-endian u32 lengths, then MODULE.json, the weights and the inputs. The golden fixtures
are 10-100 KB each; these are 1-6 KB, so the fuzzer mutates every module kind cheaply and the
committed corpus stays small. Run by `cargo xtask fuzz` when the corpus is empty.
"""

import json
import struct
import sys
from pathlib import Path

from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).parent))
import gen_module_fixtures as g  # noqa: E402

TINY = {"d_model": 4, "nhead": 2, "dim_feedforward": 6}
CASES = [
    g.mha_case("mha", {"embed_dim": 4, "num_heads": 2}, b=1, s=2, t=3, kpm="bool", seed=1),
    g.mha_case("mha_self_bf", {"embed_dim": 4, "num_heads": 2, "batch_first": True}, b=2, s=3, self_attn=True,
               mask="causal", flags={"average_attn_weights": False}, seed=2),
    g.mha_case("mha_kdim_bias_kv", {"embed_dim": 4, "num_heads": 2, "kdim": 3, "vdim": 5, "add_bias_kv": True,
                                    "add_zero_attn": True}, b=1, s=2, t=2, kpm="float", seed=3),
    g.encoder_case("enc_layer", {**TINY, "batch_first": True}, b=2, s=3, mask="bool", kpm="bool", seed=4),
    g.encoder_case("enc_layer_pre_gelu", {**TINY, "norm_first": True, "activation": "gelu"}, b=1, s=3, mask="causal",
                   seed=5),
    g.encoder_case("enc_stack", {**TINY, "batch_first": True}, stack={"num_layers": 2, "norm": True}, b=1, s=3,
                   kpm="float", seed=6),
    g.decoder_case("dec_layer", {**TINY, "batch_first": True}, b=1, t=2, s=3, tgt_mask="causal", memory_kpm="bool",
                   seed=7),
    g.decoder_case("dec_stack", {**TINY}, stack={"num_layers": 1, "norm": True}, b=2, t=2, s=2, memory_mask="float",
                   seed=8),
    g.transformer_case("transformer", {**TINY, "num_encoder_layers": 1, "num_decoder_layers": 1, "batch_first": True},
                       b=1, s=3, t=2, src_kpm="bool", memory_kpm="bool", seed=9),
]


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, config, state, inputs, _want in CASES:
        config_bytes = json.dumps(config, sort_keys=True).encode()
        weights = save(state)
        inputs_bytes = save({k: v.clone().contiguous() for k, v in inputs.items()})
        seed = struct.pack("<II", len(config_bytes), len(weights)) + config_bytes + weights + inputs_bytes
        (out_dir / f"seed-tiny-{name}").write_bytes(seed)
        print(f"{name}: {len(seed)} bytes")


if __name__ == "__main__":
    main()
