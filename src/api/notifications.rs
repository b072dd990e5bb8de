//! `POST /notifications/{partner}`: where a payer's PAS Subscription delivers its notifications (handshake, heartbeat, event-notification with the full PAS response Bundle).
//!
//! Not behind SMART tokens: the payer is no client of ours. It proves itself with the secret the
//! gateway put in the Subscription's `channel.header` (`Authorization: Bearer <secret>`), compared
//! by hash in constant time. A missing or wrong secret, or a partner without a Subscription here,
//! is one and the same 401, so the endpoint tells nobody which payers have one. 200 is answered only
//! once what the notification carries is recorded (nothing acknowledged is lost).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::audit::Audit;
use super::error::ApiError;
use super::fhir;
use super::rest::finish;
use super::state::AppState;
use crate::exchange::subscription;

/// The handler.
pub async fn receive(State(state): State<AppState>, Path(partner): Path<String>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers.clone();
    let mut audit = Audit::new(&format!("partner:{partner}"), "operation", "U", super::caller::peer_address(&parts));
    audit.description = Some("subscription notification".into());
    let result = async {
        let row = state.store.subscription(&partner).await?;
        let presented = bearer(&headers);
        let Some(row) = row.filter(|row| presented.is_some_and(|secret| subscription::secret_matches(secret, &row.secret_hash))) else {
            return Err(ApiError::Unauthorized("the notification does not carry the secret of a Subscription the gateway holds at this partner".into()));
        };
        let bytes = fhir::read_bytes(&headers, body, state.loaded.config.server.max_body_bytes).await?;
        let bundle = crate::json::parse(&bytes).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
        let notification = subscription::parse_notification(&bundle).map_err(ApiError::BadRequest)?;
        let received = subscription::receive(&state, &row, notification).await?;
        audit.description = Some(format!(
            "subscription notification: {} event(s) applied, {} duplicate(s), {} fetched from $events",
            received.applied, received.duplicates, received.fetched
        ));
        let issue = crate::outcome::Issue::information(crate::outcome::IssueCode::Informational, "", "notification received");
        let outcome = crate::outcome::operation_outcome(&[issue]).to_string_compact();
        Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], outcome).into_response())
    }
    .await;
    finish(&state, audit, result).await
}

/// The secret in `Authorization: Bearer …`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    (value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ")).then(|| value[7..].trim())
}
