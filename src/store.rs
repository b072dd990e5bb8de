//! Durable storage of resources, their versions, the search index, the audit trail and the token tables; the only module that speaks SQL.
//!
//! One implementation over sqlx's `Any` driver serves both backends; what differs between them
//! (connection set-up, migrations, locking) is in [`sqlite`] and [`postgres`]. SQL text is the
//! same for both (`$1` placeholders, which sqlx's SQLite driver also understands). Every value
//! from a request is bound, never spliced into SQL.
//!
//! Durability: a write is acknowledged only after its transaction commits (SQLite WAL with
//! `synchronous=FULL`; PostgreSQL's default synchronous commit). Concurrency: updates are a
//! compare-and-set on the version (`UPDATE … WHERE version = $n`), so two writers holding the
//! same ETag cannot both win; conditional creates take a per-type lock (PostgreSQL advisory lock;
//! SQLite writes go through a single connection).

mod consents;
mod exchange;
mod exports;
mod inquiries;
mod postgres;
mod query;
mod referrals;
mod sqlite;
mod subscriptions;
mod topics;

use std::sync::Arc;
use std::time::Instant;

use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, AnyPool, Row};

use crate::config::StoreConfig;
use crate::search::{IndexEntry, Query};
use crate::telemetry::Metrics;

pub use consents::Unlabelled;
pub use exchange::{Attempt, Ending, Message, MessageStatus, NewMessage, RecordCursor, RecordFilter, RecordRow};
pub use exports::{Compartment, ExportJob, ExportPage, Exported};
pub use inquiries::Pended;
pub use query::{AuditQuery, Bind, HistoryScope};
pub use referrals::ReferralRoute;
pub use subscriptions::SubscriptionRow;
pub use topics::{TopicEvent, TopicSubscription};

/// Which database is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The version the write was based on is no longer current.
    #[error("the resource was changed by someone else (current version {current})")]
    Conflict { current: i64 },
    /// A row with this key exists already (a create racing another create of the same id, a replayed key).
    #[error("already exists")]
    Duplicate,
    #[error("the store is busy: {0}")]
    Unavailable(String),
    #[error("cannot prepare the data folder {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    /// A write checked to be about no enrolled patient was about one (enrolled by another instance
    /// meanwhile, or before this one started): nothing was written; the store now knows them, so
    /// the next attempt labels the write.
    #[error("a patient this write is about is enrolled in a substance-use program; retry")]
    Enrolled,
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Duplicate,
            sqlx::Error::Database(db) if db.is_check_violation() && (db.constraint() == Some("part2_enrolled") || db.message().contains("part2_enrolled")) => StoreError::Enrolled,
            _ => StoreError::Database(e),
        }
    }
}

/// One version of a resource, stored or about to be written, with what authorization needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: String,
    /// The resource as JSON text, `meta.versionId` and `meta.lastUpdated` included.
    pub body: String,
    pub parties: Vec<String>,
    pub labels: Vec<String>,
    pub created_by: String,
    /// `Organization/<id>` that owns the resource: its creator's; the same in every version.
    pub owner: String,
    /// `POST` or `PUT`: how this version was written (history entries).
    pub method: String,
}

impl Stored {
    /// What the disclosure check needs, without consent rules (Part 2 data then goes to its owner only).
    pub fn facts(&self) -> crate::auth::policy::Facts<'_> {
        self.facts_with(&[])
    }

    /// What the disclosure check needs, with the consent rules of the patients the resource is about.
    pub fn facts_with<'a>(&'a self, consents: &'a [crate::auth::consent::Rule]) -> crate::auth::policy::Facts<'a> {
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        crate::auth::policy::Facts { resource_type: &self.resource_type, parties: &self.parties, labels: &self.labels, owner: &self.owner, consents, at }
    }

    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

/// Which stored resources a search may return. The authorization model ([`crate::auth::Principal::visibility`])
/// fills it with the conditions of its disclosure check that SQL can evaluate, so that totals and
/// pages count only what will be served; every result still passes the disclosure check itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    /// Only resources this Organization is party to.
    pub party: String,
    /// `party` is the program, party to every resource: no party condition (and no `_party` rows,
    /// [`crate::search::party_index`]).
    pub party_to_all: bool,
    /// Leave out resources carrying this label (`system|code`) unless `party` owns them or a consent
    /// rule of their patient permits `party` for `purpose` at `at` (the conditions of `consent::decide`).
    pub withheld_label: Option<String>,
    /// The v3-ActReason code of the client's purpose of use.
    pub purpose: &'static str,
    /// Now, in seconds.
    pub at: i64,
    /// Only resources `party` may write: owned by it, or a Task whose `owner` it is (conditional operations).
    pub writable_only: bool,
}

/// One audit trail row: indexed columns plus the AuditEvent JSON.
#[derive(Clone, Debug)]
pub struct AuditRow {
    pub id: String,
    pub recorded: String,
    pub client: String,
    pub action: String,
    pub subtype: String,
    pub outcome: String,
    pub entity: String,
    pub body: String,
}

/// An access token as stored (by hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub client: String,
    pub scope: String,
    pub expires_at: i64,
}

/// The store: a pool for writes and one for reads (the same pool on PostgreSQL).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    writer: AnyPool,
    /// SQLite's group commit on the writer connection.
    sqlite_group: Option<sqlite::Group>,
    /// PostgreSQL's group commit of transactions that only queued.
    postgres_group: Option<postgres::Group>,
    reader: AnyPool,
    metrics: Arc<Metrics>,
    enrolled: Arc<consents::Enrolled>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish()
    }
}

const COLUMNS: &str = "type, id, version, last_updated, body, parties, labels, created_by, owner";

fn stored(row: &AnyRow, method: Option<String>) -> Result<Stored, sqlx::Error> {
    let split = |s: String| s.split(' ').filter(|p| !p.is_empty()).map(str::to_string).collect();
    Ok(Stored {
        resource_type: row.try_get(0)?,
        id: row.try_get(1)?,
        version: row.try_get(2)?,
        last_updated: row.try_get(3)?,
        body: row.try_get(4)?,
        parties: split(row.try_get(5)?),
        labels: split(row.try_get(6)?),
        created_by: row.try_get(7)?,
        owner: row.try_get(8)?,
        method: match method {
            Some(m) => m,
            None => row.try_get(9)?,
        },
    })
}

impl Store {
    /// Opens (creating if needed) the configured database and runs the embedded migrations.
    pub async fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, writer, reader) = match &config.url {
            Some(url) => {
                let pool = postgres::connect(url, config.schema.as_deref(), config.max_connections, config.acquire_timeout_secs).await?;
                (Backend::Postgres, pool.clone(), pool)
            }
            None => {
                let (writer, reader) = sqlite::connect(&config.data_dir, config.max_connections, config.acquire_timeout_secs).await?;
                (Backend::Sqlite, writer, reader)
            }
        };
        let migrator = match backend {
            Backend::Sqlite => sqlite::migrator(),
            Backend::Postgres => postgres::migrator(),
        };
        migrator.run(&writer).await?;
        let sqlite_group = (backend == Backend::Sqlite).then(|| sqlite::Group::new(writer.clone()));
        let postgres_group = (backend == Backend::Postgres).then(|| postgres::Group::new(writer.clone(), metrics.clone()));
        let store = Store { backend, writer, sqlite_group, postgres_group, reader, metrics, enrolled: Arc::default() };
        // A head start: a write about a patient not known here to be enrolled is still checked in
        // its own statement, since an enrolment may be committing meanwhile (or on another instance).
        store.enrolled.remember(&store.all_part2_patients().await?);
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        if self.backend == Backend::Sqlite {
            // The single writer connection may be busy; readiness means it can still be had.
            sqlx::query("SELECT 1").execute(&self.writer).await?;
        }
        Ok(())
    }

    fn observe(&self, operation: &'static str, started: Instant) {
        self.metrics.observe_store(operation, started.elapsed());
    }

    /// Starts a write transaction. Either way nothing is sent before the first statement that must
    /// run before the commit: only then is a PostgreSQL connection taken and `BEGIN` sent, or
    /// SQLite's write group joined (or at the commit), so the one writer is not held while the
    /// caller builds what it writes (versions, index, audit), only while the store runs it. A
    /// PostgreSQL transaction that never had to run a statement is committed by its write group.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let started = Instant::now();
        Ok(Tx { inner: None, member: None, queued: query::Script::new(self.backend), backend: self.backend, store: self.clone(), started, guarded: Vec::new(), queued_checks: 0, minted: Vec::new() })
    }

    /// The current version of a resource.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        let started = Instant::now();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM resources WHERE type = $1 AND id = $2")))
            .bind(resource_type)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        self.observe("read", started);
        Ok(row.map(|r| stored(&r, Some("PUT".into()))).transpose()?)
    }

    /// One version of a resource.
    pub async fn vread(&self, resource_type: &str, id: &str, version: i64) -> Result<Option<Stored>, StoreError> {
        let started = Instant::now();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS}, method FROM resource_versions WHERE type = $1 AND id = $2 AND version = $3")))
            .bind(resource_type)
            .bind(id)
            .bind(version)
            .fetch_optional(&self.reader)
            .await?;
        self.observe("vread", started);
        Ok(row.map(|r| stored(&r, None)).transpose()?)
    }

    /// Versions newest first, with their number: of one resource, or of every resource of some
    /// types (`since`: written at or after that instant). `visibility`, when given, keeps only the
    /// versions of resources it lets through whose own labels withhold nothing.
    pub async fn history(&self, scope: HistoryScope<'_>, since: Option<&str>, count: usize, offset: usize, visibility: Option<&Visibility>) -> Result<(i64, Vec<Stored>), StoreError> {
        let started = Instant::now();
        let result = query::history(&self.reader, scope, since, count, offset, visibility).await;
        self.observe("history", started);
        result
    }

    /// Runs a search; `visibility`, when given, keeps only what it lets through.
    pub async fn search(&self, resource_type: &str, query: &Query, visibility: Option<&Visibility>) -> Result<(i64, Vec<Stored>), StoreError> {
        self.search_types(&[resource_type], query, visibility).await
    }

    /// Runs a search over several types at once (only parameters common to all of them).
    pub async fn search_types(&self, types: &[&str], query: &Query, visibility: Option<&Visibility>) -> Result<(i64, Vec<Stored>), StoreError> {
        let started = Instant::now();
        let mut conn = self.reader.acquire().await?;
        let result = query::search(&mut conn, types, query, visibility, !query.no_total).await;
        self.observe("search", started);
        result
    }

    /// The current versions of the given `(type, id)` pairs that exist.
    pub async fn read_many(&self, keys: &[(String, String)]) -> Result<Vec<Stored>, StoreError> {
        let started = Instant::now();
        let mut out = Vec::new();
        for chunk in keys.chunks(100) {
            let mut sql = query::Sql::default();
            sql.push(&format!("SELECT {COLUMNS} FROM resources WHERE "));
            sql.push_joined(chunk, " OR ", |sql, (resource_type, id)| {
                sql.push("(type = ");
                sql.text(resource_type);
                sql.push(" AND id = ");
                sql.text(id);
                sql.push(")");
            });
            let rows = sql.into_query().fetch_all(&self.reader).await?;
            for row in &rows {
                out.push(stored(row, Some("PUT".into()))?);
            }
        }
        self.observe("read_many", started);
        Ok(out)
    }

    /// The values of a reference parameter on the given resources (`_include`).
    pub async fn references(&self, resource_type: &str, ids: &[String], param: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(200) {
            let mut sql = query::Sql::default();
            sql.push("SELECT DISTINCT value FROM search_tokens WHERE type = ");
            sql.text(resource_type);
            sql.push(" AND param = ");
            sql.text(param);
            sql.push(" AND id IN (");
            sql.push_joined(chunk, ", ", |sql, id| sql.text(id));
            sql.push(")");
            for row in sql.into_query().fetch_all(&self.reader).await? {
                let value: String = row.try_get(0)?;
                if !out.contains(&value) {
                    out.push(value);
                }
            }
        }
        Ok(out)
    }

    /// Appends to the audit trail outside any resource transaction (reads, searches, denials).
    pub async fn append_audit(&self, row: &AuditRow) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut script = query::Script::new(self.backend);
        query::audit_row(&mut script, row);
        script.execute(&mut *self.writer.acquire().await?).await?;
        self.observe("audit", started);
        Ok(())
    }

    /// Audit events matching a filter, newest first, with the total.
    pub async fn search_audit(&self, filter: &AuditQuery) -> Result<(i64, Vec<String>), StoreError> {
        let started = Instant::now();
        let result = query::search_audit(&self.reader, filter).await;
        self.observe("audit_search", started);
        result
    }

    pub async fn read_audit(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT body FROM audit_events WHERE id = $1").bind(id).fetch_optional(&self.reader).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Records a client assertion id; `false` when it was seen before (a replay).
    pub async fn remember_assertion(&self, client: &str, jti: &str, expires_at: i64) -> Result<bool, StoreError> {
        let result = sqlx::query("INSERT INTO client_assertions (client, jti, expires_at) VALUES ($1, $2, $3)")
            .bind(client)
            .bind(jti)
            .bind(expires_at)
            .execute(&self.writer)
            .await;
        match result.map_err(StoreError::from) {
            Ok(_) => Ok(true),
            Err(StoreError::Duplicate) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn save_token(&self, token_hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO access_tokens (token_hash, client, scope, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(token_hash)
            .bind(record.client.as_str())
            .bind(record.scope.as_str())
            .bind(record.expires_at)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn find_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let started = Instant::now();
        let row = sqlx::query("SELECT client, scope, expires_at FROM access_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.reader)
            .await?;
        self.observe("token_lookup", started);
        Ok(row.map(|r| -> Result<TokenRecord, sqlx::Error> { Ok(TokenRecord { client: r.try_get(0)?, scope: r.try_get(1)?, expires_at: r.try_get(2)? }) }).transpose()?)
    }

    /// Forgets expired access tokens and assertion ids.
    pub async fn purge_expired(&self, now: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM access_tokens WHERE expires_at < $1").bind(now).execute(&self.writer).await?;
        sqlx::query("DELETE FROM client_assertions WHERE expires_at < $1").bind(now - 3600).execute(&self.writer).await?;
        Ok(())
    }

    /// The response recorded for a message key, if the message was processed before.
    pub async fn processed_message(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT response FROM processed_messages WHERE key = $1").bind(key).fetch_optional(&self.writer).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The number of current resources of a type (benchmarks and tests).
    pub async fn count(&self, resource_type: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM resources WHERE type = $1").bind(resource_type).fetch_one(&self.reader).await?.try_get(0)?)
    }
}

/// A write transaction; dropped without [`Tx::commit`] it rolls back.
///
/// Writes whose outcome nothing waits for (new versions, their index, audit rows) are queued and
/// sent together with the next statement that must run, or at the commit; a transaction that
/// only queued goes to PostgreSQL without `BEGIN`/`COMMIT` as part of one statement (atomic by
/// itself) that its write group sends for every transaction then waiting.
pub struct Tx {
    /// The open transaction, once a statement had to run before the commit.
    inner: Option<sqlx::Transaction<'static, Any>>,
    /// SQLite: the transaction's savepoint in the write group instead, once joined.
    member: Option<sqlite::Member>,
    queued: query::Script,
    backend: Backend,
    store: Store,
    started: Instant,
    /// Patients whose enrolment a queued write was checked against ([`Tx::unless_enrolled`]).
    guarded: Vec<String>,
    /// How many of `guarded` (the last ones) are checked by a statement still queued.
    queued_checks: usize,
    /// Resources whose ids the gateway assigned in this transaction ([`Tx::minted`]).
    minted: Vec<String>,
}

impl Tx {
    /// The transaction's connection, with `BEGIN` sent and the queued writes before whatever comes next.
    async fn conn(&mut self) -> Result<&mut AnyConnection, StoreError> {
        if let Err(e) = self.flush().await {
            return Err(self.learn(e).await);
        }
        match (&mut self.member, &mut self.inner) {
            (Some(member), _) => member.conn(),
            (None, Some(inner)) => Ok(inner),
            (None, None) => Err(StoreError::Unavailable("the transaction failed to begin".into())),
        }
    }

    /// Joins SQLite's write group or sends PostgreSQL's `BEGIN`, then the queued writes.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(group) = &self.store.sqlite_group {
            if self.member.is_none() {
                self.member = Some(group.join().await?);
            }
            let queued = std::mem::replace(&mut self.queued, query::Script::new(self.backend));
            self.queued_checks = 0;
            self.member.as_mut().expect("joined above").run(queued).await?;
            return Ok(());
        }
        if self.inner.is_none() {
            let conn = self.store.writer.acquire().await?;
            self.inner = Some(sqlx::Transaction::begin(conn, None).await?);
        }
        let inner = self.inner.as_mut().expect("begun above");
        if !self.queued.is_empty() {
            self.queued_checks = 0;
            std::mem::replace(&mut self.queued, query::Script::new(self.backend)).execute(inner).await?;
        }
        Ok(())
    }

    /// After a failed statement: when it was the enrolment check that failed, which of the checked
    /// patients are enrolled, remembered so the next attempt labels the write (read outside the
    /// failed transaction; an enrolment is never undone, so what it finds stays true).
    async fn learn(&mut self, e: StoreError) -> StoreError {
        if !matches!(e, StoreError::Enrolled) {
            return e;
        }
        // A failed transaction is rolled back first, so its connection is free to ask.
        if let Some(inner) = self.inner.take() {
            let _ = inner.rollback().await;
        }
        match self.store.part2_patients(&self.guarded).await {
            Ok(found) => {
                self.store.enrolled.remember(&found);
                e
            }
            Err(lookup) => lookup,
        }
    }

    /// Queues a check that none of these patients is enrolled in a substance-use program, run with
    /// the transaction's writes: if one is, nothing is written and the commit (or the next
    /// statement) fails with [`StoreError::Enrolled`], so a write labelled as not about an enrolled
    /// patient is stored only if that held when it was written.
    pub fn unless_enrolled(&mut self, patients: &[String]) {
        // A check still queued covers later writes about the same patients: it runs with them.
        let queued = &self.guarded[self.guarded.len() - self.queued_checks..];
        let patients: Vec<String> = patients.iter().filter(|p| !queued.contains(p) && !self.minted.contains(p)).cloned().collect();
        if patients.is_empty() {
            return;
        }
        self.queued.statement(|sql| {
            sql.push("INSERT INTO part2_unlabelled (patient) SELECT patient FROM part2_patients WHERE patient IN (");
            sql.push_joined(&patients, ", ", |sql, p| sql.text(p));
            sql.push(")");
        });
        self.queued_checks += patients.len();
        self.guarded.extend(patients);
    }

    /// Names a resource (`Type/id`) whose id the gateway has just assigned for this transaction to
    /// create: no one could name it before, so no enrolment is about it and writes about it need
    /// no [`Tx::unless_enrolled`] check (a referral's new Patient and the records about it).
    pub fn minted(&mut self, reference: String) {
        self.minted.push(reference);
    }

    /// Serializes conditional operations on one resource type across instances, until commit.
    pub async fn lock_type(&mut self, resource_type: &str) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(format!("iop-gateway:{resource_type}")).execute(self.conn().await?).await?;
        }
        Ok(())
    }

    /// The current version of a resource as this transaction sees it.
    pub async fn current(&mut self, resource_type: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM resources WHERE type = $1 AND id = $2")))
            .bind(resource_type)
            .bind(id)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.map(|r| stored(&r, Some("PUT".into()))).transpose()?)
    }

    /// A search inside the transaction (conditional create and update).
    pub async fn search(&mut self, resource_type: &str, query: &Query, visibility: Option<&Visibility>) -> Result<(i64, Vec<Stored>), StoreError> {
        query::search(self.conn().await?, &[resource_type], query, visibility, false).await
    }

    /// Writes a version and its search index: version 1 must not exist yet; version n replaces exactly version n-1.
    /// `fresh_id`: the gateway chose the id just now, so a first version cannot meet a concurrent one.
    pub async fn write(&mut self, w: &Stored, index: &[IndexEntry], fresh_id: bool) -> Result<(), StoreError> {
        if w.version > 1 {
            // The compare-and-set goes alone: whether it changed a row decides what follows.
            let done = sqlx::query(
                "UPDATE resources SET version = $3, last_updated = $4, body = $5, parties = $6, labels = $7 WHERE type = $1 AND id = $2 AND version = $8",
            )
            .bind(w.resource_type.as_str())
            .bind(w.id.as_str())
            .bind(w.version)
            .bind(w.last_updated.as_str())
            .bind(w.body.as_str())
            .bind(w.parties.join(" "))
            .bind(w.labels.join(" "))
            .bind(w.version - 1)
            .execute(self.conn().await?)
            .await?;
            if done.rows_affected() != 1 {
                let current = self.current(&w.resource_type, &w.id).await?.map(|s| s.version).unwrap_or(0);
                return Err(StoreError::Conflict { current });
            }
        }
        query::write_version(&mut self.queued, w, index);
        if w.version == 1 && !fresh_id {
            // A concurrent create of the same id must fail here, where the caller retries, not at the commit.
            self.conn().await?;
        }
        Ok(())
    }

    /// Appends to the audit trail in the same transaction as the change it records.
    pub async fn append_audit(&mut self, row: &AuditRow) -> Result<(), StoreError> {
        query::audit_row(&mut self.queued, row);
        Ok(())
    }

    /// Records that a message was processed under each key; `Duplicate` if any key was seen.
    pub async fn claim_message(&mut self, keys: &[String], response: &str, received: &str) -> Result<(), StoreError> {
        for key in keys {
            sqlx::query("INSERT INTO processed_messages (key, response, received) VALUES ($1, $2, $3)")
                .bind(key.as_str())
                .bind(response)
                .bind(received)
                .execute(self.conn().await?)
                .await?;
        }
        Ok(())
    }

    pub async fn commit(mut self) -> Result<(), StoreError> {
        let result = if let Some(group) = self.store.sqlite_group.clone() {
            let queued = std::mem::replace(&mut self.queued, query::Script::new(self.backend));
            match self.member.take() {
                Some(member) => member.commit(queued).await,
                None if queued.is_empty() => Ok(()),
                None => match group.join().await {
                    Ok(member) => member.commit(queued).await,
                    Err(e) => Err(e),
                },
            }
        } else {
            let one_statement = self.queued.is_one_statement();
            match (&self.inner, &self.store.postgres_group) {
                (None, _) if self.queued.is_empty() => Ok(()),
                (None, Some(group)) if one_statement => group.commit(std::mem::replace(&mut self.queued, query::Script::new(self.backend))).await,
                _ => match self.conn().await {
                    Ok(_) => Ok(self.inner.take().expect("begun by conn").commit().await?),
                    Err(e) => Err(e),
                },
            }
        };
        let result = match result {
            Err(e) => Err(self.learn(e).await),
            ok => ok,
        };
        self.store.observe("write_transaction", self.started);
        result
    }
}

/// An audit row for the write-group tests of both backends: the smallest write a transaction can make.
#[cfg(test)]
pub(crate) fn audit_row(id: &str) -> AuditRow {
    let text = |s: &str| s.to_string();
    AuditRow { id: text(id), recorded: text("2026-01-01T00:00:00.000Z"), client: text("c"), action: text("C"), subtype: text("create"), outcome: text("0"), entity: text(""), body: text("{}") }
}
