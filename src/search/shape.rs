//! The subsetted views of a resource (`_summary=true|text|data`, `_elements`): which top-level elements stay, decided by the base StructureDefinition's `isSummary` and `min`, and the SUBSETTED tag that marks the result.

use super::Subset;
use crate::definitions::Definitions;
use crate::json::{self, Json, Object};

/// The code system of the SUBSETTED tag.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// `body` (a stored resource's JSON text) reduced to `subset` and tagged SUBSETTED. `id`, `meta`
/// and the mandatory elements always stay, so the result is still a valid resource; a body that
/// cannot be read is returned as it is.
pub fn apply(definitions: &Definitions, body: &str, subset: &Subset) -> String {
    let Ok(Json::Object(resource)) = json::parse(body.as_bytes()) else { return body.to_string() };
    let Some(resource_type) = resource.get("resourceType").and_then(Json::as_str).map(str::to_string) else { return body.to_string() };
    // Top-level elements: (name without `[x]`, is a choice, isSummary, mandatory).
    let elements: Vec<(String, bool, bool, bool)> = definitions
        .type_structure(&resource_type)
        .map(|structure| {
            structure
                .elements
                .iter()
                .filter_map(|e| {
                    let name = e.path.strip_prefix(resource_type.as_str())?.strip_prefix('.')?;
                    if name.contains('.') {
                        return None;
                    }
                    let (base, choice) = match name.strip_suffix("[x]") {
                        Some(base) => (base, true),
                        None => (name, false),
                    };
                    Some((base.to_string(), choice, e.is_summary, e.min > 0))
                })
                .collect()
        })
        .unwrap_or_default();
    let keep = |member: &str| -> bool {
        // `_status` (a primitive's id and extensions) goes with `status`.
        let member = member.strip_prefix('_').unwrap_or(member);
        if matches!(member, "resourceType" | "id" | "meta") {
            return true;
        }
        if *subset == Subset::Data {
            return member != "text";
        }
        let found = elements.iter().find(|(base, choice, _, _)| match choice {
            true => member.strip_prefix(base.as_str()).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())),
            false => member == base,
        });
        let Some((base, _, summary, mandatory)) = found else { return false };
        *mandatory
            || match subset {
                Subset::Summary => *summary,
                Subset::Text => member == "text",
                Subset::Data => true,
                Subset::Elements(names) => names.iter().any(|n| n == base || n == member),
            }
    };
    let mut out = Object::new();
    for (member, value) in resource.iter() {
        if !keep(member) {
            continue;
        }
        if member == "meta" {
            out.insert(member, tagged(value));
        } else {
            out.insert(member, value.clone());
        }
    }
    if out.get("meta").is_none() {
        out.insert("meta", tagged(&Json::Object(Object::new())));
    }
    Json::Object(out).to_string_compact()
}

/// `meta` with the SUBSETTED tag added.
fn tagged(meta: &Json) -> Json {
    let mut meta = meta.as_object().cloned().unwrap_or_default();
    let mut tags = meta.get("tag").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
    let mut tag = Object::new();
    tag.insert("system", Json::string(SUBSETTED_SYSTEM));
    tag.insert("code", Json::string("SUBSETTED"));
    tags.push(Json::Object(tag));
    meta.insert("tag", Json::Array(tags));
    Json::Object(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_keep_summary_and_mandatory_elements_and_are_tagged() {
        let definitions = Definitions::new_base();
        let body = r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},"status":"final","_status":{"id":"s"},"category":[{"text":"survey"}],"code":{"text":"PHQ-9"},"subject":{"reference":"Patient/p"},"valueInteger":12,"note":[{"text":"long note"}]}"#;
        let parse = |s: String| json::parse(s.as_bytes()).unwrap();
        let summary = parse(apply(&definitions, body, &Subset::Summary));
        let members: Vec<&str> = summary.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(members, ["resourceType", "id", "meta", "status", "_status", "code", "subject", "valueInteger"], "category and note are not summary elements");
        assert_eq!(summary["meta"]["tag"].as_array().unwrap()[0]["code"].as_str(), Some("SUBSETTED"));
        assert_eq!(summary["meta"]["versionId"].as_str(), Some("1"));
        let text = parse(apply(&definitions, body, &Subset::Text));
        assert!(text.get("text").is_some() && text.get("status").is_some() && text.get("subject").is_none(), "{}", text.to_string_compact());
        let data = parse(apply(&definitions, body, &Subset::Data));
        assert!(data.get("text").is_none() && data.get("note").is_some());
        let elements = parse(apply(&definitions, body, &Subset::Elements(vec!["value".into(), "note".into()])));
        let members: Vec<&str> = elements.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(members, ["resourceType", "id", "meta", "status", "_status", "code", "valueInteger", "note"]);
    }
}
