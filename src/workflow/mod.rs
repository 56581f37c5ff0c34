//! The workflow domain: definitions (DAGs of steps), runs, tasks and their rules — validation
//! with cycle reporting, retry backoff, step conditions, run outcomes. No tonic, no SQL.

pub mod engine;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use engine::WorkflowService;

use crate::error::FieldViolation;

macro_rules! small_enum {
    ($name:ident { $($variant:ident = $value:literal),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(i16)]
        pub enum $name { $($variant = $value),* }
        impl $name {
            pub fn from_i16(v: i16) -> Option<Self> {
                match v { $($value => Some(Self::$variant),)* _ => None }
            }
            pub fn as_i16(self) -> i16 { self as i16 }
        }
    };
}

small_enum!(StepKind { Task = 1, Delay = 2, MemoryWrite = 3, Noop = 4 });
small_enum!(Condition { AllSucceeded = 1, AnyFailed = 2, Always = 3 });
small_enum!(Priority { Low = 1, Normal = 2, High = 3, Critical = 4 });
small_enum!(RunStatus { Pending = 1, Running = 2, Succeeded = 3, Failed = 4, Cancelled = 5, TimedOut = 6 });
small_enum!(TaskStatus { Blocked = 1, Queued = 2, Leased = 3, Succeeded = 4, Failed = 5, Cancelled = 6, Skipped = 7 });

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut)
    }
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped)
    }
}

/// Retry policy with durations in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub initial_backoff_ms: i64,
    pub max_backoff_ms: i64,
    pub multiplier: f64,
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2, 3, ...): initial * multiplier^(n-2), capped.
    pub fn backoff_ms(&self, next_attempt: i32) -> i64 {
        let exp = (next_attempt - 2).max(0);
        let raw = self.initial_backoff_ms as f64 * self.multiplier.powi(exp);
        if !raw.is_finite() { self.max_backoff_ms } else { (raw as i64).clamp(0, self.max_backoff_ms) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    pub depends_on: Vec<String>,
    pub queue: String,
    pub config: serde_json::Value,
    pub retry_policy: Option<RetryPolicy>,
    pub timeout_ms: Option<i64>,
    pub condition: Condition,
    pub priority: Priority,
}

/// What a workflow definition stores (the `definition` column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub steps: Vec<Step>,
    pub retry_policy: Option<RetryPolicy>,
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub version: i32,
    pub description: String,
    pub definition: Definition,
    pub labels: HashMap<String, String>,
    pub create_time: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAttempt {
    pub attempt: i32,
    pub worker_id: String,
    pub start_time: DateTime<Utc>,
    pub end_time: Option<DateTime<Utc>>,
    pub status: TaskStatus,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: Uuid,
    pub namespace: String,
    pub run_id: Option<Uuid>,
    pub step_id: Option<String>,
    pub kind: StepKind,
    pub title: String,
    pub description: String,
    pub queue: String,
    pub priority: Priority,
    pub depends_on: Vec<Uuid>,
    pub status: TaskStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub input: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub error: String,
    pub worker_id: String,
    pub lease_expire_time: Option<DateTime<Utc>>,
    pub due_time: Option<DateTime<Utc>>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub attempts: Vec<TaskAttempt>,
    pub progress: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: Uuid,
    pub namespace: String,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub input: serde_json::Value,
    pub status: RunStatus,
    pub tasks: Vec<Task>,
    pub output: Option<serde_json::Value>,
    pub error: String,
    pub create_time: DateTime<Utc>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub request_id: Option<String>,
    pub last_sequence: i64,
    /// The traceparent of the call that started the run.
    pub trace_parent: Option<String>,
}

/// One entry of a run's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventPayload {
    RunStatus(RunStatus),
    Task(Box<Task>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    pub sequence: i64,
    pub time: DateTime<Utc>,
    pub payload: EventPayload,
}

/// A task handed to a worker.
#[derive(Debug, Clone)]
pub struct LeasedTask {
    pub task: Task,
    pub lease_token: Uuid,
}

/// A new standalone task.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: Uuid,
    pub namespace: String,
    pub title: String,
    pub description: String,
    pub queue: String,
    pub priority: Priority,
    pub depends_on: Vec<Uuid>,
    pub retry: RetryPolicy,
    pub timeout_ms: Option<i64>,
    pub input: serde_json::Value,
    pub due_time: Option<DateTime<Utc>>,
    pub created_by: String,
    pub request_id: Option<String>,
}

/// Whether a step whose parents are all terminal runs (`Some(true)`), is skipped
/// (`Some(false)`), or must still wait (`None`).
pub fn condition_met(condition: Condition, parents: &[TaskStatus]) -> Option<bool> {
    if parents.iter().any(|s| !s.is_terminal()) {
        return None;
    }
    Some(match condition {
        Condition::AllSucceeded => parents.iter().all(|s| *s == TaskStatus::Succeeded),
        Condition::AnyFailed => parents.contains(&TaskStatus::Failed),
        Condition::Always => true,
    })
}

/// The outcome of a run whose tasks are all terminal: FAILED when any task failed (even if a
/// compensation step ran), SUCCEEDED otherwise.
pub fn run_outcome(statuses: &[TaskStatus]) -> RunStatus {
    if statuses.contains(&TaskStatus::Failed) { RunStatus::Failed } else { RunStatus::Succeeded }
}

/// A run's task as StartRun writes it, derived from its step (both stores).
pub struct StepTask {
    pub id: Uuid,
    pub depends_on: Vec<Uuid>,
    /// QUEUED for a root, BLOCKED otherwise.
    pub status: TaskStatus,
    pub retry: RetryPolicy,
    /// The step's config; a DELAY step's `duration` is also given as `duration_ms`.
    pub config: serde_json::Value,
    /// How long after the start the task becomes claimable (a root DELAY step's duration).
    pub wait_ms: i64,
    pub input: serde_json::Value,
}

/// The wait of a DELAY step (`duration_ms`, filled in from `duration` when its run started).
pub fn delay_ms(config: &serde_json::Value) -> i64 {
    config.get("duration_ms").and_then(serde_json::Value::as_i64).unwrap_or(0).max(0)
}

/// The task of step `s` of a run of `wf` started with `input`, where `ids` are the run's task
/// ids by step id and `default_retry` applies when neither the step nor the workflow sets one.
pub fn step_task(
    wf: &Workflow,
    s: &Step,
    ids: &HashMap<&str, Uuid>,
    default_retry: RetryPolicy,
    input: &serde_json::Value,
) -> crate::error::Result<StepTask> {
    let id = ids.get(s.id.as_str()).copied().ok_or_else(|| crate::error::Error::internal("step id vanished"))?;
    let depends_on: Vec<Uuid> = s.depends_on.iter().filter_map(|d| ids.get(d.as_str()).copied()).collect();
    let root = depends_on.is_empty();
    let mut config = s.config.clone();
    if s.kind == StepKind::Delay
        && let serde_json::Value::Object(map) = &mut config
        && let Some(ms) = map
            .get("duration")
            .and_then(serde_json::Value::as_str)
            .and_then(|d| crate::config::parse_duration_str(d).ok())
    {
        map.insert("duration_ms".into(), serde_json::json!(ms.as_millis() as i64));
    }
    Ok(StepTask {
        id,
        status: if root { TaskStatus::Queued } else { TaskStatus::Blocked },
        retry: s.retry_policy.or(wf.definition.retry_policy).unwrap_or(default_retry),
        wait_ms: if root && s.kind == StepKind::Delay { delay_ms(&config) } else { 0 },
        input: if root { serde_json::json!({ "input": input, "parents": {} }) } else { serde_json::json!({}) },
        depends_on,
        config,
    })
}

/// A parent of a BLOCKED task of a run, as the stores read it to decide the task.
#[derive(Debug, Clone)]
pub struct ParentState {
    pub id: uuid::Uuid,
    pub step_id: Option<String>,
    pub status: TaskStatus,
    pub output: Option<serde_json::Value>,
}

/// Decides a BLOCKED task of a run with join `condition` from its parents (both stores): `None`
/// while a parent is still open; `Some(Some(input))` when it runs, with the run's input and each
/// parent's output (null when it has none) keyed by the parent's step id (or task id);
/// `Some(None)` when its condition can no longer be met and it is skipped.
pub fn decide_blocked(
    condition: Condition,
    parents: &[ParentState],
    run_input: &serde_json::Value,
) -> Option<Option<serde_json::Value>> {
    let statuses: Vec<TaskStatus> = parents.iter().map(|p| p.status).collect();
    let runs = condition_met(condition, &statuses)?;
    Some(runs.then(|| {
        let outputs: serde_json::Map<String, serde_json::Value> = parents
            .iter()
            .map(|p| {
                let key = p.step_id.clone().unwrap_or_else(|| p.id.to_string());
                (key, p.output.clone().unwrap_or(serde_json::Value::Null))
            })
            .collect();
        serde_json::json!({ "input": run_input, "parents": outputs })
    }))
}

/// The end of a run whose tasks are all terminal: its status, its output (the outputs of its leaf
/// steps, keyed by step id) and its error (every failed step's error). None while a task is still
/// open (or when there are none).
pub fn finished_run(tasks: &[&Task]) -> Option<(RunStatus, serde_json::Value, String)> {
    if tasks.is_empty() || !tasks.iter().all(|t| t.status.is_terminal()) {
        return None;
    }
    let statuses: Vec<TaskStatus> = tasks.iter().map(|t| t.status).collect();
    let parents: std::collections::HashSet<uuid::Uuid> =
        tasks.iter().flat_map(|t| t.depends_on.iter().copied()).collect();
    let mut output = serde_json::Map::new();
    for t in tasks.iter().filter(|t| !parents.contains(&t.id)) {
        if let (Some(step), Some(o)) = (&t.step_id, &t.output) {
            output.insert(step.clone(), o.clone());
        }
    }
    let error = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Failed)
        .map(|t| format!("step {}: {}", t.step_id.as_deref().unwrap_or("?"), t.error))
        .collect::<Vec<_>>()
        .join("; ");
    Some((run_outcome(&statuses), serde_json::Value::Object(output), error))
}

/// Names allowed for step ids, queues and workflow names.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
}

/// Validates the DAG of a definition: unique ids, known dependencies, no cycles (each cycle is
/// reported as a path). Field paths are relative to `workflow.steps`.
pub fn validate_dag(steps: &[Step]) -> Vec<FieldViolation> {
    let mut v = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if index.insert(s.id.as_str(), i).is_some() {
            v.push(FieldViolation::new(format!("workflow.steps[{i}].id"), format!("duplicate step id {:?}", s.id)));
        }
    }
    for (i, s) in steps.iter().enumerate() {
        let mut seen = HashSet::new();
        for (j, d) in s.depends_on.iter().enumerate() {
            let field = format!("workflow.steps[{i}].depends_on[{j}]");
            if d == &s.id {
                v.push(FieldViolation::new(field, "a step cannot depend on itself"));
            } else if !index.contains_key(d.as_str()) {
                v.push(FieldViolation::new(field, format!("unknown step {d:?}")));
            } else if !seen.insert(d) {
                v.push(FieldViolation::new(field, format!("duplicate dependency {d:?}")));
            }
        }
    }
    if !v.is_empty() {
        return v;
    }
    if let Some(cycle) = find_cycle(steps, &index) {
        v.push(FieldViolation::new("workflow.steps", format!("dependency cycle: {}", cycle.join(" -> "))));
    }
    v
}

/// Depth-first search for a cycle; returns it as a closed path of step ids.
fn find_cycle(steps: &[Step], index: &HashMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks = vec![Mark::New; steps.len()];
    let mut path: Vec<usize> = Vec::new();
    fn visit(
        n: usize,
        steps: &[Step],
        index: &HashMap<&str, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        marks[n] = Mark::Active;
        path.push(n);
        for d in &steps[n].depends_on {
            let Some(&m) = index.get(d.as_str()) else { continue };
            match marks[m] {
                Mark::Active => {
                    let start = path.iter().position(|&p| p == m).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|&p| steps[p].id.clone()).collect();
                    cycle.push(steps[m].id.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, steps, index, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[n] = Mark::Done;
        None
    }
    for n in 0..steps.len() {
        if marks[n] == Mark::New
            && let Some(c) = visit(n, steps, index, &mut marks, &mut path)
        {
            return Some(c);
        }
    }
    None
}

/// Ids of the steps no other step depends on (their outputs form the run's output).
pub fn leaf_steps(steps: &[Step]) -> Vec<String> {
    let parents: HashSet<&str> = steps.iter().flat_map(|s| s.depends_on.iter().map(String::as_str)).collect();
    steps.iter().filter(|s| !parents.contains(s.id.as_str())).map(|s| s.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_tasks_are_queued_with_parent_outputs_skipped_or_left() {
        let parent =
            |step: &str, status, output| ParentState { id: Uuid::now_v7(), step_id: Some(step.into()), status, output };
        let a = parent("a", TaskStatus::Succeeded, Some(serde_json::json!({"n": 1})));
        let b = parent("b", TaskStatus::Failed, None);
        let running = parent("r", TaskStatus::Leased, None);
        let skipped = parent("s", TaskStatus::Skipped, None);
        let input = serde_json::json!({"x": 7});
        let decide = |condition, parents: &[&ParentState]| {
            let parents: Vec<ParentState> = parents.iter().map(|p| (*p).clone()).collect();
            decide_blocked(condition, &parents, &input)
        };
        assert_eq!(
            decide(Condition::AllSucceeded, &[&a]),
            Some(Some(serde_json::json!({"input": {"x": 7}, "parents": {"a": {"n": 1}}})))
        );
        assert_eq!(decide(Condition::AllSucceeded, &[&a, &b]), Some(None), "a failed parent skips it");
        assert_eq!(decide(Condition::AllSucceeded, &[&skipped]), Some(None), "so does a skipped one");
        assert_eq!(
            decide(Condition::AnyFailed, &[&a, &b]),
            Some(Some(serde_json::json!({"input": {"x": 7}, "parents": {"a": {"n": 1}, "b": null}})))
        );
        assert_eq!(decide(Condition::AnyFailed, &[&a]), Some(None));
        assert_eq!(decide(Condition::AllSucceeded, &[&a, &running]), None, "it waits for an open parent");
        assert_eq!(decide(Condition::Always, &[&b, &running]), None);
        let no_step = ParentState { step_id: None, ..a.clone() };
        assert_eq!(
            decide(Condition::Always, &[&b, &no_step]),
            Some(Some(
                serde_json::json!({"input": {"x": 7}, "parents": {"b": null, no_step.id.to_string(): {"n": 1}}})
            ))
        );
    }

    fn step(id: &str, deps: &[&str]) -> Step {
        Step {
            id: id.into(),
            kind: StepKind::Noop,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            queue: String::new(),
            config: serde_json::json!({}),
            retry_policy: None,
            timeout_ms: None,
            condition: Condition::AllSucceeded,
            priority: Priority::Normal,
        }
    }

    #[test]
    fn diamond_is_valid() {
        let steps = vec![step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["b", "c"])];
        assert!(validate_dag(&steps).is_empty());
        assert_eq!(leaf_steps(&steps), vec!["d"]);
    }

    #[test]
    fn cycles_are_reported_as_paths() {
        let steps = vec![step("a", &["c"]), step("b", &["a"]), step("c", &["b"]), step("d", &[])];
        let v = validate_dag(&steps);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "workflow.steps");
        assert!(v[0].description.contains("a -> c -> b -> a"), "{}", v[0].description);
    }

    #[test]
    fn unknown_duplicate_and_self_dependencies() {
        let steps = vec![step("a", &["a"]), step("a", &[]), step("b", &["zz", "a", "a"])];
        let fields: Vec<String> = validate_dag(&steps).into_iter().map(|v| v.field).collect();
        assert!(fields.contains(&"workflow.steps[1].id".to_string()));
        assert!(fields.contains(&"workflow.steps[0].depends_on[0]".to_string()));
        assert!(fields.contains(&"workflow.steps[2].depends_on[0]".to_string()));
        assert!(fields.contains(&"workflow.steps[2].depends_on[2]".to_string()));
    }

    #[test]
    fn conditions() {
        use TaskStatus::*;
        assert_eq!(condition_met(Condition::AllSucceeded, &[Succeeded, Succeeded]), Some(true));
        assert_eq!(condition_met(Condition::AllSucceeded, &[Succeeded, Skipped]), Some(false));
        assert_eq!(condition_met(Condition::AnyFailed, &[Succeeded, Failed]), Some(true));
        assert_eq!(condition_met(Condition::AnyFailed, &[Succeeded]), Some(false));
        assert_eq!(condition_met(Condition::Always, &[Failed, Cancelled]), Some(true));
        assert_eq!(condition_met(Condition::Always, &[Leased]), None);
        assert_eq!(run_outcome(&[Succeeded, Skipped]), RunStatus::Succeeded);
        assert_eq!(run_outcome(&[Failed, Succeeded]), RunStatus::Failed);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy { max_attempts: 5, initial_backoff_ms: 100, max_backoff_ms: 1000, multiplier: 3.0 };
        assert_eq!(p.backoff_ms(2), 100);
        assert_eq!(p.backoff_ms(3), 300);
        assert_eq!(p.backoff_ms(4), 900);
        assert_eq!(p.backoff_ms(5), 1000);
    }
}
