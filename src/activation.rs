//! Hidden-layer activations. To add one: a variant here, its name in
//! `config::ActivationKind`, and a line in `apply`.

use crate::config::ActivationKind;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Sigmoid,
    Relu,
    /// Keep the k largest pre-activations per row (then ReLU), zero the rest.
    TopK {
        k: i64,
    },
}

impl Activation {
    pub fn from_config(kind: ActivationKind, k: Option<i64>) -> Activation {
        match kind {
            ActivationKind::Sigmoid => Activation::Sigmoid,
            ActivationKind::Relu => Activation::Relu,
            ActivationKind::Topk => Activation::TopK {
                k: k.expect("validated: topk has k"),
            },
        }
    }

    pub fn kind(&self) -> ActivationKind {
        match self {
            Activation::Sigmoid => ActivationKind::Sigmoid,
            Activation::Relu => ActivationKind::Relu,
            Activation::TopK { .. } => ActivationKind::Topk,
        }
    }

    pub fn k(&self) -> Option<i64> {
        match self {
            Activation::TopK { k } => Some(*k),
            _ => None,
        }
    }

    /// Maps pre-activations `[batch, d_hidden]` to codes of the same shape.
    pub fn apply(&self, pre: &Tensor) -> Tensor {
        match self {
            Activation::Sigmoid => pre.sigmoid(),
            Activation::Relu => pre.relu(),
            Activation::TopK { k } => {
                // SAELens order: top-k of the raw pre-activations, then ReLU on
                // the kept values, so a row may have fewer than k positive codes.
                let (values, indices) = pre.topk(*k, -1, true, false);
                pre.zeros_like().scatter(-1, &indices, &values.relu())
            }
        }
    }

    /// The value above which a unit counts as active, for L0 and firing
    /// statistics: 0 for ReLU-like codes; 0.5 for sigmoid, which is never 0.
    pub fn active_threshold(&self) -> f64 {
        match self {
            Activation::Sigmoid => 0.5,
            _ => 0.0,
        }
    }
}
