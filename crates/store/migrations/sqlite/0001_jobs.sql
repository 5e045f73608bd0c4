-- The schema as it was before versioned migrations (IF NOT EXISTS: databases made then already
-- have it; one made before jobs had owners gains the column before this runs).
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at INTEGER,
    not_before INTEGER NOT NULL DEFAULT 0,
    input_digest TEXT NOT NULL,
    input_size INTEGER NOT NULL,
    input_format TEXT NOT NULL,
    options TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (state, not_before, created_at);

CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    data TEXT NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);

-- One row per probing role, rewritten by each health probe.
CREATE TABLE IF NOT EXISTS health (probe TEXT PRIMARY KEY, at INTEGER NOT NULL) STRICT;
