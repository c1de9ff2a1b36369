//! Fuzzing with property tests (no nightly toolchain here for cargo-fuzz): the config
//! loader and the payload decode path, each bounded to a few seconds in CI. Run longer
//! locally with `PROPTEST_CASES=100000 cargo test --test fuzz --release`.
//!
//! Properties: nothing panics or overflows the stack; the loader either returns a config
//! with no problems or an error that never quotes a secret; MessagePack nesting over the
//! limit is always an error; the runtime's size/decode path ends every delivery as an
//! ack or a dead letter. Failures proptest finds are saved next to this file
//! (`tests/fuzz.proptest-regressions`) and replayed first; crashes found so far are
//! kept as plain tests at the bottom.

use std::collections::HashMap;
use std::path::Path;

use jetworker::testing::harness::{Delivery, HandlerHarness};
use jetworker::Config;
use jetworker::{CodecKind, DecodeErrorKind, MAX_MSGPACK_DEPTH};
use jetworker::{Context, Event, HandlerError};
use jetworker::{Outcome, Reason};
use jetworker_cli::{Permissions, Scope};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde::Deserialize;

const PASSWORD: &str = "pw-FUZZ-SECRET-1";
const TOKEN: &str = "tok-FUZZ-SECRET-2";

/// `cases` unless PROPTEST_CASES says otherwise.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Shrinking a slow case could take long: bounded.
        max_shrink_time: 10_000,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The config loader
// ---------------------------------------------------------------------------------------

/// Values that mean something to the loader, and some that break it. Secrets are not
/// among them: they go where secrets go ([`secret_lines`], [`environment`]), and the
/// property is that they never show from there.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "5",
            "1000",
            "32",
            "2147483648",
            "1e3",
            "true",
            "false",
            "nan",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "\"30s\"",
            "\"0s\"",
            "\"1ms\"",
            "\"2m\"",
            "\"-1s\"",
            "\"7d\"",
            "\"abc\"",
            "\"99999999999999999h\"",
            "\"\"",
            "\" \"",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "\"EVENTS\"",
            "\"DLQ\"",
            "\"events.>\"",
            "\"events.click\"",
            "\"dlq.a\"",
            "\"dlq.>\"",
            "\"*\"",
            "\">\"",
            "\"a..b\"",
            "\"a b\"",
            "\"$JS.EVENT.>\"",
            "\"KV_x\"",
            "\"h\"",
            "\"msgpack\"",
            "\"json\"",
            "\"file\"",
            "\"memory\"",
            "\"workqueue\"",
            "\"last_per_subject\"",
            "\"127.0.0.1:0\"",
            "\"nats://127.0.0.1:4222\"",
            "\"nats://u:p@h:4222\"",
            "\"é\\u0000\"",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,16}".prop_map(|s| format!("{:?}", s)),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| format!(
                "{{ {} }}",
                kv.iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ]
    })
}

fn key_line(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop_oneof![
            9 => prop::sample::select(keys).prop_map(str::to_string),
            1 => "[a-z_]{1,10}",
        ],
        toml_value(),
    )
        .prop_map(|(k, v)| format!("{k} = {v}"))
}

/// Secrets where secrets go, well and badly written.
fn secret_lines() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "password = \"pw-FUZZ-SECRET-1\"",
            "password = 'pw-FUZZ-SECRET-1'",
            "password = [\"pw-FUZZ-SECRET-1\"]",
            "password = { x = \"pw-FUZZ-SECRET-1\" }",
            "password = \"pw-FUZZ-SECRET-1",
            "password = pw-FUZZ-SECRET-1",
            "token = \"tok-FUZZ-SECRET-2\"",
            "token = [\"tok-FUZZ-SECRET-2\", 1]",
            "token = \"tok-FUZZ-SECRET-2\\q\"",
            "servers = [\"nats://u:pw-FUZZ-SECRET-1@h:4222\"]",
            "servers = \"nats://u:pw-FUZZ-SECRET-1@h:4222\"",
            "servers = [\"tok-FUZZ-SECRET-2@h:4222\", 3]",
            "servers = \"tok-FUZZ-SECRET-2@h\"",
        ]),
        0..3,
    )
    .prop_map(|lines| lines.into_iter().map(str::to_string).collect())
}

fn section(header: &'static str, keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(key_line(keys), 0..8)
        .prop_map(move |lines| format!("{header}\n{}\n", lines.join("\n")))
}

const CONNECTION: &[&str] = &[
    "servers",
    "name",
    "connect_timeout",
    "request_timeout",
    "user",
    "password",
    "token",
    "nkey_seed_file",
    "creds_file",
    "inbox_prefix",
    "tls",
];
const WORKER: &[&str] = &["shutdown_grace", "ops_listen"];
const STREAM: &[&str] = &[
    "name",
    "subjects",
    "storage",
    "retention",
    "replicas",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msg_size",
    "discard",
    "duplicate_window",
    "description",
];
const CONSUMER: &[&str] = &[
    "name",
    "stream",
    "filter_subject",
    "handler",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
    "concurrency",
    "handler_timeout",
    "max_payload_bytes",
    "codec",
    "dead_letter_subject",
    "deliver_policy",
    "description",
];
const BUCKET: &[&str] = &[
    "name",
    "history",
    "storage",
    "replicas",
    "max_age",
    "description",
];

/// A streams.toml: sections in any number, keys mostly known, values mostly plausible.
fn config_text() -> impl Strategy<Value = String> {
    (
        prop::option::of(section("[connection]", CONNECTION)),
        secret_lines(),
        prop::option::of(section("[worker]", WORKER)),
        prop::collection::vec(section("[[streams]]", STREAM), 0..4),
        prop::collection::vec(section("[[consumers]]", CONSUMER), 0..4),
        prop::collection::vec(section("[[kv_buckets]]", BUCKET), 0..2),
    )
        .prop_map(|(c, secrets, w, s, cons, b)| {
            let mut text = String::new();
            if c.is_some() || !secrets.is_empty() {
                text.push_str(&c.unwrap_or_else(|| "[connection]\n".to_string()));
                for line in secrets {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            text.push_str(&w.unwrap_or_default());
            for part in s.iter().chain(&cons).chain(&b) {
                text.push_str(part);
            }
            text
        })
}

/// Overrides: plausible and broken values anywhere, secrets where secrets go.
fn environment() -> impl Strategy<Value = Vec<(String, String)>> {
    let any_key = (
        prop::sample::select(vec![
            "NATS_URL",
            "JETWORKER__CONNECTION__SERVERS",
            "JETWORKER__CONNECTION__USER",
            "JETWORKER__CONNECTION__CONNECT_TIMEOUT",
            "JETWORKER__CONNECTION__INBOX_PREFIX",
            "JETWORKER__WORKER__SHUTDOWN_GRACE",
            "JETWORKER__WORKER__OPS_LISTEN",
            "JETWORKER__STREAMS",
            "JETWORKER__NOPE",
        ]),
        prop::sample::select(vec![
            "",
            "x",
            "5s",
            "0s",
            "nats://a:4222,nats://b:4222",
            " , ,",
            "nats://u:p@h:4222, x y",
            "127.0.0.1:1",
            "[1,2]",
            "true",
            "-3",
            "$X",
            "a.*",
        ]),
    );
    let secret = prop::sample::select(vec![
        ("JETWORKER__CONNECTION__PASSWORD", "pw-FUZZ-SECRET-1"),
        ("JETWORKER__CONNECTION__TOKEN", "tok-FUZZ-SECRET-2"),
        ("JETWORKER__CONNECTION__PASSWORD", "[pw-FUZZ-SECRET-1]"),
        ("JETWORKER__CONNECTION__TOKEN", "1"),
        ("NATS_URL", "tok-FUZZ-SECRET-2@h:4222"),
        ("NATS_URL", "nats://u:pw-FUZZ-SECRET-1@h:4222, x y"),
        (
            "JETWORKER__CONNECTION__SERVERS",
            "nats://u:pw-FUZZ-SECRET-1@h:4222",
        ),
    ]);
    (
        prop::collection::vec(any_key, 0..4),
        prop::collection::vec(secret, 0..2),
    )
        .prop_map(|(general, secrets)| {
            general
                .into_iter()
                .chain(secrets)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
}

/// Loading never panics; a loaded config has no problems and everything derived from it
/// computes; no error quotes a secret.
fn check_load(text: &str, env: Vec<(String, String)>) -> Result<(), TestCaseError> {
    match Config::from_toml_with_env(text, Path::new("fuzz.toml"), env) {
        Ok(config) => {
            prop_assert!(config.problems().is_empty(), "loaded with problems");
            let shown = format!("{config:?}");
            prop_assert!(
                !shown.contains(PASSWORD) && !shown.contains(TOKEN),
                "{shown}"
            );
            let _ = Permissions::for_worker(&config, &Scope::default()).text();
            let _ = jetworker::safety_net_stream(&config);
            let desired = jetworker::desired(&config);
            let _ = jetworker::plan(&desired, &jetworker::Actual::default()).to_string();
        }
        Err(e) => {
            let shown = format!("{e} {e:?}");
            prop_assert!(
                !shown.contains(PASSWORD) && !shown.contains(TOKEN),
                "an error quotes a secret: {shown}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(200))]

    #[test]
    fn the_config_loader_survives_any_text(text in "\\PC{0,300}") {
        check_load(&text, Vec::new())?;
    }

    #[test]
    fn the_config_loader_survives_near_valid_configs(text in config_text(), env in environment()) {
        check_load(&text, env)?;
    }
}

// ---------------------------------------------------------------------------------------
// The payload decode path
// ---------------------------------------------------------------------------------------

/// A typical event type.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Click {
    id: String,
    page: String,
    at: u64,
    tags: Vec<String>,
    meta: HashMap<String, serde_json::Value>,
    parent: Option<Box<Click>>,
}

/// A recursive type made of enum variants (which rmp-serde's own depth counter skips).
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    List(Vec<Expr>),
}

fn decode_every_way(bytes: &[u8]) {
    for codec in [CodecKind::Msgpack, CodecKind::Json] {
        let _ = jetworker::decode::<Click>(codec, bytes);
        let _ = jetworker::decode::<Expr>(codec, bytes);
        let _ = jetworker::decode::<serde_json::Value>(codec, bytes);
        let _ = jetworker::decode::<Vec<Option<String>>>(codec, bytes);
        let _ = jetworker::decode::<HashMap<String, Vec<u8>>>(codec, bytes);
        let _ = jetworker_cli::decode_payload(Some(codec), bytes);
    }
    let _ = jetworker_cli::decode_payload(None, bytes);
}

/// A MessagePack value `depth` containers deep, the containers picked by `kinds`.
fn nested_msgpack(kinds: &[u8], depth: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for i in 0..depth {
        match kinds[i % kinds.len()] % 6 {
            0 => bytes.push(0x91),                                         // fixarray(1)
            1 => bytes.extend_from_slice(&[0x81, 0xa1, b'k']),             // fixmap(1), key "k"
            2 => bytes.extend_from_slice(&[0xdc, 0x00, 0x01]),             // array16(1)
            3 => bytes.extend_from_slice(&[0xdf, 0, 0, 0, 1, 0xc0]),       // map32(1), key nil
            4 => bytes.extend_from_slice(&[0x81, 0xa3, b'N', b'e', b'g']), // {"Neg": ..}
            _ => bytes.extend_from_slice(&[0x92, 0x01]),                   // [1, ..]
        }
    }
    bytes.push(0x01);
    // Close the two-element arrays with a second element where needed.
    let pairs = (0..depth)
        .filter(|i| kinds[i % kinds.len()] % 6 == 5)
        .count();
    bytes.extend(std::iter::repeat_n(0x02, pairs));
    bytes
}

/// A random JSON-like value, encoded both ways, to mutate.
fn encoded_value() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        prop::num::f64::NORMAL.prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::hash_map("[a-z]{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| {
        (
            rmp_serde::to_vec_named(&v).unwrap_or_default(),
            serde_json::to_vec(&v).unwrap_or_default(),
        )
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(
        prop_oneof![
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
        ],
        0..4,
    )
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Flip(i, b) => {
                if let Some(byte) = bytes.get_mut(i % len) {
                    *byte ^= b | 1;
                }
            }
            Mutation::Insert(i, b) => {
                let at = (i % len).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

async fn accept(_value: Event<serde_json::Value>, _ctx: Context<()>) -> Result<(), HandlerError> {
    Ok(())
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn decoding_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_every_way(&bytes);
    }

    #[test]
    fn decoding_survives_mutated_valid_payloads(
        (msgpack, json) in encoded_value(),
        how in mutations(),
    ) {
        // Unmutated, both decode as a JSON value.
        prop_assert!(jetworker::decode::<serde_json::Value>(CodecKind::Msgpack, &msgpack).is_ok());
        prop_assert!(jetworker::decode::<serde_json::Value>(CodecKind::Json, &json).is_ok());
        decode_every_way(&mutate(msgpack, &how));
        decode_every_way(&mutate(json, &how));
    }

    #[test]
    fn msgpack_nesting_over_the_limit_is_always_an_error(
        kinds in prop::collection::vec(any::<u8>(), 1..8),
        depth in 0usize..400,
    ) {
        let bytes = nested_msgpack(&kinds, depth);
        let scan = jetworker::check_msgpack_depth(&bytes, MAX_MSGPACK_DEPTH);
        prop_assert_eq!(scan.is_err(), depth > MAX_MSGPACK_DEPTH, "scan of depth {}", depth);
        if depth > MAX_MSGPACK_DEPTH {
            prop_assert!(jetworker::decode::<serde_json::Value>(CodecKind::Msgpack, &bytes).is_err());
            prop_assert!(jetworker::decode::<Expr>(CodecKind::Msgpack, &bytes).is_err());
        }
        decode_every_way(&bytes);
    }
}

proptest! {
    #![proptest_config(cases(200))]

    /// Through the runtime's own path (size check with headers, decode, handler): every
    /// delivery ends as an ack or a dead letter for decode / too_large, never a panic.
    #[test]
    fn the_runtime_path_settles_every_payload(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            encoded_value().prop_map(|(m, _)| m),
        ],
        header in "[ -~]{0,300}",
        limit in 1i64..512,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let harness = HandlerHarness::new((), accept).max_payload_bytes(limit);
        let outcome = runtime.block_on(harness.deliver(
            Delivery::new(payload.clone()).header("X-Fuzz", &header),
        ));
        let fits = (payload.len() as i64) < limit;
        match outcome {
            Outcome::Ack => prop_assert!(fits),
            Outcome::DeadLetter { reason: Reason::Decode | Reason::TooLarge, .. } => {}
            other => prop_assert!(false, "unexpected outcome {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Crashes found, kept
// ---------------------------------------------------------------------------------------

/// Found while writing these targets: a recursive enum nested deeper than the thread's
/// stack aborted the process (rmp-serde does not count enum variants as depth).
#[test]
fn regression_recursive_enum_nesting_is_an_error_not_a_stack_overflow() {
    let bytes = nested_msgpack(&[4], 200_000);
    let err = jetworker::decode::<Expr>(CodecKind::Msgpack, &bytes).expect_err("too deep");
    assert_eq!(err.kind(), DecodeErrorKind::TooDeep, "{err}");
    // On a small stack too (a spawned thread's), as the runtime's worker threads have.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || jetworker::decode::<Expr>(CodecKind::Msgpack, &bytes).is_err())
        .expect("thread")
        .join()
        .map(|refused| assert!(refused))
        .expect("no stack overflow");
}

/// Found by `the_config_loader_survives_near_valid_configs`: a TOML syntax error quoted
/// the offending source line, secret and all.
#[test]
fn regression_toml_syntax_errors_do_not_quote_secrets() {
    for text in [
        "[[kv_buckets]]\nname = 0\nname = { a = \"tok-FUZZ-SECRET-2@h\" }\n",
        "[connection]\npassword = \"pw-FUZZ-SECRET-1\npassword = 1\n",
    ] {
        let err = Config::from_toml_with_env(text, Path::new("fuzz.toml"), Vec::new())
            .expect_err("invalid TOML");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("FUZZ-SECRET"), "{shown}");
        assert!(shown.contains("line"), "the position is kept: {shown}");
    }
}
