use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::common::{
    TcpProxy, fresh_database, postgres_env, socket_addr_of, spawn_app, spawn_app_with, test_config, test_env,
    with_host_port,
};

const SERVICES: [&str; 3] = ["", "tmws.v1.MemoryService", "tmws.v1.WorkflowService"];

#[tokio::test]
async fn every_service_reports_serving() {
    let app = spawn_app().await;
    for service in SERVICES {
        assert_eq!(app.health_status(service).await.expect(service), ServingStatus::Serving, "{service:?}");
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_service_is_not_found() {
    let app = spawn_app().await;
    let err = app.health_status("tmws.v1.NoSuchService").await.expect_err("unknown service");
    assert_eq!(err.code(), Code::NotFound);
    // Reflection and health are infrastructure, not reported services.
    let err = app.health_status("grpc.reflection.v1.ServerReflection").await.expect_err("not a public service");
    assert_eq!(err.code(), Code::NotFound);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn services_follow_postgres_through_an_outage() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let proxy = TcpProxy::start(socket_addr_of(&db)).await;
    let via_proxy = with_host_port(&db, proxy.addr);
    let app = spawn_app_with(test_config(&via_proxy, env.redis(), &[])).await;
    for service in SERVICES {
        app.wait_for_status(service, ServingStatus::Serving, Duration::from_secs(5)).await;
    }

    proxy.cut().await;
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::NotServing, Duration::from_secs(10)).await;
    app.wait_for_status("tmws.v1.WorkflowService", ServingStatus::NotServing, Duration::from_secs(10)).await;
    // The process itself stays live: a liveness probe must not restart it for a database blip.
    assert_eq!(app.health_status("").await.expect("overall"), ServingStatus::Serving);

    proxy.restore();
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::Serving, Duration::from_secs(10)).await;
    app.wait_for_status("tmws.v1.WorkflowService", ServingStatus::Serving, Duration::from_secs(10)).await;
    app.stop().await.expect("clean stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn services_follow_redis_when_it_is_required() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let proxy = TcpProxy::start(socket_addr_of(env.require_redis())).await;
    let redis_via_proxy = with_host_port(env.require_redis(), proxy.addr);
    let app = spawn_app_with(test_config(&db, Some(&redis_via_proxy), &[("TMWS_REDIS_REQUIRED", "true")])).await;
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::Serving, Duration::from_secs(5)).await;

    proxy.cut().await;
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::NotServing, Duration::from_secs(10)).await;
    app.wait_for_status("tmws.v1.WorkflowService", ServingStatus::NotServing, Duration::from_secs(10)).await;

    proxy.restore();
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::Serving, Duration::from_secs(10)).await;
    app.stop().await.expect("clean stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn redis_outage_does_not_affect_services_that_do_not_require_it() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let proxy = TcpProxy::start(socket_addr_of(env.require_redis())).await;
    let redis_via_proxy = with_host_port(env.require_redis(), proxy.addr);
    let app = spawn_app_with(test_config(&db, Some(&redis_via_proxy), &[])).await;
    proxy.cut().await;
    // Several watcher rounds (200 ms each) with Redis unreachable.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.health_status("tmws.v1.MemoryService").await.expect("memory"), ServingStatus::Serving);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_bounds_the_drain() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_app_with(test_config(&db, env.redis(), &[("TMWS_SHUTDOWN_GRACE", "1s")])).await;
    // A Watch stream is an in-flight call that never ends by itself.
    let mut watch = app
        .health()
        .watch(HealthCheckRequest { service: "tmws.v1.MemoryService".into() })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first update").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);

    let started = std::time::Instant::now();
    let stop = tokio::spawn(app.stop());
    let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an update while draining")
        .expect("stream item")
        .expect("ok");
    assert_eq!(update.status(), ServingStatus::NotServing);
    let result = tokio::time::timeout(Duration::from_secs(10), stop).await.expect("stop finishes").expect("join");
    result.expect("a drain that hits the grace period still ends cleanly");
    assert!(started.elapsed() < Duration::from_secs(10));
}
