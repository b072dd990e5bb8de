//! Outbox throughput and latency to a loopback payer that answers at once (`cargo bench --bench outbox`), on SQLite and PostgreSQL, against the same payer driven directly in the same run, and peak memory while 10,000 messages wait for a payer that is down.
//!
//! PostgreSQL at 127.0.0.1:5432, database `test`, is used when it answers (a fresh schema is
//! created and dropped); otherwise a line says it was skipped. Knobs: `BENCH_SECONDS` (sustained
//! phase, default 5), `BENCH_CLIENTS` (default 8), `BENCH_DRAIN` (backlog size, default 2000),
//! `BENCH_WAITING` (messages for the memory figure, default 10000), `BENCH_PER_CLIENT` (authorizations
//! per client in the drain and memory phases, default 5; 10000 puts them all on one client),
//! `BENCH_ONLY=memory` (only the memory figure: the 10,000 queued, time to queue them and peak memory).
//!
//! Per backend, with one gateway (delivery worker on, default outbox settings) and the payer below:
//! - sustained: `BENCH_CLIENTS` clinic clients each POST one client + one authorization at a time
//!   for `BENCH_SECONDS`; messages/s is answered messages over the time from the first POST to the
//!   last answer, latency is from the intake response to the payer's answer to the matching PAS
//!   request (taken at the payer, so it includes claiming, sending and nothing of the answer's
//!   recording);
//! - drain: the payer holds its answers while `BENCH_DRAIN` messages are queued, then opens; the
//!   rate at which the backlog is delivered is the outbox alone, without intake competing.
//!
//! The baseline is the payer with the load generator in place of the gateway: the PAS Bundles the
//! gateway sent, POSTed straight to it with reqwest by `BENCH_CLIENTS` loops. The memory figure is
//! measured in a child process of this binary, because VmHWM only ever grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use iop_gateway::auth::keys::{KeyPair, sign_assertion};
use iop_gateway::config::Config;
use serde_json::{Value, json};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Set in the child process that measures memory.
const CHILD: &str = "IOP_BENCH_OUTBOX_MEMORY";

/// The loopback payer: answers `$submit` with the certified PAS response for the submitted authorization, noting when it answered each one.
#[derive(Clone)]
struct Payer {
    inner: Arc<PayerState>,
}

struct PayerState {
    response: String,
    response_id: String,
    answered: Mutex<HashMap<String, Instant>>,
    /// The first bodies received, replayed by the baseline.
    kept: Mutex<Vec<String>>,
    /// Closed: requests wait (the drain phase builds its backlog behind it).
    open: tokio::sync::watch::Sender<bool>,
}

impl Payer {
    async fn start() -> (Payer, String) {
        let response = std::fs::read_to_string(format!("{ROOT}/tests/fixtures/pas/decision-certified.json")).unwrap();
        let response_id = serde_json::from_str::<Value>(&response).unwrap()["identifier"]["value"].as_str().unwrap().to_string();
        let payer = Payer {
            inner: Arc::new(PayerState { response, response_id, answered: Mutex::new(HashMap::new()), kept: Mutex::new(Vec::new()), open: tokio::sync::watch::channel(true).0 }),
        };
        let app = axum::Router::new().route("/Claim/{operation}", axum::routing::post(submit)).with_state(payer.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (payer, base)
    }

    fn reset(&self) {
        self.inner.answered.lock().unwrap().clear();
        self.inner.kept.lock().unwrap().clear();
    }

    fn answered(&self) -> usize {
        self.inner.answered.lock().unwrap().len()
    }
}

async fn submit(axum::extract::State(payer): axum::extract::State<Payer>, body: Bytes) -> (StatusCode, HeaderMap, String) {
    let mut open = payer.inner.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    let submitted: Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = submitted["identifier"]["value"].as_str().unwrap_or_default().to_string();
    let answer = payer.inner.response.replace(&payer.inner.response_id, &id);
    {
        let mut kept = payer.inner.kept.lock().unwrap();
        if kept.len() < 256 {
            kept.push(String::from_utf8_lossy(&body).into_owned());
        }
    }
    payer.inner.answered.lock().unwrap().insert(id, Instant::now());
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/fhir+json".parse().unwrap());
    (StatusCode::OK, headers, answer)
}

/// A gateway for the bench, its base URL and a clinic token.
struct Bench {
    running: iop_gateway::server::Running,
    base: String,
    token: String,
    http: reqwest::Client,
    dir: std::path::PathBuf,
    /// 409s the intake got (and retried).
    conflicts: std::sync::atomic::AtomicUsize,
}

async fn start_gateway(label: &str, store_toml: &str, payer_base: &str, partner_extra: &str) -> Bench {
    let dir = std::env::temp_dir().join(format!("iop-gw-bench-outbox-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate_es384("bench-1").unwrap();
    std::fs::write(dir.join("bench.jwks.json"), key.jwks_json()).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_concurrent_requests_per_client = 1024\n[store]\ndata_dir = {:?}\n{store_toml}\n[log]\nlevel = \"error\"\n\
         [[clients]]\nid = \"bench\"\nrole = \"clinic\"\norganization = \"Organization/iop-program\"\njwks_file = \"bench.jwks.json\"\n\
         [[partners]]\nname = \"bench-payer\"\nkind = \"payer\"\nfhir_base = \"{payer_base}\"\nroutes = [\"PAYER-77\"]\nauth = \"none\"\ntimeout_secs = 30\n{partner_extra}\n",
        dir.join("data").display().to_string()
    );
    let loaded = Config::from_toml(&text, &dir).unwrap();
    let running = iop_gateway::server::start(loaded, std::future::pending()).await.unwrap();
    let base = running.base_url.clone();
    let http = reqwest::Client::new();
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = sign_assertion(&key, "bench", &format!("{base}/auth/token"), &uuid::Uuid::new_v4().to_string(), now + 120).unwrap();
    let granted: Value = http.post(format!("{base}/auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.cruds")).send().await.unwrap().json().await.unwrap();
    let token = granted["access_token"].as_str().unwrap().to_string();
    Bench { running, base, token, http, dir, conflicts: Default::default() }
}

impl Bench {
    async fn stop(self) {
        self.running.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// POSTs records, again after a 409 as the gateway asks (every authorization re-puts the same payer and provider Organizations, so concurrent intakes collide); panics on anything else but 200.
    async fn intake(&self, records: &[Value]) {
        let body = Value::Array(records.to_vec()).to_string();
        for attempt in 1..=50u64 {
            let response = self.http.post(format!("{}/iop/records", self.base)).bearer_auth(&self.token).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            match response.status().as_u16() {
                200 => return,
                409 => {
                    self.conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(attempt.min(10) + u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 8))).await;
                }
                status => panic!("intake answered {status}: {}", response.text().await.unwrap_or_default()),
            }
        }
        panic!("intake still in conflict after 50 tries");
    }
}

/// A client and one authorization of theirs, from the fixture with fresh ids (each message is its own subject, so none waits for another).
fn records(template: &[Value], label: &str, n: usize) -> Vec<Value> {
    let mut client = template[0].clone();
    client["id"] = json!(format!("C-{label}-{n}"));
    client["mrn"] = json!(format!("MRN-{label}-{n}"));
    let mut authorization = template[2].clone();
    authorization["id"] = json!(format!("AUTH-{label}-{n}"));
    authorization["client_id"] = client["id"].clone();
    authorization.as_object_mut().unwrap().remove("supporting_scores");
    vec![client, authorization]
}

/// Authorizations `range` as one intake batch, `per_client` authorizations to a client: each client's record
/// comes with its first authorization in the batch (its PAS request Bundle references it), never twice.
fn batch(template: &[Value], label: &str, range: std::ops::Range<usize>, per_client: usize) -> Vec<Value> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for n in range {
        let [client, mut authorization]: [Value; 2] = records(template, label, n / per_client.max(1)).try_into().unwrap();
        authorization["id"] = json!(format!("AUTH-{label}-{n}"));
        if seen.insert(client["id"].as_str().unwrap_or_default().to_string()) {
            out.push(client);
        }
        out.push(authorization);
    }
    out
}

fn per_client() -> usize {
    std::env::var("BENCH_PER_CLIENT").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

fn template() -> Vec<Value> {
    serde_json::from_str::<Value>(&std::fs::read_to_string(format!("{ROOT}/tests/fixtures/iop/authorization/initial.json")).unwrap()).unwrap().as_array().unwrap().clone()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits (bounded) until the payer has answered `n` messages; the instant it saw the last one.
async fn wait_answered(payer: &Payer, n: usize, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    while payer.answered() < n {
        assert!(Instant::now() < deadline, "only {} of {n} messages answered after {limit:?}", payer.answered());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    payer.inner.answered.lock().unwrap().values().max().copied().unwrap()
}

struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// The sustained phase: `clients` loops of one intake each, for `seconds`.
async fn sustained(bench: &Arc<Bench>, payer: &Payer, label: &str, clients: usize, seconds: u64) -> (Figures, f64) {
    payer.reset();
    let template = Arc::new(template());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (bench, template, label) = (bench.clone(), template.clone(), label.to_string());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut n = c;
            while Instant::now() < deadline {
                bench.intake(&records(&template, &label, n)).await;
                done.push((format!("AUTH-{label}-{n}"), Instant::now()));
                n += clients;
            }
            done
        }));
    }
    let mut intaken = Vec::new();
    for t in tasks {
        intaken.extend(t.await.unwrap());
    }
    let intake_elapsed = started.elapsed();
    let last = wait_answered(payer, intaken.len(), Duration::from_secs(60)).await;
    let answered = payer.inner.answered.lock().unwrap().clone();
    // An answer can precede the client's reading of the intake response (the worker is woken at commit): that counts as 0.
    let mut latencies: Vec<Duration> = intaken.iter().map(|(id, at)| answered[id].saturating_duration_since(*at)).collect();
    latencies.sort();
    let rate = intaken.len() as f64 / (last - started).as_secs_f64();
    (Figures { rate, p50: percentile(&latencies, 0.5), p99: percentile(&latencies, 0.99) }, intaken.len() as f64 / intake_elapsed.as_secs_f64())
}

/// The drain phase: `n` messages queued behind a closed payer, then the time to deliver them all once it opens.
async fn drain(bench: &Arc<Bench>, payer: &Payer, label: &str, clients: usize, n: usize) -> f64 {
    payer.reset();
    payer.inner.open.send_replace(false);
    let template = Arc::new(template());
    let per_post = 50;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients.min(4) {
        let (bench, template, label, next) = (bench.clone(), template.clone(), format!("{label}D"), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(per_post, std::sync::atomic::Ordering::SeqCst);
                if from >= n {
                    break;
                }
                bench.intake(&batch(&template, &label, from..(from + per_post).min(n), per_client())).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Let the worker fill its slots with held requests, so the backlog is what remains in the table.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let opened = Instant::now();
    payer.inner.open.send_replace(true);
    let last = wait_answered(payer, n, Duration::from_secs(120)).await;
    n as f64 / (last - opened).as_secs_f64()
}

/// The baseline: the PAS Bundles the gateway sent, POSTed straight to the payer by `clients` loops for `seconds`.
async fn direct(payer: &Payer, payer_base: &str, clients: usize, seconds: u64) -> Figures {
    let bodies = Arc::new(payer.inner.kept.lock().unwrap().clone());
    assert!(!bodies.is_empty(), "the gateway sent no PAS Bundle to replay");
    payer.reset();
    let http = reqwest::Client::new();
    let url = format!("{payer_base}/Claim/$submit");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, bodies) = (http.clone(), url.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let response = http.post(&url).header("content-type", "application/fhir+json").body(bodies[i % bodies.len()].clone()).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                latencies.push(t.elapsed());
                i += clients;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Figures { rate: latencies.len() as f64 / elapsed.as_secs_f64(), p50: percentile(&latencies, 0.5), p99: percentile(&latencies, 0.99) }
}

/// One backend: sustained figures, intake requests/s, 409s retried in the sustained phase, backlog drain messages/s.
async fn bench_backend(label: &str, store_toml: &str, payer: &Payer, payer_base: &str, clients: usize, seconds: u64, drain_n: usize) -> (Figures, f64, usize, f64) {
    let bench = Arc::new(start_gateway(label, store_toml, payer_base, "").await);
    let (figures, intake_rate) = sustained(&bench, payer, label, clients, seconds).await;
    let conflicts = bench.conflicts.swap(0, std::sync::atomic::Ordering::Relaxed);
    let drained = drain(&bench, payer, label, clients, drain_n).await;
    Arc::try_unwrap(bench).ok().expect("no task holds the gateway").stop().await;
    (figures, intake_rate, conflicts, drained)
}

fn status_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .unwrap_or(0.0)
}

/// The child process: a gateway on SQLite whose payer is a closed loopback port, `waiting` messages queued; prints its memory.
async fn memory_child(waiting: usize) {
    // A port that was free a moment ago and has no listener now: every attempt is refused at once.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    // One try each, then a wait longer than the run: the messages wait rather than spin.
    let bench = Arc::new(start_gateway("memory", "", &format!("http://{closed}"), "first_retry_ms = 600000\nmax_backoff_secs = 600").await);
    let idle_hwm = status_kb("VmHWM:");
    let template = Arc::new(template());
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (bench, template, next) = (bench.clone(), template.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(100, std::sync::atomic::Ordering::SeqCst);
                if from >= waiting {
                    break;
                }
                bench.intake(&batch(&template, "M", from..(from + 100).min(waiting), per_client())).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let queued_in = started.elapsed();
    // Wait (bounded) until every message has had its refused first attempt and waits for its retry.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (pending, tried) = loop {
        let depth = bench.running.store.outbox_depth().await.unwrap();
        let pending = depth.iter().filter(|(_, status, _, _)| status == "pending").map(|(_, _, n, _)| *n).sum::<i64>();
        let tried = tried(&bench).await;
        if (pending as usize == waiting && tried >= waiting) || Instant::now() > deadline {
            break (pending, tried);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("memory {waiting} {pending} {tried} {:.1} {:.1} {:.1} {:.1}", idle_hwm / 1024.0, status_kb("VmHWM:") / 1024.0, status_kb("VmRSS:") / 1024.0, queued_in.as_secs_f64());
    Arc::try_unwrap(bench).ok().expect("no task holds the gateway").stop().await;
}

/// How many messages have had an attempt, read from the SQLite file with a count (loading the messages would weigh on the figure).
async fn tried(bench: &Bench) -> usize {
    let path = bench.dir.join("data").join("gateway.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display())).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE attempts >= 1").fetch_one(&pool).await.unwrap();
    pool.close().await;
    n as usize
}

fn main() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let (seconds, clients, drain_n, waiting) = (env("BENCH_SECONDS", 5) as u64, env("BENCH_CLIENTS", 8), env("BENCH_DRAIN", 2000), env("BENCH_WAITING", 10_000));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if std::env::var_os(CHILD).is_some() {
        runtime.block_on(memory_child(waiting));
        return;
    }
    let only_memory = std::env::var("BENCH_ONLY").is_ok_and(|s| s == "memory");
    runtime.block_on(async {
        if only_memory {
            return;
        }
        println!("outbox to a loopback payer that answers at once: {clients} clinic clients, {seconds} s sustained, backlog of {drain_n}; default outbox settings (concurrency 16)");
        let (payer, payer_base) = Payer::start().await;
        let mut rows = Vec::new();
        let (sqlite, intake, conflicts, drained) = bench_backend("sqlite", "", &payer, &payer_base, clients, seconds, drain_n).await;
        rows.push(("sqlite", sqlite, intake, conflicts, drained));
        // Measured right after SQLite so it replays Bundles the gateway really sent.
        let baseline = direct(&payer, &payer_base, clients, seconds).await;
        let schema = format!("bench_outbox_{}", std::process::id());
        match sqlx::PgPool::connect(PG_URL).await {
            Ok(pool) => {
                let store = format!("url = \"{PG_URL}\"\nschema = \"{schema}\"\nmax_connections = 16");
                let (pg, intake, conflicts, drained) = bench_backend("postgres", &store, &payer, &payer_base, clients, seconds, drain_n).await;
                rows.push(("postgres", pg, intake, conflicts, drained));
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&pool).await;
            }
            Err(e) => println!("postgres skipped: {e}"),
        }
        println!();
        println!("{:<28} {:>9} {:>9} {:>9} {:>12} {:>10} {:>10}", "", "msgs/s", "p50 ms", "p99 ms", "intake rq/s", "409s", "vs direct");
        println!("{:<28} {:>9.0} {:>9.2} {:>9.2} {:>12} {:>10} {:>10}", "direct to payer (baseline)", baseline.rate, ms(baseline.p50), ms(baseline.p99), "-", "-", "1.000");
        for (label, f, intake, conflicts, drained) in &rows {
            println!("{:<28} {:>9.0} {:>9.2} {:>9.2} {:>12.0} {:>10} {:>10.3}", format!("{label} sustained"), f.rate, ms(f.p50), ms(f.p99), intake, conflicts, f.rate / baseline.rate);
            println!("{:<28} {:>9.0} {:>9} {:>9} {:>12} {:>10} {:>10.3}", format!("{label} backlog drain"), drained, "-", "-", "-", "-", drained / baseline.rate);
        }
        println!("(sustained latency: intake response → payer's answer; baseline latency: request → answer)");
    });
    // The memory figure in a fresh process: VmHWM there is the gateway's alone, not this run's earlier phases.
    let output = std::process::Command::new(std::env::current_exe().unwrap()).env(CHILD, "1").output().expect("the memory child runs");
    let text = String::from_utf8_lossy(&output.stdout);
    match text.lines().find_map(|l| l.strip_prefix("memory ")).map(|l| l.split_whitespace().collect::<Vec<_>>()) {
        Some(f) if f.len() == 7 => println!(
            "\npeak memory, sqlite, payer down (closed loopback port), {} authorizations per client: idle after start {} MB peak; {} messages queued in {} s, {} waiting ({} tried once and refused): peak {} MB, resident {} MB (whole process: gateway + load generator)",
            per_client(), f[3], f[0], f[6], f[1], f[2], f[4], f[5]
        ),
        _ => println!("\nthe memory child failed: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr)),
    }
}
