//! `iop-gateway mappings check`: loads and lints every mapping and every bundled profile; exit 1 on any problem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::json::Json;
use crate::mapping::MappingSet;
use crate::validation::Validator;

use super::EXIT_USAGE;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Compile every mapping against its record schema and target profiles, and lint profiles/.
    Check {
        /// The mappings folder.
        #[arg(long, value_name = "DIR", default_value = "mappings")]
        mappings: PathBuf,
        /// Also check target paths against the profiles of this package (US Core, PAS, …).
        #[arg(long = "ig", value_name = "PATH|ID#VERSION")]
        igs: Vec<String>,
    },
}

pub fn run(args: Args) -> ExitCode {
    let Action::Check { mappings, igs } = args.action;
    let definitions = match super::load_definitions(&igs, None) {
        Ok(definitions) => Arc::new(definitions),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut n_problems = 0;
    // Every conformance resource of profiles/ must itself be valid FHIR, and every profile must compile.
    let validator = Validator::new(definitions.clone());
    let bundled = crate::package::Package::bundled();
    let n_profiles = bundled.resources.len();
    for resource in &bundled.resources {
        let Some(json) = resource.resource() else {
            println!("profiles/{}: cannot be read", resource.source);
            n_problems += 1;
            continue;
        };
        let report = validator.validate_json(&json, &[]);
        for issue in report.issues.iter().filter(|i| i.severity.is_error()) {
            println!("profiles/{}: {issue}", resource.source);
            n_problems += 1;
        }
        if resource.resource_type == "StructureDefinition"
            && let Some(url) = json.get("url").and_then(Json::as_str)
            && definitions.structure(url).is_none()
        {
            println!("profiles/{}: the profile {url} does not compile", resource.source);
            n_problems += 1;
        }
    }
    for problem in definitions.compile_problems() {
        println!("{problem}");
        n_problems += 1;
    }
    match MappingSet::load(&mappings, &definitions) {
        Ok(set) => {
            println!(
                "{} record schema(s), {} to-fhir and {} from-fhir mapping(s), {n_profiles} bundled conformance resource(s)",
                set.schemas.by_type.len(),
                set.to_fhir.len(),
                set.from_fhir.len()
            );
        }
        Err(e) => {
            for problem in &e.problems {
                println!("{problem}");
            }
            n_problems += e.problems.len();
        }
    }
    if n_problems == 0 {
        println!("mappings and profiles: ok");
        ExitCode::SUCCESS
    } else {
        println!("{n_problems} problem(s)");
        ExitCode::from(1)
    }
}
