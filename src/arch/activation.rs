//! The one name of each architecture ([`ActivationKind`], as written in
//! `model.activation`, model files and exports) and the value that carries
//! its settings ([`Activation`]). The straight-through helpers at the end
//! are shared by jumprelu and the l0 penalty.

use super::{Architecture, Threshold};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `model.jumprelu_bandwidth` when a model file does not say (SAELens's default).
pub const DEFAULT_BANDWIDTH: f64 = 0.05;

/// `model.residual_threshold` when a model file does not say (SAELens's
/// default).
pub const DEFAULT_RESIDUAL_THRESHOLD: f64 = 1e-2;

/// Every architecture, by the name users write; one file each in
/// `src/arch/`, mapped to its code by [`super::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationKind {
    Sigmoid,
    Relu,
    Topk,
    /// Top-k by magnitude, signs kept.
    Abstopk,
    Batchtopk,
    Jumprelu,
    Gated,
    /// Batch top-k trained with nested prefix reconstructions; the widths
    /// are a training setting (`model.matryoshka_widths`), not the model's.
    #[serde(rename = "matryoshka_batchtopk")]
    MatryoshkaBatchtopk,
    /// Greedy matching pursuit over the decoder rows: at most `k` atoms a
    /// row, stopping once the residual norm is below `residual_threshold`.
    #[serde(rename = "matching_pursuit")]
    MatchingPursuit,
}

impl ActivationKind {
    pub const ALL: [ActivationKind; 9] = [
        ActivationKind::Sigmoid,
        ActivationKind::Relu,
        ActivationKind::Topk,
        ActivationKind::Abstopk,
        ActivationKind::Batchtopk,
        ActivationKind::Jumprelu,
        ActivationKind::Gated,
        ActivationKind::MatryoshkaBatchtopk,
        ActivationKind::MatchingPursuit,
    ];

    /// The names of the activations that take `model.k`, for messages.
    pub fn names_with_k() -> String {
        let names: Vec<_> = Self::ALL
            .iter()
            .filter(|a| a.uses_k())
            .map(|a| a.name())
            .collect();
        names.join(", ")
    }

    /// Activations that keep k latents (per row, or k x batch over a batch).
    pub fn uses_k(self) -> bool {
        matches!(
            self,
            ActivationKind::Topk
                | ActivationKind::Abstopk
                | ActivationKind::Batchtopk
                | ActivationKind::MatryoshkaBatchtopk
                | ActivationKind::MatchingPursuit
        )
    }

    /// The name users write (serde's).
    pub fn name(self) -> &'static str {
        match self {
            ActivationKind::Sigmoid => "sigmoid",
            ActivationKind::Relu => "relu",
            ActivationKind::Topk => "topk",
            ActivationKind::Abstopk => "abstopk",
            ActivationKind::Batchtopk => "batchtopk",
            ActivationKind::Jumprelu => "jumprelu",
            ActivationKind::Gated => "gated",
            ActivationKind::MatryoshkaBatchtopk => "matryoshka_batchtopk",
            ActivationKind::MatchingPursuit => "matching_pursuit",
        }
    }
}

/// An architecture and its settings: `k` where it keeps k latents, the
/// JumpReLU bandwidth, matching pursuit's residual threshold. Settings an
/// architecture does not use hold fixed values, so two values of one kind
/// compare equal exactly when they compute the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activation {
    pub kind: ActivationKind,
    k: Option<i64>,
    bandwidth: f64,
    residual_threshold: f64,
    /// jumprelu, training: the straight-through estimate reaches the
    /// pre-activations too (`model.jumprelu_ste_to_input`).
    ste_to_input: bool,
}

impl Activation {
    /// An activation without settings (sigmoid, relu, gated), or any kind
    /// with its settings at their defaults and `k` unset.
    pub fn plain(kind: ActivationKind) -> Activation {
        Activation {
            kind,
            k: None,
            bandwidth: DEFAULT_BANDWIDTH,
            residual_threshold: DEFAULT_RESIDUAL_THRESHOLD,
            ste_to_input: false,
        }
    }

    /// `kind` keeping `k` latents (topk, batchtopk, matryoshka, matching pursuit).
    pub fn with_k(kind: ActivationKind, k: i64) -> Activation {
        debug_assert!(kind.uses_k(), "{} has no k", kind.name());
        Activation {
            k: Some(k),
            ..Activation::plain(kind)
        }
    }

    pub fn jumprelu(bandwidth: f64) -> Activation {
        Activation {
            bandwidth,
            ..Activation::plain(ActivationKind::Jumprelu)
        }
    }

    pub fn matching_pursuit(k: i64, residual_threshold: f64) -> Activation {
        Activation {
            residual_threshold,
            ..Activation::with_k(ActivationKind::MatchingPursuit, k)
        }
    }

    /// From a model file's description (training-only settings at their
    /// defaults).
    pub fn from_config(kind: ActivationKind, k: Option<i64>) -> Activation {
        match kind.uses_k() {
            true => Activation::with_k(kind, k.expect("validated: a k-activation has k")),
            false => Activation::plain(kind),
        }
    }

    /// From a training config's `model.activation`, `model.k`,
    /// `model.jumprelu_bandwidth`, `model.jumprelu_ste_to_input` and
    /// `model.residual_threshold`.
    pub fn from_settings(
        kind: ActivationKind,
        k: Option<i64>,
        bandwidth: f64,
        ste_to_input: bool,
        residual_threshold: f64,
    ) -> Activation {
        match kind {
            ActivationKind::Jumprelu => Activation {
                ste_to_input,
                ..Activation::jumprelu(bandwidth)
            },
            _ => Activation::from_config(kind, k).with_residual_threshold(Some(residual_threshold)),
        }
    }

    /// matching_pursuit with its residual threshold set to `t` (when
    /// given, as a model file may not); other activations unchanged.
    pub fn with_residual_threshold(self, t: Option<f64>) -> Activation {
        match (self.kind, t) {
            (ActivationKind::MatchingPursuit, Some(residual_threshold)) => Activation {
                residual_threshold,
                ..self
            },
            _ => self,
        }
    }

    /// matching_pursuit's residual threshold.
    pub fn residual_threshold(&self) -> Option<f64> {
        (self.kind == ActivationKind::MatchingPursuit).then_some(self.residual_threshold)
    }

    /// jumprelu: whether training's straight-through estimate reaches the
    /// pre-activations.
    pub fn ste_to_input(&self) -> bool {
        self.ste_to_input
    }

    /// jumprelu's bandwidth.
    pub fn bandwidth(&self) -> Option<f64> {
        (self.kind == ActivationKind::Jumprelu).then_some(self.bandwidth)
    }

    pub fn kind(&self) -> ActivationKind {
        self.kind
    }

    pub fn k(&self) -> Option<i64> {
        self.k
    }

    /// `k` of an activation that keeps k latents.
    pub(super) fn k_set(&self) -> i64 {
        self.k.expect("a k-activation has k")
    }

    /// This architecture's code (see [`crate::arch`]).
    pub fn arch(&self) -> Box<dyn Architecture> {
        super::of(self)
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
    /// Of the codes' magnitudes where they are signed ([`Activation::magnitude`]).
    pub fn active_threshold(&self) -> f64 {
        self.arch().active_threshold()
    }

    /// What activity is judged on: the codes, or their magnitudes where
    /// they may be negative (abstopk).
    pub fn magnitude(&self, z: &Tensor) -> Tensor {
        match self.arch().signed_codes() {
            true => z.abs(),
            false => z.shallow_clone(),
        }
    }

    /// Which codes are active (bool, the shape of `z`).
    pub fn active(&self, z: &Tensor) -> Tensor {
        self.magnitude(z).gt(self.active_threshold())
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
/// `-(1/bw) K((pre - threshold)/bw)`, and none for `pre` unless
/// `ste_to_input` (then its negation, as the step depends on pre - threshold).
pub fn step_with_ste(
    pre: &Tensor,
    threshold: &Tensor,
    bandwidth: f64,
    ste_to_input: bool,
) -> Tensor {
    let value = pre.detach().gt_tensor(threshold).to_kind(pre.kind());
    let kernel = rectangle(pre, threshold, bandwidth) * (1.0 / bandwidth);
    let out = value + straight_through(threshold, &kernel.neg());
    match ste_to_input {
        true => out + straight_through(pre, &kernel),
        false => out,
    }
}
