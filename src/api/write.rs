//! Writing one resource inside a store transaction: validation, authorization, version and parties, `meta`, index; shared by create, update, conditional operations, transactions and messages.

use std::sync::Arc;

use super::error::ApiError;
use super::fhir::now_instant;
use super::state::AppState;
use crate::auth::policy::parties_for_write;
use crate::auth::{Disclosure, Permission, Principal};
use crate::json::{Json, Object};
use crate::search::{self, Query};
use crate::store::{StoreError, Stored, Tx};

/// Why a write did not happen: a final answer, or a race lost to a concurrent writer that a fresh transaction may win.
#[derive(Debug)]
pub enum Failure {
    Api(ApiError),
    Retry,
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Duplicate => Failure::Retry,
            other => Failure::Api(other.into()),
        }
    }
}

/// How many times an operation that lost a race is run again before the client is told to retry.
pub const ATTEMPTS: usize = 8;

/// Validates a resource with the server's validator off the async threads; invalid → 422 with the issues.
pub async fn validate(state: &AppState, resource: Json, profiles: Vec<String>) -> Result<Json, ApiError> {
    let validator = Arc::clone(&state.validator);
    let (resource, report) = tokio::task::spawn_blocking(move || {
        let report = validator.validate_json(&resource, &profiles);
        (resource, report)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))?;
    if report.is_valid() {
        Ok(resource)
    } else {
        state.metrics.validation_failed();
        Err(ApiError::Unprocessable(report.issues))
    }
}

/// Checks that a body is a resource of the type in the URL.
pub fn check_type(resource: &Json, resource_type: &str) -> Result<(), ApiError> {
    let actual = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
    if actual != resource_type {
        return Err(ApiError::BadRequest(format!("the body is a {actual}, not a {resource_type}")));
    }
    Ok(())
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One version to write.
pub struct Change<'a> {
    pub resource_type: &'a str,
    pub id: String,
    pub resource: Json,
    /// `If-Match` version, if the client sent one.
    pub if_match: Option<i64>,
    /// Organizations the surrounding transaction or message is addressed to.
    pub addressed: &'a [String],
    /// `POST`: a new resource (its id is fresh); `PUT`: update, or create with the client's id.
    pub method: &'static str,
}

/// Writes one version in `tx`; returns it and whether it was created.
pub async fn write(tx: &mut Tx, state: &AppState, principal: &Principal, change: Change<'_>) -> Result<(Stored, bool), Failure> {
    let Change { resource_type, id, mut resource, if_match, addressed, method } = change;
    let current = if method == "POST" { None } else { tx.current(resource_type, &id).await? };
    let (version, previous_parties, created_by) = match &current {
        Some(current) => {
            // A resource the client may not see is, to that client, not there to be updated.
            if let Disclosure::Deny(_) = principal.disclosure(current.facts()) {
                return Err(ApiError::NotFound(format!("{resource_type}/{id} is not known")).into());
            }
            principal.may(resource_type, Permission::Update).map_err(ApiError::Forbidden)?;
            if let Some(expected) = if_match
                && expected != current.version
            {
                return Err(ApiError::PreconditionFailed(format!("If-Match names version {expected} but the current version is {}", current.version)).into());
            }
            (current.version + 1, current.parties.clone(), current.created_by.clone())
        }
        None => {
            if if_match.is_some() {
                return Err(ApiError::PreconditionFailed(format!("If-Match was sent but {resource_type}/{id} does not exist")).into());
            }
            principal.may(resource_type, Permission::Create).map_err(ApiError::Forbidden)?;
            (1, Vec::new(), principal.client_id.clone())
        }
    };
    let last_updated = now_instant();
    set_meta(&mut resource, &id, version, &last_updated);
    let mut addressed_here = search::addressed_organizations(&resource);
    addressed_here.extend(addressed.iter().cloned());
    let parties = parties_for_write(principal, state.program(), &addressed_here, &previous_parties);
    let index = search::extract(resource_type, &resource, &last_updated);
    let stored = Stored {
        resource_type: resource_type.to_string(),
        id,
        version,
        last_updated,
        labels: search::security_labels(&resource),
        body: resource.to_string_compact(),
        parties,
        created_by,
        method: if version == 1 { "POST" } else { "PUT" }.to_string(),
    };
    match tx.write(&stored, &index).await {
        Ok(()) => {}
        Err(StoreError::Conflict { current }) => {
            return match if_match {
                Some(expected) => Err(ApiError::PreconditionFailed(format!("If-Match names version {expected} but the current version is {current}")).into()),
                None => Err(Failure::Retry),
            };
        }
        Err(e) => return Err(e.into()),
    }
    Ok((stored, version == 1))
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta` and member order.
fn set_meta(resource: &mut Json, id: &str, version: i64, last_updated: &str) {
    let Some(object) = resource.as_object_mut() else { return };
    // `id` goes right after `resourceType` when it was missing, as FHIR JSON writers put it.
    if object.get("id").is_none() {
        let mut reordered = Object::new();
        for (k, v) in object.iter() {
            reordered.insert(k, v.clone());
            if k == "resourceType" {
                reordered.insert("id", Json::string(id));
            }
        }
        *object = reordered;
    }
    object.insert("id", Json::string(id));
    let mut meta = match object.remove("meta") {
        Some(Json::Object(m)) => m,
        _ => Object::new(),
    };
    meta.insert("versionId", Json::string(version.to_string()));
    meta.insert("lastUpdated", Json::string(last_updated));
    let mut rebuilt = Object::new();
    let mut placed = false;
    for (k, v) in object.iter() {
        rebuilt.insert(k, v.clone());
        if k == "id" {
            rebuilt.insert("meta", Json::Object(meta.clone()));
            placed = true;
        }
    }
    if !placed {
        rebuilt.insert("meta", Json::Object(meta));
    }
    *object = rebuilt;
}

/// Resolves a conditional operation's criteria to matches the client can see, under the type lock.
pub async fn conditional_matches(tx: &mut Tx, state: &AppState, principal: &Principal, resource_type: &str, criteria: &str) -> Result<Vec<Stored>, Failure> {
    let pairs = super::fhir::query_pairs(Some(criteria));
    if pairs.is_empty() {
        return Err(ApiError::BadRequest("a conditional operation needs search criteria".into()).into());
    }
    let mut query: Query = search::parse_query(resource_type, &pairs, 2, 2).map_err(|e| ApiError::BadRequest(e.0))?;
    query.count = 2;
    query.offset = 0;
    tx.lock_type(resource_type).await?;
    let (_, found) = tx.search(resource_type, &query, Some(principal.search_party())).await?;
    let _ = state;
    Ok(found.into_iter().filter(|s| principal.disclosure(s.facts()) == Disclosure::Allow).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_goes_after_id_and_keeps_other_members() {
        let mut r = crate::json::parse(br#"{"resourceType":"Patient","meta":{"profile":["http://x"]},"active":true}"#).unwrap();
        set_meta(&mut r, "p1", 2, "2026-01-01T00:00:00.000Z");
        assert_eq!(
            r.to_string_compact(),
            r#"{"resourceType":"Patient","id":"p1","meta":{"profile":["http://x"],"versionId":"2","lastUpdated":"2026-01-01T00:00:00.000Z"},"active":true}"#
        );
    }
}
