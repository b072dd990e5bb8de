//! The DS4P label rule set (`labels/part2.toml` compiled in, or the file `[mappings] labels` names) and its pure application: which resources are 42 CFR Part 2 data and the labels they carry.
//!
//! Rules are data so a program can extend them without a new build. Evaluation is in memory over
//! the resource being stored; the one fact it cannot see, "this client is or was enrolled in a
//! substance-use program", is asked of the caller (the write path keeps it in the store and a cache).

use serde::Deserialize;

use super::labels::{self, ACT_CODE, CONFIDENTIALITY};
use crate::json::{Json, Object};

/// The rule file compiled into the binary.
const BUNDLED: &str = include_str!("../../labels/part2.toml");

/// The refrain every disclosed Part 2 resource carries: no re-disclosure without consent (v3-ActCode).
pub const REFRAIN: &str = "NORDSCLCD";

/// The notice 42 CFR § 2.32 requires with each disclosure made with the patient's consent.
pub const NOTICE: &str = "This record which has been disclosed to you is protected by federal confidentiality rules (42 CFR part 2). \
These rules prohibit you from using or disclosing this record, or testimony that describes the information contained in this record, \
in any civil, criminal, administrative, or legislative proceedings by any Federal, State, or local authority, against the patient, \
unless authorized by the consent of the patient, except as provided at 42 CFR 2.12(c)(5) or as authorized by a court in accordance \
with 42 CFR 2.64 or 2.65. In addition, the Federal rules prohibit you from making any other use or disclosure of this record unless \
at least one of the following applies: (1) further use or disclosure is expressly permitted by the written consent of the individual \
whose information is being disclosed in this record or as otherwise permitted by 42 CFR part 2; (2) you are a covered entity or \
business associate and have received the record for treatment, payment, or health care operations; or (3) you have received the \
record from a covered entity or business associate as permitted by 45 CFR part 164, subparts A and E. A general authorization for \
the release of medical or other information is NOT sufficient to meet the required elements of written consent to further use or \
redisclose the record (see 42 CFR 2.31).";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Coding {
    system: String,
    code: String,
}

/// Codings that mark a resource (`[[code]]`) or an enrollment (`[[enrollment]]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeRule {
    name: String,
    system: String,
    #[serde(default)]
    codes: Vec<String>,
    #[serde(default)]
    prefixes: Vec<String>,
}

impl CodeRule {
    fn matches(&self, system: &str, code: &str) -> bool {
        system == self.system && (self.codes.iter().any(|c| c == code) || self.prefixes.iter().any(|p| code.starts_with(p.as_str())))
    }
}

/// The label rule set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRules {
    policy: Coding,
    confidentiality: Coding,
    sensitivity: Coding,
    #[serde(default)]
    code: Vec<CodeRule>,
    #[serde(default)]
    enrollment: Vec<CodeRule>,
}

impl LabelRules {
    /// The rules compiled into the binary.
    pub fn bundled() -> LabelRules {
        LabelRules::parse(BUNDLED).expect("labels/part2.toml is checked by the tests")
    }

    /// Reads a rule file; the error names what is wrong and where (TOML line).
    pub fn parse(text: &str) -> Result<LabelRules, String> {
        let rules: LabelRules = toml::from_str(text).map_err(|e| e.to_string())?;
        for (n, rule) in rules.code.iter().chain(rules.enrollment.iter()).enumerate() {
            if rule.codes.is_empty() && rule.prefixes.is_empty() {
                return Err(format!("rule {} ('{}') names neither codes nor prefixes", n + 1, rule.name));
            }
        }
        Ok(rules)
    }

    /// The rules from a file, or the bundled ones.
    pub fn load(path: Option<&std::path::Path>) -> Result<LabelRules, String> {
        match path {
            None => Ok(LabelRules::bundled()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                LabelRules::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }

    /// The name of the first `[[code]]` rule a Coding anywhere in the resource matches.
    pub fn code_match(&self, resource: &Json) -> Option<&str> {
        let mut found = None;
        walk_codings(resource, &mut |system, code| {
            if found.is_none() {
                found = self.code.iter().find(|r| r.matches(system, code)).map(|r| r.name.as_str());
            }
        });
        found
    }

    /// The patients an enrollment (an EpisodeOfCare whose `type` an `[[enrollment]]` rule names) enrolls in a substance-use program.
    pub fn enrolls(&self, resource_type: &str, resource: &Json) -> Vec<String> {
        if resource_type != "EpisodeOfCare" {
            return Vec::new();
        }
        let mut program = false;
        for concept in resource.get("type").and_then(Json::as_array).unwrap_or_default() {
            walk_codings(concept, &mut |system, code| program |= self.enrollment.iter().any(|r| r.matches(system, code)));
        }
        let patient = resource.get("patient").and_then(|p| p.get("reference")).and_then(Json::as_str).and_then(|r| resolve(r, "Patient"));
        match (program, patient) {
            (true, Some(patient)) => vec![patient],
            _ => Vec::new(),
        }
    }

    /// Whether a resource is Part 2 data by its own content: a sender's label (on it, on its
    /// enclosing Bundle, or on a Bundle's entries: the high-water mark) or a `[[code]]` rule.
    pub fn is_part2(&self, resource: &Json, inherited: &[String]) -> bool {
        labels::is_part2(&labels::of(resource)) || labels::is_part2(inherited) || self.code_match(resource).is_some() || {
            let entries = resource.get("entry").and_then(Json::as_array).unwrap_or_default();
            entries.iter().filter_map(|e| e.get("resource")).any(|r| labels::is_part2(&labels::of(r)))
        }
    }

    /// Writes the Part 2 labels into `meta.security`: the policy, the confidentiality (replacing a
    /// lower one), and the sensitivity unless a substance-use one is there.
    pub fn label(&self, resource: &mut Json) {
        let present = labels::of(resource);
        let has = |system: &str, code: &str| present.iter().any(|l| *l == format!("{system}|{code}"));
        let Some(object) = resource.as_object_mut() else { return };
        let mut meta = match object.get("meta") {
            Some(Json::Object(m)) => m.clone(),
            _ => Object::new(),
        };
        let mut security = meta.get("security").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
        let very_restricted = has(CONFIDENTIALITY, "V");
        if !very_restricted {
            // One confidentiality code (DS4P: 1..1), the highest: lower ones give way to the rule's.
            security.retain(|c| {
                let system = c.get("system").and_then(Json::as_str).unwrap_or_default();
                let code = c.get("code").and_then(Json::as_str).unwrap_or_default();
                !(labels::canonical_system(system, code) == CONFIDENTIALITY && code != self.confidentiality.code)
            });
        }
        let add = |coding: &Coding, security: &mut Vec<Json>| {
            let written = security.iter().any(|c| {
                let system = c.get("system").and_then(Json::as_str).unwrap_or_default();
                let code = c.get("code").and_then(Json::as_str).unwrap_or_default();
                labels::canonical_system(system, code) == coding.system && code == coding.code
            });
            if !written {
                let mut c = Object::new();
                c.insert("system", Json::string(coding.system.as_str()));
                c.insert("code", Json::string(coding.code.as_str()));
                security.push(Json::Object(c));
            }
        };
        add(&self.policy, &mut security);
        if !very_restricted {
            add(&self.confidentiality, &mut security);
        }
        if !(has(ACT_CODE, "SUD") || has(ACT_CODE, "ETH")) {
            add(&self.sensitivity, &mut security);
        }
        meta.insert("security", Json::Array(security));
        object.insert("meta", Json::Object(meta));
    }
}

/// `Type/id` of a reference that names a resource of `resource_type`: relative, or the `urn:uuid:`
/// fullUrl the mappings give a resource whose id is that uuid (intake stores the mapped references as they are).
pub fn resolve(reference: &str, resource_type: &str) -> Option<String> {
    match reference.strip_prefix("urn:uuid:") {
        Some(uuid) => Some(format!("{resource_type}/{uuid}")),
        None => reference.strip_prefix(resource_type).filter(|rest| rest.starts_with('/')).map(|_| reference.to_string()),
    }
}

/// DS4P's `display` extension (on `Resource.meta`): a mark the receiver must show, as text.
pub const DISPLAY_EXTENSION: &str = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-display";

/// Puts the § 2.32 notice on a disclosed document the DS4P way, once: as the text of the `display`
/// extension on its `meta`, which the receiver renders with the content. DS4P pairs it with the
/// privacy mark `RedisclosureProhibitionMark`, but R4's v3-ActCode (what receivers validate
/// against) does not have that code, so the refrain `NORDSCLCD` stays the coded part.
pub fn add_notice(resource: &mut Json) {
    let Some(object) = resource.as_object_mut() else { return };
    let mut meta = match object.get("meta") {
        Some(Json::Object(m)) => m.clone(),
        _ => Object::new(),
    };
    let mut extensions = meta.get("extension").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
    if extensions.iter().any(|e| e.get("url").and_then(Json::as_str) == Some(DISPLAY_EXTENSION)) {
        return;
    }
    let mut annotation = Object::new();
    annotation.insert("text", Json::string(NOTICE));
    let mut display = Object::new();
    display.insert("url", Json::string(DISPLAY_EXTENSION));
    display.insert("valueAnnotation", Json::Object(annotation));
    extensions.push(Json::Object(display));
    meta.insert("extension", Json::Array(extensions));
    object.insert("meta", Json::Object(meta));
}

/// Adds the refrain (`NORDSCLCD`) to a disclosed resource's `meta.security`, once.
pub fn add_refrain(resource: &mut Json) {
    let Some(object) = resource.as_object_mut() else { return };
    let mut meta = match object.get("meta") {
        Some(Json::Object(m)) => m.clone(),
        _ => Object::new(),
    };
    let mut security = meta.get("security").and_then(Json::as_array).map(<[Json]>::to_vec).unwrap_or_default();
    if security.iter().any(|c| c.get("code").and_then(Json::as_str) == Some(REFRAIN)) {
        return;
    }
    let mut c = Object::new();
    c.insert("system", Json::string(ACT_CODE));
    c.insert("code", Json::string(REFRAIN));
    security.push(Json::Object(c));
    meta.insert("security", Json::Array(security));
    object.insert("meta", Json::Object(meta));
}

/// Adds the refrain to a resource disclosed whole and, when it is a Bundle (a document), to every
/// resource it holds: each is read on its own once received. (A message whose entries are decided
/// one by one marks only itself with [`add_refrain`].)
pub fn add_refrain_whole(resource: &mut Json) {
    add_refrain(resource);
    if let Some(Json::Array(entries)) = resource.as_object_mut().and_then(|o| o.get_mut("entry")) {
        for entry in entries.iter_mut() {
            if let Some(inner) = entry.as_object_mut().and_then(|e| e.get_mut("resource")) {
                add_refrain_whole(inner);
            }
        }
    }
}

/// Calls `each(system, code)` for every Coding-shaped object in the tree.
fn walk_codings(value: &Json, each: &mut impl FnMut(&str, &str)) {
    match value {
        Json::Object(o) => {
            if let (Some(system), Some(code)) = (o.get("system").and_then(Json::as_str), o.get("code").and_then(Json::as_str)) {
                each(system, code);
            }
            for (_, v) in o.iter() {
                walk_codings(v, each);
            }
        }
        Json::Array(items) => items.iter().for_each(|v| walk_codings(v, each)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::labels::PART2_LABEL;

    fn parse(text: &str) -> Json {
        crate::json::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_bundled_rules_load_and_a_bad_file_is_refused_with_its_place() {
        let rules = LabelRules::bundled();
        assert_eq!(rules.code.len(), 2);
        let err = LabelRules::parse("policy = 1").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        let empty = BUNDLED.replace(r#"codes = ["H0015"]"#, "");
        assert!(LabelRules::parse(&empty).unwrap_err().contains("substance-use IOP"));
    }

    #[test]
    fn sud_diagnoses_and_drug_screens_match_other_codes_do_not() {
        let rules = LabelRules::bundled();
        let condition = parse(r#"{"resourceType":"Condition","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"F10.20"}]}}"#);
        assert_eq!(rules.code_match(&condition), Some("substance-use diagnosis"));
        let claim = parse(r#"{"resourceType":"Claim","diagnosis":[{"diagnosisCodeableConcept":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"F11.20"}]}}]}"#);
        assert!(rules.is_part2(&claim, &[]), "a diagnosis anywhere in the resource");
        let depression = parse(r#"{"resourceType":"Condition","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"F32.2"}]}}"#);
        assert!(!rules.is_part2(&depression, &[]));
        let screen = parse(r#"{"resourceType":"DiagnosticReport","code":{"coding":[{"system":"http://loinc.org","code":"65750-2"}]}}"#);
        assert!(rules.is_part2(&screen, &[]));
        let bundle = parse(r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","meta":{"security":[{"code":"42CFRPart2"}]}}}]}"#);
        assert!(rules.is_part2(&bundle, &[]), "a Bundle carries the high-water mark of its entries");
        assert!(rules.is_part2(&depression, &[PART2_LABEL.to_string()]), "an enclosing Bundle's label");
    }

    #[test]
    fn the_notice_goes_on_a_disclosed_document_once_as_ds4p_marks_it() {
        let mut bundle = parse(r#"{"resourceType":"Bundle","meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"NORDSCLCD"}]},"type":"message"}"#);
        add_notice(&mut bundle);
        add_notice(&mut bundle);
        let meta = bundle.get("meta").unwrap();
        assert_eq!(meta.get("security").and_then(Json::as_array).map(<[Json]>::len), Some(1), "the refrain stays as it was");
        let extensions = meta.get("extension").and_then(Json::as_array).unwrap();
        assert_eq!(extensions.len(), 1);
        assert_eq!(extensions[0].get("url").and_then(Json::as_str), Some(DISPLAY_EXTENSION));
        assert_eq!(extensions[0].get("valueAnnotation").and_then(|a| a.get("text")).and_then(Json::as_str), Some(NOTICE));
    }

    #[test]
    fn enrollment_in_a_substance_use_program_names_its_patient() {
        let rules = LabelRules::bundled();
        let sud = parse(r#"{"resourceType":"EpisodeOfCare","type":[{"coding":[{"system":"http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets","code":"H0015"}]}],"patient":{"reference":"Patient/p1"}}"#);
        assert_eq!(rules.enrolls("EpisodeOfCare", &sud), ["Patient/p1"]);
        let mh = parse(r#"{"resourceType":"EpisodeOfCare","type":[{"coding":[{"system":"http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets","code":"S9480"}]}],"patient":{"reference":"Patient/p1"}}"#);
        assert!(rules.enrolls("EpisodeOfCare", &mh).is_empty());
        let mapped = parse(r#"{"resourceType":"EpisodeOfCare","type":[{"coding":[{"system":"http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets","code":"H0015"}]}],"patient":{"reference":"urn:uuid:9c5f3b6c-0c8d-8b17-b96e-2a6f13cde831"}}"#);
        assert_eq!(rules.enrolls("EpisodeOfCare", &mapped), ["Patient/9c5f3b6c-0c8d-8b17-b96e-2a6f13cde831"], "intake keeps the mapped urn:uuid references");
        assert_eq!(resolve("Organization/x", "Patient"), None);
    }

    #[test]
    fn labelling_raises_confidentiality_and_adds_policy_and_sensitivity_once() {
        let rules = LabelRules::bundled();
        let mut resource = parse(r#"{"resourceType":"Observation","meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"N"}]}}"#);
        rules.label(&mut resource);
        rules.label(&mut resource);
        assert_eq!(
            labels::of(&resource),
            [PART2_LABEL.to_string(), format!("{CONFIDENTIALITY}|R"), format!("{ACT_CODE}|SUD")],
            "{}",
            resource.to_string_compact()
        );
        let mut eth = parse(r#"{"resourceType":"Observation","meta":{"security":[{"code":"ETH"},{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"V"}]}}"#);
        rules.label(&mut eth);
        assert_eq!(labels::of(&eth), [format!("{ACT_CODE}|ETH"), format!("{CONFIDENTIALITY}|V"), PART2_LABEL.to_string()]);
        add_refrain(&mut eth);
        add_refrain(&mut eth);
        assert_eq!(labels::of(&eth).iter().filter(|l| l.ends_with(REFRAIN)).count(), 1);
    }
}
