//! `iop-gateway validate`: validates files and folders, printing text, a JSON report or one JSON line per file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::json::{Json, Object};
use crate::validation::{Policy, Report, Validator, ValidatorOptions};

use super::EXIT_USAGE;

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One issue a line and a summary, for people.
    Text,
    /// One JSON array of `{file, valid, outcome}`.
    Json,
    /// One `{file, valid, outcome}` object per line.
    Jsonl,
}

#[derive(clap::Args)]
pub struct Args {
    /// A FHIR package to load: a `.tgz`, a folder, a single conformance resource file, or `id#version` from the package cache.
    #[arg(long = "ig", value_name = "PATH|ID#VERSION")]
    igs: Vec<String>,
    /// Also validate against this profile (canonical URL, optionally `|version`).
    #[arg(long = "profile", value_name = "CANONICAL")]
    profiles: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// The FHIR package cache folder (default: $FHIR_PACKAGE_CACHE or ~/.fhir/packages).
    #[arg(long, value_name = "DIR")]
    package_cache: Option<PathBuf>,
    /// Judge as the HL7 reference validator does: extensions whose definition is not loaded and wrong code displays are errors.
    #[arg(long)]
    strict: bool,
    /// Read the files to validate from this list (one path a line, relative to --root).
    #[arg(long, value_name = "FILE")]
    list: Option<PathBuf>,
    /// The folder the --list paths are relative to.
    #[arg(long, value_name = "DIR", requires = "list")]
    root: Option<PathBuf>,
    /// Files or folders (every *.json and *.xml below a folder).
    #[arg(value_name = "PATH", required_unless_present = "list")]
    paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    let definitions = match super::load_definitions(&args.igs, args.package_cache.as_deref()) {
        Ok(definitions) => definitions,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let options = ValidatorOptions { unknown_extensions_are_errors: args.strict };
    let policy = if args.strict { Policy::reference_validator() } else { Policy::default() };
    let validator = Validator::with_options(Arc::new(definitions), options).with_policy(policy);

    let files = match collect_files(&args) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut json_results = Vec::new();
    let (mut n_invalid, mut n_errors, mut n_warnings, mut io_failed) = (0, 0, 0, false);
    for (label, path) in &files {
        let report = match std::fs::read(path) {
            Ok(bytes) => validator.validate_bytes(&bytes, &args.profiles),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                io_failed = true;
                continue;
            }
        };
        if !report.is_valid() {
            n_invalid += 1;
        }
        n_errors += report.n_errors();
        n_warnings += report.n_warnings();
        let written = match args.output {
            Output::Text => write_text(&mut stdout, label, &report),
            Output::Jsonl => writeln!(stdout, "{}", file_result(label, &report).to_string_compact()),
            Output::Json => {
                json_results.push(file_result(label, &report));
                Ok(())
            }
        };
        if written.is_err() {
            // stdout closed (e.g. piped into `head`): nothing more can be reported.
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = match args.output {
        Output::Text => writeln!(
            stdout,
            "{} file(s): {} valid, {n_invalid} invalid; {n_errors} error(s), {n_warnings} warning(s)",
            files.len(),
            files.len() - n_invalid
        ),
        Output::Json => writeln!(stdout, "{}", Json::Array(json_results).to_string_pretty()),
        Output::Jsonl => {
            // The peer comparison harness reads the validation loop time from the last stderr line.
            let peak = peak_memory_mb().map(|mb| format!(", \"peak_rss_mb\": {mb:.1}")).unwrap_or_default();
            eprintln!("{{\"files\": {}, \"validate_s\": {elapsed:.4}{peak}}}", files.len());
            Ok(())
        }
    };
    if io_failed {
        ExitCode::from(EXIT_USAGE)
    } else if n_invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The process's peak resident memory, where the platform reports it (Linux `VmHWM`).
fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn file_result(label: &str, report: &Report) -> Json {
    let mut line = Object::new();
    line.insert("file", Json::string(label));
    line.insert("valid", Json::Bool(report.is_valid()));
    line.insert("outcome", report.to_operation_outcome());
    Json::Object(line)
}

fn write_text(out: &mut impl Write, label: &str, report: &Report) -> std::io::Result<()> {
    let verdict = if report.is_valid() { "valid" } else { "INVALID" };
    writeln!(out, "{label}: {verdict} ({} error(s), {} warning(s))", report.n_errors(), report.n_warnings())?;
    for issue in &report.issues {
        writeln!(out, "  {issue}")?;
    }
    Ok(())
}

/// The files to validate, as (label shown in output, path), in a stable order.
fn collect_files(args: &Args) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = Vec::new();
    if let Some(list) = &args.list {
        let root = args.root.clone().unwrap_or_default();
        let text = std::fs::read_to_string(list).map_err(|e| format!("cannot read {}: {e}", list.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            files.push((line.to_string(), root.join(line)));
        }
    }
    for path in &args.paths {
        if path.is_dir() {
            let found = super::files_below(path, &["json", "xml"]).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            files.extend(found.into_iter().map(|p| (p.display().to_string(), p)));
        } else if path.is_file() {
            files.push((path.display().to_string(), path.clone()));
        } else {
            return Err(format!("{} does not exist", path.display()));
        }
    }
    Ok(files)
}
