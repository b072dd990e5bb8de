//! Partners' published keys (`[[clients]] jwks_url`): the JWKS fetched through the partner layer, cached for `auth.jwks_cache_secs` or the answer's `max-age` (within bounds), fetched again for an unknown `kid` at most once per `auth.jwks_refresh_min_secs`, and used from the cache while the URL is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::ClientKeys;
use crate::config::AuthConfig;

/// Longest time a fetched JWKS is used without asking again, whatever its `max-age` says.
const MAX_CACHE: Duration = Duration::from_secs(86_400);

/// Time one fetch may take; the token request waiting for it answers within the request time limit.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest JWKS read: a key set is a few kilobytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One client's JWKS URL and what was last fetched from it.
pub struct PublishedKeys {
    client_id: String,
    url: String,
    http: reqwest::Client,
    default_ttl: Duration,
    min_refresh: Duration,
    /// Held across a fetch, so concurrent assertions of the client wait for it rather than fetch too.
    cache: tokio::sync::Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    keys: Option<Arc<ClientKeys>>,
    fresh_until: Option<Instant>,
    last_fetch: Option<Instant>,
}

/// Why the keys of a JWKS URL could not be had (its text never carries the URL, which may hold a secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JwksError(pub String);

impl PublishedKeys {
    pub fn new(client_id: &str, url: &str, auth: &AuthConfig) -> Result<PublishedKeys, JwksError> {
        Ok(PublishedKeys {
            client_id: client_id.to_string(),
            url: url.to_string(),
            http: http_client()?,
            default_ttl: Duration::from_secs(auth.jwks_cache_secs),
            min_refresh: Duration::from_secs(auth.jwks_refresh_min_secs),
            cache: tokio::sync::Mutex::new(Cache::default()),
        })
    }

    /// The keys to verify an assertion whose header names `kid`: the cached set while it is fresh
    /// and names the key; otherwise fetched again, unless the last fetch was less than
    /// `jwks_refresh_min_secs` ago. A failed fetch keeps the cached set (it is logged, without the URL).
    pub async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<ClientKeys>, JwksError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let stale = cache.fresh_until.is_none_or(|until| now >= until);
        let unknown_kid = kid.is_some_and(|kid| cache.keys.as_ref().is_some_and(|keys| !keys.names(kid)));
        let may_fetch = cache.last_fetch.is_none_or(|last| now.duration_since(last) >= self.min_refresh);
        if (stale || unknown_kid) && may_fetch {
            cache.last_fetch = Some(now);
            match fetch(&self.http, &self.url).await {
                Ok((keys, max_age)) => {
                    let ttl = max_age.unwrap_or(self.default_ttl).clamp(self.min_refresh, MAX_CACHE);
                    cache.keys = Some(Arc::new(keys));
                    cache.fresh_until = Some(now + ttl);
                }
                Err(e) => {
                    let cached = if cache.keys.is_some() { "the keys fetched before stay in use" } else { "no keys of this client are known yet" };
                    tracing::warn!(client = %self.client_id, error = %e, "The client's JWKS URL could not be read; {cached}.");
                }
            }
        }
        cache.keys.clone().ok_or_else(|| JwksError("the client's JWKS URL has not answered yet".into()))
    }
}

/// The HTTP client for JWKS URLs: short timeout, no redirects (the registered URL is the one trusted).
fn http_client() -> Result<reqwest::Client, JwksError> {
    reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("iop-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| JwksError(format!("cannot set up the HTTP client: {e}")))
}

/// Fetches a JWKS once (`clients add --jwks-url` checks a URL with it): its usable keys, the keys left
/// out and why, and the answer's `max-age`.
pub async fn fetch_once(url: &str) -> Result<(ClientKeys, Vec<String>), JwksError> {
    let http = http_client()?;
    let response = get(&http, url).await?;
    let text = read_body(response).await?;
    ClientKeys::parse_published(&text).map_err(|e| JwksError(e.to_string()))
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<(ClientKeys, Option<Duration>), JwksError> {
    let response = get(http, url).await?;
    let max_age = max_age(response.headers());
    let text = read_body(response).await?;
    let (keys, _left_out) = ClientKeys::parse_published(&text).map_err(|e| JwksError(e.to_string()))?;
    Ok((keys, max_age))
}

async fn get(http: &reqwest::Client, url: &str) -> Result<reqwest::Response, JwksError> {
    let response = http.get(url).header(reqwest::header::ACCEPT, "application/jwk-set+json, application/json").send().await.map_err(|e| JwksError(super::describe(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(JwksError(format!("the JWKS URL answered {}", status.as_u16())));
    }
    Ok(response)
}

async fn read_body(mut response: reqwest::Response) -> Result<String, JwksError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| JwksError(super::describe(&e)))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(JwksError(format!("the JWKS is larger than {} KB", MAX_JWKS_BYTES / 1024)));
        }
    }
    String::from_utf8(body).map_err(|_| JwksError("the JWKS is not UTF-8 text".into()))
}

/// `Cache-Control: max-age=N`; `no-cache`/`no-store` count as 0 (the caller's lower bound applies).
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|directive| {
        let directive = directive.to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        directive.strip_prefix("max-age=").and_then(|n| n.trim_matches('"').parse::<u64>().ok()).map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        let headers = |value: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::CACHE_CONTROL, value.parse().unwrap());
            h
        };
        assert_eq!(max_age(&reqwest::header::HeaderMap::new()), None);
        assert_eq!(max_age(&headers("public, max-age=600")), Some(Duration::from_secs(600)));
        assert_eq!(max_age(&headers("Max-Age=\"60\"")), Some(Duration::from_secs(60)));
        assert_eq!(max_age(&headers("no-store")), Some(Duration::ZERO));
        assert_eq!(max_age(&headers("public")), None);
    }
}
