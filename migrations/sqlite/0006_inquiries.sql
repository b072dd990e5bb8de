-- PAS $inquire while a payer's Subscription is in error (issue 11): the pended authorizations at a payer are
-- found by joining their decision records to the outbox messages that submitted them, by record.
CREATE INDEX outbox_by_record ON outbox (record_type, record_id, kind);
