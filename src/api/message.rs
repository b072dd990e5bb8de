//! `POST /$process-message`: FHIR messaging (e.g. a BSeR referral pushed by an inpatient unit), processed synchronously and exactly once per `Bundle.id` and `MessageHeader.id`.
//!
//! FHIR messaging has no reliable delivery, so senders resend when a response is lost; the
//! gateway records each processed message's keys with the response in the same transaction as the
//! stored resources, and answers a resend with the recorded response instead of storing twice.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::bundle::rewrite_references;
use super::caller::Caller;
use super::error::ApiError;
use super::fhir::{self, now_instant, object};
use super::rest::{finish, known_type};
use super::state::AppState;
use super::write::{self, ATTEMPTS, Change, Failure};
use crate::auth::Permission;
use crate::json::Json;
use crate::store::StoreError;

pub async fn process(state: AppState, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let mut audit = caller.audit("operation", "E");
    let result = async {
        let bundle = fhir::read_resource(&state, &headers, body).await?;
        write::check_type(&bundle, "Bundle")?;
        if bundle.get("type").and_then(Json::as_str) != Some("message") {
            return Err(ApiError::BadRequest("$process-message needs a Bundle of type message".into()));
        }
        let entries: Vec<(Option<String>, Json)> = bundle
            .get("entry")
            .and_then(Json::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.get("resource").map(|r| (e.get("fullUrl").and_then(Json::as_str).map(str::to_string), r.clone())))
            .collect();
        let header = entries
            .first()
            .map(|(_, r)| r)
            .filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("MessageHeader"))
            .ok_or_else(|| ApiError::BadRequest("the first entry of a message must be its MessageHeader".into()))?
            .clone();
        let mut keys = Vec::new();
        if let Some(id) = bundle.get("id").and_then(Json::as_str) {
            keys.push(format!("{}:bundle:{id}", caller.principal.client_id));
        }
        let header_id = header.get("id").and_then(Json::as_str).map(str::to_string);
        if let Some(id) = &header_id {
            keys.push(format!("{}:header:{id}", caller.principal.client_id));
        }
        if keys.is_empty() {
            return Err(ApiError::BadRequest("a message needs Bundle.id or MessageHeader.id so a resend can be recognised".into()));
        }
        // A response message answers a message the gateway sent: a step-down provider's feedback on its referral.
        if header.get("response").is_some() {
            caller.principal.may("MessageHeader", Permission::Create).map_err(ApiError::Forbidden)?;
            if let Some(previous) = already_processed(&state, &keys).await? {
                audit.description = Some("duplicate message; the recorded response was sent again".into());
                return Ok(fhir::json_response(StatusCode::OK, previous));
            }
            return feedback(&state, &caller, &mut audit, &header, header_id.as_deref().unwrap_or_default(), &entries, &keys).await;
        }
        for (_, resource) in &entries {
            let resource_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
            known_type(&state, resource_type)?;
            caller.principal.may(resource_type, Permission::Create).map_err(ApiError::Forbidden)?;
        }
        if let Some(previous) = already_processed(&state, &keys).await? {
            audit.description = Some("duplicate message; the recorded response was sent again".into());
            return Ok(fhir::json_response(StatusCode::OK, previous));
        }
        let inherited_labels = crate::auth::labels::of(&bundle);
        write::validate(&state, bundle.clone(), Vec::new()).await?;
        // A BSeR referral from an inpatient unit also becomes a referral record with its route back.
        let in_entries: Vec<Option<&Json>> = entries.iter().map(|(_, r)| Some(r)).collect();
        let referral = crate::exchange::referral::read_inbound(&state, &caller.principal, &bundle, &in_entries)?;
        for _ in 0..ATTEMPTS {
            let mut tx = state.store.begin().await?;
            let mut map = HashMap::new();
            let ids: Vec<String> = entries.iter().map(|_| write::new_id()).collect();
            for ((full_url, resource), id) in entries.iter().zip(&ids) {
                let resource_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
                let target = format!("{resource_type}/{id}");
                if let Some(url) = full_url {
                    map.insert(url.clone(), target.clone());
                }
                if let Some(old) = resource.get("id").and_then(Json::as_str) {
                    map.insert(format!("{resource_type}/{old}"), target);
                }
            }
            let mut resources: Vec<Json> = entries.iter().map(|(_, r)| r.clone()).collect();
            for r in &mut resources {
                rewrite_references(r, &map);
            }
            if let Some(referral) = &referral {
                crate::exchange::referral::addressed_to_program(&state, &mut resources[referral.task_index]);
            }
            let types: Vec<String> = resources.iter().map(|r| r.get("resourceType").and_then(Json::as_str).unwrap_or_default().to_string()).collect();
            let changes = resources
                .into_iter()
                .zip(&ids)
                .zip(&types)
                .map(|((resource, id), resource_type)| Change { resource_type, id: id.clone(), resource, if_match: None, inherited_labels: &inherited_labels, method: "POST" })
                .collect();
            let stored = match write::write_each(&mut tx, &state, &caller.principal, changes).await {
                Ok(stored) => stored,
                Err(Failure::Retry) => continue,
                Err(Failure::Api(e)) => return Err(e),
            };
            if let Some(referral) = &referral {
                let written: Vec<Option<&crate::store::Stored>> = stored.iter().map(Some).collect();
                crate::exchange::referral::received(&mut tx, &state, &caller.principal, referral, &written, Some(&header)).await?;
            }
            let response = response_message(&caller.base.url, &header, header_id.as_deref().unwrap_or_default(), &stored);
            if let Some(answered) = processed(tx, &state, &mut audit, &keys, response, &stored).await? {
                return Ok(answered);
            }
        }
        Err(ApiError::Conflict("the message is being processed concurrently; retry".into()))
    }
    .await;
    finish(&state, audit, result).await
}

/// A step-down provider's feedback message: the referral's Task takes the progress it reports
/// (through the one write path, as the provider, so only the Task's owner may move it and only its
/// progress), and the outbound referral record follows; recorded once per message like any other.
async fn feedback(state: &AppState, caller: &Caller, audit: &mut super::audit::Audit, header: &Json, header_id: &str, entries: &[(Option<String>, Json)], keys: &[String]) -> Result<Response, ApiError> {
    let answer = crate::exchange::step_down::Feedback::read(header, entries)?;
    let not_found = || ApiError::NotFound(format!("Task/{} is not found", answer.task_id));
    for _ in 0..ATTEMPTS {
        let mut tx = state.store.begin().await?;
        let current = tx.current("Task", &answer.task_id).await?.filter(|c| caller.principal.disclosure(c.facts()) == crate::auth::Disclosure::Allow).ok_or_else(not_found)?;
        let current_json = crate::json::parse(current.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored version does not parse: {e}")))?;
        let next = answer.next_task(&mut tx, &current_json).await?;
        let next = write::validate(state, next, Vec::new()).await?;
        let change = Change { resource_type: "Task", id: answer.task_id.clone(), resource: next, if_match: Some(current.version), inherited_labels: &[], method: "PUT" };
        let stored = match write::write(&mut tx, state, &caller.principal, change).await {
            Ok((stored, _)) => stored,
            Err(Failure::Retry) => continue,
            Err(Failure::Api(ApiError::PreconditionFailed(_))) => continue,
            Err(Failure::Api(e)) => return Err(e),
        };
        let stored = [stored];
        let response = response_message(&caller.base.url, header, header_id, &stored);
        if let Some(answered) = processed(tx, state, audit, keys, response, &stored).await? {
            return Ok(answered);
        }
    }
    Err(ApiError::Conflict("the referral's Task is being changed concurrently; retry".into()))
}

/// Ends a message's transaction: its keys claimed with the response, the audit row, the commit.
/// `None` when the attempt must be run again (a concurrent claim that left no response, a patient
/// enrolled meanwhile); a resend processed concurrently is answered with that first response.
async fn processed(mut tx: crate::store::Tx, state: &AppState, audit: &mut super::audit::Audit, keys: &[String], response: String, stored: &[crate::store::Stored]) -> Result<Option<Response>, ApiError> {
    match tx.claim_message(keys, &response, &now_instant()).await {
        Ok(()) => {}
        // A resend processed concurrently by another request or instance won; answer with its response.
        Err(StoreError::Duplicate) => {
            drop(tx);
            return Ok(already_processed(state, keys).await?.map(|previous| fhir::json_response(StatusCode::OK, previous)));
        }
        Err(StoreError::Enrolled) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    audit.entities = stored.iter().map(|s| s.reference()).collect();
    tx.append_audit(&audit.row(&state.base_url, super::audit::AuditOutcome::Success)).await?;
    match tx.commit().await {
        Ok(()) => {}
        Err(StoreError::Enrolled) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    audit.recorded = true;
    Ok(Some(fhir::json_response(StatusCode::OK, response)))
}

async fn already_processed(state: &AppState, keys: &[String]) -> Result<Option<String>, ApiError> {
    for key in keys {
        if let Some(response) = state.store.processed_message(key).await? {
            return Ok(Some(response));
        }
    }
    Ok(None)
}

/// The response message: a MessageHeader answering the request's, with the stored resources as its focus.
fn response_message(base: &str, request: &Json, request_id: &str, stored: &[crate::store::Stored]) -> String {
    let header_id = write::new_id();
    let mut members = vec![("resourceType", Json::string("MessageHeader")), ("id", Json::string(header_id.as_str()))];
    match (request.get("eventCoding"), request.get("eventUri")) {
        (Some(coding), _) => members.push(("eventCoding", coding.clone())),
        (None, Some(uri)) => members.push(("eventUri", uri.clone())),
        (None, None) => {}
    }
    if let Some(source) = request.get("source").and_then(|s| s.get("endpoint")) {
        members.push(("destination", Json::Array(vec![object([("endpoint", source.clone())])])));
    }
    members.push(("source", object([("name", Json::string("iop-gateway")), ("endpoint", Json::string(base))])));
    members.push(("response", object([("identifier", Json::string(request_id)), ("code", Json::string("ok"))])));
    let focus: Vec<Json> = stored.iter().filter(|s| s.resource_type != "MessageHeader").map(|s| object([("reference", Json::string(s.reference()))])).collect();
    if !focus.is_empty() {
        members.push(("focus", Json::Array(focus)));
    }
    let header = object(members);
    object([
        ("resourceType", Json::string("Bundle")),
        ("id", Json::string(write::new_id())),
        ("type", Json::string("message")),
        ("timestamp", Json::string(now_instant())),
        ("entry", Json::Array(vec![object([("fullUrl", Json::string(format!("urn:uuid:{header_id}"))), ("resource", header)])])),
    ])
    .to_string_compact()
}
