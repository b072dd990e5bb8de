//! The JSON tree every FHIR resource is read into: ordered objects, numbers kept as written, duplicate keys and bad bytes reported with a position.
//!
//! `serde_json::Value` is not used for wire input because it silently keeps the last of two
//! duplicate keys, rounds decimals (`1.50` becomes `1.5`, which FHIR forbids), and sorts keys.
//! This parser keeps the number text, keeps member order, and fails on duplicates, invalid UTF-8
//! and excessive nesting with a message that says where.

use std::fmt;

/// How deep arrays and objects may nest before the document is refused.
///
/// Real FHIR resources stay far below this (a deeply nested Questionnaire reaches about 40);
/// the limit keeps a hostile 10,000-deep document from exhausting the stack.
pub const MAX_DEPTH: usize = 256;

/// The text of a JSON string, number or member name: stored inline up to 24 bytes, so most
/// FHIR names, codes, ids and dates cost no allocation to read or to drop.
pub type Text = compact_str::CompactString;

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number exactly as written (a valid JSON number literal).
    Number(Text),
    String(Text),
    Array(Vec<Json>),
    Object(Object),
}

/// A JSON object with members in document order and no duplicate names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object {
    members: Vec<(Text, Json)>,
}

impl Object {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&Json> {
        self.members.iter().find(|(k, _)| &**k == name).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Json> {
        self.members.iter_mut().find(|(k, _)| &**k == name).map(|(_, v)| v)
    }

    /// Sets `name` to `value`, replacing an existing member in place.
    pub fn insert(&mut self, name: impl Into<Text>, value: Json) {
        let name = name.into();
        match self.members.iter_mut().find(|(k, _)| *k == name) {
            Some((_, slot)) => *slot = value,
            None => self.members.push((name, value)),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Json> {
        let index = self.members.iter().position(|(k, _)| &**k == name)?;
        Some(self.members.remove(index).1)
    }

    /// Where the member `name` is, counting from 0.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|(k, _)| &**k == name)
    }

    /// Sets `name` to `value`: in place when it exists, else inserted at `index` (the end at most).
    pub fn insert_at(&mut self, index: usize, name: impl Into<Text>, value: Json) {
        let name = name.into();
        match self.members.iter_mut().find(|(k, _)| *k == name) {
            Some((_, slot)) => *slot = value,
            None => self.members.insert(index.min(self.members.len()), (name, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json)> {
        self.members.iter().map(|(k, v)| (&**k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Json)> {
        self.members.iter_mut().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

}

impl FromIterator<(String, Json)> for Object {
    fn from_iter<I: IntoIterator<Item = (String, Json)>>(iter: I) -> Self {
        let mut object = Object::new();
        for (k, v) in iter {
            object.insert(k, v);
        }
        object
    }
}

impl Json {
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_object_mut(&mut self) -> Option<&mut Object> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Member `name` of an object; `None` for other values.
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.as_object()?.get(name)
    }

    /// The JSON type name used in messages ("object", "array", "string", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Number(_) => "number",
            Json::String(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }

    pub fn string(s: impl Into<Text>) -> Json {
        Json::String(s.into())
    }

    /// Serializes compactly, in member order.
    pub fn to_string_compact(&self) -> String {
        let mut out = String::new();
        write_json(self, &mut out, None, 0);
        out
    }

    /// Serializes with two-space indentation, in member order.
    pub fn to_string_pretty(&self) -> String {
        let mut out = String::new();
        write_json(self, &mut out, Some(2), 0);
        out
    }
}

/// Whether two values are the same JSON value: object member order does not matter, array order
/// does, and numbers compare by value (`1.0` and `1` are the same number, as FHIR `fixed[x]` needs).
pub fn same_value(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w))),
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_value(v, w)),
        (Json::Number(x), Json::Number(y)) => x == y || x.parse::<f64>().ok().zip(y.parse::<f64>().ok()).is_some_and(|(v, w)| v == w),
        _ => a == b,
    }
}

static NULL: Json = Json::Null;

/// `json["member"]` reads a member, giving `Null` when absent, as `serde_json` does.
impl std::ops::Index<&str> for Json {
    type Output = Json;

    fn index(&self, name: &str) -> &Json {
        self.get(name).unwrap_or(&NULL)
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_compact())
    }
}

impl From<&serde_json::Value> for Json {
    fn from(value: &serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(*b),
            serde_json::Value::Number(n) => Json::Number(n.to_string().into()),
            serde_json::Value::String(s) => Json::String(s.as_str().into()),
            serde_json::Value::Array(a) => Json::Array(a.iter().map(Json::from).collect()),
            serde_json::Value::Object(o) => Json::Object(Object {
                members: o.iter().map(|(k, v)| (k.as_str().into(), Json::from(v))).collect(),
            }),
        }
    }
}

impl From<&Json> for serde_json::Value {
    fn from(value: &Json) -> Self {
        match value {
            Json::Null => serde_json::Value::Null,
            Json::Bool(b) => serde_json::Value::Bool(*b),
            Json::Number(n) => serde_json::from_str(n).unwrap_or(serde_json::Value::Null),
            Json::String(s) => serde_json::Value::String(s.to_string()),
            Json::Array(a) => serde_json::Value::Array(a.iter().map(Into::into).collect()),
            Json::Object(o) => serde_json::Value::Object(o.iter().map(|(k, v)| (k.to_string(), v.into())).collect()),
        }
    }
}

fn write_json(value: &Json, out: &mut String, indent: Option<usize>, level: usize) {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(n),
        Json::String(s) => write_string(s, out),
        Json::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_json(item, out, indent, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(object) => {
            if object.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in object.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_string(k, out);
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_json(v, out, indent, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    escape_into(s, out);
    out.push('"');
}

/// Appends `s` with JSON string escapes applied, without the surrounding quotes.
pub(crate) fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Why a document is not JSON, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line}, column {column}")]
pub struct ParseError {
    pub message: String,
    pub line: usize,
    pub column: usize,
    /// The FHIRPath-like location of the value being read when the error happened, e.g. `entry[2].resource`.
    pub path: String,
}

/// Parses a complete JSON document. A UTF-8 byte-order mark is accepted and skipped.
pub fn parse(bytes: &[u8]) -> Result<Json, ParseError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // One check of the whole document is much cheaper than one per string; a document that fails
    // it is read again checking each string, so that the error names the member it is in.
    let text = std::str::from_utf8(bytes).ok();
    // Sized for a typical resource, so that a small document's parse does not grow them step by step.
    let mut parser = Parser {
        bytes,
        text,
        pos: 0,
        path: Vec::with_capacity(16),
        root_type: None,
        members: Vec::with_capacity(64),
        items: Vec::with_capacity(64),
        unescaped: String::new(),
    };
    parser.skip_whitespace();
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos < bytes.len() {
        return Err(parser.error("unexpected content after the end of the JSON document"));
    }
    Ok(value)
}

enum PathStep {
    /// A member, by the byte range of its name in the input: the name is only spelled out for an error.
    Member(std::ops::Range<usize>),
    Index(usize),
}

struct Parser<'a> {
    bytes: &'a [u8],
    /// The same bytes, when they are valid UTF-8 as a whole.
    text: Option<&'a str>,
    pos: usize,
    path: Vec<PathStep>,
    /// The top-level `resourceType`, once read, so error paths read `Patient.name[0]` like validation issues.
    root_type: Option<Text>,
    /// The members of the objects and the items of the arrays being read, innermost last: each
    /// object or array is then allocated once, at its final size.
    members: Vec<(Text, Json)>,
    items: Vec<Json>,
    /// Where a string with escapes is decoded, so that its final storage is allocated once.
    unescaped: String,
}

impl<'a> Parser<'a> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        let upto = &self.bytes[..self.pos.min(self.bytes.len())];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = upto.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&upto[line_start..]).chars().count() + 1;
        let mut path = self.root_type.as_deref().unwrap_or_default().to_string();
        for step in &self.path {
            match step {
                PathStep::Member(range) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&String::from_utf8_lossy(&self.bytes[range.clone()]));
                }
                PathStep::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        ParseError { message: message.into(), line, column, path }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.pos) {
            self.pos += 1;
            // Indentation of pretty-printed documents, eight spaces at a time.
            while self.bytes.get(self.pos..self.pos + 8) == Some(b"        ") {
                self.pos += 8;
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, ParseError> {
        match self.bytes.get(self.pos) {
            None => Err(self.error("unexpected end of the document")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(&b) => Err(self.error(format!("unexpected character '{}'", char::from(b).escape_default()))),
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, ParseError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("invalid literal (expected true, false or null)"))
        }
    }

    fn check_depth(&self, depth: usize) -> Result<(), ParseError> {
        if depth > MAX_DEPTH {
            Err(self.error(format!("the document nests deeper than {MAX_DEPTH} levels")))
        } else {
            Ok(())
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, ParseError> {
        self.check_depth(depth)?;
        self.pos += 1;
        self.skip_whitespace();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Json::Object(Object::new()));
        }
        let first = self.members.len();
        // A bit per (length, last byte) class of the names read so far: only a name whose class
        // was seen before is compared with the others, so most objects never compare names.
        let mut classes = 0u64;
        loop {
            self.skip_whitespace();
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.error("expected a property name in double quotes"));
            }
            let name_start = self.pos + 1;
            let name = self.string()?;
            let name_range = name_start..self.pos - 1;
            let class = 1u64 << ((name.len() * 7 + usize::from(name.as_bytes().last().copied().unwrap_or(0))) % 64);
            if classes & class != 0 && self.members[first..].iter().any(|(k, _)| *k == name) {
                return Err(self.error(format!("duplicate property '{name}'")));
            }
            classes |= class;
            self.skip_whitespace();
            if self.bytes.get(self.pos) != Some(&b':') {
                return Err(self.error("expected ':' after a property name"));
            }
            self.pos += 1;
            self.skip_whitespace();
            self.path.push(PathStep::Member(name_range));
            let value = self.value(depth)?;
            self.path.pop();
            if depth == 1 && &*name == "resourceType"
                && let Json::String(t) = &value
            {
                self.root_type = Some(t.clone());
            }
            self.members.push((name, value));
            self.skip_whitespace();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    let members: Vec<(Text, Json)> = self.members.drain(first..).collect();
                    return Ok(Json::Object(Object { members }));
                }
                _ => return Err(self.error("expected ',' or '}' in an object")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, ParseError> {
        self.check_depth(depth)?;
        self.pos += 1;
        self.skip_whitespace();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Json::Array(Vec::new()));
        }
        let first = self.items.len();
        loop {
            self.skip_whitespace();
            self.path.push(PathStep::Index(self.items.len() - first));
            let value = self.value(depth)?;
            self.path.pop();
            self.items.push(value);
            self.skip_whitespace();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Json::Array(self.items.drain(first..).collect()));
                }
                _ => return Err(self.error("expected ',' or ']' in an array")),
            }
        }
    }

    fn number(&mut self) -> Result<Json, ParseError> {
        let start = self.pos;
        let digits = |p: &mut Self| {
            let from = p.pos;
            while let Some(b'0'..=b'9') = p.bytes.get(p.pos) {
                p.pos += 1;
            }
            p.pos - from
        };
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let n_int = digits(self);
        if n_int == 0 {
            return Err(self.error("invalid number"));
        }
        if n_int > 1 && self.bytes[int_start] == b'0' {
            self.pos = int_start;
            return Err(self.error("invalid number: leading zeros are not allowed"));
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(self.error("invalid number: digits expected after '.'"));
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(self.error("invalid number: digits expected in the exponent"));
            }
        }
        // The slice holds only ASCII digits, signs, '.', 'e' and 'E'.
        let text = self.utf8(start..self.pos).unwrap_or("0");
        Ok(Json::Number(text.into()))
    }

    /// The bytes of `range` as text. Ranges start and end next to ASCII bytes (quotes, backslashes,
    /// digits), so they are character boundaries.
    fn utf8(&self, range: std::ops::Range<usize>) -> Result<&'a str, std::str::Utf8Error> {
        match self.text.and_then(|text| text.get(range.clone())) {
            Some(text) => Ok(text),
            None => std::str::from_utf8(&self.bytes[range]),
        }
    }

    /// Moves to the next byte of a string that needs attention (`"`, `\\` or a control
    /// character), eight bytes at a time: long narratives are most of the bytes of many resources.
    fn skip_plain(&mut self) {
        const ONES: u64 = u64::from_le_bytes([1; 8]);
        const HIGH_BITS: u64 = u64::from_le_bytes([0x80; 8]);
        // The high bit of each byte of `x` that is below `n` (for bytes below 0x80); only the lowest
        // flagged byte is exact, which is the one wanted.
        let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH_BITS;
        let mut pos = self.pos;
        while let Some(chunk) = self.bytes.get(pos..pos + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            let special = below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1) | below(word, 0x20);
            if special != 0 {
                self.pos = pos + (special.trailing_zeros() / 8) as usize;
                return;
            }
            pos += 8;
        }
        while let Some(&b) = self.bytes.get(pos) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            pos += 1;
        }
        self.pos = pos;
    }

    fn string(&mut self) -> Result<Text, ParseError> {
        self.pos += 1;
        // Most strings have no escapes: read them straight into their final storage.
        let start = self.pos;
        self.skip_plain();
        if self.bytes.get(self.pos) == Some(&b'"') {
            return match self.utf8(start..self.pos) {
                Ok(s) => {
                    self.pos += 1;
                    Ok(s.into())
                }
                Err(e) => {
                    self.pos = start + e.valid_up_to();
                    Err(self.error("invalid UTF-8 in a string"))
                }
            };
        }
        let mut out = std::mem::take(&mut self.unescaped);
        out.clear();
        let decoded = self.unescape(start, &mut out).map(|()| Text::from(out.as_str()));
        self.unescaped = out;
        decoded
    }

    /// Decodes the rest of a string that has escapes into `out`; `start` is where its content starts.
    fn unescape(&mut self, start: usize, out: &mut String) -> Result<(), ParseError> {
        let mut run_start = start;
        loop {
            if run_start < self.pos {
                match self.utf8(run_start..self.pos) {
                    Ok(s) => out.push_str(s),
                    Err(e) => {
                        self.pos = run_start + e.valid_up_to();
                        return Err(self.error("invalid UTF-8 in a string"));
                    }
                }
            }
            match self.bytes.get(self.pos) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escaped = match self.bytes.get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let c = self.unicode_escape()?;
                            out.push(c);
                            run_start = self.pos;
                            self.skip_plain();
                            continue;
                        }
                        _ => return Err(self.error("invalid escape sequence in a string")),
                    };
                    self.pos += 1;
                    out.push(escaped);
                }
                Some(_) => return Err(self.error("control character inside a string (must be escaped)")),
            }
            run_start = self.pos;
            self.skip_plain();
        }
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let hex = self.bytes.get(self.pos..self.pos + 4).ok_or_else(|| self.error("truncated \\u escape"))?;
        let text = std::str::from_utf8(hex).map_err(|_| self.error("invalid \\u escape"))?;
        let code = u32::from_str_radix(text, 16).map_err(|_| self.error("invalid \\u escape"))?;
        self.pos += 4;
        Ok(code)
    }

    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return Err(self.error("unpaired surrogate in a \\u escape"));
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return Err(self.error("unpaired surrogate in a \\u escape"));
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| self.error("unpaired surrogate in a \\u escape"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str) -> String {
        parse(input.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn finds_quotes_escapes_and_control_characters_at_every_position_of_a_word() {
        // The string reader skips eight bytes at a time; put each special byte at each offset.
        for len in 0..20 {
            for (special, expect_ok) in [("\\\"", true), ("\\n", true), ("é", true), ("\u{1}", false), ("\u{7f}", true)] {
                let text = format!("{}{special}{}", "a".repeat(len), "b".repeat(len % 9));
                let document = format!("[\"{text}\"]");
                let ours = parse(document.as_bytes());
                let theirs: Result<serde_json::Value, _> = serde_json::from_str(&document);
                assert_eq!(ours.is_ok(), expect_ok, "{document:?}");
                assert_eq!(theirs.is_ok(), expect_ok, "{document:?}");
                if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                    assert_eq!(ours.as_array().unwrap()[0].as_str(), theirs[0].as_str(), "{document:?}");
                }
            }
        }
    }

    #[test]
    fn keeps_number_text_and_member_order() {
        let value = parse(br#"{"b": 1.50, "a": [true, null, "x\u00e9"]}"#).unwrap();
        assert_eq!(value.to_string_compact(), r#"{"b":1.50,"a":[true,null,"xé"]}"#);
    }

    #[test]
    fn reports_duplicate_keys_with_their_path() {
        let e = parse(br#"{"name": [{"given": "a", "given": "b"}]}"#).unwrap_err();
        assert!(e.message.contains("duplicate property 'given'"), "{e}");
        assert_eq!(e.path, "name[0]");
        let e = parse(br#"{"resourceType": "Patient", "active": true, "active": false}"#).unwrap_err();
        assert_eq!(e.path, "Patient");
        // Many names, so that every class of names is taken: a repeat is still found, and
        // distinct names that share a class are not taken for one.
        let names: Vec<String> = (0..200).map(|i| format!("\"k{i}\": {i}")).collect();
        let distinct = format!("{{{}}}", names.join(", "));
        assert!(parse(distinct.as_bytes()).is_ok());
        let repeated = format!("{{{}, \"k137\": 0}}", names.join(", "));
        assert!(parse(repeated.as_bytes()).unwrap_err().message.contains("duplicate property 'k137'"));
    }

    #[test]
    fn refuses_bad_input_without_panicking() {
        assert!(err("{").contains("expected a property name") || err("{").contains("end"));
        assert!(err("[1,]").contains("unexpected character"));
        assert!(err("01").contains("leading zeros"));
        assert!(err("\"a\tb\"").contains("control character"));
        assert!(parse(b"\"\xff\"").unwrap_err().message.contains("UTF-8"));
        assert!(err("{} x").contains("after the end"));
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(err(&deep).contains("nests deeper"));
    }

    #[test]
    fn same_value_ignores_member_order_only() {
        let a = parse(br#"{"coding":[{"system":"s","code":"c"}],"n":1.0}"#).unwrap();
        let b = parse(br#"{"n":1,"coding":[{"code":"c","system":"s"}]}"#).unwrap();
        assert!(same_value(&a, &b));
        let c = parse(br#"{"coding":[{"code":"c"}],"n":1}"#).unwrap();
        assert!(!same_value(&a, &c));
        assert!(!same_value(&parse(b"[1,2]").unwrap(), &parse(b"[2,1]").unwrap()));
    }

    #[test]
    fn accepts_huge_numbers_as_text() {
        let value = parse(b"123456789012345678901234567890e999").unwrap();
        assert_eq!(value, Json::Number("123456789012345678901234567890e999".into()));
    }

    #[test]
    fn decodes_surrogate_pairs() {
        assert_eq!(parse(br#""\ud83d\ude00""#).unwrap(), Json::string("😀"));
        assert!(err(r#""\ud83d""#).contains("surrogate"));
    }
}
