//! Partners' topic-based Subscriptions at `[base]/Subscription` (Subscriptions R5 Backport): create, read, search, status update and delete by the client that created it, `$status` and `$events`.
//!
//! A Subscription belongs to the client that created it: to any other client it does not exist
//! (404). Only its `status` may change (`off`, or `requested`/`active` to start again with a new
//! handshake); what else a Subscription asks for is fixed at create, where anything the gateway
//! cannot honour is refused with an OperationOutcome naming the element.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::caller::Caller;
use super::error::ApiError;
use super::fhir::{self, query_pairs};
use super::rest::finish;
use super::state::AppState;
use super::write::{self, ATTEMPTS};
use crate::auth::{Disclosure, Permission};
use crate::exchange::topics::{self, TOPIC};
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::store::TopicSubscription;

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Subscription/{id} is not known"))
}

/// The client's own Subscription, or 404 (another client's does not exist for it).
async fn own(state: &AppState, caller: &Caller, id: &str) -> Result<TopicSubscription, ApiError> {
    write::check_id(id)?;
    match state.store.topic_subscription(id).await? {
        Some(sub) if sub.client_id == caller.principal.client_id => Ok(sub),
        _ => Err(not_found(id)),
    }
}

/// The Subscription as served: as created, with its current status, version and time.
fn shown(sub: &TopicSubscription) -> Json {
    let mut resource = crate::json::parse(sub.resource.as_bytes()).unwrap_or(Json::Null);
    if let Some(object) = resource.as_object_mut() {
        object.insert("status", Json::string(sub.status.as_str()));
        if let Some(Json::Object(meta)) = object.get_mut("meta") {
            meta.insert("versionId", Json::string(sub.version.to_string()));
            meta.insert("lastUpdated", Json::string(sub.updated.as_str()));
        }
        if sub.status == "error" && !sub.error.is_empty() {
            object.insert("error", Json::string(sub.error.as_str()));
        }
    }
    resource
}

fn response(status: StatusCode, sub: &TopicSubscription, base: &str) -> Response {
    let mut response = fhir::json_response(status, shown(sub).to_string_compact());
    if let Ok(value) = header::HeaderValue::from_str(&fhir::etag(sub.version)) {
        response.headers_mut().insert(header::ETAG, value);
    }
    if status == StatusCode::CREATED
        && let Ok(value) = header::HeaderValue::from_str(&format!("{base}/Subscription/{}/_history/{}", sub.id, sub.version))
    {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `POST /Subscription`.
pub async fn create(State(state): State<AppState>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let mut audit = caller.audit("create", "C");
    let result = async {
        caller.principal.may("Subscription", Permission::Create).map_err(ApiError::Forbidden)?;
        let resource = fhir::read_resource(&state, &headers, body).await?;
        write::check_type(&resource, "Subscription")?;
        let resource = write::validate(&state, resource, Vec::new()).await?;
        let callbacks = state.clients.get(&caller.principal.client_id).map(|c| c.config.callbacks.clone()).unwrap_or_default();
        let request = topics::read_request(&resource, &callbacks, &state.loaded.config.topics).map_err(ApiError::Unprocessable)?;
        let id = write::new_id();
        let updated = fhir::now_instant();
        let mut stored = resource;
        if let Some(object) = stored.as_object_mut() {
            object.insert("id", Json::string(id.as_str()));
            object.insert("status", Json::string("requested"));
            let mut meta = match object.remove("meta") {
                Some(Json::Object(meta)) => meta,
                _ => crate::json::Object::new(),
            };
            meta.insert("versionId", Json::string("1"));
            meta.insert("lastUpdated", Json::string(updated.as_str()));
            object.insert("meta", Json::Object(meta));
        }
        let sub = TopicSubscription {
            id: id.clone(),
            client_id: caller.principal.client_id.clone(),
            scope: caller.principal.scopes.to_string(),
            topic: TOPIC.to_string(),
            filters: request.filters,
            payload: request.payload,
            endpoint: request.endpoint,
            headers: request.headers,
            heartbeat_secs: request.heartbeat_secs,
            timeout_secs: request.timeout_secs,
            status: "requested".into(),
            events: 0,
            failures: 0,
            error: String::new(),
            last_queued_at: crate::exchange::now_ms(),
            version: 1,
            updated,
            resource: stored.to_string_compact(),
        };
        let handshake = topics::handshake(&state, &sub).await?;
        let mut tx = state.store.begin().await?;
        tx.insert_topic_subscription(&sub).await?;
        tx.enqueue(&handshake, crate::exchange::now_ms()).await?;
        audit.entities.push(format!("Subscription/{id}"));
        tx.append_audit(&audit.row(&state.base_url, super::audit::AuditOutcome::Success)).await?;
        tx.commit().await?;
        audit.recorded = true;
        state.topics.clear();
        state.outbox_wake.notify_one();
        Ok(response(StatusCode::CREATED, &sub, &caller.base.url))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /Subscription/{id}`.
pub async fn read(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    let mut audit = caller.audit("read", "R");
    audit.entities.push(format!("Subscription/{id}"));
    let result = async {
        caller.principal.may("Subscription", Permission::Read).map_err(ApiError::Forbidden)?;
        let sub = own(&state, &caller, &id).await?;
        Ok(response(StatusCode::OK, &sub, &caller.base.url))
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /Subscription?…`: the client's own Subscriptions, by `_id` or `status`.
pub async fn search(State(state): State<AppState>, caller: Caller, uri: Uri) -> Response {
    let mut audit = caller.audit("search-type", "E");
    audit.query = uri.query().map(str::to_string);
    let result = async {
        caller.principal.may("Subscription", Permission::Search).map_err(ApiError::Forbidden)?;
        let (mut id, mut status) = (None, None);
        for (name, value) in query_pairs(uri.query()) {
            match name.as_str() {
                "_id" => id = Some(value),
                "status" => status = Some(value),
                "_format" => {}
                other => return Err(ApiError::BadRequest(format!("'{other}' is not a search parameter of Subscription here (it takes _id and status)"))),
            }
        }
        let found: Vec<TopicSubscription> =
            state.store.client_topic_subscriptions(&caller.principal.client_id, status.as_deref()).await?.into_iter().filter(|s| id.as_ref().is_none_or(|id| &s.id == id)).collect();
        let self_link = format!("{}/Subscription{}", caller.base.url, uri.query().map(|q| format!("?{q}")).unwrap_or_default());
        let mut bundle = fhir::BundleText::new("searchset", Some(found.len() as i64), &[("self", self_link)]);
        for sub in &found {
            audit.entities.push(format!("Subscription/{}", sub.id));
            let url = format!("{}/Subscription/{}", caller.base.url, sub.id);
            bundle.entry(Some(&url), Some(&shown(sub).to_string_compact()), &[("search", fhir::object([("mode", Json::string("match"))]))]);
        }
        Ok(fhir::json_response(StatusCode::OK, bundle.finish()))
    }
    .await;
    finish(&state, audit, result).await
}

/// `PUT /Subscription/{id}`: only the status changes (`off`; `requested` or `active` to start again with a handshake).
pub async fn update(State(state): State<AppState>, caller: Caller, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let mut audit = caller.audit("update", "U");
    audit.entities.push(format!("Subscription/{id}"));
    let result = async {
        caller.principal.may("Subscription", Permission::Update).map_err(ApiError::Forbidden)?;
        let sub = own(&state, &caller, &id).await?;
        let resource = fhir::read_resource(&state, &headers, body).await?;
        write::check_type(&resource, "Subscription")?;
        if resource.get("id").and_then(Json::as_str) != Some(id.as_str()) {
            return Err(ApiError::BadRequest(format!("the body's id must be '{id}', the id in the URL")));
        }
        let resource = write::validate(&state, resource, Vec::new()).await?;
        let wanted = resource.get("status").and_then(Json::as_str).unwrap_or_default().to_string();
        let before = shown(&sub);
        let strip = |r: &Json| {
            let mut r = r.clone();
            if let Some(object) = r.as_object_mut() {
                for member in ["meta", "status", "error", "text"] {
                    object.remove(member);
                }
            }
            r
        };
        if let (Some(a), Some(b)) = (strip(&before).as_object(), strip(&resource).as_object()) {
            let names: Vec<&str> = a.iter().map(|(k, _)| k).chain(b.iter().map(|(k, _)| k)).collect();
            if let Some(member) = names.into_iter().find(|m| a.get(m) != b.get(m)) {
                return Err(ApiError::Unprocessable(vec![Issue::error(
                    IssueCode::NotSupported,
                    format!("Subscription.{member}"),
                    "only the status of a Subscription changes; create a new Subscription for other criteria or another channel",
                )]));
            }
        }
        let status = match wanted.as_str() {
            "off" => "off",
            "requested" | "active" => "requested",
            other => return Err(ApiError::Unprocessable(vec![Issue::error(IssueCode::Value, "Subscription.status", format!("a client sets the status to off, requested or active, not '{other}'"))])),
        };
        if let Some(expected) = fhir::if_match(&headers)?
            && expected != sub.version
        {
            return Err(ApiError::PreconditionFailed(format!("If-Match names version {expected} but the current version is {}", sub.version)));
        }
        let restart = status == "requested" && sub.status != "requested" && sub.status != "active";
        if status == sub.status || (status == "requested" && sub.status == "active") {
            return Ok(response(StatusCode::OK, &sub, &caller.base.url));
        }
        let updated = fhir::now_instant();
        let next = TopicSubscription { status: status.to_string(), error: String::new(), failures: 0, version: sub.version + 1, updated: updated.clone(), ..sub.clone() };
        let handshake = if restart { Some(topics::handshake(&state, &next).await?) } else { None };
        for _ in 0..ATTEMPTS {
            let mut tx = state.store.begin().await?;
            if !tx.set_topic_status(&id, sub.version, status, "", &updated, &sub.resource).await? {
                return Err(ApiError::Conflict(format!("Subscription/{id} changed meanwhile; read it and try again")));
            }
            if let Some(handshake) = &handshake {
                tx.enqueue(handshake, crate::exchange::now_ms()).await?;
            }
            tx.append_audit(&audit.row(&state.base_url, super::audit::AuditOutcome::Success)).await?;
            match tx.commit().await {
                Ok(()) => {
                    audit.recorded = true;
                    state.topics.clear();
                    state.outbox_wake.notify_one();
                    return Ok(response(StatusCode::OK, &next, &caller.base.url));
                }
                Err(crate::store::StoreError::Duplicate) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict("the update could not be recorded; send it again".into()))
    }
    .await;
    finish(&state, audit, result).await
}

/// `DELETE /Subscription/{id}`: the Subscription and its events are gone; what was queued for it is not sent.
pub async fn delete(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    let mut audit = caller.audit("delete", "D");
    audit.entities.push(format!("Subscription/{id}"));
    let result = async {
        caller.principal.may("Subscription", Permission::Delete).map_err(ApiError::Forbidden)?;
        own(&state, &caller, &id).await?;
        let mut tx = state.store.begin().await?;
        tx.delete_topic_subscription(&id).await?;
        tx.append_audit(&audit.row(&state.base_url, super::audit::AuditOutcome::Success)).await?;
        tx.commit().await?;
        audit.recorded = true;
        state.topics.clear();
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    finish(&state, audit, result).await
}

/// `GET /Subscription/{id}/$status` and `GET /Subscription/{id}/$events`.
pub async fn operation(State(state): State<AppState>, caller: Caller, Path((id, operation)): Path<(String, String)>, uri: Uri) -> Response {
    let mut audit = caller.audit("operation", "E");
    audit.entities.push(format!("Subscription/{id}"));
    let result = async {
        caller.principal.may("Subscription", Permission::Read).map_err(ApiError::Forbidden)?;
        let sub = own(&state, &caller, &id).await?;
        match operation.as_str() {
            "$status" => Ok(status(&state, &caller, &sub)),
            "$events" => events(&state, &caller, &sub, &query_pairs(uri.query())).await,
            other => Err(ApiError::NotFound(format!("'{other}' is not an operation on Subscription here ($status, $events)"))),
        }
    }
    .await;
    finish(&state, audit, result).await
}

/// Anything else on `/Subscription` (history, conditional forms, POSTed operations).
pub async fn unsupported(State(state): State<AppState>, caller: Caller) -> Response {
    let audit = caller.audit("operation", "E");
    let result: Result<Response, ApiError> = Err(ApiError::MethodNotAllowed(
        "Subscriptions here support create (POST), read, search (_id, status), update of the status, delete, and GET $status and $events; no history or conditional forms".into(),
    ));
    finish(&state, audit, result).await
}

/// `$status`: a searchset holding the Subscription's status (`query-status`).
fn status(state: &AppState, caller: &Caller, sub: &TopicSubscription) -> Response {
    let parameters = topics::status_parameters(&state.base_url, sub, &sub.status, "query-status", &[]);
    let mut bundle = fhir::BundleText::new("searchset", Some(1), &[("self", format!("{}/Subscription/{}/$status", caller.base.url, sub.id))]);
    let url = format!("urn:uuid:{}", parameters.get("id").and_then(Json::as_str).unwrap_or_default());
    bundle.entry(Some(&url), Some(&parameters.to_string_compact()), &[("search", fhir::object([("mode", Json::string("match"))]))]);
    fhir::json_response(StatusCode::OK, bundle.finish())
}

/// `$events`: the events numbered from `eventsSinceNumber` to `eventsUntilNumber` (`query-event`), each
/// disclosed again now, as the version it was about, and with the content the Subscription's payload gives.
async fn events(state: &AppState, caller: &Caller, sub: &TopicSubscription, pairs: &[(String, String)]) -> Result<Response, ApiError> {
    let number = |name: &str| -> Result<Option<i64>, ApiError> {
        match pairs.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, v)) => v.trim().parse::<i64>().ok().filter(|n| *n > 0).map(Some).ok_or_else(|| ApiError::BadRequest(format!("{name}: '{v}' is not an event number (1 or more)"))),
        }
    };
    let mut payload = sub.payload.clone();
    for (name, value) in pairs {
        match name.as_str() {
            "eventsSinceNumber" | "eventsUntilNumber" | "_format" => {}
            "content" => match value.as_str() {
                // A hint: less than the Subscription's payload is given, never more.
                "empty" => payload = "empty".into(),
                "id-only" if payload == "full-resource" => payload = "id-only".into(),
                "id-only" | "full-resource" => {}
                other => return Err(ApiError::BadRequest(format!("content: '{other}' is not empty, id-only or full-resource"))),
            },
            other => return Err(ApiError::BadRequest(format!("'{other}' is not a parameter of $events (eventsSinceNumber, eventsUntilNumber, content)"))),
        }
    }
    let since = number("eventsSinceNumber")?.unwrap_or(1);
    let until = number("eventsUntilNumber")?.unwrap_or(sub.events);
    let limit = state.loaded.config.topics.max_events;
    let listed = state.store.topic_events(&sub.id, since, until, limit).await?;
    let principal = &caller.principal;
    let mut candidates = Vec::new();
    for event in listed {
        let (Some(current), Some(version)) = (state.store.read(&event.resource_type, &event.resource_id).await?, state.store.vread(&event.resource_type, &event.resource_id, event.version).await?) else { continue };
        if principal.disclosure_of_version(current.facts(), version.facts()) == Disclosure::Allow {
            candidates.push((event, version));
        }
    }
    let content = topics::event_content(&payload, candidates);
    let shown_sub = TopicSubscription { payload: payload.clone(), ..sub.clone() };
    let bundle = topics::notification_bundle(&state.base_url, &shown_sub, &sub.status, "query-event", &content);
    Ok(fhir::json_response(StatusCode::OK, bundle.to_string_compact()))
}

/// The CapabilityStatement's Subscription entry: the topic, the backport profile and operations.
pub fn capability() -> Json {
    let value = serde_json::json!({
        "extension": [{"url": topics::TOPIC_CANONICAL, "valueCanonical": TOPIC}],
        "type": "Subscription",
        "profile": "http://hl7.org/fhir/StructureDefinition/Subscription",
        "supportedProfile": [topics::SUBSCRIPTION_PROFILE],
        "documentation": format!("Topic-based Subscriptions (Subscriptions R5 Backport) on {TOPIC}: every version of a Task, filterable by requester, owner and patient (Task?requester=Organization/x). Rest-hook channel, application/fhir+json, payload empty, id-only or full-resource; the endpoint must lie under the client's registered callbacks. A Subscription belongs to the client that created it; only its status changes (off; requested to start again)."),
        "interaction": [{"code": "create"}, {"code": "read"}, {"code": "update"}, {"code": "delete"}, {"code": "search-type"}],
        "searchParam": [{"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"}, {"name": "status", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Subscription-status"}],
        "operation": [
            {"name": "status", "definition": topics::STATUS_OPERATION, "documentation": "GET [base]/Subscription/[id]/$status"},
            {"name": "events", "definition": topics::EVENTS_OPERATION, "documentation": "GET [base]/Subscription/[id]/$events?eventsSinceNumber=&eventsUntilNumber=&content= : events replayed by number, each disclosed again at replay time."}
        ]
    });
    crate::json::parse(value.to_string().as_bytes()).unwrap_or(Json::Null)
}
