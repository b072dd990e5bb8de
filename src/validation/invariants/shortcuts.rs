//! Proofs that a base invariant holds, read straight off the JSON, so that the FHIRPath evaluation can be skipped.
//!
//! The hot base constraints (ref-1 on every Reference, dom-3 on every resource with contained
//! resources, bdl-5 and bdl-8 on every Bundle entry, …) mostly hold for a reason visible in one
//! or two members. A shortcut applies only to the exact R4 expression text under its key, so a
//! profile that redefines a key is evaluated as written. A shortcut never fails a constraint: it
//! answers "holds" or "don't know", and "don't know" falls back to FHIRPath. The test below
//! checks each shortcut against the FHIRPath result over the corpus.

use crate::json::{Json, Object};

/// The shortcut for the constraint `key`: its exact R4 expression, and the proof.
///
/// A `match`, not a table: it compiles to a few inline comparisons, and it runs for every
/// constraint of every element.
fn shortcut(key: &str) -> Option<(&'static str, fn(&Object) -> bool)> {
    Some(match key {
        "ref-1" => ("reference.startsWith('#').not() or (reference.substring(1).trace('url') in %rootResource.contained.id.trace('ids'))", ref_1),
        "dom-3" => ("contained.where((('#'+id in (%resource.descendants().reference | %resource.descendants().as(canonical) | %resource.descendants().as(uri) | %resource.descendants().as(url))) or descendants().where(reference = '#').exists() or descendants().where(as(canonical) = '#').exists() or descendants().where(as(canonical) = '#').exists()).not()).trace('unmatched', id).empty()", dom_3),
        "bdl-5" => ("resource.exists() or request.exists() or response.exists()", bdl_5),
        "bdl-8" => ("fullUrl.contains('/_history/').not()", bdl_8),
        "obs-6" => ("dataAbsentReason.empty() or value.empty()", obs_6),
        "qty-3" => ("code.empty() or system.exists()", qty_3),
        "cpt-2" => ("value.empty() or system.exists()", cpt_2),
        "sqty-1" => ("comparator.empty()", sqty_1),
        "att-1" => ("data.empty() or contentType.exists()", att_1),
        "per-1" => ("start.hasValue().not() or end.hasValue().not() or (start <= end)", per_1),
        "ext-1" => ("extension.exists() != value.exists()", ext_1),
        "obs-3" => ("low.exists() or high.exists() or text.exists()", obs_3),
        "obs-7" => ("value.empty() or component.code.where(coding.intersect(%resource.code.coding).exists()).empty()", obs_7),
        "dom-2" => ("contained.contained.empty()", dom_2),
        "dom-4" => ("contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()", dom_4),
        "dom-5" => ("contained.meta.security.empty()", dom_5),
        "dom-6" => ("text.`div`.exists()", dom_6),
        "bdl-2" => ("entry.search.empty() or (type = 'searchset')", bdl_2),
        "bdl-3" => ("entry.all(request.exists() = (%resource.type = 'batch' or %resource.type = 'transaction' or %resource.type = 'history'))", bdl_3),
        "bdl-4" => ("entry.all(response.exists() = (%resource.type = 'batch-response' or %resource.type = 'transaction-response' or %resource.type = 'history'))", bdl_4),
        "bdl-7" => ("(type = 'history') or entry.where(fullUrl.exists()).select(fullUrl&resource.meta.versionId).isDistinct()", bdl_7),
        "nsd-0" => ("name.matches('[A-Z]([A-Za-z0-9_]){0,254}')", nsd_0),
        "nsd-1" => ("kind != 'root' or uniqueId.all(type != 'uuid')", nsd_1),
        "nsd-2" => ("uniqueId.where(preferred = true).select(type).isDistinct()", nsd_2),
        "que-1" => ("(type='group' implies item.empty().not()) and (type.trace('type')='display' implies item.trace('item').empty())", que_1),
        "que-5" => ("(type ='choice' or type = 'open-choice' or type = 'decimal' or type = 'integer' or type = 'date' or type = 'dateTime' or type = 'time' or type = 'string' or type = 'quantity') or (answerValueSet.empty() and answerOption.empty())", que_5),
        "que-10" => ("(type in ('boolean' | 'decimal' | 'integer' | 'string' | 'text' | 'url' | 'open-choice')) or maxLength.empty()", que_10),
        "cmd-1" => ("comment.exists() or equivalence.empty() or ((equivalence != 'narrower') and (equivalence != 'inexact'))", cmd_1),
        _ => return None,
    })
}

/// Whether the constraint `key` with expression `source` certainly holds on `node`;
/// `node_is_resource`: the node is `%resource` (dom-3 reads it).
pub(super) fn holds(key: &str, source: &str, node: &Json, node_is_resource: bool) -> bool {
    #[cfg(test)]
    if tests::DISABLED.get() {
        return false;
    }
    let Json::Object(object) = node else { return false };
    // These read `%resource` as the node itself.
    if matches!(key, "dom-3" | "bdl-3" | "bdl-4") && !node_is_resource {
        return false;
    }
    shortcut(key).is_some_and(|(expression, proof)| expression == source && proof(object))
}

/// Neither `name` nor its `_name` sibling is present, so FHIRPath sees no `name` at all.
fn absent(object: &Object, name: &str) -> bool {
    !object.iter().any(|(member, _)| member.strip_prefix('_').unwrap_or(member) == name)
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
    has_string(quantity, "system") || absent(quantity, "code")
}

fn cpt_2(contact_point: &Object) -> bool {
    has_string(contact_point, "system") || absent(contact_point, "value")
}

fn sqty_1(quantity: &Object) -> bool {
    absent(quantity, "comparator")
}

fn att_1(attachment: &Object) -> bool {
    has_string(attachment, "contentType") || absent(attachment, "data")
}

fn per_1(period: &Object) -> bool {
    absent(period, "start") || absent(period, "end")
}

/// `value` of an Extension is its `value[x]`, whatever the type.
fn ext_1(extension: &Object) -> bool {
    // An extension-only `_value[x]` is left to FHIRPath.
    if extension.iter().any(|(name, _)| name.starts_with("_value")) {
        return false;
    }
    let has_value = extension.iter().any(|(name, _)| name.starts_with("value"));
    match extension.get("extension") {
        None => has_value && extension.iter().all(|(name, value)| !name.starts_with("value") || has_content(value)),
        Some(Json::Array(items)) => !has_value && !items.is_empty() && items.iter().all(|item| matches!(item, Json::Object(o) if !o.is_empty())),
        Some(_) => false,
    }
}

fn obs_3(range: &Object) -> bool {
    matches!(range.get("low"), Some(Json::Object(o)) if !o.is_empty())
        || matches!(range.get("high"), Some(Json::Object(o)) if !o.is_empty())
        || matches!(range.get("text"), Some(Json::String(t)) if !t.is_empty())
}

fn obs_7(observation: &Object) -> bool {
    observation.get("component").is_none() || !observation.iter().any(|(name, _)| name.starts_with("value") || name.starts_with("_value"))
}

/// The items of the array member `name`, when they are all objects (none when it is absent).
fn objects<'o>(object: &'o Object, name: &str) -> Option<Vec<&'o Object>> {
    match object.get(name) {
        None => Some(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(Json::as_object).collect(),
        Some(_) => None,
    }
}

fn dom_2(resource: &Object) -> bool {
    objects(resource, "contained").is_some_and(|items| items.iter().all(|c| c.get("contained").is_none()))
}

/// The `meta` of every contained resource (absent counts as empty) passes `proof`.
fn contained_meta(resource: &Object, proof: impl Fn(&Object) -> bool) -> bool {
    objects(resource, "contained").is_some_and(|items| {
        items.iter().all(|c| match c.get("meta") {
            None => true,
            Some(Json::Object(meta)) => proof(meta),
            Some(_) => false,
        })
    })
}

fn dom_4(resource: &Object) -> bool {
    contained_meta(resource, |meta| absent(meta, "versionId") && absent(meta, "lastUpdated"))
}

fn dom_5(resource: &Object) -> bool {
    contained_meta(resource, |meta| meta.get("security").is_none())
}

fn dom_6(resource: &Object) -> bool {
    matches!(resource.get("text"), Some(Json::Object(text)) if matches!(text.get("div"), Some(Json::String(div)) if !div.is_empty()))
}

fn bundle_type(bundle: &Object) -> Option<&str> {
    bundle.get("type")?.as_str()
}

fn bdl_2(bundle: &Object) -> bool {
    bundle_type(bundle) == Some("searchset") || objects(bundle, "entry").is_some_and(|entries| entries.iter().all(|e| e.get("search").is_none()))
}

/// Every entry has `member` exactly when the Bundle type is one of `types`.
fn entries_have_when(bundle: &Object, member: &str, types: &[&str]) -> bool {
    let Some(kind) = bundle_type(bundle) else { return false };
    let wanted = types.contains(&kind);
    objects(bundle, "entry").is_some_and(|entries| entries.iter().all(|e| matches!(e.get(member), Some(Json::Object(o)) if !o.is_empty()) == wanted && (wanted || e.get(member).is_none())))
}

fn bdl_3(bundle: &Object) -> bool {
    entries_have_when(bundle, "request", &["batch", "transaction", "history"])
}

fn bdl_4(bundle: &Object) -> bool {
    entries_have_when(bundle, "response", &["batch-response", "transaction-response", "history"])
}

/// `fullUrl & resource.meta.versionId` differs between all entries with a fullUrl.
fn bdl_7(bundle: &Object) -> bool {
    if bundle_type(bundle) == Some("history") {
        return true;
    }
    let Some(entries) = objects(bundle, "entry") else { return false };
    let mut keys: Vec<(&str, &str)> = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.get("_fullUrl").is_some() {
            return false;
        }
        let Some(url) = entry.get("fullUrl") else { continue };
        let Json::String(url) = url else { return false };
        let version = match entry.get("resource").and_then(|r| r.get("meta")) {
            None => "",
            Some(Json::Object(meta)) if meta.get("_versionId").is_none() => match meta.get("versionId") {
                None => "",
                Some(Json::String(v)) => v,
                Some(_) => return false,
            },
            Some(_) => return false,
        };
        keys.push((url, version));
    }
    // Without versions the concatenations are the URLs themselves, and need not be built.
    if keys.iter().all(|(_, version)| version.is_empty()) {
        let mut seen = foldhash::HashSet::with_capacity_and_hasher(keys.len(), Default::default());
        keys.iter().all(|(url, _)| seen.insert(*url))
    } else {
        let mut seen = foldhash::HashSet::with_capacity_and_hasher(keys.len(), Default::default());
        keys.iter().all(|(url, version)| seen.insert(format!("{url}{version}")))
    }
}

/// A name that matches the pattern as a whole also matches it anywhere.
fn nsd_0(naming_system: &Object) -> bool {
    match naming_system.get("name") {
        None => absent(naming_system, "name"),
        Some(Json::String(name)) => {
            let mut bytes = name.bytes();
            name.len() <= 255 && bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }
        Some(_) => false,
    }
}

fn nsd_1(naming_system: &Object) -> bool {
    if matches!(naming_system.get("kind"), Some(Json::String(kind)) if kind != "root") {
        return true;
    }
    match naming_system.get("uniqueId") {
        None => true,
        Some(Json::Array(ids)) => ids.iter().all(|id| matches!(id.get("type"), Some(Json::String(t)) if t != "uuid")),
        Some(_) => false,
    }
}

fn nsd_2(naming_system: &Object) -> bool {
    let Some(ids) = naming_system.get("uniqueId") else { return true };
    let Json::Array(ids) = ids else { return false };
    let mut types: Vec<&str> = Vec::new();
    for id in ids {
        match id.get("preferred") {
            None | Some(Json::Bool(false)) => continue,
            Some(Json::Bool(true)) => {}
            Some(_) => return false,
        }
        match id.get("type") {
            Some(Json::String(t)) if !types.contains(&&**t) => types.push(t),
            _ => return false,
        }
    }
    true
}

/// The item's `type` value, when it is a plain string.
fn item_type(item: &Object) -> Option<&str> {
    item.get("type")?.as_str()
}

fn que_1(item: &Object) -> bool {
    match item_type(item) {
        Some("group") => matches!(item.get("item"), Some(Json::Array(items)) if !items.is_empty()),
        Some("display") => item.get("item").is_none(),
        Some(_) => true,
        None => false,
    }
}

fn que_5(item: &Object) -> bool {
    matches!(item_type(item), Some("choice" | "open-choice" | "decimal" | "integer" | "date" | "dateTime" | "time" | "string" | "quantity"))
        || (absent(item, "answerValueSet") && item.get("answerOption").is_none())
}

fn que_10(item: &Object) -> bool {
    matches!(item_type(item), Some("boolean" | "decimal" | "integer" | "string" | "text" | "url" | "open-choice")) || absent(item, "maxLength")
}

fn cmd_1(target: &Object) -> bool {
    has_string(target, "comment")
        || absent(target, "equivalence")
        || matches!(target.get("equivalence"), Some(Json::String(e)) if e != "narrower" && e != "inexact")
}

fn has_string(object: &Object, name: &str) -> bool {
    matches!(object.get(name), Some(Json::String(s)) if !s.is_empty())
}

/// A value FHIRPath sees as present: not null, not an empty string, array or object.
fn has_content(value: &Json) -> bool {
    match value {
        Json::Null => false,
        Json::String(s) => !s.is_empty(),
        Json::Array(items) => !items.is_empty(),
        Json::Object(o) => !o.is_empty(),
        Json::Bool(_) | Json::Number(_) => true,
    }
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
            r##"{"resourceType":"Patient","telecom":[{"value":"555"}],"extension":[{"url":"http://example.org/x"},{"url":"http://example.org/y","valueString":"a","extension":[{"url":"z","valueString":"b"}]}]}"##,
            r##"{"resourceType":"Patient","extension":[{"url":"http://example.org/y","_valueString":{"extension":[{"url":"z","valueString":"b"}]}}]}"##,
            r##"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"1-8"}]},"valueString":"x","component":[{"code":{"coding":[{"system":"http://loinc.org","code":"1-8"}]},"valueString":"y"}],"referenceRange":[{"extension":[{"url":"http://example.org/x","valueString":"z"}]}]}"##,
            r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1,"comparator":"<"},"effectivePeriod":{"start":"2020-02-01","end":"2020-01-01"}}"##,
            r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},"effectivePeriod":{"start":"2020-01-01T10:00:00Z","end":"2020-01-01T11:00:00+02:00"}}"##,
            r##"{"resourceType":"DocumentReference","status":"current","content":[{"attachment":{"data":"AAAA"}}]}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Patient","id":"a","meta":{"versionId":"1","security":[{"code":"R"}]},"contained":[{"resourceType":"Patient","id":"b"}]}],"link":[{"type":"seealso","other":{"reference":"#a"}}]}"##,
            r##"{"resourceType":"Bundle","type":"collection","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient","meta":{"versionId":"1"}},"search":{"mode":"match"},"request":{"method":"GET","url":"Patient"}},{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient","meta":{"versionId":"1"}}},{"fullUrl":"urn:uuid:1"}]}"##,
            r##"{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"response":{"status":"200"}},{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}}]}"##,
            r##"{"resourceType":"Bundle","type":"history","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"},"response":{"status":"201"}},{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"PUT","url":"Patient/1"},"response":{"status":"200"}}]}"##,
            r##"{"resourceType":"Patient","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"><script>x</script></div>"}}"##,
            r##"{"resourceType":"NamingSystem","name":"bad name","status":"active","kind":"root","date":"2020-01-01","uniqueId":[{"type":"uuid","value":"a","preferred":true},{"type":"uuid","value":"b","preferred":true}]}"##,
            r##"{"resourceType":"NamingSystem","name":"Good_Name1","status":"active","kind":"identifier","date":"2020-01-01","uniqueId":[{"type":"uri","value":"http://a","preferred":true},{"type":"oid","value":"1.2","preferred":true}]}"##,
            r##"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"group"},{"linkId":"2","type":"display","item":[{"linkId":"3","type":"string"}]},{"linkId":"4","type":"boolean","maxLength":3,"answerValueSet":"http://example.org/vs"},{"linkId":"5","type":"date","maxLength":3}]}"##,
            r##"{"resourceType":"ConceptMap","status":"draft","group":[{"element":[{"code":"a","target":[{"code":"b","equivalence":"narrower"},{"code":"c","equivalence":"inexact","comment":"why"},{"code":"d","equivalence":"equal"}]}]}]}"##,
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
