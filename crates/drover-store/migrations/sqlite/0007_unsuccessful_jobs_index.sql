-- jobs_state indexed every job in every state: each state change rewrote its entry, a
-- tenth of the B-tree writes of a job, and listing by state did not even use it (the
-- query's `(? IS NULL OR state = ?)` cannot be planned on an index). Listing is by state
-- literal now; what a user looks for among many jobs are those that did not succeed, and
-- only those are indexed. Succeeded jobs are most jobs, and live ones are the newest: a
-- listing of either walks the primary key from the newest and fills its page at once.
DROP INDEX jobs_state;
CREATE INDEX jobs_unsuccessful ON jobs (state, id)
    WHERE state = 'FAILED' OR state = 'TIMED_OUT' OR state = 'CANCELLED' OR state = 'SKIPPED';
