//! The memory cap: shapes whose buffers would exceed a limit are refused before anything is
//! allocated, with an error that says how much and why. How many bytes an operation allocates
//! is the library's to say, next to the allocations (`SdpaShape::output_bytes`,
//! `MultiHeadAttention::forward_bytes`, `LayerConfig::forward_bytes`, `unfused_scratch_bytes`,
//! `Seq2SeqConfig::training_bytes`, `Seq2Seq::decoding_bytes`); this module holds the limit.
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
    Ok(default_limit(std::fs::read_to_string("/proc/meminfo").ok().as_deref()))
}

/// 80% of `MemTotal` in the text of /proc/meminfo, or 16 GiB without one.
fn default_limit(meminfo: Option<&str>) -> u128 {
    let total = meminfo.and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u128>()
            .ok()
            .map(|kib| kib * 1024)
    });
    total.map_or(16 << 30, |t| t / 5 * 4)
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
    check_against(bytes, limit()?, what)
}

fn check_against(bytes: u128, limit: u128, what: &str) -> Result<()> {
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
        assert_eq!(parse("3k"), Some(3 << 10));
        assert_eq!(parse(" 2 G "), Some(2 << 30));
        assert_eq!(parse(""), None);
        // A size past u128 is refused, not wrapped.
        assert_eq!(parse(&format!("{}G", u128::MAX >> 20)), None);
    }

    /// 80% of the machine's memory, from the `MemTotal` line in KiB; 16 GiB when the file is
    /// missing or has no such line.
    #[test]
    fn the_default_is_four_fifths_of_memtotal() {
        let info = "MemFree:  5 kB\nMemTotal:       1000 kB\nSwapTotal: 7 kB\n";
        assert_eq!(default_limit(Some(info)), 1000 * 1024 / 5 * 4);
        assert_eq!(default_limit(Some("MemFree: 5 kB\n")), 16 << 30);
        assert_eq!(default_limit(Some("MemTotal: lots kB\n")), 16 << 30);
        assert_eq!(default_limit(None), 16 << 30);
    }

    /// The limit itself is allowed, one byte more is refused with both sizes in the units a
    /// person reads.
    #[test]
    fn refusals_name_both_sizes() {
        assert!(check_against(1 << 20, 1 << 20, "x").is_ok());
        let err = check_against((1 << 30) + 1, 1 << 30, "sdpa (q, k, v)")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "sdpa (q, k, v) would need 1.0 GiB, over the memory limit of 1.0 GiB (set ATTN_MAX_MEMORY to change it)"
        );
        assert_eq!(human((1 << 30) - (1 << 20)), "1023.0 MiB");
        assert_eq!(human(1 << 20), "1.0 MiB");
        assert_eq!(human((1 << 20) - 1), "1048575 bytes");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
