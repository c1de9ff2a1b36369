//! The `workers` command line: jetworker's built-in subcommands (`run`, `check`,
//! `provision`, `status`, `dlq`, `permissions`) plus the platform's own `publish`, `stats`,
//! `dashboard` and `demo`, added through [`jetworker_cli::Cli`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use clap::{Args, Subcommand};
use jetworker::{App, Config, ConsumerStats, Publisher, RunError, RunErrorKind, Running};
use jetworker_cli::{
    Cli, GlobalArgs, Invocation, EXIT_CONFLICT, EXIT_FAILURE, EXIT_INVALID_CONFIG,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aggregates;
use crate::dashboard::{self, DashboardErrorKind, DashboardOptions};
use crate::generator::{Traffic, TrafficConfig};
use crate::handlers::{self, Analytics, BUCKET};
use crate::local_server::{self, Address, LocalServer, Probe};
use crate::publish::{self, now_ms, PublishPlan};
use crate::report::{self, ReportOptions};

/// The analytics platform's command line: jetworker's built-in subcommands (`run`,
/// `check`, `provision`, `status`, `dlq`, `permissions`) and the platform's own.
pub fn cli() -> Cli<Analytics, Cmd> {
    Cli::new(handlers::app(Analytics::new()))
        .name("workers")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Real-time analytics workers on NATS JetStream")
        .commands(run)
        .init_logging(|format, own| match own {
            Some(Cmd::Demo(_)) => init_demo_logging(format),
            _ => jetworker_cli::init_logging(format),
        })
}

/// The platform's own subcommands, next to jetworker's.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Publish synthetic traffic (clicks, purchases, logins, a few malformed payloads).
    Publish(PublishArgs),
    /// Print the aggregates.
    Stats(StatsArgs),
    /// Serve the live analytics dashboard (a read-only web page) until Ctrl-C.
    Dashboard(DashboardArgs),
    /// One-command tour: provision, run the workers in-process, generate traffic and
    /// print live analytics until Ctrl-C.
    Demo(DemoArgs),
}

/// The shape of the generated traffic.
#[derive(Debug, Clone, Args)]
pub struct TrafficArgs {
    /// Share of messages that are malformed payloads (dead-lettered, reason decode).
    #[arg(long, default_value_t = 0.005)]
    pub malformed_ratio: f64,
    /// Share of messages that republish a recent event (half under the same message id,
    /// half under a new one).
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_ratio: f64,
    /// Distinct users.
    #[arg(long, default_value_t = 300)]
    pub users: u64,
    /// Distinct products.
    #[arg(long, default_value_t = 36)]
    pub products: u64,
    /// Random seed (default: from the clock); also makes the event ids of this run.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl TrafficArgs {
    fn traffic(&self) -> Traffic {
        let seed = self.seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        });
        let run_id = format!(
            "{:012x}",
            crate::generator::SplitMix64::new(seed).next_u64() >> 16
        );
        Traffic::new(
            TrafficConfig {
                users: self.users.max(1),
                products: self.products.max(1),
                malformed_ratio: self.malformed_ratio.clamp(0.0, 1.0),
                duplicate_ratio: self.duplicate_ratio.clamp(0.0, 1.0),
                run_id,
                ..TrafficConfig::default()
            },
            seed,
        )
    }
}

/// `workers publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Messages per second (0: as fast as the server acknowledges).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Messages to publish (0: until Ctrl-C).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// PubAcks outstanding at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// The traffic.
    #[command(flatten)]
    pub traffic: TrafficArgs,
}

/// `workers stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Minutes shown, counting back from now.
    #[arg(long, default_value_t = 5)]
    pub minutes: u64,
    /// Products and users listed.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
}

/// `workers dashboard`.
#[derive(Debug, Clone, Args)]
pub struct DashboardArgs {
    /// Address to listen on, `ip:port` (port 0: a free one).
    #[arg(long, default_value = dashboard::DEFAULT_LISTEN)]
    pub listen: String,
    /// Allow a non-loopback listen address: the page shows user ids and has no login.
    #[arg(long)]
    pub allow_remote: bool,
    /// Minutes in the chart, counting back from now.
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// Products and users listed.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Milliseconds between two updates of the page.
    #[arg(long, default_value_t = 2000)]
    pub refresh_ms: u64,
}

impl DashboardArgs {
    fn options(&self) -> DashboardOptions {
        DashboardOptions {
            listen: self.listen.clone(),
            allow_remote: self.allow_remote,
            window_minutes: self.minutes.max(1),
            top: self.top,
            refresh: Duration::from_millis(self.refresh_ms.max(100)),
            ..DashboardOptions::default()
        }
    }
}

/// `workers demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Messages per second of demo traffic (a busy site; one worker process keeps up with
    /// far more, see `cargo bench --bench platform`).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds between two analytics printouts.
    #[arg(long, default_value_t = 5)]
    pub every: u64,
    /// Minutes shown, counting back from now.
    #[arg(long, default_value_t = 3)]
    pub minutes: u64,
    /// Where the live dashboard listens (a free port when that one is taken; "" for
    /// none).
    #[arg(long, value_name = "ADDR", default_value = dashboard::DEFAULT_LISTEN)]
    pub dashboard: String,
    /// When no server answers at the configured URL and it is on this machine, start
    /// `nats-server -js` there with its data in DIR, and stop it at the end
    /// (scripts/demo passes .local/nats).
    #[arg(long, value_name = "DIR")]
    pub local_server: Option<PathBuf>,
    /// A program that installs nats-server, run when a local server has to be started
    /// and no nats-server binary is found (scripts/demo passes scripts/install-deps).
    #[arg(long, value_name = "PROGRAM", requires = "local_server")]
    pub install_server_with: Option<PathBuf>,
    /// The traffic.
    #[command(flatten)]
    pub traffic: TrafficArgs,
}

/// Runs one of the platform's own commands; returns the exit code.
async fn run(command: Cmd, invocation: Invocation<Analytics>) -> ExitCode {
    let global = &invocation.global;
    match command {
        Cmd::Publish(args) => exit(publish_command(global, &args).await),
        Cmd::Stats(args) => exit(stats_command(global, &args).await),
        Cmd::Dashboard(args) => exit(dashboard_command(global, &args).await),
        Cmd::Demo(args) => exit(demo_command(global, &args, invocation.app.clone()).await),
    }
}

/// The demo prints its own story on stdout; logs (stderr) default to warnings, without
/// the per-message ones for the malformed events it sends on purpose (the analytics
/// count those). `RUST_LOG` overrides, as everywhere.
fn init_demo_logging(format: jetworker_cli::LogFormat) {
    jetworker_cli::init_logging_with(format, "warn,jetworker::consumer=error");
}

/// A command's failure: the message for stderr and the exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("{}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn load(global: &GlobalArgs) -> Result<Config, Failure> {
    jetworker_cli::load_config(global).map_err(|_| Failure::new(EXIT_INVALID_CONFIG, ""))
}

async fn connect(config: &Config) -> Result<(async_nats::Client, jetstream::Context), Failure> {
    let client = jetworker::connect(&config.connection).await.map_err(|e| {
        Failure::new(
            EXIT_FAILURE,
            format!("error: {e}\nhint: start a server with scripts/demo (or `nats-server -js`), or point NATS_URL at one"),
        )
    })?;
    // In the configured JetStream domain or API prefix, as the worker's own context.
    let js = jetworker::jetstream(client.clone(), &config.connection);
    Ok((client, js))
}

async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, Failure> {
    js.get_key_value(BUCKET).await.map_err(|e| {
        Failure::new(
            EXIT_FAILURE,
            format!("error: cannot open kv bucket {BUCKET:?}: {e}\nhint: run `workers provision` (the bucket is declared in streams.toml)"),
        )
    })
}

/// The last `n` minutes, oldest first.
fn last_minutes(n: u64) -> std::ops::RangeInclusive<u64> {
    let now = now_ms() / 60_000;
    now.saturating_sub(n.max(1) - 1)..=now
}

async fn publish_command(global: &GlobalArgs, args: &PublishArgs) -> Result<(), Failure> {
    let config = load(global)?;
    let (client, js) = connect(&config).await?;
    let stop = CancellationToken::new();
    jetworker::on_signals(stop.clone());
    let mut traffic = args.traffic.traffic();
    let plan = PublishPlan {
        rate: args.rate.max(0.0),
        count: (args.count > 0).then_some(args.count),
        window: args.window.max(1),
    };
    let result = publish::publish(&Publisher::new(js), &mut traffic, &plan, &stop).await;
    let _ = client.drain().await;
    match result {
        Ok(summary) => {
            println!("{summary}");
            Ok(())
        }
        Err(e) => Err(Failure::new(
            EXIT_FAILURE,
            format!("error: {e}\nhint: are the streams provisioned? run `workers provision`"),
        )),
    }
}

async fn stats_command(global: &GlobalArgs, args: &StatsArgs) -> Result<(), Failure> {
    let config = load(global)?;
    let (client, js) = connect(&config).await?;
    let kv = open_bucket(&js).await?;
    let snapshot = aggregates::read(&kv, last_minutes(args.minutes))
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("error: {e}")));
    let _ = client.drain().await;
    let snapshot = snapshot?;
    if args.json {
        let text = serde_json::to_string_pretty(&snapshot)
            .map_err(|e| Failure::new(EXIT_FAILURE, format!("error: {e}")))?;
        println!("{text}");
    } else {
        let options = ReportOptions {
            top_products: args.top,
            top_users: args.top,
            ..ReportOptions::default()
        };
        print!("{}", report::render(&snapshot, &options));
    }
    Ok(())
}

async fn dashboard_command(global: &GlobalArgs, args: &DashboardArgs) -> Result<(), Failure> {
    let config = load(global)?;
    // A refused address fails before anything connects.
    dashboard::listen_address(&args.listen, args.allow_remote)
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("error: {e}")))?;
    let stop = CancellationToken::new();
    jetworker::on_signals(stop.clone());
    let (client, js) = connect(&config).await?;
    let kv = open_bucket(&js).await?;
    let tasks = TaskTracker::new();
    let served = dashboard::serve(kv, args.options(), &tasks, stop.clone()).await;
    tasks.close();
    let result = match served {
        Ok(address) => {
            println!("dashboard at http://{address}/ (read-only; Ctrl-C stops it)");
            stop.cancelled().await;
            Ok(())
        }
        Err(e) => Err(Failure::new(EXIT_FAILURE, format!("error: {e}"))),
    };
    tasks.wait().await;
    let _ = client.drain().await;
    result
}

/// Starts the demo's dashboard on `listen` (none when empty); when that address is
/// taken (another demo, another server on 8080), on a free loopback port instead.
async fn start_demo_dashboard(
    listen: &str,
    kv: &kv::Store,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Option<std::net::SocketAddr>, Failure> {
    if listen.is_empty() {
        return Ok(None);
    }
    let options = |listen: &str| DashboardOptions {
        listen: listen.to_string(),
        ..DashboardOptions::default()
    };
    let failed = |e: dashboard::DashboardError| Failure::new(EXIT_FAILURE, format!("error: {e}"));
    match dashboard::serve(kv.clone(), options(listen), tasks, stop.clone()).await {
        Ok(address) => Ok(Some(address)),
        Err(why) if why.kind() == DashboardErrorKind::Listen => {
            println!("note: {why}; the dashboard uses a free port");
            dashboard::serve(kv.clone(), options("127.0.0.1:0"), tasks, stop.clone())
                .await
                .map(Some)
                .map_err(failed)
        }
        Err(e) => Err(failed(e)),
    }
}

/// Where the demo's server came from.
enum DemoServer {
    /// One was answering at the configured address: used, and left running.
    Existing,
    /// Started by the demo: stopped at the end.
    Local(LocalServer),
}

async fn demo_command(
    global: &GlobalArgs,
    args: &DemoArgs,
    app: App<Analytics>,
) -> Result<(), Failure> {
    let config = load(global)?;
    // Signals first: a Ctrl-C while a server starts or the streams are provisioned must
    // end the demo cleanly too, not leave a server behind.
    let stop = CancellationToken::new();
    jetworker::on_signals(stop.clone());

    let server = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        server = demo_server(&config, args) => server?,
    };
    let result = if stop.is_cancelled() {
        Ok(())
    } else {
        run_demo(
            &config,
            args,
            &stop,
            app,
            matches!(server, DemoServer::Local(_)),
        )
        .await
    };
    if let DemoServer::Local(server) = server {
        let (pid, dir) = (server.pid(), server.dir().display().to_string());
        match server.stop().await {
            Ok(_) => println!(
                "stopped the local nats-server (pid {pid}); its data stays in {dir} for the next run (delete that folder to start afresh)"
            ),
            Err(e) => eprintln!("error: stopping the local nats-server (pid {pid}): {e}"),
        }
    }
    if result.is_ok() {
        println!("stopped.");
    }
    result
}

/// Finds the server the demo uses: the one answering at the configured address, or,
/// with `--local-server`, one started there (installed first when missing).
async fn demo_server(config: &Config, args: &DemoArgs) -> Result<DemoServer, Failure> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
    let servers = jetworker::redacted_servers(&config.connection);
    let addresses: Vec<Address> = config
        .connection
        .servers
        .iter()
        .filter_map(|s| Address::parse(s.expose()))
        .collect();
    let mut not_nats = None;
    for address in &addresses {
        match local_server::probe(address, PROBE_TIMEOUT).await {
            Probe::Nats {
                jetstream: true,
                version,
            } => {
                println!("using the nats-server {version} answering at {address} (left running at the end)");
                return Ok(DemoServer::Existing);
            }
            Probe::Nats {
                jetstream: false,
                version,
            } => return Err(no_jetstream(address, &version, false)),
            Probe::NotNats(why) => {
                not_nats = Some(format!("{address} answers but is not a NATS server: {why}"))
            }
            Probe::Nothing => {}
        }
    }
    let Some(dir) = &args.local_server else {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "error: no nats-server answers at {servers}\nhint: scripts/demo starts a local one; or start one yourself (`nats-server -js`), or point NATS_URL at one"
            ),
        ));
    };
    if let Some(not_nats) = not_nats {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!("error: {not_nats}\nhint: point NATS_URL at a free port, e.g. NATS_URL=nats://127.0.0.1:4223 scripts/demo"),
        ));
    }
    let target = match addresses.first() {
        Some(a) if a.is_loopback() && a.plain && !config.connection.tls.required => a.clone(),
        _ => {
            return Err(Failure::new(
                EXIT_FAILURE,
                format!(
                    "error: no nats-server answers at {servers}, and the demo starts one only on this machine without TLS (nats://127.0.0.1:PORT)\nhint: start that server, or unset NATS_URL to use a local one"
                ),
            ))
        }
    };

    let (binary, installed_now) = match local_server::find_binary() {
        Some(binary) => (binary, false),
        None => (
            install_server(args.install_server_with.as_deref()).await?,
            true,
        ),
    };
    if installed_now {
        // The OS package may have started its own service on the port we want.
        if let Probe::Nats { jetstream, version } =
            local_server::probe(&target, PROBE_TIMEOUT).await
        {
            if jetstream {
                println!("using the nats-server {version} answering at {target} (left running at the end)");
                return Ok(DemoServer::Existing);
            }
            return Err(no_jetstream(&target, &version, true));
        }
    }

    println!(
        "no nats-server answers at {target}: starting {} -js there (data in {})",
        binary.display(),
        dir.display()
    );
    let server = LocalServer::start(&binary, &target, dir, Duration::from_secs(30))
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("error: {e}")))?;
    println!(
        "started nats-server {} with JetStream at {} (pid {}, log {})",
        server.version(),
        server.address(),
        server.pid(),
        server.log().display()
    );
    Ok(DemoServer::Local(server))
}

/// Runs `installer` (which installs nats-server), then finds the binary.
async fn install_server(
    installer: Option<&std::path::Path>,
) -> Result<std::path::PathBuf, Failure> {
    let missing = "error: nats-server is not installed";
    let Some(installer) = installer else {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!("{missing}\nhint: scripts/install-deps installs it (apt-get install nats-server), or set NATS_SERVER_BIN to a nats-server binary"),
        ));
    };
    println!(
        "nats-server is not installed: installing it with {}",
        installer.display()
    );
    let program = installer.to_path_buf();
    let status = tokio::task::spawn_blocking(move || std::process::Command::new(program).status())
        .await
        .map_err(|e| {
            Failure::new(
                EXIT_FAILURE,
                format!("{missing}: the installer did not run: {e}"),
            )
        })?;
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => {
            return Err(Failure::new(
                EXIT_FAILURE,
                format!("{missing}, and {} failed ({status})\nhint: install it by hand (sudo apt-get install nats-server) or set NATS_SERVER_BIN", installer.display()),
            ))
        }
        Err(e) => {
            return Err(Failure::new(
                EXIT_FAILURE,
                format!("{missing}, and {} could not be run: {e}", installer.display()),
            ))
        }
    }
    local_server::find_binary().ok_or_else(|| {
        Failure::new(
            EXIT_FAILURE,
            format!(
                "{missing}: {} succeeded but no nats-server is on PATH nor at {}",
                installer.display(),
                local_server::DEBIAN_SERVER_PATH
            ),
        )
    })
}

/// A server without JetStream: what it is likely to be and the ways out.
fn no_jetstream(address: &Address, version: &str, installed_now: bool) -> Failure {
    let why = if installed_now {
        "installing the nats-server package just started the OS service nats-server.service on it, which runs without JetStream"
    } else {
        "on Debian/Ubuntu this is usually nats-server.service, which the nats-server package enables and runs without JetStream"
    };
    Failure::new(
        EXIT_FAILURE,
        format!(
            "error: the nats-server {version} at {address} runs without JetStream; the workers need JetStream\n\
             hint: {why}. Either stop it, and the demo starts its own server with JetStream:\n\
             \x20   sudo systemctl disable --now nats-server && scripts/demo\n\
             or leave it alone and run the demo on another port:\n\
             \x20   NATS_URL=nats://127.0.0.1:4223 scripts/demo\n\
             or turn JetStream on in that server (`nats-server -js`, or `jetstream: enabled` in its config)"
        ),
    )
}

/// Connects, provisions, runs the workers and the traffic, prints analytics until `stop`.
async fn run_demo(
    config: &Config,
    args: &DemoArgs,
    stop: &CancellationToken,
    app: App<Analytics>,
    local_server: bool,
) -> Result<(), Failure> {
    let (client, js) = connect(config).await?;
    let info = client.server_info();
    if !info.jetstream {
        let address = Address::parse(&format!("{}:{}", info.host, info.port));
        let _ = client.drain().await;
        return Err(match address {
            Some(address) => no_jetstream(&address, &info.version, false),
            None => Failure::new(EXIT_FAILURE, "error: the server runs without JetStream"),
        });
    }

    match jetworker::provision(&client, &js, config, false).await {
        Ok(plan) if plan.has_changes() => print!("provisioned:\n{plan}"),
        Ok(_) => println!("streams, consumers and the {BUCKET:?} bucket are up to date"),
        Err(e) => {
            return Err(match e.plan() {
                Some(plan) => Failure::new(
                    EXIT_CONFLICT,
                    format!("provisioning has conflicts; nothing was changed:\n{plan}"),
                ),
                None => Failure::new(EXIT_FAILURE, format!("error: {e}")),
            })
        }
    }
    let kv = open_bucket(&js).await?;

    let tasks = TaskTracker::new();
    // Its own token (a child of `stop`): when the workers fail to start, the dashboard
    // is stopped before the error is returned.
    let dashboard_stop = stop.child_token();
    let started = match start_demo_dashboard(&args.dashboard, &kv, &tasks, &dashboard_stop).await {
        Ok(dashboard) => start_workers(app, config, stop)
            .await
            .map(|running| (dashboard, running)),
        Err(e) => Err(e),
    };
    let (dashboard, running) = match started {
        Ok(started) => started,
        Err(e) => {
            dashboard_stop.cancel();
            tasks.close();
            tasks.wait().await;
            let _ = client.drain().await;
            return Err(e);
        }
    };
    let consumers: Vec<&str> = config.consumers.iter().map(|c| c.name.as_str()).collect();
    let ops = running
        .ops_address()
        .map(|a| format!("; health and metrics at http://{a}/metrics"))
        .unwrap_or_default();
    println!(
        "workers running: {} consumers ({}){ops}",
        consumers.len(),
        consumers.join(", ")
    );
    if let Some(address) = dashboard {
        println!("dashboard: http://{address}/ (live analytics in the browser until Ctrl-C)");
    }
    println!(
        "publishing demo traffic at {} events/s; live analytics every {}s. Ctrl-C stops everything.",
        args.rate,
        args.every.max(1)
    );

    let traffic_task = {
        let publisher = Publisher::new(js.clone());
        let mut traffic = args.traffic.traffic();
        let plan = PublishPlan {
            rate: args.rate.max(0.1),
            count: None,
            window: 256,
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let result = publish::publish(&publisher, &mut traffic, &plan, &stop).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "demo traffic stopped");
            }
            result
        })
    };
    tasks.close();

    let options = ReportOptions::default();
    let started = std::time::Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        match aggregates::read(&kv, last_minutes(args.minutes)).await {
            Ok(snapshot) => {
                println!(
                    "\n── analytics at {} UTC, demo running {}s ──",
                    clock_seconds(now_ms()),
                    started.elapsed().as_secs()
                );
                print!("{}", report::render(&snapshot, &options));
                print_consumers(&running);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the aggregates"),
        }
    }

    println!("\nstopping: traffic first, then the workers (in-flight events finish)");
    let published = traffic_task.await;
    tasks.wait().await;
    let stats = running.wait().await;
    if let Ok(Ok(summary)) = published {
        println!("demo traffic: {summary}");
    }
    if let Ok(snapshot) = aggregates::read(&kv, last_minutes(args.minutes)).await {
        println!("\n── final analytics ──");
        print!("{}", report::render(&snapshot, &options));
    }
    let dead: u64 = stats.values().map(|s| dead_lettered(s)).sum();
    let _ = client.drain().await;
    println!("workers stopped.");
    if dead > 0 {
        println!(
            "{dead} malformed event(s) went to the dead-letter stream{}",
            if local_server {
                "; while the demo runs, `cargo run -p workers -- dlq list` in another terminal shows them"
            } else {
                "; `cargo run -p workers -- dlq list` shows them"
            }
        );
    }
    if !local_server {
        println!("`cargo run -p workers -- stats` shows the aggregates any time.");
    }
    Ok(())
}

/// Starts the workers; when the configured ops address is taken (a Prometheus on 9090,
/// another demo), the demo takes a free port instead of failing.
async fn start_workers(
    app: App<Analytics>,
    config: &Config,
    stop: &CancellationToken,
) -> Result<Running, Failure> {
    let failed = |e: RunError| Failure::new(EXIT_FAILURE, format!("error: {e}"));
    match app.clone().start(config.clone(), stop.clone()).await {
        Err(why) if why.kind() == RunErrorKind::OpsListen => {
            println!(
                "note: the ops endpoint cannot listen on {} ({why}); using a free port",
                config.worker.ops_listen
            );
            let mut config = config.clone();
            config.worker.ops_listen = "127.0.0.1:0".to_string();
            app.start(config, stop.clone()).await.map_err(failed)
        }
        other => other.map_err(failed),
    }
}

fn dead_lettered(stats: &ConsumerStats) -> u64 {
    stats.dead_lettered.iter().map(|d| d.load(Relaxed)).sum()
}

/// The platform's consumers (not the safety net's internal ones, which show in
/// `/metrics` and `status`).
fn print_consumers(running: &Running) {
    let own = running
        .stats()
        .iter()
        .filter(|(name, _)| !name.starts_with(jetworker::SAFETY_NET_CONSUMER));
    for (name, s) in own {
        println!(
            "  consumer {name:<20} received {:>7}  acked {:>7}  retried {:>4}  dead-lettered {:>4}",
            s.received.load(Relaxed),
            s.acked.load(Relaxed),
            s.retried.load(Relaxed),
            dead_lettered(s)
        );
    }
}

/// Unix milliseconds as `HH:MM:SS` (UTC).
fn clock_seconds(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
