//! Partial-precision Date, DateTime and Time values: parsing, comparison, calendar arithmetic, boundaries and formatting.
//!
//! FHIRPath keeps the precision a value was written with (`@2015`, `@2015-02-04T14`), and
//! comparisons between values of different precision may be undecided (empty), so values are
//! kept as broken-down fields rather than as instants.

use std::cmp::Ordering;
use std::fmt::Write;

/// How much of a date/time value is known; seconds and milliseconds count as one level when comparing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

/// Which of the three FHIRPath temporal types a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalKind {
    Date,
    DateTime,
    Time,
}

/// A date, date-time or time with the precision it was written with.
///
/// For `Time` the date fields are unused. Fields below `precision` are zero (or 1 for month/day).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Temporal {
    pub kind: TemporalKind,
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub millis: u16,
    pub precision: Precision,
    /// Offset from UTC in minutes, when written.
    pub tz: Option<i16>,
}

/// Calendar units that can be added to a temporal value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalendarUnit {
    Year,
    Month,
    Week,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

pub fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((y + i64::from(m <= 2)) as i32, m, d)
}

struct Cursor<'s> {
    s: &'s [u8],
    i: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let end = self.i.checked_add(n)?;
        let part = self.s.get(self.i..end)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.i = end;
        Some(part.iter().fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0')))
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
}

impl Temporal {
    fn empty(kind: TemporalKind) -> Temporal {
        Temporal {
            kind,
            year: 0,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Year,
            tz: None,
        }
    }

    /// Parses `YYYY[-MM[-DD]]`.
    pub fn parse_date(s: &str) -> Option<Temporal> {
        let mut c = Cursor { s: s.as_bytes(), i: 0 };
        let mut t = Temporal::empty(TemporalKind::Date);
        parse_date_part(&mut c, &mut t)?;
        c.done().then_some(t)
    }

    /// Parses `YYYY[-MM[-DD[Thh[:mm[:ss[.fff]]]][Z|±hh:mm]]]`; with `allow_bare_t`, a trailing
    /// `T` after any date part is accepted (the FHIRPath literal form `@2015T`).
    pub fn parse_datetime(s: &str, allow_bare_t: bool) -> Option<Temporal> {
        let mut c = Cursor { s: s.as_bytes(), i: 0 };
        let mut t = Temporal::empty(TemporalKind::DateTime);
        parse_date_part(&mut c, &mut t)?;
        if c.eat(b'T') {
            if c.done() {
                return allow_bare_t.then_some(t);
            }
            if t.precision != Precision::Day {
                return None;
            }
            parse_time_part(&mut c, &mut t)?;
            if !c.done() {
                t.tz = Some(parse_tz(&mut c)?);
            }
        }
        c.done().then_some(t)
    }

    /// Parses `hh[:mm[:ss[.fff]]]` (no time zone: FHIRPath times have none).
    pub fn parse_time(s: &str) -> Option<Temporal> {
        let mut c = Cursor { s: s.as_bytes(), i: 0 };
        let mut t = Temporal::empty(TemporalKind::Time);
        parse_time_part(&mut c, &mut t)?;
        c.done().then_some(t)
    }

    /// The same instant with its date/time fields shifted to UTC (only meaningful with a zone and hour precision).
    fn to_utc(self) -> Temporal {
        match self.tz {
            Some(off) if off != 0 && self.precision >= Precision::Hour => {
                let mut t = self;
                t.tz = Some(0);
                t.add_millis(-i64::from(off) * 60_000);
                t
            }
            _ => self,
        }
    }

    /// Milliseconds within the day, used for the time-of-day part.
    fn day_millis(&self) -> i64 {
        ((i64::from(self.hour) * 60 + i64::from(self.minute)) * 60 + i64::from(self.second)) * 1000 + i64::from(self.millis)
    }

    fn add_millis(&mut self, delta: i64) {
        let total = self.day_millis() + delta;
        let days = total.div_euclid(86_400_000);
        let rest = total.rem_euclid(86_400_000);
        self.hour = (rest / 3_600_000) as u8;
        self.minute = (rest / 60_000 % 60) as u8;
        self.second = (rest / 1000 % 60) as u8;
        self.millis = (rest % 1000) as u16;
        if self.kind != TemporalKind::Time && days != 0 {
            self.add_days(days);
        }
    }

    fn add_days(&mut self, days: i64) {
        let (y, m, d) = civil_from_days(days_from_civil(self.year, self.month, self.day) + days);
        self.year = y;
        self.month = m;
        self.day = d;
    }

    fn add_months(&mut self, months: i64) -> Option<()> {
        let total = (i64::from(self.year) * 12 + i64::from(self.month) - 1).checked_add(months)?;
        self.year = i32::try_from(total.div_euclid(12)).ok()?;
        self.month = (total.rem_euclid(12) + 1) as u8;
        self.day = self.day.min(days_in_month(self.year, self.month));
        Some(())
    }

    /// Adds `amount` (truncated to a whole number of `unit`) of a calendar unit; `None` on overflow.
    pub fn add(self, amount: i64, unit: CalendarUnit) -> Option<Temporal> {
        let mut t = self;
        match unit {
            CalendarUnit::Year if t.kind != TemporalKind::Time => t.add_months(amount.checked_mul(12)?)?,
            CalendarUnit::Month if t.kind != TemporalKind::Time => t.add_months(amount)?,
            CalendarUnit::Week | CalendarUnit::Day if t.kind != TemporalKind::Time => {
                let days = if unit == CalendarUnit::Week { amount.checked_mul(7)? } else { amount };
                if days.abs() > 10_000_000 {
                    return None;
                }
                t.add_days(days)
            }
            CalendarUnit::Year | CalendarUnit::Month | CalendarUnit::Week | CalendarUnit::Day => return None,
            CalendarUnit::Hour | CalendarUnit::Minute | CalendarUnit::Second | CalendarUnit::Millisecond => {
                let factor = match unit {
                    CalendarUnit::Hour => 3_600_000,
                    CalendarUnit::Minute => 60_000,
                    CalendarUnit::Second => 1000,
                    _ => 1,
                };
                let ms = amount.checked_mul(factor)?;
                if ms.abs() > 864_000_000_000_000 {
                    return None;
                }
                if t.precision < Precision::Hour && t.kind != TemporalKind::Time {
                    // A date only moves by whole days.
                    t.add_days(ms / 86_400_000);
                } else {
                    t.add_millis(ms);
                }
            }
        }
        if !(1..=9999).contains(&t.year) && t.kind != TemporalKind::Time {
            return None;
        }
        Some(t)
    }

    /// Ordering when it is decided: `None` when the values have different precision and agree on
    /// every component they share, or when only one of two hour-precision values has a time zone.
    pub fn compare(&self, other: &Temporal) -> Option<Ordering> {
        let (a, b) = if self.precision >= Precision::Hour && other.precision >= Precision::Hour {
            match (self.tz, other.tz) {
                (Some(_), Some(_)) => (self.to_utc(), other.to_utc()),
                (None, None) => (*self, *other),
                _ => return None,
            }
        } else {
            (*self, *other)
        };
        let level = |p: Precision| if p == Precision::Millisecond { Precision::Second } else { p };
        let (pa, pb) = (level(a.precision), level(b.precision));
        let common = pa.min(pb);
        let fields: [(Precision, i64, i64); 6] = [
            (Precision::Year, i64::from(a.year), i64::from(b.year)),
            (Precision::Month, i64::from(a.month), i64::from(b.month)),
            (Precision::Day, i64::from(a.day), i64::from(b.day)),
            (Precision::Hour, i64::from(a.hour), i64::from(b.hour)),
            (Precision::Minute, i64::from(a.minute), i64::from(b.minute)),
            (
                Precision::Second,
                i64::from(a.second) * 1000 + i64::from(a.millis),
                i64::from(b.second) * 1000 + i64::from(b.millis),
            ),
        ];
        let start = if a.kind == TemporalKind::Time { 3 } else { 0 };
        for &(p, x, y) in &fields[start..] {
            if p > common {
                break;
            }
            match x.cmp(&y) {
                Ordering::Equal => {}
                other => return Some(other),
            }
        }
        (pa == pb).then_some(Ordering::Equal)
    }

    /// Equivalence (`~`): equal precision and equal values; different precision is simply false.
    pub fn equivalent(&self, other: &Temporal) -> bool {
        let level = |p: Precision| if p == Precision::Millisecond { Precision::Second } else { p };
        level(self.precision) == level(other.precision) && self.compare(other) == Some(Ordering::Equal)
    }

    /// Number of digits of precision, as `precision()` reports it (`@2014` → 4, `@T10:30` → 4).
    pub fn digits(&self) -> i64 {
        let date = match self.precision {
            Precision::Year => 4,
            Precision::Month => 6,
            Precision::Day => 8,
            Precision::Hour => 10,
            Precision::Minute => 12,
            Precision::Second => 14,
            Precision::Millisecond => 17,
        };
        if self.kind == TemporalKind::Time { date - 8 } else { date }
    }

    fn precision_for_digits(kind: TemporalKind, digits: i64) -> Option<Precision> {
        let digits = if kind == TemporalKind::Time { digits.checked_add(8)? } else { digits };
        let p = match digits {
            4 => Precision::Year,
            6 => Precision::Month,
            8 => Precision::Day,
            10 => Precision::Hour,
            12 => Precision::Minute,
            14 => Precision::Second,
            17 => Precision::Millisecond,
            _ => return None,
        };
        let ok = match kind {
            TemporalKind::Date => p <= Precision::Day,
            TemporalKind::Time => p >= Precision::Hour,
            TemporalKind::DateTime => true,
        };
        ok.then_some(p)
    }

    /// The earliest (`high == false`) or latest value the value could stand for, at `digits` precision.
    pub fn boundary(&self, digits: Option<i64>, high: bool) -> Option<Temporal> {
        let target = match digits {
            Some(d) => Temporal::precision_for_digits(self.kind, d)?,
            None => match self.kind {
                TemporalKind::Date => Precision::Day,
                _ => Precision::Millisecond,
            },
        };
        let mut t = *self;
        if high {
            if t.precision < Precision::Month {
                t.month = 12;
            }
            if t.precision < Precision::Day {
                t.day = days_in_month(t.year, t.month);
            }
            if t.precision < Precision::Hour {
                t.hour = 23;
            }
            if t.precision < Precision::Minute {
                t.minute = 59;
            }
            if t.precision < Precision::Second {
                t.second = 59;
            }
            if t.precision < Precision::Millisecond {
                t.millis = 999;
            }
        }
        t.precision = target;
        if t.kind == TemporalKind::DateTime && target < Precision::Hour {
            t.kind = TemporalKind::Date;
            t.tz = None;
        } else if t.kind == TemporalKind::DateTime && t.tz.is_none() {
            // Unknown zone: the widest range is from +14:00 (earliest) to -12:00 (latest).
            t.tz = Some(if high { -12 * 60 } else { 14 * 60 });
        }
        t.clear_below_precision();
        Some(t)
    }

    fn clear_below_precision(&mut self) {
        let p = self.precision;
        if p < Precision::Month {
            self.month = 1;
        }
        if p < Precision::Day {
            self.day = 1;
        }
        if p < Precision::Hour {
            self.hour = 0;
        }
        if p < Precision::Minute {
            self.minute = 0;
        }
        if p < Precision::Second {
            self.second = 0;
        }
        if p < Precision::Millisecond {
            self.millis = 0;
        }
    }

    /// The date part of a date-time.
    pub fn date_part(&self) -> Temporal {
        let mut t = *self;
        t.kind = TemporalKind::Date;
        t.tz = None;
        t.precision = t.precision.min(Precision::Day);
        t.clear_below_precision();
        t
    }

    /// The time part of a date-time (at least hour precision is assumed).
    pub fn time_part(&self) -> Temporal {
        let mut t = *self;
        t.kind = TemporalKind::Time;
        t.tz = None;
        t.year = 0;
        t.month = 1;
        t.day = 1;
        t.precision = t.precision.max(Precision::Hour);
        t
    }

    /// The value as a date-time (a date keeps its precision).
    pub fn as_datetime(&self) -> Temporal {
        let mut t = *self;
        if t.kind == TemporalKind::Date {
            t.kind = TemporalKind::DateTime;
        }
        t
    }

    /// ISO 8601 text without the FHIRPath `@` prefix.
    pub fn to_iso(&self) -> String {
        let mut out = String::with_capacity(29);
        if self.kind != TemporalKind::Time {
            let _ = write!(out, "{:04}", self.year);
            if self.precision >= Precision::Month {
                let _ = write!(out, "-{:02}", self.month);
            }
            if self.precision >= Precision::Day {
                let _ = write!(out, "-{:02}", self.day);
            }
            if self.kind == TemporalKind::Date || self.precision < Precision::Hour {
                return out;
            }
            out.push('T');
        }
        let _ = write!(out, "{:02}", self.hour);
        if self.precision >= Precision::Minute {
            let _ = write!(out, ":{:02}", self.minute);
        }
        if self.precision >= Precision::Second {
            let _ = write!(out, ":{:02}", self.second);
        }
        if self.precision >= Precision::Millisecond {
            let _ = write!(out, ".{:03}", self.millis);
        }
        if let Some(tz) = self.tz {
            if tz == 0 {
                out.push('Z');
            } else {
                let sign = if tz < 0 { '-' } else { '+' };
                let _ = write!(out, "{sign}{:02}:{:02}", tz.unsigned_abs() / 60, tz.unsigned_abs() % 60);
            }
        }
        out
    }

    /// The FHIRPath literal form (`@2014-01-05`, `@2014-01-05T10:30`, `@T10:30`).
    pub fn to_literal(&self) -> String {
        match self.kind {
            TemporalKind::Time => format!("@T{}", self.to_iso()),
            TemporalKind::DateTime if self.precision < Precision::Hour => format!("@{}T", self.to_iso()),
            _ => format!("@{}", self.to_iso()),
        }
    }

    /// The current moment, in UTC, from the system clock.
    pub fn now_utc() -> Temporal {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ms = i64::try_from(since.as_millis()).unwrap_or(0);
        let (year, month, day) = civil_from_days(ms.div_euclid(86_400_000));
        let mut t = Temporal {
            kind: TemporalKind::DateTime,
            year,
            month,
            day,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Millisecond,
            tz: Some(0),
        };
        t.add_millis(ms.rem_euclid(86_400_000));
        t
    }
}

fn parse_date_part(c: &mut Cursor<'_>, t: &mut Temporal) -> Option<()> {
    t.year = i32::try_from(c.digits(4)?).ok()?;
    t.precision = Precision::Year;
    if c.eat(b'-') {
        let m = c.digits(2)? as u8;
        if !(1..=12).contains(&m) {
            return None;
        }
        t.month = m;
        t.precision = Precision::Month;
        if c.eat(b'-') {
            let d = c.digits(2)? as u8;
            if d < 1 || d > days_in_month(t.year, m) {
                return None;
            }
            t.day = d;
            t.precision = Precision::Day;
        }
    }
    Some(())
}

fn parse_time_part(c: &mut Cursor<'_>, t: &mut Temporal) -> Option<()> {
    let h = c.digits(2)? as u8;
    if h > 23 {
        return None;
    }
    t.hour = h;
    t.precision = Precision::Hour;
    if c.eat(b':') {
        let m = c.digits(2)? as u8;
        if m > 59 {
            return None;
        }
        t.minute = m;
        t.precision = Precision::Minute;
        if c.eat(b':') {
            let s = c.digits(2)? as u8;
            if s > 59 {
                return None;
            }
            t.second = s;
            t.precision = Precision::Second;
            if c.eat(b'.') {
                let start = c.i;
                while c.s.get(c.i).is_some_and(u8::is_ascii_digit) {
                    c.i += 1;
                }
                let frac = &c.s[start..c.i];
                if frac.is_empty() {
                    return None;
                }
                let mut ms = 0u16;
                for k in 0..3 {
                    ms = ms * 10 + frac.get(k).map_or(0, |b| u16::from(b - b'0'));
                }
                t.millis = ms;
                t.precision = Precision::Millisecond;
            }
        }
    }
    Some(())
}

fn parse_tz(c: &mut Cursor<'_>) -> Option<i16> {
    if c.eat(b'Z') {
        return Some(0);
    }
    let sign = if c.eat(b'+') {
        1
    } else if c.eat(b'-') {
        -1
    } else {
        return None;
    };
    let h = c.digits(2)? as i16;
    if !c.eat(b':') {
        return None;
    }
    let m = c.digits(2)? as i16;
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 60 + m))
}
