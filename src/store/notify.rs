//! Cross-replica wake-ups and change announcements through PostgreSQL LISTEN/NOTIFY.
//!
//! One listening connection per process; notifications fan out to in-process subscribers
//! through broadcast channels. Workflow wake-ups are hints, not guarantees (every waiter also
//! re-checks the database on a short timer). Changes to memories and to agents and keys feed the
//! read caches (GetMemory, credentials), which must know when they may have missed one: a lost
//! connection is announced ([`Change::Lost`]), and so is listening again ([`Change::Listening`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::{
    sync::broadcast::{self, error::RecvError},
    task::JoinHandle,
};
use uuid::Uuid;

use super::workflow::{NOTIFY_QUEUE, NOTIFY_RUN};

/// The channel of memory changes (migration 0012: ids comma-separated, or `*`).
pub const NOTIFY_MEMORY: &str = "tmws_memory";
/// The channel of changes to agents and API keys (migration 0013; no payload).
pub const NOTIFY_IDENTITY: &str = "tmws_identity";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Work was queued on `"<namespace>/<queue>"`.
    Queue(String),
    /// A run changed.
    Run(Uuid),
}

/// What the change channels say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These memories (or their grants) changed or were deleted.
    Memories(Vec<Uuid>),
    /// Any memory may have changed (a large statement, a TRUNCATE, an unreadable payload).
    AllMemories,
    /// An agent or an API key changed or was deleted.
    Identity,
    /// The listening connection was lost: changes may go unannounced until
    /// [`Change::Listening`].
    Lost,
    /// Listening again after a loss; changes made meanwhile were not announced.
    Listening,
}

impl Change {
    fn parse_memories(payload: &str) -> Change {
        if payload == "*" {
            return Change::AllMemories;
        }
        let ids: Result<Vec<Uuid>, _> = payload.split(',').map(str::parse).collect();
        ids.map(Change::Memories).unwrap_or(Change::AllMemories)
    }
}

#[derive(Clone)]
pub struct Notifier {
    tx: broadcast::Sender<Notification>,
    changes_tx: broadcast::Sender<Change>,
    /// Changes are announced at all (PostgreSQL); the embedded store announces none.
    changes_announced: bool,
    /// True while changes are being announced (a PostgreSQL listener is connected).
    listening: Arc<AtomicBool>,
}

impl Notifier {
    /// Starts listening on `tmws_queue`, `tmws_run`, `tmws_memory` and `tmws_identity`; the
    /// task ends when the handle is aborted or the pool is closed.
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
                        out.lost();
                        out.listening();
                    }
                    Err(e) => {
                        if pool.is_closed() {
                            return;
                        }
                        out.lost();
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
                        out.listening();
                    }
                }
            }
        });
        Ok((this, handle))
    }

    /// A notifier fed in-process (the embedded store sends after each commit); it announces no
    /// changes to memories or identities, so no cache relies on them there.
    pub fn local() -> Self {
        Self::new(false)
    }

    fn new(announced: bool) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let (changes_tx, _) = broadcast::channel(1024);
        Self { tx, changes_tx, changes_announced: announced, listening: Arc::new(AtomicBool::new(announced)) }
    }

    /// Whether this backend announces changes to memories and identities (PostgreSQL does,
    /// through triggers).
    pub fn announces_changes(&self) -> bool {
        self.changes_announced
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
                let _ = self.changes_tx.send(Change::parse_memories(payload));
            }
            NOTIFY_IDENTITY => {
                let _ = self.changes_tx.send(Change::Identity);
            }
            _ => {}
        }
    }

    fn lost(&self) {
        self.listening.store(false, Ordering::SeqCst);
        let _ = self.changes_tx.send(Change::Lost);
    }

    fn listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
        let _ = self.changes_tx.send(Change::Listening);
    }

    /// Delivers `note` to every current subscriber (in-process backends).
    pub fn send(&self, note: Notification) {
        let _ = self.tx.send(note);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.tx.subscribe()
    }

    /// Changes from now on, and whether they are being announced at this moment (read after
    /// subscribing, so a loss from then on is also received).
    pub fn subscribe_changes(&self) -> (broadcast::Receiver<Change>, bool) {
        let rx = self.changes_tx.subscribe();
        (rx, self.listening.load(Ordering::SeqCst))
    }
}

/// The storing rule the read caches share, kept under each cache's lock: store only while
/// changes are announced, and only what was read under the current epoch. Every drop advances
/// the epoch, so a read that overlapped a change (its epoch taken before, its row stored after)
/// is not stored.
#[derive(Debug, Default)]
pub struct Gate {
    open: bool,
    epoch: u64,
}

impl Gate {
    /// The epoch a read should store under; `None` while nothing may be stored.
    pub fn current(&self) -> Option<u64> {
        self.open.then_some(self.epoch)
    }

    /// Whether a read taken under `epoch` may be stored now.
    pub fn admits(&self, epoch: u64) -> bool {
        self.open && self.epoch == epoch
    }

    /// Something was dropped: reads in flight must not store.
    pub fn advance(&mut self) {
        self.epoch += 1;
    }

    /// Opens or closes storing (and advances, as the caller drops everything).
    pub fn set_open(&mut self, open: bool) {
        self.advance();
        self.open = open;
    }
}

/// A cache kept fresh by announced changes (see [`follow`]).
pub trait ChangeSink: Send + Sync + 'static {
    /// Applies an announced change to memories or identities.
    fn apply(&self, change: &Change);
    /// Forgets everything; from now on stores only if `listening` (changes are announced).
    fn set_listening(&self, listening: bool);
    /// Forgets everything (announcements may have been missed).
    fn clear(&self);
}

/// Feeds the changes `notifier` announces to `sink`, from now until the notifier closes or the
/// sink is dropped; the sink learns when announcements stop and resume.
pub fn follow<T: ChangeSink>(sink: &Arc<T>, notifier: &Notifier) -> JoinHandle<()> {
    let (mut rx, listening) = notifier.subscribe_changes();
    sink.set_listening(listening);
    let sink = Arc::downgrade(sink);
    tokio::spawn(async move {
        loop {
            let change = rx.recv().await;
            let Some(sink) = sink.upgrade() else { return };
            match change {
                Ok(Change::Lost) => sink.set_listening(false),
                Ok(Change::Listening) => sink.set_listening(true),
                Ok(change) => sink.apply(&change),
                Err(RecvError::Lagged(_)) => sink.clear(),
                Err(RecvError::Closed) => {
                    sink.set_listening(false);
                    return;
                }
            }
        }
    })
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([NOTIFY_QUEUE, NOTIFY_RUN, NOTIFY_MEMORY, NOTIFY_IDENTITY]).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_payloads() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(Change::parse_memories(&format!("{a},{b}")), Change::Memories(vec![a, b]));
        assert_eq!(Change::parse_memories(&a.to_string()), Change::Memories(vec![a]));
        assert_eq!(Change::parse_memories("*"), Change::AllMemories);
        assert_eq!(Change::parse_memories(&format!("{a},garbage")), Change::AllMemories, "unreadable means all");
        assert_eq!(Change::parse_memories(""), Change::AllMemories);
    }

    #[test]
    fn the_local_notifier_announces_no_changes() {
        let local = Notifier::local();
        let (_, listening) = local.subscribe_changes();
        assert!(!listening);
        assert!(!local.announces_changes());
    }
}
