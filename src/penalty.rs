//! Sparsity penalties, unweighted: total loss = mse + sparsity.weight * penalty.
//! To add one: a variant here, its name in `config::PenaltyKind`, a line in
//! `from_config` and one in `value`.

use crate::arch::step_with_ste;
use crate::config::{Auto, ModelConfig, PenaltyKind, SparsityConfig};
use crate::model::row_norms;
use crate::sparse_codes::LeafCodes;
use tch::{Kind, Tensor};

/// Keeps the KL finite when a unit's mean activation saturates at 0 or 1.
pub const KL_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Penalty {
    /// `sum_j KL(rho || rho_hat_j)`, `rho_hat_j` the batch mean of unit j.
    Kl {
        target: f64,
    },
    /// `mean_over_batch(sum_j |z_j| * ||W_dec[j]||)`, or without the norm factor.
    L1 {
        decoder_norm: bool,
    },
    /// `sum_j |rho_hat_j - rho|` (seed 002's "sparsity penalty").
    MeanAbs {
        target: f64,
    },
    /// `mean_over_batch(sum_j H(pre_j - threshold_j))`: the number of active
    /// latents, with SAELens's straight-through pseudo-gradient (rectangle
    /// kernel of width `bandwidth`) to the jumprelu thresholds.
    L0 {
        bandwidth: f64,
        ste_to_input: bool,
    },
    /// Gemma Scope 2's (SAELens jumprelu `quadratic` mode):
    /// `mean_over_batch(2 / target * (L0 - target)^2)`, `L0` as for [`Penalty::L0`].
    QuadraticL0 {
        bandwidth: f64,
        ste_to_input: bool,
        target: f64,
    },
    /// Anthropic's sparsity loss (SAELens jumprelu `tanh` mode):
    /// `mean_over_batch(sum_j tanh(scale * z_j * ||W_dec[j]||))`.
    Tanh {
        scale: f64,
    },
    /// Top-k auxiliary loss (OpenAI, SAELens): the `k_aux` largest
    /// pre-activations among dead latents reconstruct the detached residual
    /// `target - recon` through `W_dec` (no bias); the mean over elements of
    /// the squared error, times `min(n_dead / k_aux, 1)`. 0 with no dead latent.
    AuxK {
        k_aux: i64,
    },
    /// dictionary_learning's Lp penalty (p_anneal.py `lp_norm`), on
    /// non-negative codes: `mean_over_batch((sum_j z_j^p)^(1/p))`, or without
    /// the root (`Lp^p`). lp_anneal moves p as training goes (`crate::anneal`).
    Lp {
        p: f64,
        root: bool,
    },
    None,
}

/// What a penalty may look at for one training batch.
pub struct PenaltyInput<'a> {
    /// Codes `[batch, d_hidden]` (training mode).
    pub z: &'a Tensor,
    /// Pre-activations `[batch, d_hidden]`.
    pub pre: &'a Tensor,
    /// What the model reconstructs `[batch, d_out]`, and its reconstruction.
    pub target: &'a Tensor,
    pub recon: &'a Tensor,
    /// `W_dec [d_hidden, d_out]`.
    pub w_dec: &'a Tensor,
    /// jumprelu thresholds `[d_hidden]`.
    pub threshold: Option<&'a Tensor>,
    /// Latents that have not fired for `train.dead_window` steps (bool `[d_hidden]`).
    pub dead: Option<&'a Tensor>,
    /// `z = relu(pre)`: then `|z| = z`, and no gradient reaches `pre`
    /// through z's zeros, so l1 may skip the `abs` (see `Penalty::value`).
    pub relu_codes: bool,
    /// The leaf of a ReLU-like pass; when sparse, the penalty is taken over
    /// its support (`z` and `pre` then carry no gradient).
    pub leaf: Option<&'a LeafCodes>,
    /// The decoder rows' norms when the model rescales codes by them
    /// (`model.rescale_acts_by_decoder_norm`).
    pub decoder_norms: Option<&'a Tensor>,
    /// Codes may be negative (abstopk): AuxK ranks dead latents by
    /// magnitude and keeps their signed pre-activations.
    pub signed_codes: bool,
}

impl<'a> PenaltyInput<'a> {
    /// Just codes and the decoder weight: enough for kl, l1, mean_abs and none.
    pub fn codes(z: &'a Tensor, w_dec: &'a Tensor) -> PenaltyInput<'a> {
        PenaltyInput {
            z,
            pre: z,
            target: z,
            recon: z,
            w_dec,
            threshold: None,
            dead: None,
            relu_codes: false,
            leaf: None,
            decoder_norms: None,
            signed_codes: false,
        }
    }
}

impl Penalty {
    /// `d_out` is the reconstruction's width (auxk's default `k_aux` is half of it).
    pub fn from_config(s: &SparsityConfig, m: &ModelConfig, d_out: i64) -> Penalty {
        match s.penalty {
            PenaltyKind::Kl => Penalty::Kl { target: s.target },
            PenaltyKind::L1 => Penalty::L1 {
                decoder_norm: s.l1_decoder_norm,
            },
            PenaltyKind::MeanAbs => Penalty::MeanAbs { target: s.target },
            PenaltyKind::L0 => Penalty::L0 {
                bandwidth: m.jumprelu_bandwidth,
                ste_to_input: m.jumprelu_ste_to_input,
            },
            PenaltyKind::QuadraticL0 => Penalty::QuadraticL0 {
                bandwidth: m.jumprelu_bandwidth,
                ste_to_input: m.jumprelu_ste_to_input,
                target: s.target_l0.expect("validated: quadratic_l0 has target_l0"),
            },
            PenaltyKind::Tanh => Penalty::Tanh {
                scale: s.tanh_scale,
            },
            PenaltyKind::Auxk => Penalty::AuxK {
                k_aux: match s.auxk_k {
                    Auto::Auto => (d_out / 2).max(1),
                    Auto::Value(k) => k,
                },
            },
            PenaltyKind::LpAnneal => Penalty::Lp {
                p: s.p_start,
                root: s.lp_form == crate::config::LpForm::Lp,
            },
            PenaltyKind::None => Penalty::None,
        }
    }

    /// Whether this penalty can be taken over a sparse pass's support
    /// (its value is 0, and so is its gradient, outside it).
    pub fn supports_sparse_codes(&self) -> bool {
        matches!(
            self,
            Penalty::L1 { .. } | Penalty::L0 { .. } | Penalty::None
        )
    }

    /// Whether this is the top-k auxiliary loss.
    pub fn is_auxk(&self) -> bool {
        matches!(self, Penalty::AuxK { .. })
    }

    /// Whether training must track which latents are dead for this penalty.
    pub fn needs_dead_mask(&self) -> bool {
        matches!(self, Penalty::AuxK { .. })
    }

    /// The penalty for one batch; a scalar tensor.
    pub fn value(&self, p: &PenaltyInput) -> Tensor {
        if let Some(leaf) = p.leaf.filter(|l| l.support.is_some()) {
            return self.value_sparse(p, leaf);
        }
        let z = p.z;
        match *self {
            Penalty::Kl { target } => {
                let rho_hat = z
                    .mean_dim(0, false, Kind::Float)
                    .clamp(KL_EPS, 1.0 - KL_EPS);
                kl_divergence(target, &rho_hat).sum(Kind::Float)
            }
            Penalty::L1 { decoder_norm } => {
                let norms = decoder_norm.then(|| row_norms(p.w_dec));
                let per_row = match (p.relu_codes, &norms) {
                    // ReLU codes: Σ_j z_j·‖d_j‖ as one matrix-vector product,
                    // not three [batch, d_hidden] passes (abs, scale, sum) and
                    // their backward. Same value up to summation order, same
                    // gradient (abs' zero slope at 0 is relu's too). Not
                    // under autocast (`train.precision: bf16`), which would
                    // run the `mv` in bfloat16: there, SAELens's float32 sum.
                    (true, Some(n)) if !crate::autocast::is_enabled(z.device()) => z.mv(n),
                    (true, Some(n)) => (z * n).sum_dim_intlist(-1, false, Kind::Float),
                    (true, None) => z.sum_dim_intlist(-1, false, Kind::Float),
                    (false, Some(n)) => (z.abs() * n).sum_dim_intlist(-1, false, Kind::Float),
                    (false, None) => z.abs().sum_dim_intlist(-1, false, Kind::Float),
                };
                per_row.mean(Kind::Float)
            }
            Penalty::MeanAbs { target } => (z.mean_dim(0, false, Kind::Float) - target)
                .abs()
                .sum(Kind::Float),
            Penalty::L0 {
                bandwidth,
                ste_to_input,
            } => {
                let t = p.threshold.expect("validated: l0 goes with jumprelu");
                step_with_ste(p.pre, t, bandwidth, ste_to_input)
                    .sum_dim_intlist(-1, false, Kind::Float)
                    .mean(Kind::Float)
            }
            Penalty::QuadraticL0 {
                bandwidth,
                ste_to_input,
                target,
            } => {
                let t = p
                    .threshold
                    .expect("validated: quadratic_l0 goes with jumprelu");
                let l0 = step_with_ste(p.pre, t, bandwidth, ste_to_input).sum_dim_intlist(
                    -1,
                    false,
                    Kind::Float,
                );
                ((l0 - target).square() * (2.0 / target)).mean(Kind::Float)
            }
            Penalty::Tanh { scale } => {
                let norms = row_norms(p.w_dec);
                ((z * scale) * norms)
                    .tanh()
                    .sum_dim_intlist(-1, false, Kind::Float)
                    .mean(Kind::Float)
            }
            Penalty::AuxK { k_aux } => auxk(p, k_aux),
            Penalty::Lp { p: power, root } => {
                let per_row = z
                    .pow_tensor_scalar(power)
                    .sum_dim_intlist(-1, false, Kind::Float);
                match root {
                    true => per_row.pow_tensor_scalar(1.0 / power).mean(Kind::Float),
                    false => per_row.mean(Kind::Float),
                }
            }
            Penalty::None => Tensor::zeros([], (Kind::Float, z.device())),
        }
    }
}

impl Penalty {
    /// [`Penalty::value`] over a sparse pass's support: the same sums
    /// without the zeros (so equal up to summation order).
    fn value_sparse(&self, p: &PenaltyInput, leaf: &LeafCodes) -> Tensor {
        let s = leaf.support.as_ref().expect("called on a sparse leaf");
        let total = match *self {
            Penalty::L1 { decoder_norm } => {
                let z = match p.relu_codes {
                    true => leaf.codes.shallow_clone(),
                    false => leaf.codes.abs(),
                };
                match decoder_norm {
                    true => {
                        let norms = row_norms(p.w_dec);
                        (z * norms.index_select(0, &s.cols)).sum(Kind::Float)
                    }
                    false => z.sum(Kind::Float),
                }
            }
            Penalty::L0 {
                bandwidth,
                ste_to_input,
            } => {
                let t = leaf
                    .threshold
                    .as_ref()
                    .expect("validated: l0 goes with jumprelu");
                step_with_ste(&leaf.pre, t, bandwidth, ste_to_input).sum(Kind::Float)
            }
            Penalty::None => return Tensor::zeros([], (Kind::Float, p.z.device())),
            _ => unreachable!("checked: supports_sparse_codes"),
        };
        total / leaf.batch as f64
    }
}

/// The auxiliary top-k loss. The number of dead latents stays on the
/// device (no read each step): the `min(k_aux, d_hidden)` largest dead
/// candidates are taken, the live ones among them (at -inf) counting as 0,
/// which keeps what `k = min(k_aux, n_dead)` would (every dead latent when
/// fewer than k_aux are) and scales by `min(n_dead / k_aux, 1)` as a
/// tensor (0 with none dead: the term is then 0, as an early return gave).
fn auxk(p: &PenaltyInput, k_aux: i64) -> Tensor {
    let zero = || Tensor::zeros([], (Kind::Float, p.z.device()));
    let Some(dead) = p.dead else {
        return zero();
    };
    let k = k_aux.min(dead.size()[0]);
    if k == 0 {
        return zero();
    }
    // float64 then float32: the scalar `n_dead as f64 / k_aux as f64` was
    // rounded so when it multiplied the float32 mean.
    let scale = (dead.sum(Kind::Int64).to_kind(Kind::Double) / k_aux as f64)
        .clamp_max(1.0)
        .to_kind(Kind::Float);
    let residual = (p.target - p.recon).detach();
    let ranked = match p.signed_codes {
        true => p.pre.abs(),
        false => p.pre.shallow_clone(),
    };
    let candidates = ranked.where_scalarother(&dead.unsqueeze(0), f64::NEG_INFINITY);
    let (values, indices) = candidates.topk(k, -1, true, false);
    let found = values.gt(f64::NEG_INFINITY);
    let values = match p.signed_codes {
        true => p.pre.gather(-1, &indices, false),
        false => values,
    };
    let values = values.where_scalarother(&found, 0.0);
    let acts = p.pre.zeros_like().scatter(-1, &indices, &values);
    // SAELens decodes them as the codes are (`act_times_W_dec`).
    let acts = match p.decoder_norms {
        Some(n) => acts * n.reciprocal(),
        None => acts,
    };
    let recons = acts.matmul(p.w_dec);
    (recons - residual).square().mean(Kind::Float) * scale
}

/// `KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))`, elementwise over `q`.
pub fn kl_divergence(p: f64, q: &Tensor) -> Tensor {
    // p / q written as (1/q) * p keeps q a tensor on the right of each op.
    let a = (q.reciprocal() * p).log() * p;
    let b = ((-q + 1.0).reciprocal() * (1.0 - p)).log() * (1.0 - p);
    a + b
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// With ReLU codes, l1's matrix-vector form has the value and the
    /// gradients (to pre-activations and decoder) of the `abs` form.
    #[test]
    fn l1_on_relu_codes_matches_the_abs_form() {
        let _rng = crate::seeded();
        tch::manual_seed(5);
        let pre0 = Tensor::randn([40, 24], (Kind::Float, Device::Cpu));
        let w0 = Tensor::randn([24, 9], (Kind::Float, Device::Cpu));
        for decoder_norm in [true, false] {
            let run = |relu_codes: bool| {
                let pre = pre0.copy().set_requires_grad(true);
                let w = w0.copy().set_requires_grad(true);
                let z = pre.relu();
                let mut input = PenaltyInput::codes(&z, &w);
                input.relu_codes = relu_codes;
                let v = Penalty::L1 { decoder_norm }.value(&input);
                v.backward();
                (v.double_value(&[]), pre.grad(), w.grad())
            };
            let (va, ga_pre, ga_w) = run(false);
            let (vb, gb_pre, gb_w) = run(true);
            assert!((va - vb).abs() <= 1e-6 * va.abs(), "{va} vs {vb}");
            assert!(ga_pre.allclose(&gb_pre, 1e-6, 1e-7, false));
            if decoder_norm {
                assert!(ga_w.allclose(&gb_w, 1e-5, 1e-7, false));
            }
        }
    }
}
