//! The gateway's one typed configuration: a TOML file, then `IOP_GATEWAY__SECTION__KEY` environment overrides, then command-line flags, all validated before any port is bound.
//!
//! Every field's doc comment is its documentation; `config/gateway.example.toml` repeats them as
//! comments and a test checks that the example parses. Unknown keys are refused everywhere (a typo
//! must not silently fall back to a default), including in environment overrides.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{Role, ScopeSet};

/// Prefix of environment variables that override configuration keys (`IOP_GATEWAY__SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "IOP_GATEWAY__";

/// Environment variable naming the configuration file when `--config` is not given.
pub const ENV_CONFIG_FILE: &str = "IOP_GATEWAY_CONFIG";

/// The file `serve` and `clients add` use when neither `--config` nor `IOP_GATEWAY_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "gateway.toml";

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening, TLS and request limits.
    pub server: ServerConfig,
    /// Where resources, history and audit are kept.
    pub store: StoreConfig,
    /// Access tokens issued by the token endpoint.
    pub auth: AuthConfig,
    /// The program this gateway belongs to.
    pub gateway: GatewayConfig,
    /// Logging.
    pub log: LogConfig,
    /// Registered partners (SMART Backend Services clients).
    pub clients: Vec<ClientConfig>,
    /// Partners the gateway sends to (payers, inpatient units, outpatient providers).
    pub partners: Vec<PartnerConfig>,
    /// Outbound delivery.
    pub outbox: OutboxConfig,
    /// Where the mappings come from.
    pub mappings: MappingsConfig,
    /// When the gateway proposes extending a certification.
    pub utilization: UtilizationConfig,
    /// Bulk Data `$export`.
    pub export: ExportConfig,
    /// Topic-based Subscriptions partners create at the gateway (Subscriptions R5 Backport).
    pub topics: TopicsConfig,
}

/// What a partner the gateway sends to is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartnerKind {
    Payer,
    InpatientUnit,
    OutpatientProvider,
}

/// How the gateway authenticates at a partner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartnerAuth {
    /// SMART Backend Services, the gateway as the client (`private_key_jwt` with our key pair).
    #[default]
    Smart,
    /// A static bearer token, read from an environment variable.
    Bearer,
    /// No authentication (a partner on a private network, or tests).
    None,
}

/// A partner the gateway sends to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// The partner's name in the configuration, logs, metrics and the outbox.
    pub name: String,
    pub kind: PartnerKind,
    /// The partner's FHIR base URL (`https://…/fhir`).
    pub fhir_base: String,
    /// The record values that send a record to this partner: for a payer, the `payer_id` of authorization records;
    /// for an outpatient provider, the `receiving_facility.id` of step-down referrals.
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub auth: PartnerAuth,
    /// The id the partner knows us by (`iss` and `sub` of our client assertions). Default: the partner's name.
    pub client_id: Option<String>,
    /// Our private key for this partner (PEM; relative to the configuration file). Default: `<data_dir>/partners/NAME.key.pem`.
    pub key_file: Option<PathBuf>,
    /// The partner's token endpoint. Default: discovered from `<fhir_base>/.well-known/smart-configuration`.
    pub token_endpoint: Option<String>,
    /// Scopes to ask the partner for. Default: `system/Claim.c system/ClaimResponse.r system/Subscription.cr` for a payer (the PAS Subscription for pended decisions), `system/*.cruds` otherwise.
    pub scopes: Option<String>,
    /// For `auth = "bearer"`: the environment variable holding the token (never the token itself in the file).
    pub bearer_token_env: Option<String>,
    /// Inbound clients (`[[clients]]` ids) that speak for the same organization.
    #[serde(default)]
    pub clients: Vec<String>,
    /// A PEM CA certificate to trust for this partner (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate and key for mutual TLS with this partner.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Seconds an attempt may take before it counts as a timeout (retried).
    #[serde(default = "default_partner_timeout")]
    pub timeout_secs: u64,
    /// Milliseconds before the first retry; each later one waits twice as long, up to `max_backoff_secs`.
    #[serde(default = "default_first_retry")]
    pub first_retry_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
    /// A message older than this many seconds becomes a dead letter instead of being retried (default: retried without limit).
    pub max_age_secs: Option<u64>,
    /// Payers only: send the extension requests the utilization rule makes at once, instead of holding them for the clinic to confirm.
    #[serde(default)]
    pub auto_extend: bool,
    /// Payers only: while the gateway's PAS Subscription there is in error, seconds between `Claim/$inquire` calls for each pended authorization.
    #[serde(default = "default_inquire_interval")]
    pub inquire_interval_secs: u64,
    /// Inpatient units only: how the unit hears back about the referrals its clients send.
    #[serde(default)]
    pub referral_updates: ReferralUpdates,
}

/// How a referring unit is told about its referral's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferralUpdates {
    /// `PUT` of the updated Task at the unit's FHIR base (the Task as the unit sent it, with its progress).
    #[default]
    Task,
    /// A feedback message to the unit's `$process-message`, its MessageHeader `response` naming the referral message.
    Message,
}

fn default_partner_timeout() -> u64 {
    30
}

fn default_first_retry() -> u64 {
    1000
}

fn default_max_backoff() -> u64 {
    60
}

fn default_inquire_interval() -> u64 {
    900
}

/// The delivery worker inside `serve`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Whether `serve` runs the delivery worker (several instances over one PostgreSQL may all run it).
    pub enabled: bool,
    /// Milliseconds between looks at the queue when nothing woke the worker.
    pub poll_interval_ms: u64,
    /// Seconds a worker holds a message it is sending before another instance may take it over.
    pub lease_secs: u64,
    /// Messages sent at once, over all partners.
    pub concurrency: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { enabled: true, poll_interval_ms: 500, lease_secs: 120, concurrency: 16 }
    }
}

/// Partners' topic-based Subscriptions ([`crate::exchange::topics`]): how notifications are retried and when a Subscription goes to `error`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Failed deliveries in a row (no answer, 408/429/5xx, or a refusal) after which a Subscription goes to `error`:
    /// nothing more is sent until its client sets it back to `requested` (events keep their numbers for `$events`).
    pub error_after_failures: u32,
    /// Milliseconds before the first retry of a notification; each later one waits twice as long, up to `max_backoff_secs`.
    pub first_retry_ms: u64,
    pub max_backoff_secs: u64,
    /// Longest a notification attempt may take, in seconds (a Subscription's `backport-timeout` may ask for less).
    pub timeout_secs: u64,
    /// Shortest heartbeat period a Subscription may ask for, in seconds.
    pub min_heartbeat_secs: u64,
    /// Milliseconds between looks for idle Subscriptions that are due a heartbeat.
    pub heartbeat_check_ms: u64,
    /// Seconds this instance keeps its list of a topic's Subscriptions before reading it again (its own changes clear it at once;
    /// another instance's new Subscription takes events from this one after at most this long).
    pub cache_secs: u64,
    /// Most events one `$events` answer carries.
    pub max_events: usize,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            error_after_failures: 10,
            first_retry_ms: 1000,
            max_backoff_secs: 60,
            timeout_secs: 30,
            min_heartbeat_secs: 60,
            heartbeat_check_ms: 1000,
            cache_secs: 2,
            max_events: 100,
        }
    }
}

/// Bulk Data `$export` ([`crate::export`]): the worker inside `serve` and the files it writes under `<data_dir>/exports/`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Whether `serve` runs the export worker (several instances over one PostgreSQL may all run it).
    pub enabled: bool,
    /// Largest NDJSON file in bytes; a type with more starts another file.
    pub max_file_bytes: u64,
    /// Resources read from the store at a time (and written before the job's progress is committed).
    pub page_size: usize,
    /// Seconds a finished export's files stay available (the status' `Expires`).
    pub retention_secs: u64,
    /// Exports one client may have running at once; one more is refused with 429.
    pub max_running_per_client: usize,
    /// The `Retry-After` seconds of a status poll while running, and of that 429.
    pub retry_after_secs: u64,
    /// Seconds a worker holds a job between pages before another instance may resume it.
    pub lease_secs: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig { enabled: true, max_file_bytes: 100 * 1024 * 1024, page_size: 1000, retention_secs: 3600, max_running_per_client: 1, retry_after_secs: 5, lease_secs: 60 }
    }
}

/// The utilization rule ([`crate::exchange::utilization`]): attended session days counted against each certification.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UtilizationConfig {
    /// Whether intake looks at certifications at all.
    pub enabled: bool,
    /// Propose an extension when fewer certified days than this remain.
    pub remaining_days_below: u32,
    /// Propose an extension when the certified end is this many days or fewer after the client's latest session.
    pub days_before_end: u32,
}

impl Default for UtilizationConfig {
    fn default() -> Self {
        UtilizationConfig { enabled: true, remaining_days_below: 3, days_before_end: 5 }
    }
}

/// Where the mappings come from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingsConfig {
    /// A mappings folder (record schemas and mapping files) to use instead of the ones compiled into the binary.
    pub dir: Option<PathBuf>,
    /// A DS4P label rule file (the shape of the repository's `labels/part2.toml`) to use instead of the one compiled in.
    pub labels: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on. Loopback by default.
    pub listen: String,
    /// Public base URL of the FHIR endpoint (Location headers, Bundle fullUrls, the token endpoint's
    /// audience). Default: taken from each request (`Host`, or a trusted proxy's forwarded headers),
    /// else `http(s)://` + the address the connection reached.
    pub base_url: Option<String>,
    /// Proxies (IP addresses or CIDR ranges) whose `Forwarded` / `X-Forwarded-Proto`, `-Host` and
    /// `-Prefix` headers say what address the client used; ignored from anyone else, and when
    /// `base_url` is set.
    pub trusted_proxies: Vec<String>,
    /// Serve plain HTTP on a non-loopback address (only behind a TLS-terminating proxy). Plain HTTP
    /// on loopback is always allowed.
    pub allow_plain_http: bool,
    /// TLS; when absent the gateway speaks plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Time a request may take before it is answered with 408.
    pub request_timeout_secs: u64,
    /// Authenticated requests (a valid bearer token) handled at once; more get 503 at once rather than queueing.
    pub max_concurrent_requests: usize,
    /// Unauthenticated requests (the token endpoint, discovery, anything without a valid bearer token)
    /// handled at once; a budget of their own, so anonymous traffic cannot take the partners' slots. More get 503.
    pub max_unauthenticated_requests: usize,
    /// Connections held open at once; beyond it new connections wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also how long an idle keep-alive connection stays open);
    /// a slower connection is closed.
    pub header_read_timeout_secs: u64,
    /// Time a client has to send a request's body, from the end of its headers; a slower sender gets 408.
    pub body_read_timeout_secs: u64,
    /// Requests one client may have in flight; more get 429.
    pub max_concurrent_requests_per_client: usize,
    /// After a shutdown signal, how long in-flight requests may take to finish.
    pub shutdown_grace_secs: u64,
    /// Largest `_count` a search may ask for.
    pub max_page_size: usize,
    /// Page size when a search gives no `_count`.
    pub default_page_size: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            base_url: None,
            trusted_proxies: Vec::new(),
            allow_plain_http: false,
            tls: None,
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 30,
            max_concurrent_requests: 256,
            max_unauthenticated_requests: 32,
            max_connections: 1024,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 15,
            max_concurrent_requests_per_client: 32,
            shutdown_grace_secs: 20,
            max_page_size: 200,
            default_page_size: 50,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file with the CA certificates partner client certificates must chain to. When set,
    /// every connection must present a valid client certificate (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder for the embedded SQLite database (`gateway.db`) and partner key files.
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL instead of the embedded SQLite file.
    pub url: Option<String>,
    /// PostgreSQL schema to keep the tables in (created when missing). Default: the server's search path.
    pub schema: Option<String>,
    /// Database connections in the pool (SQLite: readers; writes always go through one connection).
    pub max_connections: u32,
    /// How long a request waits for a free database connection before it gets 503.
    pub acquire_timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { data_dir: PathBuf::from("data"), url: None, schema: None, max_connections: 8, acquire_timeout_secs: 10 }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of access tokens issued by the token endpoint.
    pub access_token_lifetime_secs: u64,
    /// Clock skew tolerated when checking a client assertion's `exp`, `nbf` and `iat`.
    pub clock_skew_secs: u64,
    /// How long a running instance trusts an access token it looked up before asking the store again;
    /// a revoked token (`iop-gateway clients revoke`) stops working on every instance within it. 0: no cache.
    pub token_cache_ttl_secs: u64,
    /// How long a JWKS fetched from a client's `jwks_url` is used before it is fetched again, when its
    /// answer gives no `Cache-Control: max-age` (a `max-age` is honoured between `jwks_refresh_min_secs` and a day).
    pub jwks_cache_secs: u64,
    /// Least time between two fetches of one client's `jwks_url`: an assertion naming a `kid` the cached set
    /// lacks fetches it again only this long after the last fetch, so a flood of made-up key ids cannot
    /// make the gateway hammer the partner's URL.
    pub jwks_refresh_min_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { access_token_lifetime_secs: 300, clock_skew_secs: 30, token_cache_ttl_secs: 30, jwks_cache_secs: 300, jwks_refresh_min_secs: 30 }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Reference to the Organization of the program that runs this gateway; everything partners
    /// send is addressed to it, so its clinic clients see it.
    pub organization: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig { organization: "Organization/iop-program".into() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human readable) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `iop_gateway=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One registered partner.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client id (`iss` and `sub` of its client assertions).
    pub id: String,
    /// What the partner is: `inpatient-unit`, `payer`, `outpatient-provider`, `clinic` or `admin`.
    pub role: Role,
    /// Reference to the partner's Organization; it sees resources addressed to it. Default:
    /// `Organization/<id>`, or the gateway's organization for a `clinic`.
    pub organization: Option<String>,
    /// Scopes the client may be granted (SMART v1 `system/Type.read|write|*` or v2
    /// `system/Type.cruds`). Default: the role's scopes.
    pub scopes: Option<Vec<String>>,
    /// The client's public keys as a JWKS JSON text.
    pub jwks: Option<String>,
    /// A file holding the client's JWKS (relative to the configuration file).
    pub jwks_file: Option<PathBuf>,
    /// A URL where the partner publishes its JWKS (https, or http to a loopback address): fetched
    /// when first needed, cached (`auth.jwks_cache_secs`, or the answer's `max-age`), fetched again
    /// for an unknown `kid` at most once per `auth.jwks_refresh_min_secs`, and used from the cache while the URL is down.
    pub jwks_url: Option<String>,
    /// URL prefixes (https, or http to a loopback address) the client's own endpoints must start with: its
    /// Subscriptions' `channel.endpoint`, and where replies to its messages go. Nothing else is called back.
    #[serde(default)]
    pub callbacks: Vec<String>,
    /// Why this partner receives data, for the consent decision on 42 CFR Part 2 records:
    /// `treatment`, `payment` or `operations`. Default by role: inpatient unit and clinic
    /// treatment, payer payment, admin operations.
    pub purpose: Option<String>,
}

/// Why a configuration was refused; every problem found is listed, not only the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Command-line values that win over the file and the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// A loaded configuration with what was derived from it while validating.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Each client's JWKS as parsed JSON text, in `config.clients` order.
    pub client_keys: Vec<String>,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<Cidr>,
}

impl Loaded {
    /// What to warn about at start: a wildcard address without `base_url` leaves every link to the
    /// `Host` each client sends, and makes the token endpoint accept only audiences it can check.
    pub fn base_url_warning(&self) -> Option<String> {
        (self.config.server.base_url.is_none() && self.listen.ip().is_unspecified()).then(|| {
            format!(
                "listening on {} without server.base_url: links follow each request's Host header, and clients reaching the gateway by a name must sign the token endpoint under an address it can check; set server.base_url to the public URL",
                self.listen
            )
        })
    }
}

/// An IP address range (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a range of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, Some(prefix.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Cidr { network: address, prefix })
    }

    /// Whether `ip` is in the range (an IPv4 address written as IPv6, `::ffff:a.b.c.d`, counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip.to_canonical() {
                IpAddr::V4(v4) => (u32::from(v4) as u128, 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((network, width), (candidate, candidate_width)) = (bits(self.network), bits(ip));
        if width != candidate_width {
            return false;
        }
        let shift = u32::from(width - self.prefix.min(width));
        network.checked_shr(shift).unwrap_or(0) == candidate.checked_shr(shift).unwrap_or(0)
    }
}

impl Config {
    /// Which file to read: the flag, then `IOP_GATEWAY_CONFIG`, then `./gateway.toml` when it exists.
    pub fn locate(flag: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        if let Some(path) = flag {
            return Some(path.to_path_buf());
        }
        if let Some(path) = env(ENV_CONFIG_FILE).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(path));
        }
        let default = PathBuf::from(DEFAULT_CONFIG_FILE);
        default.is_file().then_some(default)
    }

    /// Reads the file (if any), applies environment overrides from `env_vars` and the command-line
    /// overrides, and validates the result.
    pub fn load(file: Option<&Path>, env_vars: &[(String, String)], overrides: &Overrides) -> Result<Loaded, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?,
            None => String::new(),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Parse(format!("{}: {e}", file.map(|p| p.display().to_string()).unwrap_or_default()))
        })?;
        apply_env(&mut table, env_vars)?;
        let mut config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let origin = file.map(|p| p.display().to_string()).unwrap_or_else(|| "environment".into());
            ConfigError::Parse(format!("{origin}: {e}"))
        })?;
        let base = file.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths(&base);
        if let Some(listen) = &overrides.listen {
            config.server.listen = listen.clone();
        }
        if let Some(dir) = &overrides.data_dir {
            config.store.data_dir = dir.clone();
        }
        config.validate(file)
    }

    /// Parses a configuration text as a file would be (relative paths against `base`), without environment.
    pub fn from_toml(text: &str, base: &Path) -> Result<Loaded, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.resolve_paths(base);
        config.validate(None)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.store.data_dir);
        if let Some(tls) = &mut self.server.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
            if let Some(ca) = &mut tls.client_ca {
                resolve(ca);
            }
        }
        for client in &mut self.clients {
            if let Some(file) = &mut client.jwks_file {
                resolve(file);
            }
        }
        for partner in &mut self.partners {
            for file in [&mut partner.key_file, &mut partner.ca_file, &mut partner.client_cert, &mut partner.client_key].into_iter().flatten() {
                resolve(file);
            }
        }
        if let Some(dir) = &mut self.mappings.dir {
            resolve(dir);
        }
        if let Some(file) = &mut self.mappings.labels {
            resolve(file);
        }
    }

    fn validate(self, file: Option<&Path>) -> Result<Loaded, ConfigError> {
        let mut problems = Vec::new();
        let listen = match self.server.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!("server.listen: '{}' is not an address such as 127.0.0.1:8080", self.server.listen));
                None
            }
        };
        if let Some(addr) = listen
            && self.server.tls.is_none()
            && !addr.ip().is_loopback()
            && !self.server.allow_plain_http
        {
            problems.push(format!(
                "server.listen: {addr} is not a loopback address; configure [server.tls] or set server.allow_plain_http = true (only behind a TLS-terminating proxy)"
            ));
        }
        if let Some(base) = &self.server.base_url
            && !(base.starts_with("http://") || base.starts_with("https://"))
        {
            problems.push(format!("server.base_url: '{base}' must start with http:// or https://"));
        }
        let mut trusted_proxies = Vec::new();
        for (i, proxy) in self.server.trusted_proxies.iter().enumerate() {
            match Cidr::parse(proxy) {
                Some(cidr) => trusted_proxies.push(cidr),
                None => problems.push(format!("server.trusted_proxies[{i}]: '{proxy}' is not an IP address or a range such as 10.0.0.0/8")),
            }
        }
        if let Some(tls) = &self.server.tls {
            for (key, path) in [("cert", Some(&tls.cert)), ("key", Some(&tls.key)), ("client_ca", tls.client_ca.as_ref())] {
                if let Some(path) = path
                    && !path.is_file()
                {
                    problems.push(format!("server.tls.{key}: {} is not a readable file", path.display()));
                }
            }
        }
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("server.request_timeout_secs", self.server.request_timeout_secs),
            ("server.max_concurrent_requests", self.server.max_concurrent_requests as u64),
            ("server.max_concurrent_requests_per_client", self.server.max_concurrent_requests_per_client as u64),
            ("server.max_unauthenticated_requests", self.server.max_unauthenticated_requests as u64),
            ("server.max_connections", self.server.max_connections as u64),
            ("server.header_read_timeout_secs", self.server.header_read_timeout_secs),
            ("server.body_read_timeout_secs", self.server.body_read_timeout_secs),
            ("server.max_page_size", self.server.max_page_size as u64),
            ("server.default_page_size", self.server.default_page_size as u64),
            ("store.max_connections", u64::from(self.store.max_connections)),
            ("store.acquire_timeout_secs", self.store.acquire_timeout_secs),
            ("auth.access_token_lifetime_secs", self.auth.access_token_lifetime_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if self.server.default_page_size > self.server.max_page_size {
            problems.push("server.default_page_size: must not exceed server.max_page_size".into());
        }
        if self.server.max_unauthenticated_requests > self.server.max_connections {
            problems.push("server.max_unauthenticated_requests: must not exceed server.max_connections".into());
        }
        if self.auth.token_cache_ttl_secs > 300 {
            problems.push("auth.token_cache_ttl_secs: revocation must reach running instances quickly; at most 300".into());
        }
        if self.auth.clock_skew_secs > 300 {
            problems.push("auth.clock_skew_secs: at most 300".into());
        }
        if !(1..=3600).contains(&self.auth.jwks_refresh_min_secs) {
            problems.push(format!("auth.jwks_refresh_min_secs: {} is outside 1..=3600 seconds", self.auth.jwks_refresh_min_secs));
        }
        if !(self.auth.jwks_refresh_min_secs..=86_400).contains(&self.auth.jwks_cache_secs) {
            problems.push(format!("auth.jwks_cache_secs: {} must be between auth.jwks_refresh_min_secs and 86400", self.auth.jwks_cache_secs));
        }
        if self.auth.access_token_lifetime_secs > 3600 {
            problems.push("auth.access_token_lifetime_secs: backend-services tokens should be short-lived; at most 3600".into());
        }
        if let Some(url) = &self.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            problems.push("store.url: only postgres:// URLs are supported (leave it out for the embedded SQLite store)".into());
        }
        if let Some(schema) = &self.store.schema {
            if self.store.url.is_none() {
                problems.push("store.schema: only applies to PostgreSQL (store.url)".into());
            }
            if schema.is_empty() || !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                problems.push(format!("store.schema: '{schema}' must be letters, digits and underscores"));
            }
        }
        if !is_reference(&self.gateway.organization, "Organization") {
            problems.push(format!("gateway.organization: '{}' must look like Organization/<id>", self.gateway.organization));
        }
        if !matches!(self.log.level.as_str(), "") && tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!("log.level: '{}' is not a tracing filter", self.log.level));
        }
        let mut seen = BTreeSet::new();
        let mut client_keys = Vec::new();
        for (i, client) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}] ({})", client.id);
            if !is_name(&client.id) {
                problems.push(format!("{at}.id: must be 1-64 letters, digits, '-', '.' or '_'"));
            }
            if !seen.insert(client.id.clone()) {
                problems.push(format!("{at}.id: registered twice"));
            }
            if let Some(purpose) = &client.purpose
                && crate::auth::consent::Purpose::from_name(purpose).is_none()
            {
                problems.push(format!("{at}.purpose: '{purpose}' is not a purpose of use (treatment, payment or operations)"));
            }
            if let Some(org) = &client.organization
                && !is_reference(org, "Organization")
            {
                problems.push(format!("{at}.organization: '{org}' must look like Organization/<id>"));
            }
            if let Some(scopes) = &client.scopes
                && let Err(e) = ScopeSet::parse(&scopes.join(" "))
            {
                problems.push(format!("{at}.scopes: {e}"));
            }
            let (jwks, source) = match (&client.jwks, &client.jwks_file, &client.jwks_url) {
                (Some(text), None, None) => (Some(text.clone()), "jwks"),
                (None, Some(path), None) => match std::fs::read_to_string(path) {
                    Ok(text) => (Some(text), "jwks_file"),
                    Err(e) => {
                        problems.push(format!("{at}.jwks_file: cannot read {}: {e}", path.display()));
                        (None, "jwks_file")
                    }
                },
                (None, None, Some(url)) => {
                    if let Err(e) = check_jwks_url(url) {
                        problems.push(format!("{at}.jwks_url: {e}"));
                    }
                    (None, "jwks_url")
                }
                (None, None, None) => {
                    problems.push(format!("{at}: needs its public keys (jwks, jwks_file or jwks_url)"));
                    (None, "jwks")
                }
                _ => {
                    problems.push(format!("{at}: give one of jwks, jwks_file and jwks_url"));
                    (None, "jwks")
                }
            };
            match jwks.map(|text| crate::auth::ClientKeys::parse(&text).map(|_| text)) {
                Some(Ok(text)) => client_keys.push(text),
                Some(Err(e)) => {
                    let file = client.jwks_file.as_ref().map(|f| format!(" {}:", f.display())).unwrap_or_default();
                    problems.push(format!("{at}.{source}:{file} {e}"));
                    client_keys.push(String::new());
                }
                None => client_keys.push(String::new()),
            }
            for (j, prefix) in client.callbacks.iter().enumerate() {
                if let Err(e) = check_callback_prefix(prefix) {
                    problems.push(format!("{at}.callbacks[{j}]: {e}"));
                }
            }
        }
        if self.topics.error_after_failures == 0 || self.topics.heartbeat_check_ms == 0 || self.topics.timeout_secs == 0 || self.topics.max_events == 0 {
            problems.push("topics: error_after_failures, heartbeat_check_ms, timeout_secs and max_events must be greater than 0".into());
        }
        self.check_partners(&mut problems);
        if self.outbox.poll_interval_ms == 0 || self.outbox.lease_secs == 0 || self.outbox.concurrency == 0 {
            problems.push("outbox: poll_interval_ms, lease_secs and concurrency must be greater than 0".into());
        }
        if self.export.max_file_bytes == 0 || self.export.page_size == 0 || self.export.retention_secs == 0 || self.export.max_running_per_client == 0 || self.export.lease_secs == 0 {
            problems.push("export: max_file_bytes, page_size, retention_secs, max_running_per_client and lease_secs must be greater than 0".into());
        }
        // A certification is at most a year of days; larger thresholds would propose an extension with every first session.
        if self.utilization.remaining_days_below > 366 || self.utilization.days_before_end > 366 {
            problems.push("utilization: remaining_days_below and days_before_end must be at most 366".into());
        }
        match (problems.is_empty(), listen) {
            (true, Some(listen)) => Ok(Loaded { config: self, file: file.map(Path::to_path_buf), listen, client_keys, trusted_proxies }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

/// A `jwks_url` the gateway may fetch: https, or plain http only to a loopback address (a partner's
/// keys must not be open to substitution on the way).
pub fn check_jwks_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("'{url}' names no host"))?;
    let loopback = host.eq_ignore_ascii_case("localhost") || host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!("'{url}' must use https (plain http only to a loopback address)")),
        other => Err(format!("'{url}': {other} is not https")),
    }
}

/// A callback prefix: an absolute https URL (or http to a loopback address) with a host, no user
/// name, query or fragment, so that what starts with it is on that host.
pub fn check_callback_prefix(prefix: &str) -> Result<(), String> {
    check_jwks_url(prefix)?;
    let parsed = reqwest::Url::parse(prefix).map_err(|e| format!("'{prefix}' is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("'{prefix}' must not carry a user name, query or fragment"));
    }
    Ok(())
}

/// Whether `url` is under one of `prefixes` (same scheme, host and port; the path at or below the
/// prefix's, a segment boundary counted), and may be called: https, or http to a loopback address.
pub fn callback_allowed(url: &str, prefixes: &[String]) -> bool {
    let Ok(target) = reqwest::Url::parse(url) else { return false };
    if check_jwks_url(url).is_err() || !target.username().is_empty() || target.password().is_some() || target.fragment().is_some() {
        return false;
    }
    prefixes.iter().filter_map(|p| reqwest::Url::parse(p).ok()).any(|prefix| {
        let same_origin = prefix.scheme() == target.scheme() && prefix.host_str().map(str::to_ascii_lowercase) == target.host_str().map(str::to_ascii_lowercase) && prefix.port_or_known_default() == target.port_or_known_default();
        let base = prefix.path();
        let path = target.path();
        let under = path == base || (path.starts_with(base) && (base.ends_with('/') || path[base.len()..].starts_with('/')));
        same_origin && under && !path.split('/').any(|s| s == ".." || s == ".")
    })
}

/// A client id or partner name: 1-64 letters, digits, '-', '.' or '_' (it names files and metric labels).
fn is_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

impl Config {
    fn check_partners(&self, problems: &mut Vec<String>) {
        let mut names = BTreeSet::new();
        for (i, partner) in self.partners.iter().enumerate() {
            let at = format!("partners[{i}] ({})", partner.name);
            if !is_name(&partner.name) {
                problems.push(format!("{at}.name: must be 1-64 letters, digits, '-', '.' or '_'"));
            }
            if !names.insert(partner.name.clone()) {
                problems.push(format!("{at}.name: configured twice"));
            }
            match reqwest::Url::parse(&partner.fhir_base) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => problems.push(format!("{at}.fhir_base: '{}' must be an http(s) URL", partner.fhir_base)),
            }
            if let Some(endpoint) = &partner.token_endpoint
                && reqwest::Url::parse(endpoint).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true)
            {
                problems.push(format!("{at}.token_endpoint: '{endpoint}' must be an http(s) URL"));
            }
            match partner.auth {
                PartnerAuth::Smart => {
                    let key = partner.key_path(&self.store.data_dir);
                    match std::fs::read_to_string(&key) {
                        Ok(pem) => {
                            if let Err(e) = crate::auth::keys::KeyPair::from_pem(&pem, "check") {
                                problems.push(format!("{at}.key_file: {}: {e}", key.display()));
                            }
                        }
                        Err(e) => problems.push(format!("{at}.key_file: cannot read {} ({e}); `iop-gateway partners add` writes it", key.display())),
                    }
                }
                PartnerAuth::Bearer => match &partner.bearer_token_env {
                    Some(var) if std::env::var(var).is_ok_and(|v| !v.is_empty()) => {}
                    Some(var) => problems.push(format!("{at}.bearer_token_env: the environment variable {var} is not set")),
                    None => problems.push(format!("{at}: auth = \"bearer\" needs bearer_token_env, the environment variable holding the token")),
                },
                PartnerAuth::None => {}
            }
            for file in [&partner.ca_file, &partner.client_cert, &partner.client_key].into_iter().flatten() {
                if !file.is_file() {
                    problems.push(format!("{at}: {} is not a readable file", file.display()));
                }
            }
            if partner.client_cert.is_some() != partner.client_key.is_some() {
                problems.push(format!("{at}: client_cert and client_key go together"));
            }
            for client in &partner.clients {
                if !self.clients.iter().any(|c| &c.id == client) {
                    problems.push(format!("{at}.clients: '{client}' is not a registered client"));
                }
            }
            // An attempt (a token request, then the message) must end before its lease does, or the message could be sent twice at once.
            if partner.timeout_secs.saturating_mul(2) >= self.outbox.lease_secs {
                problems.push(format!("{at}.timeout_secs: twice it ({} s) must be less than outbox.lease_secs ({} s)", partner.timeout_secs * 2, self.outbox.lease_secs));
            }
            if partner.auto_extend && partner.kind != PartnerKind::Payer {
                problems.push(format!("{at}.auto_extend: only a payer receives extension requests"));
            }
            if partner.timeout_secs == 0 || partner.first_retry_ms == 0 || partner.max_backoff_secs == 0 {
                problems.push(format!("{at}: timeout_secs, first_retry_ms and max_backoff_secs must be greater than 0"));
            }
            // PAS asks clients not to poll; even the fallback may not hammer a payer, nor wait so long a pended request is forgotten.
            if !(1..=86_400).contains(&partner.inquire_interval_secs) {
                problems.push(format!("{at}.inquire_interval_secs: {} is outside 1..=86400 seconds", partner.inquire_interval_secs));
            }
        }
        // An outpatient provider's client updates the step-down Tasks its facility owns: with no
        // `organization` of its own, the one facility its partner routes says which Organization that is.
        for (i, client) in self.clients.iter().enumerate().filter(|(_, c)| c.role == Role::OutpatientProvider && c.organization.is_none()) {
            let tied: Vec<&PartnerConfig> = self.partners.iter().filter(|p| p.kind == PartnerKind::OutpatientProvider && p.clients.contains(&client.id)).collect();
            if !tied.is_empty() && self.answered_facility(client).is_none() {
                let routes: Vec<String> = tied.iter().flat_map(|p| p.routes.iter().map(|r| format!("{} → {r}", p.name))).collect();
                problems.push(format!(
                    "clients[{i}] ({}): an outpatient-provider client acts for one receiving facility, but the outpatient-provider partners naming it route {} ({}); give it its own partner routing one facility, or set its organization",
                    client.id,
                    routes.len(),
                    routes.join(", ")
                ));
            }
        }
        for (kind, what, whom) in [(PartnerKind::Payer, "payer_id", "payer"), (PartnerKind::OutpatientProvider, "receiving facility id", "outpatient provider")] {
            let mut routed = BTreeSet::new();
            for partner in self.partners.iter().filter(|p| p.kind == kind) {
                for route in &partner.routes {
                    if !routed.insert(route.clone()) {
                        problems.push(format!("partners: {what} '{route}' is routed to more than one {whom}"));
                    }
                }
            }
        }
    }
}

impl Config {
    /// The receiving facility an `outpatient-provider` client without its own `organization` answers
    /// for: the one route of the one `outpatient-provider` partner whose `clients` name it. The client
    /// then acts for that facility's Organization, which owns the step-down referral Tasks sent there.
    pub fn answered_facility(&self, client: &ClientConfig) -> Option<&str> {
        if client.role != Role::OutpatientProvider || client.organization.is_some() {
            return None;
        }
        let mut tied = self.partners.iter().filter(|p| p.kind == PartnerKind::OutpatientProvider && p.clients.contains(&client.id));
        match (tied.next(), tied.next()) {
            (Some(partner), None) => match partner.routes.as_slice() {
                [route] => Some(route.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

impl PartnerConfig {
    /// Our private key for this partner.
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| data_dir.join("partners").join(format!("{}.key.pem", self.name)))
    }

    /// The id the partner knows us by.
    pub fn client_id(&self) -> &str {
        self.client_id.as_deref().unwrap_or(&self.name)
    }
}

impl ClientConfig {
    /// The Organization this client acts for.
    /// The purpose of use the consent decision applies to what this client receives.
    pub fn purpose(&self) -> crate::auth::consent::Purpose {
        use crate::auth::consent::Purpose;
        match (self.purpose.as_deref().and_then(Purpose::from_name), self.role) {
            (Some(purpose), _) => purpose,
            (None, Role::Payer) => Purpose::Payment,
            (None, Role::Admin) => Purpose::Operations,
            (None, Role::InpatientUnit | Role::OutpatientProvider | Role::Clinic) => Purpose::Treatment,
        }
    }

    pub fn organization(&self, gateway: &GatewayConfig) -> String {
        match (&self.organization, self.role) {
            (Some(org), _) => org.clone(),
            (None, Role::Clinic) => gateway.organization.clone(),
            (None, _) => format!("Organization/{}", self.id),
        }
    }

    /// The scopes this client may be granted.
    pub fn allowed_scopes(&self) -> ScopeSet {
        match &self.scopes {
            Some(scopes) => ScopeSet::parse(&scopes.join(" ")).unwrap_or_default(),
            None => self.role.default_scopes(),
        }
    }
}

fn is_reference(text: &str, resource_type: &str) -> bool {
    text.strip_prefix(resource_type)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|id| !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
}

/// Applies `IOP_GATEWAY__SECTION__KEY=value` variables onto the parsed file; values are read as
/// TOML (`8080`, `true`, `["a"]`) and fall back to a plain string.
fn apply_env(table: &mut toml::Table, env_vars: &[(String, String)]) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for (name, raw) in env_vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if keys.iter().any(String::is_empty) || keys.first().is_some_and(|k| k == "clients") {
            problems.push(format!("{name}: not a configuration key that can be set from the environment"));
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Err(key) = set_path(table, &keys, value) {
            problems.push(format!("{name}: '{key}' is not a section"));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
}

/// Sets `keys` (a path of tables) to `value`; the error names a key that holds a value, not a table.
fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    match keys {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
            toml::Value::Table(inner) => set_path(inner, rest, value),
            _ => Err(first.clone()),
        },
    }
}

/// The process environment as pairs, for [`Config::load`].
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_listen_on_loopback_8080_with_sqlite_under_data() {
        let loaded = Config::load(None, &[], &Overrides::default()).unwrap();
        assert_eq!(loaded.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(loaded.config.store.data_dir, PathBuf::from("data"));
        assert!(loaded.config.store.url.is_none());
        assert!(loaded.config.server.tls.is_none());
    }

    #[test]
    fn an_outpatient_provider_client_acts_for_the_one_facility_its_partner_routes() {
        let text = |routes: &str, organization: &str| {
            format!(
                "[[clients]]\nid = \"riverbend\"\nrole = \"outpatient-provider\"\njwks_url = \"https://k.example/j\"\n{organization}\n[[partners]]\nname = \"riverbend\"\nkind = \"outpatient-provider\"\nfhir_base = \"https://r.example/fhir\"\nauth = \"none\"\nroutes = {routes}\nclients = [\"riverbend\"]\n"
            )
        };
        let config = Config::from_toml(&text("[\"OP-RIVERBEND\"]", ""), Path::new("")).unwrap().config;
        assert_eq!(config.answered_facility(&config.clients[0]), Some("OP-RIVERBEND"));
        let problem = Config::from_toml(&text("[\"OP-A\", \"OP-B\"]", ""), Path::new("")).unwrap_err().to_string();
        assert!(problem.contains("clients[0] (riverbend)") && problem.contains("riverbend → OP-B"), "{problem}");
        let explicit = Config::from_toml(&text("[\"OP-A\", \"OP-B\"]", "organization = \"Organization/riverbend\""), Path::new("")).unwrap().config;
        assert_eq!(explicit.answered_facility(&explicit.clients[0]), None, "its own organization stands");
    }

    #[test]
    fn partners_are_checked_before_anything_binds() {
        let partner = |extra: &str| format!("[[partners]]\nname = \"payer-x\"\nkind = \"payer\"\nfhir_base = \"https://payer.example/fhir\"\nauth = \"none\"\nroutes = [\"P-1\"]\n{extra}");
        assert!(Config::from_toml(&partner(""), Path::new("")).is_ok());
        let problems = |text: &str| Config::from_toml(text, Path::new("")).unwrap_err().to_string();
        assert!(problems(&partner("timeout_secs = 60")).contains("must be less than outbox.lease_secs"));
        assert!(problems(&partner("").replace("https://payer.example/fhir", "payer.example")).contains("fhir_base"));
        assert!(problems(&partner("").replace("\"none\"", "\"smart\"")).contains("partners add"), "a SMART partner needs our key");
        assert!(problems(&partner("").replace("\"none\"", "\"bearer\"")).contains("bearer_token_env"));
        assert!(problems(&partner("clients = [\"nobody\"]")).contains("not a registered client"));
        assert!(problems(&partner("auto_extend = true").replace("\"payer\"", "\"inpatient-unit\"")).contains("only a payer"));
        assert!(Config::from_toml(&partner("auto_extend = true"), Path::new("")).is_ok());
        assert!(problems(&partner("inquire_interval_secs = 0")).contains("inquire_interval_secs"));
        assert!(problems(&partner("inquire_interval_secs = 86401")).contains("inquire_interval_secs"));
        assert_eq!(Config::from_toml(&partner(""), Path::new("")).unwrap().config.partners[0].inquire_interval_secs, 900);
        assert!(problems("[utilization]\nremaining_days_below = 400\n").contains("at most 366"));
        assert!(problems("[utilization]\nremaining_day_below = 3\n").contains("remaining_day_below"), "a misspelt key is refused");
        let twice = format!("{}\n{}", partner(""), partner("").replace("payer-x", "payer-y"));
        assert!(problems(&twice).contains("routed to more than one payer"));
        let providers = |kind_b: &str| format!("{}\n{}", partner("").replace("\"payer\"", "\"outpatient-provider\""), partner("").replace("payer-x", "op-b").replace("\"payer\"", kind_b));
        assert!(problems(&providers("\"outpatient-provider\"")).contains("receiving facility id 'P-1' is routed to more than one outpatient provider"));
        assert!(Config::from_toml(&providers("\"payer\""), Path::new("")).is_ok(), "routes are per kind: a payer id and a facility id may be spelt alike");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::from_toml("[server]\nlisten = '127.0.0.1:1'\nlissten = 'x'\n", Path::new("")).unwrap_err();
        assert!(e.to_string().contains("lissten"), "{e}");
        let e = Config::from_toml("[stor]\n", Path::new("")).unwrap_err();
        assert!(e.to_string().contains("stor"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_both() {
        let vars = env(&[("IOP_GATEWAY__SERVER__MAX_BODY_BYTES", "1024"), ("IOP_GATEWAY__SERVER__LISTEN", "127.0.0.1:9000"), ("OTHER", "x")]);
        let loaded = Config::load(None, &vars, &Overrides::default()).unwrap();
        assert_eq!(loaded.config.server.max_body_bytes, 1024);
        assert_eq!(loaded.listen.port(), 9000);
        let flags = Overrides { listen: Some("127.0.0.1:9100".into()), data_dir: Some("elsewhere".into()) };
        let loaded = Config::load(None, &vars, &flags).unwrap();
        assert_eq!(loaded.listen.port(), 9100);
        assert_eq!(loaded.config.store.data_dir, PathBuf::from("elsewhere"));
    }

    #[test]
    fn unknown_environment_keys_are_refused() {
        let e = Config::load(None, &env(&[("IOP_GATEWAY__SERVER__LISTN", "x")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = Config::load(None, &env(&[("IOP_GATEWAY__CLIENTS", "[]")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("IOP_GATEWAY__CLIENTS"), "{e}");
    }

    #[test]
    fn plain_http_off_loopback_needs_an_explicit_choice() {
        let e = Config::from_toml("[server]\nlisten = '0.0.0.0:8080'\n", Path::new("")).unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{e}");
        Config::from_toml("[server]\nlisten = '0.0.0.0:8080'\nallow_plain_http = true\n", Path::new("")).unwrap();
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[server]\nlisten = 'nowhere'\nmax_body_bytes = 0\n[store]\nurl = 'mysql://x'\n[[clients]]\nid = 'a b'\nrole = 'payer'\n";
        let e = Config::from_toml(text, Path::new("")).unwrap_err().to_string();
        for needle in ["server.listen", "max_body_bytes", "store.url", "clients[0] (a b).id", "public keys"] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
    }

    #[test]
    fn callbacks_are_http_url_prefixes_matched_at_a_boundary() {
        let client = |callbacks: &str| format!("[[clients]]\nid = 'x'\nrole = 'inpatient-unit'\njwks_url = 'https://k.example/j'\ncallbacks = {callbacks}\n");
        let loaded = Config::from_toml(&client("['https://unit.example/fhir', 'http://127.0.0.1:9/']"), Path::new("")).unwrap();
        assert_eq!(loaded.config.clients[0].callbacks.len(), 2);
        for bad in ["['ftp://unit.example/']", "['not a url']"] {
            let e = Config::from_toml(&client(bad), Path::new("")).unwrap_err().to_string();
            assert!(e.contains("clients[0] (x).callbacks"), "{bad}: {e}");
        }
        let prefixes = vec!["https://unit.example/fhir".to_string(), "http://127.0.0.1:9/".to_string()];
        for ok in ["https://unit.example/fhir", "https://unit.example/fhir/", "https://unit.example/fhir?x=1", "http://127.0.0.1:9/any"] {
            assert!(callback_allowed(ok, &prefixes), "{ok}");
        }
        for bad in ["https://unit.example/fhirx", "https://unit.example.attacker.test/fhir", "http://unit.example/fhir", "https://other.example/fhir"] {
            assert!(!callback_allowed(bad, &prefixes), "{bad}");
        }
    }

    #[test]
    fn client_keys_come_from_one_source_and_a_jwks_url_is_https_or_loopback() {
        let client = |keys: &str| format!("[[clients]]\nid = 'x'\nrole = 'payer'\n{keys}\n");
        let problems = |text: &str| Config::from_toml(text, Path::new("")).unwrap_err().to_string();
        for ok in ["https://keys.example/jwks.json", "http://127.0.0.1:9/jwks", "http://localhost/jwks", "http://[::1]:8/jwks"] {
            let loaded = Config::from_toml(&client(&format!("jwks_url = '{ok}'")), Path::new("")).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(loaded.config.clients[0].jwks_url.as_deref(), Some(ok));
        }
        for bad in ["http://keys.example/jwks.json", "ftp://127.0.0.1/jwks", "not a url"] {
            assert!(problems(&client(&format!("jwks_url = '{bad}'"))).contains("clients[0] (x).jwks_url"), "{bad}");
        }
        assert!(problems(&client("jwks_url = 'https://k.example/j'\njwks = '{}'")).contains("one of jwks, jwks_file and jwks_url"));
        let e = problems(&client("jwks_file = '/nonexistent/x.jwks.json'"));
        assert!(e.contains("clients[0] (x).jwks_file: cannot read /nonexistent/x.jwks.json"), "{e}");
        let e = problems(&client("jwks = '{\"keys\": [{\"kty\": \"oct\", \"kid\": \"s\", \"k\": \"AAAA\"}]}'"));
        assert!(e.contains("clients[0] (x).jwks: ") && e.contains("kid \"s\"") && e.contains("private"), "{e}");
        assert!(problems("[auth]\njwks_refresh_min_secs = 0\n").contains("auth.jwks_refresh_min_secs"));
        assert!(problems("[auth]\njwks_refresh_min_secs = 60\njwks_cache_secs = 10\n").contains("auth.jwks_cache_secs"));
    }

    #[test]
    fn callbacks_are_https_or_loopback_prefixes_without_query_or_user() {
        let client = |callbacks: &str| format!("[[clients]]\nid = 'x'\nrole = 'inpatient-unit'\njwks_url = 'https://k.example/j'\ncallbacks = [{callbacks}]\n");
        let loaded = Config::from_toml(&client("'https://unit.example/hooks/', 'http://127.0.0.1:9000/'"), Path::new("")).unwrap();
        assert_eq!(loaded.config.clients[0].callbacks.len(), 2);
        for (i, bad) in ["http://unit.example/hooks/", "https://user@unit.example/", "https://unit.example/?x=1", "not a url"].iter().enumerate() {
            let e = Config::from_toml(&client(&format!("'{bad}'")), Path::new("")).unwrap_err().to_string();
            assert!(e.contains("clients[0] (x).callbacks[0]"), "{i} {bad}: {e}");
        }
        assert!(Config::from_toml("[topics]\nerror_after_failures = 0\n", Path::new("")).unwrap_err().to_string().contains("topics:"));
    }

    #[test]
    fn bad_roles_and_scopes_are_refused() {
        let e = Config::from_toml("[[clients]]\nid = 'x'\nrole = 'hacker'\njwks = '{}'\n", Path::new("")).unwrap_err();
        assert!(e.to_string().contains("hacker"), "{e}");
        let e = Config::from_toml("[[clients]]\nid = 'x'\nrole = 'payer'\nscopes = ['user/Patient.read']\njwks = '{\"keys\":[]}'\n", Path::new(""))
            .unwrap_err();
        assert!(e.to_string().contains("scopes"), "{e}");
    }

    #[test]
    fn connection_limits_and_cache_time_are_checked() {
        let e = Config::from_toml("[server]\nheader_read_timeout_secs = 0\nbody_read_timeout_secs = 0\nmax_connections = 0\n[auth]\ntoken_cache_ttl_secs = 3600\n", Path::new(""))
            .unwrap_err()
            .to_string();
        for needle in ["header_read_timeout_secs", "body_read_timeout_secs", "server.max_connections", "token_cache_ttl_secs"] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
        let loaded = Config::from_toml("[auth]\ntoken_cache_ttl_secs = 0\n", Path::new("")).unwrap();
        assert_eq!(loaded.config.auth.token_cache_ttl_secs, 0);
        assert_eq!(loaded.config.server.max_unauthenticated_requests, 32);
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let loaded = Config::from_toml(&text, Path::new("")).unwrap();
        assert_eq!(loaded.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges_checked_before_binding() {
        let loaded = Config::from_toml("[server]\ntrusted_proxies = ['10.1.0.0/16', '127.0.0.1', '2001:db8::/32']\n", Path::new("")).unwrap();
        let [net, one, v6] = loaded.trusted_proxies[..] else { panic!("three ranges") };
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(net.contains(ip("10.1.200.3")) && !net.contains(ip("10.2.0.1")) && net.contains(ip("::ffff:10.1.0.9")));
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")) && !v6.contains(ip("10.1.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
        let e = Config::from_toml("[server]\ntrusted_proxies = ['proxy.internal', '10.0.0.0/33']\n", Path::new("")).unwrap_err().to_string();
        assert!(e.contains("trusted_proxies[0]") && e.contains("trusted_proxies[1]"), "{e}");
    }

    #[test]
    fn a_wildcard_address_without_base_url_is_warned_about() {
        let load = |text: &str| Config::from_toml(text, Path::new("")).unwrap();
        assert!(load("[server]\nlisten = '0.0.0.0:8080'\nallow_plain_http = true\n").base_url_warning().is_some_and(|w| w.contains("base_url")));
        assert!(load("[server]\nlisten = '[::]:8080'\nallow_plain_http = true\n").base_url_warning().is_some());
        assert!(load("[server]\nlisten = '0.0.0.0:8080'\nallow_plain_http = true\nbase_url = 'https://gw.example'\n").base_url_warning().is_none());
        assert!(load("").base_url_warning().is_none());
    }
}
