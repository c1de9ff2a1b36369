//! Validation, separate from parsing: [`Config::problems`] reports every problem at
//! once, each with the key path it is about, section by section (connection, worker,
//! streams, key-value buckets, consumers), then the names jetworker derives from the
//! config's names (see [`derived_name_problems`]). Pure: no I/O.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::schema::{
    Config, ConnectionConfig, ConsumerConfig, Discard, KvBucketConfig, Retention, StreamConfig,
    WorkerConfig,
};
use super::server_url::UrlCredentials;
use crate::{dead_letter, partition, safety_net, subject};

/// One problem in a config: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Key path, e.g. `consumers[1].max_deliver`.
    pub key: String,
    /// What is wrong and, where useful, what to do.
    pub message: String,
}

/// The problems found so far, in the order they are found.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }
}

impl Config {
    /// Every validation problem in this config (empty when valid). Pure: no I/O.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Problems::default();
        connection_problems(&self.connection, &mut problems);
        worker_problems(&self.worker, &mut problems);
        stream_problems(&self.streams, &mut problems);
        kv_bucket_problems(&self.kv_buckets, &mut problems);
        consumer_problems(&self.consumers, &self.streams, &mut problems);
        derived_name_problems(self, &mut problems);
        problems.0
    }
}

/// `[connection]`: servers, one auth mode, TLS files in pairs, the inbox prefix, timeouts.
fn connection_problems(c: &ConnectionConfig, problems: &mut Problems) {
    if c.servers.is_empty() {
        problems.add("connection.servers", "at least one server URL is required");
    }
    for (i, url) in c.servers.iter().enumerate() {
        if url.expose().trim().is_empty() || url.expose().contains(char::is_whitespace) {
            problems.add(
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
            Some((first, known)) if !known.same_as(&found) => problems.add(
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
        problems.add(
            "connection",
            "more than one auth mode is set (user/password, token, nkey_seed_file, creds_file): keep one",
        );
    }
    if c.jetstream_domain.is_some() && c.jetstream_api_prefix.is_some() {
        problems.add(
            "connection.jetstream_api_prefix",
            "set either jetstream_domain or jetstream_api_prefix (a domain is the prefix $JS.<domain>.API)",
        );
    }
    if c.user.is_some() != c.password.is_some() {
        problems.add(
            if c.user.is_some() {
                "connection.password"
            } else {
                "connection.user"
            },
            "user and password go together: set both or neither",
        );
    }
    if c.tls.cert_file.is_some() != c.tls.key_file.is_some() {
        problems.add(
            if c.tls.cert_file.is_some() {
                "connection.tls.key_file"
            } else {
                "connection.tls.cert_file"
            },
            "a client certificate needs its key (cert_file and key_file go together)",
        );
    }
    if let Some(prefix) = &c.inbox_prefix {
        if let Err(e) = subject::validate_literal(prefix) {
            problems.add("connection.inbox_prefix", format!("{e}: {prefix:?}"));
        } else if prefix.starts_with('$') {
            problems.add(
                "connection.inbox_prefix",
                format!("{prefix:?}: subjects starting with '$' are the server's own"),
            );
        }
    }
    if c.connect_timeout.is_zero() {
        problems.add("connection.connect_timeout", "must be more than 0s");
    }
    if c.request_timeout.is_zero() {
        problems.add("connection.request_timeout", "must be more than 0s");
    }
    if c.ping_interval < Duration::from_secs(1) {
        problems.add("connection.ping_interval", "must be at least 1s");
    }
}

/// `[worker]`: the ops address.
fn worker_problems(w: &WorkerConfig, problems: &mut Problems) {
    if !w.ops_listen.is_empty() && w.ops_listen.parse::<std::net::SocketAddr>().is_err() {
        problems.add(
            "worker.ops_listen",
            format!(
                "not an address: {:?} (expected e.g. \"127.0.0.1:9090\", or \"\" to disable)",
                w.ops_listen
            ),
        );
    }
}

/// `[[streams]]`: each stream's fields, then subjects two streams would both capture.
fn stream_problems(streams: &[StreamConfig], problems: &mut Problems) {
    let mut stream_names: HashMap<&str, usize> = HashMap::new();
    for (i, s) in streams.iter().enumerate() {
        let key = |field: &str| format!("streams[{i}].{field}");
        if let Some(why) = name_problem(&s.name) {
            problems.add(key("name"), why);
        } else if let Some(first) = stream_names.insert(&s.name, i) {
            problems.add(
                key("name"),
                format!("duplicate stream name {:?} (also streams[{first}])", s.name),
            );
        }
        if s.subjects.is_empty() {
            problems.add(key("subjects"), "at least one subject is required");
        }
        let mut seen = HashSet::new();
        for (j, subj) in s.subjects.iter().enumerate() {
            if let Err(e) = subject::validate_filter(subj) {
                problems.add(
                    format!("streams[{i}].subjects[{j}]"),
                    format!("{e}: {subj:?}"),
                );
            } else if !seen.insert(subj) {
                problems.add(
                    format!("streams[{i}].subjects[{j}]"),
                    format!("duplicate subject {subj:?}"),
                );
            }
        }
        if s.replicas == 0 || s.replicas > 5 {
            problems.add(
                key("replicas"),
                format!("must be 1 to 5, got {}", s.replicas),
            );
        }
        for (field, value) in [("max_bytes", s.max_bytes), ("max_msgs", s.max_msgs)] {
            if matches!(value, Some(v) if v <= 0) {
                problems.add(key(field), "must be positive (leave it out for unlimited)");
            }
        }
        if matches!(s.max_msg_size, Some(v) if v <= 0) {
            problems.add(
                key("max_msg_size"),
                "must be positive (leave it out for unlimited)",
            );
        }
        if matches!(s.max_age, Some(d) if d.is_zero()) {
            problems.add(
                key("max_age"),
                "must be more than 0s (leave it out for unlimited)",
            );
        }
        if let Some(window) = s.duplicate_window {
            if window.is_zero() {
                problems.add(key("duplicate_window"), "must be more than 0s");
            }
            if matches!(s.max_age, Some(age) if window > age) {
                problems.add(key("duplicate_window"), "must not be longer than max_age");
            }
        }
    }
    // Two streams may not capture the same subjects: the server refuses it.
    for (i, a) in streams.iter().enumerate() {
        for b in streams.iter().skip(i + 1) {
            for sa in &a.subjects {
                if let Some(sb) = b.subjects.iter().find(|sb| subject::overlaps(sa, sb)) {
                    problems.add(
                        format!("streams[{i}].subjects"),
                        format!("{sa:?} overlaps {sb:?} of stream {:?}: a subject can belong to one stream only", b.name),
                    );
                }
            }
        }
    }
}

/// `[[kv_buckets]]`: names, history, replicas, max_age.
fn kv_bucket_problems(buckets: &[KvBucketConfig], problems: &mut Problems) {
    let mut bucket_names: HashMap<&str, usize> = HashMap::new();
    for (i, b) in buckets.iter().enumerate() {
        let key = |field: &str| format!("kv_buckets[{i}].{field}");
        if b.name.is_empty() {
            problems.add(key("name"), "required");
        } else if !b
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.add(
                key("name"),
                format!(
                    "{:?}: bucket names may hold only letters, digits, '_' and '-'",
                    b.name
                ),
            );
        } else if let Some(first) = bucket_names.insert(&b.name, i) {
            problems.add(
                key("name"),
                format!(
                    "duplicate bucket name {:?} (also kv_buckets[{first}])",
                    b.name
                ),
            );
        }
        if !(1..=64).contains(&b.history) {
            problems.add(
                key("history"),
                format!("must be 1 to 64, got {}", b.history),
            );
        }
        if b.replicas == 0 || b.replicas > 5 {
            problems.add(
                key("replicas"),
                format!("must be 1 to 5, got {}", b.replicas),
            );
        }
        if matches!(b.max_age, Some(d) if d.is_zero()) {
            problems.add(
                key("max_age"),
                "must be more than 0s (leave it out to keep entries)",
            );
        }
    }
}

/// `[[consumers]]`: each consumer against the streams it names.
fn consumer_problems(
    consumers: &[ConsumerConfig],
    streams: &[StreamConfig],
    problems: &mut Problems,
) {
    let mut consumer_names: HashMap<&str, usize> = HashMap::new();
    for (i, cons) in consumers.iter().enumerate() {
        let key = |field: &str| format!("consumers[{i}].{field}");
        if let Some(why) = name_problem(&cons.name) {
            problems.add(key("name"), why);
        } else if let Some(first) = consumer_names.insert(&cons.name, i) {
            let message = if consumers[first].stream == cons.stream {
                format!(
                    "duplicate consumer {:?} on stream {:?} (also consumers[{first}])",
                    cons.name, cons.stream
                )
            } else {
                format!(
                    "duplicate consumer name {:?} (also consumers[{first}], on stream {:?}): {CONSUMER_NAME_CLASH}; rename one of them",
                    cons.name, consumers[first].stream
                )
            };
            problems.add(key("name"), message);
        }
        let stream = streams.iter().find(|s| s.name == cons.stream);
        reading_problems(cons, stream, &key, problems);
        delivery_problems(cons, &key, problems);
        batch_problems(cons, &key, problems);
        ordering_problems(cons, &key, problems);
        partition_problems(cons, &key, problems);
        dead_letter_problems(cons, consumers, streams, &key, problems);
    }
}

/// What a consumer reads and runs: its stream, handler, filter and limits.
fn reading_problems(
    cons: &ConsumerConfig,
    stream: Option<&StreamConfig>,
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    if cons.stream.is_empty() {
        problems.add(key("stream"), "required: the stream this consumer reads");
    } else if stream.is_none() {
        problems.add(
            key("stream"),
            format!(
                "unknown stream {:?}: declare it under [[streams]]",
                cons.stream
            ),
        );
    }
    if cons.handler.trim().is_empty() {
        problems.add(
            key("handler"),
            "required: the name of the handler function that processes these messages",
        );
    }
    if let Some(filter) = &cons.filter_subject {
        if let Err(e) = subject::validate_filter(filter) {
            problems.add(key("filter_subject"), format!("{e}: {filter:?}"));
        } else if let Some(s) = stream {
            if !s.subjects.iter().any(|ss| subject::overlaps(ss, filter)) {
                problems.add(
                    key("filter_subject"),
                    format!("{filter:?} matches none of stream {:?}'s subjects", s.name),
                );
            }
        }
    }
    if cons.ack_wait < Duration::from_secs(1) {
        problems.add(key("ack_wait"), "must be at least 1s");
    }
}

/// How a consumer retries, and how much it holds and runs at once.
fn delivery_problems(cons: &ConsumerConfig, key: &dyn Fn(&str) -> String, problems: &mut Problems) {
    if cons.max_deliver < 1 {
        problems.add(key("max_deliver"), format!("must be at least 1 (unlimited redelivery is not allowed: a poison message would loop forever), got {}", cons.max_deliver));
    }
    if let Some(backoff) = &cons.backoff {
        if backoff.is_empty() {
            problems.add(
                key("backoff"),
                "must list at least one delay (leave it out for the default schedule)",
            );
        }
        if backoff.iter().any(|d| d.is_zero()) {
            problems.add(key("backoff"), "delays must be more than 0s: an immediate retry burns through max_deliver in milliseconds");
        }
        let retries = cons.max_deliver.max(1) - 1;
        if backoff.len() as i64 > retries {
            problems.add(key("backoff"), format!(
                "{} delays but max_deliver {} allows only {retries} retr{}: shorten the schedule or raise max_deliver",
                backoff.len(), cons.max_deliver, if retries == 1 { "y" } else { "ies" }
            ));
        }
    }
    if cons.max_ack_pending < 1 {
        problems.add(key("max_ack_pending"), "must be at least 1");
    }
    if cons.concurrency < 1 {
        problems.add(key("concurrency"), "must be at least 1");
    } else if cons.concurrency > cons.max_ack_pending && cons.max_ack_pending >= 1 {
        problems.add(
            key("concurrency"),
            format!(
                "{} is above max_ack_pending {}: the server would never let that many messages out",
                cons.concurrency, cons.max_ack_pending
            ),
        );
    }
    if cons.handler_timeout.is_zero() {
        problems.add(key("handler_timeout"), "must be more than 0s");
    }
    if cons.max_payload_bytes < 1 {
        problems.add(key("max_payload_bytes"), "must be at least 1");
    }
}

/// The batch keys: positive sizes, a batch the server can let out whole, and a wait to
/// fill that ends well before the ack wait.
fn batch_problems(cons: &ConsumerConfig, key: &dyn Fn(&str) -> String, problems: &mut Problems) {
    if let Some(max_batch) = cons.max_batch {
        if max_batch < 1 {
            problems.add(key("max_batch"), "must be at least 1");
        } else if max_batch > cons.max_ack_pending && cons.max_ack_pending >= 1 {
            problems.add(
                key("max_batch"),
                format!(
                    "{max_batch} is above max_ack_pending {}: the server would never let a full batch out",
                    cons.max_ack_pending
                ),
            );
        }
    }
    if matches!(cons.max_batch_bytes, Some(bytes) if bytes < 1) {
        problems.add(key("max_batch_bytes"), "must be at least 1");
    }
    if let Some(wait) = cons.max_batch_wait {
        if wait.is_zero() {
            problems.add(key("max_batch_wait"), "must be more than 0s");
        } else if wait >= cons.ack_wait / 2 {
            problems.add(
                key("max_batch_wait"),
                format!(
                    "{} is not below half the ack_wait {}: messages waiting for their batch to fill would be redelivered",
                    humantime::format_duration(wait),
                    humantime::format_duration(cons.ack_wait)
                ),
            );
        }
    }
}

/// `ordered_by`: exactly one place to find the key, and a header or function name that
/// is not empty.
fn ordering_problems(cons: &ConsumerConfig, key: &dyn Fn(&str) -> String, problems: &mut Problems) {
    let Some(by) = &cons.ordered_by else { return };
    let set = [
        by.subject_token.is_some(),
        by.header.is_some(),
        by.function.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        problems.add(
            key("ordered_by"),
            "set exactly one of subject_token, header and function: where a message's key is",
        );
    }
    if by.header.as_deref().is_some_and(|h| h.trim().is_empty()) {
        problems.add(key("ordered_by.header"), "must name a header");
    }
    if by.function.as_deref().is_some_and(|f| f.trim().is_empty()) {
        problems.add(
            key("ordered_by.function"),
            "must name a key function registered with App::key",
        );
    }
}

/// `partitions`: only with `ordered_by`, a count in range, a lease, and a filter with a
/// `*` at the partition token.
fn partition_problems(
    cons: &ConsumerConfig,
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    let Some(p) = &cons.partitions else { return };
    if cons.ordered_by.is_none() {
        problems.add(
            key("partitions"),
            "needs ordered_by: partitions keep the order of a key across replicas",
        );
    }
    if !(1..=1024).contains(&p.count) {
        problems.add(key("partitions.count"), "must be 1 to 1024");
    }
    if p.lease < Duration::from_secs(1) {
        problems.add(key("partitions.lease"), "must be at least 1s");
    }
    let token = cons
        .filter_subject
        .as_deref()
        .and_then(|f| f.split('.').nth(p.subject_token));
    if token != Some("*") {
        problems.add(
            key("partitions.subject_token"),
            format!(
                "filter_subject needs a `*` at token {} (the partition number), e.g. \"orders.*.>\"",
                p.subject_token
            ),
        );
    }
}

/// Where a consumer's dead letters go: a literal subject some declared stream keeps,
/// and not one the consumer reads itself.
fn dead_letter_problems(
    cons: &ConsumerConfig,
    consumers: &[ConsumerConfig],
    streams: &[StreamConfig],
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    let dls = &cons.dead_letter_subject;
    if dls.is_empty() {
        problems.add(key("dead_letter_subject"), "required: where messages that cannot be processed are kept (a subject captured by a declared stream)");
    } else if let Err(e) = subject::validate_literal(dls) {
        problems.add(key("dead_letter_subject"), format!("{e}: {dls:?}"));
    } else {
        match streams.iter().find(|s| s.subjects.iter().any(|ss| subject::overlaps(ss, dls))) {
            None => problems.add(key("dead_letter_subject"), format!("{dls:?} is captured by no declared stream: dead letters would be lost; add it to a stream's subjects")),
            Some(dl_stream) if dl_stream.name == cons.stream => {
                let reads_it = match &cons.filter_subject {
                    Some(filter) => subject::overlaps(filter, dls),
                    None => true,
                };
                if reads_it {
                    problems.add(key("dead_letter_subject"), format!("{dls:?} would be read by this consumer itself (a dead-letter loop): use a subject outside its filter, in another stream"));
                }
                keeping_problems(cons, consumers, streams, dl_stream, key, problems);
            }
            Some(dl_stream) => keeping_problems(cons, consumers, streams, dl_stream, key, problems),
        }
    }
}

/// Whether the dead-letter stream keeps what it acknowledges, by the rules a running
/// worker applies to the server's stream ([`crate::dead_letter::keeping_problems`]):
/// refused here, before anything runs.
fn keeping_problems(
    cons: &ConsumerConfig,
    consumers: &[ConsumerConfig],
    streams: &[StreamConfig],
    dl_stream: &StreamConfig,
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    let at = streams
        .iter()
        .position(|s| s.name == dl_stream.name)
        .map(|j| format!("streams[{j}]"))
        .unwrap_or_else(|| "streams".to_string());
    let facts = crate::dead_letter::KeepingFacts {
        stream: &dl_stream.name,
        interest_retention: dl_stream.retention == Retention::Interest,
        read: consumers.iter().any(|c| c.stream == dl_stream.name),
        discard_new: dl_stream.discard == Discard::New,
        limited: dl_stream.max_msgs.is_some() || dl_stream.max_bytes.is_some(),
        max_msg_size: dl_stream.max_msg_size.map(i64::from),
        source_stream: &cons.stream,
        source_max_msg_size: streams
            .iter()
            .find(|s| s.name == cons.stream)
            .and_then(|s| s.max_msg_size)
            .map(i64::from),
    };
    for problem in crate::dead_letter::keeping_problems(&facts) {
        problems.add(
            key("dead_letter_subject"),
            problem.describe(&cons.dead_letter_subject, &facts, Some(&at)),
        );
    }
}

/// Why two consumers of one config may not share a name, even on two streams.
const CONSUMER_NAME_CLASH: &str = "the worker tells its consumers apart by name alone (metrics, /readyz, logs, status, `dlq --consumer`), so the two would share their counters and health";

/// Where a name must be unique (on the server, or in the worker).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Namespace {
    /// Streams of the account (key-value and object buckets are streams too).
    Stream,
    /// Durable consumers of one stream.
    Consumer(String),
    /// Key-value buckets.
    KvBucket,
    /// Object-store buckets.
    ObjectBucket,
    /// The names the worker tells its consumers apart by, on every stream.
    ConsumerName,
}

impl Namespace {
    /// What two things of one name in this namespace would do.
    fn clash(&self) -> &'static str {
        match self {
            Namespace::Stream => "the two would be one stream on the server",
            Namespace::Consumer(_) => {
                "the two would be one durable consumer on the server, each run taking the other's messages"
            }
            Namespace::KvBucket => "the two would be one key-value bucket on the server",
            Namespace::ObjectBucket => "the two would be one object-store bucket on the server",
            Namespace::ConsumerName => CONSUMER_NAME_CLASH,
        }
    }
}

/// Who has a name: the key path it comes from, what it is, and whether the file
/// declares it as such (two declared names are checked by their own sections).
#[derive(Clone)]
struct Claim {
    key: String,
    what: String,
    declared: bool,
}

/// The names the config declares and those jetworker derives from them, each claimed
/// once per namespace.
#[derive(Default)]
struct NameClaims(HashMap<(Namespace, String), Claim>);

impl NameClaims {
    /// Claims `name` in `namespace` for `claim`: a name claimed before is a problem at
    /// `claim.key`, naming both keys (unless both are declared names); so is a derived
    /// name the server would not take. True when the name is claimed.
    fn claim(
        &mut self,
        namespace: Namespace,
        name: String,
        claim: Claim,
        problems: &mut Problems,
    ) -> bool {
        if !claim.declared {
            if let Some(why) = name_problem(&name) {
                problems.add(
                    &claim.key,
                    format!(
                        "{} would be named {name:?}: {why}; shorten the names it is made of",
                        claim.what
                    ),
                );
                return false;
            }
        }
        match self.0.entry((namespace, name)) {
            Entry::Vacant(free) => {
                free.insert(claim);
                true
            }
            Entry::Occupied(taken) => {
                let (namespace, name) = taken.key();
                let first = taken.get();
                if !(first.declared && claim.declared) {
                    problems.add(
                        &claim.key,
                        format!(
                            "{} is named {name:?}, as is {} ({}): {}; rename one of them",
                            claim.what,
                            first.what,
                            first.key,
                            namespace.clash()
                        ),
                    );
                }
                false
            }
        }
    }
}

/// The names jetworker derives from the config's names may not collide with a declared
/// name or with each other, nor be longer than the server takes: the durables of a
/// partitioned consumer's partitions (`<name>-<i>`), the lease buckets (see
/// [`partition::partition_lease_bucket`]) and the streams behind buckets (`KV_<bucket>`,
/// `OBJ_<bucket>`), the safety net's stream and durables
/// ([`safety_net::safety_net_consumer_name`]), and the payload buckets of dead-letter
/// streams ([`dead_letter::payload_bucket`]). Names that are invalid themselves are
/// reported by their sections and left out here.
fn derived_name_problems(config: &Config, problems: &mut Problems) {
    let mut claims = NameClaims::default();
    let declared = |key: String, what: String| Claim {
        key,
        what,
        declared: true,
    };
    let derived = |key: String, what: String| Claim {
        key,
        what,
        declared: false,
    };
    let valid = |name: &str| name_problem(name).is_none();
    // Declared names first: a derived name that collides is reported at its own key.
    for (i, s) in config
        .streams
        .iter()
        .enumerate()
        .filter(|(_, s)| valid(&s.name))
    {
        let claim = declared(format!("streams[{i}].name"), format!("stream {:?}", s.name));
        claims.claim(Namespace::Stream, s.name.clone(), claim, problems);
    }
    let valid_bucket = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let buckets = config.kv_buckets.iter().enumerate();
    for (i, b) in buckets.clone().filter(|(_, b)| valid_bucket(&b.name)) {
        let claim = declared(
            format!("kv_buckets[{i}].name"),
            format!("key-value bucket {:?}", b.name),
        );
        claims.claim(Namespace::KvBucket, b.name.clone(), claim, problems);
    }
    let consumers = config
        .consumers
        .iter()
        .enumerate()
        .filter(|(_, c)| valid(&c.name) && valid(&c.stream));
    // The consumers whose own durable is theirs alone (the safety net's durables follow).
    let mut own_durable = HashSet::new();
    for (i, c) in consumers.clone().filter(|(_, c)| c.partitions.is_none()) {
        let claim = declared(
            format!("consumers[{i}].name"),
            format!("consumer {:?} of stream {:?}", c.name, c.stream),
        );
        claims.claim(
            Namespace::ConsumerName,
            c.name.clone(),
            claim.clone(),
            problems,
        );
        if claims.claim(
            Namespace::Consumer(c.stream.clone()),
            c.name.clone(),
            claim,
            problems,
        ) {
            own_durable.insert(i);
        }
    }
    // The streams behind the declared buckets.
    for (i, b) in buckets.filter(|(_, b)| valid_bucket(&b.name)) {
        let claim = derived(
            format!("kv_buckets[{i}].name"),
            format!("the stream of key-value bucket {:?}", b.name),
        );
        claims.claim(Namespace::Stream, format!("KV_{}", b.name), claim, problems);
    }
    if !config.consumers.is_empty() {
        let claim = derived(
            "consumers".to_owned(),
            "the safety net's advisory stream (jetworker's own, for the max-deliveries advisories of every consumer)".to_owned(),
        );
        claims.claim(
            Namespace::Stream,
            safety_net::ADVISORY_STREAM.to_owned(),
            claim,
            problems,
        );
    }
    for (i, c) in consumers {
        let partitions = partition::partition_consumer_names(c);
        let lease_key = match &c.partitions {
            Some(_) => format!("consumers[{i}].partitions"),
            None => format!("consumers[{i}].ordered_by"),
        };
        if let Some(bucket) = partition::partition_lease_bucket(c) {
            let what = format!(
                "the lease bucket of consumer {:?} of stream {:?}",
                c.name, c.stream
            );
            claims.claim(
                Namespace::KvBucket,
                bucket.clone(),
                derived(lease_key.clone(), what.clone()),
                problems,
            );
            let claim = derived(lease_key.clone(), format!("the stream of {what}"));
            claims.claim(Namespace::Stream, format!("KV_{bucket}"), claim, problems);
        }
        let count = partitions.len();
        let mut durables = Vec::new();
        for (index, name) in partitions.into_iter().enumerate() {
            let what = format!(
                "partition {index} of consumer {:?} of stream {:?} ({count} partitions)",
                c.name, c.stream
            );
            let namespace = Namespace::Consumer(c.stream.clone());
            if claims.claim(
                namespace,
                name.clone(),
                derived(lease_key.clone(), what.clone()),
                problems,
            ) {
                // Reported once: a partition taking a durable's name on its own stream
                // is reported above.
                claims.claim(
                    Namespace::ConsumerName,
                    name.clone(),
                    derived(lease_key.clone(), what),
                    problems,
                );
                durables.push(name);
            }
        }
        if own_durable.contains(&i) {
            durables.push(c.name.clone());
        }
        // The safety net runs a durable for every durable the consumer stands for (those
        // that collided are reported already).
        let key = if c.partitions.is_some() {
            lease_key
        } else {
            format!("consumers[{i}].name")
        };
        for durable in durables {
            let what = format!(
                "the safety net's durable for consumer {durable:?} of stream {:?}",
                c.stream
            );
            let name = safety_net::safety_net_consumer_name(&c.stream, &durable);
            let namespace = Namespace::Consumer(safety_net::ADVISORY_STREAM.to_owned());
            claims.claim(namespace, name, derived(key.clone(), what), problems);
        }
    }
    // The payload bucket of each dead-letter stream, once per stream.
    let mut dead_letter_streams: Vec<usize> = config
        .consumers
        .iter()
        .filter_map(|c| {
            config.streams.iter().position(|s| {
                s.subjects
                    .iter()
                    .any(|ss| subject::overlaps(ss, &c.dead_letter_subject))
            })
        })
        .filter(|j| valid(&config.streams[*j].name))
        .collect();
    dead_letter_streams.sort_unstable();
    dead_letter_streams.dedup();
    for j in dead_letter_streams {
        let stream = &config.streams[j].name;
        let bucket = dead_letter::payload_bucket(stream);
        let what = format!("the payload bucket of dead-letter stream {stream:?}");
        let key = format!("streams[{j}].name");
        claims.claim(
            Namespace::ObjectBucket,
            bucket.clone(),
            derived(key.clone(), what.clone()),
            problems,
        );
        let claim = derived(key, format!("the stream of {what}"));
        claims.claim(Namespace::Stream, format!("OBJ_{bucket}"), claim, problems);
    }
}

/// What is wrong with a stream or consumer name, if anything: the server accepts a
/// name that fits in a subject token.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("required".into());
    }
    if name.len() > 255 {
        return Some("longer than 255 characters".into());
    }
    name.chars()
        .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control())
        .map(|c| {
            format!(
                "{name:?} contains {c:?}: names may not contain '.', '*', '>', slashes or whitespace"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerUrl;

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

    #[test]
    fn batch_keys_are_checked() {
        let consumer = |max_batch, max_batch_bytes, max_batch_wait| ConsumerConfig {
            max_batch,
            max_batch_bytes,
            max_batch_wait,
            ..ConsumerConfig::default()
        };
        let keys = |c: &ConsumerConfig| {
            let mut problems = Problems::default();
            batch_problems(c, &|field| format!("consumers[0].{field}"), &mut problems);
            problems.0.into_iter().map(|p| p.key).collect::<Vec<_>>()
        };
        assert!(
            keys(&consumer(None, None, None)).is_empty(),
            "defaults are valid"
        );
        assert!(keys(&consumer(
            Some(500),
            Some(1),
            Some(Duration::from_millis(200))
        ))
        .is_empty());
        assert_eq!(
            keys(&consumer(Some(0), Some(0), Some(Duration::ZERO))),
            [
                "consumers[0].max_batch",
                "consumers[0].max_batch_bytes",
                "consumers[0].max_batch_wait"
            ]
        );
        // Above max_ack_pending (10000), and a wait of half the ack wait (30s).
        assert_eq!(
            keys(&consumer(Some(10_001), None, Some(Duration::from_secs(15)))),
            ["consumers[0].max_batch", "consumers[0].max_batch_wait"]
        );
    }

    #[test]
    fn ordered_by_names_exactly_one_place() {
        use crate::config::OrderedBy;
        let with = |by: OrderedBy| {
            let consumer = ConsumerConfig {
                ordered_by: Some(by),
                ..ConsumerConfig::default()
            };
            let mut problems = Problems::default();
            ordering_problems(&consumer, &|f| format!("consumers[0].{f}"), &mut problems);
            problems.0.into_iter().map(|p| p.key).collect::<Vec<_>>()
        };
        let token = OrderedBy {
            subject_token: Some(1),
            ..OrderedBy::default()
        };
        assert!(with(token.clone()).is_empty());
        assert_eq!(with(OrderedBy::default()), ["consumers[0].ordered_by"]);
        let two = OrderedBy {
            header: Some("Order-Id".into()),
            ..token
        };
        assert_eq!(with(two), ["consumers[0].ordered_by"]);
        let blank = OrderedBy {
            function: Some(" ".into()),
            ..OrderedBy::default()
        };
        assert_eq!(with(blank), ["consumers[0].ordered_by.function"]);
    }

    #[test]
    fn partitions_need_an_order_a_count_a_lease_and_a_partition_token() {
        use crate::config::{OrderedBy, PartitionsConfig};
        let with = |consumer: ConsumerConfig| {
            let mut problems = Problems::default();
            partition_problems(&consumer, &|f| f.to_owned(), &mut problems);
            problems.0.into_iter().map(|p| p.key).collect::<Vec<_>>()
        };
        let good = ConsumerConfig {
            filter_subject: Some("orders.*.>".into()),
            ordered_by: Some(OrderedBy {
                subject_token: Some(2),
                ..OrderedBy::default()
            }),
            partitions: Some(PartitionsConfig::default()),
            ..ConsumerConfig::default()
        };
        assert!(with(good.clone()).is_empty());
        let bad = ConsumerConfig {
            filter_subject: Some("orders.eu.>".into()),
            ordered_by: None,
            partitions: Some(PartitionsConfig {
                count: 0,
                lease: Duration::from_millis(10),
                ..PartitionsConfig::default()
            }),
            ..good
        };
        assert_eq!(
            with(bad),
            [
                "partitions",
                "partitions.count",
                "partitions.lease",
                "partitions.subject_token"
            ]
        );
    }

    /// The problems [`derived_name_problems`] finds in `config`, as (key, message).
    fn derived(config: &Config) -> Vec<(String, String)> {
        let mut problems = Problems::default();
        derived_name_problems(config, &mut problems);
        problems.0.into_iter().map(|p| (p.key, p.message)).collect()
    }

    fn stream(name: &str, subject: &str) -> StreamConfig {
        StreamConfig {
            name: name.into(),
            subjects: vec![subject.into()],
            ..StreamConfig::default()
        }
    }

    fn consumer(name: &str, stream: &str) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            stream: stream.into(),
            dead_letter_subject: "dlq.x".into(),
            ..ConsumerConfig::default()
        }
    }

    fn partitioned(name: &str, stream: &str, count: u32) -> ConsumerConfig {
        use crate::config::{OrderedBy, PartitionsConfig};
        ConsumerConfig {
            filter_subject: Some("orders.*.>".into()),
            ordered_by: Some(OrderedBy {
                subject_token: Some(2),
                ..OrderedBy::default()
            }),
            partitions: Some(PartitionsConfig {
                count,
                ..PartitionsConfig::default()
            }),
            ..consumer(name, stream)
        }
    }

    fn ordered(name: &str, stream: &str) -> ConsumerConfig {
        ConsumerConfig {
            partitions: None,
            ..partitioned(name, stream, 1)
        }
    }

    fn with(consumers: Vec<ConsumerConfig>) -> Config {
        Config {
            streams: vec![
                stream("ORDERS", "orders.>"),
                stream("OTHER", "other.>"),
                stream("DLQ", "dlq.>"),
            ],
            consumers,
            ..Config::default()
        }
    }

    #[test]
    fn consumer_names_are_unique_across_streams() {
        let config = with(vec![
            consumer("archive", "ORDERS"),
            consumer("archive", "OTHER"),
        ]);
        let problems: Vec<(String, String)> = config
            .problems()
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect();
        let named: Vec<&(String, String)> = problems
            .iter()
            .filter(|(k, _)| k == "consumers[1].name")
            .collect();
        assert_eq!(named.len(), 1, "{problems:?}");
        let message = &named[0].1;
        assert!(
            message.contains("duplicate consumer name \"archive\"")
                && message.contains("also consumers[0], on stream \"ORDERS\"")
                && message.contains("share their counters and health"),
            "{message}"
        );
    }

    #[test]
    fn a_partition_durable_may_not_be_a_declared_consumer() {
        let clash = with(vec![
            partitioned("orders", "ORDERS", 4),
            consumer("orders-2", "ORDERS"),
        ]);
        let problems = derived(&clash);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (key, message) = &problems[0];
        assert_eq!(key, "consumers[0].partitions");
        assert!(
            message.contains("partition 2 of consumer \"orders\"")
                && message.contains("\"orders-2\"")
                && message.contains("(consumers[1].name)"),
            "{message}"
        );
        // The same name on another stream is another durable, but the worker names its
        // consumers (metrics, health) by name alone: refused too.
        let problems = derived(&with(vec![
            partitioned("orders", "ORDERS", 4),
            consumer("orders-2", "OTHER"),
        ]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (key, message) = &problems[0];
        assert_eq!(key, "consumers[0].partitions");
        assert!(
            message.contains("partition 2 of consumer \"orders\"")
                && message.contains("(consumers[1].name)")
                && message.contains("share their counters"),
            "{message}"
        );
        assert!(derived(&with(vec![
            partitioned("orders", "ORDERS", 2),
            consumer("orders-2", "ORDERS")
        ]))
        .is_empty());
        // Declared in the other order, the problem is still at the partitions.
        let problems = derived(&with(vec![
            consumer("orders-3", "ORDERS"),
            partitioned("orders", "ORDERS", 4),
        ]));
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["consumers[1].partitions"], "{problems:?}");
    }

    #[test]
    fn lease_buckets_may_not_collide() {
        // `_` joins stream and consumer: ("A_B", "c") and ("A", "B_c") share a bucket.
        let mut config = with(vec![ordered("c", "A_B"), ordered("B_c", "A")]);
        config
            .streams
            .extend([stream("A_B", "ab.>"), stream("A", "a.>")]);
        let problems = derived(&config);
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        // The bucket, and the stream behind it.
        assert_eq!(
            keys,
            ["consumers[1].ordered_by", "consumers[1].ordered_by"],
            "{problems:?}"
        );
        assert!(
            problems[0].1.contains("\"jw_leases_A_B_c\"")
                && problems[0].1.contains("(consumers[0].ordered_by)"),
            "{problems:?}"
        );
        // A declared bucket of that name would hold the leases with its own max_age.
        let mut config = with(vec![partitioned("orders", "ORDERS", 2)]);
        config.kv_buckets.push(KvBucketConfig {
            name: "jw_leases_ORDERS_orders".into(),
            ..KvBucketConfig::default()
        });
        let problems = derived(&config);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, "consumers[0].partitions");
        assert!(
            problems[0].1.contains("(kv_buckets[0].name)"),
            "{problems:?}"
        );
        // An unordered consumer has no lease.
        assert!(derived(&with(vec![consumer("c", "ORDERS"), consumer("c", "OTHER")])).is_empty());
    }

    #[test]
    fn streams_jetworker_makes_may_not_be_declared() {
        let mut config = with(vec![consumer("c", "ORDERS")]);
        config
            .streams
            .push(stream(safety_net::ADVISORY_STREAM, "adv.>"));
        config.streams.push(stream("KV_cache", "cache.>"));
        config.streams.push(stream("OBJ_DLQ_payloads", "objects.>"));
        config.kv_buckets.push(KvBucketConfig {
            name: "cache".into(),
            ..KvBucketConfig::default()
        });
        let problems = derived(&config);
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["kv_buckets[0].name", "consumers", "streams[2].name"],
            "{problems:?}"
        );
        assert!(problems[0].1.contains("(streams[4].name)"), "{problems:?}");
        assert!(problems[1].1.contains("(streams[3].name)"), "{problems:?}");
        assert!(
            problems[2]
                .1
                .contains("payload bucket of dead-letter stream \"DLQ\"")
                && problems[2].1.contains("(streams[5].name)"),
            "{problems:?}"
        );
    }

    #[test]
    fn dead_letter_streams_may_not_share_a_payload_bucket() {
        let mut config = with(vec![
            consumer("a", "ORDERS"),
            ConsumerConfig {
                dead_letter_subject: "dl2.x".into(),
                ..consumer("b", "ORDERS")
            },
        ]);
        config.streams[2] = stream("DL@1", "dlq.>");
        config.streams.push(stream("DL#1", "dl2.>"));
        let problems = derived(&config);
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["streams[3].name", "streams[3].name"], "{problems:?}");
        assert!(
            problems[0].1.contains("\"DL_1_payloads\"")
                && problems[0].1.contains("(streams[2].name)"),
            "{problems:?}"
        );
    }

    #[test]
    fn derived_names_fit_the_server() {
        // 240 characters: fine as a name, too long inside the safety net's durable name.
        let long = "c".repeat(240);
        let problems = derived(&with(vec![consumer(&long, "ORDERS")]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "consumers[0].name");
        assert!(
            problems[0].1.contains("safety net's durable")
                && problems[0].1.contains("longer than 255"),
            "{problems:?}"
        );
        // 254 characters with 12 partitions: `<name>-11` is too long.
        let longest = "o".repeat(254);
        let problems = derived(&with(vec![partitioned(&longest, "ORDERS", 12)]));
        assert!(
            problems
                .iter()
                .any(|(k, m)| k == "consumers[0].partitions" && m.contains("partition 11 of")),
            "{problems:?}"
        );
        assert!(derived(&with(vec![partitioned("orders", "ORDERS", 1024)])).is_empty());
    }

    /// Through the loader: the file, both keys, and refused.
    #[test]
    fn a_clash_is_refused_with_the_file_and_both_keys() {
        let text = r#"
[connection]
servers = ["nats://127.0.0.1:4222"]

[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "orders"
stream = "ORDERS"
handler = "apply"
dead_letter_subject = "dlq.orders"
filter_subject = "orders.*.>"
ordered_by = { subject_token = 2 }
partitions = { count = 4 }

[[consumers]]
name = "orders-2"
stream = "ORDERS"
handler = "apply"
dead_letter_subject = "dlq.orders"
"#;
        let err =
            Config::from_toml_with_env(text, std::path::Path::new("shop.toml"), std::iter::empty())
                .expect_err("a clash is refused");
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["consumers[0].partitions"], "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("shop.toml: consumers[0].partitions: ")
                && shown.contains("(consumers[1].name)"),
            "{shown}"
        );
    }
}
