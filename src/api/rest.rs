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
use crate::outcome::{Issue, IssueCode, operation_outcome};
use crate::search;
use crate::store::HistoryScope;

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
        "_history" => ApiError::MethodNotAllowed(format!("{method} /{resource_type}/_history: history is read with GET")),
        "_search" => ApiError::MethodNotAllowed(format!("{method} /{resource_type}/_search: a search is a GET or a POST with a form body")),
        operation if operation.starts_with('$') => ApiError::MethodNotAllowed(format!(
            "{method} /{resource_type}/{operation}: the operation {operation} is not supported (operations here: $validate by POST on a type or an instance, $process-message, $export on the system, Patient and Group/[id], Patient/[id]/$everything)"
        )),
        other => ApiError::BadRequest(format!(
            "{method} /{resource_type}/{other}: '{other}' is neither a resource id (ids have only A-Z, a-z, 0-9, '-' and '.') nor an interaction (_search, _history)"
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
        return super::audit_search::search(state, caller, uri).await;
    }
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    let pairs = query_pairs(uri.query());
    let scope = Scope { types: vec![resource_type.clone()], path: resource_type, fixed: Vec::new(), compartment: None };
    let result = search_inner(&state, &caller, &mut audit, &scope, &headers, &pairs).await;
    finish(&state, audit, result).await
}

/// `GET /?_type=A,B&…`: a search across types, with the parameters common to all of them
/// (`_id`, `_lastUpdated`, `_sort` by those, paging, `_summary`, `_elements`, `_total`). Without
/// `_type`, every type the caller may search.
pub async fn search_system(State(state): State<AppState>, caller: Caller, headers: HeaderMap, uri: Uri) -> Response {
    let mut audit = caller.audit("search-system", "E");
    audit.query = uri.query().map(str::to_string);
    let result = async {
        let (typed, pairs): (Vec<_>, Vec<_>) = query_pairs(uri.query()).into_iter().partition(|(k, _)| k == "_type");
        let mut types: Vec<String> = typed.iter().flat_map(|(_, v)| v.split(',')).map(str::to_string).collect();
        for t in &types {
            if t == "AuditEvent" {
                return Err(ApiError::BadRequest("_type: the audit trail is searched with GET /AuditEvent".into()));
            }
            known_type(&state, t)?;
        }
        if types.is_empty() {
            types = state.resource_types.iter().filter(|t| *t != "AuditEvent" && caller.principal.may(t, Permission::Search).is_ok()).cloned().collect();
            types.sort();
            if types.is_empty() {
                return Err(ApiError::Forbidden("the access token grants no search".into()));
            }
        }
        let scope = Scope { types, path: String::new(), fixed: typed, compartment: None };
        search_inner(&state, &caller, &mut audit, &scope, &headers, &pairs).await
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /Patient/{id}/{type}`: a search of `type` within the patient's compartment (the patient
/// must be one the caller can read); any other parameters of `type` narrow it further.
pub async fn compartment_search(
    State(state): State<AppState>,
    caller: Caller,
    Path((compartment, id, resource_type)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    audit.entities.push(format!("{compartment}/{id}"));
    let result = async {
        if is_reserved_word(&resource_type) {
            return Err(reserved_word("GET", &format!("{compartment}/{id}"), &resource_type));
        }
        known_type(&state, &compartment)?;
        if compartment != "Patient" {
            return Err(ApiError::NotFound(format!("GET /{compartment}/{id}/{resource_type}: only the Patient compartment is searched here")));
        }
        known_type(&state, &resource_type)?;
        let clause = search::compartment::patient_clause(&resource_type, &id)
            .ok_or_else(|| ApiError::BadRequest(format!("GET /Patient/{id}/{resource_type}: {resource_type} is not in the Patient compartment (R4 CompartmentDefinition/patient)")))?;
        forbid(caller.principal.may("Patient", Permission::Read))?;
        // The compartment's patient is disclosed like a read of it: unseen and unknown answer alike.
        let mut patient = state.store.read("Patient", &id).await?.ok_or_else(|| ApiError::NotFound(format!("Patient/{id} is not known")))?;
        disclose(&state, &caller.principal, &mut patient, &mut audit).await?;
        let scope = Scope { types: vec![resource_type.clone()], path: format!("Patient/{id}/{resource_type}"), fixed: Vec::new(), compartment: Some(clause) };
        search_inner(&state, &caller, &mut audit, &scope, &headers, &query_pairs(uri.query())).await
    }
    .await;
    finish(&state, audit, result).await
}

/// What a search covers.
struct Scope {
    /// The types searched: one, or those `_type` names in a search across types.
    types: Vec<String>,
    /// The path after the base that the paging links repeat (`Observation`, `Patient/p1/Observation`, empty across types).
    path: String,
    /// Parameters of the scope itself that the links repeat (`_type`).
    fixed: Vec<(String, String)>,
    /// The compartment the results must be in.
    compartment: Option<search::Clause>,
}

async fn search_inner(state: &AppState, caller: &Caller, audit: &mut Audit, scope: &Scope, headers: &HeaderMap, pairs: &[(String, String)]) -> Result<Response, ApiError> {
    let principal = &caller.principal;
    for t in &scope.types {
        known_type(state, t)?;
        forbid(principal.may(t, Permission::Search))?;
    }
    let across = scope.path.is_empty();
    let resource_type = if across { "" } else { scope.types[0].as_str() };
    let config = &state.loaded.config.server;
    let lenient = fhir::lenient(headers);
    let mut query = search::parse_query(resource_type, pairs, config.default_page_size, config.max_page_size, lenient).map_err(|e| ApiError::BadRequest(e.0))?;
    query.clauses.extend(scope.compartment.clone());
    let types: Vec<&str> = scope.types.iter().map(String::as_str).collect();
    let visibility = principal.visibility(state.program(), false);
    let (total, found) = state.store.search_types(&types, &query, Some(&visibility)).await?;
    let found = disclose_all(state, principal, found, audit).await;
    let mut included = Vec::new();
    let add = |included: &mut Vec<crate::store::Stored>, stored: crate::store::Stored| {
        if !found.iter().chain(included.iter()).any(|s| s.resource_type == stored.resource_type && s.id == stored.id) {
            included.push(stored);
        }
    };
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
        for stored in disclose_all(state, principal, state.store.read_many(&keys).await?, audit).await {
            add(&mut included, stored);
        }
    }
    // `_revinclude`: what points at this page's matches, found and disclosed like matches of a search of its own.
    for (source, param) in query.revincludes.clone() {
        // A type the token does not grant is refused like a search of it, or named under lenient handling.
        if let Err(why) = principal.may(source, Permission::Search) {
            if !lenient {
                return Err(ApiError::Forbidden(format!("_revinclude={source}:{param}: {why}")));
            }
            query.ignored.push(format!("search parameter '_revinclude': {source}:{param}: {why}"));
            let asked = format!("{source}:{param}");
            query.used.retain(|(k, v)| !(k == "_revinclude" && (*v == asked || v.starts_with(&format!("{asked}:")))));
            continue;
        }
        let references: Vec<search::TokenMatch> = found.iter().map(|s| search::TokenMatch { system: None, value: Some(s.reference()) }).collect();
        for chunk in references.chunks(search::MAX_VALUES_PER_PARAMETER) {
            let pointing = search::Query { clauses: vec![search::Clause::Token { param: param.to_string(), any: chunk.to_vec() }], count: usize::MAX, no_total: true, ..Default::default() };
            let (_, referring) = state.store.search(source, &pointing, Some(&visibility)).await?;
            for stored in disclose_all(state, principal, referring, audit).await {
                add(&mut included, stored);
            }
        }
    }
    let base = &caller.base.url;
    let used: Vec<(String, String)> = scope.fixed.iter().chain(query.used.iter()).cloned().collect();
    let links = page_links(&format!("{base}/{}", scope.path), &used, query.count, query.offset, total);
    let mut bundle = BundleText::new("searchset", (!query.no_total).then_some(total), &links);
    let definitions = state.validator.definitions();
    for (stored, mode) in found.iter().map(|s| (s, "match")).chain(included.iter().map(|s| (s, "include"))) {
        audit.entities.push(stored.reference());
        let url = format!("{base}/{}/{}", stored.resource_type, stored.id);
        let body = match (&query.subset, mode) {
            (Some(subset), "match") => search::shape::apply(definitions, &stored.body, subset),
            _ => stored.body.clone(),
        };
        bundle.entry(Some(&url), Some(&body), &[("search", object([("mode", Json::string(mode))]))]);
    }
    if !query.ignored.is_empty() {
        let issues: Vec<Issue> = query.ignored.iter().map(|why| Issue::warning(IssueCode::NotSupported, "", format!("ignored (Prefer: handling=lenient): {why}"))).collect();
        let url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        bundle.entry(Some(&url), Some(&operation_outcome(&issues).to_string_compact()), &[("search", object([("mode", Json::string("outcome"))]))]);
    }
    if !audit.disclosures.is_empty() {
        super::part2::notice_entry(&mut bundle);
    }
    Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
}

/// `_summary`/`_elements` of a read; `_summary=count` is for searches.
fn read_subset(pairs: &[(String, String)]) -> Result<Option<search::Subset>, ApiError> {
    let mut chosen = None;
    for (name, raw) in pairs.iter().filter(|(k, _)| k == "_summary" || k == "_elements") {
        if chosen.is_some() {
            return Err(ApiError::BadRequest(format!("{name}: give one _summary or _elements")));
        }
        chosen = search::subset(name, raw).map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))?;
    }
    Ok(chosen)
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
        known_type(&state, &resource_type)?;
        if is_reserved_word(&id) {
            return Err(reserved_word("GET", &resource_type, &id));
        }
        forbid(caller.principal.may(&resource_type, Permission::Read))?;
        let mut stored = state.store.read(&resource_type, &id).await?.ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} is not known")))?;
        disclose(&state, &caller.principal, &mut stored, &mut audit).await?;
        // Decided after disclosure, so a 304 never confirms what a 404 would have hidden.
        if fhir::not_modified(&headers, &stored) {
            return Ok(fhir::not_modified_response(&stored));
        }
        let shown = match read_subset(&query_pairs(uri.query()))? {
            Some(subset) => crate::store::Stored { body: search::shape::apply(state.validator.definitions(), &stored.body, &subset), ..stored },
            None => stored,
        };
        let mut response = resource_response(StatusCode::OK, &shown, &caller.base.url, Return::Representation, false);
        if !audit.disclosures.is_empty() {
            super::part2::notice_header(&mut response);
        }
        Ok(response)
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /{type}/{id}/_history/{vid}`: vread.
pub async fn vread(State(state): State<AppState>, caller: Caller, Path((resource_type, id, version)): Path<(String, String, String)>) -> Response {
    let mut audit = caller.audit("vread", "R");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = async {
        known_type(&state, &resource_type)?;
        forbid(caller.principal.may(&resource_type, Permission::Read))?;
        // One answer for a missing resource, a missing version and a withheld one, so neither existence nor the version count leaks.
        let not_found = || ApiError::NotFound(format!("{resource_type}/{id}/_history/{version} is not known"));
        let number: i64 = version.parse().map_err(|_| not_found())?;
        let current = state.store.read(&resource_type, &id).await?.ok_or_else(not_found)?;
        let stored = state.store.vread(&resource_type, &id, number).await?;
        let stored = disclose_version(&state, &caller.principal, &current, stored, &mut audit).await.ok_or_else(not_found)?;
        let mut response = resource_response(StatusCode::OK, &stored, &caller.base.url, Return::Representation, false);
        if !audit.disclosures.is_empty() {
            super::part2::notice_header(&mut response);
        }
        Ok(response)
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /{type}/{id}/_history`: the versions of one resource, newest first.
pub async fn history(State(state): State<AppState>, caller: Caller, Path((resource_type, id)): Path<(String, String)>, uri: Uri) -> Response {
    let mut audit = caller.audit("history-instance", "R");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = history_inner(&state, &caller, &mut audit, Some(&resource_type), Some(&id), &uri).await;
    finish(&state, audit, result).await
}

/// `GET /{type}/_history`: the versions of every resource of a type the caller can read, newest first.
pub async fn history_type(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, uri: Uri) -> Response {
    let mut audit = caller.audit("history-type", "R");
    let result = history_inner(&state, &caller, &mut audit, Some(&resource_type), None, &uri).await;
    finish(&state, audit, result).await
}

/// `GET /_history`: the versions of every resource the caller can read, newest first.
pub async fn history_system(State(state): State<AppState>, caller: Caller, uri: Uri) -> Response {
    let mut audit = caller.audit("history-system", "R");
    let result = history_inner(&state, &caller, &mut audit, None, None, &uri).await;
    finish(&state, audit, result).await
}

/// A history of one resource, one type or the whole server (`_since`, `_count`, `_offset`). Every
/// version is disclosed by its resource's current version, so an unreadable resource's versions
/// neither show nor count.
async fn history_inner(state: &AppState, caller: &Caller, audit: &mut Audit, resource_type: Option<&str>, id: Option<&str>, uri: &Uri) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    let principal = &caller.principal;
    if let Some(t) = resource_type {
        known_type(state, t)?;
        forbid(principal.may(t, Permission::Read))?;
    }
    let config = &state.loaded.config.server;
    let (mut count, mut offset, mut since) = (config.default_page_size, 0, None);
    for (name, value) in &pairs {
        let number = || value.parse::<usize>().map_err(|_| ApiError::BadRequest(format!("{name} must be a non-negative integer")));
        match name.as_str() {
            "_count" => count = number()?.min(config.max_page_size),
            "_offset" => offset = number()?,
            "_since" => since = Some(search::date_range(value).ok_or_else(|| ApiError::BadRequest(format!("_since '{value}' is not a FHIR instant")))?.0),
            other if search::RESULT_PARAMS.contains(&other) => {}
            other => return Err(ApiError::BadRequest(format!("history parameter '{other}' is not supported (_since, _count, _offset)"))),
        }
    }
    let readable: Vec<&str>;
    let (total, versions) = match (resource_type, id) {
        (Some(t), Some(id)) => {
            let current = state.store.read(t, id).await?.ok_or_else(|| ApiError::NotFound(format!("{t}/{id} is not known")))?;
            disclose(state, principal, &mut current.clone(), audit).await?;
            let (total, versions) = state.store.history(HistoryScope::Instance(t, id), since.as_deref(), count, offset, None).await?;
            // The current version decided above; each older one can only add a label of its own.
            let mut disclosed = Vec::with_capacity(versions.len());
            for v in versions {
                disclosed.extend(disclose_version(state, principal, &current, Some(v), audit).await);
            }
            (total, disclosed)
        }
        (scope_type, _) => {
            readable = match scope_type {
                Some(t) => vec![t],
                None => state.resource_types.iter().map(String::as_str).filter(|t| *t != "AuditEvent" && principal.may(t, Permission::Read).is_ok()).collect(),
            };
            if readable.is_empty() {
                return Err(ApiError::Forbidden("the access token grants no read".into()));
            }
            let (total, versions) = state.store.history(HistoryScope::Types(&readable), since.as_deref(), count, offset, Some(&principal.visibility(state.program(), false))).await?;
            let mut keys: Vec<(String, String)> = versions.iter().map(|v| (v.resource_type.clone(), v.id.clone())).collect();
            keys.dedup();
            let currents = state.store.read_many(&keys).await?;
            let mut disclosed = Vec::with_capacity(versions.len());
            for v in versions {
                let Some(current) = currents.iter().find(|c| c.resource_type == v.resource_type && c.id == v.id) else { continue };
                disclosed.extend(disclose_version(state, principal, current, Some(v), audit).await);
            }
            (total, disclosed)
        }
    };
    let base = &caller.base.url;
    let path = match (resource_type, id) {
        (Some(t), Some(id)) => format!("{t}/{id}/_history"),
        (Some(t), None) => format!("{t}/_history"),
        _ => "_history".to_string(),
    };
    // The paging links keep `_since` and the format asked for.
    let kept: Vec<(String, String)> = since
        .iter()
        .map(|s| ("_since".to_string(), s.clone()))
        .chain(pairs.iter().filter(|(k, _)| search::RESULT_PARAMS.contains(&k.as_str())).cloned())
        .collect();
    let links = page_links(&format!("{base}/{path}"), &kept, count, offset, total);
    let mut bundle = BundleText::new("history", Some(total), &links);
    for v in &versions {
        let reference = v.reference();
        if !audit.entities.contains(&reference) {
            audit.entities.push(reference.clone());
        }
        let request = object([("method", Json::string(v.method.as_str())), ("url", Json::string(reference.as_str()))]);
        let status = if v.version == 1 { "201 Created" } else { "200 OK" };
        bundle.entry(Some(&format!("{base}/{reference}")), Some(&v.body), &[("request", request), ("response", fhir::entry_response(status, Some(v), None))]);
    }
    Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
}

/// `POST /{type}`: create (conditional with `If-None-Exist`); `POST /$process-message` is routed here too.
pub async fn create(State(state): State<AppState>, caller: Caller, Path(resource_type): Path<String>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    if resource_type == "$process-message" {
        return super::message::process(state, caller, headers, body).await;
    }
    let mut audit = caller.audit("create", "C");
    let result = create_inner(&state, &caller, &mut audit, &resource_type, &headers, &uri, body).await;
    finish(&state, audit, result).await
}

async fn create_inner(state: &AppState, caller: &Caller, audit: &mut Audit, resource_type: &str, headers: &HeaderMap, uri: &Uri, body: Body) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
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
    let resource = fhir::read_resource(state, headers, body).await?;
    write::check_type(&resource, resource_type)?;
    let resource = write::validate(state, resource, Vec::new()).await?;
    let prefer = prefer_return(headers);
    for _ in 0..ATTEMPTS {
        let mut tx = state.store.begin().await?;
        if let Some(criteria) = &criteria {
            let matches = match write::conditional_matches(&mut tx, state, principal, resource_type, criteria).await {
                Ok(m) => m,
                Err(Failure::Retry) => continue,
                Err(Failure::Api(e)) => return Err(e),
            };
            match matches.as_slice() {
                [] => {}
                [existing] => {
                    audit.entities.push(existing.reference());
                    return Ok(resource_response(StatusCode::OK, existing, &caller.base.url, prefer, true));
                }
                _ => return Err(ApiError::PreconditionFailed("the conditional create's criteria match more than one resource".into())),
            }
        }
        let change = Change { resource_type, id: write::new_id(), resource: resource.clone(), if_match: None, inherited_labels: &[], method: "POST" };
        match write::write(&mut tx, state, principal, change).await {
            Ok((stored, _)) => {
                audit.entities.push(stored.reference());
                tx.append_audit(&audit.row(&state.base_url, AuditOutcome::Success)).await?;
                match tx.commit().await {
                    Ok(()) => {}
                    Err(crate::store::StoreError::Enrolled) => continue,
                    Err(e) => return Err(e.into()),
                }
                audit.recorded = true;
                return Ok(resource_response(StatusCode::CREATED, &stored, &caller.base.url, prefer, true));
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
    known_type(state, resource_type)?;
    if resource_type == "AuditEvent" {
        return Err(ApiError::MethodNotAllowed("the audit trail is append-only".into()));
    }
    let principal = &caller.principal;
    if principal.may(resource_type, Permission::Update).is_err() {
        forbid(principal.may(resource_type, Permission::Create))?;
    }
    let resource = fhir::read_resource(state, headers, body).await?;
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
                let matches = match write::conditional_matches(&mut tx, state, principal, resource_type, criteria).await {
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
                match tx.commit().await {
                    Ok(()) => {}
                    Err(crate::store::StoreError::Enrolled) => continue,
                    Err(e) => return Err(e.into()),
                }
                audit.recorded = true;
                let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                return Ok(resource_response(status, &stored, &caller.base.url, prefer, created));
            }
            Err(Failure::Retry) => continue,
            Err(Failure::Api(e)) => return Err(e),
        }
    }
    Err(ApiError::Conflict("the resource is being changed by others; retry".into()))
}
