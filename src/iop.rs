//! IOP-side records (client, enrollment, care plan, session, screening, drug screen, referral, authorization, payer decision, discharge, consent): their JSON Schemas and checking a record against them.
//!
//! A record is plain JSON with a `record_type` member naming its kind. Its shape is defined by
//! `mappings/<record_type>.schema.json` (JSON Schema 2020-12), which sits beside the mappings of
//! the same concept, so an integration engineer who adds a field edits data, not Rust. The
//! schemas are read when the mapping set loads; records are checked with the `jsonschema` crate
//! and every problem comes back with the JSON path of the offending value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::json::Json;

/// The member every record carries to say which kind it is.
pub const RECORD_TYPE_MEMBER: &str = "record_type";

/// The record kinds the gateway knows, in the order an episode of care produces them.
pub const RECORD_TYPES: &[&str] = &["client", "enrollment", "care_plan", "session", "screening", "drug_screen", "referral", "authorization", "decision", "discharge", "consent"];

/// A problem with one record: where (a dotted path such as `items[3].answer`) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordIssue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for RecordIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Why the record schemas could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadSchemasError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not JSON: {message}")]
    NotJson { path: PathBuf, line: usize, message: String },
    #[error("{path}: not a usable JSON Schema: {message}")]
    BadSchema { path: PathBuf, message: String },
}

/// One compiled record schema.
pub struct RecordSchema {
    pub record_type: String,
    /// The schema document, for mapping compilation (paths and types are looked up in it).
    pub document: serde_json::Value,
    pub file: PathBuf,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for RecordSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSchema").field("record_type", &self.record_type).field("file", &self.file).finish()
    }
}

/// Whether `text` is a local time of day, `hh:mm:ss` with an optional fraction of a second (FHIR `time`).
fn is_local_time(text: &str) -> bool {
    let (clock, fraction) = text.split_once('.').map_or((text, None), |(c, f)| (c, Some(f)));
    let fields: Vec<&str> = clock.split(':').collect();
    let field_below = |field: &str, limit: u32| field.len() == 2 && field.bytes().all(|b| b.is_ascii_digit()) && field.parse::<u32>().is_ok_and(|n| n < limit);
    fields.len() == 3
        && field_below(fields[0], 24)
        && field_below(fields[1], 60)
        && field_below(fields[2], 60)
        && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

impl RecordSchema {
    /// Compiles a schema document for `record_type`.
    pub fn compile(record_type: &str, document: serde_json::Value, file: PathBuf) -> Result<RecordSchema, LoadSchemasError> {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            // A record's time is a local time of day (a track's start), as FHIR's `time` is; JSON Schema's own
            // `time` format wants an offset, which a clinic's timetable does not have.
            .with_format("time", is_local_time)
            .build(&document)
            .map_err(|e| LoadSchemasError::BadSchema { path: file.clone(), message: e.to_string() })?;
        Ok(RecordSchema { record_type: record_type.to_string(), document, file, validator })
    }

    /// Compiles the text of a schema file (`file` names it in errors).
    pub fn parse(record_type: &str, bytes: &[u8], file: PathBuf) -> Result<RecordSchema, LoadSchemasError> {
        let document: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| LoadSchemasError::NotJson { path: file.clone(), line: e.line(), message: e.to_string() })?;
        RecordSchema::compile(record_type, document, file)
    }

    /// Checks a record; an empty list means it conforms.
    pub fn check(&self, record: &Json) -> Vec<RecordIssue> {
        let value = serde_json::Value::from(record);
        self.validator
            .iter_errors(&value)
            .map(|e| RecordIssue { path: pointer_to_path(e.instance_path().as_str()), message: e.to_string() })
            .collect()
    }
}

/// The schemas of every record type present in a folder.
#[derive(Debug, Default)]
pub struct RecordSchemas {
    pub by_type: BTreeMap<String, RecordSchema>,
}

impl RecordSchemas {
    /// The schemas among files given as (path, contents), e.g. the mappings compiled into the binary.
    pub fn from_files(files: &[(PathBuf, Vec<u8>)]) -> Result<RecordSchemas, Vec<LoadSchemasError>> {
        let mut schemas = RecordSchemas::default();
        let mut problems = Vec::new();
        for record_type in RECORD_TYPES {
            let name = format!("{record_type}.schema.json");
            let Some((path, bytes)) = files.iter().find(|(p, _)| p.file_name().is_some_and(|n| n.to_str() == Some(name.as_str()))) else { continue };
            match RecordSchema::parse(record_type, bytes, path.clone()) {
                Ok(schema) => {
                    schemas.by_type.insert((*record_type).to_string(), schema);
                }
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() { Ok(schemas) } else { Err(problems) }
    }

    pub fn get(&self, record_type: &str) -> Option<&RecordSchema> {
        self.by_type.get(record_type)
    }

    /// Checks a record against the schema its `record_type` names.
    pub fn check(&self, record: &Json) -> Vec<RecordIssue> {
        let Some(record_type) = record.get(RECORD_TYPE_MEMBER).and_then(Json::as_str) else {
            return vec![RecordIssue { path: String::new(), message: format!("the record has no '{RECORD_TYPE_MEMBER}' member") }];
        };
        match self.get(record_type) {
            Some(schema) => schema.check(record),
            None => vec![RecordIssue {
                path: RECORD_TYPE_MEMBER.to_string(),
                message: format!("unknown record type '{record_type}' (known: {})", self.by_type.keys().cloned().collect::<Vec<_>>().join(", ")),
            }],
        }
    }
}

/// `/items/3/answer` → `items[3].answer`, the path style used everywhere else in the gateway.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

#[cfg(test)]
mod tests;
