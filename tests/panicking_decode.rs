//! A payload type whose `Deserialize` panics, and a handler that panics before its
//! future exists: the panic is caught like a handler's (retried, then dead-lettered with
//! reason `panic`), and the consumer's loop, which polls deliveries inline, goes on.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::{App, Context, Event, HandlerError};
use serde::{Deserialize, Deserializer};

/// Panics while deserializing a negative number.
#[derive(Debug)]
struct Touchy(i64);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(deserializer)?;
        assert!(n >= 0, "a negative number: {n}");
        Ok(Touchy(n))
    }
}

async fn add(touchy: Event<Touchy>, ctx: Context<Arc<AtomicU64>>) -> Result<(), HandlerError> {
    ctx.state().fetch_add(touchy.0 as u64, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn a_panic_while_decoding_is_caught_and_the_consumer_goes_on() {
    let server = NatsServer::start().expect("server");
    let (_client, js) = connect(&server.url()).await;
    let config = ConfigText::new(&server.url())
        .worker(r#"shutdown_grace = "5s""#)
        .stream("EVENTS", &["jobs.>"], "")
        .stream("DLQ", &["dlq.>"], "")
        .consumer(
            "jobs",
            "EVENTS",
            "add",
            "codec = \"json\"\nmax_deliver = 2\nbackoff = [\"100ms\"]",
        )
        .load();
    let total = Arc::new(AtomicU64::new(0));
    let worker = InProcessWorker::start(config, App::new(total.clone()).handler("add", add));
    wait_until(Duration::from_secs(10), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok()
    })
    .await;

    for payload in ["1", "-5", "2", "-7", "3"] {
        js.publish("jobs.n", payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    wait_until(
        Duration::from_secs(20),
        "good ones counted, bad ones dead-lettered",
        || async { total.load(Ordering::SeqCst) == 6 && count(&js, "DLQ").await == 2 },
    )
    .await;
    worker.stop().await;

    for letter in messages(&js, "DLQ").await {
        assert_eq!(
            header(&letter, dead_letter::REASON).as_deref(),
            Some("panic")
        );
        assert_eq!(header(&letter, dead_letter::ATTEMPTS).as_deref(), Some("2"));
        let error = header(&letter, dead_letter::ERROR).unwrap_or_default();
        assert!(error.contains("a negative number"), "{error}");
    }
}
