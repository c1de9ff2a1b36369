//! Table tests for `streams.toml` loading and validation: every rule, asserting the key
//! path it reports. No server needed.

use std::path::Path;
use std::time::Duration;

use jetworker::{CodecKind, Config, ConfigError, ConfigErrorKind, DeliverPolicy, Storage};

/// A valid base config; tests append or replace parts of it.
const BASE: &str = r#"
[connection]
servers = ["nats://127.0.0.1:4222"]

[[streams]]
name = "EVENTS"
subjects = ["events.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "clicks"
stream = "EVENTS"
filter_subject = "events.click"
handler = "track_click"
dead_letter_subject = "dlq.clicks"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_env(text, &[])
}

fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml_with_env(
        text,
        Path::new("conf/streams.toml"),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn keys(err: &ConfigError) -> Vec<String> {
    err.problems().iter().map(|p| p.key.clone()).collect()
}

#[test]
fn base_config_is_valid_with_defaults() {
    let c = parse(BASE).expect("valid");
    let cons = &c.consumers[0];
    assert_eq!(cons.max_deliver, 5, "finite default max_deliver");
    assert_eq!(cons.ack_wait, Duration::from_secs(30));
    assert_eq!(cons.codec, CodecKind::Msgpack);
    assert_eq!(cons.deliver_policy, DeliverPolicy::All);
    assert_eq!(c.streams[0].storage, Storage::File);
    assert_eq!(c.worker.shutdown_grace, Duration::from_secs(30));
}

#[test]
fn durations_and_lists_parse() {
    let text = BASE.replace(
        "handler = \"track_click\"",
        "handler = \"track_click\"\nack_wait = \"2m\"\nmax_deliver = 4\nbackoff = [\"1s\", \"10s\", \"1m\"]\nhandler_timeout = \"1500ms\"\ncodec = \"json\"\ndeliver_policy = \"new\"",
    );
    let c = parse(&text).expect("valid");
    let cons = &c.consumers[0];
    assert_eq!(cons.ack_wait, Duration::from_secs(120));
    assert_eq!(
        cons.backoff.as_deref(),
        Some(
            &[
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60)
            ][..]
        )
    );
    assert_eq!(cons.handler_timeout, Duration::from_millis(1500));
    assert_eq!(cons.codec, CodecKind::Json);
    assert_eq!(cons.retry_schedule().delay_after(1), Duration::from_secs(1));
    assert_eq!(
        cons.retry_schedule().delay_after(3),
        Duration::from_secs(60)
    );
    assert_eq!(
        cons.retry_schedule().delay_after(9),
        Duration::from_secs(60),
        "past the end reuses the last"
    );
}

/// Each row: a replacement applied to BASE (from, to) and the key paths expected.
#[test]
fn validation_rules_name_their_key() {
    let table: &[(&str, &str, &str, &[&str])] = &[
        (
            "unknown stream reference",
            "stream = \"EVENTS\"",
            "stream = \"NOPE\"",
            &["consumers[0].stream"],
        ),
        (
            "duplicate stream name",
            "name = \"DLQ\"",
            "name = \"EVENTS\"",
            // DLQ renamed: dead-letter subject still captured by stream #2, name clashes
            &["streams[1].name"],
        ),
        (
            "dead-letter subject captured by no stream",
            "dead_letter_subject = \"dlq.clicks\"",
            "dead_letter_subject = \"nowhere.clicks\"",
            &["consumers[0].dead_letter_subject"],
        ),
        (
            "dead-letter loop",
            "dead_letter_subject = \"dlq.clicks\"",
            "dead_letter_subject = \"events.click\"",
            &["consumers[0].dead_letter_subject"],
        ),
        (
            "dead-letter subject with wildcard",
            "dead_letter_subject = \"dlq.clicks\"",
            "dead_letter_subject = \"dlq.*\"",
            &["consumers[0].dead_letter_subject"],
        ),
        (
            "dead-letter subject missing",
            "dead_letter_subject = \"dlq.clicks\"",
            "",
            &["consumers[0].dead_letter_subject"],
        ),
        (
            "concurrency above max ack pending",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nconcurrency = 50\nmax_ack_pending = 10",
            &["consumers[0].concurrency"],
        ),
        (
            "schedule longer than max deliver allows",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nmax_deliver = 3\nbackoff = [\"1s\", \"2s\", \"3s\"]",
            &["consumers[0].backoff"],
        ),
        (
            "zero delay in schedule",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nbackoff = [\"0s\"]",
            &["consumers[0].backoff"],
        ),
        (
            "unlimited max deliver",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nmax_deliver = -1",
            &["consumers[0].max_deliver"],
        ),
        (
            "invalid stream subject",
            "subjects = [\"events.>\"]",
            "subjects = [\"events..x\"]",
            // the consumer's filter and loop checks no longer find the stream subject
            &["streams[0].subjects[0]", "consumers[0].filter_subject"],
        ),
        (
            "invalid filter subject",
            "filter_subject = \"events.click\"",
            "filter_subject = \"events.>.click\"",
            &["consumers[0].filter_subject"],
        ),
        (
            "filter outside the stream",
            "filter_subject = \"events.click\"",
            "filter_subject = \"other.click\"",
            &["consumers[0].filter_subject"],
        ),
        (
            "overlapping stream subjects",
            "subjects = [\"dlq.>\"]",
            "subjects = [\"dlq.>\", \"events.click\"]",
            &["streams[0].subjects"],
        ),
        (
            "missing handler",
            "handler = \"track_click\"",
            "handler = \"\"",
            &["consumers[0].handler"],
        ),
        (
            "bad stream name",
            "name = \"EVENTS\"",
            "name = \"EV.ENTS\"",
            &["streams[0].name", "consumers[0].stream"],
        ),
        (
            "zero ack wait",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nack_wait = \"0s\"",
            &["consumers[0].ack_wait"],
        ),
        (
            "zero payload limit",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nmax_payload_bytes = 0",
            &["consumers[0].max_payload_bytes"],
        ),
        (
            "replicas out of range",
            "subjects = [\"events.>\"]",
            "subjects = [\"events.>\"]\nreplicas = 7",
            &["streams[0].replicas"],
        ),
        (
            "duplicate window longer than max age",
            "subjects = [\"events.>\"]",
            "subjects = [\"events.>\"]\nmax_age = \"1m\"\nduplicate_window = \"2m\"",
            &["streams[0].duplicate_window"],
        ),
        (
            "user without password",
            "servers = [\"nats://127.0.0.1:4222\"]",
            "servers = [\"nats://127.0.0.1:4222\"]\nuser = \"svc\"",
            &["connection.password"],
        ),
        (
            "two auth modes",
            "servers = [\"nats://127.0.0.1:4222\"]",
            "servers = [\"nats://127.0.0.1:4222\"]\ntoken = \"t0k3n\"\ncreds_file = \"/x.creds\"",
            &["connection"],
        ),
        (
            "client cert without key",
            "servers = [\"nats://127.0.0.1:4222\"]",
            "servers = [\"nats://127.0.0.1:4222\"]\ntls = { cert_file = \"/c.pem\" }",
            &["connection.tls.key_file"],
        ),
        (
            "no servers",
            "servers = [\"nats://127.0.0.1:4222\"]",
            "servers = []",
            &["connection.servers"],
        ),
        (
            "ping interval too short",
            "servers = [\"nats://127.0.0.1:4222\"]",
            "servers = [\"nats://127.0.0.1:4222\"]\nping_interval = \"100ms\"",
            &["connection.ping_interval"],
        ),
        (
            "bad ops address",
            "[connection]",
            "[worker]\nops_listen = \"nowhere\"\n[connection]",
            &["worker.ops_listen"],
        ),
        (
            "bad kv bucket",
            "[connection]",
            "[[kv_buckets]]\nname = \"a.b\"\nhistory = 0\n[connection]",
            &["kv_buckets[0].name", "kv_buckets[0].history"],
        ),
        (
            "unknown key",
            "handler = \"track_click\"",
            "handler = \"track_click\"\nmax_delivers = 3",
            &["consumers[0].max_delivers"],
        ),
        (
            "unknown section",
            "[connection]",
            "[workers]\nx = 1\n[connection]",
            &["workers"],
        ),
    ];
    for (name, from, to, expected) in table {
        assert!(BASE.contains(from), "{name}: base lacks {from:?}");
        let text = BASE.replacen(from, to, 1);
        let err = match parse(&text) {
            Ok(_) => panic!("{name}: expected an error"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ConfigErrorKind::Invalid, "{name}: {err}");
        let mut got = keys(&err);
        got.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{name}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("conf/streams.toml"),
            "{name}: file not named: {text}"
        );
        for key in &want {
            assert!(
                text.contains(key.as_str()),
                "{name}: key {key} not in: {text}"
            );
        }
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = BASE
        .replace("stream = \"EVENTS\"", "stream = \"NOPE\"")
        .replace(
            "handler = \"track_click\"",
            "handler = \"track_click\"\nmax_deliver = 0\ntypo = 1",
        )
        .replace(
            "subjects = [\"dlq.>\"]",
            "subjects = [\"dlq.>\"]\nreplicas = 0",
        );
    let err = parse(&text).expect_err("invalid");
    let keys = keys(&err);
    for k in [
        "consumers[0].stream",
        "consumers[0].max_deliver",
        "consumers[0].typo",
        "streams[1].replicas",
    ] {
        assert!(keys.iter().any(|got| got == k), "{k} missing from {keys:?}");
    }
}

#[test]
fn wrong_type_names_the_key() {
    let text = BASE.replace(
        "handler = \"track_click\"",
        "handler = \"track_click\"\nack_wait = \"soon\"",
    );
    let err = parse(&text).expect_err("invalid");
    assert_eq!(err.kind(), ConfigErrorKind::Parse, "{err}");
    assert_eq!(err.file(), Some("conf/streams.toml"));
    let text = err.to_string();
    assert!(text.contains("conf/streams.toml"), "{text}");
    assert!(text.contains("consumers[0].ack_wait"), "{text}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Config::load_with_env("/nonexistent/streams.toml", std::iter::empty())
        .expect_err("missing");
    assert_eq!(err.kind(), ConfigErrorKind::Read, "{err}");
    assert!(
        std::error::Error::source(&err).is_some_and(|e| e.is::<std::io::Error>()),
        "the I/O error is the source: {err:?}"
    );
    assert!(
        err.to_string().contains("/nonexistent/streams.toml"),
        "{err}"
    );
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn environment_overrides() {
    let c = parse_env(
        BASE,
        &[
            ("JETWORKER__WORKER__SHUTDOWN_GRACE", "45s"),
            ("JETWORKER__CONNECTION__NAME", "from-env"),
            (
                "JETWORKER__CONNECTION__SERVERS",
                "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
            ),
            ("NATS_URL", "nats://ignored:4222"),
        ],
    )
    .expect("valid");
    assert_eq!(c.worker.shutdown_grace, Duration::from_secs(45));
    assert_eq!(c.connection.name, "from-env");
    let servers: Vec<&str> = c.connection.servers.iter().map(|s| s.expose()).collect();
    assert_eq!(servers, ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]);
}

#[test]
fn nats_url_is_honoured() {
    let c = parse_env(BASE, &[("NATS_URL", "nats://a:4222, nats://b:4222")]).expect("valid");
    let servers: Vec<String> = c
        .connection
        .servers
        .iter()
        .map(|s| s.expose().trim().to_string())
        .collect();
    assert_eq!(servers, ["nats://a:4222", "nats://b:4222"]);
}

#[test]
fn unknown_env_key_is_reported() {
    let err = parse_env(BASE, &[("JETWORKER__WORKER__SHUTDOWN_GRAEC", "1s")]).expect_err("typo");
    assert!(
        keys(&err).iter().any(|k| k == "worker.shutdown_graec"),
        "{err}"
    );
}

#[test]
fn secrets_never_show() {
    let text = BASE.replace(
        "servers = [\"nats://127.0.0.1:4222\"]",
        "servers = [\"nats://alice:s3cr3t-pw@127.0.0.1:4222\"]\nuser = \"bob\"\npassword = \"hunter2-pw\"",
    );
    let c = parse(&text).expect("valid");
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t-pw"), "{debug}");
    assert!(!debug.contains("hunter2-pw"), "{debug}");
    assert!(debug.contains("***@127.0.0.1:4222"), "{debug}");

    // A token in an invalid config, and a wrong-typed password: neither is echoed.
    let bad = BASE.replace(
        "servers = [\"nats://127.0.0.1:4222\"]",
        "servers = [\"nats://alice:s3cr3t-pw@127.0.0.1:4222\"]\ntoken = \"t0k3n-value\"\nuser = \"x\"",
    );
    let err = parse(&bad).expect_err("invalid");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("t0k3n-value") && !shown.contains("s3cr3t-pw"),
        "{shown}"
    );
    let typed = BASE.replace(
        "servers = [\"nats://127.0.0.1:4222\"]",
        "servers = [\"nats://127.0.0.1:4222\"]\nuser = \"x\"\npassword = { nested = \"pw-in-table\" }",
    );
    let err = parse(&typed).expect_err("invalid");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("pw-in-table"), "{shown}");
    assert!(shown.contains("connection.password"), "{shown}");
}

/// `BASE` with `dlq_lines` added to the `DLQ` stream and `events_lines` to `EVENTS`.
fn with_streams(events_lines: &str, dlq_lines: &str) -> String {
    BASE.replace(
        "name = \"EVENTS\"\nsubjects = [\"events.>\"]",
        &format!("name = \"EVENTS\"\nsubjects = [\"events.>\"]\n{events_lines}"),
    )
    .replace(
        "name = \"DLQ\"\nsubjects = [\"dlq.>\"]",
        &format!("name = \"DLQ\"\nsubjects = [\"dlq.>\"]\n{dlq_lines}"),
    )
}

/// The problem messages reported for any consumer's `dead_letter_subject`.
fn dead_letter_problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(err) => err
            .problems()
            .iter()
            .filter(|p| p.key.ends_with(".dead_letter_subject"))
            .map(|p| p.message.clone())
            .collect(),
    }
}

#[test]
fn a_dead_letter_stream_that_would_not_keep_its_copies_is_refused() {
    // Each of these acknowledges a dead letter and then drops it, refuses it once full,
    // or cannot hold a copy of the largest original: the message would be lost or held.
    let cases = [
        ("", "retention = \"interest\"", "retention = \"interest\""),
        (
            "",
            "discard = \"new\"\nmax_msgs = 1000",
            "discard = \"new\"",
        ),
        (
            "",
            "discard = \"new\"\nmax_bytes = 1000000",
            "discard = \"new\"",
        ),
        (
            "max_msg_size = 4096",
            "max_msg_size = 8192",
            "max_msg_size 8192",
        ),
        ("", "max_msg_size = 1048576", "has no max_msg_size"),
    ];
    for (events, dlq, says) in cases {
        let problems = dead_letter_problems(&with_streams(events, dlq));
        assert_eq!(problems.len(), 1, "{dlq:?}: {problems:?}");
        assert!(
            problems[0].contains("\"DLQ\""),
            "names the stream: {problems:?}"
        );
        assert!(problems[0].contains(says), "{dlq:?}: {problems:?}");
        assert!(
            problems[0].contains("streams[1]."),
            "names the key: {problems:?}"
        );
    }
}

#[test]
fn a_dead_letter_stream_that_keeps_its_copies_is_accepted() {
    let cases = [
        ("", "retention = \"limits\"\nmax_age = \"7d\""),
        ("", "discard = \"old\"\nmax_msgs = 1000"),
        ("", "discard = \"new\"\nmax_age = \"7d\""),
        ("", "retention = \"workqueue\""),
        ("max_msg_size = 4096", "max_msg_size = 10240"),
    ];
    for (events, dlq) in cases {
        let text = with_streams(events, dlq);
        assert_eq!(dead_letter_problems(&text), Vec::<String>::new(), "{dlq:?}");
        parse(&text).expect("valid");
    }
    // Interest retention is fine when a consumer of the config reads the stream.
    let read = with_streams("", "retention = \"interest\"").replace(
        "[[consumers]]",
        "[[consumers]]\nname = \"dlq_reader\"\nstream = \"DLQ\"\nhandler = \"read_dead_letters\"\ndead_letter_subject = \"events.dead\"\n\n[[consumers]]",
    );
    assert_eq!(dead_letter_problems(&read), Vec::<String>::new());
}

#[test]
fn environment_values_stay_the_strings_they_are() {
    use secrecy::ExposeSecret;
    // A password of digits with a leading zero, or one that reads like a boolean, is that
    // password, from JETWORKER__ and NATS_ variables alike.
    for password in ["0123", "TRUE", "1e5", "-0"] {
        for variable in ["JETWORKER__CONNECTION__PASSWORD", "NATS_PASSWORD"] {
            let c = parse_env(
                BASE,
                &[(variable, password), ("JETWORKER__CONNECTION__USER", "007")],
            )
            .unwrap_or_else(|e| panic!("{variable}={password:?}: {e}"));
            let got = c
                .connection
                .password
                .as_ref()
                .map(|p| p.expose_secret().to_string());
            assert_eq!(got.as_deref(), Some(password), "{variable}");
            assert_eq!(c.connection.user.as_deref(), Some("007"));
        }
    }
    // Keys that want a boolean still read one from the text.
    let c = parse_env(BASE, &[("JETWORKER__CONNECTION__TLS__REQUIRED", "true")]).expect("valid");
    assert!(c.connection.tls.required);
}

#[test]
fn values_that_do_not_parse_are_reported_with_every_other_problem() {
    let text = BASE
        .replace(
            "handler = \"track_click\"",
            "handler = \"track_click\"\nack_wait = \"soon\"\nconcurrency = \"64\"\ncodec = \"yaml\"\nmax_deliver = 0",
        )
        .replace(
            "subjects = [\"dlq.>\"]",
            "subjects = [\"dlq.>\"]\nretention = \"forever\"\nreplicas = 0",
        );
    let err = parse(&text).expect_err("invalid");
    assert_eq!(err.kind(), ConfigErrorKind::Parse, "{err}");
    let mut got = keys(&err);
    got.sort();
    assert_eq!(
        got,
        [
            "consumers[0].ack_wait",
            "consumers[0].codec",
            "consumers[0].concurrency",
            "consumers[0].max_deliver",
            "streams[1].replicas",
            "streams[1].retention",
        ],
        "{err}"
    );
    let message = |key: &str| {
        err.problems()
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.message.clone())
            .unwrap_or_default()
    };
    assert!(
        message("consumers[0].codec").contains("\"msgpack\" or \"json\""),
        "the valid values are listed: {err}"
    );
    assert!(
        message("streams[1].retention").contains("\"limits\", \"interest\""),
        "{err}"
    );
    assert!(
        message("consumers[0].concurrency").contains("an integer"),
        "{err}"
    );
    let shown = err.to_string();
    assert!(
        shown.contains("conf/streams.toml: consumers[0].concurrency"),
        "key and file: {shown}"
    );
}

#[test]
fn a_quoted_number_from_the_environment_is_read_as_the_number() {
    let c = parse_env(BASE, &[("JETWORKER__CONNECTION__TLS__REQUIRED", "true")]).expect("valid");
    assert!(c.connection.tls.required);
    let text = BASE.replace(
        "[connection]",
        "[connection]\ntls = { required = \"true\" }",
    );
    let err = parse(&text).expect_err("a quoted boolean in the file");
    assert_eq!(keys(&err), ["connection.tls.required"], "{err}");
}

#[test]
fn an_unknown_key_points_to_the_reference_and_the_likely_key() {
    let text = BASE.replace(
        "handler = \"track_click\"",
        "handler = \"track_click\"\nmax_delivers = 3",
    );
    let err = parse(&text).expect_err("invalid");
    let problem = &err.problems()[0];
    assert_eq!(problem.key, "consumers[0].max_delivers");
    assert!(
        problem.message.contains("docs/config-reference.md"),
        "{problem:?}"
    );
    assert!(
        problem.message.contains("did you mean max_deliver"),
        "{problem:?}"
    );
}
