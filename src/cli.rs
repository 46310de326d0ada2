//! Command-line interface: argument types (clap) and one function per command.
//! `main.rs` only parses, calls [`run`] and maps errors to exit codes.

use crate::config::Config;
use crate::data::{csr, npy, synth};
use crate::metrics::{self, Metrics};
use crate::model::Sae;
use crate::pursuit::{Pursuit, PursuitEncoder};
use crate::train::{self, TrainOptions};
use crate::{bail_user, device, export, Result};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "sae",
    version,
    about = "Train, evaluate and export sparse autoencoders on libtorch",
    long_about = "Train, evaluate and export sparse autoencoders on libtorch.\n\n\
        Data comes in and goes out as .npy (float32 out). A typical session:\n  \
        sae data synth --out x.npy --truth truth.npy\n  \
        sae train --config configs/quickstart.yaml --set data.train=x.npy --out runs/q\n  \
        sae eval --model runs/q --data x.npy --truth truth.npy\n  \
        sae encode --model runs/q --data x.npy --out codes.npy\n\n\
        Exit codes: 0 ok, 2 bad input or usage, 1 internal failure."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// libtorch version, CUDA availability and device count, threads and how idle ones wait.
    Info,
    /// Generate data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a sparse autoencoder from a YAML config; writes a run directory.
    Train(TrainArgs),
    /// One training run per point of a grid over config keys; table and plots.
    /// Re-running the same command resumes an interrupted sweep.
    Sweep(SweepArgs),
    /// Reconstruction and sparsity metrics of a model on data.
    Eval(EvalArgs),
    /// Latent codes: float32 [rows, d_hidden], dense .npy or (--sparse) a
    /// scipy CSR .npz.
    Encode(EncodeArgs),
    /// Decoder output of codes [rows, d_hidden] (.npy, or a scipy CSR .npz as
    /// `encode --sparse` writes): float32 [rows, d_in]. A skip model's
    /// skip term needs the input, so it is not in here (see reconstruct).
    Decode(IoArgs),
    /// Encode then decode (plus a skip model's skip term): float32 [rows, d_in].
    Reconstruct(CodeArgs),
    /// Per-row reconstruction MSE (an anomaly score): float32 [rows, 1].
    Score(IoArgs),
    /// Convert a model to TorchScript, SAELens or safetensors.
    Export(ExportArgs),
    /// What each latent learned: statistics, top-activating rows, and a
    /// self-contained browser dashboard (DIR/index.html).
    Latents(LatentsArgs),
    /// Run a language model on token ids and write its activations (one row
    /// per kept token position) to .npy, streamed; optionally a labels file.
    Activations(ActivationsArgs),
}

/// How a language model's tokens become rows (as the data.* keys of a
/// training config).
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Tokens per sequence of a 1-D token stream.
    #[arg(long, value_name = "N")]
    pub context_size: Option<i64>,
    /// Token ids that give no row (e.g. BOS, padding), comma-separated.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub exclude_tokens: Vec<i64>,
    /// Positions that give no row (0-based; negative from the end), comma-separated.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub exclude_positions: Vec<i64>,
    /// Sequences per model call (data.model_batch).
    #[arg(long = "batch-size", value_name = "SEQS", default_value_t = 8)]
    pub model_batch: i64,
}

impl SourceArgs {
    /// The source of `model` on `tokens`, the model on `device`.
    fn spec(&self, model: &str, tokens: &str, device: &str) -> Result<crate::lm::source::Spec> {
        if self.model_batch < 1 {
            bail_user!("--batch-size {}: must be at least 1", self.model_batch);
        }
        if self.context_size.is_some_and(|c| c < 1) {
            bail_user!("--context-size: must be at least 1");
        }
        Ok(crate::lm::source::Spec {
            model: model.to_string(),
            tokens: tokens.to_string(),
            context_size: self.context_size.map(|c| c as usize),
            exclude_tokens: self.exclude_tokens.clone(),
            exclude_positions: self.exclude_positions.clone(),
            group: self.model_batch as usize,
            device: device::resolve(device)?,
            cli: true,
        })
    }
}

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  sae activations --model lm6.pt --tokens tokens.npy --out acts.npy --exclude-positions 0
  sae activations --config c.yaml --out acts.npy        # the rows `sae train` sees from c.yaml
  sae activations --model lm6.pt2 --tokens t.npy --out a.npy --dtype float16 \\
      --vocab vocab.txt --labels labels.txt

The model: the part of a language model up to the layer studied, with
forward(ids int64 [batch, ctx]) returning [batch, ctx, d]. In Python:
  torch.jit.trace(UpTo(lm, 6), ids).save(\"lm6.pt\")            # TorchScript
  torch._inductor.aoti_compile_and_package(torch.export.export(UpTo(lm, 6), (ids,)),
                                           package_path=\"lm6.pt2\")   # torch.export
A .pt2 package holds compiled native code: loading it runs that code, so
treat it like an executable and load only packages you trust. TorchScript
files run no native code.

Rows are the kept positions in token order (sequence by sequence); the model
runs on fixed groups of --batch-size sequences, so the values are exactly
those `sae train` computes from the same source.")]
pub struct ActivationsArgs {
    /// The language model: TorchScript (.pt) or AOTInductor package (.pt2).
    #[arg(long, required_unless_present = "config")]
    pub model: Option<String>,
    /// Token ids .npy: int [n_seq, ctx], or 1-D with --context-size.
    #[arg(long, required_unless_present = "config")]
    pub tokens: Option<String>,
    /// Take model, tokens, exclusions, model batch and device from a
    /// training config's data.* keys (its training sequences: those not
    /// held out by data.valid_fraction).
    #[arg(long, conflicts_with_all = ["model", "tokens"])]
    pub config: Option<PathBuf>,
    /// Output .npy [rows, d].
    #[arg(long)]
    pub out: PathBuf,
    /// float32, float16 or bfloat16 values (bfloat16 as ml_dtypes saves it:
    /// np.load(A).view(ml_dtypes.bfloat16)).
    #[arg(long, default_value = "float32", value_parser = ["float32", "float16", "bfloat16"])]
    pub dtype: String,
    #[command(flatten)]
    pub source: SourceArgs,
    /// One string per token id: a text file (line i = id i) or .json (a
    /// list, or a {token: id} object); with --labels.
    #[arg(long, value_name = "FILE")]
    pub vocab: Option<PathBuf>,
    /// Write one label per row: its token in a few tokens of context, the
    /// token marked ⟦like this⟧ (for `sae latents --labels`).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// cpu | cuda | cuda:N | auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Synthetic rows: sparse non-negative combinations of F random unit-norm
    /// feature vectors plus Gaussian noise.
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output .npy, float32 [n, d_in].
    #[arg(long)]
    pub out: PathBuf,
    /// Rows.
    #[arg(long, default_value_t = 10000)]
    pub n: i64,
    /// Columns (input dimension).
    #[arg(long = "d-in", default_value_t = 32)]
    pub d_in: i64,
    /// Ground-truth features.
    #[arg(long, default_value_t = 64)]
    pub features: i64,
    /// Active features per row (--kind fixed).
    #[arg(long, default_value_t = 3)]
    pub active: i64,
    /// fixed: exactly --active features per row, magnitudes uniform in
    /// [0.5, 1.5). synthbench: SynthSAEBench's kinds of structure (Zipfian
    /// firing probabilities, noisy magnitudes, parents and children; see
    /// src/data/synth.rs).
    #[arg(long, value_enum, default_value_t = SynthKindArg::Fixed)]
    pub kind: SynthKindArg,
    /// synthbench: the Zipf exponent of the firing probabilities.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// synthbench: the most frequent feature's firing probability.
    #[arg(long, default_value_t = 0.3)]
    pub max_prob: f64,
    /// synthbench: the least frequent feature's firing probability.
    #[arg(long, default_value_t = 0.01)]
    pub min_prob: f64,
    /// synthbench: magnitudes are relu(1 + this x N(0, 1)).
    #[arg(long, default_value_t = 0.2)]
    pub magnitude_std: f64,
    /// synthbench: children per parent feature (0: no hierarchy); a child
    /// fires only where its parent does. The roots are the first
    /// features / (1 + children + .. + children^depth), each level follows
    /// breadth first (sae_lens's numbering); the rest fire freely.
    #[arg(long, default_value_t = 0)]
    pub children: i64,
    /// synthbench with --children: levels below the roots (1: parents and
    /// children; 3: roots, children, grandchildren, great-grandchildren).
    #[arg(long, default_value_t = 1)]
    pub depth: i64,
    /// synthbench with --children (2 or more): siblings exclude each other;
    /// where several children of one feature fire, one drawn uniformly is
    /// kept (sae_lens's mutually exclusive children), before the level below
    /// is gated by them.
    #[arg(long)]
    pub exclusive: bool,
    /// synthbench with --children: raise each child's firing probability by
    /// 1 / its parent's (and, with --exclusive, by 1 + its siblings' summed
    /// probability / its parent's), capped at 1, so features fire at about
    /// their Zipf rates (sae_lens's compensate_probabilities).
    #[arg(long)]
    pub compensate: bool,
    /// synthbench: rank of the low-rank Gaussian copula correlating which
    /// features fire (0: independent).
    #[arg(long, default_value_t = 0)]
    pub correlation_rank: i64,
    /// synthbench: scale of the copula factor's entries (sae_lens's
    /// correlation_scale; keep rank x scale^2 below 1).
    #[arg(long, default_value_t = 0.075)]
    pub correlation_scale: f64,
    /// Noise standard deviation.
    #[arg(long, default_value_t = 0.01)]
    pub noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the true features, float32 [features, d_in] (for MMCS).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Also write each row's true feature activations, float32 [n, features]
    /// (for `sae eval --truth-acts`: SynthSAEBench's detection metrics).
    #[arg(long)]
    pub truth_acts: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// YAML config; every key is documented in configs/reference.yaml.
    /// Optional with `--resume DIR` (then DIR/config.yaml is used).
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Run directory [default: runs/<config name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config key, value parsed as YAML; repeatable.
    /// Example: --set train.epochs=5 --set model.k=8
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Replace the run directory if it exists.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Continue an interrupted run from its last checkpoint: the run
    /// directory DIR, or --out (or the default run directory) when no DIR
    /// is given. The config must be the run's own (only train.epochs may
    /// change); without --config, DIR/config.yaml is used.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Sweep YAML: `base:` (a config path relative to this file, or an inline
    /// config) and `grid:` (key path -> list of values). See configs/sweep_*.yaml.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory [default: sweeps/<config name>]. Re-running the
    /// sweep into it resumes it: points whose run directory has summary.json
    /// are kept, points stopped by Ctrl-C, SIGTERM or a kill continue from
    /// their checkpoints (ending as if never stopped), the others train.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a key of every point's base config, value parsed as YAML;
    /// repeatable. The grid still sets its own keys.
    /// Example: --set train.epochs=1 --set seed=4
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Grid points trained at once, each in its own `sae train` process with
    /// cores/N libtorch threads (unless the config sets train.threads).
    /// Results do not depend on N; 1 trains the points in turn in-process.
    #[arg(long, short, value_name = "N", default_value_t = 1,
          value_parser = parse_jobs, allow_negative_numbers = true)]
    pub jobs: usize,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `--jobs`: a whole number of at least 1.
fn parse_jobs(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected the number of points to train at once, at least 1".into()),
    }
}

/// `sae data synth --kind`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthKindArg {
    Fixed,
    Synthbench,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run directory, a .safetensors or TorchScript file, or a SAELens directory.
    #[arg(long)]
    pub model: String,
    /// Data: .npy, file.npz:key, or a directory of .npy shards.
    #[arg(long)]
    pub data: String,
    /// Ground-truth features [features, d_in]: adds MMCS.
    #[arg(long)]
    pub truth: Option<String>,
    /// Each row's true feature activations [rows, features] (with --truth;
    /// `sae data synth --truth-acts` writes them): adds SynthSAEBench's
    /// scores as sae_lens.synthetic defines them (MCC, uniqueness,
    /// precision/recall/F1, shrinkage; src/ground_truth.rs).
    #[arg(long, requires = "truth")]
    pub truth_acts: Option<String>,
    /// For a transcoder (trained with data.target): the rows it should
    /// reconstruct, row-aligned with --data.
    #[arg(long)]
    pub target_data: Option<String>,
    /// Target mean activation rho for `kl_to_target`.
    #[arg(long, default_value_t = 0.05)]
    pub target: f64,
    /// Print JSON (with per-unit mean activation and firing frequency).
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 4096)]
    pub batch_size: i64,
    /// cpu | cuda | cuda:N | auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// Which encoder makes the codes: the model's own, or a pursuit over its
/// decoder rows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EncoderKind {
    /// The model's own encoder.
    #[default]
    Model,
    /// Orthogonal matching pursuit over the decoder rows: k atoms, least-squares
    /// coefficients (may be negative), as scikit-learn's orthogonal_mp.
    Omp,
    /// Matching pursuit over the decoder rows, as SAELens's matching_pursuit
    /// encoder: at most k steps, non-negative codes, no refit.
    Mp,
}

#[derive(Args, Debug, Default)]
pub struct EncoderArgs {
    /// Encoder for the codes: `model` (the model's own), or `omp` / `mp`, a
    /// pursuit over the decoder rows (W_dec) in the model's normalised space,
    /// from norm(x) - b_dec; codes are for the original decoder rows. Needs a
    /// model whose decoder is linear.
    #[arg(long, value_enum, default_value_t = EncoderKind::Model)]
    pub encoder: EncoderKind,
    /// Pursuit encoders: atoms per row (omp, required) or at most this many
    /// steps (mp; default d_in).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub k: Option<i64>,
    /// mp only: a row stops once the norm of its residual (in the model's
    /// normalised space) is below R [default: 0, never].
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub residual_threshold: Option<f64>,
}

impl EncoderArgs {
    /// The pursuit asked for (None: the model's encoder), checked; `d_in`
    /// is mp's default step limit.
    pub fn pursuit(&self, d_in: i64) -> Result<Option<Pursuit>> {
        if let Some(k) = self.k {
            if k < 1 {
                bail_user!("--k {k}: must be at least 1");
            }
        }
        if let Some(r) = self.residual_threshold {
            if !(r >= 0.0 && r.is_finite()) {
                bail_user!("--residual-threshold {r}: must be a finite number >= 0");
            }
        }
        match self.encoder {
            EncoderKind::Model => {
                if self.k.is_some() || self.residual_threshold.is_some() {
                    bail_user!(
                        "--k and --residual-threshold: only for --encoder omp or mp \
                         (the model's own encoder takes neither)"
                    );
                }
                Ok(None)
            }
            EncoderKind::Omp => {
                if self.residual_threshold.is_some() {
                    bail_user!("--residual-threshold: only for --encoder mp");
                }
                match self.k {
                    Some(k) => Ok(Some(Pursuit::Omp { k })),
                    None => bail_user!("--encoder omp: needs --k N, the atoms per row"),
                }
            }
            EncoderKind::Mp => Ok(Some(Pursuit::Mp {
                k: self.k.unwrap_or(d_in),
                residual_threshold: self.residual_threshold.unwrap_or(0.0),
            })),
        }
    }

    /// The pursuit encoder for `model` (None: the model's own encoder).
    fn build(&self, model: &Sae, model_arg: &str) -> Result<Option<PursuitEncoder>> {
        let h = model.spec.d_hidden;
        if let (Some(k), EncoderKind::Omp) = (self.k, self.encoder) {
            if k > h {
                bail_user!(
                    "--k {k}: more atoms than the model's {h} decoder rows (--model {model_arg}); \
                     use --k {h} or fewer"
                );
            }
        }
        match self.pursuit(model.spec.d_in)? {
            None => Ok(None),
            Some(p) => PursuitEncoder::new(model, p)
                .map(Some)
                .with_context(|| format!("--model {model_arg}")),
        }
    }
}

/// `encode` and `reconstruct`: input/output and the encoder.
#[derive(Args, Debug)]
pub struct CodeArgs {
    #[command(flatten)]
    pub io: IoArgs,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// `encode`: the codes' output form on top of [`CodeArgs`].
#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub code: CodeArgs,
    /// Write the codes as a sparse matrix: a scipy CSR .npz (uncompressed,
    /// as `scipy.sparse.save_npz` writes; `scipy.sparse.load_npz` reads it,
    /// `sae decode` too). --out must end in .npz. Streamed: memory holds one
    /// batch plus the row pointers.
    #[arg(long)]
    pub sparse: bool,
    /// Keep only the N largest codes of each row by absolute value (ties: the
    /// lower latent index); the others are zero (dense) or not stored
    /// (--sparse). Zeros are never stored, so a row may keep fewer than N.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub top: Option<i64>,
}

/// How `encode` writes its codes (default: dense, all of them).
#[derive(Debug, Default, Clone, Copy)]
struct CodeOutput {
    sparse: bool,
    top: Option<usize>,
}

impl EncodeArgs {
    fn output(&self) -> Result<CodeOutput> {
        let top = match self.top {
            Some(n) if n < 1 => bail_user!("--top {n}: must be at least 1"),
            Some(n) => Some(n as usize),
            None => None,
        };
        if self.sparse && self.code.io.out.extension().is_none_or(|e| e != "npz") {
            bail_user!(
                "--out {}: --sparse writes a scipy CSR .npz archive; name the output FILE.npz",
                self.code.io.out.display()
            );
        }
        Ok(CodeOutput {
            sparse: self.sparse,
            top,
        })
    }
}

#[derive(Args, Debug)]
pub struct IoArgs {
    /// A run directory, a .safetensors or TorchScript file, or a SAELens directory.
    #[arg(long)]
    pub model: String,
    /// Input .npy, file.npz:key, or a directory of .npy shards (decode: also
    /// a scipy CSR .npz, as `encode --sparse` writes).
    #[arg(long)]
    pub data: String,
    /// Output .npy (float32 unless --dtype, C order; `encode --sparse`: a
    /// CSR .npz), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Rows per batch: input is read and output written in chunks of this
    /// many rows, so memory stays bounded for any file size (fewer for wide
    /// models: 256 MiB of temporaries at most, e.g. 256 rows at 65,536 latents).
    #[arg(long, default_value_t = 4096)]
    pub batch_size: i64,
    /// cpu | cuda | cuda:N | auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The output's values: float32, float16 or bfloat16 (rounded to
    /// nearest even, as numpy's astype; bfloat16 as ml_dtypes saves it, so
    /// np.load(OUT).view(ml_dtypes.bfloat16) reads it). Dense .npy only.
    #[arg(long, default_value = "float32", value_parser = ["float32", "float16", "bfloat16"])]
    pub dtype: String,
}

#[derive(Args, Debug)]
pub struct LatentsArgs {
    /// A run directory, a .safetensors or TorchScript file, or a SAELens directory.
    #[arg(long)]
    pub model: String,
    /// Data: .npy, file.npz:key, or a directory of .npy shards (streamed in
    /// chunks: memory does not grow with the rows).
    #[arg(long, required_unless_present = "lm")]
    pub data: Option<String>,
    /// Instead of --data: a language model (TorchScript .pt or AOTInductor
    /// .pt2) run on --tokens; with --vocab each row is labelled with its
    /// token in context. Its rows go through a temporary .npy beside --out.
    #[arg(long, value_name = "LM", conflicts_with = "data", requires = "tokens")]
    pub lm: Option<String>,
    /// Token ids .npy for --lm: int [n_seq, ctx], or 1-D with --context-size.
    #[arg(long, requires = "lm")]
    pub tokens: Option<String>,
    /// One string per token id (a text file, line i = id i, or .json), for
    /// the labels of --lm rows.
    #[arg(long, value_name = "FILE", requires = "lm")]
    pub vocab: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output directory: latents.csv, top_rows.npy, top_values.npy,
    /// sample_rows.npy, sample_values.npy, index.html.
    #[arg(long)]
    pub out: PathBuf,
    /// Top-activating rows kept per latent (largest code first, ties to the
    /// lower row; -1 in top_rows.npy where a latent fired on fewer rows).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    pub top: i64,
    /// Rows sampled per band of each latent's activation range (thirds of
    /// its max |code|), by a hash of (row, latent), into sample_rows.npy
    /// [d_hidden, 3, N]; 0: none (this takes a second pass over the data).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        allow_negative_numbers = true
    )]
    pub samples: i64,
    /// A text file with one line per data row, shown beside each top row.
    /// Text rows (one per token): the row's token in a few tokens of
    /// context, the token wrapped in ⟦ ⟧ (U+27E6, U+27E7), e.g.
    /// ` the quick⟦ fox⟧ jumps`; the page then lists each latent's top
    /// tokens, highlights the token in its context, searches labels
    /// (#q=...), and shows no decoder input dimensions (and no image unless
    /// --image-shape). Lines without the markers are plain labels (e.g. a
    /// class).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Show rows (and decoder rows) as HxW images [default: a square d_in
    /// is an image].
    #[arg(long, value_name = "HxW")]
    pub image_shape: Option<String>,
    /// Rows per chunk [default: codes of about 64 MB].
    #[arg(long, value_name = "N", hide = true)]
    pub chunk_rows: Option<usize>,
    /// cpu | cuda | cuda:N | auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// A scripted TorchScript module (`torch.jit.load`): encode, decode, forward.
    Torchscript,
    /// A SAELens directory (cfg.json + sae_weights.safetensors).
    Saelens,
    /// This tool's model.safetensors (weights + architecture metadata).
    Safetensors,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run directory, a .safetensors or TorchScript file, or a SAELens directory.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output file (torchscript, safetensors) or directory (saelens), written atomically.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info(),
        Command::Data(DataCommand::Synth(a)) => data_synth(&a),
        Command::Train(a) => train_cmd(&a),
        Command::Sweep(a) => sweep_cmd(&a),
        Command::Eval(a) => eval(&a),
        Command::Encode(a) => {
            let out = a.output()?;
            transform(&a.code.io, &a.code.encoder, Transform::Encode, out)
        }
        Command::Decode(a) => transform(
            &a,
            &EncoderArgs::default(),
            Transform::Decode,
            CodeOutput::default(),
        ),
        Command::Reconstruct(a) => transform(
            &a.io,
            &a.encoder,
            Transform::Reconstruct,
            CodeOutput::default(),
        ),
        Command::Score(a) => transform(
            &a,
            &EncoderArgs::default(),
            Transform::Score,
            CodeOutput::default(),
        ),
        Command::Export(a) => export_cmd(&a),
        Command::Latents(a) => latents_cmd(&a),
        Command::Activations(a) => activations_cmd(&a),
    }
}

fn info() -> Result<()> {
    println!("sae {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch: {}", crate::shim::torch_version());
    // Built with CUDA is a property of the libtorch we loaded; usable needs
    // a GPU and its driver too. (`at::hasCUDA` says false for both without a GPU.)
    match device::libtorch_cuda_library() {
        Some(lib) => println!("libtorch built with CUDA: yes ({lib})"),
        None => println!("libtorch built with CUDA: no (CPU-only libtorch)"),
    }
    println!(
        "GPU usable: {} ({} device(s))",
        if tch::Cuda::is_available() {
            "yes"
        } else {
            "no"
        },
        tch::Cuda::device_count()
    );
    match crate::dist::nccl_version() {
        Some(v) => println!("data-parallel backends: gloo (CPU), nccl {v} (CUDA)"),
        None => println!("data-parallel backends: gloo (CPU); nccl not built in"),
    }
    // train.precision: bf16 is libtorch's autocast (CPU and CUDA).
    println!("precisions: fp32, bf16 (train.precision; autocast on cpu and cuda)");
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!("threads: {}", tch::get_num_threads());
    println!("OpenMP wait: {}", device::omp_wait());
    println!("mkl: {}", tch::utils::has_mkl());
    println!(
        "default device: {}",
        device::describe(tch::Device::cuda_if_available())
    );
    Ok(())
}

fn data_synth(a: &SynthArgs) -> Result<()> {
    for (name, v) in [
        ("--n", a.n),
        ("--d-in", a.d_in),
        ("--features", a.features),
        ("--active", a.active),
    ] {
        if v < 1 {
            bail_user!("{name} {v}: must be at least 1");
        }
    }
    if a.active > a.features {
        bail_user!("--active {}: more than --features {}", a.active, a.features);
    }
    if !(a.noise >= 0.0 && a.noise.is_finite()) {
        bail_user!("--noise {}: must be >= 0", a.noise);
    }
    let kind = match a.kind {
        SynthKindArg::Fixed => synth::SynthKind::Fixed { active: a.active },
        SynthKindArg::Synthbench => {
            if !(0.0 < a.min_prob && a.min_prob < a.max_prob && a.max_prob <= 1.0) {
                bail_user!(
                    "--min-prob {} --max-prob {}: need 0 < min-prob < max-prob <= 1",
                    a.min_prob,
                    a.max_prob
                );
            }
            if !(a.zipf_exponent > 0.0 && a.zipf_exponent.is_finite()) {
                bail_user!("--zipf-exponent {}: must be > 0", a.zipf_exponent);
            }
            if !(a.magnitude_std >= 0.0 && a.magnitude_std.is_finite()) {
                bail_user!("--magnitude-std {}: must be >= 0", a.magnitude_std);
            }
            if a.children < 0 || (a.children > 0 && a.features / (1 + a.children) < 1) {
                bail_user!(
                    "--children {}: needs 0 <= children and at least one parent among --features {}",
                    a.children,
                    a.features
                );
            }
            if a.depth < 1 {
                bail_user!("--depth {}: must be at least 1", a.depth);
            }
            if a.children == 0 && (a.depth != 1 || a.exclusive || a.compensate) {
                bail_user!(
                    "--depth, --exclusive and --compensate shape the hierarchy: add --children N"
                );
            }
            if a.exclusive && a.children < 2 {
                bail_user!(
                    "--exclusive: needs --children 2 or more (siblings to exclude), not {}",
                    a.children
                );
            }
            if a.children > 0 {
                match synth::tree_size(a.children, a.depth) {
                    Some(size) if size <= a.features => {}
                    size => bail_user!(
                        "--children {} --depth {}: one tree has {} features, more than --features {}",
                        a.children,
                        a.depth,
                        size.map_or("too many".to_string(), |s| s.to_string()),
                        a.features
                    ),
                }
            }
            if a.correlation_rank < 0
                || !(a.correlation_scale >= 0.0 && a.correlation_scale.is_finite())
            {
                bail_user!(
                    "--correlation-rank {} --correlation-scale {}: need rank >= 0 and scale >= 0",
                    a.correlation_rank,
                    a.correlation_scale
                );
            }
            synth::SynthKind::SynthBench {
                zipf_exponent: a.zipf_exponent,
                max_prob: a.max_prob,
                min_prob: a.min_prob,
                magnitude_std: a.magnitude_std,
                children: a.children,
                depth: a.depth,
                exclusive: a.exclusive,
                compensate: a.compensate,
                correlation_rank: a.correlation_rank,
                correlation_scale: a.correlation_scale,
            }
        }
    };
    let s = synth::generate(&synth::SynthParams {
        n: a.n,
        d_in: a.d_in,
        features: a.features,
        kind,
        noise: a.noise,
        seed: a.seed,
    });
    npy::write_npy(&a.out, &s.x)?;
    if let Some(t) = &a.truth {
        npy::write_npy(t, &s.truth)?;
    }
    if let Some(t) = &a.truth_acts {
        npy::write_npy(t, &s.acts)?;
        eprintln!("wrote {} [{} x {}]", t.display(), a.n, a.features);
    }
    eprintln!(
        "wrote {} [{} x {}]{}",
        a.out.display(),
        a.n,
        a.d_in,
        a.truth
            .as_ref()
            .map(|t| format!(" and {} [{} x {}]", t.display(), a.features, a.d_in))
            .unwrap_or_default()
    );
    Ok(())
}

fn train_cmd(a: &TrainArgs) -> Result<()> {
    let out = match (&a.resume, &a.out, &a.config) {
        (Some(Some(dir)), Some(out), _) if dir != out => bail_user!(
            "--resume {} and --out {}: name one run directory",
            dir.display(),
            out.display()
        ),
        (Some(Some(dir)), _, _) => dir.clone(),
        (_, Some(out), _) => out.clone(),
        (_, None, Some(config)) => default_out_dir("runs", config),
        (_, None, None) => bail_user!("--config: required (or --resume DIR)"),
    };
    let resume = a.resume.is_some();
    let cfg = match &a.config {
        Some(config) => Config::from_file(config, &a.set)?,
        None => {
            let saved = out.join("config.yaml");
            if !saved.is_file() {
                bail_user!(
                    "--resume {}: not a run directory (no config.yaml)",
                    out.display()
                );
            }
            Config::from_file(&saved, &a.set)?
        }
    };
    let summary = train::train(
        &cfg,
        &TrainOptions {
            out: out.clone(),
            force: a.force,
            progress: !a.quiet,
            resume,
        },
    )?;
    // Data-parallel: the other ranks leave the summary to rank 0.
    if let Some(summary) = summary {
        print!("{}", train::summary_table(&summary));
        println!("run directory: {}", out.display());
    }
    Ok(())
}

fn sweep_cmd(a: &SweepArgs) -> Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_out_dir("sweeps", &a.config));
    crate::sweep::run(
        &a.config,
        &out,
        &crate::sweep::SweepOptions {
            jobs: a.jobs,
            progress: !a.quiet,
            sets: a.set.clone(),
        },
    )?;
    print!("{}", std::fs::read_to_string(out.join("sweep.md"))?);
    println!(
        "sweep directory: {} (sweep.csv, sweep.md, plots/)",
        out.display()
    );
    Ok(())
}

/// `PARENT/<config file stem>`.
fn default_out_dir(parent: &str, config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    Path::new(parent).join(stem)
}

fn load(model: &str, dev: &str) -> Result<Sae> {
    let device = device::resolve(dev)?;
    export::load_model(model, device)
}

fn check_cols(x: &Tensor, want: i64, what: &str, data: &str) -> Result<()> {
    let got = x.size()[1];
    if got != want {
        bail_user!("{data}: has {got} columns but the model's {what} is {want}");
    }
    Ok(())
}

fn eval(a: &EvalArgs) -> Result<()> {
    if a.batch_size < 1 {
        bail_user!("--batch-size {}: must be at least 1", a.batch_size);
    }
    let model = load(&a.model, &a.device)?;
    let pursuit = a.encoder.build(&model, &a.model)?;
    // A float32 C-order file is memory-mapped (any size, bounded memory; the
    // metrics run over it in --batch-size chunks); anything else is read.
    let mapped = crate::data::mmap::map_npy(std::path::Path::new(&a.data)).ok();
    let x = match &mapped {
        Some(m) => {
            crate::normalize::check_finite_chunked(&m.tensor, 8192, &a.data)?;
            m.tensor.shallow_clone()
        }
        None => npy::read_tensor(&a.data)?,
    };
    check_cols(&x, model.spec.d_in, "d_in", &a.data)?;
    let transcoder = model.is_transcoder();
    let y = match (&a.target_data, transcoder) {
        (Some(p), true) => {
            let y = npy::read_tensor(p)?;
            check_cols(&y, model.d_out(), "d_out", p)?;
            if y.size()[0] != x.size()[0] {
                bail_user!(
                    "--target-data {p}: has {} rows but --data has {}",
                    y.size()[0],
                    x.size()[0]
                );
            }
            Some(y)
        }
        (None, true) => bail_user!(
            "--model {}: a transcoder (it reconstructs data.target, {} columns): \
             pass those rows with --target-data",
            a.model,
            model.d_out()
        ),
        (Some(_), false) => {
            bail_user!("--target-data: only for transcoders (models trained with data.target)")
        }
        (None, false) => None,
    };
    let truth = match &a.truth {
        Some(t) => {
            let t = npy::read_tensor(t)?;
            check_cols(&t, model.d_out(), "d_out", a.truth.as_deref().unwrap_or(""))?;
            Some(t)
        }
        None => None,
    };
    let codes: &dyn metrics::CodeSource = match &pursuit {
        Some(p) => p,
        None => &metrics::ModelEncoder,
    };
    let m = metrics::evaluate_codes(
        &model,
        &x,
        y.as_ref(),
        a.batch_size,
        a.target,
        truth.as_ref(),
        codes,
    );
    let ground = match (&a.truth_acts, &truth) {
        (Some(p), Some(t)) => {
            let acts = npy::read_tensor(p)?;
            if acts.size() != [x.size()[0], t.size()[0]] {
                bail_user!(
                    "--truth-acts {p}: shape {:?}, expected [{} rows of --data, {} features of --truth]",
                    acts.size(),
                    x.size()[0],
                    t.size()[0]
                );
            }
            Some(crate::ground_truth::score(&model, codes, &x, &acts, t))
        }
        _ => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&m)?;
        v["mean_activation"] = serde_json::json!(m.mean_activation);
        v["firing_frequency"] = serde_json::json!(m.firing_frequency);
        if let Some(g) = &ground {
            v["ground_truth"] = serde_json::to_value(g)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", metrics_table(&m));
        if let Some(g) = &ground {
            print!("{}", ground_truth_table(g));
        }
    }
    Ok(())
}

/// SynthSAEBench's scores, one per line (`sae eval --truth-acts`).
fn ground_truth_table(g: &crate::ground_truth::GroundTruthScores) -> String {
    let rows = [
        ("mcc", g.mcc),
        ("uniqueness", g.uniqueness),
        ("precision", g.precision),
        ("recall", g.recall),
        ("f1_score", g.f1_score),
        ("accuracy", g.accuracy),
        ("shrinkage", g.shrinkage),
        ("explained_variance", g.explained_variance),
        ("sae_l0", g.sae_l0),
        ("true_l0", g.true_l0),
        ("dead_latents", g.dead_latents as f64),
    ];
    let mut out = String::from("ground truth (SynthSAEBench definitions)\n");
    for (name, v) in rows {
        out += &format!("{name:<20}{v:>12.6}\n");
    }
    out
}

fn metrics_table(m: &Metrics) -> String {
    let mut rows = vec![
        ("mse", m.mse),
        ("fvu", m.fvu),
        ("explained_variance", m.explained_variance),
        ("l0", m.l0),
        ("l1", m.l1),
        ("dead_fraction", m.dead_fraction),
        ("dense_fraction", m.dense_fraction),
        ("kl_to_target", m.kl_to_target),
    ];
    if let Some(v) = m.mmcs {
        rows.push(("mmcs", v));
    }
    let mut out = format!("{:<20}{:>14}\n", "rows", m.rows);
    out += &rows
        .iter()
        .map(|(k, v)| format!("{k:<20}{v:>14.6}\n"))
        .collect::<String>();
    out += "firing frequency     latents\n";
    for b in &m.firing_histogram {
        let range = if b.hi == 0.0 {
            "never (dead)".to_string()
        } else {
            format!("[{:.0e}, {:.0e})", b.lo, b.hi)
        };
        out += &format!("  {range:<18}{:>14}\n", b.count);
    }
    out
}

#[derive(Clone, Copy)]
enum Transform {
    Encode,
    Decode,
    Reconstruct,
    Score,
}

/// Where `transform` writes: a dense `.npy` or a CSR `.npz`.
enum Sink {
    Dense(npy::NpyWriter),
    Sparse(csr::CsrWriter),
}

/// Reads `data` (a .npy/.npz spec, or an opened CSR archive) in batches on
/// a reader thread, computes each batch here, and writes the results on a
/// writer thread, so reading, computing and writing overlap. Neither thread
/// makes a libtorch call (they would compete with the computation for its
/// threads); each holds at most two batches in flight. Returns the sink
/// once every batch is written.
fn pipeline<S: Send>(
    batch: usize,
    data: &str,
    sparse_in: Option<&csr::CsrFile>,
    sink: S,
    mut compute: impl FnMut(&npy::Matrix) -> Result<Vec<f32>>,
    write: impl Fn(&mut S, Vec<f32>, usize) -> Result<()> + Send,
) -> Result<S> {
    use std::sync::mpsc::sync_channel;
    std::thread::scope(|scope| {
        let (to_compute, batches) = sync_channel::<npy::Matrix>(2);
        let (to_write, outputs) = sync_channel::<(Vec<f32>, usize)>(2);
        let reader = scope.spawn(move || -> Result<()> {
            // A closed channel means the computation stopped on an error,
            // which is reported below; the reader just stops.
            let send = |m: npy::Matrix| to_compute.send(m).map_err(|_| anyhow::Error::new(Stopped));
            match sparse_in {
                Some(m) => m.for_each_chunk(batch, send),
                None => npy::for_each_chunk(data, batch, send).map(|_| ()),
            }
        });
        let writer = scope.spawn(move || -> Result<S> {
            let mut sink = sink;
            for (v, rows) in outputs {
                write(&mut sink, v, rows)?;
            }
            Ok(sink)
        });
        let mut computed = Ok(());
        for m in batches {
            match compute(&m) {
                // A closed channel: the writer failed; its error is below.
                Ok(v) => {
                    if to_write.send((v, m.rows)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    computed = Err(e);
                    break;
                }
            }
        }
        drop(to_write);
        let written = writer.join().expect("writer thread panicked");
        let read = reader.join().expect("reader thread panicked");
        computed?;
        let sink = written?;
        match read {
            Err(e) if e.is::<Stopped>() => Ok(sink),
            other => other.map(|_| sink),
        }
    })
}

/// The reader of [`pipeline`] stopped because the computation did.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("computation stopped")
    }
}

impl std::error::Error for Stopped {}

/// `sae encode`, `decode`, `reconstruct` and `score`: `--data` through the
/// model batch by batch into `--out`.
fn transform(a: &IoArgs, enc: &EncoderArgs, what: Transform, codes: CodeOutput) -> Result<()> {
    if a.batch_size < 1 {
        bail_user!("--batch-size {}: must be at least 1", a.batch_size);
    }
    let dtype = npy::OutDtype::parse(&a.dtype).expect("clap checked --dtype");
    if codes.sparse && dtype != npy::OutDtype::Float32 {
        bail_user!(
            "--dtype {}: --sparse writes float32 values; leave --dtype out",
            a.dtype
        );
    }
    let model = load(&a.model, &a.device)?;
    let pursuit = enc.build(&model, &a.model)?;
    let encode = |xb: &Tensor| match &pursuit {
        Some(p) => p.encode(&model, xb),
        None => model.encode(xb),
    };
    let sparse_in = open_transform_input(a, &model, what)?;
    let out_cols = match what {
        Transform::Encode => model.spec.d_hidden,
        Transform::Decode | Transform::Reconstruct => model.d_out(),
        Transform::Score => 1,
    };
    let _guard = tch::no_grad_guard();
    let device = model.device();
    // Streamed: one batch of input and output in memory; the output goes to
    // a temp file renamed into place only when complete.
    let ncols = out_cols as usize;
    let sink = if codes.sparse {
        Sink::Sparse(csr::CsrWriter::create(&a.out, ncols, codes.top)?)
    } else {
        Sink::Dense(npy::NpyWriter::create_as(&a.out, ncols, dtype)?)
    };
    let compute = |m: &npy::Matrix| -> Result<Vec<f32>> {
        let xb = m.to_tensor().to_device(device);
        let y = match what {
            Transform::Encode => encode(&xb),
            Transform::Decode => model.decode(&xb),
            Transform::Reconstruct => model.reconstruct(&xb, &encode(&xb)),
            Transform::Score => {
                // Per-row MSE in the model's (normalised) space, like `mse`.
                let xn = model.norm.apply(&xb);
                let xh = model.forward_normalized(&xn);
                (xh - xn).square().mean_dim(-1, true, Kind::Float)
            }
        };
        let y = y
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        Vec::<f32>::try_from(y.flatten(0, -1)).context("output to host")
    };
    // At most --batch-size rows, fewer for wide models (memory budget).
    let width = model.spec.d_in.max(model.d_out());
    let batch = a
        .batch_size
        .min(metrics::chunk_rows(model.spec.d_hidden, width)) as usize;
    let sink = pipeline(
        batch,
        &a.data,
        sparse_in.as_ref(),
        sink,
        compute,
        |sink, mut v, rows| match (sink, codes.top) {
            (Sink::Dense(w), None) => w.write_rows(&v, rows),
            (Sink::Dense(w), Some(n)) => {
                csr::keep_top(&mut v, ncols, n);
                w.write_rows(&v, rows)
            }
            (Sink::Sparse(w), _) => w.write_rows(&v, rows),
        },
    )?;
    match sink {
        Sink::Dense(w) => {
            let rows = w.rows();
            w.finish()
                .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!(
                "wrote {} [{rows} x {ncols}, {}]",
                a.out.display(),
                dtype.name()
            );
        }
        Sink::Sparse(w) => {
            let (rows, nnz) = w.counts();
            w.finish()?;
            let total = rows as f64 * ncols as f64;
            eprintln!(
                "wrote {} [{rows} x {ncols}, {nnz} stored values, {:.3}% dense]",
                a.out.display(),
                if total > 0.0 {
                    100.0 * nnz as f64 / total
                } else {
                    0.0
                }
            );
        }
    }
    Ok(())
}

/// Opens `--data` for `transform`: a whole .npz holding a scipy sparse
/// matrix (returned; decode only) or a dense array (headers only), and
/// refuses, before anything is written, a width the model does not take
/// and `score` on a transcoder.
fn open_transform_input(a: &IoArgs, model: &Sae, what: Transform) -> Result<Option<csr::CsrFile>> {
    let sparse_in = csr::open(&a.data)?;
    let (want, what_name) = match what {
        Transform::Decode => (model.spec.d_hidden, "d_hidden"),
        _ => (model.spec.d_in, "d_in"),
    };
    // Headers only: check the width before writing anything.
    let cols = match &sparse_in {
        Some(m) if matches!(what, Transform::Decode) => m.cols,
        Some(m) => bail_user!(
            "{}: a sparse matrix of codes [{} x {}]; only `sae decode` reads it",
            a.data,
            m.rows,
            m.cols
        ),
        None => npy::data_shape(&a.data)?.cols,
    };
    if cols as i64 != want {
        bail_user!(
            "{}: has {cols} columns but the model's {what_name} is {want}",
            a.data
        );
    }
    if matches!(what, Transform::Score) && model.d_out() != model.spec.d_in {
        bail_user!(
            "{}: score compares each row with its reconstruction, but this model maps \
             {} columns to {} (a transcoder)",
            a.model,
            model.spec.d_in,
            model.d_out()
        );
    }
    Ok(sparse_in)
}

fn export_cmd(a: &ExportArgs) -> Result<()> {
    let model = export::load_model(&a.model, tch::Device::Cpu)?;
    if a.format != ExportFormat::Saelens && a.out.is_dir() {
        bail_user!(
            "--out {}: is a directory; torchscript and safetensors exports write one file",
            a.out.display()
        );
    }
    match a.format {
        ExportFormat::Torchscript => export::torchscript::save(&model, &a.out)?,
        ExportFormat::Saelens => export::saelens::save(&model, &a.out)?,
        ExportFormat::Safetensors => export::safetensors::save(&model, &a.out)?,
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// `--image-shape HxW`, checked against `d_in`; without it a square `d_in`
/// is an image.
fn image_shape(arg: Option<&str>, d_in: i64) -> Result<Option<(usize, usize)>> {
    let Some(text) = arg else {
        return Ok(crate::plot::square_side(d_in).map(|s| (s, s)));
    };
    let parsed = text.split_once(['x', 'X']).and_then(|(h, w)| {
        Some((
            h.trim().parse::<usize>().ok()?,
            w.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((h, w)) if h >= 1 && w >= 1 => {
            if (h * w) as i64 != d_in {
                bail_user!(
                    "--image-shape {text}: {h}x{w} = {} pixels, but the model's d_in is {d_in}",
                    h * w
                );
            }
            Ok(Some((h, w)))
        }
        _ => bail_user!("--image-shape {text}: expected HxW, e.g. 28x28"),
    }
}

fn activations_cmd(a: &ActivationsArgs) -> Result<()> {
    use crate::lm::{dump, source};
    let (spec, valid_fraction) = match &a.config {
        Some(path) => {
            let cfg = Config::from_file(path, &[])?;
            if !cfg.data.from_model() {
                bail_user!("--config: {}: has no data.model", path.display());
            }
            (source::Spec::from_config(&cfg)?, cfg.data.valid_fraction)
        }
        None => {
            let (m, t) = (a.model.as_deref(), a.tokens.as_deref());
            let spec = a
                .source
                .spec(m.expect("required"), t.expect("required"), &a.device)?;
            (spec, 0.0)
        }
    };
    let corpus = std::rc::Rc::new(source::Corpus::open(&spec)?);
    let n = corpus.n_seq();
    let held = source::held_out(n, valid_fraction)?;
    let src = source::ModelSource::new(corpus, 0, n - held);
    let vocab = dump::read_vocab(&src, a.vocab.as_deref())?;
    let w = dump::write(
        &src,
        &dump::Options {
            out: a.out.clone(),
            dtype: npy::OutDtype::parse(&a.dtype).expect("clap checked --dtype"),
            vocab,
            labels: a.labels.clone(),
            progress: !a.quiet,
        },
    )?;
    let held = match held {
        0 => String::new(),
        h => format!(" (the last {h} held out for validation)"),
    };
    println!(
        "{} rows x {} from {} sequences{held} in {:.2} s ({:.0} rows/s); wrote {}{}",
        w.rows,
        w.d,
        w.sequences,
        w.seconds,
        w.rows as f64 / w.seconds.max(1e-9),
        a.out.display(),
        a.labels
            .as_ref()
            .map(|l| format!(" and {}", l.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// A language model's rows (and labels) written for `sae latents --lm`;
/// removed when dropped.
struct LmRows {
    dir: PathBuf,
    rows: PathBuf,
    labels: Option<PathBuf>,
}

impl Drop for LmRows {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `lm` on `tokens` into a temporary directory beside `--out`.
fn lm_rows(a: &LatentsArgs, lm: &str, tokens: &str, d_in: i64) -> Result<LmRows> {
    use crate::lm::{dump, source};
    let spec = a.source.spec(lm, tokens, &a.device)?;
    let corpus = std::rc::Rc::new(source::Corpus::open(&spec)?);
    if corpus.d != d_in {
        bail_user!(
            "--lm {lm}: gives rows of width {} but the model {} takes {d_in}",
            corpus.d,
            a.model
        );
    }
    let n = corpus.n_seq();
    let src = source::ModelSource::new(corpus, 0, n);
    let vocab = dump::read_vocab(&src, a.vocab.as_deref())?;
    let name = a
        .out
        .file_name()
        .map_or("latents".into(), |n| n.to_string_lossy().into_owned());
    let dir = a
        .out
        .with_file_name(format!(".{name}.lm-rows.{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| crate::error::user(format!("cannot write {}: {e}", dir.display())))?;
    let rows = LmRows {
        rows: dir.join("rows.npy"),
        labels: vocab.as_ref().map(|_| dir.join("labels.txt")),
        dir,
    };
    let w = dump::write(
        &src,
        &dump::Options {
            out: rows.rows.clone(),
            dtype: npy::OutDtype::Float32,
            vocab,
            labels: rows.labels.clone(),
            progress: !a.quiet,
        },
    )?;
    if !a.quiet {
        eprintln!("{lm}: {} rows from {} sequences", w.rows, w.sequences);
    }
    Ok(rows)
}

fn latents_cmd(a: &LatentsArgs) -> Result<()> {
    if a.top < 1 {
        bail_user!("--top {}: must be at least 1", a.top);
    }
    if a.chunk_rows == Some(0) {
        bail_user!("--chunk-rows 0: must be at least 1");
    }
    if a.samples < 0 {
        bail_user!("--samples {}: must be 0 or more", a.samples);
    }
    let model = load(&a.model, &a.device)?;
    // --lm: the model's rows (and labels) through a temporary dump.
    let dumped = match (&a.lm, &a.tokens) {
        (Some(lm), Some(tokens)) => Some(lm_rows(a, lm, tokens, model.spec.d_in)?),
        _ => None,
    };
    let (data, labels) = match &dumped {
        Some(t) => (
            t.rows.to_string_lossy().into_owned(),
            a.labels.clone().or_else(|| t.labels.clone()),
        ),
        None => (a.data.clone().expect("required"), a.labels.clone()),
    };
    let pursuit = a.encoder.build(&model, &a.model)?;
    let image = image_shape(a.image_shape.as_deref(), model.spec.d_in)?;
    let (codes, encoder_name): (&dyn metrics::CodeSource, String) = match &pursuit {
        Some(p) => (
            p,
            format!("{:?}", a.encoder.pursuit(model.spec.d_in)?)
                .to_lowercase()
                .replace(['{', '}'], "")
                .trim()
                .replace("  ", " "),
        ),
        None => (&metrics::ModelEncoder, "model".to_string()),
    };
    let opts = crate::latents::Options {
        top: a.top,
        chunk_rows: a
            .chunk_rows
            .unwrap_or_else(|| crate::latents::default_chunk_rows(model.spec.d_hidden)),
        image,
        image_given: a.image_shape.is_some(),
        samples: a.samples,
        labels,
        progress: !a.quiet,
        model_name: a.model.clone(),
        data_name: match (&a.lm, &a.tokens) {
            (Some(lm), Some(t)) => format!("{lm} on {t}"),
            _ => data.clone(),
        },
        encoder_name,
    };
    let stats = crate::latents::run(&model, codes, &data, &a.out, &opts)?;
    let dead = (0..stats.d_hidden as usize)
        .filter(|&j| stats.dead(j))
        .count();
    println!(
        "{} rows, {} latents ({dead} dead); wrote {}/latents.csv, top_rows.npy, top_values.npy, {}index.html",
        stats.rows,
        stats.d_hidden,
        a.out.display(),
        if a.samples > 0 {
            "sample_rows.npy, sample_values.npy, "
        } else {
            ""
        }
    );
    Ok(())
}
