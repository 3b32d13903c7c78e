"""Reproduces with PyTorch the behaviours that attn's tests hard-code as "what PyTorch does", so
those claims in docs/RELIABILITY.md are checked by a script rather than by hand:

- `overflowing_scores_behave_as_in_pytorch_on_every_path` (attn-kernels/tests/nonfinite.rs):
  row 0's `q·k = 4e38` is finite once scaled (output all 1, lse 1e38), row 1's score overflows to
  +inf (NaN row), row 2's to -inf (that key gets weight 0: output 1, lse ln 3). PyTorch's math
  path agrees on all three rows; its CPU flash kernel returns NaN for row 0.
- `huge_finite_mask_values_behave_as_in_pytorch` (attn-kernels/src/flash.rs): additive masks of
  -1e30 on a whole row give uniform weights (output 2 for values 0..4), +1e30 on one key picks it
  (output 3), and -inf on a whole row empties it (attn: zeros).
- docs/RELIABILITY.md, "through layers": with NaN in the padded positions of a sequence,
  PyTorch's `nn.TransformerEncoderLayer` (fast path under `no_grad`, slow path with autograd on)
  and `nn.MultiheadAttention` with `key_padding_mask` return NaN for every position of it, where
  attn returns the zero-padded run's values (attn-nn/tests/nonfinite.rs).

Usage: `python check_pytorch_claims.py` with torch installed (`ATTN_PYTHON` in `cargo xtask`'s
terms). Prints each path's rows and exits non-zero if PyTorch disagrees with a claim.
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

failures = []


def claim(ok, what):
    print(("ok      " if ok else "DIFFERS ") + what)
    if not ok:
        failures.append(what)


def sdpa(q, k, v, mask=None, backend=None):
    """SDPA on [1, 1, L, D] tensors with one backend: the output rows."""
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0, 0]


def overflow():
    s, t, d = 3, 4, 16
    q, k = torch.zeros(s, d), torch.zeros(t, d)
    v = torch.arange(t).repeat_interleave(d).reshape(t, d).float()
    q[0, 0:4], k[0, 0:4], k[1, 0:4] = 2e19, 2.5e18, 5e18
    q[1, 4:8], k[2, 4:8] = 1e20, 1e20
    q[2, 8:12], k[3, 8:12] = -1e20, 1e20
    q, k, v = (x[None, None] for x in (q, k, v))
    with torch.no_grad():
        for name, backend in [("math", SDPBackend.MATH), ("flash (CPU)", SDPBackend.FLASH_ATTENTION)]:
            out = sdpa(q, k, v, backend=backend)
            print(f"overflow, {name}: rows {[r[:2].tolist() for r in out]}")
            if backend == SDPBackend.MATH:
                claim(bool((out[0] == 1.0).all()), "overflow, math: row 0 (q.k = 4e38, finite once scaled) is all 1")
            else:
                claim(bool(out[0].isnan().all()), "overflow, CPU flash: row 0 is NaN (attn differs here on purpose)")
            claim(bool(out[1].isnan().all()), f"overflow, {name}: row 1 (score +inf) is NaN")
            claim(bool(((out[2] - 1.0).abs() < 1e-6).all()), f"overflow, {name}: row 2 (score -inf) is the mean of 0, 1, 2")


def huge_masks():
    s, t, d = 3, 5, 4
    gen = torch.Generator().manual_seed(0)
    q, k = torch.rand(s, d, generator=gen) * 2 - 1, torch.rand(t, d, generator=gen) * 2 - 1
    v = torch.arange(t).repeat_interleave(d).reshape(t, d).float()
    mask = torch.zeros(s, t)
    mask[0, :] = -1e30
    mask[1, 3] = 1e30
    mask[2, :] = float("-inf")
    q, k, v, mask = (x[None, None] for x in (q, k, v, mask))
    with torch.no_grad():
        for name, backend in [("math", SDPBackend.MATH), ("flash (CPU)", SDPBackend.FLASH_ATTENTION)]:
            out = sdpa(q, k, v, mask, backend=backend)
            print(f"huge masks, {name}: rows {[r[:2].tolist() for r in out]}")
            claim(bool(((out[0] - 2.0).abs() < 1e-3).all()), f"huge masks, {name}: row 0 (all -1e30) is uniform, 2")
            claim(bool((out[1] == 3.0).all()), f"huge masks, {name}: row 1 (+1e30 on key 3) is 3")
            row2 = out[2]
            claim(bool((row2 == 0.0).all() or row2.isnan().all()),
                  f"huge masks, {name}: row 2 (all -inf) is empty: {row2[0].item()} (attn: 0)")


def padding_with_nan():
    torch.manual_seed(0)
    e, length, real = 16, 6, 4
    x = torch.randn(2, length, e)
    x[0, real:] = float("nan")
    padding = torch.zeros(2, length, dtype=torch.bool)
    padding[0, real:] = True
    layer = torch.nn.TransformerEncoderLayer(e, 4, 32, batch_first=True, dropout=0.0).eval()
    mha = torch.nn.MultiheadAttention(e, 4, batch_first=True).eval()
    with torch.no_grad():
        fast = layer(x, src_key_padding_mask=padding)
        attended, _ = mha(x, x, x, key_padding_mask=padding)
    slow = layer(x, src_key_padding_mask=padding).detach()
    for name, out in [("encoder layer, fast path", fast), ("encoder layer, slow path", slow), ("MHA", attended)]:
        print(f"padding with NaN, {name}: NaN at {out[0].isnan().any(-1).tolist()}")
        claim(bool(out[0, :real].isnan().all()), f"padding with NaN, {name}: every real position is NaN")


def cross_entropy_with_a_masked_class():
    """The values of attn-kernels' `a_minus_infinity_logit_gives_pytorch_losses_and_gradients`."""
    cases = [
        (0, 0.0, 1.3132616281509399, [-0.7310586, 0.0, 0.7310586]),
        (1, 0.0, float("inf"), [0.26894143, -1.0, 0.7310586]),
        (0, 0.1, float("inf"), [-0.6643919, -0.033333335, 0.69772524]),
        (1, 0.1, float("inf"), [0.2356081, -0.93333334, 0.69772524]),
        (0, 1.0, float("inf"), [-0.06439191, -0.33333334, 0.39772525]),
    ]
    for target, smoothing, loss, grad in cases:
        x = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
        out = torch.nn.functional.cross_entropy(x, torch.tensor([target]), label_smoothing=smoothing)
        out.backward()
        what = f"cross-entropy of [0, -inf, 1], target {target}, smoothing {smoothing}"
        same_loss = out.item() == loss if loss == float("inf") else abs(out.item() - loss) < 1e-6
        claim(same_loss, f"{what}: loss {out.item()} (attn's test: {loss})")
        claim(bool((x.grad[0] - torch.tensor(grad)).abs().max() < 1e-6), f"{what}: gradient {x.grad[0].tolist()}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    overflow()
    huge_masks()
    padding_with_nan()
    cross_entropy_with_a_masked_class()
    if failures:
        sys.exit(f"{len(failures)} claims differ from PyTorch {torch.__version__}")
    print("every claim holds")
