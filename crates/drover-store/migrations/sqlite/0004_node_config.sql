-- Node configuration set centrally: each row is a version, for one node or for the nodes
-- whose labels match (none of either: every node). A node applies the newest that concerns
-- it and acknowledges.
CREATE TABLE node_configs (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id    TEXT,
    labels     TEXT NOT NULL,                -- JSON object: the selector
    config     TEXT NOT NULL,                -- drover-core NodeConfig as JSON
    created_at INTEGER NOT NULL
);

ALTER TABLE workers ADD COLUMN config_version INTEGER;     -- the version it last acknowledged
ALTER TABLE workers ADD COLUMN config_status TEXT;     -- applied | failed
ALTER TABLE workers ADD COLUMN config_error TEXT;
ALTER TABLE workers ADD COLUMN config_applied_at INTEGER;
ALTER TABLE workers ADD COLUMN applied_version INTEGER;    -- the version in force on it
