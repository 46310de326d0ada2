//! Gated SAE (Rajamanoharan et al. 2024; SAELens `gated`): a gate
//! `1[pi_gate > 0]`, `pi_gate = pre = x @ W_enc + b_enc` (`b_enc` is
//! SAELens's `b_gate`), times magnitudes `relu(x @ (W_enc * exp(r_mag)) +
//! b_mag)`. The magnitudes need the model's `r_mag`, `b_mag` and the input,
//! so `Sae` computes the codes (see [`gated`]); training puts the sparsity
//! penalty on the gate, `relu(pi_gate)`, and adds the auxiliary loss
//! `mean((decode(relu(pi_gate)) - x)^2)`.

use super::exports::ActivationCode;
use super::Architecture;
use super::Params;
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

pub struct Gated;

impl Architecture for Gated {
    fn apply(&self, _pre: &Tensor, _threshold: Option<&Tensor>) -> Tensor {
        panic!("gated codes need the magnitudes: use arch::gated")
    }

    fn gated(&self) -> bool {
        true
    }

    fn penalty_codes(&self, model: &dyn Params, input: &Tensor) -> Option<Tensor> {
        model.gate_codes(input)
    }

    /// The gate alone must reconstruct too (SAELens's auxiliary loss).
    fn aux_loss(&self, model: &dyn Params, gate_codes: &Tensor, target: &Tensor) -> Option<Tensor> {
        Some(
            (model.decode_normalized(gate_codes) - target)
                .square()
                .mean(Kind::Float),
        )
    }

    /// b_enc is SAELens's b_gate; r_mag and b_mag are saved as they are.
    fn saelens(&self) -> Result<(&'static str, Map<String, Value>), String> {
        Ok(("gated", Map::new()))
    }

    /// Gate 1[pre > 0] times relu(x @ (W_enc * exp(r_mag)) + b_mag), the
    /// magnitude written from `pre` (x @ W_enc = pre - b_enc; equal up to
    /// float rounding).
    fn torchscript(&self, model: &dyn Params) -> ActivationCode {
        let (r_mag, b_mag) = model.gate().expect("a gated model has r_mag, b_mag");
        ActivationCode {
            body: "    mag = (pre - self.b_enc) * torch.exp(self.r_mag) + self.b_mag\n    \
                   return (pre > 0).to(pre.dtype) * torch.relu(mag)\n"
                .into(),
            from_input: false,
            tensors: vec![
                ("r_mag".into(), r_mag.shallow_clone(), true),
                ("b_mag".into(), b_mag.shallow_clone(), true),
            ],
            attrs: vec![],
        }
    }
}

/// Gated codes: `1[pi_gate > 0] * relu(pi_mag)` (SAELens `GatedSAE.encode`).
pub fn gated(pi_gate: &Tensor, pi_mag: &Tensor) -> Tensor {
    pi_gate.gt(0.0).to_kind(pi_gate.kind()) * pi_mag.relu()
}
