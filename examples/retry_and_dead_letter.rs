//! Run with: `cargo run --example retry_and_dead_letter` (self-contained: it starts its own
//! `nats-server`, which must be installed, e.g. `apt-get install nats-server`).
//!
//! What happens to a message when its handler fails, decided by how it fails:
//!
//! | the handler returns                        | the framework                                  |
//! |--------------------------------------------|------------------------------------------------|
//! | `Ok(())`                                   | acks                                           |
//! | any error through `?` (transient)          | retries on the consumer's `backoff` schedule   |
//! | `HandlerError::retry_after(d, ..)`         | retries after exactly `d`                      |
//! | `HandlerError::permanent(..)`, `.permanent()?` | dead-letters at once, no retry             |
//! | a transient error on the last attempt      | dead-letters with reason `exhausted`           |
//! | (a payload that does not decode)           | dead-letters with reason `decode`              |
//!
//! A payment worker charges orders through a fake card gateway whose test cards fail in
//! the ways real gateways do. At the end it lists the dead-letter stream: the messages an
//! operator has to look at (`dlq show`) and replay or purge (`dlq replay`, `dlq purge`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::Publisher;
use jetworker::{App, Context, Event, HandlerError, ResultExt};
use jetworker_cli::{Dlq, Filter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    card: String,
    amount_cents: i64,
}

/// A stand-in for a card gateway's client, with test cards in the spirit of Stripe's.
mod gateway {
    use std::time::Duration;

    pub const OK: &str = "4242424242424242";
    /// Fails with a processing error on the first try only.
    pub const FLAKY: &str = "4000000000000119";
    /// Rate-limited on the first try, with the delay the gateway asks for.
    pub const RATE_LIMITED: &str = "4000000000009995";
    /// The issuer never answers.
    pub const ISSUER_DOWN: &str = "4000000000000002";

    #[derive(Debug)]
    pub enum Error {
        Processing,
        RateLimited { retry_after: Duration },
        IssuerUnavailable,
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Processing => f.write_str("gateway: processing error"),
                Error::RateLimited { retry_after } => {
                    write!(f, "gateway: rate limited, retry after {retry_after:?}")
                }
                Error::IssuerUnavailable => f.write_str("gateway: card issuer unavailable"),
            }
        }
    }

    impl std::error::Error for Error {}

    /// A validated card number. Parsing is where bad input is found, before any money moves.
    pub struct Card(String);

    impl std::str::FromStr for Card {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            if s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit()) {
                Ok(Card(s.to_string()))
            } else {
                Err(format!("{s:?} is not a card number"))
            }
        }
    }

    /// Charges `card`. The fake recovers with time the way real outages do; `attempt`
    /// stands in for that time so the demo is deterministic.
    pub async fn charge(card: &Card, _amount_cents: i64, attempt: u64) -> Result<(), Error> {
        match card.0.as_str() {
            FLAKY if attempt == 1 => Err(Error::Processing),
            RATE_LIMITED if attempt == 1 => Err(Error::RateLimited {
                retry_after: Duration::from_millis(700),
            }),
            ISSUER_DOWN => Err(Error::IssuerUnavailable),
            _ => Ok(()),
        }
    }
}

async fn charge(order: Event<Order>, ctx: Context) -> Result<(), HandlerError> {
    let attempt = ctx.attempt();
    println!("  order {:<14} attempt {attempt}", order.id);

    // Checks of the message itself: retrying the same bytes can never fix them.
    if order.amount_cents <= 0 {
        return Err(HandlerError::permanent(format!(
            "amount must be positive, got {}",
            order.amount_cents
        )));
    }
    let card: gateway::Card = order.card.parse().permanent()?;

    let charged = gateway::charge(&card, order.amount_cents, attempt).await;
    // The gateway said when to come back: sooner is refused again, later is wasted time.
    if let Err(gateway::Error::RateLimited { retry_after }) = charged {
        return Err(HandlerError::retry_after(
            retry_after,
            "rate limited by the gateway",
        ));
    }
    // Anything else from the network may work next time: plain `?` is transient.
    charged?;
    println!("  order {:<14} charged", order.id);
    Ok(())
}

const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""

[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "charge_orders"
stream = "ORDERS"
handler = "charge"
# Three deliveries in all; the waits between them are short so the demo is quick
# (in production think "5s", "1m": long enough for a dependency to recover).
max_deliver = 3
backoff = ["200ms", "500ms"]
dead_letter_subject = "dead_letter.charge_orders"
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
    let running = App::new(())
        .handler("charge", charge)
        .start(config.clone(), stop.clone())
        .await?;
    let client = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(client);

    let orders = [
        ("o-1-ok", gateway::OK, 1999),
        ("o-2-flaky", gateway::FLAKY, 500),
        ("o-3-limited", gateway::RATE_LIMITED, 1250),
        ("o-4-issuer", gateway::ISSUER_DOWN, 300),
        ("o-5-bad-card", "4242-oops", 800),
        ("o-6-negative", gateway::OK, -100),
    ];
    println!("publishing {} orders and one corrupt message", orders.len());
    let publisher = Publisher::new(js.clone());
    for (id, card, amount_cents) in orders {
        let order = Order {
            id: id.to_string(),
            card: card.to_string(),
            amount_cents,
        };
        publisher
            .publish(&format!("orders.{id}"), id, &order)
            .await?;
    }
    // Bytes no `Order` decodes from: the handler never sees them.
    js.publish("orders.corrupt", "not MessagePack".into())
        .await?
        .await?;
    let expected = orders.len() as u64 + 1;

    // Every message ends settled: acked or dead-lettered, never lost, never stuck.
    let stats = running.stats()["charge_orders"].clone();
    let settled = || {
        stats.acked.load(Ordering::Relaxed)
            + stats
                .dead_lettered
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled() < expected {
        if Instant::now() > deadline {
            bail!("only {} of {expected} messages settled in 20s", settled());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.wait().await;

    println!(
        "\nsettled: {} acked, {} retries, {} dead-lettered",
        stats.acked.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        settled() - stats.acked.load(Ordering::Relaxed),
    );

    // What `dlq list` / `dlq show` print: the original payload plus why it failed.
    let letters = Dlq::new(js, &config)?.list(&Filter::default()).await?;
    println!("\ndead-letter stream: {} message(s)", letters.len());
    for letter in &letters {
        println!("\n#{} on {}", letter.sequence, letter.subject);
        for (name, values) in letter.detail(None).headers {
            if name.starts_with("Jetworker-") {
                println!("  {name}: {}", values.join(", "));
            }
        }
    }
    Ok(())
}
