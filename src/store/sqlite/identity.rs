//! Agents, API keys and the audit log in the embedded store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, sqlite::SqliteRow};
use uuid::Uuid;

use super::{SqliteStore, from_micros, micros, now_micros};
use crate::{
    auth::{AgentStatus, Role},
    error::{Error, Result},
    store::identity::{Agent, ApiKey, AuditEvent, AuditFilter, IdentityStore, KeyLookup, NewAgent, NewApiKey},
};

/// Appends one audit row on `conn` — inside the caller's transaction, so the row exists exactly
/// when the change does.
pub async fn record_audit(conn: &mut SqliteConnection, event: &AuditEvent) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .bind(event.id)
    .bind(event.time.map(micros).unwrap_or_else(now_micros))
    .bind(&event.agent_id)
    .bind(&event.namespace)
    .bind(&event.method)
    .bind(&event.resource_id)
    .bind(&event.code)
    .bind(&event.peer)
    .bind(&event.request_id)
    .bind(&event.detail)
    .execute(conn)
    .await?;
    Ok(())
}

const AGENT_COLUMNS: &str =
    "a.id, a.namespace, a.display_name, a.role, a.status, a.create_time, a.update_time, a.version";
const KEY_COLUMNS: &str = "k.id AS key_id, k.agent_id, k.display_name AS key_display_name, k.scopes, \
     k.create_time AS key_create_time, k.expire_time, k.revoke_time, k.created_by";

fn agent_from_row(row: &SqliteRow) -> Result<Agent> {
    let role: i16 = row.try_get("role")?;
    let status: i16 = row.try_get("status")?;
    Ok(Agent {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        display_name: row.try_get("display_name")?,
        role: Role::from_i16(role).ok_or_else(|| Error::internal(format!("stored role {role} is unknown")))?,
        status: AgentStatus::from_i16(status)
            .ok_or_else(|| Error::internal(format!("stored agent status {status} is unknown")))?,
        create_time: from_micros(row.try_get("create_time")?)?,
        update_time: from_micros(row.try_get("update_time")?)?,
        version: row.try_get("version")?,
    })
}

fn opt_time(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<i64>, _>(col)?.map(from_micros).transpose()
}

fn key_from_row(row: &SqliteRow) -> Result<ApiKey> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKey {
        id: row.try_get("key_id")?,
        agent_id: row.try_get("agent_id")?,
        display_name: row.try_get("key_display_name")?,
        scopes: serde_json::from_str(&scopes).map_err(|e| Error::internal(format!("stored scopes: {e}")))?,
        create_time: from_micros(row.try_get("key_create_time")?)?,
        expire_time: opt_time(row, "expire_time")?,
        revoke_time: opt_time(row, "revoke_time")?,
        created_by: row.try_get("created_by")?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        id: row.try_get("id")?,
        time: Some(from_micros(row.try_get("time")?)?),
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
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

impl SqliteStore {
    async fn agent_in(conn: &mut SqliteConnection, id: &str) -> Result<Option<Agent>> {
        let q = format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE a.id = ?1");
        let row = sqlx::query(&q).bind(id).fetch_optional(conn).await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn key_in(conn: &mut SqliteConnection, id: &str) -> Result<Option<ApiKey>> {
        let q = format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = ?1");
        let row = sqlx::query(&q).bind(id).fetch_optional(conn).await?;
        row.as_ref().map(key_from_row).transpose()
    }
}

#[async_trait]
impl IdentityStore for SqliteStore {
    async fn create_agent(&self, new: &NewAgent, audit: Option<&AuditEvent>) -> Result<Agent> {
        let mut tx = self.writer().begin().await?;
        let created_by = audit.and_then(|a| a.agent_id.clone());
        if let Some(rid) = &new.request_id {
            let q = format!(
                "SELECT {AGENT_COLUMNS} FROM agents a WHERE coalesce(a.created_by, '') = coalesce(?1, '') AND a.request_id = ?2"
            );
            if let Some(row) = sqlx::query(&q).bind(&created_by).bind(rid).fetch_optional(&mut *tx).await? {
                return agent_from_row(&row);
            }
        }
        let now = now_micros();
        sqlx::query(
            "INSERT INTO agents (id, namespace, display_name, role, created_by, request_id, create_time, update_time) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        )
        .bind(&new.id)
        .bind(&new.namespace)
        .bind(&new.display_name)
        .bind(new.role.as_i16())
        .bind(&created_by)
        .bind(&new.request_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!("agent {:?} already exists", new.id))
            } else {
                e.into()
            }
        })?;
        let agent = Self::agent_in(&mut tx, &new.id).await?.ok_or_else(|| Error::internal("agent vanished"))?;
        if let Some(a) = audit {
            record_audit(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(agent)
    }

    async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        let mut conn = self.reader().acquire().await?;
        Self::agent_in(&mut conn, id).await
    }

    async fn list_agents(&self, namespace: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<Agent>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        qb.push(AGENT_COLUMNS);
        qb.push(" FROM agents a WHERE 1");
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
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn update_agent(
        &self,
        id: &str,
        expected_version: Option<i64>,
        display_name: Option<&str>,
        status: Option<AgentStatus>,
        audit: &AuditEvent,
    ) -> Result<Agent> {
        let mut tx = self.writer().begin().await?;
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM agents WHERE id = ?1").bind(id).fetch_optional(&mut *tx).await?;
        let version = version.ok_or_else(|| Error::not_found("agent", id))?;
        if let Some(v) = expected_version
            && v != version
        {
            return Err(Error::Aborted(format!(
                "etag mismatch: the agent changed (now v{version}); re-read it and retry"
            )));
        }
        sqlx::query(
            "UPDATE agents SET display_name = coalesce(?2, display_name), status = coalesce(?3, status), \
             version = version + 1, update_time = ?4 WHERE id = ?1",
        )
        .bind(id)
        .bind(display_name)
        .bind(status.map(AgentStatus::as_i16))
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        let agent = Self::agent_in(&mut tx, id).await?.ok_or_else(|| Error::not_found("agent", id))?;
        record_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn create_api_key(&self, key: &NewApiKey, audit: Option<&AuditEvent>) -> Result<ApiKey> {
        let mut tx = self.writer().begin().await?;
        let scopes = serde_json::to_string(&key.scopes).map_err(|e| Error::internal(e.to_string()))?;
        sqlx::query(
            "INSERT INTO api_keys (id, agent_id, secret_hash, display_name, scopes, expire_time, created_by, create_time) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(&key.id)
        .bind(&key.agent_id)
        .bind(&key.secret_hash)
        .bind(&key.display_name)
        .bind(scopes)
        .bind(key.expire_time.map(micros))
        .bind(&key.created_by)
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists("an API key with this id already exists".into())
            } else if is_foreign_key_violation(&e) {
                Error::not_found("agent", key.agent_id.clone())
            } else {
                e.into()
            }
        })?;
        let out = Self::key_in(&mut tx, &key.id).await?.ok_or_else(|| Error::internal("api key vanished"))?;
        if let Some(a) = audit {
            record_audit(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let mut conn = self.reader().acquire().await?;
        Self::key_in(&mut conn, id).await
    }

    async fn list_api_keys(
        &self,
        agent_id: &str,
        include_revoked: bool,
        after: Option<(DateTime<Utc>, &str)>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        qb.push(KEY_COLUMNS);
        qb.push(" FROM api_keys k WHERE k.agent_id = ");
        qb.push_bind(agent_id);
        if !include_revoked {
            qb.push(" AND k.revoke_time IS NULL");
        }
        if let Some((t, id)) = after {
            qb.push(" AND (k.create_time, k.id) < (");
            qb.push_bind(micros(t));
            qb.push(", ");
            qb.push_bind(id);
            qb.push(")");
        }
        qb.push(" ORDER BY k.create_time DESC, k.id DESC LIMIT ");
        qb.push_bind(limit as i64);
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_api_key(&self, id: &str, audit: &AuditEvent) -> Result<ApiKey> {
        let mut tx = self.writer().begin().await?;
        let n = sqlx::query("UPDATE api_keys SET revoke_time = coalesce(revoke_time, ?2) WHERE id = ?1")
            .bind(id)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("api key", id));
        }
        let key = Self::key_in(&mut tx, id).await?.ok_or_else(|| Error::not_found("api key", id))?;
        record_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn lookup_api_key(&self, key_id: &str) -> Result<Option<KeyLookup>> {
        let q = format!(
            "SELECT {KEY_COLUMNS}, k.secret_hash, {AGENT_COLUMNS} FROM api_keys k JOIN agents a ON a.id = k.agent_id WHERE k.id = ?1"
        );
        let Some(row) = sqlx::query(&q).bind(key_id).fetch_optional(self.reader()).await? else { return Ok(None) };
        Ok(Some(KeyLookup {
            key: key_from_row(&row)?,
            secret_hash: row.try_get("secret_hash")?,
            agent: agent_from_row(&row)?,
        }))
    }

    async fn upsert_bootstrap_admin(
        &self,
        agent_id: &str,
        namespace: &str,
        key_id: &str,
        secret_hash: &[u8],
    ) -> Result<()> {
        let mut tx = self.writer().begin().await?;
        let now = now_micros();
        sqlx::query(
            "INSERT INTO agents (id, namespace, display_name, role, status, created_by, create_time, update_time) \
             VALUES (?1, ?2, 'bootstrap admin', 1, 1, 'bootstrap', ?3, ?3) \
             ON CONFLICT (id) DO UPDATE SET namespace = excluded.namespace, role = 1, status = 1, \
             version = agents.version + 1, update_time = excluded.update_time \
             WHERE agents.namespace <> excluded.namespace OR agents.role <> 1 OR agents.status <> 1",
        )
        .bind(agent_id)
        .bind(namespace)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let owner: Option<String> = sqlx::query_scalar("SELECT agent_id FROM api_keys WHERE id = ?1")
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
                    "UPDATE api_keys SET secret_hash = ?2, revoke_time = NULL, expire_time = NULL, scopes = '[]' WHERE id = ?1",
                )
                .bind(key_id)
                .bind(secret_hash)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO api_keys (id, agent_id, secret_hash, display_name, created_by, create_time) \
                     VALUES (?1, ?2, ?3, 'bootstrap', 'bootstrap', ?4)",
                )
                .bind(key_id)
                .bind(agent_id)
                .bind(secret_hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer().begin().await?;
        for e in events {
            record_audit(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit_events(
        &self,
        f: &AuditFilter,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT id, time, agent_id, namespace, method, resource_id, code, peer, request_id, detail FROM audit_events WHERE 1",
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
            qb.push_bind(micros(t));
        }
        if let Some(t) = f.end_time {
            qb.push(" AND time < ");
            qb.push_bind(micros(t));
        }
        if let Some((t, id)) = after {
            qb.push(" AND (time, id) < (");
            qb.push_bind(micros(t));
            qb.push(", ");
            qb.push_bind(id);
            qb.push(")");
        }
        qb.push(" ORDER BY time DESC, id DESC LIMIT ");
        qb.push_bind(limit as i64);
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn sweep_audit(&self, before: DateTime<Utc>, batch: usize) -> Result<u64> {
        let n =
            sqlx::query("DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE time < ?1 LIMIT ?2)")
                .bind(micros(before))
                .bind(batch as i64)
                .execute(self.writer())
                .await?
                .rows_affected();
        Ok(n)
    }
}
