//! Why the console cannot start or stopped: [`ConsoleError`], jetworker's one error
//! shape with a [`ConsoleErrorKind`] to match on.

use std::fmt;

use jetworker::Error;

/// What kind of console failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleErrorKind {
    /// Asked to listen on a non-loopback address without a token.
    Insecure,
    /// The token cannot be used: its file cannot be read, or it is empty.
    Token,
    /// The listen address cannot be bound.
    Bind,
    /// Serving failed after the console started.
    Serve,
}

impl fmt::Display for ConsoleErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConsoleErrorKind::Insecure => "the console would be reachable without a token",
            ConsoleErrorKind::Token => "the console token cannot be used",
            ConsoleErrorKind::Bind => "the console cannot listen on its address",
            ConsoleErrorKind::Serve => "serving the console failed",
        })
    }
}

/// A console that cannot start or stopped with an error. Messages name addresses and
/// files, never the token.
pub type ConsoleError = Error<ConsoleErrorKind>;

/// An error of `kind` saying `message`, with no other cause.
pub(super) fn console_error(kind: ConsoleErrorKind, message: impl Into<String>) -> ConsoleError {
    ConsoleError::new(kind).with_message(message)
}
