//! The safety net: a message whose last delivery never settles (the worker is killed)
//! is dead-lettered with reason `abandoned`, once; an original already gone is recorded;
//! a copy that cannot be stored is held, then handed over and filed with the handler's
//! reason; a dead-letter stream edited behind the worker to drop copies is seen, and
//! nothing is lost.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy};

use common::*;
use jetworker::headers as dead_letter;
use jetworker::headers::ORIGINAL_MISSING;
use jetworker::testing::server::NatsServer;
use jetworker::{App, ADVISORY_STREAM};
use jetworker_suite::{scripted, Job, Mode, Probe};
use tokio_util::sync::CancellationToken;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, url: &str, events_extra: &str) -> PathBuf {
    ConfigText::new(url)
        .worker(r#"shutdown_grace = "2s""#)
        .with_jobs()
        .in_stream("EVENTS", events_extra)
        .in_consumer(
            "jobs",
            r#"max_deliver = 1
ack_wait = "1s"
handler_timeout = "1m""#,
        )
        .write(dir)
}

fn spawn(config: &Path, log: &Path) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("JW_TEST_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    )
}

fn started(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("start "))
        .count()
}

async fn provisioned(js: &async_nats::jetstream::Context) -> bool {
    match js.get_stream("EVENTS").await {
        Ok(s) => {
            s.consumer_info("jobs").await.is_ok() && js.get_stream(ADVISORY_STREAM).await.is_ok()
        }
        Err(_) => false,
    }
}

/// A worker in this process running the `scripted` handler, its ops endpoint on a free
/// port, ready.
struct OpsWorker {
    probe: Arc<Probe>,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    waiter:
        tokio::task::JoinHandle<std::collections::BTreeMap<String, Arc<jetworker::ConsumerStats>>>,
}

impl OpsWorker {
    async fn start(mut config: jetworker::Config) -> OpsWorker {
        // The worker's log, for a failure's diagnosis (`RUST_LOG=jetworker=info`).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        config.worker.ops_listen = "127.0.0.1:0".into();
        let probe = Arc::new(Probe::default());
        let stop = CancellationToken::new();
        let running = App::new(probe.clone())
            .handler("scripted", scripted)
            .start(config, stop.clone())
            .await
            .expect("start");
        let addr = running.ops_address().expect("ops enabled");
        let waiter = tokio::spawn(running.wait());
        wait_until(Duration::from_secs(10), "ready", || async {
            http_get(addr, "/readyz").await.0 == 200
        })
        .await;
        OpsWorker {
            probe,
            addr,
            stop,
            waiter,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.waiter)
            .await
            .expect("stops in time")
            .expect("task");
    }
}

#[tokio::test]
async fn a_killed_last_attempt_is_dead_lettered_as_abandoned_once() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config(dir.path(), &server.url(), "");
    let (_c, js) = connect(&server.url()).await;

    let worker = spawn(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        provisioned(&js).await
    })
    .await;
    let hang = |id| Job {
        id,
        mode: Mode::Sleep,
        until: 9,
        sleep_ms: 600_000,
    };
    publish_jobs(&js, &[hang(1), hang(2)]).await;
    wait_until(Duration::from_secs(10), "both started", || async {
        started(&log) == 2
    })
    .await;
    drop(worker); // kill -9 during the last (only) allowed delivery

    // The advisories are captured while no worker runs.
    wait_until(Duration::from_secs(15), "advisories captured", || async {
        count(&js, ADVISORY_STREAM).await == 2
    })
    .await;
    assert_eq!(count(&js, "DLQ").await, 0);

    let _worker = spawn(&config, &log);
    wait_until(
        Duration::from_secs(20),
        "dead-lettered by the safety net",
        || async { count(&js, "DLQ").await == 2 },
    )
    .await;
    let letters = messages(&js, "DLQ").await;
    for m in &letters {
        assert_eq!(header(m, dead_letter::REASON).as_deref(), Some("abandoned"));
        assert_eq!(header(m, dead_letter::ATTEMPTS).as_deref(), Some("1"));
        assert_eq!(header(m, dead_letter::CONSUMER).as_deref(), Some("jobs"));
        let seq = header(m, dead_letter::SEQUENCE).expect("sequence");
        assert_eq!(
            header(m, "Nats-Msg-Id"),
            Some(format!("jetworker-dl.EVENTS.{seq}.jobs")),
            "same id as the normal path"
        );
        let job: Job = rmp_serde::from_slice(&m.payload).expect("original payload");
        assert_eq!(
            header(m, dead_letter::ORIGINAL_SUBJECT),
            Some(format!("jobs.{}", job.id))
        );
    }
    // Processing the advisories again (a redelivery) stores nothing new.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&js, "DLQ").await, 2, "exactly once");
    assert_eq!(started(&log), 2, "never handled again");
}

#[tokio::test]
async fn an_original_already_gone_is_recorded_not_skipped() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config(
        dir.path(),
        &server.url(),
        "max_age = \"3s\"\nduplicate_window = \"1s\"",
    );
    let (_c, js) = connect(&server.url()).await;

    let worker = spawn(&config, &log);
    wait_until(Duration::from_secs(15), "provisioned", || async {
        provisioned(&js).await
    })
    .await;
    publish_jobs(
        &js,
        &[Job {
            id: 1,
            mode: Mode::Sleep,
            until: 9,
            sleep_ms: 600_000,
        }],
    )
    .await;
    wait_until(Duration::from_secs(10), "started", || async {
        started(&log) == 1
    })
    .await;
    drop(worker);
    wait_until(Duration::from_secs(15), "advisory captured", || async {
        count(&js, ADVISORY_STREAM).await == 1
    })
    .await;
    wait_until(Duration::from_secs(15), "original aged out", || async {
        count(&js, "EVENTS").await == 0
    })
    .await;

    let _worker = spawn(&config, &log);
    wait_until(Duration::from_secs(20), "recorded", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    let m = &messages(&js, "DLQ").await[0];
    assert_eq!(header(m, dead_letter::REASON).as_deref(), Some("abandoned"));
    assert_eq!(header(m, ORIGINAL_MISSING).as_deref(), Some("true"));
    assert!(
        header(m, dead_letter::ERROR).is_some_and(|e| e.contains("gone")),
        "{:?}",
        header(m, dead_letter::ERROR)
    );
    assert!(m.payload.is_empty());
}

/// A dead-letter copy that can never be stored (the dead-letter stream's max_msg_size
/// lowered behind the worker's back) holds its handler slot for a bounded time only:
/// meanwhile `/readyz` says why and `/metrics` counts the originals held (in at most half
/// the slots: more go to the safety net at once); then each original is handed to the
/// safety net, the good messages run, and once the stream takes copies again the safety
/// net files each stranded message once.
#[tokio::test]
async fn a_copy_that_cannot_be_stored_frees_its_slot_shows_in_readyz_and_reaches_the_safety_net() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let config = suite_config(&server.url())
        .in_consumer(
            "jobs",
            "max_deliver = 1\nack_wait = \"2s\"\nconcurrency = 4",
        )
        .load();
    let worker = OpsWorker::start(config).await;
    let (addr, probe) = (worker.addr, worker.probe.clone());

    // Behind the worker's back: the dead-letter stream refuses anything but tiny messages.
    set_max_msg_size(&js, "DLQ", 64).await;
    // A third one finds half the slots holding: handed to the safety net at once.
    publish_jobs(
        &js,
        &[Job::permanent(1), Job::permanent(2), Job::permanent(3)],
    )
    .await;
    wait_until(Duration::from_secs(10), "both held", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        metric(&text, "jetworker_dead_letters_held{consumer=\"jobs\"}") == Some(2.0)
    })
    .await;
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("consumer jobs")
            && body.contains("would drop copies")
            && body.contains("max_msg_size 64"),
        "{body}"
    );
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "a restart would not help"
    );

    // Good messages run meanwhile in the slots not holding (at most half hold), and
    // the held ones are handed over after the hold limit (5 s).
    let good: Vec<Job> = (10..30).map(Job::ok).collect();
    publish_jobs(&js, &good).await;
    wait_until(Duration::from_secs(20), "the good messages ran", || async {
        probe.succeeded_ids() == 20
    })
    .await;
    wait_until(Duration::from_secs(10), "none held", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        metric(&text, "jetworker_dead_letters_held{consumer=\"jobs\"}") == Some(0.0)
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "jetworker_dead_letters_handed_to_safety_net_total{consumer=\"jobs\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(count(&js, "DLQ").await, 0);
    assert_eq!(count(&js, "EVENTS").await, 23, "the originals are kept");
    // Each hand-over is recorded in the advisory stream before its nak, with the reason:
    // it does not rest on the server's advisory (lost while that stream has no leader).
    let mut recorded: Vec<(u64, String)> = messages(&js, ADVISORY_STREAM)
        .await
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .filter(|v| v["type"] == jetworker::SAFETY_NET_HAND_OFF_TYPE)
        .map(|v| {
            (
                v["stream_seq"].as_u64().expect("stream_seq"),
                v["reason"].as_str().expect("reason").to_string(),
            )
        })
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        (1..=3)
            .map(|s| (s, "permanent".to_string()))
            .collect::<Vec<_>>()
    );

    // The stream takes copies again: the safety net files both, once each.
    set_max_msg_size(&js, "DLQ", -1).await;
    wait_until(
        Duration::from_secs(60),
        "all filed by the safety net",
        || async { count(&js, "DLQ").await == 3 },
    )
    .await;
    let letters = messages(&js, "DLQ").await;
    let ids: std::collections::BTreeSet<u64> = letters
        .iter()
        .map(|m| {
            rmp_serde::from_slice::<Job>(&m.payload)
                .expect("original payload")
                .id
        })
        .collect();
    assert_eq!(ids, [1, 2, 3].into_iter().collect());
    assert_eq!(probe.attempts(1).len(), 1, "the handler ran once");
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    worker.stop().await;
}

/// A worker's hand-off record alone (no server advisory, no note in this process)
/// makes the safety net file the original with the record's reason and error: a
/// replica that did not hand the message over, or the same worker after a restart,
/// says what the handing worker knew.
#[tokio::test]
async fn a_hand_off_record_alone_files_the_original_with_its_reason() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let config = suite_config(&server.url()).load();
    let worker = OpsWorker::start(config).await;
    let probe = worker.probe.clone();
    publish_jobs(&js, &[Job::ok(7)]).await;
    wait_until(Duration::from_secs(10), "handled", || async {
        probe.succeeded_ids() == 1
    })
    .await;
    let record = serde_json::json!({
        "type": jetworker::SAFETY_NET_HAND_OFF_TYPE,
        "stream": "EVENTS", "consumer": "jobs", "stream_seq": 1, "deliveries": 3,
        "reason": "permanent", "error": "card declined; handed to the safety net: DLQ down",
    });
    js.publish(
        jetworker::safety_net_advisory_subject("EVENTS", "jobs"),
        record.to_string().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("captured by the advisory stream");
    wait_until(Duration::from_secs(20), "filed", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    let m = &messages(&js, "DLQ").await[0];
    assert_eq!(header(m, dead_letter::REASON).as_deref(), Some("permanent"));
    assert_eq!(
        header(m, dead_letter::ERROR).as_deref(),
        Some("card declined; handed to the safety net: DLQ down")
    );
    assert_eq!(header(m, dead_letter::ATTEMPTS).as_deref(), Some("3"));
    let job: Job = rmp_serde::from_slice(&m.payload).expect("original payload");
    assert_eq!(job.id, 7);
    worker.stop().await;
}

/// One way to make the dead-letter stream drop copies, what `/readyz` then says, and
/// whether the server accepted the edit.
struct Edit {
    name: &'static str,
    says: &'static str,
}

async fn dlq_config(js: &async_nats::jetstream::Context) -> StreamConfig {
    js.get_stream("DLQ")
        .await
        .expect("DLQ")
        .cached_info()
        .config
        .clone()
}

/// Applies `edit` to the DLQ stream; false when the server refuses it (2.9 cannot change
/// a stream's retention).
async fn apply(js: &async_nats::jetstream::Context, edit: &str, kept: &StreamConfig) -> bool {
    let mut config = kept.clone();
    match edit {
        "deleted" => {
            js.delete_stream("DLQ").await.expect("delete DLQ");
            return true;
        }
        "interest" => config.retention = RetentionPolicy::Interest,
        "max_msg_size" => config.max_message_size = 64,
        "subject" => config.subjects = vec!["dlq.somewhere_else".into()],
        "full" => {
            config.discard = DiscardPolicy::New;
            config.max_messages = i64::try_from(count(js, "DLQ").await).expect("count");
        }
        other => panic!("no edit {other}"),
    }
    match js.update_stream(config).await {
        Ok(_) => true,
        Err(e) => {
            eprintln!("the server refuses the edit {edit:?}: {e}");
            false
        }
    }
}

/// Puts the DLQ stream back as it was.
async fn restore(js: &async_nats::jetstream::Context, kept: &StreamConfig) {
    match js.get_stream("DLQ").await {
        Ok(_) => {
            js.update_stream(kept.clone()).await.expect("restore DLQ");
        }
        Err(_) => {
            js.create_stream(kept.clone()).await.expect("recreate DLQ");
        }
    }
}

#[tokio::test]
async fn a_dead_letter_stream_edited_to_drop_copies_is_seen_and_nothing_is_lost() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let config = suite_config(&server.url())
        .in_stream("DLQ", "duplicate_window = \"2s\"")
        .in_consumer(
            "jobs",
            "max_deliver = 2\nbackoff = [\"500ms\"]\nack_wait = \"2s\"\nconcurrency = 4",
        )
        .load();
    let worker = OpsWorker::start(config).await;
    let (addr, probe) = (worker.addr, worker.probe.clone());
    let unfit = "jetworker_dead_letter_stream_unfit{consumer=\"jobs\"}";
    let handed_over = "jetworker_dead_letters_handed_to_safety_net_total{consumer=\"jobs\"}";
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(metric(&text, unfit), Some(0.0), "{text}");
    let kept = dlq_config(&js).await;

    let edits = [
        Edit {
            name: "deleted",
            says: "is captured by no stream",
        },
        Edit {
            name: "interest",
            says: "retention = \"interest\"",
        },
        Edit {
            name: "max_msg_size",
            says: "max_msg_size 64",
        },
        Edit {
            name: "subject",
            says: "is captured by no stream",
        },
        Edit {
            name: "full",
            says: "discard = \"new\"",
        },
    ];
    let mut permanent_ids = Vec::new();
    let mut good_ids = 0;
    let mut next_id = 1;
    for edit in &edits {
        if !apply(&js, edit.name, &kept).await {
            continue;
        }
        // One message that fails for good, and good ones that must go on running.
        let id = next_id;
        permanent_ids.push(id);
        let good: Vec<Job> = (id + 1..id + 11).map(Job::ok).collect();
        good_ids += good.len();
        next_id += 11;
        publish_jobs(&js, &[Job::permanent(id)]).await;
        publish_jobs(&js, &good).await;
        wait_until(
            Duration::from_secs(20),
            &format!("{}: /readyz says the stream would drop copies", edit.name),
            || async {
                let (status, body) = http_get(addr, "/readyz").await;
                status == 503
                    && body.contains("would drop copies")
                    && body.contains("consumer jobs")
                    && body.contains(edit.says)
            },
        )
        .await;
        let (_, text) = http_get(addr, "/metrics").await;
        assert_eq!(metric(&text, unfit), Some(1.0), "{}: {text}", edit.name);
        assert_eq!(
            http_get(addr, "/healthz").await.0,
            200,
            "a restart would not help"
        );
        wait_until(
            Duration::from_secs(20),
            &format!("{}: the good messages ran", edit.name),
            || async { probe.succeeded_ids() == good_ids },
        )
        .await;
        // Nothing termed meanwhile: the failing original is still in its stream.
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        assert!(
            info.ack_floor.stream_sequence < id,
            "{}: the failing original was not termed: {info:?}",
            edit.name
        );

        // Held for one ack wait (5 s at least), then handed to the safety net.
        let phases = permanent_ids.len();
        wait_until(
            Duration::from_secs(20),
            &format!("{}: handed to the safety net", edit.name),
            || async {
                let (_, text) = http_get(addr, "/metrics").await;
                metric(&text, handed_over) == Some(phases as f64)
            },
        )
        .await;
        assert_eq!(
            count(&js, "DLQ").await,
            if edit.name == "deleted" {
                0
            } else {
                phases as u64 - 1
            },
            "{}: no letter filed while the stream would drop it",
            edit.name
        );
        eprintln!(
            "{}: seen, held, handed over; restoring the stream",
            edit.name
        );
        restore(&js, &kept).await;
        // Within a read of the stream (30 s) and the safety net's next retry.
        wait_until(
            Duration::from_secs(40),
            &format!("{}: ready again, the letter filed", edit.name),
            || async {
                http_get(addr, "/readyz").await.0 == 200 && count(&js, "DLQ").await == phases as u64
            },
        )
        .await;
        let (_, text) = http_get(addr, "/metrics").await;
        assert_eq!(metric(&text, unfit), Some(0.0), "{}: {text}", edit.name);
        eprintln!("{}: ready again, the letter filed", edit.name);
    }

    // Every message processed, or in the dead-letter stream once, with the handler's
    // reason (also those the safety net filed after a hand-off).
    let letters = messages(&js, "DLQ").await;
    let mut filed: BTreeMap<u64, usize> = BTreeMap::new();
    for letter in &letters {
        let job: Job = rmp_serde::from_slice(&letter.payload).expect("original payload");
        *filed.entry(job.id).or_default() += 1;
        assert_eq!(
            header(letter, dead_letter::REASON).as_deref(),
            Some("permanent"),
            "letter of {}: {:?}",
            job.id,
            header(letter, dead_letter::ERROR)
        );
    }
    let expected: BTreeMap<u64, usize> = permanent_ids.iter().map(|id| (*id, 1)).collect();
    assert_eq!(filed, expected, "each failing message dead-lettered once");
    assert_eq!(probe.succeeded_ids(), good_ids);
    let (_, text) = http_get(addr, "/metrics").await;
    let handed = metric(&text, handed_over).unwrap_or(0.0);
    let by_safety_net = letters
        .iter()
        .filter(|l| {
            header(l, dead_letter::ERROR).is_some_and(|e| e.contains("handed to the safety net"))
        })
        .count();
    eprintln!(
        "{} letters, {by_safety_net} filed by the safety net, {handed} handed over, {} edits applied",
        letters.len(),
        permanent_ids.len()
    );
    assert_eq!(handed, permanent_ids.len() as f64, "{text}");
    assert_eq!(
        by_safety_net,
        permanent_ids.len(),
        "the safety net filed each with the handler's reason and error"
    );
    wait_until(Duration::from_secs(10), "nothing pending", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        (info.num_pending, info.num_ack_pending) == (0, 0)
    })
    .await;
    worker.stop().await;
}

/// A copy acknowledged by a dead-letter stream with interest retention and no consumer is
/// dropped, but its `Nats-Msg-Id` stays in the stream's duplicate window: once the stream
/// is fixed, the next publish of that copy gets a `duplicate` PubAck for a letter the
/// stream does not have. It is not believed (the letter is read back): the original is
/// kept until the copy is stored for real. (2.10+: 2.9 cannot change a stream's
/// retention.)
#[tokio::test]
async fn a_duplicate_pub_ack_for_a_dropped_copy_is_not_believed() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let config = suite_config(&server.url())
        .in_stream("DLQ", "duplicate_window = \"10s\"")
        .in_consumer(
            "jobs",
            "max_deliver = 3\nbackoff = [\"500ms\"]\nack_wait = \"2s\"\nconcurrency = 4",
        )
        .load();
    let worker = OpsWorker::start(config).await;
    let kept = dlq_config(&js).await;
    let mut interest = kept.clone();
    interest.retention = RetentionPolicy::Interest;
    if let Err(e) = js.update_stream(interest).await {
        eprintln!("skipped: the server cannot change a stream's retention: {e}");
        worker.stop().await;
        return;
    }
    publish_jobs(&js, &[Job::permanent(1)]).await;
    wait_until(Duration::from_secs(10), "the dropped copy seen", || async {
        let (status, body) = http_get(worker.addr, "/readyz").await;
        status == 503 && body.contains("retention = \"interest\"")
    })
    .await;
    restore(&js, &kept).await;
    wait_until(
        Duration::from_secs(40),
        "the copy stored for real",
        || async { count(&js, "DLQ").await == 1 },
    )
    .await;
    let letters = messages(&js, "DLQ").await;
    let job: Job = rmp_serde::from_slice(&letters[0].payload).expect("original payload");
    assert_eq!(job.id, 1);
    assert_eq!(
        header(&letters[0], dead_letter::REASON).as_deref(),
        Some("permanent")
    );
    worker.stop().await;
}
