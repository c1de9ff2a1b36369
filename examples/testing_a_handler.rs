//! Run with: `cargo test --example testing_a_handler` (the tests: unit tests without a
//! server, and one integration test that starts its own `nats-server`, which must be
//! installed), or `cargo run --example testing_a_handler` (prints each case's outcome).
//!
//! Testing a handler the way the runtime will run it, with jetworker's `testing` feature
//! (in your crate: `jetworker = { version = "...", features = ["testing"] }` under
//! `[dev-dependencies]`):
//!
//! - [`HandlerHarness`] calls the handler with a payload, headers and an attempt number
//!   and returns the [`Outcome`] the runtime would settle the message with: `Ack`,
//!   `Nak(delay)` (a retry, after the consumer's schedule) or `DeadLetter { reason, .. }`.
//!   No server, no network, milliseconds per case. It runs the runtime's own path (size
//!   check, decode with the consumer's codec, handler with timeout and panic capture, the
//!   decision table), and `with_consumer` takes the consumer's settings from your config,
//!   so the retry delays and the last attempt are the ones production has.
//! - [`NatsServer`] starts a real `nats-server` (random port, temporary store, killed on
//!   drop) for the few tests that must see the whole trip: published, handled, acked or
//!   dead-lettered on the server.
//!
//! The handler under test sends welcome emails through a mailer kept in the app's state;
//! the tests swap in a fake mailer.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jetworker::testing::harness::{Delivery, HandlerHarness};
#[cfg(test)]
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::Outcome;
#[cfg(test)]
use jetworker::Reason;
use jetworker::{Context, Event, HandlerError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedUp {
    user_id: u64,
    email: String,
}

/// How the mailer can fail.
#[derive(Debug)]
enum MailError {
    /// The mail service is down or timed out: worth retrying.
    Unavailable,
    /// The mail service asks us to slow down.
    RateLimited(Duration),
}

impl std::fmt::Display for MailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MailError::Unavailable => f.write_str("mail service unavailable"),
            MailError::RateLimited(d) => write!(f, "rate limited for {d:?}"),
        }
    }
}

impl std::error::Error for MailError {}

/// The production mailer would be an HTTP client; tests use [`FakeMailer`].
trait Mailer: Send + Sync {
    fn send(&self, to: &str, subject: &str) -> Result<(), MailError>;
}

/// The handler's state.
struct Welcome {
    mailer: Box<dyn Mailer>,
}

/// The handler under test.
async fn send_welcome(event: Event<SignedUp>, ctx: Context<Welcome>) -> Result<(), HandlerError> {
    // Bad input will not improve with retries: dead-letter it now.
    if !event.email.contains('@') {
        return Err(HandlerError::permanent(format!(
            "user {}: {:?} is not an email address",
            event.user_id, event.email
        )));
    }
    // Which brand's template to use comes in a header set by the publisher.
    let brand = ctx
        .headers()
        .get("Brand")
        .map(|v| v.as_str().to_string())
        .unwrap_or_else(|| "default".to_string());
    match ctx
        .state()
        .mailer
        .send(&event.email, &format!("Welcome to {brand}!"))
    {
        Ok(()) => Ok(()),
        Err(MailError::RateLimited(wait)) => {
            Err(HandlerError::retry_after(wait, "mailer rate limit"))
        }
        // Anything else: transient, retried on the consumer's schedule.
        Err(e) => Err(e.into()),
    }
}

/// The consumer as configured in production (here inline; yours is in `streams.toml`).
const CONFIG: &str = r#"
[connection]
servers = ["{url}"]

[worker]
ops_listen = ""

[[streams]]
name = "USERS"
subjects = ["users.>"]

[[streams]]
name = "DEAD_LETTERS"
subjects = ["dead_letter.>"]

[[consumers]]
name = "welcome_emails"
stream = "USERS"
filter_subject = "users.signed_up"
handler = "send_welcome"
codec = "json"
max_deliver = 4
backoff = ["10s", "1m", "10m"]
dead_letter_subject = "dead_letter.welcome_emails"
"#;

fn config(url: &str) -> Config {
    Config::from_toml_with_env(
        &CONFIG.replace("{url}", url),
        Path::new("streams.toml"),
        std::iter::empty(),
    )
    .expect("the example's config is valid")
}

/// A mailer that records what it sent, and fails the way it is told to.
#[derive(Default)]
struct FakeMailer {
    sent: Mutex<Vec<(String, String)>>,
    fail_with: Mutex<Option<MailError>>,
}

impl Mailer for std::sync::Arc<FakeMailer> {
    fn send(&self, to: &str, subject: &str) -> Result<(), MailError> {
        if let Some(e) = self.fail_with.lock().expect("lock").take() {
            return Err(e);
        }
        self.sent
            .lock()
            .expect("lock")
            .push((to.to_string(), subject.to_string()));
        Ok(())
    }
}

/// The handler with a fake mailer and the production consumer settings.
fn harness() -> (HandlerHarness<Welcome>, std::sync::Arc<FakeMailer>) {
    let mailer = std::sync::Arc::new(FakeMailer::default());
    let consumer = config("nats://unused:4222").consumers[0].clone();
    let harness = HandlerHarness::new(
        Welcome {
            mailer: Box::new(mailer.clone()),
        },
        send_welcome,
    )
    .with_consumer(consumer);
    (harness, mailer)
}

fn ada() -> SignedUp {
    SignedUp {
        user_id: 1,
        email: "ada@example.com".into(),
    }
}

/// `cargo run --example testing_a_handler`: the cases of the tests below, with their outcomes.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (harness, mailer) = harness();
    let show = |case: &str, outcome: Outcome| println!("{case:<58} -> {outcome:?}");
    show("a good event", harness.call(&ada()).await);
    *mailer.fail_with.lock().expect("lock") = Some(MailError::Unavailable);
    show("mail service down, attempt 1", harness.call(&ada()).await);
    *mailer.fail_with.lock().expect("lock") = Some(MailError::Unavailable);
    show(
        "mail service down, attempt 4 (the last)",
        harness.call_at(&ada(), 4).await,
    );
    *mailer.fail_with.lock().expect("lock") = Some(MailError::RateLimited(Duration::from_secs(42)));
    show("rate limited for 42s", harness.call(&ada()).await);
    let bad = SignedUp {
        user_id: 2,
        email: "not-an-address".into(),
    };
    show("an invalid address", harness.call(&bad).await);
    show(
        "a payload that is not JSON",
        harness.deliver(Delivery::new(b"{oops".to_vec())).await,
    );
    let branded = Delivery::new(serde_json::to_vec(&ada()).expect("json")).header("Brand", "Acme");
    show("with a Brand header", harness.deliver(branded).await);
    println!("\nsent: {:?}", mailer.sent.lock().expect("lock"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::App;
    use std::time::Instant;

    #[tokio::test]
    async fn a_good_event_is_acked_and_sends_one_email() {
        let (harness, mailer) = harness();
        assert_eq!(harness.call(&ada()).await, Outcome::Ack);
        assert_eq!(
            *mailer.sent.lock().expect("lock"),
            vec![(
                "ada@example.com".to_string(),
                "Welcome to default!".to_string()
            )]
        );
    }

    #[tokio::test]
    async fn the_brand_header_picks_the_template() {
        let (harness, mailer) = harness();
        let delivery =
            Delivery::new(serde_json::to_vec(&ada()).expect("json")).header("Brand", "Acme");
        assert_eq!(harness.deliver(delivery).await, Outcome::Ack);
        assert_eq!(mailer.sent.lock().expect("lock")[0].1, "Welcome to Acme!");
    }

    #[tokio::test]
    async fn an_outage_is_retried_on_the_consumers_schedule_then_dead_lettered() {
        let (harness, mailer) = harness();
        // backoff = ["10s", "1m", "10m"], max_deliver = 4, from the config.
        for (attempt, delay) in [(1, 10), (2, 60), (3, 600)] {
            *mailer.fail_with.lock().expect("lock") = Some(MailError::Unavailable);
            assert_eq!(
                harness.call_at(&ada(), attempt).await,
                Outcome::Nak(Duration::from_secs(delay)),
                "attempt {attempt}"
            );
        }
        *mailer.fail_with.lock().expect("lock") = Some(MailError::Unavailable);
        let last = harness.call_at(&ada(), 4).await;
        assert!(
            matches!(&last, Outcome::DeadLetter { reason: Reason::Exhausted, error } if error.contains("unavailable")),
            "{last:?}"
        );
        assert!(mailer.sent.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_rate_limit_is_retried_after_the_delay_it_asks_for() {
        let (harness, mailer) = harness();
        *mailer.fail_with.lock().expect("lock") =
            Some(MailError::RateLimited(Duration::from_secs(42)));
        assert_eq!(
            harness.call(&ada()).await,
            Outcome::Nak(Duration::from_secs(42))
        );
    }

    #[tokio::test]
    async fn bad_input_is_dead_lettered_at_once() {
        let (harness, mailer) = harness();
        let bad = SignedUp {
            user_id: 2,
            email: "not-an-address".into(),
        };
        assert!(matches!(
            harness.call(&bad).await,
            Outcome::DeadLetter {
                reason: Reason::Permanent,
                ..
            }
        ));
        // Not JSON, or a field missing: the handler is not even called.
        for payload in [&b"{oops"[..], br#"{"user_id": 3}"#] {
            assert!(matches!(
                harness.deliver(Delivery::new(payload.to_vec())).await,
                Outcome::DeadLetter {
                    reason: Reason::Decode,
                    ..
                }
            ));
        }
        assert!(mailer.sent.lock().expect("lock").is_empty());
    }

    /// The whole trip on a real server: the app provisions from the config, the handler
    /// runs, good events are acked and bad ones land in the dead-letter stream.
    #[tokio::test]
    async fn end_to_end_on_a_real_server() {
        let server = NatsServer::start().expect("nats-server (apt-get install nats-server)");
        let config = config(&server.url());
        let mailer = std::sync::Arc::new(FakeMailer::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let running = App::new(Welcome {
            mailer: Box::new(mailer.clone()),
        })
        .handler("send_welcome", send_welcome)
        .start(config, stop.clone())
        .await
        .expect("the worker starts");

        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        for body in [
            serde_json::to_vec(&ada()).expect("json"),
            br#"{"user_id": 2, "email": "nope"}"#.to_vec(),
        ] {
            js.publish("users.signed_up", body.into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }

        let mut dead_letters = js.get_stream("DEAD_LETTERS").await.expect("stream");
        let deadline = Instant::now() + Duration::from_secs(20);
        while (mailer.sent.lock().expect("lock").is_empty()
            || dead_letters.info().await.expect("info").state.messages == 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        let stats = running.wait().await;

        assert_eq!(mailer.sent.lock().expect("lock").len(), 1);
        let letter = dead_letters
            .get_raw_message(1)
            .await
            .expect("a dead letter");
        let header = |name| letter.headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(header("Jetworker-Reason").as_deref(), Some("permanent"));
        assert_eq!(
            header("Jetworker-Original-Subject").as_deref(),
            Some("users.signed_up")
        );
        let acked = stats["welcome_emails"]
            .acked
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(acked, 1);
    }
}
