//! `sae sweep`: one training run per point of a grid over config keys, then a
//! table (`sweep.csv`, `sweep.md`) and plots, including the FVU-vs-L0
//! frontier against a PCA baseline. Finished points are not re-run.
//!
//! Sweep file:
//! ```yaml
//! base: quickstart.yaml        # a config path (relative to this file), or a config mapping
//! grid:                        # key path -> values; runs are the cartesian product
//!   sparsity.weight: [0.003, 0.01, 0.03]
//! ```

use crate::config::{set_path, Config};
use crate::error::user;
use crate::plot::{self, LineChart, Series};
use crate::report::read_loss_curve;
use crate::train::{self, TrainOptions};
use crate::{bail_user, fsutil, Result};
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

pub struct SweepSpec {
    /// The base config as YAML, before grid values are set.
    pub base: Value,
    /// Grid keys in file order, each with its values.
    pub grid: Vec<(String, Vec<Value>)>,
    pub origin: String,
}

/// A YAML scalar as the text a user wrote (`0.01`, `topk`, `true`).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

impl SweepSpec {
    pub fn from_file(path: &Path) -> Result<SweepSpec> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| user(format!("{origin}: cannot read sweep config: {e}")))?;
        let doc: Value = serde_yaml::from_str(&text)
            .map_err(|e| user(format!("{origin}: not valid YAML: {e}")))?;
        let map = doc.as_mapping().ok_or_else(|| {
            user(format!(
                "{origin}: a sweep config is a mapping with `base` and `grid`"
            ))
        })?;
        for k in map.keys() {
            let k = value_text(k);
            if k != "base" && k != "grid" {
                bail_user!("{origin}: unknown key `{k}`; a sweep config has `base` and `grid`");
            }
        }
        let base = match map.get("base") {
            Some(Value::String(p)) => {
                let p = path.parent().unwrap_or(Path::new(".")).join(p);
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    user(format!("{origin}: base: {}: cannot read: {e}", p.display()))
                })?;
                serde_yaml::from_str(&text)
                    .map_err(|e| user(format!("{}: not valid YAML: {e}", p.display())))?
            }
            Some(v @ Value::Mapping(_)) => v.clone(),
            Some(_) => bail_user!("{origin}: base: expected a config path or a config mapping"),
            None => bail_user!("{origin}: base: required (a config path or a config mapping)"),
        };
        let grid_map = match map.get("grid") {
            Some(Value::Mapping(m)) if !m.is_empty() => m,
            _ => bail_user!("{origin}: grid: required, a mapping of key path -> list of values"),
        };
        let mut grid = Vec::new();
        for (k, v) in grid_map {
            let key = value_text(k);
            let values = match v {
                Value::Sequence(s) if !s.is_empty() => s.clone(),
                _ => bail_user!("{origin}: grid.{key}: expected a non-empty list of values"),
            };
            grid.push((key, values));
        }
        Ok(SweepSpec { base, grid, origin })
    }

    /// The cartesian product, first key slowest.
    pub fn points(&self) -> Vec<Vec<Value>> {
        let mut out: Vec<Vec<Value>> = vec![vec![]];
        for (_, values) in &self.grid {
            out = out
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.push(v.clone());
                        q
                    })
                })
                .collect();
        }
        out
    }

    /// The validated config of one point.
    pub fn config(&self, point: &[Value]) -> Result<Config> {
        let mut root = self.base.clone();
        for ((key, _), v) in self.grid.iter().zip(point) {
            set_path(&mut root, key, v.clone())
                .map_err(|e| user(format!("{}: grid.{key}: {e}", self.origin)))?;
        }
        let label = format!("{} point {}", self.origin, self.label(point));
        Config::from_value(root, &label, &[])
    }

    pub fn label(&self, point: &[Value]) -> String {
        self.grid
            .iter()
            .zip(point)
            .map(|((k, _), v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A directory name for point `i`: index plus the sanitised label.
    pub fn run_name(&self, i: usize, point: &[Value]) -> String {
        let slug: String = self
            .grid
            .iter()
            .zip(point)
            .map(|((k, _), v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join("_")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._=-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{i:03}-{slug}")
    }
}

/// One finished point: grid values and the metrics of its summary.json.
pub struct Row {
    pub values: Vec<String>,
    pub run: String,
    pub summary: serde_json::Value,
    pub pca_fvu: f64,
}

impl Row {
    fn metric(&self, split: &str, key: &str) -> Option<f64> {
        self.summary.get(split)?.get(key)?.as_f64()
    }
    fn l0(&self) -> f64 {
        self.metric("train", "l0").unwrap_or(f64::NAN)
    }
    fn fvu(&self) -> f64 {
        self.metric("train", "fvu").unwrap_or(f64::NAN)
    }
}

/// Eigenvalues (descending) of the covariance of the data the base config
/// trains on, normalised the same way: PCA's variance per component.
fn pca_spectrum(cfg: &Config) -> Result<Vec<f64>> {
    let _guard = tch::no_grad_guard();
    let x = crate::data::npy::read_tensor(cfg.data.train.as_deref().unwrap_or_default())?;
    let norm = crate::normalize::Normalizer::fit(cfg.data.normalize, &x);
    let x = norm.apply(&x).to_kind(Kind::Double);
    let xc = &x - x.mean_dim(0, true, Kind::Double);
    let cov = xc.tr().mm(&xc);
    let eig = Tensor::linalg_eigvalsh(&cov, "L").flip([0]).clamp_min(0.0);
    Ok(Vec::<f64>::try_from(eig)?)
}

/// PCA reconstruction FVU keeping `k` components (linear between integers).
pub fn pca_fvu(spectrum: &[f64], k: f64) -> f64 {
    let total: f64 = spectrum.iter().sum();
    if total <= 0.0 || !k.is_finite() {
        return f64::NAN;
    }
    let k = k.clamp(0.0, spectrum.len() as f64);
    let whole = k.floor() as usize;
    let mut kept: f64 = spectrum[..whole].iter().sum();
    if whole < spectrum.len() {
        kept += (k - whole as f64) * spectrum[whole];
    }
    1.0 - kept / total
}

/// Runs (or resumes) the sweep into `out`.
pub fn run(path: &Path, out: &Path, progress: bool) -> Result<Vec<Row>> {
    if crate::dist::Launch::from_env()?.is_some() {
        bail_user!(
            "sae sweep: runs as one process, not under a data-parallel launcher \
             (RANK and WORLD_SIZE are set); start it without torchrun"
        );
    }
    let spec = SweepSpec::from_file(path)?;
    let points = spec.points();
    // Validate every point before training any.
    let configs: Vec<Config> = points
        .iter()
        .map(|p| spec.config(p))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(out)
        .map_err(|e| user(format!("--out {}: cannot create: {e}", out.display())))?;
    let spectrum = pca_spectrum(&configs[0])?;
    let mut rows = Vec::new();
    for (i, (point, cfg)) in points.iter().zip(&configs).enumerate() {
        let name = spec.run_name(i, point);
        let dir: PathBuf = out.join(&name);
        let label = spec.label(point);
        let done = dir.join("summary.json");
        let started = Instant::now();
        let resumed = done.is_file();
        if !resumed {
            if progress {
                eprintln!("[{}/{}] {label}: training", i + 1, points.len());
            }
            train::train(
                cfg,
                &TrainOptions {
                    out: dir.clone(),
                    force: true,
                    progress: false,
                    resume: false,
                },
            )?;
        }
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&done)?)?;
        let mut row = Row {
            values: point.iter().map(value_text).collect(),
            run: name,
            summary,
            pca_fvu: f64::NAN,
        };
        row.pca_fvu = pca_fvu(&spectrum, row.l0());
        if progress {
            eprintln!(
                "[{}/{}] {label}: fvu {:.4} l0 {:.2} (PCA at that L0: fvu {:.4}){}",
                i + 1,
                points.len(),
                row.fvu(),
                row.l0(),
                row.pca_fvu,
                if resumed {
                    " [already done]".to_string()
                } else {
                    format!(" in {:.1} s", started.elapsed().as_secs_f64())
                }
            );
        }
        rows.push(row);
    }
    write_tables(&spec, &rows, out)?;
    write_plots(&spec, &rows, out)?;
    Ok(rows)
}

const METRIC_COLUMNS: [&str; 10] = [
    "train_mse",
    "valid_mse",
    "train_fvu",
    "valid_fvu",
    "l0",
    "dead_fraction",
    "mmcs",
    "pca_fvu_at_l0",
    "seconds",
    "run",
];

fn metric_cells(r: &Row) -> Vec<String> {
    let f = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mmcs = r.metric("valid", "mmcs").or(r.metric("train", "mmcs"));
    vec![
        f(r.metric("train", "mse")),
        f(r.metric("valid", "mse")),
        f(r.metric("train", "fvu")),
        f(r.metric("valid", "fvu")),
        f(r.metric("train", "l0")),
        f(r.metric("train", "dead_fraction")),
        f(mmcs),
        f(Some(r.pca_fvu).filter(|v| v.is_finite())),
        r.summary
            .get("seconds")
            .and_then(|v| v.as_f64())
            .map(|v| format!("{v:.2}"))
            .unwrap_or_default(),
        r.run.clone(),
    ]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_tables(spec: &SweepSpec, rows: &[Row], out: &Path) -> Result<()> {
    let header: Vec<String> = spec
        .grid
        .iter()
        .map(|(k, _)| k.clone())
        .chain(METRIC_COLUMNS.iter().map(|s| s.to_string()))
        .collect();
    let mut csv = header
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    let mut md = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in rows {
        let cells: Vec<String> = r.values.iter().cloned().chain(metric_cells(r)).collect();
        csv += &(cells
            .iter()
            .map(|c| csv_field(c))
            .collect::<Vec<_>>()
            .join(",")
            + "\n");
        md += &format!("| {} |\n", cells.join(" | "));
    }
    md += "\nl0 and fvu on the training data; pca_fvu_at_l0: FVU of a PCA reconstruction \
           keeping as many components as the run's L0 (linear between integers).\n";
    fsutil::write_bytes_atomic(&out.join("sweep.csv"), csv.as_bytes())?;
    fsutil::write_bytes_atomic(&out.join("sweep.md"), md.as_bytes())
}

fn write_plots(spec: &SweepSpec, rows: &[Row], out: &Path) -> Result<()> {
    let dir = out.join("plots");
    plot_frontier(spec, rows, &dir)?;
    plot_loss_curves(spec, rows, out, &dir)?;
    plot_firing(spec, rows, &dir)
}

/// FVU against L0 for every run, with the PCA baseline at the same L0s.
fn plot_frontier(spec: &SweepSpec, rows: &[Row], dir: &Path) -> Result<()> {
    let mut series: Vec<Series> = frontier_groups(spec, rows)
        .into_iter()
        .map(|(name, mut pts)| {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                name,
                points: pts,
                markers: true,
                thin: false,
            }
        })
        .collect();
    let mut pca: Vec<(f64, f64)> = rows.iter().map(|r| (r.l0(), r.pca_fvu)).collect();
    pca.sort_by(|a, b| a.0.total_cmp(&b.0));
    series.push(Series {
        name: "PCA, same number of components".into(),
        points: pca,
        markers: true,
        thin: true,
    });
    plot::line_chart(
        &dir.join("frontier.png"),
        &LineChart {
            title: "Reconstruction vs sparsity (training data)",
            x_label: "L0: mean active latents per row (log scale)",
            y_label: "FVU: fraction of variance unexplained",
            log_x: true,
            log_y: false,
            series,
        },
    )
}

/// The frontier's lines, named, with their (L0, FVU) points in row order:
/// one line per combination of the varying grid keys but the last varying
/// one, which runs along the line.
fn frontier_groups(spec: &SweepSpec, rows: &[Row]) -> Vec<(String, Vec<(f64, f64)>)> {
    let varying: Vec<usize> = (0..spec.grid.len())
        .filter(|&i| spec.grid[i].1.len() > 1)
        .collect();
    let group_keys = &varying[..varying.len().saturating_sub(1)];
    let mut groups: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let key = if group_keys.is_empty() {
            match varying.last() {
                Some(&i) => format!("SAE, varying {}", spec.grid[i].0),
                None => "SAE".to_string(),
            }
        } else {
            group_keys
                .iter()
                .map(|&i| format!("{}={}", spec.grid[i].0, r.values[i]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push((r.l0(), r.fvu())),
            None => groups.push((key, vec![(r.l0(), r.fvu())])),
        }
    }
    groups
}

/// Every run's training loss, read back from its run directory.
fn plot_loss_curves(spec: &SweepSpec, rows: &[Row], out: &Path, dir: &Path) -> Result<()> {
    let curves: Vec<Series> = rows
        .iter()
        .map(|r| -> Result<Series> {
            Ok(Series {
                name: spec_label_short(&r.values, spec),
                points: read_loss_curve(&out.join(&r.run))?
                    .iter()
                    .map(|c| (c.0, c.1))
                    .collect(),
                markers: false,
                thin: false,
            })
        })
        .collect::<Result<_>>()?;
    plot::line_chart(
        &dir.join("loss_curves.png"),
        &LineChart {
            title: "Training loss of every run",
            x_label: "step",
            y_label: "loss (log scale)",
            log_x: false,
            log_y: true,
            series: curves,
        },
    )
}

/// Each run's firing-frequency histogram from its summary, as grouped bars.
fn plot_firing(spec: &SweepSpec, rows: &[Row], dir: &Path) -> Result<()> {
    let mut cats = Vec::new();
    let mut hist = Vec::new();
    for r in rows {
        let bins = r.summary["train"]["firing_histogram"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if cats.is_empty() {
            cats = bins
                .iter()
                .map(|b| b["label"].as_str().unwrap_or("").to_string())
                .collect();
        }
        hist.push((
            spec_label_short(&r.values, spec),
            bins.iter()
                .map(|b| b["count"].as_f64().unwrap_or(0.0))
                .collect(),
        ));
    }
    plot::bar_chart(
        &dir.join("firing_frequency.png"),
        "Latent firing frequency per run (training data)",
        "fraction of rows on which a latent is active (decade lower edge)",
        "latents",
        &cats,
        &hist,
    )
}

fn spec_label_short(values: &[String], spec: &SweepSpec) -> String {
    spec.grid
        .iter()
        .zip(values)
        .map(|((k, _), v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
        .collect::<Vec<_>>()
        .join(", ")
}
