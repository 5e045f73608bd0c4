-- Events carry the hybrid-logical-clock time of the process that wrote them (see
-- crates/model/src/hlc.rs: NTP64, stored with its top bit flipped so that SQL keeps its order).
-- Events written before get the time of their `at`, which readers now take from `hlc`.
ALTER TABLE job_events ADD COLUMN hlc BIGINT NOT NULL DEFAULT 0;
UPDATE job_events
SET hlc = (at / 1000) * 4294967296 + ((at % 1000) * 4294967296 + 999) / 1000 - 4611686018427387904 - 4611686018427387904;
-- A pixmesh from before this migration, still running while the others are upgraded, writes
-- events without an HLC time: they get the database server's clock.
ALTER TABLE job_events ALTER COLUMN hlc
    SET DEFAULT ((floor(extract(epoch FROM clock_timestamp()) * 4294967296) - 9223372036854775808)::bigint);

-- The time of each job's last event, for the statement that writes the next one: it stamps
-- that one after this (crates/store/src/postgres.rs, HLC_NEXT).
ALTER TABLE jobs ADD COLUMN hlc BIGINT NOT NULL DEFAULT (-9223372036854775807 - 1);
UPDATE jobs SET hlc = COALESCE((SELECT MAX(e.hlc) FROM job_events e WHERE e.job_id = jobs.id), hlc);
