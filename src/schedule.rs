//! Learning-rate and sparsity-weight schedules, as pure functions of the step
//! (1-based: step 1 is the first optimizer update) and the run's length.
//!
//! Learning rate (`train.lr_*`), for `T` total steps, `W` warm-up steps and
//! `D` decay steps, `M = T - W - D` main steps:
//! - warm-up, `s <= W`: `lr * s / W` (torch `LinearLR(start_factor=1/W)`, as
//!   SAELens uses it);
//! - main, `j = s - W - 1` in `0..M`: `constant` → `lr`; `cosine` →
//!   `lr_end + (lr - lr_end) (1 + cos(pi j / M)) / 2`; `linear` →
//!   `lr + (lr_end - lr) j / M`;
//! - decay, the last `D` steps, `i = s - (T - D) - 1` in `0..D`: falls
//!   linearly to 0 from `L` (= `lr` for `constant`, `lr_end` otherwise):
//!   `L (1 - i / D)` (SAELens `lr_decay_steps`).
//!
//! Sparsity weight (`sparsity.warmup_steps = W`): `weight * min((s - 1) / W, 1)`,
//! i.e. 0 at the first step and the full weight from step `W + 1` on (SAELens
//! `CoefficientScheduler`).

use crate::config::{LrSchedule, TrainConfig};
use std::f64::consts::PI;

/// The learning rate of step `step` (1-based) in a run of `total` steps.
pub fn lr_at(t: &TrainConfig, step: i64, total: i64) -> f64 {
    lr_warming(t, t.lr_warmup_steps, step, total)
}

/// The learning rate of Muon's 2-D weights (`train.optimizer.name: muon`):
/// the same schedule without the warm-up, as sparsify schedules its Muon
/// (the Adam part warms up).
pub fn matrix_lr_at(t: &TrainConfig, step: i64, total: i64) -> f64 {
    lr_warming(t, 0, step, total)
}

/// [`lr_at`] with `warm` warm-up steps.
fn lr_warming(t: &TrainConfig, warm: i64, step: i64, total: i64) -> f64 {
    let lr = t.optimizer.lr;
    let decay = t.lr_decay_steps.min((total - warm).max(0));
    if warm > 0 && step <= warm {
        return lr * step as f64 / warm as f64;
    }
    let main = (total - warm - decay).max(1);
    let decay_from = total - decay;
    if decay > 0 && step > decay_from {
        let start = match t.lr_schedule {
            LrSchedule::Constant => lr,
            _ => t.lr_end,
        };
        let i = (step - decay_from - 1) as f64;
        return start * (1.0 - i / decay as f64);
    }
    let j = ((step - warm - 1).max(0) as f64).min(main as f64);
    let frac = j / main as f64;
    match t.lr_schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => t.lr_end + (lr - t.lr_end) * (1.0 + (PI * frac).cos()) / 2.0,
        LrSchedule::Linear => lr + (t.lr_end - lr) * frac,
    }
}

/// Top-k's k at step `step` (1-based) under `train.k_decay_steps`
/// (sparsify's `get_current_k`): from `min(d_hidden, 10 d_in)` down to
/// `model.k` linearly over the first `k_decay_steps` steps, rounded half to
/// even as Python's `round`; `None` when there is no decay.
pub fn k_at(cfg: &crate::config::Config, step: i64) -> Option<i64> {
    let steps = cfg.train.k_decay_steps;
    let k = cfg.model.k?;
    if steps == 0 {
        return None;
    }
    let crate::config::Auto::Value(d_in) = cfg.model.d_in else {
        unreachable!("the plan resolves model.d_in before training");
    };
    let done = step - 1;
    if done >= steps {
        return Some(k);
    }
    let initial = cfg.model.d_hidden.min(d_in * 10) as f64;
    let progress = done as f64 / steps as f64;
    Some((initial * (1.0 - progress) + k as f64 * progress).round_ties_even() as i64)
}

/// The sparsity weight of step `step` (1-based).
pub fn sparsity_weight_at(weight: f64, warmup_steps: i64, step: i64) -> f64 {
    if warmup_steps <= 0 {
        return weight;
    }
    let f = ((step - 1) as f64 / warmup_steps as f64).min(1.0);
    weight * f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: LrSchedule, warm: i64, decay: i64, lr_end: f64) -> TrainConfig {
        let mut t = TrainConfig::default();
        t.optimizer.lr = 1.0;
        t.lr_schedule = schedule;
        t.lr_warmup_steps = warm;
        t.lr_decay_steps = decay;
        t.lr_end = lr_end;
        t
    }

    #[test]
    fn warmup_then_constant() {
        let t = cfg(LrSchedule::Constant, 4, 0, 0.0);
        let lrs: Vec<f64> = (1..=6).map(|s| lr_at(&t, s, 10)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn cosine_and_linear_reach_lr_end() {
        let t = cfg(LrSchedule::Cosine, 0, 0, 0.1);
        assert_eq!(lr_at(&t, 1, 11), 1.0);
        assert!((lr_at(&t, 6, 10) - 0.55).abs() < 1e-12);
        let t = cfg(LrSchedule::Linear, 2, 0, 0.0);
        // main phase: 8 steps from 1.0 down by 1/8 each.
        assert_eq!(lr_at(&t, 3, 10), 1.0);
        assert_eq!(lr_at(&t, 7, 10), 0.5);
    }

    #[test]
    fn decay_to_zero() {
        let t = cfg(LrSchedule::Constant, 0, 4, 0.0);
        let lrs: Vec<f64> = (5..=8).map(|s| lr_at(&t, s, 8)).collect();
        assert_eq!(lrs, vec![1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn sparsity_warmup() {
        assert_eq!(sparsity_weight_at(2.0, 0, 1), 2.0);
        let w: Vec<f64> = (1..=6).map(|s| sparsity_weight_at(2.0, 4, s)).collect();
        assert_eq!(w, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.0]);
    }
}
