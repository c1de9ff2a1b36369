//! jetworker: long-lived NATS JetStream workers from `streams.toml` and plain async handlers.
//!
//! This crate is the worker runtime: what runs inside a worker process. The operator's
//! tools (`run`, `check`, `provision`, `status`, `dlq ...`, `permissions`) are in the
//! `jetworker-cli` crate, whose `jetworker_cli::main(app)` is a worker's whole `main`.
//!
//! ```no_run
//! use jetworker::{App, Config, Context, Event, HandlerError};
//!
//! #[derive(serde::Deserialize)]
//! struct Click {
//!     user: u64,
//! }
//!
//! async fn count_click(click: Event<Click>, _ctx: Context) -> Result<(), HandlerError> {
//!     if click.user == 0 {
//!         return Err(HandlerError::permanent("no user"));
//!     }
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), jetworker::RunError> {
//! let config = Config::load("streams.toml").expect("a valid config");
//! App::new(()).handler("count_click", count_click).run(config).await
//! # }
//! ```
//!
//! # Layout
//! The path of one message reads top to bottom: `config` -> `provision` -> `app` ->
//! `consumer` (`pull` -> `delivery`) -> `handler` -> `outcome` -> `dead_letter`.
//! - `error`: [`Error`], the one error shape: a kind to match on, a message, a `source()`
//!   chain; each module has its kind enum and alias (`ConfigError = Error<ConfigErrorKind>`).
//! - `config/`: `streams.toml`: the schema (plain data), server URLs and their secrets,
//!   loading with environment overrides, validation that reports every problem at once.
//! - `subject`: NATS subject rules and wildcard overlap.
//! - `provision/`: `spec` (the config and the server's state as comparable specs) ->
//!   `plan` (`plan(desired, actual)`, pure) -> `apply` (reading the server, applying the
//!   plan); `error`, [`ProvisionError`].
//! - `connect`: the connection config as an async-nats client (every auth mode).
//! - `handler`: handlers as plain async functions; [`Event`], [`Context`], [`HandlerError`].
//! - `batch`: batch handlers, async functions of many messages at once; [`Batch`],
//!   [`BatchContext`], [`BatchFailures`].
//! - `codec`: MessagePack (default) and JSON payloads, decoded defensively.
//! - `outcome`: `decide(attempted, attempt, schedule) -> Outcome`, the pure decision table.
//! - `consumer/`: one durable consumer at work: `pull` (the pull protocol: requests
//!   sized to free slots, heartbeats, hand-back at shutdown) -> `delivery` (one `Delivery`
//!   from size check to ack / nak / dead letter); `inline`, `runtime`, [`ConsumerStats`].
//! - `partition/`: order per key across replicas: one durable consumer per partition
//!   of the subject ([`partition_of`]), each pulled by one replica at a time (`lease`:
//!   leases in a key-value bucket, takeover, shares when replicas die or join).
//! - `dead_letter`: the dead-letter copy, its headers and its publish.
//! - `safety_net`: dead letters for messages whose last delivery never settled.
//! - `publisher`: typed publish with message ids, PubAck and retries; a pipelined mode.
//! - `app`: handlers registered by name, start, run, graceful shutdown.
//! - `backoff`: the jittered, capped waits of every retry loop (connect, provision,
//!   consumer restore, dead-letter publish, publisher), so replicas do not retry in step.
//! - `ops`: `/healthz`, `/readyz` and Prometheus `/metrics` on `worker.ops_listen`.
//! - `shutdown`: SIGTERM / SIGINT handling.
//! - [`systemd`]: `Type=notify` services: READY / STOPPING / STATUS and the watchdog.
//! - `trace`: W3C `traceparent` and `tracestate` continued from deliveries and put on
//!   what the publisher sends and on dead-letter copies.
//! - `otel` (feature `otel`): [`OtlpExporter`], the spans exported over OTLP/HTTP.
//! - [`headers`]: the names of the headers jetworker puts on dead letters and replays.
//! - `testing` (feature `testing`): for users' tests: the handler harness (outcomes
//!   without a server); `testing/server/`: the nats-server launcher (real servers and
//!   clusters for integration tests, and the demo's local server).
//!
//! Modules are private; what a worker, a test or the operator's tools use is re-exported
//! here. `async_nats`, `prometheus_client` and `tokio_util` are re-exported because their
//! types (the client, JetStream contexts, the metrics registry, cancellation tokens) are
//! part of this API.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod app;
mod backoff;
mod batch;
mod codec;
mod config;
mod connect;
mod consumer;
mod dead_letter;
mod error;
mod handler;
mod ops;
#[cfg(feature = "otel")]
mod otel;
mod outcome;
mod partition;
mod provision;
mod publisher;
mod safety_net;
mod shutdown;
mod subject;
pub mod systemd;
#[cfg(feature = "testing")]
pub mod testing;
mod trace;

pub use async_nats;
pub use prometheus_client;
pub use tokio_util;

pub use error::Error;

pub use app::{App, RunError, RunErrorKind, Running};
pub use batch::{
    Batch, BatchContext, BatchFailures, BatchFuture, BatchHandler, BatchMessage, BatchOutput,
    BatchResult,
};
pub use codec::{
    check_msgpack_depth, decode, encode, DecodeError, DecodeErrorKind, EncodeError,
    EncodeErrorKind, MAX_MSGPACK_DEPTH,
};
pub use config::{
    redact_userinfo, CodecKind, Config, ConfigError, ConfigErrorKind, ConfigProblem, ConfigSource,
    ConnectionConfig, ConnectionSources, ConsumerConfig, DeliverPolicy, Discard, KvBucketConfig,
    OrderedBy, PartitionsConfig, Retention, ServerUrl, Storage, StreamConfig, TlsConfig,
    UrlCredentials, WorkerConfig, DEFAULT_BACKOFF, DEFAULT_INBOX_PREFIX, DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_WAIT, DEFAULT_PATH as DEFAULT_CONFIG_PATH,
    ENV_PREFIX as CONFIG_ENV_PREFIX,
};
pub use connect::{
    connect, connect_with, jetstream, options as connect_options, redacted_servers, AuthMode,
    ConnectError, ConnectErrorKind, Transport,
};
pub use consumer::ConsumerStats;
pub use dead_letter::{
    message_id as dead_letter_message_id, payload_bucket as dead_letter_payload_bucket,
    payload_object as dead_letter_payload_object, payload_store as dead_letter_payload_store,
    DeadLetter, DeadLetterError, DeadLetterErrorKind,
};
pub use handler::{
    Context, Event, Handler, HandlerError, HandlerErrorKind, HandlerFuture, HandlerOutput,
    ResultExt,
};
pub use ops::{Health, HealthError, HealthErrorKind, OpsError, OpsErrorKind};
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub use otel::{OtelError, OtelErrorKind, OtlpExporter};
pub use outcome::{decide, Attempted, Outcome, Reason, RetrySchedule};
pub use partition::{
    expand_partitions, partition_consumer_names, partition_lease_bucket, partition_lease_key,
    partition_of,
};
pub use provision::{
    consumer_info, desired, get_stream, plan, provision, Action, Actual, Desired, Plan,
    ProvisionError, ProvisionErrorKind, ServerVersion,
};
pub use publisher::{
    Pipeline, PipelineReport, PublishError, PublishErrorKind, Publisher, RetryPolicy,
};
pub use safety_net::{
    advisory_stream as safety_net_stream, advisory_subject as safety_net_advisory_subject,
    safety_net_consumer_name, safety_net_consumers, ADVISORY_STREAM, ADVISORY_SUBJECTS,
    HAND_OFF_TYPE as SAFETY_NET_HAND_OFF_TYPE, SAFETY_NET_CONSUMER, SAFETY_NET_MAX_DELIVER,
};
pub use shutdown::on_signals;
pub use subject::{
    overlaps as subjects_overlap, validate_filter, validate_literal, SubjectError, SubjectErrorKind,
};
pub use trace::TraceContext;

/// The names of the headers jetworker puts on dead letters and on replayed messages.
///
/// A dead letter keeps the original's headers under
/// [`ORIGINAL_PREFIX`](headers::ORIGINAL_PREFIX) and adds the others; `dlq replay`
/// restores the original headers and adds [`REPLAY_COUNT`](headers::REPLAY_COUNT). A
/// header whose name or value contains `Nats-Msg-Id` is stored escaped under
/// [`ESCAPED_HEADER`](headers::ESCAPED_HEADER); read a stored letter's headers through
/// [`restore_escaped`](headers::restore_escaped).
pub mod headers {
    pub use crate::dead_letter::{
        restore_escaped, ATTEMPTS, CONSUMER, DROPPED_HEADERS, ERROR, ESCAPED_HEADER, MAX_ERROR_LEN,
        ORIGINAL_MSG_ID, ORIGINAL_PREFIX, ORIGINAL_SUBJECT, PAYLOAD_DROPPED, PAYLOAD_OBJECT,
        REASON, REPLAY_COUNT, SEQUENCE, STREAM, TIME,
    };
    pub use crate::safety_net::ORIGINAL_MISSING;
    pub use crate::trace::{TRACEPARENT, TRACESTATE};
}
