-- Memories, their share grants, and server secrets.
--
-- `embedding` is an untyped `vector` column: the model and its dimension are configuration, not
-- schema. Every row records `embedding_model` and `embedding_dim`; the server creates one partial
-- HNSW expression index per dimension it serves (`(embedding::vector(D)) vector_cosine_ops WHERE
-- embedding_dim = D`) at start-up, so changing model never needs a hand-written migration.

CREATE TABLE tmws_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memories (
    id               uuid PRIMARY KEY,
    namespace        text NOT NULL,
    owner            text NOT NULL,
    content          text NOT NULL CHECK (content <> ''),
    summary          text NOT NULL DEFAULT '',
    kind             text NOT NULL DEFAULT '',
    tags             text[] NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    importance       double precision NOT NULL DEFAULT 0.5 CHECK (importance >= 0 AND importance <= 1),
    access_level     smallint NOT NULL CHECK (access_level BETWEEN 1 AND 5),
    parent_id        uuid REFERENCES memories (id) ON DELETE SET NULL,
    embedding_model  text,
    embedding_dim    integer,
    embedding        vector,
    search_text      tsvector NOT NULL,
    create_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    expire_time      timestamptz,
    access_count     bigint NOT NULL DEFAULT 0,
    last_access_time timestamptz,
    version          bigint NOT NULL DEFAULT 1,
    request_id       text,
    CHECK ((embedding IS NULL) = (embedding_dim IS NULL)),
    CHECK (embedding IS NULL OR vector_dims(embedding) = embedding_dim)
);

-- Idempotent create: a retry with the same request_id finds the first result.
CREATE UNIQUE INDEX memories_request_id ON memories (namespace, owner, request_id) WHERE request_id IS NOT NULL;
-- Keyset pagination in both orders.
CREATE INDEX memories_ns_create_time ON memories (namespace, create_time DESC, id DESC);
CREATE INDEX memories_ns_importance ON memories (namespace, importance DESC, id DESC);
CREATE INDEX memories_owner ON memories (owner);
CREATE INDEX memories_parent ON memories (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX memories_tags ON memories USING gin (tags);
CREATE INDEX memories_metadata ON memories USING gin (metadata jsonb_path_ops);
CREATE INDEX memories_search_text ON memories USING gin (search_text);
CREATE INDEX memories_expire_time ON memories (expire_time) WHERE expire_time IS NOT NULL;

CREATE TABLE memory_grants (
    memory_id   uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    agent_id    text NOT NULL,
    permission  smallint NOT NULL CHECK (permission IN (1, 2)),
    expire_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (memory_id, agent_id)
);
CREATE INDEX memory_grants_agent ON memory_grants (agent_id, memory_id);

-- The keyword-search document: content, summary and tags, in the text search configuration the
-- server sets on each of its connections (`tmws.text_search_config`, from
-- TMWS_TEXT_SEARCH_CONFIG; 'english' when unset).
CREATE FUNCTION memories_search_text() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_text := to_tsvector(
        coalesce(nullif(current_setting('tmws.text_search_config', true), ''), 'english')::regconfig,
        NEW.content || ' ' || NEW.summary || ' ' || array_to_string(NEW.tags, ' '));
    RETURN NEW;
END
$$;

CREATE TRIGGER memories_search_text
    BEFORE INSERT OR UPDATE OF content, summary, tags ON memories
    FOR EACH ROW EXECUTE FUNCTION memories_search_text();
