//! The application: handlers registered by name, shared state, and the run loop that
//! connects, provisions, runs every consumer and shuts down gracefully.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::batch::{BatchHandler, ErasedBatchHandler, TypedBatchHandler};
use crate::config::Config;
use crate::config::ConsumerConfig;
use crate::connect;
use crate::connect::ConnectError;
use crate::consumer::{self, ConsumerRuntime, ConsumerStats, KeyFn, KeyOf};
use crate::error::Error;
use crate::handler::{Context, ErasedHandler, Event, Handler, TypedHandler};
use crate::ops::{self, Health};
use crate::partition::{self, LeaseGroup};
use crate::provision::{self, Plan, ProvisionError, ProvisionErrorKind, ServerVersion};
use crate::safety_net::{self, MaxDeliveriesAdvisory, SafetyNet};
use crate::shutdown;
use crate::systemd;

/// A worker application: shared state `S` and handlers registered by the names
/// `streams.toml` gives them. A worker binary hands it to `jetworker_cli::main(app)`,
/// which gives it the operator's subcommands; [`App::run`] is the `run` subcommand.
///
/// ```no_run
/// use jetworker::{App, Config, Context, Event, HandlerError};
/// # #[derive(serde::Deserialize)] struct Click { page: String }
/// async fn track_click(click: Event<Click>, _ctx: Context) -> Result<(), HandlerError> {
///     println!("{}", click.page);
///     Ok(())
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let config = Config::load("streams.toml")?;
///     App::new(()).handler("track_click", track_click).run(config).await?;
///     Ok(())
/// }
/// ```
pub struct App<S = ()> {
    state: Arc<S>,
    handlers: HashMap<String, Arc<dyn ErasedHandler<S>>>,
    /// The handlers registered with [`App::batch_handler`] (also in `handlers`, as
    /// handlers of a batch of one).
    batch_handlers: HashMap<String, Arc<dyn ErasedBatchHandler<S>>>,
    /// Key functions of ordered consumers (`ordered_by = { function = "..." }`), by name.
    keys: HashMap<String, KeyFn>,
    metrics: Vec<RegisterMetrics>,
}

/// A function that registers the application's own metrics (see [`App::metrics`]).
type RegisterMetrics = Arc<dyn Fn(&mut prometheus_client::registry::Registry) + Send + Sync>;

// Not derived: cloning shares the state and the handlers, whatever `S` is.
impl<S> Clone for App<S> {
    fn clone(&self) -> Self {
        App {
            state: Arc::clone(&self.state),
            handlers: self.handlers.clone(),
            batch_handlers: self.batch_handlers.clone(),
            keys: self.keys.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Default for App<()> {
    fn default() -> Self {
        App::new(())
    }
}

/// Why the app could not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunErrorKind {
    /// Consumers name handlers that were not registered; see
    /// [`RunError::missing_handlers`].
    MissingHandlers,
    /// Connecting failed in a way retrying cannot fix (refused credentials, bad URL,
    /// TLS); the [`ConnectError`](crate::ConnectError) is the source.
    Connect,
    /// The ops endpoint cannot listen on `worker.ops_listen` (address in use, ...); the
    /// [`OpsError`](crate::OpsError) is the source.
    OpsListen,
    /// The provisioning plan has conflicts; nothing was changed. See [`RunError::plan`].
    Conflicts,
    /// Provisioning failed; the [`ProvisionError`] is the source.
    Provision,
    /// A consumer's settings do not fit its handler: batch keys (`max_batch`,
    /// `max_batch_bytes`, `max_batch_wait`) on a handler that takes one message at a time,
    /// or `ordered_by` on a batch handler; see [`RunError::missing_handlers`] for the lines.
    HandlerMismatch,
}

impl fmt::Display for RunErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunErrorKind::MissingHandlers => "consumers name handlers that are not registered",
            RunErrorKind::Connect => "cannot connect",
            RunErrorKind::OpsListen => "the ops endpoint cannot listen",
            RunErrorKind::Conflicts => "the provisioning plan has conflicts",
            RunErrorKind::Provision => "provisioning failed",
            RunErrorKind::HandlerMismatch => {
                "consumers' settings do not fit their handlers (batch keys on a handler of one message, or ordered_by on a batch handler)"
            }
        })
    }
}

/// Why the app could not run. Around a connection, ops or provisioning error it shows
/// that error's message, which stays reachable as the source.
pub type RunError = Error<RunErrorKind>;

/// The lines of a [`RunErrorKind::MissingHandlers`] error.
#[derive(Debug)]
struct MissingHandlers(Vec<String>);

impl RunError {
    /// One line per consumer whose handler is not registered (or, for
    /// [`RunErrorKind::HandlerMismatch`], does not take batches), naming the file, the
    /// key and what is registered (empty for other kinds).
    pub fn missing_handlers(&self) -> &[String] {
        self.detail::<MissingHandlers>()
            .map(|m| m.0.as_slice())
            .unwrap_or_default()
    }

    /// The plan, when provisioning had conflicts.
    pub fn plan(&self) -> Option<&Plan> {
        self.source_as::<ProvisionError>()?.plan()
    }
}

impl From<ConnectError> for RunError {
    fn from(e: ConnectError) -> Self {
        RunError::wrap(RunErrorKind::Connect, e)
    }
}

impl From<ProvisionError> for RunError {
    fn from(e: ProvisionError) -> Self {
        let kind = match e.kind() {
            ProvisionErrorKind::Conflicts => RunErrorKind::Conflicts,
            ProvisionErrorKind::Request => RunErrorKind::Provision,
        };
        RunError::wrap(kind, e)
    }
}

impl<S: Send + Sync + 'static> App<S> {
    /// An app whose handlers share `state` (use `()` for none).
    pub fn new(state: S) -> Self {
        App {
            state: Arc::new(state),
            handlers: HashMap::new(),
            batch_handlers: HashMap::new(),
            keys: HashMap::new(),
            metrics: Vec::new(),
        }
    }

    /// Registers the application's own metrics in the registry `/metrics` serves, next
    /// to jetworker's (`jetworker_*`, `process_*`). `register` is called once per
    /// [`start`](App::start), before the ops endpoint listens; keep a clone of each
    /// metric to update it from the handlers (prometheus-client's metrics are cheap
    /// `Arc` clones). Give your metrics a prefix of your own: a name jetworker uses
    /// appears twice. Calling it again adds more.
    ///
    /// ```no_run
    /// use jetworker::prometheus_client::metrics::counter::Counter;
    /// use jetworker::{App, Config, Context, Event, HandlerError};
    ///
    /// struct Shop {
    ///     orders: Counter,
    /// }
    ///
    /// async fn place_order(_order: Event<String>, ctx: Context<Shop>) -> Result<(), HandlerError> {
    ///     ctx.state().orders.inc();
    ///     Ok(())
    /// }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let orders = Counter::default();
    /// let app = App::new(Shop { orders: orders.clone() })
    ///     .handler("place_order", place_order)
    ///     .metrics(move |registry| {
    ///         // Served as `shop_orders_total`.
    ///         registry.register("shop_orders", "Orders placed", orders.clone());
    ///     });
    /// app.run(Config::load("streams.toml")?).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn metrics<F>(mut self, register: F) -> Self
    where
        F: Fn(&mut prometheus_client::registry::Registry) + Send + Sync + 'static,
    {
        self.metrics.push(Arc::new(register));
        self
    }

    /// A registry holding the metrics registered with [`App::metrics`].
    fn user_metrics(&self) -> prometheus_client::registry::Registry {
        let mut registry = prometheus_client::registry::Registry::default();
        for register in &self.metrics {
            register(&mut registry);
        }
        registry
    }

    /// Registers `handler` under `name` (the `handler` key of a consumer). Registering a
    /// name twice keeps the last one.
    pub fn handler<T, H>(mut self, name: &str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: DeserializeOwned + Send + 'static,
    {
        self.batch_handlers.remove(name);
        self.handlers
            .insert(name.to_string(), Arc::new(TypedHandler::new(handler)));
        self
    }

    /// Registers a batch handler under `name` (the `handler` key of a consumer): it gets
    /// the consumer's messages in batches of up to `max_batch` messages and
    /// `max_batch_bytes`, waiting up to `max_batch_wait` for one to fill; `concurrency`
    /// counts batches. Each message is still settled on its own (see [`crate::Batch`]).
    /// Registering a name twice keeps the last one.
    ///
    /// ```no_run
    /// use jetworker::{App, Batch, BatchContext, BatchResult, BatchFailures, Config};
    /// # #[derive(serde::Deserialize)] struct Click { page: String }
    /// async fn count_clicks(clicks: Batch<Click>, _ctx: BatchContext) -> BatchResult {
    ///     println!("{} clicks", clicks.len());
    ///     Ok(BatchFailures::new())
    /// }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// App::new(()).batch_handler("count_clicks", count_clicks).run(Config::load("streams.toml")?).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn batch_handler<T, H>(mut self, name: &str, handler: H) -> Self
    where
        H: BatchHandler<T, S>,
        T: DeserializeOwned + Send + 'static,
    {
        let handler = Arc::new(TypedBatchHandler::new(handler));
        self.handlers.insert(name.to_string(), handler.clone());
        self.batch_handlers.insert(name.to_string(), handler);
        self
    }

    /// Registers `key` under `name`, for consumers ordered by a key computed in code
    /// (`ordered_by = { function = "name" }`): messages for which it returns the same key
    /// run one at a time in stream order; `None` means a message has no key and waits
    /// for no other. It runs in the pull loop for every message: keep it cheap.
    /// Registering a name twice keeps the last one.
    ///
    /// ```no_run
    /// use jetworker::{App, Config, Context, Event, HandlerError};
    /// # #[derive(serde::Deserialize)] struct Order { id: u64 }
    /// async fn apply_order(_order: Event<Order>, _ctx: Context) -> Result<(), HandlerError> {
    ///     Ok(())
    /// }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// // In streams.toml: ordered_by = { function = "customer" }
    /// let app = App::new(())
    ///     .handler("apply_order", apply_order)
    ///     .key("customer", |m: &jetworker::async_nats::Message| {
    ///         let customer = m.headers.as_ref()?.get("Customer")?;
    ///         Some(customer.as_str().to_lowercase())
    ///     });
    /// app.run(Config::load("streams.toml")?).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn key<F>(mut self, name: &str, key: F) -> Self
    where
        F: Fn(&async_nats::Message) -> Option<String> + Send + Sync + 'static,
    {
        self.keys.insert(name.to_string(), Arc::new(key));
        self
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<S> {
        &self.state
    }

    /// Names of the registered handlers, sorted.
    pub fn handler_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    /// Checks that every consumer's handler is registered; each problem names the file,
    /// the key and what is registered.
    pub fn check(&self, config: &Config) -> Result<(), RunError> {
        let file = config.source.display();
        let mut missing: Vec<String> = config
            .consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| !self.handlers.contains_key(&c.handler))
            .map(|(i, c)| {
                format!(
                    "{file}: consumers[{i}].handler: no handler named {:?} is registered (registered: {}); register it with App::handler(\"{}\", ...)",
                    c.handler,
                    if self.handlers.is_empty() { "none".to_string() } else { self.handler_names().join(", ") },
                    c.handler
                )
            })
            .collect();
        for (i, c) in config.consumers.iter().enumerate() {
            let function = c.ordered_by.as_ref().and_then(|by| by.function.as_ref());
            if let Some(name) = function.filter(|name| !self.keys.contains_key(*name)) {
                missing.push(format!(
                    "{file}: consumers[{i}].ordered_by.function: no key function named {name:?} is registered; register it with App::key(\"{name}\", ...)"
                ));
            }
        }
        if !missing.is_empty() {
            return Err(RunError::new(RunErrorKind::MissingHandlers)
                .with_message(missing.join("\n"))
                .with_detail(MissingHandlers(missing)));
        }
        // Batch keys on a handler of one message would be silently ignored.
        let mut not_batch: Vec<String> = config
            .consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| !self.batch_handlers.contains_key(&c.handler))
            .flat_map(|(i, c)| {
                let file = &file;
                c.batch_keys_set().into_iter().map(move |key| {
                    format!(
                        "{file}: consumers[{i}].{key}: handler {:?} takes one message at a time; {key} applies to batch handlers: remove it, or register the handler with App::batch_handler(\"{}\", ...)",
                        c.handler, c.handler
                    )
                })
            })
            .collect();
        // An ordered consumer runs one message of a key at a time: a batch would mix keys.
        for (i, c) in config.consumers.iter().enumerate() {
            if c.ordered_by.is_some() && self.batch_handlers.contains_key(&c.handler) {
                not_batch.push(format!(
                    "{file}: consumers[{i}].ordered_by: handler {:?} takes batches; an ordered consumer runs one message of a key at a time: register a handler of one message with App::handler(\"{}\", ...), or remove ordered_by",
                    c.handler, c.handler
                ));
            }
        }
        if not_batch.is_empty() {
            Ok(())
        } else {
            Err(RunError::new(RunErrorKind::HandlerMismatch)
                .with_message(not_batch.join("\n"))
                .with_detail(MissingHandlers(not_batch)))
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully (a second signal exits
    /// at once). Returns when everything has stopped.
    pub async fn run(self, config: Config) -> Result<(), RunError> {
        let stop = CancellationToken::new();
        shutdown::on_signals(stop.clone());
        self.run_until(config, stop).await.map(|_| ())
    }

    /// Runs until `stop` is cancelled, then shuts down gracefully within the config's
    /// grace period. Returns each consumer's counters.
    pub async fn run_until(
        self,
        config: Config,
        stop: CancellationToken,
    ) -> Result<BTreeMap<String, Arc<ConsumerStats>>, RunError> {
        let running = self.start(config, stop).await?;
        Ok(running.wait().await)
    }

    /// Connects, provisions and starts every consumer; returns a handle to watch and
    /// stop them. Connection failures are retried (logged) until `stop`.
    ///
    /// Under systemd (`$NOTIFY_SOCKET` set) the way there is reported with `STATUS=`
    /// lines, `READY=1` is sent once the consumers are started, and `WATCHDOG=1` pings
    /// follow (when `WatchdogSec=` asks for them) while the consumer loops are alive.
    pub async fn start(self, config: Config, stop: CancellationToken) -> Result<Running, RunError> {
        self.check(&config)?;
        // A partitioned consumer runs as one consumer per partition, each pulled under a
        // lease, and so does an ordered consumer without partitions (see `partition`).
        let (config, leases) = partition::expand(&config);
        let hard_stop = CancellationToken::new();
        let grace = config.worker.shutdown_grace;
        let health = Health::new();
        // Background tasks that outlive the consumers (ops endpoint, lag poll, systemd
        // watchdog and status): stopped by `aux_stop` at the very end of `wait`.
        let aux = TaskTracker::new();
        let aux_stop = CancellationToken::new();
        // Whatever way this returns without a running worker (an error, a stop while
        // connecting), the background tasks end with it: the ops port is released.
        let aux_guard = aux_stop.clone().drop_guard();
        // The ops endpoint answers from the start: live while connecting, ready later.
        let ops_address = if config.worker.ops_listen.is_empty() {
            None
        } else {
            Some(
                ops::serve(
                    &config.worker.ops_listen,
                    health.clone(),
                    self.user_metrics(),
                    &aux,
                    aux_stop.clone(),
                )
                .await
                .map_err(|e| RunError::wrap(RunErrorKind::OpsListen, e))?,
            )
        };
        let stopped =
            |health: Arc<Health>| Running::stopped(grace, health, aux.clone(), aux_stop.clone());

        systemd::status(&format!(
            "connecting to NATS ({})",
            connect::redacted_servers(&config.connection)
        ));
        let Some(client) = connect_until(&config, &stop).await? else {
            return Ok(stopped(health));
        };
        health.set_client(client.clone());
        let js = connect::jetstream(client.clone(), &config.connection);
        let version = ServerVersion::parse(&client.server_info().version).unwrap_or_default();

        // Provision: a conflict is fatal; an unavailable JetStream is retried.
        systemd::status("provisioning streams and consumers");
        let mut retry = Backoff::new(PROVISION_RETRY_FIRST, PROVISION_RETRY_MAX);
        loop {
            match provision::provision(&client, &js, &config, false).await {
                Ok(plan) => {
                    if plan.has_changes() {
                        tracing::info!(plan = %plan, "provisioned");
                    }
                    health.set_provisioned();
                    break;
                }
                Err(e) if e.kind() == ProvisionErrorKind::Conflicts => {
                    systemd::status(
                        "provisioning has conflicts: nothing was changed and no worker started",
                    );
                    return Err(e.into());
                }
                Err(e) => {
                    let wait = retry.next();
                    tracing::warn!(error = %e, retry_in = %humantime::format_duration(wait), "provisioning failed; retrying");
                    systemd::status(&format!(
                        "provisioning failed (retrying in {}): {e}",
                        humantime::format_duration(wait)
                    ));
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(stopped(health)),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }

        let tracker = TaskTracker::new();
        let mut stats = BTreeMap::new();
        let mut lag = Vec::new();
        // The user's consumers, then the safety net's internal ones (one per consumer).
        let mut consumers: Vec<(ConsumerConfig, Arc<dyn ErasedHandler<S>>)> = config
            .consumers
            .iter()
            .filter_map(|c| Some((c.clone(), self.handlers.get(&c.handler)?.clone())))
            .collect();
        let guards = crate::dead_letter::DeadLetterGuards::for_config(&config);
        let net = SafetyNet::new(&config, &guards);
        for net_consumer in safety_net::safety_net_consumers(&config) {
            consumers.push((net_consumer, safety_net_handler::<S>(net.clone())));
        }
        let replica = LeaseGroup::replica_id();
        let mut lease_groups: HashMap<String, Arc<LeaseGroup>> = HashMap::new();
        for (c, handler) in &consumers {
            let consumer_stats = Arc::new(ConsumerStats::default());
            stats.insert(c.name.clone(), consumer_stats.clone());
            health.add_consumer(&c.name, consumer_stats.clone());
            lag.push((c.stream.clone(), c.name.clone(), consumer_stats.clone()));
            if let Some(guard) = guards.get(&c.name) {
                let _ = consumer_stats.dead_letter_guard.set(guard);
            }
            let rt = Arc::new(ConsumerRuntime {
                config: c.clone(),
                spec: provision::consumer_spec(c),
                policy: c.retry_schedule(),
                handler: handler.clone(),
                batch: self.batch_handlers.get(&c.handler).cloned(),
                state: self.state.clone(),
                client: client.clone(),
                js: Arc::new(js.clone()),
                server_version: version,
                request_timeout: config.connection.request_timeout,
                stats: consumer_stats,
                stop: stop.clone(),
                hard_stop: hard_stop.clone(),
                ordered_by: c
                    .ordered_by
                    .as_ref()
                    .and_then(|by| KeyOf::from_config(by, &self.keys)),
                replies: Default::default(),
            });
            match leases.get(&(c.stream.clone(), c.name.clone())) {
                Some(of) => {
                    let group = lease_groups.entry(of.bucket.clone()).or_insert_with(|| {
                        let group = Arc::new(LeaseGroup::new(js.clone(), of, &replica));
                        tracker.spawn(group.clone().keep_membership(stop.clone()));
                        group
                    });
                    tracker.spawn(partition::run_partition(rt, of.clone(), group.clone()));
                }
                None => {
                    tracker.spawn(consumer::run(rt));
                }
            }
        }
        tracker.close();
        aux.spawn(ops::poll_lag(js.clone(), lag, aux_stop.clone()));
        guards.watch(&js, &aux, &aux_stop);
        tracing::info!(
            consumers = config.consumers.len(),
            server_version = %version,
            "workers running"
        );
        let running_text = format!(
            "running {} consumer{} on NATS {version}",
            config.consumers.len(),
            if config.consumers.len() == 1 { "" } else { "s" }
        );
        notify_systemd(&health, &aux, &stop, &aux_stop, &running_text);
        aux_guard.disarm();
        Ok(Running {
            client: Some(client),
            tracker,
            stop,
            hard_stop,
            grace,
            stats,
            health,
            aux,
            aux_stop,
            ops_address,
        })
    }
}

/// Tells systemd (when the process runs under it) that the worker is ready, then keeps
/// it informed: a `STATUS=` line whenever readiness changes (disconnected, a consumer
/// not pulling, ready again) until `stop`, and `WATCHDOG=1` pings while the consumer
/// loops are alive, until `aux_stop`. The pings go on through the graceful shutdown
/// (the loops have ended by then; `TimeoutStopSec=` bounds that phase, not the
/// watchdog), so a long `shutdown_grace` is never cut short by `WatchdogSec=`.
fn notify_systemd(
    health: &Arc<Health>,
    aux: &TaskTracker,
    stop: &CancellationToken,
    aux_stop: &CancellationToken,
    running_text: &str,
) {
    if systemd::Notifier::from_env().is_none() {
        return;
    }
    systemd::ready(running_text);
    if let Some(watchdog) = systemd::Watchdog::from_env() {
        tracing::debug!(period = %humantime::format_duration(watchdog.period()), "systemd watchdog enabled");
        let health = health.clone();
        aux.spawn(watchdog.run(aux_stop.clone(), move || health.live().is_ok()));
    }
    let (health, stop, running_text) = (health.clone(), stop.clone(), running_text.to_string());
    aux.spawn(async move {
        // Why it was not ready at the last check (`None`: ready).
        let mut last: Option<String> = None;
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + STATUS_PERIOD, STATUS_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = health.ready().err().map(|why| why.to_string());
            if now != last {
                match &now {
                    None => systemd::status(&running_text),
                    Some(why) => systemd::status(&format!("not ready: {why}")),
                };
                last = now;
            }
        }
    });
}

/// How often readiness is checked for systemd's `STATUS=` line.
const STATUS_PERIOD: Duration = Duration::from_secs(1);

/// The safety net as a handler of the app's state type (it ignores the state).
fn safety_net_handler<S: Send + Sync + 'static>(net: SafetyNet) -> Arc<dyn ErasedHandler<S>> {
    let handler = move |advisory: Event<MaxDeliveriesAdvisory>, ctx: Context<S>| {
        let net = net.clone();
        async move {
            let js = ctx.jetstream().ok_or("no JetStream context")?.clone();
            net.handle(&js, advisory.into_inner()).await
        }
    };
    Arc::new(TypedHandler::new(handler))
}

/// A started app.
pub struct Running {
    client: Option<async_nats::Client>,
    tracker: TaskTracker,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    grace: Duration,
    stats: BTreeMap<String, Arc<ConsumerStats>>,
    health: Arc<Health>,
    /// The ops endpoint, lag poll and systemd tasks.
    aux: TaskTracker,
    aux_stop: CancellationToken,
    ops_address: Option<std::net::SocketAddr>,
}

impl Running {
    fn stopped(
        grace: Duration,
        health: Arc<Health>,
        aux: TaskTracker,
        aux_stop: CancellationToken,
    ) -> Running {
        let tracker = TaskTracker::new();
        tracker.close();
        let stop = CancellationToken::new();
        stop.cancel();
        Running {
            client: None,
            tracker,
            stop,
            hard_stop: CancellationToken::new(),
            grace,
            stats: BTreeMap::new(),
            health,
            aux,
            aux_stop,
            ops_address: None,
        }
    }

    /// What `/healthz`, `/readyz` and `/metrics` report on.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The ops endpoint's bound address, when enabled.
    pub fn ops_address(&self) -> Option<std::net::SocketAddr> {
        self.ops_address
    }

    /// Counters per consumer name.
    pub fn stats(&self) -> &BTreeMap<String, Arc<ConsumerStats>> {
        &self.stats
    }

    /// The client, when connected.
    pub fn client(&self) -> Option<&async_nats::Client> {
        self.client.as_ref()
    }

    /// Waits for the stop signal, then for in-flight handlers up to the grace period;
    /// past it, what still runs is handed back to the server. Flushes acks and drains
    /// the connection. Under systemd, `STOPPING=1` goes out as soon as the signal arrives.
    pub async fn wait(self) -> BTreeMap<String, Arc<ConsumerStats>> {
        self.stop.cancelled().await;
        self.health.set_stopping();
        systemd::stopping();
        tracing::info!(grace = %humantime::format_duration(self.grace), "shutting down: no new messages; waiting for in-flight handlers");
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over: handing unfinished messages back");
            systemd::status("shutting down: grace period over, handing unfinished messages back");
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        if let Some(client) = &self.client {
            systemd::status("shutting down: flushing acks and draining the connection");
            let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
        }
        self.aux_stop.cancel();
        self.aux.close();
        // Each background task ends at once on `aux_stop`; the bound is a safety net.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.aux.wait()).await;
        tracing::info!("stopped");
        self.stats
    }
}

/// The first wait before connecting again after a failure.
const CONNECT_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between connection attempts.
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(10);
/// The first wait before provisioning again when JetStream is unavailable.
const PROVISION_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between provisioning attempts.
const PROVISION_RETRY_MAX: Duration = Duration::from_secs(5);

/// Connects, retrying with a jittered backoff (each failure logged) until connected or
/// `stop`. A permanent failure (refused credentials, bad URL, TLS) is returned at once.
async fn connect_until(
    config: &Config,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, ConnectError> {
    let mut retry = Backoff::new(CONNECT_RETRY_FIRST, CONNECT_RETRY_MAX);
    loop {
        let attempt = async {
            let opts = connect::options(&config.connection).await?;
            let opts = opts.max_reconnects(None);
            connect::connect_with(&config.connection, opts).await
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = attempt => r,
        };
        match result {
            Ok(client) => return Ok(Some(client)),
            Err(e) if e.kind().is_permanent() => return Err(e),
            Err(e) => {
                let wait = retry.next();
                tracing::error!(error = %e, retry_in = %humantime::format_duration(wait), "cannot connect");
                systemd::status(&format!(
                    "{e}; retrying in {}",
                    humantime::format_duration(wait)
                ));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{OpsError, OpsErrorKind};

    /// A taken ops port is an error of its own kind, with the I/O error at the end of
    /// the chain: what a caller that falls back to another port decides on.
    #[tokio::test]
    async fn a_taken_ops_port_is_an_ops_listen_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let mut config = Config::default();
        config.worker.ops_listen = taken.local_addr().expect("address").to_string();
        let err = match App::new(()).start(config, CancellationToken::new()).await {
            Ok(_) => panic!("the port is taken"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), RunErrorKind::OpsListen, "{err}");
        let ops = err.source_as::<OpsError>().expect("the ops error");
        assert_eq!(ops.kind(), OpsErrorKind::Listen);
        let io = std::error::Error::source(ops)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .expect("the I/O error");
        assert_eq!(io.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("worker.ops_listen"), "{err}");
    }

    #[test]
    fn missing_handlers_are_listed() {
        let config = Config {
            consumers: vec![ConsumerConfig {
                handler: "nobody".into(),
                ..ConsumerConfig::default()
            }],
            ..Config::default()
        };
        let err = App::new(()).check(&config).expect_err("not registered");
        assert_eq!(err.kind(), RunErrorKind::MissingHandlers);
        assert_eq!(err.missing_handlers().len(), 1);
        assert!(err.missing_handlers()[0].contains("consumers[0].handler"));
        assert_eq!(err.to_string(), err.missing_handlers()[0]);
    }

    #[test]
    fn batch_keys_need_a_batch_handler() {
        async fn one(_e: Event<u32>, _ctx: Context) -> Result<(), crate::HandlerError> {
            Ok(())
        }
        async fn many(_b: crate::Batch<u32>, _ctx: crate::BatchContext) -> crate::BatchResult {
            Ok(crate::BatchFailures::new())
        }
        let config = Config {
            consumers: vec![ConsumerConfig {
                handler: "one".into(),
                max_batch: Some(10),
                ..ConsumerConfig::default()
            }],
            ..Config::default()
        };
        let err = App::new(())
            .handler("one", one)
            .check(&config)
            .expect_err("batch key on a single handler");
        assert_eq!(err.kind(), RunErrorKind::HandlerMismatch);
        assert!(
            err.missing_handlers()[0].contains("consumers[0].max_batch"),
            "{err}"
        );
        App::new(())
            .batch_handler("one", many)
            .check(&config)
            .expect("a batch handler takes batch keys");
        // Registered again as a single handler: the batch one is replaced.
        let replaced = App::new(()).batch_handler("one", many).handler("one", one);
        assert!(replaced.check(&config).is_err());
    }
}
