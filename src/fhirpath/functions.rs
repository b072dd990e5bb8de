//! The FHIRPath function library: existence, filtering, subsetting, conversion, string, math, tree, type and FHIR-specific functions.

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use std::cmp::Ordering;
use std::collections::HashSet;
use std::rc::Rc;

use super::EvalError;
use super::ast::{Call, Expr, ExprKind, Func, UnaryOp};
use super::context::find_contained;
use super::eval::{Collection, Evaluator, Focus, R, contains, err, singleton, to_bool, union};
use super::quantity::{Quantity, calendar_keyword};
use super::temporal::{Temporal, TemporalKind};
use super::value::{self, Node, Prim, Str, Value};
use crate::json::Json;

/// Upper bound on items `repeat()`/`descendants()` may produce, against runaway expressions.
const MAX_ITEMS: usize = 1_000_000;

/// Upper bound on System values `repeat()` may produce: each new one is compared with all
/// before it, so `repeat($this + 1)` must stop long before `MAX_ITEMS`.
const MAX_REPEAT_VALUES: usize = 10_000;

fn boolean<'a>(b: bool) -> Collection<'a> {
    vec![Value::Boolean(b)]
}

fn opt<'a>(v: Option<Value<'a>>) -> Collection<'a> {
    v.into_iter().collect()
}

impl<'c, 'a> Evaluator<'c, 'a> {
    pub(crate) fn call(&self, call: &Call, input: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        let owned;
        let coll: &[Value<'a>] = match &call.target {
            Some(t) => {
                owned = self.eval(t, input, focus)?;
                &owned
            }
            None => input,
        };
        // Ordinary arguments are evaluated against the same input as the call expression itself.
        let arg = |i: usize| -> R<Collection<'a>> {
            match call.args.get(i) {
                Some(a) => self.eval(a, input, focus),
                None => Ok(Vec::new()),
            }
        };
        let func = call.func;
        Ok(match func {
            Func::Empty => boolean(coll.is_empty()),
            Func::Exists => match call.args.first() {
                None => boolean(!coll.is_empty()),
                Some(criteria) => {
                    let mut any = false;
                    for (i, item) in coll.iter().enumerate() {
                        if self.lambda_bool(criteria, item, i, focus)? == Some(true) {
                            any = true;
                            break;
                        }
                    }
                    boolean(any)
                }
            },
            Func::All => {
                let mut all = true;
                for (i, item) in coll.iter().enumerate() {
                    if self.lambda_bool(&call.args[0], item, i, focus)? != Some(true) {
                        all = false;
                        break;
                    }
                }
                boolean(all)
            }
            Func::AllTrue | Func::AnyTrue | Func::AllFalse | Func::AnyFalse => {
                let mut bools = Vec::with_capacity(coll.len());
                for v in coll {
                    match v.prim() {
                        Prim::Bool(b) => bools.push(b),
                        _ => return err(format!("{}() needs Booleans, got {v}", func.name())),
                    }
                }
                boolean(match func {
                    Func::AllTrue => bools.iter().all(|b| *b),
                    Func::AnyTrue => bools.iter().any(|b| *b),
                    Func::AllFalse => bools.iter().all(|b| !*b),
                    _ => bools.iter().any(|b| !*b),
                })
            }
            Func::SubsetOf => {
                let other = arg(0)?;
                boolean(coll.iter().all(|v| contains(&other, v)))
            }
            Func::SupersetOf => {
                let other = arg(0)?;
                boolean(other.iter().all(|v| contains(coll, v)))
            }
            Func::Count => vec![Value::Integer(coll.len() as i64)],
            Func::Distinct => union(coll.to_vec(), Vec::new()),
            Func::IsDistinct => boolean(union(coll.to_vec(), Vec::new()).len() == coll.len()),
            Func::Where => {
                let mut out = Vec::new();
                for (i, item) in coll.iter().enumerate() {
                    if self.lambda_bool(&call.args[0], item, i, focus)? == Some(true) {
                        out.push(item.clone());
                    }
                }
                out
            }
            Func::Select => {
                let mut out = Vec::new();
                for (i, item) in coll.iter().enumerate() {
                    out.extend(self.lambda(&call.args[0], item, i, focus)?);
                }
                out
            }
            Func::Repeat => self.repeat(&call.args[0], coll, focus)?,
            Func::OfType => {
                let spec = call.type_arg.as_ref().ok_or_else(|| EvalError::new("ofType needs a type"))?;
                self.filter_type(coll, spec)?
            }
            Func::As if coll.len() > 1 && !self.ctx.strict => {
                // R4's own invariants (dom-3: `descendants().as(canonical)`) apply as() to whole
                // collections, so outside strict mode it filters like ofType() instead of failing.
                let spec = call.type_arg.as_ref().ok_or_else(|| EvalError::new("as needs a type"))?;
                self.filter_type(coll, spec)?
            }
            Func::Is | Func::As => {
                let spec = call.type_arg.as_ref().ok_or_else(|| EvalError::new("is/as needs a type"))?;
                match singleton(coll)? {
                    None => Vec::new(),
                    Some(v) if func == Func::Is => boolean(self.is_type(v, spec, false)?),
                    Some(v) => {
                        if self.is_type(v, spec, true)? {
                            vec![v.clone()]
                        } else {
                            Vec::new()
                        }
                    }
                }
            }
            Func::Single => opt(singleton(coll)?.cloned()),
            Func::First => opt(coll.first().cloned()),
            Func::Last => opt(coll.last().cloned()),
            Func::Tail => coll.iter().skip(1).cloned().collect(),
            Func::Skip | Func::Take => {
                let n = match singleton(&arg(0)?)?.map(Value::prim) {
                    Some(Prim::Int(n)) => n,
                    None => return Ok(Vec::new()),
                    Some(_) => return err(format!("{}() needs an integer", func.name())),
                };
                let n = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
                if func == Func::Skip {
                    coll.iter().skip(n).cloned().collect()
                } else {
                    coll.iter().take(n).cloned().collect()
                }
            }
            Func::Intersect => {
                let other = arg(0)?;
                let mut out: Collection<'a> = Vec::new();
                for v in coll {
                    if contains(&other, v) && !contains(&out, v) {
                        out.push(v.clone());
                    }
                }
                out
            }
            Func::Exclude => {
                let other = arg(0)?;
                coll.iter().filter(|v| !contains(&other, v)).cloned().collect()
            }
            Func::Union => union(coll.to_vec(), arg(0)?),
            Func::Combine => {
                let mut out = coll.to_vec();
                out.extend(arg(0)?);
                out
            }
            Func::Iif => self.iif(call, coll, input, focus)?,
            Func::Trace => {
                let name = arg(0)?;
                let name = singleton(&name)?.and_then(Value::as_str).unwrap_or("").to_string();
                match call.args.get(1) {
                    Some(projection) => {
                        let mut projected = Vec::new();
                        for (i, item) in coll.iter().enumerate() {
                            projected.extend(self.lambda(projection, item, i, focus)?);
                        }
                        self.ctx.env.trace(&name, &projected);
                    }
                    None => self.ctx.env.trace(&name, coll),
                }
                coll.to_vec()
            }
            Func::Aggregate => {
                let init = arg(1)?;
                let mut total = Rc::new(init);
                for (i, item) in coll.iter().enumerate() {
                    let f = Focus { this: Some(item.clone()), index: Some(i), total: Some(total.clone()) };
                    total = Rc::new(self.eval(&call.args[0], std::slice::from_ref(item), &f)?);
                }
                Rc::try_unwrap(total).unwrap_or_else(|rc| (*rc).clone())
            }
            Func::Sort => self.sort(call, coll, focus)?,
            Func::Not => match to_bool(coll)? {
                None => Vec::new(),
                Some(b) => boolean(!b),
            },
            Func::Children => {
                let mut out = Vec::new();
                for v in coll {
                    if let Value::Node(n) = v {
                        self.all_children(n, &mut out);
                    }
                }
                out
            }
            Func::Descendants => self.descendants(coll)?,
            Func::Type => coll
                .iter()
                .map(|v| {
                    let (namespace, name) = v.type_name();
                    let name = if name.contains('.') { "BackboneElement".to_string() } else { name.into_owned() };
                    Value::TypeInfo { namespace, name: Str::from(name) }
                })
                .collect(),
            Func::Now => vec![Value::Temporal(self.now())],
            Func::Today => vec![Value::Temporal(self.now().date_part())],
            Func::TimeOfDay => vec![Value::Temporal(self.now().time_part())],
            Func::Extension | Func::HasExtension => {
                let url = arg(0)?;
                let Some(url) = singleton(&url)?.and_then(Value::as_str).map(str::to_string) else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for v in coll {
                    let mut exts = Vec::new();
                    self.member(v, "extension", &mut exts)?;
                    for e in exts {
                        if e.as_node().and_then(|n| n.json).and_then(|j| j.get("url")).and_then(Json::as_str) == Some(url.as_str()) {
                            out.push(e);
                        }
                    }
                }
                if func == Func::HasExtension { boolean(!out.is_empty()) } else { out }
            }
            Func::HasValue => boolean(match singleton(coll).ok().flatten() {
                Some(Value::Node(n)) => n.json.is_some_and(|j| !matches!(j, Json::Object(_) | Json::Array(_) | Json::Null)),
                Some(_) => true,
                None => false,
            }),
            Func::GetValue => match singleton(coll)? {
                Some(v @ Value::Node(n)) if n.json.is_some_and(|j| !matches!(j, Json::Object(_))) => vec![v.to_system()],
                _ => Vec::new(),
            },
            Func::Resolve => self.resolve(coll),
            Func::Join => {
                let sep = arg(0)?;
                let sep = singleton(&sep)?.and_then(Value::as_str).unwrap_or("");
                join(coll, sep)?
            }
            Func::MemberOf => {
                let vs = arg(0)?;
                let (Some(v), Some(vs)) = (singleton(coll)?, singleton(&vs)?.and_then(Value::as_str)) else {
                    return Ok(Vec::new());
                };
                opt(self.ctx.env.member_of(v, vs).map_err(EvalError::new)?.map(Value::Boolean))
            }
            Func::Subsumes | Func::SubsumedBy => {
                let other = arg(0)?;
                let (Some(a), Some(b)) = (singleton(coll)?, singleton(&other)?) else { return Ok(Vec::new()) };
                let r = if func == Func::Subsumes { self.ctx.env.subsumes(a, b) } else { self.ctx.env.subsumes(b, a) };
                opt(r.map_err(EvalError::new)?.map(Value::Boolean))
            }
            Func::ConformsTo => {
                let url = arg(0)?;
                let (Some(v), Some(url)) = (singleton(coll)?, singleton(&url)?.and_then(Value::as_str)) else {
                    return Ok(Vec::new());
                };
                match v {
                    Value::Node(n) => boolean(self.ctx.env.conforms_to(n, url, self.ctx.types).map_err(EvalError::new)?),
                    _ => boolean(false),
                }
            }
            Func::HtmlChecks => match singleton(coll)? {
                Some(Value::Node(n)) => boolean(self.ctx.env.html_checks(n)),
                Some(_) => boolean(false),
                None => Vec::new(),
            },
            _ => {
                let Some(v) = singleton(coll)? else { return Ok(Vec::new()) };
                let args: Vec<Collection<'a>> = (0..call.args.len()).map(arg).collect::<R<_>>()?;
                self.scalar(call, v, &args)?
            }
        })
    }

    fn now(&self) -> Temporal {
        self.ctx.now.unwrap_or_else(Temporal::now_utc)
    }

    fn lambda(&self, e: &Expr, item: &Value<'a>, index: usize, outer: &Focus<'a>) -> R<Collection<'a>> {
        let f = Focus { this: Some(item.clone()), index: Some(index), total: outer.total.clone() };
        self.eval(e, std::slice::from_ref(item), &f)
    }

    fn lambda_bool(&self, e: &Expr, item: &Value<'a>, index: usize, outer: &Focus<'a>) -> R<Option<bool>> {
        to_bool(&self.lambda(e, item, index, outer)?)
    }

    fn iif(&self, call: &Call, coll: &[Value<'a>], input: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        // With a target, the branches see the target as input and `$this`.
        let inner_focus;
        let (input, focus) = if call.target.is_some() {
            if coll.len() > 1 {
                return err("iif() on a collection of more than one item");
            }
            inner_focus = Focus { this: coll.first().cloned(), index: None, total: focus.total.clone() };
            (coll, &inner_focus)
        } else {
            (input, focus)
        };
        let criterion = self.eval(&call.args[0], input, focus)?;
        let chosen = match singleton(&criterion)? {
            None => false,
            Some(v) => match v.prim() {
                Prim::Bool(b) => b,
                _ if self.ctx.strict => return err("iif() criterion is not a Boolean"),
                _ => true,
            },
        };
        if chosen {
            self.eval(&call.args[1], input, focus)
        } else {
            match call.args.get(2) {
                Some(e) => self.eval(e, input, focus),
                None => Ok(Vec::new()),
            }
        }
    }

    fn repeat(&self, e: &Expr, coll: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        let mut out: Collection<'a> = Vec::new();
        let mut seen_nodes: HashSet<(usize, usize)> = HashSet::new();
        let mut values = 0usize;
        let mut current: Collection<'a> = coll.to_vec();
        while !current.is_empty() {
            let mut next = Vec::new();
            for (i, item) in current.iter().enumerate() {
                for r in self.lambda(e, item, i, focus)? {
                    let new = match &r {
                        Value::Node(n) => seen_nodes.insert(node_key(n)),
                        other => {
                            values += 1;
                            if values > MAX_REPEAT_VALUES {
                                return err("repeat() produced too many values");
                            }
                            !contains(&out, other)
                        }
                    };
                    if new {
                        out.push(r.clone());
                        next.push(r);
                    }
                }
                if out.len() > MAX_ITEMS {
                    return err("repeat() produced too many items");
                }
            }
            current = next;
        }
        Ok(out)
    }

    fn descendants(&self, coll: &[Value<'a>]) -> R<Collection<'a>> {
        let mut out = Vec::new();
        let mut start = 0;
        for v in coll {
            if let Value::Node(n) = v {
                self.all_children(n, &mut out);
            }
        }
        while start < out.len() {
            let end = out.len();
            for i in start..end {
                if let Value::Node(n) = &out[i] {
                    let n = n.clone();
                    self.all_children(&n, &mut out);
                }
                if out.len() > MAX_ITEMS {
                    return err("descendants() produced too many items");
                }
            }
            start = end;
        }
        Ok(out)
    }

    fn sort(&self, call: &Call, coll: &[Value<'a>], focus: &Focus<'a>) -> R<Collection<'a>> {
        // Each key is an expression, optionally prefixed with '-' for descending order.
        let keys: Vec<(&Expr, bool)> = call
            .args
            .iter()
            .map(|a| match &a.kind {
                ExprKind::Unary(UnaryOp::Minus, inner) => (&**inner, true),
                _ => (a, false),
            })
            .collect();
        let mut rows: Vec<(Vec<Option<Value<'a>>>, Value<'a>)> = Vec::with_capacity(coll.len());
        for (i, item) in coll.iter().enumerate() {
            let mut row = Vec::with_capacity(keys.len().max(1));
            if keys.is_empty() {
                row.push(Some(item.clone()));
            }
            for (k, _) in &keys {
                let values = self.lambda(k, item, i, focus)?;
                row.push(singleton(&values)?.cloned());
            }
            rows.push((row, item.clone()));
        }
        let mut failure = None;
        let rows = merge_sort(rows, |(a, _), (b, _)| {
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                let descending = keys.get(k).is_some_and(|(_, d)| *d);
                let o = match (x, y) {
                    (None, None) => Ordering::Equal,
                    // Empty keys sort last (so first when descending).
                    (None, Some(_)) => Ordering::Greater,
                    (Some(_), None) => Ordering::Less,
                    (Some(x), Some(y)) => match value::compare(x, y) {
                        Ok(o) => o.unwrap_or(Ordering::Equal),
                        Err(e) => {
                            failure.get_or_insert(e);
                            Ordering::Equal
                        }
                    },
                };
                let o = if descending { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        if let Some(e) = failure {
            return err(e);
        }
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    fn resolve(&self, coll: &[Value<'a>]) -> Collection<'a> {
        let mut out = Vec::new();
        for v in coll {
            let reference: Option<&str> = match v {
                Value::Node(n) => match n.json {
                    Some(Json::String(s)) => Some(s),
                    Some(j @ Json::Object(_)) => j.get("reference").and_then(Json::as_str),
                    _ => None,
                },
                Value::String(s) => Some(s),
                _ => None,
            };
            let Some(reference) = reference else { continue };
            if let Some(id) = reference.strip_prefix('#') {
                let container = self.ctx.root_resource.clone().or_else(|| self.ctx.resource.clone()).or_else(|| {
                    self.root.first().and_then(Value::as_node).cloned()
                });
                if let Some(container) = container {
                    if id.is_empty() {
                        out.push(Value::Node(container));
                    } else if let Some(found) = find_contained(&container, id) {
                        out.push(Value::Node(found));
                    }
                }
                continue;
            }
            if let Some(n) = self.ctx.env.resolve(reference) {
                out.push(Value::Node(n));
            }
        }
        out
    }

    /// Functions on a single input item with evaluated arguments.
    fn scalar(&self, call: &Call, v: &Value<'a>, args: &[Collection<'a>]) -> R<Collection<'a>> {
        let func = call.func;
        let p = v.prim();
        let str_arg = |i: usize| -> R<Option<&str>> {
            match args.get(i).map(|a| singleton(a)).transpose()?.flatten() {
                None => Ok(None),
                Some(a) => a.as_str().map(Some).ok_or_else(|| EvalError::new(format!("{}() needs a string argument", func.name()))),
            }
        };
        let int_arg = |i: usize| -> R<Option<i64>> {
            match args.get(i).map(|a| singleton(a)).transpose()?.flatten().map(Value::prim) {
                None => Ok(None),
                Some(Prim::Int(n)) => Ok(Some(n)),
                Some(_) => err(format!("{}() needs an integer argument", func.name())),
            }
        };
        let input_str = || -> R<&str> {
            match &p {
                Prim::Str(s) => Ok(s),
                _ => err(format!("{}() needs a string input, got {}", func.name(), v.type_name().1)),
            }
        };
        let string = |s: String| vec![Value::string(s)];
        Ok(match func {
            // Conversions.
            Func::ToBoolean => opt(to_boolean(&p).map(Value::Boolean)),
            Func::ConvertsToBoolean => boolean(to_boolean(&p).is_some()),
            Func::ToInteger => opt(to_integer(&p).map(Value::Integer)),
            Func::ConvertsToInteger => boolean(to_integer(&p).is_some()),
            Func::ToDecimal => opt(to_decimal(&p).map(Value::Decimal)),
            Func::ConvertsToDecimal => boolean(to_decimal(&p).is_some()),
            Func::ToStringFn => opt(to_string(&p).map(Value::string)),
            Func::ConvertsToString => boolean(to_string(&p).is_some()),
            Func::ToDate => opt(to_temporal(&p, TemporalKind::Date).map(Value::Temporal)),
            Func::ConvertsToDate => boolean(to_temporal(&p, TemporalKind::Date).is_some()),
            Func::ToDateTime => opt(to_temporal(&p, TemporalKind::DateTime).map(Value::Temporal)),
            Func::ConvertsToDateTime => boolean(to_temporal(&p, TemporalKind::DateTime).is_some()),
            Func::ToTime => opt(to_temporal(&p, TemporalKind::Time).map(Value::Temporal)),
            Func::ConvertsToTime => boolean(to_temporal(&p, TemporalKind::Time).is_some()),
            Func::ToQuantity | Func::ConvertsToQuantity => {
                let mut q = to_quantity(&p);
                if let (Some(target), Some(quantity)) = (str_arg(0)?, &q) {
                    q = convert_quantity(quantity, target);
                }
                if func == Func::ToQuantity { opt(q.map(Value::Quantity)) } else { boolean(q.is_some()) }
            }
            // Strings.
            Func::IndexOf | Func::LastIndexOf => {
                let s = input_str()?;
                let Some(needle) = str_arg(0)? else { return Ok(Vec::new()) };
                let found = if func == Func::IndexOf { s.find(needle) } else { s.rfind(needle) };
                vec![Value::Integer(found.map_or(-1, |b| s[..b].chars().count() as i64))]
            }
            Func::Substring => {
                let s = input_str()?;
                let Some(start) = int_arg(0)? else { return Ok(Vec::new()) };
                let len = s.chars().count() as i64;
                if start < 0 || start >= len {
                    return Ok(Vec::new());
                }
                let take = match int_arg(1)? {
                    Some(n) => n.max(0),
                    None => len,
                };
                string(s.chars().skip(start as usize).take(usize::try_from(take).unwrap_or(usize::MAX)).collect())
            }
            Func::StartsWith | Func::EndsWith | Func::Contains => {
                let s = input_str()?;
                let Some(x) = str_arg(0)? else { return Ok(Vec::new()) };
                boolean(match func {
                    Func::StartsWith => s.starts_with(x),
                    Func::EndsWith => s.ends_with(x),
                    _ => s.contains(x),
                })
            }
            Func::Upper => string(input_str()?.to_uppercase()),
            Func::Lower => string(input_str()?.to_lowercase()),
            Func::Replace => {
                let s = input_str()?;
                let (Some(pattern), Some(with)) = (str_arg(0)?, str_arg(1)?) else { return Ok(Vec::new()) };
                string(s.replace(pattern, with))
            }
            Func::Matches | Func::MatchesFull => {
                let s = input_str()?;
                let Some(pattern) = str_arg(0)? else { return Ok(Vec::new()) };
                let re = self.regex(call, pattern, func == Func::MatchesFull)?;
                boolean(re.is_match(s))
            }
            Func::ReplaceMatches => {
                let s = input_str()?;
                let (Some(pattern), Some(with)) = (str_arg(0)?, str_arg(1)?) else { return Ok(Vec::new()) };
                if pattern.is_empty() {
                    return Ok(string(s.to_string()));
                }
                let re = self.regex(call, pattern, false)?;
                string(re.replace_all(s, with).into_owned())
            }
            Func::Length => vec![Value::Integer(input_str()?.chars().count() as i64)],
            Func::ToChars => input_str()?.chars().map(|c| Value::string(c.to_string())).collect(),
            Func::Split => {
                let s = input_str()?;
                let Some(sep) = str_arg(0)? else { return Ok(Vec::new()) };
                if sep.is_empty() {
                    s.chars().map(|c| Value::string(c.to_string())).collect()
                } else {
                    s.split(sep).map(Value::string).collect()
                }
            }
            Func::Trim => string(input_str()?.trim().to_string()),
            Func::Encode | Func::Decode | Func::Escape | Func::Unescape => {
                let s = input_str()?;
                let Some(format) = str_arg(0)? else { return Ok(Vec::new()) };
                let r = match func {
                    Func::Encode => encode(s.as_bytes(), format),
                    Func::Decode => decode(s, format).and_then(|b| String::from_utf8(b).ok()),
                    Func::Escape => escape(s, format),
                    _ => unescape(s, format),
                };
                opt(r.map(Value::string))
            }
            // Math.
            Func::Abs => vec![match p {
                Prim::Int(i) => Value::Integer(i.checked_abs().ok_or_else(|| EvalError::new("integer overflow"))?),
                Prim::Dec(d) => Value::Decimal(d.abs()),
                Prim::Quantity(q) => Value::Quantity(Quantity { value: q.value.abs(), unit: q.unit.clone() }),
                _ => return err("abs() needs a number"),
            }],
            Func::Ceiling | Func::Floor | Func::Truncate => {
                let d = number(&p, func)?;
                let r = match func {
                    Func::Ceiling => d.ceil(),
                    Func::Floor => d.floor(),
                    _ => d.trunc(),
                };
                vec![Value::Integer(r.to_i64().ok_or_else(|| EvalError::new("integer overflow"))?)]
            }
            Func::Round => {
                let d = number(&p, func)?;
                let places = int_arg(0)?.unwrap_or(0);
                if !(0..=28).contains(&places) {
                    return err("round() precision must be between 0 and 28");
                }
                vec![Value::Decimal(d.round_dp_with_strategy(places as u32, rust_decimal::RoundingStrategy::MidpointAwayFromZero))]
            }
            Func::Exp | Func::Ln | Func::Sqrt => {
                let x = number(&p, func)?.to_f64().unwrap_or(f64::NAN);
                let r = match func {
                    Func::Exp => x.exp(),
                    Func::Ln => x.ln(),
                    _ => x.sqrt(),
                };
                opt(from_f64(r).map(Value::Decimal))
            }
            Func::Log => {
                let x = number(&p, func)?.to_f64().unwrap_or(f64::NAN);
                let Some(base) = args.first().map(|a| singleton(a)).transpose()?.flatten() else { return Ok(Vec::new()) };
                let base = number(&base.prim(), func)?.to_f64().unwrap_or(f64::NAN);
                opt(from_f64(x.ln() / base.ln()).map(Value::Decimal))
            }
            Func::Power => {
                let Some(e) = args.first().map(|a| singleton(a)).transpose()?.flatten() else { return Ok(Vec::new()) };
                match (&p, e.prim()) {
                    (Prim::Int(b), Prim::Int(x)) if x >= 0 => {
                        opt(u32::try_from(x).ok().and_then(|x| b.checked_pow(x)).map(Value::Integer))
                    }
                    (_, ep) => {
                        let b = number(&p, func)?.to_f64().unwrap_or(f64::NAN);
                        let x = number(&ep, func)?.to_f64().unwrap_or(f64::NAN);
                        opt(from_f64(b.powf(x)).map(Value::Decimal))
                    }
                }
            }
            // Boundaries and precision.
            Func::LowBoundary | Func::HighBoundary => {
                let high = func == Func::HighBoundary;
                let digits = int_arg(0)?;
                match p {
                    Prim::Int(i) => opt(decimal_boundary(Decimal::from(i), digits, high).map(Value::Decimal)),
                    Prim::Dec(d) => opt(decimal_boundary(d, digits, high).map(Value::Decimal)),
                    Prim::Quantity(q) => opt(
                        decimal_boundary(q.value, digits, high).map(|value| Value::Quantity(Quantity { value, unit: q.unit.clone() })),
                    ),
                    Prim::Temporal(t) => opt(t.boundary(digits, high).map(Value::Temporal)),
                    _ => Vec::new(),
                }
            }
            Func::Precision => match p {
                Prim::Int(_) => vec![Value::Integer(0)],
                Prim::Dec(d) => vec![Value::Integer(i64::from(d.scale()))],
                Prim::Quantity(q) => vec![Value::Integer(i64::from(q.value.scale()))],
                Prim::Temporal(t) => vec![Value::Integer(t.digits())],
                Prim::Str(s) => vec![Value::Integer(s.chars().count() as i64)],
                _ => Vec::new(),
            },
            Func::Comparable => {
                let Some(other) = args.first().map(|a| singleton(a)).transpose()?.flatten() else { return Ok(Vec::new()) };
                match (p, other.prim()) {
                    (Prim::Quantity(a), Prim::Quantity(b)) => boolean(a.comparable(&b)),
                    _ => err("comparable() needs quantities")?,
                }
            }
            other => return err(format!("{}() is not supported here", other.name())),
        })
    }

    /// The compiled pattern; a literal one is borrowed from the expression, because a cloned
    /// `Regex` would start with empty matching caches on every call.
    fn regex<'e>(&self, call: &'e Call, pattern: &str, full: bool) -> R<std::borrow::Cow<'e, regex::Regex>> {
        let build = |pattern: &str| {
            let source = if full { format!("(?s)^(?:{pattern})$") } else { format!("(?s){pattern}") };
            regex::RegexBuilder::new(&source).size_limit(1 << 20).build()
        };
        // A literal pattern is compiled once and kept with the expression.
        if let Some(Expr { kind: ExprKind::String(literal), .. }) = call.args.first()
            && &**literal == pattern
        {
            let compiled = call.regex.get_or_init(|| build(pattern).ok()).as_ref();
            return compiled.map(std::borrow::Cow::Borrowed).ok_or_else(|| EvalError::new(format!("invalid regular expression '{pattern}'")));
        }
        build(pattern).map(std::borrow::Cow::Owned).map_err(|e| EvalError::new(format!("invalid regular expression '{pattern}': {e}")))
    }
}

/// A stable merge sort that tolerates an inconsistent comparator (mixed or partially comparable
/// keys), where `slice::sort_by` may panic.
fn merge_sort<T>(items: Vec<T>, mut cmp: impl FnMut(&T, &T) -> Ordering) -> Vec<T> {
    let mut runs: Vec<Vec<T>> = items.into_iter().map(|x| vec![x]).collect();
    while runs.len() > 1 {
        let mut merged = Vec::with_capacity(runs.len().div_ceil(2));
        let mut iter = runs.into_iter();
        while let Some(left) = iter.next() {
            let Some(right) = iter.next() else {
                merged.push(left);
                break;
            };
            let mut out = Vec::with_capacity(left.len() + right.len());
            let mut l = left.into_iter().peekable();
            let mut r = right.into_iter().peekable();
            loop {
                let take_right = match (l.peek(), r.peek()) {
                    (Some(a), Some(b)) => cmp(a, b) == Ordering::Greater,
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                    (None, None) => break,
                };
                out.extend(if take_right { r.next() } else { l.next() });
            }
            merged.push(out);
        }
        runs = merged;
    }
    runs.pop().unwrap_or_default()
}

/// A stable identity for a node, so `repeat()` can tell revisited nodes apart cheaply.
fn node_key(n: &Node<'_>) -> (usize, usize) {
    let addr = |j: Option<&Json>| j.map_or(0, |j| j as *const Json as usize);
    (addr(n.json), addr(n.ext))
}

fn number(p: &Prim<'_>, func: Func) -> R<Decimal> {
    match p {
        Prim::Int(i) => Ok(Decimal::from(*i)),
        Prim::Dec(d) => Ok(*d),
        _ => err(format!("{}() needs a number", func.name())),
    }
}

/// Converts a float result to a decimal through its shortest text, so `4.0` stays exactly 4.
fn from_f64(x: f64) -> Option<Decimal> {
    if !x.is_finite() {
        return None;
    }
    let text = format!("{x}");
    text.parse::<Decimal>().ok().or_else(|| Decimal::from_f64(x))
}

fn to_boolean(p: &Prim<'_>) -> Option<bool> {
    match p {
        Prim::Bool(b) => Some(*b),
        Prim::Int(1) => Some(true),
        Prim::Int(0) => Some(false),
        Prim::Dec(d) if *d == Decimal::ONE => Some(true),
        Prim::Dec(d) if d.is_zero() => Some(false),
        Prim::Str(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(true),
            "false" | "f" | "no" | "n" | "0" | "0.0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn is_integer_text(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_decimal_text(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    match body.split_once('.') {
        Some((i, f)) => is_integer_text(i) && !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()),
        None => is_integer_text(body),
    }
}

fn to_integer(p: &Prim<'_>) -> Option<i64> {
    match p {
        Prim::Int(i) => Some(*i),
        Prim::Bool(b) => Some(i64::from(*b)),
        Prim::Str(s) if is_integer_text(s) => s.parse().ok(),
        _ => None,
    }
}

fn to_decimal(p: &Prim<'_>) -> Option<Decimal> {
    match p {
        Prim::Int(i) => Some(Decimal::from(*i)),
        Prim::Dec(d) => Some(*d),
        Prim::Bool(b) => Some(if *b { Decimal::ONE } else { Decimal::ZERO }),
        Prim::Str(s) if is_decimal_text(s) => s.parse().ok(),
        _ => None,
    }
}

fn to_string(p: &Prim<'_>) -> Option<String> {
    Some(match p {
        Prim::Bool(b) => b.to_string(),
        Prim::Str(s) => s.to_string(),
        Prim::Int(i) => i.to_string(),
        Prim::Dec(d) => d.to_string(),
        Prim::Temporal(t) => t.to_iso(),
        Prim::Quantity(q) => q.to_literal(),
        Prim::Complex => return None,
    })
}

fn to_temporal(p: &Prim<'_>, kind: TemporalKind) -> Option<Temporal> {
    match (p, kind) {
        (Prim::Str(s), TemporalKind::Date) => {
            Temporal::parse_date(s).or_else(|| Temporal::parse_datetime(s, false).map(|t| t.date_part()))
        }
        (Prim::Str(s), TemporalKind::DateTime) => Temporal::parse_datetime(s, false),
        (Prim::Str(s), TemporalKind::Time) => Temporal::parse_time(s),
        (Prim::Temporal(t), TemporalKind::Date) if t.kind != TemporalKind::Time => Some(t.date_part()),
        (Prim::Temporal(t), TemporalKind::DateTime) if t.kind != TemporalKind::Time => Some(t.as_datetime()),
        (Prim::Temporal(t), TemporalKind::Time) if t.kind == TemporalKind::Time => Some(*t),
        _ => None,
    }
}

fn to_quantity(p: &Prim<'_>) -> Option<Quantity> {
    match p {
        Prim::Int(i) => Some(Quantity::new(Decimal::from(*i), "1")),
        Prim::Dec(d) => Some(Quantity::new(*d, "1")),
        Prim::Bool(b) => Some(Quantity::new(if *b { Decimal::new(10, 1) } else { Decimal::new(0, 1) }, "1")),
        Prim::Quantity(q) => Some(q.as_ref().clone()),
        Prim::Str(s) => parse_quantity_text(s),
        _ => None,
    }
}

/// Reads `5`, `5.0 'mg'` or `4 days`.
fn parse_quantity_text(s: &str) -> Option<Quantity> {
    let s = s.trim();
    let end = s.find(|c: char| c.is_whitespace() || c == '\'').unwrap_or(s.len());
    let (number, rest) = s.split_at(end);
    if !is_decimal_text(number) {
        return None;
    }
    let value: Decimal = number.parse().ok()?;
    let rest = rest.trim();
    if rest.is_empty() {
        return Some(Quantity::new(value, "1"));
    }
    if let Some(quoted) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return (!quoted.is_empty() && !quoted.contains('\'')).then(|| Quantity::new(value, quoted));
    }
    calendar_keyword(rest).map(|_| Quantity::new(value, rest))
}

fn convert_quantity(q: &Quantity, target: &str) -> Option<Quantity> {
    if &*q.unit == target {
        return Some(q.clone());
    }
    let unit = Quantity::new(Decimal::ONE, target);
    let (from_base, one_target_base) = q.common_values(&unit)?;
    Some(Quantity::new(from_base.checked_div(one_target_base)?.normalize(), target))
}

/// `lowBoundary`/`highBoundary` of a decimal: the value ± half a unit in its last digit, cut to
/// `digits` places (default 8). Positive values truncate the low side and round the high side;
/// negative values mirror that, which is what the conformance suite expects.
fn decimal_boundary(d: Decimal, digits: Option<i64>, high: bool) -> Option<Decimal> {
    let digits = digits.unwrap_or(8);
    if !(0..=28).contains(&digits) {
        return None;
    }
    let places = digits as u32;
    if d.is_sign_negative() && !d.is_zero() {
        return decimal_boundary(-d, Some(digits), !high).map(|b| -b);
    }
    let half = Decimal::new(5, d.scale().checked_add(1)?.min(28));
    let mut r = if high {
        d.checked_add(half)?.round_dp_with_strategy(places, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    } else {
        d.checked_sub(half)?.round_dp_with_strategy(places, rust_decimal::RoundingStrategy::ToZero)
    };
    r.rescale(places);
    Some(r)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn encode(bytes: &[u8], format: &str) -> Option<String> {
    match format {
        "hex" => Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        "base64" | "urlbase64" => {
            let table = if format == "base64" { BASE64 } else { BASE64_URL };
            let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
            for chunk in bytes.chunks(3) {
                let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
                for i in 0..4 {
                    if i <= chunk.len() {
                        out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            Some(out)
        }
        _ => None,
    }
}

fn decode(s: &str, format: &str) -> Option<Vec<u8>> {
    match format {
        "hex" => {
            if !s.len().is_multiple_of(2) {
                return None;
            }
            (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
        }
        "base64" | "urlbase64" => {
            let table = if format == "base64" { BASE64 } else { BASE64_URL };
            let mut out = Vec::new();
            let mut acc = 0u32;
            let mut bits = 0;
            for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
                let v = table.iter().position(|t| *t == c)? as u32;
                acc = (acc << 6) | v;
                bits += 6;
                if bits >= 8 {
                    bits -= 8;
                    out.push((acc >> bits) as u8);
                    acc &= (1 << bits) - 1;
                }
            }
            Some(out)
        }
        _ => None,
    }
}

fn escape(s: &str, format: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    match format {
        "html" => {
            for c in s.chars() {
                match c {
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '&' => out.push_str("&amp;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
        "json" => crate::json::escape_into(s, &mut out),
        _ => return None,
    }
    Some(out)
}

fn unescape(s: &str, format: &str) -> Option<String> {
    match format {
        "html" => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s;
            while let Some(i) = rest.find('&') {
                out.push_str(&rest[..i]);
                rest = &rest[i..];
                let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
                    out.push('&');
                    rest = &rest[1..];
                    continue;
                };
                let entity = &rest[1..end];
                let c = match entity {
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "amp" => Some('&'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    _ => entity
                        .strip_prefix("#x")
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                        .and_then(char::from_u32),
                };
                match c {
                    Some(c) => {
                        out.push(c);
                        rest = &rest[end + 1..];
                    }
                    None => {
                        out.push('&');
                        rest = &rest[1..];
                    }
                }
            }
            out.push_str(rest);
            Some(out)
        }
        "json" => {
            let mut out = String::with_capacity(s.len());
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => out.push(other),
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// `join()` needs the whole collection, so the evaluator calls this before the single-item dispatch.
pub(crate) fn join<'a>(coll: &[Value<'a>], sep: &str) -> R<Collection<'a>> {
    let mut out = String::new();
    for (i, v) in coll.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        match v.as_str() {
            Some(s) => out.push_str(s),
            None => return err("join() needs strings"),
        }
    }
    Ok(vec![Value::string(out)])
}
