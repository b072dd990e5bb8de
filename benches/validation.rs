//! Validation throughput, start-up time and peak memory, each against a baseline measured in the same run.
//!
//! `cargo bench --bench validation` prints, for the Synthea bundles and the official R4 examples
//! in `../shared/corpus`: bytes, resources, and the single-thread throughput of (a) parsing into
//! `serde_json::Value` (the baseline), (b) our JSON reader, (c) full validation, with the ratio of
//! (c) to (a). Then it times process start to first result and the peak memory of the
//! `iop-gateway validate` command on the same files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iop_gateway::definitions::Definitions;
use iop_gateway::json::{self, Json};
use iop_gateway::validation::Validator;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus");

struct Corpus {
    name: &'static str,
    documents: Vec<Vec<u8>>,
    folder: PathBuf,
}

fn main() {
    let corpora = [load_synthea(), load_folder("hl7-examples", &Path::new(CORPUS).join("hl7-examples/resources"))];
    let validator = Validator::new(std::sync::Arc::new(Definitions::new_default()));
    println!("single thread, best of {ROUNDS} interleaved rounds; ratio = validation throughput / serde_json::Value parse throughput");
    println!("{:<14} {:>8} {:>9} {:>10} {:>14} {:>14} {:>14} {:>7} {:>12}", "corpus", "files", "MB", "resources", "serde MB/s", "reader MB/s", "validate MB/s", "ratio", "resources/s");
    for corpus in &corpora {
        let bytes: usize = corpus.documents.iter().map(Vec::len).sum();
        let resources: usize = corpus.documents.iter().filter_map(|d| json::parse(d).ok()).map(|j| count_resources(&j)).sum();
        // Rounds interleave the three measurements, so that a burst of load from elsewhere on the
        // machine hits one round of each rather than all passes of one.
        let (mut serde, mut reader, mut validate) = (Duration::MAX, Duration::MAX, Duration::MAX);
        let mut n_invalid = 0;
        for _ in 0..ROUNDS {
            serde = serde.min(timed(|| {
                for d in &corpus.documents {
                    let value: Result<serde_json::Value, _> = serde_json::from_slice(d);
                    std::hint::black_box(value.is_ok());
                }
            }));
            reader = reader.min(timed(|| {
                for d in &corpus.documents {
                    std::hint::black_box(json::parse(d).is_ok());
                }
            }));
            validate = validate.min(timed(|| {
                n_invalid = 0;
                for d in &corpus.documents {
                    if !validator.validate_bytes(d, &[]).is_valid() {
                        n_invalid += 1;
                    }
                }
            }));
        }
        let mb = bytes as f64 / 1e6;
        println!(
            "{:<14} {:>8} {:>9.1} {:>10} {:>14.1} {:>14.1} {:>14.1} {:>7.2} {:>12.0}   ({n_invalid} invalid)",
            corpus.name,
            corpus.documents.len(),
            mb,
            resources,
            mb / serde.as_secs_f64(),
            mb / reader.as_secs_f64(),
            mb / validate.as_secs_f64(),
            serde.as_secs_f64() / validate.as_secs_f64(),
            resources as f64 / validate.as_secs_f64(),
        );
    }
    process_figures(&corpora);
}

/// Start-up to first result and peak memory of the real command, on the same files.
fn process_figures(corpora: &[Corpus]) {
    let exe = env!("CARGO_BIN_EXE_iop-gateway");
    let small = Path::new(CORPUS).join("hl7-examples/resources/Patient-example.json");
    let mut times: Vec<Duration> = (0..11)
        .map(|_| {
            let started = Instant::now();
            let output = Command::new(exe).args(["validate", "--output", "jsonl"]).arg(&small).output().expect("run iop-gateway");
            assert!(!output.stdout.is_empty(), "no result from iop-gateway");
            started.elapsed()
        })
        .collect();
    times.sort();
    println!("process start to first result (validate one Patient, median of 11 runs): {:.1} ms", times[5].as_secs_f64() * 1e3);
    // The same measurement for a process that only starts and exits, as the machine's baseline.
    let mut baseline: Vec<Duration> = (0..11)
        .map(|_| {
            let started = Instant::now();
            let _ = Command::new(exe).arg("--version").output();
            started.elapsed()
        })
        .collect();
    baseline.sort();
    println!("  baseline (same binary, --version): {:.1} ms", baseline[5].as_secs_f64() * 1e3);
    for corpus in corpora {
        let output = Command::new(exe).args(["validate", "--output", "jsonl"]).arg(&corpus.folder).output().expect("run iop-gateway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let summary = stderr.lines().last().unwrap_or_default();
        println!("iop-gateway validate {} (whole folder, one process): {summary}", corpus.name);
    }
}

/// How many rounds each corpus is measured in; each figure is the best round.
const ROUNDS: usize = 5;

fn timed(mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

fn count_resources(json: &Json) -> usize {
    let mut n = 1;
    for entry in json.get("entry").and_then(Json::as_array).unwrap_or_default() {
        if let Some(resource) = entry.get("resource") {
            n += count_resources(resource);
        }
    }
    n + json.get("contained").and_then(Json::as_array).map_or(0, <[Json]>::len)
}

/// Synthea bundles are gzipped in the corpus; they are unpacked once under target/ for the command-line figures.
fn load_synthea() -> Corpus {
    let source = Path::new(CORPUS).join("synthea/bundles");
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/synthea");
    std::fs::create_dir_all(&folder).expect("create target/bench-data");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&source).expect("synthea corpus").filter_map(|e| Some(e.ok()?.path())).collect();
    names.sort();
    let mut documents = Vec::new();
    for path in names.iter().filter(|p| p.extension().is_some_and(|x| x == "gz")) {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open")).read_to_end(&mut bytes).expect("gunzip");
        let target = folder.join(path.file_stem().expect("file name"));
        if !target.exists() {
            std::fs::write(&target, &bytes).expect("write unpacked bundle");
        }
        documents.push(bytes);
    }
    Corpus { name: "synthea", documents, folder }
}

fn load_folder(name: &'static str, folder: &Path) -> Corpus {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder).expect("corpus folder").filter_map(|e| Some(e.ok()?.path())).collect();
    paths.retain(|p| p.extension().is_some_and(|x| x == "json"));
    paths.sort();
    Corpus { name, documents: paths.iter().map(|p| std::fs::read(p).expect("read")).collect(), folder: folder.to_path_buf() }
}
