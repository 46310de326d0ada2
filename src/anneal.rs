//! p-annealing (`sparsity.penalty: lp_anneal`), as dictionary_learning's
//! `PAnnealTrainer` (trainers/p_anneal.py) does it.
//!
//! The penalty is an Lp norm of the codes (not weighted by the decoder
//! norms): `mean_batch((sum_j z_j^p)^(1/p))`, or `mean_batch(sum_j z_j^p)`
//! for `lp_form: lp^p`. p starts at `p_start`. Its values are
//! `linspace(p_start, p_end, p_updates)` (float32, as torch makes them) and
//! the steps that set them `linspace(anneal_start, anneal_end, p_updates)`
//! (integers; duplicates collapse, the k-th distinct step then takes the
//! k-th value). The first of them sets p to `p_start` again; each later one
//! first rescales the weight by `mean(Lp_p) / mean(Lp_next)` over the queue
//! of the last `anneal_queue_length` steps' norms at the current p and at the
//! next one, so that the weighted penalty keeps its size when p moves. Once
//! the last value is set, the next p is `p_end` (which no later step uses).
//!
//! Steps are 1-based: a change at step s (dictionary_learning's step s - 1)
//! is made after that step's loss, and applies from step s + 1. The
//! weight's warm-up (`sparsity.warmup_steps`) scales the adapted weight.

use crate::config::{Auto, LpForm, SparsityConfig};
use crate::penalty::Penalty;
use std::collections::VecDeque;
use tch::{Device, Kind, Tensor};

/// What changes as training goes (it is checkpointed).
#[derive(Debug, Clone, PartialEq)]
pub struct AnnealState {
    /// The penalty's p now.
    pub p: f64,
    /// The p the queue measures too (none before the first change).
    pub next_p: Option<f64>,
    /// Changes made (dictionary_learning `p_step_count`).
    pub done: usize,
    /// The sparsity weight before its warm-up factor.
    pub weight: f64,
    /// Recent `[Lp at p, Lp at next_p]` (float32, as `.item()` reads them).
    pub queue: VecDeque<[f32; 2]>,
}

pub struct PAnneal {
    /// The 1-based steps whose end changes p, increasing.
    steps: Vec<i64>,
    /// p's values, one per change in order.
    p_values: Vec<f64>,
    p_end: f64,
    queue_length: usize,
    form: LpForm,
    pub state: AnnealState,
}

impl PAnneal {
    /// The schedule of `s` (validated) for a run of `total_steps` steps.
    pub fn new(s: &SparsityConfig, total_steps: i64) -> PAnneal {
        // `auto`: one past the run, as dictionary_learning's `anneal_end = steps`
        // (0-based), so the last value is never set.
        let end = match s.anneal_end {
            Auto::Auto => total_steps + 1,
            Auto::Value(e) => e,
        };
        let cpu = (Kind::Int64, Device::Cpu);
        // Torch's own integer linspace (its rounding), on
        // dictionary_learning's 0-based steps.
        let points = Tensor::linspace(s.anneal_start - 1, end - 1, s.p_updates, cpu);
        let mut steps: Vec<i64> = Vec::<i64>::try_from(&points)
            .expect("int64 linspace")
            .into_iter()
            .map(|t| t + 1)
            .collect();
        steps.dedup();
        let values = Tensor::linspace(s.p_start, s.p_end, s.p_updates, (Kind::Float, Device::Cpu));
        let p_values = Vec::<f32>::try_from(&values)
            .expect("float linspace")
            .into_iter()
            .map(f64::from)
            .collect();
        PAnneal {
            steps,
            p_values,
            p_end: s.p_end,
            queue_length: s.anneal_queue_length as usize,
            form: s.lp_form,
            state: AnnealState {
                p: s.p_start,
                next_p: None,
                done: 0,
                weight: s.weight,
                queue: VecDeque::new(),
            },
        }
    }

    /// The penalty at the current p.
    pub fn penalty(&self) -> Penalty {
        Penalty::Lp {
            p: self.state.p,
            root: self.form == LpForm::Lp,
        }
    }

    /// The p whose norm step `step` must queue, if any. dictionary_learning
    /// queues every step once a next p exists; only the last
    /// `anneal_queue_length` before a change are ever read, so only those
    /// are measured (each costs a read back from the device).
    pub fn queued_p(&self, step: i64) -> Option<f64> {
        let s = &self.state;
        let next_change = *self.steps.get(s.done)?;
        let p = s.next_p?;
        (step > next_change - self.queue_length as i64).then_some(p)
    }

    /// The end of step `step`: queue its norms (`Some` exactly when
    /// [`PAnneal::queued_p`] asked for them), then change p if it is due.
    pub fn after_step(&mut self, step: i64, norms: Option<[f32; 2]>) {
        let s = &mut self.state;
        if let Some(n) = norms {
            s.queue.push_back(n);
            while s.queue.len() > self.queue_length {
                s.queue.pop_front();
            }
        }
        if self.steps.get(s.done) != Some(&step) {
            return;
        }
        if s.next_p.is_some() {
            // As p_anneal.py: float32 means, their float32 ratio.
            let mean = |i: usize| {
                let v: Vec<f32> = s.queue.iter().map(|n| n[i]).collect();
                Tensor::from_slice(&v).mean(None::<Kind>)
            };
            let ratio = (mean(0) / mean(1)).double_value(&[]);
            s.weight *= ratio;
        }
        s.p = self.p_values[s.done];
        s.next_p = Some(match self.p_values.get(s.done + 1) {
            Some(&p) => p,
            None => self.p_end,
        });
        s.done += 1;
    }

    /// The state as checkpoint tensors: `[p, next_p (NaN: none), done,
    /// weight]` (float64) and the queue (float32 `[n, 2]`).
    pub fn to_tensors(&self) -> (Tensor, Tensor) {
        let s = &self.state;
        let head = [s.p, s.next_p.unwrap_or(f64::NAN), s.done as f64, s.weight];
        let flat: Vec<f32> = s.queue.iter().flat_map(|n| n.iter().copied()).collect();
        let queue = Tensor::from_slice(&flat).reshape([s.queue.len() as i64, 2]);
        (Tensor::from_slice(&head), queue)
    }

    /// Restores the state from [`PAnneal::to_tensors`]'s; `Err` says what
    /// does not fit this schedule.
    pub fn load_tensors(&mut self, head: &Tensor, queue: &Tensor) -> Result<(), String> {
        let head = Vec::<f64>::try_from(head).map_err(|e| e.to_string())?;
        let [p, next_p, done, weight] = head[..] else {
            return Err(format!("anneal.state has {} values, not 4", head.len()));
        };
        let flat = Vec::<f32>::try_from(&queue.flatten(0, -1)).map_err(|e| e.to_string())?;
        let done = done as usize;
        if done > self.steps.len() || flat.len() / 2 > self.queue_length {
            return Err("the p-annealing state does not fit this config's schedule".into());
        }
        self.state = AnnealState {
            p,
            next_p: (!next_p.is_nan()).then_some(next_p),
            done,
            weight,
            queue: flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect(),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SparsityConfig {
        SparsityConfig {
            p_start: 1.0,
            p_end: 0.5,
            anneal_start: 3,
            anneal_end: Auto::Value(11),
            p_updates: 5,
            anneal_queue_length: 2,
            weight: 0.1,
            ..SparsityConfig::default()
        }
    }

    /// The changes come at linspace(3, 11, 5) = 3, 5, 7, 9, 11, the first
    /// keeping the weight, each later one rescaling it by the queued means.
    #[test]
    fn p_steps_and_the_weight_keeps_the_penalty_size() {
        let mut a = PAnneal::new(&config(), 20);
        assert_eq!(a.steps, vec![3, 5, 7, 9, 11]);
        let mut ps = vec![];
        let mut weights = vec![];
        for step in 1..=12 {
            let norms = a.queued_p(step).map(|q| [2.0f32, 2.0 + q as f32]);
            a.after_step(step, norms);
            ps.push(a.state.p);
            weights.push(a.state.weight);
        }
        assert_eq!(ps[..3], [1.0, 1.0, 1.0]);
        assert_eq!(ps[4], 0.875);
        assert_eq!(ps[11], 0.5);
        assert_eq!(a.state.next_p, Some(0.5));
        assert_eq!(weights[2], 0.1);
        // At step 5 the queue holds steps 4 and 5: [2, 2.875] twice.
        let w5 = 0.1 * f64::from(2.0f32 / 2.875f32);
        assert_eq!(weights[4], w5);
        assert!(weights[10] < weights[8] && weights[8] < weights[4]);
        assert_eq!(weights[11], weights[10]);
    }

    /// Only the steps a change reads are measured.
    #[test]
    fn only_the_last_queue_length_steps_are_measured() {
        let mut a = PAnneal::new(&config(), 20);
        let asked: Vec<i64> = (1..=12)
            .filter(|&s| {
                let q = a.queued_p(s);
                a.after_step(s, q.map(|_| [1.0, 1.0]));
                q.is_some()
            })
            .collect();
        assert_eq!(asked, vec![4, 5, 6, 7, 8, 9, 10, 11]);
    }

    /// Duplicate change steps collapse: 3 values over 2 steps, the last
    /// value never set (as in dictionary_learning).
    #[test]
    fn duplicate_steps_collapse() {
        let s = SparsityConfig {
            anneal_start: 3,
            anneal_end: Auto::Value(4),
            p_updates: 3,
            ..config()
        };
        let mut a = PAnneal::new(&s, 20);
        assert_eq!(a.steps, vec![3, 4]);
        for step in 1..=10 {
            let q = a.queued_p(step).map(|_| [1.0, 1.0]);
            a.after_step(step, q);
        }
        assert_eq!(a.state.p, 0.75);
        assert_eq!(a.state.next_p, Some(0.5));
    }

    #[test]
    fn state_round_trips_through_tensors() {
        let mut a = PAnneal::new(&config(), 20);
        for step in 1..=6 {
            let q = a.queued_p(step).map(|q| [1.5f32, q as f32]);
            a.after_step(step, q);
        }
        let (head, queue) = a.to_tensors();
        let mut b = PAnneal::new(&config(), 20);
        b.load_tensors(&head, &queue).unwrap();
        assert_eq!(a.state, b.state);
        assert!(!a.state.queue.is_empty());
    }
}
