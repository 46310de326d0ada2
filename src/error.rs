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
    if err.chain().any(|c| c.is::<UserError>() || user_io(c)) {
        2
    } else {
        1
    }
}

/// One line: the causes joined with ": ", outermost first.
pub fn one_line(err: &anyhow::Error) -> String {
    let parts: Vec<String> = err.chain().map(|c| c.to_string()).collect();
    parts.join(": ").replace('\n', " ")
}
