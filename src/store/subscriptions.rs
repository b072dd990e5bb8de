//! The PAS Subscriptions the gateway keeps at payers (one per payer): the payer's id for it, the hash of its secret, its status and the last event number applied.
//!
//! The event number only moves forward, by compare-and-set (`advance_events`), so two notifications
//! handled at once on two instances cannot both apply the same event.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Store, StoreError, Tx};

/// One payer's Subscription as the gateway knows it. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRow {
    pub partner: String,
    /// The outbox message that creates it at the payer.
    pub message_id: String,
    /// The payer's Subscription id ('' until the payer answered the create).
    pub remote_id: String,
    /// SHA-256 (hex) of the secret the payer sends in every notification.
    pub secret_hash: String,
    /// `requested`, `active`, `error` or `off`.
    pub status: String,
    /// The highest event number applied (0: none yet).
    pub last_event: i64,
    pub last_notification_at: i64,
    pub created_at: i64,
}

const COLUMNS: &str = "partner, message_id, remote_id, secret_hash, status, last_event, last_notification_at, created_at";

fn subscription(row: &AnyRow) -> Result<SubscriptionRow, sqlx::Error> {
    Ok(SubscriptionRow {
        partner: row.try_get(0)?,
        message_id: row.try_get(1)?,
        remote_id: row.try_get(2)?,
        secret_hash: row.try_get(3)?,
        status: row.try_get(4)?,
        last_event: row.try_get(5)?,
        last_notification_at: row.try_get(6)?,
        created_at: row.try_get(7)?,
    })
}

impl Tx {
    /// The partner's Subscription, read inside this transaction.
    pub async fn subscription(&mut self, partner: &str) -> Result<Option<SubscriptionRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM pas_subscriptions WHERE partner = $1")))
            .bind(partner)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.as_ref().map(subscription).transpose()?)
    }

    /// Records a new Subscription; `false` when the partner already has one (another transaction was first).
    /// `ON CONFLICT DO NOTHING` rather than catching the violation: on PostgreSQL a failed statement aborts the whole transaction.
    pub async fn insert_subscription(&mut self, s: &SubscriptionRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO pas_subscriptions (partner, message_id, remote_id, secret_hash, status, last_event, last_notification_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (partner) DO NOTHING",
        )
        .bind(s.partner.as_str())
        .bind(s.message_id.as_str())
        .bind(s.remote_id.as_str())
        .bind(s.secret_hash.as_str())
        .bind(s.status.as_str())
        .bind(s.last_event)
        .bind(s.last_notification_at)
        .bind(s.created_at)
        .execute(self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the payer's answer to the create: its id for the Subscription and the status it gave.
    /// A handshake that arrived first (status `active`) is not undone by a `requested` answer.
    pub async fn subscription_created(&mut self, partner: &str, remote_id: &str, status: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE pas_subscriptions SET remote_id = $2, status = CASE WHEN status = 'active' AND $3 = 'requested' THEN status ELSE $3 END WHERE partner = $1")
            .bind(partner)
            .bind(remote_id)
            .bind(status)
            .execute(self.conn().await?)
            .await?;
        Ok(())
    }

    /// Moves the last applied event number from `from` to `to` and notes the notification; `false`
    /// when another transaction moved it first (the caller starts again from the new number).
    pub async fn advance_events(&mut self, partner: &str, from: i64, to: i64, status: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE pas_subscriptions SET last_event = $3, status = $4, last_notification_at = $5 WHERE partner = $1 AND last_event = $2")
            .bind(partner)
            .bind(from)
            .bind(to)
            .bind(status)
            .bind(now_ms)
            .execute(self.conn().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces a message's payload once it was delivered (the Subscription's secret must not stay readable in the outbox).
    pub async fn redact_payload(&mut self, message_id: &str, payload: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET payload = $2 WHERE id = $1").bind(message_id).bind(payload).execute(self.conn().await?).await?;
        Ok(())
    }
}

impl Store {
    /// The partner's Subscription.
    pub async fn subscription(&self, partner: &str) -> Result<Option<SubscriptionRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM pas_subscriptions WHERE partner = $1"))).bind(partner).fetch_optional(&self.reader).await?;
        Ok(row.as_ref().map(subscription).transpose()?)
    }

    /// The Subscriptions in error (`error` or `off`): while there are none, this is all the `$inquire` fallback asks of the store.
    pub async fn subscriptions_in_error(&self) -> Result<Vec<SubscriptionRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM pas_subscriptions WHERE status IN ('error', 'off') ORDER BY partner")))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(subscription).collect::<Result<_, _>>()?)
    }

    /// Notes a notification that carries no event (handshake, heartbeat): the status the payer reports and when it was heard from.
    pub async fn subscription_heard(&self, partner: &str, status: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE pas_subscriptions SET status = $2, last_notification_at = $3 WHERE partner = $1").bind(partner).bind(status).bind(now_ms).execute(&self.writer).await?;
        Ok(())
    }
}
