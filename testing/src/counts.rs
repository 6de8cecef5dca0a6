//! Round trips to a store, counted by kind ([`Counts`]): what a
//! [`crate::StoreTap`] counts of every request through it, so a test or a
//! benchmark can say how many round trips an operation makes and how long
//! it waited on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use spine_runtime::store::{Op, Txn};

/// Round trips by kind. A *round* is a round trip that started while no
/// other was in flight: requests sent together (a parallel read of
/// several keys) are one round of waiting.
#[derive(Debug, Default)]
pub struct Counts {
    pub reads: AtomicU64,
    pub txns: AtomicU64,
    pub leases: AtomicU64,
    pub read_rounds: AtomicU64,
    pub txn_rounds: AtomicU64,
    /// Bytes of keys and values written by transactions.
    pub written: AtomicU64,
    /// Round trips in flight, and since when one has been.
    busy: std::sync::Mutex<Busy>,
}

#[derive(Debug, Default)]
struct Busy {
    in_flight: u64,
    since: Option<(std::time::Instant, bool)>,
    /// Wall time with at least one round trip in flight: rounds that began
    /// with a read, and with a transaction.
    reading: Duration,
    writing: Duration,
}

/// Counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub reads: u64,
    pub txns: u64,
    pub read_rounds: u64,
    pub txn_rounds: u64,
    pub written: u64,
    /// Wall time with at least one round trip in flight, in rounds that
    /// began with a read.
    pub reading: Duration,
    /// The same, in rounds that began with a transaction.
    pub writing: Duration,
}

impl std::ops::Add for Snapshot {
    type Output = Snapshot;
    fn add(self, o: Snapshot) -> Snapshot {
        Snapshot {
            reads: self.reads + o.reads,
            txns: self.txns + o.txns,
            read_rounds: self.read_rounds + o.read_rounds,
            txn_rounds: self.txn_rounds + o.txn_rounds,
            written: self.written + o.written,
            reading: self.reading + o.reading,
            writing: self.writing + o.writing,
        }
    }
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, o: Snapshot) -> Snapshot {
        Snapshot {
            reads: self.reads - o.reads,
            txns: self.txns - o.txns,
            read_rounds: self.read_rounds - o.read_rounds,
            txn_rounds: self.txn_rounds - o.txn_rounds,
            written: self.written - o.written,
            reading: self.reading - o.reading,
            writing: self.writing - o.writing,
        }
    }
}

impl Counts {
    pub fn snapshot(&self) -> Snapshot {
        let (reading, writing) = {
            let b = self.lock();
            (b.reading, b.writing)
        };
        Snapshot {
            reads: self.reads.load(Ordering::Relaxed),
            txns: self.txns.load(Ordering::Relaxed),
            read_rounds: self.read_rounds.load(Ordering::Relaxed),
            txn_rounds: self.txn_rounds.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            reading,
            writing,
        }
    }

    pub(crate) fn start(self: &Arc<Self>, txn: bool) -> InFlight {
        let (n, rounds) = if txn { (&self.txns, &self.txn_rounds) } else { (&self.reads, &self.read_rounds) };
        n.fetch_add(1, Ordering::Relaxed);
        let mut b = self.lock();
        if b.in_flight == 0 {
            rounds.fetch_add(1, Ordering::Relaxed);
            b.since = Some((std::time::Instant::now(), txn));
        }
        b.in_flight += 1;
        drop(b);
        InFlight(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A round trip in flight; dropped when it ends.
pub(crate) struct InFlight(Arc<Counts>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut b = self.0.lock();
        b.in_flight -= 1;
        if b.in_flight == 0
            && let Some((t, txn)) = b.since.take()
        {
            *(if txn { &mut b.writing } else { &mut b.reading }) += t.elapsed();
        }
    }
}

impl Counts {
    /// Counts the bytes of keys and values `txn` writes if it succeeds.
    pub(crate) fn wrote(&self, txn: &Txn) {
        let written: usize = txn
            .success
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => key.len() + value.len(),
                Op::Delete(k) | Op::DeletePrefix(k) => k.len(),
            })
            .sum();
        self.written.fetch_add(written as u64, Ordering::Relaxed);
    }

    pub(crate) fn lease(&self) {
        self.leases.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spine_runtime::store::{EmbeddedStore, Store};

    #[test]
    fn requests_in_flight_together_are_one_round() {
        let c = Arc::new(Counts::default());
        let (a, b) = (c.start(false), c.start(false));
        drop(a);
        let d = c.start(false);
        drop((b, d));
        let t = c.start(true);
        drop(t);
        let r = c.start(false);
        drop(r);
        let s = c.snapshot();
        assert_eq!((s.reads, s.read_rounds, s.txns, s.txn_rounds), (4, 2, 1, 1), "{s:?}");
        // Waiting is timed by the kind of request that opened the round.
        let before = c.snapshot();
        let t = c.start(true);
        let r = c.start(false);
        std::thread::sleep(Duration::from_millis(20));
        drop((t, r));
        let d = c.snapshot() - before;
        assert!(d.writing >= Duration::from_millis(20) && d.reading.is_zero(), "{d:?}");
        assert_eq!(s - s, Snapshot::default());
    }

    #[tokio::test]
    async fn every_request_through_a_tap_is_counted() {
        let c = crate::StoreTap::new(Arc::new(EmbeddedStore::in_memory()));
        #[allow(clippy::disallowed_methods)]
        let k = spine_runtime::store::Key::unchecked("/t/a".to_string());
        c.put(&k, b"1".to_vec()).await.unwrap();
        c.get("/t/a").await.unwrap();
        c.get_many(&["/t/a", "/t/b"]).await.unwrap();
        c.range("/t/", None, 0).await.unwrap();
        c.count("/t/").await.unwrap();
        let s = c.counts().snapshot();
        assert_eq!((s.reads, s.txns, s.written), (4, 1, 5));
    }
}
