//! Hostile input against a real nats-server: payloads over the consumer's size limit,
//! deeply nested and truncated MessagePack (a recursive handler type included), invalid
//! UTF-8 in JSON, huge header values, and messages so close to the server's max payload
//! that their dead-letter copy cannot carry everything. Each ends dead-lettered with its
//! reason, the worker lives on, and its memory stays bounded.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::ConsumerStats;
use jetworker::Reason;
use jetworker::{App, Context, Event, HandlerError};
use jetworker_suite::Job;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A recursive payload type (an expression tree): rmp-serde alone does not bound its
/// nesting, so a deep enough payload overflowed the stack before the codec's scan.
#[derive(Debug, Serialize, Deserialize)]
enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
}

#[derive(Default)]
struct Seen {
    jobs: AtomicU64,
    trees: AtomicU64,
    json: AtomicU64,
}

async fn job_handler(_job: Event<Job>, ctx: Context<Arc<Seen>>) -> Result<(), HandlerError> {
    ctx.state().jobs.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

async fn tree_handler(_expr: Event<Expr>, ctx: Context<Arc<Seen>>) -> Result<(), HandlerError> {
    ctx.state().trees.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

async fn json_handler(_job: Event<Job>, ctx: Context<Arc<Seen>>) -> Result<(), HandlerError> {
    ctx.state().json.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

const LIMIT: usize = 16 * 1024;
const HUGE_HEADER: usize = 60 * 1024;

fn hostile_config(url: &str) -> Config {
    let text = format!(
        r#"
[connection]
servers = ["{url}"]
request_timeout = "5s"

[worker]
shutdown_grace = "5s"
ops_listen = ""

[[streams]]
name = "EVENTS"
subjects = ["jobs.>", "trees.>", "json.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "jobs"
stream = "EVENTS"
filter_subject = "jobs.>"
handler = "job"
max_deliver = 3
max_payload_bytes = {LIMIT}
dead_letter_subject = "dlq.jobs"

[[consumers]]
name = "trees"
stream = "EVENTS"
filter_subject = "trees.>"
handler = "tree"
max_deliver = 3
dead_letter_subject = "dlq.trees"

[[consumers]]
name = "json"
stream = "EVENTS"
filter_subject = "json.>"
handler = "json"
codec = "json"
max_deliver = 3
dead_letter_subject = "dlq.json"
"#
    );
    Config::from_toml_with_env(&text, Path::new("hostile.toml"), std::iter::empty())
        .expect("valid config")
}

async fn publish(js: &jetstream::Context, subject: &str, headers: HeaderMap, payload: Vec<u8>) {
    js.publish_with_headers(subject.to_string(), headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

fn valid_job(id: u64) -> Vec<u8> {
    rmp_serde::to_vec_named(&Job::ok(id)).expect("encode")
}

/// `levels` nested `{"Neg": ...}` maps around `{"Lit": 1}`.
fn deep_tree(levels: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(levels * 5 + 6);
    for _ in 0..levels {
        bytes.extend_from_slice(&[0x81, 0xa3, b'N', b'e', b'g']);
    }
    bytes.extend_from_slice(&[0x81, 0xa3, b'L', b'i', b't', 0x01]);
    bytes
}

#[tokio::test]
async fn hostile_messages_are_dead_lettered_with_their_reason_and_the_worker_lives_on() {
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let max_payload = client.server_info().max_payload;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let app = App::new(seen.clone())
        .handler("job", job_handler)
        .handler("tree", tree_handler)
        .handler("json", json_handler);
    let worker = tokio::spawn(app.run_until(hostile_config(&server.url()), stop.clone()));
    wait_until(Duration::from_secs(20), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok() && js.get_stream("DLQ").await.is_ok()
    })
    .await;

    let none = HeaderMap::new;
    // Over the consumer's size limit.
    publish(&js, "jobs.too_big", none(), vec![0x42; LIMIT + 1]).await;
    // Truncated MessagePack.
    let job = valid_job(1);
    publish(&js, "jobs.truncated", none(), job[..job.len() - 3].to_vec()).await;
    // Deeply nested MessagePack where a Job is expected (arrays, 10k levels).
    let mut arrays = vec![0x91u8; 10_000];
    arrays.push(0);
    publish(&js, "jobs.nested", none(), arrays).await;
    // A huge header value on a valid payload: the limit covers headers too. (JetStream
    // refuses header blocks over 64 KiB: error 10097.)
    let mut huge = HeaderMap::new();
    huge.insert("X-Huge", "h".repeat(HUGE_HEADER).as_str());
    publish(&js, "jobs.huge_header", huge, valid_job(2)).await;
    // A huge header on a payload that fills the rest of the server's max payload: the
    // dead-letter copy cannot keep both and its own headers.
    let mut huger = HeaderMap::new();
    huger.insert("X-Huger", "H".repeat(HUGE_HEADER).as_str());
    let filler = vec![b'x'; max_payload - HUGE_HEADER - 100];
    publish(&js, "jobs.max_header", huger, filler.clone()).await;
    // A recursive type, 150k levels deep: a stack overflow (process abort) without the scan.
    publish(&js, "trees.deep", none(), deep_tree(150_000)).await;
    // Invalid UTF-8 inside a JSON string.
    publish(
        &js,
        "json.bad_utf8",
        none(),
        b"{\"id\":1,\"mode\":\"ok\",\"until\":0,\"sleep_ms\":\xff\xfe}".to_vec(),
    )
    .await;
    publish(
        &js,
        "json.bad_utf8_string",
        none(),
        b"{\"id\":\"\xc3\x28\",\"mode\":\"ok\",\"until\":0,\"sleep_ms\":0}".to_vec(),
    )
    .await;
    // Garbage filling the server's max payload: the copy cannot carry payload and headers.
    publish(
        &js,
        "json.max_garbage",
        none(),
        vec![b'{'; max_payload - 64],
    )
    .await;

    let expected: BTreeMap<&str, &str> = [
        ("jobs.too_big", "too_large"),
        ("jobs.truncated", "decode"),
        ("jobs.nested", "decode"),
        ("jobs.huge_header", "too_large"),
        ("jobs.max_header", "too_large"),
        ("trees.deep", "decode"),
        ("json.bad_utf8", "decode"),
        ("json.bad_utf8_string", "decode"),
        ("json.max_garbage", "decode"),
    ]
    .into_iter()
    .collect();
    wait_until(
        Duration::from_secs(60),
        "every hostile message dead-lettered",
        || async { count(&js, "DLQ").await >= expected.len() as u64 },
    )
    .await;
    let letters = messages(&js, "DLQ").await;
    let mut by_subject = BTreeMap::new();
    for m in &letters {
        let subject = header(m, dead_letter::ORIGINAL_SUBJECT).unwrap_or_default();
        by_subject.insert(subject, m.clone());
    }
    for (subject, reason) in &expected {
        let m = by_subject
            .get(*subject)
            .unwrap_or_else(|| panic!("no dead letter for {subject}"));
        assert_eq!(
            header(m, dead_letter::REASON).as_deref(),
            Some(*reason),
            "{subject}"
        );
        assert_eq!(
            header(m, dead_letter::ATTEMPTS).as_deref(),
            Some("1"),
            "{subject}: dead-lettered on its first delivery"
        );
    }
    let error_of =
        |subject: &str| header(&by_subject[subject], dead_letter::ERROR).unwrap_or_default();
    assert!(
        error_of("jobs.nested").contains("depth"),
        "{}",
        error_of("jobs.nested")
    );
    assert!(
        error_of("trees.deep").contains("depth"),
        "{}",
        error_of("trees.deep")
    );
    assert!(
        error_of("jobs.huge_header").contains("bytes"),
        "{}",
        error_of("jobs.huge_header")
    );
    // The copy keeps what fits: the 200 KiB header stays, the one near max payload is
    // dropped and named, the payload kept in both.
    let kept = &by_subject["jobs.huge_header"];
    assert_eq!(header(kept, "X-Huge").map(|v| v.len()), Some(HUGE_HEADER));
    let trimmed = &by_subject["jobs.max_header"];
    assert!(header(trimmed, "X-Huger").is_none());
    assert_eq!(trimmed.payload.as_ref(), filler.as_slice());
    // The garbage filling max payload: its copy records what could not be stored.
    let garbage = &by_subject["json.max_garbage"];
    assert!(garbage.payload.is_empty(), "no room left for the payload");
    assert_eq!(
        header(garbage, dead_letter::PAYLOAD_DROPPED),
        Some((max_payload - 64).to_string())
    );
    assert_eq!(
        header(garbage, dead_letter::STREAM).as_deref(),
        Some("EVENTS"),
        "the copy names where the original is"
    );
    // ... and its payload is kept whole in the dead-letter stream's payload bucket.
    let object = header(garbage, dead_letter::PAYLOAD_OBJECT).expect("names its payload object");
    let (bucket, name) = jetworker::dead_letter_payload_object(&object).expect("bucket/object");
    let mut kept_payload = Vec::new();
    let mut reader = js
        .get_object_store(bucket)
        .await
        .expect("payload bucket")
        .get(name)
        .await
        .expect("payload object");
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut kept_payload)
        .await
        .expect("read");
    assert_eq!(kept_payload, vec![b'{'; max_payload - 64]);
    assert!(header(trimmed, dead_letter::DROPPED_HEADERS).is_some_and(|d| d.contains("X-Huger")));

    // Every original is settled, none comes back, and the worker still works.
    for consumer in ["jobs", "trees", "json"] {
        wait_until(Duration::from_secs(10), "originals settled", || async {
            let info = consumer_info(&js, "EVENTS", consumer).await;
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }
    publish(&js, "jobs.fine", HeaderMap::new(), valid_job(4)).await;
    wait_until(
        Duration::from_secs(10),
        "a valid job after the hostile ones",
        || async { seen.jobs.load(Ordering::SeqCst) == 1 },
    )
    .await;
    assert_eq!(seen.trees.load(Ordering::SeqCst), 0);
    assert_eq!(seen.json.load(Ordering::SeqCst), 0);

    stop.cancel();
    let stats: BTreeMap<String, Arc<ConsumerStats>> =
        tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("ran");
    assert_eq!(stats["jobs"].dead_letters(Reason::TooLarge), 3);
    assert_eq!(stats["jobs"].dead_letters(Reason::Decode), 2);
    assert_eq!(stats["trees"].dead_letters(Reason::Decode), 1);
    assert_eq!(stats["json"].dead_letters(Reason::Decode), 3);
    for s in stats.values() {
        assert_eq!(s.panics.load(Ordering::Relaxed), 0);
    }
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stream of near-max-payload hostile messages through the real worker binary: its
/// peak memory stays far below what it was sent, because it holds at most its
/// concurrency in messages and never allocates from a length prefix.
#[tokio::test]
async fn the_worker_process_memory_stays_bounded_under_a_hostile_stream() {
    const MESSAGES: usize = 120;
    let server = NatsServer::start().expect("server");
    let (client, js) = connect(&server.url()).await;
    let max_payload = client.server_info().max_payload;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_file(
        dir.path(),
        &server.url(),
        "concurrency = 4\nmax_deliver = 2",
    );
    let mut worker = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start test_worker"),
    );
    let pid = worker.0.id();
    wait_until(Duration::from_secs(20), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok() && js.get_stream("DLQ").await.is_ok()
    })
    .await;
    let baseline = peak_rss_kib(pid).expect("worker's memory");

    // Half garbage, half deep nesting padded with a huge string, all near max payload.
    let size = max_payload - 1024;
    for i in 0..MESSAGES {
        let payload = if i % 2 == 0 {
            vec![0xc1; size]
        } else {
            let mut p = vec![0x91u8; 10_000];
            p.push(0xdb);
            p.extend_from_slice(&u32::MAX.to_be_bytes());
            p.resize(size, b'x');
            p
        };
        js.publish(format!("jobs.hostile.{i}"), payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    wait_until(Duration::from_secs(120), "all dead-lettered", || async {
        count(&js, "DLQ").await >= MESSAGES as u64
    })
    .await;
    let peak = peak_rss_kib(pid).expect("worker's memory");
    assert!(
        worker.0.try_wait().expect("wait").is_none(),
        "the worker is still running"
    );
    let sent_kib = (MESSAGES * size / 1024) as u64;
    eprintln!("worker peak RSS: baseline {baseline} KiB, after {peak} KiB; sent {sent_kib} KiB");
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS grew from {baseline} KiB to {peak} KiB after {sent_kib} KiB of hostile messages"
    );
}

/// Headers naming `Nats-Msg-Id` (a header `X-Nats-Msg-Id`, a value or an error that
/// mentions it) do not hide a dead-letter copy's own message id from the server: each
/// copy published twice is stored once, and reads back as it was meant. nats-server 2.9
/// reads the id only at the first place that text occurs in the header block, and the
/// client writes headers in no fixed order: without the escaping, about every other
/// copy here would be stored twice.
#[tokio::test]
async fn headers_naming_the_message_id_do_not_hide_the_copys_id() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq.>".into()],
        ..Default::default()
    })
    .await
    .expect("dead-letter stream");
    let copies = 12u64;
    for seq in 1..=copies {
        let mut headers = HeaderMap::new();
        headers.insert("X-Nats-Msg-Id", format!("sender-{seq}").as_str());
        headers.insert("Note", "echoes Nats-Msg-Id");
        let letter = jetworker::DeadLetter {
            subject: format!("jobs.{seq}"),
            headers,
            stream: "EVENTS".into(),
            sequence: seq,
            consumer: "jobs".into(),
            attempts: 1,
            reason: Reason::Permanent,
            error: "no Nats-Msg-Id given".into(),
        };
        let timeout = Duration::from_secs(5);
        let first = letter
            .publish(&js, "dlq.jobs", "payload".into(), timeout)
            .await
            .expect("stored");
        let again = letter
            .publish(&js, "dlq.jobs", "payload".into(), timeout)
            .await
            .expect("acknowledged");
        assert!(
            !first.duplicate && again.duplicate,
            "copy {seq}: the second publish was not seen as a duplicate"
        );
    }
    let stored = messages(&js, "DLQ").await;
    assert_eq!(stored.len() as u64, copies, "each copy stored once");
    let restored = dead_letter::restore_escaped(&stored[0].headers);
    let get = |k: &str| restored.get(k).map(|v| v.as_str().to_string());
    assert_eq!(get("X-Nats-Msg-Id").as_deref(), Some("sender-1"));
    assert_eq!(get("Note").as_deref(), Some("echoes Nats-Msg-Id"));
    assert_eq!(
        get(dead_letter::ERROR).as_deref(),
        Some("no Nats-Msg-Id given")
    );
    assert_eq!(
        get(dead_letter::ORIGINAL_SUBJECT).as_deref(),
        Some("jobs.1")
    );
}
