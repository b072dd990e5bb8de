//! The path and condition syntax of mapping files: `contact[*].name.family`, `identifier[system=http://x].value`, `subject.resolve(Patient).birthDate`, `attendance in ['late', 'attended']`.

use std::fmt;

/// One step of a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A member name (`name`, `valueQuantity`).
    Field(String),
    /// A fixed array position (`[0]`).
    Index(usize),
    /// Every array element (`[*]`); on a target path, the element paired with the source's `[*]`.
    Each,
    /// The array element whose member `field` equals `value` (`[system=http://loinc.org]`); a
    /// target path creates it when absent.
    Filter { field: String, value: String },
    /// Follows a Reference to the resource it names inside the input Bundle (FHIR sources only).
    Resolve(String),
}

/// A parsed path; `computed` paths (written `@score.total`) read values the gateway derives from the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub computed: bool,
    pub steps: Vec<Step>,
}

impl Path {
    /// How many `[*]` steps the path has.
    pub fn n_each(&self) -> usize {
        self.steps.iter().filter(|s| **s == Step::Each).count()
    }

    /// The path up to and including its `n`-th `[*]` (1-based), for matching a resource's `each`.
    pub fn prefix_through_each(&self, n: usize) -> Option<&[Step]> {
        let mut seen = 0;
        for (i, step) in self.steps.iter().enumerate() {
            if *step == Step::Each {
                seen += 1;
                if seen == n {
                    return Some(&self.steps[..=i]);
                }
            }
        }
        None
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.computed {
            f.write_str("@")?;
        }
        let mut first = true;
        for step in &self.steps {
            match step {
                Step::Field(name) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(name)?;
                }
                Step::Index(i) => write!(f, "[{i}]")?,
                Step::Each => f.write_str("[*]")?,
                Step::Filter { field, value } => write!(f, "[{field}={value}]")?,
                Step::Resolve(t) => write!(f, ".resolve({t})")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// Parses a path; the error says what is wrong in words.
pub fn parse_path(text: &str) -> Result<Path, String> {
    let (computed, rest) = match text.strip_prefix('@') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if rest.is_empty() {
        return Err("the path is empty".into());
    }
    let mut steps = Vec::new();
    for segment in split_outside_brackets(rest)? {
        if let Some(inner) = segment.strip_prefix("resolve(").and_then(|s| s.strip_suffix(')')) {
            if !is_name(inner) {
                return Err(format!("resolve() needs a resource type, got '{inner}'"));
            }
            steps.push(Step::Resolve(inner.to_string()));
            continue;
        }
        let (name, brackets) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        if !is_name(name) {
            return Err(format!("'{name}' is not a member name"));
        }
        steps.push(Step::Field(name.to_string()));
        let mut rest = brackets;
        while !rest.is_empty() {
            let close = rest.find(']').ok_or_else(|| format!("unclosed '[' in '{segment}'"))?;
            let inner = &rest[1..close];
            steps.push(parse_bracket(inner)?);
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("unexpected '{rest}' after ']' in '{segment}'"));
            }
        }
    }
    Ok(Path { computed, steps })
}

fn parse_bracket(inner: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::Each);
    }
    if let Ok(index) = inner.parse::<usize>() {
        return Ok(Step::Index(index));
    }
    match inner.split_once('=') {
        Some((field, value)) if is_name(field.trim()) && !value.trim().is_empty() => {
            Ok(Step::Filter { field: field.trim().to_string(), value: value.trim().to_string() })
        }
        _ => Err(format!("'[{inner}]' is neither an index, '[*]' nor '[member=value]'")),
    }
}

/// Splits on `.` that are not inside `[...]` or `(...)` (filter values are often URLs).
fn split_outside_brackets(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            '.' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced brackets in '{text}'"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced brackets in '{text}'"));
    }
    parts.push(&text[start..]);
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("empty segment in '{text}'"));
    }
    Ok(parts)
}

fn is_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A literal in a condition.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Text(String),
    Number(f64),
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Text(s) => write!(f, "'{s}'"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// One test of a condition.
#[derive(Clone, Debug, PartialEq)]
pub enum Test {
    /// `path`: the value is present (and not `false`).
    Present(Path),
    /// `!path`: the value is absent or `false`.
    Absent(Path),
    /// `path == literal`, `path != literal`.
    Equals { path: Path, literal: Literal, negated: bool },
    /// `path in [literal, ...]`, `path not in [...]`.
    In { path: Path, literals: Vec<Literal>, negated: bool },
}

impl Test {
    pub fn path(&self) -> &Path {
        match self {
            Test::Present(p) | Test::Absent(p) => p,
            Test::Equals { path, .. } | Test::In { path, .. } => path,
        }
    }

    pub fn literals(&self) -> Vec<&Literal> {
        match self {
            Test::Equals { literal, .. } => vec![literal],
            Test::In { literals, .. } => literals.iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// A condition: tests joined by `and` (all must hold).
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub tests: Vec<Test>,
}

/// Parses `a and b == 'x' and c in ['y', 'z'] and !d`.
pub fn parse_condition(text: &str) -> Result<Condition, String> {
    let mut tests = Vec::new();
    for part in split_and(text) {
        tests.push(parse_test(part.trim())?);
    }
    if tests.is_empty() {
        return Err("the condition is empty".into());
    }
    Ok(Condition { tests })
}

fn split_and(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut in_quote = false;
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            in_quote = !in_quote;
        } else if !in_quote && text[i..].starts_with(" and ") {
            parts.push(&text[start..i]);
            i += 5;
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

fn parse_test(text: &str) -> Result<Test, String> {
    if text.is_empty() {
        return Err("an empty test in the condition".into());
    }
    if let Some((left, right)) = text.split_once(" not in ") {
        return Ok(Test::In { path: parse_path(left.trim())?, literals: parse_list(right.trim())?, negated: true });
    }
    if let Some((left, right)) = text.split_once(" in ") {
        return Ok(Test::In { path: parse_path(left.trim())?, literals: parse_list(right.trim())?, negated: false });
    }
    for (operator, negated) in [("!=", true), ("==", false)] {
        if let Some((left, right)) = text.split_once(operator) {
            return Ok(Test::Equals { path: parse_path(left.trim())?, literal: parse_literal(right.trim())?, negated });
        }
    }
    match text.strip_prefix('!') {
        Some(rest) => Ok(Test::Absent(parse_path(rest.trim())?)),
        None => Ok(Test::Present(parse_path(text)?)),
    }
}

fn parse_list(text: &str) -> Result<Vec<Literal>, String> {
    let inner = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).ok_or_else(|| format!("expected a list like ['a', 'b'], got '{text}'"))?;
    let mut literals = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    for c in inner.chars() {
        match c {
            '\'' => {
                in_quote = !in_quote;
                current.push(c);
            }
            ',' if !in_quote => {
                literals.push(parse_literal(current.trim())?);
                current.clear();
            }
            _ => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        literals.push(parse_literal(current.trim())?);
    }
    if literals.is_empty() {
        return Err("the list is empty".into());
    }
    Ok(literals)
}

fn parse_literal(text: &str) -> Result<Literal, String> {
    if let Some(inner) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Ok(Literal::Text(inner.to_string()));
    }
    match text {
        "true" => return Ok(Literal::Bool(true)),
        "false" => return Ok(Literal::Bool(false)),
        _ => {}
    }
    text.parse::<f64>().map(Literal::Number).map_err(|_| format!("'{text}' is not a literal (quote text: 'value')"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_with_indexes_filters_and_resolve() {
        let path = parse_path("identifier[system=http://hospital.example.org/mrn].value").unwrap();
        assert_eq!(
            path.steps,
            vec![
                Step::Field("identifier".into()),
                Step::Filter { field: "system".into(), value: "http://hospital.example.org/mrn".into() },
                Step::Field("value".into())
            ]
        );
        let path = parse_path("contact[*].telecom[0].value").unwrap();
        assert_eq!(path.n_each(), 1);
        assert_eq!(path.to_string(), "contact[*].telecom[0].value");
        let path = parse_path("focus.resolve(ServiceRequest).reasonCode[*].text").unwrap();
        assert_eq!(path.steps[1], Step::Resolve("ServiceRequest".into()));
        assert!(parse_path("@score.total").unwrap().computed);
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in ["", "a..b", "a[", "a[x]", "a]b", "1abc", "a[0]b", "resolve()"] {
            assert!(parse_path(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn parses_conditions() {
        let condition = parse_condition("attendance in ['attended', 'late'] and !telehealth and modality != 'group' and clinician.npi").unwrap();
        assert_eq!(condition.tests.len(), 4);
        assert!(matches!(&condition.tests[0], Test::In { literals, negated: false, .. } if literals.len() == 2));
        assert!(matches!(&condition.tests[1], Test::Absent(_)));
        assert!(matches!(&condition.tests[2], Test::Equals { negated: true, .. }));
        assert!(matches!(&condition.tests[3], Test::Present(_)));
        assert!(parse_condition("a == ").is_err());
        assert!(parse_condition("a in []").is_err());
    }
}
