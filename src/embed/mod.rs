//! Embedding providers: how memories get their vectors when a client sends none.
//!
//! [`Embedder`] is built once from [`EmbeddingConfig`] (`TMWS_EMBEDDING_*`) and shared:
//!
//! | provider | what it does |
//! | --- | --- |
//! | `hash` | the built-in deterministic lexical embedder of [`hash`]; no server needed |
//! | `openai` | `POST {url}/v1/embeddings` (OpenAI, Text Embeddings Inference, vLLM, Ollama's `/v1`, LM Studio); a `url` ending in `/v1` is used as is |
//! | `ollama` | Ollama's native `POST {url}/api/embed` |
//! | `none` | nothing: clients must send vectors ([`EmbedError::Disabled`]) |
//!
//! Remote providers get `texts` in batches of at most `batch_size`, sent one after another. Each
//! request has its own `timeout` and is retried up to `max_retries` times, with exponential
//! backoff and jitter (100 ms doubling, capped at 2 s), after a connection error, a timeout, an
//! HTTP 429 or an HTTP 5xx. Any other unsuccessful status (401, 403, 404, 400...) fails at once
//! with [`EmbedError::Unavailable`] naming the status: it is the server's configuration or the
//! model, not the caller's memory, that is wrong. A successful answer that cannot be used (bad
//! JSON, wrong count, wrong dimension, a non-finite or all-zero vector) is
//! [`EmbedError::InvalidResponse`] and is not retried. There is no fallback: an error is an error.
//!
//! Error messages and logs carry the endpoint (any password in it redacted), the HTTP status and
//! the start of an error body, never the API key nor any text being embedded.

pub mod hash;
mod ollama;
mod openai;
mod remote;

use std::{fmt, sync::Arc};

use tracing::Instrument;

pub use self::hash::hash_embed;
use self::remote::{Protocol, Remote};
use crate::config::{EmbeddingConfig, EmbeddingProviderKind};

/// Inputs of the `hash` provider larger than this (in bytes, all texts together) are embedded on
/// the blocking thread pool instead of an async worker.
const HASH_INLINE_BYTES: usize = 64 * 1024;

/// The configured embedding provider. Cheap to clone (an [`Arc`] inside); `Send + Sync`.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

struct Inner {
    model: String,
    dimension: usize,
    batch_size: usize,
    backend: Backend,
}

enum Backend {
    Hash,
    Remote(Remote),
    None,
}

/// Why [`Embedder::embed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Provider `none`: the server does not embed.
    #[error("the server has no embedding provider (TMWS_EMBEDDING_PROVIDER=none); send the vector")]
    Disabled,
    /// The provider could not be reached or kept failing (after retries), or timed out.
    #[error("embedding provider unavailable: {0}")]
    Unavailable(String),
    /// The provider answered with something unusable (wrong dimension, wrong count, NaN, bad JSON).
    #[error("embedding provider returned an invalid response: {0}")]
    InvalidResponse(String),
}

impl Embedder {
    /// Builds the provider from configuration (no network call).
    pub fn from_config(cfg: &EmbeddingConfig) -> anyhow::Result<Self> {
        if cfg.dimension == 0 {
            anyhow::bail!("TMWS_EMBEDDING_DIMENSION must be greater than zero");
        }
        if cfg.model.trim().is_empty() {
            anyhow::bail!("TMWS_EMBEDDING_MODEL must not be empty");
        }
        let backend = match cfg.provider {
            EmbeddingProviderKind::Hash => Backend::Hash,
            EmbeddingProviderKind::None => Backend::None,
            EmbeddingProviderKind::OpenAi => Backend::Remote(Remote::new(Protocol::OpenAi, cfg)?),
            EmbeddingProviderKind::Ollama => Backend::Remote(Remote::new(Protocol::Ollama, cfg)?),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                model: cfg.model.clone(),
                dimension: cfg.dimension,
                batch_size: cfg.batch_size.max(1),
                backend,
            }),
        })
    }

    /// The model name recorded on every memory (cfg.model).
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// The vector dimension (cfg.dimension).
    pub fn dimension(&self) -> usize {
        self.inner.dimension
    }

    /// False for provider `none` (clients must send vectors).
    pub fn can_embed(&self) -> bool {
        !matches!(self.inner.backend, Backend::None)
    }

    /// The configured provider.
    pub fn provider(&self) -> EmbeddingProviderKind {
        match &self.inner.backend {
            Backend::Hash => EmbeddingProviderKind::Hash,
            Backend::None => EmbeddingProviderKind::None,
            Backend::Remote(r) => match r.protocol() {
                Protocol::OpenAi => EmbeddingProviderKind::OpenAi,
                Protocol::Ollama => EmbeddingProviderKind::Ollama,
            },
        }
    }

    fn provider_name(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Hash => "hash",
            Backend::None => "none",
            Backend::Remote(r) => r.protocol().name(),
        }
    }

    /// Embeds `texts` in order. Splits into requests of at most cfg.batch_size texts; each request
    /// has cfg.timeout and is retried up to cfg.max_retries times with exponential backoff + jitter
    /// (100 ms base, capped ~2 s) on connect errors, timeouts, HTTP 429 and 5xx — never on other 4xx.
    /// Validates every returned vector: count matches, dimension == cfg.dimension, all finite,
    /// not all-zero. Returns one Vec<f32> per text.
    pub async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let provider = self.provider_name();
        let model = self.model();
        let span = tracing::debug_span!("embed", provider, model, texts = texts.len());
        self.embed_inner(texts).instrument(span).await
    }

    async fn embed_inner(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let dim = self.inner.dimension;
        match &self.inner.backend {
            Backend::None => Err(EmbedError::Disabled),
            Backend::Hash => {
                let bytes: usize = texts.iter().map(|t| t.len()).sum();
                if bytes <= HASH_INLINE_BYTES {
                    return Ok(texts.iter().map(|t| hash_embed(t, dim)).collect());
                }
                let owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
                tokio::task::spawn_blocking(move || owned.iter().map(|t| hash_embed(t, dim)).collect())
                    .await
                    .map_err(|e| EmbedError::Unavailable(format!("hash embedder task failed: {e}")))
            }
            Backend::Remote(remote) => {
                let mut out = Vec::with_capacity(texts.len());
                let batches = texts.len().div_ceil(self.inner.batch_size);
                for (i, batch) in texts.chunks(self.inner.batch_size).enumerate() {
                    let vectors = remote.embed_batch(batch).await.map_err(|e| match e {
                        EmbedError::Unavailable(m) if batches > 1 => {
                            EmbedError::Unavailable(format!("batch {}/{batches}: {m}", i + 1))
                        }
                        other => other,
                    })?;
                    validate(&vectors, batch.len(), dim, out.len()).map_err(EmbedError::InvalidResponse)?;
                    out.extend(vectors);
                }
                Ok(out)
            }
        }
    }
}

/// Checks one batch's vectors; `offset` is the position of the batch's first text in the input.
fn validate(vectors: &[Vec<f32>], expected: usize, dim: usize, offset: usize) -> Result<(), String> {
    if vectors.len() != expected {
        return Err(format!("expected {expected} embeddings, got {}", vectors.len()));
    }
    for (i, v) in vectors.iter().enumerate() {
        let n = offset + i;
        if v.len() != dim {
            return Err(format!(
                "embedding {n} has dimension {}, expected {dim} (check TMWS_EMBEDDING_DIMENSION against the model)",
                v.len()
            ));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(format!("embedding {n} contains a non-finite value"));
        }
        if v.iter().all(|x| *x == 0.0) {
            return Err(format!("embedding {n} is all zeros"));
        }
    }
    Ok(())
}

impl fmt::Debug for Embedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedder")
            .field("provider", &self.provider_name())
            .field("model", &self.inner.model)
            .field("dimension", &self.inner.dimension)
            .field("batch_size", &self.inner.batch_size)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(provider: EmbeddingProviderKind, url: Option<&str>) -> EmbeddingConfig {
        EmbeddingConfig {
            provider,
            url: url.map(str::to_string),
            model: "m".into(),
            api_key: Some("sk-very-secret".into()),
            dimension: 8,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            batch_size: 4,
        }
    }

    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn embedder_is_send_sync_clone() {
        assert_send_sync::<Embedder>();
        let e = Embedder::from_config(&config(EmbeddingProviderKind::Hash, None)).unwrap();
        // The embed future must be usable from tonic handlers.
        fn is_send<T: Send>(_: &T) {}
        is_send(&e.embed(&["x"]));
    }

    #[tokio::test]
    async fn hash_provider_embeds_locally() {
        let e = Embedder::from_config(&config(EmbeddingProviderKind::Hash, None)).unwrap();
        assert!(e.can_embed());
        assert_eq!((e.model(), e.dimension(), e.provider()), ("m", 8, EmbeddingProviderKind::Hash));
        let out = e.embed(&["alpha beta", "gamma"]).await.unwrap();
        assert_eq!(out, vec![hash_embed("alpha beta", 8), hash_embed("gamma", 8)]);
        assert!(e.embed(&[]).await.unwrap().is_empty());
        // Large inputs take the blocking pool and give the same answer.
        let big = "word ".repeat(HASH_INLINE_BYTES / 4);
        let out = e.embed(&[big.as_str(), "gamma"]).await.unwrap();
        assert_eq!(out, vec![hash_embed(&big, 8), hash_embed("gamma", 8)]);
    }

    #[tokio::test]
    async fn none_provider_is_disabled() {
        let e = Embedder::from_config(&config(EmbeddingProviderKind::None, None)).unwrap();
        assert!(!e.can_embed());
        assert!(matches!(e.embed(&["x"]).await, Err(EmbedError::Disabled)));
        assert!(matches!(e.embed(&[]).await, Err(EmbedError::Disabled)));
    }

    #[test]
    fn remote_providers_need_a_valid_url() {
        for kind in [EmbeddingProviderKind::OpenAi, EmbeddingProviderKind::Ollama] {
            assert!(Embedder::from_config(&config(kind, None)).is_err());
            assert!(Embedder::from_config(&config(kind, Some("not a url"))).is_err());
            assert!(Embedder::from_config(&config(kind, Some("ftp://h/x"))).is_err());
            let e = Embedder::from_config(&config(kind, Some("https://h.example:8443"))).unwrap();
            assert_eq!(e.provider(), kind);
            assert!(e.can_embed());
            assert!(!format!("{e:?}").contains("sk-very-secret"));
        }
        let mut c = config(EmbeddingProviderKind::Hash, None);
        c.dimension = 0;
        assert!(Embedder::from_config(&c).is_err());
    }

    #[test]
    fn validation_rejects_unusable_vectors() {
        let ok = vec![vec![1.0, 0.0], vec![0.0, -1.0]];
        assert!(validate(&ok, 2, 2, 0).is_ok());
        assert!(validate(&ok, 3, 2, 0).unwrap_err().contains("expected 3 embeddings, got 2"));
        assert!(validate(&ok, 2, 3, 0).unwrap_err().contains("dimension 2, expected 3"));
        assert!(validate(&[vec![f32::NAN, 1.0]], 1, 2, 5).unwrap_err().contains("embedding 5 contains a non-finite"));
        assert!(validate(&[vec![f32::INFINITY, 1.0]], 1, 2, 0).is_err());
        assert!(validate(&[vec![0.0, 0.0]], 1, 2, 0).unwrap_err().contains("all zeros"));
    }
}
