//! Hostile input through the real command: every case ends in an OperationOutcome and exit code 1, never a crash.

use std::process::Command;

/// Writes `bytes` to a fresh temporary file and validates it with `--output jsonl`.
fn validate(name: &str, bytes: &[u8]) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("iop-gateway-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write input");
    let output = Command::new(env!("CARGO_BIN_EXE_iop-gateway"))
        .args(["validate", "--output", "jsonl"])
        .arg(&path)
        .output()
        .expect("run iop-gateway");
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(1), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    assert_eq!(line["valid"], false);
    assert_eq!(line["outcome"]["resourceType"], "OperationOutcome");
    line["outcome"].clone()
}

fn first_message(outcome: &serde_json::Value) -> String {
    outcome["issue"].as_array().into_iter().flatten().filter_map(|i| i["details"]["text"].as_str()).collect::<Vec<_>>().join(" | ")
}

#[test]
fn invalid_utf8_is_located() {
    let outcome = validate("utf8.json", b"{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"\xff\xfe\"}]}");
    assert!(first_message(&outcome).contains("UTF-8"), "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "Patient.name[0].family");
}

#[test]
fn a_100_mb_document_is_refused_cleanly() {
    let mut document = br#"{"resourceType":"Patient","name":[{"family":""#.to_vec();
    document.extend(std::iter::repeat_n(b'a', 100 * 1024 * 1024));
    document.extend_from_slice(br#""}]}"#);
    let outcome = validate("big.json", &document);
    assert!(first_message(&outcome).contains("longer than 1 MB"), "{}", first_message(&outcome));
}

#[test]
fn ten_thousand_deep_nesting_is_refused() {
    let document = format!(r#"{{"resourceType":"Patient","extension":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let outcome = validate("deep.json", document.as_bytes());
    assert!(first_message(&outcome).contains("nests deeper"), "{outcome}");
    let xml = format!(r#"<Patient xmlns="http://hl7.org/fhir">{}{}</Patient>"#, "<extension>".repeat(10_000), "</extension>".repeat(10_000));
    validate("deep.xml", xml.as_bytes());
}

#[test]
fn huge_numbers_and_duplicate_keys_are_issues() {
    let outcome = validate("number.json", br#"{"resourceType":"Patient","multipleBirthInteger":123456789012345678901234567890}"#);
    assert!(first_message(&outcome).contains("out of range"), "{outcome}");
    let outcome = validate("dup.json", br#"{"resourceType":"Patient","gender":"male","gender":"female"}"#);
    assert!(first_message(&outcome).contains("duplicate property 'gender'"), "{outcome}");
}
