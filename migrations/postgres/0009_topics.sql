-- Subscriptions R5 Backport as a server (issue 12): partners' topic-based Subscriptions and their events.

-- One row per Subscription a partner created (POST /Subscription). client_id is the creating client:
-- only it reads, updates or deletes the Subscription, and notifications are disclosed as to it, with the
-- scopes its token had (scope). filters: the backport filter criteria, one "param=value" per line.
-- payload: empty, id-only or full-resource. headers: channel.header, one per line. status: requested,
-- active, error, off. events: events since the Subscription started (numbers without gaps, assigned in the
-- writing transaction). failures: delivery failures in a row. last_queued_at: when a notification was last
-- queued (heartbeats fill idle periods). resource: the Subscription as created (status patched on read).
-- Times in milliseconds since the Unix epoch.
CREATE TABLE topic_subscriptions (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    topic TEXT NOT NULL,
    filters TEXT NOT NULL,
    payload TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    headers TEXT NOT NULL,
    heartbeat_secs BIGINT NOT NULL,
    timeout_secs BIGINT NOT NULL,
    status TEXT NOT NULL,
    events BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    error TEXT NOT NULL,
    last_queued_at BIGINT NOT NULL,
    version BIGINT NOT NULL,
    updated TEXT NOT NULL,
    resource TEXT NOT NULL
);
CREATE INDEX topic_subscriptions_client ON topic_subscriptions (client_id);
CREATE INDEX topic_subscriptions_topic ON topic_subscriptions (topic, status);

-- Each event of a Subscription: the version of the resource that caused it, for $events replay.
CREATE TABLE topic_events (
    subscription_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (subscription_id, number)
);
