//! FHIRPath invariants (`ElementDefinition.constraint`): base ones such as dom-3 and obs-6 and those profiles declare.
//!
//! ele-1 ("all elements must have a value or children") is enforced by the structural walk,
//! which already refuses empty objects, arrays and strings, so it is not evaluated again here.

use crate::definitions::ElementDefinition;
use crate::json::Json;
use crate::outcome::{IssueCode, Severity};

use super::walk::Walker;

/// Constraint keys the structural walk enforces itself.
const ENFORCED_BY_WALK: &[&str] = &["ele-1"];

pub(super) fn check<'a>(walker: &mut Walker<'_, 'a>, definition: &ElementDefinition, node: &'a Json, _type_code: &str) {
    for constraint in &definition.constraints {
        if ENFORCED_BY_WALK.contains(&constraint.key.as_str()) {
            continue;
        }
        if constraint.key == "ext-1" {
            let has_extensions = node.get("extension").is_some();
            let has_value = node.as_object().is_some_and(|o| o.iter().any(|(k, _)| k.starts_with("value")));
            if has_extensions == has_value {
                let severity = if constraint.is_error { Severity::Error } else { Severity::Warning };
                walker.report(severity, IssueCode::Invariant, format!("ext-1: {}", constraint.human));
            }
        }
    }
}
