//! What the router can tell an operator: a snapshot of every relay's
//! state and limits ([`RelayState`], for `relayq queue list` and the status
//! endpoint), and the local counts saved across restarts
//! (`<spool_dir>/limits.json`), so a restart does not reset a daily cap.
//!
//! `limits.json` is written at most once a second while counts change,
//! and at shutdown, replaced whole and synced (`spool::replace_file`):
//! after a crash or a power loss at most the counts since the last save
//! (about a second) are lost. A file that does not parse is ignored with
//! a warning.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::concurrency::Change;
use super::health::Status;
use super::quota::{Period, SavedWindow, share_of};
use super::router::Router;

/// One relay as an operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RelayState {
    pub name: String,
    /// `host:port`.
    pub endpoint: String,
    /// "up", "down" or "paused".
    pub state: String,
    /// Since when it is down or paused (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since_ms: Option<u64>,
    /// Until when the circuit breaker pauses it (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Connections open now (busy or idle).
    pub connections: usize,
    /// The most ever allowed at once (`max_connections`).
    pub max_connections: usize,
    /// Connections allowed now: learned, or fixed by `concurrency = N`.
    #[serde(default)]
    pub concurrency: usize,
    /// Whether `concurrency` is learned ("adaptive") rather than fixed.
    #[serde(default)]
    pub adaptive: bool,
    /// The last change of `concurrency`: when, from, to, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_change: Option<Change>,
    #[serde(default)]
    pub limits: Vec<LimitState>,
}

/// One limit of a relay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LimitState {
    pub period: Period,
    /// "rolling" or "calendar Europe/Berlin".
    pub window: String,
    /// The limit that applies now (a share of it while Redis is down).
    pub limit: u32,
    pub used: u32,
    pub left: u32,
    /// When the count next goes down (unix ms): the end of the calendar
    /// period, or when the oldest counted message leaves a rolling window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at_ms: Option<u64>,
    /// Counted fleet-wide in Redis.
    pub shared: bool,
    /// Redis is unreachable: this instance's local share applies.
    pub fallback: bool,
}

impl Router {
    /// Every relay's state now. Fleet-wide counts are the latest Redis
    /// reported; call [`Router::refresh`] first for fresh ones.
    pub fn relay_states(&self) -> Vec<RelayState> {
        let now = self.clock.now_ms();
        let fallback = self.fleet.is_some() && self.fleet_state().down_since.is_some();
        let shared = self.fleet.is_some() && !fallback;
        self.relays
            .iter()
            .map(|r| {
                let mut st = r.state();
                let status = st.health.status(now);
                let last_error = match status {
                    Status::Up => None,
                    _ => st.health.last_error().map(str::to_string),
                };
                let fleet_used = st.fleet_used.clone();
                let limits = st
                    .quota
                    .windows
                    .iter_mut()
                    .enumerate()
                    .map(|(i, w)| {
                        let limit = if fallback {
                            share_of(w.spec.limit, self.share)
                        } else {
                            w.spec.limit
                        };
                        let local = w.used(now);
                        let used = match (&fleet_used, shared) {
                            (Some(u), true) => u.get(i).copied().unwrap_or(local),
                            _ => local,
                        };
                        LimitState {
                            period: w.spec.period,
                            window: w.spec.kind(),
                            limit,
                            used,
                            left: limit.saturating_sub(used),
                            resets_at_ms: w.resets_at(now),
                            shared,
                            fallback,
                        }
                    })
                    .collect();
                let (state, down_since_ms, paused_until_ms) = match status {
                    Status::Up => ("up", None, None),
                    Status::Down { since } => ("down", Some(since), None),
                    Status::Paused { since, until } => ("paused", Some(since), Some(until)),
                };
                RelayState {
                    name: r.name.to_string(),
                    endpoint: r.endpoint.clone(),
                    state: state.into(),
                    down_since_ms,
                    paused_until_ms,
                    last_error,
                    connections: r.pool.open_connections(),
                    max_connections: r.pool.max_connections(),
                    concurrency: r.pool.limit(),
                    adaptive: r.pool.is_adaptive(),
                    concurrency_change: Some(r.pool.last_change()),
                    limits,
                }
            })
            .collect()
    }

    /// Reads the fleet-wide counts from Redis (when it is reachable).
    pub async fn refresh(&self) {
        let Some(fleet) = &self.fleet else { return };
        if self.fleet_state().down_since.is_some() {
            return;
        }
        let now = self.clock.now_ms();
        for r in &self.relays {
            if r.specs.is_empty() {
                continue;
            }
            if let Ok(used) = fleet.peek(&r.name, &r.specs, now).await {
                r.state().fleet_used = Some(used);
            }
        }
    }

    /// Restores local counts saved by a previous run.
    pub fn load_limits(&self, path: &Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(target: "relayq::routing", "cannot read {}: {e}; relay limits start from zero", path.display());
                return;
            }
        };
        let saved: Saved = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "relayq::routing", "ignoring {}: {e}; relay limits start from zero", path.display());
                return;
            }
        };
        for r in &self.relays {
            let Some(windows) = saved.relays.get(&*r.name) else {
                continue;
            };
            let mut st = r.state();
            for w in &mut st.quota.windows {
                if let Some(s) = windows.iter().find(|s| s.period == w.spec.period) {
                    w.restore(s);
                }
            }
        }
    }

    /// Saves local counts if they changed (temp file and rename, 0600).
    pub fn save_limits(&self, path: &Path) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let relays: HashMap<String, Vec<SavedWindow>> = self
            .relays
            .iter()
            .filter(|r| !r.specs.is_empty())
            .map(|r| {
                let st = r.state();
                let windows = st.quota.windows.iter().map(|w| w.saved()).collect();
                (r.name.to_string(), windows)
            })
            .collect();
        let saved = Saved { version: 1, relays };
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|text| crate::spool::replace_file(path, &text));
        if let Err(e) = result {
            self.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(target: "relayq::routing", "cannot save relay limit counts to {}: {e}", path.display());
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    relays: HashMap<String, Vec<SavedWindow>>,
}
