//! The validation gate: checks a FHIR R4 resource (JSON or XML) against the base definitions, its `meta.profile` and any profiles asked for.
//!
//! A bad resource is a [`Report`] full of issues, never an `Err` and never a panic: the walk is
//! written not to panic, and a panic that slipped through anyway is caught and reported as a fatal
//! issue so one hostile document cannot take a server down.

mod bundle;
mod canonical;
mod contexts;
mod invariants;
mod measure;
mod primitives;
mod questionnaire;
mod slicing;
mod terminology;
mod walk;
mod xhtml;

use std::sync::Arc;

use crate::definitions::Definitions;
use crate::json::{self, Json};
use crate::outcome::{self, Issue, IssueCode, Severity};

pub use primitives::check_text as check_primitive_text;
pub use terminology::{Membership, Terminology};

/// Choices that change verdicts; the defaults suit a gateway receiving data from partners.
#[derive(Clone, Debug, Default)]
pub struct ValidatorOptions {
    /// Report extensions whose definition is not loaded as errors instead of warnings.
    pub unknown_extensions_are_errors: bool,
}

/// Strictness choices beyond [`ValidatorOptions`], set with [`Validator::with_policy`].
///
/// Build it with `Policy { field: value, ..Policy::default() }`, so new choices can be added
/// without breaking callers. The defaults suit a gateway; the HL7 reference validator's defaults
/// are [`Policy::reference_validator`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Severity of a Coding whose display is not the one its (loaded) code system gives the code.
    pub wrong_display: Severity,
    /// Whether URLs on `example.org` (reserved for examples) are acceptable; production data should not carry them.
    pub allow_example_urls: bool,
    /// Refuse strings that look like they embed HTML markup (script injection into systems that render them).
    pub security_checks: bool,
    /// Severity of markdown that contains what looks like an HTML tag (renderers escape it, which may not be intended).
    pub html_in_markdown: Severity,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { wrong_display: Severity::Warning, allow_example_urls: true, security_checks: false, html_in_markdown: Severity::Warning }
    }
}

impl Policy {
    /// The choices the HL7 reference (Java) validator makes by default.
    pub fn reference_validator() -> Policy {
        Policy { wrong_display: Severity::Error, ..Policy::default() }
    }
}

/// Validates resources against one set of definitions; cheap to share between threads.
pub struct Validator {
    definitions: Arc<Definitions>,
    terminology: Terminology,
    options: ValidatorOptions,
    policy: Policy,
}

/// The result of validating one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub issues: Vec<Issue>,
}

impl Report {
    /// Whether no issue is an error or fatal.
    pub fn is_valid(&self) -> bool {
        !self.issues.iter().any(|i| i.severity.is_error())
    }

    pub fn n_errors(&self) -> usize {
        self.issues.iter().filter(|i| i.severity.is_error()).count()
    }

    pub fn n_warnings(&self) -> usize {
        self.issues.iter().filter(|i| i.severity == Severity::Warning).count()
    }

    /// The report as an OperationOutcome resource.
    pub fn to_operation_outcome(&self) -> Json {
        outcome::operation_outcome(&self.issues)
    }
}

/// The wire format of a document, detected from its first significant byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    pub fn detect(bytes: &[u8]) -> Format {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'<') => Format::Xml,
            _ => Format::Json,
        }
    }
}

impl Validator {
    pub fn new(definitions: Arc<Definitions>) -> Validator {
        Validator::with_options(definitions, ValidatorOptions::default())
    }

    pub fn with_options(definitions: Arc<Definitions>, options: ValidatorOptions) -> Validator {
        Validator { definitions, terminology: Terminology::default(), options, policy: Policy::default() }
    }

    /// The same validator with other strictness choices.
    pub fn with_policy(mut self, policy: Policy) -> Validator {
        self.policy = policy;
        self
    }

    pub fn definitions(&self) -> &Arc<Definitions> {
        &self.definitions
    }

    /// Validates a document given as bytes (JSON or XML), with extra profiles by canonical URL.
    pub fn validate_bytes(&self, bytes: &[u8], profiles: &[String]) -> Report {
        match self.read(bytes) {
            Ok((resource, mut issues)) => {
                let mut report = self.validate_json(&resource, profiles);
                issues.append(&mut report.issues);
                Report { issues: dedupe(issues) }
            }
            Err(issue) => Report { issues: vec![issue] },
        }
    }

    /// Reads a document into the JSON tree, with the problems the reader found on the way.
    pub fn read(&self, bytes: &[u8]) -> Result<(Json, Vec<Issue>), Issue> {
        match Format::detect(bytes) {
            Format::Json => match json::parse(bytes) {
                Ok(resource) => Ok((resource, Vec::new())),
                Err(e) => Err(Issue::new(Severity::Fatal, IssueCode::Structure, e.path.clone(), format!("the document is not valid JSON: {}", e.message))
                    .with_position(e.line, e.column)),
            },
            Format::Xml => crate::xml::parse_resource(bytes, &*self.definitions).map_err(|e| e.to_issue()),
        }
    }

    /// Validates a parsed resource.
    pub fn validate_json(&self, resource: &Json, profiles: &[String]) -> Report {
        let root = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default().to_string();
        let run = std::panic::AssertUnwindSafe(|| {
            let mut walker = walk::Walker::new(self, root.clone());
            walker.resource(resource, profiles);
            walker.issues
        });
        let issues = std::panic::catch_unwind(run).unwrap_or_else(|_| {
            vec![Issue::new(Severity::Fatal, IssueCode::Exception, root.clone(), "internal error while validating; the resource was not accepted")]
        });
        Report { issues: dedupe(issues) }
    }

    /// Validates a `serde_json::Value` (for callers that already hold one; numbers lose their original text).
    pub fn validate_value(&self, resource: &serde_json::Value, profiles: &[String]) -> Report {
        self.validate_json(&Json::from(resource), profiles)
    }

    /// Whether a resource or data type value conforms to a profile (used by slicing and `conformsTo()`).
    pub fn conforms_to(&self, value: &Json, profile: &str) -> bool {
        let Some(structure) = self.definitions.structure(profile) else { return false };
        let mut walker = walk::Walker::new(self, structure.type_name.clone());
        if structure.kind == crate::definitions::StructureKind::Resource {
            walker.resource(value, &[profile.to_string()]);
        } else {
            walker.object(&structure, 0, value, &structure.type_name.clone());
        }
        !walker.issues.iter().any(|i| i.severity.is_error())
    }
}

/// Drops exact repeats (the base walk and a profile walk often find the same problem), keeping order.
fn dedupe(issues: Vec<Issue>) -> Vec<Issue> {
    let mut seen = foldhash::HashSet::default();
    let keep: Vec<bool> = issues.iter().map(|i| seen.insert((i.severity, i.expression.as_str(), i.message.as_str()))).collect();
    issues.into_iter().zip(keep).filter_map(|(issue, keep)| keep.then_some(issue)).collect()
}

#[cfg(test)]
mod tests;
