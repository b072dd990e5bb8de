//! Partners' topic-based Subscriptions (Subscriptions R5 Backport, the gateway as the server) against wiremock subscriber endpoints: handshake, id-only and full-resource notifications (validated), heartbeats, `$status`, `$events`, a partner down for a while, an endpoint that keeps failing, what a partner may not read, and refused Subscriptions.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys};

const TOPIC: &str = "http://iop-gateway.org/fhir/SubscriptionTopic/referral-task-changed";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// A subscriber endpoint: answers with the current status (200 unless set), and keeps every notification it answered 2xx.
#[derive(Clone)]
struct Endpoint {
    answer: Arc<AtomicU16>,
    taken: Arc<Mutex<Vec<Value>>>,
    headers: Arc<Mutex<Vec<String>>>,
}

impl Endpoint {
    fn new() -> Endpoint {
        Endpoint { answer: Arc::new(AtomicU16::new(200)), taken: Arc::default(), headers: Arc::default() }
    }

    fn answer(&self, status: u16) {
        self.answer.store(status, Ordering::SeqCst);
    }

    fn taken(&self) -> Vec<Value> {
        self.taken.lock().unwrap().clone()
    }

    /// The notifications taken of one type (`handshake`, `heartbeat`, `event-notification`).
    fn of_type(&self, kind: &str) -> Vec<Value> {
        self.taken().into_iter().filter(|b| notification_type(b) == kind).collect()
    }

    async fn mount(&self) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(self.clone()).mount(&server).await;
        server
    }
}

impl Respond for Endpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let status = self.answer.load(Ordering::SeqCst);
        if (200..300).contains(&status) {
            self.taken.lock().unwrap().push(serde_json::from_slice(&request.body).unwrap_or(Value::Null));
            let auth = request.headers.get("x-hook-secret").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            self.headers.lock().unwrap().push(auth);
        }
        ResponseTemplate::new(status)
    }
}

fn status_parameter<'a>(bundle: &'a Value, name: &str) -> Option<&'a Value> {
    bundle["entry"][0]["resource"]["parameter"].as_array()?.iter().find(|p| p["name"] == name)
}

fn notification_type(bundle: &Value) -> String {
    status_parameter(bundle, "type").and_then(|p| p["valueCode"].as_str()).unwrap_or_default().to_string()
}

/// The event numbers a notification carries, with each focus.
fn events(bundle: &Value) -> Vec<(u64, String)> {
    let parameters = bundle["entry"][0]["resource"]["parameter"].as_array().cloned().unwrap_or_default();
    parameters
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            let parts = p["part"].as_array().unwrap();
            let part = |name: &str| parts.iter().find(|q| q["name"] == name).cloned().unwrap_or(Value::Null);
            (part("event-number")["valueString"].as_str().unwrap().parse().unwrap(), part("focus")["valueReference"]["reference"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// A gateway whose partners may call back under the given prefixes, with fast retries and heartbeats.
async fn gateway(callbacks: &[(&str, String)], topics: &str, postgres: Option<(&str, &str)>) -> Gateway {
    let dir = TempDir::new("topics");
    let keys = partner_keys();
    let mut text = config_text(&dir.0, &keys, "");
    for (client, prefix) in callbacks {
        let line = format!("id = \"{client}\"\n");
        text = text.replacen(&line, &format!("{line}callbacks = [\"{prefix}\"]\n"), 1);
    }
    if let Some((url, schema)) = postgres {
        text = text.replacen("[store]\n", &format!("[store]\nurl = \"{url}\"\nschema = \"{schema}\"\n"), 1);
    }
    text.push_str(&format!(
        "[outbox]\npoll_interval_ms = 50\n\n[topics]\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\nmin_heartbeat_secs = 1\nheartbeat_check_ms = 100\n{topics}\n"
    ));
    Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
}

fn subscription(endpoint: &str, filter: Option<&str>, payload: &str, heartbeat: Option<u64>) -> Value {
    let mut s = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
        "status": "requested",
        "reason": "Hear about our referrals",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}backport-payload-content"), "valueCode": payload}]},
            "header": ["X-Hook-Secret: s3cret"]
        }
    });
    if let Some(filter) = filter {
        s["_criteria"] = json!({"extension": [{"url": format!("{BACKPORT}backport-filter-criteria"), "valueString": filter}]});
    }
    if let Some(period) = heartbeat {
        s["channel"]["extension"] = json!([{"url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": period}]);
    }
    s
}

/// A referral Task the clinic writes, requested by `requester` and owned by the program.
fn task(requester: &str) -> Value {
    json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "requester": {"reference": requester},
        "owner": {"reference": "Organization/iop-program"},
        "authoredOn": "2026-03-01T10:00:00Z"
    })
}

async fn subscribe(gw: &Gateway, token: &str, body: &Value) -> String {
    let (status, created) = gw.post(token, "Subscription", body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "requested");
    created["id"].as_str().unwrap().to_string()
}

/// Waits (bounded) until a condition (which may `.await`) holds.
macro_rules! until {
    ($what:expr, $check:expr) => {{
        let mut held = false;
        for _ in 0..300 {
            if $check {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(held, "timed out waiting for {}", $what);
    }};
}

async fn status_of(gw: &Gateway, token: &str, id: &str) -> String {
    let (status, read) = gw.get(token, &format!("Subscription/{id}")).await;
    assert_eq!(status, 200, "{read}");
    read["status"].as_str().unwrap().to_string()
}

async fn active(gw: &Gateway, token: &str, id: &str) {
    until!("the handshake to make the Subscription active", status_of(gw, token, id).await == "active");
}

/// Validates a notification with the gateway's own `$validate` (R4 Bundle and Parameters rules).
async fn assert_valid(gw: &Gateway, clinic: &str, bundle: &Value) {
    let (status, outcome) = gw.post(clinic, "Bundle/$validate", bundle).await;
    assert_eq!(status, 200, "{outcome}");
    let errors: Vec<&Value> = outcome["issue"].as_array().unwrap().iter().filter(|i| i["severity"] == "error" || i["severity"] == "fatal").collect();
    assert!(errors.is_empty(), "{outcome}");
}

async fn create_task(gw: &Gateway, clinic: &str, requester: &str) -> Value {
    let (status, created) = gw.post(clinic, "Task", &task(requester)).await;
    assert_eq!(status, 201, "{created}");
    created
}

/// The round every backend runs: two Subscriptions of unit-a (id-only, full-resource), their handshakes, and the
/// events of a referral Task created and accepted by the clinic; another partner's referral raises none.
async fn referral_round(gw: &Gateway, a: &Endpoint, server: &MockServer) {
    let clinic = gw.token("clinic").await;
    let unit_a = gw.token("unit-a").await;
    let id_only = subscribe(gw, &unit_a, &subscription(&format!("{}/hooks/id-only", server.uri()), Some("Task?requester=Organization/unit-a"), "id-only", None)).await;
    let full = subscribe(gw, &unit_a, &subscription(&format!("{}/hooks/full", server.uri()), Some("requester=Organization/unit-a"), "full-resource", None)).await;
    active(gw, &unit_a, &id_only).await;
    active(gw, &unit_a, &full).await;
    assert_eq!(a.of_type("handshake").len(), 2);
    let handshake = &a.of_type("handshake")[0];
    assert_eq!(status_parameter(handshake, "status").unwrap()["valueCode"], "requested");
    assert_valid(gw, &clinic, handshake).await;

    let created = create_task(gw, &clinic, "Organization/unit-a").await;
    let task_id = created["id"].as_str().unwrap().to_string();
    // Another partner's referral raises no event for unit-a's Subscriptions.
    create_task(gw, &clinic, "Organization/unit-b").await;
    let mut accepted = created.clone();
    accepted["status"] = json!("accepted");
    let (status, body) = gw.put(&clinic, &format!("Task/{task_id}"), &accepted).await;
    assert_eq!(status, 200, "{body}");
    until!("four event notifications", a.of_type("event-notification").len() >= 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let notifications = a.of_type("event-notification");
    assert_eq!(notifications.len(), 4, "nothing about unit-b's referral, nothing twice");
    let of = |id: &str| -> Vec<Value> {
        notifications.iter().filter(|b| status_parameter(b, "subscription").unwrap()["valueReference"]["reference"].as_str().unwrap().ends_with(&format!("Subscription/{id}"))).cloned().collect()
    };
    for (id, payload) in [(&id_only, "id-only"), (&full, "full-resource")] {
        let mine = of(id);
        let numbers: Vec<u64> = mine.iter().flat_map(events).map(|(n, _)| n).collect();
        assert_eq!(numbers, [1, 2], "{payload}: numbered without gaps, in order");
        for (i, bundle) in mine.iter().enumerate() {
            assert_eq!(bundle["type"], "history");
            assert_eq!(status_parameter(bundle, "events-since-subscription-start").unwrap()["valueString"], (i + 1).to_string());
            assert!(events(bundle)[0].1.ends_with(&format!("Task/{task_id}")), "{bundle}");
            assert_valid(gw, &clinic, bundle).await;
            if payload == "id-only" {
                assert_eq!(bundle["entry"].as_array().unwrap().len(), 1, "id-only carries no resource");
            } else {
                let resource = &bundle["entry"][1]["resource"];
                assert_eq!(resource["id"], task_id.as_str());
                assert_eq!(resource["meta"]["versionId"], (i + 1).to_string());
                assert_eq!(resource["status"], if i == 0 { "requested" } else { "accepted" });
            }
        }
    }
    assert!(a.headers.lock().unwrap().iter().all(|h| h == "s3cret"), "channel.header travels as HTTP headers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_then_id_only_and_full_resource_notifications_numbered_without_gaps() {
    let a = Endpoint::new();
    let server = a.mount().await;
    let gw = gateway(&[("unit-a", format!("{}/hooks/", server.uri()))], "", None).await;
    referral_round(&gw, &a, &server).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_round_on_postgresql() {
    let Some(url) = crate::need::postgres("server::topics::the_same_round_on_postgresql") else { return };
    let schema = super::postgres::schema_name("topics");
    let a = Endpoint::new();
    let server = a.mount().await;
    let gw = gateway(&[("unit-a", format!("{}/hooks/", server.uri()))], "", Some((&url, &schema))).await;
    referral_round(&gw, &a, &server).await;
    gw.stop().await;
    super::postgres::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_is_told_nothing_about_what_it_may_not_read() {
    let b = Endpoint::new();
    let server = b.mount().await;
    let gw = gateway(&[("unit-b", format!("{}/", server.uri()))], "", None).await;
    let clinic = gw.token("clinic").await;
    let unit_b = gw.token("unit-b").await;
    // unit-b asks about unit-a's referrals, and about everything.
    let snooping = subscribe(&gw, &unit_b, &subscription(&format!("{}/snoop", server.uri()), Some("Task?requester=Organization/unit-a"), "id-only", None)).await;
    let everything = subscribe(&gw, &unit_b, &subscription(&format!("{}/all", server.uri()), None, "full-resource", None)).await;
    active(&gw, &unit_b, &snooping).await;
    active(&gw, &unit_b, &everything).await;
    let theirs = create_task(&gw, &clinic, "Organization/unit-a").await;
    let mut accepted = theirs.clone();
    accepted["status"] = json!("accepted");
    assert_eq!(gw.put(&clinic, &format!("Task/{}", theirs["id"].as_str().unwrap()), &accepted).await.0, 200);
    let own = create_task(&gw, &clinic, "Organization/unit-b").await;
    until!("unit-b's own referral", !b.of_type("event-notification").is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let told = b.of_type("event-notification");
    assert_eq!(told.len(), 1, "only unit-b's own referral: {told:?}");
    assert_eq!(events(&told[0]), [(1, format!("{}/Task/{}", gw.base, own["id"].as_str().unwrap()))]);
    let text = serde_json::to_string(&b.taken()).unwrap();
    assert!(!text.contains(theirs["id"].as_str().unwrap()), "unit-a's Task is never named to unit-b");
    for id in [&snooping, &everything] {
        let (status, replay) = gw.get(&unit_b, &format!("Subscription/{id}/$events")).await;
        assert_eq!(status, 200, "{replay}");
        assert!(!replay.to_string().contains(theirs["id"].as_str().unwrap()));
    }
    let (_, status) = gw.get(&unit_b, &format!("Subscription/{snooping}/$status")).await;
    let parameters = &status["entry"][0]["resource"]["parameter"];
    assert!(parameters.as_array().unwrap().iter().any(|p| p["name"] == "events-since-subscription-start" && p["valueString"] == "0"), "{status}");
    // Each delivered notification is audited as what it disclosed, to whom.
    let ops = gw.token("ops").await;
    let own_ref = format!("Task/{}", own["id"].as_str().unwrap());
    let (_, audited) = gw.get(&ops, &format!("AuditEvent?entity={own_ref}&altid=unit-b&subtype=operation")).await;
    assert_eq!(audited["total"], 1, "{audited}");
    let theirs_ref = format!("Task/{}", theirs["id"].as_str().unwrap());
    let (_, audited) = gw.get(&ops, &format!("AuditEvent?entity={theirs_ref}&altid=unit-b")).await;
    assert_eq!(audited["total"], 0, "{audited}");
    // Nor does another client see unit-b's Subscriptions.
    let unit_a = gw.token("unit-a").await;
    assert_eq!(gw.get(&unit_a, &format!("Subscription/{snooping}")).await.0, 404);
    let (_, listed) = gw.get(&unit_a, "Subscription").await;
    assert_eq!(listed["total"], 0, "{listed}");
    let (_, listed) = gw.get(&unit_b, "Subscription?status=active").await;
    assert_eq!(listed["total"], 2, "{listed}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_status_and_events_replayed_by_number() {
    let a = Endpoint::new();
    let server = a.mount().await;
    let gw = gateway(&[("unit-a", format!("{}/", server.uri()))], "", None).await;
    let clinic = gw.token("clinic").await;
    let unit_a = gw.token("unit-a").await;
    let id = subscribe(&gw, &unit_a, &subscription(&format!("{}/beat", server.uri()), None, "full-resource", Some(1))).await;
    active(&gw, &unit_a, &id).await;
    until!("a heartbeat", !a.of_type("heartbeat").is_empty());
    let heartbeat = &a.of_type("heartbeat")[0];
    assert_eq!(status_parameter(heartbeat, "status").unwrap()["valueCode"], "active");
    assert!(events(heartbeat).is_empty());
    assert_valid(&gw, &clinic, heartbeat).await;

    let first = create_task(&gw, &clinic, "Organization/unit-a").await;
    let second = create_task(&gw, &clinic, "Organization/unit-a").await;
    until!("two events", a.of_type("event-notification").len() == 2);

    let (status, bundle) = gw.get(&unit_a, &format!("Subscription/{id}/$status")).await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["type"], "searchset");
    let parameters = &bundle["entry"][0]["resource"];
    assert_eq!(parameters["resourceType"], "Parameters");
    let named = |name: &str| parameters["parameter"].as_array().unwrap().iter().find(|p| p["name"] == name).cloned().unwrap();
    assert_eq!(named("type")["valueCode"], "query-status");
    assert_eq!(named("status")["valueCode"], "active");
    assert_eq!(named("events-since-subscription-start")["valueString"], "2");

    let (status, replay) = gw.get(&unit_a, &format!("Subscription/{id}/$events")).await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(notification_type(&replay), "query-event");
    assert_eq!(events(&replay).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(replay["entry"][1]["resource"]["id"], first["id"]);
    assert_eq!(replay["entry"][2]["resource"]["id"], second["id"]);
    assert_valid(&gw, &clinic, &replay).await;
    let (_, later) = gw.get(&unit_a, &format!("Subscription/{id}/$events?eventsSinceNumber=2&content=id-only")).await;
    assert_eq!(events(&later).len(), 1);
    assert!(events(&later)[0].1.ends_with(&format!("Task/{}", second["id"].as_str().unwrap())));
    assert_eq!(later["entry"].as_array().unwrap().len(), 1, "content=id-only gives no resources");
    let (status, bad) = gw.get(&unit_a, &format!("Subscription/{id}/$events?eventsSinceNumber=zero")).await;
    assert_eq!(status, 400);
    assert_outcome(&bad);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_down_for_a_while_gets_every_event_once_in_order() {
    let a = Endpoint::new();
    let server = a.mount().await;
    let gw = gateway(&[("unit-a", format!("{}/", server.uri()))], "error_after_failures = 1000", None).await;
    let clinic = gw.token("clinic").await;
    let unit_a = gw.token("unit-a").await;
    let id = subscribe(&gw, &unit_a, &subscription(&format!("{}/down", server.uri()), None, "id-only", None)).await;
    active(&gw, &unit_a, &id).await;
    a.answer(503);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(create_task(&gw, &clinic, "Organization/unit-a").await["id"].as_str().unwrap().to_string());
    }
    // Down for a while: several attempts fail.
    until!("failed attempts", server.received_requests().await.unwrap().len() >= 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(a.of_type("event-notification").is_empty());
    assert_eq!(status_of(&gw, &unit_a, &id).await, "active", "a few failures do not make an error");
    a.answer(200);
    until!("every event", a.of_type("event-notification").len() >= 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let told: Vec<(u64, String)> = a.of_type("event-notification").iter().flat_map(events).collect();
    assert_eq!(told.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "each once, in order");
    for ((_, focus), task) in told.iter().zip(&tasks) {
        assert!(focus.ends_with(&format!("Task/{task}")));
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_puts_the_subscription_in_error_until_its_client_restarts_it() {
    let a = Endpoint::new();
    let server = a.mount().await;
    let gw = gateway(&[("unit-a", format!("{}/", server.uri()))], "error_after_failures = 3", None).await;
    let clinic = gw.token("clinic").await;
    let unit_a = gw.token("unit-a").await;
    let id = subscribe(&gw, &unit_a, &subscription(&format!("{}/failing", server.uri()), None, "id-only", None)).await;
    active(&gw, &unit_a, &id).await;
    a.answer(500);
    create_task(&gw, &clinic, "Organization/unit-a").await;
    until!("the Subscription in error", status_of(&gw, &unit_a, &id).await == "error");
    let attempts = server.received_requests().await.unwrap().len();
    assert_eq!(attempts, 1 + 3, "the handshake, then three failed attempts");
    let (_, status) = gw.get(&unit_a, &format!("Subscription/{id}/$status")).await;
    let parameters = status["entry"][0]["resource"]["parameter"].as_array().unwrap().clone();
    assert!(parameters.iter().any(|p| p["name"] == "status" && p["valueCode"] == "error"), "{status}");
    assert!(parameters.iter().any(|p| p["name"] == "error"), "{status}");
    // In error: events keep their numbers but nothing is sent.
    a.answer(200);
    create_task(&gw, &clinic, "Organization/unit-a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.received_requests().await.unwrap().len(), attempts);
    let (_, replay) = gw.get(&unit_a, &format!("Subscription/{id}/$events")).await;
    assert_eq!(events(&replay).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2], "the missed events are there to recover");
    // The client restarts it: a new handshake, then events flow again, numbered on.
    let (_, mut current) = gw.get(&unit_a, &format!("Subscription/{id}")).await;
    current["status"] = json!("requested");
    let (status, updated) = gw.put(&unit_a, &format!("Subscription/{id}"), &current).await;
    assert_eq!(status, 200, "{updated}");
    active(&gw, &unit_a, &id).await;
    create_task(&gw, &clinic, "Organization/unit-a").await;
    until!("the next event", !a.of_type("event-notification").is_empty());
    assert_eq!(events(&a.of_type("event-notification")[0])[0].0, 3);
    // Off: nothing more.
    current["status"] = json!("off");
    assert_eq!(gw.put(&unit_a, &format!("Subscription/{id}"), &current).await.0, 200);
    create_task(&gw, &clinic, "Organization/unit-a").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.of_type("event-notification").len(), 1);
    // A refused handshake is an error at once.
    a.answer(404);
    let refused = subscribe(&gw, &unit_a, &subscription(&format!("{}/gone", server.uri()), None, "id-only", None)).await;
    until!("the refused handshake's error", status_of(&gw, &unit_a, &refused).await == "error");
    assert_eq!(gw.send(reqwest::Method::DELETE, &unit_a, &format!("Subscription/{refused}"), &Value::Null).await.status(), 204);
    assert_eq!(gw.get(&unit_a, &format!("Subscription/{refused}")).await.0, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscriptions_are_refused_with_located_outcomes() {
    let a = Endpoint::new();
    let server = a.mount().await;
    let other = MockServer::start().await;
    let gw = gateway(&[("unit-a", format!("{}/hooks/", server.uri())), ("unit-b", format!("{}/", other.uri()))], "", None).await;
    let unit_a = gw.token("unit-a").await;
    let good = || subscription(&format!("{}/hooks/1", server.uri()), Some("Task?owner=Organization/unit-a"), "id-only", None);
    let refused = |change: &dyn Fn(&mut Value)| {
        let mut body = good();
        change(&mut body);
        body
    };
    let cases: Vec<(Value, &str)> = vec![
        (refused(&|s| s["criteria"] = json!("http://example.org/SubscriptionTopic/admissions")), "Subscription.criteria"),
        (refused(&|s| s["_criteria"]["extension"][0]["valueString"] = json!("Task?status=requested")), "Subscription.criteria.extension[0].valueString"),
        (refused(&|s| s["_criteria"]["extension"][0]["valueString"] = json!("Encounter?patient=Patient/1")), "Subscription.criteria.extension[0].valueString"),
        (refused(&|s| s["channel"]["type"] = json!("websocket")), "Subscription.channel.type"),
        (refused(&|s| s["channel"]["payload"] = json!("application/fhir+xml")), "Subscription.channel.payload"),
        (refused(&|s| s["channel"]["_payload"]["extension"][0]["valueCode"] = json!("everything")), "Subscription.channel.payload.extension[0].valueCode"),
        (refused(&|s| s["channel"]["endpoint"] = json!(format!("{}/x", other.uri()))), "Subscription.channel.endpoint"),
        (refused(&|s| s["channel"]["endpoint"] = json!(format!("{}/other", server.uri()))), "Subscription.channel.endpoint"),
        (refused(&|s| s["channel"]["endpoint"] = json!("http://169.254.169.254/hooks/")), "Subscription.channel.endpoint"),
        (refused(&|s| s["channel"]["header"] = json!(["Host: evil.example"])), "Subscription.channel.header[0]"),
        (refused(&|s| s["status"] = json!("off")), "Subscription.status"),
    ];
    for (body, at) in cases {
        let (status, outcome) = gw.post(&unit_a, "Subscription", &body).await;
        assert_eq!(status, 422, "{at}: {outcome}");
        assert_outcome(&outcome);
        let located = outcome["issue"].as_array().unwrap().iter().any(|i| i["expression"][0] == at);
        assert!(located, "expected an issue at {at}: {outcome}");
    }
    // Not a Subscription at all: the validator's own located issues.
    let (status, outcome) = gw.post(&unit_a, "Subscription", &json!({"resourceType": "Subscription", "status": "requested"})).await;
    assert_eq!(status, 422, "{outcome}");
    assert_outcome(&outcome);
    // Only the status changes.
    let id = subscribe(&gw, &unit_a, &good()).await;
    let (_, mut current) = gw.get(&unit_a, &format!("Subscription/{id}")).await;
    current["reason"] = json!("something else");
    let (status, outcome) = gw.put(&unit_a, &format!("Subscription/{id}"), &current).await;
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "Subscription.reason");
    // Subscriptions are not stored resources: not inside a transaction either.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": good(), "request": {"method": "POST", "url": "Subscription"}}]});
    let (status, outcome) = gw.post(&unit_a, "", &bundle).await;
    assert!(status == 405 || status == 400, "{status} {outcome}");
    assert_outcome(&outcome);
    let (status, outcome) = gw.get(&unit_a, &format!("Subscription/{id}/_history")).await;
    assert_eq!(status, 404, "{outcome}");
    assert_outcome(&outcome);
    let (status, outcome) = gw.get(&unit_a, "Subscription?criteria=x").await;
    assert_eq!(status, 400);
    assert_outcome(&outcome);
    // A payer may subscribe too (its role's scopes include Subscription), but only to its own callbacks: it has none.
    let payer = gw.token("payer-x").await;
    let (status, outcome) = gw.post(&payer, "Subscription", &good()).await;
    assert_eq!(status, 422, "{outcome}");
    gw.stop().await;
}

#[tokio::test]
async fn the_capability_statement_declares_the_topic() {
    let gw = Gateway::start().await;
    let (status, capability) = gw.get("", "metadata").await;
    assert_eq!(status, 200);
    let resources = capability["rest"][0]["resource"].as_array().unwrap();
    let subscription = resources.iter().find(|r| r["type"] == "Subscription").expect("Subscription is declared");
    let topic = &subscription["extension"][0];
    assert_eq!(topic["url"], "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical");
    assert_eq!(topic["valueCanonical"], TOPIC);
    assert_eq!(subscription["supportedProfile"][0], format!("{BACKPORT}backport-subscription"));
    let operations: Vec<&str> = subscription["operation"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(operations, ["status", "events"]);
    gw.stop().await;
}
