//! iop-gateway: a FHIR R4 interoperability gateway for Intensive Outpatient Programs.
//!
//! # Layout
//! - [`json`]: the JSON tree resources are read into (ordered, exact numbers, duplicate keys refused).
//! - [`fhirpath`]: the FHIRPath engine used for invariants, slicing and the `fhirpath` command.

pub mod fhirpath;
pub mod json;
