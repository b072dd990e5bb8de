//! `iop-gateway fhirpath EXPRESSION FILE`: evaluates an expression on a resource and prints the result collection as a JSON array.

use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_USAGE;

#[derive(clap::Args)]
pub struct Args {
    /// The FHIRPath expression.
    expression: String,
    /// A FHIR resource in JSON or XML.
    file: PathBuf,
}

pub fn run(args: Args) -> ExitCode {
    eprintln!("error: FHIRPath evaluation of {:?} on {} is not available yet", args.expression, args.file.display());
    ExitCode::from(EXIT_USAGE)
}
