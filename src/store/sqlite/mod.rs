//! The embedded store: one SQLite file in WAL mode, owned by one process.
//!
//! Zero setup: `cargo run` with no TMWS_DATABASE_URL opens (and creates) `./data/tmws.db`.
//! Conventions: times are INTEGER microseconds since the epoch (UTC), UUIDs 16-byte BLOBs, JSON
//! and string lists TEXT. Writes go through a single-connection writer pool, so transactions
//! never race for SQLite's write lock inside the process; reads use a pool of read-only
//! connections that WAL lets run beside the writer. An exclusive lock on `<file>.lock` makes
//! a second process fail at start-up instead of sharing the file (the vector cache and the
//! workflow wake-ups live in this process; replicas need PostgreSQL).

pub mod identity;
pub mod memory;
pub mod transfer;
pub mod vectors;
pub mod workflow;

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::{
    SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::task::JoinHandle;

use super::{
    Backend, Counts,
    notify::{Notification, Notifier},
};
use crate::{
    config::{Config, DatabaseKind},
    error::{Error, Result},
};

/// The embedded SQLite migrations (`migrations/sqlite`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for SQLite's write lock (another connection committing) before
/// failing with UNAVAILABLE.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct SqliteStore {
    /// One connection: every write transaction.
    writer: SqlitePool,
    /// Read-only connections: every read outside a write transaction.
    reader: SqlitePool,
    notifier: Notifier,
    vectors: Arc<vectors::VectorIndex>,
    path: PathBuf,
    /// Held (exclusively locked) for as long as the store lives; None for administrative
    /// commands beside a running server.
    _owner: Option<Arc<File>>,
}

impl SqliteStore {
    /// Opens the file named by `config.database_url` (creating it and its directory when
    /// `create` is set) and takes the single-owner lock.
    pub async fn open(config: &Config, create: bool) -> anyhow::Result<Self> {
        Self::open_as(config, create, true).await
    }

    /// `owner`: take the single-owner lock (servers, migrate, export, import). `tmws agents`,
    /// which writes only what no server caches (agents, API keys), opens without it.
    pub async fn open_as(config: &Config, create: bool, owner: bool) -> anyhow::Result<Self> {
        let base = SqliteConnectOptions::from_str(&config.database_url)
            .map_err(|e| anyhow::anyhow!("invalid TMWS_DATABASE_URL: {e}"))?;
        let path = base.get_filename().to_path_buf();
        if create && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            // Owner-only: the file holds API key hashes and every memory.
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(dir)
                .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display()))?;
        }
        if !create && !path.exists() {
            anyhow::bail!("the embedded store {} does not exist", path.display());
        }
        let owner = if owner { Some(take_owner_lock(&path)?) } else { None };
        let base = base
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory")
            // Page cache per connection (KiB when negative): the hot rows are the narrow
            // `memories` columns and indexes; vectors are searched from the in-process cache.
            .pragma("cache_size", "-8192");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(config.db_acquire_timeout)
            .idle_timeout(None)
            .connect_with(base.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the embedded store {}: {e}", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(config.db_max_connections.max(2))
            .min_connections(0)
            .acquire_timeout(config.db_acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(base.create_if_missing(false).read_only(true));
        tracing::info!(path = %path.display(), "embedded SQLite store opened");
        Ok(Self {
            writer,
            reader,
            notifier: Notifier::local(),
            vectors: Arc::new(vectors::VectorIndex::default()),
            path,
            _owner: owner.map(Arc::new),
        })
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The single-connection pool for write transactions.
    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// The read-only pool.
    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    pub(crate) fn vectors(&self) -> &vectors::VectorIndex {
        &self.vectors
    }

    /// Rebuilds data derived from imported rows (inside the import's transaction). Tags and the
    /// full-text index follow `memories` through triggers; the dependency edges of tasks are
    /// rebuilt here from `tasks.depends_on`.
    pub(crate) async fn after_import(&self, tx: &mut sqlx::SqliteConnection) -> Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO task_dependencies (parent_id, child_id) \
             SELECT p.id, t.id FROM tasks t, json_each(t.depends_on) j \
             JOIN tasks p ON p.id = unhex(replace(j.value, '-', ''))",
        )
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Forgets cached vectors (they are reloaded on next use).
    pub(crate) fn vectors_invalidate(&self) {
        self.vectors.clear();
    }

    /// Wakes in-process waiters (WatchRun streams, workers' long polls, the engine). Call after
    /// the change is committed.
    pub(crate) fn notify(&self, note: Notification) {
        self.notifier.send(note);
    }
}

fn take_owner_lock(db: &Path) -> anyhow::Result<File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the embedded store {} is in use by another tmws process; one process owns the file \
             (run several replicas on PostgreSQL: TMWS_DATABASE_URL=postgres://...)",
            db.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("cannot lock {}: {e}", lock_path.display()),
    }
}

/// Microseconds since the epoch: how the embedded store keeps times.
pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`micros`].
pub(crate) fn from_micros(us: i64) -> Result<DateTime<Utc>> {
    Utc.timestamp_micros(us).single().ok_or_else(|| Error::internal(format!("stored time {us} is out of range")))
}

/// The current time as stored (the server's clock, like PostgreSQL's clock_timestamp()).
pub(crate) fn now_micros() -> i64 {
    micros(Utc::now())
}

#[async_trait]
impl Backend for SqliteStore {
    fn kind(&self) -> DatabaseKind {
        DatabaseKind::Sqlite
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn pool_stats(&self) -> (u64, u64, u64) {
        let (w, r) = (&self.writer, &self.reader);
        (
            u64::from(w.size() + r.size()),
            (w.num_idle() + r.num_idle()) as u64,
            u64::from(w.options().get_max_connections() + r.options().get_max_connections()),
        )
    }

    async fn sample_counts(&self) -> Result<Counts> {
        let memories: Vec<(String, i64)> = sqlx::query_as(
            "SELECT namespace, count(*) FROM memories WHERE expire_time IS NULL OR expire_time > ?1 \
             GROUP BY namespace ORDER BY count(*) DESC LIMIT 1000",
        )
        .bind(now_micros())
        .fetch_all(&self.reader)
        .await?;
        let queues: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT namespace, queue, count(*) FROM tasks WHERE status = 2 AND kind = 1 \
             GROUP BY namespace, queue ORDER BY count(*) DESC LIMIT 1000",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok((memories.into_iter().collect(), queues.into_iter().map(|(n, q, c)| ((n, q), c)).collect()))
    }

    async fn notifier(&self) -> anyhow::Result<(Notifier, Option<JoinHandle<()>>)> {
        Ok((self.notifier.clone(), None))
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn export_rows(
        &self,
        table: &'static crate::store::transfer::Table,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
        self.export_table(table, offset, limit).await
    }

    async fn count_unfinished(&self) -> Result<u64> {
        self.unfinished().await
    }

    async fn import_rows(&self, rows: crate::store::transfer::RowStream) -> Result<crate::store::transfer::Counts> {
        self.import_table_rows(rows).await
    }
}
