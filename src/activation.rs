//! Hidden-layer activations: the value that names an architecture and
//! carries its settings. What each one computes lives in [`crate::arch`]
//! (one file each); to add one see there. The straight-through helpers at
//! the end are shared by jumprelu and the l0 penalty.

use crate::arch::{Architecture, Threshold};
use crate::config::{ActivationKind, ModelConfig};
use tch::Tensor;

/// `model.jumprelu_bandwidth` when a model file does not say (SAELens's default).
pub const DEFAULT_BANDWIDTH: f64 = 0.05;

/// `model.residual_threshold` when a model file does not say (SAELens's
/// default).
pub const DEFAULT_RESIDUAL_THRESHOLD: f64 = 1e-2;

/// One per file in `src/arch/`, where each is described.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Sigmoid,
    Relu,
    TopK {
        k: i64,
    },
    BatchTopK {
        k: i64,
    },
    JumpRelu {
        bandwidth: f64,
    },
    Gated,
    /// Batch top-k trained with nested prefix reconstructions; the widths
    /// are a training setting (`model.matryoshka_widths`), not the model's.
    MatryoshkaBatchTopK {
        k: i64,
    },
    /// Greedy matching pursuit over the decoder rows: at most `k` atoms a
    /// row, stopping once the residual norm is below `residual_threshold`.
    MatchingPursuit {
        k: i64,
        residual_threshold: f64,
    },
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
            ActivationKind::MatryoshkaBatchtopk => Activation::MatryoshkaBatchTopK {
                k: k.expect("validated: matryoshka_batchtopk has k"),
            },
            ActivationKind::MatchingPursuit => Activation::MatchingPursuit {
                k: k.expect("validated: matching_pursuit has k"),
                residual_threshold: DEFAULT_RESIDUAL_THRESHOLD,
            },
        }
    }

    /// From a training config.
    pub fn from_model_config(m: &ModelConfig) -> Activation {
        match Activation::from_config(m.activation, m.k) {
            Activation::JumpRelu { .. } => Activation::JumpRelu {
                bandwidth: m.jumprelu_bandwidth,
            },
            a => a.with_residual_threshold(Some(m.residual_threshold)),
        }
    }

    /// matching_pursuit with its residual threshold set to `t` (when
    /// given, as a model file may not); other activations unchanged.
    pub fn with_residual_threshold(self, t: Option<f64>) -> Activation {
        match (self, t) {
            (Activation::MatchingPursuit { k, .. }, Some(residual_threshold)) => {
                Activation::MatchingPursuit {
                    k,
                    residual_threshold,
                }
            }
            (a, _) => a,
        }
    }

    /// matching_pursuit's residual threshold.
    pub fn residual_threshold(&self) -> Option<f64> {
        match self {
            Activation::MatchingPursuit {
                residual_threshold, ..
            } => Some(*residual_threshold),
            _ => None,
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
            Activation::MatryoshkaBatchTopK { .. } => ActivationKind::MatryoshkaBatchtopk,
            Activation::MatchingPursuit { .. } => ActivationKind::MatchingPursuit,
        }
    }

    pub fn k(&self) -> Option<i64> {
        match self {
            Activation::TopK { k }
            | Activation::BatchTopK { k }
            | Activation::MatryoshkaBatchTopK { k }
            | Activation::MatchingPursuit { k, .. } => Some(*k),
            _ => None,
        }
    }

    /// This architecture's code (see [`crate::arch`]).
    pub fn arch(&self) -> Box<dyn Architecture> {
        crate::arch::of(self)
    }

    /// Whether the model carries a `threshold` tensor for this activation:
    /// `[d_hidden]`, learned (jumprelu) or estimated (batchtopk).
    pub fn has_threshold(&self) -> bool {
        self.arch().threshold() != Threshold::None
    }

    /// Maps pre-activations `[batch, d_hidden]` to codes of the same shape,
    /// as at inference. `threshold` is the model's (jumprelu, batchtopk).
    pub fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.arch().apply(pre, threshold)
    }

    /// Codes during training (gradients flow through these). The same as
    /// [`Activation::apply`] except for batchtopk (top k x batch of the batch)
    /// and jumprelu (straight-through gradients to the threshold).
    pub fn apply_train(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.arch().apply_train(pre, threshold)
    }

    /// The value above which a unit counts as active, for L0 and firing
    /// statistics: 0 for ReLU-like codes; 0.5 for sigmoid, which is never 0.
    pub fn active_threshold(&self) -> f64 {
        self.arch().active_threshold()
    }
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
