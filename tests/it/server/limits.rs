//! Limits through the real listener: slow unauthenticated senders cannot starve partners or `/healthz`, bounded metric labels and search sizes, protocol errors answered as OperationOutcomes and audited, and token checks (nbf/iat, no client enumeration, revocation).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys, patient};

fn addr(gw: &Gateway) -> SocketAddr {
    gw.running.as_ref().unwrap().local_addr
}

/// Reads what the server sends until it closes the connection or `within` passes; `None` if it did neither in time.
async fn read_until_close(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, socket.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&answer).into_owned()),
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Sends raw bytes as one request and returns the status line's code, the head and the body.
async fn raw_exchange(address: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut socket = TcpStream::connect(address).await.unwrap();
    // The server may answer (and close) before it has read everything; a failed write is not the test's concern.
    let _ = socket.write_all(request).await;
    let answer = read_until_close(&mut socket, Duration::from_secs(5)).await.expect("the server answers and closes");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// A POST to the token endpoint that declares a body and sends none of it yet; the caller trickles it.
async fn slow_token_request(address: SocketAddr) -> Option<TcpStream> {
    let mut socket = TcpStream::connect(address).await.ok()?;
    let head = format!("POST /auth/token HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4096\r\n\r\n");
    socket.write_all(head.as_bytes()).await.ok()?;
    Some(socket)
}

/// The number of AuditEvents of refusals (outcome 4 for 4xx, 8 for 5xx), as the admin sees them.
async fn refusals_audited(gw: &Gateway, admin: &str) -> u64 {
    let mut total = 0;
    for outcome in ["4", "8"] {
        let (status, bundle) = gw.get(admin, &format!("AuditEvent?outcome={outcome}&_count=1")).await;
        assert_eq!(status, 200, "{bundle}");
        total += bundle["total"].as_u64().unwrap();
    }
    total
}

async fn audited_descriptions(gw: &Gateway, admin: &str) -> Vec<String> {
    let mut descriptions = Vec::new();
    for outcome in ["4", "8"] {
        let (status, bundle) = gw.get(admin, &format!("AuditEvent?outcome={outcome}&_count=200")).await;
        assert_eq!(status, 200, "{bundle}");
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        descriptions.extend(entries.iter().map(|e| e["resource"]["outcomeDesc"].as_str().unwrap_or_default().to_string()));
    }
    descriptions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_unauthenticated_connections_starve_neither_partners_nor_healthz() {
    // Default budgets and timeouts: the attack is held for the whole test, well within them.
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let address = addr(&gw);
    let until = Instant::now() + Duration::from_secs(8);
    let mut opening = Vec::new();
    for _ in 0..300 {
        opening.push(tokio::spawn(slow_token_request(address)));
    }
    let mut held = Vec::new();
    for task in opening {
        if let Some(socket) = task.await.unwrap() {
            held.push(socket);
        }
    }
    assert_eq!(held.len(), 300, "every slow connection was opened");
    // One byte every half second on every connection, in the background, for as long as the test needs them.
    let trickle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while Instant::now() < until {
            tick.tick().await;
            for socket in &mut held {
                let _ = socket.write_all(b"a").await;
            }
        }
        held
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..5 {
        let health = gw.http.get(gw.url("healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "healthz, round {round}");
        let (status, body) = gw.post(&token, "Patient", &patient(&format!("DOS-{round}"))).await;
        assert_eq!(status, 201, "create, round {round}: {body}");
        let (status, body) = gw.get(&token, &format!("Patient?identifier=DOS-{round}")).await;
        assert_eq!(status, 200, "search, round {round}: {body}");
        assert_eq!(body["total"], 1);
    }
    assert!(Instant::now() < until, "the checks ran while the slow connections were held");
    trickle.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_dropped_and_refusals_audited() {
    let gw = Gateway::start_with("header_read_timeout_secs = 1\nbody_read_timeout_secs = 1\nmax_unauthenticated_requests = 2\n").await;
    let address = addr(&gw);
    let admin = gw.token("ops").await;
    let before = refusals_audited(&gw, &admin).await;
    // Headers that never finish: the connection is closed after the header time.
    let mut stuck = TcpStream::connect(address).await.unwrap();
    stuck.write_all(b"POST /auth/token HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    assert!(read_until_close(&mut stuck, Duration::from_secs(4)).await.is_some(), "a head that never ends is dropped");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A body that never finishes: 408 with an OperationOutcome, then the connection closes.
    let mut slow = slow_token_request(address).await.unwrap();
    let answer = read_until_close(&mut slow, Duration::from_secs(4)).await.expect("a slow body is answered and dropped");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("OperationOutcome") && answer.contains("application/fhir+json"), "{answer}");
    // The unauthenticated budget full: 503 with an OperationOutcome, while partners are still served.
    let mut first = slow_token_request(address).await.unwrap();
    let mut second = slow_token_request(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = reqwest::Client::new().get(gw.url("metadata")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert_outcome(&busy.json().await.unwrap());
    let (status, _) = gw.get(&admin, "AuditEvent?_count=1").await;
    assert_eq!(status, 200, "a partner is served while strangers fill their budget");
    let _ = read_until_close(&mut first, Duration::from_secs(4)).await;
    let _ = read_until_close(&mut second, Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let descriptions = audited_descriptions(&gw, &admin).await;
    let after = refusals_audited(&gw, &admin).await;
    assert!(after >= before + 4, "408 ×3 and 503 are audited: {before} → {after}: {descriptions:?}");
    assert!(descriptions.iter().filter(|d| d.contains("refused: 408 Request Timeout")).count() >= 4, "three slow bodies and a slow head: {descriptions:?}");
    assert!(descriptions.iter().any(|d| d.contains("503")), "{descriptions:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_are_audited() {
    let gw = Gateway::start_with("max_concurrent_requests_per_client = 1\n").await;
    let address = addr(&gw);
    let token = gw.token("unit-a").await;
    let admin = gw.token("ops").await;
    let mut slow = TcpStream::connect(address).await.unwrap();
    let head = format!("POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{{");
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = gw.get(&token, "Patient").await;
    assert_eq!(status, 429, "{body}");
    assert_outcome(&body);
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let descriptions = audited_descriptions(&gw, &admin).await;
    assert!(descriptions.iter().any(|d| d.contains("429")), "{descriptions:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_outcomes_and_audited() {
    let gw = Gateway::start().await;
    let address = addr(&gw);
    let admin = gw.token("ops").await;
    let before = refusals_audited(&gw, &admin).await;
    let huge_header = format!("GET /metadata HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1024 * 1024));
    let long_url = format!("GET /Patient?identifier={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("percent-encoded invalid UTF-8 in the path", b"GET /Patient/%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("raw invalid UTF-8 in the path", b"GET /Patient/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("a 1 MB header", huge_header.into_bytes(), 431),
        ("a 64 KB URL", long_url.into_bytes(), 414),
        ("garbage instead of a request line", b"\x01\x02 hello\r\n\r\n".to_vec(), 400),
    ];
    for (label, request, expected) in &cases {
        let (status, head, body) = raw_exchange(address, request).await;
        assert_eq!(status, *expected, "{label}: {head}");
        assert!(head.to_ascii_lowercase().contains("content-type: application/fhir+json"), "{label}: {head}");
        let outcome: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{label}: not JSON: {body:?}"));
        assert_outcome(&outcome);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = refusals_audited(&gw, &admin).await;
    assert!(after >= before + cases.len() as u64, "every refusal is audited: {before} → {after}");
    // The server still serves.
    assert_eq!(gw.http.get(gw.url("healthz")).send().await.unwrap().status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels_take_only_known_methods() {
    let gw = Gateway::start().await;
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let _ = gw.http.request(method, gw.url("Patient")).send().await.unwrap();
    }
    let text = gw.http.get(gw.url("metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("MADEUP"), "made-up methods must not become labels");
    assert!(text.contains("method=\"other\""), "{text}");
    let methods: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.split("method=\"").nth(1)).filter_map(|rest| rest.split('"').next()).collect();
    assert!(methods.iter().all(|m| ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other"].contains(m)), "{methods:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_search_values_are_refused_and_allowed_ones_answer() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let values = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>().join(",");
    let identifiers = values(500, &|i| format!("urn:s|v{i}"));
    let dates = values(2000, &|i| format!("ge2026-01-{:02}", i % 28 + 1));
    let repeated = (0..930).map(|i| format!("identifier=v{i}")).collect::<Vec<_>>().join("&");
    let refused = [
        (format!("Patient?identifier={identifiers}"), "identifier"),
        (format!("Observation?date={dates}"), "date"),
        (format!("Patient?{repeated}"), "identifier"),
        (format!("Observation?_id={}", values(500, &|i| format!("id{i}"))), "_id"),
    ];
    for (path, param) in &refused {
        let (status, body) = gw.get(&token, path).await;
        assert_eq!(status, 400, "{param}: {body}");
        assert_outcome(&body);
        assert!(body.to_string().contains(&format!("'{param}'")), "the outcome names {param}: {body}");
    }
    // Conditional update with 600 criteria values.
    let criteria = values(600, &|i| format!("urn:s|c{i}"));
    let (status, body) = gw.put(&token, &format!("Patient?identifier={criteria}"), &patient("COND")).await;
    assert_eq!(status, 400, "{body}");
    assert_outcome(&body);
    // What is allowed answers, however it is combined: the most values per parameter, the most parameters.
    let allowed_values = values(iop_gateway::search::MAX_VALUES_PER_PARAMETER, &|i| format!("urn:s|v{i}"));
    let (status, body) = gw.get(&token, &format!("Patient?identifier={allowed_values}")).await;
    assert_eq!(status, 200, "{body}");
    let allowed_dates = values(iop_gateway::search::MAX_VALUES_PER_PARAMETER, &|i| format!("ne2026-01-{:02}", i % 28 + 1));
    let many_params = (0..iop_gateway::search::MAX_PARAMETERS).map(|_| format!("date={allowed_dates}")).collect::<Vec<_>>().join("&");
    let (status, body) = gw.get(&token, &format!("Observation?{many_params}")).await;
    assert_eq!(status, 200, "{}", body.to_string().chars().take(500).collect::<String>());
    let many_tokens = (0..iop_gateway::search::MAX_PARAMETERS).map(|_| format!("code={allowed_values}")).collect::<Vec<_>>().join("&");
    let (status, body) = gw.get(&token, &format!("Observation?{many_tokens}")).await;
    assert_eq!(status, 200, "{}", body.to_string().chars().take(500).collect::<String>());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_from_the_future_are_refused() {
    let gw = Gateway::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    for (label, extra) in [("nbf", serde_json::json!({"nbf": now + 3600})), ("iat", serde_json::json!({"iat": now + 3600}))] {
        let mut claims = serde_json::json!({"iss": "unit-a", "sub": "unit-a", "aud": gw.token_url(), "exp": now + 120, "jti": uuid::Uuid::new_v4().to_string()});
        claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let assertion = iop_gateway::auth::keys::sign_claims(gw.key("unit-a"), &claims).unwrap();
        let response = gw.token_response(&assertion, "system/*.cruds").await;
        assert_eq!(response.status(), 401, "a far-future {label} is refused");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client", "{label}: {body}");
    }
    // A small skew is tolerated.
    let claims = serde_json::json!({"iss": "unit-a", "sub": "unit-a", "aud": gw.token_url(), "exp": now + 120, "nbf": now + 5, "iat": now + 5, "jti": "skewed"});
    let assertion = iop_gateway::auth::keys::sign_claims(gw.key("unit-a"), &claims).unwrap();
    assert_eq!(gw.token_response(&assertion, "system/*.cruds").await.status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_clients_and_bad_signatures_answer_alike() {
    let gw = Gateway::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    let stranger = iop_gateway::auth::keys::KeyPair::generate_es384("unit-a-1").unwrap();
    let mut answers = Vec::new();
    for client in ["unit-a", "no-such-client"] {
        let assertion = iop_gateway::auth::keys::sign_assertion(&stranger, client, &gw.token_url(), &uuid::Uuid::new_v4().to_string(), now + 60).unwrap();
        let response = gw.token_response(&assertion, "system/*.cruds").await;
        answers.push((response.status().as_u16(), response.text().await.unwrap()));
    }
    assert_eq!(answers[0], answers[1], "a registered client with a bad signature and an unknown client must look the same");
    assert_eq!(answers[0].0, 401);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_stop_working_within_the_cache_time() {
    let dir = TempDir::new("revoke");
    let keys = partner_keys();
    let text = config_text(&dir.0, &keys, "[auth]\ntoken_cache_ttl_secs = 1\n");
    let config_file = dir.0.join("gateway.toml");
    std::fs::write(&config_file, &text).unwrap();
    let gw = Gateway::start_loaded(load(&text, &dir.0), keys, dir).await;
    let token = gw.token("unit-a").await;
    let other = gw.token("unit-b").await;
    assert_eq!(gw.get(&token, "Patient").await.0, 200, "the token works and is now cached");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_iop-gateway"))
        .args(["clients", "revoke", "unit-a", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let (status, _) = gw.get(&token, "Patient").await;
        if status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the revoked token still works after the cache time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gw.get(&other, "Patient").await.0, 200, "another client's token is untouched");
    gw.stop().await;
}
