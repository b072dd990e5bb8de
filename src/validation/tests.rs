//! Unit tests of the validator on small hand-written resources, one rule each.

use std::sync::Arc;

use super::*;
use crate::definitions::Definitions;
use crate::json;

fn validator() -> Validator {
    Validator::new(Definitions::base())
}

/// Validates `text` and returns its errors as `expression: message` lines.
fn errors(text: &str) -> Vec<String> {
    let report = validator().validate_bytes(text.as_bytes(), &[]);
    report.issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect()
}

fn assert_error(text: &str, expression: &str, fragment: &str) {
    let found = errors(text);
    assert!(
        found.iter().any(|e| e.starts_with(&format!("{expression}: ")) && e.contains(fragment)),
        "expected an error at {expression} containing {fragment:?}, got {found:#?}"
    );
}

#[test]
fn a_valid_patient_has_no_errors() {
    let patient = r#"{"resourceType":"Patient","id":"p1","active":true,"name":[{"family":"Everywoman","given":["Eve"]}],
        "gender":"female","birthDate":"1974-12-25","_birthDate":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/patient-birthTime","valueDateTime":"1974-12-25T14:35:45-05:00"}]},
        "contact":[{"name":{"family":"Adam"}}]}"#;
    assert_eq!(errors(patient), Vec::<String>::new());
}

#[test]
fn structure_errors_are_located() {
    assert_error(r#"{"resourceType":"Patient","nickname":"x"}"#, "Patient.nickname", "unrecognized element");
    assert_error(r#"{"resourceType":"Patient","name":{"family":"x"}}"#, "Patient.name", "must be a JSON array");
    assert_error(r#"{"resourceType":"Patient","active":[true]}"#, "Patient.active", "must not be an array");
    assert_error(r#"{"resourceType":"Patient","active":null}"#, "Patient.active", "null is not allowed");
    assert_error(r#"{"resourceType":"Patient","name":[]}"#, "Patient.name", "must not be empty");
    assert_error(r#"{"resourceType":"Patient","name":[{}]}"#, "Patient.name[0]", "must have content");
    assert_error(r#"{"resourceType":"Patient","name":[{"given":[""]}]}"#, "Patient.name[0].given[0]", "empty");
    assert_error(r#"{"resourceType":"Patient","active":"yes"}"#, "Patient.active", "boolean");
    assert_error(r#"{"resourceType":"Patient","birthDate":"1974-13-45"}"#, "Patient.birthDate", "not a valid date");
    assert_error(r#"{"resourceType":"Patien"}"#, "Patien", "not a FHIR R4 resource type");
    assert_error(r#"{"resourceType":"Patient","active":true,"active":false}"#, "Patient", "duplicate property 'active'");
}

#[test]
fn choices_cardinality_and_bindings() {
    assert_error(
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueString":"a","valueInteger":1}"#,
        "Observation.valueInteger",
        "only one of",
    );
    assert_error(r#"{"resourceType":"Observation","code":{"text":"x"}}"#, "Observation", "'status' is required");
    assert_error(r#"{"resourceType":"Observation","status":"done","code":{"text":"x"}}"#, "Observation.status", "not in the required ValueSet");
    assert_error(r#"{"resourceType":"Patient","gender":"robot"}"#, "Patient.gender", "not in the required ValueSet");
    assert_error(r#"{"resourceType":"Patient","id":"bad id!"}"#, "Patient.id", "not a valid id");
}

#[test]
fn bundles_validate_their_entries_and_references() {
    let bundle = r##"{"resourceType":"Bundle","type":"collection","entry":[
        {"fullUrl":"urn:uuid:a76d9bbf-f293-4fb7-ad4c-2851cac77162","resource":{"resourceType":"Patient","gender":"robot"}},
        {"fullUrl":"urn:uuid:b76d9bbf-f293-4fb7-ad4c-2851cac77162","resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},
          "subject":{"reference":"urn:uuid:a76d9bbf-f293-4fb7-ad4c-2851cac77162"},"performer":[{"reference":"#missing"}]}}]}"##;
    assert_error(bundle, "Bundle.entry[0].resource.gender", "not in the required ValueSet");
    assert_error(bundle, "Bundle.entry[1].resource.performer[0]", "does not exist");
    let wrong_target = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Medication/1"}}"#;
    assert_error(wrong_target, "Observation.subject", "not allowed here");
}

#[test]
fn hostile_input_is_a_report_not_a_panic() {
    let validator = validator();
    for input in [&b"\xff\xfe"[..], b"", b"[]", b"42", b"{\"resourceType\": 1}", b"{\"resourceType\":\"Patient\",\"name\":[null]}"] {
        let report = validator.validate_bytes(input, &[]);
        assert!(!report.is_valid(), "{:?} should be invalid", String::from_utf8_lossy(input));
    }
    let deep = format!("{{\"resourceType\":\"Patient\",\"extension\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(!validator.validate_bytes(deep.as_bytes(), &[]).is_valid());
    let huge = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1e999999}}"#;
    assert_error(huge, "Observation.valueQuantity.value", "too large");
}

#[test]
fn missing_profiles_are_reported() {
    let report = validator().validate_bytes(br#"{"resourceType":"Patient"}"#, &["http://example.org/nothing".to_string()]);
    assert!(!report.is_valid());
    let _ = Arc::strong_count(&Definitions::base());
}

#[test]
fn unknown_extensions_are_errors_only_when_asked_and_outside_known_namespaces() {
    let strict = Validator::with_options(Definitions::base(), ValidatorOptions { unknown_extensions_are_errors: true });
    let patient = |url: &str| format!(r#"{{"resourceType":"Patient","extension":[{{"url":"{url}","valueString":"x"}}]}}"#);
    let is_valid = |v: &Validator, url: &str| v.validate_bytes(patient(url).as_bytes(), &[]).is_valid();
    assert!(!is_valid(&strict, "http://acme.com/fhir/StructureDefinition/unknown"));
    assert!(is_valid(&validator(), "http://acme.com/fhir/StructureDefinition/unknown"));
    for tolerated in [
        "http://hl7.org/fhir/StructureDefinition/organization-brand",
        "http://hl7.org/fhir/tools/StructureDefinition/binding-parameter",
        "http://hl7.org/fhir/5.0/StructureDefinition/extension-Patient.gender",
        "http://example.org/fhir/StructureDefinition/test",
    ] {
        assert!(is_valid(&strict, tolerated), "{tolerated}");
    }
    assert!(!is_valid(&strict, "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"));
}

/// A validator that knows one Questionnaire, for QuestionnaireResponse checks.
fn questionnaire_validator() -> Validator {
    let questionnaire = r#"{"resourceType":"Questionnaire","url":"http://example.org/q","status":"active","item":[
        {"linkId":"name","type":"string","required":true,"maxLength":5},
        {"linkId":"age","type":"integer","extension":[{"url":"http://hl7.org/fhir/StructureDefinition/minValue","valueInteger":18}]},
        {"linkId":"colour","type":"choice","repeats":true,"answerOption":[{"valueCoding":{"system":"http://example.org/c","code":"red"}},
            {"valueCoding":{"system":"http://example.org/c","code":"none"},"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/questionnaire-optionExclusive","valueBoolean":true}]}]},
        {"linkId":"smoker","type":"boolean"},
        {"linkId":"packs","type":"integer","required":true,"enableWhen":[{"question":"smoker","operator":"=","answerBoolean":true}]}]}"#;
    let mut definitions = Definitions::new_base();
    definitions.add_resource("test", json::parse(questionnaire.as_bytes()).unwrap());
    Validator::new(Arc::new(definitions))
}

fn response_errors(items: &str, status: &str) -> Vec<String> {
    let text = format!(r#"{{"resourceType":"QuestionnaireResponse","questionnaire":"http://example.org/q","status":"{status}","item":{items}}}"#);
    let report = questionnaire_validator().validate_bytes(text.as_bytes(), &[]);
    report.issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect()
}

#[test]
fn questionnaire_responses_follow_their_questionnaire() {
    let good = r#"[{"linkId":"name","answer":[{"valueString":"Eve"}]},{"linkId":"age","answer":[{"valueInteger":40}]},
        {"linkId":"colour","answer":[{"valueCoding":{"system":"http://example.org/c","code":"red"}}]},{"linkId":"smoker","answer":[{"valueBoolean":false}]}]"#;
    assert_eq!(response_errors(good, "completed"), Vec::<String>::new());
    let has = |errors: &[String], expression: &str, fragment: &str| errors.iter().any(|e| e.starts_with(&format!("{expression}: ")) && e.contains(fragment));

    let missing = response_errors(r#"[{"linkId":"age","answer":[{"valueInteger":40}]}]"#, "completed");
    assert!(has(&missing, "QuestionnaireResponse", "required item 'name'"), "{missing:?}");
    assert_eq!(response_errors(r#"[{"linkId":"age","answer":[{"valueInteger":40}]}]"#, "in-progress"), Vec::<String>::new());

    let bad = response_errors(
        r#"[{"linkId":"name","answer":[{"valueString":"Evangeline"},{"valueString":"E"}]},{"linkId":"age","answer":[{"valueString":"40"}]},
            {"linkId":"colour","answer":[{"valueCoding":{"system":"http://example.org/c","code":"blue"}},{"valueCoding":{"system":"http://example.org/c","code":"none"}}]},
            {"linkId":"nickname","answer":[{"valueString":"x"}]}]"#,
        "completed",
    );
    assert!(has(&bad, "QuestionnaireResponse.item[0]", "only one answer"), "{bad:?}");
    assert!(has(&bad, "QuestionnaireResponse.item[0].answer[0].valueString", "maximum of 5"), "{bad:?}");
    assert!(has(&bad, "QuestionnaireResponse.item[1].answer[0].valueString", "must be of type Integer"), "{bad:?}");
    assert!(has(&bad, "QuestionnaireResponse.item[2].answer[0].valueCoding", "not one of the permitted answer options"), "{bad:?}");
    assert!(has(&bad, "QuestionnaireResponse.item[2].answer[1]", "exclusive option"), "{bad:?}");
    assert!(has(&bad, "QuestionnaireResponse.item[3]", "linkId 'nickname'"), "{bad:?}");

    let young = response_errors(r#"[{"linkId":"name","answer":[{"valueString":"Eve"}]},{"linkId":"age","answer":[{"valueInteger":12}]}]"#, "completed");
    assert!(has(&young, "QuestionnaireResponse.item[1].answer[0].valueInteger", "less than the allowed minimum of 18"), "{young:?}");
}

#[test]
fn enable_when_decides_whether_items_may_and_must_be_answered() {
    let smoker = r#"[{"linkId":"name","answer":[{"valueString":"Eve"}]},{"linkId":"smoker","answer":[{"valueBoolean":true}]}]"#;
    let errors = response_errors(smoker, "completed");
    assert!(errors.iter().any(|e| e.contains("required item 'packs'")), "{errors:?}");
    let not_smoker = r#"[{"linkId":"name","answer":[{"valueString":"Eve"}]},{"linkId":"smoker","answer":[{"valueBoolean":false}]},
        {"linkId":"packs","answer":[{"valueInteger":2}]}]"#;
    let errors = response_errors(not_smoker, "completed");
    assert!(errors.iter().any(|e| e.starts_with("QuestionnaireResponse.item[2]: ") && e.contains("not enabled")), "{errors:?}");
}

#[test]
fn xml_documents_are_read_and_validated_like_json() {
    let patient = r#"<Patient xmlns="http://hl7.org/fhir"><id value="p1"/><active value="true"/><gender value="robot"/></Patient>"#;
    let report = validator().validate_bytes(patient.as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.expression == "Patient.gender"), "{:#?}", report.issues);
    let good = r#"<Patient xmlns="http://hl7.org/fhir"><id value="p1"/><active value="true"/><gender value="female"/></Patient>"#;
    assert!(validator().validate_bytes(good.as_bytes(), &[]).is_valid());
    let not_fhir = r#"<ClinicalDocument xmlns="urn:hl7-org:v3"/>"#;
    assert!(!validator().validate_bytes(not_fhir.as_bytes(), &[]).is_valid());
}

#[test]
fn wrong_displays_are_errors_under_the_reference_policy() {
    let patient = r#"{"resourceType":"Patient","maritalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M","display":"Single"}]}}"#;
    let lenient = validator().validate_bytes(patient.as_bytes(), &[]);
    assert!(lenient.is_valid() && lenient.issues.iter().any(|i| i.message.contains("wrong display")), "{:#?}", lenient.issues);
    let strict = validator().with_policy(Policy::reference_validator()).validate_bytes(patient.as_bytes(), &[]);
    assert!(strict.issues.iter().any(|i| i.severity.is_error() && i.expression == "Patient.maritalStatus.coding[0]"), "{:#?}", strict.issues);
}

#[test]
fn right_displays_pass() {
    let right = r#"{"resourceType":"Patient","maritalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M","display":"married"}]}}"#;
    assert_eq!(errors(right), Vec::<String>::new());
}

#[test]
fn reference_targets_may_be_profiles() {
    let patient_profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/pat","name":"Pat","status":"draft","kind":"resource",
        "abstract":false,"type":"Patient","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Patient",
        "differential":{"element":[{"id":"Patient.name","path":"Patient.name","min":1}]}}"#;
    let observation_profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/obs","name":"Obs","status":"draft","kind":"resource",
        "abstract":false,"type":"Observation","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Observation",
        "differential":{"element":[{"id":"Observation.subject","path":"Observation.subject","type":[{"code":"Reference",
        "targetProfile":["http://example.org/sd/pat","http://example.org/sd/not-loaded-device"]}]}]}}"#;
    let mut definitions = Definitions::new_base();
    definitions.add_resource("pat", json::parse(patient_profile.as_bytes()).unwrap());
    definitions.add_resource("obs", json::parse(observation_profile.as_bytes()).unwrap());
    let validator = Validator::new(Arc::new(definitions));
    let observation = |target: &str| {
        format!(r#"{{"resourceType":"Observation","meta":{{"profile":["http://example.org/sd/obs"]}},"status":"final","code":{{"text":"x"}},"subject":{{"reference":"{target}"}}}}"#)
    };
    assert!(validator.validate_bytes(observation("Patient/1").as_bytes(), &[]).is_valid());
    // The second target cannot be loaded, so nothing proves a Group wrong.
    assert!(validator.validate_bytes(observation("Group/1").as_bytes(), &[]).is_valid());
    let mut only_loaded = Definitions::new_base();
    only_loaded.add_resource("pat", json::parse(patient_profile.as_bytes()).unwrap());
    only_loaded.add_resource("obs", json::parse(observation_profile.replace(r#","http://example.org/sd/not-loaded-device""#, "").as_bytes()).unwrap());
    let strict = Validator::new(Arc::new(only_loaded));
    let report = strict.validate_bytes(observation("Group/1").as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.expression == "Observation.subject"), "{:#?}", report.issues);
}

#[test]
fn bundle_full_urls_identify_their_resources() {
    let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[
        {"fullUrl":"Patient/1","resource":{"resourceType":"Patient","id":"1"}},
        {"fullUrl":"http://example.org/fhir/Patient/2","resource":{"resourceType":"Patient","id":"3"}},
        {"fullUrl":"http://example.org/fhir/Patient/4","resource":{"resourceType":"Patient"}},
        {"resource":{"resourceType":"Patient","id":"5"}},
        {"fullUrl":"http://example.org/fhir/Patient/6","resource":{"resourceType":"Patient","id":"6"}}]}"#;
    assert_error(bundle, "Bundle.entry[0]", "must be an absolute URL");
    assert_error(bundle, "Bundle.entry[1]", "must end with the resource's type and id (/Patient/3)");
    assert_error(bundle, "Bundle.entry[2]", "the resource has no id");
    assert_error(bundle, "Bundle.entry[3]", "must have a fullUrl");
    assert!(!errors(bundle).iter().any(|e| e.starts_with("Bundle.entry[4]")));
    let transaction = r#"{"resourceType":"Bundle","type":"transaction","entry":[
        {"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
        {"fullUrl":"http://example.org/fhir/Patient/9","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}}]}"#;
    assert_eq!(errors(transaction), Vec::<String>::new());
}

#[test]
fn references_in_documents_must_resolve_inside_the_bundle() {
    let document = r#"{"resourceType":"Bundle","type":"document","identifier":{"system":"urn:ietf:rfc:3986","value":"urn:uuid:0c3201bd-1cbf-4d64-b04d-cd9187a4f6e0"},"timestamp":"2024-01-01T00:00:00Z","entry":[
        {"fullUrl":"http://example.org/fhir/Composition/c","resource":{"resourceType":"Composition","id":"c","status":"final","type":{"text":"x"},
          "date":"2024-01-01","title":"t","subject":{"reference":"Patient/p"},"author":[{"reference":"Practitioner/missing"},{"reference":"http://elsewhere.org/Practitioner/1"}]}},
        {"fullUrl":"http://example.org/fhir/Patient/p","resource":{"resourceType":"Patient","id":"p"}}]}"#;
    let found = errors(document);
    assert!(found.iter().any(|e| e.starts_with("Bundle.entry[0].resource.author[0]: ") && e.contains("not in the bundle")), "{found:#?}");
    assert!(!found.iter().any(|e| e.starts_with("Bundle.entry[0].resource.subject") || e.starts_with("Bundle.entry[0].resource.author[1]")), "{found:#?}");
}

/// A validator that knows one differential-only profile.
fn validator_with_profile(profile: &str) -> Validator {
    let mut definitions = Definitions::new_base();
    definitions.add_resource("profile", json::parse(profile.as_bytes()).unwrap());
    Validator::new(Arc::new(definitions))
}

#[test]
fn type_slices_are_told_apart_by_the_choice_name_and_prohibited_elements_by_absence() {
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/comm","name":"Comm","status":"draft","kind":"resource",
        "abstract":false,"type":"Communication","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Communication",
        "differential":{"element":[
          {"path":"Communication.payload","slicing":{"discriminator":[{"type":"type","path":"content"}],"rules":"closed"}},
          {"path":"Communication.payload","sliceName":"text"},
          {"path":"Communication.payload.contentString","type":[{"code":"string"}]},
          {"path":"Communication.payload","sliceName":"file","max":"1"},
          {"path":"Communication.payload.contentAttachment","type":[{"code":"Attachment"}]},
          {"path":"Communication.identifier","slicing":{"discriminator":[{"type":"value","path":"system"},{"type":"value","path":"use"}],"rules":"closed"}},
          {"path":"Communication.identifier","sliceName":"official"},
          {"path":"Communication.identifier.system","fixedUri":"http://example.org/ids"},
          {"path":"Communication.identifier.use","fixedCode":"official"},
          {"path":"Communication.identifier","sliceName":"plain"},
          {"path":"Communication.identifier.system","fixedUri":"http://example.org/ids"},
          {"path":"Communication.identifier.use","max":"0"}]}}"#;
    let validator = validator_with_profile(profile);
    let communication = |payload: &str, identifiers: &str| {
        format!(r#"{{"resourceType":"Communication","meta":{{"profile":["http://example.org/sd/comm"]}},"status":"completed","payload":{payload},"identifier":{identifiers}}}"#)
    };
    let ids = r#"[{"system":"http://example.org/ids","use":"official","value":"1"},{"system":"http://example.org/ids","value":"2"}]"#;
    let good = communication(r#"[{"contentString":"hi"},{"contentAttachment":{"title":"a"}}]"#, ids);
    let report = validator.validate_bytes(good.as_bytes(), &[]);
    assert!(report.is_valid(), "{:#?}", report.issues);
    let two_files = communication(r#"[{"contentAttachment":{"title":"a"}},{"contentAttachment":{"title":"b"}}]"#, ids);
    let report = validator.validate_bytes(two_files.as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.message.contains("slice 'file'")), "{:#?}", report.issues);
    let unmatched = communication(r#"[{"contentString":"hi"}]"#, r#"[{"system":"http://example.org/ids","use":"temp","value":"3"}]"#);
    let report = validator.validate_bytes(unmatched.as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.expression == "Communication.identifier[0]"), "{:#?}", report.issues);
}

#[test]
fn an_optional_profile_slice_whose_profile_is_not_loaded_requires_nothing() {
    // BSeR's legacy referral message Bundle: `entry` 1..*, sliced by the resource's profile; the
    // header slice 1..1, the others (ODH employment status, unpublished for R4) without a `min`.
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/message","name":"Message","status":"draft","kind":"resource",
        "abstract":false,"type":"Bundle","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Bundle",
        "differential":{"element":[
          {"path":"Bundle.entry","min":1,"slicing":{"discriminator":[{"type":"profile","path":"$this.resource"}],"rules":"open"}},
          {"path":"Bundle.entry","sliceName":"header","min":1,"max":"1"},
          {"path":"Bundle.entry.resource","type":[{"code":"MessageHeader","profile":["http://hl7.org/fhir/StructureDefinition/MessageHeader"]}]},
          {"path":"Bundle.entry","sliceName":"employment"},
          {"path":"Bundle.entry.resource","type":[{"code":"Observation","profile":["http://example.org/sd/not-loaded-employment"]}]}]}}"#;
    let validator = validator_with_profile(profile);
    let message = |entries: &str| format!(r#"{{"resourceType":"Bundle","meta":{{"profile":["http://example.org/sd/message"]}},"type":"message","timestamp":"2026-01-01T00:00:00Z","entry":{entries}}}"#);
    let header = r#"{"fullUrl":"urn:uuid:5d3a1c4e-1111-4c6e-9a55-0d1f0b1e2a11","resource":{"resourceType":"MessageHeader","id":"5d3a1c4e-1111-4c6e-9a55-0d1f0b1e2a11","eventCoding":{"system":"http://terminology.hl7.org/CodeSystem/v2-0003","code":"I12"},"source":{"endpoint":"https://x.example/fhir"}}}"#;
    let patient = r#"{"fullUrl":"urn:uuid:5d3a1c4e-2222-4c6e-9a55-0d1f0b1e2a11","resource":{"resourceType":"Patient","id":"5d3a1c4e-2222-4c6e-9a55-0d1f0b1e2a11"}}"#;
    let report = validator.validate_bytes(message(&format!("[{header},{patient}]")).as_bytes(), &[]);
    let errors: Vec<String> = report.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect();
    assert_eq!(errors, Vec::<String>::new(), "no employment entry is needed, and a Patient matches no slice of an open slicing");
    let report = validator.validate_bytes(message(&format!("[{patient}]")).as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.message.contains("slice 'header'")), "the header slice still counts: {:#?}", report.issues);
}

#[test]
fn a_sliced_choice_element_picks_the_slice_its_json_name_types() {
    // PAS slices `Claim.item.serviced[x]` this way: the value's type is only in the member name.
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/obs","name":"Obs","status":"draft","kind":"resource",
        "abstract":false,"type":"Observation","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Observation",
        "differential":{"element":[
          {"path":"Observation.value[x]","slicing":{"discriminator":[{"type":"type","path":"$this"}],"rules":"closed"}},
          {"path":"Observation.value[x]","sliceName":"valueString","type":[{"code":"string"}]},
          {"path":"Observation.value[x]","sliceName":"valuePeriod","type":[{"code":"Period"}]},
          {"path":"Observation.value[x].start","min":1}]}}"#;
    let validator = validator_with_profile(profile);
    let observation = |value: &str| {
        format!(r#"{{"resourceType":"Observation","meta":{{"profile":["http://example.org/sd/obs"]}},"status":"final","code":{{"text":"x"}},{value}}}"#)
    };
    for good in [r#""valueString":"a""#, r#""valuePeriod":{"start":"2024-01-01"}"#] {
        let report = validator.validate_bytes(observation(good).as_bytes(), &[]);
        assert!(report.is_valid(), "{good}: {:#?}", report.issues);
    }
    let report = validator.validate_bytes(observation(r#""valuePeriod":{"end":"2024-01-01"}"#).as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.message.contains("'start' is required")), "{:#?}", report.issues);
    let report = validator.validate_bytes(observation(r#""valueBoolean":true"#).as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.message.contains("matches none of the slices")), "{:#?}", report.issues);
}

#[test]
fn profiles_declaring_the_wrong_kind_still_describe_resources() {
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/pat","name":"Pat","status":"draft","kind":"complex-type",
        "abstract":false,"type":"Patient","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Patient",
        "differential":{"element":[{"path":"Patient.active","min":1}]}}"#;
    let validator = validator_with_profile(profile);
    let report = validator.validate_bytes(br#"{"resourceType":"Patient","active":true}"#, &["http://example.org/sd/pat".to_string()]);
    assert!(report.is_valid(), "{:#?}", report.issues);
}

#[test]
fn attachment_size_must_match_the_data() {
    let media = |size: u32| format!(r#"{{"resourceType":"Media","status":"completed","content":{{"contentType":"text/plain","data":"aGVsbG8=","size":{size}}}}}"#);
    assert_error(&media(100), "Media.content", "stated size 100");
    assert_eq!(errors(&media(5)), Vec::<String>::new());
}

#[test]
fn a_primitive_needs_a_value_or_extensions() {
    assert_error(r#"{"resourceType":"Patient","_implicitRules":{"id":"i1"}}"#, "Patient.implicitRules", "value or extensions");
    assert_error(r#"{"resourceType":"Patient","name":[{"given":["a",null],"_given":[null,{"id":"g2"}]}]}"#, "Patient.name[0].given[1]", "value or extensions");
    let with_extension = r#"{"resourceType":"Patient","_implicitRules":{"id":"i1","extension":[{"url":"http://example.org/x","valueString":"y"}]}}"#;
    assert_eq!(errors(with_extension), Vec::<String>::new());
}

#[test]
fn enable_when_cannot_depend_on_the_item_itself() {
    let questionnaire = r#"{"resourceType":"Questionnaire","status":"active","item":[{"linkId":"g","type":"group",
        "enableWhen":[{"question":"q","operator":"exists","answerBoolean":true}],"item":[{"linkId":"q","type":"boolean"}]},
        {"linkId":"later","type":"string","enableWhen":[{"question":"q","operator":"exists","answerBoolean":true}]}]}"#;
    assert_error(questionnaire, "Questionnaire.item[0]", "refers to 'q'");
    assert!(!errors(questionnaire).iter().any(|e| e.starts_with("Questionnaire.item[1]: ") && e.contains("refers to")));
}

#[test]
fn a_bundle_reference_must_resolve_to_the_type_it_names() {
    let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[
        {"fullUrl":"http://example.org/fhir/Patient/p","resource":{"resourceType":"Patient","id":"p","generalPractitioner":[{"reference":"Practitioner/x"}]}},
        {"fullUrl":"http://example.org/fhir/Practitioner/x","resource":{"resourceType":"Organization","id":"x"}}]}"#;
    assert_error(bundle, "Bundle.entry[0].resource.generalPractitioner[0]", "names a Practitioner");
}

#[test]
fn canonical_urls_and_include_systems_are_absolute() {
    let value_set = r##"{"resourceType":"ValueSet","url":"ValueSet/x","status":"active",
        "contained":[{"resourceType":"CodeSystem","id":"c1","url":"c1","status":"active","content":"complete","concept":[{"code":"a"}]}],
        "compose":{"include":[{"system":"#c1"}]}}"##;
    assert_error(value_set, "ValueSet.url", "must be absolute");
    assert_error(value_set, "ValueSet.contained[0].url", "contained resource");
    assert_error(value_set, "ValueSet.compose.include[0]", "must be an absolute URL");
    let good = r#"{"resourceType":"ValueSet","url":"http://example.org/vs","status":"active","compose":{"include":[{"system":"http://example.org/cs"}]}}"#;
    assert_eq!(errors(good), Vec::<String>::new());
}

#[test]
fn supplements_define_no_codes_and_identifier_uris_are_absolute() {
    let supplement = r#"{"resourceType":"CodeSystem","url":"http://example.org/supp","status":"draft","content":"complete",
        "supplements":"http://example.org/base","concept":[{"code":"a","display":"A"}]}"#;
    assert_error(supplement, "CodeSystem.content", "content 'supplement'");
    let mut definitions = Definitions::new_base();
    definitions.add_resource("supp", json::parse(supplement.as_bytes()).unwrap());
    let validator = Validator::new(Arc::new(definitions));
    let observation = r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://example.org/supp","code":"a"}]}}"#;
    let report = validator.validate_bytes(observation.as_bytes(), &[]);
    assert!(report.issues.iter().any(|i| i.severity.is_error() && i.message.contains("supplement")), "{:#?}", report.issues);
    let not_present = r#"{"resourceType":"CodeSystem","url":"http://example.org/cs","status":"draft","content":"not-present",
        "identifier":[{"system":"urn:ietf:rfc:3986","value":"2.16.840.1"}],"concept":[{"code":"a"}]}"#;
    assert_error(not_present, "CodeSystem.concept[0]", "content is not present");
    assert_error(not_present, "CodeSystem.identifier[0]", "absolute URI");
}

#[test]
fn policy_choices_for_example_urls_html_in_strings_and_markdown() {
    let document = r#"{"resourceType":"Communication","status":"completed","payload":[{"contentAttachment":{"url":"http://repository.example.org/doc"}}],
        "note":[{"text":"use <resource type>"}],"reasonCode":[{"text":"Standard <script>x</script>"}]}"#;
    let lenient = validator().validate_bytes(document.as_bytes(), &[]);
    assert!(lenient.is_valid(), "{:#?}", lenient.issues);
    assert!(lenient.issues.iter().any(|i| i.expression == "Communication.note[0].text" && i.message.contains("HTML tag")));
    let strict = Policy { allow_example_urls: false, security_checks: true, html_in_markdown: Severity::Error, ..Policy::default() };
    let report = validator().with_policy(strict).validate_bytes(document.as_bytes(), &[]);
    let at = |expression: &str| report.issues.iter().any(|i| i.severity.is_error() && i.expression == expression);
    assert!(at("Communication.payload[0].contentAttachment.url"), "{:#?}", report.issues);
    assert!(at("Communication.note[0].text"), "{:#?}", report.issues);
    assert!(at("Communication.reasonCode[0].text"), "{:#?}", report.issues);
}

#[test]
fn extensions_are_used_only_in_their_contexts() {
    let definition = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/ctx","name":"Ctx","status":"draft","kind":"complex-type",
        "abstract":false,"type":"Extension","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Extension",
        "context":[{"type":"element","expression":"Patient.name"},{"type":"element","expression":"ContactPoint"},
                   {"type":"extension","expression":"http://hl7.org/fhir/StructureDefinition/patient-interpreterRequired"},
                   {"type":"fhirpath","expression":"Patient.address.where(use = 'home')"}],
        "contextInvariant":["%resource.active.exists()"],
        "differential":{"element":[{"path":"Extension.url","fixedUri":"http://example.org/sd/ctx"},{"path":"Extension.value[x]","type":[{"code":"boolean"}]}]}}"#;
    let validator = validator_with_profile(definition);
    let ext = r#"{"url":"http://example.org/sd/ctx","valueBoolean":true}"#;
    let errors_of = |patient: String| -> Vec<String> {
        let report = validator.validate_bytes(patient.as_bytes(), &[]);
        report.issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect()
    };
    let patient = |body: &str| format!(r#"{{"resourceType":"Patient","active":true,{body}}}"#);
    for good in [
        format!(r#""name":[{{"family":"x","extension":[{ext}]}}]"#),
        format!(r#""telecom":[{{"system":"phone","value":"1","extension":[{ext}]}}]"#),
        format!(r#""address":[{{"use":"home","extension":[{ext}]}}]"#),
        format!(r#""extension":[{{"url":"http://hl7.org/fhir/StructureDefinition/patient-interpreterRequired","valueBoolean":true,"_valueBoolean":{{"extension":[{ext}]}}}}]"#),
    ] {
        assert_eq!(errors_of(patient(&good)), Vec::<String>::new(), "{good}");
    }
    let wrong_place = errors_of(patient(&format!(r#""address":[{{"use":"work","extension":[{ext}]}}]"#)));
    assert!(wrong_place.iter().any(|e| e.starts_with("Patient.address[0].extension[0]: ") && e.contains("not allowed")), "{wrong_place:#?}");
    let inactive = errors_of(format!(r#"{{"resourceType":"Patient","name":[{{"family":"x","extension":[{ext}]}}]}}"#));
    assert!(inactive.iter().any(|e| e.contains("context invariant")), "{inactive:#?}");
}

#[test]
fn extension_contexts_follow_recursive_elements() {
    let questionnaire = r#"{"resourceType":"Questionnaire","status":"active","item":[{"linkId":"g","type":"group","item":[{"linkId":"q","type":"choice",
        "extension":[{"url":"http://hl7.org/fhir/StructureDefinition/questionnaire-itemControl","valueCodeableConcept":{"text":"drop-down"}}]}]}]}"#;
    let report = validator().validate_bytes(questionnaire.as_bytes(), &[]);
    assert!(!report.issues.iter().any(|i| i.message.contains("not allowed on")), "{:#?}", report.issues);
}

#[test]
fn search_results_have_ids_and_the_searched_type() {
    let searchset = r#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"http://example.org/fhir/Patient?name=x"}],"entry":[
        {"fullUrl":"http://example.org/fhir/Patient/1","resource":{"resourceType":"Patient","id":"1"},"search":{"mode":"match"}},
        {"fullUrl":"urn:uuid:a76d9bbf-f293-4fb7-ad4c-2851cac77162","resource":{"resourceType":"Immunization","status":"completed",
          "vaccineCode":{"text":"x"},"patient":{"reference":"Patient/1"},"occurrenceDateTime":"2021"},"search":{"mode":"match"}},
        {"fullUrl":"urn:uuid:b76d9bbf-f293-4fb7-ad4c-2851cac77162","resource":{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]},"search":{"mode":"outcome"}}]}"#;
    assert_error(searchset, "Bundle.entry[1].resource", "must have an id");
    assert_error(searchset, "Bundle.entry[1].resource", "search for Patient");
    assert!(!errors(searchset).iter().any(|e| e.starts_with("Bundle.entry[0]") || e.starts_with("Bundle.entry[2]")), "{:#?}", errors(searchset));
}

#[test]
fn search_parameters_agree_with_their_definitions() {
    let capability = r#"{"resourceType":"CapabilityStatement","status":"active","date":"2024","kind":"instance","fhirVersion":"4.0.1","format":["json"],
        "rest":[{"mode":"server","resource":[{"type":"AllergyIntolerance","searchParam":[
          {"name":"clinical-status","definition":"http://hl7.org/fhir/SearchParameter/AllergyIntolerance-clinical-status","type":"date"},
          {"name":"patient","definition":"http://hl7.org/fhir/SearchParameter/clinical-patient","type":"reference"}]}]}]}"#;
    assert_error(capability, "CapabilityStatement.rest[0].resource[0].searchParam[0]", "has the type token");
    assert!(!errors(capability).iter().any(|e| e.contains("searchParam[1]")));
    let derived = r#"{"resourceType":"SearchParameter","url":"http://example.org/sp/name","name":"n","status":"active","description":"d","code":"name",
        "base":["Patient"],"type":"string","expression":"Patient.name","derivedFrom":"http://hl7.org/fhir/SearchParameter/Organization-name"}"#;
    assert_error(derived, "SearchParameter", "the base Patient");
}

#[test]
fn coding_systems_are_absolute_code_system_urls() {
    let observation = |system: &str| format!(r#"{{"resourceType":"Observation","status":"final","code":{{"coding":[{{"system":"{system}","code":"x"}}]}}}}"#);
    assert_error(&observation("#local"), "Observation.code.coding[0]", "must be an absolute URL");
    assert_error(&observation("http://hl7.org/fhir/ValueSet/observation-codes"), "Observation.code.coding[0]", "is a ValueSet");
    assert_eq!(errors(&observation("http://example.org/codes")), Vec::<String>::new());
}

#[test]
fn recursive_elements_in_profiles_take_the_base_content() {
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/params","name":"P","status":"draft","kind":"resource",
        "abstract":false,"type":"Parameters","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Parameters",
        "differential":{"element":[{"id":"Parameters.parameter.name","path":"Parameters.parameter.name","patternString":"Outer"},
          {"id":"Parameters.parameter.part","path":"Parameters.parameter.part","min":1}]}}"#;
    let validator = validator_with_profile(profile);
    let parameters = r#"{"resourceType":"Parameters","meta":{"profile":["http://example.org/sd/params"]},
        "parameter":[{"name":"Outer","part":[{"name":"inner","valueString":"x"}]}]}"#;
    let report = validator.validate_bytes(parameters.as_bytes(), &[]);
    assert!(report.is_valid(), "{:#?}", report.issues);
    let wrong = r#"{"resourceType":"Parameters","meta":{"profile":["http://example.org/sd/params"]},"parameter":[{"name":"Other","valueString":"x"}]}"#;
    let report = validator.validate_bytes(wrong.as_bytes(), &[]);
    assert!(report.issues.iter().filter(|i| i.severity.is_error()).count() == 2, "{:#?}", report.issues);
}

#[test]
fn choices_unfolded_for_their_common_children_keep_their_own_content() {
    let profile = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/eff","name":"E","status":"draft","kind":"resource",
        "abstract":false,"type":"Observation","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Observation",
        "differential":{"element":[{"id":"Observation.effective[x].extension","path":"Observation.effective[x].extension","max":"1"}]}}"#;
    let validator = validator_with_profile(profile);
    let observation = r#"{"resourceType":"Observation","meta":{"profile":["http://example.org/sd/eff"]},"status":"final","code":{"text":"x"},
        "effectivePeriod":{"start":"2024-01-01"}}"#;
    let report = validator.validate_bytes(observation.as_bytes(), &[]);
    assert!(report.is_valid(), "{:#?}", report.issues);
    let broken = r#"{"resourceType":"StructureDefinition","url":"http://example.org/sd/bad","name":"B","status":"draft","kind":"resource",
        "abstract":false,"type":"Observation","derivation":"constraint","baseDefinition":"http://hl7.org/fhir/StructureDefinition/Observation",
        "differential":{"element":[{"id":"Observation.valueQuantity","path":"Observation.valueBla"}]}}"#;
    assert_error(broken, "StructureDefinition", "snapshot cannot be generated");
}

#[test]
fn measure_reports_report_what_their_measure_defines() {
    let measure = r#"{"resourceType":"Measure","url":"http://example.org/m","status":"active",
        "scoring":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/measure-scoring","code":"cohort"}]},
        "group":[{"population":[{"code":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/measure-population","code":"initial-population"}]},"criteria":{"language":"text/cql","expression":"x"}}]}]}"#;
    let validator = validator_with_profile(measure);
    let population = |code: &str, extra: &str| {
        format!(r#"{{"code":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/measure-population","code":"{code}"}}]}},"count":1{extra}}}"#)
    };
    let report = |kind: &str, populations: String, score: &str| {
        format!(r#"{{"resourceType":"MeasureReport","status":"complete","type":"{kind}","measure":"http://example.org/m","period":{{"start":"2024"}},"group":[{{"population":[{populations}]{score}}}]}}"#)
    };
    let errors_of = |text: String| -> Vec<String> {
        validator.validate_bytes(text.as_bytes(), &[]).issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect()
    };
    assert_eq!(errors_of(report("summary", population("initial-population", ""), "")), Vec::<String>::new());
    let found = errors_of(report("summary", format!("{},{}", population("initial-population", r#","subjectResults":{"reference":"List/1"}"#), population("numerator", "")), r#","measureScore":{"value":1}"#));
    let has = |expression: &str, fragment: &str| found.iter().any(|e| e.starts_with(&format!("{expression}: ")) && e.contains(fragment));
    assert!(has("MeasureReport.group[0].population[0]", "subject-list"), "{found:#?}");
    assert!(has("MeasureReport.group[0].population[1]", "'numerator' is not defined"), "{found:#?}");
    assert!(has("MeasureReport.group[0].measureScore", "cohort"), "{found:#?}");
}

#[test]
fn indexes_are_written_in_decimal() {
    for i in [0, 7, 10, 99, 12_345, usize::MAX] {
        let mut path = String::from("Bundle.entry");
        super::walk::push_index(&mut path, i);
        assert_eq!(path, format!("Bundle.entry[{i}]"));
    }
}

#[test]
fn exchange_packages_check_what_the_default_set_only_warns_about() {
    // A Patient claiming US Core and a Claim claiming PAS, both missing what those profiles require.
    let patient = r#"{"resourceType":"Patient","id":"p1","meta":{"profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "name":[{"family":"Everywoman"}]}"#;
    let claim = r#"{"resourceType":"Claim","id":"c1","meta":{"profile":["http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim"]},
        "status":"active","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"institutional"}]},
        "use":"preauthorization","patient":{"reference":"Patient/p1"},"created":"2024-05-02","provider":{"reference":"Organization/o1"},
        "priority":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/processpriority","code":"normal"}]},
        "insurance":[{"sequence":1,"focal":true,"coverage":{"reference":"Coverage/v1"}}]}"#;
    let default = Validator::new(Arc::new(Definitions::new_default()));
    let exchange = Validator::new(Arc::new(Definitions::new_with_exchange_packages()));
    for text in [patient, claim] {
        let before = default.validate_bytes(text.as_bytes(), &[]);
        assert!(before.is_valid(), "{:#?}", before.issues);
        assert!(before.issues.iter().any(|i| i.message.contains("is not loaded")));
        let after = exchange.validate_bytes(text.as_bytes(), &[]);
        assert!(!after.is_valid(), "{text}");
        assert!(!after.issues.iter().any(|i| i.message.starts_with("the profile") && i.message.contains("is not loaded")), "{:#?}", after.issues);
    }
    let errors = |text: &str| -> Vec<String> {
        exchange.validate_bytes(text.as_bytes(), &[]).issues.iter().filter(|i| i.severity.is_error()).map(|i| format!("{}: {}", i.expression, i.message)).collect()
    };
    // US Core 6.1.0 requires an identifier and a gender; PAS requires at least one item.
    let found = errors(patient);
    assert!(found.iter().any(|e| e.contains("(Patient.identifier)")) && found.iter().any(|e| e.contains("(Patient.gender)")), "{found:#?}");
    assert!(errors(claim).iter().any(|e| e.contains("(Claim.item)")), "{:#?}", errors(claim));
}

#[test]
fn a_bundle_inside_a_message_resolves_its_references_among_its_own_entries() {
    let message = |inner_ref: &str| {
        format!(
            r#"{{"resourceType":"Bundle","type":"message","entry":[
            {{"fullUrl":"urn:uuid:8c1f3a52-0000-4000-8000-000000000001","resource":{{"resourceType":"MessageHeader","id":"8c1f3a52-0000-4000-8000-000000000001",
              "eventCoding":{{"system":"http://example.org/events","code":"e"}},"source":{{"endpoint":"http://example.org/fhir"}},
              "focus":[{{"reference":"urn:uuid:8c1f3a52-0000-4000-8000-000000000002"}}]}}}},
            {{"fullUrl":"urn:uuid:8c1f3a52-0000-4000-8000-000000000002","resource":{{"resourceType":"Bundle","id":"8c1f3a52-0000-4000-8000-000000000002","type":"collection","entry":[
              {{"fullUrl":"urn:uuid:8c1f3a52-0000-4000-8000-000000000003","resource":{{"resourceType":"Patient","id":"8c1f3a52-0000-4000-8000-000000000003"}}}},
              {{"fullUrl":"urn:uuid:8c1f3a52-0000-4000-8000-000000000004","resource":{{"resourceType":"Observation","id":"8c1f3a52-0000-4000-8000-000000000004","status":"final",
                "code":{{"text":"x"}},"subject":{{"reference":"{inner_ref}"}}}}}}]}}}}]}}"#
        )
    };
    let resolved: Vec<String> = errors(&message("urn:uuid:8c1f3a52-0000-4000-8000-000000000003")).into_iter().filter(|e| e.contains("resolve")).collect();
    assert_eq!(resolved, Vec::<String>::new(), "the Patient is an entry of the nested Bundle");
    // The outer message's own rule still holds for its own entries.
    let mut outer = message("urn:uuid:8c1f3a52-0000-4000-8000-000000000003");
    outer = outer.replace(r#""focus":[{"reference":"urn:uuid:8c1f3a52-0000-4000-8000-000000000002"}]"#, r#""focus":[{"reference":"urn:uuid:8c1f3a52-0000-4000-8000-000000000009"}]"#);
    assert_error(&outer, "Bundle.entry[0].resource.focus[0]", "must resolve inside it");
}
