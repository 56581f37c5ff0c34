//! WorkflowService: DAG runs with real workers (tokio tasks using the generated client).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_stream::StreamExt;
use tonic::Code;

use crate::{
    common::{AuthChannel, count_rows, execute_sql, fresh_database, spawn_app_env, spawn_secure, test_env},
    memory::assert_invalid,
};
use tmws::{
    api::convert::{json_to_struct, struct_to_json},
    pb::{self, workflow_service_client::WorkflowServiceClient},
};

pub type Client = WorkflowServiceClient<AuthChannel>;

/// Fast engine timings for tests.
pub const FAST: [(&str, &str); 3] =
    [("TMWS_ENGINE_TICK", "50ms"), ("TMWS_DEFAULT_INITIAL_BACKOFF", "50ms"), ("TMWS_DEFAULT_MAX_BACKOFF", "200ms")];

pub fn step(id: &str, kind: pb::StepKind, deps: &[&str]) -> pb::Step {
    pb::Step {
        id: id.into(),
        kind: kind as i32,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        queue: if kind == pb::StepKind::Task { "work".into() } else { String::new() },
        ..Default::default()
    }
}

pub fn task(id: &str, deps: &[&str]) -> pb::Step {
    step(id, pb::StepKind::Task, deps)
}

pub fn workflow(name: &str, steps: Vec<pb::Step>) -> pb::CreateWorkflowRequest {
    pb::CreateWorkflowRequest {
        workflow: Some(pb::Workflow { name: name.into(), steps, ..Default::default() }),
        ..Default::default()
    }
}

pub fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: s, nanos: 0 })
}

pub fn millis(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

pub async fn start(client: &mut Client, name: &str, input: serde_json::Value) -> pb::Run {
    client
        .start_run(pb::StartRunRequest {
            workflow_name: name.into(),
            input: Some(json_to_struct(input)),
            ..Default::default()
        })
        .await
        .expect("start run")
        .into_inner()
}

pub async fn claim(client: &mut Client, queue: &str, worker: &str, max: i32, wait_ms: i64) -> Vec<pb::LeasedTask> {
    client
        .claim_tasks(pb::ClaimTasksRequest {
            queue: queue.into(),
            worker_id: worker.into(),
            max_tasks: max,
            wait: millis(wait_ms),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner()
        .tasks
}

pub async fn complete(
    client: &mut Client,
    l: &pb::LeasedTask,
    output: serde_json::Value,
) -> Result<pb::Task, tonic::Status> {
    let id = l.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
    client
        .complete_task(pb::CompleteTaskRequest {
            id,
            lease_token: l.lease_token.clone(),
            output: Some(json_to_struct(output)),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn fail(
    client: &mut Client,
    l: &pb::LeasedTask,
    error: &str,
    retryable: bool,
) -> Result<pb::Task, tonic::Status> {
    let id = l.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
    client
        .fail_task(pb::FailTaskRequest {
            id,
            lease_token: l.lease_token.clone(),
            error: error.into(),
            retryable,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_run(client: &mut Client, id: &str) -> pb::Run {
    client.get_run(pb::GetRunRequest { id: id.into(), ..Default::default() }).await.expect("get run").into_inner()
}

/// Polls GetRun until the run has ended.
pub async fn wait_for_end(client: &mut Client, run_id: &str, within: Duration) -> pb::Run {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let run = get_run(client, run_id).await;
        let status = pb::RunStatus::try_from(run.status).unwrap_or(pb::RunStatus::Unspecified);
        if !matches!(status, pb::RunStatus::Running | pb::RunStatus::Pending) {
            return run;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {run_id} did not end: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step_state<'a>(run: &'a pb::Run, id: &str) -> &'a pb::StepState {
    run.steps.iter().find(|s| s.step_id == id).unwrap_or_else(|| panic!("no step {id}"))
}

/// A worker loop: claims from `queue` and completes every task with `{"step": id, "by": worker}`
/// until `stop`; records how many times each task id was completed.
pub fn spawn_worker(
    mut client: Client,
    queue: &'static str,
    worker: String,
    done: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let leased = claim(&mut client, queue, &worker, 5, 200).await;
            for l in leased {
                let t = l.task.clone().unwrap_or_default();
                let out = serde_json::json!({ "step": t.step_id, "by": worker });
                complete(&mut client, &l, out).await.expect("complete");
                *done.lock().expect("lock").entry(t.id).or_default() += 1;
            }
        }
    })
}

#[tokio::test]
async fn diamond_passes_parent_outputs_down() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let wf = c
        .create_workflow(workflow(
            "diamond",
            vec![task("a", &[]), task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])],
        ))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(wf.version, 1);
    let run = start(&mut c, "diamond", serde_json::json!({"topic": "rust"})).await;
    assert_eq!(run.status, pb::RunStatus::Running as i32);
    assert_eq!(step_state(&run, "a").status, pb::TaskStatus::Queued as i32);
    assert_eq!(step_state(&run, "d").status, pb::TaskStatus::Blocked as i32);

    // Work through the DAG: each task's output names its step.
    let mut seen_d_input = None;
    for _ in 0..4 {
        let leased = claim(&mut c, "work", "w1", 10, 2000).await;
        for l in leased {
            let t = l.task.clone().expect("task");
            if t.step_id == "d" {
                seen_d_input = t.input.clone().map(struct_to_json);
            }
            complete(&mut c, &l, serde_json::json!({ "from": t.step_id })).await.expect("complete");
        }
    }
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(10)).await;
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32, "{run:?}");
    let input = seen_d_input.expect("d ran");
    assert_eq!(input["input"]["topic"], "rust", "run input reaches every task");
    assert_eq!(input["parents"]["b"]["from"], "b");
    assert_eq!(input["parents"]["c"]["from"], "c");
    let output = struct_to_json(run.output.expect("output"));
    assert_eq!(output, serde_json::json!({"d": {"from": "d"}}), "the run's output is its leaves' outputs");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn fan_out_of_50_with_8_workers_completes_each_task_once() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mut steps = vec![step("start", pb::StepKind::Noop, &[])];
    let ids: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    for id in &ids {
        steps.push(task(id, &["start"]));
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    steps.push(step("join", pb::StepKind::Noop, &refs));
    c.create_workflow(workflow("fan", steps)).await.expect("create");
    let run = start(&mut c, "fan", serde_json::json!({})).await;

    let done = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> =
        (0..8).map(|i| spawn_worker(app.workflow(), "work", format!("w{i}"), done.clone(), stop.clone())).collect();
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(30)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32);
    let done = done.lock().expect("lock").clone();
    assert_eq!(done.len(), 50);
    assert!(done.values().all(|n| *n == 1), "a task was completed twice: {done:?}");
    assert_eq!(run.steps.len(), 52);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn a_dead_workers_task_is_retried_after_its_lease_expires() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("one", vec![task("only", &[])])).await.expect("create");
    let run = start(&mut c, "one", serde_json::json!({})).await;
    // The first worker leases for one second and dies.
    let first = c
        .claim_tasks(pb::ClaimTasksRequest {
            queue: "work".into(),
            worker_id: "doomed".into(),
            max_tasks: 1,
            lease_duration: secs(1),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner()
        .tasks;
    assert_eq!(first.len(), 1);
    assert!(claim(&mut c, "work", "other", 1, 0).await.is_empty(), "a leased task is not handed out twice");

    let second = claim(&mut c, "work", "survivor", 1, 5000).await;
    assert_eq!(second.len(), 1, "the task came back after the lease expired");
    let t = second[0].task.clone().expect("task");
    assert_eq!(t.attempt, 2);
    // The dead worker's late completion is refused; the survivor's is recorded.
    let late = complete(&mut c, &first[0], serde_json::json!({"late": true})).await.expect_err("stale token");
    assert_eq!(late.code(), Code::FailedPrecondition);
    let done = complete(&mut c, &second[0], serde_json::json!({"ok": true})).await.expect("complete");
    assert_eq!(done.attempts.len(), 2);
    assert_eq!(done.attempts[0].status, pb::TaskStatus::Failed as i32);
    assert!(done.attempts[0].error.contains("lease expired"), "{:?}", done.attempts[0]);
    // A duplicate completion with the same token is idempotent; the output is recorded once.
    let again = complete(&mut c, &second[0], serde_json::json!({"ok": "different"})).await.expect("idempotent");
    assert_eq!(struct_to_json(again.output.expect("output")), serde_json::json!({"ok": true}));
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn a_permanent_failure_fails_the_run_and_runs_compensation() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mut flaky = task("charge", &[]);
    flaky.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: millis(50),
        max_backoff: millis(100),
        multiplier: 2.0,
    });
    let mut refund = task("refund", &["charge"]);
    refund.queue = "compensation".into();
    refund.condition = pb::StepCondition::AnyFailed as i32;
    let ship = task("ship", &["charge"]);
    let mut notify = step("notify", pb::StepKind::Noop, &["ship", "refund"]);
    notify.condition = pb::StepCondition::Always as i32;
    c.create_workflow(workflow("order", vec![flaky, refund, ship, notify])).await.expect("create");
    let run = start(&mut c, "order", serde_json::json!({})).await;

    for attempt in 1..=2 {
        let l = claim(&mut c, "work", "w", 1, 5000).await;
        assert_eq!(l.len(), 1, "attempt {attempt}");
        assert_eq!(l[0].task.as_ref().map(|t| t.attempt), Some(attempt));
        fail(&mut c, &l[0], "card declined", true).await.expect("fail");
    }
    let comp = claim(&mut c, "compensation", "w", 1, 5000).await;
    assert_eq!(comp.len(), 1, "the compensation step is queued");
    complete(&mut c, &comp[0], serde_json::json!({"refunded": true})).await.expect("complete");
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Failed as i32);
    assert!(run.error.contains("card declined"), "{}", run.error);
    assert_eq!(step_state(&run, "charge").status, pb::TaskStatus::Failed as i32);
    assert_eq!(step_state(&run, "refund").status, pb::TaskStatus::Succeeded as i32);
    assert_eq!(step_state(&run, "ship").status, pb::TaskStatus::Skipped as i32);
    assert_eq!(step_state(&run, "notify").status, pb::TaskStatus::Succeeded as i32);

    // retryable=false skips the remaining attempts.
    c.create_workflow(workflow("once", vec![task("x", &[])])).await.expect("create");
    let run = start(&mut c, "once", serde_json::json!({})).await;
    let l = claim(&mut c, "work", "w", 1, 5000).await;
    let t = fail(&mut c, &l[0], "bad input", false).await.expect("fail");
    assert_eq!(t.status, pb::TaskStatus::Failed as i32);
    assert_eq!(t.attempt, 1);
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Failed as i32);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn a_failure_skips_down_its_chain_while_a_join_waits_for_its_other_branch() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    // a -> b -> c, and x; j joins c and x whatever happened to them; z waits for c to succeed;
    // y stands alone.
    let mut join = step("j", pb::StepKind::Noop, &["c", "x"]);
    join.condition = pb::StepCondition::Always as i32;
    let mut solo = task("x", &[]);
    solo.queue = "side".into();
    let mut leaf = task("y", &[]);
    leaf.queue = "leaf".into();
    let steps = vec![task("a", &[]), task("b", &["a"]), task("c", &["b"]), solo, join, task("z", &["c"]), leaf];
    c.create_workflow(workflow("skips", steps)).await.expect("create");
    let run = start(&mut c, "skips", serde_json::json!({})).await;

    let a = claim(&mut c, "work", "w", 1, 2000).await;
    assert_eq!(a.len(), 1);
    fail(&mut c, &a[0], "broken", false).await.expect("fail");
    // The skips ran down the chain in the FailTask call itself; j still waits for x.
    let now = get_run(&mut c, &run.id).await;
    assert_eq!(now.status, pb::RunStatus::Running as i32, "{now:?}");
    for s in ["b", "c", "z"] {
        assert_eq!(step_state(&now, s).status, pb::TaskStatus::Skipped as i32, "{s}: {now:?}");
    }
    assert_eq!(step_state(&now, "j").status, pb::TaskStatus::Blocked as i32);
    assert_eq!(step_state(&now, "x").status, pb::TaskStatus::Queued as i32);
    // A task without children ending while other branches are open leaves the run running.
    let y = claim(&mut c, "leaf", "w", 1, 2000).await;
    assert_eq!(y.len(), 1);
    complete(&mut c, &y[0], serde_json::json!({"leaf": 1})).await.expect("complete");
    let now = get_run(&mut c, &run.id).await;
    assert_eq!(now.status, pb::RunStatus::Running as i32, "{now:?}");

    let x = claim(&mut c, "side", "w", 1, 2000).await;
    assert_eq!(x.len(), 1);
    complete(&mut c, &x[0], serde_json::json!({"side": 1})).await.expect("complete");
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Failed as i32, "{run:?}");
    assert_eq!(step_state(&run, "j").status, pb::TaskStatus::Succeeded as i32, "the join ran: {run:?}");
    assert!(run.error.contains("step a: broken"), "{}", run.error);

    // A failure that leaves nothing open ends the run in the same call.
    c.create_workflow(workflow("chain", vec![task("p", &[]), task("q", &["p"]), task("r", &["q"])]))
        .await
        .expect("create");
    let run = start(&mut c, "chain", serde_json::json!({})).await;
    let p = claim(&mut c, "work", "w", 1, 2000).await;
    fail(&mut c, &p[0], "no", false).await.expect("fail");
    let now = get_run(&mut c, &run.id).await;
    assert_eq!(now.status, pb::RunStatus::Failed as i32, "{now:?}");
    assert_eq!(step_state(&now, "r").status, pb::TaskStatus::Skipped as i32);
    app.stop().await.expect("stop");
}

/// Claims the steps of a linear run from `work` one at a time, checking each is the next one
/// queued, and completes each with `{"done": step}`.
async fn work_in_order(c: &mut Client, steps: &[&str]) {
    for step in steps {
        let l = claim(c, "work", "w", 1, 2000).await;
        assert_eq!(l.len(), 1, "step {step} is queued");
        assert_eq!(l[0].task.as_ref().map(|t| t.step_id.as_str()), Some(*step));
        complete(c, &l[0], serde_json::json!({ "done": step })).await.expect("complete");
    }
}

#[tokio::test]
async fn a_run_started_before_the_upgrade_advances_after_it() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("upgrade", vec![task("a", &[]), task("b", &["a"]), task("c", &["b"])]))
        .await
        .expect("create");
    let run = start(&mut c, "upgrade", serde_json::json!({"v": 1})).await;
    app.stop().await.expect("stop");
    // The database as the previous release left it: without the index of open run tasks and,
    // on SQLite, without the dependency edges of run tasks; the restart migrates it again.
    if env.is_postgres() {
        execute_sql(&db, &["DROP INDEX tasks_run_open", "DELETE FROM _sqlx_migrations WHERE version = 15"]).await;
    } else {
        execute_sql(
            &db,
            &[
                "DELETE FROM task_dependencies",
                "DROP INDEX tasks_run_open",
                "DELETE FROM _sqlx_migrations WHERE version = 4",
            ],
        )
        .await;
    }
    let app = spawn_secure(&db, &FAST).await;
    if !env.is_postgres() {
        assert_eq!(count_rows(&db, "task_dependencies").await, 2, "the run's edges are back");
    }
    let mut c = app.workflow();
    work_in_order(&mut c, &["a", "b", "c"]).await;
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32, "{run:?}");
    assert_eq!(struct_to_json(run.output.expect("output")), serde_json::json!({"c": {"done": "c"}}));
    if env.is_postgres() {
        app.stop().await.expect("stop");
        return;
    }

    // On the embedded store, a run written without edges after the migration (by the previous
    // release during a rollback) still advances.
    let run = start(&mut c, "upgrade", serde_json::json!({"v": 2})).await;
    let a = claim(&mut c, "work", "w", 1, 2000).await;
    app.stop().await.expect("stop");
    execute_sql(&db, &["DELETE FROM task_dependencies"]).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    complete(&mut c, &a[0], serde_json::json!({ "done": "a" })).await.expect("complete");
    work_in_order(&mut c, &["b", "c"]).await;
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32, "{run:?}");
    assert_eq!(count_rows(&db, "task_dependencies").await, 2, "the run's edges are written back");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn cancel_stops_queued_work_and_aborts_the_leased_task() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("long", vec![task("a", &[]), task("b", &[]), task("c", &["a"])])).await.expect("create");
    let run = start(&mut c, "long", serde_json::json!({})).await;
    let leased = claim(&mut c, "work", "w", 1, 2000).await;
    assert_eq!(leased.len(), 1);
    let cancelled = c
        .cancel_run(pb::CancelRunRequest {
            id: run.id.clone(),
            reason: "operator said so".into(),
            ..Default::default()
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status, pb::RunStatus::Cancelled as i32);
    assert!(cancelled.steps.iter().all(|s| s.status == pb::TaskStatus::Cancelled as i32), "{:?}", cancelled.steps);
    assert!(claim(&mut c, "work", "w", 10, 300).await.is_empty(), "no queued work remains");

    let t = leased[0].task.clone().expect("task");
    let hb = c
        .heartbeat_task(pb::HeartbeatTaskRequest {
            id: t.id.clone(),
            lease_token: leased[0].lease_token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("heartbeat of a cancelled task");
    assert_eq!(hb.code(), Code::Aborted);
    let done = complete(&mut c, &leased[0], serde_json::json!({})).await.expect_err("complete of a cancelled task");
    assert_eq!(done.code(), Code::Aborted);
    let again = c
        .cancel_run(pb::CancelRunRequest { id: run.id.clone(), ..Default::default() })
        .await
        .expect_err("already ended");
    assert_eq!(again.code(), Code::FailedPrecondition);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn watch_streams_a_snapshot_then_every_change_in_order() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("watched", vec![task("a", &[]), step("b", pb::StepKind::Noop, &["a"])]))
        .await
        .expect("create");
    let run = start(&mut c, "watched", serde_json::json!({})).await;
    let mut stream = c
        .watch_run(pb::WatchRunRequest { id: run.id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("snapshot").expect("ok");
    assert!(matches!(first.event, Some(pb::run_event::Event::Snapshot(_))));

    let l = claim(&mut c, "work", "w", 1, 2000).await;
    complete(&mut c, &l[0], serde_json::json!({"v": 1})).await.expect("complete");

    let mut events = Vec::new();
    let mut last_seq = first.sequence;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("event in time") {
        let e = e.expect("ok");
        assert!(e.sequence > last_seq, "sequences increase");
        last_seq = e.sequence;
        events.push(e.event.expect("event"));
    }
    let describe: Vec<String> = events
        .iter()
        .map(|e| match e {
            pb::run_event::Event::Task(t) => {
                format!("{}:{:?}", t.step_id, pb::TaskStatus::try_from(t.status).unwrap_or(pb::TaskStatus::Unspecified))
            }
            pb::run_event::Event::RunStatus(s) => {
                format!("run:{:?}", pb::RunStatus::try_from(*s).unwrap_or(pb::RunStatus::Unspecified))
            }
            pb::run_event::Event::Snapshot(_) => "snapshot".into(),
        })
        .collect();
    assert_eq!(
        describe,
        vec!["a:Leased", "a:Succeeded", "b:Queued", "b:Leased", "b:Succeeded", "run:Succeeded"],
        "every change, in order, then the stream ends"
    );

    // Resuming after a sequence replays only what came after it.
    let mut resumed = c
        .watch_run(pb::WatchRunRequest { id: run.id.clone(), after_sequence: last_seq - 1, ..Default::default() })
        .await
        .expect("resume")
        .into_inner();
    let only = resumed.next().await.expect("one event").expect("ok");
    assert_eq!(only.sequence, last_seq);
    assert!(resumed.next().await.is_none());
    // Resuming after the last event of an ended run: nothing to send, the stream ends.
    let mut late = c
        .watch_run(pb::WatchRunRequest { id: run.id.clone(), after_sequence: last_seq, ..Default::default() })
        .await
        .expect("resume late")
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(5), late.next()).await.expect("the stream ends");
    assert!(end.is_none());
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn start_run_is_idempotent_and_memory_write_steps_store_memories() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mut write = step("remember", pb::StepKind::MemoryWrite, &["research"]);
    write.config = Some(json_to_struct(serde_json::json!({"kind": "finding", "tags": ["wf"], "access_level": "TEAM"})));
    c.create_workflow(workflow("research", vec![task("research", &[]), write])).await.expect("create");
    let req = pb::StartRunRequest {
        workflow_name: "research".into(),
        request_id: "start-1".into(),
        input: Some(json_to_struct(serde_json::json!({"q": "why"}))),
        ..Default::default()
    };
    let a = c.start_run(req.clone()).await.expect("start").into_inner();
    let b = c.start_run(req).await.expect("retry").into_inner();
    assert_eq!(a.id, b.id, "the same request id returns the same run");
    let runs = c.list_runs(pb::ListRunsRequest::default()).await.expect("list").into_inner();
    assert_eq!(runs.runs.len(), 1);

    let l = claim(&mut c, "work", "w", 1, 2000).await;
    complete(&mut c, &l[0], serde_json::json!({"content": "Rust workflows are durable"})).await.expect("complete");
    let run = wait_for_end(&mut c, &a.id, Duration::from_secs(10)).await;
    assert_eq!(run.status, pb::RunStatus::Succeeded as i32, "{run:?}");
    let out = struct_to_json(step_state(&run, "remember").output.clone().expect("output"));
    let memory_id = out["memory_id"].as_str().expect("memory id").to_string();
    let m = app
        .memory()
        .get_memory(pb::GetMemoryRequest { id: memory_id, ..Default::default() })
        .await
        .expect("the memory exists")
        .into_inner();
    assert_eq!(m.content, "Rust workflows are durable");
    assert_eq!(m.kind, "finding");
    assert_eq!(m.access_level, pb::AccessLevel::Team as i32);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn standalone_tasks_with_dependencies_priorities_and_heartbeats() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mk = |title: &str, prio: pb::TaskPriority, deps: Vec<String>| pb::CreateTaskRequest {
        task: Some(pb::Task {
            title: title.into(),
            queue: "jobs".into(),
            priority: prio as i32,
            depends_on: deps,
            input: Some(json_to_struct(serde_json::json!({"title": title}))),
            ..Default::default()
        }),
        ..Default::default()
    };
    let low = c.create_task(mk("low", pb::TaskPriority::Low, vec![])).await.expect("low").into_inner();
    let crit = c.create_task(mk("critical", pb::TaskPriority::Critical, vec![])).await.expect("crit").into_inner();
    let child =
        c.create_task(mk("child", pb::TaskPriority::High, vec![crit.id.clone()])).await.expect("child").into_inner();
    assert_eq!(child.status, pb::TaskStatus::Blocked as i32);
    let bad = c
        .create_task(mk("orphan", pb::TaskPriority::Low, vec![uuid::Uuid::now_v7().to_string()]))
        .await
        .expect_err("unknown dependency");
    assert_invalid(&bad, "task.depends_on[0]");

    let first = claim(&mut c, "jobs", "w", 1, 1000).await;
    assert_eq!(first[0].task.as_ref().map(|t| t.id.clone()), Some(crit.id.clone()), "priority first");
    // Heartbeat extends the lease and records progress.
    let before = first[0].task.as_ref().and_then(|t| t.lease_expire_time).expect("lease");
    let hb = c
        .heartbeat_task(pb::HeartbeatTaskRequest {
            id: crit.id.clone(),
            lease_token: first[0].lease_token.clone(),
            lease_duration: secs(120),
            progress: Some(json_to_struct(serde_json::json!({"pct": 50}))),
            ..Default::default()
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.lease_expire_time.expect("lease").seconds > before.seconds);
    assert_eq!(struct_to_json(hb.progress.expect("progress"))["pct"], 50.0);
    complete(&mut c, &first[0], serde_json::json!({"answer": 42})).await.expect("complete");

    let next = claim(&mut c, "jobs", "w", 1, 1000).await;
    let t = next[0].task.clone().expect("task");
    assert_eq!(t.id, child.id, "the unblocked child (HIGH) comes before LOW");
    let input = struct_to_json(t.input.expect("input"));
    assert_eq!(input["parents"][crit.id.as_str()]["answer"], 42.0);
    let last = claim(&mut c, "jobs", "w", 5, 1000).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].task.as_ref().map(|t| t.id.clone()), Some(low.id));

    let listed = c
        .list_tasks(pb::ListTasksRequest {
            queue: "jobs".into(),
            statuses: vec![pb::TaskStatus::Leased as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tasks.len(), 2);
    app.stop().await.expect("stop");
}

async fn get_task(client: &mut Client, id: &str) -> pb::Task {
    client.get_task(pb::GetTaskRequest { id: id.into(), ..Default::default() }).await.expect("get task").into_inner()
}

/// ClaimTasks, CompleteTask and FailTask answer with the task exactly as it is stored afterwards
/// (attempts included), through a retry, a stale token, a duplicate complete, and dependents
/// queued by a success and skipped by a failure.
#[tokio::test]
async fn worker_calls_answer_with_the_task_as_stored() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mk = |title: &str, deps: Vec<String>| pb::CreateTaskRequest {
        task: Some(pb::Task {
            title: title.into(),
            queue: "answers".into(),
            depends_on: deps,
            input: Some(json_to_struct(serde_json::json!({"title": title}))),
            ..Default::default()
        }),
        retry_policy: Some(pb::RetryPolicy { max_attempts: 3, initial_backoff: millis(50), ..Default::default() }),
        ..Default::default()
    };
    let parent = c.create_task(mk("parent", vec![])).await.expect("parent").into_inner();
    let child = c.create_task(mk("child", vec![parent.id.clone()])).await.expect("child").into_inner();
    let grandchild = c.create_task(mk("grandchild", vec![child.id.clone()])).await.expect("grandchild").into_inner();

    // First attempt: leased, then failed with a retry.
    let first = claim(&mut c, "answers", "w1", 5, 1000).await;
    assert_eq!(first.len(), 1, "only the parent is queued");
    let leased = first[0].task.clone().expect("task");
    assert_eq!(leased, get_task(&mut c, &parent.id).await);
    assert_eq!((leased.status, leased.attempt, leased.worker_id.as_str()), (pb::TaskStatus::Leased as i32, 1, "w1"));
    assert_eq!(leased.attempts.len(), 1);
    assert_eq!(leased.attempts[0].status, pb::TaskStatus::Leased as i32);
    assert!(leased.attempts[0].end_time.is_none());
    let retried = fail(&mut c, &first[0], "boom", true).await.expect("fail");
    assert_eq!(retried, get_task(&mut c, &parent.id).await);
    assert_eq!((retried.status, retried.error.as_str()), (pb::TaskStatus::Queued as i32, "boom"));
    assert_eq!(retried.attempts[0].status, pb::TaskStatus::Failed as i32);
    assert!(retried.attempts[0].end_time.is_some());

    // Second attempt, after the backoff: the first attempt stays in the list.
    let second = claim(&mut c, "answers", "w2", 1, 2000).await;
    let leased = second[0].task.clone().expect("task");
    assert_eq!(leased.id, parent.id);
    assert_eq!(leased, get_task(&mut c, &parent.id).await);
    let statuses: Vec<i32> = leased.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [pb::TaskStatus::Failed as i32, pb::TaskStatus::Leased as i32]);
    assert_eq!(leased.attempts[1].worker_id, "w2");

    // The first lease is stale; the second completes once, and a repeat gets the same answer.
    let stale = complete(&mut c, &first[0], serde_json::json!({})).await.expect_err("stale token");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let done = complete(&mut c, &second[0], serde_json::json!({"answer": 42})).await.expect("complete");
    assert_eq!(done, get_task(&mut c, &parent.id).await);
    assert_eq!(done.status, pb::TaskStatus::Succeeded as i32);
    assert_eq!(done.attempts[1].status, pb::TaskStatus::Succeeded as i32);
    assert!(done.attempts[1].end_time.is_some());
    let again = complete(&mut c, &second[0], serde_json::json!({"answer": 42})).await.expect("duplicate complete");
    assert_eq!(again, done);

    // The success queued the child with the parent's output; its final failure skips the grandchild.
    let third = claim(&mut c, "answers", "w3", 5, 1000).await;
    assert_eq!(third.len(), 1);
    let leased = third[0].task.clone().expect("task");
    assert_eq!(leased.id, child.id);
    assert_eq!(struct_to_json(leased.input.clone().expect("input"))["parents"][parent.id.as_str()]["answer"], 42.0);
    let failed = fail(&mut c, &third[0], "no retry", false).await.expect("fail");
    assert_eq!(failed, get_task(&mut c, &child.id).await);
    assert_eq!(failed.status, pb::TaskStatus::Failed as i32);
    assert_eq!(failed.attempts.len(), 1);
    assert_eq!(failed.attempts[0].error, "no retry");
    let again = fail(&mut c, &third[0], "no retry", false).await.expect("duplicate fail");
    assert_eq!(again, failed);
    assert_eq!(get_task(&mut c, &grandchild.id).await.status, pb::TaskStatus::Skipped as i32);

    // Each call that changed something is audited once, naming the tasks; a claim of many names
    // the first 20 (in the order of its answer, by id) and counts the rest.
    let mut batches = Vec::new();
    for (queue, n) in [("batch3", 3), ("batch22", 22)] {
        let mut ids = Vec::new();
        for _ in 0..n {
            let t = pb::Task { title: "t".into(), queue: queue.into(), ..Default::default() };
            let made = c.create_task(pb::CreateTaskRequest { task: Some(t), ..Default::default() }).await;
            ids.push(made.expect("create").into_inner().id);
        }
        ids.sort();
        let leased = claim(&mut c, queue, "w4", 25, 1000).await;
        let answered: Vec<String> = leased.iter().filter_map(|l| l.task.as_ref().map(|t| t.id.clone())).collect();
        assert_eq!(answered, ids, "{queue}: every task, by id");
        for l in &leased {
            let task = l.task.clone().expect("task");
            assert_eq!(task, get_task(&mut c, &task.id).await, "{queue}: claim answers as stored");
            assert_eq!(task.attempts.len(), 1);
        }
        if queue == "batch3" {
            // A task nothing waits for completes in one statement; same answer, same audit row.
            let done = complete(&mut c, &leased[0], serde_json::json!({"n": 1})).await.expect("complete");
            assert_eq!(done, get_task(&mut c, &ids[0]).await);
            assert_eq!(
                (done.status, done.attempts[0].status),
                (pb::TaskStatus::Succeeded as i32, pb::TaskStatus::Succeeded as i32)
            );
            assert!(done.lease_expire_time.is_none() && done.attempts[0].end_time.is_some());
            let again = complete(&mut c, &leased[0], serde_json::json!({"n": 1})).await.expect("repeat");
            assert_eq!(again, done);
            let mut forged = leased[1].clone();
            forged.lease_token = leased[2].lease_token.clone();
            let forged =
                complete(&mut c, &forged, serde_json::json!({})).await.map(|_| ()).expect_err("another task's token");
            assert_eq!(forged.code(), Code::FailedPrecondition);
            assert_eq!(get_task(&mut c, &ids[1]).await.status, pb::TaskStatus::Leased as i32, "untouched");
        }
        batches.push(ids);
    }
    let events = app
        .agents()
        .list_audit_events(app.admin(pb::ListAuditEventsRequest {
            namespace: "default".into(),
            page_size: 500,
            ..Default::default()
        }))
        .await
        .expect("audit events")
        .into_inner()
        .events;
    let resources = |method: &str| {
        let mut r: Vec<String> = events
            .iter()
            .filter(|e| e.method == format!("tmws.v1.WorkflowService/{method}") && e.code == "OK")
            .map(|e| e.resource_id.clone())
            .collect();
        r.sort();
        r
    };
    let mut claims = vec![parent.id.clone(), parent.id.clone(), child.id.clone(), batches[0].join(",")];
    claims.push(format!("{},... 2 more", batches[1][..20].join(",")));
    claims.sort();
    assert_eq!(resources("ClaimTasks"), claims);
    let mut completes = vec![parent.id.clone(), batches[0][0].clone()];
    completes.sort();
    assert_eq!(resources("CompleteTask"), completes, "a repeated or refused complete changes nothing");
    let mut fails = vec![parent.id.clone(), child.id.clone()];
    fails.sort();
    assert_eq!(resources("FailTask"), fails);
    app.stop().await.expect("stop");
}

/// A dependent created while its dependency completes is never left BLOCKED: whichever ends
/// first, the new task ends up QUEUED (with the dependency's output) once both calls returned.
#[tokio::test]
async fn a_dependent_created_while_its_dependency_completes_is_queued() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mk = |title: &str, deps: Vec<String>| pb::CreateTaskRequest {
        task: Some(pb::Task {
            title: title.into(),
            queue: "race".into(),
            depends_on: deps,
            input: Some(json_to_struct(serde_json::json!({}))),
            ..Default::default()
        }),
        ..Default::default()
    };
    for round in 0..40 {
        let parent = c.create_task(mk("parent", vec![])).await.expect("parent").into_inner();
        let leased = claim(&mut c, "race", "w", 1, 1000).await;
        assert_eq!(leased[0].task.as_ref().map(|t| t.id.clone()), Some(parent.id.clone()));
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (child, done) =
            tokio::join!(async move { c1.create_task(mk("child", vec![parent.id.clone()])).await }, async move {
                complete(&mut c2, &leased[0], serde_json::json!({"round": round})).await
            },);
        let child = child.expect("create child").into_inner();
        assert_eq!(done.expect("complete").status, pb::TaskStatus::Succeeded as i32);
        let stored = get_task(&mut c, &child.id).await;
        assert_eq!(stored.status, pb::TaskStatus::Queued as i32, "round {round}: the child must not stay blocked");
        let next = claim(&mut c, "race", "w", 1, 1000).await;
        let input = struct_to_json(next[0].task.clone().expect("task").input.expect("input"));
        assert_eq!(input["parents"][parent_id(&next[0])]["round"], f64::from(round));
        complete(&mut c, &next[0], serde_json::json!({})).await.expect("complete child");
    }
    app.stop().await.expect("stop");
}

/// The id of the only dependency of a leased task.
fn parent_id(l: &pb::LeasedTask) -> String {
    l.task.as_ref().and_then(|t| t.depends_on.first().cloned()).unwrap_or_default()
}

#[tokio::test]
async fn runs_time_out() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    let mut req = workflow("slow", vec![task("a", &[])]);
    if let Some(w) = req.workflow.as_mut() {
        w.timeout = millis(500);
    }
    c.create_workflow(req).await.expect("create");
    let run = start(&mut c, "slow", serde_json::json!({})).await;
    let leased = claim(&mut c, "work", "w", 1, 1000).await;
    let run = wait_for_end(&mut c, &run.id, Duration::from_secs(5)).await;
    assert_eq!(run.status, pb::RunStatus::TimedOut as i32);
    let err = complete(&mut c, &leased[0], serde_json::json!({})).await.expect_err("timed out");
    assert_eq!(err.code(), Code::Aborted);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_workflow_input_is_rejected_and_nothing_is_written() {
    let app = spawn_app_env(&[
        ("TMWS_MAX_ATTEMPTS", "10"),
        ("TMWS_MAX_PAYLOAD_BYTES", "1024"),
        ("TMWS_MAX_CLAIM_BATCH", "20"),
    ])
    .await;
    let mut c = app.workflow();
    let with = |f: &dyn Fn(&mut Vec<pb::Step>)| {
        let mut steps = vec![task("a", &[]), task("b", &["a"])];
        f(&mut steps);
        workflow("bad", steps)
    };
    let cases: Vec<(pb::CreateWorkflowRequest, &str)> = vec![
        (with(&|s| s[0].depends_on = vec!["b".into()]), "workflow.steps"),
        (with(&|s| s[1].depends_on = vec!["zz".into()]), "workflow.steps[1].depends_on[0]"),
        (with(&|s| s[1].id = "a".into()), "workflow.steps[1].id"),
        (with(&|s| s[0].kind = 99), "workflow.steps[0].kind"),
        (with(&|s| s[0].kind = 0), "workflow.steps[0].kind"),
        (with(&|s| s[0].queue = "has space".into()), "workflow.steps[0].queue"),
        (with(&|s| s[0].timeout = secs(-1)), "workflow.steps[0].timeout"),
        (
            with(&|s| s[0].retry_policy = Some(pb::RetryPolicy { max_attempts: 0, ..Default::default() })),
            "workflow.steps[0].retry_policy.max_attempts",
        ),
        (
            with(&|s| s[0].retry_policy = Some(pb::RetryPolicy { max_attempts: 11, ..Default::default() })),
            "workflow.steps[0].retry_policy.max_attempts",
        ),
        (
            with(&|s| {
                s[0].retry_policy =
                    Some(pb::RetryPolicy { max_attempts: 2, initial_backoff: secs(-5), ..Default::default() })
            }),
            "workflow.steps[0].retry_policy.initial_backoff",
        ),
        (
            with(&|s| {
                s[0].retry_policy =
                    Some(pb::RetryPolicy { max_attempts: 2, max_backoff: secs(10 * 86_400), ..Default::default() })
            }),
            "workflow.steps[0].retry_policy.max_backoff",
        ),
        (with(&|s| s.push(step("wait", pb::StepKind::Delay, &[]))), "workflow.steps[2].config.duration"),
        (with(&|s| s.clear()), "workflow.steps"),
    ];
    for (req, field) in cases {
        let status = c.create_workflow(req).await.expect_err(field);
        assert_invalid(&status, field);
    }
    let cycle = c.create_workflow(with(&|s| s[0].depends_on = vec!["b".into()])).await.expect_err("cycle");
    assert!(cycle.message().contains("a -> b -> a") || cycle.message().contains("b -> a -> b"), "{}", cycle.message());
    let listed = c.list_workflows(pb::ListWorkflowsRequest::default()).await.expect("list").into_inner();
    assert!(listed.workflows.is_empty(), "nothing was written");

    // Runs and claims.
    let missing = c
        .start_run(pb::StartRunRequest { workflow_name: "nope".into(), ..Default::default() })
        .await
        .expect_err("missing workflow");
    assert_eq!(missing.code(), Code::NotFound);
    c.create_workflow(workflow("ok", vec![task("a", &[])])).await.expect("create");
    let big = c
        .start_run(pb::StartRunRequest {
            workflow_name: "ok".into(),
            input: Some(json_to_struct(serde_json::json!({"blob": "x".repeat(2000)}))),
            ..Default::default()
        })
        .await
        .expect_err("input over the cap");
    assert_invalid(&big, "input");
    assert!(c.list_runs(pb::ListRunsRequest::default()).await.expect("list").into_inner().runs.is_empty());
    for max in [0, 21] {
        let status = c
            .claim_tasks(pb::ClaimTasksRequest {
                queue: "work".into(),
                worker_id: "w".into(),
                max_tasks: max,
                ..Default::default()
            })
            .await
            .expect_err("max_tasks");
        assert_invalid(&status, "max_tasks");
    }
    let run = start(&mut c, "ok", serde_json::json!({})).await;
    let l = claim(&mut c, "work", "w", 1, 1000).await;
    let mut wrong = l[0].clone();
    wrong.lease_token = uuid::Uuid::now_v7().to_string();
    let status = complete(&mut c, &wrong, serde_json::json!({})).await.expect_err("wrong token");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = c
        .complete_task(pb::CompleteTaskRequest { id: "x".into(), lease_token: "y".into(), ..Default::default() })
        .await
        .expect_err("malformed");
    assert_invalid(&status, "id");
    let t = c
        .get_task(pb::GetTaskRequest {
            id: l[0].task.as_ref().map(|t| t.id.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(t.status, pb::TaskStatus::Leased as i32, "a refused completion changes nothing");
    let _ = run;
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_consecutive_versions() {
    let app = spawn_app_env(&[]).await;
    let calls = (0..4).map(|_| {
        let mut c = app.workflow();
        async move { c.create_workflow(workflow("raced", vec![task("a", &[])])).await.map(|r| r.into_inner().version) }
    });
    let mut versions: Vec<i32> =
        futures_util::future::join_all(calls).await.into_iter().map(|r| r.expect("create")).collect();
    versions.sort_unstable();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    let mut c = app.workflow();
    let latest = c
        .get_workflow(pb::GetWorkflowRequest { name: "raced".into(), ..Default::default() })
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(latest.version, 4);
    let listed = c
        .list_workflows(pb::ListWorkflowsRequest { latest_only: true, ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.workflows.len(), 1);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn workflow_calls_need_their_scopes() {
    let app = spawn_app_env(&FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("scoped", vec![task("a", &[])])).await.expect("create");
    start(&mut c, "scoped", serde_json::json!({})).await;
    let worker_key = app.create_key("dev-agent", &["worker"]).await;
    let reader_key = app.create_key("dev-agent", &["workflow:read"]).await;
    use crate::common::with_key;

    // A worker-only key claims and completes, but cannot define or start workflows.
    let claimed = c
        .claim_tasks(with_key(
            pb::ClaimTasksRequest {
                queue: "work".into(),
                worker_id: "w".into(),
                max_tasks: 1,
                wait: millis(1000),
                ..Default::default()
            },
            &worker_key,
        ))
        .await
        .expect("worker claims")
        .into_inner()
        .tasks;
    assert_eq!(claimed.len(), 1);
    let denied = c.create_workflow(with_key(workflow("nope", vec![task("a", &[])]), &worker_key)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // A read-only credential lists runs but cannot claim or complete.
    c.list_runs(with_key(pb::ListRunsRequest::default(), &reader_key)).await.expect("reader lists");
    let denied = c
        .claim_tasks(with_key(
            pb::ClaimTasksRequest { queue: "work".into(), worker_id: "w".into(), max_tasks: 1, ..Default::default() },
            &reader_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let t = claimed[0].task.clone().expect("task");
    let denied = c
        .complete_task(with_key(
            pb::CompleteTaskRequest {
                id: t.id.clone(),
                lease_token: claimed[0].lease_token.clone(),
                ..Default::default()
            },
            &reader_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    c.complete_task(with_key(
        pb::CompleteTaskRequest { id: t.id.clone(), lease_token: claimed[0].lease_token.clone(), ..Default::default() },
        &worker_key,
    ))
    .await
    .expect("worker completes");
    // Workflow changes are audited in the same transaction, naming what they changed.
    let events = app
        .agents()
        .list_audit_events(app.admin(pb::ListAuditEventsRequest { namespace: "default".into(), ..Default::default() }))
        .await
        .expect("audit events")
        .into_inner()
        .events;
    let find = |method: &str| {
        events.iter().find(|e| e.method == format!("tmws.v1.WorkflowService/{method}") && e.code == "OK").cloned()
    };
    let started = find("StartRun").expect("StartRun audited");
    assert_eq!((started.agent_id.as_str(), started.code.as_str()), ("dev-agent", "OK"));
    assert!(uuid::Uuid::parse_str(&started.resource_id).is_ok(), "{started:?}");
    let claim = find("ClaimTasks").expect("ClaimTasks audited");
    assert_eq!(claim.resource_id, t.id);
    assert!(find("CreateWorkflow").is_some());
    let refused =
        events.iter().find(|e| e.method == "tmws.v1.WorkflowService/CreateWorkflow" && e.code == "PERMISSION_DENIED");
    assert!(refused.is_some(), "refused calls are audited too");
    // A read-only agent (role) cannot write at all.
    let ro = c
        .create_workflow(crate::common::as_agent(workflow("ro", vec![task("a", &[])]), "rita", "red", "readonly"))
        .await
        .unwrap_err();
    assert_eq!(ro.code(), Code::PermissionDenied);
    app.stop().await.expect("stop");
}
