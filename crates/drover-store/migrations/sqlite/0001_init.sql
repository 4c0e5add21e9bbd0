-- drover's SQLite schema. Times are microseconds since the Unix epoch.

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,          -- UUIDv7: sorts by creation time
    name          TEXT NOT NULL,
    spec          TEXT NOT NULL,             -- JobSpec as JSON
    state         TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    exit_code     INTEGER,
    error         TEXT,
    not_before    INTEGER NOT NULL,          -- a retried job waits for its backoff
    current_run   TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER
);
-- The queue: ready jobs by priority, then age.
CREATE INDEX jobs_queue ON jobs (priority DESC, id) WHERE state = 'QUEUED';
CREATE INDEX jobs_state ON jobs (state, id);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id),
    attempt          INTEGER NOT NULL,
    retry_of         TEXT,
    worker_id        TEXT NOT NULL,
    state            TEXT NOT NULL,
    exit_code        INTEGER,
    error            TEXT,
    assigned_at      INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    lease_expires_at INTEGER NOT NULL,
    UNIQUE (job_id, attempt)
);
CREATE INDEX runs_job ON runs (job_id, attempt);
CREATE INDEX runs_active ON runs (worker_id) WHERE state IN ('ASSIGNED', 'RUNNING');

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    job_id    TEXT,
    worker_id TEXT,
    type      TEXT NOT NULL,
    data      TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, seq) WHERE job_id IS NOT NULL;
CREATE INDEX events_worker ON events (worker_id, seq) WHERE worker_id IS NOT NULL;

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL,
    capabilities    TEXT NOT NULL,
    credential_hash TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    last_seen_at    INTEGER NOT NULL
);

CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,             -- sha256 of the token; the token itself is shown once
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    used_by    TEXT
);

CREATE TABLE log_files (
    run_id      TEXT PRIMARY KEY,
    uri         TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    entry_count INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,            -- highest stored sequence number; 0 = none
    gaps        INTEGER NOT NULL DEFAULT 0   -- sequence numbers that never arrived
);
