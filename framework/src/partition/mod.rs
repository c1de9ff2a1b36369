//! Order per key across replicas: partitioned subjects, one durable consumer per
//! partition, and each partition pulled by one replica at a time.
//!
//! - here: [`partition_of`] (the stable hash of a key to its partition, used by
//!   [`Publisher::publish_keyed`](crate::Publisher::publish_keyed)), and [`expand`]:
//!   a consumer with `partitions = { count = N, subject_token = T }` stands for N
//!   durable consumers `<name>-0` .. `<name>-<N-1>`, consumer `i` filtering the
//!   consumer's `filter_subject` with token `T` set to `i`, and for the key-value bucket
//!   their leases live in.
//! - `lease`: who pulls a partition: a lease in that bucket, taken, renewed and given
//!   back, with the takeover rules below.
//!
//! # Why partitions
//! Key lanes order a key's messages within one process. Two replicas pulling one
//! consumer would each get some of a key's messages and run them side by side. So the
//! key decides the subject's partition token when the message is published (the same
//! key always lands in the same partition), and a partition's consumer is pulled by
//! exactly one replica at a time; within it, its lanes keep the key's order.
//!
//! # Ownership, on every server version (2.9.10 included)
//! A replica owns partition `i` while it holds the key `p<i>` of the bucket
//! `jw_leases_<stream>_<consumer>`, whose `max_age` is the lease: it takes the key with a
//! create (which fails while another replica holds it), renews it with an update on the
//! revision it last wrote every third of the lease, and deletes it when it stops. A
//! replica that cannot renew within two thirds of the lease (it lost the key, or the
//! server) stops pulling that partition and hands back what it holds. A replica that is
//! killed stops renewing: the server removes its entries when they are `max_age` old,
//! and another replica takes the partition. Priority groups with a pinned client (2.11,
//! ADR-42) would do the same for one consumer, but a pin moves as soon as the pinned
//! client's pull requests stop, before its in-flight messages are redelivered, so the
//! takeover rule below would still be needed; the leases work on every server.
//!
//! # Takeover
//! A replica that takes a partition may find messages of it still pending at the server:
//! in flight at the replica that died (unacked until their ack wait runs out) or nak'ed
//! there for a retry (delivered again after their delay). Such a message must run
//! before every later message of its key. So the new owner starts its term with its
//! lanes' gate closed: it pulls, and holds everything it receives (redeliveries first,
//! the server sends them before new messages), running nothing, until the consumer's
//! `num_ack_pending` is no more than what it holds itself, that is, until every pending
//! message is in its hands (in stream order in its lanes) or settled. Then the lanes run
//! in key order. Should that never happen (a pending message at its last delivery that
//! expires), the gate opens after the longest of the ack wait and the retry delays, plus
//! an ack wait, since the term began.
//!
//! # When replicas die or join
//! Each replica also keeps a member key (`member-<replica id>`) in the bucket, renewed
//! with its leases, so every replica knows how many are alive. A replica takes a free
//! partition only while it holds fewer than its share (the partition count divided by
//! the live replicas, rounded up; counted once before it takes any, or for a lease at
//! most), and gives back (gracefully, as at shutdown) the partitions it holds beyond that
//! share. A replica that dies: its partitions are free
//! one lease later and the survivors take them, up to their new shares. A replica that
//! joins: the others see one more member, each gives back what exceeds its smaller
//! share, and the newcomer takes those after the takeover gate.
//!
//! # An ordered consumer without partitions
//! Its order per key holds only while one process pulls it, so it is run as a partition
//! of its own: one lease, the key `p0` of the bucket `jw_leases_<stream>_<consumer>`
//! (lease [`SOLE_LEASE`]), under the same rules. One replica holds the lease and pulls
//! the consumer; every other replica stands by (logged once, `standby` in the
//! consumer's stats, ready at `/readyz`) and takes it over, through the takeover gate,
//! when the holder stops (at once) or dies (one lease later). Replicas add availability
//! to such a consumer, not throughput: give it `partitions` for that.

mod lease;

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{Config, ConsumerConfig, KvBucketConfig};

pub(crate) use lease::{run_partition, LeaseGroup};

/// The partition of `key` among `partitions` (0 when `partitions` is 0): FNV-1a (32
/// bits) of the key's bytes modulo `partitions`. Stable across processes, versions and
/// platforms: publishers and workers agree on it without talking to each other.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = key.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    });
    hash.checked_rem(partitions).unwrap_or(0)
}

/// The lease of an ordered consumer without `partitions` (see the module docs): the
/// default lease of partitions.
pub const SOLE_LEASE: Duration = Duration::from_secs(10);

/// One partition of a partitioned consumer (or the single lease of an ordered consumer
/// without partitions), as the runtime needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionOf {
    /// The lease bucket of the consumer's partitions.
    pub bucket: String,
    /// This partition's index.
    pub index: u32,
    /// How many partitions the consumer has.
    pub count: u32,
    /// The lease: how long a replica that stopped renewing keeps the partition.
    pub lease: Duration,
}

impl PartitionOf {
    /// The lease's key in the bucket.
    pub(crate) fn key(&self) -> String {
        partition_lease_key(self.index)
    }
}

/// The lease bucket of the partitioned consumer `name` on `stream`: bucket names allow
/// letters, digits, `_` and `-` only.
fn lease_bucket(stream: &str, name: &str) -> String {
    let safe = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("jw_leases_{}_{}", safe(stream), safe(name))
}

/// The durable name of partition `index` of consumer `name`.
pub(crate) fn partition_name(name: &str, index: u32) -> String {
    format!("{name}-{index}")
}

/// The durable consumers a partitioned `consumer` stands for on the server, `<name>-0`
/// .. `<name>-<count-1>` in partition order (empty when it has no `partitions`).
pub fn partition_consumer_names(consumer: &ConsumerConfig) -> Vec<String> {
    let count = consumer.partitions.as_ref().map_or(0, |p| p.count);
    (0..count)
        .map(|index| partition_name(&consumer.name, index))
        .collect()
}

/// The key-value bucket holding the leases of `consumer`: those of its partitions, or,
/// for an ordered consumer without partitions, its single lease (`None` for a consumer
/// that needs none: unordered, or a partition of an expanded partitioned consumer, whose
/// leases are its parent's).
pub fn partition_lease_bucket(consumer: &ConsumerConfig) -> Option<String> {
    let leased = consumer.partitions.is_some()
        || (consumer.ordered_by.is_some() && consumer.partition_of.is_none());
    leased.then(|| lease_bucket(&consumer.stream, &consumer.name))
}

/// The key of partition `index`'s lease in its lease bucket; its value names the
/// replica holding the partition.
pub fn partition_lease_key(index: u32) -> String {
    format!("p{index}")
}

/// `config` as `run` and `provision` see it: every partitioned consumer replaced by its
/// partition consumers, and the lease bucket of every consumer that needs leases (see
/// [`partition_lease_bucket`]) added to `kv_buckets`.
pub fn expand_partitions(config: &Config) -> Config {
    expand(config).0
}

/// `config` with every partitioned consumer replaced by its partition consumers and the
/// lease buckets added, and the lease each consumer that is pulled under one runs by
/// (by stream and name: partitions, and ordered consumers without partitions).
/// Expanding an expanded config changes nothing.
pub(crate) fn expand(config: &Config) -> (Config, HashMap<(String, String), PartitionOf>) {
    let mut expanded = config.clone();
    let mut leases = HashMap::new();
    expanded.consumers.clear();
    for consumer in &config.consumers {
        let Some(bucket) = partition_lease_bucket(consumer) else {
            expanded.consumers.push(consumer.clone());
            continue;
        };
        let (count, lease) = consumer
            .partitions
            .as_ref()
            .map_or((1, SOLE_LEASE), |p| (p.count, p.lease));
        let lease_of = |index| PartitionOf {
            bucket: bucket.clone(),
            index,
            count,
            lease,
        };
        let key = |name: &str| (consumer.stream.clone(), name.to_owned());
        match &consumer.partitions {
            None => {
                leases.insert(key(&consumer.name), lease_of(0));
                expanded.consumers.push(consumer.clone());
            }
            Some(p) => {
                for index in 0..p.count {
                    let name = partition_name(&consumer.name, index);
                    leases.insert(key(&name), lease_of(index));
                    expanded.consumers.push(ConsumerConfig {
                        name,
                        filter_subject: consumer
                            .filter_subject
                            .as_deref()
                            .map(|filter| with_token(filter, p.subject_token, &index.to_string())),
                        partitions: None,
                        partition_of: Some(consumer.name.clone()),
                        description: Some(format!(
                            "partition {index} of {} ({} partitions)",
                            consumer.name, p.count
                        )),
                        ..consumer.clone()
                    });
                }
            }
        }
        if !expanded.kv_buckets.iter().any(|b| b.name == bucket) {
            let description = match consumer.partitions {
                Some(_) => format!("leases of the partitions of {}", consumer.name),
                None => format!("the lease of ordered consumer {}", consumer.name),
            };
            expanded.kv_buckets.push(KvBucketConfig {
                name: bucket,
                history: 1,
                max_age: Some(lease),
                description: Some(description),
                ..KvBucketConfig::default()
            });
        }
    }
    (expanded, leases)
}

/// `subject` with token `index` replaced by `token`.
fn with_token(subject: &str, index: usize, token: &str) -> String {
    subject
        .split('.')
        .enumerate()
        .map(|(i, t)| if i == index { token } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OrderedBy, PartitionsConfig};

    #[test]
    fn partitions_are_stable_fnv1a() {
        // FNV-1a 32 of "" is the offset basis 0x811c9dc5 (2166136261), of "a" 0xe40c292c
        // (3826002220).
        assert_eq!(partition_of("", 1000), 261);
        assert_eq!(partition_of("a", 1000), 220);
        assert_eq!(
            partition_of("customer-42", 8),
            partition_of("customer-42", 8)
        );
        assert_eq!(partition_of("anything", 0), 0);
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_of(&format!("k{i}"), 4))
            .collect();
        assert_eq!(spread.len(), 4, "200 keys reach every partition");
    }

    #[test]
    fn a_partitioned_consumer_stands_for_one_consumer_per_partition() {
        let config = Config {
            consumers: vec![
                ConsumerConfig {
                    name: "orders".into(),
                    stream: "ORDERS".into(),
                    filter_subject: Some("orders.*.>".into()),
                    partitions: Some(PartitionsConfig {
                        count: 3,
                        subject_token: 1,
                        lease: Duration::from_secs(4),
                    }),
                    ..ConsumerConfig::default()
                },
                ConsumerConfig {
                    name: "plain".into(),
                    ..ConsumerConfig::default()
                },
            ],
            ..Config::default()
        };
        let (expanded, partitions) = expand(&config);
        let shown: Vec<(&str, Option<&str>)> = expanded
            .consumers
            .iter()
            .map(|c| (c.name.as_str(), c.filter_subject.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                ("orders-0", Some("orders.0.>")),
                ("orders-1", Some("orders.1.>")),
                ("orders-2", Some("orders.2.>")),
                ("plain", None),
            ]
        );
        let lease_of = |name: &str| &partitions[&("ORDERS".to_owned(), name.to_owned())];
        assert_eq!(lease_of("orders-2").index, 2);
        assert_eq!(lease_of("orders-2").key(), "p2");
        assert_eq!(
            expanded.consumers[2].partition_of.as_deref(),
            Some("orders")
        );
        assert_eq!(partitions.len(), 3, "the unordered consumer needs no lease");
        assert_eq!(
            partition_consumer_names(&config.consumers[0]),
            ["orders-0", "orders-1", "orders-2"]
        );
        assert!(partition_consumer_names(&config.consumers[1]).is_empty());
        assert_eq!(
            partition_lease_bucket(&config.consumers[0]).as_deref(),
            Some("jw_leases_ORDERS_orders")
        );
        assert_eq!(partition_lease_bucket(&config.consumers[1]), None);
        assert_eq!(expand_partitions(&config).consumers.len(), 4);
        assert_eq!(expanded.kv_buckets.len(), 1);
        assert_eq!(expanded.kv_buckets[0].name, "jw_leases_ORDERS_orders");
        assert_eq!(expanded.kv_buckets[0].max_age, Some(Duration::from_secs(4)));
        let (again, _) = expand(&expanded);
        assert_eq!(again.consumers.len(), 4, "expanding twice changes nothing");
        assert_eq!(again.kv_buckets.len(), 1);
    }

    #[test]
    fn an_ordered_consumer_without_partitions_is_pulled_under_one_lease() {
        let ordered = OrderedBy {
            subject_token: Some(2),
            ..OrderedBy::default()
        };
        let config = Config {
            consumers: vec![
                ConsumerConfig {
                    name: "ledger".into(),
                    stream: "ACCOUNTS".into(),
                    ordered_by: Some(ordered.clone()),
                    ..ConsumerConfig::default()
                },
                ConsumerConfig {
                    name: "orders".into(),
                    stream: "ORDERS".into(),
                    filter_subject: Some("orders.*.>".into()),
                    ordered_by: Some(ordered),
                    partitions: Some(PartitionsConfig {
                        count: 2,
                        ..PartitionsConfig::default()
                    }),
                    ..ConsumerConfig::default()
                },
            ],
            ..Config::default()
        };
        let (expanded, leases) = expand(&config);
        let names: Vec<&str> = expanded.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["ledger", "orders-0", "orders-1"],
            "its name is kept"
        );
        let sole = &leases[&("ACCOUNTS".to_owned(), "ledger".to_owned())];
        assert_eq!(
            (sole.bucket.as_str(), sole.index, sole.count, sole.lease),
            ("jw_leases_ACCOUNTS_ledger", 0, 1, SOLE_LEASE)
        );
        assert_eq!(leases.len(), 3);
        let buckets: Vec<&str> = expanded
            .kv_buckets
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(
            buckets,
            ["jw_leases_ACCOUNTS_ledger", "jw_leases_ORDERS_orders"]
        );
        assert_eq!(
            partition_lease_bucket(&config.consumers[0]).as_deref(),
            Some("jw_leases_ACCOUNTS_ledger")
        );
        // The partition consumers are ordered too, but lease under their parent.
        assert_eq!(partition_lease_bucket(&expanded.consumers[1]), None);
        let (again, _) = expand(&expanded);
        let again_buckets: Vec<&str> = again.kv_buckets.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(again_buckets, buckets, "expanding twice changes nothing");
        assert_eq!(again.consumers.len(), 3);
    }
}
