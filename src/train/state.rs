//! Where the loop stands: steps and samples done, the last logged loss, the
//! newest checkpoint on disk, and which latents are dead. One owner, and the
//! checkpoint's [`Position`] is built here alone.

use super::batches::Batch;
use crate::arch::Activation;
pub use crate::checkpoint::Position;
use tch::{Device, Kind, Tensor};

pub struct State {
    /// Steps done.
    pub step: i64,
    /// Training rows seen.
    pub samples: i64,
    /// Loss of the last logged step (NaN before the first).
    pub last_loss: f64,
    /// The step of the newest checkpoint on disk (-1: none yet).
    pub saved_step: i64,
    pub dead: DeadTracker,
    /// Where the next step starts: (epoch, batch within it).
    next: (i64, i64),
}

impl State {
    /// The state at `pos`: a fresh run's start, or a checkpoint's
    /// (`resumed`: that checkpoint is on disk).
    pub fn at(pos: &Position, resumed: bool, dead: DeadTracker) -> State {
        State {
            step: pos.step,
            samples: pos.samples,
            last_loss: pos.last_loss.unwrap_or(f64::NAN),
            saved_step: if resumed { pos.step } else { -1 },
            dead,
            next: (pos.epoch, pos.batch),
        }
    }

    /// Counts the step about to train on `batch`.
    pub fn advance(&mut self, batch: &Batch) {
        self.step += 1;
        self.samples += batch.rows as i64;
        self.next = match batch.end_of_epoch {
            true => (batch.epoch + 1, 0),
            false => (batch.epoch, batch.index + 1),
        };
    }

    /// What a checkpoint written now records.
    pub fn position(&self, adam_step: i64) -> Position {
        Position {
            step: self.step,
            epoch: self.next.0,
            batch: self.next.1,
            samples: self.samples,
            adam_step,
            last_loss: self.last_loss.is_finite().then_some(self.last_loss),
        }
    }

    /// Whether steps were done since the newest checkpoint.
    pub fn unsaved(&self) -> bool {
        self.saved_step != self.step
    }
}

/// The start of a fresh run.
pub fn start() -> Position {
    Position {
        step: 0,
        epoch: 1,
        batch: 0,
        samples: 0,
        adam_step: 0,
        last_loss: None,
    }
}

/// Steps since each latent last fired (on a training batch). The counters
/// stay on the device; the host keeps only a bound on their largest value,
/// so that a step knows without reading them back when no latent can be
/// dead yet (the first `window` steps of a run).
pub struct DeadTracker {
    pub since_fired: Tensor,
    window: i64,
    /// No counter is above this (counted on the host).
    bound: i64,
    /// A latent fires where its code (its |code| when `signed`) is above this.
    active_threshold: f64,
    /// Codes may be negative (abstopk): activity is judged on magnitudes.
    signed: bool,
}

impl DeadTracker {
    pub fn new(d_hidden: i64, window: i64, activation: Activation, device: Device) -> DeadTracker {
        DeadTracker {
            since_fired: Tensor::zeros([d_hidden], (Kind::Int64, device)),
            window,
            bound: 0,
            active_threshold: activation.active_threshold(),
            signed: activation.arch().signed_codes(),
        }
    }

    /// Latents that have not fired for more than `window` steps (SAELens's rule).
    pub fn dead(&self) -> Tensor {
        self.since_fired.gt(self.window)
    }

    /// Whether a latent can be dead: false while no counter can have
    /// passed the window (known on the host, no read).
    pub fn maybe_dead(&self) -> bool {
        self.bound > self.window
    }

    /// After `since_fired` was set from outside (a checkpoint, rank 0's
    /// counters): the bound from its values (one read, at the run's start).
    pub fn counters_loaded(&mut self) {
        self.bound = match self.since_fired.numel() {
            0 => 0,
            _ => self.since_fired.max().int64_value(&[]),
        };
    }

    /// Counts a step whose training codes are `z` (this rank's rows; with
    /// several ranks, a latent fired if it fired on any rank).
    pub fn update(&mut self, z: &Tensor) {
        let _guard = tch::no_grad_guard();
        // max > t, not (z > t).any(0): no [batch, d_hidden] temporary
        // (signed codes: max |z| = max(max z, -min z), exactly).
        let mut top = match (z.size()[0], self.signed) {
            (0, _) => z.new_full([z.size()[1]], f64::NEG_INFINITY, (z.kind(), z.device())),
            (_, false) => z.amax(0, false),
            (_, true) => z.amax(0, false).maximum(&z.amin(0, false).neg()),
        };
        if let Some(g) = crate::dist::group() {
            g.allreduce(&mut top, crate::dist::Op::Max);
        }
        let fired = top.gt(self.active_threshold);
        let _ = self.since_fired.g_add_scalar_(1);
        let _ = self.since_fired.masked_fill_(&fired, 0);
        self.bound += 1;
    }

    /// Counts the latents in `which` as just fired (they were resampled).
    pub fn revive(&mut self, which: &Tensor) {
        let _ = self.since_fired.masked_fill_(which, 0);
    }
}
