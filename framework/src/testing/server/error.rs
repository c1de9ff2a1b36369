//! The launcher's error.

use std::io;

/// What can go wrong while finding, starting or restarting a server (for a test or for
/// the demo).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestServerError {
    /// No usable `nats-server` binary; the message says how to install one.
    #[error("{0}")]
    BinaryNotFound(String),
    /// `nats-server --version` could not be run or understood.
    #[error("cannot determine the nats-server version: {0}")]
    Version(String),
    /// An I/O operation of the launcher itself failed (directory, config file, spawn).
    #[error("{context}: {source}")]
    Io {
        /// What the launcher was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The options cannot work, the server exited, or it did not become ready in time;
    /// the message quotes its log.
    #[error("{0}")]
    Start(String),
}

impl TestServerError {
    pub(super) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
