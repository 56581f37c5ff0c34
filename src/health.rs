//! The dependency watcher behind `grpc.health.v1.Health`.
//!
//! - `""` (the server as a whole) is SERVING while the process accepts calls and NOT_SERVING
//!   once it drains; it does not follow the dependencies, so a liveness probe on it never
//!   restarts pods because PostgreSQL is briefly away.
//! - Each public service is SERVING only while the dependencies it needs answer: PostgreSQL
//!   always, Redis when `TMWS_REDIS_REQUIRED=true`. Readiness probes use these names.

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::store::{Db, RedisStore};

/// The public services whose health is reported.
pub const PUBLIC_SERVICES: &[&str] = &["tmws.v1.MemoryService", "tmws.v1.WorkflowService", "tmws.v1.AgentService"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DependencyState {
    pub postgres: bool,
    /// `None` when Redis is not configured.
    pub redis: Option<bool>,
}

impl DependencyState {
    /// Whether the public services can serve, given which dependencies are required.
    pub fn services_serving(&self, redis_required: bool) -> bool {
        self.postgres && (!redis_required || self.redis.unwrap_or(false))
    }
}

pub struct HealthWatcher {
    pub reporter: HealthReporter,
    pub db: Db,
    pub redis: Option<RedisStore>,
    pub redis_required: bool,
    pub interval: Duration,
    pub timeout: Duration,
}

impl HealthWatcher {
    /// Probes once and publishes the result; returns what it saw.
    pub async fn check_once(&self) -> DependencyState {
        let postgres = matches!(tokio::time::timeout(self.timeout, self.db.ping()).await, Ok(Ok(())));
        let redis = match &self.redis {
            None => None,
            Some(r) => Some(matches!(tokio::time::timeout(self.timeout, r.ping()).await, Ok(Ok(())))),
        };
        DependencyState { postgres, redis }
    }

    async fn publish(&self, state: DependencyState) {
        let status = if state.services_serving(self.redis_required) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in PUBLIC_SERVICES {
            self.reporter.set_service_status(*service, status).await;
        }
    }

    /// Probes and publishes once (so the first health check after start-up is already
    /// accurate), then keeps probing every `interval` on a background task until `stop` turns true.
    pub async fn start(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let initial = self.check_once().await;
        if !initial.services_serving(self.redis_required) {
            tracing::warn!(postgres = initial.postgres, redis = ?initial.redis, "dependencies unavailable at start-up");
        }
        self.publish(initial).await;
        tokio::spawn(async move {
            let mut last = Some(initial);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = stop.changed() => break,
                }
                let state = self.check_once().await;
                if *stop.borrow() {
                    break;
                }
                if last != Some(state) {
                    tracing::warn!(postgres = state.postgres, redis = ?state.redis, "dependency state changed");
                    self.publish(state).await;
                    last = Some(state);
                }
            }
        })
    }
}

/// Marks the server and every public service NOT_SERVING (draining).
pub async fn set_all_not_serving(reporter: &HealthReporter) {
    reporter.set_service_status("", ServingStatus::NotServing).await;
    for service in PUBLIC_SERVICES {
        reporter.set_service_status(*service, ServingStatus::NotServing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let up = DependencyState { postgres: true, redis: Some(true) };
        let redis_down = DependencyState { postgres: true, redis: Some(false) };
        let pg_down = DependencyState { postgres: false, redis: Some(true) };
        let no_redis = DependencyState { postgres: true, redis: None };
        assert!(up.services_serving(true));
        assert!(redis_down.services_serving(false));
        assert!(!redis_down.services_serving(true));
        assert!(!pg_down.services_serving(false));
        assert!(no_redis.services_serving(false));
    }
}
