//! The memory cap: shapes whose buffers would exceed a limit are refused before anything is
//! allocated, with an error that says how much and why. How many bytes an operation allocates
//! is the library's to say, next to the allocations (`SdpaShape::output_bytes`,
//! `MultiHeadAttention::forward_bytes`, `LayerConfig::forward_bytes`, `unfused_scratch_bytes`);
//! this module holds the limit.
//!
//! The limit is `ATTN_MAX_MEMORY` (bytes, or with a `K`, `M`, `G` suffix) when set, else 80% of
//! the machine's physical memory (`MemTotal` of /proc/meminfo), else 16 GiB.

use anyhow::{bail, Context, Result};

/// The limit in bytes.
pub fn limit() -> Result<u128> {
    if let Ok(text) = std::env::var("ATTN_MAX_MEMORY") {
        return parse(&text)
            .with_context(|| format!("ATTN_MAX_MEMORY is {text:?}, expected bytes like 8G, 512M or 1000000"));
    }
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u128>()
            .ok()
            .map(|kib| kib * 1024)
    });
    Ok(total.map_or(16 << 30, |t| t / 5 * 4))
}

fn parse(text: &str) -> Option<u128> {
    let t = text.trim();
    let (digits, unit) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1u128 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits.trim().parse::<u128>().ok()?.checked_mul(unit)
}

fn human(bytes: u128) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

/// Fails if `bytes` exceed the limit; `what` names the buffers.
pub fn check(bytes: u128, what: &str) -> Result<()> {
    let limit = limit()?;
    if bytes > limit {
        bail!(
            "{what} would need {}, over the memory limit of {} (set ATTN_MAX_MEMORY to change it)",
            human(bytes),
            human(limit)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse("8G"), Some(8 << 30));
        assert_eq!(parse("512m"), Some(512 << 20));
        assert_eq!(parse("1000"), Some(1000));
        assert_eq!(parse("lots"), None);
    }
}
