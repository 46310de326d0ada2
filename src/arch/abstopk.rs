//! AbsTopK (SAELens `abstopk`, from "AbsTopK: Rethinking Sparse
//! Autoencoders For Bidirectional Features"): the k pre-activations of
//! largest magnitude per row survive with their sign, no ReLU, so a latent
//! can fire either way. A code is active when it is not 0.

use super::exports::{ActivationCode, AttrValue};
use super::Architecture;
use super::Params;
use serde_json::{json, Map, Value};
use tch::Tensor;

pub struct AbsTopK {
    pub k: i64,
}

impl Architecture for AbsTopK {
    /// SAELens order: top-k of `|pre|`, then the signed values scattered.
    fn apply(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        let indices = pre.abs().topk(self.k, -1, true, false).1;
        pre.zeros_like()
            .scatter(-1, &indices, &pre.gather(-1, &indices, false))
    }

    fn signed_codes(&self) -> bool {
        true
    }

    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        let mut m = Map::new();
        m.insert("k".into(), json!(self.k));
        m.insert("rescale_acts_by_decoder_norm".into(), json!(false));
        Ok(("abstopk", m))
    }

    fn torchscript(&self, _model: &dyn Params) -> ActivationCode {
        ActivationCode {
            body: "    indices = torch.topk(torch.abs(pre), self.k, dim=-1)[1]\n    \
                   return torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices))\n"
                .into(),
            from_input: false,
            tensors: vec![],
            attrs: vec![("k".into(), AttrValue::Int(self.k))],
        }
    }
}
