//! Bundle rules beyond the element definitions ([spec](https://hl7.org/fhir/R4/bundle.html)): entry `fullUrl`s and how they agree with the resources, and references that must resolve inside documents and messages.
//!
//! A `fullUrl` is the identity of its entry's resource: it must be absolute, and when it has the
//! RESTful form `[base]/Type/id` it must name the resource's own type and id. Relative references
//! inside an entry are resolved against the base of that entry's `fullUrl`
//! ([spec](https://hl7.org/fhir/R4/bundle.html#references)); in a document or a message, which
//! must stand on their own, a reference that should be in the Bundle but is not is an error.

use crate::json::{Json, Object};
use crate::outcome::IssueCode;

use super::walk::Walker;

/// Checks each entry's `fullUrl` against its resource; the walker's path is the Bundle's.
pub(super) fn check_entries(walker: &mut Walker<'_, '_>, bundle: &Object) {
    let bundle_type = bundle.get("type").and_then(Json::as_str).unwrap_or_default();
    let entries = bundle.get("entry").and_then(Json::as_array).unwrap_or_default();
    let searched_type = if bundle_type == "searchset" { searched_type(walker, bundle) } else { None };
    let base_len = walker.path.len();
    for (i, entry) in entries.iter().enumerate() {
        let Some(resource) = entry.get("resource") else { continue };
        walker.path.push_str(".entry");
        super::walk::push_index(&mut walker.path, i);
        if bundle_type == "searchset" {
            search_result(walker, entry, resource, searched_type);
        }
        match entry.get("fullUrl").and_then(Json::as_str) {
            None => {
                // Transactions and batches (and their responses) may create resources that have no identity yet,
                // and an OperationOutcome about a search is not one of its results.
                let exempt = matches!(bundle_type, "transaction" | "batch" | "transaction-response" | "batch-response")
                    || entry.get("search").and_then(|s| s.get("mode")).and_then(Json::as_str) == Some("outcome");
                if !exempt {
                    walker.error(
                        IssueCode::Required,
                        "except in transactions and batches, each entry must have a fullUrl, the identity of its resource",
                    );
                }
            }
            Some(full_url) => check_full_url(walker, full_url, resource, entry),
        }
        walker.path.truncate(base_len);
    }
}

/// The resource type a searchset's `self` link searched for (`…/Patient?name=x`), when it says.
fn searched_type<'b>(walker: &Walker<'_, '_>, bundle: &'b Object) -> Option<&'b str> {
    let links = bundle.get("link").and_then(Json::as_array).unwrap_or_default();
    let url = links.iter().find(|l| l.get("relation").and_then(Json::as_str) == Some("self"))?.get("url")?.as_str()?;
    let path = url.split('?').next().unwrap_or(url);
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    walker.validator.definitions.is_resource_type(last).then_some(last)
}

/// A search result (not an OperationOutcome about the search) is a resource on the server, so it has an id,
/// and a match is of the type that was searched for.
fn search_result(walker: &mut Walker<'_, '_>, entry: &Json, resource: &Json, searched_type: Option<&str>) {
    let mode = entry.get("search").and_then(|s| s.get("mode")).and_then(Json::as_str);
    let resource_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
    if mode == Some("outcome") || (mode.is_none() && resource_type == "OperationOutcome") {
        return;
    }
    let base_len = walker.path.len();
    walker.path.push_str(".resource");
    if resource.get("id").is_none() {
        walker.error(IssueCode::Required, "a search result must have an id");
    }
    if let Some(searched) = searched_type.filter(|t| mode == Some("match") && *t != resource_type) {
        walker.error(IssueCode::Invalid, format!("a match of a search for {searched} cannot be a {resource_type}"));
    }
    walker.path.truncate(base_len);
}

fn check_full_url(walker: &mut Walker<'_, '_>, full_url: &str, resource: &Json, entry: &Json) {
    if !is_absolute(full_url) {
        walker.error(IssueCode::Invalid, format!("the fullUrl must be an absolute URL, not '{full_url}'"));
        return;
    }
    let Some((url_type, url_id)) = restful_type_and_id(walker, full_url) else { return };
    let resource_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default();
    match resource.get("id").and_then(Json::as_str) {
        Some(id) => {
            if url_type != resource_type || url_id != id {
                walker.error(
                    IssueCode::Invalid,
                    format!("the fullUrl '{full_url}' has the RESTful form, so it must end with the resource's type and id (/{resource_type}/{id})"),
                );
            }
        }
        None => {
            // A resource being created (POST) gets its id from the server.
            let is_create = entry.get("request").and_then(|r| r.get("method")).and_then(Json::as_str) == Some("POST");
            if !is_create {
                walker.error(IssueCode::Invalid, format!("the fullUrl '{full_url}' has the RESTful form, but the resource has no id"));
            }
        }
    }
}

/// Whether a URL has a scheme (`http:`, `urn:`): a fullUrl must not be relative.
pub(super) fn is_absolute(url: &str) -> bool {
    let Some((scheme, _)) = url.split_once(':') else { return false };
    scheme.starts_with(|c: char| c.is_ascii_alphabetic()) && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// `(Type, id)` when a URL has the RESTful form `http(s)://…/Type/id` (optionally `/_history/v`).
pub(super) fn restful_type_and_id<'u>(walker: &Walker<'_, '_>, url: &'u str) -> Option<(&'u str, &'u str)> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return None;
    }
    let url = without_history(url);
    let mut segments = url.rsplit('/');
    let id = segments.next()?;
    let type_name = segments.next()?;
    (!id.is_empty() && walker.validator.definitions.is_resource_type(type_name)).then_some((type_name, id))
}

/// Where a literal reference made from inside a Bundle entry points, by the Bundle's resolution rules.
pub(super) enum Resolution<'a> {
    /// An entry has that identity.
    Found(&'a Json),
    /// Nothing in the Bundle has that identity, although the reference could only be meant for it.
    Missing,
    /// The reference may be to something outside the Bundle (an absolute RESTful URL), or cannot be resolved here.
    Outside,
}

/// `url` without its `/_history/…` version part.
pub(super) fn without_history(url: &str) -> &str {
    // Most references have no underscore at all, which one byte search tells.
    if !url.as_bytes().contains(&b'_') {
        return url;
    }
    url.split("/_history/").next().unwrap_or(url)
}

/// Resolves a reference made inside the entry whose fullUrl is `entry_full_url`.
pub(super) fn resolve<'a>(walker: &Walker<'_, 'a>, reference: &str, entry_full_url: Option<&str>) -> Resolution<'a> {
    let reference = without_history(reference);
    let entries = &walker.scope.bundle_entries;
    if is_absolute(reference) {
        return match entries.get(reference) {
            Some(found) => Resolution::Found(found),
            None if reference.starts_with("urn:") => Resolution::Missing,
            None => Resolution::Outside,
        };
    }
    // `Type/id` is relative to the base of the entry's own RESTful fullUrl.
    let mut parts = reference.split('/');
    let (Some(type_name), Some(_id), None) = (parts.next(), parts.next(), parts.next()) else { return Resolution::Outside };
    if !walker.validator.definitions.is_resource_type(type_name) {
        return Resolution::Outside;
    }
    let base = entry_full_url.and_then(|url| {
        let (url_type, url_id) = restful_type_and_id(walker, url)?;
        without_history(url).strip_suffix(url_id)?.strip_suffix('/')?.strip_suffix(url_type)
    });
    match base {
        Some(base) => match entries.get([base, reference].concat().as_str()) {
            Some(found) => Resolution::Found(found),
            None => Resolution::Missing,
        },
        // Without a RESTful base, the resource's own `Type/id` identifies it.
        None => match walker.scope.bundle_id(reference) {
            Some(found) => Resolution::Found(found),
            None => Resolution::Missing,
        },
    }
}
