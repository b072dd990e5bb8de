//! The authenticated caller of a FHIR endpoint: the bearer token is looked up (cache, then store), the client's in-flight limit is taken, and failures are audited.
//!
//! Also the disclosure choke point: [`disclose`] and [`disclose_all`] are the only way a stored
//! resource reaches a response body; every handler that returns resources goes through them.

use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use super::audit::{Audit, AuditOutcome};
use super::base::RequestBase;
use super::error::ApiError;
use super::part2;
use super::state::{AppState, CachedToken};
use crate::auth::{Disclosure, Principal, ScopeSet};
use crate::store::Stored;

/// A request's authenticated client; holds one of its in-flight permits.
pub struct Caller {
    pub principal: Principal,
    pub address: Option<String>,
    /// Where the request's links point ([`RequestBase::of`]).
    pub base: RequestBase,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Caller {
    /// The same caller for a part of its request (a batch entry), holding the same in-flight permit.
    pub fn part(&self) -> Caller {
        Caller { principal: self.principal.clone(), address: self.address.clone(), base: self.base.clone(), _permit: self._permit.clone() }
    }

    pub fn audit(&self, subtype: &'static str, action: &'static str) -> Audit {
        Audit::new(&self.principal.client_id, subtype, action, self.address.clone())
    }
}

/// SHA-256 of a token, as stored.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn peer_address(parts: &Parts) -> Option<String> {
    parts.extensions.get::<ConnectInfo<crate::server::PeerAddr>>().map(|c| c.0.0.ip().to_string())
}

/// The principal the limits layer already authenticated (it decides the request's budget by it).
#[derive(Clone, Debug)]
pub struct Authenticated(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let address = peer_address(parts);
        let checked = match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(principal)) => Ok(principal.clone()),
            None => authenticate(parts, state).await,
        };
        let principal = match checked {
            Ok(principal) => principal,
            Err(e) => {
                let (subtype, action) = match parts.method.as_str() {
                    "POST" => ("create", "C"),
                    "PUT" => ("update", "U"),
                    "DELETE" => ("delete", "D"),
                    _ => ("read", "R"),
                };
                let mut audit = Audit::new("anonymous", subtype, action, address);
                audit.description = Some(e.to_string());
                record(state, &audit, AuditOutcome::MinorFailure).await;
                return Err(e);
            }
        };
        let permit = match state.clients.get(&principal.client_id).map(|c| c.in_flight.clone().try_acquire_owned()) {
            Some(Ok(permit)) => permit,
            _ => return Err(ApiError::TooManyRequests),
        };
        Ok(Caller { principal, address, base: RequestBase::of(parts, state), _permit: Arc::new(permit) })
    }
}

fn bearer_token(parts: &Parts) -> Option<&str> {
    let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).map(str::trim).filter(|t| !t.is_empty())
}

/// The principal of a request's token if this instance looked it up within `auth.token_cache_ttl_secs`.
pub fn cached_principal(parts: &Parts, state: &AppState) -> Option<Principal> {
    let hash = token_hash(bearer_token(parts)?);
    let now = now_secs();
    let ttl = state.loaded.config.auth.token_cache_ttl_secs as i64;
    let cache = state.token_cache.lock().ok()?;
    let cached = cache.get(&hash)?;
    (cached.expires_at > now && now < cached.cached_at + ttl).then(|| cached.principal.clone())
}

/// The principal of a request's bearer token: from the cache while fresh, else from the store.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    let token =
        bearer_token(parts).ok_or_else(|| ApiError::Unauthorized("send an access token from the token endpoint as 'Authorization: Bearer <token>'".into()))?;
    if let Some(principal) = cached_principal(parts, state) {
        return Ok(principal);
    }
    let hash = token_hash(token);
    let now = now_secs();
    let ttl = state.loaded.config.auth.token_cache_ttl_secs as i64;
    let record = state.store.find_token(&hash).await?.ok_or_else(|| ApiError::InvalidToken("the access token is not valid".into()))?;
    if record.expires_at <= now {
        return Err(ApiError::InvalidToken("the access token has expired".into()));
    }
    let principal = principal_of(state, &record.client, &record.scope).ok_or_else(|| ApiError::InvalidToken("the access token's client is no longer registered".into()))?;
    if ttl > 0
        && let Ok(mut cache) = state.token_cache.lock()
    {
        if cache.len() > 10_000 {
            cache.retain(|_, c| c.expires_at > now && now < c.cached_at + ttl);
        }
        cache.insert(hash, CachedToken { principal: principal.clone(), expires_at: record.expires_at, cached_at: now });
    }
    Ok(principal)
}

/// The principal of a registered client holding a token with `scope` (a request's, or an export job's
/// when its worker runs later); `None` once the client is no longer registered.
pub fn principal_of(state: &AppState, client_id: &str, scope: &str) -> Option<Principal> {
    let client = state.clients.get(client_id)?;
    Some(Principal {
        client_id: client_id.to_string(),
        role: client.config.role,
        organization: client.organization.clone(),
        // A token never grants more than the client is allowed now, even if its registration shrank.
        scopes: ScopeSet::parse(scope).unwrap_or_default().intersect(&client.allowed),
        purpose: Some(client.config.purpose()),
    })
}

/// Appends an audit record outside any transaction; a failure to audit is logged (the response is already decided).
pub async fn record(state: &AppState, audit: &Audit, outcome: AuditOutcome) {
    // Tells the limits layer this request has its AuditEvent (outside a request there is no flag).
    let _ = super::limits::AUDITED.try_with(|audited| audited.set(true));
    if audit.recorded {
        return;
    }
    if let Err(e) = state.store.append_audit(&audit.row(&state.base_url, outcome)).await {
        tracing::error!(error = %e, "Could not append to the audit trail.");
    }
    if outcome == AuditOutcome::Success {
        record_disclosures(state, audit).await;
    }
}

/// Appends the accounting of the disclosures a request made (nothing when it made none).
pub async fn record_disclosures(state: &AppState, audit: &Audit) {
    for row in super::audit::disclosure_rows(&audit.disclosures, &audit.client, audit.address.as_deref(), &state.base_url) {
        if let Err(e) = state.store.append_audit(&row).await {
            tracing::error!(error = %e, "Could not append a disclosure to the audit trail.");
        }
    }
}

/// The disclosure check for one resource: denied resources are answered as not found, so their
/// existence does not leak. Part 2 data its consent lets go carries the refrain and is accounted for.
pub async fn disclose(state: &AppState, principal: &Principal, stored: &mut Stored, audit: &mut Audit) -> Result<(), ApiError> {
    let consents = part2::consents_for(state, principal, stored).await;
    let decision = principal.disclosure(stored.facts_with(&consents));
    match decision {
        Disclosure::Deny(reason) => {
            audit.description = Some(format!("disclosure of {} denied: {reason}", stored.reference()));
            Err(ApiError::NotFound(format!("{} is not known", stored.reference())))
        }
        allowed => {
            disclosed(principal, &allowed, stored, audit);
            Ok(())
        }
    }
}

/// Accounts for a consented disclosure and marks what leaves with the refrain.
fn disclosed(principal: &Principal, decision: &Disclosure, stored: &mut Stored, audit: &mut Audit) {
    if let Some(d) = part2::Disclosed::of(principal, decision, stored.reference()) {
        part2::with_refrain(stored);
        audit.disclosures.push(d);
    }
}

fn note_withheld(audit: &mut Audit, note: String) {
    audit.description = Some(match audit.description.take() {
        Some(d) => format!("{d}; {note}"),
        None => note,
    });
}

/// The disclosure check for many resources (search results, includes, history): denied ones are left out and noted in the audit.
pub async fn disclose_all(state: &AppState, principal: &Principal, found: Vec<Stored>, audit: &mut Audit) -> Vec<Stored> {
    let mut kept = Vec::with_capacity(found.len());
    for mut stored in found {
        let consents = part2::consents_for(state, principal, &stored).await;
        let decision = principal.disclosure(stored.facts_with(&consents));
        match decision {
            Disclosure::Deny(reason) => note_withheld(audit, format!("withheld {}: {reason}", stored.reference())),
            allowed => {
                disclosed(principal, &allowed, &mut stored, audit);
                kept.push(stored);
            }
        }
    }
    kept
}

/// The disclosure check for one version of a resource, decided by its current version (who is a
/// party, whose consent) and the labels of both; `None` when the version does not exist or is
/// withheld, which callers answer alike.
pub async fn disclose_version(state: &AppState, principal: &Principal, current: &Stored, version: Option<Stored>, audit: &mut Audit) -> Option<Stored> {
    let version = version?;
    let mut labels = current.labels.clone();
    labels.extend(version.labels.iter().cloned());
    let with_labels = Stored { labels, body: String::new(), ..current.clone() };
    let consents = part2::consents_for(state, principal, &with_labels).await;
    disclose_version_with(principal, current, version, &consents, audit)
}

/// [`disclose_version`] with the consent rules already at hand (the export worker reads them per page).
pub fn disclose_version_with(principal: &Principal, current: &Stored, mut version: Stored, consents: &[crate::auth::consent::Rule], audit: &mut Audit) -> Option<Stored> {
    match principal.disclosure_of_version(current.facts_with(consents), version.facts()) {
        Disclosure::Deny(reason) => {
            note_withheld(audit, format!("withheld {}/_history/{}: {reason}", version.reference(), version.version));
            None
        }
        allowed => {
            disclosed(principal, &allowed, &mut version, audit);
            Some(version)
        }
    }
}
