-- The change announcements of migrations 0012 and 0013 cost every UPDATE/DELETE of memories,
-- grants, agents and keys a NOTIFY, and PostgreSQL serialises the commits of notifying
-- transactions (pgbench, 2 cores, single-row UPDATEs at 8 clients: about half the commits per
-- second). Where every replica runs with its read caches off (TMWS_MEMORY_CACHE_TTL=0 and
-- TMWS_AUTH_CACHE_TTL=0), nothing listens for them; then
--     ALTER DATABASE <db> SET tmws.announce_changes = off;
-- stops them for new sessions. Unset, or anything but `off`, announces.
CREATE OR REPLACE FUNCTION tmws_announcing() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('tmws.announce_changes', true), '') <> 'off';
$$;

CREATE OR REPLACE FUNCTION tmws_notify_memories(ids uuid[]) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('tmws_memory', CASE WHEN cardinality(ids) > 200 THEN '*' ELSE array_to_string(ids, ',') END)
    WHERE cardinality(ids) > 0 AND tmws_announcing();
$$;

CREATE OR REPLACE FUNCTION memories_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF tmws_announcing() THEN
        PERFORM pg_notify('tmws_memory', '*');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION identity_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF tmws_announcing() THEN
        PERFORM pg_notify('tmws_identity', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION memories_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF tmws_announcing() THEN
        PERFORM tmws_notify_memories(ARRAY(SELECT DISTINCT id FROM changed LIMIT 201));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION memory_grants_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF tmws_announcing() THEN
        PERFORM tmws_notify_memories(ARRAY(SELECT DISTINCT memory_id FROM changed LIMIT 201));
    END IF;
    RETURN NULL;
END
$$;
