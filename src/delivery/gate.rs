//! How many delivery workers may work at once: as many as the relays that
//! carry mail now allow connections in total (see `routing::concurrency`),
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
//! Passes are counted per relay, and only for relays that carry mail now
//! (a connection of theirs is lent to a worker): a route's fallback while
//! its primary takes the mail, a primary whose route gets no mail, a relay
//! no route reaches, count nothing. Their connections would never carry
//! the mail that comes, so workers holding their passes could only take
//! another relay's mail, find its connections busy and park it (that
//! relay would then look contended and stop streaming). A relay counts
//! from the moment mail takes one of its connections (a worker routed a
//! message to it: the route's primary, or a fallback once the relays
//! before it are skipped) until its last connection comes back, so the
//! passes follow wherever the routes send mail, with each relay's own
//! concurrency.
//!
//! Mail for a relay that carries none yet must still be found in the one
//! queue all workers share, behind mail for a busy relay (a slow relay
//! must hold up no other). So while a relay the routes would send mail to
//! now ([`Gate::steer`]: a route's first usable relay, by health) carries
//! none, one more pass is out, for all such relays together. A message
//! of a busy relay its worker takes on the way is handed to that relay's
//! busy connections, to go behind what they carry (`transport::pool`):
//! parked, it would make them stop taking more. A fallback while its
//! primary takes the mail is not such a relay: the primary alone then has
//! workers, exactly its concurrency. When no
//! relay carries mail, that one pass is all there is. When the count
//! drops, passes in use are not taken back; they are retired as they are
//! returned.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Gate {
    passes: Arc<Semaphore>,
    /// Passes to retire as they come back (a shrink while they were out).
    owed: AtomicUsize,
    /// Per relay: connections it allows now and connections lent now.
    relays: Vec<Share>,
    /// The passes there are (out or free); a resize holds it.
    size: Mutex<usize>,
}

#[derive(Default)]
struct Share {
    limit: AtomicUsize,
    lent: AtomicUsize,
    /// The routes would send mail to it now.
    routed: AtomicBool,
}

/// A worker's leave to take messages; given back when dropped.
pub struct Pass {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Gate {
    /// A gate for `relays` relays, none carrying mail yet: one pass.
    pub fn new(relays: usize) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            passes: Arc::new(Semaphore::new(0)),
            owed: AtomicUsize::new(0),
            relays: (0..relays).map(|_| Share::default()).collect(),
            size: Mutex::new(0),
        });
        gate.resize();
        gate
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

    /// Relay `relay` lent a connection for mail (`true`) or got one back:
    /// it counts while one is lent.
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

    /// The relays the routes would send mail to now (by index).
    pub fn steer(&self, routed: &[bool]) {
        let mut changed = false;
        for (i, s) in self.relays.iter().enumerate() {
            let r = routed.get(i).copied().unwrap_or(false);
            changed |= s.routed.swap(r, Ordering::SeqCst) != r;
        }
        if changed {
            self.resize();
        }
    }

    /// Whether the routes would send mail to relay `relay` now.
    #[cfg(test)]
    pub fn is_routed(&self, relay: usize) -> bool {
        self.relays
            .get(relay)
            .is_some_and(|s| s.routed.load(Ordering::SeqCst))
    }

    /// The passes there are (out or free).
    #[cfg(test)]
    pub fn size(&self) -> usize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether relay `relay` counts now: it carries mail.
    pub fn counts(&self, relay: usize) -> bool {
        self.relays
            .get(relay)
            .is_some_and(|s| s.lent.load(Ordering::SeqCst) > 0)
    }

    /// Brings the passes to what the relays that count allow together, and
    /// one to find mail for relays routed to that carry none (one when no
    /// relay counts). Reads every relay's numbers under the lock:
    /// whichever change came last, the last resize sees it.
    fn resize(&self) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        let carrying: usize = (0..self.relays.len())
            .filter(|&i| self.counts(i))
            .map(|i| self.relays[i].limit.load(Ordering::SeqCst))
            .sum();
        let unfound = (0..self.relays.len())
            .any(|i| self.relays[i].routed.load(Ordering::SeqCst) && !self.counts(i));
        let want = (carrying + usize::from(unfound)).max(1);
        if want > *size {
            self.grow(want - *size);
        } else {
            self.shrink(*size - want);
        }
        *size = want;
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
        gate.set_limit(0, 2);
        assert_eq!(gate.free(), 1, "nothing carries mail: one pass");
        gate.lent(0, true);
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
    fn only_relays_that_carry_mail_count() {
        // A primary (0), its fallback (1), and a relay no mail goes to (2).
        let gate = Gate::new(3);
        for (relay, limit) in [(0, 4), (1, 4), (2, 20)] {
            gate.set_limit(relay, limit);
        }
        gate.steer(&[true, false, false]);
        assert_eq!(gate.size(), 1, "no mail yet: one worker looks");
        // Mail takes a connection of the primary: its passes, no others.
        gate.lent(0, true);
        assert_eq!((gate.size(), gate.free()), (4, 4));
        // The fallback's concurrency changes: still nothing of it counts.
        gate.set_limit(1, 9);
        assert_eq!(gate.size(), 4);
        assert!(gate.counts(0) && !gate.counts(1) && !gate.counts(2));
        // The primary grows: so do the passes.
        gate.set_limit(0, 6);
        assert_eq!(gate.size(), 6);
        // Its mail goes to the fallback (the primary is down): both count
        // while both carry mail, then the fallback alone, with its own
        // concurrency.
        gate.steer(&[false, true, false]);
        gate.lent(1, true);
        gate.lent(1, true);
        assert_eq!(gate.size(), 15);
        gate.lent(0, false);
        assert_eq!(gate.size(), 9);
        gate.lent(1, false);
        assert_eq!(gate.size(), 9, "one is still lent");
        gate.lent(1, false);
        assert_eq!(gate.size(), 1, "no mail: one pass again");
        // Two routes' primaries (0 and 2), one carrying mail: one more pass
        // finds the other's, whatever its concurrency.
        gate.steer(&[true, false, true]);
        gate.lent(0, true);
        assert_eq!(gate.size(), 7);
        gate.lent(2, true);
        assert_eq!(gate.size(), 26, "both carry mail: no more looking");
        gate.lent(2, false);
        gate.lent(0, false);
        assert_eq!(gate.size(), 1);
    }
}
