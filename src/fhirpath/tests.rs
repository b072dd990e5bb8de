//! Unit tests for the FHIRPath engine.
