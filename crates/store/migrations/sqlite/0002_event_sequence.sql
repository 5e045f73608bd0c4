-- Events get a per-job sequence number (1, 2, 3, … per job) and an encoding version; the old
-- global counter becomes `id`. Jobs count their events, so the next number is taken under the
-- job row's write, in the same transaction as the change the event describes.
ALTER TABLE job_events RENAME COLUMN seq TO id;
ALTER TABLE job_events ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_events ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
UPDATE job_events SET seq = (SELECT COUNT(*) FROM job_events AS e WHERE e.job_id = job_events.job_id AND e.id <= job_events.id);
DROP INDEX IF EXISTS job_events_by_job;
CREATE UNIQUE INDEX job_events_by_job ON job_events (job_id, seq);

ALTER TABLE jobs ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET event_seq = (SELECT COUNT(*) FROM job_events WHERE job_id = jobs.id);

-- Pruning finds ended jobs by age.
CREATE INDEX jobs_ended ON jobs (updated_at) WHERE state IN ('succeeded', 'failed');
