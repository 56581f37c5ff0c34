//! Rate limits in Redis (shared by replicas), their fallbacks when Redis is away, and the
//! request guards (deadline, load shedding).

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    common::{
        TcpProxy, auth_config, embed_server::EmbedServer, fresh_database, postgres_env, random_api_key, socket_addr_of,
        spawn_app_auth, spawn_app_with, test_env, with_host_port, with_key,
    },
    memory::{create, memory},
};
use tmws::pb;

fn list() -> pb::ListMemoriesRequest {
    pb::ListMemoriesRequest::default()
}

fn retry_after(s: &tonic::Status) -> u64 {
    s.metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after in {s:?}"))
}

#[tokio::test]
async fn a_flood_from_one_agent_leaves_another_unaffected() {
    // The admin's setup calls (4 writes) count against the admin's own budget, not theirs.
    let app = spawn_app_auth(&[("TMWS_RATE_LIMIT_WRITE_PER_SEC", "0.2"), ("TMWS_RATE_LIMIT_WRITE_BURST", "5")]).await;
    let flood = app.create_agent("flood", "red", "agent").await;
    let calm = app.create_agent("calm", "red", "agent").await;
    let mut m = app.memory();

    for i in 0..5 {
        m.create_memory(with_key(create(memory(&format!("ok {i}"))), &flood)).await.expect("within burst");
    }
    let mut refused = 0;
    for i in 0..5 {
        match m.create_memory(with_key(create(memory(&format!("flood {i}"))), &flood)).await {
            Ok(_) => panic!("call {i} over the limit was allowed"),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!((1..=6).contains(&retry_after(&s)), "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 5);
    // Another agent, and another method class of the same agent, are unaffected.
    m.create_memory(with_key(create(memory("calm")), &calm)).await.expect("another agent writes");
    m.list_memories(with_key(list(), &flood)).await.expect("reads are another class");
    let all = m
        .list_memories(app.admin(pb::ListMemoriesRequest { namespace: "red".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.memories.len(), 6, "refused calls wrote nothing");
    app.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn two_replicas_share_one_agents_budget_through_redis() {
    let env = postgres_env();
    let db = fresh_database(&env).await;
    let admin = random_api_key();
    let prefix = format!("tmws-test:{}:", uuid::Uuid::now_v7().simple());
    let settings = [
        ("TMWS_REDIS_PREFIX", prefix.as_str()),
        ("TMWS_RATE_LIMIT_READ_PER_SEC", "0.1"),
        ("TMWS_RATE_LIMIT_READ_BURST", "4"),
    ];
    let mut one = spawn_app_with(auth_config(&db, env.redis(), &admin, &settings)).await;
    one.admin_key = admin.clone();
    let two = spawn_app_with(auth_config(&db, env.redis(), &admin, &settings)).await;
    let key = one.create_agent("shared", "red", "agent").await;

    one.memory().list_memories(with_key(list(), &key)).await.expect("1st on replica one");
    two.memory().list_memories(with_key(list(), &key)).await.expect("2nd on replica two");
    one.memory().list_memories(with_key(list(), &key)).await.expect("3rd on replica one");
    two.memory().list_memories(with_key(list(), &key)).await.expect("4th on replica two");
    for app in [&one, &two] {
        let s = app.memory().list_memories(with_key(list(), &key)).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "the budget is shared: {s:?}");
    }
    two.stop().await.expect("stop two");
    one.stop().await.expect("stop one");
}

async fn app_behind_redis_proxy(fail_open: bool) -> (crate::common::TestApp, TcpProxy) {
    let env = postgres_env();
    let proxy = TcpProxy::start(socket_addr_of(env.require_redis())).await;
    let redis = with_host_port(env.require_redis(), proxy.addr);
    let db = fresh_database(&env).await;
    let admin = random_api_key();
    let fail_open = if fail_open { "true" } else { "false" };
    let settings = [
        ("TMWS_RATE_LIMIT_READ_PER_SEC", "0.1"),
        ("TMWS_RATE_LIMIT_READ_BURST", "3"),
        ("TMWS_RATE_LIMIT_FAIL_OPEN", fail_open),
    ];
    let mut app = spawn_app_with(auth_config(&db, Some(&redis), &admin, &settings)).await;
    app.admin_key = admin;
    (app, proxy)
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn redis_stopped_mid_test_fail_open_allows_calls() {
    let (app, proxy) = app_behind_redis_proxy(true).await;
    let key = app.create_agent("alice", "red", "agent").await;
    let mut m = app.memory();
    for _ in 0..3 {
        m.list_memories(with_key(list(), &key)).await.expect("within burst");
    }
    let s = m.list_memories(with_key(list(), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "limited while Redis is up");

    let redis_errors = || {
        let text = tmws::telemetry::metrics::metrics().render_prometheus();
        text.lines()
            .find_map(|l| l.strip_prefix("tmws_redis_errors_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let errors_before = redis_errors();
    proxy.cut().await;
    for _ in 0..5 {
        m.list_memories(with_key(list(), &key)).await.expect("fail-open: allowed while Redis is down");
    }
    assert!(redis_errors() >= errors_before + 5, "each failed Redis call is counted in the metrics");
    assert_eq!(app.health_status("tmws.v1.MemoryService").await.unwrap(), ServingStatus::Serving);

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match m.list_memories(with_key(list(), &key)).await {
            Err(s) if s.code() == Code::ResourceExhausted => break,
            Ok(_) => {}
            Err(s) => panic!("unexpected {s:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "limits did not come back with Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn redis_stopped_mid_test_fail_closed_refuses_calls() {
    let (app, proxy) = app_behind_redis_proxy(false).await;
    let key = app.create_agent("alice", "red", "agent").await;
    let mut m = app.memory();
    m.list_memories(with_key(list(), &key)).await.expect("Redis up");
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::Serving, Duration::from_secs(10)).await;

    proxy.cut().await;
    let s = m.list_memories(with_key(list(), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "fail-closed: {s:?}");
    let s = m.create_memory(with_key(create(memory("x")), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::NotServing, Duration::from_secs(10)).await;

    proxy.restore();
    app.wait_for_status("tmws.v1.MemoryService", ServingStatus::Serving, Duration::from_secs(10)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m.list_memories(with_key(list(), &key)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "calls did not come back with Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = m
        .list_memories(app.admin(pb::ListMemoriesRequest { namespace: "red".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert!(all.memories.is_empty(), "the refused write wrote nothing");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn without_redis_limits_apply_in_process() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let admin = random_api_key();
    let settings = [("TMWS_RATE_LIMIT_SEARCH_PER_SEC", "0.1"), ("TMWS_RATE_LIMIT_SEARCH_BURST", "2")];
    let mut app = spawn_app_with(auth_config(&db, None, &admin, &settings)).await;
    app.admin_key = admin;
    let key = app.create_agent("alice", "red", "agent").await;
    let search = || pb::SearchMemoriesRequest { query: "anything".into(), ..Default::default() };
    let mut m = app.memory();
    m.search_memories(with_key(search(), &key)).await.expect("1");
    m.search_memories(with_key(search(), &key)).await.expect("2");
    let s = m.search_memories(with_key(search(), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    app.stop().await.expect("stop");
}

async fn slow_embedder_app(extra: &[(&str, &str)]) -> (crate::common::TestApp, EmbedServer, String) {
    let embed = EmbedServer::start(16).await;
    let url = embed.url();
    let mut settings = vec![
        ("TMWS_EMBEDDING_PROVIDER", "openai"),
        ("TMWS_EMBEDDING_URL", url.as_str()),
        ("TMWS_EMBEDDING_MODEL", "test-model"),
        ("TMWS_EMBEDDING_DIMENSION", "16"),
        ("TMWS_EMBEDDING_MAX_RETRIES", "0"),
        ("TMWS_EMBEDDING_TIMEOUT", "20s"),
    ];
    settings.extend_from_slice(extra);
    let app = spawn_app_auth(&settings).await;
    let key = app.create_agent("alice", "red", "agent").await;
    (app, embed, key)
}

#[tokio::test]
async fn calls_past_their_deadline_are_cut_and_streams_are_not() {
    let (app, embed, key) = slow_embedder_app(&[("TMWS_REQUEST_TIMEOUT_MAX", "500ms")]).await;
    embed.delay(Duration::from_secs(3));
    let mut m = app.memory();
    // The server's cap.
    let started = std::time::Instant::now();
    let s = m.create_memory(with_key(create(memory("slow")), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // A shorter grpc-timeout from the client wins.
    let mut req = with_key(create(memory("slow")), &key);
    req.set_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let s = m.create_memory(req).await.unwrap_err();
    assert!(matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled), "{s:?}");
    assert!(started.elapsed() < Duration::from_millis(450), "{:?}", started.elapsed());
    // Fast calls are unaffected; a server-streaming call outlives the cap.
    embed.delay(Duration::ZERO);
    m.create_memory(with_key(create(memory("fast")), &key)).await.expect("fast call");
    let mut stream = app
        .health()
        .watch(tonic_health::pb::HealthCheckRequest { service: "tmws.v1.MemoryService".into() })
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("first").expect("status");
    let more = tokio::time::timeout(Duration::from_millis(1200), stream.message()).await;
    assert!(more.is_err(), "the stream stays open past the deadline cap (no message, no end): {more:?}");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn overload_is_shed_with_unavailable_not_queued() {
    let (app, embed, key) = slow_embedder_app(&[("TMWS_MAX_CONCURRENT_REQUESTS", "1")]).await;
    embed.delay(Duration::from_millis(1500));
    let mut slow = app.memory();
    let key2 = key.clone();
    let in_flight = tokio::spawn(async move { slow.create_memory(with_key(create(memory("slow")), &key2)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let s = app.memory().list_memories(with_key(list(), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "refused at once, not queued");
    // Health is never shed.
    assert_eq!(app.health_status("tmws.v1.MemoryService").await.unwrap(), ServingStatus::Serving);
    in_flight.await.unwrap().expect("the call in flight completes");
    app.memory().list_memories(with_key(list(), &key)).await.expect("capacity is back");
    app.stop().await.expect("stop");
}
