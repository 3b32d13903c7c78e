//! `cargo xtask mutants`: mutation testing of the numerically central code, and the planted bugs.

use std::process::Command;

use anyhow::Result;

use super::{cargo, root, run};

/// The numerically central code `cargo xtask mutants` mutates: a file and a regex of the
/// functions in it (cargo-mutants' names), tested by the tests of the crate that owns the file.
const MUTANT_SCOPE: [(&str, &str); 48] = [
    // The flash passes, the split-KV merge and the repair of non-finite rows.
    (
        "crates/attn-kernels/src/flash/tile.rs",
        "attend_tile|load_query_tile|block_scores|passes2_3_online_softmax|pass4_weighted_values",
    ),
    (
        "crates/attn-kernels/src/flash/mod.rs",
        "flash_impl|attend_unsplit|Dst::write_row|Operands::packed_at",
    ),
    // K and V packed per call or per `(b, g)`, and packed straight from bf16 bits.
    ("crates/attn-kernels/src/flash/pack.rs", "pack_blocks|pack_group"),
    (
        "crates/attn-kernels/src/flash/bf16.rs",
        "key_bits_packer|key_bits_panels16|value_bits_packer|value_bits_block|interleave_bits|pack_group|exp_sub_sum_into_pairs|scaled_row_into_pairs",
    ),
    ("crates/attn-kernels/src/flash/split_kv.rs", "attend_split|merge_row"),
    ("crates/attn-kernels/src/softmax.rs", "softmax_row|masked_softmax"),
    (
        "crates/attn-kernels/src/mask.rs",
        "mask_row|apply_mask|add_mask|Causal::key_limit",
    ),
    // The row primitives: the dispatchers and the bodies of every level, and the mask of a
    // row's tail (the bodies themselves are `unsafe fn`s, which cargo-mutants leaves alone).
    (
        "crates/attn-kernels/src/simd.rs",
        "(scalar::|avx2::)?(exp_sub_sum|row_max|scale_row|scale_into)",
    ),
    ("crates/attn-kernels/src/lanes.rs", "avx512_first"),
    // Projections, and the head split and merge (heads as strided views of the projections).
    (
        "crates/attn-core/src/mha/forward.rs",
        "head_view|Core::project|Core::project_kv|Core::project_out",
    ),
    ("crates/attn-core/src/mha/weights.rs", "linear|Core::weight|Core::bias"),
    // The weights written from the kept scores, and the rule for which path keeps them.
    (
        "crates/attn-kernels/src/weights.rs",
        "finish_row|zero_fill|write_weights|RawWeights::.*",
    ),
    ("crates/attn-kernels/src/flash/weights.rs", "attend_keeping_scores"),
    ("crates/attn-kernels/src/path.rs", "attention_with_weights|keeping_path"),
    // attn's own f32 GEMM: its safe functions (cargo-mutants leaves `unsafe fn`s alone, which
    // are the bands, the blocking, the micro-kernel and the packing), and weights packed once.
    ("crates/attn-kernels/src/gemm/avx512.rs", "masks"),
    (
        "crates/attn-kernels/src/gemm/packed.rs",
        "gemm_packed|pack_panel|F32Panels::pack",
    ),
    // The layers: norms with the fused residual adds, linear maps in each precision with their
    // packed copies, the feed-forward block's forward, training forward and backward.
    ("crates/attn-nn/src/layers.rs", ".*"),
    // Training's update: AdamW by name and flat, its checks, the schedules, the clipping, the
    // flat gradients and parameters, and the bf16 weight gradient by every route.
    (
        "crates/attn-nn/src/optim.rs",
        "AdamW::(next_step|step|step_flat|update|make_flat|restore|steps)|Schedule::factor",
    ),
    ("crates/attn-core/src/grads.rs", "clip_grad_norm|two_ranges|Grads::.*"),
    (
        "crates/attn-core/src/params.rs",
        "ParamStore::flat_mut|ParamPath.*::hash_from|fnv1a|flat_fill|flat_zip_mut|StoreSlice::place",
    ),
    (
        "crates/attn-kernels/src/bf16_grad.rs",
        "weight_gradient|linear_backward_bf16|pack_pairs|interleave_rows|row|columns_into_rows(_scalar)?",
    ),
    // The attention backward (its path rule, the row deltas and every task), and the layers'
    // backward kernels: the norms', the activations', the embedding's and the loss.
    (
        "crates/attn-kernels/src/backward/mod.rs",
        "backward_path|attention_backward|attention_backward_path|attention_backward_fused|validate_inputs|check_gradients",
    ),
    ("crates/attn-kernels/src/backward/tasks.rs", ".*"),
    ("crates/attn-kernels/src/backward/deltas.rs", ".*"),
    (
        "crates/attn-kernels/src/grad.rs",
        "add_column_sums|add_rows|sum_of_squares|add_squares|adamw_update|adamw_rows|linear_backward|derivative|activation_backward.*|embedding|check_ids|embedding_backward|cross_entropy.*",
    ),
    // bf16 weight packings: the storage they reuse, and every word they write.
    (
        "crates/attn-kernels/src/bf16/panels.rs",
        "take_words|Bf16Panels::pack|Bf16Panels::from_bits|pack_panel",
    ),
    // The flash kernel's weights from its kept scores, and K and V packed per `(b, g)`.
    ("crates/attn-kernels/src/flash/weights.rs", ".*"),
    ("crates/attn-kernels/src/flash/per_group.rs", ".*"),
    // The norms' backward: its chunks of rows and the rows' f64 lanes at every level.
    ("crates/attn-kernels/src/grad/norm.rs", ".*"),
    // The activation arena: which kept buffer a request gets, and what it holds.
    ("crates/attn-kernels/src/arena.rs", ".*"),
    // Dropout's counter-based stream and its threshold.
    ("crates/attn-kernels/src/grad/dropout.rs", ".*"),
    // The KV cache decoding appends to, grows and reorders (beam search).
    ("crates/attn-core/src/cache.rs", ".*"),
    // The MHA backward's parts: fused, packed, and the projections with appended key rows.
    ("crates/attn-core/src/mha/backward.rs", ".*"),
    // The layers' and stacks' training passes: the residual walk, the tapes and their sizes.
    ("crates/attn-nn/src/transformer/train.rs", ".*"),
    ("crates/attn-nn/src/transformer/train_stack.rs", ".*"),
    // MHA's training forward, its packed weight copies and masks; the seq2seq step and
    // dropout's seeds (a resumed run draws the masks it drew).
    ("crates/attn-core/src/mha/train.rs", ".*"),
    ("crates/attn-core/src/mha/packs.rs", ".*"),
    ("crates/attn-core/src/mha/masks.rs", ".*"),
    ("crates/attn-nn/src/seq2seq/train.rs", ".*"),
    // The translator itself: its construction, positions, store, checkpoints and embedding.
    ("crates/attn-nn/src/seq2seq/mod.rs", ".*"),
    ("crates/attn-nn/src/step.rs", ".*"),
    // Greedy and beam decoding: which hypothesis wins and when the search stops.
    ("crates/attn-nn/src/seq2seq/decode.rs", ".*"),
    // The BERT model's loading, checks and attention maps; the gradient tree across processes.
    ("crates/attn-nn/src/bert/mod.rs", ".*"),
    ("crates/attn-nn/src/parallel/mod.rs", ".*"),
    // The translator's vocabularies, configuration and batches.
    ("crates/attn-nn/src/seq2seq/data.rs", ".*"),
    // Positions (RoPE's rotation, ALiBi's slopes), the SDPA entry's checks and masks, and
    // cross-attention over an appended memory.
    ("crates/attn-core/src/positions.rs", ".*"),
    ("crates/attn-core/src/sdpa.rs", ".*"),
    (
        "crates/attn-core/src/mha/mod.rs",
        "MultiHeadAttention::(append_to_cache|forward_over_cache|forward_bytes)",
    ),
];

/// `cargo xtask mutants [--planted] [CARGO-MUTANTS ARGS...]`.
pub fn mutants(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--planted") {
        return run(Command::new("python3")
            .arg(root().join("xtask/python/planted_bugs.py"))
            .current_dir(root()));
    }
    let installed = cargo()
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(cargo().args(["install", "cargo-mutants", "--locked"]))?;
    }
    let mut cmd = cargo();
    cmd.args([
        "mutants",
        "--profile",
        "mutants",
        "--test-workspace=false",
        "--cargo-test-arg=--tests",
        "--no-shuffle",
        "--output",
        "target",
    ]);
    for (file, functions) in MUTANT_SCOPE {
        // The whole path, anchored: a bare file name would also match its namesakes in scope
        // (`mod.rs` in `flash/` and `backward/`; `grad.rs` inside `bf16_grad.rs`). A mutant
        // inside a function ends `in FUNCTION`; one that replaces the whole body reads
        // `replace FUNCTION -> T with VALUE` (or `with ()`), with no `in`.
        let path = file.replace('.', "\\.");
        let re = format!("^{path}:[0-9]+:[0-9]+: (replace ({functions})( -> | with )|.* in ({functions})$)");
        cmd.args(["--file", file, "--re", &re]);
    }
    cmd.args(args);
    run(&mut cmd)
}
