//! Logging, tracing and metrics.
//!
//! - Logs: `tracing` as JSON lines (`TMWS_LOG_FORMAT=json`, carrying the span list with
//!   `trace_id`) or compact text, filtered by `RUST_LOG`.
//! - Traces: OpenTelemetry spans for every gRPC call (see [`layer`]), database statements,
//!   embedding-provider calls and workflow engine steps; exported over OTLP/gRPC when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, configured by the standard
//!   `OTEL_*` variables (`OTEL_SERVICE_NAME` defaults to `tmws`; `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER`/`_ARG`). Export is batched on a background thread with a bounded
//!   queue, so an unreachable collector never slows or fails calls. W3C trace context and
//!   baggage are propagated.
//! - Metrics: see [`metrics`]; Prometheus text on `TMWS_METRICS_ADDR` ([`http`]) and OTLP when
//!   an endpoint is set (`OTEL_METRIC_EXPORT_INTERVAL`, default 60 s; `OTEL_METRICS_EXPORTER=none`
//!   turns OTLP metrics off).

pub mod http;
pub mod layer;
pub mod metrics;

use std::collections::HashMap;

use opentelemetry::{
    propagation::TextMapCompositePropagator,
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    Layer,
    filter::{LevelFilter, Targets},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;

/// Flushes and stops the exporters when dropped.
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.tracer.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("tmws: trace exporter shutdown: {e}");
        }
        if let Some(p) = self.meter.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("tmws: metrics exporter shutdown: {e}");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn resource() -> Resource {
    let mut builder = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name("tmws");
    }
    builder.build()
}

/// Installs the global subscriber, propagator and (when configured) OTLP exporters. Call once,
/// from `main` (or once per test process).
pub fn init(format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));

    // Spans always get OpenTelemetry ids (so logs carry trace ids and incoming trace context is
    // continued); they leave the process only when an OTLP endpoint is configured.
    let export_traces = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && std::env::var("OTEL_TRACES_EXPORTER").map(|v| v != "none").unwrap_or(true);
    let mut tracer = SdkTracerProvider::builder().with_resource(resource());
    if export_traces {
        tracer = tracer.with_batch_exporter(opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?);
    }
    let tracer = tracer.build();
    opentelemetry::global::set_tracer_provider(tracer.clone());

    let export_metrics = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        && std::env::var("OTEL_METRICS_EXPORTER").map(|v| v != "none").unwrap_or(true);
    let meter = if export_metrics {
        let exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic().build()?;
        let provider = SdkMeterProvider::builder().with_resource(resource()).with_periodic_exporter(exporter).build();
        opentelemetry::global::set_meter_provider(provider.clone());
        metrics::metrics().install_otel();
        Some(provider)
    } else {
        None
    };

    // `RUST_LOG` in the `target=level` form (span-field directives are not supported): per-layer
    // filters must be static target filters so that each layer sees the whole span tree.
    const DEFAULT_LOG: &str = "info,sqlx=warn,h2=warn,tower=warn";
    let log_filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse().map_err(|e| eprintln!("tmws: ignoring RUST_LOG ({e}); using {DEFAULT_LOG}")).ok())
        .unwrap_or_else(|| DEFAULT_LOG.parse().unwrap_or_default());
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(log_filter.clone())
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().with_filter(log_filter.clone()).boxed(),
    };
    // What reaches any layer: the log filter, plus, when traces are exported, the service's own
    // debug-level spans (database, embedding, engine) so the collector gets them whatever
    // RUST_LOG says (without an exporter nobody would see them, and each costs CPU on every
    // call). The exporter's own machinery (the OpenTelemetry SDK and its gRPC client) is never
    // traced: exporting spans about exporting spans would loop. The log output keeps to RUST_LOG.
    let mut global_filter = log_filter.clone();
    if export_traces {
        global_filter = global_filter.with_target("tmws", tracing::Level::DEBUG);
    }
    let global_filter = global_filter
        .with_target("opentelemetry", LevelFilter::WARN)
        .with_target("opentelemetry_sdk", LevelFilter::WARN)
        .with_target("opentelemetry_otlp", LevelFilter::WARN);
    // Parents are taken from the tracing span tree (not OpenTelemetry's thread-local context), so
    // a span's context can be read (for log trace ids) without detaching its children.
    let otel_layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("tmws")).with_context_activation(false);

    tracing_subscriber::registry().with(global_filter).with(otel_layer).with(fmt_layer).try_init()?;
    Ok(TelemetryGuard { tracer: Some(tracer), meter })
}

/// The W3C `traceparent` of the current span, to store with work that outlives the call.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Links `span` to the trace a stored `traceparent` names (background work caused by a call).
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}
