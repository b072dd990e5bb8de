//! Bulk export jobs in the store: the job rows a worker claims by compare-and-set on a lease, the patients a job covers, and the keyset pages of resources as they were at the job's transaction time.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::query::{Bind, Probe, Sql, query_clauses, visibility_clause, visibility_per_row, where_clause};
use super::{Backend, COLUMNS, Store, StoreError, Stored, Tx, Visibility, stored};
use crate::search::{Clause, Query, TokenMatch, compartment};

/// One export job as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportJob {
    pub id: String,
    pub client: String,
    /// The scopes the kick-off's token granted; the worker never reads more.
    pub scope: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// The kick-off URL (the manifest's `request`).
    pub request: String,
    /// The kick-off as planned (JSON, [`crate::export::Plan`]).
    pub plan: String,
    pub transaction_time: String,
    pub created_at: i64,
    /// Milliseconds since the epoch before which no worker starts the job.
    pub not_before: i64,
    /// The worker's cursor (JSON, [`crate::export::Progress`]).
    pub progress: String,
    pub finished_at: i64,
    pub expires_at: i64,
    /// Why a failed job failed.
    pub error: String,
    /// The completion manifest (JSON) once completed.
    pub manifest: String,
}

const JOB_COLUMNS: &str = "id, client, scope, status, request, plan, transaction_time, created_at, not_before, progress, finished_at, expires_at, error, manifest";

fn job(row: &AnyRow) -> Result<ExportJob, sqlx::Error> {
    Ok(ExportJob {
        id: row.try_get(0)?,
        client: row.try_get(1)?,
        scope: row.try_get(2)?,
        status: row.try_get(3)?,
        request: row.try_get(4)?,
        plan: row.try_get(5)?,
        transaction_time: row.try_get(6)?,
        created_at: row.try_get(7)?,
        not_before: row.try_get(8)?,
        progress: row.try_get(9)?,
        finished_at: row.try_get(10)?,
        expires_at: row.try_get(11)?,
        error: row.try_get(12)?,
        manifest: row.try_get(13)?,
    })
}

/// Which patients' compartments a page is limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compartment {
    /// No limit (system-level export).
    All,
    /// Resources in any patient's compartment (`Patient/$export`).
    AnyPatient,
    /// Resources in the compartment of one of the job's `export_members`.
    Members,
}

/// One page of an export: resources of one type after `after` (by id), as they were at `transaction_time`.
pub struct ExportPage<'a> {
    pub job: &'a str,
    pub resource_type: &'a str,
    pub after: &'a str,
    pub transaction_time: &'a str,
    /// `meta.lastUpdated` after this instant.
    pub since: Option<&'a str>,
    /// `meta.lastUpdated` before this instant.
    pub until: Option<&'a str>,
    /// `_typeFilter` queries for this type: a resource matches one of them (none: every resource).
    pub filters: &'a [Query],
    pub compartment: Compartment,
    pub visibility: &'a Visibility,
    pub limit: usize,
}

/// A version as exported, with the current version's facts (who is a party now), which decide its disclosure.
pub struct Exported {
    pub current: Stored,
    pub version: Stored,
}

impl Store {
    /// An export job by id.
    pub async fn export_job(&self, id: &str) -> Result<Option<ExportJob>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = $1"))).bind(id).fetch_optional(&self.writer).await?;
        Ok(row.as_ref().map(job).transpose()?)
    }

    /// Claims the oldest running job that no worker holds (never started, or its worker stopped), for `owner` until `lease_until`.
    pub async fn claim_export(&self, now_ms: i64, lease_until: i64, owner: &str) -> Result<Option<ExportJob>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs WHERE status = 'running' AND lease_until <= $1 AND not_before <= $1 ORDER BY created_at LIMIT 4"
        )))
        .bind(now_ms)
        .fetch_all(&self.writer)
        .await?;
        for row in &rows {
            let found = job(row)?;
            // The conditions are checked again: another instance may have claimed it since the SELECT.
            let done = sqlx::query("UPDATE export_jobs SET lease_until = $2, lease_owner = $3 WHERE id = $1 AND status = 'running' AND lease_until <= $4")
                .bind(found.id.as_str())
                .bind(lease_until)
                .bind(owner)
                .bind(now_ms)
                .execute(&self.writer)
                .await?;
            if done.rows_affected() == 1 {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Commits a job's progress and renews its lease, if `owner` still holds it and the job still runs (not cancelled).
    pub async fn export_progress(&self, id: &str, owner: &str, progress: &str, lease_until: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE export_jobs SET progress = $3, lease_until = $4 WHERE id = $1 AND lease_owner = $2 AND status = 'running'")
            .bind(id)
            .bind(owner)
            .bind(progress)
            .bind(lease_until)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a job `owner` holds: `completed` with its manifest, or `failed` with the reason.
    pub async fn finish_export(&self, id: &str, owner: &str, completed: bool, text: &str, finished_at: i64, expires_at: i64) -> Result<bool, StoreError> {
        let (status, manifest, error) = if completed { ("completed", text, "") } else { ("failed", "", text) };
        let done = sqlx::query(
            "UPDATE export_jobs SET status = $3, manifest = $4, error = $5, finished_at = $6, expires_at = $7, lease_until = 0, lease_owner = '' \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(status)
        .bind(manifest)
        .bind(error)
        .bind(finished_at)
        .bind(expires_at)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets a job (cancelled, or expired) and its members; `false` if it was not there.
    pub async fn delete_export(&self, id: &str) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM export_members WHERE job = $1").bind(id).execute(&self.writer).await?;
        let done = sqlx::query("DELETE FROM export_jobs WHERE id = $1").bind(id).execute(&self.writer).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Finished jobs whose files have expired.
    pub async fn expired_exports(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM export_jobs WHERE status <> 'running' AND expires_at <= $1").bind(now_ms).fetch_all(&self.writer).await?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    /// The resource types that have at least one stored resource.
    pub async fn stored_types(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT type FROM resources ORDER BY type").fetch_all(&self.reader).await?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    /// One keyset page of an export, in id order: each resource's latest version at the job's
    /// transaction time (later changes are not in the export), and only what `visibility` lets
    /// through, handed to `each` row by row as the database sends them (never the whole page in
    /// memory); the number of rows.
    ///
    /// The page is read in the primary key's order and stops after `limit` rows; every condition is
    /// a per-row probe (no semi-join the planner could run over every row of the type and then
    /// sort), so a page costs the same however many resources the store holds.
    pub async fn export_page<E: From<StoreError>>(&self, page: &ExportPage<'_>, mut each: impl FnMut(Exported) -> Result<(), E>) -> Result<usize, E> {
        // The latest version at the transaction time (`column` of it).
        let at_time = |sql: &mut Sql, column: &str| {
            sql.push(&format!("(SELECT w.{column} FROM resource_versions w WHERE w.type = r.type AND w.id = r.id AND w.last_updated <= "));
            sql.text(page.transaction_time);
            sql.push(" ORDER BY w.version DESC LIMIT 1)");
        };
        let conditions = |sql: &mut Sql| {
            sql.push(" WHERE r.type = ");
            sql.text(page.resource_type);
            sql.push(" AND r.id > ");
            sql.text(page.after);
            visibility_per_row(sql, page.visibility);
            sql.push(" AND ");
            at_time(sql, "version");
            sql.push(" IS NOT NULL");
            if let Some(since) = page.since {
                sql.push(" AND ");
                at_time(sql, "last_updated");
                sql.push(" > ");
                sql.text(since);
            }
            if let Some(until) = page.until {
                sql.push(" AND ");
                at_time(sql, "last_updated");
                sql.push(" < ");
                sql.text(until);
            }
            if page.compartment != Compartment::All {
                sql.push(" AND ");
                Probe::PerRow.push(sql, true, |sql| {
                    sql.push("search_tokens c WHERE c.type = r.type AND c.id = r.id AND c.param = ");
                    sql.text(compartment::PARAM);
                    if page.compartment == Compartment::Members {
                        sql.push(" AND c.value IN (SELECT m.patient FROM export_members m WHERE m.job = ");
                        sql.text(page.job);
                        sql.push(")");
                    }
                });
            }
            if !page.filters.is_empty() {
                sql.push(" AND (");
                sql.push_joined(page.filters, " OR ", |sql, query| {
                    sql.push("(1 = 1");
                    query_clauses(sql, query);
                    sql.push(")");
                });
                sql.push(")");
            }
            sql.push(" ORDER BY r.id LIMIT ");
            sql.bind(Bind::Int(page.limit as i64));
        };
        let mut sql = Sql::default();
        sql.push("SELECT v.type, v.id, v.version, v.last_updated, v.body, v.parties, v.labels, v.created_by, v.owner, v.method, r.parties, r.labels, r.owner FROM ");
        match self.backend {
            // One level: SQLite reads `r` in key order and looks each version up, so rows leave as they
            // are found (an outer ORDER BY would sort the page's bodies in memory first).
            Backend::Sqlite => {
                sql.push("resources r JOIN resource_versions v ON v.type = r.type AND v.id = r.id AND v.version = ");
                at_time(&mut sql, "version");
                conditions(&mut sql);
            }
            // The page's keys first, then their versions: with the version's lookup in the join,
            // PostgreSQL hashes every version of the type and sorts them on every page.
            Backend::Postgres => {
                sql.push("(SELECT r.type, r.id, r.parties, r.labels, r.owner, ");
                at_time(&mut sql, "version");
                sql.push(" AS at_version FROM resources r");
                conditions(&mut sql);
                sql.push(") r JOIN resource_versions v ON v.type = r.type AND v.id = r.id AND v.version = r.at_version ORDER BY r.id");
            }
        }
        let split = |s: String| s.split(' ').filter(|p| !p.is_empty()).map(str::to_string).collect::<Vec<_>>();
        let query = sql.into_query();
        let mut rows = query.fetch(&self.reader);
        let mut count = 0;
        while let Some(row) = std::future::poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
            let row = row.map_err(StoreError::from)?;
            let mut version = stored(&row, None).map_err(StoreError::from)?;
            let body = std::mem::take(&mut version.body);
            let current = Stored { parties: split(row.try_get(10).map_err(StoreError::from)?), labels: split(row.try_get(11).map_err(StoreError::from)?), owner: row.try_get(12).map_err(StoreError::from)?, ..version.clone() };
            version.body = body;
            drop(row);
            count += 1;
            each(Exported { current, version })?;
        }
        Ok(count)
    }

    /// A page of one patient's compartment (`Patient/[id]/$everything`): current versions of the
    /// given types, ordered by type and id, with the total; `since` keeps those updated after it.
    pub async fn compartment_page(
        &self,
        patient: &str,
        types: &[String],
        since: Option<&str>,
        visibility: &Visibility,
        count: usize,
        offset: usize,
    ) -> Result<(i64, Vec<Stored>), StoreError> {
        let build = |sql: &mut Sql| {
            sql.push(" WHERE r.type IN (");
            sql.push_joined(types, ", ", |sql, t| sql.text(t));
            sql.push(")");
            visibility_clause(sql, visibility);
            sql.push(" AND EXISTS (SELECT 1 FROM search_tokens c WHERE c.type = r.type AND c.id = r.id AND c.param = ");
            sql.text(compartment::PARAM);
            sql.push(" AND c.value = ");
            sql.text(patient);
            sql.push(")");
            if let Some(since) = since {
                sql.push(" AND r.last_updated > ");
                sql.text(since);
            }
        };
        if types.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut count_sql = Sql::default();
        count_sql.push("SELECT COUNT(*) FROM resources r");
        build(&mut count_sql);
        let total: i64 = count_sql.into_query().fetch_one(&self.reader).await?.try_get(0)?;
        let mut sql = Sql::default();
        sql.push(&format!("SELECT {} FROM resources r", COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")));
        build(&mut sql);
        sql.push(" ORDER BY r.type, r.id LIMIT ");
        sql.bind(Bind::Int(count as i64));
        sql.push(" OFFSET ");
        sql.bind(Bind::Int(offset as i64));
        let rows = sql.into_query().fetch_all(&self.reader).await?;
        Ok((total, rows.iter().map(|r| stored(r, Some("PUT".into()))).collect::<Result<_, _>>()?))
    }
}

impl Tx {
    /// The client's running exports, counted under a lock on the client so two kick-offs (on any instances) cannot both pass the limit.
    pub async fn running_exports(&mut self, client: &str) -> Result<i64, StoreError> {
        self.lock_type(&format!("export:{client}")).await?;
        Ok(sqlx::query("SELECT COUNT(*) FROM export_jobs WHERE client = $1 AND status = 'running'").bind(client).fetch_one(self.conn().await?).await?.try_get(0)?)
    }

    pub async fn insert_export(&mut self, j: &ExportJob) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO export_jobs (id, client, scope, status, request, plan, transaction_time, created_at, not_before, lease_until, lease_owner, progress, finished_at, expires_at, error, manifest) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, '', $10, $11, $12, $13, $14)",
        )
        .bind(j.id.as_str())
        .bind(j.client.as_str())
        .bind(j.scope.as_str())
        .bind(j.status.as_str())
        .bind(j.request.as_str())
        .bind(j.plan.as_str())
        .bind(j.transaction_time.as_str())
        .bind(j.created_at)
        .bind(j.not_before)
        .bind(j.progress.as_str())
        .bind(j.finished_at)
        .bind(j.expires_at)
        .bind(j.error.as_str())
        .bind(j.manifest.as_str())
        .execute(self.conn().await?)
        .await?;
        Ok(())
    }

    /// Adds patients (`Patient/<id>`) to a job's members.
    pub async fn add_export_members(&mut self, job: &str, patients: &[String]) -> Result<(), StoreError> {
        for patient in patients {
            sqlx::query("INSERT INTO export_members (job, patient) VALUES ($1, $2) ON CONFLICT DO NOTHING").bind(job).bind(patient.as_str()).execute(self.conn().await?).await?;
        }
        Ok(())
    }

    /// Makes the job's members the patients of the EpisodeOfCare resources `visibility` lets through
    /// (only the active ones with `active_only`): the program's clients, computed from the store as it is now.
    pub async fn add_enrolled_members(&mut self, job: &str, active_only: bool, visibility: &Visibility) -> Result<(), StoreError> {
        let mut sql = Sql::default();
        sql.push("INSERT INTO export_members (job, patient) SELECT DISTINCT ");
        sql.text(job);
        sql.push(", e.value FROM resources r JOIN search_tokens e ON e.type = r.type AND e.id = r.id AND e.param = 'patient'");
        let status = Clause::Token { param: "status".into(), any: vec![TokenMatch { system: None, value: Some("active".into()) }] };
        let query = Query { clauses: if active_only { vec![status] } else { Vec::new() }, ..Query::default() };
        where_clause(&mut sql, &["EpisodeOfCare"], &query, Some(visibility));
        sql.into_query().execute(self.conn().await?).await?;
        Ok(())
    }

    /// Whether a patient is one of the job's members.
    pub async fn is_export_member(&mut self, job: &str, patient: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM export_members WHERE job = $1 AND patient = $2").bind(job).bind(patient).fetch_optional(self.conn().await?).await?.is_some())
    }

    /// Replaces the job's members by `patients`.
    pub async fn replace_export_members(&mut self, job: &str, patients: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM export_members WHERE job = $1").bind(job).execute(self.conn().await?).await?;
        self.add_export_members(job, patients).await
    }

    /// The number of the job's members.
    pub async fn export_member_count(&mut self, job: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM export_members WHERE job = $1").bind(job).fetch_one(self.conn().await?).await?.try_get(0)?)
    }
}
