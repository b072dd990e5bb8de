//! The store's side of inbound referrals: each referral's route back to its referrer, and how a resent one is recognised.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, Tx};

/// Where an inbound referral came from and how its referrer hears back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferralRoute {
    /// The referral record's id (the sender's referral identifier).
    pub referral_id: String,
    /// The SMART client that sent it.
    pub client_id: String,
    /// The configured partner tied to that client ('' when none).
    pub partner: String,
    /// For a client with no partner: the referral message's `MessageHeader.source.endpoint`, which the client's `callbacks` allow ('' when none).
    pub callback: String,
    /// `task` or `message` ('' when the referrer cannot be told).
    pub channel: String,
    /// The Task the gateway stored.
    pub task_id: String,
    /// The Task as the referrer sent it (its id and references), JSON.
    pub sent_task: String,
    /// The referral message's `MessageHeader.id` ('' for a transaction).
    pub header_id: String,
    /// The key a resent transaction is recognised by ('' for a message, which has its own).
    pub dedupe_key: String,
    /// What the referral stored, `Type/id` in entry order, JSON array.
    pub resources: String,
    /// The program's client id, once an enrollment names the referral ('' before).
    pub patient_client_id: String,
    pub received: String,
}

const COLUMNS: &str = "referral_id, client_id, partner, callback, channel, task_id, sent_task, header_id, dedupe_key, resources, patient_client_id, received";

fn route(row: &AnyRow) -> Result<ReferralRoute, sqlx::Error> {
    Ok(ReferralRoute {
        referral_id: row.try_get(0)?,
        client_id: row.try_get(1)?,
        partner: row.try_get(2)?,
        callback: row.try_get(3)?,
        channel: row.try_get(4)?,
        task_id: row.try_get(5)?,
        sent_task: row.try_get(6)?,
        header_id: row.try_get(7)?,
        dedupe_key: row.try_get(8)?,
        resources: row.try_get(9)?,
        patient_client_id: row.try_get(10)?,
        received: row.try_get(11)?,
    })
}

impl Tx {
    /// Records a referral's route; `false` when one with its id is already recorded (the first stands).
    pub async fn put_referral_route(&mut self, r: &ReferralRoute) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO referral_routes (referral_id, client_id, partner, callback, channel, task_id, sent_task, header_id, dedupe_key, resources, patient_client_id, received) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (referral_id) DO NOTHING",
        )
        .bind(r.referral_id.as_str())
        .bind(r.client_id.as_str())
        .bind(r.partner.as_str())
        .bind(r.callback.as_str())
        .bind(r.channel.as_str())
        .bind(r.task_id.as_str())
        .bind(r.sent_task.as_str())
        .bind(r.header_id.as_str())
        .bind(r.dedupe_key.as_str())
        .bind(r.resources.as_str())
        .bind(r.patient_client_id.as_str())
        .bind(r.received.as_str())
        .execute(self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One referral's route, read in this transaction.
    pub async fn referral_route(&mut self, referral_id: &str) -> Result<Option<ReferralRoute>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM referral_routes WHERE referral_id = $1")))
            .bind(referral_id)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.as_ref().map(route).transpose()?)
    }

    /// The route of a resent transaction, by its dedupe key.
    pub async fn referral_route_by_key(&mut self, dedupe_key: &str) -> Result<Option<ReferralRoute>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM referral_routes WHERE dedupe_key = $1 AND dedupe_key <> ''")))
            .bind(dedupe_key)
            .fetch_optional(self.conn().await?)
            .await?;
        Ok(row.as_ref().map(route).transpose()?)
    }

    /// The routes of the referrals a client of the program came in on.
    pub async fn referral_routes_of_client(&mut self, patient_client_id: &str) -> Result<Vec<ReferralRoute>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM referral_routes WHERE patient_client_id = $1 AND patient_client_id <> '' ORDER BY received")))
            .bind(patient_client_id)
            .fetch_all(self.conn().await?)
            .await?;
        Ok(rows.iter().map(route).collect::<Result<_, _>>()?)
    }

    /// Ties a referral to the program's client an enrollment made of it.
    pub async fn link_referral_client(&mut self, referral_id: &str, patient_client_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE referral_routes SET patient_client_id = $2 WHERE referral_id = $1")
            .bind(referral_id)
            .bind(patient_client_id)
            .execute(self.conn().await?)
            .await?;
        Ok(())
    }
}

impl Store {
    /// The route of a resent transaction, by its dedupe key, outside a transaction.
    pub async fn referral_route_by_key(&self, dedupe_key: &str) -> Result<Option<ReferralRoute>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM referral_routes WHERE dedupe_key = $1 AND dedupe_key <> ''")))
            .bind(dedupe_key)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(route).transpose()?)
    }

    /// One referral's route, outside a transaction.
    pub async fn referral_route(&self, referral_id: &str) -> Result<Option<ReferralRoute>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM referral_routes WHERE referral_id = $1")))
            .bind(referral_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(route).transpose()?)
    }
}
