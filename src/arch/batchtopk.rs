//! Batch top-k (SAELens `batchtopk`): training keeps the `k x batch` largest
//! ReLU'd pre-activations of the whole batch (k per row on average) and
//! tracks a threshold; inference is a JumpReLU with that threshold, as
//! SAELens saves a BatchTopK SAE for inference.

use super::exports::{ActivationCode, AttrValue};
use super::{jump, saved_threshold, Architecture, Threshold, JUMP_TS};
use super::{Params, Settings};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

pub struct BatchTopK {
    pub k: i64,
}

impl Architecture for BatchTopK {
    fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Tensor {
        jump(pre, threshold)
    }

    fn apply_train(&self, pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        match crate::dist::group() {
            Some(g) if g.world > 1 => batch_topk_global(pre, self.k, g),
            _ => batch_topk(pre, self.k),
        }
    }

    fn threshold(&self) -> Threshold {
        Threshold::Buffer
    }

    /// SAELens keeps the running estimate in float64, a scalar while training.
    fn init_threshold(&self, _d_hidden: i64, _s: &Settings, device: Device) -> Option<Tensor> {
        Some(Tensor::zeros([], (Kind::Double, device)))
    }

    /// The inference threshold: an exponential moving average of the
    /// smallest positive training code (SAELens `update_topk_threshold`).
    /// With several ranks, the smallest over the global batch.
    fn after_forward(&self, model: &mut dyn Params, z: &Tensor, s: &Settings) {
        let _guard = tch::no_grad_guard();
        let z = z.detach();
        // On the device, no read: the smallest positive code (+inf where
        // none is; with several ranks, the smallest over the global batch,
        // every rank taking part), the threshold kept where it is inf.
        let mut local = match z.numel() {
            0 => Tensor::from(f32::INFINITY)
                .to_kind(z.kind())
                .to_device(z.device()),
            _ => z.where_scalarother(&z.gt(0.0), f64::INFINITY).min(),
        };
        if let Some(g) = crate::dist::group().filter(|g| g.world > 1) {
            g.allreduce(&mut local, crate::dist::Op::Min);
        }
        let min_positive = local.to_kind(Kind::Double);
        let rate = s.topk_threshold_lr;
        let t = model.threshold_mut().expect("batchtopk has a threshold");
        let moved = &*t * (1.0 - rate) + &min_positive * rate;
        *t = moved.where_self(&min_positive.isfinite(), &*t);
    }

    /// SAELens saves a BatchTopK SAE for inference as a JumpReLU whose
    /// threshold is the one estimated in training; ours is the same.
    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        Ok(("jumprelu", Map::new()))
    }

    /// The threshold is a buffer (estimated, not trained).
    fn torchscript(&self, model: &dyn Params) -> ActivationCode {
        ActivationCode {
            body: JUMP_TS.into(),
            from_input: false,
            tensors: vec![("threshold".into(), saved_threshold(model), false)],
            attrs: vec![("k".into(), AttrValue::Int(self.k))],
        }
    }
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

/// [`batch_topk`] over the global batch of a data-parallel run: each rank
/// offers its `K` largest codes (`K = k x` the global batch's rows, padded
/// with -inf), the `K`-th largest of all is the cut, and each rank keeps its
/// codes at or above it. The same codes as one process would keep, except
/// that codes tied exactly at a positive cut are all kept.
fn batch_topk_global(pre: &Tensor, k: i64, g: &crate::dist::Group) -> Tensor {
    let acts = pre.relu();
    let h = pre.size()[1];
    let rows = g.batch_rows();
    let keep = (k * rows).min(h * rows);
    let cut = tch::no_grad(|| {
        let flat = acts.detach().flatten(0, -1);
        let local = keep.min(flat.size()[0]);
        let (values, _) = flat.topk(local, -1, true, false);
        let pad = Tensor::full(
            [keep - local],
            f64::NEG_INFINITY,
            (acts.kind(), acts.device()),
        );
        let offered = Tensor::cat(&[values, pad], 0);
        let all = g.allgather(&offered).flatten(0, -1);
        let (top, _) = all.topk(keep, -1, true, true);
        top.select(0, keep - 1)
    });
    &acts * acts.ge_tensor(&cut).to_kind(acts.kind())
}
