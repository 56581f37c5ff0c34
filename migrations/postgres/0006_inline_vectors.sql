-- Keep vectors in the row (storage MAIN) instead of out of line in TOAST (pgvector's default,
-- EXTERNAL): an exact filtered search reads ~1,000 rows and their vectors, and a TOAST lookup
-- per row made it ~3x slower (docs/BENCHMARKS.md, tuning log). MAIN still moves a value out of
-- line when the row cannot fit a page (very large dimensions). Only the column's storage
-- setting changes here; existing rows move inline when they are next written.
ALTER TABLE memories ALTER COLUMN embedding SET STORAGE MAIN;
