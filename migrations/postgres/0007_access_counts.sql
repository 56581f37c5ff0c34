-- Read counts in a table of their own. Every search and read adds to the access counts of the
-- memories it returns (flushed once a second). As columns of `memories` those updates rewrote
-- ~2 kB rows: on full pages they were not HOT, so every one inserted new entries into every index
-- of `memories`, the HNSW index included, and cost search throughput and most of its tail latency
-- (docs/BENCHMARKS.md, tuning log). Here an update rewrites a 40-byte row with one index.
CREATE TABLE memory_access (
    memory_id        uuid PRIMARY KEY REFERENCES memories (id) ON DELETE CASCADE,
    access_count     bigint NOT NULL DEFAULT 0,
    last_access_time timestamptz
);

INSERT INTO memory_access (memory_id, access_count, last_access_time)
SELECT id, access_count, last_access_time FROM memories
WHERE access_count <> 0 OR last_access_time IS NOT NULL;

ALTER TABLE memories DROP COLUMN access_count, DROP COLUMN last_access_time;
