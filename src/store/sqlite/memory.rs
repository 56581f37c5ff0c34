//! Memories in the embedded store.
//!
//! The same rules as the PostgreSQL store (src/store/memory.rs): access rules live in the SQL of
//! every statement (`push_visible`), so a row the caller may not see is never fetched and
//! LIMIT, thresholds and pagination apply to visible rows only. Tags are mirrored into
//! `memory_tags` (index lookups), keyword search runs on the FTS5 table `memories_fts`, and
//! semantic search scores the in-process copy of the vectors ([`super::vectors`]) and then
//! verifies its best candidates with one SQL statement, in distance order, until `k` visible
//! rows are found: results are exact.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, sqlite::SqliteRow};
use uuid::Uuid;

use super::{
    SqliteStore, from_micros,
    identity::record_audit,
    micros, now_micros,
    vectors::{self, Scored, VectorRow, Viewer},
};
use crate::{
    auth::{Principal, RequestContext},
    error::{Error, Result},
    memory::{
        AccessLevel, Cursor, Grant, Memory, MemoryFilter, MemoryPatch, MemoryStats, NewMemory, OrderBy, Permission,
        PruneCriteria, ScoredMemory, SearchColumns, ranking,
    },
    store::{MemoryStore, identity::AuditEvent},
};

const COLUMNS: &str = "m.seq, m.id, m.namespace, m.owner, m.content, m.summary, m.kind, m.tags, m.metadata, \
     m.importance, m.access_level, m.parent_id, m.embedding_model, m.embedding_dim, m.create_time, m.update_time, \
     m.expire_time, m.access_count, m.last_access_time, m.version";

/// Candidates verified by the first SQL round of a semantic search beyond `k + k/4`.
const FIRST_ROUND_EXTRA: usize = 16;
/// Each further round verifies this many times more candidates than the one before.
const ROUND_GROWTH: usize = 4;
/// How far below the cut-off a cached score may be and still be checked against the stored
/// vector (the cache holds normalised f32; the final score is computed in f64).
const SCORE_SLACK: f32 = 1e-4;

/// Appends the visibility rule for `p` at time `now`: not expired, and owner, or TEAM in the
/// caller's namespace, or PUBLIC/SYSTEM, or SHARED with an unexpired grant to the caller;
/// admins also see everything in the namespace they address.
fn push_visible<'a>(qb: &mut QueryBuilder<'a, Sqlite>, p: &'a Principal, target_ns: &'a str, now: i64) {
    qb.push("(m.expire_time IS NULL OR m.expire_time > ");
    qb.push_bind(now);
    qb.push(") AND (m.owner = ");
    qb.push_bind(&p.agent_id);
    qb.push(" OR (m.access_level = 2 AND m.namespace = ");
    qb.push_bind(&p.namespace);
    qb.push(") OR m.access_level IN (4, 5) OR (m.access_level = 3 AND EXISTS (SELECT 1 FROM memory_grants g WHERE g.memory = m.seq AND g.agent_id = ");
    qb.push_bind(&p.agent_id);
    qb.push(" AND (g.expire_time IS NULL OR g.expire_time > ");
    qb.push_bind(now);
    qb.push(")))");
    if p.is_admin() {
        qb.push(" OR m.namespace = ");
        qb.push_bind(target_ns);
    }
    qb.push(")");
}

/// A list as the JSON array `json_each(?)` expands in SQL.
fn json_list<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode a filter list: {e}")))
}

/// Appends ` AND ...` for every constraint of `f` on rows of namespace `ns` (every caller
/// constrains `m.namespace = ns`; the tag lookups use it to stay within the namespace).
fn push_filter<'a>(qb: &mut QueryBuilder<'a, Sqlite>, f: &'a MemoryFilter, ns: &'a str) -> Result<()> {
    if !f.tags_any.is_empty() {
        qb.push(" AND m.seq IN (SELECT t.memory FROM memory_tags t WHERE t.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND t.tag IN (SELECT value FROM json_each(");
        qb.push_bind(json_list(&f.tags_any)?);
        qb.push(")))");
    }
    if !f.tags_all.is_empty() {
        let mut all: Vec<&String> = f.tags_all.iter().collect();
        all.sort_unstable();
        all.dedup();
        // The first tag narrows by index; the count checks the others.
        qb.push(" AND m.seq IN (SELECT t.memory FROM memory_tags t WHERE t.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND t.tag = ");
        qb.push_bind(all[0]);
        qb.push(")");
        if all.len() > 1 {
            qb.push(
                " AND (SELECT count(*) FROM memory_tags t WHERE t.memory = m.seq AND t.tag IN (SELECT value FROM json_each(",
            );
            qb.push_bind(json_list(&all)?);
            qb.push("))) = ");
            qb.push_bind(all.len() as i64);
        }
    }
    if !f.kinds.is_empty() {
        qb.push(" AND m.kind IN (SELECT value FROM json_each(");
        qb.push_bind(json_list(&f.kinds)?);
        qb.push("))");
    }
    if !f.owners.is_empty() {
        qb.push(" AND m.owner IN (SELECT value FROM json_each(");
        qb.push_bind(json_list(&f.owners)?);
        qb.push("))");
    }
    if !f.access_levels.is_empty() {
        // Enum codes: literals, never caller text.
        let levels: Vec<String> = f.access_levels.iter().map(|l| l.as_i16().to_string()).collect();
        qb.push(format!(" AND m.access_level IN ({})", levels.join(", ")));
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
        qb.push_bind(micros(t));
    }
    if let Some(t) = f.create_time_before {
        qb.push(" AND m.create_time < ");
        qb.push_bind(micros(t));
    }
    if let Some(meta) = &f.metadata_equals {
        push_metadata_contains(qb, meta);
    }
    if let Some(parent) = f.parent_id {
        qb.push(" AND m.parent_id = ");
        qb.push_bind(parent);
    }
    Ok(())
}

/// Appends ` AND <m.metadata contains meta>` with the semantics of PostgreSQL's jsonb `@>`:
/// objects contain the listed keys with contained values (recursively), arrays contain every
/// listed element somewhere, scalars are equal (numbers by value).
fn push_metadata_contains<'a>(qb: &mut QueryBuilder<'a, Sqlite>, meta: &'a Value) {
    let Value::Object(fields) = meta else {
        // An object never contains a non-object.
        qb.push(" AND 0");
        return;
    };
    let mut alias = 0usize;
    for (key, value) in fields {
        let simple_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if simple_key && !value.is_object() && !value.is_array() {
            // Fast path: a top-level scalar by JSON path, no table-valued function.
            let path = format!("$.\"{key}\"");
            qb.push(" AND json_type(m.metadata, ");
            qb.push_bind(path.clone());
            match value {
                Value::Null => {
                    qb.push(") = 'null'");
                }
                Value::Bool(b) => {
                    qb.push(if *b { ") = 'true'" } else { ") = 'false'" });
                }
                Value::String(s) => {
                    qb.push(") = 'text' AND json_extract(m.metadata, ");
                    qb.push_bind(path);
                    qb.push(") = ");
                    qb.push_bind(s.as_str());
                }
                _ => {
                    qb.push(") IN ('integer', 'real') AND json_extract(m.metadata, ");
                    qb.push_bind(path);
                    qb.push(") = ");
                    push_number(qb, value);
                }
            }
            continue;
        }
        alias += 1;
        let j = format!("j{alias}");
        qb.push(format!(" AND EXISTS (SELECT 1 FROM json_each(m.metadata) {j} WHERE {j}.key = "));
        qb.push_bind(key.as_str());
        qb.push(" AND ");
        push_element_contains(qb, &mut alias, &j, value);
        qb.push(")");
    }
}

/// Appends a condition that the `json_each` row `j` contains `v` (see [`push_metadata_contains`]).
fn push_element_contains<'a>(qb: &mut QueryBuilder<'a, Sqlite>, alias: &mut usize, j: &str, v: &'a Value) {
    match v {
        Value::Null => {
            qb.push(format!("{j}.type = 'null'"));
        }
        Value::Bool(true) => {
            qb.push(format!("{j}.type = 'true'"));
        }
        Value::Bool(false) => {
            qb.push(format!("{j}.type = 'false'"));
        }
        Value::Number(_) => {
            qb.push(format!("{j}.type IN ('integer', 'real') AND {j}.atom = "));
            push_number(qb, v);
        }
        Value::String(s) => {
            qb.push(format!("{j}.type = 'text' AND {j}.atom = "));
            qb.push_bind(s.as_str());
        }
        Value::Object(fields) => {
            qb.push(format!("{j}.type = 'object'"));
            for (key, value) in fields {
                *alias += 1;
                let inner = format!("j{alias}");
                qb.push(format!(" AND EXISTS (SELECT 1 FROM json_each({j}.value) {inner} WHERE {inner}.key = "));
                qb.push_bind(key.as_str());
                qb.push(" AND ");
                push_element_contains(qb, alias, &inner, value);
                qb.push(")");
            }
        }
        Value::Array(items) => {
            qb.push(format!("{j}.type = 'array'"));
            for item in items {
                *alias += 1;
                let inner = format!("j{alias}");
                qb.push(format!(" AND EXISTS (SELECT 1 FROM json_each({j}.value) {inner} WHERE "));
                push_element_contains(qb, alias, &inner, item);
                qb.push(")");
            }
        }
    }
}

fn push_number(qb: &mut QueryBuilder<'_, Sqlite>, v: &Value) {
    match (v.as_i64(), v.as_f64()) {
        (Some(i), _) => {
            qb.push_bind(i);
        }
        (None, Some(f)) => {
            qb.push_bind(f);
        }
        (None, None) => {
            qb.push("NULL");
        }
    }
}

fn opt_time(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<i64>, _>(col)?.map(from_micros).transpose()
}

/// A memory row (selected with [`COLUMNS`]) and its `seq`.
fn memory_from_row(row: &SqliteRow) -> Result<(i64, Memory)> {
    let level: i16 = row.try_get("access_level")?;
    let tags: String = row.try_get("tags")?;
    let metadata: String = row.try_get("metadata")?;
    let memory = Memory {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        owner: row.try_get("owner")?,
        content: row.try_get("content")?,
        summary: row.try_get("summary")?,
        kind: row.try_get("kind")?,
        tags: serde_json::from_str(&tags).map_err(|e| Error::internal(format!("stored tags: {e}")))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| Error::internal(format!("stored metadata: {e}")))?,
        importance: row.try_get("importance")?,
        access_level: AccessLevel::from_i16(level)
            .ok_or_else(|| Error::internal(format!("stored access_level {level} is unknown")))?,
        grants: Vec::new(),
        parent_id: row.try_get("parent_id")?,
        embedding_model: row.try_get("embedding_model")?,
        embedding_dim: row.try_get("embedding_dim")?,
        embedding: None,
        create_time: from_micros(row.try_get("create_time")?)?,
        update_time: from_micros(row.try_get("update_time")?)?,
        expire_time: opt_time(row, "expire_time")?,
        access_count: row.try_get("access_count")?,
        last_access_time: opt_time(row, "last_access_time")?,
        version: row.try_get("version")?,
    };
    Ok((row.try_get("seq")?, memory))
}

/// The stored vector in column `col`, if any.
fn vector_from_row(row: &SqliteRow, col: &str) -> Result<Option<Vec<f32>>> {
    match row.try_get::<Option<Vec<u8>>, _>(col)? {
        None => Ok(None),
        Some(bytes) => vectors::decode(&bytes)
            .map(Some)
            .ok_or_else(|| Error::internal(format!("stored vector of {} bytes is malformed", bytes.len()))),
    }
}

/// Loads the grants of `memories` (one query) and attaches them.
async fn attach_grants(conn: &mut SqliteConnection, memories: &mut [(i64, Memory)]) -> Result<()> {
    if memories.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = memories.iter().map(|m| m.0).collect();
    let rows = sqlx::query(
        "SELECT memory, agent_id, permission, expire_time FROM memory_grants \
         WHERE memory IN (SELECT value FROM json_each(?1)) ORDER BY agent_id",
    )
    .bind(json_list(&seqs)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_memory: HashMap<i64, Vec<Grant>> = HashMap::new();
    for row in rows {
        let permission: i16 = row.try_get("permission")?;
        by_memory.entry(row.try_get("memory")?).or_default().push(Grant {
            agent_id: row.try_get("agent_id")?,
            permission: Permission::from_i16(permission)
                .ok_or_else(|| Error::internal(format!("stored permission {permission} is unknown")))?,
            expire_time: opt_time(&row, "expire_time")?,
        });
    }
    for (seq, m) in memories.iter_mut() {
        if let Some(g) = by_memory.remove(seq) {
            m.grants = g;
        }
    }
    Ok(())
}

/// What the caller may do with one row.
struct WriteCheck {
    seq: i64,
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

/// Reads the row `id` for a change, inside the writer's transaction (the single writer
/// connection serialises changes, as `FOR UPDATE` does on PostgreSQL). None when invisible.
async fn check_for_write(
    conn: &mut SqliteConnection,
    p: &Principal,
    target_ns: &str,
    id: Uuid,
    now: i64,
) -> Result<Option<WriteCheck>> {
    let mut qb = QueryBuilder::<Sqlite>::new(
        "SELECT m.seq, m.version, m.owner, m.access_level, EXISTS (SELECT 1 FROM memory_grants g WHERE g.memory = m.seq AND g.agent_id = ",
    );
    qb.push_bind(&p.agent_id);
    qb.push(" AND g.permission = 2 AND (g.expire_time IS NULL OR g.expire_time > ");
    qb.push_bind(now);
    qb.push(")) AS write_grant FROM memories m WHERE m.id = ");
    qb.push_bind(id);
    qb.push(" AND ");
    push_visible(&mut qb, p, target_ns, now);
    let Some(row) = qb.build().fetch_optional(&mut *conn).await? else { return Ok(None) };
    let level: i16 = row.try_get("access_level")?;
    Ok(Some(WriteCheck {
        seq: row.try_get("seq")?,
        version: row.try_get("version")?,
        owner: row.try_get("owner")?,
        access_level: AccessLevel::from_i16(level).ok_or_else(|| Error::internal("unknown access level"))?,
        write_grant: row.try_get("write_grant")?,
    }))
}

/// `SELECT <memory columns>[, v.embedding] FROM memories m ... WHERE `, ready for the conditions.
fn select_memories<'a>(with_embedding: bool) -> QueryBuilder<'a, Sqlite> {
    let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
    qb.push(COLUMNS);
    if with_embedding {
        qb.push(", v.embedding FROM memories m LEFT JOIN memory_vectors v ON v.memory = m.seq WHERE ");
    } else {
        qb.push(" FROM memories m WHERE ");
    }
    qb
}

async fn fetch_one_by_id(
    conn: &mut SqliteConnection,
    p: &Principal,
    target_ns: &str,
    id: Uuid,
    with_embedding: bool,
    now: i64,
) -> Result<Option<(i64, Memory)>> {
    let mut qb = select_memories(with_embedding);
    qb.push("m.id = ");
    qb.push_bind(id);
    qb.push(" AND ");
    push_visible(&mut qb, p, target_ns, now);
    let Some(row) = qb.build().fetch_optional(&mut *conn).await? else { return Ok(None) };
    let (seq, mut memory) = memory_from_row(&row)?;
    if with_embedding {
        memory.embedding = vector_from_row(&row, "embedding")?;
    }
    let mut one = vec![(seq, memory)];
    attach_grants(conn, &mut one).await?;
    Ok(one.pop())
}

/// Whether `parent` is a memory `p` can see (from `target_ns`).
async fn parent_visible(
    conn: &mut SqliteConnection,
    p: &Principal,
    target_ns: &str,
    parent: Uuid,
    now: i64,
) -> Result<bool> {
    let mut qb = QueryBuilder::<Sqlite>::new("SELECT 1 FROM memories m WHERE m.id = ");
    qb.push_bind(parent);
    qb.push(" AND ");
    push_visible(&mut qb, p, target_ns, now);
    Ok(qb.build().fetch_optional(&mut *conn).await?.is_some())
}

/// Reads the vectors of dimension `dim` (of `model`, or of every model) with what the cache's
/// pre-check needs.
async fn load_vectors(conn: &mut SqliteConnection, dim: usize, model: Option<&str>) -> Result<Vec<VectorRow>> {
    let mut qb = QueryBuilder::<Sqlite>::new(
        "SELECT m.seq, m.embedding_model, m.namespace, m.owner, m.access_level, m.expire_time, v.embedding \
         FROM memories m JOIN memory_vectors v ON v.memory = m.seq WHERE m.embedding_dim = ",
    );
    qb.push_bind(dim as i64);
    match model {
        Some(model) => {
            qb.push(" AND m.embedding_model = ");
            qb.push_bind(model);
        }
        None => {
            qb.push(" AND m.embedding_model IS NOT NULL");
        }
    }
    let mut out = Vec::new();
    let query = qb.build();
    let mut rows = query.fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let Some(vector) = vector_from_row(&row, "embedding").ok().flatten().filter(|v| v.len() == dim) else {
            let seq: i64 = row.try_get("seq")?;
            tracing::warn!(seq, dim, "stored vector does not match its dimension; left out of semantic search");
            continue;
        };
        out.push(VectorRow {
            seq: row.try_get("seq")?,
            model: row.try_get("embedding_model")?,
            namespace: row.try_get("namespace")?,
            owner: row.try_get("owner")?,
            access_level: row.try_get("access_level")?,
            expire_time: row.try_get("expire_time")?,
            vector,
        });
    }
    Ok(out)
}

/// What a semantic search looks for, shared by its SQL statements.
struct SearchScope<'a> {
    p: &'a Principal,
    ns: &'a str,
    filter: &'a MemoryFilter,
    model: &'a str,
    dim: usize,
    now: i64,
}

impl<'a> SearchScope<'a> {
    /// ` FROM memories m ... WHERE` rows of this model and dimension in the namespace, visible
    /// and matching the filter. With `candidates` (a JSON array of seqs), only those rows, with
    /// their vectors (`v.embedding`); the list drives the join (CROSS JOIN fixes the order), so
    /// SQLite looks the rows up by key instead of scanning the namespace.
    fn push_from_where(&self, qb: &mut QueryBuilder<'a, Sqlite>, candidates: Option<String>) -> Result<()> {
        match candidates {
            Some(list) => {
                qb.push(" FROM json_each(");
                qb.push_bind(list);
                qb.push(
                    ") c CROSS JOIN memories m JOIN memory_vectors v ON v.memory = m.seq \
                     WHERE m.seq = c.value AND m.embedding_dim = ",
                );
            }
            None => {
                qb.push(" FROM memories m WHERE m.embedding_dim = ");
            }
        }
        // These statements read every match (no ORDER BY ... LIMIT to serve): with a tag
        // filter, `+` keeps SQLite off the namespace index so the namespace's tagged rows drive.
        let tagged = !self.filter.tags_any.is_empty() || !self.filter.tags_all.is_empty();
        qb.push_bind(self.dim as i64);
        qb.push(" AND m.embedding_model = ");
        qb.push_bind(self.model);
        qb.push(if tagged { " AND +m.namespace = " } else { " AND m.namespace = " });
        qb.push_bind(self.ns);
        qb.push(" AND ");
        push_visible(qb, self.p, self.ns, self.now);
        push_filter(qb, self.filter, self.ns)
    }
}

/// Translates web-search syntax (PostgreSQL's `websearch_to_tsquery`: words are ANDed, "quoted
/// phrases", `or`, `-word`) into an FTS5 query in which every term is a quoted string, so no
/// caller text is ever read as FTS5 syntax. With the `english` configuration, lone stop words
/// are dropped as PostgreSQL drops them. None when nothing searchable remains.
fn fts_query(text: &str, text_config: &str) -> Option<String> {
    enum Token {
        Or,
        Term { text: String, negated: bool, phrase: bool },
    }
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let negated = chars[i] == '-' && chars.get(i + 1).is_some_and(|c| !c.is_whitespace());
        if negated {
            i += 1;
        }
        if chars[i] == '"' {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && chars[end] != '"' {
                end += 1;
            }
            tokens.push(Token::Term { text: chars[start..end].iter().collect(), negated, phrase: true });
            i = end + 1;
        } else {
            let start = i;
            while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '"' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if !negated && word.eq_ignore_ascii_case("or") {
                tokens.push(Token::Or);
            } else {
                tokens.push(Token::Term { text: word, negated, phrase: false });
            }
        }
    }
    let english = text_config.eq_ignore_ascii_case("english");
    let searchable = |text: &str, phrase: bool| {
        let mut words = text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).peekable();
        if words.peek().is_none() {
            return false;
        }
        phrase || !english || !words.all(|w| is_stop_word(&w.to_lowercase()))
    };
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    let mut clauses: Vec<String> = Vec::new();
    let (mut positive, mut negative): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let mut close = |positive: &mut Vec<String>, negative: &mut Vec<String>| {
        // A clause of negations only matches "everything but"; FTS5 cannot express it.
        if !positive.is_empty() {
            let mut clause = format!("({})", positive.join(" AND "));
            for n in negative.iter() {
                clause = format!("({clause} NOT {n})");
            }
            clauses.push(clause);
        }
        positive.clear();
        negative.clear();
    };
    for token in tokens {
        match token {
            Token::Or => close(&mut positive, &mut negative),
            Token::Term { text, negated, phrase } => {
                if searchable(&text, phrase) {
                    if negated { negative.push(quote(&text)) } else { positive.push(quote(&text)) }
                }
            }
        }
    }
    close(&mut positive, &mut negative);
    (!clauses.is_empty()).then(|| clauses.join(" OR "))
}

/// PostgreSQL's English stop words (`english.stop`), separated by spaces.
const ENGLISH_STOP_WORDS: &str = "\
     i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her \
     hers herself it its itself they them their theirs themselves what which who whom this that these \
     those am is are was were be been being have has had having do does did doing a an the and but if or \
     because as until while of at by for with about against between into through during before after \
     above below to from up down in out on off over under again further then once here there when where \
     why how all any both each few more most other some such no nor not only own same so than too very s \
     t can will just don should now";

fn is_stop_word(word: &str) -> bool {
    ENGLISH_STOP_WORDS.split(' ').any(|w| w == word)
}

impl SqliteStore {
    /// Loads the cached vectors of (model, dim) unless they are loaded. The snapshot is read on
    /// the writer connection and installed before it is released, so no committed change can
    /// fall between the snapshot and the updates that follow it.
    async fn ensure_vectors_loaded(&self, model: &str, dim: usize) -> Result<()> {
        if self.vectors().tracks(model, dim) {
            return Ok(());
        }
        let mut conn = self.writer().acquire().await?;
        if self.vectors().tracks(model, dim) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let rows = load_vectors(&mut conn, dim, Some(model)).await?;
        let n = rows.len();
        self.vectors().install(dim, Some(model), rows);
        drop(conn);
        tracing::info!(
            model,
            dim,
            vectors = n,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vector cache loaded"
        );
        Ok(())
    }

    /// Rows of `head` (candidate seqs) that pass the full SQL rules, with their stored vectors.
    async fn verify_candidates(
        &self,
        scope: &SearchScope<'_>,
        head: &[(f32, i64)],
    ) -> Result<HashMap<i64, (Memory, Vec<f32>)>> {
        let seqs: Vec<i64> = head.iter().map(|c| c.1).collect();
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        qb.push(COLUMNS);
        qb.push(", v.embedding");
        scope.push_from_where(&mut qb, Some(json_list(&seqs)?))?;
        let rows = qb.build().fetch_all(self.reader()).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (seq, memory) = memory_from_row(row)?;
            let vector = vector_from_row(row, "embedding")?.unwrap_or_default();
            out.insert(seq, (memory, vector));
        }
        Ok(out)
    }

    /// Candidate scores for an exact search: the rows SQL finds (access rules and filter
    /// applied), scored from the cache (rows it lacks are read from the table).
    async fn exact_candidates(&self, scope: &SearchScope<'_>, query: &[f32], min: f32) -> Result<Scored> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT m.seq");
        scope.push_from_where(&mut qb, None)?;
        let seqs: Vec<i64> = qb.build_query_scalar().fetch_all(self.reader()).await?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.vectors().clone();
        let (model, q) = (scope.model.to_string(), query.to_vec());
        // Without a loaded copy (cleared by an interrupted change), every row is read.
        let (mut scored, missing) =
            tokio::task::spawn_blocking(move || match index.score_rows(&model, &q, &seqs, min) {
                Some(scored) => scored,
                None => (Vec::new(), seqs),
            })
            .await
            .map_err(|e| Error::internal(format!("vector scoring failed: {e}")))?;
        if !missing.is_empty() {
            let rows = sqlx::query(
                "SELECT memory, embedding FROM memory_vectors WHERE memory IN (SELECT value FROM json_each(?1))",
            )
            .bind(json_list(&missing)?)
            .fetch_all(self.reader())
            .await?;
            for row in &rows {
                if let Some(mut v) = vector_from_row(row, "embedding")?
                    && v.len() == query.len()
                    && vectors::normalize(&mut v)
                {
                    let score = vectors::dot(&v, query);
                    if score >= min {
                        scored.push((score, row.try_get("memory")?));
                    }
                }
            }
        }
        Ok(scored)
    }

    /// Candidate scores for a search with a broad filter (or none): every cached row of the
    /// namespace the caller may see (SQL verifies the rest). None when the copy is not loaded.
    async fn cached_candidates(&self, scope: &SearchScope<'_>, query: &[f32], min: f32) -> Result<Option<Scored>> {
        let index = self.vectors().clone();
        let (model, q) = (scope.model.to_string(), query.to_vec());
        let viewer = Viewer {
            namespace: scope.ns.to_string(),
            agent_id: scope.p.agent_id.clone(),
            home_namespace: scope.p.namespace.clone(),
            admin: scope.p.is_admin(),
            now: scope.now,
        };
        tokio::task::spawn_blocking(move || index.score_visible(&model, &q, &viewer, min))
            .await
            .map_err(|e| Error::internal(format!("vector scoring failed: {e}")))
    }
}

#[async_trait]
impl MemoryStore for SqliteStore {
    async fn secret(&self, name: &str, generate: &(dyn Fn() -> Vec<u8> + Send + Sync)) -> Result<Vec<u8>> {
        let candidate = generate();
        let mut tx = self.writer().begin().await?;
        sqlx::query("INSERT INTO tmws_secrets (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(&candidate)
            .execute(&mut *tx)
            .await?;
        let value: Vec<u8> =
            sqlx::query_scalar("SELECT value FROM tmws_secrets WHERE name = ?1").bind(name).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(value)
    }

    /// Loads the vectors of `dim` dimensions (every model) into the in-process copy; `m` and
    /// `ef_construction` are HNSW settings that exact search does not use.
    async fn ensure_vector_index(&self, dim: usize, _m: u32, _ef_construction: u32) -> Result<()> {
        let started = std::time::Instant::now();
        let mut conn = self.writer().acquire().await?;
        let rows = load_vectors(&mut conn, dim, None).await?;
        let n = rows.len();
        self.vectors().install(dim, None, rows);
        drop(conn);
        tracing::info!(dim, vectors = n, elapsed_ms = started.elapsed().as_millis() as u64, "vector cache loaded");
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "insert_memories"))]
    async fn insert_memories(&self, p: &Principal, items: Vec<NewMemory>, ctx: &RequestContext) -> Result<Vec<Memory>> {
        let mut tx = self.writer().begin().await?;
        let now = now_micros();
        let mut seqs = Vec::with_capacity(items.len());
        let mut cached = Vec::new();
        for item in items {
            if let Some(parent) = item.parent_id
                && !parent_visible(&mut tx, p, &item.namespace, parent, now).await?
            {
                return Err(Error::invalid("memory.parent_id", "no such memory"));
            }
            if let Some(request_id) = &item.request_id {
                let first: Option<i64> = sqlx::query_scalar(
                    "SELECT seq FROM memories WHERE namespace = ?1 AND owner = ?2 AND request_id = ?3",
                )
                .bind(&item.namespace)
                .bind(&item.owner)
                .bind(request_id)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(seq) = first {
                    // The same request_id was used before: return the first result.
                    seqs.push(seq);
                    continue;
                }
            }
            let model = item.embedding.as_ref().and(item.embedding_model.as_deref());
            let dim = item.embedding.as_ref().map(|v| v.len() as i64);
            let created = now_micros();
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO memories (id, namespace, owner, content, summary, kind, tags, metadata, importance, \
                 access_level, parent_id, embedding_model, embedding_dim, expire_time, request_id, create_time, update_time) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16) RETURNING seq",
            )
            .bind(item.id)
            .bind(&item.namespace)
            .bind(&item.owner)
            .bind(&item.content)
            .bind(&item.summary)
            .bind(&item.kind)
            .bind(json_list(&item.tags)?)
            .bind(json_list(&item.metadata)?)
            .bind(item.importance)
            .bind(item.access_level.as_i16())
            .bind(item.parent_id)
            .bind(model)
            .bind(dim)
            .bind(item.expire_time.map(micros))
            .bind(&item.request_id)
            .bind(created)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(vector) = &item.embedding {
                sqlx::query("INSERT INTO memory_vectors (memory, embedding) VALUES (?1, ?2)")
                    .bind(seq)
                    .bind(vectors::encode(vector))
                    .execute(&mut *tx)
                    .await?;
            }
            if let (Some(vector), Some(model)) = (item.embedding, item.embedding_model) {
                cached.push(VectorRow {
                    seq,
                    model,
                    namespace: item.namespace,
                    owner: item.owner,
                    access_level: item.access_level.as_i16(),
                    expire_time: item.expire_time.map(micros),
                    vector,
                });
            }
            seqs.push(seq);
        }
        let mut qb = select_memories(false);
        qb.push("m.seq IN (SELECT value FROM json_each(");
        qb.push_bind(json_list(&seqs)?);
        qb.push("))");
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut by_seq: HashMap<i64, Memory> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (seq, m) = memory_from_row(row)?;
            by_seq.insert(seq, m);
        }
        let mut out = Vec::with_capacity(seqs.len());
        for seq in &seqs {
            let m = by_seq.get(seq).cloned().ok_or_else(|| Error::internal("inserted memory vanished"))?;
            out.push((*seq, m));
        }
        attach_grants(&mut tx, &mut out).await?;
        for (_, m) in &out {
            record_audit(&mut tx, &AuditEvent::ok(p, &m.namespace, ctx, m.id)).await?;
        }
        let change = self.vectors().begin_change();
        tx.commit().await?;
        change.applied(|index| index.upsert(cached));
        Ok(out.into_iter().map(|(_, m)| m).collect())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "get_memory"))]
    async fn get_memory(&self, p: &Principal, ns: &str, id: Uuid, with_embedding: bool) -> Result<Option<Memory>> {
        let mut conn = self.reader().acquire().await?;
        Ok(fetch_one_by_id(&mut conn, p, ns, id, with_embedding, now_micros()).await?.map(|(_, m)| m))
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "update_memory"))]
    async fn update_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        patch: &MemoryPatch,
        ctx: &RequestContext,
    ) -> Result<Memory> {
        let mut tx = self.writer().begin().await?;
        let now = now_micros();
        let check = check_for_write(&mut tx, p, ns, id, now)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !check.may_write(p) {
            return Err(Error::PermissionDenied("you may read this memory but not change it".into()));
        }
        crate::store::memory::check_etag(expected_version, check.version)?;
        if patch.access_level == Some(AccessLevel::System) && !p.is_admin() {
            return Err(Error::PermissionDenied("only admins may make a memory SYSTEM".into()));
        }
        if let Some(Some(parent)) = patch.parent_id {
            if parent == id {
                return Err(Error::invalid("memory.parent_id", "a memory cannot be its own parent"));
            }
            if !parent_visible(&mut tx, p, ns, parent, now).await? {
                return Err(Error::invalid("memory.parent_id", "no such memory"));
            }
        }
        let mut qb = QueryBuilder::<Sqlite>::new("UPDATE memories SET version = version + 1, update_time = ");
        qb.push_bind(now);
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
            qb.push_bind(json_list(v)?);
        }
        if let Some(v) = &patch.metadata {
            qb.push(", metadata = ");
            qb.push_bind(json_list(v)?);
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
            qb.push(", embedding_dim = ");
            qb.push_bind(vector.len() as i64);
            qb.push(", embedding_model = ");
            qb.push_bind(model);
        }
        if let Some(v) = patch.expire_time {
            qb.push(", expire_time = ");
            qb.push_bind(v.map(micros));
        }
        qb.push(" WHERE seq = ");
        qb.push_bind(check.seq);
        qb.build().execute(&mut *tx).await?;
        if let Some((vector, _)) = &patch.embedding {
            sqlx::query(
                "INSERT INTO memory_vectors (memory, embedding) VALUES (?1, ?2) \
                 ON CONFLICT (memory) DO UPDATE SET embedding = excluded.embedding",
            )
            .bind(check.seq)
            .bind(vectors::encode(vector))
            .execute(&mut *tx)
            .await?;
        }
        let (seq, memory) = fetch_one_by_id(&mut tx, p, ns, id, false, now)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        record_audit(&mut tx, &AuditEvent::ok(p, &memory.namespace, ctx, id)).await?;
        let access_changed = patch.access_level.is_some() || patch.expire_time.is_some();
        if patch.embedding.is_none() && !access_changed {
            tx.commit().await?;
            return Ok(memory);
        }
        let change = self.vectors().begin_change();
        tx.commit().await?;
        change.applied(|index| match &patch.embedding {
            Some((vector, model)) => index.upsert(vec![VectorRow {
                seq,
                model: model.clone(),
                namespace: memory.namespace.clone(),
                owner: memory.owner.clone(),
                access_level: memory.access_level.as_i16(),
                expire_time: memory.expire_time.map(micros),
                vector: vector.clone(),
            }]),
            None => index.set_access(seq, memory.access_level.as_i16(), memory.expire_time.map(micros)),
        });
        Ok(memory)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "delete_memory"))]
    async fn delete_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<()> {
        let mut tx = self.writer().begin().await?;
        let now = now_micros();
        let check = check_for_write(&mut tx, p, ns, id, now)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !check.may_write(p) {
            return Err(Error::PermissionDenied("you may read this memory but not delete it".into()));
        }
        crate::store::memory::check_etag(expected_version, check.version)?;
        let deleted_ns: String = sqlx::query_scalar("DELETE FROM memories WHERE seq = ?1 RETURNING namespace")
            .bind(check.seq)
            .fetch_one(&mut *tx)
            .await?;
        record_audit(&mut tx, &AuditEvent::ok(p, &deleted_ns, ctx, id)).await?;
        let change = self.vectors().begin_change();
        tx.commit().await?;
        change.applied(|index| index.remove(&[check.seq]));
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "list_memories"))]
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
        let now = now_micros();
        let mut qb = select_memories(with_embedding);
        qb.push("m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns, now);
        push_filter(&mut qb, filter, ns)?;
        match (order, after) {
            (OrderBy::CreateTimeDesc, Some(Cursor::CreateTime(t, id))) => {
                qb.push(" AND (m.create_time, m.id) < (");
                qb.push_bind(*t);
                qb.push(", ");
                qb.push_bind(*id);
                qb.push(")");
            }
            (OrderBy::CreateTimeAsc, Some(Cursor::CreateTime(t, id))) => {
                qb.push(" AND (m.create_time, m.id) > (");
                qb.push_bind(*t);
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
        qb.push(match order {
            OrderBy::CreateTimeDesc => " ORDER BY m.create_time DESC, m.id DESC",
            OrderBy::CreateTimeAsc => " ORDER BY m.create_time ASC, m.id ASC",
            OrderBy::ImportanceDesc => " ORDER BY m.importance DESC, m.id DESC",
        });
        qb.push(" LIMIT ");
        qb.push_bind(limit as i64);
        let mut conn = self.reader().acquire().await?;
        let rows = qb.build().fetch_all(&mut *conn).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let (seq, mut m) = memory_from_row(row)?;
            if with_embedding {
                m.embedding = vector_from_row(row, "embedding")?;
            }
            out.push((seq, m));
        }
        attach_grants(&mut conn, &mut out).await?;
        Ok(out.into_iter().map(|(_, m)| m).collect())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "count_matching"))]
    async fn count_matching(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        model: &str,
        dim: usize,
        cap: u64,
    ) -> Result<u64> {
        let scope = SearchScope { p, ns, filter, model, dim, now: now_micros() };
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT count(*) FROM (SELECT 1");
        scope.push_from_where(&mut qb, None)?;
        qb.push(" LIMIT ");
        qb.push_bind(i64::try_from(cap).unwrap_or(i64::MAX));
        qb.push(")");
        let n: i64 = qb.build_query_scalar().fetch_one(self.reader()).await?;
        Ok(n.max(0) as u64)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "semantic_search"))]
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
        vectors: SearchColumns,
    ) -> Result<Vec<ScoredMemory>> {
        let dim = query.len();
        let mut normalised = query.to_vec();
        if k == 0 || dim == 0 || !vectors::normalize(&mut normalised) {
            return Ok(Vec::new());
        }
        self.ensure_vectors_loaded(model, dim).await?;
        let scope = SearchScope { p, ns, filter, model, dim, now: now_micros() };
        let min = max_distance.map_or(f32::NEG_INFINITY, |d| (1.0 - d) as f32 - SCORE_SLACK);
        let cached = if exact { None } else { self.cached_candidates(&scope, &normalised, min).await? };
        let mut candidates = match cached {
            Some(scored) => scored,
            None => self.exact_candidates(&scope, &normalised, min).await?,
        };

        // Verify the best candidates in score order, a growing batch per round, until k rows
        // pass SQL (access rules, filter, expiry) or the candidates run out.
        let best_first = |a: &(f32, i64), b: &(f32, i64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let mut found: Vec<(i64, ScoredMemory)> = Vec::with_capacity(k);
        let mut rest: &mut [(f32, i64)] = &mut candidates;
        let mut batch = k + k / 4 + FIRST_ROUND_EXTRA;
        while found.len() < k && !rest.is_empty() {
            let n = batch.min(rest.len());
            if n < rest.len() {
                rest.select_nth_unstable_by(n - 1, best_first);
            }
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            head.sort_unstable_by(best_first);
            let mut verified = self.verify_candidates(&scope, head).await?;
            for (_, seq) in head.iter() {
                let Some((mut memory, vector)) = verified.remove(seq) else { continue };
                let score = ranking::cosine(&vector, query);
                if max_distance.is_some_and(|d| 1.0 - score > d) {
                    continue;
                }
                if vectors == SearchColumns::Embedding {
                    memory.embedding = Some(vector.clone());
                }
                found.push((*seq, ScoredMemory { memory, score, vector: vectors.vectors().then_some(vector) }));
                if found.len() == k {
                    break;
                }
            }
            rest = tail;
            batch = batch.saturating_mul(ROUND_GROWTH);
        }
        found.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
        let mut memories = Vec::with_capacity(found.len());
        let mut scores = Vec::with_capacity(found.len());
        for (seq, s) in found {
            memories.push((seq, s.memory));
            scores.push((s.score, s.vector));
        }
        let mut conn = self.reader().acquire().await?;
        attach_grants(&mut conn, &mut memories).await?;
        Ok(scores
            .into_iter()
            .zip(memories)
            .map(|((score, vector), (_, memory))| ScoredMemory { memory, score, vector })
            .collect())
    }

    /// Full-text matches, best first; score = -bm25() (positive, higher is better). The
    /// table's tokenizer (Porter stemming) is fixed; `text_config` only decides whether English
    /// stop words are dropped from the query.
    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "keyword_search"))]
    async fn keyword_search(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        text: &str,
        text_config: &str,
        k: usize,
        vectors: SearchColumns,
        dim: usize,
    ) -> Result<Vec<ScoredMemory>> {
        let Some(fts) = fts_query(text, text_config) else { return Ok(Vec::new()) };
        if k == 0 {
            return Ok(Vec::new());
        }
        let now = now_micros();
        // Rank and limit first; read the rows (and vectors) of the k best only.
        let mut qb = QueryBuilder::<Sqlite>::new(
            "WITH hits AS (SELECT m.seq AS seq, m.id AS id, -bm25(memories_fts) AS rank \
             FROM memories_fts JOIN memories m ON m.seq = memories_fts.rowid WHERE memories_fts MATCH ",
        );
        qb.push_bind(fts);
        qb.push(" AND m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns, now);
        push_filter(&mut qb, filter, ns)?;
        qb.push(" ORDER BY rank DESC, m.id DESC LIMIT ");
        qb.push_bind(k as i64);
        qb.push(") SELECT ");
        qb.push(COLUMNS);
        qb.push(", hits.rank");
        if vectors.vectors() {
            qb.push(", CASE WHEN m.embedding_dim = ");
            qb.push_bind(dim as i64);
            qb.push(" THEN (SELECT v.embedding FROM memory_vectors v WHERE v.memory = m.seq) END AS vec");
        }
        qb.push(" FROM hits JOIN memories m ON m.seq = hits.seq ORDER BY hits.rank DESC, hits.id DESC");
        let mut conn = self.reader().acquire().await?;
        let rows = qb.build().fetch_all(&mut *conn).await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut memories = Vec::with_capacity(rows.len());
        for row in &rows {
            let (seq, mut memory) = memory_from_row(row)?;
            let rank: f64 = row.try_get("rank")?;
            let vec = if vectors.vectors() { vector_from_row(row, "vec")? } else { None };
            if vectors == SearchColumns::Embedding {
                memory.embedding = vec.clone();
            }
            out.push((rank, vec));
            memories.push((seq, memory));
        }
        attach_grants(&mut conn, &mut memories).await?;
        Ok(out
            .into_iter()
            .zip(memories)
            .map(|((score, vector), (_, memory))| ScoredMemory { memory, score, vector })
            .collect())
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "share_memory"))]
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
        let mut tx = self.writer().begin().await?;
        let now = now_micros();
        let check = check_for_write(&mut tx, p, ns, id, now)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if !(p.is_admin() || check.owner == p.agent_id) {
            return Err(Error::PermissionDenied("only the owner or an admin may share a memory".into()));
        }
        crate::store::memory::check_etag(expected_version, check.version)?;
        if !revoke.is_empty() {
            sqlx::query(
                "DELETE FROM memory_grants WHERE memory = ?1 AND agent_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(check.seq)
            .bind(json_list(revoke)?)
            .execute(&mut *tx)
            .await?;
        }
        for g in grants {
            sqlx::query(
                "INSERT INTO memory_grants (memory, agent_id, permission, expire_time, create_time) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (memory, agent_id) DO UPDATE SET permission = excluded.permission, expire_time = excluded.expire_time",
            )
            .bind(check.seq)
            .bind(&g.agent_id)
            .bind(g.permission as i16)
            .bind(g.expire_time.map(micros))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE memories SET version = version + 1, update_time = ?2 WHERE seq = ?1")
            .bind(check.seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let (_, memory) = fetch_one_by_id(&mut tx, p, ns, id, false, now)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        record_audit(&mut tx, &AuditEvent::ok(p, &memory.namespace, ctx, id)).await?;
        tx.commit().await?;
        Ok(memory)
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "prune"))]
    async fn prune(&self, c: &PruneCriteria) -> Result<(i64, bool)> {
        let now = now_micros();
        let push_where = |qb: &mut QueryBuilder<'_, Sqlite>| {
            qb.push(" WHERE m.namespace = ");
            qb.push_bind(c.namespace.clone());
            if let Some(owner) = &c.owner {
                qb.push(" AND m.owner = ");
                qb.push_bind(owner.clone());
            }
            qb.push(" AND (0");
            if c.expired {
                qb.push(" OR m.expire_time <= ");
                qb.push_bind(now);
            }
            if let Some((before, max_importance)) = c.older_than {
                qb.push(" OR (m.create_time < ");
                qb.push_bind(micros(before));
                qb.push(" AND m.importance <= ");
                qb.push_bind(max_importance);
                qb.push(")");
            }
            qb.push(")");
        };
        let limit = i64::try_from(c.limit).unwrap_or(i64::MAX - 1);
        if c.dry_run {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT count(*) FROM (SELECT 1 FROM memories m");
            push_where(&mut qb);
            qb.push(" LIMIT ");
            qb.push_bind(limit + 1);
            qb.push(")");
            let n: i64 = qb.build_query_scalar().fetch_one(self.reader()).await?;
            return Ok((n.min(limit), n > limit));
        }
        let mut tx = self.writer().begin().await?;
        let mut qb = QueryBuilder::<Sqlite>::new("DELETE FROM memories WHERE seq IN (SELECT m.seq FROM memories m");
        push_where(&mut qb);
        qb.push(" LIMIT ");
        qb.push_bind(limit);
        qb.push(") RETURNING seq");
        let deleted: Vec<i64> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT EXISTS (SELECT 1 FROM memories m");
        push_where(&mut qb);
        qb.push(")");
        let more: bool = qb.build_query_scalar().fetch_one(&mut *tx).await?;
        let change = self.vectors().begin_change();
        tx.commit().await?;
        change.applied(|index| index.remove(&deleted));
        Ok((deleted.len() as i64, more))
    }

    #[tracing::instrument(level = "debug", name = "db", skip_all, fields(otel.kind = "client", db.system = "sqlite", db.operation = "stats"))]
    async fn stats(&self, p: &Principal, ns: &str) -> Result<MemoryStats> {
        let now = now_micros();
        let mut conn = self.reader().acquire().await?;
        // storage_bytes: the bytes of the row's values (as pg_column_size(m.*) counts them),
        // its vector included.
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT count(*) AS total, count(m.embedding_dim) AS with_embedding, min(m.create_time) AS oldest, \
             max(m.create_time) AS newest, coalesce(sum(96 + octet_length(m.namespace) + octet_length(m.owner) \
             + octet_length(m.kind) + octet_length(m.tags) + octet_length(m.metadata) + octet_length(m.summary) \
             + octet_length(m.content) + coalesce(octet_length(m.request_id), 0) \
             + coalesce(octet_length(m.embedding_model), 0) + 4 * coalesce(m.embedding_dim, 0)), 0) AS bytes \
             FROM memories m WHERE m.namespace = ",
        );
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns, now);
        let row = qb.build().fetch_one(&mut *conn).await?;
        let mut stats = MemoryStats {
            namespace: ns.to_string(),
            total: row.try_get("total")?,
            with_embedding: row.try_get("with_embedding")?,
            oldest: opt_time(&row, "oldest")?,
            newest: opt_time(&row, "newest")?,
            storage_bytes: row.try_get("bytes")?,
            ..MemoryStats::default()
        };
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT m.kind, count(*) FROM memories m WHERE m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns, now);
        qb.push(" GROUP BY m.kind ORDER BY m.kind");
        for row in qb.build().fetch_all(&mut *conn).await? {
            stats.by_kind.push((row.try_get(0)?, row.try_get(1)?));
        }
        let mut qb =
            QueryBuilder::<Sqlite>::new("SELECT m.access_level, count(*) FROM memories m WHERE m.namespace = ");
        qb.push_bind(ns);
        qb.push(" AND ");
        push_visible(&mut qb, p, ns, now);
        qb.push(" GROUP BY m.access_level ORDER BY m.access_level");
        for row in qb.build().fetch_all(&mut *conn).await? {
            let level: i16 = row.try_get(0)?;
            if let Some(level) = AccessLevel::from_i16(level) {
                stats.by_access_level.push((level, row.try_get(1)?));
            }
        }
        Ok(stats)
    }

    async fn sweep_expired(&self, batch: usize) -> Result<u64> {
        let mut tx = self.writer().begin().await?;
        let deleted: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM memories WHERE seq IN (SELECT seq FROM memories WHERE expire_time <= ?1 LIMIT ?2) RETURNING seq",
        )
        .bind(now_micros())
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if deleted.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let change = self.vectors().begin_change();
        tx.commit().await?;
        change.applied(|index| index.remove(&deleted));
        Ok(deleted.len() as u64)
    }

    async fn record_access(&self, counts: &[(Uuid, i64, DateTime<Utc>)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer().begin().await?;
        for (id, n, t) in counts {
            sqlx::query(
                "UPDATE memories SET access_count = access_count + ?2, \
                 last_access_time = max(coalesce(last_access_time, ?3), ?3) WHERE id = ?1",
            )
            .bind(id)
            .bind(n)
            .bind(micros(*t))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, path::PathBuf, time::Instant};

    use serde_json::json;

    use super::*;
    use crate::{auth::Role, config::Config};

    const RED: &str = "red";
    const BLUE: &str = "blue";
    const MODEL: &str = "test-model";

    /// A store on a fresh file, removed when dropped.
    struct TestDb {
        store: SqliteStore,
        dir: PathBuf,
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn open() -> TestDb {
        let dir = std::env::temp_dir().join(format!("tmws-sqlite-memory-{}", Uuid::now_v7().simple()));
        let url = format!("sqlite://{}/t.db", dir.display());
        let cfg = Config::from_lookup(|k| (k == "TMWS_DATABASE_URL").then(|| url.clone())).expect("config");
        let store = SqliteStore::open(&cfg, true).await.expect("open");
        store.migrate().await.expect("migrate");
        TestDb { store, dir }
    }

    fn agent(id: &str, ns: &str) -> Principal {
        Principal::new(id, ns, Role::Agent)
    }

    fn admin(id: &str, ns: &str) -> Principal {
        Principal::new(id, ns, Role::Admin)
    }

    fn ctx() -> RequestContext {
        RequestContext {
            method: "tmws.v1.MemoryService/Test".into(),
            peer: Some("127.0.0.1:1".into()),
            request_id: "req-1".into(),
        }
    }

    /// A memory as the service would build it for `p` in its own namespace.
    fn draft(p: &Principal, content: &str, level: AccessLevel) -> NewMemory {
        NewMemory {
            id: Uuid::now_v7(),
            namespace: p.namespace.clone(),
            owner: p.agent_id.clone(),
            content: content.into(),
            summary: String::new(),
            kind: String::new(),
            tags: Vec::new(),
            metadata: json!({}),
            importance: 0.5,
            access_level: level,
            parent_id: None,
            embedding: None,
            embedding_model: Some(MODEL.into()),
            expire_time: None,
            request_id: None,
        }
    }

    async fn create(s: &SqliteStore, p: &Principal, m: NewMemory) -> Memory {
        s.insert_memories(p, vec![m], &ctx()).await.expect("insert").pop().expect("one")
    }

    async fn get(s: &SqliteStore, p: &Principal, ns: &str, id: Uuid) -> Option<Memory> {
        s.get_memory(p, ns, id, false).await.expect("get")
    }

    async fn audit_rows(s: &SqliteStore) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(s.reader()).await.expect("count")
    }

    async fn table_rows(s: &SqliteStore, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(s.reader()).await.expect("count")
    }

    fn patch_summary(text: &str) -> MemoryPatch {
        MemoryPatch { summary: Some(text.into()), ..MemoryPatch::default() }
    }

    fn grant(agent_id: &str, permission: Permission, expire_time: Option<DateTime<Utc>>) -> Grant {
        Grant { agent_id: agent_id.into(), permission, expire_time }
    }

    fn code(e: &Error) -> tonic::Code {
        e.code_and_reason().0
    }

    /// splitmix64 with a Box-Muller normal.
    struct Rng(u64);

    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.next_f64().max(1e-12), self.next_f64());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
        fn unit(&mut self, dim: usize) -> Vec<f32> {
            normalised((0..dim).map(|_| self.normal()).collect())
        }
    }

    fn normalised(v: Vec<f64>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| (x / n) as f32).collect()
    }

    #[tokio::test]
    async fn access_rules_follow_levels_grants_and_namespaces() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob, carol, root) =
            (agent("alice", RED), agent("bob", RED), agent("carol", BLUE), admin("root", RED));
        let private = create(s, &alice, draft(&alice, "alice private", AccessLevel::Private)).await.id;
        let team = create(s, &alice, draft(&alice, "alice team", AccessLevel::Team)).await.id;
        let shared = create(s, &alice, draft(&alice, "alice shared", AccessLevel::Shared)).await.id;
        let public = create(s, &alice, draft(&alice, "alice public", AccessLevel::Public)).await.id;
        let system = create(s, &root, draft(&root, "root system", AccessLevel::System)).await.id;
        let blue_private = create(s, &carol, draft(&carol, "carol private", AccessLevel::Private)).await.id;
        let read = [grant("carol", Permission::Read, None)];
        let shared_m = s.share_memory(&alice, RED, shared, &read, &[], None, &ctx()).await.expect("share");
        assert_eq!(shared_m.version, 2, "sharing is a change");
        assert_eq!(shared_m.grants, vec![grant("carol", Permission::Read, None)]);

        let all = [private, team, shared, public, system];
        let visible = |p: Principal, ns: &'static str| async move {
            let mut seen = HashSet::new();
            for id in all {
                if get(s, &p, ns, id).await.is_some() {
                    seen.insert(id);
                }
            }
            seen
        };
        let set = |ids: &[Uuid]| ids.iter().copied().collect::<HashSet<_>>();
        assert_eq!(visible(alice.clone(), RED).await, set(&all));
        assert_eq!(visible(bob.clone(), RED).await, set(&[team, public, system]));
        assert_eq!(visible(carol.clone(), BLUE).await, set(&[shared, public, system]), "grants cross namespaces");
        assert_eq!(visible(root.clone(), RED).await, set(&all));
        // An admin addresses another namespace; others see only what the rules give them.
        assert!(get(s, &root, BLUE, blue_private).await.is_some());
        assert!(get(s, &root, RED, blue_private).await.is_none(), "admins see all of the namespace they address");
        assert!(get(s, &alice, RED, blue_private).await.is_none());

        // List and count apply the same rules inside the query.
        let listed =
            s.list_memories(&bob, RED, &MemoryFilter::default(), OrderBy::CreateTimeDesc, None, 100, false).await;
        let listed: HashSet<Uuid> = listed.expect("list").into_iter().map(|m| m.id).collect();
        assert_eq!(listed, set(&[team, public, system]));

        // Writes: TEAM is readable but not writable by bob; SYSTEM only by admins.
        let upd = |p: &Principal, ns: &str, id: Uuid| {
            let (p, ns) = (p.clone(), ns.to_string());
            async move { s.update_memory(&p, &ns, id, None, &patch_summary("edited"), &ctx()).await }
        };
        assert_eq!(code(&upd(&bob, RED, team).await.unwrap_err()), tonic::Code::PermissionDenied);
        assert_eq!(code(&upd(&bob, RED, private).await.unwrap_err()), tonic::Code::NotFound);
        assert_eq!(code(&upd(&alice, RED, system).await.unwrap_err()), tonic::Code::PermissionDenied);
        upd(&root, RED, system).await.expect("admin writes SYSTEM");
        assert_eq!(code(&upd(&carol, BLUE, shared).await.unwrap_err()), tonic::Code::PermissionDenied);
        let to_system = MemoryPatch { access_level: Some(AccessLevel::System), ..MemoryPatch::default() };
        let e = s.update_memory(&alice, RED, private, None, &to_system, &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::PermissionDenied);
        let e = s.delete_memory(&bob, RED, team, None, &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::PermissionDenied);

        // A WRITE grant lets carol edit; only the owner (or an admin) may share.
        s.share_memory(&alice, RED, shared, &[grant("carol", Permission::Write, None)], &[], None, &ctx())
            .await
            .expect("upgrade");
        upd(&carol, BLUE, shared).await.expect("carol edits with a WRITE grant");
        let e = s
            .share_memory(&carol, BLUE, shared, &[grant("bob", Permission::Read, None)], &[], None, &ctx())
            .await
            .unwrap_err();
        assert_eq!(code(&e), tonic::Code::PermissionDenied, "a grantee may not re-share");
        let e = s
            .share_memory(&bob, RED, team, &[grant("carol", Permission::Read, None)], &[], None, &ctx())
            .await
            .unwrap_err();
        assert_eq!(code(&e), tonic::Code::PermissionDenied, "a non-owner may not share");

        // Revoking removes access at once; an expired grant never applies.
        s.share_memory(&alice, RED, shared, &[], &["carol".into()], None, &ctx()).await.expect("revoke");
        assert!(get(s, &carol, BLUE, shared).await.is_none());
        let past = Utc::now() - chrono::Duration::seconds(1);
        s.share_memory(&alice, RED, shared, &[grant("carol", Permission::Write, Some(past))], &[], None, &ctx())
            .await
            .expect("expired grant");
        assert!(get(s, &carol, BLUE, shared).await.is_none(), "an expired grant is ignored");
        assert_eq!(code(&upd(&carol, BLUE, shared).await.unwrap_err()), tonic::Code::NotFound);

        // A parent must be visible to the writer.
        let mut child = draft(&bob, "child", AccessLevel::Team);
        child.parent_id = Some(private);
        let e = s.insert_memories(&bob, vec![child.clone()], &ctx()).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(ref v) if v[0].field == "memory.parent_id"));
        child.parent_id = Some(team);
        let child = create(s, &bob, child).await;
        assert_eq!(child.parent_id, Some(team));
        let own_parent = MemoryPatch { parent_id: Some(Some(child.id)), ..MemoryPatch::default() };
        let e = s.update_memory(&bob, RED, child.id, None, &own_parent, &ctx()).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        // Deleting the parent clears the link.
        s.delete_memory(&alice, RED, team, None, &ctx()).await.expect("delete parent");
        assert_eq!(get(s, &bob, RED, child.id).await.expect("child").parent_id, None);
    }

    #[tokio::test]
    async fn expired_memories_vanish_at_once_and_are_swept() {
        let db = open().await;
        let s = &db.store;
        let alice = agent("alice", RED);
        let q = vec![1.0, 0.0, 0.0, 0.0];
        s.ensure_vector_index(4, 16, 64).await.expect("index");
        let mut gone = draft(&alice, "already expired", AccessLevel::Private);
        gone.expire_time = Some(Utc::now() - chrono::Duration::seconds(1));
        gone.embedding = Some(q.clone());
        let mut soon = draft(&alice, "expires soon", AccessLevel::Private);
        soon.expire_time = Some(Utc::now() + chrono::Duration::milliseconds(1000));
        soon.embedding = Some(q.clone());
        let mut stays = draft(&alice, "stays", AccessLevel::Private);
        stays.embedding = Some(vec![0.0, 1.0, 0.0, 0.0]);
        let made = s.insert_memories(&alice, vec![gone, soon, stays], &ctx()).await.expect("insert");
        let (gone, soon, stays) = (made[0].id, made[1].id, made[2].id);

        let f = MemoryFilter::default();
        let search = || async {
            let hits = s
                .semantic_search(&alice, RED, &f, &q, MODEL, 10, None, false, SearchColumns::Ranking)
                .await
                .expect("search");
            hits.into_iter().map(|h| h.memory.id).collect::<Vec<_>>()
        };
        assert!(get(s, &alice, RED, gone).await.is_none(), "expired rows are invisible at once");
        assert!(get(s, &alice, RED, soon).await.is_some());
        assert_eq!(search().await, vec![soon, stays]);
        assert_eq!(s.count_matching(&alice, RED, &f, MODEL, 4, 100).await.expect("count"), 2);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert!(get(s, &alice, RED, soon).await.is_none());
        assert_eq!(search().await, vec![stays]);
        let listed = s.list_memories(&alice, RED, &f, OrderBy::CreateTimeAsc, None, 10, false).await.expect("list");
        assert_eq!(listed.iter().map(|m| m.id).collect::<Vec<_>>(), vec![stays]);
        assert_eq!(s.stats(&alice, RED).await.expect("stats").total, 1);

        assert_eq!(table_rows(s, "memories").await, 3, "invisible until swept");
        assert_eq!(s.sweep_expired(1).await.expect("sweep"), 1, "bounded batches");
        assert_eq!(s.sweep_expired(10).await.expect("sweep"), 1);
        assert_eq!(s.sweep_expired(10).await.expect("sweep"), 0);
        assert_eq!(table_rows(s, "memories").await, 1);
        assert_eq!(table_rows(s, "memory_vectors").await, 1, "vectors go with their rows");
        assert_eq!(s.vectors().len(MODEL, 4), Some(1), "the cache follows the sweep");

        // Clearing the expiry makes a row permanent; setting one in the past hides it.
        let past =
            MemoryPatch { expire_time: Some(Some(Utc::now() - chrono::Duration::seconds(1))), ..Default::default() };
        let e = s.update_memory(&alice, RED, stays, None, &past, &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::NotFound, "a change that hides the row is refused as PostgreSQL does");
        assert!(get(s, &alice, RED, stays).await.is_some(), "and rolled back");
    }

    #[tokio::test]
    async fn version_mismatch_aborts_and_changes_nothing() {
        let db = open().await;
        let s = &db.store;
        let alice = agent("alice", RED);
        let m = create(s, &alice, draft(&alice, "versioned", AccessLevel::Private)).await;
        assert_eq!((m.version, m.etag()), (1, "v1".to_string()));
        let audits = audit_rows(s).await;

        let e = s.update_memory(&alice, RED, m.id, Some(7), &patch_summary("x"), &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::Aborted);
        assert!(e.to_string().contains("now v1"), "{e}");
        let e = s.delete_memory(&alice, RED, m.id, Some(2), &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::Aborted);
        let e = s
            .share_memory(&alice, RED, m.id, &[grant("bob", Permission::Read, None)], &[], Some(0), &ctx())
            .await
            .unwrap_err();
        assert_eq!(code(&e), tonic::Code::Aborted);
        let now = get(s, &alice, RED, m.id).await.expect("still there");
        assert_eq!((now.version, now.summary.as_str(), now.grants.len()), (1, "", 0));
        assert_eq!(audit_rows(s).await, audits, "failed changes leave no audit row");

        let patch = MemoryPatch {
            content: Some("new content".into()),
            summary: Some("new summary".into()),
            kind: Some("fact".into()),
            tags: Some(vec!["x".into(), "y".into()]),
            metadata: Some(json!({"k": [1, 2]})),
            importance: Some(0.9),
            access_level: Some(AccessLevel::Team),
            ..MemoryPatch::default()
        };
        let updated = s.update_memory(&alice, RED, m.id, Some(1), &patch, &ctx()).await.expect("update");
        assert_eq!(updated.version, 2);
        assert_eq!(
            (updated.content.as_str(), updated.summary.as_str(), updated.kind.as_str()),
            ("new content", "new summary", "fact")
        );
        assert_eq!(updated.tags, vec!["x", "y"]);
        assert_eq!(updated.metadata, json!({"k": [1, 2]}));
        assert_eq!((updated.importance, updated.access_level), (0.9, AccessLevel::Team));
        assert!(updated.update_time >= m.update_time);
        assert_eq!(updated.create_time, m.create_time);
        let e = s.delete_memory(&alice, RED, m.id, Some(1), &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::Aborted);
        s.delete_memory(&alice, RED, m.id, Some(2), &ctx()).await.expect("delete at the current version");
        assert!(get(s, &alice, RED, m.id).await.is_none());
        let e = s.delete_memory(&alice, RED, m.id, None, &ctx()).await.unwrap_err();
        assert_eq!(code(&e), tonic::Code::NotFound);
        assert_eq!(table_rows(s, "memory_tags").await, 0, "tags go with their row");
    }

    #[tokio::test]
    async fn create_is_idempotent_by_request_id() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        let mut first = draft(&alice, "once", AccessLevel::Private);
        first.request_id = Some("req-42".into());
        let a = create(s, &alice, first.clone()).await;
        // A retry (the service draws a new id) returns the first result.
        let mut retry = first.clone();
        retry.id = Uuid::now_v7();
        retry.content = "different text".into();
        let b = create(s, &alice, retry.clone()).await;
        assert_eq!(b, a);
        assert_eq!(table_rows(s, "memories").await, 1);
        // Within one batch, too; and the key is scoped to (namespace, owner).
        let mut other = draft(&alice, "another", AccessLevel::Private);
        other.request_id = Some("req-43".into());
        let mut again = other.clone();
        again.id = Uuid::now_v7();
        let batch = s.insert_memories(&alice, vec![retry, other, again], &ctx()).await.expect("batch");
        assert_eq!(batch[0].id, a.id);
        assert_eq!(batch[1].id, batch[2].id);
        assert_eq!(table_rows(s, "memories").await, 2);
        let mut bobs = draft(&bob, "bob's", AccessLevel::Private);
        bobs.request_id = Some("req-42".into());
        assert_ne!(create(s, &bob, bobs).await.id, a.id);
        assert_eq!(table_rows(s, "memories").await, 3);

        // All or nothing: a bad item fails the batch and writes nothing.
        let mut bad = draft(&alice, "orphan", AccessLevel::Private);
        bad.parent_id = Some(Uuid::now_v7());
        let audits = audit_rows(s).await;
        let e = s.insert_memories(&alice, vec![draft(&alice, "fine", AccessLevel::Private), bad], &ctx()).await;
        assert!(matches!(e, Err(Error::InvalidArgument(_))));
        assert_eq!(table_rows(s, "memories").await, 3);
        assert_eq!(audit_rows(s).await, audits);
    }

    #[tokio::test]
    async fn list_pages_through_every_order_and_filter() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        let mut items = Vec::new();
        for i in 0..12 {
            let mut m = draft(&alice, &format!("filterable memory {i}"), AccessLevel::Team);
            m.kind = if i % 3 == 0 { "decision".into() } else { "fact".into() };
            m.tags = match i % 4 {
                0 => vec!["a".into(), "b".into()],
                1 => vec!["a".into()],
                2 => vec!["b".into()],
                _ => vec![],
            };
            m.importance = f64::from(i) / 11.0;
            if i >= 6 {
                m.access_level = AccessLevel::Public;
            }
            m.metadata = json!({
                "parity": if i % 2 == 0 { "even" } else { "odd" },
                "i": i,
                "flag": i % 5 == 0,
                "nested": {"deep": {"n": i % 3}, "list": [i, "x", {"y": i % 2}]},
                "odd key \"q\"": i % 2,
            });
            items.push(m);
        }
        let created = s.insert_memories(&alice, items, &ctx()).await.expect("batch");
        create(s, &bob, draft(&bob, "bob's own", AccessLevel::Private)).await;
        let mut child = draft(&alice, "filterable memory 12", AccessLevel::Team);
        child.parent_id = Some(created[0].id);
        child.importance = 0.0;
        create(s, &alice, child).await;

        let me = &alice;
        let list = |f: MemoryFilter| async move {
            let rows = s.list_memories(me, RED, &f, OrderBy::CreateTimeAsc, None, 100, false).await.expect("list");
            let mut n: Vec<usize> = rows
                .iter()
                .filter_map(|m| m.content.strip_prefix("filterable memory ").and_then(|n| n.parse().ok()))
                .collect();
            n.sort_unstable();
            (rows.len(), n)
        };
        let f = MemoryFilter::default;
        assert_eq!(list(MemoryFilter { tags_any: vec!["a".into()], ..f() }).await.1, vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(
            list(MemoryFilter { tags_any: vec!["zzz".into(), "b".into()], ..f() }).await.1,
            vec![0, 2, 4, 6, 8, 10]
        );
        assert_eq!(list(MemoryFilter { tags_all: vec!["b".into(), "a".into()], ..f() }).await.1, vec![0, 4, 8]);
        assert_eq!(list(MemoryFilter { tags_all: vec!["a".into(), "a".into()], ..f() }).await.1.len(), 6);
        assert_eq!(list(MemoryFilter { kinds: vec!["decision".into()], ..f() }).await.1, vec![0, 3, 6, 9]);
        assert_eq!(list(MemoryFilter { owners: vec!["bob".into()], ..f() }).await.0, 0, "bob's PRIVATE stays hidden");
        assert_eq!(
            list(MemoryFilter { access_levels: vec![AccessLevel::Public], ..f() }).await.1,
            vec![6, 7, 8, 9, 10, 11]
        );
        assert_eq!(
            list(MemoryFilter { min_importance: Some(0.5), max_importance: Some(0.8), ..f() }).await.1,
            vec![6, 7, 8]
        );
        let middle = created[6].create_time;
        assert_eq!(list(MemoryFilter { create_time_after: Some(middle), ..f() }).await.1, vec![7, 8, 9, 10, 11, 12]);
        assert_eq!(list(MemoryFilter { create_time_before: Some(middle), ..f() }).await.1, vec![0, 1, 2, 3, 4, 5]);
        let meta = |v: Value| MemoryFilter { metadata_equals: Some(v), ..f() };
        assert_eq!(
            list(MemoryFilter { kinds: vec!["fact".into()], ..meta(json!({"parity": "odd"})) }).await.1,
            vec![1, 5, 7, 11]
        );
        assert_eq!(list(meta(json!({"i": 3.0}))).await.1, vec![3], "numbers compare by value");
        assert_eq!(list(meta(json!({"i": "3"}))).await.1, Vec::<usize>::new(), "types must match");
        assert_eq!(list(meta(json!({"flag": true}))).await.1, vec![0, 5, 10]);
        assert_eq!(list(meta(json!({"flag": 1}))).await.1, Vec::<usize>::new());
        assert_eq!(list(meta(json!({"nested": {"deep": {"n": 2}}}))).await.1, vec![2, 5, 8, 11]);
        assert_eq!(list(meta(json!({"nested": {"list": [{"y": 1}, "x"]}}))).await.1, vec![1, 3, 5, 7, 9, 11]);
        assert_eq!(list(meta(json!({"nested": {"list": [4]}}))).await.1, vec![4]);
        assert_eq!(list(meta(json!({"nested": {}}))).await.1.len(), 12, "an empty object contains nothing");
        assert_eq!(list(meta(json!({"odd key \"q\"": 1}))).await.1, vec![1, 3, 5, 7, 9, 11]);
        assert_eq!(list(meta(json!({"missing": null}))).await.1, Vec::<usize>::new());
        assert_eq!(list(MemoryFilter { parent_id: Some(created[0].id), ..f() }).await.1, vec![12]);

        // Keyset pages in every order visit each visible row once, in order.
        for order in [OrderBy::CreateTimeDesc, OrderBy::CreateTimeAsc, OrderBy::ImportanceDesc] {
            let mut seen: Vec<Memory> = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page = s.list_memories(&alice, RED, &f(), order, cursor.as_ref(), 5, false).await.expect("page");
                let Some(last) = page.last() else { break };
                cursor = Some(match order {
                    OrderBy::ImportanceDesc => Cursor::Importance(last.importance, last.id),
                    _ => Cursor::CreateTime(last.create_time.timestamp_micros(), last.id),
                });
                let done = page.len() < 5;
                seen.extend(page);
                if done {
                    break;
                }
            }
            assert_eq!(seen.len(), 13, "{order:?}");
            let keys: Vec<(f64, i64, Uuid)> =
                seen.iter().map(|m| (m.importance, m.create_time.timestamp_micros(), m.id)).collect();
            let mut sorted = keys.clone();
            match order {
                OrderBy::CreateTimeDesc => sorted.sort_by_key(|k| std::cmp::Reverse((k.1, k.2))),
                OrderBy::CreateTimeAsc => sorted.sort_by_key(|k| (k.1, k.2)),
                OrderBy::ImportanceDesc => sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.2.cmp(&a.2))),
            }
            assert_eq!(keys, sorted, "{order:?}");
        }
        let wrong = Cursor::Importance(0.5, Uuid::nil());
        let e = s.list_memories(&alice, RED, &f(), OrderBy::CreateTimeDesc, Some(&wrong), 5, false).await;
        assert!(matches!(e, Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn keyword_search_uses_fts5() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        let mut texts = vec![
            ("the zanzibar handshake protocol", AccessLevel::Team, vec![]),
            ("running quickly through the fields", AccessLevel::Team, vec!["outdoors"]),
            ("quarterly budget spreadsheet review", AccessLevel::Team, vec!["finance"]),
            ("the cat sat on the mat", AccessLevel::Team, vec![]),
            ("zanzibar zanzibar zanzibar travel notes", AccessLevel::Team, vec![]),
            ("secret zanzibar plan", AccessLevel::Private, vec![]),
        ];
        let mut items = Vec::new();
        for (i, (text, level, tags)) in texts.drain(..).enumerate() {
            let mut m = draft(&alice, text, level);
            m.tags = tags.into_iter().map(String::from).collect();
            m.embedding = (i < 3).then(|| vec![1.0, i as f32]);
            items.push(m);
        }
        let made = s.insert_memories(&alice, items, &ctx()).await.expect("insert");
        let f = MemoryFilter::default();
        let kw = |p: Principal, text: &'static str| {
            let f = f.clone();
            async move {
                let hits = s
                    .keyword_search(&p, RED, &f, text, "english", 10, SearchColumns::Ranking, 2)
                    .await
                    .expect("keyword");
                hits.into_iter().map(|h| (h.memory.content, h.score, h.vector)).collect::<Vec<_>>()
            }
        };
        let contents = |hits: &[(String, f64, Option<Vec<f32>>)]| hits.iter().map(|h| h.0.clone()).collect::<Vec<_>>();

        let z = kw(alice.clone(), "Zanzibar").await;
        assert_eq!(z.len(), 3);
        assert_eq!(z[0].0, "zanzibar zanzibar zanzibar travel notes", "more occurrences rank higher");
        assert!(z.iter().all(|h| h.1 > 0.0), "scores are positive");
        assert!(z.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
        assert_eq!(kw(bob.clone(), "zanzibar").await.len(), 2, "bob does not see alice's PRIVATE row");
        assert_eq!(contents(&kw(alice.clone(), "run").await), vec!["running quickly through the fields"], "stemmed");
        assert_eq!(contents(&kw(alice.clone(), "finance").await), vec!["quarterly budget spreadsheet review"], "tags");
        assert_eq!(kw(alice.clone(), "the zanzibar").await.len(), 3, "stop words are dropped");
        assert!(kw(alice.clone(), "the").await.is_empty(), "only stop words match nothing");
        assert_eq!(kw(alice.clone(), "cat or budget").await.len(), 2);
        assert_eq!(kw(alice.clone(), "zanzibar -travel").await.len(), 2);
        assert_eq!(kw(alice.clone(), "\"sat on the mat\"").await.len(), 1, "phrases");
        assert!(kw(alice.clone(), "\"mat the on\"").await.is_empty());
        for odd in ["\"", "-", "NEAR(a b)", "a* OR ^b", "col:zanzibar", "((", "'; DROP TABLE memories; --", "+++"] {
            kw(alice.clone(), odd).await; // never an FTS5 syntax error
        }
        // Vectors of the asked dimension come along; others do not.
        let hs = kw(alice.clone(), "handshake").await;
        assert_eq!(hs[0].2, Some(vec![1.0, 0.0]));
        let hits = s
            .keyword_search(&alice, RED, &f, "handshake", "english", 10, SearchColumns::Embedding, 3)
            .await
            .expect("kw");
        assert!(hits[0].vector.is_none() && hits[0].memory.embedding.is_none());
        // Filters apply inside the query.
        let only_finance = MemoryFilter { tags_any: vec!["finance".into()], ..MemoryFilter::default() };
        let hits = s
            .keyword_search(&alice, RED, &only_finance, "budget or cat", "english", 10, SearchColumns::Ranking, 2)
            .await;
        assert_eq!(hits.expect("kw").len(), 1);

        // Changes and deletes are reflected at once.
        let patch = MemoryPatch { content: Some("a lighthouse keeper's log".into()), ..MemoryPatch::default() };
        s.update_memory(&alice, RED, made[3].id, None, &patch, &ctx()).await.expect("update");
        assert!(kw(alice.clone(), "cat").await.is_empty());
        assert_eq!(kw(alice.clone(), "lighthouse").await.len(), 1);
        s.delete_memory(&alice, RED, made[4].id, None, &ctx()).await.expect("delete");
        assert_eq!(kw(alice.clone(), "zanzibar").await.len(), 2);
        let fts: i64 = sqlx::query_scalar("SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'travel'")
            .fetch_one(s.reader())
            .await
            .expect("fts");
        assert_eq!(fts, 0, "the index forgets deleted rows");
    }

    #[test]
    fn web_search_syntax_becomes_quoted_fts5() {
        assert_eq!(fts_query("zanzibar", "english").as_deref(), Some("(\"zanzibar\")"));
        assert_eq!(fts_query("the cat", "english").as_deref(), Some("(\"cat\")"));
        assert_eq!(fts_query("the cat", "simple").as_deref(), Some("(\"the\" AND \"cat\")"));
        assert_eq!(fts_query("a or the", "english"), None);
        assert_eq!(
            fts_query("cat dog OR \"on the mat\" -fish", "english").as_deref(),
            Some("(\"cat\" AND \"dog\") OR ((\"on the mat\") NOT \"fish\")")
        );
        assert_eq!(fts_query("-only -negations", "english"), None);
        assert_eq!(
            fts_query("x\"unterminated phrase", "english").as_deref(),
            Some("(\"x\" AND \"unterminated phrase\")")
        );
        assert_eq!(fts_query("c++ *", "english").as_deref(), Some("(\"c++\")"));
        assert_eq!(fts_query("don't", "english"), None, "every part a stop word");
    }

    /// Visible to `p` searching its own namespace: the access rules, restated.
    fn visible_to(p: &Principal, owner: &str, level: AccessLevel, granted: bool) -> bool {
        owner == p.agent_id
            || level == AccessLevel::Team
            || matches!(level, AccessLevel::Public | AccessLevel::System)
            || (level == AccessLevel::Shared && granted)
    }

    #[tokio::test]
    async fn semantic_search_equals_brute_force() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        let dim = 32;
        let mut rng = Rng(42);
        let centres: Vec<Vec<f32>> = (0..12).map(|_| rng.unit(dim)).collect();
        struct Row {
            id: Uuid,
            owner: String,
            level: AccessLevel,
            rare: bool,
            granted: bool,
            vector: Vec<f32>,
        }
        let mut rows: Vec<Row> = Vec::new();
        for part in 0..2 {
            if part == 1 {
                // Half the rows are loaded from the table, half arrive as committed changes.
                s.ensure_vector_index(dim, 16, 64).await.expect("index");
            }
            for batch in 0..4 {
                let mut items = Vec::new();
                for i in 0..200 {
                    let n = rows.len() + items.len();
                    let (owner, level) = match n % 10 {
                        0..=3 => (&alice, AccessLevel::Private),
                        4 => (&alice, AccessLevel::Team),
                        5 => (&alice, AccessLevel::Public),
                        6 => (&alice, AccessLevel::Shared),
                        7 => (&bob, AccessLevel::Private),
                        _ => (&bob, AccessLevel::Team),
                    };
                    let c = &centres[(batch * 7 + i) % centres.len()];
                    let v = normalised(c.iter().map(|x| f64::from(*x) + 0.35 * rng.normal() / 5.0).collect());
                    let mut m = draft(owner, &format!("vector {n}"), level);
                    m.embedding = Some(v.iter().map(|x| x * 3.0).collect()); // stored unnormalised
                    m.tags = if rng.next_f64() < 0.1 { vec!["rare".into()] } else { vec!["common".into()] };
                    items.push(m);
                }
                let owner = items[0].owner.clone();
                let p = if owner == "alice" { &alice } else { &bob };
                let made = s.insert_memories(p, items.clone(), &ctx()).await.expect("insert");
                for (m, item) in made.iter().zip(&items) {
                    rows.push(Row {
                        id: m.id,
                        owner: m.owner.clone(),
                        level: m.access_level,
                        rare: item.tags[0] == "rare",
                        granted: false,
                        vector: item.embedding.clone().expect("vector"),
                    });
                }
            }
        }
        // Half of alice's SHARED rows are granted to bob.
        for row in rows.iter_mut().filter(|r| r.level == AccessLevel::Shared).step_by(2) {
            s.share_memory(&alice, RED, row.id, &[grant("bob", Permission::Read, None)], &[], None, &ctx())
                .await
                .expect("share");
            row.granted = true;
        }
        assert_eq!(s.vectors().len(MODEL, dim), Some(rows.len()));

        let brute = |p: &Principal, q: &[f32], k: usize, rare: bool, min: Option<f64>| {
            let mut scored: Vec<(f64, Uuid)> = rows
                .iter()
                .filter(|r| visible_to(p, &r.owner, r.level, r.granted) && (!rare || r.rare))
                .map(|r| (ranking::cosine(&r.vector, q), r.id))
                .filter(|(sim, _)| min.is_none_or(|m| *sim >= m))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            scored.into_iter().take(k).collect::<Vec<_>>()
        };
        let rare = MemoryFilter { tags_any: vec!["rare".into()], ..MemoryFilter::default() };
        let none = MemoryFilter::default();
        for (qi, centre) in centres.iter().enumerate().take(8) {
            let q: Vec<f32> = if qi % 2 == 0 { rng.unit(dim) } else { centre.clone() };
            for p in [&alice, &bob] {
                for (filter, is_rare) in [(&none, false), (&rare, true)] {
                    let truth = brute(p, &q, 10, is_rare, None);
                    for exact in [false, true] {
                        let hits = s
                            .semantic_search(p, RED, filter, &q, MODEL, 10, None, exact, SearchColumns::Ranking)
                            .await
                            .expect("search");
                        let got: Vec<Uuid> = hits.iter().map(|h| h.memory.id).collect();
                        let want: Vec<Uuid> = truth.iter().map(|t| t.1).collect();
                        assert_eq!(got, want, "{} exact={exact} rare={is_rare} q={qi}", p.agent_id);
                        for (h, t) in hits.iter().zip(&truth) {
                            assert!((h.score - t.0).abs() < 1e-6, "score is the cosine similarity");
                            assert!(h.vector.is_some() && h.memory.embedding.is_none());
                        }
                    }
                }
                // The distance cut-off.
                let truth = brute(p, &q, 400, false, Some(0.5));
                let hits =
                    s.semantic_search(p, RED, &none, &q, MODEL, 400, Some(0.5), false, SearchColumns::Embedding).await;
                let hits = hits.expect("search");
                assert_eq!(
                    hits.iter().map(|h| h.memory.id).collect::<Vec<_>>(),
                    truth.iter().map(|t| t.1).collect::<Vec<_>>()
                );
                assert!(hits.iter().all(|h| h.score >= 0.5 && h.memory.embedding.is_some()));
            }
        }
        // count_matching counts what exact search would consider.
        let n = rows.iter().filter(|r| visible_to(&bob, &r.owner, r.level, r.granted) && r.rare).count() as u64;
        assert_eq!(s.count_matching(&bob, RED, &rare, MODEL, dim, 100_000).await.expect("count"), n);
        assert_eq!(s.count_matching(&bob, RED, &rare, MODEL, dim, 3).await.expect("count"), 3, "capped");
        assert_eq!(s.count_matching(&bob, RED, &rare, "other-model", dim, 100).await.expect("count"), 0);

        // Another namespace or model sees nothing; a reload gives the same answers.
        let q = centres[0].clone();
        let carol = agent("carol", BLUE);
        assert!(
            s.semantic_search(&carol, BLUE, &none, &q, MODEL, 10, None, false, SearchColumns::Ranking)
                .await
                .expect("s")
                .is_empty()
        );
        assert!(
            s.semantic_search(&alice, RED, &none, &q, "other", 10, None, false, SearchColumns::Ranking)
                .await
                .expect("s")
                .is_empty()
        );
        let before = s
            .semantic_search(&bob, RED, &rare, &q, MODEL, 10, None, false, SearchColumns::Ranking)
            .await
            .expect("search");
        s.vectors().clear();
        // Without the copy, candidates come from the table.
        let scope = SearchScope { p: &bob, ns: RED, filter: &rare, model: MODEL, dim, now: now_micros() };
        let mut qn = q.clone();
        vectors::normalize(&mut qn);
        assert!(s.cached_candidates(&scope, &qn, f32::NEG_INFINITY).await.expect("cached").is_none());
        let from_table = s.exact_candidates(&scope, &qn, f32::NEG_INFINITY).await.expect("exact");
        assert_eq!(from_table.len() as u64, n);
        let after = s
            .semantic_search(&bob, RED, &rare, &q, MODEL, 10, None, false, SearchColumns::Ranking)
            .await
            .expect("search");
        assert_eq!(s.vectors().len(MODEL, dim), Some(rows.len()), "lazily reloaded");
        let ids = |h: &[ScoredMemory]| h.iter().map(|h| h.memory.id).collect::<Vec<_>>();
        assert_eq!(ids(&before), ids(&after));
    }

    #[tokio::test]
    async fn deleted_and_changed_vectors_leave_search() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        s.ensure_vector_index(8, 16, 64).await.expect("index");
        let mut rng = Rng(7);
        let mut items = Vec::new();
        for i in 0..60 {
            let mut m =
                draft(&alice, &format!("v{i}"), if i % 2 == 0 { AccessLevel::Team } else { AccessLevel::Private });
            m.embedding = Some(rng.unit(8));
            m.importance = if i < 10 { 0.1 } else { 0.9 };
            items.push(m);
        }
        let made = s.insert_memories(&alice, items, &ctx()).await.expect("insert");
        let f = MemoryFilter::default();
        let q = rng.unit(8);
        let top = |p: Principal, exact: bool| {
            let (f, q) = (f.clone(), q.clone());
            async move {
                let hits = s
                    .semantic_search(&p, RED, &f, &q, MODEL, 5, None, exact, SearchColumns::Ranking)
                    .await
                    .expect("search");
                hits.into_iter().map(|h| (h.memory.id, h.score)).collect::<Vec<_>>()
            }
        };

        let first = top(alice.clone(), false).await[0].0;
        s.delete_memory(&alice, RED, first, None, &ctx()).await.expect("delete");
        for exact in [false, true] {
            assert!(top(alice.clone(), exact).await.iter().all(|h| h.0 != first), "deleted rows leave search");
        }
        assert_eq!(s.vectors().len(MODEL, 8), Some(59));

        // A new vector moves a row to the top; a narrower level hides it from bob.
        let target = made[58].id;
        let patch = MemoryPatch { embedding: Some((q.clone(), MODEL.into())), ..MemoryPatch::default() };
        s.update_memory(&alice, RED, target, None, &patch, &ctx()).await.expect("update");
        let best = top(alice.clone(), false).await[0];
        assert_eq!(best.0, target);
        assert!((best.1 - 1.0).abs() < 1e-6);
        assert_eq!(top(bob.clone(), false).await[0].0, target, "TEAM row");
        let private = MemoryPatch { access_level: Some(AccessLevel::Private), ..MemoryPatch::default() };
        s.update_memory(&alice, RED, target, None, &private, &ctx()).await.expect("update");
        assert!(top(bob.clone(), false).await.iter().all(|h| h.0 != target));
        assert!(top(bob.clone(), true).await.iter().all(|h| h.0 != target));
        let got = s.get_memory(&alice, RED, target, true).await.expect("get").expect("row");
        assert_eq!(got.embedding.as_deref(), Some(q.as_slice()));

        // A vector of another model leaves this model's search.
        let other = MemoryPatch { embedding: Some((q.clone(), "other".into())), ..MemoryPatch::default() };
        s.update_memory(&alice, RED, target, None, &other, &ctx()).await.expect("update");
        assert!(top(alice.clone(), false).await.iter().all(|h| h.0 != target));
        assert_eq!(s.vectors().len(MODEL, 8), Some(58));

        // Prune removes rows and their cached vectors.
        let future = Utc::now() + chrono::Duration::hours(1);
        let c = PruneCriteria {
            namespace: RED.into(),
            owner: Some("alice".into()),
            expired: false,
            older_than: Some((future, 0.5)),
            limit: 100,
            dry_run: false,
        };
        let pruned: HashSet<Uuid> = made[..10].iter().map(|m| m.id).filter(|id| *id != first).collect();
        assert_eq!(s.prune(&c).await.expect("prune"), (pruned.len() as i64, false));
        assert_eq!(s.vectors().len(MODEL, 8), Some(58 - pruned.len()));
        let everything =
            s.semantic_search(&alice, RED, &f, &q, MODEL, 100, None, false, SearchColumns::Ranking).await.expect("all");
        assert_eq!(everything.len(), 58 - pruned.len());
        assert!(everything.iter().all(|h| !pruned.contains(&h.memory.id)));
    }

    #[tokio::test]
    async fn audit_rows_exist_exactly_with_changes() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob) = (agent("alice", RED), agent("bob", RED));
        let made = s
            .insert_memories(
                &alice,
                vec![draft(&alice, "one", AccessLevel::Team), draft(&alice, "two", AccessLevel::Team)],
                &ctx(),
            )
            .await
            .expect("insert");
        assert_eq!(audit_rows(s).await, 2, "one row per created memory");
        let id = made[0].id;
        s.update_memory(&alice, RED, id, None, &patch_summary("s"), &ctx()).await.expect("update");
        s.share_memory(&alice, RED, id, &[grant("carol", Permission::Read, None)], &[], None, &ctx())
            .await
            .expect("share");
        assert_eq!(audit_rows(s).await, 4);
        // Refused changes: no audit row, no change.
        assert!(s.update_memory(&bob, RED, id, None, &patch_summary("b"), &ctx()).await.is_err());
        assert!(s.delete_memory(&bob, RED, id, None, &ctx()).await.is_err());
        assert!(s.share_memory(&bob, RED, id, &[], &["carol".into()], None, &ctx()).await.is_err());
        assert_eq!(audit_rows(s).await, 4);
        s.delete_memory(&alice, RED, id, None, &ctx()).await.expect("delete");
        assert_eq!(audit_rows(s).await, 5);

        let row = sqlx::query(
            "SELECT agent_id, namespace, method, resource_id, code, peer, request_id FROM audit_events ORDER BY time DESC, id DESC LIMIT 1",
        )
        .fetch_one(s.reader())
        .await
        .expect("audit row");
        let cols: Vec<Option<String>> = (0..7).map(|i| row.try_get(i).expect("col")).collect();
        let want = ["alice", RED, "tmws.v1.MemoryService/Test", &id.to_string(), "OK", "127.0.0.1:1", "req-1"];
        assert_eq!(cols, want.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn stats_prune_access_counts_and_secrets() {
        let db = open().await;
        let s = &db.store;
        let (alice, bob, root) = (agent("alice", RED), agent("bob", RED), admin("root", RED));
        let mut items = Vec::new();
        for i in 0..6 {
            let mut m = draft(&alice, &format!("note {i}"), AccessLevel::Team);
            m.kind = if i < 4 { "fact".into() } else { "decision".into() };
            m.importance = if i < 3 { 0.1 } else { 0.9 };
            m.embedding = (i % 2 == 0).then(|| vec![1.0, 0.0]);
            items.push(m);
        }
        let made = s.insert_memories(&alice, items, &ctx()).await.expect("insert");
        let mut bobs = draft(&bob, "bob's note", AccessLevel::Team);
        bobs.importance = 0.0;
        create(s, &bob, bobs).await;
        create(s, &bob, draft(&bob, "bob's secret", AccessLevel::Private)).await;

        let stats = s.stats(&alice, RED).await.expect("stats");
        assert_eq!(stats.total, 7);
        assert_eq!(stats.by_kind, vec![("".to_string(), 1), ("decision".into(), 2), ("fact".into(), 4)]);
        assert_eq!(stats.by_access_level, vec![(AccessLevel::Team, 7)]);
        assert_eq!(stats.with_embedding, 3);
        assert!(stats.storage_bytes > 0);
        assert_eq!(stats.oldest, Some(made[0].create_time));
        assert_eq!(s.stats(&root, RED).await.expect("stats").total, 8, "admins count the whole namespace");

        let future = Utc::now() + chrono::Duration::hours(1);
        let criteria = |owner: Option<&str>, limit: usize, dry_run: bool| PruneCriteria {
            namespace: RED.into(),
            owner: owner.map(String::from),
            expired: false,
            older_than: Some((future, 0.5)),
            limit,
            dry_run,
        };
        assert_eq!(s.prune(&criteria(Some("alice"), 100, true)).await.expect("dry"), (3, false));
        assert_eq!(s.prune(&criteria(Some("alice"), 2, true)).await.expect("dry"), (2, true));
        assert_eq!(table_rows(s, "memories").await, 8, "a dry run deletes nothing");
        assert_eq!(s.prune(&criteria(Some("alice"), 2, false)).await.expect("prune"), (2, true));
        assert_eq!(s.prune(&criteria(Some("alice"), 100, false)).await.expect("prune"), (1, false));
        assert_eq!(table_rows(s, "memories").await, 5, "bob's memories survive alice's prune");
        assert_eq!(s.prune(&criteria(None, 100, false)).await.expect("prune"), (2, false), "the whole namespace");
        let expired = PruneCriteria { expired: true, older_than: None, ..criteria(None, 100, false) };
        assert_eq!(s.prune(&expired).await.expect("prune"), (0, false));

        let id = made[5].id;
        let t1 = Utc::now();
        let t0 = t1 - chrono::Duration::seconds(10);
        s.record_access(&[(id, 2, t1)]).await.expect("access");
        s.record_access(&[(id, 3, t0), (Uuid::now_v7(), 1, t0)]).await.expect("access");
        let m = get(s, &alice, RED, id).await.expect("row");
        assert_eq!(m.access_count, 5);
        assert_eq!(m.last_access_time.map(|t| t.timestamp_micros()), Some(t1.timestamp_micros()), "the latest read");
        assert_eq!(m.version, 1, "reads are not changes");

        let a = s.secret("k", &|| vec![1, 2, 3]).await.expect("secret");
        let b = s.secret("k", &|| vec![9, 9, 9]).await.expect("secret");
        assert_eq!((a, b), (vec![1, 2, 3], vec![1, 2, 3]), "created once");
    }

    #[tokio::test]
    async fn verification_reads_candidates_by_key() {
        let db = open().await;
        let s = &db.store;
        let alice = agent("alice", RED);
        let f = MemoryFilter { tags_any: vec!["a".into()], ..MemoryFilter::default() };
        let scope = SearchScope { p: &alice, ns: RED, filter: &f, model: MODEL, dim: 4, now: now_micros() };
        let mut qb = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN SELECT m.seq, v.embedding");
        scope.push_from_where(&mut qb, Some("[1, 2, 3]".into())).expect("sql");
        let plan: Vec<String> = qb
            .build()
            .fetch_all(s.reader())
            .await
            .expect("plan")
            .iter()
            .map(|r| r.try_get::<String, _>(3).expect("detail"))
            .collect();
        assert!(plan[0].starts_with("SCAN c"), "the candidate list drives: {plan:?}");
        assert!(plan[1].contains("INTEGER PRIMARY KEY"), "rows are read by key: {plan:?}");

        // Counting and exact candidates with a tag filter start from the namespace's tags.
        let mut qb = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN SELECT m.seq");
        scope.push_from_where(&mut qb, None).expect("sql");
        let plan: Vec<String> = qb
            .build()
            .fetch_all(s.reader())
            .await
            .expect("plan")
            .iter()
            .map(|r| r.try_get::<String, _>(3).expect("detail"))
            .collect();
        assert!(plan[0].contains("INTEGER PRIMARY KEY"), "{plan:?}");
        assert!(plan.iter().any(|p| p.contains("SEARCH t USING PRIMARY KEY (namespace=? AND tag=?)")), "{plan:?}");
    }

    /// Top-10 over 50,000 stored 384-dimensional vectors. Run with
    /// `cargo test --release --lib bench_semantic_50k -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_semantic_50k() {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let db = open().await;
            let s = &db.store;
            let alice = agent("alice", RED);
            let (dim, total, batch) = (384, 50_000, 500);
            s.ensure_vector_index(dim, 16, 64).await.expect("index");
            let mut rng = Rng(2024);
            let started = Instant::now();
            for b in 0..total / batch {
                let items: Vec<NewMemory> = (0..batch)
                    .map(|i| {
                        let mut m = draft(
                            &alice,
                            &format!("benchmark memory {} of the set", b * batch + i),
                            AccessLevel::Private,
                        );
                        m.embedding = Some(rng.unit(dim));
                        if (b * batch + i) % 100 == 0 {
                            m.tags = vec!["rare".into()];
                        }
                        m
                    })
                    .collect();
                s.insert_memories(&alice, items, &ctx()).await.expect("insert");
            }
            println!("inserted {total} memories in {:.1} s", started.elapsed().as_secs_f64());

            let f = MemoryFilter::default();
            let mut times = Vec::new();
            for _ in 0..50 {
                let q = rng.unit(dim);
                let t = Instant::now();
                let hits = s
                    .semantic_search(&alice, RED, &f, &q, MODEL, 10, None, false, SearchColumns::Ranking)
                    .await
                    .expect("search");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(hits.len(), 10);
            }
            times.sort_by(f64::total_cmp);
            let pct = |p: f64| times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
            println!(
                "semantic_search k=10 over {total} x {dim}: median {:.2} ms, p99 {:.2} ms, min {:.2} ms",
                pct(0.5),
                pct(0.99),
                times[0]
            );

            // A selective filter, as the service runs it: count, then the exact path.
            let rare = MemoryFilter { tags_any: vec!["rare".into()], ..MemoryFilter::default() };
            let mut times = Vec::new();
            for _ in 0..20 {
                let q = rng.unit(dim);
                let t = Instant::now();
                let n = s.count_matching(&alice, RED, &rare, MODEL, dim, 10_000).await.expect("count");
                let hits = s
                    .semantic_search(&alice, RED, &rare, &q, MODEL, 10, None, true, SearchColumns::Ranking)
                    .await
                    .expect("search");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                assert_eq!((n, hits.len()), ((total / 100) as u64, 10));
            }
            times.sort_by(f64::total_cmp);
            println!("count_matching + exact semantic_search, 1% tag filter: median {:.2} ms", times[times.len() / 2]);

            s.vectors().clear();
            let t = Instant::now();
            s.ensure_vector_index(dim, 16, 64).await.expect("reload");
            println!("cold load of {total} vectors: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
        });
    }
}
