//! The launcher's error: [`TestServerError`], jetworker's error shape with a
//! [`TestServerErrorKind`].

use std::fmt;
use std::io;

use crate::error::Error;

/// What went wrong while finding, starting or restarting a server (for a test or for
/// the demo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TestServerErrorKind {
    /// No usable `nats-server` binary; the message says how to install one.
    BinaryNotFound,
    /// `nats-server --version` could not be run or understood.
    Version,
    /// An I/O operation of the launcher itself failed (directory, config file, spawn).
    Io,
    /// The options cannot work, the server exited, or it did not become ready in time;
    /// the message quotes its log.
    Start,
}

impl fmt::Display for TestServerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TestServerErrorKind::BinaryNotFound => "no nats-server binary found",
            TestServerErrorKind::Version => "cannot determine the nats-server version",
            TestServerErrorKind::Io => "the launcher's I/O failed",
            TestServerErrorKind::Start => "the nats-server did not start",
        })
    }
}

/// The launcher's error; match on [`Error::kind`].
pub type TestServerError = Error<TestServerErrorKind>;

impl Error<TestServerErrorKind> {
    /// An I/O error of the launcher while doing `context` ("creating /tmp/x").
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::with_source(TestServerErrorKind::Io, source).with_message(context)
    }

    /// No binary: `message` says where it looked and how to install one.
    pub(crate) fn binary_not_found(message: impl Into<String>) -> Self {
        Error::new(TestServerErrorKind::BinaryNotFound).with_message(message)
    }

    /// The version could not be read: `message` says why.
    pub(crate) fn version(message: impl Into<String>) -> Self {
        Error::new(TestServerErrorKind::Version).with_message(format!(
            "cannot determine the nats-server version: {}",
            message.into()
        ))
    }

    /// The server did not start or become ready: `message` says why, with its log.
    pub(crate) fn start(message: impl Into<String>) -> Self {
        Error::new(TestServerErrorKind::Start).with_message(message)
    }
}
