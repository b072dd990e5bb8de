//! Looks up what a record path means in a record's JSON Schema (type, format, enum), so mapping rules are type-checked at load.

use serde_json::Value;

use super::path::{Path, Step};

/// What the schema says about the value at a path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchemaType {
    /// `string`, `integer`, `number`, `boolean`, `object` or `array`.
    pub kind: String,
    pub format: Option<String>,
    /// The allowed values, for enumerations (as text).
    pub allowed: Option<Vec<String>>,
    /// The allowed values a rule can actually see, when its condition narrows them.
    pub reachable: Option<Vec<String>>,
    pub minimum: Option<f64>,
}

impl SchemaType {
    pub fn is_scalar(&self) -> bool {
        matches!(self.kind.as_str(), "string" | "integer" | "number" | "boolean")
    }

    pub fn describe(&self) -> String {
        match &self.format {
            Some(format) => format!("{} ({format})", self.kind),
            None => self.kind.clone(),
        }
    }
}

/// Follows `path` through `schema` (`properties`, `items`, local `$ref`s).
pub fn lookup(root: &Value, path: &Path) -> Result<SchemaType, String> {
    let mut node = resolve(root, root)?;
    for (i, step) in path.steps.iter().enumerate() {
        let here = || Path { computed: path.computed, steps: path.steps[..i].to_vec() }.to_string();
        node = match step {
            Step::Field(name) => {
                let properties = node.get("properties").and_then(Value::as_object);
                match properties.and_then(|p| p.get(name)) {
                    Some(child) => resolve(root, child)?,
                    None => {
                        let known: Vec<&str> = properties.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                        let at = if i == 0 { "the record".to_string() } else { format!("'{}'", here()) };
                        return Err(format!("the schema has no member '{name}' in {at} (known: {})", known.join(", ")));
                    }
                }
            }
            Step::Each | Step::Index(_) => match node.get("items") {
                Some(items) if type_of(node).as_deref() == Some("array") => resolve(root, items)?,
                _ => return Err(format!("'{}' is not an array in the schema", here())),
            },
            Step::Filter { .. } => return Err("record paths cannot use [member=value] filters".into()),
            Step::Resolve(_) => return Err("record paths cannot use resolve()".into()),
        };
    }
    let kind = type_of(node).ok_or_else(|| format!("the schema gives no type for '{path}'"))?;
    let allowed = node.get("enum").and_then(Value::as_array).map(|values| values.iter().map(value_text).collect());
    let allowed = allowed.or_else(|| node.get("const").map(|c| vec![value_text(c)]));
    Ok(SchemaType {
        kind,
        format: node.get("format").and_then(Value::as_str).map(str::to_string),
        allowed,
        reachable: None,
        minimum: node.get("minimum").and_then(Value::as_f64),
    })
}

/// The text form used for code map keys and condition literals (`true`, `3`, `late`).
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn type_of(node: &Value) -> Option<String> {
    match node.get("type") {
        Some(Value::String(t)) => Some(t.clone()),
        Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).find(|t| *t != "null").map(str::to_string),
        _ => {
            let from_values = node.get("enum").and_then(Value::as_array).and_then(|v| v.first()).or_else(|| node.get("const"));
            from_values.map(|v| match v {
                Value::String(_) => "string".to_string(),
                Value::Bool(_) => "boolean".to_string(),
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer".to_string(),
                Value::Number(_) => "number".to_string(),
                Value::Array(_) => "array".to_string(),
                _ => "object".to_string(),
            })
        }
    }
}

/// Follows local `$ref`s (`#/$defs/name`), a bounded number of times.
fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> Result<&'a Value, String> {
    for _ in 0..16 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else { return Ok(node) };
        let pointer = reference.strip_prefix('#').ok_or_else(|| format!("only local $refs are supported, not '{reference}'"))?;
        node = root.pointer(pointer).ok_or_else(|| format!("the $ref '{reference}' points nowhere"))?;
    }
    Err("$refs nest too deeply".into())
}

#[cfg(test)]
mod tests {
    use super::super::path::parse_path;
    use super::*;

    #[test]
    fn follows_properties_items_and_refs() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "contacts": {"type": "array", "items": {"$ref": "#/$defs/contact"}},
                "sex": {"enum": ["female", "male"]}
            },
            "$defs": {"contact": {"type": "object", "properties": {"phone": {"type": "string"}, "since": {"type": "string", "format": "date"}}}}
        });
        let found = lookup(&schema, &parse_path("contacts[*].since").unwrap()).unwrap();
        assert_eq!((found.kind.as_str(), found.format.as_deref()), ("string", Some("date")));
        let sex = lookup(&schema, &parse_path("sex").unwrap()).unwrap();
        assert_eq!(sex.allowed, Some(vec!["female".to_string(), "male".to_string()]));
        let missing = lookup(&schema, &parse_path("contacts[*].fax").unwrap()).unwrap_err();
        assert!(missing.contains("no member 'fax' in 'contacts[*]'"), "{missing}");
        assert!(lookup(&schema, &parse_path("sex[*]").unwrap()).is_err());
    }
}
