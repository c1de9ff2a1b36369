//! `streams.toml`: the connection, the streams, the durable consumers and the worker
//! settings, loaded with the `config` crate and validated as a whole.
//!
//! # Sources, lowest precedence first
//! 1. the `nats` CLI's selected context (ADR-21: `context.txt` and `context/NAME.json`
//!    under `$XDG_CONFIG_HOME/nats`, else `~/.config/nats`): a user-wide default;
//! 2. the file (`--config PATH`, default `./streams.toml`);
//! 3. the context `NATS_CONTEXT` names (chosen in the environment, so over the file);
//! 4. the NATS ecosystem's variables: `NATS_URL` (comma separated), `NATS_USER` /
//!    `NATS_PASSWORD`, `NATS_CREDS`, `NATS_NKEY` (a seed file);
//! 5. `JETWORKER__SECTION__KEY` variables, e.g. `JETWORKER__CONNECTION__SERVERS=nats://a:4222,nats://b:4222`,
//!    `JETWORKER__CONNECTION__PASSWORD=...`, `JETWORKER__WORKER__SHUTDOWN_GRACE=45s`. They reach
//!    the `connection` and `worker` sections (streams and consumers are lists: change the file).
//!
//! The highest source that sets credentials chooses the auth mode: credentials of
//! another mode from lower sources are dropped (`NATS_CREDS` replaces a user and
//! password of the file); one mode's settings combine (a user in the file, its password
//! in `JETWORKER__CONNECTION__PASSWORD`). [`ConnectionConfig::sources`] records where
//! each connection setting came from (`check` prints it, never a value).
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

pub use load::{
    ConfigError, ConfigErrorKind, ConfigSource, ConnectionSources, DEFAULT_PATH, ENV_PREFIX,
};
pub use schema::{
    CodecKind, Config, ConnectionConfig, ConsumerConfig, DeliverPolicy, Discard, KvBucketConfig,
    OrderedBy, PartitionsConfig, Retention, Storage, StreamConfig, TlsConfig, WorkerConfig,
    DEFAULT_BACKOFF, DEFAULT_INBOX_PREFIX,
};
pub use server_url::{redact_userinfo, ServerUrl, UrlCredentials};
pub use validate::ConfigProblem;
