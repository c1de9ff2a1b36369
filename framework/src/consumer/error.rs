//! A consumer's own error: why it cannot pull right now (logged, then retried).

use crate::error::Error;

/// Why a consumer cannot pull right now (logged, then retried after a backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsumerErrorKind {
    /// Looking up the stream or the consumer failed.
    Lookup,
    /// The stream does not exist.
    StreamMissing,
    /// The consumer was missing and recreating it failed.
    Recreate,
    /// The inbox subscription of a pull session failed.
    Subscribe,
}

impl std::fmt::Display for ConsumerErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsumerErrorKind::Lookup => "looking up the stream or consumer failed",
            ConsumerErrorKind::StreamMissing => "the stream does not exist",
            ConsumerErrorKind::Recreate => "recreating the consumer failed",
            ConsumerErrorKind::Subscribe => "subscribing to the pull inbox failed",
        })
    }
}

/// A consumer's own error; the runtime logs it and retries.
pub(crate) type ConsumerError = Error<ConsumerErrorKind>;
