//! The publisher against a real nats-server: typed publish with PubAck, deduplication by
//! message id, retries across a server restart, permanent errors at once, pipelining.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::{PublishErrorKind, Publisher, RetryPolicy};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Click {
    id: String,
    page: String,
}

async fn setup(server: &NatsServer) -> jetstream::Context {
    let (_c, js) = connect(&server.url()).await;
    js.create_stream(jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        max_message_size: 2048,
        ..Default::default()
    })
    .await
    .expect("stream");
    js
}

#[tokio::test]
async fn typed_publish_is_stored_once_per_message_id() {
    let server = NatsServer::start().expect("server");
    let js = setup(&server).await;
    let publisher = Publisher::new(js.clone());
    let click = Click {
        id: "e-1".into(),
        page: "/home".into(),
    };
    let first = publisher
        .publish("events.click", &click.id, &click)
        .await
        .expect("publish");
    assert!(!first.duplicate);
    let again = publisher
        .publish("events.click", &click.id, &click)
        .await
        .expect("publish again");
    assert!(
        again.duplicate,
        "same message id within the window is a duplicate"
    );
    assert_eq!(count(&js, "EVENTS").await, 1);
    let stored = messages(&js, "EVENTS").await;
    let decoded: Click = rmp_serde::from_slice(&stored[0].payload).expect("msgpack");
    assert_eq!(decoded, click);
    assert_eq!(header(&stored[0], "Nats-Msg-Id").as_deref(), Some("e-1"));
}

#[tokio::test]
async fn transient_failures_are_retried_across_a_server_restart() {
    let mut server = NatsServer::start().expect("server");
    let js = setup(&server).await;
    let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
        deadline: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(1),
        ..RetryPolicy::default()
    });
    server.kill();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        server.restart().expect("restart");
        server
    });
    let started = Instant::now();
    let click = Click {
        id: "e-2".into(),
        page: "/cart".into(),
    };
    let ack = publisher
        .publish("events.click", &click.id, &click)
        .await
        .expect("retried until the server was back");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it had to wait for the server"
    );
    assert_eq!(ack.stream, "EVENTS");
    let _server = restarter.join().expect("restarter");
    assert_eq!(count(&js, "EVENTS").await, 1);
}

#[tokio::test]
async fn permanent_failures_return_at_once_and_deadlines_are_kept() {
    let server = NatsServer::start().expect("server");
    let js = setup(&server).await;
    let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
        deadline: Duration::from_secs(2),
        ack_timeout: Duration::from_millis(500),
        ..RetryPolicy::default()
    });
    // Larger than the stream's max_message_size: the server refuses it for good.
    let started = Instant::now();
    let big = Click {
        id: "e-3".into(),
        page: "x".repeat(4096),
    };
    let err = publisher
        .publish("events.click", &big.id, &big)
        .await
        .expect_err("too big");
    assert_eq!(err.kind(), PublishErrorKind::Rejected, "{err}");
    assert_eq!(err.attempts(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));

    // No stream captures the subject: retried as transient until the deadline, then a clear error.
    let started = Instant::now();
    let err = publisher
        .publish(
            "nowhere.click",
            "e-4",
            &Click {
                id: "e-4".into(),
                page: "/".into(),
            },
        )
        .await
        .expect_err("no stream");
    assert_eq!(err.kind(), PublishErrorKind::DeadlineExceeded, "{err}");
    assert!(err.attempts() > 1);
    // Retried until the deadline (2 s), not given up when the next jittered wait would
    // pass it.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn pipelined_publishing_counts_stored_and_duplicates() {
    let server = NatsServer::start().expect("server");
    let js = setup(&server).await;
    let publisher = Publisher::new(js.clone());
    let mut pipeline = publisher.pipeline(256);
    for i in 0..5_000u32 {
        let click = Click {
            id: format!("e-{i}"),
            page: "/".into(),
        };
        pipeline
            .publish("events.click", &click.id, &click)
            .await
            .expect("queued");
    }
    // 100 repeats of ids already stored.
    for i in 0..100u32 {
        let click = Click {
            id: format!("e-{i}"),
            page: "/".into(),
        };
        pipeline
            .publish("events.click", &click.id, &click)
            .await
            .expect("queued");
    }
    let report = pipeline.finish().await.expect("all acked");
    assert_eq!(report.stored, 5_000);
    assert_eq!(report.duplicates, 100);
    assert_eq!(count(&js, "EVENTS").await, 5_000);
}

#[tokio::test]
async fn json_codec_publishes_json() {
    let server = NatsServer::start().expect("server");
    let js = setup(&server).await;
    let publisher = Publisher::new(js.clone()).with_codec(jetworker::CodecKind::Json);
    let click = Click {
        id: "j-1".into(),
        page: "/json".into(),
    };
    publisher
        .publish("events.click", &click.id, &click)
        .await
        .expect("publish");
    let stored = messages(&js, "EVENTS").await;
    assert_eq!(&stored[0].payload[..], br#"{"id":"j-1","page":"/json"}"#);
}

#[tokio::test]
async fn no_responders_are_retried_until_the_stream_exists() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
        deadline: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(2),
        ..RetryPolicy::default()
    });
    // Nothing captures `late.>` yet: the server answers "no responders".
    let creator = {
        let js = js.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            js.create_stream(jetstream::stream::Config {
                name: "LATE".into(),
                subjects: vec!["late.>".into()],
                ..Default::default()
            })
            .await
            .expect("stream")
        })
    };
    let started = Instant::now();
    let ack = publisher
        .publish(
            "late.click",
            "l-1",
            &Click {
                id: "l-1".into(),
                page: "/".into(),
            },
        )
        .await
        .expect("retried until the stream existed");
    assert_eq!(ack.stream, "LATE");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    creator.await.expect("creator");
    assert_eq!(count(&js, "LATE").await, 1);
}

#[tokio::test]
async fn a_stream_that_refuses_more_messages_is_a_permanent_error() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    js.create_stream(jetstream::stream::Config {
        name: "FULL".into(),
        subjects: vec!["full.>".into()],
        max_messages: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("stream");
    let publisher = Publisher::new(js.clone());
    let one = |id: &str| Click {
        id: id.into(),
        page: "/".into(),
    };
    publisher
        .publish("full.click", "f-1", &one("f-1"))
        .await
        .expect("the first fits");
    let started = Instant::now();
    let err = publisher
        .publish("full.click", "f-2", &one("f-2"))
        .await
        .expect_err("the stream is full");
    assert_eq!(err.kind(), PublishErrorKind::Rejected, "{err}");
    assert_eq!(err.attempts(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("full.click"), "{err}");
}

/// A server that stalls (its TCP connection open, nothing answered) and is then killed
/// and restarted, in the middle of a pipelined run: the whole window of PubAcks is lost.
/// Every message still ends stored exactly once (retries reuse the message ids), and the
/// lost window costs about one ack timeout, not one per message (256 x 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishing_survives_a_stalled_and_restarted_server() {
    const N: u32 = 2_000;
    let mut server = Some(NatsServer::start().expect("server"));
    let js = setup(server.as_ref().expect("server")).await;
    let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
        deadline: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(1),
        ..RetryPolicy::default()
    });
    let started = Instant::now();
    let mut pipeline = publisher.pipeline(256);
    let mut restarter = None;
    for i in 0..N {
        if i == N / 4 {
            let mut server = server.take().expect("server");
            let pid = server.pid().expect("running").to_string();
            let stopped = std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .expect("kill -STOP");
            assert!(stopped.success());
            restarter = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                server.kill();
                server.restart().expect("restart");
                server
            }));
        }
        let click = Click {
            id: format!("p-{i}"),
            page: "/".into(),
        };
        pipeline
            .publish("events.click", &click.id, &click)
            .await
            .expect("queued");
    }
    let report = pipeline.finish().await.expect("every PubAck in the end");
    let took = started.elapsed();
    let _server = restarter.expect("restarted").join().expect("restarter");
    assert_eq!(
        report.stored + report.duplicates,
        u64::from(N),
        "{report:?}"
    );
    assert!(
        report.retried >= 100,
        "the window's PubAcks were lost: {report:?}"
    );
    assert_eq!(count(&js, "EVENTS").await, u64::from(N), "each stored once");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    eprintln!("{N} pipelined across a stall, kill and restart in {took:?}: {report:?}");
}
