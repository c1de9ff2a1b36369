//! Shared by the trace tests (`tracing.rs`, `otel.rs`): a worker whose handler forwards
//! every job as a follow-up through the `Publisher`, and traced publishes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use jetworker::testing::server::NatsServer;
use jetworker::{App, ConsumerStats, Context, Event, HandlerError, Publisher, RunError};
use jetworker_suite::Job;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{config, connect, wait_until};

/// Publishes a follow-up event for every job, from inside the handler.
pub async fn forward(job: Event<Job>, ctx: Context) -> Result<(), HandlerError> {
    let js = ctx.jetstream().ok_or("no jetstream")?.clone();
    Publisher::new(js)
        .publish(
            &format!("followup.{}", job.id),
            &format!("f-{}", job.id),
            &job.payload,
        )
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// The suite's `jobs` consumer run by [`forward`], with a `FOLLOWUP` stream keeping
/// what it publishes.
pub struct ForwardingWorker {
    /// A client of the test's own.
    pub client: async_nats::Client,
    /// Its JetStream context.
    pub js: jetstream::Context,
    stop: CancellationToken,
    worker: JoinHandle<Result<BTreeMap<String, Arc<ConsumerStats>>, RunError>>,
}

impl ForwardingWorker {
    /// Starts the worker on `server` and waits until its consumer exists.
    pub async fn start(server: &NatsServer) -> ForwardingWorker {
        let (client, js) = connect(&server.url()).await;
        js.create_stream(jetstream::stream::Config {
            name: "FOLLOWUP".into(),
            subjects: vec!["followup.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        let mut cfg = config(&server.url(), "");
        cfg.consumers[0].handler = "forward".into();
        let stop = CancellationToken::new();
        let app = App::new(()).handler("forward", forward);
        let worker = tokio::spawn(app.run_until(cfg, stop.clone()));
        wait_until(Duration::from_secs(10), "provisioned", || async {
            match js.get_stream("EVENTS").await {
                Ok(s) => s.consumer_info("jobs").await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        ForwardingWorker {
            client,
            js,
            stop,
            worker,
        }
    }

    /// Stops the worker and waits for it to end.
    pub async fn stop(self) {
        self.stop.cancel();
        self.worker.await.expect("join").expect("ran");
    }
}

/// Publishes `payload` to `subject` with a `traceparent` (and `tracestate`) when given,
/// and waits for the PubAck.
pub async fn publish_traced(
    js: &jetstream::Context,
    subject: &str,
    trace: Option<(&str, &str)>,
    payload: Vec<u8>,
) {
    let mut headers = async_nats::HeaderMap::new();
    if let Some((traceparent, tracestate)) = trace {
        headers.insert("traceparent", traceparent);
        if !tracestate.is_empty() {
            headers.insert("tracestate", tracestate);
        }
    }
    js.publish_with_headers(subject.to_string(), headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}
