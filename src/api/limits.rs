//! The limits every request passes: two concurrency budgets (partners with a valid token, everyone else), the body and request time limits (408), the request log and metrics, and the last word on errors: every 4xx/5xx leaves as an OperationOutcome and is audited.
//!
//! Why two budgets: the token endpoint and discovery must answer strangers, so a stranger can hold
//! their slots; partners' FHIR traffic draws on a budget only a valid token reaches. `/healthz`
//! draws on neither, so a liveness probe is never refused.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::audit::{Audit, AuditOutcome};
use super::caller::{self, Authenticated};
use super::error::{ApiError, outcome_response};
use super::fhir::{self, Format};
use super::state::AppState;
use crate::outcome::{Issue, IssueCode};

tokio::task_local! {
    /// Set by [`caller::record`] when a request's own code wrote its AuditEvent, so the limits layer
    /// audits only what nothing else did (extractor rejections, fallbacks, 408/429/503).
    pub static AUDITED: Cell<bool>;
}

/// The two concurrency budgets and the time limits, built once from `[server]`.
#[derive(Clone)]
pub struct Limits {
    authenticated: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    /// Store lookups of tokens not in the cache. Held only for the lookup, never while a body
    /// trickles in, so slow strangers cannot keep a partner's fresh token from being checked.
    lookups: Arc<Semaphore>,
    request_timeout: Duration,
    body_timeout: Duration,
}

impl Limits {
    pub fn new(state: &AppState) -> Limits {
        let config = &state.loaded.config.server;
        Limits {
            authenticated: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            unauthenticated: Arc::new(Semaphore::new(config.max_unauthenticated_requests)),
            lookups: Arc::new(Semaphore::new(config.max_unauthenticated_requests)),
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            body_timeout: Duration::from_secs(config.body_read_timeout_secs),
        }
    }
}

/// How long a request waits for a token-lookup slot before 503.
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

/// The middleware: budgets, time limits, outcome and audit of refusals, metrics and the log line.
pub async fn limits(state: AppState, limits: Limits, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = crate::telemetry::method_label(request.method().as_str());
    let route = super::route_template(request.uri().path());
    let address = request.extensions().get::<axum::extract::ConnectInfo<crate::server::PeerAddr>>().map(|c| c.0.0.ip().to_string());
    let response = if route == "/healthz" {
        next.run(request).await
    } else {
        // The format is decided once, here, for every FHIR endpoint alike; the others answer in their own.
        let negotiated = if is_fhir(request.uri().path()) { fhir::negotiate(request.headers(), &fhir::query_pairs(request.uri().query())) } else { Ok(Format::Json) };
        let format = *negotiated.as_ref().unwrap_or(&Format::Json);
        let (client, response) = AUDITED.scope(Cell::new(false), admit(&state, &limits, request, next, negotiated.err())).await;
        let response = as_outcome(response).await;
        if response.status().as_u16() >= 400 {
            audit_refusal(&state, &client, address, request_action(method), response.status()).await;
        }
        fhir::in_format(response, format, &**state.validator.definitions()).await
    };
    let status = response.status().as_u16();
    state.metrics.observe_request(route, method, status, started.elapsed());
    tracing::info!(method = method, route = route, status = status, latency_ms = started.elapsed().as_millis() as u64, "Request handled.");
    response
}

/// Whether the request's own code audited it, and under which client.
struct Audited {
    done: bool,
    client: Option<String>,
}

/// Whether a path is a FHIR endpoint (answered in the negotiated format), rather than SMART,
/// operations, the IOP records, payers' notifications (JSON of their own) or Bulk Data files (NDJSON).
fn is_fhir(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    !matches!(first, "auth" | ".well-known" | "healthz" | "readyz" | "metrics" | "iop" | "admin" | "notifications" | "$export-file")
}

/// Takes a slot in the budget the request belongs to and runs it under the time limits; a request
/// asking for a format no FHIR endpoint can produce is answered with `refusal` (406) once it has its slot.
async fn admit(state: &AppState, limits: &Limits, mut request: Request, next: Next, refusal: Option<ApiError>) -> (Audited, Response) {
    if let Some(refusal) = unreadable_path(request.uri().path()) {
        return (audited(None), refusal.into_response());
    }
    // Only a token the store honours reaches the partners' budget; a made-up one counts as anonymous.
    // A token not in the cache is looked up under a budget of its own, waited for briefly (lookups are quick).
    let mut client = None;
    let mut permit: Option<OwnedSemaphorePermit> = None;
    if has_bearer(&request) {
        let (mut parts, body) = request.into_parts();
        let principal = match caller::cached_principal(&parts, state) {
            Some(principal) => Some(principal),
            None => {
                let Ok(Ok(_lookup)) = tokio::time::timeout(LOOKUP_WAIT, limits.lookups.acquire()).await else {
                    return (audited(None), busy("token lookup"));
                };
                caller::authenticate(&parts, state).await.ok()
            }
        };
        if let Some(principal) = principal {
            permit = match limits.authenticated.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return (audited(Some(principal.client_id)), busy("authenticated")),
            };
            client = Some(principal.client_id.clone());
            parts.extensions.insert(Authenticated(principal));
        }
        request = Request::from_parts(parts, body);
    }
    let _permit = match permit {
        Some(permit) => permit,
        None => match limits.unauthenticated.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => return (audited(client), busy("unauthenticated")),
        },
    };
    if let Some(refusal) = refusal {
        return (audited(client), refusal.into_response());
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| Body::new(DeadlineBody::new(body, limits.body_timeout, timed_out.clone())));
    let response = match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    // A handler that failed to read a body that did not arrive in time answers 400 or 413 (and may
    // have audited that); the truth is 408, so that is answered and audited too.
    let body_late = timed_out.load(Ordering::Acquire);
    let response = if body_late { ApiError::Timeout.into_response() } else { response };
    let done = !body_late && AUDITED.try_with(Cell::get).unwrap_or(false);
    (Audited { done, client }, response)
}

fn audited(client: Option<String>) -> Audited {
    Audited { done: false, client }
}

fn busy(budget: &str) -> Response {
    ApiError::Unavailable(format!("the gateway is at its limit of {budget} requests; retry shortly")).into_response()
}

fn has_bearer(request: &Request) -> bool {
    request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "))
}

/// A path whose percent-decoding is not UTF-8 cannot name anything; answered here, before routing
/// (axum's path extractor would answer it in plain text).
fn unreadable_path(path: &str) -> Option<ApiError> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&decoded).err().map(|_| ApiError::BadRequest("the request path is not valid UTF-8 once percent-decoded".into()))
}

fn request_action(method: &str) -> (&'static str, &'static str) {
    match method {
        "POST" => ("create", "C"),
        "PUT" | "PATCH" => ("update", "U"),
        "DELETE" => ("delete", "D"),
        "GET" | "HEAD" => ("read", "R"),
        _ => ("operation", "E"),
    }
}

/// Audits a refusal nothing else audited (rejections before a handler ran, 408, 429, 503).
async fn audit_refusal(state: &AppState, audited: &Audited, address: Option<String>, (subtype, action): (&'static str, &'static str), status: StatusCode) {
    if audited.done {
        return;
    }
    let mut audit = Audit::new(audited.client.as_deref().unwrap_or("anonymous"), subtype, action, address);
    audit.description = Some(format!("refused: {} {}", status.as_u16(), status.canonical_reason().unwrap_or("")));
    caller::record(state, &audit, AuditOutcome::from_status(status.as_u16())).await;
}

/// Makes sure an error leaves as an OperationOutcome: axum's own rejections (a path or query it
/// cannot parse) are plain text. The token endpoint's OAuth JSON errors are left as they are.
async fn as_outcome(response: Response) -> Response {
    if response.status().as_u16() < 400 {
        return response;
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    if content_type.starts_with("application/fhir+json") || content_type.starts_with("application/json") {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let detail: String = String::from_utf8_lossy(&text).chars().take(200).collect();
    let message = match detail.trim() {
        "" => parts.status.canonical_reason().unwrap_or("the request was refused").to_string(),
        detail => detail.to_string(),
    };
    let code = if parts.status.is_server_error() { IssueCode::Exception } else { IssueCode::Invalid };
    let mut outcome = outcome_response(parts.status, &[Issue::error(code, "", message)]);
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW] {
        if let Some(value) = parts.headers.get(&name) {
            outcome.headers_mut().insert(name, value.clone());
        }
    }
    outcome
}

/// A request body that must have arrived in full by a deadline. Past it, a read the handler is
/// waiting on fails and `timed_out` is set, so the limits layer answers 408.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Body, within: Duration, timed_out: Arc<AtomicBool>) -> DeadlineBody {
        DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep(within)), timed_out }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(std::io::ErrorKind::TimedOut, "the request body did not arrive in time")))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_do_not_decode_to_utf8_are_refused() {
        assert!(unreadable_path("/Patient/%FF%FE").is_some());
        assert!(unreadable_path("/Patient/%C3%A9").is_none());
        assert!(unreadable_path("/Patient/abc%2").is_none());
        assert!(unreadable_path("/Patient/100%").is_none());
    }

    /// A body whose bytes never come.
    struct Stalled;

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_fails_and_says_so() {
        let flag = Arc::new(AtomicBool::new(false));
        let body = Body::new(DeadlineBody::new(Body::new(Stalled), Duration::from_millis(50), flag.clone()));
        assert!(axum::body::to_bytes(body, 1024).await.is_err());
        assert!(flag.load(Ordering::Acquire));
        let flag = Arc::new(AtomicBool::new(false));
        let body = Body::new(DeadlineBody::new(Body::from("complete"), Duration::from_millis(50), flag.clone()));
        assert_eq!(axum::body::to_bytes(body, 1024).await.unwrap(), "complete");
        assert!(!flag.load(Ordering::Acquire));
    }
}
