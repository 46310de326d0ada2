//! The training pass of ReLU-like codes (relu, jumprelu, topk) that does
//! dense work only where the codes need it.
//!
//! A trained ReLU or JumpReLU SAE fires 1–2 % of its latents, yet a dense
//! step does six `[batch, d_in] x [d_in, d_hidden]`-sized matmuls. Outside
//! the architecture's *support* (`Architecture::support`; ReLU: `pre > 0`;
//! JumpReLU: where the codes or the threshold's pseudo-gradient can be
//! non-zero; top-k: the k kept latents of each row) the codes and
//! every gradient through them are 0. So only the encoder's forward matmul
//! stays dense (it finds the support); the rest runs over the support:
//! - the pre-activations at the support are a leaf tensor (`[nnz]`), their
//!   values the dense matmul's own, bit for bit;
//! - the decoder sums the selected rows of `W_dec` (`embedding_bag`), whose
//!   backward touches only those rows;
//! - after `backward`, the leaf's gradient `G` gives the encoder's
//!   gradients by hand ([`LeafCodes::accumulate_encoder_grads`]):
//!   `dW_encᵀ = Gᵀ·x` as one `embedding_bag` over `x` with the support
//!   grouped by latent, `db_enc = Σ_batch G`, and, when `b_dec` is
//!   subtracted from the input, `db_dec -= W_enc·db_enc`.
//!
//! Autograd cannot express the encoder's sparse weight gradient without a
//! `[nnz, d_in]` temporary (a sampled matmul's backward is ~8x slower than
//! this here), hence the leaf and the hand-written gradient.
//!
//! When the codes are dense (at initialisation about half fire) the same
//! leaf is the whole `[batch, d_hidden]` matrix and the encoder's gradients
//! are the dense matmuls autograd would do. Which of the two runs is decided
//! per step from that step's measured density ([`SparseStep`],
//! [`SWITCH_DENSITY`]), so a run (and a resumed one) is deterministic.

use crate::arch::ActivationKind;
use crate::arch::{Architecture, Support};
use crate::config::SparseStep;
use crate::model::{Forward, Sae};
use crate::sparse_codes::{Entries, LeafCodes};
use tch::{Device, Kind, Tensor};

/// Code density (entries in the support / `batch x d_hidden`) at or below
/// which `train.sparse_step: auto` takes the sparse pass on CPU. Measured
/// with `python scripts/bench.py BIN DIR --only SWITCH` (768 -> 8192 ReLU,
/// batch 1024, 2 threads, 2026-11-30, two runs): sparse/dense 2.7x at 1 %,
/// 1.35-1.44x at 10 %, 1.04-1.12x at 15 %, 0.70-0.88x at 20 %; the two
/// cross near 16 %. Both sides'
/// work scales with d_in alike, and the dense side's with d_hidden as the
/// sparse side's with the firing count, so the crossing is a density.
pub const SWITCH_DENSITY: f64 = 0.15;

/// Whether `model` (of architecture `arch`) can be trained through a leaf: codes with a support
/// (`Architecture::support`: relu, jumprelu, topk) straight from `W_enc` (no
/// gate, no deep layers) and an untied decoder.
pub fn applies(model: &Sae, arch: &dyn Architecture) -> bool {
    arch.has_support()
        && model.gate.is_none()
        && model.enc_layers.is_empty()
        && model.dec_layers.is_empty()
        && model.w_dec.is_some()
        // The norms' gradients (to W_dec, through the selection's scale)
        // are autograd's to take: the dense pass.
        && !model.spec.rescale_acts_by_decoder_norm
        // The skip term's gradient (to W_skip) is a dense matmul the
        // leaf's hand-written gradients do not take: the dense pass.
        && model.w_skip.is_none()
}

/// Whether `mode` takes the sparse pass on `device` for a batch whose
/// code density `density()` gives (called only when it decides). `auto`
/// keeps the dense pass on CUDA, where the switch point is not measured
/// (and reading the density back would wait for the device every step).
pub fn sparse_at(mode: SparseStep, device: Device, density: impl FnOnce() -> f64) -> bool {
    match mode {
        SparseStep::Always => true,
        SparseStep::Never => false,
        SparseStep::Auto => device == Device::Cpu && density() <= SWITCH_DENSITY,
    }
}

/// The training pass of `model` (see [`applies`]) on normalised input `xn`
/// (`[batch, d_in]`, no gradient), dense or sparse as `mode` says for this
/// batch's density. `Forward.pre` and `Forward.z` are dense; in the sparse
/// pass they carry no gradient (the loss reaches the leaf through
/// `Forward.leaf` and `Forward.recon`).
pub fn forward(model: &Sae, arch: &dyn Architecture, xn: &Tensor, mode: SparseStep) -> Forward {
    let threshold = model.threshold.as_ref();
    let (x, pre, sel) = tch::no_grad(|| {
        let x = if model.spec.apply_b_dec_to_input {
            xn - &model.b_dec
        } else {
            xn.shallow_clone()
        };
        // The bias added in place: one [batch, d_hidden] buffer, not two.
        let mut pre = x.mm(&model.w_enc);
        let _ = pre.g_add_(&model.b_enc);
        let sel = arch.support(&pre, threshold);
        (x, pre, sel)
    });
    let (batch, h) = (pre.size()[0], pre.size()[1]);
    let density = || match &sel {
        // count_nonzero, not a bool sum: that casts the mask to int64 first
        // (20 ms at 1024 x 8192 against under 1).
        Support::Mask(m) => {
            crate::device::cpu_i64(&m.count_nonzero(None)) as f64 / (batch * h) as f64
        }
        Support::Rows(idx) => idx.size()[1] as f64 / h as f64,
    };
    if batch == 0 || !sparse_at(mode, pre.device(), density) {
        let leaf = pre.set_requires_grad(true);
        let z = arch.apply_train(&leaf, threshold);
        let recon = model.decode_normalized(&z);
        return Forward {
            pre: leaf.shallow_clone(),
            z: z.shallow_clone(),
            recon,
            leaf: Some(LeafCodes {
                x,
                pre: leaf,
                codes: z,
                threshold: threshold.map(|t| t.shallow_clone()),
                support: None,
                batch,
            }),
        };
    }
    // Flat indices, grouped by row; gathers and scatters through them
    // (masked_select / masked_scatter take 30-80 ms here, these under 1).
    let flat = tch::no_grad(|| match &sel {
        // A shape that depends on the values: on CUDA this waits for the
        // device (`always` only: `auto` keeps the dense pass there).
        Support::Mask(m) => m.view([-1]).nonzero().squeeze_dim(1),
        Support::Rows(idx) => {
            let starts = Tensor::arange(batch, (Kind::Int64, idx.device())) * h;
            (idx + starts.unsqueeze(1)).view([-1])
        }
    });
    let support = Entries::from_flat(&flat, batch, h);
    let leaf = pre
        .view([-1])
        .index_select(0, &flat)
        .set_requires_grad(true);
    let t = threshold.map(|t| t.index_select(0, &support.cols));
    let codes = arch.support_codes(&leaf, t.as_ref());
    let recon = model.decode_entries(&support, &codes);
    let z = tch::no_grad(|| {
        let mut z = Tensor::zeros([batch * h], (pre.kind(), pre.device()));
        let _ = z.index_copy_(0, &flat, &codes);
        z.view([batch, h])
    });
    Forward {
        pre,
        z,
        recon,
        leaf: Some(LeafCodes {
            x,
            pre: leaf,
            codes,
            threshold: t,
            support: Some(support),
            batch,
        }),
    }
}

impl LeafCodes {
    /// After `backward`: adds the encoder's gradients (`W_enc`, `b_enc`,
    /// and `b_dec`'s share through the input) from the leaf's gradient to
    /// what backward left in the parameters' `.grad`.
    pub fn accumulate_encoder_grads(&self, model: &mut Sae) {
        // Undefined when the loss does not reach the leaf (no code fired):
        // the encoder's gradients are 0, and its `.grad` must exist anyway.
        let g = match self.pre.grad() {
            g if g.defined() => g,
            _ => self.pre.zeros_like(),
        };
        let g = &g;
        let _guard = tch::no_grad_guard();
        let (gw, gb) = match &self.support {
            None => (self.x.tr().mm(g), g.sum_dim_intlist(0, false, Kind::Float)),
            Some(s) => {
                let h = model.spec.d_hidden;
                // Entries grouped by latent: each latent's column of
                // dW_enc is the sum of its rows of x, weighted by G.
                let (by_col, perm) = s.cols.sort_stable(true, 0, false);
                let counts = by_col.bincount::<Tensor>(None, h);
                let offsets = counts.cumsum(0, Kind::Int64) - &counts;
                let (gwt, _, _, _) = Tensor::embedding_bag(
                    &self.x,
                    &s.rows.index_select(0, &perm),
                    &offsets,
                    false,
                    0,
                    false,
                    Some(g.index_select(0, &perm)),
                    false,
                );
                let gb = Tensor::zeros([h], (Kind::Float, g.device())).index_add(0, &s.cols, g);
                (gwt.tr(), gb)
            }
        };
        if model.spec.apply_b_dec_to_input {
            // b_dec enters as `x = xn - b_dec`: its share is
            // -Σ_batch G·W_encᵀ. As the vector product -(Σ G)·W_encᵀ for
            // relu (as the dense ReLU shortcut computes it) and in the
            // sparse pass; the dense pass of a thresholded or top-k model
            // sums it as autograd does (the input's gradient, then its
            // batch sum), since a selection can turn a rounding difference
            // into a different choice and parity with PyTorch is bitwise
            // there.
            let gd = match (model.spec.activation.kind, &self.support) {
                (ActivationKind::Relu, _) | (_, Some(_)) => {
                    gb.unsqueeze(0).mm(&model.w_enc.tr()).squeeze_dim(0)
                }
                (_, None) => g
                    .mm(&model.w_enc.tr())
                    .sum_dim_intlist(0, false, Kind::Float),
            };
            add_grad(&mut model.b_dec, &gd.neg());
        }
        // W_enc and b_enc are not in the autograd graph of a leaf pass:
        // backward left their gradients at zero_grad's zeros, so a copy
        // does (a transposing copy runs ~3x faster than a transposing add).
        set_grad(&mut model.w_enc, &gw);
        set_grad(&mut model.b_enc, &gb);
    }
}

/// `param.grad += g`, creating the gradient when backward left none (the
/// first step: these parameters are not in the autograd graph). Creating it
/// through autograd keeps it a gradient libtorch owns, as backward would.
fn add_grad(param: &mut Tensor, g: &Tensor) {
    match param.grad() {
        mut grad if grad.defined() => {
            let _ = grad.g_add_(g);
        }
        _ => create_grad(param, g),
    }
}

/// `param.grad = g` in place, for a parameter backward did not reach.
fn set_grad(param: &mut Tensor, g: &Tensor) {
    match param.grad() {
        mut grad if grad.defined() => {
            grad.copy_(g);
        }
        _ => create_grad(param, g),
    }
}

fn create_grad(param: &Tensor, g: &Tensor) {
    tch::with_grad(|| (param * g.detach()).sum(Kind::Float).backward());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ActivationKind, Config, InitScheme, OutputActivation, PenaltyKind};
    use crate::model::ModelSpec;
    use crate::normalize::Normalizer;
    use crate::train::step::Learner;

    /// Loss, codes, which pass ran (sparse?) and every parameter's gradient
    /// of one step's forward + backward (no optimizer step) under `mode`.
    fn step_grads(cfg: &Config, b_enc: f64, mode: SparseStep) -> (f64, Tensor, bool, Vec<Tensor>) {
        let (d_in, n) = (12, 40);
        let mut cfg = cfg.clone();
        cfg.train.sparse_step = mode;
        tch::manual_seed(3);
        let x = Tensor::randn([n, d_in], (Kind::Float, Device::Cpu));
        let spec = ModelSpec::from_config(&cfg.model, d_in);
        let m = Sae::init(
            spec,
            &cfg.model,
            d_in,
            Normalizer::identity(),
            None,
            Device::Cpu,
        )
        .unwrap();
        let _ = m.b_dec.detach().uniform_(-0.2, 0.2);
        let _ = m.b_enc.detach().uniform_(b_enc - 0.1, b_enc + 0.1);
        if let Some(t) = &m.threshold {
            // Some pre-activations in every part of the kernel's window.
            let _ = t.detach().uniform_(0.0, 0.3);
        }
        let mut learner = Learner::new(m, &cfg, 1).unwrap();
        // A first update at learning rate 0 (parameters unchanged): the
        // gradients then exist, as in every step after a run's first.
        let out = learner.forward(&x, &x, cfg.sparsity.weight, None);
        learner.update(&out, 0.0, 0.0);
        learner.opt.zero_grad(&mut learner.model.parameters_mut());
        let out = learner.forward(&x, &x, cfg.sparsity.weight, None);
        out.loss.backward();
        let sparse = match &out.forward.leaf {
            Some(leaf) => {
                leaf.accumulate_encoder_grads(&mut learner.model);
                leaf.support.is_some()
            }
            None => false,
        };
        let grads = learner
            .model
            .parameters()
            .iter()
            .map(|p| p.grad().copy())
            .collect();
        (
            out.loss.double_value(&[]),
            out.forward.z.detach(),
            sparse,
            grads,
        )
    }

    /// The sparse pass and the dense leaf give autograd's loss, codes (bit
    /// for bit) and gradients (to float rounding), for relu + l1 (with and
    /// without decoder norms and b_dec subtraction), jumprelu + l0/l1 and
    /// top-k; `auto` picks the pass by density.
    #[test]
    fn leaf_passes_match_autograd() {
        let _rng = crate::seeded();
        let base = |act: ActivationKind, pen: PenaltyKind| {
            let mut c = Config::default();
            c.model.d_hidden = 64;
            c.model.activation = act;
            c.model.init_scheme = InitScheme::Sae;
            c.sparsity.penalty = pen;
            c.sparsity.weight = 0.05;
            c
        };
        let mut cases = vec![];
        cases.push(("relu l1", base(ActivationKind::Relu, PenaltyKind::L1)));
        let mut c = base(ActivationKind::Relu, PenaltyKind::L1);
        c.sparsity.l1_decoder_norm = false;
        c.model.apply_b_dec_to_input = false;
        c.model.decoder_activation = OutputActivation::Sigmoid;
        cases.push(("relu l1 plain", c));
        cases.push((
            "jumprelu l0",
            base(ActivationKind::Jumprelu, PenaltyKind::L0),
        ));
        cases.push((
            "jumprelu l1",
            base(ActivationKind::Jumprelu, PenaltyKind::L1),
        ));
        cases.push(("relu none", base(ActivationKind::Relu, PenaltyKind::None)));
        let mut c = base(ActivationKind::Topk, PenaltyKind::None);
        c.model.k = Some(3);
        cases.push(("topk none", c));
        let mut c = base(ActivationKind::Topk, PenaltyKind::L1);
        c.model.k = Some(3);
        c.model.decoder_activation = OutputActivation::Sigmoid;
        cases.push(("topk l1", c));
        for (name, cfg) in &cases {
            // b_enc 0: about half fire (auto stays dense); -2: a few
            // percent (auto goes sparse).
            for (b_enc, auto_sparse) in [(0.0, false), (-2.0, true)] {
                let (l0, z0, s0, g0) = step_grads(cfg, b_enc, SparseStep::Never);
                assert!(!s0, "{name}: never ran sparse");
                let fired = z0.gt(0.0).sum(Kind::Int64).int64_value(&[]);
                assert!(
                    fired > 0 && fired < z0.numel() as i64 / 5 || b_enc == 0.0,
                    "{name}: {fired} fire"
                );
                for (i, g) in g0.iter().enumerate() {
                    assert!(
                        g.abs().max().double_value(&[]) > 0.0,
                        "{name}: parameter {i} has no gradient"
                    );
                }
                for mode in [SparseStep::Auto, SparseStep::Always] {
                    let (l, z, sparse, g) = step_grads(cfg, b_enc, mode);
                    // top-k: density k / d_hidden = 3/64, sparse for auto too.
                    let want =
                        mode == SparseStep::Always || auto_sparse || name.starts_with("topk");
                    assert_eq!(
                        sparse, want,
                        "{name} b_enc {b_enc} {mode:?}: sparse {sparse}"
                    );
                    assert!(z.equal(&z0), "{name} {mode:?}: codes differ");
                    assert!(
                        (l - l0).abs() <= 1e-6 * l0.abs(),
                        "{name} {mode:?}: loss {l} vs {l0}"
                    );
                    for (i, (a, b)) in g.iter().zip(&g0).enumerate() {
                        let scale = b.abs().max().double_value(&[]).max(1e-6);
                        let diff = (a - b).abs().max().double_value(&[]);
                        assert!(diff <= 1e-5 * scale, "{name} b_enc {b_enc} {mode:?}: parameter {i} gradient differs by {diff} (scale {scale})");
                    }
                }
            }
        }
    }

    /// Jumprelu's sparse support covers the whole window of the threshold's
    /// pseudo-gradient: a threshold gradient arises from entries that do
    /// not fire, and the sparse pass has it too (checked above; here that
    /// the case is not vacuous).
    #[test]
    fn jumprelu_support_includes_the_kernel_window() {
        let pre = Tensor::from_slice(&[0.0f32, 0.08, 0.1, 0.12, 0.2]).view([1, 5]);
        let t = Tensor::from_slice(&[0.1f32; 5]);
        let Support::Mask(mask) = crate::arch::Activation::jumprelu(0.05)
            .arch()
            .support(&pre, Some(&t))
        else {
            panic!("jumprelu's support is a mask")
        };
        let got: Vec<bool> = Vec::try_from(mask.view([-1])).unwrap();
        assert_eq!(got, [false, true, true, true, true]);
    }
}
