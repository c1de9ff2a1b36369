//! The `workers` command line: jetworker's built-in subcommands (`run`, `check`,
//! `provision`) plus `publish`, `stats` and `demo`.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use clap::{Args, Parser, Subcommand};
use jetworker::cli::{GlobalArgs, EXIT_CONFLICT, EXIT_FAILURE, EXIT_INVALID_CONFIG};
use jetworker::config::Config;
use jetworker::publisher::Publisher;
use jetworker::{connect, provision};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aggregates;
use crate::generator::{Traffic, TrafficConfig};
use crate::handlers::{self, Analytics, BUCKET};
use crate::publish::{self, now_ms, PublishPlan};
use crate::report::{self, ReportOptions};

/// The analytics platform's command line.
#[derive(Debug, Parser)]
#[command(
    name = "workers",
    version,
    about = "Real-time analytics workers on NATS JetStream"
)]
pub struct Cli {
    /// Options of every subcommand.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// jetworker's built-in subcommands.
    #[command(flatten)]
    Jetworker(jetworker::cli::Command),
    /// Publish synthetic traffic (clicks, purchases, logins, a few malformed payloads).
    Publish(PublishArgs),
    /// Print the aggregates.
    Stats(StatsArgs),
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

/// `workers demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Messages per second of demo traffic.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds between two analytics printouts.
    #[arg(long, default_value_t = 5)]
    pub every: u64,
    /// Minutes shown, counting back from now.
    #[arg(long, default_value_t = 3)]
    pub minutes: u64,
    /// The traffic.
    #[command(flatten)]
    pub traffic: TrafficArgs,
}

/// Runs the parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    jetworker::cli::init_logging(cli.global.log_format);
    match cli.command {
        Cmd::Jetworker(command) => {
            jetworker::cli::execute(&cli.global, command, handlers::app(Analytics::new())).await
        }
        Cmd::Publish(args) => exit(publish_command(&cli.global, &args).await),
        Cmd::Stats(args) => exit(stats_command(&cli.global, &args).await),
        Cmd::Demo(args) => exit(demo_command(&cli.global, &args).await),
    }
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
    jetworker::cli::load_config(global).map_err(|_| Failure::new(EXIT_INVALID_CONFIG, ""))
}

async fn connect(config: &Config) -> Result<(async_nats::Client, jetstream::Context), Failure> {
    let client = connect::connect(&config.connection).await.map_err(|e| {
        Failure::new(
            EXIT_FAILURE,
            format!("error: {e}\nhint: start a server with scripts/demo (or `nats-server -js`), or point NATS_URL at one"),
        )
    })?;
    let js = jetstream::new(client.clone());
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
    jetworker::shutdown::on_signals(stop.clone());
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

async fn demo_command(global: &GlobalArgs, args: &DemoArgs) -> Result<(), Failure> {
    let config = load(global)?;
    let (client, js) = connect(&config).await?;
    println!(
        "connected to {} (nats-server {})",
        connect::redacted_servers(&config.connection),
        client.server_info().version
    );

    match provision::provision(&client, &js, &config, false).await {
        Ok(plan) if plan.has_changes() => print!("provisioned:\n{plan}"),
        Ok(_) => println!("streams, consumers and the {BUCKET:?} bucket are up to date"),
        Err(provision::ProvisionError::Conflicts(plan)) => {
            return Err(Failure::new(
                EXIT_CONFLICT,
                format!("provisioning has conflicts; nothing was changed:\n{plan}"),
            ))
        }
        Err(e) => return Err(Failure::new(EXIT_FAILURE, format!("error: {e}"))),
    }
    let kv = open_bucket(&js).await?;

    let stop = CancellationToken::new();
    jetworker::shutdown::on_signals(stop.clone());
    let running = handlers::app(Analytics::new())
        .start(config.clone(), stop.clone())
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("error: {e}")))?;
    println!(
        "workers running; publishing demo traffic at {}/s; analytics every {}s (Ctrl-C stops)",
        args.rate, args.every
    );

    let tasks = TaskTracker::new();
    let traffic_task = {
        let publisher = Publisher::new(js.clone());
        let mut traffic = args.traffic.traffic();
        let plan = PublishPlan {
            rate: args.rate.max(0.1),
            count: None,
            window: 64,
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
    let mut every = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        match aggregates::read(&kv, last_minutes(args.minutes)).await {
            Ok(snapshot) => {
                println!("\n── analytics ──");
                print!("{}", report::render(&snapshot, &options));
                for (name, s) in running.stats() {
                    use std::sync::atomic::Ordering::Relaxed;
                    let dead: u64 = s.dead_lettered.iter().map(|d| d.load(Relaxed)).sum();
                    println!(
                        "  consumer {name:<16} received {:>6}  acked {:>6}  retried {:>3}  dead-lettered {:>3}",
                        s.received.load(Relaxed),
                        s.acked.load(Relaxed),
                        s.retried.load(Relaxed),
                        dead
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the aggregates"),
        }
    }

    println!("\nstopping: traffic first, then the workers (in-flight events finish)");
    let published = traffic_task.await;
    tasks.wait().await;
    running.wait().await;
    if let Ok(Ok(summary)) = published {
        println!("demo traffic: {summary}");
    }
    if let Ok(snapshot) = aggregates::read(&kv, last_minutes(args.minutes)).await {
        println!("\n── final analytics ──");
        print!("{}", report::render(&snapshot, &options));
    }
    let _ = client.drain().await;
    println!("stopped. `workers stats` shows the aggregates any time.");
    Ok(())
}
