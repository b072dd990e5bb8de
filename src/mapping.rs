//! Declarative IOP ↔ FHIR mappings: loading and checking `mappings/`, then mapping records to a FHIR Bundle and FHIR back to records.
//!
//! `mappings/` holds, per IOP concept, the record's JSON Schema (`<record>.schema.json`) and one
//! TOML file per direction (`<record>.to-fhir.toml`, `<record>.from-fhir.toml`); the format is
//! documented in [`spec`] and `mappings/README.md`. [`MappingSet::load`] compiles them all and
//! refuses the set with every problem located by file, line and path. Mapping itself is pure:
//! the same input gives byte-identical output, ids come from source identifiers ([`ids`]), and
//! problems with the input are returned as issues, never panics.

mod bundle;
pub mod compile;
mod eval;
pub mod ids;
pub mod path;
pub mod schema;
pub mod scoring;
pub mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::definitions::Definitions;
use crate::iop::{RECORD_TYPE_MEMBER, RecordSchemas};
use crate::json::Json;
use crate::outcome::Severity;
use crate::validation::Terminology;

pub use compile::{Direction, Plan, Problem};
pub use eval::EvalError;

include!(concat!(env!("OUT_DIR"), "/bundled_mappings.rs"));

/// Why `mappings/` could not be loaded: every problem found, each with file, line and path.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the mappings:\n{}", problems.len(), problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct LoadMappingsError {
    pub problems: Vec<Problem>,
}

/// A problem with one input record or resource while mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapIssue {
    pub severity: Severity,
    /// Which input (a record's `record_type` and `id`, or a FHIR resource) the issue is about.
    pub source: String,
    /// Where inside it.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for MapIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<8} {}", self.severity.as_str(), self.source)?;
        if !self.path.is_empty() {
            write!(f, " {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The result of mapping: the output (a Bundle, or records) and the issues met.
#[derive(Clone, Debug)]
pub struct Mapped<T> {
    pub output: T,
    pub issues: Vec<MapIssue>,
    /// Records → FHIR: per input record (by position), the `Type/id` of every resource it produced.
    pub produced: Vec<Vec<String>>,
    /// Records → FHIR: what each `urn:uuid:<id>` reference of the output names, as `Type/<id>`
    /// (in the batch or not), for a caller that stores the resources outside the Bundle.
    pub targets: BTreeMap<String, String>,
}

impl<T> Mapped<T> {
    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(|i| i.severity.is_error())
    }
}

/// Every mapping of a `mappings/` folder, compiled.
#[derive(Debug)]
pub struct MappingSet {
    pub dir: PathBuf,
    pub schemas: RecordSchemas,
    pub to_fhir: BTreeMap<String, Plan>,
    pub from_fhir: BTreeMap<String, Plan>,
    namespace: String,
}

impl MappingSet {
    /// Loads and checks every mapping in `dir` against the record schemas beside them and the
    /// profiles in `definitions` (load implementation guides into it first to check against them too).
    pub fn load(dir: &Path, definitions: &Definitions) -> Result<MappingSet, LoadMappingsError> {
        let problem = |message: String| LoadMappingsError { problems: vec![Problem { file: dir.to_path_buf(), line: 1, path: String::new(), message }] };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| problem(e.to_string()))?.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "toml" || x == "json") {
                let bytes = std::fs::read(&path).map_err(|e| problem(format!("{}: {e}", path.display())))?;
                files.push((path, bytes));
            }
        }
        MappingSet::from_files(dir, files, definitions)
    }

    /// The mappings compiled into the binary (the repository's `mappings/` at build time).
    pub fn bundled(definitions: &Definitions) -> Result<MappingSet, LoadMappingsError> {
        let dir = Path::new("mappings");
        let files = BUNDLED_MAPPINGS.iter().map(|(name, bytes)| (dir.join(name), bytes.to_vec())).collect();
        MappingSet::from_files(dir, files, definitions)
    }

    /// Checks and compiles mapping files and record schemas given as (path, contents); `dir` names the set in errors.
    pub fn from_files(dir: &Path, mut files: Vec<(PathBuf, Vec<u8>)>, definitions: &Definitions) -> Result<MappingSet, LoadMappingsError> {
        let mut problems = Vec::new();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let schemas = match RecordSchemas::from_files(&files) {
            Ok(schemas) => schemas,
            Err(errors) => {
                let problems = errors.into_iter().map(|e| Problem { file: dir.to_path_buf(), line: 1, path: String::new(), message: e.to_string() }).collect();
                return Err(LoadMappingsError { problems });
            }
        };
        let terminology = Terminology::default();
        let computed_screening = scoring::computed_schema();
        let mut set = MappingSet { dir: dir.to_path_buf(), to_fhir: BTreeMap::new(), from_fhir: BTreeMap::new(), schemas, namespace: ids::DEFAULT_NAMESPACE.to_string() };
        for (file, bytes) in files.into_iter().filter(|(p, _)| p.extension().is_some_and(|x| x == "toml")) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let Some((record_type, direction)) = name.strip_suffix(".toml").and_then(|stem| stem.rsplit_once('.')) else {
                problems.push(Problem { file: file.clone(), line: 1, path: String::new(), message: "a mapping file is named <record>.to-fhir.toml or <record>.from-fhir.toml".into() });
                continue;
            };
            let Some(schema) = set.schemas.get(record_type) else {
                problems.push(Problem { file: file.clone(), line: 1, path: String::new(), message: format!("no schema {record_type}.schema.json beside the mapping") });
                continue;
            };
            let text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    problems.push(Problem { file: file.clone(), line: 1, path: String::new(), message: e.to_string() });
                    continue;
                }
            };
            let context = compile::Context {
                definitions,
                terminology: &terminology,
                schema,
                computed: (record_type == "screening").then_some(&computed_screening),
            };
            match compile::compile_file(&file, &text, &context) {
                Ok(plan) => {
                    let expected = match direction {
                        "to-fhir" => Direction::ToFhir,
                        "from-fhir" => Direction::FromFhir,
                        _ => {
                            problems.push(Problem { file: file.clone(), line: 1, path: String::new(), message: format!("unknown direction '{direction}' in the file name") });
                            continue;
                        }
                    };
                    if plan.direction != expected {
                        problems.push(Problem { file: file.clone(), line: 1, path: String::new(), message: "the direction does not match the file name".into() });
                    } else if expected == Direction::ToFhir {
                        set.to_fhir.insert(record_type.to_string(), plan);
                    } else {
                        set.from_fhir.insert(record_type.to_string(), plan);
                    }
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        if problems.is_empty() { Ok(set) } else { Err(LoadMappingsError { problems }) }
    }

    /// Uses a per-deployment namespace for resource ids (see [`ids`]).
    pub fn with_id_namespace(mut self, namespace: impl Into<String>) -> MappingSet {
        self.namespace = namespace.into();
        self
    }

    /// Maps IOP records to one transaction Bundle. A record that fails its schema or cannot be
    /// mapped is left out and reported as an error issue; the others are still mapped. Records
    /// that add to another record's resource (`merge`) or collect what a resource references
    /// (`collect`) need those records in the same batch; without them the problem is an error issue.
    pub fn records_to_fhir(&self, records: &[Json]) -> Mapped<Json> {
        self.records_to_fhir_resolving(records, &BTreeMap::new())
    }

    /// [`records_to_fhir`](Self::records_to_fhir), with references the caller has already resolved:
    /// `resolved` maps a resource mapping would name (`Type/id`, the id as [`resource_id`](Self::resource_id)
    /// gives it) to the reference of a resource stored under another id (an inbound referral's
    /// ServiceRequest keeps the id its sender's Bundle gave it). Such references are written as the
    /// stored ones, so they are not the batch's to produce (a `collect` does not look for them).
    /// The caller finds them; mapping itself reads nothing.
    pub fn records_to_fhir_resolving(&self, records: &[Json], resolved: &BTreeMap<String, String>) -> Mapped<Json> {
        let mut issues = Vec::new();
        let mut resources = Vec::new();
        let mut by_record = vec![Vec::new(); records.len()];
        for (i, record) in records.iter().enumerate() {
            let label = record_label(record, i);
            let mut error = |path: String, message: String| issues.push(MapIssue { severity: Severity::Error, source: label.clone(), path, message });
            let problems = self.schemas.check(record);
            if !problems.is_empty() {
                for problem in problems {
                    error(problem.path, problem.message);
                }
                continue;
            }
            let record_type = record.get(RECORD_TYPE_MEMBER).and_then(Json::as_str).unwrap_or_default();
            let Some(plan) = self.to_fhir.get(record_type) else {
                error(RECORD_TYPE_MEMBER.to_string(), format!("no mapping {record_type}.to-fhir.toml"));
                continue;
            };
            let (computed, findings) = if record_type == "screening" { scoring::score(record) } else { (Json::Object(Default::default()), Vec::new()) };
            let mut failed = false;
            for finding in findings {
                failed |= finding.is_error;
                let severity = if finding.is_error { Severity::Error } else { Severity::Warning };
                issues.push(MapIssue { severity, source: label.clone(), path: finding.path, message: finding.message });
            }
            if failed {
                continue;
            }
            match eval::to_fhir(plan, &self.namespace, record, &computed) {
                Ok(mut produced) => {
                    for p in &produced {
                        let text = |k: &str| p.resource.get(k).and_then(Json::as_str).unwrap_or_default().to_string();
                        let reference = format!("{}/{}", text("resourceType"), text("id"));
                        if !by_record[i].contains(&reference) {
                            by_record[i].push(reference);
                        }
                    }
                    resources.append(&mut produced)
                }
                Err(e) => issues.push(MapIssue { severity: Severity::Error, source: label.clone(), path: e.path, message: e.message }),
            }
        }
        if !resolved.is_empty() {
            let urls: BTreeMap<String, &String> = resolved
                .iter()
                .filter_map(|(named, stored)| named.split_once('/').map(|(_, id)| (format!("urn:uuid:{id}"), stored)))
                .collect();
            for produced in &mut resources {
                resolve_references(&mut produced.resource, &urls);
            }
        }
        let targets: BTreeMap<String, String> = resources.iter().flat_map(|p| p.targets.iter().cloned()).collect();
        let (bundle, assembly) = bundle::transaction(resources);
        for conflict in assembly.conflicts {
            issues.push(MapIssue {
                severity: Severity::Warning,
                source: conflict.reference,
                path: String::new(),
                message: "two records produced this resource with different content; the later one is kept".into(),
            });
        }
        // A partial resource with nothing to add to, or a collection missing what it references,
        // would leave the receiver an invalid or dangling resource.
        for incomplete in assembly.incomplete {
            issues.push(MapIssue { severity: Severity::Error, source: incomplete.reference, path: String::new(), message: incomplete.message });
        }
        Mapped { output: bundle, issues, produced: by_record, targets }
    }

    /// Maps FHIR input (a Bundle or one resource) to IOP records with every `from-fhir` mapping;
    /// each record produced is checked against its schema.
    pub fn fhir_to_records(&self, input: &Json) -> Mapped<Vec<Json>> {
        let mut issues = Vec::new();
        let mut records = Vec::new();
        for (record_type, plan) in &self.from_fhir {
            match eval::from_fhir(plan, input) {
                Ok(produced) => {
                    for (i, record) in produced.into_iter().enumerate() {
                        let problems = self.schemas.check(&record);
                        let label = format!("{record_type} #{i} from {}", plan.focus.as_deref().unwrap_or_default());
                        for problem in &problems {
                            issues.push(MapIssue { severity: Severity::Error, source: label.clone(), path: problem.path.clone(), message: problem.message.clone() });
                        }
                        if problems.is_empty() {
                            records.push(record);
                        }
                    }
                }
                Err(e) => issues.push(MapIssue { severity: Severity::Error, source: record_type.clone(), path: e.path, message: e.message }),
            }
        }
        Mapped { output: records, issues, produced: Vec::new(), targets: BTreeMap::new() }
    }

    /// The id mapping gives the resource of `resource_type` with this identity (`authorization:{id}:request`).
    pub fn resource_id(&self, resource_type: &str, identity: &str) -> String {
        ids::resource_id(&self.namespace, resource_type, identity)
    }
}

fn record_label(record: &Json, index: usize) -> String {
    let record_type = record.get(RECORD_TYPE_MEMBER).and_then(Json::as_str).unwrap_or("record");
    match record.get("id").and_then(Json::as_str) {
        Some(id) => format!("{record_type} {id}"),
        None => format!("{record_type} #{index}"),
    }
}

/// Writes every `reference` that `urls` names (a batch's `urn:uuid:<id>`) as the stored resource's reference.
fn resolve_references(value: &mut Json, urls: &BTreeMap<String, &String>) {
    match value {
        Json::Object(object) => {
            for (name, member) in object.iter_mut() {
                match member {
                    Json::String(reference) if name == "reference" => {
                        if let Some(stored) = urls.get(reference.as_str()) {
                            *member = Json::string(stored.as_str());
                        }
                    }
                    other => resolve_references(other, urls),
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|i| resolve_references(i, urls)),
        _ => {}
    }
}
