//! Why provisioning failed: [`ProvisionError`], jetworker's one error shape with a
//! [`ProvisionErrorKind`] to match on, and the plan when it has conflicts.

use std::fmt;

use super::plan::Plan;
use crate::error::Error;

/// Why provisioning failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionErrorKind {
    /// A JetStream API request failed (timeout, no JetStream, permissions, ...), or what
    /// it was about disappeared meanwhile; the client's error, if any, is the source.
    Request,
    /// The plan has conflicts; nothing was applied. See [`ProvisionError::plan`].
    Conflicts,
}

impl fmt::Display for ProvisionErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProvisionErrorKind::Request => "a JetStream request failed",
            ProvisionErrorKind::Conflicts => "the plan has conflicts",
        })
    }
}

/// Why provisioning failed; the message says what was being done.
pub type ProvisionError = Error<ProvisionErrorKind>;

impl ProvisionError {
    /// The plan, when it has conflicts (nothing was applied).
    pub fn plan(&self) -> Option<&Plan> {
        self.detail::<Plan>()
    }

    /// Nothing was applied because `plan` has conflicts; the message shows the plan.
    pub(super) fn conflicts(plan: Plan) -> ProvisionError {
        ProvisionError::new(ProvisionErrorKind::Conflicts)
            .with_message(format!(
                "the plan has conflicts; nothing was changed:\n{plan}"
            ))
            .with_detail(plan)
    }
}

/// A request for `what` failed with the client's error `err`.
pub(super) fn request_error(
    what: impl Into<String>,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ProvisionError {
    ProvisionError::with_source(ProvisionErrorKind::Request, err).with_message(what)
}

/// What a request was for is not there any more (`why` says what went).
pub(super) fn vanished(what: impl fmt::Display, why: &str) -> ProvisionError {
    ProvisionError::new(ProvisionErrorKind::Request).with_message(format!("{what}: {why}"))
}
