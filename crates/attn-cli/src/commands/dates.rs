//! The date-translation task of the shipped model (docs/CLI.md): a date
//! written in one of eleven styles, in any letter case, with or without leading zeros, with any
//! runs of spaces, to ISO 8601 `YYYY-MM-DD` for years 1900–2099; and `?` for everything it cannot
//! answer: dates that do not exist, years outside 1900–2099, and text that is not a date in these
//! styles. `attn dates` writes the pairs as TSV.
//!
//! Splits are disjoint by date: every calendar triple (year, month, day), real or not, belongs
//! to one split by a hash with a fixed salt (80% train, 10% validation, 10% test), so no seed
//! can put a test date, or a test non-existent date, into training. Within a split, a seed draws
//! the days, styles and spellings. Text that is not a date is drawn at random from the seed.
//!
//! What the model is not asked to do: check a written weekday against the date (every weekday
//! here is the true one), or read dates in other orders (`11/28/2026` is `?`: its month and day
//! cannot be told apart in general).

use std::io::Write;

use anyhow::{bail, Result};
use attn_nn::core::kernels::rng::SplitMix64;

/// The eleven styles, each shown on 2026-11-28.
pub const STYLES: [&str; 11] = [
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
    "2026-11-28",
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

/// Words that are not dates, for the `?` examples (no month or weekday among them).
const WORDS: [&str; 48] = [
    "the",
    "of",
    "and",
    "date",
    "day",
    "today",
    "tomorrow",
    "yesterday",
    "next",
    "last",
    "week",
    "year",
    "time",
    "hello",
    "world",
    "meeting",
    "at",
    "on",
    "in",
    "noon",
    "pm",
    "am",
    "river",
    "bank",
    "storm",
    "model",
    "attention",
    "translate",
    "please",
    "thanks",
    "birthday",
    "party",
    "deadline",
    "soon",
    "never",
    "always",
    "first",
    "second",
    "third",
    "month",
    "number",
    "spring",
    "summer",
    "autumn",
    "winter",
    "asdf",
    "qwerty",
    "none",
];

/// Days from 1900-01-01 (a Monday) to 2099-12-31.
pub const DAYS: i64 = 73_049;

/// The years the model answers for.
pub const YEARS: std::ops::RangeInclusive<i64> = 1900..=2099;

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

/// What kind of text, and so which answer: a date, or one of the kinds answered `?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A real date of 1900–2099 in one of the styles: answered with its ISO 8601 form.
    Date,
    /// 29 February of a common year (1900, 2001, …).
    Feb29,
    /// 30 or 31 of a shorter month (30 February, 31 April, …).
    PastMonthEnd,
    /// Day 0 or 32–39, or (numeric styles) month 0 or 13–19.
    BadNumber,
    /// A real date of a year outside 1900–2099 (1066, 1899, 2100, 3000, 26, …).
    OutOfRange,
    /// The empty string, or spaces only.
    Empty,
    /// A few words that are not a date.
    Words,
    /// Random printable ASCII characters.
    Characters,
    /// Digits alone.
    Digits,
    /// A date with a part missing, or in another order (`November 2026`, `28.11`, `11/28/2026`).
    Partial,
    /// A date with a word before or after it.
    Junk,
    /// The training mixture: 67% dates (3% of them 29 February of a leap year), 33% the kinds
    /// answered `?` (8% 29 February of a common year).
    Mixed,
}

impl Kind {
    /// Every kind answered `?`.
    #[cfg(test)]
    pub const UNANSWERABLE: [Kind; 10] = [
        Kind::Feb29,
        Kind::PastMonthEnd,
        Kind::BadNumber,
        Kind::OutOfRange,
        Kind::Empty,
        Kind::Words,
        Kind::Characters,
        Kind::Digits,
        Kind::Partial,
        Kind::Junk,
    ];
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    /// The year (1900–2099 for the dates the model answers).
    pub year: i64,
    /// 1–12.
    pub month: usize,
    /// 1–31.
    pub day: usize,
    /// 0 = Monday.
    pub weekday: usize,
}

/// Days from 1900-01-01 to the proleptic Gregorian `year-month-day` (Howard Hinnant's
/// `days_from_civil`); any day number, also before 1900 or for a day past its month's end.
pub fn day_number(year: i64, month: usize, day: usize) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 + 25_567
}

/// Whether `year` has a 29 February.
pub fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days in `month` of `year`.
pub fn days_in_month(year: i64, month: usize) -> usize {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// How the numbers, letters and spaces of one example are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spelling {
    /// `08` rather than `8` for a day below 10 (where the style allows both).
    pub zero_day: bool,
    /// `05` rather than `5` for a month below 10 (numeric styles).
    pub zero_month: bool,
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

    /// The date in `style` (an index into [`STYLES`]) with the usual spelling: no leading zeros
    /// but in styles 7 and 10, before any change of letter case.
    #[cfg(test)]
    pub fn write(&self, style: usize) -> String {
        let zero = matches!(style, 7 | 10);
        self.spell(
            style,
            Spelling {
                zero_day: zero,
                zero_month: zero,
            },
        )
    }

    /// The date in `style` spelled as `spelling` says. Works for any triple, also one that does
    /// not exist (the month must be 1–12 in the styles that name it).
    pub fn spell(&self, style: usize, spelling: Spelling) -> String {
        let (m, y) = (self.month, self.year);
        let d = if spelling.zero_day {
            format!("{:02}", self.day)
        } else {
            self.day.to_string()
        };
        let mm = if spelling.zero_month {
            format!("{m:02}")
        } else {
            m.to_string()
        };
        let month = MONTHS.get(m.wrapping_sub(1)).copied().unwrap_or("Smarch");
        let short = &month[..3];
        let weekday = WEEKDAYS[self.weekday % 7];
        let n = self.day;
        let ordinal = match (n % 10, n % 100) {
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
            6 => format!("{d}.{mm}.{y}"),
            7 => format!("{y}/{mm}/{d}"),
            8 => format!("the {n}{ordinal} of {month} {y}"),
            9 => format!("{month} {n}{ordinal}, {y}"),
            _ => format!("{y}-{mm}-{d}"),
        }
    }
}

/// The split a calendar triple belongs to: a hash with a fixed salt. For the days of 1900–2099
/// this is the hash of the day number, as before the `?` kinds existed, so the splits of real
/// dates did not move.
pub fn split_of_triple(year: i64, month: usize, day: usize) -> Split {
    let real = YEARS.contains(&year) && (1..=12).contains(&month) && (1..=days_in_month(year, month)).contains(&day);
    let key = if real {
        day_number(year, month, day) as u64
    } else {
        // Any other triple: a key outside the real days' range.
        (1 << 40) ^ ((year as u64) << 16) ^ ((month as u64) << 8) ^ day as u64
    };
    split_of(key as i64)
}

/// The split a day number of 1900–2099 belongs to.
pub fn split_of(n: i64) -> Split {
    let mut rng = SplitMix64::new(0xDA7E_5EED ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    match rng.next_u64() % 10 {
        0 => Split::Test,
        1 => Split::Valid,
        _ => Split::Train,
    }
}

/// One example: source text, target text, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text as written.
    pub source: String,
    /// `YYYY-MM-DD`, or `?`.
    pub target: String,
    /// Its style, an index into [`STYLES`] (`None` for text that is not written in one).
    pub style: Option<usize>,
    /// What kind of text it is (never [`Kind::Mixed`]).
    pub kind: Kind,
}

/// Draws the examples of one split.
struct Generator {
    rng: SplitMix64,
    split: Split,
    days: Vec<i64>,
}

impl Generator {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn day_of_split(&mut self) -> Date {
        let i = self.below(self.days.len());
        let n = self.days[i];
        Date::from_day_number(n)
    }

    /// A random leading-zero choice for `style`.
    fn spelling(&mut self, style: usize) -> Spelling {
        match style {
            6 | 7 | 10 => Spelling {
                zero_day: self.chance(50),
                zero_month: self.chance(50),
            },
            0..=5 => Spelling {
                zero_day: self.chance(15),
                zero_month: false,
            },
            _ => Spelling::default(),
        }
    }

    /// Letter case (as written, lower, upper, a third each less a tenth mixed at random) and
    /// spaces (a quarter of the texts get runs of spaces, leading or trailing spaces).
    fn respell(&mut self, text: &str) -> String {
        let cased: String = match self.below(10) {
            0..=2 => text.to_string(),
            3..=5 => text.to_lowercase(),
            6..=8 => text.to_uppercase(),
            _ => text
                .chars()
                .map(|c| {
                    if self.chance(50) {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect(),
        };
        if !self.chance(25) {
            return cased;
        }
        let mut out = " ".repeat(if self.chance(40) { 1 + self.below(3) } else { 0 });
        for c in cased.chars() {
            out.push(c);
            if c == ' ' && self.chance(40) {
                out.push_str(&" ".repeat(1 + self.below(2)));
            }
        }
        out.push_str(&" ".repeat(if self.chance(40) { 1 + self.below(3) } else { 0 }));
        out
    }

    /// `date` in a random (or the given) style and spelling.
    fn written(&mut self, date: Date, style: Option<usize>) -> (String, usize) {
        let style = style.unwrap_or_else(|| self.below(STYLES.len()));
        let spelling = self.spelling(style);
        (self.respell(&date.spell(style, spelling)), style)
    }

    /// A triple of this split for which `pick` returns a day, with a random weekday (the
    /// weekday of a day that does not exist is whatever the writer put).
    fn triple(&mut self, years: &[(i64, i64)], pick: impl Fn(&mut Self, i64, usize) -> Option<usize>) -> Date {
        loop {
            let (lo, hi) = years[self.below(years.len())];
            let year = lo + self.below((hi - lo + 1) as usize) as i64;
            let month = 1 + self.below(12);
            let Some(day) = pick(self, year, month) else { continue };
            if split_of_triple(year, month, day) == self.split {
                let weekday = if (1..=days_in_month(year, month)).contains(&day) {
                    day_number(year, month, day).rem_euclid(7) as usize
                } else {
                    self.below(7)
                };
                return Date {
                    year,
                    month,
                    day,
                    weekday,
                };
            }
        }
    }

    fn words(&mut self, count: usize) -> String {
        (0..count)
            .map(|_| WORDS[self.below(WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A real date written in a random (or the given) style, answered with its ISO form.
    fn answered(&mut self, date: Date, style: Option<usize>) -> Example {
        let (source, style) = self.written(date, style);
        Example {
            source,
            target: date.iso(),
            style: Some(style),
            kind: Kind::Date,
        }
    }

    fn example(&mut self, kind: Kind, style: Option<usize>) -> Example {
        const IN_RANGE: [(i64, i64); 1] = [(1900, 2099)];
        let unanswerable = |source: String, style: Option<usize>, kind: Kind| Example {
            source,
            target: "?".to_string(),
            style,
            kind,
        };
        match kind {
            Kind::Date => {
                // One date in eight is the end of a month or a 29 February, the boundaries
                // of the `?` kinds; the rest are uniform over the split's days.
                let date = if self.chance(12) {
                    self.triple(&IN_RANGE, |g, y, m| {
                        let last = days_in_month(y, m);
                        (m == 2 && last == 29 || g.chance(20)).then_some(last)
                    })
                } else {
                    self.day_of_split()
                };
                self.answered(date, style)
            }
            Kind::Feb29 => {
                let date = self.triple(&IN_RANGE, |_, y, m| (m == 2 && !is_leap(y)).then_some(29));
                let (source, style) = self.written(date, style);
                unanswerable(source, Some(style), kind)
            }
            Kind::PastMonthEnd => {
                let date = self.triple(&IN_RANGE, |g, y, m| {
                    let last = days_in_month(y, m);
                    (last < 31).then(|| (last + 1 + g.below(31 - last)).max(30))
                });
                let (source, style) = self.written(date, style);
                unanswerable(source, Some(style), kind)
            }
            Kind::BadNumber => {
                let style = style.unwrap_or_else(|| self.below(STYLES.len()));
                let bad_month = matches!(style, 6 | 7 | 10) && self.chance(50);
                let mut date = self.triple(&IN_RANGE, |g, _, _| {
                    Some(if bad_month || g.chance(25) {
                        1 + g.below(28)
                    } else {
                        32 + g.below(8)
                    })
                });
                if bad_month {
                    date.month = if self.chance(25) { 0 } else { 13 + self.below(7) };
                } else if date.day < 32 {
                    date.day = 0;
                }
                let spelling = self.spelling(style);
                let source = self.respell(&date.spell(style, spelling));
                unanswerable(source, Some(style), kind)
            }
            Kind::OutOfRange => {
                let years = [
                    (1000, 1899),
                    (2100, 2999),
                    (1800, 1899),
                    (2100, 2199),
                    (1, 999),
                    (3000, 9999),
                ];
                let date = self.triple(&years, |g, y, m| Some(1 + g.below(days_in_month(y, m))));
                let (source, style) = self.written(date, style);
                unanswerable(source, Some(style), kind)
            }
            Kind::Empty => {
                let spaces = if self.chance(50) { 0 } else { 1 + self.below(4) };
                unanswerable(" ".repeat(spaces), None, kind)
            }
            Kind::Words => {
                let count = 1 + self.below(5);
                let words = self.words(count);
                let text = self.respell(&words);
                unanswerable(text, None, kind)
            }
            Kind::Characters => {
                let len = 1 + self.below(30);
                let text = (0..len).map(|_| char::from(b' ' + self.below(95) as u8)).collect();
                unanswerable(text, None, kind)
            }
            Kind::Digits => {
                let len = 1 + self.below(12);
                let text = (0..len).map(|_| char::from(b'0' + self.below(10) as u8)).collect();
                unanswerable(text, None, kind)
            }
            Kind::Partial => {
                let date = self.day_of_split();
                let (d, m, y) = (date.day, date.month, date.year);
                let month = MONTHS[m - 1];
                let text = match self.below(9) {
                    0 => format!("{month} {y}"),
                    1 => format!("{d} {month}"),
                    2 => format!("{month} {d}"),
                    3 => format!("{d}.{m}"),
                    4 => format!("{y}/{m:02}"),
                    5 => format!("{m}/{d}/{y}"),
                    6 => format!("{}, {d} {month}", WEEKDAYS[date.weekday]),
                    7 => format!("{y}-{m:02}"),
                    _ => format!("{d} {m} {y}"),
                };
                let text = self.respell(&text);
                unanswerable(text, None, kind)
            }
            Kind::Junk => {
                let date = self.day_of_split();
                let (text, style) = self.written(date, style);
                let count = 1 + self.below(2);
                let words = self.words(count);
                let text = if self.chance(50) {
                    format!("{words} {}", text.trim())
                } else {
                    format!("{} {words}", text.trim())
                };
                unanswerable(text, Some(style), kind)
            }
            Kind::Mixed => {
                let kind = match self.below(100) {
                    0..=63 => Kind::Date,
                    64..=66 => {
                        // 29 February of a leap year beside the common years' below: the
                        // leap-year rule is the hardest thing the model learns.
                        let date = self.triple(&IN_RANGE, |_, y, m| (m == 2 && is_leap(y)).then_some(29));
                        return self.answered(date, style);
                    }
                    67..=74 => Kind::Feb29,
                    75..=78 => Kind::PastMonthEnd,
                    79..=81 => Kind::BadNumber,
                    82..=86 => Kind::OutOfRange,
                    87 => Kind::Empty,
                    88..=89 => Kind::Words,
                    90..=91 => Kind::Characters,
                    92..=93 => Kind::Digits,
                    94..=96 => Kind::Partial,
                    _ => Kind::Junk,
                };
                self.example(kind, style)
            }
        }
    }
}

/// `count` examples of `kind` from `split`, drawn with `seed`; `style` fixes the style of the
/// kinds written in one.
pub fn generate(split: Split, kind: Kind, count: usize, seed: u64, style: Option<usize>) -> Vec<Example> {
    let mut generator = Generator {
        rng: SplitMix64::new(seed),
        split,
        days: (0..DAYS).filter(|&n| split_of(n) == split).collect(),
    };
    (0..count).map(|_| generator.example(kind, style)).collect()
}

/// `attn dates`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  attn dates --split train --kind mixed --count 200000 --seed 1 > train.tsv\n\nStyles (0-10): 28 November 2026 | November 28, 2026 | 28 Nov 2026 | Nov 28, 2026 |\nSaturday, 28 November 2026 | saturday 28 nov 2026 | 28.11.2026 | 2026/11/28 |\nthe 28th of November 2026 | November 28th, 2026 | 2026-11-28; any letter case, numbers with or\nwithout leading zeros, any runs of spaces; years 1900-2099. Every other kind is answered `?`."
)]
pub struct Args {
    /// Which dates: train, valid and test are disjoint sets of calendar days.
    #[arg(long, value_enum)]
    split: Split,
    /// What to write: real dates, one kind of text answered `?`, or the training mixture.
    #[arg(long, value_enum, default_value_t = Kind::Date)]
    kind: Kind,
    /// How many pairs.
    #[arg(long)]
    count: usize,
    /// Draws the days, styles and spellings.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only this style (0-10), for the kinds written in a style.
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
    for e in generate(args.split, args.kind, args.count, args.seed, args.style) {
        writeln!(out, "{}\t{}", e.source, e.target)?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day_of(iso: &str) -> i64 {
        (0..DAYS).find(|&n| Date::from_day_number(n).iso() == iso).unwrap()
    }

    #[test]
    fn calendar_and_weekdays() {
        let d = Date::from_day_number(0);
        assert_eq!((d.iso(), d.weekday), ("1900-01-01".to_string(), 0));
        // 2026-11-28 is a Saturday.
        let d = Date::from_day_number(day_of("2026-11-28"));
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
        assert_eq!(Date::from_day_number(day_of("1999-03-11")).write(9), "March 11th, 1999");
        // days_from_civil inverts civil_from_days, also far outside 1900-2099.
        for n in (-800_000..800_000).step_by(997) {
            let d = Date::from_day_number(n);
            assert_eq!(day_number(d.year, d.month, d.day), n, "{}", d.iso());
            assert!(days_in_month(d.year, d.month) >= d.day);
        }
        assert!(is_leap(2000) && is_leap(2024) && !is_leap(1900) && !is_leap(2100) && !is_leap(2001));
    }

    #[test]
    fn spellings() {
        let d = Date::from_day_number(day_of("1911-05-08"));
        let zeros = Spelling {
            zero_day: true,
            zero_month: true,
        };
        assert_eq!(d.spell(6, zeros), "08.05.1911");
        assert_eq!(d.spell(6, Spelling::default()), "8.5.1911");
        assert_eq!(d.spell(7, Spelling::default()), "1911/5/8");
        assert_eq!(d.spell(7, zeros), "1911/05/08");
        assert_eq!(d.spell(10, zeros), "1911-05-08");
        assert_eq!(d.spell(0, zeros), "08 May 1911");
        // Ordinals never take a zero.
        assert_eq!(d.spell(8, zeros), "the 8th of May 1911");
    }

    #[test]
    fn splits_are_disjoint_and_sized() {
        let mut counts = [0usize; 3];
        for n in 0..DAYS {
            counts[split_of(n) as usize] += 1;
        }
        let total = DAYS as f64;
        assert!((counts[0] as f64 / total - 0.8).abs() < 0.01, "{counts:?}");
        let train: std::collections::HashSet<String> = generate(Split::Train, Kind::Date, 20_000, 1, None)
            .into_iter()
            .map(|e| e.target)
            .collect();
        let test = generate(Split::Test, Kind::Date, 5_000, 1, None);
        assert!(test.iter().all(|e| !train.contains(&e.target)));
        assert_eq!(
            generate(Split::Test, Kind::Mixed, 50, 3, None),
            generate(Split::Test, Kind::Mixed, 50, 3, None)
        );
        assert!(generate(Split::Valid, Kind::Date, 100, 3, Some(4))
            .iter()
            .all(|e| e.style == Some(4)));
        // The days of real dates keep the split they had before the `?` kinds.
        for n in (0..DAYS).step_by(37) {
            let d = Date::from_day_number(n);
            assert_eq!(split_of_triple(d.year, d.month, d.day), split_of(n));
        }
    }

    /// Each kind is what it says: real dates parse back to their target, the `?` kinds do not
    /// name a real date of 1900-2099.
    #[test]
    fn kinds_are_what_they_say() {
        for e in generate(Split::Train, Kind::Date, 2_000, 5, None) {
            let (y, m, d) = (&e.target[..4], &e.target[5..7], &e.target[8..]);
            let (y, m, d): (i64, usize, usize) = (y.parse().unwrap(), m.parse().unwrap(), d.parse().unwrap());
            assert!(YEARS.contains(&y) && (1..=days_in_month(y, m)).contains(&d), "{e:?}");
            let lower = e.source.to_lowercase();
            assert!(lower.contains(&y.to_string()), "{e:?}");
            assert!(!e.source.contains('\t'));
        }
        for e in generate(Split::Train, Kind::Feb29, 200, 5, None) {
            assert_eq!(e.target, "?");
            let year: i64 = e
                .source
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| s.len() == 4)
                .unwrap()
                .parse()
                .unwrap();
            assert!(!is_leap(year), "{e:?}");
        }
        for kind in Kind::UNANSWERABLE {
            let examples = generate(Split::Test, kind, 300, 7, None);
            assert!(examples.iter().all(|e| e.target == "?" && e.kind == kind), "{kind:?}");
        }
        let empties = generate(Split::Test, Kind::Empty, 50, 7, None);
        assert!(empties.iter().any(|e| e.source.is_empty()));
        assert!(empties.iter().all(|e| e.source.trim().is_empty()));
        let mixed = generate(Split::Train, Kind::Mixed, 10_000, 1, None);
        let dates = mixed.iter().filter(|e| e.kind == Kind::Date).count();
        assert!((6_200..7_200).contains(&dates), "{dates}");
        // Respelled texts include spaces runs, leading zeros and every case.
        assert!(mixed.iter().any(|e| e.source.starts_with(' ')));
        assert!(mixed.iter().any(|e| e.source.contains("  ")));
        assert!(mixed.iter().any(|e| e.source.contains(".0")));
    }
}
