//! `tmws export` / `tmws import`: moving from the embedded store to the suite's backend
//! (PostgreSQL in the second pass of scripts/test.sh, another SQLite file otherwise).

use std::{process::Stdio, time::Duration};

use tokio::process::Command;

use crate::{
    common::{count_rows, fresh_database, query_i64s, spawn_secure, temp_dir, test_env, with_key},
    memory::{create, memory},
    workflow::{FAST, start, step, wait_for_end, workflow},
};
use tmws::pb;

fn tmws(args: &[&str], db: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tmws"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("TMWS_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("TMWS_DATABASE_URL", db);
    cmd
}

async fn run(args: &[&str], db: &str) -> (bool, String) {
    let out = tmws(args, db).output().await.expect("run tmws");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn an_embedded_store_moves_to_another_database_with_nothing_lost() {
    let source = format!("sqlite://{}", temp_dir().join("tmws.db").display());
    let app = spawn_secure(&source, &FAST).await;
    let agent_key = app.create_agent("mover", "red", "agent").await;

    // Memories: one with a client vector and tags, one shared with another namespace's agent.
    let mut m = app.memory();
    let mut first = memory("the deploy checklist lives in the ops wiki");
    first.tags = vec!["ops".into(), "deploy".into()];
    let first = m.create_memory(create(first)).await.expect("create").into_inner();
    let second = m.create_memory(create(memory("quarterly planning notes"))).await.expect("create").into_inner();
    // Three reads: their counts are written by the time the server has stopped.
    for _ in 0..3 {
        m.get_memory(pb::GetMemoryRequest { id: first.id.clone(), ..Default::default() }).await.expect("read");
    }

    // A workflow run to its end, and one left running (not exported).
    let mut w = app.workflow();
    w.create_workflow(workflow(
        "two-steps",
        vec![step("a", pb::StepKind::Noop, &[]), step("b", pb::StepKind::Noop, &["a"])],
    ))
    .await
    .expect("create workflow");
    let done = start(&mut w, "two-steps", serde_json::json!({"x": 1})).await;
    let done = wait_for_end(&mut w, &done.id, Duration::from_secs(10)).await;
    assert_eq!(done.status, pb::RunStatus::Succeeded as i32);
    w.create_workflow(workflow("waits", vec![step("t", pb::StepKind::Task, &[])])).await.expect("create workflow");
    start(&mut w, "waits", serde_json::json!({})).await;
    app.stop().await.expect("stop");

    let file = temp_dir().join("export.jsonl");
    let file_s = file.display().to_string();
    let (ok, err) = run(&["export", "--output", &file_s], &source).await;
    assert!(ok, "export failed: {err}");
    assert!(err.contains("memories: 2"), "{err}");
    assert!(err.contains("not exported: 1"), "the running run is reported: {err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("export file").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the export holds key hashes: owner-only, got {mode:o}");
    }

    // Into the suite's backend.
    let env = test_env();
    let target = fresh_database(&env).await;
    let (ok, err) = run(&["import", "--input", &file_s], &target).await;
    assert!(ok, "import failed: {err}");
    let (ok, err) = run(&["import", "--input", &file_s], &target).await;
    assert!(ok, "second import failed: {err}");
    assert!(err.contains("already present (kept)"), "re-import skips every row: {err}");
    assert_eq!(count_rows(&target, "memories").await, 2, "nothing doubled");

    let app = spawn_secure(&target, &FAST).await;
    let mut m = app.memory();
    let got = m
        .get_memory(pb::GetMemoryRequest { id: first.id.clone(), ..Default::default() })
        .await
        .expect("the memory moved")
        .into_inner();
    assert_eq!(got.content, first.content);
    assert_eq!(got.tags, first.tags);
    assert_eq!(got.etag, first.etag, "same version");
    assert_eq!(got.create_time, first.create_time);
    assert_eq!(got.access_count, 3, "read counts moved");
    let moved_id = got.id.clone();
    assert!(got.last_access_time.is_some());
    let found = m
        .search_memories(pb::SearchMemoriesRequest {
            query: "notes from the quarterly planning".into(),
            mode: pb::SearchMode::Semantic as i32,
            top_k: 1,
            ..Default::default()
        })
        .await
        .expect("semantic search on the imported vectors")
        .into_inner();
    assert_eq!(found.results[0].memory.as_ref().map(|r| r.id.clone()), Some(second.id.clone()));
    let keyword = m
        .search_memories(pb::SearchMemoriesRequest {
            query: "checklist".into(),
            mode: pb::SearchMode::Keyword as i32,
            ..Default::default()
        })
        .await
        .expect("keyword search on the imported text")
        .into_inner();
    assert_eq!(keyword.results.len(), 1);

    let mut w = app.workflow();
    let moved_run = w
        .get_run(pb::GetRunRequest { id: done.id.clone(), namespace: String::new() })
        .await
        .expect("the finished run moved")
        .into_inner();
    assert_eq!(moved_run.status, pb::RunStatus::Succeeded as i32);
    assert_eq!(moved_run.steps.len(), 2);
    // Its event log moved with it (and the unfinished run's did not).
    let finished_events =
        "SELECT count(*) FROM run_events WHERE run_id IN (SELECT id FROM runs WHERE status IN (3, 4, 5, 6))";
    let source_events = query_i64s(&source, finished_events).await;
    assert!(source_events[0] > 2, "{source_events:?}");
    assert_eq!(query_i64s(&target, "SELECT count(*) FROM run_events").await, source_events);
    assert_eq!(count_rows(&target, "runs").await, 1);
    let mut events = w
        .watch_run(pb::WatchRunRequest { id: done.id.clone(), ..Default::default() })
        .await
        .expect("watch the imported run")
        .into_inner();
    let first = events.message().await.expect("snapshot").expect("one message");
    assert!(
        matches!(first.event, Some(pb::run_event::Event::Snapshot(ref r)) if r.status == pb::RunStatus::Succeeded as i32),
        "watch works on it: {first:?}"
    );
    // The agent and its API key moved too.
    app.memory()
        .list_memories(with_key(pb::ListMemoriesRequest::default(), &agent_key))
        .await
        .expect("the key works on the new database");
    app.stop().await.expect("stop");

    // Exported again from the new database, the read counts include the reads made there
    // (3 + this test's GetMemory and keyword search).
    let again = temp_dir().join("again.jsonl");
    let again_s = again.display().to_string();
    let (ok, err) = run(&["export", "--output", &again_s], &target).await;
    assert!(ok, "export from the new database failed: {err}");
    let text = std::fs::read_to_string(&again).expect("second export");
    let row = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["table"] == "memories" && v["row"]["id"] == moved_id.as_str())
        .expect("the memory is exported again");
    assert_eq!(row["row"]["access_count"], 5, "{row}");
    assert!(row["row"]["last_access_time"].is_string(), "{row}");
}

#[tokio::test]
async fn a_malformed_export_is_refused_and_writes_nothing() {
    let env = test_env();
    let target = fresh_database(&env).await;
    let dir = temp_dir();
    let file = dir.join("bad.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"format":"tmws-export","version":1,"backend":"sqlite","exported_at":"2026-01-01T00:00:00Z","tmws_version":"0"}"#,
            "\n",
            r#"{"table":"agents","row":{"id":"a1","namespace":"red","display_name":"","role":2,"status":1,"create_time":"2026-01-01T00:00:00Z","update_time":"2026-01-01T00:00:00Z","version":1}}"#,
            "\n",
            r#"{"table":"memories","row":{"id":"not-a-uuid"}}"#,
            "\n"
        ),
    )
    .expect("write");
    let (ok, err) = run(&["import", "--input", &file.display().to_string()], &target).await;
    assert!(!ok, "a bad row fails the import");
    assert!(err.contains("memories") || err.contains("line 3"), "the error names the culprit: {err}");
    assert_eq!(count_rows(&target, "agents").await, 0, "the valid first row was rolled back");

    std::fs::write(&file, "{\"format\":\"something-else\",\"version\":1}\n").expect("write");
    let (ok, err) = run(&["import", "--input", &file.display().to_string()], &target).await;
    assert!(!ok);
    assert!(err.contains("line 1"), "{err}");
}
