//! Bulk Data export (STU 3): the plan a kick-off makes (level, types, `_since`/`_until`, `_typeFilter`), and the worker inside `serve` that writes each job's NDJSON files page by page.
//!
//! A job is a row in the store. The worker claims it by compare-and-set on a lease, reads one page
//! of resources at a time (keyset by id, each resource as it was at the job's transaction time),
//! passes each row, as the store hands it over, through the one disclosure check, appends the stored
//! JSON text to the type's current file, and then commits its cursor (type, last id, the file's
//! length) with the lease renewed. A worker that stops leaves a cursor behind; the next one
//! truncates the current file to the committed length and goes on, so no line is written twice and
//! memory never holds more than one resource (not a page).

use std::collections::BTreeMap;
use std::io::{Seek as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::audit::{Audit, AuditOutcome};
use crate::api::caller::{disclose_version_with, principal_of, record};
use crate::api::state::AppState;
use crate::exchange::now_ms;
use crate::json::Json;
use crate::outcome::{Issue, IssueCode, operation_outcome};
use crate::search::{self, Query, compartment};
use crate::store::{Compartment, ExportJob, ExportPage, StoreError};

/// The Groups the gateway keeps for the program's clients: computed from the EpisodeOfCare resources
/// (enrollments) when an export of one starts, so they are never stale.
pub const ALL_CLIENTS_GROUP: &str = "iop-all-clients";
pub const ACTIVE_ENROLLMENTS_GROUP: &str = "iop-active-enrollments";

/// The output formats a kick-off may ask for: NDJSON under its three names.
const NDJSON_NAMES: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Search result parameters a `_typeFilter` query may not carry (the IG: filters only).
const RESULT_PARAMETERS: &[&str] = &["_count", "_offset", "_sort", "_include", "_revinclude", "_elements", "_summary", "_total", "_contained", "_containedType", "_format"];

/// Which data a kick-off asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "lowercase")]
pub enum Level {
    /// `[base]/$export`: everything the client may see.
    System,
    /// `[base]/Patient/$export`: every patient's compartment (or the `patient` list's).
    Patient,
    /// `[base]/Group/[id]/$export`: the compartments of the Group's member patients.
    Group { id: String },
}

/// A kick-off as the worker runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub level: Option<Level>,
    /// Resource types in export order.
    pub types: Vec<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// `_typeFilter` queries: (type, query string); several for one type are ORed.
    pub type_filters: Vec<(String, String)>,
    /// Whether the job exports only its members' compartments (Group, or `patient` on POST).
    pub members: bool,
    /// Parameters ignored under `Prefer: handling=lenient`, reported in the manifest's `error` file.
    pub ignored: Vec<String>,
}

/// What a kick-off asked for, before types are resolved against the caller's scopes and the store.
#[derive(Debug, Default)]
pub struct Request {
    pub plan: Plan,
    /// `_type` given: exactly these types (otherwise every type the caller may read).
    pub explicit_types: Option<Vec<String>>,
    /// `patient` (POST): `Patient/<id>` references.
    pub patients: Vec<String>,
}

/// A kick-off parameter (or value) the gateway does not support or cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct Unsupported {
    pub parameter: String,
    pub message: String,
}

/// Reads a kick-off's parameters (`post`: they came in a Parameters body, where `patient` is allowed).
/// `known_type` says which resource types exist. Every problem is an [`Unsupported`]; with `lenient`
/// the parameter is left out and noted in the plan instead.
pub fn read_request(level: Level, parameters: &[(String, String)], post: bool, lenient: bool, known_type: &dyn Fn(&str) -> bool) -> Result<Request, Unsupported> {
    let mut request = Request { plan: Plan { members: matches!(level, Level::Group { .. }), ..Plan::default() }, ..Request::default() };
    let patient_level = level != Level::System;
    for (name, value) in parameters {
        let problem = |message: String| Unsupported { parameter: format!("{name}={value}"), message };
        let read = match name.as_str() {
            "_outputFormat" if NDJSON_NAMES.contains(&value.to_ascii_lowercase().as_str()) => Ok(()),
            "_outputFormat" => Err(problem("the only output format is NDJSON (application/fhir+ndjson, application/ndjson or ndjson)".into())),
            "_since" | "_until" => match instant(value) {
                Some(at) if name == "_since" => {
                    request.plan.since = Some(at);
                    Ok(())
                }
                Some(at) => {
                    request.plan.until = Some(at);
                    Ok(())
                }
                None => Err(problem("not a FHIR instant (such as 2026-03-01T00:00:00Z: date, time and zone)".into())),
            },
            "_type" => {
                let mut problems = Vec::new();
                let types = request.explicit_types.get_or_insert_with(Vec::new);
                for t in value.split(',').map(str::trim) {
                    if !known_type(t) || t == "AuditEvent" {
                        problems.push(format!("'{t}' is not a resource type this server exports"));
                    } else if patient_level && !compartment::is_patient_type(t) {
                        problems.push(format!("'{t}' is not in the Patient compartment, which a Patient- or Group-level export covers"));
                    } else if !types.iter().any(|x| x == t) {
                        types.push(t.to_string());
                    }
                }
                if problems.is_empty() { Ok(()) } else { Err(problem(problems.join("; "))) }
            }
            "_typeFilter" => match type_filter(value, known_type) {
                Ok(filter) => {
                    request.plan.type_filters.push(filter);
                    Ok(())
                }
                Err(message) => Err(problem(message)),
            },
            "patient" if !post => Err(problem("'patient' is accepted only in a POST kick-off's Parameters".into())),
            "patient" if !patient_level => Err(problem("'patient' applies to Patient- and Group-level exports, not to a system-level one".into())),
            "patient" => match search::normalize_reference(value).filter(|r| r.starts_with("Patient/")) {
                Some(reference) => {
                    request.patients.push(reference);
                    Ok(())
                }
                None => Err(problem("expected a reference to a Patient (Patient/[id])".into())),
            },
            "allowPartialManifests" if value == "true" || value == "false" => Ok(()),
            "allowPartialManifests" => Err(problem("expected true or false".into())),
            "_elements" | "includeAssociatedData" | "organizeOutputBy" => {
                Err(problem(format!("'{name}' is not supported: files hold whole resources, one type per file, with no associated data")))
            }
            _ => Err(problem("not a Bulk Data kick-off parameter".into())),
        };
        if let Err(e) = read {
            if !lenient {
                return Err(e);
            }
            request.plan.ignored.push(e.to_string());
        }
    }
    if !request.patients.is_empty() {
        request.plan.members = true;
    }
    request.plan.level = Some(level);
    Ok(request)
}

/// A FHIR `instant` (date, time to the second and zone) as the store's UTC instant text.
fn instant(value: &str) -> Option<String> {
    let (_, time) = value.split_once('T')?;
    let zoned = time.ends_with('Z') || time.contains('+') || time.contains('-');
    if !zoned || time.len() < 9 {
        return None;
    }
    search::date_range(value).map(|(low, _)| low)
}

/// Reads one `_typeFilter` value (`Type?query`) as a search the registry can run.
fn type_filter(value: &str, known_type: &dyn Fn(&str) -> bool) -> Result<(String, String), String> {
    let (resource_type, query) = value.split_once('?').ok_or("expected [type]?[search parameters]")?;
    if !known_type(resource_type) {
        return Err(format!("'{resource_type}' is not a resource type this server exports"));
    }
    parse_filter(resource_type, query)?;
    Ok((resource_type.to_string(), query.to_string()))
}

/// A `_typeFilter` query as a search: filters only, at least one, each supported by the search registry.
fn parse_filter(resource_type: &str, query: &str) -> Result<Query, String> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    if let Some((name, _)) = pairs.iter().find(|(name, _)| RESULT_PARAMETERS.contains(&name.as_str())) {
        return Err(format!("'{name}' is a search result parameter; a _typeFilter holds filters only"));
    }
    let parsed = search::parse_query(resource_type, &pairs, 1, 1, false).map_err(|e| e.0)?;
    if parsed.clauses.is_empty() {
        return Err("the query filters nothing".into());
    }
    Ok(parsed)
}

/// A file the worker finished: its type, name in the job's folder, and how many resources it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDone {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub count: u64,
}

/// The worker's cursor, committed after every page (a new job's is `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// Index into the plan's types.
    pub type_index: usize,
    /// The last id read of that type.
    pub after: String,
    /// Number of the type's current file (from 1).
    pub part: u32,
    /// Committed length of the current file; anything after it was written by a worker that stopped.
    pub bytes: u64,
    /// Resources in the current file.
    pub lines: u64,
    pub files: Vec<FileDone>,
    pub written: u64,
    /// Resources the disclosure check kept out (counted, never named in the output).
    pub withheld: u64,
    /// 42 CFR Part 2 resources written under the patient's consent.
    pub disclosed: u64,
}

/// The files of a completed job (the manifest without URLs, which the serving instance adds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    pub output: Vec<FileDone>,
    pub error: Vec<FileDone>,
    /// Whether the files disclose 42 CFR Part 2 data (the manifest then carries the § 2.32 notice).
    #[serde(default)]
    pub part2: bool,
}

impl Progress {
    /// `X-Progress` (under 100 characters).
    pub fn describe(&self, plan: &Plan) -> String {
        match plan.types.get(self.type_index) {
            Some(t) => format!("{} resources written; type {} of {} ({t})", self.written, self.type_index + 1, plan.types.len()),
            None => format!("{} resources written; finishing", self.written),
        }
    }
}

/// The folder of a job's files.
pub fn job_dir(state: &AppState, job: &str) -> PathBuf {
    state.loaded.config.store.data_dir.join("exports").join(job)
}

/// Removes a job's files (cancel, expiry); a folder already gone is fine.
pub fn remove_files(state: &AppState, job: &str) {
    let dir = job_dir(state, job);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(job = job, error = %e, "An export's files could not be removed.");
    }
}

/// Why a job stopped without finishing.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// The lease was lost or the job was cancelled: another worker (or nobody) owns it now.
    #[error("the job is no longer this worker's")]
    Lost,
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("writing the export's files failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Runs the export worker until the task is aborted.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { run(state).await })
}

async fn run(state: AppState) {
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4());
    let lease = (state.loaded.config.export.lease_secs as i64) * 1000;
    loop {
        purge(&state).await;
        let now = now_ms();
        match state.store.claim_export(now, now + lease, &owner).await {
            Ok(Some(job)) => {
                let id = job.id.clone();
                match run_job(&state, &owner, job).await {
                    Ok(()) | Err(JobError::Lost) => {}
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "An export failed.");
                        let retention = (state.loaded.config.export.retention_secs as i64) * 1000;
                        let now = now_ms();
                        if let Err(e) = state.store.finish_export(&id, &owner, false, &e.to_string(), now, now + retention).await {
                            tracing::warn!(job = %id, error = %e, "A failed export could not be recorded; another worker will take it up after its lease.");
                        }
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "Export jobs could not be read; trying again."),
        }
        tokio::select! {
            _ = state.export_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Deletes the files and rows of finished jobs past their retention.
async fn purge(state: &AppState) {
    match state.store.expired_exports(now_ms()).await {
        Ok(expired) => {
            for job in expired {
                remove_files(state, &job);
                if let Err(e) = state.store.delete_export(&job).await {
                    tracing::warn!(job = %job, error = %e, "An expired export could not be deleted.");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "Expired exports could not be read."),
    }
}

async fn run_job(state: &AppState, owner: &str, job: ExportJob) -> Result<(), JobError> {
    let config = &state.loaded.config.export;
    let plan: Plan = serde_json::from_str(&job.plan).map_err(|e| JobError::Invalid(format!("the job's plan does not read: {e}")))?;
    let mut progress: Progress = serde_json::from_str(&job.progress).map_err(|e| JobError::Invalid(format!("the job's progress does not read: {e}")))?;
    let principal = principal_of(state, &job.client, &job.scope).ok_or_else(|| JobError::Invalid(format!("the client '{}' is no longer registered", job.client)))?;
    let visibility = principal.visibility(state.program(), false);
    let compartment = match (&plan.level, plan.members) {
        (_, true) => Compartment::Members,
        (Some(Level::Patient), false) => Compartment::AnyPatient,
        _ => Compartment::All,
    };
    let mut filters: BTreeMap<&str, Vec<Query>> = BTreeMap::new();
    for (resource_type, query) in &plan.type_filters {
        filters.entry(resource_type.as_str()).or_default().push(parse_filter(resource_type, query).map_err(JobError::Invalid)?);
    }
    let dir = job_dir(state, &job.id);
    std::fs::create_dir_all(&dir)?;
    let lease = (config.lease_secs as i64) * 1000;
    // Counted per page only: a page's withheld references are never kept, so memory stays flat.
    let mut scratch = Audit::new(&job.client, "operation", "E", None);
    while let Some(resource_type) = plan.types.get(progress.type_index) {
        let after = progress.after.clone();
        let page = ExportPage {
            job: &job.id,
            resource_type,
            after: &after,
            transaction_time: &job.transaction_time,
            since: plan.since.as_deref(),
            until: plan.until.as_deref(),
            filters: filters.get(resource_type.as_str()).map(Vec::as_slice).unwrap_or(&[]),
            compartment,
            visibility: &visibility,
            limit: config.page_size,
        };
        if progress.part == 0 {
            progress.part = 1;
        }
        let name = format!("{resource_type}-{}.ndjson", progress.part);
        let path = dir.join(&name);
        // Rows are written as the store hands them over, one at a time: memory holds one resource, not a page.
        let mut out: Option<std::io::BufWriter<std::fs::File>> = None;
        // Consents are read again for every page, so a revocation stops an export within one page.
        let page_consents = crate::api::part2::RecipientConsents::read(state, &principal).await?;
        state
            .store
            .export_page(&page, |row| -> Result<(), JobError> {
                let out = match &mut out {
                    Some(out) => out,
                    None => {
                        let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path)?;
                        // What a stopped worker wrote after its last commit is cut off and written again.
                        file.set_len(progress.bytes)?;
                        file.seek(std::io::SeekFrom::Start(progress.bytes))?;
                        out.insert(std::io::BufWriter::with_capacity(1 << 16, file))
                    }
                };
                progress.after.clone_from(&row.version.id);
                let consents = page_consents.of(&principal, &row.current, &row.version);
                match disclose_version_with(&principal, &row.current, row.version, &consents, &mut scratch) {
                    Some(version) => {
                        out.write_all(version.body.as_bytes())?;
                        out.write_all(b"\n")?;
                        progress.bytes += version.body.len() as u64 + 1;
                        progress.lines += 1;
                        progress.written += 1;
                    }
                    None => progress.withheld += 1,
                }
                Ok(())
            })
            .await?;
        scratch.description = None;
        progress.disclosed += scratch.disclosures.len() as u64;
        crate::api::caller::record_disclosures(state, &scratch).await;
        scratch.disclosures.clear();
        if let Some(out) = out {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            // The committed length must be on disk before the cursor that names it.
            file.sync_data()?;
            if progress.bytes >= config.max_file_bytes {
                close_file(&mut progress, resource_type, name);
            }
        } else {
            // The type is done: its last file is listed if it holds anything.
            if progress.lines > 0 {
                close_file(&mut progress, resource_type, name);
            } else if path.exists() {
                std::fs::remove_file(&path)?;
            }
            progress.type_index += 1;
            progress.after.clear();
            progress.part = 1;
            progress.bytes = 0;
            progress.lines = 0;
        }
        let text = serde_json::to_string(&progress).map_err(|e| JobError::Invalid(e.to_string()))?;
        if !state.store.export_progress(&job.id, owner, &text, now_ms() + lease).await? {
            // Cancelled (its row is gone, and its files with it) or taken over after a lost lease.
            if state.store.export_job(&job.id).await?.is_none() {
                remove_files(state, &job.id);
            }
            return Err(JobError::Lost);
        }
    }
    let mut files = Files { output: progress.files.clone(), error: Vec::new(), part2: progress.disclosed > 0 };
    if !plan.ignored.is_empty() {
        let name = "OperationOutcome-1.ndjson".to_string();
        let mut text = String::new();
        for ignored in &plan.ignored {
            let issue = Issue::warning(IssueCode::NotSupported, "", format!("ignored under Prefer: handling=lenient: {ignored}"));
            text.push_str(&operation_outcome(&[issue]).to_string_compact());
            text.push('\n');
        }
        std::fs::write(dir.join(&name), text)?;
        files.error.push(FileDone { resource_type: "OperationOutcome".into(), name, count: plan.ignored.len() as u64 });
    }
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for file in &files.output {
        *counts.entry(file.resource_type.as_str()).or_default() += file.count;
    }
    let mut audit = Audit::new(&job.client, "operation", "E", None);
    let by_type: Vec<String> = counts.iter().map(|(t, n)| format!("{t} {n}")).collect();
    audit.description = Some(format!(
        "bulk export {}: {} resources written ({}); {} withheld by the disclosure check",
        job.id,
        progress.written,
        if by_type.is_empty() { "none".to_string() } else { by_type.join(", ") },
        progress.withheld
    ));
    audit.query = Some(job.request.clone());
    if let Some(Level::Group { id }) = &plan.level {
        audit.entities.push(format!("Group/{id}"));
    }
    let manifest = serde_json::to_string(&files).map_err(|e| JobError::Invalid(e.to_string()))?;
    let now = now_ms();
    if !state.store.finish_export(&job.id, owner, true, &manifest, now, now + (config.retention_secs as i64) * 1000).await? {
        return Err(JobError::Lost);
    }
    record(state, &audit, AuditOutcome::Success).await;
    Ok(())
}

/// Lists the current file as done and moves on to the type's next one.
fn close_file(progress: &mut Progress, resource_type: &str, name: String) {
    progress.files.push(FileDone { resource_type: resource_type.to_string(), name, count: progress.lines });
    progress.part += 1;
    progress.bytes = 0;
    progress.lines = 0;
}

/// The member of the manifest's `extension` that holds the 42 CFR § 2.32 notice.
pub const PART2_NOTICE_MEMBER: &str = "part2Notice";

/// The manifest of a completed job, with the file URLs under `base`.
pub fn manifest(base: &str, job: &ExportJob) -> Result<String, String> {
    let files: Files = serde_json::from_str(&job.manifest).map_err(|e| format!("the job's files do not read: {e}"))?;
    let list = |items: &[FileDone]| {
        Json::Array(
            items
                .iter()
                .map(|f| {
                    crate::api::fhir::object([
                        ("type", Json::string(f.resource_type.as_str())),
                        ("url", Json::string(format!("{base}/$export-file/{}/{}", job.id, f.name))),
                        ("count", Json::Number(f.count.to_string().into())),
                    ])
                })
                .collect(),
        )
    };
    let mut members = vec![
        ("transactionTime", Json::string(job.transaction_time.as_str())),
        ("request", Json::string(job.request.as_str())),
        ("requiresAccessToken", Json::Bool(true)),
        ("output", list(&files.output)),
        ("error", list(&files.error)),
    ];
    if files.part2 {
        // Bulk Data reserves `extension` for a server's own members: the notice that must accompany the disclosure.
        members.push(("extension", crate::api::fhir::object([(PART2_NOTICE_MEMBER, Json::string(crate::auth::labelling::NOTICE))])));
    }
    Ok(crate::api::fhir::object(members).to_string_compact())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn known(t: &str) -> bool {
        ["Patient", "Observation", "Organization", "AuditEvent", "Group"].contains(&t)
    }

    #[test]
    fn kick_off_parameters_are_read_or_refused_by_name() {
        let read = read_request(
            Level::System,
            &pairs(&[("_outputFormat", "ndjson"), ("_type", "Patient,Observation"), ("_type", "Patient"), ("_since", "2026-03-01T10:00:00+01:00"), ("_typeFilter", "Observation?status=final")]),
            false,
            false,
            &known,
        )
        .unwrap();
        assert_eq!(read.explicit_types.unwrap(), ["Patient", "Observation"]);
        assert_eq!(read.plan.since.as_deref(), Some("2026-03-01T09:00:00.000Z"));
        assert_eq!(read.plan.type_filters, [("Observation".to_string(), "status=final".to_string())]);
        for bad in [
            ("_outputFormat", "application/fhir+json"),
            ("_since", "2026-03-01"),
            ("_type", "Bogus"),
            ("_type", "AuditEvent"),
            ("_typeFilter", "Observation?_sort=date"),
            ("_typeFilter", "Observation?nonsense=1"),
            ("_elements", "id"),
            ("includeAssociatedData", "LatestProvenanceResources"),
            ("organizeOutputBy", "Patient"),
            ("patient", "Patient/1"),
            ("allowPartialManifests", "maybe"),
            ("_count", "10"),
        ] {
            let e = read_request(Level::System, &pairs(&[bad]), false, false, &known).unwrap_err();
            assert!(e.parameter.starts_with(bad.0), "{bad:?}: {e}");
        }
        let lenient = read_request(Level::System, &pairs(&[("_elements", "id"), ("_type", "Patient")]), false, true, &known).unwrap();
        assert_eq!(lenient.plan.ignored.len(), 1);
        assert!(read_request(Level::Patient, &pairs(&[("_type", "Organization")]), false, false, &known).is_err(), "outside the Patient compartment");
        let posted = read_request(Level::Patient, &pairs(&[("patient", "Patient/p1")]), true, false, &known).unwrap();
        assert!(posted.plan.members);
        assert_eq!(posted.patients, ["Patient/p1"]);
    }
}
