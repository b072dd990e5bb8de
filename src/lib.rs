//! iop-gateway: a FHIR R4 interoperability gateway for Intensive Outpatient Programs.
//!
//! # Layout
//! - [`cli`]: the `iop-gateway` command line (the binary's `main` only calls [`cli::run`]).
//! - [`json`]: the JSON tree resources are read into (ordered, exact numbers, duplicate keys refused).
//! - [`package`]: FHIR NPM packages (`.tgz`, folders, the package cache) and the compiled-in R4 base package.
//! - [`definitions`]: canonical resolution and compiled StructureDefinitions (snapshots generated when missing).
//! - [`outcome`]: issues and OperationOutcome, the one shape every problem is reported in.
//! - [`validation`]: the validator (structure, primitives, cardinality, bindings, slicing, references, invariants).
//! - [`fhirpath`]: the FHIRPath engine used for invariants, slicing and the `fhirpath` command.
//! - [`iop`]: IOP-side records (client, session, screening, referral, …) and their JSON Schemas.
//! - [`mapping`]: declarative IOP ↔ FHIR mappings from `mappings/`: loading with located errors, scoring, deterministic ids, evaluation.
//! - [`xml`]: reads FHIR XML into the JSON tree (as FHIR JSON would give it), with located XML-only issues.

pub mod cli;
pub mod definitions;
pub mod fhirpath;
pub mod iop;
pub mod json;
pub mod mapping;
pub mod outcome;
pub mod package;
pub mod validation;
pub mod xml;
