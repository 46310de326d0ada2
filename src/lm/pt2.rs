//! torch.export AOTInductor packages (`.pt2`) through libtorch's
//! `AOTIModelPackageLoader` (C++ shim: pt2_shim.cpp).
//!
//! A package is a zip holding a compiled shared library for one device type
//! (its metadata's `AOTI_DEVICE_KEY`: `cpu` or `cuda`) and CPU instruction
//! set (`AOTI_CPU_ISA`), made in Python by
//! `torch._inductor.aoti_compile_and_package(torch.export.export(model, (ids,)))`.
//! [`Pt2Model::forward`] runs it on int64 ids `[B, T]` and returns its first
//! output.
//!
//! Input checks: the package's own checks of its inputs' dtype, sizes and
//! strides run only when `AOTI_RUNTIME_CHECK_INPUTS` is set (read once per
//! process by the package). Without them a wrong shape reads out of bounds,
//! so [`Pt2Model::load`] sets it to `1` when it is unset. Ids outside the
//! embedding's range are caught by the compiled kernels' own bounds check
//! (ids >= vocab); negative ids, which those kernels wrap around as Python
//! indexing does (-1 reads the last row), are refused here.
//!
//! A batch of one: `torch.export` takes a dynamic dimension to be at least 2
//! (it specialises 0 and 1), and with the input checks on such a package
//! refuses batch 1 ("dim value is too small at 0, expected it to be >= 2").
//! [`Pt2Model::forward`] then runs the row twice as a batch of 2 and returns
//! the first: the rows of a batch of token sequences are independent.
//!
//! A CPU package's library uses the vector instructions of the machine it
//! was compiled on (`AOTI_CPU_ISA`, e.g. `AVX512`): loading it on a CPU
//! without them is refused rather than left to crash.

use crate::error::user;
use crate::{bail_user, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

mod ffi {
    use super::*;

    #[repr(C)]
    pub struct SaePt2 {
        _private: [u8; 0],
    }

    pub type KvCb = extern "C" fn(*mut c_void, *const c_char, *const c_char);

    extern "C" {
        pub fn sae_pt2_read_metadata(
            path: *const c_char,
            ctx: *mut c_void,
            cb: KvCb,
        ) -> *mut c_char;
        pub fn sae_pt2_load(
            path: *const c_char,
            device_index: i32,
            out: *mut *mut SaePt2,
        ) -> *mut c_char;
        pub fn sae_pt2_run(
            h: *mut SaePt2,
            input: *const C_tensor,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn sae_pt2_free(h: *mut SaePt2);
    }
}

/// The metadata key naming the device type a package was compiled for.
pub const DEVICE_KEY: &str = "AOTI_DEVICE_KEY";

/// A loaded AOTInductor package.
pub struct Pt2Model {
    handle: NonNull<ffi::SaePt2>,
    path: PathBuf,
    device: Device,
    metadata: HashMap<String, String>,
}

// SAFETY: the handle owns an AOTIModelPackageLoader, which holds no
// thread-bound state: its model container serialises runs with its own
// mutex, and the shim's stderr capture is under a process-wide mutex. It
// may be used from, and freed on, any thread. (Not `Sync`: one owner at a
// time is all that callers need, and it keeps that question closed.)
unsafe impl Send for Pt2Model {}

fn path_cstring(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| user(format!("{}: the path contains a NUL byte", path.display())))
}

extern "C" fn on_kv(ctx: *mut c_void, key: *const c_char, value: *const c_char) {
    // SAFETY: ctx is the &mut HashMap passed to sae_pt2_read_metadata; the
    // strings are valid NUL-terminated C strings for the call.
    let out = unsafe { &mut *(ctx as *mut HashMap<String, String>) };
    let k = unsafe { CStr::from_ptr(key) }
        .to_string_lossy()
        .into_owned();
    let v = unsafe { CStr::from_ptr(value) }
        .to_string_lossy()
        .into_owned();
    out.insert(k, v);
}

/// The reason in a shim error: the package's own `Error: ...` line when it
/// printed one, else the first non-empty line.
fn reason(e: &str) -> String {
    let lines = || e.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find_map(|l| l.strip_prefix("Error: "))
        .or_else(|| lines().next())
        .unwrap_or("unknown error")
        .to_string()
}

/// A zip archive starts with a local file header (or, when empty, the end
/// of the central directory).
fn is_zip(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| user(format!("cannot open {}: {e}", path.display())))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => bail_user!("cannot read {}: {e}", path.display()),
        }
    }
    Ok(n == 4 && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06"))
}

/// The x86 feature a token of `AOTI_CPU_ISA` needs that `has` lacks.
fn missing_isa(isa: &str, has: impl Fn(&str) -> bool) -> Option<&'static str> {
    isa.split_whitespace()
        .filter_map(|t| match t {
            "AVX512" => Some("avx512f"),
            "AVX2" => Some("avx2"),
            _ => None,
        })
        .find(|f| !has(f))
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        _ => true,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
    true
}

/// Makes the package check its inputs (see the module docs), once, unless
/// the user chose otherwise.
fn enable_input_checks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("AOTI_RUNTIME_CHECK_INPUTS").is_none() {
            std::env::set_var("AOTI_RUNTIME_CHECK_INPUTS", "1");
        }
    });
}

impl Pt2Model {
    /// Loads the package at `path` for `device`. A CPU package runs on the
    /// CPU whatever `device` is (see [`Pt2Model::device`]); a CUDA package
    /// needs a CUDA `device`. Errors the file causes (missing, not a zip,
    /// not an AOTInductor package, compiled for a device this machine or
    /// `device` lacks) are user errors naming the file.
    pub fn load(path: &Path, device: Device) -> Result<Pt2Model> {
        let shown = path.display();
        if !path.exists() {
            bail_user!("{shown}: no such file");
        }
        if path.is_dir() {
            bail_user!("{shown}: is a directory; expected a torch.export .pt2 package");
        }
        if !is_zip(path)? {
            bail_user!(
                "{shown}: not a .pt2 package (not a zip archive); make one with \
                 torch._inductor.aoti_compile_and_package"
            );
        }
        let path_c = path_cstring(path)?;
        let mut metadata: HashMap<String, String> = HashMap::new();
        // SAFETY: path_c lives for the call; on_kv gets &mut metadata as ctx.
        let err = unsafe {
            ffi::sae_pt2_read_metadata(
                path_c.as_ptr(),
                &mut metadata as *mut HashMap<String, String> as *mut c_void,
                on_kv,
            )
        };
        if let Some(e) = crate::shim::take_error(err) {
            bail_user!(
                "{shown}: not an AOTInductor package ({}); make one with \
                 torch._inductor.aoti_compile_and_package",
                reason(&e)
            );
        }
        let (run_on, index) = match metadata.get(DEVICE_KEY).map(String::as_str) {
            None | Some("cpu") => (Device::Cpu, -1),
            Some("cuda") => match device {
                Device::Cuda(i) => (Device::Cuda(i), i as i32),
                _ if !tch::Cuda::is_available() => bail_user!(
                    "{shown} was compiled for cuda; this machine has no CUDA device: export it \
                     again on the CPU (torch._inductor.aoti_compile_and_package with the model \
                     and inputs on cpu)"
                ),
                _ => bail_user!(
                    "{shown} was compiled for cuda but the device asked for is {device:?}: use a \
                     CUDA device, or export it again on the CPU"
                ),
            },
            Some(other) => bail_user!(
                "{shown} was compiled for {other}; only cpu and cuda packages can run here"
            ),
        };
        if run_on == Device::Cpu {
            let isa = metadata.get("AOTI_CPU_ISA").map_or("", String::as_str);
            if let Some(f) = missing_isa(isa, cpu_has) {
                bail_user!(
                    "{shown} was compiled for a CPU with {isa}; this CPU lacks {f}: export it \
                     again on this machine"
                );
            }
        }
        enable_input_checks();
        let mut handle: *mut ffi::SaePt2 = std::ptr::null_mut();
        // SAFETY: path_c lives for the call; on success the shim stores an
        // owned handle in `handle`.
        let err = unsafe { ffi::sae_pt2_load(path_c.as_ptr(), index, &mut handle) };
        if let Some(e) = crate::shim::take_error(err) {
            bail_user!(
                "{shown}: cannot load the AOTInductor package: {}",
                reason(&e)
            );
        }
        let handle = NonNull::new(handle)
            .ok_or_else(|| anyhow::anyhow!("{shown}: the .pt2 loader returned no model"))?;
        Ok(Pt2Model {
            handle,
            path: path.to_path_buf(),
            device: run_on,
            metadata,
        })
    }

    /// Runs the model on token ids `[B, T]` (int64; other integer kinds are
    /// converted, and ids on another device are moved to [`Pt2Model::device`])
    /// and returns its first output, on [`Pt2Model::device`]. A wrong shape or
    /// dtype (per the package's own checks) and ids outside the vocabulary
    /// are user errors naming the file.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shown = self.path.display();
        let size = ids.size();
        if size.len() != 2 {
            bail_user!("{shown}: token ids must be [batch, tokens]; got shape {size:?}");
        }
        let kind = ids.kind();
        let ids = match kind {
            Kind::Int64 => ids.shallow_clone(),
            Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => ids.to_kind(Kind::Int64),
            _ => bail_user!("{shown}: token ids must be integers (int64); got {kind:?}"),
        };
        if ids.numel() > 0 && ids.min().int64_value(&[]) < 0 {
            bail_user!("{shown}: token ids must be >= 0; got a negative id");
        }
        let ids = ids.to_device(self.device).contiguous();
        match self.run(&ids) {
            Err(why) if size[0] == 1 && why.contains("too small at 0, expected it to be >= 2") => {
                let two = ids.expand([2, size[1]], false).contiguous();
                self.run(&two)
                    .map(|t| t.narrow(0, 0, 1))
                    .map_err(|why| self.run_error(&size, why))
            }
            r => r.map_err(|why| self.run_error(&size, why)),
        }
    }

    /// One run of the package: its first output, or the reason it failed.
    fn run(&self, ids: &Tensor) -> std::result::Result<Tensor, String> {
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: the handle is live (owned by self); ids lives for the call;
        // on success the shim stores a new owned tensor in `out`.
        let err = unsafe { ffi::sae_pt2_run(self.handle.as_ptr(), ids.as_ptr(), &mut out) };
        if let Some(e) = crate::shim::take_error(err) {
            return Err(reason(&e));
        }
        if out.is_null() {
            return Err("the model returned no tensor".into());
        }
        // SAFETY: `out` is a heap-allocated torch::Tensor the shim handed over.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// A failed run as an error: the user's when the package's input checks
    /// or its kernels' bounds checks refused the ids.
    fn run_error(&self, size: &[i64], why: String) -> anyhow::Error {
        let msg = format!(
            "{}: running the model on ids {size:?}: {why}",
            self.path.display()
        );
        if why.starts_with("input_handles[") {
            user(msg)
        } else if why.contains("index out of bounds") {
            user(format!(
                "{msg} (a token id outside the model's vocabulary?)"
            ))
        } else {
            anyhow::anyhow!(msg)
        }
    }

    /// The device the model runs on: the package's (CPU for a CPU package).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The package's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The package's metadata (`AOTI_DEVICE_KEY`, `AOTI_CPU_ISA`, ... and
    /// what `aot_inductor.metadata` added when it was compiled).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
}

impl Drop for Pt2Model {
    fn drop(&mut self) {
        // SAFETY: the handle came from sae_pt2_load and is freed once.
        unsafe { ffi::sae_pt2_free(self.handle.as_ptr()) }
    }
}

impl std::fmt::Debug for Pt2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pt2Model")
            .field("path", &self.path)
            .field("device", &self.device)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_prefers_the_package_error_line() {
        let e = "Error: input_handles[0]: unmatched dim value at 1, expected: 32, but got: 31\n\n\
                 \nrun_func_(...) API call failed at x.cpp, line 144";
        assert_eq!(
            reason(e),
            "input_handles[0]: unmatched dim value at 1, expected: 32, but got: 31"
        );
        assert_eq!(reason("\n  plain failure\nmore"), "plain failure");
    }

    #[test]
    fn cpu_isa_check() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        assert_eq!(missing_isa("AVX512 AVX512_VNNI", none), Some("avx512f"));
        assert_eq!(missing_isa("AVX512 AVX512_VNNI", all), None);
        assert_eq!(missing_isa("AVX2", |f| f != "avx2"), Some("avx2"));
        assert_eq!(missing_isa("", none), None);
        assert_eq!(missing_isa("NEON", none), None);
    }
}
