//! The gateway as a Subscriptions R5 Backport server: the topic it publishes (referral Task changes), partners' Subscriptions read and checked, events raised in the one write path, notification Bundles built, and their delivery through the outbox (handshake, event notifications, heartbeats).
//!
//! - A version of a Task written through [`crate::api::write::write`] becomes an event for each
//!   live Subscription whose filters match and whose client may read that version (the one
//!   disclosure decision, `Principal::disclosure`, with the scopes the Subscription was created
//!   with): its number is taken in the writing transaction and its notification queued there.
//!   A partner is never told about what it may not read, not even by id.
//! - Notifications of one Subscription go in order (the outbox's subject is the Subscription), to
//!   its endpoint only, which must lie under its client's `callbacks`. A failed attempt is retried
//!   with backoff; `topics.error_after_failures` failures in a row (or a refused handshake) put the
//!   Subscription in `error`, as the backport's errors page says: events keep their numbers, nothing
//!   more is sent, and its client sets it back to `requested` (a new handshake) once it has recovered
//!   what it missed through `$events`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::ApiError;
use crate::api::part2::Disclosed;
use crate::api::state::AppState;
use crate::api::write::{self, Failure};
use crate::config::TopicsConfig;
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::partner::Delivery;
use crate::store::{Ending, Message, MessageStatus, NewMessage, StoreError, Stored, TopicEvent, TopicSubscription, Tx};

/// The topic the gateway publishes: every change of a referral Task.
pub const TOPIC: &str = "http://iop-gateway.org/fhir/SubscriptionTopic/referral-task-changed";
/// The resource type the topic is about.
pub const TOPIC_RESOURCE: &str = "Task";
/// The filters the topic can be narrowed by (Task search parameters).
pub const FILTERS: &[&str] = &["requester", "owner", "patient"];

/// Outbox kinds.
pub const NOTIFICATION: &str = "subscription-notification";
pub const HANDSHAKE: &str = "handshake";
pub const HEARTBEAT: &str = "heartbeat";

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
pub const SUBSCRIPTION_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
const STATUS_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";
const NOTIFICATION_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4";
pub const TOPIC_CANONICAL: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical";
pub const STATUS_OPERATION: &str = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status";
pub const EVENTS_OPERATION: &str = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events";

fn ext(name: &str) -> String {
    format!("{BACKPORT}{name}")
}

/// What a Subscription asks for, once read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub filters: Vec<String>,
    pub payload: String,
    pub endpoint: String,
    pub headers: Vec<String>,
    pub heartbeat_secs: i64,
    pub timeout_secs: i64,
}

/// Headers a Subscription may not set: they belong to the transport.
const RESERVED_HEADERS: &[&str] = &["host", "content-type", "content-length", "transfer-encoding", "connection", "te", "upgrade", "expect"];

/// Reads a Subscription a client posted: topic, filters, channel, payload, heartbeat and timeout,
/// each refused with an issue located at the element (what the gateway cannot honour is not accepted).
pub fn read_request(resource: &Json, callbacks: &[String], config: &TopicsConfig) -> Result<Request, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut refuse = |at: &str, message: String| issues.push(Issue::error(IssueCode::NotSupported, at, message));
    let criteria = resource.get("criteria").and_then(Json::as_str).unwrap_or_default();
    if criteria != TOPIC {
        refuse("Subscription.criteria", format!("'{criteria}' is not a topic this server publishes; the one topic is {TOPIC}"));
    }
    let mut filters = Vec::new();
    let criteria_extensions = resource.get("_criteria").and_then(|c| c.get("extension")).and_then(Json::as_array).unwrap_or_default();
    for (i, extension) in criteria_extensions.iter().enumerate() {
        if extension.get("url").and_then(Json::as_str) != Some(ext("backport-filter-criteria").as_str()) {
            continue;
        }
        let at = format!("Subscription.criteria.extension[{i}].valueString");
        match extension.get("valueString").and_then(Json::as_str).map(parse_filter) {
            Some(Ok(mut read)) => filters.append(&mut read),
            Some(Err(why)) => refuse(&at, why),
            None => refuse(&at, "a filter criteria extension needs a valueString".into()),
        }
    }
    let channel = resource.get("channel");
    let channel_type = channel.and_then(|c| c.get("type")).and_then(Json::as_str).unwrap_or_default();
    let custom_type = channel.and_then(|c| c.get("_type")).and_then(|t| t.get("extension")).is_some();
    if channel_type != "rest-hook" || custom_type {
        refuse("Subscription.channel.type", format!("channel '{channel_type}' is not supported: only rest-hook"));
    }
    let endpoint = channel.and_then(|c| c.get("endpoint")).and_then(Json::as_str).unwrap_or_default().to_string();
    if endpoint.is_empty() {
        refuse("Subscription.channel.endpoint", "a rest-hook Subscription needs an endpoint".into());
    } else if !crate::config::callback_allowed(&endpoint, callbacks) {
        refuse("Subscription.channel.endpoint", "the endpoint is not under one of this client's registered callback URLs (https, or http to a loopback address)".into());
    }
    let mime = channel.and_then(|c| c.get("payload")).and_then(Json::as_str).unwrap_or_default();
    if mime != "application/fhir+json" && mime != "application/json" {
        refuse("Subscription.channel.payload", format!("payload '{mime}' is not supported: application/fhir+json"));
    }
    let mut payload = None;
    let payload_extensions = channel.and_then(|c| c.get("_payload")).and_then(|p| p.get("extension")).and_then(Json::as_array).unwrap_or_default();
    for (i, extension) in payload_extensions.iter().enumerate() {
        if extension.get("url").and_then(Json::as_str) == Some(ext("backport-payload-content").as_str()) {
            match extension.get("valueCode").and_then(Json::as_str) {
                Some(code @ ("empty" | "id-only" | "full-resource")) => payload = Some(code.to_string()),
                other => refuse(&format!("Subscription.channel.payload.extension[{i}].valueCode"), format!("payload content '{}' is not one of empty, id-only, full-resource", other.unwrap_or_default())),
            }
        }
    }
    if payload.is_none() && !payload_extensions.iter().any(|e| e.get("url").and_then(Json::as_str) == Some(ext("backport-payload-content").as_str())) {
        refuse("Subscription.channel.payload", "the backport-payload-content extension (empty, id-only or full-resource) is required".into());
    }
    let mut heartbeat_secs = 0;
    let mut timeout_secs = config.timeout_secs as i64;
    let channel_extensions = channel.and_then(|c| c.get("extension")).and_then(Json::as_array).unwrap_or_default();
    for (i, extension) in channel_extensions.iter().enumerate() {
        let url = extension.get("url").and_then(Json::as_str).unwrap_or_default();
        let number = |member: &str| match extension.get(member) {
            Some(Json::Number(n)) => n.parse::<i64>().ok(),
            _ => None,
        };
        let at = format!("Subscription.channel.extension[{i}]");
        if url == ext("backport-heartbeat-period") {
            match number("valueUnsignedInt") {
                Some(n) if n >= config.min_heartbeat_secs as i64 => heartbeat_secs = n,
                Some(n) => refuse(&format!("{at}.valueUnsignedInt"), format!("a heartbeat every {n} s is more often than this server sends them (at least {} s)", config.min_heartbeat_secs)),
                None => refuse(&at, "the heartbeat period needs a valueUnsignedInt".into()),
            }
        } else if url == ext("backport-timeout") {
            match number("valueUnsignedInt") {
                Some(n) if n > 0 => timeout_secs = n.min(timeout_secs),
                _ => refuse(&at, "the timeout needs a valueUnsignedInt greater than 0".into()),
            }
        }
    }
    let mut headers = Vec::new();
    for (i, header) in channel.and_then(|c| c.get("header")).and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let at = format!("Subscription.channel.header[{i}]");
        let line = header.as_str().unwrap_or_default();
        match line.split_once(':') {
            Some((name, value))
                if reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value.trim()).is_ok()
                    && !RESERVED_HEADERS.contains(&name.trim().to_ascii_lowercase().as_str()) =>
            {
                headers.push(format!("{}: {}", name.trim(), value.trim()))
            }
            _ => refuse(&at, "a header is 'Name: value', with a name other than the transport's own (Host, Content-Type, Content-Length, …)".into()),
        }
    }
    match resource.get("status").and_then(Json::as_str) {
        Some("requested" | "active") => {}
        other => refuse("Subscription.status", format!("a new Subscription is 'requested', not '{}'", other.unwrap_or_default())),
    }
    if resource.get("end").is_some() {
        refuse("Subscription.end", "Subscriptions here do not end by themselves; set the status to off (or delete it) instead".into());
    }
    if issues.is_empty() { Ok(Request { filters, payload: payload.unwrap_or_default(), endpoint, headers, heartbeat_secs, timeout_secs }) } else { Err(issues) }
}

/// Reads one filter criteria value in the backport's R4 form (`Task?requester=Organization/x&patient=Patient/p`,
/// or without `Task?`) into `param=value` filters, values as normalised references (comma: any of them).
pub fn parse_filter(text: &str) -> Result<Vec<String>, String> {
    let query = match text.split_once('?') {
        Some((resource_type, query)) if resource_type == TOPIC_RESOURCE => query,
        Some((resource_type, _)) => return Err(format!("the topic is about {TOPIC_RESOURCE}, not {resource_type}")),
        None => text,
    };
    let mut filters = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').ok_or_else(|| format!("'{pair}' is not name=value"))?;
        if !FILTERS.contains(&name) {
            return Err(format!("'{name}' is not a filter of this topic (it takes {})", FILTERS.join(", ")));
        }
        let mut values = Vec::new();
        for value in value.split(',') {
            let value = value.replace("%2F", "/").replace("%2f", "/");
            let value = if name == "patient" && !value.contains('/') { format!("Patient/{value}") } else { value };
            let reference = crate::search::normalize_reference(&value).ok_or_else(|| format!("'{value}' is not a reference such as Organization/x"))?;
            values.push(reference);
        }
        filters.push(format!("{name}={}", values.join(",")));
    }
    if filters.is_empty() {
        return Err("the filter names no parameter".into());
    }
    Ok(filters)
}

/// Whether a Task matches every filter (an empty list matches all).
pub fn matches(filters: &[String], task: &Json) -> bool {
    filters.iter().all(|filter| {
        let Some((name, values)) = filter.split_once('=') else { return false };
        let member = if name == "patient" { "for" } else { name };
        let reference = task.get(member).and_then(|r| r.get("reference")).and_then(Json::as_str).and_then(crate::search::normalize_reference);
        reference.is_some_and(|r| values.split(',').any(|v| v == r))
    })
}

/// The topic's live Subscriptions as this instance last read them: one store query per `topics.cache_secs`, not one per write.
#[derive(Default)]
pub struct Cache {
    slot: Mutex<Option<(Instant, Arc<Vec<TopicSubscription>>)>>,
}

impl Cache {
    /// Forgets the list (a Subscription changed here).
    pub fn clear(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
    }

    fn fresh(&self, ttl: Duration) -> Option<Arc<Vec<TopicSubscription>>> {
        let slot = self.slot.lock().ok()?;
        slot.as_ref().filter(|(at, _)| at.elapsed() < ttl).map(|(_, list)| list.clone())
    }

    async fn live(&self, state: &AppState) -> Result<Arc<Vec<TopicSubscription>>, StoreError> {
        if let Some(list) = self.fresh(Duration::from_secs(state.loaded.config.topics.cache_secs)) {
            return Ok(list);
        }
        let list = Arc::new(state.store.live_topic_subscriptions(TOPIC).await?);
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((Instant::now(), list.clone()));
        }
        Ok(list)
    }
}

/// One event as a notification carries it.
#[derive(Clone, Debug)]
pub struct EventContent {
    pub number: i64,
    pub at: String,
    /// `Type/id` of the resource, unless the payload is `empty`.
    pub focus: Option<String>,
    /// The resource version and whether it was its first, for `full-resource`.
    pub resource: Option<(Json, bool)>,
}

/// The content of a notification's events, as the Subscription's payload allows: the one place it is
/// built, for notifications and `$events` alike, from the candidate versions the caller already
/// disclosed to the subscriber (a consent check on the candidates plugs in here).
pub fn event_content(payload: &str, candidates: Vec<(TopicEvent, Stored)>) -> Vec<EventContent> {
    candidates
        .into_iter()
        .map(|(event, stored)| {
            let focus = (payload != "empty").then(|| format!("{}/{}", event.resource_type, event.resource_id));
            let resource = (payload == "full-resource").then(|| crate::json::parse(stored.body.as_bytes()).ok()).flatten().map(|r| (r, stored.version == 1));
            EventContent { number: event.number, at: event.at, focus, resource }
        })
        .collect()
}

fn json(value: serde_json::Value) -> Json {
    crate::json::parse(value.to_string().as_bytes()).unwrap_or(Json::Null)
}

/// The SubscriptionStatus (R4: a Parameters) of a Subscription: `kind` is the notification type.
pub fn status_parameters(base: &str, sub: &TopicSubscription, status: &str, kind: &str, events: &[EventContent]) -> Json {
    let id = uuid::Uuid::new_v4().to_string();
    let mut parameters = vec![serde_json::json!({"name": "subscription", "valueReference": {"reference": format!("{base}/Subscription/{}", sub.id)}})];
    if sub.payload != "empty" {
        parameters.push(serde_json::json!({"name": "topic", "valueCanonical": TOPIC}));
    }
    parameters.push(serde_json::json!({"name": "status", "valueCode": status}));
    parameters.push(serde_json::json!({"name": "type", "valueCode": kind}));
    parameters.push(serde_json::json!({"name": "events-since-subscription-start", "valueString": sub.events.to_string()}));
    for event in events {
        let mut parts = vec![serde_json::json!({"name": "event-number", "valueString": event.number.to_string()}), serde_json::json!({"name": "timestamp", "valueInstant": event.at})];
        if let Some(focus) = &event.focus {
            parts.push(serde_json::json!({"name": "focus", "valueReference": {"reference": format!("{base}/{focus}")}}));
        }
        parameters.push(serde_json::json!({"name": "notification-event", "part": parts}));
    }
    if status == "error" && !sub.error.is_empty() {
        parameters.push(serde_json::json!({"name": "error", "valueCodeableConcept": {"text": sub.error}}));
    }
    json(serde_json::json!({"resourceType": "Parameters", "id": id, "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameters}))
}

/// A notification Bundle (`history`, the SubscriptionStatus first, then each `full-resource` event's resource).
pub fn notification_bundle(base: &str, sub: &TopicSubscription, status: &str, kind: &str, events: &[EventContent]) -> Json {
    let parameters = status_parameters(base, sub, status, kind, events);
    let status_id = parameters.get("id").and_then(Json::as_str).unwrap_or_default().to_string();
    let mut entries = vec![json(serde_json::json!({
        "fullUrl": format!("urn:uuid:{status_id}"),
        "request": {"method": "GET", "url": format!("{base}/Subscription/{}/$status", sub.id)},
        "response": {"status": "200"}
    }))];
    if let Some(Json::Object(first)) = entries.first_mut() {
        first.insert("resource", parameters);
        reorder(first, &["fullUrl", "resource", "request", "response"]);
    }
    for event in events {
        let (Some(focus), Some((resource, created))) = (&event.focus, &event.resource) else { continue };
        let resource_type = focus.split('/').next().unwrap_or_default();
        let (method, url, answer) = if *created { ("POST", resource_type.to_string(), "201") } else { ("PUT", focus.clone(), "200") };
        let mut entry = json(serde_json::json!({
            "fullUrl": format!("{base}/{focus}"),
            "request": {"method": method, "url": url},
            "response": {"status": answer}
        }));
        if let Some(object) = entry.as_object_mut() {
            object.insert("resource", resource.clone());
            reorder(object, &["fullUrl", "resource", "request", "response"]);
        }
        entries.push(entry);
    }
    let mut bundle = json(serde_json::json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": crate::api::fhir::now_instant(),
    }));
    if let Some(object) = bundle.as_object_mut() {
        object.insert("entry", Json::Array(entries));
    }
    bundle
}

fn reorder(object: &mut crate::json::Object, order: &[&str]) {
    let mut rebuilt = crate::json::Object::new();
    for name in order {
        if let Some(value) = object.remove(name) {
            rebuilt.insert(*name, value);
        }
    }
    for (name, value) in object.iter() {
        rebuilt.insert(name, value.clone());
    }
    *object = rebuilt;
}

/// Validates an outbound notification (nothing invalid leaves); the issues as text on failure.
pub async fn checked(state: &AppState, bundle: Json) -> Result<String, String> {
    match write::validate(state, bundle, Vec::new()).await {
        Ok(valid) => Ok(valid.to_string_compact()),
        Err(ApiError::Unprocessable(issues)) => Err(issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect::<Vec<_>>().join("; ")),
        Err(other) => Err(other.to_string()),
    }
}

/// A message for a Subscription's queue.
pub fn message(sub: &TopicSubscription, kind: &str, payload: String) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::new_v4().to_string(),
        partner: sub.client_id.clone(),
        subject: sub.id.clone(),
        kind: kind.to_string(),
        record_type: "subscription".into(),
        record_id: sub.id.clone(),
        payload,
    }
}

/// The handshake that a new (or reactivated) Subscription's endpoint must accept before events flow; validated.
pub async fn handshake(state: &AppState, sub: &TopicSubscription) -> Result<NewMessage, ApiError> {
    let bundle = notification_bundle(&state.base_url, sub, "requested", "handshake", &[]);
    let payload = checked(state, bundle).await.map_err(|why| ApiError::Internal(format!("the handshake notification is not valid: {why}")))?;
    Ok(message(sub, HANDSHAKE, payload))
}

/// Called by the one write path for every version it writes, in its transaction: the events that
/// version raises. Costs one cached list when nobody subscribes; a partner that may not read the
/// version gets no event at all.
pub async fn on_write(tx: &mut Tx, state: &AppState, stored: &Stored, resource: &Json) -> Result<(), Failure> {
    if stored.resource_type != TOPIC_RESOURCE {
        return Ok(());
    }
    let live = state.topics.live(state).await.map_err(ApiError::from)?;
    if live.is_empty() {
        return Ok(());
    }
    let mut queued = false;
    for sub in live.iter().filter(|s| matches(&s.filters, resource)) {
        let Some(principal) = crate::api::caller::principal_of(state, &sub.client_id, &sub.scope) else { continue };
        // Part 2 data goes to a partner as its patient's consent allows (the send step decides again).
        let consents = if principal.needs_consent(stored.facts()) {
            let patients = crate::search::compartment::about(&stored.resource_type, resource);
            state.store.consent_rules_of(&patients).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "Consent rules could not be read; the Part 2 event is withheld.");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        if !principal.disclosure(stored.facts_with(&consents)).is_allowed() {
            continue;
        }
        let event = TopicEvent { number: 0, resource_type: stored.resource_type.clone(), resource_id: stored.id.clone(), version: stored.version, at: stored.last_updated.clone() };
        let Some((number, status)) = tx.next_topic_event(&sub.id, &event, super::now_ms()).await? else { continue };
        if status == "error" {
            // Counted and kept for `$events`, not sent: the client recovers and reactivates.
            continue;
        }
        let numbered = TopicSubscription { events: number, ..sub.clone() };
        let content = event_content(&sub.payload, vec![(TopicEvent { number, ..event }, stored.clone())]);
        let bundle = notification_bundle(&state.base_url, &numbered, &status, "event-notification", &content);
        match checked(state, bundle).await {
            Ok(payload) => {
                tx.enqueue(&message(sub, NOTIFICATION, payload), super::now_ms()).await?;
                queued = true;
            }
            Err(why) => tracing::error!(subscription = %sub.id, reason = %why, "A notification is not valid and is not sent; the event stays available by $events."),
        }
    }
    if queued {
        state.outbox_wake.notify_one();
    }
    Ok(())
}

/// A notification the consent decision holds: a dead letter saying why (its event stays numbered; `$events` decides again).
pub async fn hold(state: &AppState, owner: &str, message: &Message, reason: &str) -> Result<bool, ApiError> {
    finish(state, message, owner, MessageStatus::Dead, 0, reason, "", &[]).await
}

/// Delivers one claimed notification, handshake or heartbeat to its Subscription's endpoint (`payload`: as the
/// consent decision left it), and records what followed: once delivered, each Part 2 disclosure the
/// consent decision allowed (`disclosures`) is accounted for, in the transaction that records the delivery.
pub async fn deliver(state: &AppState, owner: &str, message: &Message, payload: &str, disclosures: &[Disclosed]) -> Result<bool, ApiError> {
    let config = &state.loaded.config.topics;
    let Some(sub) = state.store.topic_subscription(&message.new.record_id).await? else {
        return finish(state, message, owner, MessageStatus::Dead, 0, "the Subscription was deleted", "", &[]).await;
    };
    let due = if message.new.kind == HANDSHAKE { sub.status == "requested" } else { sub.status == "active" };
    if !due {
        let why = format!("the Subscription is {}; its events stay available by $events", sub.status);
        return finish(state, message, owner, MessageStatus::Dead, 0, &why, "", &[]).await;
    }
    let callbacks = state.clients.get(&sub.client_id).map(|c| c.config.callbacks.clone()).unwrap_or_default();
    if !crate::config::callback_allowed(&sub.endpoint, &callbacks) {
        let why = "the endpoint is no longer under the client's callbacks";
        state.store.topic_error(&sub.id, why).await?;
        return finish(state, message, owner, MessageStatus::Dead, 0, why, "", &[]).await;
    }
    let started = Instant::now();
    let timeout = Duration::from_secs(sub.timeout_secs.clamp(1, config.timeout_secs as i64) as u64);
    let delivery = state.partners.notify(&sub.endpoint, &sub.headers, payload, timeout).await;
    let elapsed = started.elapsed();
    let error = super::outbox::record_attempt(state, message, &delivery, elapsed, "the endpoint refused the notification").await;
    match delivery {
        Delivery::Accepted { status, body, .. } => {
            state.store.topic_delivered(&sub.id, message.new.kind == HANDSHAKE).await?;
            state.metrics.observe_delivered(&message.new.partner, Duration::from_millis((super::now_ms() - message.created_at).max(0) as u64));
            finish(state, message, owner, MessageStatus::Delivered, status, "", &body, disclosures).await
        }
        Delivery::Refused { status, body } => {
            let failures = state.store.topic_failed(&sub.id).await?;
            if message.new.kind == HANDSHAKE || failures >= i64::from(config.error_after_failures) {
                state.store.topic_error(&sub.id, &error).await?;
            }
            finish(state, message, owner, MessageStatus::Dead, status, &error, &body, &[]).await
        }
        Delivery::Retry { status, error, after } => {
            let failures = state.store.topic_failed(&sub.id).await?;
            if failures >= i64::from(config.error_after_failures) {
                let why = format!("{failures} failed deliveries in a row, the last: {error}");
                state.store.topic_error(&sub.id, &why).await?;
                return finish(state, message, owner, MessageStatus::Dead, status, &why, "", &[]).await;
            }
            let wait = after.unwrap_or_else(|| super::outbox::backoff(config.first_retry_ms, config.max_backoff_secs, message.attempts));
            Ok(state.store.retry_later(&message.new.id, owner, super::now_ms() + wait.as_millis() as i64, i64::from(status), &error).await?)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(state: &AppState, message: &Message, owner: &str, status: MessageStatus, http_status: u16, error: &str, response: &str, disclosures: &[Disclosed]) -> Result<bool, ApiError> {
    let mut tx = state.store.begin().await?;
    let end = Ending { status, at_ms: super::now_ms(), http_status: i64::from(http_status), error, response };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    if status == MessageStatus::Delivered && message.new.kind == NOTIFICATION {
        // A notification discloses what it names to the subscriber: audited like a read, with the delivery.
        let mut audit = crate::api::audit::Audit::new(&message.new.partner, "operation", "E", None);
        audit.entities = focuses(&message.new.payload);
        audit.entities.push(format!("Subscription/{}", message.new.record_id));
        audit.description = Some(format!("subscription notification delivered to the endpoint of Subscription/{}", message.new.record_id));
        tx.append_audit(&audit.row(&state.base_url, crate::api::audit::AuditOutcome::Success)).await?;
        // And what it carried of Part 2 data, as the consent decision allowed it: one PrivacyDisclosure each.
        for row in crate::api::audit::disclosure_rows(disclosures, &message.new.partner, None, &state.base_url) {
            tx.append_audit(&row).await?;
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// The `Type/id` of each event's focus in a notification Bundle.
fn focuses(payload: &str) -> Vec<String> {
    let Ok(bundle) = crate::json::parse(payload.as_bytes()) else { return Vec::new() };
    let status = bundle.get("entry").and_then(Json::as_array).and_then(|e| e.first()).and_then(|e| e.get("resource"));
    let parameters = status.and_then(|s| s.get("parameter")).and_then(Json::as_array).unwrap_or_default();
    parameters
        .iter()
        .filter(|p| p.get("name").and_then(Json::as_str) == Some("notification-event"))
        .flat_map(|p| p.get("part").and_then(Json::as_array).unwrap_or_default())
        .filter(|part| part.get("name").and_then(Json::as_str) == Some("focus"))
        .filter_map(|part| part.get("valueReference")?.get("reference")?.as_str().and_then(crate::search::normalize_reference))
        .collect()
}

/// Runs the heartbeat check inside `serve` until aborted.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = Duration::from_millis(state.loaded.config.topics.heartbeat_check_ms);
        loop {
            if let Err(e) = heartbeats(&state).await {
                tracing::warn!(error = %e, "The heartbeat check failed; trying again.");
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// Queues a heartbeat for every active Subscription idle for its heartbeat period; how many were queued.
pub async fn heartbeats(state: &AppState) -> Result<usize, ApiError> {
    let now = super::now_ms();
    let mut queued = 0;
    for sub in state.store.idle_topic_subscriptions(now).await? {
        let bundle = notification_bundle(&state.base_url, &sub, &sub.status, "heartbeat", &[]);
        let payload = match checked(state, bundle).await {
            Ok(payload) => payload,
            Err(why) => {
                tracing::error!(subscription = %sub.id, reason = %why, "A heartbeat is not valid and is not sent.");
                continue;
            }
        };
        let mut tx = state.store.begin().await?;
        // Compare-and-set on the last queued time: of two instances, one queues the heartbeat.
        if tx.topic_queued(&sub.id, sub.last_queued_at, now).await? {
            tx.enqueue(&message(&sub, HEARTBEAT, payload), now).await?;
            tx.commit().await?;
            queued += 1;
        }
    }
    if queued > 0 {
        state.outbox_wake.notify_one();
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Json {
        crate::json::parse(text.as_bytes()).unwrap()
    }

    fn subscription(extra_channel: &str) -> Json {
        parse(&format!(
            r#"{{"resourceType":"Subscription","status":"requested","reason":"r","criteria":"{TOPIC}","_criteria":{{"extension":[{{"url":"{BACKPORT}backport-filter-criteria","valueString":"Task?requester=Organization/unit-a"}}]}},"channel":{{"type":"rest-hook","endpoint":"https://unit-a.example/hooks/1","payload":"application/fhir+json","_payload":{{"extension":[{{"url":"{BACKPORT}backport-payload-content","valueCode":"id-only"}}]}}{extra_channel}}}}}"#
        ))
    }

    #[test]
    fn a_subscription_is_read_with_its_filters_and_channel() {
        let config = TopicsConfig::default();
        let callbacks = vec!["https://unit-a.example/hooks/".to_string()];
        let heartbeat = format!(r#","extension":[{{"url":"{BACKPORT}backport-heartbeat-period","valueUnsignedInt":120}}],"header":["X-Secret: abc"]"#);
        let read = read_request(&subscription(&heartbeat), &callbacks, &config).unwrap();
        assert_eq!(read.filters, ["requester=Organization/unit-a"]);
        assert_eq!((read.payload.as_str(), read.heartbeat_secs, read.headers[0].as_str()), ("id-only", 120, "X-Secret: abc"));
        let issues = read_request(&subscription(""), &["https://other.example/".to_string()], &config).unwrap_err();
        assert_eq!(issues[0].expression, "Subscription.channel.endpoint");
        let fast = format!(r#","extension":[{{"url":"{BACKPORT}backport-heartbeat-period","valueUnsignedInt":1}}]"#);
        assert_eq!(read_request(&subscription(&fast), &callbacks, &config).unwrap_err()[0].expression, "Subscription.channel.extension[0].valueUnsignedInt");
        let host = r#","header":["Host: evil.example"]"#;
        assert_eq!(read_request(&subscription(host), &callbacks, &config).unwrap_err()[0].expression, "Subscription.channel.header[0]");
    }

    #[test]
    fn filters_are_read_in_the_r4_form_and_match_tasks() {
        assert_eq!(parse_filter("Task?requester=Organization/a&patient=p1").unwrap(), ["requester=Organization/a", "patient=Patient/p1"]);
        assert_eq!(parse_filter("owner=Organization/a,Organization/b").unwrap(), ["owner=Organization/a,Organization/b"]);
        assert!(parse_filter("Encounter?patient=p1").is_err());
        assert!(parse_filter("Task?status=requested").unwrap_err().contains("not a filter"));
        let task = parse(r#"{"resourceType":"Task","requester":{"reference":"Organization/a"},"owner":{"reference":"Organization/b"},"for":{"reference":"Patient/p1"}}"#);
        assert!(matches(&[], &task));
        assert!(matches(&parse_filter("Task?requester=Organization/a&patient=p1").unwrap(), &task));
        assert!(matches(&parse_filter("owner=Organization/x,Organization/b").unwrap(), &task));
        assert!(!matches(&parse_filter("requester=Organization/b").unwrap(), &task));
    }

    #[test]
    fn callbacks_allow_only_what_lies_under_a_prefix() {
        let prefixes = vec!["https://a.example/hooks".to_string(), "http://127.0.0.1:9000/".to_string()];
        assert!(crate::config::callback_allowed("https://a.example/hooks/1", &prefixes));
        assert!(crate::config::callback_allowed("https://A.example:443/hooks", &prefixes));
        assert!(crate::config::callback_allowed("http://127.0.0.1:9000/x", &prefixes));
        for bad in ["https://a.example/hooksevil", "https://a.example.evil.com/hooks/1", "https://a.example/other", "http://a.example/hooks/1", "https://u@a.example/hooks/1", "https://a.example/hooks/../admin", "http://127.0.0.1:9001/x", "ftp://a.example/hooks/1"] {
            assert!(!crate::config::callback_allowed(bad, &prefixes), "{bad}");
        }
    }

    #[test]
    fn a_full_resource_notification_carries_the_status_first_and_the_version() {
        let sub = TopicSubscription {
            id: "s1".into(),
            client_id: "unit-a".into(),
            scope: String::new(),
            topic: TOPIC.into(),
            filters: vec![],
            payload: "full-resource".into(),
            endpoint: String::new(),
            headers: vec![],
            heartbeat_secs: 0,
            timeout_secs: 30,
            status: "active".into(),
            events: 3,
            failures: 0,
            error: String::new(),
            last_queued_at: 0,
            version: 1,
            updated: String::new(),
            resource: String::new(),
        };
        let content = vec![EventContent { number: 3, at: "2026-01-01T00:00:00Z".into(), focus: Some("Task/t1".into()), resource: Some((parse(r#"{"resourceType":"Task","id":"t1"}"#), false)) }];
        let bundle = notification_bundle("https://gw.example", &sub, "active", "event-notification", &content);
        let entries = bundle.get("entry").and_then(Json::as_array).unwrap();
        assert_eq!(entries[0].get("resource").and_then(|r| r.get("resourceType")).and_then(Json::as_str), Some("Parameters"));
        assert_eq!(entries[1].get("fullUrl").and_then(Json::as_str), Some("https://gw.example/Task/t1"));
        let read = super::super::subscription::parse_notification(&bundle).unwrap();
        assert_eq!(read.events.iter().map(|e| e.number).collect::<Vec<_>>(), [3]);
        assert_eq!(read.subscription, "https://gw.example/Subscription/s1");
        assert_eq!(focuses(&bundle.to_string_compact()), ["Task/t1"], "what a delivery discloses is audited by reference");
    }
}
