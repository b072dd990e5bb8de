-- The utilization rule reads only what can change its answer (issue 11): a client's certified
-- decisions by one indexed query, then the authorizations they decide and the extensions that name
-- their certification numbers. Decision rows name their client (the decided authorization's), and an
-- authorization row the certification it extends.
ALTER TABLE iop_records ADD COLUMN extends_certification TEXT NOT NULL DEFAULT '';

UPDATE iop_records SET extends_certification = COALESCE(json_extract(body, '$.extends_certification'), '')
WHERE record_type = 'authorization' AND body LIKE '%"extends_certification"%' AND json_valid(body);

-- A decision decides an authorization the clinic sent (direction 'outbound'); the client is that one's.
UPDATE iop_records SET client_id = COALESCE((
    SELECT a.client_id FROM iop_records a WHERE a.record_type = 'authorization' AND a.direction = 'outbound' AND a.id = iop_records.authorization_id
), '')
WHERE record_type = 'decision';

CREATE INDEX iop_records_by_client ON iop_records (client_id, record_type, status);
CREATE INDEX iop_records_by_extension ON iop_records (extends_certification);
