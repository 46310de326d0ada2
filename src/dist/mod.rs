//! Data-parallel training on PyTorch's own distributed engine: c10d's
//! TCPStore rendezvous and Gloo (CPU) or NCCL (CUDA) process group, from
//! the libtorch we link
//! (through `c10d_shim.cpp`), launched by `torchrun` or any launcher that
//! sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//!
//! As `torch.distributed` has a default process group, so does this module
//! ([`group`]): training joins it once ([`init`]); the few places that need
//! a collective (gradient sync, batch top-k's selection, dead-latent
//! counters, logged metrics) ask for it. Without a launcher there is no
//! group and every reduction is the identity.
//!
//! The gradient allreduce overlaps backward ([`Group::overlap_begin`],
//! [`Group::overlap_finish`]): hooks on the parameters' gradient
//! accumulators start each bucket's allreduce once its gradients are in, as
//! DDP's Reducer does.
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
use tch::{Device, Tensor};
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
            backend: i32,
            device: i32,
            out: *mut *mut SaePg,
        ) -> *mut c_char;
        pub fn sae_pg_nccl_version() -> *mut c_char;
        pub fn sae_pg_free(pg: *mut SaePg);
        pub fn sae_pg_allreduce(pg: *mut SaePg, t: *mut C_tensor, op: i32) -> *mut c_char;
        pub fn sae_pg_broadcast(pg: *mut SaePg, t: *mut C_tensor, root: i32) -> *mut c_char;
        pub fn sae_pg_allgather(
            pg: *mut SaePg,
            out: *mut C_tensor,
            input: *mut C_tensor,
        ) -> *mut c_char;
        pub fn sae_pg_barrier(pg: *mut SaePg) -> *mut c_char;
        pub fn sae_pg_overlap_begin(
            pg: *mut SaePg,
            params: *const *mut C_tensor,
            n: i64,
            late: *const u8,
            flat: *mut C_tensor,
            scale: f64,
            bucket_bytes: i64,
            armed: *mut i32,
        ) -> *mut c_char;
        pub fn sae_pg_overlap_finish(
            pg: *mut SaePg,
            params: *const *mut C_tensor,
            n: i64,
            intact: *mut i32,
            early: *mut i64,
        ) -> *mut c_char;
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

/// The c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors, one GPU per rank.
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// The NCCL version built into this binary (`"2.28.9"`), `None` when NCCL
/// is not (a libtorch without CUDA, or no CUDA/NCCL headers at build time).
pub fn nccl_version() -> Option<String> {
    let p = unsafe { ffi::sae_pg_nccl_version() };
    crate::shim::take_error(p).filter(|v| !v.is_empty())
}

/// A c10d process group (Gloo or NCCL).
pub struct Group {
    ptr: *mut ffi::SaePg,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
    /// Where the collectives' tensors live (CPU for Gloo, this rank's GPU
    /// for NCCL); tensors elsewhere travel there and back.
    pub device: Device,
    pub timeout: Duration,
    /// The first failed collective; later ones are skipped.
    failed: Mutex<Option<String>>,
    /// Rows of the current step's global batch (see [`Group::begin_step`]).
    batch_rows: AtomicI64,
    /// Time spent in collectives so far (nanoseconds).
    busy_ns: AtomicU64,
    /// Gradient buckets whose allreduce started during backward so far.
    early_buckets: AtomicU64,
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

/// Joins the group `launch` describes (once per process) on `backend`
/// (NCCL: on GPU `cuda:LOCAL_RANK`); waits up to `timeout` for every rank.
pub fn init(launch: &Launch, backend: Backend, timeout: Duration) -> Result<&'static Group> {
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
            (backend == Backend::Nccl) as i32,
            launch.local_rank as i32,
            &mut ptr,
        )
    };
    if let Some(e) = crate::shim::take_error(err) {
        bail_user!(
            "data-parallel: rank {} of {} could not join the {} process group at {}:{} \
             within dist.timeout_s ({} s): {}",
            launch.rank,
            launch.world,
            backend.name(),
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
        backend,
        device: match backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(launch.local_rank),
        },
        timeout,
        failed: Mutex::new(None),
        batch_rows: AtomicI64::new(0),
        busy_ns: AtomicU64::new(0),
        early_buckets: AtomicU64::new(0),
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

    /// Gradient buckets whose allreduce started during backward so far
    /// (`dist.bucket_mb` > 0), overlapping it.
    pub fn early_buckets(&self) -> u64 {
        self.early_buckets.load(Ordering::Relaxed)
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

    /// Runs `f` on `t` where the collectives' tensors live: `t` itself, or
    /// a copy on that device, copied back into `t` after.
    fn on_device(&self, t: &mut Tensor, f: impl FnOnce(&mut Tensor)) {
        if t.device() == self.device {
            return f(t);
        }
        let mut there = t.to_device(self.device);
        f(&mut there);
        let _guard = tch::no_grad_guard();
        t.copy_(&there);
    }

    /// In place: `t` becomes `op` over every rank's `t`.
    pub fn allreduce(&self, t: &mut Tensor, op: Op) {
        self.on_device(t, |t| {
            self.run("allreduce", || unsafe {
                ffi::sae_pg_allreduce(self.ptr, t.as_mut_ptr(), op as i32)
            })
        });
    }

    /// In place: every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) {
        self.on_device(t, |t| {
            self.run("broadcast", || unsafe {
                ffi::sae_pg_broadcast(self.ptr, t.as_mut_ptr(), root as i32)
            })
        });
    }

    /// Every rank's `t`, stacked in rank order: `[world, ...t's shape]`
    /// (on `t`'s device).
    pub fn allgather(&self, t: &Tensor) -> Tensor {
        let mut shape = vec![self.world as i64];
        shape.extend(t.size());
        let mut out = Tensor::zeros(shape.as_slice(), (t.kind(), self.device));
        let mut input = t.to_device(self.device).contiguous();
        self.run("allgather", || unsafe {
            ffi::sae_pg_allgather(self.ptr, out.as_mut_ptr(), input.as_mut_ptr())
        });
        out.to_device(t.device())
    }

    pub fn barrier(&self) {
        self.run("barrier", || unsafe { ffi::sae_pg_barrier(self.ptr) });
    }

    /// Before backward: from now on, each bucket of about `bucket_bytes`
    /// of gradients (in reverse parameter order) is scaled by `scale` and
    /// summed over the ranks, in place and asynchronously, as soon as
    /// backward has finished its gradients. `grads` is the flat buffer
    /// whose views the parameters' gradients are, in order; `late[i]`
    /// marks a parameter whose gradient is finished after backward (by
    /// hand): its bucket starts in [`Group::overlap_finish`]. False (and
    /// nothing armed) when the gradients are not views of `grads` or a
    /// collective already failed: the caller then reduces after backward.
    pub fn overlap_begin(
        &self,
        params: &[&Tensor],
        late: &[bool],
        grads: &Tensor,
        scale: f64,
        bucket_bytes: i64,
    ) -> bool {
        if self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return false;
        }
        let ptrs: Vec<*mut C_tensor> = params.iter().map(|p| p.as_ptr() as *mut _).collect();
        let late: Vec<u8> = late.iter().map(|&l| l as u8).collect();
        assert_eq!(late.len(), ptrs.len());
        let mut armed = 0;
        let mut failed = false;
        self.run("allreduce", || {
            let e = unsafe {
                ffi::sae_pg_overlap_begin(
                    self.ptr,
                    ptrs.as_ptr(),
                    ptrs.len() as i64,
                    late.as_ptr(),
                    grads.as_ptr() as *mut _,
                    scale,
                    bucket_bytes.max(1),
                    &mut armed,
                )
            };
            failed = !e.is_null();
            e
        });
        armed != 0 && !failed
    }

    /// After backward (and the gradients finished by hand): starts the
    /// buckets not yet started and waits for every one. False when a
    /// gradient stopped being a view of the buffer during backward (the
    /// caller then reduces the gradients itself); true otherwise, a failed
    /// allreduce included (recorded, as every collective's).
    pub fn overlap_finish(&self, params: &[&Tensor]) -> bool {
        let ptrs: Vec<*mut C_tensor> = params.iter().map(|p| p.as_ptr() as *mut _).collect();
        let (mut intact, mut early) = (1, 0);
        let mut ran = false;
        self.run("allreduce", || {
            ran = true;
            unsafe {
                ffi::sae_pg_overlap_finish(
                    self.ptr,
                    ptrs.as_ptr(),
                    ptrs.len() as i64,
                    &mut intact,
                    &mut early,
                )
            }
        });
        self.early_buckets
            .fetch_add(early.max(0) as u64, Ordering::Relaxed);
        !ran || intact != 0
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
