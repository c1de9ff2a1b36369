//! Run with: `cargo run --example shared_state` (self-contained: it starts its own
//! `nats-server`, which must be installed, e.g. `apt-get install nats-server`).
//!
//! State shared by every handler: what `App::new(state)` is for. Build the expensive
//! things once at startup (a database pool, an HTTP client, a cache, a catalog loaded
//! from a file) and every handler reaches them through `ctx.state()`. The app puts the
//! state in an `Arc`; it is shared, never cloned per message, and used by many deliveries
//! at once (up to each consumer's `concurrency`), so anything that changes needs interior
//! mutability: atomics, a `Mutex` held briefly (never across an `.await`), or a client
//! that is already `Sync`. Keep a handle with `app.state().clone()` to read it from the
//! outside (an HTTP endpoint, a report).
//!
//! Here a warehouse keeps stock levels in memory. Two consumers share them: `restock`
//! adds stock, `reserve` takes it for orders. An order that finds too little stock asks
//! to be retried a little later (`HandlerError::retry_after`); the restock that arrives
//! in the meantime lets the retry succeed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::Publisher;
use jetworker::{App, Context, Event, HandlerError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The shared state: built once, used by every handler and every delivery.
struct Warehouse {
    /// Read-only after startup: no lock needed.
    catalog: HashMap<String, &'static str>,
    /// Units in stock by SKU. A std `Mutex` is right for short, non-async sections.
    stock: Mutex<HashMap<String, u64>>,
    /// Counters anyone can read at any time.
    reserved_units: AtomicU64,
    out_of_stock_retries: AtomicU64,
}

impl Warehouse {
    fn new() -> Self {
        let catalog = HashMap::from([
            ("SKU-MUG".to_string(), "mug"),
            ("SKU-TEE".to_string(), "t-shirt"),
        ]);
        let stock = catalog.keys().map(|sku| (sku.clone(), 0)).collect();
        Warehouse {
            catalog,
            stock: Mutex::new(stock),
            reserved_units: AtomicU64::new(0),
            out_of_stock_retries: AtomicU64::new(0),
        }
    }

    /// Takes `units` of `sku` if there are enough; the lock is held for the check and the
    /// update only, so concurrent reservations never oversell.
    fn take(&self, sku: &str, units: u64) -> Result<u64, u64> {
        let mut stock = self
            .stock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let level = stock.entry(sku.to_string()).or_insert(0);
        if *level < units {
            return Err(*level);
        }
        *level -= units;
        Ok(*level)
    }

    fn add(&self, sku: &str, units: u64) -> u64 {
        let mut stock = self
            .stock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let level = stock.entry(sku.to_string()).or_insert(0);
        *level += units;
        *level
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StockMove {
    sku: String,
    units: u64,
}

async fn restock(delivery: Event<StockMove>, ctx: Context<Warehouse>) -> Result<(), HandlerError> {
    let warehouse = ctx.state();
    let Some(name) = warehouse.catalog.get(&delivery.sku) else {
        return Err(HandlerError::permanent(format!(
            "unknown SKU {}",
            delivery.sku
        )));
    };
    let level = warehouse.add(&delivery.sku, delivery.units);
    println!(
        "  restock  +{} {name:<8} -> {level} in stock",
        delivery.units
    );
    Ok(())
}

async fn reserve(order: Event<StockMove>, ctx: Context<Warehouse>) -> Result<(), HandlerError> {
    let warehouse = ctx.state();
    let Some(name) = warehouse.catalog.get(&order.sku) else {
        return Err(HandlerError::permanent(format!(
            "unknown SKU {}",
            order.sku
        )));
    };
    match warehouse.take(&order.sku, order.units) {
        Ok(left) => {
            warehouse
                .reserved_units
                .fetch_add(order.units, Ordering::Relaxed);
            println!("  reserve  -{} {name:<8} -> {left} left", order.units);
            Ok(())
        }
        Err(level) => {
            warehouse
                .out_of_stock_retries
                .fetch_add(1, Ordering::Relaxed);
            println!(
                "  reserve  {} {name:<8}: only {level} in stock, retrying in 300ms (attempt {})",
                order.units,
                ctx.attempt()
            );
            Err(HandlerError::retry_after(
                Duration::from_millis(300),
                format!("only {level} {name}(s) in stock"),
            ))
        }
    }
}

const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""

[[streams]]
name = "WAREHOUSE"
subjects = ["warehouse.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "restocks"
stream = "WAREHOUSE"
filter_subject = "warehouse.restock"
handler = "restock"
dead_letter_subject = "dead_letter.restocks"

[[consumers]]
name = "reservations"
stream = "WAREHOUSE"
filter_subject = "warehouse.reserve"
handler = "reserve"
concurrency = 16
max_deliver = 20
dead_letter_subject = "dead_letter.reservations"
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start().context("starting nats-server")?;
    let config = Config::from_toml_with_env(
        &CONFIG.replace("{url}", &server.url()),
        Path::new("example.toml"),
        std::iter::empty(),
    )?;

    let app = App::new(Warehouse::new())
        .handler("restock", restock)
        .handler("reserve", reserve);
    // A handle on the same state, for reading it from outside the handlers.
    let warehouse = app.state().clone();
    let stop = CancellationToken::new();
    let running = app.start(config, stop.clone()).await?;

    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
    let publisher = Publisher::new(js);
    // Twelve orders of 2 units arrive before any stock; the restocks come a bit later.
    println!("24 units ordered in 12 orders, before the warehouse has any stock:");
    for i in 0..12 {
        let sku = if i % 3 == 0 { "SKU-TEE" } else { "SKU-MUG" };
        let order = StockMove {
            sku: sku.into(),
            units: 2,
        };
        publisher
            .publish("warehouse.reserve", &format!("order-{i}"), &order)
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (i, (sku, units)) in [("SKU-MUG", 10), ("SKU-TEE", 8), ("SKU-MUG", 10)]
        .into_iter()
        .enumerate()
    {
        let restock = StockMove {
            sku: sku.into(),
            units,
        };
        publisher
            .publish("warehouse.restock", &format!("restock-{i}"), &restock)
            .await?;
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    while warehouse.reserved_units.load(Ordering::Relaxed) < 24 {
        if Instant::now() > deadline {
            bail!("the orders were not all reserved in 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let stats = running.wait().await;

    let stock = warehouse
        .stock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    println!(
        "\nreserved {} units; {} out-of-stock retries; peak concurrent reservations {}",
        warehouse.reserved_units.load(Ordering::Relaxed),
        warehouse.out_of_stock_retries.load(Ordering::Relaxed),
        stats["reservations"].peak_in_flight.load(Ordering::Relaxed)
    );
    println!(
        "left in stock: {} mugs, {} t-shirts (28 received - 24 reserved = 4)",
        stock["SKU-MUG"], stock["SKU-TEE"]
    );
    if stock["SKU-MUG"] + stock["SKU-TEE"] != 4 {
        bail!("stock does not add up: {stock:?}");
    }
    Ok(())
}
