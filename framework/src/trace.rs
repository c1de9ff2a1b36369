//! W3C trace context (`traceparent` and `tracestate`) propagation.
//!
//! A delivery whose headers carry a `traceparent` continues that trace: its span records
//! the trace id, and anything the handler publishes through [`crate::publisher`] carries
//! a `traceparent` with the same trace id and a new span id, and the delivery's
//! `tracestate` unchanged. A dead-letter copy keeps the original's, or continues the
//! delivery's trace when the original had none (feature `otel`). A delivery
//! without one starts a new trace. The ids are in the span fields `trace_id` and
//! `span_id`. With the `otel` feature and its layer installed, the spans are exported
//! over OTLP and the ids are those of the exported spans (see `otel`).

use std::fmt;

use rand::Rng;

/// The header name.
pub const TRACEPARENT: &str = "traceparent";
/// The header of vendor-specific trace data, passed on with the `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` passed on (W3C: 512 characters is what a receiver must be
/// able to take; longer ones may be cut).
const MAX_TRACESTATE_LEN: usize = 512;

/// A trace context: trace id, this span's id, and the sampled flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` that came with the trace (vendor entries, passed on as is).
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static CURRENT: DeliveryTrace;
}

/// The trace a handler runs in, as the task-local holds it. Every delivery without a
/// `traceparent` starts a new trace: its ids stay numbers until something asks for them
/// as text (a publish from the handler, [`TraceContext::current`], an enabled span), so a
/// delivery that needs none of it formats nothing.
#[derive(Debug, Clone)]
pub(crate) enum DeliveryTrace {
    /// A new trace (sampled), its ids not yet formatted.
    New {
        /// Not zero.
        trace_id: u128,
        /// Not zero.
        span_id: u64,
    },
    /// A trace context in text form (continued from a `traceparent`, or given). Boxed:
    /// every delivery's future holds a `DeliveryTrace`, most of them `New`, and the
    /// context's three strings would make each 80 bytes instead of 32.
    Given(Box<TraceContext>),
}

impl DeliveryTrace {
    /// A new trace with random ids.
    fn new_root() -> DeliveryTrace {
        let mut rng = rand::thread_rng();
        DeliveryTrace::New {
            trace_id: nonzero(|| rng.gen::<u128>()),
            span_id: nonzero(|| rng.gen::<u64>()),
        }
    }

    /// As a [`TraceContext`] (formats a new trace's ids).
    fn context(&self) -> TraceContext {
        match self {
            DeliveryTrace::New { trace_id, span_id } => TraceContext {
                trace_id: format!("{trace_id:032x}"),
                span_id: format!("{span_id:016x}"),
                flags: 1,
                tracestate: None,
            },
            DeliveryTrace::Given(context) => TraceContext::clone(context),
        }
    }

    /// Records the trace and span ids in `span`'s fields `trace_id` and `span_id`; a
    /// disabled span (no subscriber wants it) records nothing, and nothing is formatted.
    fn record_in(&self, span: &tracing::Span) {
        if span.is_disabled() {
            return;
        }
        match self {
            DeliveryTrace::New { trace_id, span_id } => {
                span.record(
                    "trace_id",
                    tracing::field::display(format_args!("{trace_id:032x}")),
                );
                span.record(
                    "span_id",
                    tracing::field::display(format_args!("{span_id:016x}")),
                );
            }
            DeliveryTrace::Given(context) => {
                span.record("trace_id", context.trace_id.as_str());
                span.record("span_id", context.span_id.as_str());
            }
        }
    }

    /// Runs `future` with this as the current trace (see [`TraceContext::current`]).
    pub(crate) fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        // Not an `async fn`: that would store `future` twice in the state machine.
        CURRENT.scope(self, future)
    }
}

/// The first value of `draw` that is not zero (an all-zero id is invalid).
fn nonzero<T: PartialEq + Default>(mut draw: impl FnMut() -> T) -> T {
    loop {
        let value = draw();
        if value != T::default() {
            return value;
        }
    }
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

/// `bytes` random bytes (at most 16) as lowercase hex, never all zero.
fn random_hex(bytes: usize) -> String {
    let bytes = bytes.clamp(1, 16);
    let mut rng = rand::thread_rng();
    let value = nonzero(|| rng.gen::<u128>() >> (128 - 8 * bytes as u32));
    format!("{value:0width$x}", width = bytes * 2)
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
            tracestate: None,
        })
    }

    /// The trace context of a message's headers: its `traceparent` with its
    /// `tracestate` (several `tracestate` lines are joined, as W3C says; one that is
    /// too long or not printable ASCII is dropped, the trace still continues).
    pub fn from_headers(headers: &async_nats::HeaderMap) -> Option<TraceContext> {
        let mut context = TraceContext::parse(headers.get(TRACEPARENT)?.as_str())?;
        let state = headers
            .get_all(TRACESTATE)
            .map(|v| v.as_str().trim())
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        context.tracestate = (!state.is_empty()
            && state.len() <= MAX_TRACESTATE_LEN
            && state.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .then_some(state);
        Some(context)
    }

    /// Sets `traceparent` (and `tracestate`, when the trace has one) on `headers`.
    pub fn insert_into(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(TRACEPARENT, self.to_string().as_str());
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.as_str());
        }
    }

    /// A new trace (sampled).
    pub fn new_root() -> TraceContext {
        DeliveryTrace::new_root().context()
    }

    /// A child in the same trace: same trace id and flags, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            flags: self.flags,
            tracestate: self.tracestate.clone(),
        }
    }

    /// The context of a delivery with these headers: a child of its `traceparent`, or a
    /// new root.
    pub fn for_delivery(headers: Option<&async_nats::HeaderMap>) -> TraceContext {
        delivery_trace(headers).context()
    }

    /// The context of the handler running now, if any.
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(DeliveryTrace::context).ok()
    }

    /// Runs `future` with `self` as the current context.
    pub fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        DeliveryTrace::Given(Box::new(self)).scope(future)
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
/// handler), else a new trace. With an OpenTelemetry layer (feature `otel`), the
/// exported span current now is the parent.
pub fn outgoing() -> TraceContext {
    current_outgoing().unwrap_or_else(TraceContext::new_root)
}

/// The context for a message that derives from one with `headers` (a dead-letter copy
/// that lacks the original's `traceparent`): like [`outgoing`] inside a trace, else a
/// child of the headers' `traceparent`; `None` when there is no trace to continue.
pub(crate) fn continuing(headers: &async_nats::HeaderMap) -> Option<TraceContext> {
    current_outgoing().or_else(|| TraceContext::from_headers(headers).map(|p| p.child()))
}

/// A child of the trace current now: the exported span's (feature `otel`, with its
/// layer), else the running handler's context.
fn current_outgoing() -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    if let Some(exported) = crate::otel::current() {
        return Some(exported);
    }
    TraceContext::current().map(|c| c.child())
}

/// The trace context of a delivery whose span is `span`: a child of the headers'
/// `traceparent` (or a new trace), recorded in the span's `trace_id` and `span_id`
/// fields. With an OpenTelemetry layer (feature `otel`) the exported span is that
/// child, with the sender's span as its remote parent.
pub(crate) fn continue_delivery(
    headers: Option<&async_nats::HeaderMap>,
    span: &tracing::Span,
) -> DeliveryTrace {
    #[cfg(feature = "otel")]
    let trace = {
        let parent = headers.and_then(TraceContext::from_headers);
        match crate::otel::start_span(span, parent.as_ref()) {
            Some(exported) => DeliveryTrace::Given(Box::new(exported)),
            None => parent.map_or_else(DeliveryTrace::new_root, |p| {
                DeliveryTrace::Given(Box::new(p.child()))
            }),
        }
    };
    #[cfg(not(feature = "otel"))]
    let trace = delivery_trace(headers);
    trace.record_in(span);
    trace
}

/// A child of the `traceparent` in `headers`, or a new trace (its ids not formatted).
fn delivery_trace(headers: Option<&async_nats::HeaderMap>) -> DeliveryTrace {
    // Most deliveries carry no headers at all: no lookup then.
    match headers
        .filter(|h| !h.is_empty())
        .and_then(TraceContext::from_headers)
    {
        Some(parent) => DeliveryTrace::Given(Box::new(parent.child())),
        None => DeliveryTrace::new_root(),
    }
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

    #[test]
    fn tracestate_travels_with_the_traceparent() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        headers.append(TRACESTATE, "congo=t61rcWkgMzE");
        headers.append(TRACESTATE, "rojo=00f067aa0ba902b7");
        let delivery = TraceContext::for_delivery(Some(&headers));
        assert_eq!(
            delivery.tracestate.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            "several lines are one list"
        );
        let mut out = async_nats::HeaderMap::new();
        delivery.child().insert_into(&mut out);
        assert_eq!(
            out.get(TRACESTATE).map(|v| v.as_str()),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let sent = TraceContext::parse(out.get(TRACEPARENT).expect("traceparent").as_str())
            .expect("valid");
        assert_eq!(sent.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");

        // Without a valid traceparent a tracestate means nothing; a hostile one is dropped.
        let mut alone = async_nats::HeaderMap::new();
        alone.insert(TRACESTATE, "congo=t61rcWkgMzE");
        assert_eq!(TraceContext::from_headers(&alone), None);
        headers.insert(TRACESTATE, "x=\u{7f}bad");
        let kept = TraceContext::from_headers(&headers).expect("the trace continues");
        assert_eq!(kept.tracestate, None);
        headers.insert(TRACESTATE, "a=".to_string() + &"b".repeat(600));
        assert_eq!(
            TraceContext::from_headers(&headers).and_then(|c| c.tracestate),
            None
        );
    }

    #[test]
    fn a_dead_letter_outside_a_handler_continues_the_originals_trace() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let copy = continuing(&headers).expect("a trace to continue");
        assert_eq!(copy.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(copy.span_id, "00f067aa0ba902b7");
        assert_eq!(
            continuing(&async_nats::HeaderMap::new()),
            None,
            "no trace, none started"
        );
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
