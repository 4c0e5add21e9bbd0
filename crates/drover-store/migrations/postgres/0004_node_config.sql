-- Node configuration set centrally: each row is a version, for one node or for the nodes
-- whose labels match (none of either: every node). A node applies the newest that concerns
-- it and acknowledges.
CREATE TABLE node_configs (
    version    BIGSERIAL PRIMARY KEY,
    node_id    TEXT,
    labels     TEXT NOT NULL,                -- JSON object: the selector
    config     TEXT NOT NULL,                -- drover-core NodeConfig as JSON
    created_at BIGINT NOT NULL
);

ALTER TABLE workers ADD COLUMN config_version BIGINT;     -- the version it last acknowledged
ALTER TABLE workers ADD COLUMN config_status TEXT;     -- applied | failed
ALTER TABLE workers ADD COLUMN config_error TEXT;
ALTER TABLE workers ADD COLUMN config_applied_at BIGINT;
ALTER TABLE workers ADD COLUMN applied_version BIGINT;    -- the version in force on it
