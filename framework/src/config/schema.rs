//! The plain data of `streams.toml`: every section as a `Deserialize + Default` struct,
//! its enums, and the small accessors that read a validated config. No I/O and no
//! validation here (see `load` and `validate`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::load::ConnectionSources;
use super::server_url::ServerUrl;

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

impl Config {
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
    /// The JetStream domain to use, in leaf-node setups where JetStream runs in another
    /// domain than the server connected to (`$JS.<domain>.API`); every JetStream context
    /// the worker and its operator tools create uses it. Unset: the local JetStream.
    pub jetstream_domain: Option<String>,
    /// The JetStream API prefix to use instead of `$JS.API`, for accounts that import
    /// another account's JetStream under a prefix. Set at most one of this and
    /// `jetstream_domain`.
    pub jetstream_api_prefix: Option<String>,
    /// Where each connection setting came from (file, environment variable, `nats`
    /// context); filled in by loading, shown by `check`.
    #[serde(skip)]
    pub sources: ConnectionSources,
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
            jetstream_domain: None,
            jetstream_api_prefix: None,
            sources: ConnectionSources::default(),
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
    /// Unacknowledged messages the server lets out across all replicas. It is a cap, not
    /// what a replica holds: each replica's prefetch follows its handlers' pace (see
    /// `concurrency`). The default (10000) leaves fast consumers large pulls; the
    /// server's own default (1000) made them the bottleneck.
    pub max_ack_pending: i64,
    /// Handlers run at once in this process for this consumer. It bounds concurrency,
    /// not prefetch: the pull loop also holds what the handlers finish within a tenth of
    /// `ack_wait` (at most 200 ms) at their measured pace, within `max_ack_pending`.
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
    /// Batch handlers only: the most messages in one batch (default
    /// [`DEFAULT_MAX_BATCH`]). `concurrency` counts batches for a batch handler.
    pub max_batch: Option<i64>,
    /// Batch handlers only: the most bytes (payloads and headers) in one batch (default
    /// [`DEFAULT_MAX_BATCH_BYTES`]); a larger message makes a batch of its own.
    pub max_batch_bytes: Option<i64>,
    /// Batch handlers only: how long a batch that is not full waits for more messages
    /// before it runs (default [`DEFAULT_MAX_BATCH_WAIT`]). Short: its messages' ack
    /// wait runs meanwhile.
    #[serde(with = "humantime_serde")]
    pub max_batch_wait: Option<Duration>,
    /// Where a message's ordering key is (`ordered_by = { subject_token = 1 }`, `{ header
    /// = "Order-Id" }` or `{ function = "order_id" }`). Set, messages of one key run one
    /// at a time in stream order, different keys concurrently up to `concurrency`; unset,
    /// messages run in any order.
    pub ordered_by: Option<OrderedBy>,
    /// Order per key across replicas (with `ordered_by`): the consumer stands for
    /// `count` durable consumers `<name>-0` .. `<name>-<count-1>`, one per partition of
    /// the subject, each pulled by one replica at a time (see `Publisher::publish_keyed`
    /// for the publishing side).
    pub partitions: Option<PartitionsConfig>,
    /// Set on the consumers a partitioned consumer stands for once it is expanded (see
    /// `expand_partitions`): the name of that partitioned consumer. Not a key of the
    /// file; it tells a partition consumer from an ordered consumer of its own.
    #[serde(skip)]
    pub partition_of: Option<String>,
}

/// How an ordered consumer is split into partitions pulled by one replica each.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PartitionsConfig {
    /// How many partitions (1 to 1024). Publishers must use the same count.
    pub count: u32,
    /// The 0-based index of the partition token in the subject; `filter_subject` has a
    /// `*` there (`orders.*.>` with `subject_token = 1`).
    pub subject_token: usize,
    /// How long a replica that stopped renewing keeps its partitions: after a crash,
    /// its partitions move to other replicas this much later.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for PartitionsConfig {
    fn default() -> Self {
        PartitionsConfig {
            count: 1,
            subject_token: 1,
            lease: Duration::from_secs(10),
        }
    }
}

/// Where an ordered consumer finds a message's key: exactly one of the three. A message
/// that has no key there (a shorter subject, no such header, the function says `None`)
/// runs without waiting for any other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct OrderedBy {
    /// The subject token at this index (0-based: in `orders.eu.42`, token 2 is `42`).
    pub subject_token: Option<usize>,
    /// The value of this header.
    pub header: Option<String>,
    /// A function registered with `App::key` under this name.
    pub function: Option<String>,
}

/// Messages in one batch when `max_batch` is not set.
pub const DEFAULT_MAX_BATCH: usize = 100;
/// Bytes in one batch when `max_batch_bytes` is not set.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// How long a batch waits to fill when `max_batch_wait` is not set.
pub const DEFAULT_MAX_BATCH_WAIT: Duration = Duration::from_millis(50);

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
            max_ack_pending: 10_000,
            concurrency: 32,
            handler_timeout: Duration::from_secs(60),
            max_payload_bytes: 1024 * 1024,
            codec: CodecKind::Msgpack,
            dead_letter_subject: String::new(),
            deliver_policy: DeliverPolicy::All,
            description: None,
            max_batch: None,
            max_batch_bytes: None,
            max_batch_wait: None,
            ordered_by: None,
            partitions: None,
            partition_of: None,
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

    /// `max_batch` (or its default) as the count it is once validated.
    pub fn batch_size_limit(&self) -> usize {
        self.max_batch.map_or(DEFAULT_MAX_BATCH, |n| {
            usize::try_from(n).unwrap_or(1).max(1)
        })
    }

    /// `max_batch_bytes` (or its default) as the count it is once validated.
    pub fn batch_bytes_limit(&self) -> usize {
        self.max_batch_bytes.map_or(DEFAULT_MAX_BATCH_BYTES, |n| {
            usize::try_from(n).unwrap_or(1).max(1)
        })
    }

    /// `max_batch_wait`, or its default.
    pub fn batch_wait(&self) -> Duration {
        self.max_batch_wait.unwrap_or(DEFAULT_MAX_BATCH_WAIT)
    }

    /// The batch keys this consumer sets (`max_batch`, `max_batch_bytes`,
    /// `max_batch_wait`): they mean something only to a batch handler.
    pub fn batch_keys_set(&self) -> Vec<&'static str> {
        [
            ("max_batch", self.max_batch.is_some()),
            ("max_batch_bytes", self.max_batch_bytes.is_some()),
            ("max_batch_wait", self.max_batch_wait.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// Deserializes an optional list of human durations (`["1s", "5s", "1m"]`).
fn duration_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Duration>>, D::Error> {
    let list: Option<Vec<humantime_serde::Serde<Duration>>> = Option::deserialize(d)?;
    Ok(list.map(|l| l.into_iter().map(|d| d.into_inner()).collect()))
}
