//! The worker runtime against a real nats-server: every outcome of the decision table,
//! concurrency, slow handlers, missing dead-letter stream, server restart, consumer
//! deletion. Each test starts its own server.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker::Config;
use jetworker::ConsumerStats;
use jetworker::RunError;
use jetworker_suite::{scripted, Job, Mode, Probe};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Stats = BTreeMap<String, Arc<ConsumerStats>>;

struct Worker {
    stop: CancellationToken,
    handle: JoinHandle<Result<Stats, RunError>>,
}

impl Worker {
    fn start(config: Config, probe: Arc<Probe>) -> Worker {
        let stop = CancellationToken::new();
        let app = App::new(probe).handler("scripted", scripted);
        let handle = tokio::spawn(app.run_until(config, stop.clone()));
        Worker { stop, handle }
    }

    async fn stop(self) -> Stats {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker ran")
    }
}

fn job(id: u64, mode: Mode, until: u64, sleep_ms: u64) -> Job {
    Job {
        id,
        mode,
        until,
        sleep_ms,
    }
}

#[tokio::test]
async fn success_acks_with_no_redelivery() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(config(&server.url(), "concurrency = 8"), probe.clone());
    let jobs: Vec<Job> = (1..=200).map(Job::ok).collect();
    wait_until(Duration::from_secs(10), "stream provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    publish_jobs(&js, &jobs).await;
    wait_until(Duration::from_secs(20), "all handled", || async {
        probe.succeeded_ids() == 200
    })
    .await;
    wait_until(Duration::from_secs(5), "all acked", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    // Past the ack wait nothing comes back.
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_redelivered, 0);
    let stats = worker.stop().await;
    assert_eq!(probe.successes(), 200, "each exactly once");
    let s = &stats["jobs"];
    assert_eq!(s.acked.load(std::sync::atomic::Ordering::Relaxed), 200);
    assert_eq!(count(&js, "DLQ").await, 0);
}

#[tokio::test]
async fn transient_failure_follows_the_schedule_then_dead_letters_with_every_header() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(
            &server.url(),
            "max_deliver = 3\nbackoff = [\"400ms\", \"800ms\"]",
        ),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    publish_jobs(&js, &[job(7, Mode::Fail, 99, 0)]).await;
    wait_until(Duration::from_secs(15), "dead letter stored", || async {
        count(&js, "DLQ").await == 1
    })
    .await;

    let attempts = probe.attempts(7);
    let numbers: Vec<u64> = attempts.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 2, 3], "exactly max_deliver attempts");
    let gap1 = attempts[1].1 - attempts[0].1;
    let gap2 = attempts[2].1 - attempts[1].1;
    assert!(
        gap1 >= Duration::from_millis(400),
        "first retry after {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(800),
        "second retry after {gap2:?}"
    );

    let dl = messages(&js, "DLQ").await;
    let m = &dl[0];
    assert_eq!(m.subject.as_str(), "dlq.jobs");
    assert_eq!(
        header(m, dead_letter::ORIGINAL_SUBJECT).as_deref(),
        Some("jobs.7")
    );
    assert_eq!(header(m, dead_letter::STREAM).as_deref(), Some("EVENTS"));
    assert_eq!(header(m, dead_letter::SEQUENCE).as_deref(), Some("1"));
    assert_eq!(header(m, dead_letter::CONSUMER).as_deref(), Some("jobs"));
    assert_eq!(header(m, dead_letter::ATTEMPTS).as_deref(), Some("3"));
    assert_eq!(header(m, dead_letter::REASON).as_deref(), Some("exhausted"));
    assert_eq!(
        header(m, dead_letter::ERROR).as_deref(),
        Some("job 7 failed on attempt 3")
    );
    assert!(header(m, dead_letter::TIME).is_some());
    assert_eq!(
        header(m, "Nats-Msg-Id").as_deref(),
        Some("jetworker-dl.EVENTS.1.jobs")
    );
    let original: Job = rmp_serde::from_slice(&m.payload).expect("original payload kept");
    assert_eq!(original.id, 7);

    // The original is settled (termed), not pending.
    wait_until(Duration::from_secs(5), "original settled", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn permanent_and_undecodable_go_to_dead_letters_on_attempt_one() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(&server.url(), "max_deliver = 5\nmax_payload_bytes = 1000"),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    publish_jobs(&js, &[job(1, Mode::Permanent, 0, 0)]).await;
    js.publish("jobs.garbage", b"\xc1 this is not msgpack".as_ref().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    js.publish("jobs.big", vec![0u8; 5000].into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    wait_until(Duration::from_secs(10), "three dead letters", || async {
        count(&js, "DLQ").await == 3
    })
    .await;
    let dl = messages(&js, "DLQ").await;
    let by_subject: BTreeMap<String, (String, String)> = dl
        .iter()
        .map(|m| {
            (
                header(m, dead_letter::ORIGINAL_SUBJECT).unwrap_or_default(),
                (
                    header(m, dead_letter::REASON).unwrap_or_default(),
                    header(m, dead_letter::ATTEMPTS).unwrap_or_default(),
                ),
            )
        })
        .collect();
    assert_eq!(
        by_subject["jobs.1"],
        ("permanent".to_string(), "1".to_string())
    );
    assert_eq!(
        by_subject["jobs.garbage"],
        ("decode".to_string(), "1".to_string())
    );
    assert_eq!(
        by_subject["jobs.big"],
        ("too_large".to_string(), "1".to_string())
    );
    assert_eq!(
        probe.attempts(1).len(),
        1,
        "no retry of a permanent failure"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_panic_is_retried_and_the_worker_lives_on() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(&server.url(), "backoff = [\"200ms\"]"),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    publish_jobs(&js, &[job(1, Mode::Panic, 1, 0), Job::ok(2)]).await;
    wait_until(Duration::from_secs(10), "both handled", || async {
        probe.succeeded_ids() == 2
    })
    .await;
    assert_eq!(probe.attempts(1).len(), 2, "panicked once, then succeeded");
    // Still alive: new work is handled.
    publish_jobs(&js, &[Job::ok(3)]).await;
    wait_until(
        Duration::from_secs(10),
        "handled after the panic",
        || async { probe.succeeded_ids() == 3 },
    )
    .await;
    let stats = worker.stop().await;
    assert_eq!(
        stats["jobs"]
            .panics
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_timeout_is_retried_and_the_last_one_dead_letters() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(
            &server.url(),
            "handler_timeout = \"300ms\"\nmax_deliver = 2\nbackoff = [\"200ms\"]",
        ),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    // Job 1 hangs on attempt 1 only; job 2 hangs on every attempt.
    publish_jobs(
        &js,
        &[
            job(1, Mode::Sleep, 1, 10_000),
            job(2, Mode::Sleep, 99, 10_000),
        ],
    )
    .await;
    wait_until(Duration::from_secs(10), "job 1 handled", || async {
        probe.successes_of(1) == 1
    })
    .await;
    wait_until(Duration::from_secs(10), "job 2 dead-lettered", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    let dl = messages(&js, "DLQ").await;
    assert_eq!(
        header(&dl[0], dead_letter::REASON).as_deref(),
        Some("timeout")
    );
    assert_eq!(
        header(&dl[0], dead_letter::ORIGINAL_SUBJECT).as_deref(),
        Some("jobs.2")
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_handler_slower_than_the_ack_wait_is_not_redelivered() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(
            &server.url(),
            "ack_wait = \"1s\"\nhandler_timeout = \"30s\"",
        ),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    publish_jobs(&js, &[job(1, Mode::Sleep, 1, 3500)]).await;
    wait_until(Duration::from_secs(10), "slow job handled", || async {
        probe.successes_of(1) == 1
    })
    .await;
    assert_eq!(probe.attempts(1).len(), 1, "progress acks kept the message");
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_redelivered, 0);
    worker.stop().await;
}

#[tokio::test]
async fn missing_dead_letter_stream_keeps_the_original_until_it_exists() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let cfg = config(&server.url(), "max_deliver = 3\nbackoff = [\"300ms\"]");
    let worker = Worker::start(cfg, probe.clone());
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("DLQ").await.is_ok()
    })
    .await;
    js.delete_stream("DLQ").await.expect("delete DLQ");

    publish_jobs(&js, &[job(1, Mode::Permanent, 0, 0)]).await;
    // Attempts 1 and 2 fail to store the copy and are nak'ed; attempt 3 (the last) is
    // held with progress acks while the copy is retried.
    wait_until(Duration::from_secs(10), "last attempt reached", || async {
        probe.attempts(1).len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_ack_pending, 1, "the original is not termed");

    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq.>".into()],
        ..Default::default()
    })
    .await
    .expect("recreate DLQ");
    wait_until(Duration::from_secs(15), "dead letter stored", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    wait_until(Duration::from_secs(5), "original settled", || async {
        consumer_info(&js, "EVENTS", "jobs").await.num_ack_pending == 0
    })
    .await;
    let dl = messages(&js, "DLQ").await;
    assert_eq!(
        header(&dl[0], dead_letter::REASON).as_deref(),
        Some("permanent")
    );
    worker.stop().await;
}

#[tokio::test]
async fn never_more_than_concurrency_in_flight() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(config(&server.url(), "concurrency = 4"), probe.clone());
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    let jobs: Vec<Job> = (1..=60).map(|id| job(id, Mode::Ok, 0, 40)).collect();
    publish_jobs(&js, &jobs).await;
    wait_until(Duration::from_secs(20), "all handled", || async {
        probe.succeeded_ids() == 60
    })
    .await;
    assert_eq!(
        probe.peak_in_flight(),
        4,
        "used all four slots and never more"
    );
    let stats = worker.stop().await;
    assert!(
        stats["jobs"]
            .peak_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 4
    );
}

#[tokio::test]
async fn server_restart_mid_run_loses_nothing() {
    let mut server = NatsServer::start().expect("server");
    let url = server.url();
    let (_c, js) = connect(&url).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(config(&url, "concurrency = 16"), probe.clone());
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;
    let first: Vec<Job> = (1..=300).map(|id| job(id, Mode::Ok, 0, 5)).collect();
    publish_jobs(&js, &first).await;
    wait_until(Duration::from_secs(10), "some handled", || async {
        probe.succeeded_ids() >= 50
    })
    .await;

    server.restart().expect("restart");
    let (_c2, js2) = connect(&url).await;
    let second: Vec<Job> = (301..=400).map(Job::ok).collect();
    publish_jobs(&js2, &second).await;
    wait_until(Duration::from_secs(60), "every message handled", || async {
        probe.succeeded_ids() == 400
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_deleted_consumer_is_recreated_and_work_goes_on() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let worker = Worker::start(
        config(&server.url(), "deliver_policy = \"all\""),
        probe.clone(),
    );
    wait_until(Duration::from_secs(10), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    publish_jobs(&js, &(1..=50).map(Job::ok).collect::<Vec<_>>()).await;
    wait_until(Duration::from_secs(10), "first batch", || async {
        probe.succeeded_ids() == 50
    })
    .await;
    // Let the worker see the consumer's ack floor once more (its lag poll runs every
    // 5 s), as a worker that has run for a while has.
    tokio::time::sleep(jetworker_lag_poll() + Duration::from_secs(1)).await;

    // nats-server 2.9 can answer "directory not empty" when a consumer is deleted while
    // acks are being written: retry until it is gone.
    wait_until(Duration::from_secs(10), "consumer deleted", || async {
        let stream = js.get_stream("EVENTS").await.expect("stream");
        let _ = stream.delete_consumer("jobs").await;
        stream.consumer_info("jobs").await.is_err()
    })
    .await;
    publish_jobs(&js, &(51..=100).map(Job::ok).collect::<Vec<_>>()).await;
    wait_until(Duration::from_secs(40), "every message handled", || async {
        probe.succeeded_ids() == 100
    })
    .await;
    let stats = worker.stop().await;
    assert!(
        stats["jobs"]
            .recreated
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // The recreated consumer resumed after the old one's ack floor: what was processed
    // before the deletion was not delivered again (deliver_policy "all" would have).
    let again: Vec<u64> = (1..=50)
        .filter(|id| probe.attempts(*id).len() > 1)
        .collect();
    assert!(
        again.is_empty(),
        "processed again after the recreation: {again:?}"
    );
}

/// How often the worker polls its consumers' server-side state.
fn jetworker_lag_poll() -> Duration {
    Duration::from_secs(5)
}
