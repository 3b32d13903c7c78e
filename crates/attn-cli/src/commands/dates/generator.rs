//! Draws the examples of one split: real dates in a style and spelling, and every kind of text
//! answered `?`.

use attn_nn::core::kernels::rng::SplitMix64;

use super::calendar::{
    day_number, days_in_month, is_leap, split_of, split_of_triple, Date, Spelling, DAYS, MONTHS, STYLES, WEEKDAYS,
};
use super::{Example, Kind, Split};

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

/// Draws the examples of one split.
pub(super) struct Generator {
    rng: SplitMix64,
    split: Split,
    days: Vec<i64>,
}

/// The years the model answers for, as a range list for [`Generator::triple`].
const IN_RANGE: [(i64, i64); 1] = [(1900, 2099)];

impl Generator {
    /// Draws from the days of `split`, with `seed`.
    pub(super) fn new(split: Split, seed: u64) -> Self {
        Generator {
            rng: SplitMix64::new(seed),
            split,
            days: (0..DAYS).filter(|&n| split_of(n) == split).collect(),
        }
    }

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

    pub(super) fn example(&mut self, kind: Kind, style: Option<usize>) -> Example {
        let unanswerable = Self::unanswerable;
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
            Kind::BadNumber => self.bad_number(style),
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
            Kind::Partial => self.partial(),
            Kind::Junk => self.junk(style),
            Kind::Mixed => self.mixed(style),
        }
    }

    /// An example answered `?`.
    fn unanswerable(source: String, style: Option<usize>, kind: Kind) -> Example {
        Example {
            source,
            target: "?".to_string(),
            style,
            kind,
        }
    }

    /// A real date in a style with its day (or month) number out of range.
    fn bad_number(&mut self, style: Option<usize>) -> Example {
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
        Self::unanswerable(source, Some(style), Kind::BadNumber)
    }

    /// Part of a date of the split: a month and year, a day and month, and the like.
    fn partial(&mut self) -> Example {
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
        Self::unanswerable(text, None, Kind::Partial)
    }

    /// A date of the split with words before or after it.
    fn junk(&mut self, style: Option<usize>) -> Example {
        let date = self.day_of_split();
        let (text, style) = self.written(date, style);
        let count = 1 + self.below(2);
        let words = self.words(count);
        let text = if self.chance(50) {
            format!("{words} {}", text.trim())
        } else {
            format!("{} {words}", text.trim())
        };
        Self::unanswerable(text, Some(style), Kind::Junk)
    }

    /// One draw of the training mixture.
    fn mixed(&mut self, style: Option<usize>) -> Example {
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
