//! Throughput of jetworker next to the plain async-nats loops a user writes by hand, on the
//! same nats-server, over the same stored data, in the same run.
//!
//! # Run
//! ```text
//! cargo bench --bench throughput
//! BENCH_MESSAGES=20000 BENCH_RSS_MESSAGES=0 cargo bench --bench throughput   # a quick run
//! NATS_SERVER_BIN=.tools/nats-server-2.14.0/nats-server cargo bench --bench throughput
//! ```
//! Environment knobs (all optional):
//! - `BENCH_MESSAGES` (default 200000): what "decode only" and "1 ms I/O" drain.
//! - `BENCH_DEAD_LETTERS` (default 50000): what the dead-letter burst drains.
//! - `BENCH_RSS_MESSAGES` (default 1000000): the backlog jetworker drains at its defaults
//!   for the peak RSS figure; 0 skips it (filling 1M events takes a while).
//! - `BENCH_CONCURRENCY` (default 1000): jetworker's tuned `concurrency`; its
//!   `max_ack_pending` is twice that.
//! - `BENCH_LATENCY_RATE` (default 5000) and `BENCH_LATENCY_SECS` (default 4): the steady
//!   publish rate and how long latency is sampled.
//! - `BENCH_REPEATS` (default 3): measurements per case and side; the median is reported.
//! - `BENCH_CASES` (default all): the cases to run, comma-separated, by their names in
//!   the output (`decode`, `io`, `dead_letter`, `latency`, `ordered_decode`,
//!   `ordered_io`); the table and the targets then show only those. E.g.
//!   `BENCH_CASES=decode,io BENCH_RSS_MESSAGES=0`.
//! - `BENCH_CHILD_WRAPPER`: a command (split at spaces) each child runs under, e.g.
//!   `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p` to profile the
//!   consumers on the same data (their rates then mean nothing).
//! - `NATS_SERVER_BIN`: the server binary (see `jetworker::testing::server`).
//!
//! # What it measures
//! One real JetStream server (loopback, temp store) is started and a file stream `BENCH`
//! is filled with MessagePack events of ~60 bytes (pipelined publishes, not timed). Then,
//! for each case and side, a *fresh durable consumer* (deliver all, explicit ack) reads
//! the backlog from its start, so every measurement reads identical data. The sides:
//!
//! - **plain naive**: `consumer.messages()`, and for each message
//!   `rmp_serde::from_slice::<PageView>` -> `ack()`; the consumer at the server's
//!   defaults (`max_ack_pending` 1000).
//! - **plain tuned**: the same with `consumer.stream().max_messages_per_batch(2000)` and
//!   `max_ack_pending` 20000: the reference a framework at its defaults is held to.
//! - **plain, no acks**: the tuned loop on a consumer with `ack_policy` none, sending no
//!   ack at all (decode only): not a way to consume, but the ceiling of what this server
//!   and machine deliver, which no consumer that acks each message can pass.
//! - **jetworker defaults**: an [`App`] with one handler taking `Event<PageView>` (decoded
//!   by the framework) that returns `Ok(())`, the consumer config naming nothing but its
//!   stream, handler and dead-letter subject.
//! - **jetworker tuned**: the same with `concurrency = BENCH_CONCURRENCY` and
//!   `max_ack_pending` twice that.
//! - **jetworker batch**: a batch handler taking `Batch<PageView>` (each message decoded
//!   by the framework) that returns no failure, at the defaults (`max_batch` 100);
//!   every message is still acked on its own. Decode only.
//!
//! The cases: "decode only" (all five sides); "1 ms I/O" (the handler awaits a 1 ms
//! sleep after decoding; jetworker tuned and at its defaults, compared with the plain
//! tuned loop's decode-only rate); "dead-letter burst" (every handler call fails
//! permanently: copy published, PubAck awaited, original termed; jetworker at its
//! defaults; the parent checks every copy is stored, so the dead-letter stream's
//! duplicate window is 1 s: a copy's id is derived from the original's sequence, and
//! every round dead-letters the same sequences); "latency" (events published at a
//! steady `BENCH_LATENCY_RATE`, each carrying its send time; p50/p99 of the time to the
//! handler's start, or for the plain loop to the message's arrival); and "peak RSS 1M"
//! (jetworker at its defaults drains `BENCH_RSS_MESSAGES`).
//!
//! The ordered cases ("decode, ordered" and "1 ms I/O, ordered") run the tuned sides'
//! work on a consumer with `ordered_by = { function = ... }` whose key is the stream
//! sequence modulo 1000: 1000 keys, each key's messages 1000 apart, one at a time per key;
//! they are compared with the unordered tuned side at the same concurrency.
//!
//! For plain loops the clock starts before `messages()` (the consumer exists) and stops
//! when the last message's ack is queued; for jetworker it starts when `App::start`
//! returned and stops when the `acked` (or dead-letter) counter reaches the count (polled
//! every ms). Acks are fire-and-forget publishes on both sides; after each run the parent
//! checks through consumer info that the ack floor reached the count and nothing was
//! redelivered.
//!
//! Every measurement runs in a child process (this bench binary re-executed with
//! `JETWORKER_BENCH_CHILD` set) that prints its own peak RSS (`VmHWM`) right before it
//! exits.
//!
//! The machine this was written on has 2 cores shared with the server (and with other
//! builds): rates are noisy, hence the median of `BENCH_REPEATS` fresh consumers.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use futures::StreamExt;
use jetworker::testing::server::{self, NatsServer};
use jetworker::{
    App, Batch, BatchContext, BatchFailures, BatchResult, Config, Context, Event, HandlerError,
    Reason,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.events.view";
const DLQ_STREAM: &str = "BENCH_DLQ";
const LATENCY_STREAM: &str = "BENCH_LATENCY";
const LATENCY_SUBJECT: &str = "bench.latency.probe";
/// Environment variable selecting a child role (a [`Side`]).
const CHILD_ENV: &str = "JETWORKER_BENCH_CHILD";
/// PubAck futures in flight while filling the stream.
const PUBLISH_WINDOW: usize = 4096;
/// A run that makes no progress for this long is a failure, not a slow figure.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Latency samples before this much of the run are a warm-up and not counted.
const LATENCY_WARMUP: Duration = Duration::from_millis(500);

/// The event stored in the stream: ~60 bytes as MessagePack with field names.
#[derive(Debug, Serialize, Deserialize)]
struct PageView {
    id: u64,
    user: String,
    page: String,
    ts: u64,
}

impl PageView {
    fn sample(i: u64) -> Self {
        PageView {
            id: i,
            user: format!("user-{:06}", i % 1_000_000),
            page: format!("/products/{:05}", i % 100_000),
            ts: 1_700_000_000_000 + i,
        }
    }
}

/// The latency case's event: when it was sent, in nanoseconds since the Unix epoch.
#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    sent_ns: u64,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What the handler does besides decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    /// Decode only.
    Decode,
    /// Decode, then await a 1 ms sleep (stands for one I/O call).
    Io,
    /// Fail permanently: every message is dead-lettered.
    DeadLetter,
    /// Record the time from publish to handler start, at a steady publish rate.
    Latency,
    /// [`Work::Decode`] on a consumer ordered by a key with [`ORDERED_KEYS`] values.
    OrderedDecode,
    /// [`Work::Io`] on a consumer ordered by a key with [`ORDERED_KEYS`] values.
    OrderedIo,
}

/// Keys of the ordered cases: the key function gives message `seq` the key
/// `seq % ORDERED_KEYS`, so a key's messages are that far apart in the stream.
const ORDERED_KEYS: u64 = 1000;

impl Work {
    fn as_str(self) -> &'static str {
        match self {
            Work::Decode => "decode",
            Work::Io => "io",
            Work::DeadLetter => "dead_letter",
            Work::Latency => "latency",
            Work::OrderedDecode => "ordered_decode",
            Work::OrderedIo => "ordered_io",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "decode" => Ok(Work::Decode),
            "io" => Ok(Work::Io),
            "dead_letter" => Ok(Work::DeadLetter),
            "latency" => Ok(Work::Latency),
            "ordered_decode" => Ok(Work::OrderedDecode),
            "ordered_io" => Ok(Work::OrderedIo),
            other => bail!("unknown work {other:?}"),
        }
    }
}

/// Who consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    PlainNaive,
    PlainTuned,
    PlainNoAck,
    JetworkerDefaults,
    JetworkerTuned,
    JetworkerBatch,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::PlainNaive => "plain_naive",
            Side::PlainTuned => "plain_tuned",
            Side::PlainNoAck => "plain_no_ack",
            Side::JetworkerDefaults => "jetworker_defaults",
            Side::JetworkerTuned => "jetworker_tuned",
            Side::JetworkerBatch => "jetworker_batch",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        [
            Side::PlainNaive,
            Side::PlainTuned,
            Side::PlainNoAck,
            Side::JetworkerDefaults,
            Side::JetworkerTuned,
            Side::JetworkerBatch,
        ]
        .into_iter()
        .find(|side| side.as_str() == s)
        .ok_or_else(|| anyhow!("unknown {CHILD_ENV} role {s:?}"))
    }

    fn label(self) -> &'static str {
        match self {
            Side::PlainNaive => "plain naive",
            Side::PlainTuned => "plain tuned",
            Side::PlainNoAck => "plain, no acks",
            Side::JetworkerDefaults => "jetworker defaults",
            Side::JetworkerTuned => "jetworker tuned",
            Side::JetworkerBatch => "jetworker batch",
        }
    }
}

/// Settings shared by the parent and its children.
#[derive(Debug, Clone)]
struct Settings {
    messages: u64,
    dead_letters: u64,
    rss_messages: u64,
    concurrency: u64,
    latency_rate: u64,
    latency_secs: u64,
    repeats: usize,
    /// The cases to run (`BENCH_CASES`); `None`: all of them.
    cases: Option<Vec<Work>>,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let settings = Settings {
            messages: env_u64("BENCH_MESSAGES", 200_000)?,
            dead_letters: env_u64("BENCH_DEAD_LETTERS", 50_000)?,
            rss_messages: env_u64("BENCH_RSS_MESSAGES", 1_000_000)?,
            concurrency: env_u64("BENCH_CONCURRENCY", 1_000)?,
            latency_rate: env_u64("BENCH_LATENCY_RATE", 5_000)?,
            latency_secs: env_u64("BENCH_LATENCY_SECS", 4)?,
            repeats: usize::try_from(env_u64("BENCH_REPEATS", 3)?)?,
            cases: match std::env::var("BENCH_CASES") {
                Ok(list) => Some(
                    list.split(',')
                        .map(str::trim)
                        .filter(|name| !name.is_empty())
                        .map(Work::parse)
                        .collect::<anyhow::Result<_>>()?,
                ),
                Err(_) => None,
            },
        };
        if settings.messages == 0
            || settings.dead_letters == 0
            || settings.concurrency == 0
            || settings.latency_rate == 0
            || settings.repeats == 0
        {
            bail!("BENCH_MESSAGES, BENCH_DEAD_LETTERS, BENCH_CONCURRENCY, BENCH_LATENCY_RATE and BENCH_REPEATS must be positive");
        }
        Ok(settings)
    }

    /// True when `BENCH_CASES` asks for `work` (or for everything).
    fn runs(&self, work: Work) -> bool {
        self.cases
            .as_ref()
            .is_none_or(|cases| cases.contains(&work))
    }

    /// Events the stream is filled with: enough for every case.
    fn backlog(&self) -> u64 {
        self.messages.max(self.dead_letters).max(self.rss_messages)
    }
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// What a child reports on its last stdout line.
#[derive(Debug, Clone, Default)]
struct RunResult {
    count: u64,
    secs: f64,
    rss_start_kb: u64,
    hwm_kb: u64,
    /// CPU time (user + system, all threads) the child used inside the timed window.
    cpu_secs: f64,
    /// Latency case: median and 99th percentile, in microseconds.
    p50_us: f64,
    p99_us: f64,
    extra: String,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }

    fn to_line(&self) -> String {
        format!(
            "RESULT count={} secs={:.6} rss_start_kb={} hwm_kb={} cpu_secs={:.3} p50_us={:.1} p99_us={:.1} extra={}",
            self.count, self.secs, self.rss_start_kb, self.hwm_kb, self.cpu_secs, self.p50_us, self.p99_us, self.extra
        )
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let rest = line
            .strip_prefix("RESULT ")
            .ok_or_else(|| anyhow!("not a result line: {line:?}"))?;
        let (fields, extra) = rest.split_once(" extra=").unwrap_or((rest, ""));
        let mut map = BTreeMap::new();
        for field in fields.split_whitespace() {
            if let Some((k, v)) = field.split_once('=') {
                map.insert(k, v);
            }
        }
        let get = |k: &str| {
            map.get(k)
                .copied()
                .ok_or_else(|| anyhow!("result line without {k}: {line:?}"))
        };
        Ok(RunResult {
            count: get("count")?.parse()?,
            secs: get("secs")?.parse()?,
            rss_start_kb: get("rss_start_kb")?.parse()?,
            hwm_kb: get("hwm_kb")?.parse()?,
            cpu_secs: get("cpu_secs")?.parse()?,
            p50_us: get("p50_us")?.parse()?,
            p99_us: get("p99_us")?.parse()?,
            extra: extra.to_owned(),
        })
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it. Then a small smoke run proves the bench still works without costing minutes
    // (the children inherit the sizes through the environment).
    let smoke = std::env::var_os(CHILD_ENV).is_none() && !std::env::args().any(|a| a == "--bench");
    if smoke {
        for (name, value) in [
            ("BENCH_MESSAGES", "2000"),
            ("BENCH_DEAD_LETTERS", "500"),
            ("BENCH_RSS_MESSAGES", "0"),
            ("BENCH_LATENCY_SECS", "1"),
            ("BENCH_REPEATS", "1"),
        ] {
            std::env::set_var(name, value);
        }
        println!("smoke run (not `cargo bench`): figures are not meaningful");
    }
    let settings = Settings::from_env()?;
    if let Ok(role) = std::env::var(CHILD_ENV) {
        return child(Side::parse(&role)?, &settings);
    }
    parent(&settings)
}

// ---------------------------------------------------------------------------------------
// The parent: server, stream, children, table
// ---------------------------------------------------------------------------------------

/// One measurement: who consumes, doing what, over how many messages.
#[derive(Debug, Clone, Copy)]
struct Measurement {
    side: Side,
    work: Work,
    count: u64,
}

/// The measurements of one round, in the order they run (alternated between rounds).
fn round(settings: &Settings) -> Vec<Measurement> {
    let m = |side, work, count| Measurement { side, work, count };
    let n = settings.messages;
    vec![
        m(Side::PlainNaive, Work::Decode, n),
        m(Side::PlainTuned, Work::Decode, n),
        m(Side::PlainNoAck, Work::Decode, n),
        m(Side::JetworkerDefaults, Work::Decode, n),
        m(Side::JetworkerTuned, Work::Decode, n),
        m(Side::JetworkerBatch, Work::Decode, n),
        m(Side::JetworkerTuned, Work::Io, n),
        m(Side::JetworkerTuned, Work::OrderedDecode, n),
        m(Side::JetworkerTuned, Work::OrderedIo, n),
        // 32 slots of 1 ms: ~30k msg/s, so a quarter of the backlog is plenty.
        m(Side::JetworkerDefaults, Work::Io, (n / 4).max(1)),
        m(
            Side::JetworkerDefaults,
            Work::DeadLetter,
            settings.dead_letters,
        ),
        m(Side::PlainTuned, Work::Latency, 0),
        m(Side::JetworkerDefaults, Work::Latency, 0),
    ]
    .into_iter()
    .filter(|m| settings.runs(m.work))
    .collect()
}

type Results = BTreeMap<(Work, Side), Vec<RunResult>>;

fn parent(settings: &Settings) -> anyhow::Result<()> {
    let binary = server::server_binary()?;
    let version = server::server_version()?;
    println!(
        "jetworker throughput bench: nats-server v{version} ({}), {} events, tuned concurrency {}, {} repeats",
        binary.display(),
        settings.messages,
        settings.concurrency,
        settings.repeats
    );
    let started = Instant::now();
    let nats = NatsServer::start()?;
    let url = nats.url();
    let rt = tokio::runtime::Runtime::new()?;

    let (js, fill_secs, bytes) = rt.block_on(fill(&url, settings.backlog()))?;
    let payload_bytes = rmp_serde::to_vec_named(&PageView::sample(settings.messages / 2))?.len();
    println!(
        "filled stream {STREAM}: {} events, {payload_bytes} B MessagePack payload each, {} bytes stored ({:.1} B/event with subject and framing), in {fill_secs:.1}s (not timed)",
        settings.backlog(),
        bytes,
        bytes as f64 / settings.backlog() as f64
    );

    let exe = std::env::current_exe()?;
    let mut results: Results = BTreeMap::new();
    let mut runs = Vec::new();
    for repeat in 0..settings.repeats {
        let mut order = round(settings);
        // Alternate the order so no side always runs on a warmer server.
        if repeat % 2 == 1 {
            order.reverse();
        }
        runs.extend(order.into_iter().map(|m| (repeat, m)));
    }
    if settings.rss_messages > 0 && settings.runs(Work::Decode) {
        runs.push((
            0,
            Measurement {
                side: Side::JetworkerDefaults,
                work: Work::Decode,
                count: settings.rss_messages,
            },
        ));
    }
    let mut rss_drain = None;
    for (i, (repeat, m)) in runs.iter().enumerate() {
        let consumer = format!("{}_{}_{i}", m.side.as_str(), m.work.as_str());
        let server_cpu_start = server_cpu(&nats);
        let dead_letters_before = rt.block_on(stored(&js, DLQ_STREAM))?;
        let result = run_child(&exe, m, &url, &consumer)?;
        let server_cpu_used = server_cpu(&nats) - server_cpu_start;
        let checked = match m.work {
            Work::Latency => rt.block_on(check_consumer(&js, LATENCY_STREAM, &consumer, 0)),
            _ => rt.block_on(check_consumer(&js, STREAM, &consumer, m.count)),
        };
        // jetworker must settle everything exactly once; the plain loops are the
        // reference, and what they leave unsettled is reported, not fatal.
        let check = match checked {
            Ok(check) => check,
            Err(e)
                if matches!(
                    m.side,
                    Side::PlainNaive | Side::PlainTuned | Side::PlainNoAck
                ) =>
            {
                format!("CHECK FAILED (plain loop): {e}")
            }
            Err(e) => return Err(e),
        };
        if m.work == Work::DeadLetter {
            let stored_copies = rt.block_on(stored(&js, DLQ_STREAM))? - dead_letters_before;
            if stored_copies < m.count {
                bail!(
                    "{consumer}: {stored_copies} dead-letter copies stored, expected {}",
                    m.count
                );
            }
        }
        let latency = if m.work == Work::Latency {
            format!("p50 {:.0} us p99 {:.0} us  ", result.p50_us, result.p99_us)
        } else {
            String::new()
        };
        println!(
            "  [{}] {:<11} {:<18} {:>8} msgs in {:>7.3}s = {:>9.0} msg/s  {latency}peak RSS {:>6.1} MiB (start {:>5.1})  CPU/msg: worker {:>5.1} us, server {:>5.1} us  {} {}",
            repeat + 1,
            m.work.as_str(),
            m.side.label(),
            result.count,
            result.secs,
            result.rate(),
            mib(result.hwm_kb),
            mib(result.rss_start_kb),
            1e6 * result.cpu_secs / result.count.max(1) as f64,
            1e6 * server_cpu_used / result.count.max(1) as f64,
            check,
            result.extra
        );
        if settings.rss_messages > 0 && settings.runs(Work::Decode) && i + 1 == runs.len() {
            rss_drain = Some(result);
        } else {
            results.entry((m.work, m.side)).or_default().push(result);
        }
    }
    report(settings, &version, &results, rss_drain.as_ref())?;
    println!("total time {:.0}s", started.elapsed().as_secs_f64());
    drop(nats);
    Ok(())
}

/// The medians of one case and side.
struct Medians {
    rate: f64,
    hwm_kb: f64,
    cpu_us: f64,
    p50_us: f64,
    p99_us: f64,
    runs: usize,
}

fn medians(results: &Results, work: Work, side: Side) -> anyhow::Result<Medians> {
    let runs = results
        .get(&(work, side))
        .ok_or_else(|| anyhow!("no results for {} {}", work.as_str(), side.as_str()))?;
    let of = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    Ok(Medians {
        rate: of(&RunResult::rate),
        hwm_kb: of(&|r| r.hwm_kb as f64),
        cpu_us: of(&|r| 1e6 * r.cpu_secs / r.count.max(1) as f64),
        p50_us: of(&|r| r.p50_us),
        p99_us: of(&|r| r.p99_us),
        runs: runs.len(),
    })
}

/// The table of medians and the targets.
fn report(
    settings: &Settings,
    version: &str,
    results: &Results,
    rss_drain: Option<&RunResult>,
) -> anyhow::Result<()> {
    println!();
    println!(
        "nats-server v{version}; events of ~60 B in one R1 file stream; medians of {} runs, each a fresh durable consumer; tuned: jetworker concurrency {} / max_ack_pending {}, plain batch 2000 / max_ack_pending 20000",
        settings.repeats,
        settings.concurrency,
        2 * settings.concurrency
    );
    // Without the decode-only case (`BENCH_CASES`) there is no reference: no ratios.
    let found = |work, side| medians(results, work, side).ok();
    let reference = found(Work::Decode, Side::PlainTuned).map_or(f64::NAN, |m| m.rate);
    let header = format!(
        "{:<18} | {:<18} | {:>11} | {:>14} | {:>9} | {:>11}",
        "case", "consumer", "msg/s", "x plain tuned", "peak RSS", "CPU us/msg"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let rows = [
        ("decode only", Work::Decode, Side::PlainNaive),
        ("decode only", Work::Decode, Side::PlainTuned),
        ("decode only", Work::Decode, Side::PlainNoAck),
        ("decode only", Work::Decode, Side::JetworkerDefaults),
        ("decode only", Work::Decode, Side::JetworkerTuned),
        ("decode only", Work::Decode, Side::JetworkerBatch),
        ("1 ms I/O", Work::Io, Side::JetworkerDefaults),
        ("1 ms I/O", Work::Io, Side::JetworkerTuned),
        ("decode, ordered", Work::OrderedDecode, Side::JetworkerTuned),
        ("1 ms I/O, ordered", Work::OrderedIo, Side::JetworkerTuned),
        (
            "dead-letter burst",
            Work::DeadLetter,
            Side::JetworkerDefaults,
        ),
    ];
    for (label, work, side) in rows {
        let Some(m) = found(work, side) else { continue };
        println!(
            "{label:<18} | {:<18} | {:>11.0} | {:>13.2}x | {:>5.1} MiB | {:>11.1}",
            side.label(),
            m.rate,
            m.rate / reference,
            mib(m.hwm_kb as u64),
            m.cpu_us
        );
    }
    for side in [Side::PlainTuned, Side::JetworkerDefaults] {
        let Some(m) = found(Work::Latency, side) else {
            continue;
        };
        println!(
            "latency at {}/s: {:<18} publish to handler start p50 {:.0} us, p99 {:.0} us ({} runs)",
            settings.latency_rate,
            side.label(),
            m.p50_us,
            m.p99_us,
            m.runs
        );
    }
    if let Some(r) = rss_drain {
        println!(
            "peak RSS draining {} at defaults: {:.1} MiB ({:.0} msg/s)",
            r.count,
            mib(r.hwm_kb),
            r.rate()
        );
    }

    let ratio = |work, side| found(work, side).map(|m| m.rate / reference);
    let ordered = |work, unordered| {
        Some(found(work, Side::JetworkerTuned)?.rate / found(unordered, Side::JetworkerTuned)?.rate)
    };
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!();
    println!("targets:");
    if let Some(decode) = ratio(Work::Decode, Side::JetworkerDefaults) {
        println!(
            "  decode only, jetworker defaults >= 1.0x plain tuned: {decode:.2}x {}",
            verdict(decode >= 1.0)
        );
    }
    if let Some(batch) = ratio(Work::Decode, Side::JetworkerBatch) {
        println!(
            "  decode only, jetworker batch handler at defaults >= 1.5x plain tuned: {batch:.2}x {}",
            verdict(batch >= 1.5)
        );
        if let Some(ceiling) = ratio(Work::Decode, Side::PlainNoAck) {
            println!(
                "    (the same loop with no acks at all, the ceiling for any consumer that acks each message: {ceiling:.2}x)"
            );
        }
    }
    if let Some(io) = ratio(Work::Io, Side::JetworkerTuned).filter(|io| io.is_finite()) {
        println!(
            "  1 ms I/O, jetworker concurrency {} >= 0.8x plain tuned decode-only: {io:.2}x {}",
            settings.concurrency,
            verdict(io >= 0.8)
        );
    }
    if let (Some(ordered_decode), Some(ordered_io)) = (
        ordered(Work::OrderedDecode, Work::Decode),
        ordered(Work::OrderedIo, Work::Io),
    ) {
        println!(
            "  ordered lanes, {ORDERED_KEYS} keys, >= 0.8x unordered at concurrency {}: decode only {ordered_decode:.2}x {}, 1 ms I/O {ordered_io:.2}x {}",
            settings.concurrency,
            verdict(ordered_decode >= 0.8),
            verdict(ordered_io >= 0.8)
        );
    }
    if let Some(m) = found(Work::DeadLetter, Side::JetworkerDefaults) {
        println!(
            "  dead-letter burst at defaults >= 20000 msg/s: {:.0} msg/s {}",
            m.rate,
            verdict(m.rate >= 20_000.0)
        );
    }
    if let Some(m) = found(Work::Latency, Side::JetworkerDefaults) {
        println!(
            "  p99 publish to handler start < 2000 us at {}/s: {:.0} us {}",
            settings.latency_rate,
            m.p99_us,
            verdict(m.p99_us < 2000.0)
        );
    }
    match rss_drain {
        Some(r) => println!(
            "  peak RSS < 50 MiB draining {}: {:.1} MiB {}",
            r.count,
            mib(r.hwm_kb),
            verdict(mib(r.hwm_kb) < 50.0)
        ),
        None => println!(
            "  peak RSS draining a 1M backlog: skipped (BENCH_RSS_MESSAGES=0 or no decode case)"
        ),
    }
    Ok(())
}

/// The server's CPU seconds so far (NaN when unknown): compared around each child run.
fn server_cpu(nats: &NatsServer) -> f64 {
    nats.pid()
        .and_then(|pid| cpu_secs(&pid.to_string()).ok())
        .unwrap_or(f64::NAN)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The streams as jetworker declares them: the parent provisions them with jetworker's
/// own provisioning, so every child finds them "unchanged".
fn streams_toml(url: &str) -> String {
    format!(
        r#"
[connection]
servers = ["{url}"]
request_timeout = "10s"

[worker]
shutdown_grace = "10s"
ops_listen = ""

[[streams]]
name = "{STREAM}"
subjects = ["bench.events.>"]

[[streams]]
name = "{DLQ_STREAM}"
subjects = ["bench.dlq.>"]
duplicate_window = "1s"

[[streams]]
name = "{LATENCY_STREAM}"
subjects = ["bench.latency.>"]
"#
    )
}

fn config(text: &str) -> anyhow::Result<Config> {
    Config::from_toml_with_env(text, Path::new("bench.toml"), std::iter::empty())
        .map_err(|e| anyhow!("bench config: {e}"))
}

/// Creates the streams and publishes `count` events, many PubAcks in flight at once.
async fn fill(url: &str, count: u64) -> anyhow::Result<(jetstream::Context, f64, u64)> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    jetworker::provision(&client, &js, &config(&streams_toml(url))?, false).await?;

    let started = Instant::now();
    let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
    for i in 0..count {
        let payload = rmp_serde::to_vec_named(&PageView::sample(i))?;
        acks.push(js.publish(SUBJECT, payload.into()).await?);
        if acks.len() == PUBLISH_WINDOW {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await?;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let mut stream = js.get_stream(STREAM).await?;
    let state = stream.info().await?.state.clone();
    if state.messages != count {
        bail!("stream holds {} messages, expected {count}", state.messages);
    }
    Ok((js, fill_secs, state.bytes))
}

/// Messages stored in `stream` now.
async fn stored(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

/// Runs one measurement in a child process and returns what it printed.
fn run_child(exe: &Path, m: &Measurement, url: &str, consumer: &str) -> anyhow::Result<RunResult> {
    let wrapper = std::env::var("BENCH_CHILD_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    let output = command
        .env(CHILD_ENV, m.side.as_str())
        .env("JETWORKER_BENCH_URL", url)
        .env("JETWORKER_BENCH_CONSUMER", consumer)
        .env("JETWORKER_BENCH_WORK", m.work.as_str())
        .env("JETWORKER_BENCH_COUNT", m.count.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} child for {consumer} failed ({}): {stdout}",
            m.side.as_str(),
            output.status
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| anyhow!("child for {consumer} printed no result: {stdout}"))?;
    RunResult::parse(line)
}

/// Checks on the server that the first `count` messages of `stream` were settled and
/// none redelivered, then deletes the consumer (each measurement gets a fresh one).
async fn check_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    count: u64,
) -> anyhow::Result<String> {
    let stream = js.get_stream(stream).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let info = loop {
        let info = stream.consumer_info(name).await?;
        if info.ack_floor.stream_sequence >= count || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stream.delete_consumer(name).await?;
    if info.ack_floor.stream_sequence < count || info.num_redelivered > 0 {
        bail!(
            "consumer {name}: ack floor {} (expected >= {count}), {} redelivered",
            info.ack_floor.stream_sequence,
            info.num_redelivered
        );
    }
    Ok(format!(
        "server: ack floor {}, redelivered {}",
        info.ack_floor.stream_sequence, info.num_redelivered
    ))
}

// ---------------------------------------------------------------------------------------
// The children: one measurement each
// ---------------------------------------------------------------------------------------

fn child(side: Side, settings: &Settings) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let url = var("JETWORKER_BENCH_URL")?;
    let consumer = var("JETWORKER_BENCH_CONSUMER")?;
    let work = Work::parse(&var("JETWORKER_BENCH_WORK")?)?;
    let count: u64 = var("JETWORKER_BENCH_COUNT")?.parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut result = match (side, work) {
        (Side::PlainNaive | Side::PlainTuned | Side::PlainNoAck, Work::Latency) => {
            rt.block_on(plain_latency(&url, &consumer, settings))?
        }
        (Side::PlainNaive | Side::PlainTuned | Side::PlainNoAck, _) => {
            rt.block_on(plain_run(&url, &consumer, side, work, count))?
        }
        (_, Work::Latency) => rt.block_on(jetworker_latency(&url, &consumer, side, settings))?,
        _ => rt.block_on(jetworker_run(&url, &consumer, side, work, count, settings))?,
    };
    drop(rt);
    result.hwm_kb = proc_status_kb("VmHWM")?;
    println!("{}", result.to_line());
    Ok(())
}

/// A field of `/proc/self/status` in kB (`VmHWM`, `VmRSS`).
fn proc_status_kb(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse().ok())
        })
        .ok_or_else(|| anyhow!("no {field} in /proc/self/status"))
}

/// CPU time (user + system, all threads) of process `pid` (or `self`) so far, in seconds,
/// from `/proc/<pid>/stat` (clock ticks of 1/100 s, the Linux default `CLK_TCK`).
fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// A plain consumer on `stream`: the server's defaults, or `max_ack_pending` 20000 for
/// the tuned loop, or no acks at all (`ack_policy` none: the ceiling of what the server
/// delivers, which no consumer that acks each message can pass).
async fn plain_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    side: Side,
    deliver_policy: DeliverPolicy,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let stream = js.get_stream(stream).await?;
    Ok(stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: if side == Side::PlainNoAck {
                AckPolicy::None
            } else {
                AckPolicy::Explicit
            },
            deliver_policy,
            max_ack_pending: if side == Side::PlainTuned { 20_000 } else { 0 },
            ..Default::default()
        })
        .await?)
}

/// The message stream a user gets: `messages()`, or batches of 2000 when tuned (and
/// without acks).
async fn plain_messages(
    consumer: &jetstream::consumer::PullConsumer,
    side: Side,
) -> anyhow::Result<pull::Stream> {
    Ok(if matches!(side, Side::PlainTuned | Side::PlainNoAck) {
        consumer
            .stream()
            .max_messages_per_batch(2000)
            .messages()
            .await?
    } else {
        consumer.messages().await?
    })
}

/// The loop a user writes by hand with async-nats.
async fn plain_run(
    url: &str,
    name: &str,
    side: Side,
    work: Work,
    count: u64,
) -> anyhow::Result<RunResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let consumer = plain_consumer(&js, STREAM, name, side, DeliverPolicy::All).await?;
    let rss_start_kb = proc_status_kb("VmRSS")?;

    let cpu_start = cpu_secs("self")?;
    let started = Instant::now();
    let mut messages = plain_messages(&consumer, side).await?;
    let mut done = 0u64;
    while done < count {
        let message = match tokio::time::timeout(STALL_LIMIT, messages.next()).await {
            Ok(Some(message)) => message.map_err(|e| anyhow!("pull: {e}"))?,
            Ok(None) => bail!("message stream ended after {done} messages"),
            Err(_) => bail!("no message for {STALL_LIMIT:?} after {done} messages"),
        };
        let event: PageView = rmp_serde::from_slice(&message.payload)?;
        black_box(&event);
        if work == Work::Io {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if side != Side::PlainNoAck {
            message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
        done += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu_secs("self")? - cpu_start;

    drop(messages);
    client.flush().await?;
    client.drain().await?;
    Ok(RunResult {
        count: done,
        secs,
        rss_start_kb,
        cpu_secs: cpu_used,
        ..Default::default()
    })
}

/// Latency samples: publish-to-start times, in nanoseconds, of probes sent after the
/// warm-up.
#[derive(Debug, Default)]
struct LatencySamples {
    count_from_ns: u64,
    samples: Mutex<Vec<u64>>,
}

impl LatencySamples {
    fn record(&self, sent_ns: u64, started_ns: u64) {
        if sent_ns < self.count_from_ns {
            return;
        }
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(started_ns.saturating_sub(sent_ns));
        }
    }

    fn len(&self) -> usize {
        self.samples.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The run's result: (p50, p99) in microseconds over `secs` of sampling.
    fn result(&self, secs: f64, rss_start_kb: u64, cpu_secs: f64) -> RunResult {
        let mut samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples
                .get(i)
                .map(|ns| *ns as f64 / 1000.0)
                .unwrap_or(f64::NAN)
        };
        RunResult {
            count: samples.len() as u64,
            secs,
            rss_start_kb,
            cpu_secs,
            p50_us: at(0.50),
            p99_us: at(0.99),
            ..Default::default()
        }
    }
}

/// Publishes probes at a steady `rate` for `warmup + secs`; returns how many.
fn publish_steadily(
    client: async_nats::Client,
    rate: u64,
    run_for: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < run_for {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let payload = rmp_serde::to_vec_named(&Probe { sent_ns: unix_ns() })?;
                client.publish(LATENCY_SUBJECT, payload.into()).await?;
                sent += 1;
            }
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(sent)
    })
}

/// The latency case's plan: sample after the warm-up for `latency_secs`.
fn latency_window(settings: &Settings) -> (LatencySamples, Duration) {
    let samples = LatencySamples {
        count_from_ns: unix_ns() + u64::try_from(LATENCY_WARMUP.as_nanos()).unwrap_or(0),
        samples: Mutex::new(Vec::new()),
    };
    (
        samples,
        LATENCY_WARMUP + Duration::from_secs(settings.latency_secs),
    )
}

/// The plain loop (tuned) receiving probes published at a steady rate.
async fn plain_latency(url: &str, name: &str, settings: &Settings) -> anyhow::Result<RunResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let consumer = plain_consumer(
        &js,
        LATENCY_STREAM,
        name,
        Side::PlainTuned,
        DeliverPolicy::New,
    )
    .await?;
    let mut messages = plain_messages(&consumer, Side::PlainTuned).await?;
    let rss_start_kb = proc_status_kb("VmRSS")?;
    let cpu_start = cpu_secs("self")?;
    let (samples, run_for) = latency_window(settings);
    let publisher = publish_steadily(
        async_nats::connect(url).await?,
        settings.latency_rate,
        run_for,
    );
    let started = Instant::now();
    let mut received = 0u64;
    let mut published = None;
    loop {
        if publisher.is_finished() && published.is_none() {
            published = Some(publisher.await??);
            break;
        }
        let Ok(next) = tokio::time::timeout(Duration::from_millis(10), messages.next()).await
        else {
            continue;
        };
        let message = next
            .ok_or_else(|| anyhow!("message stream ended"))?
            .map_err(|e| anyhow!("pull: {e}"))?;
        let now = unix_ns();
        let probe: Probe = rmp_serde::from_slice(&message.payload)?;
        samples.record(probe.sent_ns, now);
        message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        received += 1;
    }
    let published = published.unwrap_or(0);
    while received < published {
        match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
            Ok(Some(Ok(message))) => {
                let now = unix_ns();
                let probe: Probe = rmp_serde::from_slice(&message.payload)?;
                samples.record(probe.sent_ns, now);
                message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
                received += 1;
            }
            _ => bail!("received {received} of {published} probes"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu_secs("self")? - cpu_start;
    drop(messages);
    client.flush().await?;
    Ok(samples.result(secs, rss_start_kb, cpu_used))
}

async fn decode_only(event: Event<PageView>, _ctx: Context) -> Result<(), HandlerError> {
    black_box(&event);
    Ok(())
}

async fn decode_batch(events: Batch<PageView>, _ctx: BatchContext) -> BatchResult {
    black_box(&events);
    Ok(BatchFailures::new())
}

/// The ordered cases' key: the stream sequence (from the ack subject,
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`) modulo [`ORDERED_KEYS`].
fn sequence_key(message: &async_nats::Message) -> Option<String> {
    let sequence: u64 = message.reply.as_ref()?.split('.').nth(5)?.parse().ok()?;
    Some((sequence % ORDERED_KEYS).to_string())
}

async fn decode_then_io(event: Event<PageView>, _ctx: Context) -> Result<(), HandlerError> {
    black_box(&event);
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}

async fn fail_permanently(event: Event<PageView>, _ctx: Context) -> Result<(), HandlerError> {
    black_box(&event);
    Err(HandlerError::permanent("bench: every event is invalid"))
}

async fn record_latency(
    probe: Event<Probe>,
    ctx: Context<LatencySamples>,
) -> Result<(), HandlerError> {
    let now = unix_ns();
    ctx.state().record(probe.sent_ns, now);
    Ok(())
}

/// The consumer's config: nothing but its stream, handler and dead-letter subject at
/// the defaults; concurrency and max_ack_pending when tuned; `extra` lines.
fn jetworker_config(
    url: &str,
    name: &str,
    stream: &str,
    side: Side,
    settings: &Settings,
    extra: &str,
) -> anyhow::Result<Config> {
    let tuned = if side == Side::JetworkerTuned {
        format!(
            "concurrency = {}\nmax_ack_pending = {}\n",
            settings.concurrency,
            2 * settings.concurrency
        )
    } else {
        String::new()
    };
    config(&format!(
        r#"{streams}
[[consumers]]
name = "{name}"
stream = "{stream}"
handler = "bench"
dead_letter_subject = "bench.dlq.{name}"
{tuned}{extra}
"#,
        streams = streams_toml(url),
    ))
}

/// Waits until consumer `name` of [`STREAM`] has its ack floor at `count` or past it (at
/// most [`STALL_LIMIT`]).
async fn wait_for_ack_floor(url: &str, name: &str, count: u64) -> anyhow::Result<()> {
    let client = async_nats::connect(url).await?;
    let stream = jetstream::new(client).get_stream(STREAM).await?;
    let deadline = Instant::now() + STALL_LIMIT;
    loop {
        let floor = stream.consumer_info(name).await?.ack_floor.stream_sequence;
        if floor >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name}: ack floor {floor} after {STALL_LIMIT:?}, expected >= {count}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same work as a jetworker app, measured until `count` messages are settled (acked,
/// or dead-lettered in the dead-letter case).
async fn jetworker_run(
    url: &str,
    name: &str,
    side: Side,
    work: Work,
    count: u64,
    settings: &Settings,
) -> anyhow::Result<RunResult> {
    let ordered_by = match work {
        Work::OrderedDecode | Work::OrderedIo => "ordered_by = { function = \"bench_key\" }",
        _ => "",
    };
    let config = jetworker_config(url, name, STREAM, side, settings, ordered_by)?;
    let app = match work {
        Work::Decode if side == Side::JetworkerBatch => {
            App::new(()).batch_handler("bench", decode_batch)
        }
        Work::Io | Work::OrderedIo => App::new(()).handler("bench", decode_then_io),
        Work::DeadLetter => App::new(()).handler("bench", fail_permanently),
        Work::Decode | Work::Latency | Work::OrderedDecode => {
            App::new(()).handler("bench", decode_only)
        }
    };
    let app = app.key("bench_key", sequence_key);
    let stop = CancellationToken::new();
    let rss_start_kb = proc_status_kb("VmRSS")?;

    let running = app.start(config, stop.clone()).await?;
    let cpu_start = cpu_secs("self")?;
    let started = Instant::now();
    let stats = running
        .stats()
        .get(name)
        .cloned()
        .ok_or_else(|| anyhow!("no stats for consumer {name}"))?;
    let settled = || match work {
        Work::DeadLetter => stats.dead_letters(Reason::Permanent),
        _ => stats.acked.load(Ordering::Relaxed),
    };
    let mut last = (0u64, Instant::now());
    let done = loop {
        let settled = settled();
        if settled >= count {
            break settled;
        }
        if settled != last.0 {
            last = (settled, Instant::now());
        } else if last.1.elapsed() > STALL_LIMIT {
            stop.cancel();
            bail!("jetworker stalled at {settled} settled: {stats:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu_secs("self")? - cpu_start;

    // An ordered consumer settles across keys out of stream order: when `count` are
    // acked, a few below `count` may still wait behind their key, and stopping now
    // would hand them back (correctly) and fail the parent's ack-floor check. So it
    // runs on, untimed, until the server's ack floor reaches `count`.
    if matches!(work, Work::OrderedDecode | Work::OrderedIo) {
        wait_for_ack_floor(url, name, count).await?;
    }
    stop.cancel();
    let stats = running.wait().await;
    let stats = stats
        .get(name)
        .ok_or_else(|| anyhow!("no final stats for consumer {name}"))?;
    let extra = format!(
        "received {} retried {} redelivered {} released {} peak in-flight {}",
        stats.received.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        stats.redelivered.load(Ordering::Relaxed),
        stats.released.load(Ordering::Relaxed),
        stats.peak_in_flight.load(Ordering::Relaxed),
    );
    Ok(RunResult {
        count: done,
        secs,
        rss_start_kb,
        cpu_secs: cpu_used,
        extra,
        ..Default::default()
    })
}

/// jetworker receiving probes published at a steady rate.
async fn jetworker_latency(
    url: &str,
    name: &str,
    side: Side,
    settings: &Settings,
) -> anyhow::Result<RunResult> {
    let config = jetworker_config(
        url,
        name,
        LATENCY_STREAM,
        side,
        settings,
        "deliver_policy = \"new\"",
    )?;
    let (samples, run_for) = latency_window(settings);
    let app = App::new(samples).handler("bench", record_latency);
    let samples: Arc<LatencySamples> = app.state().clone();
    let stop = CancellationToken::new();
    let rss_start_kb = proc_status_kb("VmRSS")?;
    let running = app.start(config, stop.clone()).await?;
    let cpu_start = cpu_secs("self")?;
    let started = Instant::now();
    let published = publish_steadily(
        async_nats::connect(url).await?,
        settings.latency_rate,
        run_for,
    )
    .await??;
    let stats = running
        .stats()
        .get(name)
        .cloned()
        .ok_or_else(|| anyhow!("no stats for consumer {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.acked.load(Ordering::Relaxed) < published {
        if Instant::now() > deadline {
            stop.cancel();
            bail!(
                "acked {} of {published} probes",
                stats.acked.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu_secs("self")? - cpu_start;
    stop.cancel();
    running.wait().await;
    if samples.len() == 0 {
        bail!("no latency samples");
    }
    Ok(samples.result(secs, rss_start_kb, cpu_used))
}
