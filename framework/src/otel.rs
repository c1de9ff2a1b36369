//! OpenTelemetry export (feature `otel`): the per-message spans go to an OTLP collector
//! over OTLP/HTTP (protobuf), and join the traces of whoever published the messages.
//!
//! [`OtlpExporter`] owns the SDK's tracer provider (a batch exporter on its own thread)
//! and hands out a `tracing` layer for the application's subscriber. With that layer
//! installed:
//!
//! - a delivery's span (`message`) has the delivery's `traceparent` (and `tracestate`) as
//!   its remote parent, so it is exported inside the sender's trace;
//! - what a handler publishes through [`Publisher`](crate::Publisher) carries a
//!   `traceparent` naming the exported span that was current (the delivery's, or a span
//!   the handler opened inside it) and the trace's `tracestate`, so its consumers' spans
//!   become children of it; a dead-letter copy of a message that came without a
//!   `traceparent` names the delivery's exported span the same way (one that came with
//!   it keeps it: the copy, and its replay, stay in the sender's trace);
//! - the `trace_id` and `span_id` fields of the logs are those of the exported spans.
//!
//! Without the layer (or without the feature) the same headers flow with ids of
//! jetworker's own, and nothing is exported.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::error::Error;
use crate::trace::TraceContext;

/// Why the exporter could not be built or flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtelErrorKind {
    /// The OTLP exporter could not be built (an endpoint that is not a URL, in the
    /// argument or in `OTEL_EXPORTER_OTLP_*`).
    Exporter,
    /// Flushing or shutting down did not complete (the collector did not answer in time).
    Flush,
}

impl fmt::Display for OtelErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OtelErrorKind::Exporter => "cannot build the OTLP exporter",
            OtelErrorKind::Flush => "cannot flush the exported spans",
        })
    }
}

/// An OpenTelemetry export error; the SDK's error is the source.
pub type OtelError = Error<OtelErrorKind>;

/// Exports spans to an OTLP collector over HTTP (protobuf bodies, `POST .../v1/traces`).
///
/// Keep it alive for the life of the process and call [`OtlpExporter::shutdown`] at
/// the end: spans are sent in batches, and shutting down sends what is left.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // OTEL_EXPORTER_OTLP_ENDPOINT (default http://localhost:4318) says where.
/// let exporter = jetworker::OtlpExporter::new("orders-worker")?;
/// tracing_subscriber::registry()
///     .with(exporter.layer())
///     .with(tracing_subscriber::fmt::layer())
///     .init();
/// // ... run the worker ...
/// exporter.shutdown()?;
/// # Ok(())
/// # }
/// ```
pub struct OtlpExporter {
    provider: SdkTracerProvider,
}

impl fmt::Debug for OtlpExporter {
    // Not the provider's own: its exporter's settings may hold the collector's auth
    // headers (`OTEL_EXPORTER_OTLP_HEADERS`), and secrets never reach a Debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporter").finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// An exporter to the endpoint the OpenTelemetry environment variables name
    /// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` +
    /// `/v1/traces`, else `http://localhost:4318/v1/traces`; `OTEL_EXPORTER_OTLP_HEADERS`
    /// and `..._TIMEOUT` too). `service_name` is the resource's `service.name` unless
    /// `OTEL_SERVICE_NAME` sets one.
    pub fn new(service_name: &str) -> Result<OtlpExporter, OtelError> {
        OtlpExporter::build(service_name, None)
    }

    /// An exporter to `traces_url`, the collector's full traces URL
    /// (`http://127.0.0.1:4318/v1/traces`), whatever the environment says.
    pub fn with_endpoint(service_name: &str, traces_url: &str) -> Result<OtlpExporter, OtelError> {
        OtlpExporter::build(service_name, Some(traces_url))
    }

    fn build(service_name: &str, traces_url: Option<&str>) -> Result<OtlpExporter, OtelError> {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            // Every network wait has a timeout: a collector that hangs costs one batch.
            .with_timeout(Duration::from_secs(10));
        if let Some(url) = traces_url {
            builder = builder.with_endpoint(url);
        }
        let exporter = builder.build().map_err(|e| {
            OtelError::with_source(OtelErrorKind::Exporter, e)
                .with_message("cannot build the OTLP/HTTP span exporter")
        })?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(OtlpExporter { provider })
    }

    /// The `tracing` layer that turns spans into exported OpenTelemetry spans. Add it to
    /// the application's subscriber (`tracing_subscriber::registry().with(...)`).
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, Tracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("jetworker"))
    }

    /// Sends the spans finished so far, blocking the calling thread until the collector
    /// answered (each request is bounded by the 10 s export timeout).
    pub fn flush(&self) -> Result<(), OtelError> {
        self.provider.force_flush().map_err(|e| {
            OtelError::with_source(OtelErrorKind::Flush, e)
                .with_message("cannot flush the spans to the OTLP collector")
        })
    }

    /// Sends what is left and stops the exporter's thread. It blocks the calling thread
    /// until the collector answered, at most 5 s (a `Flush` error after that).
    pub fn shutdown(self) -> Result<(), OtelError> {
        self.provider.shutdown().map_err(|e| {
            OtelError::with_source(OtelErrorKind::Flush, e)
                .with_message("cannot send the last spans to the OTLP collector")
        })
    }
}

/// Makes `parent` (a delivery's trace context) the remote parent of `span`, and returns
/// the context of the exported span; `None` when no OpenTelemetry layer records `span`.
pub(crate) fn start_span(
    span: &tracing::Span,
    parent: Option<&TraceContext>,
) -> Option<TraceContext> {
    if let Some(parent) = parent.and_then(remote_span_context) {
        // An error means no OpenTelemetry layer records the span: nothing to link.
        span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent))
            .ok()?;
    }
    trace_context_of(span)
}

/// The exported span current now (a handler's own span, or the delivery's), if any.
pub(crate) fn current() -> Option<TraceContext> {
    trace_context_of(&tracing::Span::current())
}

fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    let state = span_context.trace_state().header();
    Some(TraceContext {
        trace_id: span_context.trace_id().to_string(),
        span_id: span_context.span_id().to_string(),
        flags: span_context.trace_flags().to_u8(),
        tracestate: (!state.is_empty()).then_some(state),
    })
}

fn remote_span_context(parent: &TraceContext) -> Option<SpanContext> {
    let state = match &parent.tracestate {
        // A tracestate the SDK does not accept is dropped; the traceparent still joins.
        Some(state) => TraceState::from_str(state).unwrap_or_default(),
        None => TraceState::default(),
    };
    Some(SpanContext::new(
        TraceId::from_hex(&parent.trace_id).ok()?,
        SpanId::from_hex(&parent.span_id).ok()?,
        TraceFlags::new(parent.flags),
        true,
        state,
    ))
}
