//! `spine bench`: each benchmark beside its raw baseline, measured in the
//! same run on the same machine (these machines are shared and noisy, so
//! only ratios in one run compare). A table on the terminal, `--json` for
//! machines, SVG plots in a folder. docs/performance.md shows one run.
//!
//! Benchmarks (`--only` takes these names):
//! - `mls`: the delivery service's verifier beside raw openmls `PublicGroup`;
//! - `sframe`: SFrame per media frame beside raw AES-128-GCM;
//! - `commits`: accepted MLS commits per second on etcd beside etcd's own
//!   compare-and-swap rate, the commits built before the clock starts;
//! - `presence`: presence fan-out and memory per idle watch beside a raw
//!   tonic stream server;
//! - `calls`: one-to-one call setup beside a raw tonic round trip, and on
//!   etcd beside its floor (round trips it must make, each measured);
//! - `idle`: what a connected idle device costs a node (a calls session
//!   and a presence watch on one connection, plain and TLS) beside a raw
//!   tonic server holding the same streams;
//! - `etcd`: one etcd's limits for Spine's records (writes/s, watch
//!   fan-out, keys and database size), and the cell model of
//!   docs/scaling.md run on them.

pub mod calls;
pub mod cells;
pub mod commits;
pub mod etcd;
pub mod idle;
pub mod mls;
pub mod plot;
pub mod presence;
pub mod raw;
pub mod report;
pub mod sframe;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
pub use report::{Aim, Latency, Plot, Report, Row, Section};

/// Every benchmark, in the order a run takes them.
pub const BENCHES: [&str; 7] = ["mls", "sframe", "commits", "presence", "calls", "idle", "etcd"];

#[derive(Debug, Clone)]
pub struct Options {
    /// About a minute in all: fewer samples, shorter windows, smaller sizes.
    pub quick: bool,
    /// Only these benchmarks (empty: all).
    pub only: Vec<String>,
    /// The `spine` executable, for benchmarks that run a node in a process
    /// of its own (`idle`).
    pub spine_exe: Option<PathBuf>,
    /// Idle devices to hold, in steps (default: by `quick`).
    pub idle_devices: Vec<usize>,
    /// How long each idle step is watched for CPU (default: by `quick`).
    pub idle_window: Option<Duration>,
}

impl Options {
    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

/// Runs the chosen benchmarks, one after another.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    for o in &opts.only {
        anyhow::ensure!(BENCHES.contains(&o.as_str()), "no benchmark {o:?} (there are: {})", BENCHES.join(", "));
    }
    let mut report = Report {
        spine_version: env!("CARGO_PKG_VERSION"),
        started_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        quick: opts.quick,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        sections: vec![],
        skipped: vec![],
    };
    let mut etcd_limits = None;
    for name in BENCHES {
        if !opts.wants(name) {
            continue;
        }
        let started = Instant::now();
        let section = match name {
            "mls" => mls::run(opts).await?,
            "sframe" => sframe::run(opts)?,
            "commits" => commits::run(opts).await?,
            "presence" => presence::run(opts).await?,
            "calls" => calls::run(opts).await?,
            "idle" => match idle::run(opts).await? {
                Ok(s) => s,
                Err(why) => {
                    report.skipped.push((name.into(), why));
                    continue;
                }
            },
            "etcd" => {
                let (s, limits) = etcd::run(opts).await?;
                etcd_limits = Some(limits);
                s
            }
            _ => unreachable!("checked above"),
        };
        eprintln!("{name}: done in {:.0} s", started.elapsed().as_secs_f64());
        report.sections.push(section);
    }
    if let Some(limits) = etcd_limits {
        report.sections.push(cells::run(&limits));
    }
    Ok(report)
}

/// A bar over `len` steps, on stderr (drawn only on a terminal).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} ({elapsed}, {eta} left)")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// A bar that fills over `d` of wall time, for fixed-length measurements;
/// finished when dropped.
pub struct Timed(ProgressBar, tokio::task::JoinHandle<()>);

impl Timed {
    pub fn start(d: Duration, what: &str) -> Self {
        let b = bar(d.as_millis().max(1) as u64, what);
        b.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:30}] {elapsed} of {len}ms")
                .expect("template")
                .progress_chars("=> "),
        );
        let bb = b.clone();
        let t0 = Instant::now();
        let h = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bb.set_position(t0.elapsed().as_millis() as u64);
            }
        });
        Self(b, h)
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.1.abort();
        self.0.finish_and_clear();
    }
}

/// `workers` tasks at once, each repeating `op(worker, i)` until `d` has
/// passed (a closed loop: a worker's next operation starts when its last
/// ends), under a bar named `what`: every operation's latency, and
/// operations per second over the window.
pub async fn closed_loop<F, Fut>(workers: usize, d: Duration, what: &str, op: F) -> (Vec<Duration>, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let _bar = Timed::start(d, what);
    let op = std::sync::Arc::new(op);
    let deadline = Instant::now() + d;
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(w, i).await;
                    lat.push(t.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("a benchmark worker"));
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    (lat, rate)
}

/// Lets everyone see the presence of the account holding `token` (the
/// benchmarks' watches are on accounts that allow it).
pub async fn everyone_sees_presence(ch: tonic::transport::Channel, token: &str) -> Result<(), tonic::Status> {
    use spine_proto::identity::v1 as ipb;
    spine_proto::identity::v1::identity_client::IdentityClient::new(ch)
        .update_settings(spine_testing::req(
            ipb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(ipb::PrivacySettings {
                    presence_visibility: ipb::PresenceVisibility::Everyone as i32,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["presence_visibility".into()] }),
            },
            token,
        ))
        .await
        .map(|_| ())
}

/// Resident memory of a process (`self` or a pid), in bytes.
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let path = pid.map_or("/proc/self/statm".to_string(), |p| format!("/proc/{p}/statm"));
    let statm = std::fs::read_to_string(path).unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on every Linux Spine runs on.
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_cpu() {
        assert!(rss_bytes(None) > 1 << 20);
        let t0 = cpu_time(None);
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        assert!(cpu_time(None) > t0);
    }

    #[tokio::test]
    async fn an_unknown_benchmark_is_refused() {
        let opts = Options {
            quick: true,
            only: vec!["nope".into()],
            spine_exe: None,
            idle_devices: vec![],
            idle_window: None,
        };
        let e = run(&opts).await.unwrap_err().to_string();
        assert!(e.contains("no benchmark \"nope\""), "{e}");
    }
}
