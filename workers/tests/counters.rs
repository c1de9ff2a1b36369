//! The exactly-once batch commit against a real nats-server: a crash at every step
//! followed by a retry, the same batch run concurrently, overlapping batches racing on
//! one ledger with crashes, and pruning by the ack floor.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv};
use jetworker::testing::server::NatsServer;
use jetworker::Config;
use serde::{Deserialize, Serialize};
use workers::counters::{
    commit, read_json, CounterErrorKind, Entry, Faults, Ledger, Pruning, Step, Tally,
};

/// A tally of events and their amounts.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Sum {
    n: u64,
    cents: u64,
}

impl Tally for Sum {
    type Item = u64;
    fn add(&mut self, cents: &u64) {
        self.n += 1;
        self.cents += cents;
    }
}

const NO_PRUNING: Pruning = Pruning {
    floor: 0,
    window: 100,
};

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

/// Events `ids` (sequence = position + 1, 250 cents each).
fn entries<'a>(ids: &'a [String], cents: &'a u64) -> Vec<Entry<'a, u64>> {
    ids.iter()
        .zip(1..)
        .map(|(id, sequence)| Entry {
            id,
            sequence,
            item: cents,
        })
        .collect()
}

async fn ledger(kv: &kv::Store, key: &str) -> Ledger<Sum> {
    read_json::<Ledger<Sum>>(kv, key)
        .await
        .expect("read")
        .map(|(l, _)| l)
        .unwrap_or_default()
}

/// Fails once at one chosen step.
struct FailOnceAt {
    step: Step,
    fired: Mutex<bool>,
}

impl Faults for FailOnceAt {
    fn fail_at(&self, _ledger: &str, _first_id: &str, step: Step) -> bool {
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
    let cents = 250;
    for (i, step) in [Step::Folded, Step::Committed].into_iter().enumerate() {
        let key = format!("p.test.{i}");
        let ids: Vec<String> = (0..10).map(|n| format!("e{i}-{n}")).collect();
        let batch = entries(&ids, &cents);
        let faults = FailOnceAt {
            step,
            fired: Mutex::new(false),
        };
        let err = commit::<Sum>(&kv, &key, &batch, NO_PRUNING, Some(&faults))
            .await
            .expect_err("the injected crash");
        assert_eq!(err.kind(), CounterErrorKind::Injected);
        // The redelivery, in a batch with other events.
        let mut more = ids.clone();
        more.extend((10..15).map(|n| format!("e{i}-{n}")));
        let again = commit::<Sum>(&kv, &key, &entries(&more, &cents), NO_PRUNING, None)
            .await
            .expect("retry");
        let expected_added = if step == Step::Committed { 5 } else { 15 };
        assert_eq!(again.added, expected_added, "{step:?}");
        // And a late duplicate.
        let late = commit::<Sum>(&kv, &key, &batch, NO_PRUNING, None)
            .await
            .expect("duplicate");
        assert_eq!(late.added, 0);
        let stored = ledger(&kv, &key).await;
        assert_eq!(
            stored.tally,
            Sum {
                n: 15,
                cents: 15 * 250
            },
            "{step:?}"
        );
        assert_eq!(stored.counted.len(), 15);
    }
}

#[tokio::test]
async fn the_same_batch_run_concurrently_counts_once() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    for round in 0..10 {
        let key = format!("p.dup.{round}");
        let ids: Arc<Vec<String>> = Arc::new((0..50).map(|n| format!("r{round}-{n}")).collect());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (kv, ids, key) = (kv.clone(), ids.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let cents = 250;
                commit::<Sum>(&kv, &key, &entries(&ids, &cents), NO_PRUNING, None)
                    .await
                    .map(|c| c.added)
            }));
        }
        let mut added = 0;
        for t in tasks {
            added += t.await.expect("task").expect("commit");
        }
        assert_eq!(added, 50, "one run counted each event, round {round}");
        assert_eq!(
            ledger(&kv, &key).await.tally,
            Sum {
                n: 50,
                cents: 50 * 250
            }
        );
    }
}

/// Fails a third of the (batch, step) points, each at most once: crashes, retries and
/// concurrent batches all at once.
struct Flaky {
    fired: Mutex<HashSet<String>>,
}

impl Faults for Flaky {
    fn fail_at(&self, ledger: &str, first_id: &str, step: Step) -> bool {
        let point = format!("{ledger}|{first_id}|{step:?}");
        workers::keys::stable_hash(&point).is_multiple_of(3)
            && self.fired.lock().expect("lock").insert(point)
    }
}

#[tokio::test]
async fn overlapping_batches_racing_on_one_ledger_lose_nothing_and_count_once() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    let faults = Arc::new(Flaky {
        fired: Mutex::new(HashSet::new()),
    });
    let n = 600u64;
    let mut tasks = Vec::new();
    // Batches of 20 consecutive ids starting every 10: each id is in two batches (a
    // duplicate on another replica), all on one hot ledger.
    for start in (0..n).step_by(10) {
        let (kv, faults) = (kv.clone(), faults.clone());
        tasks.push(tokio::spawn(async move {
            let ids: Vec<String> = (start..(start + 20).min(n))
                .map(|i| format!("race{i}"))
                .collect();
            let cents = 250;
            loop {
                match commit::<Sum>(
                    &kv,
                    "p.hot",
                    &entries(&ids, &cents),
                    NO_PRUNING,
                    Some(faults.as_ref()),
                )
                .await
                {
                    Ok(_) => return,
                    Err(e) if e.kind() == CounterErrorKind::Injected => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stored = ledger(&kv, "p.hot").await;
    assert_eq!(stored.tally, Sum { n, cents: n * 250 });
    assert!(
        !faults.fired.lock().expect("lock").is_empty(),
        "faults fired"
    );
}

#[tokio::test]
async fn pruning_forgets_only_ids_below_the_floor_minus_the_window() {
    let server = NatsServer::start().expect("nats-server");
    let (_client, kv) = bucket(&server).await;
    let cents = 1;
    let ids: Vec<String> = (1..=100).map(|n| format!("p{n}")).collect();
    commit::<Sum>(&kv, "p.prune", &entries(&ids, &cents), NO_PRUNING, None)
        .await
        .expect("commit");
    // Floor 80, window 30: sequences 1..=50 can no longer be delivered, nor copied
    // within the window; 51..=100 can.
    let pruning = Pruning {
        floor: 80,
        window: 30,
    };
    let next = [format!("p{}", 101)];
    let entry = Entry {
        id: next[0].as_str(),
        sequence: 101,
        item: &cents,
    };
    commit::<Sum>(&kv, "p.prune", &[entry], pruning, None)
        .await
        .expect("commit");
    let stored = ledger(&kv, "p.prune").await;
    assert_eq!(stored.tally.n, 101);
    let kept: BTreeSet<u64> = stored.counted.values().copied().collect();
    assert_eq!(kept, (51..=101).collect::<BTreeSet<u64>>());
    // A redelivery of sequence 60 (above the floor) is still recognised.
    let again = [Entry {
        id: "p60",
        sequence: 60,
        item: &cents,
    }];
    let c = commit::<Sum>(&kv, "p.prune", &again, pruning, None)
        .await
        .expect("commit");
    assert_eq!(c.added, 0);
}
