-- GIN indexes buffer new entries in a pending list (fastupdate) until a vacuum, an analyze by
-- autovacuum or the list's size limit (gin_pending_list_limit, 4 MB by default) moves them into
-- the index, and every search reads the whole list. After a bulk load of 100,000 memories the
-- tag and metadata indexes held every entry there (about 490 pages each, never past the 4 MB
-- limit): a 1%-selective tag filter spent 10 ms scanning the list against 0.2 ms in the index.
-- Tags and metadata paths are a few keys per memory, so they go straight into the index.
-- Full-text entries are many per memory, where batching pays; their list is capped at 256 kB
-- (32 pages) instead. Existing pending entries are moved into the indexes now.
ALTER INDEX memories_tags SET (fastupdate = off);
ALTER INDEX memories_metadata SET (fastupdate = off);
ALTER INDEX memories_search_text SET (gin_pending_list_limit = 256);
SELECT gin_clean_pending_list('memories_tags'::regclass);
SELECT gin_clean_pending_list('memories_metadata'::regclass);
SELECT gin_clean_pending_list('memories_search_text'::regclass);
