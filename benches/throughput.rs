//! Throughput of jetworker next to the plain async-nats loop a user writes by hand, on the
//! same nats-server, over the same stored data, in the same run.
//!
//! # Run
//! ```text
//! cargo bench --bench throughput
//! BENCH_MESSAGES=20000 cargo bench --bench throughput            # a quick run
//! NATS_SERVER_BIN=.tools/nats-server-2.14.0/nats-server cargo bench --bench throughput
//! ```
//! Environment knobs (all optional):
//! - `BENCH_MESSAGES` (default 200000): events in the stream, and what "decode only" and
//!   the jetworker side of "1 ms I/O" drain.
//! - `BENCH_SLOW_SAMPLE` (default 2000): how many events the *sequential* plain loop
//!   processes in "1 ms I/O" (it runs at < 1000 msg/s; its rate is what is compared).
//! - `BENCH_CONCURRENCY` (default 1000): jetworker `concurrency`; `max_ack_pending` is
//!   twice that, so acks on the wire never hold deliveries back.
//! - `BENCH_REPEATS` (default 3): measurements per case and side; the median is reported.
//! - `NATS_SERVER_BIN`: the server binary (see `jetworker::testing::server`).
//!
//! # What it measures
//! One real JetStream server (loopback, temp store) is started and a file stream `BENCH`
//! is filled with `BENCH_MESSAGES` MessagePack events of ~60 bytes (pipelined publishes,
//! not timed). Then, for each case and side, a *fresh durable consumer* (deliver all,
//! explicit ack) reads the whole backlog, so every measurement reads identical data:
//!
//! - **plain async-nats**: `consumer.messages().await`, and for each message
//!   `rmp_serde::from_slice::<PageView>` -> (case "1 ms I/O": `sleep(1 ms)`) -> `ack()`.
//!   The clock starts before `messages()` (the consumer already exists) and stops when the
//!   last message's ack is queued.
//! - **jetworker**: an [`App`] with one handler taking `Event<PageView>` (decoded by the
//!   framework) that returns `Ok(())` (case "1 ms I/O": after `sleep(1 ms)`), run with
//!   `App::start` + `Running::wait` (what `App::run_until` does, with the stats visible
//!   while it runs). The clock starts when `start` returned (connected, consumer
//!   provisioned) and stops when the `acked` counter reaches the count (polled every ms).
//!
//! Acks are fire-and-forget publishes on both sides, so "acked" means "ack queued on the
//! connection"; after each run the parent checks through consumer info that the server's
//! ack floor reached the count and nothing was redelivered.
//!
//! Every measurement runs in a child process (this bench binary re-executed with
//! `JETWORKER_BENCH_CHILD` set) that prints its own peak RSS (`VmHWM` from
//! `/proc/self/status`) right before it exits: that is the "peak RSS" column, the whole
//! process (runtime, client, buffers) while draining the backlog.
//!
//! The machine this was written on has 2 cores shared with the server: rates are noisy,
//! hence the median of `BENCH_REPEATS` fresh consumers.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use futures::StreamExt;
use jetworker::testing::server::{self, NatsServer};
use jetworker::Config;
use jetworker::{App, Context, Event, HandlerError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.events.view";
/// Environment variable selecting a child role (`plain` or `jetworker`).
const CHILD_ENV: &str = "JETWORKER_BENCH_CHILD";
/// PubAck futures in flight while filling the stream.
const PUBLISH_WINDOW: usize = 4096;
/// A run that makes no progress for this long is a failure, not a slow figure.
const STALL_LIMIT: Duration = Duration::from_secs(30);

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

/// What the handler does besides decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Decode only.
    Decode,
    /// Decode, then await a 1 ms sleep (stands for one I/O call).
    Io,
}

impl Work {
    fn as_str(self) -> &'static str {
        match self {
            Work::Decode => "decode",
            Work::Io => "io",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "decode" => Ok(Work::Decode),
            "io" => Ok(Work::Io),
            other => bail!("unknown work {other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Plain,
    Jetworker,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Plain => "plain",
            Side::Jetworker => "jetworker",
        }
    }
}

/// Settings shared by the parent and its children.
#[derive(Debug, Clone)]
struct Settings {
    messages: u64,
    slow_sample: u64,
    concurrency: u64,
    repeats: usize,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let settings = Settings {
            messages: env_u64("BENCH_MESSAGES", 200_000)?,
            slow_sample: env_u64("BENCH_SLOW_SAMPLE", 2_000)?,
            concurrency: env_u64("BENCH_CONCURRENCY", 1_000)?,
            repeats: usize::try_from(env_u64("BENCH_REPEATS", 3)?)?,
        };
        if settings.messages == 0 || settings.concurrency == 0 || settings.repeats == 0 {
            bail!("BENCH_MESSAGES, BENCH_CONCURRENCY and BENCH_REPEATS must be positive");
        }
        Ok(settings)
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
#[derive(Debug, Clone)]
struct RunResult {
    count: u64,
    secs: f64,
    rss_start_kb: u64,
    hwm_kb: u64,
    /// CPU time (user + system, all threads) the child used inside the timed window.
    cpu_secs: f64,
    extra: String,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }

    fn to_line(&self) -> String {
        format!(
            "RESULT count={} secs={:.6} rss_start_kb={} hwm_kb={} cpu_secs={:.3} extra={}",
            self.count, self.secs, self.rss_start_kb, self.hwm_kb, self.cpu_secs, self.extra
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
            ("BENCH_SLOW_SAMPLE", "100"),
            ("BENCH_REPEATS", "1"),
        ] {
            std::env::set_var(name, value);
        }
        println!("smoke run (not `cargo bench`): figures are not meaningful");
    }
    let settings = Settings::from_env()?;
    if let Ok(role) = std::env::var(CHILD_ENV) {
        return child(&role, &settings);
    }
    parent(&settings)
}

// ---------------------------------------------------------------------------------------
// The parent: server, stream, children, table
// ---------------------------------------------------------------------------------------

struct Case {
    label: &'static str,
    work: Work,
    /// Messages the plain loop processes.
    plain_count: u64,
    /// Messages jetworker processes.
    jetworker_count: u64,
    /// jetworker / plain ratio of medians to reach.
    target: f64,
}

fn parent(settings: &Settings) -> anyhow::Result<()> {
    let binary = server::server_binary()?;
    let version = server::server_version()?;
    println!(
        "jetworker throughput bench: nats-server v{version} ({}), {} events, concurrency {}, {} repeats",
        binary.display(),
        settings.messages,
        settings.concurrency,
        settings.repeats
    );
    let started = Instant::now();
    let nats = NatsServer::start()?;
    let url = nats.url();
    let rt = tokio::runtime::Runtime::new()?;

    let (js, fill_secs, bytes) = rt.block_on(fill(&url, settings))?;
    let payload_bytes = rmp_serde::to_vec_named(&PageView::sample(settings.messages / 2))?.len();
    println!(
        "filled stream {STREAM}: {} events, {payload_bytes} B MessagePack payload each, {} bytes stored ({:.1} B/event with subject and framing), in {fill_secs:.1}s (not timed)",
        settings.messages,
        bytes,
        bytes as f64 / settings.messages as f64
    );

    let cases = [
        Case {
            label: "decode only",
            work: Work::Decode,
            plain_count: settings.messages,
            jetworker_count: settings.messages,
            target: 1.0,
        },
        Case {
            label: "1 ms I/O",
            work: Work::Io,
            plain_count: settings.slow_sample.min(settings.messages),
            jetworker_count: settings.messages,
            target: 50.0,
        },
    ];

    let exe = std::env::current_exe()?;
    let mut results: BTreeMap<(usize, Side), Vec<RunResult>> = BTreeMap::new();
    for repeat in 0..settings.repeats {
        for (ci, case) in cases.iter().enumerate() {
            // Alternate the order so neither side always runs on a warmer server.
            let sides = if repeat % 2 == 0 {
                [Side::Plain, Side::Jetworker]
            } else {
                [Side::Jetworker, Side::Plain]
            };
            for side in sides {
                let count = match side {
                    Side::Plain => case.plain_count,
                    Side::Jetworker => case.jetworker_count,
                };
                let consumer = format!("{}_{}_{}", side.as_str(), case.work.as_str(), repeat);
                let server_cpu_start = server_cpu(&nats);
                let result = run_child(&exe, side, &url, &consumer, case.work, count)?;
                let server_cpu_used = server_cpu(&nats) - server_cpu_start;
                let check = rt.block_on(check_consumer(&js, &consumer, count))?;
                println!(
                    "  [{}] {:<12} {:<9} {:>8} msgs in {:>7.3}s = {:>9.0} msg/s  peak RSS {:>6.1} MiB (start {:>5.1} MiB)  CPU/msg: worker {:>5.1} us, server {:>5.1} us  {} {}",
                    repeat + 1,
                    case.label,
                    side.as_str(),
                    result.count,
                    result.secs,
                    result.rate(),
                    mib(result.hwm_kb),
                    mib(result.rss_start_kb),
                    1e6 * result.cpu_secs / result.count as f64,
                    1e6 * server_cpu_used / result.count as f64,
                    check,
                    result.extra
                );
                results.entry((ci, side)).or_default().push(result);
            }
        }
    }

    println!();
    println!(
        "nats-server v{version}; {} events of ~60 B in one R1 file stream; median of {} runs, each a fresh durable consumer; jetworker concurrency {}, max_ack_pending {}",
        settings.messages,
        settings.repeats,
        settings.concurrency,
        2 * settings.concurrency
    );
    let header = format!(
        "{:<12} | {:>28} | {:>20} | {:>8} | {:>7} | {:>6} | {:>27}",
        "case",
        "plain async-nats msg/s (n)",
        "jetworker msg/s (n)",
        "ratio",
        "target",
        "met",
        "peak RSS plain / jetworker"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let mut all_met = true;
    for (ci, case) in cases.iter().enumerate() {
        let plain = results
            .get(&(ci, Side::Plain))
            .ok_or_else(|| anyhow!("no plain results"))?;
        let jw = results
            .get(&(ci, Side::Jetworker))
            .ok_or_else(|| anyhow!("no jetworker results"))?;
        let plain_rate = median(plain.iter().map(RunResult::rate).collect());
        let jw_rate = median(jw.iter().map(RunResult::rate).collect());
        let ratio = jw_rate / plain_rate;
        let met = ratio >= case.target;
        all_met &= met;
        let plain_hwm = median(plain.iter().map(|r| r.hwm_kb as f64).collect());
        let jw_hwm = median(jw.iter().map(|r| r.hwm_kb as f64).collect());
        println!(
            "{:<12} | {:>28} | {:>20} | {:>7.2}x | {:>6}x | {:>6} | {:>27}",
            case.label,
            format!("{plain_rate:.0} ({})", case.plain_count),
            format!("{jw_rate:.0} ({})", case.jetworker_count),
            ratio,
            format!(">={}", case.target),
            if met { "yes" } else { "NO" },
            format!(
                "{:.1} MiB / {:.1} MiB",
                mib(plain_hwm as u64),
                mib(jw_hwm as u64)
            ),
        );
    }
    println!();
    println!(
        "(n) = messages processed per measurement; rates are medians, ratio = jetworker median / plain median; peak RSS = median VmHWM of the measuring child process"
    );
    println!(
        "targets {}; total time {:.0}s",
        if all_met { "met" } else { "NOT all met" },
        started.elapsed().as_secs_f64()
    );
    drop(nats);
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
name = "BENCH_DLQ"
subjects = ["bench.dlq.>"]
"#
    )
}

fn config(text: &str) -> anyhow::Result<Config> {
    Config::from_toml_with_env(text, Path::new("bench.toml"), std::iter::empty())
        .map_err(|e| anyhow!("bench config: {e}"))
}

/// Creates the streams and publishes the events, many PubAcks in flight at once.
async fn fill(url: &str, settings: &Settings) -> anyhow::Result<(jetstream::Context, f64, u64)> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    jetworker::provision(&client, &js, &config(&streams_toml(url))?, false).await?;

    let started = Instant::now();
    let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
    for i in 0..settings.messages {
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
    if state.messages != settings.messages {
        bail!(
            "stream holds {} messages, expected {}",
            state.messages,
            settings.messages
        );
    }
    Ok((js, fill_secs, state.bytes))
}

/// Runs one measurement in a child process and returns what it printed.
fn run_child(
    exe: &Path,
    side: Side,
    url: &str,
    consumer: &str,
    work: Work,
    count: u64,
) -> anyhow::Result<RunResult> {
    let output = Command::new(exe)
        .env(CHILD_ENV, side.as_str())
        .env("JETWORKER_BENCH_URL", url)
        .env("JETWORKER_BENCH_CONSUMER", consumer)
        .env("JETWORKER_BENCH_WORK", work.as_str())
        .env("JETWORKER_BENCH_COUNT", count.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} child for {consumer} failed ({}): {stdout}",
            side.as_str(),
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

/// Checks on the server that the first `count` messages were acked and none redelivered,
/// then deletes the consumer (each measurement gets a fresh one).
async fn check_consumer(js: &jetstream::Context, name: &str, count: u64) -> anyhow::Result<String> {
    let stream = js.get_stream(STREAM).await?;
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

fn child(role: &str, settings: &Settings) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let url = var("JETWORKER_BENCH_URL")?;
    let consumer = var("JETWORKER_BENCH_CONSUMER")?;
    let work = Work::parse(&var("JETWORKER_BENCH_WORK")?)?;
    let count: u64 = var("JETWORKER_BENCH_COUNT")?.parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut result = match role {
        "plain" => rt.block_on(plain_run(&url, &consumer, work, count))?,
        "jetworker" => rt.block_on(jetworker_run(&url, &consumer, work, count, settings))?,
        other => bail!("unknown {CHILD_ENV} role {other:?}"),
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

/// The loop a user writes by hand with async-nats.
async fn plain_run(url: &str, name: &str, work: Work, count: u64) -> anyhow::Result<RunResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let rss_start_kb = proc_status_kb("VmRSS")?;

    let cpu_start = cpu_secs("self")?;
    let started = Instant::now();
    let mut messages = consumer.messages().await?;
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
        message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
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
        hwm_kb: 0,
        cpu_secs: cpu_used,
        extra: String::new(),
    })
}

async fn decode_only(event: Event<PageView>, _ctx: Context) -> Result<(), HandlerError> {
    black_box(&event);
    Ok(())
}

async fn decode_then_io(event: Event<PageView>, _ctx: Context) -> Result<(), HandlerError> {
    black_box(&event);
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}

/// The same work as a jetworker app.
async fn jetworker_run(
    url: &str,
    name: &str,
    work: Work,
    count: u64,
    settings: &Settings,
) -> anyhow::Result<RunResult> {
    let text = format!(
        r#"{streams}
[[consumers]]
name = "{name}"
stream = "{STREAM}"
handler = "bench"
dead_letter_subject = "bench.dlq.{name}"
concurrency = {concurrency}
max_ack_pending = {max_ack_pending}
"#,
        streams = streams_toml(url),
        concurrency = settings.concurrency,
        max_ack_pending = 2 * settings.concurrency,
    );
    let config = config(&text)?;
    let app = match work {
        Work::Decode => App::new(()).handler("bench", decode_only),
        Work::Io => App::new(()).handler("bench", decode_then_io),
    };
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
    let mut last = (0u64, Instant::now());
    let done = loop {
        let acked = stats.acked.load(Ordering::Relaxed);
        if acked >= count {
            break acked;
        }
        if acked != last.0 {
            last = (acked, Instant::now());
        } else if last.1.elapsed() > STALL_LIMIT {
            stop.cancel();
            bail!("jetworker stalled at {acked} acked: {stats:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu_secs("self")? - cpu_start;

    stop.cancel();
    let stats = running.wait().await;
    let stats = stats
        .get(name)
        .ok_or_else(|| anyhow!("no final stats for consumer {name}"))?;
    let extra = format!(
        "received {} retried {} redelivered {} peak in-flight {}",
        stats.received.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        stats.redelivered.load(Ordering::Relaxed),
        stats.peak_in_flight.load(Ordering::Relaxed),
    );
    Ok(RunResult {
        count: done,
        secs,
        rss_start_kb,
        hwm_kb: 0,
        cpu_secs: cpu_used,
        extra,
    })
}
