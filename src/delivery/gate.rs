//! How many delivery workers may work at once: as many as the relays'
//! concurrency allows in total (see `routing::concurrency`), which changes
//! as relays answer.
//!
//! relayq starts a worker per connection it may ever open
//! (`max_connections` summed over the relays), but a relay that allows 3
//! connections needs only 3 of them busy. More would take messages only to
//! find every connection busy and park them (`transport::pool`), and a
//! worker that keeps a connection sends each next message behind the
//! previous one only while no message is parked (`delivery::lookahead`):
//! every extra worker would cost a round trip per message. So a worker
//! takes a message only with a [`Pass`], and there are as many passes as
//! connections allowed. When a relay's concurrency drops, passes in use
//! are not taken back; they are retired as they are returned.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Gate {
    passes: Arc<Semaphore>,
    /// Passes to retire as they come back (a shrink while they were out).
    owed: AtomicUsize,
}

/// A worker's leave to take messages; given back when dropped.
pub struct Pass {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Gate {
    pub fn new(passes: usize) -> Arc<Gate> {
        Arc::new(Gate {
            passes: Arc::new(Semaphore::new(passes)),
            owed: AtomicUsize::new(0),
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

    /// `n` more passes (fewer retired first, if some are owed).
    pub fn grow(&self, n: usize) {
        let paid = take_up_to(&self.owed, n);
        self.passes.add_permits(n - paid);
    }

    /// `n` fewer passes: free ones at once, the rest as they come back.
    pub fn shrink(&self, n: usize) {
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
        let gate = Gate::new(2);
        let a = gate.enter().await;
        let b = gate.enter().await;
        assert_eq!(gate.free(), 0);
        gate.grow(1);
        let c = gate.enter().await;
        // Down to one while three are out: two are retired as they return.
        gate.shrink(2);
        drop(a);
        drop(b);
        assert_eq!(gate.free(), 0, "both retired");
        drop(c);
        assert_eq!(gate.free(), 1);
        // A grow pays what is owed first.
        let d = gate.enter().await;
        gate.shrink(1);
        gate.grow(2);
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
}
