//! Batch handlers against a real nats-server: per-message outcomes, an `Err` for the
//! whole batch, panics, timeouts, decode failures, the last attempt's dead letters,
//! progress acks on a batch longer than the ack wait, shutdown mid-batch, nothing lost.
//! Each test starts its own server.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::{App, Batch, BatchContext, BatchFailures, BatchResult, Config, HandlerError};
use jetworker_suite::{Job, Mode};

/// What the batch handler saw.
#[derive(Debug, Default)]
struct Seen {
    /// The size of every batch, in the order they ran.
    sizes: Mutex<Vec<usize>>,
    /// Attempt numbers per job id.
    attempts: Mutex<HashMap<u64, Vec<u64>>>,
    /// Jobs whose batch completed with them not marked failed, with how often.
    succeeded: Mutex<HashMap<u64, u64>>,
    /// Batches still to fail as a whole with an `Err`.
    failing_batches: AtomicU64,
}

impl Seen {
    fn attempts(&self, id: u64) -> Vec<u64> {
        self.attempts
            .lock()
            .map(|m| m.get(&id).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn succeeded_ids(&self) -> usize {
        self.succeeded.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Each job says what happens to it (see [`Mode`]): `Fail` marks it failed (transient)
/// while its attempt is at most `until`, `Permanent` marks it failed permanently; a
/// `Panic` job panics the batch, a `Sleep` job makes the batch work `sleep_ms` first.
/// The batch fails as a whole while `failing_batches` is above zero.
async fn store_jobs(jobs: Batch<Job>, ctx: BatchContext<Arc<Seen>>) -> BatchResult {
    let seen = ctx.state();
    if let Ok(mut sizes) = seen.sizes.lock() {
        sizes.push(jobs.len());
    }
    if let Ok(mut attempts) = seen.attempts.lock() {
        for job in &jobs {
            attempts.entry(job.id).or_default().push(job.attempt());
        }
    }
    let whole_batch_fails = seen
        .failing_batches
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if whole_batch_fails {
        return Err("the database is down".into());
    }
    // The batch works as long as its longest sleeper says, once.
    let work = jobs
        .iter()
        .filter(|job| job.mode == Mode::Sleep && job.attempt() <= job.until)
        .map(|job| job.sleep_ms)
        .max();
    if let Some(ms) = work {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut failures = BatchFailures::new();
    for job in &jobs {
        let misbehave = job.attempt() <= job.until;
        match job.mode {
            Mode::Fail if misbehave => failures.fail(job, format!("job {} failed", job.id)),
            Mode::Permanent => failures.fail(job, HandlerError::permanent("invalid job")),
            Mode::Panic if misbehave => panic!("job {} panicked", job.id),
            _ => {}
        }
    }
    if let Ok(mut succeeded) = seen.succeeded.lock() {
        for job in &jobs {
            if failures.error_of(job.index()).is_none() {
                *succeeded.entry(job.id).or_default() += 1;
            }
        }
    }
    Ok(failures)
}

fn job(id: u64, mode: Mode, until: u64, sleep_ms: u64) -> Job {
    Job {
        id,
        mode,
        until,
        sleep_ms,
    }
}

/// A server with streams `EVENTS` (`jobs.>`) and `DLQ` (`dlq.>`), and a worker running
/// consumer `jobs` for the batch handler `store_jobs` (its `lines` added), provisioned.
struct Scene {
    /// Killed when the scene is dropped.
    _server: NatsServer,
    js: async_nats::jetstream::Context,
    seen: Arc<Seen>,
    config: Config,
}

impl Scene {
    async fn start(seen: Seen, lines: &str) -> (Scene, InProcessWorker) {
        let server = NatsServer::start().expect("server");
        let (_client, js) = connect(&server.url()).await;
        let config = ConfigText::new(&server.url())
            .connection(r#"request_timeout = "2s""#)
            .worker(r#"shutdown_grace = "10s""#)
            .stream("EVENTS", &["jobs.>"], "")
            .stream("DLQ", &["dlq.>"], "")
            .consumer("jobs", "EVENTS", "store_jobs", lines)
            .load();
        let scene = Scene {
            _server: server,
            js,
            seen: Arc::new(seen),
            config,
        };
        let worker = scene.worker();
        wait_until(Duration::from_secs(10), "stream provisioned", || async {
            scene.js.get_stream("EVENTS").await.is_ok()
        })
        .await;
        (scene, worker)
    }

    /// Another worker on the same consumer.
    fn worker(&self) -> InProcessWorker {
        InProcessWorker::start(
            self.config.clone(),
            App::new(self.seen.clone()).batch_handler("store_jobs", store_jobs),
        )
    }

    /// Waits until `ids` jobs succeeded and `letters` dead letters are stored, then until
    /// the consumer has nothing pending or unacknowledged.
    async fn settled(&self, ids: usize, letters: u64) {
        wait_until(Duration::from_secs(30), "jobs succeeded", || async {
            self.seen.succeeded_ids() == ids
        })
        .await;
        wait_until(Duration::from_secs(20), "dead letters stored", || async {
            count(&self.js, "DLQ").await == letters
        })
        .await;
        wait_until(Duration::from_secs(20), "every message settled", || async {
            let info = consumer_info(&self.js, "EVENTS", "jobs").await;
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }
}

/// Dead letters by original subject: (reason, attempts).
async fn dead_letters(js: &async_nats::jetstream::Context) -> BTreeMap<String, (String, String)> {
    messages(js, "DLQ")
        .await
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
        .collect()
}

#[tokio::test]
async fn each_message_of_a_batch_is_settled_on_its_own() {
    let lines = "max_batch = 10\nmax_batch_wait = \"500ms\"\nmax_deliver = 3\nbackoff = [\"1s\"]";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    let jobs: Vec<Job> = (1..=30)
        .map(|id| match id % 10 {
            3 => job(id, Mode::Permanent, 0, 0),
            7 => job(id, Mode::Fail, 1, 0),
            _ => Job::ok(id),
        })
        .chain([job(31, Mode::Fail, 99, 0)])
        .collect();
    publish_jobs(&scene.js, &jobs).await;
    scene
        .js
        .publish("jobs.garbage", b"\xc1 not msgpack".as_ref().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    scene.settled(27, 5).await;
    let seen = &scene.seen;
    let sizes = seen.sizes();
    assert!(sizes.iter().all(|size| *size <= 10), "{sizes:?}");
    assert!(
        sizes.iter().any(|size| *size > 1),
        "messages came in batches: {sizes:?}"
    );
    for id in [7, 17, 27] {
        assert_eq!(
            seen.attempts(id),
            [1, 2],
            "job {id}: marked failed once, retried once"
        );
    }
    for id in [1, 2, 4, 10, 30] {
        assert_eq!(seen.attempts(id), [1], "job {id}: acked with its batch");
    }
    let letters = dead_letters(&scene.js).await;
    // Marked failed on every attempt: the last one dead-letters it.
    assert_eq!(letters["jobs.31"], ("exhausted".into(), "3".into()));
    assert_eq!(seen.attempts(31), [1, 2, 3]);
    for id in [3, 13, 23] {
        assert_eq!(
            letters[&format!("jobs.{id}")],
            ("permanent".into(), "1".into())
        );
        assert_eq!(seen.attempts(id), [1], "no retry of a permanent failure");
    }
    assert_eq!(letters["jobs.garbage"], ("decode".into(), "1".into()));
    worker.stop().await;
}

#[tokio::test]
async fn an_err_for_the_whole_batch_retries_every_message() {
    let seen = Seen::default();
    seen.failing_batches.store(1, Ordering::SeqCst);
    let lines = "max_batch = 50\nmax_batch_wait = \"1s\"\nmax_deliver = 3\nbackoff = [\"1s\"]";
    let (scene, worker) = Scene::start(seen, lines).await;
    let jobs: Vec<Job> = (1..=5).map(Job::ok).collect();
    publish_jobs(&scene.js, &jobs).await;
    scene.settled(5, 0).await;
    let sizes = scene.seen.sizes();
    assert_eq!(sizes[0], 5, "one batch of all five: {sizes:?}");
    for id in 1..=5 {
        assert_eq!(scene.seen.attempts(id), [1, 2], "job {id}");
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_panicking_batch_is_retried_then_dead_lettered_as_panic() {
    let lines = "max_batch = 50\nmax_batch_wait = \"1s\"\nmax_deliver = 2\nbackoff = [\"1s\"]";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    publish_jobs(&scene.js, &[Job::ok(1), job(2, Mode::Panic, 99, 0)]).await;
    scene.settled(0, 2).await;
    let letters = dead_letters(&scene.js).await;
    assert_eq!(letters["jobs.1"], ("panic".into(), "2".into()));
    assert_eq!(letters["jobs.2"], ("panic".into(), "2".into()));
    assert_eq!(scene.seen.attempts(1), [1, 2]);
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_past_its_timeout_is_retried_then_dead_lettered_as_timeout() {
    let lines = "max_batch = 50\nmax_batch_wait = \"200ms\"\nmax_deliver = 2\nbackoff = [\"1s\"]\nhandler_timeout = \"500ms\"";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    publish_jobs(&scene.js, &[job(1, Mode::Sleep, 99, 5000), Job::ok(2)]).await;
    scene.settled(0, 2).await;
    let letters = dead_letters(&scene.js).await;
    assert_eq!(letters["jobs.1"], ("timeout".into(), "2".into()));
    assert_eq!(letters["jobs.2"], ("timeout".into(), "2".into()));
    worker.stop().await;
}

#[tokio::test]
async fn progress_acks_keep_a_batch_longer_than_the_ack_wait() {
    let lines =
        "ack_wait = \"1s\"\nhandler_timeout = \"30s\"\nmax_batch = 20\nmax_batch_wait = \"200ms\"";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    let mut jobs: Vec<Job> = (1..=10).map(Job::ok).collect();
    jobs.push(job(11, Mode::Sleep, 1, 3500));
    publish_jobs(&scene.js, &jobs).await;
    scene.settled(11, 0).await;
    for id in 1..=11 {
        assert_eq!(scene.seen.attempts(id), [1], "job {id} was not redelivered");
    }
    let info = consumer_info(&scene.js, "EVENTS", "jobs").await;
    assert_eq!(info.num_redelivered, 0);
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_started_batch_finish_and_loses_nothing() {
    let lines = "max_batch = 25\nmax_batch_wait = \"100ms\"\nconcurrency = 2";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    // Every job makes its batch work 2 s on its first attempt: batches of 25 run two at a
    // time.
    let jobs: Vec<Job> = (1..=200).map(|id| job(id, Mode::Sleep, 1, 2000)).collect();
    publish_jobs(&scene.js, &jobs).await;
    wait_until(Duration::from_secs(10), "batches running", || async {
        !scene.seen.sizes().is_empty()
    })
    .await;
    let started: usize = scene.seen.sizes().iter().sum();
    worker.stop().await;
    // The batches that had started finished (acked on their first attempt).
    let succeeded = scene.seen.succeeded_ids();
    assert!(succeeded >= started, "{succeeded} of {started}");
    let info = consumer_info(&scene.js, "EVENTS", "jobs").await;
    assert_eq!(
        info.num_ack_pending, 0,
        "nothing left unsettled by the stop"
    );
    // A second worker takes the rest: every job succeeds, none is dead-lettered.
    let worker = scene.worker();
    scene.settled(200, 0).await;
    worker.stop().await;
}

#[tokio::test]
async fn max_batch_bytes_bounds_a_batch() {
    // A job as received (payload, subject, reply subject) is over 40 bytes and under 100:
    // 200 bytes hold two to four of them, never the 40 that arrive at once.
    let lines = "max_batch = 100\nmax_batch_bytes = 200\nmax_batch_wait = \"500ms\"";
    let (scene, worker) = Scene::start(Seen::default(), lines).await;
    let jobs: Vec<Job> = (1..=40).map(Job::ok).collect();
    publish_jobs(&scene.js, &jobs).await;
    scene.settled(40, 0).await;
    let sizes = scene.seen.sizes();
    assert!(sizes.iter().all(|size| (1..=5).contains(size)), "{sizes:?}");
    assert!(sizes.iter().any(|size| *size > 1), "{sizes:?}");
    worker.stop().await;
}
