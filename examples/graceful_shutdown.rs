//! Run with: `cargo run --example graceful_shutdown` (self-contained: it starts its own
//! `nats-server`, which must be installed, e.g. `apt-get install nats-server`). Press
//! Ctrl-C while it works, or let it send itself the SIGTERM that systemd, Kubernetes or
//! a deploy send, two seconds in.
//!
//! What a stop does to work in progress, and why nothing is lost or done twice:
//! 1. the first SIGTERM or Ctrl-C stops pulling new messages;
//! 2. handlers already running finish (up to `shutdown_grace`) and are acked;
//! 3. messages pulled but not started are handed back to the server at once;
//! 4. a long handler can watch `ctx.shutdown()` and stop early by returning an error:
//!    its message is redelivered later, to this worker's successor;
//! 5. acks are flushed, the connection drains, the process exits 0.
//!
//! A second signal exits at once (exit 130): whatever was in flight is then redelivered
//! after `ack_wait`. Here a second worker (the one after the deploy) takes over what the
//! first left, and every job ends done exactly once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::Publisher;
use jetworker::{App, Context, Event, HandlerError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    id: String,
    /// Work steps of 250 ms each.
    steps: u32,
}

/// Jobs done, and by which worker: shared by both workers of this example.
type Done = Mutex<BTreeMap<String, Vec<&'static str>>>;

struct Worker {
    name: &'static str,
    done: Arc<Done>,
}

async fn render(job: Event<Job>, ctx: Context<Worker>) -> Result<(), HandlerError> {
    let worker = ctx.state();
    println!(
        "  {}: {} started (attempt {})",
        worker.name,
        job.id,
        ctx.attempt()
    );
    for step in 1..=job.steps {
        // Short jobs just finish: the grace period is there for them. A long one checks
        // between steps and gives its message back rather than hold up the stop.
        if job.steps > 8 && ctx.shutdown().is_cancelled() {
            println!(
                "  {}: {} stopped at step {step} of {}: handed back for the next worker",
                worker.name, job.id, job.steps
            );
            return Err(HandlerError::transient("interrupted by shutdown"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    worker
        .done
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(job.id.clone())
        .or_default()
        .push(worker.name);
    println!("  {}: {} done", worker.name, job.id);
    Ok(())
}

const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""
# How long running handlers may take to finish after the stop signal.
shutdown_grace = "10s"

[[streams]]
name = "JOBS"
subjects = ["jobs.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "render"
stream = "JOBS"
handler = "render"
concurrency = 3
backoff = ["500ms"]
dead_letter_subject = "dead_letter.render"
"#;

fn app(name: &'static str, done: &Arc<Done>) -> App<Worker> {
    App::new(Worker {
        name,
        done: done.clone(),
    })
    .handler("render", render)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start().context("starting nats-server")?;
    let config = Config::from_toml_with_env(
        &CONFIG.replace("{url}", &server.url()),
        Path::new("example.toml"),
        std::iter::empty(),
    )?;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
    let done: Arc<Done> = Arc::default();

    // The first worker, stopped by a real signal like any deployed worker.
    let stop = CancellationToken::new();
    jetworker::on_signals(stop.clone());
    let running = app("worker-1", &done)
        .start(config.clone(), stop.clone())
        .await?;

    let publisher = Publisher::new(js.clone());
    let mut jobs = vec![Job {
        id: "report".into(),
        steps: 24,
    }];
    jobs.extend((1..=8).map(|i| Job {
        id: format!("thumb-{i}"),
        steps: 6,
    }));
    println!(
        "{} jobs queued; worker-1 runs 3 at a time. Ctrl-C to stop it (or wait 2s for a SIGTERM)",
        jobs.len()
    );
    for job in &jobs {
        publisher
            .publish(&format!("jobs.{}", job.id), &job.id, job)
            .await?;
    }
    let timer = tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "\n--- sending SIGTERM to this process (pid {}) ---",
            std::process::id()
        );
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status();
    });
    stop.cancelled().await;
    timer.abort();
    let started = Instant::now();
    let stats = running.wait().await;
    let s = &stats["render"];
    let read = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "--- worker-1 stopped in {:.1}s: {} finished and acked, {} stopped early and handed back, {} pulled but never started and handed back ---\n",
        started.elapsed().as_secs_f64(),
        read(&s.acked),
        read(&s.retried),
        read(&s.released)
    );

    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_consumer_from_stream("render", "JOBS").await?;
    let info = consumer.info().await?;
    println!(
        "left on the server for the next worker: {} never delivered, {} delivered but unfinished",
        info.num_pending, info.num_ack_pending
    );

    // The worker after the deploy takes over.
    let stop = CancellationToken::new();
    let running = app("worker-2", &done)
        .start(config.clone(), stop.clone())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.lock().map(|d| d.len()).unwrap_or(0) < jobs.len() {
        if Instant::now() > deadline {
            bail!("not every job was done in 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.wait().await;

    let done = done.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    println!("\nwho did what:");
    for (job, workers) in done.iter() {
        println!("  {job:<8} {}", workers.join(", "));
    }
    if done.values().any(|workers| workers.len() != 1) {
        bail!("a job was done twice");
    }
    println!("every job done exactly once; nothing lost across the stop");
    Ok(())
}
