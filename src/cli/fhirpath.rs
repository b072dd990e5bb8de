//! `iop-gateway fhirpath EXPRESSION FILE`: evaluates an expression on a resource and prints the result collection as a JSON array.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::definitions::Definitions;
use crate::fhirpath::{self, Context, Node, TypeCache};
use crate::validation::Validator;

use super::EXIT_USAGE;

#[derive(clap::Args)]
pub struct Args {
    /// The FHIRPath expression.
    expression: String,
    /// A FHIR resource in JSON or XML.
    file: PathBuf,
}

pub fn run(args: Args) -> ExitCode {
    let expression = match fhirpath::parse(&args.expression) {
        Ok(expression) => expression,
        Err(e) => {
            eprintln!("error: invalid FHIRPath expression: {e}");
            return ExitCode::from(1);
        }
    };
    let bytes = match std::fs::read(&args.file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let definitions = Definitions::base();
    let validator = Validator::new(definitions.clone());
    let resource = match validator.read(&bytes) {
        Ok((resource, _)) => resource,
        Err(issue) => {
            eprintln!("error: {}: {issue}", args.file.display());
            return ExitCode::from(1);
        }
    };
    let types = TypeCache::new(&*definitions);
    let context = Context::new(&types);
    match expression.evaluate(Node::resource(&resource), &context) {
        Ok(values) => {
            println!("{}", fhirpath::to_json(&values).to_string_pretty());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: evaluation failed: {e}");
            ExitCode::from(1)
        }
    }
}
