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
    idempotency_key TEXT UNIQUE,
    group_id      TEXT,
    group_position INTEGER,
    waiting_on    INTEGER NOT NULL DEFAULT 0, -- dependencies not yet succeeded
    reservation_id TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER
);
-- The queue: ready jobs by priority, then age.
CREATE INDEX jobs_queue ON jobs (priority DESC, id) WHERE state = 'QUEUED' AND waiting_on = 0;
CREATE INDEX jobs_group ON jobs (group_id, group_position) WHERE group_id IS NOT NULL;

-- job_id waits for depends_on to succeed.
CREATE TABLE job_deps (
    job_id     TEXT NOT NULL REFERENCES jobs (id),
    depends_on TEXT NOT NULL REFERENCES jobs (id),
    PRIMARY KEY (job_id, depends_on)
);
CREATE INDEX job_deps_reverse ON job_deps (depends_on);

CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);

CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    resource   TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at   INTEGER
);
CREATE INDEX reservations_active ON reservations (expires_at) WHERE state = 'ACTIVE';

CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    secret     TEXT NOT NULL,
    events     TEXT NOT NULL,                -- JSON array; empty = every event
    created_at INTEGER NOT NULL
);

-- The outbox: one row per (webhook, event), written in the transaction of the change it
-- reports, delivered at least once from here.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL REFERENCES webhooks (id),
    event           TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'PENDING';
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
    session         TEXT,                    -- the stream (replica and connection) it is on
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

-- Duties that one control-plane replica at a time performs (lease expiry, webhook delivery),
-- held by renewing a lease here.
CREATE TABLE duties (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
