//! Static analysis of parsed expressions: sub-expressions worth computing once per evaluation, and which focus members an expression can observe.

use std::collections::HashMap;
use std::fmt::Write;

use super::ast::{BinaryOp, Call, Expr, ExprKind, Func, TypeOp};

/// Whether argument `i` of `call` is evaluated against something other than the call's own
/// input: the items of the target (`where`, `select`, …) or, for `iif` with a target, the target.
fn own_input(call: &Call, i: usize) -> bool {
    match call.func {
        Func::Exists | Func::All | Func::Where | Func::Select | Func::Repeat | Func::Sort => true,
        Func::Aggregate => i == 0,
        Func::Trace => i == 1,
        Func::Iif => call.target.is_some(),
        _ => false,
    }
}

/// Whether argument `i` of `call` may run once per item of the target (unlike `iif`'s branches).
fn per_item(call: &Call, i: usize) -> bool {
    own_input(call, i) && call.func != Func::Iif
}

/// Functions whose result is not determined by their input, arguments and the type model alone.
fn reads_more_than_items(func: Func) -> bool {
    // resolve() of `#id` looks in %rootResource; the clock functions read the clock.
    matches!(func, Func::Resolve | Func::Now | Func::Today | Func::TimeOfDay)
}

/// Whether `e`'s value can differ between two places in one evaluation: it reads the input at
/// its position (navigation, `$this`, functions applied to the input) or `$index`/`$total`, or it
/// has an effect that must happen each time (`trace`).
fn depends_on_position(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::Empty
        | ExprKind::Boolean(_)
        | ExprKind::String(_)
        | ExprKind::Integer(_)
        | ExprKind::Decimal(_)
        | ExprKind::Temporal(_)
        | ExprKind::Quantity(..)
        | ExprKind::External(_) => false,
        ExprKind::Identifier(_) | ExprKind::This | ExprKind::IndexVar | ExprKind::Total => true,
        ExprKind::Member(t, _) | ExprKind::Unary(_, t) | ExprKind::TypeOp(_, t, _) => depends_on_position(t),
        ExprKind::Index(a, b) | ExprKind::Binary(_, a, b) => depends_on_position(a) || depends_on_position(b),
        ExprKind::Call(c) => {
            if c.func == Func::Trace {
                return true;
            }
            match &c.target {
                None if !matches!(c.func, Func::Iif | Func::Now | Func::Today | Func::TimeOfDay) => return true,
                Some(t) if depends_on_position(t) => return true,
                _ => {}
            }
            c.args.iter().enumerate().any(|(i, a)| if own_input(c, i) { reads_outer_focus(a) } else { depends_on_position(a) })
        }
    }
}

/// For an argument run on its own input: whether it still sees the enclosing `$total` or traces.
fn reads_outer_focus(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::Total => true,
        ExprKind::Call(c) if c.func == Func::Trace => true,
        _ => children(e).any(reads_outer_focus),
    }
}

fn children(e: &Expr) -> impl Iterator<Item = &Expr> {
    let (a, b): (Option<&Expr>, Option<&Expr>) = match &e.kind {
        ExprKind::Member(t, _) | ExprKind::Unary(_, t) | ExprKind::TypeOp(_, t, _) => (Some(t), None),
        ExprKind::Index(l, r) | ExprKind::Binary(_, l, r) => (Some(l), Some(r)),
        ExprKind::Call(c) => (c.target.as_ref(), None),
        _ => (None, None),
    };
    let args: &[Expr] = match &e.kind {
        ExprKind::Call(c) => &c.args,
        _ => &[],
    };
    a.into_iter().chain(b).chain(args)
}

/// Literals and `%constants` cost less to evaluate than to look up.
fn is_trivial(e: &Expr) -> bool {
    matches!(
        e.kind,
        ExprKind::Empty
            | ExprKind::Boolean(_)
            | ExprKind::String(_)
            | ExprKind::Integer(_)
            | ExprKind::Decimal(_)
            | ExprKind::Temporal(_)
            | ExprKind::Quantity(..)
            | ExprKind::External(_)
    )
}

/// A text that two sub-expressions share exactly when they are written the same way (positions aside).
fn fingerprint(e: &Expr, out: &mut String) {
    let _ = match &e.kind {
        ExprKind::Empty => write!(out, "{{}}"),
        ExprKind::Boolean(b) => write!(out, "{b}"),
        ExprKind::String(s) => write!(out, "{s:?}"),
        ExprKind::Integer(i) => write!(out, "{i}i"),
        ExprKind::Decimal(d) => write!(out, "{d}d"),
        ExprKind::Temporal(t) => write!(out, "{t:?}"),
        ExprKind::Quantity(v, u) => write!(out, "{v}{u:?}"),
        ExprKind::Identifier(n) => write!(out, "`{n}`"),
        ExprKind::Member(t, n) => {
            fingerprint(t, out);
            write!(out, ".`{n}`")
        }
        ExprKind::Call(c) => {
            if let Some(t) = &c.target {
                fingerprint(t, out);
            }
            let _ = write!(out, ".{}(", c.func.name());
            if let Some(spec) = &c.type_arg {
                let _ = write!(out, "{spec:?}");
            }
            for a in &c.args {
                fingerprint(a, out);
                out.push(',');
            }
            write!(out, ")")
        }
        ExprKind::Index(t, i) => {
            fingerprint(t, out);
            out.push('[');
            fingerprint(i, out);
            write!(out, "]")
        }
        ExprKind::This => write!(out, "$this"),
        ExprKind::IndexVar => write!(out, "$index"),
        ExprKind::Total => write!(out, "$total"),
        ExprKind::External(n) => write!(out, "%`{n}`"),
        ExprKind::Unary(op, t) => {
            let _ = write!(out, "({op:?} ");
            fingerprint(t, out);
            write!(out, ")")
        }
        ExprKind::Binary(op, l, r) => {
            out.push('(');
            fingerprint(l, out);
            let _ = write!(out, " {op:?} ");
            fingerprint(r, out);
            write!(out, ")")
        }
        ExprKind::TypeOp(op, t, spec) => {
            out.push('(');
            fingerprint(t, out);
            write!(out, " {op:?} {spec:?})")
        }
    };
}

fn memo_candidate(e: &Expr) -> Option<String> {
    if is_trivial(e) || depends_on_position(e) {
        return None;
    }
    let mut text = String::new();
    fingerprint(e, &mut text);
    Some(text)
}

/// Marks the sub-expressions one evaluation should compute at most once, returning how many
/// slots they need: those that do not depend on their position (see [`depends_on_position`])
/// and either sit inside an argument run per item (`%resource.descendants()` inside `where`,
/// hoisted out of the loop) or occur more than once (dom-3 walks `%resource.descendants()` four
/// times). Such a sub-expression sees the same context, root and evaluator state wherever and
/// whenever it runs, so its first result is its result everywhere.
pub(crate) fn assign_memo_slots(root: &mut Expr) -> u32 {
    let mut counts: HashMap<String, u32> = HashMap::new();
    count_candidates(root, &mut counts);
    let mut slots: HashMap<String, u32> = HashMap::new();
    mark(root, false, &counts, &mut slots);
    u32::try_from(slots.len()).unwrap_or(u32::MAX)
}

fn count_candidates(e: &Expr, counts: &mut HashMap<String, u32>) {
    if let Some(text) = memo_candidate(e) {
        *counts.entry(text).or_default() += 1;
    }
    for c in children(e) {
        count_candidates(c, counts);
    }
}

fn mark(e: &mut Expr, repeated: bool, counts: &HashMap<String, u32>, slots: &mut HashMap<String, u32>) {
    let mut repeated = repeated;
    if let Some(text) = memo_candidate(e)
        && (repeated || counts.get(&text).is_some_and(|n| *n > 1))
    {
        let next = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        e.memo = Some(*slots.entry(text).or_insert(next));
        // Everything below now runs at most once per evaluation.
        repeated = false;
    }
    match &mut e.kind {
        ExprKind::Member(t, _) | ExprKind::Unary(_, t) | ExprKind::TypeOp(_, t, _) => mark(t, repeated, counts, slots),
        ExprKind::Index(l, r) | ExprKind::Binary(_, l, r) => {
            mark(l, repeated, counts, slots);
            mark(r, repeated, counts, slots);
        }
        ExprKind::Call(c) => {
            let call: &mut Call = c;
            if let Some(t) = &mut call.target {
                mark(t, repeated, counts, slots);
            }
            let flags: Vec<bool> = (0..call.args.len()).map(|i| per_item(call, i)).collect();
            for (a, each) in call.args.iter_mut().zip(flags) {
                mark(a, repeated || each, counts, slots);
            }
        }
        _ => {}
    }
}

/// The members of the focus an expression can observe, when it observes the focus in no other
/// way; `None` when it might (see below).
///
/// The guarantee: if none of the returned names is present on an object focus (neither `name`,
/// `_name`, nor a key starting with either, which covers choice spellings such as `valueString`),
/// the expression's result is the same as on an empty object of the same type, under any
/// context, as long as the context has no user `%variables`.
///
/// Proof sketch, by induction over the part of the tree evaluated against the focus (the "root
/// level"): the root-level identifiers navigate from the focus; their members are absent, so they
/// yield nothing in both evaluations (navigation errors depend on the type and name only).
/// Literals are equal. Operators, `is`/`as` and indexing combine equal operands into equal
/// results. A call with a target sees equal target results; its ordinary arguments are root level
/// (induction); an argument run on the target's items (`where`, `all`, …) either never runs
/// because its target is provably empty when the members are absent ([`empty_when_absent`]), or
/// is closed ([`is_closed`]): it reads only its items, which are equal. Everything that reads the
/// focus otherwise is refused: `$this`, functions applied to the input (`exists()` without a
/// target), type-name identifiers (`Patient.name`), `%resource`/`%context`/any `%constant` (the
/// focus may be the resource), `resolve()` and the clock.
pub(crate) fn focus_members(root: &Expr) -> Option<Vec<Box<str>>> {
    let mut names = Vec::new();
    root_level(root, &mut names).then_some(names)
}

fn root_level(e: &Expr, names: &mut Vec<Box<str>>) -> bool {
    match &e.kind {
        ExprKind::Empty
        | ExprKind::Boolean(_)
        | ExprKind::String(_)
        | ExprKind::Integer(_)
        | ExprKind::Decimal(_)
        | ExprKind::Temporal(_)
        | ExprKind::Quantity(..) => true,
        ExprKind::Identifier(name) => {
            if name.is_empty() || name.starts_with(|c: char| c.is_ascii_uppercase()) {
                return false;
            }
            if !names.contains(name) {
                names.push(name.clone());
            }
            true
        }
        ExprKind::External(_) | ExprKind::This | ExprKind::IndexVar | ExprKind::Total => false,
        ExprKind::Member(t, _) | ExprKind::Unary(_, t) | ExprKind::TypeOp(_, t, _) => root_level(t, names),
        ExprKind::Index(a, b) | ExprKind::Binary(_, a, b) => root_level(a, names) && root_level(b, names),
        ExprKind::Call(c) => {
            if reads_more_than_items(c.func) {
                return false;
            }
            match &c.target {
                None => c.func == Func::Iif && c.args.iter().all(|a| root_level(a, names)),
                Some(t) => {
                    root_level(t, names)
                        && c.args.iter().enumerate().all(|(i, a)| {
                            if own_input(c, i) {
                                (per_item(c, i) && empty_when_absent(t)) || is_closed(a)
                            } else {
                                root_level(a, names)
                            }
                        })
                }
            }
        }
    }
}

/// Whether a root-level expression yields nothing when the focus members it navigates are absent.
fn empty_when_absent(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::Identifier(_) => true,
        ExprKind::Member(t, _) | ExprKind::TypeOp(TypeOp::As, t, _) | ExprKind::Index(t, _) => empty_when_absent(t),
        ExprKind::Binary(BinaryOp::Union, a, b) => empty_when_absent(a) && empty_when_absent(b),
        ExprKind::Call(c) => {
            matches!(
                c.func,
                Func::Where
                    | Func::Select
                    | Func::Repeat
                    | Func::OfType
                    | Func::As
                    | Func::Single
                    | Func::First
                    | Func::Last
                    | Func::Tail
                    | Func::Skip
                    | Func::Take
                    | Func::Intersect
                    | Func::Exclude
                    | Func::Distinct
                    | Func::Children
                    | Func::Descendants
                    | Func::Trace
                    | Func::Extension
            ) && c.target.as_ref().is_some_and(empty_when_absent)
        }
        _ => false,
    }
}

/// Whether an argument run on its own input reads nothing but that input (and constants).
fn is_closed(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::External(_) => false,
        ExprKind::Call(c) if reads_more_than_items(c.func) => false,
        _ => children(e).all(is_closed),
    }
}
