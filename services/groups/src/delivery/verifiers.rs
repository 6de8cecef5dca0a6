//! Verifiers kept between requests on this node, so a group's next commit
//! here need not restore its public state from the store (openmls reads it
//! from JSON: most of the delivery service's own work on a commit that is
//! not signature checks, and all of it for a large group's).
//!
//! An entry is the verifier together with the exact slot bytes it was
//! restored from or written as. It is used only when the slot read from the
//! store now holds those same bytes, so it can never stand for another
//! state: another node's commit, a voided epoch, or a restored store all
//! change the slot and the entry is simply not used. A request takes the
//! entry out (it changes the verifier), and a write that succeeds puts the
//! verifier back beside the bytes it wrote. Entries go oldest-used first
//! past the configured budget (`groups.verifier_cache_mib`).

use std::sync::Mutex;

use lru::LruCache;
use spine_mls::verifier::Verifier;

struct Entry {
    stored: Vec<u8>,
    verifier: Verifier,
    weight: usize,
}

pub(crate) struct Verifiers {
    inner: Mutex<Inner>,
    budget: usize,
}

struct Inner {
    entries: LruCache<String, Entry>,
    weight: usize,
}

impl Verifiers {
    /// A cache holding at most about `budget` bytes of group state (0: none).
    pub(crate) fn new(budget: usize) -> Self {
        Self { inner: Mutex::new(Inner { entries: LruCache::unbounded(), weight: 0 }), budget }
    }

    /// Group `g`'s verifier, if one is kept for the slot stored as `stored`.
    /// It is taken out: the caller changes it, and puts it back with
    /// [`Verifiers::keep`] once what it wrote is stored.
    pub(crate) fn take(&self, g: &str, stored: &[u8]) -> Option<Verifier> {
        let mut inner = self.inner.lock().expect("verifier cache lock");
        let weight = inner.entries.peek(g).filter(|e| e.stored == stored)?.weight;
        inner.weight -= weight;
        inner.entries.pop(g).map(|e| e.verifier)
    }

    /// Keeps `verifier` as the state of group `g`'s slot stored as
    /// `stored`; `state_len` (the unpacked state's length) weighs it.
    pub(crate) fn keep(&self, g: &str, verifier: Verifier, (stored, state_len): (Vec<u8>, usize)) {
        let weight = stored.len() + state_len;
        if weight > self.budget / 4 {
            return;
        }
        let mut inner = self.inner.lock().expect("verifier cache lock");
        if let Some(old) = inner.entries.push(g.to_string(), Entry { stored, verifier, weight }) {
            inner.weight -= old.1.weight;
        }
        inner.weight += weight;
        while inner.weight > self.budget {
            match inner.entries.pop_lru() {
                Some((_, e)) => inner.weight -= e.weight,
                None => break,
            }
        }
    }

    /// Forgets group `g` (deleted).
    pub(crate) fn forget(&self, g: &str) {
        let mut inner = self.inner.lock().expect("verifier cache lock");
        if let Some(e) = inner.entries.pop(g) {
            inner.weight -= e.weight;
        }
    }

    #[cfg(test)]
    fn weight(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("verifier cache lock");
        (inner.entries.len(), inner.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (Verifier, usize) {
        let ds = spine_mls::verifier::DeliveryService::generate().unwrap();
        let c = spine_mls::client::Client::new(spine_mls::DeviceName::new("t", "a", "d")).unwrap();
        let g = c.create_group(b"cache", &ds.public_key()).unwrap();
        let info = c.group_info(&g).unwrap();
        let v = Verifier::from_group_info(&info).unwrap();
        let n = v.to_bytes().len();
        (v, n)
    }

    /// Only the exact bytes an entry was kept with find it; finding it
    /// takes it out; the budget evicts the least recently used.
    #[test]
    fn entries_match_their_bytes_only_and_stay_in_budget() {
        let (v, n) = verifier();
        let cache = Verifiers::new(4 * (n + 3) + 8);
        cache.keep("g1", v, (vec![1, 2, 3], n));
        assert!(cache.take("g1", &[1, 2, 4]).is_none(), "other bytes: another state");
        assert!(cache.take("g2", &[1, 2, 3]).is_none(), "another group");
        assert!(cache.take("g1", &[1, 2, 3]).is_some());
        assert!(cache.take("g1", &[1, 2, 3]).is_none(), "taken out");
        assert_eq!(cache.weight(), (0, 0));

        for g in ["a", "b", "c", "d", "e"] {
            cache.keep(g, verifier().0, (vec![9, 9, 9], n));
        }
        assert_eq!(cache.weight(), (4, 4 * (n + 3)), "the oldest went past the budget");
        assert!(cache.take("a", &[9, 9, 9]).is_none());
        assert!(cache.take("e", &[9, 9, 9]).is_some());
        cache.forget("d");
        assert_eq!(cache.weight(), (2, 2 * (n + 3)));
        // A state heavier than a quarter of the budget is not kept at all.
        cache.keep("big", verifier().0, (vec![0; 2 * n], n));
        assert!(cache.take("big", &vec![0; 2 * n]).is_none());
        // Nothing kept with no budget.
        let none = Verifiers::new(0);
        none.keep("g", verifier().0, (vec![1], n));
        assert_eq!(none.weight(), (0, 0));
    }
}
