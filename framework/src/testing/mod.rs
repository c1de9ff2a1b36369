//! Test support.
pub mod server;
