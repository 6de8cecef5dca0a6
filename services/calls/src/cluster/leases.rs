//! The node's two leases: its registration (short, renewed every third of
//! its TTL) and its calls' state lease (three TTLs), and their renewal.

use super::*;

impl Cluster {
    pub(crate) fn reg_lease(&self) -> LeaseId {
        *self.reg_lease.lock().expect("lease lock")
    }

    pub fn state_lease(&self) -> LeaseId {
        *self.state_lease.lock().expect("lease lock")
    }

    /// Renews both leases; re-creates a lost one; on drain hands the calls
    /// over, ends the streams and leaves.
    pub(crate) async fn keep_alive(weak: Weak<Cluster>, rt: Arc<Runtime>) {
        let every = weak.upgrade().map_or(Duration::from_secs(1), |c| c.ttl / 5);
        loop {
            tokio::select! {
                _ = rt.drain.cancelled() => {
                    if let Some(c) = weak.upgrade() {
                        c.leave().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
            let Some(c) = weak.upgrade() else { return };
            for (state, lease) in [(false, c.reg_lease()), (true, c.state_lease())] {
                match rt.store.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let ttl = if state { c.ttl * 3 } else { c.ttl };
                        match rt.store.grant_lease(ttl).await {
                            Ok(l) => {
                                let slot = if state { &c.state_lease } else { &c.reg_lease };
                                *slot.lock().expect("lease lock") = l;
                                tracing::warn!(state, "calls node lease was lost; registered again");
                                if let Err(e) = c.register().await {
                                    tracing::warn!(error = %e, "calls node re-registration failed");
                                }
                                if !state && let Err(e) = c.register_sessions().await {
                                    tracing::warn!(error = %e, "sessions not registered again");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "calls node lease grant failed"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "calls node lease keep-alive failed"),
                }
            }
        }
    }
}
