use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // libtorch errors surface as Rust panics inside tch; report them as one
    // line (exit 1), never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let first = msg.lines().next().unwrap_or(msg);
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
        Err(_) => ExitCode::from(1),
    }
}
