-- The result cache: the work of an upload (its input's digest and canonical options, in the
-- scope the cache is shared in) → the job that made it or is making it. An entry goes with its
-- job when that is pruned.
CREATE TABLE result_cache (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX result_cache_job ON result_cache (job_id);
-- A job waiting for an identical one (`follows`) is queued but never due (`not_before` at the
-- largest integer) until that one ends it or releases it.
ALTER TABLE jobs ADD COLUMN follows TEXT;
CREATE INDEX jobs_following ON jobs (follows) WHERE follows IS NOT NULL;
