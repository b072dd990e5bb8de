//! PAS pended decisions: the one PAS Subscription the gateway keeps at each payer (R4 Subscriptions Backport, topic-based, rest-hook, `full-resource`), and the notifications that bring the final decisions.
//!
//! - The first pended decision from a payer creates the Subscription: a row in the store and an
//!   outbox message (`subscription-create`, `POST {fhir_base}/Subscription`) in the transaction that
//!   records the decision, so it is built once and retried like every outbound message.
//! - The payer sends notifications to `POST /notifications/{partner}` with the secret the gateway
//!   put in `channel.header`; the store keeps only the secret's SHA-256. `api::notifications`
//!   checks it; this module reads what an authenticated notification says.
//! - Events are applied in event-number order, each through the same code as a `$submit` answer
//!   ([`super::pas::record`]). A number at or below the last applied is a duplicate and changes
//!   nothing; numbers missing before a new one are fetched from the payer's `$events` first, and
//!   those `$events` does not return are made up for by one `$inquire` per pended authorization
//!   ([`super::inquiry`]), queued with the notification's changes.
//!
//! PAS names the filter `org-identifier = [sending system identifier]` (its requirement spec-58 and
//! the test kit's examples), while its SubscriptionTopic's `canFilterBy` and its own example say
//! `orgIdentifier`; the gateway follows the normative requirement.

use sha2::{Digest, Sha256};

use super::pas;
use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, Failure};
use crate::json::Json;
use crate::store::{Ending, Message, MessageStatus, NewMessage, StoreError, SubscriptionRow, Tx};

/// The outbox kind of a Subscription create.
pub const CREATE: &str = "subscription-create";

/// PAS's SubscriptionTopic, the Subscription's `criteria` (profile-subscription fixes it).
pub const TOPIC: &str = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic";
const PROFILE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-subscription";
const FILTER_CRITERIA: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const PAYLOAD_CONTENT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
const NPI: &str = "http://hl7.org/fhir/sid/us-npi";

/// What the payer's copy of the create keeps in place of the secret once it was delivered.
const REDACTED: &str = "Authorization: Bearer (redacted once delivered)";

/// The path of a payer's notification endpoint under the gateway's base URL.
pub fn notification_path(partner: &str) -> String {
    format!("notifications/{partner}")
}

/// A new secret: 256 random bits, hex.
fn new_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness for the subscription secret".to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 (hex) of a secret, the only form the store keeps.
pub fn secret_hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a presented secret is the one whose hash is stored; compares the hashes in constant time,
/// so the time taken tells nothing about how much of a guess was right.
pub fn secret_matches(presented: &str, stored_hash: &str) -> bool {
    let presented = secret_hash(presented);
    presented.len() == stored_hash.len() && presented.bytes().zip(stored_hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The requesting provider's identifier value (the filter PAS asks for): the NPI of the Organization
/// the PAS request's Claim names as `provider`, else its first identifier; the response's requestor if the request says nothing.
pub fn requesting_provider(request: &Json, response: &Json) -> Option<String> {
    let from = |bundle: &Json, resource_type: &str, member: &str| -> Option<String> {
        let entries = bundle.get("entry")?.as_array()?;
        let resources: Vec<&Json> = entries.iter().filter_map(|e| e.get("resource")).collect();
        let claim = resources.iter().find(|r| r.get("resourceType").and_then(Json::as_str) == Some(resource_type))?;
        let reference = claim.get(member)?.get("reference")?.as_str()?;
        let organization = entries.iter().find_map(|e| {
            let resource = e.get("resource")?;
            let id = resource.get("id").and_then(Json::as_str).unwrap_or_default();
            let matches = e.get("fullUrl").and_then(Json::as_str) == Some(reference) || reference == format!("Organization/{id}") || reference.ends_with(&format!("/Organization/{id}"));
            (matches && resource.get("resourceType").and_then(Json::as_str) == Some("Organization")).then_some(resource)
        })?;
        let identifiers = organization.get("identifier")?.as_array()?;
        let npi = identifiers.iter().find(|i| i.get("system").and_then(Json::as_str) == Some(NPI));
        npi.or(identifiers.first())?.get("value")?.as_str().filter(|v| !v.is_empty()).map(str::to_string)
    };
    from(request, "Claim", "provider").or_else(|| from(response, "ClaimResponse", "requestor"))
}

/// The PAS Subscription (profile-subscription) the gateway asks a payer for.
pub fn subscription_resource(endpoint: &str, org_identifier: &str, secret: &str) -> Json {
    let value = serde_json::json!({
        "resourceType": "Subscription",
        "meta": { "profile": [PROFILE] },
        "status": "requested",
        "reason": "Final decisions on pended prior authorization requests",
        "criteria": TOPIC,
        "_criteria": { "extension": [{ "url": FILTER_CRITERIA, "valueString": format!("org-identifier={org_identifier}") }] },
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": PAYLOAD_CONTENT, "valueCode": "full-resource" }] },
            "header": [format!("Authorization: Bearer {secret}")]
        }
    });
    crate::json::parse(value.to_string().as_bytes()).unwrap_or(Json::Null)
}

/// A Subscription ready to be recorded and queued.
pub struct Prepared {
    row: SubscriptionRow,
    message: NewMessage,
}

/// Builds (once) and validates the Subscription for a payer, from the PAS request that was pended and its response.
pub async fn prepare(state: &AppState, partner: &str, request_payload: &str, response: &Json) -> Result<Prepared, String> {
    let request = crate::json::parse(request_payload.as_bytes()).unwrap_or(Json::Null);
    let org = requesting_provider(&request, response).ok_or("the PAS request names no requesting provider identifier for the subscription filter")?;
    let secret = new_secret()?;
    let endpoint = format!("{}/{}", state.base_url, notification_path(partner));
    let resource = subscription_resource(&endpoint, &org, &secret);
    // Nothing invalid leaves: our own Subscription is checked against PAS like every outbound payload.
    let resource = write::validate(state, resource, Vec::new()).await.map_err(|e| match e {
        ApiError::Unprocessable(issues) => issues.iter().map(|i| format!("{}: {}", i.expression, i.message)).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    })?;
    let now = super::now_ms();
    let id = uuid::Uuid::new_v4().to_string();
    Ok(Prepared {
        row: SubscriptionRow {
            partner: partner.to_string(),
            message_id: id.clone(),
            remote_id: String::new(),
            secret_hash: secret_hash(&secret),
            status: "requested".into(),
            last_event: 0,
            last_notification_at: 0,
            created_at: now,
        },
        message: NewMessage {
            id,
            partner: partner.to_string(),
            subject: "subscription".into(),
            kind: CREATE.into(),
            record_type: "subscription".into(),
            record_id: partner.to_string(),
            payload: resource.to_string_compact(),
        },
    })
}

/// Records the Subscription and queues its create, unless the payer already has one (then nothing happens).
pub async fn create(tx: &mut Tx, prepared: &Prepared) -> Result<(), StoreError> {
    if tx.insert_subscription(&prepared.row).await? {
        tx.enqueue(&prepared.message, super::now_ms()).await?;
    }
    Ok(())
}

/// The payer's answer to a create: its id for the Subscription (body `id`, else `Location`) and status; the secret leaves the outbox.
pub async fn created(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, location: Option<&str>) -> Result<bool, ApiError> {
    let answer = crate::json::parse(body.as_bytes()).ok();
    let remote_id = answer
        .as_ref()
        .and_then(|a| a.get("id"))
        .and_then(Json::as_str)
        .map(str::to_string)
        .or_else(|| location.and_then(id_from_location))
        .unwrap_or_default();
    let remote_status = answer.as_ref().and_then(|a| a.get("status")).and_then(Json::as_str).unwrap_or("requested").to_string();
    if remote_id.is_empty() {
        tracing::warn!(partner = %message.new.partner, "The payer created the PAS Subscription without naming its id; missed events cannot be fetched from it.");
    }
    let redacted = message.new.payload.replace(&secret_header(&message.new.payload).unwrap_or_default(), REDACTED);
    let mut tx = state.store.begin().await?;
    tx.subscription_created(&message.new.partner, &remote_id, &remote_status).await?;
    tx.redact_payload(&message.new.id, &redacted).await?;
    let end = Ending { status: MessageStatus::Delivered, at_ms: super::now_ms(), http_status: i64::from(status), error: "", response: body };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// A refused create (or one given up on): a dead letter like any other (replayed by an operator), and the Subscription is in error.
pub async fn refused(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    let mut tx = state.store.begin().await?;
    tx.subscription_created(&message.new.partner, "", "error").await?;
    let end = Ending { status: MessageStatus::Dead, at_ms: super::now_ms(), http_status: i64::from(status), error: reason, response: body };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// The `Authorization: Bearer …` header line inside a create payload.
fn secret_header(payload: &str) -> Option<String> {
    let parsed = crate::json::parse(payload.as_bytes()).ok()?;
    let headers = parsed.get("channel")?.get("header")?.as_array()?;
    headers.iter().filter_map(Json::as_str).find(|h| h.starts_with("Authorization:")).map(str::to_string)
}

/// `…/Subscription/{id}` or `…/Subscription/{id}/_history/{vid}` → `{id}`.
fn id_from_location(location: &str) -> Option<String> {
    let segments: Vec<&str> = location.split('?').next()?.split('/').collect();
    let at = segments.iter().rposition(|s| *s == "Subscription")?;
    segments.get(at + 1).filter(|s| !s.is_empty()).map(|s| s.to_string())
}

/// What a notification is (the backport's `subscription-notification-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl Kind {
    fn parse(code: &str) -> Option<Kind> {
        Some(match code {
            "handshake" => Kind::Handshake,
            "heartbeat" => Kind::Heartbeat,
            "event-notification" => Kind::EventNotification,
            "query-status" => Kind::QueryStatus,
            "query-event" => Kind::QueryEvent,
            _ => return None,
        })
    }
}

/// One event of a notification: its number and the resource it carries (the full PAS response Bundle).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub number: i64,
    pub resource: Option<Json>,
}

/// A notification Bundle as read: the SubscriptionStatus (a Parameters in R4, the first entry) and its events in number order.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub kind: Kind,
    /// `subscription`: the reference to the payer's Subscription.
    pub subscription: String,
    /// `status`: the Subscription's status when the notification was generated.
    pub status: String,
    pub events: Vec<Event>,
}

/// Reads a notification Bundle (`history`, SubscriptionStatus first); the answer to `$events` has the same shape.
pub fn parse_notification(bundle: &Json) -> Result<Notification, String> {
    if bundle.get("resourceType").and_then(Json::as_str) != Some("Bundle") || bundle.get("type").and_then(Json::as_str) != Some("history") {
        return Err("a notification is a Bundle of type history".into());
    }
    let entries = bundle.get("entry").and_then(Json::as_array).unwrap_or_default();
    let status = entries.first().and_then(|e| e.get("resource")).filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("Parameters"));
    let status = status.ok_or("the first entry of a notification is the SubscriptionStatus (a Parameters resource)")?;
    let parameters = status.get("parameter").and_then(Json::as_array).unwrap_or_default();
    let named = |name: &'static str| parameters.iter().filter(move |p| p.get("name").and_then(Json::as_str) == Some(name));
    let text = |p: &Json, keys: &[&str]| keys.iter().find_map(|k| p.get(k).and_then(Json::as_str)).map(str::to_string);
    let subscription = named("subscription").next().and_then(|p| p.get("valueReference")?.get("reference")?.as_str()).unwrap_or_default().to_string();
    let type_code = named("type").next().and_then(|p| text(p, &["valueCode"])).ok_or("the SubscriptionStatus has no type")?;
    let kind = Kind::parse(&type_code).ok_or_else(|| format!("unknown notification type '{type_code}'"))?;
    let status_code = named("status").next().and_then(|p| text(p, &["valueCode"])).unwrap_or_default();
    let rest: Vec<&Json> = entries.iter().skip(1).collect();
    let mut events = Vec::new();
    for (index, event) in named("notification-event").enumerate() {
        let parts = event.get("part").and_then(Json::as_array).unwrap_or_default();
        let part = |name: &str| parts.iter().find(|p| p.get("name").and_then(Json::as_str) == Some(name));
        let number = part("event-number").and_then(event_number).ok_or("a notification event has no event number")?;
        let focus = part("focus").and_then(|p| p.get("valueReference")?.get("reference")?.as_str());
        events.push(Event { number, resource: focus_resource(&rest, focus, index) });
    }
    events.sort_by_key(|e| e.number);
    Ok(Notification { kind, subscription, status: status_code, events })
}

/// An event number: a string in R4 (`valueString`), read as an integer too.
fn event_number(part: &Json) -> Option<i64> {
    let value = part.get("valueString").or_else(|| part.get("valueUnsignedInt")).or_else(|| part.get("valueInteger"))?;
    match value {
        Json::String(s) | Json::Number(s) => s.trim().parse().ok().filter(|n: &i64| *n > 0),
        _ => None,
    }
}

/// The entry an event's `focus` names (by fullUrl, or `Type/id`); without a focus, the event's place among the entries.
fn focus_resource(entries: &[&Json], focus: Option<&str>, index: usize) -> Option<Json> {
    let resource = |e: &&Json| e.get("resource").cloned();
    let Some(focus) = focus else { return entries.get(index).and_then(resource) };
    let by_url = entries.iter().find(|e| e.get("fullUrl").and_then(Json::as_str) == Some(focus));
    let by_id = || {
        entries.iter().find(|e| {
            let r = e.get("resource");
            let kind = r.and_then(|r| r.get("resourceType")).and_then(Json::as_str).unwrap_or_default();
            let id = r.and_then(|r| r.get("id")).and_then(Json::as_str).unwrap_or_default();
            !id.is_empty() && (focus == format!("{kind}/{id}") || focus.ends_with(&format!("/{kind}/{id}")))
        })
    };
    by_url.or_else(by_id).and_then(resource)
}

/// What to do with the events of a notification, given the last number applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Event numbers to apply, in order (duplicates of applied ones left out).
    pub apply: Vec<i64>,
    /// Numbers missing between the last applied and the newest here: fetch them (`$events`) first.
    pub missing: Vec<i64>,
}

/// Plans the events of a notification: numbers at or below `last` are duplicates; the numbers between
/// `last` and the newest one here that the notification does not carry are missing.
pub fn plan(last: i64, numbers: &[i64]) -> Plan {
    let mut apply: Vec<i64> = numbers.iter().copied().filter(|n| *n > last).collect();
    apply.sort_unstable();
    apply.dedup();
    let newest = apply.last().copied().unwrap_or(last);
    let missing = ((last + 1)..newest).filter(|n| apply.binary_search(n).is_err()).collect();
    Plan { apply, missing }
}

/// What a notification changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Events applied (final decisions recorded), including those fetched from `$events`.
    pub applied: usize,
    /// Events left alone because they had been applied before.
    pub duplicates: usize,
    /// Events fetched from the payer's `$events` to fill a gap.
    pub fetched: usize,
    /// Inquiries queued because `$events` did not return every missing event.
    pub inquired: usize,
}

/// Acts on an authenticated notification from `partner`'s Subscription `row`.
pub async fn receive(state: &AppState, row: &SubscriptionRow, notification: Notification) -> Result<Received, ApiError> {
    if !row.remote_id.is_empty() && !notification.subscription.is_empty() {
        let reference = notification.subscription.split("/_history").next().unwrap_or_default();
        if !reference.ends_with(&format!("Subscription/{}", row.remote_id)) {
            return Err(ApiError::BadRequest(format!("the notification is for {reference}, not for the gateway's Subscription at this payer")));
        }
    }
    let partner = row.partner.as_str();
    let status = match notification.status.as_str() {
        "error" | "off" => notification.status.clone(),
        // The handshake is the payer's word that the Subscription works, whatever status it was generated with.
        _ => "active".to_string(),
    };
    if notification.events.is_empty() || !matches!(notification.kind, Kind::EventNotification | Kind::QueryEvent) {
        state.store.subscription_heard(partner, &status, super::now_ms()).await?;
        return Ok(Received::default());
    }
    let mut received = Received::default();
    let mut events = notification.events;
    let numbers: Vec<i64> = events.iter().map(|e| e.number).collect();
    let first = plan(row.last_event, &numbers);
    let mut unfilled = Vec::new();
    if !first.missing.is_empty() {
        let fetched = fetch_events(state, row, &first.missing).await;
        received.fetched = fetched.len();
        unfilled = first.missing.iter().copied().filter(|n| !fetched.iter().any(|e| e.number == *n)).collect();
        events.extend(fetched);
        events.sort_by_key(|e| e.number);
    }
    // Each event is read (validated, mapped) once, outside the transaction.
    let mut read = Vec::new();
    for event in &events {
        let response = match &event.resource {
            Some(resource) => pas::read_bundle(state, resource.clone()).await.map_err(|issues| issues.iter().map(|i| i.message.clone()).collect::<Vec<_>>().join("; ")),
            None => Err("the event carries no resource (the Subscription asks for full-resource)".to_string()),
        };
        read.push((event.number, response));
    }
    // Events `$events` did not return would stay missing once the number moves past them: what they
    // may have decided is asked for instead, with `$inquire`, in the transaction that moves it.
    let inquiries = if unfilled.is_empty() {
        Vec::new()
    } else {
        let decided: Vec<String> = read.iter().filter_map(|(_, r)| r.as_ref().ok()).filter(|r| !r.pended()).filter_map(pas::Response::authorization_id).collect();
        super::inquiry::for_missed_events(state, partner, &unfilled, &decided).await
    };
    for _ in 0..write::ATTEMPTS {
        let mut tx = state.store.begin().await?;
        let Some(current) = tx.subscription(partner).await? else { return Err(ApiError::NotFound("the payer has no Subscription here".into())) };
        let plan = plan(current.last_event, &read.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        let now = crate::api::fhir::now_instant();
        let mut applied = Vec::new();
        let mut retry = false;
        for (number, response) in read.iter().filter(|(n, _)| plan.apply.contains(n)) {
            match response {
                Ok(response) => match record_event(&mut tx, state, partner, response, &now).await {
                    Ok(true) => applied.push(response),
                    Ok(false) => {}
                    Err(Failure::Retry) => {
                        retry = true;
                        break;
                    }
                    Err(Failure::Api(e)) => return Err(e),
                },
                Err(why) => tracing::warn!(partner = partner, event = number, reason = %why, "A notification event could not be read as a PAS response; it is passed over."),
            }
        }
        if retry {
            continue;
        }
        let newest = plan.apply.last().copied().unwrap_or(current.last_event);
        if !tx.advance_events(partner, current.last_event, newest, &status, super::now_ms()).await? {
            continue;
        }
        for inquiry in &inquiries {
            tx.enqueue(inquiry, super::now_ms()).await?;
        }
        match tx.commit().await {
            Ok(()) => {
                if !inquiries.is_empty() {
                    state.outbox_wake.notify_one();
                }
                received.applied = applied.len();
                received.inquired = inquiries.len();
                let decisions: Vec<Json> = applied.iter().flat_map(|r| r.decisions.iter().cloned()).collect();
                super::utilization::after_decisions(state, &decisions).await;
                received.duplicates = numbers.iter().filter(|n| **n <= current.last_event).count();
                if !plan.missing.is_empty() {
                    tracing::warn!(partner = partner, missing = ?plan.missing, inquiries = inquiries.len(), "Events of the payer's Subscription are missing and $events did not return them; pended authorizations are inquired.");
                }
                return Ok(received);
            }
            Err(StoreError::Duplicate) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("the notification could not be recorded; send it again".into()))
}

/// Records one event's PAS response, if it decides an authorization the gateway submitted to this payer (a payer decides only its own).
async fn record_event(tx: &mut Tx, state: &AppState, partner: &str, response: &pas::Response, now: &str) -> Result<bool, Failure> {
    let Some(authorization_id) = response.authorization_id() else {
        tracing::warn!(partner = partner, "A notification event names no authorization; it is passed over.");
        return Ok(false);
    };
    let sent = tx.messages_for_record("authorization", &authorization_id).await.map_err(ApiError::from)?;
    if !sent.iter().any(|m| m.new.partner == partner && m.new.kind == pas::SUBMIT) {
        tracing::warn!(partner = partner, "A notification event decides an authorization never submitted to this payer; it is passed over.");
        return Ok(false);
    }
    pas::record(tx, state, &authorization_id, response, now).await?;
    Ok(true)
}

/// The missing events, from the payer's `$events` (one call for the whole range); none if it fails (logged).
async fn fetch_events(state: &AppState, row: &SubscriptionRow, missing: &[i64]) -> Vec<Event> {
    let (Some(first), Some(last)) = (missing.first(), missing.last()) else { return Vec::new() };
    let Some(partner) = state.partners.get(&row.partner) else { return Vec::new() };
    if row.remote_id.is_empty() {
        tracing::warn!(partner = %row.partner, "Events are missing but the payer never named its Subscription's id; they cannot be fetched.");
        return Vec::new();
    }
    let path = format!("Subscription/{}/$events?eventsSinceNumber={first}&eventsUntilNumber={last}", row.remote_id);
    let body = match partner.get(&path).await {
        crate::partner::Delivery::Accepted { body, .. } => body,
        other => {
            tracing::warn!(partner = %row.partner, answer = ?delivery_status(&other), "The payer's $events did not answer; the pended authorizations are inquired instead.");
            return Vec::new();
        }
    };
    let parsed = crate::json::parse(body.as_bytes()).map_err(|e| e.to_string()).and_then(|b| parse_notification(&b));
    match parsed {
        Ok(notification) => notification.events.into_iter().filter(|e| missing.contains(&e.number)).collect(),
        Err(why) => {
            tracing::warn!(partner = %row.partner, reason = %why, "The payer's $events answer is not a notification Bundle.");
            Vec::new()
        }
    }
}

fn delivery_status(delivery: &crate::partner::Delivery) -> u16 {
    match delivery {
        crate::partner::Delivery::Accepted { status, .. } | crate::partner::Delivery::Retry { status, .. } | crate::partner::Delivery::Refused { status, .. } => *status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(kind: &str, numbers: &[&str]) -> Json {
        let events: Vec<serde_json::Value> = numbers
            .iter()
            .map(|n| serde_json::json!({"name": "notification-event", "part": [{"name": "event-number", "valueString": n}, {"name": "focus", "valueReference": {"reference": format!("urn:uuid:event-{n}")}}]}))
            .collect();
        let mut parameters = vec![
            serde_json::json!({"name": "subscription", "valueReference": {"reference": "https://payer.example/fhir/Subscription/sub-1"}}),
            serde_json::json!({"name": "topic", "valueCanonical": TOPIC}),
            serde_json::json!({"name": "status", "valueCode": "active"}),
            serde_json::json!({"name": "type", "valueCode": kind}),
        ];
        parameters.extend(events);
        let mut entries = vec![serde_json::json!({"fullUrl": "urn:uuid:status", "resource": {"resourceType": "Parameters", "parameter": parameters}})];
        // Entries in the reverse order of the events: they are matched by focus, not by place.
        for n in numbers.iter().rev() {
            entries.push(serde_json::json!({"fullUrl": format!("urn:uuid:event-{n}"), "resource": {"resourceType": "Bundle", "id": format!("response-{n}"), "type": "collection"}}));
        }
        crate::json::parse(serde_json::json!({"resourceType": "Bundle", "type": "history", "entry": entries}).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_notification_is_read_with_its_events_in_number_order_and_each_events_resource() {
        let read = parse_notification(&notification("event-notification", &["8", "7"])).unwrap();
        assert_eq!((read.kind, read.status.as_str()), (Kind::EventNotification, "active"));
        assert_eq!(read.subscription, "https://payer.example/fhir/Subscription/sub-1");
        assert_eq!(read.events.iter().map(|e| e.number).collect::<Vec<_>>(), [7, 8]);
        let id = |e: &Event| e.resource.as_ref().and_then(|r| r.get("id")).and_then(Json::as_str).map(str::to_string);
        assert_eq!(id(&read.events[0]).as_deref(), Some("response-7"));
        assert_eq!(id(&read.events[1]).as_deref(), Some("response-8"));
        let handshake = parse_notification(&notification("handshake", &[])).unwrap();
        assert_eq!((handshake.kind, handshake.events.len()), (Kind::Handshake, 0));
    }

    #[test]
    fn what_is_not_a_notification_is_refused() {
        let parse = |text: &str| parse_notification(&crate::json::parse(text.as_bytes()).unwrap());
        assert!(parse(r#"{"resourceType":"Bundle","type":"collection","entry":[]}"#).is_err());
        assert!(parse(r#"{"resourceType":"Bundle","type":"history","entry":[{"resource":{"resourceType":"Patient"}}]}"#).is_err());
        assert!(parse(r#"{"resourceType":"Bundle","type":"history","entry":[{"resource":{"resourceType":"Parameters","parameter":[{"name":"type","valueCode":"gossip"}]}}]}"#).is_err());
        let no_number = r#"{"resourceType":"Bundle","type":"history","entry":[{"resource":{"resourceType":"Parameters","parameter":[{"name":"type","valueCode":"event-notification"},{"name":"notification-event","part":[]}]}}]}"#;
        assert!(parse(no_number).is_err());
    }

    #[test]
    fn duplicates_are_left_out_and_gaps_are_named() {
        assert_eq!(plan(0, &[1]), Plan { apply: vec![1], missing: vec![] });
        assert_eq!(plan(3, &[3]), Plan { apply: vec![], missing: vec![] }, "a duplicate changes nothing");
        assert_eq!(plan(3, &[2, 3, 4]), Plan { apply: vec![4], missing: vec![] });
        assert_eq!(plan(1, &[4]), Plan { apply: vec![4], missing: vec![2, 3] });
        assert_eq!(plan(1, &[5, 3]), Plan { apply: vec![3, 5], missing: vec![2, 4] });
        assert_eq!(plan(0, &[]), Plan { apply: vec![], missing: vec![] });
    }

    #[test]
    fn secrets_are_compared_by_hash() {
        let hash = secret_hash("s3cret");
        assert_eq!(hash.len(), 64);
        assert!(secret_matches("s3cret", &hash));
        assert!(!secret_matches("s3cres", &hash));
        assert!(!secret_matches("", &hash));
        assert!(!secret_matches("s3cret", ""));
    }

    #[test]
    fn the_payers_id_is_read_from_a_location() {
        assert_eq!(id_from_location("https://payer.example/fhir/Subscription/abc/_history/1").as_deref(), Some("abc"));
        assert_eq!(id_from_location("Subscription/xyz").as_deref(), Some("xyz"));
        assert_eq!(id_from_location("https://payer.example/fhir/Claim/1"), None);
    }

    #[test]
    fn the_subscription_follows_pas_and_carries_the_secret_in_a_header() {
        let s = subscription_resource("https://gw.example/notifications/payer", "1234567893", "abc");
        assert_eq!(s.get("criteria").and_then(Json::as_str), Some(TOPIC));
        let filter = s.get("_criteria").and_then(|c| c.get("extension")).and_then(Json::as_array).unwrap();
        assert_eq!(filter[0].get("valueString").and_then(Json::as_str), Some("org-identifier=1234567893"));
        let channel = s.get("channel").unwrap();
        assert_eq!(channel.get("type").and_then(Json::as_str), Some("rest-hook"));
        assert_eq!(channel.get("header").and_then(Json::as_array).unwrap()[0].as_str(), Some("Authorization: Bearer abc"));
        assert_eq!(secret_header(&s.to_string_compact()).as_deref(), Some("Authorization: Bearer abc"));
    }
}
