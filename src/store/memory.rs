//! Memories in PostgreSQL + pgvector.
//!
//! Access rules live in the SQL of every statement ([`push_visible`]): a row the caller may not
//! see is never fetched, so LIMIT, thresholds and pagination always apply to visible rows only.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::{Postgres, QueryBuilder, Row, postgres::PgRow};
use uuid::Uuid;

use super::{
    MemoryStore, PgStore,
    identity::{AuditEvent, record_audit, record_audits},
};
use crate::{
    auth::{Principal, RequestContext},
    error::{Error, Result},
    memory::{
        AccessLevel, Cursor, Grant, Memory, MemoryFilter, MemoryPatch, MemoryStats, NewMemory, OrderBy, Permission,
        PruneCriteria, ScoredMemory, SearchColumns,
    },
};

const COLUMNS: &str = "m.id, m.namespace, m.owner, m.content, m.summary, m.kind, m.tags, m.metadata, m.importance, \
     m.access_level, m.parent_id, m.embedding_model, m.embedding_dim, m.create_time, m.update_time, m.expire_time, \
     m.version";

/// Rows per multi-row INSERT in a batch create (16 parameters each; PostgreSQL allows 65,535 per
/// statement).
const INSERT_ROWS_PER_STATEMENT: usize = 1000;

/// Opens the outer query that adds to each memory what is stored beside its row: the read counts
/// (`memory_access`) and the share grants. The inner query (after this, closed by
/// [`close_extras`]) chooses the rows; the outer one looks up these for the returned rows only,
/// in the same statement (no second round trip).
const EXTRAS_OPEN: &str = "SELECT s.*, coalesce(a.access_count, 0) AS access_count, a.last_access_time, \
     (SELECT json_agg(json_build_object('agent_id', g.agent_id, 'permission', g.permission, 'expire_time', g.expire_time) \
     ORDER BY g.agent_id) FROM memory_grants g WHERE g.memory_id = s.id) AS grants FROM (";

/// Closes [`EXTRAS_OPEN`]; `order` (on the inner query's columns as `s.<column>`) restates the
/// inner order, which the join does not promise to keep.
fn close_extras(qb: &mut QueryBuilder<'_, Postgres>, order: Option<&str>) {
    qb.push(") s LEFT JOIN memory_access a ON a.memory_id = s.id");
    if let Some(order) = order {
        qb.push(" ORDER BY ");
        qb.push(order);
    }
}

/// A grant as [`EXTRAS_OPEN`] returns it.
#[derive(serde::Deserialize)]
struct StoredGrant {
    agent_id: String,
    permission: i16,
    expire_time: Option<DateTime<Utc>>,
}

/// Appends the visibility rule for `p`: not expired, and owner, or TEAM in the caller's
/// namespace, or PUBLIC/SYSTEM, or SHARED with an unexpired grant to the caller; admins also see
/// everything in the namespace they address.
pub(crate) fn push_visible<'a>(qb: &mut QueryBuilder<'a, Postgres>, p: &'a Principal, target_ns: &'a str) {
    qb.push("(m.expire_time IS NULL OR m.expire_time > now()) AND (m.owner = ");
    qb.push_bind(&p.agent_id);
    qb.push(" OR (m.access_level = 2 AND m.namespace = ");
    qb.push_bind(&p.namespace);
    qb.push(") OR m.access_level IN (4, 5) OR (m.access_level = 3 AND EXISTS (SELECT 1 FROM memory_grants g WHERE g.memory_id = m.id AND g.agent_id = ");
    qb.push_bind(&p.agent_id);
    qb.push(" AND (g.expire_time IS NULL OR g.expire_time > now())))");
    if p.is_admin() {
        qb.push(" OR m.namespace = ");
        qb.push_bind(target_ns);
    }
    qb.push(")");
}

/// Appends ` AND ...` for every constraint of `f`.
pub(crate) fn push_filter<'a>(qb: &mut QueryBuilder<'a, Postgres>, f: &'a MemoryFilter) {
    if !f.tags_any.is_empty() {
        qb.push(" AND m.tags && ");
        qb.push_bind(&f.tags_any);
    }
    if !f.tags_all.is_empty() {
        qb.push(" AND m.tags @> ");
        qb.push_bind(&f.tags_all);
    }
    if !f.kinds.is_empty() {
        qb.push(" AND m.kind = ANY(");
        qb.push_bind(&f.kinds);
        qb.push(")");
    }
    if !f.owners.is_empty() {
        qb.push(" AND m.owner = ANY(");
        qb.push_bind(&f.owners);
        qb.push(")");
    }
    if !f.access_levels.is_empty() {
        let levels: Vec<i16> = f.access_levels.iter().map(|l| l.as_i16()).collect();
        qb.push(" AND m.access_level = ANY(");
        qb.push_bind(levels);
        qb.push(")");
    }
    if let Some(v) = f.min_importance {
        qb.push(" AND m.importance >= ");
        qb.push_bind(v);
    }
    if let Some(v) = f.max_importance {
        qb.push(" AND m.importance <= ");
        qb.push_bind(v);
    }
    if let Some(t) = f.create_time_after {
        qb.push(" AND m.create_time > ");
        qb.push_bind(t);
    }
    if let Some(t) = f.create_time_before {
        qb.push(" AND m.create_time < ");
        qb.push_bind(t);
    }
    if let Some(meta) = &f.metadata_equals {
        qb.push(" AND m.metadata @> ");
        qb.push_bind(sqlx::types::Json(meta));
    }
    if let Some(parent) = f.parent_id {
        qb.push(" AND m.parent_id = ");
        qb.push_bind(parent);
    }
}

fn memory_from_row(row: &PgRow, with_embedding: bool) -> Result<Memory> {
    let level: i16 = row.try_get("access_level")?;
    let metadata: sqlx::types::Json<serde_json::Value> = row.try_get("metadata")?;
    let embedding =
        if with_embedding { row.try_get::<Option<Vector>, _>("embedding")?.map(|v| v.to_vec()) } else { None };
    let stored: Option<sqlx::types::Json<Vec<StoredGrant>>> = row.try_get("grants")?;
    let grants = stored
        .map(|g| g.0)
        .unwrap_or_default()
        .into_iter()
        .map(|g| {
            Ok(Grant {
                agent_id: g.agent_id,
                permission: Permission::from_i16(g.permission)
                    .ok_or_else(|| Error::internal(format!("stored permission {} is unknown", g.permission)))?,
                expire_time: g.expire_time,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Memory {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        owner: row.try_get("owner")?,
        content: row.try_get("content")?,
        summary: row.try_get("summary")?,
        kind: row.try_get("kind")?,
        tags: row.try_get("tags")?,
        metadata: metadata.0,
        importance: row.try_get("importance")?,
        access_level: AccessLevel::from_i16(level)
            .ok_or_else(|| Error::internal(format!("stored access_level {level} is unknown")))?,
        grants,
        parent_id: row.try_get("parent_id")?,
        embedding_model: row.try_get("embedding_model")?,
        embedding_dim: row.try_get("embedding_dim")?,
        embedding,
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
        expire_time: row.try_get("expire_time")?,
        access_count: row.try_get("access_count")?,
        last_access_time: row.try_get("last_access_time")?,
        version: row.try_get("version")?,
    })
}

/// What the caller may do with one row, read under `FOR UPDATE`.
struct WriteCheck {
    version: i64,
    owner: String,
    access_level: AccessLevel,
    write_grant: bool,
}

impl WriteCheck {
    fn may_write(&self, p: &Principal) -> bool {
        p.is_admin() || (self.access_level != AccessLevel::System && (self.owner == p.agent_id || self.write_grant))
    }
}

async fn lock_for_write(
    tx: &mut sqlx::PgConnection,
    p: &Principal,
    target_ns: &str,
    id: Uuid,
) -> Result<Option<WriteCheck>> {
    let mut qb = QueryBuilder::<Postgres>::new(
        "SELECT m.version, m.owner, m.access_level, EXISTS (SELECT 1 FROM memory_grants g WHERE g.memory_id = m.id AND g.agent_id = ",
    );
    qb.push_bind(&p.agent_id);
    qb.push(" AND g.permission = 2 AND (g.expire_time IS NULL OR g.expire_time > now())) AS write_grant FROM memories m WHERE m.id = ");
    qb.push_bind(id);
    qb.push(" AND ");
    push_visible(&mut qb, p, target_ns);
    qb.push(" FOR UPDATE OF m");
    let row = qb.build().fetch_optional(&mut *tx).await?;
    let Some(row) = row else { return Ok(None) };
    let level: i16 = row.try_get("access_level")?;
    Ok(Some(WriteCheck {
        version: row.try_get("version")?,
        owner: row.try_get("owner")?,
        access_level: AccessLevel::from_i16(level).ok_or_else(|| Error::internal("unknown access level"))?,
        write_grant: row.try_get("write_grant")?,
    }))
}

/// ABORTED when the caller's expected version is not the stored one (both backends).
pub(crate) fn check_etag(expected: Option<i64>, actual: i64) -> Result<()> {
    match expected {
        Some(v) if v != actual => Err(Error::Aborted(format!(
            "etag mismatch: the memory changed (now {}); re-read it and retry",
            crate::memory::etag_of(actual)
        ))),
        _ => Ok(()),
    }
}

/// `<extras> SELECT <memory columns>[, m.embedding] FROM memories m WHERE `, ready for the
/// conditions; the caller ends with [`close_extras`].
fn select_memories<'a>(with_embedding: bool) -> QueryBuilder<'a, Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new(EXTRAS_OPEN);
    qb.push("SELECT ");
    qb.push(COLUMNS);
    if with_embedding {
        qb.push(", m.embedding");
    }
    qb.push(" FROM memories m WHERE ");
    qb
}

async fn fetch_one_by_id(
    conn: &mut sqlx::PgConnection,
    p: &Principal,
    target_ns: &str,
    id: Uuid,
    with_embedding: bool,
) -> Result<Option<Memory>> {
    let mut qb = select_memories(with_embedding);
    qb.push("m.id = ");
    qb.push_bind(id);
    qb.push(" AND ");
    push_visible(&mut qb, p, target_ns);
    close_extras(&mut qb, None);
    let Some(row) = qb.build().fetch_optional(&mut *conn).await? else { return Ok(None) };
    memory_from_row(&row, with_embedding).map(Some)
}

/// Appends the semantic-search statement (shared by search and by EXPLAIN in tests).
#[allow(clippy::too_many_arguments)]
fn push_semantic_query<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    p: &'a Principal,
    ns: &'a str,
    filter: &'a MemoryFilter,
    query: &'a Vector,
    model: &'a str,
    dim: usize,
    k: usize,
    max_distance: Option<f64>,
    exact: bool,
    columns: SearchColumns,
) {
    // The dimension is a configuration integer, written as a literal so the planner matches the
    // per-dimension partial expression index.
    let expr = format!("(m.embedding::vector({dim}) <=> ");
    let ids = columns == SearchColumns::Ids;
    if ids {
        qb.push("SELECT m.id");
    } else {
        qb.push(EXTRAS_OPEN);
        qb.push("SELECT ");
        qb.push(COLUMNS);
    }
    if columns.vectors() {
        qb.push(format!(", m.embedding::vector({dim}) AS vec"));
    }
    qb.push(", ");
    qb.push(&expr);
    qb.push_bind(query);
    qb.push(format!(") AS distance FROM memories m WHERE m.embedding_dim = {dim} AND m.embedding_model = "));
    qb.push_bind(model);
    qb.push(" AND m.namespace = ");
    qb.push_bind(ns);
    qb.push(" AND ");
    push_visible(qb, p, ns);
    push_filter(qb, filter);
    if let Some(d) = max_distance {
        qb.push(" AND ");
        qb.push(&expr);
        qb.push_bind(query);
        qb.push(") <= ");
        qb.push_bind(d);
    }
    qb.push(" ORDER BY ");
    qb.push(&expr);
    qb.push_bind(query);
    // `+ 0` makes the sort key an expression no index provides: an exact scan.
    qb.push(if exact { ") + 0" } else { ")" });
    qb.push(" LIMIT ");
    qb.push_bind(k as i64);
    // Iterative index scans in relaxed order may return neighbours slightly out of order: the
    // caller sorts the ids; the outer query restates the order for rows.
    if !ids {
        close_extras(qb, Some("s.distance, s.id"));
    }
}

/// A search row as the caller asked for it: the memory, or only its id ([`SearchColumns::Ids`]).
fn ranked_from_row(row: &PgRow, columns: SearchColumns) -> Result<Memory> {
    if columns == SearchColumns::Ids {
        Ok(Memory::placeholder(row.try_get("id")?))
    } else {
        memory_from_row(row, false)
    }
}

impl PgStore {
    /// EXPLAIN of the semantic-search statement, exactly as search runs it.
    #[allow(clippy::too_many_arguments)]
    pub async fn explain_semantic(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        query: &[f32],
        model: &str,
        k: usize,
        exact: bool,
    ) -> Result<String> {
        let vector = Vector::from(query.to_vec());
        let mut qb = QueryBuilder::<Postgres>::new("EXPLAIN ");
        push_semantic_query(&mut qb, p, ns, filter, &vector, model, query.len(), k, None, exact, SearchColumns::Rows);
        let mut plan = String::new();
        for row in qb.build().fetch_all(self.pool()).await? {
            let line: String = row.try_get(0)?;
            plan.push_str(&line);
            plan.push('\n');
        }
        Ok(plan)
    }
}

#[async_trait]
impl MemoryStore for PgStore {
    async fn secret(&self, name: &str, generate: &(dyn Fn() -> Vec<u8> + Send + Sync)) -> Result<Vec<u8>> {
        let candidate = generate();
        sqlx::query("INSERT INTO tmws_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(&candidate)
            .execute(self.pool())
            .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM tmws_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(self.pool())
            .await?;
        Ok(value)
    }

    async fn ensure_vector_index(&self, dim: usize, m: u32, ef_construction: u32) -> Result<()> {
        let mut conn = self.pool().acquire().await?;
        // One replica builds; the others wait and then find it.
        sqlx::query("SELECT pg_advisory_lock(727001)").execute(&mut *conn).await?;
        let result = build_vector_index(&mut conn, dim, m, ef_construction).await;
        sqlx::query("SELECT pg_advisory_unlock(727001)").execute(&mut *conn).await?;
        result
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "insert_memories"))]
    async fn insert_memories(&self, p: &Principal, items: Vec<NewMemory>, ctx: &RequestContext) -> Result<Vec<Memory>> {
        let mut tx = self.pool().begin().await?;
        // A parent must be visible to the caller (ids are new, so no parent is in this batch).
        for item in &items {
            let Some(parent) = item.parent_id else { continue };
            let mut qb = QueryBuilder::<Postgres>::new("SELECT 1 FROM memories m WHERE m.id = ");
            qb.push_bind(parent);
            qb.push(" AND ");
            push_visible(&mut qb, p, &item.namespace);
            if qb.build().fetch_optional(&mut *tx).await?.is_none() {
                return Err(Error::invalid("memory.parent_id", "no such memory"));
            }
        }
        // Multi-row INSERTs, in the order of the items.
        let mut inserted: std::collections::HashSet<Uuid> = std::collections::HashSet::with_capacity(items.len());
        for chunk in items.chunks(INSERT_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO memories (id, namespace, owner, content, summary, kind, tags, metadata, importance, access_level, \
                 parent_id, embedding_model, embedding_dim, embedding, expire_time, request_id, search_text) ",
            );
            qb.push_values(chunk, |mut row, item| {
                row.push_bind(item.id)
                    .push_bind(&item.namespace)
                    .push_bind(&item.owner)
                    .push_bind(&item.content)
                    .push_bind(&item.summary)
                    .push_bind(&item.kind)
                    .push_bind(&item.tags)
                    .push_bind(sqlx::types::Json(&item.metadata))
                    .push_bind(item.importance)
                    .push_bind(item.access_level.as_i16())
                    .push_bind(item.parent_id)
                    .push_bind(item.embedding.as_ref().and(item.embedding_model.as_deref()))
                    .push_bind(item.embedding.as_ref().map(|v| v.len() as i32))
                    .push_bind(item.embedding.as_ref().map(|v| Vector::from(v.clone())))
                    .push_bind(item.expire_time)
                    .push_bind(&item.request_id)
                    .push("''::tsvector");
            });
            qb.push(" ON CONFLICT (namespace, owner, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id");
            let ids: Vec<Uuid> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
            inserted.extend(ids);
        }
        // Items whose request_id was used before (or earlier in this batch): the first result.
        let mut ids = Vec::with_capacity(items.len());
        for item in &items {
            if inserted.contains(&item.id) {
                ids.push(item.id);
                continue;
            }
            let id: Uuid =
                sqlx::query_scalar("SELECT id FROM memories WHERE namespace = $1 AND owner = $2 AND request_id = $3")
                    .bind(&item.namespace)
                    .bind(&item.owner)
                    .bind(&item.request_id)
                    .fetch_one(&mut *tx)
                    .await?;
            ids.push(id);
        }
        let mut qb = QueryBuilder::<Postgres>::new(EXTRAS_OPEN);
        qb.push("SELECT ");
        qb.push(COLUMNS);
        qb.push(" FROM memories m WHERE m.id = ANY(");
        qb.push_bind(&ids);
        qb.push(")");
        close_extras(&mut qb, None);
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut by_id: HashMap<Uuid, Memory> = HashMap::new();
        for row in &rows {
            let m = memory_from_row(row, false)?;
            by_id.insert(m.id, m);
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            out.push(by_id.get(id).cloned().ok_or_else(|| Error::internal("inserted memory vanished"))?);
        }
        let events: Vec<AuditEvent> = out.iter().map(|m| AuditEvent::ok(p, &m.namespace, ctx, m.id)).collect();
        record_audits(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(out)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_memory"))]
    async fn get_memory(&self, p: &Principal, ns: &str, id: Uuid, with_embedding: bool) -> Result<Option<Memory>> {
        let mut conn = self.pool().acquire().await?;
        fetch_one_by_id(&mut conn, p, ns, id, with_embedding).await
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "get_memories"))]
    async fn get_memories(&self, p: &Principal, ns: &str, ids: &[Uuid]) -> Result<Vec<Memory>> {
        let mut qb = select_memories(false);
        qb.push("m.id = ANY(");
        qb.push_bind(ids);
        qb.push(") AND ");
        push_visible(&mut qb, p, ns);
        close_extras(&mut qb, None);
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(|r| memory_from_row(r, false)).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "update_memory"))]
    async fn update_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        patch: &MemoryPatch,
        ctx: &RequestContext,
    ) -> Result<Memory> {
        let mut tx = self.pool().begin().await?;
        let check =
            lock_for_write(&mut tx, p, ns, id).await?.ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !check.may_write(p) {
            return Err(Error::PermissionDenied("you may read this memory but not change it".into()));
        }
        check_etag(expected_version, check.version)?;
        if patch.access_level == Some(AccessLevel::System) && !p.is_admin() {
            return Err(Error::PermissionDenied("only admins may make a memory SYSTEM".into()));
        }
        if let Some(Some(parent)) = patch.parent_id {
            if parent == id {
                return Err(Error::invalid("memory.parent_id", "a memory cannot be its own parent"));
            }
            let mut qb = QueryBuilder::<Postgres>::new("SELECT 1 FROM memories m WHERE m.id = ");
            qb.push_bind(parent);
            qb.push(" AND ");
            push_visible(&mut qb, p, ns);
            if qb.build().fetch_optional(&mut *tx).await?.is_none() {
                return Err(Error::invalid("memory.parent_id", "no such memory"));
            }
        }
        let mut qb = QueryBuilder::<Postgres>::new("UPDATE memories SET version = version + 1, update_time = now()");
        if let Some(v) = &patch.content {
            qb.push(", content = ");
            qb.push_bind(v);
        }
        if let Some(v) = &patch.summary {
            qb.push(", summary = ");
            qb.push_bind(v);
        }
        if let Some(v) = &patch.kind {
            qb.push(", kind = ");
            qb.push_bind(v);
        }
        if let Some(v) = &patch.tags {
            qb.push(", tags = ");
            qb.push_bind(v);
        }
        if let Some(v) = &patch.metadata {
            qb.push(", metadata = ");
            qb.push_bind(sqlx::types::Json(v));
        }
        if let Some(v) = patch.importance {
            qb.push(", importance = ");
            qb.push_bind(v);
        }
        if let Some(v) = patch.access_level {
            qb.push(", access_level = ");
            qb.push_bind(v.as_i16());
        }
        if let Some(v) = patch.parent_id {
            qb.push(", parent_id = ");
            qb.push_bind(v);
        }
        if let Some((vector, model)) = &patch.embedding {
            qb.push(", embedding = ");
            qb.push_bind(Vector::from(vector.clone()));
            qb.push(", embedding_dim = ");
            qb.push_bind(vector.len() as i32);
            qb.push(", embedding_model = ");
            qb.push_bind(model);
        }
        if let Some(v) = patch.expire_time {
            qb.push(", expire_time = ");
            qb.push_bind(v);
        }
        qb.push(" WHERE id = ");
        qb.push_bind(id);
        qb.build().execute(&mut *tx).await?;
        let memory = fetch_one_by_id(&mut tx, p, ns, id, false)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        record_audit(&mut tx, &AuditEvent::ok(p, &memory.namespace, ctx, id)).await?;
        tx.commit().await?;
        Ok(memory)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "delete_memory"))]
    async fn delete_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let check =
            lock_for_write(&mut tx, p, ns, id).await?.ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !check.may_write(p) {
            return Err(Error::PermissionDenied("you may read this memory but not delete it".into()));
        }
        check_etag(expected_version, check.version)?;
        let deleted_ns: String = sqlx::query_scalar("DELETE FROM memories WHERE id = $1 RETURNING namespace")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        record_audit(&mut tx, &AuditEvent::ok(p, &deleted_ns, ctx, id)).await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "list_memories"))]
    async fn list_memories(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        order: OrderBy,
        after: Option<&Cursor>,
        limit: usize,
        with_embedding: bool,
    ) -> Result<Vec<Memory>> {
        let mut qb = select_memories(with_embedding);
        qb.push("m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        push_filter(&mut qb, filter);
        match (order, after) {
            (OrderBy::CreateTimeDesc, Some(Cursor::CreateTime(t, id))) => {
                qb.push(" AND (m.create_time, m.id) < (");
                qb.push_bind(micros_to_time(*t)?);
                qb.push(", ");
                qb.push_bind(*id);
                qb.push(")");
            }
            (OrderBy::CreateTimeAsc, Some(Cursor::CreateTime(t, id))) => {
                qb.push(" AND (m.create_time, m.id) > (");
                qb.push_bind(micros_to_time(*t)?);
                qb.push(", ");
                qb.push_bind(*id);
                qb.push(")");
            }
            (OrderBy::ImportanceDesc, Some(Cursor::Importance(v, id))) => {
                qb.push(" AND (m.importance, m.id) < (");
                qb.push_bind(*v);
                qb.push(", ");
                qb.push_bind(*id);
                qb.push(")");
            }
            (_, None) => {}
            _ => return Err(Error::invalid("page_token", "page token belongs to a different order")),
        }
        let (inner, outer) = match order {
            OrderBy::CreateTimeDesc => ("m.create_time DESC, m.id DESC", "s.create_time DESC, s.id DESC"),
            OrderBy::CreateTimeAsc => ("m.create_time ASC, m.id ASC", "s.create_time ASC, s.id ASC"),
            OrderBy::ImportanceDesc => ("m.importance DESC, m.id DESC", "s.importance DESC, s.id DESC"),
        };
        qb.push(" ORDER BY ");
        qb.push(inner);
        qb.push(" LIMIT ");
        qb.push_bind(limit as i64);
        close_extras(&mut qb, Some(outer));
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(|r| memory_from_row(r, with_embedding)).collect()
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "count_matching"))]
    async fn count_matching(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        model: &str,
        dim: usize,
        cap: u64,
    ) -> Result<u64> {
        // The planner's estimate first: it reads no rows. Clearly below the cap, it decides (the
        // exact path it leads to is always correct); otherwise the capped count below decides.
        let mut qb =
            QueryBuilder::<Postgres>::new("EXPLAIN (FORMAT JSON) SELECT 1 FROM memories m WHERE m.embedding_dim = ");
        qb.push_bind(dim as i32);
        qb.push(" AND m.embedding_model = ");
        qb.push_bind(model);
        qb.push(" AND m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        push_filter(&mut qb, filter);
        let plan: sqlx::types::Json<serde_json::Value> = qb.build_query_scalar().fetch_one(self.pool()).await?;
        if let Some(estimate) =
            plan.0.get(0).and_then(|p| p.get("Plan")).and_then(|p| p.get("Plan Rows")).and_then(|r| r.as_f64())
            && estimate * 4.0 < cap as f64
        {
            return Ok(estimate as u64);
        }
        let mut qb =
            QueryBuilder::<Postgres>::new("SELECT count(*) FROM (SELECT 1 FROM memories m WHERE m.embedding_dim = ");
        qb.push_bind(dim as i32);
        qb.push(" AND m.embedding_model = ");
        qb.push_bind(model);
        qb.push(" AND m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        push_filter(&mut qb, filter);
        qb.push(" LIMIT ");
        qb.push_bind(cap as i64);
        qb.push(") s");
        let n: i64 = qb.build_query_scalar().fetch_one(self.pool()).await?;
        Ok(n.max(0) as u64)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "semantic_search"))]
    async fn semantic_search(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        query: &[f32],
        model: &str,
        k: usize,
        max_distance: Option<f64>,
        exact: bool,
        columns: SearchColumns,
    ) -> Result<Vec<ScoredMemory>> {
        let vector = Vector::from(query.to_vec());
        let mut qb = QueryBuilder::<Postgres>::new("");
        push_semantic_query(&mut qb, p, ns, filter, &vector, model, query.len(), k, max_distance, exact, columns);
        let rows = qb.build().fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut memory = ranked_from_row(row, columns)?;
            let distance: f64 = row.try_get("distance")?;
            let vec = if columns.vectors() { Some(row.try_get::<Vector, _>("vec")?.to_vec()) } else { None };
            if columns == SearchColumns::Embedding {
                memory.embedding = vec.clone();
            }
            out.push(ScoredMemory { memory, score: 1.0 - distance, vector: vec });
        }
        if columns == SearchColumns::Ids {
            // No outer query restated the order (see `push_semantic_query`).
            out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.memory.id.cmp(&b.memory.id)));
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "keyword_search"))]
    async fn keyword_search(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        text: &str,
        text_config: &str,
        k: usize,
        columns: SearchColumns,
        dim: usize,
    ) -> Result<Vec<ScoredMemory>> {
        let ids = columns == SearchColumns::Ids;
        let mut qb = QueryBuilder::<Postgres>::new(if ids { "SELECT m.id" } else { EXTRAS_OPEN });
        if !ids {
            qb.push("SELECT ");
            qb.push(COLUMNS);
        }
        if columns.vectors() {
            qb.push(format!(", CASE WHEN m.embedding_dim = {dim} THEN m.embedding ELSE NULL END AS vec"));
        }
        qb.push(", ts_rank_cd(m.search_text, q) AS rank FROM memories m, websearch_to_tsquery(");
        qb.push_bind(text_config);
        qb.push("::regconfig, ");
        qb.push_bind(text);
        qb.push(") q WHERE m.search_text @@ q AND m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        push_filter(&mut qb, filter);
        qb.push(" ORDER BY rank DESC, m.id DESC LIMIT ");
        qb.push_bind(k as i64);
        if !ids {
            close_extras(&mut qb, Some("s.rank DESC, s.id DESC"));
        }
        let rows = qb.build().fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut memory = ranked_from_row(row, columns)?;
            let rank: f32 = row.try_get("rank")?;
            let vec =
                if columns.vectors() { row.try_get::<Option<Vector>, _>("vec")?.map(|v| v.to_vec()) } else { None };
            if columns == SearchColumns::Embedding {
                memory.embedding = vec.clone();
            }
            out.push(ScoredMemory { memory, score: f64::from(rank), vector: vec });
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "share_memory"))]
    async fn share_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        grants: &[Grant],
        revoke: &[String],
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<Memory> {
        let mut tx = self.pool().begin().await?;
        let check =
            lock_for_write(&mut tx, p, ns, id).await?.ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !(p.is_admin() || check.owner == p.agent_id) {
            return Err(Error::PermissionDenied("only the owner or an admin may share a memory".into()));
        }
        check_etag(expected_version, check.version)?;
        if !revoke.is_empty() {
            sqlx::query("DELETE FROM memory_grants WHERE memory_id = $1 AND agent_id = ANY($2)")
                .bind(id)
                .bind(revoke)
                .execute(&mut *tx)
                .await?;
        }
        for g in grants {
            sqlx::query(
                "INSERT INTO memory_grants (memory_id, agent_id, permission, expire_time) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (memory_id, agent_id) DO UPDATE SET permission = EXCLUDED.permission, expire_time = EXCLUDED.expire_time",
            )
            .bind(id)
            .bind(&g.agent_id)
            .bind(g.permission as i16)
            .bind(g.expire_time)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE memories SET version = version + 1, update_time = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let memory = fetch_one_by_id(&mut tx, p, ns, id, false)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        record_audit(&mut tx, &AuditEvent::ok(p, &memory.namespace, ctx, id)).await?;
        tx.commit().await?;
        Ok(memory)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "prune"))]
    async fn prune(&self, c: &PruneCriteria) -> Result<(i64, bool)> {
        let push_where = |qb: &mut QueryBuilder<'_, Postgres>| {
            qb.push(" WHERE m.namespace = ");
            qb.push_bind(c.namespace.clone());
            if let Some(owner) = &c.owner {
                qb.push(" AND m.owner = ");
                qb.push_bind(owner.clone());
            }
            qb.push(" AND (false");
            if c.expired {
                qb.push(" OR m.expire_time <= now()");
            }
            if let Some((before, max_importance)) = c.older_than {
                qb.push(" OR (m.create_time < ");
                qb.push_bind(before);
                qb.push(" AND m.importance <= ");
                qb.push_bind(max_importance);
                qb.push(")");
            }
            qb.push(")");
        };
        let limit = c.limit as i64;
        if c.dry_run {
            let mut qb = QueryBuilder::<Postgres>::new("SELECT count(*) FROM (SELECT 1 FROM memories m");
            push_where(&mut qb);
            qb.push(" LIMIT ");
            qb.push_bind(limit + 1);
            qb.push(") s");
            let n: i64 = qb.build_query_scalar().fetch_one(self.pool()).await?;
            return Ok((n.min(limit), n > limit));
        }
        let mut qb = QueryBuilder::<Postgres>::new("WITH doomed AS (SELECT m.id FROM memories m");
        push_where(&mut qb);
        qb.push(" LIMIT ");
        qb.push_bind(limit);
        qb.push(" FOR UPDATE SKIP LOCKED) DELETE FROM memories d USING doomed WHERE d.id = doomed.id");
        let deleted = qb.build().execute(self.pool()).await?.rows_affected() as i64;
        let mut qb = QueryBuilder::<Postgres>::new("SELECT EXISTS (SELECT 1 FROM memories m");
        push_where(&mut qb);
        qb.push(")");
        let more: bool = qb.build_query_scalar().fetch_one(self.pool()).await?;
        Ok((deleted, more))
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "stats"))]
    async fn stats(&self, p: &Principal, ns: &str) -> Result<MemoryStats> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT count(*) AS total, count(m.embedding) AS with_embedding, min(m.create_time) AS oldest, \
             max(m.create_time) AS newest, coalesce(sum(pg_column_size(m.*)), 0)::bigint AS bytes \
             FROM memories m WHERE m.namespace = ",
        );
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        let row = qb.build().fetch_one(self.pool()).await?;
        let mut stats = MemoryStats {
            namespace: ns.to_string(),
            total: row.try_get("total")?,
            with_embedding: row.try_get("with_embedding")?,
            oldest: row.try_get("oldest")?,
            newest: row.try_get("newest")?,
            storage_bytes: row.try_get("bytes")?,
            ..MemoryStats::default()
        };
        let mut qb = QueryBuilder::<Postgres>::new("SELECT m.kind, count(*) FROM memories m WHERE m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        qb.push(" GROUP BY m.kind ORDER BY m.kind");
        for row in qb.build().fetch_all(self.pool()).await? {
            stats.by_kind.push((row.try_get(0)?, row.try_get(1)?));
        }
        let mut qb =
            QueryBuilder::<Postgres>::new("SELECT m.access_level, count(*) FROM memories m WHERE m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns);
        qb.push(" GROUP BY m.access_level ORDER BY m.access_level");
        for row in qb.build().fetch_all(self.pool()).await? {
            let level: i16 = row.try_get(0)?;
            if let Some(level) = AccessLevel::from_i16(level) {
                stats.by_access_level.push((level, row.try_get(1)?));
            }
        }
        Ok(stats)
    }

    async fn sweep_expired(&self, batch: usize) -> Result<u64> {
        let n = sqlx::query(
            "WITH doomed AS (SELECT id FROM memories WHERE expire_time <= now() LIMIT $1 FOR UPDATE SKIP LOCKED) \
             DELETE FROM memories m USING doomed WHERE m.id = doomed.id",
        )
        .bind(batch as i64)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }

    async fn record_access(&self, counts: &[(Uuid, i64, DateTime<Utc>)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = counts.iter().map(|c| c.0).collect();
        let ns: Vec<i64> = counts.iter().map(|c| c.1).collect();
        let times: Vec<DateTime<Utc>> = counts.iter().map(|c| c.2).collect();
        // Upsert per memory, in id order (so concurrent flushes of replicas take row locks in one
        // order). The memories are checked, not locked: locking them (FOR KEY SHARE) rewrote the
        // header of every counted memory's row on each flush, a full-page image of its page after
        // each checkpoint (megabytes of WAL per flush under search load; docs/BENCHMARKS.md,
        // tuning log 13). A memory deleted after the check makes the first count of it fail on
        // the foreign key (an existing count goes with the memory); the statement then runs again
        // in a new snapshot, without that memory.
        let mut attempts = 0;
        loop {
            let result = sqlx::query(
                "INSERT INTO memory_access AS a (memory_id, access_count, last_access_time) \
                 SELECT u.id, u.n, u.t FROM (SELECT id, sum(n)::bigint AS n, max(t) AS t \
                   FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[]) AS x(id, n, t) GROUP BY id) u \
                 WHERE EXISTS (SELECT 1 FROM memories m WHERE m.id = u.id) ORDER BY u.id \
                 ON CONFLICT (memory_id) DO UPDATE SET access_count = a.access_count + EXCLUDED.access_count, \
                   last_access_time = GREATEST(a.last_access_time, EXCLUDED.last_access_time)",
            )
            .bind(&ids)
            .bind(&ns)
            .bind(&times)
            .execute(self.pool())
            .await;
            match result {
                Ok(_) => return Ok(()),
                Err(sqlx::Error::Database(db))
                    if db.code().as_deref() == Some("23503") && attempts < ACCESS_FLUSH_RETRIES =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Times a read-count flush runs again after a memory it counted was deleted under it.
const ACCESS_FLUSH_RETRIES: u32 = 3;

async fn build_vector_index(conn: &mut sqlx::PgConnection, dim: usize, m: u32, ef_construction: u32) -> Result<()> {
    let name = format!("memories_embedding_hnsw_{dim}");
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE c.relname = $1",
    )
    .bind(&name)
    .fetch_optional(&mut *conn)
    .await?;
    if valid == Some(false) {
        // Left over from an interrupted concurrent build.
        let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
        sqlx::query(&drop).persistent(false).execute(&mut *conn).await?;
    }
    if valid != Some(true) {
        tracing::info!(dim, m, ef_construction, "creating HNSW index");
        let create = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON memories USING hnsw ((embedding::vector({dim})) vector_cosine_ops) \
             WITH (m = {m}, ef_construction = {ef_construction}) WHERE embedding_dim = {dim}"
        );
        sqlx::query(&create).persistent(false).execute(&mut *conn).await?;
    }
    Ok(())
}

fn micros_to_time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(|| Error::invalid("page_token", "malformed page token"))
}
