//! The cell model of docs/scaling.md, run on the etcd limits measured in
//! the same run: how many devices one etcd cluster (a *cell*) carries, how
//! many cells a population needs, and, by simulating calls between people
//! of four regions, what share of calls crosses cells and how evenly the
//! cells are loaded.
//!
//! The workload per device is an assumption, stated in [`Workload`] and in
//! docs/scaling.md; the store operations per action are Spine's own
//! (counted by the `calls` benchmark and docs/architecture.md). Presence
//! is not here: it lives in its owner node's memory, not in etcd.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::etcd::Limits;
use crate::{Row, Section};

/// One device's day, at the busiest hour's rate.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Workload {
    /// Signalling sessions opened a day (each reconnect): one leased put,
    /// and one delete when it closes.
    pub sessions_per_day: f64,
    /// One-to-one calls a day: create, answer, hang-up and delete.
    pub calls_per_day: f64,
    /// MLS commits a day (one transaction each).
    pub commits_per_day: f64,
    /// Busiest hour over the day's mean.
    pub peak_factor: f64,
    /// Records stored per device: device, account, settings, session, key
    /// packages (20) and mailbox entries in flight (about 7).
    pub records_per_device: f64,
}

pub const WORKLOAD: Workload = Workload {
    sessions_per_day: 24.0,
    calls_per_day: 3.0,
    commits_per_day: 4.0,
    peak_factor: 3.0,
    records_per_device: 30.0,
};

/// Store writes per action (Spine's own).
const WRITES_PER_SESSION: f64 = 2.0;
const WRITES_PER_CALL: f64 = 4.0;
const WRITES_PER_COMMIT: f64 = 1.0;
/// Devices one node holds (the idle-device aim: a million per 24 GiB node).
const DEVICES_PER_NODE: f64 = 1_000_000.0;
/// Share of each measured limit a cell may use at the busiest hour.
const HEADROOM: f64 = 0.5;
/// etcd's largest advised database.
const DB_QUOTA: f64 = 8.0 * 1024.0 * 1024.0 * 1024.0;

/// The most devices one cell carries, and which limit binds first.
pub fn cell_size(l: &Limits, w: &Workload) -> (f64, &'static str, [(&'static str, f64); 3]) {
    let per_device_writes = (w.sessions_per_day * WRITES_PER_SESSION
        + w.calls_per_day * WRITES_PER_CALL
        + w.commits_per_day * WRITES_PER_COMMIT)
        * w.peak_factor
        / 86_400.0;
    let by_writes = l.writes_per_s * HEADROOM / per_device_writes;
    // Every node of a cell watches its calls records: each call write is
    // delivered once per node. Deliveries = call writes x nodes, and nodes
    // grow with devices, so this bound is quadratic.
    let call_writes_per_device = w.calls_per_day * WRITES_PER_CALL * w.peak_factor / 86_400.0;
    let by_watch = (l.deliveries_per_s * HEADROOM * DEVICES_PER_NODE / call_writes_per_device).sqrt();
    let by_db = DB_QUOTA * HEADROOM / (w.records_per_device * l.db_bytes_per_key.max(1.0));
    let all = [("writes", by_writes), ("watch fan-out", by_watch), ("database size", by_db)];
    let (name, n) = all.iter().copied().fold(("", f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    (n, name, all)
}

/// Result of simulating calls across regional cells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Simulated {
    pub cells: usize,
    /// Share of calls whose parties are homed in different cells.
    pub cross_cell: f64,
    /// Busiest cell's writes over the mean cell's.
    pub imbalance: f64,
}

/// People of four regions (shares 40/30/20/10 %), each homed in one cell
/// of their region (by a hash of the account: cells of `cell_devices`);
/// `calls` calls, the callee in the caller's region with `locality`. A
/// call's record lives in the caller's cell; a callee in another cell
/// costs that cell one write (its device's ring pointer) and the call one
/// cross-cell hop.
pub fn simulate(population: f64, cell_devices: f64, locality: f64, calls: usize, seed: u64) -> Simulated {
    let shares = [0.4, 0.3, 0.2, 0.1];
    let cells_per_region: Vec<usize> =
        shares.iter().map(|s| ((population * s) / cell_devices).ceil().max(1.0) as usize).collect();
    let offsets: Vec<usize> = cells_per_region
        .iter()
        .scan(0, |acc, &n| {
            let o = *acc;
            *acc += n;
            Some(o)
        })
        .collect();
    let total_cells: usize = cells_per_region.iter().sum();
    let mut writes = vec![0.0f64; total_cells];
    let mut rng = StdRng::seed_from_u64(seed);
    let pick_region = |rng: &mut StdRng| {
        let mut x: f64 = rng.r#gen();
        for (i, s) in shares.iter().enumerate() {
            if x < *s {
                return i;
            }
            x -= s;
        }
        shares.len() - 1
    };
    let mut cross = 0usize;
    for _ in 0..calls {
        let r1 = pick_region(&mut rng);
        let r2 = if rng.r#gen::<f64>() < locality { r1 } else { pick_region(&mut rng) };
        let c1 = offsets[r1] + rng.gen_range(0..cells_per_region[r1]);
        let c2 = offsets[r2] + rng.gen_range(0..cells_per_region[r2]);
        writes[c1] += WRITES_PER_CALL;
        if c1 != c2 {
            cross += 1;
            writes[c2] += 1.0;
        }
    }
    let mean = writes.iter().sum::<f64>() / total_cells as f64;
    let max = writes.iter().copied().fold(0.0, f64::max);
    Simulated {
        cells: total_cells,
        cross_cell: cross as f64 / calls as f64,
        imbalance: if mean > 0.0 { max / mean } else { 1.0 },
    }
}

pub fn run(l: &Limits) -> Section {
    let w = WORKLOAD;
    let mut s = Section::new(
        "cells",
        "Cells: devices per etcd cluster, and calls across regional cells (model on the limits measured above)",
        format!(
            "Per device a day: {} session opens, {} calls, {} commits; busiest hour {}x the mean; {} records stored. \
             Each limit used to {:.0}%; nodes of {} devices.",
            w.sessions_per_day,
            w.calls_per_day,
            w.commits_per_day,
            w.peak_factor,
            w.records_per_device,
            HEADROOM * 100.0,
            DEVICES_PER_NODE
        ),
    );
    let (size, binding, all) = cell_size(l, &w);
    for (name, n) in all {
        s.rows.push(Row::new(format!("devices per cell, bound by {name}")).value(n, "devices"));
    }
    s.notes.push(format!("one cell carries about {size:.0} devices; {binding} binds first"));
    for population in [1e6, 1e7, 1e8, 1e9] {
        let sim = simulate(population, size, 0.85, 200_000, 7);
        s.rows.push(
            Row::new(format!("{population:.0e} devices: cells (4 regions), cross-cell calls %, busiest/mean"))
                .value(sim.cells as f64, "cells")
                .rate(sim.cross_cell * 100.0, &format!("% cross-cell, {:.2}x busiest", sim.imbalance)),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            writes_per_s: 10_000.0,
            at_concurrency: 64,
            deliveries_per_s: 500_000.0,
            db_bytes_per_key: 500.0,
            mem_bytes_per_key: 1000.0,
        }
    }

    #[test]
    fn the_tightest_limit_binds() {
        let (n, binding, all) = cell_size(&limits(), &WORKLOAD);
        assert_eq!(n, all.iter().map(|a| a.1).fold(f64::INFINITY, f64::min));
        // Writes: (24*2 + 3*4 + 4) * 3 / 86400 per device; 5,000 usable.
        let per = (24.0 * 2.0 + 12.0 + 4.0) * 3.0 / 86_400.0;
        assert!((all[0].1 - 5_000.0 / per).abs() < 1.0);
        assert_eq!(binding, all.iter().find(|a| a.1 == n).unwrap().0);
        // Twice the write rate, twice the devices by writes.
        let mut l = limits();
        l.writes_per_s *= 2.0;
        assert!((cell_size(&l, &WORKLOAD).2[0].1 / all[0].1 - 2.0).abs() < 1e-9);
    }

    #[test]
    fn one_cell_per_region_keeps_local_calls_local() {
        // Everyone fits one cell per region: only calls between regions cross.
        let sim = simulate(1e6, 1e7, 0.85, 100_000, 1);
        assert_eq!(sim.cells, 4);
        // Cross-region share: 0.15 x (1 - sum of squared shares) = 0.15 x 0.7.
        assert!((sim.cross_cell - 0.105).abs() < 0.01, "{sim:?}");
        // Smaller cells: calls inside a region cross cells too.
        let split = simulate(1e6, 1e5, 0.85, 100_000, 1);
        assert!(split.cells > 4 && split.cross_cell > 0.5, "{split:?}");
    }
}
