//! Matching pursuit (SAELens `matching_pursuit`, `MatchingPursuitSAE` and
//! `MatchingPursuitTrainingSAE`): a tied SAE whose encoder is a greedy
//! matching pursuit over the decoder rows `W_dec` (= `W_enc.T`; `b_enc` is
//! not used), on the input minus `b_dec`: at most `k` (SAELens's
//! `max_iterations`) steps of `j = argmax relu(<r, W_dec_j>)`, `z_j +=
//! relu(<r, W_dec_j>)`, `r -= relu(<r, W_dec_j>) W_dec_j`, a row stopping
//! once its support did not change (`stop_on_duplicate_support`) or its
//! residual norm fell below `residual_threshold`. The code is
//! `crate::pursuit::matching_pursuit`, shared with `--encoder mp`.
//!
//! Training is SAELens's: the same pursuit (no straight-through), the
//! selections made without autograd and gradients flowing to `W_dec` and
//! `b_dec` through the selected coefficients and the residual updates; the
//! loss is the reconstruction alone (no sparsity coefficient, no auxiliary
//! loss: config validation asks for `sparsity.penalty: none`, `tied: true`).
//! SAELens forces `decoder_init_norm: 1.0`; here `model.init_scheme: sae`
//! with `model.decoder_init_norm: 1.0` (the defaults) is that start.

use super::exports::{ActivationCode, AttrValue};
use super::Architecture;
use super::Params;
use serde_json::{json, Map, Value};
use tch::Tensor;

pub struct MatchingPursuit {
    pub k: i64,
    pub residual_threshold: f64,
}

impl Architecture for MatchingPursuit {
    fn apply(&self, _pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        panic!("matching pursuit codes need the input and the dictionary: see codes_from_input")
    }

    fn codes_from_input(&self, model: &dyn Params, x: &Tensor) -> Option<Tensor> {
        Some(crate::pursuit::matching_pursuit(
            x,
            &model.decoder_weight(),
            self.k,
            self.residual_threshold,
        ))
    }

    /// SAELens's `MatchingPursuitSAEConfig` fields.
    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        let mut m = Map::new();
        m.insert("residual_threshold".into(), json!(self.residual_threshold));
        m.insert("max_iterations".into(), json!(self.k));
        m.insert("stop_on_duplicate_support".into(), json!(true));
        Ok(("matching_pursuit", m))
    }

    /// `codes(self, x)`: the pursuit as a scripted loop over the rows of
    /// `W_enc.T` (the tied dictionary; the module's `W_dec` is its copy, read
    /// by `decode`), the same ops as [`crate::pursuit::matching_pursuit`].
    fn torchscript(&self, _model: &dyn Params) -> ActivationCode {
        ActivationCode {
            body: MP_TS.into(),
            from_input: true,
            tensors: vec![],
            attrs: vec![
                ("k".into(), AttrValue::Int(self.k)),
                (
                    "residual_threshold".into(),
                    AttrValue::Float(self.residual_threshold),
                ),
            ],
        }
    }
}

/// `crate::pursuit::matching_pursuit` in TorchScript.
const MP_TS: &str = "    r = x
    acts = torch.zeros([x.size(0), self.W_enc.size(1)], dtype=x.dtype, device=x.device)
    prev = acts != 0
    done = torch.zeros([x.size(0)], dtype=x.dtype, device=x.device) != 0
    for _ in range(self.k):
        idx = torch.argmax(torch.relu(torch.matmul(r, self.W_enc)), dim=1, keepdim=True)
        sel = torch.index_select(self.W_enc.t(), 0, idx.squeeze(1))
        values = torch.relu(torch.sum(r * sel, dim=-1, keepdim=True))
        masked = values * torch.logical_not(done).to(values.dtype).unsqueeze(1)
        acts = acts.scatter_add(1, idx, masked)
        r = r - masked * sel
        support = acts != 0
        done = torch.logical_or(done, torch.all(support == prev, dim=1))
        prev = support
        if self.residual_threshold > 0.0:
            done = torch.logical_or(done, r.norm(2, [-1]) < self.residual_threshold)
        if bool(torch.all(done)):
            break
    return acts
";

#[cfg(test)]
mod tests {
    use crate::config::{ActivationKind, Config, ModelConfig};
    use crate::model::{ModelSpec, Sae};
    use crate::normalize::Normalizer;
    use crate::pursuit::{Pursuit, PursuitEncoder};
    use tch::{Device, Kind, Tensor};

    fn model(d: i64, h: i64, k: i64) -> Sae {
        let cfg = ModelConfig {
            d_hidden: h,
            activation: ActivationKind::MatchingPursuit,
            k: Some(k),
            tied: true,
            init_scheme: crate::config::InitScheme::Sae,
            ..ModelConfig::default()
        };
        let spec = ModelSpec::from_config(&cfg, d);
        let m = Sae::init(spec, &cfg, d, Normalizer::identity(), None, Device::Cpu).unwrap();
        let _ = m.b_dec.detach().uniform_(-0.5, 0.5);
        m
    }

    /// On its unit-norm dictionary the model's codes are `--encoder mp`'s;
    /// training gradients reach W_dec (= W_enc.T) and b_dec through the
    /// pursuit, never b_enc.
    #[test]
    fn codes_are_mp_and_gradients_flow_through_the_pursuit() {
        let _rng = crate::seeded();
        tch::manual_seed(4);
        let (d, h, k) = (12, 40, 5);
        let mut m = model(d, h, k);
        let x = Tensor::randn([30, d], (Kind::Float, Device::Cpu));
        let z = m.encode(&x);
        let threshold = crate::arch::DEFAULT_RESIDUAL_THRESHOLD;
        let mp = PursuitEncoder::new(
            &m,
            Pursuit::Mp {
                k,
                residual_threshold: threshold,
            },
        )
        .unwrap()
        .encode(&m, &x);
        let dev = (&z - &mp).abs().max().double_value(&[]);
        assert!(dev < 1e-5, "codes differ from --encoder mp by {dev}");
        let l0 = z.ne(0.0).sum_dim_intlist(1, false, Kind::Int64).max();
        assert!(l0.int64_value(&[]) <= k);
        m.set_requires_grad(true);
        let f = m.forward_train(&x);
        f.recon.mse_loss(&x, tch::Reduction::Mean).backward();
        assert!(m.w_enc.grad().defined() && m.b_dec.grad().defined());
        assert!(m.w_enc.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(!m.b_enc.grad().defined(), "b_enc is not used");
    }

    fn config_error(sets: &[&str]) -> String {
        let base =
            "data:\n  train: x.npy\nmodel:\n  activation: matching_pursuit\n  k: 4\n  tied: true\n\
                    sparsity:\n  penalty: none\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match Config::from_yaml_str(base, "c.yaml", &sets) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn config_validation() {
        assert_eq!(config_error(&[]), "");
        for (sets, needle) in [
            (
                &["model.tied=false"][..],
                "model.tied: activation matching_pursuit",
            ),
            (
                &["sparsity.penalty=l1"],
                "sparsity.penalty: activation matching_pursuit",
            ),
            (&["model.k=null"], "model.k: required"),
            (
                &["model.residual_threshold=-1"],
                "model.residual_threshold: -1",
            ),
            (&["model.hidden=[16, 8]"], "model.hidden: not available"),
            (
                &["model.apply_b_dec_to_input=false"],
                "model.apply_b_dec_to_input: activation matching_pursuit",
            ),
            (
                &["model.decoder_activation=sigmoid"],
                "model.decoder_activation: activation matching_pursuit",
            ),
            (
                &[
                    "model.activation=relu",
                    "model.k=null",
                    "model.residual_threshold=0.1",
                ],
                "model.residual_threshold: only used by activation matching_pursuit",
            ),
        ] {
            let e = config_error(sets);
            assert!(e.contains(needle), "{sets:?}: {e:?} lacks {needle:?}");
        }
    }
}
