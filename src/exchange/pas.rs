//! Da Vinci PAS 2.2.1 with a payer: the request Bundle an authorization sends (`Claim/$submit`), and what the payer's answer becomes — the ClaimResponse stored for the clinic and a decision record (certified, not certified, pended, or error).

use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, Change, Failure};
use crate::json::Json;
use crate::mapping::MappingSet;
use crate::outcome::Issue;
use crate::store::{Ending, Message, MessageStatus, StoreError, Tx};

/// The outbox kind of a PAS request.
pub const SUBMIT: &str = "pas-submit";

/// The operation a PAS request is posted to, under the payer's FHIR base.
pub const SUBMIT_PATH: &str = "Claim/$submit";

/// The PAS request Bundle the mapping made for an authorization, out of the mapped transaction.
pub fn request_bundle(mappings: &MappingSet, transaction: &Json, authorization_id: &str) -> Option<Json> {
    let id = mappings.resource_id("Bundle", &format!("authorization:{authorization_id}:request"));
    transaction.get("entry")?.as_array()?.iter().filter_map(|e| e.get("resource")).find(|r| {
        r.get("resourceType").and_then(Json::as_str) == Some("Bundle") && r.get("id").and_then(Json::as_str) == Some(id.as_str())
    }).cloned()
}

/// How a re-sent authorization differs from the one the payer already has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revision {
    /// Units, dates or anything else of the request changed: a PAS Claim update.
    Update,
    /// The clinic withdrew the request (`status: cancelled`): a PAS Claim update with certification type 3 (cancel).
    Cancel,
}

const CLAIM_UPDATE_PROFILE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim-update";
const CLAIM_PROFILE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim";
const CERTIFICATION_TYPE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-certificationType";
const AUTHORIZATION_NUMBER: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-authorizationNumber";
const INFO_CHANGED: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-infoChanged";
const INFO_CANCELLED: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/modifierextension-infoCancelled";
const CERTIFICATION_TYPES: &str = "https://codesystem.x12.org/005010/1322";
/// X12 1322 (UM02) "Cancel".
const CANCEL: &str = "3";

/// The PAS request Bundle that revises an authorization already submitted (`profile-claim-update`).
///
/// `submitted` is the request the payer first accepted for processing, `current` the request the
/// re-sent record maps to, `sequence` the how-manieth message for this authorization this is (so
/// every revision has its own transaction identifier and ids, and the same revision built twice is
/// the same message). The update Claim is the current Claim with a new id, `related.claim` naming
/// the submitted Claim (carried in the Bundle too, as PAS's examples do), the service line flagged
/// `changed` when it differs, and the earlier certification number kept on the line. A cancel
/// also says so at the Claim and on the line (certification type 3, the line flagged cancelled);
/// the Claim stays `active`, which PAS fixes for every instance it sends.
pub fn revision_bundle(
    mappings: &MappingSet,
    submitted: &serde_json::Value,
    current: &serde_json::Value,
    authorization_id: &str,
    sequence: usize,
    certification: Option<&str>,
    revision: Revision,
) -> Result<serde_json::Value, String> {
    use serde_json::{Value, json};
    let first = |bundle: &Value| -> Option<Value> { bundle.get("entry")?.as_array()?.first().cloned().filter(|e| e["resource"]["resourceType"] == "Claim") };
    let prior = first(submitted).ok_or("the submitted PAS request does not start with its Claim")?;
    let mut claim = first(current).ok_or("the mapped PAS request does not start with its Claim")?["resource"].clone();
    let identity = format!("authorization:{authorization_id}:revision:{sequence}");
    let claim_id = mappings.resource_id("Claim", &identity);
    claim["id"] = json!(claim_id);
    claim["meta"]["profile"] = json!(claim["meta"]["profile"]
        .as_array()
        .map(|p| p.iter().map(|u| if u == CLAIM_PROFILE { json!(CLAIM_UPDATE_PROFILE) } else { u.clone() }).collect::<Vec<_>>())
        .unwrap_or_else(|| vec![json!(CLAIM_UPDATE_PROFILE)]));
    claim["related"] = json!([{
        "claim": { "reference": prior["fullUrl"] },
        "relationship": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship", "code": "prior" }] }
    }]);
    let prior_item = prior["resource"]["item"].get(0).cloned().unwrap_or(Value::Null);
    let item = claim["item"].get_mut(0).ok_or("the mapped Claim has no service line")?;
    let without_extensions = |i: &Value| {
        let mut i = i.clone();
        if let Some(o) = i.as_object_mut() {
            o.remove("extension");
            o.remove("modifierExtension");
        }
        i
    };
    let changed = without_extensions(item) != without_extensions(&prior_item);
    let extensions = item["extension"].as_array_mut().ok_or("the service line has no PAS extensions")?;
    extensions.retain(|e| e["url"] != AUTHORIZATION_NUMBER);
    if let Some(number) = certification {
        extensions.push(json!({ "url": AUTHORIZATION_NUMBER, "valueString": number }));
    }
    if changed || revision == Revision::Cancel {
        extensions.push(json!({ "url": INFO_CHANGED, "valueCode": "changed" }));
    }
    if revision == Revision::Cancel {
        let cancel = json!({ "coding": [{ "system": CERTIFICATION_TYPES, "code": CANCEL }] });
        for e in extensions.iter_mut().filter(|e| e["url"] == CERTIFICATION_TYPE) {
            e["valueCodeableConcept"] = cancel.clone();
        }
        item["modifierExtension"] = json!([{ "url": INFO_CANCELLED, "valueBoolean": true }]);
        let claim_extensions = claim["extension"].as_array_mut().ok_or("the mapped Claim has no extensions")?;
        claim_extensions.push(json!({ "url": CERTIFICATION_TYPE, "valueCodeableConcept": cancel }));
    }
    let mut bundle = current.clone();
    bundle["id"] = json!(mappings.resource_id("Bundle", &identity));
    bundle["identifier"]["value"] = json!(format!("{authorization_id}.r{sequence}"));
    let rest = current["entry"].as_array().map(|e| e[1..].to_vec()).unwrap_or_default();
    let mut entries = vec![json!({ "fullUrl": format!("urn:uuid:{claim_id}"), "resource": claim }), prior];
    entries.extend(rest);
    bundle["entry"] = Value::Array(entries);
    Ok(bundle)
}

/// Whether a PAS request cancels its authorization (its Claim says certification type 3).
pub fn cancels(payload: &str) -> bool {
    let Ok(request) = serde_json::from_str::<serde_json::Value>(payload) else { return false };
    let claim = &request["entry"][0]["resource"];
    claim["extension"].as_array().is_some_and(|extensions| {
        extensions.iter().any(|e| e["url"] == CERTIFICATION_TYPE && e["valueCodeableConcept"]["coding"][0]["code"] == CANCEL)
    })
}

/// A PAS response Bundle as the gateway reads it, whether it answered `$submit` or came in a subscription notification.
#[derive(Clone, Debug)]
pub struct Response {
    /// The validated PAS response Bundle.
    pub bundle: Json,
    /// Its ClaimResponse, stored for the clinic.
    pub claim_response: Json,
    /// The decision records it maps to (none when it names no review action the gateway knows).
    pub decisions: Vec<Json>,
}

impl Response {
    /// Whether the payer pended the request (A4): the final decision comes later, by subscription.
    pub fn pended(&self) -> bool {
        self.decisions.iter().any(|d| d.get("outcome").and_then(Json::as_str) == Some("pended"))
    }

    /// The authorization the response decides on: as the decision names it, else as the ClaimResponse does.
    pub fn authorization_id(&self) -> Option<String> {
        let from_decision = self.decisions.iter().find_map(|d| d.get("authorization_id").and_then(Json::as_str));
        let from_claim_response = || {
            let identifiers = self.claim_response.get("identifier")?.as_array()?;
            identifiers.iter().find(|i| i.get("system").and_then(Json::as_str) == Some(AUTHORIZATION_ID_SYSTEM))?.get("value")?.as_str()
        };
        from_decision.or_else(from_claim_response).filter(|id| !id.is_empty()).map(str::to_string)
    }
}

/// The identifier system the mappings give an authorization's Claim and the payer echoes in its ClaimResponse.
const AUTHORIZATION_ID_SYSTEM: &str = "http://iop-gateway.org/fhir/sid/authorization-id";

/// Reads a 2xx `$submit` answer and records it, in one transaction with the message's completion; `Ok(false)` when the lease was lost (nothing recorded).
/// A pended decision also creates the payer's PAS Subscription when the gateway has none there yet.
pub async fn accept(state: &AppState, message: &Message, owner: &str, status: u16, body: &str) -> Result<bool, ApiError> {
    let authorization_id = message.new.record_id.as_str();
    let read = read_response(state, body).await;
    // Built (and validated) before the transaction, used only if the payer has no Subscription yet.
    let subscription = match &read {
        Ok(response) if response.pended() && state.store.subscription(&message.new.partner).await?.is_none() => {
            match super::subscription::prepare(state, &message.new.partner, &message.new.payload, &response.bundle).await {
                Ok(prepared) => Some(prepared),
                Err(why) => {
                    // The decision is recorded all the same; the next pended decision tries again.
                    tracing::warn!(partner = %message.new.partner, reason = %why, "No PAS Subscription could be built for the payer.");
                    None
                }
            }
        }
        _ => None,
    };
    for _ in 0..write::ATTEMPTS {
        let mut tx = state.store.begin().await?;
        let now = crate::api::fhir::now_instant();
        let (outcome_status, error) = match &read {
            Ok(response) => {
                let recorded = if cancels(&message.new.payload) {
                    record_cancel(&mut tx, state, authorization_id, response, &now).await
                } else {
                    record(&mut tx, state, authorization_id, response, &now).await
                };
                match recorded {
                    Ok(()) => {}
                    Err(Failure::Retry) => continue,
                    Err(Failure::Api(e)) => return Err(e),
                }
                if let Some(subscription) = &subscription {
                    super::subscription::create(&mut tx, subscription).await?;
                }
                (MessageStatus::Delivered, String::new())
            }
            Err(issues) => {
                let client_id = tx.authorization_client(authorization_id).await?;
                tx.put_record(&decision_row(&error_decision(authorization_id, &now, issues), authorization_id, &client_id, &now)).await?;
                (MessageStatus::Dead, "the answer is not a valid PAS response".to_string())
            }
        };
        let end = Ending { status: outcome_status, at_ms: super::now_ms(), http_status: i64::from(status), error: &error, response: body };
        if !tx.finish_message(&message.new.id, owner, &end).await? {
            return Ok(false);
        }
        match tx.commit().await {
            Ok(()) => {
                if subscription.is_some() {
                    state.outbox_wake.notify_one();
                }
                if let Ok(response) = &read {
                    super::utilization::after_decisions(state, &response.decisions).await;
                }
                return Ok(true);
            }
            Err(StoreError::Duplicate | StoreError::Enrolled) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("the answer could not be recorded; it will be read again".into()))
}

/// Records a read PAS response for an authorization in `tx`: its ClaimResponse through the one write
/// path, and its decision (a final decision replaces a pended one: one decision record per authorization).
/// The one path for `$submit` answers and subscription notifications alike.
pub async fn record(tx: &mut Tx, state: &AppState, authorization_id: &str, response: &Response, now: &str) -> Result<(), Failure> {
    store_claim_response(tx, state, response).await?;
    let mut decisions = response.decisions.clone();
    if decisions.is_empty() {
        let issue = Issue::error(crate::outcome::IssueCode::Processing, "ClaimResponse", "the payer's ClaimResponse names no review action the gateway knows (A1, A3, A4)");
        decisions.push(error_decision(authorization_id, now, &[issue]));
    }
    let client_id = tx.authorization_client(authorization_id).await.map_err(ApiError::from)?;
    for decision in &decisions {
        tx.put_record(&decision_row(decision, authorization_id, &client_id, now)).await.map_err(ApiError::from)?;
    }
    Ok(())
}

/// Records the payer's answer to a cancel: its ClaimResponse, and the decision `cancelled`, which
/// keeps the certification number the authorization had (whatever review action the answer names:
/// the clinic withdrew the request, and the payer took the withdrawal).
async fn record_cancel(tx: &mut Tx, state: &AppState, authorization_id: &str, response: &Response, now: &str) -> Result<(), Failure> {
    store_claim_response(tx, state, response).await?;
    let earlier = tx.record("decision", authorization_id, "inbound").await.map_err(ApiError::from)?;
    let earlier: Option<serde_json::Value> = earlier.and_then(|r| serde_json::from_str(&r.body).ok());
    let mut members = vec![
        ("record_type", Json::string("decision")),
        ("authorization_id", Json::string(authorization_id)),
        ("outcome", Json::string("cancelled")),
        ("decided_at", Json::string(now)),
    ];
    if let Some(number) = earlier.as_ref().and_then(|d| d["certification_number"].as_str()) {
        members.push(("certification_number", Json::string(number)));
    }
    let decision = crate::api::fhir::object(members);
    let client_id = tx.authorization_client(authorization_id).await.map_err(ApiError::from)?;
    tx.put_record(&decision_row(&decision, authorization_id, &client_id, now)).await.map_err(ApiError::from)?;
    Ok(())
}

/// The payer's ClaimResponse, stored through the one write path for the clinic to read.
async fn store_claim_response(tx: &mut Tx, state: &AppState, response: &Response) -> Result<(), Failure> {
    let change = Change { resource_type: "ClaimResponse", id: write::new_id(), resource: response.claim_response.clone(), if_match: None, inherited_labels: &[], method: "POST" };
    write::write(tx, state, &state.gateway_principal, change).await?;
    Ok(())
}

/// Records a payer's refusal (or a message given up on): the message becomes a dead letter and the clinic gets an error decision with the payer's issues.
pub async fn refuse(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    let now = crate::api::fhir::now_instant();
    let issues = outcome_issues(body).unwrap_or_else(|| vec![Issue::error(crate::outcome::IssueCode::Exception, "", reason.to_string())]);
    let decision = error_decision(&message.new.record_id, &now, &issues);
    let mut tx = state.store.begin().await?;
    let client_id = tx.authorization_client(&message.new.record_id).await?;
    tx.put_record(&decision_row(&decision, &message.new.record_id, &client_id, &now)).await?;
    let end = Ending { status: MessageStatus::Dead, at_ms: super::now_ms(), http_status: i64::from(status), error: reason, response: body };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// A payer's answer read as a PAS response (parsed, validated, mapped), or why it is unusable.
pub async fn read_response(state: &AppState, body: &str) -> Result<Response, Vec<Issue>> {
    let response = crate::json::parse(body.as_bytes()).map_err(|e| unusable(&format!("the payer's answer is not JSON: {e}")))?;
    read_bundle(state, response).await
}

/// A PAS response Bundle already parsed (a notification carries it inside its own Bundle), read as [`read_response`] reads an answer.
pub async fn read_bundle(state: &AppState, response: Json) -> Result<Response, Vec<Issue>> {
    if response.get("resourceType").and_then(Json::as_str) != Some("Bundle") {
        return Err(unusable("the payer's answer is not a PAS response Bundle"));
    }
    let bundle = match write::validate(state, response, Vec::new()).await {
        Ok(response) => response,
        Err(ApiError::Unprocessable(issues)) => return Err(issues),
        Err(e) => return Err(unusable(&e.to_string())),
    };
    let claim_response = bundle
        .get("entry")
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("resource"))
        .find(|r| r.get("resourceType").and_then(Json::as_str) == Some("ClaimResponse"))
        .cloned()
        .ok_or_else(|| unusable("the payer's answer holds no ClaimResponse"))?;
    let mut decisions = state.mappings.fhir_to_records(&bundle).output;
    decisions.retain(|r| r.get("record_type").and_then(Json::as_str) == Some("decision"));
    Ok(Response { bundle, claim_response, decisions })
}

fn unusable(message: &str) -> Vec<Issue> {
    vec![Issue::error(crate::outcome::IssueCode::Invalid, "", message.to_string())]
}

/// The issues of an OperationOutcome in a partner's answer.
fn outcome_issues(body: &str) -> Option<Vec<Issue>> {
    let outcome = crate::json::parse(body.as_bytes()).ok()?;
    if outcome.get("resourceType").and_then(Json::as_str) != Some("OperationOutcome") {
        return None;
    }
    let issues: Vec<Issue> = outcome
        .get("issue")?
        .as_array()?
        .iter()
        .map(|i| {
            let text = |k: &str| i.get(k).and_then(Json::as_str).unwrap_or_default().to_string();
            let message = i.get("details").and_then(|d| d.get("text")).and_then(Json::as_str).map(str::to_string).unwrap_or_else(|| text("diagnostics"));
            let expression = i.get("expression").and_then(Json::as_array).and_then(|e| e.first()).and_then(Json::as_str).unwrap_or_default().to_string();
            let severity = if text("severity") == "warning" { crate::outcome::Severity::Warning } else { crate::outcome::Severity::Error };
            Issue::new(severity, crate::outcome::IssueCode::Processing, expression, if message.is_empty() { text("code") } else { message })
        })
        .collect();
    (!issues.is_empty()).then_some(issues)
}

/// A decision record for a request the payer did not decide on.
fn error_decision(authorization_id: &str, now: &str, issues: &[Issue]) -> Json {
    let issues: Vec<Json> = issues
        .iter()
        .map(|i| {
            let mut members = vec![("severity", Json::string(i.severity.as_str())), ("code", Json::string(i.code.as_str())), ("text", Json::string(i.message.as_str()))];
            if !i.expression.is_empty() {
                members.push(("expression", Json::string(i.expression.as_str())));
            }
            crate::api::fhir::object(members)
        })
        .collect();
    crate::api::fhir::object([
        ("record_type", Json::string("decision")),
        ("authorization_id", Json::string(authorization_id)),
        ("outcome", Json::string("error")),
        ("decided_at", Json::string(now)),
        ("issues", Json::Array(issues)),
    ])
}

/// A decision is kept once per authorization: the final decision replaces a pended one. Its row
/// names the client of the authorization it decides, so a client's certifications are found by the client.
fn decision_row(decision: &Json, authorization_id: &str, client_id: &str, now: &str) -> crate::store::RecordRow {
    let mut row = super::intake::row(decision, "inbound", now);
    row.id = authorization_id.to_string();
    row.authorization_id = authorization_id.to_string();
    row.client_id = client_id.to_string();
    row.status = decision.get("outcome").and_then(Json::as_str).unwrap_or_default().to_string();
    row
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request(claim_id: &str, units: i64) -> serde_json::Value {
        json!({
            "resourceType": "Bundle", "id": "b", "type": "collection",
            "identifier": { "system": "http://iop-gateway.org/fhir/sid/authorization-submission", "value": "A-1" },
            "entry": [
                { "fullUrl": format!("urn:uuid:{claim_id}"), "resource": {
                    "resourceType": "Claim", "id": claim_id, "status": "active",
                    "meta": { "profile": ["http://iop-gateway.org/fhir/StructureDefinition/iop-authorization", CLAIM_PROFILE] },
                    "extension": [{ "url": "http://iop-gateway.org/fhir/StructureDefinition/iop-level-of-care", "valueCoding": { "code": "php" } }],
                    "item": [{ "sequence": 1, "quantity": { "value": units },
                               "extension": [{ "url": CERTIFICATION_TYPE, "valueCodeableConcept": { "coding": [{ "system": CERTIFICATION_TYPES, "code": "I" }] } }] }]
                } },
                { "fullUrl": "urn:uuid:p", "resource": { "resourceType": "Patient", "id": "p" } }
            ]
        })
    }

    fn revise(units: i64, revision: Revision) -> serde_json::Value {
        let mappings = MappingSet::bundled(&crate::definitions::Definitions::new_with_exchange_packages()).unwrap();
        revision_bundle(&mappings, &request("c-1", 12), &request("c-1", units), "A-1", 1, Some("CERT-9"), revision).unwrap()
    }

    #[test]
    fn an_update_is_a_new_claim_related_to_the_submitted_one_with_the_line_flagged() {
        let bundle = revise(15, Revision::Update);
        let entries = bundle["entry"].as_array().unwrap();
        let (claim, prior) = (&entries[0]["resource"], &entries[1]["resource"]);
        assert_eq!((prior["id"].as_str(), entries[2]["resource"]["resourceType"].as_str()), (Some("c-1"), Some("Patient")));
        assert_ne!(claim["id"], "c-1");
        assert_eq!(entries[0]["fullUrl"], format!("urn:uuid:{}", claim["id"].as_str().unwrap()));
        assert_eq!(claim["related"][0]["claim"]["reference"], "urn:uuid:c-1");
        assert_eq!(claim["meta"]["profile"][1], CLAIM_UPDATE_PROFILE);
        let urls: Vec<&str> = claim["item"][0]["extension"].as_array().unwrap().iter().map(|e| e["url"].as_str().unwrap()).collect();
        assert!(urls.contains(&INFO_CHANGED) && urls.contains(&AUTHORIZATION_NUMBER), "{urls:?}");
        assert_eq!(bundle["identifier"]["value"], "A-1.r1");
        assert!(!cancels(&bundle.to_string()));
        let unchanged_line = revise(12, Revision::Update);
        assert!(!unchanged_line["entry"][0]["resource"]["item"][0].to_string().contains(INFO_CHANGED), "a line that did not change is not flagged");
    }

    #[test]
    fn a_cancel_says_so_at_the_claim_and_on_the_line() {
        let bundle = revise(12, Revision::Cancel);
        let claim = &bundle["entry"][0]["resource"];
        assert!(cancels(&bundle.to_string()));
        assert_eq!(claim["status"], "active");
        assert_eq!(claim["item"][0]["modifierExtension"][0]["url"], INFO_CANCELLED);
        assert!(claim["item"][0]["extension"].to_string().contains("\"code\":\"3\""));
        assert!(!cancels(&request("c-1", 12).to_string()));
    }
}
