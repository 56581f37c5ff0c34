-- The embedded store (SQLite). Conventions shared by every table:
--   * times are INTEGER microseconds since the Unix epoch (UTC), written by the server;
--   * UUIDs are 16-byte BLOBs; JSON documents and string lists are TEXT holding JSON;
--   * enum codes are the same small integers as in the PostgreSQL schema.
-- The connection turns foreign keys on and uses WAL; one process owns the file.

-- Named server secrets (the page-token key, ...), created on first use.
CREATE TABLE tmws_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;

-- Identity: agents, their API keys, and the audit log (see migrations/postgres/0004_identity.sql).
CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    namespace    TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    -- 1 admin, 2 agent, 3 readonly
    role         INTEGER NOT NULL CHECK (role BETWEEN 1 AND 3),
    -- 1 active, 2 suspended
    status       INTEGER NOT NULL DEFAULT 1 CHECK (status IN (1, 2)),
    create_time  INTEGER NOT NULL,
    update_time  INTEGER NOT NULL,
    version      INTEGER NOT NULL DEFAULT 1,
    created_by   TEXT,
    request_id   TEXT
) STRICT;
CREATE INDEX agents_namespace ON agents (namespace, id);
-- Idempotent CreateAgent: a retry by the same caller with the same request_id finds the first
-- result. (SQLite's NULLs are distinct in unique indexes, like PostgreSQL's.)
CREATE UNIQUE INDEX agents_request_id ON agents (coalesce(created_by, ''), request_id) WHERE request_id IS NOT NULL;

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    secret_hash  BLOB NOT NULL CHECK (length(secret_hash) = 32),
    display_name TEXT NOT NULL DEFAULT '',
    -- JSON array of scopes; empty: every scope the agent's role allows.
    scopes       TEXT NOT NULL DEFAULT '[]',
    create_time  INTEGER NOT NULL,
    expire_time  INTEGER,
    revoke_time  INTEGER,
    created_by   TEXT
) STRICT;
CREATE INDEX api_keys_agent ON api_keys (agent_id, create_time DESC, id DESC);

CREATE TABLE audit_events (
    id          BLOB PRIMARY KEY,
    time        INTEGER NOT NULL,
    agent_id    TEXT,
    namespace   TEXT,
    method      TEXT NOT NULL,
    resource_id TEXT,
    code        TEXT NOT NULL,
    peer        TEXT,
    request_id  TEXT,
    detail      TEXT
) STRICT;
CREATE INDEX audit_events_time ON audit_events (time DESC, id DESC);
CREATE INDEX audit_events_agent ON audit_events (agent_id, time DESC, id DESC);
CREATE INDEX audit_events_namespace ON audit_events (namespace, time DESC, id DESC);
