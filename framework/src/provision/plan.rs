//! The plan: [`plan`] compares the [`Desired`] specs with the [`Actual`] ones and says,
//! per stream, consumer and key-value bucket, create, update (with the changed fields),
//! unchanged, or conflict (a change the server cannot apply in place, with the field and
//! what to do). Pure: no I/O; `Plan`'s `Display` is what `provision --dry-run` prints.

use std::fmt;
use std::time::Duration;

use super::spec::{Actual, ConsumerSpec, Desired, KvSpec, ServerVersion, StreamSpec};

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
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config;
    use crate::provision::spec::fixtures::{consumer, stream, v};
    use crate::provision::spec::{kv_spec, AckMode};

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
    }
}
