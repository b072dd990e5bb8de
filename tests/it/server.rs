//! The gateway server end to end: a real listener on port 0, a real HTTP client (reqwest with rustls), real tokens.

pub(crate) mod support;
mod auth;
mod clients;
mod consent;
mod durability;
mod exchange;
mod export;
mod formats;
mod isolation;
mod keys;
mod limits;
mod malformed;
mod postgres;
mod python;
mod referrals;
mod rest;
mod search;
mod step_down;
mod subscriptions;
mod tls;
mod topics;
