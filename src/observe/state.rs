//! What the status endpoint reports besides counters: each relay's state
//! (up or down, since when, the last error), the last deliveries and
//! failures, the queue size over the last hour, and snapshots of the queue
//! read from the spool.
//!
//! The in-memory part is one process-wide table behind a mutex, written by
//! [`super::events`] from the workers and read by the HTTP handlers; it is
//! bounded (a fixed number of recent events and history samples), so a busy
//! server cannot grow it. Nothing here is persisted: after a restart the
//! page starts from the queue on disk and an empty history.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::spool::{Area, Spool, SpoolError};

/// How many recent deliveries and failures are kept for the page.
pub const RECENT: usize = 20;
/// Queue-size samples kept: one per [`SAMPLE_EVERY_SECS`], one hour.
pub const HISTORY: usize = 120;
pub const SAMPLE_EVERY_SECS: u64 = 30;

/// A relay's reachability, from the last connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayState {
    /// `up`, `down`, or `unknown` before the first attempt.
    pub state: &'static str,
    /// When it entered this state (unix ms).
    pub since_ms: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

/// One recipient's outcome in one attempt, as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentAttempt {
    #[serde(rename = "at", serialize_with = "super::http::ser_time")]
    pub at_ms: u64,
    pub queue_id: String,
    pub to: String,
    pub relay: String,
    pub status: &'static str,
    pub dsn: String,
    pub reply: String,
    pub delay: f64,
}

struct Observed {
    relays: BTreeMap<String, RelayState>,
    deliveries: VecDeque<RecentAttempt>,
    failures: VecDeque<RecentAttempt>,
    history: VecDeque<(u64, usize)>,
}

static OBSERVED: Mutex<Observed> = Mutex::new(Observed {
    relays: BTreeMap::new(),
    deliveries: VecDeque::new(),
    failures: VecDeque::new(),
    history: VecDeque::new(),
});

fn observed() -> MutexGuard<'static, Observed> {
    // A panic elsewhere while holding the lock leaves plain data behind;
    // the status page is still better served than not.
    OBSERVED.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Registers a relay so that it is listed (as `unknown`) before any attempt.
pub fn relay_known(relay: &str) {
    observed()
        .relays
        .entry(relay.to_string())
        .or_insert_with(|| RelayState {
            state: "unknown",
            since_ms: now_ms(),
            last_error: None,
            last_error_ms: None,
        });
}

/// Records a connection attempt's result; the state's `since` moves only
/// when the state changes.
pub fn relay_result(relay: &str, error: Option<&str>) {
    let now = now_ms();
    let mut o = observed();
    let entry = o
        .relays
        .entry(relay.to_string())
        .or_insert_with(|| RelayState {
            state: "unknown",
            since_ms: now,
            last_error: None,
            last_error_ms: None,
        });
    let state = if error.is_some() { "down" } else { "up" };
    if entry.state != state {
        entry.state = state;
        entry.since_ms = now;
    }
    if let Some(e) = error {
        entry.last_error = Some(e.to_string());
        entry.last_error_ms = Some(now);
    }
}

pub fn relays() -> Vec<(String, RelayState)> {
    observed()
        .relays
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn record_attempt(a: RecentAttempt) {
    let mut o = observed();
    let list = if a.status == "sent" {
        &mut o.deliveries
    } else {
        &mut o.failures
    };
    if list.len() == RECENT {
        list.pop_back();
    }
    list.push_front(a);
}

/// The last deliveries and the last failures, newest first.
pub fn recent() -> (Vec<RecentAttempt>, Vec<RecentAttempt>) {
    let o = observed();
    (
        o.deliveries.iter().cloned().collect(),
        o.failures.iter().cloned().collect(),
    )
}

/// Adds a queue-size sample, dropping those older than an hour.
pub fn sample_queue(at_ms: u64, size: usize) {
    let mut o = observed();
    if o.history.len() == HISTORY {
        o.history.pop_front();
    }
    o.history.push_back((at_ms, size));
}

/// Queue-size samples of the last hour, oldest first.
pub fn history(now_ms: u64) -> Vec<(u64, usize)> {
    observed()
        .history
        .iter()
        .copied()
        .filter(|(t, _)| now_ms.saturating_sub(*t) <= 3_600_000)
        .collect()
}

/// A queued message as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedMessage {
    pub queue_id: String,
    pub held: bool,
    #[serde(rename = "arrival", serialize_with = "super::http::ser_time")]
    pub arrival_ms: u64,
    pub sender: String,
    pub size: u64,
    pub attempts: u32,
    #[serde(rename = "next_attempt", serialize_with = "super::http::ser_opt_time")]
    pub next_attempt_ms: Option<u64>,
    /// Pending recipients with the reason of their last deferral.
    pub recipients: Vec<PendingRecipient>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PendingRecipient {
    pub address: String,
    /// The last deferral's reason (the upstream's reply or the connection
    /// error); `None` before the first attempt.
    pub reason: Option<String>,
}

/// The queue as it is on disk right now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueSnapshot {
    pub queued: usize,
    pub held: usize,
    /// Bytes of the queue files in `queue/` and `hold/`.
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    /// The oldest messages, at most the `detail` asked for.
    pub messages: Vec<QueuedMessage>,
}

/// Reads the spool: a directory listing and a `stat` per file, plus the
/// queue file headers of the `detail` oldest messages. Blocking I/O.
pub fn snapshot(spool: &Spool, now_ms: u64, detail: usize) -> Result<QueueSnapshot, SpoolError> {
    let mut snap = QueueSnapshot::default();
    let mut all: Vec<(String, Area)> = Vec::new();
    for area in [Area::Queue, Area::Hold] {
        let ids = spool.list(area)?;
        match area {
            Area::Hold => snap.held = ids.len(),
            _ => snap.queued = ids.len(),
        }
        for id in ids {
            if let Ok(path) = spool.path(area, &id)
                && let Ok(m) = std::fs::metadata(path)
            {
                snap.bytes += m.len();
            }
            all.push((id, area));
        }
    }
    // ULIDs sort by arrival.
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, area) in all.iter().take(detail) {
        // Delivered and removed while we looked: not in the queue any more.
        let Ok(meta) = spool.read_meta(*area, id) else {
            continue;
        };
        snap.messages.push(QueuedMessage {
            queue_id: meta.id.clone(),
            held: *area == Area::Hold,
            arrival_ms: meta.arrival_ms,
            sender: meta.sender.clone(),
            size: meta.size,
            attempts: meta.attempts,
            next_attempt_ms: meta.next_attempt_ms,
            recipients: meta
                .pending()
                .map(|(_, r)| PendingRecipient {
                    address: r.address.clone(),
                    reason: r.last_reply.clone(),
                })
                .collect(),
        });
    }
    // The oldest message waiting for delivery; held ones wait on purpose.
    let oldest = all
        .iter()
        .filter(|(_, area)| *area == Area::Queue)
        .find_map(|(id, area)| spool.read_meta(*area, id).ok())
        .map(|m| m.arrival_ms);
    snap.oldest_age_seconds = oldest.map(|o| now_ms.saturating_sub(o) as f64 / 1000.0);
    Ok(snap)
}
