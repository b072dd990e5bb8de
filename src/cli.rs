//! The command line: argument parsing and dispatch to one module per subcommand. Only this layer prints or chooses exit codes.

mod check_config;
mod clients;
mod disclosures;
mod export;
mod fhirpath;
mod map;
mod mappings;
mod outbox;
mod partners;
mod serve;
mod token;
mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::definitions::Definitions;
use crate::package::Package;
use crate::validation::Validator;

/// Exit code for a usage or I/O problem (as opposed to "the input is invalid", which is 1).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "iop-gateway", version, about = "FHIR R4 interoperability gateway for Intensive Outpatient Programs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate FHIR resources (JSON or XML files, or folders of them) against R4 and profiles.
    Validate(validate::Args),
    /// Evaluate a FHIRPath expression on a resource and print the result collection as JSON.
    Fhirpath(fhirpath::Args),
    /// Map IOP records to a FHIR Bundle (--from iop --to fhir) or FHIR to IOP records (--from fhir --to iop).
    Map(map::Args),
    /// Work with the mappings folder (`mappings check`).
    Mappings(mappings::Args),
    /// Run the FHIR server (embedded SQLite under ./data on 127.0.0.1:8080 unless configured otherwise).
    Serve(serve::Args),
    /// Validate the server configuration offline and print what it would run with.
    CheckConfig(check_config::Args),
    /// Register partners (SMART Backend Services clients).
    Clients(clients::Args),
    /// Get an access token for a registered client from the running gateway's token endpoint.
    Token(token::Args),
    /// Register partners the gateway sends to (payers, inpatient units, outpatient providers).
    Partners(partners::Args),
    /// Inspect the outbox and replay dead letters (`outbox list|show|replay`).
    Outbox(outbox::Args),
    /// Export from a Bulk Data server (this gateway or any other with SMART Backend Services) into NDJSON files.
    Export(export::Args),
    /// Print a client's accounting of disclosures of 42 CFR Part 2 records (who, what, when, why, which consent).
    Disclosures(disclosures::Args),
}

/// Runs the command line and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Fhirpath(args) => fhirpath::run(args),
        Command::Map(args) => map::run(args),
        Command::Mappings(args) => mappings::run(args),
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => check_config::run(args),
        Command::Clients(args) => clients::run(args),
        Command::Token(args) => token::run(args),
        Command::Partners(args) => partners::run(args),
        Command::Outbox(args) => outbox::run(args),
        Command::Export(args) => export::run(args),
        Command::Disclosures(args) => disclosures::run(args),
    }
}

/// R4 core, the project's profiles package, and the implementation guides asked for with `--ig`: a package
/// (`.tgz` or folder), `id#version` from the package cache, or a single conformance resource file.
///
/// A package with the bundled profiles' name (`iop-gateway.profiles`, such as an edited copy of
/// `profiles/`) is used instead of the compiled-in copy rather than beside it: two versions of the
/// same canonicals would otherwise both be loaded, and an integration engineer's changed code must
/// take effect without rebuilding the binary.
/// Loads the configuration as `serve` would (file, environment, `--data-dir`), opens its store, runs
/// `work` with both, and closes the store: what the operator commands on the store share.
fn with_store<T>(config: Option<&Path>, data_dir: Option<PathBuf>, work: impl AsyncFnOnce(&crate::config::Loaded, &crate::store::Store) -> Result<T, String>) -> Result<T, String> {
    let env = |name: &str| std::env::var(name).ok();
    let file = crate::config::Config::locate(config, &env);
    let overrides = crate::config::Overrides { listen: None, data_dir };
    let loaded = crate::config::Config::load(file.as_deref(), &crate::config::process_env(), &overrides).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
        let store = crate::store::Store::open(&loaded.config.store, metrics).await.map_err(|e| e.to_string())?;
        let result = work(&loaded, &store).await;
        store.close().await;
        result
    })
}

fn load_definitions(igs: &[String], cache: Option<&Path>) -> Result<Definitions, String> {
    enum Loaded {
        Package(Package),
        Resource(String, crate::json::Json),
    }
    let mut loaded = Vec::new();
    for ig in igs {
        if is_single_resource(ig) {
            let bytes = std::fs::read(ig).map_err(|e| format!("cannot read {ig}: {e}"))?;
            let (resource, _) = Validator::new(Definitions::base()).read(&bytes).map_err(|issue| format!("{ig}: {}", issue.message))?;
            loaded.push(Loaded::Resource(ig.clone(), resource));
        } else {
            loaded.push(Loaded::Package(load_package(ig, cache)?));
        }
    }
    let bundled_name = Package::bundled().name;
    let replaces_bundled = loaded.iter().any(|l| matches!(l, Loaded::Package(p) if p.name == bundled_name));
    let mut definitions = if replaces_bundled { Definitions::new_base() } else { Definitions::new_default() };
    for item in loaded {
        match item {
            Loaded::Package(package) => definitions.add_package(package),
            Loaded::Resource(source, resource) => definitions.add_resource(&source, resource),
        }
    }
    Ok(definitions)
}

/// The profiles package in use: the first `--ig` package that replaces the bundled one, else the bundled one,
/// with a label for messages (`profiles/` or the path given).
fn profiles_package(igs: &[String], cache: Option<&Path>) -> Result<(String, Package), String> {
    let bundled = Package::bundled();
    for ig in igs.iter().filter(|ig| !is_single_resource(ig)) {
        let package = load_package(ig, cache)?;
        if package.name == bundled.name {
            return Ok((ig.trim_end_matches('/').to_string(), package));
        }
    }
    Ok(("profiles".to_string(), bundled))
}

fn load_package(reference: &str, cache: Option<&Path>) -> Result<Package, String> {
    Package::from_reference(reference, cache).map_err(|e| format!("cannot load {reference}: {e}"))
}

/// `--ig` names a single conformance resource file rather than a package.
fn is_single_resource(ig: &str) -> bool {
    Path::new(ig).is_file() && (ig.ends_with(".json") || ig.ends_with(".xml"))
}

/// Every file below `dir` whose extension is one of `extensions`, in a stable order.
fn files_below(dir: &Path, extensions: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, extensions: &[&str], found: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, extensions, found)?;
            } else if path.extension().and_then(|x| x.to_str()).is_some_and(|x| extensions.contains(&x)) {
                found.push(path);
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir, extensions, &mut found)?;
    found.sort();
    Ok(found)
}
