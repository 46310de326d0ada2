//! Adam / AdamW in plain tensor ops, with the same arithmetic as
//! `torch.optim.Adam(foreach=False)`. Our own (not tch's) so its moments and
//! step count are ours to save in a checkpoint and restore.

use crate::config::{OptimizerConfig, OptimizerName};
use tch::Tensor;

#[derive(Debug)]
pub struct Adam {
    pub cfg: OptimizerConfig,
    pub step: i64,
    /// First and second moments, one per parameter, same order as given.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl Adam {
    pub fn new(cfg: &OptimizerConfig, params: &[&Tensor]) -> Adam {
        Adam {
            cfg: cfg.clone(),
            step: 0,
            exp_avg: params.iter().map(|p| p.zeros_like()).collect(),
            exp_avg_sq: params.iter().map(|p| p.zeros_like()).collect(),
        }
    }

    /// One update from the `.grad()` of each parameter. Parameters without a
    /// gradient are skipped, as torch does.
    pub fn step(&mut self, params: &mut [&mut Tensor]) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let [beta1, beta2] = self.cfg.betas;
        let lr = self.cfg.lr;
        let wd = self.cfg.weight_decay;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for (i, p) in params.iter_mut().enumerate() {
            let mut grad = p.grad();
            if !grad.defined() {
                continue;
            }
            if wd != 0.0 {
                match self.cfg.name {
                    // L2 penalty folded into the gradient.
                    OptimizerName::Adam => grad = &grad + &**p * wd,
                    // Decoupled decay, applied to the weight before the update.
                    OptimizerName::Adamw => {
                        let _ = p.g_mul_scalar_(1.0 - lr * wd);
                    }
                }
            }
            let m = &mut self.exp_avg[i];
            let v = &mut self.exp_avg_sq[i];
            let _ = m.lerp_(&grad, 1.0 - beta1);
            let _ = v.g_mul_scalar_(beta2);
            let _ = v.addcmul_(&grad, &(&grad * (1.0 - beta2)));
            let denom = v.sqrt() / bias_correction2_sqrt + self.cfg.eps;
            // torch: param.addcdiv_(exp_avg, denom, value=-step_size), whose
            // kernel computes param + (value * exp_avg) / denom: scale first,
            // then divide, or the result is off by an ulp in ~2% of elements.
            let _ = p.g_add_(&(&*m * (-step_size) / denom));
        }
    }

    /// Clears the gradients of `params` before the next backward pass.
    pub fn zero_grad(params: &mut [&mut Tensor]) {
        for p in params.iter_mut() {
            p.zero_grad();
        }
    }
}
