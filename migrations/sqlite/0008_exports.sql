-- Bulk Data $export (issue 13): one row per export job, and the patients a Patient- or Group-level job covers.

-- status: running (a worker holds it until lease_until, and may start at not_before), completed,
-- failed. A cancelled or expired job's row is deleted with its files. plan: the kick-off as JSON
-- (level, types, _since/_until, _typeFilter queries, issues ignored under handling=lenient);
-- progress: the worker's cursor as JSON (type, last id, current file and its committed length,
-- files done). Times in milliseconds since the Unix epoch; transaction_time is a FHIR instant.
CREATE TABLE export_jobs (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    scope TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    plan TEXT NOT NULL,
    transaction_time TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    lease_until INTEGER NOT NULL,
    lease_owner TEXT NOT NULL,
    progress TEXT NOT NULL,
    finished_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    error TEXT NOT NULL,
    manifest TEXT NOT NULL
);
CREATE INDEX export_jobs_by_client ON export_jobs (client, status);
CREATE INDEX export_jobs_by_status ON export_jobs (status, lease_until);

-- The patients (`Patient/<id>`) whose compartments a job exports, fixed at kick-off.
CREATE TABLE export_members (
    job TEXT NOT NULL,
    patient TEXT NOT NULL,
    PRIMARY KEY (job, patient)
);
