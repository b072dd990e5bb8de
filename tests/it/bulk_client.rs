//! The Bulk Data export client (`partner::bulk`) against a Bulk Data server played by wiremock: SMART token, kick-off, polling, downloads (gzip, ranges), resumption, refusals and failures.

use std::io::Write;
use std::sync::{Arc, Mutex};

use iop_gateway::auth::keys::KeyPair;
use iop_gateway::partner::bulk::{self, BulkError, Event, FileKind, Request};
use iop_gateway::partner::{Credentials, FhirClient, Transport};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

use crate::server::support::TempDir;

const PATIENTS: &str = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n";
const OBSERVATIONS: &str = "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"status\":\"final\",\"code\":{\"text\":\"PHQ-9\"}}\n";

/// A Bulk Data server: SMART discovery and a token endpoint that hands out `the-token`.
async fn server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/smart-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "token_endpoint": format!("{}/token", server.uri()) })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "access_token": "the-token", "token_type": "bearer", "expires_in": 300 })))
        .mount(&server)
        .await;
    server
}

fn client(server: &MockServer) -> FhirClient {
    iop_gateway::server::install_crypto_provider();
    let key = KeyPair::generate_es384("clinic-1").unwrap();
    let credentials = Credentials::Smart { key, client_id: "clinic".into(), scopes: "system/*.read".into() };
    FhirClient::new(&server.uri(), credentials, None, &Transport::default()).unwrap()
}

fn manifest(server: &MockServer, requires_token: bool, patients: u64) -> Value {
    json!({
        "transactionTime": "2026-12-05T10:00:00Z",
        "request": format!("{}/$export", server.uri()),
        "requiresAccessToken": requires_token,
        "output": [
            { "type": "Patient", "url": format!("{}/files/patients", server.uri()), "count": patients },
            { "type": "Observation", "url": format!("{}/files/observations", server.uri()), "count": 1 }
        ],
        "error": []
    })
}

/// Answers the status URL with 202 `times` times, then with the manifest.
struct Status {
    polls: Mutex<u32>,
    running_for: u32,
    manifest: Value,
}

impl Respond for Status {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let mut polls = self.polls.lock().unwrap();
        *polls += 1;
        if *polls <= self.running_for {
            ResponseTemplate::new(202).insert_header("x-progress", format!("{}0% done", *polls)).insert_header("retry-after", "0")
        } else {
            ResponseTemplate::new(200).set_body_json(&self.manifest)
        }
    }
}

async fn mount_kick_off(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/$export"))
        .and(header("prefer", "respond-async"))
        .and(header("authorization", "Bearer the-token"))
        .respond_with(ResponseTemplate::new(202).insert_header("content-location", format!("{}/jobs/1", server.uri())))
        .expect(1)
        .mount(server)
        .await;
}

async fn mount_files(server: &MockServer, authorization: bool) {
    for (file, body) in [("patients", PATIENTS), ("observations", OBSERVATIONS)] {
        let mock = Mock::given(method("GET")).and(path(format!("/files/{file}")));
        let mock = if authorization { mock.and(header("authorization", "Bearer the-token")) } else { mock };
        mock.respond_with(ResponseTemplate::new(200).insert_header("content-type", "application/fhir+ndjson").set_body_string(body)).mount(server).await;
    }
}

async fn run(client: &FhirClient, out: &std::path::Path, request: &Request) -> (Result<bulk::Export, BulkError>, Vec<String>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let result = bulk::export(client, request, out, &mut |event: Event| sink.lock().unwrap().push(format!("{event:?}"))).await;
    let events = events.lock().unwrap().clone();
    (result, events)
}

#[tokio::test]
async fn an_export_is_kicked_off_polled_and_downloaded_with_the_token() {
    let server = server().await;
    mount_kick_off(&server).await;
    let status = Status { polls: Mutex::new(0), running_for: 2, manifest: manifest(&server, true, 2) };
    Mock::given(method("GET")).and(path("/jobs/1")).and(header("authorization", "Bearer the-token")).respond_with(status).expect(3).mount(&server).await;
    mount_files(&server, true).await;
    let out = TempDir::new("bulk-client");
    let (result, events) = run(&client(&server), &out.0, &Request::default()).await;
    let export = result.unwrap();
    assert_eq!(export.files.len(), 2);
    assert_eq!(std::fs::read_to_string(out.0.join("Patient.001.ndjson")).unwrap(), PATIENTS);
    assert_eq!(std::fs::read_to_string(out.0.join("Observation.001.ndjson")).unwrap(), OBSERVATIONS);
    assert_eq!(export.files.iter().map(|f| f.resources).collect::<Vec<_>>(), [2, 1]);
    assert!(export.files.iter().all(|f| f.kind == FileKind::Output));
    assert!(events.iter().any(|e| e.contains("10% done")), "the server's progress is shown: {events:?}");
    assert!(events.iter().any(|e| e.starts_with("KickedOff")));
    // The state names the job and holds the manifest, so a second run fetches nothing again.
    let state: Value = serde_json::from_str(&std::fs::read_to_string(out.0.join(bulk::STATE_FILE)).unwrap()).unwrap();
    assert_eq!(state["status"], format!("{}/jobs/1", server.uri()));
    let (again, events) = run(&client(&server), &out.0, &Request::default()).await;
    assert_eq!(again.unwrap().files.len(), 2);
    assert!(events.iter().any(|e| e.starts_with("Resumed")) && events.iter().filter(|e| e.contains("resumed: true")).count() == 2, "{events:?}");
}

#[tokio::test]
async fn files_that_need_no_token_get_none_and_gzip_is_decoded() {
    let server = server().await;
    mount_kick_off(&server).await;
    let status = Status { polls: Mutex::new(0), running_for: 0, manifest: manifest(&server, false, 2) };
    Mock::given(method("GET")).and(path("/jobs/1")).respond_with(status).mount(&server).await;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(PATIENTS.as_bytes()).unwrap();
    let compressed = gzip.finish().unwrap();
    Mock::given(method("GET"))
        .and(path("/files/patients"))
        .respond_with(ResponseTemplate::new(200).insert_header("content-encoding", "gzip").set_body_bytes(compressed))
        .mount(&server)
        .await;
    Mock::given(method("GET")).and(path("/files/observations")).respond_with(ResponseTemplate::new(200).set_body_string(OBSERVATIONS)).mount(&server).await;
    let out = TempDir::new("bulk-client");
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    result.unwrap();
    assert_eq!(std::fs::read_to_string(out.0.join("Patient.001.ndjson")).unwrap(), PATIENTS);
    let requests = server.received_requests().await.unwrap();
    let file_requests: Vec<_> = requests.iter().filter(|r| r.url.path().starts_with("/files/")).collect();
    assert_eq!(file_requests.len(), 2);
    assert!(file_requests.iter().all(|r| !r.headers.contains_key("authorization")), "requiresAccessToken false: no token is sent with the files");
}

#[tokio::test]
async fn an_interrupted_download_resumes_from_its_last_complete_line() {
    let server = server().await;
    // An earlier run kicked off, got the manifest and half a file: nothing is asked again but the rest.
    let out = TempDir::new("bulk-client");
    let request = Request::default();
    let state = json!({ "request": format!("{}/$export", server.uri()), "status": format!("{}/jobs/1", server.uri()), "manifest": manifest(&server, true, 2) });
    std::fs::write(out.0.join(bulk::STATE_FILE), state.to_string()).unwrap();
    let first_line = PATIENTS.split_inclusive('\n').next().unwrap();
    std::fs::write(out.0.join("Patient.001.ndjson.part"), format!("{first_line}{{\"resourceType\":\"Pat")).unwrap();
    std::fs::write(out.0.join("Observation.001.ndjson"), OBSERVATIONS).unwrap();
    Mock::given(method("GET")).and(path("/$export")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&server).await;
    Mock::given(method("GET")).and(path("/jobs/1")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/files/patients"))
        .and(header("range", format!("bytes={}-", first_line.len()).as_str()))
        .respond_with(ResponseTemplate::new(206).set_body_string(&PATIENTS[first_line.len()..]))
        .expect(1)
        .mount(&server)
        .await;
    let (result, _) = run(&client(&server), &out.0, &request).await;
    let export = result.unwrap();
    assert_eq!(std::fs::read_to_string(out.0.join("Patient.001.ndjson")).unwrap(), PATIENTS);
    assert!(!out.0.join("Patient.001.ndjson.part").exists());
    assert_eq!(export.files.iter().map(|f| f.resources).sum::<u64>(), 3);
}

#[tokio::test]
async fn a_file_that_contradicts_the_manifest_is_not_kept() {
    let server = server().await;
    mount_kick_off(&server).await;
    let status = Status { polls: Mutex::new(0), running_for: 0, manifest: manifest(&server, true, 5) };
    Mock::given(method("GET")).and(path("/jobs/1")).respond_with(status).mount(&server).await;
    mount_files(&server, true).await;
    let out = TempDir::new("bulk-client");
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("Patient.001.ndjson") && error.contains("says 5") && error.contains("holds 2"), "{error}");
    assert!(!out.0.join("Patient.001.ndjson").exists() && !out.0.join("Patient.001.ndjson.part").exists());
}

#[tokio::test]
async fn a_busy_server_is_asked_again_and_a_refusal_says_what_and_where() {
    let server = server().await;
    Mock::given(method("GET"))
        .and(path("/Patient/$export"))
        .and(query_param("_type", "Foo"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": "error", "code": "not-supported", "expression": ["_type"], "diagnostics": "Foo is not a resource type this server exports" }]
        })))
        .mount(&server)
        .await;
    let out = TempDir::new("bulk-client");
    let request = Request { level: Some(bulk::Level::Patient), types: vec!["Foo".into()], ..Request::default() };
    let (result, _) = run(&client(&server), &out.0, &request).await;
    let error = result.unwrap_err();
    assert!(matches!(error, BulkError::Refused { status: 400, .. }));
    assert!(error.to_string().contains("at _type: Foo is not a resource type"), "{error}");
    assert!(!out.0.join(bulk::STATE_FILE).exists(), "nothing was started, so nothing is resumed");

    // 429 with Retry-After, then accepted.
    Mock::given(method("GET")).and(path("/$export")).respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0")).up_to_n_times(2).mount(&server).await;
    mount_kick_off(&server).await;
    let status = Status { polls: Mutex::new(0), running_for: 0, manifest: manifest(&server, true, 2) };
    Mock::given(method("GET")).and(path("/jobs/1")).respond_with(status).mount(&server).await;
    mount_files(&server, true).await;
    let out = TempDir::new("bulk-client");
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    result.unwrap();
}

#[tokio::test]
async fn a_failed_job_is_reported_and_a_vanished_one_is_started_anew_next_time() {
    let server = server().await;
    mount_kick_off(&server).await;
    Mock::given(method("GET"))
        .and(path("/jobs/1"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": "error", "code": "exception", "diagnostics": "the export ran out of disk" }]
        })))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET")).and(path("/jobs/1")).respond_with(ResponseTemplate::new(404)).mount(&server).await;
    let out = TempDir::new("bulk-client");
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    let error = result.unwrap_err();
    assert!(matches!(error, BulkError::Failed { status: 500, .. }) && error.to_string().contains("ran out of disk"), "{error}");
    assert!(out.0.join(bulk::STATE_FILE).exists(), "a failure keeps the state: the job may be asked about again");
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    assert!(matches!(result.unwrap_err(), BulkError::Gone { status: 404, .. }));
    assert!(!out.0.join(bulk::STATE_FILE).exists(), "a job that is gone is forgotten, so the next run starts a new one");
}

#[tokio::test]
async fn a_folder_holding_another_export_is_refused() {
    let server = server().await;
    let out = TempDir::new("bulk-client");
    std::fs::write(out.0.join(bulk::STATE_FILE), json!({ "request": "https://elsewhere.example/$export", "status": "https://elsewhere.example/jobs/9" }).to_string()).unwrap();
    let (result, _) = run(&client(&server), &out.0, &Request::default()).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("holds another export") && error.contains("elsewhere.example"), "{error}");
}
