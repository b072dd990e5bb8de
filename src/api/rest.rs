//! The FHIR RESTful interactions: create (conditional by `If-None-Exist` or by query string), read (conditional by `If-None-Match`/`If-Modified-Since`), vread, update (with `If-Match`, and conditional by search criteria), history, and search (`GET /{type}`, `GET`/`POST /{type}/_search`; paging, `_sort`, `_include`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::audit::{Audit, AuditOutcome};
use super::caller::{Caller, disclose, disclose_all, disclose_version, record};
use super::error::ApiError;
use super::fhir::{self, BundleText, Return, object, prefer_return, query_pairs, resource_response};
use super::state::AppState;
use super::write::{self, ATTEMPTS, Change, Failure};
use crate::auth::Permission;
use crate::json::Json;
use crate::search;

/// Records the audit event for a finished request and turns the result into the response.
pub async fn finish(state: &AppState, mut audit: Audit, result: Result<Response, ApiError>) -> Response {
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            if audit.description.is_none() {
                audit.description = Some(e.to_string());
            }
            e.into_response()
        }
    };
    record(state, &audit, AuditOutcome::from_status(response.status().as_u16())).await;
    response
}

/// 404 for a type FHIR R4 does not define.
pub fn known_type(state: &AppState, resource_type: &str) -> Result<(), ApiError> {
    if state.resource_types.contains(resource_type) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("'{resource_type}' is not a FHIR R4 resource type served here")))
    }
}

fn forbid(result: Result<(), String>) -> Result<(), ApiError> {
    result.map_err(ApiError::Forbidden)
}

/// The search criteria a query string carries for a conditional create or update: every
/// parameter but those about the response format; `None` when there are none.
fn criteria_from_query(pairs: &[(String, String)]) -> Option<String> {
    let criteria: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| !search::RESULT_PARAMS.contains(&k.as_str())).collect();
    (!criteria.is_empty()).then(|| form_urlencoded::Serializer::new(String::new()).extend_pairs(criteria).finish())
}

/// The answer to a word where an id goes (`GET /Patient/_history`, `/Patient/$everything`): FHIR ids
/// never start with `_` or `$`, so these are requests for interactions or operations, and the client
/// learns which one is missing rather than that a resource of that "id" does not exist.
fn reserved_word(method: &str, resource_type: &str, word: &str) -> ApiError {
    match word {
        "$validate" => ApiError::MethodNotAllowed(format!("{method} /{resource_type}/$validate: $validate takes a POST with the resource (or a Parameters) in the body")),
        "_history" => ApiError::MethodNotAllowed(format!(
            "{method} /{resource_type}/_history: type-level history is not supported; history is kept per resource (GET /{resource_type}/[id]/_history)"
        )),
        "_search" => ApiError::MethodNotAllowed(format!("{method} /{resource_type}/_search: a search is a GET or a POST with a form body")),
        operation if operation.starts_with('$') => ApiError::MethodNotAllowed(format!(
            "{method} /{resource_type}/{operation}: the operation {operation} is not supported (operations here: $validate by POST on a type or an instance, $process-message, $export on the system, Patient and Group/[id], Patient/[id]/$everything)"
        )),
        other => ApiError::BadRequest(format!(
            "{method} /{resource_type}/{other}: '{other}' is neither a resource id (ids have only A-Z, a-z, 0-9, '-' and '.') nor an interaction (_search, and _history on an instance)"
        )),
    }
}

/// Whether a path segment in the id position is a reserved word rather than an id.
pub fn is_reserved_word(segment: &str) -> bool {
    segment.starts_with('_') || segment.starts_with('$')
}

/// `POST /{type}/_search`: the parameters of the form body and of the URL, searched as `GET /{type}?…`,
/// so the answer, its audit record and its paging links (plain GET links) are those of that search.
pub async fn search_post(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    let combined = match search_form(&state, &resource_type, &headers, &uri, body).await {
        Ok(combined) => combined,
        Err(e) => {
            let mut audit = caller.audit("search-type", "E");
            audit.query = uri.query().map(str::to_string);
            return finish(&state, audit, Err(e)).await;
        }
    };
    search_type(State(state), caller, Path(resource_type), headers, combined).await
}

/// The URI of the GET search equivalent to a POST search: URL parameters first, then the body's.
async fn search_form(state: &AppState, resource_type: &str, headers: &HeaderMap, uri: &Uri, body: Body) -> Result<Uri, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or_default().to_string());
    let essence = content_type.as_deref().map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let bytes = fhir::read_bytes(headers, body, state.loaded.config.server.max_body_bytes).await?;
    // A search with all its parameters in the URL may come with no body at all.
    let form_ok = essence.as_deref() == Some("application/x-www-form-urlencoded") || (content_type.is_none() && bytes.is_empty());
    if !form_ok {
        return Err(ApiError::UnsupportedMediaType(format!(
            "POST /{resource_type}/_search: Content-Type '{}' is not supported; send the parameters as application/x-www-form-urlencoded",
            content_type.unwrap_or_default()
        )));
    }
    let mut pairs = query_pairs(uri.query());
    pairs.extend(form_urlencoded::parse(&bytes).into_owned());
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
    // The serializer percent-encodes everything a URI may not carry, so this only fails on a bug.
    Uri::try_from(format!("/{resource_type}?{query}")).map_err(|e| ApiError::Internal(format!("a re-encoded search does not form a URI: {e}")))
}

/// `GET /{type}`: search.
pub async fn search_type(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, headers: HeaderMap, uri: Uri) -> Response {
    if resource_type == "AuditEvent" {
        return super::audit_search::search(state, caller, headers, uri).await;
    }
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    let result = search_inner(&state, &caller, &mut audit, &resource_type, &headers, &uri).await;
    finish(&state, audit, result).await
}

async fn search_inner(state: &AppState, caller: &Caller, audit: &mut Audit, resource_type: &str, headers: &HeaderMap, uri: &Uri) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    fhir::negotiate(headers, &pairs)?;
    known_type(state, resource_type)?;
    let principal = &caller.principal;
    forbid(principal.may(resource_type, Permission::Search))?;
    let config = &state.loaded.config.server;
    let query = search::parse_query(resource_type, &pairs, config.default_page_size, config.max_page_size).map_err(|e| ApiError::BadRequest(e.0))?;
    let (total, found) = state.store.search(resource_type, &query, Some(&principal.visibility(false))).await?;
    let found = disclose_all(principal, found, audit);
    let mut included = Vec::new();
    for (param, target) in &query.includes {
        if principal.may(target, Permission::Read).is_err() {
            continue;
        }
        let ids: Vec<String> = found.iter().map(|s| s.id.clone()).collect();
        let references = state.store.references(resource_type, &ids, param).await?;
        let keys: Vec<(String, String)> = references
            .iter()
            .filter_map(|r| r.split_once('/'))
            .filter(|(t, _)| t == target)
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .collect();
        for stored in disclose_all(principal, state.store.read_many(&keys).await?, audit) {
            if !included.iter().any(|s: &crate::store::Stored| s.resource_type == stored.resource_type && s.id == stored.id) {
                included.push(stored);
            }
        }
    }
    let base = &state.base_url;
    let links = page_links(&format!("{base}/{resource_type}"), &pairs, query.count, query.offset, total);
    let mut bundle = BundleText::new("searchset", Some(total), &links);
    for (stored, mode) in found.iter().map(|s| (s, "match")).chain(included.iter().map(|s| (s, "include"))) {
        audit.entities.push(stored.reference());
        let url = format!("{base}/{}/{}", stored.resource_type, stored.id);
        bundle.entry(Some(&url), Some(&stored.body), &[("search", object(&[("mode", Json::string(mode))]))]);
    }
    Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
}

/// The `self`, `next` and `previous` links of a page of `total` results at `url`: the request's
/// parameters with the page size used (which may be less than the one asked for) and the offset.
pub fn page_links(url: &str, pairs: &[(String, String)], count: usize, offset: usize, total: i64) -> Vec<(&'static str, String)> {
    let page_url = |offset: usize| {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs.iter().filter(|(k, _)| k != "_offset" && k != "_count") {
            serializer.append_pair(k, v);
        }
        serializer.append_pair("_count", &count.to_string());
        serializer.append_pair("_offset", &offset.to_string());
        format!("{url}?{}", serializer.finish())
    };
    let mut links = vec![("self", page_url(offset))];
    if (offset + count) < total as usize && count > 0 {
        links.push(("next", page_url(offset + count)));
    }
    if offset > 0 {
        links.push(("previous", page_url(offset.saturating_sub(count))));
    }
    links
}

/// `GET /{type}/{id}`: read.
pub async fn read(State(state): State<AppState>, caller: Caller, Path((resource_type, id)): Path<(String, String)>, headers: HeaderMap, uri: Uri) -> Response {
    if resource_type == "AuditEvent" {
        return super::audit_search::read(state, caller, id).await;
    }
    let mut audit = caller.audit("read", "R");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = async {
        fhir::negotiate(&headers, &query_pairs(uri.query()))?;
        known_type(&state, &resource_type)?;
        if is_reserved_word(&id) {
            return Err(reserved_word("GET", &resource_type, &id));
        }
        forbid(caller.principal.may(&resource_type, Permission::Read))?;
        let stored = state.store.read(&resource_type, &id).await?.ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} is not known")))?;
        disclose(&caller.principal, &stored, &mut audit)?;
        // Decided after disclosure, so a 304 never confirms what a 404 would have hidden.
        if fhir::not_modified(&headers, &stored) {
            return Ok(fhir::not_modified_response(&stored));
        }
        Ok(resource_response(StatusCode::OK, &stored, &state.base_url, Return::Representation, false))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /{type}/{id}/_history/{vid}`: vread.
pub async fn vread(State(state): State<AppState>, caller: Caller, Path((resource_type, id, version)): Path<(String, String, String)>, headers: HeaderMap, uri: Uri) -> Response {
    let mut audit = caller.audit("vread", "R");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = async {
        fhir::negotiate(&headers, &query_pairs(uri.query()))?;
        known_type(&state, &resource_type)?;
        forbid(caller.principal.may(&resource_type, Permission::Read))?;
        // One answer for a missing resource, a missing version and a withheld one, so neither existence nor the version count leaks.
        let not_found = || ApiError::NotFound(format!("{resource_type}/{id}/_history/{version} is not known"));
        let number: i64 = version.parse().map_err(|_| not_found())?;
        let current = state.store.read(&resource_type, &id).await?.ok_or_else(not_found)?;
        let stored = state.store.vread(&resource_type, &id, number).await?;
        let stored = disclose_version(&caller.principal, &current, stored, &mut audit).ok_or_else(not_found)?;
        Ok(resource_response(StatusCode::OK, &stored, &state.base_url, Return::Representation, false))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /{type}/{id}/_history`: the versions of one resource, newest first.
pub async fn history(State(state): State<AppState>, caller: Caller, Path((resource_type, id)): Path<(String, String)>, headers: HeaderMap, uri: Uri) -> Response {
    let mut audit = caller.audit("history-instance", "R");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = async {
        let pairs = query_pairs(uri.query());
        fhir::negotiate(&headers, &pairs)?;
        known_type(&state, &resource_type)?;
        forbid(caller.principal.may(&resource_type, Permission::Read))?;
        let config = &state.loaded.config.server;
        let number = |name: &str, default: usize| -> Result<usize, ApiError> {
            match pairs.iter().find(|(k, _)| k == name) {
                Some((_, v)) => v.parse().map_err(|_| ApiError::BadRequest(format!("{name} must be a non-negative integer"))),
                None => Ok(default),
            }
        };
        let count = number("_count", config.default_page_size)?.min(config.max_page_size);
        let offset = number("_offset", 0)?;
        let current = state.store.read(&resource_type, &id).await?.ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} is not known")))?;
        disclose(&caller.principal, &current, &mut audit)?;
        let (total, versions) = state.store.history(&resource_type, &id, count, offset).await?;
        // The current version decided above; each older one can only add a label of its own.
        let versions: Vec<_> = versions.into_iter().filter_map(|v| disclose_version(&caller.principal, &current, Some(v), &mut audit)).collect();
        let base = &state.base_url;
        let mut links = vec![("self", format!("{base}/{resource_type}/{id}/_history?_count={count}&_offset={offset}"))];
        if offset + count < total as usize {
            links.push(("next", format!("{base}/{resource_type}/{id}/_history?_count={count}&_offset={}", offset + count)));
        }
        let mut bundle = BundleText::new("history", Some(total), &links);
        for v in &versions {
            let request = object(&[("method", Json::string(v.method.as_str())), ("url", Json::string(format!("{resource_type}/{id}")))]);
            let status = if v.version == 1 { "201 Created" } else { "200 OK" };
            bundle.entry(Some(&format!("{base}/{resource_type}/{id}")), Some(&v.body), &[("request", request), ("response", fhir::entry_response(status, Some(v), None))]);
        }
        Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
    }
    .await;
    finish(&state, audit, result).await
}

/// `POST /{type}`: create (conditional with `If-None-Exist`); `POST /$process-message` is routed here too.
pub async fn create(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    if resource_type == "$process-message" {
        return super::message::process(state, caller, headers, uri, body).await;
    }
    let mut audit = caller.audit("create", "C");
    let result = create_inner(&state, &caller, &mut audit, &resource_type, &headers, &uri, body).await;
    finish(&state, audit, result).await
}

async fn create_inner(state: &AppState, caller: &Caller, audit: &mut Audit, resource_type: &str, headers: &HeaderMap, uri: &Uri, body: Body) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    fhir::negotiate(headers, &pairs)?;
    known_type(state, resource_type)?;
    if resource_type == "AuditEvent" {
        return Err(ApiError::MethodNotAllowed("the audit trail is written by the gateway only".into()));
    }
    let principal = &caller.principal;
    forbid(principal.may(resource_type, Permission::Create))?;
    // A create with search parameters in its URL (fhirpy's `get_or_create`) is a conditional create
    // exactly as with `If-None-Exist`: ignoring them would store a duplicate on every call.
    let header_criteria = headers.get("if-none-exist").map(|v| v.to_str().map(str::to_string).map_err(|_| ApiError::BadRequest("If-None-Exist is not text".into()))).transpose()?;
    let criteria = match (header_criteria, criteria_from_query(&pairs)) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("a conditional create takes its criteria from If-None-Exist or from the query string, not from both".into()));
        }
        (header_criteria, query_criteria) => header_criteria.or(query_criteria),
    };
    if let Some(criteria) = &criteria {
        // Refused before the body is read, so that a misspelt parameter is not reported as a body problem.
        write::parse_criteria(resource_type, criteria)?;
    }
    let resource = fhir::read_resource(headers, body, state.loaded.config.server.max_body_bytes).await?;
    write::check_type(&resource, resource_type)?;
    let resource = write::validate(state, resource, Vec::new()).await?;
    let prefer = prefer_return(headers);
    for _ in 0..ATTEMPTS {
        let mut tx = state.store.begin().await?;
        if let Some(criteria) = &criteria {
            let matches = match write::conditional_matches(&mut tx, principal, resource_type, criteria).await {
                Ok(m) => m,
                Err(Failure::Retry) => continue,
                Err(Failure::Api(e)) => return Err(e),
            };
            match matches.as_slice() {
                [] => {}
                [existing] => {
                    audit.entities.push(existing.reference());
                    return Ok(resource_response(StatusCode::OK, existing, &state.base_url, prefer, true));
                }
                _ => return Err(ApiError::PreconditionFailed("the conditional create's criteria match more than one resource".into())),
            }
        }
        let change = Change { resource_type, id: write::new_id(), resource: resource.clone(), if_match: None, inherited_labels: &[], method: "POST" };
        match write::write(&mut tx, state, principal, change).await {
            Ok((stored, _)) => {
                audit.entities.push(stored.reference());
                tx.append_audit(&audit.row(&state.base_url, AuditOutcome::Success)).await?;
                tx.commit().await?;
                audit.recorded = true;
                return Ok(resource_response(StatusCode::CREATED, &stored, &state.base_url, prefer, true));
            }
            Err(Failure::Retry) => continue,
            Err(Failure::Api(e)) => return Err(e),
        }
    }
    Err(ApiError::Conflict("the resource is being changed by others; retry".into()))
}

/// `PUT /{type}/{id}`: update, or create with the client's id.
pub async fn update(State(state): State<AppState>, caller: Caller, Path((resource_type, id)): Path<(String, String)>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    let mut audit = caller.audit("update", "U");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = update_inner(&state, &caller, &mut audit, &resource_type, Some(id), &headers, &uri, body).await;
    finish(&state, audit, result).await
}

/// `PUT /{type}?criteria`: conditional update.
pub async fn conditional_update(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    let mut audit = caller.audit("update", "U");
    audit.query = uri.query().map(str::to_string);
    let result = update_inner(&state, &caller, &mut audit, &resource_type, None, &headers, &uri, body).await;
    finish(&state, audit, result).await
}

#[allow(clippy::too_many_arguments)]
async fn update_inner(
    state: &AppState,
    caller: &Caller,
    audit: &mut Audit,
    resource_type: &str,
    path_id: Option<String>,
    headers: &HeaderMap,
    uri: &Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    fhir::negotiate(headers, &pairs)?;
    known_type(state, resource_type)?;
    if resource_type == "AuditEvent" {
        return Err(ApiError::MethodNotAllowed("the audit trail is append-only".into()));
    }
    let principal = &caller.principal;
    if principal.may(resource_type, Permission::Update).is_err() {
        forbid(principal.may(resource_type, Permission::Create))?;
    }
    let resource = fhir::read_resource(headers, body, state.loaded.config.server.max_body_bytes).await?;
    write::check_type(&resource, resource_type)?;
    let body_id = resource.get("id").and_then(Json::as_str).map(str::to_string);
    if let Some(id) = &path_id {
        match &body_id {
            Some(b) if b == id => {}
            Some(b) => return Err(ApiError::BadRequest(format!("the body's id '{b}' is not the id in the URL '{id}'"))),
            None => return Err(ApiError::BadRequest("an update must carry the resource id in the body".into())),
        }
    }
    let if_match = fhir::if_match(headers)?;
    let resource = write::validate(state, resource, Vec::new()).await?;
    let criteria: Option<String> = match &path_id {
        Some(_) => None,
        None => match criteria_from_query(&pairs) {
            Some(criteria) => Some(criteria),
            None => return Err(ApiError::MethodNotAllowed("PUT on a type needs search criteria (conditional update) or an id in the URL".into())),
        },
    };
    let prefer = prefer_return(headers);
    for _ in 0..ATTEMPTS {
        let mut tx = state.store.begin().await?;
        // A conditional update that matches nothing creates at the body's id (update as create) or at a server id.
        let (id, method) = match (&path_id, &criteria) {
            (Some(id), _) => (id.clone(), "PUT"),
            (None, Some(criteria)) => {
                let matches = match write::conditional_matches(&mut tx, principal, resource_type, criteria).await {
                    Ok(m) => m,
                    Err(Failure::Retry) => continue,
                    Err(Failure::Api(e)) => return Err(e),
                };
                match matches.as_slice() {
                    [] => match &body_id {
                        Some(id) => (id.clone(), "PUT"),
                        None => (write::new_id(), "POST"),
                    },
                    [existing] => {
                        if body_id.as_ref().is_some_and(|b| *b != existing.id) {
                            return Err(ApiError::BadRequest(format!("the body's id is not the id of the resource the criteria match ({})", existing.reference())));
                        }
                        (existing.id.clone(), "PUT")
                    }
                    _ => return Err(ApiError::PreconditionFailed("the criteria match more than one resource".into())),
                }
            }
            (None, None) => return Err(ApiError::BadRequest("no id and no criteria".into())),
        };
        let change = Change { resource_type, id, resource: resource.clone(), if_match, inherited_labels: &[], method };
        match write::write(&mut tx, state, principal, change).await {
            Ok((stored, created)) => {
                audit.entities = vec![stored.reference()];
                if created {
                    audit.subtype = "create";
                    audit.action = "C";
                }
                tx.append_audit(&audit.row(&state.base_url, AuditOutcome::Success)).await?;
                tx.commit().await?;
                audit.recorded = true;
                let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                return Ok(resource_response(status, &stored, &state.base_url, prefer, created));
            }
            Err(Failure::Retry) => continue,
            Err(Failure::Api(e)) => return Err(e),
        }
    }
    Err(ApiError::Conflict("the resource is being changed by others; retry".into()))
}
