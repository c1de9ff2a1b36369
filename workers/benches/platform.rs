//! The analytics platform draining a backlog, exactly: events/s, peak RSS, and the lag
//! at a steady rate afterwards.
//!
//! # Run
//! ```text
//! cargo bench --bench platform                                   # 1M events, one worker
//! PLATFORM_EVENTS=50000 PLATFORM_STEADY_SECS=3 cargo bench --bench platform   # quick
//! PLATFORM_REPLICAS=2 cargo bench --bench platform               # two replicas
//! ```
//! Environment knobs (all optional):
//! - `PLATFORM_EVENTS` (default 1000000): messages in the backlog.
//! - `PLATFORM_REPLICAS` (default 1): worker replicas (each its own App and connection,
//!   in this process).
//! - `PLATFORM_STEADY_RATE` (default 20000) and `PLATFORM_STEADY_SECS` (default 10): the
//!   steady publish rate after the drain and how long the lag is sampled (0 seconds skips
//!   it; rate 0 publishes as fast as the server acknowledges, as `workers publish --rate
//!   0` does).
//! - `NATS_SERVER_BIN`: the server binary (see `jetworker::testing::server`).
//!
//! `cargo test --all-targets` runs this binary too, without `--bench`: then it is a smoke
//! test of the same path at a small size (5,000 events, 1 s steady), still checked
//! exactly, unless the knobs above say otherwise.
//!
//! # What it does
//! Starts a nats-server (loopback, temp store), provisions the shipped `streams.toml`,
//! fills `EVENTS` with the publisher's usual mix (`workers publish` defaults: 1%
//! duplicates, half of them under a new message id, 0.5% malformed payloads; one event
//! per millisecond of event time) with no worker running, computes the reference
//! aggregates from the events, then starts the workers at the shipped settings and times
//! the drain until every stored message is acked or dead-lettered. The stored
//! aggregates must equal the reference exactly (the process exits with an error
//! otherwise). Then it times `aggregates::read` over 60 minutes (what `workers stats
//! --minutes 60` and the dashboard read), publishes at a steady rate and samples the
//! consumers' lag (messages not yet acked: pending + in flight), and checks again that
//! those minutes and the totals are exact. Peak RSS is the process's during the drain
//! (reset before it; the driver holds no events then: the reference is computed after
//! the drain by replaying the same seeded traffic).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use jetworker::testing::server::NatsServer;
use jetworker::{Config, Publisher};
use tokio_util::sync::CancellationToken;
use workers::aggregates::{self, Aggregates, Counts, DEFAULT_FLAG_THRESHOLD};
use workers::events::AnyEvent;
use workers::generator::{Traffic, TrafficConfig};
use workers::handlers::{self, Analytics, BUCKET};
use workers::publish::{self, now_ms};
use workers::report;

/// Synthetic event times of the backlog: one event per millisecond from here.
const START_MS: u64 = 1_700_000_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn traffic(run_id: &str, seed: u64) -> Traffic {
    Traffic::new(TrafficConfig::mixed(run_id, 0.01), seed)
}

/// Peak resident set size of this process, in MiB (`VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak RSS to the current RSS (Linux: `5` into `clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Messages of the platform's consumers not acked yet (pending + in flight).
async fn lag(js: &jetstream::Context, config: &Config) -> anyhow::Result<u64> {
    let stream = js.get_stream_no_info("EVENTS").await?;
    let mut lag = 0;
    for consumer in &config.consumers {
        let info = stream.consumer_info(&consumer.name).await?;
        lag += info.num_pending + info.num_ack_pending as u64;
    }
    Ok(lag)
}

/// Publishes `count` messages of `traffic` timed by `time_of(i)`, at `rate` per second
/// (0: as fast as the server acknowledges); returns the events (when `keep`) and what
/// was stored.
async fn publish(
    js: &jetstream::Context,
    traffic: &mut Traffic,
    count: u64,
    rate: u64,
    keep: bool,
    time_of: impl Fn(u64) -> u64,
) -> anyhow::Result<(Vec<AnyEvent>, u64)> {
    let publisher = Publisher::new(js.clone());
    let mut pipeline = publisher.pipeline(1024);
    let mut events = Vec::new();
    let started = Instant::now();
    for i in 0..count {
        if rate > 0 && i % 100 == 0 {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let out = traffic.next_message(time_of(i));
        if let (true, Some(e)) = (keep, out.event()) {
            events.push(e.clone());
        }
        publish::send(&mut pipeline, out).await?;
    }
    let report = pipeline.finish().await?;
    Ok((events, report.stored))
}

fn add(a: &Counts, b: &Counts) -> Counts {
    Counts {
        clicks: a.clicks + b.clicks,
        purchases: a.purchases + b.purchases,
        logins: a.logins + b.logins,
        failed_logins: a.failed_logins + b.failed_logins,
        revenue_cents: a.revenue_cents + b.revenue_cents,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs it without.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let events_n = env_u64("PLATFORM_EVENTS", if smoke { 5_000 } else { 1_000_000 });
    let replicas_n = env_u64("PLATFORM_REPLICAS", 1).max(1);
    let steady_rate = env_u64("PLATFORM_STEADY_RATE", if smoke { 2_000 } else { 20_000 });
    let steady_secs = env_u64("PLATFORM_STEADY_SECS", if smoke { 1 } else { 10 });

    let server = NatsServer::start().context("starting nats-server")?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../streams.toml");
    let mut config = Config::load_with_env(&path, [("NATS_URL".to_string(), server.url())])
        .context("streams.toml")?;
    config.worker.ops_listen = String::new();
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    jetworker::provision(&client, &js, &config, false).await?;
    let version = client.server_info().version;

    // The backlog (its events are not kept: the reference is computed after the drain
    // from the same seeded traffic, so the peak RSS is the workers').
    let backlog_time = |i| START_MS + i;
    let filled = Instant::now();
    let (_, stored) = publish(
        &js,
        &mut traffic("bench", 2026),
        events_n,
        0,
        false,
        backlog_time,
    )
    .await?;
    let filled_in = filled.elapsed();
    println!(
        "platform bench: nats-server {version}, {events_n} messages published in {:.1}s ({stored} stored), {replicas_n} replica(s)",
        filled_in.as_secs_f64(),
    );

    // The drain.
    reset_peak_rss();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut replicas = Vec::new();
    for _ in 0..replicas_n {
        replicas.push(
            handlers::app(Analytics::new())
                .start(config.clone(), stop.clone())
                .await?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while report::settled(&replicas) < stored {
        if Instant::now() > deadline {
            bail!(
                "only {} of {stored} settled in 600s",
                report::settled(&replicas)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_in = started.elapsed();
    let peak_rss = peak_rss_mib().unwrap_or(0.0);
    let mut replay = traffic("bench", 2026);
    let events: Vec<AnyEvent> = (0..events_n)
        .filter_map(|i| replay.next_message(backlog_time(i)).event().cloned())
        .collect();
    let expected = Aggregates::from_events(&events, DEFAULT_FLAG_THRESHOLD);
    drop(events);
    let minutes: Vec<u64> = expected.minutes.keys().copied().collect();
    let kv = js.get_key_value(BUCKET).await?;
    let snapshot = aggregates::read(&kv, minutes.iter().copied()).await?;
    let exact = snapshot.aggregates == expected;
    let (writes, conflicts) = workers::counters::contention();
    println!(
        "drained {stored} messages ({} distinct events) in {:.2}s: {:.0} events/s; exact: {exact}; peak RSS {peak_rss:.0} MiB; {writes} ledger writes, {conflicts} conflicts",
        expected.totals.events(),
        drained_in.as_secs_f64(),
        stored as f64 / drained_in.as_secs_f64(),
    );
    if !exact {
        bail!(
            "the aggregates differ from the reference: totals {:?} vs {:?}",
            snapshot.aggregates.totals,
            expected.totals
        );
    }

    // `stats --minutes 60`.
    let last: Vec<u64> = minutes.iter().rev().take(60).copied().collect();
    let mut reads = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        aggregates::read(&kv, last.iter().copied()).await?;
        reads.push(t.elapsed());
    }
    reads.sort();
    println!(
        "aggregates::read of 60 minutes: median {:.1} ms (of 5)",
        reads[2].as_secs_f64() * 1000.0
    );

    // A steady rate.
    if steady_secs > 0 {
        // Rate 0 (`workers publish --rate 0`): as fast as the server acknowledges, about
        // as many as 100k/s would send.
        let count = if steady_rate > 0 {
            steady_rate
        } else {
            100_000
        } * steady_secs;
        let sampling = {
            let (js, config) = (js.clone(), config.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let end = Instant::now() + Duration::from_secs(steady_secs);
                while Instant::now() < end {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Ok(lag) = lag(&js, &config).await {
                        samples.push(lag);
                    }
                }
                samples
            })
        };
        let t = Instant::now();
        let (events, stored_steady) = publish(
            &js,
            &mut traffic("steady", 7),
            count,
            steady_rate,
            true,
            |_| now_ms(),
        )
        .await?;
        let published_in = t.elapsed();
        let mut samples = sampling.await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while report::settled(&replicas) < stored + stored_steady && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up_after = t.elapsed().saturating_sub(published_in);
        samples.sort_unstable();
        let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
        let max = samples.last().copied().unwrap_or(0);
        let steady = Aggregates::from_events(&events, DEFAULT_FLAG_THRESHOLD);
        let steady_minutes: BTreeSet<u64> = steady.minutes.keys().copied().collect();
        let s = aggregates::read(&kv, steady_minutes.iter().copied()).await?;
        let exact = s.aggregates.minutes == steady.minutes
            && s.aggregates.totals == add(&expected.totals, &steady.totals);
        println!(
            "steady {steady_rate}/s for {steady_secs}s ({:.0}/s published): lag median {median}, max {max} messages; caught up {:.2}s after the last publish; exact: {exact}",
            count as f64 / published_in.as_secs_f64(),
            caught_up_after.as_secs_f64(),
        );
        if !exact {
            bail!("the steady phase's aggregates differ from the reference");
        }
    }

    stop.cancel();
    for r in replicas {
        r.wait().await;
    }
    let _ = client.drain().await;
    Ok(())
}
