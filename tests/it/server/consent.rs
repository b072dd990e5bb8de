//! 42 CFR Part 2 through the real listener: one table-driven consent matrix (recipients × purposes × consent states × ways out, REST and outbound → allowed or withheld, with the § 2.32 notice, each allowed disclosure audited once), records posted through intake in their client's compartment, labels applied when stored, an enrolment labelling what was stored about its client before it, bad consents refused, and a PAS request held for consent then sent after a new consent and a replay.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::exchange::{Payer, decision, payer_config, post_records, records};
use super::referrals;
use super::support::{Gateway, TempDir, config_text, load, partner_keys};

const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// The 42 CFR § 2.32 notice (the gateway's one text of it).
const NOTICE: &str = iop_gateway::auth::labelling::NOTICE;
const PROGRAM: &str = "Organization/iop-program";
/// The export worker starts a job once the request timeout has passed.
const FAST: &str = "request_timeout_secs = 2\n[export]\nretry_after_secs = 1\n";

/// What the patient's consent (if any) says, and whether it permits its recipient for its purpose now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    None,
    Active,
    Expired,
    /// Active, then updated to `inactive`.
    Revoked,
    /// A permit whose nested provision denies the same.
    DenyProvision,
    /// A permit for data labelled HIV only (the record is SUD).
    LabelRestricted,
}

const STATES: &[(State, bool)] = &[
    (State::None, false),
    (State::Active, true),
    (State::Expired, false),
    (State::Revoked, false),
    (State::DenyProvision, false),
    (State::LabelRestricted, false),
];

/// Who the consent names for a recipient's patients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Named {
    /// The program owns the data: its use is not a disclosure.
    Owner,
    /// The consent names this recipient.
    Itself,
    /// The consent names the referring unit, not this one.
    AnotherUnit,
}

/// Recipients: (client, organization, its configured purpose of use, whom the consent names).
fn recipients() -> Vec<(&'static str, String, &'static str, Named)> {
    vec![
        ("clinic", PROGRAM.to_string(), "TREAT", Named::Owner),
        ("unit-a", "Organization/unit-a".to_string(), "TREAT", Named::Itself),
        ("unit-b", "Organization/unit-b".to_string(), "TREAT", Named::AnotherUnit),
        // A referring unit whose hospital hears by feedback messages (`referral_updates = "message"`).
        ("unit-c", "Organization/unit-c".to_string(), "TREAT", Named::Itself),
        ("stepdown", stepdown_organization(), "TREAT", Named::Itself),
        ("payer-x", "Organization/payer-x".to_string(), "HPAYMT", Named::Itself),
    ]
}

/// The purposes a consent is given for.
const PURPOSES: &[&str] = &["TREAT", "HPAYMT"];

/// Ways out of the gateway, each with one driver in [`way_out`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Read,
    Search,
    Include,
    Everything,
    Export,
    /// A full-resource notification of the recipient's Subscription to referral-task-changed, about a Part 2 Task.
    Notification,
    /// A PAS request to the payer for an authorization with a substance-use diagnosis.
    Pas,
    /// A BSeR step-down referral message to the provider, at the discharge of a client enrolled in a substance-use program.
    StepDown,
    /// The referral feedback to the unit that referred a client enrolled in a substance-use program:
    /// at its discharge, the feedback document and the unit's Task naming it, `PUT` at the unit.
    Feedback,
    /// The same feedback to a unit that hears by messages: one feedback message (its Task and the
    /// document) to the unit's `$process-message`.
    FeedbackMessage,
}

const WAYS: &[Way] = &[Way::Read, Way::Search, Way::Include, Way::Everything, Way::Export, Way::Notification, Way::Pas, Way::StepDown, Way::Feedback, Way::FeedbackMessage];

/// Which ways out reach a recipient: a payer touches no ServiceRequest and is the only one sent PAS requests.
fn reaches(client: &str, way: Way) -> bool {
    match way {
        Way::Pas => client == "payer-x",
        Way::StepDown => client == "stepdown",
        Way::Feedback => client == "unit-a",
        Way::FeedbackMessage => client == "unit-c",
        Way::Notification => true,
        _ => client != "payer-x",
    }
}

/// The expected answer of one row.
fn allowed(named: Named, recipient_purpose: &str, consent_purpose: &str, permits: bool) -> bool {
    match named {
        Named::Owner => true,
        Named::AnotherUnit => false,
        Named::Itself => permits && recipient_purpose == consent_purpose,
    }
}

/// One patient per row: what was stored for it.
struct Row {
    client: &'static str,
    state: State,
    consent_purpose: &'static str,
    recipient_purpose: &'static str,
    expect: bool,
    patient: String,
    /// The Part 2 record (a ServiceRequest for a substance-use diagnosis); none for the payer.
    record: String,
    /// A Task based on the record, itself not Part 2 (for `_include`).
    include_task: String,
    /// The Part 2 Task the recipient's Subscription is notified of.
    notice_task: String,
    /// The authorization whose PAS request goes to the payer (payer rows).
    authorization: String,
    /// The client discharged with a step-down referral (step-down rows): its Patient, under the same
    /// consent, the referral's Task and its ServiceRequest (addressed to the provider, so exported to it too).
    stepped_down: Option<(String, String, String)>,
    /// The client the unit referred, discharged (referring-unit rows): its Patient, under the same
    /// consent, the referral's id and the Task id the unit gave it.
    fed_back: Option<(String, String, String)>,
    disclosure: bool,
}

impl Row {
    fn patients(&self) -> Vec<&str> {
        let mut patients = vec![self.patient.as_str()];
        patients.extend(self.stepped_down.as_ref().map(|(p, ..)| p.as_str()));
        patients.extend(self.fed_back.as_ref().map(|(p, ..)| p.as_str()));
        patients
    }
}

fn consent(patient: &str, recipient: &str, purpose: &str, state: State) -> Value {
    let (start, end) = if state == State::Expired { ("2020-01-01", "2020-12-31") } else { ("2026-01-01", "2099-12-31") };
    let mut provision = json!({
        "type": "permit",
        "period": {"start": start, "end": end},
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]}, "reference": {"reference": recipient}}],
        "purpose": [{"system": ACT_REASON, "code": purpose}]
    });
    match state {
        State::DenyProvision => provision["provision"] = json!([{"type": "deny"}]),
        State::LabelRestricted => provision["securityLabel"] = json!([{"system": ACT_CODE, "code": "HIV"}]),
        _ => {}
    }
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": ACT_CODE, "code": "IDSCL"}]}],
        "patient": {"reference": patient},
        "dateTime": "2026-01-05T10:00:00Z",
        "organization": [{"reference": PROGRAM}],
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "42CFRPart2"}]},
        "provision": provision
    })
}

/// The program's Part 2 record: a referral for an alcohol use disorder (ICD-10-CM F10.20), addressed to the recipient.
fn sud_referral(patient: &str, recipient: &str) -> Value {
    json!({
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": patient},
        "requester": {"reference": PROGRAM},
        "performer": [{"reference": recipient}],
        "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]}]
    })
}

/// A referral Task for an alcohol use disorder requested by the recipient (what its Subscription
/// filters on), owned by the program: Part 2 by its code, and about the row's patient.
fn sud_task(patient: &str, requester: &str) -> Value {
    json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "for": {"reference": patient}, "requester": {"reference": requester}, "owner": {"reference": PROGRAM},
        "reasonCode": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]}
    })
}

/// The step-down provider's Organization: the one the mappings make for its facility OP-RIVERBEND
/// (default id namespace), so the clinic's step-down referrals and consent records name it.
fn stepdown_organization() -> String {
    let id = iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, "Organization", "facility:OP-RIVERBEND");
    format!("Organization/{id}")
}

/// The step-down provider as a partner at `base` (BSeR `$process-message`), routed for OP-RIVERBEND.
fn stepdown_partner(base: &str) -> String {
    format!(
        "[[partners]]\nname = \"stepdown\"\nkind = \"outpatient-provider\"\nfhir_base = \"{base}\"\nroutes = [\"OP-RIVERBEND\"]\nclients = [\"stepdown\"]\nauth = \"none\"\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\n"
    )
}

/// A gateway with the test partners and a step-down provider (an outpatient client, purpose treatment).
async fn gateway(extra: &str) -> Gateway {
    gateway_on(extra, None, None).await
}

/// [`gateway`] on SQLite, or on PostgreSQL (url, schema); every client may have Subscriptions notify at `callbacks`.
async fn gateway_on(extra: &str, postgres: Option<(&str, &str)>, callbacks: Option<&str>) -> Gateway {
    let dir = TempDir::new("consent");
    let mut keys = partner_keys();
    let mut text = config_text(&dir.0, &keys, extra);
    if let Some((url, schema)) = postgres {
        text = text.replacen("[store]\n", &format!("[store]\nurl = \"{url}\"\nschema = \"{schema}\"\n"), 1);
    }
    let stepdown = iop_gateway::auth::keys::KeyPair::generate_es384("stepdown-1").unwrap();
    let jwks = dir.0.join("stepdown.jwks.json");
    std::fs::write(&jwks, stepdown.jwks_json()).unwrap();
    text.push_str(&format!(
        "[[clients]]\nid = \"stepdown\"\nrole = \"inpatient-unit\"\norganization = \"{}\"\npurpose = \"treatment\"\njwks_file = {:?}\n",
        stepdown_organization(),
        jwks.display().to_string()
    ));
    keys.push(("stepdown".into(), stepdown));
    // A second referring unit, heard back by feedback messages where the matrix configures its hospital.
    let unit = iop_gateway::auth::keys::KeyPair::generate_es384("unit-c-1").unwrap();
    let jwks = dir.0.join("unit-c.jwks.json");
    std::fs::write(&jwks, unit.jwks_json()).unwrap();
    text.push_str(&format!("[[clients]]\nid = \"unit-c\"\nrole = \"inpatient-unit\"\norganization = \"Organization/unit-c\"\njwks_file = {:?}\n", jwks.display().to_string()));
    keys.push(("unit-c".into(), unit));
    if let Some(prefix) = callbacks {
        text = text.replace("\njwks_file = ", &format!("\ncallbacks = [\"{prefix}\"]\njwks_file = "));
    }
    Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
}

fn created_id(status: u16, body: &Value) -> String {
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Stores one row: the consent of its state (first, so a notification is decided under it), then
/// for a payer an authorization with a substance-use diagnosis posted through intake (its client's
/// Patient is the row's), else a Patient managed by the recipient (so it is a party), its Part 2
/// record and a Task based on it (for `_include`); and for everyone a Part 2 Task it requested.
async fn store_row(gw: &Gateway, clinic: &str, n: usize, recipient: &(&'static str, String, &'static str, Named), consent_purpose: &'static str, state: State, expect: bool) -> Row {
    let &(client, ref organization, recipient_purpose, named) = recipient;
    let organization = organization.as_str();
    let payer = client == "payer-x";
    let patient = if payer {
        format!("Patient/{}", iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, "Patient", &format!("client:C-M{n}")))
    } else {
        let mut patient = super::support::patient(&format!("MRN-{client}-{consent_purpose}-{state:?}"));
        patient["managingOrganization"] = json!({"reference": organization});
        format!("Patient/{}", created_id_of(gw.post(clinic, "Patient", &patient).await))
    };
    let named_org = if named == Named::AnotherUnit { "Organization/unit-a" } else { organization };
    let ids = |t: &str, identity: &str| iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, t, identity);
    let stepped_down = (client == "stepdown").then(|| {
        let id = |t: &str, identity: String| format!("{t}/{}", ids(t, &identity));
        (id("Patient", format!("client:C-S{n}")), id("Task", format!("referral:REF-S{n}:task")), id("ServiceRequest", format!("referral:REF-S{n}")))
    });
    let fed_back = (client == "unit-a" || client == "unit-c").then(|| (format!("Patient/{}", ids("Patient", &format!("client:C-F{n}"))), format!("RB-RX-9{n:04}"), format!("tsk-F{n}")));
    let consented: Vec<&str> = std::iter::once(patient.as_str()).chain(stepped_down.as_ref().map(|(p, ..)| p.as_str())).chain(fed_back.as_ref().map(|(p, ..)| p.as_str())).collect();
    for patient in consented.into_iter().filter(|_| state != State::None) {
        let body = consent(patient, named_org, consent_purpose, state);
        let id = created_id_of(gw.post(clinic, "Consent", &body).await);
        if state == State::Revoked {
            let mut revoked = body.clone();
            revoked["id"] = json!(id);
            revoked["status"] = json!("inactive");
            let (status, updated) = gw.put(clinic, &format!("Consent/{id}"), &revoked).await;
            assert_eq!(status, 200, "{updated}");
        }
    }
    if stepped_down.is_some() {
        // The client, enrolled in a substance-use program, then discharged with a step-down referral to the provider.
        let rename = |v: Value| -> Value {
            let text = v.to_string().replace("C-1004", &format!("C-S{n}")).replace("MRN-000454", &format!("MRN-S{n}")).replace("REF-1004-OUT", &format!("REF-S{n}"));
            serde_json::from_str(&text.replace("-1004", &format!("-S{n}"))).unwrap()
        };
        let mut episode = rename(records("discharge/completed-with-summary.json"));
        episode[0]["coverage"] = json!({"payer_id": "PAYER-77", "payer_name": "Synthetic Health Plan", "member_id": format!("MBR-S{n}"), "relationship": "self", "start": "2026-01-01"});
        let mut sud = records("enrollment/discharged-sud.json");
        sud["client_id"] = json!(format!("C-S{n}"));
        sud["id"] = json!(format!("ENR-SUD-S{n}"));
        let (status, summary) = post_records(gw, clinic, &json!([episode[0].clone(), sud])).await;
        assert_eq!(status, 200, "{summary}");
        let (status, summary) = post_records(gw, clinic, &episode).await;
        assert_eq!(status, 200, "{summary}");
    }
    if let Some((_, referral, task)) = &fed_back {
        // The unit refers the client; the clinic enrols it in a substance-use program (so everything about
        // it is Part 2), then its episode, tied to the referral by its enrollment, ends with a completed discharge.
        let message: Value = serde_json::from_str(&referrals::fixture("referral-message.json").to_string().replace("40117", &referral[6..]).replace("tsk-8812", task).replace("50210", &format!("6{n:04}"))).unwrap();
        let (status, answer) = gw.post(&gw.token(client).await, "$process-message", &message).await;
        assert_eq!(status, 200, "{answer}");
        let rename = |v: Value| -> Value { serde_json::from_str(&v.to_string().replace("-1004", &format!("-F{n}")).replace("MRN-000454", &format!("MRN-F{n}"))).unwrap() };
        let mut episode: Vec<Value> = rename(records("discharge/completed-with-summary.json")).as_array().cloned().unwrap();
        for record in &mut episode {
            match record["record_type"].as_str() {
                Some("enrollment") => record["referral_id"] = json!(referral),
                Some("discharge") => drop(record.as_object_mut().unwrap().remove("step_down_referral_id")),
                _ => {}
            }
        }
        let mut sud = records("enrollment/discharged-sud.json");
        sud["client_id"] = json!(format!("C-F{n}"));
        sud["id"] = json!(format!("ENR-SUD-F{n}"));
        let (status, summary) = post_records(gw, clinic, &json!([episode[0].clone(), sud])).await;
        assert_eq!(status, 200, "{summary}");
        let (status, summary) = post_records(gw, clinic, &Value::Array(episode)).await;
        assert_eq!(status, 200, "{summary}");
    }
    let (mut record, mut include_task, mut authorization) = (String::new(), String::new(), String::new());
    if payer {
        let text = records("authorization/initial.json").to_string().replace("C-1001", &format!("C-M{n}")).replace("MRN-000451", &format!("MRN-M{n}")).replace("AUTH-1001-1", &format!("AUTH-M{n}"));
        let mut input: Value = serde_json::from_str(&text).unwrap();
        input[2]["diagnoses"] = json!([{"code": "F10.20"}]);
        let (status, summary) = post_records(gw, clinic, &input).await;
        assert_eq!(status, 200, "{summary}");
        authorization = format!("AUTH-M{n}");
    } else {
        record = format!("ServiceRequest/{}", created_id_of(gw.post(clinic, "ServiceRequest", &sud_referral(&patient, organization)).await));
        let task = json!({"resourceType": "Task", "status": "requested", "intent": "order", "basedOn": [{"reference": record}], "for": {"reference": patient}, "owner": {"reference": organization}});
        include_task = created_id_of(gw.post(clinic, "Task", &task).await);
    }
    let notice_task = format!("Task/{}", created_id_of(gw.post(clinic, "Task", &sud_task(&patient, organization)).await));
    Row { client, state, consent_purpose, recipient_purpose, expect, patient, record, include_task, notice_task, authorization, stepped_down, fed_back, disclosure: expect && named != Named::Owner }
}

fn created_id_of((status, body): (u16, Value)) -> String {
    created_id(status, &body)
}

/// What left the gateway by the ways that are not answers to the recipient's requests.
struct Sent {
    /// Each client's system-level export.
    exported: BTreeMap<&'static str, HashSet<String>>,
    /// Per client, the `Task/<id>` of every event notification its Subscription received.
    notified: BTreeMap<String, HashSet<String>>,
    /// The `Task/<id>` of every step-down referral message the provider received.
    referred: HashSet<String>,
    /// What the referring unit received: `PUT` path → body.
    fed_back: BTreeMap<String, Value>,
    /// The feedback messages the unit that hears by messages received.
    messages: Vec<Value>,
}

/// Whether the row's record left the gateway by `way` (its driver).
async fn way_out(gw: &Gateway, token: &str, row: &Row, way: Way, sent: &Sent) -> bool {
    let record_id = row.record.trim_start_matches("ServiceRequest/");
    let contains = |bundle: &Value| bundle["entry"].as_array().is_some_and(|e| e.iter().any(|e| e["resource"]["id"] == record_id));
    match way {
        Way::Read => {
            let response = gw.http.get(gw.url(&row.record)).bearer_auth(token).header("accept", "application/fhir+json").send().await.unwrap();
            let status = response.status().as_u16();
            let notice = response.headers().get(iop_gateway::api::part2::NOTICE_HEADER).map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap();
            assert!(status == 200 || status == 404, "{status}: {body}");
            if status == 200 && row.client != "clinic" {
                assert!(body["meta"]["security"].as_array().unwrap().iter().any(|c| c["code"] == "NORDSCLCD"), "the refrain: {body}");
                assert_eq!(notice.as_deref(), Some(NOTICE), "the § 2.32 notice goes with a disclosure");
            } else {
                assert_eq!(notice, None, "no notice without a disclosure");
            }
            status == 200
        }
        Way::Search => {
            let (status, body) = gw.get(token, &format!("ServiceRequest?patient={}", row.patient)).await;
            assert_eq!(status, 200, "{body}");
            let found = contains(&body);
            assert_eq!(body["total"], json!(u64::from(found)), "the total counts only what is served: {body}");
            found
        }
        Way::Include => {
            let (status, body) = gw.get(token, &format!("Task?_id={}&_include=Task:based-on", row.include_task)).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["total"], 1, "the Task itself is not Part 2: {body}");
            contains(&body)
        }
        Way::Everything => {
            let (status, body) = gw.get(token, &format!("{}/$everything", row.patient)).await;
            assert_eq!(status, 200, "{body}");
            contains(&body)
        }
        Way::Export => sent.exported[row.client].contains(&row.record),
        Way::Notification => sent.notified.get(row.client).is_some_and(|tasks| tasks.contains(&row.notice_task)),
        Way::StepDown => row.stepped_down.as_ref().is_some_and(|(_, task, _)| sent.referred.contains(task)),
        Way::Feedback => {
            let Some((_, referral, task)) = &row.fed_back else { return false };
            let Some(put) = sent.fed_back.get(&format!("/riverbend/Task/{task}")) else {
                // Withheld: the unit's Task and the document cannot go without the client's Part 2 data, so both are held.
                let held = dead_letters(gw, referral, 2).await;
                assert!(held.iter().all(|m| m["last_error"].as_str().unwrap_or_default().starts_with("consent required")), "{held:?}");
                assert!(!sent.fed_back.values().any(|b| b["id"] == task.as_str()), "nothing of {referral} reached the unit");
                // Nor can the unit read at the gateway how its referral went.
                let (status, body) = gw.get(token, &format!("Task/{task}")).await;
                assert_eq!(status, 404, "the unit reads its referral's Task without consent: {body}");
                return false;
            };
            assert_eq!((put["status"].as_str(), put["businessStatus"]["coding"][0]["code"].as_str()), (Some("completed"), Some("7.0")), "{put}");
            let document = put["output"][0]["valueReference"]["reference"].as_str().and_then(|d| sent.fed_back.get(&format!("/riverbend/{d}")));
            let document = document.unwrap_or_else(|| panic!("the document the Task names reached the unit: {put}"));
            let refrain = |r: &Value| r["meta"]["security"].as_array().is_some_and(|a| a.iter().any(|c| c["code"] == "NORDSCLCD"));
            assert!(refrain(put) && carries_notice(put), "the Task discloses Part 2 data: {put}");
            assert!(carries_notice(document) && document["entry"].as_array().unwrap().iter().all(|e| refrain(&e["resource"])), "the document discloses Part 2 data: {document}");
            true
        }
        Way::FeedbackMessage => {
            let Some((_, referral, task)) = &row.fed_back else { return false };
            // A message is the unit's by the Task its header is about (at the unit's base).
            let focus = format!("/hillcrest/Task/{task}");
            let about: Vec<&Value> = sent.messages.iter().filter(|m| m["entry"][0]["resource"]["focus"].as_array().is_some_and(|f| f.iter().any(|f| f["reference"].as_str().is_some_and(|r| r.ends_with(&focus))))).collect();
            if about.is_empty() {
                // Withheld: even its header alone would tell the unit the client is in the program, so the message is held.
                let held = dead_letters(gw, referral, 1).await;
                let reason = held[0]["last_error"].as_str().unwrap_or_default();
                assert!(reason.starts_with("consent required") && reason.contains("may not go to Organization/unit-c"), "held for what it would disclose: {held:?}");
                let (status, body) = gw.get(token, &format!("Task/{task}")).await;
                assert_eq!(status, 404, "the unit reads its referral's Task without consent: {body}");
                return false;
            }
            assert_eq!(about.len(), 1, "one feedback message for the discharge: {about:?}");
            let message = about[0];
            assert!(carries_notice(message), "the message discloses Part 2 data, with the notice: {}", message["meta"]);
            let refrain = |r: &Value| r["meta"]["security"].as_array().is_some_and(|a| a.iter().any(|c| c["code"] == "NORDSCLCD"));
            let entries: Vec<&Value> = message["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).collect();
            let sent_task = entries.iter().find(|r| r["resourceType"] == "Task").unwrap_or_else(|| panic!("the Task goes with its feedback: {message}"));
            assert_eq!((sent_task["status"].as_str(), sent_task["businessStatus"]["coding"][0]["code"].as_str()), (Some("completed"), Some("7.0")), "{sent_task}");
            assert!(refrain(sent_task), "the Task discloses Part 2 data: {sent_task}");
            let document = entries.iter().find(|r| r["resourceType"] == "Bundle").unwrap_or_else(|| panic!("the document goes with the Task naming it: {message}"));
            // The document inside the message carries the refrain, and so does each of its entries (each is read on its own once received).
            assert!(refrain(document), "the document discloses Part 2 data: {}", document["meta"]);
            let held: Vec<&Value> = document["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).collect();
            assert!(!held.is_empty() && held.iter().all(|r| refrain(r)), "every entry of the document carries the refrain: {document}");
            true
        }
        Way::Pas => {
            let outcome = if row.expect { "certified" } else { "error" };
            let decided = decision(gw, token, &row.authorization, outcome).await;
            if !row.expect {
                assert!(decided["issues"][0]["text"].as_str().unwrap_or_default().starts_with("consent required"), "{decided}");
            }
            row.expect
        }
    }
}

/// The referral `referral`'s outbox messages held as dead letters, once there are `n` (bounded wait).
async fn dead_letters(gw: &Gateway, referral: &str, n: usize) -> Vec<Value> {
    let ops = gw.token("ops").await;
    let mut held = Vec::new();
    for _ in 0..100 {
        let (status, dead) = gw.get(&ops, "admin/outbox?status=dead").await;
        assert_eq!(status, 200, "{dead}");
        held = dead.as_array().unwrap().iter().filter(|m| m["record_id"] == referral).cloned().collect();
        if held.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.len(), n, "{referral}: {held:?}");
    held
}

/// What the referring unit that hears by Task updates received: each `PUT`'s path and body.
async fn fed_back(unit: &MockServer) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for request in unit.received_requests().await.unwrap().into_iter().filter(|r| r.url.path().starts_with("/riverbend/")) {
        assert_eq!(request.method.as_str(), "PUT", "{}", request.url);
        out.insert(request.url.path().to_string(), serde_json::from_slice(&request.body).unwrap_or_default());
    }
    out
}

/// The feedback messages the referring unit that hears by messages received.
async fn feedback_messages(unit: &MockServer) -> Vec<Value> {
    let mut out = Vec::new();
    for request in unit.received_requests().await.unwrap().into_iter().filter(|r| r.url.path().starts_with("/hillcrest/")) {
        assert_eq!((request.method.as_str(), request.url.path()), ("POST", "/hillcrest/$process-message"));
        out.push(serde_json::from_slice(&request.body).unwrap_or_default());
    }
    out
}

/// The Part 2 Tasks each client's endpoint was notified of (full resource, with the refrain when disclosed).
async fn notified(hooks: &MockServer) -> BTreeMap<String, HashSet<String>> {
    let mut out: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for request in hooks.received_requests().await.unwrap() {
        let bundle: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let parameters = bundle["entry"][0]["resource"]["parameter"].as_array().cloned().unwrap_or_default();
        if !parameters.iter().any(|p| p["name"] == "type" && p["valueCode"] == "event-notification") {
            continue;
        }
        let client = request.url.path().trim_start_matches("/hooks/").to_string();
        for entry in bundle["entry"].as_array().into_iter().flatten().skip(1) {
            let task = &entry["resource"];
            if task["resourceType"] == "Task" {
                let refrain = task["meta"]["security"].as_array().is_some_and(|a| a.iter().any(|c| c["code"] == "NORDSCLCD"));
                assert!(refrain || client == "clinic", "a disclosed Task carries the refrain: {task}");
                assert_eq!(carries_notice(&bundle), client != "clinic", "the notice goes with a disclosure, on the notification: {bundle}");
                out.entry(client.clone()).or_default().insert(format!("Task/{}", task["id"].as_str().unwrap()));
            }
        }
    }
    out
}

/// Whether a message carries the § 2.32 notice the DS4P way: the text of DS4P's `display` extension on its `meta`.
fn carries_notice(message: &Value) -> bool {
    message["meta"]["extension"].as_array().is_some_and(|a| {
        a.iter().any(|e| e["url"] == "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-display" && e["valueAnnotation"]["text"] == NOTICE)
    })
}

/// The referral Tasks of the step-down referral messages the provider received; each carries the notice.
async fn referred(provider: &MockServer) -> HashSet<String> {
    let mut out = HashSet::new();
    for request in provider.received_requests().await.unwrap() {
        let message: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        assert!(carries_notice(&message), "a referral message discloses Part 2 data, with the notice: {}", message["meta"]);
        for entry in message["entry"].as_array().into_iter().flatten() {
            if entry["resource"]["resourceType"] == "Task" {
                assert!(entry["resource"]["meta"]["security"].as_array().is_some_and(|a| a.iter().any(|c| c["code"] == "NORDSCLCD")), "{entry}");
                out.insert(format!("Task/{}", entry["resource"]["id"].as_str().unwrap()));
            }
        }
    }
    out
}

/// A full-resource Subscription of a client to referral-task-changed, for the Tasks it requested.
fn subscription(endpoint: &str, requester: &str) -> Value {
    const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
        "status": "requested",
        "reason": "Hear about our referrals",
        "criteria": "http://iop-gateway.org/fhir/SubscriptionTopic/referral-task-changed",
        "_criteria": {"extension": [{"url": format!("{BACKPORT}backport-filter-criteria"), "valueString": format!("Task?requester={requester}")}]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}backport-payload-content"), "valueCode": "full-resource"}]}
        }
    })
}

/// ServiceRequests in a client's system-level export.
async fn export_ids(gw: &Gateway, token: &str, notices: &mut Vec<bool>) -> HashSet<String> {
    let kick = gw.http.get(gw.url("$export?_type=ServiceRequest")).bearer_auth(token).header("accept", "application/fhir+json").header("prefer", "respond-async").send().await.unwrap();
    assert_eq!(kick.status(), 202, "{}", kick.text().await.unwrap());
    let status_url = kick.headers()["content-location"].to_str().unwrap().to_string();
    for _ in 0..600 {
        let response = gw.http.get(&status_url).bearer_auth(token).send().await.unwrap();
        if response.status() == 202 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(response.status(), 200);
        let manifest: Value = response.json().await.unwrap();
        notices.push(manifest["extension"]["part2Notice"].as_str() == Some(NOTICE));
        let mut ids = HashSet::new();
        for file in manifest["output"].as_array().unwrap() {
            let text = gw.http.get(file["url"].as_str().unwrap()).bearer_auth(token).send().await.unwrap().text().await.unwrap();
            for line in text.lines() {
                let resource: Value = serde_json::from_str(line).unwrap();
                ids.insert(format!("ServiceRequest/{}", resource["id"].as_str().unwrap()));
            }
        }
        return ids;
    }
    panic!("the export did not complete");
}

/// The partners the matrix's outbound ways reach: subscriber endpoints and the payer.
struct Partners {
    hooks: MockServer,
    payer: MockServer,
    provider: MockServer,
    /// The referring units' FHIR server (unit-a's hospital, `/riverbend`, and unit-c's, `/hillcrest`), which takes every `PUT` and message.
    unit: MockServer,
}

impl Partners {
    async fn start() -> Partners {
        let hooks = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&hooks).await;
        let payer = MockServer::start().await;
        Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
        let unit = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(|request: &wiremock::Request| ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_raw(request.body.clone(), "application/fhir+json"))
            .mount(&unit)
            .await;
        Partners { hooks, payer, provider: stepdown_provider().await, unit }
    }

    fn config(&self) -> String {
        let topics = "[topics]\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\nmin_heartbeat_secs = 1\nheartbeat_check_ms = 100\n";
        let unit = format!(
            "[[partners]]\nname = \"riverbend\"\nkind = \"inpatient-unit\"\nfhir_base = \"{}/riverbend\"\nauth = \"none\"\nclients = [\"unit-a\"]\nreferral_updates = \"task\"\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\n",
            self.unit.uri()
        );
        let messages = unit.replace("riverbend", "hillcrest").replace("unit-a", "unit-c").replace("\"task\"", "\"message\"");
        format!("{FAST}{}{}{unit}{messages}{topics}", payer_config(&self.payer.uri(), "clients = [\"payer-x\"]"), stepdown_partner(&self.provider.uri()))
    }
}

/// The matrix: every recipient × purpose × consent state × way out from the tables above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consent_matrix_decides_every_way_out_and_accounts_for_each_disclosure() {
    let partners = Partners::start().await;
    consent_matrix(gateway_on(&partners.config(), None, Some(&partners.hooks.uri())).await, &partners).await;
}

/// The same matrix on PostgreSQL, where the consent conditions of searches and exports run as its SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consent_matrix_on_postgres() {
    let Some(url) = crate::need::postgres("server::consent::the_consent_matrix_on_postgres") else { return };
    let schema = super::postgres::schema_name("consent");
    let partners = Partners::start().await;
    consent_matrix(gateway_on(&partners.config(), Some((&url, &schema)), Some(&partners.hooks.uri())).await, &partners).await;
    super::postgres::drop_schema(&schema).await;
}

async fn consent_matrix(gw: Gateway, partners: &Partners) {
    let clinic = gw.token("clinic").await;
    let recipients = recipients();
    let mut tokens = BTreeMap::new();
    for (client, organization, ..) in &recipients {
        let token = gw.token(client).await;
        let (status, created) = gw.post(&token, "Subscription", &subscription(&format!("{}/hooks/{client}", partners.hooks.uri()), organization)).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        let mut active = false;
        for _ in 0..200 {
            if gw.get(&token, &format!("Subscription/{id}")).await.1["status"] == "active" {
                active = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(active, "{client}'s Subscription completes its handshake");
        tokens.insert(*client, token);
    }
    let mut rows = Vec::new();
    for recipient in &recipients {
        let (_, _, recipient_purpose, named) = *recipient;
        for &consent_purpose in PURPOSES {
            for &(state, permits) in STATES {
                let expect = allowed(named, recipient_purpose, consent_purpose, permits);
                rows.push(store_row(&gw, &clinic, rows.len(), recipient, consent_purpose, state, expect).await);
            }
        }
    }
    let mut exported = BTreeMap::new();
    for &(client, ..) in &recipients {
        if reaches(client, Way::Export) {
            let mut notice = Vec::new();
            let ids = export_ids(&gw, &tokens[client], &mut notice).await;
            let disclosed = rows.iter().any(|r| r.client == client && r.disclosure && ids.contains(&r.record));
            assert_eq!(notice, [disclosed], "{client}: the manifest carries the notice exactly when the export discloses Part 2 data");
            exported.insert(client, ids);
        }
    }
    // Notifications go out in the background: wait for every one expected, then a little for any that should not come.
    let expected = rows.iter().filter(|r| r.expect).count();
    for _ in 0..300 {
        if notified(&partners.hooks).await.values().map(HashSet::len).sum::<usize>() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = rows.iter().filter(|r| r.expect && r.stepped_down.is_some()).count();
    for _ in 0..300 {
        if referred(&partners.provider).await.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = |client: &str| rows.iter().filter(|r| r.expect && r.client == client).count();
    let (puts, messages) = (2 * expected("unit-a"), expected("unit-c"));
    for _ in 0..300 {
        if fed_back(&partners.unit).await.len() >= puts && feedback_messages(&partners.unit).await.len() >= messages {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Sent { exported, notified: notified(&partners.hooks).await, referred: referred(&partners.provider).await, fed_back: fed_back(&partners.unit).await, messages: feedback_messages(&partners.unit).await };
    let (mut checked, mut disclosed) = (0, 0);
    let mut by_row = vec![0; rows.len()];
    for (i, row) in rows.iter().enumerate() {
        for &way in WAYS.iter().filter(|&&w| reaches(row.client, w)) {
            let token = if way == Way::Pas { &clinic } else { &tokens[row.client] };
            let out = way_out(&gw, token, row, way, &sent).await;
            assert_eq!(out, row.expect, "{} × {} consent × {:?} × {way:?}", row.client, row.consent_purpose, row.state);
            checked += 1;
            let mut counted = usize::from(out && row.disclosure);
            if let (Way::Export, Some((_, _, request))) = (way, &row.stepped_down) {
                // The referral's ServiceRequest is addressed to the provider: its export takes it too, under the same consent.
                let also = sent.exported[row.client].contains(request);
                assert_eq!(also, row.expect, "{} × {} consent × {:?} × export of the referral", row.client, row.consent_purpose, row.state);
                counted += usize::from(also && row.disclosure);
            }
            if way == Way::Feedback {
                // Two messages left: the feedback document and the Task naming it, each a disclosure.
                counted *= 2;
            }
            disclosed += counted;
            by_row[i] += counted;
        }
    }
    let ways_per_recipient: usize = recipients.iter().map(|(c, ..)| WAYS.iter().filter(|&&w| reaches(c, w)).count()).sum();
    assert_eq!(checked, ways_per_recipient * PURPOSES.len() * STATES.len());
    // The accounting: one PrivacyDisclosure per way a consented record left, none for the rest.
    let ops = gw.token("ops").await;
    let mut audited = 0;
    for (row, &expected) in rows.iter().zip(&by_row) {
        let mut total = 0;
        let mut entries = Vec::new();
        for patient in row.patients() {
            let (status, events) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
            assert_eq!(status, 200, "{events}");
            total += events["total"].as_u64().unwrap() as usize;
            entries.extend(events["entry"].as_array().cloned().unwrap_or_default());
        }
        assert_eq!(total, expected, "{} × {} × {:?}: {entries:?}", row.client, row.consent_purpose, row.state);
        for event in &entries {
            let event = &event["resource"];
            assert_eq!(event["type"]["code"], "110106");
            assert_eq!(event["purposeOfEvent"][0]["coding"][0]["code"], row.recipient_purpose);
            let whats: Vec<&str> = event["entity"].as_array().unwrap().iter().filter_map(|e| e["what"]["reference"].as_str()).collect();
            let ours = |w: &&str| {
                *w == row.record
                    || *w == row.notice_task
                    || w.starts_with("Claim/")
                    || row.stepped_down.as_ref().is_some_and(|(_, task, request)| w == task || w == request)
                    || row.fed_back.as_ref().is_some_and(|(_, _, task)| *w == format!("Task/{task}") || w.starts_with("Composition/"))
            };
            assert!(whats.iter().any(ours) && whats.iter().any(|w| w.starts_with("Consent/")), "{event}");
        }
        audited += total;
    }
    assert_eq!(audited, disclosed, "each allowed disclosure audited once");
    let without_consent: usize = rows.iter().filter(|r| !r.expect).count();
    assert!(disclosed > 0 && without_consent > 0, "the table has both answers");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_labelled_when_stored_and_enrolment_labels_the_clients_later_records() {
    let gw = gateway("").await;
    let clinic = gw.token("clinic").await;
    let labels = |body: &Value| -> Vec<String> {
        body["meta"]["security"].as_array().map(|a| a.iter().map(|c| format!("{}|{}", c["system"].as_str().unwrap_or_default(), c["code"].as_str().unwrap())).collect()).unwrap_or_default()
    };
    let part2 = [format!("{ACT_CODE}|42CFRPart2"), "http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R".to_string(), format!("{ACT_CODE}|SUD")];
    let patient = format!("Patient/{}", created_id_of(gw.post(&clinic, "Patient", &super::support::patient("MRN-LABELS")).await));
    let (_, sud) = gw.post(&clinic, "ServiceRequest", &sud_referral(&patient, "Organization/unit-a")).await;
    assert_eq!(labels(&sud), part2, "an F10–F19 diagnosis: {sud}");
    let (_, before) = gw.post(&clinic, "Observation", &super::support::phq9(&patient, 12, "2026-03-01T10:00:00Z")).await;
    assert!(labels(&before).is_empty(), "nothing marks a depression score of a client not enrolled: {before}");
    let episode = json!({
        "resourceType": "EpisodeOfCare", "status": "active",
        "type": [{"coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "H0015"}]}],
        "patient": {"reference": patient}, "managingOrganization": {"reference": PROGRAM}
    });
    let (status, enrolled) = gw.post(&clinic, "EpisodeOfCare", &episode).await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(labels(&enrolled), part2, "the enrolment in a substance-use program");
    let (_, after) = gw.post(&clinic, "Observation", &super::support::phq9(&patient, 12, "2026-03-08T10:00:00Z")).await;
    assert_eq!(labels(&after), part2, "everything about a client who is or was enrolled: {after}");
    gw.stop().await;
}

/// Enrolment labels what was stored before it: a record about the client that a unit, party to it,
/// read before the enrolment is withheld from the unit on every way out once the clinic enrols the
/// client (every version of it, in totals too), keeps its version numbers with the labels in its
/// body, and goes again only under a consent, with the refrain and accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_labels_what_was_stored_about_the_client_before_it() {
    enrolment_labels_earlier_records(gateway_on(FAST, None, None).await).await;
}

/// The same on PostgreSQL, where searches, history and export pages decide in its SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_labels_what_was_stored_before_it_on_postgres() {
    let Some(url) = crate::need::postgres("server::consent::enrolment_labels_what_was_stored_before_it_on_postgres") else { return };
    let schema = super::postgres::schema_name("relabel");
    enrolment_labels_earlier_records(gateway_on(FAST, Some((&url, &schema)), None).await).await;
    super::postgres::drop_schema(&schema).await;
}

async fn enrolment_labels_earlier_records(gw: Gateway) {
    let (clinic, unit, ops) = (gw.token("clinic").await, gw.token("unit-a").await, gw.token("ops").await);
    let codes = |body: &Value| -> Vec<String> { body["meta"]["security"].as_array().map(|a| a.iter().filter_map(|c| c["code"].as_str().map(str::to_string)).collect()).unwrap_or_default() };
    let mut managed = super::support::patient("MRN-RELABEL");
    managed["managingOrganization"] = json!({"reference": "Organization/unit-a"});
    let patient = format!("Patient/{}", created_id_of(gw.post(&clinic, "Patient", &managed).await));
    // A referral to the unit for depression (F32.2): nothing about it is Part 2 while the client is not enrolled. Two versions.
    let mut referral = sud_referral(&patient, "Organization/unit-a");
    referral["reasonCode"][0]["coding"][0]["code"] = json!("F32.2");
    let id = created_id_of(gw.post(&clinic, "ServiceRequest", &referral).await);
    let record = format!("ServiceRequest/{id}");
    referral["id"] = json!(id);
    referral["note"] = json!([{"text": "Evening group preferred."}]);
    let (status, second) = gw.put(&clinic, &record, &referral).await;
    assert_eq!((status, codes(&second)), (200, Vec::<String>::new()), "{second}");
    // A Task of the unit's based on it, about no patient: it stays readable and `_include`s the record.
    let task = created_id_of(gw.post(&clinic, "Task", &json!({"resourceType": "Task", "status": "requested", "intent": "order", "basedOn": [{"reference": record}], "owner": {"reference": "Organization/unit-a"}})).await);
    let everywhere = |yes: bool| -> BTreeMap<&str, bool> { ["read", "search", "vread", "history", "type history", "include", "$everything", "$export"].into_iter().map(|w| (w, yes)).collect() };
    assert_eq!(reached(&gw, &unit, &record, &patient, &task).await, everywhere(true), "party to it, the unit reads the record before the enrolment");

    // The clinic enrols the client in a substance-use program.
    let episode = json!({
        "resourceType": "EpisodeOfCare", "status": "active",
        "type": [{"coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "H0015"}]}],
        "patient": {"reference": patient}, "managingOrganization": {"reference": PROGRAM}
    });
    assert_eq!(gw.post(&clinic, "EpisodeOfCare", &episode).await.0, 201);
    assert_eq!(reached(&gw, &unit, &record, &patient, &task).await, everywhere(false), "without consent, nothing of the record leaves any more");
    let (_, none) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
    assert_eq!(none["total"], 0, "{none}");

    // Stored labelled, every version, with its version number: as if written after the enrolment.
    let part2 = ["42CFRPart2", "R", "SUD"].map(String::from).to_vec();
    let (status, current) = gw.get(&clinic, &record).await;
    assert_eq!((status, codes(&current), &current["meta"]["versionId"]), (200, part2.clone(), &json!("2")), "{current}");
    assert_eq!(current["note"], referral["note"], "only the labels changed: {current}");
    let (status, first) = gw.get(&clinic, &format!("{record}/_history/1")).await;
    assert_eq!((status, codes(&first), &first["meta"]["versionId"]), (200, part2.clone(), &json!("1")), "{first}");
    let (_, history) = gw.get(&clinic, &format!("{record}/_history")).await;
    assert_eq!(history["total"], 2, "relabelling makes no version: {history}");
    let (_, client) = gw.get(&clinic, &patient).await;
    assert_eq!(codes(&client), part2, "the client's Patient too: {client}");

    // Under the client's consent to the unit, for treatment, the record goes again, with the refrain, accounted for.
    assert_eq!(gw.post(&clinic, "Consent", &consent(&patient, "Organization/unit-a", "TREAT", State::Active)).await.0, 201);
    assert_eq!(reached(&gw, &unit, &record, &patient, &task).await, everywhere(true), "a consent lets the record go again");
    let (status, read) = gw.get(&unit, &record).await;
    assert!(status == 200 && codes(&read).contains(&"NORDSCLCD".to_string()), "the refrain: {read}");
    let (_, events) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
    let whats: Vec<&str> = events["entry"].as_array().unwrap().iter().flat_map(|e| e["resource"]["entity"].as_array().unwrap().iter().filter_map(|e| e["what"]["reference"].as_str())).collect();
    assert!(whats.contains(&record.as_str()), "the disclosures of the record are accounted for: {events}");
    gw.stop().await;
}

/// Whether `record`, about `patient`, reaches the caller by each way out: read, search (its total
/// counting only what is served), vread and history of its two versions, type history, `_include`
/// from `task`, `$everything` and a Bulk export.
async fn reached(gw: &Gateway, token: &str, record: &str, patient: &str, task: &str) -> BTreeMap<&'static str, bool> {
    let id = record.trim_start_matches("ServiceRequest/");
    let has = |bundle: &Value| bundle["entry"].as_array().is_some_and(|e| e.iter().any(|e| e["resource"]["resourceType"] == "ServiceRequest" && e["resource"]["id"] == id));
    let mut ways = BTreeMap::new();
    let (status, read) = gw.get(token, record).await;
    assert!(status == 200 || status == 404, "{status}: {read}");
    ways.insert("read", status == 200);
    let (status, found) = gw.get(token, &format!("ServiceRequest?patient={patient}")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], json!(u64::from(has(&found))), "the total counts only what is served: {found}");
    ways.insert("search", has(&found));
    let (status, first) = gw.get(token, &format!("{record}/_history/1")).await;
    assert!(status == 200 || status == 404, "{status}: {first}");
    ways.insert("vread", status == 200 && first["meta"]["versionId"] == "1");
    let (status, history) = gw.get(token, &format!("{record}/_history")).await;
    ways.insert("history", status == 200 && history["entry"].as_array().is_some_and(|e| e.len() == 2));
    let (status, all) = gw.get(token, "ServiceRequest/_history").await;
    assert_eq!(status, 200, "{all}");
    let versions = all["entry"].as_array().map_or(0, |e| e.iter().filter(|e| e["resource"]["id"] == id).count());
    assert_eq!(all["total"], json!(versions), "the type history's total counts only what is served: {all}");
    ways.insert("type history", versions == 2);
    let (status, included) = gw.get(token, &format!("Task?_id={task}&_include=Task:based-on")).await;
    assert_eq!((status, &included["total"]), (200, &json!(1)), "the Task is about no one: {included}");
    ways.insert("include", has(&included));
    let (status, everything) = gw.get(token, &format!("{patient}/$everything")).await;
    assert!(status == 200 || status == 404, "{status}: {everything}");
    ways.insert("$everything", status == 200 && has(&everything));
    let mut notices = Vec::new();
    ways.insert("$export", export_ids(gw, token, &mut notices).await.contains(record));
    ways
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_consents_are_refused_saying_what_and_where() {
    let gw = gateway("").await;
    let clinic = gw.token("clinic").await;
    let patient = format!("Patient/{}", created_id_of(gw.post(&clinic, "Patient", &super::support::patient("MRN-BAD")).await));
    let good = consent(&patient, "Organization/unit-a", "TREAT", State::Active);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("unknown purpose", { let mut c = good.clone(); c["provision"]["purpose"][0]["code"] = json!("MARKETING"); c }, "Consent.provision.purpose[0]", "MARKETING"),
        ("no actor", { let mut c = good.clone(); c["provision"].as_object_mut().unwrap().remove("actor"); c }, "Consent.provision.actor", "recipient"),
        ("period ends before it starts", { let mut c = good.clone(); c["provision"]["period"] = json!({"start": "2026-06-01", "end": "2026-01-01"}); c }, "Consent.provision.period", ""),
        ("unknown recipient", { let mut c = good.clone(); c["provision"]["actor"][0]["reference"]["reference"] = json!("Organization/nobody"); c }, "Consent.provision.actor[0].reference", "Organization/nobody"),
    ];
    for (name, body, expression, text) in cases {
        let (status, outcome) = gw.post(&clinic, "Consent", &body).await;
        assert_eq!(status, 422, "{name}: {outcome}");
        let issues = outcome["issue"].as_array().unwrap();
        assert!(
            issues.iter().any(|i| i["expression"][0] == expression && i["details"]["text"].as_str().unwrap_or_default().contains(text)),
            "{name}: {outcome}"
        );
    }
    assert_eq!(gw.post(&clinic, "Consent", &good).await.0, 201);
    // An IOP consent record names a recipient facility its own mapping creates in the same transaction.
    let (status, summary) = post_records(&gw, &clinic, &records("consent/part2-to-step-down.json")).await;
    assert_eq!(status, 200, "{summary}");
    gw.stop().await;
}

/// The PAS way out: a request for a client with a substance-use diagnosis is held as a dead letter
/// "consent required" (the clinic sees it in its records), and after a payment consent a replay sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pas_request_waits_for_consent_and_a_replay_sends_it() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let gw = gateway(&payer_config(&payer.uri(), "clients = [\"payer-x\"]")).await;
    let (clinic, ops) = (gw.token("clinic").await, gw.token("ops").await);
    let mut input = records("authorization/initial.json");
    input[2]["diagnoses"] = json!([{"code": "F10.20"}]);
    let (status, summary) = post_records(&gw, &clinic, &input).await;
    assert_eq!(status, 200, "{summary}");
    let held = decision(&gw, &clinic, "AUTH-1001-1", "error").await;
    assert!(held["issues"][0]["text"].as_str().unwrap().starts_with("consent required"), "{held}");
    assert!(payer.received_requests().await.unwrap().is_empty(), "nothing reached the payer");
    let patient = format!("Patient/{}", iop_gateway::mapping::ids::resource_id("iop-gateway", "Patient", "client:C-1001"));
    let (_, none) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
    assert_eq!(none["total"], 0);

    // A payment consent to the payer, then the operator replays the dead letter.
    let (status, given) = gw.post(&clinic, "Consent", &consent(&patient, "Organization/payer-x", "HPAYMT", State::Active)).await;
    assert_eq!(status, 201, "{given}");
    let (_, dead) = gw.get(&ops, "admin/outbox?status=dead").await;
    let id = dead[0]["id"].as_str().unwrap().to_string();
    assert_eq!(gw.post(&ops, &format!("admin/outbox/{id}/$replay"), &json!({})).await.0, 200);
    decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let sent: Value = serde_json::from_slice(&received[0].body).unwrap();
    let claim = &sent["entry"][0]["resource"];
    let codes: Vec<&str> = claim["meta"]["security"].as_array().unwrap().iter().filter_map(|c| c["code"].as_str()).collect();
    assert!(codes.contains(&"42CFRPart2") && codes.contains(&"NORDSCLCD"), "{claim}");
    assert!(carries_notice(&sent), "the PAS request carries the notice: {}", sent["meta"]);
    let (_, events) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
    assert_eq!(events["total"], 1, "{events}");
    assert_eq!(events["entry"][0]["resource"]["purposeOfEvent"][0]["coding"][0]["code"], "HPAYMT");
    gw.stop().await;
}

/// A wiremock step-down provider that takes every referral message with BSeR's acknowledgement.
async fn stepdown_provider() -> MockServer {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/$process-message"))
        .respond_with(|request: &wiremock::Request| {
            let sent: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_string(super::step_down::acknowledgement(&sent))
        })
        .mount(&provider)
        .await;
    provider
}

/// What intake stores names its targets `Type/id`: a record posted through `/iop/records` alone
/// about an enrolled client is in the client's compartment (search by patient, `$everything`),
/// and the client's consent decides what the step-down provider reads of its referral.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_posted_through_intake_are_in_the_clients_compartment_and_consent_decides_them() {
    let provider = stepdown_provider().await;
    let gw = gateway(&format!("[outbox]\npoll_interval_ms = 50\n\n{}", stepdown_partner(&provider.uri()))).await;
    let clinic = gw.token("clinic").await;
    let patient = format!("Patient/{}", iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, "Patient", "client:C-1004"));
    // The client, enrolled in a substance-use program in an earlier episode: everything about it is Part 2.
    let (client, episode) = super::step_down::discharge_batch();
    let mut enrolled = client.clone();
    let mut sud = records("enrollment/discharged-sud.json");
    sud["client_id"] = json!("C-1004");
    enrolled.as_array_mut().unwrap().push(sud);
    let (status, summary) = post_records(&gw, &clinic, &enrolled).await;
    assert_eq!(status, 200, "{summary}");
    // A drug screen posted on its own: the Patient it is about is not in its batch.
    let mut screen = records("drug_screen/positive-cannabinoids.json");
    screen["client_id"] = json!("C-1004");
    let (status, summary) = post_records(&gw, &clinic, &screen).await;
    assert_eq!(status, 200, "{summary}");
    let (status, found) = gw.get(&clinic, &format!("Observation?patient={patient}")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 5, "one Observation per substance, found by the client's Patient: {found}");
    assert!(found["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "match").all(|e| e["resource"]["subject"]["reference"] == patient.as_str()), "{found}");
    let (status, everything) = gw.get(&clinic, &format!("{patient}/$everything")).await;
    assert_eq!(status, 200, "{everything}");
    assert!(everything["entry"].as_array().unwrap().iter().any(|e| e["resource"]["resourceType"] == "DiagnosticReport"), "the drug screen's report: {everything}");

    // The discharge with its step-down referral and the client's consent to the provider, for treatment.
    let (status, summary) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 200, "{summary}");
    let task = format!("Task/{}", iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, "Task", "referral:REF-1004-OUT:task"));
    let stepdown = gw.token("stepdown").await;
    let (status, read) = gw.get(&stepdown, &task).await;
    assert_eq!(status, 200, "the consent permits the provider: {read}");
    assert_eq!(read["for"]["reference"], patient.as_str(), "{read}");
    let codes: Vec<&str> = read["meta"]["security"].as_array().unwrap_or_else(|| panic!("{read}")).iter().filter_map(|c| c["code"].as_str()).collect();
    assert!(codes.contains(&"42CFRPart2") && codes.contains(&"NORDSCLCD"), "{read}");
    let (_, searched) = gw.get(&stepdown, &format!("Task?patient={patient}")).await;
    assert_eq!(searched["total"], 1, "{searched}");
    let request = read["focus"]["reference"].as_str().unwrap().to_string();
    let (status, body) = gw.get(&stepdown, &request).await;
    assert_eq!(status, 200, "the referral's ServiceRequest: {body}");
    let ops = gw.token("ops").await;
    let (status, events) = gw.get(&ops, &format!("AuditEvent?patient={patient}&subtype=disclose")).await;
    assert!(status == 200 && events["total"].as_u64().is_some_and(|n| n >= 2), "the read and the search accounted for: {status} {events}");

    // The client revokes the consent: the provider reads nothing of it any more.
    let mut revoked = records("consent/part2-to-step-down.json")[1].clone();
    revoked["status"] = json!("revoked");
    let (status, summary) = post_records(&gw, &clinic, &json!([revoked])).await;
    assert_eq!(status, 200, "{summary}");
    let (status, read) = gw.get(&stepdown, &task).await;
    assert_eq!(status, 404, "{read}");
    assert_eq!(gw.get(&stepdown, &request).await.0, 404);
    let (_, searched) = gw.get(&stepdown, &format!("Task?patient={patient}")).await;
    assert_eq!(searched["total"], 0, "{searched}");
    gw.stop().await;
}
