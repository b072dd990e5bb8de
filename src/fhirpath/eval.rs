//! The evaluator: walks the expression tree over borrowed nodes, implementing navigation, operators and type tests.

use rust_decimal::Decimal;
use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::HashSet;
use std::rc::Rc;

use super::EvalError;
use super::ast::{BinaryOp, Expr, ExprKind, TypeOp, TypeSpec, UnaryOp};
use super::context::{Context, builtin_constant};
use super::quantity::Quantity;
use super::temporal::TemporalKind;
use super::value::{self, Node, Prim, Str, Value, fhir_primitive_kind};
use crate::json::Json;

/// Deepest recursion of the evaluator; the parser already bounds tree height, so this is a backstop.
const MAX_DEPTH: usize = 160;

pub(crate) type Collection<'a> = Vec<Value<'a>>;
pub(crate) type R<T> = Result<T, EvalError>;

/// `$this`, `$index` and `$total` for the expression being evaluated.
#[derive(Clone, Default)]
pub(crate) struct Focus<'a> {
    pub this: Option<Value<'a>>,
    pub index: Option<usize>,
    pub total: Option<Rc<Collection<'a>>>,
}

pub(crate) struct Evaluator<'c, 'a> {
    pub ctx: &'c Context<'a>,
    /// The collection the whole expression was evaluated on (`%context` by default).
    pub root: &'c [Value<'a>],
    depth: Cell<usize>,
    /// Results of the sub-expressions the analysis marked, by slot (errors are not kept, so
    /// they are reported again with their own position).
    memo: RefCell<Vec<Option<Collection<'a>>>>,
}

pub(crate) fn err<T>(message: impl Into<String>) -> R<T> {
    Err(EvalError::new(message))
}

impl<'c, 'a> Evaluator<'c, 'a> {
    pub fn new(ctx: &'c Context<'a>, root: &'c [Value<'a>], memo_slots: u32) -> Self {
        let memo = (0..memo_slots).map(|_| None).collect();
        Evaluator { ctx, root, depth: Cell::new(0), memo: RefCell::new(memo) }
    }

    pub fn eval(&self, e: &Expr, input: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        if let Some(slot) = e.memo
            && let Some(Some(hit)) = self.memo.borrow().get(slot as usize)
        {
            return Ok(hit.clone());
        }
        let depth = self.depth.get() + 1;
        if depth > MAX_DEPTH {
            return Err(EvalError::new("expression evaluation nested too deeply").at(e.pos));
        }
        self.depth.set(depth);
        let r = self.eval_inner(e, input, focus);
        self.depth.set(depth - 1);
        if let (Some(slot), Ok(values)) = (e.memo, &r)
            && let Some(cell) = self.memo.borrow_mut().get_mut(slot as usize)
        {
            *cell = Some(values.clone());
        }
        r.map_err(|error| if error.position.is_none() { error.at(e.pos) } else { error })
    }

    fn eval_inner(&self, e: &Expr, input: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        Ok(match &e.kind {
            ExprKind::Empty => Vec::new(),
            ExprKind::Boolean(b) => vec![Value::Boolean(*b)],
            ExprKind::String(s) => vec![Value::String(Str::Shared(s.clone()))],
            ExprKind::Integer(i) => vec![Value::Integer(*i)],
            ExprKind::Decimal(d) => vec![Value::Decimal(*d)],
            ExprKind::Temporal(t) => vec![Value::Temporal(*t)],
            ExprKind::Quantity(v, u) => vec![Value::Quantity(Quantity::new(*v, u))],
            ExprKind::Identifier(name) => self.identifier(name, input)?,
            ExprKind::Member(target, name) => {
                let items = self.eval(target, input, focus)?;
                let mut out = Vec::new();
                for item in &items {
                    self.member(item, name, &mut out)?;
                }
                out
            }
            ExprKind::Call(call) => self.call(call, input, focus)?,
            ExprKind::Index(target, index) => {
                let items = self.eval(target, input, focus)?;
                let index = self.eval(index, input, focus)?;
                match singleton(&index)?.map(Value::prim) {
                    None => Vec::new(),
                    Some(Prim::Int(i)) => usize::try_from(i).ok().and_then(|i| items.into_iter().nth(i)).into_iter().collect(),
                    Some(_) => return err("an index must be an integer"),
                }
            }
            ExprKind::This => focus.this.clone().into_iter().collect(),
            ExprKind::IndexVar => focus.index.map(|i| Value::Integer(i as i64)).into_iter().collect(),
            ExprKind::Total => focus.total.as_ref().map(|t| t.as_ref().clone()).unwrap_or_default(),
            ExprKind::External(name) => self.external(name)?,
            ExprKind::Unary(op, operand) => {
                let values = self.eval(operand, input, focus)?;
                match (op, singleton(&values)?) {
                    (_, None) => Vec::new(),
                    (UnaryOp::Plus, Some(v)) => match v.prim() {
                        Prim::Int(_) | Prim::Dec(_) | Prim::Quantity(_) => vec![v.to_system()],
                        _ => return err("unary '+' needs a number"),
                    },
                    (UnaryOp::Minus, Some(v)) => vec![negate(v)?],
                }
            }
            ExprKind::Binary(op, left, right) => self.binary(*op, left, right, input, focus)?,
            ExprKind::TypeOp(op, operand, spec) => {
                let values = self.eval(operand, input, focus)?;
                if *op == TypeOp::As && values.len() > 1 && !self.ctx.strict {
                    // As for the as() function: R4 search parameters write `useContext.value as Quantity`.
                    return self.filter_type(&values, spec);
                }
                let Some(v) = singleton(&values)? else { return Ok(Vec::new()) };
                match op {
                    TypeOp::Is => vec![Value::Boolean(self.is_type(v, spec, false)?)],
                    TypeOp::As => {
                        if self.is_type(v, spec, true)? {
                            vec![v.clone()]
                        } else {
                            Vec::new()
                        }
                    }
                }
            }
        })
    }

    fn external(&self, name: &str) -> R<Collection<'a>> {
        let ctx = self.ctx;
        let default_resource = || self.root.first().cloned();
        Ok(match name {
            "resource" => ctx.resource.clone().map(Value::Node).or_else(default_resource).into_iter().collect(),
            "rootResource" => ctx
                .root_resource
                .clone()
                .or_else(|| ctx.resource.clone())
                .map(Value::Node)
                .or_else(default_resource)
                .into_iter()
                .collect(),
            "context" => match &ctx.context {
                Some(n) => vec![Value::Node(n.clone())],
                None => self.root.to_vec(),
            },
            _ => {
                if let Some((_, values)) = ctx.variables.iter().find(|(n, _)| &**n == name) {
                    return Ok(values.clone());
                }
                if let Some(url) = builtin_constant(name) {
                    return Ok(vec![Value::string(url)]);
                }
                match ctx.env.constant(name) {
                    Some(values) => values,
                    None => return err(format!("unknown external constant '%{name}'")),
                }
            }
        })
    }

    /// An identifier at the start of a path: a type name matching the input, or a child element.
    fn identifier(&self, name: &str, input: &[Value<'a>]) -> R<Collection<'a>> {
        let mut out = Vec::new();
        let type_like = name.starts_with(|c: char| c.is_ascii_uppercase());
        for item in input {
            if type_like && let Value::Node(n) = item {
                if self.ctx.types.is_a(&n.type_name(), name) {
                    out.push(item.clone());
                    continue;
                }
                if self.ctx.strict && self.ctx.types.knows_type(&n.type_name()) {
                    return err(format!("'{name}' does not match the input type '{}'", n.type_name()));
                }
            }
            self.member(item, name, &mut out)?;
        }
        Ok(out)
    }

    /// Appends the children called `name` of one item.
    pub fn member(&self, item: &Value<'a>, name: &str, out: &mut Collection<'a>) -> R<()> {
        match item {
            Value::Node(n) => self.node_children(n, name, out),
            Value::TypeInfo { namespace, name: type_name } => {
                match name {
                    "namespace" => out.push(Value::String(Str::Borrowed(namespace))),
                    "name" => out.push(Value::String(type_name.clone())),
                    _ => {}
                }
                Ok(())
            }
            Value::Quantity(q) => {
                match name {
                    "value" => out.push(Value::Decimal(q.value)),
                    "unit" | "code" => out.push(Value::String(Str::Owned(q.unit.clone()))),
                    _ => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn node_children(&self, n: &Node<'a>, name: &str, out: &mut Collection<'a>) -> R<()> {
        let obj = match n.json {
            Some(Json::Object(o)) => o,
            // A primitive's children (id, extension) live in its `_name` sibling.
            _ => {
                if let Some(Json::Object(ext)) = n.ext {
                    let ty = match name {
                        "extension" => Some(Rc::from("Extension")),
                        "id" => Some(Rc::from("string")),
                        _ => None,
                    };
                    push_values(ext.get(name), None, ty, out);
                }
                return Ok(());
            }
        };
        let parent_type = n.type_name();
        let info = self.ctx.types.child(&parent_type, name);
        match info {
            Some(info) if info.is_choice => {
                for (key, value) in obj.iter() {
                    let Some(suffix) = key.strip_prefix(name) else { continue };
                    if let Some(t) = info.types.iter().find(|t| type_suffix_matches(suffix, t)) {
                        let ext = obj.iter().find(|(k, _)| k.strip_prefix('_') == Some(key)).map(|(_, v)| v);
                        push_values(Some(value), ext, Some(t.clone()), out);
                    }
                }
            }
            Some(info) => {
                let (value, ext) = find_pair(obj, name);
                let ty = info.types.first().cloned();
                push_values(value, ext, ty, out);
            }
            None => {
                let known_parent = self.ctx.types.knows_type(&parent_type);
                if known_parent && (self.ctx.strict || self.is_choice_spelling(&parent_type, name)) {
                    return err(format!("'{parent_type}' has no element '{name}'"));
                }
                let (value, ext) = find_pair(obj, name);
                if value.is_some() || ext.is_some() {
                    let ty = choice_type_from_key(name).map(Rc::from);
                    push_values(value, ext, ty, out);
                } else if !name.is_empty() {
                    // Without a model, `value` finds `valueQuantity` etc., typed from the suffix.
                    for (key, value) in obj.iter() {
                        if let Some(suffix) = key.strip_prefix(name)
                            && suffix.starts_with(|c: char| c.is_ascii_uppercase())
                        {
                            let ext = obj.iter().find(|(k, _)| k.strip_prefix('_') == Some(key)).map(|(_, v)| v);
                            push_values(Some(value), ext, Some(Rc::from(suffix_type(suffix))), out);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// All children of a node, for `children()` and `descendants()`.
    pub fn all_children(&self, n: &Node<'a>, out: &mut Collection<'a>) {
        let obj = match n.json {
            Some(Json::Object(o)) => o,
            _ => {
                if let Some(Json::Object(ext)) = n.ext {
                    for (key, value) in ext.iter() {
                        let ty = if key == "extension" { Rc::from("Extension") } else { Rc::from("string") };
                        push_values(Some(value), None, Some(ty), out);
                    }
                }
                return;
            }
        };
        let parent_type = n.type_name();
        // Most objects have no `_name` members; then no member needs its sibling looked up.
        let has_siblings = obj.iter().any(|(k, _)| k.starts_with('_'));
        for (key, value) in obj.iter() {
            if key == "resourceType" {
                continue;
            }
            if let Some(base) = key.strip_prefix('_') {
                if obj.get(base).is_none() {
                    let ty = self.child_type_for_key(&parent_type, base);
                    push_values(None, Some(value), ty, out);
                }
                continue;
            }
            let ext = if has_siblings { obj.iter().find(|(k, _)| k.strip_prefix('_') == Some(key)).map(|(_, v)| v) } else { None };
            let ty = self.child_type_for_key(&parent_type, key);
            push_values(Some(value), ext, ty, out);
        }
    }

    /// Whether `name` is the JSON spelling of a choice (`valueQuantity` for `value[x]`), which
    /// FHIRPath does not accept as a path step (write `value.ofType(Quantity)`).
    fn is_choice_spelling(&self, parent: &str, name: &str) -> bool {
        name.char_indices().any(|(i, c)| {
            c.is_ascii_uppercase()
                && i > 0
                && self.ctx.types.child(parent, &name[..i]).is_some_and(|info| {
                    info.is_choice && info.types.iter().any(|t| type_suffix_matches(&name[i..], t))
                })
        })
    }

    /// The type of the member spelled `key` in JSON (`valueQuantity` → `Quantity`).
    fn child_type_for_key(&self, parent: &str, key: &str) -> Option<Rc<str>> {
        if let Some(info) = self.ctx.types.child(parent, key)
            && !info.is_choice
        {
            return info.types.first().cloned();
        }
        for (i, c) in key.char_indices().rev() {
            if c.is_ascii_uppercase() && i > 0 {
                let (prefix, suffix) = key.split_at(i);
                if let Some(info) = self.ctx.types.child(parent, prefix)
                    && info.is_choice
                    && let Some(t) = info.types.iter().find(|t| type_suffix_matches(suffix, t))
                {
                    return Some(t.clone());
                }
            }
        }
        choice_type_from_key(key).map(Rc::from)
    }

    /// `is` (`exact == false`, follows inheritance) and `as`/`ofType` (`exact == true`: a primitive
    /// must be exactly the type, e.g. a `code` is not `as(string)`; complex types still follow inheritance).
    pub fn is_type(&self, v: &Value<'a>, spec: &TypeSpec, exact: bool) -> R<bool> {
        self.check_type_spec(spec)?;
        Ok(self.has_type(v, spec, exact))
    }

    /// `ofType()`, and `as` on several items: the items that are exactly of the type. The type
    /// name is checked once, and only when there are items (as when testing one at a time).
    pub fn filter_type(&self, items: &[Value<'a>], spec: &TypeSpec) -> R<Collection<'a>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.check_type_spec(spec)?;
        Ok(items.iter().filter(|v| self.has_type(v, spec, true)).cloned().collect())
    }

    /// Refuses type names the model does not know and unknown namespaces.
    fn check_type_spec(&self, spec: &TypeSpec) -> R<()> {
        let ns = spec.namespace.as_deref();
        let name = &*spec.name;
        if ns.is_some_and(|n| n != "System" && n != "FHIR") {
            return err(format!("unknown type namespace '{}'", ns.unwrap_or_default()));
        }
        let types = self.ctx.types;
        if ns != Some("System") && !is_system_type_name(name) && types.populated() && !types.knows_type(name) {
            return err(format!("unknown type '{name}'"));
        }
        Ok(())
    }

    /// `is` (`exact == false`) and `as`/`ofType` (`exact == true`) for a type already checked.
    fn has_type(&self, v: &Value<'a>, spec: &TypeSpec, exact: bool) -> bool {
        let ns = spec.namespace.as_deref();
        let name = &*spec.name;
        if ns == Some("System") && !is_system_type_name(name) {
            return false;
        }
        match v {
            Value::Node(n) => {
                if ns == Some("System") {
                    return false;
                }
                let t = n.type_name();
                let t = if t.contains('.') { "BackboneElement" } else { &t };
                if t == name {
                    true
                } else if exact && fhir_primitive_kind(t).is_some() {
                    false
                } else {
                    self.ctx.types.is_a(&n.type_name(), name)
                }
            }
            _ => ns != Some("FHIR") && v.type_name().1 == name,
        }
    }

    fn binary(&self, op: BinaryOp, left: &Expr, right: &Expr, input: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        let l = self.eval(left, input, focus)?;
        // Boolean operators skip the right side when the left decides.
        match op {
            BinaryOp::And | BinaryOp::Or | BinaryOp::Implies => {
                let a = to_bool(&l)?;
                let decided = match op {
                    BinaryOp::And => a == Some(false),
                    BinaryOp::Or => a == Some(true),
                    _ => a == Some(false),
                };
                if decided {
                    return Ok(vec![Value::Boolean(op != BinaryOp::And)]);
                }
                let b = to_bool(&self.eval(right, input, focus)?)?;
                let r = match op {
                    BinaryOp::And => match (a, b) {
                        (_, Some(false)) => Some(false),
                        (Some(true), Some(true)) => Some(true),
                        _ => None,
                    },
                    BinaryOp::Or => match (a, b) {
                        (_, Some(true)) => Some(true),
                        (Some(false), Some(false)) => Some(false),
                        _ => None,
                    },
                    _ => match (a, b) {
                        (_, Some(true)) => Some(true),
                        (Some(true), Some(false)) => Some(false),
                        _ => None,
                    },
                };
                return Ok(r.map(Value::Boolean).into_iter().collect());
            }
            _ => {}
        }
        let r = self.eval(right, input, focus)?;
        let boolean = |b: Option<bool>| Ok(b.map(Value::Boolean).into_iter().collect());
        match op {
            BinaryOp::Xor => match (to_bool(&l)?, to_bool(&r)?) {
                (Some(a), Some(b)) => boolean(Some(a != b)),
                _ => Ok(Vec::new()),
            },
            BinaryOp::Union => Ok(union(l, r)),
            BinaryOp::Eq => boolean(collection_equals(&l, &r)),
            BinaryOp::Ne => boolean(collection_equals(&l, &r).map(|b| !b)),
            BinaryOp::Equiv => boolean(Some(collection_equivalent(&l, &r))),
            BinaryOp::NotEquiv => boolean(Some(!collection_equivalent(&l, &r))),
            BinaryOp::In | BinaryOp::Contains => {
                let (item, coll) = if op == BinaryOp::In { (&l, &r) } else { (&r, &l) };
                match singleton(item)? {
                    None => Ok(Vec::new()),
                    Some(v) => boolean(Some(contains(coll, v))),
                }
            }
            BinaryOp::Lt | BinaryOp::Gt | BinaryOp::Le | BinaryOp::Ge => {
                let (Some(a), Some(b)) = (singleton(&l)?, singleton(&r)?) else { return Ok(Vec::new()) };
                let ord = value::compare(a, b).map_err(EvalError::new)?;
                boolean(ord.map(|o| match op {
                    BinaryOp::Lt => o == Ordering::Less,
                    BinaryOp::Gt => o == Ordering::Greater,
                    BinaryOp::Le => o != Ordering::Greater,
                    _ => o != Ordering::Less,
                }))
            }
            BinaryOp::Concat => {
                let text = |c: &Collection<'a>| -> R<String> {
                    match singleton(c)? {
                        None => Ok(String::new()),
                        Some(v) => v.as_str().map(str::to_string).ok_or_else(|| EvalError::new("'&' needs strings")),
                    }
                };
                Ok(vec![Value::string(text(&l)? + &text(&r)?)])
            }
            _ => {
                let (Some(a), Some(b)) = (singleton(&l)?, singleton(&r)?) else { return Ok(Vec::new()) };
                Ok(arithmetic(op, a, b)?.into_iter().collect())
            }
        }
    }
}

fn is_system_type_name(name: &str) -> bool {
    matches!(name, "Boolean" | "String" | "Integer" | "Decimal" | "Date" | "DateTime" | "Time" | "Quantity")
}

/// Pushes the node(s) for a member value and its `_name` sibling, aligning arrays by index.
fn push_values<'a>(value: Option<&'a Json>, ext: Option<&'a Json>, ty: Option<Rc<str>>, out: &mut Collection<'a>) {
    let node = |json: Option<&'a Json>, ext: Option<&'a Json>| {
        let json = json.filter(|j| !matches!(j, Json::Null));
        let ext = ext.filter(|j| matches!(j, Json::Object(_)));
        if json.is_none() && ext.is_none() {
            return None;
        }
        // Resources inside `contained`, `entry.resource` etc. are typed by their resourceType.
        let ty = match json.and_then(|j| j.get("resourceType")).and_then(Json::as_str) {
            Some(rt) if ty.as_deref().is_none_or(|t| matches!(t, "Resource" | "DomainResource")) => Some(Rc::from(rt)),
            _ => ty.clone(),
        };
        Some(Value::Node(Node { json, ext, ty }))
    };
    match (value, ext) {
        (Some(Json::Array(values)), ext) => {
            let exts = ext.and_then(Json::as_array).unwrap_or(&[]);
            for i in 0..values.len().max(exts.len()) {
                out.extend(node(values.get(i), exts.get(i)));
            }
        }
        (None, Some(Json::Array(exts))) => {
            for e in exts {
                out.extend(node(None, Some(e)));
            }
        }
        (value, ext) => out.extend(node(value, ext)),
    }
}

/// Finds `name` and `_name` in one pass over the members.
fn find_pair<'a>(obj: &'a crate::json::Object, name: &str) -> (Option<&'a Json>, Option<&'a Json>) {
    let mut value = None;
    let mut ext = None;
    for (k, v) in obj.iter() {
        if k == name {
            value = Some(v);
        } else if k.strip_prefix('_') == Some(name) {
            ext = Some(v);
        }
    }
    (value, ext)
}

/// Whether the JSON suffix `Quantity`/`String` spells type `Quantity`/`string`.
fn type_suffix_matches(suffix: &str, type_name: &str) -> bool {
    let (s, t) = (suffix.as_bytes(), type_name.as_bytes());
    !s.is_empty() && s.len() == t.len() && s[0].eq_ignore_ascii_case(&t[0]) && s[1..] == t[1..]
}

/// The FHIR type a choice suffix names: primitives start lower-case (`DateTime` → `dateTime`).
fn suffix_type(suffix: &str) -> String {
    let mut lower = String::with_capacity(suffix.len());
    let mut chars = suffix.chars();
    if let Some(c) = chars.next() {
        lower.push(c.to_ascii_lowercase());
        lower.extend(chars);
    }
    if fhir_primitive_kind(&lower).is_some() { lower } else { suffix.to_string() }
}

/// For an untyped key like `valueQuantity`, the type its suffix names (only for well-known choice prefixes).
fn choice_type_from_key(key: &str) -> Option<String> {
    let i = key.find(|c: char| c.is_ascii_uppercase())?;
    let (prefix, suffix) = key.split_at(i);
    matches!(prefix, "value" | "effective" | "onset" | "abatement" | "deceased" | "multipleBirth" | "occurrence" | "performed" | "timing" | "born" | "age" | "answer" | "defaultValue" | "fixed" | "pattern")
        .then(|| suffix_type(suffix))
}

/// The single item of a collection; more than one is an error.
pub(crate) fn singleton<'v, 'a>(c: &'v [Value<'a>]) -> R<Option<&'v Value<'a>>> {
    match c {
        [] => Ok(None),
        [v] => Ok(Some(v)),
        _ => err(format!("expected a single item, got {}", c.len())),
    }
}

/// Singleton evaluation of a collection as a Boolean: empty is unknown, one non-Boolean item is true.
pub(crate) fn to_bool(c: &[Value<'_>]) -> R<Option<bool>> {
    match singleton(c)? {
        None => Ok(None),
        Some(v) => match v.prim() {
            Prim::Bool(b) => Ok(Some(b)),
            _ => Ok(Some(true)),
        },
    }
}

pub(crate) fn contains(coll: &[Value<'_>], v: &Value<'_>) -> bool {
    coll.iter().any(|x| value::equals(x, v) == Some(true))
}

/// Below this many items, comparing pairwise is cheaper than hashing.
const HASH_DEDUPE_FROM: usize = 16;

pub(crate) fn union<'a>(a: Collection<'a>, b: Collection<'a>) -> Collection<'a> {
    if a.len() + b.len() >= HASH_DEDUPE_FROM
        && let Some(keep) = first_string_occurrences(a.iter().chain(&b))
    {
        let mut keep = keep.into_iter();
        return a.into_iter().chain(b).filter(|_| keep.next().unwrap_or(true)).collect();
    }
    let mut out: Collection<'a> = Vec::with_capacity(a.len() + b.len());
    for v in a.into_iter().chain(b) {
        if !contains(&out, &v) {
            out.push(v);
        }
    }
    out
}

/// For a collection of strings only (System strings and string-like FHIR primitives), which
/// items are the first of their value; `None` when some item is not a string. Two strings are
/// `=` exactly when their texts are equal, so this is the pairwise dedupe in linear time.
pub(crate) fn first_string_occurrences<'v, 'a: 'v>(items: impl Iterator<Item = &'v Value<'a>>) -> Option<Vec<bool>> {
    let mut seen: HashSet<&'v str> = HashSet::new();
    let mut keep = Vec::new();
    for v in items {
        match v.prim() {
            Prim::Str(s) => keep.push(seen.insert(s)),
            _ => return None,
        }
    }
    Some(keep)
}

fn collection_equals(a: &[Value<'_>], b: &[Value<'_>]) -> Option<bool> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    if a.len() != b.len() {
        return Some(false);
    }
    let mut result = Some(true);
    for (x, y) in a.iter().zip(b) {
        match value::equals(x, y) {
            Some(true) => {}
            Some(false) => return Some(false),
            None => result = None,
        }
    }
    result
}

fn collection_equivalent(a: &[Value<'_>], b: &[Value<'_>]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let found = b.iter().enumerate().find(|(i, y)| !used[*i] && value::equivalent(x, y));
        match found {
            Some((i, _)) => {
                used[i] = true;
                true
            }
            None => false,
        }
    })
}

fn negate<'a>(v: &Value<'a>) -> R<Value<'a>> {
    Ok(match v.prim() {
        Prim::Int(i) => Value::Integer(i.checked_neg().ok_or_else(|| EvalError::new("integer overflow"))?),
        // `-0.0` is just zero: keep the sign off so it prints as `0.0`.
        Prim::Dec(d) => Value::Decimal(if d.is_zero() { d } else { -d }),
        Prim::Quantity(q) => Value::Quantity(Quantity { value: -q.value, unit: q.unit.clone() }),
        _ => return err(format!("cannot negate {v}")),
    })
}

fn arithmetic<'a>(op: BinaryOp, a: &Value<'a>, b: &Value<'a>) -> R<Option<Value<'a>>> {
    let overflow = || EvalError::new("arithmetic overflow");
    let (pa, pb) = (a.prim(), b.prim());
    let dec = |p: &Prim<'_>| match p {
        Prim::Int(i) => Some(Decimal::from(*i)),
        Prim::Dec(d) => Some(*d),
        _ => None,
    };
    Ok(Some(match (op, &pa, &pb) {
        (BinaryOp::Add, Prim::Str(x), Prim::Str(y)) => Value::string(format!("{x}{y}")),
        (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::IntDiv | BinaryOp::Mod, Prim::Int(x), Prim::Int(y)) => {
            let (x, y) = (*x, *y);
            Value::Integer(match op {
                BinaryOp::Add => x.checked_add(y).ok_or_else(overflow)?,
                BinaryOp::Sub => x.checked_sub(y).ok_or_else(overflow)?,
                BinaryOp::Mul => x.checked_mul(y).ok_or_else(overflow)?,
                BinaryOp::IntDiv if y == 0 => return Ok(None),
                BinaryOp::IntDiv => x.checked_div(y).ok_or_else(overflow)?,
                _ if y == 0 => return Ok(None),
                _ => x.checked_rem(y).ok_or_else(overflow)?,
            })
        }
        (_, Prim::Int(_) | Prim::Dec(_), Prim::Int(_) | Prim::Dec(_)) => {
            let (Some(x), Some(y)) = (dec(&pa), dec(&pb)) else { return Ok(None) };
            match op {
                BinaryOp::Add => Value::Decimal(x.checked_add(y).ok_or_else(overflow)?),
                BinaryOp::Sub => Value::Decimal(x.checked_sub(y).ok_or_else(overflow)?),
                BinaryOp::Mul => Value::Decimal(x.checked_mul(y).ok_or_else(overflow)?),
                _ if y.is_zero() => return Ok(None),
                BinaryOp::Div => Value::Decimal(x.checked_div(y).ok_or_else(overflow)?.normalize_to_scale(x, y)),
                BinaryOp::IntDiv => {
                    let q = x.checked_div(y).ok_or_else(overflow)?.trunc();
                    Value::Integer(i64::try_from(q).map_err(|_| overflow())?)
                }
                BinaryOp::Mod => Value::Decimal(x.checked_rem(y).ok_or_else(overflow)?),
                _ => return err("unsupported operator on numbers"),
            }
        }
        (BinaryOp::Add | BinaryOp::Sub, Prim::Temporal(t), Prim::Quantity(q)) => {
            let Some(unit) = q.calendar_unit() else {
                return err(format!("cannot add '{}' to a date/time: not a calendar duration", q.unit));
            };
            let amount = q.value.trunc();
            let amount = i64::try_from(if op == BinaryOp::Sub { -amount } else { amount }).map_err(|_| overflow())?;
            let is_time_unit = matches!(unit, super::temporal::CalendarUnit::Year | super::temporal::CalendarUnit::Month | super::temporal::CalendarUnit::Week | super::temporal::CalendarUnit::Day);
            if t.kind == TemporalKind::Time && is_time_unit {
                return err("cannot add a date duration to a time");
            }
            Value::Temporal(t.add(amount, unit).ok_or_else(overflow)?)
        }
        (BinaryOp::Add | BinaryOp::Sub, Prim::Quantity(x), Prim::Quantity(y)) => {
            if x.unit != y.unit {
                let Some((cx, cy)) = x.common_values(y) else { return err("quantities with incompatible units") };
                // Express the result in the left unit: scale the right value by the conversion ratio.
                if cx.is_zero() && !x.value.is_zero() {
                    return Ok(None);
                }
                let ratio = if x.value.is_zero() { return Ok(None) } else { cx.checked_div(x.value).ok_or_else(overflow)? };
                let y_in_x = cy.checked_div(ratio).ok_or_else(overflow)?;
                let v = if op == BinaryOp::Add { x.value.checked_add(y_in_x) } else { x.value.checked_sub(y_in_x) };
                Value::Quantity(Quantity { value: v.ok_or_else(overflow)?, unit: x.unit.clone() })
            } else {
                let v = if op == BinaryOp::Add { x.value.checked_add(y.value) } else { x.value.checked_sub(y.value) };
                Value::Quantity(Quantity { value: v.ok_or_else(overflow)?, unit: x.unit.clone() })
            }
        }
        (BinaryOp::Mul, Prim::Quantity(x), Prim::Quantity(y)) => Value::Quantity(x.multiply(y).ok_or_else(overflow)?),
        (BinaryOp::Div, Prim::Quantity(x), Prim::Quantity(y)) => match x.divide(y) {
            Some(q) => Value::Quantity(q),
            None => return Ok(None),
        },
        (BinaryOp::Mul, Prim::Quantity(q), n) | (BinaryOp::Mul, n, Prim::Quantity(q)) if dec(n).is_some() => {
            let v = q.value.checked_mul(dec(n).unwrap_or_default()).ok_or_else(overflow)?;
            Value::Quantity(Quantity { value: v, unit: q.unit.clone() })
        }
        (BinaryOp::Div, Prim::Quantity(q), n) if dec(n).is_some() => {
            let d = dec(n).unwrap_or_default();
            if d.is_zero() {
                return Ok(None);
            }
            Value::Quantity(Quantity { value: q.value.checked_div(d).ok_or_else(overflow)?, unit: q.unit.clone() })
        }
        _ => return err(format!("operator not defined for {} and {}", a.type_name().1, b.type_name().1)),
    }))
}

trait DivScale {
    fn normalize_to_scale(self, x: Decimal, y: Decimal) -> Decimal;
}

impl DivScale for Decimal {
    /// Division results drop trailing zeros beyond the operands' own scale (`4.0 / 2.0` is `2.0`, not `2.0000…`).
    fn normalize_to_scale(self, x: Decimal, y: Decimal) -> Decimal {
        let n = self.normalize();
        let keep = x.scale().max(y.scale());
        if n.scale() < keep {
            let mut r = n;
            r.rescale(keep);
            r
        } else {
            n
        }
    }
}
