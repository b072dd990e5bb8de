//! FHIRPath invariants (`ElementDefinition.constraint`): the base ones such as dom-3, obs-6 and bdl-7, and those profiles declare.
//!
//! Expressions are compiled once per process and evaluated with the element as `%context`, the
//! innermost resource as `%resource` and its container as `%rootResource`. `resolve()` finds
//! Bundle entries, `memberOf()` uses local terminology, `conformsTo()` runs the validator.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use crate::definitions::ElementDefinition;
use crate::fhirpath::{self, Context, Environment, Expression, Node, TypeCache, Value};
use crate::json::Json;
use crate::outcome::{IssueCode, Severity};

use super::terminology::Membership;
use super::walk::{Scope, Walker};
use super::{Validator, xhtml};

/// Constraints not evaluated as FHIRPath, each with the reason.
const SKIPPED: &[(&str, &str)] = &[
    // The walk refuses empty objects, arrays and strings itself, with a clearer message.
    ("ele-1", "enforced by the structural walk"),
];

/// Per-walk evaluation state: the memoized type model (not thread-safe, so one per walk).
pub(super) struct State<'v> {
    types: TypeCache<'v>,
}

impl<'v> State<'v> {
    pub fn new(validator: &'v Validator) -> Self {
        State { types: TypeCache::new(&*validator.definitions) }
    }
}

/// Compiled expressions by source text, shared by all validators (they are pure).
fn compiled(expression: &str) -> Option<Arc<Expression>> {
    static CACHE: OnceLock<RwLock<HashMap<String, Option<Arc<Expression>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.read().ok()?.get(expression) {
        return hit.clone();
    }
    let parsed = fhirpath::parse(expression).ok().map(Arc::new);
    if let Ok(mut cache) = cache.write() {
        cache.insert(expression.to_string(), parsed.clone());
    }
    parsed
}

/// Evaluates the constraints of `definition` on `node` (of FHIR type `type_code`).
pub(super) fn check<'a>(walker: &mut Walker<'_, 'a>, definition: &ElementDefinition, node: &'a Json, type_code: &str) {
    for constraint in &definition.constraints {
        if SKIPPED.iter().any(|(key, _)| *key == constraint.key) {
            continue;
        }
        let Some(source) = constraint.expression.as_deref() else { continue };
        let severity = if constraint.is_error { Severity::Error } else { Severity::Warning };
        let Some(expression) = compiled(source) else {
            walker.report(Severity::Warning, IssueCode::NotSupported, format!("{}: the constraint expression cannot be parsed, so it was not checked", constraint.key));
            continue;
        };
        let type_name = node_type(definition, type_code);
        let result = evaluate(walker, &expression, node, &type_name);
        match result {
            Ok(Some(false)) => {
                let message = format!("{}: {}", constraint.key, constraint.human);
                walker.report(severity, IssueCode::Invariant, message);
            }
            Ok(_) => {}
            Err(problem) => walker.report(
                Severity::Warning,
                IssueCode::NotSupported,
                format!("{}: the constraint could not be evaluated ({problem})", constraint.key),
            ),
        }
    }
}

fn evaluate<'a>(walker: &Walker<'_, 'a>, expression: &Expression, node: &'a Json, type_name: &str) -> Result<Option<bool>, String> {
    let environment = ValidatorEnvironment { validator: walker.validator, scope: &walker.scope };
    let types = &walker.invariants.types;
    let mut context = Context::new(types).with_environment(&environment);
    if let Some(resource) = walker.resources.last() {
        context = context.with_resource(Node::resource(resource));
    }
    if let Some(root) = walker.root_resource() {
        context = context.with_root_resource(Node::resource(root));
    }
    let input = Node::typed(node, Some(type_name));
    expression.evaluate_bool(input, &context).map_err(|e| e.to_string())
}

/// The FHIRPath type of the node: anonymous backbone elements are named by their path.
fn node_type(definition: &ElementDefinition, type_code: &str) -> String {
    if type_code.is_empty() || type_code == "BackboneElement" || (type_code == "Element" && definition.path.contains('.')) {
        definition.path.trim_end_matches("[x]").to_string()
    } else {
        type_code.to_string()
    }
}

/// The hooks the FHIRPath engine calls back into the validator through.
struct ValidatorEnvironment<'w, 'a> {
    validator: &'w Validator,
    scope: &'w Scope<'a>,
}

impl<'s, 'w: 's, 'a: 's> Environment<'s> for ValidatorEnvironment<'w, 'a> {
    fn resolve(&self, reference: &str) -> Option<Node<'s>> {
        let found = self.scope.bundle_entries.get(reference).or_else(|| self.scope.bundle_ids.get(reference))?;
        Some(Node::resource(found))
    }

    fn member_of(&self, value: &Value<'s>, value_set: &str) -> Result<Option<bool>, String> {
        let definitions = &self.validator.definitions;
        let Some(expansion) = self.validator.terminology.expansion(definitions, value_set) else { return Ok(None) };
        let codings: Vec<(Option<&str>, &str)> = match value {
            Value::Node(node) => match node.json() {
                Some(Json::String(code)) => vec![(None, code)],
                Some(json @ Json::Object(_)) if json.get("coding").is_some() => json["coding"]
                    .as_array()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| Some((c.get("system").and_then(Json::as_str), c.get("code")?.as_str()?)))
                    .collect(),
                Some(json @ Json::Object(_)) => match json.get("code").and_then(Json::as_str) {
                    Some(code) => vec![(json.get("system").and_then(Json::as_str), code)],
                    None => Vec::new(),
                },
                _ => Vec::new(),
            },
            other => other.as_str().map(|code| vec![(None, code)]).unwrap_or_default(),
        };
        let mut unknown = false;
        for (system, code) in codings {
            match expansion.contains(system, code) {
                Membership::In => return Ok(Some(true)),
                Membership::Unknown(_) => unknown = true,
                Membership::NotIn => {}
            }
        }
        Ok(if unknown { None } else { Some(false) })
    }

    fn conforms_to(&self, node: &Node<'s>, profile: &str, _types: &TypeCache<'_>) -> Result<bool, String> {
        let json = node.json().ok_or_else(|| "conformsTo() needs an element".to_string())?;
        if self.validator.definitions.structure(profile).is_none() {
            return Err(format!("the profile {profile} is not loaded"));
        }
        Ok(self.validator.conforms_to(json, profile))
    }

    fn html_checks(&self, node: &Node<'s>) -> bool {
        node.json().and_then(Json::as_str).is_none_or(|div| xhtml::check(div).is_ok())
    }
}
