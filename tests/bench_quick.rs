//! Smoke test of the benchmark tool: `tmws-bench --quick` runs every scenario (data set, search,
//! rpc, ingest, tasks and their baselines) against a real server on a fresh database and writes
//! its JSON report. The server requires authentication, so the tool's `--api-key` (a bearer
//! credential: here the JWT of the roster agent `dev-agent`) is exercised too. It proves the tool
//! works; like every test here it asserts no timing.
//!
//! On PostgreSQL the tool gets the server's database and runs the direct-SQL baselines; on the
//! embedded store it gets `--database-url none` and runs only the bare tonic baseline.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_runs_every_scenario() {
    let app = common::spawn_app_env(&[("TMWS_DB_MAX_CONNECTIONS", "10")]).await;
    let embedded = app.database_url.starts_with("sqlite:");
    let json = std::env::temp_dir().join(format!("tmws-bench-quick-{}.json", uuid::Uuid::now_v7()));
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tmws-bench"))
        .arg("--quick")
        .args(["--addr", &format!("http://{}", app.addr)])
        .args(["--database-url", if embedded { "none" } else { &app.database_url }])
        .args(["--api-key", &common::jwt_for("dev-agent")])
        .arg("--json")
        .arg(&json)
        .env_remove("TMWS_HNSW_EF_SEARCH")
        .env_remove("TMWS_BENCH_API_KEY")
        .output()
        .await
        .expect("run tmws-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tmws-bench --quick failed ({:?}):\n{stderr}\n{stdout}", out.status);
    eprintln!("tmws-bench --quick took {:.1}s", started.elapsed().as_secs_f64());

    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON report written")).expect("valid JSON report");
    let _ = std::fs::remove_file(&json);
    let results = doc["results"].as_array().expect("results array");
    let row = |group: &str, target: &str| {
        results
            .iter()
            .find(|r| r["group"] == group && r["target"] == target)
            .unwrap_or_else(|| panic!("no result for {group}/{target}:\n{stdout}"))
    };
    let expected: &[(&str, &[&str])] = if embedded {
        &[
            ("dataset.load", &["tmws"]),
            ("search.semantic", &["tmws"]),
            ("search.filtered", &["tmws"]),
            ("search.hybrid", &["tmws"]),
            ("rpc.get_memory", &["tmws", "bare"]),
            ("rpc.health_check", &["tmws", "bare"]),
            ("ingest.create", &["tmws"]),
            ("ingest.batch", &["tmws"]),
            ("tasks.claim_complete", &["tmws"]),
        ]
    } else {
        &[
            ("dataset.load", &["tmws"]),
            ("search.semantic", &["tmws", "sql"]),
            ("search.filtered", &["tmws", "sql-exact", "sql-hnsw"]),
            ("search.hybrid", &["tmws", "sql"]),
            ("rpc.get_memory", &["tmws", "bare"]),
            ("rpc.health_check", &["tmws", "bare"]),
            ("ingest.create", &["tmws"]),
            ("ingest.batch", &["tmws", "sql"]),
            ("tasks.claim_complete", &["tmws", "sql"]),
        ]
    };
    for (group, targets) in expected {
        for target in *targets {
            let r = row(group, target);
            assert!(r["calls"].as_u64().unwrap_or(0) > 0, "{group}/{target} made no calls: {r}");
            assert_eq!(r["errors"].as_u64(), Some(0), "{group}/{target} had errors: {r}");
        }
    }
    // Recall is measured against the brute-force ground truth (its value is not asserted).
    assert!(row("search.semantic", "tmws")["recall_at_10"].is_f64());
    assert!(row("search.filtered", "tmws")["recall_at_10"].is_f64());
    // The bare tonic baseline needs no database: its ratios are filled in on either backend.
    assert!(row("rpc.get_memory", "tmws")["ratio_qps"].is_f64(), "rpc ratios are filled in");
    if embedded {
        // No direct-SQL baseline: no such rows, and the service's rows name no baseline.
        let sql_rows: Vec<_> =
            results.iter().filter(|r| r["target"].as_str().is_some_and(|t| t.starts_with("sql"))).collect();
        assert!(sql_rows.is_empty(), "no direct-SQL rows on the embedded store: {sql_rows:?}");
        for group in ["search.semantic", "search.filtered", "search.hybrid", "ingest.batch", "tasks.claim_complete"] {
            let r = row(group, "tmws");
            assert!(r["baseline"].is_null() && r["ratio_qps"].is_null(), "{group}/tmws has no baseline: {r}");
        }
        assert_eq!(doc["extra"]["machine"]["backend"], "embedded");
        assert!(doc["extra"].get("plans").is_none(), "no EXPLAIN without the database");
        assert!(stdout.contains("Baselines: the direct-SQL baselines"), "the summary says why:\n{stdout}");
    } else {
        assert!(row("tasks.claim_complete", "tmws")["ratio_qps"].is_f64(), "ratios are filled in");
    }
    assert_eq!(doc["extra"]["dag_10_linear"]["task_steps"]["failed"].as_u64(), Some(0));
    assert!(stdout.contains("Targets (issue 9):"), "the table and the target summary are printed:\n{stdout}");
    app.stop().await.expect("server stops cleanly");
}
