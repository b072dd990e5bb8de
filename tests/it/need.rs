//! What some tests need from outside the repository (the public FHIR corpus, a PostgreSQL server, a Python with the FHIR clients), and the one printed line with which they skip without it.
//!
//! A fresh clone with only Rust passes the suite: these tests skip. `.ci/run` provides them all and
//! sets `IOP_TEST_REQUIRE_ALL=1`, which turns a skip into a failure, so CI never silently loses them.
//! The library's unit tests include this same file (`src/lib.rs`), so both follow one rule.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The PostgreSQL the server tests use unless `IOP_TEST_POSTGRES_URL` names another.
const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The public FHIR corpus: `IOP_TEST_CORPUS`, else `../shared/corpus` beside the checkout.
pub fn corpus(test: &str) -> Option<PathBuf> {
    folder(test, "IOP_TEST_CORPUS", "corpus", "the public FHIR corpus")
}

/// The peer validators' samples and verdicts: `IOP_TEST_PEERS`, else `../shared/peers`.
pub fn peers(test: &str) -> Option<PathBuf> {
    folder(test, "IOP_TEST_PEERS", "peers", "the peer validators' samples")
}

fn folder(test: &str, variable: &str, beside: &str, what: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(variable).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")).join(beside));
    if dir.is_dir() {
        return Some(dir);
    }
    skip(test, &format!("{what}: put ../shared beside the checkout, or set {variable}=DIR"));
    None
}

/// A PostgreSQL URL that answers: `IOP_TEST_POSTGRES_URL`, else the local server's database `test`.
pub fn postgres(test: &str) -> Option<String> {
    let url = postgres_url();
    // postgres://user@host:port/database → host:port
    let authority = url.split("://").nth(1).unwrap_or_default().split('/').next().unwrap_or_default();
    let address = authority.rsplit('@').next().unwrap_or_default();
    let address = if address.contains(':') { address.to_string() } else { format!("{address}:5432") };
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if reachable {
        return Some(url);
    }
    skip(test, &format!("PostgreSQL at {address}: start it, or set IOP_TEST_POSTGRES_URL=postgres://USER@HOST:PORT/DATABASE"));
    None
}

/// The PostgreSQL URL the tests use (whether or not it answers: see [`postgres`]).
pub fn postgres_url() -> String {
    std::env::var("IOP_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES.to_string())
}

/// A Python that has the FHIR clients of `tests/python/requirements.txt`: `IOP_TEST_PYTHON`, else
/// the virtual environment `.ci/run` makes (`target/py-venv`).
pub fn python(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("IOP_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/py-venv/bin/python")));
    let ready = python.is_file()
        && std::process::Command::new(&python).args(["-c", "import fhirpy, fhirclient, jwt, cryptography"]).output().is_ok_and(|o| o.status.success());
    if ready {
        return Some(python);
    }
    skip(test, &format!("a Python with fhirpy and fhirclient at {}: run .ci/run (it makes target/py-venv), or set IOP_TEST_PYTHON=PATH", python.display()));
    None
}

/// Says, in one line the test harness does not swallow, that `test` did not run and what it needs;
/// fails instead under `IOP_TEST_REQUIRE_ALL=1`.
pub fn skip(test: &str, needs: &str) {
    if std::env::var("IOP_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{test} needs {needs} (IOP_TEST_REQUIRE_ALL=1 makes a skip a failure)");
    }
    // Straight to the process' stderr: the harness captures only print!/eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs {needs}");
}
