//! MemoryService: CRUD, idempotency, etags, TTL, pagination, prune, stats, bad input.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestApp, as_agent, spawn_app_env};
use tmws::pb::{self, memory_service_client::MemoryServiceClient};

pub fn memory(content: &str) -> pb::Memory {
    pb::Memory { content: content.into(), ..Default::default() }
}

pub fn create(m: pb::Memory) -> pb::CreateMemoryRequest {
    pb::CreateMemoryRequest { memory: Some(m), ..Default::default() }
}

/// Asserts INVALID_ARGUMENT with a field violation on `field`.
pub fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let bad = details.bad_request().unwrap_or_else(|| panic!("no BadRequest details in {status:?}"));
    assert!(
        bad.field_violations.iter().any(|v| v.field == field),
        "no violation on {field}: {:?}",
        bad.field_violations
    );
}

async fn count(app: &TestApp) -> i64 {
    let stats = app.memory().get_memory_stats(pb::GetMemoryStatsRequest::default()).await.expect("stats");
    stats.into_inner().total_count
}

/// Rows in the table, whoever owns them (straight from the database).
async fn rows(app: &TestApp) -> i64 {
    crate::common::count_rows(&app.database_url, "memories").await
}

#[tokio::test]
async fn create_get_update_delete_with_etags() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let mut m = memory("Deploys use blue-green releases");
    m.tags = vec!["ops".into(), "deploy".into(), "ops".into()];
    m.kind = "decision".into();
    m.importance = Some(0.8);
    m.metadata = Some(tmws::api::convert::json_to_struct(serde_json::json!({"team": "infra", "n": 3})));
    let created = client.create_memory(create(m)).await.expect("create").into_inner();
    assert!(uuid::Uuid::parse_str(&created.id).is_ok());
    assert_eq!(created.owner, "dev-agent");
    assert_eq!(created.namespace, "default");
    assert_eq!(created.tags, vec!["ops", "deploy"], "tags are de-duplicated in order");
    assert_eq!(created.access_level, pb::AccessLevel::Private as i32, "PRIVATE by default");
    assert_eq!(created.embedding_model, "tmws-hash-v1");
    assert_eq!(created.embedding_dimension, 384);
    assert!(created.embedding.is_empty(), "the vector is returned only with the FULL view");
    assert!(!created.etag.is_empty());

    let got = client
        .get_memory(pb::GetMemoryRequest {
            id: created.id.clone(),
            view: pb::MemoryView::Full as i32,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.content, created.content);
    assert_eq!(got.embedding.len(), 384);
    let norm: f32 = got.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "hash vectors are L2-normalised: {norm}");

    // Update summary only; a stale etag afterwards is ABORTED and changes nothing.
    let updated = client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: created.id.clone(), summary: "blue-green".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["summary".into()] }),
            etag: created.etag.clone(),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.summary, "blue-green");
    assert_eq!(updated.content, created.content, "fields outside the mask are kept");
    assert_ne!(updated.etag, created.etag);

    let stale = client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: created.id.clone(), summary: "lost update".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["summary".into()] }),
            etag: created.etag.clone(),
            ..Default::default()
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::Aborted);
    let after = client.get_memory(pb::GetMemoryRequest { id: created.id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(after.into_inner().summary, "blue-green");

    // New content re-embeds.
    let before_vec = got.embedding;
    client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                id: created.id.clone(),
                content: "Lunch menu for Friday".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["content".into()] }),
            ..Default::default()
        })
        .await
        .expect("update content");
    let reembedded = client
        .get_memory(pb::GetMemoryRequest {
            id: created.id.clone(),
            view: pb::MemoryView::Full as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(reembedded.embedding, before_vec, "content change re-embeds");

    let del = client
        .delete_memory(pb::DeleteMemoryRequest {
            id: created.id.clone(),
            etag: updated.etag.clone(),
            ..Default::default()
        })
        .await
        .expect_err("stale etag on delete");
    assert_eq!(del.code(), Code::Aborted);
    client
        .delete_memory(pb::DeleteMemoryRequest { id: created.id.clone(), etag: reembedded.etag, ..Default::default() })
        .await
        .expect("delete");
    let gone =
        client.get_memory(pb::GetMemoryRequest { id: created.id, ..Default::default() }).await.expect_err("gone");
    assert_eq!(gone.code(), Code::NotFound);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn create_is_idempotent_by_request_id() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let mut req = create(memory("remember me once"));
    req.request_id = "req-42".into();
    let a = client.create_memory(req.clone()).await.expect("first").into_inner();
    let b = client.create_memory(req).await.expect("retry").into_inner();
    assert_eq!(a.id, b.id);
    assert_eq!(rows(&app).await, 1);

    let batch = pb::BatchCreateMemoriesRequest {
        requests: vec![create(memory("one")), create(memory("two"))],
        request_id: "batch-1".into(),
        ..Default::default()
    };
    let first = client.batch_create_memories(batch.clone()).await.expect("batch").into_inner();
    let again = client.batch_create_memories(batch).await.expect("batch retry").into_inner();
    let ids = |r: &pb::BatchCreateMemoriesResponse| r.memories.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(first.memories[0].content, "one");
    assert_eq!(rows(&app).await, 3);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_input_is_rejected_and_nothing_is_written() {
    let app = spawn_app_env(&[("TMWS_MAX_BATCH_SIZE", "5"), ("TMWS_MAX_TTL", "1h")]).await;
    let mut client = app.memory();
    let with = |f: &dyn Fn(&mut pb::Memory)| {
        let mut m = memory("valid content");
        f(&mut m);
        create(m)
    };
    let nested = (0..11).fold(serde_json::json!(1), |acc, _| serde_json::json!({ "x": acc }));
    let cases: Vec<(pb::CreateMemoryRequest, &str)> = vec![
        (with(&|m| m.content = String::new()), "memory.content"),
        (with(&|m| m.content = "   ".into()), "memory.content"),
        (with(&|m| m.content = "x".repeat(64 * 1024 + 1)), "memory.content"),
        (with(&|m| m.tags = (0..65).map(|i| format!("t{i}")).collect()), "memory.tags"),
        (with(&|m| m.tags = vec!["ok".into(), "y".repeat(129)]), "memory.tags[1]"),
        (
            with(&|m| {
                m.metadata =
                    Some(tmws::api::convert::json_to_struct(serde_json::json!({"blob": "z".repeat(17 * 1024)})))
            }),
            "memory.metadata",
        ),
        (with(&|m| m.metadata = Some(tmws::api::convert::json_to_struct(nested.clone()))), "memory.metadata"),
        (with(&|m| m.importance = Some(1.5)), "memory.importance"),
        (with(&|m| m.importance = Some(-0.1)), "memory.importance"),
        (with(&|m| m.embedding = vec![f32::NAN; 384]), "memory.embedding"),
        (with(&|m| m.embedding = vec![f32::INFINITY; 384]), "memory.embedding"),
        (with(&|m| m.embedding = vec![0.5; 383]), "memory.embedding"),
        (with(&|m| m.access_level = 99), "memory.access_level"),
        (with(&|m| m.parent_id = "not-a-uuid".into()), "memory.parent_id"),
        (with(&|m| m.parent_id = uuid::Uuid::now_v7().to_string()), "memory.parent_id"),
        (with(&|m| m.ttl = Some(prost_types::Duration { seconds: -5, nanos: 0 })), "memory.ttl"),
        (with(&|m| m.ttl = Some(prost_types::Duration { seconds: 7200, nanos: 0 })), "memory.ttl"),
        (with(&|m| m.embedding_model = "another-model".into()), "memory.embedding_model"),
    ];
    for (req, field) in cases {
        let status = client.create_memory(req).await.expect_err(field);
        assert_invalid(&status, field);
    }
    // A batch over the limit, and a batch with one bad item: all or nothing.
    let too_many = pb::BatchCreateMemoriesRequest {
        requests: (0..6).map(|i| create(memory(&format!("m{i}")))).collect(),
        ..Default::default()
    };
    assert_invalid(&client.batch_create_memories(too_many).await.expect_err("over limit"), "requests");
    let one_bad = pb::BatchCreateMemoriesRequest {
        requests: vec![create(memory("fine")), create(memory("")), create(memory("also fine"))],
        ..Default::default()
    };
    assert_invalid(&client.batch_create_memories(one_bad).await.expect_err("one bad"), "requests[1].memory.content");
    assert_eq!(rows(&app).await, 0, "nothing was written");

    // Malformed ids, unknown enums, negative page sizes, bad page tokens.
    let status = client.get_memory(pb::GetMemoryRequest { id: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_invalid(&status, "id");
    let status = client
        .get_memory(pb::GetMemoryRequest { id: uuid::Uuid::now_v7().to_string(), view: 7, ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&status, "view");
    let status =
        client.list_memories(pb::ListMemoriesRequest { page_size: -1, ..Default::default() }).await.unwrap_err();
    assert_invalid(&status, "page_size");
    let status = client
        .list_memories(pb::ListMemoriesRequest { page_token: "forged.token".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&status, "page_token");
    let status = client
        .search_memories(pb::SearchMemoriesRequest { query: "x".into(), top_k: -1, ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&status, "top_k");
    let status = client
        .search_memories(pb::SearchMemoriesRequest { query_embedding: vec![0.1; 10], ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&status, "query_embedding");
    let status = client.search_memories(pb::SearchMemoriesRequest::default()).await.unwrap_err();
    assert_invalid(&status, "query");
    let status = client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: uuid::Uuid::now_v7().to_string(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["owner".into()] }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&status, "update_mask.paths[0]");
    assert_eq!(rows(&app).await, 0);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_query() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let requests = (0..25)
        .map(|i| {
            let mut m = memory(&format!("memory number {i}"));
            m.tags = vec![if i % 2 == 0 { "even" } else { "odd" }.into()];
            m.importance = Some(f64::from(i) / 100.0);
            create(m)
        })
        .collect();
    client
        .batch_create_memories(pb::BatchCreateMemoriesRequest { requests, ..Default::default() })
        .await
        .expect("batch");

    // Three pages of 10, 10, 5: complete, no duplicates, in order.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_memories(pb::ListMemoriesRequest {
                page_size: 10,
                page_token: token.clone(),
                order_by: pb::MemoryOrderBy::ImportanceDesc as i32,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        seen.extend(page.memories.iter().map(|m| m.importance.unwrap_or(-1.0)));
        if page.next_page_token.is_empty() {
            break;
        }
        // The token is refused with another filter.
        let reused = client
            .list_memories(pb::ListMemoriesRequest {
                page_size: 10,
                page_token: page.next_page_token.clone(),
                order_by: pb::MemoryOrderBy::ImportanceDesc as i32,
                filter: Some(pb::MemoryFilter { tags_any: vec!["even".into()], ..Default::default() }),
                ..Default::default()
            })
            .await
            .expect_err("token reused with another filter");
        assert_invalid(&reused, "page_token");
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "importance descending: {seen:?}");

    // Page size is coerced to the maximum; filters apply before LIMIT.
    let evens = client
        .list_memories(pb::ListMemoriesRequest {
            page_size: 1_000_000,
            filter: Some(pb::MemoryFilter { tags_all: vec!["even".into()], ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(evens.memories.len(), 13);
    assert!(evens.next_page_token.is_empty());
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn expired_memories_vanish_at_once_and_are_swept() {
    let app = spawn_app_env(&[("TMWS_SWEEP_INTERVAL", "300ms")]).await;
    let mut client = app.memory();
    let mut m = memory("short-lived note");
    m.ttl = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let short = client.create_memory(create(m)).await.expect("create").into_inner();
    assert!(short.expire_time.is_some());
    client.create_memory(create(memory("long-lived note"))).await.expect("create");
    client.get_memory(pb::GetMemoryRequest { id: short.id.clone(), ..Default::default() }).await.expect("visible");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let gone =
        client.get_memory(pb::GetMemoryRequest { id: short.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "invisible as soon as it expires");
    let list = client.list_memories(pb::ListMemoriesRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.memories.len(), 1);
    let search = client
        .search_memories(pb::SearchMemoriesRequest { query: "short-lived note".into(), ..Default::default() })
        .await
        .expect("search")
        .into_inner();
    assert!(search.results.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.id != short.id)));

    // The sweeper deletes the row.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rows(&app).await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "sweeper did not delete the expired row");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn reads_of_a_memory_deleted_before_the_flush_do_not_block_the_others() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let kept = client.create_memory(create(memory("kept memory"))).await.expect("create").into_inner();
    let gone = client.create_memory(create(memory("deleted memory"))).await.expect("create").into_inner();
    for id in [&kept.id, &gone.id, &kept.id] {
        client.get_memory(pb::GetMemoryRequest { id: id.clone(), ..Default::default() }).await.expect("get");
    }
    // Deleted while its read is still waiting to be written (flushes run once a second).
    client.delete_memory(pb::DeleteMemoryRequest { id: gone.id.clone(), ..Default::default() }).await.expect("delete");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = client
            .get_memory(pb::GetMemoryRequest { id: kept.id.clone(), ..Default::default() })
            .await
            .expect("get")
            .into_inner();
        if got.access_count >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the flush failed on the deleted memory: {}", got.access_count);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await.expect("stop");
}

/// A read count flushed while the memory it counts is being deleted: the flush waits for the
/// delete (the foreign key), then writes the other counts and skips the deleted memory, whether
/// or not it had a count row already (PostgreSQL: the flush checks memories, it does not lock
/// them).
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn a_flush_racing_a_delete_keeps_the_other_counts() {
    use sqlx::{Connection, Executor};
    use tmws::store::{Backend, MemoryStore};

    let env = crate::common::postgres_env();
    let db = crate::common::fresh_database(&env).await;
    let app = crate::common::spawn_secure(&db, &[]).await;
    let mut client = app.memory();
    let store = tmws::store::PgStore::connect(&crate::common::test_config(&db, None, &[])).await.expect("store");
    let id = |m: &pb::Memory| uuid::Uuid::parse_str(&m.id).expect("uuid");
    for counted_before in [false, true] {
        let kept = client.create_memory(create(memory("kept memory"))).await.expect("create").into_inner();
        let gone = client.create_memory(create(memory("deleted memory"))).await.expect("create").into_inner();
        let now = chrono::Utc::now();
        if counted_before {
            store.record_access(&[(id(&gone), 1, now)]).await.expect("first count");
        }
        let mut deleter = crate::common::pg_connect(&db).await;
        let mut tx = deleter.begin().await.expect("begin");
        tx.execute(format!("DELETE FROM memories WHERE id = '{}'", gone.id).as_str()).await.expect("delete");

        let flush = {
            let store = store.clone();
            let counts = vec![(id(&gone), 2, now), (id(&kept), 3, now)];
            tokio::spawn(async move { store.record_access(&counts).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!flush.is_finished(), "the flush waits for the delete (counted before: {counted_before})");
        tx.commit().await.expect("commit the delete");
        let result = tokio::time::timeout(Duration::from_secs(10), flush).await.expect("flush ends").expect("join");
        result.unwrap_or_else(|e| panic!("flush failed (counted before: {counted_before}): {e}"));

        let counts: Vec<(uuid::Uuid, i64)> =
            sqlx::query_as("SELECT memory_id, access_count FROM memory_access WHERE memory_id = ANY($1)")
                .bind(vec![id(&kept), id(&gone)])
                .fetch_all(store.pool())
                .await
                .expect("counts");
        assert_eq!(counts, vec![(id(&kept), 3)], "counted before: {counted_before}");
    }
    store.close().await;
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn reads_are_counted_in_the_background() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let m = client.create_memory(create(memory("popular memory"))).await.expect("create").into_inner();
    for _ in 0..3 {
        client.get_memory(pb::GetMemoryRequest { id: m.id.clone(), ..Default::default() }).await.expect("get");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = client.get_memory(pb::GetMemoryRequest { id: m.id.clone(), ..Default::default() }).await.unwrap();
        let got = got.into_inner();
        if got.access_count >= 3 {
            assert!(got.last_access_time.is_some());
            assert_eq!(got.etag, m.etag, "reading does not change the version");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "reads were not recorded: {}", got.access_count);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn prune_and_stats() {
    let app = spawn_app_env(&[]).await;
    let mut client: MemoryServiceClient<_> = app.memory();
    let mut items = Vec::new();
    for i in 0..6 {
        let mut m = memory(&format!("note {i}"));
        m.kind = if i < 4 { "fact".into() } else { "decision".into() };
        m.importance = Some(if i < 3 { 0.1 } else { 0.9 });
        m.access_level = pb::AccessLevel::Team as i32;
        items.push(create(m));
    }
    client
        .batch_create_memories(as_agent(
            pb::BatchCreateMemoriesRequest { requests: items, ..Default::default() },
            "alice",
            "red",
            "agent",
        ))
        .await
        .expect("batch");
    let mut bobs = memory("bob's note");
    bobs.importance = Some(0.0);
    bobs.access_level = pb::AccessLevel::Team as i32;
    client.create_memory(as_agent(create(bobs), "bob", "red", "agent")).await.expect("bob");

    let stats = client
        .get_memory_stats(as_agent(pb::GetMemoryStatsRequest::default(), "alice", "red", "agent"))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.total_count, 7);
    assert_eq!(stats.count_by_kind.get("fact"), Some(&4));
    assert_eq!(stats.count_by_kind.get("decision"), Some(&2));
    assert_eq!(stats.count_by_access_level.get("ACCESS_LEVEL_TEAM"), Some(&7));
    assert_eq!(stats.with_embedding_count, 7);
    assert!(stats.storage_bytes > 0);

    let future = tmws::api::convert::to_timestamp(chrono::Utc::now() + chrono::Duration::hours(1));
    let prune = |dry_run: bool, limit: i32| pb::PruneMemoriesRequest {
        older_than: Some(future),
        max_importance: Some(0.5),
        dry_run,
        limit,
        ..Default::default()
    };
    let dry = client.prune_memories(as_agent(prune(true, 0), "alice", "red", "agent")).await.expect("dry").into_inner();
    assert_eq!((dry.pruned_count, dry.dry_run), (3, true), "alice prunes only her own memories");
    let capped =
        client.prune_memories(as_agent(prune(false, 2), "alice", "red", "agent")).await.expect("prune").into_inner();
    assert_eq!((capped.pruned_count, capped.more), (2, true));
    let rest =
        client.prune_memories(as_agent(prune(false, 0), "alice", "red", "agent")).await.expect("prune").into_inner();
    assert_eq!((rest.pruned_count, rest.more), (1, false));
    assert_eq!(rows(&app).await, 4, "bob's memory survives alice's prune");
    let admin =
        client.prune_memories(as_agent(prune(false, 0), "root", "red", "admin")).await.expect("admin").into_inner();
    assert_eq!(admin.pruned_count, 1, "an admin prunes the whole namespace");

    let none = client
        .prune_memories(as_agent(pb::PruneMemoriesRequest::default(), "alice", "red", "agent"))
        .await
        .expect_err("no criteria");
    assert_invalid(&none, "expired");
    let _ = count(&app).await;
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn list_filters_apply_inside_the_query() {
    let app = spawn_app_env(&[]).await;
    let mut client = app.memory();
    let mut requests = Vec::new();
    for i in 0..12 {
        let mut m = memory(&format!("filterable memory {i}"));
        m.kind = if i % 3 == 0 { "decision".into() } else { "fact".into() };
        m.tags = match i % 4 {
            0 => vec!["a".into(), "b".into()],
            1 => vec!["a".into()],
            2 => vec!["b".into()],
            _ => vec![],
        };
        m.importance = Some(f64::from(i) / 11.0);
        m.access_level = if i < 6 { pb::AccessLevel::Team } else { pb::AccessLevel::Public } as i32;
        m.metadata = Some(tmws::api::convert::json_to_struct(
            serde_json::json!({"parity": if i % 2 == 0 { "even" } else { "odd" }, "i": i}),
        ));
        requests.push(create(m));
    }
    let created = client
        .batch_create_memories(as_agent(
            pb::BatchCreateMemoriesRequest { requests, ..Default::default() },
            "alice",
            "red",
            "agent",
        ))
        .await
        .expect("batch")
        .into_inner()
        .memories;
    client.create_memory(as_agent(create(memory("bob's own")), "bob", "red", "agent")).await.expect("bob");
    let middle = created[6].create_time;

    let list = |f: pb::MemoryFilter| {
        let mut c = app.memory();
        async move {
            let r = c
                .list_memories(as_agent(
                    pb::ListMemoriesRequest { filter: Some(f), ..Default::default() },
                    "alice",
                    "red",
                    "agent",
                ))
                .await
                .expect("list")
                .into_inner();
            let mut contents: Vec<usize> = r
                .memories
                .iter()
                .filter_map(|m| m.content.strip_prefix("filterable memory ").and_then(|n| n.parse().ok()))
                .collect();
            contents.sort_unstable();
            (r.memories.len(), contents)
        }
    };
    assert_eq!(
        list(pb::MemoryFilter { tags_any: vec!["a".into()], ..Default::default() }).await.1,
        vec![0, 1, 4, 5, 8, 9]
    );
    assert_eq!(
        list(pb::MemoryFilter { tags_all: vec!["a".into(), "b".into()], ..Default::default() }).await.1,
        vec![0, 4, 8]
    );
    assert_eq!(
        list(pb::MemoryFilter { kinds: vec!["decision".into()], ..Default::default() }).await.1,
        vec![0, 3, 6, 9]
    );
    assert_eq!(
        list(pb::MemoryFilter { owners: vec!["bob".into()], ..Default::default() }).await.0,
        0,
        "bob's PRIVATE memory stays invisible"
    );
    assert_eq!(
        list(pb::MemoryFilter { access_levels: vec![pb::AccessLevel::Public as i32], ..Default::default() }).await.1,
        vec![6, 7, 8, 9, 10, 11]
    );
    assert_eq!(
        list(pb::MemoryFilter { min_importance: Some(0.5), max_importance: Some(0.8), ..Default::default() }).await.1,
        vec![6, 7, 8]
    );
    assert_eq!(
        list(pb::MemoryFilter { create_time_after: middle, ..Default::default() }).await.1,
        vec![7, 8, 9, 10, 11]
    );
    assert_eq!(
        list(pb::MemoryFilter { create_time_before: middle, ..Default::default() }).await.1,
        vec![0, 1, 2, 3, 4, 5]
    );
    let meta = tmws::api::convert::json_to_struct(serde_json::json!({"parity": "odd"}));
    assert_eq!(
        list(pb::MemoryFilter { metadata_equals: Some(meta), kinds: vec!["fact".into()], ..Default::default() })
            .await
            .1,
        vec![1, 5, 7, 11]
    );
    let bad = client
        .list_memories(pb::ListMemoriesRequest {
            filter: Some(pb::MemoryFilter {
                min_importance: Some(0.9),
                max_importance: Some(0.1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("inverted range");
    assert_invalid(&bad, "filter.min_importance");

    // Search applies the same filter, coerces top_k, and accepts MMR diversity.
    let found = client
        .search_memories(as_agent(
            pb::SearchMemoriesRequest {
                query: "filterable memory".into(),
                top_k: 1000,
                diversity: Some(0.5),
                filter: Some(pb::MemoryFilter { kinds: vec!["decision".into()], ..Default::default() }),
                ..Default::default()
            },
            "alice",
            "red",
            "agent",
        ))
        .await
        .expect("search")
        .into_inner();
    assert_eq!(found.results.len(), 4);
    assert!(found.results.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.kind == "decision")));

    // Prune of expired memories only touches expired ones.
    let mut short = memory("expires soon");
    short.ttl = Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 });
    client.create_memory(as_agent(create(short), "alice", "red", "agent")).await.expect("short");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pruned = client
        .prune_memories(as_agent(
            pb::PruneMemoriesRequest { expired: true, ..Default::default() },
            "alice",
            "red",
            "agent",
        ))
        .await
        .expect("prune expired")
        .into_inner();
    assert_eq!(pruned.pruned_count, 1);
    assert_eq!(rows(&app).await, 13);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn messages_over_the_size_limit_are_refused_before_decoding() {
    let app = spawn_app_env(&[("TMWS_MAX_MESSAGE_BYTES", "16384")]).await;
    let mut client = app.memory();
    let status = client.create_memory(create(memory(&"x".repeat(20_000)))).await.expect_err("too large");
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "a message over TMWS_MAX_MESSAGE_BYTES: {status:?}"
    );
    assert_eq!(rows(&app).await, 0);
    client.create_memory(create(memory(&"x".repeat(10_000)))).await.expect("under the limit");
    app.stop().await.expect("stop");
}
