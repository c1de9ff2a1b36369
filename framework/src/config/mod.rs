//! `streams.toml`: the connection, the streams, the durable consumers and the worker
//! settings, loaded with the `config` crate and validated as a whole.
//!
//! # Sources, lowest precedence first
//! 1. the file (`--config PATH`, default `./streams.toml`);
//! 2. `NATS_URL` (comma separated), the NATS ecosystem's variable, for `connection.servers`;
//! 3. `JETWORKER__SECTION__KEY` variables, e.g. `JETWORKER__CONNECTION__SERVERS=nats://a:4222,nats://b:4222`,
//!    `JETWORKER__CONNECTION__PASSWORD=...`, `JETWORKER__WORKER__SHUTDOWN_GRACE=45s`. They reach
//!    the `connection` and `worker` sections (streams and consumers are lists: change the file).
//!
//! # Errors
//! Unknown keys and every validation problem are reported together, each line naming the
//! file and the key path (`streams.toml: consumers[1].max_deliver: ...`), in one
//! [`ConfigError`] of kind [`ConfigErrorKind::Invalid`] whose
//! [`problems`](ConfigError::problems) lists them. A value of the wrong type stops
//! parsing at that key ([`ConfigErrorKind::Parse`]). Secrets (passwords, tokens, URL
//! userinfo) never appear in errors or in `Debug` output: they are held in
//! [`SecretString`](secrecy::SecretString) and [`ServerUrl`], whose `Debug` and
//! `Display` redact them.
//!
//! # Layout
//! - `schema`: the plain data (`Deserialize + Default` structs and enums) and its accessors.
//! - `server_url`: [`ServerUrl`], [`UrlCredentials`], userinfo redaction, secret scrubbing.
//! - `load`: file and environment overrides, unknown keys, [`ConfigError`].
//! - `validate`: [`Config::problems`], every problem at once, section by section.

mod load;
mod schema;
mod server_url;
mod validate;

pub use load::{ConfigError, ConfigErrorKind, DEFAULT_PATH, ENV_PREFIX};
pub use schema::{
    CodecKind, Config, ConnectionConfig, ConsumerConfig, DeliverPolicy, Discard, KvBucketConfig,
    Retention, Storage, StreamConfig, TlsConfig, WorkerConfig, DEFAULT_BACKOFF,
    DEFAULT_INBOX_PREFIX,
};
pub use server_url::{redact_userinfo, ServerUrl, UrlCredentials};
pub use validate::ConfigProblem;
