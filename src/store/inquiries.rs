//! The store's side of PAS `$inquire` (the fallback while a payer's Subscription is in error): which authorizations are pended at a payer, with the request that submitted them, and where an authorization's decision stands.

use sqlx::Row;

use super::{Store, StoreError, Tx};

/// An authorization the payer pended, and the PAS request that submitted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pended {
    pub authorization_id: String,
    /// The payload of the authorization's first submission that is not a dead letter.
    pub submitted: String,
}

impl Store {
    /// The authorizations at `partner` whose decision is `pended`, each with its first live submission
    /// (outbox kind `submit_kind`); left out is any that has an inquiry (kind `inquire_kind`) waiting to
    /// be sent, or one queued after `inquired_after` (ms), so inquiries never pile up behind a payer that is down.
    pub async fn pended_at(&self, partner: &str, inquired_after: i64, submit_kind: &str, inquire_kind: &str) -> Result<Vec<Pended>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.record_id, o.payload FROM iop_records r \
             JOIN outbox o ON o.record_type = 'authorization' AND o.record_id = r.id AND o.kind = $3 \
             WHERE r.record_type = 'decision' AND r.direction = 'inbound' AND r.status = 'pended' AND o.partner = $1 \
             AND o.seq = (SELECT MIN(s.seq) FROM outbox s WHERE s.record_type = 'authorization' AND s.record_id = r.id AND s.kind = $3 AND s.status <> 'dead') \
             AND NOT EXISTS (SELECT 1 FROM outbox q WHERE q.record_type = 'authorization' AND q.record_id = r.id AND q.kind = $4 \
                             AND (q.status IN ('pending', 'in-flight') OR q.created_at > $2)) \
             ORDER BY r.seq",
        )
        .bind(partner)
        .bind(inquired_after)
        .bind(submit_kind)
        .bind(inquire_kind)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(|r| -> Result<Pended, sqlx::Error> { Ok(Pended { authorization_id: r.try_get(0)?, submitted: r.try_get(1)? }) }).collect::<Result<_, _>>()?)
    }
}

impl Tx {
    /// The outcome of the decision the gateway holds on an authorization (`pended`, `certified`, …), read in this transaction.
    pub async fn decision_outcome(&mut self, authorization_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT status FROM iop_records WHERE record_type = 'decision' AND direction = 'inbound' AND id = $1")
            .bind(authorization_id)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{Ending, MessageStatus, NewMessage, RecordRow};

    fn message(id: &str, kind: &str, authorization: &str, payload: &str) -> NewMessage {
        NewMessage { id: id.into(), partner: "payer".into(), subject: format!("authorization:{authorization}"), kind: kind.into(), record_type: "authorization".into(), record_id: authorization.into(), payload: payload.into() }
    }

    fn decision(authorization: &str, outcome: &str) -> RecordRow {
        RecordRow { record_type: "decision".into(), id: authorization.into(), direction: "inbound".into(), client_id: "C".into(), authorization_id: authorization.into(), status: outcome.into(), updated: "2026-01-01T00:00:00Z".into(), body: "{}".into(), extends_certification: String::new() }
    }

    /// Sends everything due: the message `dead` becomes a dead letter, every other one is delivered.
    async fn drain(store: &Store, now: i64) {
        loop {
            let claimed = store.claim_due(now, now + 60_000, "w", 8).await.unwrap();
            if claimed.is_empty() {
                return;
            }
            let mut tx = store.begin().await.unwrap();
            for m in &claimed {
                let status = if m.new.id == "dead" { MessageStatus::Dead } else { MessageStatus::Delivered };
                let end = Ending { status, at_ms: now, http_status: 200, error: "", response: "" };
                assert!(tx.finish_message(&m.new.id, "w", &end).await.unwrap());
            }
            tx.commit().await.unwrap();
        }
    }

    #[tokio::test]
    async fn pended_authorizations_come_with_their_first_live_submission_unless_an_inquiry_waits_or_is_recent() {
        let dir = std::env::temp_dir().join(format!("iop-gw-store-inquiries-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StoreConfig { data_dir: dir.clone(), ..Default::default() };
        let store = Store::open(&config, Arc::new(crate::telemetry::Metrics::default())).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        for m in [message("dead", "pas-submit", "A", "dead one"), message("s-a", "pas-submit", "A", "first live"), message("s-a2", "pas-submit", "A", "update"), message("s-b", "pas-submit", "B", "b"), message("s-c", "pas-submit", "C", "c")] {
            assert!(tx.enqueue(&m, 1_000).await.unwrap());
        }
        tx.put_record(&decision("A", "pended")).await.unwrap();
        tx.put_record(&decision("B", "certified")).await.unwrap();
        tx.put_record(&decision("C", "pended")).await.unwrap();
        tx.commit().await.unwrap();
        // The first submission of A was refused; the payer pended the second (then got an update).
        drain(&store, 1_000).await;
        let mut tx = store.begin().await.unwrap();
        assert_eq!(tx.decision_outcome("A").await.unwrap().as_deref(), Some("pended"));
        assert_eq!(tx.decision_outcome("Z").await.unwrap(), None);
        tx.commit().await.unwrap();

        let pended = store.pended_at("payer", 0, "pas-submit", "pas-inquire").await.unwrap();
        assert_eq!(pended, [Pended { authorization_id: "A".into(), submitted: "first live".into() }, Pended { authorization_id: "C".into(), submitted: "c".into() }]);
        assert!(store.pended_at("other-payer", 0, "pas-submit", "pas-inquire").await.unwrap().is_empty());

        let mut tx = store.begin().await.unwrap();
        assert!(tx.enqueue(&message("inq-a", "pas-inquire", "A", "inquiry"), 5_000).await.unwrap());
        assert!(!tx.enqueue(&message("inq-a", "pas-inquire", "A", "another instance's inquiry"), 5_001).await.unwrap(), "one inquiry per id");
        tx.commit().await.unwrap();
        let ids = |p: Vec<Pended>| p.into_iter().map(|p| p.authorization_id).collect::<Vec<_>>();
        assert_eq!(ids(store.pended_at("payer", 0, "pas-submit", "pas-inquire").await.unwrap()), ["C"], "an inquiry still waiting");
        // Delivered: skipped within the interval after it was queued (at 5 000), asked again after it.
        drain(&store, 6_000).await;
        assert_eq!(ids(store.pended_at("payer", 4_999, "pas-submit", "pas-inquire").await.unwrap()), ["C"], "inquired within the interval");
        assert_eq!(ids(store.pended_at("payer", 5_000, "pas-submit", "pas-inquire").await.unwrap()), ["A", "C"], "a whole interval ago");
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
