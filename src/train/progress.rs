//! What the user sees while a run trains: a progress bar on a terminal, or
//! about twenty epoch lines on stderr otherwise (logs, CI); nothing with -q.

use super::run_dir::StepLog;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: ProgressBar,
    /// Epoch lines (stderr is not a terminal, progress wanted).
    lines: bool,
    line_every: i64,
    epochs: i64,
}

impl Progress {
    /// `place`: where the steps run (device, threads), said once first.
    pub fn new(wanted: bool, total_steps: i64, epochs: i64, place: &str) -> Progress {
        let tty = std::io::stderr().is_terminal();
        if wanted {
            let s = if total_steps == 1 { "" } else { "s" };
            eprintln!("training {total_steps} step{s} on {place}");
        }
        let bar = if wanted && tty {
            ProgressBar::with_draw_target(Some(total_steps as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static template"),
        );
        Progress {
            bar,
            lines: wanted && !tty,
            line_every: (epochs / 20).max(1),
            epochs,
        }
    }

    pub fn set_step(&self, step: i64) {
        self.bar.set_position(step as u64);
    }

    pub fn step_done(&self) {
        self.bar.inc(1);
    }

    /// A logged step (`end_of_epoch`: the last of its epoch).
    pub fn logged(&self, s: &StepLog, end_of_epoch: bool) {
        self.bar.set_message(format!(
            "epoch {}/{} loss {:.5} l0 {:.1}",
            s.epoch, self.epochs, s.loss, s.l0
        ));
        if end_of_epoch && self.lines && (s.epoch % self.line_every == 0 || s.epoch == self.epochs)
        {
            let v = s
                .valid_mse
                .map(|v| format!(" valid_mse {v:.5}"))
                .unwrap_or_default();
            eprintln!(
                "epoch {}/{}: loss {:.5} mse {:.5} l0 {:.2}{v}",
                s.epoch, self.epochs, s.loss, s.mse, s.l0
            );
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
