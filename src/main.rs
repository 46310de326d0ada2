use clap::Parser;
use std::process::ExitCode;

/// A panic's message (tch reports libtorch errors as panics).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// Runs before any library's constructor, so libgomp (loaded with libtorch)
/// reads the wait policy chosen here; see `sae::device::default_omp_wait`.
#[used]
#[link_section = ".preinit_array"]
static OMP_WAIT: extern "C" fn(i32, *mut *mut libc::c_char, *mut *mut libc::c_char) = {
    extern "C" fn set(_argc: i32, _argv: *mut *mut libc::c_char, envp: *mut *mut libc::c_char) {
        // SAFETY: called by the loader with its own environment array.
        unsafe { sae::device::default_omp_wait(envp) }
    }
    set
};

fn main() -> ExitCode {
    sae::device::restore_env();
    // libtorch errors surface as Rust panics inside tch; report them as one
    // line, never a backtrace: an allocation failure is the user's to fix
    // (exit 2, what to change), anything else an internal error (exit 1).
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_text(info.payload());
        if let Some(oom) = sae::error::out_of_memory(msg) {
            eprintln!("sae: error: {oom}");
            return;
        }
        // tch's errors are Debug-formatted: their newlines (before the C++
        // stack trace) are the two characters `\n`.
        let first = msg.lines().next().unwrap_or(msg);
        let first = first.split("\\n").next().unwrap_or(first);
        eprintln!("sae: internal error: {first}");
    }));
    sae::device::tune_allocator();
    let cli = sae::cli::Cli::parse();
    // Before libtorch starts threads: they inherit the mode (see there).
    if matches!(
        cli.command,
        sae::cli::Command::Train(_) | sae::cli::Command::Sweep(_)
    ) && std::env::var_os("SAE_KEEP_SUBNORMALS").is_none()
    {
        sae::device::flush_denormals();
    }
    match std::panic::catch_unwind(|| sae::cli::run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            let interrupted = e.chain().any(|c| c.is::<sae::error::Interrupted>());
            let prefix = if interrupted { "sae: " } else { "sae: error: " };
            eprintln!("{prefix}{}", sae::error::one_line(&e));
            ExitCode::from(sae::error::exit_code(&e) as u8)
        }
        Err(payload) => match sae::error::out_of_memory(panic_text(payload.as_ref())) {
            Some(_) => ExitCode::from(2),
            None => ExitCode::from(1),
        },
    }
}
