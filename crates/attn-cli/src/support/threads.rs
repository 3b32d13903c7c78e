//! `--threads N`, shared by every command that computes, and the pool it runs on.

use anyhow::Result;

/// `--threads N`.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Threads {
    /// Worker threads, 1 to 8 × this machine's cores [default: all cores]
    #[arg(long = "threads", value_name = "N", value_parser = parse_threads)]
    threads: Option<u16>,
}

/// The most worker threads a command takes: 8 × this machine's cores. Past the cores more
/// threads only add switching (results do not depend on the count); thousands of them made
/// `attn check` take minutes instead of a fraction of a second.
fn max_threads() -> usize {
    8 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_threads(text: &str) -> std::result::Result<u16, String> {
    let max = max_threads();
    let expected = format!("expected 1 to {max} (8 × this machine's {} cores)", max / 8);
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n as u16),
        Ok(n) => Err(format!("{n} threads; {expected}")),
        Err(_) => Err(format!("`{text}` is not a number of threads; {expected}")),
    }
}

impl Threads {
    /// Runs `f` on a rayon pool of these many workers (all cores by default), giving it the
    /// count.
    pub fn install<T: Send>(self, f: impl FnOnce(usize) -> Result<T> + Send) -> Result<T> {
        let mut builder = rayon::ThreadPoolBuilder::new();
        if let Some(n) = self.threads {
            builder = builder.num_threads(n as usize);
        }
        let pool = builder.build()?;
        let n = pool.current_num_threads();
        pool.install(|| f(n))
    }
}
