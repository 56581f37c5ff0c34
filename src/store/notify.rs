//! Cross-replica wake-ups through PostgreSQL LISTEN/NOTIFY.
//!
//! One listening connection per process; notifications fan out to in-process subscribers
//! through a broadcast channel. Delivery is a hint, not a guarantee (a reconnect can drop some),
//! so every waiter also re-checks the database on a short timer.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::{sync::broadcast, task::JoinHandle};
use uuid::Uuid;

use super::workflow::{NOTIFY_QUEUE, NOTIFY_RUN};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Work was queued on `"<namespace>/<queue>"`.
    Queue(String),
    /// A run changed.
    Run(Uuid),
}

#[derive(Clone)]
pub struct Notifier {
    tx: broadcast::Sender<Notification>,
}

impl Notifier {
    /// Starts listening on `tmws_queue` and `tmws_run`; the task ends when the handle is aborted.
    pub async fn listen(pool: &PgPool) -> anyhow::Result<(Self, JoinHandle<()>)> {
        let (tx, _) = broadcast::channel(1024);
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen_all([NOTIFY_QUEUE, NOTIFY_RUN]).await?;
        let sender = tx.clone();
        let handle = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        let note = match n.channel() {
                            NOTIFY_QUEUE => Some(Notification::Queue(n.payload().to_string())),
                            NOTIFY_RUN => n.payload().parse().ok().map(Notification::Run),
                            _ => None,
                        };
                        if let Some(note) = note {
                            // No subscribers is fine.
                            let _ = sender.send(note);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok((Self { tx }, handle))
    }

    /// A notifier fed in-process (the embedded store sends after each commit).
    pub fn local() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self { tx }
    }

    /// Delivers `note` to every current subscriber (in-process backends).
    pub fn send(&self, note: Notification) {
        let _ = self.tx.send(note);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.tx.subscribe()
    }
}
