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
//! - [`config`]: the server's typed configuration (TOML + environment), validated before anything is bound.
//! - [`server`]: runs the gateway: store, listener (TLS, mutual TLS), graceful shutdown.
//! - [`api`]: the HTTP layer: FHIR REST, transactions, messaging, `$validate`, SMART token endpoint, limits.
//! - [`auth`]: SMART Backend Services (client assertions, scopes), roles and the disclosure policy.
//! - [`search`]: search parameters, index extraction and query parsing.
//! - [`store`]: SQLite/PostgreSQL persistence of resources, versions, index, audit and tokens; the only module that speaks SQL.
//! - [`telemetry`]: logging set-up and Prometheus metrics.
//! - [`xml`]: reads FHIR XML into the JSON tree (as FHIR JSON would give it), with located XML-only issues.

// Every binary linking the library (the gateway, its tests and benchmarks) allocates with mimalloc:
// a write makes many short-lived allocations across worker threads, which glibc's malloc serves slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod definitions;
pub mod exchange;
pub mod export;
pub mod fhirpath;
pub mod iop;
pub mod json;
pub mod mapping;
pub mod outcome;
pub mod package;
pub mod partner;
pub mod search;
pub mod server;
pub mod store;
pub mod telemetry;
// The integration tests' rule for what lies outside the repository, shared so there is one.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/it/need.rs"]
mod need;
pub mod validation;
pub mod xml;
