//! The ops endpoint against a real worker and server: `/metrics` matches known traffic
//! (outcomes, dead letters by reason, redeliveries, the duration histogram, in-flight
//! handlers, the server's pending and ack pending), `/readyz` follows the connection and
//! turns false at shutdown, `/healthz` stays up; the application's own metrics, the
//! process metrics and the build info are served with them, and the Grafana dashboard
//! and the alert rules in `deploy/` query only metrics a worker serves.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_suite::{scripted, Job, Mode, Probe};
use tokio_util::sync::CancellationToken;

fn ops_config(url: &str) -> jetworker::Config {
    let mut c = config(
        url,
        "max_deliver = 2\nbackoff = [\"200ms\"]\nconcurrency = 3",
    );
    c.worker.ops_listen = "127.0.0.1:0".into();
    c
}

#[tokio::test]
async fn metrics_match_known_traffic() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let stop = CancellationToken::new();
    let running = App::new(probe.clone())
        .handler("scripted", scripted)
        .start(ops_config(&server.url()), stop.clone())
        .await
        .expect("start");
    let addr = running.ops_address().expect("ops enabled");
    let waiter = tokio::spawn(running.wait());

    // 20 succeed, 3 fail permanently, 2 succeed on their second attempt.
    let mut jobs: Vec<Job> = (1..=20).map(Job::ok).collect();
    jobs.extend((21..=23).map(|id| Job {
        id,
        mode: Mode::Permanent,
        until: 0,
        sleep_ms: 0,
    }));
    jobs.extend((24..=25).map(|id| Job {
        id,
        mode: Mode::Fail,
        until: 1,
        sleep_ms: 0,
    }));
    publish_jobs(&js, &jobs).await;
    wait_until(Duration::from_secs(15), "all settled", || async {
        probe.succeeded_ids() == 22 && count(&js, "DLQ").await == 3
    })
    .await;
    wait_until(Duration::from_secs(10), "metrics caught up", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        metric(
            &text,
            "jetworker_messages_total{consumer=\"jobs\",outcome=\"ack\"}",
        ) == Some(22.0)
    })
    .await;
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = |series: &str| {
        metric(&text, series).unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    assert_eq!(
        m("jetworker_messages_total{consumer=\"jobs\",outcome=\"ack\"}"),
        22.0
    );
    assert_eq!(
        m("jetworker_messages_total{consumer=\"jobs\",outcome=\"retry\"}"),
        2.0
    );
    assert_eq!(
        m("jetworker_messages_total{consumer=\"jobs\",outcome=\"dead_letter\"}"),
        3.0
    );
    assert_eq!(
        m("jetworker_dead_letters_total{consumer=\"jobs\",reason=\"permanent\"}"),
        3.0
    );
    assert_eq!(
        m("jetworker_dead_letters_total{consumer=\"jobs\",reason=\"exhausted\"}"),
        0.0
    );
    assert_eq!(m("jetworker_redeliveries_total{consumer=\"jobs\"}"), 2.0);
    assert_eq!(
        m("jetworker_handler_duration_seconds_count{consumer=\"jobs\"}"),
        27.0
    );
    // Attempts per settled message: 20 acked at the first delivery, 2 at the second;
    // 3 dead-lettered (permanent) at the first.
    assert_eq!(
        m("jetworker_attempts_count{consumer=\"jobs\",outcome=\"ack\"}"),
        22.0
    );
    assert_eq!(
        m("jetworker_attempts_sum{consumer=\"jobs\",outcome=\"ack\"}"),
        24.0
    );
    assert_eq!(
        m("jetworker_attempts_bucket{le=\"1.0\",consumer=\"jobs\",outcome=\"ack\"}"),
        20.0
    );
    assert_eq!(
        m("jetworker_attempts_sum{consumer=\"jobs\",outcome=\"dead_letter\"}"),
        3.0
    );
    assert_eq!(m("jetworker_in_flight{consumer=\"jobs\"}"), 0.0);
    assert_eq!(m("jetworker_connected"), 1.0);
    // Lag gauges come from the server (polled): everything is settled.
    wait_until(Duration::from_secs(10), "lag polled", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        metric(&text, "jetworker_consumer_pending{consumer=\"jobs\"}") == Some(0.0)
            && metric(&text, "jetworker_consumer_ack_pending{consumer=\"jobs\"}") == Some(0.0)
    })
    .await;

    // Five slow jobs with 3 handler slots: 3 run, 2 wait on the server.
    let slow: Vec<Job> = (31..=35)
        .map(|id| Job {
            id,
            mode: Mode::Sleep,
            until: 1,
            sleep_ms: 6000,
        })
        .collect();
    publish_jobs(&js, &slow).await;
    wait_until(
        Duration::from_secs(10),
        "3 in flight, 3 ack pending and 2 pending on the server",
        || async {
            let (_, text) = http_get(addr, "/metrics").await;
            metric(&text, "jetworker_in_flight{consumer=\"jobs\"}") == Some(3.0)
                && metric(&text, "jetworker_consumer_ack_pending{consumer=\"jobs\"}") == Some(3.0)
                && metric(&text, "jetworker_consumer_pending{consumer=\"jobs\"}") == Some(2.0)
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "slow jobs done", || async {
        let (_, text) = http_get(addr, "/metrics").await;
        metric(
            &text,
            "jetworker_messages_total{consumer=\"jobs\",outcome=\"ack\"}",
        ) == Some(27.0)
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, "jetworker_in_flight{consumer=\"jobs\"}"),
        Some(0.0)
    );
    // The histogram: 27 quick runs, 5 of about 6s.
    let buckets = histogram_buckets(&text, "jetworker_handler_duration_seconds", "jobs");
    let at_most = |le: f64| {
        buckets
            .iter()
            .filter(|(bound, _)| *bound <= le)
            .map(|(_, n)| *n)
            .fold(0.0, f64::max)
    };
    assert_eq!(at_most(f64::INFINITY), 32.0, "{buckets:?}");
    assert_eq!(at_most(5.0), 27.0, "quick runs under 5s: {buckets:?}");
    let sum = metric(
        &text,
        "jetworker_handler_duration_seconds_sum{consumer=\"jobs\"}",
    )
    .expect("histogram sum");
    assert!(
        (30.0..60.0).contains(&sum),
        "5 x 6s and 27 quick runs: {sum}"
    );
    assert_eq!(metric(&text, "jetworker_ready"), Some(1.0));
    // Every metric deploy/OPERATIONS.md documents is served.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/OPERATIONS.md"))
        .expect("deploy/OPERATIONS.md");
    let documented: std::collections::BTreeSet<&str> = doc
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("jetworker_") && w.len() > "jetworker_".len())
        .collect();
    assert!(documented.len() >= 10, "{documented:?}");
    for name in documented {
        assert!(
            text.contains(name),
            "deploy/OPERATIONS.md documents {name}, /metrics does not serve it"
        );
    }

    stop.cancel();
    waiter.await.expect("stopped");
}

/// A histogram's cumulative buckets for one consumer: (upper bound, count), `+Inf` last.
fn histogram_buckets(text: &str, name: &str, consumer: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (labels, value) = rest.split_once("} ")?;
            if !labels.contains(&format!("consumer=\"{consumer}\"")) {
                return None;
            }
            let le = labels.split(',').find_map(|l| l.strip_prefix("le="))?;
            let le = match le.trim_matches('"') {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().ok()?,
            };
            Some((le, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        out.last().is_some_and(|(le, _)| le.is_infinite()),
        "no {name} buckets for {consumer} in:\n{text}"
    );
    out
}

#[tokio::test]
async fn readyz_follows_the_server() {
    let mut server = NatsServer::start().expect("server");
    let probe = Arc::new(Probe::default());
    let stop = CancellationToken::new();
    let running = App::new(probe)
        .handler("scripted", scripted)
        .start(ops_config(&server.url()), stop.clone())
        .await
        .expect("start");
    let addr = running.ops_address().expect("ops enabled");
    let waiter = tokio::spawn(running.wait());

    wait_until(Duration::from_secs(10), "ready", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    server.kill();
    wait_until(
        Duration::from_secs(10),
        "not ready while the server is down",
        || async { http_get(addr, "/readyz").await.0 == 503 },
    )
    .await;
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "alive while disconnected"
    );

    server.restart().expect("restart");
    wait_until(Duration::from_secs(30), "ready again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;

    stop.cancel();
    let (status, body) = http_get(addr, "/readyz").await;
    assert!(
        status == 503 || status == 0,
        "not ready while stopping: {status} {body}"
    );
    waiter.await.expect("stopped");
}

/// A start that fails (here: a provisioning conflict) stops the ops endpoint it had
/// started, so a retry in the same process can bind the port again.
#[tokio::test]
async fn a_failed_start_releases_the_ops_port() {
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    // EVENTS in memory; the config wants it on file: the server cannot change that.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["jobs.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("stream");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut config = ops_config(&server.url());
    config.worker.ops_listen = format!("127.0.0.1:{port}");
    let started = App::new(Arc::new(Probe::default()))
        .handler("scripted", scripted)
        .start(config, CancellationToken::new())
        .await;
    assert!(
        matches!(&started, Err(e) if e.kind() == jetworker::RunErrorKind::Conflicts),
        "a storage conflict fails the start"
    );
    wait_until(
        Duration::from_secs(10),
        "the ops port is free again",
        || async {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}

/// The metric names of the sample lines of a `/metrics` text (`jetworker_messages_total`,
/// `jetworker_handler_duration_seconds_bucket`, ...).
fn served_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The metric names a PromQL expression uses: words starting with one of the prefixes a
/// worker's metrics have (`jetworker_`, `process_`), and Prometheus's own `up`.
fn queried_names(expr: &str) -> Vec<String> {
    let words: Vec<&str> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .collect();
    let mut names: Vec<String> = words
        .iter()
        .filter(|w| w.starts_with("jetworker_") || w.starts_with("process_"))
        .map(|w| w.to_string())
        .collect();
    if expr.contains("up{") {
        names.push("up".to_string());
    }
    names
}

/// Every query of the dashboard (panels and variables) and of the alert rules.
fn deploy_queries() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut queries = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/jetworker.json"))
            .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr").to_string();
            queries.push((format!("dashboard panel {}", panel["title"]), expr));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push((
                format!("dashboard variable {}", variable["name"]),
                query.to_string(),
            ));
        }
    }
    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml"))
            .expect("the alert rules"),
    )
    .expect("the rules are YAML");
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr").to_string();
            queries.push((format!("alert {name}"), expr));
        }
    }
    queries
}

/// A worker's `/metrics` also serves what the application registered with
/// `App::metrics`, the process metrics and the build info; and the dashboard and the
/// alert rules in `deploy/` query only metrics it serves.
#[tokio::test]
async fn metrics_include_the_apps_own_the_process_and_what_deploy_queries() {
    use jetworker::prometheus_client::metrics::counter::Counter;
    let server = NatsServer::start().expect("server");
    let (_c, js) = connect(&server.url()).await;
    let probe = Arc::new(Probe::default());
    let orders: Counter = Counter::default();
    let stop = CancellationToken::new();
    let registered = orders.clone();
    let running = App::new(probe.clone())
        .handler("scripted", scripted)
        .metrics(move |registry| {
            registry.register("shop_orders", "Orders placed", registered.clone())
        })
        .start(ops_config(&server.url()), stop.clone())
        .await
        .expect("start");
    let addr = running.ops_address().expect("ops enabled");
    let waiter = tokio::spawn(running.wait());

    // One message of each kind of outcome the dashboard shows, so every series exists.
    publish_jobs(
        &js,
        &[
            Job::ok(1),
            Job {
                id: 2,
                mode: Mode::Permanent,
                until: 0,
                sleep_ms: 0,
            },
        ],
    )
    .await;
    wait_until(Duration::from_secs(15), "settled", || async {
        probe.succeeded_ids() == 1 && count(&js, "DLQ").await == 1
    })
    .await;
    orders.inc_by(7);

    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "shop_orders_total"), Some(7.0), "{text}");
    let version = format!(
        "jetworker_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&text, &version), Some(1.0), "{text}");
    let m = |series: &str| {
        metric(&text, series).unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    assert!(m("process_resident_memory_bytes") > 1_000_000.0);
    assert!(m("process_open_fds") >= 3.0);
    assert!(m("process_cpu_seconds_total") > 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let started = m("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "this test process started within the hour: {started} vs now {now}"
    );

    let served = served_names(&text);
    let queries = deploy_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    for (place, expr) in &queries {
        let names = queried_names(expr);
        assert!(
            !names.is_empty(),
            "{place} queries no worker metric: {expr}"
        );
        for name in names {
            assert!(
                name == "up" || served.contains(&name),
                "{place} queries {name}, which /metrics does not serve:\n{expr}\nserved: {served:?}"
            );
        }
    }

    stop.cancel();
    waiter.await.expect("stopped");
}
