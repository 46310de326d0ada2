//! The optimizer a run trains with (`train.optimizer.name`): Adam/AdamW
//! ([`crate::optim`]), signum ([`crate::signum`]) or Muon ([`crate::muon`]),
//! behind the few calls training and checkpoints make.

use crate::config::{OptimizerConfig, OptimizerName};
use crate::muon::Muon;
use crate::optim::Adam;
use crate::signum::Signum;
use tch::{TchError, Tensor};

#[derive(Debug)]
pub enum Optimizer {
    Adam(Adam),
    Signum(Signum),
    Muon(Muon),
}

impl Optimizer {
    /// A fresh optimizer for `params` (the model's, in `Sae::parameters`
    /// order). Fails (rather than panics) when its buffers cannot be
    /// allocated.
    pub fn new(cfg: &OptimizerConfig, params: &[&Tensor]) -> Result<Optimizer, TchError> {
        Ok(match cfg.name {
            OptimizerName::Adam | OptimizerName::Adamw => Optimizer::Adam(Adam::new(cfg, params)?),
            OptimizerName::Signum => Optimizer::Signum(Signum::new(cfg.momentum(), params)),
            OptimizerName::Muon => Optimizer::Muon(Muon::new(cfg, params)?),
        })
    }

    /// Adam, where resampling resets its moments (config validation keeps
    /// resampling to adam and adamw).
    pub fn adam_mut(&mut self) -> Option<&mut Adam> {
        match self {
            Optimizer::Adam(a) => Some(a),
            _ => None,
        }
    }

    /// Adam's flat gradient buffer, cleared and verified, for the bucketed
    /// allreduce during backward; None for signum and Muon, whose gradients
    /// are reduced one tensor at a time after backward.
    pub fn flat_grad_cleared(&self) -> Option<Tensor> {
        match self {
            Optimizer::Adam(a) => a.flat_grad_cleared(),
            _ => None,
        }
    }

    /// Clears the gradients before the next backward pass.
    pub fn zero_grad(&mut self, params: &mut [&mut Tensor]) {
        match self {
            Optimizer::Adam(a) => a.zero_grad(params),
            Optimizer::Muon(m) => {
                for &i in &m.matrices {
                    params[i].zero_grad();
                }
                let mut rest = m.rest_of(params);
                m.adam.zero_grad(&mut rest);
            }
            Optimizer::Signum(_) => {
                for p in params.iter_mut() {
                    p.zero_grad();
                }
            }
        }
    }

    /// One update from the parameters' gradients, at learning rate `lr`
    /// (`matrix_lr` for Muon's matrices).
    pub fn step(&mut self, params: &mut [&mut Tensor], lr: f64, matrix_lr: f64) {
        match self {
            Optimizer::Adam(a) => {
                a.cfg.lr = lr;
                a.step(params);
            }
            Optimizer::Signum(s) => s.step(params, lr),
            Optimizer::Muon(m) => m.step(params, lr, matrix_lr),
        }
    }

    /// The gradients as one flat buffer for a data-parallel sync (Adam's
    /// flat path), or `None`: sync them one by one.
    pub fn flat_grad(&mut self, params: &mut [&mut Tensor]) -> Option<Tensor> {
        match self {
            Optimizer::Adam(a) => a.flat_grad(params),
            _ => None,
        }
    }

    /// Gives every parameter its own storage again (after training).
    pub fn unflatten(&mut self, params: &mut [&mut Tensor]) {
        match self {
            Optimizer::Adam(a) => a.unflatten(params),
            Optimizer::Muon(m) => {
                let mut rest = m.rest_of(params);
                m.adam.unflatten(&mut rest);
            }
            Optimizer::Signum(_) => {}
        }
    }

    /// Optimizer steps done (the checkpoint's `adam_step`).
    pub fn steps(&self) -> i64 {
        match self {
            Optimizer::Adam(a) => a.step,
            Optimizer::Signum(s) => s.steps,
            Optimizer::Muon(m) => m.adam.step,
        }
    }

    pub fn set_steps(&mut self, steps: i64) {
        match self {
            Optimizer::Adam(a) => a.step = steps,
            Optimizer::Signum(s) => s.steps = steps,
            Optimizer::Muon(m) => m.adam.step = steps,
        }
    }

    /// The state of parameter `i`, named as the checkpoint stores it
    /// (Adam's `exp_avg.i`, `exp_avg_sq.i`; signum's `z.i`; Muon's
    /// `momentum.i`).
    pub fn state_of(&self, i: usize) -> Vec<(String, &Tensor)> {
        match self {
            Optimizer::Adam(a) => adam_state(a, i, i),
            Optimizer::Signum(s) => vec![(format!("z.{i}"), &s.z[i])],
            Optimizer::Muon(m) => match m.matrices.iter().position(|&j| j == i) {
                Some(j) => vec![(format!("momentum.{i}"), &m.momentum_buf[j])],
                None => {
                    let j = m
                        .rest
                        .iter()
                        .position(|&r| r == i)
                        .expect("every index is one");
                    adam_state(&m.adam, j, i)
                }
            },
        }
    }

    /// [`Optimizer::state_of`], to restore or broadcast in place.
    pub fn state_of_mut(&mut self, i: usize) -> Vec<(String, &mut Tensor)> {
        match self {
            Optimizer::Adam(a) => adam_state_mut(a, i, i),
            Optimizer::Signum(s) => vec![(format!("z.{i}"), &mut s.z[i])],
            Optimizer::Muon(m) => match m.matrices.iter().position(|&j| j == i) {
                Some(j) => vec![(format!("momentum.{i}"), &mut m.momentum_buf[j])],
                None => {
                    let j = m
                        .rest
                        .iter()
                        .position(|&r| r == i)
                        .expect("every index is one");
                    adam_state_mut(&mut m.adam, j, i)
                }
            },
        }
    }

    /// Every state tensor (for a broadcast from rank 0).
    pub fn state_tensors_mut(&mut self) -> Vec<&mut Tensor> {
        fn adam(a: &mut Adam) -> Vec<&mut Tensor> {
            a.exp_avg
                .iter_mut()
                .chain(a.exp_avg_sq.iter_mut())
                .collect()
        }
        match self {
            Optimizer::Adam(a) => adam(a),
            Optimizer::Signum(s) => s.z.iter_mut().collect(),
            Optimizer::Muon(m) => {
                let mut all: Vec<&mut Tensor> = m.momentum_buf.iter_mut().collect();
                all.extend(adam(&mut m.adam));
                all
            }
        }
    }

    /// Scalar state besides the step count, by checkpoint name (signum's
    /// averaging weights).
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        match self {
            Optimizer::Signum(s) => vec![
                ("signum.weight_sum", s.weight_sum),
                ("signum.lr_max", s.lr_max),
            ],
            _ => Vec::new(),
        }
    }

    /// Restores one of [`Optimizer::scalars`].
    pub fn set_scalar(&mut self, name: &str, value: f64) {
        match (self, name) {
            (Optimizer::Signum(s), "signum.weight_sum") => s.weight_sum = value,
            (Optimizer::Signum(s), "signum.lr_max") => s.lr_max = value,
            (_, other) => unreachable!("no optimizer scalar {other}"),
        }
    }

    /// The weights the model is evaluated and saved at, when they are not
    /// the parameters themselves (signum's averaged `x`).
    pub fn eval_weights(&self, params: &[&Tensor]) -> Option<Vec<Tensor>> {
        match self {
            Optimizer::Signum(s) => s.eval_weights(params),
            _ => None,
        }
    }
}

/// Adam's moments of its parameter `j`, named after the model's `i`.
fn adam_state(a: &Adam, j: usize, i: usize) -> Vec<(String, &Tensor)> {
    vec![
        (format!("exp_avg.{i}"), &a.exp_avg[j]),
        (format!("exp_avg_sq.{i}"), &a.exp_avg_sq[j]),
    ]
}

fn adam_state_mut(a: &mut Adam, j: usize, i: usize) -> Vec<(String, &mut Tensor)> {
    vec![
        (format!("exp_avg.{i}"), &mut a.exp_avg[j]),
        (format!("exp_avg_sq.{i}"), &mut a.exp_avg_sq[j]),
    ]
}
