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
//! file and the key path (`streams.toml: consumers[1].max_deliver: ...`). A value of the
//! wrong type stops parsing at that key. Secrets (passwords, tokens, URL userinfo) never
//! appear in errors or in `Debug` output: they are held in [`SecretString`] and
//! [`ServerUrl`], whose `Debug` and `Display` redact them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::subject;

/// Environment variable prefix for overrides (`JETWORKER__WORKER__SHUTDOWN_GRACE`).
pub const ENV_PREFIX: &str = "JETWORKER";
/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "streams.toml";

/// The whole of `streams.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    /// How to reach and authenticate to the NATS servers.
    pub connection: ConnectionConfig,
    /// Process-wide worker settings.
    pub worker: WorkerConfig,
    /// The streams jetworker provisions.
    pub streams: Vec<StreamConfig>,
    /// The durable pull consumers, each bound to a handler by name.
    pub consumers: Vec<ConsumerConfig>,
    /// Key-value buckets the handlers keep state in.
    pub kv_buckets: Vec<KvBucketConfig>,
    /// Where this config was read from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// A server URL whose `Debug` and `Display` never show a password or token in it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl(String);

impl<'de> Deserialize<'de> for ServerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Trimmed: lists from `NATS_URL` are often written "a, b".
        Ok(ServerUrl(String::deserialize(d)?.trim().to_string()))
    }
}

impl ServerUrl {
    /// Wraps a URL string as given (`nats://host:4222`, `tls://user:pass@host`, `host:4222`).
    pub fn new(url: impl Into<String>) -> Self {
        ServerUrl(url.into())
    }

    /// The full URL, userinfo included: for connecting only, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any `user:password@` or `token@` replaced by `***@`.
    pub fn redacted(&self) -> String {
        redact_userinfo(&self.0)
    }

    /// The URL without its userinfo: what is handed to the client library, whose own
    /// debug logs print server addresses in full.
    pub fn without_userinfo(&self) -> String {
        match split_userinfo(&self.0) {
            Some((scheme, _, host)) => format!("{scheme}{host}"),
            None => self.0.clone(),
        }
    }

    /// Credentials written into the URL, as the NATS clients read them:
    /// `nats://user:password@host` is user/password auth, `nats://token@host` token auth.
    /// Percent-escapes (`%40` for `@`, ...) are decoded.
    pub fn credentials(&self) -> Option<UrlCredentials> {
        let (_, userinfo, _) = split_userinfo(&self.0)?;
        if userinfo.is_empty() {
            return None;
        }
        Some(match userinfo.split_once(':') {
            Some((user, password)) => UrlCredentials::UserPassword {
                user: percent_decode(user),
                password: SecretString::from(percent_decode(password)),
            },
            None => UrlCredentials::Token(SecretString::from(percent_decode(userinfo))),
        })
    }
}

/// Credentials found in a server URL. `Debug` shows the user, never the secret.
#[derive(Clone)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: SecretString,
    },
    /// `token@`.
    Token(SecretString),
}

impl UrlCredentials {
    /// True when both carry the same credentials (compared in full, never printed).
    pub fn same_as(&self, other: &UrlCredentials) -> bool {
        use secrecy::ExposeSecret;
        match (self, other) {
            (
                UrlCredentials::UserPassword { user, password },
                UrlCredentials::UserPassword {
                    user: user2,
                    password: password2,
                },
            ) => user == user2 && password.expose_secret() == password2.expose_secret(),
            (UrlCredentials::Token(a), UrlCredentials::Token(b)) => {
                a.expose_secret() == b.expose_secret()
            }
            _ => false,
        }
    }
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"[REDACTED]")
                .finish(),
            UrlCredentials::Token(_) => f.write_str("Token([REDACTED])"),
        }
    }
}

/// `(scheme://, userinfo, rest)` when the URL has a userinfo part.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// Decodes `%XX` escapes (invalid ones are kept as written; invalid UTF-8 is replaced).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the userinfo part of a URL (`scheme://userinfo@host`) with `***`.
pub fn redact_userinfo(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, host)) => format!("{scheme}***@{host}"),
        None => url.to_string(),
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How to reach and authenticate to NATS. Every auth mode the server offers is here;
/// set at most one of user+password, token, nkey seed file and creds file. Credentials
/// written into a server URL (`nats://user:password@host`, `nats://token@host`) are
/// used when none of those is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConnectionConfig {
    /// Server URLs; the client picks one and fails over to the others.
    pub servers: Vec<ServerUrl>,
    /// Client name shown by the server (`nats server report connections`).
    pub name: String,
    /// How long a connection attempt may take before it is an error.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a JetStream API request (stream info, create, ...) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the client pings the server; two unanswered pings close the connection
    /// and start a reconnect. The client library's default (60s) lets a black-holed
    /// connection go unnoticed for minutes while every handler slot is busy (no pull
    /// heartbeats are expected then).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// User for user/password auth.
    pub user: Option<String>,
    /// Password for user/password auth (better given as `JETWORKER__CONNECTION__PASSWORD`).
    pub password: Option<SecretString>,
    /// Token auth (better given as `JETWORKER__CONNECTION__TOKEN`).
    pub token: Option<SecretString>,
    /// File holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and nkey seed), for decentralized auth.
    pub creds_file: Option<PathBuf>,
    /// Prefix of this worker's reply inboxes (default `_INBOX`). A prefix of its own
    /// (`_INBOX_analytics`) lets the server permissions give the worker its own replies
    /// only (`subscribe: "_INBOX_analytics.>"`) instead of every client's (`_INBOX.>`).
    pub inbox_prefix: Option<String>,
    /// TLS settings.
    pub tls: TlsConfig,
}

impl ConnectionConfig {
    /// The prefix of reply inboxes: `inbox_prefix`, or the client library's `_INBOX`.
    pub fn inbox_prefix(&self) -> &str {
        self.inbox_prefix.as_deref().unwrap_or(DEFAULT_INBOX_PREFIX)
    }
}

/// The NATS clients' default reply inbox prefix.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            servers: vec![ServerUrl::new("nats://127.0.0.1:4222")],
            name: "jetworker".to_string(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            inbox_prefix: None,
            tls: TlsConfig::default(),
        }
    }
}

/// TLS and mutual TLS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// CA certificate(s) (PEM) to verify the server with, in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Process-wide worker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// After SIGTERM, how long in-flight handlers may run before the process exits anyway.
    /// Keep it below the orchestrator's kill timeout (Kubernetes `terminationGracePeriodSeconds`).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Address of the ops HTTP endpoint (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    pub ops_listen: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            shutdown_grace: Duration::from_secs(30),
            ops_listen: "127.0.0.1:9090".to_string(),
        }
    }
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk: survives server restarts.
    #[default]
    File,
    /// In memory: fast, lost on restart.
    Memory,
}

/// When a stream removes messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Keep until a limit (age, bytes, count) is hit.
    #[default]
    Limits,
    /// Keep while some consumer has not acknowledged it.
    Interest,
    /// Remove once acknowledged (one consumer per subject).
    #[serde(alias = "work_queue")]
    Workqueue,
}

/// What a full stream does with a new message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Drop the oldest messages.
    #[default]
    Old,
    /// Refuse the new message.
    New,
}

/// A stream to provision.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// Stream name (no spaces, dots, `*`, `>`).
    pub name: String,
    /// Subjects the stream captures (wildcards allowed).
    pub subjects: Vec<String>,
    /// File or memory.
    pub storage: Storage,
    /// Limits, interest or workqueue.
    pub retention: Retention,
    /// Number of replicas (1 on a single server, 3 or 5 in a cluster).
    pub replicas: u32,
    /// Oldest message age kept; unset means unlimited.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Total bytes kept; unset means unlimited.
    pub max_bytes: Option<i64>,
    /// Messages kept; unset means unlimited.
    pub max_msgs: Option<i64>,
    /// Largest message accepted, in bytes; unset means the server's max payload.
    pub max_msg_size: Option<i32>,
    /// What happens when a limit is hit.
    pub discard: Discard,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Option<Duration>,
    /// Free text shown by `nats stream info`.
    pub description: Option<String>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: String::new(),
            subjects: Vec::new(),
            storage: Storage::File,
            retention: Retention::Limits,
            replicas: 1,
            max_age: None,
            max_bytes: None,
            max_msgs: None,
            max_msg_size: None,
            discard: Discard::Old,
            duplicate_window: None,
            description: None,
        }
    }
}

/// A JetStream key-value bucket to provision.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct KvBucketConfig {
    /// Bucket name (letters, digits, `_` and `-`).
    pub name: String,
    /// Values kept per key (1 to 64).
    pub history: i64,
    /// File or memory.
    pub storage: Storage,
    /// Number of replicas.
    pub replicas: u32,
    /// Entries older than this are removed; unset keeps them.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Free text.
    pub description: Option<String>,
}

impl Default for KvBucketConfig {
    fn default() -> Self {
        KvBucketConfig {
            name: String::new(),
            history: 1,
            storage: Storage::File,
            replicas: 1,
            max_age: None,
            description: None,
        }
    }
}

/// How payloads are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodecKind {
    /// MessagePack through rmp-serde (compact, the default).
    #[default]
    Msgpack,
    /// JSON through serde_json.
    Json,
}

/// Where a new durable consumer starts reading. Used only when the consumer is created:
/// an existing consumer keeps its position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    /// Every message in the stream.
    #[default]
    All,
    /// Only messages published after creation.
    New,
    /// The last message, then new ones.
    Last,
    /// The last message per subject, then new ones.
    LastPerSubject,
}

/// Spells config enums as `streams.toml` does (`file`, `workqueue`, `last_per_subject`).
macro_rules! display_as_config {
    ($($ty:ident { $($variant:ident => $text:literal),+ $(,)? })+) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($ty::$variant => $text),+ })
            }
        }
    )+};
}

display_as_config! {
    Storage { File => "file", Memory => "memory" }
    Retention { Limits => "limits", Interest => "interest", Workqueue => "workqueue" }
    Discard { Old => "old", New => "new" }
    CodecKind { Msgpack => "msgpack", Json => "json" }
    DeliverPolicy { All => "all", New => "new", Last => "last", LastPerSubject => "last_per_subject" }
}

/// Default retry delays when a consumer sets no `backoff`; attempts past the end of the
/// list reuse its last entry.
pub const DEFAULT_BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// A durable pull consumer, run by the handler it names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConsumerConfig {
    /// Durable name.
    pub name: String,
    /// The stream it reads (declared in `streams`).
    pub stream: String,
    /// Only messages on subjects matching this (wildcards allowed); unset reads the whole stream.
    pub filter_subject: Option<String>,
    /// Name of the registered handler function.
    pub handler: String,
    /// How long the server waits for an ack before redelivering (a crashed worker's
    /// messages come back after this). Long handlers extend it with progress acks.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered. Finite: a poison message must end.
    pub max_deliver: i64,
    /// Delay before retry n (1-based) after a failed attempt n. Nak-with-delay, not the
    /// server's `backoff` (which only applies to ack timeouts). Attempts past the end
    /// reuse the last entry.
    #[serde(deserialize_with = "duration_list")]
    pub backoff: Option<Vec<Duration>>,
    /// Unacknowledged messages the server lets out across all replicas.
    pub max_ack_pending: i64,
    /// Handlers run at once in this process for this consumer.
    pub concurrency: i64,
    /// A handler running longer is cancelled and its message retried.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Larger messages (payload plus headers) are dead-lettered with reason `too_large`
    /// without decoding.
    pub max_payload_bytes: i64,
    /// Payload encoding.
    pub codec: CodecKind,
    /// Where failed messages go: a literal subject captured by a declared stream.
    pub dead_letter_subject: String,
    /// Where a new consumer starts.
    pub deliver_policy: DeliverPolicy,
    /// Free text shown by `nats consumer info`.
    pub description: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            name: String::new(),
            stream: String::new(),
            filter_subject: None,
            handler: String::new(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            backoff: None,
            max_ack_pending: 1000,
            concurrency: 32,
            handler_timeout: Duration::from_secs(60),
            max_payload_bytes: 1024 * 1024,
            codec: CodecKind::Msgpack,
            dead_letter_subject: String::new(),
            deliver_policy: DeliverPolicy::All,
            description: None,
        }
    }
}

impl ConsumerConfig {
    /// The retry schedule and delivery limit, as the decision uses them.
    pub fn retry_schedule(&self) -> crate::outcome::RetrySchedule {
        crate::outcome::RetrySchedule {
            max_deliver: self.max_deliver_count(),
            schedule: match &self.backoff {
                Some(list) if !list.is_empty() => list.clone(),
                _ => DEFAULT_BACKOFF.to_vec(),
            },
        }
    }

    /// `max_deliver` as the unsigned count it is once validated.
    pub fn max_deliver_count(&self) -> u64 {
        u64::try_from(self.max_deliver).unwrap_or(1).max(1)
    }

    /// `concurrency` as the count it is once validated.
    pub fn concurrency_limit(&self) -> usize {
        usize::try_from(self.concurrency).unwrap_or(1).max(1)
    }
}

/// One problem in a config: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Key path, e.g. `consumers[1].max_deliver`.
    pub key: String,
    /// What is wrong and, where useful, what to do.
    pub message: String,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("{file}: {message}")]
    Load {
        /// The config file.
        file: String,
        /// What went wrong (never containing secret values).
        message: String,
    },
    /// The config parsed but is not valid; every problem is listed.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        /// The config file.
        file: String,
        /// All problems found.
        problems: Vec<ConfigProblem>,
    },
}

impl ConfigError {
    /// The problems, when the config was invalid (empty for load errors).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Load { .. } => &[],
        }
    }
}

fn render_problems(file: &str, problems: &[ConfigProblem]) -> String {
    let mut out = format!(
        "{file}: {} problem{} in the config",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  {file}: {}: {}", p.key, p.message));
    }
    out
}

impl Config {
    /// Loads `path` with overrides from the process environment, then validates it.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
            file: file.clone(),
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::from_toml_with_env(&text, path, env)
    }

    /// Parses TOML text as if read from `source`, applying `env` overrides, and validates it.
    pub fn from_toml_with_env(
        text: &str,
        source: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = source.display().to_string();
        let load_error = |message: String| ConfigError::Load {
            file: file.clone(),
            message,
        };

        let mut nats_url = None;
        let mut overrides: HashMap<String, String> = HashMap::new();
        for (k, v) in env {
            if k == "NATS_URL" && !v.trim().is_empty() {
                nats_url = Some(v);
            } else if k.starts_with(&format!("{ENV_PREFIX}__")) {
                overrides.insert(k, v);
            }
        }
        let servers_key = format!("{ENV_PREFIX}__CONNECTION__SERVERS");
        if let Some(url) = nats_url {
            overrides.entry(servers_key).or_insert(url);
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("connection.servers")
            .source(Some(overrides));

        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| load_error(sanitize(&e.to_string())))?;

        let mut unknown = Vec::new();
        let mut record_unknown =
            |path: serde_ignored::Path| unknown.push(key_path(&path.to_string()));
        let ignored = serde_ignored::Deserializer::new(raw, &mut record_unknown);
        let mut config: Config = serde_path_to_error::deserialize(ignored).map_err(|e| {
            let key = e.path().to_string();
            let message = if SECRET_KEYS.iter().any(|k| key.ends_with(k)) {
                "invalid value (not shown: it is a secret); expected a string".to_string()
            } else {
                sanitize(&e.into_inner().to_string())
            };
            load_error(format!("{key}: {message}"))
        })?;
        config.source = source.to_path_buf();

        let mut problems: Vec<ConfigProblem> = unknown
            .into_iter()
            .map(|key| ConfigProblem {
                message: "unknown key (a typo? see the documented keys in the README)".to_string(),
                key,
            })
            .collect();
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { file, problems })
        }
    }

    /// Every validation problem in this config (empty when valid). Pure: no I/O.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut add = |key: String, message: String| problems.push(ConfigProblem { key, message });

        // connection
        let c = &self.connection;
        if c.servers.is_empty() {
            add(
                "connection.servers".into(),
                "at least one server URL is required".into(),
            );
        }
        for (i, url) in c.servers.iter().enumerate() {
            if url.expose().trim().is_empty() || url.expose().contains(char::is_whitespace) {
                add(
                    format!("connection.servers[{i}]"),
                    format!("not a server URL: {url}"),
                );
            }
        }
        // One client, one set of credentials: URLs may not disagree.
        let mut first_credentials: Option<(usize, UrlCredentials)> = None;
        for (i, url) in c.servers.iter().enumerate() {
            let Some(found) = url.credentials() else {
                continue;
            };
            match &first_credentials {
                None => first_credentials = Some((i, found)),
                Some((first, known)) if !known.same_as(&found) => add(
                    format!("connection.servers[{i}]"),
                    format!("carries other credentials in its URL than servers[{first}]: one client authenticates one way; set connection.user/password or token instead"),
                ),
                Some(_) => {}
            }
        }
        let modes = [
            c.user.is_some() || c.password.is_some(),
            c.token.is_some(),
            c.nkey_seed_file.is_some(),
            c.creds_file.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            add(
                "connection".into(),
                "more than one auth mode is set (user/password, token, nkey_seed_file, creds_file): keep one".into(),
            );
        }
        if c.user.is_some() != c.password.is_some() {
            add(
                if c.user.is_some() {
                    "connection.password"
                } else {
                    "connection.user"
                }
                .into(),
                "user and password go together: set both or neither".into(),
            );
        }
        if c.tls.cert_file.is_some() != c.tls.key_file.is_some() {
            add(
                if c.tls.cert_file.is_some() {
                    "connection.tls.key_file"
                } else {
                    "connection.tls.cert_file"
                }
                .into(),
                "a client certificate needs its key (cert_file and key_file go together)".into(),
            );
        }
        if let Some(prefix) = &c.inbox_prefix {
            if let Err(e) = subject::validate_literal(prefix) {
                add("connection.inbox_prefix".into(), format!("{e}: {prefix:?}"));
            } else if prefix.starts_with('$') {
                add(
                    "connection.inbox_prefix".into(),
                    format!("{prefix:?}: subjects starting with '$' are the server's own"),
                );
            }
        }
        if c.connect_timeout.is_zero() {
            add(
                "connection.connect_timeout".into(),
                "must be more than 0s".into(),
            );
        }
        if c.request_timeout.is_zero() {
            add(
                "connection.request_timeout".into(),
                "must be more than 0s".into(),
            );
        }
        if c.ping_interval < Duration::from_secs(1) {
            add(
                "connection.ping_interval".into(),
                "must be at least 1s".into(),
            );
        }

        // worker
        if !self.worker.ops_listen.is_empty()
            && self
                .worker
                .ops_listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            add(
                "worker.ops_listen".into(),
                format!(
                    "not an address: {:?} (expected e.g. \"127.0.0.1:9090\", or \"\" to disable)",
                    self.worker.ops_listen
                ),
            );
        }

        // streams
        let mut stream_names: HashMap<&str, usize> = HashMap::new();
        for (i, s) in self.streams.iter().enumerate() {
            let key = |field: &str| format!("streams[{i}].{field}");
            if let Err(why) = validate_name(&s.name) {
                add(key("name"), why);
            } else if let Some(first) = stream_names.insert(&s.name, i) {
                add(
                    key("name"),
                    format!("duplicate stream name {:?} (also streams[{first}])", s.name),
                );
            }
            if s.subjects.is_empty() {
                add(key("subjects"), "at least one subject is required".into());
            }
            let mut seen = HashSet::new();
            for (j, subj) in s.subjects.iter().enumerate() {
                if let Err(e) = subject::validate_filter(subj) {
                    add(
                        format!("streams[{i}].subjects[{j}]"),
                        format!("{e}: {subj:?}"),
                    );
                } else if !seen.insert(subj) {
                    add(
                        format!("streams[{i}].subjects[{j}]"),
                        format!("duplicate subject {subj:?}"),
                    );
                }
            }
            if s.replicas == 0 || s.replicas > 5 {
                add(
                    key("replicas"),
                    format!("must be 1 to 5, got {}", s.replicas),
                );
            }
            for (field, value) in [("max_bytes", s.max_bytes), ("max_msgs", s.max_msgs)] {
                if matches!(value, Some(v) if v <= 0) {
                    add(
                        key(field),
                        "must be positive (leave it out for unlimited)".into(),
                    );
                }
            }
            if matches!(s.max_msg_size, Some(v) if v <= 0) {
                add(
                    key("max_msg_size"),
                    "must be positive (leave it out for unlimited)".into(),
                );
            }
            if matches!(s.max_age, Some(d) if d.is_zero()) {
                add(
                    key("max_age"),
                    "must be more than 0s (leave it out for unlimited)".into(),
                );
            }
            if let Some(window) = s.duplicate_window {
                if window.is_zero() {
                    add(key("duplicate_window"), "must be more than 0s".into());
                }
                if matches!(s.max_age, Some(age) if window > age) {
                    add(
                        key("duplicate_window"),
                        "must not be longer than max_age".into(),
                    );
                }
            }
        }
        // Two streams may not capture the same subjects: the server refuses it.
        for (i, a) in self.streams.iter().enumerate() {
            for b in self.streams.iter().skip(i + 1) {
                for sa in &a.subjects {
                    if let Some(sb) = b.subjects.iter().find(|sb| subject::overlaps(sa, sb)) {
                        add(
                            format!("streams[{i}].subjects"),
                            format!("{sa:?} overlaps {sb:?} of stream {:?}: a subject can belong to one stream only", b.name),
                        );
                    }
                }
            }
        }

        // key-value buckets
        let mut bucket_names: HashMap<&str, usize> = HashMap::new();
        for (i, b) in self.kv_buckets.iter().enumerate() {
            let key = |field: &str| format!("kv_buckets[{i}].{field}");
            if b.name.is_empty() {
                add(key("name"), "required".into());
            } else if !b
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                add(
                    key("name"),
                    format!(
                        "{:?}: bucket names may hold only letters, digits, '_' and '-'",
                        b.name
                    ),
                );
            } else if let Some(first) = bucket_names.insert(&b.name, i) {
                add(
                    key("name"),
                    format!(
                        "duplicate bucket name {:?} (also kv_buckets[{first}])",
                        b.name
                    ),
                );
            }
            if !(1..=64).contains(&b.history) {
                add(
                    key("history"),
                    format!("must be 1 to 64, got {}", b.history),
                );
            }
            if b.replicas == 0 || b.replicas > 5 {
                add(
                    key("replicas"),
                    format!("must be 1 to 5, got {}", b.replicas),
                );
            }
            if matches!(b.max_age, Some(d) if d.is_zero()) {
                add(
                    key("max_age"),
                    "must be more than 0s (leave it out to keep entries)".into(),
                );
            }
        }

        // consumers
        let mut consumer_names: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, cons) in self.consumers.iter().enumerate() {
            let key = |field: &str| format!("consumers[{i}].{field}");
            let stream = self.streams.iter().find(|s| s.name == cons.stream);
            if let Err(why) = validate_name(&cons.name) {
                add(key("name"), why);
            } else if let Some(first) = consumer_names.insert((&cons.stream, &cons.name), i) {
                add(
                    key("name"),
                    format!(
                        "duplicate consumer {:?} on stream {:?} (also consumers[{first}])",
                        cons.name, cons.stream
                    ),
                );
            }
            if cons.stream.is_empty() {
                add(
                    key("stream"),
                    "required: the stream this consumer reads".into(),
                );
            } else if stream.is_none() {
                add(
                    key("stream"),
                    format!(
                        "unknown stream {:?}: declare it under [[streams]]",
                        cons.stream
                    ),
                );
            }
            if cons.handler.trim().is_empty() {
                add(
                    key("handler"),
                    "required: the name of the handler function that processes these messages"
                        .into(),
                );
            }
            if let Some(filter) = &cons.filter_subject {
                if let Err(e) = subject::validate_filter(filter) {
                    add(key("filter_subject"), format!("{e}: {filter:?}"));
                } else if let Some(s) = stream {
                    if !s.subjects.iter().any(|ss| subject::overlaps(ss, filter)) {
                        add(
                            key("filter_subject"),
                            format!("{filter:?} matches none of stream {:?}'s subjects", s.name),
                        );
                    }
                }
            }
            if cons.ack_wait < Duration::from_secs(1) {
                add(key("ack_wait"), "must be at least 1s".into());
            }
            if cons.max_deliver < 1 {
                add(key("max_deliver"), format!("must be at least 1 (unlimited redelivery is not allowed: a poison message would loop forever), got {}", cons.max_deliver));
            }
            if let Some(backoff) = &cons.backoff {
                if backoff.is_empty() {
                    add(
                        key("backoff"),
                        "must list at least one delay (leave it out for the default schedule)"
                            .into(),
                    );
                }
                if backoff.iter().any(|d| d.is_zero()) {
                    add(key("backoff"), "delays must be more than 0s: an immediate retry burns through max_deliver in milliseconds".into());
                }
                let retries = cons.max_deliver.max(1) - 1;
                if backoff.len() as i64 > retries {
                    add(key("backoff"), format!(
                        "{} delays but max_deliver {} allows only {retries} retr{}: shorten the schedule or raise max_deliver",
                        backoff.len(), cons.max_deliver, if retries == 1 { "y" } else { "ies" }
                    ));
                }
            }
            if cons.max_ack_pending < 1 {
                add(key("max_ack_pending"), "must be at least 1".into());
            }
            if cons.concurrency < 1 {
                add(key("concurrency"), "must be at least 1".into());
            } else if cons.concurrency > cons.max_ack_pending && cons.max_ack_pending >= 1 {
                add(key("concurrency"), format!(
                    "{} is above max_ack_pending {}: the server would never let that many messages out",
                    cons.concurrency, cons.max_ack_pending
                ));
            }
            if cons.handler_timeout.is_zero() {
                add(key("handler_timeout"), "must be more than 0s".into());
            }
            if cons.max_payload_bytes < 1 {
                add(key("max_payload_bytes"), "must be at least 1".into());
            }
            let dls = &cons.dead_letter_subject;
            if dls.is_empty() {
                add(key("dead_letter_subject"), "required: where messages that cannot be processed are kept (a subject captured by a declared stream)".into());
            } else if let Err(e) = subject::validate_literal(dls) {
                add(key("dead_letter_subject"), format!("{e}: {dls:?}"));
            } else {
                match self.streams.iter().find(|s| s.subjects.iter().any(|ss| subject::overlaps(ss, dls))) {
                    None => add(key("dead_letter_subject"), format!("{dls:?} is captured by no declared stream: dead letters would be lost; add it to a stream's subjects")),
                    Some(dl_stream) if dl_stream.name == cons.stream => {
                        let reads_it = match &cons.filter_subject {
                            Some(filter) => subject::overlaps(filter, dls),
                            None => true,
                        };
                        if reads_it {
                            add(key("dead_letter_subject"), format!("{dls:?} would be read by this consumer itself (a dead-letter loop): use a subject outside its filter, in another stream"));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        problems
    }

    /// The stream a consumer reads, once validated.
    pub fn stream(&self, name: &str) -> Option<&StreamConfig> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// Consumers grouped by stream, in config order (handy for reports).
    pub fn consumers_by_stream(&self) -> BTreeMap<&str, Vec<&ConsumerConfig>> {
        let mut map: BTreeMap<&str, Vec<&ConsumerConfig>> = BTreeMap::new();
        for c in &self.consumers {
            map.entry(&c.stream).or_default().push(c);
        }
        map
    }
}

/// Stream and consumer names: what the server accepts in a subject token.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("required".into());
    }
    if name.len() > 255 {
        return Err("longer than 255 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{name:?} contains {c:?}: names may not contain '.', '*', '>', slashes or whitespace"
        ));
    }
    Ok(())
}

/// Deserializes an optional list of human durations (`["1s", "5s", "1m"]`).
fn duration_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Duration>>, D::Error> {
    let list: Option<Vec<humantime_serde::Serde<Duration>>> = Option::deserialize(d)?;
    Ok(list.map(|l| l.into_iter().map(|d| d.into_inner()).collect()))
}

/// `consumers.0.typo` (serde_ignored's form) as `consumers[0].typo`, like every other key.
fn key_path(dotted: &str) -> String {
    let mut out = String::new();
    for part in dotted.split('.') {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Keys whose values are never quoted in an error.
const SECRET_KEYS: [&str; 2] = ["password", "token"];

/// Parse errors can quote values: drop the source excerpt a TOML syntax error shows (the
/// offending line can hold a secret: `3 | password = "..."`), keeping the position and
/// the reason, and remove anything that looks like URL userinfo (`user:pw@`, `token@`).
fn sanitize(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .filter(|line| !is_source_excerpt(line) && !line.trim().is_empty())
        .map(str::trim)
        .collect();
    kept.join(": ")
        .split(' ')
        .map(|word| {
            // `scheme://userinfo@host`, and `token@host` (a server URL without scheme).
            if word.contains("://") || word.contains('@') {
                redact_userinfo(word.trim_start_matches(['"', '\'']))
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A line of the source excerpt in a TOML error: `  |`, `3 | text`, `  | ^^^`.
fn is_source_excerpt(line: &str) -> bool {
    line.trim_start()
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
        .starts_with('|')
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn syntax_errors_do_not_quote_the_line() {
        for text in [
            "[connection]\npassword = \"pw-Unterminated-1\n",
            "[connection]\ntoken = \"tok-Twice-2\"\ntoken = \"tok-Twice-2\"\n",
            "[connection]\nservers = [\"nats://u:pw-In-Url-3@h:4222\" \"x\"]\n",
            "[connection]\nservers = \"tok-No-Scheme-4@h:4222\"\n",
        ] {
            let err = Config::from_toml_with_env(text, Path::new("s.toml"), std::iter::empty())
                .expect_err("a syntax error");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("pw-") && !shown.contains("tok-"), "{shown}");
            assert!(
                shown.contains("line 2")
                    || shown.contains("line 3")
                    || shown.contains("connection.servers: invalid type"),
                "{shown}"
            );
        }
    }

    #[test]
    fn url_credentials_are_read_and_stripped() {
        let url = ServerUrl::new("tls://alice:p%40ss:w@nats.example:4222/x");
        match url.credentials() {
            Some(UrlCredentials::UserPassword { user, password }) => {
                assert_eq!(user, "alice");
                assert_eq!(password.expose_secret(), "p@ss:w");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(url.without_userinfo(), "tls://nats.example:4222/x");
        assert_eq!(url.redacted(), "tls://***@nats.example:4222/x");
        let shown = format!("{url} {url:?} {:?}", url.credentials());
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );

        let token = ServerUrl::new("s3cr3t@127.0.0.1:4222");
        assert!(
            matches!(token.credentials(), Some(UrlCredentials::Token(t)) if t.expose_secret() == "s3cr3t")
        );
        assert_eq!(token.without_userinfo(), "127.0.0.1:4222");

        let plain = ServerUrl::new("nats://127.0.0.1:4222");
        assert!(plain.credentials().is_none());
        assert_eq!(plain.without_userinfo(), "nats://127.0.0.1:4222");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn servers_may_not_disagree_on_url_credentials() {
        let config = Config {
            connection: ConnectionConfig {
                servers: vec![
                    ServerUrl::new("nats://a:pw-first-xyz@h1:4222"),
                    ServerUrl::new("nats://h2:4222"),
                    ServerUrl::new("nats://a:pw-second-xyz@h3:4222"),
                ],
                inbox_prefix: Some("$BAD".into()),
                ..ConnectionConfig::default()
            },
            ..Config::default()
        };
        let problems = config.problems();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["connection.servers[2]", "connection.inbox_prefix"],
            "{problems:?}"
        );
        let shown = format!("{problems:?}");
        assert!(
            !shown.contains("pw-first") && !shown.contains("pw-second"),
            "{shown}"
        );
    }
}
