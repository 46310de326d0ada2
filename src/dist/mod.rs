//! Data-parallel training on PyTorch's own distributed engine: c10d's
//! TCPStore rendezvous and Gloo process group, from the libtorch we link
//! (through `c10d_shim.cpp`), launched by `torchrun` or any launcher that
//! sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//!
//! As `torch.distributed` has a default process group, so does this module
//! ([`group`]): training joins it once ([`init`]); the few places that need
//! a collective (gradient sync, batch top-k's selection, dead-latent
//! counters, logged metrics) ask for it. Without a launcher there is no
//! group and every reduction is the identity.
//!
//! A failed collective (a peer died, or hung past `dist.timeout_s`) is
//! recorded and later collectives are skipped; the training loop reports it
//! after the step ([`check`]), so the code inside a step needs no error path.

use crate::error::user;
use crate::{bail_user, Result};
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tch::Tensor;
use torch_sys::C_tensor;

mod ffi {
    use super::*;

    #[repr(C)]
    pub struct SaePg {
        _private: [u8; 0],
    }

    extern "C" {
        pub fn sae_pg_new(
            host: *const c_char,
            port: i32,
            is_server: i32,
            rank: i32,
            world: i32,
            prefix: *const c_char,
            timeout_ms: i64,
            out: *mut *mut SaePg,
        ) -> *mut c_char;
        pub fn sae_pg_free(pg: *mut SaePg);
        pub fn sae_pg_allreduce(pg: *mut SaePg, t: *mut C_tensor, op: i32) -> *mut c_char;
        pub fn sae_pg_broadcast(pg: *mut SaePg, t: *mut C_tensor, root: i32) -> *mut c_char;
        pub fn sae_pg_allgather(
            pg: *mut SaePg,
            out: *mut C_tensor,
            input: *mut C_tensor,
        ) -> *mut c_char;
        pub fn sae_pg_barrier(pg: *mut SaePg) -> *mut c_char;
    }
}

/// What the launcher's environment says about this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store on `master_port`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank is a client.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: keys of each restart stay apart.
    pub restart: u64,
}

impl Launch {
    /// From the environment: `None` when `RANK` and `WORLD_SIZE` are both
    /// unset (one process, no group); an error naming the variable when the
    /// set is incomplete or malformed.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        if var("RANK").is_none() && var("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let need = |k: &str| {
            var(k).ok_or_else(|| {
                user(format!(
                    "data-parallel launch: {k} is not set (a launcher such as torchrun sets \
                     RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
                ))
            })
        };
        let number = |k: &str, v: String| -> Result<u64> {
            v.trim().parse().map_err(|_| {
                user(format!(
                    "data-parallel launch: {k}={v:?} is not a non-negative integer"
                ))
            })
        };
        let rank = number("RANK", need("RANK")?)? as usize;
        let world = number("WORLD_SIZE", need("WORLD_SIZE")?)? as usize;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)? as usize,
            None => rank,
        };
        let master_port = number("MASTER_PORT", need("MASTER_PORT")?)?;
        if world == 0 || rank >= world {
            bail_user!("data-parallel launch: RANK={rank} must be below WORLD_SIZE={world}");
        }
        if master_port == 0 || master_port > u16::MAX as u64 {
            bail_user!("data-parallel launch: MASTER_PORT={master_port} is not a port number");
        }
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            master_addr: need("MASTER_ADDR")?,
            master_port: master_port as u16,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            restart: match var("TORCHELASTIC_RESTART_COUNT") {
                Some(v) => number("TORCHELASTIC_RESTART_COUNT", v)?,
                None => 0,
            },
        }))
    }
}

/// A c10d process group (Gloo).
pub struct Group {
    ptr: *mut ffi::SaePg,
    pub rank: usize,
    pub world: usize,
    pub timeout: Duration,
    /// The first failed collective; later ones are skipped.
    failed: Mutex<Option<String>>,
    /// Rows of the current step's global batch (see [`Group::begin_step`]).
    batch_rows: AtomicI64,
    /// Time spent in collectives so far (nanoseconds).
    busy_ns: AtomicU64,
}

// The group is used from the training thread only; the static needs Sync.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Sum = 0,
    Max = 1,
    Min = 2,
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// The process group this process joined, if any.
pub fn group() -> Option<&'static Group> {
    GROUP.get()
}

/// Joins the group `launch` describes (once per process); waits up to
/// `timeout` for every rank.
pub fn init(launch: &Launch, timeout: Duration) -> Result<&'static Group> {
    if let Some(g) = GROUP.get() {
        return Ok(g);
    }
    let host = CString::new(launch.master_addr.clone())
        .map_err(|_| user("MASTER_ADDR holds a NUL byte"))?;
    let prefix = CString::new(format!("sae/{}/", launch.restart)).expect("no NUL");
    let mut ptr = std::ptr::null_mut();
    let err = unsafe {
        ffi::sae_pg_new(
            host.as_ptr(),
            launch.master_port as i32,
            (!launch.agent_store && launch.rank == 0) as i32,
            launch.rank as i32,
            launch.world as i32,
            prefix.as_ptr(),
            timeout.as_millis().min(i64::MAX as u128) as i64,
            &mut ptr,
        )
    };
    if let Some(e) = crate::shim::take_error(err) {
        bail_user!(
            "data-parallel: rank {} of {} could not join the process group at {}:{} \
             within dist.timeout_s ({} s): {}",
            launch.rank,
            launch.world,
            launch.master_addr,
            launch.master_port,
            timeout.as_secs(),
            first_line(&e)
        );
    }
    let g = Group {
        ptr,
        rank: launch.rank,
        world: launch.world,
        timeout,
        failed: Mutex::new(None),
        batch_rows: AtomicI64::new(0),
        busy_ns: AtomicU64::new(0),
    };
    Ok(GROUP.get_or_init(|| g))
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(s)
}

/// The first collective that failed in this process, as an error.
pub fn check() -> Result<()> {
    match group() {
        Some(g) => g.check(),
        None => Ok(()),
    }
}

impl Group {
    /// Runs one collective unless one already failed; records its error.
    fn run(&self, what: &str, f: impl FnOnce() -> *mut c_char) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_some() {
            return;
        }
        let started = std::time::Instant::now();
        let err = f();
        let ns = started.elapsed().as_nanos() as u64;
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        if let Some(e) = crate::shim::take_error(err) {
            *failed = Some(format!("{what}: {}", first_line(&e)));
        }
    }

    /// Seconds this process has spent in collectives (waiting for the
    /// slowest rank included).
    pub fn busy_seconds(&self) -> f64 {
        self.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// A training step on a global batch of `rows` begins: collectives
    /// inside the forward pass (batch top-k) need the global size.
    pub fn begin_step(&self, rows: usize) {
        self.batch_rows.store(rows as i64, Ordering::Relaxed);
    }

    pub fn batch_rows(&self) -> i64 {
        self.batch_rows.load(Ordering::Relaxed)
    }

    pub fn check(&self) -> Result<()> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match &*failed {
            None => Ok(()),
            Some(e) => Err(anyhow::anyhow!(
                "data-parallel: rank {} of {}: {e} (a peer rank stopped, or hung past \
                 dist.timeout_s = {} s); the last checkpoint is intact",
                self.rank,
                self.world,
                self.timeout.as_secs()
            )),
        }
    }

    /// In place: `t` becomes `op` over every rank's `t`.
    pub fn allreduce(&self, t: &mut Tensor, op: Op) {
        self.run("allreduce", || unsafe {
            ffi::sae_pg_allreduce(self.ptr, t.as_mut_ptr(), op as i32)
        });
    }

    /// In place: every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) {
        self.run("broadcast", || unsafe {
            ffi::sae_pg_broadcast(self.ptr, t.as_mut_ptr(), root as i32)
        });
    }

    /// Every rank's `t`, stacked in rank order: `[world, ...t's shape]`.
    pub fn allgather(&self, t: &Tensor) -> Tensor {
        let mut shape = vec![self.world as i64];
        shape.extend(t.size());
        let mut out = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
        let mut input = t.contiguous();
        self.run("allgather", || unsafe {
            ffi::sae_pg_allgather(self.ptr, out.as_mut_ptr(), input.as_mut_ptr())
        });
        out
    }

    pub fn barrier(&self) {
        self.run("barrier", || unsafe { ffi::sae_pg_barrier(self.ptr) });
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { ffi::sae_pg_free(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn launch_from_environment() {
        assert_eq!(launch(&[]).unwrap(), None);
        let l = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.master_port, l.agent_store),
            (1, 2, 29500, true)
        );
        let err = |v: &[(&str, &str)]| crate::error::one_line(&launch(v).unwrap_err());
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not set"));
        assert!(err(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .contains("must be below"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
    }
}
