//! Test support for users' own tests, and the nats-server launcher. Enable the feature in
//! your crate's dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! jetworker = { version = "0.1", features = ["testing"] }
//! ```
//!
//! - [`harness`]: call a handler with a payload, headers and attempt number and get the
//!   outcome the runtime would settle it with (ack, retry after a delay, dead letter with
//!   its reason), without a server: unit tests of a handler's decisions.
//! - [`server/`](server): the one launcher of real `nats-server` processes (from the OS
//!   packages, or `NATS_SERVER_BIN`). For integration tests: a random loopback port, a
//!   temp store, killed on drop; restart, kill and 3-node clusters included. With
//!   [`ServerOptions`](server::ServerOptions) also a fixed loopback address and a data
//!   directory kept across runs: the platform's `workers demo` starts its local server
//!   with it. A watchdog stops a server whose owner died, and [`probe`](server::probe)
//!   tells what answers at an address.
//!
//! `examples/testing_a_handler.rs` uses both the way your tests would; the platform's
//! `workers/tests/handlers.rs` runs its real handlers through the harness against a
//! test server's key-value bucket.

pub mod harness;
pub mod server;
