//! The `tmws` binary: configuration errors, help, migrations and signals.

use std::{process::Stdio, time::Duration};

use tokio::process::Command;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::common::{fresh_database, test_env};

const BIN: &str = env!("CARGO_BIN_EXE_tmws");

/// A command with a clean TMWS_* environment.
fn tmws(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("TMWS_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[tokio::test]
async fn invalid_settings_fail_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("TMWS_GRPC_ADDR", "not-an-address"),
        ("TMWS_DB_MAX_CONNECTIONS", "zero"),
        ("TMWS_ENVIRONMENT", "qa"),
        ("TMWS_LOG_FORMAT", "xml"),
        ("TMWS_AUTO_MIGRATE", "perhaps"),
        ("TMWS_SHUTDOWN_GRACE", "forever"),
    ] {
        let out = tmws(&["serve"]).env(var, value).output().await.expect("run tmws");
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}

#[tokio::test]
async fn production_refuses_to_start_with_auth_off() {
    let out = tmws(&["serve"])
        .env("TMWS_ENVIRONMENT", "production")
        .env("TMWS_DATABASE_URL", "postgres://db.invalid/tmws")
        .env("TMWS_AUTH_ENABLED", "false")
        .output()
        .await
        .expect("run tmws");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TMWS_AUTH_ENABLED"));
}

#[tokio::test]
async fn help_documents_every_setting() {
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let out = tmws(args).output().await.expect("run tmws");
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for setting in tmws::config::SETTINGS {
            assert!(help.contains(setting.name), "{args:?} lacks {}", setting.name);
        }
    }
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let env = test_env();
    let db = fresh_database(&env).await;
    if !env.is_postgres() {
        // The embedded file has one owner at a time: a concurrent second process is refused
        // (tested below); run twice in a row and check each migration is applied once.
        for _ in 0..2 {
            let out = tmws(&["migrate"]).env("TMWS_DATABASE_URL", &db).output().await.expect("run tmws migrate");
            assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db).await.expect("open the file");
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .expect("migrations table");
        assert_eq!(applied as usize, tmws::store::sqlite::MIGRATOR.iter().count());
        return;
    }
    let runs = (0..3).map(|_| tmws(&["migrate"]).env("TMWS_DATABASE_URL", &db).output());
    for out in futures_util::future::join_all(runs).await {
        let out = out.expect("run tmws migrate");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db).await.expect("connect");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .expect("migrations table");
    assert_eq!(applied as usize, tmws::store::postgres::MIGRATOR.iter().count());
    let vector: Option<String> = sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        .fetch_optional(&mut conn)
        .await
        .expect("extension query");
    assert!(vector.is_some(), "the first migration creates the vector extension");
}

#[tokio::test]
async fn serve_drains_and_exits_zero_on_sigterm() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = tmws(&["serve"]);
    cmd.env("TMWS_GRPC_ADDR", &addr)
        .env("TMWS_DATABASE_URL", &db)
        .env("TMWS_LOG_FORMAT", "json")
        .env("TMWS_SHUTDOWN_GRACE", "3s");
    if let Some(redis) = env.redis() {
        cmd.env("TMWS_REDIS_URL", redis);
    }
    let mut child = cmd.spawn().expect("spawn tmws serve");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
    let mut health = HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = health.check(HealthCheckRequest { service: "tmws.v1.MemoryService".into() }).await;
        if matches!(&status, Ok(r) if r.get_ref().status() == ServingStatus::Serving) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "tmws serve never became SERVING: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = child.id().expect("pid").to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let mut stderr = String::new();
    let mut stdout = String::new();
    use tokio::io::AsyncReadExt;
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut stderr).await.ok();
    }
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout).await.ok();
    }
    let logs = format!("{stdout}{stderr}");
    assert!(logs.contains("SIGTERM received"), "logs: {logs}");
    // JSON logs: every line parses.
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

#[test]
fn readme_documents_every_setting() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let env_example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).expect(".env.example");
    for setting in tmws::config::SETTINGS {
        assert!(readme.contains(&format!("`{}`", setting.name)), "README.md lacks {}", setting.name);
        assert!(env_example.contains(setting.name), ".env.example lacks {}", setting.name);
    }
}
