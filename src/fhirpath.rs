//! FHIRPath (N1, as used by FHIR R4): parse expressions and evaluate them over [`crate::json::Json`] resources.
//!
//! The engine is untyped JSON plus a [`TypeModel`] that tells it the declared FHIR type of each
//! element, which `is`, `as`, `ofType`, choice elements (`Observation.value`) and primitive
//! conversions need. The validator supplies a model built from the loaded StructureDefinitions.
//!
//! ```text
//! let expr = fhirpath::parse("name.given.first()")?;          // once
//! let types = fhirpath::TypeCache::new(&model);                // once per thread
//! let ctx = fhirpath::Context::new(&types);                    // per evaluation
//! let result = expr.evaluate(fhirpath::Node::resource(&patient_json), &ctx)?;
//! ```
//!
//! Decimals are `rust_decimal::Decimal`: exact base-10 arithmetic with 28 significant digits,
//! which FHIRPath needs (`0.1 + 0.2 = 0.3`, precision kept as written: `1.50`), and fixed-size
//! so arithmetic does not allocate. Date/time values keep the precision they were written with.
//!
//! # Semantics worth knowing
//! - Nodes are borrowed from the caller's JSON; a primitive's node joins `name` and `_name`
//!   (value plus id/extension), repeating primitives align by index.
//! - Choice elements are reached by their FHIRPath name (`value`); the JSON spelling
//!   (`valueQuantity`) is an error when the model declares the choice, as in the Java engine.
//! - `is` follows inheritance (`code` is a `string`); `as`/`ofType` want the exact primitive
//!   type (a `code` is not `as(string)`), while complex types and resources still match their
//!   ancestors (`ofType(Resource)`). Unqualified names are FHIR types first, then System types.
//!   `as` (function or operator) on more than one item filters like `ofType()` (R4's dom-3 and
//!   search parameters rely on it) except in strict mode, where it is the error the
//!   specification asks for.
//! - Errors: [`SyntaxError`] from [`parse`] (unknown functions and argument counts included);
//!   [`EvalError`] for type errors, non-singletons where one item is needed, unknown
//!   `%constants`, and in [`Context::strict`] mode unknown elements. There is no separate static
//!   type check, so semantic errors that need one (a member that no possible type has, ordered
//!   functions on unordered input) are not reported.
//! - Limits: parentheses/arguments nest at most 40 deep and the tree is at most 128 high (a flat
//!   chain of 128 `+` or `.` steps counts too); `repeat()`/`descendants()` stop with an error past
//!   a million items. `distinct()`, `union` and `|` compare items pairwise (quadratic),
//!   except collections of 16 or more strings, which are deduplicated by hashing.
//! - Units: the UCUM subset in [`quantity`] (metric prefixes, SI base units, time, common
//!   customary units); unknown units compare only with the identical unit.
//! - [`to_json`] renders results for the CLI: nodes as their JSON, System values as JSON
//!   primitives (dates as ISO strings without `@`), a Quantity as a FHIR Quantity object.

/// What the engine needs to know about FHIR types; implemented from StructureDefinitions.
///
/// A type is named by its FHIR type code (`Patient`, `HumanName`, `string`) or, for an anonymous
/// BackboneElement, by its element path (`Patient.contact`, `Questionnaire.item`).
pub trait TypeModel: Send + Sync {
    /// The declared child `name` of a value of type `parent`, or `None` when the model has no such element.
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement>;

    /// The type `type_name` derives from (`Patient` → `DomainResource`, `code` → `string`), if any.
    fn base_type(&self, type_name: &str) -> Option<String>;

    /// The names of the child elements of `type_name` in definition order (choices without `[x]`:
    /// `value`), which the XML format requires elements to follow; `None` when not known, and the
    /// XML reader then skips its order check.
    fn element_order(&self, _type_name: &str) -> Option<Vec<String>> {
        None
    }
}

/// The FHIR primitive a FHIRPath System type URL stands for (`…/System.String` → `string`).
///
/// R4 snapshots declare `Element.id`, `Extension.url` and the `value` of primitives with System
/// types; models, the engine and the XML reader all need the FHIR name instead.
pub fn fhir_primitive_for_system_type(code: &str) -> Option<&'static str> {
    Some(match code.strip_prefix("http://hl7.org/fhirpath/System.")? {
        "String" => "string",
        "Boolean" => "boolean",
        "Integer" => "integer",
        "Decimal" => "decimal",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Time" => "time",
        _ => return None,
    })
}

/// One declared child element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildElement {
    /// Its possible types; more than one only for choice elements (`value[x]`).
    pub types: Vec<String>,
    /// Whether the element is a choice (`value[x]`), spelled `valueQuantity` etc. in JSON.
    pub is_choice: bool,
    /// Whether the element may repeat (max is not 1).
    pub many: bool,
}

mod analysis;
mod ast;
mod context;
mod eval;
mod functions;
mod lexer;
mod parser;
pub mod quantity;
pub mod temporal;
mod value;

#[cfg(test)]
mod tests;

use std::fmt;

pub use context::{Context, DefaultEnvironment, Environment, NoModel, TypeCache, TypeMemo};
pub use quantity::Quantity;
pub use temporal::{Precision, Temporal, TemporalKind};
pub use value::{Node, Str, Value};

use crate::json::Json;

/// A FHIRPath expression parsed once and evaluated any number of times (it is `Send + Sync`).
#[derive(Debug)]
pub struct Expression {
    source: Box<str>,
    root: ast::Expr,
    /// How many sub-expression results one evaluation memoizes.
    memo_slots: u32,
    /// See [`Expression::focus_members`].
    focus_members: Option<Box<[Box<str>]>>,
}

/// An expression that is not valid FHIRPath: the message and the byte offset where it was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct SyntaxError {
    pub message: String,
    pub position: usize,
}

impl SyntaxError {
    pub(crate) fn new(message: impl Into<String>, position: usize) -> SyntaxError {
        SyntaxError { message: message.into(), position }
    }
}

/// A failure while evaluating (wrong types, more than one item where one was needed, unknown
/// `%constant`, strict-mode unknown element, …), with the offset of the sub-expression when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalError {
    pub message: String,
    pub position: Option<usize>,
}

impl EvalError {
    pub(crate) fn new(message: impl Into<String>) -> EvalError {
        EvalError { message: message.into(), position: None }
    }

    pub(crate) fn at(mut self, position: usize) -> EvalError {
        self.position = Some(position);
        self
    }
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{} at position {p}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for EvalError {}

/// Parses FHIRPath text. Unknown functions and wrong argument counts are reported here.
pub fn parse(expr: &str) -> Result<Expression, SyntaxError> {
    let mut root = parser::parse_expression(expr)?;
    let memo_slots = analysis::assign_memo_slots(&mut root);
    let focus_members = analysis::focus_members(&root).map(Vec::into_boxed_slice);
    Ok(Expression { source: expr.into(), root, memo_slots, focus_members })
}

impl Expression {
    /// The text the expression was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates with `input` as the focus (and, unless the context says otherwise, as `%resource` and `%context`).
    pub fn evaluate<'a>(&self, input: Node<'a>, ctx: &Context<'a>) -> Result<Vec<Value<'a>>, EvalError> {
        self.evaluate_collection(vec![Value::Node(input)], ctx)
    }

    /// Evaluates on any input collection (empty for expressions that need no input).
    pub fn evaluate_collection<'a>(&self, input: Vec<Value<'a>>, ctx: &Context<'a>) -> Result<Vec<Value<'a>>, EvalError> {
        let evaluator = eval::Evaluator::new(ctx, &input, self.memo_slots);
        let focus = eval::Focus { this: (input.len() == 1).then(|| input[0].clone()), index: None, total: None };
        evaluator.eval(&self.root, &input, &focus)
    }

    /// The members of the focus this expression can observe, when it observes the focus in no
    /// other way; `None` when it might.
    ///
    /// When the focus is a JSON object with none of these members (no key equal to or starting
    /// with a name or with `_` and a name, which covers choice spellings), the result is the
    /// result on an empty object of the same type under any context without user `%variables`,
    /// so a caller may compute that once and reuse it.
    pub fn focus_members(&self) -> Option<&[Box<str>]> {
        self.focus_members.as_deref()
    }

    /// Whether `focus` is an object with none of [`Expression::focus_members`], so that the
    /// result on it is the result on an empty object of the same type.
    pub fn sees_nothing_of(&self, focus: &Json) -> bool {
        match (&self.focus_members, focus) {
            (Some(names), Json::Object(object)) => !object.iter().any(|(key, _)| {
                let key = key.strip_prefix('_').unwrap_or(key);
                names.iter().any(|name| key.starts_with(&**name))
            }),
            _ => false,
        }
    }

    /// Evaluates as an invariant: `Some(true/false)` for a single Boolean result (any other single
    /// item counts as true), `None` for an empty result; more than one item is an error.
    pub fn evaluate_bool<'a>(&self, input: Node<'a>, ctx: &Context<'a>) -> Result<Option<bool>, EvalError> {
        eval::to_bool(&self.evaluate(input, ctx)?)
    }
}

/// The CLI's rendering of a result collection: a JSON array of [`Value::to_json`] items.
pub fn to_json(values: &[Value<'_>]) -> Json {
    Json::Array(values.iter().map(Value::to_json).collect())
}
