//! The training loop: data in, run directory out. The model, the penalty and
//! the optimizer each live in their own module; this file only wires them.

use crate::config::{Auto, Config};
use crate::data::dataset::{epoch_order, read_order, Dataset};
use crate::data::npy;
use crate::error::user;
use crate::export::{self, RUN_MODEL_FILE};
use crate::metrics::{self, Metrics};
use crate::model::{ModelSpec, Sae};
use crate::normalize::Normalizer;
use crate::optim::Adam;
use crate::penalty::Penalty;
use crate::{bail_user, device, fsutil, Result};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::{self, File};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

pub struct TrainOptions {
    pub out: PathBuf,
    /// Replace an existing run directory.
    pub force: bool,
    /// Show a progress bar / progress lines on stderr.
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub steps: i64,
    pub epochs: i64,
    pub device: String,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub final_loss: f64,
    pub train: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<Metrics>,
}

/// Rows processed per evaluation batch (bounded memory, any data size).
const EVAL_BATCH: i64 = 4096;

/// Everything loaded and checked before the run directory is created, so a
/// run that fails validation leaves nothing behind.
struct Prepared {
    cfg: Config,
    device: Device,
    train: Tensor,
    valid: Option<Tensor>,
    truth: Option<Tensor>,
    /// `train.order`, read and checked.
    fixed_order: Option<Vec<Vec<i64>>>,
    model: Sae,
}

fn prepare(cfg: &Config) -> Result<Prepared> {
    let mut cfg = cfg.clone();
    let device = device::resolve(&cfg.device)?;
    device::set_threads(match cfg.train.threads {
        Auto::Auto => None,
        Auto::Value(n) => Some(n),
    });
    tch::manual_seed(cfg.seed as i64);

    let train_path = cfg.data.train.clone().expect("validated");
    let mut train = npy::read_tensor(&train_path).context("data.train")?;
    let d_in = train.size()[1];
    if let Auto::Value(d) = cfg.model.d_in {
        if d != d_in {
            bail_user!("model.d_in: {d} but {train_path} has {d_in} columns");
        }
    }
    cfg.model.d_in = Auto::Value(d_in);
    let mut valid = match &cfg.data.valid {
        Some(p) => {
            let v = npy::read_tensor(p).context("data.valid")?;
            if v.size()[1] != d_in {
                bail_user!(
                    "data.valid: {p} has {} columns but data.train has {d_in}",
                    v.size()[1]
                );
            }
            Some(v)
        }
        None => None,
    };
    if cfg.data.valid_fraction > 0.0 {
        let n = train.size()[0];
        if n < 2 {
            bail_user!("data.valid_fraction: {train_path} has {n} row(s), too few to split");
        }
        let (t, v) = Dataset::new(train, Device::Cpu).split(cfg.data.valid_fraction, cfg.seed);
        train = t.x;
        valid = Some(v.x);
    }
    let truth = match &cfg.data.truth {
        Some(p) => {
            let t = npy::read_tensor(p).context("data.truth")?;
            if t.size()[1] != d_in {
                bail_user!(
                    "data.truth: {p} has {} columns but the data has {d_in}",
                    t.size()[1]
                );
            }
            Some(t)
        }
        None => None,
    };

    let fixed_order = match &cfg.train.order {
        Some(p) => Some(read_order(p, train.size()[0] as usize, cfg.train.epochs)?),
        None => None,
    };
    let norm = Normalizer::fit(cfg.data.normalize, &train);
    let spec = ModelSpec::from_config(&cfg.model, d_in);
    let mut model = Sae::init(spec, cfg.model.init_scheme, norm, device);
    if let Some(init) = &cfg.model.init {
        load_init_weights(&mut model, Path::new(init))?;
    }
    Ok(Prepared {
        cfg,
        device,
        train,
        valid,
        truth,
        fixed_order,
        model,
    })
}

/// `model.init`: copies `W_enc`, `b_enc`, `W_dec`, `b_dec` from a
/// safetensors file (SAELens names and shapes) into a fresh model. The
/// architecture comes from the config; the shapes must agree with it.
fn load_init_weights(model: &mut Sae, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail_user!("model.init: {}: no such file", path.display());
    }
    let (mut t, _) = export::safetensors::read_all(path).context("model.init")?;
    let (d, h) = (model.spec.d_in, model.spec.d_hidden);
    let dev = model.device();
    let take = |t: &mut _, name: &str, shape: &[i64]| {
        export::safetensors::take(t, name, shape, path)
            .map(|x| x.to_device(dev))
            .context("model.init")
    };
    model.w_enc = take(&mut t, "W_enc", &[d, h])?;
    model.b_enc = take(&mut t, "b_enc", &[h])?;
    let w_dec = take(&mut t, "W_dec", &[h, d])?;
    if !model.spec.tied {
        model.w_dec = Some(w_dec);
    }
    model.b_dec = take(&mut t, "b_dec", &[d])?;
    Ok(())
}

/// Refuses to overwrite a previous run unless `force`.
fn check_out_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail_user!("--out {}: exists and is not a directory", out.display());
        }
        let non_empty = fs::read_dir(out)
            .map_err(|e| user(format!("--out {}: cannot read: {e}", out.display())))?
            .next()
            .is_some();
        if non_empty && !force {
            bail_user!(
                "--out {}: directory exists and is not empty; pass --force to replace it or choose another --out",
                out.display()
            );
        }
    }
    Ok(())
}

/// A step's scalars, read back from the device once per logged step.
#[derive(Serialize)]
struct StepLog {
    step: i64,
    epoch: i64,
    loss: f64,
    mse: f64,
    sparsity_loss: f64,
    l0: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_mse: Option<f64>,
}

/// Trains per `cfg` and writes the run directory `opts.out`.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<Summary> {
    check_out_dir(&opts.out, opts.force)?;
    let Prepared {
        cfg,
        device,
        train,
        valid,
        truth,
        fixed_order,
        mut model,
    } = prepare(cfg)?;

    if opts.force && opts.out.exists() {
        fs::remove_dir_all(&opts.out)
            .map_err(|e| user(format!("--out {}: cannot clear: {e}", opts.out.display())))?;
    }
    fs::create_dir_all(&opts.out)
        .map_err(|e| user(format!("--out {}: cannot create: {e}", opts.out.display())))?;
    fsutil::write_bytes_atomic(&opts.out.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;

    let data = Dataset::new(model.norm.apply(&train), device);
    let penalty = Penalty::from_config(&cfg.sparsity);
    let weight = cfg.sparsity.weight;
    let t = &cfg.train;
    model.set_requires_grad(true);
    let mut adam = Adam::new(&t.optimizer, &model.parameters());
    let valid_n = valid
        .as_ref()
        .map(|v| model.norm.apply(&v.to_device(device)));

    let log_file = File::create(opts.out.join("metrics.jsonl"))
        .with_context(|| format!("creating {}", opts.out.join("metrics.jsonl").display()))?;
    let mut log = BufWriter::new(log_file);

    let per_epoch = data.batch_count(t.batch_size) as u64;
    let total = per_epoch * t.epochs as u64;
    let tty = std::io::stderr().is_terminal();
    let pb = if opts.progress && tty {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    let line_every = (t.epochs / 20).max(1);
    let thr = model.spec.activation.active_threshold();

    let start = Instant::now();
    let mut step: i64 = 0;
    let mut last_loss = f64::NAN;
    let mut samples: i64 = 0;
    for epoch in 1..=t.epochs {
        let order = match &fixed_order {
            Some(o) => o[((epoch - 1) as usize).min(o.len() - 1)].clone(),
            None => epoch_order(data.rows(), cfg.seed, epoch, t.shuffle),
        };
        let n_batches = per_epoch as i64;
        for (b, xb) in data.batches(&order, t.batch_size).enumerate() {
            step += 1;
            samples += xb.size()[0];
            let z = model.encode_normalized(&xb);
            let xh = model.decode_normalized(&z);
            let mse = xh.mse_loss(&xb, Reduction::Mean);
            let sparsity = penalty.value(&z, &model.decoder_weight());
            let loss = &mse + &sparsity * weight;
            Adam::zero_grad(&mut model.parameters_mut());
            loss.backward();
            adam.step(&mut model.parameters_mut());

            let end_of_epoch = b as i64 + 1 == n_batches;
            if step % t.log_every == 0 || end_of_epoch {
                let loss_v = loss.double_value(&[]);
                if !loss_v.is_finite() {
                    bail_user!(
                        "training diverged: loss is {loss_v} at step {step} (epoch {epoch}); \
                         lower train.optimizer.lr or sparsity.weight"
                    );
                }
                last_loss = loss_v;
                let l0 = tch::no_grad(|| {
                    z.gt(thr)
                        .sum_dim_intlist(-1, false, Kind::Float)
                        .mean(Kind::Float)
                        .double_value(&[])
                });
                let valid_mse = match (&valid_n, end_of_epoch) {
                    (Some(v), true) => Some(valid_mse(&model, v)),
                    _ => None,
                };
                let entry = StepLog {
                    step,
                    epoch,
                    loss: loss_v,
                    mse: mse.double_value(&[]),
                    sparsity_loss: sparsity.double_value(&[]),
                    l0,
                    valid_mse,
                };
                serde_json::to_writer(&mut log, &entry)?;
                log.write_all(b"\n")?;
                pb.set_message(format!(
                    "epoch {epoch}/{} loss {loss_v:.5} l0 {l0:.1}",
                    t.epochs
                ));
                if end_of_epoch
                    && opts.progress
                    && !tty
                    && (epoch % line_every == 0 || epoch == t.epochs)
                {
                    let v = valid_mse
                        .map(|v| format!(" valid_mse {v:.5}"))
                        .unwrap_or_default();
                    eprintln!(
                        "epoch {epoch}/{}: loss {loss_v:.5} mse {:.5} l0 {l0:.2}{v}",
                        t.epochs, entry.mse
                    );
                }
            }
            pb.inc(1);
        }
        log.flush()?;
    }
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    log.flush()?;
    drop(log);

    model.set_requires_grad(false);
    export::safetensors::save(&model, &opts.out.join(RUN_MODEL_FILE))?;
    let target = cfg.sparsity.target;
    let train_m = metrics::evaluate(&model, &train, EVAL_BATCH, target, truth.as_ref());
    let valid_m = valid
        .as_ref()
        .map(|v| metrics::evaluate(&model, v, EVAL_BATCH, target, truth.as_ref()));
    let summary = Summary {
        steps: step,
        epochs: t.epochs,
        device: device::describe(device),
        seconds,
        samples_per_second: samples as f64 / seconds.max(1e-9),
        final_loss: last_loss,
        train: train_m,
        valid: valid_m,
    };
    let json = serde_json::to_string_pretty(&summary)?;
    fsutil::write_bytes_atomic(&opts.out.join("summary.json"), json.as_bytes())?;
    crate::report::run_plots(&opts.out, &model, &summary.train)?;
    Ok(summary)
}

fn valid_mse(model: &Sae, xn: &Tensor) -> f64 {
    let _guard = tch::no_grad_guard();
    let n = xn.size()[0];
    let mut sse = 0.0;
    let mut start = 0;
    while start < n {
        let len = EVAL_BATCH.min(n - start);
        let xb = xn.narrow(0, start, len);
        let xh = model.decode_normalized(&model.encode_normalized(&xb));
        sse += (xh - &xb).square().sum(Kind::Double).double_value(&[]);
        start += len;
    }
    sse / (n * xn.size()[1]) as f64
}

/// A small text table of train/valid metrics.
pub fn summary_table(s: &Summary) -> String {
    type Row = (&'static str, fn(&Metrics) -> Option<f64>);
    let mut rows: Vec<Row> = vec![
        ("mse", |m| Some(m.mse)),
        ("fvu", |m| Some(m.fvu)),
        ("explained_variance", |m| Some(m.explained_variance)),
        ("l0", |m| Some(m.l0)),
        ("dead_fraction", |m| Some(m.dead_fraction)),
        ("dense_fraction", |m| Some(m.dense_fraction)),
    ];
    if s.train.mmcs.is_some() {
        rows.push(("mmcs", |m| m.mmcs));
    }
    let fmt = |v: Option<f64>| match v {
        Some(v) => format!("{v:>12.5}"),
        None => format!("{:>12}", "-"),
    };
    let mut out = format!("{:<20}{:>12}{:>12}\n", "metric", "train", "valid");
    for (name, f) in rows {
        let v = s.valid.as_ref().and_then(f);
        out += &format!("{name:<20}{}{}\n", fmt(f(&s.train)), fmt(v));
    }
    out += &format!(
        "{} steps in {:.1} s ({:.0} samples/s) on {}\n",
        s.steps, s.seconds, s.samples_per_second, s.device
    );
    out
}
