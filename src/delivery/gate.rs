//! How many delivery workers may work at once: as many as the relays that
//! get mail now allow connections in total (see `routing::concurrency`),
//! which changes as relays answer and as mail moves between them.
//!
//! relayq starts a worker per connection it may ever open
//! (`max_connections` summed over the relays), but a relay that allows 3
//! connections needs only 3 of them busy. More would take messages only to
//! find every connection busy and park them (`transport::pool`), and a
//! worker that keeps a connection sends each next message behind the
//! previous one only while no message is parked (`delivery::lookahead`):
//! every extra worker would cost a round trip per message. So a worker
//! takes a message only with a [`Pass`], and there are as many passes as
//! connections allowed.
//!
//! Passes are counted per relay, and only for relays mail goes to: a
//! route's fallback while its primary takes the mail, or a relay no route
//! reaches, counts nothing. Its connections would never carry that mail,
//! so workers holding its passes could only take the primary's mail and
//! park it (the primary would then look contended and stop streaming).
//! The router says which relays its routes send mail to now ([`Gate::steer`],
//! from their health); a relay that carries mail anyway (quota failover, a
//! last resort) counts while it has a connection lent. When the count
//! drops, passes in use are not taken back; they are retired as they are
//! returned.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Gate {
    passes: Arc<Semaphore>,
    /// Passes to retire as they come back (a shrink while they were out).
    owed: AtomicUsize,
    /// Per relay: connections it allows now and connections lent now.
    relays: Vec<Share>,
    /// Which relays the routes send mail to now, and the passes that
    /// makes (with the relays carrying mail anyway).
    steer: Mutex<Steer>,
}

#[derive(Default)]
struct Share {
    limit: AtomicUsize,
    lent: AtomicUsize,
}

struct Steer {
    routed: Vec<bool>,
    size: usize,
}

/// A worker's leave to take messages; given back when dropped.
pub struct Pass {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Gate {
    /// A gate for `relays` relays, each allowing nothing and getting no
    /// mail until told ([`Gate::set_limit`], [`Gate::steer`]).
    pub fn new(relays: usize) -> Arc<Gate> {
        Arc::new(Gate {
            passes: Arc::new(Semaphore::new(0)),
            owed: AtomicUsize::new(0),
            relays: (0..relays).map(|_| Share::default()).collect(),
            steer: Mutex::new(Steer {
                routed: vec![false; relays],
                size: 0,
            }),
        })
    }

    /// Waits for a pass.
    pub async fn enter(self: &Arc<Self>) -> Pass {
        let permit = self.passes.clone().acquire_owned().await.ok();
        Pass {
            permit,
            gate: self.clone(),
        }
    }

    /// Relay `relay` allows `limit` connections now. Called under the lock
    /// that orders the relay's changes, so the last call has the last word.
    pub fn set_limit(&self, relay: usize, limit: usize) {
        if let Some(s) = self.relays.get(relay) {
            s.limit.store(limit, Ordering::SeqCst);
        }
        self.resize();
    }

    /// The relays the routes send mail to now (by index; others get none).
    pub fn steer(&self, routed: &[bool]) {
        {
            let mut st = self.state();
            if st.routed == routed {
                return;
            }
            st.routed = routed.to_vec();
        }
        self.resize();
    }

    /// Relay `relay` lent a connection (`true`) or got one back: a relay
    /// the routes don't send mail to counts while it carries some.
    pub fn lent(&self, relay: usize, lent: bool) {
        let Some(s) = self.relays.get(relay) else {
            return;
        };
        if lent {
            s.lent.fetch_add(1, Ordering::SeqCst);
        } else {
            take_up_to(&s.lent, 1);
        }
        self.resize();
    }

    /// The passes the relays that get mail allow together.
    pub fn size(&self) -> usize {
        self.state().size
    }

    /// Whether relay `relay` counts now (mail goes to it, or it carries some).
    pub fn counts(&self, relay: usize) -> bool {
        let st = self.state();
        self.counted(&st, relay)
    }

    fn counted(&self, st: &Steer, relay: usize) -> bool {
        st.routed.get(relay).copied().unwrap_or(false)
            || self
                .relays
                .get(relay)
                .is_some_and(|s| s.lent.load(Ordering::SeqCst) > 0)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Steer> {
        self.steer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the passes to what the relays that count allow together.
    /// Reads every relay's numbers under the lock: whichever change came
    /// last, the last resize sees it.
    fn resize(&self) {
        let mut st = self.state();
        let want: usize = (0..self.relays.len())
            .filter(|&i| self.counted(&st, i))
            .map(|i| self.relays[i].limit.load(Ordering::SeqCst))
            .sum();
        if want > st.size {
            self.grow(want - st.size);
        } else {
            self.shrink(st.size - want);
        }
        st.size = want;
    }

    /// `n` more passes (fewer retired first, if some are owed).
    fn grow(&self, n: usize) {
        let paid = take_up_to(&self.owed, n);
        self.passes.add_permits(n - paid);
    }

    /// `n` fewer passes: free ones at once, the rest as they come back.
    fn shrink(&self, n: usize) {
        let now = self.passes.forget_permits(n);
        self.owed.fetch_add(n - now, Ordering::SeqCst);
    }

    /// Passes free now (for tests and status).
    pub fn free(&self) -> usize {
        self.passes.available_permits()
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take()
            && take_up_to(&self.gate.owed, 1) == 1
        {
            permit.forget();
        }
    }
}

/// Takes up to `n` from `counter`; returns how many.
fn take_up_to(counter: &AtomicUsize, n: usize) -> usize {
    let mut taken = 0;
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |have| {
        taken = have.min(n);
        Some(have - taken)
    });
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_follow_the_size_and_a_shrink_retires_passes_in_use() {
        let gate = Gate::new(1);
        gate.steer(&[true]);
        gate.set_limit(0, 2);
        let a = gate.enter().await;
        let b = gate.enter().await;
        assert_eq!(gate.free(), 0);
        gate.set_limit(0, 3);
        let c = gate.enter().await;
        // Down to one while three are out: two are retired as they return.
        gate.set_limit(0, 1);
        drop(a);
        drop(b);
        assert_eq!(gate.free(), 0, "both retired");
        drop(c);
        assert_eq!(gate.free(), 1);
        // A grow pays what is owed first.
        let d = gate.enter().await;
        gate.set_limit(0, 0);
        gate.set_limit(0, 2);
        assert_eq!(gate.free(), 1);
        drop(d);
        assert_eq!(gate.free(), 2);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), async {
            let _x = gate.enter().await;
            let _y = gate.enter().await;
            gate.enter().await
        })
        .await;
        assert!(waiting.is_err(), "a third pass waits");
    }

    #[test]
    fn only_relays_that_get_mail_count() {
        // A primary (0), its fallback (1), and a relay no route reaches (2).
        let gate = Gate::new(3);
        for (relay, limit) in [(0, 4), (1, 4), (2, 20)] {
            gate.set_limit(relay, limit);
        }
        assert_eq!(gate.size(), 0, "nothing is routed yet");
        gate.steer(&[true, false, false]);
        assert_eq!((gate.size(), gate.free()), (4, 4), "the primary's only");
        // The fallback's concurrency changes: still nothing of it counts.
        gate.set_limit(1, 9);
        assert_eq!(gate.size(), 4);
        assert!(!gate.counts(1) && !gate.counts(2));
        // The primary grows: so do the passes.
        gate.set_limit(0, 6);
        assert_eq!((gate.size(), gate.free()), (6, 6));
        // The primary is down for good: its mail goes to the fallback,
        // whose own concurrency now counts, and the primary's no longer.
        gate.steer(&[false, true, false]);
        assert_eq!((gate.size(), gate.free()), (9, 9));
        // A relay carrying mail anyway (quota failover, a last resort)
        // counts while a connection of it is lent, and no longer after.
        gate.lent(0, true);
        gate.lent(0, true);
        assert!(gate.counts(0));
        assert_eq!(gate.size(), 15);
        gate.lent(0, false);
        assert_eq!(gate.size(), 15, "one is still lent");
        gate.lent(0, false);
        assert_eq!(gate.size(), 9);
        // Routed by two routes at once (a fallback that is another
        // route's primary) counts once.
        gate.steer(&[true, true, false]);
        assert_eq!(gate.size(), 15);
    }
}
