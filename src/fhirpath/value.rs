//! Values in FHIRPath collections: borrowed FHIR nodes and System values, with equality, equivalence, ordering and JSON output.

use rust_decimal::Decimal;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;

use super::quantity::Quantity;
use super::temporal::{Temporal, TemporalKind};
use crate::json::{Json, Object};

/// A string borrowed from the resource, computed, or shared with the expression's literal.
#[derive(Clone, Debug)]
pub enum Str<'a> {
    Borrowed(&'a str),
    Owned(Rc<str>),
    Shared(Arc<str>),
}

impl Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Str::Borrowed(s) => s,
            Str::Owned(s) => s,
            Str::Shared(s) => s,
        }
    }
}

impl From<String> for Str<'_> {
    fn from(s: String) -> Self {
        Str::Owned(Rc::from(s))
    }
}

/// A node of the resource tree: the JSON value plus, for primitives, the `_name` sibling with
/// `id`/`extension`, and the declared FHIR type when the model knows it.
#[derive(Clone, Debug)]
pub struct Node<'a> {
    pub(crate) json: Option<&'a Json>,
    pub(crate) ext: Option<&'a Json>,
    pub(crate) ty: Option<Rc<str>>,
}

impl<'a> Node<'a> {
    /// A resource (or any JSON object with `resourceType`), typed from its `resourceType`.
    pub fn resource(json: &'a Json) -> Node<'a> {
        let ty = json.get("resourceType").and_then(Json::as_str).map(Rc::from);
        Node { json: Some(json), ext: None, ty }
    }

    /// A node of a known FHIR type (`None` leaves it to be inferred from the JSON).
    pub fn typed(json: &'a Json, type_name: Option<&str>) -> Node<'a> {
        Node { json: Some(json), ext: None, ty: type_name.map(Rc::from) }
    }

    /// [`Node::typed`] with a type name the caller shares between many nodes.
    pub fn typed_shared(json: &'a Json, type_name: Rc<str>) -> Node<'a> {
        Node { json: Some(json), ext: None, ty: Some(type_name) }
    }

    /// The JSON value (`None` for a primitive that only has an id/extension).
    pub fn json(&self) -> Option<&'a Json> {
        self.json
    }

    /// The `_name` object of a primitive (id/extension), if any.
    pub fn primitive_extension(&self) -> Option<&'a Json> {
        self.ext
    }

    /// The declared or inferred FHIR type name.
    pub fn type_name(&self) -> Cow<'_, str> {
        if let Some(t) = &self.ty {
            return Cow::Borrowed(t);
        }
        Cow::Borrowed(match self.json {
            Some(Json::Bool(_)) => "boolean",
            Some(Json::Number(n)) if n.contains(['.', 'e', 'E']) => "decimal",
            Some(Json::Number(_)) => "integer",
            Some(Json::String(_)) => "string",
            Some(Json::Object(o)) => match o.get("resourceType").and_then(Json::as_str) {
                Some(rt) => return Cow::Borrowed(rt),
                None => "Element",
            },
            _ => "Element",
        })
    }

    fn same(&self, other: &Node<'_>) -> bool {
        let eq = |a: Option<&Json>, b: Option<&Json>| match (a, b) {
            (Some(x), Some(y)) => std::ptr::eq(x, y) || x == y,
            (None, None) => true,
            _ => false,
        };
        eq(self.json, other.json) && (self.json.is_some_and(|j| !matches!(j, Json::Object(_))) || eq(self.ext, other.ext))
    }
}

/// An item of a FHIRPath collection.
#[derive(Clone, Debug)]
pub enum Value<'a> {
    Node(Node<'a>),
    Boolean(bool),
    String(Str<'a>),
    Integer(i64),
    Decimal(Decimal),
    /// A Date, DateTime or Time (see [`Temporal::kind`]).
    Temporal(Temporal),
    Quantity(Quantity),
    /// The result of `type()`.
    TypeInfo { namespace: &'static str, name: Str<'a> },
}

/// The System-level view of a value, borrowed where possible.
#[derive(Clone, Debug)]
pub enum Prim<'v> {
    Bool(bool),
    Str(&'v str),
    Int(i64),
    Dec(Decimal),
    Temporal(Temporal),
    Quantity(Cow<'v, Quantity>),
    /// A complex FHIR node (or a primitive node without a value).
    Complex,
}

/// How a FHIR primitive type maps to a System type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemKind {
    Boolean,
    String,
    Integer,
    Decimal,
    Date,
    DateTime,
    Time,
    Quantity,
}

pub fn fhir_primitive_kind(type_name: &str) -> Option<SystemKind> {
    Some(match type_name {
        "boolean" => SystemKind::Boolean,
        "string" | "code" | "id" | "uri" | "url" | "canonical" | "markdown" | "oid" | "uuid" | "base64Binary" | "xhtml" => {
            SystemKind::String
        }
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => SystemKind::Integer,
        "decimal" => SystemKind::Decimal,
        "date" => SystemKind::Date,
        "dateTime" | "instant" => SystemKind::DateTime,
        "time" => SystemKind::Time,
        _ => return None,
    })
}

pub fn is_quantity_type(type_name: &str) -> bool {
    matches!(type_name, "Quantity" | "Age" | "Duration" | "Distance" | "Count" | "SimpleQuantity" | "MoneyQuantity")
}

/// Parses a JSON number's text as a decimal, accepting exponents.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    text.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(text).ok())
}

fn quantity_from_object(json: &Json) -> Option<Quantity> {
    let o = json.as_object()?;
    let value = match o.get("value")? {
        Json::Number(n) => parse_decimal(n)?,
        _ => return None,
    };
    let code = o.get("code").and_then(Json::as_str);
    let system = o.get("system").and_then(Json::as_str);
    let unit = match (system, code) {
        (Some("http://unitsofmeasure.org"), Some(c)) => c,
        _ => o.get("unit").and_then(Json::as_str).or(code).unwrap_or("1"),
    };
    Some(Quantity::new(value, unit))
}

impl<'a> Value<'a> {
    pub fn string(s: impl Into<String>) -> Value<'a> {
        Value::String(Str::from(s.into()))
    }

    /// The System-level view used by operators and functions.
    pub fn prim(&self) -> Prim<'_> {
        match self {
            Value::Boolean(b) => Prim::Bool(*b),
            Value::String(s) => Prim::Str(s),
            Value::Integer(i) => Prim::Int(*i),
            Value::Decimal(d) => Prim::Dec(*d),
            Value::Temporal(t) => Prim::Temporal(*t),
            Value::Quantity(q) => Prim::Quantity(Cow::Borrowed(q)),
            Value::TypeInfo { .. } => Prim::Complex,
            Value::Node(n) => node_prim(n),
        }
    }

    /// The value converted to a System value (a node keeps its node form when it has none).
    pub fn to_system(&self) -> Value<'a> {
        match self {
            Value::Node(n) => match node_prim(n) {
                Prim::Bool(b) => Value::Boolean(b),
                Prim::Str(_) => match n.json {
                    Some(Json::String(s)) => Value::String(Str::Borrowed(s)),
                    _ => self.clone(),
                },
                Prim::Int(i) => Value::Integer(i),
                Prim::Dec(d) => Value::Decimal(d),
                Prim::Temporal(t) => Value::Temporal(t),
                Prim::Quantity(q) => Value::Quantity(q.into_owned()),
                Prim::Complex => self.clone(),
            },
            other => other.clone(),
        }
    }

    pub fn as_node(&self) -> Option<&Node<'a>> {
        match self {
            Value::Node(n) => Some(n),
            _ => None,
        }
    }

    /// The string content if this is a string (System or FHIR string-like primitive).
    pub fn as_str(&self) -> Option<&str> {
        match self.prim() {
            Prim::Str(s) => Some(s),
            _ => None,
        }
    }

    /// `(namespace, name)` of the value's type.
    pub fn type_name(&self) -> (&'static str, Cow<'_, str>) {
        let system = |n: &'static str| ("System", Cow::Borrowed(n));
        match self {
            Value::Node(n) => ("FHIR", n.type_name()),
            Value::Boolean(_) => system("Boolean"),
            Value::String(_) => system("String"),
            Value::Integer(_) => system("Integer"),
            Value::Decimal(_) => system("Decimal"),
            Value::Temporal(t) => system(match t.kind {
                TemporalKind::Date => "Date",
                TemporalKind::DateTime => "DateTime",
                TemporalKind::Time => "Time",
            }),
            Value::Quantity(_) => system("Quantity"),
            Value::TypeInfo { .. } => system("TypeInfo"),
        }
    }

    /// The value as JSON: nodes as their JSON, System values as JSON primitives, a Quantity as a
    /// FHIR Quantity object (`{"value":5,"unit":"mg","system":"http://unitsofmeasure.org","code":"mg"}`,
    /// calendar keywords without system/code), and `type()` results as `{"namespace":…,"name":…}`.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Node(n) => match (n.json, n.ext) {
                (Some(j), _) => j.clone(),
                (None, Some(e)) => e.clone(),
                (None, None) => Json::Null,
            },
            Value::Boolean(b) => Json::Bool(*b),
            Value::String(s) => Json::string(&**s),
            Value::Integer(i) => Json::Number(i.to_string().into()),
            Value::Decimal(d) => Json::Number(d.to_string().into()),
            Value::Temporal(t) => Json::string(t.to_iso()),
            Value::Quantity(q) => {
                let mut o = Object::new();
                o.insert("value", Json::Number(q.value.to_string().into()));
                o.insert("unit", Json::string(&*q.unit));
                if super::quantity::calendar_keyword(&q.unit).is_none() {
                    o.insert("system", Json::string("http://unitsofmeasure.org"));
                    o.insert("code", Json::string(&*q.unit));
                }
                Json::Object(o)
            }
            Value::TypeInfo { namespace, name } => {
                let mut o = Object::new();
                o.insert("namespace", Json::string(*namespace));
                o.insert("name", Json::string(&**name));
                Json::Object(o)
            }
        }
    }
}

impl fmt::Display for Value<'_> {
    /// The FHIRPath literal-like rendering used in messages and the conformance runner.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prim() {
            Prim::Bool(b) => write!(f, "{b}"),
            Prim::Str(s) => f.write_str(s),
            Prim::Int(i) => write!(f, "{i}"),
            Prim::Dec(d) => write!(f, "{d}"),
            Prim::Temporal(t) => f.write_str(&t.to_literal()),
            Prim::Quantity(q) => f.write_str(&q.to_literal()),
            Prim::Complex => match self {
                Value::TypeInfo { namespace, name } => write!(f, "{namespace}.{}", &**name),
                _ => f.write_str(&self.to_json().to_string_compact()),
            },
        }
    }
}

fn node_prim<'v>(n: &'v Node<'_>) -> Prim<'v> {
    let Some(json) = n.json else { return Prim::Complex };
    let kind = match &n.ty {
        Some(t) => match fhir_primitive_kind(t) {
            Some(k) => Some(k),
            None if is_quantity_type(t) => Some(SystemKind::Quantity),
            None => None,
        },
        None => None,
    };
    match (kind, json) {
        (Some(SystemKind::Quantity), _) => quantity_from_object(json).map_or(Prim::Complex, |q| Prim::Quantity(Cow::Owned(q))),
        (Some(SystemKind::Boolean) | None, Json::Bool(b)) => Prim::Bool(*b),
        (Some(SystemKind::Integer), Json::Number(t)) => t.parse().map_or(Prim::Complex, Prim::Int),
        (Some(SystemKind::Decimal), Json::Number(t)) => parse_decimal(t).map_or(Prim::Complex, Prim::Dec),
        (None, Json::Number(t)) => match t.parse::<i64>() {
            Ok(i) => Prim::Int(i),
            Err(_) => parse_decimal(t).map_or(Prim::Complex, Prim::Dec),
        },
        (Some(SystemKind::Date), Json::String(s)) => Temporal::parse_date(s).map_or(Prim::Str(s), Prim::Temporal),
        (Some(SystemKind::DateTime), Json::String(s)) => {
            Temporal::parse_datetime(s, false).map_or(Prim::Str(s), Prim::Temporal)
        }
        (Some(SystemKind::Time), Json::String(s)) => Temporal::parse_time(s).map_or(Prim::Str(s), Prim::Temporal),
        (Some(_) | None, Json::String(s)) => Prim::Str(s),
        (None, Json::Object(_)) if n.ty.is_none() => {
            quantity_from_object(json).filter(|_| json.get("value").is_some() && json.get("unit").is_some()).map_or(Prim::Complex, |q| Prim::Quantity(Cow::Owned(q)))
        }
        _ => Prim::Complex,
    }
}

/// Implicitly converts a string to a temporal of `kind` (for untyped or string-typed data).
fn str_as_temporal(s: &str, kind: TemporalKind) -> Option<Temporal> {
    match kind {
        TemporalKind::Date => Temporal::parse_date(s).or_else(|| Temporal::parse_datetime(s, false)),
        TemporalKind::DateTime => Temporal::parse_datetime(s, false),
        TemporalKind::Time => Temporal::parse_time(s),
    }
}

fn temporal_compare(a: &Temporal, b: &Temporal) -> Option<Option<Ordering>> {
    let time_a = a.kind == TemporalKind::Time;
    let time_b = b.kind == TemporalKind::Time;
    if time_a != time_b {
        return None;
    }
    Some(a.compare(b))
}

/// `=` on two single items: `None` when undecided (empty result).
pub fn equals(a: &Value<'_>, b: &Value<'_>) -> Option<bool> {
    match (a.prim(), b.prim()) {
        (Prim::Complex, Prim::Complex) => Some(match (a, b) {
            (Value::Node(x), Value::Node(y)) => x.same(y),
            (Value::TypeInfo { namespace: n1, name: a1 }, Value::TypeInfo { namespace: n2, name: a2 }) => {
                n1 == n2 && **a1 == **a2
            }
            _ => false,
        }),
        (Prim::Bool(x), Prim::Bool(y)) => Some(x == y),
        (Prim::Str(x), Prim::Str(y)) => Some(x == y),
        (Prim::Int(x), Prim::Int(y)) => Some(x == y),
        (Prim::Int(x), Prim::Dec(y)) | (Prim::Dec(y), Prim::Int(x)) => Some(Decimal::from(x) == y),
        (Prim::Dec(x), Prim::Dec(y)) => Some(x == y),
        (Prim::Temporal(x), Prim::Temporal(y)) => match temporal_compare(&x, &y) {
            None => Some(false),
            Some(o) => o.map(|o| o == Ordering::Equal),
        },
        (Prim::Str(s), Prim::Temporal(t)) | (Prim::Temporal(t), Prim::Str(s)) => match str_as_temporal(s, t.kind) {
            Some(x) => x.compare(&t).map(|o| o == Ordering::Equal),
            None => Some(false),
        },
        (Prim::Quantity(x), Prim::Quantity(y)) => x.common_values(&y).map(|(p, q)| p == q),
        _ => Some(false),
    }
}

/// Rounds both decimals to the precision of the less precise one, as `~` wants.
fn decimal_equivalent(x: Decimal, y: Decimal) -> bool {
    let scale = x.scale().min(y.scale());
    x.round_dp(scale) == y.round_dp(scale)
}

fn normalize_ws(s: &str) -> impl Iterator<Item = char> + '_ {
    s.split_whitespace().enumerate().flat_map(|(i, w)| (if i > 0 { Some(' ') } else { None }).into_iter().chain(w.chars()))
}

/// `~` on two single items.
pub fn equivalent(a: &Value<'_>, b: &Value<'_>) -> bool {
    match (a.prim(), b.prim()) {
        (Prim::Str(x), Prim::Str(y)) => {
            normalize_ws(x).flat_map(char::to_lowercase).eq(normalize_ws(y).flat_map(char::to_lowercase))
        }
        (Prim::Int(x), Prim::Dec(y)) | (Prim::Dec(y), Prim::Int(x)) => decimal_equivalent(Decimal::from(x), y),
        (Prim::Dec(x), Prim::Dec(y)) => decimal_equivalent(x, y),
        (Prim::Temporal(x), Prim::Temporal(y)) => x.equivalent(&y),
        (Prim::Quantity(x), Prim::Quantity(y)) => {
            x.common_values(&y).is_some_and(|(p, q)| decimal_equivalent(p, q))
        }
        _ => equals(a, b).unwrap_or(false),
    }
}

/// Ordering for `<`, `>`, `<=`, `>=` and `sort()`: `Err` when the types cannot be compared,
/// `Ok(None)` when the comparison is undecided (partial precision, incompatible units).
pub fn compare(a: &Value<'_>, b: &Value<'_>) -> Result<Option<Ordering>, String> {
    Ok(match (a.prim(), b.prim()) {
        (Prim::Int(x), Prim::Int(y)) => Some(x.cmp(&y)),
        (Prim::Int(x), Prim::Dec(y)) => Some(Decimal::from(x).cmp(&y)),
        (Prim::Dec(x), Prim::Int(y)) => Some(x.cmp(&Decimal::from(y))),
        (Prim::Dec(x), Prim::Dec(y)) => Some(x.cmp(&y)),
        (Prim::Str(x), Prim::Str(y)) => Some(x.cmp(y)),
        (Prim::Bool(x), Prim::Bool(y)) => Some(x.cmp(&y)),
        (Prim::Temporal(x), Prim::Temporal(y)) => {
            temporal_compare(&x, &y).ok_or_else(|| format!("cannot compare {a} with {b}"))?
        }
        (Prim::Str(s), Prim::Temporal(t)) => match str_as_temporal(s, t.kind) {
            Some(x) => x.compare(&t),
            None => return Err(format!("cannot compare '{s}' with {b}")),
        },
        (Prim::Temporal(t), Prim::Str(s)) => match str_as_temporal(s, t.kind) {
            Some(y) => t.compare(&y),
            None => return Err(format!("cannot compare {a} with '{s}'")),
        },
        (Prim::Quantity(x), Prim::Quantity(y)) => x.common_values(&y).map(|(p, q)| p.cmp(&q)),
        _ => return Err(format!("cannot compare {} with {}", a.type_name().1, b.type_name().1)),
    })
}
