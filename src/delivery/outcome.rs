//! Delivery outcomes as types, and the retry schedule.

use std::sync::Arc;
use std::time::Duration;

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The upstream took responsibility: its reply, verbatim.
    Delivered { reply: String },
    /// Try again later (4xx, connection trouble, TLS or AUTH problems),
    /// with the enhanced status code that says why (RFC 3463; `4.4.1` no
    /// answer from the host, `4.4.2` connection lost, `4.7.5` TLS...).
    Deferred { reason: String, status: String },
    /// Failed for good (5xx): bounce to the sender. `local`: relayq
    /// decided it (the upstream was never asked), so the bounce names no
    /// remote MTA.
    Failed {
        reply: String,
        status: String,
        local: bool,
    },
}

impl RcptOutcome {
    /// The enhanced status code for logs (`dsn=`).
    pub fn dsn(&self) -> String {
        match self {
            RcptOutcome::Delivered { reply } => status_of(reply).unwrap_or_else(|| "2.0.0".into()),
            RcptOutcome::Deferred { status, .. } => status.clone(),
            RcptOutcome::Failed { status, .. } => status.clone(),
        }
    }
}

/// Extracts "x.y.z" from a reply like "550 5.1.1 user unknown".
pub fn status_of(reply: &str) -> Option<String> {
    let mut words = reply.split_whitespace();
    let code = words.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let esc = words.next()?;
    let parts: Vec<&str> = esc.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0] == &code[..1];
    ok.then(|| esc.to_string())
}

/// The result of one attempt at one message, as a transport reports it.
#[derive(Debug, Clone, Default)]
pub struct AttemptReport {
    /// `host[ip]:port` or `maildir:/path`, for the log.
    pub relay: String,
    /// One entry per recipient index that was attempted.
    pub results: Vec<(usize, RcptOutcome)>,
    /// Time spent connecting (including TLS and AUTH) and transferring.
    pub conn_time: Duration,
    pub xfer_time: Duration,
    /// The relay's name when relays are named; the log shows it in place
    /// of the host (`relay=ses[192.0.2.1]:587`).
    pub via: Option<String>,
    /// Why this relay took it (route and failover), for the log.
    pub note: Option<String>,
    /// Retry deferred recipients no later than this (unix ms): when the
    /// relay's outage reaches `failover_after` or its pause ends.
    pub retry_at_ms: Option<u64>,
    /// Relays whose recovery should wake this message early.
    pub wake_on: Vec<Arc<str>>,
    /// The upstream offers DSN, so NOTIFY went with each recipient and the
    /// notices are its to send (RFC 3461 6.2.3).
    pub upstream_dsn: bool,
    /// A delivered recipient was delivered for good (the capture Maildir),
    /// not relayed.
    pub final_delivery: bool,
}

impl AttemptReport {
    /// `relay=` in the log: the relay's name in place of the host when
    /// relays are named.
    pub fn log_relay(&self) -> String {
        match (&self.via, self.relay.find('[')) {
            (Some(name), Some(bracket)) => format!("{name}{}", &self.relay[bracket..]),
            (Some(name), None) => format!("{name}[{}]", self.relay),
            (None, _) => self.relay.clone(),
        }
    }
}

/// What a transport did with a message.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// It was tried (or the connection attempt failed).
    Attempted(AttemptReport),
    /// Not tried: every relay it may use is paused, down or over a limit.
    /// Try again at `until` (unix ms), or when one of `relays` comes back.
    Wait {
        until: u64,
        reason: String,
        relays: Vec<Arc<str>>,
    },
    /// Not tried: every connection to `relay` is busy. `seen` is the
    /// pool's release count when that was found, so the scheduler can tell
    /// whether a connection has come back since.
    Parked { relay: Arc<str>, seen: u64 },
    /// Not tried: every connection to the relay is busy, and the relay's
    /// pool has it, for one of them to carry next (`transport::pool`). It
    /// is no longer the worker's.
    HandedOver,
}

/// Exponential backoff with jitter: `min * 2^(attempts-1)`, capped at
/// `max`, then scaled by a random factor in [0.75, 1.0] so that a burst of
/// messages deferred together does not come back together. Never below `min`.
pub fn backoff(attempts: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = min.saturating_mul(1u32 << exp).min(max);
    let factor = 0.75 + 0.25 * jitter.clamp(0.0, 1.0);
    base.mul_f64(factor).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        assert_eq!(
            status_of("550 5.1.1 no such user").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(status_of("250 Ok").as_deref(), None);
        assert_eq!(status_of("451 5.1.1 mismatched class").as_deref(), None);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let (min, max) = (Duration::from_secs(300), Duration::from_secs(4000));
        assert_eq!(backoff(1, min, max, 1.0), min);
        assert_eq!(backoff(2, min, max, 1.0), Duration::from_secs(600));
        assert_eq!(backoff(4, min, max, 1.0), Duration::from_secs(2400));
        assert_eq!(backoff(10, min, max, 1.0), max);
        assert_eq!(backoff(10, min, max, 0.0), Duration::from_secs(3000));
        assert_eq!(backoff(1, min, max, 0.0), min);
    }
}
