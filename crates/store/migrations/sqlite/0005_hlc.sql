-- Events carry the hybrid-logical-clock time of the process that wrote them (see
-- crates/model/src/hlc.rs: NTP64, stored with its top bit flipped so that SQL keeps its order).
-- Events written before get the time of their `at`, which readers now take from `hlc`.
ALTER TABLE job_events ADD COLUMN hlc INTEGER NOT NULL DEFAULT 0;
UPDATE job_events
SET hlc = (at / 1000) * 4294967296 + ((at % 1000) * 4294967296 + 999) / 1000 - 4611686018427387904 - 4611686018427387904;
