//! Where unit tests find the public FHIR corpus (`IOP_TEST_CORPUS`, else `../shared/corpus`), and the one printed line with which they skip without it.
//!
//! The integration tests have the same rule in `tests/it/need.rs`; `.ci/run` sets
//! `IOP_TEST_REQUIRE_ALL=1`, which turns a skip into a failure.

use std::io::Write;
use std::path::PathBuf;

/// The corpus folder, or `None` after saying that `test` is skipped.
pub fn corpus(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("IOP_TEST_CORPUS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus")));
    if dir.is_dir() {
        return Some(dir);
    }
    let needs = "the public FHIR corpus: put ../shared beside the checkout, or set IOP_TEST_CORPUS=DIR";
    if std::env::var("IOP_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{test} needs {needs} (IOP_TEST_REQUIRE_ALL=1 makes a skip a failure)");
    }
    // Straight to the process' stderr: the harness captures only print!/eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs {needs}");
    None
}
