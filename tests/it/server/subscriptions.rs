//! Pended PAS decisions end to end: the payer (wiremock) pends, the gateway creates its one PAS Subscription there, and the final decisions arrive as notifications — with duplicates, a gap filled from `$events`, and a notification without the secret — or, while the Subscription is in error or `$events` fails, by `Claim/$inquire`. Each test counts what reached the payer.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::exchange::{Payer, attended_sessions, decision, pas_response, payer_config, post_records, proposed, records};
use super::support::{Gateway, assert_outcome};

const PARTNER: &str = "synthetic-health";
const REMOTE_ID: &str = "pas-sub-1";
const TOPIC: &str = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic";

/// The fixture's client and two authorizations for the same payer.
fn two_authorizations() -> Value {
    let fixture = records("authorization/initial.json");
    let mut second = fixture[2].clone();
    second["id"] = json!("AUTH-1001-2");
    json!([fixture[0], fixture[1], fixture[2], second])
}

/// A notification Bundle of the R4 backport: the SubscriptionStatus (Parameters) first, then each event's full PAS response Bundle.
fn notification(payer: &MockServer, kind: &str, events: &[(u64, String)]) -> Value {
    let mut parameters = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{}/Subscription/{REMOTE_ID}", payer.uri())}}),
        json!({"name": "topic", "valueCanonical": TOPIC}),
        json!({"name": "status", "valueCode": "active"}),
        json!({"name": "type", "valueCode": kind}),
    ];
    if let Some((last, _)) = events.last() {
        parameters.push(json!({"name": "events-since-subscription-start", "valueString": last.to_string()}));
    }
    let mut entries = vec![json!({"fullUrl": "urn:uuid:0c5e7a3b-0000-4000-8000-00000000a000", "resource": {"resourceType": "Parameters", "parameter": parameters}})];
    for (number, bundle) in events {
        let url = format!("urn:uuid:0c5e7a3b-0000-4000-8000-{number:012}");
        let mut status = entries[0]["resource"]["parameter"].as_array().unwrap().clone();
        status.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": number.to_string()},
            {"name": "timestamp", "valueInstant": "2026-02-05T10:00:00-06:00"},
            {"name": "focus", "valueReference": {"reference": url}}
        ]}));
        entries[0]["resource"]["parameter"] = Value::Array(status);
        entries.push(json!({"fullUrl": url, "resource": serde_json::from_str::<Value>(bundle).unwrap()}));
    }
    json!({"resourceType": "Bundle", "type": "history", "timestamp": "2026-02-05T10:00:00-06:00", "entry": entries})
}

async fn notify(gw: &Gateway, partner: &str, secret: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = gw.http.post(gw.url(&format!("notifications/{partner}"))).header("content-type", "application/fhir+json").body(body.to_string());
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A payer that pends every request and creates Subscriptions (answering with its id and `requested`).
async fn pending_payer() -> MockServer {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "pended" }).mount(&payer).await;
    Mock::given(method("POST"))
        .and(path("/Subscription"))
        .respond_with(|request: &wiremock::Request| {
            let mut created: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            created["id"] = json!(REMOTE_ID);
            ResponseTemplate::new(201).insert_header("location", format!("Subscription/{REMOTE_ID}/_history/1")).set_body_json(created)
        })
        .mount(&payer)
        .await;
    payer
}

/// The Subscriptions the payer received.
async fn subscriptions_created(payer: &MockServer) -> Vec<Value> {
    payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/Subscription").map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

/// Posts the records, waits for every authorization to be pended and for the payer's answer to the Subscription create to be recorded; the secret the payer got.
async fn pended(gw: &Gateway, payer: &MockServer, clinic: &str, input: &Value, authorizations: &[&str]) -> String {
    let (status, summary) = post_records(gw, clinic, input).await;
    assert_eq!(status, 200, "{summary}");
    for id in authorizations {
        decision(gw, clinic, id, "pended").await;
    }
    let store = &gw.running.as_ref().unwrap().store;
    for _ in 0..200 {
        if store.subscription(PARTNER).await.unwrap().is_some_and(|s| s.remote_id == REMOTE_ID) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(store.subscription(PARTNER).await.unwrap().map(|s| s.remote_id).as_deref(), Some(REMOTE_ID), "the payer's id for the Subscription is recorded");
    let created = subscriptions_created(payer).await;
    let header = created[0]["channel"]["header"][0].as_str().unwrap();
    header.strip_prefix("Authorization: Bearer ").expect("the secret travels as a bearer header").to_string()
}

async fn claim_responses(gw: &Gateway, token: &str) -> u64 {
    let (status, bundle) = gw.get(token, "ClaimResponse").await;
    assert_eq!(status, 200, "{bundle}");
    bundle["total"].as_u64().unwrap()
}

async fn decisions_for(gw: &Gateway, token: &str, authorization_id: &str) -> Vec<Value> {
    let (status, found) = gw.get(token, &format!("iop/records?record_type=decision&authorization_id={authorization_id}")).await;
    assert_eq!(status, 200, "{found}");
    found.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pended_authorizations_are_decided_through_one_subscription_and_a_duplicate_changes_nothing() {
    let payer = pending_payer().await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let secret = pended(&gw, &payer, &clinic, &two_authorizations(), &["AUTH-1001-1", "AUTH-1001-2"]).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let created = subscriptions_created(&payer).await;
    assert_eq!(created.len(), 1, "one Subscription for two pended authorizations of one payer");
    let subscription = &created[0];
    assert_eq!(subscription["criteria"], TOPIC);
    assert_eq!(subscription["status"], "requested");
    assert_eq!(subscription["meta"]["profile"][0], "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-subscription");
    assert_eq!(subscription["_criteria"]["extension"][0]["url"], "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria");
    assert!(subscription["_criteria"]["extension"][0]["valueString"].as_str().unwrap().starts_with("org-identifier="), "{subscription}");
    assert_eq!(subscription["channel"]["type"], "rest-hook");
    assert_eq!(subscription["channel"]["endpoint"], gw.url("notifications/synthetic-health").as_str());
    assert_eq!(subscription["channel"]["_payload"]["extension"][0]["valueCode"], "full-resource");
    let store = &gw.running.as_ref().unwrap().store;
    let row = store.subscription(PARTNER).await.unwrap().unwrap();
    assert!(!row.secret_hash.contains(&secret) && row.secret_hash.len() == 64, "only the secret's hash is stored");
    let (message, _) = store.message(&row.message_id).await.unwrap().unwrap();
    assert!(!message.new.payload.contains(&secret), "the secret leaves the outbox once delivered");
    assert_eq!(row.status, "requested");

    let (status, body) = notify(&gw, PARTNER, Some(&secret), &notification(&payer, "handshake", &[])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(store.subscription(PARTNER).await.unwrap().unwrap().status, "active", "the handshake activates it");
    assert_eq!(claim_responses(&gw, &clinic).await, 2, "the two pended ClaimResponses");

    let event = notification(&payer, "event-notification", &[(1, pas_response("certified", "AUTH-1001-1"))]);
    let (status, body) = notify(&gw, PARTNER, Some(&secret), &event).await;
    assert_eq!(status, 200, "{body}");
    let decided = decisions_for(&gw, &clinic, "AUTH-1001-1").await;
    assert_eq!(decided.len(), 1, "the final decision replaces the pended one: {decided:?}");
    assert_eq!(decided[0]["outcome"], "certified");
    assert!(decided[0]["certification_number"].is_string(), "{decided:?}");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-2").await[0]["outcome"], "pended");
    assert_eq!(claim_responses(&gw, &clinic).await, 3);

    // The same event again, even with other content, is a duplicate: nothing changes.
    let duplicate = notification(&payer, "event-notification", &[(1, pas_response("not-certified", "AUTH-1001-1"))]);
    let (status, body) = notify(&gw, PARTNER, Some(&secret), &duplicate).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-1").await[0]["outcome"], "certified");
    assert_eq!(claim_responses(&gw, &clinic).await, 3);
    assert_eq!(store.subscription(PARTNER).await.unwrap().unwrap().last_event, 1);

    let heartbeat = notification(&payer, "heartbeat", &[]);
    assert_eq!(notify(&gw, PARTNER, Some(&secret), &heartbeat).await.0, 200);
    let submits = payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/Claim/$submit").count();
    assert_eq!(submits, 2, "nothing is polled or resent while the subscription works");
    assert_eq!(subscriptions_created(&payer).await.len(), 1);
    gw.stop().await;
}

/// A gateway for the payer, on SQLite or, given a schema, on the PostgreSQL the server tests use.
async fn gateway(payer: &MockServer, schema: Option<&str>) -> Gateway {
    gateway_with(payer, schema, "").await
}

/// As [`gateway`], with more keys for the payer's `[[partners]]` entry.
async fn gateway_with(payer: &MockServer, schema: Option<&str>, extra: &str) -> Gateway {
    let Some(schema) = schema else { return Gateway::start_with(&payer_config(&payer.uri(), extra)).await };
    let dir = super::support::TempDir::new("subs-pg");
    let keys = super::support::partner_keys();
    let url = crate::need::postgres_url();
    let text = super::support::config_text(&dir.0, &keys, &payer_config(&payer.uri(), extra)).replacen("[store]\n", &format!("[store]\nurl = \"{url}\"\nschema = \"{schema}\"\n"), 1);
    Gateway::start_loaded(super::support::load(&text, &dir.0), keys, dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_event_numbers_is_filled_from_the_payers_events_first() {
    gap_filled_from_events(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_event_numbers_is_filled_from_the_payers_events_first_on_postgres() {
    if crate::need::postgres("server::subscriptions::a_gap_in_event_numbers_is_filled_from_the_payers_events_first_on_postgres").is_none() {
        return;
    }
    let schema = super::postgres::schema_name("subs");
    gap_filled_from_events(Some(&schema)).await;
    super::postgres::drop_schema(&schema).await;
}

async fn gap_filled_from_events(schema: Option<&str>) {
    let payer = pending_payer().await;
    let missed = notification(&payer, "query-event", &[(1, pas_response("certified", "AUTH-1001-1"))]);
    Mock::given(method("GET"))
        .and(path(format!("/Subscription/{REMOTE_ID}/$events")))
        .and(query_param("eventsSinceNumber", "1"))
        .and(query_param("eventsUntilNumber", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&missed))
        .mount(&payer)
        .await;
    let gw = gateway(&payer, schema).await;
    let clinic = gw.token("clinic").await;
    let secret = pended(&gw, &payer, &clinic, &two_authorizations(), &["AUTH-1001-1", "AUTH-1001-2"]).await;

    // Event 1 never arrived; event 2 does.
    let event = notification(&payer, "event-notification", &[(2, pas_response("not-certified", "AUTH-1001-2"))]);
    let (status, body) = notify(&gw, PARTNER, Some(&secret), &event).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-1").await[0]["outcome"], "certified", "the missed event was fetched and applied");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-2").await[0]["outcome"], "not_certified");
    let calls: Vec<_> = payer.received_requests().await.unwrap().into_iter().filter(|r| r.url.path().ends_with("/$events")).collect();
    assert_eq!(calls.len(), 1, "$events is asked once");
    assert_eq!(calls[0].url.query(), Some("eventsSinceNumber=1&eventsUntilNumber=1"));
    assert_eq!(gw.running.as_ref().unwrap().store.subscription(PARTNER).await.unwrap().unwrap().last_event, 2);
    assert_eq!(claim_responses(&gw, &clinic).await, 4);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_without_the_subscriptions_secret_is_refused_and_changes_nothing() {
    let payer = pending_payer().await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let (clinic, ops) = (gw.token("clinic").await, gw.token("ops").await);
    let input = records("authorization/initial.json");
    let secret = pended(&gw, &payer, &clinic, &input, &["AUTH-1001-1"]).await;

    let event = notification(&payer, "event-notification", &[(1, pas_response("certified", "AUTH-1001-1"))]);
    // The last hex digit changed (appending a fixed '0' left the secret right one time in sixteen).
    let wrong = format!("{}{}", &secret[..secret.len() - 1], if secret.ends_with('0') { '1' } else { '0' });
    for (partner, presented) in [(PARTNER, Some(wrong.as_str())), (PARTNER, None), (PARTNER, Some(clinic.as_str())), ("no-such-payer", Some(secret.as_str()))] {
        let (status, body) = notify(&gw, partner, presented, &event).await;
        assert_eq!(status, 401, "{partner} {presented:?}: {body}");
        assert_outcome(&body);
    }
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-1").await[0]["outcome"], "pended");
    assert_eq!(claim_responses(&gw, &clinic).await, 1);
    assert_eq!(gw.running.as_ref().unwrap().store.subscription(PARTNER).await.unwrap().unwrap().last_event, 0);
    let (status, audit) = gw.get(&ops, "AuditEvent?altid=partner:synthetic-health&outcome=4").await;
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["total"], 3, "every refusal is audited: {audit}");

    // The right secret still works afterwards.
    assert_eq!(notify(&gw, PARTNER, Some(&secret), &event).await.0, 200);
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-1").await[0]["outcome"], "certified");
    gw.stop().await;
}

/// Sessions attended while the authorization is pended; the certification the notification brings is
/// already low (two of twelve days left), so the utilization rule acts on the decision itself, with no further intake.
async fn pended_then_certified_with_sessions_attended(gw: &Gateway, payer: &MockServer, clinic: &str) -> String {
    let mut input = records("authorization/initial.json");
    input.as_array_mut().unwrap().push(records("enrollment/active.json"));
    let secret = pended(gw, payer, clinic, &input, &["AUTH-1001-1"]).await;
    let (status, summary) = post_records(gw, clinic, &attended_sessions(10)).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(proposed(gw, clinic).await, Vec::<Value>::new(), "pended: nothing to extend yet");
    let event = notification(payer, "event-notification", &[(1, pas_response("certified", "AUTH-1001-1"))]);
    let (status, body) = notify(gw, PARTNER, Some(&secret), &event).await;
    assert_eq!(status, 200, "{body}");
    let certified = decision(gw, clinic, "AUTH-1001-1", "certified").await;
    certified["certification_number"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certification_already_low_when_it_arrives_gets_its_extension_request_at_once() {
    let payer = pending_payer().await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let certification = pended_then_certified_with_sessions_attended(&gw, &payer, &clinic).await;
    // The notification was answered after the rule ran: the proposal is there already.
    let held = proposed(&gw, &clinic).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((&held[0]["id"], &held[0]["extends_certification"], &held[0]["client_id"]), (&json!("AUTH-1001-1-EXT"), &json!(certification), &json!("C-1001")), "{}", held[0]);
    assert_eq!((&held[0]["start"], &held[0]["units"]), (&json!("2026-02-07"), &json!(12)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submits = payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/Claim/$submit").count();
    assert_eq!(submits, 1, "a held proposal is not sent");

    // The next intake finds the same certification already extended: still one proposal.
    let (status, _) = post_records(&gw, &clinic, &attended_sessions(11)).await;
    assert_eq!(status, 200);
    assert_eq!(proposed(&gw, &clinic).await.len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_extend_a_certification_already_low_when_it_arrives_is_extended_at_the_payer_once() {
    let payer = pending_payer().await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "auto_extend = true")).await;
    let clinic = gw.token("clinic").await;
    let certification = pended_then_certified_with_sessions_attended(&gw, &payer, &clinic).await;
    // Sent as the gateway's own, through intake: queued, delivered, and pended in turn by this payer.
    decision(&gw, &clinic, "AUTH-1001-1-EXT", "pended").await;
    let (status, _) = post_records(&gw, &clinic, &attended_sessions(11)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submits: Vec<Value> = payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/Claim/$submit").map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    assert_eq!(submits.len(), 2, "the initial request and one extension");
    assert_eq!(submits[1]["entry"][0]["resource"]["identifier"][0]["value"], "AUTH-1001-1-EXT");
    assert_eq!(proposed(&gw, &clinic).await, Vec::<Value>::new(), "nothing held");
    let (status, sent) = gw.get(&clinic, "iop/records/authorization/AUTH-1001-1-EXT").await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["extends_certification"], json!(certification), "{sent}");
    gw.stop().await;
}

const INQUIRY_REQUEST_BUNDLE: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-inquiry-request-bundle";
const CLAIM_INQUIRY: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim-inquiry";

/// A fixture decision as a PAS inquiry response Bundle, inside the operation's Parameters (`wrapped`) or alone.
fn inquiry_response(decision: &str, authorization_id: &str, wrapped: bool) -> Value {
    let mut bundle: Value = serde_json::from_str(&pas_response(decision, authorization_id)).unwrap();
    bundle["meta"]["profile"] = json!(["http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-inquiry-response-bundle"]);
    bundle["entry"][0]["resource"]["meta"]["profile"] = json!(["http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claiminquiryresponse"]);
    if wrapped { json!({"resourceType": "Parameters", "parameter": [{"name": "return", "resource": bundle}]}) } else { bundle }
}

/// A payer's `$inquire`: the n-th inquiry is answered with the n-th decision (the last one repeated) about the authorization it asks about; each inquiry is kept with when it arrived.
#[derive(Clone)]
struct Inquirer {
    decisions: Vec<&'static str>,
    wrapped: bool,
    received: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, Value)>>>,
}

impl Inquirer {
    fn new(decisions: &[&'static str], wrapped: bool) -> Inquirer {
        Inquirer { decisions: decisions.to_vec(), wrapped, received: Default::default() }
    }

    fn inquiries(&self) -> Vec<(std::time::Instant, Value)> {
        self.received.lock().unwrap().clone()
    }

    async fn mount(&self, payer: &MockServer) {
        Mock::given(method("POST")).and(path("/Claim/$inquire")).respond_with(self.clone()).mount(payer).await;
    }
}

impl wiremock::Respond for Inquirer {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let inquiry: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let authorization_id = inquiry["entry"][0]["resource"]["identifier"][0]["value"].as_str().unwrap_or_default().to_string();
        let mut received = self.received.lock().unwrap();
        let decision = self.decisions[received.len().min(self.decisions.len() - 1)];
        received.push((std::time::Instant::now(), inquiry));
        ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_json(inquiry_response(decision, &authorization_id, self.wrapped))
    }
}

/// Waits (bounded) until the payer got at least `n` inquiries.
async fn inquired(inquirer: &Inquirer, n: usize) -> Vec<(std::time::Instant, Value)> {
    for _ in 0..200 {
        if inquirer.inquiries().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let got = inquirer.inquiries();
    assert!(got.len() >= n, "{} inquiries, expected {n}", got.len());
    got
}

fn with_status(mut notification: Value, status: &str) -> Value {
    notification["entry"][0]["resource"]["parameter"][2] = json!({"name": "status", "valueCode": status});
    notification
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_makes_the_gateway_inquire_at_the_interval_until_the_final_decision() {
    inquired_while_in_error(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_makes_the_gateway_inquire_at_the_interval_until_the_final_decision_on_postgres() {
    if crate::need::postgres("server::subscriptions::a_refused_subscription_makes_the_gateway_inquire_at_the_interval_until_the_final_decision_on_postgres").is_none() {
        return;
    }
    let schema = super::postgres::schema_name("inquire");
    inquired_while_in_error(Some(&schema)).await;
    super::postgres::drop_schema(&schema).await;
}

async fn inquired_while_in_error(schema: Option<&str>) {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "pended" }).mount(&payer).await;
    let refusal = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "details": {"text": "Subscriptions are not offered"}}]});
    Mock::given(method("POST")).and(path("/Subscription")).respond_with(ResponseTemplate::new(400).set_body_json(&refusal)).mount(&payer).await;
    let inquirer = Inquirer::new(&["pended", "certified"], true);
    inquirer.mount(&payer).await;
    let gw = gateway_with(&payer, schema, "inquire_interval_secs = 1").await;
    let clinic = gw.token("clinic").await;
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");

    let certified = decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    assert!(certified["certification_number"].is_string(), "{certified}");
    let store = &gw.running.as_ref().unwrap().store;
    assert_eq!(store.subscription(PARTNER).await.unwrap().unwrap().status, "error", "the refused create leaves the Subscription in error");
    let inquiries = inquirer.inquiries();
    assert_eq!(inquiries.len(), 2, "one inquiry answered pended, the next one a final decision");
    let gap = inquiries[1].0 - inquiries[0].0;
    assert!(gap >= Duration::from_millis(800), "inquiries come at the configured interval, not back to back: {gap:?}");
    for (_, inquiry) in &inquiries {
        assert_eq!(inquiry["meta"]["profile"][0], INQUIRY_REQUEST_BUNDLE);
        assert_eq!(inquiry["type"], "collection");
        let claim = &inquiry["entry"][0]["resource"];
        assert_eq!((claim["resourceType"].as_str(), claim["meta"]["profile"][0].as_str()), (Some("Claim"), Some(CLAIM_INQUIRY)), "{claim}");
        assert_eq!(claim["identifier"], json!([{"system": "http://iop-gateway.org/fhir/sid/authorization-id", "value": "AUTH-1001-1"}]));
        assert!(claim.get("supportingInfo").is_none(), "a query by example carries no supporting information");
    }
    assert_ne!(inquiries[0].1["identifier"], inquiries[1].1["identifier"], "each inquiry is a transaction of its own");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-1").await.len(), 1, "exactly one decision record");
    assert_eq!(claim_responses(&gw, &clinic).await, 2, "the pended and the final ClaimResponse; a still-pended inquiry answer changes nothing");

    // Decided: nothing is pended any more, so nothing more is asked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(inquirer.inquiries().len(), 2);
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.iter().filter(|r| r.url.path() == "/Claim/$submit").count(), 1);
    assert_eq!(received.iter().filter(|r| r.url.path() == "/Subscription").count(), 1, "a refused create is a dead letter, not retried");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_inquired_while_the_subscription_is_active_and_inquiries_stop_when_it_is_active_again() {
    let payer = pending_payer().await;
    let inquirer = Inquirer::new(&["pended"], true);
    inquirer.mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "inquire_interval_secs = 1")).await;
    let clinic = gw.token("clinic").await;
    let secret = pended(&gw, &payer, &clinic, &two_authorizations(), &["AUTH-1001-1", "AUTH-1001-2"]).await;
    assert_eq!(notify(&gw, PARTNER, Some(&secret), &notification(&payer, "handshake", &[])).await.0, 200);

    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(inquirer.inquiries().len(), 0, "PAS asks clients not to poll a pended request while the subscription works");

    let (status, body) = notify(&gw, PARTNER, Some(&secret), &with_status(notification(&payer, "heartbeat", &[]), "error")).await;
    assert_eq!(status, 200, "{body}");
    let asked = inquired(&inquirer, 2).await;
    let mut about: Vec<String> = asked.iter().map(|(_, i)| i["entry"][0]["resource"]["identifier"][0]["value"].as_str().unwrap().to_string()).collect();
    about.sort();
    assert_eq!(about[..2], ["AUTH-1001-1", "AUTH-1001-2"], "every pended authorization at the payer is asked about");

    assert_eq!(notify(&gw, PARTNER, Some(&secret), &notification(&payer, "heartbeat", &[])).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = inquirer.inquiries().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(inquirer.inquiries().len(), settled, "active again: the inquiries stop");
    for id in ["AUTH-1001-1", "AUTH-1001-2"] {
        let decided = decisions_for(&gw, &clinic, id).await;
        assert_eq!((decided.len(), decided[0]["outcome"].as_str()), (1, Some("pended")), "a still-pended answer changes nothing");
    }
    assert_eq!(claim_responses(&gw, &clinic).await, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_events_that_events_cannot_return_are_made_up_for_by_one_inquiry() {
    let payer = pending_payer().await;
    Mock::given(method("GET")).and(path(format!("/Subscription/{REMOTE_ID}/$events"))).respond_with(ResponseTemplate::new(500)).mount(&payer).await;
    let inquirer = Inquirer::new(&["certified"], false);
    inquirer.mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let secret = pended(&gw, &payer, &clinic, &two_authorizations(), &["AUTH-1001-1", "AUTH-1001-2"]).await;
    assert_eq!(notify(&gw, PARTNER, Some(&secret), &notification(&payer, "handshake", &[])).await.0, 200);

    // Event 1 never arrived and $events fails; event 2 decides the second authorization.
    let event = notification(&payer, "event-notification", &[(2, pas_response("not-certified", "AUTH-1001-2"))]);
    let (status, body) = notify(&gw, PARTNER, Some(&secret), &event).await;
    assert_eq!(status, 200, "{body}");
    let certified = decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    assert!(certified["certification_number"].is_string(), "{certified}");
    assert_eq!(decisions_for(&gw, &clinic, "AUTH-1001-2").await[0]["outcome"], "not_certified");
    let asked = inquirer.inquiries();
    assert_eq!(asked.len(), 1, "one inquiry, for the authorization the notification left pended");
    assert_eq!(asked[0].1["entry"][0]["resource"]["identifier"][0]["value"], "AUTH-1001-1");
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.iter().filter(|r| r.url.path().ends_with("/$events")).count(), 1);

    // The same notification again is a duplicate: nothing is missing any more, nothing is asked.
    assert_eq!(notify(&gw, PARTNER, Some(&secret), &event).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inquirer.inquiries().len(), 1);
    for id in ["AUTH-1001-1", "AUTH-1001-2"] {
        assert_eq!(decisions_for(&gw, &clinic, id).await.len(), 1);
    }
    assert_eq!(claim_responses(&gw, &clinic).await, 4, "two pended, one by event, one by inquiry");
    gw.stop().await;
}
