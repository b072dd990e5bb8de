//! Inbound BSeR referrals from inpatient units: read into a referral record with the route back to the referrer, answered by the clinic's records, the Task's progress written through the one write path and sent back to the referrer through the outbox.
//!
//! The referral arrives as a `message` Bundle (`$process-message`) or a `transaction` Bundle. The
//! unit owns what it sent; the stored Task's `owner` is the program, so the program's clinic
//! clients may move its progress (status, business status, reason, output) and nothing else. The
//! referrer is told what it knows: its own Task (its id, its references) with the new progress,
//! `PUT` at its FHIR base, or in a feedback message answering its referral message.

use serde_json::{Value, json};

use super::intake::{RecordSummary, message_id, row};
use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, ATTEMPTS, Change, Failure};
use crate::auth::{Principal, Role};
use crate::config::{PartnerKind, ReferralUpdates};
use crate::iop::RECORD_TYPE_MEMBER;
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::store::{Message, MessageStatus, NewMessage, ReferralRoute, Stored, Tx};

/// Outbox kind: the referral Task with its new progress, `PUT` at the referrer's FHIR base.
pub const TASK_UPDATE: &str = "referral-task-update";
/// Outbox kind: a feedback message to the referrer's `$process-message`, answering its referral message.
pub const FEEDBACK_MESSAGE: &str = "referral-feedback-message";
/// Outbox kind: the feedback document, `PUT` at the referrer's FHIR base before the Task that names it as its output.
pub const FEEDBACK_DOCUMENT: &str = "referral-feedback-document";

/// BSeR's feedback document Bundle, which the feedback document claims.
const FEEDBACK_DOCUMENT_PROFILE: &str = "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralFeedbackDocumentBundle";

/// BSeR's Task business statuses (`TaskBusinessStatusCS`, checked against BSeR's FSH and XML sources).
const BUSINESS_STATUS: &str = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS";

/// The outbox partner name of a client's callback address: `callback:<client id>`.
const CALLBACK: &str = "callback:";

/// The route channel names stored with a referral.
const CHANNEL_TASK: &str = "task";
const CHANNEL_MESSAGE: &str = "message";

/// A referral found in a Bundle an inpatient unit sent, before it is stored.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The referral record made of it (`referral.from-fhir`).
    record: Json,
    /// The Task's position among the Bundle's entries.
    pub task_index: usize,
    /// The Task as the unit sent it.
    sent_task: Json,
    /// How a resent transaction is recognised: the client and the Task's identifier ('' when it has none).
    pub dedupe_key: String,
}

/// Reads a Bundle an inpatient unit sends (a message or a transaction; `resources` are its entries'
/// resources in order) as a referral: `None` when it carries no referral Task, 422 when it does but
/// cannot be read into a referral record the clinic can act on.
pub fn read_inbound(state: &AppState, principal: &Principal, bundle: &Json, resources: &[Option<&Json>]) -> Result<Option<Inbound>, ApiError> {
    if principal.role != Role::InpatientUnit {
        return Ok(None);
    }
    let is_type = |r: &Json, t: &str| r.get("resourceType").and_then(Json::as_str) == Some(t);
    let Some(task_index) = resources.iter().position(|r| r.is_some_and(|r| is_type(r, "Task") && r.get("focus").and_then(|f| f.get("reference")).is_some())) else {
        return Ok(None);
    };
    if !resources.iter().any(|r| r.is_some_and(|r| is_type(r, "ServiceRequest"))) {
        return Ok(None);
    }
    let sent_task = resources[task_index].cloned().unwrap_or(Json::Null);
    let mapped = state.mappings.fhir_to_records(bundle);
    let referral = mapped.output.into_iter().find(|r| r.get(RECORD_TYPE_MEMBER).and_then(Json::as_str) == Some("referral"));
    let Some(mut record) = referral else {
        let issues: Vec<Issue> = mapped
            .issues
            .iter()
            .filter(|i| i.severity.is_error() && i.source.starts_with("referral"))
            .map(|i| Issue::error(IssueCode::Processing, format!("Bundle.entry[{task_index}].resource"), format!("the referral cannot be read ({}): {}", i.path, i.message)))
            .collect();
        if issues.is_empty() {
            return Err(ApiError::Unprocessable(vec![Issue::error(
                IssueCode::Processing,
                format!("Bundle.entry[{task_index}].resource"),
                "the referral Task's focus is not a ServiceRequest of this Bundle",
            )]));
        }
        return Err(ApiError::Unprocessable(issues));
    };
    // The unit's referral is a request to the program, whatever status its Task was sent with.
    if let Some(object) = record.as_object_mut() {
        object.insert("direction", Json::string("inbound"));
    }
    let identifier = sent_task.get("identifier").and_then(Json::as_array).and_then(|ids| ids.first());
    let dedupe_key = match identifier.and_then(|i| i.get("value")).and_then(Json::as_str) {
        Some(value) => {
            let system = identifier.and_then(|i| i.get("system")).and_then(Json::as_str).unwrap_or_default();
            format!("{}:task:{system}|{value}", principal.client_id)
        }
        None => String::new(),
    };
    Ok(Some(Inbound { record, task_index, sent_task, dedupe_key }))
}

/// The stored Task is the program's to carry out: its `owner` names the program, which lets the
/// program's clients move its progress (and nothing else) under the Task-owner rule.
pub fn addressed_to_program(state: &AppState, task: &mut Json) {
    if let Some(object) = task.as_object_mut() {
        object.insert("owner", Json::from(&json!({"reference": state.program()})));
    }
}

/// What an earlier transaction with the same referral stored (`Type/id` in entry order), when this one is a resend by the same client.
pub async fn resent(state: &AppState, principal: &Principal, inbound: &Inbound) -> Result<Option<Vec<String>>, ApiError> {
    if inbound.dedupe_key.is_empty() {
        return Ok(None);
    }
    let Some(route) = state.store.referral_route_by_key(&inbound.dedupe_key).await? else { return Ok(None) };
    if route.client_id != principal.client_id {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&route.resources).unwrap_or_default()))
}

/// Records a stored referral in the transaction that stored it: the referral record (`requested`,
/// listed as an inbound record) and its route back. `stored` are the Bundle's entries as written
/// (in entry order; `None` for an entry that wrote nothing); `header` the referral message's
/// MessageHeader (none for a transaction). The referrer hears back through the partner its client
/// is listed in, else at the message's `source.endpoint` when the client's `callbacks` allow it.
/// A second referral under the same referral id keeps the first route and record.
pub async fn received(tx: &mut Tx, state: &AppState, principal: &Principal, inbound: &Inbound, stored: &[Option<&Stored>], header: Option<&Json>) -> Result<(), ApiError> {
    let Some(task) = stored.get(inbound.task_index).copied().flatten() else {
        return Err(ApiError::Internal("the referral Task was not stored".into()));
    };
    let partner = state.partners.for_client(&principal.client_id).filter(|p| p.config.kind == PartnerKind::InpatientUnit);
    let header_id = header.and_then(|h| h.get("id")).and_then(Json::as_str).unwrap_or_default();
    let source = header.and_then(|h| h.get("source")).and_then(|s| s.get("endpoint")).and_then(Json::as_str).unwrap_or_default();
    let callbacks = state.loaded.config.clients.iter().find(|c| c.id == principal.client_id).map(|c| c.callbacks.as_slice()).unwrap_or_default();
    let callback = if partner.is_none() && !source.is_empty() && crate::config::callback_allowed(source, callbacks) { source } else { "" };
    let channel = match partner.map(|p| p.config.referral_updates) {
        Some(ReferralUpdates::Task) => CHANNEL_TASK,
        Some(ReferralUpdates::Message) => CHANNEL_MESSAGE,
        None if !callback.is_empty() => CHANNEL_MESSAGE,
        None => "",
    };
    let now = crate::api::fhir::now_instant();
    let referral_id = text(&inbound.record, "id");
    let route = ReferralRoute {
        referral_id: referral_id.clone(),
        client_id: principal.client_id.clone(),
        partner: partner.map(|p| p.config.name.clone()).unwrap_or_default(),
        callback: callback.to_string(),
        channel: channel.to_string(),
        task_id: task.id.clone(),
        sent_task: inbound.sent_task.to_string_compact(),
        header_id: header_id.to_string(),
        dedupe_key: inbound.dedupe_key.clone(),
        resources: Value::Array(stored.iter().map(|s| Value::String(s.map(Stored::reference).unwrap_or_default())).collect()).to_string(),
        patient_client_id: String::new(),
        received: now.clone(),
    };
    if tx.put_referral_route(&route).await? {
        tx.put_record(&row(&inbound.record, "inbound", &now)).await?;
    }
    Ok(())
}

/// Where a referral stands, as its Task says it: FHIR status, BSeR business status, and why (declined, cancelled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub status: &'static str,
    pub business: (&'static str, &'static str),
    pub reason: Option<String>,
    /// The first session's date, once scheduled (`executionPeriod.start`).
    pub scheduled: Option<String>,
}

impl Progress {
    fn new(status: &'static str, business: (&'static str, &'static str), reason: Option<String>) -> Progress {
        Progress { status, business, reason, scheduled: None }
    }

    /// The progress a referral record's status stands for (the clinic's answer).
    pub fn of_record(record: &Json) -> Option<Progress> {
        let reason = record.get("status_reason").and_then(Json::as_str).map(str::to_string);
        Some(match record.get("status").and_then(Json::as_str)? {
            "requested" => Progress::new("requested", ("2.0", "Service Request Created"), None),
            "accepted" => Progress::new("accepted", ("3.0", "Service Request Accepted"), None),
            "declined" => Progress::new("rejected", ("4.0", "Service Request Declined"), reason),
            // In progress as the referral mappings write it (`referral.from-fhir` reads it back as scheduled).
            "scheduled" => Progress { scheduled: record.get("first_session_date").and_then(Json::as_str).map(str::to_string), ..Progress::new("in-progress", ("5.1.1", "Service Request Event Scheduled"), None) },
            "cancelled" => Progress::new("cancelled", ("6.0", "Service Request Fulfillment Cancelled"), reason),
            "completed" => Progress::new("completed", ("7.0", "Service Request Fulfillment Completed"), None),
            _ => return None,
        })
    }

    /// The progress a session's attendance stands for: the client came, or did not.
    pub fn of_attendance(attendance: &str) -> Progress {
        match attendance {
            "attended" | "late" | "left_early" => Progress::new("in-progress", ("5.1.4", "Service Request Event Completed"), None),
            _ => Progress::new("in-progress", ("5.1.2", "Scheduled Service Request Event Unattended"), None),
        }
    }

    /// The progress a discharge stands for: completed, or cancelled with the reason.
    pub fn of_discharge(reason: &str) -> Progress {
        match reason {
            "completed" => Progress::new("completed", ("7.0", "Service Request Fulfillment Completed"), None),
            other => Progress::new("cancelled", ("6.0", "Service Request Fulfillment Cancelled"), Some(format!("discharged from the program: {}", other.replace('_', " ")))),
        }
    }
}

/// The feedback document and the resources it holds, once the episode has ended.
#[derive(Clone, Debug)]
pub struct Feedback {
    /// A BSeR feedback document Bundle (`type` document).
    pub document: Value,
}

/// One Task change, prepared (built and validated) before the transaction that writes it.
struct Update {
    route: ReferralRoute,
    version: i64,
    task: Json,
    /// The feedback document, stored at the gateway too (the Task's output names it).
    document: Option<Json>,
    /// What goes to the referrer, in order.
    messages: Vec<NewMessage>,
}

/// Sets a Task's progress, returning whether anything changed. On our own JSON tree, which keeps
/// member order: every other member must stay exactly as it was (the Task-owner rule compares them).
fn set_progress(task: &mut Json, progress: &Progress, feedback: Option<&Feedback>, now: &str) -> bool {
    let before = task.clone();
    let Some(object) = task.as_object_mut() else { return false };
    let value = |v: Value| Json::from(&v);
    object.insert("status", value(json!(progress.status)));
    // The words go in `text`: the published CodeSystem's displays differ between BSeR's FSH and its XML ("Serivce").
    object.insert("businessStatus", value(json!({"coding": [{"system": BUSINESS_STATUS, "code": progress.business.0}], "text": progress.business.1})));
    match &progress.reason {
        Some(reason) => object.insert("statusReason", value(json!({"text": reason}))),
        None => {
            object.remove("statusReason");
        }
    }
    if let Some(start) = &progress.scheduled {
        object.insert("executionPeriod", value(json!({"start": start})));
    }
    if let Some(feedback) = feedback {
        let id = feedback.document["id"].as_str().unwrap_or_default();
        // `Bundle/id` resolves at the gateway and at the referrer alike: the document is stored at both.
        object.insert("output", value(json!([{"type": {"text": "Referral feedback"}, "valueReference": {"reference": format!("Bundle/{id}"), "display": "BSeR referral feedback document"}}])));
    }
    let changed = ["status", "businessStatus", "statusReason", "executionPeriod", "output"].iter().any(|m| before.get(m) != object.get(m));
    if changed {
        object.insert("lastModified", Json::string(now));
    }
    changed
}

/// Builds (and validates) the Task change and the message to the referrer; `None` when the Task already says so.
async fn prepare(state: &AppState, route: &ReferralRoute, progress: &Progress, feedback: Option<&Feedback>) -> Result<Option<Update>, ApiError> {
    let stored = state.store.read("Task", &route.task_id).await?.ok_or_else(|| ApiError::Internal(format!("the referral Task {} is gone", route.task_id)))?;
    let mut task = crate::json::parse(stored.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored Task does not parse: {e}")))?;
    let now = crate::api::fhir::now_instant();
    if !set_progress(&mut task, progress, feedback, &now) {
        return Ok(None);
    }
    let task = write::validate(state, task, Vec::new()).await?;
    let document = match feedback {
        Some(feedback) => Some(checked(state, route, &feedback.document).await?),
        None => None,
    };
    let mut messages = Vec::new();
    // A configured partner, else the address the referral message named (allowed when it was received).
    let target = match state.partners.get(&route.partner) {
        Some(partner) => Some((partner.config.name.clone(), partner.config.fhir_base.clone())),
        None if !route.callback.is_empty() => Some((format!("{CALLBACK}{}", route.client_id), route.callback.clone())),
        None => None,
    };
    if let Some((partner_name, fhir_base)) = target
        && !route.channel.is_empty()
    {
        let mut sent = crate::json::parse(route.sent_task.as_bytes()).map_err(|e| ApiError::Internal(format!("a referral's Task as sent does not parse: {e}")))?;
        set_progress(&mut sent, progress, feedback, &now);
        let sent = Value::from(&sent);
        let mut payloads = Vec::new();
        if route.channel == CHANNEL_MESSAGE {
            payloads.push((FEEDBACK_MESSAGE, feedback_message(state, route, &fhir_base, &sent, feedback, &now)));
        } else {
            if let Some(feedback) = feedback {
                payloads.push((FEEDBACK_DOCUMENT, feedback.document.clone()));
            }
            payloads.push((TASK_UPDATE, sent));
        }
        for (kind, payload) in payloads {
            let payload = checked(state, route, &payload).await?;
            let mut message = NewMessage {
                id: String::new(),
                partner: partner_name.clone(),
                // One subject per referral: a document goes before the Task naming it, and updates arrive in order.
                subject: format!("referral:{}", route.referral_id),
                kind: kind.to_string(),
                record_type: "referral".into(),
                record_id: route.referral_id.clone(),
                payload: payload.to_string_compact(),
            };
            message.id = message_id(&message);
            messages.push(message);
        }
    }
    Ok(Some(Update { route: route.clone(), version: stored.version, task, document, messages }))
}

/// Nothing invalid leaves: an outbound payload is checked like every other before it is queued.
async fn checked(state: &AppState, route: &ReferralRoute, payload: &Value) -> Result<Json, ApiError> {
    write::validate(state, Json::from(payload), Vec::new()).await.map_err(|e| match e {
        ApiError::Unprocessable(issues) => ApiError::Unprocessable(
            issues
                .into_iter()
                .map(|i| Issue { message: format!("the update for the referrer of referral {}, at {}: {}", route.referral_id, i.expression, i.message), ..i })
                .collect(),
        ),
        other => other,
    })
}

/// Writes a prepared change in `tx`: the Task through the one write path (as the program's client, the Task's owner), and the message to the referrer.
async fn apply(tx: &mut Tx, state: &AppState, principal: &Principal, update: &Update) -> Result<Vec<String>, Failure> {
    let change = Change { resource_type: "Task", id: update.route.task_id.clone(), resource: update.task.clone(), if_match: Some(update.version), inherited_labels: &[], method: "PUT" };
    write::write(tx, state, principal, change).await?;
    if let Some(document) = &update.document {
        let id = document.get("id").and_then(Json::as_str).unwrap_or_default().to_string();
        write::write(tx, state, principal, Change { resource_type: "Bundle", id, resource: document.clone(), if_match: None, inherited_labels: &[], method: "PUT" }).await?;
    }
    let mut queued = Vec::new();
    for message in &update.messages {
        if tx.enqueue(message, super::now_ms()).await? {
            queued.push(message.id.clone());
        }
    }
    Ok(queued)
}

/// The feedback message: a MessageHeader answering the referral message (when there was one), focused on the Task, and the feedback document when the episode has ended.
fn feedback_message(state: &AppState, route: &ReferralRoute, fhir_base: &str, task: &Value, feedback: Option<&Feedback>, now: &str) -> Value {
    // A message's references resolve inside it; the Task's point at the referrer's own resources, so they are written out in full.
    let mut task = task.clone();
    absolute_references(&mut task, fhir_base.trim_end_matches('/'));
    let task = &task;
    let task_id = task["id"].as_str().map(str::to_string).unwrap_or_else(write::new_id);
    let task_url = format!("{}/Task/{task_id}", fhir_base.trim_end_matches('/'));
    // One message per change: its ids follow from the Task's new state, so a rebuilt message is the same message.
    let seed = format!("{}\n{}\n{}", route.referral_id, task["businessStatus"], task["lastModified"]);
    let header_id = name_id(&format!("header\n{seed}"));
    let bundle_id = name_id(&format!("bundle\n{seed}"));
    // BSeR's MessageHeader names PractitionerRoles as sender and receiver: the program's role in the
    // referral (for the Task's owner) and the referrer's (its requester, when that is not one already).
    let role = |which: &str, organization: Option<&Value>| {
        let mut role = json!({"resourceType": "PractitionerRole", "id": name_id(&format!("role\n{which}\n{}", route.referral_id)), "active": true});
        if let Some(organization) = organization.filter(|o| o.get("reference").and_then(Value::as_str).is_some_and(|r| r.contains("Organization/"))) {
            role["organization"] = organization.clone();
        }
        role
    };
    let mut roles = vec![role("sender", task.get("owner"))];
    let receiver = match task.get("requester") {
        Some(requester) if requester.get("reference").and_then(Value::as_str).is_some_and(|r| r.contains("PractitionerRole/")) => requester.clone(),
        requester => {
            roles.push(role("receiver", requester));
            json!({"reference": format!("urn:uuid:{}", roles[1]["id"].as_str().unwrap_or_default())})
        }
    };
    let mut header = json!({
        "resourceType": "MessageHeader",
        "id": header_id,
        "meta": {"profile": [super::step_down::MESSAGE_HEADER_PROFILE]},
        "eventCoding": {"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "I12", "display": "REF/RRI - Patient referral"},
        "destination": [{"endpoint": fhir_base, "receiver": receiver}],
        "sender": {"reference": format!("urn:uuid:{}", roles[0]["id"].as_str().unwrap_or_default())},
        "source": {"name": "iop-gateway", "endpoint": state.base_url.clone()},
        "focus": [{"reference": task_url}],
    });
    if !route.header_id.is_empty() {
        header["response"] = json!({"identifier": route.header_id, "code": "ok"});
    }
    let mut entries = vec![json!({"fullUrl": format!("urn:uuid:{header_id}"), "resource": header}), json!({"fullUrl": task_url, "resource": task})];
    if let Some(feedback) = feedback {
        // At the Task's base, so the Task's `Bundle/id` output resolves to it inside the message.
        let url = format!("{}/Bundle/{}", fhir_base.trim_end_matches('/'), feedback.document["id"].as_str().unwrap_or_default());
        entries.push(json!({"fullUrl": url, "resource": feedback.document}));
    }
    entries.extend(roles.into_iter().map(|r| json!({"fullUrl": format!("urn:uuid:{}", r["id"].as_str().unwrap_or_default()), "resource": r})));
    json!({"resourceType": "Bundle", "id": bundle_id, "meta": {"profile": [super::step_down::MESSAGE_BUNDLE_PROFILE]}, "type": "message", "timestamp": now, "entry": entries})
}

/// Writes the relative references of a resource the referrer sent as absolute URLs at its base; a
/// `urn:uuid:` reference (a transaction's, meaningless outside it) keeps only its other members.
fn absolute_references(value: &mut Value, base: &str) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get("reference").cloned() {
                if reference.starts_with("urn:") {
                    object.remove("reference");
                    if object.is_empty() {
                        object.insert("display".into(), json!("as in the referral"));
                    }
                } else if !reference.contains("://") && !reference.starts_with('#') {
                    object.insert("reference".into(), json!(format!("{base}/{reference}")));
                }
            }
            for (_, member) in object.iter_mut() {
                absolute_references(member, base);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| absolute_references(item, base)),
        _ => {}
    }
}

/// Whether a record is the clinic's answer to an inbound referral (the record of a referral the gateway received).
fn answers_referral(record: &Json) -> bool {
    record.get(RECORD_TYPE_MEMBER).and_then(Json::as_str) == Some("referral") && record.get("direction").and_then(Json::as_str) == Some("inbound")
}

/// Splits posted records into answers to received referrals (with their routes and positions) and the rest.
pub async fn split_answers(state: &AppState, records: Vec<Json>) -> Result<(Vec<(usize, Json, ReferralRoute)>, Vec<Json>), ApiError> {
    let mut answers = Vec::new();
    let mut rest = Vec::new();
    for (i, record) in records.into_iter().enumerate() {
        if answers_referral(&record)
            && let Some(route) = state.store.referral_route(&text(&record, "id")).await?
        {
            answers.push((i, record, route));
            continue;
        }
        rest.push(record);
    }
    Ok((answers, rest))
}

/// The clinic's answers to received referrals, checked: each one's Task change built and validated
/// before any transaction, to be written with the rest of the batch.
#[derive(Default)]
pub struct Answers {
    /// Position in the batch as posted, the record, the referral's route.
    answers: Vec<(usize, Json, ReferralRoute)>,
    /// The Task change of each answer; `None` when the Task already says so.
    updates: Vec<Option<Update>>,
}

impl Answers {
    /// Checks every answer (schema, status, the Task change and the referrer's message), every problem located as `records[i]`.
    pub async fn check(state: &AppState, answers: Vec<(usize, Json, ReferralRoute)>) -> Result<Answers, ApiError> {
        let mut issues = Vec::new();
        for (i, record, _) in &answers {
            let problems = state.mappings.schemas.check(record);
            if problems.is_empty() && Progress::of_record(record).is_none() {
                issues.push(Issue::error(IssueCode::Invalid, format!("records[{i}].status"), "not a referral status"));
            }
            for problem in problems {
                let at = if problem.path.is_empty() { format!("records[{i}]") } else { format!("records[{i}].{}", problem.path) };
                issues.push(Issue::error(IssueCode::Invalid, at, problem.message));
            }
        }
        if !issues.is_empty() {
            return Err(ApiError::Unprocessable(issues));
        }
        let mut answers = Answers { answers, updates: Vec::new() };
        answers.refresh(state).await?;
        Ok(answers)
    }

    /// Builds the Task changes from the Tasks as stored now (again, when one moved since they were read).
    pub async fn refresh(&mut self, state: &AppState) -> Result<(), ApiError> {
        let mut updates = Vec::new();
        for (i, record, route) in &self.answers {
            let Some(progress) = Progress::of_record(record) else { return Err(ApiError::Internal("an answer was checked without a referral status".into())) };
            let update = prepare(state, route, &progress, None).await.map_err(|e| match e {
                ApiError::Unprocessable(issues) => {
                    ApiError::Unprocessable(issues.into_iter().map(|issue| Issue { message: format!("at {}: {}", issue.expression, issue.message), expression: format!("records[{i}]"), ..issue }).collect())
                }
                other => other,
            })?;
            updates.push(update);
        }
        self.updates = updates;
        Ok(())
    }
}

/// Writes the checked answers in `tx`: each Task's progress, the referrer's message, the answered
/// record and its client. Each summary comes with its record's position in the batch as posted.
pub async fn write_answers(tx: &mut Tx, state: &AppState, principal: &Principal, answers: &Answers) -> Result<Vec<(usize, RecordSummary)>, Failure> {
    let now = crate::api::fhir::now_instant();
    let mut summaries = Vec::new();
    for ((i, record, route), update) in answers.answers.iter().zip(&answers.updates) {
        let mut summary = RecordSummary { record_type: "referral".into(), id: route.referral_id.clone(), resources: vec![format!("Task/{}", route.task_id)], messages: Vec::new() };
        if let Some(update) = update {
            summary.messages = apply(tx, state, principal, update).await.map_err(|e| match e {
                // The Task moved since it was read: the batch is run again, the Task read again.
                Failure::Api(ApiError::PreconditionFailed(_)) => Failure::Retry,
                other => other,
            })?;
        }
        // The answered record is what the clinic lists from now on; its client ties sessions and the discharge to it.
        tx.put_record(&row(record, "inbound", &now)).await?;
        let client = text(record, "client_id");
        if !client.is_empty() {
            tx.link_referral_client(&route.referral_id, &client).await?;
        }
        summaries.push((*i, summary));
    }
    Ok(summaries)
}

/// After the clinic's records committed: enrollments tie a referral to the program's client, and
/// that client's sessions (came or not) and discharge (completed or not, with the feedback document)
/// move the referral Task and tell the referrer.
pub async fn follow(state: &AppState, principal: &Principal, records: &[Json]) -> Result<(), ApiError> {
    let links: Vec<(String, String)> = of_type(records, "enrollment").map(|r| (text(r, "referral_id"), text(r, "client_id"))).filter(|(referral, client)| !referral.is_empty() && !client.is_empty()).collect();
    if !links.is_empty() {
        let mut tx = state.store.begin().await?;
        for (referral, client) in &links {
            tx.link_referral_client(referral, client).await?;
        }
        tx.commit().await?;
    }
    // Per client, what the batch says last: its discharge, else its latest session.
    let mut latest: std::collections::BTreeMap<String, (String, Progress, Option<Json>)> = std::collections::BTreeMap::new();
    for session in of_type(records, "session") {
        let (client, at) = (text(session, "client_id"), text(session, "start_at"));
        if latest.get(&client).is_none_or(|(seen, _, _)| *seen < at) {
            latest.insert(client, (at, Progress::of_attendance(&text(session, "attendance")), None));
        }
    }
    for discharge in of_type(records, "discharge") {
        latest.insert(text(discharge, "client_id"), (String::from("~"), Progress::of_discharge(&text(discharge, "reason")), Some(discharge.clone())));
    }
    for (client, (_, progress, discharge)) in latest {
        let routes = {
            let mut tx = state.store.begin().await?;
            let routes = tx.referral_routes_of_client(&client).await?;
            drop(tx);
            routes
        };
        for route in routes {
            let feedback = match &discharge {
                Some(discharge) if progress.status == "completed" => Some(feedback(state, principal, &route, &client, discharge).await?),
                _ => None,
            };
            for _ in 0..ATTEMPTS {
                let Some(update) = prepare(state, &route, &progress, feedback.as_ref()).await? else { break };
                let mut tx = state.store.begin().await?;
                match apply(&mut tx, state, principal, &update).await {
                    Ok(_) => {
                        tx.commit().await?;
                        state.outbox_wake.notify_one();
                        break;
                    }
                    Err(Failure::Retry) | Err(Failure::Api(ApiError::PreconditionFailed(_))) => continue,
                    Err(Failure::Api(e)) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// The ServiceRequests of inbound referrals that the records' enrollments name in `referral_id`,
/// as mapping would name them (`ServiceRequest/<id of referral:{referral_id}>`) → as stored. A
/// referral received from a unit was stored from the unit's Bundle under a server id, not the id
/// mapping derives, so without this an enrollment naming it (and a discharge summary gathering the
/// enrollment's episode) would point at a ServiceRequest that does not exist. The stored Task's
/// `focus` is the one. A referral record of the batch itself produces its ServiceRequest: left alone.
pub async fn stored_requests(state: &AppState, records: &[Json]) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut resolved = std::collections::BTreeMap::new();
    for referral_id in of_type(records, "enrollment").map(|r| text(r, "referral_id")).filter(|id| !id.is_empty()) {
        if of_type(records, "referral").any(|r| text(r, "id") == referral_id) {
            continue;
        }
        let Some(route) = state.store.referral_route(&referral_id).await? else { continue };
        let Some(task) = state.store.read("Task", &route.task_id).await? else { continue };
        let task: Value = serde_json::from_str(&task.body).map_err(|e| ApiError::Internal(format!("a stored Task does not parse: {e}")))?;
        if let Some(focus) = task["focus"]["reference"].as_str().filter(|f| f.starts_with("ServiceRequest/")) {
            let named = format!("ServiceRequest/{}", state.mappings.resource_id("ServiceRequest", &format!("referral:{referral_id}")));
            resolved.insert(named, focus.to_string());
        }
    }
    Ok(resolved)
}

fn of_type<'a>(records: &'a [Json], record_type: &'a str) -> impl Iterator<Item = &'a Json> {
    records.iter().filter(move |r| r.get(RECORD_TYPE_MEMBER).and_then(Json::as_str) == Some(record_type))
}

/// The feedback document for a referral whose episode ended: built from what the gateway holds of
/// the client (its sessions, PHQ-9 and GAD-7 screenings, the discharge), then passed through
/// [`feedback_contents`], the one place that decides what of it the referrer may receive.
async fn feedback(state: &AppState, principal: &Principal, route: &ReferralRoute, client: &str, discharge: &Json) -> Result<Feedback, ApiError> {
    let screenings = state.store.client_records(client, "screening", None, 1000).await?;
    let screenings: Vec<Value> = screenings.iter().filter_map(|r| serde_json::from_str(&r.body).ok()).collect();
    let candidates = Candidates { discharge: Value::from(discharge), screenings };
    let contents = feedback_contents(state, principal, route, candidates);
    Ok(Feedback { document: feedback_document(route, client, &contents) })
}

/// Everything the gateway could put into a referral's feedback.
#[derive(Clone, Debug)]
pub struct Candidates {
    /// The discharge record: attendance, disposition, aftercare.
    pub discharge: Value,
    /// The client's screening records (PHQ-9 and GAD-7 totals come from them).
    pub screenings: Vec<Value>,
}

/// Decides what of the candidates goes into the feedback the referrer receives: what BSeR's feedback
/// asks for and nothing else. Whether it may leave at all (42 CFR Part 2) is the outbox's send-time
/// consent check, told the referral's patients by [`patients_of`].
pub fn feedback_contents(_state: &AppState, _principal: &Principal, _route: &ReferralRoute, candidates: Candidates) -> Candidates {
    let screenings = candidates.screenings.into_iter().filter(|s| matches!(s["instrument"].as_str(), Some("phq9" | "gad7"))).collect();
    Candidates { screenings, ..candidates }
}

/// The first and the last total of an instrument, by administration time.
fn first_and_last(screenings: &[Value], instrument: &str) -> Option<(Value, Value)> {
    let mut of: Vec<&Value> = screenings.iter().filter(|s| s["instrument"] == instrument).collect();
    of.sort_by(|a, b| a["administered_at"].as_str().cmp(&b["administered_at"].as_str()));
    let total = |s: &Value| -> Value {
        match s["total"].as_i64() {
            Some(t) => json!(t),
            None => json!(s["items"].as_array().map(|items| items.iter().filter_map(|i| i["answer"].as_i64()).sum::<i64>()).unwrap_or(0)),
        }
    };
    let first = of.first()?;
    let last = of.last()?;
    Some((json!({"total": total(first), "at": first["administered_at"]}), json!({"total": total(last), "at": last["administered_at"]})))
}

/// The BSeR referral feedback document: a Composition whose summary section (`RSRFS`) tells the
/// outcome in text and lists Observations of attendance, PHQ-9 and GAD-7 first and last totals,
/// the discharge disposition and the aftercare plan.
fn feedback_document(route: &ReferralRoute, client: &str, contents: &Candidates) -> Value {
    let discharge = &contents.discharge;
    let seed = format!("feedback\n{}\n{}", route.referral_id, discharge["id"]);
    let id = |part: &str| name_id(&format!("{seed}\n{part}"));
    let date = discharge["discharge_date"].as_str().unwrap_or_default().to_string();
    let patient = json!({"display": format!("Program client {client}")});
    let mut observations: Vec<(String, Value)> = Vec::new();
    let mut summary = Vec::new();
    let mut observation = |name: &str, code: Value, value: (&str, Value), text: String, at: &str| {
        let oid = id(name);
        let when = if at.is_empty() { date.as_str() } else { at };
        let mut o = json!({"resourceType": "Observation", "id": oid, "status": "final", "code": code, "subject": patient, "effectiveDateTime": when});
        o[value.0] = value.1;
        summary.push(text);
        observations.push((oid, o));
    };
    let attendance = &discharge["attendance"];
    if let (Some(scheduled), Some(attended)) = (attendance["scheduled"].as_i64(), attendance["attended"].as_i64()) {
        observation(
            "attendance",
            json!({"text": "Program sessions attended"}),
            ("valueString", json!(format!("{attended} of {scheduled} scheduled sessions attended"))),
            format!("Attended {attended} of {scheduled} scheduled sessions."),
            "",
        );
    }
    for (instrument, loinc, display) in [("phq9", "44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]"), ("gad7", "70274-6", "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]")] {
        if let Some((first, last)) = first_and_last(&contents.screenings, instrument) {
            for (which, value) in [("first", &first), ("last", &last)] {
                let total = value["total"].as_i64().unwrap_or(0);
                let at = value["at"].as_str().unwrap_or_default().to_string();
                let name = if instrument == "phq9" { "PHQ-9" } else { "GAD-7" };
                let o_code = json!({"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}], "text": format!("{name} total score, {which} in the episode")});
                let text = format!("{name} {which}: {total} ({at}).");
                observation(&format!("{instrument}-{which}"), o_code, ("valueInteger", json!(total)), text, &at);
            }
        }
    }
    if let Some(disposition) = discharge["disposition"].as_str() {
        let words = disposition.replace('_', " ");
        observation("disposition", json!({"text": "Discharge disposition"}), ("valueString", json!(words.clone())), format!("Discharge disposition: {words}."), "");
    }
    if let Some(plan) = discharge["aftercare"]["plan"].as_str() {
        observation("aftercare", json!({"text": "Aftercare plan"}), ("valueString", json!(plan)), format!("Aftercare: {plan}"), "");
    }
    let narrative = |text: &str| {
        let escaped = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{escaped}</div>")})
    };
    let summary_text = format!("Referral {} completed: discharged {date}. {}", route.referral_id, summary.join(" "));
    // BSeR's summary section names the ServiceRequest it answers. A document's references resolve inside
    // it, and the unit's ServiceRequest is the unit's: named by the referral's placer identifier.
    let sent: Value = serde_json::from_str(&route.sent_task).unwrap_or_default();
    let mut referral_focus = json!({"type": "ServiceRequest", "display": format!("Referral {}", route.referral_id)});
    if let (Some(system), Some(value)) = (sent["identifier"][0]["system"].as_str(), sent["identifier"][0]["value"].as_str()) {
        referral_focus["identifier"] = json!({"system": system, "value": value});
    }
    let composition_id = id("composition");
    let composition = json!({
        "resourceType": "Composition",
        "id": composition_id,
        "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "57133-1", "display": "Referral note"}], "text": "Referral feedback"},
        "subject": patient,
        "date": crate::api::fhir::now_instant(),
        "author": [{"display": "IOP program"}],
        "title": "Referral feedback",
        "section": [{
            "title": "Referral service request feedback summary",
            // BSeR's own CodeSystem is named BSeR but published at its id, `bser` (FSH and the legacy XML alike).
            "code": {"coding": [{"system": "http://hl7.org/fhir/us/bser/CodeSystem/bser", "code": "RSRFS"}], "text": "Referral service request feedback summary"},
            "focus": referral_focus,
            "text": narrative(&summary_text),
            "entry": observations.iter().map(|(oid, _)| json!({"reference": format!("urn:uuid:{oid}")})).collect::<Vec<_>>(),
        }],
    });
    let mut entries = vec![json!({"fullUrl": format!("urn:uuid:{composition_id}"), "resource": composition})];
    entries.extend(observations.into_iter().map(|(oid, o)| json!({"fullUrl": format!("urn:uuid:{oid}"), "resource": o})));
    json!({
        "resourceType": "Bundle",
        "id": id("document"),
        "meta": {"profile": [FEEDBACK_DOCUMENT_PROFILE]},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", id("identifier"))},
        "type": "document",
        "timestamp": crate::api::fhir::now_instant(),
        "entry": entries,
    })
}

/// The patients a message to a referrer is about, for the send-time consent check: the Patient the
/// referral stored and, once an enrollment named the referral, the program's client. The payload
/// names neither (the referrer's own ids; the feedback document no Patient at all), yet it tells the
/// referrer of the client's program, so the client's enrolment and consents decide it.
pub async fn patients_of(state: &AppState, message: &Message) -> Result<Vec<String>, ApiError> {
    if message.new.record_type != "referral" || ![TASK_UPDATE, FEEDBACK_MESSAGE, FEEDBACK_DOCUMENT].contains(&message.new.kind.as_str()) {
        return Ok(Vec::new());
    }
    let Some(route) = state.store.referral_route(&message.new.record_id).await? else { return Ok(Vec::new()) };
    let stored: Vec<String> = serde_json::from_str(&route.resources).unwrap_or_default();
    let mut patients: Vec<String> = stored.into_iter().filter(|r| r.starts_with("Patient/")).collect();
    if !route.patient_client_id.is_empty() {
        patients.push(format!("Patient/{}", state.mappings.resource_id("Patient", &format!("client:{}", route.patient_client_id))));
    }
    Ok(patients)
}

/// The path a `PUT` goes to at the referrer: `Type/id` of the payload (the Task, or the feedback document).
pub fn put_path(payload: &str) -> String {
    let value = serde_json::from_str::<Value>(payload).unwrap_or_default();
    let resource_type = value["resourceType"].as_str().unwrap_or_default();
    if let Some(id) = value["id"].as_str() {
        return format!("{resource_type}/{id}");
    }
    // A Task sent without an id is found at the referrer by its identifier (a conditional update).
    let identifier = &value["identifier"][0];
    let token = format!("{}|{}", identifier["system"].as_str().unwrap_or_default(), identifier["value"].as_str().unwrap_or_default());
    format!("{resource_type}?{}", form_urlencoded::Serializer::new(String::new()).append_pair("identifier", &token).finish())
}

/// The partner a message to a client's callback address goes through: the referral's `source.endpoint`
/// as its FHIR base, no credentials; `None` when the message is not one, or the address is no longer allowed.
pub async fn callback_partner(state: &AppState, message: &Message) -> Option<crate::partner::Partner> {
    let client = message.new.partner.strip_prefix(CALLBACK)?;
    let route = state.store.referral_route(&message.new.record_id).await.ok()??;
    let allowed = route.client_id == client && state.loaded.config.clients.iter().find(|c| c.id == client).is_some_and(|c| crate::config::callback_allowed(&route.callback, &c.callbacks));
    if !allowed {
        return None;
    }
    // The client it speaks for makes it the recipient the consent decision sees.
    let text = format!("name = {:?}\nkind = \"inpatient-unit\"\nfhir_base = {:?}\nauth = \"none\"\nclients = [{client:?}]\n", message.new.partner, route.callback);
    let config: crate::config::PartnerConfig = toml::from_str(&text).ok()?;
    crate::partner::Partner::new(&config, &state.loaded.config.store.data_dir).ok()
}

/// The referrer took the update: the message is delivered.
pub async fn delivered(state: &AppState, message: &Message, owner: &str, status: u16, body: &str) -> Result<bool, ApiError> {
    super::outbox::finish(state, message, owner, MessageStatus::Delivered, status, "", body).await
}

/// The referrer refused the update (or it was given up on): a dead letter for operators; the referral itself stands.
pub async fn refused(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    super::outbox::finish(state, message, owner, MessageStatus::Dead, status, reason, body).await
}


/// An id that follows from what it names, so whatever is built again is the same thing.
fn name_id(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&Sha256::digest(text.as_bytes())[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

fn text(record: &Json, member: &str) -> String {
    record.get(member).and_then(Json::as_str).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_statuses_are_bser_business_statuses() {
        let parse = |t: &str| crate::json::parse(t.as_bytes()).unwrap();
        let of = |status: &str| Progress::of_record(&parse(&format!(r#"{{"status":"{status}","status_reason":"no capacity"}}"#))).unwrap();
        assert_eq!((of("accepted").status, of("accepted").business.0), ("accepted", "3.0"));
        assert_eq!((of("declined").status, of("declined").business.0, of("declined").reason.as_deref()), ("rejected", "4.0", Some("no capacity")));
        assert_eq!(of("scheduled").business.0, "5.1.1");
        assert_eq!(of("completed").business.0, "7.0");
        assert_eq!(of("cancelled").business.0, "6.0");
        assert_eq!(Progress::of_attendance("absent_unexcused").business.0, "5.1.2");
        assert_eq!(Progress::of_attendance("late").business.0, "5.1.4");
        assert_eq!(Progress::of_discharge("completed").business.0, "7.0");
        let withdrew = Progress::of_discharge("withdrew");
        assert_eq!((withdrew.status, withdrew.business.0), ("cancelled", "6.0"));
        assert!(withdrew.reason.unwrap().contains("withdrew"));
    }

    #[test]
    fn progress_changes_only_what_it_says_and_stamps_the_change() {
        let mut task = crate::json::parse(br#"{"resourceType":"Task","id":"t","status":"requested","identifier":[{"value":"v","system":"s"}],"intent":"order","statusReason":{"text":"old"}}"#).unwrap();
        let identifier = task.get("identifier").cloned();
        let accepted = Progress::of_record(&crate::json::parse(br#"{"status":"accepted"}"#).unwrap()).unwrap();
        assert!(set_progress(&mut task, &accepted, None, "2026-03-10T10:00:00Z"));
        assert_eq!(task.get("identifier").cloned(), identifier, "the rest, member order included, stays as it was");
        let value = Value::from(&task);
        assert_eq!(value["businessStatus"], json!({"coding": [{"system": BUSINESS_STATUS, "code": "3.0"}], "text": "Service Request Accepted"}));
        assert!(value.get("statusReason").is_none());
        assert_eq!(value["lastModified"], "2026-03-10T10:00:00Z");
        assert!(!set_progress(&mut task, &accepted, None, "2026-03-11T10:00:00Z"), "the same progress again changes nothing");
        assert_eq!(Value::from(&task)["lastModified"], "2026-03-10T10:00:00Z");
    }

    #[test]
    fn first_and_last_totals_follow_administration_time() {
        let s = |at: &str, total: i64| json!({"instrument": "phq9", "administered_at": at, "total": total});
        let screenings = vec![s("2026-02-01T10:00:00Z", 9), s("2026-01-01T10:00:00Z", 18), s("2026-01-15T10:00:00Z", 12)];
        let (first, last) = first_and_last(&screenings, "phq9").unwrap();
        assert_eq!((first["total"].as_i64(), last["total"].as_i64()), (Some(18), Some(9)));
        assert!(first_and_last(&screenings, "gad7").is_none());
    }
}
