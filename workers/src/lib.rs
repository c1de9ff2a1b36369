//! `workers`: the real-time analytics platform built on jetworker, and the template a
//! jetworker user copies.
//!
//! Front ends publish user interactions (clicks, purchases, logins) as MessagePack to
//! `events.<kind>`; three durable consumers (`streams.toml`) hand them in batches to
//! [`handlers::count_clicks`], [`handlers::count_purchases`] and
//! [`handlers::count_logins`], which maintain real-time aggregates in the `analytics` key-value bucket: per-minute
//! counts per kind, revenue per minute and in total, distinct active users per minute,
//! purchases per product, failed logins per user and a flag for users who fail too often.
//!
//! # Layout
//! - [`events`]: the event types, their kinds and subjects, validation.
//! - [`keys`]: the bucket's key layout; free text made into keys (injective, reversible).
//! - [`counters`]: exactly-once batch commits, one compare-and-set per partition ledger
//!   — the protocol, and why redelivery, duplicates and concurrent replicas never double
//!   count.
//! - [`aggregates`]: what an event adds to its partition (pure), what a set of events
//!   implies (pure, the tests' reference), reading the aggregates back.
//! - [`handlers`]: the batch handlers and their shared state (the bucket, opened once).
//! - [`generator`]: synthetic traffic with a realistic mix, duplicates, malformed payloads.
//! - [`publish`]: rate-limited, pipelined publishing of that traffic.
//! - [`report`]: aggregates as text.
//! - [`dashboard`]: the live analytics dashboard (a read-only web page over the same
//!   aggregates).
//! - [`local_server`]: the demo's own `nats-server` when none answers (probe, start, stop).
//! - [`commands`]: the `workers` command line (`run`, `check`, `provision`, `publish`,
//!   `stats`, `dashboard`, `demo`).

pub mod aggregates;
pub mod commands;
pub mod counters;
pub mod dashboard;
pub mod events;
pub mod generator;
pub mod handlers;
pub mod keys;
pub mod local_server;
pub mod publish;
pub mod report;

pub use handlers::{app, Analytics};
