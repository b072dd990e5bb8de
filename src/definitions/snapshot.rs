//! Snapshot generation: turns a differential-only StructureDefinition into one with a full snapshot, by merging its differential into its base's snapshot.
//!
//! Elements are addressed by element id (`Observation.code.coding:loinc.system`). A differential
//! element that reaches into a data type (`Observation.code.coding`) first expands its parent with
//! that type's own elements; a new slice first copies the sliced element and its children.

use std::collections::HashMap;

use crate::definitions::Definitions;
use crate::definitions::structure::type_suffix;
use crate::json::{Json, Object};

/// Deepest chain of differential-only bases followed before giving up (cycles, broken packages).
const MAX_BASE_DEPTH: usize = 16;

/// Returns a copy of `resource` with a generated `snapshot`.
pub(super) fn generate(resource: &Json, definitions: &Definitions) -> Result<Json, String> {
    generate_at_depth(resource, definitions, 0)
}

fn generate_at_depth(resource: &Json, definitions: &Definitions, depth: usize) -> Result<Json, String> {
    if depth > MAX_BASE_DEPTH {
        return Err("baseDefinition chain too deep (a cycle?)".into());
    }
    let base_url = resource.get("baseDefinition").and_then(Json::as_str).ok_or("no snapshot and no baseDefinition")?;
    let base = definitions.resolve(base_url).ok_or_else(|| format!("base definition {base_url} is not loaded"))?;
    let base = if base.get("snapshot").is_some() { (*base).clone() } else { generate_at_depth(&base, definitions, depth + 1)? };
    let mut elements: Vec<Object> = base
        .get("snapshot")
        .and_then(|s| s.get("element"))
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_object).cloned().collect())
        .unwrap_or_default();
    for element in &mut elements {
        // Every element keeps an id so the differential can address it.
        if element.get("id").is_none()
            && let Some(path) = element.get("path").cloned()
        {
            element.insert("id", path);
        }
    }
    let differential =
        resource.get("differential").and_then(|d| d.get("element")).and_then(Json::as_array).ok_or("no differential")?;
    let mut slices = SliceContext::default();
    // The `min` each element had before this differential constrained it: a new slice starts from
    // it, as HL7's snapshot generator has it (US Core's `Observation.category` is 1..*, its `us-core`
    // slice 0..* unless the slice says otherwise), not from the sliced element's own constrained `min`.
    let mut base_min: HashMap<String, Json> = HashMap::new();
    for diff in differential {
        let Some(diff) = diff.as_object() else { continue };
        let is_root = diff.get("path").and_then(Json::as_str).is_some_and(|p| !p.contains('.'));
        if is_root && diff.get("slicing").is_some() {
            return Err("the differential slices the root element, which cannot repeat".into());
        }
        let id = slices.id_of(diff).ok_or("differential element without path")?;
        let index = match find(&elements, &id) {
            Some(i) => i,
            None => materialize(&mut elements, &id, diff, definitions, &base_min)?,
        };
        if let Some(path) = diff.get("path").and_then(Json::as_str) {
            let target = elements[index].get("path").and_then(Json::as_str).unwrap_or_default();
            if !path_names(path, target, &elements[index]) {
                return Err(format!("the differential element {id} has the path {path}, which is not the path of that element ({target})"));
            }
        }
        if diff.get("min").is_some()
            && let Some(min) = elements[index].get("min")
        {
            base_min.entry(id.clone()).or_insert_with(|| min.clone());
        }
        merge(&mut elements[index], diff);
    }
    let mut out = resource.as_object().cloned().ok_or("not an object")?;
    let mut snapshot = Object::new();
    snapshot.insert("element", Json::Array(elements.into_iter().map(Json::Object).collect()));
    out.insert("snapshot", Json::Object(snapshot));
    Ok(Json::Object(out))
}

/// Gives differential elements their ids, following the slice each one is inside.
///
/// Older differentials have paths but no ids: `Bundle.entry` with `sliceName: Patient`, then
/// `Bundle.entry.resource`, which constrains the resource *of that slice*. The path alone would
/// put the constraint on the unsliced element, so the slice last opened at each path is remembered
/// until the differential returns to the unsliced element or leaves the path.
#[derive(Default)]
struct SliceContext {
    /// (path, id of the slice open at it), outermost first.
    open: Vec<(String, String)>,
}

impl SliceContext {
    fn id_of(&mut self, diff: &Object) -> Option<String> {
        let path = diff.get("path").and_then(Json::as_str)?;
        // Slices opened at paths that are not ancestors of (or equal to) this one are closed.
        self.open.retain(|(open, _)| path == open || is_descendant_path(path, open));
        // An id that does not spell the element's path is a mistake in the differential; the path is what
        // defines the element, so the id is then derived from the path as if there were none.
        let id = diff.get("id").and_then(Json::as_str).filter(|id| unsliced(id) == path);
        if let Some(id) = id {
            self.open.retain(|(open, _)| open != path);
            if diff.get("sliceName").is_some() {
                self.open.push((path.to_string(), id.to_string()));
            }
            return Some(id.to_string());
        }
        // The innermost open slice that contains this path gives the prefix of its id.
        let prefixed = match self.open.iter().rev().find(|(open, _)| is_descendant_path(path, open)) {
            Some((open, slice_id)) => format!("{slice_id}{}", &path[open.len()..]),
            None => path.to_string(),
        };
        match diff.get("sliceName").and_then(Json::as_str) {
            Some(slice) => {
                let id = format!("{prefixed}:{slice}");
                self.open.retain(|(open, _)| open != path);
                self.open.push((path.to_string(), id.clone()));
                Some(id)
            }
            None => {
                // The unsliced element itself: the slices opened at this path are over.
                self.open.retain(|(open, _)| open != path);
                Some(prefixed)
            }
        }
    }
}

/// An element id without its slice names: its path.
fn unsliced(id: &str) -> String {
    id.split('.').map(|segment| segment.split(':').next().unwrap_or(segment)).collect::<Vec<_>>().join(".")
}

fn is_descendant_path(path: &str, ancestor: &str) -> bool {
    path.len() > ancestor.len() && path.starts_with(ancestor) && path.as_bytes()[ancestor.len()] == b'.'
}

fn id_of(element: &Object) -> &str {
    element.get("id").and_then(Json::as_str).unwrap_or_default()
}

fn find(elements: &[Object], id: &str) -> Option<usize> {
    if let Some(i) = elements.iter().position(|e| id_of(e) == id) {
        return Some(i);
    }
    // `Observation.valueQuantity` addresses `Observation.value[x]` when that is constrained to Quantity.
    let (parent, last) = id.rsplit_once('.')?;
    elements.iter().position(|e| {
        let eid = id_of(e);
        let Some(choice) = eid.strip_suffix("[x]") else { return false };
        let Some((eparent, ename)) = choice.rsplit_once('.') else { return false };
        let Some(suffix) = last.strip_prefix(ename).filter(|s| s.starts_with(|c: char| c.is_ascii_uppercase())) else { return false };
        // The suffix must name one of the choice's types (`valueBla` addresses nothing).
        let types = e.get("type").and_then(Json::as_array).unwrap_or_default();
        eparent == parent && (types.is_empty() || types.iter().filter_map(|t| t.get("code").and_then(Json::as_str)).any(|c| type_suffix(c) == suffix))
    })
}

/// Whether a differential path names a snapshot element: the same path, or a choice (`value[x]`) by one of its types (`valueQuantity`).
fn path_names(path: &str, target: &str, element: &Object) -> bool {
    if path == target {
        return true;
    }
    let Some(stem) = target.strip_suffix("[x]") else { return false };
    let Some(suffix) = path.strip_prefix(stem) else { return false };
    let types = element.get("type").and_then(Json::as_array).unwrap_or_default();
    types.iter().filter_map(|t| t.get("code").and_then(Json::as_str)).any(|c| type_suffix(c) == suffix)
}

/// Creates the element `id` names (a new slice, or a child inside a data type) and returns its index.
fn materialize(elements: &mut Vec<Object>, id: &str, diff: &Object, definitions: &Definitions, base_min: &HashMap<String, Json>) -> Result<usize, String> {
    let (parent_id, last) = split_last(id).ok_or_else(|| format!("cannot place element {id}"))?;
    if let Some((name, slice)) = last.split_once(':') {
        // A new slice (or re-slice): copy the sliced element and its children.
        let sliced_id = format!("{}{name}", parent_id.map(|p| format!("{p}.")).unwrap_or_default());
        let sliced = find(elements, &sliced_id).map_or_else(|| materialize(elements, &sliced_id, &Object::new(), definitions, base_min), Ok)?;
        let end = subtree_end(elements, sliced);
        // Slices go after the sliced element's own subtree and after earlier slices of it.
        let mut insert_at = end;
        while insert_at < elements.len() && id_of(&elements[insert_at]).starts_with(&format!("{sliced_id}:")) {
            insert_at += 1;
        }
        let sliced_own_id = id_of(&elements[sliced]).to_string();
        let mut copies: Vec<Object> = Vec::new();
        for (k, element) in elements[sliced..end].iter().enumerate() {
            let mut copy = element.clone();
            let old = id_of(element).to_string();
            let new_id = format!("{id}{}", &old[sliced_own_id.len()..]);
            copy.insert("id", Json::string(new_id));
            if k == 0 {
                copy.insert("sliceName", Json::string(slice));
                copy.remove("slicing");
                if let Some(min) = base_min.get(&old) {
                    copy.insert("min", min.clone());
                }
            }
            copies.push(copy);
        }
        let n = copies.len();
        elements.splice(insert_at..insert_at, copies);
        let _ = n;
        return Ok(insert_at);
    }
    let parent_id = parent_id.ok_or_else(|| format!("cannot place root element {id}"))?;
    let parent = match find(elements, parent_id) {
        Some(i) => i,
        None => materialize(elements, parent_id, &Object::new(), definitions, base_min)?,
    };
    expand(elements, parent, diff, definitions)?;
    find(elements, id).ok_or_else(|| format!("element {id} does not exist in the base definition or its types"))
}

/// Splits `a.b:s.c` into (`a.b:s`, `c`), respecting that slice names may contain dots only after `:`.
fn split_last(id: &str) -> Option<(Option<&str>, &str)> {
    // Slice names in ids do not contain '.', so the last '.' splits the last segment off.
    match id.rfind('.') {
        Some(pos) => Some((Some(&id[..pos]), &id[pos + 1..])),
        None => Some((None, id)),
    }
}

/// The index after the last descendant of `index`.
fn subtree_end(elements: &[Object], index: usize) -> usize {
    let own = format!("{}.", id_of(&elements[index]));
    let mut end = index + 1;
    while end < elements.len() && id_of(&elements[end]).starts_with(&own) {
        end += 1;
    }
    end
}

/// Inserts the children of the data type of the element at `parent` (from its base type definition) after it.
fn expand(elements: &mut Vec<Object>, parent: usize, _diff: &Object, definitions: &Definitions) -> Result<(), String> {
    if subtree_end(elements, parent) > parent + 1 {
        return Ok(());
    }
    let parent_id = id_of(&elements[parent]).to_string();
    let parent_path = elements[parent].get("path").and_then(Json::as_str).unwrap_or_default().to_string();
    let types: Vec<String> = elements[parent]
        .get("type")
        .and_then(Json::as_array)
        .map(|ts| ts.iter().filter_map(|t| t.get("code").and_then(Json::as_str)).map(str::to_string).collect())
        .unwrap_or_default();
    let (type_name, source_root) = if let Some(reference) = elements[parent].get("contentReference").and_then(Json::as_str) {
        // A recursive element (`Questionnaire.item.item`) reuses the referenced element's children.
        let target = reference.trim_start_matches('#');
        (target.split('.').next().unwrap_or(target).to_string(), target.to_string())
    } else {
        match types.as_slice() {
            [t] if t == "BackboneElement" || t == "Element" => {
                return Err(format!("cannot expand {parent_id}: anonymous element without children in the base"));
            }
            [t] => (t.clone(), t.clone()),
            // A choice of several types shares only what every element has (`id`, `extension`).
            [_, _, ..] => ("Element".to_string(), "Element".to_string()),
            [] => return Err(format!("cannot expand {parent_id}: it has no type")),
        }
    };
    let structure = definitions.resolve(&format!("{}{}", crate::definitions::CORE_SD_BASE, type_name)).ok_or_else(|| format!("type {type_name} is not loaded"))?;
    let source: Vec<Object> = structure
        .get("snapshot")
        .and_then(|s| s.get("element"))
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_object).cloned().collect())
        .unwrap_or_default();
    let prefix = format!("{source_root}.");
    let mut inserted = Vec::new();
    for element in source {
        let path = element.get("path").and_then(Json::as_str).unwrap_or_default().to_string();
        let Some(rest) = path.strip_prefix(&prefix) else { continue };
        let eid = element.get("id").and_then(Json::as_str).unwrap_or(&path).to_string();
        let rest_id = eid.strip_prefix(&prefix).unwrap_or(rest).to_string();
        let mut copy = element;
        copy.insert("path", Json::string(format!("{parent_path}.{rest}")));
        copy.insert("id", Json::string(format!("{parent_id}.{rest_id}")));
        inserted.push(copy);
    }
    elements.splice(parent + 1..parent + 1, inserted);
    Ok(())
}

/// Applies a differential element's constraints to a snapshot element.
fn merge(target: &mut Object, diff: &Object) {
    for (key, value) in diff.iter() {
        match key {
            "id" | "path" => {}
            "constraint" => {
                let mut all = target.get("constraint").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
                for c in value.as_array().unwrap_or_default() {
                    let key = c.get("key");
                    all.retain(|existing| existing.get("key") != key);
                    all.push(c.clone());
                }
                target.insert("constraint", Json::Array(all));
            }
            _ => {
                if key.starts_with("fixed") || key.starts_with("pattern") {
                    let stale: Vec<String> =
                        target.iter().map(|(k, _)| k.to_string()).filter(|k| k.starts_with("fixed") || k.starts_with("pattern")).collect();
                    for k in stale {
                        target.remove(&k);
                    }
                }
                target.insert(key, value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;

    fn profile(differential: &str) -> Json {
        let text = format!(
            r#"{{"resourceType":"StructureDefinition","url":"http://example.org/sd/test","name":"Test","status":"draft",
            "kind":"resource","abstract":false,"type":"Observation","derivation":"constraint",
            "baseDefinition":"http://hl7.org/fhir/StructureDefinition/Observation","differential":{{"element":{differential}}}}}"#
        );
        json::parse(text.as_bytes()).unwrap()
    }

    fn ids(snapshot: &Json) -> Vec<String> {
        snapshot["snapshot"]["element"].as_array().unwrap().iter().map(|e| e.get("id").unwrap().as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn merges_into_base_and_expands_data_types_and_slices() {
        let definitions = Definitions::base();
        let sd = profile(
            r#"[{"id":"Observation.status","path":"Observation.status","fixedCode":"final"},
               {"id":"Observation.code.coding","path":"Observation.code.coding","slicing":{"discriminator":[{"type":"value","path":"system"}],"rules":"open"}},
               {"id":"Observation.code.coding:loinc","path":"Observation.code.coding","sliceName":"loinc","min":1},
               {"id":"Observation.code.coding:loinc.system","path":"Observation.code.coding.system","fixedUri":"http://loinc.org"},
               {"id":"Observation.valueQuantity","path":"Observation.valueQuantity","min":1}]"#,
        );
        let snapshot = generate(&sd, &definitions).unwrap();
        let ids = ids(&snapshot);
        let at = |id: &str| ids.iter().position(|x| x == id).unwrap_or_else(|| panic!("{id} missing"));
        assert!(at("Observation.code") < at("Observation.code.coding"));
        assert!(at("Observation.code.coding:loinc") < at("Observation.code.coding:loinc.system"));
        assert!(at("Observation.code.coding:loinc.system") < at("Observation.code.text"));
        let elements = snapshot["snapshot"]["element"].as_array().unwrap();
        assert_eq!(elements[at("Observation.status")].get("fixedCode").and_then(Json::as_str), Some("final"));
        assert_eq!(elements[at("Observation.code.coding:loinc.system")].get("fixedUri").and_then(Json::as_str), Some("http://loinc.org"));
        assert_eq!(elements[at("Observation.value[x]")].get("min"), Some(&Json::Number("1".into())));
        let structure = crate::definitions::Structure::compile(&snapshot).unwrap();
        let coding = structure.index_of_path("Observation.code.coding").unwrap();
        let code = structure.index_of_path("Observation.code").unwrap();
        assert_eq!(structure.slices_of(code, coding).len(), 1);
    }

    #[test]
    fn differentials_without_ids_constrain_the_slice_they_follow() {
        let definitions = Definitions::base();
        let sd = profile(
            r#"[{"path":"Observation.component","slicing":{"discriminator":[{"type":"pattern","path":"code"}],"rules":"open"}},
               {"path":"Observation.component","sliceName":"a","min":1},
               {"path":"Observation.component.code","patternCodeableConcept":{"text":"a"}},
               {"path":"Observation.component","sliceName":"b"},
               {"path":"Observation.component.valueString","min":1},
               {"path":"Observation.status","fixedCode":"final"}]"#,
        );
        let snapshot = generate(&sd, &definitions).unwrap();
        let ids = ids(&snapshot);
        let elements = snapshot["snapshot"]["element"].as_array().unwrap();
        let at = |id: &str| ids.iter().position(|x| x == id).unwrap_or_else(|| panic!("{id} missing"));
        assert!(elements[at("Observation.component:a.code")].get("patternCodeableConcept").is_some());
        assert!(elements[at("Observation.component.code")].get("patternCodeableConcept").is_none());
        assert_eq!(elements[at("Observation.component:b.value[x]")].get("min"), Some(&Json::Number("1".into())));
        assert_eq!(elements[at("Observation.component.value[x]")].get("min"), Some(&Json::Number("0".into())));
        assert_eq!(elements[at("Observation.status")].get("fixedCode").and_then(Json::as_str), Some("final"));
    }

    #[test]
    fn a_slice_without_its_own_min_starts_from_the_base_min_not_the_sliced_elements() {
        let definitions = Definitions::base();
        let sd = profile(
            r#"[{"id":"Observation.category","path":"Observation.category","min":1,"slicing":{"discriminator":[{"type":"pattern","path":"$this"}],"rules":"open"}},
               {"id":"Observation.category:optional","path":"Observation.category","sliceName":"optional","patternCodeableConcept":{"text":"a"}},
               {"id":"Observation.category:required","path":"Observation.category","sliceName":"required","min":1,"patternCodeableConcept":{"text":"b"}}]"#,
        );
        let snapshot = generate(&sd, &definitions).unwrap();
        let ids = ids(&snapshot);
        let elements = snapshot["snapshot"]["element"].as_array().unwrap();
        let min = |id: &str| elements[ids.iter().position(|x| x == id).unwrap()].get("min").cloned();
        assert_eq!(min("Observation.category"), Some(Json::Number("1".into())), "the sliced element keeps its constraint");
        assert_eq!(min("Observation.category:optional"), Some(Json::Number("0".into())), "as HL7 publishes US Core's category slices");
        assert_eq!(min("Observation.category:required"), Some(Json::Number("1".into())));
    }

    #[test]
    fn differential_paths_must_name_their_elements() {
        let definitions = Definitions::base();
        assert!(generate(&profile(r#"[{"id":"Observation.valueQuantity","path":"Observation.valueBla"}]"#), &definitions).is_err());
        assert!(generate(&profile(r#"[{"path":"Observation.valueBla"}]"#), &definitions).is_err());
        assert!(generate(&profile(r#"[{"id":"Observation.valueQuantity","path":"Observation.valueQuantity"}]"#), &definitions).is_ok());
        let root_sliced = profile(r#"[{"id":"Observation","path":"Observation","slicing":{"rules":"open"}}]"#);
        assert!(generate(&root_sliced, &definitions).is_err());
    }

    #[test]
    fn choices_of_several_types_expand_to_their_common_children() {
        let definitions = Definitions::base();
        let sd = profile(r#"[{"path":"Observation.effective[x].extension","max":"1"}]"#);
        let snapshot = generate(&sd, &definitions).unwrap();
        let ids = ids(&snapshot);
        assert!(ids.iter().any(|i| i == "Observation.effective[x].extension"), "{ids:?}");
    }

    #[test]
    fn unknown_paths_are_errors_not_panics() {
        let definitions = Definitions::base();
        let sd = profile(r#"[{"id":"Observation.nonsense.deeper","path":"Observation.nonsense.deeper"}]"#);
        assert!(generate(&sd, &definitions).is_err());
    }
}
