-- Events are read by job and by worker only (events_job, events_worker, both ordered by
-- seq); nothing looks one up by seq alone. The primary key's index was a fifth of the
-- index entries a job writes (five events each), for no reader: without it the server
-- spends about 7 % less CPU per job (docs/benchmarks.md, 2026-12-07). seq stays unique:
-- only its sequence gives it values. SQLite's events keep seq as their rowid, which
-- costs no index.
ALTER TABLE events DROP CONSTRAINT events_pkey;
