//! Graceful shutdown of a real worker process: SIGTERM lets in-flight handlers finish
//! and ack, the process exits 0, and nothing is redelivered after a restart; a second
//! signal exits at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jetworker::testing::server::NatsServer;
use jetworker_suite::{Job, Mode};

fn write_config(dir: &Path, url: &str, grace: &str) -> PathBuf {
    write_config_with(dir, url, grace, "3s", 4)
}

fn write_config_with(
    dir: &Path,
    url: &str,
    grace: &str,
    ack_wait: &str,
    concurrency: usize,
) -> PathBuf {
    ConfigText::new(url)
        .worker(&format!("shutdown_grace = \"{grace}\""))
        .with_jobs()
        .in_consumer(
            "jobs",
            &format!("concurrency = {concurrency}\nack_wait = \"{ack_wait}\""),
        )
        .write(dir)
}

fn spawn_worker(config: &Path, log: &Path) -> WorkerProcess {
    WorkerProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("JW_TEST_LOG", log)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

fn lines(log: &Path, kind: &str) -> Vec<(u64, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            (parts.next()? == kind).then_some(())?;
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_and_nothing_is_redelivered() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config(dir.path(), &server.url(), "20s");
    let (_c, js) = connect(&server.url()).await;

    let mut worker = spawn_worker(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    // Four slow jobs fill the four slots; twenty quick ones wait on the server.
    let mut jobs: Vec<Job> = (1..=4)
        .map(|id| Job {
            id,
            mode: Mode::Sleep,
            until: 1,
            sleep_ms: 2000,
        })
        .collect();
    jobs.extend((5..=24).map(Job::ok));
    publish_jobs(&js, &jobs[..4]).await;
    wait_until(Duration::from_secs(10), "slow jobs started", || async {
        lines(&log, "start").len() == 4
    })
    .await;
    publish_jobs(&js, &jobs[4..]).await;

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "graceful exit");
    let done = lines(&log, "done");
    for id in 1..=4 {
        assert!(
            done.contains(&(id, 1)),
            "in-flight job {id} finished: {done:?}"
        );
    }
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(
        info.num_ack_pending, 0,
        "everything started was acked or handed back"
    );

    // Restart: the rest is handled, nothing that finished comes back.
    let mut worker = spawn_worker(&config, &log);
    wait_until(Duration::from_secs(20), "all done", || async {
        let mut ids: Vec<u64> = lines(&log, "done").iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        ids.len() == 24
    })
    .await;
    // Longer than the ack wait: a message finished before the restart would be back by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let done = lines(&log, "done");
    for id in 1..=24u64 {
        let n = done.iter().filter(|(i, _)| *i == id).count();
        assert_eq!(n, 1, "job {id} handled exactly once: {done:?}");
    }
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_redelivered, 0);
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config(dir.path(), &server.url(), "60s");
    let (_c, js) = connect(&server.url()).await;
    let mut worker = spawn_worker(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    publish_jobs(
        &js,
        &[Job {
            id: 1,
            mode: Mode::Sleep,
            until: 1,
            sleep_ms: 30_000,
        }],
    )
    .await;
    wait_until(Duration::from_secs(10), "job started", || async {
        !lines(&log, "start").is_empty()
    })
    .await;
    worker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "still in its grace period"
    );
    worker.signal("INT");
    let status = worker.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(130));
}

/// Messages the server sends to pull requests still open at SIGTERM are handed back, not
/// stranded until the ack wait: with a 60 s ack wait, a second worker gets every one of
/// them within seconds.
#[tokio::test]
async fn deliveries_arriving_during_shutdown_are_handed_back_at_once() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config_with(dir.path(), &server.url(), "10s", "60s", 8);
    let (_c, js) = connect(&server.url()).await;

    let mut worker = spawn_worker(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;

    // Publish without pause while the worker receives SIGTERM in the middle.
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut id = 0u64;
            while started.elapsed() < Duration::from_millis(1500) {
                let batch: Vec<Job> = (id + 1..=id + 20).map(Job::ok).collect();
                publish_jobs(&js, &batch).await;
                id += 20;
            }
            id
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal("TERM");
    let published = publisher.await.expect("publisher");
    let status = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "graceful exit");

    // Whatever the first worker did not finish is available now, not after 60 s.
    let mut second = spawn_worker(&config, &log);
    wait_until(
        Duration::from_secs(25),
        "every job done by one of the workers",
        || async {
            let mut ids: Vec<u64> = lines(&log, "done").iter().map(|(id, _)| *id).collect();
            ids.sort();
            ids.dedup();
            ids.len() as u64 == published
        },
    )
    .await;
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.num_ack_pending, 0, "nothing stranded");
    second.signal("TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

/// SIGTERM while final attempts arrive: a last delivery that arrived and never started
/// is run within the grace period, not handed back (a hand-back would use up its last
/// delivery and the safety net would file it as `abandoned` though it never ran). So
/// nothing is dead-lettered, the clean exit leaves nothing ack-pending, and a restart
/// finishes the rest.
#[tokio::test]
async fn sigterm_during_final_attempts_runs_them_and_dead_letters_nothing() {
    const JOBS: u64 = 200;
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = ConfigText::new(&server.url())
        .worker("shutdown_grace = \"20s\"")
        .with_jobs()
        .in_consumer(
            "jobs",
            "concurrency = 4\nack_wait = \"10s\"\nmax_deliver = 2\nbackoff = [\"200ms\"]",
        )
        .write(dir.path());
    let (_c, js) = connect(&server.url()).await;
    let mut worker = spawn_worker(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    // Every job fails its first attempt and succeeds on its second, the last.
    let jobs: Vec<Job> = (1..=JOBS)
        .map(|id| Job {
            id,
            mode: Mode::Fail,
            until: 1,
            sleep_ms: 30,
        })
        .collect();
    publish_jobs(&js, &jobs).await;
    wait_until(
        Duration::from_secs(20),
        "final attempts under way",
        || async { lines(&log, "done").len() >= 20 },
    )
    .await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).code(), Some(0));
    // What is ack-pending now was settled by the worker: retries nak'ed with their delay
    // and hand-backs, both waiting for the next pull. Nothing is held until its ack wait.
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    let mut done: Vec<u64> = lines(&log, "done").iter().map(|(id, _)| *id).collect();
    done.sort();
    done.dedup();
    assert!(
        info.num_ack_pending as u64 <= JOBS - done.len() as u64,
        "only unfinished jobs are ack-pending: {} of {} unfinished",
        info.num_ack_pending,
        JOBS - done.len() as u64
    );

    let mut worker = spawn_worker(&config, &log);
    // Within less than the ack wait (10 s): nothing was left to expire.
    wait_until(Duration::from_secs(8), "every job done", || async {
        let mut ids: Vec<u64> = lines(&log, "done").iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        ids.len() as u64 == JOBS
    })
    .await;
    // Give the safety net time to file anything stranded (it would be `abandoned`).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&js, "DLQ").await,
        0,
        "no message that succeeds is dead-lettered"
    );
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).code(), Some(0));
}
