//! `GET /AuditEvent` and `GET /AuditEvent/{id}` for administrators: the audit trail, newest first, filtered by `altid` (client), `entity`, `patient` (the accounting of disclosures: `subtype=disclose`), `subtype`, `outcome`, `action` and `date`.

use axum::http::{StatusCode, Uri};
use axum::response::Response;

use super::caller::Caller;
use super::error::ApiError;
use super::fhir::{self, BundleText, object, query_pairs};
use super::rest::finish;
use super::state::AppState;
use crate::auth::Permission;
use crate::json::Json;
use crate::store::AuditQuery;

/// The search parameters `GET /AuditEvent` accepts (listed in the CapabilityStatement).
pub const PARAMS: &[(&str, &str, &str)] = &[
    ("altid", "token", "http://hl7.org/fhir/SearchParameter/AuditEvent-altid"),
    ("entity", "reference", "http://hl7.org/fhir/SearchParameter/AuditEvent-entity"),
    // The patient an accounting-of-disclosures record (`subtype=disclose`) is about.
    ("patient", "reference", "http://hl7.org/fhir/SearchParameter/clinical-patient"),
    ("subtype", "token", "http://hl7.org/fhir/SearchParameter/AuditEvent-subtype"),
    ("outcome", "token", "http://hl7.org/fhir/SearchParameter/AuditEvent-outcome"),
    ("action", "token", "http://hl7.org/fhir/SearchParameter/AuditEvent-action"),
    ("date", "date", "http://hl7.org/fhir/SearchParameter/AuditEvent-date"),
];

pub async fn search(state: AppState, caller: Caller, uri: Uri) -> Response {
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    let result = async {
        let pairs = query_pairs(uri.query());
        caller.principal.may("AuditEvent", Permission::Search).map_err(ApiError::Forbidden)?;
        let config = &state.loaded.config.server;
        let mut filter = AuditQuery { count: config.default_page_size, ..AuditQuery::default() };
        for (name, value) in &pairs {
            let value = value.clone();
            match name.as_str() {
                "altid" => filter.client = Some(value.rsplit('|').next().unwrap_or_default().to_string()),
                "entity" => filter.entity = Some(crate::search::normalize_reference(&value).ok_or_else(|| ApiError::BadRequest("entity must be Type/id".into()))?),
                "patient" => {
                    let reference = if value.contains('/') { value.clone() } else { format!("Patient/{value}") };
                    filter.entity = Some(crate::search::normalize_reference(&reference).filter(|r| r.starts_with("Patient/")).ok_or_else(|| ApiError::BadRequest("patient must be Patient/id".into()))?);
                }
                "subtype" => filter.subtype = Some(value.rsplit('|').next().unwrap_or_default().to_string()),
                "outcome" => filter.outcome = Some(value),
                "action" => filter.action = Some(value),
                "date" => {
                    let pairs = vec![("_lastUpdated".to_string(), value)];
                    let query = crate::search::parse_query("AuditEvent", &pairs, 1, 1, false).map_err(|e| ApiError::BadRequest(e.0.replace("_lastUpdated", "date")))?;
                    for clause in query.clauses {
                        if let crate::search::Clause::Date { any, .. } = clause {
                            filter.dates.extend(any);
                        }
                    }
                }
                "_count" => filter.count = value.parse::<usize>().map_err(|_| ApiError::BadRequest("_count must be a number".into()))?.min(config.max_page_size),
                "_offset" => filter.offset = value.parse().map_err(|_| ApiError::BadRequest("_offset must be a number".into()))?,
                "_format" | "_pretty" => {}
                other => return Err(ApiError::BadRequest(format!("search parameter '{other}' is not supported on AuditEvent"))),
            }
        }
        let (total, bodies) = state.store.search_audit(&filter).await?;
        let base = &caller.base.url;
        let mut links = vec![("self", format!("{base}/AuditEvent?{}", uri.query().unwrap_or_default()))];
        if filter.offset + filter.count < total as usize {
            let mut serializer = form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs.iter().filter(|(k, _)| k != "_offset") {
                serializer.append_pair(k, v);
            }
            serializer.append_pair("_offset", &(filter.offset + filter.count).to_string());
            links.push(("next", format!("{base}/AuditEvent?{}", serializer.finish())));
        }
        let mut bundle = BundleText::new("searchset", Some(total), &links);
        for body in &bodies {
            let id = crate::json::parse(body.as_bytes()).ok().and_then(|j| j.get("id").and_then(Json::as_str).map(str::to_string)).unwrap_or_default();
            bundle.entry(Some(&format!("{base}/AuditEvent/{id}")), Some(body), &[("search", object([("mode", Json::string("match"))]))]);
        }
        Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
    }
    .await;
    finish(&state, audit, result).await
}

pub async fn read(state: AppState, caller: Caller, id: String) -> Response {
    let mut audit = caller.audit("read", "R");
    audit.entities.push(format!("AuditEvent/{id}"));
    let result = async {
        caller.principal.may("AuditEvent", Permission::Read).map_err(ApiError::Forbidden)?;
        let body = state.store.read_audit(&id).await?.ok_or_else(|| ApiError::NotFound(format!("AuditEvent/{id} is not known")))?;
        Ok(fhir::json_response(StatusCode::OK, body))
    }
    .await;
    finish(&state, audit, result).await
}
