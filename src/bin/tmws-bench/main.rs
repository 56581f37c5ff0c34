//! tmws-bench: a gRPC load generator for TMWS that measures, in the same run, the physical
//! limit next to the service: the identical SQL straight to PostgreSQL for search, a multi-row
//! INSERT for ingest, a bare `SKIP LOCKED` loop for tasks, and a bare tonic server for the
//! per-call floor. See docs/BENCHMARKS.md.
//!
//! Against a server on the embedded store (`--database-url none`, or any `sqlite:` URL) the tool
//! opens no database: the direct-SQL baselines are skipped, the data set is always loaded fresh
//! through the API, and only the bare tonic baseline runs next to the service.

mod bare;
mod data;
mod load;
mod sql;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use pgvector::Vector;
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row as _};
use tmws::pb::{self, memory_service_client::MemoryServiceClient, workflow_service_client::WorkflowServiceClient};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

use crate::{
    data::{Dataset, Generator, Rng},
    load::{Outcome, Sample, Spec},
};

const K: usize = 10;
const ALL_SCENARIOS: &[&str] = &["dataset", "search", "rpc", "ingest", "tasks"];

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "tmws-bench",
    about = "Load generator for TMWS with same-run baselines (direct SQL, bare tonic server)",
    after_help = "Scenarios run in the order dataset, search, rpc, ingest, tasks (search needs dataset). \
                  The server must use the same TMWS_HNSW_EF_SEARCH as --ef-search (both read that variable)."
)]
struct Args {
    /// gRPC address of the tmws server.
    #[arg(long, env = "TMWS_BENCH_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The server's database, for the direct-SQL baselines and set-up (same host, same data).
    /// `none` (or any `sqlite:` URL) when the server uses the embedded store: the tool then opens
    /// no database and runs no direct-SQL baseline.
    #[arg(long, env = "TMWS_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/tmws")]
    database_url: String,
    /// Credential (an API key or a JWT) sent as `authorization: Bearer <key>` when the server
    /// requires authentication.
    #[arg(long, env = "TMWS_BENCH_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    api_key: Option<String>,
    /// Comma-separated: dataset, search, rpc, ingest, tasks (default: all).
    #[arg(long, value_delimiter = ',', default_values_t = ALL_SCENARIOS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    scenarios: Vec<String>,
    /// Comma-separated search kinds to run: semantic, filtered, hybrid (default: all).
    #[arg(long, value_delimiter = ',', default_values_t = ["semantic", "filtered", "hybrid"].map(String::from).to_vec())]
    search_kinds: Vec<String>,
    /// Memories in the data set.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Vector dimension (must be the server's TMWS_EMBEDDING_DIMENSION).
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Gaussian clusters of the data set.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Per-coordinate standard deviation around a cluster centre (before normalising).
    #[arg(long, default_value_t = 0.03)]
    spread: f32,
    /// Held-out queries (with exact ground truth).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Seed of the synthetic data (vectors, tags, texts, queries).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Comma-separated concurrency levels for search and rpc.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 8])]
    concurrency: Vec<usize>,
    /// Measured time per run (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    duration: Duration,
    /// Stop a run after this many recorded calls (before --duration if reached first).
    #[arg(long)]
    requests: Option<u64>,
    /// Unrecorded warm-up before each run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    warmup: Duration,
    /// hnsw.ef_search of the baseline connections; must equal the server's.
    #[arg(long, env = "TMWS_HNSW_EF_SEARCH", default_value_t = 40)]
    ef_search: u32,
    /// Memories per BatchCreateMemories call (at most the server's TMWS_MAX_BATCH_SIZE).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Concurrent BatchCreateMemories calls while loading the data set.
    #[arg(long, default_value_t = 2)]
    load_concurrency: usize,
    /// Concurrency of the batch-ingest runs (service and multi-row INSERT alike).
    #[arg(long, default_value_t = 2)]
    ingest_concurrency: usize,
    /// Tasks drained by each task loop.
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// Workers of the task loops.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Runs of each linear DAG (TASK steps, then NOOP steps).
    #[arg(long, default_value_t = 20)]
    dag_runs: usize,
    /// Steps of the linear DAGs (the target is for 10; at most the server's
    /// TMWS_MAX_WORKFLOW_STEPS).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    dag_steps: u32,
    /// PID of the tmws server, to report its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Experiment: `ALTER TABLE memories ALTER COLUMN embedding SET STORAGE <this>` (plain, main,
    /// external, extended) before loading the data set; it applies to rows written afterwards.
    #[arg(long)]
    embedding_storage: Option<String>,
    /// Reuse a data set already loaded with the same options (else it is reloaded).
    #[arg(long)]
    reuse: bool,
    /// CI mode: 2,000 memories in 50 clusters, 20 queries, concurrency 4, 0.5 s runs, 200 tasks, 3 DAG runs: proves the tool works, measures nothing.
    #[arg(long)]
    quick: bool,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// One line of the report.
#[derive(Serialize, Clone, Debug)]
struct ResultRow {
    group: String,
    target: String,
    concurrency: usize,
    calls: u64,
    errors: u64,
    secs: f64,
    qps: f64,
    items_per_sec: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    max_ms: f64,
    recall_at_10: Option<f64>,
    baseline: Option<String>,
    ratio_qps: Option<f64>,
    ratio_p50: Option<f64>,
    ratio_p99: Option<f64>,
    first_error: Option<String>,
}

struct Ctx {
    args: Args,
    channels: Vec<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    /// Set-up and clean-up statements; `None` when the server uses the embedded store.
    admin: Option<PgPool>,
    rows: Mutex<Vec<ResultRow>>,
    extra: Mutex<serde_json::Map<String, serde_json::Value>>,
    rss_peak: Arc<AtomicU64>,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Request<T> {
        with_auth(&self.auth, msg)
    }
    fn memory(&self, i: usize) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::new(self.channels[i % self.channels.len()].clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    fn workflow(&self, i: usize) -> WorkflowServiceClient<Channel> {
        WorkflowServiceClient::new(self.channels[i % self.channels.len()].clone()).max_decoding_message_size(64 << 20)
    }
    /// `target` as the baseline of a row, when the direct-SQL baselines run (not against the
    /// embedded store).
    fn sql_baseline<'a>(&self, target: &'a str) -> Option<&'a str> {
        self.admin.as_ref().map(|_| target)
    }
    fn spec(&self, concurrency: usize) -> Spec {
        Spec { concurrency, duration: self.args.duration, warmup: self.args.warmup, max_calls: self.args.requests }
    }
    fn record(&self, group: &str, target: &str, concurrency: usize, o: &Outcome, baseline: Option<&str>) {
        let row = ResultRow {
            group: group.into(),
            target: target.into(),
            concurrency,
            calls: o.calls,
            errors: o.errors,
            secs: o.secs,
            qps: o.qps(),
            items_per_sec: o.items_per_sec(),
            p50_ms: o.ms(0.50),
            p95_ms: o.ms(0.95),
            p99_ms: o.ms(0.99),
            mean_ms: o.mean_ms(),
            max_ms: o.max_ms(),
            recall_at_10: o.recall(),
            baseline: baseline.map(str::to_string),
            ratio_qps: None,
            ratio_p50: None,
            ratio_p99: None,
            first_error: o.first_error.clone(),
        };
        eprintln!(
            "  {:<22} {:<10} c={:<3} {:>9.1}/s  p50 {:>8.3} ms  p99 {:>8.3} ms{}{}",
            group,
            target,
            concurrency,
            if row.items_per_sec != row.qps { row.items_per_sec } else { row.qps },
            row.p50_ms,
            row.p99_ms,
            row.recall_at_10.map(|r| format!("  recall@10 {r:.4}")).unwrap_or_default(),
            if o.errors > 0 {
                format!("  ERRORS {} (first: {})", o.errors, o.first_error.clone().unwrap_or_default())
            } else {
                String::new()
            },
        );
        self.rows.lock().expect("rows").push(row);
    }
    fn note(&self, key: &str, value: serde_json::Value) {
        self.extra.lock().expect("extra").insert(key.into(), value);
    }
}

/// Whether `--database-url` names the embedded store (`none` or a `sqlite:` URL): no database
/// for the tool to open.
fn is_embedded(database_url: &str) -> bool {
    let url = database_url.trim();
    url.eq_ignore_ascii_case("none") || url.starts_with("sqlite:")
}

fn with_auth<T>(auth: &Option<MetadataValue<Ascii>>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(v) = auth {
        r.metadata_mut().insert("authorization", v.clone());
    }
    r
}

fn status_err(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn struct_of(pairs: &[(&str, prost_types::value::Kind)]) -> prost_types::Struct {
    let mut fields = BTreeMap::new();
    for (k, v) in pairs {
        fields.insert((*k).to_string(), prost_types::Value { kind: Some(v.clone()) });
    }
    prost_types::Struct { fields }
}

fn bench_meta(tag: &str, i: usize) -> prost_types::Struct {
    use prost_types::value::Kind;
    struct_of(&[("bench", Kind::StringValue(tag.into())), ("i", Kind::NumberValue(i as f64))])
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("tmws-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.n = 2_000;
        args.clusters = 50;
        args.queries = 20;
        args.concurrency = vec![4];
        args.duration = Duration::from_millis(500);
        args.warmup = Duration::from_millis(100);
        args.tasks = 200;
        args.workers = 4;
        args.dag_runs = 3;
    }
    for s in &args.scenarios {
        if !ALL_SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (known: {})", ALL_SCENARIOS.join(", "));
        }
    }
    let has = |s: &str| args.scenarios.iter().any(|x| x == s);
    if has("search") && !has("dataset") {
        bail!("search needs the dataset scenario");
    }
    let embedded = is_embedded(&args.database_url);
    if embedded && args.reuse {
        bail!(
            "--reuse needs the server's PostgreSQL (--database-url postgres://...): against the embedded store \
             (--database-url {}) the data set is always loaded fresh through the API",
            args.database_url
        );
    }
    if embedded && args.embedding_storage.is_some() {
        bail!("--embedding-storage alters a PostgreSQL table: it needs --database-url postgres://...");
    }
    let max_c =
        args.concurrency.iter().copied().chain([args.workers, args.ingest_concurrency]).max().unwrap_or(1).max(1);

    let auth = match &args.api_key {
        Some(k) => Some(format!("Bearer {k}").parse().context("--api-key is not a valid header value")?),
        None => None,
    };
    let endpoint = Endpoint::from_shared(args.addr.clone())?.tcp_nodelay(true).connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::new();
    for _ in 0..max_c {
        channels.push(endpoint.connect().await.with_context(|| format!("connect to {}", args.addr))?);
    }
    let admin = if embedded {
        None
    } else {
        Some(
            sql::pool(&args.database_url, 2, args.ef_search, "relaxed_order")
                .await
                .with_context(|| "connect to --database-url")?,
        )
    };
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        channels,
        auth,
        admin,
        rows: Mutex::new(Vec::new()),
        extra: Mutex::new(serde_json::Map::new()),
        rss_peak: Arc::new(AtomicU64::new(0)),
    });

    let principal = probe(&ctx).await?;
    eprintln!(
        "tmws-bench: principal {} in namespace {}, model {}",
        principal.agent, principal.namespace, principal.model
    );
    // Machine and server facts.
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let machine = match &ctx.admin {
        Some(admin) => {
            let pg_version: String = sqlx::query_scalar("SHOW server_version").fetch_one(admin).await?;
            let vector_version: Option<String> =
                sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                    .fetch_optional(admin)
                    .await?;
            eprintln!(
                "tmws-bench: {} CPUs, PostgreSQL {pg_version}, pgvector {}, server {}",
                cpus,
                vector_version.as_deref().unwrap_or("?"),
                args.addr
            );
            json!({ "cpus": cpus, "postgres": pg_version, "pgvector": vector_version, "os": std::env::consts::OS })
        }
        None => {
            eprintln!("tmws-bench: {cpus} CPUs, server {} on its embedded store (no direct-SQL baselines)", args.addr);
            json!({ "cpus": cpus, "backend": "embedded", "os": std::env::consts::OS })
        }
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("tmws-bench: load average at start: {}", loadavg.trim());
    ctx.note("loadavg_at_start", json!(loadavg.trim()));
    ctx.note("machine", machine);
    if let Some(pid) = args.server_pid {
        let idle = rss_kb(pid);
        ctx.note("rss_kb_at_start", json!(idle));
        let peak = ctx.rss_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(v) = rss_kb(pid) {
                    peak.fetch_max(v, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    let mut dataset = None;
    if has("dataset") {
        dataset = Some(Arc::new(dataset_scenario(&ctx, &principal).await?));
    }
    if has("search")
        && let Some(ds) = &dataset
    {
        ctx.rss_peak.store(0, Ordering::Relaxed);
        search_scenario(&ctx, &principal, ds).await?;
        if args.server_pid.is_some() {
            ctx.note("rss_kb_peak_search", json!(ctx.rss_peak.load(Ordering::Relaxed)));
        }
    }
    if has("rpc") {
        rpc_scenario(&ctx, dataset.as_deref()).await?;
    }
    if has("ingest") {
        ingest_scenario(&ctx, &principal).await?;
    }
    if has("tasks") {
        tasks_scenario(&ctx, &principal).await?;
    }
    if let Some(pid) = args.server_pid {
        ctx.note("rss_kb_at_end", json!(rss_kb(pid)));
        ctx.note("rss_kb_peak_overall", json!(ctx.rss_peak.load(Ordering::Relaxed)));
    }

    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    ctx.note("loadavg_at_end", json!(loadavg.trim()));
    let rows = finish_rows(ctx.rows.lock().expect("rows").clone());
    print_table(&rows, embedded);
    let extra = ctx.extra.lock().expect("extra").clone();
    print_summary(&rows, &extra, embedded);
    if args.quick {
        println!("(--quick: 2,000 memories and 0.5 s runs prove the tool works; these figures are not measurements)");
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "tool": "tmws-bench",
            "options": args,
            "time": chrono::Utc::now().to_rfc3339(),
            "results": rows,
            "extra": extra,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("write {}", path.display()))?;
        eprintln!("tmws-bench: wrote {}", path.display());
    }
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} calls failed (see first_error in the results)");
    }
    Ok(())
}

/// Creates (and deletes) one memory to learn the principal, namespace and model the service uses.
async fn probe(ctx: &Ctx) -> anyhow::Result<sql::Principal> {
    // Wait (up to 30 s) until the memory service reports SERVING.
    let mut health = HealthClient::new(ctx.channels[0].clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = health.check(HealthCheckRequest { service: "tmws.v1.MemoryService".into() }).await;
        match status {
            Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 => {
                break;
            }
            other if Instant::now() >= deadline => bail!("tmws.v1.MemoryService is not SERVING: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let mut v = vec![0f32; ctx.args.dim];
    v[0] = 1.0;
    let m = ctx
        .memory(0)
        .create_memory(ctx.req(pb::CreateMemoryRequest {
            memory: Some(pb::Memory { content: "tmws-bench probe".into(), embedding: v, ..Default::default() }),
            ..Default::default()
        }))
        .await
        .map_err(|s| anyhow::anyhow!("CreateMemory probe failed: {}", status_err(s)))?
        .into_inner();
    ctx.memory(0)
        .delete_memory(ctx.req(pb::DeleteMemoryRequest { id: m.id.clone(), ..Default::default() }))
        .await
        .map_err(|s| anyhow::anyhow!("DeleteMemory probe failed: {}", status_err(s)))?;
    Ok(sql::Principal { agent: m.owner, namespace: m.namespace, model: m.embedding_model })
}

/// Memories of the principal's namespace that it can see (GetMemoryStats).
async fn visible_memories(ctx: &Ctx) -> anyhow::Result<i64> {
    let stats = ctx
        .memory(0)
        .get_memory_stats(ctx.req(pb::GetMemoryStatsRequest::default()))
        .await
        .map_err(|s| anyhow::anyhow!("GetMemoryStats failed: {}", status_err(s)))?
        .into_inner();
    Ok(stats.total_count)
}

/// Without database access (the embedded store): deletes the principal's memories already in
/// its namespace through PruneMemories (everything it owns created before tomorrow), so rows of
/// an earlier run neither crowd the data set out of the top-k nor count against recall.
async fn clear_namespace(ctx: &Ctx, p: &sql::Principal) -> anyhow::Result<()> {
    let before = prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(86_400));
    let mut deleted = 0i64;
    loop {
        let r = ctx
            .memory(0)
            .prune_memories(ctx.req(pb::PruneMemoriesRequest {
                older_than: Some(before),
                max_importance: Some(1.0),
                ..Default::default()
            }))
            .await
            .map_err(|s| {
                anyhow::anyhow!("PruneMemories (clearing namespace {}) failed: {}", p.namespace, status_err(s))
            })?
            .into_inner();
        deleted += r.pruned_count;
        if !r.more || r.pruned_count == 0 {
            break;
        }
    }
    if deleted > 0 {
        eprintln!("tmws-bench: deleted {deleted} memories already in namespace {} (PruneMemories)", p.namespace);
    }
    match visible_memories(ctx).await {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "tmws-bench: {n} memories of other agents stay visible in namespace {}; search answers that hit them \
             count as misses in recall",
            p.namespace
        ),
        Err(e) => eprintln!("tmws-bench: could not count the namespace's memories: {e:#}"),
    }
    Ok(())
}

struct Loaded {
    ds: Dataset,
    /// Memory id -> data set index.
    index: HashMap<Uuid, u32>,
    ids: Vec<Uuid>,
}

async fn dataset_scenario(ctx: &Arc<Ctx>, p: &sql::Principal) -> anyhow::Result<Loaded> {
    let a = &ctx.args;
    let t = Instant::now();
    let mut ds = Dataset::generate(a.seed, a.n, a.dim, a.clusters, a.spread, a.queries);
    let gen_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    ds.compute_truth(K);
    let truth_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "tmws-bench: data set {} x {} ({} clusters, spread {}), {} queries; filter tag {} on {} rows ({:.2}%); \
         generated in {gen_secs:.1}s, exact top-{K} in {truth_secs:.1}s",
        a.n,
        a.dim,
        a.clusters,
        a.spread,
        a.queries,
        data::tag_name(ds.filter_tag as usize),
        ds.filter_rows,
        100.0 * ds.filter_rows as f64 / a.n as f64,
    );
    let tag = format!("ds-{}-{}-{}-{}-{}", a.seed, a.n, a.dim, a.clusters, a.spread);
    // The reuse check needs the database; against the embedded store the set is always loaded.
    let existing: Option<i64> = match &ctx.admin {
        Some(admin) => Some(
            sqlx::query_scalar("SELECT count(*) FROM memories WHERE namespace = $1 AND metadata->>'bench' = $2")
                .bind(&p.namespace)
                .bind(&tag)
                .fetch_one(admin)
                .await?,
        ),
        None => None,
    };
    let mut ids = vec![Uuid::nil(); a.n];
    let mut load_secs = None;
    if let Some(admin) = &ctx.admin
        && a.reuse
        && existing == Some(a.n as i64)
    {
        let stale =
            sqlx::query("DELETE FROM memories WHERE namespace = $1 AND (metadata->>'bench') IS DISTINCT FROM $2")
                .bind(&p.namespace)
                .bind(&tag)
                .execute(admin)
                .await?
                .rows_affected();
        if stale > 0 {
            eprintln!("tmws-bench: removed {stale} other memories of the namespace; vacuuming");
            sqlx::query("VACUUM (ANALYZE) memories").execute(admin).await?;
        }
        let rows = sqlx::query(
            "SELECT id, (metadata->>'i')::float8::int4 AS i FROM memories WHERE namespace = $1 AND metadata->>'bench' = $2",
        )
        .bind(&p.namespace)
        .bind(&tag)
        .fetch_all(admin)
        .await?;
        for r in rows {
            let i: i32 = r.try_get("i")?;
            ids[i as usize] = r.try_get("id")?;
        }
        eprintln!("tmws-bench: reusing the loaded data set ({tag})");
    } else {
        match &ctx.admin {
            Some(admin) => {
                let other: i64 = sqlx::query_scalar("SELECT count(*) FROM memories WHERE namespace = $1")
                    .bind(&p.namespace)
                    .fetch_one(admin)
                    .await?;
                if other > 0 {
                    eprintln!("tmws-bench: deleting {other} memories already in namespace {}", p.namespace);
                    sqlx::query("DELETE FROM memories WHERE namespace = $1").bind(&p.namespace).execute(admin).await?;
                    sqlx::query("VACUUM (ANALYZE) memories").execute(admin).await?;
                }
                if let Some(storage) = &a.embedding_storage {
                    let storage = storage.to_ascii_uppercase();
                    if !["PLAIN", "MAIN", "EXTERNAL", "EXTENDED"].contains(&storage.as_str()) {
                        bail!("--embedding-storage must be plain, main, external or extended");
                    }
                    sqlx::query(&format!("ALTER TABLE memories ALTER COLUMN embedding SET STORAGE {storage}"))
                        .execute(admin)
                        .await?;
                    eprintln!("tmws-bench: embedding column storage set to {storage}");
                }
            }
            None => clear_namespace(ctx, p).await?,
        }
        eprintln!(
            "tmws-bench: loading {} memories through BatchCreateMemories ({} per call, {} at once)",
            a.n, a.batch_size, a.load_concurrency
        );
        let ds_arc = Arc::new(std::mem::replace(&mut ds, Dataset::generate(0, 0, a.dim, 1, 0.0, 0)));
        let out_ids = Arc::new(Mutex::new(vec![Uuid::nil(); a.n]));
        let spec = Spec {
            concurrency: a.load_concurrency,
            duration: Duration::from_secs(86_400),
            warmup: Duration::ZERO,
            max_calls: None,
        };
        let (c2, d2, o2, tag2) = (ctx.clone(), ds_arc.clone(), out_ids.clone(), tag.clone());
        let batch = a.batch_size;
        let outcome = load::run(&spec, move |w, s| {
            let (ctx, ds, out, tag) = (c2.clone(), d2.clone(), o2.clone(), tag2.clone());
            async move {
                let start = s as usize * batch;
                if start >= ds.n {
                    return Ok(Sample::done());
                }
                let end = (start + batch).min(ds.n);
                let requests = (start..end)
                    .map(|i| pb::CreateMemoryRequest {
                        memory: Some(pb::Memory {
                            content: ds.texts[i].clone(),
                            tags: ds.tags[i].iter().map(|&t| data::tag_name(t as usize)).collect(),
                            metadata: Some(bench_meta(&tag, i)),
                            embedding: ds.vector(i).to_vec(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect();
                let resp = ctx
                    .memory(w)
                    .batch_create_memories(ctx.req(pb::BatchCreateMemoriesRequest { requests, ..Default::default() }))
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let mut out = out.lock().expect("ids");
                for (k, m) in resp.memories.iter().enumerate() {
                    out[start + k] = Uuid::parse_str(&m.id).map_err(|e| e.to_string())?;
                }
                Ok(Sample::items((end - start) as u64))
            }
        })
        .await;
        ctx.record("dataset.load", "tmws", a.load_concurrency, &outcome, None);
        if outcome.errors > 0 {
            bail!("loading the data set failed: {}", outcome.first_error.unwrap_or_default());
        }
        load_secs = Some(outcome.secs);
        ds = Arc::try_unwrap(ds_arc).map_err(|_| anyhow::anyhow!("data set still shared"))?;
        ids = out_ids.lock().expect("ids").clone();
        if let Some(admin) = &ctx.admin {
            let t = Instant::now();
            sqlx::query("ANALYZE memories").execute(admin).await?;
            eprintln!("tmws-bench: ANALYZE memories in {:.1}s", t.elapsed().as_secs_f64());
        }
    }
    if ids.iter().any(Uuid::is_nil) {
        bail!("some data set memories have no id");
    }
    let index: HashMap<Uuid, u32> = ids.iter().enumerate().map(|(i, id)| (*id, i as u32)).collect();
    // Index and table sizes: PostgreSQL only.
    let mut index_info: Option<(String, i64)> = None;
    let mut sizes: Option<(i64, i64, String)> = None;
    if let Some(admin) = &ctx.admin {
        index_info = sqlx::query_as(
            "SELECT pg_get_indexdef(c.oid), pg_relation_size(c.oid) FROM pg_class c WHERE c.relname = $1",
        )
        .bind(format!("memories_embedding_hnsw_{}", a.dim))
        .fetch_optional(admin)
        .await?;
        let s: (i64, i64, String) = sqlx::query_as(
            "SELECT pg_relation_size(c.oid), coalesce(pg_relation_size(NULLIF(c.reltoastrelid, 0)), 0), \
             (SELECT a.attstorage::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'embedding') \
             FROM pg_class c WHERE c.relname = 'memories'",
        )
        .fetch_one(admin)
        .await?;
        eprintln!(
            "tmws-bench: memories heap {:.0} MB, TOAST {:.0} MB, embedding storage '{}' (p plain, m main, e external, x extended)",
            s.0 as f64 / 1048576.0,
            s.1 as f64 / 1048576.0,
            s.2
        );
        sizes = Some(s);
    }
    ctx.note(
        "dataset",
        json!({
            "n": a.n, "dim": a.dim, "clusters": a.clusters, "spread": a.spread, "queries": a.queries,
            "filter_tag": data::tag_name(ds.filter_tag as usize), "filter_rows": ds.filter_rows,
            "filter_selectivity": ds.filter_rows as f64 / a.n as f64,
            "generate_secs": gen_secs, "ground_truth_secs": truth_secs, "load_secs": load_secs,
            "reused": load_secs.is_none(),
            "hnsw_index": index_info.as_ref().map(|i| i.0.clone()),
            "hnsw_index_bytes": index_info.as_ref().map(|i| i.1),
            "heap_bytes": sizes.as_ref().map(|s| s.0), "toast_bytes": sizes.as_ref().map(|s| s.1),
            "embedding_storage": sizes.as_ref().map(|s| s.2.clone()),
        }),
    );
    Ok(Loaded { ds, index, ids })
}

/// Replaces vector literals ('[0.1,...]') in a plan with '[...]'.
fn elide_vectors(plan: &str) -> String {
    let mut out = String::with_capacity(plan.len());
    let mut rest = plan;
    while let Some(i) = rest.find("'[") {
        out.push_str(&rest[..i]);
        match rest[i..].find("]'") {
            Some(j) => {
                out.push_str("'[...]'");
                rest = &rest[i + j + 2..];
            }
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

fn ids_to_indices(index: &HashMap<Uuid, u32>, ids: impl IntoIterator<Item = Uuid>) -> Vec<u32> {
    ids.into_iter().filter_map(|id| index.get(&id).copied()).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Semantic,
    Filtered,
    Hybrid,
}

async fn search_scenario(ctx: &Arc<Ctx>, p: &sql::Principal, l: &Arc<Loaded>) -> anyhow::Result<()> {
    let a = &ctx.args;
    let vectors: Arc<Vec<Vector>> = Arc::new(l.ds.queries.iter().map(|q| Vector::from(q.clone())).collect());
    let filter_tags = Arc::new(vec![data::tag_name(l.ds.filter_tag as usize)]);
    let p = Arc::new(p.clone());

    // The plans, for the report (PostgreSQL only).
    if let Some(admin) = &ctx.admin {
        let mut plans = serde_json::Map::new();
        let v0 = &vectors[0];
        for (name, tags, exact) in [
            ("semantic", None, false),
            ("filtered_exact", Some(&*filter_tags), true),
            ("filtered_hnsw", Some(&*filter_tags), false),
        ] {
            let plan = sql::explain(admin, sql::semantic(&p, tags, v0, a.dim, K, exact, "EXPLAIN ")).await?;
            plans.insert(name.into(), json!(elide_vectors(&plan)));
        }
        ctx.note("plans", serde_json::Value::Object(plans));
    }

    for &c in &a.concurrency {
        // The direct-SQL baselines' connections (none against the embedded store).
        let pool = match &ctx.admin {
            Some(_) => Some(sql::pool(&a.database_url, c as u32, a.ef_search, "relaxed_order").await?),
            None => None,
        };
        for kind in [Kind::Semantic, Kind::Filtered, Kind::Hybrid] {
            let name = match kind {
                Kind::Semantic => "semantic",
                Kind::Filtered => "filtered",
                Kind::Hybrid => "hybrid",
            };
            if !a.search_kinds.iter().any(|k| k == name) {
                continue;
            }
            let group = match kind {
                Kind::Semantic => "search.semantic",
                Kind::Filtered => "search.filtered",
                Kind::Hybrid => "search.hybrid",
            };
            // Direct SQL first.
            let sql_targets: &[(&str, bool)] = match kind {
                Kind::Semantic => &[("sql", false)],
                Kind::Filtered => &[("sql-exact", true), ("sql-hnsw", false)],
                Kind::Hybrid => &[("sql", false)],
            };
            for &(target, exact) in sql_targets {
                // Not against the embedded store.
                let Some(pool) = &pool else { break };
                let (pool, p, vectors, tags, l2) =
                    (pool.clone(), p.clone(), vectors.clone(), filter_tags.clone(), l.clone());
                let dim = a.dim;
                let o = load::run(&ctx.spec(c), move |_, s| {
                    let (pool, p, vectors, tags, l) =
                        (pool.clone(), p.clone(), vectors.clone(), tags.clone(), l2.clone());
                    async move {
                        let qi = s as usize % vectors.len();
                        let v = &vectors[qi];
                        match kind {
                            Kind::Semantic => {
                                let ids = sql::run_semantic(&pool, sql::semantic(&p, None, v, dim, K, false, ""))
                                    .await
                                    .map_err(|e| e.to_string())?;
                                Ok(Sample::with_recall(data::recall(&ids_to_indices(&l.index, ids), &l.ds.truth[qi])))
                            }
                            Kind::Filtered => {
                                let ids =
                                    sql::run_semantic(&pool, sql::semantic(&p, Some(&tags), v, dim, K, exact, ""))
                                        .await
                                        .map_err(|e| e.to_string())?;
                                Ok(Sample::with_recall(data::recall(
                                    &ids_to_indices(&l.index, ids),
                                    &l.ds.truth_filtered[qi],
                                )))
                            }
                            Kind::Hybrid => {
                                // The service's hybrid plan: semantic and keyword candidate lists
                                // of max(4k, 40), one after the other.
                                let cand = (K * 4).clamp(40, 400);
                                sql::run_semantic(&pool, sql::semantic(&p, None, v, dim, cand, false, ""))
                                    .await
                                    .map_err(|e| e.to_string())?;
                                sql::run_keyword(&pool, &p, &l.ds.query_texts[qi], cand)
                                    .await
                                    .map_err(|e| e.to_string())?;
                                Ok(Sample::one())
                            }
                        }
                    }
                })
                .await;
                ctx.record(group, target, c, &o, None);
            }
            // The service.
            let (c2, l2, tags) = (ctx.clone(), l.clone(), filter_tags.clone());
            let o = load::run(&ctx.spec(c), move |w, s| {
                let (ctx, l, tags) = (c2.clone(), l2.clone(), tags.clone());
                async move {
                    let qi = s as usize % l.ds.queries.len();
                    let mut r = pb::SearchMemoriesRequest {
                        query_embedding: l.ds.queries[qi].clone(),
                        top_k: K as i32,
                        mode: pb::SearchMode::Semantic as i32,
                        ..Default::default()
                    };
                    if kind == Kind::Filtered {
                        r.filter = Some(pb::MemoryFilter { tags_any: (*tags).clone(), ..Default::default() });
                    }
                    if kind == Kind::Hybrid {
                        r.mode = pb::SearchMode::Hybrid as i32;
                        r.query = l.ds.query_texts[qi].clone();
                    }
                    let resp = ctx.memory(w).search_memories(ctx.req(r)).await.map_err(status_err)?.into_inner();
                    let ids =
                        resp.results.iter().filter_map(|h| h.memory.as_ref().and_then(|m| Uuid::parse_str(&m.id).ok()));
                    let found = ids_to_indices(&l.index, ids);
                    Ok(match kind {
                        Kind::Semantic => Sample::with_recall(data::recall(&found, &l.ds.truth[qi])),
                        Kind::Filtered => {
                            if found.len() < K.min(l.ds.filter_rows) {
                                return Err(format!("filtered search returned {} < {K} results", found.len()));
                            }
                            Sample::with_recall(data::recall(&found, &l.ds.truth_filtered[qi]))
                        }
                        Kind::Hybrid => Sample::one(),
                    })
                }
            })
            .await;
            let baseline = match kind {
                Kind::Filtered => "sql-exact",
                _ => "sql",
            };
            ctx.record(group, "tmws", c, &o, ctx.sql_baseline(baseline));
        }
        if let Some(pool) = pool {
            pool.close().await;
        }
    }
    Ok(())
}

async fn rpc_scenario(ctx: &Arc<Ctx>, l: Option<&Loaded>) -> anyhow::Result<()> {
    // A hot id: the first data set memory, or a fresh one.
    let id = match l {
        Some(l) => l.ids[0].to_string(),
        None => {
            let mut v = vec![0f32; ctx.args.dim];
            v[1] = 1.0;
            ctx.memory(0)
                .create_memory(ctx.req(pb::CreateMemoryRequest {
                    memory: Some(pb::Memory {
                        content: "tmws-bench hot memory for the cheap-call run".into(),
                        tags: vec!["t001".into(), "t002".into()],
                        metadata: Some(bench_meta("rpc", 0)),
                        embedding: v,
                        ..Default::default()
                    }),
                    ..Default::default()
                }))
                .await
                .map_err(|s| anyhow::anyhow!("CreateMemory failed: {}", status_err(s)))?
                .into_inner()
                .id
        }
    };
    let get = pb::GetMemoryRequest { id: id.clone(), view: pb::MemoryView::Basic as i32, ..Default::default() };
    let canned = ctx
        .memory(0)
        .get_memory(ctx.req(get.clone()))
        .await
        .map_err(|s| anyhow::anyhow!("GetMemory failed: {}", status_err(s)))?
        .into_inner();
    let size = prost::Message::encoded_len(&canned);
    let bare_addr = bare::start(canned).await?;
    let bare_endpoint = Endpoint::from_shared(format!("http://{bare_addr}"))?.tcp_nodelay(true);
    let mut bare_channels = Vec::new();
    for _ in 0..ctx.channels.len() {
        bare_channels.push(bare_endpoint.connect().await?);
    }
    let bare_channels = Arc::new(bare_channels);
    ctx.note("rpc", json!({ "get_memory_response_bytes": size, "bare_server": bare_addr.to_string() }));
    for &c in &ctx.args.concurrency {
        for (group, health) in [("rpc.get_memory", false), ("rpc.health_check", true)] {
            for target in ["bare", "tmws"] {
                let (c2, bc, get) = (ctx.clone(), bare_channels.clone(), get.clone());
                let o = load::run(&ctx.spec(c), move |w, _| {
                    let (ctx, bc, get) = (c2.clone(), bc.clone(), get.clone());
                    async move {
                        let ch = if target == "bare" {
                            bc[w % bc.len()].clone()
                        } else {
                            ctx.channels[w % ctx.channels.len()].clone()
                        };
                        if health {
                            HealthClient::new(ch)
                                .check(HealthCheckRequest { service: String::new() })
                                .await
                                .map_err(status_err)?;
                        } else {
                            MemoryServiceClient::new(ch).get_memory(ctx.req(get)).await.map_err(status_err)?;
                        }
                        Ok(Sample::one())
                    }
                })
                .await;
                ctx.record(group, target, c, &o, (target == "tmws").then_some("bare"));
            }
        }
    }
    Ok(())
}

async fn ingest_scenario(ctx: &Arc<Ctx>, p: &sql::Principal) -> anyhow::Result<()> {
    let a = &ctx.args;
    let g = Arc::new(Generator::new(a.seed, a.dim, a.clusters, a.spread));
    let tag = format!("ingest-{}", Uuid::now_v7().simple());
    let seed = a.seed;
    let batch = a.batch_size;
    let c_single = *a.concurrency.iter().max().unwrap_or(&1);
    // Without database access the memories written are counted through the API: the namespace's
    // count before and after (nothing else writes there during the run).
    let count_before = match &ctx.admin {
        Some(_) => None,
        None => visible_memories(ctx)
            .await
            .inspect_err(|e| eprintln!("tmws-bench: could not count the namespace's memories: {e:#}"))
            .ok(),
    };

    // CreateMemory, one per call.
    let (c2, g2, t2) = (ctx.clone(), g.clone(), tag.clone());
    let o = load::run(&ctx.spec(c_single), move |w, s| {
        let (ctx, g, tag) = (c2.clone(), g2.clone(), t2.clone());
        async move {
            let mut rng = Rng::derive(seed, 10_000_000 + s);
            let it = g.item(&mut rng);
            let m = pb::Memory {
                content: it.text,
                tags: it.tags.iter().map(|&t| data::tag_name(t as usize)).collect(),
                metadata: Some(bench_meta(&tag, s as usize)),
                embedding: it.vector,
                ..Default::default()
            };
            ctx.memory(w)
                .create_memory(ctx.req(pb::CreateMemoryRequest { memory: Some(m), ..Default::default() }))
                .await
                .map_err(status_err)?;
            Ok(Sample::one())
        }
    })
    .await;
    ctx.record("ingest.create", "tmws", c_single, &o, None);

    // Direct multi-row INSERT (not against the embedded store), then BatchCreateMemories, same
    // batch size and concurrency.
    let c = a.ingest_concurrency;
    if ctx.admin.is_some() {
        let pool = sql::pool(&a.database_url, c as u32, a.ef_search, "relaxed_order").await?;
        let (g2, t2, pool2, p2) = (g.clone(), tag.clone(), pool.clone(), Arc::new(p.clone()));
        let o = load::run(&ctx.spec(c), move |_, s| {
            let (g, tag, pool, p) = (g2.clone(), t2.clone(), pool2.clone(), p2.clone());
            async move {
                let mut rng = Rng::derive(seed, 20_000_000 + s);
                let rows: Vec<sql::Row16> = (0..batch)
                    .map(|i| {
                        let it = g.item(&mut rng);
                        sql::Row16 {
                            id: Uuid::now_v7(),
                            content: it.text,
                            tags: it.tags.iter().map(|&t| data::tag_name(t as usize)).collect(),
                            metadata: json!({ "bench": tag, "i": (s as usize * batch + i) as f64 }),
                            embedding: it.vector,
                        }
                    })
                    .collect();
                let n = sql::insert_many(&pool, &p, rows).await.map_err(|e| e.to_string())?;
                Ok(Sample::items(n))
            }
        })
        .await;
        ctx.record("ingest.batch", "sql", c, &o, None);
        pool.close().await;
    }

    let (c2, g2, t2) = (ctx.clone(), g.clone(), tag.clone());
    let o = load::run(&ctx.spec(c), move |w, s| {
        let (ctx, g, tag) = (c2.clone(), g2.clone(), t2.clone());
        async move {
            let mut rng = Rng::derive(seed, 30_000_000 + s);
            let requests = (0..batch)
                .map(|i| {
                    let it = g.item(&mut rng);
                    pb::CreateMemoryRequest {
                        memory: Some(pb::Memory {
                            content: it.text,
                            tags: it.tags.iter().map(|&t| data::tag_name(t as usize)).collect(),
                            metadata: Some(bench_meta(&tag, s as usize * batch + i)),
                            embedding: it.vector,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }
                })
                .collect();
            let resp = ctx
                .memory(w)
                .batch_create_memories(ctx.req(pb::BatchCreateMemoriesRequest { requests, ..Default::default() }))
                .await
                .map_err(status_err)?
                .into_inner();
            Ok(Sample::items(resp.memories.len() as u64))
        }
    })
    .await;
    ctx.record("ingest.batch", "tmws", c, &o, ctx.sql_baseline("sql"));
    let written: Option<i64> = match &ctx.admin {
        Some(admin) => Some(
            sqlx::query_scalar("SELECT count(*) FROM memories WHERE metadata->>'bench' = $1")
                .bind(&tag)
                .fetch_one(admin)
                .await?,
        ),
        None => match (count_before, visible_memories(ctx).await) {
            (Some(before), Ok(after)) => Some(after - before),
            (_, Err(e)) => {
                eprintln!("tmws-bench: could not count the namespace's memories: {e:#}");
                None
            }
            (None, Ok(_)) => None,
        },
    };
    ctx.note("ingest", json!({ "tag": tag, "memories_written": written, "batch_size": batch }));
    eprintln!(
        "tmws-bench: ingest wrote {} memories (metadata.bench = {tag}); they stay until the next data set load",
        written.map_or_else(|| "?".to_string(), |n| n.to_string())
    );
    Ok(())
}

fn is_terminal(status: i32) -> bool {
    matches!(
        pb::RunStatus::try_from(status),
        Ok(pb::RunStatus::Succeeded | pb::RunStatus::Failed | pb::RunStatus::Cancelled | pb::RunStatus::TimedOut)
    )
}

async fn tasks_scenario(ctx: &Arc<Ctx>, p: &sql::Principal) -> anyhow::Result<()> {
    let a = &ctx.args;
    let run_tag = Uuid::now_v7().simple().to_string();
    let w = a.workers;

    let spec = Spec { concurrency: w, duration: Duration::from_secs(3600), warmup: Duration::ZERO, max_calls: None };

    // Bare SQL loop (not against the embedded store).
    if let Some(admin) = &ctx.admin {
        let sql_queue = format!("bench-sql-{run_tag}");
        sql::insert_tasks(admin, &p.namespace, &sql_queue, a.tasks, &p.agent).await?;
        let pool = sql::pool(&a.database_url, w as u32, a.ef_search, "relaxed_order").await?;
        let (pool2, ns, q2) = (pool.clone(), p.namespace.clone(), sql_queue.clone());
        let o = load::run(&spec, move |wi, _| {
            let (pool, ns, q) = (pool2.clone(), ns.clone(), q2.clone());
            async move {
                let worker = format!("bench-w{wi}");
                match sql::claim_one(&pool, &ns, &q, &worker).await.map_err(|e| e.to_string())? {
                    None => Ok(Sample::done()),
                    Some((id, token)) => {
                        if !sql::complete_one(&pool, id, token).await.map_err(|e| e.to_string())? {
                            return Err("bare complete lost its lease".into());
                        }
                        Ok(Sample::one())
                    }
                }
            }
        })
        .await;
        ctx.record("tasks.claim_complete", "sql", w, &o, None);
        pool.close().await;
    }

    // The service: tasks created through CreateTask (set-up, reported separately).
    let queue = format!("bench-api-{run_tag}");
    let created = Arc::new(AtomicU64::new(0));
    let total = a.tasks as u64;
    let (c2, q2, cr) = (ctx.clone(), queue.clone(), created.clone());
    let spec_create =
        Spec { concurrency: w, duration: Duration::from_secs(3600), warmup: Duration::ZERO, max_calls: None };
    let o = load::run(&spec_create, move |wi, _| {
        let (ctx, q, cr) = (c2.clone(), q2.clone(), cr.clone());
        async move {
            if cr.fetch_add(1, Ordering::Relaxed) >= total {
                return Ok(Sample::done());
            }
            let t = pb::Task { title: "bench".into(), queue: q, ..Default::default() };
            ctx.workflow(wi)
                .create_task(ctx.req(pb::CreateTaskRequest { task: Some(t), ..Default::default() }))
                .await
                .map_err(status_err)?;
            Ok(Sample::one())
        }
    })
    .await;
    ctx.record("tasks.create", "tmws", w, &o, None);
    if o.errors > 0 {
        bail!("CreateTask failed: {}", o.first_error.unwrap_or_default());
    }
    let (c2, q2) = (ctx.clone(), queue.clone());
    let o = load::run(&spec, move |wi, _| {
        let (ctx, q) = (c2.clone(), q2.clone());
        async move {
            let mut wf = ctx.workflow(wi);
            let resp = wf
                .claim_tasks(ctx.req(pb::ClaimTasksRequest {
                    queue: q,
                    worker_id: format!("bench-w{wi}"),
                    max_tasks: 1,
                    ..Default::default()
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            let Some(leased) = resp.tasks.into_iter().next() else { return Ok(Sample::done()) };
            let id = leased.task.map(|t| t.id).unwrap_or_default();
            wf.complete_task(ctx.req(pb::CompleteTaskRequest {
                id,
                lease_token: leased.lease_token,
                ..Default::default()
            }))
            .await
            .map_err(status_err)?;
            Ok(Sample::one())
        }
    })
    .await;
    ctx.record("tasks.claim_complete", "tmws", w, &o, ctx.sql_baseline("sql"));

    // Linear DAGs (10 steps unless --dag-steps): TASK steps done by one immediate worker, and
    // NOOP steps done by the engine. The work is zero, so the whole run time is overhead.
    let mut dag = serde_json::Map::new();
    let dag_key = format!("dag_{}_linear", a.dag_steps);
    for kind in [pb::StepKind::Task, pb::StepKind::Noop] {
        let dag_queue = format!("bench-dag-{run_tag}");
        let steps: Vec<pb::Step> = (0..a.dag_steps)
            .map(|i| pb::Step {
                id: format!("s{i}"),
                kind: kind as i32,
                depends_on: if i == 0 { vec![] } else { vec![format!("s{}", i - 1)] },
                queue: if kind == pb::StepKind::Task { dag_queue.clone() } else { String::new() },
                ..Default::default()
            })
            .collect();
        let name =
            format!("bench-dag-{}-{}-{run_tag}", a.dag_steps, if kind == pb::StepKind::Task { "task" } else { "noop" });
        let wf = ctx
            .workflow(0)
            .create_workflow(ctx.req(pb::CreateWorkflowRequest {
                workflow: Some(pb::Workflow { name, steps, ..Default::default() }),
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow::anyhow!("CreateWorkflow failed: {}", status_err(s)))?
            .into_inner();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = if kind == pb::StepKind::Task {
            let (ctx, stop, q) = (ctx.clone(), stop.clone(), dag_queue.clone());
            Some(tokio::spawn(async move {
                let mut client = ctx.workflow(1);
                while !stop.load(Ordering::Relaxed) {
                    let resp = client
                        .claim_tasks(ctx.req(pb::ClaimTasksRequest {
                            queue: q.clone(),
                            worker_id: "bench-dag-worker".into(),
                            max_tasks: 1,
                            wait: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
                            ..Default::default()
                        }))
                        .await;
                    let Ok(resp) = resp else { continue };
                    for leased in resp.into_inner().tasks {
                        let id = leased.task.map(|t| t.id).unwrap_or_default();
                        let _ = client
                            .complete_task(ctx.req(pb::CompleteTaskRequest {
                                id,
                                lease_token: leased.lease_token,
                                ..Default::default()
                            }))
                            .await;
                    }
                }
            }))
        } else {
            None
        };
        let mut hist = load::histogram();
        let mut failures = 0;
        for _ in 0..a.dag_runs {
            let t0 = Instant::now();
            let run = ctx
                .workflow(2)
                .start_run(ctx.req(pb::StartRunRequest { workflow_id: wf.id.clone(), ..Default::default() }))
                .await
                .map_err(|s| anyhow::anyhow!("StartRun failed: {}", status_err(s)))?
                .into_inner();
            let mut stream = ctx
                .workflow(3)
                .watch_run(ctx.req(pb::WatchRunRequest { id: run.id.clone(), ..Default::default() }))
                .await
                .map_err(|s| anyhow::anyhow!("WatchRun failed: {}", status_err(s)))?
                .into_inner();
            let mut ok = false;
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    ev = stream.message() => match ev {
                        Ok(Some(ev)) => {
                            let status = match ev.event {
                                Some(pb::run_event::Event::RunStatus(s)) => Some(s),
                                Some(pb::run_event::Event::Snapshot(r)) => Some(r.status),
                                _ => None,
                            };
                            if let Some(s) = status && is_terminal(s) {
                                ok = s == pb::RunStatus::Succeeded as i32;
                                break;
                            }
                        }
                        _ => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            if ok {
                let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
            } else {
                failures += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = worker {
            let _ = h.await;
        }
        let label = if kind == pb::StepKind::Task { "task_steps" } else { "noop_steps" };
        let ms = |q: f64| if hist.is_empty() { 0.0 } else { hist.value_at_quantile(q) as f64 / 1000.0 };
        eprintln!(
            "  dag.{}_linear/{label:<10} runs={} failed={failures}  p50 {:.1} ms  p95 {:.1} ms  max {:.1} ms",
            a.dag_steps,
            hist.len(),
            ms(0.5),
            ms(0.95),
            hist.max() as f64 / 1000.0
        );
        dag.insert(
            label.into(),
            json!({ "runs": hist.len(), "failed": failures, "p50_ms": ms(0.5), "p95_ms": ms(0.95),
                    "max_ms": hist.max() as f64 / 1000.0, "mean_ms": if hist.is_empty() { 0.0 } else { hist.mean() / 1000.0 } }),
        );
    }
    ctx.note(&dag_key, serde_json::Value::Object(dag));
    Ok(())
}

/// Fills in each row's ratios to its baseline (same group and concurrency).
fn finish_rows(mut rows: Vec<ResultRow>) -> Vec<ResultRow> {
    let snapshot = rows.clone();
    for r in rows.iter_mut() {
        let Some(b) = &r.baseline else { continue };
        let Some(base) =
            snapshot.iter().find(|x| x.group == r.group && &x.target == b && x.concurrency == r.concurrency)
        else {
            continue;
        };
        let rate = |x: &ResultRow| {
            if x.group.starts_with("ingest") || x.group.starts_with("dataset") { x.items_per_sec } else { x.qps }
        };
        if rate(base) > 0.0 {
            r.ratio_qps = Some(rate(r) / rate(base));
        }
        if base.p50_ms > 0.0 {
            r.ratio_p50 = Some(r.p50_ms / base.p50_ms);
        }
        if base.p99_ms > 0.0 {
            r.ratio_p99 = Some(r.p99_ms / base.p99_ms);
        }
    }
    rows
}

/// The table of results; `embedded`: the direct-SQL baselines were not run, and a row without
/// ratios shows "-" there.
fn print_table(rows: &[ResultRow], embedded: bool) {
    println!();
    println!(
        "{:<22} {:<10} {:>4} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>22}",
        "scenario",
        "target",
        "conc",
        "calls",
        "rate/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "recall",
        "vs baseline qps/p50/p99"
    );
    println!("{}", "-".repeat(122));
    for r in rows {
        let rate =
            if r.group.starts_with("ingest") || r.group.starts_with("dataset") { r.items_per_sec } else { r.qps };
        let ratio = match (r.ratio_qps, r.ratio_p50, r.ratio_p99) {
            (Some(q), Some(a), Some(b)) => format!("{q:.2}x / {a:.2}x / {b:.2}x"),
            _ if embedded => "-".into(),
            _ => String::new(),
        };
        println!(
            "{:<22} {:<10} {:>4} {:>8} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>22}",
            r.group,
            r.target,
            r.concurrency,
            r.calls,
            rate,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.recall_at_10.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            ratio
        );
    }
    println!("(rate is memories/s for dataset.* and ingest.*, calls/s otherwise; ratios are tmws / baseline)");
    if embedded {
        println!("(\"-\": no baseline; the direct-SQL baselines need the server's PostgreSQL)");
    }
}

/// The targets, checked against this run (those measured against a direct-SQL baseline
/// only when it ran).
fn print_summary(rows: &[ResultRow], extra: &serde_json::Map<String, serde_json::Value>, embedded: bool) {
    let find = |g: &str, t: &str, c: Option<usize>| {
        rows.iter()
            .filter(|r| r.group == g && r.target == t && c.is_none_or(|c| r.concurrency == c))
            .max_by_key(|r| r.concurrency)
    };
    let mut lines: Vec<String> = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        lines.push(format!("  [{}] {name}: {detail}", if ok { "met" } else { "NOT met" }));
    };
    if let Some(t) = find("search.semantic", "tmws", None) {
        let rec = t.recall_at_10.unwrap_or(0.0);
        check("semantic recall@10 >= 0.95", rec >= 0.95, format!("{rec:.4}"));
    }
    if let (Some(t), Some(s)) = (find("search.semantic", "tmws", Some(1)), find("search.semantic", "sql", Some(1))) {
        let (a, b) = (t.p50_ms / s.p50_ms, t.p99_ms / s.p99_ms);
        check("semantic p50 <= 1.25x SQL (c=1)", a <= 1.25, format!("{:.3} vs {:.3} ms = {a:.2}x", t.p50_ms, s.p50_ms));
        check("semantic p99 <= 1.5x SQL (c=1)", b <= 1.5, format!("{:.3} vs {:.3} ms = {b:.2}x", t.p99_ms, s.p99_ms));
    }
    if let (Some(t), Some(s)) = (find("search.semantic", "tmws", Some(8)), find("search.semantic", "sql", Some(8))) {
        let r = t.qps / s.qps;
        check("semantic QPS >= 0.8x SQL (c=8)", r >= 0.8, format!("{:.0} vs {:.0} = {r:.2}x", t.qps, s.qps));
    }
    if let Some(t) = find("search.filtered", "tmws", None) {
        let rec = t.recall_at_10.unwrap_or(0.0);
        check("filtered recall@10 = 1.0", rec >= 0.99995, format!("{rec:.4}"));
        if let Some(h) = find("search.filtered", "sql-hnsw", Some(t.concurrency)) {
            let r = t.qps / h.qps;
            check(
                "filtered QPS >= 10x pgvector default plan",
                r >= 10.0,
                format!(
                    "{:.0} vs {:.0} = {r:.1}x (c={}, default plan recall {:.4})",
                    t.qps,
                    h.qps,
                    t.concurrency,
                    h.recall_at_10.unwrap_or(0.0)
                ),
            );
        }
    }
    // The absolute targets are checked with or without the direct-SQL baseline.
    if let Some(t) = find("ingest.batch", "tmws", None) {
        if let Some(s) = find("ingest.batch", "sql", None) {
            let r = t.items_per_sec / s.items_per_sec;
            check(
                "batch ingest >= 0.5x multi-row INSERT",
                r >= 0.5,
                format!("{:.0} vs {:.0} memories/s = {r:.2}x", t.items_per_sec, s.items_per_sec),
            );
        }
        check("batch ingest >= 3,000 memories/s", t.items_per_sec >= 3000.0, format!("{:.0}/s", t.items_per_sec));
    }
    if let Some(t) = find("tasks.claim_complete", "tmws", None) {
        if let Some(s) = find("tasks.claim_complete", "sql", None) {
            let r = t.qps / s.qps;
            check(
                "tasks >= 0.5x bare SKIP LOCKED loop",
                r >= 0.5,
                format!("{:.0} vs {:.0} tasks/s = {r:.2}x", t.qps, s.qps),
            );
        }
        check(&format!("tasks >= 1,000/s with {} workers", t.concurrency), t.qps >= 1000.0, format!("{:.0}/s", t.qps));
    }
    if let Some(d) = extra.get("dag_10_linear").and_then(|d| d.get("task_steps")) {
        let p50 = d.get("p50_ms").and_then(|v| v.as_f64()).unwrap_or(f64::MAX);
        check("10-step DAG overhead < 50 ms (median, TASK steps)", p50 < 50.0, format!("{p50:.1} ms"));
    }
    for g in ["rpc.get_memory", "rpc.health_check"] {
        if let (Some(t), Some(b)) = (find(g, "tmws", None), find(g, "bare", None)) {
            let r = t.qps / b.qps;
            check(
                &format!("{g} QPS >= 0.8x bare tonic"),
                r >= 0.8,
                format!("{:.0} vs {:.0} = {r:.2}x (c={})", t.qps, b.qps, t.concurrency),
            );
        }
    }
    if let Some(idle) = extra.get("rss_kb_at_start").and_then(|v| v.as_u64()) {
        check("RSS idle <= 50 MB", idle <= 50 * 1024, format!("{:.1} MB (at tool start)", idle as f64 / 1024.0));
    }
    if let Some(peak) = extra.get("rss_kb_peak_search").and_then(|v| v.as_u64()) {
        check("RSS under search <= 200 MB", peak <= 200 * 1024, format!("{:.1} MB peak", peak as f64 / 1024.0));
    }
    if !lines.is_empty() {
        println!("\nTargets (issue 9):");
        for l in lines {
            println!("{l}");
        }
    }
    if embedded {
        let bare = rows.iter().any(|r| r.target == "bare");
        println!(
            "\nBaselines: the direct-SQL baselines (search SQL, multi-row INSERT, bare SKIP LOCKED loop) were not run \
             because the server uses the embedded store, which this tool does not open; the targets relative to \
             them are not checked.{}",
            if bare { " The bare tonic baseline of rpc.* ran." } else { "" }
        );
    }
}
