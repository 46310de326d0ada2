//! `relu(pre)`: SAELens's `standard` SAE.

use super::exports::ActivationCode;
use super::Params;
use super::{Architecture, Support};
use serde_json::{Map, Value};
use tch::Tensor;

pub struct Relu;

impl Architecture for Relu {
    fn apply(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        pre.relu()
    }

    fn relu_codes(&self) -> bool {
        true
    }

    fn has_support(&self) -> bool {
        true
    }

    fn support(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Support {
        Support::Mask(pre.gt(0.0))
    }

    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        Ok(("standard", Map::new()))
    }

    fn torchscript(&self, _model: &dyn Params) -> ActivationCode {
        ActivationCode::simple("    return torch.relu(pre)\n")
    }
}
