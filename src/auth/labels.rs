//! Security labels as the gateway stores them: every spelling of a label normalised to one `system|code`, Part 2 recognised however it is marked, and an enclosing Bundle's labels kept on its entries.
//!
//! Senders mark 42 CFR Part 2 data in many ways: the v3 ActCode under its canonical URL, its OID or
//! its old FHIR URL, without a system, in `meta.tag` instead of `meta.security`, as restricted
//! confidentiality with a substance-use sensitivity (`R` + `ETH`), or only on the transaction
//! Bundle around them. The disclosure check must see one spelling, so labels are normalised
//! once, when a version is stored, and an implied Part 2 label is written into the resource.

use crate::json::{Json, Object};

/// The v3 ActCode system, canonical URL.
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// The v3 Confidentiality system, canonical URL.
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// The security label that marks a 42 CFR Part 2 record, as stored and compared.
pub const PART2_LABEL: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode|42CFRPart2";

/// Other spellings of the two systems: OIDs and the URLs FHIR used before terminology.hl7.org.
const ALIASES: &[(&str, &str)] = &[
    ("urn:oid:2.16.840.1.113883.5.4", ACT_CODE),
    ("http://hl7.org/fhir/v3/ActCode", ACT_CODE),
    ("http://terminology.hl7.org/CodeSystem/ActCode", ACT_CODE),
    ("urn:oid:2.16.840.1.113883.5.25", CONFIDENTIALITY),
    ("http://hl7.org/fhir/v3/Confidentiality", CONFIDENTIALITY),
];

/// ActCode sensitivity codes that mean substance-use information, which Part 2 protects.
const SUBSTANCE_USE: &[&str] = &["ETH", "SUD"];

/// One label's canonical `system|code`; a code without a system is read as ActCode or Confidentiality when it is one of theirs.
fn canonical(system: &str, code: &str) -> String {
    let system = ALIASES.iter().find(|(alias, _)| *alias == system).map_or(system, |(_, canonical)| canonical);
    let upper = code.to_ascii_uppercase();
    let system = match system {
        "" if upper == "42CFRPART2" || SUBSTANCE_USE.contains(&upper.as_str()) => ACT_CODE,
        "" if ["U", "L", "M", "N", "R", "V"].contains(&code) => CONFIDENTIALITY,
        other => other,
    };
    // Codes are case-sensitive in FHIR, but a mis-cased Part 2 code must still protect the record.
    let code = if system == ACT_CODE && (upper == "42CFRPART2" || SUBSTANCE_USE.contains(&upper.as_str())) {
        if upper == "42CFRPART2" { "42CFRPart2".to_string() } else { upper }
    } else {
        code.to_string()
    };
    format!("{system}|{code}")
}

/// The canonical system of a label coding (an alias or a missing system resolved as [`of`] does).
pub fn canonical_system(system: &str, code: &str) -> String {
    let label = canonical(system, code);
    label.rsplit_once('|').map_or(String::new(), |(s, _)| s.to_string())
}

/// The labels of a resource (`meta.security` and `meta.tag`), canonical, without duplicates.
pub fn of(resource: &Json) -> Vec<String> {
    let mut out = Vec::new();
    let meta = resource.get("meta");
    for member in ["security", "tag"] {
        for coding in meta.and_then(|m| m.get(member)).and_then(Json::as_array).unwrap_or_default() {
            let system = coding.get("system").and_then(Json::as_str).unwrap_or_default();
            if let Some(code) = coding.get("code").and_then(Json::as_str) {
                push(&mut out, canonical(system, code));
            }
        }
    }
    out
}

fn push(labels: &mut Vec<String>, label: String) {
    if !labels.contains(&label) {
        labels.push(label);
    }
}

/// The labels a Consent's `provision.securityLabel` coding stands for, canonical: `ETH` (substance
/// abuse information) and `SUD` (substance use disorder information) name the same data, so either covers both.
pub fn equivalents(system: &str, code: &str) -> Vec<String> {
    let label = canonical(system, code);
    match label.strip_prefix(ACT_CODE).and_then(|c| c.strip_prefix('|')) {
        Some(c) if SUBSTANCE_USE.contains(&c) => SUBSTANCE_USE.iter().map(|c| format!("{ACT_CODE}|{c}")).collect(),
        _ => vec![label],
    }
}

/// Whether labels mark 42 CFR Part 2 data: the Part 2 policy code, or a substance-use sensitivity.
pub fn is_part2(labels: &[String]) -> bool {
    labels.iter().any(|l| l == PART2_LABEL || SUBSTANCE_USE.iter().any(|c| l.strip_prefix(ACT_CODE).and_then(|r| r.strip_prefix('|')) == Some(c)))
}

/// Normalises the labels of a version about to be stored: adds `inherited` (an enclosing
/// Bundle's labels), and writes the canonical Part 2 label into `meta.security` when any
/// spelling implies it. Returns the labels to store.
pub fn normalise(resource: &mut Json, inherited: &[String]) -> Vec<String> {
    let mut labels = of(resource);
    for label in inherited {
        push(&mut labels, label.clone());
    }
    if is_part2(&labels) {
        push(&mut labels, PART2_LABEL.to_string());
    }
    // Inherited labels and the canonical Part 2 label are written into the resource, so whoever reads it sees them.
    let written = raw_security(resource);
    let to_add: Vec<&String> = labels.iter().filter(|l| (inherited.contains(l) || *l == PART2_LABEL) && !written.contains(l)).collect();
    if !to_add.is_empty()
        && let Some(object) = resource.as_object_mut()
    {
        let mut meta = match object.get("meta") {
            Some(Json::Object(m)) => m.clone(),
            _ => Object::new(),
        };
        let mut security = meta.get("security").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
        for label in to_add {
            let (system, code) = label.split_once('|').unwrap_or(("", label));
            let mut coding = Object::new();
            if !system.is_empty() {
                coding.insert("system", Json::string(system));
            }
            coding.insert("code", Json::string(code));
            security.push(Json::Object(coding));
        }
        meta.insert("security", Json::Array(security));
        object.insert("meta", Json::Object(meta));
    }
    labels
}

/// `meta.security` as written, `system|code`, without normalising.
fn raw_security(resource: &Json) -> Vec<String> {
    let codings = resource.get("meta").and_then(|m| m.get("security")).and_then(Json::as_array).unwrap_or_default();
    codings
        .iter()
        .filter_map(|c| Some(format!("{}|{}", c.get("system").and_then(Json::as_str).unwrap_or_default(), c.get("code").and_then(Json::as_str)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(meta: &str) -> Json {
        crate::json::parse(format!(r#"{{"resourceType":"Observation","meta":{meta},"status":"final"}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn every_spelling_of_part2_is_recognised_and_written_canonically() {
        for meta in [
            r#"{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"42CFRPart2"}]}"#,
            r#"{"security":[{"system":"urn:oid:2.16.840.1.113883.5.4","code":"42CFRPart2"}]}"#,
            r#"{"security":[{"system":"http://hl7.org/fhir/v3/ActCode","code":"42CFRPart2"}]}"#,
            r#"{"security":[{"code":"42CFRPart2"}]}"#,
            r#"{"tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"42CFRPart2"}]}"#,
            r#"{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"},{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"ETH"}]}"#,
            r#"{"security":[{"code":"42cfrpart2"}]}"#,
        ] {
            let mut resource = labelled(meta);
            let labels = normalise(&mut resource, &[]);
            assert!(labels.contains(&PART2_LABEL.to_string()), "{meta}: {labels:?}");
            assert!(raw_security(&resource).contains(&PART2_LABEL.to_string()), "{meta}: written into meta.security");
        }
    }

    #[test]
    fn other_labels_pass_unchanged_and_nothing_is_added_without_cause() {
        let mut resource = labelled(r#"{"security":[{"system":"urn:oid:2.16.840.1.113883.5.25","code":"N"}]}"#);
        let before = resource.to_string_compact();
        assert_eq!(normalise(&mut resource, &[]), [format!("{CONFIDENTIALITY}|N")]);
        assert_eq!(resource.to_string_compact(), before);
    }

    #[test]
    fn a_bundles_labels_reach_its_entries() {
        let bundle = crate::json::parse(br#"{"resourceType":"Bundle","meta":{"security":[{"system":"urn:oid:2.16.840.1.113883.5.4","code":"42CFRPart2"}]},"type":"transaction"}"#).unwrap();
        let mut entry = labelled("{}");
        let labels = normalise(&mut entry, &of(&bundle));
        assert_eq!(labels, [PART2_LABEL]);
        assert_eq!(raw_security(&entry), [PART2_LABEL]);
    }
}
