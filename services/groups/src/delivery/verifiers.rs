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
//! A write through this node (a commit, a creation, a queued proposal, a
//! message) also keeps the group's meta as it stored it, and the revision
//! it stored it at ([`Written`]). The group's next commit on this node then
//! bets that nothing was written since and reads nothing: it is verified on
//! the kept state and written in one transaction conditional on that
//! revision. Every write to a slot or a GroupInfo writes the meta too, so
//! the bet holds exactly when the kept state is the stored one. A lost bet
//! (another node wrote to the group) costs the commit a second try on what
//! the store holds, and marks the group contended: its next commit here
//! reads the meta first (one small read), and bets again only once it finds
//! the meta where this node left it.

use std::sync::Mutex;

use lru::LruCache;
use spine_mls::verifier::Verifier;

use crate::model::GroupMeta;

/// What this node's last write to a group stored.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// The meta as it was stored, at `meta_revision`.
    pub(crate) meta: GroupMeta,
    pub(crate) meta_revision: i64,
    /// The fan-out cursor (last entry delivered, its revision) as this
    /// node last knew it; a cursor moved since fails only the transactions
    /// that compare it.
    pub(crate) fanout: (u64, i64),
    /// Another node wrote to the group since this node's write before: the
    /// next commit reads the meta before trusting the kept state.
    pub(crate) contended: bool,
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
        self.take_if(g, |e| e.stored == stored).map(|e| e.verifier)
    }

    /// Whether this node's last write to group `g` is kept, and if so
    /// whether the group is contended.
    pub(crate) fn contended(&self, g: &str) -> Option<bool> {
        self.inner.lock().expect("verifier cache lock").entries.peek(g)?.written.as_ref().map(|w| w.contended)
    }

    /// Group `g`'s verifier and what this node's last write to it stored,
    /// if that write left the meta at `meta_revision` (or at any revision:
    /// `None`, a bet the caller's write must be conditional on): taken out,
    /// as by [`Verifiers::take`].
    pub(crate) fn take_written(&self, g: &str, meta_revision: Option<i64>) -> Option<(Verifier, Written)> {
        self.take_if(g, |e| e.written.as_ref().is_some_and(|w| meta_revision.is_none_or(|r| r == w.meta_revision)))
            .and_then(|e| Some((e.verifier, e.written?)))
    }

    /// Group `g`'s entry, taken out if `wanted`.
    fn take_if(&self, g: &str, wanted: impl FnOnce(&Entry) -> bool) -> Option<Entry> {
        let mut inner = self.inner.lock().expect("verifier cache lock");
        let weight = inner.entries.peek(g).filter(|e| wanted(e))?.weight;
        inner.weight -= weight;
        inner.entries.pop(g)
    }

    /// A message appended through this node moved group `g`'s meta from
    /// `from_revision` to `meta` at `to_revision`, leaving the slot as it
    /// was: what is kept of the group follows, if it was at `from_revision`.
    pub(crate) fn advance(&self, g: &str, from_revision: i64, meta: GroupMeta, to_revision: i64) {
        let mut inner = self.inner.lock().expect("verifier cache lock");
        if let Some(w) =
            inner.entries.peek_mut(g).and_then(|e| e.written.as_mut()).filter(|w| w.meta_revision == from_revision)
        {
            w.meta = meta;
            w.meta_revision = to_revision;
        }
    }

    /// Keeps `verifier` as the state of group `g`'s slot stored as
    /// `stored`, and what the write stored beside it; the stored bytes, the
    /// unpacked state's length (`state_len`) and the roster weigh it.
    pub(crate) fn keep(
        &self,
        g: &str,
        verifier: Verifier,
        (stored, state_len): (Vec<u8>, usize),
        written: Option<Written>,
    ) {
        let weight = stored.len() + state_len + written.as_ref().map_or(0, |w| 256 + 160 * w.meta.roster.len());
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
        self.take_if(g, |_| true);
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

    /// An entry kept with what a write stored is taken by that revision,
    /// or by a bet on any; a message moves it along only from the revision
    /// it is at; taking it either way takes it out.
    #[test]
    fn what_a_write_stored_stands_for_its_revision() {
        let (v, n) = verifier();
        let meta: GroupMeta = serde_json::from_value(serde_json::json!({
            "epoch": 3, "next_seq": 1, "roster": [], "allowed": ["t"], "created_at": 0, "ds_index": 0,
        }))
        .unwrap();
        let written = |contended| Some(Written { meta: meta.clone(), meta_revision: 7, fanout: (2, 5), contended });
        let cache = Verifiers::new(1 << 20);
        cache.keep("g1", v, (vec![1], n), None);
        assert_eq!(cache.contended("g1"), None);
        assert!(cache.take_written("g1", None).is_none(), "kept without what was written");
        assert!(cache.take("g1", &[1]).is_some(), "still there for a read that finds its bytes");
        cache.keep("g1", verifier().0, (vec![2], n), written(true));
        assert_eq!((cache.contended("g1"), cache.contended("g2")), (Some(true), None));
        assert!(cache.take_written("g1", Some(8)).is_none(), "the meta moved on");
        assert!(cache.take_written("g2", Some(7)).is_none(), "another group");
        let (_, w) = cache.take_written("g1", Some(7)).unwrap();
        assert_eq!((w.meta_revision, w.fanout, w.contended), (7, (2, 5), true));
        assert!(cache.take("g1", &[2]).is_none(), "taken out");
        // A message moves it along, from its own revision only.
        cache.keep("g1", verifier().0, (vec![2], n), written(false));
        let mut later = meta.clone();
        later.next_seq = 2;
        cache.advance("g1", 6, later.clone(), 9);
        assert!(cache.take_written("g1", Some(9)).is_none(), "moved from a revision it was not at");
        cache.advance("g1", 7, later, 9);
        let (_, w) = cache.take_written("g1", None).unwrap();
        assert_eq!((w.meta_revision, w.meta.next_seq), (9, 2));
        cache.keep("g1", verifier().0, (vec![2], n), written(false));
        assert!(cache.take("g1", &[2]).is_some(), "a read that finds its bytes takes it too");
        assert!(cache.take_written("g1", None).is_none(), "taken out");
        assert_eq!(cache.weight(), (0, 0));
    }
}
