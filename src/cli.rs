//! The command line: argument parsing and dispatch to one module per subcommand. Only this layer prints or chooses exit codes.

mod fhirpath;
mod map;
mod mappings;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a usage or I/O problem (as opposed to "the input is invalid", which is 1).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "iop-gateway", version, about = "FHIR R4 interoperability gateway for Intensive Outpatient Programs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate FHIR resources (JSON or XML files, or folders of them) against R4 and profiles.
    Validate(validate::Args),
    /// Evaluate a FHIRPath expression on a resource and print the result collection as JSON.
    Fhirpath(fhirpath::Args),
    /// Map IOP records to a FHIR Bundle (--from iop --to fhir) or FHIR to IOP records (--from fhir --to iop).
    Map(map::Args),
    /// Work with the mappings folder (`mappings check`).
    Mappings(mappings::Args),
}

/// Runs the command line and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Fhirpath(args) => fhirpath::run(args),
        Command::Map(args) => map::run(args),
        Command::Mappings(args) => mappings::run(args),
    }
}
