//! OpenTelemetry export (jetworker's `otel` feature) against an OTLP/HTTP receiver this
//! test runs on loopback: the delivery's span is exported inside the sender's trace
//! (`traceparent` and `tracestate`), what the handler publishes names the exported span
//! as its parent, and so does the dead-letter copy of a message that came untraced.
//!
//! Run with: cargo test -p jetworker-suite --features otel --test otel

mod common;
mod trace_kit;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::{OtlpExporter, TraceContext};
use jetworker_suite::Job;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use trace_kit::{publish_traced, ForwardingWorker};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A span as the receiver got it: ids as lowercase hex, as in a `traceparent`.
#[derive(Debug, Clone)]
struct ExportedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    trace_state: String,
    service_name: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn exported(span: &Span, service_name: &str) -> ExportedSpan {
    ExportedSpan {
        name: span.name.clone(),
        trace_id: hex(&span.trace_id),
        span_id: hex(&span.span_id),
        parent_span_id: hex(&span.parent_span_id),
        trace_state: span.trace_state.clone(),
        service_name: service_name.to_string(),
    }
}

/// A minimal OTLP/HTTP receiver: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, answered 200 with an empty (valid) protobuf response.
/// Keeps every span it decodes.
async fn start_receiver() -> (String, Arc<Mutex<Vec<ExportedSpan>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let url = format!(
        "http://{}/v1/traces",
        listener.local_addr().expect("receiver address")
    );
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                // One request after another on a kept-alive connection.
                loop {
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
                        Ok(request) if request_line.starts_with("POST /v1/traces ") => {
                            let mut kept = kept.lock().expect("spans");
                            for resource in &request.resource_spans {
                                let service = resource
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|a| a.key == "service.name")
                                    .and_then(|a| a.value.as_ref())
                                    .map(|v| format!("{:?}", v.value))
                                    .unwrap_or_default();
                                for scope in &resource.scope_spans {
                                    kept.extend(scope.spans.iter().map(|s| exported(s, &service)));
                                }
                            }
                            "200 OK"
                        }
                        _ => "400 Bad Request",
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                    );
                    if stream
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_inside_the_senders_trace() {
    let (url, spans) = start_receiver().await;
    let exporter = OtlpExporter::with_endpoint("otel-test-worker", &url).expect("exporter");
    tracing_subscriber::registry()
        .with(exporter.layer())
        .try_init()
        .expect("the only subscriber of this test binary");

    let server = NatsServer::start().expect("server");
    let worker = ForwardingWorker::start(&server).await;
    let js = worker.js.clone();

    // One job that is handled and one JSON payload the MessagePack consumer dead-letters,
    // each in a trace of the sender's with vendor data in the tracestate; and one more
    // JSON payload sent outside any trace.
    let sender = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sender_of_bad = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let state = "vendor=abc,other=1";
    let job = rmp_serde::to_vec_named(&Job::ok(1)).expect("encode");
    publish_traced(&js, "jobs.1", Some((sender, state)), job).await;
    let json = br#"{"id": 2}"#.to_vec();
    publish_traced(&js, "jobs.2", Some((sender_of_bad, state)), json).await;
    publish_traced(&js, "jobs.3", None, br#"{"id": 3}"#.to_vec()).await;
    wait_until(
        Duration::from_secs(10),
        "follow-up and dead letters",
        || async { count(&js, "FOLLOWUP").await == 1 && count(&js, "DLQ").await == 2 },
    )
    .await;
    worker.stop().await;
    let flushed = tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .expect("join");
    flushed.expect("the spans reached the receiver");

    let spans = spans.lock().expect("spans").clone();
    let message_span = |trace_id: &str| {
        spans
            .iter()
            .find(|s| s.name == "message" && s.trace_id == trace_id)
            .unwrap_or_else(|| panic!("no message span in trace {trace_id}: {spans:#?}"))
            .clone()
    };
    let sender = TraceContext::parse(sender).expect("valid");
    let handled = message_span(&sender.trace_id);
    assert_eq!(
        handled.parent_span_id, sender.span_id,
        "the sender's span is the parent"
    );
    assert_eq!(handled.trace_state, "vendor=abc,other=1");
    assert!(
        handled.service_name.contains("otel-test-worker"),
        "{handled:?}"
    );

    // The follow-up names the exported span as its parent, in the same trace.
    let followup = &messages(&js, "FOLLOWUP").await[0];
    let sent =
        TraceContext::parse(&header(followup, "traceparent").expect("traceparent")).expect("valid");
    assert_eq!(sent.trace_id, sender.trace_id, "same trace");
    assert_eq!(sent.span_id, handled.span_id, "child of the exported span");
    assert_eq!(
        header(followup, "tracestate").as_deref(),
        Some("vendor=abc,other=1")
    );

    // A dead letter keeps the trace of the message it copies (a replay stays in the
    // sender's trace); the span that gave up is in that trace too.
    let letters = messages(&js, "DLQ").await;
    let letter_of = |subject: &str| {
        letters
            .iter()
            .find(|l| header(l, jetworker::headers::ORIGINAL_SUBJECT).as_deref() == Some(subject))
            .unwrap_or_else(|| panic!("no dead letter of {subject}"))
    };
    let bad = TraceContext::parse(sender_of_bad).expect("valid");
    let gave_up = message_span(&bad.trace_id);
    assert_eq!(gave_up.parent_span_id, bad.span_id);
    let letter = letter_of("jobs.2");
    assert_eq!(
        header(letter, "traceparent").as_deref(),
        Some(sender_of_bad)
    );
    assert_eq!(
        header(letter, "tracestate").as_deref(),
        Some("vendor=abc,other=1")
    );
    let error = header(letter, jetworker::headers::ERROR).expect("error header");
    assert!(
        error.contains("looks like JSON") && error.contains("codec = \"json\""),
        "the dead letter names the codec to use: {error}"
    );

    // A message sent outside any trace: its delivery's span is a root, and the copy
    // names that exported span as its parent.
    let root = spans
        .iter()
        .find(|s| s.name == "message" && s.parent_span_id.is_empty())
        .unwrap_or_else(|| panic!("no root message span: {spans:#?}"));
    let copy = TraceContext::parse(
        &header(letter_of("jobs.3"), "traceparent").expect("a traceparent added"),
    )
    .expect("valid");
    assert_eq!(copy.trace_id, root.trace_id, "the delivery's trace");
    assert_eq!(copy.span_id, root.span_id, "child of the span that gave up");
}
