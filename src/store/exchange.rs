//! The exchange's tables: IOP records the gateway holds, and the outbox (messages, leases, attempts) every outbound message goes through.
//!
//! A message is claimed by compare-and-set on its lease (`lease_until`), which works the same on
//! SQLite and on PostgreSQL shared by several instances: of two workers that read the same due
//! message, only the one whose `UPDATE … WHERE lease_until <= now` changes a row sends it. Every
//! later change of a claimed message names the lease owner, so a worker whose lease ran out cannot
//! overwrite what the next one recorded. Messages of one partner and subject are claimed in order.

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::{Store, StoreError, Tx};

/// A message to queue: built once, sent as is on every attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub id: String,
    pub partner: String,
    /// Ordering key: messages of one partner and subject are delivered in the order queued.
    pub subject: String,
    /// What the message is (`pas-submit`), which decides how it is sent and how its answer is read.
    pub kind: String,
    /// The record that caused it.
    pub record_type: String,
    pub record_id: String,
    pub payload: String,
}

/// Where a message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageStatus {
    Pending,
    InFlight,
    Delivered,
    Dead,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::InFlight => "in-flight",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<MessageStatus> {
        [MessageStatus::Pending, MessageStatus::InFlight, MessageStatus::Delivered, MessageStatus::Dead].into_iter().find(|s| s.as_str() == text)
    }
}

/// A queued message with its delivery state. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub new: NewMessage,
    pub status: MessageStatus,
    pub attempts: i64,
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub delivered_at: i64,
    /// The HTTP status of the last attempt (0: no answer).
    pub last_status: i64,
    pub last_error: String,
    /// The partner's answer to the delivering (or final failing) attempt.
    pub response: String,
}

/// How a claimed message ended.
#[derive(Clone, Copy, Debug)]
pub struct Ending<'a> {
    /// Delivered or dead.
    pub status: MessageStatus,
    pub at_ms: i64,
    /// The HTTP status of the partner's last answer (0: none).
    pub http_status: i64,
    pub error: &'a str,
    /// The partner's answer, kept for operators.
    pub response: &'a str,
}

/// One delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: i64,
    pub at: i64,
    pub status_code: i64,
    pub error: String,
    pub duration_ms: i64,
}

/// An IOP record as the gateway holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRow {
    pub record_type: String,
    pub id: String,
    /// `outbound`: sent by the clinic, going out as FHIR; `inbound`: made from a partner's FHIR.
    pub direction: String,
    pub client_id: String,
    pub authorization_id: String,
    pub status: String,
    /// The certification an authorization asks to extend (its `extends_certification`; '' for the rest).
    pub extends_certification: String,
    pub updated: String,
    pub body: String,
}

/// A filter on the records; every field narrows.
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    pub record_type: Option<String>,
    /// The record's own id (a client record names its client only so).
    pub id: Option<String>,
    pub direction: Option<String>,
    pub client_id: Option<String>,
    pub authorization_id: Option<String>,
    pub status: Option<String>,
    pub limit: usize,
    /// Only records listed after this one (newest first): the next page.
    pub after: Option<RecordCursor>,
}

/// Where a listing of records stopped: the last record's update time and store sequence, which
/// order the listing, so a page never repeats or skips a record that was there before the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordCursor {
    pub updated: String,
    pub seq: i64,
}

const MESSAGE_COLUMNS: &str =
    "id, partner, subject, kind, record_type, record_id, payload, status, attempts, created_at, next_attempt_at, delivered_at, last_status, last_error, response";

fn message(row: &AnyRow) -> Result<Message, sqlx::Error> {
    let status: String = row.try_get(7)?;
    Ok(Message {
        new: NewMessage {
            id: row.try_get(0)?,
            partner: row.try_get(1)?,
            subject: row.try_get(2)?,
            kind: row.try_get(3)?,
            record_type: row.try_get(4)?,
            record_id: row.try_get(5)?,
            payload: row.try_get(6)?,
        },
        status: MessageStatus::parse(&status).unwrap_or(MessageStatus::Pending),
        attempts: row.try_get(8)?,
        created_at: row.try_get(9)?,
        next_attempt_at: row.try_get(10)?,
        delivered_at: row.try_get(11)?,
        last_status: row.try_get(12)?,
        last_error: row.try_get(13)?,
        response: row.try_get(14)?,
    })
}

fn record(row: &AnyRow) -> Result<RecordRow, sqlx::Error> {
    Ok(RecordRow {
        record_type: row.try_get(0)?,
        id: row.try_get(1)?,
        direction: row.try_get(2)?,
        client_id: row.try_get(3)?,
        authorization_id: row.try_get(4)?,
        status: row.try_get(5)?,
        updated: row.try_get(6)?,
        body: row.try_get(7)?,
        extends_certification: row.try_get(8)?,
    })
}

const RECORD_COLUMNS: &str = "record_type, id, direction, client_id, authorization_id, status, updated, body, extends_certification";

async fn put_record<'e, E: Executor<'e, Database = Any>>(executor: E, r: &'e RecordRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO iop_records (record_type, id, direction, client_id, authorization_id, status, updated, body, extends_certification) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (record_type, id, direction) DO UPDATE SET client_id = $4, authorization_id = $5, status = $6, updated = $7, body = $8, extends_certification = $9",
    )
    .bind(r.record_type.as_str())
    .bind(r.id.as_str())
    .bind(r.direction.as_str())
    .bind(r.client_id.as_str())
    .bind(r.authorization_id.as_str())
    .bind(r.status.as_str())
    .bind(r.updated.as_str())
    .bind(r.body.as_str())
    .bind(r.extends_certification.as_str())
    .execute(executor)
    .await?;
    Ok(())
}

impl Tx {
    /// Queues a message in this transaction; `false` when a message with its id is already queued (a resend of the same change).
    pub async fn enqueue(&mut self, m: &NewMessage, now_ms: i64) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO outbox (id, partner, subject, kind, record_type, record_id, payload, status, attempts, created_at, next_attempt_at, lease_until, lease_owner, delivered_at, last_status, last_error, response) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8, 0, '', 0, 0, '', '') ON CONFLICT (id) DO NOTHING",
        )
        .bind(m.id.as_str())
        .bind(m.partner.as_str())
        .bind(m.subject.as_str())
        .bind(m.kind.as_str())
        .bind(m.record_type.as_str())
        .bind(m.record_id.as_str())
        .bind(m.payload.as_str())
        .bind(now_ms)
        .execute(self.conn().await?)
        .await?;
        // ON CONFLICT rather than catching the unique violation: on PostgreSQL a failed statement aborts the whole transaction.
        Ok(result.rows_affected() == 1)
    }

    /// Stores (or replaces) an IOP record.
    pub async fn put_record(&mut self, r: &RecordRow) -> Result<(), StoreError> {
        put_record(self.conn().await?, r).await
    }

    /// One stored IOP record, read in this transaction (what a change is compared with).
    pub async fn record(&mut self, record_type: &str, id: &str, direction: &str) -> Result<Option<RecordRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RECORD_COLUMNS} FROM iop_records WHERE record_type = $1 AND id = $2 AND direction = $3")))
            .bind(record_type)
            .bind(id)
            .bind(direction)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    /// The client an authorization the clinic sent names ('' for one the gateway does not hold), which its decision rows carry.
    pub async fn authorization_client(&mut self, authorization_id: &str) -> Result<String, StoreError> {
        Ok(self.record("authorization", authorization_id, "outbound").await?.map(|r| r.client_id).unwrap_or_default())
    }

    /// The messages already queued for a record (newest last).
    pub async fn messages_for_record(&mut self, record_type: &str, record_id: &str) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MESSAGE_COLUMNS} FROM outbox WHERE record_type = $1 AND record_id = $2 ORDER BY seq")))
            .bind(record_type)
            .bind(record_id)
            .fetch_all(self.conn().await?)
            .await?;
        Ok(rows.iter().map(message).collect::<Result<_, _>>()?)
    }

    /// Records the final outcome of a claimed message (delivered or dead) if `owner` still holds its
    /// lease; `false` when the lease was lost (the caller rolls back: the next holder decides).
    pub async fn finish_message(&mut self, id: &str, owner: &str, end: &Ending<'_>) -> Result<bool, StoreError> {
        let Ending { status, at_ms: now_ms, http_status, error, response } = *end;
        let delivered_at = if status == MessageStatus::Delivered { now_ms } else { 0 };
        let done = sqlx::query(
            "UPDATE outbox SET status = $3, delivered_at = $4, last_status = $5, last_error = $6, response = $7, lease_until = 0, lease_owner = '' \
             WHERE id = $1 AND lease_owner = $2 AND status = 'in-flight'",
        )
        .bind(id)
        .bind(owner)
        .bind(status.as_str())
        .bind(delivered_at)
        .bind(http_status)
        .bind(error)
        .bind(response)
        .execute(self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Store {
    /// Claims up to `limit` due messages for `owner` until `lease_until`; never one whose
    /// predecessor (same partner and subject) is not yet delivered or dead.
    pub async fn claim_due(&self, now_ms: i64, lease_until: i64, owner: &str, limit: usize) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM outbox o WHERE o.status IN ('pending', 'in-flight') AND o.next_attempt_at <= $1 AND o.lease_until <= $1 \
             AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.partner = o.partner AND e.subject = o.subject AND e.seq < o.seq AND e.status IN ('pending', 'in-flight')) \
             ORDER BY o.next_attempt_at, o.seq LIMIT $2"
        )))
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.writer)
        .await?;
        let mut claimed = Vec::new();
        for row in &rows {
            let mut m = message(row)?;
            if self.claim(&m.new.id, now_ms, lease_until, owner).await? {
                m.status = MessageStatus::InFlight;
                m.attempts += 1;
                claimed.push(m);
            }
        }
        Ok(claimed)
    }

    /// The compare-and-set that makes a message `owner`'s until `lease_until`; `false` when it is no longer due.
    ///
    /// Every condition that made the row due is checked again here: what `claim_due` read may be stale
    /// (another instance may have tried the message meanwhile and put it back for a later retry,
    /// which `lease_until <= now` alone would let this worker send again at once). On PostgreSQL the
    /// UPDATE waits for a concurrent claim of the row and re-evaluates the condition on its result.
    async fn claim(&self, id: &str, now_ms: i64, lease_until: i64, owner: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'in-flight', lease_until = $2, lease_owner = $3, attempts = attempts + 1 \
             WHERE id = $1 AND status IN ('pending', 'in-flight') AND lease_until <= $4 AND next_attempt_at <= $4",
        )
        .bind(id)
        .bind(lease_until)
        .bind(owner)
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records one attempt of a message (its number is the message's attempt count when claimed).
    pub async fn record_attempt(&self, id: &str, a: &Attempt) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO outbox_attempts (message_id, attempt, at, status_code, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(id)
            .bind(a.attempt)
            .bind(a.at)
            .bind(a.status_code)
            .bind(a.error.as_str())
            .bind(a.duration_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Puts a claimed message back to wait until `next_attempt_at`, if `owner` still holds its lease.
    pub async fn retry_later(&self, id: &str, owner: &str, next_attempt_at: i64, http_status: i64, error: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', next_attempt_at = $3, last_status = $4, last_error = $5, lease_until = 0, lease_owner = '' \
             WHERE id = $1 AND lease_owner = $2 AND status = 'in-flight'",
        )
        .bind(id)
        .bind(owner)
        .bind(next_attempt_at)
        .bind(http_status)
        .bind(error)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sends a dead letter back to the queue (operators, after fixing what the partner refused); `false` if it is not dead.
    pub async fn replay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE outbox SET status = 'pending', next_attempt_at = $2, last_error = '' WHERE id = $1 AND status = 'dead'")
            .bind(id)
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Messages, newest first, optionally of one status and partner.
    pub async fn messages(&self, status: Option<MessageStatus>, partner: Option<&str>, limit: usize) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM outbox WHERE ($1 = '' OR status = $1) AND ($2 = '' OR partner = $2) ORDER BY seq DESC LIMIT $3"
        )))
        .bind(status.map(MessageStatus::as_str).unwrap_or_default())
        .bind(partner.unwrap_or_default())
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(message).collect::<Result<_, _>>()?)
    }

    /// One message and its attempts.
    pub async fn message(&self, id: &str) -> Result<Option<(Message, Vec<Attempt>)>, StoreError> {
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MESSAGE_COLUMNS} FROM outbox WHERE id = $1"))).bind(id).fetch_optional(&self.reader).await? else {
            return Ok(None);
        };
        let attempts = sqlx::query("SELECT attempt, at, status_code, error, duration_ms FROM outbox_attempts WHERE message_id = $1 ORDER BY attempt")
            .bind(id)
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| -> Result<Attempt, sqlx::Error> { Ok(Attempt { attempt: r.try_get(0)?, at: r.try_get(1)?, status_code: r.try_get(2)?, error: r.try_get(3)?, duration_ms: r.try_get(4)? }) })
            .collect::<Result<_, _>>()?;
        Ok(Some((message(&row)?, attempts)))
    }

    /// Queue depth by partner and status, with the creation time of the oldest message in each (metrics).
    pub async fn outbox_depth(&self) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        let rows = sqlx::query("SELECT partner, status, COUNT(*), MIN(created_at) FROM outbox WHERE status IN ('pending', 'in-flight', 'dead') GROUP BY partner, status")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(|r| -> Result<_, sqlx::Error> { Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)) }).collect::<Result<_, _>>()?)
    }

    /// Stores (or replaces) an IOP record outside a resource transaction.
    pub async fn put_record(&self, r: &RecordRow) -> Result<(), StoreError> {
        put_record(&self.writer, r).await
    }

    /// Records matching a filter, newest first.
    pub async fn records(&self, f: &RecordFilter) -> Result<Vec<RecordRow>, StoreError> {
        Ok(self.record_page(f).await?.0)
    }

    /// Up to `f.limit` records matching a filter, newest first, and the cursor of the next page when there is one.
    pub async fn record_page(&self, f: &RecordFilter) -> Result<(Vec<RecordRow>, Option<RecordCursor>), StoreError> {
        let (after_updated, after_seq) = f.after.as_ref().map(|c| (c.updated.clone(), c.seq)).unwrap_or_default();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS}, seq FROM iop_records \
             WHERE ($1 = '' OR record_type = $1) AND ($2 = '' OR direction = $2) AND ($3 = '' OR client_id = $3) AND ($4 = '' OR authorization_id = $4) AND ($5 = '' OR status = $5) AND ($7 = '' OR id = $7) \
             AND ($8 = '' OR updated < $8 OR (updated = $8 AND seq < $9)) \
             ORDER BY updated DESC, seq DESC LIMIT $6"
        )))
        .bind(f.record_type.clone().unwrap_or_default())
        .bind(f.direction.clone().unwrap_or_default())
        .bind(f.client_id.clone().unwrap_or_default())
        .bind(f.authorization_id.clone().unwrap_or_default())
        .bind(f.status.clone().unwrap_or_default())
        .bind(f.limit as i64 + 1)
        .bind(f.id.clone().unwrap_or_default())
        .bind(after_updated)
        .bind(after_seq)
        .fetch_all(&self.reader)
        .await?;
        let more = rows.len() > f.limit;
        let rows = &rows[..rows.len().min(f.limit)];
        let next = match rows.last() {
            Some(last) if more => Some(RecordCursor { updated: last.try_get(6)?, seq: last.try_get(9)? }),
            _ => None,
        };
        Ok((rows.iter().map(record).collect::<Result<_, _>>()?, next))
    }

    /// One record by its key (the unique index).
    pub async fn record(&self, record_type: &str, id: &str, direction: &str) -> Result<Option<RecordRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RECORD_COLUMNS} FROM iop_records WHERE record_type = $1 AND id = $2 AND direction = $3")))
            .bind(record_type)
            .bind(id)
            .bind(direction)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    /// A client's records of one type (of one status, if given), newest first, at most `limit`: by the client index, never a scan of the type.
    pub async fn client_records(&self, client_id: &str, record_type: &str, status: Option<&str>, limit: usize) -> Result<Vec<RecordRow>, StoreError> {
        // A condition only when asked for, rather than `($4 = '' OR status = $4)`, which keeps the planner off the index's last column.
        let by_status = if status.is_some() { " AND status = $4" } else { "" };
        let sql = format!("SELECT {RECORD_COLUMNS} FROM iop_records WHERE client_id = $1 AND record_type = $2{by_status} ORDER BY updated DESC, seq DESC LIMIT $3");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(client_id).bind(record_type).bind(limit as i64);
        if let Some(status) = status {
            query = query.bind(status);
        }
        let rows = query.fetch_all(&self.reader).await?;
        Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
    }

    /// A client's authorizations (either direction: the clinic's and the gateway's proposals) that extend certification `number`.
    pub async fn extensions(&self, client_id: &str, number: &str) -> Result<Vec<RecordRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM iop_records WHERE extends_certification = $1 AND record_type = 'authorization' AND client_id = $2 ORDER BY updated DESC, seq DESC"
        )))
        .bind(number)
        .bind(client_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    async fn store(label: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("iop-gw-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StoreConfig { data_dir: dir.clone(), ..Default::default() };
        (Store::open(&config, Arc::new(crate::telemetry::Metrics::default())).await.unwrap(), dir)
    }

    fn new_message(id: &str) -> NewMessage {
        NewMessage { id: id.into(), partner: "payer".into(), subject: format!("authorization:{id}"), kind: "pas-submit".into(), record_type: "authorization".into(), record_id: id.into(), payload: "{}".into() }
    }

    /// Migration 5 on rows written before it: decision rows get the client of the authorization the
    /// clinic sent, authorization rows the certification they extend; then they are found by the new reads.
    async fn backfill(backend: super::super::Backend, pool: &sqlx::AnyPool, migrations: Vec<sqlx::migrate::Migration>) {
        let before: Vec<_> = migrations.iter().filter(|m| m.version < 5).cloned().collect();
        sqlx::migrate::Migrator::with_migrations(before).run(pool).await.unwrap();
        let rows = [
            ("authorization", "A-1", "outbound", "C-1", "A-1", r#"{"record_type":"authorization","id":"A-1","client_id":"C-1"}"#),
            ("authorization", "A-1-EXT", "inbound", "C-1", "A-1-EXT", r#"{"record_type":"authorization","id":"A-1-EXT","client_id":"C-1","extends_certification":"CERT-1"}"#),
            ("authorization", "A-2", "outbound", "C-2", "A-2", r#"{"record_type":"authorization","id":"A-2","client_id":"C-2"}"#),
            ("decision", "A-1", "inbound", "", "A-1", r#"{"record_type":"decision","authorization_id":"A-1","outcome":"certified","certification_number":"CERT-1"}"#),
            ("decision", "A-2", "inbound", "", "A-2", r#"{"record_type":"decision","authorization_id":"A-2","outcome":"pended"}"#),
            ("decision", "A-9", "inbound", "", "A-9", r#"{"record_type":"decision","authorization_id":"A-9","outcome":"error"}"#),
        ];
        for (record_type, id, direction, client, authorization, body) in rows {
            let status = if record_type == "decision" { body.split("\"outcome\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or_default() } else { "" };
            sqlx::query("INSERT INTO iop_records (record_type, id, direction, client_id, authorization_id, status, updated, body) VALUES ($1, $2, $3, $4, $5, $6, '2026-01-01', $7)")
                .bind(record_type).bind(id).bind(direction).bind(client).bind(authorization).bind(status).bind(body)
                .execute(pool).await.unwrap();
        }
        sqlx::migrate::Migrator::with_migrations(migrations).run(pool).await.unwrap();
        let store = Store { backend, writer: pool.clone(), sqlite_group: None, postgres_group: None, reader: pool.clone(), metrics: Arc::new(crate::telemetry::Metrics::default()), enrolled: Arc::default() };
        let certified = store.client_records("C-1", "decision", Some("certified"), 10).await.unwrap();
        assert_eq!(certified.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["A-1"]);
        assert_eq!(store.client_records("C-2", "decision", None, 10).await.unwrap().len(), 1);
        assert_eq!(store.record("decision", "A-9", "inbound").await.unwrap().unwrap().client_id, "", "no authorization, no client");
        let extensions = store.extensions("C-1", "CERT-1").await.unwrap();
        assert_eq!(extensions.iter().map(|r| (r.id.as_str(), r.extends_certification.as_str())).collect::<Vec<_>>(), [("A-1-EXT", "CERT-1")]);
        assert!(store.extensions("C-2", "CERT-1").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn migration_5_gives_existing_decisions_their_client_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("iop-gw-store-backfill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sqlx::any::install_default_drivers();
        let (writer, _) = super::super::sqlite::connect(&dir, 1, 5).await.unwrap();
        backfill(super::super::Backend::Sqlite, &writer, super::super::sqlite::migrations()).await;
        writer.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn migration_5_gives_existing_decisions_their_client_on_postgres() {
        let Some(url) = crate::need::postgres("store::exchange::tests::migration_5_gives_existing_decisions_their_client_on_postgres") else { return };
        let schema = format!("unit_backfill_{}", std::process::id());
        sqlx::any::install_default_drivers();
        let pool = super::super::postgres::connect(&url, Some(&schema), 2, 5).await.expect("the PostgreSQL of the tests");
        backfill(super::super::Backend::Postgres, &pool, super::super::postgres::migrations()).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE"))).execute(&pool).await.unwrap();
        pool.close().await;
    }

    /// A worker that read a message as due, then lost the race to one that tried it and put it back for later, must not send it before its retry time.
    #[tokio::test]
    async fn a_stale_read_claims_neither_a_leased_nor_a_backed_off_message() {
        let (store, dir) = store("claim").await;
        let mut tx = store.begin().await.unwrap();
        assert!(tx.enqueue(&new_message("m-1"), 1_000).await.unwrap());
        tx.commit().await.unwrap();

        let claimed = store.claim_due(1_000, 61_000, "a", 8).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(!store.claim("m-1", 1_000, 61_000, "b").await.unwrap(), "the lease of a holds");
        assert!(store.retry_later("m-1", "a", 5_000, 503, "the partner answered 503").await.unwrap());
        assert!(!store.claim("m-1", 1_001, 61_001, "b").await.unwrap(), "put back until 5000: not due at 1001");
        assert!(store.claim_due(1_001, 61_001, "b", 8).await.unwrap().is_empty());
        let retried = store.claim_due(5_000, 65_000, "b", 8).await.unwrap();
        assert_eq!((retried.len(), retried[0].attempts), (1, 2));
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
