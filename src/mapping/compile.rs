//! Turns mapping files into checked, executable plans: every target path, type, code map and fixed code is checked against the record schema and the target profiles, and each problem names its file, line and path.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use crate::definitions::{BindingStrength, Definitions, Structure};
use crate::iop::{RECORD_TYPE_MEMBER, RecordSchema};
use crate::json::{Json, Object};
use crate::validation::{Membership, Terminology, check_primitive_text};

use super::path::{Condition, Literal, Path, Step, Test, parse_condition, parse_path};
use super::schema::{self, SchemaType};
use super::spec::{MappingFile, RuleSpec, line_of};

/// The namespace of the profiles bundled with the gateway: a mapping naming one that is not loaded is broken.
pub const OWN_CANONICAL: &str = "http://iop-gateway.org/fhir";

/// One problem in a mapping file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    /// The mapping path concerned (a target or source path), or empty for file-level problems.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Which way a mapping goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToFhir,
    FromFhir,
}

/// A template such as `screening:{id}:item:{items[*].number}`.
#[derive(Clone, Debug)]
pub struct Template {
    pub text: String,
    pub parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug)]
pub enum TemplatePart {
    Text(String),
    Value(Path),
}

/// Where a rule's value comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Constant(Json),
    /// `stringify`: an integer filling a string element (a linkId) is written as text.
    From { path: Path, codes: Option<String>, wrap_codeable_concept: bool, stringify: bool },
    /// Text rendered from a template; `escape_xml` for narrative (`xhtml`) targets.
    Text { template: Template, escape_xml: bool },
    /// A code looked up by a rendered template.
    Key { key: Template, codes: String, wrap_codeable_concept: bool },
    /// A resource of the same file, by name.
    LocalRef(String),
    /// A resource of another mapping, by type and id template; one per element when the template has an unbound `[*]`.
    TypedRef { resource_type: String, id: Template },
    /// The 1-based position of each element of a record array (`diagnoses[*]`).
    Position(Path),
}

/// A checked rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub line: usize,
    pub target: Path,
    pub source: Source,
    pub when: Option<Condition>,
}

/// A checked resource of a `to-fhir` mapping.
#[derive(Clone, Debug)]
pub struct ResourcePlan {
    pub name: String,
    pub resource_type: String,
    pub profiles: Vec<String>,
    /// The record value and code map that pick one more profile per record.
    pub profile_by: Option<(Path, String)>,
    pub id: Template,
    pub each: Option<Path>,
    pub when: Option<Condition>,
    pub rules: Vec<Rule>,
    /// A `collection` Bundle whose entries are this named resource and everything it references.
    pub collect: Option<String>,
    /// The resource adds to the resource of the same identity another record produces.
    pub merge: bool,
}

/// A checked mapping file.
#[derive(Clone, Debug)]
pub struct Plan {
    pub file: PathBuf,
    pub record_type: String,
    pub direction: Direction,
    pub codes: BTreeMap<String, BTreeMap<String, Json>>,
    pub resources: Vec<ResourcePlan>,
    pub focus: Option<String>,
    pub focus_when: Option<Condition>,
    pub rules: Vec<Rule>,
}

/// What compilation needs besides the file itself.
pub struct Context<'a> {
    pub definitions: &'a Definitions,
    pub terminology: &'a Terminology,
    pub schema: &'a RecordSchema,
    /// The schema of values computed from the record (`@score.total`), when the record type has any.
    pub computed: Option<&'a serde_json::Value>,
}

/// Reads and checks one mapping file; all its problems are returned together.
pub fn compile_file(file: &FsPath, text: &str, context: &Context<'_>) -> Result<Plan, Vec<Problem>> {
    let spec: MappingFile = match toml::from_str(text) {
        Ok(spec) => spec,
        Err(e) => {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            return Err(vec![Problem { file: file.to_path_buf(), line, path: String::new(), message: e.message().to_string() }]);
        }
    };
    let mut compiler = Compiler { file: file.to_path_buf(), text, context, problems: Vec::new() };
    let plan = compiler.file(spec);
    if compiler.problems.is_empty() { Ok(plan) } else { Err(compiler.problems) }
}

struct Compiler<'a, 'c> {
    file: PathBuf,
    text: &'a str,
    context: &'a Context<'c>,
    problems: Vec<Problem>,
}

/// What the walk found at the end of a FHIR path.
#[derive(Clone, Debug)]
struct FhirLeaf {
    type_code: String,
    /// The required binding in force (the element's own, or a bound CodeableConcept's for one of its Codings).
    required_value_set: Option<String>,
}

impl Compiler<'_, '_> {
    fn problem(&mut self, span: std::ops::Range<usize>, path: &str, message: impl Into<String>) {
        let line = line_of(self.text, span.start);
        self.problems.push(Problem { file: self.file.clone(), line, path: path.to_string(), message: message.into() });
    }

    fn file(&mut self, spec: MappingFile) -> Plan {
        let direction = match spec.direction.get_ref().as_str() {
            "to-fhir" => Direction::ToFhir,
            "from-fhir" => Direction::FromFhir,
            other => {
                self.problem(spec.direction.span(), "", format!("direction must be 'to-fhir' or 'from-fhir', not '{other}'"));
                Direction::ToFhir
            }
        };
        if spec.record.get_ref() != &self.context.schema.record_type {
            let message = format!("record '{}' does not match the file name (expected '{}')", spec.record.get_ref(), self.context.schema.record_type);
            self.problem(spec.record.span(), "", message);
        }
        let mut codes = BTreeMap::new();
        for (name, table) in &spec.codes {
            let entries = table
                .get_ref()
                .iter()
                .map(|(k, v)| {
                    let json = toml_to_json(v.get_ref());
                    // TOML tables come out sorted by key; Codings are written in FHIR's element order.
                    let json = if json.as_object().is_some() { in_element_order(self.context.definitions, "Coding", json) } else { json };
                    (k.clone(), json)
                })
                .collect();
            codes.insert(name.clone(), entries);
        }
        let mut plan = Plan {
            file: self.file.clone(),
            record_type: spec.record.get_ref().clone(),
            direction,
            codes,
            resources: Vec::new(),
            focus: None,
            focus_when: None,
            rules: Vec::new(),
        };
        match direction {
            Direction::ToFhir => self.compile_to_fhir(&spec, &mut plan),
            Direction::FromFhir => self.compile_from_fhir(&spec, &mut plan),
        }
        plan
    }

    // ----- IOP → FHIR -----

    fn compile_to_fhir(&mut self, spec: &MappingFile, plan: &mut Plan) {
        if !spec.rules.is_empty() || spec.focus.is_some() {
            self.problem(0..0, "", "a to-fhir mapping lists its rules under [[resource]], and has no 'focus'");
        }
        if spec.resource.is_empty() {
            self.problem(0..0, "", "a to-fhir mapping needs at least one [[resource]]");
        }
        let names: Vec<(String, Option<String>)> =
            spec.resource.iter().map(|r| (r.name.get_ref().clone(), r.each.as_ref().map(|e| e.get_ref().clone()))).collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].iter().any(|(n, _)| n == &name.0) {
                self.problem(spec.resource[i].name.span(), "", format!("two resources are named '{}'", name.0));
            }
        }
        for resource in &spec.resource {
            let resource_type = resource.resource_type.get_ref().clone();
            let Some(base) = self.context.definitions.type_structure(&resource_type).filter(|s| self.context.definitions.is_resource_type(&s.type_name))
            else {
                self.problem(resource.resource_type.span(), "", format!("'{resource_type}' is not a FHIR R4 resource type"));
                continue;
            };
            let mut structures = vec![base];
            let mut profiles = Vec::new();
            for profile in &resource.profiles {
                let url = profile.get_ref();
                profiles.push(url.clone());
                if let Some(structure) = self.profile_structure(profile.span(), url, &resource_type) {
                    structures.push(structure);
                }
            }
            let each = resource.each.as_ref().and_then(|each| {
                let path = self.record_path(each.span(), each.get_ref())?;
                if path.steps.last() != Some(&Step::Each) {
                    self.problem(each.span(), each.get_ref(), "'each' must end with [*]");
                    return None;
                }
                self.schema_type(each.span(), &path)?;
                Some(path)
            });
            let n_bound = each.as_ref().map_or(0, Path::n_each);
            let id = self.template(resource.id.span(), resource.id.get_ref(), each.as_ref());
            let when = resource.when.as_ref().and_then(|w| self.condition(w.span(), w.get_ref(), each.as_ref()));
            let profile_by = resource.profile_by.as_ref().and_then(|by| {
                let (path, codes) = self.profile_by(by, plan, &resource_type, each.as_ref(), when.as_ref(), &mut structures)?;
                Some((path, codes))
            });
            let mut rules = Vec::new();
            for rule in &resource.rules {
                if let Some(compiled) = self.compile_to_fhir_rule(rule, &structures, plan, &names, each.as_ref(), n_bound) {
                    rules.push(compiled);
                }
            }
            let collect = resource.collect.as_ref().map(|c| {
                self.check_collect(c, &resource_type, each.as_ref(), &names, &rules);
                c.get_ref().clone()
            });
            if resource.merge && collect.is_some() {
                self.problem(resource.name.span(), "", "a resource cannot both 'merge' and 'collect'");
            }
            // A merged resource only adds to another one, which carries what the profiles require.
            if !resource.merge {
                self.required_members(resource.name.span(), &structures, &rules, collect.is_some());
            }
            if let Some(id) = id {
                plan.resources.push(ResourcePlan {
                    name: resource.name.get_ref().clone(),
                    resource_type,
                    profiles,
                    profile_by,
                    id,
                    each,
                    when,
                    rules,
                    collect,
                    merge: resource.merge,
                });
            }
        }
    }

    fn compile_to_fhir_rule(
        &mut self,
        rule: &toml::Spanned<RuleSpec>,
        structures: &[Arc<Structure>],
        plan: &Plan,
        names: &[(String, Option<String>)],
        each: Option<&Path>,
        n_bound: usize,
    ) -> Option<Rule> {
        let line = line_of(self.text, rule.span().start);
        let spec = rule.get_ref();
        let target_text = spec.path.get_ref().clone();
        let target = match parse_path(&target_text) {
            Ok(path) if !path.computed => path,
            Ok(_) => {
                self.problem(spec.path.span(), &target_text, "a target path cannot be computed (@)");
                return None;
            }
            Err(message) => {
                self.problem(spec.path.span(), &target_text, message);
                return None;
            }
        };
        if matches!(target.steps.first(), Some(Step::Field(name)) if name == "id" || name == "meta" || name == "resourceType") {
            self.problem(spec.path.span(), &target_text, "id, meta and resourceType are set by the gateway");
            return None;
        }
        let mut leaves = Vec::new();
        for structure in structures {
            match walk_fhir(self.context.definitions, structure.clone(), &target.steps) {
                Ok(leaf) => leaves.push(leaf),
                Err(message) => {
                    let message = format!("{message} (profile {})", structure.url);
                    self.problem(spec.path.span(), &target_text, message);
                    return None;
                }
            }
        }
        // Types come from the last structure (the last claimed profile, else the base type): each profile can
        // only narrow the base's types, and two profiles that narrow differently are caught when the output is
        // validated. A required binding of any of them applies, so a fixed code must satisfy all of them.
        let leaf = leaves.last()?.clone();
        let required: Vec<String> = leaves.iter().filter_map(|l| l.required_value_set.clone()).collect();
        let when = spec.when.as_ref().and_then(|w| self.condition(w.span(), w.get_ref(), each));
        let n_sources = [spec.value.is_some(), spec.from.is_some(), spec.reference.is_some(), spec.key.is_some(), spec.text.is_some(), spec.position.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if n_sources != 1 {
            self.problem(rule.span(), &target_text, "a rule needs exactly one of 'value', 'from', 'key', 'text', 'position' and 'ref'");
            return None;
        }
        if spec.id.is_some() && spec.reference.is_none() {
            self.problem(rule.span(), &target_text, "'id' belongs to a 'ref' rule");
        }
        if spec.codes.is_some() && spec.from.is_none() && spec.key.is_none() {
            self.problem(rule.span(), &target_text, "'codes' translates a 'from' or 'key' value");
        }
        let source = if let Some(position) = &spec.position {
            let path = self.record_path(position.span(), position.get_ref())?;
            self.schema_type(position.span(), &path)?;
            self.check_each_prefix(position.span(), &path, each);
            if path.steps.last() != Some(&Step::Each) {
                self.problem(position.span(), position.get_ref(), "'position' numbers the elements of a record array: its path ends with [*]");
            }
            self.check_unbound(rule.span(), &target_text, "the source", path.n_each().saturating_sub(n_bound), &target);
            if !matches!(leaf.type_code.as_str(), "positiveInt" | "integer" | "unsignedInt") {
                self.problem(position.span(), &target_text, format!("a 'position' fills a positiveInt or integer, not a {}", leaf.type_code));
            }
            Source::Position(path)
        } else if let Some(text) = &spec.text {
            let template = self.template(text.span(), text.get_ref(), each)?;
            if target.n_each() > 0 {
                self.problem(rule.span(), &target_text, "a 'text' rule fills one element: its target cannot have [*]");
            }
            if !matches!(leaf.type_code.as_str(), "string" | "markdown" | "xhtml") {
                self.problem(text.span(), &target_text, format!("a 'text' rule fills a string, markdown or xhtml, not a {}", leaf.type_code));
            }
            if leaf.type_code == "xhtml" && !template.parts.first().is_some_and(|p| matches!(p, TemplatePart::Text(t) if t.starts_with("<div xmlns=\"http://www.w3.org/1999/xhtml\">"))) {
                self.problem(text.span(), &target_text, "narrative starts with <div xmlns=\"http://www.w3.org/1999/xhtml\">");
            }
            Source::Text { template, escape_xml: leaf.type_code == "xhtml" }
        } else if let Some(key) = &spec.key {
            let template = self.template(key.span(), key.get_ref(), each)?;
            if target.n_each() > 0 {
                self.problem(rule.span(), &target_text, "a 'key' rule fills one element: its target cannot have [*]");
            }
            let Some(codes) = &spec.codes else {
                self.problem(rule.span(), &target_text, "'key' needs 'codes', the map it looks up");
                return None;
            };
            let name = codes.get_ref();
            let Some(map) = plan.codes.get(name) else {
                self.problem(codes.span(), &target_text, format!("no code map named '{name}'"));
                return None;
            };
            let text = SchemaType { kind: "string".into(), ..SchemaType::default() };
            let wrap = self.check_code_map(codes.span(), &target_text, name, map, &text, &leaf, &required);
            Source::Key { key: template, codes: name.clone(), wrap_codeable_concept: wrap }
        } else if let Some(value) = &spec.value {
            let json = in_element_order(self.context.definitions, &leaf.type_code, toml_to_json(value.get_ref()));
            if target.n_each() > 0 && !when.as_ref().is_some_and(|w| w.tests.iter().any(|t| t.path().n_each() > n_bound)) {
                self.problem(rule.span(), &target_text, "a constant for every element of a [*] target needs a 'when' whose path has the matching [*]");
            }
            self.check_fixed(value.span(), &target_text, &leaf, &required, &json);
            Source::Constant(json)
        } else if let Some(from) = &spec.from {
            let path = self.record_path(from.span(), from.get_ref())?;
            let source_type = self.schema_type(from.span(), &path)?;
            self.check_each_prefix(from.span(), &path, each);
            self.check_unbound(rule.span(), &target_text, "the source", path.n_each().saturating_sub(n_bound), &target);
            let mut wrap = false;
            let source_type = narrow(source_type, &path, when.as_ref());
            match &spec.codes {
                Some(codes) => {
                    let name = codes.get_ref();
                    match plan.codes.get(name) {
                        None => self.problem(codes.span(), &target_text, format!("no code map named '{name}'")),
                        Some(map) => wrap = self.check_code_map(codes.span(), &target_text, name, map, &source_type, &leaf, &required),
                    }
                }
                None => {
                    if !fits(&source_type, &leaf.type_code) {
                        let message = format!("a {} cannot fill a FHIR {} (use 'codes' or another path)", source_type.describe(), leaf.type_code);
                        self.problem(from.span(), &target_text, message);
                    }
                }
            }
            let stringify = spec.codes.is_none() && source_type.kind == "integer" && leaf.type_code == "string";
            Source::From { path, codes: spec.codes.as_ref().map(|c| c.get_ref().clone()), wrap_codeable_concept: wrap, stringify }
        } else {
            let reference = spec.reference.as_ref()?;
            if leaf.type_code != "Reference" {
                self.problem(spec.path.span(), &target_text, format!("a 'ref' needs a Reference target, not {}", leaf.type_code));
            }
            let name = reference.get_ref();
            match &spec.id {
                Some(id) => {
                    if !self.context.definitions.is_resource_type(name) {
                        self.problem(reference.span(), &target_text, format!("'{name}' is not a FHIR resource type"));
                    }
                    // With a [*] target, the template's unbound [*] gives one reference per element.
                    let id = self.template_with(id.span(), id.get_ref(), each, target.n_each())?;
                    let n_each = id.parts.iter().filter_map(|p| if let TemplatePart::Value(p) = p { Some(p.n_each()) } else { None }).max().unwrap_or(0);
                    self.check_unbound(rule.span(), &target_text, "the id template", n_each.saturating_sub(n_bound), &target);
                    Source::TypedRef { resource_type: name.clone(), id }
                }
                None => {
                    match names.iter().find(|(n, _)| n == name) {
                        None => self.problem(reference.span(), &target_text, format!("no resource named '{name}' in this file")),
                        Some((_, target_each)) => {
                            let same_each = target_each.is_some() && target_each.as_deref() == each.map(ToString::to_string).as_deref();
                            if target_each.is_some() && !same_each && target.n_each() != 1 {
                                let message = format!("'{name}' is one resource per element: refer to all of them with a [*] target");
                                self.problem(spec.path.span(), &target_text, message);
                            }
                        }
                    }
                    Source::LocalRef(name.clone())
                }
            }
        };
        Some(Rule { line, target, source, when })
    }

    /// A claimed profile: it must be for the resource type, and one of ours must be loaded. Profiles
    /// of implementation guides (US Core, PAS, BSeR) are checked when loaded (`mappings check --ig`).
    fn profile_structure(&mut self, span: std::ops::Range<usize>, url: &str, resource_type: &str) -> Option<Arc<Structure>> {
        match self.context.definitions.structure(url) {
            Some(structure) if structure.type_name == resource_type => Some(structure),
            Some(structure) => {
                let message = format!("the profile {url} is for {}, not {resource_type}", structure.type_name);
                self.problem(span, "", message);
                None
            }
            None if url.starts_with(OWN_CANONICAL) => {
                let message = format!("the profile {url} is not in profiles/ (or does not compile: {})", self.context.definitions.compile_problems().join("; "));
                self.problem(span, "", message);
                None
            }
            None => None,
        }
    }

    /// Checks `profile_by`: a scalar record value whose every reachable value the code map turns into a
    /// canonical of a profile for this resource type; each of those profiles is checked like a fixed one.
    fn profile_by(
        &mut self,
        by: &toml::Spanned<super::spec::ProfileBy>,
        plan: &Plan,
        resource_type: &str,
        each: Option<&Path>,
        when: Option<&Condition>,
        structures: &mut Vec<Arc<Structure>>,
    ) -> Option<(Path, String)> {
        let spec = by.get_ref();
        let path = self.record_path(spec.from.span(), spec.from.get_ref())?;
        let source = self.schema_type(spec.from.span(), &path)?;
        self.check_each_prefix(spec.from.span(), &path, each);
        if !source.is_scalar() || path.n_each() > each.map_or(0, Path::n_each) {
            self.problem(spec.from.span(), spec.from.get_ref(), "'profile_by' reads one scalar value of the record");
            return None;
        }
        let name = spec.codes.get_ref();
        let Some(map) = plan.codes.get(name) else {
            self.problem(spec.codes.span(), "", format!("no code map named '{name}'"));
            return None;
        };
        for (key, value) in map {
            match value.as_str() {
                Some(url) => {
                    if let Some(structure) = self.profile_structure(spec.codes.span(), url, resource_type) {
                        structures.push(structure);
                    }
                }
                None => self.problem(spec.codes.span(), "", format!("code map '{name}', entry '{key}': a profile is a canonical URL (text)")),
            }
        }
        let source = narrow(source, &path, when);
        self.check_coverage(spec.codes.span(), "profile_by", name, map.keys(), &source);
        Some((path, name.clone()))
    }

    /// Checks `collect`: a Bundle whose rules make it a `collection` and leave `entry` to the gateway,
    /// first listing a resource of this file that is produced once per record.
    fn check_collect(&mut self, collect: &toml::Spanned<String>, resource_type: &str, each: Option<&Path>, names: &[(String, Option<String>)], rules: &[Rule]) {
        let name = collect.get_ref();
        if resource_type != "Bundle" || each.is_some() {
            self.problem(collect.span(), "", "'collect' makes one Bundle per record: the resource is a Bundle without 'each'");
        }
        match names.iter().find(|(n, _)| n == name) {
            None => self.problem(collect.span(), "", format!("no resource named '{name}' in this file")),
            Some((_, Some(_))) => self.problem(collect.span(), "", format!("'{name}' is one resource per element; a collection starts with one resource")),
            Some(_) => {}
        }
        let first_field = |r: &Rule| match r.target.steps.first() {
            Some(Step::Field(f)) => Some(f.clone()),
            _ => None,
        };
        if rules.iter().any(|r| first_field(r).as_deref() == Some("entry")) {
            self.problem(collect.span(), "entry", "the entries of a 'collect' Bundle are filled by the gateway");
        }
        let is_collection = rules.iter().any(|r| first_field(r).as_deref() == Some("type") && matches!(&r.source, Source::Constant(v) if v.as_str() == Some("collection")));
        if !is_collection {
            self.problem(collect.span(), "type", "a 'collect' Bundle sets { path = \"type\", value = \"collection\" }");
        }
    }

    /// Root-level elements a profile requires must be the target of some rule (`entry` is filled by the gateway for a `collect` Bundle).
    fn required_members(&mut self, span: std::ops::Range<usize>, structures: &[Arc<Structure>], rules: &[Rule], entries_filled: bool) {
        for structure in structures {
            for &child in structure.children(0) {
                let element = &structure.elements[child];
                if element.min == 0 || element.slice_name.is_some() || matches!(element.name.as_str(), "id" | "meta" | "resourceType") || entries_filled && element.name == "entry" {
                    continue;
                }
                let covered = rules.iter().any(|r| match r.target.steps.first() {
                    Some(Step::Field(name)) => name == &element.name || (element.is_choice() && name.starts_with(&element.name)),
                    _ => false,
                });
                if !covered {
                    let message = format!("no rule sets '{}', which the profile {} requires", element.name, structure.url);
                    self.problem(span.clone(), "", message);
                }
            }
        }
    }

    fn check_fixed(&mut self, span: std::ops::Range<usize>, target: &str, leaf: &FhirLeaf, required: &[String], value: &Json) {
        if let Err(message) = check_value(self.context.definitions, &leaf.type_code, value) {
            self.problem(span.clone(), target, message);
            return;
        }
        for value_set in required {
            if let Err(message) = check_binding(self.context.definitions, self.context.terminology, value_set, &leaf.type_code, value) {
                self.problem(span.clone(), target, message);
            }
        }
    }

    /// Checks every entry of a code map against the target; returns whether Codings must be wrapped in a CodeableConcept.
    #[allow(clippy::too_many_arguments)]
    fn check_code_map(
        &mut self,
        span: std::ops::Range<usize>,
        target: &str,
        name: &str,
        map: &BTreeMap<String, Json>,
        source: &SchemaType,
        leaf: &FhirLeaf,
        required: &[String],
    ) -> bool {
        if !source.is_scalar() {
            self.problem(span.clone(), target, format!("code map '{name}' needs a scalar source, not {}", source.kind));
        }
        let wrap = leaf.type_code == "CodeableConcept" && map.values().all(|v| v.get("system").is_some() || v.get("code").is_some());
        for (key, value) in map {
            let value = if wrap { wrap_coding(value) } else { value.clone() };
            if let Err(message) = check_value(self.context.definitions, &leaf.type_code, &value) {
                self.problem(span.clone(), target, format!("code map '{name}', entry '{key}': {message}"));
                continue;
            }
            for value_set in required {
                if let Err(message) = check_binding(self.context.definitions, self.context.terminology, value_set, &leaf.type_code, &value) {
                    self.problem(span.clone(), target, format!("code map '{name}', entry '{key}': {message}"));
                }
            }
        }
        self.check_coverage(span, target, name, map.keys(), source);
        wrap
    }

    /// A code map over an enumeration must translate every allowed value and nothing else.
    fn check_coverage<'k>(&mut self, span: std::ops::Range<usize>, target: &str, name: &str, keys: impl Iterator<Item = &'k String> + Clone, source: &SchemaType) {
        let Some(allowed) = &source.allowed else { return };
        let reachable = source.reachable.as_ref().unwrap_or(allowed);
        let missing: Vec<&String> = reachable.iter().filter(|a| !keys.clone().any(|k| k == *a)).collect();
        if !missing.is_empty() {
            let message = format!("code map '{name}' has no entry for {}", missing.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", "));
            self.problem(span.clone(), target, message);
        }
        let unknown: Vec<&String> = keys.filter(|k| !allowed.contains(k)).collect();
        if !unknown.is_empty() {
            let message = format!("code map '{name}' translates values the schema does not allow: {}", unknown.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", "));
            self.problem(span, target, message);
        }
    }

    // ----- FHIR → IOP -----

    fn compile_from_fhir(&mut self, spec: &MappingFile, plan: &mut Plan) {
        if !spec.resource.is_empty() {
            self.problem(0..0, "", "a from-fhir mapping has 'focus' and [[rules]], not [[resource]]");
        }
        let Some(focus) = &spec.focus else {
            self.problem(0..0, "", "a from-fhir mapping needs 'focus', the resource type each record comes from");
            return;
        };
        let focus_type = focus.get_ref().clone();
        let Some(structure) = self.context.definitions.type_structure(&focus_type).filter(|_| self.context.definitions.is_resource_type(&focus_type)) else {
            self.problem(focus.span(), "", format!("'{focus_type}' is not a FHIR R4 resource type"));
            return;
        };
        plan.focus = Some(focus_type);
        plan.focus_when = spec.focus_when.as_ref().and_then(|w| {
            let condition = match parse_condition(w.get_ref()) {
                Ok(c) => c,
                Err(message) => {
                    self.problem(w.span(), w.get_ref(), message);
                    return None;
                }
            };
            for test in &condition.tests {
                if let Err(message) = walk_fhir(self.context.definitions, structure.clone(), &test.path().steps) {
                    self.problem(w.span(), &test.path().to_string(), message);
                }
            }
            Some(condition)
        });
        let mut targets = Vec::new();
        for rule in &spec.rules {
            let line = line_of(self.text, rule.span().start);
            let spec_rule = rule.get_ref();
            let target_text = spec_rule.path.get_ref().clone();
            let Some(target) = self.record_path(spec_rule.path.span(), &target_text) else { continue };
            let Some(target_type) = self.schema_type(spec_rule.path.span(), &target) else { continue };
            if target_text == RECORD_TYPE_MEMBER {
                self.problem(spec_rule.path.span(), &target_text, "record_type is set by the gateway");
                continue;
            }
            if spec_rule.reference.is_some() || spec_rule.id.is_some() || spec_rule.text.is_some() || spec_rule.key.is_some() || spec_rule.position.is_some() {
                self.problem(rule.span(), &target_text, "'ref', 'id', 'key', 'text' and 'position' belong to to-fhir rules");
                continue;
            }
            let when = spec_rule.when.as_ref().and_then(|w| {
                let condition = parse_condition(w.get_ref()).map_err(|m| self.problem(w.span(), w.get_ref(), m)).ok()?;
                for test in &condition.tests {
                    if let Err(message) = walk_fhir(self.context.definitions, structure.clone(), &test.path().steps) {
                        self.problem(w.span(), &test.path().to_string(), message);
                    }
                }
                Some(condition)
            });
            let source = match (&spec_rule.value, &spec_rule.from) {
                (Some(value), None) => {
                    let json = toml_to_json(value.get_ref());
                    if !json_fits_schema(&json, &target_type) {
                        self.problem(value.span(), &target_text, format!("the value does not fit the schema type {}", target_type.describe()));
                    }
                    Source::Constant(json)
                }
                (None, Some(from)) => {
                    let path = match parse_path(from.get_ref()) {
                        Ok(p) if !p.computed => p,
                        Ok(_) => {
                            self.problem(from.span(), from.get_ref(), "FHIR source paths cannot be computed (@)");
                            continue;
                        }
                        Err(message) => {
                            self.problem(from.span(), from.get_ref(), message);
                            continue;
                        }
                    };
                    let leaf = match walk_fhir(self.context.definitions, structure.clone(), &path.steps) {
                        Ok(leaf) => leaf,
                        Err(message) => {
                            self.problem(from.span(), from.get_ref(), message);
                            continue;
                        }
                    };
                    if path.n_each() != target.n_each() {
                        let message = format!("the source has {} [*] but the target has {}", path.n_each(), target.n_each());
                        self.problem(rule.span(), &target_text, message);
                    }
                    match &spec_rule.codes {
                        Some(codes) => match plan.codes.get(codes.get_ref()) {
                            None => self.problem(codes.span(), &target_text, format!("no code map named '{}'", codes.get_ref())),
                            Some(map) => {
                                if !is_primitive(&leaf.type_code) {
                                    self.problem(from.span(), from.get_ref(), format!("code maps translate primitive values, not {}", leaf.type_code));
                                }
                                for (key, value) in map {
                                    if !json_fits_schema(value, &target_type) {
                                        let message = format!("code map '{}', entry '{key}': the value does not fit the schema type {}", codes.get_ref(), target_type.describe());
                                        self.problem(codes.span(), &target_text, message);
                                    }
                                }
                            }
                        },
                        None => {
                            if !fits_back(&leaf.type_code, &target_type) {
                                let message = format!("a FHIR {} cannot fill a {}", leaf.type_code, target_type.describe());
                                self.problem(from.span(), from.get_ref(), message);
                            }
                        }
                    }
                    Source::From { path, codes: spec_rule.codes.as_ref().map(|c| c.get_ref().clone()), wrap_codeable_concept: false, stringify: false }
                }
                _ => {
                    self.problem(rule.span(), &target_text, "a from-fhir rule needs exactly one of 'value' and 'from'");
                    continue;
                }
            };
            targets.push(target.to_string());
            plan.rules.push(Rule { line, target, source, when });
        }
        // Rules guarded by `when` count as filling a member: this catches a forgotten member at load, while a
        // record whose conditions leave a required member empty is caught by the schema check of the output.
        let required = self.context.schema.document.get("required").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
        for member in required.iter().filter_map(serde_json::Value::as_str) {
            if member == RECORD_TYPE_MEMBER {
                continue;
            }
            let covered = targets.iter().any(|t| t == member || t.starts_with(&format!("{member}.")) || t.starts_with(&format!("{member}[")));
            if !covered {
                self.problem(focus.span(), member, "the record schema requires this member but no rule fills it");
            }
        }
    }

    // ----- shared -----

    fn record_path(&mut self, span: std::ops::Range<usize>, text: &str) -> Option<Path> {
        match parse_path(text) {
            Ok(path) => Some(path),
            Err(message) => {
                self.problem(span, text, message);
                None
            }
        }
    }

    fn schema_type(&mut self, span: std::ops::Range<usize>, path: &Path) -> Option<SchemaType> {
        let document = if path.computed {
            match self.context.computed {
                Some(document) => document,
                None => {
                    let message = format!("the record type '{}' has no computed values", self.context.schema.record_type);
                    self.problem(span, &path.to_string(), message);
                    return None;
                }
            }
        } else {
            &self.context.schema.document
        };
        match schema::lookup(document, path) {
            Ok(found) => Some(found),
            Err(message) => {
                self.problem(span, &path.to_string(), message);
                None
            }
        }
    }

    /// Each [*] of a source that the resource's `each` leaves unbound fills one [*] of the target.
    fn check_unbound(&mut self, span: std::ops::Range<usize>, target_text: &str, source: &str, n_free: usize, target: &Path) {
        if n_free != target.n_each() {
            self.problem(span, target_text, format!("{source} has {n_free} unbound [*] but the target has {}", target.n_each()));
        }
    }

    fn check_each_prefix(&mut self, span: std::ops::Range<usize>, path: &Path, each: Option<&Path>) {
        let Some(each) = each else { return };
        if path.n_each() == 0 || path.computed {
            return;
        }
        if path.prefix_through_each(each.n_each()) != Some(each.steps.as_slice()) {
            let message = format!("inside a resource with each = '{each}', a [*] source must start with '{each}'");
            self.problem(span, &path.to_string(), message);
        }
    }

    fn condition(&mut self, span: std::ops::Range<usize>, text: &str, each: Option<&Path>) -> Option<Condition> {
        let condition = match parse_condition(text) {
            Ok(condition) => condition,
            Err(message) => {
                self.problem(span, text, message);
                return None;
            }
        };
        for test in &condition.tests {
            let Some(found) = self.schema_type(span.clone(), test.path()) else { continue };
            self.check_each_prefix(span.clone(), test.path(), each);
            for literal in test.literals() {
                let ok = match literal {
                    Literal::Text(text) => found.kind == "string" && found.allowed.as_ref().is_none_or(|a| a.contains(text)),
                    Literal::Number(_) => matches!(found.kind.as_str(), "integer" | "number"),
                    Literal::Bool(_) => found.kind == "boolean",
                };
                if !ok {
                    let message = format!("{literal} can never match a {}{}", found.describe(), found.allowed.as_ref().map(|a| format!(" (allowed: {})", a.join(", "))).unwrap_or_default());
                    self.problem(span.clone(), &test.path().to_string(), message);
                }
            }
        }
        Some(condition)
    }

    fn template(&mut self, span: std::ops::Range<usize>, text: &str, each: Option<&Path>) -> Option<Template> {
        self.template_with(span, text, each, 0)
    }

    /// A template whose values may have `extra` [*] beyond the resource's `each` (a reference per element).
    fn template_with(&mut self, span: std::ops::Range<usize>, text: &str, each: Option<&Path>, extra: usize) -> Option<Template> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                self.problem(span, text, "unclosed '{' in the template");
                return None;
            };
            let inner = &rest[open + 1..open + close];
            let path = self.record_path(span.clone(), inner)?;
            let found = self.schema_type(span.clone(), &path)?;
            if !found.is_scalar() {
                self.problem(span.clone(), inner, format!("a template value must be a scalar, not {}", found.kind));
            }
            self.check_each_prefix(span.clone(), &path, each);
            if path.n_each() > each.map_or(0, Path::n_each) + extra {
                self.problem(span.clone(), inner, "a template value cannot have an unbound [*]");
            }
            parts.push(TemplatePart::Value(path));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, TemplatePart::Value(_))) {
            self.problem(span, text, "an id template needs at least one {value} from the record");
            return None;
        }
        Some(Template { text: text.to_string(), parts })
    }
}

/// The values of an enumeration a rule can see: those its condition lets through (a code map
/// need not translate values the rule never reads).
fn narrow(mut source: SchemaType, path: &Path, when: Option<&Condition>) -> SchemaType {
    let (Some(allowed), Some(when)) = (&source.allowed, when) else { return source };
    let text = |l: &Literal| match l {
        Literal::Text(t) => t.clone(),
        other => other.to_string(),
    };
    let mut kept = allowed.clone();
    for test in when.tests.iter().filter(|t| t.path() == path) {
        match test {
            Test::Equals { literal, negated, .. } => kept.retain(|v| (*v == text(literal)) != *negated),
            Test::In { literals, negated, .. } => kept.retain(|v| literals.iter().any(|l| *v == text(l)) != *negated),
            _ => {}
        }
    }
    source.reachable = Some(kept);
    source
}

/// Walks a FHIR path through a structure, following data types and references into their own definitions.
fn walk_fhir(definitions: &Definitions, structure: Arc<Structure>, steps: &[Step]) -> Result<FhirLeaf, String> {
    let mut structure = structure;
    let mut index = 0usize;
    let mut type_code = structure.type_name.clone();
    let mut repeats = false;
    let mut required_value_set: Option<String> = None;
    let mut parent_binding: Option<String> = None;
    let mut shown = structure.type_name.clone();
    for step in steps {
        match step {
            Step::Field(name) => {
                // Data types are described by their own StructureDefinition unless the profile expanded them.
                if structure.children(index).is_empty() && index != 0 || structure.elements[index].content_reference.is_some() {
                    if let Some(reference) = &structure.elements[index].content_reference {
                        index = structure.index_of_path(reference.trim_start_matches('#')).ok_or_else(|| format!("cannot follow {reference}"))?;
                    } else {
                        if is_primitive(&type_code) {
                            return Err(format!("'{shown}' is a {type_code} and has no member '{name}'"));
                        }
                        structure = definitions.type_structure(&type_code).ok_or_else(|| format!("the type {type_code} is not loaded"))?;
                        index = 0;
                    }
                }
                let (child, chosen) = structure.child_for_json_name(index, name).ok_or_else(|| {
                    let known: Vec<String> = structure
                        .children(index)
                        .iter()
                        .map(|&c| &structure.elements[c])
                        .filter(|e| e.slice_name.is_none())
                        .map(|e| if e.is_choice() { format!("{}[x]", e.name) } else { e.name.clone() })
                        .collect();
                    format!("'{shown}' has no element '{name}' (known: {})", known.join(", "))
                })?;
                let element = &structure.elements[child];
                if element.max == Some(0) {
                    return Err(format!("'{shown}.{name}' is prohibited (max 0)"));
                }
                if element.is_choice() && chosen.is_none() {
                    let options: Vec<String> = element.types.iter().map(|t| format!("{name}{}", type_suffix(&t.code))).collect();
                    return Err(format!("'{name}' is a choice: name the type ({})", options.join(", ")));
                }
                type_code = match chosen.or_else(|| element.single_type().map(str::to_string)) {
                    Some(code) if code == "BackboneElement" || code == "Element" => element.path.clone(),
                    Some(code) => code,
                    None if element.content_reference.is_some() => element.path.clone(),
                    None => return Err(format!("'{shown}.{name}' has no single type")),
                };
                repeats = element.base_max_is_many;
                let binding = element.binding.as_ref().filter(|b| b.strength == BindingStrength::Required).and_then(|b| b.value_set.clone());
                // A Coding of a bound CodeableConcept is bound by it.
                required_value_set = if name == "coding" { parent_binding.take() } else { binding.clone() };
                parent_binding = if type_code == "CodeableConcept" { binding } else { None };
                index = child;
                shown = format!("{shown}.{name}");
            }
            Step::Index(_) | Step::Each | Step::Filter { .. } => {
                if !repeats {
                    return Err(format!("'{shown}' does not repeat, so it takes no [..]"));
                }
                if let Step::Filter { field, .. } = step
                    && !type_code.contains('.')
                {
                    let inner = definitions.type_structure(&type_code).ok_or_else(|| format!("the type {type_code} is not loaded"))?;
                    walk_fhir(definitions, inner, &[Step::Field(field.clone())]).map_err(|m| format!("in the filter of '{shown}': {m}"))?;
                }
                repeats = false;
            }
            Step::Resolve(target) => {
                if type_code != "Reference" {
                    return Err(format!("'{shown}' is a {type_code}, not a Reference, so it cannot be resolved"));
                }
                if !definitions.is_resource_type(target) {
                    return Err(format!("'{target}' is not a resource type"));
                }
                structure = definitions.type_structure(target).ok_or_else(|| format!("the type {target} is not loaded"))?;
                index = 0;
                type_code = target.clone();
                shown = target.clone();
                required_value_set = None;
                parent_binding = None;
            }
        }
    }
    if repeats {
        return Err(format!("'{shown}' repeats: say which element ([0], [*] or [member=value])"));
    }
    Ok(FhirLeaf { type_code, required_value_set })
}

/// The capitalised type name used as a choice suffix (`valueQuantity`).
fn type_suffix(code: &str) -> String {
    let mut chars = code.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Whether a FHIR type code names a primitive (they are spelled in lower case).
pub fn is_primitive(type_code: &str) -> bool {
    type_code.chars().next().is_some_and(|c| c.is_ascii_lowercase()) && !type_code.contains('.')
}

/// Whether a record value of this schema type can fill a FHIR primitive of this type as is.
fn fits(source: &SchemaType, target: &str) -> bool {
    match (source.kind.as_str(), target) {
        ("string", "date") => source.format.as_deref() == Some("date"),
        ("string", "dateTime") => matches!(source.format.as_deref(), Some("date") | Some("date-time")),
        ("string", "instant") => source.format.as_deref() == Some("date-time"),
        ("string", "time") => source.format.as_deref() == Some("time"),
        ("string", "string" | "markdown" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid") => source.format.is_none() || target == "string",
        ("integer", "integer" | "decimal" | "string") => true,
        ("integer", "unsignedInt") => source.minimum.is_some_and(|m| m >= 0.0),
        ("integer", "positiveInt") => source.minimum.is_some_and(|m| m >= 1.0),
        ("number", "decimal") => true,
        ("boolean", "boolean") => true,
        _ => false,
    }
}

/// Whether a FHIR primitive can fill a record value of this schema type.
fn fits_back(source: &str, target: &SchemaType) -> bool {
    match (source, target.kind.as_str()) {
        ("date", "string") => matches!(target.format.as_deref(), Some("date") | None),
        // A dateTime may carry only a date; one that does not is caught by the record schema.
        ("dateTime", "string") => matches!(target.format.as_deref(), Some("date-time") | Some("date") | None),
        ("instant", "string") => matches!(target.format.as_deref(), Some("date-time") | None),
        ("string" | "markdown" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid", "string") => target.format.is_none(),
        ("integer" | "unsignedInt" | "positiveInt", "integer" | "number") => true,
        ("decimal", "number") => true,
        // Quantities are decimals even when they count (days); one that is not whole is caught by the record schema.
        ("decimal", "integer") => true,
        ("boolean", "boolean") => true,
        _ => false,
    }
}

fn json_fits_schema(value: &Json, target: &SchemaType) -> bool {
    let kind_ok = match (value, target.kind.as_str()) {
        (Json::String(_), "string") | (Json::Bool(_), "boolean") => true,
        (Json::Number(n), "integer") => !n.contains(['.', 'e', 'E']),
        (Json::Number(_), "number") => true,
        _ => false,
    };
    let text = match value {
        Json::String(s) => s.to_string(),
        other => other.to_string_compact(),
    };
    kind_ok && target.allowed.as_ref().is_none_or(|a| a.contains(&text))
}

/// Checks a constant against a FHIR type, member by member.
pub(super) fn check_value(definitions: &Definitions, type_code: &str, value: &Json) -> Result<(), String> {
    if is_primitive(type_code) {
        let text = match (type_code, value) {
            ("boolean", Json::Bool(_)) => return Ok(()),
            ("integer" | "positiveInt" | "unsignedInt" | "decimal", Json::Number(n)) => n.to_string(),
            (_, Json::String(s)) if !matches!(type_code, "boolean" | "integer" | "positiveInt" | "unsignedInt" | "decimal") => s.to_string(),
            _ => return Err(format!("a {} cannot be a FHIR {type_code}", value.kind())),
        };
        return check_primitive_text(type_code, &text).map_err(|m| format!("'{text}' is not a valid {type_code}: {m}"));
    }
    let Json::Object(object) = value else { return Err(format!("a FHIR {type_code} is written as a table, not a {}", value.kind())) };
    let structure = definitions.type_structure(type_code).ok_or_else(|| format!("the type {type_code} is not loaded"))?;
    for (name, member) in object.iter() {
        let (child, chosen) = structure.child_for_json_name(0, name).ok_or_else(|| format!("{type_code} has no element '{name}'"))?;
        let element = &structure.elements[child];
        let child_type = chosen.or_else(|| element.single_type().map(str::to_string)).ok_or_else(|| format!("{type_code}.{name} has no single type"))?;
        let items: Vec<&Json> = match (member, element.base_max_is_many) {
            (Json::Array(items), true) => items.iter().collect(),
            (_, true) => return Err(format!("{type_code}.{name} repeats: write a list")),
            (Json::Array(_), false) => return Err(format!("{type_code}.{name} does not repeat")),
            (single, false) => vec![single],
        };
        for item in items {
            check_value(definitions, &child_type, item).map_err(|m| format!("{name}: {m}"))?;
        }
    }
    Ok(())
}

/// Checks the codes of a constant against a required ValueSet; a ValueSet or code system that is not loaded is not an error here.
pub(super) fn check_binding(definitions: &Definitions, terminology: &Terminology, value_set: &str, type_code: &str, value: &Json) -> Result<(), String> {
    let Some(expansion) = terminology.expansion(definitions, value_set) else { return Ok(()) };
    let codings: Vec<(Option<&str>, &str)> = match type_code {
        "CodeableConcept" => value
            .get("coding")
            .and_then(Json::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| Some((c.get("system").and_then(Json::as_str), c.get("code").and_then(Json::as_str)?)))
            .collect(),
        "Coding" => value.get("code").and_then(Json::as_str).map(|code| vec![(value.get("system").and_then(Json::as_str), code)]).unwrap_or_default(),
        _ => value.as_str().map(|code| vec![(None, code)]).unwrap_or_default(),
    };
    for (system, code) in codings {
        if expansion.contains(system, code) == Membership::NotIn {
            return Err(format!("the code '{code}' is not in the required ValueSet {value_set}"));
        }
    }
    Ok(())
}

/// Reorders the members of a complex constant as its FHIR type defines them (TOML sorts table keys),
/// so output reads like any FHIR serializer's. Members the type does not know keep their place at the end.
fn in_element_order(definitions: &Definitions, type_code: &str, value: Json) -> Json {
    let Json::Object(object) = value else { return value };
    let Some(structure) = (!is_primitive(type_code)).then(|| definitions.type_structure(type_code)).flatten() else { return Json::Object(object) };
    let mut members: Vec<(usize, String, Json)> = object
        .iter()
        .map(|(name, member)| {
            let found = structure.child_for_json_name(0, name);
            let position = found.as_ref().map_or(usize::MAX, |(child, _)| *child);
            let child_type = found.and_then(|(child, chosen)| chosen.or_else(|| structure.elements[child].single_type().map(str::to_string)));
            let member = match (child_type, member) {
                (Some(t), Json::Array(items)) => Json::Array(items.iter().map(|i| in_element_order(definitions, &t, i.clone())).collect()),
                (Some(t), single) => in_element_order(definitions, &t, single.clone()),
                (None, other) => other.clone(),
            };
            (position, name.to_string(), member)
        })
        .collect();
    members.sort_by_key(|(position, _, _)| *position);
    Json::Object(members.into_iter().map(|(_, name, member)| (name, member)).collect())
}

pub(super) fn wrap_coding(coding: &Json) -> Json {
    let mut object = Object::new();
    object.insert("coding", Json::Array(vec![coding.clone()]));
    Json::Object(object)
}

/// A TOML value as JSON; TOML dates become their text (FHIR dates are strings).
pub(super) fn toml_to_json(value: &toml::Value) -> Json {
    match value {
        toml::Value::String(s) => Json::string(s.as_str()),
        toml::Value::Integer(i) => Json::Number(i.to_string().into()),
        toml::Value::Float(f) => Json::Number(f.to_string().into()),
        toml::Value::Boolean(b) => Json::Bool(*b),
        toml::Value::Datetime(d) => Json::string(d.to_string()),
        toml::Value::Array(items) => Json::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Json::Object(table.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect()),
    }
}
