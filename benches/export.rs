//! Bulk `$export` of the Synthea corpus (`cargo bench --bench export`) on SQLite and PostgreSQL: resources/s and MB/s of NDJSON against a plain keyset `SELECT` of the same rows in the same run, and peak memory of the exporting process for ~10,000 and ~70,000 resources.
//!
//! The Synthea bundles (`../shared/corpus/synthea/bundles`, skipped with a line when missing) are
//! written straight into the store through its API (`Store::begin`, `Tx::write` with the search
//! index, compartment included, that the server computes) as the clinic's records: loading 70,000
//! resources through HTTP would measure intake, not export. `urn:uuid:` references become
//! `Type/id`, so every resource lands in its patient's compartment. The first ~10,000 resources are
//! exported, then the rest of the corpus plus a second copy of its first bundles (fresh ids) brings
//! the store to ~70,000 and the whole store is exported again.
//!
//! Each export runs in a child process of this binary (a fresh gateway on the loaded store, kick-off
//! over HTTP, status polled every 20 ms, every file downloaded and counted): its VmHWM is the
//! exporting gateway's (and the downloading client's) alone. The export time is kick-off to
//! manifest less the settle time (the request timeout, 1 s here) the job waits before reading. The
//! baseline, in the parent right after, reads the bodies of the same rows with a plain
//! `SELECT type, id, body FROM resources` in keyset pages of 1,000, and counts their bytes. On
//! PostgreSQL both run after an `ANALYZE` of the freshly loaded tables.

use std::io::Read as _;
use std::time::{Duration, Instant};

use iop_gateway::auth::keys::{KeyPair, sign_assertion};
use iop_gateway::config::Config;
use iop_gateway::store::{Store, Stored};
use serde_json::Value;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Set in the child process that exports; its value is the store's TOML.
const CHILD: &str = "IOP_BENCH_EXPORT_STORE";
const PROGRAM: &str = "Organization/iop-program";
/// The request timeout the child's gateway runs with: an export waits it out before reading.
const SETTLE_SECS: u64 = 1;

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .unwrap_or(0.0)
        / 1024.0
}

/// The Synthea bundles, in name order.
fn bundles() -> Option<Vec<std::path::PathBuf>> {
    let dir = std::env::var_os("IOP_TEST_CORPUS").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from(format!("{ROOT}/../shared/corpus"))).join("synthea/bundles");
    let mut files: Vec<_> = std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(".json.gz")).collect();
    files.sort();
    (!files.is_empty()).then_some(files)
}

/// Rewrites `urn:uuid:` references to `Type/id` as `ids` maps them.
fn rewrite(value: &mut Value, ids: &std::collections::HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "reference"
                    && let Value::String(text) = child
                    && let Some(target) = ids.get(text.as_str())
                {
                    *text = target.clone();
                } else {
                    rewrite(child, ids);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite(i, ids)),
        _ => {}
    }
}

/// Writes one bundle's resources into the store as the program's, but those `seen` already (Synthea
/// repeats the Organizations and Practitioners patients share); returns how many it wrote.
async fn load_bundle(store: &Store, path: &std::path::Path, suffix: &str, seen: &mut std::collections::HashSet<String>) -> usize {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    let entries = bundle["entry"].as_array().unwrap();
    let mut ids = std::collections::HashMap::new();
    for entry in entries {
        let resource_type = entry["resource"]["resourceType"].as_str().unwrap();
        let id = format!("{}{suffix}", entry["fullUrl"].as_str().unwrap().trim_start_matches("urn:uuid:"));
        ids.insert(entry["fullUrl"].as_str().unwrap().to_string(), format!("{resource_type}/{id}"));
    }
    let last_updated = iop_gateway::api::fhir::now_instant();
    let mut tx = store.begin().await.unwrap();
    let mut written = 0;
    for entry in entries {
        let reference = ids[entry["fullUrl"].as_str().unwrap()].clone();
        if !seen.insert(reference.clone()) {
            continue;
        }
        written += 1;
        let mut resource = entry["resource"].clone();
        rewrite(&mut resource, &ids);
        let (resource_type, id) = reference.split_once('/').unwrap();
        resource["id"] = Value::String(id.to_string());
        resource["meta"] = serde_json::json!({"versionId": "1", "lastUpdated": last_updated});
        let body = resource.to_string();
        let parsed = iop_gateway::json::parse(body.as_bytes()).unwrap();
        let index = iop_gateway::search::extract(resource_type, &parsed);
        let stored = Stored {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version: 1,
            last_updated: last_updated.clone(),
            body,
            parties: vec![PROGRAM.to_string()],
            labels: Vec::new(),
            created_by: "bench".into(),
            owner: PROGRAM.into(),
            method: "PUT".into(),
        };
        tx.write(&stored, &index, false).await.unwrap();
    }
    tx.commit().await.unwrap();
    written
}

fn config_text(dir: &std::path::Path, store_toml: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_secs = {SETTLE_SECS}\n[store]\ndata_dir = {:?}\n{store_toml}\n[log]\nlevel = \"error\"\n\
         [[clients]]\nid = \"bench\"\nrole = \"clinic\"\njwks_file = \"bench.jwks.json\"\n",
        dir.join("data").display().to_string()
    )
}

/// The child: a gateway on the loaded store exports everything over HTTP; prints one line of figures.
async fn child(store_toml: &str, dir: &std::path::Path) {
    let key = KeyPair::generate_es384("bench-1").unwrap();
    std::fs::write(dir.join("bench.jwks.json"), key.jwks_json()).unwrap();
    let loaded = Config::from_toml(&config_text(dir, store_toml), dir).unwrap();
    let running = iop_gateway::server::start(loaded, std::future::pending()).await.unwrap();
    let base = running.base_url.clone();
    let http = reqwest::Client::new();
    let assertion = sign_assertion(&key, "bench", &format!("{base}/auth/token"), &uuid::Uuid::new_v4().to_string(), jsonwebtoken::get_current_timestamp() + 120).unwrap();
    let granted: Value = http.post(format!("{base}/auth/token")).form(&iop_gateway::auth::token_request_form(assertion.as_str(), "system/*.read")).send().await.unwrap().json().await.unwrap();
    let token = granted["access_token"].as_str().unwrap().to_string();
    let idle = status_mb("VmHWM:");
    let started = Instant::now();
    let kick_off = http.get(format!("{base}/$export")).bearer_auth(&token).header("prefer", "respond-async").send().await.unwrap();
    assert_eq!(kick_off.status(), 202);
    let status_url = kick_off.headers()["content-location"].to_str().unwrap().to_string();
    let manifest: Value = loop {
        let response = http.get(&status_url).bearer_auth(&token).send().await.unwrap();
        match response.status().as_u16() {
            202 => tokio::time::sleep(Duration::from_millis(20)).await,
            200 => break response.json().await.unwrap(),
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
    };
    let exported = started.elapsed();
    let downloading = Instant::now();
    let (mut resources, mut bytes) = (0u64, 0u64);
    for file in manifest["output"].as_array().unwrap() {
        resources += file["count"].as_u64().unwrap();
        let mut response = http.get(file["url"].as_str().unwrap()).bearer_auth(&token).send().await.unwrap();
        while let Some(chunk) = response.chunk().await.unwrap() {
            bytes += chunk.len() as u64;
        }
    }
    let downloaded = downloading.elapsed();
    println!("export {resources} {bytes} {:.3} {:.3} {:.1} {:.1}", exported.as_secs_f64(), downloaded.as_secs_f64(), idle, status_mb("VmHWM:"));
    running.shutdown().await.unwrap();
}

/// The baseline: the same rows' bodies by a plain keyset SELECT, 1,000 a page; (rows, bytes, seconds).
async fn plain_select(pool: &sqlx::AnyPool) -> (u64, u64, f64) {
    let started = Instant::now();
    let (mut rows, mut bytes) = (0u64, 0u64);
    let (mut after_type, mut after_id) = (String::new(), String::new());
    loop {
        let page = sqlx::query("SELECT type, id, body FROM resources WHERE (type, id) > ($1, $2) ORDER BY type, id LIMIT 1000")
            .bind(after_type.clone())
            .bind(after_id.clone())
            .fetch_all(pool)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after_type = sqlx::Row::get(last, 0);
        after_id = sqlx::Row::get(last, 1);
        for row in &page {
            bytes += sqlx::Row::get::<String, _>(row, 2).len() as u64 + 1;
            rows += 1;
        }
    }
    (rows, bytes, started.elapsed().as_secs_f64())
}

/// Exports the store in a child, measures the baseline; prints the row.
async fn measure(label: &str, store_toml: &str, dir: &std::path::Path, pool: &sqlx::AnyPool, total: usize, loaded_in: f64) {
    // Fresh statistics, as autovacuum would have them for a store loaded long before its export.
    if label == "postgres" {
        for table in ["resources", "resource_versions", "search_tokens"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}"))).execute(pool).await.unwrap();
        }
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap()).env(CHILD, store_toml).env("IOP_BENCH_EXPORT_DIR", dir).output().expect("the export child runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(f) = text.lines().find_map(|l| l.strip_prefix("export ")).map(|l| l.split_whitespace().map(|x| x.parse::<f64>().unwrap()).collect::<Vec<_>>()) else {
        println!("{label}: the export child failed: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
        return;
    };
    let (resources, bytes, elapsed, downloaded, idle, peak) = (f[0], f[1], f[2], f[3], f[4], f[5]);
    let export_secs = (elapsed - SETTLE_SECS as f64).max(0.001);
    let (rows, select_bytes, select_secs) = plain_select(pool).await;
    let mb = |b: f64| b / 1_000_000.0;
    println!(
        "{label:<9} {total:>6} stored (loaded in {loaded_in:.1} s): export {resources:.0} resources, {:.1} MB NDJSON in {export_secs:.2} s = {:.0} resources/s, {:.1} MB/s (download {downloaded:.2} s) | plain SELECT {rows} rows, {:.1} MB in {select_secs:.2} s = {:.0} rows/s, {:.1} MB/s | export/SELECT {:.2} | peak memory {peak:.1} MB (idle {idle:.1} MB)",
        mb(bytes),
        resources / export_secs,
        mb(bytes) / export_secs,
        mb(select_bytes as f64),
        rows as f64 / select_secs,
        mb(select_bytes as f64) / select_secs,
        (resources / export_secs) / (rows as f64 / select_secs),
    );
}

async fn bench_backend(label: &str, store_toml: &str, files: &[std::path::PathBuf]) {
    let dir = std::env::temp_dir().join(format!("iop-gw-bench-export-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let loaded = Config::from_toml(&config_text(&dir, store_toml).replace("[[clients]]\nid = \"bench\"\nrole = \"clinic\"\njwks_file = \"bench.jwks.json\"\n", ""), &dir).unwrap();
    let store = Store::open(&loaded.config.store, Default::default()).await.unwrap();
    sqlx::any::install_default_drivers();
    let url = match &loaded.config.store.url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=ro", dir.join("data").join("gateway.db").display()),
    };
    let schema = loaded.config.store.schema.clone();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let schema = schema.clone();
            Box::pin(async move {
                if let Some(schema) = schema {
                    sqlx::Executor::execute(conn, sqlx::AssertSqlSafe(format!("SET search_path TO \"{schema}\""))).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .unwrap();
    // ~10,000 resources: the first bundles; then the rest and a second copy of the first ones (fresh ids): ~70,000.
    let (mut total, mut next, mut seen) = (0, 0, std::collections::HashSet::new());
    let loading = Instant::now();
    while total < 10_000 && next < files.len() {
        total += load_bundle(&store, &files[next], "", &mut seen).await;
        next += 1;
    }
    measure(label, store_toml, &dir, &pool, total, loading.elapsed().as_secs_f64()).await;
    let loading = Instant::now();
    for file in &files[next..] {
        total += load_bundle(&store, file, "", &mut seen).await;
    }
    for file in files {
        if total >= 70_000 {
            break;
        }
        total += load_bundle(&store, file, "-b", &mut seen).await;
    }
    measure(label, store_toml, &dir, &pool, total, loading.elapsed().as_secs_f64()).await;
    pool.close().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if let Ok(store_toml) = std::env::var(CHILD) {
        let dir = std::path::PathBuf::from(std::env::var("IOP_BENCH_EXPORT_DIR").unwrap());
        runtime.block_on(child(&store_toml, &dir));
        return;
    }
    let Some(files) = bundles() else {
        println!("export bench skipped: the Synthea bundles are not at ../shared/corpus/synthea/bundles (or IOP_TEST_CORPUS=DIR)");
        return;
    };
    runtime.block_on(async {
        println!("bulk $export of Synthea ({} bundles) as the clinic, default [export] settings (pages of 1,000), every file downloaded; export time = kick-off to manifest less the {SETTLE_SECS} s settle", files.len());
        bench_backend("sqlite", "", &files).await;
        let schema = format!("bench_export_{}", std::process::id());
        match sqlx::PgPool::connect(PG_URL).await {
            Ok(pool) => {
                bench_backend("postgres", &format!("url = \"{PG_URL}\"\nschema = \"{schema}\"\nmax_connections = 16"), &files).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&pool).await;
            }
            Err(e) => println!("postgres skipped: {e}"),
        }
    });
}
