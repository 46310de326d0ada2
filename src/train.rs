//! The training loop: data in, run directory out. The model, the penalty and
//! the optimizer each live in their own module; this file only wires them.

use crate::activation::Activation;
use crate::checkpoint::{self, Buffers, Position};
use crate::config::{Auto, BDecInit, BatchSize, Config, InputNoise, TrainConfig};
use crate::data::dataset::{block_shuffled_order, epoch_order, permutation, read_order, Dataset};
use crate::data::npy;
use crate::data::window::WindowReader;
use crate::error::user;
use crate::export::{self, RUN_MODEL_FILE};
use crate::metrics::{self, Metrics};
use crate::model::{ModelSpec, Sae};
use crate::normalize::Normalizer;
use crate::optim::Adam;
use crate::penalty::{Penalty, PenaltyInput};
use crate::schedule;
use crate::{bail_user, device, fsutil, Result};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

pub struct TrainOptions {
    pub out: PathBuf,
    /// Replace an existing run directory.
    pub force: bool,
    /// Show a progress bar / progress lines on stderr.
    pub progress: bool,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
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

/// data.stream: rows per contiguous block, and blocks mixed per window.
const STREAM_BLOCK_ROWS: usize = 4096;
const STREAM_WINDOW_BLOCKS: usize = 16;

/// Rows processed per evaluation batch (bounded memory, any data size).
const EVAL_BATCH: i64 = 4096;

/// Everything loaded and checked before the run directory is created, so a
/// run that fails validation leaves nothing behind.
struct Prepared {
    /// The mapping behind `train` with data.stream (dropped after training).
    _mapped: Option<crate::data::mmap::Mapped>,
    cfg: Config,
    device: Device,
    train: Tensor,
    valid: Option<Tensor>,
    /// `data.target` (and its validation rows): what a transcoder reconstructs.
    train_target: Option<Tensor>,
    valid_target: Option<Tensor>,
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
    let allow_nonfinite = cfg.data.allow_nonfinite;
    let read = |p: &str| {
        if allow_nonfinite {
            npy::read_tensor_allow_nonfinite(p)
        } else {
            npy::read_tensor(p)
        }
    };
    // data.stream: a view of the mapped file; `mapped` keeps the mapping alive.
    let mapped = match cfg.data.stream {
        true => Some(crate::data::mmap::map_npy(Path::new(&train_path)).context("data.train")?),
        false => None,
    };
    let mut train = match &mapped {
        Some(m) => m.tensor.shallow_clone(),
        None => read(&train_path).context("data.train")?,
    };
    let d_in = train.size()[1];
    if let Auto::Value(d) = cfg.model.d_in {
        if d != d_in {
            bail_user!("model.d_in: {d} but {train_path} has {d_in} columns");
        }
    }
    cfg.model.d_in = Auto::Value(d_in);
    let mut valid = match &cfg.data.valid {
        Some(p) => {
            let v = read(p).context("data.valid")?;
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
    let read_target = |key: &str, p: &str, rows: i64, of: &str| -> Result<Tensor> {
        let y = read(p).with_context(|| key.to_string())?;
        if y.size()[0] != rows {
            bail_user!(
                "{key}: {p} has {} rows but {of} has {rows}; the target must be row-aligned with it",
                y.size()[0]
            );
        }
        Ok(y)
    };
    let mut train_target = match &cfg.data.target {
        Some(p) => Some(read_target("data.target", p, train.size()[0], &train_path)?),
        None => None,
    };
    let d_out = train_target.as_ref().map_or(d_in, |y| y.size()[1]);
    let mut valid_target = match (&cfg.data.valid_target, &valid, &cfg.data.valid) {
        (Some(p), Some(v), Some(vp)) => {
            let y = read_target("data.valid_target", p, v.size()[0], vp)?;
            if y.size()[1] != d_out {
                bail_user!(
                    "data.valid_target: {p} has {} columns but data.target has {d_out}",
                    y.size()[1]
                );
            }
            Some(y)
        }
        _ => None,
    };
    if allow_nonfinite {
        (train, train_target) = drop_nonfinite(train, train_target, "data.train", &train_path)?;
        if let (Some(v), Some(vp)) = (valid, &cfg.data.valid) {
            let (v, vt) = drop_nonfinite(v, valid_target, "data.valid", vp)?;
            valid = Some(v);
            valid_target = vt;
        } else {
            valid = None;
        }
    }
    if cfg.data.valid_fraction > 0.0 {
        let n = train.size()[0];
        if n < 2 {
            bail_user!("data.valid_fraction: {train_path} has {n} row(s), too few to split");
        }
        // Split input and target together (same rows).
        let joined = match &train_target {
            Some(y) => Tensor::cat(&[train.to_kind(Kind::Float), y.to_kind(Kind::Float)], 1),
            None => train,
        };
        let (t, v) = Dataset::new(joined, Device::Cpu).split(cfg.data.valid_fraction, cfg.seed);
        train = t.x.narrow(1, 0, d_in);
        valid = Some(v.x.narrow(1, 0, d_in));
        if train_target.is_some() {
            train_target = Some(t.x.narrow(1, d_in, d_out));
            valid_target = Some(v.x.narrow(1, d_in, d_out));
        }
    }
    let truth = match &cfg.data.truth {
        Some(p) => {
            let t = npy::read_tensor(p).context("data.truth")?;
            if t.size()[1] != d_out {
                bail_user!(
                    "data.truth: {p} has {} columns but the reconstructed data has {d_out}",
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
    let norm = match &mapped {
        // One chunked pass (float64 sums) that also rejects non-finite rows.
        Some(_) => Normalizer::fit_chunked(cfg.data.normalize, &train, 8192, &train_path)
            .context("data.train")?,
        None => Normalizer::fit(cfg.data.normalize, &train),
    };
    let out_norm = train_target
        .as_ref()
        .map(|y| Normalizer::fit(cfg.data.normalize, &y.to_kind(Kind::Float)));
    let spec = ModelSpec::from_config(&cfg.model, d_in);
    let mut model = Sae::init(spec, &cfg.model, d_out, norm, out_norm, device);
    if let Some(init) = &cfg.model.init {
        if model.is_deep() {
            bail_user!("model.init: not supported for a deep model (model.hidden)");
        }
        load_init_weights(&mut model, Path::new(init))?;
    }
    if let Some(how) = cfg.model.b_dec_init {
        // In the space the decoder writes to: the (normalised) reconstruction target.
        let y = train_target.as_ref().unwrap_or(&train).to_kind(Kind::Float);
        let y = model.output_norm().apply(&y.to_device(device));
        model.b_dec = b_dec_init(how, &y, cfg.seed);
    }
    if cfg.train.unit_norm_decoder {
        normalize_decoder_rows(&mut model);
    }
    Ok(Prepared {
        cfg,
        device,
        _mapped: mapped,
        train,
        valid,
        train_target,
        valid_target,
        truth,
        fixed_order,
        model,
    })
}

/// `data.allow_nonfinite`: drops the rows of `x` (and of its row-aligned
/// target) that hold NaN or Inf, with a warning; refuses data left empty.
fn drop_nonfinite(
    x: Tensor,
    y: Option<Tensor>,
    key: &str,
    path: &str,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut keep = x.isfinite().all_dim(1, false);
    if let Some(y) = &y {
        keep = keep.logical_and(&y.isfinite().all_dim(1, false));
    }
    let n = x.size()[0];
    let kept = keep.sum(Kind::Int64).int64_value(&[]);
    if kept == n {
        return Ok((x, y));
    }
    if kept == 0 {
        bail_user!("{key}: {path}: every one of its {n} rows holds NaN or Inf");
    }
    eprintln!(
        "sae: warning: {key}: {path}: dropped {} of {n} rows holding NaN or Inf (data.allow_nonfinite)",
        n - kept
    );
    let idx = keep.nonzero().squeeze_dim(1);
    Ok((x.index_select(0, &idx), y.map(|y| y.index_select(0, &idx))))
}

/// Rows used to estimate `b_dec` (a seeded subset of larger data).
const B_DEC_INIT_ROWS: usize = 100_000;

/// `model.b_dec_init` on (normalised) rows `y [n, d]`.
fn b_dec_init(how: BDecInit, y: &Tensor, seed: u64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = y.size()[0] as usize;
    let y = if n > B_DEC_INIT_ROWS {
        let idx = &permutation(n, seed ^ 0xB_DEC)[..B_DEC_INIT_ROWS];
        y.index_select(0, &Tensor::from_slice(idx).to_device(y.device()))
    } else {
        y.shallow_clone()
    };
    match how {
        BDecInit::Zeros => y.zeros_like().select(0, 0).contiguous(),
        BDecInit::Mean => y.mean_dim(0, false, Kind::Float),
        BDecInit::GeometricMedian => geometric_median(&y).to_kind(Kind::Float),
    }
}

/// The geometric median of the rows of `points` (Weiszfeld's algorithm, as
/// SAELens `compute_geometric_median`: at most 100 iterations, stop when the
/// objective changes by less than 1e-20 of itself), in float64.
pub fn geometric_median(points: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    const EPS: f64 = 1e-6;
    const MAXITER: usize = 100;
    const FTOL: f64 = 1e-20;
    let p = points.to_kind(Kind::Double);
    let weighted_average = |w: &Tensor| {
        (&p * w.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Double) / w.sum(Kind::Double)
    };
    let objective = |m: &Tensor| {
        (&p - m)
            .norm_scalaropt_dim(2, [1], false)
            .sum(Kind::Double)
            .double_value(&[])
    };
    let ones = Tensor::ones([p.size()[0]], (Kind::Double, p.device()));
    let mut median = weighted_average(&ones);
    let mut obj = objective(&median);
    for _ in 0..MAXITER {
        let norms = (&p - &median).norm_scalaropt_dim(2, [1], false);
        let w = norms.clamp_min(EPS).reciprocal();
        median = weighted_average(&w);
        let prev = obj;
        obj = objective(&median);
        if (prev - obj).abs() <= FTOL * obj {
            break;
        }
    }
    median
}

/// The decoder rows as a tensor and the dimension along which a row's
/// entries lie: `(W_dec, 1)`, or `(W_enc, 0)` when tied (rows are columns).
fn decoder_rows(model: &mut Sae) -> (&mut Tensor, i64) {
    match &mut model.w_dec {
        Some(w) => (w, 1),
        None => (&mut model.w_enc, 0),
    }
}

/// Scales every decoder row to unit L2 norm, in place.
pub fn normalize_decoder_rows(model: &mut Sae) {
    let _guard = tch::no_grad_guard();
    let (w, dim) = decoder_rows(model);
    let norms = w.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12);
    let _ = w.g_div_(&norms);
}

/// Removes from the decoder's gradient its component along each (unit)
/// decoder row, so an update moves rows along the unit sphere.
pub fn remove_parallel_gradient(model: &mut Sae) {
    let _guard = tch::no_grad_guard();
    let (w, dim) = decoder_rows(model);
    let mut g = w.grad();
    if !g.defined() {
        return;
    }
    let unit = &*w / w.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12);
    let parallel = (&g * &unit).sum_dim_intlist(dim, true, Kind::Float);
    let _ = g.g_sub_(&(parallel * unit));
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (torch `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &mut [&mut Tensor], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    // Python's `max_norm / (total + 1e-6)` on a tensor is reciprocal() * max_norm.
    let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    for mut g in grads {
        let _ = g.g_mul_(&coef);
    }
    total.double_value(&[])
}

/// Steps since each latent last fired (on a training batch).
struct DeadTracker {
    since_fired: Tensor,
    window: i64,
}

impl DeadTracker {
    fn new(d_hidden: i64, window: i64, device: Device) -> DeadTracker {
        DeadTracker {
            since_fired: Tensor::zeros([d_hidden], (Kind::Int64, device)),
            window,
        }
    }

    /// Latents that have not fired for more than `window` steps (SAELens's rule).
    fn dead(&self) -> Tensor {
        self.since_fired.gt(self.window)
    }

    fn update(&mut self, z: &Tensor, active_threshold: f64) {
        let _guard = tch::no_grad_guard();
        // max > t, not (z > t).any(0): no [batch, d_hidden] temporary.
        let fired = z.amax(0, false).gt(active_threshold);
        let _ = self.since_fired.g_add_scalar_(1);
        let _ = self.since_fired.masked_fill_(&fired, 0);
    }
}

/// `train.input_noise` applied to a batch (the reconstruction target stays clean).
fn corrupt(x: &Tensor, t: &TrainConfig) -> Tensor {
    match t.input_noise {
        InputNoise::None => x.shallow_clone(),
        InputNoise::Gaussian => x + x.randn_like() * t.noise_level,
        InputNoise::Mask => {
            let keep = x.empty_like().bernoulli_float_(1.0 - t.noise_level);
            x * keep
        }
    }
}

/// Re-initialises dead latents (Anthropic's recipe, simplified): each takes
/// the direction of an input of the batch drawn with probability
/// proportional to its squared reconstruction error; its decoder row is that
/// direction (of the mean live decoder norm), its encoder column the same
/// direction scaled to 0.2 x the mean live encoder norm, its encoder bias 0,
/// and Adam's moments for it are reset. Returns how many were resampled.
fn resample_dead(
    model: &mut Sae,
    adam: &mut Adam,
    dead: &Tensor,
    input: &Tensor,
    target: &Tensor,
    recon: &Tensor,
) -> i64 {
    let _guard = tch::no_grad_guard();
    let idx = dead.nonzero().squeeze_dim(1);
    let n_dead = idx.size()[0];
    if n_dead == 0 {
        return 0;
    }
    let err = (recon.detach() - target)
        .square()
        .sum_dim_intlist(1, false, Kind::Float);
    let probs = err.square();
    let probs = if probs.sum(Kind::Double).double_value(&[]) > 0.0 {
        probs
    } else {
        probs.ones_like()
    };
    let rows = probs.multinomial(n_dead, true);
    let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    let enc_dir = unit(input.index_select(0, &rows));
    let dec_dir = unit(target.index_select(0, &rows));
    let alive = dead.logical_not();
    let any_alive = alive.any().int64_value(&[]) != 0;
    let mean_norm = |norms: Tensor| {
        if any_alive {
            norms.masked_select(&alive).mean(Kind::Float)
        } else {
            norms.mean(Kind::Float)
        }
    };
    let enc_norm = mean_norm(model.w_enc.norm_scalaropt_dim(2, [0], false)) * 0.2;
    let new_cols = (enc_dir * enc_norm).tr();
    let _ = model.w_enc.index_copy_(1, &idx, &new_cols);
    let _ = model.b_enc.index_fill_(0, &idx, 0.0);
    if let Some(w_dec) = &mut model.w_dec {
        let dec_norm = mean_norm(w_dec.norm_scalaropt_dim(2, [1], false));
        let _ = w_dec.index_copy_(0, &idx, &(dec_dir * dec_norm));
    }
    // Adam moments of the touched slices: W_enc columns, b_enc, W_dec rows.
    let dims: Vec<i64> = if model.w_dec.is_some() {
        vec![1, 0, 0]
    } else {
        vec![1, 0]
    };
    for (i, dim) in dims.into_iter().enumerate() {
        let _ = adam.exp_avg[i].index_fill_(dim, &idx, 0.0);
        let _ = adam.exp_avg_sq[i].index_fill_(dim, &idx, 0.0);
    }
    if let Some(g) = &mut model.gate {
        // Gated models are untied and have no threshold: r_mag and b_mag
        // follow W_enc, b_enc, W_dec, b_dec in the parameter list.
        let _ = g.r_mag.index_fill_(0, &idx, 0.0);
        let _ = g.b_mag.index_fill_(0, &idx, 0.0);
        for i in [4, 5] {
            let _ = adam.exp_avg[i].index_fill_(0, &idx, 0.0);
            let _ = adam.exp_avg_sq[i].index_fill_(0, &idx, 0.0);
        }
    }
    n_dead
}

/// `model.init`: copies `W_enc`, `b_enc`, `W_dec`, `b_dec` into a fresh
/// model from any format `--model` takes (run directory, `.safetensors`,
/// TorchScript file, SAELens directory) or a bare safetensors file holding
/// those four tensors (SAELens names and shapes). The architecture comes from
/// the config; the shapes must agree with it.
fn load_init_weights(model: &mut Sae, path: &Path) -> Result<()> {
    if !path.exists() {
        bail_user!("model.init: {}: no such file", path.display());
    }
    let w = export::load_weights(&path.to_string_lossy()).context("model.init")?;
    let (d, h) = (model.spec.d_in, model.spec.d_hidden);
    let dev = model.device();
    let fit = |t: Tensor, name: &str, shape: &[i64]| -> Result<Tensor> {
        if t.size() != shape {
            bail_user!(
                "model.init: {}: `{name}` has shape {:?}, but the configured model needs {:?}",
                path.display(),
                t.size(),
                shape
            );
        }
        Ok(t.to_device(dev))
    };
    model.w_enc = fit(w.w_enc, "W_enc", &[d, h])?;
    model.b_enc = fit(w.b_enc, "b_enc", &[h])?;
    let w_dec = fit(w.w_dec, "W_dec", &[h, model.d_out()])?;
    if !model.spec.tied {
        model.w_dec = Some(w_dec);
    }
    model.b_dec = fit(w.b_dec, "b_dec", &[model.d_out()])?;
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
    /// The learning rate and sparsity weight this step used (schedules).
    lr: f64,
    sparsity_weight: f64,
    /// Gated models: the gate's own reconstruction loss (added unweighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    aux_loss: Option<f64>,
    /// Latents that have not fired on a training batch for `train.dead_window` steps.
    dead: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_mse: Option<f64>,
}

/// Trains per `cfg` and writes the run directory `opts.out`.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<Summary> {
    if opts.resume {
        // Fail fast (before loading data) when there is nothing to resume.
        checkpoint::read_position(&opts.out)?;
    } else {
        check_out_dir(&opts.out, opts.force)?;
    }
    let Prepared {
        cfg,
        device,
        _mapped,
        train,
        valid,
        train_target,
        valid_target,
        truth,
        fixed_order,
        mut model,
    } = prepare(cfg)?;

    let t = &cfg.train;
    let d_in = model.spec.d_in;
    let d_out = model.d_out();
    // Input and target side by side, so one batch order serves both.
    let joined = |x: &Tensor, y: Option<&Tensor>| -> Tensor {
        let xn = model.norm.apply(&x.to_kind(Kind::Float).to_device(device));
        match y {
            Some(y) => {
                let yn = model
                    .output_norm()
                    .apply(&y.to_kind(Kind::Float).to_device(device));
                Tensor::cat(&[xn, yn], 1)
            }
            None => xn,
        }
    };
    // In memory: normalise once. Streamed: keep the mapped rows and normalise
    // each batch as it is gathered, so nothing of the file's size is copied.
    let stream_norm = cfg.data.stream.then(|| model.norm.clone());
    let stream_src = match (&_mapped, cfg.data.stream) {
        (Some(m), true) => {
            Some(m.row_file(Path::new(cfg.data.train.as_deref().expect("validated"))))
        }
        _ => None,
    };
    let data = if stream_norm.is_some() {
        Dataset {
            x: train.shallow_clone(),
        }
    } else {
        Dataset::new(joined(&train, train_target.as_ref()), device)
    };
    let valid_n = valid.as_ref().map(|v| joined(v, valid_target.as_ref()));
    let per_epoch = data.batch_count(t.batch_size) as u64;
    let total = per_epoch * t.epochs as u64;
    if t.lr_warmup_steps + t.lr_decay_steps > total as i64 {
        bail_user!(
            "train.lr_warmup_steps + train.lr_decay_steps: {} + {} exceeds the run's {total} steps",
            t.lr_warmup_steps,
            t.lr_decay_steps
        );
    }
    if t.resample_every > 0 && model.is_deep() {
        bail_user!("train.resample_every: not supported for a deep model (model.hidden)");
    }
    if opts.resume {
        check_same_config(&opts.out, &cfg)?;
    }

    if opts.force && !opts.resume && opts.out.exists() {
        fs::remove_dir_all(&opts.out)
            .map_err(|e| user(format!("--out {}: cannot clear: {e}", opts.out.display())))?;
    }
    fs::create_dir_all(&opts.out)
        .map_err(|e| user(format!("--out {}: cannot create: {e}", opts.out.display())))?;
    fsutil::write_bytes_atomic(&opts.out.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;

    let penalty = Penalty::from_config(&cfg.sparsity, &cfg.model, d_out);
    let weight = cfg.sparsity.weight;
    model.set_requires_grad(true);
    let mut adam = Adam::new(&t.optimizer, &model.parameters());
    let mut dead = DeadTracker::new(model.spec.d_hidden, t.dead_window, device);
    let pos = if opts.resume {
        let pos = checkpoint::load(
            &opts.out,
            &mut model,
            &mut adam,
            &mut Buffers {
                since_fired: &mut dead.since_fired,
            },
        )?;
        if pos.step > total as i64 {
            bail_user!(
                "train.epochs: {} epochs make {total} steps, fewer than the {} the checkpoint in {} has done",
                t.epochs,
                pos.step,
                opts.out.display()
            );
        }
        pos
    } else {
        Position {
            step: 0,
            epoch: 1,
            batch: 0,
            samples: 0,
            adam_step: 0,
            last_loss: None,
        }
    };

    let log_path = opts.out.join("metrics.jsonl");
    let log_err = |e: std::io::Error| fsutil::write_error(&log_path, e);
    let log_file = if opts.resume {
        // As if uninterrupted: the lines up to the checkpoint, then ours.
        truncate_log(&log_path, pos.step)?;
        OpenOptions::new().append(true).open(&log_path)
    } else {
        File::create(&log_path)
    }
    .map_err(log_err)?;
    let mut log = BufWriter::new(log_file);
    let signals = SignalFlags::register()?;

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
    let is_jumprelu = matches!(model.spec.activation, Activation::JumpRelu { .. });
    let topk_threshold_lr = match model.spec.activation {
        Activation::BatchTopK { .. } => Some(cfg.model.topk_threshold_lr),
        _ => None,
    };

    let mut step: i64 = pos.step;
    let mut last_loss = pos.last_loss.unwrap_or(f64::NAN);
    let mut samples: i64 = pos.samples;
    // The step of the newest checkpoint on disk (-1: none yet).
    let mut saved_step: i64 = if opts.resume { pos.step } else { -1 };
    // Input noise and resampling draw random numbers: libtorch is re-seeded
    // from (seed, step) before each step, so a resumed run draws the same.
    let uses_rng = t.input_noise != InputNoise::None || t.resample_every > 0;
    let batch_rows = match t.batch_size {
        BatchSize::Full => data.rows(),
        BatchSize::Rows(b) => b as usize,
    };
    // Tiny models: MKL single-threaded (see device::SerialBlas).
    let widest = model.spec.d_hidden * d_in.max(d_out) * batch_rows as i64;
    let _serial_blas =
        (device == Device::Cpu && widest < device::SMALL_MATMUL_WORK).then(device::SerialBlas::new);
    let order_of = |epoch: i64| -> Vec<i64> {
        match &fixed_order {
            Some(o) => o[((epoch - 1) as usize).min(o.len() - 1)].clone(),
            // Streamed data: shuffle within windows of contiguous blocks, so
            // reads stay near-sequential (see block_shuffled_order).
            None if stream_norm.is_some() && t.shuffle => block_shuffled_order(
                data.rows(),
                cfg.seed,
                epoch,
                STREAM_BLOCK_ROWS,
                STREAM_WINDOW_BLOCKS,
            ),
            None => epoch_order(data.rows(), cfg.seed, epoch, t.shuffle),
        }
    };
    let window_rows = STREAM_BLOCK_ROWS * STREAM_WINDOW_BLOCKS;
    // Streamed: a reader thread reads each epoch ahead, window by window.
    // Each next epoch's starts during the last window of the one before, so
    // only the run's very first window is waited for, before the loop (as
    // in-memory data is loaded before it).
    let start_reader = |order: Vec<i64>| {
        stream_src
            .as_ref()
            .map(|src| WindowReader::start(src, order, STREAM_BLOCK_ROWS, window_rows))
    };
    // Each epoch's order is drawn once: by whoever needs it first.
    let mut next_order = Some(order_of(pos.epoch));
    let resume_at = |order: &[i64]| (pos.batch as usize * batch_rows).min(order.len());
    let mut next_reader = next_order
        .as_ref()
        .and_then(|o| start_reader(o[resume_at(o)..].to_vec()));
    if let Some(r) = next_reader.as_mut() {
        r.prime()?;
    }
    let start = Instant::now();
    pb.set_position(pos.step as u64);
    for epoch in pos.epoch..=t.epochs {
        let order = next_order.take().unwrap_or_else(|| order_of(epoch));
        let n_batches = per_epoch as i64;
        let first = if epoch == pos.epoch {
            pos.batch as usize
        } else {
            0
        };
        let rest = match first {
            0 => &order[..],
            _ => &order[resume_at(&order)..],
        };
        let batch_rows_n = match t.batch_size {
            BatchSize::Full => rest.len().max(1),
            BatchSize::Rows(r) => r as usize,
        };
        let mut reader = next_reader.take();
        let mut in_memory = reader.is_none().then(|| data.batches(rest, t.batch_size));
        for i in 0..rest.len().div_ceil(batch_rows_n) {
            let left = rest.len() - i * batch_rows_n;
            if reader.is_some() && next_reader.is_none() && epoch < t.epochs && left <= window_rows
            {
                let o = order_of(epoch + 1);
                next_reader = start_reader(o.clone());
                next_order = Some(o);
            }
            let batch = match (&mut reader, &mut in_memory, &stream_norm) {
                (Some(r), _, Some(n)) => {
                    n.apply(&r.next_batch(batch_rows_n.min(left))?.to_device(device))
                }
                (_, Some(m), _) => m.next().expect("one batch per chunk of the order"),
                _ => unreachable!("streamed runs have a reader, others batches"),
            };
            let b = first + i;
            step += 1;
            samples += batch.size()[0];
            if uses_rng {
                tch::manual_seed(step_seed(cfg.seed, step));
            }
            let (xb, target) = if train_target.is_some() {
                (batch.narrow(1, 0, d_in), batch.narrow(1, d_in, d_out))
            } else {
                (batch.shallow_clone(), batch)
            };
            let lr = schedule::lr_at(t, step, total as i64);
            let w_s = schedule::sparsity_weight_at(weight, cfg.sparsity.warmup_steps, step);
            if is_jumprelu {
                // SAELens: thresholds stay >= 0 (projected before each forward pass).
                let _guard = tch::no_grad_guard();
                let _ = model.threshold.as_mut().unwrap().clamp_min_(0.0);
            }
            let input = corrupt(&xb, t);
            let f = model.forward_train_fast(&input, !penalty.needs_pre_gradient());
            let mse = f.recon.mse_loss(&target, Reduction::Mean);
            // Gated: the penalty acts on the gate, relu(pi_gate), not the codes.
            let gate_codes = model.gate_codes(&input);
            let dead_mask = penalty.needs_dead_mask().then(|| dead.dead());
            let w_dec = model.decoder_weight();
            let sparsity = penalty.value(&PenaltyInput {
                z: gate_codes.as_ref().unwrap_or(&f.z),
                pre: &f.pre,
                target: &target,
                recon: &f.recon,
                w_dec: &w_dec,
                threshold: model.threshold.as_ref(),
                dead: dead_mask.as_ref(),
                relu_codes: gate_codes.is_none()
                    && matches!(model.spec.activation, Activation::Relu),
            });
            // Gated: the gate alone must reconstruct too (SAELens's auxiliary loss).
            let aux = gate_codes.as_ref().map(|g| {
                (model.decode_normalized(g) - &target)
                    .square()
                    .mean(Kind::Float)
            });
            let loss = match &aux {
                Some(a) => &mse + &sparsity * w_s + a,
                None => &mse + &sparsity * w_s,
            };
            dead.update(&f.z, thr);
            if let Some(rate) = topk_threshold_lr {
                update_topk_threshold(&mut model, &f.z, rate);
            }
            adam.zero_grad(&mut model.parameters_mut());
            loss.backward();
            if t.unit_norm_decoder {
                remove_parallel_gradient(&mut model);
            }
            if let Some(max_norm) = t.grad_clip {
                clip_grad_norm(&mut model.parameters_mut(), max_norm);
            }
            adam.cfg.lr = lr;
            adam.step(&mut model.parameters_mut());
            if t.unit_norm_decoder {
                normalize_decoder_rows(&mut model);
            }
            if t.resample_every > 0 && step % t.resample_every == 0 {
                let d = dead.dead();
                let n = resample_dead(&mut model, &mut adam, &d, &input, &target, &f.recon);
                if n > 0 {
                    let _ = dead.since_fired.masked_fill_(&d, 0);
                }
            }

            let end_of_epoch = b as i64 + 1 == n_batches;
            if step % t.log_every == 0 || end_of_epoch {
                let loss_v = loss.double_value(&[]);
                if !loss_v.is_finite() {
                    bail_user!(
                        "training diverged: loss is {loss_v} at step {step} (epoch {epoch}); {}; \
                         lower train.optimizer.lr or sparsity.weight",
                        kept_checkpoint(&opts.out, saved_step)
                    );
                }
                last_loss = loss_v;
                let l0 = tch::no_grad(|| {
                    f.z.gt(thr)
                        .sum_dim_intlist(-1, false, Kind::Float)
                        .mean(Kind::Float)
                        .double_value(&[])
                });
                let valid_mse = match (&valid_n, end_of_epoch) {
                    (Some(v), true) => Some(valid_mse(&model, v, d_in)),
                    _ => None,
                };
                let entry = StepLog {
                    step,
                    epoch,
                    loss: loss_v,
                    mse: mse.double_value(&[]),
                    sparsity_loss: sparsity.double_value(&[]),
                    l0,
                    lr,
                    sparsity_weight: w_s,
                    aux_loss: aux.as_ref().map(|a| a.double_value(&[])),
                    dead: dead.dead().sum(Kind::Int64).int64_value(&[]),
                    valid_mse,
                };
                serde_json::to_writer(&mut log, &entry).map_err(|e| log_err(e.into()))?;
                log.write_all(b"\n").map_err(log_err)?;
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
            let signal = signals.received();
            if step % t.checkpoint_every == 0 || signal.is_some() {
                let next = if end_of_epoch {
                    (epoch + 1, 0)
                } else {
                    (epoch, b as i64 + 1)
                };
                log.flush().map_err(log_err)?;
                let pos = Position {
                    step,
                    epoch: next.0,
                    batch: next.1,
                    samples,
                    adam_step: adam.step,
                    last_loss: last_loss.is_finite().then_some(last_loss),
                };
                save_checkpoint(&opts.out, &model, &adam, &mut dead, &pos, saved_step)?;
                saved_step = step;
            }
            if let Some(sig) = signal {
                pb.finish_and_clear();
                let (name, code) = match sig {
                    signal_hook::consts::SIGINT => ("SIGINT", 130),
                    _ => ("SIGTERM", 143),
                };
                return Err(anyhow::Error::new(crate::error::Interrupted {
                    code,
                    msg: format!(
                        "interrupted by {name} after step {step} of {total}; checkpoint saved in {}; \
                         continue with: sae train --resume {}",
                        checkpoint::path(&opts.out).display(),
                        opts.out.display()
                    ),
                }));
            }
        }
        log.flush().map_err(log_err)?;
    }
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    log.flush().map_err(log_err)?;
    drop(log);
    drop(signals);
    if saved_step != step {
        let pos = Position {
            step,
            epoch: t.epochs + 1,
            batch: 0,
            samples,
            adam_step: adam.step,
            last_loss: last_loss.is_finite().then_some(last_loss),
        };
        save_checkpoint(&opts.out, &model, &adam, &mut dead, &pos, saved_step)?;
    }

    // Own storage per parameter again before anything saves the model.
    adam.unflatten(&mut model.parameters_mut());
    model.set_requires_grad(false);
    if is_jumprelu {
        // The last step may leave a threshold below 0; at inference that acts
        // as 0 (relu(pre) * (pre > t)), so save it projected.
        let _ = model.threshold.as_mut().unwrap().clamp_min_(0.0);
    }
    export::safetensors::save(&model, &opts.out.join(RUN_MODEL_FILE))?;
    export::torchscript::save(&model, &opts.out.join(export::RUN_TORCHSCRIPT_FILE))?;
    let target = cfg.sparsity.target;
    let train_m = metrics::evaluate_target(
        &model,
        &train,
        train_target.as_ref(),
        EVAL_BATCH,
        target,
        truth.as_ref(),
    );
    let valid_m = valid.as_ref().map(|v| {
        metrics::evaluate_target(
            &model,
            v,
            valid_target.as_ref(),
            EVAL_BATCH,
            target,
            truth.as_ref(),
        )
    });
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

/// libtorch's seed for training step `step` (SplitMix64 of seed and step).
fn step_seed(seed: u64, step: i64) -> i64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// What the divergence message says about the checkpoint on disk.
fn kept_checkpoint(run: &Path, saved_step: i64) -> String {
    if saved_step > 0 {
        format!(
            "the last good checkpoint (step {saved_step}) is kept in {}",
            checkpoint::path(run).display()
        )
    } else {
        "no checkpoint was written before it".to_string()
    }
}

/// Writes a checkpoint after checking that every weight is finite, so the
/// checkpoint on disk is always a good one.
fn save_checkpoint(
    run: &Path,
    model: &Sae,
    adam: &Adam,
    dead: &mut DeadTracker,
    pos: &Position,
    saved_step: i64,
) -> Result<()> {
    let finite = tch::no_grad(|| {
        model
            .parameters()
            .iter()
            .all(|p| p.isfinite().all().int64_value(&[]) != 0)
    });
    if !finite {
        bail_user!(
            "training diverged: a weight is NaN or infinite after step {} (epoch {}); {}; \
             lower train.optimizer.lr or sparsity.weight",
            pos.step,
            model_epoch_hint(pos),
            kept_checkpoint(run, saved_step)
        );
    }
    checkpoint::save(
        run,
        model,
        adam,
        &Buffers {
            since_fired: &mut dead.since_fired,
        },
        pos,
    )
}

/// The epoch the last step belonged to (`pos` points at the next one).
fn model_epoch_hint(pos: &Position) -> i64 {
    if pos.batch == 0 {
        pos.epoch - 1
    } else {
        pos.epoch
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

/// SIGINT / SIGTERM while training: the loop finishes its step, checkpoints
/// and stops. A second signal exits at once. Handlers are removed on drop.
struct SignalFlags {
    which: Arc<AtomicUsize>,
    ids: Vec<signal_hook::SigId>,
}

impl SignalFlags {
    fn register() -> Result<SignalFlags> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let which = Arc::new(AtomicUsize::new(0));
        let term = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            ids.push(flag::register_conditional_shutdown(
                sig,
                128 + sig,
                Arc::clone(&term),
            )?);
            ids.push(flag::register(sig, Arc::clone(&term))?);
            ids.push(flag::register_usize(sig, Arc::clone(&which), sig as usize)?);
        }
        Ok(SignalFlags { which, ids })
    }

    fn received(&self) -> Option<i32> {
        match self.which.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

impl Drop for SignalFlags {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// BatchTopK's inference threshold: an exponential moving average of the
/// smallest positive training code (SAELens `update_topk_threshold`, float64).
fn update_topk_threshold(model: &mut Sae, z: &Tensor, rate: f64) {
    let _guard = tch::no_grad_guard();
    let z = z.detach();
    let positive = z.gt(0.0);
    if positive.any().int64_value(&[]) == 0 {
        return;
    }
    let min_positive = z.masked_select(&positive).min().to_kind(Kind::Double);
    let t = model.threshold.as_mut().expect("batchtopk has a threshold");
    *t = &*t * (1.0 - rate) + min_positive * rate;
}

/// MSE on validation rows `joined` (normalised input, then the normalised
/// target for transcoders).
fn valid_mse(model: &Sae, joined: &Tensor, d_in: i64) -> f64 {
    let _guard = tch::no_grad_guard();
    let n = joined.size()[0];
    let d_out = model.d_out();
    let has_target = joined.size()[1] > d_in;
    let mut sse = 0.0;
    let mut start = 0;
    while start < n {
        let len = EVAL_BATCH.min(n - start);
        let b = joined.narrow(0, start, len);
        let xb = b.narrow(1, 0, d_in);
        let yb = if has_target {
            b.narrow(1, d_in, d_out)
        } else {
            xb.shallow_clone()
        };
        let xh = model.decode_normalized(&model.encode_normalized(&xb));
        sse += (xh - &yb).square().sum(Kind::Double).double_value(&[]);
        start += len;
    }
    sse / (n * d_out) as f64
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
