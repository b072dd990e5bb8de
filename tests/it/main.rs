//! The one integration test binary: the command line, the public corpora, and repository tidiness.

mod cli;
mod corpus;
mod mapping;
mod tidy;
