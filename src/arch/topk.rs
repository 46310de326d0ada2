//! Top-k: the k largest pre-activations per row survive (then ReLU).

use super::exports::{ActivationCode, AttrValue};
use super::{Architecture, Support};
use super::{Params, Settings};
use serde_json::{json, Map, Value};
use tch::Tensor;

pub struct TopK {
    pub k: i64,
}

impl Architecture for TopK {
    /// SAELens order: top-k of the raw pre-activations, then ReLU on the
    /// kept values, so a row may have fewer than k positive codes.
    fn apply(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        let (values, indices) = pre.topk(self.k, -1, true, false);
        pre.zeros_like().scatter(-1, &indices, &values.relu())
    }

    fn has_support(&self) -> bool {
        true
    }

    /// The k selected latents of each row (the same `topk` as `apply`).
    fn support(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Support {
        Support::Rows(pre.topk(self.k, -1, true, false).1)
    }

    /// ReLU on the kept values.
    fn support_codes(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        pre.relu()
    }

    /// sparsify's Multi-TopK: the reconstruction from the 4k largest
    /// pre-activations, its mse weighted 1/8.
    fn extra_losses(
        &self,
        model: &dyn Params,
        pre: &Tensor,
        _z: &Tensor,
        target: &Tensor,
        s: &Settings,
    ) -> Vec<Tensor> {
        if !s.multi_topk {
            return Vec::new();
        }
        // 4k, capped at the width (k decays from up to d_hidden).
        let wide = TopK {
            k: (4 * self.k).min(pre.size()[1]),
        }
        .apply(pre, None);
        let recon = model.decode_normalized(&wide);
        vec![recon.mse_loss(target, tch::Reduction::Mean) / 8.0]
    }

    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        let mut m = Map::new();
        m.insert("k".into(), json!(self.k));
        m.insert("rescale_acts_by_decoder_norm".into(), json!(false));
        Ok(("topk", m))
    }

    fn torchscript(&self, _model: &dyn Params) -> ActivationCode {
        ActivationCode {
            body: "    values, indices = torch.topk(pre, self.k, dim=-1)\n    \
                   return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))\n"
                .into(),
            from_input: false,
            tensors: vec![],
            attrs: vec![("k".into(), AttrValue::Int(self.k))],
        }
    }
}
