-- Identity: agents, their API keys, and the audit log.
--
-- An agent's id, namespace and role are what every access rule is checked against; the server
-- loads them from this table on every call (never from claims or request fields). API keys are
-- stored as the SHA-256 of their secret part only; the full key is shown once when it is made.

CREATE TABLE agents (
    id           text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    namespace    text NOT NULL CHECK (namespace ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    display_name text NOT NULL DEFAULT '',
    -- 1 admin, 2 agent, 3 readonly
    role         smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
    -- 1 active, 2 suspended
    status       smallint NOT NULL DEFAULT 1 CHECK (status IN (1, 2)),
    create_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    version      bigint NOT NULL DEFAULT 1,
    created_by   text,
    request_id   text
);
CREATE INDEX agents_namespace ON agents (namespace, id);
-- Idempotent CreateAgent: a retry by the same caller with the same request_id finds the first result.
CREATE UNIQUE INDEX agents_request_id ON agents (created_by, request_id) WHERE request_id IS NOT NULL;

CREATE TABLE api_keys (
    -- The visible key id: `tmws_<id>_<secret>`.
    id           text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{8,64}$'),
    agent_id     text NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    display_name text NOT NULL DEFAULT '',
    -- Empty: every scope the agent's role allows.
    scopes       text[] NOT NULL DEFAULT '{}',
    create_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expire_time  timestamptz,
    revoke_time  timestamptz,
    created_by   text
);
CREATE INDEX api_keys_agent ON api_keys (agent_id, create_time DESC, id DESC);

CREATE TABLE audit_events (
    id          uuid PRIMARY KEY,
    time        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- NULL when the caller could not be authenticated.
    agent_id    text,
    namespace   text,
    method      text NOT NULL,
    resource_id text,
    -- The canonical gRPC code name of the outcome (OK, PERMISSION_DENIED, UNAUTHENTICATED, ...).
    code        text NOT NULL,
    peer        text,
    request_id  text,
    detail      text
);
CREATE INDEX audit_events_time ON audit_events (time DESC, id DESC);
CREATE INDEX audit_events_agent ON audit_events (agent_id, time DESC, id DESC);
CREATE INDEX audit_events_namespace ON audit_events (namespace, time DESC, id DESC);
