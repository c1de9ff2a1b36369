//! Two consumers on one stream (a fan-out), each with its own dead-letter subject in one
//! shared dead-letter stream: a message both give up on leaves one dead letter per
//! consumer, not one in all (the copy's message id is per consumer).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_suite::{scripted, Job, Mode, Probe};

const MESSAGES: u64 = 40;

#[tokio::test]
async fn each_consumer_that_gives_up_keeps_its_own_dead_letter() {
    let server = NatsServer::start().expect("server");
    let (_client, js) = connect(&server.url()).await;
    let config = ConfigText::new(&server.url())
        .worker(r#"shutdown_grace = "5s""#)
        .stream("EVENTS", &["jobs.>"], "")
        .stream("DLQ", &["dlq.>"], "")
        .consumer("billing", "EVENTS", "scripted", "max_deliver = 2")
        .consumer("audit", "EVENTS", "scripted", "max_deliver = 2")
        .load();
    let probe = Arc::new(Probe::default());
    let worker = InProcessWorker::start(config, App::new(probe).handler("scripted", scripted));
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;

    let jobs: Vec<Job> = (1..=MESSAGES)
        .map(|id| Job {
            id,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        })
        .collect();
    publish_jobs(&js, &jobs).await;
    wait_until(
        Duration::from_secs(20),
        "both consumers settled",
        || async {
            let billing = consumer_info(&js, "EVENTS", "billing").await;
            let audit = consumer_info(&js, "EVENTS", "audit").await;
            let open = |info: &jetworker::async_nats::jetstream::consumer::Info| {
                info.num_pending + info.num_ack_pending as u64
            };
            open(&billing) + open(&audit) == 0 && count(&js, "DLQ").await >= 2 * MESSAGES
        },
    )
    .await;
    // Give a doubled copy time to show up, if there were one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.stop().await;

    let letters = messages(&js, "DLQ").await;
    assert_eq!(
        letters.len() as u64,
        2 * MESSAGES,
        "one dead letter per consumer"
    );
    let mut seen = BTreeSet::new();
    for letter in &letters {
        let consumer = header(letter, dead_letter::CONSUMER).expect("consumer header");
        let sequence = header(letter, dead_letter::SEQUENCE).expect("sequence header");
        assert_eq!(
            letter.subject.as_str(),
            format!("dlq.{consumer}"),
            "each consumer's own dead-letter subject"
        );
        assert_eq!(
            header(letter, dead_letter::REASON).as_deref(),
            Some("permanent")
        );
        assert_eq!(
            header(letter, "Nats-Msg-Id"),
            Some(format!("jetworker-dl.EVENTS.{sequence}.{consumer}"))
        );
        assert!(seen.insert((consumer, sequence)), "a copy stored twice");
    }
}
