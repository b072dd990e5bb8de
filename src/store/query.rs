//! SQL built at run time: search over the index tables, index and audit inserts, and audit search. Every request value becomes a bound parameter.

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::AnyConnection;
use sqlx::{Any, Executor, Row};

use super::{AuditRow, COLUMNS, Store, StoreError, Stored, Visibility, stored};
use crate::search::{Clause, DateMatch, IndexEntry, Prefix, Query};

/// A value to bind to a `$n` placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    Text(String),
    Int(i64),
}

/// Accumulates SQL text and its bound values, numbering placeholders.
#[derive(Default)]
pub(super) struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    pub(super) fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// Appends a placeholder bound to `value`.
    pub(super) fn bind(&mut self, value: Bind) {
        self.binds.push(value);
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    pub(super) fn text(&mut self, value: &str) {
        self.bind(Bind::Text(value.to_string()));
    }

    /// Appends `each(item)` for every item, with `separator` between them.
    pub(super) fn push_joined<T>(&mut self, items: impl IntoIterator<Item = T>, separator: &str, mut each: impl FnMut(&mut Sql, T)) {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.push(separator);
            }
            each(self, item);
        }
    }

    /// Appends the items joined by `operator` as a balanced tree of parentheses: the expression is
    /// log2(n) deep rather than n, so no number of values reaches the databases' expression-depth limits.
    pub(super) fn push_balanced<T>(&mut self, items: &[T], operator: &str, each: &mut impl FnMut(&mut Sql, &T)) {
        match items {
            [] => self.push("(1 = 0)"),
            [one] => each(self, one),
            _ => {
                let (left, right) = items.split_at(items.len() / 2);
                self.push("(");
                self.push_balanced(left, operator, each);
                self.push(operator);
                self.push_balanced(right, operator, each);
                self.push(")");
            }
        }
    }

    /// The statement with its values bound.
    pub(super) fn into_query(self) -> sqlx::query::Query<'static, Any, AnyArguments> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(self.text));
        for bind in self.binds {
            query = match bind {
                Bind::Text(s) => query.bind(s),
                Bind::Int(i) => query.bind(i),
            };
        }
        query
    }
}

pub(super) fn where_clause(sql: &mut Sql, resource_type: &str, query: &Query, visibility: Option<&Visibility>) {
    sql.push(" WHERE r.type = ");
    sql.text(resource_type);
    if let Some(visibility) = visibility {
        visibility_clause(sql, visibility);
    }
    query_clauses(sql, query);
}

/// `AND …` conditions that keep only the rows of `resources r` a [`Visibility`] lets through.
pub(super) fn visibility_clause(sql: &mut Sql, visibility: &Visibility) {
    visibility_conditions(sql, visibility, Probe::Exists);
}

/// The same conditions as [`visibility_clause`], each index lookup a per-row probe that the planner
/// cannot turn into a join: for keyset pages (`ORDER BY r.id LIMIT n`) read in the primary key's
/// order, which stop after `n` rows, where PostgreSQL would otherwise read every row of the type
/// (a hash semi-join over the `_party` tokens) and sort them on every page.
pub(super) fn visibility_per_row(sql: &mut Sql, visibility: &Visibility) {
    visibility_conditions(sql, visibility, Probe::PerRow);
}

/// How an "is there such a row" condition is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// `EXISTS (SELECT 1 …)`, which the planner may turn into a (semi-)join.
    Exists,
    /// `(SELECT 1 … LIMIT 1) IS NOT NULL`: a scalar subquery, evaluated for each row that reaches it.
    PerRow,
}

impl Probe {
    /// Appends the condition that `SELECT 1 FROM {from_where}` finds a row (`present`) or none.
    pub(super) fn push(self, sql: &mut Sql, present: bool, from_where: impl FnOnce(&mut Sql)) {
        match (self, present) {
            (Probe::Exists, true) => sql.push("EXISTS (SELECT 1 FROM "),
            (Probe::Exists, false) => sql.push("NOT EXISTS (SELECT 1 FROM "),
            (Probe::PerRow, _) => sql.push("(SELECT 1 FROM "),
        }
        from_where(sql);
        match (self, present) {
            (Probe::Exists, _) => sql.push(")"),
            (Probe::PerRow, true) => sql.push(" LIMIT 1) IS NOT NULL"),
            (Probe::PerRow, false) => sql.push(" LIMIT 1) IS NULL"),
        }
    }
}

fn visibility_conditions(sql: &mut Sql, visibility: &Visibility, probe: Probe) {
    sql.push(" AND ");
    probe.push(sql, true, |sql| {
        sql.push("search_tokens p WHERE p.type = r.type AND p.id = r.id AND p.param = '_party' AND p.value = ");
        sql.text(&visibility.party);
    });
    if let Some(label) = &visibility.withheld_label {
        sql.push(" AND (r.owner = ");
        sql.text(&visibility.party);
        sql.push(" OR ");
        probe.push(sql, false, |sql| {
            sql.push("search_tokens l WHERE l.type = r.type AND l.id = r.id AND l.param = '_security' AND l.value = ");
            sql.text(label);
        });
        sql.push(")");
    }
    if visibility.writable_only {
        sql.push(" AND (r.owner = ");
        sql.text(&visibility.party);
        sql.push(" OR (r.type = 'Task' AND ");
        probe.push(sql, true, |sql| {
            sql.push("search_tokens o WHERE o.type = r.type AND o.id = r.id AND o.param = 'owner' AND o.value = ");
            sql.text(&visibility.party);
        });
        sql.push("))");
    }
}

/// `AND …` conditions of a search's clauses on the rows of `resources r`.
pub(super) fn query_clauses(sql: &mut Sql, query: &Query) {
    for clause in &query.clauses {
        match clause {
            Clause::Id(ids) => {
                sql.push(" AND r.id IN (");
                sql.push_joined(ids, ", ", |sql, id| sql.text(id));
                sql.push(")");
            }
            Clause::Token { param, any } => {
                sql.push(" AND EXISTS (SELECT 1 FROM search_tokens t WHERE t.type = r.type AND t.id = r.id AND t.param = ");
                sql.text(param);
                sql.push(" AND ");
                sql.push_balanced(any, " OR ", &mut |sql, m| {
                    sql.push("(1 = 1");
                    if let Some(system) = &m.system {
                        sql.push(" AND t.system = ");
                        sql.text(system);
                    }
                    if let Some(value) = &m.value {
                        sql.push(" AND t.value = ");
                        sql.text(value);
                    }
                    sql.push(")");
                });
                sql.push(")");
            }
            Clause::Date { param, any } => {
                sql.push(" AND EXISTS (SELECT 1 FROM search_dates d WHERE d.type = r.type AND d.id = r.id AND d.param = ");
                sql.text(param);
                sql.push(" AND ");
                sql.push_balanced(any, " OR ", &mut |sql, m| {
                    sql.push("(");
                    date_condition(sql, m);
                    sql.push(")");
                });
                sql.push(")");
            }
        }
    }
}

/// The FHIR date prefixes over ranges: the resource covers `[d.low, d.high)`, the query `[low, high)`.
fn date_condition(sql: &mut Sql, m: &DateMatch) {
    let (low, high) = (m.low.as_str(), m.high.as_str());
    match m.prefix {
        Prefix::Eq | Prefix::Ne => {
            sql.push(if m.prefix == Prefix::Ne { "NOT (d.low >= " } else { "(d.low >= " });
            sql.text(low);
            sql.push(" AND d.high <= ");
            sql.text(high);
            sql.push(")");
        }
        Prefix::Gt => {
            sql.push("d.high > ");
            sql.text(high);
        }
        Prefix::Lt => {
            sql.push("d.low < ");
            sql.text(low);
        }
        Prefix::Ge => {
            sql.push("d.high > ");
            sql.text(low);
        }
        Prefix::Le => {
            sql.push("d.low < ");
            sql.text(high);
        }
        Prefix::Sa => {
            sql.push("d.low >= ");
            sql.text(high);
        }
        Prefix::Eb => {
            sql.push("d.high <= ");
            sql.text(low);
        }
    }
}

pub(super) async fn search(
    conn: &mut AnyConnection,
    resource_type: &str,
    query: &Query,
    visibility: Option<&Visibility>,
    with_total: bool,
) -> Result<(i64, Vec<Stored>), StoreError> {
    let total = if with_total {
        let mut sql = Sql::default();
        sql.push("SELECT COUNT(*) FROM resources r");
        where_clause(&mut sql, resource_type, query, visibility);
        let row = sql.into_query().fetch_one(&mut *conn).await?;
        row.try_get::<i64, _>(0)?
    } else {
        -1
    };
    let mut sql = Sql::default();
    sql.push(&format!("SELECT {} FROM resources r", COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")));
    where_clause(&mut sql, resource_type, query, visibility);
    sql.push(" ORDER BY ");
    match &query.sort {
        Some(sort) if sort.param == "_lastUpdated" => sql.push("r.last_updated"),
        Some(sort) => {
            sql.push("COALESCE((SELECT MIN(s.low) FROM search_dates s WHERE s.type = r.type AND s.id = r.id AND s.param = ");
            sql.text(&sort.param);
            sql.push("), '9999')");
        }
        None => sql.push("r.last_updated"),
    }
    let descending = query.sort.as_ref().is_some_and(|s| s.descending);
    sql.push(if descending { " DESC, r.id DESC" } else { " ASC, r.id ASC" });
    sql.push(" LIMIT ");
    sql.bind(Bind::Int(query.count as i64));
    sql.push(" OFFSET ");
    sql.bind(Bind::Int(query.offset as i64));
    let rows: Vec<AnyRow> = sql.into_query().fetch_all(&mut *conn).await?;
    let found = rows.iter().map(|r| stored(r, Some("PUT".into()))).collect::<Result<Vec<_>, _>>()?;
    let total = if total < 0 { found.len() as i64 } else { total };
    Ok((total, found))
}

pub(super) async fn insert_index(conn: &mut AnyConnection, w: &Stored, index: &[IndexEntry]) -> Result<(), StoreError> {
    let (resource_type, id) = (w.resource_type.as_str(), w.id.as_str());
    let mut tokens = Vec::new();
    let mut dates = Vec::new();
    for party in &w.parties {
        tokens.push([resource_type, id, "_party", "", party.as_str()]);
    }
    for label in &w.labels {
        tokens.push([resource_type, id, "_security", "", label.as_str()]);
    }
    for entry in index {
        match entry {
            IndexEntry::Token { param, system, value } => tokens.push([resource_type, id, param, system.as_str(), value.as_str()]),
            IndexEntry::Date { param, low, high } => dates.push([resource_type, id, param, low.as_str(), high.as_str()]),
        }
    }
    insert_rows(conn, "INSERT INTO search_tokens (type, id, param, system, value) VALUES ", &tokens).await?;
    insert_rows(conn, "INSERT INTO search_dates (type, id, param, low, high) VALUES ", &dates).await
}

/// Inserts rows of text values; multi-row inserts keep a write to a few statements whatever the number of index values.
async fn insert_rows<const N: usize>(conn: &mut AnyConnection, insert: &str, rows: &[[&str; N]]) -> Result<(), StoreError> {
    for chunk in rows.chunks(100) {
        let mut sql = Sql::default();
        sql.push(insert);
        sql.push_joined(chunk, ", ", |sql, row| {
            sql.push("(");
            sql.push_joined(row, ", ", |sql, value| sql.text(value));
            sql.push(")");
        });
        sql.into_query().execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn insert_audit<'e, E: Executor<'e, Database = Any>>(executor: E, row: &AuditRow) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO audit_events (id, recorded, client, action, subtype, outcome, entity, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(row.id.clone())
        .bind(row.recorded.clone())
        .bind(row.client.clone())
        .bind(row.action.clone())
        .bind(row.subtype.clone())
        .bind(row.outcome.clone())
        .bind(row.entity.clone())
        .bind(row.body.clone())
        .execute(executor)
        .await?;
    Ok(())
}

/// A filter on the audit trail; every field narrows.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Client id of the agent.
    pub client: Option<String>,
    /// `read`, `create`, `search-type`, … (`AuditEvent.subtype`).
    pub subtype: Option<String>,
    /// `0`, `4`, `8` (`AuditEvent.outcome`).
    pub outcome: Option<String>,
    /// `C`, `R`, `U`, `D`, `E`.
    pub action: Option<String>,
    /// `Type/id` of the resource acted on.
    pub entity: Option<String>,
    /// `[low, high)` ranges `recorded` must intersect, with their prefix.
    pub dates: Vec<DateMatch>,
    pub count: usize,
    pub offset: usize,
}

pub(super) async fn search_audit(pool: &sqlx::AnyPool, filter: &AuditQuery) -> Result<(i64, Vec<String>), StoreError> {
    let build = |sql: &mut Sql| {
        sql.push(" WHERE 1 = 1");
        for (column, value) in [("client", &filter.client), ("subtype", &filter.subtype), ("outcome", &filter.outcome), ("action", &filter.action), ("entity", &filter.entity)] {
            if let Some(value) = value {
                sql.push(&format!(" AND {column} = "));
                sql.text(value);
            }
        }
        for m in &filter.dates {
            // `recorded` is a point; reuse the range conditions with low = high = recorded.
            sql.push(" AND ");
            let mut inner = Sql { text: String::new(), binds: std::mem::take(&mut sql.binds) };
            date_condition(&mut inner, m);
            sql.binds = inner.binds;
            sql.push(&inner.text.replace("d.low", "recorded").replace("d.high", "recorded"));
        }
    };
    let mut count_sql = Sql::default();
    count_sql.push("SELECT COUNT(*) FROM audit_events");
    build(&mut count_sql);
    let total: i64 = count_sql.into_query().fetch_one(pool).await?.try_get(0)?;
    let mut sql = Sql::default();
    sql.push("SELECT body FROM audit_events");
    build(&mut sql);
    sql.push(" ORDER BY seq DESC LIMIT ");
    sql.bind(Bind::Int(filter.count as i64));
    sql.push(" OFFSET ");
    sql.bind(Bind::Int(filter.offset as i64));
    let rows = sql.into_query().fetch_all(pool).await?;
    Ok((total, rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?))
}

/// Inserts the first version of a resource into `resources` (not its history or index).
pub(super) async fn insert_resource<'e, E: Executor<'e, Database = Any>>(executor: E, w: &'e Stored) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO resources (type, id, version, last_updated, body, parties, labels, created_by, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind(w.resource_type.as_str())
        .bind(w.id.as_str())
        .bind(w.version)
        .bind(w.last_updated.as_str())
        .bind(w.body.as_str())
        .bind(w.parties.join(" "))
        .bind(w.labels.join(" "))
        .bind(w.created_by.as_str())
        .bind(w.owner.as_str())
        .execute(executor)
        .await?;
    Ok(())
}

impl Store {
    /// Inserts a row into `resources` alone, outside any transaction (the benchmark's bare-insert baseline).
    pub async fn bare_insert(&self, table_row: &Stored) -> Result<(), StoreError> {
        insert_resource(&self.writer, table_row).await
    }
}

impl Store {
    /// Deletes every access token of a client (`iop-gateway clients revoke`); returns how many there were.
    /// Instances that cached one stop honouring it within `auth.token_cache_ttl_secs`.
    pub async fn revoke_tokens(&self, client: &str) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM access_tokens WHERE client = $1").bind(client).execute(&self.writer).await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::Sql;

    #[test]
    fn balanced_joins_stay_shallow_whatever_the_number_of_values() {
        let values: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let mut sql = Sql::default();
        sql.push_balanced(&values, " OR ", &mut |sql, v| sql.text(v));
        let (mut depth, mut deepest) = (0i32, 0i32);
        for c in sql.text.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            deepest = deepest.max(depth);
        }
        assert_eq!(depth, 0);
        assert!(deepest <= 10, "{deepest}");
        assert_eq!(sql.binds.len(), 1000);
        assert_eq!(sql.text.matches(" OR ").count(), 999);
    }
}
