//! The safety net in a shared account: two apps (or a rolling deploy onto a config with
//! one more consumer) provision the same advisory stream, and each app's safety net
//! handles only its own consumers' advisories: it never acks away another app's, and
//! never narrows the stream's capture to its own consumers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::{App, ADVISORY_STREAM, ADVISORY_SUBJECTS};
use jetworker_suite::{scripted, Job, Probe};

/// An app with one consumer `name` on stream `stream` (subjects `<prefix>.>`), and the
/// shared dead-letter stream `DLQ`.
fn app_config(url: &str, stream: &str, prefix: &str, name: &str) -> jetworker::Config {
    ConfigText::new(url)
        .worker(r#"shutdown_grace = "5s""#)
        .stream(stream, &[&format!("{prefix}.>")], "")
        .stream("DLQ", &["dlq.>"], "")
        .consumer(name, stream, "scripted", "")
        .load()
}

fn worker(config: jetworker::Config) -> InProcessWorker {
    let app = App::new(Arc::new(Probe::default())).handler("scripted", scripted);
    InProcessWorker::start(config, app)
}

fn advisory(stream: &str, consumer: &str, seq: u64) -> String {
    serde_json::json!({
        "type": "io.nats.jetstream.advisory.v1.max_deliver",
        "id": format!("test-{stream}-{seq}"), "timestamp": "2024-01-01T00:00:00Z",
        "stream": stream, "consumer": consumer, "stream_seq": seq, "deliveries": 5,
    })
    .to_string()
}

#[tokio::test]
async fn an_advisory_waits_for_the_app_that_owns_its_consumer() {
    let server = NatsServer::start().expect("server");
    let (_client, js) = connect(&server.url()).await;

    // App A runs alone first.
    let a = worker(app_config(&server.url(), "ORDERS", "orders", "billing"));
    wait_until(Duration::from_secs(10), "app A provisioned", || async {
        js.get_stream(ADVISORY_STREAM).await.is_ok() && js.get_stream("ORDERS").await.is_ok()
    })
    .await;

    // A message of app B's stream (B is not deployed yet) whose last delivery, as far
    // as the server is concerned, never settled.
    js.create_stream(jetworker::async_nats::jetstream::stream::Config {
        name: "CLICKS".into(),
        subjects: vec!["clicks.>".into()],
        ..Default::default()
    })
    .await
    .expect("B's stream");
    publish_jobs_to(&js, "clicks.7", &Job::ok(7)).await;
    js.publish(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.CLICKS.counter",
        advisory("CLICKS", "counter", 1).into(),
    )
    .await
    .expect("publish advisory")
    .await
    .expect("captured: the stream captures every consumer's advisories");
    // A's safety net has no business with it: it must neither dead-letter nor ack it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&js, "DLQ").await,
        0,
        "app A dead-lettered B's message"
    );

    // App B is deployed: its safety net finds the advisory waiting and files B's message.
    let b = worker(app_config(&server.url(), "CLICKS", "clicks", "counter"));
    wait_until(
        Duration::from_secs(20),
        "B's safety net dead letter",
        || async { count(&js, "DLQ").await == 1 },
    )
    .await;
    let letters = messages(&js, "DLQ").await;
    assert_eq!(letters[0].subject.as_str(), "dlq.counter");
    assert_eq!(
        header(&letters[0], dead_letter::CONSUMER).as_deref(),
        Some("counter")
    );
    assert_eq!(
        header(&letters[0], dead_letter::REASON).as_deref(),
        Some("abandoned")
    );

    // Neither app narrowed the capture to its own consumers.
    let mut advisories = js
        .get_stream(ADVISORY_STREAM)
        .await
        .expect("advisory stream");
    let info = advisories.info().await.expect("info");
    assert_eq!(info.config.subjects, [ADVISORY_SUBJECTS]);

    b.stop().await;
    a.stop().await;
}

/// Publishes `job` (MessagePack, as the suite's jobs) to `subject`, PubAcked.
async fn publish_jobs_to(js: &jetworker::async_nats::jetstream::Context, subject: &str, job: &Job) {
    let payload = rmp_serde::to_vec_named(job).expect("encode");
    js.publish(subject.to_string(), payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}
