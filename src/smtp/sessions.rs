//! The table of open SMTP sessions: who may come in, when the server is
//! under stress, and which session makes room when it is full.
//!
//! Postfix's answer to connection floods is the model: a high session
//! ceiling (an idle session costs a socket and a few KB here, see the
//! README's figures), timeouts that drop to seconds under stress (its
//! `smtpd_timeout = ${stress?{10}:{300}}s`), and, because a local MTA must
//! stay usable by the application on the same host, a full table that
//! closes its idlest session for a newcomer instead of refusing everyone.
//!
//! - **Admission.** A client outside `allow_networks` may hold at most
//!   `max_connections_per_ip` sessions; more get `421`. Sessions are
//!   counted per address by [`crate::anvil`], the one connection counter
//!   (pickup.sock's reports per user are counted there too). Clients inside
//!   `allow_networks` (loopback, where the app connects from) are never
//!   refused for their address alone: when the table is full, the idlest
//!   session of the address holding the most sessions beyond
//!   `max_connections_per_ip` is closed first, then the idlest of all, so
//!   a flood from one trusted address pays for itself and the app's
//!   working sessions are kept.
//! - **Idle** means waiting for the client's next command; a session
//!   inside DATA or waiting for the spool is busy and is never closed to
//!   make room.
//! - **Stress** starts when three quarters of `max_connections` are in use
//!   and ends below half: sessions then wait `stress_timeout` instead of
//!   `command_timeout`/`data_timeout`, and a message must arrive at
//!   `min_data_rate` at least (see `session`).
//!
//! # Security
//! Everything here is driven by remote clients: the table is bounded by
//! `max_connections` plus [`EVICT_SLACK`] sessions on their way out, and
//! every lookup is O(sessions) at worst, only when the table is full.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, watch};

use crate::anvil::{Anvil, Slot};

/// Sessions told to make room that may still be finishing their last
/// reply; beyond this many, a full table refuses newcomers.
pub const EVICT_SLACK: usize = 64;

/// Sessions open at once, after which memory is trimmed when three
/// quarters of them have closed (see `crate::memory`).
const TRIM_AFTER: usize = 128;

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The table is full of busy sessions.
    Full,
    /// This address (outside allow_networks) has its share already.
    PerAddress,
}

/// One open session as the table sees it.
pub struct Presence {
    entry: Option<Arc<Entry>>,
    table: Option<Arc<Sessions>>,
    stress: watch::Receiver<bool>,
    /// The address's place in the anvil; given back after the table let
    /// the session go (fields drop after [`Drop::drop`]).
    _slot: Option<Slot<IpAddr>>,
}

struct Entry {
    id: u64,
    ip: IpAddr,
    /// Milliseconds since the table's epoch, plus one, when the session
    /// began waiting for a command; 0 while it is busy.
    idle_since: AtomicU64,
    /// Set once the session has been asked to make room.
    evicted: AtomicBool,
    evict: Notify,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Arc<Entry>>,
    /// Sessions asked to close that have not closed yet.
    evicting: usize,
    /// The most sessions open at once since memory was last trimmed.
    high_water: usize,
}

pub struct Sessions {
    max: usize,
    /// `max_connections_per_ip`, as of the last admission (reloadable).
    per_ip_max: AtomicU64,
    epoch: Instant,
    table: Mutex<Table>,
    /// Sessions per address. Taken under `table`'s lock, never the other
    /// way round.
    per_ip: Arc<Anvil<IpAddr>>,
    stress: watch::Sender<bool>,
}

impl Sessions {
    pub fn new(max: usize) -> Arc<Sessions> {
        Arc::new(Sessions {
            max: max.max(1),
            per_ip_max: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
            per_ip: Arc::default(),
            stress: watch::channel(false).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new session from `ip`, closing the idlest one if the table
    /// is full. `trusted`: the address is in allow_networks; `per_ip_max`:
    /// `max_connections_per_ip`.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        trusted: bool,
        per_ip_max: usize,
    ) -> Result<Presence, Refusal> {
        let per_ip_max = per_ip_max.max(1);
        self.per_ip_max.store(per_ip_max as u64, Ordering::Relaxed);
        let mut t = self.lock();
        // Trusted addresses are counted too (a flood from one of them is
        // found by its count), but never refused for it.
        let limit = if trusted { usize::MAX } else { per_ip_max };
        let slot = self
            .per_ip
            .take(ip, limit, usize::MAX)
            .ok_or(Refusal::PerAddress)?;
        if t.open.len() >= self.max {
            if t.evicting >= EVICT_SLACK {
                return Err(Refusal::Full);
            }
            let victim = self.idlest(&t).ok_or(Refusal::Full)?;
            victim.evicted.store(true, Ordering::Relaxed);
            victim.evict.notify_one();
            t.evicting += 1;
        }
        t.next_id += 1;
        let entry = Arc::new(Entry {
            id: t.next_id,
            ip,
            idle_since: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        t.open.insert(entry.id, entry.clone());
        t.high_water = t.high_water.max(t.open.len());
        self.update_stress(&t);
        Ok(Presence {
            entry: Some(entry),
            table: Some(self.clone()),
            stress: self.stress.subscribe(),
            _slot: Some(slot),
        })
    }

    /// The session to close for a newcomer: among idle sessions not already
    /// leaving, the idlest of the address most over its share, else the
    /// idlest of all.
    fn idlest(&self, t: &Table) -> Option<Arc<Entry>> {
        let share = usize::try_from(self.per_ip_max.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let flooder = self.per_ip.busiest(share);
        let candidates = || {
            t.open.values().filter(|e| {
                e.idle_since.load(Ordering::Relaxed) != 0 && !e.evicted.load(Ordering::Relaxed)
            })
        };
        let oldest = |it: &mut dyn Iterator<Item = &Arc<Entry>>| {
            it.min_by_key(|e| e.idle_since.load(Ordering::Relaxed))
                .cloned()
        };
        flooder
            .and_then(|ip| oldest(&mut candidates().filter(|e| e.ip == ip)))
            .or_else(|| oldest(&mut candidates()))
    }

    fn update_stress(&self, t: &Table) {
        let open = t.open.len();
        let now = *self.stress.borrow();
        let next = if now {
            open * 2 >= self.max
        } else {
            open * 4 >= self.max * 3
        };
        if next != now {
            self.stress.send_replace(next);
            if next {
                tracing::warn!(
                    "SMTP sessions under stress: {open} of {} in use; timeouts drop to smtp.stress_timeout and the idlest sessions make room for new clients",
                    self.max
                );
            } else {
                tracing::info!(
                    "SMTP sessions no longer under stress: {open} of {} in use",
                    self.max
                );
            }
        }
    }

    fn leave(&self, entry: &Entry) {
        let mut t = self.lock();
        if t.open.remove(&entry.id).is_none() {
            return;
        }
        if entry.evicted.load(Ordering::Relaxed) {
            t.evicting = t.evicting.saturating_sub(1);
        }
        self.update_stress(&t);
        // Most of a crowd of sessions has gone: give their buffers back.
        if t.high_water >= TRIM_AFTER && t.open.len() * 4 <= t.high_water {
            t.high_water = t.open.len();
            let _ = std::thread::Builder::new()
                .name("relayq-trim".into())
                .spawn(crate::memory::trim);
        }
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }
}

impl Presence {
    /// A session the table does not know (`sendmail -bs`, tests): never
    /// under stress, never asked to make room.
    pub fn detached() -> Presence {
        Presence {
            entry: None,
            table: None,
            stress: watch::channel(false).1,
            _slot: None,
        }
    }

    /// Whether the session is in the server's table (a network client).
    pub fn attached(&self) -> bool {
        self.entry.is_some()
    }

    /// The session now waits for the client's next command.
    pub fn idle(&self) {
        if let (Some(e), Some(t)) = (&self.entry, &self.table) {
            let ms = u64::try_from(t.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            e.idle_since.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// The session works on a command or a message.
    pub fn busy(&self) {
        if let Some(e) = &self.entry {
            e.idle_since.store(0, Ordering::Relaxed);
        }
    }

    pub fn under_stress(&self) -> bool {
        *self.stress.borrow()
    }

    /// A watch on the stress state (its sender is gone when detached).
    pub fn stress_watch(&self) -> watch::Receiver<bool> {
        self.stress.clone()
    }

    /// Resolves when the table asks this session to make room.
    pub async fn evicted(&self) {
        match &self.entry {
            Some(e) => e.evict.notified().await,
            None => std::future::pending::<()>().await,
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let (Some(e), Some(t)) = (&self.entry, &self.table) {
            t.leave(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_addresses_get_their_share_only() {
        let s = Sessions::new(10);
        let a = s.admit(ip("192.0.2.1"), false, 2).unwrap();
        let _b = s.admit(ip("192.0.2.1"), false, 2).unwrap();
        assert_eq!(
            s.admit(ip("192.0.2.1"), false, 2).err(),
            Some(Refusal::PerAddress)
        );
        drop(a);
        assert!(s.admit(ip("192.0.2.1"), false, 2).is_ok());
    }

    #[test]
    fn a_full_table_closes_the_idlest_of_the_flooder() {
        let s = Sessions::new(4);
        let app = s.admit(ip("127.0.0.1"), true, 2).unwrap();
        app.idle();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let flood: Vec<_> = (0..3)
            .map(|_| s.admit(ip("127.0.0.9"), true, 2).unwrap())
            .collect();
        for f in &flood {
            f.idle();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // The app's session is the idlest, but 127.0.0.9 is over its share.
        let _new = s.admit(ip("127.0.0.1"), true, 2).unwrap();
        assert!(
            flood[0]
                .entry
                .as_ref()
                .unwrap()
                .evicted
                .load(Ordering::Relaxed)
        );
        assert!(!app.entry.as_ref().unwrap().evicted.load(Ordering::Relaxed));
        // Busy sessions are never chosen.
        for f in &flood {
            f.busy();
        }
        app.busy();
        assert_eq!(s.admit(ip("127.0.0.1"), true, 2).err(), Some(Refusal::Full));
    }

    #[test]
    fn stress_has_hysteresis() {
        let s = Sessions::new(8);
        let mut held: Vec<_> = (0..5)
            .map(|_| s.admit(ip("127.0.0.1"), true, 100).unwrap())
            .collect();
        assert!(!held[0].under_stress());
        held.push(s.admit(ip("127.0.0.1"), true, 100).unwrap());
        assert!(held[0].under_stress(), "6 of 8");
        held.truncate(4);
        assert!(held[0].under_stress(), "4 of 8: still");
        held.truncate(3);
        assert!(!held[0].under_stress(), "3 of 8: over");
    }
}
