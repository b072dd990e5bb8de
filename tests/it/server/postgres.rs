//! Two gateway instances over one PostgreSQL (the one on this machine, a fresh schema per test): concurrent writers lose no update (stale ETags get 412), conditional creates never duplicate, tokens and assertion ids are shared, one outbox is drained by both delivery workers with every message delivered once, and a write racing an enrolment ends up labelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Row;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::support::{Gateway, TempDir, config_text, load, partner_keys, patient};


/// A fresh schema name, dropped by [`drop_schema`].
pub fn schema_name(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("it_{label}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst), time::OffsetDateTime::now_utc().unix_timestamp())
}

pub async fn drop_schema(schema: &str) {
    let pool = sqlx::PgPool::connect(&crate::need::postgres_url()).await.expect("the PostgreSQL of the tests");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&pool).await.unwrap();
    pool.close().await;
}

/// Two gateways sharing one schema and one public base URL (so a token's audience is the same for both).
async fn two_instances(schema: &str) -> (Gateway, Gateway) {
    two_instances_with(schema, |_| String::new()).await
}

/// [`two_instances`] with configuration tables appended for instance 0 and instance 1.
async fn two_instances_with(schema: &str, tables: impl Fn(usize) -> String) -> (Gateway, Gateway) {
    let keys_a = partner_keys();
    let mut instances = Vec::new();
    for instance in 0..2 {
        let dir = TempDir::new("pg");
        let keys: Vec<_> = keys_a.iter().map(|(id, k)| (id.clone(), iop_gateway::auth::keys::KeyPair::from_pem(&k.private_pem, &k.kid).unwrap())).collect();
        let text = config_text(&dir.0, &keys, "base_url = \"http://gateway.test\"")
            .replacen("[store]\n", &format!("[store]\nurl = \"{}\"\nschema = \"{schema}\"\nmax_connections = 16\n", crate::need::postgres_url()), 1)
            + &tables(instance);
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
    if crate::need::postgres("server::postgres::two_instances_lose_no_updates_and_create_no_duplicates").is_none() {
        return;
    }
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

/// A payer answering every `$submit` with the certified fixture for the submitted authorization, counting its 200s per (instance, `Bundle.identifier`); the instance is the first segment of the path, because each instance is configured with its own base path on this one server.
struct CountingPayer {
    answered: Arc<Mutex<HashMap<(String, String), usize>>>,
    fixture: String,
    fixture_id: String,
}

impl Respond for CountingPayer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let submitted: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let bundle_id = submitted["identifier"]["value"].as_str().unwrap_or_default().to_string();
        let claim_id = submitted["entry"][0]["resource"]["identifier"][0]["value"].as_str().unwrap_or_default();
        if bundle_id.is_empty() || bundle_id != claim_id {
            // Counted under its own key so the exactly-once check below fails loudly.
            return ResponseTemplate::new(400).set_body_string(format!("Bundle.identifier {bundle_id:?} does not name the Claim {claim_id:?}"));
        }
        let instance = request.url.path().trim_start_matches('/').split('/').next().unwrap_or_default().to_string();
        *self.answered.lock().unwrap().entry((instance, bundle_id.clone())).or_default() += 1;
        ResponseTemplate::new(200).insert_header("content-type", "application/fhir+json").set_body_string(self.fixture.replace(&self.fixture_id, &bundle_id))
    }
}

/// 500 authorizations queued through both instances of one PostgreSQL schema, both running the delivery worker to the same payer: every authorization reaches the payer exactly once, gets one ClaimResponse and one decision, and both workers took part.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_outbox_and_deliver_every_message_once() {
    if crate::need::postgres("server::postgres::two_instances_share_one_outbox_and_deliver_every_message_once").is_none() {
        return;
    }
    const AUTHORIZATIONS: usize = 500;
    const BATCH: usize = 50;
    let root = env!("CARGO_MANIFEST_DIR");
    let fixture = std::fs::read_to_string(format!("{root}/tests/fixtures/pas/decision-certified.json")).unwrap();
    let parsed: Value = serde_json::from_str(&fixture).unwrap();
    let fixture_id = parsed["identifier"]["value"].as_str().unwrap().to_string();
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let payer = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/(a|b)/Claim/\$submit$"))
        .respond_with(CountingPayer { answered: answered.clone(), fixture, fixture_id })
        .mount(&payer)
        .await;

    let schema = schema_name("outbox");
    let uri = payer.uri();
    // One partner name (the outbox row names the partner), reached under a different base path per instance so the payer can tell who sent what.
    let (a, b) = two_instances_with(&schema, |instance| {
        format!(
            "[outbox]\npoll_interval_ms = 50\nconcurrency = 16\n\n[[partners]]\nname = \"synthetic-health\"\nkind = \"payer\"\nfhir_base = \"{uri}/{}\"\nroutes = [\"PAYER-77\"]\nauth = \"none\"\ntimeout_secs = 10\n",
            ["a", "b"][instance]
        )
    })
    .await;
    let granted = a.http.post(direct(&a, "auth/token")).form(&iop_gateway::auth::token_request_form(a.assertion("clinic").as_str(), "system/*.cruds")).send().await.unwrap();
    assert_eq!(granted.status(), 200);
    let token = granted.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_string();

    let fixture_records: Value = serde_json::from_str(&std::fs::read_to_string(format!("{root}/tests/fixtures/iop/authorization/initial.json")).unwrap()).unwrap();
    let ids: Vec<String> = (0..AUTHORIZATIONS).map(|i| format!("AUTH-PG-{i:04}")).collect();
    // Batches alternate between the instances; each carries the client and screening its authorizations reference (unchanged resends).
    let started = Instant::now();
    for (n, batch) in ids.chunks(BATCH).enumerate() {
        let mut body = vec![fixture_records[0].clone(), fixture_records[1].clone()];
        for id in batch {
            let mut authorization = fixture_records[2].clone();
            authorization["id"] = json!(id);
            body.push(authorization);
        }
        let gw = if n % 2 == 0 { &a } else { &b };
        let response = gw.http.post(direct(gw, "iop/records")).bearer_auth(&token).header("content-type", "application/json").body(Value::Array(body).to_string()).send().await.unwrap();
        let status = response.status().as_u16();
        let summary: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "batch {n}: {summary}");
        let queued = summary["records"].as_array().unwrap().iter().filter(|r| r["record_type"] == "authorization" && r["messages"].as_array().map(Vec::len) == Some(1)).count();
        assert_eq!(queued, batch.len(), "batch {n}: one message per authorization");
    }
    let queued_in = started.elapsed();

    let pool = sqlx::PgPool::connect(&crate::need::postgres_url()).await.unwrap();
    let count = |sql: String| {
        let pool = pool.clone();
        async move { sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_one(&pool).await.unwrap().try_get::<i64, _>(0).unwrap() }
    };
    let decisions_sql = format!("SELECT COUNT(*) FROM \"{schema}\".iop_records WHERE record_type = 'decision' AND direction = 'inbound' AND status = 'certified'");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut decided = 0;
    while Instant::now() < deadline {
        decided = count(decisions_sql.clone()).await;
        if decided as usize >= AUTHORIZATIONS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = started.elapsed();
    assert_eq!(decided as usize, AUTHORIZATIONS, "certified decisions after {drained_in:?}");
    // Give a duplicate claim time to reach the payer before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let answered = answered.lock().unwrap().clone();
    let mut per_authorization: HashMap<&str, usize> = HashMap::new();
    let mut per_instance: HashMap<&str, usize> = HashMap::new();
    for ((instance, id), n) in &answered {
        *per_authorization.entry(id.as_str()).or_default() += n;
        *per_instance.entry(instance.as_str()).or_default() += n;
    }
    let twice: Vec<_> = per_authorization.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "{} authorizations answered other than once, e.g. {:?}", twice.len(), &twice[..twice.len().min(5)]);
    assert_eq!(per_authorization.len(), AUTHORIZATIONS, "every authorization reached the payer");
    assert!(ids.iter().all(|id| per_authorization.contains_key(id.as_str())));
    let received = payer.received_requests().await.unwrap().len();
    assert_eq!(received, AUTHORIZATIONS, "no request beyond the 200s (a 400 means a bad identifier)");
    let (from_a, from_b) = (per_instance.get("a").copied().unwrap_or(0), per_instance.get("b").copied().unwrap_or(0));
    assert!(from_a > 0 && from_b > 0, "both instances delivered: a {from_a}, b {from_b}");

    let decided_ids = count(format!("SELECT COUNT(DISTINCT authorization_id) FROM \"{schema}\".iop_records WHERE record_type = 'decision'")).await;
    assert_eq!(decided_ids as usize, AUTHORIZATIONS, "one decision per authorization");
    let claim_responses = count(format!("SELECT COUNT(*) FROM \"{schema}\".resources WHERE type = 'ClaimResponse'")).await;
    assert_eq!(claim_responses as usize, AUTHORIZATIONS, "one stored ClaimResponse per answer: an answer recorded twice would add one");
    let delivered_once = count(format!("SELECT COUNT(*) FROM \"{schema}\".outbox WHERE status = 'delivered' AND attempts = 1")).await;
    let messages = count(format!("SELECT COUNT(*) FROM \"{schema}\".outbox")).await;
    assert_eq!((messages as usize, delivered_once as usize), (AUTHORIZATIONS, AUTHORIZATIONS), "each message delivered on its first and only claim");
    let attempts = count(format!("SELECT COUNT(*) FROM \"{schema}\".outbox_attempts")).await;
    assert_eq!(attempts as usize, AUTHORIZATIONS);
    println!("queued {AUTHORIZATIONS} in {queued_in:?}, all decided after {drained_in:?}; instance a sent {from_a}, b sent {from_b}");

    pool.close().await;
    a.stop().await;
    b.stop().await;
    drop_schema(&schema).await;
}

/// 42 CFR Part 2 across instances: a client enrolled through one instance has every later record
/// labelled when stored through the other, which had already written about the client unlabelled
/// (its own write's check in the store, not what the instance remembers, decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enrolment_through_one_instance_labels_what_the_other_stores() {
    if crate::need::postgres("server::postgres::an_enrolment_through_one_instance_labels_what_the_other_stores").is_none() {
        return;
    }
    let schema = schema_name("part2");
    let (a, b) = two_instances(&schema).await;
    let assertion = a.assertion("clinic");
    let response = a.http.post(direct(&a, "auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap();
    let token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_string();
    let post = |gw: &Gateway, path: &str, body: Value| {
        let request = gw.http.post(direct(gw, path)).bearer_auth(&token).header("content-type", "application/fhir+json").body(body.to_string());
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let labels = |body: &Value| -> Vec<String> { body["meta"]["security"].as_array().into_iter().flatten().filter_map(|c| c["code"].as_str().map(str::to_string)).collect() };
    let (status, created) = post(&a, "Patient", patient("PG-PART2")).await;
    assert_eq!(status, 201, "{created}");
    let subject = format!("Patient/{}", created["id"].as_str().unwrap());
    let score = |day: u32| super::support::phq9(&subject, 9, &format!("2026-03-{day:02}T10:00:00Z"));

    let (status, before) = post(&b, "Observation", score(1)).await;
    assert_eq!(status, 201, "{before}");
    assert!(labels(&before).is_empty(), "not enrolled yet: {before}");
    let episode = json!({
        "resourceType": "EpisodeOfCare", "status": "active",
        "type": [{"coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "H0015"}]}],
        "patient": {"reference": subject}, "managingOrganization": {"reference": "Organization/iop-program"}
    });
    let (status, enrolled) = post(&a, "EpisodeOfCare", episode).await;
    assert_eq!(status, 201, "{enrolled}");
    assert!(labels(&enrolled).contains(&"42CFRPart2".to_string()), "{enrolled}");

    // Instance b has seen this client only unenrolled; its next write about them is labelled.
    let (status, after) = post(&b, "Observation", score(2)).await;
    assert_eq!(status, 201, "{after}");
    assert!(labels(&after).contains(&"42CFRPart2".to_string()), "enrolled through the other instance: {after}");
    let url = direct(&a, &format!("Observation/{}", after["id"].as_str().unwrap()));
    let stored: Value = a.http.get(url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(labels(&stored), labels(&after), "stored as answered");
    // And so is one inside a transaction, now known to b without asking.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": score(3), "request": {"method": "POST", "url": "Observation"}}]});
    let (status, answer) = post(&b, "", bundle).await;
    assert_eq!(status, 200, "{answer}");
    let location = answer["entry"][0]["response"]["location"].as_str().unwrap().to_string();
    let path = location.split("/_history").next().unwrap().trim_start_matches("http://gateway.test/").to_string();
    let stored: Value = b.http.get(direct(&b, &path)).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert!(labels(&stored).contains(&"42CFRPart2".to_string()), "{stored}");
    a.stop().await;
    b.stop().await;
    drop_schema(&schema).await;
}

/// A write and an enrolment racing on a shared PostgreSQL (two stores, as two instances): the
/// enrolment's relabelling waits for a checked write still open and then finds its rows, and a
/// write checked while an enrolment holds that lock fails its check once the enrolment commits (to
/// be retried, labelled). Either way the record ends up labelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_racing_an_enrolment_is_either_relabelled_by_it_or_sees_it() {
    use iop_gateway::auth::labels::PART2_LABEL;
    use iop_gateway::search::{IndexEntry, compartment};
    use iop_gateway::store::{Store, StoreError, Stored};

    if crate::need::postgres("server::postgres::a_write_racing_an_enrolment_is_either_relabelled_by_it_or_sees_it").is_none() {
        return;
    }
    let schema = schema_name("race");
    let config = iop_gateway::config::StoreConfig { url: Some(crate::need::postgres_url()), schema: Some(schema.clone()), ..Default::default() };
    let open = || async { Store::open(&config, Arc::new(iop_gateway::telemetry::Metrics::default())).await.unwrap() };
    let (a, b) = (open().await, open().await);
    let observation = |id: &str| Stored {
        resource_type: "Observation".into(),
        id: id.into(),
        version: 1,
        last_updated: "2026-01-01T00:00:00.000Z".into(),
        body: format!(r#"{{"resourceType":"Observation","id":"{id}"}}"#),
        parties: vec!["Organization/iop-program".into()],
        labels: vec![],
        created_by: "clinic".into(),
        owner: "Organization/iop-program".into(),
        method: "POST".into(),
    };
    let about = |patient: &str| vec![IndexEntry::Token { param: compartment::PARAM, system: String::new(), value: patient.into() }];

    // The write's check ran (a read sends what it queued) but it has not committed when the enrolment starts.
    let mut write = b.begin().await.unwrap();
    write.unless_enrolled(&["Patient/p1".into()]);
    write.write(&observation("w1"), &about("Patient/p1"), true).await.unwrap();
    write.current("Observation", "w1").await.unwrap();
    let enrolling = tokio::spawn({
        let a = a.clone();
        async move {
            let mut tx = a.begin().await.unwrap();
            tx.mark_part2_patients(&["Patient/p1".into()], "2026-01-02T00:00:00.000Z");
            let found = tx.unlabelled_about(&["Patient/p1".into()], PART2_LABEL).await.unwrap();
            tx.commit().await.unwrap();
            found.into_iter().map(|v| v.id).collect::<Vec<_>>()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!enrolling.is_finished(), "the enrolment's relabelling waits for the checked write in flight");
    write.commit().await.unwrap();
    assert_eq!(enrolling.await.unwrap(), ["w1"], "and then finds it");

    // The enrolment holds the lock first: a write checked meanwhile sees the enrolment once it commits.
    let mut enrolment = a.begin().await.unwrap();
    enrolment.mark_part2_patients(&["Patient/p2".into()], "2026-01-02T00:00:00.000Z");
    assert!(enrolment.unlabelled_about(&["Patient/p2".into()], PART2_LABEL).await.unwrap().is_empty());
    let writing = tokio::spawn({
        let b = b.clone();
        async move {
            let mut tx = b.begin().await.unwrap();
            tx.unless_enrolled(&["Patient/p2".into()]);
            tx.write(&observation("w2"), &about("Patient/p2"), true).await?;
            tx.commit().await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writing.is_finished(), "the checked write waits for the enrolment holding the lock");
    enrolment.commit().await.unwrap();
    assert!(matches!(writing.await.unwrap(), Err(StoreError::Enrolled)), "the write's check saw the enrolment: retried, labelled");
    assert!(b.read("Observation", "w2").await.unwrap().is_none(), "nothing of it was stored unlabelled");

    a.close().await;
    b.close().await;
    drop_schema(&schema).await;
}
