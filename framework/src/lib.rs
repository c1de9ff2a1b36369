//! jetworker: long-lived NATS JetStream workers from `streams.toml` and plain async handlers.
//!
//! # Layout
//! - [`config`]: `streams.toml` loading, environment overrides, validation (every problem at once).
//! - [`subject`]: NATS subject rules and wildcard matching.
//! - [`provision`]: `plan(desired, actual)` (pure) and applying it to a server.
//! - [`connect`]: the connection config as an async-nats client (every auth mode).
//! - [`permissions`]: the least publish/subscribe permissions a worker's config needs.
//! - [`handler`]: handlers as plain async functions; `Event`, `Context`, `HandlerError`.
//! - [`codec`]: MessagePack (default) and JSON payloads, decoded defensively.
//! - [`outcome`]: `decide(attempted, attempt, policy) -> Outcome`, the pure decision table.
//! - [`consumer`]: the pull loop and the path of one delivery (ack, nak, dead letter).
//! - [`dead_letter`]: the dead-letter copy, its headers and its publish.
//! - [`publisher`]: typed publish with message ids, PubAck and retries; a pipelined mode.
//! - [`app`]: handlers registered by name, run, graceful shutdown.
//! - [`ops`]: `/healthz`, `/readyz` and Prometheus `/metrics` on `worker.ops_listen`.
//! - [`safety_net`]: dead letters for messages whose last delivery never settled.
//! - [`shutdown`]: SIGTERM / SIGINT handling.
//! - [`systemd`]: `Type=notify` services: READY / STOPPING / STATUS and the watchdog.
//! - [`cli`]: the subcommands every jetworker binary gets (`run`, `check`, `provision`).
//! - [`status`]: per consumer its backlog and dead letters, per stream its size (`status`).
//! - [`dlq`]: listing, showing, replaying and purging dead letters (`dlq ...`).
//! - [`trace`]: W3C `traceparent` continued from deliveries and added by the publisher.
//! - `testing` (feature `testing`): for users' tests: the handler harness (outcomes without
//!   a server) and real `nats-server` processes for integration tests.

pub mod app;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod dead_letter;
pub mod dlq;
pub mod handler;
pub mod ops;
pub mod outcome;
pub mod permissions;
pub mod provision;
pub mod publisher;
pub mod safety_net;
pub mod shutdown;
pub mod status;
pub mod subject;
pub mod systemd;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

pub use app::App;
pub use config::Config;
pub use handler::{Context, Event, HandlerError, ResultExt};
