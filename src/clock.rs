//! The daemon's notion of "now", injectable so tests can walk through days
//! of retries and a five-day expiry in milliseconds.
//!
//! Production code asks a [`Clock`] for the time instead of calling
//! `SystemTime::now()`. A clock may be skewed forward at run time through the
//! control socket, but only when the daemon was started with
//! `RELAYQ_TEST_CLOCK=1` in its environment: a production daemon refuses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time plus an offset that only ever grows.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Milliseconds added to the system time; shared by every clone.
    skew_ms: Arc<AtomicU64>,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_millis(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Milliseconds since the Unix epoch, the unit the spool records.
    pub fn now_ms(&self) -> u64 {
        to_ms(self.now())
    }

    /// Milliseconds on a clock that never jumps (counted from the first
    /// call in this process), plus the same skew: for lifetimes and waits,
    /// which a step of the wall clock (an NTP correction, `date -s`) must
    /// neither stretch nor cut short.
    pub fn monotonic_ms(&self) -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        let start = *START.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and every clone) forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.skew_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Whether this process may have its clock skewed by the control socket.
    pub fn skew_allowed() -> bool {
        std::env::var_os("RELAYQ_TEST_CLOCK").is_some_and(|v| v == "1")
    }
}

pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_is_shared_by_clones() {
        let a = Clock::new();
        let b = a.clone();
        let before = b.now_ms();
        a.advance(Duration::from_secs(86_400));
        assert!(b.now_ms() >= before + 86_400_000);
    }
}
