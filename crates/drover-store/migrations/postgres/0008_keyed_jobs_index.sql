-- Only jobs submitted with an idempotency key need an entry in its unique index; the
-- column's UNIQUE constraint gave every job one (a NULL), an index write per job.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
