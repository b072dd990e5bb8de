//! PAS `Claim/$inquire`, the fallback for pended decisions when the payer's Subscription cannot bring them: while it is in error, and once after missed events that `$events` did not return.
//!
//! PAS asks clients not to poll a pended request (spec-9), so nothing here runs while the
//! Subscription works. A Subscription is in error when its row says `error` or `off`: the create was
//! refused or given up on, or a notification said so. Silence alone does not count: the gateway's
//! Subscription asks for no heartbeat, so a quiet payer is indistinguishable from one with nothing to say.
//!
//! - [`spawn`] runs the periodic check inside `serve`: one store query when no Subscription is in
//!   error; otherwise, for each such payer, every authorization whose decision is still `pended` gets an
//!   inquiry at most once per `inquire_interval_secs`.
//! - An inquiry is a PAS inquiry request Bundle built from the authorization's submitted request,
//!   validated, and queued in the outbox (kind `pas-inquire`, same subject as the submission, so it
//!   never overtakes it). Its id is derived from the authorization and the occasion (the interval slot,
//!   or the missed events), so instances sharing one PostgreSQL queue it once: the outbox's uniqueness decides.
//! - The answer is read as a `$submit` answer is ([`pas::read_bundle`]); a final decision on that
//!   authorization replaces the pended one through [`pas::record`], while one still pended changes nothing.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{now_ms, pas};
use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, Failure};
use crate::json::Json;
use crate::store::{Ending, Message, MessageStatus, NewMessage, Pended, StoreError};

/// The outbox kind of a PAS inquiry.
pub const INQUIRE: &str = "pas-inquire";

/// The operation an inquiry is posted to, under the payer's FHIR base.
pub const INQUIRE_PATH: &str = "Claim/$inquire";

const REQUEST_BUNDLE_PROFILE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-inquiry-request-bundle";
const CLAIM_INQUIRY_PROFILE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim-inquiry";
/// The system of an inquiry Bundle's identifier (its own transaction, not the submission's).
const INQUIRY_ID_SYSTEM: &str = "http://iop-gateway.org/fhir/sid/authorization-inquiry";

/// Runs the periodic check until the task is aborted.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = check_every(&state);
        loop {
            match check(&state).await {
                Ok(0) => {}
                Ok(queued) => tracing::info!(queued = queued, "The payer's PAS Subscription is in error; pended authorizations are inquired."),
                Err(e) => tracing::warn!(error = %e, "The $inquire check failed; trying again."),
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// A quarter of the shortest payer interval (so an inquiry is at most a quarter late), between 200 ms and a minute.
fn check_every(state: &AppState) -> Duration {
    let payers = state.loaded.config.partners.iter().filter(|p| p.kind == crate::config::PartnerKind::Payer);
    let shortest = payers.map(|p| p.inquire_interval_secs.saturating_mul(1000)).min().unwrap_or(60_000);
    Duration::from_millis((shortest / 4).clamp(200, 60_000))
}

/// One look: for every payer whose Subscription is in error, an inquiry for each pended authorization
/// not inquired within the payer's interval. Returns how many were queued.
pub async fn check(state: &AppState) -> Result<usize, ApiError> {
    let failing = state.store.subscriptions_in_error().await?;
    let mut queued = 0;
    for row in failing {
        let Some(partner) = state.partners.get(&row.partner) else { continue };
        let now = now_ms();
        let interval = partner.config.inquire_interval_secs.max(1) as i64 * 1000;
        let pended = state.store.pended_at(&row.partner, now - interval, pas::SUBMIT, INQUIRE).await?;
        let messages = prepare(state, &row.partner, &pended, &format!("interval {interval} slot {}", now / interval)).await;
        queued += enqueue(state, &messages).await?;
    }
    Ok(queued)
}

/// The inquiries for a payer's pended authorizations after missed events that `$events` did not
/// return, leaving out those the notification itself decided; queued by the caller with the notification's changes.
pub async fn for_missed_events(state: &AppState, partner: &str, missing: &[i64], decided: &[String]) -> Vec<NewMessage> {
    let pended = match state.store.pended_at(partner, i64::MAX, pas::SUBMIT, INQUIRE).await {
        Ok(pended) => pended,
        Err(e) => {
            tracing::warn!(partner = partner, error = %e, "The pended authorizations could not be read; the missed events stay missing.");
            return Vec::new();
        }
    };
    let pended: Vec<Pended> = pended.into_iter().filter(|p| !decided.contains(&p.authorization_id)).collect();
    let numbers: Vec<String> = missing.iter().map(i64::to_string).collect();
    prepare(state, partner, &pended, &format!("missed events {}", numbers.join(","))).await
}

/// Builds and validates one inquiry per pended authorization; one that cannot be built is logged and left out.
async fn prepare(state: &AppState, partner: &str, pended: &[Pended], occasion: &str) -> Vec<NewMessage> {
    let mut messages = Vec::new();
    for p in pended {
        let id = message_id(partner, &p.authorization_id, occasion);
        let built = crate::json::parse(p.submitted.as_bytes()).map_err(|e| e.to_string()).and_then(|submitted| inquiry_bundle(&submitted, &id, &crate::api::fhir::now_instant()));
        // Nothing invalid leaves: the inquiry is checked against PAS like every outbound payload.
        let validated = match built {
            Ok(bundle) => write::validate(state, bundle, Vec::new()).await.map_err(|e| match e {
                ApiError::Unprocessable(issues) => issues.iter().map(|i| format!("{}: {}", i.expression, i.message)).collect::<Vec<_>>().join("; "),
                other => other.to_string(),
            }),
            Err(why) => Err(why),
        };
        match validated {
            Ok(bundle) => messages.push(NewMessage {
                id,
                partner: partner.to_string(),
                subject: format!("authorization:{}", p.authorization_id),
                kind: INQUIRE.to_string(),
                record_type: "authorization".into(),
                record_id: p.authorization_id.clone(),
                payload: bundle.to_string_compact(),
            }),
            Err(why) => tracing::warn!(partner = partner, reason = %why, "No PAS inquiry could be built for a pended authorization."),
        }
    }
    messages
}

/// Queues prepared inquiries (one transaction); an id already queued, by this instance or another, is left alone.
async fn enqueue(state: &AppState, messages: &[NewMessage]) -> Result<usize, ApiError> {
    if messages.is_empty() {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let mut queued = 0;
    for m in messages {
        if tx.enqueue(m, now_ms()).await? {
            queued += 1;
        }
    }
    tx.commit().await?;
    if queued > 0 {
        state.outbox_wake.notify_one();
    }
    Ok(queued)
}

/// The id of the inquiry about an authorization on one occasion: the same on every instance.
pub fn message_id(partner: &str, authorization_id: &str, occasion: &str) -> String {
    let digest = Sha256::digest([INQUIRE, partner, authorization_id, occasion].join("\n"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

/// The PAS inquiry request Bundle (`profile-pas-inquiry-request-bundle`) about a submitted PAS request:
/// its Claim as a Claim Inquiry (one identifier, the authorization's; no supporting information, which a
/// query by example does not need) under new ids, and the entries that Claim references, directly or through them.
pub fn inquiry_bundle(submitted: &Json, id: &str, now: &str) -> Result<Json, String> {
    let entries = submitted.get("entry").and_then(Json::as_array).unwrap_or_default();
    let claim = entries.first().and_then(|e| e.get("resource")).filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("Claim"));
    let mut claim = claim.cloned().ok_or("the submitted request does not start with its Claim")?;
    let claim_id = message_id("", id, "Claim");
    let object = claim.as_object_mut().ok_or("the submitted Claim is not an object")?;
    let identifier = object.get("identifier").and_then(Json::as_array).and_then(|i| i.first()).cloned().ok_or("the submitted Claim has no identifier")?;
    object.insert("id", Json::string(claim_id.as_str()));
    object.insert("meta", crate::api::fhir::object([("profile", Json::Array(vec![Json::string(CLAIM_INQUIRY_PROFILE)]))]));
    object.insert("identifier", Json::Array(vec![identifier]));
    object.insert("created", Json::string(now));
    object.remove("text");
    object.remove("supportingInfo");
    if let Some(Json::Array(items)) = object.get_mut("item") {
        for item in items.iter_mut().filter_map(Json::as_object_mut) {
            item.remove("informationSequence");
        }
    }
    let mut kept = vec![crate::api::fhir::object([("fullUrl", Json::string(format!("urn:uuid:{claim_id}"))), ("resource", claim)])];
    let mut wanted = Vec::new();
    references(&kept[0], &mut wanted);
    let mut taken = vec![false; entries.len()];
    while let Some(reference) = wanted.pop() {
        for (i, entry) in entries.iter().enumerate().skip(1) {
            if !taken[i] && entry.get("fullUrl").and_then(Json::as_str) == Some(reference.as_str()) {
                taken[i] = true;
                references(entry, &mut wanted);
            }
        }
    }
    kept.extend(entries.iter().enumerate().filter(|(i, _)| taken[*i]).map(|(_, e)| e.clone()));
    Ok(crate::api::fhir::object([
        ("resourceType", Json::string("Bundle")),
        ("id", Json::string(id)),
        ("meta", crate::api::fhir::object([("profile", Json::Array(vec![Json::string(REQUEST_BUNDLE_PROFILE)]))])),
        ("identifier", crate::api::fhir::object([("system", Json::string(INQUIRY_ID_SYSTEM)), ("value", Json::string(id))])),
        ("type", Json::string("collection")),
        ("timestamp", Json::string(now)),
        ("entry", Json::Array(kept)),
    ]))
}

/// Every `reference` string inside a value.
fn references(value: &Json, into: &mut Vec<String>) {
    match value {
        Json::Object(object) => {
            for (name, member) in object.iter() {
                match (name, member) {
                    ("reference", Json::String(reference)) => into.push(reference.to_string()),
                    _ => references(member, into),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|i| references(i, into)),
        _ => {}
    }
}

/// The Bundles of an `$inquire` answer: the operation returns a Parameters with 0..* inquiry response
/// Bundles (whatever the parameters are named: PAS's OperationDefinition says `return`, its example
/// `responseBundle`); a payer that answers with the Bundle itself is read the same.
fn answer_bundles(body: &str) -> Result<Vec<Json>, String> {
    let answer = crate::json::parse(body.as_bytes()).map_err(|e| format!("the payer's answer is not JSON: {e}"))?;
    match answer.get("resourceType").and_then(Json::as_str) {
        Some("Bundle") => Ok(vec![answer]),
        Some("Parameters") => {
            let parameters = answer.get("parameter").and_then(Json::as_array).unwrap_or_default();
            Ok(parameters.iter().filter_map(|p| p.get("resource")).filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("Bundle")).cloned().collect())
        }
        _ => Err("the payer's answer is neither a Parameters nor a Bundle".into()),
    }
}

/// Reads a 2xx `$inquire` answer and records it with the message's completion; `Ok(false)` when the lease was lost.
/// A final decision on the inquired authorization replaces a decision that is still pended; anything
/// else (still pended, nothing found, other authorizations) changes nothing. An answer that cannot be
/// read is a dead letter that keeps it for operators; the pended decision stays, and the next interval asks again.
pub async fn answered(state: &AppState, message: &Message, owner: &str, status: u16, body: &str) -> Result<bool, ApiError> {
    let authorization_id = message.new.record_id.as_str();
    let mut unusable = None;
    let mut decided = None;
    match answer_bundles(body) {
        Ok(bundles) => {
            for bundle in bundles {
                match pas::read_bundle(state, bundle).await {
                    Ok(response) if response.authorization_id().as_deref() == Some(authorization_id) && !response.decisions.is_empty() && !response.pended() => {
                        decided = Some(response);
                        break;
                    }
                    Ok(_) => {}
                    Err(issues) => unusable = Some(issues.iter().map(|i| format!("{}: {}", i.expression, i.message)).collect::<Vec<_>>().join("; ")),
                }
            }
        }
        Err(why) => unusable = Some(why),
    }
    for _ in 0..write::ATTEMPTS {
        let mut tx = state.store.begin().await?;
        let now = crate::api::fhir::now_instant();
        if let Some(response) = &decided {
            // A notification (or an earlier inquiry) may have decided it meanwhile; that decision stands.
            if tx.decision_outcome(authorization_id).await?.as_deref() == Some("pended") {
                match pas::record(&mut tx, state, authorization_id, response, &now).await {
                    Ok(()) => {}
                    Err(Failure::Retry) => continue,
                    Err(Failure::Api(e)) => return Err(e),
                }
            }
        }
        let (outcome, error) = match (&decided, &unusable) {
            (None, Some(why)) => (MessageStatus::Dead, format!("the answer is not a valid PAS inquiry response: {why}")),
            _ => (MessageStatus::Delivered, String::new()),
        };
        let end = Ending { status: outcome, at_ms: now_ms(), http_status: i64::from(status), error: &error, response: body };
        if !tx.finish_message(&message.new.id, owner, &end).await? {
            return Ok(false);
        }
        match tx.commit().await {
            Ok(()) => return Ok(true),
            Err(StoreError::Duplicate) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("the answer could not be recorded; it will be read again".into()))
}

/// A refused inquiry (or one given up on): a dead letter; the authorization stays pended (the payer has
/// not decided), so unlike a refused `$submit` it gets no error decision, and the next interval asks again.
pub async fn refused(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    let mut tx = state.store.begin().await?;
    let end = Ending { status: MessageStatus::Dead, at_ms: now_ms(), http_status: i64::from(status), error: reason, response: body };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted() -> Json {
        let value = serde_json::json!({
            "resourceType": "Bundle", "id": "request-1", "type": "collection", "timestamp": "2026-01-08T10:15:00-06:00",
            "meta": {"profile": ["http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-request-bundle"]},
            "identifier": {"system": "http://iop-gateway.org/fhir/sid/authorization-submission", "value": "AUTH-1"},
            "entry": [
                {"fullUrl": "urn:uuid:claim", "resource": {"resourceType": "Claim", "id": "claim", "identifier": [{"system": "s", "value": "AUTH-1"}, {"system": "t", "value": "x"}],
                    "patient": {"reference": "urn:uuid:patient"}, "insurance": [{"coverage": {"reference": "urn:uuid:coverage"}}],
                    "supportingInfo": [{"sequence": 1, "valueReference": {"reference": "urn:uuid:observation"}}],
                    "item": [{"sequence": 1, "informationSequence": [1]}]}},
                {"fullUrl": "urn:uuid:patient", "resource": {"resourceType": "Patient", "id": "patient"}},
                {"fullUrl": "urn:uuid:observation", "resource": {"resourceType": "Observation", "id": "observation", "subject": {"reference": "urn:uuid:patient"}}},
                {"fullUrl": "urn:uuid:coverage", "resource": {"resourceType": "Coverage", "id": "coverage", "payor": [{"reference": "urn:uuid:payer"}]}},
                {"fullUrl": "urn:uuid:payer", "resource": {"resourceType": "Organization", "id": "payer"}}
            ]
        });
        crate::json::parse(value.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn an_inquiry_asks_about_the_submitted_claim_with_what_it_references_and_nothing_more() {
        let bundle = inquiry_bundle(&submitted(), "inq-1", "2026-02-01T00:00:00.000Z").unwrap();
        assert_eq!(bundle.get("meta").and_then(|m| m.get("profile")).and_then(Json::as_array).unwrap()[0].as_str(), Some(REQUEST_BUNDLE_PROFILE));
        assert_eq!(bundle.get("identifier").and_then(|i| i.get("value")).and_then(Json::as_str), Some("inq-1"), "its own transaction identifier");
        let entries = bundle.get("entry").and_then(Json::as_array).unwrap();
        let urls: Vec<&str> = entries.iter().filter_map(|e| e.get("fullUrl").and_then(Json::as_str)).collect();
        assert_eq!(&urls[1..], ["urn:uuid:patient", "urn:uuid:coverage", "urn:uuid:payer"], "referenced entries, in the request's order; the Observation only supported the request");
        let claim = entries[0].get("resource").unwrap();
        assert_ne!(claim.get("id").and_then(Json::as_str), Some("claim"), "the inquiry is a Claim of its own");
        assert_eq!(urls[0], format!("urn:uuid:{}", claim.get("id").and_then(Json::as_str).unwrap()));
        assert_eq!(claim.get("meta").and_then(|m| m.get("profile")).and_then(Json::as_array).unwrap()[0].as_str(), Some(CLAIM_INQUIRY_PROFILE));
        assert_eq!(claim.get("identifier").and_then(Json::as_array).unwrap().len(), 1);
        assert!(claim.get("supportingInfo").is_none());
        assert!(claim.get("item").and_then(Json::as_array).unwrap()[0].get("informationSequence").is_none());
        assert_eq!(claim.get("created").and_then(Json::as_str), Some("2026-02-01T00:00:00.000Z"));
        assert!(inquiry_bundle(&crate::json::parse(br#"{"resourceType":"Bundle","entry":[]}"#).unwrap(), "x", "t").is_err());
    }

    #[test]
    fn inquiry_ids_depend_on_payer_authorization_and_occasion_only() {
        let id = message_id("payer", "AUTH-1", "slot 7");
        assert_eq!(id, message_id("payer", "AUTH-1", "slot 7"), "two instances derive the same id");
        assert_ne!(id, message_id("payer", "AUTH-1", "slot 8"));
        assert_ne!(id, message_id("payer", "AUTH-2", "slot 7"));
        assert_ne!(id, message_id("other", "AUTH-1", "slot 7"));
    }

    #[test]
    fn an_answer_is_a_parameters_of_bundles_or_one_bundle() {
        let parameters = r#"{"resourceType":"Parameters","parameter":[{"name":"return","resource":{"resourceType":"Bundle","id":"a"}},{"name":"responseBundle","resource":{"resourceType":"Bundle","id":"b"}},{"name":"x","valueString":"y"}]}"#;
        assert_eq!(answer_bundles(parameters).unwrap().len(), 2);
        assert_eq!(answer_bundles(r#"{"resourceType":"Parameters"}"#).unwrap().len(), 0, "nothing found");
        assert_eq!(answer_bundles(r#"{"resourceType":"Bundle","id":"a"}"#).unwrap().len(), 1);
        assert!(answer_bundles(r#"{"resourceType":"OperationOutcome"}"#).is_err());
        assert!(answer_bundles("not json").is_err());
    }
}
