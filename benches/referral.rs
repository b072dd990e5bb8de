//! Inbound referrals end to end (`cargo bench --bench referral`): BSeR referral messages in by `$process-message`, mapped and stored, accepted by the clinic, and the Task update delivered to a loopback hospital, against the plain `$process-message` store rate of the same Bundles in the same run; peak memory.
//!
//! SQLite, one gateway (delivery worker on, default outbox settings). Knobs: `BENCH_REFERRALS`
//! (per phase, default 300), `BENCH_CLIENTS` (concurrent loops, default 8).
//! - plain: the program's own clinic client POSTs the Bundles to `$process-message`; a clinic
//!   client's message is stored and nothing more (no referral record, no route), so this is the
//!   store rate of the same Bundles.
//! - end to end: an inpatient unit POSTs each Bundle, the clinic reads the referral record and
//!   POSTs it back accepted, and the referral counts when the hospital received its Task with
//!   business status 3.0; referrals/s is referrals over the time from the first POST to the last
//!   Task received.
//!
//! Peak memory is the process's VmHWM after both phases (the load generator and the hospital run
//! in the same process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use iop_gateway::auth::keys::{KeyPair, sign_assertion};
use iop_gateway::config::Config;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The loopback hospital: takes every Task `PUT` at once and notes when it got each business status.
#[derive(Clone, Default)]
struct Hospital {
    received: Arc<Mutex<HashMap<String, Instant>>>,
}

async fn put_task(axum::extract::State(hospital): axum::extract::State<Hospital>, axum::extract::Path(id): axum::extract::Path<String>, body: Bytes) -> (StatusCode, Bytes) {
    let task: Value = serde_json::from_slice(&body).unwrap_or_default();
    if task["businessStatus"]["coding"][0]["code"] == "3.0" {
        hospital.received.lock().unwrap().insert(id, Instant::now());
    }
    (StatusCode::OK, body)
}

struct Bench {
    running: iop_gateway::server::Running,
    base: String,
    http: reqwest::Client,
    unit: String,
    clinic: String,
    dir: std::path::PathBuf,
}

async fn start(hospital_base: &str) -> Bench {
    let dir = std::env::temp_dir().join(format!("iop-gw-bench-referral-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (unit_key, clinic_key) = (KeyPair::generate_es384("unit-1").unwrap(), KeyPair::generate_es384("clinic-1").unwrap());
    std::fs::write(dir.join("unit.jwks.json"), unit_key.jwks_json()).unwrap();
    std::fs::write(dir.join("clinic.jwks.json"), clinic_key.jwks_json()).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_concurrent_requests_per_client = 1024\n[store]\ndata_dir = {:?}\n[log]\nlevel = \"error\"\n\
         [[clients]]\nid = \"unit\"\nrole = \"inpatient-unit\"\norganization = \"Organization/unit\"\njwks_file = \"unit.jwks.json\"\n\
         [[clients]]\nid = \"clinic\"\nrole = \"clinic\"\norganization = \"Organization/iop-program\"\njwks_file = \"clinic.jwks.json\"\n\
         [[partners]]\nname = \"hospital\"\nkind = \"inpatient-unit\"\nfhir_base = \"{hospital_base}\"\nauth = \"none\"\nclients = [\"unit\"]\nreferral_updates = \"task\"\ntimeout_secs = 30\n",
        dir.join("data").display().to_string()
    );
    let loaded = Config::from_toml(&text, &dir).unwrap();
    let running = iop_gateway::server::start(loaded, std::future::pending()).await.unwrap();
    let base = running.base_url.clone();
    let http = reqwest::Client::new();
    let token = |key: KeyPair, id: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let now = jsonwebtoken::get_current_timestamp();
            let assertion = sign_assertion(&key, id, &format!("{base}/auth/token"), &uuid::Uuid::new_v4().to_string(), now + 120).unwrap();
            let granted: Value = http.post(format!("{base}/auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap().json().await.unwrap();
            granted["access_token"].as_str().unwrap().to_string()
        }
    };
    let unit = token(unit_key, "unit").await;
    let clinic = token(clinic_key, "clinic").await;
    Bench { running, base, http, unit, clinic, dir }
}

/// The fixture's referral message with its own ids: Bundle, MessageHeader, referral (ServiceRequest and Task identifiers) and Task.
fn referral(template: &str, label: &str, n: usize) -> (String, String) {
    let referral_id = format!("BENCH-{label}-{n}");
    let text = template
        .replace("rb-msg-40117", &format!("msg-{label}-{n}"))
        .replace("mh-rb-40117", &format!("mh-{label}-{n}"))
        .replace("RB-RX-40117", &referral_id)
        .replace("tsk-8812", &format!("tsk-{label}-{n}"));
    (referral_id, text)
}

async fn post(bench: &Bench, token: &str, path: &str, content_type: &str, body: String) -> Value {
    for attempt in 1..=50u64 {
        let response = bench.http.post(format!("{}/{path}", bench.base)).bearer_auth(token).header("content-type", content_type).body(body.clone()).send().await.unwrap();
        match response.status().as_u16() {
            200 => return response.json().await.unwrap_or_default(),
            409 => tokio::time::sleep(Duration::from_millis(attempt.min(10))).await,
            status => panic!("{path} answered {status}: {}", response.text().await.unwrap_or_default()),
        }
    }
    panic!("{path} still in conflict after 50 tries");
}

/// Runs `n` jobs over `clients` loops; the time from the start to the last job's end.
async fn run<F, Fut>(clients: usize, n: usize, job: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let job = Arc::new(job);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..clients {
        let (job, next) = (job.clone(), next.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                job(i).await;
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    started.elapsed()
}

fn status_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .unwrap_or(0.0)
}

fn main() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, clients) = (env("BENCH_REFERRALS", 300), env("BENCH_CLIENTS", 8));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let hospital = Hospital::default();
        let app = axum::Router::new().route("/Task/{id}", axum::routing::put(put_task)).with_state(hospital.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hospital_base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let bench = Arc::new(start(&hospital_base).await);
        let template = Arc::new(std::fs::read_to_string(format!("{ROOT}/tests/fixtures/bser/referral-message.json")).unwrap());
        println!("inbound referrals on SQLite: {n} per phase, {clients} concurrent loops, default outbox settings; the hospital is a loopback server in this process");

        // Plain: the same Bundles stored by $process-message, without the referral's record, route, answer and delivery.
        let (b, t) = (bench.clone(), template.clone());
        let plain = run(clients, n, move |i| {
            let (b, t) = (b.clone(), t.clone());
            async move {
                let (_, text) = referral(&t, "plain", i);
                post(&b, &b.clinic, "$process-message", "application/fhir+json", text).await;
            }
        })
        .await;

        // End to end: in, mapped, stored, accepted by the clinic, the Task received by the hospital.
        let (b, t) = (bench.clone(), template.clone());
        let e2e_posts = run(clients, n, move |i| {
            let (b, t) = (b.clone(), t.clone());
            async move {
                let (referral_id, text) = referral(&t, "e2e", i);
                post(&b, &b.unit, "$process-message", "application/fhir+json", text).await;
                let record: Value = b.http.get(format!("{}/iop/records/referral/{referral_id}", b.base)).bearer_auth(&b.clinic).send().await.unwrap().json().await.unwrap();
                let mut accepted = record.clone();
                accepted["status"] = json!("accepted");
                post(&b, &b.clinic, "iop/records", "application/json", accepted.to_string()).await;
            }
        })
        .await;
        let started = Instant::now() - e2e_posts;
        let deadline = Instant::now() + Duration::from_secs(300);
        while hospital.received.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let received = hospital.received.lock().unwrap().clone();
        let last = received.values().max().copied().unwrap_or_else(Instant::now);
        let e2e = last.saturating_duration_since(started);
        let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64().max(1e-9);
        println!("plain $process-message store     {:>8.1} Bundles/s   ({n} in {:.2} s)", rate(n, plain), plain.as_secs_f64());
        println!("referral end to end              {:>8.1} referrals/s ({} of {n} delivered in {:.2} s; in and accepted in {:.2} s)", rate(received.len(), e2e), received.len(), e2e.as_secs_f64(), e2e_posts.as_secs_f64());
        println!("end to end / plain               {:>8.2}", rate(received.len(), e2e) / rate(n, plain));
        println!("peak memory (VmHWM, whole process) {:>6.1} MB", status_kb("VmHWM:") / 1024.0);
        let bench = Arc::try_unwrap(bench).ok().expect("no task holds the gateway");
        bench.running.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&bench.dir);
    });
}
