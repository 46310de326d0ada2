//! A training run, in parts (docs/ARCHITECTURE.md shows how a batch flows):
//! - [`plan`]: the config resolved and checked, the memory it needs
//!   estimated ([`memory`]), data read, model initialised ([`init`]),
//!   before anything is written;
//! - [`batches`]: where batches come from (memory or streamed windows) and
//!   each epoch's order;
//! - [`step`]: one step, the loss terms then the update;
//! - [`state`]: where the loop stands, and the dead-latent counters;
//! - [`run_dir`]: everything written to the run directory;
//! - [`interrupt`], [`progress`]: signals, and what the user sees.
//!
//! This file is the loop that wires them, and the end of the run.

pub mod batches;
pub mod calibrate;
pub mod init;
pub mod interrupt;
pub mod memory;
pub mod plan;
pub mod progress;
pub mod run_dir;
pub mod state;
pub mod step;

pub use init::{geometric_median, normalize_decoder_rows};
pub use step::{clip_grad_norm, remove_parallel_gradient};

use crate::checkpoint;
use crate::config::{Config, PenaltyKind};
use crate::data::dataset::Shard;
use crate::metrics::{self, CodeSource, Metrics, ModelEncoder};
use crate::model::Sae;
use crate::pursuit::{Pursuit, PursuitEncoder};
use crate::{bail_user, device, dist, Result};
use batches::{Batch, Batches};
use plan::Plan;
use progress::Progress;
use run_dir::{MetricsLog, RunDir, StepLog};
use serde::Serialize;
use state::{DeadTracker, Position, State};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use step::{Learner, StepOutput, StepParams};
use tch::{Device, Kind, Tensor};

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
    /// libtorch's CPU threads, and how its OpenMP workers wait
    /// (`device::omp_wait`): what decides speed on a shared machine.
    pub threads: i64,
    pub omp_wait: String,
    /// Data-parallel ranks (1: a single process) and their c10d backend.
    pub world_size: usize,
    /// `train.precision`: fp32, or bf16 (autocast around the forward pass).
    pub precision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Data-parallel: seconds of the training loop that rank 0 spent in
    /// collectives (gradient allreduce, waiting for slower ranks included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collective_seconds: Option<f64>,
    /// Data-parallel: gradient buckets (`dist.bucket_mb`) whose allreduce
    /// started during backward, overlapping it (0 with `bucket_mb: 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlapped_buckets: Option<u64>,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// relu/jumprelu models: how many of this process's steps took the
    /// sparse pass (`train.sparse_step`); absent for other models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparse_steps: Option<i64>,
    pub final_loss: f64,
    /// data.model: sequences the training windows ran the model on (this
    /// rank's share with several ranks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_sequences: Option<u64>,
    pub train: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<Metrics>,
    /// `eval.encoder` omp|mp: the same metrics with that pursuit encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pursuit: Option<PursuitMetrics>,
    /// What the run did that the user likely did not want (also printed on
    /// stderr); left out when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The final metrics with a pursuit encoder over the trained decoder.
#[derive(Debug, Serialize)]
pub struct PursuitMetrics {
    /// omp | mp
    pub encoder: String,
    pub k: i64,
    pub train: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<Metrics>,
}

/// Above this fraction of dead latents on the training rows, a run warns.
pub const DEAD_WARN_FRACTION: f64 = 0.3;

/// A run warns when its last logged epoch's mean loss is above this many
/// times its first epoch's.
pub const LOSS_GREW_FACTOR: f64 = 1.5;

/// Above this FVU on the training rows a run warns: its reconstruction is
/// worse than the rows' mean.
pub const FVU_WARN_ABOVE: f64 = 1.0;

/// Where a run's logged loss started and where it ended: the start is the
/// first logged step's loss or the first epoch's mean, whichever is lower
/// (a run can blow up in its first steps), the end the last epoch's mean.
/// Losses are taken at the last step's sparsity weight
/// (`sparsity.warmup_steps` raises the weight, and with it the loss, in a
/// healthy run).
#[derive(Debug, Clone, PartialEq)]
pub struct LossTrend {
    /// `step 1`, `epoch 1`: what `first` is.
    pub first_what: String,
    pub first: f64,
    pub last_epoch: i64,
    pub last: f64,
}

impl LossTrend {
    /// From the lines of `metrics.jsonl` (None with fewer than two epochs).
    pub fn of_log(text: &str) -> Option<LossTrend> {
        // (step, epoch, loss, sparsity_loss, sparsity_weight) of each line.
        let lines: Vec<(i64, i64, f64, f64, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some((
                    v["step"].as_i64()?,
                    v["epoch"].as_i64()?,
                    // NaN is written as null: it counts as NaN.
                    v["loss"].as_f64().unwrap_or(f64::NAN),
                    v["sparsity_loss"].as_f64().unwrap_or(0.0),
                    v["sparsity_weight"].as_f64().unwrap_or(0.0),
                ))
            })
            .collect();
        let (first, last) = (lines.first()?, lines.last()?);
        if first.1 == last.1 {
            return None;
        }
        let w_last = last.4;
        let at_last_weight =
            |&(_, _, loss, sparsity, w): &(i64, i64, f64, f64, f64)| loss + (w_last - w) * sparsity;
        let mean = |e: i64| {
            let of: Vec<f64> = lines
                .iter()
                .filter(|l| l.1 == e)
                .map(at_last_weight)
                .collect();
            of.iter().sum::<f64>() / of.len() as f64
        };
        let (epoch_mean, step) = (mean(first.1), at_last_weight(first));
        let (first_what, first_loss) = match step < epoch_mean {
            true => (format!("step {}", first.0), step),
            false => (format!("epoch {}", first.1), epoch_mean),
        };
        Some(LossTrend {
            first_what,
            first: first_loss,
            last_epoch: last.1,
            last: mean(last.1),
        })
    }

    fn grew(&self) -> bool {
        self.first.is_finite() && self.last > LOSS_GREW_FACTOR * self.first.max(0.0)
    }
}

/// A metric for a message: 4 decimals, or 3 significant digits in
/// scientific notation when far from 1.
fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 1e5 || (a > 0.0 && a < 1e-3) => format!("{v:.3e}"),
        _ => format!("{v:.4}"),
    }
}

/// Runs of fewer steps than this whose loss did not grow are short, not
/// wrong: their FVU above 1 is not warned about.
pub const SHORT_RUN_STEPS: i64 = 200;

/// What a run's warnings are judged from besides its final metrics.
#[derive(Debug, Clone, Default)]
struct RunFacts {
    /// The logged loss's start and end (two epochs or more).
    trend: Option<LossTrend>,
    /// Steps the run did.
    steps: i64,
}

/// The likely causes of a run that went wrong, from what it shows: a loss
/// that grew (or NaN) points at the learning rate; a model wider than its
/// training rows at the width.
fn likely_causes(cfg: &Config, rows: i64, facts: &RunFacts, nan: bool) -> String {
    let grew = nan || facts.trend.as_ref().is_some_and(LossTrend::grew);
    let mut causes = Vec::new();
    let lr = format!(
        "a learning rate too high (train.optimizer.lr: {}; try a tenth of it)",
        cfg.train.optimizer.lr
    );
    if grew {
        causes.push(lr.clone());
    }
    let h = cfg.model.d_hidden;
    if h > rows {
        causes.push(format!(
            "a model far wider than its data (model.d_hidden: {h} latents for {rows} training \
             rows; use fewer latents or more rows)"
        ));
    }
    if causes.is_empty() {
        causes.push(lr);
    }
    let s = if causes.len() == 1 { "" } else { "s" };
    format!("likely cause{s}: {}", causes.join(", or "))
}

/// The warnings of a finished run, from its training-row metrics, the trend
/// of its logged loss and its length.
fn run_warnings(cfg: &Config, train: &Metrics, facts: &RunFacts) -> Vec<String> {
    let mut out = Vec::new();
    let nan: Vec<&str> = [
        ("mse", train.mse),
        ("fvu", train.fvu),
        ("l0", train.l0),
        ("l1", train.l1),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_nan())
    .map(|(name, _)| name)
    .collect();
    if !nan.is_empty() {
        let cause = match (nan.as_slice(), train.mse.is_finite()) {
            // Σ(x − x̄)² is 0: FVU divides by it.
            (["fvu"], true) => "the training rows do not vary (every row is the same)".to_string(),
            _ => likely_causes(cfg, train.rows, facts, true),
        };
        out.push(format!(
            "{} {} NaN on the training rows; {cause}",
            nan.join(", "),
            if nan.len() == 1 { "is" } else { "are" }
        ));
    }
    if let Some(t) = facts.trend.as_ref().filter(|t| t.grew()) {
        out.push(format!(
            "the loss grew: epoch {}'s mean loss {} is {}x {}'s {}; {}",
            t.last_epoch,
            num(t.last),
            num(t.last / t.first),
            t.first_what,
            num(t.first),
            likely_causes(cfg, train.rows, facts, false)
        ));
    }
    let grew = facts.trend.as_ref().is_some_and(LossTrend::grew);
    let dead = train.dead_fraction > DEAD_WARN_FRACTION;
    // Most latents dead and a loss that fell: the dead latents are why the
    // reconstruction is poor, and their warning says so (with the FVU).
    let fvu_with_dead = train.fvu > FVU_WARN_ABOVE && dead && !grew;
    // A few steps with a falling loss went nowhere yet, not wrong: no
    // warning (sweeps and tests of a handful of steps stay quiet).
    let just_short = facts.steps < SHORT_RUN_STEPS && !grew;
    if train.fvu > FVU_WARN_ABOVE && !fvu_with_dead && !just_short {
        out.push(format!(
            "train fvu is {}, above {FVU_WARN_ABOVE}: the reconstruction is worse than the \
             rows' mean; {}",
            num(train.fvu),
            likely_causes(cfg, train.rows, facts, false)
        ));
    }
    if dead {
        let mut remedies = Vec::new();
        if cfg.model.activation.uses_k()
            && cfg.sparsity.penalty != PenaltyKind::Auxk
            && cfg.model.hidden.len() <= 1
        {
            remedies.push("sparsity.penalty: auxk".to_string());
        }
        if cfg.train.resample_every == 0 && cfg.model.hidden.len() <= 1 {
            remedies.push("train.resample_every".to_string());
        }
        remedies.push(format!(
            "a lower train.optimizer.lr (now {})",
            cfg.train.optimizer.lr
        ));
        let fvu = match fvu_with_dead {
            true => format!(
                " (train fvu is {}, above {FVU_WARN_ABOVE}: worse than the rows' mean)",
                num(train.fvu)
            ),
            false => String::new(),
        };
        out.push(format!(
            "{:.1}% of latents are dead (never active on the training rows, more than {:.0}%){fvu}; \
             try {}",
            100.0 * train.dead_fraction,
            100.0 * DEAD_WARN_FRACTION,
            remedies.join(", or ")
        ));
    }
    out
}

/// Rows processed per evaluation batch (bounded memory, any data size).
const EVAL_BATCH: i64 = 4096;

/// Trains per `cfg` and writes the run directory `opts.out`. Under a
/// data-parallel launcher this process is one rank: it trains its part of
/// each batch, and only rank 0 writes the run directory and gets the
/// summary (the others get `None`).
///
/// `--resume` of a run that is finished does nothing: it says so (on
/// stdout) and returns `None`.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<Option<Summary>> {
    if let Some(done) = run_dir::finished(opts, cfg) {
        println!("{done}");
        return Ok(None);
    }
    let mut session = Session::open(cfg, opts, &Sources::default())?;
    let interrupter = interrupt::Interrupter::register()?;
    // Tiny models: MKL single-threaded (see device::SerialBlas).
    let _serial_blas = session.serial_blas().then(device::SerialBlas::new);
    session.start_clock();
    while session.step(agreed_signal(interrupter.received()))? {}
    drop(interrupter);
    session.finish()
}

/// [`train`] for a caller that holds the signal handlers itself (`sae
/// sweep`, for all its points): a signal `interrupter` has received, before
/// or during the run, checkpoints it and stops it at its next step with
/// [`crate::error::Interrupted`]. The handlers stay in place while the run
/// finishes, so a signal then leaves a finished run.
pub fn train_interruptible(
    cfg: &Config,
    opts: &TrainOptions,
    interrupter: &interrupt::Interrupter,
) -> Result<Option<Summary>> {
    let mut session = Session::open(cfg, opts, &Sources::default())?;
    let _serial_blas = session.serial_blas().then(device::SerialBlas::new);
    session.start_clock();
    while session.step(agreed_signal(interrupter.received()))? {}
    session.finish()
}

/// Trains several runs in this process, one step at a time each, the run
/// that has seen the fewest rows going next: runs whose rows come from one
/// language model (`data.model`) share its windows, so the model runs once
/// per window for all of them (`sae sweep`). Each run keeps its directory,
/// checkpoints and resume, and ends as it would trained alone: rows do not
/// depend on who computed them, and every step re-seeds what it draws.
/// A signal checkpoints every run.
pub fn train_together(runs: &[(Config, TrainOptions)], sources: &Sources) -> Result<Vec<Summary>> {
    let mut sessions = runs
        .iter()
        .map(|(cfg, opts)| Session::open(cfg, opts, sources))
        .collect::<Result<Vec<_>>>()?;
    let interrupter = interrupt::Interrupter::register()?;
    let _serial_blas = sessions
        .iter()
        .all(Session::serial_blas)
        .then(device::SerialBlas::new);
    let mut running: Vec<usize> = (0..sessions.len()).collect();
    while let Some(at) = (0..running.len()).min_by_key(|&a| sessions[running[a]].state.samples) {
        let s = &mut sessions[running[at]];
        if let Some(sig) = interrupter.received() {
            for &i in &running {
                sessions[i].checkpoint()?;
            }
            return Err(interrupt::stopped(sig, |name| {
                format!(
                    "interrupted by {name}; every run checkpointed; run the same command again \
                     to continue"
                )
            }));
        }
        let t = Instant::now();
        let more = s.step(None)?;
        s.busy += t.elapsed();
        if !more {
            running.remove(at);
        }
    }
    drop(interrupter);
    sessions
        .into_iter()
        .map(|s| Ok(s.finish()?.expect("a single process writes its run")))
        .collect()
}

/// Language models opened by the runs of this process, shared by those
/// with the same `data.*` (see [`train_together`]).
#[derive(Default)]
pub struct Sources {
    corpora: std::cell::RefCell<Vec<(String, std::rc::Rc<crate::lm::source::Corpus>)>>,
    /// Runs train together: what a corpus computes is kept for the others.
    together: bool,
}

impl Sources {
    /// Sequences the models of every corpus have run on.
    pub fn sequences_run(&self) -> u64 {
        self.corpora
            .borrow()
            .iter()
            .map(|(_, c)| c.sequences_run.get())
            .sum()
    }

    /// For runs trained together ([`train_together`]).
    pub fn together() -> Sources {
        Sources {
            together: true,
            ..Sources::default()
        }
    }

    /// The corpus of `spec`, opened once.
    pub fn corpus(
        &self,
        spec: &crate::lm::source::Spec,
    ) -> Result<std::rc::Rc<crate::lm::source::Corpus>> {
        let key = format!("{spec:?}");
        if let Some((_, c)) = self.corpora.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let c = std::rc::Rc::new(crate::lm::source::Corpus::open(spec)?);
        if self.together {
            c.share();
        }
        self.corpora.borrow_mut().push((key, c.clone()));
        Ok(c)
    }
}

/// One run from its plan to its summary, stepped by the caller.
pub struct Session {
    opts_out: PathBuf,
    shard: Shard,
    group: Option<&'static dist::Group>,
    run: RunDir,
    cfg: Config,
    device: Device,
    total_steps: i64,
    data: plan::Data,
    learner: Learner,
    state: State,
    batches: Batches,
    report: Reporter,
    sparse_steps: Option<i64>,
    widest: i64,
    started: Instant,
    /// Time in this run's steps (trained together: its own share).
    busy: Duration,
    busy_before: f64,
    early_before: u64,
    /// Training rows seen when this process took the run up (resumed: the
    /// checkpoint's), so the summary's rate is this process's own.
    samples_before: i64,
}

impl Session {
    /// Plans the run, creates (or reopens, resuming) its directory and
    /// positions the batches; the first window of streamed rows is read.
    pub fn open(cfg: &Config, opts: &TrainOptions, sources: &Sources) -> Result<Session> {
        let group = join_group(cfg)?;
        let shard = group.map_or(Shard::ALL, |g| Shard {
            rank: g.rank,
            world: g.world,
        });
        run_dir::check_can_start(opts, shard.rank == 0)?;
        let plan = Plan::build(cfg, shard.world, sources)?;
        let run = RunDir::create(opts, &plan.cfg, shard.rank == 0)?;
        if let Some(g) = group {
            // The others read the run directory (a checkpoint) once rank 0 made it.
            g.barrier();
            dist::check()?;
        }
        let (model, source) = (plan.model, plan.source);
        let (cfg, device, total_steps) = (plan.cfg, plan.device, plan.total_steps);
        let widest =
            model.spec.d_hidden * model.spec.d_in.max(model.d_out()) * plan.batch_rows as i64;
        let (learner, state, pos) = start(&run, model, &cfg, device, opts.resume, total_steps)?;
        let report = Reporter {
            log: run.metrics_log(opts.resume.then_some(pos.step))?,
            progress: Progress::new(
                opts.progress && run.writer,
                total_steps,
                cfg.train.epochs,
                &device::place(device),
            ),
            valid: plan.valid_joined,
        };
        let (order, per_epoch) = (plan.fixed_order, plan.per_epoch);
        let batches = Batches::new(source, &cfg, order, per_epoch, device, &pos, shard)?;
        report.progress.set_step(pos.step);
        let sparse_steps = learner.can_step_sparse().then_some(0);
        Ok(Session {
            opts_out: opts.out.clone(),
            shard,
            group,
            run,
            cfg,
            device,
            total_steps,
            data: plan.data,
            learner,
            state,
            batches,
            report,
            sparse_steps,
            widest,
            started: Instant::now(),
            busy: Duration::ZERO,
            busy_before: group.map_or(0.0, |g| g.busy_seconds()),
            early_before: group.map_or(0, |g| g.early_buckets()),
            samples_before: pos.samples,
        })
    }

    /// Whether MKL should run single-threaded for this model's matmuls.
    fn serial_blas(&self) -> bool {
        self.device == Device::Cpu && self.widest < device::SMALL_MATMUL_WORK
    }

    /// The training loop's timing starts now (after the set-up).
    fn start_clock(&mut self) {
        self.started = Instant::now();
    }

    /// One step; false once the run has no batch left. A `signal`
    /// checkpoints and ends the run with the error that says how to resume.
    pub fn step(&mut self, signal: Option<i32>) -> Result<bool> {
        let Some(batch) = self.batches.next_batch()? else {
            return Ok(false);
        };
        let (cfg, state) = (&self.cfg, &mut self.state);
        state.advance(&batch);
        let params = self.learner.params_at(state.step, self.total_steps);
        let out = self.learner.step(&batch, &params, &mut state.dead);
        if let (Some(n), Some(leaf)) = (&mut self.sparse_steps, &out.forward.leaf) {
            *n += leaf.support.is_some() as i64;
        }
        if state.step % cfg.train.log_every == 0 || batch.end_of_epoch {
            self.report
                .logged_step(&self.run, &self.learner, &out, &batch, &params, state)?;
        }
        self.report.progress.step_done();
        dist::check()?;
        if state.step % cfg.train.checkpoint_every == 0 || signal.is_some() {
            self.checkpoint()?;
        }
        if let Some(sig) = signal {
            self.report.progress.finish();
            let (step, total) = (self.state.step, self.total_steps);
            return Err(interrupt::stopped(sig, |name| {
                format!(
                    "interrupted by {name} after step {step} of {total}; checkpoint saved in {}; \
                     continue with: sae train --resume {}",
                    checkpoint::path(&self.opts_out).display(),
                    self.opts_out.display()
                )
            }));
        }
        if batch.end_of_epoch {
            self.report.log.flush()?;
        }
        Ok(true)
    }

    /// Writes the metrics so far and a checkpoint.
    fn checkpoint(&mut self) -> Result<()> {
        self.report.log.flush()?;
        self.run.save_checkpoint(&mut self.learner, &mut self.state)
    }

    /// The end of the run: the last checkpoint, then (on the writer) the
    /// model, metrics, summary and report.
    pub fn finish(mut self) -> Result<Option<Summary>> {
        self.report.progress.finish();
        let model_sequences = self
            .data
            .model_source
            .as_ref()
            .map(|s| s.corpus.window_sequences.get());
        if let (Some(n), true) = (model_sequences, self.shard.world > 1) {
            eprintln!(
                "rank {}: the model ran on {n} sequences of the training windows",
                self.shard.rank
            );
        }
        let seconds = match self.busy.is_zero() {
            true => self.started.elapsed().as_secs_f64(),
            false => self.busy.as_secs_f64(),
        };
        self.report.log.flush()?;
        if self.state.unsaved() {
            self.run
                .save_checkpoint(&mut self.learner, &mut self.state)?;
        }
        if !self.run.writer {
            return Ok(None);
        }
        let (cfg, state, group) = (&self.cfg, &self.state, self.group);
        let Finished {
            model,
            train,
            valid,
            pursuit,
            warnings,
        } = finish(&self.run, self.learner, cfg, &self.data, state.step)?;
        let summary = Summary {
            steps: state.step,
            epochs: cfg.train.epochs,
            device: device::describe(self.device),
            threads: tch::get_num_threads() as i64,
            omp_wait: device::omp_wait(),
            world_size: self.shard.world,
            precision: cfg.train.precision.name().to_string(),
            backend: group.map(|g| g.backend.name().to_string()),
            collective_seconds: group.map(|g| g.busy_seconds() - self.busy_before),
            overlapped_buckets: group.map(|g| g.early_buckets() - self.early_before),
            seconds,
            samples_per_second: (state.samples - self.samples_before) as f64 / seconds.max(1e-9),
            sparse_steps: self.sparse_steps,
            final_loss: state.last_loss,
            model_sequences,
            train,
            valid,
            pursuit,
            warnings,
        };
        self.run.save_summary(&model, &summary)?;
        self.run.save_report(&model, &self.data, cfg)?;
        Ok(Some(summary))
    }
}

/// What the end of a run leaves.
struct Finished {
    model: Sae,
    train: Metrics,
    valid: Option<Metrics>,
    pursuit: Option<PursuitMetrics>,
    warnings: Vec<String>,
}

/// The end of a run: the trained model (its threshold calibrated where the
/// config asks) saved, its metrics on the training and validation rows (and
/// with `eval.encoder`'s pursuit), and the warnings they call for (also
/// printed).
fn finish(
    run: &RunDir,
    learner: Learner,
    cfg: &Config,
    data: &plan::Data,
    steps: i64,
) -> Result<Finished> {
    let mut model = learner.into_model();
    device::release_memory();
    if cfg.model.calibrate_threshold {
        let k = cfg.model.k.expect("validated: calibrate_threshold needs k");
        calibrate::calibrate_threshold(&mut model, &data.train, k);
    }
    // data.normalize: whiten: the saved model (and every metric below) is on raw rows.
    model.fold_whitening();
    run.save_model(&model)?;
    let (train, valid) = evaluate(&model, data, cfg.sparsity.target, &ModelEncoder);
    let pursuit = match Pursuit::from_config(cfg, model.spec.d_in) {
        Some(p) => {
            let enc = PursuitEncoder::new(&model, p)?;
            let (train, valid) = evaluate(&model, data, cfg.sparsity.target, &enc);
            Some(PursuitMetrics {
                encoder: p.name().to_string(),
                k: p.k(),
                train,
                valid,
            })
        }
        None => None,
    };
    let facts = RunFacts {
        trend: std::fs::read_to_string(run.path.join("metrics.jsonl"))
            .ok()
            .and_then(|t| LossTrend::of_log(&t)),
        steps,
    };
    let warnings = run_warnings(cfg, &train, &facts);
    for w in &warnings {
        eprintln!("sae: warning: {w}");
    }
    Ok(Finished {
        model,
        train,
        valid,
        pursuit,
        warnings,
    })
}

/// Joins the data-parallel group when a launcher started this process,
/// after the checks every rank would fail (so none waits for the others).
fn join_group(cfg: &Config) -> Result<Option<&'static dist::Group>> {
    let Some(launch) = dist::Launch::from_env()? else {
        return Ok(None);
    };
    plan::check_world(cfg, launch.world)?;
    let backend = plan::dist_backend(cfg, &launch)?;
    let timeout = Duration::from_secs_f64(cfg.dist.timeout_s);
    Ok(Some(dist::init(&launch, backend, timeout)?))
}

/// What the loop shows and logs: metrics.jsonl and the progress display.
struct Reporter {
    log: MetricsLog,
    progress: Progress,
    /// Validation rows for the per-epoch valid_mse.
    valid: Option<Tensor>,
}

impl Reporter {
    /// A logged step: its line in metrics.jsonl (the global batch's with
    /// several ranks), after checking that it has not diverged.
    fn logged_step(
        &mut self,
        run: &RunDir,
        learner: &Learner,
        out: &StepOutput,
        batch: &Batch,
        params: &StepParams,
        state: &mut State,
    ) -> Result<()> {
        let writer = run.writer;
        let entry = step_log(learner, out, batch, params, state, &self.valid, writer);
        dist::check()?;
        if !entry.loss.is_finite() {
            bail_user!(
                "training diverged: loss is {} at step {} (epoch {}); {}; \
                 lower train.optimizer.lr or sparsity.weight",
                entry.loss,
                state.step,
                batch.epoch,
                run.kept_checkpoint(state.saved_step)
            );
        }
        state.last_loss = entry.loss;
        self.log.write(&entry)?;
        self.progress.logged(&entry, batch.end_of_epoch);
        Ok(())
    }
}

/// The signal to stop on: this process's, or with several ranks the one
/// any rank received, so that all stop after the same step.
fn agreed_signal(local: Option<i32>) -> Option<i32> {
    let Some(g) = dist::group() else {
        return local;
    };
    let mut t = Tensor::from(local.unwrap_or(0) as f32);
    g.allreduce(&mut t, dist::Op::Max);
    // A CPU tensor (gloo): no device to wait for.
    match t.double_value(&[]) as i32 {
        0 => None,
        s => Some(s),
    }
}

/// The learner and loop state at the run's start, or at its checkpoint
/// when resuming; and that position. With several ranks every one starts
/// from rank 0's weights, statistics and optimizer state.
fn start(
    run: &RunDir,
    model: Sae,
    cfg: &Config,
    device: Device,
    resume: bool,
    total_steps: i64,
) -> Result<(Learner, State, Position)> {
    let d_hidden = model.spec.d_hidden;
    let mut learner = Learner::new(model, cfg, total_steps)?;
    let window = cfg.train.dead_window;
    let mut dead = DeadTracker::new(d_hidden, window, learner.model.spec.activation, device);
    let pos = match resume {
        true => {
            let pos = run.load_checkpoint(&mut learner, &mut dead.since_fired)?;
            if pos.step > total_steps {
                bail_user!(
                    "train.epochs: {} epochs make {total_steps} steps, fewer than the {} the checkpoint in {} has done",
                    cfg.train.epochs,
                    pos.step,
                    run.path.display()
                );
            }
            pos
        }
        false => state::start(),
    };
    if let Some(g) = dist::group() {
        replicate(g, &mut learner, &mut dead);
        dist::check()?;
    }
    // A fresh run's counters are zeros on every rank: the bound stays 0.
    if resume {
        dead.counters_loaded();
    }
    Ok((learner, State::at(&pos, resume, dead), pos))
}

/// Every rank takes rank 0's parameters, buffers, normalisation statistics,
/// optimizer moments and dead-latent counters.
fn replicate(g: &dist::Group, learner: &mut Learner, dead: &mut DeadTracker) {
    let _guard = tch::no_grad_guard();
    let model = &mut learner.model;
    let mut tensors: Vec<&mut Tensor> = model.parameters_mut();
    tensors.extend(learner.opt.state_tensors_mut());
    for t in tensors {
        g.broadcast(t, 0);
    }
    for n in [Some(&mut model.norm), model.out_norm.as_mut()]
        .into_iter()
        .flatten()
    {
        for t in [n.shift.as_mut(), n.scale.as_mut()].into_iter().flatten() {
            g.broadcast(t, 0);
        }
        if let Some(w) = n.whiten.as_mut() {
            for t in w.tensors_mut() {
                g.broadcast(t, 0);
            }
        }
    }
    if let Some(t) = model.threshold.as_mut() {
        g.broadcast(t, 0);
    }
    g.broadcast(&mut dead.since_fired, 0);
}

/// A logged step's scalars, read back from the device together (one host
/// read: [`device::read_f64s`]); with several ranks, the global batch's:
/// each rank's terms weighed by its share of the rows. Only the writer
/// computes the validation MSE.
fn step_log(
    learner: &Learner,
    out: &StepOutput,
    batch: &Batch,
    params: &StepParams,
    state: &State,
    valid: &Option<Tensor>,
    writer: bool,
) -> StepLog {
    let values = tch::no_grad(|| {
        let l0 = (learner.model.spec.activation)
            .active(&out.forward.z)
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let aux = match &out.aux {
            Some(a) => a.shallow_clone(),
            None => Tensor::zeros([], (Kind::Double, out.loss.device())),
        };
        let dead = state.dead.dead().sum(Kind::Int64);
        // Float32 and int64 scalars are exact in float64: the values are
        // those each one's own read gave.
        let parts = [&out.loss, &out.mse, &out.sparsity, &aux, &l0, &dead]
            .map(|t| t.detach().to_kind(Kind::Double).reshape([1]));
        device::read_f64s(&Tensor::cat(&parts, 0))
    });
    let mut terms = [values[0], values[1], values[2], values[3], values[4]];
    let dead = values[5] as i64;
    if let Some(g) = dist::group() {
        // A rank without rows has NaN means (of nothing) that weigh 0.
        let weighed = terms.map(|v| if out.share > 0.0 { v * out.share } else { 0.0 });
        let mut t = Tensor::from_slice(&weighed);
        g.allreduce(&mut t, dist::Op::Sum);
        terms = Vec::<f64>::try_from(&t)
            .ok()
            .and_then(|v| v.try_into().ok())
            .unwrap_or(terms);
    }
    let valid_mse = match (valid, batch.end_of_epoch && writer) {
        (Some(v), true) => Some(learner.with_eval_weights(|m| valid_mse(m, v))),
        _ => None,
    };
    StepLog {
        step: state.step,
        epoch: batch.epoch,
        loss: terms[0],
        mse: terms[1],
        sparsity_loss: terms[2],
        l0: terms[4],
        lr: params.lr,
        sparsity_weight: params.sparsity_weight,
        aux_loss: out.aux.as_ref().map(|_| terms[3]),
        dead,
        valid_mse,
    }
}

/// Metrics of the trained model on the training and validation rows.
fn evaluate(
    model: &Sae,
    data: &plan::Data,
    target: f64,
    codes: &dyn CodeSource,
) -> (Metrics, Option<Metrics>) {
    let eval = |x: &Tensor, y: Option<&Tensor>| {
        metrics::evaluate_codes(model, x, y, EVAL_BATCH, target, data.truth.as_ref(), codes)
    };
    let train = eval(&data.train, data.train_target.as_ref());
    let valid = data
        .valid
        .as_ref()
        .map(|v| eval(v, data.valid_target.as_ref()));
    (train, valid)
}

/// MSE on validation rows `joined` (normalised input, then the normalised
/// target for transcoders).
fn valid_mse(model: &Sae, joined: &Tensor) -> f64 {
    let _guard = tch::no_grad_guard();
    let n = joined.size()[0];
    let (d_in, d_out) = (model.spec.d_in, model.d_out());
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
        let xh = model.forward_normalized(&xb);
        sse += device::read_f64(&(xh - &yb).square().sum(Kind::Double));
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
    // A space before every cell, and exponents past a million: columns
    // never run together.
    let fmt = |v: Option<f64>| match v {
        Some(v) if v.abs() >= 1e6 => format!(" {v:>11.4e}"),
        Some(v) => format!(" {v:>11.5}"),
        None => format!(" {:>11}", "-"),
    };
    let mut out = format!("{:<20}{:>12}{:>12}\n", "metric", "train", "valid");
    for (name, f) in rows {
        let v = s.valid.as_ref().and_then(f);
        out += &format!("{name:<20}{}{}\n", fmt(f(&s.train)), fmt(v));
    }
    out += &format!(
        "{} steps in {:.1} s ({:.0} samples/s) on {}, {} threads\n",
        s.steps, s.seconds, s.samples_per_second, s.device, s.threads
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[(i64, i64, f64, f64, f64)]) -> String {
        lines
            .iter()
            .map(|(step, epoch, loss, sparsity, w)| {
                format!(
                    "{{\"step\":{step},\"epoch\":{epoch},\"loss\":{loss},\"mse\":0,\
                     \"sparsity_loss\":{sparsity},\"sparsity_weight\":{w}}}\n"
                )
            })
            .collect()
    }

    #[test]
    fn loss_trend_starts_at_the_lower_of_first_step_and_first_epoch() {
        // Blew up at step 2: the first epoch's mean is huge, step 1 is not.
        let t = LossTrend::of_log(&log(&[
            (1, 1, 0.25, 0.0, 0.0),
            (2, 1, 1e25, 0.0, 0.0),
            (3, 2, 1e19, 0.0, 0.0),
        ]))
        .unwrap();
        assert_eq!(
            (t.first_what.as_str(), t.first, t.last),
            ("step 1", 0.25, 1e19)
        );
        assert!(t.grew());
        // A falling loss.
        let t = LossTrend::of_log(&log(&[
            (1, 1, 1.0, 0.0, 0.0),
            (2, 1, 0.5, 0.0, 0.0),
            (3, 2, 0.3, 0.0, 0.0),
        ]))
        .unwrap();
        assert!(!t.grew(), "{t:?}");
        // One epoch: no trend.
        assert!(LossTrend::of_log(&log(&[(1, 1, 1.0, 0.0, 0.0), (2, 1, 9.0, 0.0, 0.0)])).is_none());
    }

    #[test]
    fn loss_trend_compares_at_the_last_sparsity_weight() {
        // sparsity.warmup_steps: the weight rises 0 -> 1, the loss with it,
        // while mse (loss - w * sparsity) falls from 1.0 to 0.5.
        let t = LossTrend::of_log(&log(&[
            (1, 1, 1.0, 2.0, 0.0),
            (2, 2, 0.5 + 1.0 * 1.5, 1.5, 1.0),
        ]))
        .unwrap();
        assert_eq!(t.first, 3.0); // 1.0 + 1 * 2.0
        assert!(!t.grew(), "{t:?}");
    }
}
