//! Agents, API keys and the audit log in PostgreSQL.

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    PgConnection, Postgres, QueryBuilder, Row,
    postgres::{PgArguments, PgRow},
    query::Query,
};
use uuid::Uuid;

use super::PgStore;
use crate::{
    auth::{AgentStatus, Principal, RequestContext, Role},
    error::{Error, Result},
};

/// An agent as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub id: String,
    pub namespace: String,
    pub display_name: String,
    pub role: Role,
    pub status: AgentStatus,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub version: i64,
}

impl Agent {
    pub fn etag(&self) -> String {
        format!("v{}", self.version)
    }
}

#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: String,
    pub namespace: String,
    pub display_name: String,
    pub role: Role,
    pub request_id: Option<String>,
}

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub agent_id: String,
    pub display_name: String,
    /// Empty: every scope the agent's role allows.
    pub scopes: Vec<String>,
    pub create_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    pub revoke_time: Option<DateTime<Utc>>,
    pub created_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: String,
    pub agent_id: String,
    pub secret_hash: Vec<u8>,
    pub display_name: String,
    pub scopes: Vec<String>,
    pub expire_time: Option<DateTime<Utc>>,
    pub created_by: Option<String>,
}

/// What authentication needs to know about a presented key, in one indexed lookup.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    pub key: ApiKey,
    pub secret_hash: Vec<u8>,
    pub agent: Agent,
}

/// One row of the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: Uuid,
    pub time: Option<DateTime<Utc>>,
    pub agent_id: Option<String>,
    pub namespace: Option<String>,
    pub method: String,
    pub resource_id: Option<String>,
    /// Canonical gRPC code name: `OK`, `PERMISSION_DENIED`, ...
    pub code: String,
    pub peer: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A successful change by `p` in namespace `ns` to `resource_id`.
    pub fn ok(p: &Principal, ns: &str, ctx: &RequestContext, resource_id: impl ToString) -> Self {
        Self {
            id: Uuid::now_v7(),
            time: None,
            agent_id: Some(p.agent_id.clone()),
            namespace: Some(ns.to_string()),
            method: ctx.method.clone(),
            resource_id: Some(resource_id.to_string()),
            code: "OK".into(),
            peer: ctx.peer.clone(),
            request_id: (!ctx.request_id.is_empty()).then(|| ctx.request_id.clone()),
            detail: None,
        }
    }
}

/// Filters of `ListAuditEvents`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuditFilter {
    pub agent_id: Option<String>,
    pub namespace: Option<String>,
    pub method: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
}

/// Appends one audit row on `conn` — inside the caller's transaction when it has one, so the
/// row exists exactly when the change does.
pub async fn record_audit(conn: &mut PgConnection, event: &AuditEvent) -> Result<()> {
    static INSERT: LazyLock<String> = LazyLock::new(|| audit_insert_sql(1, None));
    bind_audit(sqlx::query(INSERT.as_str()), Some(event)).execute(conn).await?;
    Ok(())
}

/// The statement of [`record_audit`], with the event in parameters `$first` to `$first + 9`
/// (bound by [`bind_audit`]); it writes no row when `None` was bound. A statement that makes a
/// change can so write its audit row itself, in a data-modifying CTE. With `source`, the name of
/// a relation of that statement with a `resource_id` column, one row is written per row of it
/// (none when it is empty), naming that `resource_id` when the event names none.
pub(crate) fn audit_insert_sql(first: usize, source: Option<&str>) -> String {
    let [id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail] =
        std::array::from_fn(|i| format!("${}", first + i));
    let (from, resource_id) = match source {
        None => (String::new(), resource_id),
        Some(rel) => (format!("FROM {rel}"), format!("coalesce({resource_id}, {rel}.resource_id)")),
    };
    format!(
        "INSERT INTO audit_events (id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail) \
         SELECT {id}, coalesce({time}, clock_timestamp()), {agent_id}, {namespace}, {method}, {resource_id}, {code}, {peer}, \
           {request_id}, {detail} \
         {from} WHERE {id} IS NOT NULL"
    )
}

/// Binds the ten parameters of [`audit_insert_sql`]: the event's fields, or NULLs for `None`.
pub(crate) fn bind_audit<'q>(
    query: Query<'q, Postgres, PgArguments>,
    event: Option<&'q AuditEvent>,
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(event.map(|e| e.id))
        .bind(event.and_then(|e| e.time))
        .bind(event.and_then(|e| e.agent_id.as_deref()))
        .bind(event.and_then(|e| e.namespace.as_deref()))
        .bind(event.map(|e| e.method.as_str()))
        .bind(event.and_then(|e| e.resource_id.as_deref()))
        .bind(event.map(|e| e.code.as_str()))
        .bind(event.and_then(|e| e.peer.as_deref()))
        .bind(event.and_then(|e| e.request_id.as_deref()))
        .bind(event.and_then(|e| e.detail.as_deref()))
}

/// Appends many audit events with multi-row INSERTs (inside the caller's transaction).
pub async fn record_audits(conn: &mut PgConnection, events: &[AuditEvent]) -> Result<()> {
    // 10 parameters per row; PostgreSQL allows 65,535 per statement.
    for chunk in events.chunks(1000) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO audit_events (id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail) ",
        );
        qb.push_values(chunk, |mut row, event| {
            row.push_bind(event.id)
                .push("coalesce(")
                .push_bind_unseparated(event.time)
                .push_unseparated(", clock_timestamp())")
                .push_bind(&event.agent_id)
                .push_bind(&event.namespace)
                .push_bind(&event.method)
                .push_bind(&event.resource_id)
                .push_bind(&event.code)
                .push_bind(&event.peer)
                .push_bind(&event.request_id)
                .push_bind(&event.detail);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

const AGENT_COLUMNS: &str =
    "a.id, a.namespace, a.display_name, a.role, a.status, a.create_time, a.update_time, a.version";
const KEY_COLUMNS: &str = "k.id AS key_id, k.agent_id, k.display_name AS key_display_name, k.scopes, k.create_time AS key_create_time, \
     k.expire_time, k.revoke_time, k.created_by";

fn agent_from_row(row: &PgRow) -> Result<Agent> {
    let role: i16 = row.try_get("role")?;
    let status: i16 = row.try_get("status")?;
    Ok(Agent {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        display_name: row.try_get("display_name")?,
        role: Role::from_i16(role).ok_or_else(|| Error::internal(format!("stored role {role} is unknown")))?,
        status: AgentStatus::from_i16(status)
            .ok_or_else(|| Error::internal(format!("stored agent status {status} is unknown")))?,
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
        version: row.try_get("version")?,
    })
}

fn key_from_row(row: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: row.try_get("key_id")?,
        agent_id: row.try_get("agent_id")?,
        display_name: row.try_get("key_display_name")?,
        scopes: row.try_get("scopes")?,
        create_time: row.try_get("key_create_time")?,
        expire_time: row.try_get("expire_time")?,
        revoke_time: row.try_get("revoke_time")?,
        created_by: row.try_get("created_by")?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        id: row.try_get("id")?,
        time: Some(row.try_get("time")?),
        agent_id: row.try_get("agent_id")?,
        namespace: row.try_get("namespace")?,
        method: row.try_get("method")?,
        resource_id: row.try_get("resource_id")?,
        code: row.try_get("code")?,
        peer: row.try_get("peer")?,
        request_id: row.try_get("request_id")?,
        detail: row.try_get("detail")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Agents, API keys and the audit log.
#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Creates an agent; a retry with the same `request_id` by the same creator returns the first
    /// result. ALREADY_EXISTS when the id is taken.
    async fn create_agent(&self, new: &NewAgent, audit: Option<&AuditEvent>) -> Result<Agent>;
    async fn get_agent(&self, id: &str) -> Result<Option<Agent>>;
    /// One page of agents ordered by id, in one namespace or in all.
    async fn list_agents(&self, namespace: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<Agent>>;
    /// Changes display name and/or status; ABORTED on a stale version, NOT_FOUND when absent.
    async fn update_agent(
        &self,
        id: &str,
        expected_version: Option<i64>,
        display_name: Option<&str>,
        status: Option<AgentStatus>,
        audit: &AuditEvent,
    ) -> Result<Agent>;
    /// ALREADY_EXISTS when the id is taken, NOT_FOUND when the agent does not exist.
    async fn create_api_key(&self, key: &NewApiKey, audit: Option<&AuditEvent>) -> Result<ApiKey>;
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>>;
    /// One page of an agent's keys, newest first (create_time DESC, id DESC); revoked ones only
    /// when asked. `after` is the last (create_time, id) of the previous page.
    async fn list_api_keys(
        &self,
        agent_id: &str,
        include_revoked: bool,
        after: Option<(DateTime<Utc>, &str)>,
        limit: usize,
    ) -> Result<Vec<ApiKey>>;
    /// Revokes a key (idempotent: a revoked key keeps its first revoke time).
    async fn revoke_api_key(&self, id: &str, audit: &AuditEvent) -> Result<ApiKey>;
    /// The key with this id and its agent (no cache: revocation and suspension are effective at once).
    async fn lookup_api_key(&self, key_id: &str) -> Result<Option<KeyLookup>>;
    /// Creates or updates the bootstrap admin and its key (TMWS_BOOTSTRAP_ADMIN_KEY). Refuses a
    /// key id that belongs to another agent.
    async fn upsert_bootstrap_admin(
        &self,
        agent_id: &str,
        namespace: &str,
        key_id: &str,
        secret_hash: &[u8],
    ) -> Result<()>;
    /// Appends audit rows outside any transaction (failed calls, authentication failures).
    async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<()>;
    /// One page of audit events, newest first (time DESC, id DESC).
    async fn list_audit_events(
        &self,
        f: &AuditFilter,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>>;
    /// Deletes up to `batch` audit rows older than `before`; returns how many.
    async fn sweep_audit(&self, before: DateTime<Utc>, batch: usize) -> Result<u64>;
}

#[async_trait]
impl IdentityStore for PgStore {
    /// Creates an agent; a retry with the same `request_id` by the same creator returns the first
    /// result. ALREADY_EXISTS when the id is taken.
    async fn create_agent(&self, new: &NewAgent, audit: Option<&AuditEvent>) -> Result<Agent> {
        let mut tx = self.pool().begin().await?;
        let created_by = audit.and_then(|a| a.agent_id.clone());
        if let Some(rid) = &new.request_id {
            let q = format!(
                "SELECT {AGENT_COLUMNS} FROM agents a WHERE a.created_by IS NOT DISTINCT FROM $1 AND a.request_id = $2"
            );
            if let Some(row) = sqlx::query(&q).bind(&created_by).bind(rid).fetch_optional(&mut *tx).await? {
                return agent_from_row(&row);
            }
        }
        let q = format!(
            "INSERT INTO agents AS a (id, namespace, display_name, role, created_by, request_id) VALUES ($1, $2, $3, $4, $5, $6) \
             RETURNING {AGENT_COLUMNS}"
        );
        let row = sqlx::query(&q)
            .bind(&new.id)
            .bind(&new.namespace)
            .bind(&new.display_name)
            .bind(new.role.as_i16())
            .bind(&created_by)
            .bind(&new.request_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists(format!("agent {:?} already exists", new.id))
                } else {
                    e.into()
                }
            })?;
        let agent = agent_from_row(&row)?;
        if let Some(a) = audit {
            record_audit(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(agent)
    }

    async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        let q = format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE a.id = $1");
        let row = sqlx::query(&q).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    /// One page of agents ordered by id, in one namespace or in all.
    async fn list_agents(&self, namespace: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<Agent>> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        qb.push(AGENT_COLUMNS);
        qb.push(" FROM agents a WHERE true");
        if let Some(ns) = namespace {
            qb.push(" AND a.namespace = ");
            qb.push_bind(ns);
        }
        if let Some(after) = after {
            qb.push(" AND a.id > ");
            qb.push_bind(after);
        }
        qb.push(" ORDER BY a.id LIMIT ");
        qb.push_bind(limit as i64);
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Changes display name and/or status; ABORTED on a stale version, NOT_FOUND when absent.
    async fn update_agent(
        &self,
        id: &str,
        expected_version: Option<i64>,
        display_name: Option<&str>,
        status: Option<AgentStatus>,
        audit: &AuditEvent,
    ) -> Result<Agent> {
        let mut tx = self.pool().begin().await?;
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM agents WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let version = version.ok_or_else(|| Error::not_found("agent", id))?;
        if let Some(v) = expected_version
            && v != version
        {
            return Err(Error::Aborted(format!(
                "etag mismatch: the agent changed (now v{version}); re-read it and retry"
            )));
        }
        let q = format!(
            "UPDATE agents AS a SET display_name = coalesce($2, a.display_name), status = coalesce($3, a.status), \
             version = a.version + 1, update_time = clock_timestamp() WHERE a.id = $1 RETURNING {AGENT_COLUMNS}"
        );
        let row = sqlx::query(&q)
            .bind(id)
            .bind(display_name)
            .bind(status.map(AgentStatus::as_i16))
            .fetch_one(&mut *tx)
            .await?;
        let agent = agent_from_row(&row)?;
        record_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn create_api_key(&self, key: &NewApiKey, audit: Option<&AuditEvent>) -> Result<ApiKey> {
        let mut tx = self.pool().begin().await?;
        let q = format!(
            "INSERT INTO api_keys AS k (id, agent_id, secret_hash, display_name, scopes, expire_time, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
        );
        let row = sqlx::query(&q)
            .bind(&key.id)
            .bind(&key.agent_id)
            .bind(&key.secret_hash)
            .bind(&key.display_name)
            .bind(&key.scopes)
            .bind(key.expire_time)
            .bind(&key.created_by)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists("an API key with this id already exists".into())
                } else if matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23503")) {
                    Error::not_found("agent", key.agent_id.clone())
                } else {
                    e.into()
                }
            })?;
        let out = key_from_row(&row)?;
        if let Some(a) = audit {
            record_audit(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let q = format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1");
        let row = sqlx::query(&q).bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// One page of an agent's keys, newest first; revoked ones only when asked.
    async fn list_api_keys(
        &self,
        agent_id: &str,
        include_revoked: bool,
        after: Option<(DateTime<Utc>, &str)>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        qb.push(KEY_COLUMNS);
        qb.push(" FROM api_keys k WHERE k.agent_id = ");
        qb.push_bind(agent_id);
        if !include_revoked {
            qb.push(" AND k.revoke_time IS NULL");
        }
        if let Some((t, id)) = after {
            qb.push(" AND (k.create_time, k.id) < (");
            qb.push_bind(t);
            qb.push(", ");
            qb.push_bind(id);
            qb.push(")");
        }
        qb.push(" ORDER BY k.create_time DESC, k.id DESC LIMIT ");
        qb.push_bind(limit as i64);
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Revokes a key (idempotent: a revoked key keeps its first revoke time).
    async fn revoke_api_key(&self, id: &str, audit: &AuditEvent) -> Result<ApiKey> {
        let mut tx = self.pool().begin().await?;
        let q = format!(
            "UPDATE api_keys AS k SET revoke_time = coalesce(k.revoke_time, clock_timestamp()) WHERE k.id = $1 RETURNING {KEY_COLUMNS}"
        );
        let row = sqlx::query(&q).bind(id).fetch_optional(&mut *tx).await?;
        let key = key_from_row(&row.ok_or_else(|| Error::not_found("api key", id))?)?;
        record_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// The key with this id and its agent (one primary-key lookup, no cache: revocation and
    /// suspension are effective at once on every replica).
    async fn lookup_api_key(&self, key_id: &str) -> Result<Option<KeyLookup>> {
        let q = format!(
            "SELECT {KEY_COLUMNS}, k.secret_hash, {AGENT_COLUMNS} FROM api_keys k JOIN agents a ON a.id = k.agent_id WHERE k.id = $1"
        );
        let Some(row) = sqlx::query(&q).bind(key_id).fetch_optional(self.pool()).await? else { return Ok(None) };
        Ok(Some(KeyLookup {
            key: key_from_row(&row)?,
            secret_hash: row.try_get("secret_hash")?,
            agent: agent_from_row(&row)?,
        }))
    }

    /// Creates or updates the bootstrap admin and its key (TMWS_BOOTSTRAP_ADMIN_KEY). Refuses a
    /// key id that belongs to another agent.
    async fn upsert_bootstrap_admin(
        &self,
        agent_id: &str,
        namespace: &str,
        key_id: &str,
        secret_hash: &[u8],
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO agents (id, namespace, display_name, role, status, created_by) VALUES ($1, $2, 'bootstrap admin', 1, 1, 'bootstrap') \
             ON CONFLICT (id) DO UPDATE SET namespace = EXCLUDED.namespace, role = 1, status = 1, \
             version = agents.version + 1, update_time = clock_timestamp() \
             WHERE agents.namespace <> EXCLUDED.namespace OR agents.role <> 1 OR agents.status <> 1",
        )
        .bind(agent_id)
        .bind(namespace)
        .execute(&mut *tx)
        .await?;
        let owner: Option<String> = sqlx::query_scalar("SELECT agent_id FROM api_keys WHERE id = $1 FOR UPDATE")
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
        match owner {
            Some(o) if o != agent_id => {
                return Err(Error::FailedPrecondition(format!(
                    "TMWS_BOOTSTRAP_ADMIN_KEY: key id {key_id} belongs to another agent"
                )));
            }
            Some(_) => {
                sqlx::query(
                    "UPDATE api_keys SET secret_hash = $2, revoke_time = NULL, expire_time = NULL, scopes = '{}' WHERE id = $1",
                )
                .bind(key_id)
                .bind(secret_hash)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO api_keys (id, agent_id, secret_hash, display_name, created_by) VALUES ($1, $2, $3, 'bootstrap', 'bootstrap')",
                )
                .bind(key_id)
                .bind(agent_id)
                .bind(secret_hash)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Appends audit rows outside any transaction (failed calls, authentication failures).
    async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool().acquire().await?;
        record_audits(&mut conn, events).await
    }

    /// One page of audit events, newest first.
    async fn list_audit_events(
        &self,
        f: &AuditFilter,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail FROM audit_events WHERE true",
        );
        if let Some(v) = &f.agent_id {
            qb.push(" AND agent_id = ");
            qb.push_bind(v);
        }
        if let Some(v) = &f.namespace {
            qb.push(" AND namespace = ");
            qb.push_bind(v);
        }
        if let Some(v) = &f.method {
            qb.push(" AND method = ");
            qb.push_bind(v);
        }
        if let Some(t) = f.start_time {
            qb.push(" AND time >= ");
            qb.push_bind(t);
        }
        if let Some(t) = f.end_time {
            qb.push(" AND time < ");
            qb.push_bind(t);
        }
        if let Some((t, id)) = after {
            qb.push(" AND (time, id) < (");
            qb.push_bind(t);
            qb.push(", ");
            qb.push_bind(id);
            qb.push(")");
        }
        qb.push(" ORDER BY time DESC, id DESC LIMIT ");
        qb.push_bind(limit as i64);
        let rows = qb.build().fetch_all(self.pool()).await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Deletes up to `batch` audit rows older than `before`; returns how many.
    async fn sweep_audit(&self, before: DateTime<Utc>, batch: usize) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM audit_events a USING (SELECT id FROM audit_events WHERE time < $1 LIMIT $2) old WHERE a.id = old.id",
        )
        .bind(before)
        .bind(batch as i64)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }
}
