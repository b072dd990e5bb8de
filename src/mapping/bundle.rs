//! Assembles mapped resources into one FHIR transaction Bundle: `urn:uuid` full URLs, PUT requests to the deterministic ids, one entry per resource.

use crate::json::{Json, Object};

/// What happened when two records produced the same resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub reference: String,
}

/// Builds a transaction Bundle; a resource produced twice with identical content is kept once, and
/// one produced twice with different content keeps the later version and is reported.
pub fn transaction(resources: Vec<Json>) -> (Json, Vec<Conflict>) {
    let mut entries: Vec<(String, Json)> = Vec::new();
    let mut conflicts = Vec::new();
    for resource in resources {
        let key = format!(
            "{}/{}",
            resource.get("resourceType").and_then(Json::as_str).unwrap_or_default(),
            resource.get("id").and_then(Json::as_str).unwrap_or_default()
        );
        match entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) if *existing == resource => {}
            Some((_, existing)) => {
                *existing = resource;
                conflicts.push(Conflict { reference: key });
            }
            None => entries.push((key, resource)),
        }
    }
    let entries = entries
        .into_iter()
        .map(|(key, resource)| {
            let id = resource.get("id").and_then(Json::as_str).unwrap_or_default().to_string();
            let mut request = Object::new();
            request.insert("method", Json::string("PUT"));
            request.insert("url", Json::string(key));
            let mut entry = Object::new();
            entry.insert("fullUrl", Json::string(format!("urn:uuid:{id}")));
            entry.insert("resource", resource);
            entry.insert("request", Json::Object(request));
            Json::Object(entry)
        })
        .collect();
    let mut bundle = Object::new();
    bundle.insert("resourceType", Json::string("Bundle"));
    bundle.insert("type", Json::string("transaction"));
    bundle.insert("entry", Json::Array(entries));
    (Json::Object(bundle), conflicts)
}
