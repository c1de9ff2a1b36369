//! The platform's real handlers, tested the way a jetworker user tests theirs: through
//! `jetworker::testing::harness` (the outcome the runtime would settle each delivery
//! with), with the consumers' settings from the shipped `streams.toml`, and a real
//! `nats-server` from `jetworker::testing::server` holding the `analytics` bucket.

use std::path::Path;

use async_nats::jetstream;
use jetworker::testing::harness::{Delivery, HandlerHarness};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::{Outcome, Reason};
use workers::aggregates::{self, DEFAULT_FLAG_THRESHOLD};
use workers::events::{Login, Purchase};
use workers::handlers::{self, Analytics, BUCKET};

/// A minute far from now, so the records are this test's alone.
const TIME: u64 = 1_600_000_000_000;

async fn setup() -> (NatsServer, Config, jetstream::Context) {
    let server = NatsServer::start().expect("nats-server");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../streams.toml");
    let config = Config::load_with_env(&path, [("NATS_URL".to_string(), server.url())])
        .expect("streams.toml is valid");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provisioned");
    (server, config, js)
}

fn consumer(config: &Config, name: &str) -> jetworker::ConsumerConfig {
    config
        .consumers
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .expect("consumer in streams.toml")
}

async fn snapshot(js: &jetstream::Context) -> aggregates::Snapshot {
    let kv = js.get_key_value(BUCKET).await.expect("bucket");
    aggregates::read(&kv, [TIME / 60_000])
        .await
        .expect("aggregates")
}

#[tokio::test]
async fn a_purchase_counts_once_however_often_it_is_delivered() {
    let (_server, config, js) = setup().await;
    let harness = HandlerHarness::new(Analytics::new(), handlers::track_purchase)
        .with_consumer(consumer(&config, "track_purchases"))
        .with_jetstream(js.clone());
    let purchase = Purchase {
        id: "p-1".into(),
        user: "ann".into(),
        time: TIME,
        product: "Blue Mug".into(),
        amount: 1550,
    };

    assert_eq!(harness.call(&purchase).await, Outcome::Ack);
    // Redelivered (the ack was lost), and published again under a new message id.
    assert_eq!(harness.call_at(&purchase, 2).await, Outcome::Ack);
    assert_eq!(harness.call(&purchase).await, Outcome::Ack);

    let s = snapshot(&js).await;
    assert_eq!(s.aggregates.totals.purchases, 1);
    assert_eq!(s.aggregates.totals.revenue_cents, 1550);
    let mug = &s.aggregates.products["Blue Mug"];
    assert_eq!((mug.purchases, mug.revenue_cents), (1, 1550));
    assert_eq!(s.pending, 0);
}

#[tokio::test]
async fn bad_events_are_dead_lettered_with_their_reason() {
    let (_server, config, js) = setup().await;
    let harness = HandlerHarness::new(Analytics::new(), handlers::track_purchase)
        .with_consumer(consumer(&config, "track_purchases"))
        .with_jetstream(js.clone());

    let no_user = Purchase {
        id: "p-2".into(),
        user: String::new(),
        time: TIME,
        product: "Red Mug".into(),
        amount: 100,
    };
    assert!(matches!(
        harness.call(&no_user).await,
        Outcome::DeadLetter {
            reason: Reason::Permanent,
            ..
        }
    ));
    assert!(matches!(
        harness
            .deliver(Delivery::new(b"not msgpack".to_vec()).subject("events.purchase"))
            .await,
        Outcome::DeadLetter {
            reason: Reason::Decode,
            ..
        }
    ));
    assert_eq!(snapshot(&js).await.aggregates.totals.purchases, 0);
}

#[tokio::test]
async fn without_the_bucket_it_retries_on_the_consumers_schedule() {
    // A server where nothing was provisioned: the bucket is missing, which is transient
    // (provisioning may be under way), so the delivery is retried, then dead-lettered
    // when the consumer's attempts are used up.
    let server = NatsServer::start().expect("nats-server");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../streams.toml");
    let config = Config::load_with_env(&path, [("NATS_URL".to_string(), server.url())])
        .expect("streams.toml is valid");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let consumer = consumer(&config, "track_logins");
    let schedule = consumer
        .backoff
        .clone()
        .expect("streams.toml sets a backoff");
    let max_deliver = u64::try_from(consumer.max_deliver).expect("max_deliver > 0");
    let harness = HandlerHarness::new(Analytics::new(), handlers::track_login)
        .with_consumer(consumer)
        .with_jetstream(jetstream::new(client));
    let login = Login {
        id: "l-1".into(),
        user: "ann".into(),
        time: TIME,
        success: true,
        method: None,
    };
    assert_eq!(harness.call(&login).await, Outcome::Nak(schedule[0]));
    assert!(matches!(
        harness.call_at(&login, max_deliver).await,
        Outcome::DeadLetter {
            reason: Reason::Exhausted,
            ..
        }
    ));
}

#[tokio::test]
async fn failed_logins_flag_the_user_at_the_threshold() {
    let (_server, config, js) = setup().await;
    let harness = HandlerHarness::new(Analytics::new(), handlers::track_login)
        .with_consumer(consumer(&config, "track_logins"))
        .with_jetstream(js.clone());
    for i in 0..DEFAULT_FLAG_THRESHOLD {
        let failed = Login {
            id: format!("l-{i}"),
            user: "mallory".into(),
            time: TIME,
            success: false,
            method: Some("password".into()),
        };
        assert_eq!(harness.call(&failed).await, Outcome::Ack);
        let flagged = snapshot(&js).await.aggregates.flagged;
        assert_eq!(
            flagged.contains("mallory"),
            i + 1 >= DEFAULT_FLAG_THRESHOLD,
            "after {} failed logins",
            i + 1
        );
    }
    let s = snapshot(&js).await;
    assert_eq!(
        s.aggregates.failed_logins["mallory"],
        DEFAULT_FLAG_THRESHOLD
    );
    assert_eq!(s.aggregates.totals.failed_logins, DEFAULT_FLAG_THRESHOLD);
}
