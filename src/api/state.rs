//! `AppState`: what every handler shares — configuration, the validator, the store, registered clients, the token cache, metrics and limits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::auth::{ClientKeys, Principal, ScopeSet};
use crate::config::{ClientConfig, Loaded};
use crate::definitions::Definitions;
use crate::mapping::MappingSet;
use crate::partner::Partners;
use crate::partner::jwks::{JwksError, PublishedKeys};
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::validation::Validator;

/// The client id the gateway records as the author of what it stores itself (partners' answers).
pub const GATEWAY_CLIENT: &str = "iop-gateway";

/// What the exchange needs, prepared (and checked) before the server binds its port.
pub struct Exchange {
    pub mappings: Arc<MappingSet>,
    pub partners: Arc<Partners>,
    /// The DS4P label rules (compiled in, or `[mappings] labels`).
    pub labels: crate::auth::labelling::LabelRules,
}

/// Where a client's public keys come from.
pub enum Keys {
    /// The JWKS in the configuration (inline or `jwks_file`), read and checked at start.
    Registered(Arc<ClientKeys>),
    /// The JWKS the partner publishes at its `jwks_url`, fetched and cached by the partner layer.
    Published(Arc<PublishedKeys>),
}

impl Keys {
    /// The keys to verify an assertion whose header names `kid`.
    pub async fn for_kid(&self, kid: Option<&str>) -> Result<Arc<ClientKeys>, JwksError> {
        match self {
            Keys::Registered(keys) => Ok(keys.clone()),
            Keys::Published(published) => published.keys_for(kid).await,
        }
    }
}

/// A registered partner as the running server knows it.
pub struct Client {
    pub config: ClientConfig,
    pub organization: String,
    pub keys: Keys,
    pub allowed: ScopeSet,
    /// Requests in flight for this client (429 beyond the limit).
    pub in_flight: Arc<Semaphore>,
}

/// A token lookup kept in memory.
#[derive(Clone, Debug)]
pub struct CachedToken {
    pub principal: Principal,
    pub expires_at: i64,
    pub cached_at: i64,
}

/// Shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

pub struct Shared {
    pub loaded: Loaded,
    /// Base URL of the FHIR endpoint, without a trailing slash: `server.base_url`, else the listen
    /// address. The gateway's own identity (audit records, the Subscription endpoint given to
    /// payers); links in responses use the request's [`RequestBase`](super::base::RequestBase).
    pub base_url: String,
    pub validator: Arc<Validator>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub clients: HashMap<String, Client>,
    /// Concrete resource types of FHIR R4.
    pub resource_types: HashSet<String>,
    /// Access tokens already looked up: SHA-256 of the token → (principal, expiry, when looked up).
    /// An entry is trusted for `auth.token_cache_ttl_secs` only, so a revocation in the store reaches this instance.
    pub token_cache: Mutex<HashMap<String, CachedToken>>,
    /// Keys no client holds: an assertion naming an unknown client is verified against them, so it is
    /// refused exactly as a registered client's assertion with a wrong key (`None` if generation failed).
    pub unknown_client_keys: Option<ClientKeys>,
    /// The IOP ↔ FHIR mappings (compiled in, or the configured folder).
    pub mappings: Arc<MappingSet>,
    /// The partners the gateway sends to.
    pub partners: Arc<Partners>,
    /// 42 CFR Part 2: the label rules and the enrolments seen.
    pub part2: super::part2::Part2,
    /// Wakes the delivery worker when a message was queued.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// Wakes the export worker when a job was started.
    pub export_wake: Arc<tokio::sync::Notify>,
    /// The gateway itself, as the author of what it stores from partners' answers (payer decisions).
    pub gateway_principal: Principal,
    /// Partners' Subscriptions on the gateway's topic, as the write path last read them.
    pub topics: Arc<crate::exchange::topics::Cache>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.inner
    }
}

impl AppState {
    /// Builds the state for a server whose public base URL is known.
    pub fn new(loaded: Loaded, base_url: String, store: Store, metrics: Arc<Metrics>, validator: Arc<Validator>, exchange: Exchange) -> AppState {
        let per_client = loaded.config.server.max_concurrent_requests_per_client;
        let mut clients = HashMap::new();
        for (client, jwks) in loaded.config.clients.iter().zip(&loaded.client_keys) {
            // The configuration was validated, so every JWKS parses; a client whose keys do not is left out.
            let keys = match exchange.partners.published_keys(&client.id) {
                Some(published) => Keys::Published(published),
                None => match ClientKeys::parse(jwks) {
                    Ok(keys) => Keys::Registered(Arc::new(keys)),
                    Err(_) => continue,
                },
            };
            clients.insert(
                client.id.clone(),
                Client {
                    organization: match loaded.config.answered_facility(client) {
                        // The id the mappings give the facility: the step-down Tasks sent there name it as owner.
                        Some(facility) => format!("Organization/{}", exchange.mappings.resource_id("Organization", &format!("facility:{facility}"))),
                        None => client.organization(&loaded.config.gateway),
                    },
                    allowed: client.allowed_scopes(),
                    keys,
                    in_flight: Arc::new(Semaphore::new(per_client)),
                    config: client.clone(),
                },
            );
        }
        let resource_types = resource_types(validator.definitions());
        let base_url = base_url.trim_end_matches('/').to_string();
        let loaded_organization = loaded.config.gateway.organization.clone();
        AppState {
            inner: Arc::new(Shared {
                loaded,
                base_url,
                validator,
                store,
                metrics,
                clients,
                resource_types,
                token_cache: Mutex::new(HashMap::new()),
                unknown_client_keys: crate::auth::keys::KeyPair::generate_es384("unknown")
                    .ok()
                    .and_then(|pair| ClientKeys::parse(&pair.jwks_json()).ok()),
                gateway_principal: Principal {
                    client_id: GATEWAY_CLIENT.to_string(),
                    role: crate::auth::Role::Clinic,
                    organization: loaded_organization,
                    scopes: ScopeSet::parse("system/*.cruds").unwrap_or_default(),
                    // The gateway's own work (recording payers' answers) is not a disclosure.
                    purpose: None,
                },
                mappings: exchange.mappings,
                partners: exchange.partners,
                part2: super::part2::Part2::new(exchange.labels),
                outbox_wake: Arc::new(tokio::sync::Notify::new()),
                export_wake: Arc::new(tokio::sync::Notify::new()),
                topics: Arc::new(crate::exchange::topics::Cache::default()),
            }),
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}{}", self.base_url, crate::auth::TOKEN_PATH)
    }

    pub fn program(&self) -> &str {
        &self.loaded.config.gateway.organization
    }
}

/// The concrete (non-abstract) resource types of the loaded base definitions.
fn resource_types(definitions: &Definitions) -> HashSet<String> {
    let mut out = HashSet::new();
    for entry in definitions.resources_of_type("StructureDefinition") {
        let Some(sd) = entry.resource() else { continue };
        let text = |k: &str| sd.get(k).and_then(crate::json::Json::as_str).map(str::to_string);
        let is_resource = text("kind").as_deref() == Some("resource");
        let is_base = text("derivation").as_deref() == Some("specialization");
        let is_abstract = sd.get("abstract").and_then(crate::json::Json::as_bool).unwrap_or(false);
        if is_resource && is_base && !is_abstract && let Some(name) = text("type") {
            out.insert(name);
        }
    }
    out
}

/// The validator the server uses: R4 base, the bundled profiles, and the compiled-in US Core and PAS
/// packages, so a resource claiming a PAS or US Core profile is checked against it, not waved through.
pub fn default_validator() -> Arc<Validator> {
    Arc::new(Validator::new(Arc::new(Definitions::new_with_exchange_packages())))
}
