//! `tmws export` / `tmws import`: the stored state as JSON lines, portable between backends.
//!
//! The format is one JSON object per line. The first line is a header
//! (`{"format":"tmws-export","version":1,...}`); every other line is one row:
//! `{"table":"memories","row":{...}}`, with the columns of the PostgreSQL schema (a memory row
//! also carries `access_count` and `last_access_time`, which PostgreSQL keeps in
//! `memory_access`) and portable values: times as RFC 3339 strings, UUIDs as strings, JSON
//! documents as JSON, string lists and UUID lists as arrays, vectors as arrays of numbers, bytes
//! as base64.
//!
//! What is exported: agents and API keys (secret hashes only), memories with their embeddings and
//! grants, workflow definitions (every version), and the runs that reached a final state with
//! their tasks, attempts and event logs, plus finished standalone tasks. Runs still in progress
//! and unfinished standalone tasks are not exported (they are counted): finish or cancel them
//! first. Derived data (full-text indexes, vector indexes) is rebuilt by the target.
//!
//! Import writes everything in one transaction; rows whose key already exists are kept as they
//! are and counted as skipped, so importing the same file twice changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a column's value is represented (portable form ↔ each backend's storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    Float,
    Uuid,
    Time,
    Json,
    /// A list of strings (`text[]` / JSON array).
    TextList,
    /// A list of UUIDs (`uuid[]` / JSON array).
    UuidList,
    /// An embedding (`vector` / little-endian f32 blob), as an array of numbers.
    Vector,
    /// Bytes, base64 in the portable form.
    Bytes,
}

pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
}

pub struct Table {
    pub name: &'static str,
    pub columns: &'static [Column],
    /// Primary key columns (export order, conflict target).
    pub key: &'static [&'static str],
    /// Which rows are exported (portable SQL, valid on both backends).
    pub filter: &'static str,
}

impl Table {
    pub fn column_list(&self) -> String {
        self.columns.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    }
}

const fn c(name: &'static str, kind: Kind) -> Column {
    Column { name, kind }
}

use Kind::*;

/// Final run states: succeeded 3, failed 4, cancelled 5, timed out 6. (Macros, so the filters
/// below are composed at compile time.)
macro_rules! final_runs {
    () => {
        "status IN (3, 4, 5, 6)"
    };
}
/// Exported tasks: those of exported runs, and finished standalone tasks (succeeded 4, failed 5,
/// cancelled 6, skipped 7).
macro_rules! exported_tasks {
    () => {
        concat!(
            "(run_id IS NULL AND status IN (4, 5, 6, 7)) OR run_id IN (SELECT id FROM runs WHERE ",
            final_runs!(),
            ")"
        )
    };
}

/// Runs not in a final state plus unfinished standalone tasks: what an export leaves out
/// (portable SQL, valid on both backends).
pub const COUNT_UNFINISHED: &str = concat!(
    "SELECT (SELECT count(*) FROM runs WHERE NOT (",
    final_runs!(),
    ")) + (SELECT count(*) FROM tasks WHERE run_id IS NULL AND status NOT IN (4, 5, 6, 7))"
);

/// Every exported table, in an order that satisfies foreign keys on import.
pub static TABLES: &[Table] = &[
    Table {
        name: "agents",
        columns: &[
            c("id", Text),
            c("namespace", Text),
            c("display_name", Text),
            c("role", Int),
            c("status", Int),
            c("create_time", Time),
            c("update_time", Time),
            c("version", Int),
            c("created_by", Text),
            c("request_id", Text),
        ],
        key: &["id"],
        filter: "1 = 1",
    },
    Table {
        name: "api_keys",
        columns: &[
            c("id", Text),
            c("agent_id", Text),
            c("secret_hash", Bytes),
            c("display_name", Text),
            c("scopes", TextList),
            c("create_time", Time),
            c("expire_time", Time),
            c("revoke_time", Time),
            c("created_by", Text),
        ],
        key: &["id"],
        filter: "1 = 1",
    },
    Table {
        name: "memories",
        columns: &[
            c("id", Uuid),
            c("namespace", Text),
            c("owner", Text),
            c("content", Text),
            c("summary", Text),
            c("kind", Text),
            c("tags", TextList),
            c("metadata", Json),
            c("importance", Float),
            c("access_level", Int),
            c("parent_id", Uuid),
            c("embedding_model", Text),
            c("embedding_dim", Int),
            c("embedding", Vector),
            c("create_time", Time),
            c("update_time", Time),
            c("expire_time", Time),
            c("access_count", Int),
            c("last_access_time", Time),
            c("version", Int),
            c("request_id", Text),
        ],
        key: &["id"],
        filter: "1 = 1",
    },
    Table {
        name: "memory_grants",
        columns: &[
            c("memory_id", Uuid),
            c("agent_id", Text),
            c("permission", Int),
            c("expire_time", Time),
            c("create_time", Time),
        ],
        key: &["memory_id", "agent_id"],
        filter: "1 = 1",
    },
    Table {
        name: "workflows",
        columns: &[
            c("id", Uuid),
            c("namespace", Text),
            c("name", Text),
            c("version", Int),
            c("description", Text),
            c("definition", Json),
            c("labels", Json),
            c("created_by", Text),
            c("request_id", Text),
            c("create_time", Time),
            c("delete_time", Time),
        ],
        key: &["id"],
        filter: "1 = 1",
    },
    Table {
        name: "runs",
        columns: &[
            c("id", Uuid),
            c("namespace", Text),
            c("workflow_id", Uuid),
            c("workflow_name", Text),
            c("workflow_version", Int),
            c("input", Json),
            c("status", Int),
            c("output", Json),
            c("error", Text),
            c("created_by", Text),
            c("request_id", Text),
            c("create_time", Time),
            c("start_time", Time),
            c("end_time", Time),
            c("deadline", Time),
            c("last_sequence", Int),
            c("trace_parent", Text),
        ],
        key: &["id"],
        filter: final_runs!(),
    },
    Table {
        name: "tasks",
        columns: &[
            c("id", Uuid),
            c("namespace", Text),
            c("run_id", Uuid),
            c("step_id", Text),
            c("kind", Int),
            c("title", Text),
            c("description", Text),
            c("queue", Text),
            c("priority", Int),
            c("depends_on", UuidList),
            c("condition", Int),
            c("config", Json),
            c("status", Int),
            c("attempt", Int),
            c("max_attempts", Int),
            c("initial_backoff_ms", Int),
            c("max_backoff_ms", Int),
            c("backoff_multiplier", Float),
            c("attempt_timeout_ms", Int),
            c("input", Json),
            c("output", Json),
            c("error", Text),
            c("progress", Json),
            c("worker_id", Text),
            c("available_time", Time),
            c("due_time", Time),
            c("created_by", Text),
            c("request_id", Text),
            c("create_time", Time),
            c("update_time", Time),
        ],
        key: &["id"],
        filter: exported_tasks!(),
    },
    Table {
        name: "task_attempts",
        columns: &[
            c("task_id", Uuid),
            c("attempt", Int),
            c("worker_id", Text),
            c("start_time", Time),
            c("end_time", Time),
            c("status", Int),
            c("error", Text),
        ],
        key: &["task_id", "attempt"],
        filter: concat!("task_id IN (SELECT id FROM tasks WHERE ", exported_tasks!(), ")"),
    },
    Table {
        name: "run_events",
        columns: &[c("run_id", Uuid), c("sequence", Int), c("time", Time), c("payload", Json)],
        key: &["run_id", "sequence"],
        filter: concat!("run_id IN (SELECT id FROM runs WHERE ", final_runs!(), ")"),
    },
];

pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

/// The first line of an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub backend: String,
    pub exported_at: chrono::DateTime<chrono::Utc>,
    pub tmws_version: String,
}

pub const FORMAT: &str = "tmws-export";
pub const VERSION: u32 = 1;

/// One row line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowLine {
    pub table: String,
    pub row: Map<String, Value>,
}

/// What an export or import did, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Rows written (export) or inserted (import) per table.
    pub rows: BTreeMap<String, u64>,
    /// Import: rows already present (same key), left as they were.
    pub skipped: BTreeMap<String, u64>,
    /// Export: runs still in progress and unfinished standalone tasks, not exported.
    pub unfinished: u64,
}

/// Rejects a row with a clear message (import input is user-supplied).
fn bad(table: &str, msg: impl std::fmt::Display) -> crate::error::Error {
    crate::error::Error::invalid(table, msg.to_string())
}

/// Rows on their way to `import_rows`: a reader task parses lines while the backend writes.
pub type RowStream = tokio::sync::mpsc::Receiver<crate::error::Result<(&'static Table, Map<String, Value>)>>;

/// Checks a row line against the table's columns: every key must be a known column.
pub fn check_row(table: &Table, row: &Map<String, Value>) -> crate::error::Result<()> {
    for name in row.keys() {
        if !table.columns.iter().any(|c| c.name == name) {
            return Err(bad(table.name, format!("unknown column {name:?}")));
        }
    }
    for key in table.key {
        if row.get(*key).is_none_or(Value::is_null) {
            return Err(bad(table.name, format!("a row lacks its key column {key:?}")));
        }
    }
    Ok(())
}

pub mod postgres {
    //! The PostgreSQL side of export/import.
    use base64::Engine as _;
    use serde_json::{Map, Value};
    use sqlx::PgPool;

    use super::{Counts, Kind, Table, bad};
    use crate::error::Result;

    fn select_expr(c: &super::Column) -> String {
        match c.kind {
            Kind::Vector => format!("'{0}', {0}::real[]", c.name),
            Kind::Bytes => format!("'{0}', encode({0}, 'base64')", c.name),
            _ => format!("'{0}', {0}", c.name),
        }
    }

    /// Columns of the portable `memories` row that PostgreSQL keeps in `memory_access`.
    const ACCESS_COLUMNS: [&str; 2] = ["access_count", "last_access_time"];

    /// Where a table's portable rows are read from: `memories` joined with its read counts.
    fn source(t: &Table) -> &'static str {
        if t.name == "memories" {
            "(SELECT m.*, coalesce(a.access_count, 0) AS access_count, a.last_access_time FROM memories m \
             LEFT JOIN memory_access a ON a.memory_id = m.id) memories"
        } else {
            t.name
        }
    }

    pub async fn export_rows(pool: &PgPool, t: &Table, offset: u64, limit: u64) -> Result<Vec<Map<String, Value>>> {
        let fields: Vec<String> = t.columns.iter().map(select_expr).collect();
        let q = format!(
            "SELECT jsonb_build_object({}) FROM {} WHERE {} ORDER BY {} OFFSET $1 LIMIT $2",
            fields.join(", "),
            source(t),
            t.filter,
            t.key.join(", ")
        );
        let rows: Vec<Value> = sqlx::query_scalar(&q).bind(offset as i64).bind(limit as i64).fetch_all(pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect())
    }

    pub async fn count_unfinished(pool: &PgPool) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(super::COUNT_UNFINISHED).fetch_one(pool).await?;
        Ok(n as u64)
    }

    /// Portable value → what `jsonb_populate_record` reads for the column type.
    fn to_pg(t: &Table, c: &super::Column, v: Value) -> Result<Value> {
        Ok(match (c.kind, v) {
            (_, Value::Null) => Value::Null,
            (Kind::Bytes, Value::String(s)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| bad(t.name, format!("{}: not base64: {e}", c.name)))?;
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                Value::String(format!("\\x{hex}"))
            }
            (Kind::Vector, Value::Array(a)) => {
                let nums: Vec<String> =
                    a.iter().map(|x| x.as_f64().map(|f| f.to_string()).unwrap_or_default()).collect();
                if nums.iter().any(String::is_empty) {
                    return Err(bad(t.name, format!("{}: a vector holds a non-number", c.name)));
                }
                Value::String(format!("[{}]", nums.join(",")))
            }
            (_, v) => v,
        })
    }

    pub async fn import_rows(pool: &PgPool, mut rows: super::RowStream) -> Result<Counts> {
        let mut counts = Counts::default();
        let mut tx = pool.begin().await?;
        while let Some(item) = rows.recv().await {
            let (t, row) = item?;
            let mut doc = Map::new();
            for c in t.columns {
                let v = row.get(c.name).cloned().unwrap_or(Value::Null);
                doc.insert(c.name.to_string(), to_pg(t, c, v)?);
            }
            let cols = if t.name == "memories" {
                t.columns.iter().map(|c| c.name).filter(|c| !ACCESS_COLUMNS.contains(c)).collect::<Vec<_>>().join(", ")
            } else {
                t.column_list()
            };
            let q = format!(
                "INSERT INTO {0} ({1}) SELECT {1} FROM jsonb_populate_record(NULL::{0}, $1) ON CONFLICT ({2}) DO NOTHING",
                t.name,
                cols,
                t.key.join(", ")
            );
            let doc = Value::Object(doc);
            let as_bad = |e: sqlx::Error| match &e {
                sqlx::Error::Database(db) => bad(t.name, db.message()),
                _ => e.into(),
            };
            let done = sqlx::query(&q).bind(&doc).execute(&mut *tx).await.map_err(as_bad)?.rows_affected();
            if t.name == "memories" && done == 1 {
                sqlx::query(
                    "INSERT INTO memory_access (memory_id, access_count, last_access_time) \
                     SELECT id, coalesce(access_count, 0), last_access_time \
                     FROM jsonb_to_record($1) AS r(id uuid, access_count bigint, last_access_time timestamptz) \
                     WHERE coalesce(access_count, 0) <> 0 OR last_access_time IS NOT NULL",
                )
                .bind(&doc)
                .execute(&mut *tx)
                .await
                .map_err(as_bad)?;
            }
            let slot = if done == 1 { &mut counts.rows } else { &mut counts.skipped };
            *slot.entry(t.name.to_string()).or_default() += 1;
        }
        tx.commit().await?;
        Ok(counts)
    }
}

/// Writes the header and every exported row of `db` to `out` as JSON lines.
pub async fn export(db: &super::Db, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<Counts> {
    const PAGE: u64 = 500;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        backend: db.kind().as_str().into(),
        exported_at: chrono::Utc::now(),
        tmws_version: env!("CARGO_PKG_VERSION").into(),
    };
    serde_json::to_writer(&mut *out, &header)?;
    out.write_all(b"\n")?;
    let mut counts = Counts { unfinished: db.count_unfinished().await?, ..Counts::default() };
    for t in TABLES {
        let mut offset = 0;
        loop {
            let rows = db.export_rows(t, offset, PAGE).await?;
            let n = rows.len() as u64;
            for row in rows {
                serde_json::to_writer(&mut *out, &RowLine { table: t.name.into(), row })?;
                out.write_all(b"\n")?;
            }
            *counts.rows.entry(t.name.to_string()).or_default() += n;
            offset += n;
            if n < PAGE {
                break;
            }
        }
    }
    out.flush()?;
    Ok(counts)
}

/// Reads an export from `input` and imports it into `db` in one transaction. A malformed line
/// aborts the import (nothing is written) with its line number.
pub async fn import(db: &super::Db, input: Box<dyn std::io::BufRead + Send>) -> anyhow::Result<Counts> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut lines = std::io::BufRead::lines(input);
        let first = lines.next().ok_or_else(|| anyhow::anyhow!("the input is empty"))??;
        let header: Header =
            serde_json::from_str(&first).map_err(|e| anyhow::anyhow!("line 1 is not a tmws export header: {e}"))?;
        if header.format != FORMAT || header.version != VERSION {
            anyhow::bail!(
                "unsupported export format {} v{} (expected {FORMAT} v{VERSION})",
                header.format,
                header.version
            );
        }
        for (i, line) in lines.enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let item = serde_json::from_str::<RowLine>(&line)
                .map_err(|e| crate::error::Error::invalid(format!("line {}", i + 2), e.to_string()))
                .and_then(|r| {
                    let t = table(&r.table).ok_or_else(|| {
                        crate::error::Error::invalid(format!("line {}", i + 2), format!("unknown table {:?}", r.table))
                    })?;
                    check_row(t, &r.row)?;
                    Ok((t, r.row))
                });
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break;
            }
        }
        Ok(())
    });
    let counts = db.import_rows(rx).await;
    reader.await??;
    Ok(counts?)
}
