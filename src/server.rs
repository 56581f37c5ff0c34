//! The composition root: pools, stores, services, health, reflection, layers and shutdown.
//! This is the only module that knows every part.

use std::{future::Future, net::SocketAddr, pin::pin, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::{
    api::{AgentApi, MemoryApi, WorkflowApi},
    auth::{setup::Security, tls::server_tls},
    config::Config,
    embed::Embedder,
    health::{self, HealthWatcher},
    memory::MemoryService,
    pb::{
        self, agent_service_server::AgentServiceServer, memory_service_server::MemoryServiceServer,
        workflow_service_server::WorkflowServiceServer,
    },
    store::{self, Db, RedisStore},
    telemetry::{http::serve_metrics, layer::GrpcTelemetryLayer, metrics::metrics},
    workflow::WorkflowService,
};

/// Connects the stores, applies migrations when `TMWS_AUTO_MIGRATE` is on, and serves on
/// `listener` until `shutdown` resolves. Then every health status turns NOT_SERVING, in-flight
/// calls drain for at most `TMWS_SHUTDOWN_GRACE`, and the function returns.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let local_addr = listener.local_addr().context("listener address")?;

    let db = store::open(&config, config.auto_migrate, config.auto_migrate).await?;
    if config.auto_migrate {
        tracing::info!(backend = db.kind().as_str(), "database migrations applied");
    }
    let redis = match &config.redis_url {
        Some(url) => Some(RedisStore::new(url, config.db_max_connections as usize, config.health_check_timeout)?),
        None => None,
    };

    let (notifier, listener_task) = db.notifier().await?;
    let security = Security::start(&config, &db, redis.clone(), &notifier).await?;
    let tls = server_tls(&config.security.tls)?;

    let embedder = Embedder::from_config(&config.embedding)?;
    let memory_service = MemoryService::new(db.clone(), embedder, config.memory.clone(), &notifier).await?;
    let workflow_service = WorkflowService::new(
        db.clone(),
        notifier,
        memory_service.clone(),
        config.workflow.clone(),
        memory_service.page_tokens().clone(),
        config.memory.default_page_size,
        config.memory.max_page_size,
    );

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::Serving).await;
    let watcher = HealthWatcher {
        reporter: reporter.clone(),
        db: db.clone(),
        redis: redis.clone(),
        redis_required: Security::redis_required(&config),
        interval: config.health_check_interval,
        timeout: config.health_check_timeout,
    };
    let (stop_watch, stop_rx) = watch::channel(false);
    let watcher_task = watcher.start(stop_rx.clone()).await;
    let memory_task = memory_service.spawn_background(stop_rx.clone());
    let stop_rx_metrics = stop_rx.clone();
    let engine_task = workflow_service.spawn_engine(stop_rx);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let max = config.max_message_bytes;
    let memory = MemoryServiceServer::new(MemoryApi::new(memory_service))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let workflow = WorkflowServiceServer::new(WorkflowApi::new(workflow_service))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let agent = AgentServiceServer::new(AgentApi::new(security.identity.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let router = builder
        .layer(GrpcTelemetryLayer)
        .layer(security.layers())
        .http2_adaptive_window(Some(true))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(memory)
        .add_service(workflow)
        .add_service(agent);

    let metrics_task = match config.metrics_addr {
        Some(addr) => {
            let (bound, task) = serve_metrics(addr, stop_rx_metrics.clone()).await?;
            tracing::info!(addr = %bound, "Prometheus metrics at /metrics");
            Some(task)
        }
        None => None,
    };
    let sampler_task = spawn_metrics_sampler(db.clone(), config.metrics_sample_interval, stop_rx_metrics);

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async {
        let _ = drain_rx.await;
    });
    let mut server = pin!(server);
    tracing::info!(
        addr = %local_addr,
        environment = ?config.environment,
        auth = config.auth_enabled,
        tls = config.security.tls.enabled(),
        "tmws serving"
    );

    let result = tokio::select! {
        r = &mut server => r.map_err(anyhow::Error::from),
        () = shutdown => {
            tracing::info!(grace = ?config.shutdown_grace, "shutdown requested: draining");
            let _ = stop_watch.send(true);
            let _ = watcher_task.await;
            let _ = memory_task.await;
            let _ = engine_task.await;
            let _ = sampler_task.await;
            if let Some(t) = metrics_task {
                let _ = t.await;
            }
            health::set_all_not_serving(&reporter).await;
            let _ = drain_tx.send(());
            match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => {
                    tracing::warn!("in-flight calls did not finish within TMWS_SHUTDOWN_GRACE; closing them");
                    Ok(())
                }
            }
        }
    };
    if let Some(t) = listener_task {
        t.abort();
    }
    security.stop().await;
    db.close().await;
    tracing::info!("tmws stopped");
    result
}

/// Refreshes the sampled gauges (pool, memories per namespace, queue depths) until `stop`.
fn spawn_metrics_sampler(db: Db, interval: Duration, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let m = metrics();
                    let (size, idle, max) = db.pool_stats();
                    m.set_pool(size, idle, max);
                    match db.sample_counts().await {
                        Ok((memories, queues)) => {
                            m.set_memories(memories);
                            m.set_queue_depth(queues);
                        }
                        Err(e) => tracing::debug!(error = %e, "metrics sampling failed"),
                    }
                }
                _ = stop.changed() => break,
            }
        }
    })
}

/// A server running on a background task (tests, embedding in other programs).
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Binds `config.grpc_addr` (port 0 picks a free port) and serves in the background.
    /// Returns once the listener is bound; start-up errors surface from [`RunningServer::stop`].
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(config.grpc_addr).await.with_context(|| format!("bind {}", config.grpc_addr))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve(config, listener, async {
            let _ = rx.await;
        }));
        Ok(Self { addr, shutdown: Some(tx), handle })
    }

    /// Whether the server task has ended (e.g. failed at start-up).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Triggers a graceful shutdown and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.await.context("server task panicked")?
    }
}

/// Registers the SIGTERM and SIGINT handlers now (so a signal arriving during start-up is not
/// lost to the default action) and returns a future that resolves on the first of them.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupt received");
        }
    })
}
