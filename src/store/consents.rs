//! The patients' consent rules (`consent_rules`, replaced whenever a Consent is written), the clients enrolled in a substance-use program (`part2_patients`), and what was stored about them before their enrolment, found and relabelled in the enrolling transaction.
//!
//! Rules and enrolments are written with the version that changes them, queued in its transaction
//! (no extra round trip); reading them is one indexed query. An enrolment costs one more indexed
//! query in its transaction, for the earlier records it must label.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::query::{Bind, Sql};
use super::{Store, StoreError, Tx};
use crate::auth::consent::{Effect, Rule};
use crate::search::compartment;

const COLUMNS: &str = "g.consent, g.patient, g.recorded, g.active, g.effect, g.depth, g.recipient, g.purpose, g.label, g.start_at, g.end_at";

fn rule(row: &AnyRow) -> Result<Rule, sqlx::Error> {
    Ok(Rule {
        consent: row.try_get(0)?,
        patient: row.try_get(1)?,
        recorded: row.try_get(2)?,
        active: row.try_get::<i64, _>(3)? == 1,
        effect: if row.try_get::<String, _>(4)? == "deny" { Effect::Deny } else { Effect::Permit },
        depth: row.try_get(5)?,
        recipient: row.try_get(6)?,
        purpose: row.try_get(7)?,
        label: row.try_get(8)?,
        start: row.try_get(9)?,
        end: row.try_get(10)?,
    })
}

impl Tx {
    /// Replaces the rules of `consent` (`Consent/<id>`) with `rules` (none: the Consent names nothing usable).
    pub fn replace_consent_rules(&mut self, consent: &str, rules: &[Rule]) {
        self.queued.statement(|sql| {
            sql.push("DELETE FROM consent_rules WHERE consent = ");
            sql.text(consent);
        });
        for chunk in rules.chunks(50) {
            self.queued.statement(|sql| {
                sql.push("INSERT INTO consent_rules (consent, patient, recorded, active, effect, depth, recipient, purpose, label, start_at, end_at) VALUES ");
                sql.push_joined(chunk, ", ", |sql, r| {
                    sql.push("(");
                    sql.text(&r.consent);
                    sql.push(", ");
                    sql.text(&r.patient);
                    for n in [r.recorded, i64::from(r.active)] {
                        sql.push(", ");
                        sql.bind(Bind::Int(n));
                    }
                    sql.push(", ");
                    sql.text(r.effect.as_str());
                    sql.push(", ");
                    sql.bind(Bind::Int(r.depth));
                    for text in [&r.recipient, &r.purpose, &r.label] {
                        sql.push(", ");
                        sql.text(text);
                    }
                    sql.push(", ");
                    sql.bind(Bind::Int(r.start));
                    sql.push(", ");
                    sql.bind(Bind::Int(r.end));
                    sql.push(")");
                });
            });
        }
    }

    /// Records that these patients are (or were) enrolled in a substance-use program, and remembers
    /// it now: if the commit fails, later writes are labelled once too often, never too rarely.
    pub fn mark_part2_patients(&mut self, patients: &[String], since: &str) {
        self.store.enrolled.remember(patients);
        for patient in patients {
            self.queued.statement(|sql| {
                sql.push("INSERT INTO part2_patients (patient, since) VALUES (");
                sql.text(patient);
                sql.push(", ");
                sql.text(since);
                sql.push(") ON CONFLICT (patient) DO NOTHING");
            });
        }
    }
}

/// A stored version, about a patient just enrolled in a substance-use program, of a resource whose
/// current version does not carry the Part 2 label ([`Tx::unlabelled_about`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unlabelled {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    /// The resource's current version number (this one's `resources` row and index follow it when it is the same).
    pub current: i64,
    pub body: String,
    pub labels: Vec<String>,
}

impl Tx {
    /// Every version lacking `label` of the resources about these patients (their `_compartment`
    /// index rows) whose current version lacks it: one indexed query, inside the transaction, so it
    /// sees what this transaction wrote before it.
    pub async fn unlabelled_about(&mut self, patients: &[String], label: &str) -> Result<Vec<Unlabelled>, StoreError> {
        if patients.is_empty() {
            return Ok(Vec::new());
        }
        // `labels` holds `system|code` words separated by spaces; a whole word is matched.
        let word = format!("% {} %", label.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let mut sql = Sql::default();
        sql.push("SELECT v.type, v.id, v.version, r.version, v.body, v.labels FROM search_tokens c");
        sql.push(" JOIN resources r ON r.type = c.type AND r.id = c.id JOIN resource_versions v ON v.type = r.type AND v.id = r.id");
        // The index is keyed by type first: the types that can be about a patient make it one lookup per type and patient.
        sql.push(" WHERE c.type IN (");
        sql.push_joined(compartment::about_types(), ", ", |sql, t| sql.text(t));
        sql.push(") AND c.param = ");
        sql.text(compartment::PARAM);
        sql.push(" AND c.value IN (");
        sql.push_joined(patients, ", ", |sql, p| sql.text(p));
        sql.push(")");
        for labels in ["r.labels", "v.labels"] {
            sql.push(&format!(" AND (' ' || {labels} || ' ') NOT LIKE "));
            sql.text(&word);
            sql.push(" ESCAPE '\\'");
        }
        if self.backend == super::Backend::Postgres {
            // Writes check enrolment in their own statement, which takes a ROW EXCLUSIVE lock on
            // `part2_unlabelled`: this waits for every such write still open (here or on another
            // instance) to commit, so the query below sees it, and holds later ones until this
            // enrolment commits, so their check sees it. Two enrolments that each already hold a
            // write's lock deadlock here; the one PostgreSQL picks is retried like a lost check.
            let locked = sqlx::query("LOCK TABLE part2_unlabelled IN SHARE ROW EXCLUSIVE MODE").execute(self.conn().await?).await;
            match locked {
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("40P01") => return Err(StoreError::Enrolled),
                other => other?,
            };
        }
        let rows = sql.into_query().fetch_all(self.conn().await?).await?;
        let mut out: Vec<Unlabelled> = Vec::new();
        for row in &rows {
            let labels: String = row.try_get(5)?;
            let version = Unlabelled {
                resource_type: row.try_get(0)?,
                id: row.try_get(1)?,
                version: row.try_get(2)?,
                current: row.try_get(3)?,
                body: row.try_get(4)?,
                labels: labels.split(' ').filter(|l| !l.is_empty()).map(str::to_string).collect(),
            };
            // A resource about two of the patients comes once per patient.
            if !out.iter().any(|o| (&o.resource_type, &o.id, o.version) == (&version.resource_type, &version.id, version.version)) {
                out.push(version);
            }
        }
        Ok(out)
    }

    /// Rewrites a stored version's body and labels in place, queued: the same version number (a
    /// change of labels alone, like FHIR's `$meta-add`); for the current version also the
    /// `resources` row (while it is still that version) and the `_security` index rows of the labels it gains.
    pub fn relabel(&mut self, version: &Unlabelled, body: &str, labels: &[String]) {
        let joined = labels.join(" ");
        // The rows of this version, in `resource_versions` or (still at it) `resources`.
        let this_version = |sql: &mut Sql| {
            sql.push(" WHERE type = ");
            sql.text(&version.resource_type);
            sql.push(" AND id = ");
            sql.text(&version.id);
            sql.push(" AND version = ");
            sql.bind(Bind::Int(version.version));
        };
        let tables: &[&str] = if version.version == version.current { &["resource_versions", "resources"] } else { &["resource_versions"] };
        for table in tables {
            self.queued.statement(|sql| {
                sql.push(&format!("UPDATE {table} SET body = "));
                sql.text(body);
                sql.push(", labels = ");
                sql.text(&joined);
                this_version(sql);
            });
        }
        if version.version != version.current {
            return;
        }
        for label in labels.iter().filter(|l| !version.labels.contains(l)) {
            // Only while the resource is still at that version: its index then describes it.
            self.queued.statement(|sql| {
                sql.push("INSERT INTO search_tokens (type, id, param, system, value) SELECT type, id, '_security', '', ");
                sql.text(label);
                sql.push(" FROM resources");
                this_version(sql);
            });
        }
    }
}

/// Which of these patients are (or were) enrolled in a substance-use program.
pub(super) async fn enrolled_among(conn: &mut sqlx::AnyConnection, patients: &[String]) -> Result<Vec<String>, StoreError> {
    if patients.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::default();
    sql.push("SELECT patient FROM part2_patients WHERE patient IN (");
    sql.push_joined(patients, ", ", |sql, p| sql.text(p));
    sql.push(")");
    let rows = sql.into_query().fetch_all(conn).await?;
    Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
}

/// The patients the store knows to be (or to have been) enrolled: only ever grows (an enrolment is
/// never undone), so it is never stale, only possibly incomplete.
#[derive(Default)]
pub(super) struct Enrolled {
    patients: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Enrolled {
    pub(super) fn remember(&self, patients: &[String]) {
        if let Ok(mut set) = self.patients.lock() {
            set.extend(patients.iter().cloned());
        }
    }
}

impl Store {
    /// The consent rules of the patients whose compartment the current version of a resource is in.
    pub async fn consent_rules_for(&self, resource_type: &str, id: &str) -> Result<Vec<Rule>, StoreError> {
        let started = std::time::Instant::now();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM search_tokens c JOIN consent_rules g ON g.patient = c.value WHERE c.type = $1 AND c.id = $2 AND c.param = '_compartment'"
        )))
        .bind(resource_type)
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        self.observe("consent_rules", started);
        Ok(rows.iter().map(rule).collect::<Result<_, _>>()?)
    }

    /// The consent rules naming this recipient, or anyone.
    pub async fn consent_rules_naming(&self, recipient: &str) -> Result<Vec<Rule>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM consent_rules g WHERE g.recipient IN ($1, '')")))
            .bind(recipient)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(rule).collect::<Result<_, _>>()?)
    }

    /// The consent rules of these patients (`Patient/<id>`).
    pub async fn consent_rules_of(&self, patients: &[String]) -> Result<Vec<Rule>, StoreError> {
        if patients.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::default();
        sql.push(&format!("SELECT {COLUMNS} FROM consent_rules g WHERE g.patient IN ("));
        sql.push_joined(patients, ", ", |sql, p| sql.text(p));
        sql.push(")");
        let rows = sql.into_query().fetch_all(&self.reader).await?;
        Ok(rows.iter().map(rule).collect::<Result<_, _>>()?)
    }

    /// Whether the store knows any of these patients to be (or to have been) enrolled in a substance-use program.
    pub fn known_enrolled(&self, patients: &[String]) -> bool {
        self.enrolled.patients.lock().is_ok_and(|set| patients.iter().any(|p| set.contains(p)))
    }

    /// Every patient who is (or was) enrolled in a substance-use program.
    pub async fn all_part2_patients(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT patient FROM part2_patients").fetch_all(&self.reader).await?;
        Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
    }

    /// Which of these patients are (or were) enrolled in a substance-use program.
    pub async fn part2_patients(&self, patients: &[String]) -> Result<Vec<String>, StoreError> {
        if patients.is_empty() {
            return Ok(Vec::new());
        }
        enrolled_among(&mut *self.reader.acquire().await?, patients).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::Row;

    use crate::auth::labels::PART2_LABEL;
    use crate::search::{IndexEntry, compartment};
    use crate::store::{Store, Stored};

    fn version(id: &str, version: i64, labels: &[&str]) -> Stored {
        Stored {
            resource_type: "Observation".into(),
            id: id.into(),
            version,
            last_updated: format!("2026-01-0{version}T00:00:00.000Z"),
            body: format!(r#"{{"resourceType":"Observation","id":"{id}","meta":{{"versionId":"{version}"}}}}"#),
            parties: vec!["Organization/iop-program".into()],
            labels: labels.iter().map(|l| l.to_string()).collect(),
            created_by: "clinic".into(),
            owner: "Organization/iop-program".into(),
            method: "PUT".into(),
        }
    }

    fn about(patient: &str) -> Vec<IndexEntry> {
        vec![IndexEntry::Token { param: compartment::PARAM, system: String::new(), value: patient.into() }]
    }

    /// What an enrolment finds to label: every version lacking the label of the resources about the
    /// patient whose current version lacks it, once each; relabelled in place (same version, the
    /// current row and its `_security` index too), after which nothing is left to find.
    #[tokio::test]
    async fn an_enrolment_finds_every_unlabelled_version_about_its_patient_and_relabels_it_in_place() {
        let dir = std::env::temp_dir().join(format!("iop-gw-store-relabel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StoreConfig { data_dir: dir.clone(), ..Default::default() };
        let store = Store::open(&config, Arc::new(crate::telemetry::Metrics::default())).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        for (id, labels, patients) in [("two-versions", &[][..], &["Patient/p1", "Patient/p9"][..]), ("labelled", &[PART2_LABEL][..], &["Patient/p1"][..]), ("other-patient", &[][..], &["Patient/p2"][..])] {
            let index: Vec<IndexEntry> = patients.iter().flat_map(|p| about(p)).collect();
            tx.write(&version(id, 1, labels), &index, false).await.unwrap();
        }
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        tx.write(&version("two-versions", 2, &[]), &[about("Patient/p1"), about("Patient/p9")].concat(), false).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = store.begin().await.unwrap();
        let found = tx.unlabelled_about(&["Patient/p1".into(), "Patient/p9".into()], PART2_LABEL).await.unwrap();
        let mut seen: Vec<(&str, i64, i64)> = found.iter().map(|v| (v.id.as_str(), v.version, v.current)).collect();
        seen.sort();
        assert_eq!(seen, [("two-versions", 1, 2), ("two-versions", 2, 2)], "once each, though about two of the patients");
        for v in &found {
            tx.relabel(v, &v.body.replace(r#""meta":{"#, r#""meta":{"security":[{"code":"42CFRPart2"}],"#), &[PART2_LABEL.to_string()]);
        }
        tx.commit().await.unwrap();

        let current = store.read("Observation", "two-versions").await.unwrap().unwrap();
        assert_eq!((current.version, current.labels.as_slice()), (2, [PART2_LABEL.to_string()].as_slice()));
        assert!(current.body.contains("42CFRPart2") && current.body.contains(r#""versionId":"2""#), "{}", current.body);
        let first = store.vread("Observation", "two-versions", 1).await.unwrap().unwrap();
        assert_eq!(first.labels, [PART2_LABEL]);
        assert!(first.body.contains("42CFRPart2"), "{}", first.body);
        let tokens: i64 = sqlx::query("SELECT COUNT(*) FROM search_tokens WHERE type = 'Observation' AND id = 'two-versions' AND param = '_security' AND value = $1")
            .bind(PART2_LABEL)
            .fetch_one(&store.reader)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(tokens, 1, "the current version's index gains the label once");
        let mut tx = store.begin().await.unwrap();
        assert!(tx.unlabelled_about(&["Patient/p1".into()], PART2_LABEL).await.unwrap().is_empty(), "nothing left to label");
        drop(tx);
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
