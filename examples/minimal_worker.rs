//! Run with: `nats-server -js &` then `cargo run --example minimal_worker -- --config examples/configs/minimal.toml run`
//!
//! The smallest real worker, in the shape you copy into your own binary: one handler, the
//! config in a file, and [`jetworker_cli::main`] for the command line. Send it work with
//! the `nats` CLI (the config uses JSON so you can type payloads by hand):
//!
//! ```text
//! nats pub greetings.hello '{"name": "Ada"}'
//! ```
//!
//! Stop it with Ctrl-C (or SIGTERM): it finishes what is in flight and exits 0.
//!
//! The same binary has every built-in subcommand, which is how you check a deployment
//! before it runs:
//!
//! ```text
//! cargo run --example minimal_worker -- --config examples/configs/minimal.toml check
//! cargo run --example minimal_worker -- --config examples/configs/minimal.toml provision --dry-run
//! cargo run --example minimal_worker -- --config examples/configs/minimal.toml dlq list
//! ```

use jetworker::{App, Context, Event, HandlerError};
use serde::Deserialize;

/// The payload. Its fields are the contract with whoever publishes to `greetings.>`.
#[derive(Debug, Deserialize)]
struct Greeting {
    name: String,
}

/// Registered as `greet`, the name `handler = "greet"` in the config refers to.
async fn greet(greeting: Event<Greeting>, ctx: Context) -> Result<(), HandlerError> {
    // An empty name will not get better on retry: dead-letter it instead of retrying.
    if greeting.name.trim().is_empty() {
        return Err(HandlerError::permanent("a greeting needs a name"));
    }
    tracing::info!(name = %greeting.name, subject = ctx.subject(), "hello {}", greeting.name);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    jetworker_cli::main(App::new(()).handler("greet", greet)).await
}
