//! `POST /` with a transaction Bundle (all entries in one store transaction, or none) or a batch Bundle (each entry on its own).
//!
//! In a transaction, `urn:uuid:` fullUrls of POST entries get server ids and every reference to
//! them is rewritten; entries may be conditional (`ifNoneExist`, `PUT Type?criteria`). Every
//! resource is validated before anything is written; ids in `request.url` are checked like ids in
//! bodies. Each entry goes through the one write path on its own terms (owner, parties of its own
//! version); the Bundle's security labels are kept on every entry.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::audit::{Audit, AuditOutcome};
use super::caller::{Caller, disclose};
use super::error::ApiError;
use super::fhir::{self, BundleText, Return, entry_response, object, prefer_return};
use super::rest::{self, finish, known_type};
use super::validate;
use super::state::AppState;
use super::write::{self, ATTEMPTS, Change, Failure};
use crate::auth::{Permission, Principal, labels};
use crate::json::Json;
use crate::outcome::operation_outcome;
use crate::store::Stored;

/// One Bundle entry's request.
#[derive(Clone, Debug)]
pub struct Entry {
    pub full_url: Option<String>,
    pub method: String,
    pub resource_type: String,
    /// The id in `Type/id`, when the URL has one.
    pub id: Option<String>,
    /// Search criteria of a conditional PUT.
    pub criteria: Option<String>,
    pub if_none_exist: Option<String>,
    pub if_match: Option<i64>,
    pub resource: Option<Json>,
}

pub fn parse_entries(bundle: &Json) -> Result<Vec<Entry>, ApiError> {
    let mut out = Vec::new();
    for (i, entry) in bundle.get("entry").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let at = |m: &str| ApiError::BadRequest(format!("Bundle.entry[{i}]: {m}"));
        let request = entry.get("request").ok_or_else(|| at("no request"))?;
        let method = request.get("method").and_then(Json::as_str).ok_or_else(|| at("no request.method"))?.to_string();
        let url = request.get("url").and_then(Json::as_str).ok_or_else(|| at("no request.url"))?;
        let (path, criteria) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (url, None),
        };
        let mut segments = path.trim_start_matches('/').split('/');
        let resource_type = segments.next().unwrap_or_default().to_string();
        let id = segments.next().map(str::to_string);
        if segments.next().is_some() {
            return Err(at("request.url must be Type, Type/id or Type?criteria"));
        }
        if let Some(id) = &id {
            write::check_id(id).map_err(|e| at(&format!("request.url: {e}")))?;
            let body_id = entry.get("resource").and_then(|r| r.get("id")).and_then(Json::as_str);
            if let Some(body_id) = body_id.filter(|b| b != id) {
                return Err(at(&format!("the resource's id '{body_id}' is not the id in request.url '{id}'")));
            }
        }
        let text = |k: &str| request.get(k).and_then(Json::as_str).map(str::to_string);
        let if_match = match text("ifMatch") {
            Some(v) => Some(v.trim_start_matches("W/").trim_matches('"').parse::<i64>().map_err(|_| at("request.ifMatch is not a version ETag"))?),
            None => None,
        };
        out.push(Entry {
            full_url: entry.get("fullUrl").and_then(Json::as_str).map(str::to_string),
            method,
            resource_type,
            id,
            criteria,
            if_none_exist: text("ifNoneExist"),
            if_match,
            resource: entry.get("resource").cloned(),
        });
    }
    Ok(out)
}

/// Replaces every `reference` whose value is a key of `map`.
pub fn rewrite_references(value: &mut Json, map: &HashMap<String, String>) {
    match value {
        Json::Object(object) => {
            for (key, child) in object.iter_mut() {
                if key == "reference"
                    && let Some(target) = child.as_str().and_then(|r| map.get(r))
                {
                    *child = Json::string(target.as_str());
                    continue;
                }
                rewrite_references(child, map);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|item| rewrite_references(item, map)),
        _ => {}
    }
}

fn permission_for(method: &str) -> Result<Permission, ApiError> {
    match method {
        "POST" => Ok(Permission::Create),
        "PUT" => Ok(Permission::Update),
        "GET" => Ok(Permission::Read),
        other => Err(ApiError::MethodNotAllowed(format!("{other} entries are not supported"))),
    }
}

/// `POST /`.
pub async fn transaction_or_batch(State(state): State<AppState>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let mut audit = caller.audit("transaction", "E");
    let result = async {
        let bundle = fhir::read_resource(&state, &headers, body).await?;
        write::check_type(&bundle, "Bundle")?;
        match bundle.get("type").and_then(Json::as_str) {
            Some("transaction") => transaction(&state, &caller.principal, &caller.base.url, &mut audit, bundle, prefer_return(&headers)).await,
            Some("batch") => {
                audit.subtype = "batch";
                batch(&state, &caller, &mut audit, bundle, &headers).await
            }
            _ => Err(ApiError::BadRequest("POST to the base needs a Bundle of type transaction or batch (messages go to $process-message)".into())),
        }
    }
    .await;
    finish(&state, audit, result).await
}

async fn transaction(state: &AppState, principal: &Principal, base: &str, audit: &mut Audit, bundle: Json, prefer: Return) -> Result<Response, ApiError> {
    let entries = parse_entries(&bundle)?;
    for entry in &entries {
        known_type(state, &entry.resource_type)?;
        if entry.resource_type == "AuditEvent" && entry.method != "GET" {
            return Err(ApiError::MethodNotAllowed("the audit trail is written by the gateway only".into()));
        }
        principal.may(&entry.resource_type, permission_for(&entry.method)?).map_err(ApiError::Forbidden)?;
        if entry.method != "GET" {
            let resource = entry.resource.as_ref().ok_or_else(|| ApiError::BadRequest(format!("a {} entry needs a resource", entry.method)))?;
            write::check_type(resource, &entry.resource_type)?;
        }
    }
    // The Bundle is validated as a whole, so in-Bundle references and fullUrls are checked too.
    let inherited_labels = labels::of(&bundle);
    let resources: Vec<Option<&Json>> = entries.iter().map(|e| e.resource.as_ref()).collect();
    // A BSeR referral from an inpatient unit also becomes a referral record with its route back; resent, it is not stored again.
    let referral = crate::exchange::referral::read_inbound(state, principal, &bundle, &resources)?;
    write::validate(state, bundle, Vec::new()).await?;
    let earlier = match &referral {
        Some(referral) => crate::exchange::referral::resent(state, principal, referral).await?,
        None => None,
    };
    let written = match earlier {
        Some(references) => {
            audit.description = Some("resent referral; the resources stored the first time were answered".into());
            let mut written = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                let found = match references.get(i).and_then(|r| r.split_once('/')) {
                    Some((resource_type, id)) if entry.method != "GET" => state.store.read(resource_type, id).await?,
                    _ => None,
                };
                written.push(found.map(|stored| (stored, false)));
            }
            written
        }
        None => {
            let written = run_transaction(state, principal, &entries, &inherited_labels, referral.as_ref()).await?;
            // The transaction's own audit event was committed with it.
            audit.recorded = true;
            written
        }
    };
    let mut response = BundleText::new("transaction-response", None, &[]);
    let mut stored_all = Vec::new();
    for (entry, result) in entries.iter().zip(&written) {
        match result {
            Some((stored, created)) => {
                let status = if *created { "201 Created" } else { "200 OK" };
                let body = (prefer == Return::Representation).then_some(stored.body.as_str());
                let url = format!("{base}/{}/{}", stored.resource_type, stored.id);
                response.entry(Some(&url), body, &[("response", entry_response(status, Some(stored), None))]);
                stored_all.push(stored.reference());
            }
            None => {
                let id = entry.id.clone().unwrap_or_default();
                match read_entry(state, principal, audit, &entry.resource_type, &id).await {
                    Ok(stored) => response.entry(Some(&format!("{base}/{}", stored.reference())), Some(&stored.body), &[("response", entry_response("200 OK", Some(&stored), None))]),
                    Err(e) => response.entry(None, None, &[("response", entry_response(&status_line(&e), None, Some(operation_outcome(&e.issues()))))]),
                }
            }
        }
    }
    audit.entities = stored_all;
    Ok(fhir::json_response(StatusCode::OK, response.finish()))
}

async fn read_entry(state: &AppState, principal: &Principal, audit: &mut Audit, resource_type: &str, id: &str) -> Result<Stored, ApiError> {
    let mut stored = state.store.read(resource_type, id).await?.ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} is not known")))?;
    disclose(state, principal, &mut stored, audit).await?;
    Ok(stored)
}

pub fn status_line(e: &ApiError) -> String {
    status_line_of(e.status())
}

/// Runs the writes of a transaction atomically, retrying from scratch when a concurrent writer won a race.
/// Per entry: the version written (or found by `ifNoneExist`) and whether it was created; `None`
/// for an entry that is read after the commit (`GET`).
async fn run_transaction(
    state: &AppState,
    principal: &Principal,
    entries: &[Entry],
    inherited_labels: &[String],
    referral: Option<&crate::exchange::referral::Inbound>,
) -> Result<Vec<Option<(Stored, bool)>>, ApiError> {
    'attempt: for _ in 0..ATTEMPTS {
        let mut tx = state.store.begin().await?;
        // Resolve every entry's id first so references can be rewritten before anything is written.
        // Per entry: the id to write and how it was chosen (`POST`: by the gateway; `PUT`: by the client).
        let mut ids: Vec<Option<(String, &'static str)>> = Vec::new();
        let mut existing_for: HashMap<usize, Stored> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let resolved = match (entry.method.as_str(), &entry.id, &entry.criteria) {
                ("GET", _, _) => None,
                ("POST", _, _) => match &entry.if_none_exist {
                    Some(criteria) => match write::conditional_matches(&mut tx, state, principal, &entry.resource_type, criteria).await {
                        Ok(m) if m.is_empty() => Some((write::new_id(), "POST")),
                        Ok(m) if m.len() == 1 => {
                            let found = m.into_iter().next().expect("one match");
                            let id = found.id.clone();
                            existing_for.insert(i, found);
                            Some((id, "PUT"))
                        }
                        Ok(_) => return Err(ApiError::PreconditionFailed(format!("Bundle.entry[{i}]: ifNoneExist matches more than one resource"))),
                        Err(Failure::Retry) => continue 'attempt,
                        Err(Failure::Api(e)) => return Err(e),
                    },
                    None => Some((write::new_id(), "POST")),
                },
                ("PUT", Some(id), _) => Some((id.clone(), "PUT")),
                ("PUT", None, Some(criteria)) => match write::conditional_matches(&mut tx, state, principal, &entry.resource_type, criteria).await {
                    Ok(m) if m.is_empty() => Some(match entry.resource.as_ref().and_then(|r| r.get("id")).and_then(Json::as_str) {
                        Some(id) => (id.to_string(), "PUT"),
                        None => (write::new_id(), "POST"),
                    }),
                    Ok(m) if m.len() == 1 => Some((m[0].id.clone(), "PUT")),
                    Ok(_) => return Err(ApiError::PreconditionFailed(format!("Bundle.entry[{i}]: the criteria match more than one resource"))),
                    Err(Failure::Retry) => continue 'attempt,
                    Err(Failure::Api(e)) => return Err(e),
                },
                _ => return Err(ApiError::BadRequest(format!("Bundle.entry[{i}]: cannot tell which resource to write"))),
            };
            ids.push(resolved);
        }
        let mut map = HashMap::new();
        for (entry, id) in entries.iter().zip(&ids) {
            if let (Some(full_url), Some((id, _))) = (&entry.full_url, id) {
                map.insert(full_url.clone(), format!("{}/{id}", entry.resource_type));
            }
        }
        let mut resources: Vec<Option<Json>> = entries
            .iter()
            .map(|e| {
                e.resource.clone().map(|mut r| {
                    rewrite_references(&mut r, &map);
                    r
                })
            })
            .collect();
        if let Some(Some(task)) = referral.and_then(|r| resources.get_mut(r.task_index)) {
            crate::exchange::referral::addressed_to_program(state, task);
        }
        let mut written: Vec<Option<(Stored, bool)>> = (0..entries.len()).map(|_| None).collect();
        // FHIR's processing order: POST, then PUT, then GET.
        for method in ["POST", "PUT"] {
            let of_method: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].method == method).collect();
            for i in write::consents_last(of_method.iter().map(|&i| entries[i].resource_type.as_str())).into_iter().map(|n| of_method[n]) {
                let entry = &entries[i];
                if let Some(existing) = existing_for.remove(&i) {
                    written[i] = Some((existing, false));
                    continue;
                }
                let Some((id, id_from)) = ids[i].clone() else { continue };
                let Some(resource) = resources[i].take() else { continue };
                let change = Change { resource_type: &entry.resource_type, id, resource, if_match: entry.if_match, inherited_labels, method: id_from };
                match write::write(&mut tx, state, principal, change).await {
                    Ok((stored, created)) => written[i] = Some((stored, created)),
                    Err(Failure::Retry) => continue 'attempt,
                    Err(Failure::Api(e)) => return Err(prefix_entry(i, e)),
                }
            }
        }
        if let Some(referral) = referral {
            let stored: Vec<Option<&Stored>> = written.iter().map(|w| w.as_ref().map(|(s, _)| s)).collect();
            crate::exchange::referral::received(&mut tx, state, principal, referral, &stored, None).await?;
        }
        let mut audit = Audit::new(&principal.client_id, "transaction", "E", None);
        audit.entities = written.iter().flatten().map(|(stored, _)| stored.reference()).collect();
        tx.append_audit(&audit.row(&state.base_url, AuditOutcome::Success)).await?;
        match tx.commit().await {
            Ok(()) => return Ok(written),
            Err(crate::store::StoreError::Enrolled) => continue 'attempt,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("the resources are being changed by others; retry".into()))
}

fn prefix_entry(i: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::BadRequest(m) => ApiError::BadRequest(format!("Bundle.entry[{i}]: {m}")),
        ApiError::Forbidden(m) => ApiError::Forbidden(format!("Bundle.entry[{i}]: {m}")),
        ApiError::NotFound(m) => ApiError::NotFound(format!("Bundle.entry[{i}]: {m}")),
        ApiError::PreconditionFailed(m) => ApiError::PreconditionFailed(format!("Bundle.entry[{i}]: {m}")),
        other => other,
    }
}

/// A batch: each entry is answered by the handler that answers the same request sent alone (search,
/// history, read, vread, compartment search, create, update, conditional forms, `$validate`), with
/// the caller's token and the batch's `Prefer`; its status, `Location`, `ETag`, `Last-Modified` and
/// body (or OperationOutcome) become the entry's `response`. One entry's failure is that entry's answer.
async fn batch(state: &AppState, caller: &Caller, audit: &mut Audit, bundle: Json, headers: &HeaderMap) -> Result<Response, ApiError> {
    let inherited_labels = labels::of(&bundle);
    let mut response = BundleText::new("batch-response", None, &[]);
    for (i, entry) in bundle.get("entry").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let answer = match entry_request(&caller.base.url, i, entry, &inherited_labels, headers) {
            Ok((method, uri, headers, body)) => dispatch(state, caller.part(), method, uri, headers, body).await,
            Err(e) => e.into_response(),
        };
        let (full_url, body, member) = entry_answer(&caller.base.url, answer).await;
        if let Some(reference) = full_url.as_deref().and_then(|u| u.strip_prefix(&format!("{}/", caller.base.url))) {
            audit.entities.push(reference.to_string());
        }
        response.entry(full_url.as_deref(), body.as_deref(), &[("response", member)]);
    }
    Ok(fhir::json_response(StatusCode::OK, response.finish()))
}

/// The HTTP request a batch entry stands for: `request.method` and `request.url` (relative, or
/// absolute under this server's base), `ifMatch`/`ifNoneMatch`/`ifNoneExist`/`ifModifiedSince` as
/// headers, the resource (with the Bundle's labels) as the body.
fn entry_request(base: &str, i: usize, entry: &Json, inherited_labels: &[String], batch_headers: &HeaderMap) -> Result<(Method, Uri, HeaderMap, Body), ApiError> {
    let at = |m: &str| ApiError::BadRequest(format!("Bundle.entry[{i}]: {m}"));
    let request = entry.get("request").ok_or_else(|| at("no request"))?;
    let method = request.get("method").and_then(Json::as_str).ok_or_else(|| at("no request.method"))?;
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| at("request.method is not an HTTP method"))?;
    let url = request.get("url").and_then(Json::as_str).ok_or_else(|| at("no request.url"))?;
    let url = url.strip_prefix(base).unwrap_or(url);
    // The query is re-encoded, so what a client leaves unescaped in a Bundle (`system|code`) still forms a URI.
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(form_urlencoded::parse(query.as_bytes())).finish();
    let uri = Uri::try_from(format!("/{}?{query}", path.trim_start_matches('/'))).map_err(|_| at("request.url is not a relative URL"))?;
    let mut headers = HeaderMap::new();
    if let Some(prefer) = batch_headers.get("prefer") {
        headers.insert("prefer", prefer.clone());
    }
    let text = |k: &str| request.get(k).and_then(Json::as_str);
    let since = text("ifModifiedSince").map(|instant| fhir::http_date(instant).ok_or_else(|| at("request.ifModifiedSince is not an instant"))).transpose()?;
    for (name, value) in [(header::IF_MATCH, text("ifMatch")), (header::IF_NONE_MATCH, text("ifNoneMatch")), (HeaderName::from_static("if-none-exist"), text("ifNoneExist")), (header::IF_MODIFIED_SINCE, since.as_deref())] {
        if let Some(value) = value {
            headers.insert(name.clone(), HeaderValue::from_str(value).map_err(|_| at(&format!("request {name} is not a header value")))?);
        }
    }
    let body = match entry.get("resource") {
        Some(resource) => {
            let mut resource = resource.clone();
            if !inherited_labels.is_empty() {
                labels::normalise(&mut resource, inherited_labels);
            }
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(fhir::FHIR_JSON));
            Body::from(resource.to_string_compact())
        }
        None => Body::empty(),
    };
    Ok((method, uri, headers, body))
}

/// Routes a batch entry to the handler of the same request made alone (the router's table, less
/// what has no place in a batch: Bundles and messages at the base).
async fn dispatch(state: &AppState, caller: Caller, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let st = State(state.clone());
    let segments: Vec<String> = uri.path().split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let owned = |x: &str| x.to_string();
    match (method.as_str(), s.as_slice()) {
        ("GET", []) => rest::search_system(st, caller, headers, uri).await,
        ("GET", ["_history"]) => rest::history_system(st, caller, uri).await,
        ("GET", [t]) | ("GET", [t, "_search"]) => rest::search_type(st, caller, Path(owned(t)), headers, uri).await,
        ("GET", [t, "_history"]) => rest::history_type(st, caller, Path(owned(t)), uri).await,
        ("GET", [t, id]) => rest::read(st, caller, Path((owned(t), owned(id))), headers, uri).await,
        ("GET", [t, id, "_history"]) => rest::history(st, caller, Path((owned(t), owned(id))), uri).await,
        ("GET", [t, id, "_history", vid]) => rest::vread(st, caller, Path((owned(t), owned(id), owned(vid)))).await,
        ("GET", [compartment, id, t]) => rest::compartment_search(st, caller, Path((owned(compartment), owned(id), owned(t))), headers, uri).await,
        ("POST", [t]) if !t.starts_with('$') => rest::create(st, caller, Path(owned(t)), headers, uri, body).await,
        ("POST", [t, op]) if op.starts_with('$') => validate::type_operation(st, caller, Path((owned(t), owned(op))), headers, uri, body).await,
        ("POST", [t, id, op]) => validate::instance_operation(st, caller, Path((owned(t), owned(id), owned(op))), headers, uri, body).await,
        ("PUT", [t]) => rest::conditional_update(st, caller, Path(owned(t)), headers, uri, body).await,
        ("PUT", [t, id]) => rest::update(st, caller, Path((owned(t), owned(id))), headers, uri, body).await,
        _ => ApiError::MethodNotAllowed(format!("{method} {} is not supported in a batch (Bundles and messages go to the base on their own)", uri.path())).into_response(),
    }
}

/// A handler's answer as a batch entry: `fullUrl` and resource of a stored resource, and the `response`.
async fn entry_answer(base: &str, answer: Response) -> (Option<String>, Option<String>, Json) {
    let status = answer.status();
    let (location, etag, last_modified) = {
        let header = |name: header::HeaderName| answer.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        (header(header::LOCATION), header(header::ETAG), header(header::LAST_MODIFIED))
    };
    // The handler already bounded what it answers (a resource, a page).
    let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap_or_default();
    let body = crate::json::parse(&bytes).ok().filter(|b| b.get("resourceType").is_some());
    let mut members = vec![("status", Json::string(status_line_of(status)))];
    if let Some(location) = location {
        let relative = location.strip_prefix(&format!("{base}/")).map(str::to_string).unwrap_or(location);
        members.push(("location", Json::string(relative)));
    }
    if let Some(etag) = etag {
        members.push(("etag", Json::string(etag)));
    }
    let updated = body.as_ref().and_then(|b| b.get("meta")).and_then(|m| m.get("lastUpdated")).and_then(Json::as_str).map(str::to_string);
    if let Some(instant) = updated.filter(|_| last_modified.is_some()).or_else(|| last_modified.as_deref().and_then(fhir::instant_of_http_date)) {
        members.push(("lastModified", Json::string(instant)));
    }
    match body {
        Some(outcome) if !status.is_success() => {
            members.push(("outcome", outcome));
            (None, None, object(members))
        }
        Some(resource) => {
            let stored_at = match (resource.get("resourceType").and_then(Json::as_str), resource.get("id").and_then(Json::as_str)) {
                (Some(t), Some(id)) if t != "Bundle" && t != "OperationOutcome" => Some(format!("{base}/{t}/{id}")),
                _ => None,
            };
            (stored_at, Some(resource.to_string_compact()), object(members))
        }
        None => (None, None, object(members)),
    }
}

fn status_line_of(status: StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or_default())
}

/// A response for a request the router could not place.
pub fn not_found() -> Response {
    ApiError::NotFound("no such endpoint".into()).into_response()
}
