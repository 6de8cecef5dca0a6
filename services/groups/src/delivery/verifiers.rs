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
//!
//! A commit also keeps what it wrote with the revision it was written at
//! ([`Written`]): the group's next commit on this node then needs no read
//! at all. Its transaction compares the meta's revision with the kept one,
//! and every write to a slot or a GroupInfo writes the meta too, so the
//! transaction succeeds only if nothing was written to the group since.
//! A commit it does not succeed for (the transaction lost, or the kept
//! state refused it) is tried again on what the store holds.

use std::sync::Mutex;

use lru::LruCache;
use spine_mls::verifier::Verifier;
use spine_runtime::store::KeyValue;

use crate::model::GroupMeta;

/// What this node's last commit to a group wrote, as stored: the meta (at
/// the revision the commit's transaction made) and the fan-out cursor.
pub(crate) struct Written {
    pub(crate) meta: GroupMeta,
    pub(crate) meta_kv: KeyValue,
    /// The fan-out cursor (last entry delivered, its revision) as this
    /// node last knew it; a cursor moved since fails only the transactions
    /// that compare it.
    pub(crate) fanout: (u64, i64),
}

struct Entry {
    stored: Vec<u8>,
    verifier: Verifier,
    written: Option<Written>,
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

    /// Group `g`'s verifier and what this node's last commit to it wrote,
    /// if both are kept: taken out, as by [`Verifiers::take`]. The caller
    /// must make its write conditional on the meta's kept revision.
    pub(crate) fn take_written(&self, g: &str) -> Option<(Verifier, Written)> {
        let mut inner = self.inner.lock().expect("verifier cache lock");
        let weight = inner.entries.peek(g).filter(|e| e.written.is_some())?.weight;
        inner.weight -= weight;
        inner.entries.pop(g).and_then(|e| Some((e.verifier, e.written?)))
    }

    /// Keeps `verifier` as the state of group `g`'s slot stored as
    /// `stored`, and what the write wrote beside it (a commit's); the
    /// stored bytes, the unpacked state's length (`state_len`) and the meta
    /// weigh it.
    pub(crate) fn keep(
        &self,
        g: &str,
        verifier: Verifier,
        (stored, state_len): (Vec<u8>, usize),
        written: Option<Written>,
    ) {
        let weight = stored.len() + state_len + written.as_ref().map_or(0, |w| 2 * w.meta_kv.value.len());
        if weight > self.budget / 4 {
            return;
        }
        let mut inner = self.inner.lock().expect("verifier cache lock");
        if let Some(old) = inner.entries.push(g.to_string(), Entry { stored, verifier, written, weight }) {
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
        cache.keep("g1", v, (vec![1, 2, 3], n), None);
        assert!(cache.take("g1", &[1, 2, 4]).is_none(), "other bytes: another state");
        assert!(cache.take("g2", &[1, 2, 3]).is_none(), "another group");
        assert!(cache.take("g1", &[1, 2, 3]).is_some());
        assert!(cache.take("g1", &[1, 2, 3]).is_none(), "taken out");
        assert_eq!(cache.weight(), (0, 0));

        for g in ["a", "b", "c", "d", "e"] {
            cache.keep(g, verifier().0, (vec![9, 9, 9], n), None);
        }
        assert_eq!(cache.weight(), (4, 4 * (n + 3)), "the oldest went past the budget");
        assert!(cache.take("a", &[9, 9, 9]).is_none());
        assert!(cache.take("e", &[9, 9, 9]).is_some());
        cache.forget("d");
        assert_eq!(cache.weight(), (2, 2 * (n + 3)));
        // A state heavier than a quarter of the budget is not kept at all.
        cache.keep("big", verifier().0, (vec![0; 2 * n], n), None);
        assert!(cache.take("big", &vec![0; 2 * n]).is_none());
        // Nothing kept with no budget.
        let none = Verifiers::new(0);
        none.keep("g", verifier().0, (vec![1], n), None);
        assert_eq!(none.weight(), (0, 0));
    }

    /// Only an entry a commit kept with what it wrote is taken without a
    /// read; taking it either way takes it out.
    #[test]
    fn only_what_a_commit_wrote_stands_without_a_read() {
        let (v, n) = verifier();
        let meta: GroupMeta = serde_json::from_value(serde_json::json!({
            "epoch": 3, "next_seq": 1, "roster": [], "allowed": ["t"], "created_at": 0, "ds_index": 0,
            "committer": null, "confirmed": false, "disputed_at": null,
        }))
        .unwrap();
        let kv = KeyValue {
            key: "/spine/g/g1/s/meta".into(),
            value: b"{}".to_vec(),
            create_revision: 1,
            mod_revision: 7,
            version: 2,
            lease: 0,
        };
        let written = || Written { meta: meta.clone(), meta_kv: kv.clone(), fanout: (0, 0) };
        let cache = Verifiers::new(1 << 20);
        cache.keep("g1", v, (vec![1], n), None);
        assert!(cache.take_written("g1").is_none(), "kept without what was written");
        assert!(cache.take("g1", &[1]).is_some(), "still there for a read that finds its bytes");
        cache.keep("g1", verifier().0, (vec![2], n), Some(written()));
        let (_, w) = cache.take_written("g1").expect("kept with what was written");
        assert_eq!((w.meta.epoch, w.meta_kv.mod_revision), (3, 7));
        assert!(cache.take("g1", &[2]).is_none(), "taken out");
        cache.keep("g1", verifier().0, (vec![2], n), Some(written()));
        assert!(cache.take("g1", &[2]).is_some());
        assert!(cache.take_written("g1").is_none(), "taken out");
        assert_eq!(cache.weight(), (0, 0));
    }
}
