//! Provisioning against a real nats-server: create, idempotence, update, conflict and
//! dry run, each asserted on the server's own state.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use jetworker::{Action, Plan, ProvisionError, ProvisionErrorKind};

fn config(server: &NatsServer, events_extra: &str) -> Config {
    let text = format!(
        r#"
[connection]
servers = ["{url}"]

[[streams]]
name = "EVENTS"
subjects = ["events.>"]
max_age = "1h"
{events_extra}

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[kv_buckets]]
name = "analytics"
history = 2

[[consumers]]
name = "clicks"
stream = "EVENTS"
filter_subject = "events.click"
handler = "track_click"
max_deliver = 4
ack_wait = "20s"
dead_letter_subject = "dlq.clicks"

[[consumers]]
name = "logins"
stream = "EVENTS"
filter_subject = "events.login"
handler = "track_login"
dead_letter_subject = "dlq.logins"
"#,
        url = server.url()
    );
    Config::from_toml_with_env(&text, Path::new("streams.toml"), std::iter::empty())
        .expect("valid test config")
}

async fn connect(server: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    (client, js)
}

async fn run(
    client: &async_nats::Client,
    js: &jetstream::Context,
    config: &Config,
    dry_run: bool,
) -> Result<Plan, ProvisionError> {
    jetworker::provision(client, js, config, dry_run).await
}

fn all(plan: &Plan, word: &str) -> bool {
    plan.streams.iter().all(|s| s.action.word() == word)
        && plan.consumers.iter().all(|c| c.action.word() == word)
}

#[tokio::test]
async fn empty_server_creates_all_then_everything_is_unchanged() {
    let server = NatsServer::start().expect("nats-server");
    let (client, js) = connect(&server).await;
    let cfg = config(&server, "");

    let first = run(&client, &js, &cfg, false).await.expect("provision");
    assert!(all(&first, "create"), "{first}");

    let mut events = js.get_stream("EVENTS").await.expect("EVENTS exists");
    let info = events.info().await.expect("info");
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    let clicks = events.consumer_info("clicks").await.expect("clicks exists");
    assert_eq!(clicks.config.max_deliver, 4);
    assert_eq!(clicks.config.ack_wait, Duration::from_secs(20));
    assert_eq!(clicks.config.filter_subject, "events.click");
    assert_eq!(
        clicks.config.ack_policy,
        jetstream::consumer::AckPolicy::Explicit
    );
    assert!(
        clicks.config.backoff.is_empty(),
        "retries use nak delays, not server backoff"
    );
    assert!(clicks.config.deliver_subject.is_none(), "pull consumer");

    let second = run(&client, &js, &cfg, false)
        .await
        .expect("provision again");
    assert!(all(&second, "unchanged"), "{second}");
}

#[tokio::test]
async fn changed_max_age_is_an_update() {
    let server = NatsServer::start().expect("nats-server");
    let (client, js) = connect(&server).await;
    run(&client, &js, &config(&server, ""), false)
        .await
        .expect("provision");

    let changed = config(&server, "").clone();
    let mut changed = changed;
    changed.streams[0].max_age = Some(Duration::from_secs(7200));
    let plan = run(&client, &js, &changed, false).await.expect("update");
    match &plan.streams[0].action {
        Action::Update(changes) => {
            assert_eq!(changes.len(), 1, "{plan}");
            assert_eq!(changes[0].field, "max_age");
        }
        other => panic!("expected an update, got {other:?}"),
    }
    assert_eq!(plan.streams[1].action, Action::Unchanged);
    let mut events = js.get_stream("EVENTS").await.expect("EVENTS");
    assert_eq!(
        events.info().await.expect("info").config.max_age,
        Duration::from_secs(7200)
    );
    let again = run(&client, &js, &changed, false).await.expect("again");
    assert!(all(&again, "unchanged"), "{again}");
}

#[tokio::test]
async fn changed_storage_is_a_conflict_and_the_server_is_untouched() {
    let server = NatsServer::start().expect("nats-server");
    let (client, js) = connect(&server).await;
    run(&client, &js, &config(&server, ""), false)
        .await
        .expect("provision");

    // Storage cannot change in place; max_age could, but nothing may be applied.
    let mut changed = config(&server, "storage = \"memory\"");
    changed.streams[0].max_age = Some(Duration::from_secs(60));
    changed.consumers[0].max_deliver = 3;
    let err = run(&client, &js, &changed, false)
        .await
        .expect_err("conflict");
    assert_eq!(err.kind(), ProvisionErrorKind::Conflicts, "{err}");
    let plan = err
        .plan()
        .unwrap_or_else(|| panic!("expected conflicts, got {err}"));
    let text = plan.to_string();
    assert!(text.contains("stream EVENTS: conflict"), "{text}");
    assert!(text.contains("storage: file -> memory"), "{text}");

    let mut events = js.get_stream("EVENTS").await.expect("EVENTS");
    let info = events.info().await.expect("info");
    assert_eq!(info.config.storage, jetstream::stream::StorageType::File);
    assert_eq!(info.config.max_age, Duration::from_secs(3600), "untouched");
    let clicks = events.consumer_info("clicks").await.expect("clicks");
    assert_eq!(clicks.config.max_deliver, 4, "consumer untouched too");

    // The dry run reports the same conflict.
    let err = run(&client, &js, &changed, true)
        .await
        .expect_err("conflict");
    assert_eq!(err.kind(), ProvisionErrorKind::Conflicts, "{err}");
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let server = NatsServer::start().expect("nats-server");
    let (client, js) = connect(&server).await;
    let cfg = config(&server, "");
    let plan = run(&client, &js, &cfg, true).await.expect("dry run");
    assert!(all(&plan, "create"), "{plan}");
    let names: Vec<String> = {
        use futures::TryStreamExt;
        js.stream_names().try_collect().await.expect("names")
    };
    assert!(names.is_empty(), "dry run created {names:?}");

    // And on an existing setup, a dry run of an update leaves the old value.
    run(&client, &js, &cfg, false).await.expect("provision");
    let mut changed = cfg.clone();
    changed.consumers[0].ack_wait = Duration::from_secs(45);
    let plan = run(&client, &js, &changed, true).await.expect("dry run");
    assert_eq!(plan.consumers[0].action.word(), "update", "{plan}");
    let events = js.get_stream("EVENTS").await.expect("EVENTS");
    let clicks = events.consumer_info("clicks").await.expect("clicks");
    assert_eq!(clicks.config.ack_wait, Duration::from_secs(20));
}

#[tokio::test]
async fn consumer_settings_update_in_place() {
    let server = NatsServer::start().expect("nats-server");
    let (client, js) = connect(&server).await;
    let cfg = config(&server, "");
    run(&client, &js, &cfg, false).await.expect("provision");

    let mut changed = cfg.clone();
    changed.consumers[0].ack_wait = Duration::from_secs(45);
    changed.consumers[0].max_deliver = 7;
    changed.consumers[0].max_ack_pending = 500;
    let plan = run(&client, &js, &changed, false).await.expect("update");
    assert_eq!(plan.consumers[0].action.word(), "update", "{plan}");
    let events = js.get_stream("EVENTS").await.expect("EVENTS");
    let clicks = events.consumer_info("clicks").await.expect("clicks");
    assert_eq!(clicks.config.ack_wait, Duration::from_secs(45));
    assert_eq!(clicks.config.max_deliver, 7);
    assert_eq!(clicks.config.max_ack_pending, 500);
    let again = run(&client, &js, &changed, false).await.expect("again");
    assert!(all(&again, "unchanged"), "{again}");
}
