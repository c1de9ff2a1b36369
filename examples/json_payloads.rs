//! Run with: `cargo run --example json_payloads` (self-contained: it starts its own
//! `nats-server`, which must be installed, e.g. `apt-get install nats-server`).
//!
//! JSON payloads instead of MessagePack: `codec = "json"` on the consumer, and
//! `Publisher::with_codec(CodecKind::Json)` where you publish. JSON is the choice when
//! other languages, `nats pub` or people write the messages; MessagePack (the default) is
//! smaller and faster when only your own services do.
//!
//! The payload type is the contract, written with serde attributes:
//! - a `type` tag picks the variant of an enum (`#[serde(tag = "type")]`);
//! - a field with `#[serde(default)]` may be missing (producers can lag behind);
//! - unknown fields are ignored, so producers can start sending a new field before every
//!   consumer knows it.
//!
//! A message that breaks the contract (not JSON, a required field missing, an unknown
//! `type`) never reaches the handler and is never retried: retrying the same bytes cannot
//! fix them. It goes to the dead-letter stream with reason `decode` and serde's error
//! (what is wrong, at which line and column), which this example prints at the end.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::CodecKind;
use jetworker::Config;
use jetworker::Publisher;
use jetworker::{App, Context, Event, HandlerError};
use jetworker_cli::{Dlq, Filter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What the account service publishes on `accounts.<event>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AccountEvent {
    SignedUp {
        user_id: u64,
        email: String,
        /// Added later than the rest: older producers leave it out.
        #[serde(default)]
        referral: Option<String>,
    },
    PlanChanged {
        user_id: u64,
        from: Plan,
        to: Plan,
    },
    Deleted {
        user_id: u64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Plan {
    Free,
    Pro,
    Team,
}

async fn on_account_event(event: Event<AccountEvent>, ctx: Context) -> Result<(), HandlerError> {
    match event.into_inner() {
        AccountEvent::SignedUp {
            user_id,
            email,
            referral,
        } => println!(
            "  [{}] user {user_id} signed up as {email}{}",
            ctx.subject(),
            referral
                .map(|r| format!(", referred by {r}"))
                .unwrap_or_default()
        ),
        AccountEvent::PlanChanged { user_id, from, to } => {
            println!("  [{}] user {user_id}: {from:?} -> {to:?}", ctx.subject())
        }
        AccountEvent::Deleted { user_id } => {
            println!("  [{}] user {user_id} deleted", ctx.subject())
        }
    }
    Ok(())
}

const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""

[[streams]]
name = "ACCOUNTS"
subjects = ["accounts.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "account_events"
stream = "ACCOUNTS"
handler = "on_account_event"
codec = "json"
dead_letter_subject = "dead_letter.account_events"
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
        .handler("on_account_event", on_account_event)
        .start(config.clone(), stop.clone())
        .await?;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);

    // Typed, from a Rust service: the publisher encodes with serde_json.
    let publisher = Publisher::new(js.clone()).with_codec(CodecKind::Json);
    let typed = [
        AccountEvent::SignedUp {
            user_id: 1,
            email: "ada@example.com".into(),
            referral: Some("grace".into()),
        },
        AccountEvent::PlanChanged {
            user_id: 1,
            from: Plan::Free,
            to: Plan::Team,
        },
    ];
    println!(
        "publishing {} typed events and 5 hand-written ones",
        typed.len()
    );
    for (i, event) in typed.iter().enumerate() {
        publisher
            .publish("accounts.typed", &format!("typed-{i}"), event)
            .await?;
    }

    // Hand-written, as another language, a script or `nats pub` would send them.
    let by_hand: [(&str, &str); 5] = [
        // An older producer: no `referral`, which has a default.
        (
            "accounts.old_producer",
            r#"{"type":"signed_up","user_id":2,"email":"bob@example.com"}"#,
        ),
        // A newer producer: a field this consumer does not know yet, ignored.
        (
            "accounts.new_producer",
            r#"{"type":"deleted","user_id":3,"reason":"requested"}"#,
        ),
        // Broken: the required `to` is missing.
        (
            "accounts.missing_field",
            r#"{"type":"plan_changed","user_id":4,"from":"pro"}"#,
        ),
        // Broken: no such variant.
        ("accounts.unknown_type", r#"{"type":"renamed","user_id":5}"#),
        // Broken: not JSON at all (a trailing comma).
        (
            "accounts.not_json",
            "{\"type\":\"deleted\",\n \"user_id\": 6,\n}",
        ),
    ];
    for (subject, json) in by_hand {
        js.publish(subject, json.as_bytes().to_vec().into())
            .await?
            .await?;
    }

    // Wait until every message is settled: 4 handled, 3 dead-lettered.
    let expected = (typed.len() + by_hand.len()) as u64;
    let stats = running.stats()["account_events"].clone();
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

    let letters = Dlq::new(js, &config)?.list(&Filter::default()).await?;
    println!(
        "\nhandled {}, dead-lettered {} (never retried: {} retries):",
        stats.acked.load(Ordering::Relaxed),
        letters.len(),
        stats.retried.load(Ordering::Relaxed)
    );
    for letter in &letters {
        println!(
            "\n  {} (reason {})\n    payload: {}\n    error:   {}",
            letter.original_subject().unwrap_or("?"),
            letter.reason().unwrap_or("?"),
            String::from_utf8_lossy(&letter.payload).replace('\n', "\\n"),
            letter.header(dead_letter::ERROR).unwrap_or("")
        );
    }
    Ok(())
}
