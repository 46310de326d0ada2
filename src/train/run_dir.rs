//! The run directory, and the only part of training that writes files:
//! out-dir checks, `config.yaml` and the `--resume` comparison, the metrics
//! log, checkpoints, and at the end the model files, `summary.json` and plots.

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
}

/// Before anything is loaded: a run to resume must have a checkpoint, a
/// new run needs an empty (or `--force`d) directory.
pub fn check_can_start(opts: &TrainOptions) -> Result<()> {
    if opts.resume {
        checkpoint::read_position(&opts.out)?;
        return Ok(());
    }
    let out = &opts.out;
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

impl RunDir {
    /// Makes (or, resuming, reopens) the directory and writes the resolved
    /// `config.yaml`. A resumed run must have the run's own config.
    pub fn create(opts: &TrainOptions, cfg: &Config) -> Result<RunDir> {
        let out = &opts.out;
        if opts.resume {
            check_same_config(out, cfg)?;
        }
        if opts.force && !opts.resume && out.exists() {
            fs::remove_dir_all(out)
                .map_err(|e| user(format!("--out {}: cannot clear: {e}", out.display())))?;
        }
        fs::create_dir_all(out)
            .map_err(|e| user(format!("--out {}: cannot create: {e}", out.display())))?;
        fsutil::write_bytes_atomic(&out.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;
        Ok(RunDir { path: out.clone() })
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
            &mut learner.adam,
            &mut Buffers { since_fired },
        )
    }

    /// `metrics.jsonl` for appending: new, or (resuming) cut back to the
    /// lines up to the checkpoint's step, as if never interrupted.
    pub fn metrics_log(&self, resume_step: Option<i64>) -> Result<MetricsLog> {
        let path = self.path.join("metrics.jsonl");
        let file = match resume_step {
            Some(step) => {
                truncate_log(&path, step)?;
                OpenOptions::new().append(true).open(&path)
            }
            None => File::create(&path),
        }
        .map_err(|e| fsutil::write_error(&path, e))?;
        Ok(MetricsLog {
            out: BufWriter::new(file),
            path,
        })
    }

    /// Writes a checkpoint of `learner` at `state`'s position, after
    /// checking that every weight is finite, so the checkpoint on disk is
    /// always a good one.
    pub fn save_checkpoint(&self, learner: &Learner, state: &mut State) -> Result<()> {
        let pos = state.position(learner.adam.step);
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
        checkpoint::save(
            &self.path,
            &learner.model,
            &learner.adam,
            &Buffers {
                since_fired: &mut state.dead.since_fired,
            },
            &pos,
        )?;
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

/// `metrics.jsonl`: one JSON line per logged step.
pub struct MetricsLog {
    out: BufWriter<File>,
    path: PathBuf,
}

impl MetricsLog {
    pub fn write(&mut self, entry: &StepLog) -> Result<()> {
        serde_json::to_writer(&mut self.out, entry).map_err(|e| self.err(e.into()))?;
        self.out.write_all(b"\n").map_err(|e| self.err(e))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.err(e))
    }

    fn err(&self, e: std::io::Error) -> anyhow::Error {
        fsutil::write_error(&self.path, e)
    }
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

/// `--resume`: the config must be the run's own, except `train.epochs`.
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

/// The first key path (other than `train.epochs`) whose values differ.
fn first_difference(
    a: &serde_yaml::Value,
    b: &serde_yaml::Value,
    path: &str,
) -> Option<(String, String, String)> {
    use serde_yaml::Value;
    if path == "train.epochs" {
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
