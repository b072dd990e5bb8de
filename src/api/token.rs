//! `POST /auth/token`: the SMART Backend Services token endpoint (`client_credentials` with a `private_key_jwt` assertion). Errors follow OAuth 2.0 (RFC 6749 §5.2), as clients of a token endpoint expect.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::audit::{Audit, AuditOutcome};
use super::base::RequestBase;
use super::caller::{now_secs, record, token_hash};
use super::state::AppState;
use crate::auth::assertion::{unverified_issuer, unverified_kid};
use crate::auth::{AssertionError, ScopeSet};
use crate::store::TokenRecord;


struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError { status, error, description: description.into() }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.error, "error_description": self.description }).to_string();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

pub async fn token(State(state): State<AppState>, base: RequestBase, headers: HeaderMap, body: Body) -> Response {
    let mut audit = Audit::new("anonymous", "login", "E", None);
    match issue(&state, &base, &headers, body, &mut audit).await {
        Ok(response) => {
            state.metrics.token_granted();
            record(&state, &audit, AuditOutcome::Success).await;
            response
        }
        Err(e) => {
            state.metrics.token_denied(e.error);
            // The audit may know more than the client is told (which of two alike answers it was).
            let detail = audit.description.take().map(|d| format!(" ({d})")).unwrap_or_default();
            audit.description = Some(format!("{}: {}{detail}", e.error, e.description));
            record(&state, &audit, AuditOutcome::MinorFailure).await;
            e.into_response()
        }
    }
}

/// The `aud` values an assertion may carry: the token URL under `server.base_url` (else the listen
/// address), and under the request's base only when the gateway can vouch for it ([`RequestBase::own`]):
/// an assertion signed for another server is not accepted because a client wrote that server's name in `Host`.
fn audiences(state: &AppState, base: &RequestBase) -> Vec<String> {
    let mut audiences = vec![state.token_url()];
    if base.own && base.token_url() != audiences[0] {
        audiences.push(base.token_url());
    }
    audiences
}

async fn issue(state: &AppState, base: &RequestBase, headers: &HeaderMap, body: Body, audit: &mut Audit) -> Result<Response, OAuthError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", "send the token request as application/x-www-form-urlencoded"));
    }
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.map_err(|_| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", "the request body is too large or unreadable"))?;
    let form: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("grant_type") != Some("client_credentials") {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only client_credentials is supported"));
    }
    if field("client_assertion_type") != Some(crate::auth::ASSERTION_TYPE) {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("client_assertion_type must be {}", crate::auth::ASSERTION_TYPE)));
    }
    let assertion = field("client_assertion").ok_or_else(|| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", "client_assertion is missing"))?;
    let invalid_client = |e: AssertionError| OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", e.to_string());
    let client_id = unverified_issuer(assertion).map_err(invalid_client)?;
    let now = now_secs().max(0) as u64;
    let skew = state.loaded.config.auth.clock_skew_secs;
    let audiences = audiences(state, base);
    let audiences: Vec<&str> = audiences.iter().map(String::as_str).collect();
    let Some(client) = state.clients.get(&client_id) else {
        // An unknown client is verified against keys nobody holds, so it fails where and as a registered
        // client with a wrong key fails: same answer, similar time; client ids cannot be enumerated.
        audit.description = Some("the client assertion names no registered client".into());
        let e = state.unknown_client_keys.as_ref().map_or(AssertionError::Signature, |keys| {
            keys.verify(assertion, &client_id, &audiences, skew, now).err().unwrap_or(AssertionError::Signature)
        });
        return Err(invalid_client(e));
    };
    let kid = unverified_kid(assertion).map_err(invalid_client)?;
    let keys = client.keys.for_kid(kid.as_deref()).await.map_err(|e| {
        // Answered as a wrong key is: whether a client exists stays unknowable from outside.
        audit.description = Some(format!("the client's keys are not available: {e}"));
        invalid_client(AssertionError::Signature)
    })?;
    let claims = keys.verify(assertion, &client_id, &audiences, skew, now).map_err(invalid_client)?;
    audit.client = client_id.clone();
    let jti = claims.jti.unwrap_or_default();
    let fresh = state.store.remember_assertion(&client_id, &jti, claims.exp as i64).await.map_err(|_| OAuthError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store is not available"))?;
    if !fresh {
        return Err(OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", "the client assertion's jti was used before"));
    }
    // No scope asked for: the client's registered scopes (RFC 6749 §3.3, the server's default).
    // Otherwise what may be granted of what was asked; the answer's `scope` says what that is.
    let granted = match field("scope").filter(|s| !s.trim().is_empty()) {
        None => client.allowed.clone(),
        Some(text) => ScopeSet::parse_requested(text, |t| state.resource_types.contains(t)).0.intersect(&client.allowed),
    };
    if granted.is_empty() {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("none of the requested scopes may be granted to this client (it may have: {})", client.allowed),
        ));
    }
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "no randomness"))?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let lifetime = state.loaded.config.auth.access_token_lifetime_secs as i64;
    let record = TokenRecord { client: client_id, scope: granted.to_string(), expires_at: now as i64 + lifetime };
    state
        .store
        .save_token(&token_hash(&token), &record)
        .await
        .map_err(|_| OAuthError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store is not available"))?;
    let body = serde_json::json!({ "access_token": token, "token_type": "bearer", "expires_in": lifetime, "scope": record.scope }).to_string();
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET|POST /auth/authorize`: the authorization code flow is not offered (SMART Backend Services
/// only), said the OAuth way (RFC 6749 §4.1.2.1) and without redirecting anywhere, since no client
/// has a redirect URI registered here.
pub async fn authorize() -> Response {
    OAuthError::new(StatusCode::BAD_REQUEST, "unsupported_response_type", "this server offers SMART Backend Services only: get tokens with client_credentials and a client assertion at the token endpoint").into_response()
}
