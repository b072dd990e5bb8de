//! The `iop-gateway` binary as a user runs it: exit codes, output formats and error messages.

use std::path::Path;
use std::process::{Command, Output};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fhir");

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iop-gateway")).args(args).output().expect("run iop-gateway")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn valid_folder_exits_zero_with_a_summary() {
    let output = run(&["validate", &format!("{FIXTURES}/valid")]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("3 file(s): 3 valid, 0 invalid"), "{}", stdout(&output));
}

#[test]
fn invalid_files_exit_one_with_located_issues() {
    let output = run(&["validate", &format!("{FIXTURES}/invalid/observation-bad-status.json")]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("Observation.status: "), "{text}");
    assert!(text.contains("only one of"), "{text}");
}

#[test]
fn jsonl_prints_one_operation_outcome_per_file() {
    let output = run(&["validate", "--output", "jsonl", &format!("{FIXTURES}/invalid")]);
    assert_eq!(output.status.code(), Some(1));
    let lines: Vec<serde_json::Value> =
        stdout(&output).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["valid"], false, "{line}");
        assert_eq!(line["outcome"]["resourceType"], "OperationOutcome");
        assert!(line["file"].as_str().is_some());
    }
    let not_json = lines.iter().find(|l| l["file"].as_str().unwrap().ends_with("not-json.json")).unwrap();
    assert_eq!(not_json["outcome"]["issue"][0]["severity"], "fatal");
}

#[test]
fn usage_and_io_problems_exit_two() {
    assert_eq!(run(&["validate", "/nonexistent/file.json"]).status.code(), Some(2));
    assert_eq!(run(&["validate", "--output", "yaml", FIXTURES]).status.code(), Some(2));
    assert_eq!(run(&["validate", "--ig", "/nonexistent.tgz", FIXTURES]).status.code(), Some(2));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn loads_an_ig_package_and_validates_against_its_profile() {
    // The prose-free copy the gateway compiles in is a package like any other.
    let us_core = Path::new(env!("CARGO_MANIFEST_DIR")).join("definitions/hl7.fhir.us.core-6.1.0.tgz");
    let profile = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
    let patient = format!("{FIXTURES}/valid/client-patient.json");
    let without_ig = run(&["validate", "--profile", profile, &patient]);
    assert_eq!(without_ig.status.code(), Some(1), "an unknown profile asked for is an error");
    let with_ig = run(&["validate", "--ig", us_core.to_str().unwrap(), "--profile", profile, "--output", "json", &patient]);
    let report: serde_json::Value = serde_json::from_slice(&with_ig.stdout).expect("json output");
    // US Core requires identifier, name and gender, which the fixture has; it must not claim the profile is missing.
    let text = report.to_string();
    assert!(!text.contains("is not loaded"), "{text}");
}

#[test]
fn fhirpath_prints_the_result_collection() {
    let patient = format!("{FIXTURES}/valid/client-patient.json");
    let output = run(&["fhirpath", "name.given.first() | birthDate", &patient]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON array");
    assert_eq!(result, serde_json::json!(["Alex", "1990-06-15"]));
    let xml = format!("{FIXTURES}/invalid/patient-unknown-element.xml");
    let output = run(&["fhirpath", "id", &xml]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("array"), serde_json::json!(["client-0002"]));
    let bad = run(&["fhirpath", "name.where(", &patient]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid FHIRPath expression"));
}
