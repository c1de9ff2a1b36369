//! The exactly-once counter protocol against a real nats-server: a crash at every step
//! followed by a retry, the same application run concurrently, distinct applications
//! racing on one record.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use workers::counters::{
    apply_once, read_record, Application, Applied, CounterErrorKind, Delta, Faults, RunOptions,
    Step,
};

fn first(faults: Option<&dyn Faults>) -> RunOptions<'_> {
    RunOptions {
        resuming: false,
        faults,
    }
}

fn redelivery(faults: Option<&dyn Faults>) -> RunOptions<'_> {
    RunOptions {
        resuming: true,
        faults,
    }
}

async fn bucket(server: &NatsServer) -> (async_nats::Client, kv::Store) {
    let text = format!(
        "[connection]\nservers = [\"{}\"]\n\n[[kv_buckets]]\nname = \"analytics\"\n",
        server.url()
    );
    let config = Config::from_toml_with_env(&text, Path::new("test.toml"), std::iter::empty())
        .expect("valid config");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let kv = js.get_key_value("analytics").await.expect("bucket");
    (client, kv)
}

fn application(id: &str, records: &[&str]) -> Application {
    Application {
        id: id.to_string(),
        marker: format!("seen.test.{id}"),
        deltas: records
            .iter()
            .map(|r| Delta::new(r.to_string(), [("n", 1), ("cents", 250)]))
            .collect(),
    }
}

async fn counts(kv: &kv::Store, record: &str) -> (u64, u64, usize) {
    let (r, _) = read_record(kv, record)
        .await
        .expect("read")
        .unwrap_or_default();
    (r.count("n"), r.count("cents"), r.pending.len())
}

/// Fails once at one chosen step.
struct FailOnceAt {
    step: Step,
    fired: Mutex<bool>,
}

impl Faults for FailOnceAt {
    fn fail_at(&self, _id: &str, _marker: &str, step: Step) -> bool {
        let mut fired = self.fired.lock().expect("lock");
        if step == self.step && !*fired {
            *fired = true;
            return true;
        }
        false
    }
}

#[tokio::test]
async fn a_crash_at_any_step_then_a_retry_counts_once() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    let steps = [
        Step::Incremented(0),
        Step::Incremented(1),
        Step::Incremented(2),
        Step::Marked,
        Step::Cleaned(0),
        Step::Cleaned(1),
        Step::Cleaned(2),
    ];
    for (i, step) in steps.into_iter().enumerate() {
        let records = [format!("r.{i}.a"), format!("r.{i}.b"), format!("r.{i}.c")];
        let refs: Vec<&str> = records.iter().map(String::as_str).collect();
        let app = application(&format!("e{i}"), &refs);
        let faults = FailOnceAt {
            step,
            fired: Mutex::new(false),
        };
        let err = apply_once(&kv, &app, first(Some(&faults)))
            .await
            .expect_err("the injected crash");
        assert_eq!(err.kind(), CounterErrorKind::Injected);
        // The redelivery.
        let again = apply_once(&kv, &app, redelivery(Some(&faults)))
            .await
            .expect("retry");
        let expected = if matches!(step, Step::Cleaned(_) | Step::Marked) {
            Applied::Already
        } else {
            Applied::Now
        };
        assert_eq!(again, expected, "{step:?}");
        // And a late duplicate.
        assert_eq!(
            apply_once(&kv, &app, first(None)).await.expect("duplicate"),
            Applied::Already
        );
        for record in &records {
            assert_eq!(counts(&kv, record).await, (1, 250, 0), "{step:?} {record}");
        }
    }
}

#[tokio::test]
async fn the_same_application_run_concurrently_counts_once() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    for round in 0..20 {
        let records = [format!("c.{round}.x"), format!("c.{round}.y")];
        let app = Arc::new(application(
            &format!("dup{round}"),
            &[&records[0], &records[1]],
        ));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (kv, app) = (kv.clone(), app.clone());
            tasks.push(tokio::spawn(async move {
                apply_once(&kv, &app, first(None)).await
            }));
        }
        let mut now = 0;
        for t in tasks {
            if t.await.expect("task").expect("apply") == Applied::Now {
                now += 1;
            }
        }
        assert!(now >= 1, "someone completed it");
        for record in &records {
            assert_eq!(counts(&kv, record).await, (1, 250, 0), "round {round}");
        }
    }
}

/// Fails a random-looking third of the steps of every application, at most once per
/// (application, step): concurrent runs, crashes and retries all at once.
struct Flaky {
    fired: Mutex<HashSet<(String, String)>>,
}

impl Faults for Flaky {
    fn fail_at(&self, id: &str, _marker: &str, step: Step) -> bool {
        let key = (id.to_string(), format!("{step:?}"));
        let roll = workers::keys::stable_hash(&format!("{}{}", key.0, key.1)) % 3;
        roll == 0 && self.fired.lock().expect("lock").insert(key)
    }
}

#[tokio::test]
async fn racing_applications_lose_no_increment() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    let faults = Arc::new(Flaky {
        fired: Mutex::new(HashSet::new()),
    });
    let n = 300;
    // As many runs at once as one consumer's concurrency.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..n {
        // Every application hits the shared hot record, and one of four others; each is
        // started twice (a duplicate on another replica).
        for _ in 0..2 {
            let (kv, faults, slots) = (kv.clone(), faults.clone(), slots.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore");
                let app = application(&format!("race{i}"), &["hot", &format!("side.{}", i % 4)]);
                let mut options = first(Some(faults.as_ref()));
                loop {
                    match apply_once(&kv, &app, options).await {
                        Ok(_) => return,
                        Err(e) if e.kind() == CounterErrorKind::Injected => {
                            options.resuming = true;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(counts(&kv, "hot").await, (n, n * 250, 0));
    let mut sides = BTreeMap::new();
    for s in 0..4 {
        sides.insert(s, counts(&kv, &format!("side.{s}")).await);
    }
    for (s, c) in sides {
        assert_eq!(c, (n / 4, n / 4 * 250, 0), "side {s}");
    }
}
