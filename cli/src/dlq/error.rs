//! Why a `dlq` operation failed: [`DlqError`], jetworker's one error shape with a
//! [`DlqErrorKind`] to match on.

use std::fmt;

use jetworker::Error;

/// What kind of `dlq` failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqErrorKind {
    /// No stream of the config captures a dead-letter subject, or not the one named.
    NoDeadLetterStream,
    /// The selection cannot be used (an ambiguous sequence, an unknown reason or time).
    InvalidSelection,
    /// No message with that sequence is stored on a dead-letter subject.
    NotFound,
    /// The message lacks the dead-letter headers (no original subject to replay to).
    NotADeadLetter,
    /// The dead letter does not hold the original's payload (too large to copy, or the
    /// original was gone): replaying it would republish something else; it is kept.
    PayloadMissing,
    /// A JetStream request failed (unreachable, timed out, refused).
    Request,
    /// Republishing a dead letter failed; it was kept in the dead-letter stream.
    Publish,
}

impl fmt::Display for DlqErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DlqErrorKind::NoDeadLetterStream => "no dead-letter stream",
            DlqErrorKind::InvalidSelection => "the selection cannot be used",
            DlqErrorKind::NotFound => "no such dead letter",
            DlqErrorKind::NotADeadLetter => "not a dead letter",
            DlqErrorKind::PayloadMissing => "the dead letter does not hold the original payload",
            DlqErrorKind::Request => "a JetStream request failed",
            DlqErrorKind::Publish => "republishing the dead letter failed",
        })
    }
}

/// A `dlq` operation that failed. The message names streams, sequences and subjects,
/// never a credential; the client's error, if any, is the source.
pub type DlqError = Error<DlqErrorKind>;

/// An error of `kind` saying `message`, with no other cause.
pub(super) fn dlq_error(kind: DlqErrorKind, message: impl Into<String>) -> DlqError {
    DlqError::new(kind).with_message(message)
}

/// A request for `what` failed with the client's error `err`.
pub(super) fn request(
    what: impl fmt::Display,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DlqError {
    DlqError::with_source(DlqErrorKind::Request, err).with_message(what.to_string())
}
