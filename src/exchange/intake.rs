//! Intake of IOP records from the clinic: every record checked and mapped, the FHIR validated, then one store transaction with the resources, the records and the messages they cause — or nothing at all.

use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, ATTEMPTS, Change, Failure};
use crate::auth::Principal;
use crate::iop::RECORD_TYPE_MEMBER;
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::store::{Message, MessageStatus, NewMessage, RecordRow, Tx};

/// The authorization status that withdraws a request.
const CANCELLED: &str = "cancelled";

/// What intake did with one record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RecordSummary {
    pub record_type: String,
    pub id: String,
    /// `Type/id` of every resource the record was mapped to.
    pub resources: Vec<String>,
    /// Ids of the outbound messages it caused (a resend of an unchanged record causes none).
    pub messages: Vec<String>,
}

/// A message intake will queue, before the transaction.
struct Planned {
    record: usize,
    message: NewMessage,
}

/// Takes the clinic's records: all of them are stored and their messages queued, or none (422 with every problem located as `records[i].path`).
/// Answers to referrals the gateway received move those referrals' Tasks; they are checked with the
/// rest before anything is written, and written with the rest in the same transaction.
/// Then the [`utilization`](super::utilization) rule looks at the certifications of the clients the records name.
pub async fn intake(state: &AppState, principal: &Principal, records: Vec<Json>) -> Result<Vec<RecordSummary>, ApiError> {
    let clients: std::collections::BTreeSet<String> = records.iter().map(|r| text(r, "client_id")).filter(|c| !c.is_empty()).collect();
    let posted: Vec<String> = records.iter().filter(|r| text(r, RECORD_TYPE_MEMBER) == "authorization").map(|r| text(r, "id")).collect();
    if records.is_empty() {
        return Err(ApiError::BadRequest("send one IOP record or a non-empty array of them".into()));
    }
    let count = records.len();
    let (answers, records) = super::referral::split_answers(state, records).await?;
    let positions: Vec<usize> = (0..count).filter(|i| !answers.iter().any(|(j, _, _)| j == i)).collect();
    let answered = super::referral::Answers::check(state, answers).await;
    let checked = if records.is_empty() { Ok(None) } else { check(state, records.clone(), positions).await.map(Some) };
    let (mut answers, checked) = match (answered, checked) {
        (Ok(answers), Ok(checked)) => (answers, checked),
        (Err(ApiError::Unprocessable(mut issues)), Err(ApiError::Unprocessable(more))) => {
            issues.extend(more);
            return Err(ApiError::Unprocessable(issues));
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    let summaries = commit(state, principal, &mut answers, checked.as_ref()).await?;
    // Committed and acknowledged whatever follows: a referrer not told is logged, as the utilization rule's problems are.
    if let Err(e) = super::referral::follow(state, principal, &records).await {
        tracing::warn!(error = %e, "The referrals of the posted clients could not be moved on.");
    }
    // The records are committed and acknowledged whatever the rule finds: a proposal that cannot be made is the gateway's problem, not the clinic's request's.
    if let Err(e) = super::utilization::review(state, principal, &clients, &posted).await {
        tracing::warn!(error = %e, "The utilization rule could not look at the posted clients' certifications.");
    }
    Ok(summaries)
}

/// Stores and queues records, all or none: the extension requests the utilization rule sends, as the clinic's are.
pub async fn accept(state: &AppState, principal: &Principal, records: Vec<Json>) -> Result<Vec<RecordSummary>, ApiError> {
    if records.is_empty() {
        return Err(ApiError::BadRequest("send one IOP record or a non-empty array of them".into()));
    }
    let positions = (0..records.len()).collect();
    let checked = check(state, records, positions).await?;
    commit(state, principal, &mut super::referral::Answers::default(), Some(&checked)).await
}

/// The records of a batch other than answers, checked, mapped and validated: what its transaction writes of them.
struct Checked {
    /// Where each record is in the batch as posted (the answers were taken out).
    positions: Vec<usize>,
    records: Vec<Json>,
    /// Step-down referrals whose provider's progress the re-posted records keep.
    kept: Vec<String>,
    /// `Type/id` of the resources each record was mapped to.
    produced: Vec<Vec<String>>,
    plan: Vec<Planned>,
    step_downs: Vec<super::step_down::Planned>,
    /// The validated transaction Bundle.
    bundle: Json,
    /// Its resources as stored: type, id, resource.
    entries: Vec<(String, String, Json)>,
}

/// Everything that can refuse the records before a transaction: schema, mapping, routing, FHIR
/// validation; every problem located as `records[i]` of the batch as posted.
async fn check(state: &AppState, mut records: Vec<Json>, positions: Vec<usize>) -> Result<Checked, ApiError> {
    let checked: Result<Checked, ApiError> = async {
        let mut issues = Vec::new();
        for (i, record) in records.iter().enumerate() {
            for problem in state.mappings.schemas.check(record) {
                issues.push(Issue::error(IssueCode::Invalid, located(i, &problem.path), problem.message));
            }
        }
        if !issues.is_empty() {
            return Err(ApiError::Unprocessable(issues));
        }
        // A re-posted step-down referral keeps the progress its provider gave it.
        let kept = super::step_down::keep_progress(state, &mut records).await?;
        // An enrollment naming a referral the gateway received points at that referral's stored ServiceRequest.
        let resolved = super::referral::stored_requests(state, &records).await?;
        let mapped = state.mappings.records_to_fhir_resolving(&records, &resolved);
        for issue in mapped.issues.iter().filter(|i| i.severity.is_error()) {
            let index = records.iter().position(|r| label(r) == issue.source);
            let expression = index.map(|i| located(i, &issue.path)).unwrap_or_default();
            issues.push(Issue::error(IssueCode::Processing, expression, format!("{}: {}", issue.source, issue.message)));
        }
        let plan = plan_messages(state, &records, &mapped.output, &mut issues);
        let step_downs = super::step_down::plan(state, &records, &mut issues);
        if !issues.is_empty() {
            return Err(ApiError::Unprocessable(issues));
        }
        let mut output = mapped.output;
        super::step_down::keep_task_progress(state, &mut output, &kept).await?;
        let bundle = write::validate(state, output, Vec::new()).await?;
        let entries: Vec<(String, String, Json)> = bundle
            .get("entry")
            .and_then(Json::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| {
                let resource = e.get("resource")?;
                let text = |k: &str| resource.get(k).and_then(Json::as_str).map(str::to_string);
                let resource_type = text("resourceType")?;
                let mut resource = resource.clone();
                // A Bundle's references name its own entries (a PAS request, a discharge summary document).
                if resource_type != "Bundle" {
                    stored_references(&mut resource, &mapped.targets);
                }
                Some((resource_type, text("id")?, resource))
            })
            .collect();
        Ok(Checked { positions: Vec::new(), records, kept, produced: mapped.produced, plan, step_downs, bundle, entries })
    }
    .await;
    match checked {
        Ok(checked) => Ok(Checked { positions, ..checked }),
        Err(e) => Err(renumbered(e, &positions)),
    }
}

/// The one transaction of a batch: the answers' Task changes and messages, the other records'
/// resources, records and messages. Run again, the answers' Tasks read again, when it lost a race.
async fn commit(state: &AppState, principal: &Principal, answers: &mut super::referral::Answers, checked: Option<&Checked>) -> Result<Vec<RecordSummary>, ApiError> {
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            answers.refresh(state).await?;
        }
        let mut tx = state.store.begin().await?;
        let mut summaries = match super::referral::write_answers(&mut tx, state, principal, answers).await {
            Ok(summaries) => summaries,
            Err(Failure::Retry) => continue,
            Err(Failure::Api(e)) => return Err(e),
        };
        if let Some(checked) = checked {
            match store(&mut tx, state, principal, checked).await {
                Ok(more) => summaries.extend(more),
                Err(Failure::Retry) => continue,
                Err(Failure::Api(e)) => return Err(renumbered(e, &checked.positions)),
            }
        }
        match tx.commit().await {
            Ok(()) => {}
            Err(crate::store::StoreError::Enrolled) => continue,
            Err(e) => return Err(e.into()),
        }
        if summaries.iter().any(|(_, s)| !s.messages.is_empty()) {
            state.outbox_wake.notify_one();
        }
        summaries.sort_by_key(|(i, _)| *i);
        return Ok(summaries.into_iter().map(|(_, s)| s).collect());
    }
    Err(ApiError::Conflict("the records' resources are being changed by others; retry".into()))
}

/// Writes checked records in `tx`: their resources through the one write path, their rows, the messages they cause.
/// Each summary comes with its record's position in the batch as posted.
async fn store(tx: &mut Tx, state: &AppState, principal: &Principal, checked: &Checked) -> Result<Vec<(usize, RecordSummary)>, Failure> {
    let Checked { positions, records, kept, produced, plan, step_downs, bundle, entries } = checked;
    let now = crate::api::fhir::now_instant();
    let changes = entries
        .iter()
        .map(|(resource_type, id, resource)| Change { resource_type, id: id.clone(), resource: resource.clone(), if_match: None, inherited_labels: &[], method: "PUT" })
        .collect();
    write::write_each(tx, state, principal, changes).await?;
    let mut summaries: Vec<RecordSummary> = records
        .iter()
        .zip(produced)
        .map(|(r, produced)| RecordSummary { record_type: text(r, RECORD_TYPE_MEMBER), id: text(r, "id"), resources: produced.clone(), messages: Vec::new() })
        .collect();
    // What each authorization sends is decided against what was stored before, so before the records are replaced.
    let mut outgoing = Vec::new();
    for planned in plan {
        if let Some(message) = outgoing_message(tx, state, planned, &records[planned.record]).await? {
            outgoing.push((planned.record, message));
        }
    }
    for planned in step_downs {
        if let Some(mut message) = super::step_down::message(tx, state, planned, records, bundle).await? {
            message.id = message_id(&message);
            outgoing.push((planned.discharge, message));
        }
    }
    for record in records {
        super::step_down::put_record(tx, record, kept, &now).await?;
    }
    for (index, message) in &outgoing {
        // A message with the same id is already queued: the same change sent twice.
        if tx.enqueue(message, super::now_ms()).await? {
            summaries[*index].messages.push(message.id.clone());
        }
    }
    Ok(positions.iter().copied().zip(summaries).collect())
}

/// A problem found among the records left when the answers were taken out, located in the batch
/// as posted: their `records[k]` is `records[positions[k]]`.
fn renumbered(e: ApiError, positions: &[usize]) -> ApiError {
    let at = |text: String| -> String {
        let Some((index, tail)) = text.strip_prefix("records[").and_then(|rest| rest.split_once(']')) else { return text };
        match index.parse::<usize>().ok().and_then(|k| positions.get(k)) {
            Some(i) => format!("records[{i}]{tail}"),
            None => text,
        }
    };
    match e {
        ApiError::Unprocessable(issues) => ApiError::Unprocessable(issues.into_iter().map(|i| Issue { expression: at(i.expression), ..i }).collect()),
        ApiError::Conflict(message) => ApiError::Conflict(at(message)),
        other => other,
    }
}

/// What an authorization sends now, given what its payer has had of it: its PAS request the first
/// time (or when every earlier one was refused), a PAS Claim update when the re-sent record differs
/// from the stored one, a cancel when it says `cancelled`, and nothing when it is unchanged or was
/// cancelled before anything went out. Checked like every outbound payload before it is queued.
async fn outgoing_message(tx: &mut Tx, state: &AppState, planned: &Planned, record: &Json) -> Result<Option<NewMessage>, ApiError> {
    let new = &planned.message;
    let cancelled = text(record, "status") == CANCELLED;
    let earlier: Vec<Message> = tx.messages_for_record(&new.record_type, &new.record_id).await?.into_iter().filter(|m| m.new.partner == new.partner && m.new.kind == new.kind).collect();
    let Some(submitted) = earlier.iter().find(|m| m.status != MessageStatus::Dead) else {
        return Ok((!cancelled).then(|| new.clone()));
    };
    let stored = tx.record(&new.record_type, &new.record_id, "outbound").await?;
    let stored: Option<serde_json::Value> = stored.and_then(|r| serde_json::from_str(&r.body).ok());
    let as_sent = |r: &serde_json::Value| {
        let mut r = r.clone();
        // The submission time alone changes nothing the payer reviews.
        r.as_object_mut().map(|o| o.remove("submitted_at"));
        r
    };
    let current = serde_json::Value::from(record);
    if stored.as_ref().map(as_sent) == Some(as_sent(&current)) {
        return Ok(None);
    }
    let at = located(planned.record, "");
    if stored.as_ref().is_some_and(|s| s["status"] == CANCELLED) {
        return Err(ApiError::Conflict(format!("{at}: authorization {} was cancelled; ask again under a new id", new.record_id)));
    }
    let certification = tx.record("decision", &new.record_id, "inbound").await?.and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok());
    let certification = certification.as_ref().and_then(|d| d["certification_number"].as_str());
    let revision = if cancelled { super::pas::Revision::Cancel } else { super::pas::Revision::Update };
    let parse = |payload: &str| serde_json::from_str::<serde_json::Value>(payload).map_err(|e| ApiError::Internal(format!("a queued PAS request is not JSON: {e}")));
    let bundle = super::pas::revision_bundle(&state.mappings, &parse(&submitted.new.payload)?, &parse(&new.payload)?, &new.record_id, earlier.len(), certification, revision)
        .map_err(|why| ApiError::Unprocessable(vec![Issue::error(IssueCode::Processing, at.clone(), why)]))?;
    let bundle = write::validate(state, Json::from(&bundle), Vec::new()).await.map_err(|e| match e {
        ApiError::Unprocessable(issues) => ApiError::Unprocessable(
            issues.into_iter().map(|i| Issue { message: format!("the PAS Claim update, at {}: {}", i.expression, i.message), expression: at.clone(), ..i }).collect(),
        ),
        other => other,
    })?;
    let mut message = NewMessage { id: String::new(), payload: bundle.to_string_compact(), ..new.clone() };
    message.id = message_id(&message);
    Ok(Some(message))
}

/// Writes the mapped `urn:uuid:<id>` references (meaningful only inside the transaction) as the
/// `Type/<id>` they name, so a stored resource is in its patient's compartment and its references
/// resolve on this server. `targets` is what mapping says each names.
fn stored_references(value: &mut Json, targets: &std::collections::BTreeMap<String, String>) {
    match value {
        Json::Object(object) => {
            for (name, member) in object.iter_mut() {
                match member {
                    Json::String(reference) if name == "reference" => {
                        if let Some(stored) = targets.get(reference.as_str()) {
                            *member = Json::string(stored.as_str());
                        }
                    }
                    other => stored_references(other, targets),
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|i| stored_references(i, targets)),
        _ => {}
    }
}

/// The outbound messages the records cause: for every authorization, its PAS request to the payer that `payer_id` routes to.
fn plan_messages(state: &AppState, records: &[Json], bundle: &Json, issues: &mut Vec<Issue>) -> Vec<Planned> {
    let mut plan = Vec::new();
    for (i, record) in records.iter().enumerate() {
        if text(record, RECORD_TYPE_MEMBER) != "authorization" {
            continue;
        }
        let (id, payer_id) = (text(record, "id"), text(record, "payer_id"));
        let Some(payer) = state.partners.payer_for(&payer_id) else {
            issues.push(Issue::error(IssueCode::NotFound, located(i, "payer_id"), format!("no payer partner routes payer_id '{payer_id}' (configure [[partners]] with kind = \"payer\" and routes)")));
            continue;
        };
        match super::pas::request_bundle(&state.mappings, bundle, &id) {
            Some(request) => {
                let mut message = NewMessage {
                    id: String::new(),
                    partner: payer.config.name.clone(),
                    subject: format!("authorization:{id}"),
                    kind: super::pas::SUBMIT.to_string(),
                    record_type: "authorization".into(),
                    record_id: id,
                    payload: request.to_string_compact(),
                };
                message.id = message_id(&message);
                plan.push(Planned { record: i, message })
            }
            None => issues.push(Issue::error(IssueCode::Processing, located(i, ""), "the mapping made no PAS request Bundle for this authorization")),
        }
    }
    plan
}

/// A message's id is derived from what it is, so two intakes of the same change (a client's retry
/// racing the original on another instance) queue one message, not two.
pub(crate) fn message_id(m: &NewMessage) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest([m.partner.as_str(), m.kind.as_str(), m.record_type.as_str(), m.record_id.as_str(), m.payload.as_str()].join("\n"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

/// The row an IOP record is stored as.
pub fn row(record: &Json, direction: &str, updated: &str) -> RecordRow {
    let authorization_id = match text(record, RECORD_TYPE_MEMBER).as_str() {
        "authorization" => text(record, "id"),
        _ => text(record, "authorization_id"),
    };
    RecordRow {
        record_type: text(record, RECORD_TYPE_MEMBER),
        id: text(record, "id"),
        direction: direction.to_string(),
        client_id: text(record, "client_id"),
        authorization_id,
        status: text(record, "status"),
        extends_certification: text(record, "extends_certification"),
        updated: updated.to_string(),
        body: record.to_string_compact(),
    }
}

fn text(record: &Json, member: &str) -> String {
    record.get(member).and_then(Json::as_str).unwrap_or_default().to_string()
}

/// How mapping labels a record in its issues.
fn label(record: &Json) -> String {
    format!("{} {}", text(record, RECORD_TYPE_MEMBER), text(record, "id"))
}

/// `records[i].path`, the expression of a problem in the request body.
fn located(index: usize, path: &str) -> String {
    if path.is_empty() { format!("records[{index}]") } else { format!("records[{index}].{path}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_located_by_record_index_and_path() {
        assert_eq!(located(2, "items[3].answer"), "records[2].items[3].answer");
        assert_eq!(located(0, ""), "records[0]");
    }

    #[test]
    fn problems_of_the_rest_are_located_in_the_batch_as_posted() {
        let issues = vec![Issue::error(IssueCode::Invalid, "records[1].sex", "no"), Issue::error(IssueCode::Invalid, "records[0]", "no"), Issue::error(IssueCode::Invalid, "", "no")];
        let ApiError::Unprocessable(issues) = renumbered(ApiError::Unprocessable(issues), &[1, 3]) else { panic!("still a 422") };
        assert_eq!(issues.iter().map(|i| i.expression.as_str()).collect::<Vec<_>>(), ["records[3].sex", "records[1]", ""]);
        let ApiError::Conflict(message) = renumbered(ApiError::Conflict("records[0]: cancelled".into()), &[2]) else { panic!("still a 409") };
        assert_eq!(message, "records[2]: cancelled");
    }

    #[test]
    fn the_same_change_has_the_same_message_id() {
        let m = NewMessage { id: String::new(), partner: "p".into(), subject: "s".into(), kind: "pas-submit".into(), record_type: "authorization".into(), record_id: "A".into(), payload: "{}".into() };
        assert_eq!(message_id(&m), message_id(&m.clone()));
        assert_ne!(message_id(&m), message_id(&NewMessage { payload: "{ }".into(), ..m.clone() }));
        assert_ne!(message_id(&m), message_id(&NewMessage { partner: "q".into(), ..m }));
    }

    #[test]
    fn stored_copies_name_their_targets_by_type_and_id() {
        let mut resource = crate::json::parse(br#"{"resourceType":"Observation","subject":{"reference":"urn:uuid:p"},"hasMember":[{"reference":"urn:uuid:o"},{"reference":"urn:uuid:elsewhere"}],"note":[{"text":"urn:uuid:p"}]}"#).unwrap();
        let targets = [("urn:uuid:p", "Patient/p"), ("urn:uuid:o", "Observation/o")].map(|(a, b)| (a.to_string(), b.to_string())).into_iter().collect();
        stored_references(&mut resource, &targets);
        let expected = crate::json::parse(br#"{"resourceType":"Observation","subject":{"reference":"Patient/p"},"hasMember":[{"reference":"Observation/o"},{"reference":"urn:uuid:elsewhere"}],"note":[{"text":"urn:uuid:p"}]}"#).unwrap();
        assert_eq!(resource, expected);
    }

    #[test]
    fn a_record_row_carries_its_keys() {
        let record = crate::json::parse(br#"{"record_type":"decision","authorization_id":"A-1","outcome":"certified","decided_at":"2026-01-01T00:00:00Z"}"#).unwrap();
        let r = row(&record, "inbound", "2026-01-01T00:00:00.000Z");
        assert_eq!((r.record_type.as_str(), r.authorization_id.as_str(), r.direction.as_str()), ("decision", "A-1", "inbound"));
    }
}
