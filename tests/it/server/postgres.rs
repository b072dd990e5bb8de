//! Two gateway instances over one PostgreSQL (the one on this machine, a fresh schema per test): concurrent writers lose no update (stale ETags get 412), conditional creates never duplicate, and tokens and assertion ids are shared.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::support::{Gateway, TempDir, config_text, load, partner_keys, patient};

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh schema name, dropped by [`drop_schema`].
pub fn schema_name(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("it_{label}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst), time::OffsetDateTime::now_utc().unix_timestamp())
}

pub async fn drop_schema(schema: &str) {
    let pool = sqlx::PgPool::connect(PG_URL).await.expect("PostgreSQL at 127.0.0.1:5432 (database test)");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&pool).await.unwrap();
    pool.close().await;
}

/// Two gateways sharing one schema and one public base URL (so a token's audience is the same for both).
async fn two_instances(schema: &str) -> (Gateway, Gateway) {
    let keys_a = partner_keys();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let dir = TempDir::new("pg");
        let keys: Vec<_> = keys_a.iter().map(|(id, k)| (id.clone(), iop_gateway::auth::keys::KeyPair::from_pem(&k.private_pem, &k.kid).unwrap())).collect();
        let text = config_text(&dir.0, &keys, "base_url = \"http://gateway.test\"")
            .replacen("[store]\n", &format!("[store]\nurl = \"{PG_URL}\"\nschema = \"{schema}\"\nmax_connections = 16\n"), 1);
        instances.push(Gateway::start_loaded(load(&text, &dir.0), keys, dir).await);
    }
    let b = instances.pop().unwrap();
    let a = instances.pop().unwrap();
    (a, b)
}

fn direct(gw: &Gateway, path: &str) -> String {
    format!("http://{}/{path}", gw.running.as_ref().unwrap().local_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_lose_no_updates_and_create_no_duplicates() {
    let schema = schema_name("two");
    let (a, b) = two_instances(&schema).await;
    assert_eq!(a.running.as_ref().unwrap().store.backend(), iop_gateway::store::Backend::Postgres);
    // Tokens are minted at /auth/token of either instance (same audience) and honoured by both.
    let assertion = a.assertion("clinic");
    let response = a.http.post(direct(&a, "auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_string();
    let replay = b.http.post(direct(&b, "auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap();
    assert_eq!(replay.status(), 401, "a jti used at one instance is refused at the other");

    let created: Value = a.http.post(direct(&a, "Patient")).bearer_auth(&token).header("content-type", "application/fhir+json").body(patient("PG-1").to_string()).send().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();

    // 24 writers, half through each instance, each reads then writes with If-Match.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let gw_base = if i % 2 == 0 { direct(&a, "") } else { direct(&b, "") };
        let (http, token, id) = (a.http.clone(), token.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let url = format!("{gw_base}Patient/{id}");
            let current: Value = http.get(&url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
            let version = current["meta"]["versionId"].as_str().unwrap().to_string();
            let mut next = current.clone();
            next["name"][0]["given"] = json!([format!("Writer{i}")]);
            let response = http.put(&url).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-match", format!("W/\"{version}\"")).body(next.to_string()).send().await.unwrap();
            let status = response.status().as_u16();
            let etag = response.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
            (status, etag)
        }));
    }
    let mut ok = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            (200, Some(etag)) => ok.push(etag),
            (412, _) => conflicts += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(!ok.is_empty());
    let distinct: std::collections::HashSet<_> = ok.iter().collect();
    assert_eq!(distinct.len(), ok.len(), "two writers were given the same new version: {ok:?}");
    let history: Value = b.http.get(direct(&b, &format!("Patient/{id}/_history?_count=100"))).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(history["total"].as_u64().unwrap() as usize, 1 + ok.len(), "every acknowledged update is a version; {conflicts} got 412");

    // 16 concurrent conditional creates of the same identifier, through both instances: one resource.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let gw_base = if i % 2 == 0 { direct(&a, "") } else { direct(&b, "") };
        let (http, token) = (a.http.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            http.post(format!("{gw_base}Patient")).bearer_auth(&token).header("content-type", "application/fhir+json")
                .header("if-none-exist", "identifier=urn:oid:2.16.840.1.113883.3.9999.1|PG-ONCE").body(patient("PG-ONCE").to_string()).send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 201), "{statuses:?}");
    let found: Value = a.http.get(direct(&a, "Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|PG-ONCE")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 1);

    // A transaction through B is visible through A.
    let tx: Value = b.http.post(direct(&b, "")).bearer_auth(&token).header("content-type", "application/fhir+json").body(super::support::referral("PG-TX").to_string()).send().await.unwrap().json().await.unwrap();
    let sr = tx["entry"][1]["resource"]["id"].as_str().unwrap();
    assert_eq!(a.http.get(direct(&a, &format!("ServiceRequest/{sr}"))).bearer_auth(&token).send().await.unwrap().status(), 200);
    a.stop().await;
    b.stop().await;
    drop_schema(&schema).await;
}
