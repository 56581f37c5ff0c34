//! Service metrics: one in-process registry, exposed two ways — Prometheus text on
//! `TMWS_METRICS_ADDR` (see [`super::http`]) and OpenTelemetry instruments exported over OTLP.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tmws_rpc_requests_total` | counter | `rpc_service`, `rpc_method`, `grpc_code` |
//! | `tmws_rpc_duration_seconds` | histogram | `rpc_service`, `rpc_method`, `grpc_code` |
//! | `tmws_rpc_in_flight` | gauge | |
//! | `tmws_rate_limited_total` | counter | `rpc_method` |
//! | `tmws_redis_errors_total` | counter | |
//! | `tmws_db_pool_connections` | gauge | `state` = `idle` / `in_use` |
//! | `tmws_db_pool_max_connections` | gauge | |
//! | `tmws_memories` | gauge (sampled) | `namespace` |
//! | `tmws_task_queue_depth` | gauge (sampled) | `namespace`, `queue` |
//! | `tmws_task_claim_wait_seconds` | histogram | `queue` (time from queued to claimed) |
//! | `tmws_runs_finished_total` | counter | `status` |

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram as OtelHistogram},
};

/// Latency buckets in seconds.
pub const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Per-bucket (non-cumulative) counts; the last slot is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS.iter().position(|b| v <= *b).unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// The OpenTelemetry side, created once a meter provider is installed.
struct Otel {
    rpc_requests: Counter<u64>,
    rpc_duration: OtelHistogram<f64>,
    rate_limited: Counter<u64>,
    redis_errors: Counter<u64>,
    memory_cache: Counter<u64>,
    claim_wait: OtelHistogram<f64>,
    runs_finished: Counter<u64>,
}

#[derive(Default)]
pub struct Metrics {
    rpc: Mutex<BTreeMap<(String, String, String), Histogram>>,
    in_flight: AtomicI64,
    rate_limited: Mutex<BTreeMap<String, u64>>,
    redis_errors: AtomicU64,
    /// Memory read-cache lookups (GetMemory and search results): [hits, misses].
    memory_cache: [AtomicU64; 2],
    pool: Mutex<(u64, u64, u64)>,
    memories: Mutex<BTreeMap<String, i64>>,
    queue_depth: Mutex<BTreeMap<(String, String), i64>>,
    claim_wait: Mutex<BTreeMap<String, Histogram>>,
    runs_finished: Mutex<BTreeMap<String, u64>>,
    otel: OnceLock<Otel>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::default)
}

/// The canonical name of a gRPC status code number.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn lock<T: Default>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned metrics lock only means a panic elsewhere; keep counting.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Creates the OpenTelemetry instruments on the global meter (call after installing a
    /// meter provider) and registers the observable gauges.
    pub fn install_otel(&'static self) {
        let meter = opentelemetry::global::meter("tmws");
        let otel = Otel {
            rpc_requests: meter.u64_counter("tmws.rpc.requests").with_description("gRPC calls handled").build(),
            rpc_duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_description("gRPC server call duration")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            rate_limited: meter
                .u64_counter("tmws.rate_limited")
                .with_description("calls refused by rate limits")
                .build(),
            redis_errors: meter.u64_counter("tmws.redis.errors").with_description("failed Redis calls").build(),
            memory_cache: meter
                .u64_counter("tmws.memory_cache.lookups")
                .with_description("Memory read-cache lookups (GetMemory and search results), by result (hit, miss)")
                .build(),
            claim_wait: meter
                .f64_histogram("tmws.task.claim_wait")
                .with_unit("s")
                .with_description("time from queued to claimed")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            runs_finished: meter.u64_counter("tmws.runs.finished").with_description("workflow runs ended").build(),
        };
        meter
            .i64_observable_gauge("tmws.rpc.in_flight")
            .with_description("gRPC calls in progress")
            .with_callback(|o| o.observe(metrics().in_flight.load(Ordering::Relaxed), &[]))
            .build();
        meter
            .u64_observable_gauge("tmws.db.pool.connections")
            .with_callback(|o| {
                let (size, idle, _) = *lock(&metrics().pool);
                o.observe(idle, &[KeyValue::new("state", "idle")]);
                o.observe(size.saturating_sub(idle), &[KeyValue::new("state", "in_use")]);
            })
            .build();
        meter
            .i64_observable_gauge("tmws.memories")
            .with_description("stored memories per namespace (sampled)")
            .with_callback(|o| {
                for (ns, n) in lock(&metrics().memories).iter() {
                    o.observe(*n, &[KeyValue::new("namespace", ns.clone())]);
                }
            })
            .build();
        meter
            .i64_observable_gauge("tmws.task.queue_depth")
            .with_description("queued tasks per queue (sampled)")
            .with_callback(|o| {
                for ((ns, q), n) in lock(&metrics().queue_depth).iter() {
                    o.observe(*n, &[KeyValue::new("namespace", ns.clone()), KeyValue::new("queue", q.clone())]);
                }
            })
            .build();
        let _ = self.otel.set(otel);
    }

    pub fn rpc_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rpc_finished(&self, service: &str, method: &str, code: i32, seconds: f64) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let code = code_name(code);
        lock(&self.rpc)
            .entry((service.to_string(), method.to_string(), code.to_string()))
            .or_default()
            .observe(seconds);
        if code == "RESOURCE_EXHAUSTED" {
            *lock(&self.rate_limited).entry(method.to_string()).or_default() += 1;
            if let Some(o) = self.otel.get() {
                o.rate_limited.add(1, &[KeyValue::new("rpc.method", method.to_string())]);
            }
        }
        if let Some(o) = self.otel.get() {
            let attrs = [
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_string()),
                KeyValue::new("rpc.method", method.to_string()),
                KeyValue::new("rpc.grpc.status_code", code),
            ];
            o.rpc_requests.add(1, &attrs);
            o.rpc_duration.record(seconds, &attrs);
        }
    }

    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.otel.get() {
            o.redis_errors.add(1, &[]);
        }
    }

    /// A memory read-cache lookup (GetMemory, a search result) (only where the cache is on).
    pub fn memory_cache_lookup(&self, hit: bool) {
        self.memory_cache[usize::from(!hit)].fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.otel.get() {
            o.memory_cache.add(1, &[KeyValue::new("result", if hit { "hit" } else { "miss" })]);
        }
    }

    pub fn set_pool(&self, size: u64, idle: u64, max: u64) {
        *lock(&self.pool) = (size, idle, max);
    }

    pub fn set_memories(&self, per_namespace: BTreeMap<String, i64>) {
        *lock(&self.memories) = per_namespace;
    }

    pub fn set_queue_depth(&self, per_queue: BTreeMap<(String, String), i64>) {
        *lock(&self.queue_depth) = per_queue;
    }

    pub fn claim_waited(&self, queue: &str, seconds: f64) {
        lock(&self.claim_wait).entry(queue.to_string()).or_default().observe(seconds.max(0.0));
        if let Some(o) = self.otel.get() {
            o.claim_wait.record(seconds.max(0.0), &[KeyValue::new("queue", queue.to_string())]);
        }
    }

    pub fn run_finished(&self, status: &str) {
        *lock(&self.runs_finished).entry(status.to_string()).or_default() += 1;
        if let Some(o) = self.otel.get() {
            o.runs_finished.add(1, &[KeyValue::new("status", status.to_string())]);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let hist = |out: &mut String, name: &str, labels: &str, h: &Histogram| {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += h.counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
        };
        let rpc = lock(&self.rpc).clone();
        out.push_str("# HELP tmws_rpc_requests_total gRPC calls handled.\n# TYPE tmws_rpc_requests_total counter\n");
        for ((s, m, c), h) in &rpc {
            let _ = writeln!(
                out,
                "tmws_rpc_requests_total{{rpc_service=\"{}\",rpc_method=\"{}\",grpc_code=\"{c}\"}} {}",
                escape(s),
                escape(m),
                h.count
            );
        }
        out.push_str(
            "# HELP tmws_rpc_duration_seconds gRPC server call duration.\n# TYPE tmws_rpc_duration_seconds histogram\n",
        );
        for ((s, m, c), h) in &rpc {
            let labels = format!("rpc_service=\"{}\",rpc_method=\"{}\",grpc_code=\"{c}\"", escape(s), escape(m));
            hist(&mut out, "tmws_rpc_duration_seconds", &labels, h);
        }
        let _ = writeln!(
            out,
            "# HELP tmws_rpc_in_flight gRPC calls in progress.\n# TYPE tmws_rpc_in_flight gauge\ntmws_rpc_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP tmws_rate_limited_total Calls refused by rate limits.\n# TYPE tmws_rate_limited_total counter\n",
        );
        for (m, n) in lock(&self.rate_limited).iter() {
            let _ = writeln!(out, "tmws_rate_limited_total{{rpc_method=\"{}\"}} {n}", escape(m));
        }
        let _ = writeln!(
            out,
            "# HELP tmws_redis_errors_total Failed Redis calls.\n# TYPE tmws_redis_errors_total counter\ntmws_redis_errors_total {}",
            self.redis_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tmws_memory_cache_lookups_total Memory read-cache lookups (GetMemory and search results), by result.\n\
             # TYPE tmws_memory_cache_lookups_total counter\n\
             tmws_memory_cache_lookups_total{{result=\"hit\"}} {}\ntmws_memory_cache_lookups_total{{result=\"miss\"}} {}",
            self.memory_cache[0].load(Ordering::Relaxed),
            self.memory_cache[1].load(Ordering::Relaxed)
        );
        let (size, idle, max) = *lock(&self.pool);
        let _ = writeln!(
            out,
            "# HELP tmws_db_pool_connections PostgreSQL pool connections by state.\n# TYPE tmws_db_pool_connections gauge\n\
             tmws_db_pool_connections{{state=\"idle\"}} {idle}\ntmws_db_pool_connections{{state=\"in_use\"}} {}\n\
             # HELP tmws_db_pool_max_connections PostgreSQL pool size limit.\n# TYPE tmws_db_pool_max_connections gauge\n\
             tmws_db_pool_max_connections {max}",
            size.saturating_sub(idle)
        );
        out.push_str("# HELP tmws_memories Stored memories per namespace (sampled).\n# TYPE tmws_memories gauge\n");
        for (ns, n) in lock(&self.memories).iter() {
            let _ = writeln!(out, "tmws_memories{{namespace=\"{}\"}} {n}", escape(ns));
        }
        out.push_str(
            "# HELP tmws_task_queue_depth Queued tasks per queue (sampled).\n# TYPE tmws_task_queue_depth gauge\n",
        );
        for ((ns, q), n) in lock(&self.queue_depth).iter() {
            let _ = writeln!(out, "tmws_task_queue_depth{{namespace=\"{}\",queue=\"{}\"}} {n}", escape(ns), escape(q));
        }
        out.push_str(
            "# HELP tmws_task_claim_wait_seconds Time from queued to claimed.\n# TYPE tmws_task_claim_wait_seconds histogram\n",
        );
        for (q, h) in lock(&self.claim_wait).iter() {
            hist(&mut out, "tmws_task_claim_wait_seconds", &format!("queue=\"{}\"", escape(q)), h);
        }
        out.push_str("# HELP tmws_runs_finished_total Workflow runs ended, by status.\n# TYPE tmws_runs_finished_total counter\n");
        for (s, n) in lock(&self.runs_finished).iter() {
            let _ = writeln!(out, "tmws_runs_finished_total{{status=\"{}\"}} {n}", escape(s));
        }
        out
    }
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.rpc_started();
        m.rpc_finished("tmws.v1.MemoryService", "GetMemory", 0, 0.003);
        m.rpc_started();
        m.rpc_finished("tmws.v1.MemoryService", "GetMemory", 0, 0.2);
        m.rpc_started();
        m.rpc_finished("tmws.v1.MemoryService", "GetMemory", 8, 0.001);
        m.run_finished("SUCCEEDED");
        let text = m.render_prometheus();
        assert!(text.contains(
            "tmws_rpc_requests_total{rpc_service=\"tmws.v1.MemoryService\",rpc_method=\"GetMemory\",grpc_code=\"OK\"} 2"
        ));
        assert!(text.contains("grpc_code=\"OK\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("grpc_code=\"OK\",le=\"+Inf\"} 2"));
        assert!(text.contains("tmws_rate_limited_total{rpc_method=\"GetMemory\"} 1"));
        assert!(text.contains("tmws_rpc_in_flight 0"));
        assert!(text.contains("tmws_runs_finished_total{status=\"SUCCEEDED\"} 1"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
