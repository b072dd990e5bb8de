//! The embedded SQLite backend: a WAL database file in the data folder, one writer connection and a pool of readers.
//!
//! SQLite allows one writer at a time; giving writes their own single-connection pool queues them
//! in the gateway instead of failing with `SQLITE_BUSY`, while readers proceed in parallel (WAL).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use super::StoreError;
use super::query::Script;

/// The database file's name inside the data folder.
pub const FILE_NAME: &str = "gateway.db";

pub(super) fn migrator() -> Migrator {
    Migrator::with_migrations(migrations())
}

/// The schema's migrations in order (a test runs them up to a version to check what a later one does to existing rows).
pub(super) fn migrations() -> Vec<Migration> {
    let migration = |version, name: &str, sql: &'static str| Migration::new(version, name.to_string().into(), MigrationType::Simple, sqlx::SqlStr::from_static(sql), false);
    vec![
        migration(1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
        migration(2, "owner", include_str!("../../migrations/sqlite/0002_owner.sql")),
        migration(3, "exchange", include_str!("../../migrations/sqlite/0003_exchange.sql")),
        migration(4, "subscriptions", include_str!("../../migrations/sqlite/0004_subscriptions.sql")),
        migration(5, "utilization", include_str!("../../migrations/sqlite/0005_utilization.sql")),
        migration(6, "inquiries", include_str!("../../migrations/sqlite/0006_inquiries.sql")),
        migration(7, "history_by_time", include_str!("../../migrations/sqlite/0007_history_by_time.sql")),
        migration(8, "exports", include_str!("../../migrations/sqlite/0008_exports.sql")),
        migration(9, "topics", include_str!("../../migrations/sqlite/0009_topics.sql")),
        migration(10, "referrals", include_str!("../../migrations/sqlite/0010_referrals.sql")),
        migration(11, "consent", include_str!("../../migrations/sqlite/0011_consent.sql")),
        migration(12, "write_path", include_str!("../../migrations/sqlite/0012_write_path.sql")),
        // 13 is PostgreSQL's byte order: SQLite compares text by bytes already.
        migration(14, "index_by_id", include_str!("../../migrations/sqlite/0014_index_by_id.sql")),
    ]
}

pub(super) async fn connect(data_dir: &Path, readers: u32, acquire_timeout_secs: u64) -> Result<(AnyPool, AnyPool), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
    let dir = data_dir.canonicalize().map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
    let path = dir.join(FILE_NAME);
    let url = format!("sqlite://{}?mode=rwc", encode_path(&path.to_string_lossy()));
    let options = |max: u32| {
        AnyPoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(acquire_timeout_secs))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // FULL: a commit is on disk before the write is acknowledged, even if the machine loses power.
                    conn.execute("PRAGMA busy_timeout = 10000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            })
    };
    let writer = options(1).connect(&url).await?;
    sqlx::query("PRAGMA journal_mode = WAL").execute(&writer).await?;
    let reader = options(readers).connect(&url).await?;
    Ok((writer, reader))
}

/// Percent-encodes what a URL path cannot hold literally.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            ' ' => out.push_str("%20"),
            c => out.push(c),
        }
    }
    out
}

/// Group commit on the one writer connection: while a group's transaction is open, each write
/// transaction runs inside it as a savepoint (rolled back alone when it fails), and one `COMMIT`
/// (one fsync) then makes every finished member durable together. A member is answered only
/// after that `COMMIT`, so nothing acknowledged can be lost; if the `COMMIT` fails, every member
/// of the group fails. Without it a write waited for every earlier write's own fsync: at 8
/// concurrent writers the fsync was most of a request's time.
#[derive(Clone)]
pub(super) struct Group {
    writer: AnyPool,
    state: Arc<Mutex<Open>>,
}

#[derive(Default)]
struct Open {
    batch: Option<Batch>,
    next: u64,
}

/// A group's open transaction on the writer connection.
struct Batch {
    id: u64,
    conn: PoolConnection<Any>,
    /// Whether its `BEGIN IMMEDIATE` was sent.
    begun: bool,
    /// The `COMMIT`'s outcome, for the members waiting for it.
    done: watch::Sender<Option<Result<(), String>>>,
    /// Members that finished and wait for the `COMMIT`.
    released: usize,
    /// A savepoint could not be released or rolled back: the whole group must roll back.
    broken: bool,
}

/// One write transaction's place in a group: it holds the writer until it commits or rolls back.
pub(super) struct Member {
    guard: Option<OwnedMutexGuard<Open>>,
    savepoint: bool,
    group: Group,
}

impl Group {
    pub(super) fn new(writer: AnyPool) -> Group {
        Group { writer, state: Arc::new(Mutex::new(Open::default())) }
    }

    /// Waits for the writer (in arrival order) and joins the open group, or opens one (its
    /// `BEGIN IMMEDIATE` goes with the first member's statements).
    pub(super) async fn join(&self) -> Result<Member, StoreError> {
        let mut guard = self.state.clone().lock_owned().await;
        if guard.batch.is_none() {
            let conn = self.writer.acquire().await?;
            guard.next += 1;
            guard.batch = Some(Batch { id: guard.next, conn, begun: false, done: watch::channel(None).0, released: 0, broken: false });
        }
        Ok(Member { guard: Some(guard), savepoint: false, group: self.clone() })
    }

    /// Commits group `id` unless a member queued before this call did already; members queued
    /// for the writer before this call therefore join it first.
    fn commit_soon(&self, id: u64) {
        let state = self.state.clone();
        // A task of its own, so that a request cancelled while waiting cannot leave a group open.
        tokio::spawn(async move {
            let mut guard = state.lock().await;
            if guard.batch.as_ref().is_some_and(|b| b.id == id) {
                let mut batch = guard.batch.take().expect("checked");
                let result = if batch.broken {
                    let _ = batch.conn.execute("ROLLBACK").await;
                    Err("a member of the group commit failed; the group was rolled back".to_string())
                } else {
                    batch.conn.execute("COMMIT").await.map(|_| ()).map_err(|e| e.to_string())
                };
                batch.done.send_replace(Some(result));
            }
        });
    }

    /// Ends a member that keeps nothing: its savepoint rolled back, and the group closed if no
    /// finished member waits for it.
    async fn roll_back(&self, mut guard: OwnedMutexGuard<Open>, savepoint: bool) {
        let Some(batch) = guard.batch.as_mut() else { return };
        if savepoint && batch.conn.execute("ROLLBACK TO member; RELEASE member").await.is_err() {
            batch.broken = true;
        }
        if batch.released == 0 {
            let mut batch = guard.batch.take().expect("checked");
            if batch.begun {
                let _ = batch.conn.execute("ROLLBACK").await;
            }
            batch.done.send_replace(Some(Err("rolled back".into())));
        }
    }
}

impl Member {
    /// Runs `script` on the writer connection inside this member's savepoint; the group's
    /// `BEGIN IMMEDIATE` and the savepoint, when not yet open, go in the same round trip (each
    /// statement sent alone is a hop to SQLite's connection thread and back).
    pub(super) async fn run(&mut self, mut script: Script) -> Result<&mut AnyConnection, StoreError> {
        let batch = self.guard.as_mut().and_then(|g| g.batch.as_mut()).ok_or_else(|| StoreError::Unavailable("the write group is closed".into()))?;
        if !self.savepoint {
            script.before("SAVEPOINT member");
            // Set before it runs: if the script fails part-way, rolling back to a savepoint that
            // was never made fails too, which rolls back the whole group (never less than needed).
            self.savepoint = true;
        }
        if !batch.begun {
            script.before("BEGIN IMMEDIATE");
            batch.begun = true;
        }
        if !script.is_empty() {
            script.execute(&mut batch.conn).await?;
        }
        Ok(&mut batch.conn)
    }

    /// The writer connection, inside this member's savepoint (after [`Member::run`]).
    pub(super) fn conn(&mut self) -> Result<&mut AnyConnection, StoreError> {
        self.guard.as_mut().and_then(|g| g.batch.as_mut()).map(|b| &mut *b.conn).ok_or_else(|| StoreError::Unavailable("the write group is closed".into()))
    }

    /// Runs `script` (what the transaction queued), keeps this member's work and waits until its
    /// group committed it.
    pub(super) async fn commit(mut self, mut script: Script) -> Result<(), StoreError> {
        if !self.savepoint && script.is_empty() {
            // Nothing was written.
            let guard = self.guard.take().expect("a member holds the writer until it ends");
            self.group.roll_back(guard, false).await;
            return Ok(());
        }
        script.after("RELEASE member");
        self.run(script).await?;
        self.savepoint = false;
        let batch = self.guard.as_mut().and_then(|g| g.batch.as_mut()).ok_or_else(|| StoreError::Unavailable("the write group is closed".into()))?;
        batch.released += 1;
        let (id, mut done) = (batch.id, batch.done.subscribe());
        drop(self.guard.take());
        self.group.commit_soon(id);
        let outcome = done.wait_for(Option::is_some).await.map(|r| r.clone().unwrap_or(Err("no outcome".into())));
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("the write was not committed: {e}"))),
            Err(_) => Err(StoreError::Unavailable("the write group ended without an outcome".into())),
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        let (group, savepoint) = (self.group.clone(), self.savepoint);
        // Rolling back takes statements, which cannot run in `drop`.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { group.roll_back(guard, savepoint).await });
            }
            Err(_) => {
                if let Some(batch) = guard.batch.as_mut() {
                    batch.broken = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::store::{Store, StoreError, audit_row as audit};

    /// Concurrent transactions share commits; one that fails or is dropped takes only its own
    /// writes with it, and every one that was acknowledged is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_group_keeps_every_acknowledged_member_and_only_those() {
        let dir = std::env::temp_dir().join(format!("iop-gw-store-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StoreConfig { data_dir: dir.clone(), ..Default::default() };
        let store = Store::open(&config, Arc::new(crate::telemetry::Metrics::default())).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        tx.claim_message(&["taken".into()], "", "").await.unwrap();
        tx.commit().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                tx.append_audit(&audit(&format!("a-{i}"))).await.unwrap();
                match i % 4 {
                    // A statement fails after this member's queued write went in: both go.
                    0 => {
                        assert!(matches!(tx.claim_message(&["taken".into()], "", "").await, Err(StoreError::Duplicate)));
                        false
                    }
                    // Dropped without a commit.
                    1 => false,
                    _ => tx.commit().await.is_ok(),
                }
            }));
        }
        let mut kept = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            kept.push((i, task.await.unwrap()));
        }
        for (i, acknowledged) in kept {
            let found = store.read_audit(&format!("a-{i}")).await.unwrap().is_some();
            assert_eq!(found, acknowledged, "member {i}");
            assert_eq!(acknowledged, i % 4 >= 2, "member {i}");
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
