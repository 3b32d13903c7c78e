//! The date-translation task of the shipped model: a date written in one of ten styles, in
//! any letter case, to ISO 8601 `YYYY-MM-DD`, for years 1900–2099 (../shared/CONTRACT.md).
//! `attn dates` writes the pairs as TSV.
//!
//! Splits are disjoint by date: every day belongs to one split by a hash of its day number with
//! a fixed salt (80% train, 10% validation, 10% test), so no seed can put a test date into
//! training. Within a split, a seed draws the days, styles and letter cases.

use std::io::Write;

use anyhow::{bail, Result};
use attn_nn::core::kernels::testing::SplitMix64;

/// The ten styles, each shown on 2026-11-28.
pub const STYLES: [&str; 10] = [
    "28 November 2026",
    "November 28, 2026",
    "28 Nov 2026",
    "Nov 28, 2026",
    "Saturday, 28 November 2026",
    "saturday 28 nov 2026",
    "28.11.2026",
    "2026/11/28",
    "the 28th of November 2026",
    "November 28th, 2026",
];

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Days from 1900-01-01 (a Monday) to 2099-12-31.
pub const DAYS: i64 = 73_049;

/// Which part of the dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// 80% of the days.
    Train,
    /// 10%.
    Valid,
    /// 10%.
    Test,
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    /// 1900–2099.
    pub year: i64,
    /// 1–12.
    pub month: usize,
    /// 1–31.
    pub day: usize,
    /// 0 = Monday.
    pub weekday: usize,
}

impl Date {
    /// The date `n` days after 1900-01-01 (Howard Hinnant's `civil_from_days`).
    pub fn from_day_number(n: i64) -> Self {
        // Days since 1970-01-01: 1900-01-01 is 25567 days before.
        let z = n - 25_567 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as usize;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date {
            year,
            month,
            day,
            weekday: n.rem_euclid(7) as usize,
        }
    }

    /// `YYYY-MM-DD`.
    pub fn iso(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// The date in `style` (an index into [`STYLES`]), before any change of letter case.
    pub fn write(&self, style: usize) -> String {
        let (d, m, y) = (self.day, self.month, self.year);
        let month = MONTHS[m - 1];
        let short = &month[..3];
        let weekday = WEEKDAYS[self.weekday];
        let ordinal = match (d % 10, d % 100) {
            (_, 11..=13) => "th",
            (1, _) => "st",
            (2, _) => "nd",
            (3, _) => "rd",
            _ => "th",
        };
        match style {
            0 => format!("{d} {month} {y}"),
            1 => format!("{month} {d}, {y}"),
            2 => format!("{d} {short} {y}"),
            3 => format!("{short} {d}, {y}"),
            4 => format!("{weekday}, {d} {month} {y}"),
            5 => format!("{} {d} {} {y}", weekday.to_lowercase(), short.to_lowercase()),
            6 => format!("{d}.{m}.{y}"),
            7 => format!("{y}/{m:02}/{d:02}"),
            8 => format!("the {d}{ordinal} of {month} {y}"),
            _ => format!("{month} {d}{ordinal}, {y}"),
        }
    }
}

/// The split a day belongs to: a hash of its number with a fixed salt.
pub fn split_of(n: i64) -> Split {
    let mut rng = SplitMix64::new(0xDA7E_5EED ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    match rng.next_u64() % 10 {
        0 => Split::Test,
        1 => Split::Valid,
        _ => Split::Train,
    }
}

/// One example: source text, target text, style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The date as written.
    pub source: String,
    /// `YYYY-MM-DD`.
    pub target: String,
    /// Its style, an index into [`STYLES`].
    pub style: usize,
}

/// `count` examples of `split` drawn with `seed`: a day of the split, a style (or `style`
/// when given) and a letter case (as written, lower or upper, a third each).
pub fn generate(split: Split, count: usize, seed: u64, style: Option<usize>) -> Vec<Example> {
    let days: Vec<i64> = (0..DAYS).filter(|&n| split_of(n) == split).collect();
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let date = Date::from_day_number(days[(rng.next_u64() % days.len() as u64) as usize]);
            let style = style.unwrap_or((rng.next_u64() % STYLES.len() as u64) as usize);
            let text = date.write(style);
            let source = match rng.next_u64() % 3 {
                0 => text,
                1 => text.to_lowercase(),
                _ => text.to_uppercase(),
            };
            Example {
                source,
                target: date.iso(),
                style,
            }
        })
        .collect()
}

/// `attn dates`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  attn dates --split train --count 50000 --seed 1 > train.tsv\n\nStyles (0-9): 28 November 2026 | November 28, 2026 | 28 Nov 2026 | Nov 28, 2026 |\nSaturday, 28 November 2026 | saturday 28 nov 2026 | 28.11.2026 | 2026/11/28 |\nthe 28th of November 2026 | November 28th, 2026; any letter case; years 1900-2099."
)]
pub struct Args {
    /// Which dates: train, valid and test are disjoint sets of days.
    #[arg(long, value_enum)]
    split: Split,
    /// How many pairs.
    #[arg(long)]
    count: usize,
    /// Draws the days, styles and letter cases.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only this style (0-9).
    #[arg(long)]
    style: Option<usize>,
}

/// Prints `count` pairs as `source TAB target` lines.
pub fn main(args: Args) -> Result<()> {
    if let Some(style) = args.style {
        if style >= STYLES.len() {
            bail!("--style is {style}, expected 0 to {}", STYLES.len() - 1);
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in generate(args.split, args.count, args.seed, args.style) {
        writeln!(out, "{}\t{}", e.source, e.target)?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_and_weekdays() {
        let d = Date::from_day_number(0);
        assert_eq!((d.iso(), d.weekday), ("1900-01-01".to_string(), 0));
        // 2026-11-28 is a Saturday, day 46_352 after 1900-01-01.
        let n = (0..DAYS)
            .find(|&n| Date::from_day_number(n).iso() == "2026-11-28")
            .unwrap();
        let d = Date::from_day_number(n);
        assert_eq!(d.weekday, 5);
        for (style, want) in STYLES.iter().enumerate() {
            assert_eq!(d.write(style), *want);
        }
        assert_eq!(Date::from_day_number(DAYS - 1).iso(), "2099-12-31");
        // 1900 is not a leap year, 2000 is.
        let iso: Vec<String> = (0..DAYS).map(|n| Date::from_day_number(n).iso()).collect();
        assert!(!iso.contains(&"1900-02-29".to_string()));
        assert!(iso.contains(&"2000-02-29".to_string()));
        assert_eq!(Date::from_day_number(1).write(8), "the 2nd of January 1900");
        let n11 = (0..DAYS)
            .find(|&n| Date::from_day_number(n).iso() == "1999-03-11")
            .unwrap();
        assert_eq!(Date::from_day_number(n11).write(9), "March 11th, 1999");
    }

    #[test]
    fn splits_are_disjoint_and_sized() {
        let mut counts = [0usize; 3];
        for n in 0..DAYS {
            counts[split_of(n) as usize] += 1;
        }
        let total = DAYS as f64;
        assert!((counts[0] as f64 / total - 0.8).abs() < 0.01, "{counts:?}");
        let train: std::collections::HashSet<String> = generate(Split::Train, 20_000, 1, None)
            .into_iter()
            .map(|e| e.target)
            .collect();
        let test = generate(Split::Test, 5_000, 1, None);
        assert!(test.iter().all(|e| !train.contains(&e.target)));
        assert_eq!(generate(Split::Test, 50, 3, None), generate(Split::Test, 50, 3, None));
        assert!(generate(Split::Valid, 100, 3, Some(4)).iter().all(|e| e.style == 4));
    }
}
