//! The one integration test binary: the command line, hostile input, the public corpora, mappings, and repository tidiness.

mod cli;
mod corpus;
mod hostile;
mod mapping;
mod tidy;
