//! The ops HTTP endpoint: `/healthz`, `/readyz` and `/metrics` (Prometheus text format),
//! on `worker.ops_listen`.
//!
//! - `/healthz`: 200 while the process and its consumer loops are alive (each loop
//!   reports in at least every few seconds; one silent for [`LOOP_STALL`] means stuck;
//!   during a graceful shutdown the loops end on purpose and `/healthz` stays 200).
//! - `/readyz`: 200 when connected, provisioned, every consumer pulling, its dead letters
//!   being stored, and not shutting down; 503 otherwise, with the reason in the body.
//!   Dead letters that cannot be stored (a publish refused, no PubAck, no permission)
//!   make it 503 `dead letters cannot be stored` while an original is held waiting for
//!   its copy, and for [`DEAD_LETTER_TROUBLE`] after a failed copy unless one is stored
//!   since (by the consumer or its safety net); the body names the consumer and the
//!   error.
//!   An original is held on its last delivery (with progress acks, in its handler slot)
//!   for one ack wait, within 5 s to 60 s (at most half the consumer's handler slots
//!   hold one; beyond that, no hold), then handed to the safety net with a nak: the
//!   server's max-deliveries advisory takes it to the safety net, which retries the copy
//!   without holding the consumer's slots (the original stays in its stream meanwhile).
//!   `/healthz` stays 200: a restart would not help.
//!   A dead-letter stream that, as the server has it now, would drop copies (edited to
//!   interest retention with no consumer, discard new with limits, a max_msg_size too
//!   small for the originals, the subject no longer captured, the stream deleted: read
//!   at start, every 30 s and after each dead letter's PubAck, see
//!   [`StreamGuard`](crate::dead_letter::StreamGuard)) makes it 503 `the dead-letter
//!   stream would drop copies` with the consumer and the reason, until it is fixed; no
//!   original is termed meanwhile.
//! - `/metrics`: per consumer, messages by outcome, dead letters by reason, failed
//!   dead-letter publishes, originals held waiting for a copy (a gauge) and those handed
//!   to the safety net, whether the dead-letter stream would drop copies
//!   (`jetworker_dead_letter_stream_unfit`, 0 or 1), redeliveries, handler duration histogram, attempts per settled
//!   message (`jetworker_attempts`, by outcome), in-flight, server-side pending and ack pending (lag);
//!   the process (`process_*`, read from `/proc/self` on Linux) and
//!   `jetworker_build_info{version}`; and whatever the application registered with
//!   [`App::metrics`](crate::App::metrics), in the same registry.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::ConsumerStats;
use crate::error::Error;
use crate::outcome::Reason;

/// A consumer loop silent for this long makes `/healthz` fail.
pub const LOOP_STALL: Duration = Duration::from_secs(90);
/// A failed dead-letter copy keeps `/readyz` at 503 for this long unless a copy is
/// stored meanwhile (and for as long as an original is held waiting for one).
pub const DEAD_LETTER_TROUBLE: Duration = Duration::from_secs(60);
/// How often consumer lag is read from the server.
pub const LAG_POLL: Duration = Duration::from_secs(5);

/// Why the worker is not live or not ready; the body of a 503 from `/healthz` or
/// `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthErrorKind {
    /// A consumer loop has not reported in for longer than `LOOP_STALL` (90s; not live).
    LoopStalled,
    /// Shutdown began (not ready).
    ShuttingDown,
    /// No connection yet (not ready).
    NotConnected,
    /// The connection is down; the client is reconnecting (not ready).
    Disconnected,
    /// Provisioning has not succeeded yet (not ready).
    NotProvisioned,
    /// A consumer is not pulling (not ready).
    NotPulling,
    /// A consumer's dead-letter copies cannot be stored (not ready): an original is held
    /// waiting for its copy, or a copy failed within the last minute and none was
    /// stored since. The message names the consumer and the last error.
    DeadLettersFailing,
    /// A consumer's dead-letter stream, as the server has it now, would drop copies (not
    /// ready): the message names the consumer and why.
    DeadLetterStreamUnfit,
}

impl fmt::Display for HealthErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthErrorKind::LoopStalled => "a consumer loop is silent",
            HealthErrorKind::ShuttingDown => "shutting down",
            HealthErrorKind::NotConnected => "not connected yet",
            HealthErrorKind::Disconnected => "disconnected from NATS",
            HealthErrorKind::NotProvisioned => "not provisioned yet",
            HealthErrorKind::NotPulling => "a consumer is not pulling",
            HealthErrorKind::DeadLettersFailing => "dead letters cannot be stored",
            HealthErrorKind::DeadLetterStreamUnfit => "the dead-letter stream would drop copies",
        })
    }
}

/// Why the worker is not live or not ready; the message names the consumer when one is
/// the cause.
pub type HealthError = Error<HealthErrorKind>;

/// Why the ops endpoint could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsErrorKind {
    /// `worker.ops_listen` is not a socket address.
    Address,
    /// The address cannot be listened on (in use, not this host's, not allowed); the
    /// I/O error is the source.
    Listen,
}

impl fmt::Display for OpsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpsErrorKind::Address => "worker.ops_listen: not an address",
            OpsErrorKind::Listen => "worker.ops_listen: cannot listen",
        })
    }
}

/// The ops endpoint could not start; the message names the address.
pub type OpsError = Error<OpsErrorKind>;

/// What the ops endpoint reports on; shared with the run loop.
#[derive(Debug, Default)]
pub struct Health {
    client: OnceLock<async_nats::Client>,
    provisioned: AtomicBool,
    stopping: AtomicBool,
    consumers: RwLock<BTreeMap<String, Arc<ConsumerStats>>>,
}

impl Health {
    /// A fresh, not yet ready, state.
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// Records the connected client (readiness follows its connection state).
    pub fn set_client(&self, client: async_nats::Client) {
        let _ = self.client.set(client);
    }

    /// Records that provisioning succeeded.
    pub fn set_provisioned(&self) {
        self.provisioned.store(true, Ordering::SeqCst);
    }

    /// Records that shutdown began.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// True once shutdown began.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Registers a running consumer's counters.
    pub fn add_consumer(&self, name: &str, stats: Arc<ConsumerStats>) {
        if let Ok(mut map) = self.consumers.write() {
            map.insert(name.to_string(), stats);
        }
    }

    /// Every consumer's counters.
    pub fn consumers(&self) -> BTreeMap<String, Arc<ConsumerStats>> {
        self.consumers.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Live: every consumer loop reported in recently. Once shutdown began the loops
    /// end on purpose, so silence is no longer a sign of a stuck worker (the shutdown
    /// itself is bounded by the grace period).
    pub fn live(&self) -> Result<(), HealthError> {
        if self.is_stopping() {
            return Ok(());
        }
        for (name, stats) in self.consumers() {
            let silent = stats.since_last_tick();
            if silent > LOOP_STALL {
                return Err(
                    HealthError::new(HealthErrorKind::LoopStalled).with_message(format!(
                        "consumer {name}: loop silent for {}",
                        humantime::format_duration(Duration::from_secs(silent.as_secs()))
                    )),
                );
            }
        }
        Ok(())
    }

    /// Ready: connected, provisioned, consumers pulling, not stopping.
    pub fn ready(&self) -> Result<(), HealthError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(HealthErrorKind::ShuttingDown.into());
        }
        match self.client.get() {
            None => return Err(HealthErrorKind::NotConnected.into()),
            Some(c) if c.connection_state() != async_nats::connection::State::Connected => {
                return Err(HealthErrorKind::Disconnected.into())
            }
            Some(_) => {}
        }
        if !self.provisioned.load(Ordering::SeqCst) {
            return Err(HealthErrorKind::NotProvisioned.into());
        }
        for (name, stats) in self.consumers() {
            if !stats.is_pulling() && !stats.is_standby() {
                return Err(HealthError::new(HealthErrorKind::NotPulling)
                    .with_message(format!("consumer {name} is not pulling")));
            }
        }
        // Named by the configured consumer (its safety-net durable shares the guard).
        for stats in self.consumers().values() {
            let Some(guard) = stats.dead_letter_guard.get() else {
                continue;
            };
            if let Some(problem) = guard.problem() {
                return Err(
                    HealthError::new(HealthErrorKind::DeadLetterStreamUnfit).with_message(format!(
                        "consumer {}: the dead-letter stream would drop copies: {problem}",
                        guard.consumer()
                    )),
                );
            }
        }
        for (name, stats) in self.consumers() {
            if let Some(trouble) = stats.dead_letter_trouble(DEAD_LETTER_TROUBLE) {
                return Err(HealthError::new(HealthErrorKind::DeadLettersFailing)
                    .with_message(format!("consumer {name}: {trouble}")));
            }
        }
        Ok(())
    }

    fn connected(&self) -> bool {
        self.client
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
}

/// Exposes the consumers' counters in Prometheus form at scrape time.
#[derive(Debug)]
struct StatsCollector(Arc<Health>);

type Labels = Vec<(&'static str, String)>;

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        if labels.is_empty() {
            // A process-wide gauge: no label set at all (not `{}`).
            return ConstGauge::new(*value).encode(metric);
        }
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let consumers = self.0.consumers();
        let c = |name: &str| vec![("consumer", name.to_string())];
        let mut outcomes = Vec::new();
        let mut reasons = Vec::new();
        for (name, s) in &consumers {
            for (outcome, value) in [
                ("ack", s.acked.load(Relaxed)),
                ("retry", s.retried.load(Relaxed)),
                (
                    "dead_letter",
                    Reason::ALL.iter().map(|r| s.dead_letters(*r)).sum(),
                ),
                ("released", s.released.load(Relaxed)),
            ] {
                let mut labels = c(name);
                labels.push(("outcome", outcome.to_string()));
                outcomes.push((labels, value));
            }
            for reason in Reason::ALL {
                let mut labels = c(name);
                labels.push(("reason", reason.as_str().to_string()));
                reasons.push((labels, s.dead_letters(reason)));
            }
        }
        let per = |f: &dyn Fn(&ConsumerStats) -> u64| -> Vec<(Labels, u64)> {
            consumers.iter().map(|(n, s)| (c(n), f(s))).collect()
        };
        let per_gauge = |f: &dyn Fn(&ConsumerStats) -> i64| -> Vec<(Labels, i64)> {
            consumers.iter().map(|(n, s)| (c(n), f(s))).collect()
        };
        counter(
            &mut encoder,
            "jetworker_messages",
            "Deliveries settled, by consumer and outcome",
            &outcomes,
        )?;
        counter(
            &mut encoder,
            "jetworker_dead_letters",
            "Messages dead-lettered, by consumer and reason",
            &reasons,
        )?;
        counter(
            &mut encoder,
            "jetworker_redeliveries",
            "Deliveries received with attempt > 1",
            &per(&|s| s.redelivered.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "jetworker_handler_panics",
            "Handler panics caught",
            &per(&|s| s.panics.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "jetworker_handler_timeouts",
            "Handler runs cancelled by the handler timeout",
            &per(&|s| s.timeouts.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "jetworker_dead_letter_publish_failures",
            "Dead-letter publishes that failed (original kept)",
            &per(&|s| s.dead_letter_failures.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "jetworker_dead_letters_handed_to_safety_net",
            "Last deliveries whose copy could not be stored within the hold limit, handed to the safety net",
            &per(&|s| s.dead_letters_handed_over.load(Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_dead_letters_held",
            "Originals held now on their last delivery while their dead-letter copy is retried",
            &per_gauge(&|s| i64::try_from(s.dead_letters_held.load(Relaxed)).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_dead_letter_stream_unfit",
            "1 while the consumer's dead-letter stream, as the server has it, would drop copies (no original is termed meanwhile)",
            &per_gauge(&|s| {
                i64::from(
                    s.dead_letter_guard
                        .get()
                        .is_some_and(|g| g.problem().is_some()),
                )
            }),
        )?;
        counter(
            &mut encoder,
            "jetworker_settle_failures",
            "Acks, naks, terms and progress acks that could not be sent (redelivered after the ack wait)",
            &per(&|s| s.settle_failures.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "jetworker_consumer_recreated",
            "Times a deleted consumer was recreated from the config",
            &per(&|s| s.recreated.load(Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_in_flight",
            "Deliveries received and not yet settled (running handlers, and dead letters being stored)",
            &per_gauge(&|s| i64::try_from(s.in_flight.load(Relaxed)).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_consumer_pending",
            "Messages not yet delivered to the consumer (server-side lag)",
            &per_gauge(&|s| i64::try_from(s.server_pending.load(Relaxed)).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_consumer_ack_pending",
            "Messages delivered and not yet acknowledged (server-side)",
            &per_gauge(&|s| i64::try_from(s.server_ack_pending.load(Relaxed)).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_consumer_standby",
            "1 while another replica holds this consumer's lease and this one stands by",
            &per_gauge(&|s| i64::from(s.is_standby())),
        )?;
        gauge(
            &mut encoder,
            "jetworker_connected",
            "1 while connected to NATS",
            &[(vec![], i64::from(self.0.connected()))],
        )?;
        gauge(
            &mut encoder,
            "jetworker_ready",
            "1 while /readyz is OK",
            &[(vec![], i64::from(self.0.ready().is_ok()))],
        )?;
        let mut histogram = encoder.encode_descriptor(
            "jetworker_handler_duration_seconds",
            "Handler run time (decode included)",
            None,
            MetricType::Histogram,
        )?;
        for (name, s) in &consumers {
            s.handler_seconds
                .encode(histogram.encode_family(&c(name))?)?;
        }
        let mut attempts = encoder.encode_descriptor(
            "jetworker_attempts",
            "Deliveries a message took to settle for good, by consumer and outcome (ack, dead_letter)",
            None,
            MetricType::Histogram,
        )?;
        for (name, s) in &consumers {
            for (outcome, histogram) in [
                ("ack", &s.attempts_acked),
                ("dead_letter", &s.attempts_dead_lettered),
            ] {
                let mut labels = c(name);
                labels.push(("outcome", outcome.to_string()));
                histogram.encode(attempts.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The process's own metrics, read from `/proc/self` at scrape time, named as every
/// Prometheus client library names them (so the usual dashboards and alerts work). Where
/// `/proc` is missing (not Linux) the series are left out.
#[derive(Debug)]
struct ProcessCollector;

/// The unit of the times in `/proc/<pid>/stat`: `USER_HZ`, 100 on every Linux
/// architecture (`sysconf(_SC_CLK_TCK)`; Prometheus' Go `procfs` assumes the same).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessSample {
    /// User plus system CPU time, in seconds.
    cpu_seconds: f64,
    /// Resident set size, in bytes.
    resident_bytes: f64,
    /// Open file descriptors.
    open_fds: f64,
    /// Start time, in seconds since the Unix epoch.
    start_time_seconds: f64,
}

impl ProcessSample {
    /// Reads `/proc/self/stat`, `/proc/self/status`, `/proc/self/fd` and `/proc/stat`.
    fn read() -> Option<ProcessSample> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let system = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        ProcessSample::parse(&stat, &status, &system, open_fds)
    }

    /// The pure part of [`ProcessSample::read`]: `stat` is `/proc/self/stat`, `status`
    /// `/proc/self/status`, `system` `/proc/stat` (for the boot time).
    fn parse(stat: &str, status: &str, system: &str, open_fds: usize) -> Option<ProcessSample> {
        // The command name (field 2) is in parentheses and may hold spaces: the fields
        // that follow are counted from its closing parenthesis (field 3 is the state).
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
        let resident_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let boot_time: f64 = system
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(ProcessSample {
            cpu_seconds: (utime + stime) / USER_HZ,
            resident_bytes: resident_kib * 1024.0,
            open_fds: open_fds as f64,
            start_time_seconds: boot_time + start_ticks / USER_HZ,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sample) = ProcessSample::read() else {
            return Ok(());
        };
        let cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(sample.cpu_seconds).encode(cpu)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                sample.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                sample.open_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                sample.start_time_seconds,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }
}

/// `jetworker_build_info{version}`, always 1: which jetworker a worker runs, for
/// dashboards and for spotting replicas left behind by a rollout.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut info = encoder.encode_descriptor(
            "jetworker_build_info",
            "Always 1; the jetworker version this worker was built with",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1).encode(info.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)
    }
}

/// The registry `/metrics` serves: `registry` (the application's metrics, possibly
/// none) with jetworker's own, the process's and the build info added.
pub fn metrics_registry(health: &Arc<Health>, mut registry: Registry) -> Registry {
    registry.register_collector(Box::new(StatsCollector(health.clone())));
    registry.register_collector(Box::new(ProcessCollector));
    registry.register_collector(Box::new(BuildInfo));
    registry
}

/// Renders a registry in the Prometheus text format (empty if a metric fails to encode).
pub fn render_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// What the ops endpoint's handlers read.
#[derive(Clone)]
struct OpsState {
    health: Arc<Health>,
    registry: Arc<Registry>,
}

async fn healthz(State(OpsState { health, .. }): State<OpsState>) -> impl IntoResponse {
    match health.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(OpsState { health, .. }): State<OpsState>) -> impl IntoResponse {
    match health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(OpsState { registry, .. }): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&registry),
    )
}

/// Binds `listen` and serves the ops endpoint on a task of `tasks` until `shutdown`;
/// `/metrics` serves `registry` (see [`metrics_registry`]). Fails at once when the
/// address cannot be bound, naming it.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
    registry: Registry,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SocketAddr, OpsError> {
    let addr: SocketAddr = listen.parse().map_err(|e| {
        OpsError::with_source(OpsErrorKind::Address, e)
            .with_message(format!("worker.ops_listen: not an address: {listen:?}"))
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        OpsError::with_source(OpsErrorKind::Listen, e)
            .with_message(format!("worker.ops_listen: cannot listen on {addr}"))
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            registry: Arc::new(metrics_registry(&health, registry)),
            health,
        });
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "ops endpoint failed");
        }
    });
    tracing::info!(address = %bound, "ops endpoint listening (/healthz /readyz /metrics)");
    Ok(bound)
}

/// Reads each consumer's server-side pending and ack pending every [`LAG_POLL`] until
/// `stop`, for `/metrics` (lag) and autoscaling.
pub async fn poll_lag(
    js: async_nats::jetstream::Context,
    consumers: Vec<(String, String, Arc<ConsumerStats>)>,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        for (stream, name, stats) in &consumers {
            let info = async {
                let s = js.get_stream(stream).await.ok()?;
                s.consumer_info(name).await.ok()
            };
            if let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(5), info).await {
                stats.server_pending.store(info.num_pending, Relaxed);
                stats
                    .server_ack_pending
                    .store(u64::try_from(info.num_ack_pending).unwrap_or(0), Relaxed);
                stats.note_ack_floor(info.ack_floor.stream_sequence);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LAG_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_sample_reads_proc_files() {
        // A command name with spaces and parentheses, as the kernel writes it.
        let stat = "4242 (my (odd) worker) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 50 0 0 20 0 9 0 1234 1000000 512 18446744073709551615";
        let status = "Name:\tworker\nVmPeak:\t 9000 kB\nVmRSS:\t    2048 kB\nThreads:\t9\n";
        let system = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let sample = ProcessSample::parse(stat, status, system, 7).expect("parses");
        assert_eq!(sample.cpu_seconds, 3.0);
        assert_eq!(sample.resident_bytes, 2048.0 * 1024.0);
        assert_eq!(sample.open_fds, 7.0);
        assert!((sample.start_time_seconds - 1_700_000_012.34).abs() < 1e-3);
        assert_eq!(ProcessSample::parse("garbage", status, system, 1), None);
    }

    #[test]
    fn metrics_include_the_process_build_info_and_the_users_own() {
        let mut registry = Registry::default();
        let orders = prometheus_client::metrics::counter::Counter::<u64>::default();
        orders.inc_by(3);
        registry.register("shop_orders", "Orders placed", orders);
        let text = render_metrics(&metrics_registry(&Health::new(), registry));
        for series in [
            "shop_orders_total 3",
            "jetworker_connected 0",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(series), "{series} missing in:\n{text}");
        }
        let build = format!(
            "jetworker_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{build} missing in:\n{text}");
    }

    #[test]
    fn attempts_are_a_histogram_per_consumer_and_outcome() {
        let health = Health::new();
        let stats = Arc::new(ConsumerStats::default());
        stats.observe_attempts(true, 1);
        stats.observe_attempts(true, 3);
        stats.observe_attempts(false, 5);
        health.add_consumer("jobs", stats);
        let text = render_metrics(&metrics_registry(&health, Registry::default()));
        for series in [
            "# TYPE jetworker_attempts histogram",
            "jetworker_attempts_count{consumer=\"jobs\",outcome=\"ack\"} 2",
            "jetworker_attempts_sum{consumer=\"jobs\",outcome=\"ack\"} 4.0",
            "jetworker_attempts_bucket{le=\"2.0\",consumer=\"jobs\",outcome=\"ack\"} 1",
            "jetworker_attempts_bucket{le=\"3.0\",consumer=\"jobs\",outcome=\"ack\"} 2",
            "jetworker_attempts_count{consumer=\"jobs\",outcome=\"dead_letter\"} 1",
            "jetworker_attempts_bucket{le=\"4.0\",consumer=\"jobs\",outcome=\"dead_letter\"} 0",
            "jetworker_attempts_bucket{le=\"5.0\",consumer=\"jobs\",outcome=\"dead_letter\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing in:\n{text}");
        }
    }
}
