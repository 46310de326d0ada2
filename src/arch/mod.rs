//! What differs per architecture, one file each, behind one trait.
//!
//! [`ActivationKind`] is the one name of each architecture (config, model
//! files, exports); an [`Activation`] is a kind with its settings (`k`, the
//! JumpReLU bandwidth); [`of`] is the registry that maps it to the code in
//! this folder. The model, the training step and the exporters ask the
//! architecture instead of matching on the activation themselves.
//!
//! This layer stands below the model, the config and the exporters: it
//! works on tensors, a narrow view of the model ([`Params`]) and its own
//! [`Settings`], and what it says about exports is data
//! ([`exports::ActivationCode`], [`Architecture::saelens`]) that the
//! exporters consume. It imports none of them.
//!
//! To add an architecture: its name in [`ActivationKind`], a file here
//! implementing [`Architecture`], and its line in [`of`]. Everything else
//! has a default that fits a plain activation applied to the pre-activations.

mod abstopk;
mod activation;
mod batchtopk;
pub mod exports;
mod gated;
mod jumprelu;
mod matching_pursuit;
mod matryoshka_batchtopk;
mod relu;
mod sigmoid;
mod topk;

pub use batchtopk::batch_topk;
pub use gated::gated;

pub use activation::{
    rectangle, step_with_ste, straight_through, Activation, ActivationKind, DEFAULT_BANDWIDTH,
    DEFAULT_RESIDUAL_THRESHOLD,
};
use exports::ActivationCode;
use serde_json::{Map, Value};
use tch::{Device, Tensor};

/// The narrow view of a model that architectures work on (`model::Sae`
/// gives it): the decoder, the threshold and the gate, and the decode.
pub trait Params {
    /// `[d_hidden, d_out]` (`W_enc.T` when tied).
    fn decoder_weight(&self) -> Tensor;
    fn b_dec(&self) -> &Tensor;
    /// jumprelu / batchtopk: the threshold, to update in place.
    fn threshold_mut(&mut self) -> Option<&mut Tensor>;
    /// The threshold as saved (`[d_hidden]` float32).
    fn threshold_for_saving(&self) -> Option<Tensor>;
    /// Gated models: `(r_mag, b_mag)`.
    fn gate(&self) -> Option<(&Tensor, &Tensor)>;
    /// Gated models: the gate's codes `relu(pi_gate)` of normalised input.
    fn gate_codes(&self, xn: &Tensor) -> Option<Tensor>;
    /// Codes to normalised output: decoder, deep layers, output activation.
    fn decode_normalized(&self, z: &Tensor) -> Tensor;
    /// The output activation alone (on `z @ W_dec + b_dec` of a shallow model).
    fn output_activation(&self, out: Tensor) -> Tensor;
}

/// The training settings architectures read (from `model.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// jumprelu: the threshold a fresh model starts with.
    pub jumprelu_init_threshold: f64,
    /// batchtopk: the rate of the inference threshold's moving average.
    pub topk_threshold_lr: f64,
    /// matryoshka: the nested widths, `d_hidden` last.
    pub matryoshka_levels: Vec<i64>,
    /// topk: sparsify's Multi-TopK loss.
    pub multi_topk: bool,
}

/// The registry: the code for each [`Activation`].
pub fn of(a: &Activation) -> Box<dyn Architecture> {
    use ActivationKind as A;
    match a.kind {
        A::Sigmoid => Box::new(sigmoid::Sigmoid),
        A::Relu => Box::new(relu::Relu),
        A::Topk => Box::new(topk::TopK { k: a.k_set() }),
        A::Abstopk => Box::new(abstopk::AbsTopK { k: a.k_set() }),
        A::Batchtopk => Box::new(batchtopk::BatchTopK { k: a.k_set() }),
        A::Jumprelu => Box::new(jumprelu::JumpRelu {
            bandwidth: a.bandwidth().expect("jumprelu"),
            ste_to_input: a.ste_to_input(),
        }),
        A::Gated => Box::new(gated::Gated),
        A::MatryoshkaBatchtopk => {
            Box::new(matryoshka_batchtopk::MatryoshkaBatchTopK { k: a.k_set() })
        }
        A::MatchingPursuit => Box::new(matching_pursuit::MatchingPursuit {
            k: a.k_set(),
            residual_threshold: a.residual_threshold().expect("matching_pursuit"),
        }),
    }
}

/// The entries of a batch `[batch, d_hidden]` a sparse step works on.
pub enum Support {
    /// A bool mask shaped like the pre-activations.
    Mask(Tensor),
    /// The same number of latents in every row: their indices `[batch, k]`.
    Rows(Tensor),
}

/// How the model holds a per-latent threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    None,
    /// Trained by gradient (jumprelu): an optimizer parameter.
    Parameter,
    /// Estimated during training, used at inference (batchtopk): a buffer.
    Buffer,
}

/// One architecture's behaviour. Defaults fit a plain activation.
pub trait Architecture {
    /// Codes from pre-activations `[batch, d_hidden]`, as at inference.
    /// `threshold` is the model's (see [`Architecture::threshold`]).
    fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor;

    /// Codes that are not a function of the pre-activations alone: from the
    /// code layer's input `x` (normalised, minus `b_dec` when
    /// `apply_b_dec_to_input`) and the model's weights, the same in training
    /// and at inference, gradients flowing through them (matching pursuit: a
    /// greedy search over the decoder rows). When `Some`, `Sae` uses these
    /// and never calls [`apply`] / [`apply_train`]. `None` by default.
    ///
    /// [`apply`]: Architecture::apply
    /// [`apply_train`]: Architecture::apply_train
    fn codes_from_input(&self, _model: &dyn Params, _x: &Tensor) -> Option<Tensor> {
        None
    }

    /// Codes during training (gradients flow through these).
    fn apply_train(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.apply(pre, threshold)
    }

    /// The value above which a latent counts as active (L0, firing).
    fn active_threshold(&self) -> f64 {
        0.0
    }

    /// Whether codes may be negative (abstopk): a latent is then active
    /// where its code is not 0, and AuxK ranks dead latents by magnitude.
    fn signed_codes(&self) -> bool {
        false
    }

    /// Whether codes are `relu(pre)`: then `|z| = z` and the l1 penalty can
    /// skip its `abs` (see `Penalty::value`).
    fn relu_codes(&self) -> bool {
        false
    }

    fn threshold(&self) -> Threshold {
        Threshold::None
    }

    /// Whether [`support`] is given: then the model can train through the
    /// sparse step (`crate::sparse_step`).
    ///
    /// [`support`]: Architecture::support
    fn has_support(&self) -> bool {
        false
    }

    /// Where the training codes, and every gradient through them (to `pre`
    /// and to the threshold), can be non-zero. Outside it a step has
    /// nothing to compute.
    fn support(&self, _pre: &Tensor, _threshold: Option<&Tensor>) -> Support {
        unreachable!("only called when has_support()")
    }

    /// The training codes at the support's entries from their
    /// pre-activations (`[nnz]`; `threshold` gathered alike): an
    /// elementwise function. By default [`apply_train`], which is one for
    /// relu and jumprelu.
    ///
    /// [`apply_train`]: Architecture::apply_train
    fn support_codes(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.apply_train(pre, threshold)
    }

    /// The threshold a fresh model starts with (when it has one).
    fn init_threshold(&self, _d_hidden: i64, _s: &Settings, _device: Device) -> Option<Tensor> {
        None
    }

    /// Whether the model carries a gate's magnitude path (`r_mag`, `b_mag`).
    fn gated(&self) -> bool {
        false
    }

    // --- training hooks, in the order a step calls them ---

    /// Before each training forward pass (a projection of parameters).
    fn before_forward(&self, _model: &mut dyn Params) {}

    /// The codes the sparsity penalty sees instead of the training codes,
    /// from the (possibly corrupted) normalised input.
    fn penalty_codes(&self, _model: &dyn Params, _input: &Tensor) -> Option<Tensor> {
        None
    }

    /// An extra loss term, added unweighted, from [`penalty_codes`]'s result.
    ///
    /// [`penalty_codes`]: Architecture::penalty_codes
    fn aux_loss(
        &self,
        _model: &dyn Params,
        _penalty_codes: &Tensor,
        _target: &Tensor,
    ) -> Option<Tensor> {
        None
    }

    /// Extra loss terms from the training forward pass's pre-activations
    /// `pre` and codes `z`,
    /// each added unweighted to the loss, in order, after everything else
    /// (matryoshka: each inner prefix's reconstruction). Empty by default,
    /// and then the loss is computed exactly as without this hook.
    fn extra_losses(
        &self,
        _model: &dyn Params,
        _pre: &Tensor,
        _z: &Tensor,
        _target: &Tensor,
        _s: &Settings,
    ) -> Vec<Tensor> {
        Vec::new()
    }

    /// After the forward pass, from the training codes (a running estimate).
    fn after_forward(&self, _model: &mut dyn Params, _z: &Tensor, _s: &Settings) {}

    /// Once training ends, before the model is saved.
    fn finish_training(&self, _model: &mut dyn Params) {}

    // --- export descriptions ---

    /// SAELens's architecture name and its extra `cfg.json` fields, or why
    /// SAELens has none for this one.
    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String>;

    /// The TorchScript `activation(self, pre)` method (or, for
    /// [`codes_from_input`] architectures, the `codes(self, x)` method) and
    /// what it reads.
    ///
    /// [`codes_from_input`]: Architecture::codes_from_input
    fn torchscript(&self, model: &dyn Params) -> ActivationCode;
}

/// SAELens's JumpReLU inference, `relu(pre) * (pre > threshold)`, shared by
/// jumprelu and batchtopk (saved for inference as a JumpReLU).
fn jump(pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
    match threshold {
        Some(t) => pre.relu() * pre.gt_tensor(t).to_kind(pre.kind()),
        None => pre.relu(),
    }
}

/// The TorchScript of [`jump`].
const JUMP_TS: &str = "    return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)\n";

/// The threshold as saved (`[d_hidden]` float32).
fn saved_threshold(model: &dyn Params) -> Tensor {
    model
        .threshold_for_saving()
        .expect("a jumprelu/batchtopk model has a threshold")
}
