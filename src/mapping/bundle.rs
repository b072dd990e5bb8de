//! Assembles mapped resources into one FHIR transaction Bundle: `urn:uuid` full URLs, PUT requests to the deterministic ids, one entry per resource; merges partial resources into the ones they add to, and fills `collection` Bundles with a resource and everything it references.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::json::{Json, Object};

use super::eval::{Produced, Role};

/// What happened when two records produced the same resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub reference: String,
}

/// A resource the Bundle could not be completed with (`Type/id`), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incomplete {
    pub reference: String,
    pub message: String,
}

/// What assembling found besides the Bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assembly {
    pub conflicts: Vec<Conflict>,
    pub incomplete: Vec<Incomplete>,
}

/// A resource of the transaction under its `Type/id`; a `collect` Bundle also names its first resource.
struct Entry {
    key: String,
    resource: Json,
    collect_first: Option<String>,
}

fn key_of(resource: &Json) -> String {
    format!(
        "{}/{}",
        resource.get("resourceType").and_then(Json::as_str).unwrap_or_default(),
        resource.get("id").and_then(Json::as_str).unwrap_or_default()
    )
}

/// Builds a transaction Bundle. A resource produced twice with identical content is kept once, and
/// one produced twice with different content keeps the later version and is reported. Merged
/// resources are applied after every whole resource is in, whatever the record order; collection
/// Bundles are filled last, from the merged resources.
pub fn transaction(produced: Vec<Produced>) -> (Json, Assembly) {
    let mut assembly = Assembly::default();
    let mut entries: Vec<Entry> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut merges = Vec::new();
    for Produced { resource, role, .. } in produced {
        let key = key_of(&resource);
        let collect_first = match role {
            Role::Merge => {
                merges.push((key, resource));
                continue;
            }
            Role::Collect { first } => Some(first),
            Role::Whole => None,
        };
        match position.get(&key) {
            Some(&i) if entries[i].resource == resource => {}
            Some(&i) => {
                entries[i] = Entry { key: key.clone(), resource, collect_first };
                assembly.conflicts.push(Conflict { reference: key });
            }
            None => {
                position.insert(key.clone(), entries.len());
                entries.push(Entry { key, resource, collect_first });
            }
        }
    }
    for (key, patch) in merges {
        match position.get(&key) {
            Some(&i) => merge(&mut entries[i].resource, &patch),
            None => assembly.incomplete.push(Incomplete {
                reference: key,
                message: "this record adds to a resource that no record of the batch produced: send the record that produces it in the same batch".into(),
            }),
        }
    }
    let by_full_url: HashMap<String, usize> = entries.iter().enumerate().map(|(i, e)| (full_url(&e.resource), i)).collect();
    let mut filled = Vec::new();
    for (i, Entry { key, collect_first, .. }) in entries.iter().enumerate() {
        if let Some(first) = collect_first {
            let (members, missing) = closure(&entries, &by_full_url, &position, first);
            for reference in missing {
                assembly.incomplete.push(Incomplete {
                    reference: key.clone(),
                    message: format!("the collection needs {reference}, which no record of the batch produced: send the record that produces it in the same batch"),
                });
            }
            filled.push((i, members));
        }
    }
    for (i, members) in filled {
        let nested: Vec<Json> = members
            .into_iter()
            .map(|m| {
                let resource = entries[m].resource.clone();
                let mut entry = Object::new();
                entry.insert("fullUrl", Json::string(full_url(&resource)));
                entry.insert("resource", resource);
                Json::Object(entry)
            })
            .collect();
        if let Json::Object(bundle) = &mut entries[i].resource {
            bundle.insert("entry", Json::Array(nested));
        }
    }
    let entries = entries
        .into_iter()
        .map(|Entry { key, resource, .. }| {
            let mut request = Object::new();
            request.insert("method", Json::string("PUT"));
            request.insert("url", Json::string(key));
            let mut entry = Object::new();
            entry.insert("fullUrl", Json::string(full_url(&resource)));
            entry.insert("resource", resource);
            entry.insert("request", Json::Object(request));
            Json::Object(entry)
        })
        .collect();
    let mut bundle = Object::new();
    bundle.insert("resourceType", Json::string("Bundle"));
    bundle.insert("type", Json::string("transaction"));
    bundle.insert("entry", Json::Array(entries));
    (Json::Object(bundle), assembly)
}

fn full_url(resource: &Json) -> String {
    format!("urn:uuid:{}", resource.get("id").and_then(Json::as_str).unwrap_or_default())
}

/// The entries a collection holds, in breadth-first order from `first`, and the references that
/// point at nothing in the batch. Only `urn:uuid` references are the batch's own.
fn closure(entries: &[Entry], by_full_url: &HashMap<String, usize>, position: &HashMap<String, usize>, first: &str) -> (Vec<usize>, Vec<String>) {
    let mut members = Vec::new();
    let mut missing = Vec::new();
    let Some(&start) = position.get(first) else { return (members, vec![first.to_string()]) };
    let mut seen = HashSet::from([start]);
    let mut queue = VecDeque::from([start]);
    while let Some(i) = queue.pop_front() {
        members.push(i);
        let mut references = Vec::new();
        collect_references(&entries[i].resource, &mut references);
        for reference in references.into_iter().filter(|r| r.starts_with("urn:uuid:")) {
            match by_full_url.get(&reference) {
                Some(&j) if seen.insert(j) => queue.push_back(j),
                Some(_) => {}
                None if !missing.contains(&reference) => missing.push(reference),
                None => {}
            }
        }
    }
    (members, missing)
}

fn collect_references(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(object) => {
            for (name, member) in object.iter() {
                match member {
                    Json::String(s) if name == "reference" => out.push(s.to_string()),
                    other => collect_references(other, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|i| collect_references(i, out)),
        _ => {}
    }
}

/// Adds `patch` to `base`: objects merge member by member; a list of extensions (elements with a
/// `url`) merges element by element on `url`; any other list or value replaces the base's.
fn merge(base: &mut Json, patch: &Json) {
    match (base, patch) {
        (Json::Object(base), Json::Object(patch)) => {
            for (name, value) in patch.iter() {
                match base.get_mut(name) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(name, value.clone());
                    }
                }
            }
        }
        (Json::Array(base), Json::Array(patch)) if is_extension_list(patch) && is_extension_list(base) => {
            for element in patch {
                let url = element.get("url");
                match base.iter_mut().find(|b| b.get("url") == url) {
                    Some(existing) => *existing = element.clone(),
                    None => base.push(element.clone()),
                }
            }
        }
        // A list of References gains the patch's references: a discharge adds its summary to a referral's
        // supportingInfo without dropping the consent the referral record put there.
        (Json::Array(base), Json::Array(patch)) if is_reference_list(patch) && is_reference_list(base) => {
            for element in patch {
                if !base.iter().any(|b| b.get("reference") == element.get("reference")) {
                    base.push(element.clone());
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

fn is_reference_list(items: &[Json]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("reference").and_then(Json::as_str).is_some())
}

fn is_extension_list(items: &[Json]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("url").and_then(Json::as_str).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;

    fn produced(text: &str, role: Role) -> Produced {
        Produced { resource: json::parse(text.as_bytes()).unwrap(), role, targets: Vec::new() }
    }

    #[test]
    fn merges_apply_whatever_the_order_and_extensions_merge_by_url() {
        let (bundle, assembly) = transaction(vec![
            produced(r#"{"resourceType":"EpisodeOfCare","id":"e","status":"finished","period":{"end":"2026-03-06"},"extension":[{"url":"b","valueString":"new"}]}"#, Role::Merge),
            produced(r#"{"resourceType":"EpisodeOfCare","id":"e","status":"active","period":{"start":"2026-01-12"},"extension":[{"url":"a","valueString":"x"},{"url":"b","valueString":"old"}],"type":[{"text":"t"}]}"#, Role::Whole),
        ]);
        assert_eq!(assembly, Assembly::default());
        let merged = &bundle["entry"].as_array().unwrap()[0]["resource"];
        assert_eq!(
            merged.to_string_compact(),
            r#"{"resourceType":"EpisodeOfCare","id":"e","status":"finished","period":{"start":"2026-01-12","end":"2026-03-06"},"extension":[{"url":"a","valueString":"x"},{"url":"b","valueString":"new"}],"type":[{"text":"t"}]}"#
        );
        let (_, assembly) = transaction(vec![produced(r#"{"resourceType":"Goal","id":"g","lifecycleStatus":"completed"}"#, Role::Merge)]);
        assert_eq!(assembly.incomplete.len(), 1, "{assembly:?}");
    }

    #[test]
    fn reference_lists_merge_by_reference_and_other_lists_are_replaced() {
        let (bundle, _) = transaction(vec![
            produced(r#"{"resourceType":"ServiceRequest","id":"s","supportingInfo":[{"reference":"urn:uuid:b"},{"reference":"urn:uuid:c"}],"note":[{"text":"new"}]}"#, Role::Merge),
            produced(r#"{"resourceType":"ServiceRequest","id":"s","supportingInfo":[{"reference":"urn:uuid:a"},{"reference":"urn:uuid:b"}],"note":[{"text":"old"},{"text":"older"}]}"#, Role::Whole),
        ]);
        let merged = &bundle["entry"].as_array().unwrap()[0]["resource"];
        assert_eq!(
            merged.to_string_compact(),
            r#"{"resourceType":"ServiceRequest","id":"s","supportingInfo":[{"reference":"urn:uuid:a"},{"reference":"urn:uuid:b"},{"reference":"urn:uuid:c"}],"note":[{"text":"new"}]}"#
        );
        let (_, assembly) = transaction(vec![produced(r#"{"resourceType":"Goal","id":"g2","lifecycleStatus":"completed"}"#, Role::Merge)]);
        assert_eq!(assembly.incomplete.len(), 1, "{assembly:?}");
    }

    #[test]
    fn a_collection_holds_its_first_resource_and_everything_it_references_once() {
        let (bundle, assembly) = transaction(vec![
            produced(r#"{"resourceType":"Patient","id":"p"}"#, Role::Whole),
            produced(r#"{"resourceType":"Organization","id":"unrelated"}"#, Role::Whole),
            produced(r#"{"resourceType":"Coverage","id":"c","beneficiary":{"reference":"urn:uuid:p"}}"#, Role::Whole),
            produced(r#"{"resourceType":"Claim","id":"x","patient":{"reference":"urn:uuid:p"},"insurance":[{"coverage":{"reference":"urn:uuid:c"}}]}"#, Role::Whole),
            produced(r#"{"resourceType":"Bundle","id":"b","type":"collection"}"#, Role::Collect { first: "Claim/x".into() }),
        ]);
        assert_eq!(assembly, Assembly::default());
        let nested = &bundle["entry"].as_array().unwrap()[4]["resource"]["entry"];
        let urls: Vec<&str> = nested.as_array().unwrap().iter().map(|e| e["fullUrl"].as_str().unwrap()).collect();
        assert_eq!(urls, ["urn:uuid:x", "urn:uuid:p", "urn:uuid:c"]);
        assert!(nested.as_array().unwrap().iter().all(|e| e.get("request").is_none()));
        let (_, assembly) = transaction(vec![
            produced(r#"{"resourceType":"Claim","id":"x","patient":{"reference":"urn:uuid:p"}}"#, Role::Whole),
            produced(r#"{"resourceType":"Bundle","id":"b","type":"collection"}"#, Role::Collect { first: "Claim/x".into() }),
        ]);
        assert_eq!(assembly.incomplete, vec![Incomplete { reference: "Bundle/b".into(), message: "the collection needs urn:uuid:p, which no record of the batch produced: send the record that produces it in the same batch".into() }]);
    }
}
