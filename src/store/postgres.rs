//! The PostgreSQL backend, selected by a `postgres://` URL: one pool shared by any number of gateway instances' worth of connections, optionally in its own schema.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor};

use super::StoreError;

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
