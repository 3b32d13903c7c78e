//! The run's files: the checkpoint and the optimizer state beside it, the run's fingerprint
//! that `--resume` checks, and the check that an output path is writable.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::write_safetensors;
use serde_json::json;

use crate::support::fnv::fnv1a;
use crate::support::tensors::write_f32_atomic;

use super::{Args, Trainer};

/// The file beside the checkpoint that holds the optimizer's state.
pub(super) fn state_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".state");
    output.with_file_name(name)
}

/// The flags a resumed run must share with the run it continues.
/// FNV-1a of the pairs as their TSV lines.
pub(super) fn data_hash(data: &[(String, String)]) -> u64 {
    fnv1a(
        data.iter()
            .flat_map(|(s, t)| s.bytes().chain([b'\t']).chain(t.bytes()).chain([b'\n'])),
    )
}

/// The data and the flags that decide a run's bytes (not the thread or process count), as
/// JSON: `--resume` refuses a run whose fingerprint differs.
pub(super) fn run_fingerprint(args: &Args, data: &[(String, String)]) -> String {
    let o = &args.optim;
    let mut run = json!({
        "data_fnv1a": format!("{:016x}", data_hash(data)),
        "batch_size": o.batch_size, "lr": o.lr, "betas": [o.betas.0, o.betas.1], "eps": o.eps,
        "weight_decay": o.weight_decay, "warmup": o.warmup, "schedule": o.schedule, "clip_norm": o.clip_norm,
        "label_smoothing": o.label_smoothing, "seed": o.seed, "no_shuffle": o.no_shuffle, "steps": args.steps,
    });
    // Only when it splits the batch, so that runs from before the flag resume.
    if let Some(m) = o.micro_batch.filter(|&m| m < o.batch_size) {
        run["micro_batch"] = json!(m);
    }
    // Likewise only when not f32.
    if o.precision != crate::support::dtype::Dtype::F32 {
        run["precision"] = json!(o.precision.name());
    }
    run.to_string()
}

/// Writes the checkpoint and the optimizer state of step `step`. The state names the
/// checkpoint it goes with (`model_fnv1a`, FNV-1a of the checkpoint's bytes), and the state it
/// replaces is kept as `OUTPUT.state.prev` until the checkpoint is written: the state is written
/// first, the checkpoint last, each atomically, so a process killed anywhere between leaves a
/// checkpoint and a state that match (`resume` picks the one that does).
pub(super) fn save(trainer: &Trainer, args: &Args, fingerprint: &str, step: u64) -> Result<()> {
    // A step that made a weight NaN or infinite fails here rather than overwrite the last good
    // checkpoint with it.
    for (name, t) in trainer.model.state_dict().iter() {
        if let Some(x) = t.data().iter().find(|x| !x.is_finite()) {
            bail!("step {step}: `{name}` holds {x}; the checkpoint was not written (try a lower --lr or --clip-norm)");
        }
    }
    // The checkpoint's only metadata is the configuration, so a rerun writes the same bytes.
    let model = trainer.model.to_checkpoint(&Default::default())?;
    let tensors = trainer.state();
    let refs: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    let metadata = std::collections::HashMap::from([
        ("step".to_string(), step.to_string()),
        ("run".to_string(), fingerprint.to_string()),
        (
            "model_fnv1a".to_string(),
            format!("{:016x}", fnv1a(model.iter().copied())),
        ),
    ]);
    let state = state_path(&args.output);
    if state.exists() {
        let prev = prev_state_path(&args.output);
        std::fs::rename(&state, &prev)
            .with_context(|| format!("cannot rename {} to {}", state.display(), prev.display()))?;
    }
    write_f32_atomic(&state, &refs, Some(metadata))?;
    write_safetensors(&args.output, &model)?;
    Ok(())
}

/// `OUTPUT.state.prev`: the state of the save before, kept while the next one is written.
fn prev_state_path(output: &Path) -> PathBuf {
    let mut name = state_path(output).into_os_string();
    name.push(".prev");
    PathBuf::from(name)
}

/// Fails unless `path` names a regular file or nothing yet (a link to one is followed): the
/// checkpoint is written there and `OUTPUT.state` beside it, and `--resume` reads both back, so
/// `/dev/null` or a pipe would have had `/dev/null.state` made beside it and nothing to resume.
pub(super) fn check_checkpoint_path(flag: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => bail!(
            "{flag} {}: is not a regular file (a device or a pipe); expected a file name, since the checkpoint is written there and OUTPUT.state beside it",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Fails unless a file can be created at `path`, naming `flag`: checked before step 1, so a
/// missing folder is found before the run rather than after it. Nothing is left behind.
pub(super) fn check_writable(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{flag} {}: the folder {} does not exist", path.display(), dir.display());
    }
    if path.is_dir() {
        bail!("{flag} {}: is a folder, expected a file name", path.display());
    }
    let probe = dir.join(format!(".attn-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: cannot write in {}", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The flags of the fingerprints `saved` and `now` that differ, as `name: saved -> now`.
pub(super) fn differing_flags(saved: &str, now: &str) -> Vec<String> {
    let parse =
        |text: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).unwrap_or_default();
    let (saved, now) = (parse(saved), parse(now));
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            // Floats were f32 flags: shown as the f32 the user typed, not its f64 widening.
            let show = |v: Option<&serde_json::Value>| match v {
                None => "(none)".to_string(),
                Some(v) if v.is_f64() => (v.as_f64().unwrap_or(f64::NAN) as f32).to_string(),
                Some(v) => v.to_string(),
            };
            let name = if k.as_str() == "data_fnv1a" {
                "--data (its pairs' hash)".to_string()
            } else {
                format!("--{}", k.replace('_', "-"))
            };
            format!("{name}: {} -> {}", show(saved.get(k)), show(now.get(k)))
        })
        .collect()
}

/// Restores the optimizer's state saved beside `output`, after checking that it was saved by a
/// run of the same data and flags (`fingerprint`) and with this checkpoint (a save interrupted
/// between its two files leaves the previous state, `OUTPUT.state.prev`, as the one that
/// matches); returns the step it was saved at.
pub(super) fn resume(trainer: &mut Trainer, output: &Path, fingerprint: &str) -> Result<u64> {
    let model = std::fs::read(output).with_context(|| format!("--resume needs {}", output.display()))?;
    let model_hash = format!("{:016x}", fnv1a(model.iter().copied()));
    let mut state = state_path(output);
    let metadata = |path: &Path| -> Result<std::collections::HashMap<String, String>> {
        let bytes = std::fs::read(path).with_context(|| format!("--resume needs {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not an optimizer state", path.display()))?;
        Ok(header.metadata().clone().unwrap_or_default())
    };
    let mut meta = metadata(&state)?;
    // States written before the checkpoint's hash was recorded are taken as they are.
    if meta.get("model_fnv1a").is_some_and(|h| *h != model_hash) {
        let prev = prev_state_path(output);
        match metadata(&prev) {
            Ok(m) if m.get("model_fnv1a") == Some(&model_hash) => (state, meta) = (prev, m),
            _ => bail!(
                "--resume: {} is not the checkpoint {} was saved with, and no saved state is; the run cannot continue from these files",
                output.display(),
                state.display()
            ),
        }
    }
    let saved_run = meta.get("run").cloned();
    if saved_run.as_deref() != Some(fingerprint) {
        let saved = saved_run.unwrap_or_default();
        bail!(
            "--resume: the run saved in {} had other data or flags; they must be the same: {}",
            state.display(),
            differing_flags(&saved, fingerprint).join("; ")
        );
    }
    trainer.restore(&state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data's fingerprint is FNV-1a (`support::fnv`) of the pairs as TSV lines.
    #[test]
    fn the_data_hash_is_fnv1a_of_the_tsv_lines() {
        let pairs = [("1 May".to_string(), "2026-05-01".to_string())];
        assert_eq!(data_hash(&pairs), fnv1a(*b"1 May\t2026-05-01\n"));
    }

    /// Each differing flag by its command-line name, floats as the f32 the user typed, strings
    /// and booleans as JSON, a missing one as `(none)`.
    #[test]
    fn differing_flags_are_named_as_typed() {
        let saved = r#"{"lr": 0.10000000149011612, "schedule": "cosine", "no_shuffle": false, "batch_size": 8, "data_fnv1a": "00ff"}"#;
        let now = r#"{"lr": 0.20000000298023224, "schedule": "constant", "no_shuffle": true, "batch_size": 8, "data_fnv1a": "00ff", "micro_batch": 4}"#;
        assert_eq!(
            differing_flags(saved, now),
            [
                "--lr: 0.1 -> 0.2",
                "--micro-batch: (none) -> 4",
                "--no-shuffle: false -> true",
                "--schedule: \"cosine\" -> \"constant\"",
            ]
        );
        assert_eq!(
            differing_flags(r#"{"data_fnv1a": "01"}"#, r#"{"data_fnv1a": "02"}"#),
            ["--data (its pairs' hash): \"01\" -> \"02\""]
        );
    }

    /// A bare file name is written in the working directory; a missing folder and a folder in
    /// place of the file are named.
    #[test]
    fn writable_paths_are_checked_where_they_would_be_written() {
        check_writable("--output", Path::new("attn-check-writable-test.safetensors")).unwrap();
        let missing = check_writable("--output", Path::new("no-such-folder/x.safetensors")).unwrap_err();
        assert!(
            missing.to_string().contains("the folder no-such-folder does not exist"),
            "{missing}"
        );
        let folder = check_writable("--log", Path::new("src")).unwrap_err();
        assert!(folder.to_string().contains("--log src: is a folder"), "{folder}");
        // A device is no place for a checkpoint and its state; a file or a new name is.
        let device = check_checkpoint_path("--output", Path::new("/dev/null")).unwrap_err();
        assert!(
            device
                .to_string()
                .starts_with("--output /dev/null: is not a regular file"),
            "{device}"
        );
        check_checkpoint_path("--output", Path::new("Cargo.toml")).unwrap();
        check_checkpoint_path("--output", Path::new("no-such-file.safetensors")).unwrap();
    }
}
