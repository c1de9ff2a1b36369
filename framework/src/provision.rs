//! Provisioning: compare what the config wants with what the server has, and apply the
//! difference without ever deleting or silently overwriting anything.
//!
//! - [`desired`] turns a validated [`Config`] into [`StreamSpec`]s and [`ConsumerSpec`]s.
//! - [`fetch_actual`] reads the same fields from a server into an [`Actual`].
//! - [`plan`] (pure) compares them: per stream and consumer, create, update (with the
//!   changed fields), unchanged, or conflict (a change the server cannot apply in place,
//!   with the field and what to do).
//! - [`apply`] carries out a plan that has no conflicts. It changes only the fields
//!   jetworker manages; any other setting made on the server by hand is kept.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::{self, Config, ConsumerConfig, StreamConfig};
use crate::error::Error;

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

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// Field name as in `streams.toml`.
    pub field: &'static str,
    /// Server value.
    pub from: String,
    /// Config value.
    pub to: String,
}

/// A field that differs and cannot be changed in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConflict {
    /// The change that cannot be made.
    pub change: FieldChange,
    /// What the operator can do about it.
    pub advice: String,
}

/// What to do with one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It does not exist: create it.
    Create,
    /// It exists and some fields differ; all of them can be changed in place.
    Update(Vec<FieldChange>),
    /// It exists as configured.
    Unchanged,
    /// It exists and at least one field cannot be changed in place. Nothing is done.
    Conflict {
        /// Fields that cannot change in place.
        conflicts: Vec<FieldConflict>,
        /// Fields that could change, listed for the full picture.
        changes: Vec<FieldChange>,
    },
}

impl Action {
    /// Short word for reports: create, update, unchanged, conflict.
    pub fn word(&self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update(_) => "update",
            Action::Unchanged => "unchanged",
            Action::Conflict { .. } => "conflict",
        }
    }
}

/// The plan for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan {
    /// Stream name.
    pub name: String,
    /// What to do.
    pub action: Action,
}

/// The plan for one key-value bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPlan {
    /// Bucket name.
    pub name: String,
    /// What to do.
    pub action: Action,
}

/// The plan for one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPlan {
    /// Stream name.
    pub stream: String,
    /// Consumer name.
    pub name: String,
    /// What to do.
    pub action: Action,
}

/// The whole plan: what `provision` would do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Per stream, in config order.
    pub streams: Vec<StreamPlan>,
    /// Per consumer, in config order.
    pub consumers: Vec<ConsumerPlan>,
    /// Per key-value bucket, in config order.
    pub kv_buckets: Vec<KvPlan>,
}

impl Plan {
    /// True when anything would be created or updated.
    pub fn has_changes(&self) -> bool {
        self.actions()
            .any(|a| matches!(a, Action::Create | Action::Update(_)))
    }

    /// True when any stream or consumer is in conflict.
    pub fn has_conflicts(&self) -> bool {
        self.actions().any(|a| matches!(a, Action::Conflict { .. }))
    }

    fn actions(&self) -> impl Iterator<Item = &Action> {
        self.streams
            .iter()
            .map(|s| &s.action)
            .chain(self.consumers.iter().map(|c| &c.action))
            .chain(self.kv_buckets.iter().map(|k| &k.action))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self
            .streams
            .iter()
            .map(|s| (format!("stream {}", s.name), &s.action))
            .chain(
                self.consumers
                    .iter()
                    .map(|c| (format!("consumer {}/{}", c.stream, c.name), &c.action)),
            )
            .chain(
                self.kv_buckets
                    .iter()
                    .map(|k| (format!("kv bucket {}", k.name), &k.action)),
            );
        for (what, action) in rows {
            writeln!(f, "{what}: {}", action.word())?;
            match action {
                Action::Update(changes) => write_changes(f, changes)?,
                Action::Conflict { conflicts, changes } => {
                    for c in conflicts {
                        writeln!(
                            f,
                            "    {}: {} -> {}  CANNOT CHANGE IN PLACE: {}",
                            c.change.field, c.change.from, c.change.to, c.advice
                        )?;
                    }
                    write_changes(f, changes)?;
                }
                Action::Create | Action::Unchanged => {}
            }
        }
        Ok(())
    }
}

fn write_changes(f: &mut fmt::Formatter<'_>, changes: &[FieldChange]) -> fmt::Result {
    for c in changes {
        writeln!(f, "    {}: {} -> {}", c.field, c.from, c.to)?;
    }
    Ok(())
}

/// The specs a validated config asks for.
///
/// Besides what the config lists, it holds the safety net's advisory stream and internal
/// consumer (the safety net's).
pub fn desired(config: &Config) -> Desired {
    let net_stream = crate::safety_net::advisory_stream(config);
    let net_consumer = crate::safety_net::safety_net_consumer(config);
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
            .chain(net_consumer.as_ref())
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
    // The server's default: two minutes, or the max age when that is shorter.
    let duplicate_window = s.duplicate_window.unwrap_or(if max_age.is_zero() {
        DEFAULT_DUPLICATE_WINDOW
    } else {
        max_age.min(DEFAULT_DUPLICATE_WINDOW)
    });
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

/// Compares desired with actual. Pure; the heart of `provision --dry-run`.
pub fn plan(desired: &Desired, actual: &Actual) -> Plan {
    let streams = desired
        .streams
        .iter()
        .map(|want| StreamPlan {
            name: want.name.clone(),
            action: match actual.streams.get(&want.name) {
                None => Action::Create,
                Some(have) => stream_action(want, have),
            },
        })
        .collect();
    let consumers = desired
        .consumers
        .iter()
        .map(|want| ConsumerPlan {
            stream: want.stream.clone(),
            name: want.name.clone(),
            action: match actual
                .consumers
                .get(&(want.stream.clone(), want.name.clone()))
            {
                None => Action::Create,
                Some(have) => consumer_action(want, have, actual.server_version),
            },
        })
        .collect();
    let kv_buckets = desired
        .kv_buckets
        .iter()
        .map(|want| KvPlan {
            name: want.name.clone(),
            action: match actual.kv_buckets.get(&want.name) {
                None => Action::Create,
                Some(have) => kv_action(want, have),
            },
        })
        .collect();
    Plan {
        streams,
        consumers,
        kv_buckets,
    }
}

fn kv_action(want: &KvSpec, have: &KvSpec) -> Action {
    let mut d = Diff::default();
    d.field("history", &have.history, &want.history);
    d.field_shown("storage", &have.storage, &want.storage, |v| v.to_string());
    d.field("replicas", &have.replicas, &want.replicas);
    d.duration("max_age", &have.max_age, &want.max_age);
    d.field("description", &have.description, &want.description);
    d.not_in_place(
        "storage",
        &format!(
            "the server cannot change a bucket's storage in place. Keep the server's value in streams.toml, \
             or create a bucket under a new name and copy the keys (deleting {:?} loses its data: jetworker never does that for you)",
            want.name
        ),
    );
    d.action()
}

/// Collects field differences into changes (in place) and conflicts (not in place).
#[derive(Default)]
struct Diff {
    changes: Vec<FieldChange>,
    conflicts: Vec<FieldConflict>,
}

impl Diff {
    fn field<T: PartialEq + fmt::Debug>(&mut self, field: &'static str, have: &T, want: &T) {
        self.field_shown(field, have, want, |v| format!("{v:?}"));
    }

    fn duration(&mut self, field: &'static str, have: &Duration, want: &Duration) {
        self.field_shown(field, have, want, |d| show_duration(*d));
    }

    fn field_shown<T: PartialEq>(
        &mut self,
        field: &'static str,
        have: &T,
        want: &T,
        show: impl Fn(&T) -> String,
    ) {
        if have != want {
            self.changes.push(FieldChange {
                field,
                from: show(have),
                to: show(want),
            });
        }
    }

    /// Moves the change of `field`, if any, to the conflicts with `advice`.
    fn not_in_place(&mut self, field: &'static str, advice: &str) {
        if let Some(i) = self.changes.iter().position(|c| c.field == field) {
            let change = self.changes.remove(i);
            self.conflicts.push(FieldConflict {
                change,
                advice: advice.to_string(),
            });
        }
    }

    fn action(self) -> Action {
        if !self.conflicts.is_empty() {
            Action::Conflict {
                conflicts: self.conflicts,
                changes: self.changes,
            }
        } else if !self.changes.is_empty() {
            Action::Update(self.changes)
        } else {
            Action::Unchanged
        }
    }
}

fn show_duration(d: Duration) -> String {
    if d.is_zero() {
        "unlimited".to_string()
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn show_limit<T: PartialOrd + Default + fmt::Display>(v: &T) -> String {
    if *v < T::default() {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

fn stream_action(want: &StreamSpec, have: &StreamSpec) -> Action {
    let mut d = Diff::default();
    d.field("subjects", &have.subjects, &want.subjects);
    d.field_shown("storage", &have.storage, &want.storage, |v| v.to_string());
    d.field_shown("retention", &have.retention, &want.retention, |v| {
        v.to_string()
    });
    d.field("replicas", &have.replicas, &want.replicas);
    d.duration("max_age", &have.max_age, &want.max_age);
    d.field_shown("max_bytes", &have.max_bytes, &want.max_bytes, show_limit);
    d.field_shown("max_msgs", &have.max_msgs, &want.max_msgs, show_limit);
    d.field_shown(
        "max_msg_size",
        &have.max_msg_size,
        &want.max_msg_size,
        show_limit,
    );
    d.field_shown("discard", &have.discard, &want.discard, |v| v.to_string());
    d.duration(
        "duplicate_window",
        &have.duplicate_window,
        &want.duplicate_window,
    );
    d.field("description", &have.description, &want.description);
    let recreate = format!(
        "the server cannot change this on an existing stream. Keep the server's value in streams.toml, \
         or create a stream under a new name and move producers and consumers to it \
         (deleting {:?} loses its messages: jetworker never does that for you)",
        want.name
    );
    d.not_in_place("storage", &recreate);
    d.not_in_place("retention", &recreate);
    d.action()
}

fn consumer_action(want: &ConsumerSpec, have: &ConsumerSpec, server: ServerVersion) -> Action {
    let mut d = Diff::default();
    d.field_shown("pull", &have.pull, &want.pull, |p| {
        if *p { "pull" } else { "push" }.to_string()
    });
    d.field("ack_policy", &have.ack_mode, &want.ack_mode);
    d.field("filter_subject", &have.filter_subject, &want.filter_subject);
    d.duration("ack_wait", &have.ack_wait, &want.ack_wait);
    d.field("max_deliver", &have.max_deliver, &want.max_deliver);
    d.field(
        "max_ack_pending",
        &have.max_ack_pending,
        &want.max_ack_pending,
    );
    d.field_shown("server backoff", &have.backoff, &want.backoff, |b| {
        if b.is_empty() {
            "none".to_string()
        } else {
            b.iter()
                .map(|d| show_duration(*d))
                .collect::<Vec<_>>()
                .join(", ")
        }
    });
    d.field_shown(
        "inactive_threshold",
        &have.inactive_threshold,
        &want.inactive_threshold,
        |d| {
            if d.is_zero() {
                "never".to_string()
            } else {
                show_duration(*d)
            }
        },
    );
    d.field("description", &have.description, &want.description);
    // deliver_policy only matters when the consumer is created: an existing consumer
    // keeps its position, so a difference is not a change.
    let recreate = format!(
        "the server cannot change this on an existing consumer. Keep the server's value in streams.toml, \
         or give the consumer a new name (it starts per deliver_policy), or delete {}/{} by hand \
         once it is drained (`nats consumer rm`) and provision again",
        want.stream, want.name
    );
    d.not_in_place("pull", &recreate);
    d.not_in_place("ack_policy", &recreate);
    if !server.can_update_consumer_filter() {
        d.not_in_place(
            "filter_subject",
            &format!(
                "nats-server {server} cannot change a filter subject in place (2.10 can). {recreate}"
            ),
        );
    }
    d.action()
}

/// Why provisioning failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionErrorKind {
    /// A JetStream API request failed (timeout, no JetStream, permissions, ...), or what
    /// it was about disappeared meanwhile; the client's error, if any, is the source.
    Request,
    /// The plan has conflicts; nothing was applied. See [`ProvisionError::plan`].
    Conflicts,
}

impl fmt::Display for ProvisionErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProvisionErrorKind::Request => "a JetStream request failed",
            ProvisionErrorKind::Conflicts => "the plan has conflicts",
        })
    }
}

/// Why provisioning failed; the message says what was being done.
pub type ProvisionError = Error<ProvisionErrorKind>;

impl ProvisionError {
    /// The plan, when it has conflicts (nothing was applied).
    pub fn plan(&self) -> Option<&Plan> {
        self.detail::<Plan>()
    }

    fn conflicts(plan: Plan) -> ProvisionError {
        ProvisionError::new(ProvisionErrorKind::Conflicts)
            .with_message(format!(
                "the plan has conflicts; nothing was changed:\n{plan}"
            ))
            .with_detail(plan)
    }
}

/// A request for `what` failed with the client's error `err`.
fn request_error(
    what: impl Into<String>,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ProvisionError {
    ProvisionError::with_source(ProvisionErrorKind::Request, err).with_message(what)
}

/// What a request was for is not there any more (`why` says what went).
fn vanished(what: impl fmt::Display, why: &str) -> ProvisionError {
    ProvisionError::new(ProvisionErrorKind::Request).with_message(format!("{what}: {why}"))
}

/// Reads the server's state for every stream and consumer the config names.
pub async fn fetch_actual(
    js: &jetstream::Context,
    server_version: ServerVersion,
    desired: &Desired,
) -> Result<Actual, ProvisionError> {
    let mut actual = Actual {
        server_version,
        ..Actual::default()
    };
    let mut handles: HashMap<String, stream::Stream> = HashMap::new();
    for want in &desired.streams {
        if let Some(s) = get_stream(js, &want.name).await? {
            actual.streams.insert(
                want.name.clone(),
                stream_spec_from_server(&s.cached_info().config),
            );
            handles.insert(want.name.clone(), s);
        }
    }
    for want in &desired.kv_buckets {
        if let Some(s) = get_stream(js, &want.stream_name()).await? {
            actual.kv_buckets.insert(
                want.name.clone(),
                kv_spec_from_server(&want.name, &s.cached_info().config),
            );
        }
    }
    for want in &desired.consumers {
        let stream = match handles.get(&want.stream) {
            Some(s) => s.clone(),
            None => match get_stream(js, &want.stream).await? {
                Some(s) => s,
                None => continue,
            },
        };
        if let Some(info) = consumer_info(&stream, &want.name).await? {
            actual.consumers.insert(
                (want.stream.clone(), want.name.clone()),
                consumer_spec_from_server(&want.stream, &want.name, &info.config),
            );
        }
    }
    Ok(actual)
}

/// The stream, or `None` when it does not exist.
pub async fn get_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, ProvisionError> {
    match js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(request_error(format!("reading stream {name:?}"), e)),
        },
    }
}

/// The consumer's info, or `None` when it does not exist.
pub async fn consumer_info(
    stream: &stream::Stream,
    name: &str,
) -> Result<Option<consumer::Info>, ProvisionError> {
    use jetstream::context::ConsumerInfoErrorKind as Kind;
    match stream.consumer_info(name).await {
        Ok(info) => Ok(Some(info)),
        Err(e) => match e.kind() {
            Kind::NotFound => Ok(None),
            Kind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(request_error(format!("reading consumer {name:?}"), e)),
        },
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

fn new_consumer_config(spec: &ConsumerSpec) -> consumer::Config {
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

/// What [`apply`] did, per stream and consumer (same order as the plan).
pub type Applied = Plan;

/// Applies a plan computed against the server now. With any conflict, nothing is done.
pub async fn apply(
    js: &jetstream::Context,
    desired: &Desired,
    plan: &Plan,
) -> Result<Applied, ProvisionError> {
    if plan.has_conflicts() {
        return Err(ProvisionError::conflicts(plan.clone()));
    }
    for (want, step) in desired.streams.iter().zip(&plan.streams) {
        match &step.action {
            Action::Create => {
                let mut c = stream::Config::default();
                apply_stream_spec(want, &mut c);
                js.create_stream(c)
                    .await
                    .map_err(|e| request_error(format!("creating stream {:?}", want.name), e))?;
            }
            Action::Update(_) => {
                let current = get_stream(js, &want.name).await?.ok_or_else(|| {
                    vanished(
                        format_args!("updating stream {:?}", want.name),
                        "it disappeared while provisioning",
                    )
                })?;
                let mut c = current.cached_info().config.clone();
                apply_stream_spec(want, &mut c);
                js.update_stream(c)
                    .await
                    .map_err(|e| request_error(format!("updating stream {:?}", want.name), e))?;
            }
            Action::Unchanged | Action::Conflict { .. } => {}
        }
    }
    for (want, step) in desired.kv_buckets.iter().zip(&plan.kv_buckets) {
        let what = || format!("{} kv bucket {:?}", step.action.word(), want.name);
        match &step.action {
            Action::Create => {
                // The stream a key-value bucket is made of, as the NATS clients create it
                // (created directly: async-nats' create_key_value fails on 2.9 servers).
                let mut c = stream::Config {
                    name: want.stream_name(),
                    subjects: vec![format!("$KV.{}.>", want.name)],
                    max_messages_per_subject: want.history,
                    max_age: want.max_age,
                    duplicate_window: if want.max_age.is_zero() {
                        DEFAULT_DUPLICATE_WINDOW
                    } else {
                        want.max_age.min(DEFAULT_DUPLICATE_WINDOW)
                    },
                    max_bytes: -1,
                    max_messages: -1,
                    max_message_size: -1,
                    discard: stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    num_replicas: want.replicas as usize,
                    description: (!want.description.is_empty()).then(|| want.description.clone()),
                    ..Default::default()
                };
                c.storage = match want.storage {
                    config::Storage::File => stream::StorageType::File,
                    config::Storage::Memory => stream::StorageType::Memory,
                };
                js.create_stream(c)
                    .await
                    .map_err(|e| request_error(what(), e))?;
            }
            Action::Update(_) => {
                let current = get_stream(js, &want.stream_name())
                    .await?
                    .ok_or_else(|| vanished(what(), "it disappeared while provisioning"))?;
                let mut c = current.cached_info().config.clone();
                c.max_messages_per_subject = want.history;
                c.max_age = want.max_age;
                c.num_replicas = want.replicas as usize;
                c.description = (!want.description.is_empty()).then(|| want.description.clone());
                js.update_stream(c)
                    .await
                    .map_err(|e| request_error(what(), e))?;
            }
            Action::Unchanged | Action::Conflict { .. } => {}
        }
    }
    for (want, step) in desired.consumers.iter().zip(&plan.consumers) {
        let what = || {
            format!(
                "{} consumer {}/{}",
                step.action.word(),
                want.stream,
                want.name
            )
        };
        let config = match &step.action {
            Action::Create => new_consumer_config(want),
            Action::Update(_) => {
                let stream = get_stream(js, &want.stream)
                    .await?
                    .ok_or_else(|| vanished(what(), "its stream disappeared"))?;
                let mut c = consumer_info(&stream, &want.name)
                    .await?
                    .ok_or_else(|| vanished(what(), "it disappeared while provisioning"))?
                    .config;
                apply_consumer_spec(want, &mut c);
                c
            }
            Action::Unchanged | Action::Conflict { .. } => continue,
        };
        ensure_consumer(js, &want.stream, config)
            .await
            .map_err(|e| request_error(what(), e))?;
    }
    Ok(plan.clone())
}

/// Creates (or, for an existing durable, updates) a consumer from a full config.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::Config,
) -> Result<consumer::Info, async_nats::Error> {
    let consumer = js.create_consumer_on_stream(config, stream).await?;
    Ok(consumer.cached_info().clone())
}

/// Creates one consumer from its spec when it is missing (used by the runtime when a
/// consumer was deleted behind its back). Returns its info.
pub async fn recreate_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<consumer::Info, async_nats::Error> {
    ensure_consumer(js, &spec.stream, new_consumer_config(spec)).await
}

/// Reads the server, plans, and (unless `dry_run`) applies. Returns the plan.
pub async fn provision(
    client: &async_nats::Client,
    js: &jetstream::Context,
    config: &Config,
    dry_run: bool,
) -> Result<Plan, ProvisionError> {
    let version = ServerVersion::parse(&client.server_info().version).unwrap_or_default();
    let desired = desired(config);
    let actual = fetch_actual(js, version, &desired).await?;
    let plan = plan(&desired, &actual);
    if !dry_run {
        apply(js, &desired, &plan).await?;
    } else if plan.has_conflicts() {
        return Err(ProvisionError::conflicts(plan));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str) -> StreamSpec {
        stream_spec(&StreamConfig {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            ..StreamConfig::default()
        })
    }

    fn consumer(stream: &str, name: &str) -> ConsumerSpec {
        consumer_spec(&ConsumerConfig {
            name: name.into(),
            stream: stream.into(),
            handler: "h".into(),
            dead_letter_subject: "dlq.x".into(),
            ..ConsumerConfig::default()
        })
    }

    fn v(text: &str) -> ServerVersion {
        ServerVersion::parse(text).unwrap_or_default()
    }

    fn actual(version: &str, streams: &[StreamSpec], consumers: &[ConsumerSpec]) -> Actual {
        Actual {
            server_version: v(version),
            streams: streams
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            consumers: consumers
                .iter()
                .map(|c| ((c.stream.clone(), c.name.clone()), c.clone()))
                .collect(),
            kv_buckets: HashMap::new(),
        }
    }

    fn fields(action: &Action) -> (Vec<&'static str>, Vec<&'static str>) {
        match action {
            Action::Update(ch) => (ch.iter().map(|c| c.field).collect(), vec![]),
            Action::Conflict { conflicts, changes } => (
                changes.iter().map(|c| c.field).collect(),
                conflicts.iter().map(|c| c.change.field).collect(),
            ),
            _ => (vec![], vec![]),
        }
    }

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
    fn empty_server_creates_everything() {
        let desired = Desired {
            streams: vec![stream("EVENTS"), stream("DLQ")],
            consumers: vec![consumer("EVENTS", "clicks")],
            ..Desired::default()
        };
        let p = plan(&desired, &Actual::default());
        assert!(p.streams.iter().all(|s| s.action == Action::Create));
        assert_eq!(p.consumers[0].action, Action::Create);
        assert!(p.has_changes());
        assert!(!p.has_conflicts());
    }

    #[test]
    fn same_state_is_unchanged() {
        let desired = Desired {
            streams: vec![stream("EVENTS")],
            consumers: vec![consumer("EVENTS", "clicks")],
            ..Desired::default()
        };
        let p = plan(
            &desired,
            &actual("2.9.10", &desired.streams, &desired.consumers),
        );
        assert!(!p.has_changes(), "{p}");
        assert_eq!(p.streams[0].action, Action::Unchanged);
        assert_eq!(p.consumers[0].action, Action::Unchanged);
    }

    /// (what changes on the server side, expected updated fields, expected conflicts)
    #[test]
    fn stream_field_table() {
        type Edit = fn(&mut StreamSpec);
        let table: Vec<(&str, Edit, Vec<&str>, Vec<&str>)> = vec![
            (
                "max_age",
                |s| s.max_age = Duration::from_secs(60),
                vec!["max_age"],
                vec![],
            ),
            ("max_bytes", |s| s.max_bytes = 10, vec!["max_bytes"], vec![]),
            ("max_msgs", |s| s.max_msgs = 10, vec!["max_msgs"], vec![]),
            (
                "max_msg_size",
                |s| s.max_msg_size = 10,
                vec!["max_msg_size"],
                vec![],
            ),
            (
                "subjects",
                |s| s.subjects = vec!["other.>".into()],
                vec!["subjects"],
                vec![],
            ),
            ("replicas", |s| s.replicas = 3, vec!["replicas"], vec![]),
            (
                "discard",
                |s| s.discard = config::Discard::New,
                vec!["discard"],
                vec![],
            ),
            (
                "dup",
                |s| s.duplicate_window = Duration::from_secs(5),
                vec!["duplicate_window"],
                vec![],
            ),
            (
                "description",
                |s| s.description = "x".into(),
                vec!["description"],
                vec![],
            ),
            (
                "storage",
                |s| s.storage = config::Storage::Memory,
                vec![],
                vec!["storage"],
            ),
            (
                "retention",
                |s| s.retention = config::Retention::Workqueue,
                vec![],
                vec!["retention"],
            ),
            (
                "storage and max_age",
                |s| {
                    s.storage = config::Storage::Memory;
                    s.max_age = Duration::from_secs(1);
                },
                vec!["max_age"],
                vec!["storage"],
            ),
        ];
        for (name, edit, updated, conflicts) in table {
            let want = stream("EVENTS");
            let mut have = want.clone();
            edit(&mut have);
            let desired = Desired {
                streams: vec![want],
                consumers: vec![],
                ..Desired::default()
            };
            let p = plan(&desired, &actual("2.9.10", &[have], &[]));
            let action = &p.streams[0].action;
            assert_eq!(fields(action), (updated, conflicts.clone()), "{name}: {p}");
            assert_eq!(p.has_conflicts(), !conflicts.is_empty(), "{name}");
        }
    }

    #[test]
    fn consumer_field_table() {
        type Edit = fn(&mut ConsumerSpec);
        /// (case, server version, edit of the server side, updated fields, conflicts)
        type Row = (
            &'static str,
            &'static str,
            Edit,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let table: Vec<Row> = vec![
            (
                "ack_wait",
                "2.9.10",
                |c| c.ack_wait = Duration::from_secs(5),
                vec!["ack_wait"],
                vec![],
            ),
            (
                "max_deliver",
                "2.9.10",
                |c| c.max_deliver = 9,
                vec!["max_deliver"],
                vec![],
            ),
            (
                "max_ack_pending",
                "2.9.10",
                |c| c.max_ack_pending = 9,
                vec!["max_ack_pending"],
                vec![],
            ),
            (
                "backoff set by hand",
                "2.9.10",
                |c| c.backoff = vec![Duration::from_secs(1)],
                vec!["server backoff"],
                vec![],
            ),
            (
                "inactive",
                "2.9.10",
                |c| c.inactive_threshold = Duration::from_secs(5),
                vec!["inactive_threshold"],
                vec![],
            ),
            (
                "description",
                "2.9.10",
                |c| c.description = "d".into(),
                vec!["description"],
                vec![],
            ),
            (
                "deliver policy is creation-only",
                "2.9.10",
                |c| c.deliver_policy = config::DeliverPolicy::New,
                vec![],
                vec![],
            ),
            (
                "filter on 2.9",
                "2.9.10",
                |c| c.filter_subject = "events.x".into(),
                vec![],
                vec!["filter_subject"],
            ),
            (
                "filter on 2.10",
                "2.10.0",
                |c| c.filter_subject = "events.x".into(),
                vec!["filter_subject"],
                vec![],
            ),
            ("push", "2.14.0", |c| c.pull = false, vec![], vec!["pull"]),
            (
                "ack all",
                "2.14.0",
                |c| c.ack_mode = AckMode::All,
                vec![],
                vec!["ack_policy"],
            ),
        ];
        for (name, version, edit, updated, conflicts) in table {
            let want = consumer("EVENTS", "clicks");
            let mut have = want.clone();
            edit(&mut have);
            let desired = Desired {
                streams: vec![stream("EVENTS")],
                consumers: vec![want],
                ..Desired::default()
            };
            let p = plan(
                &desired,
                &actual(version, &desired.streams.clone(), &[have]),
            );
            assert_eq!(
                fields(&p.consumers[0].action),
                (updated.clone(), conflicts.clone()),
                "{name}: {p}"
            );
            if updated.is_empty() && conflicts.is_empty() {
                assert_eq!(p.consumers[0].action, Action::Unchanged, "{name}");
            }
        }
    }

    #[test]
    fn conflict_message_names_field_and_advice() {
        let want = stream("EVENTS");
        let mut have = want.clone();
        have.storage = config::Storage::Memory;
        let p = plan(
            &Desired {
                streams: vec![want],
                consumers: vec![],
                ..Desired::default()
            },
            &actual("2.9.10", &[have], &[]),
        );
        let text = p.to_string();
        assert!(text.contains("stream EVENTS: conflict"), "{text}");
        assert!(text.contains("storage: memory -> file"), "{text}");
        assert!(text.contains("new name"), "{text}");
    }

    #[test]
    fn consumer_of_new_stream_is_created() {
        let desired = Desired {
            streams: vec![stream("EVENTS")],
            consumers: vec![consumer("EVENTS", "clicks")],
            ..Desired::default()
        };
        let p = plan(&desired, &actual("2.9.10", &[], &[]));
        assert_eq!(p.consumers[0].action, Action::Create);
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
    fn kv_bucket_table() {
        let want = kv_spec(&config::KvBucketConfig {
            name: "analytics".into(),
            ..Default::default()
        });
        let desired = Desired {
            kv_buckets: vec![want.clone()],
            ..Desired::default()
        };
        let p = plan(&desired, &Actual::default());
        assert_eq!(p.kv_buckets[0].action, Action::Create);

        let mut actual = Actual::default();
        actual.kv_buckets.insert("analytics".into(), want.clone());
        assert_eq!(
            plan(&desired, &actual).kv_buckets[0].action,
            Action::Unchanged
        );

        let mut have = want.clone();
        have.history = 5;
        actual.kv_buckets.insert("analytics".into(), have);
        assert_eq!(
            fields(&plan(&desired, &actual).kv_buckets[0].action),
            (vec!["history"], vec![])
        );

        let mut have = want.clone();
        have.storage = config::Storage::Memory;
        actual.kv_buckets.insert("analytics".into(), have);
        let p = plan(&desired, &actual);
        assert_eq!(fields(&p.kv_buckets[0].action), (vec![], vec!["storage"]));
        assert!(
            p.to_string().contains("kv bucket analytics: conflict"),
            "{p}"
        );

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
