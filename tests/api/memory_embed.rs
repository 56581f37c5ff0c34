//! The memory service with a remote embedding provider (a real HTTP server on loopback that
//! speaks the OpenAI and Ollama protocols): batching, failures, no silent fallback.

use tonic::Code;

use crate::{
    common::{embed_server::EmbedServer, fresh_database, spawn_secure, test_env},
    memory::{create, memory},
};
use tmws::pb;

async fn rows(url: &str) -> i64 {
    crate::common::count_rows(url, "memories").await
}

#[tokio::test]
async fn openai_provider_batches_and_fails_loudly() {
    let server = EmbedServer::start(16).await;
    let env = test_env();
    let db = fresh_database(&env).await;
    let url = server.url();
    let app = spawn_secure(
        &db,
        &[
            ("TMWS_EMBEDDING_PROVIDER", "openai"),
            ("TMWS_EMBEDDING_URL", &url),
            ("TMWS_EMBEDDING_MODEL", "test-model"),
            ("TMWS_EMBEDDING_DIMENSION", "16"),
            ("TMWS_EMBEDDING_BATCH_SIZE", "4"),
            ("TMWS_EMBEDDING_MAX_RETRIES", "1"),
            ("TMWS_EMBEDDING_TIMEOUT", "500ms"),
        ],
    )
    .await;
    let mut client = app.memory();

    // A batch of 10 is embedded in requests of at most 4, and the vectors are the provider's.
    let requests = (0..10).map(|i| create(memory(&format!("note {i}")))).collect();
    let out = client
        .batch_create_memories(pb::BatchCreateMemoriesRequest { requests, ..Default::default() })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(out.memories.len(), 10);
    assert_eq!(server.batch_sizes(), vec![4, 4, 2]);
    assert!(out.memories.iter().all(|m| m.embedding_model == "test-model" && m.embedding_dimension == 16));
    let full = client
        .get_memory(pb::GetMemoryRequest {
            id: out.memories[3].id.clone(),
            view: pb::MemoryView::Full as i32,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    let expected = server.expected("note 3");
    assert!(full.embedding.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6));

    // One transient failure is retried; persistent failures are UNAVAILABLE and write nothing.
    server.fail_next(1, 503);
    client.create_memory(create(memory("after a blip"))).await.expect("retried");
    let before = rows(&db).await;
    server.fail_next(10, 503);
    let err = client.create_memory(create(memory("never stored"))).await.expect_err("provider down");
    assert_eq!(err.code(), Code::Unavailable);
    server.fail_next(0, 503);
    server.wrong_dimension(true);
    let err = client.create_memory(create(memory("wrong size"))).await.expect_err("wrong dimension");
    assert_eq!(err.code(), Code::Unavailable);
    let err = client
        .search_memories(pb::SearchMemoriesRequest {
            query: "note".into(),
            mode: pb::SearchMode::Semantic as i32,
            ..Default::default()
        })
        .await
        .expect_err("search needs the provider");
    assert_eq!(err.code(), Code::Unavailable);
    server.wrong_dimension(false);
    assert_eq!(rows(&db).await, before, "nothing was written while the provider failed");

    // A client vector skips the provider.
    let calls = server.requests();
    let mut m = memory("brings its own vector");
    m.embedding = server.expected("anything");
    client.create_memory(create(m)).await.expect("client vector");
    assert_eq!(server.requests(), calls);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn ollama_provider_embeds_content_and_queries() {
    let server = EmbedServer::start(8).await;
    let env = test_env();
    let db = fresh_database(&env).await;
    let url = server.url();
    let app = spawn_secure(
        &db,
        &[
            ("TMWS_EMBEDDING_PROVIDER", "ollama"),
            ("TMWS_EMBEDDING_URL", &url),
            ("TMWS_EMBEDDING_MODEL", "nomic-embed-text"),
            ("TMWS_EMBEDDING_DIMENSION", "8"),
        ],
    )
    .await;
    let mut client = app.memory();
    let m = client.create_memory(create(memory("ollama embedded this"))).await.expect("create").into_inner();
    assert_eq!(m.embedding_model, "nomic-embed-text");
    let found = client
        .search_memories(pb::SearchMemoriesRequest {
            query: "ollama embedded this".into(),
            mode: pb::SearchMode::Semantic as i32,
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner();
    assert_eq!(found.results[0].memory.as_ref().map(|m| m.id.as_str()), Some(m.id.as_str()));
    assert!((found.results[0].score - 1.0).abs() < 1e-5, "same text, same vector");
    assert!(server.seen().iter().all(|r| r.path == "/api/embed"));
    app.stop().await.expect("stop");
}
