//! Slicing ([spec](https://hl7.org/fhir/R4/profiling.html#slicing)): assigns the values of a sliced element to slices by their discriminators, then checks slice cardinality, closed rules and order.

use std::sync::Arc;

use crate::definitions::{Discriminator, Structure, SlicingRules};
use crate::json::Json;
use crate::outcome::IssueCode;

use super::walk::{Walker, matches_pattern};

pub(super) fn check<'a>(walker: &mut Walker<'_, 'a>, structure: &Arc<Structure>, parent: usize, sliced: usize, name: &str, items: &[&'a Json]) {
    let Some(slicing) = structure.elements[sliced].slicing.clone() else { return };
    let slices = structure.slices_of(parent, sliced);
    if slices.is_empty() {
        return;
    }
    let mut counts = vec![0usize; slices.len()];
    let base_len = walker.path.len();
    let is_array = items.len() > 1 || structure.elements[sliced].base_max_is_many;
    let mut last_slice = 0;
    // A sliced choice element (`serviced[x]`) names the type of its value in the JSON member name
    // (`servicedPeriod`), which is what a `type` discriminator on `$this` compares.
    let sliced_definition = &structure.elements[sliced];
    let choice_suffix = if sliced_definition.is_choice() { name.strip_prefix(sliced_definition.name.as_str()).filter(|s| !s.is_empty()) } else { None };
    for (i, item) in items.iter().enumerate() {
        walker.path.push('.');
        walker.path.push_str(name);
        if is_array {
            use std::fmt::Write;
            let _ = write!(walker.path, "[{i}]");
        }
        let matched = slices.iter().position(|&slice| matches_slice(walker, structure, slice, &slicing.discriminators, item, choice_suffix));
        match matched {
            Some(k) => {
                counts[k] += 1;
                if slicing.ordered && k < last_slice {
                    walker.error(IssueCode::Structure, format!("this value is out of order: slice '{}' must come earlier", slice_name(structure, slices[k])));
                }
                last_slice = k;
                let type_code = item_type(structure, slices[k], item);
                walker.value(structure, slices[k], &type_code, item);
            }
            None => {
                if slicing.rules == SlicingRules::Closed {
                    walker.error(IssueCode::Structure, format!("this value matches none of the slices of '{name}', and the slicing is closed"));
                } else if slicing.rules == SlicingRules::OpenAtEnd && counts.iter().any(|&c| c > 0) && i + 1 < items.len() {
                    // Unmatched values must come after all slices: checked when a later value matches a slice.
                }
            }
        }
        walker.path.truncate(base_len);
    }
    for (k, &slice) in slices.iter().enumerate() {
        let definition = &structure.elements[slice];
        let count = counts[k];
        if (count as u64) < u64::from(definition.min) {
            walker.error(
                IssueCode::Required,
                format!("slice '{}' of '{name}' requires at least {} value(s) but found {count}", slice_name(structure, slice), definition.min),
            );
        }
        if let Some(max) = definition.max
            && count as u64 > u64::from(max)
        {
            walker.error(
                IssueCode::Structure,
                format!("slice '{}' of '{name}' allows at most {max} value(s) but found {count}", slice_name(structure, slice)),
            );
        }
    }
}

fn slice_name(structure: &Structure, slice: usize) -> &str {
    structure.elements[slice].slice_name.as_deref().unwrap_or("?")
}

fn item_type(structure: &Structure, slice: usize, item: &Json) -> String {
    let definition = &structure.elements[slice];
    if let Some(t) = definition.single_type() {
        return t.to_string();
    }
    item.get("resourceType").and_then(Json::as_str).map(str::to_string).unwrap_or_else(|| {
        definition.types.first().map(|t| t.code.clone()).unwrap_or_default()
    })
}

fn matches_slice(walker: &Walker<'_, '_>, structure: &Structure, slice: usize, discriminators: &[Discriminator], item: &Json, choice_suffix: Option<&str>) -> bool {
    discriminators.iter().all(|d| matches_discriminator(walker, structure, slice, d, item, choice_suffix))
}

/// `choice_suffix`: the type suffix of the JSON member holding `item`, when the sliced element is a choice.
fn matches_discriminator(walker: &Walker<'_, '_>, structure: &Structure, slice: usize, discriminator: &Discriminator, item: &Json, choice_suffix: Option<&str>) -> bool {
    let actual = navigate(item, &discriminator.path);
    let target = find_descendant(structure, slice, &discriminator.path);
    match discriminator.kind.as_str() {
        "value" | "pattern" => {
            let expected = target.and_then(|t| {
                let e = &structure.elements[t];
                e.fixed.clone().or_else(|| e.pattern.clone())
            });
            let expected = expected.or_else(|| fixed_from_type_profile(walker, structure, slice, &discriminator.path));
            match expected {
                Some(expected) => actual.iter().any(|a| matches_pattern(a, &expected)),
                // A prohibited element (max 0) tells the slice apart by its absence.
                None if target.is_some_and(|t| structure.elements[t].max == Some(0)) => actual.is_empty(),
                // Nothing to compare against: the slice cannot be told apart by this discriminator.
                None => false,
            }
        }
        "exists" => match target {
            Some(t) => {
                let e = &structure.elements[t];
                if e.max == Some(0) { actual.is_empty() } else if e.min > 0 { !actual.is_empty() } else { true }
            }
            None => false,
        },
        "type" => {
            let types: Vec<&str> = match target {
                Some(t) => structure.elements[t].types.iter().map(|t| t.code.as_str()).collect(),
                None => Vec::new(),
            };
            actual_types(item, &discriminator.path).iter().any(|(value, suffix)| {
                if let Some(resource_type) = value.get("resourceType").and_then(Json::as_str) {
                    return types.contains(&resource_type);
                }
                let suffix = suffix.or(if discriminator.path == "$this" { choice_suffix } else { None });
                match suffix {
                    // `contentAttachment`: the JSON name says the type of a choice element.
                    Some(suffix) => types.iter().any(|t| crate::definitions::type_suffix(t) == *suffix),
                    None => types.len() == 1,
                }
            })
        }
        "profile" => {
            let profiles: Vec<String> = match target {
                Some(t) => structure.elements[t]
                    .types
                    .iter()
                    .flat_map(|t| t.profiles.iter().chain(t.target_profiles.iter()))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            actual.iter().any(|a| profiles.iter().any(|p| walker.validator.conforms_to(a, p)))
        }
        _ => false,
    }
}

/// For an extension slice, the discriminator `url` is fixed in the extension's own definition.
fn fixed_from_type_profile(walker: &Walker<'_, '_>, structure: &Structure, slice: usize, path: &str) -> Option<Json> {
    let definition = &structure.elements[slice];
    let profile = definition.types.iter().flat_map(|t| t.profiles.iter()).next()?;
    if path == "url" {
        return Some(Json::string(profile.split('|').next().unwrap_or(profile)));
    }
    let profile = walker.validator.definitions.structure(profile)?;
    let target = find_descendant(&profile, 0, path)?;
    let e = &profile.elements[target];
    e.fixed.clone().or_else(|| e.pattern.clone())
}

/// The element at a discriminator path below `start` (`$this`, `system`, `coding.code`, `value.ofType(Quantity)` ...).
fn find_descendant(structure: &Structure, start: usize, path: &str) -> Option<usize> {
    let mut current = start;
    for segment in split_path(path) {
        if segment == "$this" || segment.starts_with("ofType(") || segment.starts_with("resolve(") {
            continue;
        }
        let name = segment.split('(').next().unwrap_or(segment);
        let name = if name == "extension" { "extension" } else { name };
        current = structure.children(current).iter().copied().find(|&c| {
            let e = &structure.elements[c];
            e.name == name && (e.slice_name.is_none() || !segment.contains('('))
        })?;
        if let Some(url) = segment.strip_prefix("extension('").and_then(|s| s.strip_suffix("')")) {
            // `extension('url')` selects the extension slice whose profile is that url.
            let sliced = current;
            let parent = structure.children(start).contains(&sliced).then_some(start);
            let _ = parent;
            if let Some(slice) = structure
                .children_with_path(&structure.elements[sliced].path)
                .into_iter()
                .find(|&c| structure.elements[c].types.iter().any(|t| t.profiles.iter().any(|p| p == url)))
            {
                current = slice;
            }
        }
    }
    Some(current)
}

fn split_path(path: &str) -> Vec<&str> {
    // Dots inside `extension('http://...')` arguments do not separate segments.
    let mut segments = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in path.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '.' if depth == 0 => {
                segments.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&path[start..]);
    segments
}

/// The values at a discriminator path, each with the type suffix of its JSON name when the last step is a choice (`contentString`).
fn actual_types<'a>(item: &'a Json, path: &'a str) -> Vec<(&'a Json, Option<&'a str>)> {
    let (parent_path, last) = match path.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, path),
    };
    if last == "$this" || last.contains('(') {
        return navigate(item, path).into_iter().map(|v| (v, None)).collect();
    }
    let parents = match parent_path {
        Some(p) => navigate(item, p),
        None => vec![item],
    };
    let mut out = Vec::new();
    for parent in parents {
        let Some(object) = parent.as_object() else { continue };
        for (key, value) in object.iter() {
            let suffix = if key == last {
                None
            } else {
                match key.strip_prefix(last) {
                    Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) => Some(rest),
                    _ => continue,
                }
            };
            match value {
                Json::Array(items) => out.extend(items.iter().map(|v| (v, suffix))),
                v => out.push((v, suffix)),
            }
        }
    }
    out
}

/// The values at a discriminator path in a JSON value.
fn navigate<'a>(item: &'a Json, path: &str) -> Vec<&'a Json> {
    let mut current = vec![item];
    for segment in split_path(path) {
        if segment == "$this" || segment.starts_with("ofType(") {
            continue;
        }
        if segment.starts_with("resolve(") {
            return Vec::new();
        }
        let mut next = Vec::new();
        if let Some(url) = segment.strip_prefix("extension('").and_then(|s| s.strip_suffix("')")) {
            for c in &current {
                for e in c.get("extension").and_then(Json::as_array).unwrap_or_default() {
                    if e.get("url").and_then(Json::as_str) == Some(url) {
                        next.push(e);
                    }
                }
            }
        } else {
            for c in &current {
                let Some(object) = c.as_object() else { continue };
                let found = object.get(segment).or_else(|| {
                    object.iter().find(|(k, _)| k.strip_prefix(segment).is_some_and(|rest| rest.starts_with(|ch: char| ch.is_ascii_uppercase()))).map(|(_, v)| v)
                });
                match found {
                    Some(Json::Array(items)) => next.extend(items.iter()),
                    Some(v) => next.push(v),
                    None => {}
                }
            }
        }
        current = next;
    }
    current
}
