-- PAS pended decisions (issue 11): the one Subscription the gateway keeps at each payer.

-- One row per payer, written with the first pended decision in the same transaction as the outbox
-- message that creates the Subscription at the payer. The secret the payer sends back in every
-- notification is kept only as its SHA-256 (hex). remote_id is the payer's Subscription id ('' until
-- the payer answered). status: requested, active, error, off (the backport's Subscription status as
-- the gateway last learnt it). last_event is the highest event number applied (0: none yet), so a
-- duplicate notification changes nothing and a gap is noticed. Times in milliseconds since the Unix epoch.
CREATE TABLE pas_subscriptions (
    partner TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    last_event INTEGER NOT NULL,
    last_notification_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
