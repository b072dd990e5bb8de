//! System.Quantity: a decimal value with a UCUM unit or calendar keyword, and the small UCUM subset used to compare and multiply them.
//!
//! Full UCUM is a large grammar and table; invariants and the conformance suite only need the
//! common metric prefixes, SI base units, time units and a few customary units, so this module
//! converts a unit to a (factor, dimension vector) pair and compares in base units. Units it
//! cannot read compare only with the identical unit string.

use rust_decimal::Decimal;
use std::rc::Rc;

use super::temporal::CalendarUnit;

/// A FHIRPath quantity; `unit` is a UCUM code or a calendar keyword (`week`, `days`), never quoted.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    pub value: Decimal,
    pub unit: Rc<str>,
}

/// Exponents of m, g, s, K, mol, A, cd, plus two pseudo-dimensions for the calendar year and
/// month keywords, which deliberately do not convert to UCUM `a`/`mo`.
type Dims = [i8; 9];

const DIMLESS: Dims = [0; 9];

/// The calendar keywords FHIRPath allows unquoted, singular and plural.
pub fn calendar_keyword(word: &str) -> Option<CalendarUnit> {
    Some(match word {
        "year" | "years" => CalendarUnit::Year,
        "month" | "months" => CalendarUnit::Month,
        "week" | "weeks" => CalendarUnit::Week,
        "day" | "days" => CalendarUnit::Day,
        "hour" | "hours" => CalendarUnit::Hour,
        "minute" | "minutes" => CalendarUnit::Minute,
        "second" | "seconds" => CalendarUnit::Second,
        "millisecond" | "milliseconds" => CalendarUnit::Millisecond,
        _ => return None,
    })
}

impl Quantity {
    pub fn new(value: Decimal, unit: &str) -> Quantity {
        Quantity { value, unit: Rc::from(unit) }
    }

    /// The calendar unit this quantity can be added to a date with: keywords, and the UCUM
    /// codes with a fixed length (`wk`, `d`, `h`, `min`, `s`, `ms`); UCUM `a` and `mo` are not.
    pub fn calendar_unit(&self) -> Option<CalendarUnit> {
        calendar_keyword(&self.unit).or(match &*self.unit {
            "wk" => Some(CalendarUnit::Week),
            "d" => Some(CalendarUnit::Day),
            "h" => Some(CalendarUnit::Hour),
            "min" => Some(CalendarUnit::Minute),
            "s" => Some(CalendarUnit::Second),
            "ms" => Some(CalendarUnit::Millisecond),
            _ => None,
        })
    }

    /// The value in base units and the dimension vector, when the unit is understood.
    fn canonical(&self) -> Option<(Decimal, Dims)> {
        let (factor, dims) = match calendar_keyword(&self.unit) {
            Some(CalendarUnit::Year) => (Decimal::ONE, dim(7)),
            Some(CalendarUnit::Month) => (Decimal::ONE, dim(8)),
            Some(CalendarUnit::Week) => parse_unit("wk")?,
            Some(CalendarUnit::Day) => parse_unit("d")?,
            Some(CalendarUnit::Hour) => parse_unit("h")?,
            Some(CalendarUnit::Minute) => parse_unit("min")?,
            Some(CalendarUnit::Second) => parse_unit("s")?,
            Some(CalendarUnit::Millisecond) => parse_unit("ms")?,
            None => parse_unit(&self.unit)?,
        };
        Some((self.value.checked_mul(factor)?, dims))
    }

    /// Both values in the same unit, or `None` when the units are not comparable.
    pub fn common_values(&self, other: &Quantity) -> Option<(Decimal, Decimal)> {
        if self.unit == other.unit {
            return Some((self.value, other.value));
        }
        let (a, da) = self.canonical()?;
        let (b, db) = other.canonical()?;
        (da == db).then_some((a, b))
    }

    pub fn comparable(&self, other: &Quantity) -> bool {
        self.common_values(other).is_some()
    }

    pub fn multiply(&self, other: &Quantity) -> Option<Quantity> {
        let unit = match (&*self.unit, &*other.unit) {
            ("1", u) | (u, "1") => u.to_string(),
            (a, b) => format!("{}.{}", ucum_code(a)?, ucum_code(b)?),
        };
        Some(Quantity { value: self.value.checked_mul(other.value)?, unit: Rc::from(unit) })
    }

    pub fn divide(&self, other: &Quantity) -> Option<Quantity> {
        if other.value.is_zero() {
            return None;
        }
        let unit = match (&*self.unit, &*other.unit) {
            (u, "1") => u.to_string(),
            (a, b) if a == b => "1".to_string(),
            (a, b) => {
                let b = ucum_code(b)?;
                if b.contains(['.', '/']) { format!("{}/({b})", ucum_code(a)?) } else { format!("{}/{b}", ucum_code(a)?) }
            }
        };
        Some(Quantity { value: self.value.checked_div(other.value)?, unit: Rc::from(unit) })
    }

    /// The FHIRPath literal form: `5 'mg'`, or `1 week` for calendar keywords.
    pub fn to_literal(&self) -> String {
        if calendar_keyword(&self.unit).is_some() {
            format!("{} {}", self.value, self.unit)
        } else {
            format!("{} '{}'", self.value, self.unit)
        }
    }
}

/// A calendar keyword's UCUM code, for building product units.
fn ucum_code(unit: &str) -> Option<&str> {
    Some(match calendar_keyword(unit) {
        None => unit,
        Some(CalendarUnit::Week) => "wk",
        Some(CalendarUnit::Day) => "d",
        Some(CalendarUnit::Hour) => "h",
        Some(CalendarUnit::Minute) => "min",
        Some(CalendarUnit::Second) => "s",
        Some(CalendarUnit::Millisecond) => "ms",
        Some(CalendarUnit::Year | CalendarUnit::Month) => return None,
    })
}

fn dim(index: usize) -> Dims {
    let mut d = DIMLESS;
    d[index] = 1;
    d
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap_or(Decimal::ONE)
}

/// Units written without a prefix only (customary and special units).
fn plain_atom(code: &str) -> Option<(Decimal, Dims)> {
    let mut d = DIMLESS;
    let factor = match code {
        "1" => Decimal::ONE,
        "%" => dec("0.01"),
        "min" => {
            d[2] = 1;
            dec("60")
        }
        "h" => {
            d[2] = 1;
            dec("3600")
        }
        "d" => {
            d[2] = 1;
            dec("86400")
        }
        "wk" => {
            d[2] = 1;
            dec("604800")
        }
        "mo" => {
            d[2] = 1;
            dec("2629800")
        }
        "a" => {
            d[2] = 1;
            dec("31557600")
        }
        "[in_i]" => {
            d[0] = 1;
            dec("0.0254")
        }
        "[ft_i]" => {
            d[0] = 1;
            dec("0.3048")
        }
        "[mi_i]" => {
            d[0] = 1;
            dec("1609.344")
        }
        "[lb_av]" => {
            d[1] = 1;
            dec("453.59237")
        }
        "[oz_av]" => {
            d[1] = 1;
            dec("28.349523125")
        }
        "[gr]" => {
            d[1] = 1;
            dec("0.06479891")
        }
        "mm[Hg]" => {
            d[0] = -1;
            d[1] = 1;
            d[2] = -2;
            dec("133322.387415")
        }
        _ => return None,
    };
    Some((factor, d))
}

/// Units that take metric prefixes.
fn metric_atom(code: &str) -> Option<(Decimal, Dims)> {
    let mut d = DIMLESS;
    let factor = match code {
        "m" => {
            d[0] = 1;
            Decimal::ONE
        }
        "g" => {
            d[1] = 1;
            Decimal::ONE
        }
        "s" => {
            d[2] = 1;
            Decimal::ONE
        }
        "K" => {
            d[3] = 1;
            Decimal::ONE
        }
        "mol" => {
            d[4] = 1;
            Decimal::ONE
        }
        "A" => {
            d[5] = 1;
            Decimal::ONE
        }
        "cd" => {
            d[6] = 1;
            Decimal::ONE
        }
        "l" | "L" => {
            d[0] = 3;
            dec("0.001")
        }
        "eq" => {
            d[4] = 1;
            Decimal::ONE
        }
        "Pa" => {
            d[0] = -1;
            d[1] = 1;
            d[2] = -2;
            dec("1000")
        }
        "bar" => {
            d[0] = -1;
            d[1] = 1;
            d[2] = -2;
            dec("100000000")
        }
        "Hz" => {
            d[2] = -1;
            Decimal::ONE
        }
        "N" => {
            d[0] = 1;
            d[1] = 1;
            d[2] = -2;
            dec("1000")
        }
        "J" => {
            d[0] = 2;
            d[1] = 1;
            d[2] = -2;
            dec("1000")
        }
        "cal" => {
            d[0] = 2;
            d[1] = 1;
            d[2] = -2;
            dec("4184")
        }
        "U" | "[iU]" | "[IU]" => Decimal::ONE,
        _ => return None,
    };
    Some((factor, d))
}

fn prefix(p: &str) -> Option<Decimal> {
    Some(match p {
        "da" => dec("10"),
        "h" => dec("100"),
        "k" => dec("1000"),
        "M" => dec("1000000"),
        "G" => dec("1000000000"),
        "T" => dec("1000000000000"),
        "d" => dec("0.1"),
        "c" => dec("0.01"),
        "m" => dec("0.001"),
        "u" => dec("0.000001"),
        "n" => dec("0.000000001"),
        "p" => dec("0.000000000001"),
        "f" => dec("0.000000000000001"),
        _ => return None,
    })
}

fn atom(code: &str) -> Option<(Decimal, Dims)> {
    if let Some(a) = plain_atom(code).or_else(|| metric_atom(code)) {
        return Some(a);
    }
    for split in [1, 2] {
        if let (Some(p), Some(rest)) = (code.get(..split), code.get(split..))
            && let (Some(f), Some((g, d))) = (prefix(p), metric_atom(rest))
        {
            return Some((f.checked_mul(g)?, d));
        }
    }
    None
}

/// Reads a UCUM unit expression (`mg`, `g/m`, `m2`, `kg/m2`, `10*3/uL`, `/min`) into base units.
pub fn parse_unit(unit: &str) -> Option<(Decimal, Dims)> {
    let mut p = UnitParser { s: unit.as_bytes(), i: 0, depth: 0 };
    let r = p.term()?;
    (p.i == p.s.len()).then_some(r)
}

struct UnitParser<'s> {
    s: &'s [u8],
    i: usize,
    depth: u8,
}

impl UnitParser<'_> {
    fn term(&mut self) -> Option<(Decimal, Dims)> {
        self.depth += 1;
        if self.depth > 16 {
            return None;
        }
        let (mut factor, mut dims) = if self.s.get(self.i) == Some(&b'/') { (Decimal::ONE, DIMLESS) } else { self.component()? };
        while let Some(&op) = self.s.get(self.i) {
            if op != b'.' && op != b'/' {
                break;
            }
            self.i += 1;
            let (f, d) = self.component()?;
            if op == b'.' {
                factor = factor.checked_mul(f)?;
                for k in 0..dims.len() {
                    dims[k] = dims[k].checked_add(d[k])?;
                }
            } else {
                factor = factor.checked_div(f)?;
                for k in 0..dims.len() {
                    dims[k] = dims[k].checked_sub(d[k])?;
                }
            }
        }
        self.depth -= 1;
        Some((factor, dims))
    }

    fn component(&mut self) -> Option<(Decimal, Dims)> {
        if self.s.get(self.i) == Some(&b'(') {
            self.i += 1;
            let r = self.term()?;
            if self.s.get(self.i) != Some(&b')') {
                return None;
            }
            self.i += 1;
            return Some(r);
        }
        let start = self.i;
        // Annotations like `{score}` are dimensionless on their own and ignored after an atom.
        let mut bracket = 0;
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'[' => bracket += 1,
                b']' => bracket -= 1,
                b'.' | b'/' | b'(' | b')' | b'{' if bracket == 0 => break,
                _ => {}
            }
            self.i += 1;
        }
        let text_end = self.i;
        if self.s.get(self.i) == Some(&b'{') {
            while self.s.get(self.i).is_some_and(|&c| c != b'}') {
                self.i += 1;
            }
            if self.s.get(self.i) != Some(&b'}') {
                return None;
            }
            self.i += 1;
            if start == text_end {
                return Some((Decimal::ONE, DIMLESS));
            }
        }
        let text = std::str::from_utf8(&self.s[start..text_end]).ok()?;
        // `10*3` and `10^3` are numeric factors.
        if let Some((base, exp)) = text.split_once(['*', '^']) {
            let base: Decimal = base.parse().ok()?;
            let exp: i32 = exp.parse().ok()?;
            return Some((pow(base, exp)?, DIMLESS));
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Some((text.parse().ok()?, DIMLESS));
        }
        // A trailing signed integer is an exponent (`m2`, `s-1`).
        let bytes = text.as_bytes();
        let mut cut = bytes.len();
        while cut > 0 && bytes[cut - 1].is_ascii_digit() {
            cut -= 1;
        }
        if cut > 0 && cut < bytes.len() && bytes[cut - 1] == b'-' {
            cut -= 1;
        }
        let (name, exponent) = if cut > 0 && cut < bytes.len() && !text.ends_with(']') {
            (&text[..cut], text[cut..].parse::<i32>().ok()?)
        } else {
            (text, 1)
        };
        let (f, d) = atom(name)?;
        let mut dims = DIMLESS;
        for k in 0..dims.len() {
            dims[k] = i8::try_from(i32::from(d[k]).checked_mul(exponent)?).ok()?;
        }
        Some((pow(f, exponent)?, dims))
    }
}

fn pow(base: Decimal, exp: i32) -> Option<Decimal> {
    if exp.unsigned_abs() > 30 {
        return None;
    }
    let mut r = Decimal::ONE;
    for _ in 0..exp.unsigned_abs() {
        r = r.checked_mul(base)?;
    }
    if exp < 0 { Decimal::ONE.checked_div(r) } else { Some(r) }
}
