//! Wiring of the security parts for the composition root (`crate::server`).

use std::sync::Arc;

use tokio::{sync::watch, task::JoinHandle};
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
};

use super::{
    audit::AuditSink,
    bootstrap,
    cache::AuthCache,
    identity::IdentityService,
    jwt::{self, JwtVerifier},
    layer::{AuthLayer, Authenticator},
    overload::{DeadlineLayer, LoadShedLayer},
    ratelimit::RateLimiter,
};
use crate::{
    config::Config,
    store::{Db, RedisStore, notify::Notifier},
};

/// The layers every call passes, outermost first: load shedding, deadline, authentication
/// (with rate limiting and audit).
pub type SecurityLayers = Stack<AuthLayer, Stack<DeadlineLayer, Stack<LoadShedLayer, Identity>>>;

pub struct Security {
    pub identity: IdentityService,
    pub limiter: RateLimiter,
    layers: ServiceBuilder<SecurityLayers>,
    audit_stop: watch::Sender<bool>,
    audit_task: JoinHandle<()>,
}

impl Security {
    /// Applies `TMWS_BOOTSTRAP_ADMIN_KEY`, loads the JWT keys, and starts the audit writer.
    pub async fn start(
        config: &Config,
        pg: &Db,
        redis: Option<RedisStore>,
        notifier: &Notifier,
    ) -> anyhow::Result<Self> {
        jwt::install_crypto_provider();
        let s = &config.security;
        // Credentials are remembered only where changes to them are announced (PostgreSQL).
        let cache = (config.auth_enabled
            && s.auth_cache_entries > 0
            && !s.auth_cache_ttl.is_zero()
            && notifier.announces_changes())
        .then(|| {
            let cache = Arc::new(AuthCache::new(s.auth_cache_entries, s.auth_cache_ttl));
            // Ends when the notifier closes or the cache is dropped.
            drop(crate::store::notify::follow(&cache, notifier));
            cache
        });
        let authenticator = if config.auth_enabled {
            if let Some(b) = &s.bootstrap_admin {
                bootstrap::apply_bootstrap_admin(pg, b).await?;
            }
            Authenticator::enabled(
                pg.clone(),
                JwtVerifier::from_config(&s.jwt, config.secret_key.as_deref())?,
                cache.clone(),
            )
        } else {
            tracing::warn!(
                agent = %config.dev.agent_id,
                namespace = %config.dev.namespace,
                trust_headers = config.dev.trust_headers,
                "authentication is OFF (development): every call runs as the development agent"
            );
            Authenticator::development(config.dev.clone())
        };
        let limiter = RateLimiter::new(s.rate_limit.clone(), s.redis_prefix.clone(), redis);
        let (audit_stop, stop_rx) = watch::channel(false);
        let (sink, audit_task) = AuditSink::start(pg.clone(), s.audit_retention, s.audit_sweep_interval, stop_rx);
        let identity =
            IdentityService::new(pg.clone(), config.memory.default_page_size, config.memory.max_page_size, cache)
                .await?;
        let layers = ServiceBuilder::new()
            .layer(LoadShedLayer::new(s.max_concurrent_requests))
            .layer(DeadlineLayer::new(s.request_timeout_max))
            .layer(AuthLayer::new(authenticator, limiter.clone(), Some(sink)));
        Ok(Self { identity, limiter, layers, audit_stop, audit_task })
    }

    pub fn layers(&self) -> ServiceBuilder<SecurityLayers> {
        self.layers.clone()
    }

    /// Whether Redis is needed to serve: with fail-closed rate limits, an unreachable Redis
    /// refuses every call, so health reports the services NOT_SERVING.
    pub fn redis_required(config: &Config) -> bool {
        let rl = &config.security.rate_limit;
        config.redis_required || (config.redis_url.is_some() && rl.enabled && !rl.fail_open)
    }

    /// Writes the audit events still queued and stops the background tasks (after the server
    /// has drained).
    pub async fn stop(self) {
        let _ = self.audit_stop.send(true);
        let _ = self.audit_task.await;
    }
}
