//! Hidden-layer activations. To add one: a variant here, its name in
//! `config::ActivationKind`, and a line in `apply` (and in `apply_train` when
//! training computes something else than inference).

use crate::config::{ActivationKind, ModelConfig};
use tch::Tensor;

/// `model.jumprelu_bandwidth` when a model file does not say (SAELens's default).
pub const DEFAULT_BANDWIDTH: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Sigmoid,
    Relu,
    /// Keep the k largest pre-activations per row (then ReLU), zero the rest.
    TopK {
        k: i64,
    },
    /// Training: keep the `k x batch` largest ReLU'd pre-activations of the
    /// whole batch (k per row on average). Inference: a JumpReLU whose
    /// threshold is the running estimate made in training (the model's
    /// `threshold`), as SAELens saves a BatchTopK SAE.
    BatchTopK {
        k: i64,
    },
    /// `relu(pre) * (pre > threshold_j)` with a learned threshold per latent.
    /// Training passes gradients to the thresholds through a straight-through
    /// estimator: a rectangle kernel of width `bandwidth` (SAELens/DeepMind).
    JumpRelu {
        bandwidth: f64,
    },
    /// Gated SAE (Rajamanoharan et al. 2024; SAELens `gated`): a gate
    /// `1[pi_gate > 0]`, `pi_gate = pre = x @ W_enc + b_enc` (`b_enc` is
    /// SAELens's `b_gate`), times magnitudes `relu(x @ (W_enc * exp(r_mag)) +
    /// b_mag)`. The magnitudes need the model's `r_mag`, `b_mag` and the input,
    /// so `Sae` computes them (see [`gated`]); training adds the gate's L1
    /// (the sparsity penalty sees `relu(pi_gate)`) and the auxiliary loss
    /// `mean((decode(relu(pi_gate)) - x)^2)`.
    Gated,
}

impl Activation {
    /// From a model file's description (training-only settings at their
    /// defaults).
    pub fn from_config(kind: ActivationKind, k: Option<i64>) -> Activation {
        match kind {
            ActivationKind::Sigmoid => Activation::Sigmoid,
            ActivationKind::Relu => Activation::Relu,
            ActivationKind::Topk => Activation::TopK {
                k: k.expect("validated: topk has k"),
            },
            ActivationKind::Batchtopk => Activation::BatchTopK {
                k: k.expect("validated: batchtopk has k"),
            },
            ActivationKind::Jumprelu => Activation::JumpRelu {
                bandwidth: DEFAULT_BANDWIDTH,
            },
            ActivationKind::Gated => Activation::Gated,
        }
    }

    /// From a training config.
    pub fn from_model_config(m: &ModelConfig) -> Activation {
        match Activation::from_config(m.activation, m.k) {
            Activation::JumpRelu { .. } => Activation::JumpRelu {
                bandwidth: m.jumprelu_bandwidth,
            },
            a => a,
        }
    }

    pub fn kind(&self) -> ActivationKind {
        match self {
            Activation::Sigmoid => ActivationKind::Sigmoid,
            Activation::Relu => ActivationKind::Relu,
            Activation::TopK { .. } => ActivationKind::Topk,
            Activation::BatchTopK { .. } => ActivationKind::Batchtopk,
            Activation::JumpRelu { .. } => ActivationKind::Jumprelu,
            Activation::Gated => ActivationKind::Gated,
        }
    }

    pub fn k(&self) -> Option<i64> {
        match self {
            Activation::TopK { k } | Activation::BatchTopK { k } => Some(*k),
            _ => None,
        }
    }

    /// Whether the model carries a `threshold` tensor for this activation:
    /// `[d_hidden]`, learned (jumprelu) or estimated (batchtopk).
    pub fn has_threshold(&self) -> bool {
        matches!(
            self,
            Activation::JumpRelu { .. } | Activation::BatchTopK { .. }
        )
    }

    /// Maps pre-activations `[batch, d_hidden]` to codes of the same shape,
    /// as at inference. `threshold` is the model's (jumprelu, batchtopk).
    pub fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        match self {
            Activation::Sigmoid => pre.sigmoid(),
            Activation::Relu => pre.relu(),
            Activation::TopK { k } => {
                // SAELens order: top-k of the raw pre-activations, then ReLU on
                // the kept values, so a row may have fewer than k positive codes.
                let (values, indices) = pre.topk(*k, -1, true, false);
                pre.zeros_like().scatter(-1, &indices, &values.relu())
            }
            // SAELens JumpReLU inference: relu(pre) * (pre > threshold).
            Activation::BatchTopK { .. } | Activation::JumpRelu { .. } => match threshold {
                Some(t) => pre.relu() * pre.gt_tensor(t).to_kind(pre.kind()),
                None => pre.relu(),
            },
            Activation::Gated => panic!("gated codes need the magnitudes: use activation::gated"),
        }
    }

    /// Codes during training (gradients flow through these). The same as
    /// [`Activation::apply`] except for batchtopk (top k x batch of the batch)
    /// and jumprelu (straight-through gradients to the threshold).
    pub fn apply_train(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        match self {
            Activation::BatchTopK { k } => batch_topk(pre, *k),
            Activation::JumpRelu { bandwidth } => {
                let t = threshold.expect("a jumprelu model has a threshold");
                // SAELens JumpReLU.forward: x * (x > threshold); backward:
                // d/dx = (x > threshold), d/dthreshold = -(threshold/bw) K((x - threshold)/bw).
                let value = pre * pre.gt_tensor(t).to_kind(pre.kind());
                let coeff = (t.detach() / *bandwidth * rectangle(pre, t, *bandwidth)).neg();
                value + straight_through(t, &coeff)
            }
            _ => self.apply(pre, threshold),
        }
    }

    /// The value above which a unit counts as active, for L0 and firing
    /// statistics: 0 for ReLU-like codes; 0.5 for sigmoid, which is never 0.
    pub fn active_threshold(&self) -> f64 {
        match self {
            Activation::Sigmoid => 0.5,
            _ => 0.0,
        }
    }
}

/// Gated codes: `1[pi_gate > 0] * relu(pi_mag)` (SAELens `GatedSAE.encode`).
pub fn gated(pi_gate: &Tensor, pi_mag: &Tensor) -> Tensor {
    pi_gate.gt(0.0).to_kind(pi_gate.kind()) * pi_mag.relu()
}

/// BatchTopK (SAELens): the `k * rows` largest values of `relu(pre)` over the
/// whole batch survive, the rest are zero.
pub fn batch_topk(pre: &Tensor, k: i64) -> Tensor {
    let acts = pre.relu();
    let flat = acts.flatten(0, -1);
    let keep = (k * pre.size()[0]).min(flat.size()[0]);
    let (values, indices) = flat.topk(keep, -1, true, false);
    flat.zeros_like()
        .scatter(-1, &indices, &values)
        .reshape(acts.size())
}

/// The rectangle kernel `K(u) = 1{-1/2 < u < 1/2}` at `u = (pre - threshold)
/// / bandwidth`, without gradient (SAELens `rectangle`).
pub fn rectangle(pre: &Tensor, threshold: &Tensor, bandwidth: f64) -> Tensor {
    let u = (pre.detach() - threshold.detach()) / bandwidth;
    u.gt(-0.5).logical_and(&u.lt(0.5)).to_kind(pre.kind())
}

/// A zero-valued term whose gradient with respect to `threshold` (`[h]`,
/// broadcast over the batch) is `coeff` (`[batch, h]`, no gradient) times the
/// incoming gradient, summed over the batch: the way to give a step function
/// a pseudo-derivative with plain autograd ops.
pub fn straight_through(threshold: &Tensor, coeff: &Tensor) -> Tensor {
    let s = threshold * coeff;
    &s - s.detach()
}

/// The step function `H(pre - threshold)` (1 where a latent fires), with
/// SAELens's `Step` pseudo-gradient for the threshold,
/// `-(1/bw) K((pre - threshold)/bw)`, and none for `pre`.
pub fn step_with_ste(pre: &Tensor, threshold: &Tensor, bandwidth: f64) -> Tensor {
    let value = pre.detach().gt_tensor(threshold).to_kind(pre.kind());
    let coeff = (rectangle(pre, threshold, bandwidth) * (1.0 / bandwidth)).neg();
    value + straight_through(threshold, &coeff)
}
