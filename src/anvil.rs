//! What each client has open at once, by client address (SMTP sessions)
//! or by local user (reports on `pickup.sock`), as Postfix's anvil counts
//! them: a slot is taken per connection and given back when it is
//! dropped, so that no one client can take every place.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Open connections per client.
pub struct Anvil<K> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Anvil<K> {
    fn default() -> Self {
        Anvil {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

/// One connection of `key`; gives its place back when dropped.
pub struct Slot<K: Eq + Hash + Copy> {
    anvil: Arc<Anvil<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> Anvil<K> {
    /// A place for one more connection of `key`, if it holds fewer than
    /// `max` and all clients together fewer than `total`.
    pub fn take(self: &Arc<Self>, key: K, max: usize, total: usize) -> Option<Slot<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.values().sum::<usize>() >= total {
            return None;
        }
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            anvil: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.anvil.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
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
}
