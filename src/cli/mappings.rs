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
        /// Also check target paths against the profiles of this package (US Core, PAS, …); a package named
        /// `iop-gateway.profiles` (an edited copy of profiles/) is checked and used instead of the bundled one.
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
    let (profiles_label, profiles) = match super::profiles_package(&igs, None) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut n_problems = 0;
    // Every conformance resource of the profiles package in use (the bundled one, or an edited copy given
    // with --ig) must itself be valid FHIR, and every profile must compile.
    let validator = Validator::new(definitions.clone());
    let n_profiles = profiles.resources.len();
    // A package leaves out files that are not JSON resources, so an edited file with a syntax error would
    // silently drop its CodeSystem or profile; name it instead.
    let folder = std::path::Path::new(&profiles_label);
    let given_on_disk = igs.iter().any(|ig| ig.trim_end_matches('/') == profiles_label);
    if given_on_disk && folder.is_dir() {
        let files = super::files_below(folder, &["json"]).unwrap_or_default();
        for file in files.iter().filter(|f| f.file_name().is_some_and(|n| n != "package.json" && n != ".index.json")) {
            let parsed = std::fs::read(file).map_err(|e| e.to_string()).and_then(|bytes| crate::json::parse(&bytes).map_err(|e| e.to_string()));
            match parsed {
                Err(e) => {
                    println!("{}: {e}", file.display());
                    n_problems += 1;
                }
                Ok(json) if json.get("resourceType").and_then(Json::as_str).is_none() => {
                    println!("{}: not a FHIR resource (no resourceType)", file.display());
                    n_problems += 1;
                }
                Ok(_) => {}
            }
        }
    }
    for resource in &profiles.resources {
        let Some(json) = resource.resource() else {
            println!("{profiles_label}/{}: cannot be read", resource.source);
            n_problems += 1;
            continue;
        };
        let report = validator.validate_json(&json, &[]);
        for issue in report.issues.iter().filter(|i| i.severity.is_error()) {
            println!("{profiles_label}/{}: {issue}", resource.source);
            n_problems += 1;
        }
        if resource.resource_type == "StructureDefinition"
            && let Some(url) = json.get("url").and_then(Json::as_str)
            && definitions.structure(url).is_none()
        {
            println!("{profiles_label}/{}: the profile {url} does not compile", resource.source);
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
                "{} record schema(s), {} to-fhir and {} from-fhir mapping(s), {n_profiles} conformance resource(s) in {profiles_label}",
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
