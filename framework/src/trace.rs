//! W3C trace context (`traceparent`) propagation.
//!
//! A delivery whose headers carry a `traceparent` continues that trace: its span records
//! the trace id, and anything the handler publishes through [`crate::publisher`] carries
//! a `traceparent` with the same trace id and a new span id. A delivery without one
//! starts a new trace. Exporting spans (OpenTelemetry) is left to the application's
//! `tracing` subscriber; the ids are in the span fields `trace_id` and `span_id`.

use std::fmt;

use rand::Rng;

/// The header name.
pub const TRACEPARENT: &str = "traceparent";

/// A trace context: trace id, this span's id, and the sampled flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// `len` lowercase hex digits.
fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `len` lowercase hex digits, not all zero (an id).
fn is_hex(s: &str, len: usize) -> bool {
    is_lower_hex(s, len) && s.bytes().any(|b| b != b'0')
}

/// `bytes` random bytes (at most 16) as lowercase hex, never all zero. One random
/// draw and one allocation: this runs for every delivery.
fn random_hex(bytes: usize) -> String {
    let bytes = bytes.clamp(1, 16);
    let mut rng = rand::thread_rng();
    loop {
        let value: u128 = rng.gen::<u128>() >> (128 - 8 * bytes as u32);
        if value != 0 {
            return format!("{value:0width$x}", width = bytes * 2);
        }
    }
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` when it is not valid.
    ///
    /// Version `00` must have exactly four fields. As W3C Trace Context asks, a later
    /// version is read by its first four fields (anything after them is ignored) so a
    /// newer sender's trace still continues; version `ff` is invalid. Only the sampled
    /// flag is kept from a later version, since its other flag bits may mean anything.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if !is_lower_hex(version, 2) || version == "ff" {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if !is_hex(trace_id, 32) || !is_hex(span_id, 16) || !is_lower_hex(flags, 2) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceContext {
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            flags: if version == "00" { flags } else { flags & 1 },
        })
    }

    /// A new trace (sampled).
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            flags: 1,
        }
    }

    /// A child in the same trace: same trace id and flags, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            flags: self.flags,
        }
    }

    /// The context of a delivery with these headers: a child of its `traceparent`, or a
    /// new root.
    pub fn for_delivery(headers: Option<&async_nats::HeaderMap>) -> TraceContext {
        headers
            .and_then(|h| h.get(TRACEPARENT))
            .and_then(|v| TraceContext::parse(v.as_str()))
            .map(|parent| parent.child())
            .unwrap_or_else(TraceContext::new_root)
    }

    /// The context of the handler running now, if any.
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(|c| c.clone()).ok()
    }

    /// Runs `future` with `self` as the current context.
    pub fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        // Not an `async fn`: that would store `future` twice in the state machine.
        CURRENT.scope(self, future)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The `traceparent` for an outgoing message: a child of the current context (inside a
/// handler), else a new trace.
pub fn outgoing() -> TraceContext {
    TraceContext::current()
        .map(|c| c.child())
        .unwrap_or_else(TraceContext::new_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(v).expect("valid");
        assert_eq!(c.to_string(), v);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let c = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-the-future-holds",
        )
        .expect("a later version continues the trace");
        assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id, "00f067aa0ba902b7");
        assert_eq!(c.flags, 1, "only the sampled flag is known");
        assert_eq!(
            c.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "we speak version 00"
        );
    }

    #[test]
    fn random_ids_have_their_length_and_are_hex() {
        for _ in 0..200 {
            let c = TraceContext::new_root();
            assert!(is_hex(&c.trace_id, 32), "{}", c.trace_id);
            assert!(is_hex(&c.span_id, 16), "{}", c.span_id);
        }
        assert_ne!(random_hex(16), random_hex(16));
    }

    #[test]
    fn child_keeps_the_trace() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert!(TraceContext::parse(&child.to_string()).is_some());
    }

    #[tokio::test]
    async fn outgoing_follows_the_current_context() {
        let root = TraceContext::new_root();
        let trace_id = root.trace_id.clone();
        let inside = root.scope(async { outgoing() }).await;
        assert_eq!(inside.trace_id, trace_id);
        assert_ne!(outgoing().trace_id, trace_id, "outside: a new trace");
    }
}
