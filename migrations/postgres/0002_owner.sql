-- Ownership (issue 10): the Organization that created a resource owns it; only its owner (or, for a
-- Task, the Organization in Task.owner) may write it. Existing rows take the first recorded party,
-- which was always the creating client's Organization.
ALTER TABLE resources ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE resource_versions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
UPDATE resources SET owner = split_part(parties, ' ', 1);
UPDATE resource_versions SET owner = split_part(parties, ' ', 1);
