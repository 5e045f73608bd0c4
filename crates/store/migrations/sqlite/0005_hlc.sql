-- Events carry the hybrid-logical-clock time of the process that wrote them (see
-- crates/model/src/hlc.rs: NTP64, stored with its top bit flipped so that SQL keeps its order).
-- Events written before get the time of their `at`, which readers now take from `hlc`.
ALTER TABLE job_events ADD COLUMN hlc INTEGER NOT NULL DEFAULT 0;
UPDATE job_events
SET hlc = (at / 1000) * 4294967296 + ((at % 1000) * 4294967296 + 999) / 1000 - 4611686018427387904 - 4611686018427387904;

-- A pixmesh from before this migration, still running while the others are upgraded, writes
-- events without an HLC time (the column's 0): they get the time of their `at`, as above.
CREATE TRIGGER job_events_hlc_from_at AFTER INSERT ON job_events WHEN NEW.hlc = 0
BEGIN
    UPDATE job_events
    SET hlc = (NEW.at / 1000) * 4294967296 + ((NEW.at % 1000) * 4294967296 + 999) / 1000 - 4611686018427387904 - 4611686018427387904
    WHERE id = NEW.id;
END;
