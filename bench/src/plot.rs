//! SVG plots of a run (plotters): latency distributions, and lines such as
//! rate against concurrency or memory against connections.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::Plot;

const COLORS: [RGBColor; 6] = [
    RGBColor(0x44, 0x44, 0x44),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Writes each plot as `<dir>/<file>`; returns the paths written.
pub fn write_all(dir: &Path, plots: &[Plot]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for p in plots {
        let path = match p {
            Plot::Latency { file, title, series } => {
                let path = dir.join(file);
                latency(&path, title, series)?;
                path
            }
            Plot::Lines { file, title, x_label, y_label, series } => {
                let path = dir.join(file);
                lines(&path, title, x_label, y_label, series)?;
                path
            }
        };
        out.push(path);
    }
    Ok(out)
}

/// At most `n` points of a sorted sample, evenly spaced by rank, with the
/// share of samples at or below each.
fn cdf(sorted: &[f64], n: usize) -> Vec<(f64, f64)> {
    if sorted.is_empty() {
        return vec![];
    }
    let step = (sorted.len() / n).max(1);
    let mut pts: Vec<(f64, f64)> =
        (0..sorted.len()).step_by(step).map(|i| (sorted[i], (i + 1) as f64 / sorted.len() as f64)).collect();
    pts.push((sorted[sorted.len() - 1], 1.0));
    pts
}

/// plotters' errors, as this crate's.
fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// A series' legend mark: a short line in its colour.
fn legend_mark(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
}

/// Draws the legend at `pos` and writes the file.
fn finish<'a, X: Ranged, Y: Ranged>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    pos: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)
}

fn latency(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    let lo = series.iter().filter_map(|(_, s)| s.first().copied()).fold(f64::INFINITY, f64::min).max(0.01);
    let hi = series.iter().filter_map(|(_, s)| s.last().copied()).fold(0.0, f64::max).max(lo * 2.0);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("share of operations done")
        .draw()
        .map_err(plot_err)?;
    for (i, (name, s)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(cdf(s, 400), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(legend_mark(c));
    }
    finish(&root, &mut chart, SeriesLabelPosition::LowerRight)
}

fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let pts = series.iter().flat_map(|(_, s)| s.iter().copied());
    let (mut x_hi, mut y_hi) = (1.0f64, 1.0f64);
    for (x, y) in pts {
        x_hi = x_hi.max(x);
        y_hi = y_hi.max(y);
    }
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_hi * 1.05, 0.0..y_hi * 1.1)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(plot_err)?;
    for (i, (name, s)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(legend_mark(c));
        chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(plot_err)?;
    }
    finish(&root, &mut chart, SeriesLabelPosition::UpperLeft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svgs_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let plots = vec![
            Plot::Latency {
                file: "lat.svg".into(),
                title: "setup".into(),
                series: vec![("raw".into(), vec![80.0, 100.0, 120.0]), ("spine".into(), vec![300.0, 400.0, 900.0])],
            },
            Plot::Lines {
                file: "mem.svg".into(),
                title: "memory".into(),
                x_label: "connections".into(),
                y_label: "MiB".into(),
                series: vec![("raw".into(), vec![(1000.0, 20.0), (2000.0, 40.0)])],
            },
        ];
        let paths = write_all(dir.path(), &plots).unwrap();
        assert_eq!(paths.len(), 2);
        for p in paths {
            let svg = std::fs::read_to_string(&p).unwrap();
            assert!(svg.starts_with("<svg"), "{}", p.display());
        }
        let lat = std::fs::read_to_string(dir.path().join("lat.svg")).unwrap();
        assert!(lat.contains("spine") && lat.contains("raw"));
    }

    #[test]
    fn cdf_ends_at_one() {
        let s: Vec<f64> = (0..10_000).map(f64::from).collect();
        let c = cdf(&s, 100);
        assert!(c.len() <= 102);
        assert_eq!(c.last(), Some(&(9999.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
