//! Test support for users' own tests. Enable the feature in your crate's dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! jetworker = { version = "0.1", features = ["testing"] }
//! ```
//!
//! - [`harness`]: call a handler with a payload, headers and attempt number and get the
//!   outcome the runtime would settle it with (ack, retry after a delay, dead letter with
//!   its reason), without a server: unit tests of a handler's decisions.
//! - [`server`]: a real `nats-server` (from the OS packages, or `NATS_SERVER_BIN`) on a
//!   random loopback port with a temp store, killed on drop, for integration tests;
//!   restart, kill and 3-node clusters included.
//!
//! `examples/testing_a_handler.rs` uses both the way your tests would; the platform's
//! `workers/tests/handlers.rs` runs its real handlers through the harness against a
//! test server's key-value bucket.

pub mod harness;
pub mod server;
