//! Step-down referrals out at discharge: the clinic posts a discharge with its step-down referral, the gateway sends a BSeR referral message to the outpatient provider (a wiremock server) through the outbox, and the provider's answers — a Task update or a feedback message — show in the clinic's outbound referral record.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use iop_gateway::auth::keys::KeyPair;
use iop_gateway::definitions::Definitions;
use iop_gateway::validation::Validator;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::exchange::{post_records, records};
use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The BSeR definitions the referral message claims or binds (legacy XML differentials, CC0).
const BSER_PROFILES: &[&str] = &[
    "structuredefinition/ReferralServiceRequest.xml",
    "structuredefinition/ReferralTask.xml",
    "structuredefinition/BSeR-PatientConsent.xml",
    "structuredefinition/BSeR-ReferralMessageHeader.xml",
    "structuredefinition/BSeR-ReferralMessageBundle.xml",
    "codesystem/TaskBusinessStatusCS.xml",
    "valueset/TaskBusinessStatusVS.xml",
];

/// R4, the bundled profiles, US Core 6.1.0, PAS 2.2.1 and BSeR: what a message sent to a provider must satisfy.
fn bser_validator() -> Validator {
    static DEFINITIONS: OnceLock<Arc<Definitions>> = OnceLock::new();
    let definitions = DEFINITIONS.get_or_init(|| {
        let mut definitions = Definitions::new_with_exchange_packages();
        let options = iop_gateway::xml::XmlOptions { allow_xsi_schema_location: true };
        for file in BSER_PROFILES {
            let bytes = std::fs::read(Path::new(ROOT).join("tests/fixtures/bser/profiles").join(file)).unwrap();
            let (resource, issues) = iop_gateway::xml::parse_resource_with(&bytes, &definitions, &options).expect("BSeR definition is FHIR XML");
            assert!(!issues.iter().any(|i| i.severity.is_error()), "{file}: {issues:#?}");
            definitions.add_resource(file, resource);
        }
        Arc::new(definitions)
    });
    Validator::new(definitions.clone())
}

/// The Organization id the mappings give the receiving facility (the default id namespace), which the provider's client acts for.
fn facility_organization(facility_id: &str) -> String {
    let id = iop_gateway::mapping::ids::resource_id(iop_gateway::mapping::ids::DEFAULT_NAMESPACE, "Organization", &format!("facility:{facility_id}"));
    format!("Organization/{id}")
}

/// A gateway with the outpatient provider "riverbend" (partner and client, routed for OP-RIVERBEND at `provider`) and another provider's client, "oakhaven".
async fn gateway(provider: &str) -> Gateway {
    let dir = TempDir::new("step-down");
    let mut keys = partner_keys();
    let mut clients = String::new();
    // Riverbend is tied to its partner, so it acts for the one facility the partner routes; Oakhaven, with no partner, says whom it acts for.
    for (id, organization) in [("riverbend", String::new()), ("oakhaven", format!("organization = \"{}\"\n", facility_organization("OP-OAKHAVEN")))] {
        let pair = KeyPair::generate_es384(&format!("{id}-1")).unwrap();
        let jwks = dir.0.join(format!("{id}.jwks.json"));
        std::fs::write(&jwks, pair.jwks_json()).unwrap();
        clients.push_str(&format!("[[clients]]\nid = \"{id}\"\nrole = \"outpatient-provider\"\n{organization}jwks_file = {:?}\n", jwks.display().to_string()));
        keys.push((id.to_string(), pair));
    }
    let extra = format!(
        "[outbox]\npoll_interval_ms = 50\n\n[[partners]]\nname = \"riverbend\"\nkind = \"outpatient-provider\"\nfhir_base = \"{provider}\"\nroutes = [\"OP-RIVERBEND\"]\nclients = [\"riverbend\"]\nauth = \"none\"\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\n\n{clients}"
    );
    let text = config_text(&dir.0, &keys, &extra);
    Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
}

/// The discharge batch: the client with coverage first (as at enrollment), then the episode's records
/// (the client again: the summary collects the Patient) with the consent naming the step-down provider
/// and the referral carrying it.
pub(super) fn discharge_batch() -> (Value, Value) {
    let mut episode = records("discharge/completed-with-summary.json");
    episode[0]["coverage"] = json!({"payer_id": "PAYER-77", "payer_name": "Synthetic Health Plan", "member_id": "MBR-1004-01", "relationship": "self", "start": "2026-01-01"});
    let client = episode[0].clone();
    let consent = records("consent/part2-to-step-down.json")[1].clone();
    let referral = episode.as_array_mut().unwrap().iter_mut().find(|r| r["record_type"] == "referral").unwrap();
    referral["consent_ids"] = json!(["CON-1004-1"]);
    episode.as_array_mut().unwrap().insert(1, consent);
    (json!([client]), episode)
}

/// Waits (bounded) until the provider has received `n` requests.
pub(super) async fn received(provider: &MockServer, n: usize) -> Vec<wiremock::Request> {
    for _ in 0..300 {
        let got = provider.received_requests().await.unwrap();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the provider did not receive {n} requests");
}

/// Waits (bounded) until an outbox message reaches `status`.
async fn message_status(gw: &Gateway, id: &str, status: &str) -> Value {
    let ops = gw.token("ops").await;
    for _ in 0..300 {
        let (_, shown) = gw.get(&ops, &format!("admin/outbox/{id}")).await;
        if shown["status"] == status {
            return shown;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, shown) = gw.get(&ops, &format!("admin/outbox/{id}")).await;
    panic!("message {id} is not {status}: {shown}");
}

/// The clinic's outbound referral record REF-1004-OUT.
async fn outbound_referral(gw: &Gateway, clinic: &str) -> Value {
    let (status, found) = gw.get(clinic, "iop/records?record_type=referral&direction=outbound").await;
    assert_eq!(status, 200, "{found}");
    found.as_array().unwrap().iter().find(|r| r["id"] == "REF-1004-OUT").cloned().unwrap_or_else(|| panic!("no outbound referral: {found}"))
}

/// A provider's answer to `$process-message`: a response message naming the referral it took.
pub(super) fn acknowledgement(sent: &Value) -> String {
    json!({
        "resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "message", "timestamp": "2026-02-27T17:00:00Z",
        "entry": [{"fullUrl": "urn:uuid:2d7c5a3e-7d4b-4c60-9b2c-0d1f0b1e2a11", "resource": {
            "resourceType": "MessageHeader", "id": "2d7c5a3e-7d4b-4c60-9b2c-0d1f0b1e2a11",
            "eventCoding": {"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "I12"},
            "source": {"endpoint": "https://riverbend.example/fhir"},
            "response": {"identifier": sent["entry"][0]["resource"]["id"], "code": "ok"}
        }}]
    })
    .to_string()
}

/// The resource of a message's entries with the given type.
fn of_type<'a>(message: &'a Value, resource_type: &str) -> Vec<&'a Value> {
    message["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).filter(|r| r["resourceType"] == resource_type).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_down_referral_goes_once_through_an_outage_and_the_providers_acceptance_comes_back() {
    // The provider is down (nothing listens) when the discharge is posted.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let gw = gateway(&format!("http://{address}")).await;
    let clinic = gw.token("clinic").await;
    let (client, episode) = discharge_batch();
    assert_eq!(post_records(&gw, &clinic, &client).await.0, 200);
    let (status, summary) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 200, "{summary}");
    let discharge = summary["records"].as_array().unwrap().iter().find(|r| r["record_type"] == "discharge").unwrap();
    assert_eq!(discharge["messages"].as_array().map(Vec::len), Some(1), "one referral message: {summary}");
    let message_id = discharge["messages"][0].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ops = gw.token("ops").await;
    let (_, waiting) = gw.get(&ops, &format!("admin/outbox/{message_id}")).await;
    assert_eq!(waiting["status"], "pending", "{waiting}");
    assert!(waiting["attempts"].as_i64().unwrap() >= 2, "retried while the provider was down: {waiting}");

    // Back, but answering 503 twice before it takes the message.
    let provider = MockServer::builder().listener(std::net::TcpListener::bind(address).unwrap()).start().await;
    Mock::given(method("POST")).and(path("/$process-message")).respond_with(ResponseTemplate::new(503)).up_to_n_times(2).with_priority(1).mount(&provider).await;
    let answer = Arc::new(OnceLock::new());
    let keep = answer.clone();
    Mock::given(method("POST"))
        .and(path("/$process-message"))
        .respond_with(move |request: &wiremock::Request| {
            let sent: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let body = keep.get_or_init(|| acknowledgement(&sent)).clone();
            ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_string(body)
        })
        .with_priority(2)
        .mount(&provider)
        .await;
    message_status(&gw, &message_id, "delivered").await;
    let got = received(&provider, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 3, "two 503s, then taken once; never sent again");
    assert!(got.windows(2).all(|w| w[0].body == w[1].body), "every attempt sends the same bytes");
    assert_eq!(got[0].headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/fhir+json"));

    // The message: BSeR's referral message, valid against BSeR and US Core 6.1.0.
    let sent: Value = serde_json::from_slice(&got[2].body).unwrap();
    let report = bser_validator().validate_json(&iop_gateway::json::parse(&got[2].body).unwrap(), &[]);
    let errors: Vec<String> = report.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect();
    assert_eq!(errors, Vec::<String>::new(), "{sent}");
    assert_eq!(sent["meta"]["profile"], json!(["http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-ReferralMessageBundle"]));
    let claimed = ["/BSeR-ReferralMessageBundle", "/BSeR-ReferralMessageHeader", "/ReferralTask", "/ReferralServiceRequest", "/us-core-"];
    let unchecked: Vec<String> = report.issues.iter().filter(|i| i.message.contains("is not loaded") && claimed.iter().any(|c| i.message.contains(c))).map(ToString::to_string).collect();
    assert_eq!(unchecked, Vec::<String>::new(), "every BSeR and US Core profile claimed was checked");
    assert_eq!(sent["type"], "message");
    let header = &sent["entry"][0]["resource"];
    assert_eq!(header["resourceType"], "MessageHeader");
    assert_eq!((header["eventCoding"]["system"].as_str(), header["eventCoding"]["code"].as_str()), (Some("http://terminology.hl7.org/CodeSystem/v2-0003"), Some("I12")));
    assert_eq!(header["destination"][0]["endpoint"], format!("http://{address}/$process-message"));
    let task = of_type(&sent, "Task")[0].clone();
    assert_eq!(header["focus"][0]["reference"], format!("urn:uuid:{}", task["id"].as_str().unwrap()));
    assert_eq!(task["owner"]["reference"], facility_organization("OP-RIVERBEND").replace("Organization/", "urn:uuid:"), "the mappings' form");
    assert_eq!(task["businessStatus"]["coding"][0]["code"], "2.0");
    for (resource_type, n) in [("Task", 1), ("ServiceRequest", 1), ("Patient", 1), ("Coverage", 1), ("Consent", 1), ("Bundle", 1), ("PractitionerRole", 2)] {
        assert_eq!(of_type(&sent, resource_type).len(), n, "{resource_type} in {sent}");
    }
    let summary_bundle = of_type(&sent, "Bundle")[0];
    assert_eq!(summary_bundle["entry"][0]["resource"]["resourceType"], "Composition", "the discharge summary document travels");
    assert_eq!(outbound_referral(&gw, &clinic).await["status"], "requested");

    // The provider accepts by updating the Task at the gateway, as the Task's owner.
    let riverbend = gw.token("riverbend").await;
    let task_path = format!("Task/{}", task["id"].as_str().unwrap());
    let (status, mut stored) = gw.get(&riverbend, &task_path).await;
    assert_eq!(status, 200, "the provider reads the Task addressed to it: {stored}");
    let before_answer = stored.clone();
    stored["status"] = json!("accepted");
    stored["businessStatus"] = json!({"coding": [{"system": "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS", "code": "3.0"}]});
    let (status, updated) = gw.put(&riverbend, &task_path, &stored).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(outbound_referral(&gw, &clinic).await["status"], "accepted");

    // A write of the Task as read before the answer (its meta.versionId, its progress unchanged) keeps the provider's answer, decided in the write's transaction.
    let (status, rewritten) = gw.put(&clinic, &task_path, &before_answer).await;
    assert_eq!(status, 200, "{rewritten}");
    assert_eq!((rewritten["status"].as_str(), rewritten["businessStatus"]["coding"][0]["code"].as_str()), (Some("accepted"), Some("3.0")), "{rewritten}");

    // The provider may move the Task's progress, not reassign it.
    let mut reassigned = updated.clone();
    reassigned["owner"] = json!({"reference": facility_organization("OP-OAKHAVEN")});
    let (status, refused) = gw.put(&riverbend, &task_path, &reassigned).await;
    assert_eq!(status, 403, "{refused}");
    assert_outcome(&refused);

    // Another provider neither reads nor updates it, and learns nothing of it.
    let oakhaven = gw.token("oakhaven").await;
    let (status, hidden) = gw.get(&oakhaven, &task_path).await;
    assert_eq!(status, 404, "{hidden}");
    let mut declined = updated.clone();
    declined["status"] = json!("rejected");
    // As for any id it cannot see: partners cannot create at ids they choose, so a hidden Task and a free id answer alike (405).
    let (status, refused) = gw.put(&oakhaven, &task_path, &declined).await;
    assert_eq!(status, 405, "{refused}");
    assert_outcome(&refused);
    let (_, search) = gw.get(&oakhaven, "Task").await;
    assert_eq!(search["total"], 0, "{search}");
    assert_eq!(outbound_referral(&gw, &clinic).await["status"], "accepted", "unchanged by the other provider");

    // The same discharge posted again sends nothing more.
    let (status, again) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 200, "{again}");
    assert!(again["records"].as_array().unwrap().iter().all(|r| r["messages"] == json!([])), "{again}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 3);
    // Nor does it move the referral back to requested: the provider's answer stands, in the Task and the record.
    assert_eq!(outbound_referral(&gw, &clinic).await["status"], "accepted", "the re-post keeps the provider's answer");
    let (_, kept) = gw.get(&riverbend, &task_path).await;
    assert_eq!((kept["status"].as_str(), kept["businessStatus"]["coding"][0]["code"].as_str()), (Some("accepted"), Some("3.0")), "{kept}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_declines_by_a_feedback_message_with_its_reason() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/$process-message"))
        .respond_with(|request: &wiremock::Request| {
            let sent: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_string(acknowledgement(&sent))
        })
        .mount(&provider)
        .await;
    let gw = gateway(&provider.uri()).await;
    let clinic = gw.token("clinic").await;
    let (client, episode) = discharge_batch();
    assert_eq!(post_records(&gw, &clinic, &client).await.0, 200);
    let (status, summary) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 200, "{summary}");
    let sent: Value = serde_json::from_slice(&received(&provider, 1).await[0].body).unwrap();
    let header_id = sent["entry"][0]["resource"]["id"].as_str().unwrap().to_string();
    let mut task = of_type(&sent, "Task")[0].clone();
    task["status"] = json!("rejected");
    task["businessStatus"] = json!({"coding": [{"system": "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS", "code": "4.0"}]});
    task["statusReason"] = json!({"text": "No weekly openings until May; referred to the county clinic."});
    let feedback = |answers: &str| {
        json!({
            "resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "message", "timestamp": "2026-03-02T09:00:00Z",
            "entry": [
                {"fullUrl": "urn:uuid:6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21", "resource": {
                    "resourceType": "MessageHeader", "id": "6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21",
                    "eventCoding": {"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "I12"},
                    "source": {"endpoint": "https://riverbend.example/fhir"},
                    "response": {"identifier": answers, "code": "ok"},
                    "focus": [{"reference": format!("Task/{}", task["id"].as_str().unwrap())}]
                }},
                {"fullUrl": format!("https://riverbend.example/fhir/Task/{}", task["id"].as_str().unwrap()), "resource": task.clone()}
            ]
        })
    };
    let riverbend = gw.token("riverbend").await;

    // Feedback naming no message the gateway sent is refused, and says where.
    let (status, refused) = gw.post(&riverbend, "$process-message", &feedback("not-a-message-we-sent")).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["issue"][0]["expression"][0], "MessageHeader.response.identifier", "{refused}");
    assert_eq!(outbound_referral(&gw, &clinic).await["status"], "requested");

    // Another provider's feedback on it finds nothing.
    let oakhaven = gw.token("oakhaven").await;
    let message = feedback(&header_id);
    let (status, hidden) = gw.post(&oakhaven, "$process-message", &message).await;
    assert_eq!(status, 404, "{hidden}");

    let (status, response) = gw.post(&riverbend, "$process-message", &message).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["entry"][0]["resource"]["response"]["identifier"], "6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21");
    let record = outbound_referral(&gw, &clinic).await;
    assert_eq!((record["status"].as_str(), record["status_reason"].as_str()), (Some("declined"), Some("No weekly openings until May; referred to the county clinic.")), "{record}");
    let (_, stored) = gw.get(&clinic, &format!("Task/{}", task["id"].as_str().unwrap())).await;
    assert_eq!((stored["status"].as_str(), stored["businessStatus"]["coding"][0]["code"].as_str(), stored["meta"]["versionId"].as_str()), (Some("rejected"), Some("4.0"), Some("2")));

    // The same message again: the recorded response, nothing written twice.
    let (status, again) = gw.post(&riverbend, "$process-message", &message).await;
    assert_eq!((status, &again), (200, &response));
    let (_, stored) = gw.get(&clinic, &format!("Task/{}", task["id"].as_str().unwrap())).await;
    assert_eq!(stored["meta"]["versionId"], "2");

    // The discharge batch posted again does not move the declined referral back to requested.
    let (status, again) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 200, "{again}");
    let record = outbound_referral(&gw, &clinic).await;
    assert_eq!((record["status"].as_str(), record["status_reason"].as_str()), (Some("declined"), Some("No weekly openings until May; referred to the county clinic.")), "{record}");
    let (_, stored) = gw.get(&clinic, &format!("Task/{}", task["id"].as_str().unwrap())).await;
    assert_eq!((stored["status"].as_str(), stored["businessStatus"]["coding"][0]["code"].as_str()), (Some("rejected"), Some("4.0")), "{stored}");
    assert_eq!(stored["statusReason"]["text"].as_str(), Some("No weekly openings until May; referred to the county clinic."), "{stored}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discharge_without_step_down_sends_nothing_and_one_to_an_unknown_provider_is_refused() {
    let provider = MockServer::start().await;
    Mock::given(method("POST")).and(path("/$process-message")).respond_with(ResponseTemplate::new(200)).mount(&provider).await;
    let gw = gateway(&provider.uri()).await;
    let clinic = gw.token("clinic").await;

    // Stepped up to an inpatient unit: no step-down referral, no message.
    let (status, summary) = post_records(&gw, &clinic, &records("discharge/stepped-up-minimal.json")).await;
    assert_eq!(status, 200, "{summary}");
    assert!(summary["records"].as_array().unwrap().iter().all(|r| r["messages"] == json!([])), "{summary}");

    // A step-down to a facility no outpatient-provider partner routes: refused, with where and how to fix it, and nothing stored.
    let (_, mut episode) = discharge_batch();
    let at = episode.as_array().unwrap().iter().position(|r| r["record_type"] == "referral").unwrap();
    episode[at]["receiving_facility"]["id"] = json!("OP-NOWHERE");
    let (status, refused) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["issue"][0]["expression"][0], format!("records[{at}].receiving_facility.id"), "{refused}");
    assert!(refused["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains("outpatient-provider") || refused.to_string().contains("outpatient-provider"), "{refused}");
    let (status, _) = gw.get(&clinic, "iop/records/discharge/DIS-1004").await;
    assert_eq!(status, 404, "nothing of the batch is stored");

    // A discharge naming a referral the batch does not hold.
    let (_, mut episode) = discharge_batch();
    episode.as_array_mut().unwrap().retain(|r| r["record_type"] != "referral");
    let (status, refused) = post_records(&gw, &clinic, &episode).await;
    assert_eq!(status, 422, "{refused}");
    assert_outcome(&refused);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 0);
    gw.stop().await;
}
