//! The gateway server end to end: a real listener on port 0, a real HTTP client (reqwest with rustls), real tokens.

mod support;
mod auth;
mod clients;
mod durability;
mod exchange;
mod export;
mod isolation;
mod limits;
mod malformed;
mod postgres;
mod rest;
mod subscriptions;
mod tls;
