//! Hostile and broken requests get a 4xx with an OperationOutcome, never a 500, and the server keeps serving.

use serde_json::{Value, json};

use super::support::{Gateway, assert_outcome, patient};

async fn raw(gw: &Gateway, method: reqwest::Method, token: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = gw.http.request(method, gw.url(path)).bearer_auth(token).header("content-type", content_type).body(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text})))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_with_an_outcome() {
    let gw = Gateway::start_with("").await;
    let token = gw.token("clinic").await;
    let fhir = "application/fhir+json";
    let post = reqwest::Method::POST;
    let mut deep = String::new();
    for _ in 0..5000 {
        deep.push_str("{\"a\":");
    }
    deep.push('1');
    let nested_resource = format!("{{\"resourceType\":\"Patient\",\"extension\":[{}]}}", "[".repeat(300) + &"]".repeat(300));
    let cases: Vec<(&str, String, &str, Vec<u8>, u16)> = vec![
        ("bad JSON", "Patient".into(), fhir, b"{\"resourceType\": \"Patient\",".to_vec(), 400),
        ("not an object", "Patient".into(), fhir, b"[1,2,3]".to_vec(), 400),
        ("duplicate keys", "Patient".into(), fhir, b"{\"resourceType\":\"Patient\",\"gender\":\"male\",\"gender\":\"female\"}".to_vec(), 400),
        ("invalid UTF-8", "Patient".into(), fhir, b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}".to_vec(), 400),
        ("wrong content type", "Patient".into(), "text/plain", patient("X").to_string().into_bytes(), 415),
        ("Turtle content type", "Patient".into(), "application/fhir+turtle", b"[] a fhir:Patient .".to_vec(), 415),
        ("XML of another FHIR version", "Patient".into(), "application/fhir+xml; fhirVersion=3.0", b"<Patient xmlns=\"http://hl7.org/fhir\"/>".to_vec(), 415),
        ("XML that is not well-formed", "Patient".into(), "application/fhir+xml", b"<Patient xmlns=\"http://hl7.org/fhir\"><gender value=\"male\"></Patient>".to_vec(), 400),
        ("XML with a DOCTYPE", "Patient".into(), "application/fhir+xml", b"<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><Patient xmlns=\"http://hl7.org/fhir\"/>".to_vec(), 400),
        ("deep nesting", "Patient".into(), fhir, deep.into_bytes(), 400),
        ("deep arrays", "Patient".into(), fhir, nested_resource.into_bytes(), 400),
        ("unknown resource type", "Frobnicator".into(), fhir, b"{\"resourceType\":\"Frobnicator\"}".to_vec(), 404),
        ("type mismatch", "Observation".into(), fhir, patient("X").to_string().into_bytes(), 400),
        ("unknown operation", "Patient/$everything".into(), fhir, b"{}".to_vec(), 405),
        ("base POST of a non-Bundle", "".into(), fhir, patient("X").to_string().into_bytes(), 400),
        ("collection Bundle to base", "".into(), fhir, b"{\"resourceType\":\"Bundle\",\"type\":\"collection\"}".to_vec(), 400),
    ];
    for (label, path, content_type, body, expected) in cases {
        let (status, outcome) = raw(&gw, post.clone(), &token, &path, content_type, body).await;
        assert_eq!(status, expected, "{label}: {outcome}");
        assert_outcome(&outcome);
    }
    // A 10 MB body is refused from its Content-Length, before any of it is read. A client still
    // writing it may see the connection close before it reads the answer, so only the head is sent.
    let mut oversized = partial_request(&gw, &token, 10 * 1024 * 1024).await;
    let answer = read_response(&mut oversized).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    let gets: &[(&str, u16)] = &[
        ("Patient?identifier=x'%20OR%20'1'='1", 200),
        ("Patient?_id=1;DROP%20TABLE%20resources", 200),
        ("Observation?date=2026-01-01'--", 400),
        ("Observation?patient=Patient/1%27%20OR%201=1", 400),
        ("Observation?_count=-1", 400),
        ("Observation?_sort=body", 400),
        ("Patient/x/_history/abc", 404),
        ("Patient?_format=turtle", 406),
        ("Frobnicator?x=1", 404),
        ("a/b/c/d/e", 404),
    ];
    for (path, expected) in gets {
        let (status, body) = gw.get(&token, path).await;
        assert_eq!(status, *expected, "GET {path}: {body}");
        if status >= 400 {
            assert_outcome(&body);
        } else {
            assert_eq!(body["total"], 0, "{path}");
        }
    }
    let delete = gw.http.delete(gw.url("Patient/1")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(delete.status(), 405);
    assert_outcome(&delete.json().await.unwrap());
    let turtle_accept = gw.http.get(gw.url("Patient")).bearer_auth(&token).header("accept", "text/turtle").send().await.unwrap();
    assert_eq!(turtle_accept.status(), 406);
    let bad_if_match = gw.http.put(gw.url("Patient/p")).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-match", "yesterday").body(json!({"resourceType":"Patient","id":"p"}).to_string()).send().await.unwrap();
    assert_eq!(bad_if_match.status(), 400);
    // The tables are all still there and the server still answers.
    let (status, _) = gw.post(&token, "Patient", &patient("AFTER")).await;
    assert_eq!(status, 201);
    assert_eq!(gw.http.get(gw.url("healthz")).send().await.unwrap().status(), 200);
    gw.stop().await;
}

/// Opens a raw connection and sends a request whose body never finishes arriving; returns the open socket.
async fn stalled_request(gw: &Gateway, token: &str) -> tokio::net::TcpStream {
    partial_request(gw, token, 1000).await
}

/// Opens a raw connection and sends a POST that declares `content_length` bytes of body but sends
/// only its first few; returns the open socket.
async fn partial_request(gw: &Gateway, token: &str, content_length: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = gw.running.as_ref().unwrap().local_addr;
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /Patient HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: {content_length}\r\n\r\n{{\"resourceType\":");
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

async fn read_response(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buffer = vec![0u8; 8192];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buffer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_408_429_and_503_with_outcomes() {
    let gw = Gateway::start_with("max_body_bytes = 2048\nrequest_timeout_secs = 1\nmax_concurrent_requests_per_client = 1\n").await;
    let token = gw.token("clinic").await;
    let mut big = patient("BIG");
    big["name"][0]["family"] = json!("x".repeat(4096));
    let (status, body) = gw.post(&token, "Patient", &big).await;
    assert_eq!(status, 413);
    assert_outcome(&body);
    // A body that never finishes arriving runs into the time limit; meanwhile the client's one slot is taken.
    let mut slow = stalled_request(&gw, &token).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, body) = gw.get(&token, "Patient").await;
    assert_eq!(status, 429, "{body}");
    assert_outcome(&body);
    let answer = read_response(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    gw.stop().await;

    // Partners and strangers have budgets of their own: a full one refuses with 503, the other still serves.
    let gw = Gateway::start_with("max_concurrent_requests = 1\nrequest_timeout_secs = 2\n").await;
    let token = gw.token("clinic").await;
    let other = gw.token("unit-a").await;
    let _held = stalled_request(&gw, &token).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let busy = gw.http.get(gw.url("Patient")).bearer_auth(&other).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert!(busy.headers().contains_key("retry-after"));
    assert_outcome(&busy.json().await.unwrap());
    assert_eq!(gw.http.get(gw.url("metadata")).send().await.unwrap().status(), 200);
    gw.stop().await;
}
