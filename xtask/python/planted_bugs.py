"""Plants twelve known bugs, one at a time, and checks that the tests of the crate that owns the code
catch each (issue: "tests that catch the bugs that matter, in the crate that owns the code").

For each bug: patch the source, run `cargo test --release -p CRATE` for the crate that owns the code
(and for attn-nn too where a layer bug in attn-core must show there), never the CLI's end-to-end
goldens; record whether it failed and which tests failed; restore the file.
Exits non-zero if any bug goes uncaught. Run from the workspace root by `cargo xtask mutants
--planted`; standard-library Python only. `--check-anchors` only checks that every bug's anchor
text is still in its file (`cargo xtask tidy` and its test run it, so moved code fails a test).
"""

import re
import subprocess
import sys
from pathlib import Path

BUGS = [
    (
        "heads 0 and 1 swapped in the fused self-attention path",
        "attn-core",
        "crates/attn-core/src/mha/forward.rs",
        "q_rows, bias, par)?;\n            (buf, width)",
        "q_rows, bias, par)?;\n"
        "            if h >= 2 { for row in buf.chunks_mut(width) { for c in 0..d { row.swap(c, d + c); } } }\n"
        "            (buf, width)",
    ),
    (
        "post-norm residual computed as x + norm1(sa)",
        "attn-nn",
        "crates/attn-nn/src/layers.rs",
        "        kernels::add_norm_rows(x, residual, self.params(), par).map_err(AttnError::from)?;",
        "        let n = self.forward(residual, par)?; x.iter_mut().zip(&n).for_each(|(a, &b)| *a += b);",
    ),
    (
        "out_proj bias skipped",
        "attn-core attn-nn",
        "crates/attn-core/src/mha/forward.rs",
        "        let bias = self.b_out.as_ref().map(|t| t.data());",
        "        let bias: Option<&[f32]> = None;",
    ),
    (
        "LayerNorm ignores the configured eps (uses 1e-5)",
        "attn-nn",
        "crates/attn-nn/src/layers.rs",
        "            eps: self.eps,\n        }",
        "            eps: 1e-5,\n        }",
    ),
    (
        "flash accumulator rescale x1.0001",
        "attn-kernels",
        "crates/attn-kernels/src/flash/tile.rs",
        "scale_row(&mut scratch.acc[i * dv_pad..i * dv_pad + dv], alpha);",
        "scale_row(&mut scratch.acc[i * dv_pad..i * dv_pad + dv], alpha * 1.0001);",
    ),
    (
        "flash drops the last partial key block",
        "attn-kernels",
        "crates/attn-kernels/src/flash/tile.rs",
        "        let bc = (t_end - t0).min(plan.block_keys);\n",
        "        let bc = (t_end - t0).min(plan.block_keys);\n        if bc < plan.block_keys && t0 > keys.start { break; }\n",
    ),
    (
        "beam search's KV-cache reorder is the identity",
        "attn-core attn-nn",
        "crates/attn-core/src/cache.rs",
        "let from = *rows.get(b).unwrap_or(&rows[0]);",
        "let from = b;",
    ),
    (
        "the decoder reorders only its first layer's cache",
        "attn-nn",
        "crates/attn-nn/src/transformer/stack.rs",
        "        for layer in &mut self.layers {\n            layer.self_attn.reorder(rows)?;",
        "        for layer in self.layers.iter_mut().take(1) {\n            layer.self_attn.reorder(rows)?;",
    ),
    (
        "a packed batch's second sequence starts one key early",
        "attn-core",
        "crates/attn-core/src/mha/train.rs",
        "            let (k0, k1) = (packing.key_starts[i], packing.key_starts[i + 1]);",
        "            let (k0, k1) = (packing.key_starts[i] - usize::from(i == 1), packing.key_starts[i + 1]);",
    ),
    (
        "the flash forward takes a row's folded maximum from the next row",
        "attn-kernels",
        "crates/attn-kernels/src/flash/tile.rs",
        "            scratch.maxes[i * lanes..(i + 1) * lanes]",
        "            scratch.maxes[(i + 1) % n_rows * lanes..((i + 1) % n_rows + 1) * lanes]",
    ),
    (
        "the bf16 update keeps a linear map's copies of its old weights",
        "attn-nn",
        "crates/attn-nn/src/layers.rs",
        "            let packs = LinearBf16::packed(&self.weight, had.backward.get().is_some())?;\n"
        "            self.bf16 = Some(Arc::new(packs));",
        "            self.bf16 = Some(had);",
    ),
    (
        "decoding that converts K as it loads it (a bf16 cache; bf16 without bf16 instructions) reads every key block from the first",
        "attn-kernels",
        "crates/attn-kernels/src/flash/tile_convert.rs",
        "    let at = |st: [usize; 4]| rows.b * st[0] + rows.g * st[1] + block.t0 * st[2];",
        "    let at = |st: [usize; 4]| rows.b * st[0] + rows.g * st[1];",
    ),
    (
        "a tile that converts values into panels (a bf16 cache, rounded f32) ignores V's column stride",
        "attn-kernels",
        "crates/attn-kernels/src/flash/tile_convert.rs",
        "value_panels::<S>(&mut scratch.vp, plan.kb_pad, values, bc, dv, [v_st[2], v_st[3]]);",
        "value_panels::<S>(&mut scratch.vp, plan.kb_pad, values, bc, dv, [v_st[2], 1]);",
    ),
]


def regression_files(root):
    """proptest's saved failing cases: a planted bug must not leave its failures behind."""
    return {p: p.read_bytes() for p in root.glob("crates/**/*proptest-regressions*") if p.is_file()} | {
        p: p.read_bytes() for p in root.glob("crates/**/proptest-regressions/**/*") if p.is_file()}


def restore(root, saved):
    for path in set(regression_files(root)) - set(saved):
        path.unlink()
    for path, data in saved.items():
        path.write_bytes(data)


def check_anchors(root):
    """Every bug's anchor text is still in its file: code that moved must move its bug too."""
    stale = [f"{path}: {what}" for what, _, path, old, _ in BUGS if (root / path).read_text().count(old) < 1]
    if stale:
        sys.exit("planted_bugs.py: the code these bugs patch has changed; update their anchors:\n  " + "\n  ".join(stale))
    print(f"planted_bugs.py: all {len(BUGS)} anchors found")


def main():
    root = Path(__file__).resolve().parents[2]
    if "--check-anchors" in sys.argv[1:]:
        check_anchors(root)
        return
    saved = regression_files(root)
    missed = []
    for what, crate, path, old, new in BUGS:
        file = root / path
        original = file.read_text()
        if original.count(old) < 1:
            sys.exit(f"{path}: the code this bug patches has changed; update planted_bugs.py ({what})")
        file.write_text(original.replace(old, new, 1))
        try:
            for name in crate.split():
                result = subprocess.run(["cargo", "test", "--release", "-q", "--no-fail-fast", "-p", name], cwd=root,
                                        capture_output=True, text=True)
                text = result.stdout + result.stderr
                if "error[E" in text:
                    sys.exit(f"{what}: the planted code does not compile:\n{text[-3000:]}")
                failed = sorted(set(re.findall(r"^    ([\w:]+)$", text, re.M)))
                caught = result.returncode != 0
                print(f"{'caught' if caught else 'MISSED'}: {what} ({name}): "
                      f"{', '.join(failed) if failed else 'no failing test'}", flush=True)
                if not caught:
                    missed.append(f"{what} ({name})")
        finally:
            file.write_text(original)
            restore(root, saved)
    if missed:
        sys.exit(f"{len(missed)} planted bugs not caught: {missed}")
    print(f"all {len(BUGS)} planted bugs caught by the owning crate's tests")


if __name__ == "__main__":
    main()
