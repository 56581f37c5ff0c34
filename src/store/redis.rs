//! Redis through deadpool-redis: shared rate-limit and cache state for all replicas.

use std::time::Duration;

use deadpool_redis::{Config as PoolConfig, Pool, Runtime};

#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the pool; connections are made on first use, so an unreachable Redis at start
    /// shows up in health rather than preventing start-up.
    pub fn new(url: &str, max_size: usize, timeout: Duration) -> anyhow::Result<Self> {
        let mut cfg = PoolConfig::from_url(url);
        let mut pool_cfg = deadpool_redis::PoolConfig::new(max_size);
        pool_cfg.timeouts.wait = Some(timeout);
        pool_cfg.timeouts.create = Some(timeout);
        pool_cfg.timeouts.recycle = Some(timeout);
        cfg.pool = Some(pool_cfg);
        let pool = cfg.create_pool(Some(Runtime::Tokio1))?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `PING`; used by the health watcher.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.get().await?;
        let pong: String = deadpool_redis::redis::cmd("PING").query_async(&mut conn).await?;
        anyhow::ensure!(pong == "PONG", "unexpected PING reply {pong:?}");
        Ok(())
    }
}
