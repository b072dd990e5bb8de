//! The gateway driven by the real Python FHIR clients (fhirpy, fhirclient; `tests/python/interop.py`) over a real socket: SMART token discovery and client assertions signed in Python, get-or-create, POST search, `count()`, paging, model parsing, and FHIR XML.

use std::path::Path;
use std::process::Command;

use super::support::{Gateway, TempDir};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/interop.py");

/// Runs the script's `checks` as the clinic client against `gw`; panics with its output when a check fails.
async fn run_checks(gw: &Gateway, python: &Path, checks: &[&str]) {
    let dir = TempDir::new("python");
    let key = dir.0.join("clinic.key.pem");
    std::fs::write(&key, &gw.key("clinic").private_pem).unwrap();
    let mut command = Command::new(python);
    command.arg(SCRIPT).args(["--base", &gw.base, "--client", "clinic", "--key"]).arg(&key).args(checks);
    let output = tokio::task::spawn_blocking(move || command.output().expect("run the Python interoperability script")).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the Python clients failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", output.status);
    for check in checks {
        assert!(stdout.lines().any(|l| l == format!("ok {check}")), "{check} did not report ok:\n{stdout}\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirpy_and_fhirclient_drive_the_gateway() {
    let Some(python) = crate::need::python("server::python::fhirpy_and_fhirclient_drive_the_gateway") else { return };
    let gw = Gateway::start().await;
    run_checks(&gw, &python, &["get_or_create", "count", "paging", "post_search", "fhirclient"]).await;
    // What the clients did is what the store holds: get_or_create stored one Patient.
    let token = gw.token("clinic").await;
    let (status, found) = gw.get(&token, "Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-PY-GOC").await;
    assert_eq!((status, &found["total"]), (200, &serde_json::json!(1)), "{found}");
    gw.stop().await;
}

/// Kept apart from the rest: FHIR XML output is the `xml` branch's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_fhir_xml() {
    let Some(python) = crate::need::python("server::python::python_reads_fhir_xml") else { return };
    let gw = Gateway::start().await;
    run_checks(&gw, &python, &["xml"]).await;
    gw.stop().await;
}
