//! The clinic's IOP endpoints (`POST /iop/records`, `GET /iop/records`, `GET /iop/records/{record_type}/{id}`) and the operators' outbox endpoints (`GET /admin/outbox`, `GET /admin/outbox/{id}`, `POST /admin/outbox/{id}/$replay`).
//!
//! IOP records are the program's own: only clients of the program's Organization with the clinic
//! role use these endpoints, and intake writes the mapped resources through the one write path
//! with the caller's own token, so its scopes decide which resource types it may send.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::caller::Caller;
use super::error::ApiError;
use super::fhir::{self, query_pairs};
use super::rest::finish;
use super::state::AppState;
use crate::auth::{Principal, Role};
use crate::json::Json;
use crate::store::{Message, MessageStatus, RecordCursor, RecordFilter};

/// The most records one page of a listing holds.
const MAX_RECORDS: usize = 1000;

/// Records on a page when the clinic names no `limit`.
const DEFAULT_RECORDS: usize = 100;

fn clinic_only(state: &AppState, principal: &Principal) -> Result<(), ApiError> {
    if principal.role == Role::Clinic && principal.organization == state.program() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("IOP records are exchanged only by the program's own clinic clients".into()))
    }
}

fn json(status: StatusCode, value: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// `POST /iop/records`: one record or an array of them.
pub async fn post(State(state): State<AppState>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let mut audit = caller.audit("create", "C");
    audit.description = Some("IOP records".into());
    let result = async {
        clinic_only(&state, &caller.principal)?;
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(format!("Content-Type '{content_type}' is not supported; send IOP records as application/json")));
        }
        let bytes = fhir::read_bytes(&headers, body, state.loaded.config.server.max_body_bytes).await?;
        let parsed = crate::json::parse(&bytes).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
        let records = match parsed {
            Json::Array(items) => items,
            single => vec![single],
        };
        let summaries = crate::exchange::intake::intake(&state, &caller.principal, records).await?;
        audit.entities = summaries.iter().flat_map(|s| s.resources.iter().cloned()).collect();
        let value = serde_json::to_value(&summaries).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json(StatusCode::OK, &json!({ "records": value })))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /iop/records?record_type=…&direction=…&client_id=…&authorization_id=…&status=…&limit=…`:
/// newest first, `limit` a page (default [`DEFAULT_RECORDS`]); a `Link: <…&cursor=…>; rel="next"`
/// header names the next page while there is one.
pub async fn list(State(state): State<AppState>, caller: Caller, uri: Uri) -> Response {
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    let result = async {
        clinic_only(&state, &caller.principal)?;
        let mut filter = RecordFilter { limit: DEFAULT_RECORDS, ..RecordFilter::default() };
        let pairs = query_pairs(uri.query());
        for (key, value) in &pairs {
            let slot = match key.as_str() {
                "record_type" => &mut filter.record_type,
                "direction" if value == "inbound" || value == "outbound" => &mut filter.direction,
                "client_id" => &mut filter.client_id,
                "authorization_id" => &mut filter.authorization_id,
                "status" => &mut filter.status,
                "direction" => return Err(ApiError::BadRequest("direction is inbound or outbound".into())),
                "limit" => {
                    filter.limit = value.parse().ok().filter(|n| (1..=MAX_RECORDS).contains(n)).ok_or_else(|| ApiError::BadRequest(format!("limit is a number from 1 to {MAX_RECORDS}")))?;
                    continue;
                }
                "cursor" => {
                    filter.after = Some(parse_cursor(value).ok_or_else(|| ApiError::BadRequest("cursor is not one this server gave (take it from the Link header)".into()))?);
                    continue;
                }
                other => return Err(ApiError::BadRequest(format!("unknown filter '{other}' (known: record_type, direction, client_id, authorization_id, status, limit, cursor)"))),
            };
            *slot = Some(value.clone());
        }
        let (rows, next) = state.store.record_page(&filter).await?;
        let items: Vec<Value> = rows.iter().filter_map(|r| serde_json::from_str(&r.body).ok()).collect();
        let mut response = json(StatusCode::OK, &Value::Array(items));
        if let Some(next) = next {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.extend_pairs(pairs.iter().filter(|(k, _)| k != "cursor"));
            query.append_pair("cursor", &format!("{}~{}", next.updated, next.seq));
            let link = format!("<{}/iop/records?{}>; rel=\"next\"", caller.base.url, query.finish());
            if let Ok(value) = header::HeaderValue::from_str(&link) {
                response.headers_mut().insert(header::LINK, value);
            }
        }
        Ok(response)
    }
    .await;
    finish(&state, audit, result).await
}

/// `updated~seq`, the cursor [`list`] hands out.
fn parse_cursor(text: &str) -> Option<RecordCursor> {
    let (updated, seq) = text.rsplit_once('~')?;
    Some(RecordCursor { updated: updated.to_string(), seq: seq.parse().ok()? })
}

/// `GET /iop/records/{record_type}/{id}`: the record the clinic sent, else the one the gateway made.
pub async fn read(State(state): State<AppState>, caller: Caller, Path((record_type, id)): Path<(String, String)>) -> Response {
    let mut audit = caller.audit("read", "R");
    let result = async {
        clinic_only(&state, &caller.principal)?;
        // At most one row per direction: the one the clinic sent wins over the one the gateway made.
        let filter = RecordFilter { record_type: Some(record_type.clone()), id: Some(id.clone()), limit: 2, ..RecordFilter::default() };
        let rows = state.store.records(&filter).await?;
        let found = rows.iter().min_by_key(|r| r.direction != "outbound").ok_or_else(|| ApiError::NotFound(format!("no {record_type} record '{id}'")))?;
        let value: Value = serde_json::from_str(&found.body).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json(StatusCode::OK, &value))
    }
    .await;
    audit.entities.push(format!("iop/{record_type}/{id}"));
    finish(&state, audit, result).await
}

fn admin_only(principal: &Principal) -> Result<(), ApiError> {
    if principal.role == Role::Admin { Ok(()) } else { Err(ApiError::Forbidden("the outbox is for administrators".into())) }
}

/// An outbox message for operators: everything but the payload (which may carry patient data).
pub fn message_json(m: &Message) -> Value {
    json!({
        "id": m.new.id, "partner": m.new.partner, "kind": m.new.kind, "subject": m.new.subject,
        "record_type": m.new.record_type, "record_id": m.new.record_id, "status": m.status.as_str(), "attempts": m.attempts,
        "created_at": m.created_at, "next_attempt_at": m.next_attempt_at, "delivered_at": m.delivered_at,
        "last_status": m.last_status, "last_error": m.last_error,
    })
}

/// `GET /admin/outbox?status=…&partner=…`.
pub async fn outbox_list(State(state): State<AppState>, caller: Caller, uri: Uri) -> Response {
    let audit = caller.audit("search-type", "E");
    let result = async {
        admin_only(&caller.principal)?;
        let pairs = query_pairs(uri.query());
        let value = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let status = match value("status") {
            Some(s) => Some(MessageStatus::parse(&s).ok_or_else(|| ApiError::BadRequest("status is pending, in-flight, delivered or dead".into()))?),
            None => None,
        };
        let messages = state.store.messages(status, value("partner").as_deref(), MAX_RECORDS).await?;
        Ok(json(StatusCode::OK, &Value::Array(messages.iter().map(message_json).collect())))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /admin/outbox/{id}`: one message with its attempts and the partner's last answer.
pub async fn outbox_show(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    let audit = caller.audit("read", "R");
    let result = async {
        admin_only(&caller.principal)?;
        let (message, attempts) = state.store.message(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no outbox message '{id}'")))?;
        let mut value = message_json(&message);
        value["attempts_detail"] = attempts.iter().map(|a| json!({"attempt": a.attempt, "at": a.at, "status_code": a.status_code, "error": a.error, "duration_ms": a.duration_ms})).collect();
        value["response"] = serde_json::from_str(&message.response).unwrap_or(Value::String(message.response.clone()));
        Ok(json(StatusCode::OK, &value))
    }
    .await;
    finish(&state, audit, result).await
}

/// `POST /admin/outbox/{id}/$replay`: a dead letter goes back to pending.
pub async fn outbox_replay(State(state): State<AppState>, caller: Caller, Path((id, operation)): Path<(String, String)>) -> Response {
    let mut audit = caller.audit("update", "U");
    let result = async {
        admin_only(&caller.principal)?;
        if operation != "$replay" {
            return Err(ApiError::NotFound(format!("no outbox operation '{operation}' (known: $replay)")));
        }
        if !state.store.replay(&id, crate::exchange::now_ms()).await? {
            return Err(ApiError::Conflict(format!("outbox message '{id}' is not a dead letter")));
        }
        state.outbox_wake.notify_one();
        audit.description = Some(format!("outbox message {id} replayed"));
        Ok(json(StatusCode::OK, &json!({"id": id, "status": "pending"})))
    }
    .await;
    finish(&state, audit, result).await
}
