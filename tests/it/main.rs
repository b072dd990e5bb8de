//! The one integration test binary: the command line, the Bulk Data export client, hostile input, the public corpora, the compiled-in exchange packages, mappings, the server, and repository tidiness.

mod bulk_client;
mod cli;
mod corpus;
mod hostile;
mod mapping;
mod need;
mod packages;
mod server;
mod tidy;
