//! Lexical rules of the FHIR R4 primitive types ([spec](https://hl7.org/fhir/R4/datatypes.html#primitive)), checked by hand-written matchers instead of regexes for speed.

use crate::json::Json;

/// Checks a primitive's JSON value against its FHIR type; returns the problem in words.
pub fn check(type_code: &str, value: &Json) -> Result<(), String> {
    match type_code {
        "boolean" => match value {
            Json::Bool(_) => Ok(()),
            other => Err(format!("expected a JSON boolean, found {}", describe(other))),
        },
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => {
            let Json::Number(text) = value else { return Err(format!("expected a JSON number, found {}", describe(value))) };
            if text.contains(['.', 'e', 'E']) {
                return Err(format!("'{text}' is not an integer"));
            }
            let n: i64 = text.parse().map_err(|_| format!("'{text}' is out of range for {type_code}"))?;
            let (low, high) = match type_code {
                "positiveInt" => (1, i32::MAX as i64),
                "unsignedInt" => (0, i32::MAX as i64),
                "integer64" => (i64::MIN, i64::MAX),
                _ => (i32::MIN as i64, i32::MAX as i64),
            };
            if n < low || n > high {
                return Err(format!("{n} is out of range for {type_code} ({low}..{high})"));
            }
            Ok(())
        }
        "decimal" => match value {
            Json::Number(text) => {
                // JSON numbers are valid decimals lexically; refuse exponents beyond what any system can hold.
                let exponent = text.split(['e', 'E']).nth(1).and_then(|e| e.parse::<i64>().ok()).unwrap_or(0);
                if exponent.abs() > 1000 || text.len() > 1000 {
                    Err(format!("'{}' is too large a decimal", truncate(text)))
                } else {
                    Ok(())
                }
            }
            other => Err(format!("expected a JSON number, found {}", describe(other))),
        },
        _ => {
            let Json::String(text) = value else { return Err(format!("expected a JSON string, found {}", describe(value))) };
            check_text(type_code, text)
        }
    }
}

/// Checks the string form of a primitive (also used for XML attribute values).
pub fn check_text(type_code: &str, text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("value is empty (leave the element out instead)".to_string());
    }
    let ok = match type_code {
        "string" | "markdown" => {
            if text.len() > 1024 * 1024 {
                return Err("string is longer than 1 MB".to_string());
            }
            if text.trim().is_empty() {
                return Err("value is only whitespace".to_string());
            }
            true
        }
        "code" => is_code(text),
        "id" => text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
        "uri" | "url" | "canonical" => has_no_whitespace(text),
        "oid" => is_oid(text),
        "uuid" => is_uuid(text),
        "base64Binary" => is_base64(text),
        "date" => is_date(text),
        "dateTime" => is_date_time(text, false),
        "instant" => is_date_time(text, true) && text.contains('T'),
        "time" => is_time(text),
        "xhtml" => return super::xhtml::check(text),
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("'{}' is not a valid {type_code}", truncate(text))) }
}

fn truncate(text: &str) -> String {
    if text.chars().count() > 60 { format!("{}…", text.chars().take(60).collect::<String>()) } else { text.to_string() }
}

fn describe(value: &Json) -> String {
    match value {
        Json::Null => "null".to_string(),
        Json::String(s) => format!("the string \"{}\"", truncate(s)),
        other => format!("a JSON {}", other.kind()),
    }
}

fn is_code(text: &str) -> bool {
    // `[^\s]+(\s[^\s]+)*`: no leading, trailing or doubled whitespace.
    !text.starts_with(char::is_whitespace)
        && !text.ends_with(char::is_whitespace)
        && !text.as_bytes().windows(2).any(|w| (w[0] as char).is_whitespace() && (w[1] as char).is_whitespace())
}

/// Most URIs are printable ASCII, which is checked a byte at a time; the rest by Unicode's rules.
fn has_no_whitespace(text: &str) -> bool {
    text.bytes().all(|b| b > b' ' && b < 0x7f) || !text.chars().any(char::is_whitespace)
}

fn is_oid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:oid:") else { return false };
    let mut parts = rest.split('.');
    let first_ok = matches!(parts.next(), Some("0" | "1" | "2"));
    let mut n_rest = 0;
    let rest_ok = parts.all(|p| {
        n_rest += 1;
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    });
    first_ok && rest_ok && n_rest > 0
}

fn is_uuid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:uuid:") else { return false };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_base64(text: &str) -> bool {
    let bytes = text.as_bytes();
    // Padding may only end the text, whitespace aside.
    let body_end = bytes.iter().rposition(|b| !matches!(b, b'=' | b' ' | b'\n' | b'\r' | b'\t')).map_or(0, |p| p + 1);
    let (body, tail) = bytes.split_at(body_end);
    // One table lookup and one OR per byte over the body, which is most of a large attachment;
    // whitespace inside it is rare, and only then are the alphabet characters counted.
    let classes = body.iter().fold(0, |seen, &b| seen | BASE64_CLASS[usize::from(b)]);
    if classes & INVALID != 0 {
        return false;
    }
    let n = if classes & SPACE == 0 { body.len() } else { body.iter().filter(|&&b| BASE64_CLASS[usize::from(b)] == ALPHABET).count() };
    let padding = tail.iter().filter(|&&b| b == b'=').count();
    (n + padding) % 4 == 0 && padding <= 2
}

const ALPHABET: u8 = 1;
const SPACE: u8 = 2;
const INVALID: u8 = 4;

/// Each byte's class in base64 text: alphabet, whitespace (ignored) or invalid.
static BASE64_CLASS: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = if c.is_ascii_alphanumeric() || c == b'+' || c == b'/' {
            ALPHABET
        } else if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
            SPACE
        } else {
            INVALID
        };
        b += 1;
    }
    table
};

/// The number of bytes base64 text decodes to (whitespace ignored), or `None` when it is not valid base64.
pub(super) fn base64_decoded_len(text: &str) -> Option<u64> {
    if !is_base64(text) {
        return None;
    }
    let significant = text.bytes().filter(|b| !b.is_ascii_whitespace()).count() as u64;
    let padding = text.bytes().rev().filter(|b| !b.is_ascii_whitespace()).take_while(|&b| b == b'=').count() as u64;
    Some(significant / 4 * 3 - padding)
}

/// The value of exactly `n` ASCII digits (`n` ≤ 9, so that it cannot overflow).
fn digits(text: &str, n: usize) -> Option<u32> {
    if text.len() != n {
        return None;
    }
    text.bytes().try_fold(0u32, |value, b| b.is_ascii_digit().then(|| value * 10 + u32::from(b - b'0')))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` with a real calendar day; year 0000 is not allowed.
fn is_date(text: &str) -> bool {
    let mut parts = text.split('-');
    let Some(year) = parts.next().and_then(|y| digits(y, 4)) else { return false };
    if year == 0 {
        return false;
    }
    let Some(month) = parts.next() else { return true };
    let Some(month) = digits(month, 2).filter(|m| (1..=12).contains(m)) else { return false };
    let Some(day) = parts.next() else { return true };
    let Some(day) = digits(day, 2) else { return false };
    parts.next().is_none() && day >= 1 && day <= days_in_month(year, month)
}

fn is_time(text: &str) -> bool {
    let (main, fraction) = match text.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (text, None),
    };
    if fraction.is_some_and(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let mut parts = main.split(':');
    let (Some(h), Some(m), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return false };
    matches!((digits(h, 2), digits(m, 2), digits(s, 2)), (Some(h), Some(m), Some(s)) if h <= 23 && m <= 59 && s <= 60)
}

fn is_timezone(text: &str) -> bool {
    if text == "Z" {
        return true;
    }
    let Some(rest) = text.strip_prefix('+').or_else(|| text.strip_prefix('-')) else { return false };
    let Some((h, m)) = rest.split_once(':') else { return false };
    matches!((digits(h, 2), digits(m, 2)), (Some(h), Some(m)) if (h < 14 && m <= 59) || (h == 14 && m == 0))
}

/// A date, or a full date with a time and a timezone (`2020-01-01T10:00:00+01:00`).
fn is_date_time(text: &str, is_instant: bool) -> bool {
    let Some((date, time)) = text.split_once('T') else { return !is_instant && is_date(text) };
    if date.len() != 10 || !is_date(date) {
        return false;
    }
    let zone_at = time.find(['Z', '+', '-']);
    let Some(zone_at) = zone_at else { return false };
    is_time(&time[..zone_at]) && is_timezone(&time[zone_at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &str, v: &str) -> bool {
        check_text(t, v).is_ok()
    }

    #[test]
    fn dates_follow_the_calendar() {
        assert!(ok("date", "2024") && ok("date", "2024-02") && ok("date", "2024-02-29"));
        assert!(!ok("date", "2023-02-29") && !ok("date", "1974-13-45") && !ok("date", "2024-1-01") && !ok("date", "0000"));
        assert!(!ok("date", "2020-01-01T10:00:00Z"));
    }

    #[test]
    fn date_times_need_a_timezone_with_a_time() {
        assert!(ok("dateTime", "2015-02-07T13:28:17-05:00") && ok("dateTime", "2015-02") && ok("dateTime", "2015-02-07T13:28:17.239Z"));
        assert!(!ok("dateTime", "2015-02-07T13:28:17") && !ok("dateTime", "2015-02-07T25:00:00Z"));
        assert!(ok("instant", "2015-02-07T13:28:17.239+02:00") && !ok("instant", "2015-02-07"));
    }

    #[test]
    fn other_string_types() {
        assert!(ok("id", "a-b.C9") && !ok("id", "bad id!") && !ok("id", &"a".repeat(65)));
        assert!(ok("code", "a b") && !ok("code", " a") && !ok("code", "a  b"));
        assert!(ok("oid", "urn:oid:1.2.3") && !ok("oid", "urn:oid:3.1") && !ok("oid", "1.2.3"));
        assert!(ok("uuid", "urn:uuid:a76d9bbf-f293-4fb7-ad4c-2851cac77162") && !ok("uuid", "urn:uuid:xyz"));
        assert!(ok("base64Binary", "aGVsbG8=") && !ok("base64Binary", "aGVsbG8") && !ok("base64Binary", "a$=="));
        assert!(!ok("base64Binary", "aG=sbG8=") && !ok("base64Binary", "aGVs====") && ok("base64Binary", "aGVs bG8h\n") && !ok("base64Binary", "aGVsbG8h==="));
        assert_eq!((base64_decoded_len("aGVsbG8="), base64_decoded_len("aGVs\nbG8h"), base64_decoded_len("aA==")), (Some(5), Some(6), Some(1)));
        assert!(ok("time", "10:00:00") && ok("time", "10:00:00.5") && !ok("time", "10:00"));
        assert!(!ok("uri", "a b") && !ok("string", "") && !ok("string", "   "));
        assert!(ok("uri", "http://example.org/ä") && !ok("uri", "http://example.org/\u{a0}x") && !ok("uri", "a\tb"));
        assert!(!ok("time", "10:00:00:00") && !ok("date", "2024-+1") && ok("date", "2024-09-30"));
    }

    #[test]
    fn numbers_and_booleans() {
        let n = |s: &str| Json::Number(s.into());
        assert!(check("integer", &n("2147483647")).is_ok() && check("integer", &n("2147483648")).is_err());
        assert!(check("integer", &n("1.0")).is_err() && check("positiveInt", &n("0")).is_err());
        assert!(check("unsignedInt", &n("0")).is_ok() && check("decimal", &n("1.50")).is_ok());
        assert!(check("decimal", &n("1e99999")).is_err() && check("decimal", &Json::string("1.5")).is_err());
        assert!(check("boolean", &Json::string("true")).is_err() && check("boolean", &Json::Bool(true)).is_ok());
        assert!(check("string", &Json::Number("1".into())).is_err());
    }
}
