-- Events are read by job and by worker only (events_job, events_worker, both ordered by
-- seq); nothing looks one up by seq alone. The primary key's index took an entry per
-- event row, for no reader (a fifth of a job's index entries when each event was a row):
-- without it the server spent about 7 % less CPU per job (docs/benchmarks.md, 2026-12-07). seq stays unique:
-- only its sequence gives it values. SQLite's events keep seq as their rowid, which
-- costs no index.
ALTER TABLE events DROP CONSTRAINT events_pkey;
