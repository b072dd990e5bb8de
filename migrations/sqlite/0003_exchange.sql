-- The exchange (issue 11): IOP records the gateway holds, and the outbox every outbound message goes through.

-- IOP records: those the clinic sent (direction 'outbound': they go out as FHIR) and those the gateway
-- made from partners' FHIR (direction 'inbound': payer decisions, referrals). One row per record; a
-- re-sent record replaces its row.
CREATE TABLE iop_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_type TEXT NOT NULL,
    id TEXT NOT NULL,
    direction TEXT NOT NULL,
    client_id TEXT NOT NULL,
    authorization_id TEXT NOT NULL,
    status TEXT NOT NULL,
    updated TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (record_type, id, direction)
);
CREATE INDEX iop_records_by_type ON iop_records (record_type, seq);

-- Outbound messages, written in the same transaction as the change that caused them and built once:
-- every attempt sends the same payload. status: pending, in-flight (leased by one worker until
-- lease_until), delivered, dead. Times in milliseconds since the Unix epoch.
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    partner TEXT NOT NULL,
    -- Messages of one partner and subject are delivered in seq order; others never wait for them.
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    record_type TEXT NOT NULL,
    record_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER NOT NULL,
    lease_owner TEXT NOT NULL,
    delivered_at INTEGER NOT NULL,
    last_status INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX outbox_order ON outbox (partner, subject, seq);

-- Every delivery attempt, for operators (outbox show).
CREATE TABLE outbox_attempts (
    message_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    error TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (message_id, attempt)
);
