//! IOP ↔ FHIR mappings end to end: golden Bundles per fixture, invariants over every output, US Core / PAS / BSeR conformance, round trips, payer decisions, and located load errors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use iop_gateway::definitions::Definitions;
use iop_gateway::json::{self, Json};
use iop_gateway::mapping::MappingSet;
use iop_gateway::validation::Validator;
use iop_gateway::xml::XmlOptions;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BSER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bser/profiles");

/// The BSeR profiles the referral mappings claim and the Task business status they bind (BSeR has
/// no package, only the XML differentials from before it moved to FSH; copied under tests/fixtures).
const BSER_PROFILES: &[&str] = &[
    "structuredefinition/ReferralServiceRequest.xml",
    "structuredefinition/ReferralTask.xml",
    "structuredefinition/BSeR-PatientConsent.xml",
    "codesystem/TaskBusinessStatusCS.xml",
    "valueset/TaskBusinessStatusVS.xml",
];

/// R4, the bundled profiles, US Core 6.1.0, PAS 2.2.1 and the BSeR referral profiles: what every output must satisfy.
fn definitions() -> Arc<Definitions> {
    static DEFINITIONS: OnceLock<Arc<Definitions>> = OnceLock::new();
    DEFINITIONS
        .get_or_init(|| {
            let mut definitions = Definitions::new_with_exchange_packages();
            let options = XmlOptions { allow_xsi_schema_location: true };
            for file in BSER_PROFILES {
                let bytes = std::fs::read(Path::new(BSER).join(file)).expect("read BSeR profile");
                let (resource, issues) = iop_gateway::xml::parse_resource_with(&bytes, &definitions, &options).expect("BSeR profile is FHIR XML");
                assert!(!issues.iter().any(|i| i.severity.is_error()), "{file}: {issues:#?}");
                definitions.add_resource(file, resource);
            }
            Arc::new(definitions)
        })
        .clone()
}

fn mappings() -> &'static MappingSet {
    static MAPPINGS: OnceLock<MappingSet> = OnceLock::new();
    MAPPINGS.get_or_init(|| MappingSet::load(&Path::new(ROOT).join("mappings"), &definitions()).unwrap_or_else(|e| panic!("{e}")))
}

/// The records of a fixture file (one record or an array of them).
fn records(path: &Path) -> Vec<Json> {
    match json::parse(&std::fs::read(path).expect("read fixture")).expect("fixture is JSON") {
        Json::Array(items) => items,
        single => vec![single],
    }
}

fn fixture_files(concept_dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("tests/fixtures/iop").join(concept_dir))
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn concept_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("tests/fixtures/iop"))
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

/// Whether a report says a claimed profile was not loaded (so not really checked). ValueSets that live on
/// terminology servers (X12's licensed ones, VSAC's) are never loaded; the validator says so in a warning,
/// which is expected and is not a missing profile.
fn profile_not_loaded(report: &iop_gateway::validation::Report) -> bool {
    report.issues.iter().any(|i| i.message.contains("is not loaded") && !i.message.starts_with("the ValueSet "))
}

/// The errors of a validation report.
fn errors_of(report: &iop_gateway::validation::Report) -> Vec<String> {
    report.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect()
}

/// The value at a dotted path of member names and array indexes (`"item.0.quantity"`); `Json::Null` when absent.
fn pick<'a>(json: &'a Json, path: &str) -> &'a Json {
    static NULL: Json = Json::Null;
    path.split('.').fold(json, |node, step| match (node, step.parse::<usize>()) {
        (Json::Array(items), Ok(i)) => items.get(i).unwrap_or(&NULL),
        (Json::Object(_), _) => node.get(step).unwrap_or(&NULL),
        _ => &NULL,
    })
}

/// Checks the rules every mapped Bundle keeps and returns the problems found.
fn invariant_problems(bundle: &Json, require_resolved: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let entries = bundle.get("entry").and_then(Json::as_array).unwrap_or_default();
    let mut full_urls = HashSet::new();
    let mut keys = HashSet::new();
    for entry in entries {
        let resource = &entry["resource"];
        let key = format!("{}/{}", resource["resourceType"].as_str().unwrap_or_default(), resource["id"].as_str().unwrap_or_default());
        if !keys.insert(key.clone()) {
            problems.push(format!("{key} appears twice"));
        }
        full_urls.insert(entry["fullUrl"].as_str().unwrap_or_default().to_string());
        if entry["request"]["method"].as_str() != Some("PUT") || entry["request"]["url"].as_str() != Some(key.as_str()) {
            problems.push(format!("{key}: the entry is not a PUT to {key}"));
        }
        if entry["fullUrl"].as_str() != Some(format!("urn:uuid:{}", resource["id"].as_str().unwrap_or_default()).as_str()) {
            problems.push(format!("{key}: fullUrl does not match the id"));
        }
    }
    let mut references = Vec::new();
    collect(bundle, "Bundle", &mut references, &mut problems);
    if require_resolved {
        for (path, reference) in references {
            if !full_urls.contains(&reference) {
                problems.push(format!("{path}: {reference} does not resolve inside the Bundle"));
            }
        }
    }
    problems
}

/// Collects references and reports empty values.
fn collect(value: &Json, path: &str, references: &mut Vec<(String, String)>, problems: &mut Vec<String>) {
    match value {
        Json::Null => problems.push(format!("{path} is null")),
        Json::String(s) if s.is_empty() => problems.push(format!("{path} is empty")),
        Json::Array(items) if items.is_empty() => problems.push(format!("{path} is an empty array")),
        Json::Object(object) if object.is_empty() => problems.push(format!("{path} is an empty object")),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect(item, &format!("{path}[{i}]"), references, problems);
            }
        }
        Json::Object(object) => {
            for (name, member) in object.iter() {
                if name == "reference"
                    && let Some(reference) = member.as_str()
                {
                    references.push((path.to_string(), reference.to_string()));
                }
                collect(member, &format!("{path}.{name}"), references, problems);
            }
        }
        _ => {}
    }
}

fn map_files(files: &[PathBuf]) -> Json {
    let all: Vec<Json> = files.iter().flat_map(|f| records(f)).collect();
    let mapped = mappings().records_to_fhir(&all);
    assert!(!mapped.has_errors(), "{:?}: {:#?}", files, mapped.issues);
    // Fixtures of one folder are different records: two of them making the same resource would be a copy-paste id.
    let conflicts: Vec<String> = mapped.issues.iter().map(ToString::to_string).filter(|m| m.contains("different content")).collect();
    assert!(conflicts.is_empty(), "{files:?}: {conflicts:#?}");
    mapped.output
}

#[test]
fn golden_bundles_per_concept_fixture() {
    for dir in concept_dirs().into_iter().filter(|d| d != "episode") {
        for file in fixture_files(&dir) {
            let bundle = map_files(std::slice::from_ref(&file));
            let name = format!("{dir}__{}", file.file_stem().unwrap().to_string_lossy());
            insta::assert_json_snapshot!(name, serde_json::Value::from(&bundle));
        }
    }
}

#[test]
fn every_output_keeps_the_invariants_and_validates_against_us_core() {
    let validator = Validator::new(definitions());
    for dir in concept_dirs() {
        let files = fixture_files(&dir);
        let bundle = map_files(&files);
        let problems = invariant_problems(&bundle, false);
        assert!(problems.is_empty(), "{dir}: {problems:#?}");
        let report = validator.validate_json(&bundle, &[]);
        let errors = errors_of(&report);
        assert!(errors.is_empty(), "{dir}: {errors:#?}");
        // The claimed US Core, PAS and BSeR profiles were really checked, not skipped as unknown.
        assert!(!profile_not_loaded(&report), "{dir}: {:#?}", report.issues);
    }
}

#[test]
fn the_full_episode_is_one_self_contained_bundle() {
    let all: Vec<Json> = fixture_files("episode").iter().flat_map(|f| records(f)).collect();
    let conflicts: Vec<String> = mappings().records_to_fhir(&all).issues.iter().map(ToString::to_string).filter(|m| m.contains("different content")).collect();
    // Records that share a resource (the program site, the clinician) describe it the same way.
    assert!(conflicts.is_empty(), "{conflicts:#?}");
    let bundle = map_files(&fixture_files("episode"));
    let problems = invariant_problems(&bundle, true);
    assert!(problems.is_empty(), "{problems:#?}");
    let entries = bundle["entry"].as_array().unwrap();
    let count = |t: &str| entries.iter().filter(|e| e["resource"]["resourceType"].as_str() == Some(t)).count();
    // 24 scheduled sessions: 21 attended (Encounters), 3 absences (Appointments).
    assert_eq!((count("Encounter"), count("Appointment")), (21, 3));
    // 16 screenings: 16 QuestionnaireResponses; PHQ-9 panel + 9 items + total, GAD-7 panel + 7 items + total.
    assert_eq!(count("QuestionnaireResponse"), 16);
    // Two referrals, each a ServiceRequest and a Task, and the care plan's schedule and 4 services.
    assert_eq!((count("ServiceRequest"), count("Task")), (2 + 1 + 4, 2));
    // The authorization and its extension, each a Claim with its PAS request Bundle; the discharge summary
    // (Composition, aftercare CarePlan, one medication) in its own Bundle; the Part 2 consent.
    assert_eq!((count("Claim"), count("Bundle"), count("Composition"), count("MedicationRequest"), count("Consent")), (2, 3, 1, 1, 1));
    assert_eq!((count("Patient"), count("Practitioner"), count("Coverage")), (1, 1, 1));
    // The enrollment every attended session belongs to, and the care plan: the schedule, 4 services, 3 goals.
    assert_eq!((count("EpisodeOfCare"), count("CarePlan"), count("Goal")), (1, 1 + 1, 3));
    let episode = entries.iter().find(|e| e["resource"]["resourceType"].as_str() == Some("EpisodeOfCare")).unwrap();
    let first_reference = |list: &Json| list.as_array().and_then(|l| l.first()).and_then(|r| r["reference"].as_str()).map(str::to_string);
    let in_episode = entries.iter().filter(|e| first_reference(&e["resource"]["episodeOfCare"]).as_deref() == episode["fullUrl"].as_str()).count();
    assert_eq!(in_episode, 21);
    // Four urine drug screens of five substance classes; exactly one result is positive.
    assert_eq!(count("DiagnosticReport"), 4);
    let positive: Vec<&Json> = entries
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"].as_str() == Some("Observation") && r["valueCodeableConcept"]["coding"].as_array().is_some_and(|c| c[0]["code"].as_str() == Some("10828004")))
        .collect();
    assert_eq!(positive.len(), 1);
    assert_eq!(positive[0]["code"]["coding"].as_array().map(|c| c[0]["code"].as_str()), Some(Some("3427-2")));
    // Weekly PHQ-9 and GAD-7 totals, as the gateway computed them, improve over the 8 weeks: a drop of at
    // least 5 points (the change usually taken as clinically meaningful), no week more than 1 point worse
    // than the one before, and the severity band moves from moderate or worse to mild or better.
    for (code, first_bands, last_bands) in [("44261-6", ["moderate", "moderately-severe"], ["minimal", "mild"]), ("70274-6", ["moderate", "severe"], ["minimal", "mild"])] {
        let mut weekly: Vec<(&str, i64, &str)> = entries
            .iter()
            .map(|e| &e["resource"])
            .filter(|r| pick(r, "code.coding.0.code").as_str() == Some(code))
            .map(|r| {
                let total = r["valueQuantity"]["value"].to_string().parse::<i64>().unwrap();
                (r["effectiveDateTime"].as_str().unwrap(), total, pick(r, "interpretation.0.coding.0.code").as_str().unwrap())
            })
            .collect();
        weekly.sort();
        assert_eq!(weekly.len(), 8, "{code}: {weekly:?}");
        let totals: Vec<i64> = weekly.iter().map(|(_, total, _)| *total).collect();
        assert!(totals[0] - totals[7] >= 5, "{code}: {totals:?}");
        assert!(totals.windows(2).all(|w| w[1] <= w[0] + 1), "{code}: {totals:?}");
        assert!(first_bands.contains(&weekly[0].2) && last_bands.contains(&weekly[7].2), "{code}: {weekly:?}");
    }
    // PHQ-9 panel + 9 items + total and GAD-7 panel + 7 items + total, 8 weeks; 4 drug screens × 5 results;
    // the discharge attendance.
    assert_eq!(count("Observation"), 8 * (11 + 9) + 4 * 5 + 1);
    // The discharge finished the enrollment: the EpisodeOfCare carries the enrollment's track and the discharge's disposition.
    let episode = &episode["resource"];
    assert_eq!(episode["status"].as_str(), Some("finished"));
    let extension_urls: Vec<&str> = episode["extension"].as_array().unwrap().iter().filter_map(|e| e["url"].as_str()).collect();
    assert!(extension_urls.contains(&"http://iop-gateway.org/fhir/StructureDefinition/iop-track"), "{extension_urls:?}");
    assert!(extension_urls.contains(&"http://iop-gateway.org/fhir/StructureDefinition/iop-discharge-disposition"), "{extension_urls:?}");
    // The step-down referral keeps its Part 2 consent beside the discharge summary the discharge added.
    let outbound = entries.iter().map(|e| &e["resource"]).find(|r| r["resourceType"].as_str() == Some("ServiceRequest") && pick(r, "category.0.coding.0.code").as_str() == Some("outbound")).unwrap();
    let supporting: Vec<&str> = outbound["supportingInfo"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| entries.iter().find(|e| e["fullUrl"] == r["reference"]).unwrap()["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert_eq!(supporting, ["Consent", "Bundle"]);
    // The extension request quotes the first certification.
    let claims: Vec<&Json> = entries.iter().map(|e| &e["resource"]).filter(|r| r["resourceType"].as_str() == Some("Claim")).collect();
    let quoted: Vec<Option<&str>> = claims.iter().map(|c| pick(c, "item.0.extension").as_array().unwrap().iter().find(|e| e["url"].as_str().is_some_and(|u| u.ends_with("extension-authorizationNumber"))).and_then(|e| e["valueString"].as_str())).collect();
    assert_eq!(quoted, [None, Some("CERT-77-2001-A")]);
}

#[test]
fn mapping_is_deterministic_and_re_sending_updates_the_same_resources() {
    let files = fixture_files("episode");
    let first = map_files(&files).to_string_compact();
    let second = map_files(&files).to_string_compact();
    assert_eq!(first, second);
    // A re-sent session with a changed end time keeps its id.
    let mut session = records(&Path::new(ROOT).join("tests/fixtures/iop/session/attended.json")).remove(0);
    let before = mappings().records_to_fhir(std::slice::from_ref(&session)).output;
    if let Json::Object(object) = &mut session {
        object.insert("end_at", Json::string("2026-01-05T11:45:00-06:00"));
    }
    let after = mappings().records_to_fhir(std::slice::from_ref(&session)).output;
    assert_eq!(before["entry"].as_array().unwrap()[0]["fullUrl"], after["entry"].as_array().unwrap()[0]["fullUrl"]);
    assert_ne!(before, after);
}

#[test]
fn round_trip_keeps_every_mapped_referral_field() {
    // The client travels with its referrals: the referral's client_id comes back from the Patient.
    let client = records(&Path::new(ROOT).join("tests/fixtures/iop/client/full.json"));
    for file in fixture_files("referral") {
        let sent = records(&file);
        let with_client: Vec<Json> = client.iter().chain(&sent).cloned().collect();
        let bundle = mappings().records_to_fhir(&with_client).output;
        let back = mappings().fhir_to_records(&bundle);
        assert!(!back.has_errors(), "{:#?}", back.issues);
        // A referral's consents travel with it as records of their own; only the referrals come back.
        assert_eq!(records_of(&back.output, "referral"), records_of(&sent, "referral"), "{}", file.display());
    }
}

#[test]
fn flags_reach_the_caller() {
    let screening = fixture_files("screening");
    let all: Vec<Json> = screening.iter().flat_map(|f| records(f)).collect();
    let mapped = mappings().records_to_fhir(&all);
    let messages: Vec<String> = mapped.issues.iter().map(ToString::to_string).collect();
    assert!(messages.iter().any(|m| m.contains("SCR-0102 total") && m.contains("disagrees")), "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains("SCR-0103") && m.contains("URGENT")), "{messages:#?}");
    // The total Observation carries the computed total, not the sent one.
    let totals: Vec<String> = mapped.output["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["code"]["coding"].as_array().is_some_and(|c| c[0]["code"].as_str() == Some("70274-6")))
        .map(|r| r["valueQuantity"]["value"].to_string())
        .collect();
    assert_eq!(totals, vec!["10".to_string()]);
}

#[test]
fn a_bad_record_is_reported_with_its_path() {
    let record = json::parse(br#"{"record_type": "session", "id": "S-1", "client_id": "C-1", "start_at": "2026-01-05T09:00:00Z", "end_at": "2026-01-05T12:00:00Z",
        "modality": "group_therapy", "setting": "on_the_moon", "attendance": "attended", "cpt": "90853"}"#)
    .unwrap();
    let mapped = mappings().records_to_fhir(&[record]);
    assert!(mapped.has_errors());
    assert_eq!(mapped.issues[0].path, "setting", "{:#?}", mapped.issues);
    assert!(mapped.output["entry"].as_array().unwrap().is_empty());
}

/// A copy of `mappings/` with one file replaced, for load-error tests.
fn broken_mappings(file: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iop-mappings-{}-{}", std::process::id(), file.replace('.', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("mappings")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "json") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join(file), text).unwrap();
    dir
}

fn load_error(file: &str, text: &str) -> String {
    let dir = broken_mappings(file, text);
    let error = MappingSet::load(&dir, &definitions()).expect_err("the broken mapping must be refused");
    let _ = std::fs::remove_dir_all(&dir);
    error.to_string()
}

const SESSION_HEAD: &str = "record = \"session\"\ndirection = \"to-fhir\"\n\n[[resource]]\nname = \"encounter\"\ntype = \"Encounter\"\n\
    profiles = [\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter\"]\nid = \"session:{id}\"\nrules = [\n\
    { path = \"status\", value = \"finished\" },\n{ path = \"class\", value = { system = \"http://terminology.hl7.org/CodeSystem/v3-ActCode\", code = \"AMB\" } },\n\
    { path = \"type[0].text\", value = \"session\" },\n{ path = \"subject\", ref = \"Patient\", id = \"client:{client_id}\" },\n";

#[test]
fn load_errors_name_file_line_and_path() {
    // Line 14: a target path the profile does not have.
    let message = load_error("session.to-fhir.toml", &format!("{SESSION_HEAD}{{ path = \"period.begin\", from = \"start_at\" }},\n]\n"));
    assert!(message.contains("session.to-fhir.toml:14: period.begin: 'Encounter.period' has no element 'begin'"), "{message}");
    // A type that does not fit: `setting`, an enumerated string, cannot fill the dateTime period.start.
    let message = load_error("session.to-fhir.toml", &format!("{SESSION_HEAD}{{ path = \"period.start\", from = \"setting\" }},\n]\n"));
    assert!(message.contains("session.to-fhir.toml:14: period.start: a string cannot fill a FHIR dateTime"), "{message}");
    // A fixed code outside a required binding.
    let text = SESSION_HEAD.replace("value = \"finished\"", "value = \"done\"");
    let message = load_error("session.to-fhir.toml", &format!("{text}]\n"));
    assert!(message.contains("session.to-fhir.toml:10: status: the code 'done' is not in the required ValueSet http://hl7.org/fhir/ValueSet/encounter-status"), "{message}");
    // A record path the schema does not have.
    let message = load_error("session.to-fhir.toml", &format!("{SESSION_HEAD}{{ path = \"period.start\", from = \"starts_at\" }},\n]\n"));
    assert!(message.contains("session.to-fhir.toml:14: starts_at: the schema has no member 'starts_at'"), "{message}");
    // TOML syntax and unknown keys are located too.
    let message = load_error("session.to-fhir.toml", &format!("{SESSION_HEAD}{{ path = \"period.start\", form = \"start_at\" }},\n]\n"));
    assert!(message.contains("session.to-fhir.toml:14:") && message.contains("form"), "{message}");
    // A required element no rule sets.
    let text = SESSION_HEAD.replace("{ path = \"status\", value = \"finished\" },\n", "");
    let message = load_error("session.to-fhir.toml", &format!("{text}]\n"));
    assert!(message.contains("no rule sets 'status'"), "{message}");
}

#[test]
fn the_commands_map_and_check() {
    let binary = env!("CARGO_BIN_EXE_iop-gateway");
    let check = Command::new(binary).current_dir(ROOT).args(["mappings", "check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stdout));
    let fixture = Path::new(ROOT).join("tests/fixtures/iop/referral/inbound.json");
    let to_fhir = Command::new(binary).current_dir(ROOT).args(["map", "--from", "iop", "--to", "fhir"]).arg(&fixture).output().unwrap();
    assert_eq!(to_fhir.status.code(), Some(0), "{}", String::from_utf8_lossy(&to_fhir.stderr));
    let bundle_file = std::env::temp_dir().join(format!("iop-referral-{}.json", std::process::id()));
    std::fs::write(&bundle_file, &to_fhir.stdout).unwrap();
    let back = Command::new(binary).current_dir(ROOT).args(["map", "--from", "fhir", "--to", "iop"]).arg(&bundle_file).output().unwrap();
    let _ = std::fs::remove_file(&bundle_file);
    assert_eq!(back.status.code(), Some(0), "{}", String::from_utf8_lossy(&back.stderr));
    let records = json::parse(&back.stdout).unwrap();
    assert_eq!(records.as_array().unwrap()[0]["id"].as_str(), Some("REF-2026-0042"));
    // A payer's PAS response becomes a decision record.
    let response = Path::new(ROOT).join("tests/fixtures/pas/decision-pended.json");
    let decision = Command::new(binary).current_dir(ROOT).args(["map", "--from", "fhir", "--to", "iop"]).arg(&response).output().unwrap();
    assert_eq!(decision.status.code(), Some(0), "{}", String::from_utf8_lossy(&decision.stderr));
    let decisions = json::parse(&decision.stdout).unwrap();
    assert_eq!(decisions.as_array().unwrap()[0]["outcome"].as_str(), Some("pended"));
    let bad = Path::new(ROOT).join("tests/fixtures/iop/client/full.json");
    let bad_text = std::fs::read_to_string(&bad).unwrap().replace("\"1991-06-14\"", "\"1991-14-06\"");
    let bad_file = std::env::temp_dir().join(format!("iop-bad-client-{}.json", std::process::id()));
    std::fs::write(&bad_file, bad_text).unwrap();
    let failed = Command::new(binary).current_dir(ROOT).args(["map", "--from", "iop", "--to", "fhir"]).arg(&bad_file).output().unwrap();
    let _ = std::fs::remove_file(&bad_file);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("client C-1001 birth_date"), "{}", String::from_utf8_lossy(&failed.stderr));
}

/// Copies `dir` (flat, files only) into `into`.
fn copy_folder(dir: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, into.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Replaces `old` by `new` in a file, insisting that `old` is there.
fn edit(file: &Path, old: &str, new: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(old), "{}: {old}", file.display());
    std::fs::write(file, text.replacen(old, new, 1)).unwrap();
}

/// The worked example of mappings/README.md: a new session modality is a new code in an edited copy of
/// profiles/, used with `--ig`, with no rebuild; the bundled profiles keep refusing it.
#[test]
fn an_edited_copy_of_the_profiles_changes_codes_without_a_rebuild() {
    let binary = env!("CARGO_BIN_EXE_iop-gateway");
    let work = std::env::temp_dir().join(format!("iop-edited-profiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (profiles, mappings_dir) = (work.join("profiles"), work.join("mappings"));
    copy_folder(&Path::new(ROOT).join("profiles"), &profiles);
    copy_folder(&Path::new(ROOT).join("mappings"), &mappings_dir);
    edit(&profiles.join("CodeSystem-session-modality.json"), "    {\n      \"code\": \"expressive-therapy\",", "    {\n      \"code\": \"peer-support\",\n      \"display\": \"Peer support group\"\n    },\n    {\n      \"code\": \"expressive-therapy\",");
    edit(&mappings_dir.join("session.schema.json"), "\"expressive_therapy\"]", "\"expressive_therapy\", \"peer_support\"]");
    edit(&mappings_dir.join("session.to-fhir.toml"), "[codes.modality]\n", "[codes.modality]\npeer_support = { system = \"http://iop-gateway.org/fhir/CodeSystem/session-modality\", code = \"peer-support\" }\n");
    let session = work.join("session.json");
    let text = std::fs::read_to_string(Path::new(ROOT).join("tests/fixtures/iop/session/attended.json")).unwrap().replace("\"group_therapy\"", "\"peer_support\"");
    std::fs::write(&session, text).unwrap();
    let run = |args: &[&str]| Command::new(binary).current_dir(ROOT).args(args).output().unwrap();
    let (mappings_arg, profiles_arg, session_arg) = (mappings_dir.to_str().unwrap(), profiles.to_str().unwrap(), session.to_str().unwrap());
    // With the bundled profiles the new code is outside the session-modality ValueSet, refused at load.
    let bundled = run(&["mappings", "check", "--mappings", mappings_arg]);
    let stdout = String::from_utf8_lossy(&bundled.stdout);
    assert_eq!(bundled.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("session.to-fhir.toml") && stdout.contains("'peer-support' is not in the required ValueSet"), "{stdout}");
    // The edited copy replaces the bundled package: the check passes, on that copy, and the session maps.
    let edited = run(&["mappings", "check", "--mappings", mappings_arg, "--ig", profiles_arg]);
    let stdout = String::from_utf8_lossy(&edited.stdout);
    assert_eq!(edited.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(&format!("in {profiles_arg}")), "{stdout}");
    let mapped = run(&["map", "--from", "iop", "--to", "fhir", "--mappings", mappings_arg, "--ig", profiles_arg, session_arg]);
    assert_eq!(mapped.status.code(), Some(0), "{}", String::from_utf8_lossy(&mapped.stderr));
    assert!(String::from_utf8_lossy(&mapped.stdout).contains("\"peer-support\""));
    // A syntax error in the edited copy is named rather than the file silently left out.
    edit(&profiles.join("CodeSystem-session-modality.json"), "\"peer-support\",", "\"peer-support\"");
    let broken = run(&["mappings", "check", "--mappings", mappings_arg, "--ig", profiles_arg]);
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("CodeSystem-session-modality.json"), "{stdout}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The profiles of `profiles/` and the implementation guides each kind of mapped resource must claim
/// (an IOP profile first, then the national ones it is compatible with).
const CLAIMS: &[(&str, &[&str])] = &[
    ("Encounter", &["http://iop-gateway.org/fhir/StructureDefinition/iop-session", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter"]),
    ("Task", &["http://iop-gateway.org/fhir/StructureDefinition/iop-referral-task", "http://hl7.org/fhir/us/bser/StructureDefinition/ReferralTask"]),
    ("EpisodeOfCare", &["http://iop-gateway.org/fhir/StructureDefinition/iop-enrollment"]),
    ("CarePlan", &["http://iop-gateway.org/fhir/StructureDefinition/iop-care-plan", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-careplan"]),
    // A discharge's aftercare plan is no IOP treatment plan (no schedule, goals or review dates).
    ("CarePlan", &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-careplan"]),
    ("Goal", &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-goal"]),
    ("DiagnosticReport", &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-lab"]),
    ("Claim", &["http://iop-gateway.org/fhir/StructureDefinition/iop-authorization", "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim"]),
    ("Composition", &["http://iop-gateway.org/fhir/StructureDefinition/iop-discharge-summary"]),
    ("Consent", &["http://iop-gateway.org/fhir/StructureDefinition/iop-consent"]),
    ("MedicationRequest", &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest"]),
];

/// Every resource of every fixture claims at least one profile, each claimed profile is loaded (so it was
/// really checked), and the kinds with an IOP profile claim it with its US Core, PAS or BSeR counterpart.
#[test]
fn every_resource_claims_its_iop_and_national_profiles() {
    let definitions = definitions();
    for dir in concept_dirs() {
        let bundle = map_files(&fixture_files(&dir));
        for entry in bundle["entry"].as_array().unwrap() {
            let resource = &entry["resource"];
            let resource_type = resource["resourceType"].as_str().unwrap();
            let claimed: Vec<&str> = resource["meta"]["profile"].as_array().map(|p| p.iter().filter_map(Json::as_str).collect()).unwrap_or_default();
            let label = format!("{dir}: {resource_type}/{}", resource["id"].as_str().unwrap());
            assert!(!claimed.is_empty() || resource_type == "Appointment", "{label} claims no profile");
            for url in &claimed {
                assert!(definitions.structure(url).is_some(), "{label}: {url} is not loaded");
            }
            let wanted: Vec<&[&str]> = CLAIMS.iter().filter(|(t, _)| *t == resource_type).map(|(_, w)| *w).collect();
            if !wanted.is_empty() {
                assert!(wanted.contains(&claimed.as_slice()), "{label}: {claimed:?}, expected one of {wanted:?}");
            }
            let is_panel_or_total = resource_type == "Observation" && (resource.get("hasMember").is_some() || resource.get("valueQuantity").is_some() && claimed.len() > 1);
            let is_care_plan_activity = resource_type == "ServiceRequest" && claimed.len() == 1;
            if is_panel_or_total || resource_type == "ServiceRequest" && !is_care_plan_activity {
                assert!(claimed[0].starts_with("http://iop-gateway.org/fhir/StructureDefinition/iop-"), "{label}: {claimed:?}");
                assert!(claimed.len() >= 2, "{label}: an IOP profile and its national counterpart: {claimed:?}");
            }
        }
    }
}

/// The error messages one resource gets against one profile.
fn profile_errors(resource: &Json, profile: &str) -> Vec<String> {
    let validator = Validator::new(definitions());
    let report = validator.validate_json(resource, &[profile.to_string()]);
    report.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect()
}

/// The first resource of a fixture's output that satisfies `pick`.
fn mapped_resource(fixture: &str, pick: impl Fn(&Json) -> bool) -> Json {
    let bundle = map_files(&[Path::new(ROOT).join("tests/fixtures/iop").join(fixture)]);
    bundle["entry"].as_array().unwrap().iter().map(|e| e["resource"].clone()).find(|r| pick(r)).expect("the fixture maps to such a resource")
}

/// The value at a path of member names and array indexes (`["code", "coding", "0"]`).
fn at<'a>(json: &'a mut Json, path: &[&str]) -> &'a mut Json {
    path.iter().fold(json, |node, step| match node {
        Json::Object(object) => object.get_mut(step).expect("member present"),
        Json::Array(items) => &mut items[step.parse::<usize>().expect("an index")],
        _ => panic!("no {step} below a scalar"),
    })
}

const IOP: &str = "http://iop-gateway.org/fhir/StructureDefinition/";

#[test]
fn the_iop_profiles_reject_what_they_exist_to_reject() {
    let has_code = |code: &'static str| move |r: &Json| r["code"]["coding"].as_array().and_then(|c| c.first()).and_then(|c| c["code"].as_str()) == Some(code);
    // A PHQ-9 total above 27.
    let mut total = mapped_resource("screening/phq9.json", has_code("44261-6"));
    let profile = format!("{IOP}iop-screening-phq9-total");
    assert_eq!(profile_errors(&total, &profile), Vec::<String>::new());
    *at(&mut total, &["valueQuantity", "value"]) = Json::Number("28".into());
    let errors = profile_errors(&total, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-phq9-total-1")), "{errors:#?}");
    // A PHQ-9 panel missing a member.
    let mut panel = mapped_resource("screening/phq9.json", has_code("44249-1"));
    let profile = format!("{IOP}iop-screening-phq9");
    assert_eq!(profile_errors(&panel, &profile), Vec::<String>::new());
    if let Json::Array(members) = at(&mut panel, &["hasMember"]) {
        members.pop();
    }
    let errors = profile_errors(&panel, &profile);
    assert!(errors.iter().any(|e| e.contains("hasMember")), "{errors:#?}");
    // A GAD-7 code on a PHQ-9 panel.
    let mut panel = mapped_resource("screening/phq9.json", has_code("44249-1"));
    *at(&mut panel, &["code", "coding", "0", "code"]) = Json::string("69737-5");
    assert!(!profile_errors(&panel, &profile).is_empty());
    // A positive C-SSRS screener that lost its critical flag.
    let mut cssrs = mapped_resource("screening/cssrs-positive.json", |r| r.get("hasMember").is_some());
    let profile = format!("{IOP}iop-screening-cssrs");
    assert_eq!(profile_errors(&cssrs, &profile), Vec::<String>::new());
    assert_eq!(pick(&cssrs, "interpretation.1.coding.0.code").as_str(), Some("AA"));
    if let Json::Array(interpretations) = at(&mut cssrs, &["interpretation"]) {
        interpretations.pop();
    }
    let errors = profile_errors(&cssrs, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-cssrs-1")), "{errors:#?}");
    // A session without its attendance.
    let mut encounter = mapped_resource("session/attended.json", |r| r["resourceType"].as_str() == Some("Encounter"));
    let profile = format!("{IOP}iop-session");
    assert_eq!(profile_errors(&encounter, &profile), Vec::<String>::new());
    if let Json::Array(types) = at(&mut encounter, &["type"]) {
        types.pop();
    }
    let errors = profile_errors(&encounter, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-ses-2")), "{errors:#?}");
    // A referral without a performer, as BSeR and the IOP profile both require one.
    let mut referral = mapped_resource("referral/inbound.json", |r| r["resourceType"].as_str() == Some("ServiceRequest"));
    let profile = format!("{IOP}iop-referral");
    assert_eq!(profile_errors(&referral, &profile), Vec::<String>::new());
    referral.as_object_mut().unwrap().remove("performer");
    assert!(profile_errors(&referral, &profile).iter().any(|e| e.contains("performer")));
    assert!(profile_errors(&referral, "http://hl7.org/fhir/us/bser/StructureDefinition/ReferralServiceRequest").iter().any(|e| e.contains("performer")));
    // A program schedule of 5 days × 4 hours, above the 15 hours a week of an IOP.
    let is_schedule = |r: &Json| r["meta"]["profile"].as_array().is_some_and(|p| p[0].as_str() == Some("http://iop-gateway.org/fhir/StructureDefinition/iop-care-plan-schedule"));
    let mut schedule = mapped_resource("care_plan/active.json", is_schedule);
    let profile = format!("{IOP}iop-care-plan-schedule");
    assert_eq!(profile_errors(&schedule, &profile), Vec::<String>::new());
    *at(&mut schedule, &["occurrenceTiming", "repeat", "frequency"]) = Json::Number("5".into());
    *at(&mut schedule, &["occurrenceTiming", "repeat", "duration"]) = Json::Number("4".into());
    let errors = profile_errors(&schedule, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-sched-1")), "{errors:#?}");
    // A custom track without its end time, and one that ends before it starts.
    let mut custom = mapped_resource("enrollment/discharged-sud.json", |r| r["resourceType"].as_str() == Some("EpisodeOfCare"));
    let profile = format!("{IOP}iop-enrollment");
    assert_eq!(profile_errors(&custom, &profile), Vec::<String>::new());
    let track_index = custom["extension"].as_array().unwrap().iter().position(|e| e["url"].as_str() == Some(&format!("{IOP}iop-track"))).unwrap().to_string();
    let mut backwards = custom.clone();
    *at(&mut backwards, &["extension", &track_index, "extension", "2", "valueTime"]) = Json::string("15:00:00");
    assert_eq!(pick(&backwards, &format!("extension.{track_index}.extension.2.url")).as_str(), Some("end"));
    let errors = profile_errors(&backwards, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-track-2")), "{errors:#?}");
    if let Json::Array(parts) = at(&mut custom, &["extension", &track_index, "extension"]) {
        parts.pop();
    }
    let errors = profile_errors(&custom, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-track-1")), "{errors:#?}");
    // An enrollment without its level of care.
    let mut enrollment = mapped_resource("enrollment/active.json", |r| r["resourceType"].as_str() == Some("EpisodeOfCare"));
    let profile = format!("{IOP}iop-enrollment");
    assert_eq!(profile_errors(&enrollment, &profile), Vec::<String>::new());
    if let Json::Array(types) = at(&mut enrollment, &["type"]) {
        types.pop();
    }
    let errors = profile_errors(&enrollment, &profile);
    assert!(errors.iter().any(|e| e.contains("iop-enr-2")), "{errors:#?}");
}

// ----- authorization requests (Da Vinci PAS) -----

const PAS: &str = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/";

fn resources_of<'a>(bundle: &'a Json, resource_type: &str) -> Vec<&'a Json> {
    bundle["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).filter(|r| r["resourceType"].as_str() == Some(resource_type)).collect()
}

fn records_of(records: &[Json], record_type: &str) -> Vec<String> {
    let mut texts: Vec<String> =
        records.iter().filter(|r| r["record_type"].as_str() == Some(record_type)).map(|r| serde_json::Value::from(r).to_string()).collect();
    texts.sort();
    texts
}

#[test]
fn the_pas_request_bundle_is_the_claim_and_everything_it_references() {
    let bundle = map_files(&[Path::new(ROOT).join("tests/fixtures/iop/authorization/initial.json")]);
    let claim = resources_of(&bundle, "Claim")[0];
    let request = resources_of(&bundle, "Bundle")[0];
    assert_eq!(request["type"].as_str(), Some("collection"));
    let nested = request["entry"].as_array().unwrap();
    // Claim first; then the Patient, payer, provider, supporting total, Coverage and, through the total, its QuestionnaireResponse.
    assert_eq!(nested[0]["resource"], *claim);
    let mut kinds: Vec<&str> = nested.iter().map(|e| e["resource"]["resourceType"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(kinds, ["Claim", "Coverage", "Observation", "Organization", "Organization", "Patient", "QuestionnaireResponse"]);
    // Every reference inside resolves inside, each resource once, and nothing is a transaction entry.
    let urls: HashSet<&str> = nested.iter().map(|e| e["fullUrl"].as_str().unwrap()).collect();
    assert_eq!(urls.len(), nested.len());
    let mut references = Vec::new();
    let mut problems = Vec::new();
    collect(request, "Bundle", &mut references, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    for (path, reference) in references {
        assert!(urls.contains(reference.as_str()), "{path}: {reference}");
    }
    assert!(nested.iter().all(|e| e.get("request").is_none()));
    // Sequence numbers: diagnoses 1..n, cross-referenced by the item; the supporting score.
    assert_eq!(claim["diagnosis"].as_array().unwrap().iter().map(|d| d["sequence"].to_string()).collect::<Vec<_>>(), ["1", "2"]);
    assert_eq!(pick(claim, "item.0.diagnosisSequence").to_string_compact(), "[1,2]");
    assert_eq!(pick(claim, "supportingInfo.0.sequence").to_string(), "1");
    // Codes only: no display text for HCPCS, NUBC or X12 codes anywhere in the Claim.
    assert!(!claim.to_string_compact().contains("\"display\""));
    // The Claim and the Bundle validate against PAS 2.2.1 and the IOP profile.
    for (resource, profile) in [(claim, format!("{IOP}iop-authorization")), (claim, format!("{PAS}profile-claim")), (request, format!("{PAS}profile-pas-request-bundle"))] {
        let report = Validator::new(definitions()).validate_json(resource, std::slice::from_ref(&profile));
        assert_eq!(errors_of(&report), Vec::<String>::new(), "{profile}");
        assert!(!profile_not_loaded(&report), "{profile}: {:#?}", report.issues);
    }
}

#[test]
fn the_iop_authorization_profile_rejects_a_request_without_days_or_program() {
    let bundle = map_files(&[Path::new(ROOT).join("tests/fixtures/iop/authorization/initial.json")]);
    let claim = resources_of(&bundle, "Claim")[0].clone();
    let profile = format!("{IOP}iop-authorization");
    let mut no_days = claim.clone();
    at(&mut no_days, &["item", "0"]).as_object_mut().unwrap().remove("quantity");
    assert!(profile_errors(&no_days, &profile).iter().any(|e| e.contains("quantity")));
    let mut other_service = claim.clone();
    *at(&mut other_service, &["item", "0", "productOrService", "coding", "0", "code"]) = Json::string("H2019");
    assert!(profile_errors(&other_service, &profile).iter().any(|e| e.contains("iop-auth-1")));
    let mut backwards = claim;
    *at(&mut backwards, &["item", "0", "servicedPeriod", "end"]) = Json::string("2026-01-01");
    assert!(profile_errors(&backwards, &profile).iter().any(|e| e.contains("iop-auth-5")));
}

#[test]
fn a_substance_use_extension_quotes_the_certification_and_sends_no_unverified_revenue_code() {
    let bundle = map_files(&[Path::new(ROOT).join("tests/fixtures/iop/authorization/extension-sud.json")]);
    let claim = resources_of(&bundle, "Claim")[0];
    let item = pick(claim, "item.0");
    assert_eq!(pick(item, "productOrService.coding.0.code").as_str(), Some("H0015"));
    assert!(item.get("revenue").is_none());
    let number = item["extension"].as_array().unwrap().iter().find(|e| e["url"].as_str() == Some(&format!("{PAS}extension-authorizationNumber"))).unwrap();
    assert_eq!(number["valueString"].as_str(), Some("CERT-55120"));
    // No supporting scores: no supportingInfo at all, rather than an empty one.
    assert!(claim.get("supportingInfo").is_none());
}

#[test]
fn a_request_without_its_client_is_refused_rather_than_sent_incomplete() {
    let all = records(&Path::new(ROOT).join("tests/fixtures/iop/authorization/initial.json"));
    let without_client: Vec<Json> = all.into_iter().filter(|r| r["record_type"].as_str() != Some("client")).collect();
    let mapped = mappings().records_to_fhir(&without_client);
    assert!(mapped.has_errors());
    let messages: Vec<String> = mapped.issues.iter().map(ToString::to_string).collect();
    assert!(messages.iter().any(|m| m.contains("Bundle/") && m.contains("the collection needs urn:uuid:")), "{messages:#?}");
}

#[test]
fn round_trip_keeps_every_mapped_authorization_field() {
    let mut files = fixture_files("authorization");
    files.push(Path::new(ROOT).join("tests/fixtures/iop/episode/authorization.json"));
    for file in files {
        let mut sent = records(&file);
        if file.parent().is_some_and(|p| p.ends_with("episode")) {
            // The episode's requests need the client and the screenings they cite.
            for concept in ["client", "screening", "session", "enrollment", "referral"] {
                sent.extend(records(&Path::new(ROOT).join(format!("tests/fixtures/iop/episode/{concept}.json"))));
            }
        }
        let bundle = mappings().records_to_fhir(&sent);
        assert!(!bundle.has_errors(), "{}: {:#?}", file.display(), bundle.issues);
        let back = mappings().fhir_to_records(&bundle.output);
        assert!(!back.has_errors(), "{:#?}", back.issues);
        assert_eq!(records_of(&back.output, "authorization"), records_of(&sent, "authorization"), "{}", file.display());
    }
}

/// An inbound referral as another hospital's EHR writes it: its own ids and identifier systems, absolute
/// RESTful full URLs with relative references, another entry order, the HCPCS code with text beside it,
/// and a Consent among supportingInfo. BSeR-conformant, and read into one referral record.
#[test]
fn a_referral_written_by_another_hospital_is_read() {
    let file = Path::new(ROOT).join("tests/fixtures/bser/referral-from-northfield.json");
    let input = json::parse(&std::fs::read(&file).unwrap()).unwrap();
    let report = Validator::new(definitions()).validate_json(&input, &[]);
    assert_eq!(errors_of(&report), Vec::<String>::new());
    assert!(!profile_not_loaded(&report), "{:#?}", report.issues);
    let mapped = mappings().fhir_to_records(&input);
    assert!(!mapped.has_errors(), "{:#?}", mapped.issues);
    assert_eq!(mapped.output.len(), 1, "{:#?}", mapped.output);
    let referral = &mapped.output[0];
    // The sender knows no client id of ours, writes no direction category, and names us by its own identifier.
    assert!(referral.get("client_id").is_none());
    assert_eq!(
        (referral["id"].as_str(), referral["direction"].as_str(), referral["status"].as_str(), referral["program"].as_str(), referral["urgency"].as_str()),
        (Some("NF-RX-88213"), Some("inbound"), Some("requested"), Some("mental_health_iop"), Some("asap"))
    );
    assert_eq!(pick(referral, "consent_ids.0").as_str(), Some("NF-ROI-2026-0311"));
    assert_eq!(pick(referral, "sending_facility.contact_phone").as_str(), Some("555-0177"));
    insta::assert_json_snapshot!("referral__from-northfield", serde_json::Value::from(referral));
}

/// A step-down provider's answer: the outbound referral's Task declined with a reason (BSeR 4.0) reads back as
/// the referral declined with that reason, everything else of the record as the program sent it.
#[test]
fn a_declined_step_down_task_reads_back_as_a_declined_referral_with_its_reason() {
    let sent = records(&Path::new(ROOT).join("tests/fixtures/iop/referral/outbound-minimal.json"));
    let mapped = mappings().records_to_fhir(&sent);
    assert!(!mapped.has_errors(), "{:#?}", mapped.issues);
    let mut bundle = serde_json::Value::from(&mapped.output);
    for entry in bundle["entry"].as_array_mut().unwrap() {
        let resource = &mut entry["resource"];
        if resource["resourceType"] == "Task" {
            resource["status"] = serde_json::json!("rejected");
            resource["businessStatus"]["coding"][0]["code"] = serde_json::json!("4.0");
            resource["statusReason"] = serde_json::json!({"text": "No weekly openings until May."});
        }
    }
    let input = Json::from(&bundle);
    let report = Validator::new(definitions()).validate_json(&input, &[]);
    assert_eq!(errors_of(&report), Vec::<String>::new());
    let back = mappings().fhir_to_records(&input);
    assert!(!back.has_errors(), "{:#?}", back.issues);
    let referral = &back.output[0];
    assert_eq!((referral["status"].as_str(), referral["status_reason"].as_str(), referral["direction"].as_str()), (Some("declined"), Some("No weekly openings until May."), Some("outbound")));
    insta::assert_json_snapshot!("referral__step-down-declined", serde_json::Value::from(referral));
}

// ----- payer decisions (PAS ClaimResponse) -----

fn decision_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("tests/fixtures/pas")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn payer_decisions_are_read_from_pas_responses() {
    let validator = Validator::new(definitions());
    let mut outcomes = Vec::new();
    for file in decision_fixtures() {
        let input = json::parse(&std::fs::read(&file).unwrap()).unwrap();
        // The fixtures are real PAS shapes: the response Bundle and its ClaimResponse validate against PAS 2.2.1.
        let report = validator.validate_json(&input, &[]);
        assert_eq!(errors_of(&report), Vec::<String>::new(), "{}", file.display());
        assert!(!profile_not_loaded(&report), "{:#?}", report.issues);
        let mapped = mappings().fhir_to_records(&input);
        assert!(!mapped.has_errors(), "{}: {:#?}", file.display(), mapped.issues);
        assert_eq!(mapped.output.len(), 1, "{}: one decision per ClaimResponse", file.display());
        let decision = &mapped.output[0];
        outcomes.push(decision["outcome"].as_str().unwrap().to_string());
        let name = format!("decision__{}", file.file_stem().unwrap().to_string_lossy());
        insta::assert_json_snapshot!(name, serde_json::Value::from(decision));
    }
    outcomes.sort();
    assert_eq!(outcomes, ["certified", "not_certified", "pended"]);
}

#[test]
fn a_review_action_the_mapping_does_not_know_is_refused_with_its_path() {
    let file = Path::new(ROOT).join("tests/fixtures/pas/decision-certified.json");
    let text = std::fs::read_to_string(&file).unwrap().replace("\"code\": \"A1\"", "\"code\": \"A2\"");
    assert!(text.contains("A2"));
    let mapped = mappings().fhir_to_records(&json::parse(text.as_bytes()).unwrap());
    assert!(mapped.has_errors());
    let messages: Vec<String> = mapped.issues.iter().map(ToString::to_string).collect();
    assert!(messages.iter().any(|m| m.contains("'A2' has no entry in the code map 'review_action'") && m.contains("ClaimResponse.item[0].adjudication[0]")), "{messages:#?}");
    // A certified decision without its number is not a decision the program can act on.
    let text = std::fs::read_to_string(&file).unwrap().replace("\"valueString\": \"CERT-77-2001-A\"", "\"valueString\": \"\"");
    let mapped = mappings().fhir_to_records(&json::parse(text.as_bytes()).unwrap());
    assert!(mapped.has_errors(), "{:#?}", mapped.output);
}

// ----- discharge and the step-down summary -----

#[test]
fn the_discharge_finishes_the_enrollment_and_the_step_down_referral_carries_the_summary() {
    let bundle = map_files(&[Path::new(ROOT).join("tests/fixtures/iop/discharge/completed-with-summary.json")]);
    let episode = resources_of(&bundle, "EpisodeOfCare")[0];
    assert_eq!((episode["status"].as_str(), episode["period"]["end"].as_str()), (Some("finished"), Some("2026-02-27")));
    let plan = resources_of(&bundle, "CarePlan").into_iter().find(|p| p["identifier"].as_array().is_some()).unwrap();
    assert_eq!((plan["status"].as_str(), plan["period"]["end"].as_str()), (Some("completed"), Some("2026-02-27")));
    // Goals assessed at discharge replace the care plan's in-progress status.
    let achievements: Vec<&str> = resources_of(&bundle, "Goal").iter().map(|g| pick(g, "achievementStatus.coding.0.code").as_str().unwrap()).collect();
    assert_eq!(achievements, ["achieved", "not-achieved"]);
    assert!(resources_of(&bundle, "Goal").iter().all(|g| g["achievementStatus"]["coding"].as_array().unwrap().len() == 1));
    // The outbound referral's supportingInfo is the summary Bundle: the Composition first, then what it references.
    let referral = resources_of(&bundle, "ServiceRequest").into_iter().find(|r| pick(r, "category.0.coding.0.code").as_str() == Some("outbound")).unwrap();
    let summary_url = pick(referral, "supportingInfo.0.reference").as_str().unwrap();
    let summary = bundle["entry"].as_array().unwrap().iter().find(|e| e["fullUrl"].as_str() == Some(summary_url)).unwrap();
    let nested = summary["resource"]["entry"].as_array().unwrap();
    assert_eq!(nested[0]["resource"]["resourceType"].as_str(), Some("Composition"));
    let sections: Vec<(&str, usize)> = nested[0]["resource"]["section"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["title"].as_str().unwrap(), s["entry"].as_array().map_or(0, <[Json]>::len)))
        .collect();
    assert_eq!(sections, [("Attendance", 1), ("Instrument trends", 2), ("Goals", 2), ("Medications", 1), ("Aftercare plan", 1)]);
    let kinds: HashSet<&str> = nested.iter().map(|e| e["resource"]["resourceType"].as_str().unwrap()).collect();
    for kind in ["Observation", "Goal", "MedicationRequest", "CarePlan", "Patient", "Organization"] {
        assert!(kinds.contains(kind), "{kind} missing from the summary: {kinds:?}");
    }
    // The attendance figures are structured, not prose.
    let attendance = resources_of(&bundle, "Observation").into_iter().find(|o| o.get("valueRatio").is_some()).unwrap();
    assert_eq!((attendance["valueRatio"]["numerator"]["value"].to_string(), attendance["valueRatio"]["denominator"]["value"].to_string()), ("22".into(), "24".into()));
    // The referral with its summary still satisfies BSeR (supportingInfo may only reference a Consent or a Bundle).
    let profile = "http://hl7.org/fhir/us/bser/StructureDefinition/ReferralServiceRequest";
    assert_eq!(profile_errors(referral, profile), Vec::<String>::new());
    let mut bad = referral.clone();
    *at(&mut bad, &["supportingInfo", "0", "reference"]) = Json::string(format!("Observation/{}", attendance["id"].as_str().unwrap()));
    assert!(!profile_errors(&bad, profile).is_empty());
}

#[test]
fn a_discharge_without_its_enrollment_is_an_error() {
    let all = records(&Path::new(ROOT).join("tests/fixtures/iop/discharge/stepped-up-minimal.json"));
    let without_enrollment: Vec<Json> = all.into_iter().filter(|r| r["record_type"].as_str() != Some("enrollment")).collect();
    let mapped = mappings().records_to_fhir(&without_enrollment);
    let messages: Vec<String> = mapped.issues.iter().filter(|i| i.severity.is_error()).map(ToString::to_string).collect();
    assert!(messages.iter().any(|m| m.contains("EpisodeOfCare/") && m.contains("adds to a resource that no record of the batch produced")), "{messages:#?}");
    assert!(resources_of(&mapped.output, "EpisodeOfCare").is_empty());
}

#[test]
fn the_attendance_profile_rejects_more_sessions_attended_than_scheduled() {
    let mut attendance = mapped_resource("discharge/stepped-up-minimal.json", |r| r.get("valueRatio").is_some());
    let profile = format!("{IOP}iop-discharge-attendance");
    assert_eq!(profile_errors(&attendance, &profile), Vec::<String>::new());
    *at(&mut attendance, &["valueRatio", "numerator", "value"]) = Json::Number("10".into());
    assert!(profile_errors(&attendance, &profile).iter().any(|e| e.contains("iop-att-1")));
}

// ----- 42 CFR Part 2 consent -----

#[test]
fn the_part2_consent_names_recipient_purpose_and_period_and_bser_patient_consent_does_not_fit() {
    let consent = mapped_resource("consent/part2-to-step-down.json", |r| r["resourceType"].as_str() == Some("Consent"));
    let profile = format!("{IOP}iop-consent");
    assert_eq!(profile_errors(&consent, &profile), Vec::<String>::new());
    assert_eq!(pick(&consent, "provision.actor.0.role.coding.0.code").as_str(), Some("IRCP"));
    assert_eq!(pick(&consent, "provision.purpose.0.code").as_str(), Some("TREAT"));
    // The client signs a Part 2 consent; BSeR's PatientConsent only allows a RelatedPerson performer. Outside its
    // Bundle the performer's urn:uuid says no type, so it is written as the Patient/id it resolves to there.
    let mut typed = consent.clone();
    let patient_id = pick(&consent, "performer.0.reference").as_str().unwrap().trim_start_matches("urn:uuid:").to_string();
    *at(&mut typed, &["performer", "0", "reference"]) = Json::string(format!("Patient/{patient_id}"));
    let bser = profile_errors(&typed, "http://hl7.org/fhir/us/bser/StructureDefinition/BSeR-PatientConsent");
    assert!(bser.iter().any(|e| e.contains("performer")), "{bser:#?}");
    let mut open_ended = consent.clone();
    at(&mut open_ended, &["provision", "period"]).as_object_mut().unwrap().remove("end");
    assert!(profile_errors(&open_ended, &profile).iter().any(|e| e.contains("iop-con-2")));
    let mut other_law = consent;
    *at(&mut other_law, &["policyRule", "coding", "0", "code"]) = Json::string("OPTIN");
    assert!(profile_errors(&other_law, &profile).iter().any(|e| e.contains("iop-con-1")));
}

// ----- engine features at load -----

#[test]
fn collect_merge_and_position_are_checked_at_load() {
    let head = "record = \"authorization\"\ndirection = \"to-fhir\"\n\n[[resource]]\nname = \"claim\"\ntype = \"Claim\"\nid = \"authorization:{id}\"\nrules = [\n\
        { path = \"status\", value = \"active\" },\n{ path = \"type.coding[0].code\", value = \"institutional\" },\n{ path = \"use\", value = \"preauthorization\" },\n\
        { path = \"patient\", ref = \"Patient\", id = \"client:{client_id}\" },\n{ path = \"created\", from = \"submitted_at\" },\n\
        { path = \"provider\", ref = \"Organization\", id = \"facility:{provider.id}\" },\n{ path = \"priority.text\", value = \"normal\" },\n\
        { path = \"insurance[0].sequence\", value = 1 },\n{ path = \"insurance[0].focal\", value = true },\n{ path = \"insurance[0].coverage\", ref = \"Coverage\", id = \"coverage:{client_id}\" },\n";
    // Line 19: a position that does not number an array.
    let message = load_error("authorization.to-fhir.toml", &format!("{head}{{ path = \"diagnosis[*].sequence\", position = \"units\" }},\n]\n"));
    assert!(message.contains("authorization.to-fhir.toml:19:") && message.contains("'position' numbers the elements of a record array"), "{message}");
    // A collection Bundle that does not say it is one.
    let bundle = "\n[[resource]]\nname = \"request\"\ntype = \"Bundle\"\nid = \"authorization:{id}:request\"\ncollect = \"claim\"\nrules = [{ path = \"type\", value = \"batch\" }]\n";
    let message = load_error("authorization.to-fhir.toml", &format!("{head}]\n{bundle}"));
    assert!(message.contains("a 'collect' Bundle sets { path = \"type\", value = \"collection\" }"), "{message}");
    // A collection that starts from a resource the file does not have.
    let message = load_error("authorization.to-fhir.toml", &format!("{head}]\n{}", bundle.replace("collect = \"claim\"", "collect = \"clam\"").replace("batch", "collection")));
    assert!(message.contains("no resource named 'clam' in this file"), "{message}");
    // A reference per element needs a [*] target to put them in.
    let message = load_error("authorization.to-fhir.toml", &format!("{head}{{ path = \"supportingInfo[0].valueReference\", ref = \"Observation\", id = \"screening:{{supporting_scores[*].screening_id}}:total\" }},\n]\n"));
    assert!(message.contains("authorization.to-fhir.toml:19:") && message.contains("unbound [*]"), "{message}");
}

/// The mappings compiled into the binary are the folder's: `serve` maps with them when no folder is configured.
#[test]
fn bundled_mappings_are_the_folder() {
    let definitions = Definitions::new_default();
    let folder = MappingSet::load(&Path::new(ROOT).join("mappings"), &definitions).unwrap_or_else(|e| panic!("{e}"));
    let bundled = MappingSet::bundled(&definitions).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bundled.to_fhir.keys().collect::<Vec<_>>(), folder.to_fhir.keys().collect::<Vec<_>>());
    assert_eq!(bundled.from_fhir.keys().collect::<Vec<_>>(), folder.from_fhir.keys().collect::<Vec<_>>());
    assert_eq!(bundled.schemas.by_type.keys().collect::<Vec<_>>(), folder.schemas.by_type.keys().collect::<Vec<_>>());
    let records = records(&Path::new(ROOT).join("tests/fixtures/iop/authorization/initial.json"));
    assert_eq!(bundled.records_to_fhir(&records).output, folder.records_to_fhir(&records).output);
    assert!(!bundled.to_fhir.is_empty());
}
