//! The tower layer that gives every gRPC call a server span and metrics.
//!
//! - Continues the caller's trace: W3C `traceparent`/`tracestate` and `baggage` are extracted
//!   from the request metadata with the global propagator.
//! - One span per call, named `<service>/<method>`, with the OpenTelemetry RPC attributes
//!   (`rpc.system=grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`,
//!   `network.peer.address`) and `trace_id`, so JSON logs inside the call carry it. No request
//!   bodies, no metadata values (credentials) are recorded.
//! - Counts calls and their latency by method and status code, and calls in flight.
//!
//! Health checks and reflection are counted but not traced (probes would flood the collector).
//! The status code is read from the response headers (trailers-only responses carry it there,
//! which covers every failed unary call); a stream that fails after its first message is
//! recorded with the code of its headers.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{propagation::Extractor, trace::TraceContextExt as _};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::metrics::{code_name, metrics};

#[derive(Clone, Copy, Default)]
pub struct GrpcTelemetryLayer;

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry { inner }
    }
}

#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`).
pub fn split_path(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((s, m)) => (s.to_string(), m.to_string()),
        None => (String::new(), trimmed.to_string()),
    }
}

fn status_of<B>(res: &http::Response<B>) -> i32 {
    match res.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        Some(code) => code,
        None if res.status().is_success() => 0,
        // HTTP-level failures map to UNKNOWN/UNAVAILABLE-like codes per the gRPC spec.
        None => 14,
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let traced = !(service.starts_with("grpc.health.") || service.starts_with("grpc.reflection."));
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .or_else(|| {
                req.extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            })
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let span = if traced {
            let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = format!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = Empty,
                network.peer.address = %peer,
                trace_id = Empty,
            );
            let _ = span.set_parent(parent);
            let trace_id = span.context().span().span_context().trace_id();
            if trace_id != opentelemetry::trace::TraceId::INVALID {
                span.record("trace_id", trace_id.to_string());
            }
            span
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        metrics().rpc_started();
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(res) => status_of(res),
                Err(_) => 2,
            };
            let elapsed = started.elapsed();
            metrics().rpc_finished(&service, &method, code, elapsed.as_secs_f64());
            span.record("rpc.grpc.status_code", code);
            let _enter = span.enter();
            match code {
                0 => tracing::debug!(rpc.method = %method, elapsed_ms = elapsed.as_millis() as u64, "call finished"),
                // Server faults.
                2 | 4 | 12 | 13 | 14 | 15 => {
                    span.record("otel.status_code", "ERROR");
                    tracing::error!(rpc.method = %method, grpc.code = code_name(code), elapsed_ms = elapsed.as_millis() as u64, "call failed");
                }
                _ => {
                    tracing::warn!(rpc.method = %method, grpc.code = code_name(code), elapsed_ms = elapsed.as_millis() as u64, "call refused")
                }
            }
            drop(_enter);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split() {
        assert_eq!(
            split_path("/tmws.v1.MemoryService/GetMemory"),
            ("tmws.v1.MemoryService".into(), "GetMemory".into())
        );
        assert_eq!(split_path("weird"), (String::new(), "weird".into()));
    }
}
