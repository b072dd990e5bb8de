//! Mapping throughput and memory: maps and validates a generated load of clients × 8-week IOP episodes and prints records/s, resources/s and peak memory.
//!
//! `cargo bench --bench mapping` (10,000 clients by default; `IOP_BENCH_CLIENTS=500` for a quick run).
//! Each client is the episode of `tests/fixtures/iop/episode` with its identifiers rewritten, so
//! every client maps to distinct resources: the client, enrollment, care plan, 2 referrals, 24
//! sessions, 16 screenings, 4 drug screens, an authorization and its extension (each with its PAS
//! request Bundle), the discharge (with its summary Bundle) and a Part 2 consent, mapped and
//! validated one client Bundle at a time. The record and resource counts are printed.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use iop_gateway::definitions::Definitions;
use iop_gateway::json::{self, Json};
use iop_gateway::mapping::MappingSet;
use iop_gateway::validation::Validator;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let n_clients: usize = std::env::var("IOP_BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let started = Instant::now();
    let definitions = Arc::new(Definitions::new_default());
    let mappings = MappingSet::load(&root.join("mappings"), &definitions).unwrap_or_else(|e| panic!("{e}"));
    let validator = Validator::new(definitions);
    let load_s = started.elapsed().as_secs_f64();

    // Every file of the episode, as the golden test maps it, so a new concept is benched as soon as it has one.
    let mut files: Vec<_> = std::fs::read_dir(root.join("tests/fixtures/iop/episode"))
        .expect("episode fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut template = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).expect("episode fixture");
        let Json::Array(records) = json::parse(&bytes).expect("episode JSON") else { panic!("episode files are arrays") };
        template.extend(records);
    }
    // Identifiers are rewritten textually: every id in the episode contains the client number 2001.
    let template_text: Vec<String> = template.iter().map(Json::to_string_compact).collect();

    let (mut n_records, mut n_resources, mut n_invalid) = (0usize, 0usize, 0usize);
    let (mut map_s, mut validate_s) = (0.0f64, 0.0f64);
    for client in 0..n_clients {
        let number = format!("9{client:06}");
        let records: Vec<Json> = template_text.iter().map(|t| json::parse(t.replace("2001", &number).as_bytes()).expect("rewritten record")).collect();
        let t0 = Instant::now();
        let mapped = mappings.records_to_fhir(&records);
        let t1 = Instant::now();
        let report = validator.validate_json(&mapped.output, &[]);
        let t2 = Instant::now();
        map_s += (t1 - t0).as_secs_f64();
        validate_s += (t2 - t1).as_secs_f64();
        assert!(!mapped.has_errors(), "{:?}", mapped.issues);
        if !report.is_valid() {
            n_invalid += 1;
        }
        n_records += records.len();
        n_resources += mapped.output.get("entry").and_then(Json::as_array).map_or(0, <[Json]>::len);
    }
    let total_s = map_s + validate_s;
    println!("mapping benchmark: {n_clients} clients x 8-week episode ({n_records} records -> {n_resources} resources)");
    println!("  load mappings + definitions: {:.3} s", load_s);
    println!("  map only:          {:>8.2} s  {:>10.0} records/s  {:>10.0} resources/s", map_s, n_records as f64 / map_s, n_resources as f64 / map_s);
    println!("  validate only:     {:>8.2} s  {:>10.0} resources/s", validate_s, n_resources as f64 / validate_s);
    println!("  map + validate:    {:>8.2} s  {:>10.0} records/s  {:>10.0} resources/s", total_s, n_records as f64 / total_s, n_resources as f64 / total_s);
    println!("  client Bundles with validation errors: {n_invalid}");
    match peak_memory_mb() {
        Some(mb) => println!("  peak memory (VmHWM): {mb:.1} MB"),
        None => println!("  peak memory: not reported on this platform"),
    }
    assert_eq!(n_invalid, 0, "every mapped Bundle must validate");
}

/// The process's peak resident memory (Linux `VmHWM`).
fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
