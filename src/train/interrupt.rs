//! SIGINT / SIGTERM while training: the loop finishes its step, checkpoints
//! and stops. A second signal exits at once. Handlers are removed on drop.

use crate::error::Interrupted;
use crate::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Interrupter {
    which: Arc<AtomicUsize>,
    ids: Vec<signal_hook::SigId>,
}

impl Interrupter {
    pub fn register() -> Result<Interrupter> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let which = Arc::new(AtomicUsize::new(0));
        let term = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            ids.push(flag::register_conditional_shutdown(
                sig,
                128 + sig,
                Arc::clone(&term),
            )?);
            ids.push(flag::register(sig, Arc::clone(&term))?);
            ids.push(flag::register_usize(sig, Arc::clone(&which), sig as usize)?);
        }
        Ok(Interrupter { which, ids })
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.which.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// The error that ends a run stopped by `sig` (exit 130 or 143), with
/// `what` telling where it stopped and how to go on.
pub fn stopped(sig: i32, what: impl FnOnce(&str) -> String) -> anyhow::Error {
    let (name, code) = match sig {
        signal_hook::consts::SIGINT => ("SIGINT", 130),
        _ => ("SIGTERM", 143),
    };
    anyhow::Error::new(Interrupted {
        code,
        msg: what(name),
    })
}

impl Drop for Interrupter {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
