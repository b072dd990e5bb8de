//! Step-down referrals out at discharge: the BSeR referral message a discharge sends the outpatient provider its client steps down to, and the provider's answers (a Task update or a feedback message) read back into the outbound referral record.
//!
//! A discharge naming `step_down_referral_id` sends, once, a BSeR referral message (claiming BSeR
//! 2.0.0's `BSeR-ReferralMessageBundle`: a `BSeR-ReferralMessageHeader` with event `v2-0003#I12` and focus
//! the Task, then the Task, its ServiceRequest, the Patient, the Patient's active Coverage, the
//! discharge summary Bundle, the Consents the ServiceRequest names, the two Organizations and the
//! PractitionerRoles the header's sender and receiver must be; the definition's ODH employment and
//! education slices are optional, so none goes) to the `outpatient-provider` partner
//! whose `routes` name the referral's receiving facility. What goes is decided in one place,
//! [`chosen_content`]. The provider answers by updating the Task at the gateway (`PUT /Task/{id}`)
//! or by a response message to `$process-message` ([`Feedback`]); either way the Task is written
//! through the one write path and [`task_changed`] moves the outbound referral record with it.

use serde_json::{Value, json};

use crate::api::ApiError;
use crate::api::state::AppState;
use crate::api::write::{self, Failure};
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::store::{Message, MessageStatus, NewMessage, Tx};

/// The outbox kind of a step-down referral message.
pub const REFERRAL: &str = "step-down-referral";

/// The operation a referral message is posted to, under the provider's FHIR base.
pub const PROCESS_MESSAGE_PATH: &str = "$process-message";

/// BSeR's referral event (HL7 v2 table 0003, I12 "REF/RRI - Patient referral"), fixed by `BSeR-ReferralMessageHeader`.
const EVENT_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v2-0003";
const EVENT_CODE: &str = "I12";
pub const MESSAGE_HEADER_PROFILE: &str = "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralMessageHeader";
/// BSeR's referral message Bundle, which the step-down message (and the inbound referrals' feedback message) claims.
pub const MESSAGE_BUNDLE_PROFILE: &str = "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralMessageBundle";
const REFERRAL_ID_SYSTEM: &str = "http://iop-gateway.org/fhir/sid/referral-id";
const DIRECTION_SYSTEM: &str = "http://iop-gateway.org/fhir/CodeSystem/referral-direction";

/// What the Task's owner (the provider) may report of its progress; everything else of the Task is the program's.
const PROGRESS_MEMBERS: &[&str] = &["status", "statusReason", "businessStatus", "executionPeriod", "lastModified", "note", "output"];

/// A step-down referral a discharge of the batch sends: found before the transaction.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Index of the discharge record in the batch.
    pub discharge: usize,
    /// Index of the outbound referral record it names.
    pub referral: usize,
    pub referral_id: String,
    /// The `outpatient-provider` partner that routes the referral's receiving facility.
    pub partner: String,
}

/// The step-down referrals the batch's discharges send. A discharge without `step_down_referral_id`
/// sends nothing; one naming a referral that is not an outbound referral record of the batch, or
/// whose receiving facility no `outpatient-provider` partner routes, is refused with the record's
/// path (nothing of the batch is stored): a referral the clinic meant to send is never dropped silently.
pub fn plan(state: &AppState, records: &[Json], issues: &mut Vec<Issue>) -> Vec<Planned> {
    let mut plan = Vec::new();
    for (i, record) in records.iter().enumerate() {
        if text(record, "record_type") != "discharge" {
            continue;
        }
        let referral_id = text(record, "step_down_referral_id");
        if referral_id.is_empty() {
            continue;
        }
        let found = records.iter().position(|r| text(r, "record_type") == "referral" && text(r, "id") == referral_id);
        let Some(j) = found.filter(|&j| text(&records[j], "direction") == "outbound") else {
            issues.push(Issue::error(
                IssueCode::NotFound,
                format!("records[{i}].step_down_referral_id"),
                format!("'{referral_id}' names no outbound referral record of this batch; send the step-down referral (direction outbound) with the discharge"),
            ));
            continue;
        };
        let facility = records[j].get("receiving_facility").and_then(|f| f.get("id")).and_then(Json::as_str).unwrap_or_default();
        let Some(partner) = state.partners.outpatient_provider_for(facility) else {
            issues.push(Issue::error(
                IssueCode::NotFound,
                format!("records[{j}].receiving_facility.id"),
                format!(
                    "no outpatient-provider partner routes receiving facility '{facility}' (configure [[partners]] with kind = \"outpatient-provider\" and routes), so step-down referral {referral_id} cannot be sent; to record the discharge without sending it, leave out step_down_referral_id"
                ),
            ));
            continue;
        };
        plan.push(Planned { discharge: i, referral: j, referral_id, partner: partner.config.name.clone() });
    }
    plan
}

/// The resources a referral message may carry, as found for it; [`chosen_content`] decides what goes.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    pub task: Value,
    pub service_request: Value,
    pub patient: Option<Value>,
    /// The Patient's active Coverage.
    pub coverages: Vec<Value>,
    /// The discharge summary: a collection Bundle (the Composition and what it references), named by the ServiceRequest's `supportingInfo`.
    pub summary: Option<Value>,
    /// The Consents the ServiceRequest's `supportingInfo` names.
    pub consents: Vec<Value>,
    /// The Organizations the Task names (requester and owner), and the Coverage's payers.
    pub organizations: Vec<Value>,
    /// The PractitionerRoles BSeR's MessageHeader needs as sender and receiver.
    pub practitioner_roles: Vec<Value>,
}

/// THE place where what a step-down referral message discloses is chosen, from every resource that
/// could go. Today: the workflow resources (Task, ServiceRequest, Organizations, PractitionerRoles)
/// always, and the Patient, Coverage, discharge summary and Consents the referral names — the
/// content BSeR's referral message carries. The patient's consent decision (42 CFR Part 2) narrows
/// this list here, and nowhere else.
pub fn chosen_content(candidates: Candidates) -> Vec<Value> {
    let Candidates { task, service_request, patient, coverages, summary, consents, organizations, practitioner_roles } = candidates;
    let mut chosen = vec![task, service_request];
    chosen.extend(patient);
    chosen.extend(coverages);
    chosen.extend(summary);
    chosen.extend(consents);
    chosen.extend(organizations);
    chosen.extend(practitioner_roles);
    chosen
}

/// The referral message a planned step-down referral sends now, or `None` when it was already queued
/// (a re-sent discharge sends nothing twice; only a dead letter lets it go again). Built from the
/// batch's resources, else the stored ones, and validated before it is queued.
pub async fn message(tx: &mut Tx, state: &AppState, planned: &Planned, records: &[Json], transaction: &Json) -> Result<Option<NewMessage>, ApiError> {
    let earlier = tx.messages_for_record("referral", &planned.referral_id).await?;
    let sent = earlier.iter().filter(|m| m.new.kind == REFERRAL && m.new.partner == planned.partner && m.status != MessageStatus::Dead).count();
    if sent > 0 {
        return Ok(None);
    }
    let at = format!("records[{}]", planned.referral);
    let fail = |why: String| ApiError::Unprocessable(vec![Issue::error(IssueCode::Processing, at.clone(), why)]);
    let batch: Vec<Value> = transaction.get("entry").and_then(Json::as_array).unwrap_or_default().iter().filter_map(|e| e.get("resource")).map(Value::from).collect();
    let client_id = text(&records[planned.discharge], "client_id");
    // The client's record of this batch, else the one stored: it names the Coverage the mapping made.
    let client = match records.iter().find(|r| text(r, "record_type") == "client" && text(r, "id") == client_id) {
        Some(record) => Some(Value::from(record)),
        None => tx.record("client", &client_id, "outbound").await?.and_then(|r| serde_json::from_str::<Value>(&r.body).ok()),
    };
    let mut found = Found { tx, batch: &batch };
    let ids = |t: &str, identity: String| state.mappings.resource_id(t, &identity);
    let referral = &planned.referral_id;
    let task = found.get("Task", &ids("Task", format!("referral:{referral}:task"))).await?.ok_or_else(|| fail("the mapping made no Task for the referral".into()))?;
    let service_request = found.get("ServiceRequest", &ids("ServiceRequest", format!("referral:{referral}"))).await?.ok_or_else(|| fail("the mapping made no ServiceRequest for the referral".into()))?;
    let patient = found.reference(task["for"]["reference"].as_str().unwrap_or_default(), &["Patient"]).await?;
    let mut coverages = Vec::new();
    if let Some(coverage) = client.as_ref().map(|c| &c["coverage"]).filter(|c| c.is_object()) {
        let identity = format!("coverage:{client_id}:{}:{}", coverage["payer_id"].as_str().unwrap_or_default(), coverage["member_id"].as_str().unwrap_or_default());
        coverages.extend(found.get("Coverage", &ids("Coverage", identity)).await?.filter(|c| c["status"] == "active"));
    }
    let mut summary = None;
    let mut consents = Vec::new();
    for info in service_request["supportingInfo"].as_array().into_iter().flatten() {
        let reference = info["reference"].as_str().unwrap_or_default();
        match found.reference(reference, &["Bundle", "Consent"]).await? {
            Some(r) if r["resourceType"] == "Bundle" && summary.is_none() => summary = Some(r),
            Some(r) if r["resourceType"] == "Consent" => consents.push(r),
            Some(_) => {}
            None => return Err(fail(format!("the referral's supportingInfo names {reference}, which is neither in this batch nor stored; send its record first"))),
        }
    }
    let mut organizations = Vec::new();
    let mut roles = Vec::new();
    for (member, role) in [("requester", "referral-initiator"), ("owner", "referral-recipient")] {
        let reference = task[member]["reference"].as_str().unwrap_or_default().to_string();
        let organization = found.reference(&reference, &["Organization"]).await?.ok_or_else(|| fail(format!("the Task's {member} {reference} is not found")))?;
        let organization_id = organization["id"].as_str().unwrap_or_default().to_string();
        roles.push(practitioner_role(&ids("PractitionerRole", format!("Organization/{organization_id}:{role}")), &reference, &organization));
        if !organizations.iter().any(|o: &Value| o["id"] == organization["id"]) {
            organizations.push(organization);
        }
    }
    // The payers of the Coverage, so a receiver can tell whom the coverage is with.
    let payors: Vec<String> = coverages.iter().flat_map(|c| c["payor"].as_array().into_iter().flatten()).filter_map(|p| p["reference"].as_str().map(str::to_string)).collect();
    for reference in payors {
        if let Some(payer) = found.reference(&reference, &["Organization"]).await?
            && !organizations.iter().any(|o: &Value| o["id"] == payer["id"])
        {
            organizations.push(payer);
        }
    }
    let partner = state.partners.get(&planned.partner).ok_or_else(|| ApiError::Internal(format!("partner {} left the configuration", planned.partner)))?;
    let header_id = ids("MessageHeader", format!("referral:{referral}:message"));
    let local = |r: &Value| format!("urn:uuid:{}", r["id"].as_str().unwrap_or_default());
    let header = json!({
        "resourceType": "MessageHeader",
        "id": header_id,
        "meta": { "profile": [MESSAGE_HEADER_PROFILE] },
        "eventCoding": { "system": EVENT_SYSTEM, "code": EVENT_CODE, "display": "REF/RRI - Patient referral" },
        "destination": [{
            "name": partner.config.name,
            "endpoint": format!("{}/{PROCESS_MESSAGE_PATH}", partner.config.fhir_base.trim_end_matches('/')),
            "receiver": { "reference": local(&roles[1]) }
        }],
        "sender": { "reference": local(&roles[0]) },
        "source": { "name": "iop-gateway", "software": "iop-gateway", "version": env!("CARGO_PKG_VERSION"), "endpoint": state.base_url },
        "focus": [{ "reference": local(&task) }]
    });
    let candidates = Candidates { task, service_request, patient, coverages, summary, consents, organizations, practitioner_roles: roles };
    let mut entries = vec![entry(header)];
    let content = chosen_content(candidates);
    // Stored resources name each other `Type/id`; inside the message they point at the entries' full URLs.
    let local: std::collections::HashMap<String, String> =
        content.iter().map(|r| (format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default()), local(r))).collect();
    entries.extend(content.into_iter().map(|mut r| {
        if r["resourceType"] != "Bundle" {
            to_entries(&mut r, &local);
        }
        entry(without_version(r))
    }));
    let bundle = json!({
        "resourceType": "Bundle",
        "id": ids("Bundle", format!("referral:{referral}:message")),
        "meta": { "profile": [MESSAGE_BUNDLE_PROFILE] },
        "type": "message",
        "timestamp": crate::api::fhir::now_instant(),
        "entry": entries
    });
    let bundle = write::validate(state, Json::from(&bundle), Vec::new()).await.map_err(|e| match e {
        ApiError::Unprocessable(issues) => ApiError::Unprocessable(
            issues.into_iter().map(|i| Issue { message: format!("the step-down referral message, at {}: {}", i.expression, i.message), expression: at.clone(), ..i }).collect(),
        ),
        other => other,
    })?;
    Ok(Some(NewMessage {
        id: String::new(),
        partner: planned.partner.clone(),
        subject: format!("referral:{referral}"),
        kind: REFERRAL.to_string(),
        record_type: "referral".into(),
        record_id: referral.clone(),
        payload: bundle.to_string_compact(),
    }))
}

/// Resources of the batch first (what this intake maps), else the stored ones.
struct Found<'a, 't> {
    tx: &'t mut Tx,
    batch: &'a [Value],
}

impl Found<'_, '_> {
    async fn get(&mut self, resource_type: &str, id: &str) -> Result<Option<Value>, ApiError> {
        if let Some(r) = self.batch.iter().find(|r| r["resourceType"] == resource_type && r["id"] == id) {
            return Ok(Some(r.clone()));
        }
        let stored = self.tx.current(resource_type, id).await?;
        Ok(stored.and_then(|s| serde_json::from_str(&s.body).ok()))
    }

    /// The resource a reference names, of one of `types`: `Type/id`, or `urn:uuid:<id>` as the mappings write them.
    async fn reference(&mut self, reference: &str, types: &[&str]) -> Result<Option<Value>, ApiError> {
        for resource_type in types {
            if let Some(id) = target_id(reference, resource_type)
                && let Some(found) = self.get(resource_type, id).await?
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// The id a reference names if it can name a `resource_type`: `Type/id` (relative or absolute) or `urn:uuid:<id>`.
fn target_id<'r>(reference: &'r str, resource_type: &str) -> Option<&'r str> {
    if let Some(id) = reference.strip_prefix("urn:uuid:") {
        return Some(id);
    }
    let (before, id) = reference.rsplit_once('/')?;
    (before == resource_type || before.ends_with(&format!("/{resource_type}"))).then_some(id)
}

/// The PractitionerRole BSeR's MessageHeader names as sender or receiver: the facility's role in the referral, reachable at its contact.
fn practitioner_role(id: &str, organization_ref: &str, organization: &Value) -> Value {
    let mut role = json!({
        "resourceType": "PractitionerRole",
        "id": id,
        "active": true,
        "organization": { "reference": organization_ref }
    });
    if let Some(name) = organization["name"].as_str() {
        role["organization"]["display"] = json!(name);
    }
    if let Some(telecom) = organization["contact"][0]["telecom"].as_array() {
        role["telecom"] = Value::Array(telecom.clone());
    }
    role
}

/// Writes each reference to a resource of the message (`Type/id`) as that entry's full URL.
fn to_entries(value: &mut Value, local: &std::collections::HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (name, member) in object.iter_mut() {
                match member {
                    Value::String(reference) if name == "reference" => {
                        if let Some(url) = local.get(reference.as_str()) {
                            *member = Value::String(url.clone());
                        }
                    }
                    other => to_entries(other, local),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| to_entries(i, local)),
        _ => {}
    }
}

/// A message entry. The full URL is `urn:uuid:<id>`, the form the mappings' references take, so the references between entries resolve inside the message.
fn entry(resource: Value) -> Value {
    json!({ "fullUrl": format!("urn:uuid:{}", resource["id"].as_str().unwrap_or_default()), "resource": resource })
}

/// A stored resource as it travels: without the gateway's version bookkeeping, so the same content is the same message.
fn without_version(mut resource: Value) -> Value {
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().map(|o| o.remove("meta"));
        }
    }
    resource
}

/// The provider took the message: it is delivered, with its answer kept for operators.
pub async fn delivered(state: &AppState, message: &Message, owner: &str, status: u16, body: &str) -> Result<bool, ApiError> {
    super::outbox::finish(state, message, owner, MessageStatus::Delivered, status, "", body).await
}

/// The provider refused the message (or it was given up on): a dead letter, for an operator to replay.
pub async fn refused(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, ApiError> {
    super::outbox::finish(state, message, owner, MessageStatus::Dead, status, reason, body).await
}


/// After a Task version is written by someone other than its owner (the provider answering): when it
/// is the Task of an outbound (step-down) referral, the outbound referral record follows it in the
/// same transaction — its status read back by `referral.from-fhir`, and `status_reason` from the
/// Task's `statusReason`. A progress the record cannot say (a Task status `referral.from-fhir` has no
/// status for) refuses the write, so the record never disagrees with the Task.
pub async fn task_changed(tx: &mut Tx, state: &AppState, task: &Json) -> Result<(), Failure> {
    let task = Value::from(task);
    let Some(focus) = task["focus"]["reference"].as_str().and_then(|r| target_id(r, "ServiceRequest")) else { return Ok(()) };
    let Some(service_request) = tx.current("ServiceRequest", focus).await.map_err(ApiError::from)? else { return Ok(()) };
    let service_request: Value = serde_json::from_str(&service_request.body).unwrap_or_default();
    let outbound = service_request["category"].as_array().into_iter().flatten().flat_map(|c| c["coding"].as_array().into_iter().flatten()).any(|c| c["system"] == DIRECTION_SYSTEM && c["code"] == "outbound");
    if !outbound {
        return Ok(());
    }
    let Some(referral_id) = referral_id(&service_request) else { return Ok(()) };
    let Some(stored) = tx.record("referral", &referral_id, "outbound").await.map_err(ApiError::from)? else { return Ok(()) };
    let mut entries = vec![task.clone(), service_request];
    for (member, resource_type) in [("requester", "Organization"), ("owner", "Organization"), ("for", "Patient")] {
        if let Some(id) = task[member]["reference"].as_str().and_then(|r| target_id(r, resource_type))
            && let Some(found) = tx.current(resource_type, id).await.map_err(ApiError::from)?
            && let Ok(resource) = serde_json::from_str::<Value>(&found.body)
        {
            entries.push(resource);
        }
    }
    // Full URLs in the mappings' form, so `resolve()` finds what the Task and ServiceRequest reference.
    let bundle = json!({ "resourceType": "Bundle", "type": "collection", "entry": entries.into_iter().map(entry).collect::<Vec<_>>() });
    let mapped = state.mappings.fhir_to_records(&Json::from(&bundle));
    let Some(read) = mapped.output.iter().find(|r| r.get("record_type").and_then(Json::as_str) == Some("referral") && r.get("id").and_then(Json::as_str) == Some(referral_id.as_str())) else {
        let why = mapped.issues.iter().map(|i| format!("{}: {}", i.path, i.message)).collect::<Vec<_>>().join("; ");
        return Err(ApiError::Unprocessable(vec![Issue::error(IssueCode::Processing, "Task", format!("the Task's progress does not read back as a referral status ({why})"))]).into());
    };
    let mut record: Value = serde_json::from_str(&stored.body).unwrap_or_default();
    record["status"] = Value::from(read).get("status").cloned().unwrap_or(Value::Null);
    match read.get("status_reason").and_then(Json::as_str) {
        Some(reason) => record["status_reason"] = json!(reason),
        None => {
            record.as_object_mut().map(|o| o.remove("status_reason"));
        }
    }
    let record = Json::from(&record);
    tx.put_record(&super::intake::row(&record, "outbound", &crate::api::fhir::now_instant())).await.map_err(ApiError::from)?;
    Ok(())
}

/// The status a step-down referral is sent with; the provider's answers move it on from there.
const SENT: &str = "requested";

/// A re-post of an outbound referral the provider has answered must not move it backwards. The
/// clinic re-posts the same records (a discharge batch sent again) with the status it first sent,
/// `requested`, while the stored record follows the provider's Task ([`task_changed`]): when the
/// posted record is the stored one apart from that progress (`status`, `status_reason`), it is
/// taken with the stored progress, so the record, the ServiceRequest and the Task mapping makes of
/// it say what the provider said. Returns the ids of the referrals kept so; [`keep_task_progress`]
/// then keeps the rest of the Task's progress. Any other change the clinic posts applies as posted.
pub async fn keep_progress(state: &AppState, records: &mut [Json]) -> Result<Vec<String>, ApiError> {
    let mut kept = Vec::new();
    for record in records.iter_mut() {
        if text(record, "record_type") != "referral" || text(record, "direction") != "outbound" || text(record, "status") != SENT {
            continue;
        }
        let id = text(record, "id");
        let Some(stored) = state.store.record("referral", &id, "outbound").await? else { continue };
        if stored.status == SENT {
            continue;
        }
        let Ok(stored) = serde_json::from_str::<Value>(&stored.body) else { continue };
        let without_progress = |r: &Value| {
            let mut r = r.clone();
            r.as_object_mut().map(|o| ["status", "status_reason"].map(|m| o.remove(m)));
            r
        };
        if without_progress(&stored) != without_progress(&Value::from(&*record)) {
            continue;
        }
        if let Some(object) = record.as_object_mut() {
            for member in ["status", "status_reason"] {
                match stored.get(member) {
                    Some(value) => object.insert(member, Json::from(value)),
                    None => {
                        object.remove(member);
                    }
                }
            }
        }
        kept.push(id);
    }
    Ok(kept)
}

/// The Tasks of referrals [`keep_progress`] kept, in the mapped transaction: the provider's progress
/// (every member it may report, `output` and `note` included, which no record carries) taken from
/// the stored Task, so re-writing the Task keeps what the provider set. The Task carries the version
/// it was read at as `meta.versionId`: a provider's answer that lands before the intake's write is
/// then taken inside the write's transaction ([`keep_owner_progress`]).
pub async fn keep_task_progress(state: &AppState, transaction: &mut Json, kept: &[String]) -> Result<(), ApiError> {
    for referral in kept {
        let task_id = state.mappings.resource_id("Task", &format!("referral:{referral}:task"));
        let Some(stored) = state.store.read("Task", &task_id).await? else { continue };
        let stored_version = stored.version;
        let stored = crate::json::parse(stored.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored Task does not parse: {e}")))?;
        let Some(Json::Array(entries)) = transaction.as_object_mut().and_then(|b| b.get_mut("entry")) else { continue };
        for entry in entries.iter_mut() {
            let Some(task) = entry.as_object_mut().and_then(|e| e.get_mut("resource")) else { continue };
            if task.get("resourceType").and_then(Json::as_str) != Some("Task") || task.get("id").and_then(Json::as_str) != Some(task_id.as_str()) {
                continue;
            }
            let Some(object) = task.as_object_mut() else { continue };
            for member in PROGRESS_MEMBERS {
                match stored.get(member) {
                    Some(value) => object.insert(*member, value.clone()),
                    None => {
                        object.remove(member);
                    }
                }
            }
            let mut meta = object.get("meta").and_then(Json::as_object).cloned().unwrap_or_default();
            meta.insert("versionId", Json::string(stored_version.to_string()));
            object.insert("meta", Json::Object(meta));
        }
    }
    Ok(())
}

/// Inside the write transaction of a Task by someone other than the Organization it is assigned to
/// (the program re-posting a step-down referral): when the Task carries the progress of the version
/// its `meta.versionId` names unchanged, and the Task has moved on since (the provider answered in
/// between), the current version's progress is written instead, so the provider's answer is never
/// overwritten by what was read before it. A writer that changes the progress applies its own.
pub async fn keep_owner_progress(state: &AppState, principal_organization: &str, current: &crate::store::Stored, before: &Json, resource: &mut Json) -> Result<(), ApiError> {
    let Some(based_on) = resource.get("meta").and_then(|m| m.get("versionId")).and_then(Json::as_str).and_then(|v| v.parse::<i64>().ok()) else { return Ok(()) };
    if based_on >= current.version || referral_id(&Value::from(&*resource)).is_none() {
        return Ok(());
    }
    let assignee = before.get("owner").and_then(|o| o.get("reference")).and_then(Json::as_str).unwrap_or_default();
    if target_id(assignee, "Organization").is_some_and(|id| principal_organization.strip_prefix("Organization/") == Some(id)) {
        return Ok(());
    }
    let Some(read) = state.store.vread("Task", &current.id, based_on).await? else { return Ok(()) };
    let read = crate::json::parse(read.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored Task does not parse: {e}")))?;
    // As values: a client's JSON may order members differently from the stored version's.
    if PROGRESS_MEMBERS.iter().any(|m| read.get(m).map(Value::from) != resource.get(m).map(Value::from)) {
        return Ok(());
    }
    let Some(object) = resource.as_object_mut() else { return Ok(()) };
    for member in PROGRESS_MEMBERS {
        match before.get(member) {
            Some(value) => object.insert(*member, value.clone()),
            None => {
                object.remove(member);
            }
        }
    }
    Ok(())
}

/// Stores a posted record in the intake's transaction. An outbound referral [`keep_progress`] kept
/// takes its status as stored now, in this transaction: [`task_changed`] wrote it with the
/// provider's last answer, which may have landed after `keep_progress` read it.
pub async fn put_record(tx: &mut Tx, record: &Json, kept: &[String], now: &str) -> Result<(), ApiError> {
    let kept_here = text(record, "record_type") == "referral" && text(record, "direction") == "outbound" && kept.contains(&text(record, "id"));
    let stored = if kept_here { tx.record("referral", &text(record, "id"), "outbound").await? } else { None };
    let Some(stored) = stored.and_then(|s| crate::json::parse(s.body.as_bytes()).ok()) else {
        tx.put_record(&super::intake::row(record, "outbound", now)).await?;
        return Ok(());
    };
    let mut record = record.clone();
    if let Some(object) = record.as_object_mut() {
        for member in ["status", "status_reason"] {
            match stored.get(member) {
                Some(value) => object.insert(member, value.clone()),
                None => {
                    object.remove(member);
                }
            }
        }
    }
    tx.put_record(&super::intake::row(&record, "outbound", now)).await?;
    Ok(())
}

/// The referral's identifier (the record id) on a ServiceRequest or Task.
fn referral_id(resource: &Value) -> Option<String> {
    resource["identifier"].as_array()?.iter().find(|i| i["system"] == REFERRAL_ID_SYSTEM)?["value"].as_str().map(str::to_string)
}

/// A provider's feedback message read: the referral message it answers and the Task as the provider now has it.
#[derive(Clone, Debug)]
pub struct Feedback {
    /// `MessageHeader.response.identifier`: the id of the referral message's MessageHeader.
    pub answers: String,
    /// The Task's id at the gateway (the one the referral message carried).
    pub task_id: String,
    pub task: Value,
}

impl Feedback {
    /// Reads a response message (its MessageHeader has `response`): the header names the referral
    /// message it answers, and the Task (the header's focus, else the message's first Task) carries
    /// the provider's progress. The error says what is missing and where.
    pub fn read(header: &Json, resources: &[(Option<String>, Json)]) -> Result<Feedback, ApiError> {
        let header = Value::from(header);
        let answers = header["response"]["identifier"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("MessageHeader.response.identifier", "a response message must name the message it answers"))?;
        let focus = header["focus"][0]["reference"].as_str().unwrap_or_default();
        let tasks: Vec<(Option<&String>, Value)> = resources.iter().map(|(url, r)| (url.as_ref(), Value::from(r))).filter(|(_, r)| r["resourceType"] == "Task").collect();
        let named = tasks.iter().find(|(url, r)| {
            let id = r["id"].as_str().unwrap_or_default();
            !focus.is_empty() && (url.is_some_and(|u| u == focus) || target_id(focus, "Task") == Some(id))
        });
        let (_, task) = named.or(tasks.first()).cloned().ok_or_else(|| invalid("Bundle.entry", "a referral feedback message carries the referral's Task with its progress"))?;
        let task_id = task["id"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("Task.id", "the Task must keep the id the referral message gave it"))?.to_string();
        Ok(Feedback { answers: answers.to_string(), task_id, task })
    }

    /// The Task's next version: the stored Task with the provider's progress (its `status`,
    /// `statusReason`, `businessStatus`, …) taken from the feedback; a progress member the feedback
    /// leaves out is no longer set. Refused unless the message answers a referral message the gateway
    /// sent for this Task.
    pub async fn next_task(&self, tx: &mut Tx, current: &Json) -> Result<Json, ApiError> {
        // Worked on the stored JSON itself, so every member the provider may not change stays exactly as stored.
        let mut next = current.clone();
        let referral = referral_id(&Value::from(current)).ok_or_else(|| invalid("Task.identifier", "the Task is not a referral the gateway sent"))?;
        let sent = tx.messages_for_record("referral", &referral).await?;
        let answered = sent.iter().filter(|m| m.new.kind == REFERRAL).any(|m| {
            let payload: Value = serde_json::from_str(&m.new.payload).unwrap_or_default();
            payload["entry"][0]["resource"]["id"].as_str() == Some(self.answers.as_str())
        });
        if !answered {
            return Err(invalid("MessageHeader.response.identifier", &format!("'{}' names no referral message the gateway sent for Task/{}", self.answers, self.task_id)));
        }
        let object = next.as_object_mut().ok_or_else(|| ApiError::Internal("a stored Task is not an object".into()))?;
        object.remove("meta");
        for member in PROGRESS_MEMBERS {
            match self.task.get(*member) {
                Some(value) => object.insert(*member, Json::from(value)),
                None => {
                    object.remove(member);
                }
            }
        }
        Ok(next)
    }
}

fn invalid(expression: &str, message: &str) -> ApiError {
    ApiError::Unprocessable(vec![Issue::error(IssueCode::Invalid, expression, message)])
}

fn text(record: &Json, member: &str) -> String {
    record.get(member).and_then(Json::as_str).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Json {
        crate::json::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_chosen_content_keeps_the_workflow_first_and_every_candidate() {
        let r = |t: &str| json!({ "resourceType": t, "id": t.to_lowercase() });
        let candidates = Candidates {
            task: r("Task"),
            service_request: r("ServiceRequest"),
            patient: Some(r("Patient")),
            coverages: vec![r("Coverage")],
            summary: Some(r("Bundle")),
            consents: vec![r("Consent")],
            organizations: vec![r("Organization")],
            practitioner_roles: vec![r("PractitionerRole")],
        };
        let types: Vec<String> = chosen_content(candidates).iter().map(|r| r["resourceType"].as_str().unwrap().to_string()).collect();
        assert_eq!(types, ["Task", "ServiceRequest", "Patient", "Coverage", "Bundle", "Consent", "Organization", "PractitionerRole"]);
    }

    #[test]
    fn feedback_names_the_message_it_answers_and_carries_the_task() {
        let header = parse(r#"{"resourceType":"MessageHeader","id":"h","response":{"identifier":"sent-1","code":"ok"},"focus":[{"reference":"Task/t-2"}]}"#);
        let other = parse(r#"{"resourceType":"Task","id":"t-1","status":"accepted"}"#);
        let task = parse(r#"{"resourceType":"Task","id":"t-2","status":"rejected"}"#);
        let read = Feedback::read(&header, &[(None, other.clone()), (Some("urn:uuid:x".into()), task)]).unwrap();
        assert_eq!((read.answers.as_str(), read.task_id.as_str(), read.task["status"].as_str()), ("sent-1", "t-2", Some("rejected")));
        let unanswered = parse(r#"{"resourceType":"MessageHeader","id":"h","response":{"code":"ok"}}"#);
        assert!(matches!(Feedback::read(&unanswered, &[(None, other)]), Err(ApiError::Unprocessable(issues)) if issues[0].expression == "MessageHeader.response.identifier"));
        assert!(Feedback::read(&header, &[]).is_err(), "no Task, nothing to follow");
    }

    #[test]
    fn references_name_their_target_in_either_form() {
        assert_eq!(target_id("urn:uuid:0b6f", "Patient"), Some("0b6f"));
        assert_eq!(target_id("Patient/p1", "Patient"), Some("p1"));
        assert_eq!(target_id("https://x.example/fhir/Patient/p1", "Patient"), Some("p1"));
        assert_eq!(target_id("Organization/o1", "Patient"), None);
        assert_eq!(target_id("p1", "Patient"), None);
    }

    #[test]
    fn a_stored_resource_travels_without_its_version() {
        let r = without_version(json!({ "resourceType": "Patient", "id": "p", "meta": { "versionId": "2", "lastUpdated": "2026-01-01T00:00:00Z" } }));
        assert_eq!(r, json!({ "resourceType": "Patient", "id": "p" }));
        let kept = without_version(json!({ "resourceType": "Patient", "id": "p", "meta": { "versionId": "2", "profile": ["x"] } }));
        assert_eq!(kept["meta"], json!({ "profile": ["x"] }));
    }
}
