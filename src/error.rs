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

/// Exit code for an error: 2 when any cause is a [`UserError`], else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|c| c.is::<UserError>()) {
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
