//! FHIRPath invariants (`ElementDefinition.constraint`): the base ones such as dom-3, obs-6 and bdl-7, and those profiles declare.
//!
//! Expressions are compiled once per process and evaluated with the element as `%context`, the
//! innermost resource as `%resource` and its container as `%rootResource`. `resolve()` finds
//! Bundle entries, `memberOf()` uses local terminology, `conformsTo()` runs the validator.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::sync::{Arc, LazyLock, OnceLock, RwLock, Weak};

use crate::definitions::{Constraint, Definitions, ElementDefinition, Prepared};
use crate::fhirpath::{self, Context, Environment, Expression, Node, TypeCache, TypeMemo, Value};
use crate::json::{Json, Object};
use crate::outcome::{IssueCode, Severity};

use super::terminology::Membership;
use super::walk::{Scope, Walker};
use super::{Validator, xhtml};

mod shortcuts;

use shortcuts::{Place, Verdict};

/// Constraints not evaluated as FHIRPath, each with the reason.
const SKIPPED: &[(&str, &str)] = &[
    // The walk refuses empty objects, arrays and strings itself, with a clearer message.
    ("ele-1", "enforced by the structural walk"),
];

/// Hashes the addresses used as keys below: they are not chosen by the input, so the keyed
/// (and slower) default hasher buys nothing.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type AddressMap<K, V> = HashMap<K, V, BuildHasherDefault<AddressHasher>>;

/// An expression compiled, or `None` when it does not parse.
type Compiled = Option<Arc<Expression>>;

/// What evaluating a constraint gave: true, false or empty, or why it could not be evaluated.
type Outcome = Result<Option<bool>, String>;

/// An expression's outcome on an empty object, by the FHIRPath type of the object.
type ByType = Vec<(Box<str>, Outcome)>;

/// How many type-model answers are kept from one walk for the next; beyond this (names in the
/// data are asked about too) the next walk starts afresh.
const MAX_KEPT_TYPE_ANSWERS: usize = 50_000;

thread_local! {
    /// The type model's answers, kept across walks over the same definitions. The weak reference
    /// identifies them and keeps them from being changed in place (`Arc::get_mut` fails while it exists).
    static TYPE_MEMO: RefCell<Option<(Weak<Definitions>, Rc<TypeMemo>)>> = const { RefCell::new(None) };
}

/// Per-walk evaluation state: the memoized type model (not thread-safe, so one per walk) and
/// what the constraints' expressions resolved to.
pub(super) struct State<'v> {
    types: TypeCache<'v>,
    /// Compiled expressions by the address and length of their source text, which the
    /// definitions keep alive; a hit is confirmed by comparing the text, so a reused address
    /// cannot pick up another expression.
    compiled: RefCell<AddressMap<(usize, usize), Compiled>>,
    /// Results on an empty object, by expression (kept alive by the global cache) and type, for
    /// elements the expression sees nothing of ([`Expression::sees_nothing_of`]).
    on_empty: RefCell<AddressMap<usize, ByType>>,
}

impl<'v> State<'v> {
    pub fn new(validator: &'v Validator) -> Self {
        let definitions = &validator.definitions;
        let memo = TYPE_MEMO.with(|cell| {
            let mut kept = cell.borrow_mut();
            match &*kept {
                Some((weak, memo)) if std::ptr::eq(weak.as_ptr(), Arc::as_ptr(definitions)) => memo.clone(),
                _ => {
                    let memo = Rc::new(TypeMemo::default());
                    *kept = Some((Arc::downgrade(definitions), memo.clone()));
                    memo
                }
            }
        });
        let types = TypeCache::with_memo(&**definitions, memo);
        if types.memo_size() > MAX_KEPT_TYPE_ANSWERS {
            TYPE_MEMO.with(|cell| *cell.borrow_mut() = None);
            return State::new(validator);
        }
        State { types, compiled: RefCell::default(), on_empty: RefCell::default() }
    }

    /// The memoized type model, shared with other FHIRPath users of the walk (extension contexts).
    pub(super) fn types(&self) -> &TypeCache<'v> {
        &self.types
    }

    /// `source` compiled, from the per-walk and then the process-wide cache.
    pub(super) fn compiled(&self, source: &str) -> Option<Arc<Expression>> {
        let key = (source.as_ptr() as usize, source.len());
        if let Some(hit) = self.compiled.borrow().get(&key)
            && hit.as_ref().is_none_or(|e| e.source() == source)
        {
            return hit.clone();
        }
        let found = compiled(source);
        self.compiled.borrow_mut().insert(key, found.clone());
        found
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

/// How [`check`] runs one constraint, worked out the first time it meets it and kept with the
/// constraint, so that checking it again reads neither its key nor its expression.
struct Plan {
    /// The expression is `htmlChecks()` (txt-1, txt-2).
    html_checks: bool,
    shortcut: Option<shortcuts::Proof>,
    /// `None`: the expression does not parse.
    expression: Option<Arc<Expression>>,
}

/// The positions of an element's constraints that [`check`] runs (those not skipped), kept with
/// the element.
struct Live(Box<[usize]>);

impl Live {
    fn of(definition: &ElementDefinition) -> Live {
        Live(definition.constraints.iter().enumerate().filter(|(_, c)| source_to_run(c).is_some()).map(|(i, _)| i).collect())
    }
}

/// The expression of a constraint that is run: not listed in [`SKIPPED`], and with an expression.
fn source_to_run(constraint: &Constraint) -> Option<&str> {
    let source = constraint.expression.as_deref()?;
    (!SKIPPED.iter().any(|(key, _)| *key == constraint.key)).then_some(source)
}

impl Plan {
    /// The plan of a constraint that is run (see [`Live`]).
    fn of(constraint: &Constraint) -> Plan {
        let source = constraint.expression.as_deref().unwrap_or_default();
        Plan { html_checks: source == "htmlChecks()", shortcut: shortcuts::find(&constraint.key, source), expression: compiled(source) }
    }
}

/// What `slot` keeps, made by `make` on first use; made into `fresh` instead if the slot
/// holds a value of another type (it never does: the validator is the slots' only user).
fn kept<'d, T: std::any::Any + Send + Sync>(slot: &'d Prepared, fresh: &'d mut Option<T>, make: impl Fn() -> T) -> &'d T {
    match slot.get_or_init(&make) {
        Some(value) => value,
        None => fresh.insert(make()),
    }
}

/// Stands in for an element that has none of the members an expression looks at.
static EMPTY_OBJECT: LazyLock<Json> = LazyLock::new(|| Json::Object(Object::new()));

/// Evaluates the constraints of `definition` on `node` (of FHIR type `type_code`).
pub(super) fn check<'a>(walker: &mut Walker<'_, 'a>, definition: &ElementDefinition, node: &'a Json, type_code: &str) {
    let mut fresh_live = None;
    let live = kept(&definition.prepared, &mut fresh_live, || Live::of(definition));
    // Most elements, every primitive among them, have only ele-1, which the walk enforces.
    if live.0.is_empty() {
        return;
    }
    // Reported after the evaluations, which borrow the walker.
    // (constraint, outcome); no outcome: the expression does not parse.
    let mut failures: Vec<(&Constraint, Option<Outcome>)> = Vec::new();
    {
        let walker: &Walker<'_, 'a> = walker;
        let state = &walker.invariants;
        let environment = ValidatorEnvironment { validator: walker.validator, scope: &walker.scope };
        // Most elements have only skipped or shortcut constraints: set up evaluation on demand.
        let mut setup: Option<(Context<'_>, Rc<str>)> = None;
        let make_setup = |type_name: &str| {
            let mut context = Context::new(&state.types).with_environment(&environment);
            if let Some(resource) = walker.resources.last() {
                context = context.with_resource(Node::resource(resource));
            }
            if let Some(root) = walker.root_resource() {
                context = context.with_root_resource(Node::resource(root));
            }
            (context, Rc::<str>::from(type_name))
        };
        let root_resource = || walker.root_resource();
        let place = Place { node_is_resource: walker.resources.last().is_some_and(|r| std::ptr::eq(*r, node)), root_resource: &root_resource };
        for &index in &live.0 {
            let constraint = &definition.constraints[index];
            let mut fresh_plan = None;
            let Plan { html_checks, shortcut, expression } = kept(&constraint.prepared, &mut fresh_plan, || Plan::of(constraint));
            // txt-1 and txt-2 ask whether the div passed the XHTML check the walk has just run on it.
            if *html_checks && walker.scope.checked_xhtml.get() == super::walk::address(node) {
                continue;
            }
            if let Some(proof) = shortcut {
                match shortcuts::apply(*proof, node, &place) {
                    Verdict::Holds => continue,
                    Verdict::Fails => {
                        failures.push((constraint, Some(Ok(Some(false)))));
                        continue;
                    }
                    Verdict::Unknown => {}
                }
            }
            let Some(expression) = expression else {
                failures.push((constraint, None));
                continue;
            };
            let type_name = node_type(definition, type_code);
            let result = if expression.sees_nothing_of(node) {
                let key = Arc::as_ptr(expression) as usize;
                let known = state.on_empty.borrow().get(&key).and_then(|by_type| by_type.iter().find(|(t, _)| **t == *type_name).map(|(_, r)| r.clone()));
                match known {
                    Some(result) => result,
                    None => {
                        let (context, shared_type) = &*setup.get_or_insert_with(|| make_setup(type_name));
                        let result = evaluate(expression, &EMPTY_OBJECT, shared_type, context);
                        state.on_empty.borrow_mut().entry(key).or_default().push((type_name.into(), result.clone()));
                        result
                    }
                }
            } else {
                let (context, shared_type) = &*setup.get_or_insert_with(|| make_setup(type_name));
                evaluate(expression, node, shared_type, context)
            };
            if !matches!(result, Ok(Some(true) | None)) {
                failures.push((constraint, Some(result)));
            }
        }
    }
    for (constraint, result) in failures {
        let severity = if constraint.is_error { Severity::Error } else { Severity::Warning };
        match result {
            Some(Ok(Some(false))) => {
                let message = format!("{}: {}", constraint.key, constraint.human);
                walker.report(severity, IssueCode::Invariant, message);
            }
            Some(Ok(_)) => {}
            None => walker.report(
                Severity::Warning,
                IssueCode::NotSupported,
                format!("{}: the constraint expression cannot be parsed, so it was not checked", constraint.key),
            ),
            Some(Err(problem)) => walker.report(
                Severity::Warning,
                IssueCode::NotSupported,
                format!("{}: the constraint could not be evaluated ({problem})", constraint.key),
            ),
        }
    }
}

fn evaluate<'a>(expression: &Expression, node: &'a Json, type_name: &Rc<str>, context: &Context<'a>) -> Result<Option<bool>, String> {
    let input = Node::typed_shared(node, type_name.clone());
    expression.evaluate_bool(input, context).map_err(|e| e.to_string())
}

/// The FHIRPath type of the node: anonymous backbone elements are named by their path.
fn node_type<'d>(definition: &'d ElementDefinition, type_code: &'d str) -> &'d str {
    if type_code.is_empty() || type_code == "BackboneElement" || (type_code == "Element" && definition.path.contains('.')) {
        definition.path.strip_suffix("[x]").unwrap_or(&definition.path)
    } else {
        type_code
    }
}

/// The hooks the FHIRPath engine calls back into the validator through.
struct ValidatorEnvironment<'w, 'a> {
    validator: &'w Validator,
    scope: &'w Scope<'a>,
}

impl<'s, 'w: 's, 'a: 's> Environment<'s> for ValidatorEnvironment<'w, 'a> {
    fn resolve(&self, reference: &str) -> Option<Node<'s>> {
        let found = self.scope.bundle_entries.get(reference).copied().or_else(|| self.scope.bundle_id(reference))?;
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
        let Some(json) = node.json() else { return true };
        if self.scope.checked_xhtml.get() == super::walk::address(json) {
            return true;
        }
        json.as_str().is_none_or(|div| xhtml::check(div).is_ok())
    }
}
