//! The built-in command line as a user meets it, through a real worker binary
//! (`test_worker`, which is `jetworker_cli::main` with one handler, `scripted`):
//! `check` without a server, `run` refusing an unregistered handler before it connects,
//! and `provision --dry-run` / `provision` against a real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use jetworker::testing::server::NatsServer;

fn worker(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("NATS_URL")
        .output()
        .expect("run test_worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// The suite's usual config ([`write_config_file`]) pointing at a port nobody listens
/// on, with the consumer's handler named `handler`: commands that must not need a server
/// fail (or succeed) without one.
fn offline_config(dir: &Path, name: &str, handler: &str, extra: &str) -> PathBuf {
    let path = write_config_file(dir, "nats://127.0.0.1:1", extra);
    let text = std::fs::read_to_string(&path)
        .expect("read config")
        .replace(
            "handler = \"scripted\"",
            &format!("handler = \"{handler}\""),
        );
    write(dir, name, &text)
}

#[test]
fn check_validates_without_a_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = offline_config(dir.path(), "good.toml", "scripted", "");
    let out = worker(&good, &["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("OK (2 streams, 1 consumer)"),
        "{}",
        text(&out.stdout)
    );

    // Several problems: all reported at once, each with the file and the key path.
    let bad = offline_config(
        dir.path(),
        "bad.toml",
        "scripted",
        "max_deliver = -1\nconcurrency = 50\nmax_ack_pending = 10\nack_wiat = \"5s\"",
    );
    let out = worker(&bad, &["check"]);
    assert_eq!(out.status.code(), Some(2), "invalid config exit code");
    let err = text(&out.stderr);
    for key in [
        "consumers[0].ack_wiat",
        "consumers[0].max_deliver",
        "consumers[0].concurrency",
    ] {
        assert!(err.contains(key), "names {key}: {err}");
    }
    assert!(err.contains("bad.toml"), "names the file: {err}");
}

#[test]
fn an_unregistered_handler_is_refused_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path(), "orders.toml", "track_orders", "");
    for args in [&["check"][..], &["run"][..]] {
        let out = worker(&config, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("consumers[0].handler")
                && err.contains("track_orders")
                && err.contains("scripted")
                && err.contains("orders.toml"),
            "{args:?}: names the key, the missing handler, what is registered and the file: {err}"
        );
        assert!(
            !err.contains("127.0.0.1:1"),
            "{args:?}: failed on the handler, not on connecting: {err}"
        );
    }
}

#[tokio::test]
async fn provision_dry_run_changes_nothing_then_provision_is_idempotent() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_file(dir.path(), &server.url(), "");
    let (_client, js) = connect(&server.url()).await;

    let out = worker(&config, &["provision", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(
        plan.contains("stream EVENTS: create") && plan.contains("consumer EVENTS/jobs: create"),
        "{plan}"
    );
    assert!(
        js.get_stream("EVENTS").await.is_err(),
        "dry run created nothing"
    );

    let out = worker(&config, &["provision"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut events = js.get_stream("EVENTS").await.expect("EVENTS created");
    assert!(
        events.consumer_info("jobs").await.is_ok(),
        "consumer created"
    );
    let created = events.info().await.expect("info").created;

    let out = worker(&config, &["provision"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = text(&out.stdout);
    assert!(
        again.contains("stream EVENTS: unchanged")
            && again.contains("consumer EVENTS/jobs: unchanged")
            && !again.contains("create"),
        "second run changes nothing: {again}"
    );
    let mut events = js.get_stream("EVENTS").await.expect("EVENTS");
    assert_eq!(events.info().await.expect("info").created, created);
}
