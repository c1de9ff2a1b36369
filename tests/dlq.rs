//! `dlq list / show / replay / purge` against a real nats-server: dead letters made by a
//! running worker and crafted by hand, filters, payload decoding, replay handled by the
//! worker, replay of everything, purge of a selection, an interrupted replay that is
//! deduplicated when run again, and the command line's confirmation rules.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::DeadLetter;
use jetworker::Reason;
use jetworker::{App, Context, Event, HandlerError};
use jetworker_cli::{Dlq, DlqErrorKind, Filter, PayloadEncoding};
use jetworker_suite::Job;

/// A handler that refuses every job (permanently) until the test flips `accept`, then
/// records what it handled with the headers it saw.
#[derive(Default)]
struct Gate {
    accept: AtomicBool,
    handled: Mutex<Vec<(u64, u64, Option<String>)>>,
}

impl Gate {
    fn handled_ids(&self) -> Vec<u64> {
        self.handled
            .lock()
            .map(|h| h.iter().map(|(id, _, _)| *id).collect())
            .unwrap_or_default()
    }
}

async fn refuse_until_accepted(
    job: Event<Job>,
    ctx: Context<Arc<Gate>>,
) -> Result<(), HandlerError> {
    let gate = ctx.state().clone();
    if !gate.accept.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent(format!("job {} refused", job.id)));
    }
    let replays = ctx
        .headers()
        .get(dead_letter::REPLAY_COUNT)
        .map(|v| v.as_str().to_string());
    if let Ok(mut h) = gate.handled.lock() {
        h.push((job.id, ctx.attempt(), replays));
    }
    Ok(())
}

/// Publishes a dead letter the way the runtime does, for a job that was never in EVENTS.
async fn craft_dead_letter(
    js: &jetstream::Context,
    job: &Job,
    consumer: &str,
    reason: Reason,
    sequence: u64,
    original_headers: HeaderMap,
) {
    let letter = DeadLetter {
        subject: format!("jobs.{}", job.id),
        headers: original_headers,
        stream: "EVENTS".into(),
        sequence,
        consumer: consumer.into(),
        attempts: 5,
        reason,
        error: format!("crafted {reason}"),
    };
    let payload = rmp_serde::to_vec_named(job).expect("encode");
    letter
        .publish(js, "dlq.jobs", payload.into(), Duration::from_secs(5))
        .await
        .expect("dead letter stored");
}

async fn provisioned(url: &str, extra: &str) -> (async_nats::Client, jetstream::Context, Config) {
    let (client, js) = connect(url).await;
    let config = config(url, extra);
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    (client, js, config)
}

fn ids_of(letters: &[jetworker_cli::Letter]) -> BTreeSet<u64> {
    letters
        .iter()
        .map(|l| {
            rmp_serde::from_slice::<Job>(&l.payload)
                .expect("job payload")
                .id
        })
        .collect()
}

fn set(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

#[tokio::test]
async fn list_filters_show_replay_and_purge() {
    let server = NatsServer::start().expect("server");
    let (_client, js, config) = provisioned(&server.url(), "max_deliver = 1").await;
    let gate_state = Arc::new(Gate::default());
    let worker = InProcessWorker::start(
        config.clone(),
        App::new(gate_state.clone()).handler("scripted", refuse_until_accepted),
    );

    // Four jobs refused by the worker: four `permanent` dead letters of consumer jobs.
    publish_jobs(&js, &(1..=4).map(Job::ok).collect::<Vec<_>>()).await;
    wait_until(Duration::from_secs(15), "4 dead letters", || async {
        count(&js, "DLQ").await == 4
    })
    .await;
    // Two crafted ones: an `exhausted` one of jobs, and one of a consumer `other`.
    craft_dead_letter(
        &js,
        &Job::ok(100),
        "jobs",
        Reason::Exhausted,
        1000,
        HeaderMap::new(),
    )
    .await;
    craft_dead_letter(
        &js,
        &Job::ok(200),
        "other",
        Reason::Decode,
        2000,
        HeaderMap::new(),
    )
    .await;

    let dlq = Dlq::new(js.clone(), &config).expect("dlq");
    let all = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(ids_of(&all), set(&[1, 2, 3, 4, 100, 200]));
    let seqs: Vec<u64> = all.iter().map(|l| l.sequence).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");

    let by = |filter: Filter| {
        let dlq = dlq.clone();
        async move { ids_of(&dlq.list(&filter).await.expect("list")) }
    };
    assert_eq!(
        by(Filter {
            reasons: vec![Reason::Permanent],
            ..Filter::default()
        })
        .await,
        set(&[1, 2, 3, 4])
    );
    assert_eq!(
        by(Filter {
            reasons: vec![Reason::Exhausted, Reason::Decode],
            ..Filter::default()
        })
        .await,
        set(&[100, 200])
    );
    assert_eq!(
        by(Filter {
            consumers: vec!["jobs".into()],
            ..Filter::default()
        })
        .await,
        set(&[1, 2, 3, 4, 100])
    );
    assert_eq!(
        by(Filter {
            consumers: vec!["other".into()],
            ..Filter::default()
        })
        .await,
        set(&[200])
    );
    let hour = Duration::from_secs(3600);
    assert_eq!(
        by(Filter {
            since: Some(all[0].time - hour),
            ..Filter::default()
        })
        .await
        .len(),
        6
    );
    assert!(by(Filter {
        since: Some(all[5].time + Duration::from_secs(300)),
        ..Filter::default()
    })
    .await
    .is_empty());
    assert!(by(Filter {
        until: Some(all[0].time - hour),
        ..Filter::default()
    })
    .await
    .is_empty());
    // Since the time of the 5th dead letter: the two crafted ones.
    assert_eq!(
        by(Filter {
            since: Some(all[4].time),
            ..Filter::default()
        })
        .await,
        set(&[100, 200])
    );

    // Who else a replay reaches: `jobs` reads every jobs.> subject, so the dead letter
    // of `other` goes to it too; `jobs`' own dead letters reach nobody else.
    let of_other = all
        .iter()
        .find(|l| l.consumer() == Some("other"))
        .expect("other's dead letter");
    assert_eq!(dlq.other_readers(of_other), ["jobs"]);
    assert!(dlq.other_readers(&all[0]).is_empty());

    // show: every header, the payload decoded with the consumer's codec.
    let first = dlq.get(None, all[0].sequence).await.expect("get");
    let detail = first.detail(dlq.codec_of(&first));
    assert_eq!(detail.payload.encoding, PayloadEncoding::Msgpack);
    let shown_id = detail.payload.value["id"].as_u64().expect("id");
    assert!((1..=4).contains(&shown_id));
    assert_eq!(detail.summary.reason.as_deref(), Some("permanent"));
    assert_eq!(detail.summary.consumer.as_deref(), Some("jobs"));
    assert_eq!(
        detail.headers[dead_letter::ERROR],
        [format!("job {shown_id} refused")]
    );
    assert!(detail.headers.contains_key("Nats-Msg-Id"));
    let text = detail.text(&first.payload);
    assert!(text.contains(&format!("\"id\": {shown_id}")), "{text}");
    let missing = dlq.get(None, 999_999).await.expect_err("no such message");
    assert_eq!(missing.kind(), DlqErrorKind::NotFound);

    // replay one: the worker now accepts; the replayed message is a new message with a
    // replay count, handled on its attempt 1, and the dead letter is gone.
    gate_state.accept.store(true, Ordering::SeqCst);
    let replayed = dlq.replay_one(&first).await.expect("replay");
    assert_eq!(replayed.subject, format!("jobs.{shown_id}"));
    assert_eq!(replayed.replay_count, 1);
    assert_eq!(
        replayed.message_id,
        format!("replay:DLQ:{}:1", first.sequence)
    );
    assert!(!replayed.duplicate);
    wait_until(Duration::from_secs(10), "replayed job handled", || async {
        gate_state.handled_ids() == [shown_id]
    })
    .await;
    let handled = gate_state.handled.lock().expect("lock").clone();
    assert_eq!(handled[0].1, 1, "a replay starts at attempt 1");
    assert_eq!(handled[0].2.as_deref(), Some("1"), "replay count header");
    let gone = dlq
        .get(None, first.sequence)
        .await
        .expect_err("deleted after replay");
    assert_eq!(gone.kind(), DlqErrorKind::NotFound);
    // The republished copy carries no dead-letter headers.
    let copy = js
        .get_stream("EVENTS")
        .await
        .expect("stream")
        .get_raw_message(replayed.target_sequence)
        .await
        .expect("replayed copy");
    assert_eq!(
        header(&copy, "Nats-Msg-Id").as_deref(),
        Some(replayed.message_id.as_str())
    );
    assert_eq!(
        header(&copy, dead_letter::REPLAY_COUNT).as_deref(),
        Some("1")
    );
    for name in [
        dead_letter::REASON,
        dead_letter::ERROR,
        dead_letter::CONSUMER,
        dead_letter::ORIGINAL_SUBJECT,
    ] {
        assert!(header(&copy, name).is_none(), "{name} removed");
    }

    // purge a selection: the `decode` one only.
    let decode = dlq
        .list(&Filter {
            reasons: vec![Reason::Decode],
            ..Filter::default()
        })
        .await
        .expect("list");
    let report = dlq.purge(&decode).await.expect("purge");
    assert_eq!((report.deleted, report.already_gone), (1, 0));
    assert_eq!(
        ids_of(&dlq.list(&Filter::default()).await.expect("list")),
        set(&[1, 2, 3, 4, 100])
            .difference(&set(&[shown_id]))
            .copied()
            .collect()
    );
    // Purging it again finds it gone, without an error.
    let again = dlq.purge(&decode).await.expect("purge again");
    assert_eq!((again.deleted, again.already_gone), (0, 1));

    // replay --all: every remaining dead letter goes back and is handled.
    let rest = dlq.list(&Filter::default()).await.expect("list");
    let report = dlq.replay(&rest).await;
    assert!(report.failed.is_none(), "{:?}", report.failed);
    assert!(report.skipped.is_empty());
    assert_eq!(report.replayed.len(), 4);
    wait_until(Duration::from_secs(10), "all replays handled", || async {
        gate_state
            .handled_ids()
            .into_iter()
            .collect::<BTreeSet<_>>()
            == set(&[1, 2, 3, 4, 100])
    })
    .await;
    assert!(dlq.list(&Filter::default()).await.expect("list").is_empty());
    assert_eq!(count(&js, "DLQ").await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn a_replayed_message_that_fails_again_counts_its_replays() {
    let server = NatsServer::start().expect("server");
    let (_client, js, config) = provisioned(&server.url(), "max_deliver = 1").await;
    let gate_state = Arc::new(Gate::default());
    let worker = InProcessWorker::start(
        config.clone(),
        App::new(gate_state.clone()).handler("scripted", refuse_until_accepted),
    );
    let dlq = Dlq::new(js.clone(), &config).expect("dlq");

    publish_jobs(&js, &[Job::ok(5)]).await;
    for round in 1..=2u64 {
        wait_until(Duration::from_secs(10), "dead letter", || async {
            count(&js, "DLQ").await == 1
        })
        .await;
        let letters = dlq.list(&Filter::default()).await.expect("list");
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].replay_count(), round - 1);
        let r = dlq.replay_one(&letters[0]).await.expect("replay");
        assert_eq!(r.replay_count, round);
        assert!(!r.duplicate, "a new replay is never taken for a duplicate");
    }
    wait_until(Duration::from_secs(10), "third dead letter", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    let letters = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(letters[0].replay_count(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_letter_without_the_original_payload_is_never_replayed_nor_deleted() {
    let server = NatsServer::start().expect("server");
    let (_client, js, config) = provisioned(&server.url(), "").await;
    let dlq = Dlq::new(js.clone(), &config).expect("dlq");
    // The copies the runtime makes when the original was too large to keep its payload,
    // and the safety net's record of an original that was gone.
    for (sequence, header, value) in [
        (7, dead_letter::PAYLOAD_DROPPED, "1048000"),
        (8, dead_letter::ORIGINAL_MISSING, "true"),
    ] {
        let letter = DeadLetter {
            subject: format!("jobs.{sequence}"),
            headers: HeaderMap::new(),
            stream: "EVENTS".into(),
            sequence,
            consumer: "jobs".into(),
            attempts: 5,
            reason: Reason::Exhausted,
            error: "too large".into(),
        };
        let mut headers = letter.headers();
        headers.insert(header, value);
        js.publish_with_headers("dlq.jobs", headers, Vec::new().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let letters = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(letters.len(), 2);
    for letter in &letters {
        let err = dlq
            .replay_one(letter)
            .await
            .expect_err("no payload to replay");
        assert_eq!(err.kind(), DlqErrorKind::PayloadMissing, "{err}");
    }
    let report = dlq.replay(&letters).await;
    assert!(report.replayed.is_empty(), "{report:?}");
    assert_eq!(report.skipped.len(), 2, "{report:?}");
    assert!(report.failed.is_none(), "{report:?}");
    assert_eq!(count(&js, "DLQ").await, 2, "the only records are kept");
    assert_eq!(count(&js, "EVENTS").await, 0, "nothing was republished");
}

/// A payload too large for its copy is kept in the dead-letter stream's payload bucket:
/// `show` reads it from there, `replay` republishes all of it and then removes letter
/// and object, `purge` removes both, and a letter whose object is gone is kept.
#[tokio::test]
async fn a_payload_too_large_for_the_copy_is_shown_replayed_and_purged_from_the_object_store() {
    let server = NatsServer::start().expect("server");
    let (client, js, config) = provisioned(&server.url(), "").await;
    let dlq = Dlq::new(js.clone(), &config).expect("dlq");
    let max_payload = client.server_info().max_payload;
    let bucket = jetworker::dead_letter_payload_bucket("DLQ");
    assert!(
        js.get_object_store(&bucket).await.is_ok(),
        "provision creates the payload bucket next to the dead-letter stream"
    );
    // Fills the max payload but for less than the dead-letter headers need.
    let payload: Vec<u8> = (0..max_payload - 500).map(|i| (i % 251) as u8).collect();
    let mut stored_objects = Vec::new();
    for sequence in [11, 12, 13] {
        let mut original = HeaderMap::new();
        original.insert("X-Tenant", "acme");
        let letter = DeadLetter {
            subject: format!("jobs.{sequence}"),
            headers: original,
            stream: "EVENTS".into(),
            sequence,
            consumer: "jobs".into(),
            attempts: 5,
            reason: Reason::Exhausted,
            error: "e".repeat(2_000),
        };
        letter
            .publish(
                &js,
                "dlq.jobs",
                payload.clone().into(),
                Duration::from_secs(5),
            )
            .await
            .expect("copy and payload stored");
        stored_objects.push(jetworker::dead_letter_message_id(
            "EVENTS", sequence, "jobs",
        ));
    }
    let store = js.get_object_store(&bucket).await.expect("bucket");
    for name in &stored_objects {
        store
            .info(name)
            .await
            .expect("the payload is in the object store");
    }
    let letters = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert!(
            letter.payload.is_empty(),
            "the copy itself carries no payload"
        );
        assert!(letter.header(dead_letter::PAYLOAD_OBJECT).is_some());
        assert_eq!(
            letter.header("X-Tenant"),
            Some("acme"),
            "headers that fit are kept"
        );
    }
    // show
    let shown = dlq.get(None, letters[0].sequence).await.expect("show");
    assert_eq!(shown.payload.as_ref(), payload.as_slice());
    // replay: the whole payload, then letter and object are gone.
    let replayed = dlq.replay_one(&letters[0]).await.expect("replayed");
    let events = messages(&js, "EVENTS").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload.as_ref(), payload.as_slice());
    assert_eq!(replayed.subject, "jobs.11");
    let gone =
        |info: Result<jetstream::object_store::ObjectInfo, _>| info.map_or(true, |i| i.deleted);
    assert!(
        gone(store.info(&stored_objects[0]).await),
        "object removed after the replay"
    );
    // purge: both go.
    let report = dlq.purge(&letters[1..2]).await.expect("purge");
    assert_eq!(report.deleted, 1);
    assert!(
        gone(store.info(&stored_objects[1]).await),
        "object removed by the purge"
    );
    // The object of the last one is gone behind our back: the letter is kept.
    store
        .delete(&stored_objects[2])
        .await
        .expect("delete object");
    let err = dlq
        .replay_one(&letters[2])
        .await
        .expect_err("nothing to replay");
    assert_eq!(err.kind(), DlqErrorKind::PayloadMissing, "{err}");
    assert_eq!(count(&js, "DLQ").await, 1, "the only record is kept");
    assert_eq!(
        count(&js, "EVENTS").await,
        1,
        "nothing more was republished"
    );
}

#[tokio::test]
async fn an_interrupted_replay_run_again_is_stored_once() {
    let server = NatsServer::start().expect("server");
    let (_client, js, config) = provisioned(&server.url(), "max_deliver = 1").await;
    // The original had a publisher message id and an expectation: neither may block or
    // deduplicate the replay away.
    let mut original = HeaderMap::new();
    original.insert("Nats-Msg-Id", "publisher-7");
    original.insert("Nats-Expected-Last-Subject-Sequence", "0");
    original.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    // The same publisher id is still inside EVENTS' duplicate window.
    js.publish_with_headers("jobs.other", original.clone(), "x".into())
        .await
        .expect("publish")
        .await
        .expect("puback");
    craft_dead_letter(&js, &Job::ok(7), "jobs", Reason::Exhausted, 41, original).await;

    let dlq = Dlq::new(js.clone(), &config).expect("dlq");
    let letter = dlq
        .list(&Filter::default())
        .await
        .expect("list")
        .pop()
        .expect("one dead letter");

    // The publish step alone, as if the process died before the delete.
    let first = dlq.republish(&letter).await.expect("republish");
    assert!(!first.duplicate);
    assert_eq!(count(&js, "EVENTS").await, 2);
    assert_eq!(
        count(&js, "DLQ").await,
        1,
        "still in the dead-letter stream"
    );

    // Run the replay again: same message id, deduplicated, then deleted.
    let again = dlq.list(&Filter::default()).await.expect("list");
    let report = dlq.replay(&again).await;
    assert!(report.failed.is_none(), "{:?}", report.failed);
    assert_eq!(report.replayed.len(), 1);
    assert!(report.replayed[0].duplicate, "deduplicated by message id");
    assert_eq!(report.replayed[0].message_id, first.message_id);
    assert_eq!(count(&js, "DLQ").await, 0);

    let copies: Vec<_> = messages(&js, "EVENTS")
        .await
        .into_iter()
        .filter(|m| m.subject.as_str() == "jobs.7")
        .collect();
    assert_eq!(copies.len(), 1, "exactly one copy on the original subject");
    let copy = &copies[0];
    assert_eq!(
        header(copy, "traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert!(header(copy, "Nats-Expected-Last-Subject-Sequence").is_none());
    let job: Job = rmp_serde::from_slice(&copy.payload).expect("payload kept");
    assert_eq!(job.id, 7);
}

#[tokio::test]
async fn thousands_of_dead_letters_among_other_messages_list_filter_and_purge() {
    let server = NatsServer::start().expect("server");
    let (_client, js, config) = provisioned(&server.url(), "max_deliver = 1").await;
    let n = 3000u64;
    let mut acks = Vec::new();
    for i in 0..n {
        let letter = DeadLetter {
            subject: format!("jobs.{i}"),
            headers: HeaderMap::new(),
            stream: "EVENTS".into(),
            sequence: i + 1,
            consumer: "jobs".into(),
            attempts: 1,
            reason: if i % 3 == 0 {
                Reason::Decode
            } else {
                Reason::Permanent
            },
            error: "bulk".into(),
        };
        let payload = rmp_serde::to_vec_named(&Job::ok(i)).expect("encode");
        acks.push(
            js.publish_with_headers("dlq.jobs", letter.headers(), payload.into())
                .await
                .expect("publish"),
        );
        // Interleave messages on another subject of the dead-letter stream: the read
        // skips what is not a dead letter.
        if i % 10 == 0 {
            js.publish("dlq.noise", "noise".into())
                .await
                .expect("publish")
                .await
                .expect("puback");
        }
    }
    for ack in acks {
        ack.await.expect("puback");
    }
    let dlq = Dlq::new(js.clone(), &config).expect("dlq");
    let all = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(all.len() as u64, n);

    let decode = dlq
        .list(&Filter {
            reasons: vec![Reason::Decode],
            ..Filter::default()
        })
        .await
        .expect("list");
    assert_eq!(decode.len() as u64, n.div_ceil(3));
    let report = dlq.purge(&decode).await.expect("purge");
    assert_eq!(report.deleted, n.div_ceil(3));
    let rest = dlq.list(&Filter::default()).await.expect("list");
    assert_eq!(rest.len() as u64, n - n.div_ceil(3));
    assert!(rest.iter().all(|l| l.reason() == Some("permanent")));
}

fn run(path: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .arg("--config")
        .arg(path)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run test_worker")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_dlq_command_line() {
    let server = NatsServer::start().expect("server");
    let (_client, js, _config) = provisioned(&server.url(), "max_deliver = 1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A second consumer reading one of the original subjects: a replay reaches it too.
    let path = suite_config(&server.url())
        .in_consumer("jobs", "max_deliver = 1")
        .consumer(
            "audit",
            "EVENTS",
            "scripted",
            r#"filter_subject = "jobs.1""#,
        )
        .write(dir.path());
    for (id, reason) in [
        (1, Reason::Permanent),
        (2, Reason::Exhausted),
        (3, Reason::Permanent),
    ] {
        craft_dead_letter(&js, &Job::ok(id), "jobs", reason, id, HeaderMap::new()).await;
    }

    // list --json, filtered.
    let out = run(&path, &["dlq", "list", "--json", "--reason", "permanent"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["original_subject"], "jobs.1");
    assert_eq!(listed[1]["original_subject"], "jobs.3");
    let seq = listed[0]["sequence"].as_u64().expect("sequence");

    // The table.
    let out = run(&path, &["dlq", "list", "--since", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("STREAM  SEQ"), "{table}");
    assert!(table.ends_with("3 dead letters\n"), "{table}");

    // A bad reason or time is a usage error naming the flag.
    let out = run(&path, &["dlq", "list", "--reason", "exausted"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--reason: unknown reason"),
        "{}",
        stderr(&out)
    );
    let out = run(&path, &["dlq", "list", "--since", "last tuesday"]);
    assert_eq!(out.status.code(), Some(2));

    // show: headers and the decoded payload; --json too.
    let out = run(&path, &["dlq", "show", &seq.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.contains("Jetworker-Reason: permanent"), "{shown}");
    assert!(shown.contains("payload (msgpack):"), "{shown}");
    assert!(shown.contains("\"id\": 1"), "{shown}");
    let out = run(&path, &["dlq", "show", &seq.to_string(), "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["payload"]["encoding"], "msgpack");
    assert_eq!(shown["payload"]["value"]["id"], 1);
    let out = run(&path, &["dlq", "show", "9999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no message #9999"),
        "{}",
        stderr(&out)
    );

    // A replay or purge with no selection is refused.
    for verb in ["replay", "purge"] {
        let out = run(&path, &["dlq", verb]);
        assert_eq!(out.status.code(), Some(2), "{verb}");
        assert!(stderr(&out).contains("--all"), "{}", stderr(&out));
    }
    // Purge without --yes and stdin not a terminal: refused, nothing deleted.
    let out = run(&path, &["dlq", "purge", "--all"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    assert_eq!(count(&js, "DLQ").await, 3);

    // replay --dry-run changes nothing, and says who else gets the replays; replay SEQ
    // republishes one.
    let out = run(&path, &["dlq", "replay", "--all", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "note: consumer audit also reads the original subject of 1 of the 3 selected dead letters: it will handle the replay too"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(&js, "DLQ").await, 3);
    assert_eq!(count(&js, "EVENTS").await, 0);
    let out = run(&path, &["dlq", "replay", &seq.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("-> jobs.1"), "{}", stdout(&out));
    assert_eq!(count(&js, "DLQ").await, 2);
    assert_eq!(count(&js, "EVENTS").await, 1);

    // purge --reason exhausted --yes removes that selection only.
    let out = run(&path, &["dlq", "purge", "--reason", "exhausted", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "purged 1 dead letter\n");
    let out = run(&path, &["dlq", "list", "--json"]);
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(left.as_array().map(Vec::len), Some(1));
    assert_eq!(left[0]["original_subject"], "jobs.3");

    // purge --all --yes empties it.
    let out = run(&path, &["dlq", "purge", "--all", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count(&js, "DLQ").await, 0);
    let out = run(&path, &["dlq", "purge", "--all", "--yes"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("nothing to purge"));
}

/// `dlq purge` without `--yes` on a terminal asks, and deletes only after "y". The
/// terminal is a real pseudo-terminal from `script` (util-linux), the answer typed into it.
#[tokio::test]
async fn purge_asks_on_a_terminal() {
    let server = NatsServer::start().expect("server");
    let (_client, js, _config) = provisioned(&server.url(), "max_deliver = 1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config_file(dir.path(), &server.url(), "max_deliver = 1");
    for id in [1, 2] {
        craft_dead_letter(
            &js,
            &Job::ok(id),
            "jobs",
            Reason::Permanent,
            id,
            HeaderMap::new(),
        )
        .await;
    }
    let on_terminal = |answer: &str| {
        let command = format!(
            "{} --config {} dlq purge --all",
            env!("CARGO_BIN_EXE_test_worker"),
            path.display()
        );
        let mut child = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("`script` (util-linux) runs the command on a pseudo-terminal");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(format!("{answer}\n").as_bytes())
                .expect("type the answer");
        }
        child.wait_with_output().expect("script")
    };

    let out = on_terminal("n");
    let text = stdout(&out);
    assert!(
        text.contains("Delete 2 dead letters (DLQ/jobs: 2) for good? [y/N]"),
        "{text}"
    );
    assert!(text.contains("aborted: nothing was deleted"), "{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(count(&js, "DLQ").await, 2);

    let out = on_terminal("y");
    let text = stdout(&out);
    assert!(text.contains("purged 2 dead letters"), "{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(count(&js, "DLQ").await, 0);
}
