//! Tokenizer for FHIRPath expression text: literals, identifiers, operators, comments, with byte positions.

use super::SyntaxError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// A plain identifier (keywords such as `and`, `is`, `true` are identifiers here; the parser decides).
    Ident(String),
    /// A `` `delimited` `` identifier, never a keyword.
    Quoted(String),
    Str(String),
    /// Number text as written (`12`, `1.50`).
    Number(String),
    /// `@…` date/time literal text without the `@`.
    DateTime(String),
    /// `$this`, `$index`, `$total`.
    Special(String),
    /// `%name`, `` %`name` `` or `%'name'`.
    External(String),
    Op(&'static str),
    Eof,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    pub pos: usize,
}

const OPS: &[&str] = &[
    "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "+", "-", "*", "/", "&", "|", "=", "~", "<", ">",
];

pub fn tokenize(src: &str) -> Result<Vec<Token>, SyntaxError> {
    let b = src.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = i;
            i += 2;
            loop {
                if i + 1 >= b.len() {
                    return Err(SyntaxError::new("unterminated comment", start));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                i += 1;
            }
            continue;
        }
        let pos = i;
        let tok = if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            Tok::Ident(src[start..i].to_string())
        } else if c == b'`' {
            let (s, next) = quoted(src, i, b'`')?;
            i = next;
            Tok::Quoted(s)
        } else if c == b'\'' {
            let (s, next) = quoted(src, i, b'\'')?;
            i = next;
            Tok::Str(s)
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            Tok::Number(src[start..i].to_string())
        } else if c == b'@' {
            i += 1;
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'-' | b':' | b'+')) {
                i += 1;
            }
            // A fraction of seconds: only a dot followed by a digit belongs to the literal.
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'-' | b':' | b'+')) {
                    i += 1;
                }
            }
            if start == i {
                return Err(SyntaxError::new("'@' must start a date or time literal", pos));
            }
            Tok::DateTime(src[start..i].to_string())
        } else if c == b'$' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_alphanumeric() {
                i += 1;
            }
            Tok::Special(src[start..i].to_string())
        } else if c == b'%' {
            i += 1;
            match b.get(i) {
                Some(b'`') => {
                    let (s, next) = quoted(src, i, b'`')?;
                    i = next;
                    Tok::External(s)
                }
                Some(b'\'') => {
                    let (s, next) = quoted(src, i, b'\'')?;
                    i = next;
                    Tok::External(s)
                }
                _ => {
                    let start = i;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
                        i += 1;
                    }
                    if start == i {
                        return Err(SyntaxError::new("'%' must be followed by a name", pos));
                    }
                    Tok::External(src[start..i].to_string())
                }
            }
        } else {
            match OPS.iter().find(|op| src[i..].starts_with(**op)) {
                Some(op) => {
                    i += op.len();
                    Tok::Op(op)
                }
                None => {
                    let ch = src[i..].chars().next().unwrap_or('?');
                    return Err(SyntaxError::new(format!("unexpected character '{ch}'"), pos));
                }
            }
        };
        out.push(Token { tok, pos });
    }
    out.push(Token { tok: Tok::Eof, pos: src.len() });
    Ok(out)
}

/// Reads a quoted string or identifier starting at `start` (the opening quote), resolving escapes.
fn quoted(src: &str, start: usize, quote: u8) -> Result<(String, usize), SyntaxError> {
    let b = src.as_bytes();
    let mut out = String::new();
    let mut i = start + 1;
    loop {
        let Some(&c) = b.get(i) else {
            return Err(SyntaxError::new("unterminated string or quoted identifier", start));
        };
        if c == quote {
            return Ok((out, i + 1));
        }
        if c == b'\\' {
            let Some(&e) = b.get(i + 1) else {
                return Err(SyntaxError::new("unterminated escape", i));
            };
            i += 2;
            match e {
                b'\'' | b'"' | b'`' | b'\\' | b'/' => out.push(e as char),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let hex = src.get(i..i + 4).ok_or_else(|| SyntaxError::new("bad \\u escape", i - 2))?;
                    let code = u32::from_str_radix(hex, 16).map_err(|_| SyntaxError::new("bad \\u escape", i - 2))?;
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    i += 4;
                }
                _ => return Err(SyntaxError::new(format!("unknown escape '\\{}'", e as char), i - 2)),
            }
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch = src[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
}
