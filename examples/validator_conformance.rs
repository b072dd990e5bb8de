//! Measures how often the validator agrees with the HL7 reference (Java) validator on HL7's own R4 test cases.
//!
//! Usage: `cargo run --release --example validator_conformance -- [--manifest PATH] [--verbose] [--filter NAME]`
//!
//! The manifest (default `../shared/corpus/fhir-test-cases/validator/manifest.json`) is HL7's
//! `fhir-test-cases` validator manifest; its format is described in `../shared/corpus/README.md`.
//! Every R4 test (`version` 4.0 or 4.0.1, not `use-test: false`) is validated once as it is and,
//! when it has a `profile`, once more against that profile; each run with a Java expectation is
//! one check. A check agrees when both validators give the same verdict: valid iff no issue of
//! severity error or fatal. Setup the corpus lacks (registry packages, a terminology server)
//! is not simulated: such checks count as they fall.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use iop_gateway::definitions::Definitions;
use iop_gateway::outcome::{Issue, IssueCode, Severity};
use iop_gateway::validation::{Policy, Report, Validator, ValidatorOptions};
use serde_json::Value;

const DEFAULT_MANIFEST: &str = "../shared/corpus/fhir-test-cases/validator/manifest.json";
/// Where `id#version` packages are looked for, relative to the crate root.
const PACKAGE_DIR: &str = "../shared/corpus/definitions/packages";

struct Options {
    manifest: PathBuf,
    verbose: bool,
    filter: Option<String>,
}

/// One issue as the Java validator recorded it, or as we found it.
struct Finding {
    severity: String,
    expression: String,
    message: String,
}

/// The verdict Java recorded for one check.
enum Expectation {
    /// Java's error and fatal issues (empty: valid).
    Errors(Vec<Finding>),
    /// Java's outcome is not available (missing file, no entry).
    None(String),
}

#[derive(Default)]
struct Tally {
    run: usize,
    agreed: usize,
    /// Java says invalid, we say valid.
    missed: usize,
    /// Java says valid, we say invalid.
    extra: usize,
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}");
            eprintln!("usage: validator_conformance [--manifest PATH] [--verbose] [--filter NAME]");
            std::process::exit(2);
        }
    };
    let manifest_text = match std::fs::read_to_string(&options.manifest) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", options.manifest.display());
            std::process::exit(2);
        }
    };
    let manifest: Value = match serde_json::from_str(&manifest_text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {} is not JSON: {e}", options.manifest.display());
            std::process::exit(2);
        }
    };
    let root = options.manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = Definitions::new_base();
    let started = Instant::now();

    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let cases = manifest.get("test-cases").and_then(Value::as_array).cloned().unwrap_or_default();
    for case in &cases {
        let name = case.get("name").and_then(Value::as_str).unwrap_or("?");
        if !matches!(case.get("version").and_then(Value::as_str), Some("4.0" | "4.0.1")) {
            *skipped.entry("not R4").or_default() += 1;
            continue;
        }
        if case.get("use-test").and_then(Value::as_bool) == Some(false) {
            *skipped.entry("use-test: false").or_default() += 1;
            continue;
        }
        if let Some(filter) = &options.filter
            && !name.contains(filter.as_str())
        {
            continue;
        }
        let module = case.get("module").and_then(Value::as_str).unwrap_or("(none)").to_string();
        let mut setup_notes = Vec::new();
        let mut definitions = base.fork();
        load_packages(case, &root, &mut definitions, &mut setup_notes);
        for key in ["supporting", "supporting5", "profiles"] {
            for file in strings(case.get(key)) {
                load_file(&root.join(file), &mut definitions, &mut setup_notes);
            }
        }
        let file = case.get("file").and_then(Value::as_str).unwrap_or_default();
        let bytes = std::fs::read(root.join(file));

        let base_definitions = Arc::new(definitions);
        let mut checks: Vec<(String, Arc<Definitions>, Vec<String>, Expectation)> = Vec::new();
        checks.push((String::new(), base_definitions.clone(), Vec::new(), expectation(case.get("java"), &root)));
        if let Some(profile) = case.get("profile").filter(|p| p.is_object()) {
            let mut definitions = base_definitions.fork();
            load_packages(profile, &root, &mut definitions, &mut setup_notes);
            for file in strings(profile.get("supporting")) {
                load_file(&root.join(file), &mut definitions, &mut setup_notes);
            }
            let source = profile.get("source").and_then(Value::as_str).unwrap_or_default();
            // The source is a file next to the manifest, or the canonical URL of a profile in a package.
            let url = if source.starts_with("http://") || source.starts_with("https://") {
                source.to_string()
            } else {
                load_file(&root.join(source), &mut definitions, &mut setup_notes).unwrap_or_else(|| format!("(unreadable {source})"))
            };
            checks.push((" [profile]".to_string(), Arc::new(definitions), vec![url], expectation(profile.get("java"), &root)));
        }

        for (label, definitions, profiles, expected) in checks {
            let expected = match expected {
                Expectation::None(why) => {
                    if options.verbose {
                        println!("SKIP   {name}{label}: {why}");
                    }
                    *skipped.entry("no expectation").or_default() += 1;
                    continue;
                }
                Expectation::Errors(errors) => errors,
            };
            // Java's defaults: an extension whose definition cannot be found is an error.
            let java_like = ValidatorOptions { unknown_extensions_are_errors: true };
            let mut policy = Policy::reference_validator();
            if case.get("wrong-displays").and_then(Value::as_str) == Some("warning") {
                policy.wrong_display = Severity::Warning;
            }
            policy.allow_example_urls = case.get("examples").and_then(Value::as_bool).unwrap_or(true);
            policy.security_checks = case.get("security-checks").and_then(Value::as_bool).unwrap_or(false);
            if case.get("noHtmlInMarkdown").and_then(Value::as_bool) == Some(true) {
                policy.html_in_markdown = Severity::Error;
            }
            let validator = Validator::with_options(definitions, java_like).with_policy(policy);
            let report = match &bytes {
                Ok(bytes) => validator.validate_bytes(bytes, &profiles),
                Err(e) => Report {
                    issues: vec![Issue::new(Severity::Fatal, IssueCode::NotFound, "", format!("cannot read {file}: {e}"))],
                },
            };
            let ours: Vec<Finding> = report
                .issues
                .iter()
                .filter(|i| i.severity.is_error())
                .map(|i| Finding { severity: i.severity.as_str().to_string(), expression: i.expression.clone(), message: i.message.clone() })
                .collect();
            let java_valid = expected.is_empty();
            let our_valid = ours.is_empty();
            let tally = tallies.entry(module.clone()).or_default();
            tally.run += 1;
            if java_valid == our_valid {
                tally.agreed += 1;
                continue;
            }
            if java_valid {
                tally.extra += 1;
            } else {
                tally.missed += 1;
            }
            if options.verbose {
                let verdict = |valid: bool| if valid { "valid" } else { "invalid" };
                println!("DIFFER {name}{label} [{module}] ({file}): java {}, ours {}", verdict(java_valid), verdict(our_valid));
                for note in &setup_notes {
                    println!("    setup: {note}");
                }
                for f in &expected {
                    println!("    java {:<5} {}: {}", f.severity, f.expression, one_line(&f.message));
                }
                for f in &ours {
                    println!("    ours {:<5} {}: {}", f.severity, f.expression, one_line(&f.message));
                }
            }
        }
    }

    println!();
    println!("{:<20} {:>5} {:>7} {:>8} {:>7} {:>7}", "module", "run", "agreed", "agree%", "missed", "extra");
    let mut total = Tally::default();
    for (module, t) in &tallies {
        println!("{:<20} {:>5} {:>7} {:>7.1}% {:>7} {:>7}", module, t.run, t.agreed, percent(t.agreed, t.run), t.missed, t.extra);
        total.run += t.run;
        total.agreed += t.agreed;
        total.missed += t.missed;
        total.extra += t.extra;
    }
    println!(
        "{:<20} {:>5} {:>7} {:>7.1}% {:>7} {:>7}",
        "TOTAL",
        total.run,
        total.agreed,
        percent(total.agreed, total.run),
        total.missed,
        total.extra
    );
    let skipped: Vec<String> = skipped.iter().map(|(why, n)| format!("{n} {why}")).collect();
    println!("skipped: {}", if skipped.is_empty() { "none".to_string() } else { skipped.join(", ") });
    println!("(missed: Java invalid, ours valid; extra: Java valid, ours invalid; {:.1} s)", started.elapsed().as_secs_f64());
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { manifest: PathBuf::from(DEFAULT_MANIFEST), verbose: false, filter: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--manifest" => options.manifest = PathBuf::from(args.next().ok_or("--manifest needs a path")?),
            "--verbose" | "-v" => options.verbose = true,
            "--filter" => options.filter = Some(args.next().ok_or("--filter needs a name")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 220 { format!("{}…", flat.chars().take(220).collect::<String>()) } else { flat }
}

fn strings(value: Option<&Value>) -> Vec<&str> {
    match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Loads the test's packages: a local `.tgz` next to the manifest, else `id#version` from the corpus packages.
fn load_packages(case: &Value, root: &Path, definitions: &mut Definitions, notes: &mut Vec<String>) {
    for reference in strings(case.get("packages")) {
        let local = root.join(reference);
        let path = if local.is_file() {
            Some(local)
        } else if let Some((id, version)) = reference.split_once('#') {
            let candidate = Path::new(PACKAGE_DIR).join(format!("{id}-{version}.tgz"));
            candidate.is_file().then_some(candidate)
        } else {
            None
        };
        match path {
            Some(path) => {
                if let Err(e) = definitions.load_package_reference(&path.to_string_lossy(), None) {
                    notes.push(format!("package {reference}: {e}"));
                }
            }
            None => notes.push(format!("package {reference} is not in the corpus")),
        }
    }
}

/// Loads one conformance resource file (JSON, or XML once the reader supports it); returns its canonical URL.
fn load_file(path: &Path, definitions: &mut Definitions, notes: &mut Vec<String>) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            notes.push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let reader = Validator::new(Arc::new(definitions.fork()));
    match reader.read(&bytes) {
        Ok((resource, _)) => {
            let url = resource.get("url").and_then(|u| u.as_str()).map(str::to_string);
            definitions.add_resource(&path.to_string_lossy(), resource);
            url
        }
        Err(issue) => {
            notes.push(format!("cannot load {}: {}", path.display(), issue.message));
            None
        }
    }
}

/// Reads Java's expected outcome: a file under `outcomes/`, or an inline object.
fn expectation(java: Option<&Value>, root: &Path) -> Expectation {
    match java {
        None | Some(Value::Null) => Expectation::None("no java outcome in the manifest".to_string()),
        Some(Value::String(path)) => {
            let full = root.join("outcomes").join(path);
            match std::fs::read_to_string(&full) {
                Ok(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(outcome) => Expectation::Errors(outcome_errors(&outcome)),
                    Err(e) => Expectation::None(format!("{path} is not JSON: {e}")),
                },
                Err(_) => Expectation::None(format!("{path} is missing")),
            }
        }
        Some(Value::Object(inline)) => {
            if let Some(outcome) = inline.get("outcome") {
                return Expectation::Errors(outcome_errors(outcome));
            }
            let count = |k: &str| inline.get(k).and_then(Value::as_u64).unwrap_or(0);
            let n = count("errorCount") + count("fatalCount");
            let output: Vec<&str> = inline.get("output").and_then(Value::as_array).map(|o| o.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            let mut errors: Vec<Finding> = output
                .iter()
                .filter(|line| line.starts_with("ERROR") || line.starts_with("FATAL"))
                .map(|line| {
                    let (severity, rest) = line.split_once(": ").unwrap_or(("error", line));
                    let (expression, message) = rest.split_once(": ").unwrap_or(("", rest));
                    Finding { severity: severity.to_lowercase(), expression: expression.to_string(), message: message.to_string() }
                })
                .collect();
            while (errors.len() as u64) < n {
                errors.push(Finding { severity: "error".into(), expression: String::new(), message: "(counted, not listed)".into() });
            }
            Expectation::Errors(errors)
        }
        Some(other) => Expectation::None(format!("unexpected java value {other}")),
    }
}

fn outcome_errors(outcome: &Value) -> Vec<Finding> {
    outcome
        .get("issue")
        .and_then(Value::as_array)
        .map(|issues| {
            issues
                .iter()
                .filter(|i| matches!(i.get("severity").and_then(Value::as_str), Some("error" | "fatal")))
                .map(|i| Finding {
                    severity: i.get("severity").and_then(Value::as_str).unwrap_or_default().to_string(),
                    expression: i
                        .get("expression")
                        .and_then(Value::as_array)
                        .and_then(|e| e.first())
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    message: i.get("details").and_then(|d| d.get("text")).and_then(Value::as_str).unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}
