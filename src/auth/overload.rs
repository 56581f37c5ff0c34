//! Request guards as tower layers: a deadline for every call and a bound on concurrent calls.
//!
//! - [`DeadlineLayer`]: a call must produce its response within the client's `grpc-timeout`,
//!   capped by `TMWS_REQUEST_TIMEOUT_MAX` (the cap alone when the client sent none); otherwise it
//!   is cancelled and answered DEADLINE_EXCEEDED. Only the future that yields the response
//!   headers is timed: a unary call's handler runs inside it, while a server-streaming call
//!   (WatchRun, Health/Watch) returns its stream at once and is never cut by the deadline.
//! - [`LoadShedLayer`]: at most `TMWS_MAX_CONCURRENT_REQUESTS` calls run at once per replica; a
//!   call beyond that is refused at once with UNAVAILABLE (reason `OVERLOADED`) instead of
//!   waiting in an unbounded queue. Health checks and reflection are never shed.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Semaphore;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use crate::error::ERROR_DOMAIN;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Paths exempt from authentication, limits and shedding.
pub fn is_infrastructure_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// A gRPC error as an HTTP response (trailers-only), with an `ErrorInfo`.
pub(crate) fn status_response<B: Default>(code: Code, reason: &str, message: impl Into<String>) -> http::Response<B> {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    tonic::Status::with_error_details(code, message, details).into_http()
}

/// Parses a `grpc-timeout` header value: 1-8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, max: self.max }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

impl<S, B, RB> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if is_infrastructure_path(path) {
            let fut = self.inner.call(req);
            return Box::pin(fut);
        }
        let requested = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let deadline = requested.map_or(self.max, |d| d.min(self.max));
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Ok(status_response(
                    Code::DeadlineExceeded,
                    "DEADLINE_EXCEEDED",
                    format!("the call did not finish within its deadline of {deadline:?}"),
                )),
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoadShedLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl LoadShedLayer {
    /// One semaphore shared by every connection of the server.
    pub fn new(max_concurrent: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max_concurrent)), max: max_concurrent }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LoadShed { inner, permits: self.permits.clone(), max: self.max }
    }
}

#[derive(Debug, Clone)]
pub struct LoadShed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

impl<S, B, RB> Service<http::Request<B>> for LoadShed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_infrastructure_path(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let max = self.max;
            return Box::pin(async move {
                Ok(status_response(
                    Code::Unavailable,
                    "OVERLOADED",
                    format!("the server is at its limit of {max} concurrent calls; retry with backoff"),
                ))
            });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(permit);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
