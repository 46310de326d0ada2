//! JumpReLU (SAELens/DeepMind): `relu(pre) * (pre > threshold_j)` with a
//! learned threshold per latent; training passes gradients to the
//! thresholds through a straight-through estimator, a rectangle kernel of
//! width `bandwidth`.

use super::exports::{ActivationCode, AttrValue};
use super::{jump, saved_threshold, Architecture, Support, Threshold, JUMP_TS};
use super::{rectangle, straight_through};
use super::{Params, Settings};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

pub struct JumpRelu {
    pub bandwidth: f64,
    /// The straight-through estimate reaches `pre` too (SAELens
    /// `jumprelu_ste_to_input`): its gradient adds `(t/bw) K(...)`.
    pub ste_to_input: bool,
}

impl Architecture for JumpRelu {
    fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        jump(pre, threshold)
    }

    /// SAELens JumpReLU.forward: x * (x > threshold); backward:
    /// d/dx = (x > threshold), d/dthreshold = -(threshold/bw) K((x - threshold)/bw).
    fn apply_train(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        let t = threshold.expect("a jumprelu model has a threshold");
        let value = pre * pre.gt_tensor(t).to_kind(pre.kind());
        let kernel = t.detach() / self.bandwidth * rectangle(pre, t, self.bandwidth);
        let out = value + straight_through(t, &kernel.neg());
        match self.ste_to_input {
            true => out + straight_through(pre, &kernel),
            false => out,
        }
    }

    fn threshold(&self) -> Threshold {
        Threshold::Parameter
    }

    fn has_support(&self) -> bool {
        true
    }

    /// Where `pre > threshold` (the codes) or the rectangle kernel of the
    /// threshold's pseudo-gradient is non-zero (`u > -1/2`, with
    /// `rectangle`'s own arithmetic); the first implies the second.
    fn support(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Support {
        let t = threshold.expect("a jumprelu model has a threshold");
        Support::Mask(((pre - t) / self.bandwidth).gt(-0.5))
    }

    fn init_threshold(&self, d_hidden: i64, s: &Settings, device: Device) -> Option<Tensor> {
        Some(Tensor::full(
            [d_hidden],
            s.jumprelu_init_threshold,
            (Kind::Float, device),
        ))
    }

    /// SAELens: thresholds stay >= 0 (projected before each forward pass).
    fn before_forward(&self, model: &mut dyn Params) {
        let _guard = tch::no_grad_guard();
        let _ = model.threshold_mut().unwrap().clamp_min_(0.0);
    }

    /// The last step may leave a threshold below 0; at inference that acts
    /// as 0 (relu(pre) * (pre > t)), so it is saved projected.
    fn finish_training(&self, model: &mut dyn Params) {
        let _ = model.threshold_mut().unwrap().clamp_min_(0.0);
    }

    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        Ok(("jumprelu", Map::new()))
    }

    /// The learned threshold is a parameter.
    fn torchscript(&self, model: &dyn Params) -> ActivationCode {
        ActivationCode {
            body: JUMP_TS.into(),
            from_input: false,
            tensors: vec![("threshold".into(), saved_threshold(model), true)],
            attrs: vec![(
                "jumprelu_bandwidth".into(),
                AttrValue::Float(self.bandwidth),
            )],
        }
    }
}
