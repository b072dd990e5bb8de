//! The one integration test binary: the command line, hostile input, the public corpora, mappings, the server, and repository tidiness.

mod cli;
mod corpus;
mod hostile;
mod mapping;
mod server;
mod tidy;
