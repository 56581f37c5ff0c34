//! Cross-replica wake-ups and change announcements through PostgreSQL LISTEN/NOTIFY.
//!
//! One listening connection per process; notifications fan out to in-process subscribers
//! through broadcast channels. Workflow wake-ups are hints, not guarantees (every waiter also
//! re-checks the database on a short timer). Memory changes feed the GetMemory read cache, which
//! must know when it may have missed one: a lost connection is announced
//! ([`MemoryChange::Lost`]), and so is listening again ([`MemoryChange::Listening`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::{sync::broadcast, task::JoinHandle};
use uuid::Uuid;

use super::workflow::{NOTIFY_QUEUE, NOTIFY_RUN};

/// The channel of memory changes (migration 0012: ids comma-separated, or `*`).
pub const NOTIFY_MEMORY: &str = "tmws_memory";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Work was queued on `"<namespace>/<queue>"`.
    Queue(String),
    /// A run changed.
    Run(Uuid),
}

/// What the memory channel says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryChange {
    /// These memories (or their grants) changed or were deleted.
    Changed(Vec<Uuid>),
    /// Any memory may have changed (a large statement, a TRUNCATE, an unreadable payload).
    All,
    /// The listening connection was lost: changes may go unannounced until
    /// [`MemoryChange::Listening`].
    Lost,
    /// Listening again after a loss; changes made meanwhile were not announced.
    Listening,
}

impl MemoryChange {
    fn parse(payload: &str) -> MemoryChange {
        if payload == "*" {
            return MemoryChange::All;
        }
        let ids: Result<Vec<Uuid>, _> = payload.split(',').map(str::parse).collect();
        ids.map(MemoryChange::Changed).unwrap_or(MemoryChange::All)
    }
}

#[derive(Clone)]
pub struct Notifier {
    tx: broadcast::Sender<Notification>,
    memory_tx: broadcast::Sender<MemoryChange>,
    /// Memory changes are announced at all (PostgreSQL); the embedded store announces none.
    memory_announced: bool,
    /// True while memory changes are being announced (a PostgreSQL listener is connected).
    memory_listening: Arc<AtomicBool>,
}

impl Notifier {
    /// Starts listening on `tmws_queue`, `tmws_run` and `tmws_memory`; the task ends when the
    /// handle is aborted or the pool is closed.
    pub async fn listen(pool: &PgPool) -> anyhow::Result<(Self, JoinHandle<()>)> {
        let this = Self::new(true);
        let mut listener = connect(pool).await?;
        let out = this.clone();
        let pool = pool.clone();
        let handle = tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => out.dispatch(n.channel(), n.payload()),
                    Ok(None) => {
                        // Lost and already listening again on a new connection.
                        tracing::warn!("LISTEN connection lost and re-established; notifications may have been missed");
                        out.memory_lost();
                        out.memory_listening();
                    }
                    Err(e) => {
                        if pool.is_closed() {
                            return;
                        }
                        out.memory_lost();
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        listener = loop {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            if pool.is_closed() {
                                return;
                            }
                            match connect(&pool).await {
                                Ok(l) => break l,
                                Err(e) => tracing::warn!(error = %e, "LISTEN reconnection failed; retrying"),
                            }
                        };
                        out.memory_listening();
                    }
                }
            }
        });
        Ok((this, handle))
    }

    /// A notifier fed in-process (the embedded store sends after each commit); it announces no
    /// memory changes, so nothing relies on them there.
    pub fn local() -> Self {
        Self::new(false)
    }

    fn new(memory_listening: bool) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let (memory_tx, _) = broadcast::channel(1024);
        Self {
            tx,
            memory_tx,
            memory_announced: memory_listening,
            memory_listening: Arc::new(AtomicBool::new(memory_listening)),
        }
    }

    /// Whether this backend announces memory changes (PostgreSQL does, through triggers).
    pub fn announces_memory_changes(&self) -> bool {
        self.memory_announced
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        // No subscribers is fine.
        match channel {
            NOTIFY_QUEUE => {
                let _ = self.tx.send(Notification::Queue(payload.to_string()));
            }
            NOTIFY_RUN => {
                if let Ok(id) = payload.parse() {
                    let _ = self.tx.send(Notification::Run(id));
                }
            }
            NOTIFY_MEMORY => {
                let _ = self.memory_tx.send(MemoryChange::parse(payload));
            }
            _ => {}
        }
    }

    fn memory_lost(&self) {
        self.memory_listening.store(false, Ordering::SeqCst);
        let _ = self.memory_tx.send(MemoryChange::Lost);
    }

    fn memory_listening(&self) {
        self.memory_listening.store(true, Ordering::SeqCst);
        let _ = self.memory_tx.send(MemoryChange::Listening);
    }

    /// Delivers `note` to every current subscriber (in-process backends).
    pub fn send(&self, note: Notification) {
        let _ = self.tx.send(note);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.tx.subscribe()
    }

    /// Memory changes from now on, and whether they are being announced at this moment (read
    /// after subscribing, so a loss from then on is also received).
    pub fn subscribe_memory(&self) -> (broadcast::Receiver<MemoryChange>, bool) {
        let rx = self.memory_tx.subscribe();
        (rx, self.memory_listening.load(Ordering::SeqCst))
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([NOTIFY_QUEUE, NOTIFY_RUN, NOTIFY_MEMORY]).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_payloads() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(MemoryChange::parse(&format!("{a},{b}")), MemoryChange::Changed(vec![a, b]));
        assert_eq!(MemoryChange::parse(&a.to_string()), MemoryChange::Changed(vec![a]));
        assert_eq!(MemoryChange::parse("*"), MemoryChange::All);
        assert_eq!(MemoryChange::parse(&format!("{a},garbage")), MemoryChange::All, "unreadable means all");
        assert_eq!(MemoryChange::parse(""), MemoryChange::All);
    }

    #[test]
    fn the_local_notifier_announces_no_memory_changes() {
        let local = Notifier::local();
        let (_, listening) = local.subscribe_memory();
        assert!(!listening);
        assert!(!local.announces_memory_changes());
    }
}
