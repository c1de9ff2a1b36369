//! Run with: `cargo run --example ordered_by_key` (self-contained: it starts its own
//! `nats-server`, which must be installed, e.g. `apt-get install nats-server`).
//!
//! Messages of one key in order, keys side by side: a ledger applies the entries of each
//! account in the order they were published (`ordered_by = { subject_token = 1 }` on
//! `accounts.<account>`), while the accounts are worked on concurrently. The first entry
//! of account `bob` fails once (its bank is briefly unreachable): it is retried a second
//! later, and bob's later entries wait for it, while alice's and carol's go on. At the
//! end each account's entries are listed in the order they were applied.
//!
//! Across replicas the same consumer takes `partitions = { count = N, subject_token = 1 }`
//! on `accounts.<partition>.<account>` subjects, published with
//! `Publisher::publish_keyed` (see the README's "Ordered by key").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use jetworker::testing::server::NatsServer;
use jetworker::{App, Config, Context, Event, HandlerError, Publisher};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// The entry's number within its account: what must come out in order.
    number: u32,
    amount_cents: i64,
}

/// The ledger: entries applied per account, and whether bob's bank failed already.
#[derive(Default)]
struct Ledger {
    applied: Mutex<BTreeMap<String, Vec<u32>>>,
    bob_failed_once: AtomicBool,
}

async fn apply_entry(entry: Event<Entry>, ctx: Context<Ledger>) -> Result<(), HandlerError> {
    let account = ctx
        .subject()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    if account == "bob" && !ctx.state().bob_failed_once.swap(true, Ordering::SeqCst) {
        return Err(HandlerError::transient("bob's bank is unreachable"));
    }
    // Stands for the write to the account's balance.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if let Ok(mut applied) = ctx.state().applied.lock() {
        applied.entry(account).or_default().push(entry.number);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let config = Config::from_toml_with_env(
        &format!(
            r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""
shutdown_grace = "5s"

[[streams]]
name = "ACCOUNTS"
subjects = ["accounts.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "ledger"
stream = "ACCOUNTS"
handler = "apply_entry"
dead_letter_subject = "dlq.ledger"
ordered_by = {{ subject_token = 1 }}
backoff = ["1s"]
concurrency = 8
"#,
            url = server.url()
        ),
        Path::new("ordered_by_key.toml"),
        std::iter::empty(),
    )?;
    let client = jetworker::connect(&config.connection).await?;
    let js = jetworker::jetstream(client.clone(), &config.connection);
    jetworker::provision(&client, &js, &config, false).await?;

    let publisher = Publisher::new(js);
    let accounts = ["alice", "bob", "carol"];
    for number in 1..=5 {
        for account in accounts {
            let entry = Entry {
                number,
                amount_cents: 100 * i64::from(number),
            };
            let id = format!("{account}-{number}");
            publisher
                .publish(&format!("accounts.{account}"), &id, &entry)
                .await?;
        }
    }

    let stop = CancellationToken::new();
    let app = App::new(Ledger::default()).handler("apply_entry", apply_entry);
    let ledger = app.state().clone();
    let running = app.start(config, stop.clone()).await?;
    let started = Instant::now();
    let applied = || -> usize {
        ledger
            .applied
            .lock()
            .map(|a| a.values().map(Vec::len).sum())
            .unwrap_or(0)
    };
    while applied() < 15 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the ledger did not apply every entry within 30s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.wait().await;

    println!("entries applied per account, in the order they were applied:");
    if let Ok(applied) = ledger.applied.lock() {
        for (account, numbers) in applied.iter() {
            println!("  {account:<6} {numbers:?}");
            if numbers.windows(2).any(|w| w[0] > w[1]) {
                bail!("{account}'s entries were applied out of order");
            }
        }
    }
    println!("bob's first entry failed once: his later entries waited for its retry, while alice's and carol's went on");
    Ok(())
}
