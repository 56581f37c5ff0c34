-- Announces every change to a memory or to its grants on the `tmws_memory` channel, so that each
-- replica drops what it remembers of those memories (the read cache of GetMemory). The payload
-- is the changed ids, comma-separated; `*` (more than 200 ids, or a TRUNCATE) means "all".
-- Statement-level triggers with transition tables: one notification per statement, whatever
-- writes it (this release, another replica, an import, a hand-written UPDATE). Inserts of
-- memories need none (no replica can remember a memory it has never read), nor do read counts
-- (`memory_access`), which a cached memory may show up to TMWS_MEMORY_CACHE_TTL late.
CREATE FUNCTION tmws_notify_memories(ids uuid[]) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('tmws_memory', CASE WHEN cardinality(ids) > 200 THEN '*' ELSE array_to_string(ids, ',') END)
    WHERE cardinality(ids) > 0;
$$;

CREATE FUNCTION memories_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tmws_notify_memories(ARRAY(SELECT DISTINCT id FROM changed LIMIT 201));
    RETURN NULL;
END
$$;

CREATE FUNCTION memory_grants_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tmws_notify_memories(ARRAY(SELECT DISTINCT memory_id FROM changed LIMIT 201));
    RETURN NULL;
END
$$;

CREATE FUNCTION memories_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tmws_memory', '*');
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_updated AFTER UPDATE ON memories REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memories_changed();
CREATE TRIGGER memories_deleted AFTER DELETE ON memories REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memories_changed();
CREATE TRIGGER memories_truncated AFTER TRUNCATE ON memories
    FOR EACH STATEMENT EXECUTE FUNCTION memories_truncated();
CREATE TRIGGER memory_grants_inserted AFTER INSERT ON memory_grants REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memory_grants_changed();
CREATE TRIGGER memory_grants_updated AFTER UPDATE ON memory_grants REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memory_grants_changed();
CREATE TRIGGER memory_grants_deleted AFTER DELETE ON memory_grants REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memory_grants_changed();
CREATE TRIGGER memory_grants_truncated AFTER TRUNCATE ON memory_grants
    FOR EACH STATEMENT EXECUTE FUNCTION memories_truncated();
