//! `iop-gateway clients add NAME --role ROLE`: registers a partner — its own public JWKS (`--jwks FILE`, copied after it is checked, or `--jwks-url URL`), else a key pair generated for it and named by its RFC 7638 thumbprint — and appends its `[[clients]]` entry to the configuration file; key files go beside the configuration (its data folder). `iop-gateway clients revoke NAME`: deletes the partner's access tokens from the store.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use crate::auth::Role;
use crate::auth::keys::KeyPair;
use crate::config::{self, Config, Loaded, Overrides};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a partner: its public JWKS (--jwks FILE or --jwks-url URL), or else a generated ES384 key pair
    /// (NAME.key.pem and NAME.jwks.json, key id = RFC 7638 thumbprint); add it to the configuration.
    Add(AddArgs),
    /// Revoke a partner's access tokens: delete them from the store. Running instances stop honouring
    /// them within auth.token_cache_ttl_secs. The partner can still ask for new tokens unless its
    /// [[clients]] entry (or key) is removed and the gateway restarted.
    Revoke(RevokeArgs),
}

#[derive(clap::Args)]
struct RevokeArgs {
    /// The client id.
    name: String,
    /// Configuration file naming the store. Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder of the embedded SQLite store (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct AddArgs {
    /// The client id.
    name: String,
    /// inpatient-unit, payer, outpatient-provider, clinic or admin.
    #[arg(long)]
    role: String,
    /// Configuration file to add the client to (created if missing). Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder for the key files (default: <store.data_dir>/clients, data_dir relative to the configuration file).
    #[arg(long)]
    keys_dir: Option<PathBuf>,
    /// The partner's own public JWKS file: checked (public RS384/ES384 signing keys only) and copied to the keys folder.
    #[arg(long, conflicts_with = "jwks_url")]
    jwks: Option<PathBuf>,
    /// The URL where the partner publishes its JWKS (https, or http to loopback): fetched once now to check it,
    /// then by the gateway when needed.
    #[arg(long)]
    jwks_url: Option<String>,
    /// The partner's Organization reference (default: Organization/NAME; a clinic defaults to the gateway's).
    #[arg(long)]
    organization: Option<String>,
}

pub fn run(args: Args) -> ExitCode {
    match args.command {
        Command::Revoke(revoke) => match self::revoke(revoke) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iop-gateway clients revoke: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Add(add) => match self::add(add) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iop-gateway clients add: {e}");
                ExitCode::from(super::EXIT_USAGE)
            }
        },
    }
}

fn add(args: AddArgs) -> Result<(), String> {
    let role = Role::parse(&args.role).ok_or_else(|| format!("unknown role '{}' (inpatient-unit, payer, outpatient-provider, clinic, admin)", args.role))?;
    let (path, config_dir, loaded) = config_to_edit(args.config.as_deref())?;
    if loaded.config.clients.iter().any(|c| c.id == args.name) {
        return Err(format!("a client named '{}' is already registered in {}", args.name, path.display()));
    }
    let keys_dir = args.keys_dir.unwrap_or_else(|| loaded.config.store.data_dir.join("clients"));
    let mut entry = format!("\n[[clients]]\nid = {}\nrole = \"{}\"\n", toml_string(&args.name), role.as_str());
    if let Some(org) = &args.organization {
        entry.push_str(&format!("organization = {}\n", toml_string(org)));
    }
    let mut report = Vec::new();
    if let Some(url) = &args.jwks_url {
        config::check_jwks_url(url).map_err(|e| format!("--jwks-url: {e}"))?;
        let (keys, left_out) = fetch_jwks(url)?;
        entry.push_str(&format!("jwks_url = {}\n", toml_string(url)));
        report.push(format!("  public JWKS  {url} ({} usable key(s){})", keys, left_out.iter().map(|w| format!("; left out: {w}")).collect::<String>()));
    } else {
        let jwks_file = match &args.jwks {
            Some(source) => {
                let text = std::fs::read_to_string(source).map_err(|e| format!("cannot read {}: {e}", source.display()))?;
                crate::auth::ClientKeys::parse(&text).map_err(|e| format!("{}: {e}", source.display()))?;
                std::fs::create_dir_all(&keys_dir).map_err(|e| format!("cannot create {}: {e}", keys_dir.display()))?;
                let copy = keys_dir.join(format!("{}.jwks.json", args.name));
                write_new(&copy, &text, false)?;
                copy
            }
            None => {
                let (_, key_file, jwks_file) = write_key_pair(&keys_dir, &args.name)?;
                report.push(format!("  private key  {} (give it to the partner; keep it secret)", key_file.display()));
                jwks_file
            }
        };
        entry.push_str(&format!("jwks_file = {}\n", toml_string(&relative_to(&jwks_file, &config_dir).display().to_string())));
        report.push(format!("  public JWKS  {}", jwks_file.display()));
    }
    append_entry(&path, &config_dir, &entry, |_| false)?;
    println!("registered '{}' ({}) in {}", args.name, role.as_str(), path.display());
    for line in report {
        println!("{line}");
    }
    Ok(())
}

/// Fetches a JWKS URL once through the partner layer: how many keys it holds that the gateway can use, and the others.
fn fetch_jwks(url: &str) -> Result<(usize, Vec<String>), String> {
    crate::server::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (keys, left_out) = runtime.block_on(crate::partner::jwks::fetch_once(url)).map_err(|e| format!("--jwks-url: {e}"))?;
    Ok((keys.len(), left_out))
}

fn revoke(args: RevokeArgs) -> Result<(), String> {
    super::with_store(args.config.as_deref(), args.data_dir, async |loaded, store| {
        let revoked = store.revoke_tokens(&args.name).await.map_err(|e| e.to_string())?;
        let ttl = loaded.config.auth.token_cache_ttl_secs;
        println!("revoked {revoked} access token(s) of '{}'; running gateways stop honouring them within {ttl} s", args.name);
        if !loaded.config.clients.iter().any(|c| c.id == args.name) {
            println!("  note: '{}' is not registered in this configuration", args.name);
        }
        Ok(())
    })
}

/// The configuration file `add` commands edit (`--config`, else `$IOP_GATEWAY_CONFIG`, else
/// `./gateway.toml`; it may not exist yet), the folder its relative paths start from, and what it
/// holds now.
pub(super) fn config_to_edit(config: Option<&Path>) -> Result<(PathBuf, PathBuf, Loaded), String> {
    let env = |name: &str| std::env::var(name).ok();
    let path = Config::locate(config, &env).unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_FILE));
    let config_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    // A file not written yet still has its folder: relative paths (data_dir, key files) start there, not here.
    let loaded = if path.is_file() { Config::load(Some(&path), &[], &Overrides::default()) } else { Config::from_toml("", &config_dir) };
    Ok((path, config_dir, loaded.map_err(|e| e.to_string())?))
}

/// A new ES384 key pair named by its RFC 7638 thumbprint, written to `dir` as `NAME.key.pem`
/// (private, owner-only) and `NAME.jwks.json`; returns it with the two paths. Neither file may exist yet.
pub(super) fn write_key_pair(dir: &Path, name: &str) -> Result<(KeyPair, PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let pair = KeyPair::generate_thumbprinted().map_err(|e| e.to_string())?;
    let key_file = dir.join(format!("{name}.key.pem"));
    let jwks_file = dir.join(format!("{name}.jwks.json"));
    write_new(&key_file, &pair.private_pem, true)?;
    write_new(&jwks_file, &pair.jwks_json(), false)?;
    Ok((pair, key_file, jwks_file))
}

/// Appends an entry to the configuration file (created if missing), after checking that the result
/// loads: a registration must never leave a configuration that does not. `tolerated` names a
/// problem that may remain (one only the running gateway's environment can settle).
pub(super) fn append_entry(path: &Path, config_dir: &Path, entry: &str, tolerated: impl Fn(&str) -> bool) -> Result<(), String> {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    if text.is_empty() {
        text.push_str("# iop-gateway configuration; see config/gateway.example.toml for every setting.\n");
    }
    text.push_str(entry);
    if let Err(e) = Config::from_toml(&text, config_dir)
        && !tolerated(&e.to_string())
    {
        return Err(format!("the new configuration would not be valid: {e}"));
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes a file that must not exist yet (a registration never overwrites keys); `private` ones are owner-only.
fn write_new(path: &Path, text: &str, private: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub(super) fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (path, base) = (absolute(path), absolute(base));
    path.strip_prefix(&base).map(Path::to_path_buf).unwrap_or(path)
}

pub(super) fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}
