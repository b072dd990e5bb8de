-- 42 CFR Part 2: a write about patients this instance does not know to be enrolled is stored
-- unlabelled only if none of them is, decided in the write's own statement: it copies the
-- enrolled ones here, and no row may ever be here, so the statement fails (and the write is
-- retried, labelled). No round trip before the write, and right whichever instance enrolled them.
CREATE TABLE part2_unlabelled (
    patient TEXT NOT NULL,
    CONSTRAINT part2_enrolled CHECK (false)
);

-- `_lastUpdated` is matched on the stored row's own `last_updated`: its index rows only duplicated it.
DELETE FROM search_dates WHERE param = '_lastUpdated';
