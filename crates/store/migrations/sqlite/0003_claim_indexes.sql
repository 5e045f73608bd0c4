-- The claim reads two small partial indexes instead of scanning every job: queued jobs in
-- arrival order, and processing jobs by lease expiry (the rescue of a vanished claimer's jobs).
CREATE INDEX jobs_queued ON jobs (created_at, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'processing';
DROP INDEX IF EXISTS jobs_claimable;
