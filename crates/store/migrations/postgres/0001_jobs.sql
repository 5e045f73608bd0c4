-- The job table is the queue and the source of truth. Times are milliseconds since the Unix
-- epoch, and integers are BIGINT, as on SQLite (one row decoder serves both).
--
-- fillfactor 80: a claim, a lease renewal and a commit each rewrite the row; free room on its
-- page lets PostgreSQL keep the new version on the same page (a HOT update when no indexed
-- column changes, as for lease renewals), which keeps the table and its indexes from bloating.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('queued', 'processing', 'succeeded', 'failed')),
    attempt BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    not_before BIGINT NOT NULL DEFAULT 0,
    input_digest TEXT NOT NULL,
    input_size BIGINT NOT NULL,
    input_format TEXT NOT NULL,
    options TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    result TEXT,
    error TEXT,
    event_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
) WITH (fillfactor = 80);

-- The claim reads one of two small partial indexes, never the whole table: queued jobs in
-- arrival order, and processing jobs by lease expiry (the rescue of a crashed claimer's jobs).
-- Ended jobs are in neither, however many there are.
CREATE INDEX jobs_queued ON jobs (created_at, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'processing';
-- Pruning finds ended jobs by age.
CREATE INDEX jobs_ended ON jobs (updated_at) WHERE state IN ('succeeded', 'failed');

-- The event log: one row per state change, written in the same transaction. `seq` numbers a
-- job's events 1, 2, 3, …; `id` orders all events (the outbox's cursor).
CREATE TABLE job_events (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    version BIGINT NOT NULL,
    kind TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at BIGINT NOT NULL,
    data TEXT NOT NULL,
    UNIQUE (job_id, seq)
);

-- One row per probing role, rewritten by each health probe.
CREATE TABLE health (probe TEXT PRIMARY KEY, at BIGINT NOT NULL);
