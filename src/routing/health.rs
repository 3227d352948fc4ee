//! One relay's health: up, down since T, or paused by the circuit breaker
//! until T, and what that means for a message that wants to use it.
//!
//! A relay goes down on its first connection-level failure (refused,
//! timed out, TLS, a non-2xx greeting, AUTH refused). After
//! `breaker_failures` failures in a row, or at once on a `421`/`454`
//! ("too many connections/logins") or a refusal of our credentials (a 5xx
//! to AUTH, no OAuth2 token), the breaker opens and pauses it: no
//! message is sent to it any more, and when the pause ends only a probe
//! connection tries it (so waiting mail does not stampede a relay that may
//! still be down). Every failed probe doubles the pause, up to
//! `breaker_pause_max`. One success (a probe, or a delivery that was
//! already under way) closes the breaker: the relay is up.
//!
//! For the first `failover_after` of an outage, mail waits for (or keeps
//! trying) the relay; after that, routes with a fallback send it to the
//! next relay. A permanent reply for a recipient is not a failure of the
//! relay: it is [`Signal::Ok`]. Pure state: times are passed in (unix ms).

/// How long mail waits for a due probe's verdict before looking again.
const PROBE_RESULT_WAIT: u64 = 1_000;

/// What an attempt or probe said about the relay itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The relay talked SMTP with us (whatever it said about the message).
    Ok,
    /// Connection-level failure: counts toward the breaker.
    Down(String),
    /// 421/454 "too many connections/logins": pause at once.
    Throttled(String),
    /// Our credentials are refused (a 5xx to AUTH) or no OAuth2 token can
    /// be had: pause at once, since trying again before an operator fixes
    /// it only earns a lockout.
    Refused(String),
}

impl Signal {
    /// The failure's text; `None` for [`Signal::Ok`].
    pub fn error(&self) -> Option<&str> {
        match self {
            Signal::Ok => None,
            Signal::Down(e) | Signal::Throttled(e) | Signal::Refused(e) => Some(e),
        }
    }
}

/// The breaker and failover settings of one relay, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub failover_after: u64,
    pub failures: u32,
    pub pause: u64,
    pub pause_max: u64,
}

impl Policy {
    pub fn of(relay: &crate::config::RelayConfig) -> Policy {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        Policy {
            failover_after: ms(relay.failover_after.0),
            failures: relay.breaker_failures.max(1),
            pause: ms(relay.breaker_pause.0).max(1),
            pause_max: ms(relay.breaker_pause_max.0).max(1),
        }
    }
}

/// A change worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    None,
    WentDown,
    Paused { until: u64 },
    CameUp { down_for: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Up,
    Down { since: u64 },
    Paused { since: u64, until: u64 },
}

/// Whether a message may use the relay now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Up, or down for less than `failover_after` and not paused: try it.
    Use,
    /// Paused, but the outage is younger than `failover_after`: wait for it
    /// (until this time) rather than fail over.
    WaitFor { until: u64 },
    /// Down or paused for longer than `failover_after`: fail over. `until`
    /// is when the pause ends, if paused.
    Skip { until: Option<u64> },
}

#[derive(Debug, Clone, Default)]
pub struct Health {
    down_since: Option<u64>,
    /// Consecutive failures.
    failures: u32,
    /// Consecutive pauses (the pause doubles with each).
    pauses: u32,
    /// Set while the breaker is open: the end of the current pause (a
    /// past time means the probe is due or running).
    paused_until: Option<u64>,
    /// When the prober should try the relay next; `None` while up or while
    /// a probe runs.
    next_probe: Option<u64>,
    last_error: Option<String>,
}

impl Health {
    pub fn status(&self, _now: u64) -> Status {
        match (self.down_since, self.paused_until) {
            (None, _) => Status::Up,
            (Some(since), Some(until)) => Status::Paused { since, until },
            (Some(since), None) => Status::Down { since },
        }
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn record(&mut self, signal: &Signal, now: u64, policy: &Policy) -> Transition {
        match signal {
            Signal::Ok => match self.down_since {
                Some(since) => {
                    *self = Health::default();
                    Transition::CameUp {
                        down_for: now.saturating_sub(since),
                    }
                }
                None => {
                    self.failures = 0;
                    Transition::None
                }
            },
            Signal::Down(e) | Signal::Throttled(e) | Signal::Refused(e) => {
                let first = self.down_since.is_none();
                self.down_since.get_or_insert(now);
                self.last_error = Some(e.clone());
                if self.paused_until.is_some_and(|until| until > now) {
                    // Attempts that started before the pause report late;
                    // they must not lengthen it.
                    return Transition::None;
                }
                self.failures += 1;
                if matches!(signal, Signal::Throttled(_) | Signal::Refused(_))
                    || self.failures >= policy.failures
                    || self.paused_until.is_some()
                {
                    self.pauses += 1;
                    let factor = 1u64 << (self.pauses - 1).min(20);
                    let until = now + policy.pause.saturating_mul(factor).min(policy.pause_max);
                    self.paused_until = Some(until);
                    self.next_probe = Some(until);
                    return Transition::Paused { until };
                }
                self.next_probe = Some(now + policy.pause);
                if first {
                    Transition::WentDown
                } else {
                    Transition::None
                }
            }
        }
    }

    pub fn availability(&self, now: u64, policy: &Policy) -> Availability {
        match self.status(now) {
            Status::Up => Availability::Use,
            Status::Down { since } if now < since.saturating_add(policy.failover_after) => {
                Availability::Use
            }
            Status::Down { .. } => Availability::Skip { until: None },
            Status::Paused { since, until } => {
                // Once the pause is over, the probe decides; look again
                // shortly (its success also wakes waiting mail at once).
                let reopen = if until > now {
                    until
                } else {
                    now + PROBE_RESULT_WAIT
                };
                let grace_end = since.saturating_add(policy.failover_after);
                if now < grace_end {
                    Availability::WaitFor {
                        until: reopen.min(grace_end),
                    }
                } else {
                    Availability::Skip {
                        until: Some(reopen),
                    }
                }
            }
        }
    }

    /// Whether the prober should try the relay now; if so, marks the
    /// probe as running.
    pub fn take_probe(&mut self, now: u64) -> bool {
        if self.down_since.is_some() && self.next_probe.is_some_and(|t| t <= now) {
            self.next_probe = None;
            return true;
        }
        false
    }

    /// A probe could not run (no free connection slot): try again soon.
    pub fn probe_later(&mut self, at: u64) {
        if self.down_since.is_some() && self.next_probe.is_none() {
            self.next_probe = Some(at);
        }
    }

    /// The next time the prober has something to do for this relay.
    pub fn next_probe(&self) -> Option<u64> {
        self.next_probe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failover_after: 2_000,
        failures: 3,
        pause: 1_000,
        pause_max: 3_000,
    };

    fn down() -> Signal {
        Signal::Down("connect refused".into())
    }

    #[test]
    fn failures_then_pause_with_doubling_and_recovery() {
        let mut h = Health::default();
        assert_eq!(h.record(&down(), 100, &POLICY), Transition::WentDown);
        assert_eq!(h.status(150), Status::Down { since: 100 });
        // Within the grace period a message still tries the relay.
        assert_eq!(h.availability(150, &POLICY), Availability::Use);
        assert_eq!(h.record(&down(), 200, &POLICY), Transition::None);
        assert_eq!(
            h.record(&down(), 300, &POLICY),
            Transition::Paused { until: 1_300 }
        );
        // A late report from an attempt that started earlier changes nothing.
        assert_eq!(h.record(&down(), 310, &POLICY), Transition::None);
        assert_eq!(
            h.status(500),
            Status::Paused {
                since: 100,
                until: 1_300
            }
        );
        // Paused within the grace period: wait for it.
        assert_eq!(
            h.availability(500, &POLICY),
            Availability::WaitFor { until: 1_300 }
        );
        // The probe is due when the pause ends, and only once.
        assert!(!h.take_probe(1_299));
        assert!(h.take_probe(1_300));
        assert!(!h.take_probe(1_300));
        // Until the probe says so, mail does not try the relay itself.
        assert_eq!(
            h.availability(1_350, &POLICY),
            Availability::WaitFor { until: 2_100 }
        );
        // A failed probe doubles the pause.
        assert_eq!(
            h.record(&down(), 1_400, &POLICY),
            Transition::Paused { until: 3_400 }
        );
        // Past the grace period: fail over.
        assert_eq!(
            h.availability(2_500, &POLICY),
            Availability::Skip { until: Some(3_400) }
        );
        assert_eq!(
            h.availability(3_500, &POLICY),
            Availability::Skip { until: Some(4_500) }
        );
        // Capped at pause_max.
        assert!(h.take_probe(3_400));
        assert_eq!(
            h.record(&down(), 3_500, &POLICY),
            Transition::Paused { until: 6_500 }
        );
        assert_eq!(
            h.record(&Signal::Ok, 7_000, &POLICY),
            Transition::CameUp { down_for: 6_900 }
        );
        assert_eq!(h.status(7_000), Status::Up);
        assert!(!h.take_probe(99_999));
    }

    #[test]
    fn throttling_pauses_at_once_and_down_past_grace_fails_over() {
        let mut h = Health::default();
        let t = Signal::Throttled("421 4.7.0 too many connections".into());
        assert_eq!(
            h.record(&t, 0, &POLICY),
            Transition::Paused { until: 1_000 }
        );
        assert_eq!(h.last_error(), Some("421 4.7.0 too many connections"));

        let mut h = Health::default();
        h.record(&down(), 0, &POLICY);
        assert_eq!(
            h.availability(2_000, &POLICY),
            Availability::Skip { until: None }
        );
        // The prober looks at it after one pause.
        assert!(h.take_probe(1_000));
        h.probe_later(1_500);
        assert!(h.take_probe(1_500));
        // A success in between resets the count of failures.
        let mut h = Health::default();
        h.record(&down(), 0, &POLICY);
        h.record(&down(), 1, &POLICY);
        h.record(&Signal::Ok, 2, &POLICY);
        assert_eq!(h.record(&down(), 3, &POLICY), Transition::WentDown);
    }
}
