-- The gateway's tables on the PostgreSQL store. Times are UTC instants as text
-- (YYYY-MM-DDTHH:MM:SS.sssZ), which sort chronologically.

-- The current version of every resource.
CREATE TABLE resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_updated TEXT NOT NULL,
    body TEXT NOT NULL,
    -- Organizations party to the resource, space separated (authorization).
    parties TEXT NOT NULL,
    -- meta.security codings as system|code, space separated (disclosure policy).
    labels TEXT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (type, id)
);

-- Every version ever written, including the current one (history, vread).
CREATE TABLE resource_versions (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_updated TEXT NOT NULL,
    method TEXT NOT NULL,
    body TEXT NOT NULL,
    parties TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (type, id, version)
);

-- Token and reference search values of current versions.
CREATE TABLE search_tokens (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX search_tokens_by_value ON search_tokens (type, param, value);
CREATE INDEX search_tokens_by_resource ON search_tokens (type, id);

-- Date search values of current versions as [low, high) ranges.
CREATE TABLE search_dates (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    low TEXT NOT NULL,
    high TEXT NOT NULL
);
CREATE INDEX search_dates_by_value ON search_dates (type, param, low);
CREATE INDEX search_dates_by_resource ON search_dates (type, id);

-- The audit trail: AuditEvents, append-only.
CREATE TABLE audit_events (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    recorded TEXT NOT NULL,
    client TEXT NOT NULL,
    action TEXT NOT NULL,
    subtype TEXT NOT NULL,
    outcome TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX audit_events_by_time ON audit_events (recorded);
CREATE INDEX audit_events_by_client ON audit_events (client, recorded);

-- FHIR messages already processed, by 'bundle:<Bundle.id>' and 'header:<MessageHeader.id>', with the response sent.
CREATE TABLE processed_messages (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    received TEXT NOT NULL
);

-- Client assertion ids seen, until they expire (replay protection).
CREATE TABLE client_assertions (
    client TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client, jti)
);

-- Access tokens issued, by SHA-256 of the token (the token itself is never stored).
CREATE TABLE access_tokens (
    token_hash TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    scope TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only';
END;
$$;
CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
