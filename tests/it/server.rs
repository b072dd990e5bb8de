//! The gateway server end to end: a real listener on port 0, a real HTTP client (reqwest with rustls), real tokens.

mod support;
mod auth;
mod malformed;
mod rest;
mod tls;
