//! `train.optimizer.name: signum`, as sparsify trains it: sign descent
//! (sparsify's `SignSGD`, `p -= lr * sign(grad)`) wrapped in schedulefree's
//! `ScheduleFreeWrapper(momentum=0.95)` (weight_decay_at_y 0, r 0,
//! weight_lr_power 2), op for op.
//!
//! Schedule-free keeps three points per weight: `z`, which the sign steps
//! move; `x`, the running average of the `z`s, weighted by the largest
//! learning rate so far squared; and `y = x + (1 - momentum) (z - x)`, where
//! the gradient is taken. The model's parameters hold `y` while training
//! (schedulefree's train mode); the model is evaluated and saved at `x`
//! (its eval mode, which sparsify switches to before saving):
//! [`Signum::eval_weights`]. The checkpoint keeps `y`, `z` and the
//! average's two scalars, so a resumed run continues bit for bit. Unlike
//! sparsify, taking `x` for a checkpoint leaves `y` untouched (its
//! eval/train round trip rounds `y` in the last bit).

use crate::optim::add_scaled_;
use tch::Tensor;

#[derive(Debug)]
pub struct Signum {
    momentum: f64,
    /// `z`, one per parameter, same order.
    pub z: Vec<Tensor>,
    /// Steps done (schedulefree's `k`).
    pub steps: i64,
    /// The sum of the averaging weights so far (`weight_sum`).
    pub weight_sum: f64,
    /// The largest learning rate so far (`lr_max`).
    pub lr_max: f64,
}

impl Signum {
    pub fn new(momentum: f64, params: &[&Tensor]) -> Signum {
        Signum {
            momentum,
            z: params.iter().map(|p| p.detach().copy()).collect(),
            steps: 0,
            weight_sum: 0.0,
            lr_max: 0.0,
        }
    }

    /// One step at learning rate `lr`; parameters without a gradient are
    /// skipped, as schedulefree does.
    pub fn step(&mut self, params: &mut [&mut Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        if self.steps == 0 {
            // schedulefree's `state['z'] = clone(p)` at the first step: the
            // parameters may have moved since `new` (a restored checkpoint,
            // a clamped threshold).
            for (z, p) in self.z.iter_mut().zip(params.iter()) {
                z.copy_(p);
            }
        }
        let beta = self.momentum;
        // Python's `max(lr, lr_max)`, `lr_max ** 2` and the sum, in f64.
        if lr >= self.lr_max {
            self.lr_max = lr;
        }
        let weight = self.lr_max.powf(2.0);
        self.weight_sum += weight;
        let ckp1 = weight / self.weight_sum;
        for (p, z) in params.iter_mut().zip(self.z.iter_mut()) {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            // y -> x; schedulefree then swaps x into z's buffer so the
            // base optimizer updates z in the parameter: the same values.
            let _ = p.lerp_(z, 1.0 - 1.0 / beta);
            add_scaled_(z, &grad.sign(), -lr);
            // x moves towards the new z by its averaging weight, then y.
            let _ = p.lerp_(z, ckp1);
            let _ = p.lerp_(z, 1.0 - beta);
        }
        self.steps += 1;
    }

    /// The averaged weights `x` of `params` (which hold `y`), as
    /// schedulefree's `eval()` makes them; `None` before the first step,
    /// when `x` is the parameters.
    pub fn eval_weights(&self, params: &[&Tensor]) -> Option<Vec<Tensor>> {
        if self.steps == 0 {
            return None;
        }
        let _guard = tch::no_grad_guard();
        let w = 1.0 - 1.0 / self.momentum;
        Some(
            params
                .iter()
                .zip(&self.z)
                .map(|(p, z)| p.detach().lerp(z, w))
                .collect(),
        )
    }
}
