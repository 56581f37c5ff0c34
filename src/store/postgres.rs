//! PostgreSQL (+ pgvector): connection pool, migrations and liveness probes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{
    PgPool,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::{Backend, Counts, notify::Notifier, transfer};
use crate::config::{Config, DatabaseKind};

/// The embedded Postgres migrations (`migrations/postgres`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreInitError {
    #[error("invalid TMWS_DATABASE_URL: {0}")]
    Url(sqlx::Error),
    #[error("PostgreSQL unreachable after {waited:?}: {source}")]
    Unreachable { waited: Duration, source: sqlx::Error },
    #[error(
        "PostgreSQL has no pgvector extension available; install pgvector (e.g. scripts/dev-services.sh, or the pgvector/pgvector image) and retry"
    )]
    PgvectorMissing,
    #[error("could not create the database: {0}")]
    CreateDatabase(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Queues whose tasks recently included a run's (see `claim_tasks`).
    pub(crate) run_queues: Arc<super::workflow::RunQueues>,
    /// Leased tasks of runs (see `complete_task`).
    pub(crate) run_tasks: Arc<super::workflow::RunTasks>,
}

impl PgStore {
    /// Builds the pool and waits (up to `TMWS_DB_STARTUP_TIMEOUT`) until PostgreSQL answers.
    /// The pool reconnects by itself afterwards; a later outage only makes calls fail.
    pub async fn connect(config: &Config) -> Result<Self, StoreInitError> {
        let options: PgConnectOptions = config.database_url.parse().map_err(StoreInitError::Url)?;
        // Per-connection settings: ANN search quality, iterative index scans (pgvector >= 0.8) so
        // filtered searches still return k rows, and the text search configuration.
        let ef_search = config.memory.hnsw_ef_search.to_string();
        let options = options.application_name("tmws").options([
            ("hnsw.ef_search", ef_search.as_str()),
            ("hnsw.iterative_scan", "relaxed_order"),
            ("tmws.text_search_config", config.memory.text_search_config.as_str()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.db_max_connections)
            .min_connections(0)
            .acquire_timeout(config.db_acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let store = Self { pool, run_queues: Arc::default(), run_tasks: Arc::default() };
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match store.ping_db().await {
                Ok(()) => return Ok(store),
                Err(e) if started.elapsed() >= config.db_startup_timeout => {
                    return Err(StoreInitError::Unreachable { waited: started.elapsed(), source: e });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for PostgreSQL");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn ping_db(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// Applies pending migrations. sqlx holds a Postgres advisory lock while it migrates, so
    /// replicas starting together apply each migration exactly once.
    pub async fn migrate(&self) -> Result<(), StoreInitError> {
        let available: Option<String> =
            sqlx::query_scalar("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
                .fetch_optional(&self.pool)
                .await?;
        if available.is_none() {
            return Err(StoreInitError::PgvectorMissing);
        }
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl Backend for PgStore {
    fn kind(&self) -> DatabaseKind {
        DatabaseKind::Postgres
    }

    async fn ping(&self) -> crate::error::Result<()> {
        Ok(self.ping_db().await?)
    }

    fn pool_stats(&self) -> (u64, u64, u64) {
        (u64::from(self.pool.size()), self.pool.num_idle() as u64, u64::from(self.pool.options().get_max_connections()))
    }

    async fn sample_counts(&self) -> crate::error::Result<Counts> {
        let memories: Vec<(String, i64)> = sqlx::query_as(
            "SELECT namespace, count(*) FROM memories WHERE expire_time IS NULL OR expire_time > now() \
             GROUP BY namespace ORDER BY count(*) DESC LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        let queues: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT namespace, queue, count(*) FROM tasks WHERE status = 2 AND kind = 1 \
             GROUP BY namespace, queue ORDER BY count(*) DESC LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok((memories.into_iter().collect(), queues.into_iter().map(|(n, q, c)| ((n, q), c)).collect()))
    }

    async fn notifier(&self) -> anyhow::Result<(Notifier, Option<JoinHandle<()>>)> {
        let (n, task) = Notifier::listen(&self.pool).await?;
        Ok((n, Some(task)))
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn export_rows(
        &self,
        table: &'static transfer::Table,
        offset: u64,
        limit: u64,
    ) -> crate::error::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
        transfer::postgres::export_rows(&self.pool, table, offset, limit).await
    }

    async fn count_unfinished(&self) -> crate::error::Result<u64> {
        transfer::postgres::count_unfinished(&self.pool).await
    }

    async fn import_rows(&self, rows: transfer::RowStream) -> crate::error::Result<transfer::Counts> {
        transfer::postgres::import_rows(&self.pool, rows).await
    }
}

/// Creates the database named in `url` when it does not exist yet (first start, `tmws migrate`).
pub async fn ensure_database(url: &str) -> Result<(), StoreInitError> {
    match sqlx::Postgres::database_exists(url).await {
        Ok(true) => Ok(()),
        Ok(false) => match sqlx::Postgres::create_database(url).await {
            Ok(()) => {
                tracing::info!("created database");
                Ok(())
            }
            // A concurrent replica created it first: 42P04 duplicate_database.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
            Err(e) => Err(StoreInitError::CreateDatabase(e)),
        },
        // No permission to look (managed databases): assume the operator created it.
        Err(e) => {
            tracing::debug!(error = %e, "could not check whether the database exists");
            Ok(())
        }
    }
}
