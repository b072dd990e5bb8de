//! `iop-gateway map`: maps IOP records to a FHIR transaction Bundle, or FHIR to IOP records, validating what crosses.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::json::{self, Json};
use crate::mapping::{MapIssue, MappingSet};
use crate::validation::Validator;

use super::EXIT_USAGE;

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// IOP records (JSON, one record or an array of records per file).
    Iop,
    /// FHIR R4 JSON (a Bundle or one resource per file).
    Fhir,
}

#[derive(clap::Args)]
pub struct Args {
    /// What the input files hold.
    #[arg(long, value_enum)]
    from: Side,
    /// What to print.
    #[arg(long, value_enum)]
    to: Side,
    /// The mappings folder (record schemas and mapping files).
    #[arg(long, value_name = "DIR", default_value = "mappings")]
    mappings: PathBuf,
    /// A FHIR package to validate against as well (`.tgz`, folder, or `id#version` from the package cache).
    #[arg(long = "ig", value_name = "PATH|ID#VERSION")]
    igs: Vec<String>,
    /// The per-deployment namespace resource ids are derived in.
    #[arg(long, value_name = "TEXT")]
    id_namespace: Option<String>,
    /// Files or folders (every *.json below a folder, in name order).
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    let definitions = match super::load_definitions(&args.igs, None) {
        Ok(definitions) => Arc::new(definitions),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mappings = match MappingSet::load(&args.mappings, &definitions) {
        Ok(set) => match &args.id_namespace {
            Some(namespace) => set.with_id_namespace(namespace.as_str()),
            None => set,
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let inputs = match read_inputs(&args.paths) {
        Ok(inputs) => inputs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let validator = Validator::new(definitions);
    let mut failed = false;
    let output = match (args.from, args.to) {
        (Side::Iop, Side::Fhir) => {
            let mut records = Vec::new();
            for (_, json) in inputs {
                match json {
                    Json::Array(items) => records.extend(items),
                    single => records.push(single),
                }
            }
            let mapped = mappings.records_to_fhir(&records);
            failed |= print_issues(&mapped.issues);
            let report = validator.validate_json(&mapped.output, &[]);
            for issue in report.issues.iter().filter(|i| i.severity.is_error()) {
                eprintln!("{issue}");
            }
            failed |= !report.is_valid();
            mapped.output
        }
        (Side::Fhir, Side::Iop) => {
            let mut records = Vec::new();
            for (file, json) in inputs {
                let report = validator.validate_json(&json, &[]);
                if !report.is_valid() {
                    for issue in report.issues.iter().filter(|i| i.severity.is_error()) {
                        eprintln!("{}: {issue}", file.display());
                    }
                    failed = true;
                    continue;
                }
                let mapped = mappings.fhir_to_records(&json);
                failed |= print_issues(&mapped.issues);
                records.extend(mapped.output);
            }
            Json::Array(records)
        }
        (from, to) => {
            eprintln!("error: nothing to do from {from:?} to {to:?}: use --from iop --to fhir or --from fhir --to iop");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{}", output.to_string_pretty()).is_err() {
        // A caller that closed stdout early (piped into `head`) did not get the whole Bundle or record list,
        // so it must not look like success; 1, not 2, because the command line itself was fine.
        return ExitCode::from(1);
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// Prints issues to stderr; returns whether any is an error.
fn print_issues(issues: &[MapIssue]) -> bool {
    for issue in issues {
        eprintln!("{issue}");
    }
    issues.iter().any(|i| i.severity.is_error())
}

/// Every input file parsed, in a stable order.
fn read_inputs(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Json)>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let found = super::files_below(path, &["json"]).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(format!("{} does not exist", path.display()));
        }
    }
    files
        .into_iter()
        .map(|file| {
            let bytes = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let json = json::parse(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok((file, json))
        })
        .collect()
}
