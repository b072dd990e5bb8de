//! The validator over public corpora: every official R4 example and the peer harness samples get a verdict without a crash.

use std::sync::Arc;

use iop_gateway::definitions::Definitions;
use iop_gateway::validation::Validator;

fn validator() -> Validator {
    Validator::new(Arc::new(Definitions::new_default()))
}

#[test]
fn official_examples_are_almost_all_valid() {
    let Some(corpus) = super::need::corpus("corpus::official_examples_are_almost_all_valid") else { return };
    let validator = validator();
    let folder = corpus.join("hl7-examples/resources");
    let mut n_files = 0;
    let mut invalid = Vec::new();
    for entry in std::fs::read_dir(folder).expect("hl7-examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        n_files += 1;
        let report = validator.validate_bytes(&std::fs::read(&path).expect("read"), &[]);
        if !report.is_valid() {
            invalid.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(n_files > 700);
    // A handful of official examples are really invalid (e.g. Questionnaire-qs1 items without linkId).
    assert!(invalid.len() <= 10, "too many official examples rejected: {invalid:#?}");
    assert!(invalid.contains(&"Questionnaire-qs1.json".to_string()), "{invalid:?}");
}

#[test]
fn peer_samples_match_their_expected_verdicts() {
    let Some(peers) = super::need::peers("corpus::peer_samples_match_their_expected_verdicts") else { return };
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peers.join("samples-expected.json")).expect("samples-expected.json")).expect("json");
    let validator = validator();
    let mut wrong = Vec::new();
    let entries = expected.as_object().expect("object");
    for (file, expectation) in entries {
        let Some(want_valid) = expectation["valid"].as_bool() else { continue };
        let bytes = std::fs::read(peers.join("samples").join(file)).expect("sample");
        let report = validator.validate_bytes(&bytes, &[]);
        if report.is_valid() != want_valid {
            wrong.push(format!("{file} ({})", expectation["category"]));
        }
    }
    let n_right = entries.len() - wrong.len();
    eprintln!("peer samples: {n_right} of {} right; wrong: {wrong:?}", entries.len());
    // The best peer (google-fhir-r4) gets 46 of 55; we must do better than every peer.
    assert!(n_right >= 47, "only {n_right} of {} samples right: {wrong:#?}", entries.len());
}
