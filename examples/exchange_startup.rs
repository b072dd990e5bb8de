//! Start-up cost of the exchange definitions: builds one definition set, validates one document once, and prints the times and the report's size.
//!
//! Usage: `cargo run --release --example exchange_startup -- r4|default|exchange FILE`
//! (`r4`: the R4 base only; `default`: R4 + `profiles/`, what `validate` loads; `exchange`: that
//! plus the compiled-in US Core 6.1.0 and PAS 2.2.1, what the server loads).
//!
//! One set and one validation per process, so the first validation pays for everything loaded
//! lazily (resource parsing, structure compilation) as a freshly started server does. Run it under
//! `/usr/bin/time -f '%e s %M KB'` for the whole process's wall time and peak memory; compare the
//! modes in the same run, since the machine is shared.

use std::sync::Arc;
use std::time::Instant;

use iop_gateway::definitions::Definitions;
use iop_gateway::validation::Validator;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(file)) = (args.next(), args.next()) else {
        eprintln!("usage: exchange_startup r4|default|exchange FILE");
        std::process::exit(2);
    };
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
    let started = Instant::now();
    let definitions = match mode.as_str() {
        "r4" => Definitions::new_base(),
        "default" => Definitions::new_default(),
        "exchange" => Definitions::new_with_exchange_packages(),
        other => {
            eprintln!("unknown mode {other}: r4, default or exchange");
            std::process::exit(2);
        }
    };
    let built = started.elapsed();
    let validator = Validator::new(Arc::new(definitions));
    let report = validator.validate_bytes(&bytes, &[]);
    let validated = started.elapsed() - built;
    let errors = report.issues.iter().filter(|i| i.severity.is_error()).count();
    let unchecked = report.issues.iter().filter(|i| i.message.contains("is not loaded")).count();
    println!(
        "{mode}: definitions {:.1} ms, first validation {:.1} ms; {} issues, {errors} errors, {unchecked} 'not loaded'",
        built.as_secs_f64() * 1e3,
        validated.as_secs_f64() * 1e3,
        report.issues.len()
    );
}
