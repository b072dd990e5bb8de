//! SQL built at run time: search over the index tables, index and audit inserts, and audit search. Every request value becomes a bound parameter.

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::AnyConnection;
use sqlx::{Any, Row};

use super::{AuditRow, Backend, COLUMNS, Store, StoreError, Stored, Visibility, stored};
use crate::search::{Clause, DateMatch, IndexEntry, Prefix, Query, SortKey};

/// A value to bind to a `$n` placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    Text(String),
    Int(i64),
}

/// Accumulates SQL text and its bound values, numbering placeholders.
#[derive(Clone, Default)]
pub(super) struct Sql {
    text: String,
    binds: Vec<Bind>,
    /// Where each placeholder starts in `text`, so that a [`Script`] can renumber statements it joins.
    marks: Vec<usize>,
}

/// Appends `$n` (placeholders are written by the thousand for a group's statement; `write!` costs more).
fn push_placeholder(text: &mut String, n: usize) {
    text.push('$');
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    text.push_str(std::str::from_utf8(&buf[at..]).expect("ASCII digits"));
}

/// How many decimal digits `n` has.
fn digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

impl Sql {
    pub(super) fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// Appends a placeholder bound to `value`.
    pub(super) fn bind(&mut self, value: Bind) {
        self.binds.push(value);
        self.marks.push(self.text.len());
        push_placeholder(&mut self.text, self.binds.len());
    }

    /// Appends `other`, its placeholders numbered after this one's.
    fn append(&mut self, other: Sql) {
        if self.binds.is_empty() && self.text.is_empty() {
            *self = other;
            return;
        }
        let (offset, mut at) = (self.binds.len(), 0);
        self.text.reserve(other.text.len() + other.marks.len());
        // Placeholders are numbered in the order they were written: the k-th is `$k`.
        for (k, mark) in other.marks.into_iter().enumerate() {
            self.text.push_str(&other.text[at..mark]);
            self.marks.push(self.text.len());
            push_placeholder(&mut self.text, k + 1 + offset);
            at = mark + 1 + digits(k + 1);
        }
        self.text.push_str(&other.text[at..]);
        self.binds.extend(other.binds);
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

/// `column = $n`, or `column IN (…)` for several values.
fn one_of(sql: &mut Sql, column: &str, values: &[&str]) {
    if let [one] = values {
        sql.push(&format!("{column} = "));
        sql.text(one);
    } else {
        sql.push(&format!("{column} IN ("));
        sql.push_joined(values, ", ", |sql, v| sql.text(v));
        sql.push(")");
    }
}

/// ` WHERE …` of a search of `resources r` over `types`: visibility, then the query's clauses.
pub(super) fn where_clause(sql: &mut Sql, types: &[&str], query: &Query, visibility: Option<&Visibility>) {
    sql.push(" WHERE ");
    one_of(sql, "r.type", types);
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
    if !visibility.party_to_all {
        sql.push(" AND ");
        probe.push(sql, true, |sql| {
            sql.push(&format!("search_tokens p WHERE p.type = r.type AND p.id = r.id AND p.param = '{}' AND p.value = ", crate::search::PARTY));
            sql.text(&visibility.party);
        });
    }
    if let Some(label) = &visibility.withheld_label {
        sql.push(" AND (r.owner = ");
        sql.text(&visibility.party);
        sql.push(" OR ");
        probe.push(sql, false, |sql| {
            sql.push("search_tokens l WHERE l.type = r.type AND l.id = r.id AND l.param = '_security' AND l.value = ");
            sql.text(label);
        });
        sql.push(" OR ");
        consent_permits(sql, visibility);
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

/// The condition that a consent rule of a patient whose compartment `resources r` is in permits
/// the visibility's party for its purpose now: [`crate::auth::consent::decide`] in SQL, over the
/// same rules (`consent_rules`), so totals count exactly what the disclosure check serves.
pub(super) fn consent_permits(sql: &mut Sql, visibility: &Visibility) {
    sql.push("EXISTS (SELECT 1 FROM search_tokens c JOIN consent_rules g ON g.patient = c.value WHERE c.type = r.type AND c.id = r.id AND c.param = '_compartment' AND g.effect = 'permit' AND ");
    rule_matches(sql, visibility, "g");
    sql.push(" AND NOT EXISTS (SELECT 1 FROM consent_rules d WHERE d.patient = g.patient AND d.effect = 'deny' AND d.depth >= g.depth AND ");
    rule_matches(sql, visibility, "d");
    sql.push("))");
}

/// `consent::matches` for the rule row `x`: active, the patient's newest consent for its recipient,
/// and recipient, purpose, label and time within it.
fn rule_matches(sql: &mut Sql, visibility: &Visibility, x: &str) {
    sql.push(&format!("{x}.active = 1 AND ({x}.recipient = '' OR {x}.recipient = "));
    sql.text(&visibility.party);
    sql.push(&format!(") AND ({x}.purpose = '' OR {x}.purpose = "));
    sql.text(visibility.purpose);
    sql.push(&format!(") AND {x}.start_at <= "));
    sql.bind(Bind::Int(visibility.at));
    sql.push(&format!(" AND {x}.end_at > "));
    sql.bind(Bind::Int(visibility.at));
    sql.push(&format!(
        " AND ({x}.label = '' OR EXISTS (SELECT 1 FROM search_tokens {x}l WHERE {x}l.type = r.type AND {x}l.id = r.id AND {x}l.param = '_security' AND {x}l.value = {x}.label))"
    ));
    sql.push(&format!(" AND NOT EXISTS (SELECT 1 FROM consent_rules {x}n WHERE {x}n.patient = {x}.patient AND {x}n.recipient = {x}.recipient AND {x}n.recorded > {x}.recorded)"));
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
            Clause::Date { param, any } if param == "_lastUpdated" => {
                sql.push(" AND (");
                sql.push_balanced(any, " OR ", &mut |sql, m| {
                    sql.push("(");
                    instant_condition(sql, m, "r.last_updated");
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

/// [`date_condition`] for an instant stored as such (`column`, millisecond text as [`crate::search::date_range`]
/// writes it): the instant `p` covers `[p, p + 1 ms)`, and the query's bounds are whole milliseconds,
/// so `p + 1 ms > x` is `p >= x` and `p + 1 ms <= x` is `p < x`.
fn instant_condition(sql: &mut Sql, m: &DateMatch, column: &str) {
    let (low, high) = (m.low.as_str(), m.high.as_str());
    let (op, bound) = match m.prefix {
        Prefix::Eq | Prefix::Ne => {
            sql.push(&format!("{}({column} >= ", if m.prefix == Prefix::Ne { "NOT " } else { "" }));
            sql.text(low);
            sql.push(&format!(" AND {column} < "));
            sql.text(high);
            sql.push(")");
            return;
        }
        Prefix::Gt | Prefix::Sa => (">=", high),
        Prefix::Lt | Prefix::Eb => ("<", low),
        Prefix::Ge => (">=", low),
        Prefix::Le => ("<", high),
    };
    sql.push(&format!("{column} {op} "));
    sql.text(bound);
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

pub(super) async fn search(conn: &mut AnyConnection, types: &[&str], query: &Query, visibility: Option<&Visibility>, with_total: bool) -> Result<(i64, Vec<Stored>), StoreError> {
    let total = if with_total {
        let mut sql = Sql::default();
        sql.push("SELECT COUNT(*) FROM resources r");
        where_clause(&mut sql, types, query, visibility);
        let row = sql.into_query().fetch_one(&mut *conn).await?;
        row.try_get::<i64, _>(0)?
    } else {
        -1
    };
    if query.count == 0 {
        return Ok((total.max(0), Vec::new()));
    }
    let mut sql = Sql::default();
    sql.push(&format!("SELECT {} FROM resources r", COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")));
    where_clause(&mut sql, types, query, visibility);
    sql.push(" ORDER BY ");
    for sort in &query.sort {
        match sort.key {
            SortKey::LastUpdated => sql.push("r.last_updated"),
            SortKey::Id => sql.push("r.id"),
            // The earliest (ascending) or latest (descending) value; resources without one sort last either way.
            SortKey::Date(param) | SortKey::Token(param) => {
                let (table, column) = match (sort.key, sort.descending) {
                    (SortKey::Date(_), false) => ("search_dates", "MIN(s.low)"),
                    (SortKey::Date(_), true) => ("search_dates", "MAX(s.high)"),
                    (_, false) => ("search_tokens", "MIN(s.value)"),
                    (_, true) => ("search_tokens", "MAX(s.value)"),
                };
                let value = |sql: &mut Sql| {
                    sql.push(&format!("(SELECT {column} FROM {table} s WHERE s.type = r.type AND s.id = r.id AND s.param = "));
                    sql.text(param);
                    sql.push(")");
                };
                value(&mut sql);
                sql.push(" IS NULL ASC, ");
                value(&mut sql);
            }
        }
        sql.push(if sort.descending { " DESC, " } else { " ASC, " });
    }
    // Ties (and unsorted searches) in a stable order, so pages neither repeat nor skip.
    let descending = query.sort.first().is_some_and(|s| s.descending);
    sql.push(if descending { "r.last_updated DESC, r.type DESC, r.id DESC" } else { "r.last_updated ASC, r.type ASC, r.id ASC" });
    sql.push(" LIMIT ");
    sql.bind(Bind::Int(query.count.min(i64::MAX as usize) as i64));
    sql.push(" OFFSET ");
    sql.bind(Bind::Int(query.offset as i64));
    let rows: Vec<AnyRow> = sql.into_query().fetch_all(&mut *conn).await?;
    let found = rows.iter().map(|r| stored(r, Some("PUT".into()))).collect::<Result<Vec<_>, _>>()?;
    let total = if total < 0 { found.len() as i64 } else { total };
    Ok((total, found))
}

/// Which versions a history covers.
#[derive(Clone, Copy, Debug)]
pub enum HistoryScope<'a> {
    /// One resource (`GET /{type}/{id}/_history`).
    Instance(&'a str, &'a str),
    /// Every resource of these types (`GET /{type}/_history`, `GET /_history`).
    Types(&'a [&'a str]),
}

/// Versions newest first, with their number. With `visibility`, only versions whose current
/// version it lets through count, less those a withheld label on the version itself hides.
pub(super) async fn history(
    pool: &sqlx::AnyPool,
    scope: HistoryScope<'_>,
    since: Option<&str>,
    count: usize,
    offset: usize,
    visibility: Option<&Visibility>,
) -> Result<(i64, Vec<Stored>), StoreError> {
    let build = |sql: &mut Sql| {
        sql.push(" FROM resource_versions v JOIN resources r ON r.type = v.type AND r.id = v.id WHERE ");
        match scope {
            HistoryScope::Instance(resource_type, id) => {
                sql.push("v.type = ");
                sql.text(resource_type);
                sql.push(" AND v.id = ");
                sql.text(id);
            }
            HistoryScope::Types(types) => one_of(sql, "v.type", types),
        }
        if let Some(since) = since {
            sql.push(" AND v.last_updated >= ");
            sql.text(since);
        }
        if let Some(visibility) = visibility {
            visibility_clause(sql, visibility);
            if let Some(label) = &visibility.withheld_label {
                let pattern = format!("% {} %", label.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
                sql.push(" AND (r.owner = ");
                sql.text(&visibility.party);
                sql.push(" OR (' ' || v.labels || ' ') NOT LIKE ");
                sql.text(&pattern);
                sql.push(" ESCAPE '\\' OR ");
                consent_permits(sql, visibility);
                sql.push(")");
            }
        }
    };
    let mut count_sql = Sql::default();
    count_sql.push("SELECT COUNT(*)");
    build(&mut count_sql);
    let total: i64 = count_sql.into_query().fetch_one(pool).await?.try_get(0)?;
    let mut sql = Sql::default();
    sql.push("SELECT v.type, v.id, v.version, v.last_updated, v.body, v.parties, v.labels, v.created_by, v.owner, v.method");
    build(&mut sql);
    sql.push(" ORDER BY v.last_updated DESC, v.type DESC, v.id DESC, v.version DESC LIMIT ");
    sql.bind(Bind::Int(count as i64));
    sql.push(" OFFSET ");
    sql.bind(Bind::Int(offset as i64));
    let rows = sql.into_query().fetch_all(pool).await?;
    Ok((total, rows.iter().map(|r| stored(r, None)).collect::<Result<_, _>>()?))
}

/// Statements sent to the database as one: on PostgreSQL a statement whose first parts are
/// data-modifying `WITH` clauses, on SQLite a script. Either way one round trip (one hop to
/// SQLite's connection thread) instead of one per statement, which is where a write's time went.
/// The parts must not depend on each other's effects (PostgreSQL runs them on one snapshot). A
/// script that would bind too many values is cut into several, sent in turn.
///
/// Rows are gathered per table and sent as one multi-row `INSERT` each, after the statements
/// queued before them: a three-entry transaction is then five inserts, not thirteen (each
/// statement costs SQLite a program to run and PostgreSQL a plan and an executor). Scripts of
/// several transactions can be merged into one ([`Script::absorb`], PostgreSQL's group commit).
#[derive(Clone)]
pub(super) struct Script {
    backend: Backend,
    /// Statements in order, each numbered from `$1`; numbered in turn when joined.
    statements: Vec<Sql>,
    /// Per table's insert: its number of columns and the values of its rows in turn.
    rows: Vec<(Insert, usize, Vec<Bind>)>,
}

/// A table's multi-row insert (`INSERT INTO t (columns) VALUES `), and what a second insert
/// takes from the rows it returns (PostgreSQL), so that values two tables share are sent once.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct Insert {
    values: &'static str,
    /// `RETURNING …`, and the insert reading those rows from `{rows}`.
    feeds: Option<(&'static str, &'static str)>,
}

/// Bound values per statement sent, well below PostgreSQL's 65,535 and SQLite's 32,766.
pub(super) const SCRIPT_BINDS: usize = 16_000;

/// Rows per multi-row `INSERT`.
const ROWS_PER_INSERT: usize = 100;

impl Script {
    pub(super) fn new(backend: Backend) -> Script {
        Script { backend, statements: Vec::new(), rows: Vec::new() }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.rows.is_empty()
    }

    /// The number of values it binds.
    pub(super) fn binds(&self) -> usize {
        self.statements.iter().map(|s| s.binds.len()).sum::<usize>() + self.row_binds()
    }

    /// About how many bytes its values take in the protocol's `Bind` message.
    pub(super) fn bytes(&self) -> usize {
        let size = |b: &Bind| match b {
            Bind::Text(s) => s.len() + 6,
            Bind::Int(_) => 14,
        };
        self.statements.iter().flat_map(|s| &s.binds).map(size).sum::<usize>() + self.rows.iter().flat_map(|(_, _, values)| values).map(size).sum::<usize>()
    }

    fn row_binds(&self) -> usize {
        self.rows.iter().map(|(_, _, values)| values.len()).sum()
    }

    /// Whether it goes to the database as one statement (on PostgreSQL then atomic by itself).
    /// Its rows stay gathered, so that a merged script still inserts each table's rows at once.
    pub(super) fn is_one_statement(&self) -> bool {
        self.binds() <= SCRIPT_BINDS
    }

    /// Adds a statement; it goes after the rows gathered so far only if they would not fit one statement with it.
    pub(super) fn statement(&mut self, build: impl FnOnce(&mut Sql)) {
        let mut sql = Sql::default();
        build(&mut sql);
        if self.row_binds() + sql.binds.len() > SCRIPT_BINDS {
            self.flush_rows();
        }
        self.statements.push(sql);
    }

    /// Adds a row to the multi-row `insert` (`INSERT INTO t (columns) VALUES `); every row of one
    /// `insert` has the same number of values.
    pub(super) fn row(&mut self, insert: Insert, values: impl IntoIterator<Item = Bind>) {
        let at = match self.rows.iter().position(|(i, _, _)| *i == insert) {
            Some(at) => at,
            None => {
                self.rows.push((insert, 0, Vec::new()));
                self.rows.len() - 1
            }
        };
        let (_, columns, table) = &mut self.rows[at];
        let had = table.len();
        table.extend(values);
        *columns = table.len() - had;
        if self.row_binds() > SCRIPT_BINDS {
            self.flush_rows();
        }
    }

    /// Adds another script's statements after this one's, and its rows to this one's.
    pub(super) fn absorb(&mut self, other: Script) {
        self.statements.extend(other.statements);
        for (insert, columns, values) in other.rows {
            match self.rows.iter_mut().find(|(i, _, _)| *i == insert) {
                Some((_, _, table)) => table.extend(values),
                None => self.rows.push((insert, columns, values)),
            }
        }
    }

    /// Turns the gathered rows into statements, after those queued so far.
    fn flush_rows(&mut self) {
        for (insert, columns, values) in std::mem::take(&mut self.rows) {
            let mut values = values.into_iter();
            loop {
                let chunk: Vec<Bind> = values.by_ref().take(columns.max(1) * ROWS_PER_INSERT).collect();
                if chunk.is_empty() {
                    break;
                }
                let mut sql = Sql::default();
                sql.push(insert.values);
                for (i, value) in chunk.into_iter().enumerate() {
                    sql.push(match (i % columns.max(1), i) {
                        (0, 0) => "(",
                        (0, _) => "), (",
                        _ => ", ",
                    });
                    sql.bind(value);
                }
                sql.push(")");
                if let Some((returning, then)) = insert.feeds {
                    sql.push(returning);
                    self.statements.push(sql);
                    sql = Sql::default();
                    sql.push(then);
                }
                self.statements.push(sql);
            }
        }
    }

    /// Puts a statement without bound values before all others (SQLite: `BEGIN`, `SAVEPOINT`).
    pub(super) fn before(&mut self, statement: &str) {
        let mut sql = Sql::default();
        sql.push(statement);
        self.statements.insert(0, sql);
    }

    /// Puts a statement without bound values after all others, rows included (SQLite: `RELEASE`).
    pub(super) fn after(&mut self, statement: &str) {
        self.flush_rows();
        let mut sql = Sql::default();
        sql.push(statement);
        self.statements.push(sql);
    }

    /// The statements as few as the bind limit allows, each joined into one, in order.
    fn sealed(mut self) -> Vec<Sql> {
        self.flush_rows();
        let mut sealed = Vec::new();
        let mut part: Vec<Sql> = Vec::new();
        let mut binds = 0;
        for statement in std::mem::take(&mut self.statements) {
            if !part.is_empty() && binds + statement.binds.len() > SCRIPT_BINDS {
                sealed.push(self.joined(std::mem::take(&mut part)));
                binds = 0;
            }
            binds += statement.binds.len();
            part.push(statement);
        }
        if !part.is_empty() {
            sealed.push(self.joined(part));
        }
        sealed
    }

    /// Statements as one: PostgreSQL's `WITH` parts before the last, SQLite's script. A
    /// statement reading `{rows}` reads what the one before it returned (it binds nothing, so it
    /// is never cut from it, and the insert it follows is never last).
    fn joined(&self, statements: Vec<Sql>) -> Sql {
        let mut joined = Sql::default();
        let last = statements.len().saturating_sub(1);
        let with = self.backend == Backend::Postgres && last > 0;
        for (i, statement) in statements.into_iter().enumerate() {
            match (with, i) {
                (true, 0) => joined.push("WITH s0 AS ("),
                (true, i) if i < last => joined.push(&format!("), s{i} AS (")),
                (true, _) => joined.push(") "),
                (false, 0) => {}
                (false, _) => joined.push(";\n"),
            }
            match statement.text.contains("{rows}") {
                true => joined.push(&statement.text.replace("{rows}", &format!("s{}", i.saturating_sub(1)))),
                false => joined.append(statement),
            }
        }
        joined
    }

    pub(super) async fn execute(self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        for sql in self.sealed() {
            sql.into_query().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

const fn insert(values: &'static str) -> Insert {
    Insert { values, feeds: None }
}
const RESOURCE_ROWS: Insert = insert("INSERT INTO resources (type, id, version, last_updated, body, parties, labels, created_by, owner) VALUES ");
const VERSION_ROWS: Insert = insert("INSERT INTO resource_versions (type, id, version, last_updated, method, body, parties, labels, created_by, owner) VALUES ");
/// PostgreSQL: a first version's `resources` row is its history row, so its body goes over the
/// wire once. Bytes decide how many writes share a group's statement ([`super::postgres::Group`]).
const VERSION_AND_RESOURCE_ROWS: Insert = Insert {
    feeds: Some((
        " RETURNING type, id, version, last_updated, body, parties, labels, created_by, owner",
        "INSERT INTO resources (type, id, version, last_updated, body, parties, labels, created_by, owner) \
         SELECT type, id, version, last_updated, body, parties, labels, created_by, owner FROM {rows} WHERE version = 1",
    )),
    ..VERSION_ROWS
};
const TOKEN_ROWS: Insert = insert("INSERT INTO search_tokens (type, id, param, system, value) VALUES ");
const DATE_ROWS: Insert = insert("INSERT INTO search_dates (type, id, param, low, high) VALUES ");
const AUDIT_ROWS: Insert = insert("INSERT INTO audit_events (id, recorded, client, action, subtype, outcome, entity, body) VALUES ");

/// Adds a version's rows: its `resources` row when it is the first (later versions' rows were
/// compare-and-set before; on PostgreSQL taken from the history row), the history row, and the
/// search index in place of the previous version's.
pub(super) fn write_version(script: &mut Script, w: &Stored, index: &[IndexEntry]) {
    let (resource_type, id) = (w.resource_type.as_str(), w.id.as_str());
    let (parties, labels) = (w.parties.join(" "), w.labels.join(" "));
    let text = |s: &str| Bind::Text(s.to_string());
    let postgres = script.backend == Backend::Postgres;
    if w.version > 1 {
        // Before the new index rows, which go after every statement queued so far.
        for table in ["search_tokens", "search_dates"] {
            script.statement(|sql| {
                sql.push(&format!("DELETE FROM {table} WHERE type = "));
                sql.text(resource_type);
                sql.push(" AND id = ");
                sql.text(id);
            });
        }
    } else if !postgres {
        script.row(RESOURCE_ROWS, resource_values(w));
    }
    script.row(
        if postgres { VERSION_AND_RESOURCE_ROWS } else { VERSION_ROWS },
        [text(resource_type), text(id), Bind::Int(w.version), text(&w.last_updated), text(&w.method), text(&w.body), text(&parties), text(&labels), text(&w.created_by), text(&w.owner)],
    );
    for label in &w.labels {
        script.row(TOKEN_ROWS, [text(resource_type), text(id), text("_security"), text(""), text(label)]);
    }
    for entry in index {
        match entry {
            IndexEntry::Token { param, system, value } => script.row(TOKEN_ROWS, [text(resource_type), text(id), text(param), text(system), text(value)]),
            IndexEntry::Date { param, low, high } => script.row(DATE_ROWS, [text(resource_type), text(id), text(param), text(low), text(high)]),
        }
    }
}

/// Adds an audit trail row.
pub(super) fn audit_row(script: &mut Script, row: &AuditRow) {
    script.row(AUDIT_ROWS, [&row.id, &row.recorded, &row.client, &row.action, &row.subtype, &row.outcome, &row.entity, &row.body].map(|v| Bind::Text(v.clone())));
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
            let mut inner = Sql { binds: std::mem::take(&mut sql.binds), ..Sql::default() };
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

/// The `resources` row of a version, in [`RESOURCE_ROWS`]' columns.
fn resource_values(w: &Stored) -> [Bind; 9] {
    let text = |s: &str| Bind::Text(s.to_string());
    [text(&w.resource_type), text(&w.id), Bind::Int(w.version), text(&w.last_updated), text(&w.body), text(&w.parties.join(" ")), text(&w.labels.join(" ")), text(&w.created_by), text(&w.owner)]
}

impl Store {
    /// Inserts a row into `resources` alone, outside any transaction (the benchmark's bare-insert baseline).
    pub async fn bare_insert(&self, table_row: &Stored) -> Result<(), StoreError> {
        let mut script = Script::new(self.backend);
        script.row(RESOURCE_ROWS, resource_values(table_row));
        script.execute(&mut *self.writer.acquire().await?).await
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
    use super::{Backend, Bind, SCRIPT_BINDS, Script, Sql, write_version};
    use crate::search::IndexEntry;
    use crate::store::Stored;

    fn version(id: &str, version: i64) -> Stored {
        let text = |s: &str| s.to_string();
        Stored {
            resource_type: text("Observation"),
            id: text(id),
            version,
            last_updated: text("2026-01-01T00:00:00.000Z"),
            body: text("{}"),
            parties: vec![text("Organization/a"), text("Organization/b")],
            labels: vec![],
            created_by: text("c"),
            owner: text("Organization/a"),
            method: text("POST"),
        }
    }

    /// Every version's rows go into one insert per table, after the statements queued before
    /// them (a later version's old index rows are deleted before its new ones are inserted).
    #[test]
    fn rows_of_several_versions_are_one_insert_per_table_after_the_deletes() {
        let index = [IndexEntry::Token { param: "status", system: String::new(), value: "final".into() }, IndexEntry::Date { param: "date", low: "a".into(), high: "b".into() }];
        let mut script = Script::new(Backend::Sqlite);
        write_version(&mut script, &version("new", 1), &index);
        write_version(&mut script, &version("old", 2), &index);
        assert!(script.is_one_statement());
        let mut sealed = script.sealed();
        assert_eq!(sealed.len(), 1);
        let sql = sealed.remove(0);
        let text = sql.text;
        for table in ["resources", "resource_versions", "search_tokens", "search_dates"] {
            assert_eq!(text.matches(&format!("INSERT INTO {table} ")).count(), 1, "{text}");
        }
        assert!(text.find("DELETE FROM search_tokens").unwrap() < text.find("INSERT INTO search_tokens").unwrap(), "{text}");
        // One resources row (the first version), two history rows, two token rows, two date rows
        // (`_party` rows come with the index the caller passes).
        assert_eq!(sql.binds.len(), 4 + 9 + 2 * 10 + 2 * 5 + 2 * 5);
        assert_eq!(text.matches('$').count(), sql.binds.len());
        assert!(sql.binds.contains(&Bind::Int(2)));
    }

    /// A script too large for one statement is cut, and then does not claim to be one.
    #[test]
    fn a_script_beyond_the_bind_limit_is_cut_into_statements_within_it() {
        let mut script = Script::new(Backend::Postgres);
        let index: Vec<IndexEntry> = (0..SCRIPT_BINDS / 5 + 10).map(|i| IndexEntry::Token { param: "code", system: String::new(), value: i.to_string() }).collect();
        write_version(&mut script, &version("big", 1), &index);
        assert!(!script.is_one_statement());
        let sealed = script.sealed();
        assert!(sealed.len() > 1);
        assert!(sealed.iter().all(|sql| sql.binds.len() <= SCRIPT_BINDS));
        let mut small = Script::new(Backend::Postgres);
        write_version(&mut small, &version("small", 1), &index[..10]);
        assert!(small.is_one_statement());
        let text = &small.sealed()[0].text;
        // PostgreSQL takes the `resources` row from the history row's, which it follows.
        assert!(text.starts_with("WITH s0 AS (INSERT INTO resource_versions "), "{text}");
        assert!(text.contains("), s1 AS (INSERT INTO resources (type, id, version, last_updated, body, parties, labels, created_by, owner) SELECT type, id, version, last_updated, body, parties, labels, created_by, owner FROM s0 WHERE version = 1"), "{text}");
    }

    /// Scripts merged into one keep every value with its placeholder: statements of both first,
    /// numbered in turn, then each table's rows of both in one insert.
    #[test]
    fn merged_scripts_number_every_placeholder_in_turn() {
        let script = |name: &str| {
            let mut script = Script::new(Backend::Postgres);
            script.statement(|sql| {
                sql.push("INSERT INTO part2_unlabelled (patient) SELECT patient FROM part2_patients WHERE patient IN (");
                sql.text(&format!("Patient/{name}"));
                sql.push(")");
            });
            write_version(&mut script, &version(name, 1), &[]);
            script
        };
        let (mut merged, other) = (script("a"), script("b"));
        // As a transaction's commit asks before handing its script to the write group.
        assert!(merged.is_one_statement() && other.is_one_statement());
        merged.absorb(other);
        assert!(merged.is_one_statement());
        let sealed = merged.sealed();
        assert_eq!(sealed.len(), 1);
        let sql = &sealed[0];
        assert_eq!(sql.text.matches("INSERT INTO resources ").count(), 1, "{}", sql.text);
        assert_eq!(sql.text.matches("INSERT INTO part2_unlabelled ").count(), 2, "{}", sql.text);
        let numbers: Vec<usize> = sql.text.split('$').skip(1).map(|s| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()).collect();
        assert_eq!(numbers, (1..=sql.binds.len()).collect::<Vec<_>>());
        let text = |s: &str| Bind::Text(s.to_string());
        assert_eq!(sql.binds[..2], [text("Patient/a"), text("Patient/b")]);
        // Then the two history rows, a's before b's, which the one `resources` insert reads.
        assert_eq!(sql.binds[2..4], [text("Observation"), text("a")]);
        assert_eq!(sql.binds[12..14], [text("Observation"), text("b")]);
    }

    /// Renumbering crosses digit counts both ways: `$9` of the appended statement becoming `$108`, `$10` becoming `$109`.
    #[test]
    fn appended_placeholders_are_renumbered_across_digit_counts() {
        let statement = |n: usize| {
            let mut sql = Sql::default();
            sql.push_joined(0..n, ", ", |sql, i| sql.bind(Bind::Int(i as i64)));
            sql
        };
        let mut joined = statement(99);
        joined.append(statement(12));
        let numbers: Vec<usize> = joined.text.split('$').skip(1).map(|s| s.trim_end_matches(", ").parse().unwrap()).collect();
        assert_eq!(numbers, (1..=111).collect::<Vec<_>>());
        assert_eq!(joined.marks.len(), 111);
        assert!(joined.marks.iter().all(|&m| joined.text.as_bytes()[m] == b'$'));
    }

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
