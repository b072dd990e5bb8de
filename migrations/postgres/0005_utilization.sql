-- The utilization rule reads only what can change its answer (issue 11): a client's certified
-- decisions by one indexed query, then the authorizations they decide and the extensions that name
-- their certification numbers. Decision rows name their client (the decided authorization's), and an
-- authorization row the certification it extends.
ALTER TABLE iop_records ADD COLUMN extends_certification TEXT NOT NULL DEFAULT '';

UPDATE iop_records SET extends_certification = COALESCE(body::jsonb ->> 'extends_certification', '')
WHERE record_type = 'authorization' AND body LIKE '%"extends_certification"%';

-- A decision decides an authorization the clinic sent (direction 'outbound'); the client is that one's.
UPDATE iop_records d SET client_id = a.client_id
FROM iop_records a
WHERE d.record_type = 'decision' AND a.record_type = 'authorization' AND a.direction = 'outbound' AND a.id = d.authorization_id;

CREATE INDEX iop_records_by_client ON iop_records (client_id, record_type, status);
CREATE INDEX iop_records_by_extension ON iop_records (extends_certification);
