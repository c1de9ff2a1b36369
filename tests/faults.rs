//! Fault injection: nothing whose publish was acknowledged is lost when things break.
//!
//! Every scenario runs the real `test_worker` binary as two worker replicas against real
//! `nats-server` processes on loopback, publishes jobs (`jobs.<id>`) with a publisher that
//! records which publishes got a PubAck, injects faults while the jobs flow, and then
//! checks the oracle (see `faults/harness.rs`):
//!
//! - every acknowledged job was handled successfully at least once (a `done` line in a
//!   worker's job log) or is in the dead-letter stream exactly once;
//! - jobs handled more than once are counted and reported (at least once is the contract);
//! - after each fault, work resumes within [`RECOVERY_BOUND`]: a job that *started* after
//!   the fault ended is finished (a handler that was already running does not count), and
//!   the jobs a killed worker had in flight are finished again, within the bound.
//!
//! Scenarios:
//! 1. `kill_worker`: `kill -9` one of two replicas, again and again, while jobs flow;
//! 2. `restart_server`: `kill -9` (and, at full size, also SIGTERM) the nats-server and
//!    start it again on the same store;
//! 3. `kill_stream_leader`: a 3-node cluster with R3 streams, `kill -9` the leader of the
//!    jobs stream, then bring it back (at full size, then also the `jobs` consumer's
//!    leader, which loses the workers' open pull requests);
//! 4. `cut_connection`: the workers reach the server through a TCP proxy the test
//!    controls; it freezes their connections silently (no FIN, no RST) and later closes
//!    them, each time for longer than the pull heartbeat, then lets them through again;
//! 5. `saturate_max_ack_pending`: slow handlers (some slower than the ack wait) on more
//!    handler slots than the consumer's `max_ack_pending`;
//! 6. `safety_net_abandoned`: jobs whose handler never returns; every worker holding one
//!    is killed, so the last allowed delivery never settles and only the safety net can
//!    dead-letter them (reason `abandoned`).
//! 7. `fanout_mixed_outcomes`: two consumers (`jobs`, `audit`) of one stream, each with
//!    its own dead-letter subject in one DLQ stream; jobs that succeed, fail once, fail
//!    twice (succeeding on their last attempt), fail permanently or are too large (some
//!    filling the server's max payload: their payload goes to the object store); a
//!    `kill -9` (between a copy's PubAck and its term, among others) and a rolling
//!    restart by SIGTERM while retries and final attempts run. Its oracle is per
//!    consumer (`Run::finish_fanout`): every pair done or dead-lettered exactly once
//!    with its reason, nothing that succeeds dead-lettered, nothing `abandoned` that
//!    never started, duplicates within a stated bound, pending and ack pending 0.
//! 8. `dead_letter_stream_unavailable`: the DLQ stream refuses every copy (its
//!    max_msg_size lowered behind the workers' back) for longer than the hold limit
//!    while permanent failures flow: good jobs keep running (no slot held without
//!    bound), and once copies are taken again each failure is dead-lettered exactly
//!    once, by the worker or by the safety net it was handed to.
//! 9. `consumer_deleted_mid_run`: the `jobs` consumer is deleted while jobs flow; the
//!    workers recreate it after its last known ack floor, so duplicates stay within
//!    what was acknowledged since that floor was read (6 s of publishing) plus what ran.
//! 10. `rolling_restart_adds_a_consumer`: the replicas restart one at a time (SIGTERM)
//!     onto a config with one more consumer (`audit`); both consumers end with every
//!     job done or dead-lettered once, nothing duplicated by the graceful restarts.
//! 11. `kill_dead_letter_stream_leader`: a 3-node cluster with R3 streams; jobs that
//!     succeed, fail once or twice (then succeed) or fail permanently; `kill -9` the
//!     leader of the DLQ stream (at full size twice), then bring it back: a copy is
//!     stored again within the bound, every permanent failure is in the DLQ exactly
//!     once, nothing that succeeds is dead-lettered.
//! 12. `sigstop_worker`: the same mix; SIGSTOP one replica for 12 s (longer than the
//!     ack wait, plus the expiry of the pulls it left open, plus an ack wait), then
//!     SIGCONT (at full size three times, the replicas in turn). While it sleeps, the
//!     jobs it held are done by the other replica; once awake it works again; what it
//!     finishes late is neither lost nor dead-lettered (a permanent failure it copies
//!     late is stored once), and every duplicate is a job a frozen replica handled.
//! 13. `sigstop_server`: the same mix; SIGSTOP the nats-server for 10 s (full: 15 s,
//!     twice), longer than the ack wait and the pull heartbeat grace, then SIGCONT:
//!     each worker works again within the bound, without a restart.
//!
//! Scenarios 11-13 bound duplicates by what the workers a fault hits can hold: their
//! handler slots, plus twice 200 ms of their handlers' pace (the prefetch bound, and
//! what open pulls may still bring).
//!
//! `cargo test --test faults` runs a small version (a few thousand jobs, one or a few
//! faults each; the scenarios run in parallel, about two minutes on 2 cores).
//! `JETWORKER_FAULTS_FULL=1 cargo test --test faults -- --nocapture` runs the full size
//! (50k jobs in scenario 1, more faults) and prints the table: scenario, messages,
//! faults injected, lost, duplicates, recovery time (the last scenario to finish prints
//! all rows). A failing scenario keeps its files (job logs, worker logs, `run.log`) and
//! names the directory; `JETWORKER_FAULTS_KEEP=1` keeps them always, and
//! `JETWORKER_FAULTS_RUST_LOG` sets the workers' `RUST_LOG` (e.g. `debug`).

mod common;
#[path = "faults/harness.rs"]
mod harness;
#[path = "faults/proxy.rs"]
mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use harness::*;
use jetworker::testing::server::{NatsCluster, NatsServer};
use jetworker_suite::{Job, Mode};
use proxy::Proxy;
use tokio::time::Instant;

/// The stated bound: after each fault, work resumes (and a killed worker's jobs are
/// handled again) within this long. It covers what the design allows: the ack wait
/// (3 s) for a killed worker's messages, the client's reconnect backoff, a stream or
/// consumer leader election, the pull heartbeat grace plus a liveness probe (the
/// request timeout) for a frozen connection, with room for a loaded 2-core machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// How long draining may take after publishing ends, before the oracle runs anyway.
fn drain_limit() -> Duration {
    size(Duration::from_secs(90), Duration::from_secs(300))
}

/// Each scenario, with its servers and workers, is bounded by this.
fn scenario_limit() -> Duration {
    size(Duration::from_secs(300), Duration::from_secs(1500))
}

/// Runs a scenario body with the time bound; servers and workers it owns are killed
/// when it is dropped, on timeout too.
async fn bounded(name: &str, body: impl Future<Output = ()>) {
    let limit = scenario_limit();
    if tokio::time::timeout(limit, body).await.is_err() {
        panic!("scenario {name} did not finish within {limit:?}");
    }
}

/// Starts `n` replicas of the worker (the first alone, so one worker provisions).
async fn start_workers(
    run: &Run,
    js: &jetstream::Context,
    spec: &WorkerSpec,
    n: usize,
) -> Replicas {
    let config = write_config(&run.path(), spec);
    let mut replicas = Replicas::new(&run.path(), config, n, run.tracker.clone());
    replicas.spawn(0);
    wait_provisioned(js, Duration::from_secs(30)).await;
    for i in 1..n {
        replicas.spawn(i);
    }
    replicas
}

/// Jobs `1..=n` that succeed after `work_ms`.
fn ok_jobs(n: u64, work_ms: u64) -> Vec<Job> {
    (1..=n).map(|id| ok_job(id, work_ms)).collect()
}

/// Sleeps until `at` (a point in the run's schedule).
async fn until(at: Instant) {
    tokio::time::sleep_until(at).await;
}

/// Publishing gives up on a job after this long (such jobs are left out of the oracle).
fn give_up_after(publish_over: Duration) -> Duration {
    publish_over + Duration::from_secs(60)
}

// ---------------------------------------------------------------------------------------
// 1. kill -9 one of two worker replicas, repeatedly
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_worker() {
    bounded("kill_worker", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("1_kill_worker", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let spec = WorkerSpec::new(vec![server.url()]);
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(3_000, 50_000);
        let over = size(Duration::from_secs(12), Duration::from_secs(60));
        // Not a multiple of the ack wait (3 s): redeliveries would land on the next victim.
        let kill_every = size(Duration::from_millis(4_100), Duration::from_millis(4_300));
        let t0 = Instant::now();
        // 40 ms of work each: both replicas always hold jobs, so every kill strands some.
        let publishing = spawn_publisher(js.clone(), ok_jobs(n, 40), over, give_up_after(over));
        let mut next = t0 + Duration::from_secs(2);
        let mut victim = 0;
        while next + Duration::from_secs(1) < t0 + over {
            until(next).await;
            // Kill while it holds work, so the kill strands something (up to 2 s).
            let wait_for_work = Instant::now() + Duration::from_secs(2);
            while replicas.in_flight(victim).is_empty() && Instant::now() < wait_for_work {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let killed_at = Instant::now();
            let stranded = replicas.kill(victim);
            run.faults += 1;
            run.say(&format!(
                "kill -9 replica {victim}: {} jobs in flight",
                stranded.len()
            ));
            run.stranded(killed_at, stranded);
            tokio::time::sleep(Duration::from_millis(500)).await;
            replicas.spawn(victim);
            victim = 1 - victim;
            next += kill_every;
        }
        let published = publishing.await.expect("publisher");
        let verdict = run
            .finish(&js, published, &mut replicas, drain_limit())
            .await;
        assert!(verdict.done > 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. restart nats-server mid-run
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_server() {
    bounded("restart_server", async {
        let mut server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("2_restart_server", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let spec = WorkerSpec::new(vec![server.url()]);
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(2_000, 30_000);
        let over = size(Duration::from_secs(12), Duration::from_secs(60));
        // Small: one kill -9. Full: kill -9, SIGTERM, kill -9.
        let restarts: &[(f64, bool)] = if full() {
            &[(0.2, true), (0.45, false), (0.7, true)]
        } else {
            &[(0.35, true)]
        };
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), ok_jobs(n, 1), over, give_up_after(over));
        for (at, kill) in restarts {
            until(t0 + over.mul_f64(*at)).await;
            let how = if *kill { "kill -9" } else { "SIGTERM" };
            run.say(&format!("{how} nats-server"));
            blocking(|| {
                if *kill {
                    server.kill();
                } else {
                    server.stop();
                }
            });
            run.faults += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
            blocking(|| server.restart()).expect("restart nats-server");
            let back = Instant::now();
            run.say("nats-server is back");
            run.recovered(&format!("{how} + restart"), back).await;
        }
        let published = publishing.await.expect("publisher");
        run.finish(&js, published, &mut replicas, drain_limit())
            .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. a 3-node cluster with R3 streams: kill the stream leader
// ---------------------------------------------------------------------------------------

/// How long one question about a leader may take: short, so the time a new leader is
/// first seen is precise to about this.
const LEADER_ASK_TIMEOUT: Duration = Duration::from_millis(750);

/// Whose leader scenario 3 kills.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The EVENTS stream's.
    StreamLeader,
    /// The `jobs` consumer's.
    ConsumerLeader,
}

/// The server name of the `jobs` consumer's leader, if one is known now.
async fn consumer_leader(js: &jetstream::Context) -> Option<String> {
    let read = async {
        let stream = js.get_stream("EVENTS").await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("jobs").await.ok()?;
        let info = consumer.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    };
    tokio::time::timeout(LEADER_ASK_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// The server name of the stream's leader, if one is known now.
async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let read = async {
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    };
    tokio::time::timeout(LEADER_ASK_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// Who leads the EVENTS, DLQ and advisory streams and the `jobs` consumer now, for the
/// log.
async fn leaders(js: &jetstream::Context) -> String {
    format!(
        "EVENTS {}, DLQ {}, {} {}, jobs {}",
        stream_leader(js, "EVENTS").await.unwrap_or_default(),
        stream_leader(js, "DLQ").await.unwrap_or_default(),
        jetworker::ADVISORY_STREAM,
        stream_leader(js, jetworker::ADVISORY_STREAM)
            .await
            .unwrap_or_default(),
        consumer_leader(js).await.unwrap_or_default(),
    )
}

/// The cluster member [`kill_leader`] killed.
struct LeaderKill {
    /// Its index in the cluster.
    member: usize,
    /// Its server name.
    leader: String,
    /// When it was killed.
    killed_at: Instant,
}

/// `kill -9` the member that leads `what` (asked with `leader_of`), then waits for
/// another member to lead it: the election time is a recovery of the run, no new leader
/// within [`RECOVERY_BOUND`] a failure.
async fn kill_leader<F, Fut>(
    run: &mut Run,
    cluster: &mut NatsCluster,
    js: &jetstream::Context,
    what: &str,
    leader_of: F,
) -> LeaderKill
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let mut leader = None;
    let asking_since = Instant::now();
    while leader.is_none() && asking_since.elapsed() < RECOVERY_BOUND {
        leader = leader_of().await;
    }
    let leader = leader.unwrap_or_else(|| panic!("{what}: no leader known"));
    let member = cluster
        .servers()
        .iter()
        .position(|s| s.name() == leader)
        .expect("the leader is a member");
    let led = leaders(js).await;
    run.say(&format!(
        "kill -9 {leader} (member {member}), leader of {what}; leaders: {led}"
    ));
    let killed_at = Instant::now();
    blocking(|| cluster.server(member).kill());
    run.faults += 1;
    // A new leader among the other two; until then the stream takes no publishes (or
    // the consumer delivers nothing): part of the recovery.
    let elected = loop {
        match leader_of().await {
            Some(new) if new != leader => break Some((new, killed_at.elapsed())),
            _ if killed_at.elapsed() > RECOVERY_BOUND => break None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    match elected {
        Some((new, took)) => {
            run.notes.push(format!(
                "killed {leader} (leader of {what}; leaders then: {led}), new leader {new} {:.1}s later",
                took.as_secs_f64()
            ));
            run.recoveries
                .push((format!("{what} {leader}: new leader"), took));
        }
        None => run.fail(format!(
            "{what}: no new leader within {RECOVERY_BOUND:?} of killing {leader}"
        )),
    }
    LeaderKill {
        member,
        leader,
        killed_at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stream_leader() {
    bounded("kill_stream_leader", async {
        let mut cluster = blocking(|| NatsCluster::start(3)).expect("3-node cluster");
        let mut run = Run::new("3_kill_stream_leader", RECOVERY_BOUND);
        let urls = cluster.urls();
        let (_client, js) = connect(&urls).await;
        let mut spec = WorkerSpec::new(urls);
        spec.replicas = 3;
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_500, 20_000);
        let over = size(Duration::from_secs(14), Duration::from_secs(60));
        // Small: the EVENTS stream's leader. Full: then also the jobs consumer's leader,
        // which loses the workers' open pull requests (they must notice and pull again).
        let kills: &[(f64, Target)] = if full() {
            &[(0.2, Target::StreamLeader), (0.6, Target::ConsumerLeader)]
        } else {
            &[(0.3, Target::StreamLeader)]
        };
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), ok_jobs(n, 1), over, give_up_after(over));
        for (at, target) in kills {
            until(t0 + over.mul_f64(*at)).await;
            let leader_of = || async {
                match target {
                    Target::StreamLeader => stream_leader(&js, "EVENTS").await,
                    Target::ConsumerLeader => consumer_leader(&js).await,
                }
            };
            let LeaderKill {
                member: i,
                leader,
                killed_at,
            } = kill_leader(
                &mut run,
                &mut cluster,
                &js,
                &format!("{target:?}"),
                leader_of,
            )
            .await;
            run.recovered(&format!("{target:?} {leader} killed"), killed_at)
                .await;
            // Bring it back (it catches up from the others) before the next kill.
            tokio::time::sleep(Duration::from_secs(2)).await;
            blocking(|| cluster.server(i).restart()).expect("restart the killed member");
            run.say(&format!("{leader} is back"));
        }
        let published = publishing.await.expect("publisher");
        run.finish(&js, published, &mut replicas, drain_limit())
            .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. cut the workers' connection through a proxy, longer than the pull heartbeat
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection() {
    bounded("cut_connection", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("4_cut_connection", RECOVERY_BOUND);
        let upstream = SocketAddr::from(([127, 0, 0, 1], server.port()));
        let proxy = Proxy::start(upstream).await.expect("proxy");
        // The publisher and the oracle go direct; only the workers go through the proxy.
        let (_client, js) = connect(&[server.url()]).await;
        let spec = WorkerSpec::new(vec![proxy.url()]);
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        // Longer than the pull heartbeat and its grace (a few seconds; the client's own
        // pings would take minutes): the workers must notice through the heartbeats.
        let outage = size(Duration::from_secs(15), Duration::from_secs(25));
        let n = size(1_500, 20_000);
        let over = outage * 2 + size(Duration::from_secs(12), Duration::from_secs(40));
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), ok_jobs(n, 1), over, give_up_after(over));

        until(t0 + Duration::from_secs(3)).await;
        run.say("silent partition: connections frozen, no FIN, no RST");
        proxy.stall();
        run.faults += 1;
        tokio::time::sleep(outage).await;
        proxy.restore();
        let restored = Instant::now();
        run.say("partition healed");
        run.recovered("silent partition", restored).await;

        until(restored + Duration::from_secs(4)).await;
        run.say("connections closed, reconnects black-holed");
        proxy.cut();
        run.faults += 1;
        tokio::time::sleep(outage).await;
        proxy.restore();
        let restored = Instant::now();
        run.say("connections let through again");
        run.recovered("closed + black-holed", restored).await;

        let stats = proxy.stats();
        run.notes.push(format!(
            "proxy: {} connections forwarded, {} frozen, {} closed, {} black-holed",
            stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
            stats.stalled.load(std::sync::atomic::Ordering::Relaxed),
            stats
                .closed_by_cut
                .load(std::sync::atomic::Ordering::Relaxed),
            stats.black_holed.load(std::sync::atomic::Ordering::Relaxed),
        ));
        let published = publishing.await.expect("publisher");
        run.finish(&js, published, &mut replicas, drain_limit())
            .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. slow handlers saturating max ack pending
// ---------------------------------------------------------------------------------------

/// Server-side ack-pending of the `jobs` consumer, if it can be read now.
async fn ack_pending(js: &jetstream::Context) -> Option<usize> {
    let read = async {
        let stream = js.get_stream("EVENTS").await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("jobs").await.ok()?;
        Some(consumer.info().await.ok()?.num_ack_pending)
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturate_max_ack_pending() {
    bounded("saturate_max_ack_pending", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("5_saturate_ack_pending", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let mut spec = WorkerSpec::new(vec![server.url()]);
        // 2 replicas x 16 slots = 32 > 20: the server's limit is what holds work back.
        spec.max_ack_pending = 20;
        spec.ack_wait = "4s";
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(500u64, 5_000);
        // 100..600 ms of work; every 50th job takes 6 s, longer than the ack wait: its
        // message is kept by progress acks, never redelivered while it runs.
        let jobs: Vec<Job> = (1..=n)
            .map(|id| ok_job(id, if id % 50 == 0 { 6_000 } else { 100 + id * 37 % 500 }))
            .collect();
        let t0 = Instant::now();
        let publishing = spawn_publisher(
            js.clone(),
            jobs,
            Duration::from_secs(1),
            give_up_after(Duration::from_secs(1)),
        );
        run.faults += 1;
        // Watch the server's ack-pending until everything is handled.
        let mut peak = 0;
        while run.tracker.done_ids() < n as usize && t0.elapsed() < scenario_limit() / 2 {
            if let Some(p) = ack_pending(&js).await {
                peak = peak.max(p);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let busy_until = Instant::now();
        let stall = run.tracker.longest_gap(t0, busy_until);
        run.say(&format!(
            "all handled after {:.1}s; server ack pending peaked at {peak}; longest time without a finished job {:.1}s",
            t0.elapsed().as_secs_f64(),
            stall.as_secs_f64()
        ));
        run.recoveries.push(("longest stall while saturated".into(), stall));
        if stall > RECOVERY_BOUND {
            run.fail(format!(
                "no job finished for {stall:?} while work was waiting"
            ));
        }
        if peak < spec.max_ack_pending as usize {
            run.fail(format!(
                "the scenario did not saturate max_ack_pending: peak {peak} < {}",
                spec.max_ack_pending
            ));
        }
        // Reported, not asserted: the logs of the two workers are read one after the
        // other, so this sum can count a job that finished between the two reads together
        // with one that started after it. What it would catch (a message delivered again
        // while its handler runs) is asserted exactly below: no duplicates.
        let peak_running = run.tracker.peak_in_flight();
        run.notes.push(format!(
            "server ack pending peaked at {peak} (max {}); about {peak_running} handlers ran at once at most",
            spec.max_ack_pending
        ));
        let published = publishing.await.expect("publisher");
        let verdict = run
            .finish(&js, published, &mut replicas, drain_limit())
            .await;
        // No fault here kills or cuts anything: slow handlers alone must not cause a
        // redelivery (progress acks keep what runs longer than the ack wait).
        assert_eq!(
            verdict.duplicate_ids, 0,
            "slow handlers were redelivered while they ran"
        );
        assert!(verdict.letters.is_empty(), "nothing should be dead-lettered");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. the final attempts are killed: only the safety net can dead-letter them
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_net_abandoned() {
    bounded("safety_net_abandoned", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("6_safety_net_abandoned", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let mut spec = WorkerSpec::new(vec![server.url()]);
        spec.max_deliver = 3;
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(600u64, 20_000);
        let hanging_every = size(100u64, 400);
        let hanging: HashSet<u64> = (1..=n).filter(|id| id % hanging_every == 7).collect();
        let jobs: Vec<Job> = (1..=n)
            .map(|id| {
                if hanging.contains(&id) {
                    // Never returns (the handler timeout is 60 s; it is killed first).
                    Job {
                        id,
                        mode: Mode::Sleep,
                        until: u64::MAX,
                        sleep_ms: 600_000,
                    }
                } else {
                    ok_job(id, 2)
                }
            })
            .collect();
        let over = size(Duration::from_secs(8), Duration::from_secs(40));
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));

        // Kill every worker that holds a hanging job; note when each final attempt died.
        let max_deliver = u64::from(spec.max_deliver);
        let mut final_killed: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut lettered: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut last_dlq_check = Instant::now();
        let deadline = Instant::now() + over + RECOVERY_BOUND * 4;
        while lettered.len() < hanging.len() && Instant::now() < deadline {
            for i in 0..2 {
                if !replicas.is_up(i) {
                    replicas.spawn(i);
                    continue;
                }
                let holding: Vec<u64> = replicas
                    .in_flight(i)
                    .into_iter()
                    .filter(|id| hanging.contains(id))
                    .collect();
                if holding.is_empty() {
                    continue;
                }
                let killed_at = Instant::now();
                let in_flight = replicas.kill(i);
                run.faults += 1;
                let finals: Vec<u64> = holding
                    .iter()
                    .copied()
                    .filter(|id| run.tracker.started(*id, max_deliver))
                    .collect();
                for id in &finals {
                    final_killed.entry(*id).or_insert(killed_at);
                }
                run.say(&format!(
                    "kill -9 replica {i}: holds hanging jobs {holding:?} (final attempt: {finals:?})"
                ));
                run.stranded(
                    killed_at,
                    in_flight
                        .into_iter()
                        .filter(|id| !hanging.contains(id))
                        .collect(),
                );
            }
            if last_dlq_check.elapsed() > Duration::from_millis(500) {
                last_dlq_check = Instant::now();
                if dlq_count(&js).await > lettered.len() as u64 {
                    for letter in dead_letters(&js).await {
                        if let Some(id) = letter.id.filter(|id| hanging.contains(id)) {
                            lettered.entry(id).or_insert_with(Instant::now);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (id, killed_at) in &final_killed {
            if let Some(at) = lettered.get(id) {
                run.recoveries.push((
                    format!("job {id}: final attempt killed -> dead-lettered"),
                    at.duration_since(*killed_at),
                ));
            }
        }
        run.notes.push(format!(
            "{} hanging jobs, {} final attempts seen killed, {} dead-lettered by the safety net",
            hanging.len(),
            final_killed.len(),
            lettered.len()
        ));
        let slowest = run.max_recovery().unwrap_or_default();
        if slowest > RECOVERY_BOUND {
            run.fail(format!(
                "a killed final attempt took {slowest:?} to be dead-lettered"
            ));
        }
        let published = publishing.await.expect("publisher");
        let tracker = run.tracker.clone();
        let verdict = run
            .finish(&js, published, &mut replicas, drain_limit())
            .await;
        for id in &hanging {
            let letter = verdict
                .letters
                .get(id)
                .unwrap_or_else(|| panic!("hanging job {id} was not dead-lettered"));
            assert_eq!(letter.reason, "abandoned", "job {id}: {letter:?}");
            assert_eq!(letter.attempts, max_deliver, "job {id}: {letter:?}");
        }
        assert!(
            hanging.iter().all(|id| !tracker.is_done(*id)),
            "a hanging job cannot have succeeded"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. two consumers sharing a stream and a dead-letter stream, mixed outcomes, kill -9
//    and a rolling restart (SIGTERM) while retries and final attempts run
// ---------------------------------------------------------------------------------------

/// Publishes `jobs.<id>` with `headers` and `payload` until acknowledged (no fault runs
/// yet when this is used).
async fn publish_raw(
    js: &jetstream::Context,
    id: u64,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) {
    let mut headers = headers;
    headers.insert("Nats-Msg-Id", format!("job-{id}").as_str());
    js.publish_with_headers(format!("jobs.{id}"), headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_mixed_outcomes() {
    bounded("fanout_mixed_outcomes", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("7_fanout_mixed_outcomes", RECOVERY_BOUND);
        let (client, js) = connect(&[server.url()]).await;
        let mut spec = WorkerSpec::new(vec![server.url()]);
        spec.extra_consumers = vec!["audit"];
        spec.max_deliver = 3;
        spec.backoff = r#"["300ms", "600ms"]"#;
        spec.max_payload_bytes = Some(4096);
        let consumers = ["jobs", "audit"];
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_000u64, 20_000);
        let over = size(Duration::from_secs(10), Duration::from_secs(60));
        // Per ten ids: six succeed, one fails once, one fails twice (succeeds on its last
        // attempt), one fails permanently, one is too large for max_payload_bytes (a few
        // of those fill the server's max payload: their copies keep the payload in the
        // object store).
        let mut expected: HashMap<u64, Expect> = HashMap::new();
        let mut jobs = Vec::new();
        let near_max: HashSet<u64> = (1..=n)
            .filter(|id| id % 10 == 9)
            .take(size(3, 10))
            .collect();
        let max_payload = client.server_info().max_payload;
        let mut published_first = HashSet::new();
        for id in 1..=n {
            match id % 10 {
                6 | 7 => jobs.push(Job {
                    id,
                    mode: Mode::Fail,
                    until: if id % 10 == 6 { 1 } else { 2 },
                    sleep_ms: 5,
                }),
                8 => {
                    expected.insert(id, Expect::DeadLetter("permanent"));
                    jobs.push(Job {
                        id,
                        mode: Mode::Permanent,
                        until: 0,
                        sleep_ms: 0,
                    });
                }
                9 => {
                    expected.insert(id, Expect::DeadLetter("too_large"));
                    let (headers, payload) = if near_max.contains(&id) {
                        (async_nats::HeaderMap::new(), vec![0x2a; max_payload - 200])
                    } else {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("X-Pad", "p".repeat(5_000).as_str());
                        (h, rmp_serde::to_vec_named(&ok_job(id, 0)).expect("encode"))
                    };
                    publish_raw(&js, id, headers, payload).await;
                    published_first.insert(id);
                }
                _ => jobs.push(ok_job(id, 5)),
            }
        }
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));

        // kill -9 while retries and dead letters are under way (small: one; full: two),
        // and a rolling restart (SIGTERM, then a new process) in between.
        let mut faults: Vec<(f64, bool)> = vec![(0.3, true), (0.55, false)];
        if full() {
            faults.push((0.8, true));
        }
        let mut kills = 0;
        for (k, (at, kill)) in faults.iter().enumerate() {
            until(t0 + over.mul_f64(*at)).await;
            let victim = k % 2;
            let since = Instant::now();
            if *kill {
                let in_flight = replicas.kill(victim);
                kills += 1;
                run.say(&format!(
                    "kill -9 replica {victim}: {} jobs in flight",
                    in_flight.len()
                ));
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else {
                let code = replicas.stop(victim);
                run.say(&format!("SIGTERM replica {victim}: exit {code:?}"));
                if code != Some(0) {
                    run.fail(format!(
                        "replica {victim} did not exit 0 on SIGTERM: {code:?}"
                    ));
                }
            }
            run.faults += 1;
            replicas.spawn(victim);
            run.recovered(if *kill { "kill -9" } else { "rolling restart" }, since)
                .await;
        }
        let mut published = publishing.await.expect("publisher");
        published.acked.extend(published_first);
        // A kill -9 can repeat at most what the killed worker had finished and not yet
        // acknowledged: its handler slots, per consumer.
        let bound = kills * spec.concurrency as usize * consumers.len();
        let verdict = run
            .finish_fanout(
                &js,
                published,
                &mut replicas,
                &FanoutCheck {
                    consumers: &consumers,
                    expected: &expected,
                    duplicate_bound: bound,
                    killed: true,
                },
                drain_limit(),
            )
            .await;
        assert!(verdict.done > 0 && verdict.dead_lettered > 0, "{verdict:?}");
        // The payloads that filled the max payload are kept whole in the object store.
        let letters = dead_letters(&js).await;
        for id in &near_max {
            for c in consumers {
                let letter = letters
                    .iter()
                    .find(|l| l.id == Some(*id) && l.consumer == c)
                    .unwrap_or_else(|| panic!("no dead letter of job {id} by {c}"));
                let (bucket, object) = jetworker::dead_letter_payload_object(
                    &letter.payload_object,
                )
                .unwrap_or_else(|| panic!("job {id} by {c}: no payload object: {letter:?}"));
                let info = js
                    .get_object_store(bucket)
                    .await
                    .expect("payload bucket")
                    .info(object)
                    .await
                    .expect("payload object");
                assert_eq!(info.size, max_payload - 200, "job {id} by {c}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. the dead-letter stream refuses every copy for a while, under load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_stream_unavailable() {
    bounded("dead_letter_stream_unavailable", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("8_dead_letters_refused", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let mut spec = WorkerSpec::new(vec![server.url()]);
        spec.max_deliver = 3;
        spec.backoff = r#"["300ms", "600ms"]"#;
        spec.concurrency = 8;
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_500u64, 20_000);
        let over = size(Duration::from_secs(12), Duration::from_secs(60));
        // One job in five fails permanently: copies are wanted all the time.
        let mut expected: HashMap<u64, Expect> = HashMap::new();
        let jobs: Vec<Job> = (1..=n)
            .map(|id| {
                if id % 5 == 0 {
                    expected.insert(id, Expect::DeadLetter("permanent"));
                    Job {
                        id,
                        mode: Mode::Permanent,
                        until: 0,
                        sleep_ms: 0,
                    }
                } else {
                    ok_job(id, 3)
                }
            })
            .collect();
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));
        // Longer than the hold limit (one ack wait, 5 s at least): held last attempts
        // are handed to the safety net, the others retried; good jobs keep flowing.
        let outage = size(Duration::from_secs(8), Duration::from_secs(30));
        until(t0 + over.mul_f64(0.25)).await;
        run.say("DLQ max_msg_size = 64: every copy refused");
        common::set_max_msg_size(&js, "DLQ", 64).await;
        run.faults += 1;
        let refused_at = Instant::now();
        tokio::time::sleep(outage).await;
        // Good jobs must not have stopped meanwhile (no slot held without bound).
        let stall = run.tracker.longest_gap(refused_at, Instant::now());
        run.recoveries
            .push(("longest stall while copies were refused".into(), stall));
        if stall > Duration::from_secs(8) {
            run.fail(format!(
                "no job finished for {stall:?} while the DLQ refused copies"
            ));
        }
        common::set_max_msg_size(&js, "DLQ", -1).await;
        run.say("DLQ takes copies again");
        let published = publishing.await.expect("publisher");
        run.finish_fanout(
            &js,
            published,
            &mut replicas,
            &FanoutCheck {
                consumers: &["jobs"],
                expected: &expected,
                duplicate_bound: 0,
                killed: false,
            },
            drain_limit(),
        )
        .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 9. the consumer is deleted behind the workers' back and recreated by them
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_deleted_mid_run() {
    bounded("consumer_deleted_mid_run", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("9_consumer_deleted", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let spec = WorkerSpec::new(vec![server.url()]);
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_500u64, 20_000);
        let over = size(Duration::from_secs(10), Duration::from_secs(60));
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), ok_jobs(n, 2), over, give_up_after(over));
        // Deleted once the workers' ack-floor poll (every 5 s, from their start) has seen
        // acks. Near 5 s the deletion races the first poll that does: a replica that read
        // only the floor at its start (0) leaves the recreation to the one that read it
        // later (it waits as long as its reading is old), or would resume from the start.
        until(t0 + over.mul_f64(0.5).max(Duration::from_secs(7))).await;
        let done_before = run.tracker.done_ids();
        // nats-server 2.9 can answer a delete under load with an error while removing the
        // consumer's files ("directory not empty"): asked again until it is gone.
        let events = js.get_stream("EVENTS").await.expect("EVENTS");
        for attempt in 1.. {
            match events.delete_consumer("jobs").await {
                Ok(_) => break,
                Err(e) => {
                    assert!(attempt < 20, "deleting the jobs consumer: {e}");
                    run.say(&format!("delete answered {e}; asking again"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let deleted_at = Instant::now();
        run.faults += 1;
        run.say(&format!(
            "consumer jobs deleted after {done_before} jobs were done"
        ));
        run.recovered("consumer deleted", deleted_at).await;
        let published = publishing.await.expect("publisher");
        // Recreated after the last ack floor seen (polled every 5 s): what was acked
        // since, and what was in flight, comes again; nothing before it. So at most
        // 6 s of publishing, plus the two workers' slots.
        let rate = n as f64 / over.as_secs_f64();
        let bound = (rate * 6.0) as usize + 2 * spec.concurrency as usize;
        let verdict = run
            .finish_fanout(
                &js,
                published,
                &mut replicas,
                &FanoutCheck {
                    consumers: &["jobs"],
                    expected: &HashMap::new(),
                    duplicate_bound: bound,
                    killed: false,
                },
                drain_limit(),
            )
            .await;
        assert!(
            verdict.duplicates < done_before.max(1),
            "the recreated consumer started over: {} duplicates, {done_before} done before",
            verdict.duplicates
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 10. a rolling restart onto a config with one more consumer
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_adds_a_consumer() {
    bounded("rolling_restart_adds_a_consumer", async {
        let server = blocking(NatsServer::start).expect("nats-server");
        let mut run = Run::new("10_rolling_new_consumer", RECOVERY_BOUND);
        let (_client, js) = connect(&[server.url()]).await;
        let mut spec = WorkerSpec::new(vec![server.url()]);
        spec.max_deliver = 3;
        spec.backoff = r#"["300ms", "600ms"]"#;
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_500u64, 20_000);
        let over = size(Duration::from_secs(12), Duration::from_secs(60));
        let mut expected: HashMap<u64, Expect> = HashMap::new();
        let jobs: Vec<Job> = (1..=n)
            .map(|id| match id % 10 {
                3 => Job {
                    id,
                    mode: Mode::Fail,
                    until: 1,
                    sleep_ms: 3,
                },
                7 => {
                    expected.insert(id, Expect::DeadLetter("permanent"));
                    Job {
                        id,
                        mode: Mode::Permanent,
                        until: 0,
                        sleep_ms: 0,
                    }
                }
                _ => ok_job(id, 3),
            })
            .collect();
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));
        // The new config: one more consumer of the same stream. Replicas restart onto it
        // one at a time (SIGTERM, then the new version), as a deploy would.
        spec.extra_consumers = vec!["audit"];
        write_config(&run.path(), &spec);
        for (i, at) in [(0, 0.3), (1, 0.6)] {
            until(t0 + over.mul_f64(at)).await;
            let since = Instant::now();
            let code = replicas.stop(i);
            run.say(&format!("SIGTERM replica {i} (old config): exit {code:?}"));
            if code != Some(0) {
                run.fail(format!("replica {i} did not exit 0 on SIGTERM: {code:?}"));
            }
            replicas.spawn(i);
            run.faults += 1;
            run.recovered("rolling restart onto the new config", since)
                .await;
        }
        let published = publishing.await.expect("publisher");
        run.finish_fanout(
            &js,
            published,
            &mut replicas,
            &FanoutCheck {
                consumers: &["jobs", "audit"],
                expected: &expected,
                duplicate_bound: 0,
                killed: false,
            },
            drain_limit(),
        )
        .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Shared by scenarios 11-13: mixed outcomes, and what one worker can hold
// ---------------------------------------------------------------------------------------

/// Work time of the jobs of scenarios 11-13: long enough that every worker always holds
/// some, so each fault catches deliveries in flight.
const MIXED_WORK_MS: u64 = 20;

/// Jobs `1..=n` with mixed outcomes, per ten ids: six succeed, two fail once, one fails
/// twice (all of them succeed on a later attempt, after `work_ms` of work), one fails
/// permanently (expected in the DLQ once, reason `permanent`).
fn mixed_jobs(n: u64, work_ms: u64) -> (Vec<Job>, HashMap<u64, Expect>) {
    let mut expected = HashMap::new();
    let jobs = (1..=n)
        .map(|id| match id % 10 {
            3 | 6 | 8 => Job {
                id,
                mode: Mode::Fail,
                until: if id % 10 == 8 { 2 } else { 1 },
                sleep_ms: work_ms,
            },
            9 => {
                expected.insert(id, Expect::DeadLetter("permanent"));
                Job {
                    id,
                    mode: Mode::Permanent,
                    until: 0,
                    sleep_ms: 0,
                }
            }
            _ => ok_job(id, work_ms),
        })
        .collect();
    (jobs, expected)
}

/// The most deliveries one worker of `spec` can hold at once, whose handling can be
/// repeated when it freezes or loses its connection: its handler slots, what its pull
/// loop holds beyond them (at most 200 ms of its handlers' pace; at most `concurrency`
/// jobs per `work_ms`), and as much again on its way in open pull requests.
fn most_held_by_one_worker(spec: &WorkerSpec, work_ms: u64) -> usize {
    let slots = spec.concurrency as usize;
    let pace_per_second = slots as f64 * 1000.0 / work_ms.max(1) as f64;
    let prefetch = (pace_per_second * 0.2).ceil() as usize;
    slots + 2 * prefetch.min(spec.max_ack_pending as usize)
}

/// The oracle of scenarios 11-13 ([`Run::finish_fanout`] for the `jobs` consumer, no
/// worker killed): each job of [`mixed_jobs`] done, or dead-lettered once if it fails
/// permanently, at most `duplicate_bound` handled twice; and both kinds were seen.
async fn finish_mixed(
    run: Run,
    js: &jetstream::Context,
    published: Published,
    replicas: &mut Replicas,
    expected: &HashMap<u64, Expect>,
    duplicate_bound: usize,
) -> FanoutVerdict {
    let verdict = run
        .finish_fanout(
            js,
            published,
            replicas,
            &FanoutCheck {
                consumers: &["jobs"],
                expected,
                duplicate_bound,
                killed: false,
            },
            drain_limit(),
        )
        .await;
    assert!(verdict.done > 0 && verdict.dead_lettered > 0, "{verdict:?}");
    verdict
}

/// Scenarios 12 and 13 under way: one server, two replicas of the default worker, the
/// [`mixed_jobs`] to publish over `over`.
struct MixedOnOneServer {
    server: NatsServer,
    run: Run,
    js: jetstream::Context,
    spec: WorkerSpec,
    replicas: Replicas,
    jobs: Vec<Job>,
    expected: HashMap<u64, Expect>,
    over: Duration,
}

/// Starts scenario `name` as [`MixedOnOneServer`] describes (small: 2,000 jobs over 18 s;
/// full: 20,000 over 60 s).
async fn mixed_on_one_server(name: &'static str) -> MixedOnOneServer {
    let server = blocking(NatsServer::start).expect("nats-server");
    let run = Run::new(name, RECOVERY_BOUND);
    let (_client, js) = connect(&[server.url()]).await;
    let spec = WorkerSpec::new(vec![server.url()]);
    let replicas = start_workers(&run, &js, &spec, 2).await;
    let n = size(2_000u64, 20_000);
    let (jobs, expected) = mixed_jobs(n, MIXED_WORK_MS);
    MixedOnOneServer {
        server,
        run,
        js,
        spec,
        replicas,
        jobs,
        expected,
        over: size(Duration::from_secs(18), Duration::from_secs(60)),
    }
}

// ---------------------------------------------------------------------------------------
// 11. a 3-node cluster: kill the dead-letter stream's leader while failures flow
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dead_letter_stream_leader() {
    bounded("kill_dead_letter_stream_leader", async {
        let mut cluster = blocking(|| NatsCluster::start(3)).expect("3-node cluster");
        let mut run = Run::new("11_kill_dlq_leader", RECOVERY_BOUND);
        let urls = cluster.urls();
        let (_client, js) = connect(&urls).await;
        let mut spec = WorkerSpec::new(urls);
        spec.replicas = 3;
        let mut replicas = start_workers(&run, &js, &spec, 2).await;

        let n = size(1_500u64, 20_000);
        let over = size(Duration::from_secs(14), Duration::from_secs(60));
        let (jobs, expected) = mixed_jobs(n, MIXED_WORK_MS);
        // Small: the DLQ stream's leader once. Full: twice (the second time the member
        // elected after the first kill).
        let kills: &[f64] = if full() { &[0.2, 0.6] } else { &[0.3] };
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));
        for at in kills {
            until(t0 + over.mul_f64(*at)).await;
            let stored_before = dlq_count(&js).await;
            let LeaderKill {
                member,
                leader,
                killed_at,
            } = kill_leader(&mut run, &mut cluster, &js, "DLQ", || {
                stream_leader(&js, "DLQ")
            })
            .await;
            // Copies refused or unanswered meanwhile were naked and come again: the
            // first copy stored after the kill is the dead-letter path's recovery.
            loop {
                if dlq_count(&js).await > stored_before {
                    let took = killed_at.elapsed();
                    run.say(&format!(
                        "dead letters stored again {:.2}s after the kill",
                        took.as_secs_f64()
                    ));
                    run.recoveries
                        .push(("DLQ leader killed: a copy stored".into(), took));
                    break;
                }
                if killed_at.elapsed() > RECOVERY_BOUND {
                    run.fail(format!(
                        "no dead letter stored within {RECOVERY_BOUND:?} of killing the DLQ leader"
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            run.recovered(&format!("DLQ leader {leader} killed"), killed_at)
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            blocking(|| cluster.server(member).restart()).expect("restart the killed member");
            run.say(&format!("{leader} is back"));
        }
        let published = publishing.await.expect("publisher");
        // The killed member may have held the workers' connections (acks sent to it are
        // lost) and led the consumer (its open pulls too): what both workers held may
        // run again, per kill.
        let bound = kills.len() * 2 * most_held_by_one_worker(&spec, MIXED_WORK_MS);
        finish_mixed(run, &js, published, &mut replicas, &expected, bound).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 12. SIGSTOP a worker for longer than the ack wait, then SIGCONT
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_worker() {
    bounded("sigstop_worker", async {
        let MixedOnOneServer {
            server: _server,
            mut run,
            js,
            spec,
            mut replicas,
            jobs,
            expected,
            over,
        } = mixed_on_one_server("12_sigstop_worker").await;
        // Frozen for longer than the ack wait (3 s) plus the pull expiry (5 s: the server
        // may still send to its open pulls) plus another ack wait: what it held and what
        // was sent to it meanwhile are all redelivered to the other replica while it
        // sleeps. Small: once. Full: three times, each replica in turn.
        let freeze = Duration::from_secs(12);
        let stops: &[f64] = if full() {
            &[0.1, 0.4, 0.7]
        } else {
            &[0.15]
        };
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));
        let mut frozen = HashSet::new();
        let mut held_in_all = 0;
        for (k, at) in stops.iter().enumerate() {
            until(t0 + over.mul_f64(*at)).await;
            let victim = k % 2;
            let wait_for_work = Instant::now() + Duration::from_secs(2);
            // Frozen while it runs a job that can succeed (up to 2 s), so that the check
            // below has something to find done elsewhere.
            let runs_one = |replicas: &Replicas| {
                replicas
                    .in_flight_since(victim, Instant::now() - Duration::from_millis(100))
                    .iter()
                    .any(|id| !expected.contains_key(id))
            };
            while !runs_one(&replicas) && Instant::now() < wait_for_work {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            replicas.signal(victim, "STOP");
            let stopped_at = Instant::now();
            run.faults += 1;
            frozen.insert(victim);
            // It writes nothing more: what the tail reads next is all it started.
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Its jobs take 20 ms: what it started in its last 100 ms and did not finish
            // ran when it froze, or failed (a failed attempt never has a `done` line).
            let held = replicas.in_flight_since(victim, stopped_at - Duration::from_millis(100));
            held_in_all += held.len();
            run.say(&format!(
                "SIGSTOP replica {victim}: {} jobs started in its last 100 ms and not done",
                held.len()
            ));
            until(stopped_at + freeze).await;
            // Its deliveries went to the other replica while it slept.
            let can_succeed: Vec<u64> = held
                .iter()
                .copied()
                .filter(|id| !expected.contains_key(id))
                .collect();
            if can_succeed.is_empty() {
                run.fail(format!(
                    "replica {victim} ran no job that can succeed when it was frozen"
                ));
            }
            match run.tracker.redone_within(&can_succeed, stopped_at) {
                Some(took) => {
                    run.say(&format!(
                        "the {} jobs it held that can succeed were done by the other replica within {:.2}s",
                        can_succeed.len(),
                        took.as_secs_f64()
                    ));
                    run.recoveries
                        .push((format!("SIGSTOP #{}: held jobs redone", k + 1), took));
                }
                None => {
                    let not_done: Vec<u64> = can_succeed
                        .iter()
                        .copied()
                        .filter(|id| !run.tracker.is_done(*id))
                        .collect();
                    run.fail(format!(
                        "replica {victim} frozen for {freeze:?}: jobs it held not done elsewhere meanwhile: {not_done:?}"
                    ));
                }
            }
            replicas.signal(victim, "CONT");
            let woke_at = Instant::now();
            run.say(&format!("SIGCONT replica {victim}"));
            run.replica_recovered(
                &replicas,
                victim,
                &format!("SIGCONT: replica {victim} works again"),
                woke_at,
            )
            .await;
        }
        let published = publishing.await.expect("publisher");
        // What it finishes late is at most what it held (a duplicate each).
        let bound = stops.len() * most_held_by_one_worker(&spec, MIXED_WORK_MS);
        let frozen_done: HashSet<u64> = frozen.iter().flat_map(|i| replicas.done_ids(*i)).collect();
        let tracker = run.tracker.clone();
        run.notes.push(format!(
            "{held_in_all} jobs started in a frozen replica's last 100 ms and not done by it"
        ));
        finish_mixed(run, &js, published, &mut replicas, &expected, bound).await;
        // Every duplicate is one a frozen replica finished late: a replica that never
        // froze repeats nothing.
        let not_frozen: Vec<u64> = tracker
            .done_counts()
            .into_iter()
            .filter(|(id, runs)| *runs > 1 && !frozen_done.contains(id))
            .map(|(id, _)| id)
            .collect();
        assert!(
            not_frozen.is_empty(),
            "jobs handled twice though no frozen replica handled them: {not_frozen:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 13. SIGSTOP the nats-server for longer than the ack wait and the pull heartbeat
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_server() {
    bounded("sigstop_server", async {
        let MixedOnOneServer {
            server,
            mut run,
            js,
            spec,
            mut replicas,
            jobs,
            expected,
            over,
        } = mixed_on_one_server("13_sigstop_server").await;
        // Longer than the ack wait (3 s) and the pull heartbeat grace (6 s): when it
        // wakes, every delivery it made is overdue, and the workers have given up on
        // their pulls and probed the connection meanwhile. Small: once. Full: twice.
        let freeze = size(Duration::from_secs(10), Duration::from_secs(15));
        let stops: &[f64] = if full() { &[0.2, 0.6] } else { &[0.25] };
        let pid = server.pid().expect("nats-server runs");
        let t0 = Instant::now();
        let publishing = spawn_publisher(js.clone(), jobs, over, give_up_after(over));
        for at in stops {
            until(t0 + over.mul_f64(*at)).await;
            run.say(&format!("SIGSTOP nats-server for {freeze:?}"));
            send_signal(pid, "STOP");
            run.faults += 1;
            tokio::time::sleep(freeze).await;
            send_signal(pid, "CONT");
            let woke_at = Instant::now();
            run.say("SIGCONT nats-server");
            run.recovered("SIGSTOP nats-server", woke_at).await;
            // Each worker recovers on its own, without a restart.
            for i in 0..2 {
                run.replica_recovered(
                    &replicas,
                    i,
                    &format!("SIGSTOP nats-server: replica {i} works again"),
                    woke_at,
                )
                .await;
            }
        }
        let published = publishing.await.expect("publisher");
        // When the server wakes, everything both workers held is overdue and may be
        // redelivered before their acks are read.
        let bound = stops.len() * 2 * most_held_by_one_worker(&spec, MIXED_WORK_MS);
        finish_mixed(run, &js, published, &mut replicas, &expected, bound).await;
    })
    .await;
}
