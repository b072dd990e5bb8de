//! Inbound BSeR referrals end to end: an inpatient unit refers (as a message and as a transaction), the clinic answers with records, and the referring hospital (a wiremock server that fails, goes down and comes back) hears every change exactly once, each payload valid against R4, US Core 6.1.0 and the BSeR profiles.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use iop_gateway::definitions::Definitions;
use iop_gateway::validation::Validator;
use iop_gateway::xml::XmlOptions;
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::exchange::{post_records, records};
use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub(super) fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/tests/fixtures/bser/{name}")).unwrap()).unwrap()
}

/// The referring hospital's FHIR server: answers 503 while down or for the next `fail_next` requests, else 200, and keeps what it accepted.
#[derive(Clone, Default)]
struct Hospital {
    up: Arc<AtomicBool>,
    fail_next: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    accepted: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Respond for Hospital {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let failing = self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if !self.up.load(Ordering::SeqCst) || failing {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return ResponseTemplate::new(503);
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let query = request.url.query().map(|q| format!("?{q}")).unwrap_or_default();
        self.accepted.lock().unwrap().push((format!("{} {}{query}", request.method, request.url.path()), body.clone()));
        ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_json(body)
    }
}

impl Hospital {
    fn new() -> Hospital {
        let hospital = Hospital::default();
        hospital.up.store(true, Ordering::SeqCst);
        hospital
    }

    /// Waits (bounded) until `n` requests were accepted, then a little more to see that nothing else comes.
    async fn accepted_exactly(&self, n: usize) -> Vec<(String, Value)> {
        for _ in 0..400 {
            if self.accepted.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let accepted = self.accepted.lock().unwrap().clone();
        assert_eq!(accepted.len(), n, "{:#?}", accepted.iter().map(|(at, body)| format!("{at} {}", body["businessStatus"])).collect::<Vec<_>>());
        accepted
    }
}

/// A gateway whose inpatient-unit partners are served by `hospital`: unit-a's hears by Task PUT, unit-b's by feedback messages.
async fn gateway(hospital: &MockServer) -> Gateway {
    let partner = |name: &str, client: &str, updates: &str| {
        format!(
            "[[partners]]\nname = \"{name}\"\nkind = \"inpatient-unit\"\nfhir_base = \"{}/{name}\"\nauth = \"none\"\nclients = [\"{client}\"]\nreferral_updates = \"{updates}\"\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\n",
            hospital.uri()
        )
    };
    let extra = format!("[outbox]\npoll_interval_ms = 50\n\n{}\n{}", partner("riverbend", "unit-a", "task"), partner("hillcrest", "unit-b", "message"));
    Gateway::start_with(&extra).await
}

/// R4, US Core 6.1.0 and PAS (compiled in), and the BSeR definitions under tests/fixtures/bser/profiles.
fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let mut definitions = Definitions::new_with_exchange_packages();
        let options = XmlOptions { allow_xsi_schema_location: true };
        for file in ["structuredefinition/ReferralServiceRequest.xml", "structuredefinition/ReferralTask.xml", "structuredefinition/BSeR-PatientConsent.xml", "structuredefinition/BSeR-ReferralMessageHeader.xml", "structuredefinition/BSeR-ReferralMessageBundle.xml", "structuredefinition/BSeR-ReferralFeedbackDocumentBundle.xml", "structuredefinition/BSeR-ReferralFeedbackComposition.xml", "codesystem/TaskBusinessStatusCS.xml", "valueset/TaskBusinessStatusVS.xml"] {
            let bytes = std::fs::read(Path::new(ROOT).join("tests/fixtures/bser/profiles").join(file)).unwrap();
            let (resource, issues) = iop_gateway::xml::parse_resource_with(&bytes, &definitions, &options).expect("BSeR profile is FHIR XML");
            assert!(!issues.iter().any(|i| i.severity.is_error()), "{file}: {issues:#?}");
            definitions.add_resource(file, resource);
        }
        Validator::new(Arc::new(definitions))
    })
}

/// What the gateway sent validates against R4 and every profile it claims, all of them loaded (and the Task against BSeR's ReferralTask).
fn assert_valid(sent: &Value) {
    let json = iop_gateway::json::parse(sent.to_string().as_bytes()).unwrap();
    let profiles: Vec<String> = if sent["resourceType"] == "Task" { vec!["http://hl7.org/fhir/us/bser/StructureDefinition/ReferralTask".into()] } else { Vec::new() };
    let report = validator().validate_json(&json, &profiles);
    let errors: Vec<String> = report.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect();
    assert_eq!(errors, Vec::<String>::new(), "{sent}");
    assert!(!report.issues.iter().any(|i| i.message.contains("is not loaded") && !i.message.starts_with("the ValueSet ")), "{:#?}", report.issues);
}

fn business_status(task: &Value) -> &str {
    task["businessStatus"]["coding"][0]["code"].as_str().unwrap_or_default()
}

/// The referral record the gateway made, as the clinic lists it.
async fn inbound_referral(gw: &Gateway, clinic: &str, id: &str) -> Value {
    let (status, listed) = gw.get(clinic, "iop/records?record_type=referral&direction=inbound").await;
    assert_eq!(status, 200, "{listed}");
    listed.as_array().unwrap().iter().find(|r| r["id"] == id).cloned().unwrap_or_else(|| panic!("no inbound referral {id}: {listed}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_message_is_answered_and_the_hospital_hears_every_step_once() {
    let server = MockServer::start().await;
    let hospital = Hospital::new();
    Mock::given(wiremock::matchers::any()).respond_with(hospital.clone()).mount(&server).await;
    let gw = gateway(&server).await;
    let (unit, other, clinic) = (gw.token("unit-a").await, gw.token("unit-b").await, gw.token("clinic").await);

    // In, with the unit's default scopes: Coverage, Encounter, Practitioner(Role) and Organizations included.
    let message = fixture("referral-message.json");
    assert_valid(&message);
    let (status, answer) = gw.post(&unit, "$process-message", &message).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["entry"][0]["resource"]["response"]["identifier"], "mh-rb-40117");
    let (status, again) = gw.post(&unit, "$process-message", &message).await;
    assert_eq!((status, &again), (200, &answer), "a resent referral gets the first answer");
    for (token, seen) in [(&unit, 1), (&clinic, 1), (&other, 0)] {
        for resource_type in ["ServiceRequest", "Task", "Coverage", "Encounter"] {
            let (_, found) = gw.get(token, resource_type).await;
            assert_eq!(found["total"], seen, "{resource_type}: {found}");
        }
    }
    let (_, tasks) = gw.get(&clinic, "Task").await;
    let task = &tasks["entry"][0]["resource"];
    assert_eq!(task["owner"]["reference"], "Organization/iop-program", "the program carries the referral out");
    let referral = inbound_referral(&gw, &clinic, "RB-RX-40117").await;
    assert_eq!((referral["status"].as_str(), referral["program"].as_str(), referral["sending_facility"]["name"].as_str()), (Some("requested"), Some("mental_health_iop"), Some("Synthetic Riverbend Hospital Adult Inpatient Unit")));
    assert_eq!(gw.get(&clinic, "iop/records?record_type=referral&direction=inbound").await.1.as_array().unwrap().len(), 1, "stored once");

    // Accepted, through two 503s.
    hospital.fail_next.store(2, Ordering::SeqCst);
    let mut accepted = referral.clone();
    accepted["status"] = json!("accepted");
    let (status, summary) = post_records(&gw, &clinic, &accepted).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["records"][0]["messages"].as_array().map(Vec::len), Some(1), "{summary}");
    let sent = hospital.accepted_exactly(1).await;
    assert_eq!(hospital.failed.load(Ordering::SeqCst), 2);
    assert_eq!(sent[0].0, "PUT /riverbend/Task/tsk-8812");
    let put = &sent[0].1;
    assert_eq!((put["status"].as_str(), business_status(put)), (Some("accepted"), "3.0"));
    assert_eq!(put["businessStatus"]["coding"][0]["system"], "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS");
    assert_eq!((put["focus"]["reference"].as_str(), put["owner"]["reference"].as_str()), (Some("ServiceRequest/sr-3307"), Some("Organization/org-lakeside-iop")), "the Task as the hospital knows it");
    assert_valid(put);
    assert_eq!(inbound_referral(&gw, &clinic, "RB-RX-40117").await["status"], "accepted");
    let (_, tasks) = gw.get(&unit, "Task").await;
    assert_eq!(business_status(&tasks["entry"][0]["resource"]), "3.0", "the unit reads the progress at the gateway too");

    // The same answer again changes nothing and sends nothing.
    let (status, summary) = post_records(&gw, &clinic, &accepted).await;
    assert_eq!((status, &summary["records"][0]["messages"]), (200, &json!([])), "{summary}");

    // Scheduled, while the hospital is down for a while.
    hospital.up.store(false, Ordering::SeqCst);
    let mut scheduled = accepted.clone();
    scheduled["status"] = json!("scheduled");
    let (status, problem) = post_records(&gw, &clinic, &scheduled).await;
    assert_eq!(status, 422, "scheduled needs the first session's date: {problem}");
    assert_outcome(&problem);
    scheduled["first_session_date"] = json!("2026-04-27");
    scheduled["client_id"] = json!("C-2001");
    let (status, summary) = post_records(&gw, &clinic, &scheduled).await;
    assert_eq!(status, 200, "{summary}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(hospital.failed.load(Ordering::SeqCst) > 3, "retried while down");
    hospital.up.store(true, Ordering::SeqCst);
    let sent = hospital.accepted_exactly(2).await;
    assert_eq!((business_status(&sent[1].1), sent[1].1["executionPeriod"]["start"].as_str()), ("5.1.1", Some("2026-04-27")));
    assert_valid(&sent[1].1);

    // The client's enrollment names the referral; a missed session, then an attended one.
    let mut enrollment = records("episode/enrollment.json")[0].clone();
    enrollment["referral_id"] = json!("RB-RX-40117");
    enrollment["status"] = json!("active");
    for member in ["end", "discharge_reason"] {
        enrollment.as_object_mut().unwrap().remove(member);
    }
    let client = records("episode/client.json")[0].clone();
    let (status, summary) = post_records(&gw, &clinic, &json!([client, enrollment])).await;
    assert_eq!(status, 200, "{summary}");
    let sessions = records("episode/session.json");
    let mut missed = sessions[0].clone();
    missed["attendance"] = json!("absent_unexcused");
    let (status, summary) = post_records(&gw, &clinic, &json!([missed])).await;
    assert_eq!(status, 200, "{summary}");
    let sent = hospital.accepted_exactly(3).await;
    assert_eq!((sent[2].1["status"].as_str(), business_status(&sent[2].1)), (Some("in-progress"), "5.1.2"));
    let (status, summary) = post_records(&gw, &clinic, &json!([sessions[1].clone()])).await;
    assert_eq!(status, 200, "{summary}");
    let sent = hospital.accepted_exactly(4).await;
    assert_eq!(business_status(&sent[3].1), "5.1.4");

    // Discharged, completed: the feedback document first, then the Task naming it as its output.
    // The discharge summary gathers the whole episode, so the fixture's episode goes in one batch,
    // its enrollment naming the unit's referral (the natural way to tie them): the summary's episode
    // points at the ServiceRequest the unit sent. The fixture's own inbound referral record is left
    // out: the unit's referral is the episode's. Its step-down provider is not connected here, so
    // the discharge is recorded without sending it.
    let mut batch = Vec::new();
    for concept in ["client", "enrollment", "screening", "session", "care_plan", "consent", "drug_screen", "referral", "discharge"] {
        let found = records(&format!("episode/{concept}.json"));
        batch.extend(found.as_array().cloned().unwrap_or_else(|| vec![found.clone()]));
    }
    batch.retain(|r| !(r["record_type"] == "referral" && r["direction"] == "inbound"));
    for record in batch.iter_mut().filter(|r| r["record_type"] == "enrollment") {
        record["referral_id"] = json!("RB-RX-40117");
    }
    for record in batch.iter_mut().filter(|r| r["record_type"] == "discharge") {
        record.as_object_mut().unwrap().remove("step_down_referral_id");
    }
    let (status, summary) = post_records(&gw, &clinic, &Value::Array(batch)).await;
    assert_eq!(status, 200, "{summary}");
    let (_, requests) = gw.get(&unit, "ServiceRequest").await;
    let unit_request = format!("ServiceRequest/{}", requests["entry"][0]["resource"]["id"].as_str().unwrap());
    let (_, episodes) = gw.get(&clinic, "EpisodeOfCare").await;
    assert_eq!(episodes["entry"][0]["resource"]["referralRequest"][0]["reference"].as_str(), Some(unit_request.as_str()), "the episode came of the unit's referral");
    let sent = hospital.accepted_exactly(6).await;
    let (document_at, document) = &sent[4];
    let (task_at, task) = &sent[5];
    assert!(document_at.starts_with("PUT /riverbend/Bundle/"), "{document_at}");
    assert_eq!(task_at, "PUT /riverbend/Task/tsk-8812");
    assert_eq!((task["status"].as_str(), business_status(task)), (Some("completed"), "7.0"));
    assert_eq!(task["output"][0]["valueReference"]["reference"].as_str(), Some(format!("Bundle/{}", document["id"].as_str().unwrap()).as_str()));
    assert_eq!(document["type"], "document");
    assert_eq!(document["entry"][0]["resource"]["resourceType"], "Composition");
    let section = &document["entry"][0]["resource"]["section"][0];
    assert_eq!(section["code"]["coding"][0]["code"], "RSRFS");
    let observations: Vec<&Value> = document["entry"].as_array().unwrap().iter().skip(1).map(|e| &e["resource"]).collect();
    let phq9: Vec<i64> = observations.iter().filter(|o| o["code"]["coding"][0]["code"] == "44261-6").map(|o| o["valueInteger"].as_i64().unwrap()).collect();
    let gad7 = observations.iter().filter(|o| o["code"]["coding"][0]["code"] == "70274-6").count();
    assert_eq!((phq9.len(), gad7), (2, 2), "first and last PHQ-9 and GAD-7: {document}");
    assert_eq!(phq9[0], 15, "the first PHQ-9 total");
    let text = section["text"]["div"].as_str().unwrap();
    assert!(text.contains("21 of 24") && text.contains("step down outpatient") && text.contains("Weekly individual therapy"), "{text}");
    assert_eq!(document["meta"]["profile"][0], "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralFeedbackDocumentBundle", "checked below against the loaded definition");
    assert_valid(document);
    assert_valid(task);
    // The unit's one Task at the gateway (the clinic's episode records made Tasks of their own referrals).
    let (_, tasks) = gw.get(&unit, "Task").await;
    assert_eq!((tasks["total"].as_i64(), business_status(&tasks["entry"][0]["resource"])), (Some(1), "7.0"));
    let (status, stored_document) = gw.get(&clinic, &format!("Bundle/{}", document["id"].as_str().unwrap())).await;
    assert_eq!((status, &stored_document["type"]), (200, &json!("document")), "the output resolves at the gateway too");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_transaction_is_stored_once_and_a_declined_referral_is_told_by_feedback_message() {
    let server = MockServer::start().await;
    let hospital = Hospital::new();
    Mock::given(wiremock::matchers::any()).respond_with(hospital.clone()).mount(&server).await;
    let gw = gateway(&server).await;
    let (unit_a, unit_b, clinic) = (gw.token("unit-a").await, gw.token("unit-b").await, gw.token("clinic").await);

    // A transaction from unit-a, sent twice: one referral, one set of resources.
    let transaction = fixture("referral-transaction.json");
    let (status, first) = gw.post(&unit_a, "", &transaction).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = gw.post(&unit_a, "", &transaction).await;
    assert_eq!(status, 200, "{second}");
    let locations = |b: &Value| b["entry"].as_array().unwrap().iter().map(|e| e["response"]["location"].as_str().unwrap_or_default().split("/_history").next().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(locations(&first), locations(&second), "the resend is answered with the first one's resources");
    let (_, requests) = gw.get(&unit_a, "ServiceRequest").await;
    assert_eq!(requests["total"], 1);
    assert_eq!(gw.get(&unit_b, "ServiceRequest").await.1["total"], 0, "no other partner sees it");
    assert_eq!(inbound_referral(&gw, &clinic, "RB-RX-40118").await["status"], "requested");

    // The same referral as a message from unit-b, whose hospital hears by feedback messages: declined, with the reason.
    let (status, _) = gw.post(&unit_b, "$process-message", &fixture("referral-message.json")).await;
    assert_eq!(status, 200);
    let referral = inbound_referral(&gw, &clinic, "RB-RX-40117").await;
    let mut declined = referral.clone();
    declined["status"] = json!("declined");
    let (status, problem) = post_records(&gw, &clinic, &declined).await;
    assert_eq!(status, 422, "declined needs a reason: {problem}");
    assert!(problem["issue"][0]["expression"][0].as_str().unwrap_or_default().starts_with("records[0]"), "{problem}");
    declined["status_reason"] = json!("No evening group capacity before May; referred back for a program closer to home.");
    hospital.fail_next.store(1, Ordering::SeqCst);
    let (status, summary) = post_records(&gw, &clinic, &declined).await;
    assert_eq!(status, 200, "{summary}");
    let sent = hospital.accepted_exactly(1).await;
    assert_eq!(sent[0].0, "POST /hillcrest/$process-message");
    let message = &sent[0].1;
    assert_eq!(message["type"], "message");
    let header = &message["entry"][0]["resource"];
    assert_eq!((header["response"]["identifier"].as_str(), header["response"]["code"].as_str()), (Some("mh-rb-40117"), Some("ok")), "it answers the referral message");
    assert_eq!(header["eventCoding"]["code"], "I12");
    let task = &message["entry"][1]["resource"];
    assert_eq!((task["id"].as_str(), task["status"].as_str(), business_status(task)), (Some("tsk-8812"), Some("rejected"), "4.0"));
    assert_eq!(task["statusReason"]["text"], declined["status_reason"]);
    assert_eq!(message["meta"]["profile"][0], "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralMessageBundle", "checked below against the loaded definition");
    assert_valid(message);
    assert_valid(task);

    // The transaction's referral, accepted: unit-a's hospital gets its Task by PUT, at the id it gave it.
    let mut accepted = inbound_referral(&gw, &clinic, "RB-RX-40118").await;
    accepted["status"] = json!("accepted");
    let (status, summary) = post_records(&gw, &clinic, &accepted).await;
    assert_eq!(status, 200, "{summary}");
    let sent = hospital.accepted_exactly(2).await;
    assert_eq!(sent[1].0, "PUT /riverbend/Task/tsk-8813");
    assert_eq!(business_status(&sent[1].1), "3.0");
    assert_valid(&sent[1].1);
    // Each unit reads only its own referral's Task.
    let (_, a_tasks) = gw.get(&unit_a, "Task").await;
    let (_, b_tasks) = gw.get(&unit_b, "Task").await;
    assert_eq!((a_tasks["total"].as_i64(), b_tasks["total"].as_i64()), (Some(1), Some(1)));
    assert_eq!((business_status(&a_tasks["entry"][0]["resource"]), business_status(&b_tasks["entry"][0]["resource"])), ("3.0", "4.0"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_that_cannot_be_read_is_refused_with_where() {
    let server = MockServer::start().await;
    let gw = gateway(&server).await;
    let unit = gw.token("unit-a").await;
    let mut message = fixture("referral-message.json");
    // Valid FHIR, but the ServiceRequest says nothing of why: no referral record the clinic could act on.
    message["entry"][2]["resource"].as_object_mut().unwrap().remove("note");
    let (status, outcome) = gw.post(&unit, "$process-message", &message).await;
    assert_eq!(status, 422, "{outcome}");
    assert_outcome(&outcome);
    let errors: Vec<&Value> = outcome["issue"].as_array().unwrap().iter().filter(|i| i["severity"] == "error").collect();
    assert!(errors.iter().any(|i| i["expression"][0].as_str().unwrap_or_default().starts_with("Bundle.entry[1]") && i["details"]["text"].as_str().unwrap_or_default().contains("reason")), "{outcome}");
    assert_eq!(gw.get(&unit, "ServiceRequest").await.1["total"], 0, "nothing stored");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_without_a_partner_hears_back_only_at_a_source_endpoint_its_callbacks_allow() {
    let server = MockServer::start().await;
    let hospital = Hospital::new();
    Mock::given(wiremock::matchers::any()).respond_with(hospital.clone()).mount(&server).await;
    let dir = TempDir::new("referral-callback");
    let keys = partner_keys();
    let text = config_text(&dir.0, &keys, "[outbox]\npoll_interval_ms = 50\n").replace("id = \"unit-a\"\n", &format!("id = \"unit-a\"\ncallbacks = [\"{}/unit-a\"]\n", server.uri()));
    let gw = Gateway::start_loaded(load(&text, &dir.0), keys, dir).await;
    let (unit_a, unit_b, clinic) = (gw.token("unit-a").await, gw.token("unit-b").await, gw.token("clinic").await);
    let endpoint = format!("{}/unit-a/fhir", server.uri());

    let mut message = fixture("referral-message.json");
    message["entry"][0]["resource"]["source"]["endpoint"] = json!(endpoint);
    let (status, _) = gw.post(&unit_a, "$process-message", &message).await;
    assert_eq!(status, 200);
    let mut accepted = inbound_referral(&gw, &clinic, "RB-RX-40117").await;
    accepted["status"] = json!("accepted");
    let (status, summary) = post_records(&gw, &clinic, &accepted).await;
    assert_eq!((status, summary["records"][0]["messages"].as_array().map(Vec::len)), (200, Some(1)), "{summary}");
    let sent = hospital.accepted_exactly(1).await;
    assert_eq!(sent[0].0, "POST /unit-a/fhir/$process-message");
    assert_eq!(sent[0].1["entry"][0]["resource"]["response"]["identifier"], "mh-rb-40117");
    assert_eq!(business_status(&sent[0].1["entry"][1]["resource"]), "3.0");
    assert_valid(&sent[0].1);

    // unit-b names the same address, which its configuration does not allow: its referral is answered at the gateway only.
    let other: Value = serde_json::from_str(&message.to_string().replace("RB-RX-40117", "RB-RX-40119")).unwrap();
    let (status, _) = gw.post(&unit_b, "$process-message", &other).await;
    assert_eq!(status, 200);
    let mut accepted = inbound_referral(&gw, &clinic, "RB-RX-40119").await;
    accepted["status"] = json!("accepted");
    let (status, summary) = post_records(&gw, &clinic, &accepted).await;
    assert_eq!((status, &summary["records"][0]["messages"]), (200, &json!([])), "{summary}");
    let (_, tasks) = gw.get(&unit_b, "Task").await;
    assert_eq!(business_status(&tasks["entry"][0]["resource"]), "3.0", "unit-b reads its Task's progress at the gateway");
    hospital.accepted_exactly(1).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_answer_and_an_invalid_record_writes_and_sends_nothing() {
    let server = MockServer::start().await;
    let hospital = Hospital::new();
    Mock::given(wiremock::matchers::any()).respond_with(hospital.clone()).mount(&server).await;
    let gw = gateway(&server).await;
    let (unit, clinic) = (gw.token("unit-a").await, gw.token("clinic").await);
    let (status, _) = gw.post(&unit, "$process-message", &fixture("referral-message.json")).await;
    assert_eq!(status, 200);
    let mut accepted = inbound_referral(&gw, &clinic, "RB-RX-40117").await;
    accepted["status"] = json!("accepted");
    let mut client = records("episode/client.json")[0].clone();
    client["sex"] = json!("sometimes");

    // The answer first, the invalid record second: refused as a whole, the problem located in the batch as posted.
    let (status, problem) = post_records(&gw, &clinic, &json!([accepted, client])).await;
    assert_eq!(status, 422, "{problem}");
    assert_outcome(&problem);
    let expressions: Vec<&str> = problem["issue"].as_array().unwrap().iter().filter_map(|i| i["expression"][0].as_str()).collect();
    assert!(!expressions.is_empty() && expressions.iter().all(|e| e.starts_with("records[1]")), "{problem}");
    assert!(expressions.contains(&"records[1].sex"), "{problem}");
    assert_eq!(inbound_referral(&gw, &clinic, "RB-RX-40117").await["status"], "requested", "the answer was not stored");
    let (_, tasks) = gw.get(&unit, "Task").await;
    assert_eq!(business_status(&tasks["entry"][0]["resource"]), "2.0", "the Task did not move");
    hospital.accepted_exactly(0).await;
    assert_eq!(hospital.failed.load(Ordering::SeqCst), 0, "the hospital heard nothing at all");

    // Fixed, the same batch goes in whole: the summaries in the batch's order, the hospital told once.
    client["sex"] = json!("other");
    let (status, summary) = post_records(&gw, &clinic, &json!([accepted, client])).await;
    assert_eq!(status, 200, "{summary}");
    let listed: Vec<(&str, usize)> = summary["records"].as_array().unwrap().iter().map(|r| (r["record_type"].as_str().unwrap_or_default(), r["messages"].as_array().map_or(0, Vec::len))).collect();
    assert_eq!(listed, vec![("referral", 1), ("client", 0)], "{summary}");
    assert_eq!(inbound_referral(&gw, &clinic, "RB-RX-40117").await["status"], "accepted");
    assert!(summary["records"][1]["resources"].as_array().is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.starts_with("Patient/")))), "{summary}");
    let sent = hospital.accepted_exactly(1).await;
    assert_eq!(sent[0].0, "PUT /riverbend/Task/tsk-8812");
    assert_eq!((sent[0].1["status"].as_str(), business_status(&sent[0].1)), (Some("accepted"), "3.0"));
    assert_valid(&sent[0].1);
    gw.stop().await;
}
