//! What an evaluation runs against: the cached type model, the caller's environment hooks, %variables and the clock.

use std::cell::{Cell, RefCell};
use foldhash::HashMap;
use std::rc::Rc;

use super::temporal::Temporal;
use super::value::{Node, Value};
use super::{ChildElement, TypeModel};
use crate::json::Json;

/// A model that knows no types: every node is typed from its JSON alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoModel;

impl TypeModel for NoModel {
    fn child(&self, _parent: &str, _name: &str) -> Option<ChildElement> {
        None
    }
    fn base_type(&self, _type_name: &str) -> Option<String> {
        None
    }
}

/// A declared child element, with type names shared instead of copied per node.
#[derive(Debug)]
pub(crate) struct ChildInfo {
    pub types: Vec<Rc<str>>,
    pub is_choice: bool,
}

type ChildMap = HashMap<Box<str>, Option<Rc<ChildInfo>>>;

/// A type's ancestors, nearest first.
type Lineage = Rc<[Rc<str>]>;

/// The memoized answers of one model, which a caller may keep beyond one [`TypeCache`] (see
/// [`TypeCache::with_memo`]).
#[derive(Default)]
pub struct TypeMemo {
    children: RefCell<HashMap<Box<str>, ChildMap>>,
    bases: RefCell<HashMap<Box<str>, Option<Rc<str>>>>,
    /// Each type's ancestors, nearest first, for `is_a` in one lookup.
    lineages: RefCell<HashMap<Box<str>, Lineage>>,
    /// Whether the model knows any resource type, asked for every type test.
    populated: Cell<Option<bool>>,
    /// How many answers the maps above hold, counted as they are added: summing them would
    /// touch every entry.
    size: Cell<usize>,
}

/// A [`TypeModel`] with memoized answers.
///
/// The model returns owned `String`s; asking it for every navigation step would allocate on
/// every step of every evaluation. Create one per thread and reuse it across evaluations.
pub struct TypeCache<'m> {
    model: &'m dyn TypeModel,
    memo: Rc<TypeMemo>,
}

impl<'m> TypeCache<'m> {
    pub fn new(model: &'m dyn TypeModel) -> TypeCache<'m> {
        TypeCache { model, memo: Rc::default() }
    }

    /// A cache that continues `memo`, which must hold answers of this same model (and the
    /// model must not have changed since): for callers that create many short-lived caches.
    pub fn with_memo(model: &'m dyn TypeModel, memo: Rc<TypeMemo>) -> TypeCache<'m> {
        TypeCache { model, memo }
    }

    /// How many answers are memoized, for callers that keep a memo and must bound it (names
    /// come from the data being evaluated, too).
    pub fn memo_size(&self) -> usize {
        self.memo.size.get()
    }

    /// The answers memoized so far, to hand to [`TypeCache::with_memo`].
    pub fn memo(&self) -> Rc<TypeMemo> {
        self.memo.clone()
    }

    pub fn model(&self) -> &'m dyn TypeModel {
        self.model
    }

    /// Whether the model knows FHIR's types at all (an empty model types nodes from JSON only).
    pub(crate) fn populated(&self) -> bool {
        if let Some(known) = self.memo.populated.get() {
            return known;
        }
        let known = self.knows_type("Patient");
        self.memo.populated.set(Some(known));
        known
    }

    pub(crate) fn child(&self, parent: &str, name: &str) -> Option<Rc<ChildInfo>> {
        if let Some(hit) = self.memo.children.borrow().get(parent).and_then(|m| m.get(name)) {
            return hit.clone();
        }
        let info = self.model.child(parent, name).map(|c| {
            let types = c.types.iter().map(|t| Rc::from(fhir_type_name(t, name, self.is_a(parent, "Resource")))).collect();
            Rc::new(ChildInfo { types, is_choice: c.is_choice })
        });
        self.memo.size.set(self.memo.size.get() + 1);
        self.memo.children.borrow_mut().entry(parent.into()).or_default().insert(name.into(), info.clone());
        info
    }

    pub(crate) fn base(&self, type_name: &str) -> Option<Rc<str>> {
        if let Some(hit) = self.memo.bases.borrow().get(type_name) {
            return hit.clone();
        }
        let base = self.model.base_type(type_name).map(|b| Rc::from(b.as_str()));
        self.memo.size.set(self.memo.size.get() + 1);
        self.memo.bases.borrow_mut().insert(type_name.into(), base.clone());
        base
    }

    /// Whether `type_name` is `ancestor` or derives from it.
    pub(crate) fn is_a(&self, type_name: &str, ancestor: &str) -> bool {
        type_name == ancestor || self.lineage(type_name).iter().any(|t| &**t == ancestor)
    }

    fn lineage(&self, type_name: &str) -> Lineage {
        if let Some(hit) = self.memo.lineages.borrow().get(type_name) {
            return hit.clone();
        }
        let mut lineage = Vec::new();
        let mut current = self.base(type_name);
        // Bounded against cyclic models.
        while let Some(t) = current
            && lineage.len() < 32
        {
            current = self.base(&t);
            lineage.push(t);
        }
        let lineage: Lineage = lineage.into();
        self.memo.size.set(self.memo.size.get() + 1);
        self.memo.lineages.borrow_mut().insert(type_name.into(), lineage.clone());
        lineage
    }

    /// Whether the model knows the FHIR type (used to reject `as(string1)`).
    pub(crate) fn knows_type(&self, type_name: &str) -> bool {
        matches!(type_name, "Element" | "Resource" | "Base" | "BackboneElement" | "DomainResource")
            || super::value::fhir_primitive_kind(type_name).is_some()
            || self.base(type_name).is_some()
    }
}

/// The FHIR type name for a declared type code: R4 declares `id`, `Extension.url` etc. with
/// FHIRPath System type URLs; the FHIR type is what `is`/`type()` report. A resource's `id` is
/// of type `id` (the specification's own statement, which the R4 snapshots express as System.String).
fn fhir_type_name<'t>(code: &'t str, element: &str, parent_is_resource: bool) -> &'t str {
    if element == "id" && parent_is_resource {
        return "id";
    }
    super::fhir_primitive_for_system_type(code).unwrap_or(code)
}

/// Hooks the host application supplies; every method has a usable default.
pub trait Environment<'a> {
    /// A `%name` constant not built in (`%resource`, `%ucum`, `%vs-…`, … are handled before this).
    fn constant(&self, _name: &str) -> Option<Vec<Value<'a>>> {
        None
    }

    /// Resolves a reference string (`Patient/1`, `urn:uuid:…`) to a node, e.g. within the Bundle
    /// being validated. Contained references (`#id`) are resolved by the engine before this is asked.
    fn resolve(&self, _reference: &str) -> Option<Node<'a>> {
        None
    }

    /// `memberOf(valueSet)`: `Ok(None)` when membership cannot be determined (the result is empty).
    fn member_of(&self, _value: &Value<'a>, _value_set: &str) -> Result<Option<bool>, String> {
        Ok(None)
    }

    /// `subsumes` / `subsumedBy`: `Ok(None)` when unknown.
    fn subsumes(&self, _a: &Value<'a>, _b: &Value<'a>) -> Result<Option<bool>, String> {
        Ok(None)
    }

    /// `conformsTo(profile)`. The default accepts only core profiles
    /// (`http://hl7.org/fhir/StructureDefinition/Type`) and checks the node's type; anything else
    /// is an error because it cannot be checked here.
    fn conforms_to(&self, node: &Node<'a>, profile: &str, types: &TypeCache<'_>) -> Result<bool, String> {
        match profile.strip_prefix("http://hl7.org/fhir/StructureDefinition/") {
            Some(type_name) if !type_name.is_empty() && type_name.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Ok(types.is_a(&node.type_name(), type_name))
            }
            _ => Err(format!("cannot check conformance to unknown profile '{profile}'")),
        }
    }

    /// `htmlChecks()`: whether narrative XHTML is acceptable. The default accepts everything.
    fn html_checks(&self, _node: &Node<'a>) -> bool {
        true
    }

    /// Receives `trace(name)` output. The default discards it.
    fn trace(&self, _name: &str, _values: &[Value<'a>]) {}
}

/// The environment with all defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultEnvironment;

impl Environment<'_> for DefaultEnvironment {}

static DEFAULT_ENV: DefaultEnvironment = DefaultEnvironment;

/// Everything one evaluation needs besides the expression and its input.
pub struct Context<'a> {
    pub(crate) types: &'a TypeCache<'a>,
    pub(crate) env: &'a dyn Environment<'a>,
    pub(crate) resource: Option<Node<'a>>,
    pub(crate) root_resource: Option<Node<'a>>,
    pub(crate) context: Option<Node<'a>>,
    pub(crate) variables: Vec<(Box<str>, Vec<Value<'a>>)>,
    pub(crate) now: Option<Temporal>,
    pub(crate) strict: bool,
}

impl<'a> Context<'a> {
    pub fn new(types: &'a TypeCache<'a>) -> Context<'a> {
        Context {
            types,
            env: &DEFAULT_ENV,
            resource: None,
            root_resource: None,
            context: None,
            variables: Vec::new(),
            now: None,
            strict: false,
        }
    }

    pub fn with_environment(mut self, env: &'a dyn Environment<'a>) -> Self {
        self.env = env;
        self
    }

    /// `%resource` (defaults to the input node when it is a resource).
    pub fn with_resource(mut self, resource: Node<'a>) -> Self {
        self.resource = Some(resource);
        self
    }

    /// `%rootResource` (defaults to `%resource`), e.g. the Bundle or container of a contained resource.
    pub fn with_root_resource(mut self, root: Node<'a>) -> Self {
        self.root_resource = Some(root);
        self
    }

    /// `%context` (defaults to the input node).
    pub fn with_context_node(mut self, node: Node<'a>) -> Self {
        self.context = Some(node);
        self
    }

    /// A user variable `%name`.
    pub fn with_variable(mut self, name: &str, values: Vec<Value<'a>>) -> Self {
        self.variables.push((name.into(), values));
        self
    }

    /// Fixes the moment `now()`, `today()` and `timeOfDay()` report (otherwise the system clock, in UTC).
    pub fn with_now(mut self, now: Temporal) -> Self {
        self.now = Some(now);
        self
    }

    /// Strict mode: navigating to an element the model does not define on a known type, or a
    /// type-name prefix that does not match the input, is an error instead of an empty result.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    pub fn types(&self) -> &'a TypeCache<'a> {
        self.types
    }
}

/// The URL a `%vs-name` or `%ext-name` constant stands for, and the other built-in constants.
pub(crate) fn builtin_constant(name: &str) -> Option<String> {
    Some(match name {
        "ucum" => "http://unitsofmeasure.org".to_string(),
        "sct" => "http://snomed.info/sct".to_string(),
        "loinc" => "http://loinc.org".to_string(),
        _ => {
            if let Some(vs) = name.strip_prefix("vs-") {
                format!("http://hl7.org/fhir/ValueSet/{vs}")
            } else if let Some(ext) = name.strip_prefix("ext-") {
                format!("http://hl7.org/fhir/StructureDefinition/{ext}")
            } else {
                return None;
            }
        }
    })
}

/// Finds `#id` among the `contained` resources of `container`.
pub(crate) fn find_contained<'a>(container: &Node<'a>, id: &str) -> Option<Node<'a>> {
    let contained = container.json?.get("contained")?.as_array()?;
    contained.iter().find(|r| r.get("id").and_then(Json::as_str) == Some(id)).map(Node::resource)
}
