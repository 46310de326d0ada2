//! `sigmoid(pre)`: the classic autoencoder of the seeds (with a KL penalty).

use super::exports::ActivationCode;
use super::Architecture;
use super::Params;
use serde_json::{Map, Value};
use tch::Tensor;

pub struct Sigmoid;

impl Architecture for Sigmoid {
    fn apply(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        pre.sigmoid()
    }

    /// Sigmoid codes are never 0: a latent is active above one half.
    fn active_threshold(&self) -> f64 {
        0.5
    }

    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        Err("SAELens has no sigmoid-activation architecture \
             (it has standard/ReLU, topk, batchtopk, jumprelu)"
            .into())
    }

    fn torchscript(&self, _model: &dyn Params) -> ActivationCode {
        ActivationCode::simple("    return torch.sigmoid(pre)\n")
    }
}
