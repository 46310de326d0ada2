//! `sae`: train, evaluate and export sparse autoencoders on libtorch.
//!
//! Where things live: the model ([`model`]), what differs per architecture
//! ([`arch`], named by [`arch::ActivationKind`]) and sparsity penalties
//! ([`penalty`], p-annealing's state in [`anneal`]); the data path ([`data`]); the training run in parts
//! ([`train`]: see docs/ARCHITECTURE.md) and optimizers ([`optimizer`]:
//! Adam in [`optim`], [`signum`], [`muon`]); metric
//! definitions ([`metrics`]); model files ([`export`]); what latents learned
//! ([`latents`]) and the HTML pages ([`html`]); the CLI ([`cli`]).

pub mod anneal;
pub mod arch;
pub mod autocast;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod export;
pub mod fsutil;
pub mod ground_truth;
pub mod html;
pub mod latents;
pub mod lm;
pub mod metrics;
pub mod model;
pub mod muon;
pub mod normalize;
pub mod optim;
pub mod optimizer;
pub mod penalty;
pub mod plot;
pub mod pursuit;
pub mod report;
pub mod schedule;
mod shim;
pub mod signum;
pub mod sparse_codes;
pub mod sparse_step;
pub mod sweep;
pub mod train;

pub type Result<T> = anyhow::Result<T>;

/// Unit tests that seed libtorch's global generator hold this, so tests
/// running in parallel do not draw from each other's stream.
#[cfg(test)]
pub(crate) fn seeded() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
