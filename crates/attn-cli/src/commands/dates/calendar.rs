//! The calendar of the date task: the eleven styles, days from 1900-01-01, leap years, how a date
//! is written and spelled, and the split each calendar triple belongs to.

use attn_nn::core::kernels::rng::SplitMix64;

use super::Split;

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

pub(super) const MONTHS: [&str; 12] = [
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
pub(super) const WEEKDAYS: [&str; 7] = [
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

/// The years the model answers for.
pub const YEARS: std::ops::RangeInclusive<i64> = 1900..=2099;

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
