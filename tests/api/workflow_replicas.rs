//! Durability and scale-out: restarts, a killed process, two replicas on one database.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use tokio_stream::StreamExt;

use crate::{
    common::{fresh_database, postgres_env, spawn_secure, test_env},
    workflow::{FAST, claim, complete, spawn_worker, start, step, task, wait_for_end, workflow},
};
use tmws::{
    api::convert::json_to_struct,
    pb::{self, workflow_service_client::WorkflowServiceClient},
};

#[tokio::test]
async fn delay_steps_fire_after_their_duration_and_survive_a_restart() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    let mut wait = step("wait", pb::StepKind::Delay, &[]);
    wait.config = Some(json_to_struct(serde_json::json!({"duration": "1500ms"})));
    c.create_workflow(workflow("timer", vec![wait, step("after", pb::StepKind::Noop, &["wait"])]))
        .await
        .expect("create");
    let run = start(&mut c, "timer", serde_json::json!({})).await;
    app.stop().await.expect("stop");

    // A new process on the same database finishes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    let ended = wait_for_end(&mut c, &run.id, Duration::from_secs(10)).await;
    assert_eq!(ended.status, pb::RunStatus::Succeeded as i32, "{ended:?}");
    let started = run.start_time.expect("start").seconds as f64 + f64::from(run.start_time.expect("start").nanos) / 1e9;
    let end = ended.end_time.expect("end");
    let end = end.seconds as f64 + f64::from(end.nanos) / 1e9;
    assert!(end - started >= 1.5, "the timer fired early: {:.3}s", end - started);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn a_second_process_on_the_embedded_file_is_refused() {
    // Whatever the suite's backend: this is about the embedded file.
    let db = format!("sqlite://{}", crate::common::temp_dir().join("tmws.db").display());
    let one = spawn_secure(&db, &FAST).await;
    let refused = tmws::server::RunningServer::start(crate::common::test_config(&db, None, &[]))
        .await
        .expect("bind")
        .stop()
        .await
        .expect_err("a second owner of the file is refused");
    assert!(refused.to_string().contains("in use by another tmws process"), "{refused:#}");
    one.stop().await.expect("stop");
    // Once the owner stopped, the file can be opened again.
    let again = spawn_secure(&db, &FAST).await;
    again.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn two_replicas_share_the_queue_without_double_delivery() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let one = spawn_secure(&db, &FAST).await;
    let two = spawn_secure(&db, &FAST).await;

    // WatchRun on replica two sees what happens through replica one.
    let mut c1 = one.workflow();
    let mut c2 = two.workflow();
    let mut steps = vec![];
    for i in 0..40 {
        steps.push(task(&format!("t{i}"), &[]));
    }
    c1.create_workflow(workflow("wide", steps)).await.expect("create");
    let run = start(&mut c1, "wide", serde_json::json!({})).await;
    let mut watch = c2
        .watch_run(pb::WatchRunRequest { id: run.id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();

    let done = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(spawn_worker(one.workflow(), "work", format!("one-{i}"), done.clone(), stop.clone()));
        workers.push(spawn_worker(two.workflow(), "work", format!("two-{i}"), done.clone(), stop.clone()));
    }
    let mut task_events = 0;
    let mut ended = false;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), watch.next()).await.expect("events keep coming") {
        match e.expect("ok").event {
            Some(pb::run_event::Event::Task(_)) => task_events += 1,
            Some(pb::run_event::Event::RunStatus(s)) => ended = s == pb::RunStatus::Succeeded as i32,
            _ => {}
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(ended, "replica two saw the run end");
    assert_eq!(task_events, 80, "leased + succeeded for each of 40 tasks");
    let done = done.lock().expect("lock").clone();
    assert_eq!(done.len(), 40);
    assert!(done.values().all(|n| *n == 1), "double delivery: {done:?}");
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("db");
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts WHERE status = 4")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(succeeded, 40);
    let by_worker: Vec<String> = sqlx::query_scalar("SELECT DISTINCT split_part(worker_id, '-', 1) FROM tasks")
        .fetch_all(&mut conn)
        .await
        .expect("workers");
    assert_eq!(by_worker.len(), 2, "both replicas handed out work: {by_worker:?}");
    one.stop().await.expect("stop");
    two.stop().await.expect("stop");
}

#[tokio::test]
async fn a_killed_server_loses_nothing_and_completes_nothing_twice() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tmws"))
        .arg("serve")
        .env("TMWS_GRPC_ADDR", &addr)
        .env("TMWS_DATABASE_URL", &db)
        .env("TMWS_ENGINE_TICK", "50ms")
        .env("TMWS_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tmws");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
    let mut c = WorkflowServiceClient::new(tonic::service::interceptor::InterceptedService::new(
        channel,
        crate::common::DefaultCredential::default(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c.list_workflows(pb::ListWorkflowsRequest::default()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "tmws did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let steps = (0..10).map(|i| task(&format!("t{i}"), &[])).collect();
    c.create_workflow(workflow("crash", steps)).await.expect("create");
    let run = start(&mut c, "crash", serde_json::json!({})).await;
    let held = claim(&mut c, "work", "w", 3, 1000).await;
    assert_eq!(held.len(), 3);
    complete(&mut c, &held[0], serde_json::json!({"n": 0})).await.expect("complete");

    // SIGKILL: no drain, no goodbye.
    let pid = child.id().expect("pid").to_string();
    assert!(tokio::process::Command::new("kill").args(["-KILL", &pid]).status().await.expect("kill").success());
    let _ = child.wait().await;

    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    // Leases are rows in the database: the worker finishes its held tasks through the new server.
    for l in &held[1..] {
        complete(&mut c, l, serde_json::json!({"n": 1})).await.expect("complete after restart");
    }
    // A duplicate of an already recorded completion changes nothing.
    complete(&mut c, &held[0], serde_json::json!({"n": 99})).await.expect("idempotent");
    loop {
        let more = claim(&mut c, "work", "w", 10, 500).await;
        if more.is_empty() {
            break;
        }
        for l in &more {
            complete(&mut c, l, serde_json::json!({"n": 2})).await.expect("complete");
        }
    }
    let ended = wait_for_end(&mut c, &run.id, Duration::from_secs(10)).await;
    assert_eq!(ended.status, pb::RunStatus::Succeeded as i32);
    assert_eq!(ended.steps.len(), 10);
    let per_task = crate::common::query_i64s(
        &db,
        "SELECT (SELECT count(*) FROM task_attempts a WHERE a.task_id = t.id AND a.status = 4) FROM tasks t",
    )
    .await;
    assert_eq!(per_task, vec![1; 10], "every task recorded exactly one success");
    let first_id =
        uuid::Uuid::parse_str(&held[0].task.as_ref().map(|t| t.id.clone()).unwrap_or_default()).expect("uuid");
    let first = crate::common::json_column(&db, "tasks", "output", first_id).await;
    assert_eq!(first["n"].as_f64(), Some(0.0), "the first recorded output stands: {first}");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn memories_survive_a_restart_and_are_found_by_search() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut m = app.memory();
    let created = m
        .create_memory(pb::CreateMemoryRequest {
            memory: Some(pb::Memory {
                content: "the staging cluster rotates its certificates every Sunday".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    app.stop().await.expect("stop");

    let app = spawn_secure(&db, &FAST).await;
    let mut m = app.memory();
    for mode in [pb::SearchMode::Semantic, pb::SearchMode::Keyword, pb::SearchMode::Hybrid] {
        let found = m
            .search_memories(pb::SearchMemoriesRequest {
                query: "when are certificates rotated on staging".into(),
                mode: mode as i32,
                top_k: 3,
                ..Default::default()
            })
            .await
            .expect("search after the restart")
            .into_inner();
        assert_eq!(
            found.results.first().and_then(|r| r.memory.as_ref()).map(|r| r.id.clone()),
            Some(created.id.clone()),
            "{mode:?}: {found:?}"
        );
    }
    app.stop().await.expect("stop");
}

/// During a rolling upgrade the previous release's CreateTask writes BLOCKED tasks without
/// knowing `dependents_waiting`; the insert trigger marks the dependency anyway, so this
/// release's one-statement completion does not strand the new task.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn a_blocked_task_written_without_the_mark_is_still_unblocked() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    let parent = pb::Task { title: "parent".into(), queue: "upgrade".into(), ..Default::default() };
    let parent = c.create_task(pb::CreateTaskRequest { task: Some(parent), ..Default::default() }).await;
    let parent = parent.expect("create parent").into_inner();
    let leased = claim(&mut c, "upgrade", "w", 1, 1000).await;
    assert_eq!(leased.len(), 1);

    // The previous release's insert of a dependent, column for column.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("connect");
    let parent_id: uuid::Uuid = parent.id.parse().expect("uuid");
    let child_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, namespace, kind, title, description, queue, priority, depends_on, status, error, max_attempts, \
         initial_backoff_ms, max_backoff_ms, backoff_multiplier, attempt_timeout_ms, input, due_time, created_by, request_id) \
         VALUES ($1, 'default', 1, 'child', '', 'upgrade', 2, $2, 1, '', 3, 1000, 60000, 2.0, NULL, '{}', NULL, 'old-release', NULL)",
    )
    .bind(child_id)
    .bind(vec![parent_id])
    .execute(&mut conn)
    .await
    .expect("insert as the previous release did");
    let marked: bool = sqlx::query_scalar("SELECT dependents_waiting FROM tasks WHERE id = $1")
        .bind(parent_id)
        .fetch_one(&mut conn)
        .await
        .expect("read the mark");
    assert!(marked, "the insert trigger marks the dependency");

    let done = complete(&mut c, &leased[0], serde_json::json!({"v": 1})).await.expect("complete the parent");
    assert_eq!(done.status, pb::TaskStatus::Succeeded as i32);
    let next = claim(&mut c, "upgrade", "w", 1, 1000).await;
    let child = next.first().and_then(|l| l.task.clone()).expect("the child was queued");
    assert_eq!(child.id, child_id.to_string());
    let input = tmws::api::convert::struct_to_json(child.input.expect("input"));
    assert_eq!(input["parents"][parent.id.as_str()]["v"], 1.0);
    app.stop().await.expect("stop");
}

/// A claim that picks a run's task while the run is ending (here: cancelled in SQL by a
/// transaction holding the run row) waits for the run, then cancels the task instead of leasing
/// it: no task is handed out, no attempt is started, no claim is audited, and the run's event
/// log stays gapless.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn a_claim_that_meets_an_ending_run_cancels_the_task_instead() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("ending", vec![task("a", &[])])).await.expect("create");
    let run = start(&mut c, "ending", serde_json::json!({})).await;
    let run_id: uuid::Uuid = run.id.parse().expect("uuid");

    // Another transaction holds the run row and ends the run.
    let mut ender = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut ender).await.expect("begin");
    sqlx::query("UPDATE runs SET status = 5, error = 'ended elsewhere', end_time = now() WHERE id = $1")
        .bind(run_id)
        .execute(&mut ender)
        .await
        .expect("end the run");
    let ender_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut ender).await.expect("pid");

    // The claim picks the task, then waits for the run row.
    let mut worker = app.workflow();
    let claiming = tokio::spawn(async move { claim(&mut worker, "work", "w", 5, 0).await });
    let mut watcher = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                .bind(ender_pid)
                .fetch_one(&mut watcher)
                .await
                .expect("blocked claims");
        if blocked > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the claim never waited for the run row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("COMMIT").execute(&mut ender).await.expect("commit");

    let leased = claiming.await.expect("claim task");
    assert!(leased.is_empty(), "a task of an ended run is not handed out: {leased:?}");
    let (status, attempts): (i16, i64) = sqlx::query_as(
        "SELECT t.status, (SELECT count(*) FROM task_attempts a WHERE a.task_id = t.id) FROM tasks t WHERE t.run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&mut watcher)
    .await
    .expect("the task");
    assert_eq!((status, attempts), (pb::TaskStatus::Cancelled as i16, 0), "cancelled, no attempt started");
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE method = 'tmws.v1.WorkflowService/ClaimTasks'")
            .fetch_one(&mut watcher)
            .await
            .expect("audit rows");
    assert_eq!(claims, 0, "nothing was leased, so no claim is audited");
    let (events, max_seq, last): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), max(e.sequence), (SELECT last_sequence FROM runs WHERE id = $1) FROM run_events e WHERE e.run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&mut watcher)
    .await
    .expect("the run's log");
    assert_eq!((events, max_seq), (last, last), "the log is gapless and ends at the run's last sequence");
    let task: serde_json::Value = sqlx::query_scalar(
        "SELECT payload->'task' FROM run_events WHERE run_id = $1 AND sequence = (SELECT last_sequence FROM runs WHERE id = $1)",
    )
    .bind(run_id)
    .fetch_one(&mut watcher)
    .await
    .expect("the last event");
    assert_eq!(task.get("status").and_then(|s| s.as_str()), Some("Cancelled"), "{task}");
    app.stop().await.expect("stop");
}

/// One call that changes several runs writes each run's events with its own gapless sequence:
/// a claim leasing the tasks of two runs at once, then their completions.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn one_call_changing_two_runs_keeps_each_log_gapless() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &FAST).await;
    let mut c = app.workflow();
    c.create_workflow(workflow("pair", vec![task("a", &[])])).await.expect("create");
    let runs = [
        start(&mut c, "pair", serde_json::json!({"n": 1})).await,
        start(&mut c, "pair", serde_json::json!({"n": 2})).await,
    ];
    let leased = claim(&mut c, "work", "w", 2, 1000).await;
    let mut leased_runs: Vec<String> =
        leased.iter().filter_map(|l| l.task.as_ref().map(|t| t.run_id.clone())).collect();
    leased_runs.sort();
    let mut started: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    started.sort();
    assert_eq!(leased_runs, started, "one claim leased the task of each run");

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("connect");
    async fn logs(conn: &mut sqlx::PgConnection) -> Vec<(uuid::Uuid, Vec<i64>, i64)> {
        let rows: Vec<(uuid::Uuid, Vec<i64>, i64)> = sqlx::query_as(
            "SELECT r.id, coalesce(array_agg(e.sequence ORDER BY e.sequence) FILTER (WHERE e.sequence IS NOT NULL), '{}'), \
             r.last_sequence FROM runs r LEFT JOIN run_events e ON e.run_id = r.id GROUP BY r.id, r.last_sequence ORDER BY r.id",
        )
        .fetch_all(conn)
        .await
        .expect("the logs");
        rows
    }
    let after_claim = logs(&mut conn).await;
    for (run, seqs, last) in &after_claim {
        // Running, the task queued, the task leased.
        assert_eq!(seqs, &(1..=3).collect::<Vec<i64>>(), "run {run}");
        assert_eq!(*last, 3, "run {run}");
    }
    for l in &leased {
        complete(&mut c, l, serde_json::json!({"ok": true})).await.expect("complete");
    }
    for r in &runs {
        let ended = wait_for_end(&mut c, &r.id, Duration::from_secs(10)).await;
        assert_eq!(ended.status, pb::RunStatus::Succeeded as i32);
    }
    for (run, seqs, last) in logs(&mut conn).await {
        // ... then the task succeeded and the run succeeded.
        assert_eq!(seqs, (1..=5).collect::<Vec<i64>>(), "run {run}");
        assert_eq!(last, 5, "run {run}");
    }
    app.stop().await.expect("stop");
}
