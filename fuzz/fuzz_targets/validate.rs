//! Fuzz target: any bytes given to the validator must produce a report (an OperationOutcome), never a panic, hang or crash.

#![no_main]

use std::sync::{Arc, OnceLock};

use iop_gateway::definitions::Definitions;
use iop_gateway::validation::Validator;
use libfuzzer_sys::fuzz_target;

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| Validator::new(Arc::new(Definitions::new_default())))
}

fuzz_target!(|data: &[u8]| {
    let report = validator().validate_bytes(data, &[]);
    let outcome = report.to_operation_outcome();
    assert_eq!(outcome.get("resourceType").and_then(|t| t.as_str()), Some("OperationOutcome"));
});
