//! Matryoshka batch top-k (SAELens `matryoshka_batchtopk`,
//! `MatryoshkaBatchTopKTrainingSAE`): batch top-k codes (see
//! [`super::batchtopk`], whose training codes, threshold estimate and
//! inference this reuses), and each inner prefix of the latents
//! (`model.matryoshka_widths`, `d_hidden` the outermost level) is trained
//! to reconstruct the target on its own.
//!
//! As SAELens's `training_forward_pass`: the loss of the whole model (mse
//! plus the weighted penalty; `auxk` is SAELens's default
//! `calculate_topk_aux_loss`, `use_matryoshka_aux_loss: false`) comes first,
//! then for each level but the last, in increasing width, the mse of
//! `b_dec + sum over levels so far of z[:, prev:w] @ W_dec[prev:w]` (built
//! up level by level, as `_iterable_decode`) is added unweighted. Nothing is
//! detached. The squared error is averaged over elements (this project's
//! mse; SAELens sums over d_in), so every term is SAELens's over d_in.
//!
//! SAELens saves it for inference as a JumpReLU with the estimated
//! threshold, as batchtopk.

use super::batchtopk::BatchTopK;
use super::exports::ActivationCode;
use super::Architecture;
use super::Threshold;
use super::{Params, Settings};
use serde_json::{Map, Value};
use tch::{Device, Reduction, Tensor};

pub struct MatryoshkaBatchTopK {
    pub k: i64,
}

impl MatryoshkaBatchTopK {
    fn batchtopk(&self) -> BatchTopK {
        BatchTopK { k: self.k }
    }
}

impl Architecture for MatryoshkaBatchTopK {
    fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.batchtopk().apply(pre, threshold)
    }

    fn apply_train(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        self.batchtopk().apply_train(pre, threshold)
    }

    fn threshold(&self) -> Threshold {
        self.batchtopk().threshold()
    }

    fn init_threshold(&self, d_hidden: i64, s: &Settings, device: Device) -> Option<Tensor> {
        self.batchtopk().init_threshold(d_hidden, s, device)
    }

    /// The inner levels' reconstruction losses, narrowest first.
    fn extra_losses(
        &self,
        model: &dyn Params,
        _pre: &Tensor,
        z: &Tensor,
        target: &Tensor,
        s: &Settings,
    ) -> Vec<Tensor> {
        let levels = &s.matryoshka_levels;
        let w_dec = model.decoder_weight();
        let mut decoded = model.b_dec().shallow_clone();
        let mut prev = 0;
        let mut losses = Vec::with_capacity(levels.len() - 1);
        for &width in &levels[..levels.len() - 1] {
            let n = width - prev;
            decoded = z.narrow(1, prev, n).mm(&w_dec.narrow(0, prev, n)) + &decoded;
            let recon = model.output_activation(decoded.shallow_clone());
            losses.push(recon.mse_loss(target, Reduction::Mean));
            prev = width;
        }
        losses
    }

    fn after_forward(&self, model: &mut dyn Params, z: &Tensor, s: &Settings) {
        self.batchtopk().after_forward(model, z, s)
    }

    /// After training SAELens saves it as a JumpReLU (its config class
    /// inherits batchtopk's `get_inference_config_class`).
    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        self.batchtopk().saelens()
    }

    fn torchscript(&self, model: &dyn Params) -> ActivationCode {
        self.batchtopk().torchscript(model)
    }
}
