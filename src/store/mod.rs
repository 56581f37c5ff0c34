//! Persistence. All SQL lives under this module; callers see domain types only.

pub mod identity;
pub mod memory;
pub mod notify;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod transfer;
pub mod workflow;

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use identity::IdentityStore;
pub use postgres::PgStore;
pub use redis::RedisStore;
pub use sqlite::SqliteStore;
pub use workflow::WorkflowStore;

use crate::{
    auth::{Principal, RequestContext},
    config::{Config, DatabaseKind},
    error::Result,
    memory::{
        Cursor, Grant, Memory, MemoryFilter, MemoryPatch, MemoryStats, NewMemory, OrderBy, PruneCriteria, ScoredMemory,
        SearchColumns,
    },
};

/// Storage of memories. Every read takes the caller's principal and applies the access rules in
/// the query itself; a row the caller may not see behaves as if it did not exist.
#[async_trait]
pub trait MemoryStore: Send + Sync + 'static {
    /// A named server secret shared by every replica; created from `generate` on first use.
    async fn secret(&self, name: &str, generate: &(dyn Fn() -> Vec<u8> + Send + Sync)) -> Result<Vec<u8>>;

    /// Makes sure the ANN index for vectors of `dim` dimensions exists.
    async fn ensure_vector_index(&self, dim: usize, m: u32, ef_construction: u32) -> Result<()>;

    /// Inserts all or nothing; items whose `request_id` was seen before return the first result.
    /// Every change below appends its audit row (from `ctx`) in the same transaction.
    async fn insert_memories(&self, p: &Principal, items: Vec<NewMemory>, ctx: &RequestContext) -> Result<Vec<Memory>>;

    async fn get_memory(&self, p: &Principal, ns: &str, id: Uuid, with_embedding: bool) -> Result<Option<Memory>>;

    /// The memories of `ids` that `p` may see (without vectors), in any order; ids that are
    /// missing or hidden are left out.
    async fn get_memories(&self, p: &Principal, ns: &str, ids: &[Uuid]) -> Result<Vec<Memory>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.get_memory(p, ns, *id, false).await?);
        }
        Ok(out)
    }

    /// NOT_FOUND when invisible, PERMISSION_DENIED when visible but not writable, ABORTED on a
    /// version mismatch.
    async fn update_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        patch: &MemoryPatch,
        ctx: &RequestContext,
    ) -> Result<Memory>;

    async fn delete_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<()>;

    #[allow(clippy::too_many_arguments)]
    async fn list_memories(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        order: OrderBy,
        after: Option<&Cursor>,
        limit: usize,
        with_embedding: bool,
    ) -> Result<Vec<Memory>>;

    /// How many visible memories with vectors of this model match `filter`, counting at most `cap`.
    async fn count_matching(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        model: &str,
        dim: usize,
        cap: u64,
    ) -> Result<u64>;

    /// The `k` nearest visible memories by cosine distance, best first; score = cosine similarity.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Vec<ScoredMemory>>;

    /// Full-text matches, best first; score = ts_rank_cd. `dim` selects which stored vectors to
    /// return alongside (for MMR).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Vec<ScoredMemory>>;

    #[allow(clippy::too_many_arguments)]
    async fn share_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        grants: &[Grant],
        revoke: &[String],
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<Memory>;

    /// Deletes (or counts, when dry-run) up to `limit` matching memories; returns the count and
    /// whether more remain.
    async fn prune(&self, criteria: &PruneCriteria) -> Result<(i64, bool)>;

    async fn stats(&self, p: &Principal, ns: &str) -> Result<MemoryStats>;

    /// Deletes up to `batch` expired memories; returns how many.
    async fn sweep_expired(&self, batch: usize) -> Result<u64>;

    /// Adds deferred read counts: (id, reads, last read time).
    async fn record_access(&self, counts: &[(Uuid, i64, DateTime<Utc>)]) -> Result<()>;
}

/// Stored memories per namespace, and queued tasks per (namespace, queue): sampled gauges.
pub type Counts = (BTreeMap<String, i64>, BTreeMap<(String, String), i64>);

/// One storage backend: PostgreSQL (+ pgvector), or the embedded SQLite file.
#[async_trait]
pub trait Backend: MemoryStore + WorkflowStore + IdentityStore {
    /// `postgres` or `sqlite` (logs, health details).
    fn kind(&self) -> DatabaseKind;
    /// One round trip; used by the health watcher.
    async fn ping(&self) -> Result<()>;
    /// (connections, idle connections, maximum) of the pool.
    fn pool_stats(&self) -> (u64, u64, u64);
    /// Sampled gauges: stored memories per namespace and queued tasks per queue (at most 1000
    /// label sets each, largest first).
    async fn sample_counts(&self) -> Result<Counts>;
    /// The wake-up channel of workflow changes (LISTEN/NOTIFY on PostgreSQL, in-process on
    /// SQLite); the handle, when there is one, is the listening task.
    async fn notifier(&self) -> anyhow::Result<(notify::Notifier, Option<tokio::task::JoinHandle<()>>)>;
    async fn close(&self);

    /// Export: up to `limit` portable rows of `table` after skipping `offset`, in key order.
    async fn export_rows(
        &self,
        table: &'static transfer::Table,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>>;
    /// Export: runs not in a final state plus unfinished standalone tasks (not exported).
    async fn count_unfinished(&self) -> Result<u64>;
    /// Import: inserts every row in one transaction (existing keys are skipped), then rebuilds
    /// derived data.
    async fn import_rows(&self, rows: transfer::RowStream) -> Result<transfer::Counts>;
}

/// The shared handle to the configured backend.
pub type Db = Arc<dyn Backend>;

/// Opens the configured backend: creates the database (or file) when `create` is set, waits for
/// it (PostgreSQL: up to TMWS_DB_STARTUP_TIMEOUT), and applies migrations when `migrate` is set.
/// The embedded file is opened as its single owner (see [`open_shared`]).
pub async fn open(config: &Config, create: bool, migrate: bool) -> anyhow::Result<Db> {
    open_with(config, create, migrate, true).await
}

/// Like [`open`], but beside a running owner of the embedded file: for `tmws agents`, whose
/// writes (agents, API keys) no server caches. SQLite serialises the
/// writes of both processes.
pub async fn open_shared(config: &Config, create: bool, migrate: bool) -> anyhow::Result<Db> {
    open_with(config, create, migrate, false).await
}

async fn open_with(config: &Config, create: bool, migrate: bool, owner: bool) -> anyhow::Result<Db> {
    match config.database_kind() {
        DatabaseKind::Postgres => {
            if create {
                postgres::ensure_database(&config.database_url).await?;
            }
            let pg = PgStore::connect(config).await?;
            if migrate {
                pg.migrate().await?;
            }
            Ok(Arc::new(pg))
        }
        DatabaseKind::Sqlite => {
            let store = SqliteStore::open_as(config, create, owner).await?;
            if migrate {
                store.migrate().await?;
            }
            Ok(Arc::new(store))
        }
    }
}
