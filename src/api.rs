//! The HTTP layer: the axum router of the FHIR endpoint, the token endpoint, discovery and operations endpoints, and the limits every request passes. The only module that knows HTTP status codes.
//!
//! - [`rest`]: create, read, vread, update, history, search (`GET /{type}`, `GET`/`POST /{type}/_search`); [`bundle`]: transaction and batch;
//!   [`export`]: Bulk Data `$export` (kick-off, status, files) and `Patient/[id]/$everything`; [`message`]: `$process-message`; [`notifications`]: payers' subscription notifications; [`validate`]: `$validate`; [`audit_search`]: `GET /AuditEvent`.
//! - [`caller`]: bearer-token authentication and the disclosure choke point; [`write`]: the one write path;
//!   [`base`]: the base URL of a request, which every link starts with.
//! - [`token`], [`metadata`]: SMART token endpoint, CapabilityStatement and SMART discovery.
//! - [`error`]: `ApiError` → status + OperationOutcome; [`fhir`]: FHIR HTTP conventions; [`audit`]: AuditEvents.
//! - [`limits`]: the two request budgets, time limits, and the outcome and audit of every refusal;
//!   [`connection`]: hyper's bare protocol refusals (400/414/431) rewritten as OperationOutcomes.

pub mod audit;
pub mod audit_search;
pub mod base;
pub mod bundle;
pub mod caller;
pub mod connection;
pub mod error;
pub mod export;
pub mod fhir;
pub mod limits;
pub mod message;
pub mod metadata;
pub mod notifications;
pub mod part2;
pub mod records;
pub mod rest;
pub mod state;
pub mod subscriptions;
pub mod token;
pub mod validate;
pub mod write;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use error::ApiError;
pub use state::AppState;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let budgets = limits::Limits::new(&state);
    let limits_state = state.clone();
    Router::new()
        .route("/", get(rest::search_system).post(bundle::transaction_or_batch))
        .route("/_history", get(rest::history_system))
        .route("/metadata", get(metadata::metadata))
        .route("/.well-known/smart-configuration", get(metadata::smart_configuration))
        .route(crate::auth::TOKEN_PATH, post(token::token))
        .route(crate::auth::AUTHORIZE_PATH, get(token::authorize).post(token::authorize))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/iop/records", get(records::list).post(records::post))
        .route("/iop/records/{record_type}/{id}", get(records::read))
        .route("/admin/outbox", get(records::outbox_list))
        .route("/admin/outbox/{id}", get(records::outbox_show))
        .route("/admin/outbox/{id}/{operation}", post(records::outbox_replay))
        .route("/notifications/{partner}", post(notifications::receive))
        .route("/$export", get(export::system).post(export::system))
        .route("/Patient/$export", get(export::patient).post(export::patient))
        .route("/Group/{id}/$export", get(export::group).post(export::group))
        .route("/Patient/{id}/$everything", get(export::everything))
        .route("/$export-status/{job}", get(export::status).delete(export::cancel))
        .route("/$export-file/{job}/{file}", get(export::file))
        .route("/Subscription", get(subscriptions::search).post(subscriptions::create).put(subscriptions::unsupported).delete(subscriptions::unsupported))
        .route("/Subscription/_search", get(subscriptions::search).post(subscriptions::unsupported))
        .route("/Subscription/_history", get(subscriptions::unsupported))
        .route("/Subscription/{id}", get(subscriptions::read).put(subscriptions::update).delete(subscriptions::delete).post(subscriptions::unsupported))
        .route("/Subscription/{id}/{operation}", get(subscriptions::operation).post(subscriptions::unsupported))
        .route("/Subscription/{id}/_history/{vid}", get(subscriptions::unsupported))
        .route("/{type}", get(rest::search_type).post(rest::create).put(rest::conditional_update))
        .route("/{type}/_search", get(rest::search_type).post(rest::search_post))
        .route("/{type}/_history", get(rest::history_type))
        .route("/{type}/{id}", get(rest::read).put(rest::update).post(validate::type_operation))
        .route("/{type}/{id}/_history", get(rest::history))
        .route("/{type}/{id}/{operation}", get(rest::compartment_search).post(validate::instance_operation))
        .route("/{type}/{id}/_history/{vid}", get(rest::vread))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { ApiError::MethodNotAllowed(format!("{method} is not supported on {}", uri.path())) })
        .with_state(state)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| ApiError::Internal("a handler panicked".into()).into_response()))
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let (state, budgets) = (limits_state.clone(), budgets.clone());
            async move { limits::limits(state, budgets, request, next).await }
        }))
}

/// Audits a request refused before it reached the router (hyper could not parse it, or its head
/// did not arrive in time), with the status it was answered with.
pub async fn audit_protocol_refusal(state: &AppState, peer: SocketAddr, status: u16, why: &str) {
    let mut audit = audit::Audit::new("anonymous", "operation", "E", Some(peer.ip().to_string()));
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    audit.description = Some(format!("refused: {status} {reason}: {why}"));
    caller::record(state, &audit, audit::AuditOutcome::from_status(status)).await;
}

/// The route template of a path, for logs and metric labels: never the path itself, which may carry identifiers.
fn route_template(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [] => "/",
        ["_history"] => "/_history",
        ["metadata"] => "/metadata",
        [".well-known", "smart-configuration"] => "/.well-known/smart-configuration",
        ["auth", "token"] => "/auth/token",
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        ["iop", "records"] => "/iop/records",
        ["iop", "records", _, _] => "/iop/records/{record_type}/{id}",
        ["admin", "outbox"] => "/admin/outbox",
        ["admin", "outbox", _] => "/admin/outbox/{id}",
        ["admin", "outbox", _, _] => "/admin/outbox/{id}/{operation}",
        ["notifications", _] => "/notifications/{partner}",
        ["$export-status", _] => "/$export-status/{job}",
        ["$export-file", _, _] => "/$export-file/{job}/{file}",
        [t] if t.starts_with('$') => "/$operation",
        [_] => "/{type}",
        [_, op] if op.starts_with('$') => "/{type}/$operation",
        [_, "_search"] => "/{type}/_search",
        [_, "_history"] => "/{type}/_history",
        [_, _] => "/{type}/{id}",
        [_, _, "_history"] => "/{type}/{id}/_history",
        [_, _, op] if op.starts_with('$') => "/{type}/{id}/$operation",
        [_, _, "_history", _] => "/{type}/{id}/_history/{vid}",
        [_, _, _] => "/{type}/{id}/{compartment}",
        _ => "unmatched",
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}").into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ready\"}").into_response(),
        Err(e) => ApiError::Unavailable(format!("the store does not answer: {e}")).into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    // The queue is read from the store: it is shared by every instance, so any instance reports it whole.
    if let Ok(depth) = state.store.outbox_depth().await {
        text.push_str(&crate::telemetry::Metrics::render_queue(&depth, crate::exchange::now_ms()));
    }
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

#[cfg(test)]
mod tests {
    use super::route_template;

    #[test]
    fn route_labels_never_carry_ids() {
        assert_eq!(route_template("/Patient/123"), "/{type}/{id}");
        assert_eq!(route_template("/Patient/123/_history/2"), "/{type}/{id}/_history/{vid}");
        assert_eq!(route_template("/Observation"), "/{type}");
        assert_eq!(route_template("/Observation/_search"), "/{type}/_search");
        assert_eq!(route_template("/Patient/123/$validate"), "/{type}/{id}/$operation");
        assert_eq!(route_template("/$process-message"), "/$operation");
        assert_eq!(route_template("/a/b/c/d/e"), "unmatched");
    }
}
