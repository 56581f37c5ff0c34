//! HTTP transport shared by the `openai` and `ollama` providers: one request per batch, a timeout
//! per attempt, bounded retries with exponential backoff and jitter.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::{StatusCode, header};

use super::{EmbedError, ollama, openai};
use crate::config::{EmbeddingConfig, redact_url};

/// First retry delay; doubled on every further retry.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest delay between two attempts (also the most of a `Retry-After` that is honoured).
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How much of an error response's body goes into the error message.
const ERROR_BODY_CHARS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    OpenAi,
    Ollama,
}

impl Protocol {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Ollama => "ollama",
        }
    }
}

pub(super) struct Remote {
    protocol: Protocol,
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// The endpoint as shown in messages (any password in the URL replaced).
    endpoint_shown: String,
    model: String,
    /// Never logged, never part of a message (see [`Remote::scrub`]).
    api_key: Option<String>,
    timeout: Duration,
    max_retries: u32,
}

/// The outcome of one failed attempt.
enum Failure {
    /// Worth another attempt: connection errors, timeouts, HTTP 429 and 5xx.
    Retryable { message: String, retry_after: Option<Duration> },
    /// Final at once.
    Fatal(EmbedError),
}

impl Remote {
    pub(super) fn new(protocol: Protocol, cfg: &EmbeddingConfig) -> anyhow::Result<Self> {
        let base = cfg.url.as_deref().map(str::trim).filter(|u| !u.is_empty()).ok_or_else(|| {
            anyhow::anyhow!("TMWS_EMBEDDING_URL is required for the {} embedding provider", protocol.name())
        })?;
        let endpoint = match protocol {
            Protocol::OpenAi => openai::endpoint(base),
            Protocol::Ollama => ollama::endpoint(base),
        };
        let endpoint_shown = redact_url(&endpoint);
        let endpoint = reqwest::Url::parse(&endpoint)
            .map_err(|e| anyhow::anyhow!("TMWS_EMBEDDING_URL: invalid URL {endpoint_shown:?}: {e}"))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            anyhow::bail!("TMWS_EMBEDDING_URL: expected an http:// or https:// URL");
        }
        let api_key = cfg.api_key.clone().filter(|k| !k.is_empty());
        if let Some(key) = &api_key
            && header::HeaderValue::from_str(&format!("Bearer {key}")).is_err()
        {
            anyhow::bail!("TMWS_EMBEDDING_API_KEY contains characters not allowed in an HTTP header");
        }

        // TLS with the ring provider the rest of the binary already uses, and the operating
        // system's trust store (so private CAs of self-hosted model servers work).
        let tls = {
            use rustls_platform_verifier::BuilderVerifierExt;
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_platform_verifier())
                .map_err(|e| anyhow::anyhow!("embedding client TLS setup: {e}"))?
                .with_no_client_auth()
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("tmws/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.timeout)
            // A POST must not turn into a GET, nor the key travel to another host.
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| anyhow::anyhow!("embedding HTTP client: {e}"))?;

        Ok(Self {
            protocol,
            client,
            endpoint,
            endpoint_shown,
            model: cfg.model.clone(),
            api_key,
            timeout: cfg.timeout,
            max_retries: cfg.max_retries,
        })
    }

    pub(super) fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Embeds one batch (one request, retried as configured). The vectors are not validated yet.
    pub(super) async fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = match self.protocol {
            Protocol::OpenAi => openai::request_body(&self.model, texts),
            Protocol::Ollama => ollama::request_body(&self.model, texts),
        };
        let mut attempt: u32 = 0;
        loop {
            let started = Instant::now();
            let outcome = self.attempt(body.clone()).await;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            match outcome {
                Ok(vectors) => {
                    tracing::debug!(texts = texts.len(), attempt = attempt + 1, elapsed_ms, "embedding request done");
                    return Ok(vectors);
                }
                Err(Failure::Fatal(e)) => {
                    tracing::debug!(texts = texts.len(), attempt = attempt + 1, elapsed_ms, error = %e, "embedding request failed");
                    return Err(e);
                }
                Err(Failure::Retryable { message, retry_after }) => {
                    if attempt >= self.max_retries {
                        let attempts = attempt + 1;
                        let s = if attempts == 1 { "" } else { "s" };
                        return Err(EmbedError::Unavailable(format!("{message} ({attempts} attempt{s})")));
                    }
                    let delay = backoff(attempt).max(retry_after.unwrap_or_default().min(BACKOFF_CAP));
                    tracing::warn!(
                        provider = self.protocol.name(),
                        attempt = attempt + 1,
                        max_retries = self.max_retries,
                        delay_ms = delay.as_millis() as u64,
                        error = %message,
                        "embedding request failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, body: Vec<u8>) -> Result<Vec<Vec<f32>>, Failure> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .timeout(self.timeout)
            .body(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| self.transport_failure(&e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| self.transport_failure(&e))?;

        if status.is_success() {
            let parsed = match self.protocol {
                Protocol::OpenAi => openai::parse_response(&bytes),
                Protocol::Ollama => ollama::parse_response(&bytes),
            };
            return parsed.map_err(|e| Failure::Fatal(EmbedError::InvalidResponse(self.scrub(&e))));
        }
        let message = self.scrub(&format!(
            "POST {} answered HTTP {}{}",
            self.endpoint_shown,
            status_text(status),
            body_excerpt(&bytes)
        ));
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            Err(Failure::Retryable { message, retry_after })
        } else {
            // Other 4xx (bad key, unknown model, input too long) and unexpected 1xx/3xx: retrying
            // cannot help.
            Err(Failure::Fatal(EmbedError::Unavailable(message)))
        }
    }

    /// Connection errors, timeouts and broken transfers: all worth another attempt.
    fn transport_failure(&self, e: &reqwest::Error) -> Failure {
        let what = if e.is_timeout() {
            format!("timed out after {:?}", self.timeout)
        } else {
            let kind = if e.is_connect() { "could not connect" } else { "request failed" };
            // reqwest's own message names the URL; the innermost cause is the informative part.
            let mut cause: &dyn std::error::Error = e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("{kind}: {cause}")
        };
        Failure::Retryable { message: self.scrub(&format!("POST {}: {what}", self.endpoint_shown)), retry_after: None }
    }

    /// Removes the API key from `message`, should anything have echoed it.
    fn scrub(&self, message: &str) -> String {
        match &self.api_key {
            Some(key) => message.replace(key.as_str(), "<redacted>"),
            _ => message.to_string(),
        }
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// `": <first characters of the body>"`, on one line, or nothing for an empty body.
fn body_excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut excerpt: String =
        text.chars().take(ERROR_BODY_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().count() > ERROR_BODY_CHARS {
        excerpt.push('…');
    }
    format!(": {excerpt}")
}

/// A `Retry-After` given in seconds.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Delay before retry number `attempt + 1`: `min(100 ms * 2^attempt, 2 s)`, of which a random
/// half ("equal jitter", so that replicas failing together do not retry together).
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
    let half = ceiling / 2;
    half + half.mul_f64(jitter())
}

/// A number in `[0, 1)`, different on every call (not for cryptography).
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let bits = RandomState::new().hash_one(n);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
            let third = backoff(2);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
            let late = backoff(30);
            assert!(late >= BACKOFF_CAP / 2 && late <= BACKOFF_CAP, "{late:?}");
        }
        let distinct: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(3)).collect();
        assert!(distinct.len() > 1, "jitter should vary");
    }

    #[test]
    fn error_body_excerpts_are_short_and_single_line() {
        assert_eq!(body_excerpt(b""), "");
        assert_eq!(body_excerpt(b"  {\"error\":\n\"bad\"}  "), ": {\"error\": \"bad\"}");
        let long = body_excerpt("x".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), 2 + ERROR_BODY_CHARS + 1);
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), None);
    }
}
