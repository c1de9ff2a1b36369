//! Trace propagation and structured logs: a `traceparent` on a delivery continues into
//! what the handler publishes; JSON logs carry the per-message span fields.

mod common;
mod trace_kit;

use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use jetworker::testing::server::NatsServer;
use jetworker::TraceContext;
use jetworker_suite::{Job, Mode};
use trace_kit::{publish_traced, ForwardingWorker};

#[tokio::test]
async fn traceparent_continues_through_the_handler() {
    let server = NatsServer::start().expect("server");
    let worker = ForwardingWorker::start(&server).await;
    let js = worker.js.clone();

    let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .expect("valid");
    let payload = rmp_serde::to_vec_named(&Job::ok(1)).expect("encode");
    publish_traced(&js, "jobs.1", Some((&parent.to_string(), "")), payload).await;
    // And one without: the handler's publish starts a trace of its own.
    publish_jobs(&js, &[Job::ok(2)]).await;

    wait_until(Duration::from_secs(10), "follow-ups", || async {
        count(&js, "FOLLOWUP").await == 2
    })
    .await;
    let followups = messages(&js, "FOLLOWUP").await;
    let trace_of = |subject: &str| {
        let m = followups
            .iter()
            .find(|m| m.subject.as_str() == subject)
            .expect("follow-up");
        TraceContext::parse(&header(m, "traceparent").expect("traceparent added")).expect("valid")
    };
    let continued = trace_of("followup.1");
    assert_eq!(continued.trace_id, parent.trace_id, "same trace");
    assert_ne!(continued.span_id, parent.span_id, "a new span");
    assert_ne!(trace_of("followup.2").trace_id, parent.trace_id);

    worker.stop().await;
}

/// `tracestate` travels with the trace: onto what the handler publishes, and onto the
/// dead-letter copy, which keeps the original's `traceparent`. The copy of a
/// JSON payload the MessagePack consumer could not decode says which codec to set.
#[tokio::test]
async fn tracestate_and_the_trace_reach_follow_ups_and_dead_letters() {
    let server = NatsServer::start().expect("server");
    let worker = ForwardingWorker::start(&server).await;
    let js = worker.js.clone();
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let bad = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let job = rmp_serde::to_vec_named(&Job::ok(1)).expect("encode");
    publish_traced(&js, "jobs.1", Some((good, "vendor=abc")), job).await;
    let json = br#"{"id": 2, "mode": "Ok"}"#.to_vec();
    publish_traced(&js, "jobs.2", Some((bad, "vendor=abc")), json).await;
    wait_until(
        Duration::from_secs(10),
        "follow-up and dead letter",
        || async { count(&js, "FOLLOWUP").await == 1 && count(&js, "DLQ").await == 1 },
    )
    .await;
    worker.stop().await;

    let traced = |m: &jetstream::message::StreamMessage| {
        let parent =
            TraceContext::parse(&header(m, "traceparent").expect("traceparent")).expect("valid");
        (parent, header(m, "tracestate"))
    };
    let (followup, state) = traced(&messages(&js, "FOLLOWUP").await[0]);
    assert_eq!(followup.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(state.as_deref(), Some("vendor=abc"));
    let letter = &messages(&js, "DLQ").await[0];
    let (copy, state) = traced(letter);
    assert_eq!(copy.to_string(), bad, "the original's, for replays too");
    assert_eq!(state.as_deref(), Some("vendor=abc"));
    let error = header(letter, jetworker::headers::ERROR).expect("error header");
    assert!(
        error.contains("looks like JSON") && error.contains("codec = \"json\""),
        "{error}"
    );
}

#[tokio::test]
async fn json_logs_carry_the_message_span() {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = ConfigText::new(&server.url())
        .with_jobs()
        .in_consumer("jobs", "max_deliver = 1")
        .write(dir.path());
    let (_c, js) = connect(&server.url()).await;
    // JSON through the environment here; the flag is checked by the test below.
    let mut worker = Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .args(["--config", &config_path.display().to_string(), "run"])
        .env("JETWORKER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_until(Duration::from_secs(15), "provisioned", || async {
        match js.get_stream("EVENTS").await {
            Ok(s) => s.consumer_info("jobs").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    publish_jobs(
        &js,
        &[Job {
            id: 9,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        }],
    )
    .await;
    wait_until(Duration::from_secs(10), "dead-lettered", || async {
        count(&js, "DLQ").await == 1
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let output = tokio::task::spawn_blocking(move || {
        let _ = worker.wait();
        let mut text = String::new();
        if let Some(mut err) = worker.stderr.take() {
            use std::io::Read;
            let _ = err.read_to_string(&mut text);
        }
        text
    })
    .await
    .expect("stderr");
    let settled = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "settled" && v["outcome"] == "dead_letter")
        .unwrap_or_else(|| panic!("no JSON 'settled' line in:\n{output}"));
    let span = &settled["span"];
    assert_eq!(span["name"], "message", "{settled}");
    assert_eq!(span["stream"], "EVENTS");
    assert_eq!(span["consumer"], "jobs");
    assert_eq!(span["seq"], 1);
    assert_eq!(span["attempt"], 1);
    assert_eq!(
        span["outcome"], "dead_letter",
        "the span records the outcome"
    );
    assert!(
        span["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "{settled}"
    );
    assert_eq!(settled["reason"], "permanent");
}

/// `--log-format` picks the format, wins over `JETWORKER_LOG_FORMAT`, and the variable
/// works alone. Each worker is pointed at a closed port: its first log line ("cannot
/// connect") shows the format, without a server.
#[test]
fn the_log_format_flag_and_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let config = ConfigText::new("nats://127.0.0.1:1")
        .with_jobs()
        .write(dir.path());
    let first_line = |args: &[&str], env: Option<&str>| -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_test_worker"));
        command
            .args(args)
            .args(["--config", &config.display().to_string(), "run"])
            .env("RUST_LOG", "info")
            .env_remove("JETWORKER_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(format) = env {
            command.env("JETWORKER_LOG_FORMAT", format);
        }
        let mut child = command.spawn().expect("spawn test_worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if line.contains("cannot connect") {
                    let _ = tx.send(line);
                    return;
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        line.unwrap_or_else(|_| panic!("{args:?} {env:?}: no 'cannot connect' log line"))
    };
    let is_json = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["level"] == "ERROR" && v["message"] == "cannot connect")
    };
    for (args, env, json) in [
        (&[][..], None, false),
        (&["--log-format", "json"][..], None, true),
        (&[][..], Some("json"), true),
        (&["--log-format", "human"][..], Some("json"), false),
        (&["--log-format", "json"][..], Some("human"), true),
    ] {
        let line = first_line(args, env);
        assert_eq!(is_json(&line), json, "{args:?} {env:?}: {line}");
        if !json {
            assert!(line.contains("ERROR"), "{line}");
            assert!(
                !line.contains('\x1b'),
                "no colors when stderr is not a terminal: {line:?}"
            );
        }
    }

    // An unknown format is a usage error naming the choices.
    let out = Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .args(["--log-format", "yaml", "check"])
        .output()
        .expect("run test_worker");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("human") && err.contains("json"), "{err}");
}
