//! `status` against a real nats-server: every figure equals what the server reports for
//! the consumer and the streams, and the dead-letter count is the number of messages on
//! the consumer's dead-letter subject (not the whole dead-letter stream).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use common::*;
use futures::StreamExt;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_cli::{StatusReport, StreamStatus};
use jetworker_suite::{scripted, Job, Probe};

/// Messages the server counts on `subject` of `stream` (subject-filtered stream info).
async fn server_subject_count(js: &jetstream::Context, stream: &str, subject: &str) -> u64 {
    let s = js.get_stream(stream).await.expect("stream");
    let mut counts = s.info_with_subjects(subject).await.expect("info");
    let mut total = 0;
    while let Some(item) = counts.next().await {
        let (stored, n) = item.expect("subject count");
        if stored == subject {
            total += n as u64;
        }
    }
    total
}

fn find<'a>(report: &'a StatusReport, stream: &str) -> &'a StreamStatus {
    report
        .streams
        .iter()
        .find(|s| s.name == stream)
        .expect("stream in report")
}

#[tokio::test]
async fn status_figures_equal_the_servers() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    // max_ack_pending 2 lets a pull request wait while messages are still pending.
    let config = config(
        &server.url(),
        "max_deliver = 2\nmax_ack_pending = 2\nconcurrency = 2",
    );

    // Before provisioning: nothing exists, and status says so instead of failing.
    let before = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    assert!(before.streams.iter().all(|s| !s.exists));
    assert!(!before.consumers[0].exists);
    assert_eq!(before.consumers[0].dead_letters, None);

    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");

    // A worker acks 5 jobs and dead-letters 3 (permanent failures).
    let mut jobs: Vec<Job> = (1..=5).map(Job::ok).collect();
    jobs.extend((6..=8).map(Job::permanent));
    publish_jobs(&js, &jobs).await;
    let probe = Arc::new(Probe::default());
    let worker = InProcessWorker::start(
        config.clone(),
        App::new(probe.clone()).handler("scripted", scripted),
    );
    wait_until(
        Duration::from_secs(15),
        "5 handled, 3 dead letters",
        || async { probe.succeeded_ids() == 5 && count(&js, "DLQ").await == 3 },
    )
    .await;
    wait_until(Duration::from_secs(10), "everything settled", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    worker.stop().await;

    // Something else in the dead-letter stream, on another subject: not jobs' dead letter.
    js.publish("dlq.someone_else", "x".into())
        .await
        .expect("publish")
        .await
        .expect("puback");

    // Four more jobs with no worker: pending.
    publish_jobs(&js, &(9..=12).map(Job::ok).collect::<Vec<_>>()).await;

    // By hand: take two, nak them, take them again (redelivered, unacked), then leave a
    // pull request waiting (max_ack_pending is reached, so it cannot be served).
    let consumer: PullConsumer = js
        .get_stream("EVENTS")
        .await
        .expect("stream")
        .get_consumer("jobs")
        .await
        .expect("consumer");
    for round in 0..2 {
        let mut batch = consumer
            .fetch()
            .max_messages(2)
            .messages()
            .await
            .expect("fetch");
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.expect("message");
            got += 1;
            if round == 0 {
                m.ack_with(AckKind::Nak(None)).await.expect("nak");
            }
        }
        assert_eq!(got, 2, "round {round}");
    }
    let _waiting = consumer
        .batch()
        .max_messages(5)
        .expires(Duration::from_secs(60))
        .messages()
        .await
        .expect("pull request");
    wait_until(Duration::from_secs(5), "one waiting pull", || async {
        consumer_info(&js, "EVENTS", "jobs").await.num_waiting == 1
    })
    .await;

    let report = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    let c = &report.consumers[0];
    assert!(c.exists);
    // Equal to the server's figures...
    assert_eq!(c.pending, info.num_pending);
    assert_eq!(c.ack_pending, info.num_ack_pending as u64);
    assert_eq!(c.redelivered, info.num_redelivered as u64);
    assert_eq!(c.waiting, info.num_waiting as u64);
    assert_eq!(
        c.dead_letters,
        Some(server_subject_count(&js, "DLQ", "dlq.jobs").await)
    );
    // ...which are what this test did.
    assert_eq!(
        (c.pending, c.ack_pending, c.redelivered, c.waiting),
        (2, 2, 2, 1)
    );
    assert_eq!(c.dead_letters, Some(3));
    assert_eq!(c.dead_letter_stream.as_deref(), Some("DLQ"));
    assert!(c.dead_letter_subject_shared_with.is_empty());

    for name in ["EVENTS", "DLQ"] {
        let state = js
            .get_stream(name)
            .await
            .expect("stream")
            .cached_info()
            .state
            .clone();
        let s = find(&report, name);
        assert!(s.exists);
        assert_eq!(
            (s.messages, s.bytes, s.first_sequence, s.last_sequence),
            (
                state.messages,
                state.bytes,
                state.first_sequence,
                state.last_sequence
            ),
            "{name}"
        );
    }
    assert_eq!(find(&report, "EVENTS").messages, 12);
    assert_eq!(find(&report, "DLQ").messages, 4);
    assert!(find(&report, "DLQ").dead_letters);
    assert!(!find(&report, "EVENTS").dead_letters);

    // The table shows the same figures.
    let table = report.table();
    let row = table
        .lines()
        .find(|l| l.starts_with("jobs "))
        .expect("consumer row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["jobs", "EVENTS", "2", "2", "2", "1", "3"],
        "{table}"
    );
}

/// `status --json` through a real binary prints the same report as the library.
#[tokio::test]
async fn status_command_prints_the_report_as_json_and_as_a_table() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let config = config(&server.url(), "max_deliver = 1");
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    publish_jobs(&js, &(1..=3).map(Job::ok).collect::<Vec<_>>()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config_file(dir.path(), &server.url(), "max_deliver = 1");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run test_worker")
    };
    let out = run(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let report = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    assert_eq!(printed, serde_json::to_value(&report).expect("to json"));
    assert_eq!(printed["consumers"][0]["pending"], 3);
    assert_eq!(printed["consumers"][0]["dead_letters"], 0);

    let out = run(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("STREAM "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["jobs", "EVENTS", "3", "0", "0", "0", "0"]),
        "{text}"
    );

    // An unreachable server is a clear error, exit 1.
    drop(server);
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    let _ = client;
}

/// A partitioned consumer (`jobs` in 2 partitions of `jobs.<partition>.<key>`) shows as
/// its two partition consumers, each with the server's figures, the group's dead
/// letters (shared) and, while a worker runs, the replica holding its lease.
#[tokio::test]
async fn a_partitioned_consumer_shows_each_partition_and_its_lease_holder() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let config = config(
        &server.url(),
        r#"filter_subject = "jobs.*.>"
ordered_by = { subject_token = 2 }
partitions = { count = 2, subject_token = 1, lease = "2s" }
max_deliver = 2"#,
    );
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let mut jobs: Vec<Job> = (1..=4).map(Job::ok).collect();
    jobs.extend((5..=6).map(Job::permanent));
    publish_partitioned_jobs(&js, &jobs, 2).await;
    let probe = Arc::new(Probe::default());
    let worker = InProcessWorker::start(
        config.clone(),
        App::new(probe.clone()).handler("scripted", scripted),
    );
    wait_until(
        Duration::from_secs(20),
        "4 handled, 2 dead letters, both leases held",
        || async {
            let report = jetworker_cli::collect_status(&js, &config)
                .await
                .expect("status");
            probe.succeeded_ids() == 4
                && count(&js, "DLQ").await == 2
                && report.consumers.iter().all(|c| c.lease_holder.is_some())
        },
    )
    .await;
    let report = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    let names: Vec<&str> = report.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["jobs-0", "jobs-1"]);
    let leases = js
        .get_key_value("jw_leases_EVENTS_jobs")
        .await
        .expect("lease bucket");
    for (index, c) in (0u32..).zip(&report.consumers) {
        assert!(c.exists);
        assert_eq!(c.partition_of.as_deref(), Some("jobs"));
        assert_eq!(c.partition, Some(index));
        let held = leases
            .get(jetworker::partition_lease_key(index))
            .await
            .expect("lease")
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        assert_eq!(c.lease_holder, held);
        assert_eq!(c.dead_letters, Some(2), "the group's dead letters");
        assert_eq!(
            c.dead_letter_subject_shared_with,
            [format!("jobs-{}", 1 - index)]
        );
    }
    // The letters name the partition consumer that gave up.
    let letter_consumers: std::collections::BTreeSet<String> = messages(&js, "DLQ")
        .await
        .iter()
        .filter_map(|m| header(m, jetworker::headers::CONSUMER))
        .collect();
    assert!(
        letter_consumers
            .iter()
            .all(|c| c == "jobs-0" || c == "jobs-1"),
        "{letter_consumers:?}"
    );
    // `dlq --consumer jobs` selects the letters of both partitions, decoded with the
    // group's codec; a partition's name selects its own only.
    let dlq = jetworker_cli::Dlq::new(js.clone(), &config).expect("dlq");
    let of = |consumers: &[&str]| jetworker_cli::Filter {
        consumers: consumers.iter().map(|c| c.to_string()).collect(),
        ..jetworker_cli::Filter::default()
    };
    let letters = dlq.list(&of(&["jobs"])).await.expect("list");
    assert_eq!(letters.len(), 2);
    for letter in &letters {
        assert_eq!(dlq.codec_of(letter), Some(jetworker::CodecKind::Msgpack));
    }
    let mut one_by_one = 0;
    for name in &letter_consumers {
        one_by_one += dlq.list(&of(&[name])).await.expect("list").len();
    }
    assert_eq!(one_by_one, 2);
    worker.stop().await;

    // Three more with no worker: pending on their partitions, every lease given back.
    publish_partitioned_jobs(&js, &(7..=9).map(Job::ok).collect::<Vec<_>>(), 2).await;
    let report = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    let mut pending = 0;
    for c in &report.consumers {
        let info = consumer_info(&js, "EVENTS", &c.name).await;
        assert_eq!(c.pending, info.num_pending);
        assert_eq!(c.ack_pending, info.num_ack_pending as u64);
        assert_eq!(c.redelivered, info.num_redelivered as u64);
        assert_eq!(c.lease_holder, None, "given back at shutdown");
        pending += c.pending;
    }
    assert_eq!(pending, 3);
    let table = report.table();
    assert!(table.contains("LEASE HELD BY"), "{table}");
    assert!(
        table
            .lines()
            .filter(|l| l.starts_with("jobs-") && l.ends_with("free"))
            .count()
            == 2,
        "{table}"
    );
}

/// The replica a lease value names (`<pid>-<random>`, see the worker's "lease taken"
/// log line): its pid.
fn holder_pid(holder: &str) -> Option<u32> {
    holder.split('-').next()?.parse().ok()
}

/// The lease holder `status` shows for the only consumer of `config`, once it is one of
/// `pids` (the replica processes that may hold it); fails the test after 30 s.
async fn wait_for_holder(
    js: &jetstream::Context,
    config: &jetworker::Config,
    pids: &[u32],
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let report = jetworker_cli::collect_status(js, config)
            .await
            .expect("status");
        let holder = report.consumers[0].lease_holder.clone();
        if let Some(holder) =
            holder.filter(|h| holder_pid(h).is_some_and(|pid| pids.contains(&pid)))
        {
            return holder;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status names none of {pids:?} holding the lease: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An ordered consumer without partitions (`jobs` ordered by its subject's id token) in
/// two replica processes: `status` (library, `--json` and the table through the binary)
/// names the replica holding its lease, and, after that replica stops, the other one,
/// which took the consumer over; with both stopped the lease is free.
#[tokio::test]
async fn an_ordered_consumer_without_partitions_shows_the_replica_holding_its_lease() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let lines = "ordered_by = { subject_token = 1 }";
    let config = config(&server.url(), lines);
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let before = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    let c = &before.consumers[0];
    assert_eq!(
        (c.name.as_str(), c.partition, c.lease_bucket.as_deref()),
        ("jobs", None, Some("jw_leases_EVENTS_jobs"))
    );
    assert_eq!(c.lease_holder, None, "no replica runs yet");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config_file(dir.path(), &server.url(), lines);
    let spawn = || {
        WorkerProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
                .args(["--config", &path.display().to_string(), "run"])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    };
    let mut replicas = vec![spawn(), spawn()];
    let pids: Vec<u32> = replicas.iter().map(WorkerProcess::pid).collect();
    let holder = wait_for_holder(&js, &config, &pids).await;
    let leases = js
        .get_key_value("jw_leases_EVENTS_jobs")
        .await
        .expect("lease bucket");
    let held = leases
        .get(jetworker::partition_lease_key(0))
        .await
        .expect("lease")
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    assert_eq!(
        held.as_deref(),
        Some(holder.as_str()),
        "the lease's own value"
    );

    // The binary says the same, as JSON and in the table's lease column.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run test_worker");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let printed: serde_json::Value =
        serde_json::from_str(&run(&["status", "--json"])).expect("json");
    assert_eq!(printed["consumers"][0]["lease_holder"], holder.as_str());
    assert_eq!(
        printed["consumers"][0]["lease_bucket"],
        "jw_leases_EVENTS_jobs"
    );
    let table = run(&["status"]);
    assert!(table.contains("LEASE HELD BY"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("jobs ") && l.ends_with(&holder)),
        "{table}"
    );

    // The holder stops (giving the lease back): the other replica takes it over.
    let stopping = replicas
        .iter()
        .position(|r| Some(r.pid()) == holder_pid(&holder))
        .expect("one of the two holds it");
    let mut stopped = replicas.swap_remove(stopping);
    stopped.signal("TERM");
    assert!(stopped.wait_exit(Duration::from_secs(20)).success());
    let other = replicas[0].pid();
    let next = wait_for_holder(&js, &config, &[other]).await;
    assert_ne!(next, holder);

    // Nobody left: the lease is free.
    replicas[0].signal("TERM");
    assert!(replicas[0].wait_exit(Duration::from_secs(20)).success());
    let after = jetworker_cli::collect_status(&js, &config)
        .await
        .expect("status");
    assert_eq!(
        after.consumers[0].lease_holder, None,
        "given back at shutdown"
    );
    assert!(
        after
            .table()
            .lines()
            .any(|l| l.starts_with("jobs ") && l.ends_with("free")),
        "{}",
        after.table()
    );
}
