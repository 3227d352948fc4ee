//! A budget for log lines that outsiders can cause: at most a few lines per
//! key (a client address, a local user) per period, then silence, then one
//! line saying how many were left out. A flood of bad input must not turn
//! into a flood of log lines (the journal rate-limits whole services, so
//! the lines that matter would be lost with the noise).
//!
//! # Security
//! The keys come from outside: the table is bounded ([`MAX_KEYS`]) and
//! forgets the quietest keys first.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked at once.
pub const MAX_KEYS: usize = 4096;

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What the caller should do with a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it. `suppressed`: lines of this key left out in the previous
    /// period, to mention with it.
    Log { suppressed: u64 },
    /// Leave it out (it is counted).
    Quiet,
}

pub struct LogBudget<K> {
    per_period: u32,
    period: Duration,
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Clone> LogBudget<K> {
    pub fn new(per_period: u32, period: Duration) -> Self {
        LogBudget {
            per_period,
            period,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Asks to log one line about `key` now.
    pub fn check(&self, key: &K) -> Verdict {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Verdict {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !w.contains_key(key) && w.len() >= MAX_KEYS {
            let period = self.period;
            w.retain(|_, win| now.duration_since(win.start) < period);
            if w.len() >= MAX_KEYS
                && let Some(k) = w
                    .iter()
                    .min_by_key(|(_, win)| win.logged as u64 + win.suppressed)
                    .map(|(k, _)| k.clone())
            {
                w.remove(&k);
            }
        }
        let win = w.entry(key.clone()).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut carried = 0;
        if now.duration_since(win.start) >= self.period {
            carried = win.suppressed;
            *win = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if win.logged < self.per_period {
            win.logged += 1;
            Verdict::Log {
                suppressed: carried,
            }
        } else {
            win.suppressed += 1;
            Verdict::Quiet
        }
    }

    /// Lines left out for `key` in the current period (for a closing line).
    pub fn suppressed(&self, key: &K) -> u64 {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.get(key).map_or(0, |win| win.suppressed)
    }
}

/// ` (N similar lines left out in the last period)`, or nothing.
pub fn note(suppressed: u64, period: &str) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} similar lines left out in the previous {period})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_quiet_after_its_budget_then_says_how_many_were_left_out() {
        let b = LogBudget::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(b.check_at(&1, t0), Verdict::Log { suppressed: 0 });
        assert_eq!(b.check_at(&1, t0), Verdict::Log { suppressed: 0 });
        for _ in 0..5 {
            assert_eq!(b.check_at(&1, t0), Verdict::Quiet);
        }
        assert_eq!(b.check_at(&2, t0), Verdict::Log { suppressed: 0 });
        let later = t0 + Duration::from_secs(61);
        assert_eq!(b.check_at(&1, later), Verdict::Log { suppressed: 5 });
    }

    #[test]
    fn the_table_is_bounded() {
        let b = LogBudget::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for k in 0..(MAX_KEYS as u32 * 2) {
            b.check_at(&k, t0);
        }
        assert!(b.windows.lock().unwrap().len() <= MAX_KEYS);
    }
}
