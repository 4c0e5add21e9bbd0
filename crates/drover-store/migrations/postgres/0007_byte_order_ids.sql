-- Ids and states compare byte by byte, as SQLite compares them. Under the database's
-- default collation (say en_US.UTF-8 or C.UTF-8) every comparison in these indexes went
-- through the locale (strcoll), which was a large part of the server's time under load;
-- the values are ASCII (UUIDs, state names), so only the cost changes, and ORDER BY id
-- now agrees with SQLite's order whatever the database's locale. Indexes are rebuilt; the
-- rows are not rewritten.
ALTER TABLE job_deps
    ALTER COLUMN job_id TYPE TEXT COLLATE "C",
    ALTER COLUMN depends_on TYPE TEXT COLLATE "C";
ALTER TABLE runs
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN job_id TYPE TEXT COLLATE "C",
    ALTER COLUMN retry_of TYPE TEXT COLLATE "C",
    ALTER COLUMN worker_id TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C";
ALTER TABLE jobs
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C",
    ALTER COLUMN current_run TYPE TEXT COLLATE "C",
    ALTER COLUMN group_id TYPE TEXT COLLATE "C",
    ALTER COLUMN reservation_id TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C";
ALTER TABLE events
    ALTER COLUMN job_id TYPE TEXT COLLATE "C",
    ALTER COLUMN worker_id TYPE TEXT COLLATE "C";
ALTER TABLE workers
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C";
ALTER TABLE groups
    ALTER COLUMN id TYPE TEXT COLLATE "C";
