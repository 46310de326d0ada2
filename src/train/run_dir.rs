//! The run directory, and the only part of training that writes files:
//! out-dir checks, `config.yaml` and the `--resume` comparison, the metrics
//! log, checkpoints, and at the end the model files, `summary.json`, plots
//! and `report.html`.

use super::state::{Position, State};
use super::step::Learner;
use super::{Summary, TrainOptions};
use crate::checkpoint::{self, Buffers};
use crate::config::Config;
use crate::error::user;
use crate::export::{self, RUN_MODEL_FILE};
use crate::model::Sae;
use crate::{bail_user, fsutil, Result};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub path: PathBuf,
    /// This process writes the directory (rank 0 of a data-parallel run);
    /// the other ranks only read its checkpoint.
    pub writer: bool,
    /// Held while the run trains (the writer's).
    _lock: Option<RunLock>,
}

/// Before anything is loaded: no other run trains in the directory, a run
/// to resume has a checkpoint, and a new run gets an empty (or `--force`d)
/// directory (the writer checks).
pub fn check_can_start(opts: &TrainOptions, writer: bool) -> Result<()> {
    let out = &opts.out;
    // (The other ranks would see the lock of their own rank 0.)
    if let Some(holder) = RunLock::holder(out).filter(|_| writer) {
        let flag = if opts.resume { "--resume" } else { "--out" };
        bail_user!(
            "{flag} {}: another run is training in it ({holder}); wait for it to end{}",
            out.display(),
            if opts.resume {
                ""
            } else {
                " or choose another --out"
            }
        );
    }
    if opts.resume {
        checkpoint::read_position(out)?;
        return Ok(());
    }
    if !writer {
        return Ok(());
    }
    if out.exists() {
        if !out.is_dir() {
            bail_user!("--out {}: exists and is not a directory", out.display());
        }
        let non_empty = fs::read_dir(out)
            .map_err(|e| user(format!("--out {}: cannot read: {e}", out.display())))?
            .next()
            .is_some();
        if non_empty && !opts.force {
            bail_user!(
                "--out {}: directory exists and is not empty; pass --force to replace it or choose another --out",
                out.display()
            );
        }
    }
    Ok(())
}

/// `--resume` of a run that has done every step of `cfg.train.epochs` and
/// written its outputs: what to tell the user, and nothing is to be done
/// (not a file of the run touched). None for anything else: a run to go
/// on with (a larger `train.epochs`), one to finish writing, or one the
/// normal path refuses (a changed config, a lock held, fewer epochs).
pub fn finished(opts: &TrainOptions, cfg: &Config) -> Option<String> {
    let out = &opts.out;
    if !opts.resume || RunLock::holder(out).is_some() {
        return None;
    }
    let pos = checkpoint::read_position(out).ok()?;
    let done = pos.batch == 0 && pos.epoch == cfg.train.epochs + 1;
    // report.html is the last output a run writes.
    if !done
        || !["summary.json", "report.html"]
            .iter()
            .all(|f| out.join(f).is_file())
    {
        return None;
    }
    let saved = Config::from_file(&out.join("config.yaml"), &[]).ok()?;
    let mut now = cfg.clone();
    if let crate::config::Auto::Auto = now.model.d_in {
        now.model.d_in = saved.model.d_in; // resolved from the data
    }
    let (a, b) = (
        serde_yaml::to_value(&saved).ok()?,
        serde_yaml::to_value(&now).ok()?,
    );
    if first_difference(&a, &b, "").is_some() {
        return None;
    }
    let epochs = cfg.train.epochs;
    Some(format!(
        "--resume {}: the run is finished: {} of {} steps done ({epochs} of {epochs} epochs); \
         nothing to do, nothing changed. To train on, raise train.epochs: sae train --resume {} \
         --set train.epochs={}",
        out.display(),
        pos.step,
        pos.step,
        out.display(),
        epochs + 1
    ))
}

impl RunDir {
    /// The writer makes (or, resuming, reopens) the directory, locks it
    /// for the run and writes the resolved `config.yaml`. A resumed run must
    /// have the run's own config.
    pub fn create(opts: &TrainOptions, cfg: &Config, writer: bool) -> Result<RunDir> {
        let out = &opts.out;
        if opts.resume {
            check_same_config(out, cfg)?;
        }
        if !writer {
            return Ok(RunDir {
                path: out.clone(),
                writer,
                _lock: None,
            });
        }
        fs::create_dir_all(out)
            .map_err(|e| user(format!("--out {}: cannot create: {e}", out.display())))?;
        let lock = RunLock::acquire(out)?;
        if opts.force && !opts.resume {
            clear_except_lock(out)?;
        }
        fsutil::write_bytes_atomic(&out.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;
        Ok(RunDir {
            path: out.clone(),
            writer,
            _lock: Some(lock),
        })
    }

    /// Restores the checkpoint into `learner` and `state`'s dead-latent
    /// counters; returns its position.
    pub fn load_checkpoint(
        &self,
        learner: &mut Learner,
        since_fired: &mut tch::Tensor,
    ) -> Result<Position> {
        checkpoint::load(
            &self.path,
            &mut learner.model,
            &mut learner.opt,
            &mut Buffers {
                since_fired,
                anneal: learner.anneal.as_mut(),
            },
        )
    }

    /// `metrics.jsonl` for appending: new, or (resuming) cut back to the
    /// lines up to the checkpoint's step, as if never interrupted.
    pub fn metrics_log(&self, resume_step: Option<i64>) -> Result<MetricsLog> {
        let path = self.path.join("metrics.jsonl");
        if !self.writer {
            return Ok(MetricsLog { out: None, path });
        }
        let file = match resume_step {
            Some(step) => {
                truncate_log(&path, step)?;
                OpenOptions::new().append(true).open(&path)
            }
            None => File::create(&path),
        }
        .map_err(|e| fsutil::write_error(&path, e))?;
        Ok(MetricsLog {
            out: Some(BufWriter::new(file)),
            path,
        })
    }

    /// Writes a checkpoint of `learner` at `state`'s position, after
    /// checking that every weight is finite, so the checkpoint on disk is
    /// always a good one. Every rank checks (their weights are the same);
    /// the writer writes.
    pub fn save_checkpoint(&self, learner: &mut Learner, state: &mut State) -> Result<()> {
        let pos = state.position(learner.opt.steps());
        let finite = tch::no_grad(|| {
            learner
                .model
                .parameters()
                .iter()
                .all(|p| p.isfinite().all().int64_value(&[]) != 0)
        });
        if !finite {
            bail_user!(
                "training diverged: a weight is NaN or infinite after step {} (epoch {}); {}; \
                 lower train.optimizer.lr or sparsity.weight",
                pos.step,
                if pos.batch == 0 {
                    pos.epoch - 1
                } else {
                    pos.epoch
                },
                self.kept_checkpoint(state.saved_step)
            );
        }
        if self.writer {
            checkpoint::save(
                &self.path,
                &learner.model,
                &learner.opt,
                &Buffers {
                    since_fired: &mut state.dead.since_fired,
                    anneal: learner.anneal.as_mut(),
                },
                &pos,
            )?;
        }
        state.saved_step = state.step;
        Ok(())
    }

    /// What an error message says about the checkpoint on disk.
    pub fn kept_checkpoint(&self, saved_step: i64) -> String {
        if saved_step > 0 {
            format!(
                "the last good checkpoint (step {saved_step}) is kept in {}",
                checkpoint::path(&self.path).display()
            )
        } else {
            "no checkpoint was written before it".to_string()
        }
    }

    /// The trained model as `model.safetensors` and `model.pt`.
    pub fn save_model(&self, model: &Sae) -> Result<()> {
        export::safetensors::save(model, &self.path.join(RUN_MODEL_FILE))?;
        export::torchscript::save(model, &self.path.join(export::RUN_TORCHSCRIPT_FILE))
    }

    /// `summary.json` and the run's plots.
    pub fn save_summary(&self, model: &Sae, summary: &Summary) -> Result<()> {
        let json = serde_json::to_string_pretty(summary)?;
        fsutil::write_bytes_atomic(&self.path.join("summary.json"), json.as_bytes())?;
        crate::report::run_plots(&self.path, model, &summary.train)
    }

    /// `report.html`: one self-contained page of the run (after the plots).
    pub fn save_report(&self, model: &Sae, data: &super::plan::Data, cfg: &Config) -> Result<()> {
        let html = crate::report::run_report(&self.path, model, data, cfg.data.train.as_deref())?;
        fsutil::write_bytes_atomic(&self.path.join("report.html"), html.as_bytes())
    }
}

/// A step's scalars, read back from the device once per logged step.
#[derive(Serialize)]
pub struct StepLog {
    pub step: i64,
    pub epoch: i64,
    pub loss: f64,
    pub mse: f64,
    pub sparsity_loss: f64,
    pub l0: f64,
    /// The learning rate and sparsity weight this step used (schedules).
    pub lr: f64,
    pub sparsity_weight: f64,
    /// Gated models: the gate's own reconstruction loss (added unweighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Latents that have not fired on a training batch for `train.dead_window` steps.
    pub dead: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_mse: Option<f64>,
}

/// `metrics.jsonl`: one JSON line per logged step (nothing on ranks that
/// do not write).
pub struct MetricsLog {
    out: Option<BufWriter<File>>,
    path: PathBuf,
}

impl MetricsLog {
    pub fn write(&mut self, entry: &StepLog) -> Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let written = serde_json::to_writer(&mut *out, entry)
            .map_err(std::io::Error::from)
            .and_then(|_| out.write_all(b"\n"));
        written.map_err(|e| fsutil::write_error(&self.path, e))
    }

    pub fn flush(&mut self) -> Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush().map_err(|e| fsutil::write_error(&self.path, e)),
            None => Ok(()),
        }
    }
}

/// `RUN/.lock`: held (flock) by the process that trains in the directory,
/// so a second run into it, from this machine or another sharing the
/// filesystem, fails at once naming the holder. The kernel drops the lock
/// when its holder dies, so a killed run leaves nothing that blocks.
struct RunLock {
    file: File,
    path: PathBuf,
}

const LOCK_FILE: &str = ".lock";

impl RunLock {
    fn try_lock(file: &File) -> bool {
        use std::os::unix::io::AsRawFd;
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    /// Who holds the lock of `dir` now, if anyone.
    fn holder(dir: &Path) -> Option<String> {
        let path = dir.join(LOCK_FILE);
        let file = File::open(&path).ok()?;
        if Self::try_lock(&file) {
            return None;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        Some(match text.trim() {
            "" => "a process holds its .lock".to_string(),
            t => t.to_string(),
        })
    }

    fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| fsutil::write_error(&path, e))?;
        if !Self::try_lock(&file) {
            let holder = Self::holder(dir).unwrap_or_else(|| "another process".into());
            bail_user!(
                "--out {}: another run is training in it ({holder}); wait for it to end or choose another --out",
                dir.display()
            );
        }
        let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let me = format!("pid {} on {}\n", std::process::id(), host.trim());
        let mut f = &file;
        let _ = f.set_len(0).and_then(|_| f.write_all(me.as_bytes()));
        Ok(RunLock { file, path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Gone before the lock is released (when `file` closes).
        let _ = fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// `--force`: empties `dir` for a new run, keeping the lock this run holds.
fn clear_except_lock(dir: &Path) -> Result<()> {
    let clear = || -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name() == LOCK_FILE {
                continue;
            }
            let p = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    };
    clear().map_err(|e| user(format!("--out {}: cannot clear: {e}", dir.display())))
}

/// Keeps the complete lines of `metrics.jsonl` whose step is at most `step`.
fn truncate_log(path: &Path, step: i64) -> Result<()> {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fsutil::write_error(path, e)),
    };
    let mut keep = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a line cut short by a kill
        };
        if v["step"].as_i64().is_some_and(|s| s <= step) {
            keep.push_str(line);
            keep.push('\n');
        }
    }
    fsutil::write_bytes_atomic(path, keep.as_bytes())
}

/// `--resume`: the config must be the run's own, except `train.epochs` and
/// `dist` (a run may resume with another world size or timeout).
fn check_same_config(run: &Path, cfg: &Config) -> Result<()> {
    let saved_path = run.join("config.yaml");
    let saved = Config::from_file(&saved_path, &[])?;
    let a = serde_yaml::to_value(&saved)?;
    let b = serde_yaml::to_value(cfg)?;
    if let Some((key, was, now)) = first_difference(&a, &b, "") {
        bail_user!(
            "--resume {}: {key} is {was} in the run's config.yaml but {now} now; \
             a resumed run keeps its config (only train.epochs may change)",
            run.display()
        );
    }
    Ok(())
}

/// The first key path (other than `train.epochs` and `dist`) whose values differ.
fn first_difference(
    a: &serde_yaml::Value,
    b: &serde_yaml::Value,
    path: &str,
) -> Option<(String, String, String)> {
    use serde_yaml::Value;
    if path == "train.epochs" || path == "dist" {
        return None;
    }
    if let (Value::Mapping(ma), Value::Mapping(mb)) = (a, b) {
        let null = Value::Null;
        let keys = ma.keys().chain(mb.keys().filter(|k| !ma.contains_key(*k)));
        for k in keys {
            let name = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            let sub = if path.is_empty() {
                name
            } else {
                format!("{path}.{name}")
            };
            let d = first_difference(ma.get(k).unwrap_or(&null), mb.get(k).unwrap_or(&null), &sub);
            if d.is_some() {
                return d;
            }
        }
        return None;
    }
    if a == b {
        return None;
    }
    let show = |v: &Value| {
        serde_yaml::to_string(v)
            .unwrap_or_default()
            .trim()
            .replace('\n', " ")
    };
    Some((path.to_string(), show(a), show(b)))
}
