-- Workflows (immutable versions), runs, tasks (one per step of a run, or standalone), attempts
-- and the ordered event log of each run: the model of migrations/postgres/0003_workflows.sql
-- and 0005_run_trace.sql in the embedded store's conventions (see 0001_identity.sql).
--
-- One process owns the file and writes through one connection, so transactions are serialised
-- and need no row locks; wake-ups (PostgreSQL's NOTIFY on tmws_queue / tmws_run) are sent in
-- the process after each commit. The partial indexes below keep the engine's polls cheap: each
-- reads only the rows it may act on (queued work, live leases, live deadlines).

CREATE TABLE workflows (
    id          BLOB PRIMARY KEY,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version > 0),
    description TEXT NOT NULL DEFAULT '',
    -- JSON: the steps (a DAG), the default retry policy and the run timeout.
    definition  TEXT NOT NULL,
    -- JSON object of string labels.
    labels      TEXT NOT NULL DEFAULT '{}',
    created_by  TEXT NOT NULL,
    request_id  TEXT,
    create_time INTEGER NOT NULL,
    -- Deleting hides a version; runs keep referring to it.
    delete_time INTEGER,
    -- Also the lookup of a name's versions, latest first.
    UNIQUE (namespace, name, version)
) STRICT;
-- Idempotent CreateWorkflow: a retry by the same caller with the same request id finds the first.
CREATE UNIQUE INDEX workflows_request_id ON workflows (namespace, created_by, request_id) WHERE request_id IS NOT NULL;
-- ListWorkflows pages newest first.
CREATE INDEX workflows_ns_create_time ON workflows (namespace, create_time DESC, id DESC);

CREATE TABLE runs (
    id               BLOB PRIMARY KEY,
    namespace        TEXT NOT NULL,
    workflow_id      BLOB NOT NULL REFERENCES workflows (id),
    workflow_name    TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    input            TEXT NOT NULL DEFAULT '{}',
    -- 1 pending, 2 running, 3 succeeded, 4 failed, 5 cancelled, 6 timed out
    status           INTEGER NOT NULL CHECK (status BETWEEN 1 AND 6),
    output           TEXT,
    error            TEXT NOT NULL DEFAULT '',
    created_by       TEXT NOT NULL,
    request_id       TEXT,
    create_time      INTEGER NOT NULL,
    start_time       INTEGER,
    end_time         INTEGER,
    deadline         INTEGER,
    -- The sequence of the run's latest event (run_events).
    last_sequence    INTEGER NOT NULL DEFAULT 0,
    -- The W3C traceparent of the call that started the run, so the engine's background work on
    -- the run (timers, server-side steps) can link its spans to that trace.
    trace_parent     TEXT
) STRICT;
-- Idempotent StartRun: one run per request id in a namespace.
CREATE UNIQUE INDEX runs_request_id ON runs (namespace, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX runs_ns_create_time ON runs (namespace, create_time DESC, id DESC);
CREATE INDEX runs_workflow ON runs (workflow_id, create_time DESC);
-- Run timeouts: only unfinished runs with a deadline, soonest first.
CREATE INDEX runs_deadline ON runs (deadline) WHERE status IN (1, 2) AND deadline IS NOT NULL;

CREATE TABLE tasks (
    id                 BLOB PRIMARY KEY,
    namespace          TEXT NOT NULL,
    -- NULL: a standalone task (CreateTask).
    run_id             BLOB REFERENCES runs (id) ON DELETE CASCADE,
    step_id            TEXT,
    -- 1 task (workers), 2 delay, 3 memory write, 4 noop (the last three run in the engine)
    kind               INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 4),
    title              TEXT NOT NULL DEFAULT '',
    description        TEXT NOT NULL DEFAULT '',
    queue              TEXT NOT NULL DEFAULT '',
    -- 1 low, 2 normal, 3 high, 4 critical
    priority           INTEGER NOT NULL DEFAULT 2 CHECK (priority BETWEEN 1 AND 4),
    -- JSON array of the ids of the tasks this one waits for, in the order given.
    depends_on         TEXT NOT NULL DEFAULT '[]',
    -- 1 all succeeded, 2 any failed, 3 always
    condition          INTEGER NOT NULL DEFAULT 1 CHECK (condition BETWEEN 1 AND 3),
    config             TEXT NOT NULL DEFAULT '{}',
    -- 1 blocked, 2 queued, 3 leased, 4 succeeded, 5 failed, 6 cancelled, 7 skipped
    status             INTEGER NOT NULL CHECK (status BETWEEN 1 AND 7),
    attempt            INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL,
    initial_backoff_ms INTEGER NOT NULL,
    max_backoff_ms     INTEGER NOT NULL,
    backoff_multiplier REAL NOT NULL,
    attempt_timeout_ms INTEGER,
    input              TEXT NOT NULL DEFAULT '{}',
    output             TEXT,
    error              TEXT NOT NULL DEFAULT '',
    progress           TEXT,
    worker_id          TEXT NOT NULL DEFAULT '',
    lease_token        BLOB,
    lease_duration_ms  INTEGER,
    lease_expire_time  INTEGER,
    attempt_deadline   INTEGER,
    -- When a queued task may be handed out (retry backoff, DELAY timers).
    available_time     INTEGER NOT NULL,
    due_time           INTEGER,
    created_by         TEXT NOT NULL,
    request_id         TEXT,
    create_time        INTEGER NOT NULL,
    update_time        INTEGER NOT NULL
) STRICT;
-- The claim path: queued work of one queue by priority, then age. Also the queue-depth gauge.
CREATE INDEX tasks_claim ON tasks (namespace, queue, priority DESC, available_time, id) WHERE status = 2 AND kind = 1;
-- Server-side steps (DELAY, MEMORY_WRITE, NOOP) waiting for the engine, due first.
CREATE INDEX tasks_engine ON tasks (available_time, id) WHERE status = 2 AND kind <> 1;
-- Lease expiry: live leases by expiry, and live attempts by their timeout.
CREATE INDEX tasks_leases ON tasks (lease_expire_time) WHERE status = 3;
CREATE INDEX tasks_attempt_deadlines ON tasks (attempt_deadline) WHERE status = 3 AND attempt_deadline IS NOT NULL;
-- A run's tasks, in creation order.
CREATE INDEX tasks_run ON tasks (run_id, create_time, id) WHERE run_id IS NOT NULL;
CREATE INDEX tasks_ns_create_time ON tasks (namespace, create_time DESC, id DESC);
-- Idempotent CreateTask.
CREATE UNIQUE INDEX tasks_request_id ON tasks (namespace, created_by, request_id) WHERE request_id IS NOT NULL;

-- The dependency edges of standalone tasks, so a finishing task finds the tasks waiting on it
-- (PostgreSQL: a GIN index on tasks.depends_on). A run's tasks need none: the run's tasks are
-- read together whenever one of them finishes.
CREATE TABLE task_dependencies (
    parent_id BLOB NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    child_id  BLOB NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (parent_id, child_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX task_dependencies_child ON task_dependencies (child_id);

CREATE TABLE task_attempts (
    task_id    BLOB NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    end_time   INTEGER,
    -- a task status: 3 leased (running), 4 succeeded, 5 failed, 6 cancelled
    status     INTEGER NOT NULL,
    error      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, attempt)
) STRICT, WITHOUT ROWID;

CREATE TABLE run_events (
    run_id   BLOB NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    time     INTEGER NOT NULL,
    -- JSON: a run status or a task snapshot.
    payload  TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
) STRICT;
