//! The gateway server end to end: a real listener on port 0, a real HTTP client (reqwest with rustls), real tokens.

mod support;
mod auth;
mod clients;
mod durability;
mod exchange;
mod isolation;
mod keys;
mod limits;
mod malformed;
mod postgres;
mod python;
mod rest;
mod subscriptions;
mod tls;
