//! `iop-gateway export`: a Bulk Data export from any FHIR server that uses SMART Backend Services, with progress, resumption and optional validation of every resource that arrives.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::keys::KeyPair;
use crate::definitions::Definitions;
use crate::partner::bulk::{self, Event, FileKind, Level, Request};
use crate::partner::{Credentials, FhirClient, Transport};
use crate::validation::Validator;

use super::EXIT_USAGE;

#[derive(clap::Args)]
pub struct Args {
    /// The server's FHIR base URL (e.g. https://gateway.example.org). Default: this gateway's, from its configuration.
    #[arg(long)]
    url: Option<String>,
    /// Our client id at that server (for this gateway: the id given to `clients add`).
    #[arg(long)]
    client: String,
    /// The client's private key (PEM). Default: <store.data_dir>/clients/NAME.key.pem of the configuration.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The key id the server knows the key by (the `kid` of the client assertion). Default: the key's RFC 7638 thumbprint, as `clients add` registers it.
    #[arg(long)]
    kid: Option<String>,
    /// Configuration file to find the default URL and key through. Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Scopes to ask for.
    #[arg(long, default_value = "system/*.read")]
    scope: String,
    /// The token endpoint. Default: discovered from <url>/.well-known/smart-configuration.
    #[arg(long)]
    token_endpoint: Option<String>,
    /// A PEM CA certificate to trust (default: the system's roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Export the members of this Group (`Group/[id]/$export`).
    #[arg(long, conflicts_with = "patients")]
    group: Option<String>,
    /// Export every patient's compartment (`Patient/$export`) instead of the whole server (`$export`).
    #[arg(long)]
    patients: bool,
    /// Resource types to export (repeat or separate with commas). Default: all the server offers.
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Only resources changed since this instant (e.g. 2026-01-01T00:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only resources changed before this instant.
    #[arg(long)]
    until: Option<String>,
    /// A search that narrows one type (e.g. "Observation?category=survey"); repeatable.
    #[arg(long = "type-filter")]
    type_filters: Vec<String>,
    /// The folder to write the NDJSON files to; running again with the same folder resumes.
    #[arg(long)]
    out: PathBuf,
    /// Validate every resource that arrives with the gateway's validator (R4, the bundled profiles, US Core 6.1.0, PAS 2.2.1).
    #[arg(long)]
    validate: bool,
}

pub fn run(args: Args) -> ExitCode {
    crate::server::install_crypto_provider();
    let client = match connect(&args) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("iop-gateway export: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let request = Request {
        level: Some(match (&args.group, args.patients) {
            (Some(group), _) => Level::Group(group.clone()),
            (None, true) => Level::Patient,
            (None, false) => Level::System,
        }),
        types: args.types.clone(),
        since: args.since.clone(),
        until: args.until.clone(),
        type_filters: args.type_filters.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("iop-gateway export: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut display = Display::new();
    let started = Instant::now();
    let result = runtime.block_on(bulk::export(&client, &request, &args.out, &mut |event| display.show(event)));
    display.finish();
    let export = match result {
        Ok(export) => export,
        Err(e) => {
            eprintln!("iop-gateway export: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outputs: Vec<&bulk::File> = export.files.iter().filter(|f| f.kind == FileKind::Output).collect();
    let resources: u64 = outputs.iter().map(|f| f.resources).sum();
    let bytes: u64 = outputs.iter().map(|f| f.bytes).sum();
    println!(
        "exported {resources} resources in {} files ({}) into {} in {:.1} s; transactionTime {}",
        outputs.len(),
        megabytes(bytes),
        args.out.display(),
        started.elapsed().as_secs_f64(),
        export.manifest["transactionTime"].as_str().unwrap_or("(none)")
    );
    let mut failed = false;
    for file in export.files.iter().filter(|f| f.kind == FileKind::Error) {
        match std::fs::read_to_string(&file.path) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    eprintln!("server reported ({}): {}", file.path.display(), bulk::summarize(line));
                }
            }
            Err(e) => eprintln!("cannot read {}: {e}", file.path.display()),
        }
    }
    if args.validate {
        match validate(&outputs) {
            Ok(0) => println!("validated {resources} resources: all valid"),
            Ok(invalid) => {
                println!("validated {resources} resources: {invalid} invalid");
                failed = true;
            }
            Err(e) => {
                eprintln!("iop-gateway export: {e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// The client of the server: our key (from `--key` or the configuration's data folder) and where to get tokens.
fn connect(args: &Args) -> Result<FhirClient, String> {
    // This gateway's configuration supplies what is not given: its URL and the key `clients add` wrote.
    let loaded = match (&args.url, &args.key) {
        (Some(_), Some(_)) => None,
        _ => Some(super::token::load_config(args.config.as_deref()).map_err(|e| format!("{e} (or give --url and --key)"))?),
    };
    let configured = || loaded.as_ref().ok_or_else(|| "no configuration was read".to_string());
    let url = match &args.url {
        Some(url) => url.clone(),
        None => super::token::configured_base(configured()?),
    };
    let key_path = match &args.key {
        Some(path) => path.clone(),
        None => super::token::client_key_path(configured()?, &args.client),
    };
    let pem = std::fs::read_to_string(&key_path).map_err(|e| format!("cannot read the key {}: {e}", key_path.display()))?;
    let key = match &args.kid {
        Some(kid) => KeyPair::from_pem(&pem, kid),
        None => KeyPair::from_pem_thumbprinted(&pem),
    };
    let key = key.map_err(|e| format!("{}: {e}", key_path.display()))?;
    let credentials = Credentials::Smart { key, client_id: args.client.clone(), scopes: args.scope.clone() };
    let transport = Transport { timeout: Some(Duration::from_secs(300)), ca_file: args.ca.as_deref(), client_identity: None };
    FhirClient::new(&url, credentials, args.token_endpoint.clone(), &transport)
}

/// Checks every line of the output files; prints the first problems found and returns how many resources were invalid.
fn validate(files: &[&bulk::File]) -> Result<u64, String> {
    let validator = Validator::new(Arc::new(Definitions::new_with_exchange_packages()));
    let mut invalid = 0u64;
    let mut shown = 0;
    for file in files {
        let reader = std::io::BufReader::new(std::fs::File::open(&file.path).map_err(|e| format!("cannot read {}: {e}", file.path.display()))?);
        for (n, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("cannot read {}: {e}", file.path.display()))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let report = validator.validate_bytes(&line, &[]);
            if report.is_valid() {
                continue;
            }
            invalid += 1;
            for issue in report.issues.iter().filter(|i| i.severity.is_error()) {
                if shown < 20 {
                    eprintln!("{}:{}: {} {} at {}: {}", file.path.display(), n + 1, issue.severity.as_str(), issue.code.as_str(), issue.expression, issue.message);
                    shown += 1;
                }
            }
        }
    }
    Ok(invalid)
}

/// Progress on stderr: one line rewritten in place on a terminal, a line per step otherwise.
struct Display {
    terminal: bool,
    last: Instant,
    dirty: bool,
}

impl Display {
    fn new() -> Display {
        Display { terminal: std::io::stderr().is_terminal(), last: Instant::now(), dirty: false }
    }

    fn show(&mut self, event: Event) {
        let transient = matches!(event, Event::Downloading { .. } | Event::Waiting { .. });
        let line = match event {
            Event::KickedOff { status_url } => format!("export started; status at {status_url}"),
            Event::Resumed { status_url } => format!("resuming the export at {status_url}"),
            Event::Waiting { progress, next } => format!("waiting for the server ({}); next check in {} s", progress.unwrap_or("in progress"), next.as_secs()),
            Event::Manifest { files } => format!("the export is ready: {files} files"),
            Event::Downloading { file, resources, bytes } => {
                if self.last.elapsed() < Duration::from_millis(200) || !self.terminal {
                    return;
                }
                format!("{file}: {resources} resources, {}", megabytes(bytes))
            }
            Event::Downloaded { file, resources, bytes, resumed } => {
                format!("{file}: {resources} resources, {}{}", megabytes(bytes), if resumed { " (already here)" } else { "" })
            }
        };
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            if !transient {
                let _ = writeln!(err);
            }
            self.dirty = transient;
        } else {
            let _ = writeln!(err, "{line}");
        }
        self.last = Instant::now();
    }

    fn finish(&mut self) {
        if self.dirty {
            eprintln!();
        }
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1_000_000.0)
}
