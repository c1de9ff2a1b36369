//! Ordered by key against real nats-server processes: key lanes in one process (one
//! message of a key at a time, in stream order, keys side by side; a retry holds its key
//! back; a dead letter moves it on); partitions across two and three replica
//! processes, one of them killed (`kill -9`) mid-run; and an ordered consumer without
//! partitions in two replica processes: one pulls, the other stands by and takes over
//! when the first is killed.
//!
//! Every handler run writes its start and end to the stream `RECORD` (PubAck awaited,
//! see `jetworker_suite::recorded`), which orders the events of every worker; the
//! checks read it back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_suite::{recorded, Job, Mode, Probe, RECORD_PREFIX};

/// The stream the ordered consumer reads: `orders.<key>.<id>`.
const ORDERS: &str = "ORDERS";

/// A config with streams `ORDERS` (`orders.>`), `RECORD` and `DLQ`, and the consumer
/// `ordered` of handler `recorded` with `lines`.
fn orders_config(url: &str, lines: &str) -> ConfigText {
    ConfigText::new(url)
        .connection(r#"request_timeout = "2s""#)
        .worker(r#"shutdown_grace = "5s""#)
        .stream(ORDERS, &["orders.>"], "")
        .stream("RECORD", &[&format!("{RECORD_PREFIX}.>")], "")
        .stream("DLQ", &["dlq.>"], "")
        .consumer("ordered", ORDERS, "recorded", lines)
}

/// [`orders_config`] ordered by the key token of `orders.<key>`, with `lines` added.
fn ordered_config(url: &str, lines: &str) -> ConfigText {
    orders_config(
        url,
        &format!("ordered_by = {{ subject_token = 1 }}\n{lines}"),
    )
}

/// Publishes each `(key, job)` to `orders.<key>`, in order, waiting for each PubAck.
async fn publish_keyed(js: &jetstream::Context, jobs: &[(String, Job)]) {
    for (key, job) in jobs {
        let payload = rmp_serde::to_vec_named(job).expect("encode");
        js.publish(format!("orders.{key}"), payload.into())
            .await
            .expect("publish")
            .await
            .expect("puback");
    }
}

/// One line of the record stream; the key is the message's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Start {
        key: String,
        seq: u64,
        attempt: u64,
        pid: u32,
    },
    End {
        key: String,
        seq: u64,
        how: String,
    },
}

/// The record stream's events, in its order.
async fn records(js: &jetstream::Context) -> Vec<Record> {
    messages(js, "RECORD")
        .await
        .into_iter()
        .map(|m| {
            let text = String::from_utf8(m.payload.to_vec()).expect("text");
            let words: Vec<&str> = text.split(' ').collect();
            let key = words[1].to_owned();
            let seq = words[2].parse().expect("seq");
            match words[0] {
                "start" => Record::Start {
                    key,
                    seq,
                    attempt: words[3].parse().expect("attempt"),
                    pid: words[4].parse().expect("pid"),
                },
                _ => Record::End {
                    key,
                    seq,
                    how: words[4].to_owned(),
                },
            }
        })
        .collect()
}

/// Checks order per key over `records` and returns, per key, the sequences that ended
/// for good (`ok` or `final`), in the order they did:
/// - no message of a key starts while another of that key runs (a start is followed by
///   its own end, or, when its worker died, by a start of the same message again);
/// - a message that ended for good is followed only by later messages of its key (or
///   by itself again, when its ack was lost with its worker), and one that ended with a
///   retry (or never ended) only by itself again.
fn check_order(records: &[Record]) -> BTreeMap<String, Vec<u64>> {
    // Per key: the message that runs (sequence, ended?), and the earliest sequence the
    // next start may have, and whether it must be exactly that one.
    #[derive(Default)]
    struct KeyState {
        running: Option<u64>,
        next_at_least: u64,
        must_repeat: Option<u64>,
        done: Vec<u64>,
    }
    let mut keys: BTreeMap<String, KeyState> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        match record {
            Record::Start {
                key, seq, attempt, ..
            } => {
                let state = keys.entry(key.clone()).or_default();
                if let Some(running) = state.running {
                    // Its worker died mid-run: only its redelivery may start now.
                    assert_eq!(
                        *seq, running,
                        "record {i}: key {key}: seq {seq} (attempt {attempt}) started while seq {running} had not ended"
                    );
                }
                if let Some(repeat) = state.must_repeat {
                    assert_eq!(
                        *seq, repeat,
                        "record {i}: key {key}: seq {seq} started before the retry of seq {repeat}"
                    );
                }
                // A message that ended but whose ack never reached the server (its
                // worker was killed right after) runs again: a redelivery, not a
                // message out of order.
                let again = state.done.last() == Some(seq);
                assert!(
                    *seq >= state.next_at_least || again,
                    "record {i}: key {key}: seq {seq} started after seq {} had ended",
                    state.next_at_least - 1
                );
                state.running = Some(*seq);
                state.must_repeat = None;
            }
            Record::End { key, seq, how } => {
                let state = keys.entry(key.clone()).or_default();
                assert_eq!(
                    state.running,
                    Some(*seq),
                    "record {i}: key {key}: seq {seq} ended without starting"
                );
                state.running = None;
                if how == "retry" {
                    state.must_repeat = Some(*seq);
                } else if state.done.last() != Some(seq) {
                    state.next_at_least = seq + 1;
                    state.done.push(*seq);
                }
            }
        }
    }
    keys.into_iter().map(|(k, s)| (k, s.done)).collect()
}

/// Runs the ordered consumer in this process with `lines` over `jobs` until the record
/// stream shows `ended` messages ended for good; returns the records and the probe.
async fn run_in_process(
    lines: &str,
    jobs: &[(String, Job)],
    ended: usize,
    within: Duration,
) -> (Vec<Record>, Arc<Probe>) {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let config = ordered_config(&server.url(), lines).load();
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    publish_keyed(&js, jobs).await;
    let probe = Arc::new(Probe::default());
    let app = App::new(probe.clone()).handler("recorded", recorded);
    let worker = InProcessWorker::start(config, app);
    wait_until(within, "every message ended for good", || async {
        let done: usize = check_order(&records(&js).await)
            .values()
            .map(Vec::len)
            .sum();
        done >= ended
    })
    .await;
    worker.stop().await;
    (records(&js).await, probe)
}

/// 20 keys of 8 messages each, published key by key, the earlier ones of a key slower
/// (40 ms down to 5 ms of work), 8 slots: every key runs in stream order, one message
/// at a time (unordered, a key's messages would run side by side and finish in reverse),
/// and different keys run side by side.
#[tokio::test]
async fn messages_of_one_key_run_in_order_while_keys_run_side_by_side() {
    let mut jobs = Vec::new();
    for key in 0..20u64 {
        for n in 0..8u64 {
            jobs.push((
                format!("k{key}"),
                Job {
                    sleep_ms: 5 + (7 - n) * 5,
                    ..Job::ok(key * 8 + n + 1)
                },
            ));
        }
    }
    let (records, probe) = run_in_process(
        "concurrency = 8",
        &jobs,
        jobs.len(),
        Duration::from_secs(60),
    )
    .await;
    let done = check_order(&records);
    assert_eq!(done.len(), 20, "every key ran");
    for (key, seqs) in &done {
        assert_eq!(seqs.len(), 8, "key {key}: {seqs:?}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} in stream order: {seqs:?}"
        );
    }
    let peak = probe.peak_in_flight();
    assert!(
        peak > 1 && peak <= 8,
        "keys ran side by side within the slots: peak {peak}"
    );
}

/// Key `a`: its first message fails once (retried after 1 s), its third is permanent
/// (dead-lettered). Its second waits for the retry of the first; its fourth runs after
/// the dead letter. Key `b` is not held back by `a`'s retry.
#[tokio::test]
async fn a_retry_holds_its_key_back_and_a_dead_letter_moves_it_on() {
    let job = |id, mode, until| Job {
        id,
        mode,
        until,
        sleep_ms: 0,
    };
    let jobs = vec![
        ("a".to_owned(), job(1, Mode::Fail, 1)),
        ("a".to_owned(), job(2, Mode::Ok, 0)),
        ("b".to_owned(), job(3, Mode::Ok, 0)),
        ("a".to_owned(), job(4, Mode::Permanent, 0)),
        ("b".to_owned(), job(5, Mode::Ok, 0)),
        ("a".to_owned(), job(6, Mode::Ok, 0)),
    ];
    let (records, _probe) = run_in_process(
        "backoff = [\"1s\"]\nmax_deliver = 3",
        &jobs,
        jobs.len(),
        Duration::from_secs(30),
    )
    .await;
    let done = check_order(&records);
    // Sequences are the ids: one message per publish, in order.
    assert_eq!(done["orders.a"], [1, 2, 4, 6], "{records:?}");
    assert_eq!(done["orders.b"], [3, 5]);
    let starts_of_a: Vec<(u64, u64)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Start {
                key, seq, attempt, ..
            } if key == "orders.a" => Some((*seq, *attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(starts_of_a, [(1, 1), (1, 2), (2, 1), (4, 1), (6, 1)]);
    let b_done = records
        .iter()
        .position(|r| matches!(r, Record::End { seq: 5, how, .. } if how == "ok"))
        .expect("seq 5 ended");
    let a_retried = records
        .iter()
        .position(|r| {
            matches!(
                r,
                Record::Start {
                    seq: 1,
                    attempt: 2,
                    ..
                }
            )
        })
        .expect("seq 1 retried");
    assert!(
        b_done < a_retried,
        "key b ran while key a waited for its retry"
    );
    let ends: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| match r {
            Record::End { seq: 4, how, .. } => Some(how.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(ends, BTreeSet::from(["final"]), "seq 4 was dead-lettered");
}

/// 12 keys `k0` .. `k11` of 12 messages each, published round by round (`id` 1 to 144
/// in publishing order), `sleep_ms` of work each, every 7th failing once.
fn twelve_keys_of_twelve(sleep_ms: u64) -> Vec<(String, Job)> {
    let mut jobs = Vec::new();
    for round in 0..12u64 {
        for key in 0..12u64 {
            let id = round * 12 + key + 1;
            let job = Job {
                mode: if id % 7 == 0 { Mode::Fail } else { Mode::Ok },
                until: 1,
                sleep_ms,
                ..Job::ok(id)
            };
            jobs.push((format!("k{key}"), job));
        }
    }
    jobs
}

/// Checks that every one of [`twelve_keys_of_twelve`]'s messages ended for good once,
/// each key in stream order and one message at a time (see [`check_order`]).
fn assert_twelve_keys_ended_in_order(records: &[Record]) {
    let done = check_order(records);
    assert_eq!(done.len(), 12, "every key ran");
    for (key, seqs) in &done {
        assert_eq!(
            seqs.len(),
            12,
            "key {key}: every message ended once: {seqs:?}"
        );
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key {key}: {seqs:?}");
    }
}

/// The processes that started a message in `records`.
fn start_pids(records: &[Record]) -> BTreeSet<u32> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Start { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect()
}

/// The partitioned consumer's config: 4 partitions of `orders.<partition>.<key>` (as
/// `Publisher::publish_keyed` writes them), 2 s leases, a 2 s ack wait and 1 s retries.
fn partitioned_config(url: &str) -> ConfigText {
    orders_config(
        url,
        r#"filter_subject = "orders.*.>"
ordered_by = { subject_token = 2 }
partitions = { count = 4, subject_token = 1, lease = "2s" }
ack_wait = "2s"
backoff = ["1s"]
max_deliver = 5
concurrency = 4"#,
    )
}

/// `replicas` worker processes on 4 partitions of 12 keys x 12 messages (80 ms of work
/// each, every 7th failing once); the replica that started a message last is killed
/// (`kill -9`) once a third of the messages ended. Then every message ends for good, and per key no message
/// starts before the one before it ended (or, for one that was running in the killed
/// replica, before its redelivery), in stream order.
async fn replicas_keep_order_per_key_through_a_kill(replicas: usize) {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let text = partitioned_config(&server.url());
    let config = text.load();
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let publisher = jetworker::Publisher::new(js.clone());
    let jobs = twelve_keys_of_twelve(80);
    for (key, job) in &jobs {
        publisher
            .publish_keyed("orders", key, 4, &format!("job-{}", job.id), job)
            .await
            .expect("publish");
    }
    let total = jobs.len();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = text.write(dir.path());
    let spawn = || {
        WorkerProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
                .args(["--config", &path.display().to_string(), "run"])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit()),
        )
    };
    let mut workers: Vec<WorkerProcess> = (0..replicas).map(|_| spawn()).collect();
    let ended = |records: &[Record]| -> usize { check_order(records).values().map(Vec::len).sum() };
    wait_until(
        Duration::from_secs(60),
        "a third of the messages ended",
        || async { ended(&records(&js).await) >= total / 3 },
    )
    .await;
    // The replica that started a message last: one at work right now.
    let killed = records(&js)
        .await
        .iter()
        .rev()
        .find_map(|r| match r {
            Record::Start { pid, .. } => Some(*pid),
            _ => None,
        })
        .expect("a start");
    let victim = workers
        .iter()
        .position(|w| w.pid() == killed)
        .expect("one of ours");
    workers[victim].signal("KILL");
    let _ = workers[victim].wait_exit(Duration::from_secs(5));
    let mut workers: Vec<WorkerProcess> = workers
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| (i != victim).then_some(w))
        .collect();
    wait_until(
        Duration::from_secs(90),
        "every message ended for good",
        || async { ended(&records(&js).await) >= total },
    )
    .await;
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        assert!(worker.wait_exit(Duration::from_secs(20)).success());
    }
    let records = records(&js).await;
    assert_twelve_keys_ended_in_order(&records);
    let pids = start_pids(&records);
    assert!(
        pids.contains(&killed),
        "the killed replica had work: {pids:?}"
    );
    assert!(
        pids.len() >= 2,
        "the partitions moved to other replicas: {pids:?}"
    );
}

#[tokio::test]
async fn two_replicas_keep_order_per_key_through_a_kill() {
    replicas_keep_order_per_key_through_a_kill(2).await;
}

#[tokio::test]
async fn three_replicas_keep_order_per_key_through_a_kill() {
    replicas_keep_order_per_key_through_a_kill(3).await;
}

/// A loopback port free right now, for a worker's ops endpoint.
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// Whether the worker whose ops endpoint is `ops` stands by for consumer `ordered`
/// (`None` while it does not answer), and whether it is ready.
async fn standby_and_ready(ops: std::net::SocketAddr) -> (Option<bool>, bool) {
    let (_, metrics) = http_get(ops, "/metrics").await;
    let standby = metric(&metrics, "jetworker_consumer_standby{consumer=\"ordered\"}");
    let (ready, _) = http_get(ops, "/readyz").await;
    (standby.map(|s| s == 1.0), ready == 200)
}

/// Two replica processes of an ordered consumer *without* partitions, 12 keys x 12
/// messages (60 ms each, every 7th failing once): one replica holds its lease and runs
/// every message, the other stands by (`jetworker_consumer_standby` 1, ready, logged)
/// and starts nothing. The holder is killed (`kill -9`) a third of the way: the other
/// takes the consumer over once the lease expires, and per key no message starts before
/// the one before it ended, through the takeover.
#[tokio::test]
async fn a_second_replica_of_an_ordered_consumer_stands_by_and_takes_over_after_a_kill() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let text = ordered_config(
        &server.url(),
        "ack_wait = \"2s\"\nbackoff = [\"1s\"]\nmax_deliver = 5\nconcurrency = 4",
    );
    let config = text.load();
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let jobs = twelve_keys_of_twelve(60);
    publish_keyed(&js, &jobs).await;
    let total = jobs.len();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = text.write(dir.path());
    let spawn = |ops: std::net::SocketAddr, log: &std::path::Path| {
        WorkerProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
                .args(["--config", &path.display().to_string(), "run"])
                .env("RUST_LOG", "info")
                .env("JETWORKER__WORKER__OPS_LISTEN", ops.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log).expect("log file")),
        )
    };
    let ops = [free_port(), free_port()];
    let logs = [
        dir.path().join("worker-0.log"),
        dir.path().join("worker-1.log"),
    ];
    let mut workers = vec![spawn(ops[0], &logs[0]), spawn(ops[1], &logs[1])];
    let ended = |records: &[Record]| -> usize { check_order(records).values().map(Vec::len).sum() };
    // One pulls, the other stands by, and both are ready.
    wait_until(
        Duration::from_secs(30),
        "one replica pulls, one stands by",
        || async {
            let a = standby_and_ready(ops[0]).await;
            let b = standby_and_ready(ops[1]).await;
            a.1 && b.1
                && matches!(
                    (a.0, b.0),
                    (Some(true), Some(false)) | (Some(false), Some(true))
                )
        },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "a third of the messages ended",
        || async { ended(&records(&js).await) >= total / 3 },
    )
    .await;
    let pullers = start_pids(&records(&js).await);
    assert_eq!(
        pullers.len(),
        1,
        "one replica at a time runs the consumer: {pullers:?}"
    );
    let holder = *pullers.first().expect("a puller");
    let victim = workers
        .iter()
        .position(|w| w.pid() == holder)
        .expect("one of ours");
    let survivor = 1 - victim;
    assert_eq!(
        standby_and_ready(ops[survivor]).await,
        (Some(true), true),
        "the other replica stands by, ready"
    );
    workers[victim].signal("KILL");
    let _ = workers[victim].wait_exit(Duration::from_secs(5));
    let at_kill = records(&js).await.len();
    // The lease (10 s) expires, then the takeover gate waits for the killed replica's
    // messages to come back.
    wait_until(
        Duration::from_secs(90),
        "every message ended for good",
        || async { ended(&records(&js).await) >= total },
    )
    .await;
    assert_eq!(
        standby_and_ready(ops[survivor]).await,
        (Some(false), true),
        "the survivor pulls"
    );
    let mut survivor = workers.swap_remove(survivor);
    survivor.signal("TERM");
    assert!(survivor.wait_exit(Duration::from_secs(20)).success());
    let records = records(&js).await;
    assert_twelve_keys_ended_in_order(&records);
    let after_kill = start_pids(&records[at_kill..]);
    assert_eq!(
        after_kill,
        BTreeSet::from([survivor.pid()]),
        "the survivor took over alone"
    );
    let survivor_log = std::fs::read_to_string(&logs[1 - victim]).expect("log");
    assert!(
        survivor_log.contains("standing by: another replica pulls this ordered consumer"),
        "the stand-by was logged: {survivor_log}"
    );
    assert!(
        survivor_log.contains("lease taken: this replica pulls the ordered consumer"),
        "{survivor_log}"
    );
}

/// One key of 14 messages of 250 ms each (3.5 s of work behind one another) with a 2 s
/// ack wait, next to quick keys: the messages held behind their key get progress acks,
/// so the server redelivers none of them, and the key still runs in order.
#[tokio::test]
async fn messages_held_behind_a_slow_key_are_kept_alive() {
    let mut jobs = Vec::new();
    for n in 0..14u64 {
        jobs.push((
            "slow".to_owned(),
            Job {
                sleep_ms: 250,
                ..Job::ok(2 * n + 1)
            },
        ));
        jobs.push(("quick".to_owned(), Job::ok(2 * n + 2)));
    }
    let (records, _probe) = run_in_process(
        "ack_wait = \"2s\"",
        &jobs,
        jobs.len(),
        Duration::from_secs(30),
    )
    .await;
    let done = check_order(&records);
    assert_eq!(done["orders.slow"].len(), 14);
    assert_eq!(done["orders.quick"].len(), 14);
    let redelivered: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(r, Record::Start { attempt, .. } if *attempt > 1))
        .collect();
    assert!(
        redelivered.is_empty(),
        "nothing held aged into its ack wait: {redelivered:?}"
    );
}
