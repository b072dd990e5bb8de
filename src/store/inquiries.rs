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
            .fetch_optional(&mut *self.inner)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}
