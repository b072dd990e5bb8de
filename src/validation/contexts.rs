//! Where an extension may be used ([spec](https://hl7.org/fhir/R4/defining-extensions.html#context)): its `context` list (element paths and types, parent extensions, FHIRPath) and its `contextInvariant`s.
//!
//! An extension's meaning depends on what it is attached to, so its definition says where it may
//! appear. The element holding the extension (its type and its path from the resource) is
//! compared with each context; a FHIRPath context selects the elements it allows from the
//! resource, and a context invariant must hold on the holding element.

use crate::definitions::{CORE_SD_BASE, ContextKind, ExtensionContext, Structure};
use crate::fhirpath::{Context, Node};
use crate::json::Json;
use crate::outcome::{IssueCode, Severity};

use super::walk::Walker;

/// How many base types are followed when deciding whether a type is a kind of another.
const MAX_BASE_HOPS: usize = 12;

/// Checks that `extension` may be used where the walk is; the walker's path is the extension's.
pub(super) fn check(walker: &mut Walker<'_, '_>, extension: &Structure) {
    let Some(holder) = walker.holders.last() else { return };
    let (holder_node, holder_type) = (holder.node, holder.type_code.clone());
    // Nested recursive elements (`Questionnaire.item.item`) are the element they repeat.
    let here = match &holder.definition_path {
        Some(path) => path.trim_end_matches("[x]").to_string(),
        None => walker.element_path_for_context(),
    };
    if !extension.contexts.is_empty() && !extension.contexts.iter().any(|c| allows(walker, c, &here, holder_node, &holder_type)) {
        let allowed: Vec<String> = extension
            .contexts
            .iter()
            .map(|c| match c.kind {
                ContextKind::Element => c.expression.clone(),
                ContextKind::Extension => format!("extension {}", c.expression),
                ContextKind::FhirPath => format!("where {}", c.expression),
            })
            .collect();
        // HL7's core-namespace extensions have been republished (the extensions pack) with corrected
        // contexts since R4, so a mismatch with the R4 copy loaded here may not be one.
        let severity = if extension.url.starts_with(CORE_SD_BASE) { Severity::Warning } else { Severity::Error };
        walker.report(
            severity,
            IssueCode::BusinessRule,
            format!("the extension {} is not allowed on {here} ({holder_type}); it may be used on: {}", extension.url, allowed.join(", ")),
        );
    }
    for invariant in &extension.context_invariants {
        if evaluate_bool(walker, invariant, holder_node, &holder_type) == Some(false) {
            walker.error(IssueCode::BusinessRule, format!("the extension {} is not allowed here: its context invariant '{invariant}' is false", extension.url));
        }
    }
}

fn allows(walker: &Walker<'_, '_>, context: &ExtensionContext, here: &str, holder_node: &Json, holder_type: &str) -> bool {
    let expression = context.expression.as_str();
    match context.kind {
        ContextKind::Element => element_allows(walker, expression, here, holder_type),
        // Anywhere inside that extension (on it, its value or its nested extensions).
        ContextKind::Extension => {
            let _ = holder_node;
            let enclosing = &walker.extension_urls[..walker.extension_urls.len().saturating_sub(1)];
            enclosing.iter().any(|url| unversioned(url) == unversioned(expression))
        }
        // A context the engine cannot evaluate cannot prove the use wrong.
        ContextKind::FhirPath => selects(walker, expression, holder_node).unwrap_or(true),
    }
}

fn unversioned(url: &str) -> &str {
    url.split('|').next().unwrap_or(url)
}

fn element_allows(walker: &Walker<'_, '_>, expression: &str, here: &str, holder_type: &str) -> bool {
    let definitions = &walker.validator.definitions;
    match expression {
        "Element" | "Base" => return true,
        "Resource" | "DomainResource" => return definitions.is_resource_type(holder_type),
        _ => {}
    }
    if expression == here {
        return true;
    }
    // `Observation.value[x]` allows `Observation.valueQuantity`.
    if let Some(stem) = expression.strip_suffix("[x]") {
        if here.strip_prefix(stem).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()) && !rest.contains('.')) {
            return true;
        }
        if here == stem {
            return true;
        }
    }
    match expression.split_once('.') {
        // A type: the holder must be of that type or of one derived from it (`Age` is a `Quantity`).
        None => is_kind_of(walker, holder_type, expression),
        // A path inside a data type (`HumanName.family`): the holder is that element of some value of the type.
        Some((first, rest)) => !definitions.is_resource_type(first) && here.ends_with(rest) && here.as_bytes().get(here.len() - rest.len() - 1) == Some(&b'.'),
    }
}

fn is_kind_of(walker: &Walker<'_, '_>, type_name: &str, ancestor: &str) -> bool {
    let mut current = type_name.to_string();
    for _ in 0..MAX_BASE_HOPS {
        if current == ancestor {
            return true;
        }
        let Some(structure) = walker.validator.definitions.type_structure(&current) else { return false };
        let Some(base) = structure.base_definition.as_deref() else { return false };
        current = base.strip_prefix(CORE_SD_BASE).unwrap_or(base).to_string();
    }
    false
}

/// Whether a FHIRPath context, evaluated on the current resource, selects the holding element.
fn selects(walker: &Walker<'_, '_>, expression: &str, holder_node: &Json) -> Option<bool> {
    let resource = *walker.resources.last()?;
    let parsed = walker.invariants.compiled(expression)?;
    let context = Context::new(walker.invariants.types()).with_resource(Node::resource(resource));
    let results = parsed.evaluate(Node::resource(resource), &context).ok()?;
    Some(results.iter().any(|v| v.as_node().and_then(|n| n.json()).is_some_and(|j| std::ptr::eq(j, holder_node))))
}

fn evaluate_bool(walker: &Walker<'_, '_>, expression: &str, focus: &Json, focus_type: &str) -> Option<bool> {
    let parsed = walker.invariants.compiled(expression)?;
    let mut context = Context::new(walker.invariants.types());
    if let Some(resource) = walker.resources.last() {
        context = context.with_resource(Node::resource(resource));
    }
    parsed.evaluate_bool(Node::typed(focus, Some(focus_type)), &context).ok().flatten()
}
