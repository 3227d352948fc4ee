//! What each client has open at once, by client address (SMTP sessions)
//! or by local user (reports on `pickup.sock`), as Postfix's anvil counts
//! them: a slot is taken per connection and given back when it is
//! dropped, so that no one client can take every place.
//!
//! This is the one connection counter: the SMTP session table
//! ([`crate::smtp::sessions`]) takes a slot per session here for
//! `max_connections_per_ip` and asks it which address floods, and the
//! pickup ([`crate::pickup`]) bounds the reports it reads per user. What a
//! client has *failed* (wrong passwords) is counted apart, by
//! [`crate::smtp::auth_budget`].
//!
//! # Security
//! Keys come from outside (remote addresses, local uids), but a key is
//! only kept while it holds a slot, so the table is bounded by the
//! connections its callers admit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open connections per client.
pub struct Anvil<K> {
    counts: Mutex<Counts<K>>,
}

struct Counts<K> {
    per_client: HashMap<K, usize>,
    total: usize,
}

impl<K> Default for Anvil<K> {
    fn default() -> Self {
        Anvil {
            counts: Mutex::new(Counts {
                per_client: HashMap::new(),
                total: 0,
            }),
        }
    }
}

/// One connection of `key`; gives its place back when dropped.
pub struct Slot<K: Eq + Hash + Copy> {
    anvil: Arc<Anvil<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> Anvil<K> {
    fn lock(&self) -> MutexGuard<'_, Counts<K>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more connection of `key`, if it holds fewer than
    /// `max` and all clients together fewer than `total`.
    pub fn take(self: &Arc<Self>, key: K, max: usize, total: usize) -> Option<Slot<K>> {
        let mut counts = self.lock();
        if counts.total >= total {
            return None;
        }
        let n = counts.per_client.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        counts.total += 1;
        Some(Slot {
            anvil: self.clone(),
            key,
        })
    }

    /// The client holding the most connections, if it holds more than
    /// `share`: the one to make room first when every place is taken.
    pub fn busiest(&self, share: usize) -> Option<K> {
        self.lock()
            .per_client
            .iter()
            .filter(|(_, n)| **n > share)
            .max_by_key(|(_, n)| **n)
            .map(|(k, _)| *k)
    }
}

impl<K: Eq + Hash + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.anvil.lock();
        if let Some(n) = counts.per_client.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.key);
            }
            counts.total -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_client_and_in_all() {
        let anvil = Arc::new(Anvil::default());
        let a1 = anvil.take(1, 2, 3).unwrap();
        let _a2 = anvil.take(1, 2, 3).unwrap();
        assert!(anvil.take(1, 2, 3).is_none(), "client 1 is at its limit");
        let b = anvil.take(2, 2, 3).unwrap();
        assert!(
            anvil.take(3, 2, 3).is_none(),
            "all clients are at the limit"
        );
        drop(b);
        drop(a1);
        assert!(anvil.take(1, 2, 3).is_some(), "given back when dropped");
        assert!(anvil.take(3, 2, 3).is_some());
    }

    #[test]
    fn the_busiest_client_beyond_its_share() {
        let anvil = Arc::new(Anvil::default());
        let _a: Vec<_> = (0..3).map(|_| anvil.take(1, 9, 9).unwrap()).collect();
        let _b: Vec<_> = (0..2).map(|_| anvil.take(2, 9, 9).unwrap()).collect();
        assert_eq!(anvil.busiest(1), Some(1));
        assert_eq!(anvil.busiest(3), None, "nobody holds more than 3");
    }
}
