//! gRPC adapter for `tmws.v1.WorkflowService`: validate the request's shape, take the caller's
//! principal, convert, call the workflow service, convert back.

use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    EventStream,
    convert::{
        duration_secs, enum_value, json_to_struct, parse_id, parse_optional_id, struct_to_json, timestamp, to_timestamp,
    },
};
use crate::{
    auth::{Scope, principal, request_context},
    error::{Error, Result},
    pb::{self, workflow_service_server::WorkflowService as WorkflowServiceRpc},
    store::workflow::{RunFilter, TaskFilter},
    workflow::{
        Condition, EventPayload, Priority, Run, RunStatus, StepKind, Task, TaskStatus, Workflow, WorkflowService,
        engine::{RetryDraft, StepDraft, TaskDraft, WatchItem, WorkflowDraft},
    },
};

#[derive(Clone)]
pub struct WorkflowApi {
    service: WorkflowService,
}

impl WorkflowApi {
    pub fn new(service: WorkflowService) -> Self {
        Self { service }
    }
}

fn ms(field: &str, d: Option<&prost_types::Duration>) -> Result<Option<i64>> {
    match d {
        None => Ok(None),
        Some(d) => {
            let secs = duration_secs(field, d)?;
            if secs < 0.0 {
                return Err(Error::invalid(field, "must not be negative"));
            }
            Ok(Some((secs * 1000.0).round() as i64))
        }
    }
}

fn pb_duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

fn retry(field: &str, r: Option<pb::RetryPolicy>) -> Result<Option<RetryDraft>> {
    let Some(r) = r else { return Ok(None) };
    Ok(Some(RetryDraft {
        max_attempts: r.max_attempts,
        initial_backoff_ms: ms(&format!("{field}.initial_backoff"), r.initial_backoff.as_ref())?,
        max_backoff_ms: ms(&format!("{field}.max_backoff"), r.max_backoff.as_ref())?,
        multiplier: r.multiplier,
    }))
}

fn retry_to_pb(r: &crate::workflow::RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff: Some(pb_duration(r.initial_backoff_ms)),
        max_backoff: Some(pb_duration(r.max_backoff_ms)),
        multiplier: r.multiplier,
    }
}

fn priority(field: &str, v: i32) -> Result<Priority> {
    Ok(match enum_value::<pb::TaskPriority>(field, v)? {
        pb::TaskPriority::Unspecified | pb::TaskPriority::Normal => Priority::Normal,
        pb::TaskPriority::Low => Priority::Low,
        pb::TaskPriority::High => Priority::High,
        pb::TaskPriority::Critical => Priority::Critical,
    })
}

fn priority_to_pb(p: Priority) -> pb::TaskPriority {
    match p {
        Priority::Low => pb::TaskPriority::Low,
        Priority::Normal => pb::TaskPriority::Normal,
        Priority::High => pb::TaskPriority::High,
        Priority::Critical => pb::TaskPriority::Critical,
    }
}

fn kind_to_pb(k: StepKind) -> pb::StepKind {
    match k {
        StepKind::Task => pb::StepKind::Task,
        StepKind::Delay => pb::StepKind::Delay,
        StepKind::MemoryWrite => pb::StepKind::MemoryWrite,
        StepKind::Noop => pb::StepKind::Noop,
    }
}

fn condition_to_pb(c: Condition) -> pb::StepCondition {
    match c {
        Condition::AllSucceeded => pb::StepCondition::AllSucceeded,
        Condition::AnyFailed => pb::StepCondition::AnyFailed,
        Condition::Always => pb::StepCondition::Always,
    }
}

fn run_status_to_pb(s: RunStatus) -> pb::RunStatus {
    match s {
        RunStatus::Pending => pb::RunStatus::Pending,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::Cancelled => pb::RunStatus::Cancelled,
        RunStatus::TimedOut => pb::RunStatus::TimedOut,
    }
}

fn run_status(field: &str, v: i32) -> Result<RunStatus> {
    Ok(match enum_value::<pb::RunStatus>(field, v)? {
        pb::RunStatus::Unspecified => return Err(Error::invalid(field, "must not be UNSPECIFIED")),
        pb::RunStatus::Pending => RunStatus::Pending,
        pb::RunStatus::Running => RunStatus::Running,
        pb::RunStatus::Succeeded => RunStatus::Succeeded,
        pb::RunStatus::Failed => RunStatus::Failed,
        pb::RunStatus::Cancelled => RunStatus::Cancelled,
        pb::RunStatus::TimedOut => RunStatus::TimedOut,
    })
}

fn task_status_to_pb(s: TaskStatus) -> pb::TaskStatus {
    match s {
        TaskStatus::Blocked => pb::TaskStatus::Blocked,
        TaskStatus::Queued => pb::TaskStatus::Queued,
        TaskStatus::Leased => pb::TaskStatus::Leased,
        TaskStatus::Succeeded => pb::TaskStatus::Succeeded,
        TaskStatus::Failed => pb::TaskStatus::Failed,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
        TaskStatus::Skipped => pb::TaskStatus::Skipped,
    }
}

fn task_status(field: &str, v: i32) -> Result<TaskStatus> {
    Ok(match enum_value::<pb::TaskStatus>(field, v)? {
        pb::TaskStatus::Unspecified => return Err(Error::invalid(field, "must not be UNSPECIFIED")),
        pb::TaskStatus::Blocked => TaskStatus::Blocked,
        pb::TaskStatus::Queued => TaskStatus::Queued,
        pb::TaskStatus::Leased => TaskStatus::Leased,
        pb::TaskStatus::Succeeded => TaskStatus::Succeeded,
        pb::TaskStatus::Failed => TaskStatus::Failed,
        pb::TaskStatus::Cancelled => TaskStatus::Cancelled,
        pb::TaskStatus::Skipped => TaskStatus::Skipped,
    })
}

fn workflow_draft(w: pb::Workflow) -> Result<WorkflowDraft> {
    let mut steps = Vec::with_capacity(w.steps.len());
    for (i, s) in w.steps.into_iter().enumerate() {
        let f = format!("workflow.steps[{i}]");
        let kind = match enum_value::<pb::StepKind>(&format!("{f}.kind"), s.kind)? {
            pb::StepKind::Unspecified => None,
            pb::StepKind::Task => Some(StepKind::Task),
            pb::StepKind::Delay => Some(StepKind::Delay),
            pb::StepKind::MemoryWrite => Some(StepKind::MemoryWrite),
            pb::StepKind::Noop => Some(StepKind::Noop),
        };
        let condition = match enum_value::<pb::StepCondition>(&format!("{f}.condition"), s.condition)? {
            pb::StepCondition::Unspecified | pb::StepCondition::AllSucceeded => Condition::AllSucceeded,
            pb::StepCondition::AnyFailed => Condition::AnyFailed,
            pb::StepCondition::Always => Condition::Always,
        };
        steps.push(StepDraft {
            id: s.id,
            kind,
            depends_on: s.depends_on,
            queue: s.queue,
            config: s.config.map(struct_to_json).unwrap_or_else(|| serde_json::json!({})),
            retry_policy: retry(&format!("{f}.retry_policy"), s.retry_policy)?,
            timeout_ms: ms(&format!("{f}.timeout"), s.timeout.as_ref())?,
            condition,
            priority: priority(&format!("{f}.priority"), s.priority)?,
        });
    }
    Ok(WorkflowDraft {
        name: w.name,
        description: w.description,
        steps,
        retry_policy: retry("workflow.retry_policy", w.retry_policy)?,
        timeout_ms: ms("workflow.timeout", w.timeout.as_ref())?,
        labels: w.labels,
    })
}

fn workflow_to_pb(w: Workflow) -> pb::Workflow {
    pb::Workflow {
        id: w.id.to_string(),
        namespace: w.namespace,
        name: w.name,
        version: w.version,
        description: w.description,
        steps: w
            .definition
            .steps
            .into_iter()
            .map(|s| pb::Step {
                id: s.id,
                kind: kind_to_pb(s.kind) as i32,
                depends_on: s.depends_on,
                queue: s.queue,
                config: Some(json_to_struct(s.config)),
                retry_policy: s.retry_policy.as_ref().map(retry_to_pb),
                timeout: s.timeout_ms.map(pb_duration),
                condition: condition_to_pb(s.condition) as i32,
                priority: priority_to_pb(s.priority) as i32,
            })
            .collect(),
        retry_policy: w.definition.retry_policy.as_ref().map(retry_to_pb),
        timeout: w.definition.timeout_ms.map(pb_duration),
        labels: w.labels,
        create_time: Some(to_timestamp(w.create_time)),
        etag: format!("v{}", w.version),
    }
}

fn opt_struct(v: Option<serde_json::Value>) -> Option<prost_types::Struct> {
    v.map(json_to_struct)
}

fn task_to_pb(t: Task) -> pb::Task {
    pb::Task {
        id: t.id.to_string(),
        namespace: t.namespace,
        run_id: t.run_id.map(|r| r.to_string()).unwrap_or_default(),
        step_id: t.step_id.unwrap_or_default(),
        kind: kind_to_pb(t.kind) as i32,
        title: t.title,
        description: t.description,
        queue: t.queue,
        priority: priority_to_pb(t.priority) as i32,
        depends_on: t.depends_on.iter().map(Uuid::to_string).collect(),
        status: task_status_to_pb(t.status) as i32,
        attempt: t.attempt,
        max_attempts: t.max_attempts,
        input: Some(json_to_struct(t.input)),
        output: opt_struct(t.output),
        error: t.error,
        worker_id: t.worker_id,
        lease_expire_time: t.lease_expire_time.map(to_timestamp),
        due_time: t.due_time.map(to_timestamp),
        create_time: Some(to_timestamp(t.create_time)),
        update_time: Some(to_timestamp(t.update_time)),
        attempts: t
            .attempts
            .into_iter()
            .map(|a| pb::TaskAttempt {
                attempt: a.attempt,
                worker_id: a.worker_id,
                start_time: Some(to_timestamp(a.start_time)),
                end_time: a.end_time.map(to_timestamp),
                status: task_status_to_pb(a.status) as i32,
                error: a.error,
            })
            .collect(),
        progress: opt_struct(t.progress),
    }
}

fn run_to_pb(r: Run) -> pb::Run {
    pb::Run {
        id: r.id.to_string(),
        namespace: r.namespace,
        workflow_id: r.workflow_id.to_string(),
        workflow_name: r.workflow_name,
        workflow_version: r.workflow_version,
        input: Some(json_to_struct(r.input)),
        status: run_status_to_pb(r.status) as i32,
        steps: r
            .tasks
            .into_iter()
            .map(|t| pb::StepState {
                step_id: t.step_id.unwrap_or_default(),
                task_id: t.id.to_string(),
                status: task_status_to_pb(t.status) as i32,
                attempt: t.attempt,
                start_time: t.attempts.first().map(|a| to_timestamp(a.start_time)),
                end_time: if t.status.is_terminal() { Some(to_timestamp(t.update_time)) } else { None },
                output: opt_struct(t.output),
                error: t.error,
            })
            .collect(),
        output: opt_struct(r.output),
        error: r.error,
        create_time: Some(to_timestamp(r.create_time)),
        start_time: r.start_time.map(to_timestamp),
        end_time: r.end_time.map(to_timestamp),
        deadline: r.deadline.map(to_timestamp),
        request_id: r.request_id.unwrap_or_default(),
    }
}

fn opt_request_id(r: &str) -> Option<&str> {
    (!r.is_empty()).then_some(r)
}

fn lease_token(s: &str) -> Result<Uuid> {
    parse_id("lease_token", s)
}

#[tonic::async_trait]
impl WorkflowServiceRpc for WorkflowApi {
    async fn create_workflow(
        &self,
        request: Request<pb::CreateWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let w = r.workflow.ok_or_else(|| Error::invalid("workflow", "required"))?;
        let wf = self
            .service
            .create_workflow(&p, &ctx, &r.namespace, workflow_draft(w)?, opt_request_id(&r.request_id))
            .await?;
        Ok(Response::new(workflow_to_pb(wf)))
    }

    async fn get_workflow(&self, request: Request<pb::GetWorkflowRequest>) -> Result<Response<pb::Workflow>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let id = parse_optional_id("id", &r.id)?;
        let wf = self.service.get_workflow(&p, &r.namespace, id, &r.name, r.version).await?;
        Ok(Response::new(workflow_to_pb(wf)))
    }

    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let (workflows, next_page_token) =
            self.service.list_workflows(&p, &r.namespace, &r.name, r.latest_only, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListWorkflowsResponse {
            workflows: workflows.into_iter().map(workflow_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn delete_workflow(
        &self,
        request: Request<pb::DeleteWorkflowRequest>,
    ) -> Result<Response<pb::DeleteWorkflowResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let id = parse_id("id", &r.id)?;
        if !r.etag.is_empty() {
            let current = self.service.get_workflow(&p, &r.namespace, Some(id), "", 0).await?;
            if format!("v{}", current.version) != r.etag {
                return Err(Error::Aborted("etag mismatch".into()).into());
            }
        }
        self.service.delete_workflow(&p, &ctx, &r.namespace, id).await?;
        Ok(Response::new(pb::DeleteWorkflowResponse {}))
    }

    async fn start_run(&self, request: Request<pb::StartRunRequest>) -> Result<Response<pb::Run>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let workflow_id = parse_optional_id("workflow_id", &r.workflow_id)?;
        let input = r.input.map(struct_to_json).unwrap_or_else(|| serde_json::json!({}));
        let run = self
            .service
            .start_run(
                &p,
                &ctx,
                &r.namespace,
                workflow_id,
                &r.workflow_name,
                r.workflow_version,
                input,
                opt_request_id(&r.request_id),
            )
            .await?;
        Ok(Response::new(run_to_pb(run)))
    }

    async fn get_run(&self, request: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let run = self.service.get_run(&p, &r.namespace, parse_id("id", &r.id)?).await?;
        Ok(Response::new(run_to_pb(run)))
    }

    async fn list_runs(&self, request: Request<pb::ListRunsRequest>) -> Result<Response<pb::ListRunsResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let statuses = r
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| run_status(&format!("statuses[{i}]"), *s))
            .collect::<Result<Vec<_>>>()?;
        let filter = RunFilter {
            workflow_id: parse_optional_id("workflow_id", &r.workflow_id)?,
            statuses,
            create_time_after: r.create_time_after.map(|t| timestamp("create_time_after", &t)).transpose()?,
            create_time_before: r.create_time_before.map(|t| timestamp("create_time_before", &t)).transpose()?,
        };
        let (runs, next_page_token) =
            self.service.list_runs(&p, &r.namespace, filter, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListRunsResponse { runs: runs.into_iter().map(run_to_pb).collect(), next_page_token }))
    }

    async fn cancel_run(&self, request: Request<pb::CancelRunRequest>) -> Result<Response<pb::Run>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let run = self.service.cancel_run(&p, &ctx, &r.namespace, parse_id("id", &r.id)?, &r.reason).await?;
        Ok(Response::new(run_to_pb(run)))
    }

    type WatchRunStream = EventStream<pb::RunEvent>;

    async fn watch_run(&self, request: Request<pb::WatchRunRequest>) -> Result<Response<Self::WatchRunStream>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let rx = self.service.watch_run(&p, &r.namespace, parse_id("id", &r.id)?, r.after_sequence).await?;
        let stream = ReceiverStream::new(rx).map(|item| match item {
            Ok(WatchItem::Snapshot(run)) => Ok(pb::RunEvent {
                sequence: run.last_sequence,
                time: Some(to_timestamp(chrono::Utc::now())),
                event: Some(pb::run_event::Event::Snapshot(run_to_pb(*run))),
            }),
            Ok(WatchItem::Event(e)) => Ok(pb::RunEvent {
                sequence: e.sequence,
                time: Some(to_timestamp(e.time)),
                event: Some(match e.payload {
                    EventPayload::RunStatus(s) => pb::run_event::Event::RunStatus(run_status_to_pb(s) as i32),
                    EventPayload::Task(t) => pb::run_event::Event::Task(task_to_pb(*t)),
                }),
            }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_task(&self, request: Request<pb::CreateTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let t = r.task.ok_or_else(|| Error::invalid("task", "required"))?;
        let depends_on = t
            .depends_on
            .iter()
            .enumerate()
            .map(|(i, d)| parse_id(&format!("task.depends_on[{i}]"), d))
            .collect::<Result<Vec<_>>>()?;
        let draft = TaskDraft {
            title: t.title,
            description: t.description,
            queue: t.queue,
            priority: priority("task.priority", t.priority)?,
            depends_on,
            input: t.input.map(struct_to_json).unwrap_or_else(|| serde_json::json!({})),
            due_time: t.due_time.map(|d| timestamp("task.due_time", &d)).transpose()?,
            retry_policy: retry("retry_policy", r.retry_policy)?,
        };
        let task = self.service.create_task(&p, &ctx, &r.namespace, draft, opt_request_id(&r.request_id)).await?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let task = self.service.get_task(&p, &r.namespace, parse_id("id", &r.id)?).await?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::WorkflowRead)?;
        let r = request.into_inner();
        let statuses = r
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| task_status(&format!("statuses[{i}]"), *s))
            .collect::<Result<Vec<_>>>()?;
        let min_priority = if r.min_priority == 0 { None } else { Some(priority("min_priority", r.min_priority)?) };
        let filter = TaskFilter {
            queue: (!r.queue.is_empty()).then_some(r.queue),
            statuses,
            run_id: parse_optional_id("run_id", &r.run_id)?,
            min_priority,
        };
        let (tasks, next_page_token) =
            self.service.list_tasks(&p, &r.namespace, filter, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListTasksResponse { tasks: tasks.into_iter().map(task_to_pb).collect(), next_page_token }))
    }

    async fn claim_tasks(
        &self,
        request: Request<pb::ClaimTasksRequest>,
    ) -> Result<Response<pb::ClaimTasksResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::Worker)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let lease = ms("lease_duration", r.lease_duration.as_ref())?;
        let wait = ms("wait", r.wait.as_ref())?;
        let leased =
            self.service.claim_tasks(&p, &ctx, &r.namespace, &r.queue, &r.worker_id, r.max_tasks, lease, wait).await?;
        Ok(Response::new(pb::ClaimTasksResponse {
            tasks: leased
                .into_iter()
                .map(|l| pb::LeasedTask { task: Some(task_to_pb(l.task)), lease_token: l.lease_token.to_string() })
                .collect(),
        }))
    }

    async fn heartbeat_task(&self, request: Request<pb::HeartbeatTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::Worker)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let lease = ms("lease_duration", r.lease_duration.as_ref())?;
        let task = self
            .service
            .heartbeat(
                &p,
                &ctx,
                &r.namespace,
                parse_id("id", &r.id)?,
                lease_token(&r.lease_token)?,
                lease,
                r.progress.map(struct_to_json),
            )
            .await?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn complete_task(&self, request: Request<pb::CompleteTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::Worker)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let output = r.output.map(struct_to_json).unwrap_or_else(|| serde_json::json!({}));
        let task = self
            .service
            .complete_task(&p, &ctx, &r.namespace, parse_id("id", &r.id)?, lease_token(&r.lease_token)?, output)
            .await?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::Worker)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let task = self
            .service
            .fail_task(
                &p,
                &ctx,
                &r.namespace,
                parse_id("id", &r.id)?,
                lease_token(&r.lease_token)?,
                &r.error,
                r.retryable,
            )
            .await?;
        Ok(Response::new(task_to_pb(task)))
    }
}
