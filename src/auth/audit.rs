//! The audit log's background side.
//!
//! Successful changes are recorded by the stores in the same transaction as the change
//! ([`crate::store::identity::record_audit`]). Failed mutating calls and authentication failures
//! have no transaction: the auth layer hands them to an [`AuditSink`], which writes them in
//! batches from a background task after the response has gone out (best effort: when the queue
//! is full or the database is down, events are dropped and counted in the log, never blocking a
//! call). The same task deletes events older than `TMWS_AUDIT_RETENTION`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::store::{Db, identity::AuditEvent};

const QUEUE: usize = 4096;
const BATCH: usize = 256;

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink").finish_non_exhaustive()
    }
}

impl AuditSink {
    /// Queues an event; never waits.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "audit queue full or closed: audit events dropped");
            }
        }
    }

    /// Starts the writer and the retention sweeper; they stop (after writing what is queued)
    /// when `stop` turns true.
    pub fn start(
        pg: Db,
        retention: Duration,
        sweep_interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> (AuditSink, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let sink = AuditSink { tx, dropped: Arc::new(AtomicU64::new(0)) };
        let handle = tokio::spawn(async move {
            let mut sweep = tokio::time::interval(sweep_interval);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut buf = Vec::with_capacity(BATCH);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut buf, BATCH) => {
                        if n == 0 {
                            break;
                        }
                        write(&pg, &mut buf).await;
                    }
                    _ = sweep.tick() => {
                        if !retention.is_zero() {
                            sweep_once(&pg, retention).await;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            // Write what is still queued.
            while let Ok(e) = rx.try_recv() {
                buf.push(e);
                if buf.len() >= BATCH {
                    write(&pg, &mut buf).await;
                }
            }
            write(&pg, &mut buf).await;
        });
        (sink, handle)
    }
}

async fn write(pg: &Db, buf: &mut Vec<AuditEvent>) {
    if buf.is_empty() {
        return;
    }
    if let Err(e) = pg.insert_audit_events(buf).await {
        tracing::warn!(error = %e, events = buf.len(), "could not write audit events");
    }
    buf.clear();
}

async fn sweep_once(pg: &Db, retention: Duration) {
    let Ok(age) = chrono::Duration::from_std(retention) else { return };
    let before = chrono::Utc::now() - age;
    let mut total = 0;
    loop {
        match pg.sweep_audit(before, 5000).await {
            Ok(n) => {
                total += n;
                if n < 5000 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit retention sweep failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(deleted = total, "swept old audit events");
    }
}
