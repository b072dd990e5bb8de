//! The PostgreSQL backend, selected by a `postgres://` URL: one pool shared by any number of gateway instances' worth of connections, optionally in its own schema, and its write group (group commit).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor};

use tokio::sync::oneshot;

use super::query::{SCRIPT_BINDS, Script};
use super::{Backend, StoreError};
use crate::telemetry::Metrics;

pub(super) fn migrator() -> Migrator {
    Migrator::with_migrations(migrations())
}

/// The schema's migrations in order (a test runs them up to a version to check what a later one does to existing rows).
pub(super) fn migrations() -> Vec<Migration> {
    let migration = |version, name: &str, sql: &'static str| Migration::new(version, name.to_string().into(), MigrationType::Simple, sqlx::SqlStr::from_static(sql), false);
    vec![
        migration(1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
        migration(2, "owner", include_str!("../../migrations/postgres/0002_owner.sql")),
        migration(3, "exchange", include_str!("../../migrations/postgres/0003_exchange.sql")),
        migration(4, "subscriptions", include_str!("../../migrations/postgres/0004_subscriptions.sql")),
        migration(5, "utilization", include_str!("../../migrations/postgres/0005_utilization.sql")),
        migration(6, "inquiries", include_str!("../../migrations/postgres/0006_inquiries.sql")),
        migration(7, "history_by_time", include_str!("../../migrations/postgres/0007_history_by_time.sql")),
        migration(8, "exports", include_str!("../../migrations/postgres/0008_exports.sql")),
        migration(9, "topics", include_str!("../../migrations/postgres/0009_topics.sql")),
        migration(10, "referrals", include_str!("../../migrations/postgres/0010_referrals.sql")),
        migration(11, "consent", include_str!("../../migrations/postgres/0011_consent.sql")),
        migration(12, "write_path", include_str!("../../migrations/postgres/0012_write_path.sql")),
        migration(13, "byte_order", include_str!("../../migrations/postgres/0013_byte_order.sql")),
        migration(14, "index_by_id", include_str!("../../migrations/postgres/0014_index_by_id.sql")),
    ]
}

pub(super) async fn connect(url: &str, schema: Option<&str>, max: u32, acquire_timeout_secs: u64) -> Result<AnyPool, StoreError> {
    if let Some(schema) = schema {
        // The schema name was checked to be [A-Za-z0-9_]+ by the configuration, so quoting it is enough.
        let setup = AnyPoolOptions::new().max_connections(1).connect(url).await?;
        let created = setup.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))).await;
        // Two instances starting together may both try to create it; losing that race is fine.
        if let Err(e) = created {
            let exists: Option<(String,)> = sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE nspname = $1").bind(schema).fetch_optional(&setup).await?;
            if exists.is_none() {
                return Err(e.into());
            }
        }
        setup.close().await;
    }
    let search_path = schema.map(|s| format!("SET search_path TO \"{s}\""));
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(acquire_timeout_secs))
        .after_connect(move |conn, _| {
            let search_path = search_path.clone();
            Box::pin(async move {
                if let Some(statement) = search_path {
                    conn.execute(sqlx::AssertSqlSafe(statement)).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}

/// Group commit on PostgreSQL: write transactions that only queued (no statement had to run
/// before their commit: a create, a transaction Bundle of creates, with their index and audit
/// rows) are sent, whatever arrived while the previous group ran, as ONE statement — their
/// scripts merged, each table's rows in one multi-row insert — so a group of members pays one
/// statement's protocol, plan, executor and commit instead of one each. A member is answered
/// only after that statement committed. A statement that fails is rolled back whole, and then each
/// member's own statement is sent alone, so one member's failure (a duplicate id, the Part 2
/// enrolment check, a deadlock with another instance) is that member's only; a failure that may
/// have left the statement committed (the connection lost) fails every member, as it fails a
/// single write. Savepoints on one open transaction, as SQLite's group does, would cost
/// PostgreSQL three round trips per member on one connection, all in turn.
#[derive(Clone)]
pub(super) struct Group {
    pool: AnyPool,
    state: Arc<Mutex<Waiting>>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Waiting {
    members: VecDeque<(Script, oneshot::Sender<Result<(), StoreError>>)>,
    /// Tasks sending groups now, each on its own connection.
    writers: usize,
}

/// The values a group's statement may carry: what one TLS record holds (16 KiB) with room for the
/// protocol. sqlx writes a message of more records in several `write`s on a socket without
/// `TCP_NODELAY`, so the last waits for the server's delayed acknowledgement (~40 ms); a group
/// that large cost more than it saved. A member beyond it alone is sent as it would be without a group.
const GROUP_BYTES: usize = 16_000;

/// Groups in flight at once: the next one gathers while one runs (one backend, at most one core each).
const WRITERS: usize = 2;

impl Group {
    pub(super) fn new(pool: AnyPool, metrics: Arc<Metrics>) -> Group {
        Group { pool, state: Arc::default(), metrics }
    }

    /// Commits `script`, which must be one statement ([`Script::is_one_statement`]), with
    /// whatever other members wait; returns once it is durable, or why it is not.
    pub(super) async fn commit(&self, script: Script) -> Result<(), StoreError> {
        let (sender, outcome) = oneshot::channel();
        let start = {
            let mut waiting = self.state.lock().expect("never poisoned: no panics under the lock");
            waiting.members.push_back((script, sender));
            // A second group starts only for two waiting members: one alone joins the next group of
            // the writer already sending, which then carries more members per statement.
            let start = waiting.writers == 0 || (waiting.writers < WRITERS && waiting.members.len() >= 2);
            if start {
                waiting.writers += 1;
            }
            start
        };
        if start {
            // A task of its own, so that a request cancelled while waiting cannot strand the others.
            tokio::spawn(self.clone().write());
        }
        outcome.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the write group ended without an outcome".into())))
    }

    /// Sends groups until no member waits, on one connection while it serves.
    async fn write(self) {
        let mut conn: Option<PoolConnection<Any>> = None;
        loop {
            let members = {
                let mut waiting = self.state.lock().expect("never poisoned: no panics under the lock");
                let mut members = Vec::new();
                let (mut binds, mut bytes) = (0, 0);
                while let Some((script, _)) = waiting.members.front() {
                    if !members.is_empty() && (binds + script.binds() > SCRIPT_BINDS || bytes + script.bytes() > GROUP_BYTES) {
                        break;
                    }
                    binds += script.binds();
                    bytes += script.bytes();
                    members.push(waiting.members.pop_front().expect("looked at"));
                }
                if members.is_empty() {
                    waiting.writers -= 1;
                    return;
                }
                members
            };
            let started = Instant::now();
            let held = match conn.take() {
                Some(held) => Ok(held),
                None => self.pool.acquire().await,
            };
            match held {
                Ok(mut held) => {
                    if self.send(&mut held, members).await {
                        conn = Some(held);
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for (_, sender) in members {
                        let _ = sender.send(Err(StoreError::Unavailable(e.clone())));
                    }
                }
            }
            self.metrics.observe_store("write_group", started.elapsed());
        }
    }

    /// Sends one group; `false` when the connection may be broken.
    async fn send(&self, conn: &mut AnyConnection, mut members: Vec<(Script, oneshot::Sender<Result<(), StoreError>>)>) -> bool {
        let sound = |result: &Result<(), StoreError>| !matches!(result, Err(StoreError::Database(e)) if !matches!(e, sqlx::Error::Database(_)));
        if members.len() == 1 {
            let (script, sender) = members.pop().expect("one");
            let result = script.execute(conn).await;
            let kept = sound(&result);
            let _ = sender.send(result);
            return kept;
        }
        let mut merged = Script::new(Backend::Postgres);
        for (script, _) in &members {
            merged.absorb(script.clone());
        }
        match merged.execute(conn).await {
            Ok(()) => {
                for (_, sender) in members {
                    let _ = sender.send(Ok(()));
                }
                true
            }
            // The database refused the statement: nothing of it was written; each member alone.
            Err(StoreError::Duplicate | StoreError::Enrolled | StoreError::Database(sqlx::Error::Database(_))) => {
                let mut kept = true;
                for (script, sender) in members {
                    let result = script.execute(conn).await;
                    kept &= sound(&result);
                    let _ = sender.send(result);
                }
                kept
            }
            Err(e) => {
                let e = e.to_string();
                for (_, sender) in members {
                    let _ = sender.send(Err(StoreError::Unavailable(format!("the write may not have been committed: {e}"))));
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::store::{Store, StoreError, audit_row as audit};

    /// Committed at once, members share statements; one whose write the database refuses (a
    /// duplicate key, a patient found enrolled) fails alone, with its own error, and every member
    /// that was acknowledged is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_group_keeps_every_acknowledged_member_and_only_those() {
        let Some(url) = crate::need::postgres("store::postgres::tests::a_write_group_keeps_every_acknowledged_member_and_only_those") else { return };
        let schema = format!("unit_group_{}", std::process::id());
        let config = crate::config::StoreConfig { url: Some(url), schema: Some(schema.clone()), ..Default::default() };
        let metrics = Arc::new(crate::telemetry::Metrics::default());
        let store = Store::open(&config, metrics.clone()).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        tx.append_audit(&audit("taken")).await.unwrap();
        tx.mark_part2_patients(&["Patient/enrolled".into()], "2026-01-01");
        tx.commit().await.unwrap();
        // A second instance on the same database, with groups of its own.
        let other = Store::open(&config, Arc::new(crate::telemetry::Metrics::default())).await.unwrap();
        let members = 40;
        let barrier = Arc::new(tokio::sync::Barrier::new(members));
        let mut tasks = Vec::new();
        for i in 0..members {
            let (store, barrier) = (if i % 2 == 0 { store.clone() } else { other.clone() }, barrier.clone());
            tasks.push(tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                tx.append_audit(&audit(&format!("a-{i}"))).await.unwrap();
                match i % 5 {
                    0 => tx.append_audit(&audit("taken")).await.unwrap(),
                    1 => tx.unless_enrolled(&["Patient/enrolled".into()]),
                    _ => tx.unless_enrolled(&[format!("Patient/p-{i}")]),
                }
                barrier.wait().await;
                tx.commit().await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let found = store.read_audit(&format!("a-{i}")).await.unwrap().is_some();
            match i % 5 {
                0 => assert!(matches!(outcome, Err(StoreError::Duplicate)), "member {i}: {outcome:?}"),
                1 => assert!(matches!(outcome, Err(StoreError::Enrolled)), "member {i}: {outcome:?}"),
                _ => assert!(outcome.is_ok(), "member {i}: {outcome:?}"),
            }
            assert_eq!(found, i % 5 >= 2, "member {i}");
        }
        // Fewer statements than members: they were sent in groups.
        let rendered = metrics.render();
        let groups: usize = rendered
            .lines()
            .find(|l| l.starts_with("iop_store_operation_duration_seconds_count{operation=\"write_group\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert!(groups > 0 && groups < members / 2, "{groups} statements for {} members of this store and its first write", members / 2);
        other.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE"))).execute(&store.writer).await.unwrap();
        store.close().await;
    }
}
