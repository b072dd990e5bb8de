//! The exchange: IOP records in from the clinic, FHIR out to partners through the outbox, partners' answers back as records.
//!
//! - [`intake`]: a clinic's records → schema check → mapping → validation → one store transaction
//!   holding the FHIR resources (through the one write path), the records and every outbound
//!   message they cause.
//! - [`outbox`]: the delivery worker inside `serve`: claims due messages, sends them through the
//!   [`crate::partner`] layer, retries with backoff, keeps dead letters.
//! - [`consent`]: the send-time consent check every message kind passes (its purpose of use from one
//!   table; Part 2 resources withheld or the message held as "consent required").
//! - [`pas`]: Da Vinci PAS: what an authorization record sends, and what the payer's answer becomes
//!   (a stored ClaimResponse and a decision record).
//! - [`subscription`]: pended decisions: the one PAS Subscription per payer, and the notifications
//!   that bring the final decisions (event numbers tracked, gaps filled from `$events`).
//! - [`topics`]: the gateway as a Subscriptions Backport server: partners' Subscriptions on its
//!   topic (referral Task changes), events raised in the one write path, notifications delivered
//!   through the outbox (handshake, events, heartbeats), a failing endpoint's Subscription in error.
//! - [`inquiry`]: `Claim/$inquire` for pended authorizations, only while the payer's Subscription is
//!   in error (at a configured interval) or after missed events `$events` did not return.
//! - [`step_down`]: a discharge's step-down referral to an outpatient provider (a BSeR referral
//!   message), and the provider's answers (Task update or feedback message) back into the outbound
//!   referral record.
//! - [`referral`]: inbound BSeR referrals from inpatient units: the referral record and the route
//!   back, the clinic's answers and the client's sessions and discharge moving the Task, the
//!   referrer told through the outbox (its Task `PUT`, or feedback messages), the feedback document.
//! - [`utilization`]: attended session days against each certification; the extension request
//!   proposed (held for the clinic, or sent with `auto_extend`) when it runs low.

pub mod consent;
pub mod inquiry;
pub mod intake;
pub mod outbox;
pub mod pas;
pub mod step_down;
pub mod referral;
pub mod subscription;
pub mod topics;
pub mod utilization;

/// Milliseconds since the Unix epoch, the outbox's clock.
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
