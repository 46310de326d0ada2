//! `sae sweep`: one training run per point of a grid over config keys, then a
//! table (`sweep.csv`, `sweep.md`) and plots, including the FVU-vs-L0
//! frontier against a PCA baseline. Finished points are not re-run; points
//! stopped by a signal (or a kill) resume from their checkpoints.
//!
//! Sweep file:
//! ```yaml
//! base: quickstart.yaml        # a config path (relative to this file), or a config mapping
//! grid:                        # key path -> values; runs are the cartesian product
//!   sparsity.weight: [0.003, 0.01, 0.03]
//! ```

use crate::checkpoint;
use crate::config::{apply_override, set_path, Auto, Config};
use crate::error::{user, Interrupted};
use crate::plot::{self, LineChart, Series};
use crate::report::read_loss_curve;
use crate::train::interrupt::{self, Interrupter};
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
    /// `--set key.path=value` overrides, applied to `base` (the grid's keys
    /// still get the grid's values).
    pub sets: Vec<String>,
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
    /// The sweep file at `path`, its base config with the `sets` overrides
    /// (`--set key.path=value`) applied.
    pub fn from_file(path: &Path, sets: &[String]) -> Result<SweepSpec> {
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
        let mut base = match map.get("base") {
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
        for o in sets {
            apply_override(&mut base, o)?;
        }
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
        Ok(SweepSpec {
            base,
            grid,
            origin,
            sets: sets.to_vec(),
        })
    }

    /// `--set` overrides of keys that the grid sets too, which they do not
    /// change.
    pub fn shadowed_sets(&self) -> Vec<&str> {
        self.sets
            .iter()
            .filter(|o| {
                let key = o.split_once('=').map_or("", |(k, _)| k.trim());
                self.grid.iter().any(|(k, _)| k == key)
            })
            .map(String::as_str)
            .collect()
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
        let with = match self.sets.is_empty() {
            true => String::new(),
            false => format!(" with --set {}", self.sets.join(" --set ")),
        };
        let label = format!("{}{with} point {}", self.origin, self.label(point));
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
fn pca_spectrum(cfg: &Config, sources: &train::Sources) -> Result<Vec<f64>> {
    let _guard = tch::no_grad_guard();
    let x = match cfg.data.from_model() {
        // The sample a run from the model fits its normalisation on.
        true => train::plan::model_sample(cfg, sources)?,
        false => crate::data::npy::read_tensor(cfg.data.train.as_deref().unwrap_or_default())?,
    };
    let norm = crate::normalize::Normalizer::fit(cfg.data.normalize, &x, cfg.data.whiten_eps);
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

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Grid points trained at once. 1 trains them one after another in this
    /// process; more runs each point as a `sae train` child process.
    pub jobs: usize,
    /// Progress lines on stderr.
    pub progress: bool,
    /// `--set key.path=value` overrides of the base config of every point.
    pub sets: Vec<String>,
}

/// Runs (or resumes) the sweep into `out`.
pub fn run(path: &Path, out: &Path, opts: &SweepOptions) -> Result<Vec<Row>> {
    if crate::dist::Launch::from_env()?.is_some() {
        bail_user!(
            "sae sweep: runs as one process, not under a data-parallel launcher \
             (RANK and WORLD_SIZE are set); start it without torchrun (--jobs N runs \
             N points at once)"
        );
    }
    let spec = SweepSpec::from_file(path, &opts.sets)?;
    let points = spec.points();
    // Validate every point before training any.
    let configs: Vec<Config> = points
        .iter()
        .map(|p| spec.config(p))
        .collect::<Result<_>>()?;
    for o in spec.shadowed_sets() {
        eprintln!(
            "sae: warning: --set {o}: the grid sets this key for every point, so this \
             value is not used"
        );
    }
    std::fs::create_dir_all(out)
        .map_err(|e| user(format!("--out {}: cannot create: {e}", out.display())))?;
    // Points stopped before they finished resume from their checkpoints,
    // with the thread count they started with (`auto` in the sweep, it
    // may have been resolved for `--jobs N`): a resumed run keeps its config.
    let resume: Vec<bool> = (0..points.len())
        .map(|i| {
            let dir = out.join(spec.run_name(i, &points[i]));
            !dir.join("summary.json").is_file() && checkpoint::path(&dir).is_file()
        })
        .collect();
    let configs: Vec<Config> = configs
        .into_iter()
        .enumerate()
        .map(|(i, mut cfg)| {
            let saved = out.join(spec.run_name(i, &points[i])).join("config.yaml");
            if resume[i] && cfg.train.threads == Auto::Auto {
                if let Ok(saved) = Config::from_file(&saved, &[]) {
                    cfg.train.threads = saved.train.threads;
                }
            }
            cfg
        })
        .collect();
    let sources = train::Sources::together();
    let spectrum = pca_spectrum(&configs[0], &sources)?;
    let rows = if opts.jobs <= 1 && one_model_pass(&configs) {
        run_together(
            &spec,
            &points,
            &configs,
            &resume,
            out,
            &spectrum,
            opts.progress,
            &sources,
        )?
    } else if opts.jobs <= 1 {
        run_in_process(
            &spec,
            &points,
            &configs,
            &resume,
            out,
            &spectrum,
            opts.progress,
        )?
    } else {
        parallel::run(&spec, &points, &configs, &resume, out, &spectrum, opts)?
    };
    write_tables(&spec, &rows, out)?;
    write_plots(&spec, &rows, out)?;
    Ok(rows)
}

/// Whether every point trains on one language model's rows in the same
/// order with the same threads: then one pass of the model serves them all.
fn one_model_pass(configs: &[Config]) -> bool {
    let key = |c: &Config| format!("{:?} {} {} {:?}", c.data, c.seed, c.device, c.train.threads);
    configs[0].data.from_model() && configs.iter().all(|c| key(c) == key(&configs[0]))
}

/// `--jobs 1` with one model source: the points train together, the model
/// run once per window for all (`train::train_together`); finished points
/// are kept, checkpointed ones resume.
#[allow(clippy::too_many_arguments)]
fn run_together(
    spec: &SweepSpec,
    points: &[Vec<Value>],
    configs: &[Config],
    resume: &[bool],
    out: &Path,
    spectrum: &[f64],
    progress: bool,
    sources: &train::Sources,
) -> Result<Vec<Row>> {
    let started = Instant::now();
    let n = points.len();
    let mut runs = Vec::new();
    let mut trained = Vec::new();
    for (i, (point, cfg)) in points.iter().zip(configs).enumerate() {
        let dir = out.join(spec.run_name(i, point));
        if dir.join("summary.json").is_file() {
            continue;
        }
        if progress {
            eprintln!(
                "[{}/{n}] {}: {}",
                i + 1,
                spec.label(point),
                how_it_starts(resume[i], &dir)
            );
        }
        let opts = TrainOptions {
            out: dir,
            force: !resume[i],
            progress: false,
            resume: resume[i],
        };
        runs.push((cfg.clone(), opts));
        trained.push(i);
    }
    if !runs.is_empty() {
        if progress {
            eprintln!(
                "{} point(s) train together on one pass of {}",
                runs.len(),
                configs[0].data.model.as_deref().unwrap_or_default()
            );
        }
        let before = sources.sequences_run();
        if let Err(e) = train::train_together(&runs, sources) {
            return Err(match signal_of(&e) {
                // Every point training checkpointed.
                Some(sig) => interrupted(sig, spec, points, out, &trained),
                None => e,
            });
        }
        if progress {
            eprintln!(
                "the model ran on {} sequences for {} point(s) in {:.1} s",
                sources.sequences_run() - before,
                runs.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let mut rows = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let name = spec.run_name(i, point);
        let dir = out.join(&name);
        let row = finished_row(point, name, &dir, spectrum)?;
        if progress {
            let done = runs.iter().all(|(_, o)| o.out != dir);
            eprintln!(
                "{}",
                finished_line(i, n, &spec.label(point), &row, done, started)
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `--jobs 1`: every point in turn, trained (or resumed) in this process.
/// A signal checkpoints the point training and starts no other.
#[allow(clippy::too_many_arguments)]
fn run_in_process(
    spec: &SweepSpec,
    points: &[Vec<Value>],
    configs: &[Config],
    resume: &[bool],
    out: &Path,
    spectrum: &[f64],
    progress: bool,
) -> Result<Vec<Row>> {
    // Held for the whole sweep: a signal between points stops it too.
    let interrupter = Interrupter::register()?;
    let mut rows = Vec::new();
    for (i, (point, cfg)) in points.iter().zip(configs).enumerate() {
        let name = spec.run_name(i, point);
        let dir: PathBuf = out.join(&name);
        let label = spec.label(point);
        let started = Instant::now();
        let resumed = dir.join("summary.json").is_file();
        if !resumed {
            if let Some(sig) = interrupter.received() {
                return Err(interrupted(sig, spec, points, out, &[]));
            }
            if progress {
                let how = how_it_starts(resume[i], &dir);
                eprintln!("[{}/{}] {label}: {how}", i + 1, points.len());
            }
            let opts = TrainOptions {
                out: dir.clone(),
                force: !resume[i],
                progress: false,
                resume: resume[i],
            };
            if let Err(e) = train::train_interruptible(cfg, &opts, &interrupter) {
                return Err(match signal_of(&e) {
                    Some(sig) => interrupted(sig, spec, points, out, &[i]),
                    None => e,
                });
            }
        }
        let row = finished_row(point, name, &dir, spectrum)?;
        if progress {
            eprintln!(
                "{}",
                finished_line(i, points.len(), &label, &row, resumed, started)
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `training`, or `resuming from step N` for a point with a checkpoint.
fn how_it_starts(resume: bool, dir: &Path) -> String {
    match (resume, checkpoint::read_position(dir)) {
        (false, _) => "training".to_string(),
        (true, Ok(pos)) => format!("resuming from step {}", pos.step),
        (true, Err(_)) => "resuming".to_string(),
    }
}

/// The signal that stopped a training, if `e` is its [`Interrupted`].
fn signal_of(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Interrupted>())
        .map(|i| i.code - 128)
}

/// The end of a sweep stopped by signal `sig`: one line on stderr for each
/// point it stopped (`stopped`, indices into `points`) saying where that
/// point stands, then the error to exit with (128 + `sig`) saying that
/// re-running the sweep goes on from there.
fn interrupted(
    sig: i32,
    spec: &SweepSpec,
    points: &[Vec<Value>],
    out: &Path,
    stopped: &[usize],
) -> anyhow::Error {
    let n = points.len();
    let dir = |i: usize| out.join(spec.run_name(i, &points[i]));
    for &i in stopped {
        let state = match checkpoint::read_position(&dir(i)) {
            Ok(pos) => format!(
                "stopped at step {}, checkpoint in {}; re-running the same `sae sweep` \
                 command resumes it from there",
                pos.step,
                checkpoint::path(&dir(i)).display()
            ),
            Err(_) => "stopped before its first checkpoint; re-running the same `sae sweep` \
                       command trains it from the start"
                .to_string(),
        };
        eprintln!("sae: [{}/{n}] {}: {state}", i + 1, spec.label(&points[i]));
    }
    let finished = (0..n)
        .filter(|&i| dir(i).join("summary.json").is_file())
        .count();
    interrupt::stopped(sig, |name| {
        format!(
            "sweep interrupted by {name}: {finished} of {n} point(s) finished (kept in {}); \
             re-run the same `sae sweep` command to train the other {} (stopped points \
             resume from their checkpoints)",
            out.display(),
            n - finished
        )
    })
}

/// The row of a point whose run directory has its summary.json.
fn finished_row(point: &[Value], name: String, dir: &Path, spectrum: &[f64]) -> Result<Row> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    let mut row = Row {
        values: point.iter().map(value_text).collect(),
        run: name,
        summary,
        pca_fvu: f64::NAN,
    };
    row.pca_fvu = pca_fvu(spectrum, row.l0());
    Ok(row)
}

/// `[i/n] label: fvu .. l0 .. (PCA ..) in 1.2 s` (or `[already done]`).
fn finished_line(
    i: usize,
    n: usize,
    label: &str,
    row: &Row,
    resumed: bool,
    started: Instant,
) -> String {
    format!(
        "[{}/{}] {label}: fvu {:.4} l0 {:.2} (PCA at that L0: fvu {:.4}){}",
        i + 1,
        n,
        row.fvu(),
        row.l0(),
        row.pca_fvu,
        if resumed {
            " [already done]".to_string()
        } else {
            format!(" in {:.1} s", started.elapsed().as_secs_f64())
        }
    )
}

/// `--jobs N` (N > 1): N points at once, each a child process of this binary
/// (`sae train -q --config <point config> --out <run dir> --force`, or
/// `--resume <run dir>` for a point with a checkpoint).
/// libtorch's thread count and random generator are process-wide, so
/// trainings sharing one process would disturb each other; separate
/// processes also keep one point's failure from taking down the others.
/// SIGINT / SIGTERM to the sweep is forwarded to every child, which
/// checkpoints and exits; no new point starts.
mod parallel {
    use super::{
        finished_line, finished_row, how_it_starts, interrupted, Row, SweepOptions, SweepSpec,
    };
    use crate::config::{Auto, Config};
    use crate::error::user;
    use crate::train::interrupt::Interrupter;
    use crate::{fsutil, Result};
    use anyhow::Context;
    use serde_yaml::Value;
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    /// A point whose training did not finish.
    struct Failed {
        /// The child's exit code (None: killed by a signal, or not started).
        code: Option<i32>,
        /// The child's last stderr line, or why it could not run.
        why: String,
        /// Stopped by the signal the sweep forwarded to it.
        interrupted: bool,
    }

    /// The `sae train` children running now, and the signal forwarded to
    /// them.
    #[derive(Default)]
    struct Children(Mutex<(Option<i32>, Vec<u32>)>);

    impl Children {
        fn lock(&self) -> MutexGuard<'_, (Option<i32>, Vec<u32>)> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// A child started; one started after the signal gets it at once.
        fn add(&self, pid: u32) {
            let mut g = self.lock();
            if let Some(sig) = g.0 {
                send(pid, sig);
            }
            g.1.push(pid);
        }

        /// A child that has exited, not yet reaped (so its pid is not
        /// someone else's yet).
        fn remove(&self, pid: u32) {
            self.lock().1.retain(|&p| p != pid);
        }

        /// Sends `sig` to every child running, once.
        fn forward(&self, sig: i32) {
            let mut g = self.lock();
            if g.0.is_none() {
                g.0 = Some(sig);
                for &pid in &g.1 {
                    send(pid, sig);
                }
            }
        }

        fn signalled(&self) -> Option<i32> {
            self.lock().0
        }
    }

    fn send(pid: u32, sig: i32) {
        // SAFETY: kill(2) with a pid of our own unreaped child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }

    /// Libtorch threads per job: `train.threads` where a point's config sets
    /// it, else the cores split evenly between the jobs. Points that resume
    /// keep their own (`auto` included).
    pub(super) fn with_threads(
        configs: &[Config],
        resume: &[bool],
        jobs: usize,
        cores: usize,
    ) -> Vec<Config> {
        let share = (cores / jobs).max(1) as i64;
        let mut warned = false;
        configs
            .iter()
            .zip(resume)
            .map(|(c, &resume)| {
                let mut c = c.clone();
                match c.train.threads {
                    _ if resume => {}
                    Auto::Auto => c.train.threads = Auto::Value(share),
                    Auto::Value(t) => {
                        if !warned && t as usize * jobs > cores {
                            eprintln!(
                                "sae: warning: train.threads {t} x --jobs {jobs} exceeds the \
                                 {cores} available cores; the trainings will slow each other \
                                 down (leave train.threads unset to split the cores)"
                            );
                            warned = true;
                        }
                    }
                }
                c
            })
            .collect()
    }

    pub(super) fn run(
        spec: &SweepSpec,
        points: &[Vec<Value>],
        configs: &[Config],
        resume: &[bool],
        out: &Path,
        spectrum: &[f64],
        opts: &SweepOptions,
    ) -> Result<Vec<Row>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let configs = with_threads(configs, resume, opts.jobs, cores);
        let exe = std::env::current_exe().context("finding this program to run `sae train`")?;
        let n = points.len();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let children = Children::default();
        let interrupter = Interrupter::register()?;
        let results: Mutex<Vec<Option<std::result::Result<Row, Failed>>>> =
            Mutex::new((0..n).map(|_| None).collect());
        let worker = || loop {
            // After a failure or a signal no new point starts; running ones
            // finish (or checkpoint and stop).
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= n {
                break;
            }
            let point = &points[i];
            let name = spec.run_name(i, point);
            let label = spec.label(point);
            let dir = out.join(&name);
            let started = Instant::now();
            let resumed = dir.join("summary.json").is_file();
            let result = if resumed {
                Ok(())
            } else {
                if opts.progress {
                    eprintln!(
                        "[{}/{n}] {label}: {}",
                        i + 1,
                        how_it_starts(resume[i], &dir)
                    );
                }
                let child = Child {
                    exe: &exe,
                    cfg: &configs[i],
                    out,
                    name: &name,
                    dir: &dir,
                    resume: resume[i],
                };
                child.train(&children)
            };
            let result = result.and_then(|()| {
                finished_row(point, name, &dir, spectrum).map_err(|e| Failed {
                    code: Some(crate::error::exit_code(&e)),
                    why: crate::error::one_line(&e),
                    interrupted: false,
                })
            });
            match &result {
                Ok(row) if opts.progress => {
                    eprintln!("{}", finished_line(i, n, &label, row, resumed, started))
                }
                Ok(_) => {}
                // Said once every child has stopped.
                Err(f) if f.interrupted => {}
                Err(f) => {
                    stop.store(true, Ordering::SeqCst);
                    if opts.progress {
                        eprintln!("[{}/{n}] {label}: failed: {}", i + 1, f.why);
                    }
                }
            }
            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
        };
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..opts.jobs.min(n)).map(|_| s.spawn(worker)).collect();
            // This thread passes a signal on to the children.
            while !workers.iter().all(|w| w.is_finished()) {
                if let Some(sig) = interrupter.received() {
                    stop.store(true, Ordering::SeqCst);
                    children.forward(sig);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut rows = Vec::new();
        let mut stopped = Vec::new();
        let mut failed = Vec::new();
        let mut not_started = 0;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(row)) => rows.push(row),
                Some(Err(f)) if f.interrupted => stopped.push(i),
                Some(Err(f)) => failed.push((i, f)),
                None => not_started += 1,
            }
        }
        if let Some(sig) = interrupter.received().filter(|_| rows.len() < n) {
            for (i, f) in &failed {
                eprintln!(
                    "sae: [{}/{n}] {}: failed: {}",
                    i + 1,
                    spec.label(&points[*i]),
                    f.why
                );
            }
            return Err(interrupted(sig, spec, points, out, &stopped));
        }
        let Some((i, first)) = failed.first() else {
            return Ok(rows);
        };
        let mut msg = format!(
            "sweep: point {}/{n} {} failed: {}",
            i + 1,
            spec.label(&points[*i]),
            first.why
        );
        if failed.len() > 1 {
            msg += &format!(" (and {} more failed)", failed.len() - 1);
        }
        if not_started > 0 {
            msg += &format!("; {not_started} point(s) not started");
        }
        msg += &format!(
            "; finished runs are kept in {}: fix the cause and re-run the sweep to go on",
            out.display()
        );
        if first.code == Some(2) {
            Err(user(msg))
        } else {
            Err(anyhow::anyhow!(msg))
        }
    }

    /// One point trained by a child process.
    struct Child<'a> {
        exe: &'a Path,
        cfg: &'a Config,
        out: &'a Path,
        name: &'a str,
        dir: &'a Path,
        /// Continue from the checkpoint in `dir`.
        resume: bool,
    }

    impl Child<'_> {
        /// Writes the point's config beside its run directory and trains it
        /// in a child process (known to `children` while it runs); the config
        /// file is removed once the run has finished.
        fn train(&self, children: &Children) -> std::result::Result<(), Failed> {
            let internal = |why: String| Failed {
                code: None,
                why,
                interrupted: false,
            };
            let config_path: PathBuf = self.out.join(format!(".{}.config.yaml", self.name));
            let yaml = self.cfg.to_yaml().map_err(|e| internal(e.to_string()))?;
            fsutil::write_bytes_atomic(&config_path, yaml.as_bytes()).map_err(|e| Failed {
                code: Some(crate::error::exit_code(&e)),
                why: crate::error::one_line(&e),
                interrupted: false,
            })?;
            let mut cmd = Command::new(self.exe);
            cmd.arg("train").arg("-q").arg("--config").arg(&config_path);
            match self.resume {
                true => cmd.arg("--resume").arg(self.dir),
                false => cmd.arg("--out").arg(self.dir).arg("--force"),
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            own_signals(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| internal(format!("cannot start {}: {e}", self.exe.display())))?;
            children.add(child.id());
            let mut stderr = Vec::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_end(&mut stderr);
            }
            children.remove(child.id());
            let status = child
                .wait()
                .map_err(|e| internal(format!("waiting for `sae train`: {e}")))?;
            let stderr = String::from_utf8_lossy(&stderr);
            if status.success() {
                let _ = std::fs::remove_file(&config_path);
                // Warnings of a finished run, tagged with their run.
                for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
                    eprintln!("[{}] {line}", self.name);
                }
                return Ok(());
            }
            let last = stderr
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| l.strip_prefix("sae: error: ").unwrap_or(l).to_string())
                .unwrap_or_else(|| format!("`sae train` exited with {status}"));
            // Checkpointed and exited 130 / 143, or killed by the signal
            // before it could.
            let interrupted = children.signalled().is_some()
                && matches!(status.code(), None | Some(130) | Some(143));
            Err(Failed {
                code: status.code(),
                why: last,
                interrupted,
            })
        }
    }

    /// The child gets signals from the sweep only: in its own process group
    /// a Ctrl-C at the terminal reaches the sweep alone, which forwards it
    /// once (a second signal would stop the child without its checkpoint).
    /// On Linux it also gets SIGTERM (and so checkpoints and stops) when the
    /// sweep dies, instead of training on unattended.
    fn own_signals(cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        stop_with_parent(cmd);
    }

    #[cfg(target_os = "linux")]
    fn stop_with_parent(cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe and touch no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn stop_with_parent(_cmd: &mut Command) {}
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

/// With `eval.encoder` omp|mp, the same measures with that pursuit encoder
/// (summary.json `pursuit`), after the model's own.
const PURSUIT_COLUMNS: [&str; 3] = ["pursuit_train_fvu", "pursuit_valid_fvu", "pursuit_l0"];

/// The pursuit the runs were measured with too ("omp k=10"), if any.
fn pursuit_label(rows: &[Row]) -> Option<String> {
    let of = |r: &Row| {
        let p = r.summary.get("pursuit")?;
        Some((
            p.get("encoder")?.as_str()?.to_string(),
            p.get("k")?.as_i64()?,
        ))
    };
    let (name, k) = rows.iter().find_map(of)?;
    Some(if rows.iter().filter_map(of).all(|(_, k2)| k2 == k) {
        format!("{name} k={k}")
    } else {
        format!("{name} (k: each run's eval.k, default model.k)")
    })
}

fn pursuit_cells(r: &Row) -> Vec<String> {
    let f = |split: &str, key: &str| {
        r.summary
            .get("pursuit")
            .and_then(|p| p.get(split)?.get(key)?.as_f64())
            .map(|v| format!("{v:.6}"))
            .unwrap_or_default()
    };
    vec![f("train", "fvu"), f("valid", "fvu"), f("train", "l0")]
}

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
    let pursuit = pursuit_label(rows);
    let extra: &[&str] = if pursuit.is_some() {
        &PURSUIT_COLUMNS
    } else {
        &[]
    };
    let header: Vec<String> = spec
        .grid
        .iter()
        .map(|(k, _)| k.clone())
        .chain(METRIC_COLUMNS.iter().chain(extra).map(|s| s.to_string()))
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
        let mut cells: Vec<String> = r.values.iter().cloned().chain(metric_cells(r)).collect();
        if pursuit.is_some() {
            cells.extend(pursuit_cells(r));
        }
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
    if let Some(p) = &pursuit {
        md += &format!(
            "pursuit_*: the same measures with codes from {p} over each run's decoder rows \
             (eval.encoder) instead of its own encoder.\n"
        );
    }
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
    let pursuit = pursuit_label(rows);
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
        let mut add = |key: String, point: (f64, f64)| match groups.iter_mut().find(|g| g.0 == key)
        {
            Some(g) => g.1.push(point),
            None => groups.push((key, vec![point])),
        };
        add(key.clone(), (r.l0(), r.fvu()));
        if let (Some(label), Some(p)) = (&pursuit, r.summary.get("pursuit")) {
            let m = |key: &str| p["train"][key].as_f64().unwrap_or(f64::NAN);
            add(format!("{key}, {label}"), (m("l0"), m("fvu")));
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
