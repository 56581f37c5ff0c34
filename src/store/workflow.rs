//! Workflows, runs and the leased task queue in PostgreSQL.
//!
//! Locking discipline (deadlock-free by construction):
//! - a transition of a task (claim, heartbeat, complete, fail, lease expiry, engine step) locks
//!   the task row first, then its run row (`FOR UPDATE`);
//! - while holding a run row, a transaction locks only BLOCKED tasks of that run (to unblock or
//!   skip them), which no other transaction locks without holding the run row;
//! - cancelling or timing out a run locks the run row first and then its unfinished tasks with
//!   `SKIP LOCKED`; a task skipped that way is mid-transition in another transaction, which finds
//!   the run finished once it gets the run row and cancels the task itself.
//!
//! Every state change of a run's task appends to `run_events` (sequence allocated under the run
//! lock) and notifies `tmws_run`; newly queued worker tasks notify `tmws_queue`. A transaction
//! keeps the events it appends and writes them in one statement before it commits ([`RunTx`]).

use std::{
    collections::{HashMap, HashSet},
    ops::{Deref, DerefMut},
    sync::LazyLock,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use super::{
    PgStore,
    identity::{AuditEvent, audit_insert_sql, bind_audit, record_audit},
};
use crate::telemetry::metrics::metrics;
use crate::{
    error::{Error, Result},
    workflow::{
        Condition, Definition, EventPayload, LeasedTask, NewTask, ParentState, Priority, RetryPolicy, Run, RunEvent,
        RunStatus, StepKind, StepTask, Task, TaskAttempt, TaskStatus, Workflow, condition_met, decide_blocked,
        delay_ms, finished_run, leaf_steps, step_task,
    },
};

pub const NOTIFY_QUEUE: &str = "tmws_queue";
pub const NOTIFY_RUN: &str = "tmws_run";
/// The `tmws_queue` payload that wakes the engines: a server-side step became due.
pub const ENGINE_WAKE: &str = "#engine";
/// The worker id the engine leases server-side steps with.
pub const ENGINE_WORKER: &str = "tmws-engine";

/// Filters of ListRuns.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunFilter {
    pub workflow_id: Option<Uuid>,
    pub statuses: Vec<RunStatus>,
    pub create_time_after: Option<DateTime<Utc>>,
    pub create_time_before: Option<DateTime<Utc>>,
}

/// Filters of ListTasks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TaskFilter {
    pub queue: Option<String>,
    pub statuses: Vec<TaskStatus>,
    pub run_id: Option<Uuid>,
    pub min_priority: Option<Priority>,
}

/// A server-side step leased to the engine.
pub struct ServerStep {
    pub leased: LeasedTask,
    pub config: Value,
    pub created_by: String,
    pub trace_parent: Option<String>,
}

/// Keyset position: create time (µs) and id, newest first.
pub type PageKey = (i64, Uuid);

/// Why a worker's call on a task was refused.
pub(crate) fn stale(id: Uuid) -> Error {
    Error::FailedPrecondition(format!(
        "task {id}: the lease token is not current (expired, superseded or wrong); the task may have been handed to another worker"
    ))
}

/// Why a worker's call on a task of an ended run was refused.
pub(crate) fn aborted(id: Uuid) -> Error {
    Error::Aborted(format!("task {id} was cancelled; stop working on it"))
}

const TASK_COLUMNS: &str = "t.id, t.namespace, t.run_id, t.step_id, t.kind, t.title, t.description, t.queue, t.priority, \
    t.depends_on, t.condition, t.config, t.status, t.attempt, t.max_attempts, t.initial_backoff_ms, t.max_backoff_ms, \
    t.backoff_multiplier, t.attempt_timeout_ms, t.input, t.output, t.error, t.progress, t.worker_id, t.lease_token, \
    t.lease_duration_ms, t.lease_expire_time, t.attempt_deadline, t.available_time, t.due_time, t.created_by, \
    t.create_time, t.update_time";

/// A task row with the engine-only columns the domain type does not carry.
#[derive(Debug, Clone)]
struct TaskRow {
    task: Task,
    condition: Condition,
    config: Value,
    retry: RetryPolicy,
    lease_token: Option<Uuid>,
    lease_duration_ms: Option<i64>,
    attempt_deadline: Option<DateTime<Utc>>,
    created_by: String,
}

fn enum_err(what: &str, v: i16) -> Error {
    Error::internal(format!("stored {what} {v} is unknown"))
}

fn task_from_row(row: &PgRow) -> Result<TaskRow> {
    let kind: i16 = row.try_get("kind")?;
    let status: i16 = row.try_get("status")?;
    let priority: i16 = row.try_get("priority")?;
    let condition: i16 = row.try_get("condition")?;
    let input: Json<Value> = row.try_get("input")?;
    let output: Option<Json<Value>> = row.try_get("output")?;
    let progress: Option<Json<Value>> = row.try_get("progress")?;
    let config: Json<Value> = row.try_get("config")?;
    Ok(TaskRow {
        task: Task {
            id: row.try_get("id")?,
            namespace: row.try_get("namespace")?,
            run_id: row.try_get("run_id")?,
            step_id: row.try_get("step_id")?,
            kind: StepKind::from_i16(kind).ok_or_else(|| enum_err("kind", kind))?,
            title: row.try_get("title")?,
            description: row.try_get("description")?,
            queue: row.try_get("queue")?,
            priority: Priority::from_i16(priority).ok_or_else(|| enum_err("priority", priority))?,
            depends_on: row.try_get("depends_on")?,
            status: TaskStatus::from_i16(status).ok_or_else(|| enum_err("status", status))?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            input: input.0,
            output: output.map(|o| o.0),
            error: row.try_get("error")?,
            worker_id: row.try_get("worker_id")?,
            lease_expire_time: row.try_get("lease_expire_time")?,
            due_time: row.try_get("due_time")?,
            create_time: row.try_get("create_time")?,
            update_time: row.try_get("update_time")?,
            attempts: Vec::new(),
            progress: progress.map(|p| p.0),
        },
        condition: Condition::from_i16(condition).ok_or_else(|| enum_err("condition", condition))?,
        config: config.0,
        retry: RetryPolicy {
            max_attempts: row.try_get("max_attempts")?,
            initial_backoff_ms: row.try_get("initial_backoff_ms")?,
            max_backoff_ms: row.try_get("max_backoff_ms")?,
            multiplier: row.try_get("backoff_multiplier")?,
        },
        lease_token: row.try_get("lease_token")?,
        lease_duration_ms: row.try_get("lease_duration_ms")?,
        attempt_deadline: row.try_get("attempt_deadline")?,
        created_by: row.try_get("created_by")?,
    })
}

fn workflow_from_row(row: &PgRow) -> Result<Workflow> {
    let definition: Json<Definition> = row.try_get("definition")?;
    let labels: Json<HashMap<String, String>> = row.try_get("labels")?;
    Ok(Workflow {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        description: row.try_get("description")?,
        definition: definition.0,
        labels: labels.0,
        create_time: row.try_get("create_time")?,
    })
}

/// The `runs` columns [`run_from_row`] reads.
const RUN_COLUMNS: [&str; 16] = [
    "id",
    "namespace",
    "workflow_id",
    "workflow_name",
    "workflow_version",
    "input",
    "status",
    "output",
    "error",
    "create_time",
    "start_time",
    "end_time",
    "deadline",
    "request_id",
    "last_sequence",
    "trace_parent",
];

fn run_from_row(row: &PgRow) -> Result<Run> {
    run_from_columns(row, "")
}

/// A run from the [`RUN_COLUMNS`] of `row`, each named with `prefix` before it.
fn run_from_columns(row: &PgRow, prefix: &str) -> Result<Run> {
    let col = |name: &str| format!("{prefix}{name}");
    let status: i16 = row.try_get(col("status").as_str())?;
    let input: Json<Value> = row.try_get(col("input").as_str())?;
    let output: Option<Json<Value>> = row.try_get(col("output").as_str())?;
    Ok(Run {
        id: row.try_get(col("id").as_str())?,
        namespace: row.try_get(col("namespace").as_str())?,
        workflow_id: row.try_get(col("workflow_id").as_str())?,
        workflow_name: row.try_get(col("workflow_name").as_str())?,
        workflow_version: row.try_get(col("workflow_version").as_str())?,
        input: input.0,
        status: RunStatus::from_i16(status).ok_or_else(|| enum_err("run status", status))?,
        tasks: Vec::new(),
        output: output.map(|o| o.0),
        error: row.try_get(col("error").as_str())?,
        create_time: row.try_get(col("create_time").as_str())?,
        start_time: row.try_get(col("start_time").as_str())?,
        end_time: row.try_get(col("end_time").as_str())?,
        deadline: row.try_get(col("deadline").as_str())?,
        request_id: row.try_get(col("request_id").as_str())?,
        last_sequence: row.try_get(col("last_sequence").as_str())?,
        trace_parent: row.try_get(col("trace_parent").as_str())?,
    })
}

/// One `task_attempts` row: attempt, worker_id, start_time, end_time, status, error.
type AttemptRecord = (i32, String, DateTime<Utc>, Option<DateTime<Utc>>, i16, String);

fn attempt_from_record(
    (attempt, worker_id, start_time, end_time, status, error): AttemptRecord,
) -> Result<TaskAttempt> {
    Ok(TaskAttempt {
        attempt,
        worker_id,
        start_time,
        end_time,
        status: TaskStatus::from_i16(status).ok_or_else(|| enum_err("attempt status", status))?,
        error,
    })
}

/// An `attempts` column: the task's attempts as the statement left them, in attempt order. Its
/// SQL is [`attempts_after`]; `array_agg` over no rows is NULL, which is no attempts.
fn attempts_column(row: &PgRow) -> Result<Vec<TaskAttempt>> {
    let records: Option<Vec<AttemptRecord>> = row.try_get("attempts")?;
    records.unwrap_or_default().into_iter().map(attempt_from_record).collect()
}

/// The select-list item `attempts` ([`attempts_column`]) of a statement that writes one attempt
/// of the task `{task}.id` in its data-modifying CTE `{written}` (which returns the attempt
/// columns and `task_id`). A statement does not see its own writes, so the stored rows are read
/// except the written one, which is taken from the CTE's RETURNING instead: the list is what
/// [`load_attempts`] would read after the statement.
fn attempts_after(task: &str, written: &str) -> String {
    format!(
        "(SELECT array_agg((x.attempt, x.worker_id, x.start_time, x.end_time, x.status, x.error) ORDER BY x.attempt) \
           FROM (SELECT a.attempt, a.worker_id, a.start_time, a.end_time, a.status, a.error FROM task_attempts a \
                 WHERE a.task_id = {task}.id \
                   AND NOT EXISTS (SELECT 1 FROM {written} w WHERE w.task_id = a.task_id AND w.attempt = a.attempt) \
                 UNION ALL \
                 SELECT w.attempt, w.worker_id, w.start_time, w.end_time, w.status, w.error FROM {written} w \
                 WHERE w.task_id = {task}.id) x) AS attempts"
    )
}

/// How a worker's claim starts the attempt of a leased task, as LEASED: `{START_ATTEMPT} <VALUES
/// or SELECT of task_id, attempt, worker_id, 3> {START_ATTEMPT_CONFLICT}`.
const START_ATTEMPT: &str = "INSERT INTO task_attempts (task_id, attempt, worker_id, status)";
/// The end of [`START_ATTEMPT`]: a row already there for that attempt is taken over.
const START_ATTEMPT_CONFLICT: &str =
    "ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = EXCLUDED.worker_id, start_time = clock_timestamp()";

/// What the data-modifying CTE named in [`attempts_after`] returns.
const ATTEMPT_RETURNING: &str = "RETURNING task_id, attempt, worker_id, start_time, end_time, status, error";

async fn load_attempts(conn: &mut PgConnection, tasks: &mut [Task]) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let rows = sqlx::query(
        "SELECT task_id, attempt, worker_id, start_time, end_time, status, error FROM task_attempts \
         WHERE task_id = ANY($1) ORDER BY task_id, attempt",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_task: HashMap<Uuid, Vec<TaskAttempt>> = HashMap::new();
    for row in rows {
        let record = (
            row.try_get("attempt")?,
            row.try_get("worker_id")?,
            row.try_get("start_time")?,
            row.try_get("end_time")?,
            row.try_get("status")?,
            row.try_get("error")?,
        );
        by_task.entry(row.try_get("task_id")?).or_default().push(attempt_from_record(record)?);
    }
    for t in tasks.iter_mut() {
        t.attempts = by_task.remove(&t.id).unwrap_or_default();
    }
    Ok(())
}

async fn lock_run(conn: &mut PgConnection, id: Uuid) -> Result<Run> {
    let row = sqlx::query("SELECT * FROM runs WHERE id = $1 FOR UPDATE").bind(id).fetch_one(&mut *conn).await?;
    run_from_row(&row)
}

/// Locks a task (`FOR UPDATE`), then its run when it has one, in one statement: the task row is
/// locked first (the subquery `t` is the outer side of the lateral join), then its run's, the
/// order every transition takes (module docs).
async fn lock_task_and_run(conn: &mut PgConnection, ns: &str, id: Uuid) -> Result<Option<(TaskRow, Option<Run>)>> {
    static LOCK: LazyLock<String> = LazyLock::new(|| {
        let run_columns: Vec<String> = RUN_COLUMNS.iter().map(|c| format!("r.{c} AS r_{c}")).collect();
        format!(
            "SELECT {TASK_COLUMNS}, {run_columns} \
             FROM (SELECT * FROM tasks WHERE id = $1 AND namespace = $2 FOR UPDATE) t \
             LEFT JOIN LATERAL (SELECT * FROM runs WHERE runs.id = t.run_id FOR UPDATE) r ON true",
            run_columns = run_columns.join(", ")
        )
    });
    let Some(row) = sqlx::query(LOCK.as_str()).bind(id).bind(ns).fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let task = task_from_row(&row)?;
    let run = match task.task.run_id {
        Some(run_id) => {
            if row.try_get::<Option<Uuid>, _>("r_id")?.is_none() {
                return Err(Error::internal(format!("the run {run_id} of task {id} is missing")));
            }
            Some(run_from_columns(&row, "r_")?)
        }
        None => None,
    };
    Ok(Some((task, run)))
}

async fn fetch_task(conn: &mut PgConnection, id: Uuid) -> Result<Task> {
    let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let mut task = vec![task_from_row(&row)?.task];
    load_attempts(conn, &mut task).await?;
    task.pop().ok_or_else(|| Error::internal("task vanished"))
}

/// A transaction that may change runs. The events it appends to run logs are kept and written
/// together, in one statement ([`RunTx::flush`]), when it commits (and before anything in it
/// reads a run's `last_sequence`): a transition pays one round trip for its events however many
/// it appends. Dropping it rolls back, events included.
struct RunTx {
    tx: sqlx::Transaction<'static, Postgres>,
    /// (run, payload) in the order appended.
    events: Vec<(Uuid, Value)>,
}

impl Deref for RunTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for RunTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl RunTx {
    async fn begin(store: &PgStore) -> Result<Self> {
        Ok(Self { tx: store.pool().begin().await?, events: Vec::new() })
    }

    /// Appends an event to the log of `run_id`; the caller holds the run row (or created it).
    fn append(&mut self, run_id: Uuid, payload: &EventPayload) -> Result<()> {
        let payload = serde_json::to_value(payload).map_err(|e| Error::internal(format!("run event: {e}")))?;
        self.events.push((run_id, payload));
        Ok(())
    }

    /// Appends the task's current state (without its attempts) to its run's log, when it has a
    /// run.
    fn append_task(&mut self, task: &Task) -> Result<()> {
        match task.run_id {
            Some(run_id) => {
                let mut snapshot = task.clone();
                snapshot.attempts.clear();
                self.append(run_id, &EventPayload::Task(Box::new(snapshot)))
            }
            None => Ok(()),
        }
    }

    /// Writes the appended events in one statement: each run's sequence numbers are allocated
    /// on its row (`last_sequence`, in the order appended), the events inserted, and `tmws_run`
    /// notified once per run (delivered at commit). Every run is held by this transaction, so
    /// nothing else allocates its numbers meanwhile.
    async fn flush(&mut self) -> Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        let (runs, payloads): (Vec<Uuid>, Vec<Value>) = std::mem::take(&mut self.events).into_iter().unzip();
        let distinct = runs.iter().collect::<HashSet<_>>().len() as i64;
        let row = sqlx::query(
            "WITH ev AS (SELECT e.run_id, e.payload, e.ord FROM unnest($1::uuid[], $2::jsonb[]) WITH ORDINALITY \
               AS e(run_id, payload, ord)), \
             n AS (SELECT run_id, count(*) AS n FROM ev GROUP BY run_id), \
             s AS (UPDATE runs r SET last_sequence = r.last_sequence + n.n FROM n WHERE r.id = n.run_id \
               RETURNING r.id, r.last_sequence - n.n AS base), \
             w AS (INSERT INTO run_events (run_id, sequence, payload) \
               SELECT ev.run_id, s.base + row_number() OVER (PARTITION BY ev.run_id ORDER BY ev.ord), ev.payload \
               FROM ev JOIN s ON s.id = ev.run_id RETURNING 1), \
             notified AS (SELECT pg_notify($3, s.id::text) FROM s) \
             SELECT (SELECT count(*) FROM w) AS written, (SELECT count(*) FROM notified) AS runs",
        )
        .bind(&runs)
        .bind(&payloads)
        .bind(NOTIFY_RUN)
        .fetch_one(&mut *self.tx)
        .await?;
        let (written, found): (i64, i64) = (row.try_get("written")?, row.try_get("runs")?);
        if written != runs.len() as i64 || found != distinct {
            return Err(Error::internal("a run vanished while appending to its log"));
        }
        Ok(())
    }

    async fn commit(mut self) -> Result<()> {
        self.flush().await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Reads the task (attempts included) and appends it to its run's log.
async fn task_event(tx: &mut RunTx, task_id: Uuid) -> Result<Task> {
    let task = fetch_task(tx, task_id).await?;
    tx.append_task(&task)?;
    Ok(task)
}

/// Wakes every replica's engine (a server-side step is due now).
async fn wake_engines(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(NOTIFY_QUEUE).bind(ENGINE_WAKE).execute(&mut *conn).await?;
    Ok(())
}

async fn notify_queue(conn: &mut PgConnection, ns: &str, queue: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_QUEUE)
        .bind(format!("{ns}/{queue}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Makes a ready task claimable: QUEUED, available now (or after its DELAY), in one statement
/// that also wakes its workers (a worker step) or the engines (a server-side step due now).
/// Appends the task to its run's log and returns it as stored.
async fn queue_task(tx: &mut RunTx, row: &TaskRow, input: &Value) -> Result<TaskRow> {
    static QUEUE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH t AS (UPDATE tasks t SET status = 2, input = $2, \
               available_time = clock_timestamp() + make_interval(secs => $3::float8 / 1000), \
               update_time = clock_timestamp() WHERE t.id = $1 RETURNING {TASK_COLUMNS}), \
             n AS (SELECT pg_notify($4, $5) WHERE $5::text IS NOT NULL) \
             SELECT t.*, (SELECT count(*) FROM n) AS notified FROM t"
        )
    });
    let wait_ms = if row.task.kind == StepKind::Delay { delay_ms(&row.config) } else { 0 };
    let wake = if row.task.kind == StepKind::Task {
        Some(format!("{}/{}", row.task.namespace, row.task.queue))
    } else if wait_ms == 0 {
        Some(ENGINE_WAKE.to_string())
    } else {
        None
    };
    let stored = sqlx::query(QUEUE.as_str())
        .bind(row.task.id)
        .bind(Json(input))
        .bind(wait_ms as f64)
        .bind(NOTIFY_QUEUE)
        .bind(wake)
        .fetch_one(&mut **tx)
        .await?;
    let queued = task_from_row(&stored)?;
    tx.append_task(&queued.task)?;
    Ok(queued)
}

/// Skips a BLOCKED task whose condition can no longer be met (the caller holds its run, or the
/// task for a standalone one); appends it to its run's log and returns it as stored.
async fn skip_task(tx: &mut RunTx, id: Uuid, reason: &str) -> Result<TaskRow> {
    static SKIP: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE tasks t SET status = 7, error = $2, update_time = clock_timestamp() WHERE t.id = $1 \
             RETURNING {TASK_COLUMNS}"
        )
    });
    let stored = sqlx::query(SKIP.as_str()).bind(id).bind(reason).fetch_one(&mut **tx).await?;
    let skipped = task_from_row(&stored)?;
    tx.append_task(&skipped.task)?;
    Ok(skipped)
}

/// After task `finished` of `run` became terminal (the caller holds the run row): queues or
/// skips its BLOCKED children whose parents have all ended, then the children of the skipped ones,
/// and so on; ends the run when no task of it is left open. Each pass is one statement that reads
/// only the children of the tasks that just ended (with their parents' statuses and outputs) and
/// whether any other task of the run is open (`tasks_run_open`), so a completion costs what its
/// children cost, not what the run's other steps do; the run's tasks are read in full once, when
/// it ends, for its output. Nothing else changes a BLOCKED task of a locked run.
async fn advance_run(tx: &mut RunTx, run: &Run, finished: Uuid) -> Result<()> {
    /// `$1` the run, `$2` the tasks that just ended. One row per BLOCKED child (or one row of
    /// NULLs when there is none), each with `others_open`: whether a task of the run other than
    /// these children is BLOCKED, QUEUED or LEASED.
    static CHILDREN: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT o.others_open, c.* FROM \
               (SELECT EXISTS (SELECT 1 FROM tasks x WHERE x.run_id = $1 AND x.status IN (1, 2, 3) \
                  AND NOT (x.status = 1 AND x.depends_on && $2::uuid[])) AS others_open) o \
             LEFT JOIN LATERAL (SELECT {TASK_COLUMNS}, \
                 (SELECT jsonb_agg(jsonb_build_object('id', p.id, 'status', p.status, 'step', p.step_id, \
                    'output', p.output)) FROM tasks p WHERE p.id = ANY (t.depends_on)) AS parents \
               FROM tasks t WHERE t.run_id = $1 AND t.status = 1 AND t.depends_on && $2::uuid[] ORDER BY t.id) c ON true"
        )
    });
    #[derive(serde::Deserialize)]
    struct Parent {
        id: Uuid,
        status: i16,
        step: Option<String>,
        output: Option<Value>,
    }
    let mut ended = vec![finished];
    let open = loop {
        let rows = sqlx::query(CHILDREN.as_str()).bind(run.id).bind(&ended).fetch_all(&mut **tx).await?;
        let mut open = false;
        let mut children = Vec::with_capacity(rows.len());
        for row in &rows {
            open |= row.try_get::<bool, _>("others_open")?;
            if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
                let parents: Json<Vec<Parent>> = row.try_get("parents")?;
                children.push((task_from_row(row)?, parents.0));
            }
        }
        ended.clear();
        for (child, parents) in children {
            let parents = parents
                .into_iter()
                .map(|p| {
                    let status = TaskStatus::from_i16(p.status).ok_or_else(|| enum_err("status", p.status))?;
                    Ok(ParentState { id: p.id, step_id: p.step, status, output: p.output })
                })
                .collect::<Result<Vec<_>>>()?;
            match decide_blocked(child.condition, &parents, &run.input) {
                None => open = true,
                Some(Some(input)) => {
                    queue_task(tx, &child, &input).await?;
                    open = true;
                }
                Some(None) => {
                    skip_task(tx, child.task.id, "condition not met").await?;
                    ended.push(child.task.id);
                }
            }
        }
        if ended.is_empty() {
            break open;
        }
    };
    if open {
        return Ok(());
    }
    let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = $1 ORDER BY t.id"))
        .bind(run.id)
        .fetch_all(&mut **tx)
        .await?;
    let tasks: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
    let all: Vec<&Task> = tasks.iter().map(|t| &t.task).collect();
    if let Some((outcome, output, error)) = finished_run(&all) {
        sqlx::query("UPDATE runs SET status = $2, output = $3, error = $4, end_time = clock_timestamp() WHERE id = $1")
            .bind(run.id)
            .bind(outcome.as_i16())
            .bind(Json(output))
            .bind(error)
            .execute(&mut **tx)
            .await?;
        tx.append(run.id, &EventPayload::RunStatus(outcome))?;
        metrics().run_finished(&format!("{outcome:?}").to_ascii_uppercase());
    }
    Ok(())
}

/// Unblocks or skips standalone tasks waiting on `parent` (now terminal).
async fn advance_dependents(tx: &mut RunTx, parent: Uuid) -> Result<()> {
    let mut frontier = vec![parent];
    while let Some(p) = frontier.pop() {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.depends_on @> ARRAY[$1]::uuid[] AND t.run_id IS NULL AND t.status = 1 \
             ORDER BY t.id FOR UPDATE"
        ))
        .bind(p)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            let child = task_from_row(row)?;
            let parents = sqlx::query("SELECT id, status, output FROM tasks WHERE id = ANY($1)")
                .bind(&child.task.depends_on)
                .fetch_all(&mut **tx)
                .await?;
            let mut statuses = Vec::new();
            let mut outputs = serde_json::Map::new();
            for r in &parents {
                let s: i16 = r.try_get("status")?;
                statuses.push(TaskStatus::from_i16(s).ok_or_else(|| enum_err("status", s))?);
                let id: Uuid = r.try_get("id")?;
                let out: Option<Json<Value>> = r.try_get("output")?;
                outputs.insert(id.to_string(), out.map(|o| o.0).unwrap_or(Value::Null));
            }
            match condition_met(child.condition, &statuses) {
                None => {}
                Some(true) => {
                    let mut input = child.task.input.clone();
                    if let Value::Object(map) = &mut input {
                        map.insert("parents".into(), Value::Object(outputs));
                    }
                    queue_task(tx, &child, &input).await?;
                }
                Some(false) => {
                    skip_task(tx, child.task.id, "a dependency did not succeed").await?;
                    frontier.push(child.task.id);
                }
            }
        }
    }
    Ok(())
}

/// The statement that ends attempt `$2` of task `$1`, records the outcome on the task and writes
/// the call's audit row (parameters from `$audit`, see [`audit_insert_sql`]): `attempt_set` and
/// `task_set` are the outcome's assignments (their own parameters from `$3`), `end_time` and
/// `update_time` are set here. It returns the task as stored afterwards ([`TASK_COLUMNS`] and
/// [`attempts_column`]) and `has_dependents`: whether a BLOCKED standalone task depends on it
/// (see [`finish_attempt`] for why that read is exact).
fn end_attempt_sql(attempt_set: &str, task_set: &str, audit: usize) -> String {
    format!(
        "WITH ended AS (UPDATE task_attempts SET {attempt_set}, end_time = clock_timestamp() \
           WHERE task_id = $1 AND attempt = $2 {ATTEMPT_RETURNING}), \
         t AS (UPDATE tasks t SET {task_set}, update_time = clock_timestamp() WHERE t.id = $1 RETURNING {TASK_COLUMNS}), \
         audited AS ({audit_insert}) \
         SELECT t.*, {attempts}, \
           t.run_id IS NULL AND EXISTS (SELECT 1 FROM tasks c WHERE c.depends_on @> ARRAY[t.id] AND c.run_id IS NULL \
             AND c.status = 1) AS has_dependents \
         FROM t",
        audit_insert = audit_insert_sql(audit, None),
        attempts = attempts_after("t", "ended"),
    )
}

/// Ends the current attempt of a locked task and applies the outcome (retry, fail, succeed),
/// then advances the run or the standalone dependents. The caller holds the task row and, for
/// a run's task, the run row. `audit` is the call's audit row ([`call_event`]), written with the
/// change. Returns the task as stored afterwards, attempts included (nothing later in the
/// transaction changes it: advancing touches only BLOCKED tasks and the run).
async fn finish_attempt(
    tx: &mut RunTx,
    row: &TaskRow,
    run: Option<&Run>,
    outcome: Result<Value, (String, bool)>,
    audit: Option<&AuditEvent>,
) -> Result<Task> {
    static SUCCEED: LazyLock<String> = LazyLock::new(|| {
        end_attempt_sql("status = 4", "status = 4, output = $3, error = '', lease_expire_time = NULL", 4)
    });
    static RETRY: LazyLock<String> = LazyLock::new(|| {
        end_attempt_sql(
            "status = 5, error = $3",
            "status = 2, error = $3, lease_token = NULL, lease_expire_time = NULL, attempt_deadline = NULL, \
             available_time = clock_timestamp() + make_interval(secs => $4::float8 / 1000)",
            5,
        )
    });
    static FAIL: LazyLock<String> = LazyLock::new(|| {
        end_attempt_sql("status = 5, error = $3", "status = 5, error = $3, lease_expire_time = NULL", 4)
    });

    let id = row.task.id;
    let retry = matches!(&outcome, Err((_, true)) if row.task.attempt < row.retry.max_attempts);
    let query = match &outcome {
        Ok(output) => sqlx::query(SUCCEED.as_str()).bind(id).bind(row.task.attempt).bind(Json(output)),
        Err((error, _)) if retry => sqlx::query(RETRY.as_str())
            .bind(id)
            .bind(row.task.attempt)
            .bind(error)
            .bind(row.retry.backoff_ms(row.task.attempt + 1) as f64),
        Err((error, _)) => sqlx::query(FAIL.as_str()).bind(id).bind(row.task.attempt).bind(error),
    };
    let stored = bind_audit(query, audit).fetch_one(&mut **tx).await?;
    let mut task = task_from_row(&stored)?.task;
    task.attempts = attempts_column(&stored)?;
    if retry && row.task.kind == StepKind::Task {
        notify_queue(tx, &row.task.namespace, &row.task.queue).await?;
    }
    tx.append_task(&task)?;
    if retry {
        return Ok(task);
    }
    match run {
        Some(run) => advance_run(tx, run, id).await?,
        // The statement read `has_dependents` after this transaction locked the task, so it saw
        // every dependent there can be: CreateTask locks its dependencies FOR SHARE, so one
        // adding a dependent either committed before that lock was granted or waits for this
        // transaction (and then finds the task finished); nothing else makes a standalone task
        // BLOCKED (an import holds finished standalone tasks only). When there is none,
        // `advance_dependents` would find nothing.
        None if stored.try_get::<bool, _>("has_dependents")? => advance_dependents(tx, id).await?,
        None => {}
    }
    Ok(task)
}

/// Cancels a locked, unfinished task whose run has ended (the caller holds both rows).
async fn cancel_straggler(tx: &mut RunTx, row: &TaskRow) -> Result<()> {
    if row.task.status == TaskStatus::Leased {
        sqlx::query(
            "UPDATE task_attempts SET status = 6, end_time = clock_timestamp() WHERE task_id = $1 AND attempt = $2",
        )
        .bind(row.task.id)
        .bind(row.task.attempt)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query("UPDATE tasks SET status = 6, update_time = clock_timestamp() WHERE id = $1")
        .bind(row.task.id)
        .execute(&mut **tx)
        .await?;
    task_event(tx, row.task.id).await.map(|_| ())
}

/// Locks the run of a task (after the task row) when it has one.
async fn lock_run_of(conn: &mut PgConnection, row: &TaskRow) -> Result<Option<Run>> {
    match row.task.run_id {
        Some(run_id) => Ok(Some(lock_run(conn, run_id).await?)),
        None => Ok(None),
    }
}

/// Ends a run early (cancel or timeout): the run row is locked first, then its unfinished tasks
/// are cancelled with SKIP LOCKED (see the module docs).
async fn end_run(tx: &mut RunTx, run: &Run, status: RunStatus, reason: &str) -> Result<()> {
    sqlx::query("UPDATE runs SET status = $2, error = $3, end_time = clock_timestamp() WHERE id = $1")
        .bind(run.id)
        .bind(status.as_i16())
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = $1 AND t.status IN (1, 2, 3) ORDER BY t.id FOR UPDATE SKIP LOCKED"
    ))
    .bind(run.id)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        cancel_straggler(tx, &task_from_row(row)?).await?;
    }
    tx.append(run.id, &EventPayload::RunStatus(status))?;
    metrics().run_finished(match status {
        RunStatus::TimedOut => "TIMED_OUT",
        RunStatus::Cancelled => "CANCELLED",
        other => {
            if other == RunStatus::Failed {
                "FAILED"
            } else {
                "SUCCEEDED"
            }
        }
    });
    Ok(())
}

async fn get_run_in(conn: &mut PgConnection, ns: &str, id: Uuid) -> Result<Option<Run>> {
    let Some(row) = sqlx::query("SELECT * FROM runs WHERE id = $1 AND namespace = $2")
        .bind(id)
        .bind(ns)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let mut run = run_from_row(&row)?;
    let rows =
        sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = $1 ORDER BY t.create_time, t.id"))
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    let mut tasks: Vec<Task> = rows.iter().map(|r| task_from_row(r).map(|t| t.task)).collect::<Result<_>>()?;
    load_attempts(conn, &mut tasks).await?;
    run.tasks = tasks;
    Ok(Some(run))
}

/// Storage of workflows, runs and tasks.
#[async_trait]
pub trait WorkflowStore: Send + Sync + 'static {
    /// Stores a new version of `name` (version = latest + 1, serialised per name).
    #[allow(clippy::too_many_arguments)]
    async fn create_workflow(
        &self,
        ns: &str,
        name: &str,
        description: &str,
        definition: &Definition,
        labels: &HashMap<String, String>,
        created_by: &str,
        request_id: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Workflow>;
    async fn get_workflow(&self, ns: &str, id: Uuid) -> Result<Option<Workflow>>;
    /// `version` None = latest.
    async fn get_workflow_by_name(&self, ns: &str, name: &str, version: Option<i32>) -> Result<Option<Workflow>>;
    async fn list_workflows(
        &self,
        ns: &str,
        name: Option<&str>,
        latest_only: bool,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Workflow>>;
    async fn delete_workflow(&self, ns: &str, id: Uuid, audit: Option<&AuditEvent>) -> Result<bool>;

    /// Creates the run and one task per step; roots are queued. Same request id, same run.
    #[allow(clippy::too_many_arguments)]
    async fn start_run(
        &self,
        workflow: &Workflow,
        input: &Value,
        default_retry: RetryPolicy,
        timeout_ms: Option<i64>,
        created_by: &str,
        request_id: Option<&str>,
        trace_parent: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Run>;
    async fn get_run(&self, ns: &str, id: Uuid) -> Result<Option<Run>>;
    async fn list_runs(&self, ns: &str, filter: &RunFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Run>>;
    async fn cancel_run(&self, ns: &str, id: Uuid, reason: &str, audit: Option<&AuditEvent>) -> Result<Run>;
    async fn run_events(&self, run_id: Uuid, after_sequence: i64, limit: usize) -> Result<Vec<RunEvent>>;

    async fn create_task(&self, task: &NewTask, audit: Option<&AuditEvent>) -> Result<Task>;
    async fn get_task(&self, ns: &str, id: Uuid) -> Result<Option<Task>>;
    async fn list_tasks(
        &self,
        ns: &str,
        filter: &TaskFilter,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Task>>;

    async fn claim_tasks(
        &self,
        ns: &str,
        queue: &str,
        worker: &str,
        max: usize,
        lease_ms: i64,
        audit: Option<&AuditEvent>,
    ) -> Result<Vec<LeasedTask>>;
    async fn heartbeat(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        lease_ms: Option<i64>,
        progress: Option<&Value>,
        audit: Option<&AuditEvent>,
    ) -> Result<Task>;
    async fn complete_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        output: &Value,
        audit: Option<&AuditEvent>,
    ) -> Result<Task>;
    async fn fail_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        error: &str,
        retryable: bool,
        audit: Option<&AuditEvent>,
    ) -> Result<Task>;

    /// Engine: fails attempts whose lease (or attempt timeout) expired; returns how many.
    async fn expire_leases(&self, limit: usize) -> Result<usize>;
    /// Engine: ends runs past their deadline as TIMED_OUT; returns how many.
    async fn time_out_runs(&self, limit: usize) -> Result<usize>;
    /// Engine: leases due server-side steps (DELAY, NOOP, MEMORY_WRITE) to the engine.
    /// Returns each leased step with its config, the agent that started its run (or created
    /// it), and the run's traceparent.
    async fn lease_server_steps(&self, limit: usize, lease_ms: i64) -> Result<Vec<ServerStep>>;
}

#[async_trait]
impl WorkflowStore for PgStore {
    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "create_workflow"))]
    async fn create_workflow(
        &self,
        ns: &str,
        name: &str,
        description: &str,
        definition: &Definition,
        labels: &HashMap<String, String>,
        created_by: &str,
        request_id: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Workflow> {
        let mut tx = self.pool().begin().await?;
        // Concurrent creates of one name get consecutive versions, never a conflict.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7270))")
            .bind(format!("{ns}/{name}"))
            .execute(&mut *tx)
            .await?;
        if let Some(rid) = request_id {
            let existing =
                sqlx::query("SELECT * FROM workflows WHERE namespace = $1 AND created_by = $2 AND request_id = $3")
                    .bind(ns)
                    .bind(created_by)
                    .bind(rid)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = existing {
                return workflow_from_row(&row);
            }
        }
        let version: i32 = sqlx::query_scalar(
            "SELECT coalesce(max(version), 0) + 1 FROM workflows WHERE namespace = $1 AND name = $2",
        )
        .bind(ns)
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let row = sqlx::query(
            "INSERT INTO workflows (id, namespace, name, version, description, definition, labels, created_by, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(ns)
        .bind(name)
        .bind(version)
        .bind(description)
        .bind(Json(definition))
        .bind(Json(labels))
        .bind(created_by)
        .bind(request_id)
        .fetch_one(&mut *tx)
        .await?;
        let wf = workflow_from_row(&row)?;
        record_call(&mut tx, audit, &[wf.id]).await?;
        tx.commit().await?;
        Ok(wf)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_workflow"))]
    async fn get_workflow(&self, ns: &str, id: Uuid) -> Result<Option<Workflow>> {
        let row = sqlx::query("SELECT * FROM workflows WHERE id = $1 AND namespace = $2 AND delete_time IS NULL")
            .bind(id)
            .bind(ns)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(workflow_from_row).transpose()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_workflow_by_name"))]
    async fn get_workflow_by_name(&self, ns: &str, name: &str, version: Option<i32>) -> Result<Option<Workflow>> {
        let row = sqlx::query(
            "SELECT * FROM workflows WHERE namespace = $1 AND name = $2 AND delete_time IS NULL \
             AND ($3::int IS NULL OR version = $3) ORDER BY version DESC LIMIT 1",
        )
        .bind(ns)
        .bind(name)
        .bind(version)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(workflow_from_row).transpose()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "list_workflows"))]
    async fn list_workflows(
        &self,
        ns: &str,
        name: Option<&str>,
        latest_only: bool,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Workflow>> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT * FROM workflows w WHERE w.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND w.delete_time IS NULL");
        if let Some(name) = name {
            qb.push(" AND w.name = ");
            qb.push_bind(name);
        }
        if latest_only {
            qb.push(
                " AND w.version = (SELECT max(v.version) FROM workflows v WHERE v.namespace = w.namespace \
                 AND v.name = w.name AND v.delete_time IS NULL)",
            );
        }
        push_newest_first_page(&mut qb, "w", after, limit)?;
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(workflow_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "delete_workflow"))]
    async fn delete_workflow(&self, ns: &str, id: Uuid, audit: Option<&AuditEvent>) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        let n = sqlx::query(
            "UPDATE workflows SET delete_time = clock_timestamp() WHERE id = $1 AND namespace = $2 AND delete_time IS NULL",
        )
        .bind(id)
        .bind(ns)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            record_call(&mut tx, audit, &[id]).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "start_run"))]
    async fn start_run(
        &self,
        wf: &Workflow,
        input: &Value,
        default_retry: RetryPolicy,
        timeout_ms: Option<i64>,
        created_by: &str,
        request_id: Option<&str>,
        trace_parent: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Run> {
        let mut tx = RunTx::begin(self).await?;
        let run_id = Uuid::now_v7();
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO runs (id, namespace, workflow_id, workflow_name, workflow_version, input, status, created_by, request_id, \
             start_time, deadline, trace_parent) VALUES ($1, $2, $3, $4, $5, $6, 2, $7, $8, clock_timestamp(), \
             CASE WHEN $9::bigint IS NULL THEN NULL ELSE clock_timestamp() + make_interval(secs => $9::float8 / 1000) END, $10) \
             ON CONFLICT (namespace, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id",
        )
        .bind(run_id)
        .bind(&wf.namespace)
        .bind(wf.id)
        .bind(&wf.name)
        .bind(wf.version)
        .bind(Json(input))
        .bind(created_by)
        .bind(request_id)
        .bind(timeout_ms)
        .bind(trace_parent)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(run_id) = inserted else {
            // A retry: the first run with this request id.
            let existing: Uuid = sqlx::query_scalar("SELECT id FROM runs WHERE namespace = $1 AND request_id = $2")
                .bind(&wf.namespace)
                .bind(request_id)
                .fetch_one(&mut *tx)
                .await?;
            drop(tx);
            let mut conn = self.pool().acquire().await?;
            return get_run_in(&mut conn, &wf.namespace, existing)
                .await?
                .ok_or_else(|| Error::not_found("run", existing.to_string()));
        };
        let steps = &wf.definition.steps;
        let ids: HashMap<&str, Uuid> = steps.iter().map(|s| (s.id.as_str(), Uuid::now_v7())).collect();
        // The run's tasks, with multi-row INSERTs (20 parameters a row; PostgreSQL allows 65,535
        // a statement), returning the roots as stored for the event log.
        let mut roots: HashMap<Uuid, Task> = HashMap::new();
        for chunk in steps.chunks(1000) {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO tasks AS t (id, namespace, run_id, step_id, kind, title, queue, priority, depends_on, condition, \
                 config, status, max_attempts, initial_backoff_ms, max_backoff_ms, backoff_multiplier, attempt_timeout_ms, \
                 input, created_by, available_time) ",
            );
            let tasks: Vec<StepTask> =
                chunk.iter().map(|s| step_task(wf, s, &ids, default_retry, input)).collect::<Result<_>>()?;
            qb.push_values(chunk.iter().zip(tasks), |mut b, (s, t)| {
                b.push_bind(t.id)
                    .push_bind(&wf.namespace)
                    .push_bind(run_id)
                    .push_bind(&s.id)
                    .push_bind(s.kind.as_i16())
                    .push_bind(format!("{}/{}", wf.name, s.id))
                    .push_bind(&s.queue)
                    .push_bind(s.priority.as_i16())
                    .push_bind(t.depends_on)
                    .push_bind(s.condition.as_i16())
                    .push_bind(Json(t.config))
                    .push_bind(t.status.as_i16())
                    .push_bind(t.retry.max_attempts)
                    .push_bind(t.retry.initial_backoff_ms)
                    .push_bind(t.retry.max_backoff_ms)
                    .push_bind(t.retry.multiplier)
                    .push_bind(s.timeout_ms)
                    .push_bind(Json(t.input))
                    .push_bind(created_by)
                    .push("clock_timestamp() + make_interval(secs => ")
                    .push_bind_unseparated(t.wait_ms as f64)
                    .push_unseparated("::float8 / 1000)");
            });
            qb.push(format!(" RETURNING {TASK_COLUMNS}"));
            for row in qb.build().fetch_all(&mut *tx).await? {
                let task = task_from_row(&row)?.task;
                if task.depends_on.is_empty() {
                    roots.insert(task.id, task);
                }
            }
        }
        // Event log: the run starts, then each root task is queued (in step order).
        tx.append(run_id, &EventPayload::RunStatus(RunStatus::Running))?;
        let mut queues = HashSet::new();
        let mut engine_work = false;
        for s in steps.iter().filter(|s| s.depends_on.is_empty()) {
            let task = roots.get(&ids[s.id.as_str()]).ok_or_else(|| Error::internal("a root task was not written"))?;
            tx.append_task(task)?;
            if s.kind == StepKind::Task {
                queues.insert(s.queue.clone());
            } else {
                engine_work = true;
            }
        }
        if engine_work {
            wake_engines(&mut tx).await?;
        }
        for q in queues {
            notify_queue(&mut tx, &wf.namespace, &q).await?;
        }
        tx.flush().await?;
        let run = get_run_in(&mut tx, &wf.namespace, run_id).await?.ok_or_else(|| Error::internal("run vanished"))?;
        record_call(&mut tx, audit, &[run_id]).await?;
        tx.commit().await?;
        let _ = leaf_steps;
        Ok(run)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_run"))]
    async fn get_run(&self, ns: &str, id: Uuid) -> Result<Option<Run>> {
        let mut conn = self.pool().acquire().await?;
        get_run_in(&mut conn, ns, id).await
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "list_runs"))]
    async fn list_runs(&self, ns: &str, f: &RunFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Run>> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT * FROM runs r WHERE r.namespace = ");
        qb.push_bind(ns);
        if let Some(w) = f.workflow_id {
            qb.push(" AND r.workflow_id = ");
            qb.push_bind(w);
        }
        if !f.statuses.is_empty() {
            qb.push(" AND r.status = ANY(");
            qb.push_bind(f.statuses.iter().map(|s| s.as_i16()).collect::<Vec<_>>());
            qb.push(")");
        }
        if let Some(t) = f.create_time_after {
            qb.push(" AND r.create_time > ");
            qb.push_bind(t);
        }
        if let Some(t) = f.create_time_before {
            qb.push(" AND r.create_time < ");
            qb.push_bind(t);
        }
        push_newest_first_page(&mut qb, "r", after, limit)?;
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(run_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "cancel_run"))]
    async fn cancel_run(&self, ns: &str, id: Uuid, reason: &str, audit: Option<&AuditEvent>) -> Result<Run> {
        let mut tx = RunTx::begin(self).await?;
        let row = sqlx::query("SELECT * FROM runs WHERE id = $1 AND namespace = $2 FOR UPDATE")
            .bind(id)
            .bind(ns)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::not_found("run", id.to_string()))?;
        let run = run_from_row(&row)?;
        if run.status.is_terminal() {
            return Err(Error::FailedPrecondition(format!("run {id} has already ended ({:?})", run.status)));
        }
        let reason = if reason.is_empty() { "cancelled" } else { reason };
        end_run(&mut tx, &run, RunStatus::Cancelled, reason).await?;
        tx.flush().await?;
        let run = get_run_in(&mut tx, ns, id).await?.ok_or_else(|| Error::internal("run vanished"))?;
        record_call(&mut tx, audit, &[id]).await?;
        tx.commit().await?;
        Ok(run)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "run_events"))]
    async fn run_events(&self, run_id: Uuid, after_sequence: i64, limit: usize) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query(
            "SELECT sequence, time, payload FROM run_events WHERE run_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
        )
        .bind(run_id)
        .bind(after_sequence)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let payload: Json<EventPayload> = r.try_get("payload")?;
                Ok(RunEvent { sequence: r.try_get("sequence")?, time: r.try_get("time")?, payload: payload.0 })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "create_task"))]
    async fn create_task(&self, t: &NewTask, audit: Option<&AuditEvent>) -> Result<Task> {
        let mut tx = self.pool().begin().await?;
        if let Some(rid) = &t.request_id {
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM tasks WHERE namespace = $1 AND created_by = $2 AND request_id = $3")
                    .bind(&t.namespace)
                    .bind(&t.created_by)
                    .bind(rid)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(id) = existing {
                let task = fetch_task(&mut tx, id).await?;
                tx.commit().await?;
                return Ok(task);
            }
        }
        // Dependencies: existing standalone tasks of the namespace; locked (in id order, so two
        // creations sharing dependencies cannot deadlock) so their state cannot change between
        // reading it and deciding this task's. The lock is the one an UPDATE takes, because a
        // BLOCKED task's insert marks its unfinished dependencies (`dependents_waiting`, below).
        let deps = if t.depends_on.is_empty() {
            Vec::new()
        } else {
            sqlx::query(
                "SELECT id, status, output FROM tasks WHERE id = ANY($1) AND namespace = $2 AND run_id IS NULL \
                 ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(&t.depends_on)
            .bind(&t.namespace)
            .fetch_all(&mut *tx)
            .await?
        };
        if deps.len() != t.depends_on.len() {
            let found: HashSet<Uuid> = deps.iter().filter_map(|r| r.try_get("id").ok()).collect();
            let (i, missing) = t
                .depends_on
                .iter()
                .enumerate()
                .find(|(_, d)| !found.contains(d))
                .ok_or_else(|| Error::invalid("task.depends_on", "duplicate dependency"))?;
            return Err(Error::invalid(
                format!("task.depends_on[{i}]"),
                format!("no standalone task {missing} in this namespace"),
            ));
        }
        let mut statuses = Vec::new();
        let mut outputs = serde_json::Map::new();
        for r in &deps {
            let s: i16 = r.try_get("status")?;
            statuses.push(TaskStatus::from_i16(s).ok_or_else(|| enum_err("status", s))?);
            let id: Uuid = r.try_get("id")?;
            let out: Option<Json<Value>> = r.try_get("output")?;
            outputs.insert(id.to_string(), out.map(|o| o.0).unwrap_or(Value::Null));
        }
        let (status, error) = match condition_met(Condition::AllSucceeded, &statuses) {
            None => (TaskStatus::Blocked, ""),
            Some(true) => (TaskStatus::Queued, ""),
            Some(false) => (TaskStatus::Skipped, "a dependency did not succeed"),
        };
        let mut input = t.input.clone();
        if status == TaskStatus::Queued
            && !deps.is_empty()
            && let Value::Object(map) = &mut input
        {
            map.insert("parents".into(), Value::Object(outputs));
        }
        sqlx::query(
            "INSERT INTO tasks (id, namespace, kind, title, description, queue, priority, depends_on, status, error, max_attempts, \
             initial_backoff_ms, max_backoff_ms, backoff_multiplier, attempt_timeout_ms, input, due_time, created_by, request_id) \
             VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(t.id)
        .bind(&t.namespace)
        .bind(&t.title)
        .bind(&t.description)
        .bind(&t.queue)
        .bind(t.priority.as_i16())
        .bind(&t.depends_on)
        .bind(status.as_i16())
        .bind(error)
        .bind(t.retry.max_attempts)
        .bind(t.retry.initial_backoff_ms)
        .bind(t.retry.max_backoff_ms)
        .bind(t.retry.multiplier)
        .bind(t.timeout_ms)
        .bind(Json(&input))
        .bind(t.due_time)
        .bind(&t.created_by)
        .bind(&t.request_id)
        .execute(&mut *tx)
        .await?;
        if status == TaskStatus::Queued {
            notify_queue(&mut tx, &t.namespace, &t.queue).await?;
        }
        // A BLOCKED task's insert marks its unfinished dependencies (`dependents_waiting`, by the
        // trigger of migration 0011): completing one of them must now look for this task.
        let task = fetch_task(&mut tx, t.id).await?;
        record_call(&mut tx, audit, &[t.id]).await?;
        tx.commit().await?;
        Ok(task)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_task"))]
    async fn get_task(&self, ns: &str, id: Uuid) -> Result<Option<Task>> {
        let mut conn = self.pool().acquire().await?;
        let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(ns)
            .fetch_optional(&mut *conn)
            .await?;
        match exists {
            Some(id) => Ok(Some(fetch_task(&mut conn, id).await?)),
            None => Ok(None),
        }
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "list_tasks"))]
    async fn list_tasks(&self, ns: &str, f: &TaskFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Task>> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        qb.push(TASK_COLUMNS);
        qb.push(" FROM tasks t WHERE t.namespace = ");
        qb.push_bind(ns);
        if let Some(q) = &f.queue {
            qb.push(" AND t.queue = ");
            qb.push_bind(q.clone());
        }
        if !f.statuses.is_empty() {
            qb.push(" AND t.status = ANY(");
            qb.push_bind(f.statuses.iter().map(|s| s.as_i16()).collect::<Vec<_>>());
            qb.push(")");
        }
        if let Some(r) = f.run_id {
            qb.push(" AND t.run_id = ");
            qb.push_bind(r);
        }
        if let Some(p) = f.min_priority {
            qb.push(" AND t.priority >= ");
            qb.push_bind(p.as_i16());
        }
        push_newest_first_page(&mut qb, "t", after, limit)?;
        let rows = qb.build().fetch_all(self.pool()).await?;
        let mut tasks: Vec<Task> = rows.iter().map(|r| task_from_row(r).map(|t| t.task)).collect::<Result<_>>()?;
        let mut conn = self.pool().acquire().await?;
        load_attempts(&mut conn, &mut tasks).await?;
        Ok(tasks)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "claim_tasks"))]
    async fn claim_tasks(
        &self,
        ns: &str,
        queue: &str,
        worker: &str,
        max: usize,
        lease_ms: i64,
        audit: Option<&AuditEvent>,
    ) -> Result<Vec<LeasedTask>> {
        // One statement leases the picked tasks, then locks the runs of those in runs (by id:
        // after the tasks, as every transition does), starts the attempts of the tasks whose run
        // is live (and of the standalone ones) and writes the call's audit row naming them, as
        // `call_event` would, in the order of the answer (standalone first, then by run and id).
        // It returns every leased task as stored afterwards with its run's status: a run that
        // ended meanwhile gets its task cancelled below instead of leased.
        static CLAIM: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH picked AS (SELECT id FROM tasks WHERE namespace = $1 AND queue = $2 AND status = 2 AND kind = 1 \
                   AND available_time <= clock_timestamp() ORDER BY priority DESC, available_time, id LIMIT $3 FOR UPDATE SKIP LOCKED), \
                 t AS (UPDATE tasks t SET status = 3, attempt = t.attempt + 1, worker_id = $4, lease_token = gen_random_uuid(), \
                   lease_duration_ms = $5, lease_expire_time = clock_timestamp() + make_interval(secs => $5::float8 / 1000), \
                   attempt_deadline = CASE WHEN t.attempt_timeout_ms IS NULL THEN NULL \
                     ELSE clock_timestamp() + make_interval(secs => t.attempt_timeout_ms::float8 / 1000) END, \
                   update_time = clock_timestamp() \
                   FROM picked WHERE t.id = picked.id RETURNING {TASK_COLUMNS}), \
                 {locked_runs}, \
                 started AS ({START_ATTEMPT} SELECT live.id, live.attempt, $4, 3 FROM live \
                   {START_ATTEMPT_CONFLICT} {ATTEMPT_RETURNING}), \
                 listed AS ({listed}), \
                 audited AS ({audit_insert}) \
                 SELECT t.*, r.status AS run_status, {attempts} FROM t LEFT JOIN r ON r.id = t.run_id",
                locked_runs = LOCKED_RUNS,
                listed = listed_sql("live", "run_id NULLS FIRST, id"),
                audit_insert = audit_insert_sql(6, Some("listed")),
                attempts = attempts_after("t", "started"),
            )
        });
        let key = format!("{ns}/{queue}");
        let event = call_event(audit, &[]);
        if !self.run_queues.recently(&key) {
            match claim_fast(self, ns, queue, worker, max, lease_ms, event.as_ref()).await? {
                Some(leased) => return Ok(leased),
                None => self.run_queues.mark(&key),
            }
        }
        let mut tx = RunTx::begin(self).await?;
        let query = sqlx::query(CLAIM.as_str()).bind(ns).bind(queue).bind(max as i64).bind(worker).bind(lease_ms);
        let rows = bind_audit(query, event.as_ref()).fetch_all(&mut *tx).await?;
        record_claim_wait(queue, &rows);
        if rows.iter().any(|r| r.try_get::<Option<Uuid>, _>("run_id").ok().flatten().is_some()) {
            self.run_queues.mark(&key);
        }
        let leased: Vec<LeasedTask> = settle_leased(&mut tx, &rows)
            .await?
            .into_iter()
            .map(|(row, token, _)| LeasedTask { task: row.task, lease_token: token })
            .collect();
        tx.commit().await?;
        self.run_tasks.remember(leased.iter().filter(|l| l.task.run_id.is_some()).map(|l| l.task.id));
        Ok(leased)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "heartbeat"))]
    async fn heartbeat(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        lease_ms: Option<i64>,
        progress: Option<&Value>,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        let mut tx = RunTx::begin(self).await?;
        let (row, run) =
            lock_task_and_run(&mut tx, ns, id).await?.ok_or_else(|| Error::not_found("task", id.to_string()))?;
        if row.task.status == TaskStatus::Cancelled && row.lease_token == Some(token) {
            return Err(aborted(id));
        }
        if row.task.status != TaskStatus::Leased || row.lease_token != Some(token) || lease_expired(&row) {
            return Err(stale(id));
        }
        if let Some(run) = run
            && run.status.is_terminal()
        {
            cancel_straggler(&mut tx, &row).await?;
            tx.commit().await?;
            return Err(aborted(id));
        }
        let lease_ms = lease_ms.or(row.lease_duration_ms).unwrap_or(30_000);
        sqlx::query(
            "UPDATE tasks SET lease_expire_time = LEAST(clock_timestamp() + make_interval(secs => $2::float8 / 1000), \
             coalesce(attempt_deadline, 'infinity'::timestamptz)), progress = coalesce($3, progress), \
             update_time = clock_timestamp() WHERE id = $1",
        )
        .bind(id)
        .bind(lease_ms as f64)
        .bind(progress.map(Json))
        .execute(&mut *tx)
        .await?;
        let task = fetch_task(&mut tx, id).await?;
        record_call(&mut tx, audit, &[id]).await?;
        tx.commit().await?;
        Ok(task)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "complete_task"))]
    async fn complete_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        output: &Value,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        worker_outcome(self, ns, id, token, Ok(output.clone()), audit).await
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "fail_task"))]
    async fn fail_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        error: &str,
        retryable: bool,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        worker_outcome(self, ns, id, token, Err((error.to_string(), retryable)), audit).await
    }

    async fn expire_leases(&self, limit: usize) -> Result<usize> {
        let mut tx = RunTx::begin(self).await?;
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.status = 3 AND (t.lease_expire_time < clock_timestamp() \
             OR t.attempt_deadline < clock_timestamp()) ORDER BY t.lease_expire_time LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
        rows.sort_by_key(|t| (t.task.run_id, t.task.id));
        let n = rows.len();
        for row in rows {
            let run = lock_run_of(&mut tx, &row).await?;
            if run.as_ref().is_some_and(|r| r.status.is_terminal()) {
                cancel_straggler(&mut tx, &row).await?;
                continue;
            }
            let why = if row.attempt_deadline.is_some_and(|d| d < Utc::now()) {
                "attempt timed out"
            } else {
                "lease expired (the worker stopped heartbeating)"
            };
            finish_attempt(&mut tx, &row, run.as_ref(), Err((why.to_string(), true)), None).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn time_out_runs(&self, limit: usize) -> Result<usize> {
        let mut tx = RunTx::begin(self).await?;
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE status IN (1, 2) AND deadline < clock_timestamp() ORDER BY deadline LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let n = rows.len();
        for row in &rows {
            let run = run_from_row(row)?;
            end_run(&mut tx, &run, RunStatus::TimedOut, "the run exceeded its timeout").await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn lease_server_steps(&self, limit: usize, lease_ms: i64) -> Result<Vec<ServerStep>> {
        // Leases the due steps, locks their runs and starts the attempts of those whose run is
        // live, in one statement (as ClaimTasks does); a run that ended meanwhile gets its step
        // cancelled below.
        static LEASE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH picked AS (SELECT id FROM tasks WHERE status = 2 AND kind <> 1 AND available_time <= clock_timestamp() \
                   ORDER BY available_time, id LIMIT $1 FOR UPDATE SKIP LOCKED), \
                 t AS (UPDATE tasks t SET status = 3, attempt = t.attempt + 1, worker_id = $2, lease_token = gen_random_uuid(), \
                   lease_duration_ms = $3, lease_expire_time = clock_timestamp() + make_interval(secs => $3::float8 / 1000), \
                   update_time = clock_timestamp() FROM picked WHERE t.id = picked.id RETURNING {TASK_COLUMNS}), \
                 {LOCKED_RUNS}, \
                 started AS ({START_ATTEMPT} SELECT live.id, live.attempt, $2, 3 FROM live \
                   ON CONFLICT (task_id, attempt) DO NOTHING {ATTEMPT_RETURNING}) \
                 SELECT t.*, r.status AS run_status, r.trace_parent AS run_trace_parent, {attempts} \
                 FROM t LEFT JOIN r ON r.id = t.run_id",
                attempts = attempts_after("t", "started"),
            )
        });
        let mut tx = RunTx::begin(self).await?;
        let rows = sqlx::query(LEASE.as_str())
            .bind(limit as i64)
            .bind(ENGINE_WORKER)
            .bind(lease_ms)
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::new();
        for (row, token, stored) in settle_leased(&mut tx, &rows).await? {
            out.push(ServerStep {
                leased: LeasedTask { task: row.task, lease_token: token },
                config: row.config,
                created_by: row.created_by,
                trace_parent: stored.try_get("run_trace_parent")?,
            });
        }
        tx.commit().await?;
        self.run_tasks.remember(out.iter().filter(|s| s.leased.task.run_id.is_some()).map(|s| s.leased.task.id));
        Ok(out)
    }
}

/// The `resource_id` of a workflow call's audit row, as [`call_event`] would name it, over the
/// ids of relation `rel` in `order` (the answer's): the first `LISTED_RESOURCES`, then how many
/// more. No row when `rel` is empty.
fn listed_sql(rel: &str, order: &str) -> String {
    format!(
        "SELECT concat_ws(',', \
           (SELECT string_agg(f.id::text, ',' ORDER BY {order}) FROM (SELECT * FROM {rel} ORDER BY {order} LIMIT {LISTED_RESOURCES}) f), \
           CASE WHEN count(*) > {LISTED_RESOURCES} THEN '... ' || (count(*) - {LISTED_RESOURCES}) || ' more' END) \
         AS resource_id FROM {rel} HAVING count(*) > 0"
    )
}

/// CTEs `r` and `live` of a statement that leased tasks in its data-modifying CTE `t`: `r` locks
/// the runs of the leased run tasks (`id`, `status`, `trace_parent`), by id (after the tasks, the order every transition takes;
/// a run locked after waiting is read as committed), and `live` lists the leased tasks (`id`,
/// `attempt`, `run_id`) that are standalone or whose run is live.
const LOCKED_RUNS: &str = "r AS (SELECT runs.id, runs.status, runs.trace_parent FROM runs WHERE runs.id IN (SELECT t.run_id FROM t) \
       ORDER BY runs.id FOR UPDATE), \
     live AS (SELECT t.id, t.attempt, t.run_id FROM t LEFT JOIN r ON r.id = t.run_id \
       WHERE t.run_id IS NULL OR r.status IN (1, 2))";

/// The tasks a statement with [`LOCKED_RUNS`] leased (its `rows`, with [`attempts_after`]'s
/// column), taken in order of run and id: a task whose run ended meanwhile is cancelled; the
/// others get their attempts and are appended to their run's log. Returns those, each with its
/// lease token and its row.
async fn settle_leased<'r>(tx: &mut RunTx, rows: &'r [PgRow]) -> Result<Vec<(TaskRow, Uuid, &'r PgRow)>> {
    let mut leased: Vec<(TaskRow, &PgRow)> =
        rows.iter().map(|r| task_from_row(r).map(|t| (t, r))).collect::<Result<_>>()?;
    leased.sort_by_key(|(t, _)| (t.task.run_id, t.task.id));
    let mut out = Vec::with_capacity(leased.len());
    for (mut row, stored) in leased {
        if row.task.run_id.is_some() && !run_is_live(stored)? {
            cancel_straggler(tx, &row).await?;
            continue;
        }
        row.task.attempts = attempts_column(stored)?;
        tx.append_task(&row.task)?;
        let token = row.lease_token.ok_or_else(|| Error::internal("leased task has no lease token"))?;
        out.push((row, token, stored));
    }
    Ok(out)
}

/// Whether the run of a task leased by a statement with [`LOCKED_RUNS`] (its `run_status`
/// column) is live.
fn run_is_live(row: &PgRow) -> Result<bool> {
    let status: Option<i16> = row.try_get("run_status")?;
    match status {
        None => Err(Error::internal("a leased task's run is missing")),
        Some(s) => Ok(!RunStatus::from_i16(s).ok_or_else(|| enum_err("run status", s))?.is_terminal()),
    }
}

/// Appends the audit row of a call (when it is one: the engine's own work passes `None`) inside
/// the caller's transaction, naming the resources it changed.
async fn record_call(conn: &mut PgConnection, audit: Option<&AuditEvent>, resources: &[Uuid]) -> Result<()> {
    match call_event(audit, resources) {
        Some(event) => record_audit(conn, &event).await,
        None => Ok(()),
    }
}

/// How many resource ids an audit row of a workflow call lists; more are counted.
const LISTED_RESOURCES: usize = 20;

/// The audit row [`record_call`] appends, for a statement that writes it itself
/// ([`audit_insert_sql`]).
fn call_event(audit: Option<&AuditEvent>, resources: &[Uuid]) -> Option<AuditEvent> {
    let mut event = audit?.clone();
    event.id = Uuid::now_v7();
    let mut ids: Vec<String> = resources.iter().take(LISTED_RESOURCES).map(Uuid::to_string).collect();
    if resources.len() > LISTED_RESOURCES {
        ids.push(format!("... {} more", resources.len() - LISTED_RESOURCES));
    }
    event.resource_id = (!ids.is_empty()).then(|| ids.join(","));
    Some(event)
}

fn lease_expired(row: &TaskRow) -> bool {
    let now = Utc::now();
    row.task.lease_expire_time.is_some_and(|t| t < now) || row.attempt_deadline.is_some_and(|t| t < now)
}

/// How long a queue whose claim met a run's task keeps taking the transactional claim path.
const RUN_QUEUE_MEMORY: Duration = Duration::from_secs(60);
/// At most this many queues are remembered (past it, expired entries go, then all).
const RUN_QUEUES_REMEMBERED: usize = 10_000;

/// The queues (`namespace/queue`) whose claims recently met a task of a workflow run. A claim
/// first tries [`claim_fast`], which leases standalone tasks only; when its pick includes a
/// run's task it leases nothing and the claim takes the transactional path. Remembering such
/// queues for a while spares their claims the refused attempt. Only a hint: either path is
/// correct for any queue.
#[derive(Debug, Default)]
pub(crate) struct RunQueues(std::sync::Mutex<HashMap<String, Instant>>);

impl RunQueues {
    fn recently(&self, key: &str) -> bool {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(key).is_some_and(|t| t.elapsed() < RUN_QUEUE_MEMORY)
    }

    fn mark(&self, key: &str) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= RUN_QUEUES_REMEMBERED && !seen.contains_key(key) {
            seen.retain(|_, t| t.elapsed() < RUN_QUEUE_MEMORY);
            if seen.len() >= RUN_QUEUES_REMEMBERED {
                seen.clear();
            }
        }
        seen.insert(key.to_string(), Instant::now());
    }
}

/// At most this many leased tasks of runs are remembered (past it, all are forgotten).
const RUN_TASKS_REMEMBERED: usize = 10_000;

/// Tasks of workflow runs this replica leased and has not yet seen finished. CompleteTask first
/// tries [`complete_fast`], which completes standalone tasks only; for a task remembered here it
/// goes straight to the transactional path instead. Only a hint: either path is correct for any
/// task (a task leased through another replica just pays the refused attempt).
#[derive(Debug, Default)]
pub(crate) struct RunTasks(std::sync::Mutex<HashSet<Uuid>>);

impl RunTasks {
    fn remember(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if seen.len() >= RUN_TASKS_REMEMBERED {
                seen.clear();
            }
            seen.insert(id);
        }
    }

    /// Whether `id` was remembered; forgets it.
    fn take(&self, id: Uuid) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }
}

/// Records how long each claimed task waited in its queue.
fn record_claim_wait(queue: &str, rows: &[PgRow]) {
    let now = Utc::now();
    for row in rows {
        if let Ok(available) = row.try_get::<DateTime<Utc>, _>("available_time") {
            metrics().claim_waited(queue, (now - available).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
    }
}

/// ClaimTasks in one autocommitted statement when every task it picks is standalone: leases
/// them, starts their attempts and writes the call's audit row (naming the first
/// `LISTED_RESOURCES` ids in answer order, as [`call_event`] does, and counting the rest).
/// Returns the leased tasks by id, or `None` when the pick included a run's task: then nothing
/// was changed (the picked rows were only locked for the statement) and the caller claims in a
/// transaction, which takes each run's lock after its task.
async fn claim_fast(
    store: &PgStore,
    ns: &str,
    queue: &str,
    worker: &str,
    max: usize,
    lease_ms: i64,
    event: Option<&AuditEvent>,
) -> Result<Option<Vec<LeasedTask>>> {
    static CLAIM: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH picked AS (SELECT id, run_id FROM tasks WHERE namespace = $1 AND queue = $2 AND status = 2 AND kind = 1 \
               AND available_time <= clock_timestamp() ORDER BY priority DESC, available_time, id LIMIT $3 \
               FOR UPDATE SKIP LOCKED), \
             pick AS (SELECT count(*) FILTER (WHERE run_id IS NOT NULL) AS in_runs FROM picked), \
             t AS (UPDATE tasks t SET status = 3, attempt = t.attempt + 1, worker_id = $4, lease_token = gen_random_uuid(), \
               lease_duration_ms = $5, lease_expire_time = clock_timestamp() + make_interval(secs => $5::float8 / 1000), \
               attempt_deadline = CASE WHEN t.attempt_timeout_ms IS NULL THEN NULL \
                 ELSE clock_timestamp() + make_interval(secs => t.attempt_timeout_ms::float8 / 1000) END, \
               update_time = clock_timestamp() \
               FROM picked, pick WHERE t.id = picked.id AND pick.in_runs = 0 RETURNING {TASK_COLUMNS}), \
             started AS ({START_ATTEMPT} SELECT t.id, t.attempt, $4, 3 FROM t {START_ATTEMPT_CONFLICT} {ATTEMPT_RETURNING}), \
             listed AS ({listed}), \
             audited AS ({audit_insert}) \
             SELECT pick.in_runs, t.*, {attempts} FROM pick LEFT JOIN t ON true",
            listed = listed_sql("t", "id"),
            audit_insert = audit_insert_sql(6, Some("listed")),
            attempts = attempts_after("t", "started"),
        )
    });
    let query = sqlx::query(CLAIM.as_str()).bind(ns).bind(queue).bind(max as i64).bind(worker).bind(lease_ms);
    let rows = bind_audit(query, event).fetch_all(store.pool()).await?;
    let in_runs: i64 = match rows.first() {
        Some(row) => row.try_get("in_runs")?,
        None => 0,
    };
    if in_runs > 0 {
        return Ok(None);
    }
    // No task leased: one row of NULLs (the LEFT JOIN).
    let rows: Vec<PgRow> =
        rows.into_iter().filter(|r| r.try_get::<Option<Uuid>, _>("id").ok().flatten().is_some()).collect();
    record_claim_wait(queue, &rows);
    let mut leased = rows
        .iter()
        .map(|r| {
            let row = task_from_row(r)?;
            let token = row.lease_token.ok_or_else(|| Error::internal("claimed task has no lease token"))?;
            Ok(LeasedTask { task: Task { attempts: attempts_column(r)?, ..row.task }, lease_token: token })
        })
        .collect::<Result<Vec<_>>>()?;
    leased.sort_by_key(|l| l.task.id);
    Ok(Some(leased))
}

/// CompleteTask of a standalone task no task waits for, in one autocommitted statement: when
/// the task is LEASED under `token`, its lease current, outside a run and without
/// `dependents_waiting` (migrations 0009 and 0011), it succeeds with `output`, its attempt ends and the
/// call's audit row (`event`) is written; the task is returned as stored. Anything else changes
/// nothing and returns `None`, and the caller takes the locking path (run tasks, dependents,
/// stale or repeated calls). The UPDATE locks the row; one that waited for a concurrent change
/// re-checks these conditions on the new row version, so a CreateTask that marked the task
/// meanwhile sends this completion down the locking path.
async fn complete_fast(
    store: &PgStore,
    ns: &str,
    id: Uuid,
    token: Uuid,
    output: &Value,
    event: Option<&AuditEvent>,
) -> Result<Option<Task>> {
    static COMPLETE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH t AS (UPDATE tasks t SET status = 4, output = $4, error = '', lease_expire_time = NULL, \
               update_time = clock_timestamp() \
               WHERE t.id = $1 AND t.namespace = $2 AND t.lease_token = $3 AND t.status = 3 AND t.run_id IS NULL \
                 AND NOT t.dependents_waiting AND coalesce(t.lease_expire_time >= clock_timestamp(), true) \
                 AND coalesce(t.attempt_deadline >= clock_timestamp(), true) \
               RETURNING {TASK_COLUMNS}), \
             ended AS (UPDATE task_attempts a SET status = 4, end_time = clock_timestamp() FROM t \
               WHERE a.task_id = t.id AND a.attempt = t.attempt \
               RETURNING a.task_id, a.attempt, a.worker_id, a.start_time, a.end_time, a.status, a.error), \
             listed AS (SELECT t.id::text AS resource_id FROM t), \
             audited AS ({audit_insert}) \
             SELECT t.*, {attempts} FROM t",
            audit_insert = audit_insert_sql(5, Some("listed")),
            attempts = attempts_after("t", "ended"),
        )
    });
    let query = sqlx::query(COMPLETE.as_str()).bind(id).bind(ns).bind(token).bind(Json(output));
    let Some(stored) = bind_audit(query, event).fetch_optional(store.pool()).await? else {
        return Ok(None);
    };
    let mut task = task_from_row(&stored)?.task;
    task.attempts = attempts_column(&stored)?;
    Ok(Some(task))
}

/// CompleteTask / FailTask: the lease token must be current; a duplicate complete with the same
/// token is answered with the recorded result (exactly-once recording).
async fn worker_outcome(
    store: &PgStore,
    ns: &str,
    id: Uuid,
    token: Uuid,
    outcome: Result<Value, (String, bool)>,
    audit: Option<&AuditEvent>,
) -> Result<Task> {
    let event = call_event(audit, &[id]);
    if let Ok(output) = &outcome
        && !store.run_tasks.take(id)
        && let Some(task) = complete_fast(store, ns, id, token, output, event.as_ref()).await?
    {
        return Ok(task);
    }
    let mut tx = RunTx::begin(store).await?;
    let (row, run) =
        lock_task_and_run(&mut tx, ns, id).await?.ok_or_else(|| Error::not_found("task", id.to_string()))?;
    let same_token = row.lease_token == Some(token);
    match row.task.status {
        TaskStatus::Cancelled if same_token => return Err(aborted(id)),
        TaskStatus::Succeeded if same_token && outcome.is_ok() => {
            let task = fetch_task(&mut tx, id).await?;
            tx.commit().await?;
            return Ok(task);
        }
        TaskStatus::Failed if same_token && outcome.is_err() => {
            let task = fetch_task(&mut tx, id).await?;
            tx.commit().await?;
            return Ok(task);
        }
        TaskStatus::Leased if same_token && !lease_expired(&row) => {}
        _ => return Err(stale(id)),
    }
    if run.as_ref().is_some_and(|r| r.status.is_terminal()) {
        cancel_straggler(&mut tx, &row).await?;
        tx.commit().await?;
        return Err(aborted(id));
    }
    let task = finish_attempt(&mut tx, &row, run.as_ref(), outcome, event.as_ref()).await?;
    tx.commit().await?;
    Ok(task)
}

/// Appends the keyset condition after `after`, newest first, and the LIMIT.
fn push_newest_first_page(
    qb: &mut QueryBuilder<'_, Postgres>,
    alias: &str,
    after: Option<PageKey>,
    limit: usize,
) -> Result<()> {
    if let Some((t, id)) = after {
        qb.push(format!(" AND ({alias}.create_time, {alias}.id) < ("));
        qb.push_bind(micros(t)?);
        qb.push(", ");
        qb.push_bind(id);
        qb.push(")");
    }
    qb.push(format!(" ORDER BY {alias}.create_time DESC, {alias}.id DESC LIMIT "));
    qb.push_bind(limit as i64);
    Ok(())
}

fn micros(t: i64) -> Result<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(t).ok_or_else(|| Error::invalid("page_token", "malformed page token"))
}
