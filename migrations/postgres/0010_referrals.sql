-- Inbound referrals (issue 12): where each referral came from and where its referrer hears back.
-- One row per referral record (the sender's referral id). `task_id` is the Task the gateway stored;
-- `sent_task` the Task as the referrer sent it (its own id and references), which is what the
-- referrer is sent back; `channel` is how: 'task' (PUT at the partner's FHIR base) or 'message'
-- (a feedback message to its $process-message); `partner` names the configured partner ('' when none);
-- `callback` is the referral message's source endpoint, used for a client with no partner when it
-- starts with one of the client's configured `callbacks`.
-- `dedupe_key` recognises a resent transaction (client and Task identifier), `resources` lists what
-- the first one stored, in entry order, so a resend is answered with the same resources.
CREATE TABLE referral_routes (
    referral_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    partner TEXT NOT NULL,
    callback TEXT NOT NULL,
    channel TEXT NOT NULL,
    task_id TEXT NOT NULL,
    sent_task TEXT NOT NULL,
    header_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    resources TEXT NOT NULL,
    patient_client_id TEXT NOT NULL,
    received TEXT NOT NULL
);
CREATE INDEX referral_routes_by_dedupe ON referral_routes (dedupe_key);
CREATE INDEX referral_routes_by_client ON referral_routes (patient_client_id);
