//! Everything resolved and checked before training starts: the data read
//! (or mapped), `d_in`/`d_out`, the model initialised, the steps counted and
//! the checks that need any of these. A plan that fails leaves nothing on
//! disk; everything after it can trust what it holds.

use super::batches::Source;
use super::init;
use super::memory::{self, DataSize};
use crate::config::{Auto, BatchSize, Config, DistBackend, PenaltyKind};
use crate::data::dataset::{read_order, Dataset};
use crate::data::mmap::Mapped;
use crate::data::npy;
use crate::lm::source::{self, ModelSource};
use crate::model::Sae;
use crate::{bail_user, device, dist, Result};
use anyhow::Context;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// The arrays of a run as read (not normalised).
pub struct Data {
    pub train: Tensor,
    pub valid: Option<Tensor>,
    /// `data.target` (and its validation rows): what a transcoder reconstructs.
    pub train_target: Option<Tensor>,
    pub valid_target: Option<Tensor>,
    pub truth: Option<Tensor>,
    /// data.stream: the mapping `train` is a view of.
    pub mapped: Option<Mapped>,
    /// data.model: the training rows' source; `train` then holds its first
    /// rows (a sample for normalisation, init and the final metrics).
    pub model_source: Option<Rc<ModelSource>>,
}

pub struct Plan {
    /// The config with everything resolved (`model.d_in` filled in).
    pub cfg: Config,
    /// Data-parallel ranks (1: a single process).
    pub world: usize,
    pub device: Device,
    pub data: Data,
    /// `train.order`, read and checked.
    pub fixed_order: Option<Vec<Vec<i64>>>,
    /// The initialised model.
    pub model: Sae,
    /// Where training batches come from: normalised rows (input, then the
    /// target for transcoders) in memory, or the mapped file.
    pub source: Source,
    /// Validation rows, normalised like `source`'s (the per-epoch valid_mse).
    pub valid_joined: Option<Tensor>,
    /// Rows per batch (`train.batch_size: full` is the training rows).
    pub batch_rows: usize,
    pub per_epoch: i64,
    pub total_steps: i64,
}

impl Plan {
    /// The plan for `cfg` trained by `world` data-parallel ranks.
    pub fn build(cfg: &Config, world: usize, sources: &super::Sources) -> Result<Plan> {
        let mut cfg = cfg.clone();
        check_world(&cfg, world)?;
        let device = match crate::dist::group() {
            // One GPU per rank: cuda:LOCAL_RANK (`dist_backend` allowed
            // only `cuda` or `auto` as the device).
            Some(g) if g.backend == dist::Backend::Nccl => g.device,
            _ => device::resolve(&cfg.device)?,
        };
        device::set_threads(match cfg.train.threads {
            Auto::Auto => None,
            Auto::Value(n) => Some(n),
        });
        tch::manual_seed(cfg.seed as i64);
        // Before reading the data when its headers tell its size; a model
        // source's rows are known once its sample is computed.
        let planned = planned_size(&cfg);
        if let Some(size) = &planned {
            memory::check(&cfg, device, size)?;
        }
        let data = load_data(&mut cfg, sources)?;
        if planned.is_none() {
            memory::check(&cfg, device, &loaded_size(&cfg, &data))?;
        }
        let fixed_order = match &cfg.train.order {
            Some(p) => Some(read_order(
                p,
                data.train.size()[0] as usize,
                cfg.train.epochs,
            )?),
            None => None,
        };
        let model = init::model(&cfg, &data, device)?;
        let source = Source::new(&cfg, &data, &model, device);
        let valid_joined = data
            .valid
            .as_ref()
            .map(|v| joined(&model, v, data.valid_target.as_ref(), device));
        let rows = source.rows();
        let batch_rows = match cfg.train.batch_size {
            BatchSize::Full => rows,
            BatchSize::Rows(b) => b as usize,
        };
        let per_epoch = match cfg.train.batch_size {
            BatchSize::Full => 1,
            BatchSize::Rows(b) => rows.div_ceil(b as usize) as i64,
        };
        let plan = Plan {
            total_steps: per_epoch * cfg.train.epochs,
            cfg,
            world,
            device,
            data,
            fixed_order,
            model,
            source,
            valid_joined,
            batch_rows,
            per_epoch,
        };
        plan.check()?;
        Ok(plan)
    }

    /// Cross-key checks that need the step count or the model.
    fn check(&self) -> Result<()> {
        let t = &self.cfg.train;
        if t.lr_warmup_steps + t.lr_decay_steps > self.total_steps {
            bail_user!(
                "train.lr_warmup_steps + train.lr_decay_steps: {} + {} exceeds the run's {} steps",
                t.lr_warmup_steps,
                t.lr_decay_steps,
                self.total_steps
            );
        }
        let auxk = self.cfg.sparsity.penalty == PenaltyKind::Auxk;
        if (auxk || t.resample_every > 0) && t.dead_window > self.total_steps {
            let user = match auxk {
                true => "sparsity.penalty: auxk",
                false => "train.resample_every",
            };
            bail_user!(
                "train.dead_window: {} is longer than the run's {} steps, so {user} never sees a \
                 dead latent; set train.dead_window to at most {} (or train for more epochs)",
                t.dead_window,
                self.total_steps,
                self.total_steps
            );
        }
        if t.resample_every > 0 && self.model.is_deep() {
            bail_user!("train.resample_every: not supported for a deep model (model.hidden)");
        }
        Ok(())
    }

    pub fn d_in(&self) -> i64 {
        self.model.spec.d_in
    }
}

/// The c10d backend of a data-parallel run launched as `launch`:
/// `dist.backend`, where `auto` is NCCL when the device is CUDA and Gloo
/// otherwise; refused (exit 2) where it cannot run: NCCL without a GPU, on
/// the CPU, or not built in; Gloo on CUDA.
pub fn dist_backend(cfg: &Config, launch: &dist::Launch) -> Result<dist::Backend> {
    let cuda = matches!(device::parse_device(&cfg.device), Ok(Device::Cuda(_)));
    let backend = match (cfg.dist.backend, cuda) {
        (DistBackend::Nccl, _) | (DistBackend::Auto, true) => dist::Backend::Nccl,
        (DistBackend::Gloo, _) | (DistBackend::Auto, false) => dist::Backend::Gloo,
    };
    match backend {
        dist::Backend::Gloo if cuda => bail_user!(
            "dist.backend: gloo reduces CPU tensors, but device: {} is CUDA; use dist.backend: \
             nccl (or auto), or device: cpu",
            cfg.device
        ),
        dist::Backend::Gloo => {}
        dist::Backend::Nccl => {
            let gpus = tch::Cuda::device_count();
            if dist::nccl_version().is_none() {
                bail_user!(
                    "dist.backend: nccl is not built into this binary (built against a libtorch \
                     without CUDA, or without the CUDA/NCCL headers); use dist.backend: gloo with \
                     device: cpu"
                );
            }
            if gpus == 0 {
                bail_user!(
                    "dist.backend: nccl needs a CUDA GPU for each rank and none is usable here \
                     (`sae info` says why); use dist.backend: gloo (or auto) with device: cpu"
                );
            }
            if !cuda {
                bail_user!(
                    "dist.backend: nccl reduces CUDA tensors, but device: {} is the CPU; set \
                     device: cuda (each rank takes cuda:LOCAL_RANK) or dist.backend: gloo",
                    cfg.device
                );
            }
            if cfg.device.starts_with("cuda:") {
                bail_user!(
                    "device: {}: with data-parallel ranks each takes its own GPU, \
                     cuda:LOCAL_RANK; set device: cuda",
                    cfg.device
                );
            }
            if launch.local_rank as i64 >= gpus {
                bail_user!(
                    "data-parallel launch: LOCAL_RANK={} but this machine has {gpus} GPU(s); \
                     start at most one rank per GPU (torchrun --nproc-per-node {gpus})",
                    launch.local_rank
                );
            }
        }
    }
    Ok(backend)
}

/// What data-parallel training (`world` > 1) does not support yet.
pub fn check_world(cfg: &Config, world: usize) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    if cfg.train.resample_every > 0 {
        bail_user!(
            "train.resample_every: not supported with data-parallel training ({world} ranks) yet; \
             use sparsity.penalty: auxk against dead latents"
        );
    }
    if cfg.sparsity.penalty == PenaltyKind::LpAnneal {
        bail_user!(
            "sparsity.penalty: lp_anneal is not supported with data-parallel training \
             ({world} ranks) yet (its weight adapts to this rank's norms); run it in one process"
        );
    }
    if let BatchSize::Rows(b) = cfg.train.batch_size {
        if (b as usize) < world {
            bail_user!(
                "train.batch_size: {b} rows cannot be shared by {world} ranks; \
                 use at least {world} (it is the global batch)"
            );
        }
    }
    Ok(())
}

/// Normalised input and target side by side, so one batch order serves both.
pub fn joined(model: &Sae, x: &Tensor, y: Option<&Tensor>, device: Device) -> Tensor {
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
}

/// Reads every array the config names, checks they fit together, drops
/// non-finite rows where allowed and splits off validation rows; fills in
/// `model.d_in`.
fn load_data(cfg: &mut Config, sources: &super::Sources) -> Result<Data> {
    if cfg.data.from_model() {
        let data = model_data(cfg, sources)?;
        cfg.model.d_in = Auto::Value(data.train.size()[1]);
        return Ok(data);
    }
    let mut data = read_arrays(cfg)?;
    cfg.model.d_in = Auto::Value(data.train.size()[1]);
    if cfg.data.allow_nonfinite {
        drop_nonfinite_rows(&mut data, cfg)?;
    }
    if cfg.data.valid_fraction > 0.0 {
        split_valid(&mut data, cfg)?;
    }
    data.truth = read_truth(cfg, d_out(&data))?;
    Ok(data)
}

/// The data's size from the headers of `data.train`, `data.valid` and
/// `data.target` (None for a model source, or when a header cannot be
/// read: reading the data then says why).
fn planned_size(cfg: &Config) -> Option<DataSize> {
    if cfg.data.from_model() {
        return None;
    }
    let train_spec = cfg.data.train.as_deref()?;
    let train = npy::data_shape(train_spec).ok()?;
    if !believable(train_spec, train) {
        return None;
    }
    let valid_rows = match &cfg.data.valid {
        Some(p) => npy::data_shape(p).ok()?.rows,
        None => 0,
    };
    let d_out = match &cfg.data.target {
        Some(p) => npy::data_shape(p).ok()?.cols,
        None => train.cols,
    };
    Some(DataSize {
        d_in: train.cols as i64,
        d_out: d_out as i64,
        rows: train.rows as i64,
        valid_rows: valid_rows as i64,
        target: cfg.data.target.is_some(),
        windowed: cfg.data.stream,
    })
}

/// Whether a header's shape could be what the files on disk hold (at least
/// a byte per value; an `.npz` member may be compressed). A header that
/// claims more is a truncated or lying file, which reading reports: the
/// memory check is not the place to judge it.
fn believable(spec: &str, shape: npy::DataShape) -> bool {
    let path = match std::path::Path::new(spec).exists() {
        true => std::path::Path::new(spec),
        false => std::path::Path::new(spec.rsplit_once(':').map_or(spec, |(p, _)| p)),
    };
    let bytes: u64 = match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    };
    let ratio = if path.extension().is_some_and(|e| e == "npz") {
        1024
    } else {
        1
    };
    (shape.rows as u128) * (shape.cols as u128) <= bytes as u128 * ratio
}

/// The size of data already read (a model source's sample).
fn loaded_size(cfg: &Config, data: &Data) -> DataSize {
    DataSize {
        d_in: data.train.size()[1],
        d_out: d_out(data),
        rows: data.train.size()[0],
        valid_rows: data.valid.as_ref().map_or(0, |v| v.size()[0]),
        target: data.train_target.is_some(),
        windowed: cfg.data.stream || data.model_source.is_some(),
    }
}

pub(super) fn train_path(cfg: &Config) -> &str {
    cfg.data.train.as_deref().expect("validated")
}

/// The reconstruction's width.
fn d_out(data: &Data) -> i64 {
    data.train_target.as_ref().unwrap_or(&data.train).size()[1]
}

fn read(cfg: &Config, path: &str) -> Result<Tensor> {
    if cfg.data.allow_nonfinite {
        npy::read_tensor_allow_nonfinite(path)
    } else {
        npy::read_tensor(path)
    }
}

/// data.train (read, or mapped with data.stream), data.valid and the targets.
fn read_arrays(cfg: &Config) -> Result<Data> {
    let train_path = train_path(cfg);
    // data.stream: a view of the mapped file; `mapped` keeps the mapping alive.
    let mapped = match cfg.data.stream {
        true => Some(crate::data::mmap::map_spec(train_path).context("data.train")?),
        false => None,
    };
    let train = match &mapped {
        Some(m) => m.tensor.shallow_clone(),
        None => read(cfg, train_path).context("data.train")?,
    };
    if let Some(shards) = npy::shards_summary(train_path).context("data.train")? {
        eprintln!("data.train: {train_path}: {shards}");
    }
    let d_in = train.size()[1];
    if let Auto::Value(d) = cfg.model.d_in {
        if d != d_in {
            bail_user!("model.d_in: {d} but {train_path} has {d_in} columns");
        }
    }
    let valid = match &cfg.data.valid {
        Some(p) => {
            let v = read(cfg, p).context("data.valid")?;
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
        let y = read(cfg, p).with_context(|| key.to_string())?;
        if y.size()[0] != rows {
            bail_user!(
                "{key}: {p} has {} rows but {of} has {rows}; the target must be row-aligned with it",
                y.size()[0]
            );
        }
        Ok(y)
    };
    let train_target = match &cfg.data.target {
        Some(p) => Some(read_target("data.target", p, train.size()[0], train_path)?),
        None => None,
    };
    let d_out = train_target.as_ref().map_or(d_in, |y| y.size()[1]);
    let valid_target = match (&cfg.data.valid_target, &valid, &cfg.data.valid) {
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
    Ok(Data {
        train,
        valid,
        train_target,
        valid_target,
        truth: None,
        mapped,
        model_source: None,
    })
}

/// Rows of a model source's sample (its first rows in token order) when
/// `data.norm_rows` is auto.
pub const MODEL_SAMPLE_ROWS: usize = 65_536;

fn sample_rows(cfg: &Config) -> usize {
    match cfg.data.norm_rows {
        Auto::Auto => MODEL_SAMPLE_ROWS,
        Auto::Value(n) => n as usize,
    }
}

/// The first rows of a model source's training sequences: the sample a
/// run fits its normalisation on.
pub fn model_sample(cfg: &Config, sources: &super::Sources) -> Result<Tensor> {
    let corpus = sources.corpus(&source::Spec::from_config(cfg)?)?;
    let n = corpus.n_seq();
    let held = source::held_out(n, cfg.data.valid_fraction)?;
    ModelSource::new(corpus, 0, n - held).head(sample_rows(cfg))
}

/// `data.model` on `data.tokens`: the source of training rows (whole
/// sequences held out for validation by `data.valid_fraction`: the last
/// ones), its first rows as the sample, the validation rows computed.
fn model_data(cfg: &Config, sources: &super::Sources) -> Result<Data> {
    let d = &cfg.data;
    let corpus = sources.corpus(&source::Spec::from_config(cfg)?)?;
    let n = corpus.n_seq();
    let n_valid = source::held_out(n, d.valid_fraction)?;
    let train = ModelSource::new(corpus.clone(), 0, n - n_valid);
    let valid = match (n_valid, &d.valid) {
        (0, Some(p)) => Some(read(cfg, p).context("data.valid")?),
        (0, None) => None,
        _ => Some(ModelSource::new(corpus.clone(), n - n_valid, n).head(usize::MAX)?),
    };
    if let Some(v) = &valid {
        if v.size()[1] != corpus.d {
            bail_user!(
                "data.valid: {} columns but data.model gives {}",
                v.size()[1],
                corpus.d
            );
        }
        if v.size()[0] == 0 {
            bail_user!("data.valid_fraction: the held-out sequences keep no position");
        }
    }
    Ok(Data {
        train: train.head(sample_rows(cfg))?,
        valid,
        train_target: None,
        valid_target: None,
        truth: None,
        mapped: None,
        model_source: Some(Rc::new(train)),
    })
}

/// `data.allow_nonfinite`: training and validation rows without NaN or Inf.
fn drop_nonfinite_rows(data: &mut Data, cfg: &Config) -> Result<()> {
    let (train, target) = drop_nonfinite(
        data.train.shallow_clone(),
        data.train_target.take(),
        "data.train",
        train_path(cfg),
    )?;
    data.train = train;
    data.train_target = target;
    if let (Some(v), Some(vp)) = (data.valid.take(), &cfg.data.valid) {
        let (v, vt) = drop_nonfinite(v, data.valid_target.take(), "data.valid", vp)?;
        data.valid = Some(v);
        data.valid_target = vt;
    }
    Ok(())
}

/// Drops the rows of `x` (and of its row-aligned target) that hold NaN or
/// Inf, with a warning; refuses data left empty.
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

/// `data.valid_fraction`: validation rows drawn from the training rows
/// (input and target together, the same rows).
fn split_valid(data: &mut Data, cfg: &Config) -> Result<()> {
    let n = data.train.size()[0];
    if n < 2 {
        bail_user!(
            "data.valid_fraction: {} has {n} row(s), too few to split",
            train_path(cfg)
        );
    }
    let (d_in, d_out) = (data.train.size()[1], d_out(data));
    let joined = match &data.train_target {
        Some(y) => Tensor::cat(
            &[data.train.to_kind(Kind::Float), y.to_kind(Kind::Float)],
            1,
        ),
        None => data.train.shallow_clone(),
    };
    let (t, v) = Dataset::new(joined, Device::Cpu).split(cfg.data.valid_fraction, cfg.seed);
    data.train = t.x.narrow(1, 0, d_in);
    data.valid = Some(v.x.narrow(1, 0, d_in));
    if data.train_target.is_some() {
        data.train_target = Some(t.x.narrow(1, d_in, d_out));
        data.valid_target = Some(v.x.narrow(1, d_in, d_out));
    }
    Ok(())
}

/// `data.truth`: ground-truth features for the mmcs metric.
fn read_truth(cfg: &Config, d_out: i64) -> Result<Option<Tensor>> {
    let Some(p) = &cfg.data.truth else {
        return Ok(None);
    };
    let t = npy::read_tensor(p).context("data.truth")?;
    if t.size()[1] != d_out {
        bail_user!(
            "data.truth: {p} has {} columns but the reconstructed data has {d_out}",
            t.size()[1]
        );
    }
    Ok(Some(t))
}
