//! What a run measured: sections of rows (each beside its baseline), the
//! aims as ratios, and the series the plots draw. Printed as a table, or
//! written as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Latency samples summarised.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

impl Latency {
    /// p50 and p99 of `samples` (sorted here); `None` when empty.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(Self {
            p50_us: percentile(samples, 0.50).as_secs_f64() * 1e6,
            p99_us: percentile(samples, 0.99).as_secs_f64() * 1e6,
            samples: samples.len(),
        })
    }
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One measured thing. A baseline row is what the rows after it (up to the
/// next baseline) are compared with.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Row {
    pub name: String,
    pub baseline: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Operations per second, with their unit (`commits/s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rate_unit: String,
    /// Any other figure (KiB per stream, etcd round trips), with its unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value_unit: String,
    /// Against the baseline: p50, rate or value, whichever the row has
    /// first (rows carry their own `ratio_of` saying which).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ratio_of: String,
}

impl Row {
    pub fn baseline(name: impl Into<String>) -> Self {
        Self { name: name.into(), baseline: true, ..Default::default() }
    }
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Default::default() }
    }
    pub fn latency(mut self, l: Option<Latency>) -> Self {
        self.latency = l;
        self
    }
    pub fn rate(mut self, r: f64, unit: &str) -> Self {
        self.rate = Some(r);
        self.rate_unit = unit.into();
        self
    }
    pub fn value(mut self, v: f64, unit: &str) -> Self {
        self.value = Some(v);
        self.value_unit = unit.into();
        self
    }
    /// This row's `what` (p50, p99, rate or value) over the baseline's.
    pub fn against(mut self, base: &Row, what: &str) -> Self {
        let pick = |r: &Row| match what {
            "p50" => r.latency.map(|l| l.p50_us),
            "p99" => r.latency.map(|l| l.p99_us),
            "rate" => r.rate,
            _ => r.value,
        };
        if let (Some(a), Some(b)) = (pick(&self), pick(base))
            && b > 0.0
        {
            self.ratio = Some(a / b);
            self.ratio_of = what.into();
        }
        self
    }
}

/// An aim: a ratio measured in this run, and the bound it should keep.
#[derive(Debug, Clone, Serialize)]
pub struct Aim {
    pub what: String,
    pub ratio: f64,
    /// `at most` or `at least`.
    pub bound: &'static str,
    pub limit: f64,
    pub met: bool,
}

impl Aim {
    pub fn at_most(what: impl Into<String>, ratio: f64, limit: f64) -> Self {
        Self { what: what.into(), ratio, bound: "at most", limit, met: ratio <= limit }
    }
    pub fn at_least(what: impl Into<String>, ratio: f64, limit: f64) -> Self {
        Self { what: what.into(), ratio, bound: "at least", limit, met: ratio >= limit }
    }
}

/// What a plot draws.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plot {
    /// Latency distributions: for each series, its sorted samples (µs),
    /// drawn as the share of operations done within each latency.
    Latency { file: String, title: String, series: Vec<(String, Vec<f64>)> },
    /// y against x for each series (rate vs concurrency, memory vs
    /// connections).
    Lines { file: String, title: String, x_label: String, y_label: String, series: Vec<(String, Vec<(f64, f64)>)> },
}

/// One benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub id: &'static str,
    pub title: String,
    /// How it was measured, in a sentence or two.
    pub setup: String,
    pub rows: Vec<Row>,
    pub aims: Vec<Aim>,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub plots: Vec<Plot>,
}

impl Section {
    pub fn new(id: &'static str, title: impl Into<String>, setup: impl Into<String>) -> Self {
        Self { id, title: title.into(), setup: setup.into(), rows: vec![], aims: vec![], notes: vec![], plots: vec![] }
    }
}

/// Everything one `spine bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub spine_version: &'static str,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
    pub quick: bool,
    pub cpus: usize,
    pub sections: Vec<Section>,
    /// Benchmarks that could not run here, and why.
    pub skipped: Vec<(String, String)>,
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 { format!("{:.2} ms", us / 1000.0) } else { format!("{us:.1} µs") }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The terminal table: one block per section, one line per row, then
    /// the aims.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            let _ = writeln!(out, "\n{}\n  {}", s.title, s.setup);
            let w = s.rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(10).max(10);
            let _ = writeln!(
                out,
                "  {:<w$}  {:>10}  {:>10}  {:>16}  {:>18}  {:>8}",
                "", "p50", "p99", "rate", "value", "ratio"
            );
            for r in &s.rows {
                let (p50, p99) =
                    r.latency.map_or((String::new(), String::new()), |l| (fmt_us(l.p50_us), fmt_us(l.p99_us)));
                let rate = r.rate.map_or(String::new(), |v| format!("{} {}", fmt_num(v), r.rate_unit));
                let value = r.value.map_or(String::new(), |v| format!("{} {}", fmt_num(v), r.value_unit));
                let ratio = if r.baseline {
                    "base".to_string()
                } else {
                    r.ratio.map_or(String::new(), |v| format!("{v:.2} {}", r.ratio_of))
                };
                let _ = writeln!(out, "  {:<w$}  {p50:>10}  {p99:>10}  {rate:>16}  {value:>18}  {ratio:>8}", r.name);
            }
            for a in &s.aims {
                let _ = writeln!(
                    out,
                    "  aim: {} = {:.2} ({} {}): {}",
                    a.what,
                    a.ratio,
                    a.bound,
                    a.limit,
                    if a.met { "met" } else { "NOT met" }
                );
            }
            for n in &s.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        for (what, why) in &self.skipped {
            let _ = writeln!(out, "\nskipped {what}: {why}");
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::of(&mut s).unwrap();
        assert_eq!(l.samples, 100);
        assert!((l.p50_us - 51.0).abs() < 1e-9, "{l:?}");
        assert!((l.p99_us - 99.0).abs() < 1e-9, "{l:?}");
        assert!(Latency::of(&mut []).is_none());
    }

    #[test]
    fn ratios_and_aims() {
        let base = Row::baseline("raw").rate(1000.0, "ops/s").value(8.0, "KiB");
        let r = Row::new("spine").rate(400.0, "ops/s").against(&base, "rate");
        assert_eq!(r.ratio, Some(0.4));
        let m = Row::new("spine").value(12.0, "KiB").against(&base, "value");
        assert_eq!(m.ratio, Some(1.5));
        assert!(Aim::at_most("memory", 1.5, 1.5).met);
        assert!(!Aim::at_least("rate", 0.4, 0.5).met);
        // No baseline figure: no ratio rather than a made-up one.
        assert_eq!(Row::new("x").value(1.0, "KiB").against(&Row::baseline("y"), "value").ratio, None);
    }

    #[test]
    fn table_and_json_carry_every_row_and_aim() {
        let mut s = Section::new("t", "A test", "how");
        s.rows.push(Row::baseline("raw").rate(12345.0, "ops/s"));
        s.rows.push(Row::new("spine").rate(6000.0, "ops/s").against(&s.rows[0].clone(), "rate"));
        s.aims.push(Aim::at_least("spine / raw", 0.486, 0.5));
        let r = Report { spine_version: "0", started_at: 0, quick: true, cpus: 2, sections: vec![s], skipped: vec![] };
        let t = r.table();
        assert!(t.contains("12,345 ops/s") && t.contains("0.49 rate") && t.contains("NOT met"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(j["sections"][0]["rows"][1]["ratio_of"], "rate");
        assert_eq!(j["sections"][0]["aims"][0]["met"], false);
    }
}
