-- Memories, their share grants, their tags, their vectors and the keyword index (the embedded
-- counterpart of migrations/postgres/0002_memories.sql; `tmws_secrets` is in 0001).
--
-- `seq` is each row's stable integer key (AUTOINCREMENT: never reused after a delete). The tag,
-- grant and vector side tables, the FTS5 index and the server's in-process vector cache address
-- rows by it; `id` is the public UUID. Filterable columns come first and large text last, so
-- filters read the start of each row only.

CREATE TABLE memories (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
    namespace        TEXT NOT NULL,
    owner            TEXT NOT NULL,
    -- 1 private, 2 team, 3 shared, 4 public, 5 system
    access_level     INTEGER NOT NULL CHECK (access_level BETWEEN 1 AND 5),
    kind             TEXT NOT NULL DEFAULT '',
    importance       REAL NOT NULL DEFAULT 0.5 CHECK (importance >= 0 AND importance <= 1),
    create_time      INTEGER NOT NULL,
    update_time      INTEGER NOT NULL,
    expire_time      INTEGER,
    parent_id        BLOB REFERENCES memories (id) ON DELETE SET NULL,
    -- The model and dimension of the row's vector (in memory_vectors); both NULL without one.
    embedding_model  TEXT,
    embedding_dim    INTEGER CHECK (embedding_dim > 0),
    access_count     INTEGER NOT NULL DEFAULT 0,
    last_access_time INTEGER,
    version          INTEGER NOT NULL DEFAULT 1,
    request_id       TEXT,
    -- JSON array of strings, mirrored into memory_tags for filtering.
    tags             TEXT NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
    -- JSON object.
    metadata         TEXT NOT NULL DEFAULT '{}' CHECK (json_type(metadata) = 'object'),
    summary          TEXT NOT NULL DEFAULT '',
    content          TEXT NOT NULL CHECK (content <> '')
) STRICT;

-- Idempotent create: a retry with the same request_id finds the first result.
CREATE UNIQUE INDEX memories_request_id ON memories (namespace, owner, request_id) WHERE request_id IS NOT NULL;
-- Keyset pagination in both orders (SQLite walks an index either way).
CREATE INDEX memories_ns_create_time ON memories (namespace, create_time, id);
CREATE INDEX memories_ns_importance ON memories (namespace, importance, id);
CREATE INDEX memories_owner ON memories (owner);
-- Also serves the ON DELETE SET NULL of a deleted parent.
CREATE INDEX memories_parent ON memories (parent_id);
CREATE INDEX memories_expire_time ON memories (expire_time) WHERE expire_time IS NOT NULL;

-- Vectors: little-endian f32, memories.embedding_dim of them. Kept out of `memories` so that
-- scans and filters never page through them.
CREATE TABLE memory_vectors (
    memory    INTEGER PRIMARY KEY REFERENCES memories (seq) ON DELETE CASCADE,
    embedding BLOB NOT NULL
) STRICT;

CREATE TRIGGER memory_vectors_length_insert BEFORE INSERT ON memory_vectors
WHEN length(new.embedding) IS NOT (SELECT 4 * embedding_dim FROM memories WHERE seq = new.memory)
BEGIN
    SELECT RAISE(ABORT, 'memory_vectors.embedding does not match memories.embedding_dim');
END;

CREATE TRIGGER memory_vectors_length_update BEFORE UPDATE ON memory_vectors
WHEN length(new.embedding) IS NOT (SELECT 4 * embedding_dim FROM memories WHERE seq = new.memory)
BEGIN
    SELECT RAISE(ABORT, 'memory_vectors.embedding does not match memories.embedding_dim');
END;

-- One row per (namespace, tag, memory): tag filters are index lookups within the namespace
-- instead of JSON scans. (A memory never changes namespace.)
CREATE TABLE memory_tags (
    namespace TEXT NOT NULL,
    tag       TEXT NOT NULL,
    memory    INTEGER NOT NULL REFERENCES memories (seq) ON DELETE CASCADE,
    PRIMARY KEY (namespace, tag, memory)
) STRICT, WITHOUT ROWID;
CREATE INDEX memory_tags_memory ON memory_tags (memory);

CREATE TRIGGER memories_tags_insert AFTER INSERT ON memories
BEGIN
    INSERT OR IGNORE INTO memory_tags (namespace, tag, memory)
    SELECT new.namespace, value, new.seq FROM json_each(new.tags);
END;

CREATE TRIGGER memories_tags_update AFTER UPDATE OF tags ON memories
BEGIN
    DELETE FROM memory_tags WHERE memory = old.seq;
    INSERT OR IGNORE INTO memory_tags (namespace, tag, memory)
    SELECT new.namespace, value, new.seq FROM json_each(new.tags);
END;

CREATE TABLE memory_grants (
    memory      INTEGER NOT NULL REFERENCES memories (seq) ON DELETE CASCADE,
    agent_id    TEXT NOT NULL,
    -- 1 read, 2 write
    permission  INTEGER NOT NULL CHECK (permission IN (1, 2)),
    expire_time INTEGER,
    create_time INTEGER NOT NULL,
    PRIMARY KEY (memory, agent_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX memory_grants_agent ON memory_grants (agent_id, memory);

-- The keyword-search document: content, summary and tags, stemmed (Porter) and ranked with
-- bm25(). Contentless: the text lives in `memories` only; the triggers keep the index in step
-- inside the writing transaction.
CREATE VIRTUAL TABLE memories_fts USING fts5 (
    content,
    summary,
    tags,
    content = '',
    contentless_delete = 1,
    tokenize = 'porter unicode61 remove_diacritics 0'
);

CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories
BEGIN
    INSERT INTO memories_fts (rowid, content, summary, tags)
    VALUES (new.seq, new.content, new.summary, (SELECT group_concat(value, ' ') FROM json_each(new.tags)));
END;

CREATE TRIGGER memories_fts_update AFTER UPDATE OF content, summary, tags ON memories
BEGIN
    DELETE FROM memories_fts WHERE rowid = old.seq;
    INSERT INTO memories_fts (rowid, content, summary, tags)
    VALUES (new.seq, new.content, new.summary, (SELECT group_concat(value, ' ') FROM json_each(new.tags)));
END;

CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories
BEGIN
    DELETE FROM memories_fts WHERE rowid = old.seq;
END;
