//! Prefetch against a real nats-server: the pull loop holds more than its free handler
//! slots only as far as the handlers' measured pace allows, so a message buffered in the
//! client never ages into its ack wait; and slots still bound how many handlers run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_suite::{scripted, Job, Probe};
use tokio_util::sync::CancellationToken;

/// Runs the scripted handler with `consumer_extra` until `jobs` all succeeded, and
/// returns the handler's probe and the consumer's redelivery count.
async fn run_until_done(consumer_extra: &str, jobs: &[Job], within: Duration) -> (Arc<Probe>, u64) {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let config = config(&server.url(), consumer_extra);
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    // The whole backlog is there before the worker starts: the most it could prefetch.
    publish_jobs(&js, jobs).await;

    let stop = CancellationToken::new();
    let app = App::new(probe.clone()).handler("scripted", scripted);
    let worker = tokio::spawn(app.run_until(config, stop.clone()));
    wait_until(within, "every job succeeded", || async {
        probe.succeeded_ids() == jobs.len()
    })
    .await;
    stop.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("worker stops in time")
        .expect("worker task")
        .expect("worker ran");
    let redelivered = stats
        .get("jobs")
        .map(|s| s.redelivered.load(std::sync::atomic::Ordering::Relaxed))
        .expect("stats of jobs");
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_redelivered, 0, "the server redelivered nothing");
    (probe, redelivered)
}

/// A slow handler (300 ms) with two slots and a 2 s ack wait drains a backlog of 50
/// (7.5 s of work, far beyond the ack wait): nothing waits in the client long enough to
/// be redelivered.
#[tokio::test]
async fn a_slow_handler_with_a_short_ack_wait_sees_no_redelivery() {
    // Each succeeds after 300 ms of work, on every attempt.
    let jobs: Vec<Job> = (1..=50)
        .map(|id| Job {
            sleep_ms: 300,
            ..Job::ok(id)
        })
        .collect();
    let (probe, redelivered) = run_until_done(
        "concurrency = 2\nack_wait = \"2s\"",
        &jobs,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(redelivered, 0, "no delivery had attempt > 1");
    for job in &jobs {
        let attempts = probe.attempts(job.id);
        assert_eq!(
            attempts.len(),
            1,
            "job {} delivered once: {attempts:?}",
            job.id
        );
        assert_eq!(attempts[0].0, 1);
    }
    assert!(probe.peak_in_flight() <= 2, "slots bound concurrency");
}

/// Fast handlers with a single slot: the loop prefetches beyond that slot (the messages
/// wait for it in order), yet never runs two handlers at once, and nothing comes twice.
#[tokio::test]
async fn one_slot_and_a_fast_handler_drain_a_backlog_one_at_a_time() {
    let jobs: Vec<Job> = (1..=3000).map(Job::ok).collect();
    let (probe, redelivered) =
        run_until_done("concurrency = 1", &jobs, Duration::from_secs(60)).await;
    assert_eq!(redelivered, 0);
    assert_eq!(probe.successes(), 3000, "each job succeeded exactly once");
    assert_eq!(probe.peak_in_flight(), 1, "one slot, one handler at a time");
}
