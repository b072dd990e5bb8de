//! `iop-gateway check-config`: validates a configuration offline (file, environment, TLS files, clients' JWKS files, partner keys) and prints what it would run with.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, Config, Overrides};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML). Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml if it exists, else built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let file = Config::locate(args.config.as_deref(), &env);
    let loaded = match Config::load(file.as_deref(), &config::process_env(), &Overrides::default()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if let Some(tls) = &loaded.config.server.tls
        && let Err(e) = crate::server::tls_server_config(tls)
    {
        eprintln!("invalid configuration:\n  - server.tls: {e}");
        return ExitCode::from(1);
    }
    let c = &loaded.config;
    let source = loaded.file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
    println!("configuration OK ({source})");
    println!("  listen     {} ({})", loaded.listen, if c.server.tls.is_some() { "TLS" } else { "plain HTTP" });
    if let Some(tls) = &c.server.tls {
        println!("  mutual TLS {}", if tls.client_ca.is_some() { "required" } else { "off" });
    }
    println!("  base URL   {}", c.server.base_url.as_deref().unwrap_or("from each request (Host; trusted proxies' forwarded headers)"));
    if let Some(warning) = loaded.base_url_warning() {
        println!("  warning    {warning}");
    }
    match &c.store.url {
        Some(_) => println!("  store      PostgreSQL{}", c.store.schema.as_deref().map(|s| format!(" (schema {s})")).unwrap_or_default()),
        None => println!("  store      SQLite in {}", c.store.data_dir.display()),
    }
    println!("  clients    {}", c.clients.len());
    for client in &c.clients {
        let keys = match (&client.jwks_file, &client.jwks_url) {
            (Some(file), _) => format!("keys {}", file.display()),
            (None, Some(url)) => format!("keys fetched from {url}"),
            (None, None) => "keys inline".to_string(),
        };
        let organization = match c.answered_facility(client) {
            Some(facility) => format!("the Organization of receiving facility {facility}"),
            None => client.organization(&c.gateway),
        };
        println!("    {} ({}, {organization}, {keys})", client.id, client.role);
        if client.role == crate::auth::Role::OutpatientProvider && client.organization.is_none() && c.answered_facility(client).is_none() {
            println!(
                "  warning    {}: no outpatient-provider partner names this client, so it acts for Organization/{} and cannot update the step-down referral Tasks it receives; tie it: partners add NAME --kind outpatient-provider --route FACILITY --client {}",
                client.id, client.id, client.id
            );
        }
    }
    println!("  partners   {}", c.partners.len());
    for p in &c.partners {
        let kind = serde_json::to_value(p.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let auth = serde_json::to_value(p.auth).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let routes = if p.routes.is_empty() { String::new() } else { format!(", routes {}", p.routes.join(" ")) };
        println!("    {} ({kind}, {}, auth {auth}{routes})", p.name, p.fhir_base);
    }
    let mappings = c.mappings.dir.as_ref().map_or("compiled in".to_string(), |d| d.display().to_string());
    println!("  mappings   {mappings}");
    println!("  outbox     {}", if c.outbox.enabled { "delivering" } else { "not delivering (outbox.enabled = false)" });
    ExitCode::SUCCESS
}
