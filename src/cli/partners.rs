//! `iop-gateway partners add NAME --kind KIND --fhir-base URL`: registers a partner the gateway sends to — writes our key pair for it under `<data_dir>/partners/`, appends its `[[partners]]` entry to the configuration, and prints the public JWKS the partner registers for us.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::clients::{append_entry, config_to_edit, relative_to, toml_string, write_key_pair};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a partner to send to: generate our ES384 key pair for it, add it to the configuration, print our JWKS.
    Add(AddArgs),
}

#[derive(clap::Args)]
struct AddArgs {
    /// The partner's name (configuration, logs, outbox).
    name: String,
    /// payer, inpatient-unit or outpatient-provider.
    #[arg(long)]
    kind: String,
    /// The partner's FHIR base URL.
    #[arg(long)]
    fhir_base: String,
    /// smart (default: our key pair, SMART Backend Services), bearer or none.
    #[arg(long, default_value = "smart")]
    auth: String,
    /// The id the partner knows us by (iss and sub of our client assertions); default: NAME.
    #[arg(long)]
    client_id: Option<String>,
    /// Inbound clients ([[clients]] ids) that speak for the same organization.
    #[arg(long = "client")]
    clients: Vec<String>,
    /// Record values that send a record to this partner (a payer: payer_id of authorizations).
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Inpatient units: how the unit hears about its referrals, task (PUT of its Task) or message (feedback messages).
    #[arg(long)]
    referral_updates: Option<String>,
    /// For --auth bearer: the environment variable that will hold the token.
    #[arg(long)]
    bearer_token_env: Option<String>,
    /// Configuration file to add the partner to (created if missing). Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    match args.command {
        Command::Add(add) => match self::add(add) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iop-gateway partners add: {e}");
                ExitCode::from(super::EXIT_USAGE)
            }
        },
    }
}

fn add(args: AddArgs) -> Result<(), String> {
    if !matches!(args.kind.as_str(), "payer" | "inpatient-unit" | "outpatient-provider") {
        return Err(format!("unknown kind '{}' (payer, inpatient-unit, outpatient-provider)", args.kind));
    }
    if let Some(updates) = &args.referral_updates
        && !(args.kind == "inpatient-unit" && matches!(updates.as_str(), "task" | "message"))
    {
        return Err(format!("--referral-updates '{updates}': task or message, for an inpatient-unit partner"));
    }
    if !matches!(args.auth.as_str(), "smart" | "bearer" | "none") {
        return Err(format!("unknown auth '{}' (smart, bearer, none)", args.auth));
    }
    let (path, config_dir, loaded) = config_to_edit(args.config.as_deref())?;
    if loaded.config.partners.iter().any(|p| p.name == args.name) {
        return Err(format!("a partner named '{}' is already configured in {}", args.name, path.display()));
    }
    let mut entry = format!(
        "\n[[partners]]\nname = {}\nkind = \"{}\"\nfhir_base = {}\nauth = \"{}\"\n",
        toml_string(&args.name),
        args.kind,
        toml_string(&args.fhir_base),
        args.auth
    );
    let list = |items: &[String]| format!("[{}]", items.iter().map(|i| toml_string(i)).collect::<Vec<_>>().join(", "));
    if !args.routes.is_empty() {
        entry.push_str(&format!("routes = {}\n", list(&args.routes)));
    }
    if !args.clients.is_empty() {
        entry.push_str(&format!("clients = {}\n", list(&args.clients)));
    }
    if let Some(id) = &args.client_id {
        entry.push_str(&format!("client_id = {}\n", toml_string(id)));
    }
    if let Some(updates) = &args.referral_updates {
        entry.push_str(&format!("referral_updates = \"{updates}\"\n"));
    }
    if let Some(var) = &args.bearer_token_env {
        entry.push_str(&format!("bearer_token_env = {}\n", toml_string(var)));
    }
    let mut key = None;
    if args.auth == "smart" {
        let dir = loaded.config.store.data_dir.join("partners");
        let (pair, key_file, jwks_file) = write_key_pair(&dir, &args.name)?;
        entry.push_str(&format!("key_file = {}\n", toml_string(&relative_to(&key_file, &config_dir).display().to_string())));
        key = Some((key_file, jwks_file, pair.jwks_json()));
    }
    // A bearer token's variable may be set only where the gateway runs.
    append_entry(&path, &config_dir, &entry, |problem| args.auth == "bearer" && problem.contains("bearer_token_env"))?;
    println!("added partner '{}' ({}, {}) to {}", args.name, args.kind, args.fhir_base, path.display());
    if let Some((key_file, jwks_file, jwks)) = key {
        println!("  our private key  {} (stays here; keep it secret)", key_file.display());
        println!("  our public JWKS  {}", jwks_file.display());
        println!("register this JWKS at the partner for client id '{}':", args.client_id.as_deref().unwrap_or(&args.name));
        println!("{jwks}");
    }
    Ok(())
}
