//! Sparsity penalties, unweighted: total loss = mse + sparsity.weight * penalty.
//! To add one: a variant here, its name in `config::PenaltyKind`, a line in `value`.

use crate::config::{PenaltyKind, SparsityConfig};
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
    None,
}

impl Penalty {
    pub fn from_config(s: &SparsityConfig) -> Penalty {
        match s.penalty {
            PenaltyKind::Kl => Penalty::Kl { target: s.target },
            PenaltyKind::L1 => Penalty::L1 {
                decoder_norm: s.l1_decoder_norm,
            },
            PenaltyKind::MeanAbs => Penalty::MeanAbs { target: s.target },
            PenaltyKind::None => Penalty::None,
        }
    }

    /// The penalty for codes `z [batch, d_hidden]` of a model whose decoder
    /// weight is `w_dec [d_hidden, d_in]`; a scalar tensor.
    pub fn value(&self, z: &Tensor, w_dec: &Tensor) -> Tensor {
        match *self {
            Penalty::Kl { target } => {
                let rho_hat = z
                    .mean_dim(0, false, Kind::Float)
                    .clamp(KL_EPS, 1.0 - KL_EPS);
                kl_divergence(target, &rho_hat).sum(Kind::Float)
            }
            Penalty::L1 { decoder_norm } => {
                let a = z.abs();
                let a = if decoder_norm {
                    a * w_dec.norm_scalaropt_dim(2, [1], false)
                } else {
                    a
                };
                a.sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float)
            }
            Penalty::MeanAbs { target } => (z.mean_dim(0, false, Kind::Float) - target)
                .abs()
                .sum(Kind::Float),
            Penalty::None => Tensor::zeros([], (Kind::Float, z.device())),
        }
    }
}

/// `KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))`, elementwise over `q`.
pub fn kl_divergence(p: f64, q: &Tensor) -> Tensor {
    // p / q written as (1/q) * p keeps q a tensor on the right of each op.
    let a = (q.reciprocal() * p).log() * p;
    let b = ((-q + 1.0).reciprocal() * (1.0 - p)).log() * (1.0 - p);
    a + b
}
