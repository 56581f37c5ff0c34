//! Rate limits per agent and method class, shared by every replica through Redis.
//!
//! The algorithm is GCRA (the generic cell rate algorithm, a token bucket without a refill
//! loop): each (class, agent) keeps one "theoretical arrival time"; a call is allowed when that
//! time, advanced by one emission interval, is at most `burst` intervals ahead of now. The whole
//! decision is one Lua script run atomically by Redis with Redis's own clock, so replicas with
//! skewed clocks still share one budget exactly. The script is sent once (`SCRIPT LOAD`) and
//! then run by its SHA (`EVALSHA`), falling back to `EVAL` when Redis answers `NOSCRIPT`
//! (restarted or flushed).
//!
//! Without `TMWS_REDIS_URL` the same algorithm runs in process: limits then apply per replica.
//! With Redis configured but unreachable, `TMWS_RATE_LIMIT_FAIL_OPEN` decides: allow (logged and
//! counted) or UNAVAILABLE.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tracing::Instrument as _;

use deadpool_redis::redis::{self, ErrorKind as RedisErrorKind};

use super::config::{Rate, RateLimitConfig};
use crate::{error::Error, store::RedisStore};

/// The method classes limits are set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodClass {
    Read,
    Write,
    Search,
    Claim,
}

impl MethodClass {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodClass::Read => "read",
            MethodClass::Write => "write",
            MethodClass::Search => "search",
            MethodClass::Claim => "claim",
        }
    }

    /// The class of a gRPC path `/package.Service/Method`: Get/List/Watch (and WhoAmI) read,
    /// Search search, Claim/Heartbeat/Complete/Fail claim, everything else write.
    pub fn of_path(path: &str) -> MethodClass {
        let method = path.rsplit('/').next().unwrap_or(path);
        let starts = |p: &str| method.starts_with(p);
        if starts("Get") || starts("List") || starts("Watch") || method == "WhoAmI" {
            MethodClass::Read
        } else if starts("Search") {
            MethodClass::Search
        } else if starts("Claim") || starts("Heartbeat") || starts("Complete") || starts("Fail") {
            MethodClass::Claim
        } else {
            MethodClass::Write
        }
    }
}

/// GCRA in Redis. KEYS[1]: the bucket; ARGV[1]: emission interval in microseconds; ARGV[2]:
/// burst. Returns {1, 0} when allowed, {0, retry_after_micros} otherwise. Time is Redis's.
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
";

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { retry_after: Duration },
}

#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RateLimitConfig,
    prefix: String,
    redis: Option<RedisStore>,
    sha: Mutex<Option<String>>,
    local: Mutex<HashMap<(MethodClass, String), Instant>>,
    fail_open_total: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("enabled", &self.inner.cfg.enabled)
            .field("shared", &self.inner.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig, prefix: String, redis: Option<RedisStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                prefix,
                redis,
                sha: Mutex::new(None),
                local: Mutex::new(HashMap::new()),
                fail_open_total: AtomicU64::new(0),
                last_warning: Mutex::new(None),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.cfg.enabled
    }

    /// Calls allowed while Redis was unreachable (fail-open), since start.
    pub fn fail_open_total(&self) -> u64 {
        self.inner.fail_open_total.load(Ordering::Relaxed)
    }

    fn rate(&self, class: MethodClass) -> Rate {
        let c = &self.inner.cfg;
        match class {
            MethodClass::Read => c.read,
            MethodClass::Write => c.write,
            MethodClass::Search => c.search,
            MethodClass::Claim => c.claim,
        }
    }

    /// Counts one call of `agent` in `class`; `Err` is RESOURCE_EXHAUSTED (with retry-after) or,
    /// with fail-closed and Redis down, UNAVAILABLE.
    pub async fn check(&self, agent: &str, class: MethodClass) -> Result<(), Error> {
        if !self.enabled() {
            return Ok(());
        }
        let rate = self.rate(class);
        if rate.per_sec <= 0.0 {
            return Ok(());
        }
        let interval = Duration::from_secs_f64(1.0 / rate.per_sec);
        let decision = match &self.inner.redis {
            None => Ok(self.check_local(agent, class, interval, rate.burst)),
            Some(redis) => {
                let span = tracing::debug_span!(
                    "redis",
                    otel.name = "EVALSHA rate-limit",
                    otel.kind = "client",
                    db.system = "redis",
                    db.operation = "EVALSHA",
                );
                let result = self.check_redis(redis, agent, class, interval, rate.burst).instrument(span).await;
                if result.is_err() {
                    crate::telemetry::metrics::metrics().redis_error();
                }
                result
            }
        };
        match decision {
            Ok(Decision::Allow) => Ok(()),
            Ok(Decision::Deny { retry_after }) => Err(Error::ResourceExhausted {
                message: format!(
                    "rate limit exceeded for {} calls ({} per second, burst {}); retry later",
                    class.as_str(),
                    rate.per_sec,
                    rate.burst
                ),
                retry_after,
            }),
            Err(e) if self.inner.cfg.fail_open => {
                let n = self.inner.fail_open_total.fetch_add(1, Ordering::Relaxed) + 1;
                let now = Instant::now();
                let warn = match self.inner.last_warning.lock() {
                    Ok(mut last) => {
                        let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10));
                        if due {
                            *last = Some(now);
                        }
                        due
                    }
                    Err(_) => false,
                };
                if warn {
                    tracing::warn!(error = %e, allowed_unchecked = n, "rate limiter: Redis unreachable; allowing calls (TMWS_RATE_LIMIT_FAIL_OPEN=true)");
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate limiter: Redis unreachable; refusing calls (TMWS_RATE_LIMIT_FAIL_OPEN=false)");
                Err(Error::Unavailable("the rate limiter is unavailable; retry later".into()))
            }
        }
    }

    fn key(&self, agent: &str, class: MethodClass) -> String {
        format!("{}rl:{}:{}", self.inner.prefix, class.as_str(), agent)
    }

    async fn check_redis(
        &self,
        redis: &RedisStore,
        agent: &str,
        class: MethodClass,
        interval: Duration,
        burst: u32,
    ) -> Result<Decision, anyhow::Error> {
        let mut conn = redis.pool().get().await?;
        let key = self.key(agent, class);
        let interval_us = (interval.as_secs_f64() * 1e6).max(1.0);
        let sha = self.inner.sha.lock().ok().and_then(|s| s.clone());
        let sha = match sha {
            Some(sha) => sha,
            None => {
                let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(GCRA_SCRIPT).query_async(&mut conn).await?;
                if let Ok(mut slot) = self.inner.sha.lock() {
                    *slot = Some(sha.clone());
                }
                sha
            }
        };
        let reply: redis::RedisResult<(i64, i64)> =
            redis::cmd("EVALSHA").arg(&sha).arg(1).arg(&key).arg(interval_us).arg(burst).query_async(&mut conn).await;
        let (allowed, retry_us) = match reply {
            Ok(r) => r,
            Err(e) if e.kind() == RedisErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                redis::cmd("EVAL")
                    .arg(GCRA_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(interval_us)
                    .arg(burst)
                    .query_async(&mut conn)
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        Ok(if allowed == 1 {
            Decision::Allow
        } else {
            Decision::Deny { retry_after: Duration::from_micros(retry_us.max(1) as u64) }
        })
    }

    fn check_local(&self, agent: &str, class: MethodClass, interval: Duration, burst: u32) -> Decision {
        let now = Instant::now();
        let Ok(mut map) = self.inner.local.lock() else { return Decision::Allow };
        if map.len() > 100_000 {
            // Idle buckets are equivalent to absent ones.
            map.retain(|_, tat| *tat > now);
        }
        let tat = map.get(&(class, agent.to_string())).copied().filter(|t| *t > now).unwrap_or(now);
        let new_tat = tat + interval;
        let tolerance = interval * burst;
        let allow_at = new_tat.checked_sub(tolerance).unwrap_or(now);
        if allow_at > now {
            return Decision::Deny { retry_after: allow_at - now };
        }
        map.insert((class, agent.to_string()), new_tat);
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_sec: f64, burst: u32) -> RateLimitConfig {
        let r = Rate { per_sec, burst };
        RateLimitConfig { enabled: true, fail_open: true, read: r, write: r, search: r, claim: r }
    }

    #[test]
    fn classes() {
        assert_eq!(MethodClass::of_path("/tmws.v1.MemoryService/GetMemory"), MethodClass::Read);
        assert_eq!(MethodClass::of_path("/tmws.v1.MemoryService/ListMemories"), MethodClass::Read);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/WatchRun"), MethodClass::Read);
        assert_eq!(MethodClass::of_path("/tmws.v1.AgentService/WhoAmI"), MethodClass::Read);
        assert_eq!(MethodClass::of_path("/tmws.v1.MemoryService/SearchMemories"), MethodClass::Search);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/ClaimTasks"), MethodClass::Claim);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/HeartbeatTask"), MethodClass::Claim);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/CompleteTask"), MethodClass::Claim);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/FailTask"), MethodClass::Claim);
        assert_eq!(MethodClass::of_path("/tmws.v1.MemoryService/CreateMemory"), MethodClass::Write);
        assert_eq!(MethodClass::of_path("/tmws.v1.WorkflowService/CancelRun"), MethodClass::Write);
    }

    #[tokio::test]
    async fn local_gcra_allows_the_burst_then_refuses_per_agent() {
        let limiter = RateLimiter::new(cfg(1.0, 3), "t:".into(), None);
        for _ in 0..3 {
            limiter.check("a", MethodClass::Write).await.expect("within burst");
        }
        match limiter.check("a", MethodClass::Write).await {
            Err(Error::ResourceExhausted { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
        }
        limiter.check("b", MethodClass::Write).await.expect("another agent is unaffected");
        limiter.check("a", MethodClass::Read).await.expect("another class is unaffected");
    }

    #[tokio::test]
    async fn zero_rate_is_unlimited_and_disabled_allows_everything() {
        let limiter = RateLimiter::new(cfg(0.0, 1), "t:".into(), None);
        for _ in 0..100 {
            limiter.check("a", MethodClass::Write).await.expect("unlimited");
        }
        let mut c = cfg(1.0, 1);
        c.enabled = false;
        let limiter = RateLimiter::new(c, "t:".into(), None);
        for _ in 0..10 {
            limiter.check("a", MethodClass::Write).await.expect("disabled");
        }
    }
}
