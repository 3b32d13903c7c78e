"""A corpus of malformed and hostile safetensors files for `attn sdpa`, with the error each must
produce (`expected.json`: file -> a substring of the one-line message). Needs only the standard
library. Run by `cargo xtask codegen`.
"""

import json
import struct
import sys
from pathlib import Path


def st(header, data=b"", raw_len=None):
    h = json.dumps(header).encode()
    n = len(h) if raw_len is None else raw_len
    return struct.pack("<Q", n) + h + data


def f32s(n):
    return struct.pack(f"<{n}f", *([0.25] * n))


def qkv(q=(1, 2, 3, 4), k=(1, 2, 5, 4), v=(1, 2, 5, 4)):
    header, data = {}, b""
    for name, shape in (("q", q), ("k", k), ("v", v)):
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(data), len(data) + 4 * n]}
        data += f32s(n)
    return header, data


CASES = {}


def case(name, content, expected):
    CASES[name] = (content, expected)


case("empty.safetensors", b"", "not a valid safetensors file: header too small")
case("short_header_length.safetensors", b"\x01\x02\x03", "not a valid safetensors file: header too small")
case("header_longer_than_file.safetensors", st({}, raw_len=1 << 40), "not a valid safetensors file: header too large")
case("header_not_json.safetensors", struct.pack("<Q", 8) + b"not json", "not a valid safetensors file: invalid JSON in header")
h, d = qkv()
h["v"]["data_offsets"] = [h["v"]["data_offsets"][0], h["v"]["data_offsets"][1] + 400]
case("offsets_past_end.safetensors", st(h, d), "not a valid safetensors file: invalid shape, data type, or offset for tensor")
h, d = qkv()
h["k"]["data_offsets"] = [0, h["k"]["data_offsets"][1] - h["k"]["data_offsets"][0]]
case("overlapping_offsets.safetensors", st(h, d), "not a valid safetensors file: invalid offset for tensor `k`")
h, d = qkv()
h["q"]["shape"] = [1, 2, 3, 5]
case("shape_disagrees_with_bytes.safetensors", st(h, d), "not a valid safetensors file: invalid shape, data type, or offset for tensor")
h, d = qkv()
h["q"]["shape"] = [1 << 40, 1 << 40, 1 << 40, 0]
case("shape_product_overflows.safetensors", st(h, d), "not a valid safetensors file: overflow computing buffer size")
h, d = qkv()
h["q"]["shape"] = [1, -2, 3, 4]
case("negative_dim.safetensors", st(h, d), "not a valid safetensors file: invalid JSON in header: invalid value: integer `-2`, expected usize")
h, d = qkv()
del h["v"]
case("missing_v.safetensors", st(h, d[: h["k"]["data_offsets"][1]]), "missing tensor `v`")
h, d = qkv()
h["bias"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(d), len(d) + 4]}
case("extra_tensor.safetensors", st(h, d + f32s(1)), "unexpected tensor `bias`")
h, d = qkv()
h["q"]["dtype"] = "F16"
h["q"]["shape"] = [1, 2, 3, 8]
case("wrong_dtype.safetensors", st(h, d), "tensor `q` has dtype F16, expected F32")
h, d = qkv()
h["mask"] = {"dtype": "BOOL", "shape": [3, 5], "data_offsets": [len(d), len(d) + 15]}
case("bool_mask_bad_byte.safetensors", st(h, d + bytes([1] * 14 + [7])), "holds the byte 7")
h, d = qkv()
h["mask"] = {"dtype": "F32", "shape": [4, 5], "data_offsets": [len(d), len(d) + 80]}
case("mask_not_broadcastable.safetensors", st(h, d + f32s(20)), "broadcastable to [B, H, S, T] = [1, 2, 3, 5]")
h, d = qkv(k=(1, 3, 5, 4), v=(1, 3, 5, 4))
case("heads_not_divisible.safetensors", st(h, d), "does not divide")
h, d = qkv(q=(1, 2, 3, 0), k=(1, 2, 5, 0), v=(1, 2, 5, 4))
case("zero_head_dim.safetensors", st(h, d), "head dims must be at least 1")
h, d = qkv(q=(2, 3, 4))
case("q_rank_3.safetensors", st(h, d), "tensor `q` has shape [2, 3, 4], expected [B, H, S, D]")
h, d = qkv()
case("truncated_data.safetensors", st(h, d)[:-7], "not a valid safetensors file: incomplete metadata, file not fully covered")


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, message) in sorted(CASES.items()):
        (out / name).write_bytes(content)
        expected[name] = message
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(CASES)} malformed files to {out}")


if __name__ == "__main__":
    main()
