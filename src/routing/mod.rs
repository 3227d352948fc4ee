//! Routing: several named relays, which mail goes to which, failover when
//! a relay is down, a relay-wide circuit breaker, and provider limits,
//! counted locally or fleet-wide in Redis.
//!
//! ```text
//!  worker ─> Router::deliver(meta, body)
//!              route::RouteTable     sender domain / sender / header -> [primary, fallbacks..]
//!              health::Health        up | down since T | paused until T   (per relay)
//!              quota::Quota          per second / hour / day, rolling or calendar
//!              fleet::Fleet          the same counts in Redis, atomically (Lua)
//!              transport::pool       at most max_connections per relay
//!           <- Attempted(report) | Wait { until, reason } | Parked { relay } | HandedOver
//!              follow::Follow        + the next message, sent behind this one's end of data
//! ```
//!
//! The route is decided each time a message is tried, from its envelope
//! sender and header section (so queued mail follows the running config,
//! and nothing extra is stored in the queue file); relayq's own
//! `X-Relayq-*` headers are removed from what is sent. A background task
//! ([`maintain`]) probes relays that are down, closes idle connections and
//! saves the local counts.
//!
//! [`relay_states`] is the snapshot the control socket (`relayq queue
//! list`) and the status endpoint show.

pub mod concurrency;
pub mod config;
pub mod fleet;
mod follow;
pub mod headers;
pub mod health;
pub mod quota;
mod reserve;
pub mod route;
pub mod router;
pub mod status;

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::sync::watch;

pub use router::Router;
pub use status::{LimitState, RelayState};

/// The running daemon's router, for [`relay_states`] and the control
/// socket. Weak: the daemon owns the router.
static CURRENT: RwLock<Option<Weak<Router>>> = RwLock::new(None);

/// Makes `router` the one [`relay_states`] and [`current`] report on.
pub fn install(router: &Arc<Router>) {
    if let Ok(mut c) = CURRENT.write() {
        *c = Some(Arc::downgrade(router));
    }
}

/// The running daemon's router, if it relays (not in capture mode).
pub fn current() -> Option<Arc<Router>> {
    CURRENT.read().ok()?.as_ref()?.upgrade()
}

/// Every relay's state (health, connections, limits) in the running
/// daemon; empty when it does not relay. Fleet-wide counts are the latest
/// Redis reported (see [`Router::refresh`]).
pub fn relay_states() -> Vec<RelayState> {
    current().map(|r| r.relay_states()).unwrap_or_default()
}

/// A time for logs and reasons: "2026-01-16 00:00:00 CET", in `tz` or the
/// system time zone.
pub fn fmt_time(ms: u64, tz: Option<&jiff::tz::TimeZone>) -> String {
    let ts = jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let tz = tz.cloned().unwrap_or_else(jiff::tz::TimeZone::system);
    ts.to_zoned_datetime(tz)
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// Background upkeep until shutdown: probes relays that are down, closes
/// idle connections, saves local limit counts to `limits_file`. Saves once
/// more and closes every idle connection when shutdown is requested.
pub async fn maintain(
    router: Arc<Router>,
    limits_file: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick = Duration::from_millis(250);
    let mut saved_at = tokio::time::Instant::now();
    loop {
        router.probe_due().await;
        for r in &router.relays {
            r.pool.reap();
        }
        if let Some(path) = &limits_file
            && saved_at.elapsed() >= Duration::from_secs(1)
        {
            saved_at = tokio::time::Instant::now();
            let (router, path) = (router.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || router.save_limits(&path)).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
}

/// At shutdown, after the workers stopped: QUIT idle connections and save
/// the counts.
pub async fn shutdown(router: &Arc<Router>, limits_file: Option<PathBuf>) {
    for r in &router.relays {
        r.pool.close_all(Duration::from_secs(5)).await;
    }
    if let Some(path) = limits_file {
        let router = router.clone();
        let _ = tokio::task::spawn_blocking(move || router.save_limits(&path)).await;
    }
}
