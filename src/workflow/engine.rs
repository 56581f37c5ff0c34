//! The workflow service and engine: validation, runs, the leased task queue with long-polling,
//! run watching, and the background loop every replica runs (lease expiry, timers, server-side
//! steps, run timeouts). Replicas cooperate only through PostgreSQL.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Condition, Definition, LeasedTask, NewTask, Priority, RetryPolicy, Run, RunEvent, Step, StepKind, Task, Workflow,
    is_valid_name, validate_dag,
};
use crate::{
    auth::{Principal, RequestContext, Role},
    config::{WorkflowConfig, parse_duration_str},
    error::{Error, Result, Violations},
    memory::{
        AccessLevel, MemoryService,
        service::{Expiry, MemoryDraft},
    },
    page_token::PageTokens,
    store::{
        WorkflowStore,
        identity::AuditEvent,
        notify::{Notification, Notifier},
        workflow::{ENGINE_WAKE, PageKey, RunFilter, TaskFilter},
    },
};

/// A workflow as a caller described it (durations in milliseconds, enums already decoded).
#[derive(Debug, Clone, Default)]
pub struct WorkflowDraft {
    pub name: String,
    pub description: String,
    pub steps: Vec<StepDraft>,
    pub retry_policy: Option<RetryDraft>,
    pub timeout_ms: Option<i64>,
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct StepDraft {
    pub id: String,
    pub kind: Option<StepKind>,
    pub depends_on: Vec<String>,
    pub queue: String,
    pub config: Value,
    pub retry_policy: Option<RetryDraft>,
    pub timeout_ms: Option<i64>,
    pub condition: Condition,
    pub priority: Priority,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryDraft {
    pub max_attempts: i32,
    pub initial_backoff_ms: Option<i64>,
    pub max_backoff_ms: Option<i64>,
    pub multiplier: f64,
}

#[derive(Debug, Clone)]
pub struct TaskDraft {
    pub title: String,
    pub description: String,
    pub queue: String,
    pub priority: Priority,
    pub depends_on: Vec<Uuid>,
    pub input: Value,
    pub due_time: Option<chrono::DateTime<chrono::Utc>>,
    pub retry_policy: Option<RetryDraft>,
}

/// What WatchRun streams.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Snapshot(Box<Run>),
    Event(RunEvent),
}

#[derive(Serialize)]
struct PageQuery<'a, F: Serialize> {
    method: &'static str,
    namespace: &'a str,
    filter: F,
}

#[derive(Clone)]
pub struct WorkflowService {
    store: Arc<dyn WorkflowStore>,
    notifier: Notifier,
    memory: MemoryService,
    cfg: Arc<WorkflowConfig>,
    tokens: PageTokens,
    default_page_size: usize,
    max_page_size: usize,
}

fn json_size(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

impl WorkflowService {
    pub fn new(
        store: Arc<dyn WorkflowStore>,
        notifier: Notifier,
        memory: MemoryService,
        cfg: WorkflowConfig,
        tokens: PageTokens,
        default_page_size: usize,
        max_page_size: usize,
    ) -> Self {
        Self { store, notifier, memory, cfg: Arc::new(cfg), tokens, default_page_size, max_page_size }
    }

    // ---- validation ------------------------------------------------------------------------

    fn retry(&self, v: &mut Violations, field: &str, r: Option<RetryDraft>) -> Option<RetryPolicy> {
        let r = r?;
        let before = v.0.len();
        if r.max_attempts < 1 || r.max_attempts > self.cfg.max_attempts {
            v.add(format!("{field}.max_attempts"), format!("must be between 1 and {}", self.cfg.max_attempts));
        }
        let initial = r.initial_backoff_ms.unwrap_or(self.cfg.default_initial_backoff_ms);
        let max = r.max_backoff_ms.unwrap_or(self.cfg.default_max_backoff_ms.max(initial));
        for (name, value) in [("initial_backoff", initial), ("max_backoff", max)] {
            if value < 0 || value > self.cfg.max_backoff_ms {
                v.add(format!("{field}.{name}"), format!("must be between 0 and {} ms", self.cfg.max_backoff_ms));
            }
        }
        if max < initial {
            v.add(format!("{field}.max_backoff"), "must not be shorter than initial_backoff");
        }
        let multiplier = if r.multiplier == 0.0 { 2.0 } else { r.multiplier };
        if !multiplier.is_finite() || !(1.0..=100.0).contains(&multiplier) {
            v.add(format!("{field}.multiplier"), "must be between 1 and 100 (0 means 2)");
        }
        (v.0.len() == before).then_some(RetryPolicy {
            max_attempts: r.max_attempts,
            initial_backoff_ms: initial,
            max_backoff_ms: max,
            multiplier,
        })
    }

    fn timeout(&self, v: &mut Violations, field: &str, t: Option<i64>) -> Option<i64> {
        match t {
            Some(ms) if ms <= 0 || ms > self.cfg.max_timeout_ms => {
                v.add(field, format!("must be positive and at most {} ms", self.cfg.max_timeout_ms));
                None
            }
            other => other,
        }
    }

    fn payload(&self, v: &mut Violations, field: &str, value: &Value) {
        if !value.is_object() {
            v.add(field, "must be an object");
        } else if json_size(value) > self.cfg.max_payload_bytes {
            v.add(field, format!("must be at most {} bytes as JSON", self.cfg.max_payload_bytes));
        }
    }

    fn default_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.cfg.default_max_attempts,
            initial_backoff_ms: self.cfg.default_initial_backoff_ms,
            max_backoff_ms: self.cfg.default_max_backoff_ms,
            multiplier: 2.0,
        }
    }

    fn validate_workflow(&self, d: WorkflowDraft) -> Result<(String, String, Definition, HashMap<String, String>)> {
        let mut v = Violations::default();
        if !is_valid_name(&d.name) {
            v.add("workflow.name", "required: 1-128 characters of [A-Za-z0-9._:-]");
        }
        if d.description.len() > 4096 {
            v.add("workflow.description", "must be at most 4096 bytes");
        }
        if d.steps.is_empty() {
            v.add("workflow.steps", "at least one step is required");
        }
        if d.steps.len() > self.cfg.max_steps {
            v.add("workflow.steps", format!("at most {} steps", self.cfg.max_steps));
        }
        if d.labels.len() > 64 || d.labels.iter().any(|(k, val)| k.is_empty() || k.len() > 128 || val.len() > 256) {
            v.add("workflow.labels", "at most 64 labels; keys 1-128 bytes, values at most 256 bytes");
        }
        let retry_policy = self.retry(&mut v, "workflow.retry_policy", d.retry_policy);
        let timeout_ms = self.timeout(&mut v, "workflow.timeout", d.timeout_ms);
        let mut steps = Vec::with_capacity(d.steps.len());
        for (i, s) in d.steps.into_iter().enumerate() {
            let f = format!("workflow.steps[{i}]");
            if !is_valid_name(&s.id) {
                v.add(format!("{f}.id"), "required: 1-128 characters of [A-Za-z0-9._:-]");
            }
            let kind = match s.kind {
                Some(k) => k,
                None => {
                    v.add(format!("{f}.kind"), "required: TASK, DELAY, MEMORY_WRITE or NOOP");
                    StepKind::Noop
                }
            };
            if !s.config.is_object() {
                v.add(format!("{f}.config"), "must be an object");
            } else if json_size(&s.config) > self.cfg.max_step_config_bytes {
                v.add(format!("{f}.config"), format!("must be at most {} bytes", self.cfg.max_step_config_bytes));
            }
            match kind {
                StepKind::Task if !is_valid_name(&s.queue) => {
                    v.add(format!("{f}.queue"), "a TASK step needs a queue: 1-128 characters of [A-Za-z0-9._:-]");
                }
                StepKind::Delay => match s.config.get("duration").and_then(Value::as_str).map(parse_duration_str) {
                    Some(Ok(d)) if (d.as_millis() as i64) <= self.cfg.max_timeout_ms => {}
                    Some(Ok(_)) => {
                        v.add(format!("{f}.config.duration"), format!("must be at most {} ms", self.cfg.max_timeout_ms))
                    }
                    _ => v.add(format!("{f}.config.duration"), "a DELAY step needs a duration such as \"30s\""),
                },
                StepKind::MemoryWrite => {
                    if let Some(c) = s.config.get("content")
                        && !c.is_string()
                    {
                        v.add(format!("{f}.config.content"), "must be a string");
                    }
                }
                _ => {}
            }
            if kind != StepKind::Task && !s.queue.is_empty() {
                v.add(format!("{f}.queue"), "only TASK steps have a queue");
            }
            let retry_policy = self.retry(&mut v, &format!("{f}.retry_policy"), s.retry_policy);
            let timeout_ms = self.timeout(&mut v, &format!("{f}.timeout"), s.timeout_ms);
            steps.push(Step {
                id: s.id,
                kind,
                depends_on: s.depends_on,
                queue: s.queue,
                config: s.config,
                retry_policy,
                timeout_ms,
                condition: s.condition,
                priority: s.priority,
            });
        }
        if v.0.is_empty() {
            v.0.extend(validate_dag(&steps));
        }
        v.into_result()?;
        Ok((d.name, d.description, Definition { steps, retry_policy, timeout_ms }, d.labels))
    }

    fn page_size(&self, requested: i32) -> Result<usize> {
        if requested < 0 {
            return Err(Error::invalid("page_size", "must not be negative"));
        }
        Ok(if requested == 0 { self.default_page_size } else { (requested as usize).min(self.max_page_size) })
    }

    fn decode_page<F: Serialize>(&self, token: &str, q: &PageQuery<'_, F>) -> Result<Option<PageKey>> {
        if token.is_empty() { Ok(None) } else { self.tokens.decode(token, q).map(Some) }
    }

    // ---- workflows ---------------------------------------------------------------------------

    pub async fn create_workflow(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        d: WorkflowDraft,
        request_id: Option<&str>,
    ) -> Result<Workflow> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let (name, description, definition, labels) = self.validate_workflow(d)?;
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store
            .create_workflow(&ns, &name, &description, &definition, &labels, &p.agent_id, request_id, Some(&audit))
            .await
    }

    pub async fn get_workflow(
        &self,
        p: &Principal,
        requested_ns: &str,
        id: Option<Uuid>,
        name: &str,
        version: i32,
    ) -> Result<Workflow> {
        let ns = p.target_namespace(requested_ns)?;
        let found = match id {
            Some(id) => self.store.get_workflow(&ns, id).await?,
            None if !name.is_empty() => {
                if version < 0 {
                    return Err(Error::invalid("version", "must not be negative"));
                }
                self.store.get_workflow_by_name(&ns, name, (version > 0).then_some(version)).await?
            }
            None => return Err(Error::invalid("id", "give an id or a name")),
        };
        found.ok_or_else(|| Error::not_found("workflow", id.map(|i| i.to_string()).unwrap_or_else(|| name.to_string())))
    }

    pub async fn list_workflows(
        &self,
        p: &Principal,
        requested_ns: &str,
        name: &str,
        latest_only: bool,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Workflow>, String)> {
        let ns = p.target_namespace(requested_ns)?;
        let limit = self.page_size(page_size)?;
        let q = PageQuery { method: "ListWorkflows", namespace: &ns, filter: (name, latest_only) };
        let after = self.decode_page(page_token, &q)?;
        let name = (!name.is_empty()).then_some(name);
        let mut rows = self.store.list_workflows(&ns, name, latest_only, after, limit + 1).await?;
        let next = self.next_token(&mut rows, limit, &q, |w| (w.create_time.timestamp_micros(), w.id));
        Ok((rows, next))
    }

    fn next_token<T, F: Serialize>(
        &self,
        rows: &mut Vec<T>,
        limit: usize,
        q: &PageQuery<'_, F>,
        key: impl Fn(&T) -> PageKey,
    ) -> String {
        if rows.len() <= limit {
            return String::new();
        }
        rows.truncate(limit);
        rows.last().map(|last| self.tokens.encode(q, &key(last))).unwrap_or_default()
    }

    pub async fn delete_workflow(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        id: Uuid,
    ) -> Result<()> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        if self.store.delete_workflow(&ns, id, Some(&audit)).await? {
            Ok(())
        } else {
            Err(Error::not_found("workflow", id.to_string()))
        }
    }

    // ---- runs --------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub async fn start_run(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        workflow_id: Option<Uuid>,
        workflow_name: &str,
        version: i32,
        input: Value,
        request_id: Option<&str>,
    ) -> Result<Run> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        self.payload(&mut v, "input", &input);
        if workflow_id.is_none() && workflow_name.is_empty() {
            v.add("workflow_id", "give a workflow id or name");
        }
        if request_id.is_some_and(|r| r.len() > 128) {
            v.add("request_id", "must be at most 128 bytes");
        }
        v.into_result()?;
        let wf = self.get_workflow(p, &ns, workflow_id, workflow_name, version).await?;
        let timeout = wf.definition.timeout_ms;
        let trace_parent = crate::telemetry::current_traceparent();
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store
            .start_run(
                &wf,
                &input,
                self.default_retry(),
                timeout,
                &p.agent_id,
                request_id,
                trace_parent.as_deref(),
                Some(&audit),
            )
            .await
    }

    pub async fn get_run(&self, p: &Principal, requested_ns: &str, id: Uuid) -> Result<Run> {
        let ns = p.target_namespace(requested_ns)?;
        self.store.get_run(&ns, id).await?.ok_or_else(|| Error::not_found("run", id.to_string()))
    }

    pub async fn list_runs(
        &self,
        p: &Principal,
        requested_ns: &str,
        filter: RunFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Run>, String)> {
        let ns = p.target_namespace(requested_ns)?;
        let limit = self.page_size(page_size)?;
        let q = PageQuery { method: "ListRuns", namespace: &ns, filter: &filter };
        let after = self.decode_page(page_token, &q)?;
        let mut rows = self.store.list_runs(&ns, &filter, after, limit + 1).await?;
        let next = self.next_token(&mut rows, limit, &q, |r| (r.create_time.timestamp_micros(), r.id));
        Ok((rows, next))
    }

    pub async fn cancel_run(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        id: Uuid,
        reason: &str,
    ) -> Result<Run> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        if reason.len() > 1024 {
            return Err(Error::invalid("reason", "must be at most 1024 bytes"));
        }
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store.cancel_run(&ns, id, reason, Some(&audit)).await
    }

    /// Streams a snapshot (unless resuming after a sequence), then every event of the run in
    /// order, until the run ends. Events come from the database, so a change made on any replica
    /// is seen; a slow client only slows its own stream (bounded buffer).
    pub async fn watch_run(
        &self,
        p: &Principal,
        requested_ns: &str,
        id: Uuid,
        after_sequence: i64,
    ) -> Result<mpsc::Receiver<Result<WatchItem>>> {
        let ns = p.target_namespace(requested_ns)?;
        if after_sequence < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative"));
        }
        // Subscribe before reading, so nothing between the read and the wait is missed.
        let mut notes = self.notifier.subscribe();
        let run = self.store.get_run(&ns, id).await?.ok_or_else(|| Error::not_found("run", id.to_string()))?;
        let (tx, rx) = mpsc::channel(self.cfg.watch_buffer);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last = after_sequence;
            if after_sequence == 0 {
                last = run.last_sequence;
                let ended = run.status.is_terminal();
                if tx.send(Ok(WatchItem::Snapshot(Box::new(run)))).await.is_err() || ended {
                    return;
                }
            }
            loop {
                let events = match store.run_events(id, last, 100).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let (full, none) = (events.len() == 100, events.is_empty());
                for e in events {
                    last = e.sequence;
                    let ended = matches!(e.payload, super::EventPayload::RunStatus(s) if s.is_terminal());
                    if tx.send(Ok(WatchItem::Event(e))).await.is_err() || ended {
                        return;
                    }
                }
                if full {
                    continue;
                }
                // Nothing new: a run that already ended (resumed late, after its last event) or
                // was deleted ends the stream. (A run's last event is its end, so a read that
                // returned events without it leaves the run running.)
                if none {
                    match store.get_run(&ns, id).await {
                        Ok(Some(r)) if r.status.is_terminal() && r.last_sequence <= last => return,
                        Ok(None) => return,
                        _ => {}
                    }
                }
                let wait = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        _ = tx.closed() => return,
                        n = notes.recv() => match n {
                            Ok(Notification::Run(r)) if r == id => break,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => break,
                        },
                    }
                }
            }
        });
        Ok(rx)
    }

    // ---- tasks -------------------------------------------------------------------------------

    pub async fn create_task(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        d: TaskDraft,
        request_id: Option<&str>,
    ) -> Result<Task> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        if !is_valid_name(&d.queue) {
            v.add("task.queue", "required: 1-128 characters of [A-Za-z0-9._:-]");
        }
        if d.title.len() > 1024 {
            v.add("task.title", "must be at most 1024 bytes");
        }
        if d.description.len() > 16 * 1024 {
            v.add("task.description", "must be at most 16384 bytes");
        }
        if d.depends_on.len() > self.cfg.max_steps {
            v.add("task.depends_on", format!("at most {} dependencies", self.cfg.max_steps));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, dep) in d.depends_on.iter().enumerate() {
            if !seen.insert(dep) {
                v.add(format!("task.depends_on[{i}]"), "duplicate dependency");
            }
        }
        self.payload(&mut v, "task.input", &d.input);
        let retry = self.retry(&mut v, "retry_policy", d.retry_policy).unwrap_or_else(|| self.default_retry());
        if request_id.is_some_and(|r| r.len() > 128) {
            v.add("request_id", "must be at most 128 bytes");
        }
        v.into_result()?;
        // A new task can only depend on tasks that already exist, so no cycle can form.
        let task = NewTask {
            id: Uuid::now_v7(),
            namespace: ns,
            title: d.title,
            description: d.description,
            queue: d.queue,
            priority: d.priority,
            depends_on: d.depends_on,
            retry,
            timeout_ms: None,
            input: d.input,
            due_time: d.due_time,
            created_by: p.agent_id.clone(),
            request_id: request_id.map(str::to_string),
        };
        let audit = AuditEvent::ok(p, &task.namespace, ctx, "");
        self.store.create_task(&task, Some(&audit)).await
    }

    pub async fn get_task(&self, p: &Principal, requested_ns: &str, id: Uuid) -> Result<Task> {
        let ns = p.target_namespace(requested_ns)?;
        self.store.get_task(&ns, id).await?.ok_or_else(|| Error::not_found("task", id.to_string()))
    }

    pub async fn list_tasks(
        &self,
        p: &Principal,
        requested_ns: &str,
        filter: TaskFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Task>, String)> {
        let ns = p.target_namespace(requested_ns)?;
        let limit = self.page_size(page_size)?;
        let q = PageQuery { method: "ListTasks", namespace: &ns, filter: &filter };
        let after = self.decode_page(page_token, &q)?;
        let mut rows = self.store.list_tasks(&ns, &filter, after, limit + 1).await?;
        let next = self.next_token(&mut rows, limit, &q, |t| (t.create_time.timestamp_micros(), t.id));
        Ok((rows, next))
    }

    fn lease_ms(&self, field: &str, requested: Option<i64>) -> Result<i64> {
        match requested {
            None | Some(0) => Ok(self.cfg.default_lease_ms),
            Some(ms) if ms < 1000 || ms > self.cfg.max_lease_ms => {
                Err(Error::invalid(field, format!("must be between 1s and {} ms", self.cfg.max_lease_ms)))
            }
            Some(ms) => Ok(ms),
        }
    }

    /// Leases up to `max_tasks` queued tasks of `queue`, waiting up to `wait_ms` for work. Wakes
    /// on NOTIFY from any replica, and re-checks on a short timer (for retry backoffs ending).
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_tasks(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        queue: &str,
        worker_id: &str,
        max_tasks: i32,
        lease_ms: Option<i64>,
        wait_ms: Option<i64>,
    ) -> Result<Vec<LeasedTask>> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        if !is_valid_name(queue) {
            v.add("queue", "required: 1-128 characters of [A-Za-z0-9._:-]");
        }
        if worker_id.is_empty() || worker_id.len() > 256 {
            v.add("worker_id", "required, at most 256 bytes");
        }
        if max_tasks < 1 || max_tasks as usize > self.cfg.max_claim_batch {
            v.add("max_tasks", format!("must be between 1 and {}", self.cfg.max_claim_batch));
        }
        let lease = match self.lease_ms("lease_duration", lease_ms) {
            Ok(l) => l,
            Err(Error::InvalidArgument(mut e)) => {
                v.0.append(&mut e);
                0
            }
            Err(e) => return Err(e),
        };
        let wait = match wait_ms {
            Some(w) if w < 0 => {
                v.add("wait", "must not be negative");
                0
            }
            Some(w) => w.min(self.cfg.max_claim_wait_ms),
            None => 0,
        };
        v.into_result()?;
        let key = format!("{ns}/{queue}");
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        let mut notes = self.notifier.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait as u64);
        loop {
            let got = self.store.claim_tasks(&ns, queue, worker_id, max_tasks as usize, lease, Some(&audit)).await?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            let recheck =
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_millis(250)));
            tokio::pin!(recheck);
            loop {
                tokio::select! {
                    _ = &mut recheck => break,
                    n = notes.recv() => match n {
                        Ok(Notification::Queue(q)) if q == key => break,
                        Ok(_) => {}
                        Err(_) => break,
                    },
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn heartbeat(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        id: Uuid,
        token: Uuid,
        lease_ms: Option<i64>,
        progress: Option<Value>,
    ) -> Result<Task> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let lease = match lease_ms {
            None | Some(0) => None,
            other => Some(self.lease_ms("lease_duration", other)?),
        };
        if let Some(pr) = &progress {
            let mut v = Violations::default();
            self.payload(&mut v, "progress", pr);
            v.into_result()?;
        }
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store.heartbeat(&ns, id, token, lease, progress.as_ref(), Some(&audit)).await
    }

    pub async fn complete_task(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        id: Uuid,
        token: Uuid,
        output: Value,
    ) -> Result<Task> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        self.payload(&mut v, "output", &output);
        v.into_result()?;
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store.complete_task(&ns, id, token, &output, Some(&audit)).await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn fail_task(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        requested_ns: &str,
        id: Uuid,
        token: Uuid,
        error: &str,
        retryable: bool,
    ) -> Result<Task> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        if error.len() > 16 * 1024 {
            return Err(Error::invalid("error", "must be at most 16384 bytes"));
        }
        let error = if error.is_empty() { "failed" } else { error };
        let audit = AuditEvent::ok(p, &ns, ctx, "");
        self.store.fail_task(&ns, id, token, error, retryable, Some(&audit)).await
    }

    // ---- the engine --------------------------------------------------------------------------

    /// One round of engine work: with `sweep`, expired leases and timed-out runs first; then the
    /// due server-side steps. Returns whether the sweep found anything and whether any step ran.
    async fn tick(&self, sweep: bool) -> Result<(bool, bool)> {
        let swept = if sweep {
            let expired = self.store.expire_leases(100).await?;
            let timed_out = self.store.time_out_runs(50).await?;
            expired + timed_out > 0
        } else {
            false
        };
        let steps = self.store.lease_server_steps(50, 60_000).await?;
        let stepped = !steps.is_empty();
        for step in steps {
            let span = tracing::debug_span!(
                "workflow.step",
                otel.name = format!("workflow step {}", step.leased.task.step_id.as_deref().unwrap_or("?")),
                run_id = ?step.leased.task.run_id,
                step_id = ?step.leased.task.step_id,
                kind = ?step.leased.task.kind,
            );
            if let Some(tp) = &step.trace_parent {
                crate::telemetry::link_to(&span, tp);
            }
            self.run_server_step(step.leased, step.config, step.created_by).instrument(span).await;
        }
        Ok((swept, stepped))
    }

    async fn run_server_step(&self, leased: LeasedTask, config: Value, created_by: String) {
        let t = &leased.task;
        let outcome: std::result::Result<Value, (String, bool)> = match t.kind {
            StepKind::Noop => Ok(serde_json::json!({})),
            StepKind::Delay => Ok(serde_json::json!({ "fired_at": chrono::Utc::now().to_rfc3339() })),
            StepKind::MemoryWrite => self.memory_write(t, &config, &created_by).await,
            StepKind::Task => Err(("a TASK step is done by workers".into(), false)),
        };
        let result = match outcome {
            Ok(output) => self.store.complete_task(&t.namespace, t.id, leased.lease_token, &output, None).await,
            Err((error, retryable)) => {
                self.store.fail_task(&t.namespace, t.id, leased.lease_token, &error, retryable, None).await
            }
        };
        if let Err(e) = result {
            // The lease expires and the step is retried.
            tracing::warn!(task = %t.id, error = %e, "could not record a server-side step");
        }
    }

    /// MEMORY_WRITE: stores a memory built from the step config (`content`, `summary`, `kind`,
    /// `tags`, `importance`, `access_level`, `ttl`); without `config.content` the content is
    /// the `content` field of the (single) parent's output or of the run input. Idempotent per
    /// task through the request id `task:<task id>`.
    async fn memory_write(
        &self,
        t: &Task,
        config: &Value,
        created_by: &str,
    ) -> std::result::Result<Value, (String, bool)> {
        let from_parents = t
            .input
            .get("parents")
            .and_then(Value::as_object)
            .and_then(|m| m.values().find_map(|o| o.get("content").and_then(Value::as_str).map(str::to_string)));
        let content = config
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(from_parents)
            .or_else(|| t.input.get("input").and_then(|i| i.get("content")).and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| ("MEMORY_WRITE found no content in its config, parents or run input".to_string(), false))?;
        let s = |k: &str| config.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let access_level = match s("access_level").to_ascii_uppercase().trim_start_matches("ACCESS_LEVEL_") {
            "" | "PRIVATE" => AccessLevel::Private,
            "TEAM" => AccessLevel::Team,
            "SHARED" => AccessLevel::Shared,
            "PUBLIC" => AccessLevel::Public,
            other => return Err((format!("MEMORY_WRITE: unknown access_level {other:?}"), false)),
        };
        let draft = MemoryDraft {
            content,
            summary: s("summary"),
            kind: s("kind"),
            tags: config
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            metadata: Some(serde_json::json!({ "run_id": t.run_id, "step_id": t.step_id })),
            importance: config.get("importance").and_then(Value::as_f64),
            access_level: Some(access_level),
            parent_id: None,
            embedding: None,
            embedding_model: None,
            expiry: config
                .get("ttl")
                .and_then(Value::as_str)
                .and_then(|d| parse_duration_str(d).ok())
                .map(|d| Expiry::Ttl(d.as_secs_f64())),
        };
        let principal = Principal::new(created_by, t.namespace.clone(), Role::Agent);
        match self.memory.create(&principal, "", vec![("config.".into(), draft, Some(format!("task:{}", t.id)))]).await
        {
            Ok(mut m) => match m.pop() {
                Some(m) => Ok(serde_json::json!({ "memory_id": m.id.to_string() })),
                None => Err(("memory service returned nothing".into(), true)),
            },
            Err(e @ (Error::InvalidArgument(_) | Error::PermissionDenied(_))) => Err((e.to_string(), false)),
            Err(e) => Err((e.to_string(), true)),
        }
    }

    /// Runs the engine every `TMWS_ENGINE_TICK` (immediately again while there is work) until
    /// `stop` turns true. Server-side steps are leased on every round; the sweeps for expired
    /// leases and timed-out runs at most once per `TMWS_ENGINE_TICK`, unless the last sweep
    /// found work (a backlog is drained at once), so a run of many server-side steps does not
    /// repeat them after every step.
    pub fn spawn_engine(&self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        // Woken early when a server-side step becomes due on any replica (NOTIFY).
        let mut notes = self.notifier.subscribe();
        tokio::spawn(async move {
            let mut last_sweep: Option<tokio::time::Instant> = None;
            let mut sweep_busy = false;
            loop {
                // Wake-ups already delivered are answered by this round, which reads the queue
                // after them: drop them, or each would cost an empty round once the engine waits
                // again (a run of server-side steps leaves one per step behind).
                while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = notes.try_recv() {}
                let sweep = sweep_busy || last_sweep.is_none_or(|t| t.elapsed() >= this.cfg.engine_tick);
                if sweep {
                    last_sweep = Some(tokio::time::Instant::now());
                }
                let busy = match this.tick(sweep).await {
                    Ok((swept, stepped)) => {
                        if sweep {
                            sweep_busy = swept;
                        }
                        swept || stepped
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "workflow engine round failed");
                        sweep_busy = false;
                        false
                    }
                };
                if *stop.borrow() {
                    break;
                }
                if busy {
                    continue;
                }
                let tick = tokio::time::sleep(this.cfg.engine_tick);
                tokio::pin!(tick);
                loop {
                    tokio::select! {
                        _ = &mut tick => break,
                        n = notes.recv() => match n {
                            Ok(Notification::Queue(q)) if q == ENGINE_WAKE => break,
                            Ok(_) => {}
                            Err(_) => break,
                        },
                        _ = stop.changed() => return,
                    }
                }
            }
        })
    }
}
