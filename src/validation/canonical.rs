//! Rules for conformance resources that their element definitions cannot express: absolute canonical URLs, CodeSystem content and supplements, and ValueSet include systems.
//!
//! Canonical URLs identify definitions across servers and packages ([spec](https://hl7.org/fhir/R4/references.html#canonical)),
//! so a relative one identifies nothing; a code system is named by its canonical URL in
//! `ValueSet.compose.include.system` for the same reason. A supplement only adds designations and
//! properties to another code system ([spec](https://hl7.org/fhir/R4/codesystem.html#supplements)).

use crate::json::{Json, Object};
use crate::outcome::IssueCode;

use super::bundle::is_absolute;
use super::walk::Walker;

/// Checks a resource's own rules; the walker's path is the resource's.
pub(super) fn check(walker: &mut Walker<'_, '_>, resource_type: &str, resource: &Object, contained: bool) {
    if let Some(url) = resource.get("url").and_then(Json::as_str)
        && has_canonical_url(resource_type) && !is_absolute(url) && !url.starts_with('#')
    {
        let base_len = walker.path.len();
        walker.path.push_str(".url");
        let message = if contained {
            format!("the canonical URL '{url}' must be absolute, even in a contained resource")
        } else {
            format!("the canonical URL '{url}' must be absolute")
        };
        walker.error(IssueCode::Invalid, message);
        walker.path.truncate(base_len);
    }
    match resource_type {
        "CodeSystem" => code_system(walker, resource),
        "ValueSet" => value_set(walker, resource),
        "CapabilityStatement" => capability_statement(walker, resource),
        "SearchParameter" => search_parameter(walker, resource),
        "StructureDefinition" => structure_definition(walker, resource),
        _ => {}
    }
}

fn structure_definition(walker: &mut Walker<'_, '_>, resource: &Object) {
    let problem = walker.validator.definitions.snapshot_problem(&Json::Object(resource.clone()));
    if let Some(problem) = problem {
        walker.error(IssueCode::Invalid, format!("the snapshot cannot be generated from the differential: {problem}"));
    }
}

/// A search parameter a server declares with a `definition` has that definition's type.
fn capability_statement(walker: &mut Walker<'_, '_>, resource: &Object) {
    let base_len = walker.path.len();
    for (i, rest) in resource.get("rest").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        for (j, described) in rest.get("resource").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
            for (k, param) in described.get("searchParam").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
                let (Some(definition), Some(declared)) =
                    (param.get("definition").and_then(Json::as_str), param.get("type").and_then(Json::as_str))
                else {
                    continue;
                };
                let Some(defined) = walker.validator.definitions.resolve(definition) else { continue };
                if defined.get("resourceType").and_then(Json::as_str) != Some("SearchParameter") {
                    continue;
                }
                let Some(defined_type) = defined.get("type").and_then(Json::as_str) else { continue };
                if defined_type != declared {
                    walker.path.push_str(&format!(".rest[{i}].resource[{j}].searchParam[{k}]"));
                    walker.error(IssueCode::Invalid, format!("the type is {declared}, but the SearchParameter {definition} has the type {defined_type}"));
                    walker.path.truncate(base_len);
                }
            }
        }
    }
}

/// A search parameter derived from another applies to (some of) the same resource types.
fn search_parameter(walker: &mut Walker<'_, '_>, resource: &Object) {
    let Some(derived_from) = resource.get("derivedFrom").and_then(Json::as_str) else { return };
    let Some(parent) = walker.validator.definitions.resolve(derived_from) else { return };
    if parent.get("resourceType").and_then(Json::as_str) != Some("SearchParameter") {
        return;
    }
    let parent_bases: Vec<&str> = parent.get("base").and_then(Json::as_array).unwrap_or_default().iter().filter_map(Json::as_str).collect();
    for base in resource.get("base").and_then(Json::as_array).unwrap_or_default().iter().filter_map(Json::as_str) {
        if !parent_bases.contains(&base) && !parent_bases.contains(&"Resource") {
            walker.error(IssueCode::Invalid, format!("the base {base} is not a base of the SearchParameter this one is derived from ({derived_from})"));
        }
    }
}

/// Whether the resource type's `url` element is its canonical URL (R4 definitional resources).
fn has_canonical_url(resource_type: &str) -> bool {
    matches!(
        resource_type,
        "ActivityDefinition"
            | "CapabilityStatement"
            | "ChargeItemDefinition"
            | "CodeSystem"
            | "CompartmentDefinition"
            | "ConceptMap"
            | "EffectEvidenceSynthesis"
            | "EventDefinition"
            | "Evidence"
            | "EvidenceVariable"
            | "ExampleScenario"
            | "GraphDefinition"
            | "ImplementationGuide"
            | "Library"
            | "Measure"
            | "MessageDefinition"
            | "OperationDefinition"
            | "PlanDefinition"
            | "Questionnaire"
            | "ResearchDefinition"
            | "ResearchElementDefinition"
            | "RiskEvidenceSynthesis"
            | "SearchParameter"
            | "StructureDefinition"
            | "StructureMap"
            | "TerminologyCapabilities"
            | "TestScript"
            | "ValueSet"
    )
}

fn code_system(walker: &mut Walker<'_, '_>, resource: &Object) {
    let content = resource.get("content").and_then(Json::as_str);
    let base_len = walker.path.len();
    if resource.get("supplements").is_some() && content != Some("supplement") {
        walker.path.push_str(".content");
        walker.error(IssueCode::Invalid, "a CodeSystem that supplements another must have the content 'supplement'");
        walker.path.truncate(base_len);
    }
    if content == Some("not-present") && resource.get("concept").is_some() {
        walker.path.push_str(".concept[0]");
        walker.error(IssueCode::Invalid, "the CodeSystem says its content is not present, but it lists concepts");
        walker.path.truncate(base_len);
    }
}

fn value_set(walker: &mut Walker<'_, '_>, resource: &Object) {
    let Some(compose) = resource.get("compose") else { return };
    let base_len = walker.path.len();
    for part in ["include", "exclude"] {
        for (i, entry) in compose.get(part).and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
            let Some(system) = entry.get("system").and_then(Json::as_str) else { continue };
            if !is_absolute(system) {
                walker.path.push_str(&format!(".compose.{part}[{i}]"));
                walker.error(
                    IssueCode::Invalid,
                    format!("the system '{system}' must be an absolute URL (a contained CodeSystem is named by its canonical URL)"),
                );
                walker.path.truncate(base_len);
            }
        }
    }
}

/// `urn:ietf:rfc:3986` says the identifier's value is itself a URI, so it must be absolute.
pub(super) fn identifier(walker: &mut Walker<'_, '_>, identifier: &Object) {
    if identifier.get("system").and_then(Json::as_str) != Some("urn:ietf:rfc:3986") {
        return;
    }
    let Some(value) = identifier.get("value").and_then(Json::as_str) else { return };
    if !is_absolute(value) {
        walker.error(IssueCode::Invalid, format!("with the system urn:ietf:rfc:3986 the value must be an absolute URI, not '{value}'"));
    }
}
