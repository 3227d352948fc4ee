//! AUTH failure budgets (Postfix's anvil, fail2ban's findtime/maxretry/
//! bantime): how many wrong passwords a client address, and a user name,
//! may send before AUTH is locked for a while, and how long each failure
//! is made to wait.
//!
//! Each failed AUTH from an address is answered after `auth_failure_delay`,
//! doubled with each further failure in the window (at most 16 times the
//! delay). When an address reaches `auth_failure_limit` failures within
//! `auth_failure_window`, or a user name reaches `auth_user_failure_limit`
//! (from any addresses), it is locked for `auth_lockout`: AUTH is answered
//! `454 4.7.0` without a password check, the session that crossed the
//! limit gets `421` and is closed, and new connections from a locked
//! address outside `allow_networks` get `421`. Each lockout is logged once.
//! A successful login clears the user's count, not the address's.
//!
//! This counts what clients have failed, over time; what they have open
//! at once (connections per address) is [`crate::anvil`]'s to count.
//!
//! # Security
//! The tables are filled by remote clients, so they are bounded
//! ([`MAX_RECORDS`] each; expired records go first, then the oldest). An
//! IPv6 client is counted by its /64, which one host usually holds whole,
//! so rotating addresses inside it does not reset the count. Time comes
//! from the daemon's [`Clock`](crate::clock::Clock) (milliseconds).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Records kept per table (addresses, user names).
pub const MAX_RECORDS: usize = 16_384;

/// The `[smtp]` keys that set the budgets.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Failures from one address before it is locked (0: no limit).
    pub per_address: u32,
    /// Failures for one user name before it is locked (0: no limit).
    pub per_user: u32,
    pub window_ms: u64,
    pub lockout_ms: u64,
    /// The wait before the reply to a first failure; doubles after.
    pub delay: Duration,
}

impl From<&crate::config::SmtpConfig> for Budget {
    fn from(smtp: &crate::config::SmtpConfig) -> Budget {
        let ms =
            |d: &crate::config::HumanDuration| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX);
        Budget {
            per_address: smtp.auth_failure_limit,
            per_user: smtp.auth_user_failure_limit,
            window_ms: ms(&smtp.auth_failure_window),
            lockout_ms: ms(&smtp.auth_lockout),
            delay: smtp.auth_failure_delay.0,
        }
    }
}

/// What is locked, and until when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    Address { until_ms: u64 },
    User { until_ms: u64 },
}

/// What a failure leads to.
#[derive(Debug)]
pub struct Failure {
    /// How long to wait before answering.
    pub delay: Duration,
    /// Set when this failure started a lockout (log it, close the session).
    pub lockout: Option<Locked>,
    /// Failures counted in the window for the address and the user.
    pub address_failures: u32,
    pub user_failures: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Record {
    failures: u32,
    window_start_ms: u64,
    locked_until_ms: u64,
}

impl Record {
    fn live(&self, now: u64, b: &Budget) -> bool {
        self.locked_until_ms > now || now.saturating_sub(self.window_start_ms) < b.window_ms
    }
}

struct Counts<K> {
    records: HashMap<K, Record>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new() -> Self {
        Counts {
            records: HashMap::new(),
        }
    }

    fn locked_until(&self, key: &K, now: u64) -> Option<u64> {
        self.records
            .get(key)
            .map(|r| r.locked_until_ms)
            .filter(|&until| until > now)
    }

    /// Counts a failure; returns the count in the window and whether this
    /// failure started a lockout.
    fn fail(&mut self, key: &K, limit: u32, now: u64, b: &Budget) -> (u32, bool) {
        if !self.records.contains_key(key) && self.records.len() >= MAX_RECORDS {
            self.make_room(now, b);
        }
        let r = self.records.entry(key.clone()).or_default();
        if now.saturating_sub(r.window_start_ms) >= b.window_ms {
            r.failures = 0;
            r.window_start_ms = now;
        }
        r.failures = r.failures.saturating_add(1);
        let starts = limit > 0 && r.failures >= limit && r.locked_until_ms <= now;
        if starts {
            r.locked_until_ms = now.saturating_add(b.lockout_ms);
            // The next window starts when the lockout ends.
            r.failures = 0;
            r.window_start_ms = r.locked_until_ms;
        }
        (if starts { limit } else { r.failures }, starts)
    }

    fn make_room(&mut self, now: u64, b: &Budget) {
        self.records.retain(|_, r| r.live(now, b));
        if self.records.len() >= MAX_RECORDS {
            // Still full of live records: forget the oldest window.
            if let Some(oldest) = self
                .records
                .iter()
                .filter(|(_, r)| r.locked_until_ms <= now)
                .min_by_key(|(_, r)| r.window_start_ms)
                .map(|(k, _)| k.clone())
            {
                self.records.remove(&oldest);
            }
        }
    }

    fn clear(&mut self, key: &K) {
        self.records.remove(key);
    }
}

/// The failure tables; one per daemon, kept across config reloads.
pub struct AuthFailures {
    inner: Mutex<(Counts<IpAddr>, Counts<String>)>,
}

impl Default for AuthFailures {
    fn default() -> Self {
        AuthFailures {
            inner: Mutex::new((Counts::new(), Counts::new())),
        }
    }
}

/// The key an address is counted under: IPv4 as is (IPv4-mapped IPv6
/// too), IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl AuthFailures {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Counts<IpAddr>, Counts<String>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether AUTH from `ip` (and, once known, for `user`) is locked now.
    pub fn locked(&self, ip: IpAddr, user: Option<&str>, now_ms: u64) -> Option<Locked> {
        let t = self.lock();
        if let Some(until_ms) = t.0.locked_until(&client_key(ip), now_ms) {
            return Some(Locked::Address { until_ms });
        }
        let user = user?;
        t.1.locked_until(&user.to_string(), now_ms)
            .map(|until_ms| Locked::User { until_ms })
    }

    /// Counts a failed AUTH from `ip` for `user`.
    pub fn failed(&self, ip: IpAddr, user: Option<&str>, now_ms: u64, b: &Budget) -> Failure {
        let mut t = self.lock();
        let (address_failures, address_locked) =
            t.0.fail(&client_key(ip), b.per_address, now_ms, b);
        let (user_failures, user_locked) = match user {
            Some(u) => t.1.fail(&u.to_string(), b.per_user, now_ms, b),
            None => (0, false),
        };
        let lockout = if address_locked {
            Some(Locked::Address {
                until_ms: now_ms.saturating_add(b.lockout_ms),
            })
        } else if user_locked {
            Some(Locked::User {
                until_ms: now_ms.saturating_add(b.lockout_ms),
            })
        } else {
            None
        };
        let step = address_failures.saturating_sub(1).min(4);
        Failure {
            delay: if lockout.is_some() {
                Duration::ZERO
            } else {
                b.delay.saturating_mul(1 << step)
            },
            lockout,
            address_failures,
            user_failures,
        }
    }

    /// A successful login clears the user's count. The address keeps its
    /// own (as fail2ban does): one valid account must not let its holder
    /// reset the budget between guesses at other users.
    pub fn succeeded(&self, user: &str) {
        self.lock().1.clear(&user.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            per_address: 3,
            per_user: 5,
            window_ms: 60_000,
            lockout_ms: 600_000,
            delay: Duration::from_millis(100),
        }
    }

    #[test]
    fn delays_grow_then_the_address_is_locked_once() {
        let a = AuthFailures::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let b = budget();
        let f1 = a.failed(ip, Some("alice"), 1_000, &b);
        let f2 = a.failed(ip, Some("bob"), 2_000, &b);
        assert_eq!(f1.delay, Duration::from_millis(100));
        assert_eq!(f2.delay, Duration::from_millis(200));
        assert!(f1.lockout.is_none() && f2.lockout.is_none());
        let f3 = a.failed(ip, Some("carol"), 3_000, &b);
        assert_eq!(f3.lockout, Some(Locked::Address { until_ms: 603_000 }));
        assert_eq!(
            a.locked(ip, None, 4_000),
            Some(Locked::Address { until_ms: 603_000 })
        );
        // Failures during the lockout do not start another one.
        assert!(a.failed(ip, None, 5_000, &b).lockout.is_none());
        assert_eq!(a.locked(ip, None, 603_000), None);
    }

    #[test]
    fn a_user_is_locked_across_addresses() {
        let a = AuthFailures::default();
        let b = budget();
        let mut lock = None;
        for i in 0..5u8 {
            let ip = IpAddr::from([198, 51, 100, i]);
            lock = a.failed(ip, Some("alice"), 1_000, &b).lockout;
        }
        assert_eq!(lock, Some(Locked::User { until_ms: 601_000 }));
        let other = IpAddr::from([203, 0, 113, 1]);
        assert!(a.locked(other, Some("alice"), 2_000).is_some());
        assert!(a.locked(other, Some("bob"), 2_000).is_none());
    }

    #[test]
    fn windows_expire_and_success_clears() {
        let a = AuthFailures::default();
        let b = budget();
        let ip: IpAddr = "192.0.2.8".parse().unwrap();
        a.failed(ip, Some("u"), 1_000, &b);
        a.failed(ip, Some("u"), 2_000, &b);
        // A new window: the count starts again.
        let f = a.failed(ip, Some("u"), 70_000, &b);
        assert_eq!(f.address_failures, 1);
        a.failed(ip, Some("u"), 71_000, &b);
        a.succeeded("u");
        let f = a.failed(ip, Some("u"), 72_000, &b);
        assert_eq!((f.address_failures, f.user_failures), (3, 1));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_tables_are_bounded() {
        let a = AuthFailures::default();
        let b = budget();
        for i in 0..(MAX_RECORDS as u32 + 100) {
            a.failed(IpAddr::from(i.to_be_bytes()), None, 1_000, &b);
        }
        assert!(a.lock().0.records.len() <= MAX_RECORDS);
    }
}
