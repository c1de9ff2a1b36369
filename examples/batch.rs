//! Run with: `cargo run --example batch` (self-contained: it starts its own `nats-server`,
//! which must be installed, e.g. `apt-get install nats-server`).
//!
//! A batch handler: page views are written to a (pretend) analytics store one batch at a
//! time instead of one row per message. The consumer's `max_batch`, `max_batch_bytes`
//! and `max_batch_wait` say how big a batch gets and how long it waits to fill. Each
//! message is still settled on its own:
//!
//! | the batch handler                                  | the framework                   |
//! |----------------------------------------------------|---------------------------------|
//! | returns `Ok(failures)`                             | acks every message not in it    |
//! | `failures.fail(m, HandlerError::permanent(..))`    | dead-letters `m` at once        |
//! | `failures.fail(m, error)` (transient)              | retries `m` on the schedule     |
//! | returns `Err` (e.g. `?` on the store's write)      | retries every message           |
//! | (a payload that does not decode)                   | dead-letters it; never in a batch |

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jetworker::testing::server::NatsServer;
use jetworker::{App, Batch, BatchContext, BatchFailures, BatchResult, Config, HandlerError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct PageView {
    user: String,
    page: String,
}

/// A stand-in for an analytics store that takes rows in bulk; its first write fails, as
/// a store that is briefly unavailable does.
#[derive(Default)]
struct Store {
    rows: Mutex<Vec<(String, String)>>,
    writes: AtomicU64,
}

impl Store {
    async fn insert(&self, rows: Vec<(String, String)>) -> Result<(), std::io::Error> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self.writes.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(std::io::Error::other("store unavailable"));
        }
        if let Ok(mut stored) = self.rows.lock() {
            stored.extend(rows);
        }
        Ok(())
    }
}

async fn store_views(views: Batch<PageView>, ctx: BatchContext<Store>) -> BatchResult {
    println!("  batch of {} views", views.len());
    let mut failures = BatchFailures::new();
    let mut rows = Vec::with_capacity(views.len());
    for view in &views {
        if view.page.starts_with('/') {
            rows.push((view.user.clone(), view.page.clone()));
        } else {
            failures.fail(
                view,
                HandlerError::permanent(format!("not a path: {:?}", view.page)),
            );
        }
    }
    // One write for the whole batch; if it fails, every message is retried.
    ctx.state().insert(rows).await?;
    Ok(failures)
}

const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""

[[streams]]
name = "VIEWS"
subjects = ["views.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "store_views"
stream = "VIEWS"
handler = "store_views"
max_batch = 100
max_batch_bytes = 65536
max_batch_wait = "100ms"
backoff = ["200ms"]
dead_letter_subject = "dead_letter.store_views"
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start().context("starting nats-server")?;
    let config = Config::from_toml_with_env(
        &CONFIG.replace("{url}", &server.url()),
        Path::new("example.toml"),
        std::iter::empty(),
    )?;
    let stop = CancellationToken::new();
    let running = App::new(Store::default())
        .batch_handler("store_views", store_views)
        .start(config, stop.clone())
        .await?;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);

    let total = 250u64;
    println!("publishing {total} page views (one with a bad page) and one corrupt message");
    for i in 0..total {
        let view = PageView {
            user: format!("user-{}", i % 7),
            page: if i == 42 {
                "oops".into()
            } else {
                format!("/products/{i}")
            },
        };
        js.publish(format!("views.{i}"), rmp_serde::to_vec_named(&view)?.into())
            .await?
            .await?;
    }
    js.publish("views.corrupt", "not MessagePack".into())
        .await?
        .await?;

    let stats = running.stats()["store_views"].clone();
    let settled = || {
        stats.acked.load(Ordering::Relaxed)
            + stats
                .dead_lettered
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled() < total + 1 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} messages settled in 20s",
                settled(),
                total + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.wait().await;
    println!(
        "\nsettled: {} acked, {} retried, {} dead-lettered",
        stats.acked.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        settled() - stats.acked.load(Ordering::Relaxed),
    );
    Ok(())
}
