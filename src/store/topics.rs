//! Partners' topic-based Subscriptions (the gateway as a Subscriptions Backport server) and their events, numbered without gaps per Subscription.
//!
//! An event's number is taken by `UPDATE … SET events = events + 1` in the transaction that writes
//! the version causing it, so a rolled-back write takes no number and two writers never share one.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Store, StoreError, Tx};

/// A partner's Subscription as the gateway keeps it. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSubscription {
    pub id: String,
    /// The client that created it: the only one that sees it, and the one notifications are disclosed as to.
    pub client_id: String,
    /// The scopes of the token it was created with.
    pub scope: String,
    pub topic: String,
    /// Filter criteria as `param=value` (all must match).
    pub filters: Vec<String>,
    /// `empty`, `id-only` or `full-resource`.
    pub payload: String,
    pub endpoint: String,
    /// `channel.header` values, sent as HTTP headers.
    pub headers: Vec<String>,
    /// 0: no heartbeat.
    pub heartbeat_secs: i64,
    pub timeout_secs: i64,
    /// `requested`, `active`, `error` or `off`.
    pub status: String,
    /// Events since the Subscription started.
    pub events: i64,
    /// Delivery failures in a row.
    pub failures: i64,
    /// Why it is in error ('' otherwise).
    pub error: String,
    pub last_queued_at: i64,
    pub version: i64,
    /// `meta.lastUpdated` of the current version.
    pub updated: String,
    /// The Subscription resource as created (its status as it was then).
    pub resource: String,
}

/// One event of a Subscription: the version of the resource that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicEvent {
    pub number: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub version: i64,
    /// When it happened (the version's `lastUpdated`).
    pub at: String,
}

const COLUMNS: &str = "id, client_id, scope, topic, filters, payload, endpoint, headers, heartbeat_secs, timeout_secs, status, events, failures, error, last_queued_at, version, updated, resource";

fn lines(text: String) -> Vec<String> {
    text.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

fn subscription(row: &AnyRow) -> Result<TopicSubscription, sqlx::Error> {
    Ok(TopicSubscription {
        id: row.try_get(0)?,
        client_id: row.try_get(1)?,
        scope: row.try_get(2)?,
        topic: row.try_get(3)?,
        filters: lines(row.try_get(4)?),
        payload: row.try_get(5)?,
        endpoint: row.try_get(6)?,
        headers: lines(row.try_get(7)?),
        heartbeat_secs: row.try_get(8)?,
        timeout_secs: row.try_get(9)?,
        status: row.try_get(10)?,
        events: row.try_get(11)?,
        failures: row.try_get(12)?,
        error: row.try_get(13)?,
        last_queued_at: row.try_get(14)?,
        version: row.try_get(15)?,
        updated: row.try_get(16)?,
        resource: row.try_get(17)?,
    })
}

fn event(row: &AnyRow) -> Result<TopicEvent, sqlx::Error> {
    Ok(TopicEvent { number: row.try_get(0)?, resource_type: row.try_get(1)?, resource_id: row.try_get(2)?, version: row.try_get(3)?, at: row.try_get(4)? })
}

impl Tx {
    /// Records a new Subscription.
    pub async fn insert_topic_subscription(&mut self, s: &TopicSubscription) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO topic_subscriptions (id, client_id, scope, topic, filters, payload, endpoint, headers, heartbeat_secs, timeout_secs, status, events, failures, error, last_queued_at, version, updated, resource) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(s.id.as_str())
        .bind(s.client_id.as_str())
        .bind(s.scope.as_str())
        .bind(s.topic.as_str())
        .bind(s.filters.join("\n"))
        .bind(s.payload.as_str())
        .bind(s.endpoint.as_str())
        .bind(s.headers.join("\n"))
        .bind(s.heartbeat_secs)
        .bind(s.timeout_secs)
        .bind(s.status.as_str())
        .bind(s.events)
        .bind(s.failures)
        .bind(s.error.as_str())
        .bind(s.last_queued_at)
        .bind(s.version)
        .bind(s.updated.as_str())
        .bind(s.resource.as_str())
        .execute(self.conn().await?)
        .await?;
        Ok(())
    }

    /// A Subscription as this transaction sees it.
    pub async fn topic_subscription(&mut self, id: &str) -> Result<Option<TopicSubscription>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM topic_subscriptions WHERE id = $1"))).bind(id).fetch_optional(self.conn().await?).await?;
        Ok(row.as_ref().map(subscription).transpose()?)
    }

    /// Sets a Subscription's status (its client's update, or the gateway's verdict on its endpoint) and
    /// notes a new version; `false` when it was changed since `version` was read.
    pub async fn set_topic_status(&mut self, id: &str, version: i64, status: &str, error: &str, updated: &str, resource: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE topic_subscriptions SET status = $3, error = $4, failures = 0, version = version + 1, updated = $5, resource = $6 WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .bind(status)
        .bind(error)
        .bind(updated)
        .bind(resource)
        .execute(self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes the next event number of a Subscription that is not `off`, notes that a notification is
    /// queued, and records the event; the number and the status the Subscription had, or `None` (off or gone).
    pub async fn next_topic_event(&mut self, id: &str, event: &TopicEvent, now_ms: i64) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query(
            "UPDATE topic_subscriptions SET events = events + 1, last_queued_at = $2 WHERE id = $1 AND status IN ('requested', 'active', 'error') RETURNING events, status",
        )
        .bind(id)
        .bind(now_ms)
        .fetch_optional(self.conn().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let number: i64 = row.try_get(0)?;
        let status: String = row.try_get(1)?;
        sqlx::query("INSERT INTO topic_events (subscription_id, number, resource_type, resource_id, version, at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(id)
            .bind(number)
            .bind(event.resource_type.as_str())
            .bind(event.resource_id.as_str())
            .bind(event.version)
            .bind(event.at.as_str())
            .execute(self.conn().await?)
            .await?;
        Ok(Some((number, status)))
    }

    /// Notes that a heartbeat was queued, if nothing was queued since `previous`; `false` when something was (another instance's heartbeat, an event).
    pub async fn topic_queued(&mut self, id: &str, previous: i64, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE topic_subscriptions SET last_queued_at = $3 WHERE id = $1 AND last_queued_at = $2").bind(id).bind(previous).bind(now_ms).execute(self.conn().await?).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a Subscription and its events; `false` when it did not exist.
    pub async fn delete_topic_subscription(&mut self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM topic_subscriptions WHERE id = $1").bind(id).execute(self.conn().await?).await?;
        sqlx::query("DELETE FROM topic_events WHERE subscription_id = $1").bind(id).execute(self.conn().await?).await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Store {
    pub async fn topic_subscription(&self, id: &str) -> Result<Option<TopicSubscription>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM topic_subscriptions WHERE id = $1"))).bind(id).fetch_optional(&self.reader).await?;
        Ok(row.as_ref().map(subscription).transpose()?)
    }

    /// A client's Subscriptions, oldest first, optionally of one status.
    pub async fn client_topic_subscriptions(&self, client_id: &str, status: Option<&str>) -> Result<Vec<TopicSubscription>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM topic_subscriptions WHERE client_id = $1 AND ($2 = '' OR status = $2) ORDER BY id")))
            .bind(client_id)
            .bind(status.unwrap_or_default())
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(subscription).collect::<Result<_, _>>()?)
    }

    /// The Subscriptions on a topic that take events (every status but `off`).
    pub async fn live_topic_subscriptions(&self, topic: &str) -> Result<Vec<TopicSubscription>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM topic_subscriptions WHERE topic = $1 AND status IN ('requested', 'active', 'error') ORDER BY id")))
            .bind(topic)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(subscription).collect::<Result<_, _>>()?)
    }

    /// Active Subscriptions with a heartbeat whose last notification was queued before `now_ms` minus their period.
    pub async fn idle_topic_subscriptions(&self, now_ms: i64) -> Result<Vec<TopicSubscription>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM topic_subscriptions WHERE status = 'active' AND heartbeat_secs > 0 AND last_queued_at + heartbeat_secs * 1000 <= $1 ORDER BY id"
        )))
        .bind(now_ms)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(subscription).collect::<Result<_, _>>()?)
    }

    /// Events of a Subscription numbered from `since` to `until`, in order, at most `limit`.
    pub async fn topic_events(&self, id: &str, since: i64, until: i64, limit: usize) -> Result<Vec<TopicEvent>, StoreError> {
        let rows = sqlx::query("SELECT number, resource_type, resource_id, version, at FROM topic_events WHERE subscription_id = $1 AND number >= $2 AND number <= $3 ORDER BY number LIMIT $4")
            .bind(id)
            .bind(since)
            .bind(until)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(event).collect::<Result<_, _>>()?)
    }

    /// Counts a failed delivery; the failures in a row now.
    pub async fn topic_failed(&self, id: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("UPDATE topic_subscriptions SET failures = failures + 1 WHERE id = $1 RETURNING failures").bind(id).fetch_optional(&self.writer).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }

    /// A delivery went through: the failures in a row start again from 0, and a handshake makes a requested Subscription active.
    pub async fn topic_delivered(&self, id: &str, handshake: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE topic_subscriptions SET failures = 0, status = CASE WHEN $2 = 1 AND status = 'requested' THEN 'active' ELSE status END WHERE id = $1")
            .bind(id)
            .bind(i64::from(handshake))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Puts a Subscription in error (its endpoint refused or kept failing) unless it is off.
    pub async fn topic_error(&self, id: &str, why: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE topic_subscriptions SET status = 'error', error = $2 WHERE id = $1 AND status IN ('requested', 'active')").bind(id).bind(why).execute(&self.writer).await?;
        Ok(())
    }
}
