//! Test harness: a real gateway on 127.0.0.1:0 with freshly generated partner keys, a real HTTP client, and helpers to get tokens through the real token endpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use iop_gateway::auth::keys::{KeyPair, sign_assertion};
use iop_gateway::config::{Config, Loaded};
use iop_gateway::server::{self, Running};
use serde_json::{Value, json};

/// A folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!("iop-gw-{label}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The partners every test server registers: (id, role, organization).
pub const PARTNERS: &[(&str, &str, &str)] = &[
    ("unit-a", "inpatient-unit", "Organization/unit-a"),
    ("unit-b", "inpatient-unit", "Organization/unit-b"),
    ("payer-x", "payer", "Organization/payer-x"),
    ("payer-y", "payer", "Organization/payer-y"),
    ("clinic", "clinic", "Organization/iop-program"),
    ("ops", "admin", "Organization/ops"),
];

pub struct Gateway {
    pub running: Option<Running>,
    pub base: String,
    pub http: reqwest::Client,
    pub keys: Vec<(String, KeyPair)>,
    /// Kept so the data folder lives as long as the server.
    pub _dir: TempDir,
}

/// The configuration text for a test gateway whose keys live in `dir`; `extra` is appended verbatim.
pub fn config_text(dir: &Path, keys: &[(String, KeyPair)], extra: &str) -> String {
    let mut text = format!("[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[store]\ndata_dir = {:?}\n", dir.join("data").display().to_string());
    for ((id, role, org), (_, pair)) in PARTNERS.iter().zip(keys) {
        let jwks = dir.join(format!("{id}.jwks.json"));
        std::fs::write(&jwks, pair.jwks_json()).unwrap();
        text.push_str(&format!("[[clients]]\nid = \"{id}\"\nrole = \"{role}\"\norganization = \"{org}\"\njwks_file = {:?}\n", jwks.display().to_string()));
    }
    text
}

pub fn partner_keys() -> Vec<(String, KeyPair)> {
    PARTNERS.iter().map(|(id, _, _)| (id.to_string(), KeyPair::generate_es384(&format!("{id}-1")).unwrap())).collect()
}

pub fn load(text: &str, dir: &Path) -> Loaded {
    Config::from_toml(text, dir).unwrap_or_else(|e| panic!("test configuration: {e}"))
}

impl Gateway {
    /// A gateway on the embedded SQLite store.
    pub async fn start() -> Gateway {
        Gateway::start_with("").await
    }

    /// A gateway with extra configuration: keys of the [server] table, or tables such as [server.tls].
    pub async fn start_with(extra: &str) -> Gateway {
        let dir = TempDir::new("server");
        let keys = partner_keys();
        let text = config_text(&dir.0, &keys, extra);
        Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
    }

    pub async fn start_loaded(loaded: Loaded, keys: Vec<(String, KeyPair)>, dir: TempDir) -> Gateway {
        let running = server::start(loaded, std::future::pending()).await.expect("the gateway starts");
        let base = running.base_url.clone();
        Gateway { running: Some(running), base, http: reqwest::Client::new(), keys, _dir: dir }
    }

    pub fn key(&self, client: &str) -> &KeyPair {
        &self.keys.iter().find(|(id, _)| id == client).expect("a registered partner").1
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base)
    }

    /// Posts a client assertion to the token endpoint.
    pub async fn token_response(&self, assertion: &str, scope: &str) -> reqwest::Response {
        self.http
            .post(self.token_url())
            .form(&iop_gateway::auth::token_request_form(assertion, scope))
            .send()
            .await
            .unwrap()
    }

    pub fn assertion(&self, client: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        sign_assertion(self.key(client), client, &self.token_url(), &uuid::Uuid::new_v4().to_string(), now + 120).unwrap()
    }

    /// An access token for a partner with the given scopes, through the real token endpoint.
    pub async fn token_for(&self, client: &str, scope: &str) -> String {
        let response = self.token_response(&self.assertion(client), scope).await;
        assert_eq!(response.status(), 200, "token for {client}");
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    /// A token with everything the partner's role allows.
    pub async fn token(&self, client: &str) -> String {
        self.token_for(client, "system/*.cruds").await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).bearer_auth(token).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn send(&self, method: reqwest::Method, token: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = self.send(reqwest::Method::POST, token, path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = self.send(reqwest::Method::PUT, token, path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// Asserts a body is an OperationOutcome with at least one issue.
pub fn assert_outcome(body: &Value) {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert!(body["issue"].as_array().is_some_and(|i| !i.is_empty()), "{body}");
}

pub fn patient(identifier: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": identifier}],
        "name": [{"family": "Testperson", "given": ["Sam"]}],
        "gender": "other",
        "birthDate": "1991-04-02"
    })
}

pub fn phq9(patient_ref: &str, score: u32, when: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}], "text": "PHQ-9 total score"},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": when,
        "valueInteger": score
    })
}

/// A referral transaction: Patient + ServiceRequest (addressed to the program) + Task, linked by urn:uuid.
pub fn referral(identifier: &str) -> Value {
    let p = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let sr = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": p, "resource": patient(identifier), "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": sr, "resource": {
                "resourceType": "ServiceRequest",
                "identifier": [{"system": "urn:example:referrals", "value": format!("ref-{identifier}")}],
                "status": "active", "intent": "order", "priority": "urgent",
                "code": {"text": "Intensive outpatient program, step-down from inpatient"},
                "subject": {"reference": p},
                "performer": [{"reference": "Organization/iop-program"}],
                "authoredOn": "2026-03-01"
            }, "request": {"method": "POST", "url": "ServiceRequest"}},
            {"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()), "resource": {
                "resourceType": "Task",
                "status": "requested", "intent": "order",
                "basedOn": [{"reference": sr}],
                "for": {"reference": p},
                "authoredOn": "2026-03-01T10:00:00Z"
            }, "request": {"method": "POST", "url": "Task"}}
        ]
    })
}
