//! Load generator for the server: sustained req/s, p50/p99 latency, CPU time per request and peak memory for posting screening Observations and referral transaction Bundles, on SQLite and PostgreSQL, each against a bare insert of the same payloads into the same store in the same run.
//!
//! `cargo bench --bench server` (PostgreSQL at 127.0.0.1:5432, database `test`, is used when it
//! answers; a fresh schema is created and dropped). `BENCH_SECONDS`, `BENCH_ROUNDS`, `BENCH_CLIENTS` tune it;
//! words after `--` pick a subset (`-- sqlite`, `-- postgres referral`). CPU per request is this
//! process's (server and load generator, or the bare inserts' client) plus, on PostgreSQL, the
//! backends serving this process's connections, over the kept round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iop_gateway::auth::keys::{KeyPair, sign_assertion};
use iop_gateway::config::Config;
use iop_gateway::store::{Store, Stored};
use serde_json::{Value, json};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn observation(i: usize) -> String {
    json!({"resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}], "text": "PHQ-9 total score"},
        "subject": {"reference": format!("Patient/bench-{}", i % 500)},
        "effectiveDateTime": format!("2026-03-{:02}T09:30:00-05:00", 1 + i % 28), "valueInteger": i % 28})
    .to_string()
}

fn referral(i: usize) -> String {
    let (p, sr) = (format!("urn:uuid:{}", uuid::Uuid::new_v4()), format!("urn:uuid:{}", uuid::Uuid::new_v4()));
    json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:bench", "value": format!("B{i}")}],
            "name": [{"family": "Benchperson", "given": ["Sam"]}], "birthDate": "1990-01-01"}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": sr, "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": {"text": "IOP referral"},
            "subject": {"reference": p}, "performer": [{"reference": "Organization/iop-program"}], "authoredOn": "2026-03-01"},
            "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()), "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
            "basedOn": [{"reference": sr}], "for": {"reference": p}}, "request": {"method": "POST", "url": "Task"}}]})
    .to_string()
}

struct Run {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU seconds of this process and of the PostgreSQL backends it used, during the round.
    cpu: (f64, f64),
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Where a round's CPU time is read from: this process and the PostgreSQL backends named by `application_name`.
#[derive(Clone)]
struct CpuProbe {
    pg: Option<(sqlx::PgPool, String)>,
}

impl CpuProbe {
    async fn backends(&self) -> Vec<(String, f64)> {
        let Some((pool, name)) = &self.pg else { return Vec::new() };
        let pids: Vec<(i32,)> = sqlx::query_as("SELECT pid FROM pg_stat_activity WHERE application_name = $1").bind(name).fetch_all(pool).await.unwrap_or_default();
        pids.into_iter().filter_map(|(pid,)| cpu_seconds(&pid.to_string()).map(|c| (pid.to_string(), c))).collect()
    }

    async fn sample(&self) -> (f64, Vec<(String, f64)>) {
        (cpu_seconds("self").unwrap_or(0.0), self.backends().await)
    }

    /// CPU seconds since `before`: this process's, and the backends' (a backend started since counts whole).
    async fn since(&self, before: &(f64, Vec<(String, f64)>)) -> (f64, f64) {
        let (process, backends) = self.sample().await;
        let pg = backends.iter().map(|(pid, now)| now - before.1.iter().find(|(p, _)| p == pid).map_or(0.0, |(_, then)| *then)).sum();
        (process - before.0, pg)
    }
}

impl Run {
    /// Milliseconds of CPU per request: this process's and PostgreSQL's.
    fn cpu_per_request(&self) -> (f64, f64) {
        let n = self.requests.max(1) as f64;
        (self.cpu.0 * 1000.0 / n, self.cpu.1 * 1000.0 / n)
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort();
        self.latencies.get(((self.latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
    }
}

/// Runs `clients` concurrent loops of `op` for `seconds`.
async fn drive<F, Fut>(probe: &CpuProbe, clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let before = probe.sample().await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                assert!(op(i).await, "a benchmark request failed");
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
    Run { requests: latencies.len(), elapsed, latencies, cpu: probe.since(&before).await }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

const STORES: [&str; 2] = ["sqlite", "postgres"];

/// Whether the words after `--` select this store (and payload, when `kind` is given); no word of a kind selects all of that kind.
fn selected(words: &[String], label: &str, kind: Option<&str>) -> bool {
    let (store_words, kind_words): (Vec<&String>, Vec<&String>) = words.iter().partition(|w| STORES.contains(&w.as_str()));
    let kind_selected = kind.is_none_or(|kind| kind_words.is_empty() || kind_words.iter().any(|w| kind.contains(w.as_str())));
    (store_words.is_empty() || store_words.iter().any(|w| *w == label)) && kind_selected
}

/// The round with the higher rate.
fn best(kept: Option<Run>, round: Run) -> Option<Run> {
    Some(match kept {
        Some(kept) if kept.rate() >= round.rate() => kept,
        _ => round,
    })
}

async fn bench_backend(label: &str, store_toml: &str, probe: &CpuProbe, (clients, seconds, rounds): (usize, u64, usize), words: &[String]) {
    let dir = std::env::temp_dir().join(format!("iop-gw-bench-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate_es384("bench-1").unwrap();
    std::fs::write(dir.join("bench.jwks.json"), key.jwks_json()).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_concurrent_requests_per_client = 1024\n[store]\ndata_dir = {:?}\n{store_toml}\n[log]\nlevel = \"warn\"\n[[clients]]\nid = \"bench\"\nrole = \"clinic\"\njwks_file = \"bench.jwks.json\"\n",
        dir.join("data").display().to_string()
    );
    let loaded = Config::from_toml(&text, &dir).unwrap();
    let store_config = loaded.config.store.clone();
    let running = iop_gateway::server::start(loaded, std::future::pending()).await.unwrap();
    let base = running.base_url.clone();
    let http = reqwest::Client::new();
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = sign_assertion(&key, "bench", &format!("{base}/auth/token"), "bench-jti", now + 120).unwrap();
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
    let bare_store = Store::open(&store_config, Arc::new(iop_gateway::telemetry::Metrics::default())).await.unwrap();

    for (kind, path, payload) in [("screening Observation", "Observation", observation as fn(usize) -> String), ("referral transaction", "", referral)] {
        if !selected(words, label, Some(kind)) {
            continue;
        }
        // Server and bare inserts take turns, and each keeps its best round: a burst of load on the
        // shared machine (builds, other disks' fsyncs) then hits one round of each, not all of one.
        let (mut served, mut bare): (Option<Run>, Option<Run>) = (None, None);
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let (h, b, t) = (http.clone(), base.clone(), token.clone());
            let round = drive(probe, clients, seconds, move |i| {
                let (h, url, t) = (h.clone(), format!("{b}/{path}"), t.clone());
                async move {
                    let r = h.post(url).bearer_auth(t).header("content-type", "application/fhir+json").body(payload(i)).send().await;
                    r.is_ok_and(|r| r.status().is_success())
                }
            })
            .await;
            rates.push(format!("{:.0}", round.rate()));
            served = best(served, round);
            let store = bare_store.clone();
            let round = drive(probe, clients, seconds, move |i| {
                let store = store.clone();
                async move {
                    let stored = Stored {
                        resource_type: "BenchBaseline".into(),
                        id: uuid::Uuid::new_v4().to_string(),
                        version: 1,
                        last_updated: "2026-03-01T00:00:00.000Z".into(),
                        body: payload(i),
                        parties: vec![],
                        labels: vec![],
                        created_by: "bench".into(),
                        owner: "Organization/bench".into(),
                        method: "POST".into(),
                    };
                    store.bare_insert(&stored).await.is_ok()
                }
            })
            .await;
            rates.push(format!("{:.0}", round.rate()));
            bare = best(bare, round);
        }
        let (mut served, mut bare) = (served.expect("at least one round"), bare.expect("at least one round"));
        println!(
            "{label:<10} {kind:<22} server {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms | bare insert {:>7.0}/s  p50 {:>6.2} ms | server/bare {:.2}",
            served.rate(),
            served.percentile(0.5).as_secs_f64() * 1000.0,
            served.percentile(0.99).as_secs_f64() * 1000.0,
            bare.rate(),
            bare.percentile(0.5).as_secs_f64() * 1000.0,
            served.rate() / bare.rate(),
        );
        println!("{:<33} rounds, server and bare in turn: {}", "", rates.join(" "));
        let ((sp, sg), (bp, bg)) = (served.cpu_per_request(), bare.cpu_per_request());
        if probe.pg.is_some() {
            println!(
                "{:<33} CPU per request (kept rounds): server {:.3} ms (process {sp:.3} + PostgreSQL {sg:.3}) | bare {:.3} ms (process {bp:.3} + PostgreSQL {bg:.3})",
                "",
                sp + sg,
                bp + bg
            );
        } else {
            println!("{:<33} CPU per request (kept rounds): server {sp:.3} ms | bare {bp:.3} ms (the process, SQLite's work included)", "");
        }
    }
    bare_store.close().await;
    running.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let clients: usize = std::env::var("BENCH_CLIENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        println!("{clients} concurrent clients, {rounds} alternating rounds of {seconds} s per measurement (best kept), validation on every write");
        if selected(&words, "sqlite", None) {
            bench_backend("sqlite", "", &CpuProbe { pg: None }, (clients, seconds, rounds), &words).await;
        }
        let schema = format!("bench_{}", std::process::id());
        match sqlx::PgPool::connect(PG_URL).await {
            Ok(_) if !selected(&words, "postgres", None) => {}
            Ok(pool) => {
                // The backends serving this run are told apart from others' by their application name.
                let name = format!("iop-bench-{}", std::process::id());
                let probe = CpuProbe { pg: Some((pool.clone(), name.clone())) };
                let url = format!("{PG_URL}?application_name={name}");
                bench_backend("postgres", &format!("url = \"{url}\"\nschema = \"{schema}\"\nmax_connections = 16"), &probe, (clients, seconds, rounds), &words).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&pool).await;
            }
            Err(e) => println!("postgres   skipped: {e}"),
        }
        println!("peak memory (whole process: server + load generator): {:.0} MB", peak_rss_mb());
    });
}
