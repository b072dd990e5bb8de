//! Da Vinci PAS 2.2.1 with a payer: the request Bundle an authorization sends (`Claim/$submit`), and what the payer's answer becomes — the ClaimResponse stored for the clinic and a decision record (certified, not certified, pended, or error).

use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, Change, Failure};
use crate::json::Json;
use crate::mapping::MappingSet;
use crate::outcome::Issue;
use crate::store::{Ending, Message, MessageStatus, StoreError};

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

/// Reads a 2xx answer and records it, in one transaction with the message's completion; `Ok(false)` when the lease was lost (nothing recorded).
pub async fn accept(state: &AppState, message: &Message, owner: &str, status: u16, body: &str) -> Result<bool, ApiError> {
    let authorization_id = message.new.record_id.as_str();
    let read = read_response(state, body).await;
    for _ in 0..write::ATTEMPTS {
        let mut tx = state.store.begin().await?;
        let now = crate::api::fhir::now_instant();
        let (decisions, outcome_status, error) = match &read {
            Ok((response, claim_response)) => {
                let change = Change { resource_type: "ClaimResponse", id: write::new_id(), resource: claim_response.clone(), if_match: None, inherited_labels: &[], method: "POST" };
                match write::write(&mut tx, state, &state.gateway_principal, change).await {
                    Ok(_) => {}
                    Err(Failure::Retry) => continue,
                    Err(Failure::Api(e)) => return Err(e),
                }
                let mut decisions = state.mappings.fhir_to_records(response).output;
                decisions.retain(|r| r.get("record_type").and_then(Json::as_str) == Some("decision"));
                if decisions.is_empty() {
                    let issue = Issue::error(crate::outcome::IssueCode::Processing, "ClaimResponse", "the payer's ClaimResponse names no review action the gateway knows (A1, A3, A4)");
                    decisions.push(error_decision(authorization_id, &now, &[issue]));
                }
                (decisions, MessageStatus::Delivered, String::new())
            }
            Err(issues) => (vec![error_decision(authorization_id, &now, issues)], MessageStatus::Dead, "the answer is not a valid PAS response".to_string()),
        };
        for decision in &decisions {
            tx.put_record(&decision_row(decision, authorization_id, &now)).await?;
        }
        let end = Ending { status: outcome_status, at_ms: super::now_ms(), http_status: i64::from(status), error: &error, response: body };
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

/// Records a payer's refusal (or a message given up on): the message becomes a dead letter and the clinic gets an error decision with the payer's issues.
pub async fn refuse(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    let now = crate::api::fhir::now_instant();
    let issues = outcome_issues(body).unwrap_or_else(|| vec![Issue::error(crate::outcome::IssueCode::Exception, "", reason.to_string())]);
    let decision = error_decision(&message.new.record_id, &now, &issues);
    let mut tx = state.store.begin().await?;
    tx.put_record(&decision_row(&decision, &message.new.record_id, &now)).await?;
    let end = Ending { status: MessageStatus::Dead, at_ms: super::now_ms(), http_status: i64::from(status), error: reason, response: body };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// The PAS response Bundle (validated) and its ClaimResponse, or why the answer is unusable.
async fn read_response(state: &AppState, body: &str) -> Result<(Json, Json), Vec<Issue>> {
    let unusable = |message: &str| vec![Issue::error(crate::outcome::IssueCode::Invalid, "", message.to_string())];
    let response = crate::json::parse(body.as_bytes()).map_err(|e| unusable(&format!("the payer's answer is not JSON: {e}")))?;
    if response.get("resourceType").and_then(Json::as_str) != Some("Bundle") {
        return Err(unusable("the payer's answer is not a PAS response Bundle"));
    }
    let response = match write::validate(state, response, Vec::new()).await {
        Ok(response) => response,
        Err(ApiError::Unprocessable(issues)) => return Err(issues),
        Err(e) => return Err(unusable(&e.to_string())),
    };
    let claim_response = response
        .get("entry")
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("resource"))
        .find(|r| r.get("resourceType").and_then(Json::as_str) == Some("ClaimResponse"))
        .cloned()
        .ok_or_else(|| unusable("the payer's answer holds no ClaimResponse"))?;
    Ok((response, claim_response))
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
            crate::api::fhir::object(&members)
        })
        .collect();
    crate::api::fhir::object(&[
        ("record_type", Json::string("decision")),
        ("authorization_id", Json::string(authorization_id)),
        ("outcome", Json::string("error")),
        ("decided_at", Json::string(now)),
        ("issues", Json::Array(issues)),
    ])
}

/// A decision is kept once per authorization: the final decision replaces a pended one.
fn decision_row(decision: &Json, authorization_id: &str, now: &str) -> crate::store::RecordRow {
    let mut row = super::intake::row(decision, "inbound", now);
    row.id = authorization_id.to_string();
    row.authorization_id = authorization_id.to_string();
    row.status = decision.get("outcome").and_then(Json::as_str).unwrap_or_default().to_string();
    row
}
