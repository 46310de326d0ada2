//! Two kinds of failure: the user's input is wrong (exit 2) or we failed (exit 1).

use std::fmt;

/// An error caused by the user's input: a bad file, key, value or flag.
/// The CLI maps it to exit code 2; everything else is an internal failure (1).
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Builds a user error from a message.
pub fn user(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// `bail_user!("data.train: {path} does not exist")` returns a user error.
#[macro_export]
macro_rules! bail_user {
    ($($arg:tt)*) => {
        return Err($crate::error::user(format!($($arg)*)))
    };
}

/// Training stopped by a signal after checkpointing: exit `128 + signal`
/// (130 for SIGINT, 143 for SIGTERM), like a shell reports it.
#[derive(Debug)]
pub struct Interrupted {
    pub code: i32,
    pub msg: String,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Interrupted {}

/// Exit code for an error: `128 + signal` for [`Interrupted`], 2 when any
/// cause is a [`UserError`], else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(i) = err.chain().find_map(|c| c.downcast_ref::<Interrupted>()) {
        return i.code;
    }
    let user_io = |c: &(dyn std::error::Error + 'static)| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(crate::fsutil::is_user_io_error)
    };
    let out_of_memory =
        |c: &(dyn std::error::Error + 'static)| out_of_memory(&c.to_string()).is_some();
    if err
        .chain()
        .any(|c| c.is::<UserError>() || user_io(c) || out_of_memory(c))
    {
        2
    } else {
        1
    }
}

/// One line: the causes joined with ": ", outermost first. A libtorch
/// allocation failure among them is told in a few words (what could not be
/// allocated, what to change) instead of its C++ message and stack trace.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in err.chain() {
        let text = c.to_string();
        if let Some(oom) = out_of_memory(&text) {
            parts.push(oom);
            break;
        }
        parts.push(text);
    }
    parts.join(": ").replace('\n', " ")
}

/// What the user can change when memory runs out (training).
pub const MEMORY_REMEDY: &str =
    "lower model.d_hidden or train.batch_size, or set data.stream: true";

/// When `text` (an error's or a panic's message) says libtorch or the
/// allocator could not get memory: one line saying so, with the size when
/// the message gives it, and what to change. None for anything else.
pub fn out_of_memory(text: &str) -> Option<String> {
    const MARKS: [&str; 5] = [
        "alloc_cpu",
        "out of memory",
        "DefaultCPUAllocator: can't allocate memory",
        "DefaultCPUAllocator: not enough memory",
        "memory allocation of",
    ];
    if !MARKS.iter().any(|m| text.contains(m)) {
        return None;
    }
    // "... you tried to allocate 2560000000 bytes", "allocate memory: you
    // tried to allocate N bytes", Rust's "memory allocation of N bytes failed",
    // CUDA's "Tried to allocate 2.00 GiB".
    let bytes = ["allocate ", "allocation of "].iter().find_map(|key| {
        text.match_indices(key).find_map(|(i, _)| {
            let rest = &text[i + key.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().ok()?;
            rest[digits.len()..]
                .trim_start()
                .starts_with("bytes")
                .then_some(n)
        })
    });
    let what = match bytes {
        Some(n) => format!("could not allocate {}", human_bytes(n as f64)),
        None => "could not allocate memory".to_string(),
    };
    let device = if text.contains("CUDA") { "GPU " } else { "" };
    Some(format!(
        "out of {device}memory: libtorch {what}; {MEMORY_REMEDY}"
    ))
}

/// `2.6 GB`, `512.0 MB`: decimal units, one decimal.
pub fn human_bytes(n: f64) -> String {
    let (v, unit) = match n {
        n if n >= 1e12 => (n / 1e12, "TB"),
        n if n >= 1e9 => (n / 1e9, "GB"),
        n if n >= 1e6 => (n / 1e6, "MB"),
        n => (n / 1e3, "kB"),
    };
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A libtorch allocation failure as tch reports it (a `TchError::Torch`
    /// formatted with `{:?}` inside an unwrap panic: one "line" of kilobytes).
    const TORCH_OOM: &str = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at \
        alloc_cpu.cpp:127] data. DefaultCPUAllocator: not enough memory: you tried to allocate \
        2560000000 bytes.\\nException raised from alloc_cpu at /pytorch/c10/core/impl/alloc_cpu.cpp:127 \
        (most recent call first):\\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*, \
        std::string const&, void const*) + 0x55 (0x7f in libc10.so)\")";

    #[test]
    fn allocation_failures_become_one_short_user_error() {
        let oom = out_of_memory(TORCH_OOM).expect("recognised");
        assert_eq!(
            oom,
            format!("out of memory: libtorch could not allocate 2.6 GB; {MEMORY_REMEDY}")
        );
        assert!(out_of_memory(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 80 bytes"
        )
        .is_some());
        assert!(out_of_memory("memory allocation of 1048576 bytes failed")
            .unwrap()
            .contains("1.0 MB"));
        assert!(
            out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB")
                .unwrap()
                .starts_with("out of GPU memory")
        );
        assert!(out_of_memory("data.train: x.npy: no such file").is_none());
        // As an error's cause: exit 2, one short line keeping the context.
        let e = anyhow::anyhow!(TORCH_OOM.to_string()).context("initialising the model");
        assert_eq!(exit_code(&e), 2);
        let line = one_line(&e);
        assert_eq!(line, format!("initialising the model: {oom}"));
        assert!(!line.contains("frame #0"), "{line}");
        // Anything else stays an internal failure.
        assert_eq!(exit_code(&anyhow::anyhow!("index out of range")), 1);
    }
}
