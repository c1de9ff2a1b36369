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
//! [`problems`](ConfigError::problems) lists them. A value that does not parse (a bad
//! duration, an enum value that does not exist, with the valid ones named, a number or
//! boolean quoted in the file: `concurrency = "64"`) is one more problem, reported with
//! all the others; the error's kind is then [`ConfigErrorKind::Parse`]. Only TOML that
//! is not TOML stops at the first error. Every key, its default and meaning are listed
//! in `docs/config-reference.md`, which a test holds to the schema. Secrets (passwords, tokens, URL
//! userinfo) never appear in errors or in `Debug` output: they are held in
//! [`SecretString`](secrecy::SecretString) and [`ServerUrl`], whose `Debug` and
//! `Display` redact them.
//!
//! # Layout
//! - `keys`: every key path of the schema and the value it takes, read from the
//!   `Deserialize` impls (the reference is tested against it).
//! - `schema`: the plain data (`Deserialize + Default` structs and enums) and its accessors.
//! - `server_url`: [`ServerUrl`], [`UrlCredentials`], userinfo redaction, secret scrubbing.
//! - `load`: file and environment overrides, unknown keys, [`ConfigError`].
//! - `validate`: [`Config::problems`], every problem at once, section by section.

mod keys;
mod load;
mod schema;
mod server_url;
mod validate;

pub use load::{
    ConfigError, ConfigErrorKind, ConfigSource, ConnectionSources, DEFAULT_PATH, ENV_PREFIX,
};
pub use schema::{
    CodecKind, Config, ConnectionConfig, ConsumerConfig, DeliverPolicy, Discard, KvBucketConfig,
    Retention, Storage, StreamConfig, TlsConfig, WorkerConfig, DEFAULT_BACKOFF,
    DEFAULT_INBOX_PREFIX,
};
pub use schema::{DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_WAIT};
pub use server_url::{redact_userinfo, ServerUrl, UrlCredentials};
pub use validate::ConfigProblem;
