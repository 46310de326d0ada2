//! One training step, as burn-train splits it: the forward half returns the
//! loss terms ([`StepOutput`]), then the update runs (backward, projection,
//! clipping, optimizer, renormalisation). No I/O and no loop state: the loop
//! and the in-process tests (tests/step.rs) call [`Learner::step`] alike.

use super::batches::Batch;
use super::init::{decoder_rows, normalize_decoder_rows};
use super::state::DeadTracker;
use crate::anneal::PAnneal;
use crate::arch::Architecture;
use crate::autocast::Autocast;
use crate::config::{Config, InputNoise, PenaltyKind, Precision, SparseStep, TrainConfig};
use crate::model::{Forward, Sae};
use crate::optim::Adam;
use crate::optimizer::Optimizer;
use crate::penalty::{Penalty, PenaltyInput};
use crate::schedule;
use crate::sparse_step;
use tch::{Kind, Reduction, Tensor};

/// What one step uses that changes from step to step (schedules).
#[derive(Debug, Clone, Copy)]
pub struct StepParams {
    /// This step's number, 1-based.
    pub step: i64,
    pub lr: f64,
    /// Muon's learning rate of the 2-D weights (`lr` without the warm-up).
    pub matrix_lr: f64,
    pub sparsity_weight: f64,
    /// Top-k's k this step when it decays (`train.k_decay_steps`).
    pub k: Option<i64>,
}

impl StepParams {
    pub fn at(cfg: &Config, step: i64, total_steps: i64) -> StepParams {
        StepParams {
            step,
            k: schedule::k_at(cfg, step),
            lr: schedule::lr_at(&cfg.train, step, total_steps),
            matrix_lr: schedule::matrix_lr_at(&cfg.train, step, total_steps),
            sparsity_weight: schedule::sparsity_weight_at(
                cfg.sparsity.weight,
                cfg.sparsity.warmup_steps,
                step,
            ),
        }
    }
}

/// The loss terms of one batch (tensors on the device: reading one back
/// waits for the device, so the loop does it on logged steps only).
pub struct StepOutput {
    pub loss: Tensor,
    pub mse: Tensor,
    /// The unweighted sparsity penalty.
    pub sparsity: Tensor,
    /// An architecture's extra loss term (gated: the gate's reconstruction;
    /// matryoshka_batchtopk: the sum of the inner levels' reconstructions).
    pub aux: Option<Tensor>,
    pub forward: Forward,
    /// This rank's share of the global batch (1 in a single process): its
    /// terms weigh this much in the global means.
    pub share: f64,
}

/// The model and everything a step updates with it.
pub struct Learner {
    pub model: Sae,
    pub opt: Optimizer,
    penalty: Penalty,
    /// lp_anneal's p and weight (its penalty is this one's, not `penalty`).
    pub anneal: Option<PAnneal>,
    arch: Box<dyn Architecture>,
    /// What `arch` reads of `cfg.model`.
    settings: crate::arch::Settings,
    cfg: Config,
}

impl Learner {
    /// Ready to train `model` for `total_steps` steps (gradients on, a
    /// fresh optimizer). Fails (rather than panics) when the optimizer's
    /// buffers cannot be allocated.
    pub fn new(mut model: Sae, cfg: &Config, total_steps: i64) -> crate::Result<Learner> {
        let penalty = Penalty::from_config(&cfg.sparsity, &cfg.model, model.d_out());
        let anneal = (cfg.sparsity.penalty == PenaltyKind::LpAnneal)
            .then(|| PAnneal::new(&cfg.sparsity, total_steps));
        model.set_requires_grad(true);
        let opt = Optimizer::new(&cfg.train.optimizer, &model.parameters())
            .map_err(|e| anyhow::Error::new(e).context("allocating the optimizer's buffers"))?;
        // Fails here, not mid-run, where the device has no autocast.
        drop(Autocast::enter(cfg.train.precision, model.device())?);
        Ok(Learner {
            arch: model.spec.activation.arch(),
            settings: cfg.model.arch_settings(),
            model,
            opt,
            penalty,
            anneal,
            cfg: cfg.clone(),
        })
    }

    /// Step `step`'s schedules: [`StepParams::at`], with lp_anneal's adapted
    /// weight (warmed up as the configured one is).
    pub fn params_at(&self, step: i64, total_steps: i64) -> StepParams {
        let mut p = StepParams::at(&self.cfg, step, total_steps);
        if let Some(a) = &self.anneal {
            p.sparsity_weight =
                schedule::sparsity_weight_at(a.state.weight, self.cfg.sparsity.warmup_steps, step);
        }
        p
    }

    /// The penalty this step (lp_anneal's at its current p).
    fn penalty(&self) -> Penalty {
        self.anneal.as_ref().map_or(self.penalty, PAnneal::penalty)
    }

    /// lp_anneal after step `step`'s forward: its norms queued when a
    /// change will read them, then p changed when due.
    fn anneal_after(&mut self, step: i64, out: &StepOutput) {
        let Some(a) = self.anneal.as_mut() else {
            return;
        };
        let norms = a.queued_p(step).map(|next| {
            let root = matches!(a.penalty(), Penalty::Lp { root: true, .. });
            let at_next = tch::no_grad(|| {
                Penalty::Lp { p: next, root }
                    .value(&PenaltyInput::codes(&out.forward.z, &out.forward.z))
            });
            // Both norms in one read (float32 values, exact in f64).
            let both = Tensor::stack(
                &[out.sparsity.detach(), at_next].map(|t| t.to_kind(Kind::Double)),
                0,
            );
            let v = crate::device::read_f64s(&both);
            [v[0] as f32, v[1] as f32]
        });
        a.after_step(step, norms);
    }

    /// Whether this model and penalty can take the sparse pass
    /// (`crate::sparse_step`; `train.sparse_step` decides whether they do).
    /// Not under `train.precision: bf16`: the sparse pass's hand-written
    /// encoder gradient is float32 only, so bf16 takes the dense step.
    pub fn can_step_sparse(&self) -> bool {
        self.cfg.train.precision == Precision::Fp32
            && self.penalty().supports_sparse_codes()
            && self.cfg.sparsity.pre_act_weight == 0.0
            && !self.settings.multi_topk
            && sparse_step::applies(&self.model, self.arch.as_ref())
    }

    /// Whether a step needs the dead latents (auxk, the pre-activation loss).
    fn needs_dead_mask(&self) -> bool {
        self.penalty().needs_dead_mask() || self.cfg.sparsity.pre_act_weight > 0.0
    }

    /// One step on `batch` (normalised input, then the target for
    /// transcoders): forward, statistics, update, and dead-latent
    /// resampling when due. With several ranks each holds its part of the
    /// batch and the gradients are averaged, weighted by rows.
    pub fn step(&mut self, batch: &Batch, p: &StepParams, dead: &mut DeadTracker) -> StepOutput {
        let group = crate::dist::group();
        if let Some(g) = group {
            g.begin_step(batch.rows);
        }
        let share = batch.x.size()[0] as f64 / batch.rows as f64;
        let rows = (batch.rows, batch.offset, batch.positions.as_ref());
        let batch = &batch.x;
        let resample_every = self.cfg.train.resample_every;
        // Input noise and resampling draw random numbers: libtorch is
        // re-seeded from (seed, step) before each step, so a resumed run
        // draws the same.
        if self.cfg.train.input_noise != InputNoise::None || resample_every > 0 {
            tch::manual_seed(step_seed(self.cfg.seed, p.step));
        }
        let (d_in, d_out) = (self.model.spec.d_in, self.model.d_out());
        let (xb, target) = match batch.size()[1] > d_in {
            true => (batch.narrow(1, 0, d_in), batch.narrow(1, d_in, d_out)),
            false => (batch.shallow_clone(), batch.shallow_clone()),
        };
        if let Some(k) = p.k.filter(|&k| Some(k) != self.model.spec.activation.k()) {
            let kind = self.model.spec.activation.kind;
            self.model.spec.activation = crate::arch::Activation::with_k(kind, k);
            self.arch = self.model.spec.activation.arch();
        }
        self.arch.before_forward(&mut self.model);
        let input = corrupt(&xb, &self.cfg.train, rows);
        // None while no latent can be dead yet: the same terms as an
        // all-false mask, with no read of the counters.
        let dead_mask = (self.needs_dead_mask() && dead.maybe_dead()).then(|| dead.dead());
        let mut out = self.forward(&input, &target, p.sparsity_weight, dead_mask.as_ref());
        out.share = share;
        self.anneal_after(p.step, &out);
        dead.update(&out.forward.z);
        self.arch
            .after_forward(&mut self.model, &out.forward.z, &self.settings);
        self.update(&out, p.lr, p.matrix_lr);
        if resample_every > 0 && p.step % resample_every == 0 {
            let d = dead.dead();
            let adam = self
                .opt
                .adam_mut()
                .expect("validated: resampling needs adam or adamw");
            let n = resample_dead(
                &mut self.model,
                adam,
                &d,
                &input,
                &target,
                &out.forward.recon,
            );
            if n > 0 {
                dead.revive(&d);
            }
        }
        out
    }

    /// The forward half: the loss terms of `input` reconstructing `target`.
    /// The order of ops is fixed: autograd sums a tensor's gradients in the
    /// order its uses were recorded, so reordering changes the last bits.
    /// Under `train.precision: bf16` all of it runs in libtorch's autocast
    /// region (`crate::autocast`), as `with torch.autocast(...)` around a
    /// PyTorch forward pass and loss; the backward pass (in `update`) does not.
    pub fn forward(
        &self,
        input: &Tensor,
        target: &Tensor,
        sparsity_weight: f64,
        dead: Option<&Tensor>,
    ) -> StepOutput {
        // Entering was tried once in `Learner::new`: it only sets
        // thread-local flags and cannot fail after that.
        let _autocast = Autocast::enter(self.cfg.train.precision, self.model.device())
            .expect("autocast entered once in Learner::new");
        let model = &self.model;
        let mode = self.cfg.train.sparse_step;
        let f = if mode != SparseStep::Never && self.can_step_sparse() && !input.requires_grad() {
            sparse_step::forward(model, self.arch.as_ref(), input, mode)
        } else {
            model.forward_train(input)
        };
        let mse = f.recon.mse_loss(target, Reduction::Mean);
        let penalty_codes = self.arch.penalty_codes(model, input);
        let w_dec = model.decoder_weight();
        // Rescaling models: auxk decodes over the norms as SAELens does
        // (a third use of the norms, in its order).
        let penalty = self.penalty();
        let decoder_norms = match penalty.is_auxk() {
            true => model.decoder_norms(),
            false => None,
        };
        let sparsity = penalty.value(&PenaltyInput {
            z: penalty_codes.as_ref().unwrap_or(&f.z),
            pre: &f.pre,
            target,
            recon: &f.recon,
            w_dec: &w_dec,
            threshold: model.threshold.as_ref(),
            dead,
            relu_codes: penalty_codes.is_none() && self.arch.relu_codes(),
            leaf: f.leaf.as_ref(),
            decoder_norms: decoder_norms.as_ref(),
            signed_codes: self.arch.signed_codes(),
        });
        let aux = penalty_codes
            .as_ref()
            .and_then(|c| self.arch.aux_loss(model, c, target))
            .or_else(|| self.pre_act_loss(&f.pre, dead));
        let loss = match &aux {
            Some(a) => &mse + &sparsity * sparsity_weight + a,
            None => &mse + &sparsity * sparsity_weight,
        };
        // Last: the architecture's extra terms (matryoshka's inner levels),
        // added one by one in order (out of place, `loss = loss + e`, as
        // SAELens does); logged as `aux_loss`, their sum.
        let extra = self
            .arch
            .extra_losses(model, &f.pre, &f.z, target, &self.settings);
        let (loss, aux) = match extra.split_first() {
            None => (loss, aux),
            Some((first, rest)) => (
                extra.iter().fold(loss, |l, e| l + e),
                Some(tch::no_grad(|| {
                    rest.iter().fold(first.detach(), |s, e| s + e.detach())
                })),
            ),
        };
        StepOutput {
            loss,
            mse,
            sparsity,
            aux,
            forward: f,
            share: 1.0,
        }
    }

    /// Anthropic's pre-activation loss (SAELens `calculate_pre_act_loss`):
    /// dead latents' pre-activations pulled up to their thresholds,
    /// weighted by their decoder norms; `None` when off, 0 with no dead latent.
    fn pre_act_loss(&self, pre: &Tensor, dead: Option<&Tensor>) -> Option<Tensor> {
        let weight = self.cfg.sparsity.pre_act_weight;
        if weight == 0.0 {
            return None;
        }
        let model = &self.model;
        // With no dead latent the sum is 0 (+0: every product is >= 0), as
        // the early return gives, so no read decides between them.
        let (Some(dead), Some(t)) = (dead, model.threshold.as_ref()) else {
            return Some(Tensor::zeros([], (Kind::Float, pre.device())));
        };
        let norms = crate::model::row_norms(&model.decoder_weight());
        let per_row = ((t - pre).relu() * dead.to_kind(Kind::Float) * norms).sum_dim_intlist(
            -1,
            false,
            Kind::Float,
        );
        Some(per_row.mean(Kind::Float) * weight)
    }

    /// The update half: gradients of the step's loss (the encoder's by
    /// hand after a ReLU-like pass: `sparse_step`), averaged over the ranks
    /// (this one's weighing its `share`; in buckets during backward when
    /// `dist.bucket_mb` > 0), then the optimizer step at learning rate `lr`
    /// (`matrix_lr`: Muon's matrices), with the decoder kept at unit norm and
    /// gradients clipped (by their global norm) where the config asks.
    pub fn update(&mut self, out: &StepOutput, lr: f64, matrix_lr: f64) {
        let (loss, share) = (&out.loss, out.share);
        let t = &self.cfg.train;
        self.opt.zero_grad(&mut self.model.parameters_mut());
        let group = crate::dist::group();
        let overlapped = match group {
            Some(g) => self.overlap_begin(g, out.forward.leaf.is_some(), share),
            None => false,
        };
        // A rank without rows (a last batch smaller than the world) gets
        // zero gradients: its loss is a mean over nothing, and every path
        // from it to a parameter passes through an empty tensor.
        loss.backward();
        if let Some(leaf) = &out.forward.leaf {
            leaf.accumulate_encoder_grads(&mut self.model);
        }
        if let Some(g) = group {
            if !(overlapped && g.overlap_finish(&self.model.parameters())) {
                sync_gradients(g, &mut self.opt, &mut self.model, share);
            }
        }
        if t.unit_norm_decoder {
            remove_parallel_gradient(&mut self.model);
        }
        if let Some(max_norm) = t.grad_clip {
            clip_grad_norm_on_device(&mut self.model.parameters_mut(), max_norm);
        }
        self.opt
            .step(&mut self.model.parameters_mut(), lr, matrix_lr);
        if t.unit_norm_decoder {
            normalize_decoder_rows(&mut self.model);
        }
    }

    /// Runs `f` on the model at the weights it is evaluated and saved at
    /// (signum's averaged weights; otherwise the parameters as they are),
    /// the parameters restored after it.
    pub fn with_eval_weights<R>(&self, f: impl FnOnce(&Sae) -> R) -> R {
        let params = self.model.parameters();
        let Some(eval) = self.opt.eval_weights(&params) else {
            return f(&self.model);
        };
        let _guard = tch::no_grad_guard();
        // Each parameter's own tensor re-pointed at the eval weights and
        // back at its storage: no arithmetic, so training goes on exactly.
        let kept: Vec<Tensor> = params.iter().map(|p| p.detach()).collect();
        for (p, w) in params.iter().zip(&eval) {
            p.shallow_clone().set_data(w);
        }
        let r = f(&self.model);
        for (p, k) in params.iter().zip(&kept) {
            p.shallow_clone().set_data(k);
        }
        r
    }

    /// Arms the bucketed allreduce of this step's gradients (before
    /// backward); false when it cannot run this step (`dist.bucket_mb: 0`,
    /// or the gradients not yet in Adam's flat buffer: the first step).
    /// With a leaf (`sparse_step`) the encoder's gradients and `b_dec`'s
    /// are finished by hand after backward: their buckets start then.
    fn overlap_begin(&self, g: &crate::dist::Group, leaf: bool, share: f64) -> bool {
        let bucket_mb = self.cfg.dist.bucket_mb;
        if bucket_mb <= 0.0 {
            return false;
        }
        let Some(grads) = self.opt.flat_grad_cleared() else {
            return false;
        };
        let named = self.model.named_parameters();
        let late: Vec<bool> = named
            .iter()
            .map(|(n, _)| leaf && matches!(n.as_str(), "W_enc" | "b_enc" | "b_dec"))
            .collect();
        let params: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
        let bytes = (bucket_mb * (1 << 20) as f64).round() as i64;
        g.overlap_begin(&params, &late, &grads, share, bytes)
    }

    /// The trained model, ready to save: parameters in storage of their
    /// own and at their eval weights (signum's average), no gradients, the
    /// architecture's last projection applied.
    pub fn into_model(mut self) -> Sae {
        self.opt.unflatten(&mut self.model.parameters_mut());
        if let Some(eval) = self.opt.eval_weights(&self.model.parameters()) {
            let _guard = tch::no_grad_guard();
            for (p, w) in self.model.parameters_mut().into_iter().zip(&eval) {
                p.set_data(w);
            }
        }
        self.model.set_requires_grad(false);
        self.arch.finish_training(&mut self.model);
        self.model.fold_decoder_norm();
        self.model
    }
}

/// The gradient sync of data-parallel training: every rank's gradients,
/// weighed by its share of the batch, summed over the ranks (one allreduce
/// of Adam's flat gradient buffer, or of each gradient).
fn sync_gradients(g: &crate::dist::Group, opt: &mut Optimizer, model: &mut Sae, share: f64) {
    let _guard = tch::no_grad_guard();
    let mut params = model.parameters_mut();
    match opt.flat_grad(&mut params) {
        Some(mut grad) => {
            let _ = grad.g_mul_scalar_(share);
            g.allreduce(&mut grad, crate::dist::Op::Sum);
        }
        None => {
            for p in params.iter_mut() {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.g_mul_scalar_(share);
                    g.allreduce(&mut grad, crate::dist::Op::Sum);
                }
            }
        }
    }
}

/// libtorch's seed for training step `step` (SplitMix64 of seed and step).
fn step_seed(seed: u64, step: i64) -> i64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// `train.input_noise` applied to a batch (the reconstruction target stays
/// clean). `x` is the rows `offset..` of a batch of `rows`: the noise is
/// drawn for the whole batch and this part taken, so data-parallel ranks add
/// the noise one process would.
/// Noise is drawn for the whole global batch and each rank takes its rows
/// of it (a range, or `positions`), so ranks add what one process would.
fn corrupt(
    x: &Tensor,
    t: &TrainConfig,
    (rows, offset, positions): (usize, usize, Option<&Tensor>),
) -> Tensor {
    let whole = |t: Tensor| match positions {
        Some(p) => t.index_select(0, p),
        None => t.narrow(0, offset as i64, x.size()[0]),
    };
    let shape = [rows as i64, x.size()[1]];
    match t.input_noise {
        InputNoise::None => x.shallow_clone(),
        InputNoise::Gaussian => {
            x + whole(Tensor::randn(shape, (x.kind(), x.device()))) * t.noise_level
        }
        InputNoise::Mask => {
            let keep =
                Tensor::empty(shape, (x.kind(), x.device())).bernoulli_float_(1.0 - t.noise_level);
            x * whole(keep)
        }
    }
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
    clip_grad_norm_on_device(params, max_norm).map_or(0.0, |t| crate::device::read_f64(&t))
}

/// [`clip_grad_norm`] with the norm left on the device (None: no gradient).
fn clip_grad_norm_on_device(params: &mut [&mut Tensor], max_norm: f64) -> Option<Tensor> {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return None;
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    // Python's `max_norm / (total + 1e-6)` on a tensor is reciprocal() * max_norm.
    let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    for mut g in grads {
        let _ = g.g_mul_(&coef);
    }
    Some(total)
}

/// Re-initialises dead latents (Anthropic's recipe, simplified): each takes
/// the direction of an input of the batch drawn with probability
/// proportional to its squared reconstruction error; its decoder row is that
/// direction (of the mean live decoder norm), its encoder column the same
/// direction scaled to 0.2 x the mean live encoder norm, its encoder bias 0
/// (gated: r_mag and b_mag too), and Adam's moments for each of these are
/// reset. Returns how many were resampled.
fn resample_dead(
    model: &mut Sae,
    adam: &mut Adam,
    dead: &Tensor,
    input: &Tensor,
    target: &Tensor,
    recon: &Tensor,
) -> i64 {
    let _guard = tch::no_grad_guard();
    // Resampling steps read from the device (counted: `nonzero`'s size is one read).
    let idx = dead.nonzero().squeeze_dim(1);
    crate::device::count_read();
    let n_dead = idx.size()[0];
    if n_dead == 0 {
        return 0;
    }
    let err = (recon.detach() - target)
        .square()
        .sum_dim_intlist(1, false, Kind::Float);
    let probs = err.square();
    let probs = if crate::device::read_f64(&probs.sum(Kind::Double)) > 0.0 {
        probs
    } else {
        probs.ones_like()
    };
    let rows = probs.multinomial(n_dead, true);
    let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    let enc_dir = unit(input.index_select(0, &rows));
    let dec_dir = unit(target.index_select(0, &rows));
    let alive = dead.logical_not();
    let any_alive = crate::device::read_i64(&alive.any()) != 0;
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
    if let Some(g) = &mut model.gate {
        let _ = g.r_mag.index_fill_(0, &idx, 0.0);
        let _ = g.b_mag.index_fill_(0, &idx, 0.0);
    }
    // Adam's moments of the touched slices, found by parameter name.
    for (name, dim) in [
        ("W_enc", 1),
        ("b_enc", 0),
        ("W_dec", 0),
        ("r_mag", 0),
        ("b_mag", 0),
    ] {
        if let Some(i) = model.parameter_index(name) {
            let _ = adam.exp_avg[i].index_fill_(dim, &idx, 0.0);
            let _ = adam.exp_avg_sq[i].index_fill_(dim, &idx, 0.0);
        }
    }
    n_dead
}
