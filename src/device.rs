//! The one place that turns `device:` and thread settings into libtorch state.

use std::path::Path;
use tch::Device;

/// Parses `auto | cpu | cuda | cuda:N`. `auto` means CUDA device 0 when
/// libtorch has CUDA and a GPU is present, else CPU.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => {
            if let Some(n) = s.strip_prefix("cuda:") {
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("`{s}`: expected auto, cpu, cuda or cuda:N"))?;
                Ok(Device::Cuda(n))
            } else {
                Err(format!("`{s}`: expected auto, cpu, cuda or cuda:N"))
            }
        }
    }
}

/// Resolves the device and checks that a requested GPU exists.
pub fn resolve(s: &str) -> crate::Result<Device> {
    let dev = parse_device(s).map_err(|e| crate::error::user(format!("device: {e}")))?;
    if let Device::Cuda(n) = dev {
        let count = tch::Cuda::device_count() as usize;
        if count == 0 {
            crate::bail_user!(
                "device: {s} requested but CUDA is not available (libtorch CUDA: {}); use device: cpu or auto",
                tch::utils::has_cuda()
            );
        }
        if n >= count {
            crate::bail_user!("device: {s} requested but only {count} CUDA device(s) exist");
        }
    }
    Ok(dev)
}

pub fn describe(dev: Device) -> String {
    match dev {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    }
}

/// Where a run computes, for its first progress line: the device, and on
/// the CPU the threads and how idle ones wait.
pub fn place(dev: Device) -> String {
    let threads = tch::get_num_threads();
    match dev {
        Device::Cpu => format!("cpu, {threads} threads, OpenMP wait: {}", omp_wait()),
        other => format!("{} (host threads: {threads})", describe(other)),
    }
}

/// Sets libtorch's intra-op thread count (None = leave libtorch's default,
/// which is the number of physical cores).
pub fn set_threads(n: Option<i64>) {
    if let Some(n) = n {
        tch::set_num_threads(n as i32);
    }
}

/// Keeps freed tensor buffers in the process heap for reuse. With glibc's
/// defaults every buffer over 32 MiB is a fresh `mmap`, so each training
/// step page-faults and zeroes its large activations and gradients again:
/// measured at ~35 % of a 768→16384 top-k step in the kernel
/// (`clear_page_erms`). Disabling mmap for malloc and never trimming the heap
/// top reuses the pages instead (top-k step 3.2x faster, ReLU+L1 step 14 %).
/// Memory use stays bounded by the peak of live tensors.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at
    // start-up before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Flushes subnormal floats to zero (FTZ) and reads them as zero (DAZ) on
/// x86-64, as `torch.set_flush_denormal(True)`. Adam's moments of latents
/// that stopped firing decay through the subnormal range, where every
/// operation on them is several times slower (6-8x for Adam's moment
/// updates on this machine: scripts/denormal_bench.py). The setting is per
/// thread and threads inherit it when created, so it must come before
/// libtorch starts its worker threads (`main` does it for `train` and
/// `sweep`). Returns whether it is on.
pub fn flush_denormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: sets two MXCSR mode bits (FTZ 0x8000, DAZ 0x0040).
        #[allow(deprecated)]
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// libgomp's spin count before a waiting OpenMP worker sleeps, where the
/// user set neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`. libgomp's own
/// default (300,000) keeps idle workers spinning at every barrier, which on
/// a busy machine takes the cores the work needs; passive waiting (0) costs
/// tiny models a wake-up per op. Measured on 2 cores with two busy
/// processes beside the run (training-loop seconds, best of 3; quiet ->
/// loaded): 64->512 top-k 0.35 -> 1.69 (default), 0.44 -> 0.77 (passive),
/// 0.36 -> 0.84 (10,000); 768->16384 top-k 1.28 -> 3.68, 1.27 -> 2.69,
/// 1.28 -> 2.52 (`make bench` part LOADED reruns it).
pub const GOMP_SPINCOUNT: &str = "10000";
/// [`GOMP_SPINCOUNT`] as an environment entry.
const GOMP_SPINCOUNT_ENTRY: &std::ffi::CStr = c"GOMP_SPINCOUNT=10000";

/// The environment entry [`default_omp_wait`] lent its slot to, put back
/// by [`restore_env`].
static LENT_SLOT: std::sync::atomic::AtomicPtr<libc::c_char> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Variables a library's constructor may read: never lent.
const READ_AT_LOAD: [&[u8]; 12] = [
    b"OMP_", b"GOMP_", b"KMP_", b"MKL_", b"LD_", b"GLIBC_", b"MALLOC_", b"TORCH", b"PYTORCH",
    b"CUDA", b"NCCL", b"SAE_",
];

/// Puts `GOMP_SPINCOUNT=`[`GOMP_SPINCOUNT`] in the environment unless the
/// user chose a wait policy. libgomp reads its environment once, in its
/// library constructor, which runs before `main`; only `.preinit_array`
/// (main.rs) runs earlier, and there `setenv` is undone: libc's own
/// constructor then resets `environ` to the original array. So the entry
/// takes the slot of a variable no library reads while loading (`_`,
/// `PWD`, ...) in that array, and [`restore_env`] puts that one back first
/// thing in `main`. Child processes inherit the setting.
///
/// # Safety
/// Only from `.preinit_array`, with the `envp` the loader passes there.
pub unsafe fn default_omp_wait(envp: *mut *mut libc::c_char) {
    if envp.is_null() {
        return;
    }
    let mut entries = Vec::new();
    let mut p = envp;
    while !(*p).is_null() {
        entries.push((p, std::ffi::CStr::from_ptr(*p).to_bytes()));
        p = p.add(1);
    }
    let named = |e: &[u8], n: &[u8]| e.starts_with(n) && e.get(n.len()) == Some(&b'=');
    if entries
        .iter()
        .any(|(_, e)| named(e, b"OMP_WAIT_POLICY") || named(e, b"GOMP_SPINCOUNT"))
    {
        return;
    }
    let harmless = |e: &[u8]| !READ_AT_LOAD.iter().any(|p| e.starts_with(p));
    let preferred = [&b"_"[..], b"OLDPWD", b"SHLVL", b"PWD", b"HOME"];
    let slot = preferred
        .iter()
        .find_map(|n| entries.iter().find(|(_, e)| named(e, n)))
        .or_else(|| entries.iter().find(|(_, e)| harmless(e)));
    if let Some((slot, _)) = slot {
        LENT_SLOT.store(**slot, std::sync::atomic::Ordering::SeqCst);
        **slot = GOMP_SPINCOUNT_ENTRY.as_ptr() as *mut libc::c_char;
    }
}

/// Puts back the variable whose slot [`default_omp_wait`] lent; call it
/// first thing in `main`, before any thread starts.
pub fn restore_env() {
    let lent = LENT_SLOT.swap(std::ptr::null_mut(), std::sync::atomic::Ordering::SeqCst);
    if !lent.is_null() {
        // SAFETY: `lent` is the loader's original entry ("NAME=value", kept
        // for the life of the process); putenv adds it to `environ` as it is.
        unsafe { libc::putenv(lent) };
    }
}

/// How libtorch's OpenMP workers wait, for `sae info`, the run's last line
/// and `summary.json`.
pub fn omp_wait() -> String {
    let policy = std::env::var("OMP_WAIT_POLICY").ok();
    let spin = std::env::var("GOMP_SPINCOUNT").ok();
    match (policy, spin) {
        (None, Some(s)) if s == GOMP_SPINCOUNT => format!("spin {s} then sleep (sae's default)"),
        (None, Some(s)) => format!("spin {s} then sleep (GOMP_SPINCOUNT)"),
        (Some(p), _) => format!("OMP_WAIT_POLICY={p}"),
        (None, None) => "libgomp's default".into(),
    }
}

/// Undoes [`tune_allocator`] once the training loop is over: what the
/// loop freed (optimizer state, step buffers) goes back to the system, and
/// the end of the run's temporaries are returned as they are freed, so the
/// loop's peak does not stay as the process's size.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator parameters and trimming only; glibc's defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 65536);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::malloc_trim(0);
    }
}

/// Below this many multiply-adds in a step's largest matmul, MKL's
/// fork/join across threads costs more than the extra threads save.
/// Measured on 2 cores (torch 2.11 MKL sgemm): 64×64×64 takes 9.2 µs on two
/// threads and 6.3 µs on one; 128×64×128 takes 19 µs and 21.5 µs.
pub const SMALL_MATMUL_WORK: i64 = 1 << 19;

/// Runs MKL (libtorch's CPU BLAS and vector maths) single-threaded on the
/// calling thread while the guard lives, so tiny models are not dominated by
/// waking the other threads for every matmul (a 32×20×8 sgemm: 4.6 µs on
/// two threads, 1.6 µs on one). Other ops keep `train.threads`: ATen only
/// parallelises elementwise work above its own grain size anyway. MKL splits
/// a product over rows and columns, not the inner sum, so results are
/// bit-identical either way. A no-op when libtorch has no MKL.
pub struct SerialBlas {
    /// The setter and the thread-local count it replaced.
    set: Option<(MklSetLocal, i32)>,
}

/// `mkl_set_num_threads_local`; libtorch's MKL exports it with the Fortran
/// convention (argument by reference), under the C name as well.
type MklSetLocal = unsafe extern "C" fn(*const i32) -> i32;

impl SerialBlas {
    pub fn new() -> SerialBlas {
        // libtorch sets MKL's thread-local count itself when this thread
        // first asks for its thread count; make that happen before ours.
        let _ = tch::get_num_threads();
        let set = mkl_set_num_threads_local().map(|f| {
            // SAFETY: the symbol is MKL's, called with a valid pointer; it
            // returns the thread-local count it replaces.
            (f, unsafe { f(&1) })
        });
        SerialBlas { set }
    }
}

impl Default for SerialBlas {
    fn default() -> Self {
        SerialBlas::new()
    }
}

impl Drop for SerialBlas {
    fn drop(&mut self) {
        if let Some((f, before)) = self.set {
            // Back to what libtorch had set (`train.threads`) for this thread.
            // SAFETY: as in `new`.
            unsafe { f(&before) };
        }
    }
}

fn mkl_set_num_threads_local() -> Option<MklSetLocal> {
    #[cfg(target_os = "linux")]
    {
        let name = c"mkl_set_num_threads_local";
        // SAFETY: dlsym on the global namespace (libtorch is linked in);
        // a null result means no MKL.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if !p.is_null() {
            // SAFETY: the symbol has the signature of `MklSetLocal`.
            return Some(unsafe { std::mem::transmute::<*mut libc::c_void, MklSetLocal>(p) });
        }
    }
    None
}

/// The path of the loaded `libtorch_cuda` library, if this process loaded
/// one (a CUDA build of libtorch, whether or not a GPU is present).
pub fn libtorch_cuda_library() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libtorch_cuda.so"))
        })
        .map(str::to_string)
}

/// Reads of a device value back to the host made by the training loop
/// ([`read_f64`], [`read_i64`], [`read_f64s`]). On CUDA each one waits for
/// every kernel queued before it, so the loop reads on logged steps only
/// (tests/host_reads.rs counts them per step for each architecture family).
static HOST_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many host reads the training loop has made in this process.
pub fn host_reads() -> u64 {
    HOST_READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts a read made otherwise (a shape that depends on the values).
pub fn count_read() {
    HOST_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A scalar tensor's value on the host: one counted host read.
pub fn read_f64(t: &tch::Tensor) -> f64 {
    count_read();
    t.double_value(&[])
}

/// [`read_f64`] of an integer scalar.
pub fn read_i64(t: &tch::Tensor) -> i64 {
    count_read();
    t.int64_value(&[])
}

/// Every value of a 1-d tensor as f64s: one counted host read for all.
pub fn read_f64s(t: &tch::Tensor) -> Vec<f64> {
    count_read();
    let t = t.to_kind(tch::Kind::Double).to_device(Device::Cpu);
    Vec::<f64>::try_from(&t).expect("a 1-d numeric tensor")
}

/// A CPU tensor's integer value, where the tensor can only be on the CPU
/// (no device to wait for: not a host read).
pub fn cpu_i64(t: &tch::Tensor) -> i64 {
    debug_assert_eq!(t.device(), Device::Cpu, "cpu_i64 of a device tensor");
    t.int64_value(&[])
}

/// Rows on the host, on `device` for a step: on CUDA copied from pinned
/// (page-locked) memory without waiting (the copy is queued on the
/// device's stream, ahead of the kernels that read it; the pinned block
/// is not reused before the copy is done: PyTorch's caching host
/// allocator records it). Elsewhere (or already there) today's copy.
pub fn upload(t: &tch::Tensor, device: Device) -> tch::Tensor {
    match device {
        Device::Cuda(_) if t.device() == Device::Cpu => {
            // `_pin_memory`: `pin_memory`'s device argument (tch always
            // passes one) is deprecated and warns on every call.
            t.internal_pin_memory(device)
                .to_device_(device, t.kind(), true, false)
        }
        _ => t.to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loader-style environment array of `entries`, whose strings live
    /// for the process as the loader's do (`putenv` keeps the pointer).
    fn envp(entries: &[&str]) -> Vec<*mut libc::c_char> {
        let mut ptrs: Vec<_> = entries
            .iter()
            .map(|e| std::ffi::CString::new(*e).unwrap().into_raw())
            .collect();
        ptrs.push(std::ptr::null_mut());
        ptrs
    }

    fn entry(p: *mut libc::c_char) -> String {
        // SAFETY: a NUL-terminated string from `envp` or the static entry.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn omp_default_lends_a_harmless_slot_and_restore_puts_it_back() {
        let value = "restored-by-sae-test";
        let lent = format!("LENT_SLOT_TEST={value}");
        let mut ptrs = envp(&["OMP_NUM_THREADS=2", "SAE_X=1", &lent, "PATH=/bin"]);
        // SAFETY: a valid NULL-terminated array; no other test lends a slot.
        unsafe { default_omp_wait(ptrs.as_mut_ptr()) };
        // Not OMP_/SAE_ (read while loading): the first harmless one.
        let got: Vec<String> = ptrs[..4].iter().map(|&p| entry(p)).collect();
        assert_eq!(
            got,
            [
                "OMP_NUM_THREADS=2",
                "SAE_X=1",
                "GOMP_SPINCOUNT=10000",
                "PATH=/bin"
            ]
        );
        restore_env();
        assert_eq!(std::env::var("LENT_SLOT_TEST").as_deref(), Ok(value));
    }

    #[test]
    fn omp_default_leaves_a_chosen_policy() {
        for chosen in ["OMP_WAIT_POLICY=active", "GOMP_SPINCOUNT=5"] {
            let mut ptrs = envp(&["HOME=/root", chosen]);
            // SAFETY: as above.
            unsafe { default_omp_wait(ptrs.as_mut_ptr()) };
            assert_eq!(entry(ptrs[0]), "HOME=/root");
            assert_eq!(entry(ptrs[1]), chosen);
        }
    }

    #[test]
    fn spin_entry_names_the_default() {
        let entry = GOMP_SPINCOUNT_ENTRY.to_str().unwrap();
        assert_eq!(entry, format!("GOMP_SPINCOUNT={GOMP_SPINCOUNT}"));
    }

    /// The guard makes MKL single-threaded on this thread and gives back the
    /// count libtorch had set when it goes.
    #[test]
    fn serial_blas_sets_and_restores_mkl_threads() {
        let name = c"mkl_get_max_threads";
        // SAFETY: dlsym on the global namespace; null means no MKL.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if p.is_null() {
            println!("NOTE: libtorch has no MKL here; SerialBlas is a no-op, nothing to check");
            return;
        }
        // SAFETY: MKL's `int mkl_get_max_threads(void)`.
        let get = unsafe { std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> i32>(p) };
        let before = get();
        {
            let _g = SerialBlas::new();
            assert_eq!(get(), 1);
        }
        assert_eq!(get(), before);
    }

    /// Subnormals through a libtorch op run on its worker threads: kept on a
    /// fresh thread, flushed on one that called `flush_denormals` first
    /// (each thread starting parallel work gets its own OpenMP team, which
    /// inherits the thread's mode).
    #[test]
    fn flush_denormals_reaches_libtorch_workers() {
        use tch::{Kind, Tensor};
        assert!(f32::from_bits(0x1000).is_subnormal());
        let run = |flush: bool| {
            std::thread::spawn(move || {
                if flush && !flush_denormals() {
                    return None;
                }
                // Made from bits (a copy, no float arithmetic), then one
                // parallel op: with DAZ/FTZ on every worker, all zeros.
                let sub = vec![f32::from_bits(0x1000); 1 << 20];
                let t = Tensor::from_slice(&sub) * 2.0;
                Some(t.ne(0.0).sum(Kind::Int64).int64_value(&[]))
            })
            .join()
            .unwrap()
        };
        assert_eq!(run(false), Some(1 << 20), "subnormals kept by default");
        match run(true) {
            Some(n) => assert_eq!(n, 0, "{n} subnormals survived flush_denormals"),
            None => println!("flush_denormals_reaches_libtorch_workers: NOT RUN (not x86-64)"),
        }
    }
}
