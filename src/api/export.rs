//! Bulk Data `$export` over HTTP (STU 3): kick-off (`[base]/$export`, `Patient/$export`, `Group/[id]/$export`, GET or POST), status and cancel (`$export-status/[job]`), the NDJSON files (`$export-file/[job]/[file]`), and `Patient/[id]/$everything`.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::audit::Audit;
use super::caller::{Caller, disclose, disclose_all};
use super::error::ApiError;
use super::fhir::{self, BundleText, object, query_pairs};
use super::rest::{finish, page_links};
use super::state::AppState;
use crate::auth::{Permission, Principal};
use crate::exchange::now_ms;
use crate::export::{self, ACTIVE_ENROLLMENTS_GROUP, ALL_CLIENTS_GROUP, Level};
use crate::json::Json;
use crate::outcome::{Issue, IssueCode, operation_outcome};
use crate::search::{self, compartment};
use crate::store::ExportJob;

/// `GET`/`POST [base]/$export`.
pub async fn system(State(state): State<AppState>, caller: Caller, method: Method, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    kick_off(state, caller, Level::System, method, headers, uri, body).await
}

/// `GET`/`POST [base]/Patient/$export`.
pub async fn patient(State(state): State<AppState>, caller: Caller, method: Method, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    kick_off(state, caller, Level::Patient, method, headers, uri, body).await
}

/// `GET`/`POST [base]/Group/[id]/$export`.
pub async fn group(State(state): State<AppState>, caller: Caller, Path(id): Path<String>, method: Method, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    kick_off(state, caller, Level::Group { id }, method, headers, uri, body).await
}

async fn kick_off(state: AppState, caller: Caller, level: Level, method: Method, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    let mut audit = caller.audit("operation", "E");
    audit.query = uri.query().map(str::to_string);
    if let Level::Group { id } = &level {
        audit.entities.push(format!("Group/{id}"));
    }
    let result = kick_off_inner(&state, &caller.principal, &caller.base.url, level, method == Method::POST, &headers, &uri, body).await;
    finish(&state, audit, result).await
}

/// The `Prefer` header's tokens, lower-cased (`respond-async`, `handling=lenient`, …).
fn prefer_tokens(headers: &HeaderMap) -> Vec<String> {
    let joined = headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    joined.split([',', ';']).map(|t| t.trim().to_ascii_lowercase().replace(' ', "")).filter(|t| !t.is_empty()).collect()
}

/// A POST kick-off's Parameters as (name, value) text pairs.
async fn posted_parameters(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, ApiError> {
    let bytes = fhir::read_bytes(headers, body, state.loaded.config.server.max_body_bytes).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if !matches!(essence.as_str(), "application/fhir+json" | "application/json") {
        return Err(ApiError::UnsupportedMediaType(format!("Content-Type '{content_type}' is not supported; send the kick-off's Parameters as application/fhir+json")));
    }
    let parameters = fhir::parse_resource(&bytes)?;
    super::write::check_type(&parameters, "Parameters")?;
    let mut out = Vec::new();
    for (i, parameter) in parameters.get("parameter").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let name = parameter.get("name").and_then(Json::as_str).ok_or_else(|| ApiError::BadRequest(format!("Parameters.parameter[{i}]: no name")))?;
        let object = parameter.as_object().into_iter().flat_map(|o| o.iter());
        let value = object.filter(|(k, _)| k.starts_with("value")).find_map(|(k, v)| match (k, v) {
            (_, Json::String(s)) => Some(s.to_string()),
            (_, Json::Bool(b)) => Some(b.to_string()),
            ("valueReference", reference) => reference.get("reference").and_then(Json::as_str).map(str::to_string),
            _ => None,
        });
        let value = value.ok_or_else(|| ApiError::BadRequest(format!("Parameters.parameter[{i}] ('{name}'): a kick-off parameter takes a string, instant, code, boolean or Reference value")))?;
        out.push((name.to_string(), value));
    }
    Ok(out)
}

async fn kick_off_inner(state: &AppState, principal: &Principal, base: &str, level: Level, post: bool, headers: &HeaderMap, uri: &Uri, body: Body) -> Result<Response, ApiError> {
    // The IG has kick-off outcomes in JSON only.
    if fhir::negotiate(headers, &[])? != fhir::Format::Json {
        return Err(ApiError::NotAcceptable("a bulk export kick-off answers in application/fhir+json only".into()));
    }
    let prefer = prefer_tokens(headers);
    if !prefer.iter().any(|t| t == "respond-async") {
        return Err(ApiError::BadRequest("a bulk export runs asynchronously: send 'Prefer: respond-async'".into()));
    }
    let lenient = prefer.iter().any(|t| t == "handling=lenient");
    let mut parameters = query_pairs(uri.query());
    if post {
        parameters.extend(posted_parameters(state, headers, body).await?);
    }
    let known = |t: &str| state.resource_types.contains(t);
    let request = export::read_request(level.clone(), &parameters, post, lenient, &known).map_err(|e| ApiError::BadRequest(format!("$export: {e}")))?;
    let mut plan = request.plan;
    if state.resource_types.iter().all(|t| principal.may(t, Permission::Read).is_err()) {
        return Err(ApiError::Forbidden("the access token grants read access to no resource type; a bulk export needs system/[type].read (or .rs) scopes".into()));
    }
    plan.types = match request.explicit_types {
        Some(types) => {
            for t in &types {
                principal.may(t, Permission::Read).map_err(ApiError::Forbidden)?;
            }
            types
        }
        None => state
            .store
            .stored_types()
            .await?
            .into_iter()
            .filter(|t| known(t) && t != "AuditEvent" && principal.may(t, Permission::Read).is_ok())
            .filter(|t| level == Level::System || compartment::is_patient_type(t))
            .collect(),
    };
    let mut ignored = Vec::new();
    let mut patients = Vec::new();
    for reference in request.patients {
        let id = reference.trim_start_matches("Patient/");
        let visible = match state.store.read("Patient", id).await? {
            Some(p) => principal.disclosure(p.facts_with(&super::part2::consents_for(state, principal, &p).await)).is_allowed(),
            None => false,
        };
        if visible { patients.push(reference) } else { ignored.push(format!("patient={reference}: no such patient")) }
    }
    let mut group_members = None;
    if let Level::Group { id } = &level {
        principal.may("Group", Permission::Read).map_err(ApiError::Forbidden)?;
        if id != ALL_CLIENTS_GROUP && id != ACTIVE_ENROLLMENTS_GROUP {
            let mut stored = state.store.read("Group", id).await?.ok_or_else(|| ApiError::NotFound(format!("Group/{id} is not known")))?;
            disclose(state, principal, &mut stored, &mut Audit::new(&principal.client_id, "read", "R", None)).await?;
            let group = crate::json::parse(stored.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored Group does not parse: {e}")))?;
            let members = group.get("member").and_then(Json::as_array).unwrap_or_default();
            let entities = members.iter().filter_map(|m| m.get("entity")?.get("reference")?.as_str().and_then(search::normalize_reference));
            group_members = Some(entities.filter(|r| r.starts_with("Patient/")).collect::<Vec<_>>());
        }
    }
    let config = &state.loaded.config;
    let now = now_ms();
    let job = ExportJob {
        id: uuid::Uuid::new_v4().to_string(),
        client: principal.client_id.clone(),
        scope: principal.scopes.to_string(),
        status: "running".into(),
        request: format!("{base}{}", uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
        plan: String::new(),
        transaction_time: fhir::now_instant(),
        created_at: now,
        // Writes whose requests began before the transaction time have committed (or failed) by then,
        // so the snapshot the job reads holds every change up to that instant.
        not_before: now + (config.server.request_timeout_secs as i64) * 1000,
        progress: "{}".into(),
        finished_at: 0,
        expires_at: 0,
        error: String::new(),
        manifest: String::new(),
    };
    let mut tx = state.store.begin().await?;
    if tx.running_exports(&job.client).await? >= config.export.max_running_per_client as i64 {
        return Err(ApiError::Throttled {
            message: format!("this client already has {} export(s) running; wait for it, or cancel it with DELETE on its status URL", config.export.max_running_per_client),
            retry_after_secs: config.export.retry_after_secs,
        });
    }
    match (&level, group_members) {
        (Level::Group { .. }, Some(members)) => tx.add_export_members(&job.id, &members).await?,
        (Level::Group { id }, None) => tx.add_enrolled_members(&job.id, id == ACTIVE_ENROLLMENTS_GROUP, &principal.visibility(state.program(), false)).await?,
        _ => {}
    }
    if plan.members && !patients.is_empty() && matches!(level, Level::Group { .. }) {
        let mut in_group = Vec::new();
        for patient in patients {
            if tx.is_export_member(&job.id, &patient).await? { in_group.push(patient) } else { ignored.push(format!("patient={patient}: not a member of the group")) }
        }
        patients = in_group;
        tx.replace_export_members(&job.id, &patients).await?;
    } else if !patients.is_empty() {
        tx.add_export_members(&job.id, &patients).await?;
    }
    if !ignored.is_empty() {
        if !lenient {
            return Err(ApiError::BadRequest(format!("$export: {}", ignored.join("; "))));
        }
        plan.ignored.extend(ignored);
    }
    let job = ExportJob { plan: serde_json::to_string(&plan).map_err(|e| ApiError::Internal(e.to_string()))?, ..job };
    tx.insert_export(&job).await?;
    tx.commit().await?;
    state.export_wake.notify_one();
    let status_url = format!("{base}/$export-status/{}", job.id);
    let message = format!("export {} started; poll {status_url}", job.id);
    let mut response = fhir::json_response(StatusCode::ACCEPTED, operation_outcome(&[Issue::information(IssueCode::Informational, "", message)]).to_string_compact());
    response.headers_mut().insert(header::CONTENT_LOCATION, HeaderValue::from_str(&status_url).map_err(|e| ApiError::Internal(e.to_string()))?);
    Ok(response)
}

/// The caller's own job: another client's job is answered exactly as one that does not exist.
async fn own_job(state: &AppState, caller: &Caller, id: &str) -> Result<ExportJob, ApiError> {
    match state.store.export_job(id).await? {
        Some(job) if job.client == caller.principal.client_id => Ok(job),
        _ => Err(ApiError::NotFound(format!("there is no export {id}"))),
    }
}

/// An HTTP date from milliseconds since the epoch.
fn http_date_ms(ms: i64) -> Option<String> {
    let at = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).ok()?;
    fhir::http_date(&at.format(&time::format_description::well_known::Rfc3339).ok()?)
}

/// `GET [base]/$export-status/[job]`: 202 while running, the manifest when complete, 500 if it failed.
pub async fn status(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    let mut audit = caller.audit("read", "R");
    audit.description = Some(format!("bulk export status {id}"));
    let result = async {
        let job = own_job(&state, &caller, &id).await?;
        match job.status.as_str() {
            "completed" => {
                let manifest = export::manifest(&caller.base.url, &job).map_err(ApiError::Internal)?;
                let mut response = (StatusCode::OK, manifest).into_response();
                response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                if let Some(expires) = http_date_ms(job.expires_at).and_then(|d| HeaderValue::from_str(&d).ok()) {
                    response.headers_mut().insert(header::EXPIRES, expires);
                }
                Ok(response)
            }
            "failed" => Err(ApiError::JobFailed(format!("export {id} failed: {}", job.error))),
            _ => {
                let plan: export::Plan = serde_json::from_str(&job.plan).unwrap_or_default();
                let progress: export::Progress = serde_json::from_str(&job.progress).unwrap_or_default();
                let described = if job.not_before > now_ms() { "queued".to_string() } else { progress.describe(&plan) };
                let mut response = StatusCode::ACCEPTED.into_response();
                let headers = response.headers_mut();
                headers.insert("x-progress", HeaderValue::from_str(&described).unwrap_or(HeaderValue::from_static("in progress")));
                headers.insert(header::RETRY_AFTER, HeaderValue::from(state.loaded.config.export.retry_after_secs));
                Ok(response)
            }
        }
    }
    .await;
    finish(&state, audit, result).await
}

/// `DELETE [base]/$export-status/[job]`: cancels a running export, or removes a finished one's files; afterwards the status URL answers 404.
pub async fn cancel(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    let mut audit = caller.audit("delete", "D");
    audit.description = Some(format!("bulk export {id} cancelled"));
    let result = async {
        own_job(&state, &caller, &id).await?;
        // The row first: a worker still writing sees its next commit refused and removes the folder too.
        state.store.delete_export(&id).await?;
        export::remove_files(&state, &id);
        let message = format!("export {id} was cancelled and its files removed");
        Ok(fhir::json_response(StatusCode::ACCEPTED, operation_outcome(&[Issue::information(IssueCode::Informational, "", message)]).to_string_compact()))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET [base]/$export-file/[job]/[file]`: one NDJSON file of the caller's completed export, streamed from disk.
pub async fn file(State(state): State<AppState>, caller: Caller, Path((id, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let mut audit = caller.audit("read", "R");
    let result = async {
        let job = own_job(&state, &caller, &id).await?;
        let not_found = || ApiError::NotFound(format!("export {id} has no file {name}"));
        if job.status != "completed" {
            return Err(not_found());
        }
        let files: export::Files = serde_json::from_str(&job.manifest).map_err(|e| ApiError::Internal(e.to_string()))?;
        let output = files.output.iter().find(|f| f.name == name);
        let done = output.or_else(|| files.error.iter().find(|f| f.name == name)).ok_or_else(not_found)?;
        if output.is_some() {
            // The same scope check as every read: a token that lost the type since the kick-off gets no file of it.
            caller.principal.may(&done.resource_type, Permission::Read).map_err(ApiError::Forbidden)?;
        }
        let mut opened = tokio::fs::File::open(export::job_dir(&state, &id).join(&done.name)).await.map_err(|_| not_found())?;
        let length = opened.metadata().await.map_err(|e| ApiError::Internal(e.to_string()))?.len();
        audit.description = Some(format!("bulk export {id} file {name}: {} {} resources", done.count, done.resource_type));
        // A client that lost a download part-way asks for the rest (`Range: bytes=N-`); anything but one range is answered whole.
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(byte_range);
        let (status, start, end) = match range {
            Some((start, _)) if start >= length => {
                let message = format!("{name} has {length} bytes; the range asked for starts at {start}");
                let mut response = fhir::json_response(StatusCode::RANGE_NOT_SATISFIABLE, operation_outcome(&[Issue::error(IssueCode::Invalid, "Range", message)]).to_string_compact());
                response.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{length}")).map_err(|e| ApiError::Internal(e.to_string()))?);
                return Ok(response);
            }
            Some((start, last)) => (StatusCode::PARTIAL_CONTENT, start, last.map_or(length, |l| (l + 1).min(length))),
            None => (StatusCode::OK, 0, length),
        };
        if start > 0 {
            tokio::io::AsyncSeekExt::seek(&mut opened, std::io::SeekFrom::Start(start)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        let mut response = Body::new(FileBody { file: opened, buffer: vec![0; 1 << 16], remaining: end - start }).into_response();
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+ndjson"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if status == StatusCode::PARTIAL_CONTENT {
            headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {start}-{}/{length}", end.saturating_sub(1))).map_err(|e| ApiError::Internal(e.to_string()))?);
        }
        Ok(response)
    }
    .await;
    finish(&state, audit, result).await
}

/// One `bytes=first-[last]` range (RFC 9110 §14.1.2); a suffix range, several ranges or anything
/// else is `None`, and the file is sent whole, as a server may.
fn byte_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (first, last) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    let first = first.trim().parse::<u64>().ok()?;
    match last.trim() {
        "" => Some((first, None)),
        last => last.parse::<u64>().ok().filter(|l| *l >= first).map(|l| (first, Some(l))),
    }
}

/// A file (or the part of it asked for) sent in chunks as it is read, so a download holds one buffer whatever the file's size.
struct FileBody {
    file: tokio::fs::File,
    buffer: Vec<u8>,
    /// Bytes still to send.
    remaining: u64,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let room = this.buffer.len().min(usize::try_from(this.remaining).unwrap_or(usize::MAX));
        let mut read = tokio::io::ReadBuf::new(&mut this.buffer[..room]);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut this.file), cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => {
                let chunk = Bytes::copy_from_slice(read.filled());
                this.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
        }
    }
}

/// `GET [base]/Patient/[id]/$everything`: the patient and its compartment that the caller may read, as a searchset (`_since`, `_type`, `_count`, paging).
pub async fn everything(State(state): State<AppState>, caller: Caller, Path(id): Path<String>, uri: Uri) -> Response {
    let mut audit = caller.audit("operation", "E");
    audit.entities.push(format!("Patient/{id}"));
    audit.query = uri.query().map(str::to_string);
    let result = everything_inner(&state, &caller, &mut audit, &id, &uri).await;
    finish(&state, audit, result).await
}

async fn everything_inner(state: &AppState, caller: &Caller, audit: &mut Audit, id: &str, uri: &Uri) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    let principal = &caller.principal;
    principal.may("Patient", Permission::Read).map_err(ApiError::Forbidden)?;
    let config = &state.loaded.config.server;
    let (mut since, mut types, mut count, mut offset) = (None, None::<Vec<String>>, config.default_page_size, 0usize);
    for (name, value) in &pairs {
        let bad = |m: &str| ApiError::BadRequest(format!("$everything: {name}={value}: {m}"));
        match name.as_str() {
            "_since" => since = Some(search::date_range(value).filter(|_| value.contains('T')).ok_or_else(|| bad("not a FHIR instant"))?.0),
            "_type" => {
                for t in value.split(',').map(str::trim) {
                    if !state.resource_types.contains(t) || !compartment::is_patient_type(t) {
                        return Err(bad(&format!("'{t}' is not a type of the Patient compartment")));
                    }
                    principal.may(t, Permission::Read).map_err(ApiError::Forbidden)?;
                    types.get_or_insert_with(Vec::new).push(t.to_string());
                }
            }
            "_count" => count = value.parse::<usize>().map_err(|_| bad("not a non-negative integer"))?.min(config.max_page_size),
            "_offset" => offset = value.parse::<usize>().ok().filter(|n| *n <= 1_000_000).ok_or_else(|| bad("not an offset between 0 and 1000000"))?,
            "_format" | "_pretty" => {}
            _ => return Err(bad("not supported (parameters: _since, _type, _count)")),
        }
    }
    let mut patient = state.store.read("Patient", id).await?.ok_or_else(|| ApiError::NotFound(format!("Patient/{id} is not known")))?;
    disclose(state, principal, &mut patient, audit).await?;
    let types = types.unwrap_or_else(|| {
        compartment::PATIENT.iter().map(|(t, _)| t.to_string()).filter(|t| state.resource_types.contains(t) && principal.may(t, Permission::Read).is_ok()).collect()
    });
    let (total, found) = state.store.compartment_page(&patient.reference(), &types, since.as_deref(), &principal.visibility(state.program(), false), count, offset).await?;
    let found = disclose_all(state, principal, found, audit).await;
    let base = &caller.base.url;
    let links = page_links(&format!("{base}/Patient/{id}/$everything"), &pairs, count, offset, total);
    let mut bundle = BundleText::new("searchset", Some(total), &links);
    for stored in &found {
        audit.entities.push(stored.reference());
        let url = format!("{base}/{}/{}", stored.resource_type, stored.id);
        bundle.entry(Some(&url), Some(&stored.body), &[("search", object([("mode", Json::string("match"))]))]);
    }
    if !audit.disclosures.is_empty() {
        super::part2::notice_entry(&mut bundle);
    }
    Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_range_is_read_and_anything_else_is_not() {
        assert_eq!(byte_range("bytes=100-"), Some((100, None)));
        assert_eq!(byte_range("bytes=0-9"), Some((0, Some(9))));
        for ignored in ["bytes=-500", "bytes=0-9,20-29", "bytes=9-0", "items=0-9", "bytes=x-"] {
            assert_eq!(byte_range(ignored), None, "{ignored}");
        }
    }
}
