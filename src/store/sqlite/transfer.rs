//! The embedded store's side of export/import (see `store::transfer` for the format).

use base64::Engine as _;
use serde_json::{Map, Value};
use sqlx::{Row, Sqlite, query::Query, sqlite::SqliteArguments, sqlite::SqliteRow};

use super::{SqliteStore, from_micros, micros};
use crate::{
    error::{Error, Result},
    store::transfer::{Column, Counts, Kind, RowStream, Table},
};

fn read(row: &SqliteRow, c: &Column) -> Result<Value> {
    let i = c.name;
    Ok(match c.kind {
        Kind::Text => row.try_get::<Option<String>, _>(i)?.map(Value::String).unwrap_or(Value::Null),
        Kind::Int => row.try_get::<Option<i64>, _>(i)?.map(Value::from).unwrap_or(Value::Null),
        Kind::Float => row.try_get::<Option<f64>, _>(i)?.map(Value::from).unwrap_or(Value::Null),
        Kind::Uuid => {
            row.try_get::<Option<uuid::Uuid>, _>(i)?.map(|u| Value::String(u.to_string())).unwrap_or(Value::Null)
        }
        Kind::Time => match row.try_get::<Option<i64>, _>(i)? {
            Some(us) => Value::String(from_micros(us)?.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            None => Value::Null,
        },
        Kind::Json | Kind::TextList | Kind::UuidList => match row.try_get::<Option<String>, _>(i)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| Error::internal(format!("stored {i}: {e}")))?,
            None => Value::Null,
        },
        Kind::Vector => match row.try_get::<Option<Vec<u8>>, _>(i)? {
            Some(bytes) => Value::Array(
                bytes
                    .chunks_exact(4)
                    .map(|b| Value::from(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))))
                    .collect(),
            ),
            None => Value::Null,
        },
        Kind::Bytes => row
            .try_get::<Option<Vec<u8>>, _>(i)?
            .map(|b| Value::String(base64::engine::general_purpose::STANDARD.encode(b)))
            .unwrap_or(Value::Null),
    })
}

fn bind<'q>(
    q: Query<'q, Sqlite, SqliteArguments<'q>>,
    t: &Table,
    c: &Column,
    v: Value,
) -> Result<Query<'q, Sqlite, SqliteArguments<'q>>> {
    let bad = |what: &str| Error::invalid(t.name, format!("{}: {what}", c.name));
    if v.is_null() {
        return Ok(match c.kind {
            Kind::Int | Kind::Time => q.bind(None::<i64>),
            Kind::Float => q.bind(None::<f64>),
            Kind::Uuid | Kind::Vector | Kind::Bytes => q.bind(None::<Vec<u8>>),
            _ => q.bind(None::<String>),
        });
    }
    Ok(match c.kind {
        Kind::Text => q.bind(v.as_str().ok_or_else(|| bad("expected a string"))?.to_string()),
        Kind::Int => q.bind(v.as_i64().ok_or_else(|| bad("expected an integer"))?),
        Kind::Float => q.bind(v.as_f64().ok_or_else(|| bad("expected a number"))?),
        Kind::Uuid => {
            q.bind(v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()).ok_or_else(|| bad("expected a UUID string"))?)
        }
        Kind::Time => {
            let s = v.as_str().ok_or_else(|| bad("expected an RFC 3339 time"))?;
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| bad("expected an RFC 3339 time"))?;
            q.bind(micros(t.with_timezone(&chrono::Utc)))
        }
        Kind::Json => q.bind(v.to_string()),
        Kind::TextList | Kind::UuidList => {
            if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                return Err(bad("expected an array of strings"));
            }
            q.bind(v.to_string())
        }
        Kind::Vector => {
            let a = v.as_array().ok_or_else(|| bad("expected an array of numbers"))?;
            let mut bytes = Vec::with_capacity(a.len() * 4);
            for x in a {
                let f = x.as_f64().ok_or_else(|| bad("expected an array of numbers"))? as f32;
                bytes.extend_from_slice(&f.to_le_bytes());
            }
            q.bind(bytes)
        }
        Kind::Bytes => q.bind(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().ok_or_else(|| bad("expected base64"))?)
                .map_err(|_| bad("expected base64"))?,
        ),
    })
}

/// The SELECT of one exported table. Two tables differ from the portable columns: a memory's
/// vector lives in `memory_vectors`, and grants address memories by their integer `seq`.
fn export_select(t: &Table) -> String {
    match t.name {
        "memories" => {
            let cols: Vec<String> = t
                .columns
                .iter()
                .map(
                    |c| if c.name == "embedding" { "v.embedding AS embedding".into() } else { format!("m.{}", c.name) },
                )
                .collect();
            format!(
                "SELECT {} FROM memories m LEFT JOIN memory_vectors v ON v.memory = m.seq ORDER BY m.id LIMIT ?1 OFFSET ?2",
                cols.join(", ")
            )
        }
        "memory_grants" => "SELECT m.id AS memory_id, g.agent_id, g.permission, g.expire_time, g.create_time \
             FROM memory_grants g JOIN memories m ON m.seq = g.memory ORDER BY m.id, g.agent_id LIMIT ?1 OFFSET ?2"
            .into(),
        _ => format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT ?1 OFFSET ?2",
            t.column_list(),
            t.name,
            t.filter,
            t.key.join(", ")
        ),
    }
}

/// The INSERT of one imported row (columns bound in `t.columns` order, except as noted).
fn import_insert(t: &Table) -> String {
    let placeholders = |n: usize| (1..=n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    match t.name {
        // The vector is bound last, for the second statement (see `import_table_rows`).
        "memories" => {
            let cols: Vec<&str> = t.columns.iter().map(|c| c.name).filter(|n| *n != "embedding").collect();
            format!("INSERT OR IGNORE INTO memories ({}) VALUES ({})", cols.join(", "), placeholders(cols.len()))
        }
        "memory_grants" => {
            "INSERT OR IGNORE INTO memory_grants (memory, agent_id, permission, expire_time, create_time) \
             VALUES ((SELECT seq FROM memories WHERE id = ?1), ?2, ?3, ?4, ?5)"
                .into()
        }
        _ => {
            format!("INSERT OR IGNORE INTO {} ({}) VALUES ({})", t.name, t.column_list(), placeholders(t.columns.len()))
        }
    }
}

impl SqliteStore {
    pub(crate) async fn export_table(&self, t: &Table, offset: u64, limit: u64) -> Result<Vec<Map<String, Value>>> {
        let q = export_select(t);
        let rows = sqlx::query(&q).bind(limit as i64).bind(offset as i64).fetch_all(self.reader()).await?;
        rows.iter()
            .map(|row| {
                let mut m = Map::new();
                for c in t.columns {
                    m.insert(c.name.to_string(), read(row, c)?);
                }
                Ok(m)
            })
            .collect()
    }

    pub(crate) async fn unfinished(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(crate::store::transfer::COUNT_UNFINISHED).fetch_one(self.reader()).await?;
        Ok(n as u64)
    }

    pub(crate) async fn import_table_rows(&self, mut rows: RowStream) -> Result<Counts> {
        let mut counts = Counts::default();
        let mut tx = self.writer().begin().await?;
        while let Some(item) = rows.recv().await {
            let (t, mut row) = item?;
            let sql = import_insert(t);
            let mut q = sqlx::query(&sql);
            let memory_id = row.get("id").and_then(Value::as_str).and_then(|s| uuid::Uuid::parse_str(s).ok());
            let mut vector = None;
            for c in t.columns {
                let v = row.remove(c.name).unwrap_or(Value::Null);
                if t.name == "memories" && c.name == "embedding" {
                    vector = Some((c, v));
                    continue;
                }
                q = bind(q, t, c, v)?;
            }
            let as_invalid = |e: sqlx::Error| match &e {
                sqlx::Error::Database(db) => Error::invalid(t.name, db.message().to_string()),
                _ => e.into(),
            };
            let done = q.execute(&mut *tx).await.map_err(as_invalid)?.rows_affected();
            if done == 1
                && let Some((c, v)) = vector.filter(|(_, v)| !v.is_null())
            {
                let id = memory_id.ok_or_else(|| Error::invalid(t.name, "id: expected a UUID string"))?;
                let insert = sqlx::query(
                    "INSERT INTO memory_vectors (memory, embedding) VALUES ((SELECT seq FROM memories WHERE id = ?1), ?2)",
                )
                .bind(id);
                bind(insert, t, c, v)?.execute(&mut *tx).await.map_err(as_invalid)?;
            }
            let slot = if done == 1 { &mut counts.rows } else { &mut counts.skipped };
            *slot.entry(t.name.to_string()).or_default() += 1;
        }
        self.after_import(&mut tx).await?;
        tx.commit().await?;
        self.vectors_invalidate();
        Ok(counts)
    }
}
