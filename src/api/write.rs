//! Writing one resource inside a store transaction: validation, authorization, version and parties, `meta`, index; shared by create, update, conditional operations, transactions and messages.

use std::sync::Arc;

use super::error::ApiError;
use super::fhir::now_instant;
use super::state::AppState;
use crate::auth::labels;
use crate::auth::policy::parties_for_version;
use crate::auth::{Permission, Principal};
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
            StoreError::Duplicate | StoreError::Enrolled => Failure::Retry,
            other => Failure::Api(other.into()),
        }
    }
}

/// How many times an operation that lost a race is run again before the client is told to retry.
pub const ATTEMPTS: usize = 8;

/// Resources of at most this many JSON values (a screening Observation has ~30, a three-entry
/// referral Bundle ~70) are validated on the async thread: that takes well under a millisecond,
/// less than handing them to a blocking thread and back costs on a busy machine.
const VALIDATE_INLINE_VALUES: usize = 256;

/// Validates a resource with the server's validator (larger ones off the async threads); invalid → 422 with the issues.
pub async fn validate(state: &AppState, resource: Json, profiles: Vec<String>) -> Result<Json, ApiError> {
    let mut budget = VALIDATE_INLINE_VALUES;
    let (resource, report) = if at_most_values(&resource, &mut budget) {
        let report = state.validator.validate_json(&resource, &profiles);
        (resource, report)
    } else {
        let validator = Arc::clone(&state.validator);
        tokio::task::spawn_blocking(move || {
            let report = validator.validate_json(&resource, &profiles);
            (resource, report)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))?
    };
    if report.is_valid() {
        Ok(resource)
    } else {
        state.metrics.validation_failed();
        Err(ApiError::Unprocessable(report.issues))
    }
}

/// Whether `json` holds at most `budget` values (counting stops once it is spent).
fn at_most_values(json: &Json, budget: &mut usize) -> bool {
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    match json {
        Json::Array(items) => items.iter().all(|v| at_most_values(v, budget)),
        Json::Object(object) => object.iter().all(|(_, v)| at_most_values(v, budget)),
        _ => true,
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

/// A fresh server-assigned id: a UUID whose first bits are the time (v7), so ids assigned one
/// after the other sort together. Every index keyed by id (`resources`, history, the search
/// index's per-resource rows, references to new resources) then grows at its end, where a random
/// id dirtied a page of its own in each of them: on SQLite each such page is written to the WAL
/// at every group commit, on PostgreSQL written in full after each checkpoint. After the
/// millisecond come a counter started at a random value every millisecond and 32 random bits, so
/// one id does not give away the next.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// One version to write.
pub struct Change<'a> {
    pub resource_type: &'a str,
    pub id: String,
    pub resource: Json,
    /// `If-Match` version, if the client sent one.
    pub if_match: Option<i64>,
    /// Security labels of the enclosing Bundle (transaction, batch, message), kept on each entry.
    pub inherited_labels: &'a [String],
    /// `POST`: a new resource at a fresh server id; `PUT`: the client chose the id (update, or update as create).
    pub method: &'static str,
}

/// The answer to a write at an id the caller may not create and cannot see: the same whether the
/// id is free or another party's, so that ids cannot be probed.
fn not_creatable(resource_type: &str, id: &str) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{resource_type}/{id} is not a resource this client may update, and partners cannot create resources at ids they choose: create with POST (the gateway assigns the id)"
    ))
}

/// Writes one version in `tx`; returns it and whether it was created.
pub async fn write(tx: &mut Tx, state: &AppState, principal: &Principal, change: Change<'_>) -> Result<(Stored, bool), Failure> {
    let Change { resource_type, id, mut resource, if_match, inherited_labels, method } = change;
    check_id(&id)?;
    if resource_type == "Subscription" {
        // Partners' Subscriptions are not stored resources: they have their own endpoint, checks and handshake.
        return Err(ApiError::MethodNotAllowed("Subscriptions are created at POST [base]/Subscription and changed at [base]/Subscription/[id], not inside a Bundle".into()).into());
    }
    let current = if method == "POST" { None } else { tx.current(resource_type, &id).await? };
    let visible = current.as_ref().filter(|c| principal.disclosure(c.facts()).is_allowed());
    let mut before = None;
    let (version, owner, created_by) = match (&current, visible) {
        (Some(_), Some(current)) => {
            principal.may(resource_type, Permission::Update).map_err(ApiError::Forbidden)?;
            let before_json = crate::json::parse(current.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored version does not parse: {e}")))?;
            principal.may_write(current.facts(), &before_json, &resource).map_err(|m| ApiError::Forbidden(format!("{resource_type}/{id}: {m}")))?;
            if resource_type == "Task" {
                crate::exchange::step_down::keep_owner_progress(state, &principal.organization, current, &before_json, &mut resource).await?;
            }
            if let Some(expected) = if_match
                && expected != current.version
            {
                return Err(ApiError::PreconditionFailed(format!("If-Match names version {expected} but the current version is {}", current.version)).into());
            }
            before = Some(before_json);
            (current.version + 1, current.owner.clone(), current.created_by.clone())
        }
        _ if method == "PUT" && !principal.may_choose_ids(state.program()) => return Err(not_creatable(resource_type, &id).into()),
        // The program is a party to everything, so an id it cannot see exists only as another owner's withheld record.
        (Some(_), None) => return Err(ApiError::Forbidden(format!("{resource_type}/{id} belongs to another party; only its owner may change it")).into()),
        (None, _) => {
            if if_match.is_some() {
                return Err(ApiError::PreconditionFailed(format!("If-Match was sent but {resource_type}/{id} does not exist")).into());
            }
            principal.may(resource_type, Permission::Create).map_err(ApiError::Forbidden)?;
            (1, principal.organization.clone(), principal.client_id.clone())
        }
    };
    let last_updated = now_instant();
    set_meta(&mut resource, &id, version, &last_updated);
    if method == "POST" {
        tx.minted(format!("{resource_type}/{id}"));
    }
    let part2 = super::part2::before_write(tx, state, resource_type, &mut resource, inherited_labels).await?;
    let labels = labels::normalise(&mut resource, inherited_labels);
    // An update that changes nothing makes no new version: re-sent records (every intake re-writes the
    // payer's and the program's Organizations) then neither grow the history nor contend for one row.
    if let (Some(before), Some(current)) = (&before, &current)
        && same_content(before, &resource)
    {
        return Ok((current.clone(), false));
    }
    let parties = parties_for_version(&owner, state.program(), principal, &search::addressed_organizations(&resource));
    let mut index = search::extract(resource_type, &resource);
    index.extend(search::party_index(&parties, state.program()));
    let stored = Stored {
        resource_type: resource_type.to_string(),
        id,
        version,
        last_updated,
        labels,
        body: resource.to_string_compact(),
        parties,
        created_by,
        owner,
        method: if version == 1 { "POST" } else { "PUT" }.to_string(),
    };
    match tx.write(&stored, &index, method == "POST").await {
        Ok(()) => {}
        Err(StoreError::Conflict { current }) => {
            return match if_match {
                Some(expected) => Err(ApiError::PreconditionFailed(format!("If-Match names version {expected} but the current version is {current}")).into()),
                None => Err(Failure::Retry),
            };
        }
        Err(e) => return Err(e.into()),
    }
    // Partners' Subscriptions: the events this version raises, in this transaction (issue 12).
    crate::exchange::topics::on_write(tx, state, &stored, &resource).await?;
    // A Task moved by the Organization it is assigned to (a step-down provider answering): the
    // outbound referral record follows it in this transaction.
    if resource_type == "Task" && stored.owner != principal.organization {
        crate::exchange::step_down::task_changed(tx, state, &resource).await?;
    }
    super::part2::after_write(tx, state, part2, &stored).await?;
    Ok((stored, version == 1))
}

/// Whether two versions of a resource differ only in `meta.versionId` and `meta.lastUpdated`.
fn same_content(a: &Json, b: &Json) -> bool {
    let strip = |r: &Json| {
        let mut r = r.clone();
        if let Some(Json::Object(meta)) = r.as_object_mut().and_then(|o| o.get_mut("meta")) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
        r
    };
    strip(a) == strip(b)
}

/// Checks an id from a URL (`PUT Type/id`, a Bundle entry's `request.url`) as the validator checks
/// one in a body, and refuses ids of dots alone, which URL handling would resolve as path steps.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    let shown: String = id.chars().take(70).collect::<String>().escape_default().to_string();
    let valid = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(ApiError::BadRequest(format!("'{shown}' is not a valid FHIR id (1 to 64 of A-Z, a-z, 0-9, '-' and '.')")));
    }
    if id.bytes().all(|b| b == b'.') {
        return Err(ApiError::BadRequest(format!("'{shown}' cannot be an id: it would be read as a path step")));
    }
    Ok(())
}

/// Writes several versions in `tx`, in order but Consents last ([`consents_last`]); the first
/// failure stops (the caller retries or answers it). The versions come back in the given order.
pub async fn write_each(tx: &mut Tx, state: &AppState, principal: &Principal, changes: Vec<Change<'_>>) -> Result<Vec<Stored>, Failure> {
    let order = consents_last(changes.iter().map(|c| c.resource_type));
    let mut changes: Vec<Option<Change<'_>>> = changes.into_iter().map(Some).collect();
    let mut stored: Vec<Option<Stored>> = (0..changes.len()).map(|_| None).collect();
    for i in order {
        if let Some(change) = changes[i].take() {
            stored[i] = Some(write(tx, state, principal, change).await?.0);
        }
    }
    Ok(stored.into_iter().flatten().collect())
}

/// The order to write a transaction's entries in: as given, Consents last, so the recipient
/// Organizations a Consent names are stored by the time it is checked (`part2::before_write`).
pub fn consents_last<'a>(types: impl Iterator<Item = &'a str>) -> Vec<usize> {
    let mut order: Vec<(usize, bool)> = types.enumerate().map(|(i, t)| (i, t == "Consent")).collect();
    order.sort_by_key(|(_, consent)| *consent);
    order.into_iter().map(|(i, _)| i).collect()
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta` and member order.
/// In place: nothing of the resource is copied.
fn set_meta(resource: &mut Json, id: &str, version: i64, last_updated: &str) {
    let Some(object) = resource.as_object_mut() else { return };
    // `id` goes right after `resourceType` when it was missing, as FHIR JSON writers put it.
    let after_type = object.position("resourceType").map_or(object.len(), |i| i + 1);
    object.insert_at(after_type, "id", Json::string(id));
    let mut meta = match object.remove("meta") {
        Some(Json::Object(m)) => m,
        _ => Object::new(),
    };
    meta.insert("versionId", Json::string(version.to_string()));
    meta.insert("lastUpdated", Json::string(last_updated));
    let after_id = object.position("id").map_or(object.len(), |i| i + 1);
    object.insert_at(after_id, "meta", Json::Object(meta));
}

/// Reads a conditional operation's criteria as a search that filters: criteria with no filter
/// (`_count=1` alone) would match whatever the caller may write, not the resource it means.
pub fn parse_criteria(resource_type: &str, criteria: &str) -> Result<Query, ApiError> {
    let pairs = super::fhir::query_pairs(Some(criteria));
    let query: Query = search::parse_query(resource_type, &pairs, 2, 2, false).map_err(|e| ApiError::BadRequest(format!("conditional criteria: {e}")))?;
    if query.clauses.is_empty() {
        return Err(ApiError::BadRequest(format!("conditional criteria '{criteria}' filter nothing: name at least one search parameter such as identifier")));
    }
    Ok(query)
}

/// Resolves a conditional operation's criteria to the resources the client may write, under the type lock.
pub async fn conditional_matches(tx: &mut Tx, state: &AppState, principal: &Principal, resource_type: &str, criteria: &str) -> Result<Vec<Stored>, Failure> {
    let mut query = parse_criteria(resource_type, criteria)?;
    query.count = 2;
    query.offset = 0;
    tx.lock_type(resource_type).await?;
    // Only what the client may write is matched: a resource another party planted with the same
    // identifier is not the one the client means, and matching it would reveal it exists.
    let (_, found) = tx.search(resource_type, &query, Some(&principal.visibility(state.program(), true))).await?;
    Ok(found.into_iter().filter(|s| principal.disclosure(s.facts()).is_allowed()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consents_are_written_after_what_they_name() {
        let types = ["Patient", "Consent", "Organization", "Consent", "Task"];
        assert_eq!(consents_last(types.into_iter()), [0, 2, 4, 1, 3]);
    }

    #[test]
    fn ids_from_urls_are_checked_like_ids_in_bodies() {
        assert!(check_id("abc-1.2").is_ok());
        for bad in ["..", ".", "a b <script>", "%2e%2e", "\u{202e}abc", "\u{420}atient", "", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_identical_version_is_the_same_content() {
        let a = crate::json::parse(br#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"},"active":true}"#).unwrap();
        let b = crate::json::parse(br#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2","lastUpdated":"2026-02-01T00:00:00.000Z"},"active":true}"#).unwrap();
        let c = crate::json::parse(br#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2","lastUpdated":"2026-02-01T00:00:00.000Z"},"active":false}"#).unwrap();
        assert!(same_content(&a, &b));
        assert!(!same_content(&a, &c));
    }

    #[test]
    fn small_resources_are_told_from_large_ones_by_their_values() {
        let r = crate::json::parse(br#"{"resourceType":"Patient","name":[{"given":["A","B"]}]}"#).unwrap();
        // The object, "Patient", the name array, its object, the given array and its two strings.
        assert!(at_most_values(&r, &mut 7));
        assert!(!at_most_values(&r, &mut 6));
    }

    #[test]
    fn an_existing_id_is_replaced_in_place_and_meta_follows_it() {
        let mut r = crate::json::parse(br#"{"resourceType":"Patient","meta":{"versionId":"1"},"id":"old","active":true}"#).unwrap();
        set_meta(&mut r, "p1", 2, "2026-01-01T00:00:00.000Z");
        assert_eq!(r.to_string_compact(), r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2026-01-01T00:00:00.000Z"},"active":true}"#);
        let mut r = crate::json::parse(br#"{"active":true}"#).unwrap();
        set_meta(&mut r, "p1", 1, "2026-01-01T00:00:00.000Z");
        assert_eq!(r.to_string_compact(), r#"{"active":true,"id":"p1","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"}}"#);
    }

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
