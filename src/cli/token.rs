//! `iop-gateway token --client NAME`: signs a client assertion with the partner's private key, exchanges it at the running gateway's token endpoint, and prints the access token.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::auth::keys::{KeyPair, sign_assertion};
use crate::config::{self, Config, Overrides};

#[derive(clap::Args)]
pub struct Args {
    /// The client id, as registered with `clients add`.
    #[arg(long)]
    client: String,
    /// Configuration file the client is registered in. Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The client's private key (default: <store.data_dir>/clients/NAME.key.pem).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The gateway's base URL (default: server.base_url, else http(s)://server.listen).
    #[arg(long)]
    url: Option<String>,
    /// Scopes to ask for (default: all the client may be granted).
    #[arg(long)]
    scope: Option<String>,
    /// A PEM CA certificate to trust for an https gateway (default: the system's roots).
    #[arg(long)]
    ca: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    match token(args) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iop-gateway token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: Args) -> Result<String, String> {
    crate::server::install_crypto_provider();
    let loaded = load_config(args.config.as_deref())?;
    let client = loaded.config.clients.iter().find(|c| c.id == args.client).ok_or_else(|| format!("no client '{}' in the configuration", args.client))?;
    let key_path = args.key.unwrap_or_else(|| client_key_path(&loaded, &args.client));
    let pem = std::fs::read_to_string(&key_path).map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
    let pair = KeyPair::from_pem_thumbprinted(&pem).map_err(|e| e.to_string())?;
    let base = args.url.unwrap_or_else(|| configured_base(&loaded));
    let token_url = format!("{}{}", base.trim_end_matches('/'), crate::auth::TOKEN_PATH);
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = sign_assertion(&pair, &args.client, &token_url, &uuid::Uuid::new_v4().to_string(), now + 240).map_err(|e| e.to_string())?;
    let scope = args.scope.unwrap_or_else(|| client.allowed_scopes().to_string());
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = &args.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
        builder = builder.add_root_certificate(cert);
    }
    let http = builder.build().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let response = http
            .post(&token_url)
            .form(&crate::auth::token_request_form(assertion.as_str(), scope.as_str()))
            .send()
            .await
            .map_err(|e| format!("cannot reach {token_url}: {e}"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| format!("the token endpoint did not answer JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!("{status}: {} {}", body["error"].as_str().unwrap_or_default(), body["error_description"].as_str().unwrap_or_default()));
        }
        body["access_token"].as_str().map(str::to_string).ok_or_else(|| "no access_token in the answer".to_string())
    })
}

/// The running gateway's base URL as its configuration names it: `server.base_url`, else the listen address.
pub(super) fn configured_base(loaded: &config::Loaded) -> String {
    loaded.config.server.base_url.clone().unwrap_or_else(|| {
        let scheme = if loaded.config.server.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", loaded.listen)
    })
}

/// The gateway's configuration as `serve` reads it (file from `--config`, `$IOP_GATEWAY_CONFIG` or `./gateway.toml`, then the environment).
pub(super) fn load_config(path: Option<&std::path::Path>) -> Result<config::Loaded, String> {
    let env = |name: &str| std::env::var(name).ok();
    let file = Config::locate(path, &env);
    Config::load(file.as_deref(), &config::process_env(), &Overrides::default()).map_err(|e| e.to_string())
}

/// Where `clients add` wrote a client's private key: `<store.data_dir>/clients/NAME.key.pem`.
pub(super) fn client_key_path(loaded: &config::Loaded, client: &str) -> PathBuf {
    loaded.config.store.data_dir.join("clients").join(format!("{client}.key.pem"))
}
