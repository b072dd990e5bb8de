-- 42 CFR Part 2: the rules of the patients' Consents, flattened when a Consent is written (one row
-- per provision × recipient × purpose × label; '' = any), so searches decide consent in SQL exactly
-- as auth::consent::decide does in memory; and the clients who are or were enrolled in a
-- substance-use program, whose every resource is labelled when stored.
CREATE TABLE consent_rules (
    consent TEXT NOT NULL,
    patient TEXT NOT NULL,
    recorded BIGINT NOT NULL,
    active BIGINT NOT NULL,
    effect TEXT NOT NULL,
    depth BIGINT NOT NULL,
    recipient TEXT NOT NULL,
    purpose TEXT NOT NULL,
    label TEXT NOT NULL,
    start_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL
);
CREATE INDEX consent_rules_by_patient ON consent_rules (patient, effect, recipient);
CREATE INDEX consent_rules_by_consent ON consent_rules (consent);

CREATE TABLE part2_patients (
    patient TEXT PRIMARY KEY,
    since TEXT NOT NULL
);
