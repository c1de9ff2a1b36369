//! The platform end to end on a real nats-server, configured by the shipped
//! `streams.toml`: 10k mixed events with duplicates (same message id, and same event id
//! under a new message id) and malformed payloads, two worker replicas (two apps, two
//! connections) whose batch handlers fail some first attempts before counting, after
//! counting (an ack that never happened) and in the middle of the counting protocol
//! (before a ledger's write, after it, after the active users). The stored
//! aggregates must equal exactly what the published events imply, and every malformed
//! payload must be in the dead-letter stream with reason `decode`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::Publisher;
use jetworker::{App, Batch, BatchContext, BatchFailures, BatchResult, HandlerError};
use tokio_util::sync::CancellationToken;
use workers::aggregates::{self, Aggregates, DEFAULT_FLAG_THRESHOLD};
use workers::counters::{Faults, Step};
use workers::events::{AnyEvent, Click, Login, Purchase};
use workers::generator::{Payload, Traffic, TrafficConfig};
use workers::handlers::{self, Analytics, Incoming, Origin, BUCKET};
use workers::keys::stable_hash;

const EVENTS: u64 = 10_000;
/// Synthetic event times: one event every 300 ms from here (about 50 minutes).
const START_MS: u64 = 1_700_000_000_000;

fn config(url: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../streams.toml");
    let mut config = Config::load_with_env(&path, [("NATS_URL".to_string(), url.to_string())])
        .expect("streams.toml is valid");
    // Two replicas in one process: no ops endpoint (they would share a port).
    config.worker.ops_listen = String::new();
    config.worker.shutdown_grace = Duration::from_secs(10);
    // Small batches: many commits, so the chaos below hits many of them.
    for consumer in &mut config.consumers {
        consumer.max_batch = Some(BATCH);
    }
    config
}

/// Messages per batch in this test.
const BATCH: i64 = 50;

/// Per mille of first attempts failing before the handler counts anything.
const FAIL_BEFORE: u64 = 20;
/// Per mille of first attempts failing after the handler counted (the ack is "lost").
const FAIL_AFTER: u64 = 30;

/// Fails ~1/60 of the protocol's steps, each (ledger, first event, step) at most once
/// across both replicas: a worker crashing mid-count, the redelivery resuming.
struct Chaos {
    fired: Mutex<HashSet<(String, String)>>,
    count: Mutex<u64>,
}

impl Faults for Chaos {
    fn fail_at(&self, ledger: &str, first_id: &str, step: Step) -> bool {
        let point = (format!("{ledger}|{first_id}"), format!("{step:?}"));
        if !stable_hash(&format!("{}|{}", point.0, point.1)).is_multiple_of(60) {
            return false;
        }
        let first = self.fired.lock().expect("lock").insert(point);
        if first {
            *self.count.lock().expect("lock") += 1;
        }
        first
    }
}

async fn chaos<T: Clone + Into<AnyEvent>>(
    batch: Batch<T>,
    ctx: BatchContext<Analytics>,
) -> BatchResult {
    let mut failures = BatchFailures::new();
    let mut counted = Vec::new();
    for m in &batch {
        let event: AnyEvent = m.payload.clone().into();
        if m.attempt() == 1 && stable_hash(event.id()) % 1000 < FAIL_BEFORE {
            failures.fail(m, HandlerError::transient("chaos: failing before counting"));
            continue;
        }
        counted.push((
            m,
            Incoming {
                event,
                sequence: m.stream_sequence(),
            },
        ));
    }
    let incoming: Vec<Incoming> = counted.iter().map(|(_, i)| i.clone()).collect();
    let origin = Origin {
        stream: ctx.stream(),
        consumer: ctx.consumer(),
    };
    let outcomes = handlers::count_events(ctx.state(), ctx.jetstream(), origin, &incoming).await?;
    for ((m, incoming), outcome) in counted.iter().zip(outcomes) {
        let roll = stable_hash(incoming.event.id()) % 1000;
        match outcome {
            Some(error) => failures.fail(*m, error),
            None if m.attempt() == 1 && (FAIL_BEFORE..FAIL_BEFORE + FAIL_AFTER).contains(&roll) => {
                failures.fail(*m, HandlerError::transient("chaos: failing after counting"));
            }
            None => {}
        }
    }
    Ok(failures)
}

fn replica(faults: Arc<Chaos>) -> App<Analytics> {
    App::new(Analytics::new().with_faults(faults))
        .batch_handler("track_click", chaos::<Click>)
        .batch_handler("track_purchase", chaos::<Purchase>)
        .batch_handler("track_login", chaos::<Login>)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_two_replicas_exact_aggregates() {
    let started = Instant::now();
    let server = NatsServer::start().expect("nats-server");
    let config = config(&server.url());

    // The real app registers the names streams.toml uses (the chaos one mirrors it).
    handlers::app(Analytics::new())
        .check(&config)
        .expect("every consumer has its handler");

    let faults = Arc::new(Chaos {
        fired: Mutex::new(HashSet::new()),
        count: Mutex::new(0),
    });
    let stop = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(
            replica(faults.clone())
                .start(config.clone(), stop.clone())
                .await
                .expect("replica starts"),
        );
    }

    // Publish while the replicas work, from a third connection.
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let mut traffic = Traffic::new(TrafficConfig::mixed("e2e", 0.03), 2024);
    let publisher = Publisher::new(js.clone());
    let mut pipeline = publisher.pipeline(256);
    let mut events: Vec<AnyEvent> = Vec::new();
    let (mut malformed, mut same_id_dups, mut new_id_dups) = (0u64, 0u64, 0u64);
    for i in 0..EVENTS {
        let out = traffic.next_message(START_MS + i * 300);
        match &out.payload {
            Payload::Event(e) => events.push(e.clone()),
            Payload::Duplicate { event, same_msg_id } => {
                events.push(event.clone());
                if *same_msg_id {
                    same_id_dups += 1;
                } else {
                    new_id_dups += 1;
                }
            }
            Payload::Malformed(_) => malformed += 1,
        }
        workers::publish::send(&mut pipeline, out)
            .await
            .expect("publish");
    }
    let report = pipeline.finish().await.expect("pubacks");
    let published_in = started.elapsed();
    assert_eq!(
        report.duplicates, same_id_dups,
        "the server dropped same-id duplicates"
    );
    assert_eq!(report.stored, EVENTS - same_id_dups);
    assert!(malformed > 20 && same_id_dups > 50 && new_id_dups > 50);

    let expected = Aggregates::from_events(&events, DEFAULT_FLAG_THRESHOLD);
    assert!(!expected.flagged.is_empty(), "the traffic flags someone");
    let minutes: Vec<u64> = expected.minutes.keys().copied().collect();

    // Wait until every stored message is settled (acked or dead-lettered) by a replica,
    // then for the aggregates to match exactly, with nothing left in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    while workers::report::settled(&replicas) < report.stored && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled_in = started.elapsed();
    let kv = js.get_key_value(BUCKET).await.expect("bucket provisioned");
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let snapshot = aggregates::read(&kv, minutes.iter().copied())
            .await
            .expect("read aggregates");
        if (snapshot.aggregates == expected && snapshot.pending == 0) || Instant::now() > deadline {
            break snapshot;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let converged_in = started.elapsed();
    let (writes, conflicts) = workers::counters::contention();
    eprintln!("compare-and-set: {writes} writes, {conflicts} conflicts");
    assert_eq!(snapshot.aggregates.totals, expected.totals);
    assert_eq!(snapshot.aggregates.products, expected.products);
    assert_eq!(snapshot.aggregates.failed_logins, expected.failed_logins);
    assert_eq!(snapshot.aggregates.flagged, expected.flagged);
    assert_eq!(snapshot.aggregates.minutes, expected.minutes);
    assert_eq!(snapshot.pending, 0);

    // Every malformed payload is a dead letter with reason decode; nothing else is.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dlq = js.get_stream("DEAD_LETTERS").await.expect("dlq stream");
    while dlq.info().await.expect("info").state.messages < malformed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = dlq.info().await.expect("info").state.clone();
    assert_eq!(
        state.messages, malformed,
        "one dead letter per malformed payload"
    );
    let mut reasons = BTreeMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = dlq.get_raw_message(seq).await.expect("dead letter");
        let reason = m
            .headers
            .get(dead_letter::REASON)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        *reasons.entry(reason).or_insert(0u64) += 1;
        let original = m
            .headers
            .get(dead_letter::ORIGINAL_SUBJECT)
            .map(|v| v.as_str().to_string());
        assert!(original.is_some_and(|s| s.starts_with("events.")));
    }
    assert_eq!(reasons, BTreeMap::from([("decode".to_string(), malformed)]));

    // The chaos really happened: redeliveries on both paths and injected crashes.
    let mut redelivered = 0;
    let mut acked = 0;
    let mut per_replica = Vec::new();
    for r in &replicas {
        let mut mine = 0;
        for s in r.stats().values() {
            redelivered += s.redelivered.load(Ordering::Relaxed);
            acked += s.acked.load(Ordering::Relaxed);
            mine += s.acked.load(Ordering::Relaxed);
        }
        per_replica.push(mine);
    }
    let injected = *faults.count.lock().expect("lock");
    assert!(redelivered > 200, "redelivered {redelivered}");
    assert!(injected > 50, "injected {injected}");
    assert!(
        per_replica.iter().all(|n| *n > 500),
        "both replicas worked: {per_replica:?}"
    );

    stop.cancel();
    for r in replicas {
        r.wait().await;
    }
    eprintln!(
        "10k events: published in {published_in:?}, all settled after {settled_in:?}, \
         aggregates read and exact after {converged_in:?}; \
         {} events ({} same-id duplicates dropped by the server, {} new-id duplicates), \
         {malformed} malformed -> decode dead letters, {redelivered} redeliveries, \
         {injected} injected mid-protocol crashes, acked {acked} (per replica {per_replica:?}), \
         {} users flagged",
        events.len(),
        same_id_dups,
        new_id_dups,
        expected.flagged.len()
    );
}
