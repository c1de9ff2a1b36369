//! The decision: what to do with a delivery given what happened to it. A pure function,
//! tested as a table (see `DESIGN.md`, "The decision").

use std::fmt;
use std::time::Duration;

/// What happened when the framework tried to process one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// The handler returned `Ok`.
    Succeeded,
    /// The handler failed with an error worth retrying (the default for `?`).
    Transient(String),
    /// The handler failed and asked for this retry delay.
    RetryAfter(Duration, String),
    /// The handler failed in a way retrying cannot fix.
    Permanent(String),
    /// The payload did not decode into the handler's type.
    Undecodable(String),
    /// The message exceeded the consumer's size limit (`size`, `limit` in bytes).
    TooLarge {
        /// Message size: payload plus headers.
        size: usize,
        /// The consumer's limit.
        limit: usize,
    },
    /// The handler panicked.
    Panicked(String),
    /// The handler ran past its timeout and was cancelled.
    TimedOut(Duration),
}

/// Why a message went to the dead-letter stream. The wire form (`as_str`) is stable:
/// it is stored in the `Jetworker-Reason` header and used by `dlq` filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Every allowed delivery failed.
    Exhausted,
    /// The handler said retrying cannot help.
    Permanent,
    /// The payload did not decode.
    Decode,
    /// The payload exceeded the size limit.
    TooLarge,
    /// The last allowed attempt panicked.
    Panic,
    /// The last allowed attempt timed out.
    Timeout,
    /// The last delivery never settled (worker killed, handler hung); found by the safety net.
    Abandoned,
}

impl Reason {
    /// Every reason, for metrics and filters.
    pub const ALL: [Reason; 7] = [
        Reason::Exhausted,
        Reason::Permanent,
        Reason::Decode,
        Reason::TooLarge,
        Reason::Panic,
        Reason::Timeout,
        Reason::Abandoned,
    ];

    /// The stable wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Exhausted => "exhausted",
            Reason::Permanent => "permanent",
            Reason::Decode => "decode",
            Reason::TooLarge => "too_large",
            Reason::Panic => "panic",
            Reason::Timeout => "timeout",
            Reason::Abandoned => "abandoned",
        }
    }

    /// Parses the wire form.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledge: done.
    Ack,
    /// Negative-acknowledge: redeliver after this delay.
    Nak(Duration),
    /// Copy to the dead-letter subject, then terminate the original.
    DeadLetter {
        /// Why.
        reason: Reason,
        /// The error text to record.
        error: String,
    },
}

impl Outcome {
    /// Short word for logs and metrics: ack, retry, dead_letter.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Nak(_) => "retry",
            Outcome::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// What the decision needs to know about the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Deliveries allowed (at least 1).
    pub max_deliver: u64,
    /// Delay after failed attempt n is `schedule[n-1]`, the last entry past the end.
    pub schedule: Vec<Duration>,
}

impl RetrySchedule {
    /// The delay before the next delivery after attempt `attempt` (1-based) failed.
    pub fn delay_after(&self, attempt: u64) -> Duration {
        let Some(last) = self.schedule.last() else {
            return Duration::from_secs(1);
        };
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        *self.schedule.get(index).unwrap_or(last)
    }
}

/// Decides how to settle a delivery. `attempt` is the server's delivery count (1-based).
pub fn decide(attempted: &Attempted, attempt: u64, policy: &RetrySchedule) -> Outcome {
    let last = attempt >= policy.max_deliver;
    let retry_or = |reason: Reason, error: String| {
        if last {
            Outcome::DeadLetter { reason, error }
        } else {
            Outcome::Nak(policy.delay_after(attempt))
        }
    };
    match attempted {
        Attempted::Succeeded => Outcome::Ack,
        Attempted::Transient(e) => retry_or(Reason::Exhausted, e.clone()),
        Attempted::RetryAfter(delay, e) => {
            if last {
                Outcome::DeadLetter {
                    reason: Reason::Exhausted,
                    error: e.clone(),
                }
            } else {
                Outcome::Nak(*delay)
            }
        }
        Attempted::Permanent(e) => Outcome::DeadLetter {
            reason: Reason::Permanent,
            error: e.clone(),
        },
        Attempted::Undecodable(e) => Outcome::DeadLetter {
            reason: Reason::Decode,
            error: e.clone(),
        },
        Attempted::TooLarge { size, limit } => Outcome::DeadLetter {
            reason: Reason::TooLarge,
            error: format!(
                "message of {size} bytes (payload and headers) exceeds the limit of {limit} bytes"
            ),
        },
        Attempted::Panicked(e) => retry_or(Reason::Panic, format!("handler panicked: {e}")),
        Attempted::TimedOut(after) => retry_or(
            Reason::Timeout,
            format!(
                "handler timed out after {}",
                humantime::format_duration(*after)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetrySchedule {
        RetrySchedule {
            max_deliver: 3,
            schedule: vec![Duration::from_secs(1), Duration::from_secs(10)],
        }
    }

    /// The expected settlement, compact for the table.
    #[derive(Debug, PartialEq)]
    enum Want {
        Ack,
        Nak(u64),
        Dead(Reason),
    }

    #[test]
    fn the_outcome_table() {
        use Want::*;
        let t = |s: &str| s.to_string();
        let table = vec![
            (Attempted::Succeeded, 1, Ack),
            (Attempted::Succeeded, 3, Ack),
            (Attempted::Transient(t("x")), 1, Nak(1)),
            (Attempted::Transient(t("x")), 2, Nak(10)),
            (Attempted::Transient(t("x")), 3, Dead(Reason::Exhausted)),
            (
                Attempted::RetryAfter(Duration::from_secs(7), t("x")),
                1,
                Nak(7),
            ),
            (
                Attempted::RetryAfter(Duration::from_secs(7), t("x")),
                3,
                Dead(Reason::Exhausted),
            ),
            (Attempted::Permanent(t("x")), 1, Dead(Reason::Permanent)),
            (Attempted::Permanent(t("x")), 3, Dead(Reason::Permanent)),
            (Attempted::Undecodable(t("x")), 1, Dead(Reason::Decode)),
            (
                Attempted::TooLarge { size: 9, limit: 1 },
                1,
                Dead(Reason::TooLarge),
            ),
            (Attempted::Panicked(t("x")), 1, Nak(1)),
            (Attempted::Panicked(t("x")), 3, Dead(Reason::Panic)),
            (Attempted::TimedOut(Duration::from_secs(5)), 2, Nak(10)),
            (
                Attempted::TimedOut(Duration::from_secs(5)),
                3,
                Dead(Reason::Timeout),
            ),
            // A server that delivered more than max_deliver (config lowered meanwhile).
            (Attempted::Transient(t("x")), 9, Dead(Reason::Exhausted)),
        ];
        for (attempted, attempt, expected) in table {
            let got = match decide(&attempted, attempt, &policy()) {
                Outcome::Ack => Ack,
                Outcome::Nak(d) => Nak(d.as_secs()),
                Outcome::DeadLetter { reason, .. } => Dead(reason),
            };
            assert_eq!(got, expected, "{attempted:?} at attempt {attempt}");
        }
    }

    #[test]
    fn schedule_past_its_end_reuses_the_last_delay() {
        let p = RetrySchedule {
            max_deliver: 10,
            schedule: vec![Duration::from_secs(1), Duration::from_secs(5)],
        };
        assert_eq!(p.delay_after(1), Duration::from_secs(1));
        assert_eq!(p.delay_after(2), Duration::from_secs(5));
        assert_eq!(p.delay_after(8), Duration::from_secs(5));
    }

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn error_text_is_kept() {
        match decide(&Attempted::Permanent("bad card".into()), 1, &policy()) {
            Outcome::DeadLetter { error, .. } => assert_eq!(error, "bad card"),
            other => panic!("{other:?}"),
        }
    }
}
