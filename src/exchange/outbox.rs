//! The delivery worker inside `serve`: claims due messages under a lease, sends each through its partner, and records the outcome — delivered (with the answer read), retried later with backoff, or a dead letter.
//!
//! Exactly-once effect rests on three things: a message is built once and every attempt sends the
//! same bytes (so a partner that processed a request whose answer was lost recognises the resend);
//! a message and its answer are recorded in one transaction; and a worker only records an outcome
//! while it still holds the message's lease. A crash between sending and recording means the
//! message is sent again after its lease runs out, with the same identity.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::now_ms;
use super::{consent, inquiry, pas, referral, step_down, subscription, topics};
use crate::api::state::AppState;
use crate::partner::Delivery;
use crate::store::{Attempt, Ending, Message, MessageStatus};

/// Runs the worker until the task is aborted.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { run(state).await })
}

async fn run(state: AppState) {
    let config = state.loaded.config.outbox.clone();
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4());
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let health = Arc::new(Health::default());
    let poll = Duration::from_millis(config.poll_interval_ms);
    loop {
        let free = slots.available_permits();
        if free > 0 {
            let now = now_ms();
            let lease_until = now + (config.lease_secs as i64) * 1000;
            match state.store.claim_due(now, lease_until, &owner, free).await {
                Ok(claimed) => {
                    for message in claimed {
                        let Ok(permit) = slots.clone().acquire_owned().await else { return };
                        let (state, owner, health) = (state.clone(), owner.clone(), health.clone());
                        tokio::spawn(async move {
                            deliver(&state, &owner, &health, message).await;
                            drop(permit);
                            // A finished message may unblock the next one of its subject.
                            state.outbox_wake.notify_one();
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "The outbox could not be read; trying again."),
            }
        }
        tokio::select! {
            _ = state.outbox_wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Which partners are failing, so a failure is logged when it starts and when it ends, not on every attempt.
#[derive(Default)]
struct Health {
    failing: Mutex<HashMap<String, bool>>,
}

impl Health {
    fn report(&self, partner: &str, ok: bool, error: &str) {
        let Ok(mut failing) = self.failing.lock() else { return };
        let was_failing = failing.insert(partner.to_string(), !ok).unwrap_or(false);
        match (was_failing, ok) {
            (false, false) => tracing::warn!(partner = partner, error = error, "A partner started failing; its messages wait and are retried."),
            (true, true) => tracing::info!(partner = partner, "A partner recovered; its messages flow again."),
            _ => {}
        }
    }
}

/// One attempt at one message, and what follows from its outcome.
async fn deliver(state: &AppState, owner: &str, health: &Health, message: Message) {
    if [topics::NOTIFICATION, topics::HANDSHAKE, topics::HEARTBEAT].contains(&message.new.kind.as_str()) {
        // A partner's own Subscription: its endpoint, its retry and error rules (the partner column names the
        // client). The consent decision is taken again here too, for the client as recipient.
        let recipient = consent::client_recipient(state, &message.new.partner).unwrap_or_else(|| (String::new(), crate::auth::consent::Purpose::Treatment));
        let (payload, disclosures) = match consent::check(state, recipient, &message.new.kind, &message.new.payload, &[]).await {
            consent::Checked::Send { payload, disclosures } => (payload, disclosures),
            consent::Checked::Hold(reason) => {
                if let Err(e) = topics::hold(state, owner, &message, &reason).await {
                    tracing::warn!(message = %message.new.id, error = %e, "A notification held for consent could not be recorded; it will be checked again.");
                }
                return;
            }
        };
        match topics::deliver(state, owner, &message, payload.as_deref().unwrap_or(&message.new.payload), &disclosures).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(message = %message.new.id, "The lease on a message ran out before its outcome was recorded; another worker has it."),
            Err(e) => tracing::warn!(message = %message.new.id, error = %e, "A delivery outcome could not be recorded; the message will be sent again."),
        }
        return;
    }
    let callback;
    let partner = match state.partners.get(&message.new.partner) {
        Some(partner) => partner,
        // A referrer's own address (a client's allowed callback) rather than a configured partner.
        None => match referral::callback_partner(state, &message).await {
            Some(found) => {
                callback = found;
                &callback
            }
            None => {
                // The partner left the configuration: the message waits for it to come back (or for an operator).
                let _ = state.store.retry_later(&message.new.id, owner, now_ms() + 60_000, 0, "the partner is not configured").await;
                return;
            }
        },
    };
    // Every kind passes the consent decision again now: a consent may have ended while it waited.
    let about = match referral::patients_of(state, &message).await {
        Ok(about) => about,
        Err(e) => {
            let _ = state.store.retry_later(&message.new.id, owner, now_ms() + 60_000, 0, &format!("the referral's client could not be read: {e}")).await;
            return;
        }
    };
    let (payload, disclosures) = match consent::check(state, consent::recipient(state, partner), &message.new.kind, &message.new.payload, &about).await {
        consent::Checked::Send { payload, disclosures } => (payload, disclosures),
        consent::Checked::Hold(reason) => {
            if let Err(e) = refuse(state, &message, owner, 0, "", &reason).await {
                tracing::warn!(message = %message.new.id, error = %e, "A message held for consent could not be recorded; it will be checked again.");
            }
            return;
        }
    };
    let payload = payload.as_deref().unwrap_or(&message.new.payload);
    let started = Instant::now();
    let delivery = match message.new.kind.as_str() {
        pas::SUBMIT => partner.post(pas::SUBMIT_PATH, payload).await,
        subscription::CREATE => partner.post("Subscription", payload).await,
        inquiry::INQUIRE => partner.post(inquiry::INQUIRE_PATH, payload).await,
        step_down::REFERRAL => partner.post(step_down::PROCESS_MESSAGE_PATH, payload).await,
        referral::TASK_UPDATE | referral::FEEDBACK_DOCUMENT => partner.put(&referral::put_path(payload), payload).await,
        referral::FEEDBACK_MESSAGE => partner.post("$process-message", payload).await,
        other => Delivery::Refused { status: 0, body: format!("unknown message kind {other}") },
    };
    let elapsed = started.elapsed();
    let error = record_attempt(state, &message, &delivery, elapsed, "the partner refused the message").await;
    health.report(&message.new.partner, !matches!(delivery, Delivery::Retry { .. }), &error);
    let recorded = match delivery {
        Delivery::Accepted { status, body, location } => {
            let recipient_client = partner.config.clients.first().map_or(partner.config.name.as_str(), String::as_str);
            for row in crate::api::audit::disclosure_rows(&disclosures, recipient_client, None, &state.base_url) {
                if let Err(e) = state.store.append_audit(&row).await {
                    tracing::error!(error = %e, "Could not append a disclosure to the audit trail.");
                }
            }
            state.metrics.observe_delivered(&message.new.partner, Duration::from_millis((now_ms() - message.created_at).max(0) as u64));
            match message.new.kind.as_str() {
                subscription::CREATE => subscription::created(state, &message, owner, status, &body, location.as_deref()).await,
                inquiry::INQUIRE => inquiry::answered(state, &message, owner, status, &body).await,
                step_down::REFERRAL => step_down::delivered(state, &message, owner, status, &body).await,
                referral::TASK_UPDATE | referral::FEEDBACK_DOCUMENT | referral::FEEDBACK_MESSAGE => referral::delivered(state, &message, owner, status, &body).await,
                _ => pas::accept(state, &message, owner, status, &body).await,
            }
        }
        Delivery::Refused { status, body } => refuse(state, &message, owner, status, &body, &error).await,
        Delivery::Retry { status, error, after } => {
            let config = &partner.config;
            let age = now_ms() - message.created_at;
            if config.max_age_secs.is_some_and(|max| age > (max as i64) * 1000) {
                refuse(state, &message, owner, status, "", &format!("given up after {} attempts: {error}", message.attempts)).await
            } else {
                let wait = after.unwrap_or_else(|| backoff(config.first_retry_ms, config.max_backoff_secs, message.attempts));
                state.store.retry_later(&message.new.id, owner, now_ms() + wait.as_millis() as i64, i64::from(status), &error).await.map_err(Into::into)
            }
        }
    };
    match recorded {
        Ok(true) => {}
        // Another worker took the message over after our lease ran out; its outcome stands.
        Ok(false) => tracing::info!(message = %message.new.id, "The lease on a message ran out before its outcome was recorded; another worker has it."),
        Err(e) => {
            // Nothing was recorded: the lease runs out and the message is sent again with the same identity.
            tracing::warn!(message = %message.new.id, error = %e, "A delivery outcome could not be recorded; the message will be sent again.");
        }
    }
}

/// A message that will not be delivered becomes a dead letter, with what that means for its kind.
async fn refuse(state: &AppState, message: &Message, owner: &str, status: u16, body: &str, reason: &str) -> Result<bool, crate::api::ApiError> {
    match message.new.kind.as_str() {
        subscription::CREATE => subscription::refused(state, message, owner, status, body, reason).await,
        inquiry::INQUIRE => inquiry::refused(state, message, owner, status, body, reason).await,
        step_down::REFERRAL => step_down::refused(state, message, owner, status, body, reason).await,
        referral::TASK_UPDATE | referral::FEEDBACK_DOCUMENT | referral::FEEDBACK_MESSAGE => referral::refused(state, message, owner, status, body, reason).await,
        _ => pas::refuse(state, message, owner, status, body, reason).await,
    }
}

/// Records one attempt (its row and metrics) and returns its error, if any (`refused` names who refused, for a refusal).
pub(crate) async fn record_attempt(state: &AppState, message: &Message, delivery: &Delivery, elapsed: Duration, refused: &str) -> String {
    let (status, error, outcome) = match delivery {
        Delivery::Accepted { status, .. } => (*status, String::new(), "delivered"),
        Delivery::Retry { status, error, .. } => (*status, error.clone(), "retry"),
        Delivery::Refused { status, .. } => (*status, format!("{refused} ({status})"), "refused"),
    };
    let attempt = Attempt { attempt: message.attempts, at: now_ms(), status_code: i64::from(status), error: error.clone(), duration_ms: elapsed.as_millis() as i64 };
    if let Err(e) = state.store.record_attempt(&message.new.id, &attempt).await {
        tracing::warn!(error = %e, "An attempt could not be recorded.");
    }
    state.metrics.observe_delivery(&message.new.partner, outcome, elapsed);
    error
}

/// Ends a claimed message that nothing else changes with (delivered or dead), if this worker still holds its lease.
pub(crate) async fn finish(state: &AppState, message: &Message, owner: &str, status: MessageStatus, http_status: u16, error: &str, response: &str) -> Result<bool, crate::api::ApiError> {
    let mut tx = state.store.begin().await?;
    let end = Ending { status, at_ms: now_ms(), http_status: i64::from(http_status), error, response };
    if !tx.finish_message(&message.new.id, owner, &end).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// The wait before retry number `attempts` (1-based): `first`, doubling, capped, with up to a fifth of jitter so retries of many messages spread out.
pub(crate) fn backoff(first_ms: u64, max_secs: u64, attempts: i64) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let base = first_ms.saturating_mul(1u64 << exponent).min(max_secs.saturating_mul(1000));
    let jitter = base / 5 * u64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 255;
    Duration::from_millis(base.saturating_sub(base / 10) + jitter)
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_doubles_from_the_first_retry_up_to_the_cap() {
        let ms = |attempts| backoff(1000, 60, attempts).as_millis() as u64;
        for (attempts, nominal) in [(1, 1000), (2, 2000), (3, 4000), (7, 60_000), (40, 60_000)] {
            let wait = ms(attempts);
            assert!(wait >= nominal * 9 / 10 && wait <= nominal * 11 / 10, "attempt {attempts}: {wait} ms, nominal {nominal}");
        }
    }
}
