-- Workflows (immutable versions), runs, tasks (one per step of a run, or standalone), attempts
-- and the ordered event log of each run.
--
-- Postgres is the only source of truth and the coordinator: replicas lease tasks with
-- `FOR UPDATE SKIP LOCKED`, and wake each other with NOTIFY on `tmws_queue` (payload
-- "<namespace>/<queue>") and `tmws_run` (payload run id).

CREATE TABLE workflows (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    name        text NOT NULL,
    version     integer NOT NULL CHECK (version > 0),
    description text NOT NULL DEFAULT '',
    definition  jsonb NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by  text NOT NULL,
    request_id  text,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    delete_time timestamptz,
    UNIQUE (namespace, name, version)
);
CREATE UNIQUE INDEX workflows_request_id ON workflows (namespace, created_by, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX workflows_ns_name ON workflows (namespace, name, version DESC);

CREATE TABLE runs (
    id               uuid PRIMARY KEY,
    namespace        text NOT NULL,
    workflow_id      uuid NOT NULL REFERENCES workflows (id),
    workflow_name    text NOT NULL,
    workflow_version integer NOT NULL,
    input            jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           smallint NOT NULL,
    output           jsonb,
    error            text NOT NULL DEFAULT '',
    created_by       text NOT NULL,
    request_id       text,
    create_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    start_time       timestamptz,
    end_time         timestamptz,
    deadline         timestamptz,
    last_sequence    bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX runs_request_id ON runs (namespace, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX runs_ns_create_time ON runs (namespace, create_time DESC, id DESC);
CREATE INDEX runs_workflow ON runs (workflow_id, create_time DESC);
CREATE INDEX runs_deadline ON runs (deadline) WHERE status IN (1, 2) AND deadline IS NOT NULL;

CREATE TABLE tasks (
    id                uuid PRIMARY KEY,
    namespace         text NOT NULL,
    run_id            uuid REFERENCES runs (id) ON DELETE CASCADE,
    step_id           text,
    kind              smallint NOT NULL,
    title             text NOT NULL DEFAULT '',
    description       text NOT NULL DEFAULT '',
    queue             text NOT NULL DEFAULT '',
    priority          smallint NOT NULL DEFAULT 2,
    depends_on        uuid[] NOT NULL DEFAULT '{}',
    condition         smallint NOT NULL DEFAULT 1,
    config            jsonb NOT NULL DEFAULT '{}'::jsonb,
    status            smallint NOT NULL,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    initial_backoff_ms bigint NOT NULL,
    max_backoff_ms    bigint NOT NULL,
    backoff_multiplier double precision NOT NULL,
    attempt_timeout_ms bigint,
    input             jsonb NOT NULL DEFAULT '{}'::jsonb,
    output            jsonb,
    error             text NOT NULL DEFAULT '',
    progress          jsonb,
    worker_id         text NOT NULL DEFAULT '',
    lease_token       uuid,
    lease_duration_ms bigint,
    lease_expire_time timestamptz,
    attempt_deadline  timestamptz,
    available_time    timestamptz NOT NULL DEFAULT clock_timestamp(),
    due_time          timestamptz,
    created_by        text NOT NULL,
    request_id        text,
    create_time       timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time       timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- The claim path: queued work of one queue by priority, then age.
CREATE INDEX tasks_claim ON tasks (namespace, queue, priority DESC, available_time, id) WHERE status = 2 AND kind = 1;
-- Server-side steps (DELAY, MEMORY_WRITE, NOOP) waiting to be executed by the engine.
CREATE INDEX tasks_engine ON tasks (available_time) WHERE status = 2 AND kind <> 1;
CREATE INDEX tasks_leases ON tasks (lease_expire_time) WHERE status = 3;
CREATE INDEX tasks_run ON tasks (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX tasks_depends_on ON tasks USING gin (depends_on);
CREATE INDEX tasks_ns_create_time ON tasks (namespace, create_time DESC, id DESC);
CREATE UNIQUE INDEX tasks_request_id ON tasks (namespace, created_by, request_id) WHERE request_id IS NOT NULL;

CREATE TABLE task_attempts (
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    worker_id  text NOT NULL,
    start_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time   timestamptz,
    status     smallint NOT NULL,
    error      text NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE run_events (
    run_id   uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    sequence bigint NOT NULL,
    time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    payload  jsonb NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
