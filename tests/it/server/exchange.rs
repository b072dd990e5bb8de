//! The exchange end to end: the clinic posts IOP records, the gateway submits PAS requests to a payer (a wiremock server answering in the shapes of the PAS examples), and the decision comes back as a record — through retries, refusals, replays and token renewal. Each test counts what reached the payer.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::support::{Gateway, assert_outcome};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The records of a fixture under tests/fixtures/iop.
pub(super) fn records(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/tests/fixtures/iop/{name}")).unwrap()).unwrap()
}

/// A payer that answers `$submit` like a PAS server: the response Bundle of a fixture decision, echoing the submitted authorization's identifier.
pub(super) struct Payer {
    pub(super) decision: &'static str,
}

/// The PAS response Bundle of a fixture decision, deciding on `authorization_id`.
pub(super) fn pas_response(decision: &str, authorization_id: &str) -> String {
    let text = std::fs::read_to_string(format!("{ROOT}/tests/fixtures/pas/decision-{decision}.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let fixture_id = fixture["entry"].as_array().unwrap().iter().find(|e| e["resource"]["resourceType"] == "ClaimResponse").unwrap()["resource"]["identifier"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    text.replace(&fixture_id, authorization_id)
}

impl Respond for Payer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let submitted: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let claim = &submitted["entry"][0]["resource"];
        let authorization_id = claim["identifier"][0]["value"].as_str().unwrap_or_default();
        ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_string(pas_response(self.decision, authorization_id))
    }
}

/// Gateway configuration for one payer at `base`, routed for the fixtures' payer ids.
pub(super) fn payer_config(base: &str, extra: &str) -> String {
    format!(
        "[outbox]\npoll_interval_ms = 50\n\n[[partners]]\nname = \"synthetic-health\"\nkind = \"payer\"\nfhir_base = \"{base}\"\nroutes = [\"PAYER-77\", \"PAYER-12\"]\nauth = \"none\"\nfirst_retry_ms = 50\nmax_backoff_secs = 1\ntimeout_secs = 2\n{extra}\n"
    )
}

pub(super) async fn post_records(gw: &Gateway, token: &str, body: &Value) -> (u16, Value) {
    let response = gw.http.post(gw.url("iop/records")).bearer_auth(token).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits (bounded) for the decision on an authorization to reach the given outcome.
pub(super) async fn decision(gw: &Gateway, token: &str, authorization_id: &str, outcome: &str) -> Value {
    for _ in 0..200 {
        let (status, found) = gw.get(token, &format!("iop/records?record_type=decision&authorization_id={authorization_id}")).await;
        assert_eq!(status, 200, "{found}");
        if let Some(d) = found.as_array().and_then(|a| a.first()).filter(|d| d["outcome"] == outcome) {
            return d.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, found) = gw.get(token, "iop/records?record_type=decision").await;
    panic!("no {outcome} decision for {authorization_id}: {found}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_goes_to_the_payer_once_and_its_decision_comes_back() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let input = records("authorization/initial.json");
    let (status, summary) = post_records(&gw, &clinic, &input).await;
    assert_eq!(status, 200, "{summary}");
    let authorization = &summary["records"][2];
    assert_eq!((authorization["record_type"].as_str(), authorization["messages"].as_array().map(Vec::len)), (Some("authorization"), Some(1)), "{summary}");
    assert!(authorization["resources"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("Claim/")), "{summary}");

    let certified = decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    assert!(certified["certification_number"].is_string(), "{certified}");
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let sent: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(sent["type"], "collection");
    assert_eq!(sent["entry"][0]["resource"]["resourceType"], "Claim", "the Claim comes first");
    let (_, responses) = gw.get(&clinic, "ClaimResponse").await;
    assert_eq!(responses["total"], 1, "the payer's ClaimResponse is stored for the clinic: {responses}");

    // The same records again: the resources are updated in place and nothing is sent twice.
    let (status, again) = post_records(&gw, &clinic, &input).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["records"][2]["messages"], json!([]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 1);
    let (_, claims) = gw.get(&clinic, "Claim").await;
    assert_eq!(claims["total"], 1);
    assert_eq!(claims["entry"][0]["resource"]["meta"]["versionId"], "1", "an unchanged resource gets no new version");
    let (_, sent_records) = gw.get(&clinic, "iop/records?direction=outbound").await;
    assert_eq!(sent_records.as_array().unwrap().len(), 3, "{sent_records}");
    // Paged: two, then the one left through the Link header, and every record once.
    let page = gw.http.get(gw.url("iop/records?direction=outbound&limit=2")).bearer_auth(&clinic).send().await.unwrap();
    let link = page.headers().get("link").map(|l| l.to_str().unwrap().to_string()).expect("a next link");
    let first: Value = page.json().await.unwrap();
    let next = link.strip_prefix('<').and_then(|l| l.split_once(">; rel=\"next\"")).map(|(url, _)| url.to_string()).expect(&link);
    assert!(next.contains("direction=outbound") && next.contains("limit=2"), "{next}");
    let page = gw.http.get(&next).bearer_auth(&clinic).send().await.unwrap();
    assert!(page.headers().get("link").is_none(), "the last page names no next one");
    let second: Value = page.json().await.unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>();
    let mut all = [ids(&first), ids(&second)].concat();
    assert_eq!((ids(&first).len(), ids(&second).len()), (2, 1));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "{first} {second}");
    for bad in ["limit=0", "limit=1001", "cursor=nonsense"] {
        let (status, outcome) = gw.get(&clinic, &format!("iop/records?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {outcome}");
        assert_outcome(&outcome);
    }
    let (status, one) = gw.get(&clinic, "iop/records/authorization/AUTH-1001-1").await;
    assert_eq!((status, &one["units"]), (200, &json!(12)), "{one}");

    gw.stop().await;
}

/// The requests the payer got, parsed.
async fn submitted(payer: &MockServer) -> Vec<Value> {
    payer.received_requests().await.unwrap().iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

fn extension<'a>(element: &'a Value, url_end: &str) -> Option<&'a Value> {
    element["extension"].as_array()?.iter().find(|e| e["url"].as_str().is_some_and(|u| u.ends_with(url_end)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_authorization_goes_as_a_pas_update_and_a_cancelled_one_as_a_cancel() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let input = records("authorization/initial.json");
    assert_eq!(post_records(&gw, &clinic, &input).await.0, 200);
    let certification = decision(&gw, &clinic, "AUTH-1001-1", "certified").await["certification_number"].as_str().unwrap().to_string();

    // More days, later end, a new submission time: an update of the submitted Claim.
    let mut changed = input.clone();
    changed[2]["units"] = json!(15);
    changed[2]["end"] = json!("2026-02-13");
    changed[2]["submitted_at"] = json!("2026-01-20T09:00:00-06:00");
    let (status, summary) = post_records(&gw, &clinic, &changed).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["records"][2]["messages"].as_array().map(Vec::len), Some(1), "{summary}");
    for _ in 0..100 {
        if payer.received_requests().await.unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = submitted(&payer).await;
    assert_eq!(sent.len(), 2);
    let (first, update) = (&sent[0], &sent[1]);
    assert_ne!(update["identifier"]["value"], first["identifier"]["value"], "a new transaction identifier");
    let claim = &update["entry"][0]["resource"];
    assert!(claim["meta"]["profile"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().ends_with("/profile-claim-update")), "{claim}");
    assert_eq!(claim["identifier"], first["entry"][0]["resource"]["identifier"], "the same authorization");
    assert_ne!(claim["id"], first["entry"][0]["resource"]["id"]);
    assert_eq!(claim["related"][0]["claim"]["reference"], first["entry"][0]["fullUrl"], "related.claim names the submitted Claim");
    assert_eq!(claim["related"][0]["relationship"]["coding"][0]["code"], "prior");
    assert_eq!(update["entry"][1]["resource"], first["entry"][0]["resource"], "the submitted Claim travels with its update");
    let item = &claim["item"][0];
    assert_eq!((&item["quantity"]["value"], &item["servicedPeriod"]["end"]), (&json!(15), &json!("2026-02-13")));
    assert_eq!(extension(item, "/extension-infoChanged").map(|e| &e["valueCode"]), Some(&json!("changed")), "{item}");
    assert_eq!(extension(item, "/extension-authorizationNumber").map(|e| &e["valueString"]), Some(&json!(certification)), "the earlier certification number is kept");
    assert!(extension(claim, "/extension-certificationType").is_none(), "an update is no cancel");

    // The same change again, even with another submission time: nothing more goes out.
    changed[2]["submitted_at"] = json!("2026-01-21T09:00:00-06:00");
    let (status, again) = post_records(&gw, &clinic, &changed).await;
    assert_eq!((status, &again["records"][2]["messages"]), (200, &json!([])), "{again}");

    // Cancelled: a cancel (certification type 3), and the decision says so with the certification number.
    let mut cancelled = changed.clone();
    cancelled[2]["status"] = json!("cancelled");
    let (status, summary) = post_records(&gw, &clinic, &cancelled).await;
    assert_eq!((status, summary["records"][2]["messages"].as_array().map(Vec::len)), (200, Some(1)), "{summary}");
    let done = decision(&gw, &clinic, "AUTH-1001-1", "cancelled").await;
    assert_eq!(done["certification_number"], json!(certification), "{done}");
    let sent = submitted(&payer).await;
    assert_eq!(sent.len(), 3);
    let cancel = &sent[2]["entry"][0]["resource"];
    let code = |e: Option<&Value>| e.map(|e| e["valueCodeableConcept"]["coding"][0]["code"].clone());
    assert_eq!(code(extension(cancel, "/extension-certificationType")), Some(json!("3")), "{cancel}");
    assert_eq!(code(extension(&cancel["item"][0], "/extension-certificationType")), Some(json!("3")));
    assert_eq!(cancel["status"], "active", "PAS keeps every Claim instance active");
    assert_eq!(sent[2]["entry"][1]["resource"], sent[0]["entry"][0]["resource"], "related to the first submission");

    // A cancelled authorization is not revived by a change.
    let mut revived = cancelled.clone();
    revived[2]["units"] = json!(20);
    let (status, outcome) = post_records(&gw, &clinic, &revived).await;
    assert_eq!(status, 409, "{outcome}");
    assert_outcome(&outcome);
    assert!(outcome["issue"][0]["details"]["text"].as_str().unwrap().contains("records[2]"), "{outcome}");
    let (status, same) = post_records(&gw, &clinic, &cancelled).await;
    assert_eq!((status, &same["records"][2]["messages"]), (200, &json!([])), "{same}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 3);

    // Cancelled before anything was sent: nothing is sent.
    let mut never = input.clone();
    never[2]["id"] = json!("AUTH-1001-9");
    never[2]["status"] = json!("cancelled");
    let (status, summary) = post_records(&gw, &clinic, &never).await;
    assert_eq!((status, &summary["records"][2]["messages"]), (200, &json!([])), "{summary}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_that_fails_and_times_out_gets_the_same_request_until_it_answers() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(ResponseTemplate::new(503)).up_to_n_times(2).with_priority(1).mount(&payer).await;
    // The third attempt is processed but its answer comes too late: the lost response.
    Mock::given(method("POST"))
        .and(path("/Claim/$submit"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(4)))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&payer)
        .await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "not-certified" }).with_priority(3).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");
    let denied = decision(&gw, &clinic, "AUTH-1001-1", "not_certified").await;
    assert!(denied["reason"].is_string() || denied["reason_code"].is_string(), "{denied}");
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 4, "two 503s, one lost answer, one decision");
    assert!(received.windows(2).all(|w| w[0].body == w[1].body), "every attempt sends the same bytes (same Bundle.identifier)");
    let ops = gw.token("ops").await;
    let message_id = summary["records"][2]["messages"][0].as_str().unwrap();
    let (status, shown) = gw.get(&ops, &format!("admin/outbox/{message_id}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["status"], "delivered");
    assert_eq!(shown["attempts_detail"].as_array().unwrap().len(), 4, "{shown}");
    assert_eq!(shown["attempts_detail"][0]["status_code"], 503);
    gw.stop().await;
}

/// Reads one HTTP/1.1 message (head, then a `Content-Length` body) from a stream; `None` at end of stream.
async fn read_message(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut message = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = message.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&message[..end]).to_ascii_lowercase();
            let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if message.len() >= end + 4 + length {
                return Some(message);
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        message.extend_from_slice(&chunk[..n]);
    }
}

/// A loopback relay in front of the payer that passes the first `drop` requests on, reads the
/// payer's answer, and closes the gateway's connection without a word: the payer processed the
/// request, the gateway never heard. Later requests are relayed both ways.
async fn dropping_relay(payer: String, drop: usize) -> String {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (payer, dropped) = (payer.clone(), dropped.clone());
            tokio::spawn(async move {
                while let Some(request) = read_message(&mut client).await {
                    let mut upstream = tokio::net::TcpStream::connect(&payer).await.unwrap();
                    upstream.write_all(&request).await.unwrap();
                    let answer = read_message(&mut upstream).await.unwrap_or_default();
                    if dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < drop {
                        return; // the connection closes with the answer unsent
                    }
                    if client.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_the_payer_processed_the_request_resends_it_once_the_same() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let relay = dropping_relay(payer.address().to_string(), 1).await;
    let gw = Gateway::start_with(&payer_config(&relay, "")).await;
    let clinic = gw.token("clinic").await;
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");
    decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 2, "processed once with the answer lost, then once more");
    assert_eq!(received[0].body, received[1].body, "the resend carries the same Bundle.identifier and content");
    let (_, decisions) = gw.get(&clinic, "iop/records?record_type=decision").await;
    assert_eq!(decisions.as_array().map(Vec::len), Some(1), "{decisions}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_down_for_30_seconds_gets_the_request_once_when_it_is_back() {
    // Nothing listens at the payer's address for 30 s: every attempt is refused at connect.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let gw = Gateway::start_with(&payer_config(&format!("http://{address}"), "")).await;
    let clinic = gw.token("clinic").await;
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");
    let message_id = summary["records"][2]["messages"][0].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ops = gw.token("ops").await;
    let (_, waiting) = gw.get(&ops, &format!("admin/outbox/{message_id}")).await;
    assert_eq!(waiting["status"], "pending", "still waiting, never given up: {waiting}");
    assert!(waiting["attempts"].as_i64().unwrap() >= 10, "retried all along (backoff capped at 1 s here): {waiting}");

    let listener = std::net::TcpListener::bind(address).unwrap();
    let payer = MockServer::builder().listener(listener).start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 1, "once it is back, the request arrives once");
    let (_, delivered) = gw.get(&ops, &format!("admin/outbox/{message_id}")).await;
    assert_eq!(delivered["status"], "delivered", "{delivered}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_a_dead_letter_with_the_payers_issues_and_can_be_replayed() {
    let payer = MockServer::start().await;
    let refusal = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "required", "details": {"text": "Subscriber member id not on file"}, "expression": ["Claim.insurance[0]"]}]});
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(ResponseTemplate::new(400).set_body_json(&refusal)).up_to_n_times(1).with_priority(1).mount(&payer).await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).with_priority(2).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let (clinic, ops) = (gw.token("clinic").await, gw.token("ops").await);
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");
    let error = decision(&gw, &clinic, "AUTH-1001-1", "error").await;
    assert_eq!(error["issues"][0]["text"], "Subscriber member id not on file", "{error}");
    assert_eq!(error["issues"][0]["expression"], "Claim.insurance[0]");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 1, "a 400 is not retried");

    let (status, dead) = gw.get(&ops, "admin/outbox?status=dead").await;
    assert_eq!(status, 200);
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert!(dead[0].get("payload").is_none(), "operators see no patient data");
    let id = dead[0]["id"].as_str().unwrap();
    assert_eq!(gw.get(&clinic, "admin/outbox").await.0, 403);
    let (status, replayed) = gw.post(&ops, &format!("admin/outbox/{id}/$replay"), &json!({})).await;
    assert_eq!(status, 200, "{replayed}");
    decision(&gw, &clinic, "AUTH-1001-1", "certified").await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 2);
    let (status, body) = gw.post(&ops, &format!("admin/outbox/{id}/$replay"), &json!({})).await;
    assert_eq!(status, 409, "only a dead letter is replayed: {body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_authenticates_at_the_payer_with_smart_and_renews_a_refused_token() {
    let payer = MockServer::start().await;
    let dir = super::support::TempDir::new("partner-key");
    let key = iop_gateway::auth::keys::KeyPair::generate_es384("synthetic-health-1").unwrap();
    let key_file = dir.0.join("payer.key.pem");
    std::fs::write(&key_file, &key.private_pem).unwrap();
    let tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let issued = tokens.clone();
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(move |request: &Request| {
            let form: Vec<(String, String)> = form_urlencoded::parse(&request.body).into_owned().collect();
            assert!(form.iter().any(|(k, v)| k == "client_assertion_type" && v.ends_with("jwt-bearer")), "{form:?}");
            let n = issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ResponseTemplate::new(200).set_body_json(json!({"access_token": format!("token-{n}"), "token_type": "bearer", "expires_in": 300}))
        })
        .mount(&payer)
        .await;
    Mock::given(method("GET"))
        .and(path("/.well-known/smart-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"token_endpoint": format!("{}/auth/token", payer.uri())})))
        .mount(&payer)
        .await;
    // The payer forgets the first token (a restart on its side): 401, then the renewed token works.
    Mock::given(method("POST")).and(path("/Claim/$submit")).and(header("authorization", "Bearer token-0")).respond_with(ResponseTemplate::new(401)).mount(&payer).await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).and(header("authorization", "Bearer token-1")).respond_with(Payer { decision: "pended" }).mount(&payer).await;
    let config = payer_config(&payer.uri(), &format!("key_file = {:?}", key_file.display().to_string())).replace("auth = \"none\"", "auth = \"smart\"");
    let gw = Gateway::start_with(&config).await;
    let clinic = gw.token("clinic").await;
    let (status, summary) = post_records(&gw, &clinic, &records("authorization/initial.json")).await;
    assert_eq!(status, 200, "{summary}");
    let pended = decision(&gw, &clinic, "AUTH-1001-1", "pended").await;
    assert!(pended["pending_reference"].is_string() || pended["reason"].is_string(), "{pended}");
    assert_eq!(tokens.load(std::sync::atomic::Ordering::SeqCst), 2, "one token, then one renewal after the 401");
    let submits = payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/Claim/$submit").count();
    assert_eq!(submits, 2);
    // Our assertions name our key by its RFC 7638 thumbprint, the id `partners add` publishes it under.
    let thumbprint = iop_gateway::auth::keys::KeyPair::from_pem_thumbprinted(&key.private_pem).unwrap().kid;
    for request in payer.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/auth/token") {
        let form: Vec<(String, String)> = form_urlencoded::parse(&request.body).into_owned().collect();
        let assertion = &form.iter().find(|(k, _)| k == "client_assertion").expect("a client assertion").1;
        assert_eq!(jsonwebtoken::decode_header(assertion).unwrap().kid.as_deref(), Some(thumbprint.as_str()));
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_refused_whole_with_located_issues_and_nothing_is_queued() {
    let payer = MockServer::start().await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let (clinic, ops, unit) = (gw.token("clinic").await, gw.token("ops").await, gw.token("unit-a").await);
    let mut input = records("authorization/initial.json");
    input[2]["units"] = json!("twelve");
    let (status, outcome) = post_records(&gw, &clinic, &input).await;
    assert_eq!(status, 422, "{outcome}");
    assert_outcome(&outcome);
    assert_eq!(outcome["issue"][0]["expression"][0], "records[2].units", "{outcome}");

    let mut unrouted = records("authorization/initial.json");
    unrouted[2]["payer_id"] = json!("PAYER-NOWHERE");
    unrouted[0]["coverage"]["payer_id"] = json!("PAYER-NOWHERE");
    let (status, outcome) = post_records(&gw, &clinic, &unrouted).await;
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "records[2].payer_id", "{outcome}");

    let (_, stored) = gw.get(&clinic, "iop/records").await;
    assert_eq!(stored, json!([]), "nothing stored");
    let (_, patients) = gw.get(&clinic, "Patient").await;
    assert_eq!(patients["total"], 0);
    let (_, queued) = gw.get(&ops, "admin/outbox").await;
    assert_eq!(queued, json!([]), "nothing queued");
    assert_eq!(post_records(&gw, &unit, &records("authorization/initial.json")).await.0, 403, "records are the program's");
    let (status, outcome) = post_records(&gw, &clinic, &json!([])).await;
    assert_eq!(status, 400, "{outcome}");
    assert!(payer.received_requests().await.unwrap().is_empty());
    gw.stop().await;
}

/// A real `serve` process with one payer at `payer`, on a fresh port; returns its folder, configuration path, base URL and the clinic's key.
fn serve_config(payer: &str, label: &str) -> (super::support::TempDir, std::path::PathBuf, String, iop_gateway::auth::keys::KeyPair) {
    let dir = super::support::TempDir::new(label);
    let port = super::durability::free_port();
    let keys = super::support::partner_keys();
    // A short lease so the restarted gateway takes over the message the killed one held.
    let partner = payer_config(payer, "").replace("[outbox]\npoll_interval_ms = 50\n", "").replace("timeout_secs = 2", "timeout_secs = 1");
    let extra = format!("{partner}\n[outbox]\npoll_interval_ms = 50\nlease_secs = 3\n");
    let text = super::support::config_text(&dir.0, &keys, "").replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\"")) + &extra;
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let clinic = keys.into_iter().find(|(id, _)| id == "clinic").unwrap().1;
    (dir, config, format!("http://127.0.0.1:{port}"), clinic)
}

async fn clinic_token(http: &reqwest::Client, base: &str, key: &iop_gateway::auth::keys::KeyPair) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = iop_gateway::auth::keys::sign_assertion(key, "clinic", &format!("{base}/auth/token"), &uuid::Uuid::new_v4().to_string(), now + 120).unwrap();
    let granted: Value = http.post(format!("{base}/auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap().json().await.unwrap();
    granted["access_token"].as_str().unwrap().to_string()
}

/// Every decision record, page after page (the listing's `Link: rel="next"`).
async fn decisions(http: &reqwest::Client, base: &str, token: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut next = Some(format!("{base}/iop/records?record_type=decision"));
    while let Some(url) = next.take() {
        let page = http.get(&url).bearer_auth(token).send().await.unwrap();
        let link = page.headers().get("link").and_then(|l| l.to_str().ok()).map(str::to_string);
        next = link.and_then(|l| l.strip_prefix('<').and_then(|l| l.split_once(">; rel=\"next\"")).map(|(url, _)| url.to_string()));
        let items: Value = page.json().await.unwrap();
        found.extend(items.as_array().cloned().unwrap_or_default());
    }
    found
}

/// SIGKILL after the payer got the request and before the gateway recorded the answer: after the restart the request goes again, byte for byte, and the authorization ends with one decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_sending_and_recording_resends_the_same_request_once() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30))).up_to_n_times(1).with_priority(1).mount(&payer).await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).with_priority(2).mount(&payer).await;
    let (_dir, config, base, clinic_key) = serve_config(&payer.uri(), "crash-send");
    let http = reqwest::Client::new();
    let mut child = super::durability::spawn(&config);
    super::durability::wait_ready(&http, &base).await;
    let token = clinic_token(&http, &base, &clinic_key).await;
    let response = http.post(format!("{base}/iop/records")).bearer_auth(&token).header("content-type", "application/json").body(records("authorization/initial.json").to_string()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    for _ in 0..200 {
        if !payer.received_requests().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(payer.received_requests().await.unwrap().len(), 1, "the payer has the request");
    child.kill().expect("SIGKILL the gateway");
    child.wait().unwrap();

    let mut child = super::durability::spawn(&config);
    super::durability::wait_ready(&http, &base).await;
    let mut found = Vec::new();
    for _ in 0..200 {
        found = decisions(&http, &base, &token).await;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["outcome"], "certified");
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 2, "sent once more after the restart, not more");
    assert_eq!(received[0].body, received[1].body, "with the same identity and content");
    let responses: Value = http.get(format!("{base}/ClaimResponse")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(responses["total"], 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A payer that is down until `up` is set, then decides every request once and counts, per authorization, how many decisions it gave.
struct Flaky {
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    decided: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Respond for Flaky {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
            return ResponseTemplate::new(503);
        }
        let submitted: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let id = submitted["entry"][0]["resource"]["identifier"][0]["value"].as_str().unwrap_or_default().to_string();
        *self.decided.lock().unwrap().entry(id).or_default() += 1;
        Payer { decision: "certified" }.respond(request)
    }
}

/// SIGKILL while 200 messages wait for a payer that is down: after the restart all 200 arrive, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_200_messages_queued_loses_none_and_sends_none_twice() {
    let payer = MockServer::start().await;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decided = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Flaky { up: up.clone(), decided: decided.clone() }).mount(&payer).await;
    let (_dir, config, base, clinic_key) = serve_config(&payer.uri(), "crash-queue");
    let http = reqwest::Client::new();
    let mut child = super::durability::spawn(&config);
    super::durability::wait_ready(&http, &base).await;
    let token = clinic_token(&http, &base, &clinic_key).await;
    let fixture = records("authorization/initial.json");
    let mut input = vec![fixture[0].clone()];
    for i in 0..200 {
        let mut authorization = fixture[2].clone();
        authorization.as_object_mut().unwrap().remove("supporting_scores");
        authorization["id"] = json!(format!("AUTH-Q-{i:03}"));
        input.push(authorization);
    }
    let response = http.post(format!("{base}/iop/records")).bearer_auth(&token).header("content-type", "application/json").body(Value::Array(input).to_string()).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!payer.received_requests().await.unwrap().is_empty(), "the worker was trying");
    child.kill().expect("SIGKILL the gateway");
    child.wait().unwrap();

    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut child = super::durability::spawn(&config);
    super::durability::wait_ready(&http, &base).await;
    let mut found = Vec::new();
    for _ in 0..600 {
        found = decisions(&http, &base, &token).await;
        if found.len() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(found.len(), 200, "every queued authorization was decided");
    let first: Value = http.get(format!("{base}/iop/records/authorization/AUTH-Q-000")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["id"], "AUTH-Q-000", "one record is found among many of its type: {first}");
    assert!(found.iter().all(|d| d["outcome"] == "certified"));
    let decided = decided.lock().unwrap().clone();
    assert_eq!(decided.len(), 200);
    assert!(decided.values().all(|n| *n == 1), "none twice: {:?}", decided.iter().filter(|(_, n)| **n != 1).collect::<Vec<_>>());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The clinic's attended sessions of client C-1001 on the first `n` weekdays from 2026-01-12, the first day of its certification.
pub(super) fn attended_sessions(n: usize) -> Value {
    let template = records("session/attended.json");
    let days = (12..=31).map(|d| format!("2026-01-{d:02}")).filter(|d| !["2026-01-17", "2026-01-18", "2026-01-24", "2026-01-25", "2026-01-31"].contains(&d.as_str()));
    days.take(n)
        .enumerate()
        .map(|(i, day)| {
            let mut s = template.clone();
            s["id"] = json!(format!("SES-1001-U{i:02}"));
            s["start_at"] = json!(format!("{day}T09:00:00-06:00"));
            s["end_at"] = json!(format!("{day}T12:00:00-06:00"));
            s
        })
        .collect()
}

/// The extension requests the gateway holds for the clinic.
pub(super) async fn proposed(gw: &Gateway, token: &str) -> Vec<Value> {
    let (status, found) = gw.get(token, "iop/records?record_type=authorization&status=proposed").await;
    assert_eq!(status, 200, "{found}");
    found.as_array().unwrap().clone()
}

/// A certified authorization, an active enrollment, then attended sessions: at ten of twelve certified days the gateway proposes an extension.
async fn certified_then_sessions(gw: &Gateway, clinic: &str) -> String {
    let mut input = records("authorization/initial.json");
    input.as_array_mut().unwrap().push(records("enrollment/active.json"));
    let (status, summary) = post_records(gw, clinic, &input).await;
    assert_eq!(status, 200, "{summary}");
    let certified = decision(gw, clinic, "AUTH-1001-1", "certified").await;
    assert_eq!((&certified["certified_units"], &certified["certified_end"]), (&json!(12), &json!("2026-02-06")), "{certified}");
    let (status, summary) = post_records(gw, clinic, &attended_sessions(9)).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(proposed(gw, clinic).await, Vec::<Value>::new(), "three certified days left is not under the threshold");
    let (status, summary) = post_records(gw, clinic, &attended_sessions(10)).await;
    assert_eq!(status, 200, "{summary}");
    certified["certification_number"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certification_running_low_gets_one_extension_request_held_for_the_clinic() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "")).await;
    let clinic = gw.token("clinic").await;
    let certification = certified_then_sessions(&gw, &clinic).await;
    let held = proposed(&gw, &clinic).await;
    assert_eq!(held.len(), 1, "{held:?}");
    let extension = &held[0];
    assert_eq!((&extension["id"], &extension["extends_certification"], &extension["client_id"]), (&json!("AUTH-1001-1-EXT"), &json!(certification), &json!("C-1001")), "{extension}");
    assert_eq!((&extension["start"], &extension["units"]), (&json!("2026-02-07"), &json!(12)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 1, "a proposal is not sent");

    // Sessions again, and one more day: still one proposal for the certification.
    let (status, _) = post_records(&gw, &clinic, &attended_sessions(11)).await;
    assert_eq!(status, 200);
    assert_eq!(proposed(&gw, &clinic).await.len(), 1);

    // The clinic confirms by posting it as its own: it goes to the payer and is no longer held.
    let (status, summary) = post_records(&gw, &clinic, &json!([records("authorization/initial.json")[0].clone(), extension.clone()])).await;
    assert_eq!(status, 200, "{summary}");
    decision(&gw, &clinic, "AUTH-1001-1-EXT", "certified").await;
    assert_eq!(payer.received_requests().await.unwrap().len(), 2);
    assert_eq!(proposed(&gw, &clinic).await, Vec::<Value>::new());
    let (_, confirmed) = gw.get(&clinic, "iop/records?record_type=authorization&status=confirmed").await;
    assert_eq!(confirmed.as_array().map(Vec::len), Some(1), "{confirmed}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_extend_the_payer_gets_the_extension_request_once() {
    let payer = MockServer::start().await;
    Mock::given(method("POST")).and(path("/Claim/$submit")).respond_with(Payer { decision: "certified" }).mount(&payer).await;
    let gw = Gateway::start_with(&payer_config(&payer.uri(), "auto_extend = true")).await;
    let clinic = gw.token("clinic").await;
    let certification = certified_then_sessions(&gw, &clinic).await;
    decision(&gw, &clinic, "AUTH-1001-1-EXT", "certified").await;
    let (status, summary) = post_records(&gw, &clinic, &attended_sessions(11)).await;
    assert_eq!(status, 200, "{summary}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = payer.received_requests().await.unwrap();
    assert_eq!(received.len(), 2, "the initial request and one extension");
    let sent: Value = serde_json::from_slice(&received[1].body).unwrap();
    assert_eq!(sent["entry"][0]["resource"]["identifier"][0]["value"], "AUTH-1001-1-EXT");
    assert_eq!(proposed(&gw, &clinic).await, Vec::<Value>::new(), "nothing held");
    let (_, sent_record) = gw.get(&clinic, "iop/records/authorization/AUTH-1001-1-EXT").await;
    assert_eq!(sent_record["extends_certification"], json!(certification), "{sent_record}");
    gw.stop().await;
}
