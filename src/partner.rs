//! The partners the gateway sends to, and the only place that makes outbound network calls: one HTTP client per partner (its CA, its client certificate), its authentication (SMART Backend Services as a client, a bearer token, or none), and the classification of every answer into delivered, retry later, or refused; and ([`jwks`]) the JWKS clients publish at a URL.
//!
//! What is retried: no answer (connection refused or dropped, timeout), 408, 429 and 5xx, with
//! `Retry-After` honoured. A 401 gets one fresh token and one more try within the same attempt.
//! Anything else is the partner's final word on that message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod bulk;

use crate::auth::keys::{KeyPair, sign_assertion};
use crate::config::{Config, PartnerAuth, PartnerConfig};

pub mod jwks;

/// Why a partner could not be set up (files named in the configuration were checked before, so this is rare).
#[derive(Debug, thiserror::Error)]
#[error("partner {partner}: {message}")]
pub struct PartnerError {
    pub partner: String,
    pub message: String,
}

/// What one attempt to deliver a message came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx: the partner took the message; its answer (and its `Location`, where a create names what it made).
    Accepted { status: u16, body: String, location: Option<String> },
    /// No answer, or an answer that says "later": try again (after `after`, when the partner said).
    Retry { status: u16, error: String, after: Option<Duration> },
    /// A 4xx other than 408/429 (or a 401 that a fresh token did not cure): do not send this again.
    Refused { status: u16, body: String },
}

/// Everything the gateway knows about the partners it sends to, and the JWKS URLs of the clients that publish their keys.
pub struct Partners {
    by_name: HashMap<String, Partner>,
    published_keys: HashMap<String, std::sync::Arc<jwks::PublishedKeys>>,
    /// Sends notifications to partners' Subscription endpoints; follows no redirect (only the endpoint, checked against the client's callbacks, is called).
    callbacks: reqwest::Client,
}

/// One partner: its configuration and its client.
pub struct Partner {
    pub config: PartnerConfig,
    client: FhirClient,
}

/// An HTTP client of one FHIR server with its credentials: the connection a partner is sent through,
/// and what the operator commands (`iop-gateway export`) use to talk to any SMART Backend Services server.
pub struct FhirClient {
    fhir_base: String,
    http: reqwest::Client,
    credentials: Credentials,
    /// The access token in use and when to stop using it (a little before it expires).
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    /// The configured or discovered token endpoint.
    token_endpoint: Mutex<Option<String>>,
}

/// How a client proves itself to the server.
pub enum Credentials {
    None,
    Bearer(String),
    /// SMART Backend Services: a client assertion signed with `key` for `client_id`, asking for `scopes`.
    Smart { key: KeyPair, client_id: String, scopes: String },
}

/// How a [`FhirClient`] connects: timeout and the TLS material beyond the system's roots.
#[derive(Default)]
pub struct Transport<'a> {
    pub timeout: Option<Duration>,
    /// A PEM CA certificate to trust.
    pub ca_file: Option<&'a std::path::Path>,
    /// A PEM client certificate and its key, for mutual TLS.
    pub client_identity: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

/// How long before its expiry a cached partner token is dropped.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

impl Partners {
    /// Sets up every configured partner; fails only on what the configuration check could not see.
    pub fn new(config: &Config) -> Result<Partners, PartnerError> {
        let mut by_name = HashMap::new();
        for partner in &config.partners {
            by_name.insert(partner.name.clone(), Partner::new(partner, &config.store.data_dir)?);
        }
        let mut published_keys = HashMap::new();
        for client in &config.clients {
            if let Some(url) = &client.jwks_url {
                let keys = jwks::PublishedKeys::new(&client.id, url, &config.auth).map_err(|e| PartnerError { partner: client.id.clone(), message: e.to_string() })?;
                published_keys.insert(client.id.clone(), std::sync::Arc::new(keys));
            }
        }
        let callbacks = reqwest::Client::builder()
            .user_agent(concat!("iop-gateway/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| PartnerError { partner: "callbacks".into(), message: e.to_string() })?;
        Ok(Partners { by_name, published_keys, callbacks })
    }

    /// `POST`s a notification Bundle to a partner's Subscription endpoint with the Subscription's
    /// `channel.header` lines as headers: one attempt within `timeout`, classified like any delivery.
    /// The caller checked the endpoint against the client's `callbacks`; redirects are not followed.
    pub async fn notify(&self, endpoint: &str, header_lines: &[String], body: &str, timeout: Duration) -> Delivery {
        let mut headers = reqwest::header::HeaderMap::new();
        for line in header_lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            if let (Ok(name), Ok(value)) = (reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()), reqwest::header::HeaderValue::from_str(value.trim())) {
                headers.append(name, value);
            }
        }
        headers.insert(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/fhir+json"));
        let response = match self.callbacks.post(endpoint).headers(headers).timeout(timeout).body(body.to_string()).send().await {
            Ok(response) => response,
            Err(e) => return Delivery::Retry { status: 0, error: describe(&e), after: None },
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers(), MAX_DELIVERY_RETRY_AFTER);
        let text = response.text().await.unwrap_or_default();
        match status {
            200..=299 => Delivery::Accepted { status, body: text, location: None },
            408 | 429 | 500..=599 => Delivery::Retry { status, error: format!("the endpoint answered {status}"), after },
            _ => Delivery::Refused { status, body: text },
        }
    }

    /// The keys a client publishes at its `jwks_url`, if it registered one.
    pub fn published_keys(&self, client_id: &str) -> Option<std::sync::Arc<jwks::PublishedKeys>> {
        self.published_keys.get(client_id).cloned()
    }

    pub fn get(&self, name: &str) -> Option<&Partner> {
        self.by_name.get(name)
    }

    /// The partner a client speaks for (its `clients` list), if any.
    pub fn for_client(&self, client_id: &str) -> Option<&Partner> {
        let mut partners: Vec<&Partner> = self.by_name.values().filter(|p| p.config.clients.iter().any(|c| c == client_id)).collect();
        // Configuration order is lost in the map; the name decides, so the choice is stable.
        partners.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        partners.into_iter().next()
    }

    /// The payer an authorization for `payer_id` goes to.
    pub fn payer_for(&self, payer_id: &str) -> Option<&Partner> {
        self.routed(crate::config::PartnerKind::Payer, payer_id)
    }

    /// The outpatient provider a step-down referral to the receiving facility `facility_id` goes to.
    pub fn outpatient_provider_for(&self, facility_id: &str) -> Option<&Partner> {
        self.routed(crate::config::PartnerKind::OutpatientProvider, facility_id)
    }

    /// The partner of `kind` whose `routes` name `value` (the configuration check makes it unique).
    fn routed(&self, kind: crate::config::PartnerKind, value: &str) -> Option<&Partner> {
        let mut candidates = self.by_name.values().filter(|p| p.config.kind == kind);
        candidates.find(|p| p.config.routes.iter().any(|r| r == value))
    }
}

impl Partner {
    pub fn new(config: &PartnerConfig, data_dir: &std::path::Path) -> Result<Partner, PartnerError> {
        let fail = |message: String| PartnerError { partner: config.name.clone(), message };
        let credentials = match config.auth {
            PartnerAuth::None => Credentials::None,
            PartnerAuth::Bearer => {
                let var = config.bearer_token_env.as_deref().unwrap_or_default();
                Credentials::Bearer(std::env::var(var).map_err(|_| fail(format!("the environment variable {var} is not set")))?)
            }
            PartnerAuth::Smart => {
                let path = config.key_path(data_dir);
                let pem = std::fs::read_to_string(&path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
                let key = KeyPair::from_pem_thumbprinted(&pem).map_err(|e| fail(e.to_string()))?;
                let scopes = config.scopes.clone().unwrap_or_else(|| default_scopes(config.kind).to_string());
                Credentials::Smart { key, client_id: config.client_id().to_string(), scopes }
            }
        };
        let transport = Transport {
            timeout: Some(Duration::from_secs(config.timeout_secs)),
            ca_file: config.ca_file.as_deref(),
            client_identity: config.client_cert.as_deref().zip(config.client_key.as_deref()),
        };
        let client = FhirClient::new(&config.fhir_base, credentials, config.token_endpoint.clone(), &transport).map_err(fail)?;
        Ok(Partner { config: config.clone(), client })
    }

    /// `POST {fhir_base}/{path}` with a FHIR JSON body: one attempt (plus one on a 401 with a fresh token).
    pub async fn post(&self, path: &str, body: &str) -> Delivery {
        self.client.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PUT {fhir_base}/{path}` with a FHIR JSON body (a referral Task's progress at the referrer's server), answered and classified like a post.
    pub async fn put(&self, path: &str, body: &str) -> Delivery {
        self.client.send(reqwest::Method::PUT, path, Some(body)).await
    }

    /// `GET {fhir_base}/{path_and_query}` (a read or an operation such as a Subscription's `$events`), answered and classified like a post.
    pub async fn get(&self, path_and_query: &str) -> Delivery {
        self.client.send(reqwest::Method::GET, path_and_query, None).await
    }
}

impl FhirClient {
    /// A client of the FHIR server at `fhir_base`; `token_endpoint` is discovered from its SMART configuration when not given.
    pub fn new(fhir_base: &str, credentials: Credentials, token_endpoint: Option<String>, transport: &Transport) -> Result<FhirClient, String> {
        let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
        let mut builder = reqwest::Client::builder().user_agent(concat!("iop-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(timeout) = transport.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(ca) = transport.ca_file {
            let cert = reqwest::Certificate::from_pem(&read(ca)?).map_err(|e| format!("{}: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some((cert, key)) = transport.client_identity {
            let mut pem = read(cert)?;
            pem.extend_from_slice(b"\n");
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| format!("client certificate: {e}"))?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        Ok(FhirClient {
            fhir_base: fhir_base.trim_end_matches('/').to_string(),
            http,
            credentials,
            token: tokio::sync::Mutex::new(None),
            token_endpoint: Mutex::new(token_endpoint),
        })
    }

    /// The server's FHIR base URL, without a trailing slash.
    pub fn fhir_base(&self) -> &str {
        &self.fhir_base
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> Delivery {
        let url = format!("{}/{}", self.fhir_base, path.trim_start_matches('/'));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::ACCEPT, reqwest::header::HeaderValue::from_static("application/fhir+json"));
        if body.is_some() {
            headers.insert(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/fhir+json"));
        }
        let response = match self.request(method, &url, headers, body, true).await {
            Ok(response) => response,
            Err(delivery) => return delivery,
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers(), MAX_DELIVERY_RETRY_AFTER);
        let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = response.text().await.unwrap_or_default();
        match status {
            200..=299 => Delivery::Accepted { status, body: text, location },
            408 | 429 | 500..=599 => Delivery::Retry { status, error: format!("the partner answered {status}"), after },
            _ => Delivery::Refused { status, body: text },
        }
    }

    /// One request to an absolute URL with this partner's credentials (when `authorize`), answered raw so
    /// the caller can read headers and stream the body. A 401 gets one fresh token and one more try; no
    /// answer, or no token to be had, is a `Delivery::Retry`.
    pub async fn request(&self, method: reqwest::Method, url: &str, headers: reqwest::header::HeaderMap, body: Option<&str>, authorize: bool) -> Result<reqwest::Response, Delivery> {
        let mut renewed = false;
        loop {
            let token = if authorize { self.access_token(renewed).await? } else { None };
            let mut request = self.http.request(method.clone(), url).headers(headers.clone());
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|e| Delivery::Retry { status: 0, error: describe(&e), after: None })?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED && token.is_some() && !renewed && matches!(self.credentials, Credentials::Smart { .. }) {
                renewed = true;
                *self.token.lock().await = None;
                continue;
            }
            return Ok(response);
        }
    }

    /// The token to send: none, the static one, or a SMART token (cached; fetched anew when `renew`).
    async fn access_token(&self, renew: bool) -> Result<Option<String>, Delivery> {
        let (key, client_id, scopes) = match &self.credentials {
            Credentials::None => return Ok(None),
            Credentials::Bearer(token) => return Ok(Some(token.clone())),
            Credentials::Smart { key, client_id, scopes } => (key, client_id, scopes),
        };
        let mut cached = self.token.lock().await;
        if !renew
            && let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(Some(token.clone()));
        }
        let endpoint = self.token_endpoint().await?;
        let now = jsonwebtoken::get_current_timestamp();
        let assertion = sign_assertion(key, client_id, &endpoint, &uuid::Uuid::new_v4().to_string(), now + 240)
            .map_err(|e| Delivery::Retry { status: 0, error: format!("cannot sign the client assertion: {e}"), after: None })?;
        let form = crate::auth::token_request_form(&assertion, scopes);
        let response = self
            .http
            .post(&endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| Delivery::Retry { status: 0, error: format!("token endpoint: {}", describe(&e)), after: None })?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            let error = format!("the token endpoint answered {status} {}", body["error"].as_str().unwrap_or_default());
            // A refused client assertion will be refused again: a configuration problem, not a message problem.
            return Err(Delivery::Retry { status, error, after: None });
        }
        let token = body["access_token"].as_str().ok_or_else(|| Delivery::Retry { status, error: "the token endpoint sent no access_token".into(), after: None })?.to_string();
        let lifetime = Duration::from_secs(body["expires_in"].as_u64().unwrap_or(300));
        *cached = Some((token.clone(), Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN)));
        Ok(Some(token))
    }

    /// The token endpoint: configured, or read once from the partner's SMART configuration.
    async fn token_endpoint(&self) -> Result<String, Delivery> {
        if let Some(endpoint) = self.token_endpoint.lock().ok().and_then(|e| e.clone()) {
            return Ok(endpoint);
        }
        let url = format!("{}/.well-known/smart-configuration", self.fhir_base);
        let unavailable = |error: String| Delivery::Retry { status: 0, error, after: None };
        let response = self.http.get(&url).send().await.map_err(|e| unavailable(format!("SMART discovery: {}", describe(&e))))?;
        let body: serde_json::Value = response.json().await.map_err(|e| unavailable(format!("SMART discovery did not answer JSON: {e}")))?;
        let endpoint = body["token_endpoint"].as_str().ok_or_else(|| unavailable("SMART discovery names no token_endpoint".into()))?.to_string();
        if let Ok(mut slot) = self.token_endpoint.lock() {
            *slot = Some(endpoint.clone());
        }
        Ok(endpoint)
    }
}

/// What to ask a partner for when the configuration does not say.
pub fn default_scopes(kind: crate::config::PartnerKind) -> &'static str {
    match kind {
        crate::config::PartnerKind::Payer => "system/Claim.c system/ClaimResponse.r system/Subscription.cr",
        _ => "system/*.cruds",
    }
}

/// A transport error in a few words, without the URL (which logs and the outbox keep apart).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "no answer"
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") }
}

/// The longest wait an outbox delivery believes a partner's `Retry-After` for: the backoff takes over beyond it.
const MAX_DELIVERY_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After` in seconds or as an HTTP date, believed up to `cap`.
fn retry_after(headers: &reqwest::header::HeaderMap, cap: Duration) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let format = time::macros::format_description!("[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT");
            let at = time::PrimitiveDateTime::parse(value, &format).ok()?.assume_utc();
            let now = time::OffsetDateTime::now_utc();
            if at <= now { Duration::ZERO } else { Duration::try_from(at - now).ok()? }
        }
    };
    Some(wait.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_caps_them() {
        let cap = Duration::from_secs(600);
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers, cap), None);
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers, cap), Some(Duration::from_secs(7)));
        headers.insert(reqwest::header::RETRY_AFTER, "86400".parse().unwrap());
        assert_eq!(retry_after(&headers, cap), Some(cap));
        headers.insert(reqwest::header::RETRY_AFTER, "Fri, 31 Dec 1999 23:59:59 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers, cap), Some(Duration::ZERO));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, cap), None);
    }
}
