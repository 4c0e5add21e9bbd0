-- runs_job duplicated the index of the UNIQUE (job_id, attempt) constraint: every new
-- run paid for two identical index entries.
DROP INDEX runs_job;
