//! `ApiError`, the one place that turns a failure into an HTTP status and an OperationOutcome body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::outcome::{Issue, IssueCode, operation_outcome};
use crate::store::StoreError;

/// Every way a FHIR request can fail, by what the client should learn.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required: {0}")]
    Unauthorized(String),
    /// A bearer token was sent but is unknown, expired or revoked (RFC 6750 `invalid_token`).
    #[error("{0}")]
    InvalidToken(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is not well-formed JSON or FHIR XML (400); the issues say where it stops being readable.
    #[error("the body could not be read")]
    Unreadable(Vec<Issue>),
    /// The resource did not validate; the issues are the validator's.
    #[error("the resource is not valid")]
    Unprocessable(Vec<Issue>),
    #[error("the request took too long")]
    Timeout,
    #[error("too many requests from this client in flight")]
    TooManyRequests,
    /// 429 with its own reason and `Retry-After` (an export already running).
    #[error("{message}")]
    Throttled { message: String, retry_after_secs: u64 },
    /// An asynchronous job (a bulk export) failed; the reason is the client's to read (500).
    #[error("{0}")]
    JobFailed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { current } => ApiError::PreconditionFailed(format!("the resource was changed meanwhile; its current version is {current}")),
            StoreError::Duplicate => ApiError::Conflict("the resource was created concurrently; retry".into()),
            StoreError::Enrolled => ApiError::Conflict("a patient this write is about was enrolled in a substance-use program meanwhile; retry".into()),
            StoreError::Unavailable(m) => ApiError::Unavailable(format!("the store is busy ({m})")),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) | ApiError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unreadable(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests | ApiError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::JobFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The issues of the OperationOutcome sent back; internal detail is logged, never sent.
    pub fn issues(&self) -> Vec<Issue> {
        let code = match self {
            ApiError::BadRequest(_) => IssueCode::Invalid,
            ApiError::Unauthorized(_) | ApiError::InvalidToken(_) => IssueCode::Login,
            ApiError::Forbidden(_) => IssueCode::Forbidden,
            ApiError::NotFound(_) => IssueCode::NotFound,
            ApiError::MethodNotAllowed(_) | ApiError::NotAcceptable(_) | ApiError::UnsupportedMediaType(_) => IssueCode::NotSupported,
            ApiError::Conflict(_) | ApiError::PreconditionFailed(_) => IssueCode::Conflict,
            ApiError::PayloadTooLarge(_) => IssueCode::TooLong,
            ApiError::Unprocessable(issues) | ApiError::Unreadable(issues) => return issues.clone(),
            ApiError::Timeout => IssueCode::Timeout,
            ApiError::TooManyRequests | ApiError::Throttled { .. } => IssueCode::Throttled,
            ApiError::JobFailed(_) => IssueCode::Processing,
            ApiError::Unavailable(_) => IssueCode::Throttled,
            ApiError::Internal(_) => IssueCode::Exception,
        };
        let message = match self {
            ApiError::Internal(_) => "internal error; the request was not completed".to_string(),
            other => other.to_string(),
        };
        vec![Issue::error(code, "", message)]
    }
}

/// An OperationOutcome response with the given status.
pub fn outcome_response(status: StatusCode, issues: &[Issue]) -> Response {
    let body = operation_outcome(issues).to_string_compact();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(super::fhir::FHIR_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "Request failed.");
        }
        let mut response = outcome_response(self.status(), &self.issues());
        match self {
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"iop-gateway\""));
            }
            ApiError::InvalidToken(_) => {
                let challenge = HeaderValue::from_static("Bearer realm=\"iop-gateway\", error=\"invalid_token\"");
                response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            }
            ApiError::TooManyRequests | ApiError::Unavailable(_) => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Throttled { retry_after_secs, .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            _ => {}
        }
        response
    }
}
