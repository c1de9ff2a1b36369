//! Least privilege: the publish and subscribe permissions a worker (`run`) needs for
//! its config, subject by subject with why, and as a ready-to-paste nats-server
//! `permissions {}` block. Pure: computed from the config, no server needed.
//!
//! What `run` does on the wire, and so what it needs:
//! - provisioning: `$JS.API.STREAM.INFO/CREATE/UPDATE.<stream>` for every stream, the
//!   safety net's advisory stream and every key-value bucket's stream;
//!   `$JS.API.CONSUMER.INFO/CREATE.<stream>.<consumer>[.<filter>]` for every consumer
//!   (creation also recreates a consumer deleted behind the worker's back);
//! - pulling: `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, the messages arriving
//!   on the worker's inbox;
//! - settling: `$JS.ACK.<stream>.<consumer>.>` (ack, delayed nak, progress, term);
//! - dead letters: the dead-letter subjects, PubAcks arriving on the inbox; for payloads
//!   too large for a copy, the dead-letter stream's payload bucket (`$O.<bucket>.>`, its
//!   `OBJ_<bucket>` stream, `$JS.API.STREAM.NAMES` to find the dead-letter stream);
//!   `$JS.API.STREAM.NAMES` and `STREAM.INFO` to check, while running, that the
//!   dead-letter stream keeps copies, and `$JS.API.STREAM.MSG.GET.<dead-letter stream>`
//!   to read back the letter each PubAck names;
//! - the safety net: its consumer on the advisory stream, and
//!   `$JS.API.STREAM.MSG.GET.<stream>` to fetch a stranded original by sequence (the
//!   server itself stores the advisories); a worker handing a last delivery over
//!   publishes its hand-off record to that consumer's advisory subject
//!   (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`);
//! - key-value buckets (for handlers): `$KV.<bucket>.>` to write, direct and stream gets
//!   to read, an ordered consumer (`CONSUMER.CREATE`, flow control on `$JS.FC`) to watch;
//! - partitioned consumers (`partitions = { count = N, ... }`): every partition consumer
//!   `<name>-<i>` as a consumer above (with its own safety net), and the lease bucket's
//!   stream; of the bucket only what the leases use: `$KV.<bucket>.>` (take, renew, give
//!   back, member keys), the direct get of a key (a take whose key was deleted) or the
//!   stream get on servers without direct get, and an ordered consumer (`CONSUMER.CREATE`
//!   with flow control on `$JS.FC`) to count the live replicas; an ordered consumer
//!   without partitions (pulled by one replica at a time under a lease of its own) gets
//!   the same of its lease bucket;
//! - replies: every JetStream API answer and delivery comes to `<inbox_prefix>.>`.
//!
//! With `connection.jetstream_domain` the API subjects are `$JS.<domain>.API.…` (with
//! `jetstream_api_prefix`, that prefix), as the worker's JetStream context uses them, and
//! the ack subjects in their domain form (`$JS.ACK.<domain>.<account hash>.<stream>.…`)
//! are allowed next to the plain ones.
//!
//! Without provisioning (`without_provisioning`, for a worker whose streams and
//! consumers an operator provisions with `provision`) the create/update subjects are left
//! out: `run` then only reads the server's state, and a missing consumer stays missing.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use jetworker::{Config, ConsumerConfig};

/// One subject a worker may publish to or subscribe to, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permission {
    /// The subject (wildcards as nats-server reads them).
    pub subject: String,
    /// What the worker does with it.
    pub why: String,
}

/// What the permissions are computed for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Leave out stream and consumer creation and updates (an operator provisions).
    pub without_provisioning: bool,
    /// Extra subjects the handlers publish to themselves (jetworker cannot know them).
    pub handler_publishes: Vec<String>,
}

/// The publish and subscribe permissions of a worker, each subject once, in a stable
/// order (the order they are first needed in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permissions {
    /// Subjects the worker publishes to.
    pub publish: Vec<Permission>,
    /// Subjects the worker subscribes to.
    pub subscribe: Vec<Permission>,
    /// Things worth knowing about this set (shared inboxes, handler subjects, ...).
    pub notes: Vec<String>,
}

/// Collects permissions, each subject once.
struct Builder {
    /// Where the JetStream API is: `$JS.API`, `$JS.<domain>.API` or the configured prefix.
    api: String,
    /// Whether deliveries may carry the domain's ack subjects
    /// (`$JS.ACK.<domain>.<account hash>.<stream>.<consumer>...`).
    domain_acks: bool,
    publish: Vec<Permission>,
    subscribe: Vec<Permission>,
    seen_publish: BTreeSet<String>,
    seen_subscribe: BTreeSet<String>,
}

impl Builder {
    fn new(connection: &jetworker::ConnectionConfig) -> Builder {
        let api = match (
            &connection.jetstream_domain,
            &connection.jetstream_api_prefix,
        ) {
            (Some(domain), _) => format!("$JS.{domain}.API"),
            (None, Some(prefix)) => prefix.trim_end_matches('.').to_owned(),
            (None, None) => "$JS.API".to_owned(),
        };
        Builder {
            api,
            domain_acks: connection.jetstream_domain.is_some()
                || connection.jetstream_api_prefix.is_some(),
            publish: Vec::new(),
            subscribe: Vec::new(),
            seen_publish: BTreeSet::new(),
            seen_subscribe: BTreeSet::new(),
        }
    }

    fn publish(&mut self, subject: String, why: impl Into<String>) {
        if self.seen_publish.insert(subject.clone()) {
            self.publish.push(Permission {
                subject,
                why: why.into(),
            });
        }
    }

    fn subscribe(&mut self, subject: String, why: impl Into<String>) {
        if self.seen_subscribe.insert(subject.clone()) {
            self.subscribe.push(Permission {
                subject,
                why: why.into(),
            });
        }
    }

    fn stream(&mut self, name: &str, what: &str, scope: &Scope) {
        let api = self.api.clone();
        self.publish(
            format!("{api}.STREAM.INFO.{name}"),
            format!("read {what} {name} (provisioning, health)"),
        );
        if !scope.without_provisioning {
            self.publish(
                format!("{api}.STREAM.CREATE.{name}"),
                format!("create {what} {name} when it is missing"),
            );
            self.publish(
                format!("{api}.STREAM.UPDATE.{name}"),
                format!("update {what} {name} when the config changed"),
            );
        }
    }

    fn consumer(&mut self, c: &ConsumerConfig, scope: &Scope) {
        let api = self.api.clone();
        let (stream, name) = (&c.stream, &c.name);
        self.publish(
            format!("{api}.CONSUMER.INFO.{stream}.{name}"),
            format!("read consumer {stream}/{name} (provisioning, lag, recovery)"),
        );
        if !scope.without_provisioning {
            // async-nats names the filter in the create subject when there is one.
            let create = match c.filter_subject.as_deref().filter(|f| !f.is_empty()) {
                Some(filter) => format!("{api}.CONSUMER.CREATE.{stream}.{name}.{filter}"),
                None => format!("{api}.CONSUMER.CREATE.{stream}.{name}"),
            };
            self.publish(
                create,
                format!(
                    "create or update consumer {stream}/{name} (also recreates it when deleted)"
                ),
            );
        }
        self.publish(
            format!("{api}.CONSUMER.MSG.NEXT.{stream}.{name}"),
            format!("pull messages for {stream}/{name}"),
        );
        self.publish(
            format!("$JS.ACK.{stream}.{name}.>"),
            format!("ack, retry (delayed nak), progress and term deliveries of {stream}/{name}"),
        );
        if self.domain_acks {
            self.publish(
                format!("$JS.ACK.*.*.{stream}.{name}.>"),
                format!("settle deliveries of {stream}/{name} whose ack subject names the JetStream domain and account"),
            );
        }
        self.publish(
            c.dead_letter_subject.clone(),
            format!("dead letters of {stream}/{name}"),
        );
    }
}

impl Permissions {
    /// What `run` needs for `config` (see the module docs).
    pub fn for_worker(config: &Config, scope: &Scope) -> Permissions {
        // The leases' buckets get only what the leases use, not a handler's bucket access.
        let lease_buckets: BTreeSet<String> = config
            .consumers
            .iter()
            .filter_map(jetworker::partition_lease_bucket)
            .collect();
        // A partitioned consumer runs as one consumer per partition.
        let config = &jetworker::expand_partitions(config);
        let mut b = Builder::new(&config.connection);
        let api = b.api.clone();
        for s in &config.streams {
            b.stream(&s.name, "stream", scope);
        }
        let advisory = jetworker::safety_net_stream(config);
        if let Some(s) = &advisory {
            b.stream(&s.name, "the safety net's advisory stream", scope);
        }
        for bucket in &config.kv_buckets {
            let what = if lease_buckets.contains(&bucket.name) {
                "the partition leases' bucket stream"
            } else {
                "key-value bucket stream"
            };
            b.stream(&format!("KV_{}", bucket.name), what, scope);
        }
        for c in &config.consumers {
            b.consumer(c, scope);
        }
        // Payloads too large for a dead-letter copy go to the dead-letter stream's
        // object-store bucket (see `jetworker::dead_letter_payload_bucket`).
        for dl in crate::dlq::dead_letter_streams(config) {
            let bucket = jetworker::dead_letter_payload_bucket(&dl.name);
            let stream = format!("OBJ_{bucket}");
            b.stream(&stream, "the dead-letter payload bucket's stream", scope);
            b.publish(
                format!("$O.{bucket}.>"),
                format!(
                    "store payloads too large for a dead-letter copy of {} (chunks, metadata)",
                    dl.name
                ),
            );
            b.publish(
                format!("{api}.DIRECT.GET.{stream}.>"),
                format!("look up an earlier payload object of the same dead letter in {bucket}"),
            );
            b.publish(
                format!("{api}.STREAM.PURGE.{stream}"),
                format!("drop the chunks of a payload object in {bucket} replaced by a retried dead letter"),
            );
            b.publish(
                format!("{api}.STREAM.NAMES"),
                "find the dead-letter stream of a dead-letter subject (to name its payload bucket, and to check it keeps copies)",
            );
            b.publish(
                format!("{api}.STREAM.MSG.GET.{}", dl.name),
                format!(
                    "read back the letter each PubAck names in {} (a copy the stream dropped is published again)",
                    dl.name
                ),
            );
            b.publish(
                format!("{api}.DIRECT.GET.{}", dl.name),
                format!(
                    "the same read-back by a direct get, when {} allows them",
                    dl.name
                ),
            );
        }
        let nets = jetworker::safety_net_consumers(config);
        for net in &nets {
            b.consumer(net, scope);
        }
        for c in &config.consumers {
            b.publish(
                jetworker::safety_net_advisory_subject(&c.stream, &c.name),
                format!(
                    "hand a last delivery of {}/{} whose dead-letter copy cannot be stored to the safety net (its hand-off record, stored in the advisory stream before the nak)",
                    c.stream, c.name
                ),
            );
        }
        if !nets.is_empty() {
            for stream in config
                .consumers
                .iter()
                .map(|c| c.stream.as_str())
                .collect::<BTreeSet<_>>()
            {
                b.publish(
                    format!("{api}.STREAM.MSG.GET.{stream}"),
                    format!("the safety net fetches a stranded original from {stream} by sequence"),
                );
            }
        }
        for name in &lease_buckets {
            let stream = format!("KV_{name}");
            b.publish(
                format!("$KV.{name}.>"),
                format!("take, renew and give back partition leases and member keys in {name}"),
            );
            b.publish(
                format!("{api}.DIRECT.GET.{stream}.>"),
                format!("read a lease of {name} before taking a key given back"),
            );
            b.publish(
                format!("{api}.STREAM.MSG.GET.{stream}"),
                format!("read a lease of {name} (servers without direct get)"),
            );
            b.publish(
                format!("{api}.CONSUMER.CREATE.{stream}"),
                format!("count the live replicas in {name} (ordered consumer listing keys)"),
            );
            b.publish(
                format!("$JS.FC.{stream}.>"),
                format!("flow control of the replica count's consumer on {name}"),
            );
        }
        for bucket in config
            .kv_buckets
            .iter()
            .filter(|b| !lease_buckets.contains(&b.name))
        {
            let (name, stream) = (&bucket.name, format!("KV_{}", bucket.name));
            b.publish(
                format!("$KV.{name}.>"),
                format!("handlers write, update and delete keys of bucket {name}"),
            );
            b.publish(
                format!("{api}.DIRECT.GET.{stream}"),
                format!("handlers read bucket {name} by revision"),
            );
            b.publish(
                format!("{api}.DIRECT.GET.{stream}.>"),
                format!("handlers read keys of bucket {name}"),
            );
            b.publish(
                format!("{api}.STREAM.MSG.GET.{stream}"),
                format!("handlers read keys of bucket {name} (servers without direct get)"),
            );
            b.publish(
                format!("{api}.CONSUMER.CREATE.{stream}"),
                format!("handlers watch or list keys of bucket {name} (ordered consumer)"),
            );
            b.publish(
                format!("{api}.CONSUMER.INFO.{stream}.>"),
                format!("handlers' watchers of bucket {name} check their consumer"),
            );
            b.publish(
                format!("$JS.FC.{stream}.>"),
                format!("flow control of watchers of bucket {name}"),
            );
        }
        for subject in &scope.handler_publishes {
            b.publish(subject.clone(), "published by the handlers (--publish)");
        }
        let prefix = config.connection.inbox_prefix();
        b.subscribe(
            format!("{prefix}.>"),
            "replies: deliveries of pulled messages, JetStream API answers, PubAcks",
        );

        let mut notes = Vec::new();
        if config.connection.inbox_prefix.is_none() {
            notes.push(format!(
                "subscribe {prefix}.> lets this user read every client's replies under the shared prefix: set connection.inbox_prefix (e.g. \"_INBOX_{}\") to give the worker inboxes of its own",
                config.connection.name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-', "_")
            ));
        }
        if scope.handler_publishes.is_empty() {
            notes.push(
                "subjects your handlers publish to themselves are not in the config: add them with --publish SUBJECT".to_string(),
            );
        }
        if scope.without_provisioning {
            notes.push(
                "without provisioning: run `provision` with an operator's credentials first; a consumer deleted behind the worker's back stays missing until then".to_string(),
            );
        }
        notes.push(
            "`status` and `dlq` are operator commands: give them an operator's credentials, not the worker's".to_string(),
        );
        Permissions {
            publish: b.publish,
            subscribe: b.subscribe,
            notes,
        }
    }

    /// A nats-server `permissions { ... }` block (for an `authorization { users: [...] }`
    /// entry); every other subject is denied by the server.
    pub fn server_block(&self) -> String {
        let list = |perms: &[Permission]| {
            perms
                .iter()
                .map(|p| format!("      {}", quote(&p.subject)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "permissions: {{\n  publish: {{\n    allow: [\n{}\n    ]\n  }}\n  subscribe: {{\n    allow: [\n{}\n    ]\n  }}\n}}",
            list(&self.publish),
            list(&self.subscribe)
        )
    }

    /// The permissions as text: each subject with why, then the server block and notes.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let width = self
            .publish
            .iter()
            .chain(&self.subscribe)
            .map(|p| p.subject.len())
            .max()
            .unwrap_or(0);
        for (title, perms) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            let _ = writeln!(out, "{title} ({}):", perms.len());
            for p in perms {
                let _ = writeln!(out, "  {:width$}  {}", p.subject, p.why);
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "nats-server user permissions (everything else is denied):"
        );
        let _ = writeln!(out, "{}", self.server_block());
        if !self.notes.is_empty() {
            out.push_str("\nnotes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "  - {note}");
            }
        }
        out
    }
}

/// A subject as a quoted nats-server config string (`$` and `>` need the quotes).
fn quote(subject: &str) -> String {
    format!("\"{}\"", subject.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        Config::from_toml_with_env(
            &format!(
                r#"
[connection]
name = "billing worker"
{extra}

[[streams]]
name = "EVENTS"
subjects = ["events.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[kv_buckets]]
name = "totals"

[[consumers]]
name = "clicks"
stream = "EVENTS"
filter_subject = "events.click"
handler = "h"
dead_letter_subject = "dlq.clicks"

[[consumers]]
name = "all"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.all"
"#
            ),
            Path::new("t.toml"),
            std::iter::empty(),
        )
        .expect("valid")
    }

    fn subjects(perms: &[Permission]) -> Vec<&str> {
        perms.iter().map(|p| p.subject.as_str()).collect()
    }

    #[test]
    fn every_subject_the_worker_uses_is_listed_once() {
        let p = Permissions::for_worker(&config(""), &Scope::default());
        let publish = subjects(&p.publish);
        for expected in [
            "$JS.API.STREAM.INFO.EVENTS",
            "$JS.API.STREAM.CREATE.DLQ",
            "$JS.API.STREAM.UPDATE.JETWORKER_ADVISORIES",
            "$JS.API.STREAM.INFO.KV_totals",
            "$JS.API.CONSUMER.INFO.EVENTS.clicks",
            "$JS.API.CONSUMER.CREATE.EVENTS.clicks.events.click",
            "$JS.API.CONSUMER.CREATE.EVENTS.all",
            "$JS.API.CONSUMER.MSG.NEXT.EVENTS.all",
            "$JS.ACK.EVENTS.clicks.>",
            "dlq.clicks",
            "dlq.all",
            "$JS.API.CONSUMER.MSG.NEXT.JETWORKER_ADVISORIES.jetworker_safety_net_6_EVENTS_clicks",
            "$JS.ACK.JETWORKER_ADVISORIES.jetworker_safety_net_6_EVENTS_clicks.>",
            "$JS.API.STREAM.MSG.GET.EVENTS",
            "$KV.totals.>",
            "$JS.API.DIRECT.GET.KV_totals.>",
        ] {
            assert!(
                publish.contains(&expected),
                "{expected} missing: {publish:#?}"
            );
        }
        let unique: BTreeSet<&str> = publish.iter().copied().collect();
        assert_eq!(unique.len(), publish.len(), "no duplicates");
        // Nothing broad: no bare wildcards on the API.
        assert!(!publish
            .iter()
            .any(|s| s.starts_with("$JS.API.>") || *s == ">" || s.ends_with(".*")));
        assert_eq!(subjects(&p.subscribe), ["_INBOX.>"]);
        assert!(p.notes.iter().any(|n| n.contains("_INBOX_billing_worker")));
    }

    #[test]
    fn an_inbox_prefix_and_no_provisioning_narrow_it() {
        let c = config("inbox_prefix = \"_INBOX_billing\"");
        let p = Permissions::for_worker(
            &c,
            &Scope {
                without_provisioning: true,
                handler_publishes: vec!["invoices.created".into()],
            },
        );
        assert_eq!(subjects(&p.subscribe), ["_INBOX_billing.>"]);
        let publish = subjects(&p.publish);
        assert!(!publish
            .iter()
            .any(|s| s.contains(".CREATE.") && !s.contains("KV_")));
        assert!(!publish.iter().any(|s| s.contains(".UPDATE.")));
        assert!(publish.contains(&"$JS.API.STREAM.INFO.EVENTS"));
        assert!(publish.contains(&"invoices.created"));
        assert!(!p.notes.iter().any(|n| n.contains("inbox_prefix")));
    }

    #[test]
    fn a_jetstream_domain_moves_every_api_subject_into_it() {
        let p = Permissions::for_worker(&config("jetstream_domain = \"hub\""), &Scope::default());
        let publish = subjects(&p.publish);
        assert!(
            !publish.iter().any(|s| s.starts_with("$JS.API.")),
            "{publish:?}"
        );
        for expected in [
            "$JS.hub.API.STREAM.INFO.EVENTS",
            "$JS.hub.API.CONSUMER.MSG.NEXT.EVENTS.clicks",
            "$JS.hub.API.DIRECT.GET.KV_totals.>",
            "$JS.ACK.EVENTS.clicks.>",
            "$JS.ACK.*.*.EVENTS.clicks.>",
        ] {
            assert!(
                publish.contains(&expected),
                "{expected} missing from {publish:?}"
            );
        }
        let prefixed = Permissions::for_worker(
            &config("jetstream_api_prefix = \"$JS.leaf.API\""),
            &Scope::default(),
        );
        assert!(subjects(&prefixed.publish).contains(&"$JS.leaf.API.CONSUMER.INFO.EVENTS.clicks"));
    }

    #[test]
    fn a_partitioned_consumer_needs_its_partitions_and_its_lease_bucket_only() {
        let c = Config::from_toml_with_env(
            r#"
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "billing"
stream = "ORDERS"
filter_subject = "orders.*.>"
handler = "h"
dead_letter_subject = "dlq.billing"
ordered_by = { subject_token = 2 }
partitions = { count = 2, subject_token = 1 }
"#,
            Path::new("t.toml"),
            std::iter::empty(),
        )
        .expect("valid");
        let p = Permissions::for_worker(&c, &Scope::default());
        let publish = subjects(&p.publish);
        for expected in [
            "$JS.API.CONSUMER.INFO.ORDERS.billing-0",
            "$JS.API.CONSUMER.CREATE.ORDERS.billing-0.orders.0.>",
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.billing-0",
            "$JS.ACK.ORDERS.billing-0.>",
            "$JS.API.CONSUMER.INFO.ORDERS.billing-1",
            "$JS.API.CONSUMER.CREATE.ORDERS.billing-1.orders.1.>",
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.billing-1",
            "$JS.ACK.ORDERS.billing-1.>",
            "$JS.API.CONSUMER.MSG.NEXT.JETWORKER_ADVISORIES.jetworker_safety_net_6_ORDERS_billing-1",
            "$JS.API.STREAM.INFO.KV_jw_leases_ORDERS_billing",
            "$JS.API.STREAM.CREATE.KV_jw_leases_ORDERS_billing",
            "$KV.jw_leases_ORDERS_billing.>",
            "$JS.API.DIRECT.GET.KV_jw_leases_ORDERS_billing.>",
            "$JS.API.STREAM.MSG.GET.KV_jw_leases_ORDERS_billing",
            "$JS.API.CONSUMER.CREATE.KV_jw_leases_ORDERS_billing",
            "$JS.FC.KV_jw_leases_ORDERS_billing.>",
            "dlq.billing",
        ] {
            assert!(
                publish.contains(&expected),
                "{expected} missing: {publish:#?}"
            );
        }
        // The group's name is no consumer on the server, and the leases need no watcher
        // info nor reads by revision.
        assert!(
            !publish.iter().any(|s| {
                let group = ["ORDERS.billing", "safety_net_6_ORDERS_billing"];
                group
                    .iter()
                    .any(|g| s.ends_with(g) || s.contains(&format!("{g}.")))
            }),
            "{publish:#?}"
        );
        assert!(!publish.contains(&"$JS.API.CONSUMER.INFO.KV_jw_leases_ORDERS_billing.>"));
        assert!(!publish.contains(&"$JS.API.DIRECT.GET.KV_jw_leases_ORDERS_billing"));
        assert_eq!(
            publish
                .iter()
                .filter(|s| s.starts_with("$JS.API.CONSUMER.MSG.NEXT."))
                .count(),
            4,
            "two partitions and their two safety nets: {publish:#?}"
        );
    }

    #[test]
    fn the_server_block_quotes_every_subject() {
        let p = Permissions::for_worker(&config(""), &Scope::default());
        let block = p.server_block();
        assert!(block.starts_with("permissions: {\n  publish: {\n    allow: ["));
        assert!(block.contains("      \"$JS.ACK.EVENTS.clicks.>\"\n"));
        assert!(block.contains("subscribe: {\n    allow: [\n      \"_INBOX.>\"\n"));
        let text = p.text();
        assert!(text.contains("publish ("), "{text}");
        assert!(text.contains(&block), "{text}");
    }
}
