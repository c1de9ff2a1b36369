//! Test support for users' own tests (feature `testing`).
//!
//! - [`harness`]: call a handler with a payload, headers and attempt number and get the
//!   outcome the runtime would settle it with, without a server.
//! - [`server`]: a real `nats-server` on a random loopback port with a temp store, for
//!   integration tests; restart, kill and 3-node clusters included.

pub mod harness;
pub mod server;
