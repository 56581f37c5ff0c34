//! Traces and metrics reach a real OTLP collector (a tonic server on loopback implementing the
//! OTLP TraceService and MetricsService), and the Prometheus endpoint counts calls.
//!
//! Its own test binary: telemetry is process-global.

#[path = "common/mod.rs"]
mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use tmws::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut names = self.metric_names.lock().expect("lock");
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tmws\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

fn counter(text: &str, needle: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traces_and_metrics_reach_the_collector_and_prometheus() {
    // The collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
    let collector_addr = listener.local_addr().expect("addr");
    let svc = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc.clone()))
            .add_service(MetricsServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    // SAFETY: set before any thread reads these variables (telemetry is initialised just below).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_addr}"));
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "500");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
        std::env::set_var("OTEL_SERVICE_NAME", "tmws-under-test");
    }
    let _telemetry = tmws::telemetry::init(tmws::config::LogFormat::Json).expect("telemetry");

    let env = common::test_env();
    let db = common::fresh_database(&env).await;
    let metrics_addr = free_port();
    let addr_s = metrics_addr.to_string();
    let app = common::spawn_app_with(common::test_config(&db, env.redis(), &[("TMWS_METRICS_ADDR", &addr_s)])).await;

    // A call that continues a known trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut req = Request::new(pb::CreateMemoryRequest {
        memory: Some(pb::Memory { content: "traced memory".into(), ..Default::default() }),
        ..Default::default()
    });
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent_span}-01").parse().expect("ascii"));
    app.memory().create_memory(req).await.expect("create");

    // A failing call, in another trace.
    let failing_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut bad = Request::new(pb::GetMemoryRequest { id: "not-a-uuid".into(), ..Default::default() });
    bad.metadata_mut().insert("traceparent", format!("00-{failing_trace}-b7ad6b7169203331-01").parse().expect("ascii"));
    let status = app.memory().get_memory(bad).await.expect_err("invalid id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Spans arrive (batched).
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (server, db_span, failed) = loop {
        let spans = collector.spans.lock().expect("lock").clone();
        let server = spans.iter().find(|s| hex(&s.trace_id) == trace_id && s.kind == SpanKind::Server as i32).cloned();
        let db_span = spans
            .iter()
            .find(|s| hex(&s.trace_id) == trace_id && s.name == "db" && s.kind == SpanKind::Client as i32)
            .cloned();
        let failed =
            spans.iter().find(|s| hex(&s.trace_id) == failing_trace && s.kind == SpanKind::Server as i32).cloned();
        if let (Some(a), Some(b), Some(c)) = (server.clone(), db_span.clone(), failed.clone()) {
            break (a, b, c);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans did not arrive: {:?}",
            spans
                .iter()
                .map(|s| (s.name.clone(), hex(&s.trace_id), s.kind, hex(&s.parent_span_id)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(server.name, "tmws.v1.MemoryService/CreateMemory");
    assert_eq!(hex(&server.parent_span_id), parent_span, "the server span is a child of the caller's span");
    assert_eq!(attr(&server, "rpc.system"), Some(&Value::StringValue("grpc".into())));
    assert_eq!(attr(&server, "rpc.service"), Some(&Value::StringValue("tmws.v1.MemoryService".into())));
    assert_eq!(attr(&server, "rpc.method"), Some(&Value::StringValue("CreateMemory".into())));
    assert_eq!(attr(&server, "rpc.grpc.status_code"), Some(&Value::IntValue(0)));
    assert!(attr(&server, "network.peer.address").is_some());
    assert!(server.attributes.iter().all(|kv| !kv.key.contains("content")), "no request bodies in spans");
    let system = if env.is_postgres() { "postgresql" } else { "sqlite" };
    assert_eq!(attr(&db_span, "db.system"), Some(&Value::StringValue(system.into())));
    assert_eq!(attr(&db_span, "db.operation"), Some(&Value::StringValue("insert_memories".into())));
    assert_eq!(attr(&failed, "rpc.grpc.status_code"), Some(&Value::IntValue(3)), "the failure's code is recorded");

    // Metrics reach the collector.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let names = collector.metric_names.lock().expect("lock").clone();
        if names.iter().any(|n| n == "rpc.server.duration") && names.iter().any(|n| n == "tmws.rpc.requests") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics did not arrive: {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Prometheus: the counter goes up with each call.
    let needle =
        "tmws_rpc_requests_total{rpc_service=\"tmws.v1.MemoryService\",rpc_method=\"CreateMemory\",grpc_code=\"OK\"}";
    let before = counter(&scrape(metrics_addr).await, needle);
    assert!(before >= 1);
    for i in 0..3 {
        app.memory()
            .create_memory(pb::CreateMemoryRequest {
                memory: Some(pb::Memory { content: format!("more {i}"), ..Default::default() }),
                ..Default::default()
            })
            .await
            .expect("create");
    }
    let text = scrape(metrics_addr).await;
    assert_eq!(counter(&text, needle), before + 3, "{text}");
    assert!(text.contains("grpc_code=\"INVALID_ARGUMENT\""));
    assert!(text.contains("# TYPE tmws_rpc_duration_seconds histogram"));
    assert!(text.contains("tmws_db_pool_max_connections"));
    app.stop().await.expect("stop");
}
