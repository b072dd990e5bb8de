//! The embedded SQLite backend: a WAL database file in the data folder, one writer connection and a pool of readers.
//!
//! SQLite allows one writer at a time; giving writes their own single-connection pool queues them
//! in the gateway instead of failing with `SQLITE_BUSY`, while readers proceed in parallel (WAL).

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor};

use super::StoreError;

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
