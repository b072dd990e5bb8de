//! The structural walk: one pass over a resource that checks members against the element definitions of its type and profiles.
//!
//! Checks made here: unknown members, JSON types, arrays vs single values, `null` and empty values,
//! `_x` primitive siblings, choice exclusivity, cardinality, primitive formats, max length, fixed and
//! pattern values, bindings, code validity, references, extensions, slicing and (through
//! [`super::invariants`]) FHIRPath constraints.

use foldhash::HashMap;
use std::sync::Arc;

use crate::definitions::{BindingStrength, ElementDefinition, Structure, StructureKind};
use crate::json::{Json, Object};
use crate::outcome::{Issue, IssueCode, Severity};

use super::bundle::Resolution;
use super::terminology::Membership;
use super::{Validator, primitives, slicing};

/// How deep resources may nest (Bundle → entry → contained → ...) before the walk stops.
const MAX_RESOURCE_DEPTH: usize = 16;

/// The resources a reference may resolve to without leaving the document.
#[derive(Default)]
pub(super) struct Scope<'a> {
    /// `fullUrl` → resource, for the Bundle being walked.
    pub bundle_entries: HashMap<&'a str, &'a Json>,
    /// (type, id) → resource, for Bundle entries with an id: what a `Type/id` reference names.
    pub bundle_ids: HashMap<(&'a str, &'a str), &'a Json>,
    /// The type of the Bundle being walked.
    pub bundle_type: Option<&'a str>,
    /// Each entry resource (by address) → its entry's fullUrl, to resolve the references it makes.
    pub entry_urls: HashMap<usize, Option<&'a str>>,
    /// The address of the last narrative `div` whose XHTML passed its check, so that txt-1 and
    /// txt-2 (`htmlChecks()`, evaluated right after on the same node) need not parse it again.
    pub checked_xhtml: std::cell::Cell<usize>,
}

impl<'a> Scope<'a> {
    /// The Bundle entry a relative `Type/id` reference names by the resource's own type and id.
    pub fn bundle_id(&self, reference: &str) -> Option<&'a Json> {
        let (type_name, id) = reference.split_once('/')?;
        self.bundle_ids.get(&(type_name, id)).copied()
    }
}

pub(super) struct Walker<'v, 'a> {
    pub validator: &'v Validator,
    pub issues: Vec<Issue>,
    pub path: String,
    resource_depth: usize,
    /// Contained resource ids of the resources being walked, innermost last.
    contained: Vec<Vec<&'a str>>,
    pub scope: Scope<'a>,
    /// The resources being walked, innermost last, for `%resource` in invariants.
    pub resources: Vec<&'a Json>,
    /// Where each resource being walked starts in `path`.
    resource_starts: Vec<usize>,
    /// The elements whose extensions are being walked, innermost last.
    pub holders: Vec<Holder<'a>>,
    /// The urls of the extensions being walked, innermost (the one being checked) last.
    pub extension_urls: Vec<&'a str>,
    /// The primitive type of the `_name` object about to be walked (its extensions belong to that primitive).
    next_holder_type: Option<String>,
    /// What FHIRPath evaluation of invariants keeps between elements (the memoized type model).
    pub invariants: super::invariants::State<'v>,
    /// Emptied `seen` lists of finished objects, reused so that an object costs no allocation.
    seen_pool: Vec<Vec<(usize, usize, &'a str)>>,
}

/// An element that has extensions, while they are walked: what their contexts are checked against.
pub(super) struct Holder<'a> {
    pub node: &'a Json,
    /// Its FHIR type (`HumanName`, `date`, `Patient`; `BackboneElement` for anonymous ones).
    pub type_code: String,
    /// The path of its element definition when that is inside a resource (`Questionnaire.item` for
    /// any depth of nested items); `None` for values walked with their data type's own definition.
    pub definition_path: Option<String>,
}

/// What a member's declared type makes of it.
enum Kind {
    Primitive,
    Resource,
    Complex,
}

impl<'v, 'a> Walker<'v, 'a> {
    pub fn new(validator: &'v Validator, path: String) -> Self {
        Self { validator, issues: Vec::new(), path, resource_depth: 0, contained: Vec::new(), scope: Scope::default(), resources: Vec::new(), resource_starts: Vec::new(), invariants: super::invariants::State::new(validator), holders: Vec::new(), extension_urls: Vec::new(), next_holder_type: None, seen_pool: Vec::new() }
    }

    /// `%rootResource`: the resource containing the innermost one when that one is contained, else the innermost one.
    pub fn root_resource(&self) -> Option<&'a Json> {
        let n = self.resources.len();
        let start = *self.resource_starts.last()?;
        let is_contained = self.path[..start].rsplit('.').next().is_some_and(|last| last.starts_with("contained["));
        if is_contained && n >= 2 { Some(self.resources[n - 2]) } else { self.resources.last().copied() }
    }

    pub fn error(&mut self, code: IssueCode, message: impl Into<String>) {
        self.issues.push(Issue::error(code, self.path.clone(), message));
    }

    pub fn report(&mut self, severity: Severity, code: IssueCode, message: impl Into<String>) {
        self.issues.push(Issue::new(severity, code, self.path.clone(), message));
    }

    /// Validates a resource against its type and the given profiles (plus its `meta.profile`).
    pub fn resource(&mut self, resource: &'a Json, extra_profiles: &[String]) {
        let Some(object) = resource.as_object() else {
            self.error(IssueCode::Structure, format!("a resource must be a JSON object, found a JSON {}", resource.kind()));
            return;
        };
        let Some(resource_type) = object.get("resourceType").and_then(Json::as_str) else {
            self.error(IssueCode::Required, "the resource has no resourceType");
            return;
        };
        let definitions = &self.validator.definitions;
        let structure = definitions
            .type_structure(resource_type)
            .filter(|s| s.kind == StructureKind::Resource && s.derivation_is_specialization() && !s.is_abstract);
        let Some(structure) = structure else {
            self.error(IssueCode::Invalid, format!("'{resource_type}' is not a FHIR R4 resource type"));
            return;
        };
        if self.resource_depth >= MAX_RESOURCE_DEPTH {
            self.error(IssueCode::TooLong, "resources are nested too deeply");
            return;
        }
        self.resource_depth += 1;
        self.resources.push(resource);
        self.resource_starts.push(self.path.len());
        let contained_ids =
            object.get("contained").and_then(Json::as_array).unwrap_or_default().iter().filter_map(|c| c.get("id")?.as_str()).collect();
        self.contained.push(contained_ids);
        // A Bundle inside a Bundle (a document carried in a message) is its own scope: its entries'
        // references resolve among its entries, by its type's rules; the outer scope comes back after it.
        let outer_scope = (resource_type == "Bundle" && self.resource_depth > 1).then(|| std::mem::take(&mut self.scope));
        if resource_type == "Bundle" {
            self.index_bundle(object);
        }

        self.object(&structure, 0, resource, resource_type);
        if resource_type == "Bundle" {
            super::bundle::check_entries(self, object);
        }
        let is_contained = self.path.rsplit('.').next().is_some_and(|last| last.starts_with("contained["));
        super::canonical::check(self, resource_type, object, is_contained);
        if resource_type == "Questionnaire" {
            super::questionnaire::check_definition(self, object);
        }
        if resource_type == "MeasureReport" {
            super::measure::check(self, object);
        }
        if resource_type == "QuestionnaireResponse" {
            super::questionnaire::check(self, object);
        }

        let mut profiles: Vec<(String, bool)> = extra_profiles.iter().map(|p| (p.clone(), true)).collect();
        for p in object.get("meta").and_then(|m| m.get("profile")).and_then(Json::as_array).unwrap_or_default() {
            if let Some(url) = p.as_str()
                && !profiles.iter().any(|(q, _)| q == url)
            {
                profiles.push((url.to_string(), false));
            }
        }
        for (url, asked) in profiles {
            match definitions.structure(&url) {
                Some(profile) if profile.type_name == resource_type => self.object(&profile, 0, resource, resource_type),
                Some(profile) => self.error(
                    IssueCode::Invalid,
                    format!("the profile {url} is for {}, not {resource_type}", profile.type_name),
                ),
                None => {
                    // A profile the caller asked for must be checked; one the resource merely claims is reported.
                    let severity = if asked { Severity::Error } else { Severity::Warning };
                    self.report(severity, IssueCode::NotFound, format!("the profile {url} is not loaded, so the resource was not checked against it"));
                }
            }
        }
        if let Some(outer) = outer_scope {
            self.scope = outer;
        }
        self.contained.pop();
        self.resources.pop();
        self.resource_starts.pop();
        self.resource_depth -= 1;
    }

    fn index_bundle(&mut self, bundle: &'a Object) {
        self.scope.bundle_type = bundle.get("type").and_then(Json::as_str);
        for entry in bundle.get("entry").and_then(Json::as_array).unwrap_or_default() {
            let Some(resource) = entry.get("resource") else { continue };
            let full_url = entry.get("fullUrl").and_then(Json::as_str);
            self.scope.entry_urls.insert(address(resource), full_url);
            if let Some(full_url) = full_url {
                self.scope.bundle_entries.insert(full_url, resource);
            }
            if let (Some(t), Some(id)) = (resource.get("resourceType").and_then(Json::as_str), resource.get("id").and_then(Json::as_str)) {
                self.scope.bundle_ids.insert((t, id), resource);
            }
        }
    }

    /// Checks the members of a JSON object against the children of `element` in `structure`.
    pub fn object(&mut self, structure: &Arc<Structure>, element: usize, node: &'a Json, type_code: &str) {
        let holder_type = self.next_holder_type.take();
        let object_type = type_code;
        let Json::Object(object) = node else { return };
        let children = structure.children(element);
        if children.is_empty() {
            // The snapshot does not unfold this data type: its own definition describes the members.
            match self.validator.definitions.type_structure(type_code) {
                Some(ts) if !ts.children(0).is_empty() => self.object(&ts, 0, node, type_code),
                _ => {
                    if structure.elements[element].types.iter().any(|t| t.code == "Element" || t.code == "BackboneElement") {
                        self.error(IssueCode::Structure, "this element has no defined content");
                    }
                }
            }
            return;
        }
        if object.is_empty() {
            self.error(IssueCode::Invalid, "an object must have content (ele-1): leave the element out instead");
        }
        let is_resource_root = element == 0 && structure.kind == StructureKind::Resource;
        // (child index, number of values, the JSON name first seen for it)
        let mut seen = self.seen_pool.pop().unwrap_or_default();
        let base_len = self.path.len();
        for (name, value) in object.iter() {
            if is_resource_root && name == "resourceType" {
                continue;
            }
            if let Some(primitive_name) = name.strip_prefix('_') {
                self.primitive_sibling(structure, element, object, name, primitive_name, value, &mut seen);
                continue;
            }
            let Some((child, choice_type)) = structure.json_child(element, name) else {
                self.path.push('.');
                self.path.push_str(name);
                self.error(IssueCode::Structure, format!("unrecognized element '{name}'"));
                self.path.truncate(base_len);
                continue;
            };
            let definition = &structure.elements[child];
            if let Some(existing) = seen.iter().find(|(c, _, _)| *c == child)
                && existing.2 != name
            {
                self.path.push('.');
                self.path.push_str(name);
                let first = existing.2;
                self.error(IssueCode::Structure, format!("only one of '{first}' and '{name}' may be given (choice element {}[x])", definition.name));
                self.path.truncate(base_len);
                continue;
            }
            // R4 types `Resource.id` as a plain string, but the spec requires the id format.
            let type_code = if is_resource_root && name == "id" { "id" } else { choice_type.or(definition.single_type()).unwrap_or("") };
            let holds_extensions = matches!(name, "extension" | "modifierExtension");
            if holds_extensions {
                let holder_type = holder_type.clone().unwrap_or_else(|| node_type_name(structure, element, object_type));
                let definition_path = Some(&structure.elements[element].path).filter(|p| p.contains('.')).cloned();
                self.holders.push(Holder { node, type_code: holder_type, definition_path });
            }
            let n_values = self.member(structure, child, name, type_code, value, object);
            if holds_extensions {
                self.holders.pop();
            }
            match seen.iter_mut().find(|(c, _, _)| *c == child) {
                Some(entry) => entry.1 += n_values,
                None => seen.push((child, n_values, name)),
            }
        }
        self.cardinality(structure, element, &seen);
        self.slicing(structure, element, object, &seen);
        seen.clear();
        self.seen_pool.push(seen);
        let definition = &structure.elements[element];
        if !definition.constraints.is_empty() {
            super::invariants::check(self, definition, node, type_code);
        }
    }

    /// Reads one member: array vs single, then each value.
    fn member(&mut self, structure: &Arc<Structure>, child: usize, name: &str, type_code: &str, value: &'a Json, parent: &'a Object) -> usize {
        let definition = &structure.elements[child];
        let base_len = self.path.len();
        self.path.push('.');
        self.path.push_str(name);
        let mut n_values = 0;
        match (value, definition_is_array(definition)) {
            (Json::Array(items), true) => {
                if items.is_empty() {
                    self.error(IssueCode::Structure, "an array must not be empty: leave the element out instead");
                }
                let sibling = || parent.iter().find(|(member, _)| member.strip_prefix('_') == Some(name)).and_then(|(_, v)| v.as_array());
                let item_len = self.path.len();
                for (i, item) in items.iter().enumerate() {
                    push_index(&mut self.path, i);
                    if matches!(item, Json::Null) {
                        // `null` holds a place when the `_name` array has the id/extensions for this position.
                        let has_sibling = sibling().and_then(|s| s.get(i)).is_some_and(|s| !matches!(s, Json::Null));
                        if !has_sibling {
                            self.error(IssueCode::Structure, "null is not allowed in an array unless the matching _ element has content");
                        } else {
                            n_values += 1;
                        }
                    } else {
                        n_values += 1;
                        self.value(structure, child, type_code, item);
                    }
                    self.path.truncate(item_len);
                }
            }
            (Json::Array(_), false) => {
                self.error(IssueCode::Structure, format!("'{name}' has at most one value: it must not be an array"));
            }
            (_, true) => {
                self.error(IssueCode::Structure, format!("'{name}' repeats: it must be a JSON array, found a JSON {}", value.kind()));
            }
            (Json::Null, false) => self.error(IssueCode::Structure, "null is not allowed: leave the element out instead"),
            (_, false) => {
                n_values = 1;
                self.value(structure, child, type_code, value);
            }
        }
        self.path.truncate(base_len);
        n_values
    }

    /// `_birthDate`: the id and extensions of a primitive.
    #[allow(clippy::too_many_arguments)]
    fn primitive_sibling(
        &mut self,
        structure: &Arc<Structure>,
        element: usize,
        object: &'a Object,
        name: &'a str,
        primitive_name: &'a str,
        value: &'a Json,
        seen: &mut Vec<(usize, usize, &'a str)>,
    ) {
        let base_len = self.path.len();
        // FHIRPath sees the id and extensions of `_birthDate` as children of `birthDate`.
        self.path.push('.');
        self.path.push_str(primitive_name);
        let found = structure.json_child(element, primitive_name);
        let Some((child, choice_type)) = found else {
            self.error(IssueCode::Structure, format!("unrecognized element '{name}'"));
            self.path.truncate(base_len);
            return;
        };
        let definition = &structure.elements[child];
        let type_code = choice_type.or(definition.single_type()).unwrap_or("");
        if !is_primitive(type_code) {
            self.error(IssueCode::Structure, format!("'{name}' is only allowed for primitive elements"));
            self.path.truncate(base_len);
            return;
        }
        let Some(element_structure) = self.validator.definitions.type_structure("Element") else {
            self.path.truncate(base_len);
            return;
        };
        let check_one = |walker: &mut Self, item: &'a Json| match item {
            Json::Object(_) => {
                walker.next_holder_type = Some(type_code.to_string());
                walker.object(&element_structure, 0, item, "Element");
            }
            other => walker.error(IssueCode::Structure, format!("expected a JSON object with id or extension, found a JSON {}", other.kind())),
        };
        let mut n_values = 0;
        match value {
            Json::Array(items) if definition_is_array(definition) => {
                let main = object.get(primitive_name).and_then(Json::as_array);
                if main.is_some_and(|m| m.len() != items.len()) {
                    self.error(IssueCode::Structure, format!("'{name}' must have as many items as '{primitive_name}'"));
                }
                let item_len = self.path.len();
                for (i, item) in items.iter().enumerate() {
                    if matches!(item, Json::Null) {
                        continue;
                    }
                    push_index(&mut self.path, i);
                    check_one(self, item);
                    let has_value = main.and_then(|m| m.get(i)).is_some_and(|v| !matches!(v, Json::Null));
                    if !has_value && item.get("extension").is_none() {
                        self.error(IssueCode::Invalid, "a primitive must have a value or extensions (ele-1); an id alone is not enough");
                    }
                    self.path.truncate(item_len);
                    if main.and_then(|m| m.get(i)).is_none() {
                        n_values += 1;
                    }
                }
            }
            Json::Object(_) if !definition_is_array(definition) => {
                check_one(self, value);
                if object.get(primitive_name).is_none() {
                    n_values = 1;
                    if value.get("extension").is_none() {
                        self.error(IssueCode::Invalid, "a primitive must have a value or extensions (ele-1); an id alone is not enough");
                    }
                }
            }
            other => self.error(IssueCode::Structure, format!("'{name}' has the wrong JSON shape ({})", other.kind())),
        }
        self.path.truncate(base_len);
        if n_values > 0 && !seen.iter().any(|(c, _, _)| *c == child) {
            seen.push((child, n_values, primitive_name));
        }
    }

    /// Checks one value of a member against its element definition.
    pub fn value(&mut self, structure: &Arc<Structure>, child: usize, type_code: &str, value: &'a Json) {
        let definition = &structure.elements[child];
        let kind = if is_primitive(type_code) {
            Kind::Primitive
        } else if type_code == "Resource" || type_code == "DomainResource" || self.validator.definitions.is_resource_type(type_code) {
            Kind::Resource
        } else {
            Kind::Complex
        };
        match kind {
            Kind::Primitive => self.primitive(definition, type_code, value),
            Kind::Resource => {
                if matches!(value, Json::Object(_)) {
                    self.resource(value, &[]);
                } else {
                    self.error(IssueCode::Structure, format!("expected a resource (a JSON object), found a JSON {}", value.kind()));
                }
                return;
            }
            Kind::Complex => {
                let Json::Object(object) = value else {
                    self.error(IssueCode::Structure, format!("expected a JSON object for a {type_code}, found a JSON {}", value.kind()));
                    return;
                };
                let is_extension = type_code == "Extension";
                if is_extension {
                    self.extension_urls.push(object.get("url").and_then(Json::as_str).unwrap_or_default());
                }
                // A profile that constrains inside a recursive element unfolds it: its own children then apply.
                let unfolded = !structure.children(child).is_empty();
                // A choice of several types unfolds only the children they share (`extension`): the value's
                // own type describes its content.
                let choice_type = if unfolded && definition.types.len() > 1 {
                    self.validator.definitions.type_structure(type_code).filter(|t| !t.children(0).is_empty())
                } else {
                    None
                };
                if let Some(own) = choice_type {
                    self.object(&own, 0, value, type_code);
                } else if let (Some(reference), false) = (&definition.content_reference, unfolded) {
                    let path = reference.trim_start_matches('#');
                    // In a profile, the referenced element may carry constraints meant for its own position
                    // (`Parameters.parameter` vs `parameter.part`), so the base type's definition describes the content.
                    let base = if structure.derivation_is_specialization() {
                        None
                    } else {
                        self.validator.definitions.type_structure(&structure.type_name).filter(|b| b.index_of_path(path).is_some())
                    };
                    match base {
                        Some(base) => {
                            let target = base.index_of_path(path).unwrap_or(0);
                            self.object(&base, target, value, type_code);
                        }
                        None => match structure.index_of_path(path) {
                            Some(target) => self.object(structure, target, value, type_code),
                            None => self.error(IssueCode::NotSupported, format!("cannot resolve the content reference {reference}")),
                        },
                    }
                } else {
                    self.object(structure, child, value, type_code);
                }
                self.type_profiles(definition, type_code, value);
                if type_code == "Extension" {
                    self.extension(definition, value);
                }
                if type_code == "Reference" {
                    self.reference(definition, object);
                }
                if type_code == "Attachment" {
                    self.attachment(object);
                }
                if type_code == "Identifier" {
                    super::canonical::identifier(self, object);
                }
                if let Some(binding) = &definition.binding {
                    self.binding(binding.strength, binding.value_set.as_deref(), type_code, value);
                }
                if matches!(type_code, "Coding") {
                    self.coding(object);
                }
                if is_extension {
                    self.extension_urls.pop();
                }
            }
        }
        if let Some(fixed) = &definition.fixed
            && !crate::json::same_value(value, fixed)
        {
            self.error(IssueCode::Value, format!("value must be exactly {}", fixed.to_string_compact()));
        }
        if let Some(pattern) = &definition.pattern
            && !matches_pattern(value, pattern)
        {
            self.error(IssueCode::Value, format!("value must match the pattern {}", pattern.to_string_compact()));
        }
        if matches!(kind, Kind::Primitive) && !definition.constraints.is_empty() {
            super::invariants::check(self, definition, value, type_code);
        }
    }

    fn primitive(&mut self, definition: &ElementDefinition, type_code: &str, value: &'a Json) {
        if let Err(problem) = primitives::check(type_code, value) {
            self.error(IssueCode::Value, problem);
            return;
        }
        if type_code == "xhtml" {
            self.scope.checked_xhtml.set(address(value));
        }
        if let (Some(max), Json::String(s)) = (definition.max_length, value)
            && s.chars().count() > max
        {
            self.error(IssueCode::TooLong, format!("the value is longer than the allowed {max} characters"));
        }
        if let Json::String(text) = value {
            self.text_policy(type_code, text);
        }
        if let Some(binding) = &definition.binding
            && matches!(type_code, "code" | "string" | "uri")
        {
            self.binding(binding.strength, binding.value_set.as_deref(), type_code, value);
        }
        if let Some(min) = &definition.min_value
            && compare_values(value, min).is_some_and(|o| o.is_lt())
        {
            self.error(IssueCode::Value, format!("the value is below the minimum {}", min.to_string_compact()));
        }
        if let Some(max) = &definition.max_value
            && compare_values(value, max).is_some_and(|o| o.is_gt())
        {
            self.error(IssueCode::Value, format!("the value is above the maximum {}", max.to_string_compact()));
        }
    }

    /// The content rules of the [`super::Policy`] for string-like primitives.
    fn text_policy(&mut self, type_code: &str, text: &str) {
        let policy = &self.validator.policy;
        match type_code {
            "uri" | "url" | "canonical" if !policy.allow_example_urls && is_example_url(text) => {
                self.error(IssueCode::Invalid, format!("example URLs are not allowed here ({text})"));
            }
            "string" if policy.security_checks && html_tag_at(text).is_some() => {
                self.error(IssueCode::Security, "the string looks like it embeds HTML markup, which is not allowed here for security reasons");
            }
            "markdown" => {
                if let Some(at) = html_tag_at(text) {
                    let severity = policy.html_in_markdown;
                    let tag: String = text[at..].chars().take(2).collect();
                    self.report(severity, IssueCode::Invalid, format!("the markdown contains what looks like an HTML tag, starting at '{tag}'; renderers will escape it"));
                }
            }
            _ => {}
        }
    }

    /// Profiles declared on the element's type (`Extension` profiles, `SimpleQuantity`, ...).
    fn type_profiles(&mut self, definition: &ElementDefinition, type_code: &str, value: &'a Json) {
        let Some(element_type) = definition.types.iter().find(|t| t.code == type_code) else { return };
        for url in &element_type.profiles {
            match self.validator.definitions.structure(url) {
                Some(profile) => self.object(&profile, 0, value, type_code),
                None => self.report(Severity::Warning, IssueCode::NotFound, format!("the profile {url} is not loaded, so this element was not checked against it")),
            }
        }
    }

    /// An extension without a declared profile is checked against the definition its `url` names.
    fn extension(&mut self, definition: &ElementDefinition, node: &'a Json) {
        let has_profile = definition.types.iter().any(|t| t.code == "Extension" && !t.profiles.is_empty());
        if has_profile {
            return;
        }
        let Some(url) = node.get("url").and_then(Json::as_str) else { return };
        // Nested extensions use relative urls, defined by the parent extension's slices.
        if !url.contains(':') {
            return;
        }
        match self.validator.definitions.structure(url) {
            Some(extension) if extension.type_name == "Extension" => {
                if !extension.contexts.is_empty() || !extension.context_invariants.is_empty() {
                    super::contexts::check(self, &extension);
                }
                self.object(&extension, 0, node, "Extension");
            }
            Some(_) => self.error(IssueCode::Invalid, format!("{url} is not an extension definition")),
            None => {
                let strict = self.validator.options.unknown_extensions_are_errors
                    && !is_tolerated_extension_url(url, self.validator.policy.allow_example_urls);
                let severity = if strict { Severity::Error } else { Severity::Warning };
                self.report(severity, IssueCode::NotFound, format!("the extension {url} could not be found, so it was not checked"));
            }
        }
    }

    /// The element holding the extension being checked, as a type path (`Patient.name`).
    pub(super) fn element_path_for_context(&self) -> String {
        let start = self.resource_starts.last().copied().unwrap_or(0);
        let resource_type = self.resources.last().and_then(|r| r.get("resourceType")).and_then(Json::as_str).unwrap_or_default();
        let mut out = resource_type.to_string();
        let relative = &self.path[start.min(self.path.len())..];
        let segments: Vec<&str> = relative.split('.').filter(|s| !s.is_empty()).map(|s| s.split('[').next().unwrap_or(s)).collect();
        // Drop the resource type itself (at the top level) and the final `extension`/`modifierExtension`.
        let body = match segments.split_last() {
            Some((_, rest)) => rest,
            None => &[][..],
        };
        for segment in body.iter().skip_while(|s| **s == resource_type) {
            out.push('.');
            out.push_str(segment);
        }
        out
    }

    fn reference(&mut self, definition: &ElementDefinition, object: &'a Object) {
        let Some(reference) = object.get("reference").and_then(Json::as_str) else { return };
        if let Some(id) = reference.strip_prefix('#') {
            let resolved = id.is_empty() || self.contained.iter().rev().take(2).any(|ids| ids.contains(&id));
            if !resolved {
                self.error(IssueCode::NotFound, format!("the contained resource '#{id}' does not exist"));
            }
            return;
        }
        let mut target_type = None;
        if let Some(entry_url) = self.current_entry_url() {
            match super::bundle::resolve(self, reference, entry_url) {
                Resolution::Found(resource) => {
                    let found_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
                    if let Some(stated) = self.stated_type(reference).filter(|t| *t != found_type) {
                        self.error(IssueCode::Structure, format!("'{reference}' names a {stated}, but the bundle entry it resolves to is a {found_type}"));
                    }
                    target_type = Some(found_type);
                }
                Resolution::Missing => {
                    if let Some(kind @ ("document" | "message")) = self.scope.bundle_type {
                        self.error(IssueCode::NotFound, format!("'{reference}' is not in the bundle, but the references in a {kind} must resolve inside it"));
                    }
                }
                Resolution::Outside => {}
            }
        }
        let Some(target_type) = target_type.or_else(|| self.referenced_type(reference)) else { return };
        let targets = || definition.types.iter().filter(|t| t.code == "Reference").flat_map(|t| t.target_profiles.iter());
        // A profile the validator cannot load gives no type to compare with, so it cannot refuse the reference.
        let allowed = |target: &String| self.target_type(target).is_none_or(|t| t == target_type || t == "Resource" || t == "DomainResource");
        if targets().next().is_none() || targets().any(allowed) {
            return;
        }
        let names: Vec<&str> = targets().map(|p| p.split('|').next().unwrap_or(p)).map(|p| p.rsplit('/').next().unwrap_or(p)).collect();
        self.error(IssueCode::Structure, format!("a reference to a {target_type} is not allowed here (allowed: {})", names.join(", ")));
    }

    /// `Attachment.size` is the number of bytes of the content, so it must agree with `data` when both are given.
    fn attachment(&mut self, attachment: &Object) {
        let (Some(Json::Number(size)), Some(data)) = (attachment.get("size"), attachment.get("data").and_then(Json::as_str)) else { return };
        let (Ok(stated), Some(actual)) = (size.parse::<u64>(), primitives::base64_decoded_len(data)) else { return };
        if stated != actual {
            self.error(IssueCode::Value, format!("the stated size {stated} does not match the size of the data ({actual} bytes)"));
        }
    }

    /// The fullUrl of the Bundle entry the walk is inside (`Some(None)`: an entry without one), if any.
    fn current_entry_url(&self) -> Option<Option<&'a str>> {
        if self.scope.entry_urls.is_empty() {
            return None;
        }
        self.resources.iter().rev().find_map(|r| self.scope.entry_urls.get(&address(r)).copied())
    }

    /// The resource type a `targetProfile` stands for: the type itself for core types, else the profile's type.
    fn target_type<'t>(&self, target: &'t str) -> Option<std::borrow::Cow<'t, str>> {
        let url = target.split('|').next().unwrap_or(target);
        if let Some(name) = url.strip_prefix(crate::definitions::CORE_SD_BASE)
            && (self.validator.definitions.is_resource_type(name) || name == "Resource" || name == "DomainResource")
        {
            return Some(std::borrow::Cow::Borrowed(name));
        }
        self.validator.definitions.structure(target).map(|s| std::borrow::Cow::Owned(s.type_name.clone()))
    }

    /// The resource type a literal reference points to, from the bundle or from its `Type/id` form.
    fn referenced_type(&self, reference: &'a str) -> Option<&'a str> {
        if let Some(resource) = self.scope.bundle_entries.get(reference) {
            return resource.get("resourceType").and_then(Json::as_str);
        }
        self.stated_type(reference)
    }

    /// The resource type the text of a `Type/id` reference (relative or RESTful absolute) names.
    fn stated_type<'r>(&self, reference: &'r str) -> Option<&'r str> {
        let without_history = super::bundle::without_history(reference);
        let mut parts = without_history.rsplit('/');
        let _id = parts.next()?;
        let type_name = parts.next()?;
        self.validator.definitions.is_resource_type(type_name).then_some(type_name)
    }

    /// Checks a value against a binding; required bindings are errors, extensible ones warnings.
    fn binding(&mut self, strength: BindingStrength, value_set: Option<&str>, type_code: &str, value: &'a Json) {
        if !matches!(strength, BindingStrength::Required | BindingStrength::Extensible) {
            return;
        }
        let Some(url) = value_set else { return };
        let codings: Vec<(Option<&str>, &str)> = match type_code {
            "code" | "string" | "uri" => value.as_str().map(|c| vec![(None, c)]).unwrap_or_default(),
            "Coding" => coding_pair(value).into_iter().collect(),
            "CodeableConcept" => value.get("coding").and_then(Json::as_array).unwrap_or_default().iter().filter_map(coding_pair).collect(),
            "Quantity" => match (value.get("system").and_then(Json::as_str), value.get("code").and_then(Json::as_str)) {
                (system, Some(code)) => vec![(system, code)],
                _ => Vec::new(),
            },
            _ => return,
        };
        if codings.is_empty() {
            // A CodeableConcept with only text satisfies an extensible binding but not a required one.
            if strength == BindingStrength::Required && type_code == "CodeableConcept" {
                self.error(IssueCode::CodeInvalid, format!("no code is given, but the binding to {url} is required"));
            }
            return;
        }
        let definitions = &self.validator.definitions;
        let Some(expansion) = self.validator.terminology.expansion(definitions, url) else {
            self.report(Severity::Warning, IssueCode::NotSupported, format!("the ValueSet {url} is not loaded, so the code was not checked"));
            return;
        };
        let mut unknown = None;
        for (system, code) in &codings {
            match expansion.contains(*system, code) {
                Membership::In => return,
                Membership::Unknown(why) => unknown = Some(why),
                Membership::NotIn => {}
            }
        }
        let shown: Vec<String> = codings.iter().map(|(s, c)| match s {
            Some(s) => format!("{s}#{c}"),
            None => format!("'{c}'"),
        }).collect();
        match (unknown, strength) {
            (Some(why), _) => self.report(Severity::Warning, IssueCode::NotSupported, format!("could not check {} against {url}: {why}", shown.join(", "))),
            (None, BindingStrength::Required) => {
                self.error(IssueCode::CodeInvalid, format!("{} is not in the required ValueSet {url}", shown.join(", ")))
            }
            (None, _) => self.report(Severity::Warning, IssueCode::CodeInvalid, format!("{} is not in the extensible ValueSet {url}", shown.join(", "))),
        }
    }

    /// A Coding's code must exist in its code system when that system is loaded and complete.
    fn coding(&mut self, coding: &'a Object) {
        if let Some(system) = coding.get("system").and_then(Json::as_str) {
            // A code system is identified by its canonical URL, never by a local or relative one.
            if !super::bundle::is_absolute(system) {
                self.error(IssueCode::Invalid, format!("the system '{system}' must be an absolute URL, not a local or relative reference"));
                return;
            }
        }
        let (Some(system), Some(code)) = (coding.get("system").and_then(Json::as_str), coding.get("code").and_then(Json::as_str)) else {
            return;
        };
        let Some(code_system) = self.validator.terminology.code_system(&self.validator.definitions, system) else {
            let names_value_set = self.validator.definitions.resolve_entry(system).is_some_and(|e| e.resource_type == "ValueSet");
            if names_value_set {
                self.error(IssueCode::Invalid, format!("the system {system} is a ValueSet, not a code system"));
            }
            return;
        };
        if code_system.supplement {
            self.error(IssueCode::CodeInvalid, format!("{system} is a code system supplement, so it cannot be the system of a code"));
            return;
        }
        if !code_system.complete {
            return;
        }
        match code_system.lookup(code) {
            None => self.error(IssueCode::CodeInvalid, format!("unknown code '{code}' in the code system {system}")),
            Some(concept) => {
                if let (Some(display), Some(expected)) = (coding.get("display").and_then(Json::as_str), concept.display.as_deref())
                    && !display.eq_ignore_ascii_case(expected) && !display.trim().eq_ignore_ascii_case(expected.trim())
                {
                    // A display the code system does not give the code makes the coding contradict itself.
                    let severity = self.validator.policy.wrong_display;
                    self.report(severity, IssueCode::Invalid, format!("wrong display '{display}' for {system}#{code}: it should be '{expected}'"));
                }
            }
        }
    }

    fn cardinality(&mut self, structure: &Structure, element: usize, seen: &[(usize, usize, &str)]) {
        for &child in structure.counted_children(element) {
            let definition = &structure.elements[child];
            let count = seen.iter().find(|(c, _, _)| *c == child).map_or(0, |(_, n, _)| *n);
            if (count as u64) < u64::from(definition.min) {
                let name = if definition.is_choice() { format!("{}[x]", definition.name) } else { definition.name.clone() };
                self.error(
                    IssueCode::Required,
                    format!("'{name}' is required: minimum {} but found {count} ({})", definition.min, definition.path),
                );
            }
            if let Some(max) = definition.max
                && count as u64 > u64::from(max) && definition_is_array(definition)
            {
                self.error(IssueCode::Structure, format!("'{}' allows at most {max} values but found {count}", definition.name));
            }
        }
    }

    fn slicing(&mut self, structure: &Arc<Structure>, element: usize, object: &'a Object, seen: &[(usize, usize, &str)]) {
        for &(child, _, name) in seen {
            let definition = &structure.elements[child];
            if definition.slicing.is_none() {
                continue;
            }
            let Some(value) = object.get(name) else { continue };
            let items: Vec<&'a Json> = match value {
                Json::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            slicing::check(self, structure, element, child, name, &items);
        }
    }
}

/// The FHIR type of an object being walked, for extension contexts: its type code, or `BackboneElement`.
fn node_type_name(structure: &Structure, element: usize, type_code: &str) -> String {
    if element == 0 || !type_code.is_empty() {
        return if type_code.is_empty() { structure.type_name.clone() } else { type_code.to_string() };
    }
    "BackboneElement".to_string()
}

/// Whether JSON represents the element as an array: decided by the base definition, not by a profile's constraint.
pub(super) fn definition_is_array(definition: &ElementDefinition) -> bool {
    definition.base_max_is_many
}

pub(super) fn is_primitive(type_code: &str) -> bool {
    type_code.starts_with(|c: char| c.is_ascii_lowercase()) || type_code.starts_with("http://hl7.org/fhirpath/System.")
}

/// Extension URLs that stay warnings when unknown extensions are errors: they name definitions that
/// exist but live outside the loaded packages, or cannot matter.
///
/// - `http://hl7.org/fhir/StructureDefinition/…`: HL7's core namespace, where the extensions pack
///   publishes definitions newer than R4 (`organization-brand`);
/// - `http://hl7.org/fhir/tools/StructureDefinition/…`: HL7's tooling extensions;
/// - `http://hl7.org/fhir/<version>/StructureDefinition/extension-<path>`: the cross-version
///   extensions FHIR defines implicitly for every element of every version;
/// - `example.org` URLs, reserved for examples (RFC 2606) and used throughout the specification.
fn is_tolerated_extension_url(url: &str, allow_example_urls: bool) -> bool {
    if is_example_url(url) {
        return allow_example_urls;
    }
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).unwrap_or(url);
    let Some(path) = rest.strip_prefix("hl7.org/fhir/") else { return false };
    if path.starts_with("StructureDefinition/") || path.starts_with("tools/StructureDefinition/") {
        return true;
    }
    // `5.0/StructureDefinition/extension-Patient.x`: a version number, then the implicit definition.
    match path.split_once('/') {
        Some((version, tail)) => {
            version.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && !version.is_empty()
                && tail.starts_with("StructureDefinition/extension-")
        }
        None => false,
    }
}

/// Appends `[i]` to a path without a temporary string.
pub(super) fn push_index(path: &mut String, i: usize) {
    // Digits by hand: `write!` costs more than the rest of the walk step for a small value.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut n = i;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    path.push('[');
    path.extend(digits[start..].iter().map(|&d| char::from(d)));
    path.push(']');
}

/// A value's address, which identifies a node of the document being walked.
pub(super) fn address(value: &Json) -> usize {
    value as *const Json as usize
}

/// Whether a URL is on `example.org`, the domain the specification's examples use (RFC 2606).
fn is_example_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else { return false };
    let host = rest.split(['/', ':', '?', '#']).next().unwrap_or_default();
    host == "example.org" || host.ends_with(".example.org")
}

/// Where text has something shaped like an HTML tag (`<b`, `</p`), if anywhere.
fn html_tag_at(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().find_map(|(i, &b)| {
        let next = bytes.get(i + 1).copied();
        let tag_start = match next {
            Some(b'/') => bytes.get(i + 2).is_some_and(u8::is_ascii_alphabetic),
            Some(c) => c.is_ascii_alphabetic(),
            None => false,
        };
        (b == b'<' && tag_start).then_some(i)
    })
}

fn coding_pair(coding: &Json) -> Option<(Option<&str>, &str)> {
    Some((coding.get("system").and_then(Json::as_str), coding.get("code")?.as_str()?))
}

/// A value matches a pattern when every member of the pattern appears in it (arrays: each pattern item matches some item).
pub(super) fn matches_pattern(value: &Json, pattern: &Json) -> bool {
    match (value, pattern) {
        (Json::Object(v), Json::Object(p)) => p.iter().all(|(k, pv)| v.get(k).is_some_and(|vv| matches_pattern(vv, pv))),
        (Json::Array(v), Json::Array(p)) => p.iter().all(|pi| v.iter().any(|vi| matches_pattern(vi, pi))),
        (Json::Array(v), p) => v.iter().any(|vi| matches_pattern(vi, p)),
        (Json::Number(a), Json::Number(b)) => a == b || a.parse::<f64>().ok() == b.parse::<f64>().ok(),
        (a, b) => a == b,
    }
}

fn compare_values(value: &Json, limit: &Json) -> Option<std::cmp::Ordering> {
    match (value, limit) {
        (Json::Number(a), Json::Number(b)) => a.parse::<f64>().ok()?.partial_cmp(&b.parse::<f64>().ok()?),
        (Json::String(a), Json::String(b)) => Some(a.as_str().cmp(b.as_str())),
        _ => None,
    }
}

