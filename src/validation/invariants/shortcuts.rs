//! Proofs that a base invariant holds, read straight off the JSON, so that the FHIRPath evaluation can be skipped.
//!
//! The hot base constraints (ref-1 on every Reference, dom-3 on every resource with contained
//! resources, bdl-5 and bdl-8 on every Bundle entry, …) mostly hold for a reason visible in one
//! or two members. A shortcut applies only to the exact R4 expression text under its key, so a
//! profile that redefines a key is evaluated as written. A shortcut never fails a constraint: it
//! answers "holds" or "don't know", and "don't know" falls back to FHIRPath. The test below
//! checks each shortcut against the FHIRPath result over the corpus.

use crate::json::{Json, Object};

/// A shortcut: the constraint key, its exact R4 expression, and the proof.
type Shortcut = (&'static str, &'static str, fn(&Object) -> bool);

const SHORTCUTS: &[Shortcut] = &[
    ("ref-1", "reference.startsWith('#').not() or (reference.substring(1).trace('url') in %rootResource.contained.id.trace('ids'))", ref_1),
    ("dom-3", "contained.where((('#'+id in (%resource.descendants().reference | %resource.descendants().as(canonical) | %resource.descendants().as(uri) | %resource.descendants().as(url))) or descendants().where(reference = '#').exists() or descendants().where(as(canonical) = '#').exists() or descendants().where(as(canonical) = '#').exists()).not()).trace('unmatched', id).empty()", dom_3),
    ("bdl-5", "resource.exists() or request.exists() or response.exists()", bdl_5),
    ("bdl-8", "fullUrl.contains('/_history/').not()", bdl_8),
    ("obs-6", "dataAbsentReason.empty() or value.empty()", obs_6),
    ("qty-3", "code.empty() or system.exists()", qty_3),
];

/// Whether the constraint `key` with expression `source` certainly holds on `node`;
/// `node_is_resource`: the node is `%resource` (dom-3 reads it).
pub(super) fn holds(key: &str, source: &str, node: &Json, node_is_resource: bool) -> bool {
    #[cfg(test)]
    if tests::DISABLED.get() {
        return false;
    }
    let Json::Object(object) = node else { return false };
    if key == "dom-3" && !node_is_resource {
        return false;
    }
    SHORTCUTS.iter().any(|(k, expression, proof)| *k == key && *expression == source && proof(object))
}

/// Neither `name` nor its `_name` sibling is present, so FHIRPath sees no `name` at all.
fn absent(object: &Object, name: &str) -> bool {
    object.get(name).is_none() && object.get(&format!("_{name}")).is_none()
}

/// A reference that is absent or does not start with `#` is not a contained reference.
fn ref_1(reference: &Object) -> bool {
    match reference.get("reference") {
        Some(Json::String(text)) => !text.starts_with('#'),
        None => reference.get("_reference").is_none(),
        Some(_) => false,
    }
}

/// Every contained resource with an id is referenced as `#id` by some `reference` member of
/// the resource (the first alternative of the criteria); one without an id is never unmatched.
fn dom_3(resource: &Object) -> bool {
    let Some(contained) = resource.get("contained") else { return true };
    let Json::Array(items) = contained else { return false };
    let mut local = Vec::new();
    collect_local_references(resource, &mut local);
    items.iter().all(|item| match item.get("id") {
        Some(Json::String(id)) => local.iter().any(|r| r.strip_prefix('#') == Some(&**id)),
        None => item.as_object().is_some() && item.get("_id").is_none(),
        Some(_) => false,
    })
}

/// The `#…` strings of all `reference` members at any depth (FHIRPath's `descendants().reference`).
fn collect_local_references<'j>(object: &'j Object, out: &mut Vec<&'j str>) {
    for (name, value) in object.iter() {
        match value {
            Json::String(text) if name == "reference" && text.starts_with('#') => out.push(text),
            Json::Object(child) => collect_local_references(child, out),
            Json::Array(items) => {
                for item in items {
                    if let Json::Object(child) = item {
                        collect_local_references(child, out);
                    }
                }
            }
            _ => {}
        }
    }
}

fn bdl_5(entry: &Object) -> bool {
    matches!(entry.get("resource"), Some(Json::Object(_)))
}

fn bdl_8(entry: &Object) -> bool {
    match entry.get("fullUrl") {
        Some(Json::String(url)) => !url.contains("/_history/"),
        None => entry.get("_fullUrl").is_none(),
        Some(_) => false,
    }
}

fn obs_6(observation: &Object) -> bool {
    absent(observation, "dataAbsentReason")
}

fn qty_3(quantity: &Object) -> bool {
    matches!(quantity.get("system"), Some(Json::String(_))) || absent(quantity, "code")
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io::Read;
    use std::path::Path;
    use std::sync::Arc;

    use crate::definitions::Definitions;
    use crate::validation::Validator;

    thread_local! {
        /// Turns the shortcuts off, to compare with full evaluation.
        pub(super) static DISABLED: Cell<bool> = const { Cell::new(false) };
    }

    /// Every document of the official examples and a third of the Synthea bundles gets the
    /// same report with and without the shortcuts.
    #[test]
    fn shortcuts_agree_with_fhirpath_on_the_corpus() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
        let mut documents: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in std::fs::read_dir(corpus.join("hl7-examples/resources")).expect("hl7-examples") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x == "json") {
                documents.push((path.display().to_string(), std::fs::read(&path).expect("read")));
            }
        }
        let mut bundles: Vec<_> = std::fs::read_dir(corpus.join("synthea/bundles")).expect("synthea").map(|e| e.expect("entry").path()).collect();
        bundles.sort();
        for path in bundles.iter().step_by(3) {
            let mut bytes = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open")).read_to_end(&mut bytes).expect("gunzip");
            documents.push((path.display().to_string(), bytes));
        }
        assert!(documents.len() > 700, "the corpus is missing");
        // Edge cases the corpus lacks, most of them failing one of the constraints.
        let crafted = [
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","id":"p1"}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","id":"p1"}],"generalPractitioner":[{"reference":"#p1"}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","id":"p1"}],"generalPractitioner":[{"reference":"#p2"}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","name":[{"family":"x"}]}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","id":"p1"}],"extension":[{"url":"http://example.org/x","valueReference":{"reference":"#p1"}}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Practitioner","id":"p1"}],"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">#p1</div>"}}"##,
            r##"{"resourceType":"Questionnaire","status":"draft","contained":[{"resourceType":"ValueSet","id":"vs","status":"draft"}],"item":[{"linkId":"1","type":"choice","answerValueSet":"#vs"}]}"##,
            r##"{"resourceType":"Patient","generalPractitioner":[{"_reference":{"extension":[{"url":"http://example.org/x","valueString":"y"}]}}]}"##,
            r##"{"resourceType":"Bundle","type":"collection","entry":[{"fullUrl":"http://example.org/fhir/Patient/1/_history/2","resource":{"resourceType":"Patient","id":"1"}},{"fullUrl":"http://example.org/fhir/Patient/2"}]}"##,
            r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1,"code":"mg"},"dataAbsentReason":{"text":"y"}}"##,
        ];
        documents.extend(crafted.iter().map(|d| (d.to_string(), d.as_bytes().to_vec())));
        let validator = Validator::new(Arc::new(Definitions::new_default()));
        for (name, bytes) in &documents {
            DISABLED.set(false);
            let fast = validator.validate_bytes(bytes, &[]);
            DISABLED.set(true);
            let full = validator.validate_bytes(bytes, &[]);
            DISABLED.set(false);
            assert_eq!(fast.issues, full.issues, "{name}");
        }
    }
}
