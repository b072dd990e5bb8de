//! MeasureReport against its Measure ([spec](https://hl7.org/fhir/R4/measurereport.html)): groups and populations the Measure defines, scores its scoring allows, and subject lists only in subject-list reports.
//!
//! A report's numbers only mean something as results of the Measure it names, so a population the
//! Measure does not define, or a score for a cohort measure (which has none), cannot be read.

use crate::json::{Json, Object};
use crate::outcome::IssueCode;

use super::walk::Walker;

/// Checks a MeasureReport; the walker's path is the report's.
pub(super) fn check(walker: &mut Walker<'_, '_>, report: &Object) {
    let report_type = report.get("type").and_then(Json::as_str).unwrap_or_default();
    let measure = report.get("measure").and_then(Json::as_str).and_then(|url| walker.validator.definitions.resolve(url));
    let measure = measure.filter(|m| m.get("resourceType").and_then(Json::as_str) == Some("Measure"));
    let scoring: Vec<String> = measure.as_deref().map(|m| codes(m.get("scoring"))).unwrap_or_default();
    let measure_groups = measure.as_deref().and_then(|m| m.get("group")).and_then(Json::as_array).unwrap_or_default();
    let groups = report.get("group").and_then(Json::as_array).unwrap_or_default();
    let base_len = walker.path.len();
    for (i, group) in groups.iter().enumerate() {
        walker.path.push_str(&format!(".group[{i}]"));
        let group_len = walker.path.len();
        if scoring.iter().any(|s| s == "cohort") && group.get("measureScore").is_some() {
            walker.path.push_str(".measureScore");
            walker.error(IssueCode::BusinessRule, "the measure's scoring is 'cohort', so the report has no measure score");
            walker.path.truncate(group_len);
        }
        let defined = measure.as_ref().and_then(|_| matching_group(measure_groups, groups.len(), i, group));
        for (j, population) in group.get("population").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
            walker.path.push_str(&format!(".population[{j}]"));
            if let Some(defined) = defined {
                let allowed: Vec<String> =
                    defined.get("population").and_then(Json::as_array).unwrap_or_default().iter().flat_map(|p| codes(p.get("code"))).collect();
                let given = codes(population.get("code"));
                if !given.is_empty() && !given.iter().any(|c| allowed.contains(c)) {
                    walker.error(IssueCode::BusinessRule, format!("the population '{}' is not defined in this group of the measure", given.join(", ")));
                }
            }
            if population.get("subjectResults").is_some() && report_type != "subject-list" {
                walker.error(IssueCode::BusinessRule, format!("only subject-list reports list subjects, and this report is '{report_type}'"));
            }
            walker.path.truncate(group_len);
        }
        walker.path.truncate(base_len);
    }
}

/// The Measure group a report group reports on: the one with the same code, else the one at the same position.
fn matching_group<'m>(measure_groups: &'m [Json], n_report_groups: usize, index: usize, group: &Json) -> Option<&'m Json> {
    let wanted = codes(group.get("code"));
    if !wanted.is_empty()
        && let Some(found) = measure_groups.iter().find(|g| codes(g.get("code")).iter().any(|c| wanted.contains(c)))
    {
        return Some(found);
    }
    (measure_groups.len() == n_report_groups || measure_groups.len() == 1).then(|| measure_groups.get(index.min(measure_groups.len() - 1))).flatten()
}

/// The codes of a CodeableConcept.
fn codes(concept: Option<&Json>) -> Vec<String> {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.get("code").and_then(Json::as_str).map(str::to_string))
        .collect()
}
