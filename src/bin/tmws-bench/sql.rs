//! The direct-SQL baselines: the statements the service runs (src/store/memory.rs,
//! src/store/workflow.rs), written out with the same text, binds and per-connection settings,
//! so "tmws / SQL" measures exactly what the service adds.

use std::time::Duration;

use pgvector::Vector;
use sqlx::{
    PgPool, Postgres, QueryBuilder, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

/// `COLUMNS` of src/store/memory.rs. Without its read cache the service wraps its search
/// statements in an outer query that adds each returned row's read counts and grants
/// (`EXTRAS_OPEN`); the baselines run the inner statement alone, so those lookups are counted as
/// work the service adds.
const COLUMNS: &str = "m.id, m.namespace, m.owner, m.content, m.summary, m.kind, m.tags, m.metadata, m.importance, \
     m.access_level, m.parent_id, m.embedding_model, m.embedding_dim, m.create_time, m.update_time, m.expire_time, \
     m.version";

/// Who the service's development principal is, and which model its vectors carry (learned from
/// a memory the service returned).
#[derive(Clone, Debug)]
pub struct Principal {
    pub agent: String,
    pub namespace: String,
    pub model: String,
}

/// A pool with the service's per-connection settings (src/store/postgres.rs). Like the service's
/// pool it hands out idle connections without testing them first: sqlx's default
/// (`test_before_acquire`) would add a round trip to PostgreSQL to every statement of the
/// baselines.
pub async fn pool(url: &str, size: u32, ef_search: u32, iterative_scan: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let ef = ef_search.to_string();
    let options = options.application_name("tmws-bench").options([
        ("hnsw.ef_search", ef.as_str()),
        ("hnsw.iterative_scan", iterative_scan),
        ("tmws.text_search_config", "english"),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .connect_with(options)
        .await?)
}

/// `push_visible` for a non-admin principal.
fn push_visible<'a>(qb: &mut QueryBuilder<'a, Postgres>, p: &'a Principal) {
    qb.push("(m.expire_time IS NULL OR m.expire_time > now()) AND (m.owner = ");
    qb.push_bind(&p.agent);
    qb.push(" OR (m.access_level = 2 AND m.namespace = ");
    qb.push_bind(&p.namespace);
    qb.push(") OR m.access_level IN (4, 5) OR (m.access_level = 3 AND EXISTS (SELECT 1 FROM memory_grants g WHERE g.memory_id = m.id AND g.agent_id = ");
    qb.push_bind(&p.agent);
    qb.push(" AND (g.expire_time IS NULL OR g.expire_time > now())))");
    qb.push(")");
}

/// `push_semantic_query` with a `tags_any` filter (or none), no score threshold.
pub fn semantic<'a>(
    p: &'a Principal,
    tags_any: Option<&'a Vec<String>>,
    query: &'a Vector,
    dim: usize,
    k: usize,
    exact: bool,
    prefix: &str,
) -> QueryBuilder<'a, Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new(prefix);
    let expr = format!("(m.embedding::vector({dim}) <=> ");
    qb.push("SELECT ");
    qb.push(COLUMNS);
    // The benchmark's searches ask for no diversity and no embeddings, so the service reads no
    // stored vectors; neither does its baseline. With its read cache on, the service's statement
    // returns only ids and distances (`SearchColumns::Ids`) and the rows come from the cache; the
    // baseline stays the one statement that answers the search directly, rows included.
    qb.push(", ");
    qb.push(&expr);
    qb.push_bind(query);
    qb.push(format!(") AS distance FROM memories m WHERE m.embedding_dim = {dim} AND m.embedding_model = "));
    qb.push_bind(&p.model);
    qb.push(" AND m.namespace = ");
    qb.push_bind(&p.namespace);
    qb.push(" AND ");
    push_visible(&mut qb, p);
    if let Some(tags) = tags_any {
        qb.push(" AND m.tags && ");
        qb.push_bind(tags);
    }
    qb.push(" ORDER BY ");
    qb.push(&expr);
    qb.push_bind(query);
    qb.push(if exact { ") + 0" } else { ")" });
    qb.push(" LIMIT ");
    qb.push_bind(k as i64);
    qb
}

/// Runs a semantic statement and returns the ids, nearest first (decoding what the service
/// decodes: the row and the distance).
pub async fn run_semantic(pool: &PgPool, mut qb: QueryBuilder<'_, Postgres>) -> Result<Vec<Uuid>, sqlx::Error> {
    let rows = qb.build().fetch_all(pool).await?;
    let mut out: Vec<(f64, Uuid)> = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get("id")?;
        let distance: f64 = row.try_get("distance")?;
        let _content: String = row.try_get("content")?;
        out.push((distance, id));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out.into_iter().map(|(_, id)| id).collect())
}

/// `keyword_search` of src/store/memory.rs.
pub async fn run_keyword(pool: &PgPool, p: &Principal, text: &str, k: usize) -> Result<usize, sqlx::Error> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
    qb.push(COLUMNS);
    qb.push(", ts_rank_cd(m.search_text, q) AS rank FROM memories m, websearch_to_tsquery(");
    qb.push_bind("english");
    qb.push("::regconfig, ");
    qb.push_bind(text);
    qb.push(") q WHERE m.search_text @@ q AND m.namespace = ");
    qb.push_bind(&p.namespace);
    qb.push(" AND ");
    push_visible(&mut qb, p);
    qb.push(" ORDER BY rank DESC, m.id DESC LIMIT ");
    qb.push_bind(k as i64);
    let rows = qb.build().fetch_all(pool).await?;
    for row in &rows {
        let _id: Uuid = row.try_get("id")?;
        let _rank: f32 = row.try_get("rank")?;
    }
    Ok(rows.len())
}

/// One memory to insert directly.
pub struct Row16 {
    pub id: Uuid,
    pub content: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub embedding: Vec<f32>,
}

/// The baseline for batch ingest: one multi-row INSERT of the columns the service writes (the
/// keyword-document trigger fires the same way).
pub async fn insert_many(pool: &PgPool, p: &Principal, rows: Vec<Row16>) -> Result<u64, sqlx::Error> {
    let mut qb = QueryBuilder::<Postgres>::new(
        "INSERT INTO memories (id, namespace, owner, content, summary, kind, tags, metadata, importance, access_level, \
         parent_id, embedding_model, embedding_dim, embedding, expire_time, request_id, search_text) ",
    );
    qb.push_values(rows, |mut b, r| {
        let dim = r.embedding.len() as i32;
        b.push_bind(r.id)
            .push_bind(p.namespace.clone())
            .push_bind(p.agent.clone())
            .push_bind(r.content)
            .push_bind("")
            .push_bind("")
            .push_bind(r.tags)
            .push_bind(sqlx::types::Json(r.metadata))
            .push_bind(0.5f64)
            .push_bind(1i16)
            .push_bind(None::<Uuid>)
            .push_bind(p.model.clone())
            .push_bind(dim)
            .push_bind(Vector::from(r.embedding))
            .push_bind(None::<chrono::DateTime<chrono::Utc>>)
            .push_bind(None::<String>)
            .push_unseparated(", ''::tsvector");
    });
    Ok(qb.build().execute(pool).await?.rows_affected())
}

/// Inserts `n` queued worker tasks into `queue` (setup of both task loops; not measured).
pub async fn insert_tasks(pool: &PgPool, ns: &str, queue: &str, n: usize, created_by: &str) -> Result<(), sqlx::Error> {
    for chunk_start in (0..n).step_by(1000) {
        let m = (n - chunk_start).min(1000);
        let ids: Vec<Uuid> = (0..m).map(|_| Uuid::now_v7()).collect();
        sqlx::query(
            "INSERT INTO tasks (id, namespace, kind, queue, status, max_attempts, initial_backoff_ms, max_backoff_ms, \
             backoff_multiplier, created_by) SELECT u, $2, 1, $3, 2, 3, 1000, 60000, 2.0, $4 FROM UNNEST($1::uuid[]) u",
        )
        .bind(&ids)
        .bind(ns)
        .bind(queue)
        .bind(created_by)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The bare claim: the service's `SKIP LOCKED` lease statement (src/store/workflow.rs
/// `claim_tasks`), alone in its transaction. Returns (id, lease token), or None when drained.
pub async fn claim_one(
    pool: &PgPool,
    ns: &str,
    queue: &str,
    worker: &str,
) -> Result<Option<(Uuid, Uuid)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "WITH picked AS (SELECT id FROM tasks WHERE namespace = $1 AND queue = $2 AND status = 2 AND kind = 1 \
           AND available_time <= clock_timestamp() ORDER BY priority DESC, available_time, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
         UPDATE tasks t SET status = 3, attempt = t.attempt + 1, worker_id = $4, lease_token = gen_random_uuid(), \
           lease_duration_ms = $5, lease_expire_time = clock_timestamp() + make_interval(secs => $5::float8 / 1000), \
           update_time = clock_timestamp() \
         FROM picked WHERE t.id = picked.id RETURNING t.id, t.lease_token",
    )
    .bind(ns)
    .bind(queue)
    .bind(1i64)
    .bind(worker)
    .bind(30_000i64)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(match row {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        None => None,
    })
}

/// The bare complete: check the lease token and record the output, in one statement.
pub async fn complete_one(pool: &PgPool, id: Uuid, token: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE tasks SET status = 4, output = '{}'::jsonb, error = '', lease_expire_time = NULL, update_time = clock_timestamp() \
         WHERE id = $1 AND lease_token = $2 AND status = 3",
    )
    .bind(id)
    .bind(token)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// EXPLAIN of a statement made by [`semantic`] with the `EXPLAIN ` prefix (for the report).
pub async fn explain(pool: &PgPool, mut qb: QueryBuilder<'_, Postgres>) -> Result<String, sqlx::Error> {
    let rows = qb.build().fetch_all(pool).await?;
    Ok(rows.iter().filter_map(|r| r.try_get::<String, _>(0).ok()).collect::<Vec<_>>().join("\n"))
}
