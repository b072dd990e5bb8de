//! Runs compiled plans: a record (plus its computed values) becomes FHIR resources, or a FHIR Bundle becomes records. Pure: no I/O, clock or randomness.

use std::collections::HashMap;

use crate::iop::RECORD_TYPE_MEMBER;
use crate::json::{Json, Object};

use super::compile::{Plan, ResourcePlan, Rule, Source, Template, TemplatePart, wrap_coding};
use super::ids::resource_id;
use super::path::{Condition, Literal, Path, Step, Test};

/// A value a record needed but the mapping could not translate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct EvalError {
    /// Where in the record (or the FHIR input) the value was.
    pub path: String,
    pub message: String,
}

/// Finds referenced resources inside the input Bundle.
pub struct BundleIndex<'a> {
    by_reference: HashMap<String, &'a Json>,
}

impl<'a> BundleIndex<'a> {
    /// Indexes a Bundle's entries (by `fullUrl` and `Type/id`), or a single resource.
    pub fn new(input: &'a Json) -> BundleIndex<'a> {
        let mut by_reference = HashMap::new();
        let mut add = |full_url: Option<&str>, resource: &'a Json| {
            if let Some(url) = full_url {
                by_reference.insert(url.to_string(), resource);
            }
            if let (Some(t), Some(id)) = (resource.get("resourceType").and_then(Json::as_str), resource.get("id").and_then(Json::as_str)) {
                by_reference.insert(format!("{t}/{id}"), resource);
            }
        };
        if input.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
            for entry in input.get("entry").and_then(Json::as_array).unwrap_or_default() {
                if let Some(resource) = entry.get("resource") {
                    add(entry.get("fullUrl").and_then(Json::as_str), resource);
                }
            }
        } else {
            add(None, input);
        }
        BundleIndex { by_reference }
    }

    fn resolve(&self, reference: &str) -> Option<&'a Json> {
        if let Some(found) = self.by_reference.get(reference) {
            return Some(found);
        }
        // An absolute RESTful URL resolves to the same Type/id inside the Bundle.
        let mut parts = reference.rsplit('/');
        let id = parts.next()?;
        let resource_type = parts.next()?;
        self.by_reference.get(&format!("{resource_type}/{id}")).copied()
    }

    /// The resources of one type, in Bundle order.
    pub fn resources_of_type(input: &'a Json, resource_type: &str) -> Vec<&'a Json> {
        let is_type = |r: &&Json| r.get("resourceType").and_then(Json::as_str) == Some(resource_type);
        if input.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
            input.get("entry").and_then(Json::as_array).unwrap_or_default().iter().filter_map(|e| e.get("resource")).filter(is_type).collect()
        } else {
            std::iter::once(input).filter(is_type).collect()
        }
    }
}

/// Where source paths read from.
struct Sources<'a> {
    record: &'a Json,
    computed: &'a Json,
    index: Option<&'a BundleIndex<'a>>,
}

impl<'a> Sources<'a> {
    /// Every value at `path`, with the indices its unbound `[*]` took.
    fn select(&self, path: &Path, bound: &[usize]) -> Vec<(Vec<usize>, &'a Json)> {
        let root = if path.computed { self.computed } else { self.record };
        let mut out = Vec::new();
        self.walk(root, &path.steps, bound, 0, &mut Vec::new(), &mut out);
        out
    }

    fn walk(&self, node: &'a Json, steps: &[Step], bound: &[usize], n_each: usize, free: &mut Vec<usize>, out: &mut Vec<(Vec<usize>, &'a Json)>) {
        let Some((step, rest)) = steps.split_first() else {
            if !matches!(node, Json::Null) {
                out.push((free.clone(), node));
            }
            return;
        };
        match step {
            Step::Field(name) => {
                if let Some(child) = node.get(name) {
                    self.walk(child, rest, bound, n_each, free, out);
                }
            }
            Step::Index(i) => {
                if let Some(child) = node.as_array().and_then(|a| a.get(*i)) {
                    self.walk(child, rest, bound, n_each, free, out);
                }
            }
            Step::Each => {
                let items = node.as_array().unwrap_or_default();
                match bound.get(n_each) {
                    Some(&i) => {
                        if let Some(child) = items.get(i) {
                            self.walk(child, rest, bound, n_each + 1, free, out);
                        }
                    }
                    None => {
                        for (i, child) in items.iter().enumerate() {
                            free.push(i);
                            self.walk(child, rest, bound, n_each + 1, free, out);
                            free.pop();
                        }
                    }
                }
            }
            Step::Filter { field, value } => {
                let matching = node.as_array().unwrap_or_default().iter().find(|item| item.get(field).and_then(Json::as_str) == Some(value));
                if let Some(child) = matching {
                    self.walk(child, rest, bound, n_each, free, out);
                }
            }
            Step::Resolve(resource_type) => {
                let target = node.get("reference").and_then(Json::as_str).and_then(|r| self.index?.resolve(r));
                if let Some(target) = target.filter(|t| t.get("resourceType").and_then(Json::as_str) == Some(resource_type)) {
                    self.walk(target, rest, bound, n_each, free, out);
                }
            }
        }
    }

    fn holds(&self, condition: &Condition, bound: &[usize]) -> bool {
        condition.tests.iter().all(|test| {
            let values = self.select(test.path(), bound);
            match test {
                Test::Present(_) => values.iter().any(|(_, v)| !matches!(v, Json::Bool(false))),
                Test::Absent(_) => values.iter().all(|(_, v)| matches!(v, Json::Bool(false))),
                Test::Equals { literal, negated, .. } => values.first().is_some_and(|(_, v)| literal_matches(literal, v)) != *negated,
                Test::In { literals, negated, .. } => values.first().is_some_and(|(_, v)| literals.iter().any(|l| literal_matches(l, v))) != *negated,
            }
        })
    }

    fn render(&self, template: &Template, bound: &[usize]) -> Option<String> {
        self.render_escaped(template, bound, false)
    }

    /// Renders a template; with `escape_xml`, record values cannot inject markup into narrative.
    fn render_escaped(&self, template: &Template, bound: &[usize], escape_xml: bool) -> Option<String> {
        let mut out = String::new();
        for part in &template.parts {
            match part {
                TemplatePart::Text(text) => out.push_str(text),
                TemplatePart::Value(path) => {
                    let text = value_text(self.select(path, bound).first()?.1)?;
                    if escape_xml {
                        for c in text.chars() {
                            match c {
                                '<' => out.push_str("&lt;"),
                                '>' => out.push_str("&gt;"),
                                '&' => out.push_str("&amp;"),
                                '"' => out.push_str("&quot;"),
                                c => out.push(c),
                            }
                        }
                    } else {
                        out.push_str(&text);
                    }
                }
            }
        }
        Some(out)
    }
}

fn literal_matches(literal: &Literal, value: &Json) -> bool {
    match (literal, value) {
        (Literal::Text(t), Json::String(s)) => **s == *t,
        (Literal::Number(n), Json::Number(v)) => v.parse::<f64>().is_ok_and(|v| v == *n),
        (Literal::Bool(b), Json::Bool(v)) => b == v,
        _ => false,
    }
}

/// The text of a scalar, as code maps and templates key on it.
fn value_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.to_string()),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// How a produced resource joins the Bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A resource of its own.
    Whole,
    /// Adds to the resource of the same type and id that another record produces.
    Merge,
    /// A `collection` Bundle to be filled with this resource (`Type/id`) and everything it references.
    Collect { first: String },
}

/// A resource produced from a record, and how it joins the Bundle.
#[derive(Clone, Debug)]
pub struct Produced {
    pub resource: Json,
    pub role: Role,
    /// What each reference written names: `urn:uuid:<id>` → `Type/<id>` (the output says no type).
    pub targets: Vec<(String, String)>,
}

/// One produced instance of a resource plan.
struct Instance {
    binding: Vec<usize>,
    id: String,
}

/// Maps one record with a `to-fhir` plan.
pub fn to_fhir(plan: &Plan, namespace: &str, record: &Json, computed: &Json) -> Result<Vec<Produced>, EvalError> {
    let sources = Sources { record, computed, index: None };
    let mut instances: HashMap<&str, Vec<Instance>> = HashMap::new();
    for resource in &plan.resources {
        let bindings: Vec<Vec<usize>> = match &resource.each {
            Some(each) => sources.select(each, &[]).into_iter().map(|(free, _)| free).collect(),
            None => vec![Vec::new()],
        };
        let mut list = Vec::new();
        for binding in bindings {
            if resource.when.as_ref().is_some_and(|w| !sources.holds(w, &binding)) {
                continue;
            }
            // A resource whose identity cannot be formed (its identifiers are absent) is not produced.
            if let Some(identity) = sources.render(&resource.id, &binding) {
                list.push(Instance { binding, id: resource_id(namespace, &resource.resource_type, &identity) });
            }
        }
        instances.insert(resource.name.as_str(), list);
    }
    let mut out = Vec::new();
    for resource in &plan.resources {
        for instance in instances.get(resource.name.as_str()).map(Vec::as_slice).unwrap_or_default() {
            let mut object = Object::new();
            object.insert("resourceType", Json::string(resource.resource_type.as_str()));
            object.insert("id", Json::string(instance.id.as_str()));
            let mut profiles: Vec<Json> = Vec::new();
            if let Some((path, codes)) = &resource.profile_by {
                let key = sources.select(path, &instance.binding).first().and_then(|(_, v)| value_text(v)).unwrap_or_default();
                let url = translate(plan, codes, &key, || path.to_string())?;
                profiles.push(url.clone());
            }
            profiles.extend(resource.profiles.iter().map(|p| Json::string(p.as_str())));
            if !profiles.is_empty() {
                let mut meta = Object::new();
                meta.insert("profile", Json::Array(profiles));
                object.insert("meta", Json::Object(meta));
            }
            let mut json = Json::Object(object);
            let mut targets = Vec::new();
            for rule in &resource.rules {
                apply_to_fhir(plan, resource, rule, &sources, &instances, &instance.binding, namespace, &mut json, &mut targets)?;
            }
            prune(&mut json);
            let role = match &resource.collect {
                Some(first) => {
                    let target = instances.get(first.as_str()).and_then(|list| list.first());
                    match target {
                        Some(target) => Role::Collect { first: format!("{}/{}", plan_type(plan, first), target.id) },
                        // The first resource was not produced (its condition failed): no Bundle either.
                        None => continue,
                    }
                }
                None if resource.merge => Role::Merge,
                None => Role::Whole,
            };
            out.push(Produced { resource: json, role, targets });
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn apply_to_fhir(
    plan: &Plan,
    resource: &ResourcePlan,
    rule: &Rule,
    sources: &Sources<'_>,
    instances: &HashMap<&str, Vec<Instance>>,
    bound: &[usize],
    namespace: &str,
    json: &mut Json,
    targets: &mut Vec<(String, String)>,
) -> Result<(), EvalError> {
    let holds = |free: &[usize]| {
        let all: Vec<usize> = bound.iter().chain(free).copied().collect();
        rule.when.as_ref().is_none_or(|w| sources.holds(w, &all))
    };
    match &rule.source {
        Source::Constant(value) => {
            if rule.target.n_each() == 0 {
                if holds(&[]) {
                    set(json, &rule.target.steps, &[], value.clone());
                }
                return Ok(());
            }
            // The elements a [*] constant goes to are those of the first condition path with a free [*].
            let domain = rule.when.as_ref().and_then(|w| w.tests.iter().map(Test::path).find(|p| p.n_each() > bound.len()));
            for (free, _) in domain.map(|p| sources.select(p, bound)).unwrap_or_default() {
                if holds(&free) {
                    set(json, &rule.target.steps, &free, value.clone());
                }
            }
        }
        Source::From { path, codes, wrap_codeable_concept, stringify } => {
            for (free, value) in sources.select(path, bound) {
                if !holds(&free) {
                    continue;
                }
                let value = match codes {
                    Some(name) => {
                        let key = value_text(value).unwrap_or_default();
                        let translated = translate(plan, name, &key, || path_with_indices(path, bound, &free))?;
                        if *wrap_codeable_concept { wrap_coding(translated) } else { translated.clone() }
                    }
                    None => match value {
                        Json::Number(n) if *stringify => Json::string(n.to_string()),
                        _ => value.clone(),
                    },
                };
                set(json, &rule.target.steps, &free, value);
            }
        }
        Source::Text { template, escape_xml } => {
            if let Some(text) = sources.render_escaped(template, bound, *escape_xml)
                && holds(&[])
            {
                set(json, &rule.target.steps, &[], Json::string(text));
            }
        }
        Source::Key { key, codes, wrap_codeable_concept } => {
            let Some(text) = sources.render(key, bound) else { return Ok(()) };
            if !holds(&[]) {
                return Ok(());
            }
            let translated = translate(plan, codes, &text, || key.text.clone())?;
            let value = if *wrap_codeable_concept { wrap_coding(translated) } else { translated.clone() };
            set(json, &rule.target.steps, &[], value);
        }
        Source::LocalRef(name) => {
            let target_type = plan_type(plan, name);
            let mut reference = |id: &str| {
                targets.push((format!("urn:uuid:{id}"), format!("{target_type}/{id}")));
                reference(id)
            };
            let targets = instances.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
            let same_each = plan.resources.iter().find(|r| &r.name == name).is_some_and(|t| t.each.is_some() && t.each == resource.each);
            if same_each {
                if let Some(target) = targets.iter().find(|t| t.binding == bound)
                    && holds(&[])
                {
                    set(json, &rule.target.steps, &[], reference(&target.id));
                }
            } else if rule.target.n_each() > 0 {
                // Two reference rules into one list (`hasMember[*]`: the items, then the total; or
                // `activity[*].reference`) append: each starts after the elements whose target is already set.
                let offset = filled_len(json, &rule.target.steps);
                for (i, target) in targets.iter().enumerate() {
                    if holds(&[]) {
                        set(json, &rule.target.steps, &[offset + i], reference(&target.id));
                    }
                }
            } else if let Some(target) = targets.first()
                && holds(&[])
            {
                set(json, &rule.target.steps, &[], reference(&target.id));
            }
        }
        Source::TypedRef { resource_type, id } => {
            // A [*] target gets one reference per element of the template's first value with an
            // unbound [*] (the compiler checked that there is one exactly then).
            let domain = id.parts.iter().find_map(|p| match p {
                TemplatePart::Value(path) if path.n_each() > bound.len() => Some(path),
                _ => None,
            });
            let elements: Vec<Vec<usize>> = match domain {
                Some(path) => sources.select(path, bound).into_iter().map(|(free, _)| free).collect(),
                None => vec![Vec::new()],
            };
            // Like local references, a second rule into the same list appends after the first one's elements.
            let offset = if rule.target.n_each() > 0 { filled_len(json, &rule.target.steps) } else { 0 };
            for free in elements {
                let all: Vec<usize> = bound.iter().chain(&free).copied().collect();
                if let Some(identity) = sources.render(id, &all)
                    && holds(&free)
                {
                    let mut at = free.clone();
                    if let Some(first) = at.first_mut() {
                        *first += offset;
                    }
                    let id = resource_id(namespace, resource_type, &identity);
                    targets.push((format!("urn:uuid:{id}"), format!("{resource_type}/{id}")));
                    set(json, &rule.target.steps, &at, reference(&id));
                }
            }
        }
        Source::Position(path) => {
            for (free, _) in sources.select(path, bound) {
                if holds(&free) {
                    let position = free.last().or(bound.last()).map_or(1, |i| i + 1);
                    set(json, &rule.target.steps, &free, Json::Number(position.to_string().into()));
                }
            }
        }
    }
    Ok(())
}

/// The value the code map `codes` gives `key`; a key the map lacks is an error at `path`.
fn translate<'p>(plan: &'p Plan, codes: &str, key: &str, path: impl FnOnce() -> String) -> Result<&'p Json, EvalError> {
    plan.codes.get(codes).and_then(|m| m.get(key)).ok_or_else(|| EvalError { path: path(), message: format!("'{key}' has no entry in the code map '{codes}' of {}", plan.file.display()) })
}

fn plan_type(plan: &Plan, name: &str) -> String {
    plan.resources.iter().find(|r| r.name == name).map(|r| r.resource_type.clone()).unwrap_or_default()
}

/// A Reference to a resource of the same Bundle (entries use `urn:uuid:<id>` full URLs).
fn reference(id: &str) -> Json {
    let mut object = Object::new();
    object.insert("reference", Json::string(format!("urn:uuid:{id}")));
    Json::Object(object)
}

fn path_with_indices(path: &Path, bound: &[usize], free: &[usize]) -> String {
    let mut indices = bound.iter().chain(free);
    let steps = path.steps.iter().map(|s| match s {
        Step::Each => indices.next().map_or(Step::Each, |&i| Step::Index(i)),
        other => other.clone(),
    });
    Path { computed: path.computed, steps: steps.collect() }.to_string()
}

/// Maps FHIR input (a Bundle or one resource) with a `from-fhir` plan: one record per focus resource.
pub fn from_fhir(plan: &Plan, input: &Json) -> Result<Vec<Json>, EvalError> {
    let index = BundleIndex::new(input);
    let Some(focus) = &plan.focus else { return Ok(Vec::new()) };
    let empty = Json::Object(Object::new());
    let mut records = Vec::new();
    for resource in BundleIndex::resources_of_type(input, focus) {
        let sources = Sources { record: resource, computed: &empty, index: Some(&index) };
        if plan.focus_when.as_ref().is_some_and(|w| !sources.holds(w, &[])) {
            continue;
        }
        let mut record = Object::new();
        record.insert(RECORD_TYPE_MEMBER, Json::string(plan.record_type.as_str()));
        let mut json = Json::Object(record);
        for rule in &plan.rules {
            let holds = |free: &[usize]| rule.when.as_ref().is_none_or(|w| sources.holds(w, free));
            match &rule.source {
                Source::Constant(value) => {
                    if holds(&[]) {
                        set(&mut json, &rule.target.steps, &[], value.clone());
                    }
                }
                Source::From { path, codes, .. } => {
                    for (free, value) in sources.select(path, &[]) {
                        if !holds(&free) {
                            continue;
                        }
                        let value = match codes {
                            Some(name) => {
                                let key = value_text(value).unwrap_or_default();
                                translate(plan, name, &key, || format!("{focus}.{}", path_with_indices(path, &[], &free)))?.clone()
                            }
                            None => value.clone(),
                        };
                        set(&mut json, &rule.target.steps, &free, value);
                    }
                }
                Source::LocalRef(_) | Source::TypedRef { .. } | Source::Key { .. } | Source::Text { .. } | Source::Position(_) => {}
            }
        }
        prune(&mut json);
        records.push(json);
    }
    Ok(records)
}

/// The position after the last element of the list at the first `[*]` of `steps` in which the rest of `steps` is set.
fn filled_len(root: &Json, steps: &[Step]) -> usize {
    let mut node = root;
    for (i, step) in steps.iter().enumerate() {
        node = match step {
            Step::Each => {
                let items = node.as_array().unwrap_or_default();
                return items.iter().rposition(|item| is_set(item, &steps[i + 1..])).map_or(0, |p| p + 1);
            }
            Step::Field(name) => match node.get(name) {
                Some(child) => child,
                None => return 0,
            },
            Step::Index(i) => match node.as_array().and_then(|a| a.get(*i)) {
                Some(child) => child,
                None => return 0,
            },
            Step::Filter { .. } | Step::Resolve(_) => return 0,
        };
    }
    0
}

fn is_set(node: &Json, steps: &[Step]) -> bool {
    let Some((step, rest)) = steps.split_first() else { return !matches!(node, Json::Null) };
    match step {
        Step::Field(name) => node.get(name).is_some_and(|child| is_set(child, rest)),
        Step::Index(i) => node.as_array().and_then(|a| a.get(*i)).is_some_and(|child| is_set(child, rest)),
        Step::Each | Step::Filter { .. } => node.as_array().is_some_and(|a| a.iter().any(|child| is_set(child, rest))),
        Step::Resolve(_) => false,
    }
}

/// Writes `value` at `steps`, creating objects and arrays on the way; `[*]` steps take `free` indices in order.
fn set(root: &mut Json, steps: &[Step], free: &[usize], value: Json) {
    let Some((step, rest)) = steps.split_first() else {
        *root = value;
        return;
    };
    match step {
        Step::Field(name) => {
            if !matches!(root, Json::Object(_)) {
                *root = Json::Object(Object::new());
            }
            let Json::Object(object) = root else { return };
            if object.get(name).is_none() {
                object.insert(name.as_str(), Json::Null);
            }
            if let Some(child) = object.get_mut(name) {
                set(child, rest, free, value);
            }
        }
        Step::Index(_) | Step::Each => {
            let (index, free) = match step {
                Step::Index(i) => (*i, free),
                _ => match free.split_first() {
                    Some((i, rest_free)) => (*i, rest_free),
                    None => (0, free),
                },
            };
            if !matches!(root, Json::Array(_)) {
                *root = Json::Array(Vec::new());
            }
            let Json::Array(items) = root else { return };
            while items.len() <= index {
                items.push(Json::Null);
            }
            set(&mut items[index], rest, free, value);
        }
        Step::Filter { field, value: wanted } => {
            if !matches!(root, Json::Array(_)) {
                *root = Json::Array(Vec::new());
            }
            let Json::Array(items) = root else { return };
            let position = items.iter().position(|item| item.get(field).and_then(Json::as_str) == Some(wanted.as_str()));
            let position = position.unwrap_or_else(|| {
                let mut object = Object::new();
                object.insert(field.as_str(), Json::string(wanted.as_str()));
                items.push(Json::Object(object));
                items.len() - 1
            });
            set(&mut items[position], rest, free, value);
        }
        Step::Resolve(_) => {}
    }
}

/// Removes nulls, empty strings, empty objects and empty arrays, so absent source data leaves no empty element behind.
pub fn prune(json: &mut Json) -> bool {
    match json {
        Json::Null => false,
        Json::String(s) => !s.is_empty(),
        Json::Array(items) => {
            items.retain_mut(prune);
            !items.is_empty()
        }
        Json::Object(object) => {
            let names: Vec<String> = object.iter().map(|(k, _)| k.to_string()).collect();
            for name in names {
                let keep = object.get_mut(&name).is_some_and(prune);
                if !keep {
                    object.remove(&name);
                }
            }
            !object.is_empty()
        }
        _ => true,
    }
}
