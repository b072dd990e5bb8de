//! Verdicts on the hot base invariants read straight off the JSON, so that the FHIRPath evaluation can be skipped.
//!
//! The hot base constraints (ref-1 on every Reference, dom-3 on every resource with contained
//! resources, bdl-5 and bdl-8 on every Bundle entry, …) mostly hold, or fail, for a reason
//! visible in one or two members. A shortcut applies only to the exact R4 expression text under
//! its key, so a profile that redefines a key is evaluated as written. A shortcut answers
//! "holds", "fails" (only where the answer is as plain as the expression) or "don't know", and
//! "don't know" falls back to FHIRPath. The test below checks each shortcut against the FHIRPath
//! result over the corpus and crafted cases.

use crate::json::{Json, Object};

/// What a shortcut can tell about a constraint on one element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Holds,
    Fails,
    Unknown,
}

/// `Holds` when the proof succeeds, else `Unknown`.
fn holds_if(proof: bool) -> Verdict {
    if proof { Verdict::Holds } else { Verdict::Unknown }
}

/// Where the element stands: what the constraints that read `%resource` or `%rootResource` need.
pub(super) struct Place<'j> {
    /// The element is `%resource` itself (dom-3, bdl-3 and bdl-4 read it as such).
    pub node_is_resource: bool,
    /// `%rootResource`, found on demand (only ref-1 asks).
    pub root_resource: &'j dyn Fn() -> Option<&'j Json>,
}

pub(super) type Proof = fn(&Object, &Place<'_>) -> Verdict;

/// The shortcut for the constraint `key`: its exact R4 expression, and the proof.
///
/// A `match`, not a table: it compiles to a few inline comparisons, and it runs for every
/// constraint of every element.
fn shortcut(key: &str) -> Option<(&'static str, Proof)> {
    Some(match key {
        "ref-1" => ("reference.startsWith('#').not() or (reference.substring(1).trace('url') in %rootResource.contained.id.trace('ids'))", ref_1),
        "dom-3" => ("contained.where((('#'+id in (%resource.descendants().reference | %resource.descendants().as(canonical) | %resource.descendants().as(uri) | %resource.descendants().as(url))) or descendants().where(reference = '#').exists() or descendants().where(as(canonical) = '#').exists() or descendants().where(as(canonical) = '#').exists()).not()).trace('unmatched', id).empty()", |o, p| holds_if(p.node_is_resource && dom_3(o))),
        "bdl-5" => ("resource.exists() or request.exists() or response.exists()", |o, _| holds_if(bdl_5(o))),
        "bdl-8" => ("fullUrl.contains('/_history/').not()", |o, _| holds_if(bdl_8(o))),
        "obs-6" => ("dataAbsentReason.empty() or value.empty()", |o, _| holds_if(absent(o, "dataAbsentReason"))),
        "qty-3" => ("code.empty() or system.exists()", |o, _| holds_if(has_string(o, "system") || absent(o, "code"))),
        "cpt-2" => ("value.empty() or system.exists()", |o, _| holds_if(has_string(o, "system") || absent(o, "value"))),
        "sqty-1" => ("comparator.empty()", |o, _| holds_if(absent(o, "comparator"))),
        "att-1" => ("data.empty() or contentType.exists()", |o, _| holds_if(has_string(o, "contentType") || absent(o, "data"))),
        "per-1" => ("start.hasValue().not() or end.hasValue().not() or (start <= end)", |o, _| holds_if(absent(o, "start") || absent(o, "end"))),
        "ext-1" => ("extension.exists() != value.exists()", |o, _| holds_if(ext_1(o))),
        "obs-3" => ("low.exists() or high.exists() or text.exists()", |o, _| holds_if(obs_3(o))),
        "obs-7" => ("value.empty() or component.code.where(coding.intersect(%resource.code.coding).exists()).empty()", |o, _| holds_if(obs_7(o))),
        "dom-2" => ("contained.contained.empty()", |o, _| holds_if(dom_2(o))),
        "dom-4" => ("contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()", |o, _| holds_if(dom_4(o))),
        "dom-5" => ("contained.meta.security.empty()", |o, _| holds_if(dom_5(o))),
        "dom-6" => ("text.`div`.exists()", dom_6),
        "bdl-1" => ("total.empty() or (type = 'searchset') or (type = 'history')", |o, _| holds_if(absent(o, "total") || matches!(bundle_type(o), Some("searchset" | "history")))),
        "bdl-2" => ("entry.search.empty() or (type = 'searchset')", |o, _| holds_if(bdl_2(o))),
        "bdl-3" => ("entry.all(request.exists() = (%resource.type = 'batch' or %resource.type = 'transaction' or %resource.type = 'history'))", |o, p| holds_if(p.node_is_resource && bdl_3(o))),
        "bdl-4" => ("entry.all(response.exists() = (%resource.type = 'batch-response' or %resource.type = 'transaction-response' or %resource.type = 'history'))", |o, p| holds_if(p.node_is_resource && bdl_4(o))),
        "bdl-7" => ("(type = 'history') or entry.where(fullUrl.exists()).select(fullUrl&resource.meta.versionId).isDistinct()", |o, _| holds_if(bdl_7(o))),
        "bdl-9" => ("type = 'document' implies (identifier.system.exists() and identifier.value.exists())", |o, _| holds_if(bundle_type_is_not(o, "document"))),
        "bdl-10" => ("type = 'document' implies (timestamp.hasValue())", |o, _| holds_if(bundle_type_is_not(o, "document"))),
        "bdl-11" => ("type = 'document' implies entry.first().resource.is(Composition)", |o, _| holds_if(bundle_type_is_not(o, "document"))),
        "bdl-12" => ("type = 'message' implies entry.first().resource.is(MessageHeader)", |o, _| holds_if(bundle_type_is_not(o, "message"))),
        "nsd-0" | "cmd-0" => ("name.matches('[A-Z]([A-Za-z0-9_]){0,254}')", name_has_capital),
        "nsd-1" => ("kind != 'root' or uniqueId.all(type != 'uuid')", |o, _| holds_if(nsd_1(o))),
        "nsd-2" => ("uniqueId.where(preferred = true).select(type).isDistinct()", |o, _| holds_if(nsd_2(o))),
        "que-1" => ("(type='group' implies item.empty().not()) and (type.trace('type')='display' implies item.trace('item').empty())", |o, _| holds_if(que_1(o))),
        "que-2" => ("descendants().linkId.isDistinct()", |o, _| holds_if(que_2(o))),
        "que-3" => ("type!='display' or code.empty()", |o, _| holds_if(item_type_is_not(o, &["display"]) || o.get("code").is_none())),
        "que-5" => ("(type ='choice' or type = 'open-choice' or type = 'decimal' or type = 'integer' or type = 'date' or type = 'dateTime' or type = 'time' or type = 'string' or type = 'quantity') or (answerValueSet.empty() and answerOption.empty())", |o, _| holds_if(que_5(o))),
        "que-6" => ("type!='display' or (required.empty() and repeats.empty())", |o, _| holds_if(item_type_is_not(o, &["display"]) || (absent(o, "required") && absent(o, "repeats")))),
        "que-8" => ("(type!='group' and type!='display') or initial.empty()", |o, _| holds_if(item_type_is_not(o, &["group", "display"]) || o.get("initial").is_none())),
        "que-9" => ("type!='display' or readOnly.empty()", |o, _| holds_if(item_type_is_not(o, &["display"]) || absent(o, "readOnly"))),
        "que-10" => ("(type in ('boolean' | 'decimal' | 'integer' | 'string' | 'text' | 'url' | 'open-choice')) or maxLength.empty()", |o, _| holds_if(que_10(o))),
        "qrs-1" => ("(answer.exists() and item.exists()).not()", |o, _| holds_if(o.get("answer").is_none() || o.get("item").is_none())),
        "exp-1" => ("expression.exists() or reference.exists()", |o, _| holds_if(has_string(o, "expression") || has_string(o, "reference"))),
        "rat-1" => ("(numerator.empty() xor denominator.exists()) and (numerator.exists() or extension.exists())", |o, _| holds_if(has_object(o, "numerator") && has_object(o, "denominator"))),
        "org-1" => ("(identifier.count() + name.count()) > 0", |o, _| holds_if(has_string(o, "name") || matches!(o.get("identifier"), Some(Json::Array(ids)) if ids.iter().any(|id| matches!(id, Json::Object(i) if !i.is_empty()))))),
        "cmd-1" => ("comment.exists() or equivalence.empty() or ((equivalence != 'narrower') and (equivalence != 'inexact'))", |o, _| holds_if(cmd_1(o))),
        _ => return None,
    })
}

/// The shortcut for the constraint `key` when its expression is exactly `source`.
pub(super) fn find(key: &str, source: &str) -> Option<Proof> {
    shortcut(key).filter(|(expression, _)| *expression == source).map(|(_, proof)| proof)
}

/// What `proof` tells about `node`.
pub(super) fn apply(proof: Proof, node: &Json, place: &Place<'_>) -> Verdict {
    #[cfg(test)]
    if tests::DISABLED.get() {
        return Verdict::Unknown;
    }
    match node {
        Json::Object(object) => proof(object, place),
        _ => Verdict::Unknown,
    }
}

/// Neither `name` nor its `_name` sibling is present, so FHIRPath sees no `name` at all.
fn absent(object: &Object, name: &str) -> bool {
    !object.iter().any(|(member, _)| member.strip_prefix('_').unwrap_or(member) == name)
}

/// A reference that is absent or does not start with `#` is not a contained reference; one
/// that does holds when the root resource contains a resource with that id.
fn ref_1(reference: &Object, place: &Place<'_>) -> Verdict {
    match reference.get("reference") {
        Some(Json::String(text)) => match text.strip_prefix('#') {
            None => Verdict::Holds,
            Some(id) => {
                let contained = (place.root_resource)().and_then(|root| root.get("contained")).and_then(Json::as_array).unwrap_or_default();
                holds_if(!id.is_empty() && contained.iter().any(|c| c.get("id").and_then(Json::as_str) == Some(id)))
            }
        },
        None => holds_if(reference.get("_reference").is_none()),
        Some(_) => Verdict::Unknown,
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

/// A resource without `text`, or whose `text` has no `div`, fails.
fn dom_6(resource: &Object, _: &Place<'_>) -> Verdict {
    match resource.get("text") {
        None => Verdict::Fails,
        Some(Json::Object(text)) => match text.get("div") {
            Some(Json::String(div)) if !div.is_empty() => Verdict::Holds,
            None if text.get("_div").is_none() => Verdict::Fails,
            _ => Verdict::Unknown,
        },
        Some(_) => Verdict::Unknown,
    }
}

fn bundle_type(bundle: &Object) -> Option<&str> {
    bundle.get("type")?.as_str()
}

/// The Bundle's type is given, and is not `kind`: the `implies` of bdl-9 to bdl-12 then holds.
fn bundle_type_is_not(bundle: &Object, kind: &str) -> bool {
    bundle_type(bundle).is_some_and(|t| t != kind)
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

/// FHIRPath's `matches()` finds the pattern anywhere, and `{0,254}` allows nothing after the
/// capital: a name matches exactly when it has an ASCII capital letter.
fn name_has_capital(resource: &Object, _: &Place<'_>) -> Verdict {
    match resource.get("name") {
        None => holds_if(absent(resource, "name")),
        Some(Json::String(name)) if name.bytes().any(|b| b.is_ascii_uppercase()) => Verdict::Holds,
        Some(Json::String(_)) => Verdict::Fails,
        Some(_) => Verdict::Unknown,
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

/// The item's `type` is given and is none of `types`.
fn item_type_is_not(item: &Object, types: &[&str]) -> bool {
    item_type(item).is_some_and(|t| !types.contains(&t))
}

/// Every `linkId` at any depth is a plain string, and no two are equal.
fn que_2(questionnaire: &Object) -> bool {
    fn collect<'j>(object: &'j Object, out: &mut Vec<&'j str>) -> bool {
        object.iter().all(|(name, value)| match (name, value) {
            ("linkId", Json::String(id)) => {
                out.push(id);
                true
            }
            ("linkId" | "_linkId", _) => false,
            (_, Json::Object(child)) => collect(child, out),
            (_, Json::Array(items)) => items.iter().all(|item| !matches!(item, Json::Object(child) if !collect(child, out))),
            _ => true,
        })
    }
    let mut ids = Vec::new();
    if !collect(questionnaire, &mut ids) {
        return false;
    }
    ids.sort_unstable();
    ids.windows(2).all(|pair| pair[0] != pair[1])
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

fn has_object(object: &Object, name: &str) -> bool {
    matches!(object.get(name), Some(Json::Object(o)) if !o.is_empty())
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
        let Some(corpus) = crate::need::corpus("validation::invariants::shortcuts::tests::shortcuts_agree_with_fhirpath_on_the_corpus") else { return };
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
            r##"{"resourceType":"ConceptMap","name":"lower case","status":"draft"}"##,
            r##"{"resourceType":"ConceptMap","name":"Has Capital","status":"draft","text":{"status":"generated"}}"##,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Organization","id":"o1","name":"x"},{"resourceType":"Practitioner","id":"p1","extension":[{"url":"http://example.org/x","valueReference":{"reference":"#o1"}}]}],"generalPractitioner":[{"reference":"#p1"},{"reference":"#"},{"reference":"#nowhere"}]}"##,
            r##"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"display","code":[{"code":"c"}],"required":true,"readOnly":true,"initialString":"x"},{"linkId":"1","type":"group","initial":[{"valueString":"x"}],"item":[{"linkId":"2","type":"string"}]}]}"##,
            r##"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"display","repeats":false},{"linkId":"2","type":"string","code":[{"code":"c"}],"initial":[{"valueString":"x"}]}]}"##,
            r##"{"resourceType":"QuestionnaireResponse","status":"completed","item":[{"linkId":"1","answer":[{"valueString":"a"}],"item":[{"linkId":"2"}]},{"linkId":"3","answer":[{"valueString":"b"}]}]}"##,
            r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueRatio":{"numerator":{"value":1}},"component":[{"code":{"text":"y"},"valueRatio":{"numerator":{"value":1},"denominator":{"value":2}}},{"code":{"text":"z"},"valueRatio":{"denominator":{"value":2}}}]}"##,
            r##"{"resourceType":"PlanDefinition","status":"draft","action":[{"condition":[{"kind":"applicability","expression":{"language":"text/cql"}},{"kind":"start","expression":{"language":"text/cql","expression":"true"}}]}]}"##,
            r##"{"resourceType":"Bundle","type":"collection","total":3}"##,
            r##"{"resourceType":"Bundle","type":"document","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"}}]}"##,
            r##"{"resourceType":"Bundle","type":"message","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"}}]}"##,
            r##"{"resourceType":"Organization","active":true}"##,
            r##"{"resourceType":"Organization","identifier":[{"value":"1"}]}"##,
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
