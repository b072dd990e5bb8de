//! Nothing acknowledged is lost: the `iop-gateway serve` binary is SIGKILLed while clients write, restarted on the same data, and every write that got a 2xx is read back. Also the command line around the server: `check-config`, `clients add`, `token`.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::support::{TempDir, partner_keys, phq9};

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(super) fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iop-gateway"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iop-gateway serve")
}

pub(super) async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway at {base} did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_writing_loses_no_acknowledged_write() {
    let dir = TempDir::new("kill");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let keys = partner_keys();
    let text = super::support::config_text(&dir.0, &keys, "").replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let http = reqwest::Client::new();

    let mut child = spawn(&config);
    wait_ready(&http, &base).await;
    let clinic = &keys.iter().find(|(id, _)| id == "clinic").unwrap().1;
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = iop_gateway::auth::keys::sign_assertion(clinic, "clinic", &format!("{base}/auth/token"), "kill-1", now + 120).unwrap();
    let granted: Value = http
        .post(format!("{base}/auth/token"))
        .form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = granted["access_token"].as_str().unwrap().to_string();

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..6 {
        let (http, base, token, acknowledged) = (http.clone(), base.clone(), token.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let body = phq9("Patient/kill-test", (w * 7 + i) % 28, "2026-03-02T09:30:00Z").to_string();
                let sent = http.post(format!("{base}/Observation")).bearer_auth(&token).header("content-type", "application/fhir+json").body(body).send().await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        let location = r.headers()["location"].to_str().unwrap().to_string();
                        acknowledged.lock().unwrap().push(location);
                    }
                    Ok(r) => panic!("a write failed while the server was up: {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().expect("SIGKILL the gateway");
    child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 20, "only {} writes before the kill", acknowledged.len());

    let mut child = spawn(&config);
    wait_ready(&http, &base).await;
    // The token was stored durably too: the restarted server still honours it.
    for location in &acknowledged {
        let path = location.trim_start_matches(&base);
        let id = path.split('/').nth(2).unwrap();
        let response = http.get(format!("{base}/Observation/{id}")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200, "acknowledged {location} is gone after the kill");
    }
    let total: Value = http.get(format!("{base}/Observation?_count=0")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert!(total["total"].as_u64().unwrap() as usize >= acknowledged.len());
    // SIGTERM is a graceful stop.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}

#[test]
fn check_config_clients_add_and_the_example() {
    let dir = TempDir::new("cli");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_iop-gateway")).current_dir(&dir.0).args(args).env_remove("IOP_GATEWAY_CONFIG").output().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.example.toml");
    let ok = run(&["check-config", "--config", example]);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration OK"));
    std::fs::write(dir.0.join("bad.toml"), "[server]\nlisten = 'nowhere'\nmax_body_bytez = 1\n").unwrap();
    let bad = run(&["check-config", "--config", "bad.toml"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("max_body_bytez"), "{}", String::from_utf8_lossy(&bad.stderr));
    let serve_bad = run(&["serve", "--config", "bad.toml"]);
    assert_eq!(serve_bad.status.code(), Some(2), "serve refuses an invalid configuration before binding");

    let added = run(&["clients", "add", "riverside", "--role", "inpatient-unit"]);
    assert_eq!(added.status.code(), Some(0), "{}", String::from_utf8_lossy(&added.stderr));
    assert!(dir.0.join("data/clients/riverside.key.pem").is_file());
    let again = run(&["clients", "add", "riverside", "--role", "payer"]);
    assert_eq!(again.status.code(), Some(2), "a client id is registered once");
    let wrong_role = run(&["clients", "add", "x", "--role", "hacker"]);
    assert_eq!(wrong_role.status.code(), Some(2));
    let checked = run(&["check-config"]);
    assert_eq!(checked.status.code(), Some(0), "{}", String::from_utf8_lossy(&checked.stderr));
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(stdout.contains("riverside (inpatient-unit, Organization/riverside, keys data/clients/riverside.jwks.json)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_gets_a_token_from_the_running_server() {
    let dir = TempDir::new("token-cli");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_iop-gateway")).current_dir(&dir.0).args(args).env_remove("IOP_GATEWAY_CONFIG").output().unwrap();
    assert_eq!(run(&["clients", "add", "riverside", "--role", "inpatient-unit"]).status.code(), Some(0));
    let port = free_port();
    let mut text = std::fs::read_to_string(dir.0.join("gateway.toml")).unwrap();
    text = format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{text}");
    std::fs::write(dir.0.join("gateway.toml"), text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_iop-gateway")).current_dir(&dir.0).arg("serve").env("RUST_LOG", "warn").env_remove("IOP_GATEWAY_CONFIG").stderr(Stdio::null()).spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;
    let out = run(&["token", "--client", "riverside"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let response = http.get(format!("{base}/ServiceRequest")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_add_and_the_outbox_commands() {
    let dir = TempDir::new("outbox-cli");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_iop-gateway")).current_dir(&dir.0).args(args).env_remove("IOP_GATEWAY_CONFIG").output().unwrap();
    let added = run(&["partners", "add", "synthetic-health", "--kind", "payer", "--fhir-base", "https://payer.example/fhir", "--route", "PAYER-77", "--client-id", "iop-northside"]);
    assert_eq!(added.status.code(), Some(0), "{}", String::from_utf8_lossy(&added.stderr));
    let printed = String::from_utf8_lossy(&added.stdout);
    assert!(printed.contains("\"kty\": \"EC\"") && printed.contains("iop-northside"), "prints the JWKS to register: {printed}");
    assert!(dir.0.join("data/partners/synthetic-health.key.pem").is_file());
    assert_eq!(run(&["partners", "add", "synthetic-health", "--kind", "payer", "--fhir-base", "https://x.example"]).status.code(), Some(2), "a name is configured once");
    assert_eq!(run(&["partners", "add", "other", "--kind", "pharmacy", "--fhir-base", "https://x.example"]).status.code(), Some(2));
    let checked = run(&["check-config"]);
    assert_eq!(checked.status.code(), Some(0), "{}", String::from_utf8_lossy(&checked.stderr));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("synthetic-health (payer, https://payer.example/fhir, auth smart, routes PAYER-77)"), "{}", String::from_utf8_lossy(&checked.stdout));

    // A dead letter, made through the store as the delivery worker would.
    let loaded = iop_gateway::config::Config::load(Some(&dir.0.join("gateway.toml")), &[], &Default::default()).unwrap();
    let mut store_config = loaded.config.store.clone();
    store_config.data_dir = dir.0.join("data");
    let store = iop_gateway::store::Store::open(&store_config, Default::default()).await.unwrap();
    let message = iop_gateway::store::NewMessage {
        id: "4a1f-dead".into(),
        partner: "synthetic-health".into(),
        subject: "authorization:A-1".into(),
        kind: "pas-submit".into(),
        record_type: "authorization".into(),
        record_id: "A-1".into(),
        payload: "{}".into(),
    };
    let mut tx = store.begin().await.unwrap();
    assert!(tx.enqueue(&message, 1).await.unwrap());
    tx.commit().await.unwrap();
    let claimed = store.claim_due(2, 60_000, "test", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let mut tx = store.begin().await.unwrap();
    let end = iop_gateway::store::Ending {
        status: iop_gateway::store::MessageStatus::Dead,
        at_ms: 3,
        http_status: 400,
        error: "the partner refused the message (400)",
        response: "{\"resourceType\":\"OperationOutcome\"}",
    };
    assert!(tx.finish_message("4a1f-dead", "test", &end).await.unwrap());
    tx.commit().await.unwrap();
    store.close().await;

    let listed = run(&["outbox", "list", "--status", "dead"]);
    assert_eq!(listed.status.code(), Some(0), "{}", String::from_utf8_lossy(&listed.stderr));
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("4a1f-dead") && text.contains("dead") && text.contains("1 message(s)"), "{text}");
    let shown = run(&["outbox", "show", "4a1f-dead"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("OperationOutcome"), "{}", String::from_utf8_lossy(&shown.stdout));
    assert_eq!(run(&["outbox", "replay", "4a1f-dead"]).status.code(), Some(0));
    assert_eq!(run(&["outbox", "replay", "4a1f-dead"]).status.code(), Some(1), "only a dead letter is replayed");
    assert!(String::from_utf8_lossy(&run(&["outbox", "list", "--status", "pending"]).stdout).contains("4a1f-dead"));
}
