//! Training configuration: YAML → typed structs with every default filled in,
//! `--set key.path=value` overrides, and validation that names the bad key.
//!
//! Every field is documented in `configs/reference.yaml`.

use crate::error::user;
use crate::{bail_user, Result};
use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;

/// A value that may be the word `auto` (or `full`), or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Auto<T> {
    Auto,
    Value(T),
}

impl Serialize for Auto<i64> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => s.serialize_str("auto"),
            Auto::Value(v) => s.serialize_i64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for Auto<i64> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Auto::deserialize_word(d, "auto")
    }
}

/// `train.batch_size`: an integer, or `full` for full-batch gradient descent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchSize {
    Full,
    Rows(i64),
}

impl Serialize for BatchSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            BatchSize::Full => s.serialize_str("full"),
            BatchSize::Rows(n) => s.serialize_i64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Auto::<i64>::deserialize_word(d, "full")? {
            Auto::Auto => Ok(BatchSize::Full),
            Auto::Value(n) => Ok(BatchSize::Rows(n)),
        }
    }
}

impl Auto<i64> {
    fn deserialize_word<'de, D: Deserializer<'de>>(
        d: D,
        word: &str,
    ) -> std::result::Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        match &v {
            serde_yaml::Value::String(s) if s == word => Ok(Auto::Auto),
            serde_yaml::Value::Number(n) if n.as_i64().is_some() => {
                Ok(Auto::Value(n.as_i64().unwrap()))
            }
            _ => Err(serde::de::Error::custom(format!(
                "expected `{word}` or an integer, got {}",
                serde_yaml::to_string(&v).unwrap_or_default().trim()
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub seed: u64,
    /// auto | cpu | cuda | cuda:N
    pub device: String,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub sparsity: SparsityConfig,
    pub train: TrainConfig,
    pub dist: DistConfig,
    pub eval: EvalConfig,
}

/// `eval.encoder`: which encoder the end of a run measures besides the
/// model's own (the `--encoder` of `sae eval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalEncoder {
    /// Only the model's own encoder.
    Model,
    /// Orthogonal matching pursuit over the decoder rows.
    Omp,
    /// Matching pursuit over the decoder rows.
    Mp,
}

/// How a finished run is measured: besides the model's own encoder, the
/// same metrics with a pursuit encoder over its decoder (summary.json
/// `pursuit`, and its columns in a sweep's table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub encoder: EvalEncoder,
    /// Atoms per row (omp) or most steps (mp); default `model.k`, and for
    /// mp without it `d_in`.
    pub k: Option<i64>,
    /// mp: a row stops once its residual norm is below this (0: never).
    pub residual_threshold: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            encoder: EvalEncoder::Model,
            k: None,
            residual_threshold: 0.0,
        }
    }
}

/// `dist.backend`: the c10d backend of a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL when the device is CUDA, Gloo otherwise.
    Auto,
    Gloo,
    Nccl,
}

/// Data-parallel training (used only under a launcher such as torchrun).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    pub backend: DistBackend,
    /// How long a rank waits for its peers (rendezvous, every collective)
    /// before it gives up with an error.
    pub timeout_s: f64,
    /// The gradient allreduce runs in buckets of about this many MiB,
    /// each started as soon as backward has its gradients (DDP's
    /// `bucket_cap_mb`); 0: one allreduce of every gradient after backward.
    pub bucket_mb: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: DistBackend::Auto,
            // torch.distributed's default for Gloo.
            timeout_s: 1800.0,
            // DDP's default.
            bucket_mb: 25.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizeKind {
    None,
    Standardize,
    Minmax,
    /// One factor for every column so the mean row L2 norm is `sqrt(d_in)`
    /// (SAELens `normalize_activations: expected_average_only_in`).
    #[serde(rename = "expected_norm")]
    ExpectedNorm,
    /// PCA whitening `(x - mean) @ E diag(lambda + eps)^(-1/2)`, fitted in
    /// float64 (SAELens `normalize_activations: covariance_whitening`);
    /// trained in whitened space and folded into the saved weights.
    Whiten,
}

/// `data.whiten_eps`'s default: SAELens `estimate_whitening`'s `eps`.
pub const DEFAULT_WHITEN_EPS: f64 = 1e-3;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub train: Option<String>,
    pub valid: Option<String>,
    pub valid_fraction: f64,
    pub normalize: NormalizeKind,
    /// Ground-truth feature directions `[n_features, d_in]` (from `sae data synth
    /// --truth`); when given, the summary reports MMCS.
    pub truth: Option<String>,
    /// Reconstruct this array instead of the input (a transcoder): `[n, d_out]`,
    /// row-aligned with `train`.
    pub target: Option<String>,
    /// Row-aligned target for `valid` (needed when `valid` is given with `target`).
    pub valid_target: Option<String>,
    /// Drop rows holding NaN or Inf (with a warning) instead of refusing the data.
    pub allow_nonfinite: bool,
    /// Train from a memory-mapped `data.train` (float32 C-order `.npy`, or one
    /// float32 `.safetensors` file)
    /// instead of loading it: for data larger than memory.
    pub stream: bool,
    /// A language model (TorchScript `.pt` or AOTInductor `.pt2`, with
    /// `forward(ids[int64, B, T]) -> [B, T, d]`) whose activations on
    /// `tokens` are the training rows, made window by window as training runs.
    pub model: Option<String>,
    /// Token ids `.npy`: `[n_seq, ctx]`, or 1-D with `context_size`.
    pub tokens: Option<String>,
    pub context_size: Option<i64>,
    /// Positions whose token is one of these give no row (BOS, padding).
    pub exclude_tokens: Vec<i64>,
    /// Positions (0-based; negative from the end) that give no row.
    pub exclude_positions: Vec<i64>,
    /// Where the model runs (null: the training device).
    pub model_device: Option<String>,
    /// Sequences per model call (fixed groups of the token file).
    pub model_batch: i64,
    /// Rows (the first, in order) that fit the normalisation statistics:
    /// auto = every row of a file, the first 65,536 of a model source.
    pub norm_rows: Auto<i64>,
    /// `normalize: whiten`: added to every covariance eigenvalue (in the
    /// data's squared units) before the inverse square root.
    pub whiten_eps: f64,
}

impl DataConfig {
    /// Rows come from `data.model` run on `data.tokens`.
    pub fn from_model(&self) -> bool {
        self.model.is_some()
    }
}

pub use crate::arch::ActivationKind;

/// Where `b_dec` starts (`null`: as `init_scheme` draws it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    Zeros,
    Mean,
    GeometricMedian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputActivation {
    None,
    Sigmoid,
}

/// How fresh weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// `torch.nn.Linear` defaults for encoder and decoder (the tutorials).
    TorchLinear,
    /// SAELens-style: unit-norm decoder rows, `W_enc = W_dec.T`, zero biases.
    Sae,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub init: Option<String>,
    pub init_scheme: InitScheme,
    pub d_in: Auto<i64>,
    pub d_hidden: i64,
    pub activation: ActivationKind,
    pub k: Option<i64>,
    pub decoder_activation: OutputActivation,
    pub apply_b_dec_to_input: bool,
    pub tied: bool,
    /// Deep autoencoder: the encoder's layer widths, the last being the code
    /// (`d_hidden`); the decoder mirrors them. Empty: one layer each way.
    pub hidden: Vec<i64>,
    /// `init_scheme: sae`: the norm of each fresh decoder row.
    pub decoder_init_norm: f64,
    pub b_dec_init: Option<BDecInit>,
    /// jumprelu: every latent's threshold at the start.
    pub jumprelu_init_threshold: f64,
    /// jumprelu (and the l0 penalty): width of the straight-through window.
    pub jumprelu_bandwidth: f64,
    /// jumprelu: the straight-through estimate also reaches the
    /// pre-activations (and so the encoder), not only the thresholds
    /// (SAELens `jumprelu_ste_to_input`; Anthropic's setup).
    pub jumprelu_ste_to_input: bool,
    /// batchtopk: rate of the running estimate of the inference threshold.
    pub topk_threshold_lr: f64,
    /// batchtopk, matryoshka_batchtopk: after training, set the inference
    /// threshold from the training rows so that the saved encoder keeps `k`
    /// codes per row on average on them (instead of the running estimate).
    pub calibrate_threshold: bool,
    /// matryoshka_batchtopk: the nested prefix widths whose reconstructions
    /// are trained too (strictly increasing; `d_hidden` is added as the last
    /// level when missing, as SAELens does). See [`ModelConfig::matryoshka_levels`].
    pub matryoshka_widths: Vec<i64>,
    /// matching_pursuit: a row stops selecting atoms once its residual norm
    /// falls below this (0: never; SAELens's `residual_threshold`).
    pub residual_threshold: f64,
    /// topk: SAELens's `rescale_acts_by_decoder_norm` (its training
    /// default for top-k): select on pre-activations times the decoder
    /// rows' norms, decode the codes over them; folded into the saved
    /// weights at the end of training.
    pub rescale_acts_by_decoder_norm: bool,
    /// topk: sparsify's Multi-TopK loss, the reconstruction from the 4k
    /// largest pre-activations added with weight 1/8.
    pub multi_topk: bool,
    /// sparsify's `skip_connection`: an affine skip term `x @ W_skip.T`
    /// (`W_skip [d_out, d_in]`, zeros at the start) added to the
    /// reconstruction, reading the (normalised) input.
    pub skip_connection: bool,
}

impl ModelConfig {
    /// The architecture with its settings.
    pub fn arch_activation(&self) -> crate::arch::Activation {
        crate::arch::Activation::from_settings(
            self.activation,
            self.k,
            self.jumprelu_bandwidth,
            self.jumprelu_ste_to_input,
            self.residual_threshold,
        )
    }

    /// What the architectures read of these settings (`crate::arch`).
    pub fn arch_settings(&self) -> crate::arch::Settings {
        crate::arch::Settings {
            jumprelu_init_threshold: self.jumprelu_init_threshold,
            topk_threshold_lr: self.topk_threshold_lr,
            matryoshka_levels: self.matryoshka_levels(),
            multi_topk: self.multi_topk,
        }
    }

    /// The matryoshka levels as SAELens resolves them: `matryoshka_widths`,
    /// with `d_hidden` appended when the last width is not it.
    pub fn matryoshka_levels(&self) -> Vec<i64> {
        let mut levels = self.matryoshka_widths.clone();
        if levels.last() != Some(&self.d_hidden) {
            levels.push(self.d_hidden);
        }
        levels
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PenaltyKind {
    Kl,
    L1,
    MeanAbs,
    /// Step-function L0 with straight-through gradients to the thresholds (jumprelu).
    L0,
    /// Anthropic's sparsity loss (jumprelu): `sum_j tanh(tanh_scale * z_j * ||W_dec[j]||)`.
    Tanh,
    /// Gemma Scope 2's (jumprelu): `2 / target_l0 * (L0 - target_l0)^2` per row,
    /// L0 the step function's count as for `l0`.
    #[serde(rename = "quadratic_l0")]
    QuadraticL0,
    /// The top-k auxiliary loss: dead latents reconstruct the residual.
    Auxk,
    /// dictionary_learning's p-annealing (`PAnnealTrainer`): an Lp penalty
    /// on the codes whose p steps from `p_start` to `p_end`, the weight
    /// rescaled at each step of p so the penalty keeps its size.
    LpAnneal,
    None,
}

/// `sparsity.lp_form`: dictionary_learning's `sparsity_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LpForm {
    /// `mean_batch((sum_j z_j^p)^(1/p))`.
    #[serde(rename = "lp")]
    Lp,
    /// `mean_batch(sum_j z_j^p)`.
    #[serde(rename = "lp^p")]
    LpPowP,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SparsityConfig {
    pub penalty: PenaltyKind,
    pub target: f64,
    pub weight: f64,
    /// l1 only: scale each |z_j| by ||W_dec[j]|| (SAELens convention).
    pub l1_decoder_norm: bool,
    /// kl only: allow an activation that is not bounded to (0, 1); the mean
    /// activation is then clamped into (0, 1) before the KL.
    pub allow_unbounded_kl: bool,
    /// Steps over which the weight rises linearly from 0 to `weight`.
    pub warmup_steps: i64,
    /// auxk: how many dead latents reconstruct the residual; `auto` = d_out / 2.
    pub auxk_k: Auto<i64>,
    /// tanh: the scale inside the tanh (SAELens `jumprelu_tanh_scale`).
    pub tanh_scale: f64,
    /// quadratic_l0: the L0 each row is pulled towards (SAELens `target_l0`).
    pub target_l0: Option<f64>,
    /// jumprelu: Anthropic's pre-activation loss on dead latents,
    /// `pre_act_weight * mean_batch(sum_j relu(threshold_j - pre_j) * dead_j
    /// * ||W_dec[j]||)` (SAELens `pre_act_loss_coefficient`); 0: off.
    pub pre_act_weight: f64,
    /// lp_anneal: the penalty's form (dictionary_learning `sparsity_function`).
    pub lp_form: LpForm,
    /// lp_anneal: p before and at the end of the annealing.
    pub p_start: f64,
    pub p_end: f64,
    /// lp_anneal: the steps at whose end p takes its first and last values
    /// (`auto`: one past the run's last step, as dictionary_learning).
    pub anneal_start: i64,
    pub anneal_end: Auto<i64>,
    /// lp_anneal: how many values p takes (dictionary_learning `n_sparsity_updates`).
    pub p_updates: i64,
    /// lp_anneal: the recent steps whose Lp norms rescale the weight
    /// (dictionary_learning `sparsity_queue_length`).
    pub anneal_queue_length: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Adam,
    Adamw,
    /// sparsify's `signum`: sign descent (SignSGD) made schedule-free
    /// (schedulefree's `ScheduleFreeWrapper`, momentum 0.95); the model is
    /// evaluated and saved at the averaged weights.
    Signum,
    /// sparsify's `muon`: Muon (momentum, Newton-Schulz orthogonalisation)
    /// on the 2-D weights, Adam on the rest.
    Muon,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub name: OptimizerName,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// torch's fused Adam/AdamW kernel (`torch.optim.Adam(fused=True)`):
    /// one pass over the parameters, several times faster, but it rounds
    /// differently in the last bit from the step-by-step update, so it is
    /// opt-in.
    pub fused: bool,
    /// signum: the schedule-free momentum; muon: Muon's momentum. Unset:
    /// 0.95 (sparsify's); only these two read it.
    pub momentum: Option<f64>,
    /// muon: decoupled weight decay on the 2-D weights (sparsify's Muon:
    /// 0.1 when unset); `weight_decay` is the Adam part's.
    pub muon_weight_decay: Option<f64>,
}

impl OptimizerConfig {
    /// `momentum` as signum and muon read it.
    pub fn momentum(&self) -> f64 {
        self.momentum.unwrap_or(0.95)
    }

    /// `muon_weight_decay` as muon reads it.
    pub fn muon_weight_decay(&self) -> f64 {
        self.muon_weight_decay.unwrap_or(0.1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: i64,
    pub batch_size: BatchSize,
    pub shuffle: bool,
    /// An int64 `.npy` giving the batch order: `[n]` (every epoch) or
    /// `[epochs, n]`, each row a permutation of the training rows. Overrides
    /// `shuffle`; lets a reference script see exactly the same batches.
    pub order: Option<String>,
    pub optimizer: OptimizerConfig,
    pub log_every: i64,
    pub checkpoint_every: i64,
    /// CPU threads for libtorch; `auto` = all cores.
    pub threads: Auto<i64>,
    pub lr_schedule: LrSchedule,
    pub lr_warmup_steps: i64,
    pub lr_decay_steps: i64,
    /// Where `cosine` and `linear` end.
    pub lr_end: f64,
    /// Largest global L2 norm of the gradient (clipped like torch's clip_grad_norm_).
    pub grad_clip: Option<f64>,
    /// Keep decoder rows at unit norm: remove the gradient's component along
    /// each row before the step, renormalise the rows after it.
    pub unit_norm_decoder: bool,
    /// Steps without firing after which a latent counts as dead.
    pub dead_window: i64,
    /// topk: k falls linearly from min(d_hidden, 10 d_in) to `model.k` over
    /// this many steps (sparsify's `k_decay_steps`); 0: off.
    pub k_decay_steps: i64,
    /// Every this many steps, re-initialise dead latents (0: never).
    pub resample_every: i64,
    pub input_noise: InputNoise,
    /// Standard deviation (gaussian) or drop probability (mask).
    pub noise_level: f64,
    /// Whether relu/jumprelu (and top-k) steps work only on the firing
    /// codes (see `sparse_step`).
    pub sparse_step: SparseStep,
    /// The forward pass and loss in float32, or under autocast to bfloat16
    /// (`crate::autocast`).
    pub precision: Precision,
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    Fp32,
    /// `torch.autocast(device, dtype=torch.bfloat16)` around the forward
    /// pass and loss; parameters, gradients and Adam's state in float32.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `train.sparse_step`: the sparse training pass of relu and jumprelu
/// models (and top-k's, which is always sparse unless `never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseStep {
    /// Sparse when this batch's code density is at most
    /// `sparse_step::SWITCH_DENSITY` (CPU only; dense on CUDA).
    Auto,
    Always,
    Never,
}

/// The learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

/// Corruption of the model's input for denoising training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputNoise {
    None,
    Gaussian,
    Mask,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            device: "auto".into(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            sparsity: SparsityConfig::default(),
            train: TrainConfig::default(),
            dist: DistConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: None,
            valid: None,
            valid_fraction: 0.0,
            normalize: NormalizeKind::None,
            truth: None,
            target: None,
            valid_target: None,
            allow_nonfinite: false,
            stream: false,
            model: None,
            tokens: None,
            context_size: None,
            exclude_tokens: Vec::new(),
            exclude_positions: Vec::new(),
            model_device: None,
            model_batch: 8,
            norm_rows: Auto::Auto,
            whiten_eps: DEFAULT_WHITEN_EPS,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            init: None,
            init_scheme: InitScheme::TorchLinear,
            d_in: Auto::Auto,
            d_hidden: 64,
            activation: ActivationKind::Relu,
            k: None,
            decoder_activation: OutputActivation::None,
            apply_b_dec_to_input: true,
            tied: false,
            hidden: Vec::new(),
            decoder_init_norm: 1.0,
            b_dec_init: None,
            jumprelu_init_threshold: 0.01,
            jumprelu_bandwidth: 0.05,
            jumprelu_ste_to_input: false,
            topk_threshold_lr: 0.01,
            calibrate_threshold: false,
            matryoshka_widths: Vec::new(),
            residual_threshold: crate::arch::DEFAULT_RESIDUAL_THRESHOLD,
            rescale_acts_by_decoder_norm: false,
            multi_topk: false,
            skip_connection: false,
        }
    }
}

impl Default for SparsityConfig {
    fn default() -> Self {
        SparsityConfig {
            penalty: PenaltyKind::L1,
            target: 0.05,
            weight: 0.001,
            l1_decoder_norm: true,
            allow_unbounded_kl: false,
            warmup_steps: 0,
            auxk_k: Auto::Auto,
            tanh_scale: 4.0,
            target_l0: None,
            pre_act_weight: 0.0,
            lp_form: LpForm::Lp,
            p_start: 1.0,
            p_end: 0.2,
            anneal_start: 1,
            anneal_end: Auto::Auto,
            p_updates: 10,
            anneal_queue_length: 10,
        }
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            name: OptimizerName::Adam,
            lr: 0.001,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            fused: false,
            momentum: None,
            muon_weight_decay: None,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: BatchSize::Rows(256),
            shuffle: true,
            order: None,
            optimizer: OptimizerConfig::default(),
            log_every: 1,
            checkpoint_every: 1000,
            threads: Auto::Auto,
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 0,
            lr_decay_steps: 0,
            lr_end: 0.0,
            grad_clip: None,
            unit_norm_decoder: false,
            dead_window: 1000,
            k_decay_steps: 0,
            resample_every: 0,
            input_noise: InputNoise::None,
            noise_level: 0.1,
            sparse_step: SparseStep::Auto,
            precision: Precision::Fp32,
        }
    }
}

/// Parses `a.b.c=value` (value as YAML) and sets it in `root`.
pub fn apply_override(root: &mut serde_yaml::Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| user(format!("--set {assignment}: expected key.path=value")))?;
    let value: serde_yaml::Value = serde_yaml::from_str(raw)
        .map_err(|e| user(format!("--set {assignment}: value is not valid YAML: {e}")))?;
    set_path(root, path.trim(), value).map_err(|e| user(format!("--set {assignment}: {e}")))
}

/// Sets `a.b.c = value` in a YAML mapping, creating intermediate mappings.
pub fn set_path(
    root: &mut serde_yaml::Value,
    path: &str,
    value: serde_yaml::Value,
) -> std::result::Result<(), String> {
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(format!("empty key in `{path}`"));
    }
    let parts: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("`{}` is not a mapping", parts[..i].join(".")))?;
        let key = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(serde_yaml::Value::Null);
    }
    unreachable!("a non-empty path always returns in the loop")
}

impl Config {
    /// Parses YAML text (`origin` names it in errors), applies overrides,
    /// fills defaults and validates.
    pub fn from_yaml_str(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let root: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| user(format!("{origin}: not valid YAML: {e}")))?;
        Self::from_value(root, origin, overrides)
    }

    /// Like [`Config::from_yaml_str`], from an already parsed YAML value.
    pub fn from_value(
        mut root: serde_yaml::Value,
        origin: &str,
        overrides: &[String],
    ) -> Result<Config> {
        if root.is_null() {
            root = serde_yaml::Value::Mapping(Default::default());
        }
        if !root.is_mapping() {
            bail_user!("{origin}: the config must be a YAML mapping of keys to values");
        }
        for o in overrides {
            apply_override(&mut root, o)?;
        }
        fill_d_hidden_from_hidden(&mut root);
        // serde_path_to_error names the key at fault (`train.epochs: ...`).
        let cfg: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = match suggest_field(&inner).or_else(|| moved_field(&path, &inner)) {
                Some(near) => format!("{inner}; did you mean `{near}`?"),
                None => inner,
            };
            // A key that came from --set is blamed on the --set.
            let origin = match blamed_override(&path, &inner, overrides) {
                Some(o) => format!("--set {o}"),
                None => origin.to_string(),
            };
            if path == "." || path.is_empty() {
                user(format!("{origin}: {inner}"))
            } else {
                user(format!("{origin}: {path}: {inner}"))
            }
        })?;
        cfg.validate().map_err(|e| user(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| user(format!("{}: cannot read config: {e}", path.display())))?;
        Self::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).context("serialising config")
    }

    /// Checks values that parse but make no sense. The message names the key.
    /// The sections run in a fixed order, so with several faults the one
    /// reported is always the same.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_data()?;
        self.validate_model()?;
        self.validate_recipe()?;
        self.validate_sparsity()?;
        self.validate_train()?;
        validate_dist(&self.dist)?;
        self.validate_eval()?;
        crate::device::parse_device(&self.device).map_err(|e| format!("device: {e}"))?;
        Ok(())
    }
}

/// The key an error at `path` names: the unknown field's full path for
/// "unknown field `x`", else `path` itself.
fn faulty_key(path: &str, msg: &str) -> String {
    let field = msg
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f);
    match (field, path) {
        (Some(f), "." | "") => f.to_string(),
        // serde_path_to_error's path may already end in the field.
        (Some(f), p) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
        (Some(f), p) => format!("{p}.{f}"),
        (None, p) => p.to_string(),
    }
}

/// The `--set` override that wrote the key at fault, if one did.
fn blamed_override<'a>(path: &str, msg: &str, overrides: &'a [String]) -> Option<&'a str> {
    let key = faulty_key(path, msg);
    overrides.iter().map(String::as_str).rev().find(|o| {
        let k = o.split_once('=').map_or(*o, |(k, _)| k).trim();
        k == key || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."))
    })
}

/// Keys users put one level too high: `train.lr` is `train.optimizer.lr`.
fn moved_field(path: &str, msg: &str) -> Option<String> {
    let key = faulty_key(path, msg);
    let moved = ["lr", "betas", "weight_decay", "eps", "name"]
        .iter()
        .find(|f| key == format!("train.{f}"))?;
    Some(format!("train.optimizer.{moved}"))
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the expected
/// name nearest to `x` when it is a plausible misspelling.
fn suggest_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (got, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected ")?.1;
    let names = expected.split('`').skip(1).step_by(2);
    let (best, dist) = names
        .map(|n| (n, edit_distance(got, n)))
        .min_by_key(|&(_, d)| d)?;
    // Close enough to be a typo: at most a third of the longer name differs.
    (dist * 3 <= got.len().max(best.len()) && dist > 0).then(|| best.to_string())
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Config {
    /// `eval`: a pursuit needs a linear decoder that maps codes back to the
    /// input (as `--encoder` in `sae eval`), and omp a number of atoms.
    fn validate_eval(&self) -> Check {
        let e = &self.eval;
        let name = match e.encoder {
            EvalEncoder::Model => {
                if e.k.is_some() || e.residual_threshold != 0.0 {
                    return Err("eval.k and eval.residual_threshold: only for eval.encoder \
                                omp or mp (the model's own encoder takes neither)"
                        .into());
                }
                return Ok(());
            }
            EvalEncoder::Omp => "omp",
            EvalEncoder::Mp => "mp",
        };
        if let Some(k) = e.k {
            if k < 1 {
                return Err(format!("eval.k: {k} must be at least 1"));
            }
        }
        if !(e.residual_threshold >= 0.0 && e.residual_threshold.is_finite()) {
            return Err(format!(
                "eval.residual_threshold: {} must be a finite number >= 0",
                e.residual_threshold
            ));
        }
        if e.encoder == EvalEncoder::Omp {
            if e.residual_threshold != 0.0 {
                return Err("eval.residual_threshold: only for eval.encoder mp".into());
            }
            if e.k.is_none() && self.model.k.is_none() {
                return Err("eval.encoder omp: needs eval.k, the atoms per row \
                            (or model.k, which it defaults to)"
                    .into());
            }
        }
        let why = if self.model.decoder_activation != OutputActivation::None {
            Some("its decoder applies a sigmoid (model.decoder_activation)")
        } else if !self.model.hidden.is_empty() {
            Some("it has hidden layers (model.hidden)")
        } else if self.data.target.is_some() {
            Some("it is a transcoder (data.target)")
        } else if self.model.skip_connection {
            Some("it adds a skip term (model.skip_connection)")
        } else {
            None
        };
        match why {
            Some(why) => Err(format!(
                "eval.encoder {name}: needs a model whose decoder is linear and \
                 reconstructs its input, but {why}; use eval.encoder: model"
            )),
            None => Ok(()),
        }
    }
}

fn validate_dist(d: &DistConfig) -> std::result::Result<(), String> {
    if !(d.timeout_s.is_finite() && d.timeout_s >= 1.0) {
        return Err(format!(
            "dist.timeout_s: {} must be at least 1 (seconds)",
            d.timeout_s
        ));
    }
    if !(d.bucket_mb.is_finite() && d.bucket_mb >= 0.0) {
        return Err(format!(
            "dist.bucket_mb: {} must be a size in MiB, at least 0 (0: one allreduce after \
             backward)",
            d.bucket_mb
        ));
    }
    Ok(())
}

/// The first lp_anneal key that differs from its default, if any.
fn lp_anneal_key_set(s: &SparsityConfig) -> Option<&'static str> {
    let d = SparsityConfig::default();
    [
        ("lp_form", s.lp_form != d.lp_form),
        ("p_start", s.p_start != d.p_start),
        ("p_end", s.p_end != d.p_end),
        ("anneal_start", s.anneal_start != d.anneal_start),
        ("anneal_end", s.anneal_end != d.anneal_end),
        ("p_updates", s.p_updates != d.p_updates),
        (
            "anneal_queue_length",
            s.anneal_queue_length != d.anneal_queue_length,
        ),
    ]
    .into_iter()
    .find_map(|(key, set)| set.then_some(key))
}

/// A penalty's name as written in `sparsity.penalty`.
pub fn penalty_name(p: PenaltyKind) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn activation_name(a: ActivationKind) -> &'static str {
    a.name()
}

/// `model.hidden: [.., c]` names the code width `c`; when the config does not
/// give `model.d_hidden` it is taken from there (so the default of 64 does not
/// contradict it).
fn fill_d_hidden_from_hidden(root: &mut serde_yaml::Value) {
    let Some(model) = root.get_mut("model").and_then(|m| m.as_mapping_mut()) else {
        return;
    };
    if model.contains_key("d_hidden") {
        return;
    }
    let last = model
        .get("hidden")
        .and_then(|h| h.as_sequence())
        .and_then(|h| h.last())
        .and_then(|v| v.as_i64());
    if let Some(c) = last {
        model.insert("d_hidden".into(), c.into());
    }
}

/// A validation result: `Err` holds the message, which names the key.
type Check = std::result::Result<(), String>;

fn finite_nonneg(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

impl Config {
    /// `data.*`: a training file, at most one source of validation rows.
    fn validate_data(&self) -> Check {
        if self.data.model.is_some() || self.data.tokens.is_some() {
            self.validate_model_source()?;
        } else if self.data.train.is_none() {
            return Err(
                "data.train: required (a .npy file with one row per sample), or data.model \
                 with data.tokens (train from a language model's activations)"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.data.valid_fraction) {
            return Err(format!(
                "data.valid_fraction: {} is outside [0, 1)",
                self.data.valid_fraction
            ));
        }
        if self.data.valid.is_some() && self.data.valid_fraction > 0.0 {
            return Err("data.valid and data.valid_fraction: give one or the other".into());
        }
        if self.data.stream {
            self.validate_stream()?;
        }
        self.validate_whiten()
    }

    /// `data.normalize: whiten` trains in whitened space and folds the map
    /// into the saved weights; models whose fold would change their codes
    /// or outputs are refused.
    fn validate_whiten(&self) -> Check {
        let (d, m) = (&self.data, &self.model);
        let eps = d.whiten_eps;
        if d.normalize != NormalizeKind::Whiten {
            if eps != DEFAULT_WHITEN_EPS {
                return Err("data.whiten_eps: only used with data.normalize: whiten".into());
            }
            return Ok(());
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!(
                "data.whiten_eps: {eps} must be > 0 (it keeps small covariance eigenvalues invertible)"
            ));
        }
        let why = if m.tied {
            Some("model.tied (W_dec = W_enc.T cannot hold the whitening on one side and its inverse on the other); set model.tied: false")
        } else if m.activation == ActivationKind::MatchingPursuit {
            Some("activation matching_pursuit (its codes depend on the decoder rows, which the fold changes)")
        } else if m.decoder_activation != OutputActivation::None {
            Some("model.decoder_activation: sigmoid (the un-whitening cannot pass through it); set it to none")
        } else {
            None
        };
        match why {
            Some(why) => Err(format!(
                "data.normalize: whiten is folded into the saved weights, which is not possible with {why}, or pick another data.normalize"
            )),
            None => Ok(()),
        }
    }

    /// `data.model` + `data.tokens`: rows made as training runs, window by
    /// window like a streamed file, so the same options are refused.
    fn validate_model_source(&self) -> Check {
        let d = &self.data;
        match (&d.model, &d.tokens) {
            (Some(_), None) => {
                return Err("data.model: needs data.tokens (an .npy of token ids)".into())
            }
            (None, Some(_)) => {
                return Err("data.tokens: needs data.model (the language model to run)".into())
            }
            _ => {}
        }
        let clash = [
            (d.train.is_some(), "data.train (give one source of rows)"),
            (d.stream, "data.stream (a model source is streamed already)"),
            (d.target.is_some(), "data.target"),
            (d.allow_nonfinite, "data.allow_nonfinite"),
            (d.truth.is_some(), "data.truth"),
            (self.train.order.is_some(), "train.order"),
            (
                self.train.batch_size == BatchSize::Full,
                "train.batch_size: full (one batch would hold every token)",
            ),
        ];
        if let Some((_, key)) = clash.iter().find(|(on, _)| *on) {
            return Err(format!("data.model: not available with {key}"));
        }
        if let Some(c) = d.context_size {
            if c < 1 {
                return Err(format!("data.context_size: {c} must be at least 1"));
            }
        }
        if let Auto::Value(n) = d.norm_rows {
            if n < 1 {
                return Err(format!("data.norm_rows: {n} must be at least 1 (or auto)"));
            }
        }
        if d.model_batch < 1 {
            return Err(format!(
                "data.model_batch: {} must be at least 1 (sequences per model call)",
                d.model_batch
            ));
        }
        if let Some(dev) = &d.model_device {
            crate::device::parse_device(dev).map_err(|e| format!("data.model_device: {e}"))?;
        }
        if d.valid.is_some() && self.data.valid_fraction > 0.0 {
            return Err("data.valid and data.valid_fraction: give one or the other".into());
        }
        Ok(())
    }

    /// `data.stream` reads the file window by window: options that need the
    /// whole file in memory are refused.
    fn validate_stream(&self) -> Check {
        let clash = [
            (
                self.data.valid_fraction > 0.0,
                "data.valid_fraction (give a data.valid file)",
            ),
            (self.data.target.is_some(), "data.target"),
            (self.data.allow_nonfinite, "data.allow_nonfinite"),
            (self.model.b_dec_init.is_some(), "model.b_dec_init"),
            (
                self.train.batch_size == BatchSize::Full,
                "train.batch_size: full (one batch would hold the whole file)",
            ),
        ];
        match clash.iter().find(|(on, _)| *on) {
            Some((_, key)) => Err(format!("data.stream: not available with {key}")),
            None => Ok(()),
        }
    }

    /// `model.d_in`, `model.d_hidden`, and `model.k` where the activation
    /// uses it (and only there).
    fn validate_model(&self) -> Check {
        let m = &self.model;
        if let Auto::Value(d) = m.d_in {
            if d < 1 {
                return Err(format!("model.d_in: {d} must be `auto` or at least 1"));
            }
        }
        if m.d_hidden < 1 {
            return Err(format!("model.d_hidden: {} must be at least 1", m.d_hidden));
        }
        match (m.activation, m.k) {
            (a, None) if a.uses_k() => Err(format!(
                "model.k: required for activation {}",
                activation_name(a)
            )),
            (a, Some(k)) if a.uses_k() && (k < 1 || k > m.d_hidden) => Err(format!(
                "model.k: {k} must be between 1 and model.d_hidden ({})",
                m.d_hidden
            )),
            (a, Some(_)) if !a.uses_k() => Err(format!(
                "model.k: only used by activations {}, not {}",
                ActivationKind::names_with_k(),
                activation_name(a)
            )),
            _ => Ok(()),
        }
    }

    /// `sparsity.target` and `sparsity.weight`, and kl's need for codes in
    /// (0, 1).
    fn validate_sparsity(&self) -> Check {
        let (m, s) = (&self.model, &self.sparsity);
        if matches!(s.penalty, PenaltyKind::Kl | PenaltyKind::MeanAbs)
            && !(s.target > 0.0 && s.target < 1.0)
        {
            return Err(format!(
                "sparsity.target: {} must lie strictly between 0 and 1",
                s.target
            ));
        }
        if !(s.weight >= 0.0 && s.weight.is_finite()) {
            return Err(format!(
                "sparsity.weight: {} must be a finite number >= 0",
                s.weight
            ));
        }
        if s.penalty == PenaltyKind::Kl
            && m.activation != ActivationKind::Sigmoid
            && !s.allow_unbounded_kl
        {
            return Err(format!(
                "sparsity.penalty: kl needs activations in (0, 1) but model.activation is {}; \
                 use activation: sigmoid, or set sparsity.allow_unbounded_kl: true to clamp",
                activation_name(m.activation)
            ));
        }
        Ok(())
    }

    /// `train.*`: counts and intervals, the optimizer, threads.
    fn validate_train(&self) -> Check {
        let t = &self.train;
        if t.epochs < 1 {
            return Err(format!("train.epochs: {} must be at least 1", t.epochs));
        }
        if let BatchSize::Rows(b) = t.batch_size {
            if b < 1 {
                return Err(format!(
                    "train.batch_size: {b} must be `full` or at least 1"
                ));
            }
        }
        self.validate_optimizer()?;
        if t.log_every < 1 {
            return Err(format!(
                "train.log_every: {} must be at least 1",
                t.log_every
            ));
        }
        if t.checkpoint_every < 1 {
            return Err(format!(
                "train.checkpoint_every: {} must be at least 1",
                t.checkpoint_every
            ));
        }
        if let Auto::Value(n) = t.threads {
            if n < 1 {
                return Err(format!("train.threads: {n} must be `auto` or at least 1"));
            }
        }
        if t.precision == Precision::Bf16 && t.sparse_step == SparseStep::Always {
            // Its hand-written encoder gradient is not autocast's.
            return Err(
                "train.sparse_step: always does not run under train.precision: bf16 \
                 (the sparse pass is float32 only); use auto or never (bf16 takes the dense step)"
                    .into(),
            );
        }
        Ok(())
    }

    /// `train.optimizer.*`.
    fn validate_optimizer(&self) -> Check {
        let o = &self.train.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(format!("train.optimizer.lr: {} must be > 0", o.lr));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(format!("train.optimizer.betas[{i}]: {b} is outside [0, 1)"));
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return Err(format!("train.optimizer.eps: {} must be > 0", o.eps));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return Err(format!(
                "train.optimizer.weight_decay: {} must be >= 0",
                o.weight_decay
            ));
        }
        self.validate_sign_and_muon()
    }

    /// What signum and muon support: their own keys, and the parts of
    /// training that assume Adam.
    fn validate_sign_and_muon(&self) -> Check {
        let t = &self.train;
        let o = &t.optimizer;
        let name = o.name;
        let adam = matches!(name, OptimizerName::Adam | OptimizerName::Adamw);
        if adam && o.momentum.is_some() {
            return Err(
                "train.optimizer.momentum: only signum and muon have one; remove it \
                 (Adam's is betas[0])"
                    .into(),
            );
        }
        if name != OptimizerName::Muon && o.muon_weight_decay.is_some() {
            return Err(
                "train.optimizer.muon_weight_decay: only muon has it; remove it \
                 or set train.optimizer.name: muon"
                    .into(),
            );
        }
        if adam {
            return Ok(());
        }
        let label = format!("{name:?}").to_lowercase();
        let m = o.momentum();
        let momentum_ok = match name {
            // Schedule-free divides by it.
            OptimizerName::Signum => m > 0.0 && m < 1.0,
            _ => (0.0..1.0).contains(&m),
        };
        if !momentum_ok {
            let range = if name == OptimizerName::Signum {
                "(0, 1)"
            } else {
                "[0, 1)"
            };
            return Err(format!(
                "train.optimizer.momentum: {m} is outside {range} for {label}"
            ));
        }
        let wd = o.muon_weight_decay();
        if !finite_nonneg(wd) {
            return Err(format!(
                "train.optimizer.muon_weight_decay: {wd} must be >= 0"
            ));
        }
        if o.fused {
            return Err(format!(
                "train.optimizer.fused: the fused kernel is Adam's alone; \
                 set it to false for {label}"
            ));
        }
        if t.resample_every > 0 {
            return Err(format!(
                "train.resample_every: resampling resets Adam's moments and \
                 {label} has other state; set it to 0 or use adam"
            ));
        }
        if name == OptimizerName::Signum {
            if o.weight_decay != 0.0 {
                return Err(
                    "train.optimizer.weight_decay: signum has none (sparsify's SignSGD); \
                     set it to 0"
                        .into(),
                );
            }
            if t.lr_schedule != LrSchedule::Constant || t.lr_decay_steps > 0 {
                return Err(
                    "train.lr_schedule: signum is schedule-free (its averaging stands in \
                     for a decay); keep lr_schedule: constant and lr_decay_steps: 0 \
                     (lr_warmup_steps is fine)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The keys of the training recipes (issue 8): activations beyond the
    /// tutorial ones, schedules, constraints, deep/denoising/transcoder models.
    fn validate_recipe(&self) -> Check {
        self.validate_activation_knobs()?;
        self.validate_matryoshka()?;
        self.validate_rescale()?;
        self.validate_topk_schedules()?;
        self.validate_skip()?;
        self.validate_matching_pursuit()?;
        self.validate_penalty_pairing()?;
        self.validate_sparsity_schedule()?;
        self.validate_deep()?;
        self.validate_target()?;
        self.validate_train_schedule()?;
        self.validate_input_noise()
    }

    /// The numeric knobs of the jumprelu, topk and decoder initialisation.
    fn validate_activation_knobs(&self) -> Check {
        let m = &self.model;
        if !(m.jumprelu_bandwidth > 0.0 && m.jumprelu_bandwidth.is_finite()) {
            return Err(format!(
                "model.jumprelu_bandwidth: {} must be > 0",
                m.jumprelu_bandwidth
            ));
        }
        if !finite_nonneg(m.jumprelu_init_threshold) {
            return Err(format!(
                "model.jumprelu_init_threshold: {} must be >= 0",
                m.jumprelu_init_threshold
            ));
        }
        if !(m.topk_threshold_lr > 0.0 && m.topk_threshold_lr <= 1.0) {
            return Err(format!(
                "model.topk_threshold_lr: {} must be in (0, 1]",
                m.topk_threshold_lr
            ));
        }
        if m.calibrate_threshold
            && !matches!(
                m.activation,
                ActivationKind::Batchtopk | ActivationKind::MatryoshkaBatchtopk
            )
        {
            return Err(format!(
                "model.calibrate_threshold: only used by activations batchtopk and \
                 matryoshka_batchtopk, not {}",
                activation_name(m.activation)
            ));
        }
        if !(m.decoder_init_norm > 0.0 && m.decoder_init_norm.is_finite()) {
            return Err(format!(
                "model.decoder_init_norm: {} must be > 0",
                m.decoder_init_norm
            ));
        }
        Ok(())
    }

    /// `model.rescale_acts_by_decoder_norm`: top-k models with their own
    /// decoder, one layer each way.
    fn validate_rescale(&self) -> Check {
        let m = &self.model;
        if !m.rescale_acts_by_decoder_norm {
            return Ok(());
        }
        let why = match () {
            _ if m.activation != ActivationKind::Topk => Some(format!(
                "only for activation topk, not {}",
                activation_name(m.activation)
            )),
            _ if m.tied => Some("not with model.tied (its decoder is W_enc.T)".into()),
            _ if m.hidden.len() > 1 => Some("not with model.hidden (deep models)".into()),
            _ => None,
        };
        match why {
            Some(w) => Err(format!("model.rescale_acts_by_decoder_norm: {w}")),
            None => Ok(()),
        }
    }

    /// `model.skip_connection`: one linear layer each way, a linear decoder,
    /// and an activation whose training step and exports know the skip term.
    fn validate_skip(&self) -> Check {
        let m = &self.model;
        if !m.skip_connection {
            return Ok(());
        }
        use ActivationKind as A;
        let why = match () {
            _ if !matches!(m.activation, A::Relu | A::Topk | A::Batchtopk | A::Jumprelu) => {
                Some(format!(
                    "supported for activations relu, topk, batchtopk and jumprelu, not {}",
                    activation_name(m.activation)
                ))
            }
            _ if m.hidden.len() > 1 => Some("not with model.hidden (deep models)".into()),
            _ if m.decoder_activation != OutputActivation::None => {
                Some("needs model.decoder_activation: none (the skip term is linear)".into())
            }
            _ => None,
        };
        match why {
            Some(w) => Err(format!("model.skip_connection: {w}")),
            None => Ok(()),
        }
    }

    /// `model.multi_topk` and `train.k_decay_steps`: top-k only.
    fn validate_topk_schedules(&self) -> Check {
        let (m, t) = (&self.model, &self.train);
        let topk = m.activation == ActivationKind::Topk;
        if m.multi_topk && !topk {
            return Err(format!(
                "model.multi_topk: only for activation topk, not {}",
                activation_name(m.activation)
            ));
        }
        if let (true, Some(k)) = (m.multi_topk, m.k) {
            if 4 * k > m.d_hidden {
                return Err(format!(
                    "model.multi_topk: 4 x model.k = {} exceeds model.d_hidden ({})",
                    4 * k,
                    m.d_hidden
                ));
            }
        }
        if t.k_decay_steps < 0 {
            return Err(format!(
                "train.k_decay_steps: {} must be >= 0",
                t.k_decay_steps
            ));
        }
        if t.k_decay_steps > 0 && !topk {
            return Err(format!(
                "train.k_decay_steps: only for activation topk, not {}",
                activation_name(m.activation)
            ));
        }
        Ok(())
    }

    /// `model.matryoshka_widths`, as SAELens's `_validate_matryoshka_config`
    /// checks them: not empty, positive, strictly increasing, and (since
    /// `d_hidden` is added as the last level) none above `d_hidden`.
    fn validate_matryoshka(&self) -> Check {
        let m = &self.model;
        let widths = &m.matryoshka_widths;
        if m.activation != ActivationKind::MatryoshkaBatchtopk {
            if !widths.is_empty() {
                return Err(format!(
                    "model.matryoshka_widths: only used by activation matryoshka_batchtopk, not {}",
                    activation_name(m.activation)
                ));
            }
            return Ok(());
        }
        if widths.is_empty() {
            return Err(
                "model.matryoshka_widths: required for activation matryoshka_batchtopk \
                        (a non-empty list of increasing prefix widths, e.g. [16, 64])"
                    .into(),
            );
        }
        if let Some(&bad) = widths.iter().find(|&&w| w < 1) {
            return Err(format!(
                "model.matryoshka_widths: width {bad} must be at least 1"
            ));
        }
        if let Some(&bad) = widths.iter().find(|&&w| w > m.d_hidden) {
            return Err(format!(
                "model.matryoshka_widths: width {bad} exceeds model.d_hidden ({})",
                m.d_hidden
            ));
        }
        if let Some(pair) = widths.windows(2).find(|p| p[0] >= p[1]) {
            return Err(format!(
                "model.matryoshka_widths: must be strictly increasing ({} then {})",
                pair[0], pair[1]
            ));
        }
        if m.hidden.len() > 1 {
            return Err(
                "model.hidden: not available with activation matryoshka_batchtopk \
                        (its prefixes decode straight to the output)"
                    .into(),
            );
        }
        Ok(())
    }

    /// `model.residual_threshold`, and what SAELens's `MatchingPursuitSAE`
    /// is: tied (its dictionary is `W_dec`, with `W_enc = W_dec.T` and no
    /// encoder bias), trained on the reconstruction alone (no sparsity
    /// coefficient), one linear layer each way, `b_dec` subtracted from the
    /// input and added to the output.
    fn validate_matching_pursuit(&self) -> Check {
        let (m, s) = (&self.model, &self.sparsity);
        let t = m.residual_threshold;
        if !finite_nonneg(t) {
            return Err(format!("model.residual_threshold: {t} must be >= 0"));
        }
        if m.activation != ActivationKind::MatchingPursuit {
            if t != crate::arch::DEFAULT_RESIDUAL_THRESHOLD {
                return Err(format!(
                    "model.residual_threshold: only used by activation matching_pursuit, not {}",
                    activation_name(m.activation)
                ));
            }
            return Ok(());
        }
        if !m.tied {
            return Err("model.tied: activation matching_pursuit is a tied SAE \
                        (its encoder is the decoder's rows); set model.tied: true"
                .into());
        }
        if s.penalty != PenaltyKind::None {
            return Err(
                "sparsity.penalty: activation matching_pursuit is trained on the \
                        reconstruction alone (its sparsity is model.k and \
                        model.residual_threshold); set sparsity.penalty: none"
                    .into(),
            );
        }
        if m.hidden.len() > 1 {
            return Err(
                "model.hidden: not available with activation matching_pursuit \
                        (it pursues over W_dec's rows in the input space)"
                    .into(),
            );
        }
        if m.decoder_activation != OutputActivation::None {
            return Err(
                "model.decoder_activation: activation matching_pursuit needs a \
                        linear decoder (none)"
                    .into(),
            );
        }
        if !m.apply_b_dec_to_input {
            return Err(
                "model.apply_b_dec_to_input: activation matching_pursuit needs \
                        true (b_dec is both removed from the input and added back)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Penalties and activations that only work together. One match: its
    /// arms' order decides which message a config with several faults gets.
    fn validate_penalty_pairing(&self) -> Check {
        let (m, s) = (&self.model, &self.sparsity);
        match s.penalty {
            PenaltyKind::L0 if m.activation != ActivationKind::Jumprelu => Err(format!(
                "sparsity.penalty: l0 needs activation jumprelu (it trains the thresholds), \
                 not {}",
                activation_name(m.activation)
            )),
            PenaltyKind::Tanh if m.activation != ActivationKind::Jumprelu => Err(format!(
                "sparsity.penalty: tanh needs activation jumprelu, not {}",
                activation_name(m.activation)
            )),
            PenaltyKind::QuadraticL0 if m.activation != ActivationKind::Jumprelu => Err(format!(
                "sparsity.penalty: quadratic_l0 needs activation jumprelu, not {}",
                activation_name(m.activation)
            )),
            PenaltyKind::QuadraticL0 => match s.target_l0 {
                None => Err("sparsity.target_l0: required for penalty quadratic_l0 \
                             (the L0 to pull each row towards, e.g. 50)"
                    .into()),
                Some(t) if !(t > 0.0 && t <= m.d_hidden as f64) => Err(format!(
                    "sparsity.target_l0: {t} must be in (0, model.d_hidden = {}]",
                    m.d_hidden
                )),
                Some(_) => Ok(()),
            },
            _ if s.target_l0.is_some() => Err(format!(
                "sparsity.target_l0: only used by penalty quadratic_l0, not {}",
                penalty_name(s.penalty)
            )),
            _ if !(s.tanh_scale > 0.0 && s.tanh_scale.is_finite()) => {
                Err(format!("sparsity.tanh_scale: {} must be > 0", s.tanh_scale))
            }
            _ if !(s.pre_act_weight >= 0.0 && s.pre_act_weight.is_finite()) => Err(format!(
                "sparsity.pre_act_weight: {} must be >= 0",
                s.pre_act_weight
            )),
            _ if s.pre_act_weight > 0.0 && m.activation != ActivationKind::Jumprelu => {
                Err(format!(
                    "sparsity.pre_act_weight: only for activation jumprelu, not {}",
                    activation_name(m.activation)
                ))
            }
            _ if m.jumprelu_ste_to_input && m.activation != ActivationKind::Jumprelu => {
                Err(format!(
                    "model.jumprelu_ste_to_input: only for activation jumprelu, not {}",
                    activation_name(m.activation)
                ))
            }
            _ if m.activation == ActivationKind::Gated && m.tied => {
                Err("model.tied: not supported with activation gated".into())
            }
            PenaltyKind::Auxk if m.hidden.len() > 1 => {
                Err("sparsity.penalty: auxk is not available for a deep model \
                     (model.hidden): its residual is not in W_dec's space"
                    .into())
            }
            PenaltyKind::Auxk if !m.activation.uses_k() => Err(format!(
                "sparsity.penalty: auxk needs an activation with k ({}), not {}",
                ActivationKind::names_with_k(),
                activation_name(m.activation)
            )),
            PenaltyKind::LpAnneal => self.validate_lp_anneal(),
            _ => match lp_anneal_key_set(s) {
                Some(key) => Err(format!(
                    "sparsity.{key}: only used by penalty lp_anneal, not {}",
                    penalty_name(s.penalty)
                )),
                None => Ok(()),
            },
        }
    }

    /// lp_anneal's keys: p > 0 (its gradient at 0 codes is relu's to mask,
    /// so relu codes only), an ordered window, at least one value and one
    /// queued step.
    fn validate_lp_anneal(&self) -> Check {
        let (m, s) = (&self.model, &self.sparsity);
        if m.activation != ActivationKind::Relu {
            return Err(format!(
                "sparsity.penalty: lp_anneal needs activation relu (dictionary_learning's \
                 PAnnealTrainer), not {}",
                activation_name(m.activation)
            ));
        }
        for (key, p) in [("p_start", s.p_start), ("p_end", s.p_end)] {
            if !(p > 0.0 && p.is_finite()) {
                return Err(format!("sparsity.{key}: {p} must be a finite number > 0"));
            }
        }
        if s.anneal_start < 1 {
            return Err(format!(
                "sparsity.anneal_start: {} must be a step >= 1",
                s.anneal_start
            ));
        }
        if let Auto::Value(end) = s.anneal_end {
            if end < s.anneal_start {
                return Err(format!(
                    "sparsity.anneal_end: {end} must be `auto` or >= sparsity.anneal_start ({})",
                    s.anneal_start
                ));
            }
        }
        if s.p_updates < 1 {
            return Err(format!(
                "sparsity.p_updates: {} must be at least 1",
                s.p_updates
            ));
        }
        if s.anneal_queue_length < 1 {
            return Err(format!(
                "sparsity.anneal_queue_length: {} must be at least 1",
                s.anneal_queue_length
            ));
        }
        Ok(())
    }

    /// `sparsity.warmup_steps` and `sparsity.auxk_k`.
    fn validate_sparsity_schedule(&self) -> Check {
        let s = &self.sparsity;
        if s.warmup_steps < 0 {
            return Err(format!(
                "sparsity.warmup_steps: {} must be >= 0",
                s.warmup_steps
            ));
        }
        if let Auto::Value(k) = s.auxk_k {
            if k < 1 {
                return Err(format!("sparsity.auxk_k: {k} must be `auto` or at least 1"));
            }
        }
        Ok(())
    }

    /// `model.hidden`: positive widths ending in `d_hidden`, and the options
    /// that assume the code's neighbours are the data (not for deep models).
    fn validate_deep(&self) -> Check {
        let m = &self.model;
        if let Some(&bad) = m.hidden.iter().find(|&&w| w < 1) {
            return Err(format!("model.hidden: width {bad} must be at least 1"));
        }
        let Some(&last) = m.hidden.last() else {
            return Ok(());
        };
        if last != m.d_hidden {
            return Err(format!(
                "model.d_hidden: {} but model.hidden ends in {last}; the last hidden \
                 width is the code (leave d_hidden out, or make them agree)",
                m.d_hidden
            ));
        }
        if m.tied && m.hidden.len() > 1 {
            return Err("model.tied: not supported for a deep model (model.hidden)".into());
        }
        if m.apply_b_dec_to_input && m.hidden.len() > 1 {
            return Err(
                "model.apply_b_dec_to_input: must be false for a deep model \
                 (model.hidden with more than one width): b_dec is not in the input space"
                    .into(),
            );
        }
        if m.b_dec_init.is_some() && m.hidden.len() > 1 {
            return Err("model.b_dec_init: not available for a deep model \
                 (model.hidden with more than one width): b_dec is not in the data space"
                .into());
        }
        Ok(())
    }

    /// Transcoders (`data.target`): the decoder's side is the target's, and
    /// validation rows need their targets too.
    fn validate_target(&self) -> Check {
        let (m, d) = (&self.model, &self.data);
        if d.target.is_none() {
            if d.valid_target.is_some() {
                return Err("data.valid_target: only used with data.target".into());
            }
            return Ok(());
        }
        if m.apply_b_dec_to_input {
            return Err(
                "model.apply_b_dec_to_input: must be false with data.target \
                 (b_dec lives in the target's space, not the input's)"
                    .into(),
            );
        }
        if m.tied {
            return Err("model.tied: not supported with data.target".into());
        }
        if d.valid.is_some() && d.valid_target.is_none() {
            return Err(
                "data.valid_target: required when data.valid and data.target are given".into(),
            );
        }
        Ok(())
    }

    /// The learning-rate schedule, gradient clipping and dead-latent
    /// resampling.
    fn validate_train_schedule(&self) -> Check {
        let t = &self.train;
        if t.lr_warmup_steps < 0 {
            return Err(format!(
                "train.lr_warmup_steps: {} must be >= 0",
                t.lr_warmup_steps
            ));
        }
        if t.lr_decay_steps < 0 {
            return Err(format!(
                "train.lr_decay_steps: {} must be >= 0",
                t.lr_decay_steps
            ));
        }
        if !finite_nonneg(t.lr_end) {
            return Err(format!("train.lr_end: {} must be >= 0", t.lr_end));
        }
        if let Some(c) = t.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                return Err(format!(
                    "train.grad_clip: {c} must be > 0 (or null for none)"
                ));
            }
        }
        if t.dead_window < 1 {
            return Err(format!(
                "train.dead_window: {} must be at least 1",
                t.dead_window
            ));
        }
        if t.resample_every < 0 {
            return Err(format!(
                "train.resample_every: {} must be >= 0 (0: never)",
                t.resample_every
            ));
        }
        Ok(())
    }

    /// `train.noise_level` as the chosen `train.input_noise` reads it.
    fn validate_input_noise(&self) -> Check {
        let t = &self.train;
        match t.input_noise {
            InputNoise::Gaussian if !finite_nonneg(t.noise_level) => Err(format!(
                "train.noise_level: {} must be >= 0 (the noise standard deviation)",
                t.noise_level
            )),
            InputNoise::Mask if !(0.0..1.0).contains(&t.noise_level) => Err(format!(
                "train.noise_level: {} must be in [0, 1) (the drop probability)",
                t.noise_level
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp_anneal(sets: &[&str]) -> std::result::Result<Config, String> {
        let base = "data: {train: x.npy}\nsparsity: {penalty: lp_anneal}\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_yaml_str(base, "test", &sets).map_err(|e| e.to_string())
    }

    /// lp_anneal's keys are checked, each error naming its key, and they
    /// are refused with another penalty.
    #[test]
    fn lp_anneal_keys_are_validated() {
        let c = lp_anneal(&[]).unwrap();
        assert_eq!(c.sparsity.lp_form, LpForm::Lp);
        let c = lp_anneal(&["sparsity.lp_form=lp^p"]).unwrap();
        assert_eq!(c.sparsity.lp_form, LpForm::LpPowP);
        for (set, needle) in [
            (
                "model.activation=topk",
                "sparsity.penalty: lp_anneal needs activation relu",
            ),
            (
                "sparsity.p_end=0",
                "sparsity.p_end: 0 must be a finite number > 0",
            ),
            ("sparsity.p_start=-1", "sparsity.p_start: -1 must be"),
            (
                "sparsity.anneal_start=0",
                "sparsity.anneal_start: 0 must be a step >= 1",
            ),
            (
                "sparsity.anneal_end=0",
                "sparsity.anneal_end: 0 must be `auto` or >=",
            ),
            (
                "sparsity.p_updates=0",
                "sparsity.p_updates: 0 must be at least 1",
            ),
            (
                "sparsity.anneal_queue_length=0",
                "sparsity.anneal_queue_length: 0 must be at least 1",
            ),
            ("sparsity.lp_form=l2", "lp_form"),
        ] {
            let mut sets = vec![set];
            if set.starts_with("model.activation") {
                sets.push("model.k=4");
            }
            let err = lp_anneal(&sets).expect_err(set);
            assert!(err.contains(needle), "{set}: {err}");
        }
        let base = "data: {train: x.npy}\n";
        let err = Config::from_yaml_str(base, "test", &["sparsity.p_updates=4".into()])
            .expect_err("p_updates without lp_anneal")
            .to_string();
        assert!(
            err.contains("sparsity.p_updates: only used by penalty lp_anneal, not l1"),
            "{err}"
        );
    }
}
