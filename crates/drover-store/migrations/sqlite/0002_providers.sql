-- Workers that providers start: the record exists from the moment the provider is asked
-- (state REGISTERING, no credential yet), keeps the provider's resource id, and ends.
ALTER TABLE workers ADD COLUMN provider TEXT;
ALTER TABLE workers ADD COLUMN resource_id TEXT;
ALTER TABLE workers ADD COLUMN ended_at INTEGER;       -- TERMINATED, or LOST for good
CREATE INDEX workers_provided ON workers (provider) WHERE provider IS NOT NULL AND ended_at IS NULL;

-- A join token minted for a provisioned worker registers that very record.
ALTER TABLE join_tokens ADD COLUMN worker_id TEXT;

-- Facts about this installation, shared by its replicas (cluster_id labels what its
-- providers create, so that two control planes on one Docker engine leave each other alone).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
