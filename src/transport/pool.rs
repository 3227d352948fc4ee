//! A relay's connection pool: at most `max_connections` connections open
//! at once (busy or idle), each reused until `max_messages_per_connection`
//! or `idle_timeout`.
//!
//! Workers never wait on a pool. A worker that finds every connection busy
//! hands its message back to the scheduler as parked on this relay, and
//! the pool tells the scheduler each time a connection comes back
//! (`relay_free`), with a release count that only grows: a worker reads the
//! count *before* it looks for a connection, so a connection returned in
//! between is never missed. That way a slow relay occupies only its own
//! connections, never the workers other relays need (Postfix's qmgr
//! keeps per-destination concurrency for the same reason).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::oauth2::TokenSource;
use super::relay::RelaySender;
use crate::config::RelayConfig;
use crate::delivery::SchedulerHandle;
use crate::routing::health::Signal;

struct Idle {
    sender: RelaySender,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// A connection slot (and maybe an open connection) lent to one worker.
pub struct Lease {
    pub sender: RelaySender,
    permit: OwnedSemaphorePermit,
}

pub struct RelayPool {
    name: Arc<str>,
    relay: RelayConfig,
    helo: String,
    /// The relay's OAuth2 tokens, one source for all its connections.
    tokens: Option<Arc<TokenSource>>,
    max: usize,
    /// One permit per connection, held while it is open, busy or idle.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Grows by one every time a slot or an idle connection comes back.
    releases: AtomicU64,
    /// One more than the release count a refused checkout saw (the highest
    /// such): while `releases` is below it, a message waits for a
    /// connection to this relay.
    wanted_until: AtomicU64,
    /// Told about releases, so parked messages go out.
    scheduler: Option<SchedulerHandle>,
}

impl RelayPool {
    pub fn new(
        name: Arc<str>,
        relay: RelayConfig,
        helo: String,
        tokens: Option<Arc<TokenSource>>,
        scheduler: Option<SchedulerHandle>,
    ) -> Arc<RelayPool> {
        let max = relay.connections().max(1);
        Arc::new(RelayPool {
            name,
            relay,
            helo,
            tokens,
            max,
            slots: Arc::new(Semaphore::new(max)),
            idle: Mutex::new(Vec::new()),
            releases: AtomicU64::new(0),
            wanted_until: AtomicU64::new(0),
            scheduler,
        })
    }

    /// The relay's OAuth2 token source, if relayq gets its tokens.
    pub fn tokens(&self) -> Option<&Arc<TokenSource>> {
        self.tokens.as_ref()
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// Connections open now (busy or idle), counting ones being opened.
    pub fn open_connections(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// An idle connection, or a free slot to open one; `Err` with the
    /// release count when every slot is taken.
    pub fn try_checkout(&self) -> Result<Lease, u64> {
        let seen = self.releases.load(Ordering::SeqCst);
        if let Some(idle) = self.idle().pop() {
            return Ok(Lease {
                sender: idle.sender,
                permit: idle.permit,
            });
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(Lease {
                sender: RelaySender::for_relay(
                    self.relay.clone(),
                    self.helo.clone(),
                    self.tokens.clone(),
                ),
                permit,
            }),
            Err(_) => {
                self.wanted_until.fetch_max(seen + 1, Ordering::SeqCst);
                Err(seen)
            }
        }
    }

    /// Whether a message is parked waiting for a connection to come back.
    /// A worker keeping its connection for message after message (sending
    /// each behind the previous one's end of data) gives it back then.
    pub fn is_wanted(&self) -> bool {
        self.wanted_until.load(Ordering::SeqCst) > self.releases.load(Ordering::SeqCst)
    }

    /// Takes a connection back: kept for the next message if it is open
    /// and under `max_messages_per_connection`, else closed.
    pub fn checkin(self: &Arc<Self>, lease: Lease) {
        let spent = self
            .relay
            .max_messages_per_connection
            .is_some_and(|max| lease.sender.sent_on_connection() >= max);
        if lease.sender.is_connected() && !spent {
            self.idle().push(Idle {
                sender: lease.sender,
                permit: lease.permit,
                since: Instant::now(),
            });
            self.released();
        } else if lease.sender.is_connected() {
            self.close_later(lease.sender, lease.permit);
        } else {
            drop(lease);
            self.released();
        }
    }

    /// QUITs in the background; the slot is free only once it is closed,
    /// so the relay never sees more than `max_connections`.
    fn close_later(self: &Arc<Self>, mut sender: RelaySender, permit: OwnedSemaphorePermit) {
        let pool = self.clone();
        tokio::spawn(async move {
            sender.close().await;
            drop(permit);
            pool.released();
        });
    }

    fn released(&self) {
        let n = self.releases.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(s) = &self.scheduler {
            s.relay_free(&self.name, n);
        }
    }

    /// Closes connections idle for longer than `idle_timeout`.
    pub fn reap(self: &Arc<Self>) {
        let limit = self.relay.idle_timeout.0;
        let stale: Vec<Idle> = {
            let mut idle = self.idle();
            let (stale, keep) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| i.since.elapsed() >= limit);
            *idle = keep;
            stale
        };
        for i in stale {
            self.close_later(i.sender, i.permit);
        }
    }

    /// Opens (or checks) a connection to see whether the relay is back;
    /// `None` when no slot is free to do so. A good connection stays in
    /// the pool for the next message.
    pub async fn probe(self: &Arc<Self>) -> Option<Signal> {
        let mut lease = self.try_checkout().ok()?;
        let signal = lease.sender.probe().await;
        self.checkin(lease);
        Some(signal)
    }

    /// QUITs every idle connection (at shutdown, after the workers stopped).
    pub async fn close_all(&self, limit: Duration) {
        let idle = std::mem::take(&mut *self.idle());
        let closing = idle.into_iter().map(|mut i| async move {
            i.sender.close().await;
        });
        let _ = tokio::time::timeout(limit, futures_join_all(closing)).await;
    }
}

/// Runs futures concurrently to completion (a tiny join_all).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_checkout_is_wanted_until_a_connection_comes_back() {
        let relay: RelayConfig =
            toml::from_str("host = \"127.0.0.1\"\nport = 2525\nconcurrency = 1\n").unwrap();
        let pool = RelayPool::new("a".into(), relay, "client.test".into(), None, None);
        let lease = pool.try_checkout().ok().unwrap();
        assert!(!pool.is_wanted(), "nobody waits yet");
        assert!(pool.try_checkout().is_err());
        assert!(pool.is_wanted(), "a message waits for the only connection");
        pool.checkin(lease);
        assert!(!pool.is_wanted(), "the connection came back");
    }
}
