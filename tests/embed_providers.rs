//! The `openai` and `ollama` embedding providers against a real HTTP server on loopback.

#[path = "common/embed_server.rs"]
mod embed_server;

use std::time::{Duration, Instant};

use embed_server::EmbedServer;
use tmws::{
    config::{EmbeddingConfig, EmbeddingProviderKind},
    embed::{EmbedError, Embedder},
};

const DIM: usize = 32;

fn config(provider: EmbeddingProviderKind, url: &str) -> EmbeddingConfig {
    EmbeddingConfig {
        provider,
        url: Some(url.to_string()),
        model: "test-model".into(),
        api_key: None,
        dimension: DIM,
        timeout: Duration::from_millis(500),
        max_retries: 2,
        batch_size: 4,
    }
}

fn embedder(cfg: &EmbeddingConfig) -> Embedder {
    Embedder::from_config(cfg).expect("valid embedding config")
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("memory number {i} about topic {}", i % 3)).collect()
}

fn refs(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn openai_batches_and_keeps_order() {
    let server = EmbedServer::start(DIM).await;
    server.reverse_order(true); // clients must order by `index`, not by position
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &server.url()));
    assert_eq!((e.model(), e.dimension()), ("test-model", DIM));

    let input = texts(10);
    let out = e.embed(&refs(&input)).await.expect("embeds");
    assert_eq!(out.len(), 10);
    for (text, v) in input.iter().zip(&out) {
        assert_eq!(v, &server.expected(text), "vector of {text:?}");
    }
    assert_eq!(server.requests(), 3);
    assert_eq!(server.batch_sizes(), vec![4, 4, 2]);
    assert_eq!(server.texts_seen(), 10);
    let last = server.last_request().unwrap();
    assert_eq!(last.path, "/v1/embeddings");
    assert_eq!(last.model.as_deref(), Some("test-model"));
    assert_eq!(last.authorization, None, "no key configured, no Authorization header");
    assert_eq!(last.body.unwrap()["encoding_format"], "float");

    // No texts: no request.
    assert!(e.embed(&[]).await.unwrap().is_empty());
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn openai_accepts_a_url_ending_in_v1() {
    let server = EmbedServer::start(DIM).await;
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &format!("{}/v1", server.url())));
    let out = e.embed(&["hello there"]).await.expect("embeds");
    assert_eq!(out, vec![server.expected("hello there")]);
    assert_eq!(server.last_request().unwrap().path, "/v1/embeddings");
}

#[tokio::test]
async fn ollama_native_protocol() {
    let server = EmbedServer::start(DIM).await;
    let mut cfg = config(EmbeddingProviderKind::Ollama, &server.url());
    cfg.batch_size = 64;
    let e = embedder(&cfg);
    let input = texts(5);
    let out = e.embed(&refs(&input)).await.expect("embeds");
    assert_eq!(out, input.iter().map(|t| server.expected(t)).collect::<Vec<_>>());
    assert_eq!(server.requests(), 1);
    let last = server.last_request().unwrap();
    assert_eq!(last.path, "/api/embed");
    assert_eq!(last.body.unwrap(), serde_json::json!({"model": "test-model", "input": input}));
}

#[tokio::test]
async fn api_key_is_sent_and_never_leaks_into_errors() {
    let server = EmbedServer::start(DIM).await;
    server.require_api_key(Some("sk-right-key-123".into()));
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &server.url());

    cfg.api_key = Some("sk-right-key-123".into());
    let out = embedder(&cfg).embed(&["a text"]).await.expect("right key accepted");
    assert_eq!(out, vec![server.expected("a text")]);
    assert_eq!(server.last_request().unwrap().authorization.as_deref(), Some("Bearer sk-right-key-123"));

    // A wrong key: 401 is not retried, and the server's echo of the key is scrubbed.
    cfg.api_key = Some("sk-wrong-key-456".into());
    let before = server.requests();
    let err = embedder(&cfg).embed(&["a text"]).await.expect_err("wrong key refused");
    assert_eq!(server.requests(), before + 1, "401 must not be retried");
    let message = err.to_string();
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err:?}");
    assert!(message.contains("401"), "{message}");
    assert!(!message.contains("sk-wrong-key-456"), "key leaked: {message}");
    assert!(message.contains("<redacted>"), "{message}");

    // No key at all.
    cfg.api_key = None;
    let err = embedder(&cfg).embed(&["a text"]).await.expect_err("no key refused");
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let server = EmbedServer::start(DIM).await;
    server.fail_next(2, 503);
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &server.url())); // max_retries 2
    let started = Instant::now();
    let out = e.embed(&["retry me"]).await.expect("third attempt succeeds");
    assert_eq!(out, vec![server.expected("retry me")]);
    assert_eq!(server.requests(), 3);
    // Two backoffs: at least 50 ms + 100 ms.
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
    let statuses: Vec<u16> = server.seen().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
}

#[tokio::test]
async fn retries_429_and_500_on_ollama() {
    let server = EmbedServer::start(DIM).await;
    let e = embedder(&config(EmbeddingProviderKind::Ollama, &server.url()));
    for status in [429, 500] {
        server.fail_next(1, status);
        let before = server.requests();
        e.embed(&["x"]).await.unwrap_or_else(|err| panic!("{status} then success: {err}"));
        assert_eq!(server.requests(), before + 2, "{status}");
    }
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = EmbedServer::start(DIM).await;
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &server.url()));
    for status in [400, 403, 404, 422] {
        server.fail_next(1, status);
        let before = server.requests();
        let err = e.embed(&["x"]).await.expect_err("fails");
        assert_eq!(server.requests(), before + 1, "{status} must not be retried");
        match &err {
            EmbedError::Unavailable(m) => assert!(m.contains(&status.to_string()), "{m}"),
            other => panic!("{status}: expected Unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn exhausting_retries_is_unavailable() {
    let server = EmbedServer::start(DIM).await;
    server.fail_next(100, 502);
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &server.url());
    cfg.max_retries = 3;
    let err = embedder(&cfg).embed(&["x"]).await.expect_err("keeps failing");
    assert_eq!(server.requests(), 4, "1 attempt + 3 retries");
    let message = err.to_string();
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err:?}");
    assert!(message.contains("502") && message.contains("4 attempts"), "{message}");

    cfg.max_retries = 0;
    let before = server.requests();
    assert!(matches!(embedder(&cfg).embed(&["x"]).await, Err(EmbedError::Unavailable(_))));
    assert_eq!(server.requests(), before + 1);
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let server = EmbedServer::start(DIM).await;
    server.delay(Duration::from_secs(1));
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &server.url());
    cfg.timeout = Duration::from_millis(100);
    cfg.max_retries = 1;
    let started = Instant::now();
    let err = embedder(&cfg).embed(&["slow"]).await.expect_err("times out");
    let elapsed = started.elapsed();
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(server.requests(), 2, "a timeout is retried");
    // Two 100 ms attempts and one backoff of at most 100 ms, never the server's 1 s.
    assert!(elapsed < Duration::from_millis(800), "{elapsed:?}");

    // A delay within the timeout is fine.
    server.delay(Duration::from_millis(20));
    cfg.timeout = Duration::from_millis(500);
    assert!(embedder(&cfg).embed(&["slow"]).await.is_ok());
}

#[tokio::test]
async fn wrong_dimension_is_an_invalid_response() {
    let server = EmbedServer::start(DIM).await;
    server.wrong_dimension(true);
    for kind in [EmbeddingProviderKind::OpenAi, EmbeddingProviderKind::Ollama] {
        let before = server.requests();
        let err = embedder(&config(kind, &server.url())).embed(&["a", "b"]).await.expect_err("wrong dimension");
        match &err {
            EmbedError::InvalidResponse(m) => assert!(m.contains(&format!("dimension {}", DIM + 1)), "{m}"),
            other => panic!("expected InvalidResponse, got {other:?}"),
        }
        assert_eq!(server.requests(), before + 1, "an invalid answer is not retried");
    }
}

#[tokio::test]
async fn unusable_answers_are_invalid_responses() {
    let server = EmbedServer::start(2).await;
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &server.url());
    cfg.dimension = 2;
    let e = embedder(&cfg);
    for (body, expect) in [
        (r#"{"data":[{"index":0,"embedding":[1.0,0.0]}]}"#, "expected 2 embeddings, got 1"),
        (r#"{"data":[{"index":0,"embedding":[1.0,0.0]},{"index":1,"embedding":[0.0,0.0]}]}"#, "all zeros"),
        (r#"{"data":[{"index":0,"embedding":[1.0,NaN]},{"index":1,"embedding":[1.0,0.0]}]}"#, "OpenAI"),
        (r#"{"data":[{"index":0,"embedding":[1.0,1e39]},{"index":1,"embedding":[1.0,0.0]}]}"#, "non-finite"),
        ("<html>oops</html>", "OpenAI"),
    ] {
        server.respond_raw(200, body);
        let err = e.embed(&["a", "b"]).await.expect_err(body);
        match &err {
            EmbedError::InvalidResponse(m) => assert!(m.contains(expect), "{body}: {m}"),
            other => panic!("{body}: expected InvalidResponse, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // A port that was just free: nothing listens there any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut cfg = config(EmbeddingProviderKind::Ollama, &format!("http://127.0.0.1:{port}"));
    cfg.max_retries = 1;
    let err = embedder(&cfg).embed(&["x"]).await.expect_err("refused");
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("could not connect") && message.contains("2 attempts"), "{message}");
}

#[tokio::test]
async fn a_stopped_server_is_unavailable() {
    let mut server = EmbedServer::start(DIM).await;
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &server.url()));
    assert!(e.embed(&["x"]).await.is_ok());
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(matches!(e.embed(&["x"]).await, Err(EmbedError::Unavailable(_))));
}

#[tokio::test]
async fn a_failing_batch_fails_the_whole_call() {
    let server = EmbedServer::start(DIM).await;
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &server.url());
    cfg.max_retries = 0;
    let e = embedder(&cfg);
    server.respond_raw(200, serde_json::json!({"data": (0..4).map(|i| serde_json::json!({"index": i, "embedding": server.expected("z")})).collect::<Vec<_>>()}).to_string());
    server.respond_raw(500, "boom");
    let err = e.embed(&refs(&texts(10))).await.expect_err("second batch fails");
    assert_eq!(server.requests(), 2, "stops at the first failing batch");
    assert!(err.to_string().contains("batch 2/3"), "{err}");
}

#[tokio::test]
async fn none_provider_is_disabled() {
    let mut cfg = config(EmbeddingProviderKind::None, "http://127.0.0.1:9");
    cfg.url = None;
    let e = embedder(&cfg);
    assert!(!e.can_embed());
    assert!(matches!(e.embed(&["x"]).await, Err(EmbedError::Disabled)));
}

#[tokio::test]
async fn embedders_are_shared_across_tasks() {
    let server = EmbedServer::start(DIM).await;
    let e = embedder(&config(EmbeddingProviderKind::OpenAi, &server.url()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let e = e.clone();
        tasks.spawn(async move { e.embed(&[format!("task {i}").as_str()]).await.map(|v| (i, v)) });
    }
    while let Some(result) = tasks.join_next().await {
        let (i, v) = result.unwrap().expect("embeds");
        assert_eq!(v, vec![server.expected(&format!("task {i}"))]);
    }
    assert_eq!(server.requests(), 8);
}

#[tokio::test]
async fn https_to_a_plain_http_port_fails_cleanly() {
    // Exercises the TLS stack (ring provider, platform verifier): the handshake fails, as
    // UNAVAILABLE, and nothing panics.
    let server = EmbedServer::start(DIM).await;
    let mut cfg = config(EmbeddingProviderKind::OpenAi, &format!("https://{}", server.addr));
    cfg.max_retries = 0;
    let err = embedder(&cfg).embed(&["x"]).await.expect_err("no TLS there");
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err:?}");
}
