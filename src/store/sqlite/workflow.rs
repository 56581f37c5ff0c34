//! Workflows, runs and the leased task queue in the embedded store.
//!
//! The model and the rules are those of the PostgreSQL store ([`crate::store::workflow`]); only
//! the coordination differs. Every change is one transaction on the single writer connection,
//! so changes are serialised in the process: a row read inside a transaction cannot change
//! before it commits, and no row locks (`FOR UPDATE`, `SKIP LOCKED`) are needed. Where
//! PostgreSQL sends NOTIFY inside the transaction, a change here collects its wake-ups in an
//! [`Outbox`] that is delivered once the transaction has committed (and dropped when it rolls
//! back). Plain reads use the read-only pool; a read of several statements runs in one read
//! transaction, so it sees one snapshot.
//!
//! Every state change of a run's task appends to `run_events` (the sequence comes from
//! `runs.last_sequence`) and wakes the run's watchers; newly queued worker tasks wake the
//! queue's long polls, and server-side steps due now wake the engine.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, Transaction, sqlite::SqliteRow, types::Json};
use uuid::Uuid;

use super::{SqliteStore, from_micros, identity::record_audit, micros, now_micros};
use crate::{
    error::{Error, Result},
    store::{
        identity::AuditEvent,
        notify::Notification,
        workflow::{
            ENGINE_WAKE, ENGINE_WORKER, PageKey, RunFilter, ServerStep, TaskFilter, WorkflowStore, aborted, stale,
        },
    },
    telemetry::metrics::metrics,
    workflow::{
        Condition, Definition, EventPayload, LeasedTask, NewTask, ParentState, Priority, RetryPolicy, Run, RunEvent,
        RunStatus, StepKind, Task, TaskAttempt, TaskStatus, Workflow, condition_met, decide_blocked, delay_ms,
        finished_run, step_task,
    },
};

/// How many ids one `IN (...)` list binds (SQLite caps the parameters of a statement).
const IN_CHUNK: usize = 500;

const TASK_COLUMNS: &str = "t.id, t.namespace, t.run_id, t.step_id, t.kind, t.title, t.description, t.queue, t.priority, \
    t.depends_on, t.condition, t.config, t.status, t.attempt, t.max_attempts, t.initial_backoff_ms, t.max_backoff_ms, \
    t.backoff_multiplier, t.attempt_timeout_ms, t.input, t.output, t.error, t.progress, t.worker_id, t.lease_token, \
    t.lease_duration_ms, t.lease_expire_time, t.attempt_deadline, t.available_time, t.due_time, t.created_by, \
    t.create_time, t.update_time";

const RUN_COLUMNS: &str = "id, namespace, workflow_id, workflow_name, workflow_version, input, status, output, error, \
    create_time, start_time, end_time, deadline, request_id, last_sequence, trace_parent";

const WORKFLOW_COLUMNS: &str = "id, namespace, name, version, description, definition, labels, create_time";

const ATTEMPT_COLUMNS: &str = "a.task_id, a.attempt, a.worker_id, a.start_time, a.end_time, a.status, a.error";

/// The claim path (after `SELECT <columns>`): queued worker tasks of one queue that are due,
/// by priority, then age (index `tasks_claim`). ?1 namespace, ?2 queue, ?3 now, ?4 limit.
const CLAIM_FROM: &str = "FROM tasks t WHERE t.namespace = ?1 AND t.queue = ?2 AND t.status = 2 AND t.kind = 1 \
    AND t.available_time <= ?3 ORDER BY t.priority DESC, t.available_time, t.id LIMIT ?4";

/// Server-side steps that are due, oldest first (index `tasks_engine`). ?1 now, ?2 limit.
const ENGINE_FROM: &str = "FROM tasks t WHERE t.status = 2 AND t.kind <> 1 AND t.available_time <= ?1 \
    ORDER BY t.available_time, t.id LIMIT ?2";

/// Leases past their expiry or their attempt's timeout (indexes `tasks_leases` and
/// `tasks_attempt_deadlines`, each read only up to the limit). ?1 now, ?2 limit.
const EXPIRED_FROM: &str = "FROM tasks t WHERE t.id IN (\
    SELECT id FROM (SELECT id FROM tasks WHERE status = 3 AND lease_expire_time < ?1 ORDER BY lease_expire_time LIMIT ?2) \
    UNION ALL \
    SELECT id FROM (SELECT id FROM tasks WHERE status = 3 AND attempt_deadline < ?1 ORDER BY attempt_deadline LIMIT ?2)) \
    ORDER BY t.lease_expire_time, t.id LIMIT ?2";

/// Unfinished runs past their deadline (index `runs_deadline`). ?1 now, ?2 limit.
const OVERDUE_FROM: &str =
    "FROM runs WHERE status IN (1, 2) AND deadline IS NOT NULL AND deadline < ?1 ORDER BY deadline LIMIT ?2";

/// What a write transaction announces once it has committed: wake-ups (PostgreSQL's NOTIFY,
/// which also waits for the commit and folds duplicates) and the outcomes of finished runs for
/// the metrics.
#[derive(Default)]
struct Outbox {
    notes: Vec<Notification>,
    finished: Vec<&'static str>,
}

impl Outbox {
    fn notify(&mut self, note: Notification) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// Wakes the long polls of `<ns>/<queue>`.
    fn queue(&mut self, ns: &str, queue: &str) {
        self.notify(Notification::Queue(format!("{ns}/{queue}")));
    }

    /// Wakes the engine (a server-side step is due now).
    fn engine(&mut self) {
        self.notify(Notification::Queue(ENGINE_WAKE.to_string()));
    }
}

impl SqliteStore {
    /// Commits `tx`, then delivers what it announced.
    async fn commit_with(&self, tx: Transaction<'static, Sqlite>, out: Outbox) -> Result<()> {
        tx.commit().await?;
        for status in out.finished {
            metrics().run_finished(status);
        }
        for note in out.notes {
            self.notify(note);
        }
        Ok(())
    }
}

/// A task row with the engine-only columns the domain type does not carry. Times are stored
/// microseconds.
#[derive(Debug, Clone)]
struct TaskRow {
    task: Task,
    condition: Condition,
    config: Value,
    retry: RetryPolicy,
    lease_token: Option<Uuid>,
    lease_duration_ms: Option<i64>,
    lease_expire_time: Option<i64>,
    attempt_deadline: Option<i64>,
    available_time: i64,
    created_by: String,
}

fn enum_err(what: &str, v: i16) -> Error {
    Error::internal(format!("stored {what} {v} is unknown"))
}

fn opt_time(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<i64>, _>(col)?.map(from_micros).transpose()
}

fn time(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>> {
    from_micros(row.try_get(col)?)
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRow> {
    let kind: i16 = row.try_get("kind")?;
    let status: i16 = row.try_get("status")?;
    let priority: i16 = row.try_get("priority")?;
    let condition: i16 = row.try_get("condition")?;
    let depends_on: Json<Vec<Uuid>> = row.try_get("depends_on")?;
    let input: Json<Value> = row.try_get("input")?;
    let output: Option<Json<Value>> = row.try_get("output")?;
    let progress: Option<Json<Value>> = row.try_get("progress")?;
    let config: Json<Value> = row.try_get("config")?;
    let lease_expire_time: Option<i64> = row.try_get("lease_expire_time")?;
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
            depends_on: depends_on.0,
            status: TaskStatus::from_i16(status).ok_or_else(|| enum_err("status", status))?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            input: input.0,
            output: output.map(|o| o.0),
            error: row.try_get("error")?,
            worker_id: row.try_get("worker_id")?,
            lease_expire_time: lease_expire_time.map(from_micros).transpose()?,
            due_time: opt_time(row, "due_time")?,
            create_time: time(row, "create_time")?,
            update_time: time(row, "update_time")?,
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
        lease_expire_time,
        attempt_deadline: row.try_get("attempt_deadline")?,
        available_time: row.try_get("available_time")?,
        created_by: row.try_get("created_by")?,
    })
}

fn workflow_from_row(row: &SqliteRow) -> Result<Workflow> {
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
        create_time: time(row, "create_time")?,
    })
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    let status: i16 = row.try_get("status")?;
    let input: Json<Value> = row.try_get("input")?;
    let output: Option<Json<Value>> = row.try_get("output")?;
    Ok(Run {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        workflow_id: row.try_get("workflow_id")?,
        workflow_name: row.try_get("workflow_name")?,
        workflow_version: row.try_get("workflow_version")?,
        input: input.0,
        status: RunStatus::from_i16(status).ok_or_else(|| enum_err("run status", status))?,
        tasks: Vec::new(),
        output: output.map(|o| o.0),
        error: row.try_get("error")?,
        create_time: time(row, "create_time")?,
        start_time: opt_time(row, "start_time")?,
        end_time: opt_time(row, "end_time")?,
        deadline: opt_time(row, "deadline")?,
        request_id: row.try_get("request_id")?,
        last_sequence: row.try_get("last_sequence")?,
        trace_parent: row.try_get("trace_parent")?,
    })
}

/// Attaches attempt rows (ordered by task, then attempt) to their tasks.
fn attach_attempts(tasks: &mut [Task], rows: &[SqliteRow]) -> Result<()> {
    let mut by_task: HashMap<Uuid, Vec<TaskAttempt>> = HashMap::new();
    for row in rows {
        let status: i16 = row.try_get("status")?;
        by_task.entry(row.try_get("task_id")?).or_default().push(TaskAttempt {
            attempt: row.try_get("attempt")?,
            worker_id: row.try_get("worker_id")?,
            start_time: time(row, "start_time")?,
            end_time: opt_time(row, "end_time")?,
            status: TaskStatus::from_i16(status).ok_or_else(|| enum_err("attempt status", status))?,
            error: row.try_get("error")?,
        });
    }
    for t in tasks.iter_mut() {
        t.attempts = by_task.remove(&t.id).unwrap_or_default();
    }
    Ok(())
}

/// Fills in the attempts of `tasks`.
async fn load_attempts(conn: &mut SqliteConnection, tasks: &mut [Task]) -> Result<()> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let mut rows = Vec::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {ATTEMPT_COLUMNS} FROM task_attempts a WHERE a.task_id IN ("));
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(") ORDER BY a.task_id, a.attempt");
        rows.extend(qb.build().fetch_all(&mut *conn).await?);
    }
    attach_attempts(tasks, &rows)
}

async fn find_task(conn: &mut SqliteConnection, ns: &str, id: Uuid) -> Result<Option<TaskRow>> {
    let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id = ?1 AND t.namespace = ?2"))
        .bind(id)
        .bind(ns)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(task_from_row).transpose()
}

/// One task, attempts included.
async fn fetch_task(conn: &mut SqliteConnection, id: Uuid) -> Result<Task> {
    let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id = ?1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let mut task = [task_from_row(&row)?.task];
    load_attempts(conn, &mut task).await?;
    let [task] = task;
    Ok(task)
}

async fn fetch_run(conn: &mut SqliteConnection, id: Uuid) -> Result<Run> {
    let row =
        sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1")).bind(id).fetch_one(&mut *conn).await?;
    run_from_row(&row)
}

/// The run of a task, when it has one.
async fn run_of(conn: &mut SqliteConnection, row: &TaskRow) -> Result<Option<Run>> {
    match row.task.run_id {
        Some(run_id) => Ok(Some(fetch_run(conn, run_id).await?)),
        None => Ok(None),
    }
}

/// A run with its tasks (creation order) and their attempts.
async fn get_run_in(conn: &mut SqliteConnection, ns: &str, id: Uuid) -> Result<Option<Run>> {
    let Some(row) = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1 AND namespace = ?2"))
        .bind(id)
        .bind(ns)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let mut run = run_from_row(&row)?;
    let rows =
        sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = ?1 ORDER BY t.create_time, t.id"))
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    let mut tasks: Vec<Task> = rows.iter().map(|r| task_from_row(r).map(|t| t.task)).collect::<Result<_>>()?;
    let attempts = sqlx::query(&format!(
        "SELECT {ATTEMPT_COLUMNS} FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = ?1 \
         ORDER BY a.task_id, a.attempt"
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    attach_attempts(&mut tasks, &attempts)?;
    run.tasks = tasks;
    Ok(Some(run))
}

/// The status and output of each task of `ids` that exists — only standalone tasks of
/// `standalone_ns` when it is given.
async fn task_states(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
    standalone_ns: Option<&str>,
) -> Result<Vec<(Uuid, TaskStatus, Option<Value>)>> {
    let mut seen = HashSet::new();
    let ids: Vec<Uuid> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IN_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT id, status, output FROM tasks WHERE id IN (");
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(")");
        if let Some(ns) = standalone_ns {
            qb.push(" AND run_id IS NULL AND namespace = ");
            qb.push_bind(ns);
        }
        for r in qb.build().fetch_all(&mut *conn).await? {
            let s: i16 = r.try_get("status")?;
            let output: Option<Json<Value>> = r.try_get("output")?;
            out.push((
                r.try_get("id")?,
                TaskStatus::from_i16(s).ok_or_else(|| enum_err("status", s))?,
                output.map(|o| o.0),
            ));
        }
    }
    Ok(out)
}

/// Appends an event to a run's log and wakes its watchers (after the commit).
async fn append_event(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    run_id: Uuid,
    payload: &EventPayload,
) -> Result<()> {
    let seq: i64 =
        sqlx::query_scalar("UPDATE runs SET last_sequence = last_sequence + 1 WHERE id = ?1 RETURNING last_sequence")
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await?;
    sqlx::query("INSERT INTO run_events (run_id, sequence, time, payload) VALUES (?1, ?2, ?3, ?4)")
        .bind(run_id)
        .bind(seq)
        .bind(now_micros())
        .bind(Json(payload))
        .execute(&mut *conn)
        .await?;
    out.notify(Notification::Run(run_id));
    Ok(())
}

/// Appends the task's current state to its run's event log (when it has a run) and returns the
/// task, attempts included, so callers need not read it again.
async fn task_event(conn: &mut SqliteConnection, out: &mut Outbox, task_id: Uuid) -> Result<Task> {
    let task = fetch_task(conn, task_id).await?;
    if let Some(run_id) = task.run_id {
        let mut snapshot = task.clone();
        snapshot.attempts.clear();
        append_event(conn, out, run_id, &EventPayload::Task(Box::new(snapshot))).await?;
    }
    Ok(task)
}

/// `now` plus `ms` milliseconds, in stored microseconds.
fn after_ms(now: i64, ms: i64) -> i64 {
    now.saturating_add(ms.saturating_mul(1000))
}

/// A fresh, unguessable lease token.
fn new_lease_token() -> Result<Uuid> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::internal(format!("no randomness for a lease token: {e}")))?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

/// Makes a ready task claimable: QUEUED, available now (or after its DELAY).
async fn queue_task(conn: &mut SqliteConnection, out: &mut Outbox, row: &TaskRow, input: &Value) -> Result<()> {
    let wait_ms = if row.task.kind == StepKind::Delay { delay_ms(&row.config) } else { 0 };
    let now = now_micros();
    sqlx::query("UPDATE tasks SET status = 2, input = ?2, available_time = ?3, update_time = ?4 WHERE id = ?1")
        .bind(row.task.id)
        .bind(Json(input))
        .bind(after_ms(now, wait_ms))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    if row.task.kind == StepKind::Task {
        out.queue(&row.task.namespace, &row.task.queue);
    } else if wait_ms == 0 {
        out.engine();
    }
    task_event(conn, out, row.task.id).await.map(|_| ())
}

/// The metrics label of a run outcome.
fn status_label(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Pending => "PENDING",
        RunStatus::Running => "RUNNING",
        RunStatus::Succeeded => "SUCCEEDED",
        RunStatus::Failed => "FAILED",
        RunStatus::Cancelled => "CANCELLED",
        RunStatus::TimedOut => "TIMED_OUT",
    }
}

/// After task `finished` of `run` became terminal: queues or skips its BLOCKED children whose
/// parents have all ended (found through `task_dependencies`), then the children of the skipped
/// ones, and so on; ends the run when no task of it is left open (`tasks_run_open`). A
/// completion thus reads its children and their parents, not every task of the run; the run's
/// tasks are read in full once, when it ends, for its output. A run whose tasks have no edges
/// (started by a release that wrote none) is advanced from `depends_on` instead.
async fn advance_run(conn: &mut SqliteConnection, out: &mut Outbox, run: &Run, finished: Uuid) -> Result<()> {
    let mut ended = vec![finished];
    let mut open = false;
    while !ended.is_empty() {
        let mut skipped = Vec::new();
        for parent in ended {
            let rows = sqlx::query(&format!(
                "SELECT {TASK_COLUMNS} FROM task_dependencies d JOIN tasks t ON t.id = d.child_id \
                 WHERE d.parent_id = ?1 AND t.run_id = ?2 AND t.status = 1 ORDER BY t.id"
            ))
            .bind(parent)
            .bind(run.id)
            .fetch_all(&mut *conn)
            .await?;
            for row in &rows {
                let child = task_from_row(row)?;
                let parents = parent_states(conn, child.task.id).await?;
                match decide_blocked(child.condition, &parents, &run.input) {
                    None => open = true,
                    Some(Some(input)) => {
                        queue_task(conn, out, &child, &input).await?;
                        open = true;
                    }
                    Some(None) => {
                        skip_blocked(conn, out, child.task.id).await?;
                        skipped.push(child.task.id);
                    }
                }
            }
        }
        ended = skipped;
    }
    if open {
        return Ok(());
    }
    let (still_open, in_progress): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM tasks WHERE run_id = ?1 AND status IN (1, 2, 3)), \
                EXISTS (SELECT 1 FROM tasks WHERE run_id = ?1 AND status IN (2, 3))",
    )
    .bind(run.id)
    .fetch_one(&mut *conn)
    .await?;
    if in_progress {
        return Ok(());
    }
    if still_open {
        // Only BLOCKED tasks are left, so one of them has all its parents ended (a DAG cannot
        // wait on itself) but no edge led here: a run started by a release that wrote no edges
        // for run tasks (after this one's migration, e.g. during a rollback). Decide them from
        // their `depends_on`.
        return advance_run_without_edges(conn, out, run).await;
    }
    end_run_if_done(conn, out, run).await
}

/// Ends `run` when all its tasks have ended (its output from their outputs).
async fn end_run_if_done(conn: &mut SqliteConnection, out: &mut Outbox, run: &Run) -> Result<()> {
    let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = ?1 ORDER BY t.id"))
        .bind(run.id)
        .fetch_all(&mut *conn)
        .await?;
    let tasks: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
    let all: Vec<&Task> = tasks.iter().map(|t| &t.task).collect();
    if let Some((outcome, output, error)) = finished_run(&all) {
        sqlx::query("UPDATE runs SET status = ?2, output = ?3, error = ?4, end_time = ?5 WHERE id = ?1")
            .bind(run.id)
            .bind(outcome.as_i16())
            .bind(Json(output))
            .bind(error)
            .bind(now_micros())
            .execute(&mut *conn)
            .await?;
        append_event(conn, out, run.id, &EventPayload::RunStatus(outcome)).await?;
        out.finished.push(status_label(outcome));
    }
    Ok(())
}

/// Decides every BLOCKED task of `run` whose parents have all ended, from the tasks' own
/// `depends_on`, repeatedly, then ends the run if nothing is left open; writes the dependency
/// edges of the run's tasks on the way, so its next completions follow them.
async fn advance_run_without_edges(conn: &mut SqliteConnection, out: &mut Outbox, run: &Run) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO task_dependencies (parent_id, child_id) \
         SELECT p.id, t.id FROM tasks t, json_each(t.depends_on) j \
         JOIN tasks p ON p.id = unhex(replace(j.value, '-', '')) WHERE t.run_id = ?1",
    )
    .bind(run.id)
    .execute(&mut *conn)
    .await?;
    loop {
        let blocked = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = ?1 AND t.status = 1 ORDER BY t.id"
        ))
        .bind(run.id)
        .fetch_all(&mut *conn)
        .await?;
        let mut decided = false;
        for row in &blocked {
            let child = task_from_row(row)?;
            let parents = parent_states(conn, child.task.id).await?;
            match decide_blocked(child.condition, &parents, &run.input) {
                None => {}
                Some(Some(input)) => {
                    queue_task(conn, out, &child, &input).await?;
                    decided = true;
                }
                Some(None) => {
                    skip_blocked(conn, out, child.task.id).await?;
                    decided = true;
                }
            }
        }
        if !decided {
            return end_run_if_done(conn, out, run).await;
        }
    }
}

/// Skips a BLOCKED task of a run whose condition can no longer be met.
async fn skip_blocked(conn: &mut SqliteConnection, out: &mut Outbox, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE tasks SET status = 7, error = 'condition not met', update_time = ?2 WHERE id = ?1")
        .bind(id)
        .bind(now_micros())
        .execute(&mut *conn)
        .await?;
    task_event(conn, out, id).await.map(|_| ())
}

/// The parents of a run's task (from its own `depends_on`), as [`decide_blocked`] takes them.
async fn parent_states(conn: &mut SqliteConnection, child: Uuid) -> Result<Vec<ParentState>> {
    let rows = sqlx::query(
        "SELECT p.id, p.step_id, p.status, p.output FROM tasks c, json_each(c.depends_on) j \
         JOIN tasks p ON p.id = unhex(replace(j.value, '-', '')) WHERE c.id = ?1",
    )
    .bind(child)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let s: i16 = r.try_get("status")?;
            let output: Option<Json<Value>> = r.try_get("output")?;
            Ok(ParentState {
                id: r.try_get("id")?,
                step_id: r.try_get("step_id")?,
                status: TaskStatus::from_i16(s).ok_or_else(|| enum_err("status", s))?,
                output: output.map(|o| o.0),
            })
        })
        .collect()
}

/// Unblocks or skips standalone tasks waiting on `parent` (now terminal), and so on down.
async fn advance_dependents(conn: &mut SqliteConnection, out: &mut Outbox, parent: Uuid) -> Result<()> {
    let mut frontier = vec![parent];
    while let Some(p) = frontier.pop() {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM task_dependencies d JOIN tasks t ON t.id = d.child_id \
             WHERE d.parent_id = ?1 AND t.run_id IS NULL AND t.status = 1 ORDER BY t.id"
        ))
        .bind(p)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            let child = task_from_row(row)?;
            let parents = task_states(conn, &child.task.depends_on, None).await?;
            let statuses: Vec<TaskStatus> = parents.iter().map(|(_, s, _)| *s).collect();
            match condition_met(child.condition, &statuses) {
                None => {}
                Some(true) => {
                    let outputs: serde_json::Map<String, Value> =
                        parents.into_iter().map(|(id, _, o)| (id.to_string(), o.unwrap_or(Value::Null))).collect();
                    let mut input = child.task.input.clone();
                    if let Value::Object(map) = &mut input {
                        map.insert("parents".into(), Value::Object(outputs));
                    }
                    queue_task(conn, out, &child, &input).await?;
                }
                Some(false) => {
                    sqlx::query(
                        "UPDATE tasks SET status = 7, error = 'a dependency did not succeed', update_time = ?2 WHERE id = ?1",
                    )
                    .bind(child.task.id)
                    .bind(now_micros())
                    .execute(&mut *conn)
                    .await?;
                    frontier.push(child.task.id);
                }
            }
        }
    }
    Ok(())
}

/// Ends the current attempt of a leased task and applies the outcome (retry, fail, succeed),
/// then advances the run or the standalone dependents.
async fn finish_attempt(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    row: &TaskRow,
    run: Option<&Run>,
    outcome: &Result<Value, (String, bool)>,
) -> Result<()> {
    let id = row.task.id;
    let now = now_micros();
    match outcome {
        Ok(output) => {
            sqlx::query("UPDATE task_attempts SET status = 4, end_time = ?3 WHERE task_id = ?1 AND attempt = ?2")
                .bind(id)
                .bind(row.task.attempt)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "UPDATE tasks SET status = 4, output = ?2, error = '', lease_expire_time = NULL, update_time = ?3 \
                 WHERE id = ?1",
            )
            .bind(id)
            .bind(Json(output))
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        Err((error, retryable)) => {
            sqlx::query(
                "UPDATE task_attempts SET status = 5, error = ?3, end_time = ?4 WHERE task_id = ?1 AND attempt = ?2",
            )
            .bind(id)
            .bind(row.task.attempt)
            .bind(error)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            if *retryable && row.task.attempt < row.retry.max_attempts {
                let backoff = row.retry.backoff_ms(row.task.attempt + 1);
                sqlx::query(
                    "UPDATE tasks SET status = 2, error = ?2, lease_token = NULL, lease_expire_time = NULL, \
                     attempt_deadline = NULL, available_time = ?3, update_time = ?4 WHERE id = ?1",
                )
                .bind(id)
                .bind(error)
                .bind(after_ms(now, backoff))
                .bind(now)
                .execute(&mut *conn)
                .await?;
                if row.task.kind == StepKind::Task {
                    out.queue(&row.task.namespace, &row.task.queue);
                }
                task_event(conn, out, id).await?;
                return Ok(());
            }
            sqlx::query(
                "UPDATE tasks SET status = 5, error = ?2, lease_expire_time = NULL, update_time = ?3 WHERE id = ?1",
            )
            .bind(id)
            .bind(error)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }
    // Only a run's tasks have an event log; a standalone task needs no re-read here.
    if run.is_some() {
        task_event(conn, out, id).await?;
    }
    match run {
        Some(run) => advance_run(conn, out, run, id).await,
        None => advance_dependents(conn, out, id).await,
    }
}

/// Cancels an unfinished task whose run has ended. The lease token stays, so the worker holding
/// it is told ABORTED rather than that its lease is stale.
async fn cancel_straggler(conn: &mut SqliteConnection, out: &mut Outbox, row: &TaskRow) -> Result<()> {
    let now = now_micros();
    if row.task.status == TaskStatus::Leased {
        sqlx::query("UPDATE task_attempts SET status = 6, end_time = ?3 WHERE task_id = ?1 AND attempt = ?2")
            .bind(row.task.id)
            .bind(row.task.attempt)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("UPDATE tasks SET status = 6, update_time = ?2 WHERE id = ?1")
        .bind(row.task.id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    task_event(conn, out, row.task.id).await.map(|_| ())
}

/// Ends a run early (cancel or timeout): the run takes `status`, its unfinished tasks are
/// cancelled, and the log ends with the run's status.
async fn end_run(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    run: &Run,
    status: RunStatus,
    reason: &str,
) -> Result<()> {
    sqlx::query("UPDATE runs SET status = ?2, error = ?3, end_time = ?4 WHERE id = ?1")
        .bind(run.id)
        .bind(status.as_i16())
        .bind(reason)
        .bind(now_micros())
        .execute(&mut *conn)
        .await?;
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.run_id = ?1 AND t.status IN (1, 2, 3) ORDER BY t.id"
    ))
    .bind(run.id)
    .fetch_all(&mut *conn)
    .await?;
    for row in &rows {
        cancel_straggler(conn, out, &task_from_row(row)?).await?;
    }
    append_event(conn, out, run.id, &EventPayload::RunStatus(status)).await?;
    out.finished.push(status_label(status));
    Ok(())
}

/// Hands a queued task to `worker`: a new attempt number, a fresh token, a lease of `lease_ms`
/// and, for worker tasks, the attempt's deadline. Returns the token.
async fn lease_task(
    conn: &mut SqliteConnection,
    id: Uuid,
    worker: &str,
    lease_ms: i64,
    with_attempt_deadline: bool,
) -> Result<Uuid> {
    let token = new_lease_token()?;
    let now = now_micros();
    let deadline = if with_attempt_deadline {
        "CASE WHEN attempt_timeout_ms IS NULL THEN NULL ELSE ?6 + attempt_timeout_ms * 1000 END"
    } else {
        "attempt_deadline"
    };
    sqlx::query(&format!(
        "UPDATE tasks SET status = 3, attempt = attempt + 1, worker_id = ?2, lease_token = ?3, lease_duration_ms = ?4, \
         lease_expire_time = ?5, attempt_deadline = {deadline}, update_time = ?6 WHERE id = ?1"
    ))
    .bind(id)
    .bind(worker)
    .bind(token)
    .bind(lease_ms)
    .bind(after_ms(now, lease_ms))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(token)
}

/// Appends the audit row of a call (when it is one: the engine's own work passes `None`) inside
/// the caller's transaction, naming the resources it changed.
async fn record_call(conn: &mut SqliteConnection, audit: Option<&AuditEvent>, resources: &[Uuid]) -> Result<()> {
    let Some(template) = audit else { return Ok(()) };
    let mut event = template.clone();
    event.id = Uuid::now_v7();
    let mut ids: Vec<String> = resources.iter().take(20).map(Uuid::to_string).collect();
    if resources.len() > 20 {
        ids.push(format!("... {} more", resources.len() - 20));
    }
    event.resource_id = (!ids.is_empty()).then(|| ids.join(","));
    record_audit(conn, &event).await
}

fn lease_expired(row: &TaskRow) -> bool {
    let now = now_micros();
    row.lease_expire_time.is_some_and(|t| t < now) || row.attempt_deadline.is_some_and(|t| t < now)
}

/// Appends the keyset condition after `after` (newest first) and the LIMIT; `prefix` qualifies
/// the columns (`"t."` or `""`).
fn push_newest_first_page(qb: &mut QueryBuilder<'_, Sqlite>, prefix: &str, after: Option<PageKey>, limit: usize) {
    if let Some((t, id)) = after {
        // (create_time, id) < (t, id), written so the create_time index bounds the scan.
        qb.push(format!(" AND {prefix}create_time <= "));
        qb.push_bind(t);
        qb.push(format!(" AND ({prefix}create_time < "));
        qb.push_bind(t);
        qb.push(format!(" OR {prefix}id < "));
        qb.push_bind(id);
        qb.push(")");
    }
    qb.push(format!(" ORDER BY {prefix}create_time DESC, {prefix}id DESC LIMIT "));
    qb.push_bind(limit as i64);
}

/// Appends ` AND <column> IN (<codes>)`.
fn push_codes(qb: &mut QueryBuilder<'_, Sqlite>, column: &str, codes: impl IntoIterator<Item = i16>) {
    qb.push(format!(" AND {column} IN ("));
    let mut list = qb.separated(", ");
    for c in codes {
        list.push_bind(c);
    }
    qb.push(")");
}

impl SqliteStore {
    /// CompleteTask / FailTask: the lease token must be current; a duplicate call with the same
    /// token and the same kind of outcome is answered with the recorded result (exactly-once
    /// recording).
    async fn worker_outcome(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        outcome: Result<Value, (String, bool)>,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let row = find_task(&mut tx, ns, id).await?.ok_or_else(|| Error::not_found("task", id.to_string()))?;
        let same_token = row.lease_token == Some(token);
        match row.task.status {
            TaskStatus::Cancelled if same_token => return Err(aborted(id)),
            TaskStatus::Succeeded if same_token && outcome.is_ok() => return fetch_task(&mut tx, id).await,
            TaskStatus::Failed if same_token && outcome.is_err() => return fetch_task(&mut tx, id).await,
            TaskStatus::Leased if same_token && !lease_expired(&row) => {}
            _ => return Err(stale(id)),
        }
        let run = run_of(&mut tx, &row).await?;
        if run.as_ref().is_some_and(|r| r.status.is_terminal()) {
            cancel_straggler(&mut tx, &mut out, &row).await?;
            self.commit_with(tx, out).await?;
            return Err(aborted(id));
        }
        finish_attempt(&mut tx, &mut out, &row, run.as_ref(), &outcome).await?;
        let task = fetch_task(&mut tx, id).await?;
        record_call(&mut tx, audit, &[id]).await?;
        self.commit_with(tx, out).await?;
        Ok(task)
    }
}

#[async_trait]
impl WorkflowStore for SqliteStore {
    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "create_workflow"))]
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
        // The single writer serialises creates of one name: consecutive versions, no conflict.
        let mut tx = self.writer().begin().await?;
        if let Some(rid) = request_id {
            let existing = sqlx::query(&format!(
                "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE namespace = ?1 AND created_by = ?2 AND request_id = ?3"
            ))
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
            "SELECT coalesce(max(version), 0) + 1 FROM workflows WHERE namespace = ?1 AND name = ?2",
        )
        .bind(ns)
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO workflows (id, namespace, name, version, description, definition, labels, created_by, request_id, \
             create_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) RETURNING {WORKFLOW_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(ns)
        .bind(name)
        .bind(version)
        .bind(description)
        .bind(Json(definition))
        .bind(Json(labels))
        .bind(created_by)
        .bind(request_id)
        .bind(now_micros())
        .fetch_one(&mut *tx)
        .await?;
        let wf = workflow_from_row(&row)?;
        record_call(&mut tx, audit, &[wf.id]).await?;
        tx.commit().await?;
        Ok(wf)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "get_workflow"))]
    async fn get_workflow(&self, ns: &str, id: Uuid) -> Result<Option<Workflow>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = ?1 AND namespace = ?2 AND delete_time IS NULL"
        ))
        .bind(id)
        .bind(ns)
        .fetch_optional(self.reader())
        .await?;
        row.as_ref().map(workflow_from_row).transpose()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "get_workflow_by_name"))]
    async fn get_workflow_by_name(&self, ns: &str, name: &str, version: Option<i32>) -> Result<Option<Workflow>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE namespace = ?1 AND name = ?2 AND delete_time IS NULL \
             AND (?3 IS NULL OR version = ?3) ORDER BY version DESC LIMIT 1"
        ))
        .bind(ns)
        .bind(name)
        .bind(version)
        .fetch_optional(self.reader())
        .await?;
        row.as_ref().map(workflow_from_row).transpose()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "list_workflows"))]
    async fn list_workflows(
        &self,
        ns: &str,
        name: Option<&str>,
        latest_only: bool,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Workflow>> {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {WORKFLOW_COLUMNS} FROM workflows w WHERE namespace = "));
        qb.push_bind(ns);
        qb.push(" AND delete_time IS NULL");
        if let Some(name) = name {
            qb.push(" AND name = ");
            qb.push_bind(name);
        }
        if latest_only {
            qb.push(
                " AND version = (SELECT max(v.version) FROM workflows v WHERE v.namespace = w.namespace \
                 AND v.name = w.name AND v.delete_time IS NULL)",
            );
        }
        push_newest_first_page(&mut qb, "w.", after, limit);
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(workflow_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "delete_workflow"))]
    async fn delete_workflow(&self, ns: &str, id: Uuid, audit: Option<&AuditEvent>) -> Result<bool> {
        let mut tx = self.writer().begin().await?;
        let n = sqlx::query(
            "UPDATE workflows SET delete_time = ?3 WHERE id = ?1 AND namespace = ?2 AND delete_time IS NULL",
        )
        .bind(id)
        .bind(ns)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            record_call(&mut tx, audit, &[id]).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "start_run"))]
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
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        if let Some(rid) = request_id {
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM runs WHERE namespace = ?1 AND request_id = ?2")
                    .bind(&wf.namespace)
                    .bind(rid)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(existing) = existing {
                // A retry: the first run with this request id (nothing is written).
                return get_run_in(&mut tx, &wf.namespace, existing)
                    .await?
                    .ok_or_else(|| Error::not_found("run", existing.to_string()));
            }
        }
        let run_id = Uuid::now_v7();
        let now = now_micros();
        sqlx::query(
            "INSERT INTO runs (id, namespace, workflow_id, workflow_name, workflow_version, input, status, created_by, \
             request_id, create_time, start_time, deadline, trace_parent) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 2, ?7, ?8, ?9, ?9, ?10, ?11)",
        )
        .bind(run_id)
        .bind(&wf.namespace)
        .bind(wf.id)
        .bind(&wf.name)
        .bind(wf.version)
        .bind(Json(input))
        .bind(created_by)
        .bind(request_id)
        .bind(now)
        .bind(timeout_ms.map(|ms| after_ms(now, ms)))
        .bind(trace_parent)
        .execute(&mut *tx)
        .await?;
        let steps = &wf.definition.steps;
        let ids: HashMap<&str, Uuid> = steps.iter().map(|s| (s.id.as_str(), Uuid::now_v7())).collect();
        let mut edges = Vec::new();
        for s in steps {
            let t = step_task(wf, s, &ids, default_retry, input)?;
            let now = now_micros();
            sqlx::query(
                "INSERT INTO tasks (id, namespace, run_id, step_id, kind, title, queue, priority, depends_on, condition, \
                 config, status, max_attempts, initial_backoff_ms, max_backoff_ms, backoff_multiplier, attempt_timeout_ms, \
                 input, created_by, available_time, create_time, update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                 ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?21)",
            )
            .bind(t.id)
            .bind(&wf.namespace)
            .bind(run_id)
            .bind(&s.id)
            .bind(s.kind.as_i16())
            .bind(format!("{}/{}", wf.name, s.id))
            .bind(&s.queue)
            .bind(s.priority.as_i16())
            .bind(Json(&t.depends_on))
            .bind(s.condition.as_i16())
            .bind(Json(&t.config))
            .bind(t.status.as_i16())
            .bind(t.retry.max_attempts)
            .bind(t.retry.initial_backoff_ms)
            .bind(t.retry.max_backoff_ms)
            .bind(t.retry.multiplier)
            .bind(s.timeout_ms)
            .bind(Json(t.input))
            .bind(created_by)
            .bind(after_ms(now, t.wait_ms))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            edges.extend(t.depends_on.iter().map(|parent| (*parent, t.id)));
        }
        // The edges a completion follows to the tasks waiting on it (`advance_run`), once every
        // task exists.
        for (parent, child) in edges {
            sqlx::query("INSERT INTO task_dependencies (parent_id, child_id) VALUES (?1, ?2)")
                .bind(parent)
                .bind(child)
                .execute(&mut *tx)
                .await?;
        }
        // Event log: the run starts, then each root task is queued.
        append_event(&mut tx, &mut out, run_id, &EventPayload::RunStatus(RunStatus::Running)).await?;
        for s in steps.iter().filter(|s| s.depends_on.is_empty()) {
            let id = ids.get(s.id.as_str()).copied().ok_or_else(|| Error::internal("step id vanished"))?;
            task_event(&mut tx, &mut out, id).await?;
            if s.kind == StepKind::Task {
                out.queue(&wf.namespace, &s.queue);
            } else {
                out.engine();
            }
        }
        let run = get_run_in(&mut tx, &wf.namespace, run_id).await?.ok_or_else(|| Error::internal("run vanished"))?;
        record_call(&mut tx, audit, &[run_id]).await?;
        self.commit_with(tx, out).await?;
        Ok(run)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "get_run"))]
    async fn get_run(&self, ns: &str, id: Uuid) -> Result<Option<Run>> {
        let mut tx = self.reader().begin().await?;
        let run = get_run_in(&mut tx, ns, id).await?;
        tx.commit().await?;
        Ok(run)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "list_runs"))]
    async fn list_runs(&self, ns: &str, f: &RunFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Run>> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE namespace = "));
        qb.push_bind(ns);
        if let Some(w) = f.workflow_id {
            qb.push(" AND workflow_id = ");
            qb.push_bind(w);
        }
        if !f.statuses.is_empty() {
            push_codes(&mut qb, "status", f.statuses.iter().map(|s| s.as_i16()));
        }
        if let Some(t) = f.create_time_after {
            qb.push(" AND create_time > ");
            qb.push_bind(micros(t));
        }
        if let Some(t) = f.create_time_before {
            qb.push(" AND create_time < ");
            qb.push_bind(micros(t));
        }
        push_newest_first_page(&mut qb, "", after, limit);
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(run_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "cancel_run"))]
    async fn cancel_run(&self, ns: &str, id: Uuid, reason: &str, audit: Option<&AuditEvent>) -> Result<Run> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1 AND namespace = ?2"))
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
        end_run(&mut tx, &mut out, &run, RunStatus::Cancelled, reason).await?;
        let run = get_run_in(&mut tx, ns, id).await?.ok_or_else(|| Error::internal("run vanished"))?;
        record_call(&mut tx, audit, &[id]).await?;
        self.commit_with(tx, out).await?;
        Ok(run)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "run_events"))]
    async fn run_events(&self, run_id: Uuid, after_sequence: i64, limit: usize) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query(
            "SELECT sequence, time, payload FROM run_events WHERE run_id = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
        )
        .bind(run_id)
        .bind(after_sequence)
        .bind(limit as i64)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                let payload: Json<EventPayload> = r.try_get("payload")?;
                Ok(RunEvent { sequence: r.try_get("sequence")?, time: time(r, "time")?, payload: payload.0 })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "create_task"))]
    async fn create_task(&self, t: &NewTask, audit: Option<&AuditEvent>) -> Result<Task> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        if let Some(rid) = &t.request_id {
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM tasks WHERE namespace = ?1 AND created_by = ?2 AND request_id = ?3")
                    .bind(&t.namespace)
                    .bind(&t.created_by)
                    .bind(rid)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(id) = existing {
                return fetch_task(&mut tx, id).await;
            }
        }
        // Dependencies: existing standalone tasks of the namespace.
        let deps = task_states(&mut tx, &t.depends_on, Some(&t.namespace)).await?;
        if deps.len() != t.depends_on.len() {
            let found: HashSet<Uuid> = deps.iter().map(|(id, _, _)| *id).collect();
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
        let statuses: Vec<TaskStatus> = deps.iter().map(|(_, s, _)| *s).collect();
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
            let outputs = deps.into_iter().map(|(id, _, o)| (id.to_string(), o.unwrap_or(Value::Null))).collect();
            map.insert("parents".into(), Value::Object(outputs));
        }
        let now = now_micros();
        sqlx::query(
            "INSERT INTO tasks (id, namespace, kind, title, description, queue, priority, depends_on, status, error, \
             max_attempts, initial_backoff_ms, max_backoff_ms, backoff_multiplier, attempt_timeout_ms, input, due_time, \
             created_by, request_id, available_time, create_time, update_time) \
             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?19, ?19)",
        )
        .bind(t.id)
        .bind(&t.namespace)
        .bind(&t.title)
        .bind(&t.description)
        .bind(&t.queue)
        .bind(t.priority.as_i16())
        .bind(Json(&t.depends_on))
        .bind(status.as_i16())
        .bind(error)
        .bind(t.retry.max_attempts)
        .bind(t.retry.initial_backoff_ms)
        .bind(t.retry.max_backoff_ms)
        .bind(t.retry.multiplier)
        .bind(t.timeout_ms)
        .bind(Json(&input))
        .bind(t.due_time.map(micros))
        .bind(&t.created_by)
        .bind(&t.request_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for parent in &t.depends_on {
            sqlx::query("INSERT OR IGNORE INTO task_dependencies (parent_id, child_id) VALUES (?1, ?2)")
                .bind(parent)
                .bind(t.id)
                .execute(&mut *tx)
                .await?;
        }
        if status == TaskStatus::Queued {
            out.queue(&t.namespace, &t.queue);
        }
        let task = fetch_task(&mut tx, t.id).await?;
        record_call(&mut tx, audit, &[t.id]).await?;
        self.commit_with(tx, out).await?;
        Ok(task)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "get_task"))]
    async fn get_task(&self, ns: &str, id: Uuid) -> Result<Option<Task>> {
        let mut tx = self.reader().begin().await?;
        let Some(row) = find_task(&mut tx, ns, id).await? else { return Ok(None) };
        let mut task = [row.task];
        load_attempts(&mut tx, &mut task).await?;
        tx.commit().await?;
        let [task] = task;
        Ok(Some(task))
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "list_tasks"))]
    async fn list_tasks(&self, ns: &str, f: &TaskFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Task>> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.namespace = "));
        qb.push_bind(ns);
        if let Some(q) = &f.queue {
            qb.push(" AND t.queue = ");
            qb.push_bind(q.clone());
        }
        if !f.statuses.is_empty() {
            push_codes(&mut qb, "t.status", f.statuses.iter().map(|s| s.as_i16()));
        }
        if let Some(r) = f.run_id {
            qb.push(" AND t.run_id = ");
            qb.push_bind(r);
        }
        if let Some(p) = f.min_priority {
            qb.push(" AND t.priority >= ");
            qb.push_bind(p.as_i16());
        }
        push_newest_first_page(&mut qb, "t.", after, limit);
        let mut tx = self.reader().begin().await?;
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut tasks: Vec<Task> = rows.iter().map(|r| task_from_row(r).map(|t| t.task)).collect::<Result<_>>()?;
        load_attempts(&mut tx, &mut tasks).await?;
        tx.commit().await?;
        Ok(tasks)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "claim_tasks"))]
    async fn claim_tasks(
        &self,
        ns: &str,
        queue: &str,
        worker: &str,
        max: usize,
        lease_ms: i64,
        audit: Option<&AuditEvent>,
    ) -> Result<Vec<LeasedTask>> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let now = now_micros();
        let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} {CLAIM_FROM}"))
            .bind(ns)
            .bind(queue)
            .bind(now)
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await?;
        let mut picked: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
        let waits: Vec<f64> = picked.iter().map(|t| (now - t.available_time) as f64 / 1e6).collect();
        // Run tasks in a fixed order; a run that has ended gets its task cancelled instead.
        picked.sort_by_key(|t| (t.task.run_id, t.task.id));
        let mut leased = Vec::with_capacity(picked.len());
        let mut runs: HashMap<Uuid, Run> = HashMap::new();
        for row in picked {
            if let Some(run_id) = row.task.run_id {
                if let std::collections::hash_map::Entry::Vacant(slot) = runs.entry(run_id) {
                    slot.insert(fetch_run(&mut tx, run_id).await?);
                }
                if runs.get(&run_id).is_some_and(|r| r.status.is_terminal()) {
                    cancel_straggler(&mut tx, &mut out, &row).await?;
                    continue;
                }
            }
            let token = lease_task(&mut tx, row.task.id, worker, lease_ms, true).await?;
            sqlx::query(
                "INSERT INTO task_attempts (task_id, attempt, worker_id, status, start_time) VALUES (?1, ?2, ?3, 3, ?4) \
                 ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = excluded.worker_id, start_time = excluded.start_time",
            )
            .bind(row.task.id)
            .bind(row.task.attempt + 1)
            .bind(worker)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            // One read of the leased task serves both the run's event log and the answer.
            let task = if row.task.run_id.is_some() {
                task_event(&mut tx, &mut out, row.task.id).await?
            } else {
                fetch_task(&mut tx, row.task.id).await?
            };
            leased.push(LeasedTask { task, lease_token: token });
        }
        if !leased.is_empty() {
            let ids: Vec<Uuid> = leased.iter().map(|l| l.task.id).collect();
            record_call(&mut tx, audit, &ids).await?;
        }
        self.commit_with(tx, out).await?;
        for w in waits {
            metrics().claim_waited(queue, w);
        }
        Ok(leased)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "heartbeat"))]
    async fn heartbeat(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        lease_ms: Option<i64>,
        progress: Option<&Value>,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let row = find_task(&mut tx, ns, id).await?.ok_or_else(|| Error::not_found("task", id.to_string()))?;
        if row.task.status == TaskStatus::Cancelled && row.lease_token == Some(token) {
            return Err(aborted(id));
        }
        if row.task.status != TaskStatus::Leased || row.lease_token != Some(token) || lease_expired(&row) {
            return Err(stale(id));
        }
        if let Some(run) = run_of(&mut tx, &row).await?
            && run.status.is_terminal()
        {
            cancel_straggler(&mut tx, &mut out, &row).await?;
            self.commit_with(tx, out).await?;
            return Err(aborted(id));
        }
        let lease_ms = lease_ms.or(row.lease_duration_ms).unwrap_or(30_000);
        let now = now_micros();
        // The lease never outlives the attempt's deadline.
        let expire = after_ms(now, lease_ms).min(row.attempt_deadline.unwrap_or(i64::MAX));
        sqlx::query(
            "UPDATE tasks SET lease_expire_time = ?2, progress = coalesce(?3, progress), update_time = ?4 WHERE id = ?1",
        )
        .bind(id)
        .bind(expire)
        .bind(progress.map(Json))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let task = fetch_task(&mut tx, id).await?;
        record_call(&mut tx, audit, &[id]).await?;
        self.commit_with(tx, out).await?;
        Ok(task)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "complete_task"))]
    async fn complete_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        output: &Value,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        self.worker_outcome(ns, id, token, Ok(output.clone()), audit).await
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "fail_task"))]
    async fn fail_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        error: &str,
        retryable: bool,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        self.worker_outcome(ns, id, token, Err((error.to_string(), retryable)), audit).await
    }

    async fn expire_leases(&self, limit: usize) -> Result<usize> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let now = now_micros();
        let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} {EXPIRED_FROM}"))
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let mut rows: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
        rows.sort_by_key(|t| (t.task.run_id, t.task.id));
        let n = rows.len();
        for row in rows {
            let run = run_of(&mut tx, &row).await?;
            if run.as_ref().is_some_and(|r| r.status.is_terminal()) {
                cancel_straggler(&mut tx, &mut out, &row).await?;
                continue;
            }
            let why = if row.attempt_deadline.is_some_and(|d| d < now) {
                "attempt timed out"
            } else {
                "lease expired (the worker stopped heartbeating)"
            };
            finish_attempt(&mut tx, &mut out, &row, run.as_ref(), &Err((why.to_string(), true))).await?;
        }
        self.commit_with(tx, out).await?;
        Ok(n)
    }

    async fn time_out_runs(&self, limit: usize) -> Result<usize> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let rows = sqlx::query(&format!("SELECT {RUN_COLUMNS} {OVERDUE_FROM}"))
            .bind(now_micros())
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let n = rows.len();
        for row in &rows {
            let run = run_from_row(row)?;
            end_run(&mut tx, &mut out, &run, RunStatus::TimedOut, "the run exceeded its timeout").await?;
        }
        self.commit_with(tx, out).await?;
        Ok(n)
    }

    async fn lease_server_steps(&self, limit: usize, lease_ms: i64) -> Result<Vec<ServerStep>> {
        let mut tx = self.writer().begin().await?;
        let mut out = Outbox::default();
        let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} {ENGINE_FROM}"))
            .bind(now_micros())
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let mut rows: Vec<TaskRow> = rows.iter().map(task_from_row).collect::<Result<_>>()?;
        rows.sort_by_key(|t| (t.task.run_id, t.task.id));
        let mut steps = Vec::new();
        for row in rows {
            let run = run_of(&mut tx, &row).await?;
            if run.as_ref().is_some_and(|r| r.status.is_terminal()) {
                cancel_straggler(&mut tx, &mut out, &row).await?;
                continue;
            }
            let token = lease_task(&mut tx, row.task.id, ENGINE_WORKER, lease_ms, false).await?;
            sqlx::query(
                "INSERT INTO task_attempts (task_id, attempt, worker_id, status, start_time) VALUES (?1, ?2, ?3, 3, ?4) \
                 ON CONFLICT (task_id, attempt) DO NOTHING",
            )
            .bind(row.task.id)
            .bind(row.task.attempt + 1)
            .bind(ENGINE_WORKER)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            let task = task_event(&mut tx, &mut out, row.task.id).await?;
            steps.push(ServerStep {
                leased: LeasedTask { task, lease_token: token },
                config: row.config,
                created_by: row.created_by,
                trace_parent: run.and_then(|r| r.trace_parent),
            });
        }
        self.commit_with(tx, out).await?;
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use serde_json::json;
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::{
        config::Config,
        store::{Backend, identity::AuditEvent},
        workflow::Step,
    };

    const NS: &str = "default";

    /// A migrated store in a fresh directory, removed afterwards.
    struct TestStore {
        store: SqliteStore,
        dir: PathBuf,
    }

    impl Drop for TestStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl std::ops::Deref for TestStore {
        type Target = SqliteStore;
        fn deref(&self) -> &SqliteStore {
            &self.store
        }
    }

    async fn open() -> TestStore {
        let dir = std::env::temp_dir().join(format!("tmws-sqlite-wf-{}", Uuid::now_v7()));
        let url = format!("sqlite://{}/t.db", dir.display());
        let cfg = Config::from_lookup(|k| (k == "TMWS_DATABASE_URL").then(|| url.clone())).expect("config");
        let store = SqliteStore::open(&cfg, true).await.expect("open");
        store.migrate().await.expect("migrate");
        TestStore { store, dir }
    }

    fn audit(method: &str) -> AuditEvent {
        AuditEvent {
            id: Uuid::now_v7(),
            time: None,
            agent_id: Some("alice".into()),
            namespace: Some(NS.into()),
            method: format!("tmws.v1.WorkflowService/{method}"),
            resource_id: None,
            code: "OK".into(),
            peer: None,
            request_id: None,
            detail: None,
        }
    }

    /// Audit rows of `method`: their resource ids.
    async fn audited(s: &SqliteStore, method: &str) -> Vec<Option<String>> {
        sqlx::query_scalar("SELECT resource_id FROM audit_events WHERE method = ?1 ORDER BY time, id")
            .bind(format!("tmws.v1.WorkflowService/{method}"))
            .fetch_all(s.reader())
            .await
            .expect("audit rows")
    }

    fn step(id: &str, kind: StepKind, deps: &[&str]) -> Step {
        Step {
            id: id.into(),
            kind,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            queue: if kind == StepKind::Task { "work".into() } else { String::new() },
            config: json!({}),
            retry_policy: None,
            timeout_ms: None,
            condition: Condition::AllSucceeded,
            priority: Priority::Normal,
        }
    }

    fn task(id: &str, deps: &[&str]) -> Step {
        step(id, StepKind::Task, deps)
    }

    /// Retries without waiting.
    const NO_BACKOFF: RetryPolicy =
        RetryPolicy { max_attempts: 3, initial_backoff_ms: 0, max_backoff_ms: 0, multiplier: 2.0 };

    async fn create_in(s: &SqliteStore, ns: &str, name: &str, steps: Vec<Step>) -> Workflow {
        let def = Definition { steps, retry_policy: None, timeout_ms: None };
        s.create_workflow(ns, name, "", &def, &HashMap::new(), "alice", None, Some(&audit("CreateWorkflow")))
            .await
            .expect("create workflow")
    }

    async fn create(s: &SqliteStore, name: &str, steps: Vec<Step>) -> Workflow {
        create_in(s, NS, name, steps).await
    }

    async fn start(s: &SqliteStore, wf: &Workflow, input: Value) -> Run {
        s.start_run(wf, &input, NO_BACKOFF, None, "alice", None, None, Some(&audit("StartRun"))).await.expect("start")
    }

    async fn claim_in(s: &SqliteStore, queue: &str, worker: &str, max: usize, lease_ms: i64) -> Vec<LeasedTask> {
        s.claim_tasks(NS, queue, worker, max, lease_ms, Some(&audit("ClaimTasks"))).await.expect("claim")
    }

    async fn claim(s: &SqliteStore, max: usize) -> Vec<LeasedTask> {
        claim_in(s, "work", "w1", max, 30_000).await
    }

    async fn complete(s: &SqliteStore, l: &LeasedTask, output: Value) -> Result<Task> {
        s.complete_task(NS, l.task.id, l.lease_token, &output, Some(&audit("CompleteTask"))).await
    }

    async fn fail(s: &SqliteStore, l: &LeasedTask, error: &str, retryable: bool) -> Result<Task> {
        s.fail_task(NS, l.task.id, l.lease_token, error, retryable, Some(&audit("FailTask"))).await
    }

    async fn run(s: &SqliteStore, id: Uuid) -> Run {
        s.get_run(NS, id).await.expect("get run").expect("run exists")
    }

    fn step_of<'a>(run: &'a Run, id: &str) -> &'a Task {
        run.tasks.iter().find(|t| t.step_id.as_deref() == Some(id)).expect("step")
    }

    fn step_ids(leased: &[LeasedTask]) -> Vec<String> {
        leased.iter().map(|l| l.task.step_id.clone().unwrap_or_default()).collect()
    }

    async fn events(s: &SqliteStore, run_id: Uuid) -> Vec<RunEvent> {
        s.run_events(run_id, 0, 1000).await.expect("events")
    }

    fn describe(events: &[RunEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.payload {
                EventPayload::RunStatus(s) => format!("run:{s:?}"),
                EventPayload::Task(t) => format!("{}:{:?}", t.step_id.as_deref().unwrap_or("?"), t.status),
            })
            .collect()
    }

    async fn column(s: &SqliteStore, col: &str, id: Uuid) -> Option<i64> {
        sqlx::query_scalar(&format!("SELECT {col} FROM tasks WHERE id = ?1"))
            .bind(id)
            .fetch_one(s.reader())
            .await
            .expect("task column")
    }

    /// Everything delivered so far.
    fn drain(rx: &mut tokio::sync::broadcast::Receiver<Notification>) -> Vec<Notification> {
        let mut notes = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(n) => notes.push(n),
                Err(TryRecvError::Empty) => return notes,
                Err(e) => panic!("notifier: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn workflow_versions_idempotency_paging_and_delete() {
        let s = open().await;
        let labels: HashMap<String, String> = [("team".to_string(), "core".to_string())].into();
        let def = Definition { steps: vec![task("a", &[])], retry_policy: Some(NO_BACKOFF), timeout_ms: Some(60_000) };
        let mut made = Vec::new();
        for _ in 0..3 {
            let wf = s
                .create_workflow(NS, "flow", "three", &def, &labels, "alice", None, Some(&audit("CreateWorkflow")))
                .await
                .expect("create");
            made.push(wf);
        }
        assert_eq!(made.iter().map(|w| w.version).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(made[0].definition, def, "the definition round-trips");
        assert_eq!(made[0].labels, labels);

        // A retried request gets the first result; the same request id of another caller does not.
        let first = s.create_workflow(NS, "flow", "", &def, &labels, "alice", Some("r1"), None).await.expect("r1");
        let again = s.create_workflow(NS, "flow", "", &def, &labels, "alice", Some("r1"), None).await.expect("again");
        assert_eq!((first.id, first.version), (again.id, 4));
        let bobs = s.create_workflow(NS, "flow", "", &def, &labels, "bob", Some("r1"), None).await.expect("bob");
        assert_eq!(bobs.version, 5);

        // Concurrent creates of one name get consecutive versions.
        let calls = (0..4).map(|_| create(&s, "raced", vec![task("a", &[])]));
        let mut versions: Vec<i32> = futures_util::future::join_all(calls).await.iter().map(|w| w.version).collect();
        versions.sort_unstable();
        assert_eq!(versions, vec![1, 2, 3, 4]);

        let latest = s.get_workflow_by_name(NS, "flow", None).await.expect("get").expect("latest");
        assert_eq!(latest.version, 5);
        let v1 = s.get_workflow_by_name(NS, "flow", Some(1)).await.expect("get").expect("v1");
        assert_eq!(v1.id, made[0].id);
        assert_eq!(s.get_workflow(NS, made[1].id).await.expect("get").map(|w| w.version), Some(2));
        assert!(s.get_workflow("elsewhere", made[1].id).await.expect("get").is_none(), "namespaces are separate");
        assert!(s.get_workflow_by_name(NS, "flow", Some(9)).await.expect("get").is_none());

        let latest_only = s.list_workflows(NS, None, true, None, 10).await.expect("list");
        let mut names: Vec<(String, i32)> = latest_only.iter().map(|w| (w.name.clone(), w.version)).collect();
        names.sort();
        assert_eq!(names, vec![("flow".into(), 5), ("raced".into(), 4)]);

        // Pages of two, newest first, cover every version of "flow" once.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = s.list_workflows(NS, Some("flow"), false, after, 2).await.expect("page");
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some((last.create_time.timestamp_micros(), last.id));
            seen.extend(page.iter().map(|w| w.version));
        }
        assert_eq!(seen, vec![5, 4, 3, 2, 1]);

        // Deleting hides a version; the previous one becomes the latest.
        assert!(s.delete_workflow(NS, bobs.id, Some(&audit("DeleteWorkflow"))).await.expect("delete"));
        assert!(!s.delete_workflow(NS, bobs.id, Some(&audit("DeleteWorkflow"))).await.expect("delete again"));
        assert!(!s.delete_workflow("elsewhere", first.id, None).await.expect("other namespace"));
        assert!(s.get_workflow(NS, bobs.id).await.expect("get").is_none());
        let latest = s.get_workflow_by_name(NS, "flow", None).await.expect("get").expect("latest");
        assert_eq!(latest.version, 4);
        let listed = s.list_workflows(NS, Some("flow"), true, None, 10).await.expect("list");
        assert_eq!(listed.iter().map(|w| w.version).collect::<Vec<_>>(), vec![4]);
        // A version number is never reused.
        assert_eq!(create(&s, "flow", vec![task("a", &[])]).await.version, 6);

        // Audited in the transaction: each audited create and the one successful delete.
        assert_eq!(audited(&s, "CreateWorkflow").await.len(), 3 + 4 + 1);
        assert_eq!(audited(&s, "DeleteWorkflow").await, vec![Some(bobs.id.to_string())]);
    }

    #[tokio::test]
    async fn a_diamond_runs_in_dependency_order_with_a_complete_event_log() {
        let s = open().await;
        let wf =
            create(&s, "diamond", vec![task("a", &[]), task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])])
                .await;
        let r = start(&s, &wf, json!({"topic": "rust"})).await;
        assert_eq!(r.status, RunStatus::Running);
        assert_eq!(r.tasks.len(), 4);
        assert_eq!(
            r.tasks.iter().map(|t| t.step_id.clone().unwrap_or_default()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(step_of(&r, "a").status, TaskStatus::Queued);
        assert_eq!(step_of(&r, "a").input, json!({"input": {"topic": "rust"}, "parents": {}}));
        assert_eq!(step_of(&r, "d").status, TaskStatus::Blocked);
        assert_eq!(step_of(&r, "d").depends_on, vec![step_of(&r, "b").id, step_of(&r, "c").id]);
        assert_eq!(step_of(&r, "a").title, "diamond/a");
        assert!(r.start_time.is_some() && r.deadline.is_none());
        assert_eq!(r.last_sequence, 2, "the run started and its root was queued");

        let a = claim(&s, 10).await;
        assert_eq!(step_ids(&a), ["a"], "only the root is claimable");
        assert_eq!(a[0].task.status, TaskStatus::Leased);
        assert_eq!(a[0].task.attempt, 1);
        assert_eq!(a[0].task.attempts.len(), 1);
        assert_eq!(a[0].task.attempts[0].status, TaskStatus::Leased);
        assert_eq!(a[0].task.attempts[0].worker_id, "w1");
        let done = complete(&s, &a[0], json!({"from": "a"})).await.expect("complete a");
        assert_eq!(done.status, TaskStatus::Succeeded);
        assert_eq!(done.attempts[0].status, TaskStatus::Succeeded);
        assert!(done.attempts[0].end_time.is_some());

        let bc = claim(&s, 10).await;
        assert_eq!(step_ids(&bc), ["b", "c"]);
        assert_eq!(bc[0].task.input["parents"]["a"], json!({"from": "a"}));
        assert_eq!(bc[0].task.input["input"]["topic"], "rust");
        complete(&s, &bc[0], json!({"from": "b"})).await.expect("complete b");
        assert!(claim(&s, 10).await.is_empty(), "d waits for c");
        assert_eq!(step_of(&run(&s, r.id).await, "d").status, TaskStatus::Blocked);
        complete(&s, &bc[1], json!({"from": "c"})).await.expect("complete c");

        let d = claim(&s, 10).await;
        assert_eq!(step_ids(&d), ["d"]);
        assert_eq!(d[0].task.input["parents"], json!({"b": {"from": "b"}, "c": {"from": "c"}}));
        complete(&s, &d[0], json!({"from": "d"})).await.expect("complete d");

        let r = run(&s, r.id).await;
        assert_eq!(r.status, RunStatus::Succeeded);
        assert_eq!(r.output, Some(json!({"d": {"from": "d"}})), "the run's output is its leaves' outputs");
        assert_eq!(r.error, "");
        assert!(r.end_time.is_some());
        assert!(r.tasks.iter().all(|t| t.status == TaskStatus::Succeeded && t.attempts.len() == 1));

        let log = events(&s, r.id).await;
        assert_eq!(
            describe(&log),
            [
                "run:Running",
                "a:Queued",
                "a:Leased",
                "a:Succeeded",
                "b:Queued",
                "c:Queued",
                "b:Leased",
                "c:Leased",
                "b:Succeeded",
                "c:Succeeded",
                "d:Queued",
                "d:Leased",
                "d:Succeeded",
                "run:Succeeded"
            ]
        );
        let seqs: Vec<i64> = log.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, (1..=14).collect::<Vec<_>>(), "sequences are 1, 2, ... without gaps");
        assert_eq!(r.last_sequence, 14);
        assert!(log.windows(2).all(|w| w[0].time <= w[1].time));
        if let EventPayload::Task(t) = &log[3].payload {
            assert_eq!(t.output, Some(json!({"from": "a"})), "a task event carries the task's state");
            assert!(t.attempts.is_empty(), "events carry no attempts");
        }
        // Resuming after a sequence returns only what came after it, up to the limit.
        let tail = s.run_events(r.id, 12, 100).await.expect("tail");
        assert_eq!(describe(&tail), ["d:Succeeded", "run:Succeeded"]);
        let page = s.run_events(r.id, 3, 2).await.expect("page");
        assert_eq!(page.iter().map(|e| e.sequence).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(audited(&s, "ClaimTasks").await.len(), 3, "empty claims are not audited");
        assert_eq!(audited(&s, "CompleteTask").await.len(), 4);
    }

    #[tokio::test]
    async fn failures_retry_after_a_growing_backoff_then_fail_the_run_and_run_compensation() {
        let s = open().await;
        let mut charge = task("charge", &[]);
        charge.retry_policy =
            Some(RetryPolicy { max_attempts: 3, initial_backoff_ms: 250, max_backoff_ms: 1000, multiplier: 2.0 });
        let mut refund = task("refund", &["charge"]);
        refund.queue = "compensation".into();
        refund.condition = Condition::AnyFailed;
        let ship = task("ship", &["charge"]);
        let mut notify = step("notify", StepKind::Noop, &["ship", "refund"]);
        notify.condition = Condition::Always;
        let wf = create(&s, "order", vec![charge, refund, ship, notify]).await;
        let r = start(&s, &wf, json!({})).await;

        let mut tokens = Vec::new();
        for (attempt, backoff_ms) in [(1, Some(250)), (2, Some(500)), (3, None)] {
            let mut l = claim(&s, 1).await;
            for _ in 0..40 {
                if !l.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
                l = claim(&s, 1).await;
            }
            assert_eq!(l.len(), 1, "attempt {attempt}");
            assert_eq!(l[0].task.attempt, attempt);
            tokens.push(l[0].lease_token);
            let t = fail(&s, &l[0], "card declined", true).await.expect("fail");
            assert_eq!(t.error, "card declined");
            match backoff_ms {
                Some(ms) => {
                    assert_eq!(t.status, TaskStatus::Queued, "attempt {attempt} is retried");
                    let available = column(&s, "available_time", t.id).await.expect("available");
                    let updated = micros(t.update_time);
                    assert_eq!(available - updated, ms * 1000, "the backoff grows: {ms} ms");
                    assert!(claim(&s, 1).await.is_empty(), "not before the backoff ends");
                    assert!(column(&s, "lease_token", t.id).await.is_none());
                }
                None => assert_eq!(t.status, TaskStatus::Failed, "the attempts are used up"),
            }
        }
        assert_eq!(tokens.iter().collect::<HashSet<_>>().len(), 3, "every lease has its own token");

        let comp = claim_in(&s, "compensation", "w2", 5, 30_000).await;
        assert_eq!(step_ids(&comp), ["refund"], "the compensation step is queued");
        let mid = run(&s, r.id).await;
        assert_eq!(step_of(&mid, "ship").status, TaskStatus::Skipped);
        assert_eq!(step_of(&mid, "ship").error, "condition not met");
        assert_eq!(step_of(&mid, "notify").status, TaskStatus::Blocked);
        complete(&s, &comp[0], json!({"refunded": true})).await.expect("complete refund");

        // The NOOP step runs in the engine.
        let steps = s.lease_server_steps(10, 60_000).await.expect("lease steps");
        assert_eq!(steps.len(), 1);
        let noop = &steps[0].leased;
        assert_eq!(noop.task.step_id.as_deref(), Some("notify"));
        assert_eq!(noop.task.worker_id, ENGINE_WORKER);
        assert_eq!(steps[0].created_by, "alice");
        s.complete_task(NS, noop.task.id, noop.lease_token, &json!({}), None).await.expect("complete noop");

        let r = run(&s, r.id).await;
        assert_eq!(r.status, RunStatus::Failed);
        assert_eq!(r.error, "step charge: card declined");
        let charge = step_of(&r, "charge");
        assert_eq!(charge.status, TaskStatus::Failed);
        assert_eq!(charge.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(charge.attempts.iter().all(|a| a.status == TaskStatus::Failed && a.error == "card declined"));
        assert_eq!(step_of(&r, "refund").status, TaskStatus::Succeeded);
        assert_eq!(step_of(&r, "notify").status, TaskStatus::Succeeded);
        assert_eq!(describe(&events(&s, r.id).await).last().map(String::as_str), Some("run:Failed"));

        // The last failure, repeated with its token, is answered with the record; a completion is stale.
        let last = LeasedTask { task: charge.clone(), lease_token: tokens[2] };
        let again = fail(&s, &last, "something else", true).await.expect("idempotent");
        assert_eq!((again.status, again.error.as_str(), again.attempt), (TaskStatus::Failed, "card declined", 3));
        assert!(matches!(complete(&s, &last, json!({})).await, Err(Error::FailedPrecondition(_))));
        let older = LeasedTask { task: charge.clone(), lease_token: tokens[0] };
        assert!(matches!(fail(&s, &older, "x", true).await, Err(Error::FailedPrecondition(_))));

        // retryable = false skips the remaining attempts.
        let once = create(&s, "once", vec![task("x", &[])]).await;
        let r = start(&s, &once, json!({})).await;
        let l = claim(&s, 1).await;
        let t = fail(&s, &l[0], "bad input", false).await.expect("fail");
        assert_eq!((t.status, t.attempt), (TaskStatus::Failed, 1));
        assert_eq!(run(&s, r.id).await.status, RunStatus::Failed);
    }

    #[tokio::test]
    async fn expired_leases_and_attempt_timeouts_are_retried() {
        let s = open().await;
        let wf = create(&s, "one", vec![task("only", &[])]).await;
        let r = start(&s, &wf, json!({})).await;
        let first = claim_in(&s, "work", "doomed", 1, 300).await;
        assert_eq!(first.len(), 1);
        assert!(claim(&s, 1).await.is_empty(), "a leased task is not handed out twice");
        assert_eq!(s.expire_leases(100).await.expect("expire"), 0, "the lease is still live");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let hb = s.heartbeat(NS, first[0].task.id, first[0].lease_token, None, None, None).await;
        assert!(matches!(hb, Err(Error::FailedPrecondition(_))), "an expired lease cannot be extended: {hb:?}");

        assert_eq!(s.expire_leases(100).await.expect("expire"), 1);
        let t = s.get_task(NS, first[0].task.id).await.expect("get").expect("task");
        assert_eq!((t.status, t.attempt), (TaskStatus::Queued, 1));
        assert!(t.error.contains("lease expired"), "{}", t.error);
        assert_eq!(s.expire_leases(100).await.expect("expire"), 0);

        let second = claim_in(&s, "work", "survivor", 1, 30_000).await;
        assert_eq!(second.len(), 1, "the task came back");
        assert_eq!(second[0].task.attempt, 2);
        assert_ne!(second[0].lease_token, first[0].lease_token);
        let late = complete(&s, &first[0], json!({"late": true})).await;
        assert!(matches!(late, Err(Error::FailedPrecondition(_))), "{late:?}");
        let done = complete(&s, &second[0], json!({"ok": true})).await.expect("complete");
        assert_eq!(done.attempts.len(), 2);
        assert_eq!(done.attempts[0].status, TaskStatus::Failed);
        assert_eq!(done.attempts[0].worker_id, "doomed");
        assert!(done.attempts[0].error.contains("lease expired"));
        assert_eq!(done.attempts[1].status, TaskStatus::Succeeded);
        assert_eq!(done.attempts[1].worker_id, "survivor");
        // A duplicate completion is answered with the recorded output.
        let again = complete(&s, &second[0], json!({"ok": "different"})).await.expect("idempotent");
        assert_eq!(again.output, Some(json!({"ok": true})));
        assert_eq!(run(&s, r.id).await.status, RunStatus::Succeeded);
        let log = describe(&events(&s, r.id).await);
        assert_eq!(
            log,
            [
                "run:Running",
                "only:Queued",
                "only:Leased",
                "only:Queued",
                "only:Leased",
                "only:Succeeded",
                "run:Succeeded"
            ]
        );

        // An attempt timeout ends the attempt even while the lease is extended.
        let mut slow = task("slow", &[]);
        slow.timeout_ms = Some(300);
        let wf = create(&s, "timed", vec![slow]).await;
        start(&s, &wf, json!({})).await;
        let l = claim(&s, 1).await;
        let deadline = column(&s, "attempt_deadline", l[0].task.id).await.expect("deadline");
        let hb = s.heartbeat(NS, l[0].task.id, l[0].lease_token, Some(60_000), None, None).await.expect("heartbeat");
        assert_eq!(hb.lease_expire_time.map(micros), Some(deadline), "the lease stops at the attempt deadline");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(s.expire_leases(100).await.expect("expire"), 1);
        let t = s.get_task(NS, l[0].task.id).await.expect("get").expect("task");
        assert_eq!(t.attempts[0].error, "attempt timed out");
        assert_eq!(t.status, TaskStatus::Queued);
        assert!(column(&s, "attempt_deadline", t.id).await.is_none());
    }

    #[tokio::test]
    async fn cancel_stops_queued_work_and_aborts_the_leased_task() {
        let s = open().await;
        let wf = create(&s, "long", vec![task("a", &[]), task("b", &[]), task("c", &["a"])]).await;
        let r = start(&s, &wf, json!({})).await;
        let leased = claim(&s, 1).await;
        assert_eq!(step_ids(&leased), ["a"]);

        let cancelled = s.cancel_run(NS, r.id, "operator said so", Some(&audit("CancelRun"))).await.expect("cancel");
        assert_eq!(cancelled.status, RunStatus::Cancelled);
        assert_eq!(cancelled.error, "operator said so");
        assert!(cancelled.end_time.is_some());
        assert!(cancelled.tasks.iter().all(|t| t.status == TaskStatus::Cancelled), "{:?}", cancelled.tasks);
        let a = step_of(&cancelled, "a");
        assert_eq!(a.attempts.len(), 1);
        assert_eq!(a.attempts[0].status, TaskStatus::Cancelled);
        assert!(a.attempts[0].end_time.is_some());
        assert!(claim(&s, 10).await.is_empty(), "no queued work remains");
        assert_eq!(audited(&s, "CancelRun").await, vec![Some(r.id.to_string())]);

        let hb = s.heartbeat(NS, a.id, leased[0].lease_token, None, None, None).await;
        assert!(matches!(hb, Err(Error::Aborted(_))), "{hb:?}");
        assert!(matches!(complete(&s, &leased[0], json!({})).await, Err(Error::Aborted(_))));
        assert!(matches!(fail(&s, &leased[0], "x", true).await, Err(Error::Aborted(_))));
        let wrong = LeasedTask { task: leased[0].task.clone(), lease_token: Uuid::now_v7() };
        assert!(matches!(complete(&s, &wrong, json!({})).await, Err(Error::FailedPrecondition(_))));

        let again = s.cancel_run(NS, r.id, "", None).await;
        assert!(matches!(again, Err(Error::FailedPrecondition(_))), "{again:?}");
        let missing = s.cancel_run(NS, Uuid::now_v7(), "", None).await;
        assert!(matches!(missing, Err(Error::NotFound { resource: "run", .. })), "{missing:?}");
        let elsewhere = s.cancel_run("elsewhere", r.id, "", None).await;
        assert!(matches!(elsewhere, Err(Error::NotFound { .. })));

        let log = describe(&events(&s, r.id).await);
        assert_eq!(
            log,
            [
                "run:Running",
                "a:Queued",
                "b:Queued",
                "a:Leased",
                "a:Cancelled",
                "b:Cancelled",
                "c:Cancelled",
                "run:Cancelled"
            ]
        );
        // An empty reason reads "cancelled".
        let r2 = start(&s, &wf, json!({})).await;
        assert_eq!(s.cancel_run(NS, r2.id, "", None).await.expect("cancel").error, "cancelled");
    }

    #[tokio::test]
    async fn runs_time_out_and_their_leased_tasks_are_aborted() {
        let s = open().await;
        let wf = create(&s, "slow", vec![task("a", &[]), task("b", &["a"])]).await;
        let r = s.start_run(&wf, &json!({}), NO_BACKOFF, Some(300), "alice", None, None, None).await.expect("start");
        let deadline = r.deadline.expect("deadline");
        assert_eq!((deadline - r.start_time.expect("start")).num_milliseconds(), 300);
        let untimed = start(&s, &wf, json!({})).await;
        let leased = claim(&s, 1).await;
        assert_eq!(leased[0].task.run_id, Some(r.id));
        assert_eq!(s.time_out_runs(50).await.expect("time out"), 0, "not yet");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(s.time_out_runs(50).await.expect("time out"), 1);
        assert_eq!(s.time_out_runs(50).await.expect("time out"), 0, "once");

        let ended = run(&s, r.id).await;
        assert_eq!(ended.status, RunStatus::TimedOut);
        assert_eq!(ended.error, "the run exceeded its timeout");
        assert!(ended.tasks.iter().all(|t| t.status == TaskStatus::Cancelled));
        assert_eq!(describe(&events(&s, r.id).await).last().map(String::as_str), Some("run:TimedOut"));
        let err = complete(&s, &leased[0], json!({})).await;
        assert!(matches!(err, Err(Error::Aborted(_))), "{err:?}");
        assert_eq!(run(&s, untimed.id).await.status, RunStatus::Running, "a run without a deadline runs on");
    }

    #[tokio::test]
    async fn start_run_is_idempotent_by_request_id() {
        let s = open().await;
        let wf =
            create(&s, "research", vec![task("research", &[]), step("remember", StepKind::MemoryWrite, &["research"])])
                .await;
        let go = |rid: &'static str, wf: Workflow| {
            let s = s.store.clone();
            async move {
                s.start_run(
                    &wf,
                    &json!({"q": "why"}),
                    NO_BACKOFF,
                    None,
                    "alice",
                    Some(rid),
                    None,
                    Some(&audit("StartRun")),
                )
                .await
                .expect("start")
            }
        };
        let a = go("start-1", wf.clone()).await;
        let b = go("start-1", wf.clone()).await;
        assert_eq!(a.id, b.id, "the same request id returns the same run");
        assert_eq!(b.request_id.as_deref(), Some("start-1"));
        assert_eq!(a.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), b.tasks.iter().map(|t| t.id).collect::<Vec<_>>());
        assert_eq!(b.last_sequence, a.last_sequence, "a retry appends nothing");
        let c = go("start-2", wf.clone()).await;
        assert_ne!(c.id, a.id);
        let runs = s.list_runs(NS, &RunFilter::default(), None, 10).await.expect("list");
        assert_eq!(runs.len(), 2);
        assert_eq!(audited(&s, "StartRun").await.len(), 2, "the retry is not audited again");
        assert_eq!(claim(&s, 10).await.len(), 2, "one task per run, not per call");

        // Request ids are per namespace.
        let other = create_in(&s, "other", "research", vec![task("research", &[])]).await;
        let d = go("start-1", other).await;
        assert_ne!(d.id, a.id);
        assert_eq!(d.namespace, "other");
    }

    #[tokio::test]
    async fn runs_and_tasks_list_newest_first_in_pages_with_filters() {
        let s = open().await;
        let wf = create(&s, "pager", vec![task("a", &[])]).await;
        let other = create(&s, "other", vec![task("a", &[])]).await;
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(start(&s, &wf, json!({})).await);
        }
        let odd = start(&s, &other, json!({})).await;
        s.cancel_run(NS, runs[1].id, "", None).await.expect("cancel");

        let mut seen = Vec::new();
        let mut after = None;
        let f = RunFilter { workflow_id: Some(wf.id), ..Default::default() };
        loop {
            let page = s.list_runs(NS, &f, after, 2).await.expect("page");
            let Some(last) = page.last() else { break };
            after = Some((last.create_time.timestamp_micros(), last.id));
            seen.extend(page.iter().map(|r| r.id));
        }
        assert_eq!(seen, runs.iter().rev().map(|r| r.id).collect::<Vec<_>>(), "newest first, each once");
        let all = s.list_runs(NS, &RunFilter::default(), None, 100).await.expect("all");
        assert_eq!(all.len(), 6);
        assert_eq!(all[0].id, odd.id);
        assert!(all.iter().all(|r| r.tasks.is_empty()), "lists carry no tasks");

        let cancelled = RunFilter { statuses: vec![RunStatus::Cancelled], ..Default::default() };
        let listed = s.list_runs(NS, &cancelled, None, 10).await.expect("cancelled");
        assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), [runs[1].id]);
        let live = RunFilter { statuses: vec![RunStatus::Running, RunStatus::Pending], ..Default::default() };
        assert_eq!(s.list_runs(NS, &live, None, 10).await.expect("live").len(), 5);
        let window = RunFilter {
            create_time_after: Some(runs[1].create_time),
            create_time_before: Some(runs[4].create_time),
            ..Default::default()
        };
        let listed = s.list_runs(NS, &window, None, 10).await.expect("window");
        assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), [runs[3].id, runs[2].id]);
        assert!(s.list_runs("elsewhere", &RunFilter::default(), None, 10).await.expect("other").is_empty());

        // Tasks: the same paging and their own filters.
        let mut seen = Vec::new();
        let mut after = None;
        let queued =
            TaskFilter { statuses: vec![TaskStatus::Queued], queue: Some("work".into()), ..Default::default() };
        loop {
            let page = s.list_tasks(NS, &queued, after, 2).await.expect("page");
            let Some(last) = page.last() else { break };
            after = Some((last.create_time.timestamp_micros(), last.id));
            seen.extend(page.iter().map(|t| t.run_id));
        }
        let expected: Vec<Option<Uuid>> =
            [odd.id, runs[4].id, runs[3].id, runs[2].id, runs[0].id].into_iter().map(Some).collect();
        assert_eq!(seen, expected);
        let by_run = TaskFilter { run_id: Some(runs[2].id), ..Default::default() };
        let listed = s.list_tasks(NS, &by_run, None, 10).await.expect("by run");
        assert_eq!(listed.len(), 1);
        let l = claim(&s, 1).await;
        let leased = TaskFilter { statuses: vec![TaskStatus::Leased], ..Default::default() };
        let listed = s.list_tasks(NS, &leased, None, 10).await.expect("leased");
        assert_eq!(listed.iter().map(|t| t.id).collect::<Vec<_>>(), [l[0].task.id]);
        assert_eq!(listed[0].attempts.len(), 1, "lists carry attempts");
        let high = TaskFilter { min_priority: Some(Priority::High), ..Default::default() };
        assert!(s.list_tasks(NS, &high, None, 10).await.expect("high").is_empty());
        let normal = TaskFilter { min_priority: Some(Priority::Normal), ..Default::default() };
        assert_eq!(s.list_tasks(NS, &normal, None, 10).await.expect("normal").len(), 6);
        let wrong_queue = TaskFilter { queue: Some("nope".into()), ..Default::default() };
        assert!(s.list_tasks(NS, &wrong_queue, None, 10).await.expect("queue").is_empty());
    }

    fn new_task(title: &str, queue: &str, priority: Priority, deps: Vec<Uuid>) -> NewTask {
        NewTask {
            id: Uuid::now_v7(),
            namespace: NS.into(),
            title: title.into(),
            description: String::new(),
            queue: queue.into(),
            priority,
            depends_on: deps,
            retry: NO_BACKOFF,
            timeout_ms: None,
            input: json!({"title": title}),
            due_time: None,
            created_by: "alice".into(),
            request_id: None,
        }
    }

    #[tokio::test]
    async fn standalone_tasks_with_dependencies_priorities_and_heartbeats() {
        let s = open().await;
        let add = |t: NewTask| {
            let s = s.store.clone();
            async move { s.create_task(&t, Some(&audit("CreateTask"))).await }
        };
        let low = add(new_task("low", "jobs", Priority::Low, vec![])).await.expect("low");
        let crit = add(new_task("critical", "jobs", Priority::Critical, vec![])).await.expect("crit");
        assert_eq!((crit.status, crit.kind, crit.run_id), (TaskStatus::Queued, StepKind::Task, None));
        let child = add(new_task("child", "jobs", Priority::High, vec![crit.id])).await.expect("child");
        assert_eq!(child.status, TaskStatus::Blocked);
        let grandchild = add(new_task("grandchild", "jobs", Priority::High, vec![child.id])).await.expect("grandchild");
        assert_eq!(grandchild.status, TaskStatus::Blocked);
        let orphan = add(new_task("orphan", "jobs", Priority::Low, vec![low.id, Uuid::now_v7()])).await;
        assert!(matches!(&orphan, Err(Error::InvalidArgument(v)) if v[0].field == "task.depends_on[1]"), "{orphan:?}");
        let twice = add(new_task("twice", "jobs", Priority::Low, vec![low.id, low.id])).await;
        assert!(matches!(&twice, Err(Error::InvalidArgument(v)) if v[0].field == "task.depends_on"), "{twice:?}");
        let mut elsewhere = new_task("elsewhere", "jobs", Priority::Low, vec![low.id]);
        elsewhere.namespace = "other".into();
        assert!(matches!(add(elsewhere).await, Err(Error::InvalidArgument(_))), "dependencies stay in the namespace");

        // Idempotent by request id (per caller).
        let mut once = new_task("once", "side", Priority::Low, vec![]);
        once.request_id = Some("t-1".into());
        let first = add(once.clone()).await.expect("once");
        once.id = Uuid::now_v7();
        let again = add(once).await.expect("again");
        assert_eq!(first.id, again.id);
        assert_eq!(audited(&s, "CreateTask").await.len(), 5, "refused and repeated calls write nothing");

        let got = claim_in(&s, "jobs", "w", 1, 30_000).await;
        assert_eq!(got[0].task.id, crit.id, "priority first");
        let before = got[0].task.lease_expire_time.expect("lease");
        let hb = s
            .heartbeat(NS, crit.id, got[0].lease_token, Some(120_000), Some(&json!({"pct": 50})), Some(&audit("Hb")))
            .await
            .expect("heartbeat");
        assert!(hb.lease_expire_time.expect("lease") > before + chrono::Duration::seconds(60));
        assert_eq!(hb.progress, Some(json!({"pct": 50})));
        let hb = s.heartbeat(NS, crit.id, got[0].lease_token, None, None, None).await.expect("heartbeat");
        assert_eq!(hb.progress, Some(json!({"pct": 50})), "progress is kept when none is sent");
        let wrong = s.heartbeat(NS, crit.id, Uuid::now_v7(), None, None, None).await;
        assert!(matches!(wrong, Err(Error::FailedPrecondition(_))));
        let missing = s.heartbeat(NS, Uuid::now_v7(), got[0].lease_token, None, None, None).await;
        assert!(matches!(missing, Err(Error::NotFound { resource: "task", .. })));
        complete(&s, &got[0], json!({"answer": 42})).await.expect("complete");

        let next = claim_in(&s, "jobs", "w", 1, 30_000).await;
        assert_eq!(next[0].task.id, child.id, "the unblocked child (HIGH) comes before LOW");
        assert_eq!(next[0].task.input["parents"][crit.id.to_string()]["answer"], 42);
        assert_eq!(next[0].task.input["title"], "child");
        let failed = fail(&s, &next[0], "no", false).await.expect("fail");
        assert_eq!(failed.status, TaskStatus::Failed);
        let gc = s.get_task(NS, grandchild.id).await.expect("get").expect("grandchild");
        assert_eq!((gc.status, gc.error.as_str()), (TaskStatus::Skipped, "a dependency did not succeed"));
        // A new task on a failed dependency is skipped at once.
        let late = add(new_task("late", "jobs", Priority::Low, vec![child.id])).await.expect("late");
        assert_eq!(late.status, TaskStatus::Skipped);

        let last = claim_in(&s, "jobs", "w", 5, 30_000).await;
        assert_eq!(last.iter().map(|l| l.task.id).collect::<Vec<_>>(), [low.id]);
        assert!(s.get_task("other", low.id).await.expect("get").is_none());
        let listed = s
            .list_tasks(
                NS,
                &TaskFilter { queue: Some("jobs".into()), statuses: vec![TaskStatus::Leased], ..Default::default() },
                None,
                10,
            )
            .await
            .expect("list");
        assert_eq!(listed.len(), 1);
    }

    #[tokio::test]
    async fn delay_steps_wait_and_server_steps_are_leased_to_the_engine() {
        let s = open().await;
        let mut wait = step("wait", StepKind::Delay, &[]);
        wait.config = json!({"duration": "300ms"});
        let wf = create(&s, "timer", vec![wait, step("after", StepKind::Noop, &["wait"])]).await;
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let r = s.start_run(&wf, &json!({}), NO_BACKOFF, None, "alice", None, Some(tp), None).await.expect("start");
        assert_eq!(r.trace_parent.as_deref(), Some(tp));
        assert!(s.lease_server_steps(10, 60_000).await.expect("lease").is_empty(), "the timer has not fired");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let steps = s.lease_server_steps(10, 60_000).await.expect("lease");
        assert_eq!(steps.len(), 1);
        let st = &steps[0];
        assert_eq!(st.leased.task.kind, StepKind::Delay);
        assert_eq!(st.leased.task.status, TaskStatus::Leased);
        assert_eq!(st.config["duration_ms"], 300);
        assert_eq!((st.created_by.as_str(), st.trace_parent.as_deref()), ("alice", Some(tp)));
        assert_eq!(st.leased.task.attempts[0].worker_id, ENGINE_WORKER);
        assert!(s.lease_server_steps(10, 60_000).await.expect("lease").is_empty(), "leased once");
        assert!(claim(&s, 10).await.is_empty(), "workers never get server-side steps");
        s.complete_task(NS, st.leased.task.id, st.leased.lease_token, &json!({"fired": true}), None)
            .await
            .expect("complete");
        let steps = s.lease_server_steps(10, 60_000).await.expect("lease");
        assert_eq!(steps.iter().map(|s| s.leased.task.step_id.clone()).collect::<Vec<_>>(), [Some("after".into())]);
        assert_eq!(steps[0].leased.task.input["parents"]["wait"]["fired"], true);
        let l = &steps[0].leased;
        s.complete_task(NS, l.task.id, l.lease_token, &json!({}), None).await.expect("complete");
        let r = run(&s, r.id).await;
        assert_eq!(r.status, RunStatus::Succeeded);
        let took = r.end_time.expect("end") - r.start_time.expect("start");
        assert!(took >= chrono::Duration::milliseconds(300), "the timer fired early: {took}");
    }

    #[tokio::test]
    async fn notifications_are_sent_after_commit_and_only_for_committed_changes() {
        let s = open().await;
        let (notifier, handle) = Backend::notifier(&s.store).await.expect("notifier");
        assert!(handle.is_none());
        let mut rx = notifier.subscribe();
        let wf = create(
            &s,
            "mixed",
            vec![task("a", &[]), task("b", &[]), step("n", StepKind::Noop, &[]), task("c", &["a"])],
        )
        .await;
        assert!(drain(&mut rx).is_empty(), "defining a workflow wakes nobody");

        let r = start(&s, &wf, json!({})).await;
        let notes = drain(&mut rx);
        assert_eq!(notes.len(), 3, "duplicates are folded: {notes:?}");
        for n in [
            Notification::Run(r.id),
            Notification::Queue(format!("{NS}/work")),
            Notification::Queue(ENGINE_WAKE.to_string()),
        ] {
            assert!(notes.contains(&n), "{n:?} in {notes:?}");
        }

        // A watcher woken by the notification sees the committed change.
        let mut watch = notifier.subscribe();
        let store = s.store.clone();
        let run_id = r.id;
        let watcher = tokio::spawn(async move {
            loop {
                if let Ok(Notification::Run(id)) = watch.recv().await
                    && id == run_id
                {
                    return store.get_run(NS, run_id).await.expect("get").expect("run");
                }
            }
        });
        let l = claim(&s, 1).await;
        assert_eq!(drain(&mut rx), [Notification::Run(r.id)], "a claim wakes the run's watchers only");
        let seen = watcher.await.expect("watcher");
        assert_eq!(step_of(&seen, "a").status, TaskStatus::Leased);
        assert_eq!(seen.last_sequence, run(&s, r.id).await.last_sequence);

        complete(&s, &l[0], json!({})).await.expect("complete");
        let notes = drain(&mut rx);
        assert!(notes.contains(&Notification::Queue(format!("{NS}/work"))), "c was queued: {notes:?}");
        assert!(notes.contains(&Notification::Run(r.id)));

        // Refused calls change nothing and wake nobody.
        let before = run(&s, r.id).await.last_sequence;
        assert!(complete(&s, &l[0], json!({"again": 1})).await.is_ok(), "a duplicate is answered");
        let wrong = LeasedTask { task: l[0].task.clone(), lease_token: Uuid::now_v7() };
        assert!(complete(&s, &wrong, json!({})).await.is_err());
        assert!(s.cancel_run(NS, Uuid::now_v7(), "", None).await.is_err());
        assert!(drain(&mut rx).is_empty());
        assert_eq!(run(&s, r.id).await.last_sequence, before);

        // Standalone tasks wake their queue.
        s.create_task(&new_task("solo", "jobs", Priority::Normal, vec![]), None).await.expect("task");
        assert_eq!(drain(&mut rx), [Notification::Queue(format!("{NS}/jobs"))]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_fan_out_of_50_with_8_workers_and_the_engine_completes_each_task_once() {
        let s = open().await;
        let mut steps = vec![step("start", StepKind::Noop, &[])];
        let ids: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
        steps.extend(ids.iter().map(|id| task(id, &["start"])));
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        steps.push(step("join", StepKind::Noop, &refs));
        let wf = create(&s, "fan", steps).await;
        let r = start(&s, &wf, json!({})).await;

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawn_loop = |worker: Option<String>| {
            let (s, stop) = (s.store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let leased: Vec<LeasedTask> = match &worker {
                        Some(w) => s.claim_tasks(NS, "work", w, 5, 30_000, None).await.expect("claim"),
                        None => {
                            let steps = s.lease_server_steps(50, 60_000).await.expect("lease steps");
                            steps.into_iter().map(|st| st.leased).collect()
                        }
                    };
                    if leased.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    for l in leased {
                        let out = json!({ "by": worker });
                        s.complete_task(NS, l.task.id, l.lease_token, &out, None).await.expect("complete");
                        done.push(l.task.id);
                    }
                }
                done
            })
        };
        let mut loops: Vec<_> = (0..8).map(|i| spawn_loop(Some(format!("w{i}")))).collect();
        loops.push(spawn_loop(None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let ended = loop {
            let now = run(&s, r.id).await;
            if now.status.is_terminal() {
                break now;
            }
            assert!(tokio::time::Instant::now() < deadline, "the run did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut done = Vec::new();
        for l in loops {
            done.extend(l.await.expect("loop"));
        }
        assert_eq!(ended.status, RunStatus::Succeeded);
        assert_eq!(ended.tasks.len(), 52);
        assert_eq!(done.len(), 52, "every task was completed once");
        assert_eq!(done.iter().collect::<HashSet<_>>().len(), 52);
        assert!(ended.tasks.iter().all(|t| t.attempts.len() == 1));
        let log = events(&s, r.id).await;
        assert_eq!(log.len() as i64, ended.last_sequence);
        assert_eq!(log.iter().map(|e| e.sequence).collect::<Vec<_>>(), (1..=ended.last_sequence).collect::<Vec<_>>());
        // run, 52 x (queued, leased, succeeded), run.
        assert_eq!(log.len(), 2 + 52 * 3);
    }

    #[tokio::test]
    async fn the_engine_and_claim_queries_use_their_indexes() {
        let s = open().await;
        let plan = |sql: String, binds: usize| {
            let s = s.store.clone();
            async move {
                let mut q = sqlx::query(&sql);
                for _ in 0..binds {
                    q = q.bind(0_i64);
                }
                let rows = q.fetch_all(s.reader()).await.expect("plan");
                rows.iter().map(|r| r.get::<String, _>("detail")).collect::<Vec<_>>().join(" | ")
            }
        };
        let claim = plan(format!("EXPLAIN QUERY PLAN SELECT {TASK_COLUMNS} {CLAIM_FROM}"), 4).await;
        assert!(claim.contains("INDEX tasks_claim") && !claim.contains("TEMP B-TREE"), "{claim}");
        let engine = plan(format!("EXPLAIN QUERY PLAN SELECT {TASK_COLUMNS} {ENGINE_FROM}"), 2).await;
        assert!(engine.contains("INDEX tasks_engine") && !engine.contains("TEMP B-TREE"), "{engine}");
        let expired = plan(format!("EXPLAIN QUERY PLAN SELECT {TASK_COLUMNS} {EXPIRED_FROM}"), 2).await;
        assert!(
            expired.contains("INDEX tasks_leases") && expired.contains("INDEX tasks_attempt_deadlines"),
            "{expired}"
        );
        let overdue = plan(format!("EXPLAIN QUERY PLAN SELECT {RUN_COLUMNS} {OVERDUE_FROM}"), 2).await;
        assert!(overdue.contains("INDEX runs_deadline"), "{overdue}");
        let gauge = plan(
            "EXPLAIN QUERY PLAN SELECT namespace, queue, count(*) FROM tasks WHERE status = 2 AND kind = 1 \
             GROUP BY namespace, queue"
                .into(),
            0,
        )
        .await;
        assert!(gauge.contains("tasks_claim"), "{gauge}");
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "EXPLAIN QUERY PLAN SELECT {RUN_COLUMNS} FROM runs WHERE namespace = "
        ));
        qb.push_bind(NS);
        push_newest_first_page(&mut qb, "", Some((now_micros(), Uuid::now_v7())), 10);
        let page = qb.build().fetch_all(s.reader()).await.expect("plan");
        let page = page.iter().map(|r| r.get::<String, _>("detail")).collect::<Vec<_>>().join(" | ");
        assert!(page.contains("INDEX runs_ns_create_time (namespace=? AND create_time<?)"), "{page}");
        assert!(!page.contains("TEMP B-TREE"), "{page}");
    }
}
