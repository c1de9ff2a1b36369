//! The specs: the fields jetworker manages of a stream, a consumer and a key-value
//! bucket, normalized the way the server stores them, so a config and a server state
//! compare field by field. Pure: no I/O.
//!
//! - [`desired`]: a validated [`Config`] (plus the safety net's stream and consumer) as
//!   [`Desired`] specs; [`stream_spec`], [`consumer_spec`], [`kv_spec`] one by one.
//! - `*_from_server`: a server's stream and consumer configs read back into specs, for
//!   [`Actual`].
//! - `apply_*_spec`, `new_*_config`: specs written into server configs, keeping every
//!   field jetworker does not manage.
//! - [`ServerVersion`]: what the server can change in place.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};

use crate::config::{self, Config, ConsumerConfig, StreamConfig};

/// The server's default duplicate window.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A server version, compared to know which features exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ServerVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl ServerVersion {
    /// Parses `2.9.10`, `v2.10.4`, `2.11.0-beta.1`; `None` when it is not a version.
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        Some(ServerVersion {
            major: parts.next()??,
            minor: parts.next().flatten().unwrap_or(0),
            patch: parts.next().flatten().unwrap_or(0),
        })
    }

    /// True when this version is at least `major.minor.patch`.
    pub fn at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        *self
            >= ServerVersion {
                major,
                minor,
                patch,
            }
    }

    /// Servers from 2.10 can change a consumer's filter subject in place.
    pub fn can_update_consumer_filter(&self) -> bool {
        self.at_least(2, 10, 0)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The stream fields jetworker manages, normalized the way the server stores them
/// (unlimited is `0` for ages and `-1` for counts, subjects sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects, sorted.
    pub subjects: Vec<String>,
    /// Storage type.
    pub storage: config::Storage,
    /// Retention policy.
    pub retention: config::Retention,
    /// Replica count.
    pub replicas: u32,
    /// Max age; zero is unlimited.
    pub max_age: Duration,
    /// Max bytes; -1 is unlimited.
    pub max_bytes: i64,
    /// Max messages; -1 is unlimited.
    pub max_msgs: i64,
    /// Max message size; -1 is unlimited.
    pub max_msg_size: i32,
    /// Discard policy.
    pub discard: config::Discard,
    /// Duplicate window.
    pub duplicate_window: Duration,
    /// Description; empty is none.
    pub description: String,
}

/// How a consumer acknowledges; jetworker only runs `Explicit` consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Every message acked on its own: what jetworker needs.
    Explicit,
    /// Acking one acks all before it.
    All,
    /// No acks.
    None,
    /// Anything else a newer server offers.
    Other,
}

/// The consumer fields jetworker manages, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Stream the consumer belongs to.
    pub stream: String,
    /// Durable name.
    pub name: String,
    /// Filter subject; empty reads the whole stream.
    pub filter_subject: String,
    /// Pull (no deliver subject) or push.
    pub pull: bool,
    /// Ack policy.
    pub ack_mode: AckMode,
    /// Ack wait.
    pub ack_wait: Duration,
    /// Max deliveries.
    pub max_deliver: i64,
    /// Max unacknowledged messages.
    pub max_ack_pending: i64,
    /// Server-side backoff on ack timeout; jetworker keeps it empty (retries use nak delays).
    pub backoff: Vec<Duration>,
    /// Inactivity after which the server deletes the consumer; zero is never.
    pub inactive_threshold: Duration,
    /// Description; empty is none.
    pub description: String,
    /// Where a new consumer starts (only used at creation).
    pub deliver_policy: config::DeliverPolicy,
}

/// The key-value bucket fields jetworker manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSpec {
    /// Bucket name (its stream is `KV_<name>`).
    pub name: String,
    /// Values kept per key.
    pub history: i64,
    /// Storage type.
    pub storage: config::Storage,
    /// Replica count.
    pub replicas: u32,
    /// Max age; zero keeps entries.
    pub max_age: Duration,
    /// Description; empty is none.
    pub description: String,
}

impl KvSpec {
    /// The stream backing the bucket.
    pub fn stream_name(&self) -> String {
        format!("KV_{}", self.name)
    }
}

/// What the config asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// Streams, in config order.
    pub streams: Vec<StreamSpec>,
    /// Consumers, in config order.
    pub consumers: Vec<ConsumerSpec>,
    /// Key-value buckets, in config order.
    pub kv_buckets: Vec<KvSpec>,
}

/// What the server has, for the names the config mentions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actual {
    /// The server's version, for what it can change in place.
    pub server_version: ServerVersion,
    /// Existing streams by name.
    pub streams: HashMap<String, StreamSpec>,
    /// Existing consumers by (stream, name).
    pub consumers: HashMap<(String, String), ConsumerSpec>,
    /// Existing key-value buckets by name.
    pub kv_buckets: HashMap<String, KvSpec>,
}

/// The specs a validated config asks for.
///
/// Besides what the config lists, it holds the safety net's advisory stream and its
/// internal consumers, one per configured consumer; a partitioned consumer stands for
/// one consumer per partition and the key-value bucket of their leases.
pub fn desired(config: &Config) -> Desired {
    // A partitioned consumer is one consumer per partition and a lease bucket.
    let (expanded, _) = crate::partition::expand(config);
    let config = &expanded;
    let net_stream = crate::safety_net::advisory_stream(config);
    let net_consumers = crate::safety_net::safety_net_consumers(config);
    Desired {
        streams: config
            .streams
            .iter()
            .chain(net_stream.as_ref())
            .map(stream_spec)
            .collect(),
        consumers: config
            .consumers
            .iter()
            .chain(&net_consumers)
            .map(consumer_spec)
            .collect(),
        kv_buckets: config.kv_buckets.iter().map(kv_spec).collect(),
    }
}

/// A bucket's config, normalized.
pub fn kv_spec(b: &config::KvBucketConfig) -> KvSpec {
    KvSpec {
        name: b.name.clone(),
        history: b.history,
        storage: b.storage,
        replicas: b.replicas,
        max_age: b.max_age.unwrap_or(Duration::ZERO),
        description: b.description.clone().unwrap_or_default(),
    }
}

/// A stream's config, normalized with the server's defaults.
pub fn stream_spec(s: &StreamConfig) -> StreamSpec {
    let max_age = s.max_age.unwrap_or(Duration::ZERO);
    let duplicate_window = s
        .duplicate_window
        .unwrap_or_else(|| default_duplicate_window(max_age));
    let mut subjects = s.subjects.clone();
    subjects.sort();
    StreamSpec {
        name: s.name.clone(),
        subjects,
        storage: s.storage,
        retention: s.retention,
        replicas: s.replicas,
        max_age,
        max_bytes: s.max_bytes.unwrap_or(-1),
        max_msgs: s.max_msgs.unwrap_or(-1),
        max_msg_size: s.max_msg_size.unwrap_or(-1),
        discard: s.discard,
        duplicate_window,
        description: s.description.clone().unwrap_or_default(),
    }
}

/// The server's default duplicate window: two minutes, or the max age when that is
/// shorter (zero is no max age).
fn default_duplicate_window(max_age: Duration) -> Duration {
    if max_age.is_zero() {
        DEFAULT_DUPLICATE_WINDOW
    } else {
        max_age.min(DEFAULT_DUPLICATE_WINDOW)
    }
}

/// A consumer's config as the pull consumer jetworker runs.
pub fn consumer_spec(c: &ConsumerConfig) -> ConsumerSpec {
    ConsumerSpec {
        stream: c.stream.clone(),
        name: c.name.clone(),
        filter_subject: c.filter_subject.clone().unwrap_or_default(),
        pull: true,
        ack_mode: AckMode::Explicit,
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
        backoff: Vec::new(),
        inactive_threshold: Duration::ZERO,
        description: c.description.clone().unwrap_or_default(),
        deliver_policy: c.deliver_policy,
    }
}

/// Normalizes a server stream config into the managed fields.
pub fn stream_spec_from_server(c: &stream::Config) -> StreamSpec {
    let mut subjects = c.subjects.clone();
    subjects.sort();
    StreamSpec {
        name: c.name.clone(),
        subjects,
        storage: match c.storage {
            stream::StorageType::File => config::Storage::File,
            stream::StorageType::Memory => config::Storage::Memory,
        },
        retention: match c.retention {
            stream::RetentionPolicy::Limits => config::Retention::Limits,
            stream::RetentionPolicy::Interest => config::Retention::Interest,
            stream::RetentionPolicy::WorkQueue => config::Retention::Workqueue,
        },
        replicas: u32::try_from(c.num_replicas).unwrap_or(u32::MAX).max(1),
        max_age: c.max_age,
        max_bytes: normalize_limit(c.max_bytes),
        max_msgs: normalize_limit(c.max_messages),
        max_msg_size: if c.max_message_size <= 0 {
            -1
        } else {
            c.max_message_size
        },
        discard: match c.discard {
            stream::DiscardPolicy::Old => config::Discard::Old,
            stream::DiscardPolicy::New => config::Discard::New,
        },
        duplicate_window: c.duplicate_window,
        description: c.description.clone().unwrap_or_default(),
    }
}

fn normalize_limit(v: i64) -> i64 {
    if v <= 0 {
        -1
    } else {
        v
    }
}

/// Normalizes the stream behind a bucket into the managed bucket fields.
pub fn kv_spec_from_server(name: &str, c: &stream::Config) -> KvSpec {
    let s = stream_spec_from_server(c);
    KvSpec {
        name: name.to_string(),
        history: c.max_messages_per_subject.max(1),
        storage: s.storage,
        replicas: s.replicas,
        max_age: s.max_age,
        description: s.description,
    }
}

/// Normalizes a server consumer config into the managed fields.
pub fn consumer_spec_from_server(stream: &str, name: &str, c: &consumer::Config) -> ConsumerSpec {
    ConsumerSpec {
        stream: stream.to_string(),
        name: name.to_string(),
        filter_subject: c.filter_subject.clone(),
        pull: c.deliver_subject.is_none(),
        ack_mode: match c.ack_policy {
            consumer::AckPolicy::Explicit => AckMode::Explicit,
            consumer::AckPolicy::All => AckMode::All,
            consumer::AckPolicy::None => AckMode::None,
            _ => AckMode::Other,
        },
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
        backoff: c.backoff.clone(),
        inactive_threshold: c.inactive_threshold,
        description: c.description.clone().unwrap_or_default(),
        deliver_policy: match c.deliver_policy {
            consumer::DeliverPolicy::New => config::DeliverPolicy::New,
            consumer::DeliverPolicy::Last => config::DeliverPolicy::Last,
            consumer::DeliverPolicy::LastPerSubject => config::DeliverPolicy::LastPerSubject,
            _ => config::DeliverPolicy::All,
        },
    }
}

/// Writes the managed stream fields into a server config, keeping every other field.
pub fn apply_stream_spec(spec: &StreamSpec, c: &mut stream::Config) {
    c.name = spec.name.clone();
    c.subjects = spec.subjects.clone();
    c.storage = match spec.storage {
        config::Storage::File => stream::StorageType::File,
        config::Storage::Memory => stream::StorageType::Memory,
    };
    c.retention = match spec.retention {
        config::Retention::Limits => stream::RetentionPolicy::Limits,
        config::Retention::Interest => stream::RetentionPolicy::Interest,
        config::Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
    };
    c.num_replicas = spec.replicas as usize;
    c.max_age = spec.max_age;
    c.max_bytes = spec.max_bytes;
    c.max_messages = spec.max_msgs;
    c.max_message_size = spec.max_msg_size;
    c.discard = match spec.discard {
        config::Discard::Old => stream::DiscardPolicy::Old,
        config::Discard::New => stream::DiscardPolicy::New,
    };
    c.duplicate_window = spec.duplicate_window;
    c.description = (!spec.description.is_empty()).then(|| spec.description.clone());
}

/// Writes the managed consumer fields into a server config, keeping every other field.
pub fn apply_consumer_spec(spec: &ConsumerSpec, c: &mut consumer::Config) {
    c.durable_name = Some(spec.name.clone());
    c.name = Some(spec.name.clone());
    c.filter_subject = spec.filter_subject.clone();
    c.deliver_subject = None;
    c.ack_policy = match spec.ack_mode {
        AckMode::Explicit => consumer::AckPolicy::Explicit,
        AckMode::All => consumer::AckPolicy::All,
        AckMode::None | AckMode::Other => consumer::AckPolicy::None,
    };
    c.ack_wait = spec.ack_wait;
    c.max_deliver = spec.max_deliver;
    c.max_ack_pending = spec.max_ack_pending;
    c.backoff = spec.backoff.clone();
    c.inactive_threshold = spec.inactive_threshold;
    c.description = (!spec.description.is_empty()).then(|| spec.description.clone());
}

/// A new consumer's server config: the managed fields and where it starts.
pub(super) fn new_consumer_config(spec: &ConsumerSpec) -> consumer::Config {
    let mut c = consumer::Config {
        deliver_policy: match spec.deliver_policy {
            config::DeliverPolicy::All => consumer::DeliverPolicy::All,
            config::DeliverPolicy::New => consumer::DeliverPolicy::New,
            config::DeliverPolicy::Last => consumer::DeliverPolicy::Last,
            config::DeliverPolicy::LastPerSubject => consumer::DeliverPolicy::LastPerSubject,
        },
        ..Default::default()
    };
    apply_consumer_spec(spec, &mut c);
    c
}

/// The server config of the stream a new key-value bucket is made of, as the NATS clients
/// create it (created directly: async-nats' `create_key_value` fails on 2.9 servers).
pub(super) fn new_kv_stream_config(spec: &KvSpec) -> stream::Config {
    let mut c = stream::Config {
        name: spec.stream_name(),
        subjects: vec![format!("$KV.{}.>", spec.name)],
        max_messages_per_subject: spec.history,
        max_age: spec.max_age,
        duplicate_window: default_duplicate_window(spec.max_age),
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: spec.replicas as usize,
        description: (!spec.description.is_empty()).then(|| spec.description.clone()),
        ..Default::default()
    };
    c.storage = match spec.storage {
        config::Storage::File => stream::StorageType::File,
        config::Storage::Memory => stream::StorageType::Memory,
    };
    c
}

/// Writes the managed bucket fields that can change in place into the config of the
/// stream behind the bucket, keeping every other field.
pub(super) fn apply_kv_spec(spec: &KvSpec, c: &mut stream::Config) {
    c.max_messages_per_subject = spec.history;
    c.max_age = spec.max_age;
    c.num_replicas = spec.replicas as usize;
    c.description = (!spec.description.is_empty()).then(|| spec.description.clone());
}

/// Specs for the unit tests of this module and of `plan`.
#[cfg(test)]
pub(super) mod fixtures {
    use super::*;

    /// The spec of a stream `name` capturing `name.>` (lowercase), with the defaults.
    pub(in crate::provision) fn stream(name: &str) -> StreamSpec {
        stream_spec(&StreamConfig {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            ..StreamConfig::default()
        })
    }

    /// The spec of consumer `name` of `stream`, with the defaults.
    pub(in crate::provision) fn consumer(stream: &str, name: &str) -> ConsumerSpec {
        consumer_spec(&ConsumerConfig {
            name: name.into(),
            stream: stream.into(),
            handler: "h".into(),
            dead_letter_subject: "dlq.x".into(),
            ..ConsumerConfig::default()
        })
    }

    /// A server version from its text (`0.0.0` when it is not one).
    pub(in crate::provision) fn v(text: &str) -> ServerVersion {
        ServerVersion::parse(text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{consumer, stream, v};
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            v("2.9.10"),
            ServerVersion {
                major: 2,
                minor: 9,
                patch: 10
            }
        );
        assert_eq!(v("v2.11.0-beta.1").to_string(), "2.11.0");
        assert!(v("2.10.0").can_update_consumer_filter());
        assert!(!v("2.9.25").can_update_consumer_filter());
        assert!(ServerVersion::parse("nope").is_none());
    }

    #[test]
    fn defaults_match_server_normalization() {
        // A stream created from the config and read back must plan as unchanged.
        let spec = stream("EVENTS");
        let mut server = stream::Config::default();
        apply_stream_spec(&spec, &mut server);
        assert_eq!(stream_spec_from_server(&server), spec);

        let spec = consumer("EVENTS", "clicks");
        let server = new_consumer_config(&spec);
        assert_eq!(consumer_spec_from_server("EVENTS", "clicks", &server), spec);
    }

    #[test]
    fn kv_bucket_read_back_is_its_spec() {
        let want = kv_spec(&config::KvBucketConfig {
            name: "analytics".into(),
            ..Default::default()
        });
        // Read back from the stream a bucket is made of, it plans as unchanged.
        let mut server = stream::Config {
            name: want.stream_name(),
            max_messages_per_subject: 1,
            ..Default::default()
        };
        server.storage = stream::StorageType::File;
        server.num_replicas = 1;
        assert_eq!(kv_spec_from_server("analytics", &server), want);
    }

    #[test]
    fn duplicate_window_default_follows_max_age() {
        let short = stream_spec(&StreamConfig {
            name: "S".into(),
            subjects: vec!["s".into()],
            max_age: Some(Duration::from_secs(30)),
            ..StreamConfig::default()
        });
        assert_eq!(short.duplicate_window, Duration::from_secs(30));
        assert_eq!(stream("S").duplicate_window, DEFAULT_DUPLICATE_WINDOW);
    }
}
