//! `train.precision: bf16`: libtorch's own autocast around a step's forward
//! pass and loss, as `with torch.autocast(device, dtype=torch.bfloat16):`
//! does in Python (src/autocast_shim.cpp enters and leaves it exactly as
//! `torch.autocast.__enter__`/`__exit__` do). The same dispatch key runs
//! the same casts, so the ops on autocast's lists (the matmuls: `mm`,
//! `matmul`, `addmm`, ...) take bfloat16 copies of their float32 inputs and
//! return bfloat16, the ops on its float32 list (`mse_loss`, ...) run in
//! float32, and everything else follows type promotion. Parameters, their
//! gradients and Adam's moments stay float32; backward and the update run
//! outside the region, as in PyTorch.

use crate::config::Precision;
use std::ffi::c_char;
use tch::Device;

#[repr(C)]
#[derive(Default)]
struct Prev {
    enabled: i32,
    dtype: i32,
    cache_enabled: i32,
}

extern "C" {
    fn sae_autocast_enter_bf16(device: i32, prev: *mut Prev) -> *mut c_char;
    fn sae_autocast_exit(device: i32, prev: *const Prev) -> *mut c_char;
    fn sae_autocast_is_enabled(device: i32) -> i32;
}

/// libtorch's autocast device type for `device`: 0 CPU, 1 CUDA.
fn device_code(device: Device) -> crate::Result<i32> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(crate::error::user(format!(
            "train.precision: bf16 runs on cpu or cuda, not {other:?}; use train.precision: fp32"
        ))),
    }
}

/// While alive, autocast to bfloat16 is on for `device` in this thread;
/// dropping it restores the state it found (and, outermost, drops the
/// cached casts of the parameters).
pub struct Autocast {
    device: i32,
    prev: Prev,
}

impl Autocast {
    /// Enters `torch.autocast(device, dtype=torch.bfloat16)`.
    pub fn bf16(device: Device) -> crate::Result<Autocast> {
        let code = device_code(device)?;
        let mut prev = Prev::default();
        // SAFETY: `prev` outlives the call; errors come back as a string.
        let err = unsafe { sae_autocast_enter_bf16(code, &mut prev) };
        if let Some(e) = crate::shim::take_error(err) {
            anyhow::bail!("entering autocast (bfloat16) on {device:?}: {e}");
        }
        Ok(Autocast { device: code, prev })
    }

    /// For `precision` on `device`: the region (`bf16`) or nothing (`fp32`).
    pub fn enter(precision: Precision, device: Device) -> crate::Result<Option<Autocast>> {
        match precision {
            Precision::Fp32 => Ok(None),
            Precision::Bf16 => Autocast::bf16(device).map(Some),
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: `prev` is what the matching enter saved.
        let err = unsafe { sae_autocast_exit(self.device, &self.prev) };
        if let Some(e) = crate::shim::take_error(err) {
            // Only setters of thread-local flags run here: not expected.
            eprintln!("warning: leaving autocast: {e}");
        }
    }
}

/// Whether autocast is on for `device`'s type in this thread.
pub fn is_enabled(device: Device) -> bool {
    match device_code(device) {
        // SAFETY: reads a thread-local flag.
        Ok(code) => unsafe { sae_autocast_is_enabled(code) != 0 },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn matmul_runs_in_bf16_inside_and_fp32_after() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        assert!(!is_enabled(Device::Cpu));
        {
            let _g = Autocast::bf16(Device::Cpu).unwrap();
            assert!(is_enabled(Device::Cpu));
            assert_eq!(a.mm(&a).kind(), Kind::BFloat16);
            // Not on autocast's lists: type promotion.
            assert_eq!((a.mm(&a) + &a).kind(), Kind::Float);
            // On its float32 list.
            let m = a.mm(&a).mse_loss(&a, tch::Reduction::Mean);
            assert_eq!(m.kind(), Kind::Float);
            {
                let _inner = Autocast::bf16(Device::Cpu).unwrap();
                assert!(is_enabled(Device::Cpu));
            }
            // The inner exit restores the outer state.
            assert!(is_enabled(Device::Cpu));
        }
        assert!(!is_enabled(Device::Cpu));
        assert_eq!(a.mm(&a).kind(), Kind::Float);
    }
}
