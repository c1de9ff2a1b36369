//! The ops HTTP endpoint: `/healthz`, `/readyz` and `/metrics` (Prometheus text format),
//! on `worker.ops_listen`.
//!
//! - `/healthz`: 200 while the process and its consumer loops are alive (each loop
//!   reports in at least every few seconds; one silent for [`LOOP_STALL`] means stuck;
//!   during a graceful shutdown the loops end on purpose and `/healthz` stays 200).
//! - `/readyz`: 200 when connected, provisioned, every consumer pulling, and not shutting
//!   down; 503 otherwise, with the reason in the body.
//! - `/metrics`: per consumer, messages by outcome, dead letters by reason, redeliveries,
//!   handler duration histogram, in-flight, server-side pending and ack pending (lag).

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
            if !stats.is_pulling() {
                return Err(HealthError::new(HealthErrorKind::NotPulling)
                    .with_message(format!("consumer {name} is not pulling")));
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
            "jetworker_consumer_recreated",
            "Times a deleted consumer was recreated from the config",
            &per(&|s| s.recreated.load(Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "jetworker_in_flight",
            "Handlers running now",
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
        Ok(())
    }
}

/// Renders the metrics in the Prometheus text format.
pub fn render_metrics(health: &Arc<Health>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector(health.clone())));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&health),
    )
}

/// Binds `listen` and serves the ops endpoint on a task of `tasks` until `shutdown`.
/// Fails at once when the address cannot be bound, naming it.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
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
        .with_state(health);
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
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LAG_POLL) => {}
        }
    }
}
