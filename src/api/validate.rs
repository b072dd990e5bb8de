//! `POST /{type}/$validate` and `POST /{type}/{id}/$validate`: validates a resource (sent as is, or in a Parameters `resource`) against R4, the bundled profiles and any `profile` asked for, and answers with the OperationOutcome; nothing is stored.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;

use super::caller::Caller;
use super::error::ApiError;
use super::fhir::{self, query_pairs};
use super::rest::{finish, is_reserved_word, known_type};
use super::state::AppState;
use crate::auth::Permission;
use crate::json::Json;

/// `POST /{type}/{id}` routes here when `id` is `$validate`.
pub async fn type_operation(State(state): State<AppState>, caller: Caller, Path((resource_type, operation)): Path<(String, String)>, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    let audit = caller.audit("operation", "E");
    let result = async {
        if operation != "$validate" {
            let what = if is_reserved_word(&operation) { "is not supported" } else { "is not supported: a resource is created with POST /{type} and updated with PUT" };
            return Err(ApiError::MethodNotAllowed(format!("POST /{resource_type}/{operation} {what} (operations: $validate)")));
        }
        validate(&state, &caller, &resource_type, None, &headers, &uri, body).await
    }
    .await;
    finish(&state, audit, result).await
}

/// `POST /{type}/{id}/{operation}`: `$validate` of a resource meant to be that instance; its id, if
/// it has one, must be the instance's.
pub async fn instance_operation(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let mut audit = caller.audit("operation", "E");
    audit.entities.push(format!("{resource_type}/{id}"));
    let result = async {
        if operation != "$validate" {
            return Err(ApiError::MethodNotAllowed(format!("POST /{resource_type}/[id]/{operation} is not supported (operations on an instance: $validate)")));
        }
        super::write::check_id(&id)?;
        validate(&state, &caller, &resource_type, Some(&id), &headers, &uri, body).await
    }
    .await;
    finish(&state, audit, result).await
}

/// `$validate` at type level (`instance` is `None`) or instance level.
async fn validate(state: &AppState, caller: &Caller, resource_type: &str, instance: Option<&str>, headers: &HeaderMap, uri: &Uri, body: Body) -> Result<Response, ApiError> {
    let pairs = query_pairs(uri.query());
    known_type(state, resource_type)?;
    // Validating reads nothing stored; any permission on the type lets a partner check what it is about to send.
    if !caller.principal.scopes.touches(resource_type) {
        caller.principal.may(resource_type, Permission::Create).map_err(ApiError::Forbidden)?;
    }
    let mut profiles: Vec<String> = pairs.iter().filter(|(k, _)| k == "profile").map(|(_, v)| v.clone()).collect();
    // Problems only the XML form can have are part of the report, as `validate` reports them.
    let (body, read_issues) = fhir::read_body(state, headers, body).await?;
    let resource = if body.get("resourceType").and_then(Json::as_str) == Some("Parameters") && resource_type != "Parameters" {
        let mut resource = None;
        for parameter in body.get("parameter").and_then(Json::as_array).unwrap_or_default() {
            match parameter.get("name").and_then(Json::as_str) {
                Some("resource") => resource = parameter.get("resource").cloned(),
                Some("profile") => {
                    if let Some(p) = parameter.get("valueUri").or(parameter.get("valueCanonical")).and_then(Json::as_str) {
                        profiles.push(p.to_string());
                    }
                }
                _ => {}
            }
        }
        resource.ok_or_else(|| ApiError::BadRequest("the Parameters has no 'resource' parameter".into()))?
    } else {
        body
    };
    let actual = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
    if actual != resource_type {
        return Err(ApiError::BadRequest(format!("the resource is a {actual}, not a {resource_type}")));
    }
    if let Some(id) = instance
        && let Some(own) = resource.get("id").and_then(Json::as_str)
        && own != id
    {
        return Err(ApiError::BadRequest(format!("the resource's id '{own}' is not the id in the URL '{id}'")));
    }
    let validator = std::sync::Arc::clone(&state.validator);
    let mut report = tokio::task::spawn_blocking(move || validator.validate_json(&resource, &profiles))
        .await
        .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))?;
    if !read_issues.is_empty() {
        report.issues.splice(0..0, read_issues);
    }
    if !report.is_valid() {
        state.metrics.validation_failed();
    }
    Ok(fhir::json_response(StatusCode::OK, report.to_operation_outcome().to_string_compact()))
}
