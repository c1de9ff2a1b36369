//! Least privilege against a real nats-server: the `permissions` command's block is
//! pasted into a server user, and a worker under that user provisions, consumes, keeps
//! state in a key-value bucket, dead-letters and runs its safety net with no permission
//! violation. Under a narrower user (no dead-letter publish; no provisioning) it fails
//! with a clear error naming the denied subject, and loses nothing.

mod common;
mod security_kit;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::{consumer_info, count, header, messages, set_max_msg_size, wait_until, ConfigText};
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::{App, Context, Event, HandlerError};
use jetworker_suite::{Job, Mode};
use security_kit::*;
use tokio_util::sync::CancellationToken;

const ADMIN_PASSWORD: &str = "admin-pw-4e1d";
const WORKER_PASSWORD: &str = "worker-pw-9c2b";

/// The worker's config: a filtered consumer, a dead-letter stream, a KV bucket, its own
/// inbox prefix.
fn worker_config(url: &str, user: &str, password: &str) -> String {
    ConfigText::new(url)
        .connection(&format!(
            r#"user = "{user}"
password = "{password}"
name = "least-privilege"
inbox_prefix = "_INBOX_lp"
request_timeout = "2s"
connect_timeout = "3s""#
        ))
        .worker(r#"shutdown_grace = "5s""#)
        .with_jobs()
        .kv_bucket("tally", "")
        .in_consumer(
            "jobs",
            r#"filter_subject = "jobs.>"
max_deliver = 4
backoff = ["1s"]
ack_wait = "5s""#,
        )
        .text()
}

/// `test_worker permissions --json` for `config_text`: the server block and subjects.
fn permissions_of(dir: &std::path::Path, config_text: &str) -> serde_json::Value {
    let path = dir.join("permissions.toml");
    std::fs::write(&path, config_text).expect("write config");
    let path = path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = run_to_end(&["--config", &path, "permissions", "--json"], &[]);
    assert_eq!(code, Some(0), "permissions --json failed: {stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    // The text form says the same, with reasons.
    let (code, text, _) = run_to_end(&["--config", &path, "permissions"], &[]);
    assert_eq!(code, Some(0));
    for p in json["publish"].as_array().expect("publish list") {
        assert!(
            text.contains(p["subject"].as_str().unwrap_or("?")),
            "{text}"
        );
    }
    assert!(
        text.contains(json["server_block"].as_str().unwrap_or("?")),
        "{text}"
    );
    json
}

/// A server with an admin (everything) and the given worker users.
fn server_with_users(users: &[(&str, String)]) -> NatsServer {
    let mut entries = vec![format!(
        "    {{ user: \"admin\", password: \"{ADMIN_PASSWORD}\" }}"
    )];
    for (user, block) in users {
        entries.push(format!(
            "    {{\n      user: \"{user}\", password: \"{WORKER_PASSWORD}\"\n      {}\n    }}",
            block.replace('\n', "\n      ")
        ));
    }
    server_with(format!(
        "authorization {{\n  users: [\n{}\n  ]\n}}",
        entries.join("\n")
    ))
}

async fn admin(server: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), ADMIN_PASSWORD.into())
            .connect(server.url())
            .await
            .expect("admin connects");
    let js = jetstream::new(client.clone());
    (client, js)
}

async fn publish_job(js: &jetstream::Context, job: &Job) {
    js.publish(
        format!("jobs.{}", job.id),
        rmp_serde::to_vec_named(job).expect("encode").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// Violations the server logged (it logs every denied publish and subscribe).
fn violations(server: &NatsServer) -> Vec<String> {
    std::fs::read_to_string(server.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect()
}

/// Stops the worker started with `stop`: it ends without error, and the server denied
/// it nothing meanwhile.
async fn stops_without_a_violation(
    server: &NatsServer,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<Result<impl Sized, jetworker::RunError>>,
) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran without error");
    let denied = violations(server);
    assert!(
        denied.is_empty(),
        "the server denied something: {denied:#?}"
    );
}

#[derive(Default)]
struct Tally {
    handled: AtomicU64,
}

/// Counts each job in the KV bucket (write, then read back), or fails permanently.
async fn counting(job: Event<Job>, ctx: Context<Arc<Tally>>) -> Result<(), HandlerError> {
    if job.mode == Mode::Permanent {
        return Err(HandlerError::permanent(format!(
            "job {} is invalid",
            job.id
        )));
    }
    let js = ctx.jetstream().ok_or("no JetStream context")?;
    let kv = js
        .get_key_value("tally")
        .await
        .map_err(HandlerError::transient)?;
    let key = format!("job_{}", job.id);
    kv.put(&key, job.id.to_string().into())
        .await
        .map_err(HandlerError::transient)?;
    let back = kv.get(&key).await.map_err(HandlerError::transient)?;
    if back.as_deref() != Some(job.id.to_string().as_bytes()) {
        return Err(HandlerError::transient("read back something else"));
    }
    // Watching keys (an ordered consumer on the bucket's stream) works too.
    let mut keys = kv.keys().await.map_err(HandlerError::transient)?;
    futures::StreamExt::next(&mut keys)
        .await
        .ok_or("no keys")?
        .map_err(HandlerError::transient)?;
    ctx.state().handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn a_worker_under_exactly_the_printed_permissions_does_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = PermittedWorker::start(
        dir.path(),
        |url| worker_config(url, "worker", WORKER_PASSWORD),
        counting,
        &[
            "dlq.jobs",
            "$KV.tally.>",
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EVENTS.jobs",
        ],
        &["EVENTS", "KV_tally", "JETWORKER_ADVISORIES"],
    )
    .await;
    assert_eq!(run.printed["subscribe"][0]["subject"], "_INBOX_lp.>");
    let (js, tally) = (run.js.clone(), run.tally.clone());
    for id in 1..=5 {
        publish_job(&js, &Job::ok(id)).await;
    }
    publish_job(
        &js,
        &Job {
            id: 6,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        },
    )
    .await;
    js.publish("jobs.garbage", b"\xc1 not msgpack".as_ref().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    wait_until(
        Duration::from_secs(30),
        "five counted, two dead letters",
        || async { tally.handled.load(Ordering::SeqCst) == 5 && count(&js, "DLQ").await == 2 },
    )
    .await;

    // The safety net: a max-deliveries advisory for message 1 (as the server publishes
    // it when a last delivery never settles) makes the worker fetch the original by
    // sequence and dead-letter it.
    let advisory = serde_json::json!({
        "type": "io.nats.jetstream.advisory.v1.max_deliver",
        "id": "test", "timestamp": "2024-01-01T00:00:00Z",
        "stream": "EVENTS", "consumer": "jobs", "stream_seq": 1, "deliveries": 4,
    });
    js.publish(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EVENTS.jobs",
        advisory.to_string().into(),
    )
    .await
    .expect("publish advisory")
    .await
    .expect("captured by the advisory stream");
    wait_until(
        Duration::from_secs(20),
        "the safety net's dead letter",
        || async { count(&js, "DLQ").await == 3 },
    )
    .await;
    let reasons: Vec<String> = messages(&js, "DLQ")
        .await
        .iter()
        .filter_map(|m| header(m, dead_letter::REASON))
        .collect();
    assert_eq!(reasons, ["permanent", "decode", "abandoned"]);

    // A hand-over: the dead-letter stream refuses copies (an admin's edit), so the last
    // delivery is held for one ack wait, then recorded in the advisory stream and
    // handed to the safety net, which files it once the stream takes copies again.
    set_max_msg_size(&js, "DLQ", 64).await;
    publish_job(
        &js,
        &Job {
            id: 7,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "the hand-off record", || async {
        messages(&js, "JETWORKER_ADVISORIES").await.iter().any(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v["type"] == jetworker::SAFETY_NET_HAND_OFF_TYPE)
        })
    })
    .await;
    set_max_msg_size(&js, "DLQ", -1).await;
    wait_until(
        Duration::from_secs(30),
        "the handed-over letter",
        || async { count(&js, "DLQ").await == 4 },
    )
    .await;
    let last = messages(&js, "DLQ").await.pop().expect("letter");
    assert_eq!(
        header(&last, dead_letter::ORIGINAL_SUBJECT).as_deref(),
        Some("jobs.7")
    );
    assert_eq!(
        header(&last, dead_letter::REASON).as_deref(),
        Some("permanent")
    );

    wait_until(Duration::from_secs(10), "everything settled", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;

    run.stop().await;
}

#[tokio::test]
async fn narrower_users_fail_clearly_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = permissions_of(
        dir.path(),
        &worker_config("nats://127.0.0.1:4222", "worker", WORKER_PASSWORD),
    );
    let full_block = full["server_block"].as_str().expect("block").to_string();
    // Without the dead-letter publish.
    let no_dead_letters = full_block.replace("      \"dlq.jobs\"\n", "");
    assert_ne!(no_dead_letters, full_block);
    // Without stream and consumer creation (as `--without-provisioning` prints it).
    let path = dir.path().join("readonly.toml");
    std::fs::write(
        &path,
        worker_config("nats://127.0.0.1:4222", "worker", WORKER_PASSWORD),
    )
    .expect("write");
    let (code, stdout, _) = run_to_end(
        &[
            "--config",
            &path.to_string_lossy(),
            "permissions",
            "--json",
            "--without-provisioning",
        ],
        &[],
    );
    assert_eq!(code, Some(0));
    let readonly: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let readonly_block = readonly["server_block"]
        .as_str()
        .expect("block")
        .to_string();
    assert!(!readonly_block.contains("STREAM.CREATE.EVENTS"));

    let server = server_with_users(&[
        ("worker", full_block),
        ("no_dlq", no_dead_letters),
        ("readonly", readonly_block),
    ]);
    let (_admin, js) = admin(&server).await;

    // 1. No provisioning rights on an empty server: the worker says which subject the
    //    server denied, and keeps retrying (it does not exit or spin).
    let readonly_config = dir.path().join("readonly-run.toml");
    std::fs::write(
        &readonly_config,
        worker_config(&server.url(), "readonly", WORKER_PASSWORD),
    )
    .expect("write");
    let readonly_worker = WorkerProcess::spawn(
        &["--config", &readonly_config.to_string_lossy(), "run"],
        &[],
    );
    readonly_worker
        .wait_for(
            Duration::from_secs(30),
            "the denied stream creation",
            |err| {
                err.contains(
                    "Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.EVENTS\"",
                ) && err.contains("the `permissions` subcommand")
                    && err.contains("provisioning failed; retrying")
            },
        )
        .await;
    let (code, stderr) = readonly_worker.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "stops cleanly on SIGTERM: {stderr}");
    assert!(!stderr.contains(WORKER_PASSWORD), "{stderr}");

    // 2. No dead-letter publish: a permanent failure cannot be copied, so the original
    //    is kept (nak'ed for a retry), with the violation and the failed copy logged.
    let no_dlq_config = dir.path().join("no-dlq.toml");
    std::fs::write(
        &no_dlq_config,
        worker_config(&server.url(), "no_dlq", WORKER_PASSWORD),
    )
    .expect("write");
    let narrow = WorkerProcess::spawn(&["--config", &no_dlq_config.to_string_lossy(), "run"], &[]);
    wait_until(Duration::from_secs(20), "provisioned", || async {
        js.get_stream("EVENTS").await.is_ok() && js.get_stream("DLQ").await.is_ok()
    })
    .await;
    publish_job(&js, &Job::ok(1)).await;
    publish_job(
        &js,
        &Job {
            id: 2,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        },
    )
    .await;
    narrow
        .wait_for(
            Duration::from_secs(30),
            "the denied dead-letter publish",
            |err| {
                err.contains("Permissions Violation for Publish to \"dlq.jobs\"")
                    && err.contains("dead-letter copy not stored; the original is kept and retried")
            },
        )
        .await;
    let (code, stderr) = narrow.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let denied = violations(&server);
    assert!(
        denied.iter().any(|l| l.contains("dlq.jobs")),
        "the server logged the denial too: {denied:#?}"
    );
    assert_eq!(count(&js, "DLQ").await, 0, "nothing was dead-lettered");
    assert_eq!(count(&js, "EVENTS").await, 2, "the original is still there");
    let info = consumer_info(&js, "EVENTS", "jobs").await;
    assert_eq!(info.ack_floor.stream_sequence, 1, "job 1 acked, job 2 not");

    // 3. The same message under the full permissions: dead-lettered, nothing lost.
    let full_config = dir.path().join("full.toml");
    std::fs::write(
        &full_config,
        worker_config(&server.url(), "worker", WORKER_PASSWORD),
    )
    .expect("write");
    let worker = WorkerProcess::spawn(&["--config", &full_config.to_string_lossy(), "run"], &[]);
    wait_until(
        Duration::from_secs(30),
        "the kept message dead-lettered",
        || async { count(&js, "DLQ").await == 1 },
    )
    .await;
    let letter = &messages(&js, "DLQ").await[0];
    assert_eq!(
        header(letter, dead_letter::ORIGINAL_SUBJECT).as_deref(),
        Some("jobs.2")
    );
    let (code, stderr) = worker.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("Violation"),
        "the full user is denied nothing: {stderr}"
    );
}

/// Counts each job, or fails permanently.
async fn counted(job: Event<Job>, ctx: Context<Arc<Tally>>) -> Result<(), HandlerError> {
    if job.mode == Mode::Permanent {
        return Err(HandlerError::permanent(format!(
            "job {} is invalid",
            job.id
        )));
    }
    ctx.state().handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The config of a worker under user `worker` (inbox prefix `inbox`) whose consumer
/// `jobs` is ordered and pulled under leases, as `consumer_lines` say.
fn leased_worker_config(url: &str, inbox: &str, consumer_lines: &str) -> String {
    ConfigText::new(url)
        .connection(&format!(
            r#"user = "worker"
password = "{WORKER_PASSWORD}"
name = "least-privilege-leases"
inbox_prefix = "{inbox}"
request_timeout = "2s"
connect_timeout = "3s""#
        ))
        .worker(r#"shutdown_grace = "5s""#)
        .with_jobs()
        .in_consumer("jobs", consumer_lines)
        .text()
}

/// A worker in this process under exactly the permissions `permissions` prints for its
/// config, once it has provisioned what it should.
struct PermittedWorker {
    server: NatsServer,
    /// What `permissions --json` printed.
    printed: serde_json::Value,
    /// The admin's JetStream context, to publish and look.
    js: jetstream::Context,
    _admin: async_nats::Client,
    tally: Arc<Tally>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<
        Result<
            std::collections::BTreeMap<String, Arc<jetworker::ConsumerStats>>,
            jetworker::RunError,
        >,
    >,
}

impl PermittedWorker {
    /// Prints the permissions for the config `config_text` makes for a server URL (into
    /// `dir`), checks that they grant the publish subjects `grants`, and runs the config
    /// under them with `handler` as `scripted`, until the streams `provisioned` exist.
    async fn start<H: jetworker::Handler<Job, Arc<Tally>>>(
        dir: &std::path::Path,
        config_text: impl Fn(&str) -> String,
        handler: H,
        grants: &[&str],
        provisioned: &[&str],
    ) -> PermittedWorker {
        let printed = permissions_of(dir, &config_text("nats://127.0.0.1:4222"));
        let block = printed["server_block"]
            .as_str()
            .expect("server block")
            .to_string();
        for subject in grants {
            assert!(
                block.contains(&format!("\"{subject}\"")),
                "{subject}: {block}"
            );
        }
        let server = server_with_users(&[("worker", block)]);
        let (admin_client, js) = admin(&server).await;
        let config = parse(&config_text(&server.url()));
        let tally = Arc::new(Tally::default());
        let stop = CancellationToken::new();
        let app = App::new(tally.clone()).handler("scripted", handler);
        let worker = tokio::spawn(app.run_until(config, stop.clone()));
        wait_until(
            Duration::from_secs(20),
            "provisioned by the worker",
            || async {
                for stream in provisioned {
                    if js.get_stream(*stream).await.is_err() {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        PermittedWorker {
            server,
            printed,
            js,
            _admin: admin_client,
            tally,
            stop,
            worker,
        }
    }

    /// [`PermittedWorker::start`] of [`leased_worker_config`] with `inbox` and
    /// `consumer_lines`, handler [`counted`]: the permissions grant the lease bucket and
    /// pulling the consumer `pulled`.
    async fn start_leased(
        dir: &std::path::Path,
        inbox: &str,
        consumer_lines: &str,
        pulled: &str,
    ) -> PermittedWorker {
        PermittedWorker::start(
            dir,
            |url| leased_worker_config(url, inbox, consumer_lines),
            counted,
            &[
                "$KV.jw_leases_EVENTS_jobs.>",
                &format!("$JS.API.CONSUMER.MSG.NEXT.EVENTS.{pulled}"),
            ],
            &["EVENTS", "KV_jw_leases_EVENTS_jobs"],
        )
        .await
    }

    /// Waits until the worker counted `handled` jobs and the dead-letter stream holds
    /// `dead_letters`.
    async fn wait_handled(&self, handled: u64, dead_letters: u64) {
        wait_until(
            Duration::from_secs(30),
            &format!("{handled} counted, {dead_letters} dead letters"),
            || async {
                self.tally.handled.load(Ordering::SeqCst) == handled
                    && count(&self.js, "DLQ").await == dead_letters
            },
        )
        .await;
    }

    /// Stops the worker: it ends without error, and the server denied it nothing.
    async fn stop(self) -> (NatsServer, jetstream::Context) {
        stops_without_a_violation(&self.server, self.stop, self.worker).await;
        (self.server, self.js)
    }
}

/// Jobs `1..=ok` that succeed, then one (`ok + 1`) that fails permanently.
fn ok_then_one_permanent(ok: u64) -> Vec<Job> {
    let mut jobs: Vec<Job> = (1..=ok).map(Job::ok).collect();
    jobs.push(Job {
        id: ok + 1,
        mode: Mode::Permanent,
        until: 0,
        sleep_ms: 0,
    });
    jobs
}

/// A worker with a partitioned ordered consumer (`jobs` in 2 partitions of
/// `jobs.<partition>.<key>`, 1 s leases) under exactly the printed permissions takes
/// its partitions, renews and gives back their leases, counts the replicas, consumes
/// and dead-letters, with no permission violation.
#[tokio::test]
async fn a_partitioned_worker_under_exactly_the_printed_permissions_does_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = PermittedWorker::start_leased(
        dir.path(),
        "_INBOX_lpp",
        r#"filter_subject = "jobs.*.>"
ordered_by = { subject_token = 2 }
partitions = { count = 2, subject_token = 1, lease = "1s" }"#,
        "jobs-1",
    )
    .await;
    let js = run.js.clone();
    common::publish_partitioned_jobs(&js, &ok_then_one_permanent(6), 2).await;
    run.wait_handled(6, 1).await;
    // Both partitions are held (their leases renewed meanwhile) and every message settled.
    let leases = js
        .get_key_value("jw_leases_EVENTS_jobs")
        .await
        .expect("lease bucket");
    for index in 0..2 {
        let key = jetworker::partition_lease_key(index);
        wait_until(Duration::from_secs(10), "the lease is held", || async {
            leases.get(&key).await.ok().flatten().is_some()
        })
        .await;
        let name = format!("jobs-{index}");
        wait_until(Duration::from_secs(10), "everything settled", || async {
            let info = consumer_info(&js, "EVENTS", &name).await;
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    run.stop().await;
}

/// An ordered consumer without partitions (`jobs`, ordered by the id token of
/// `jobs.<id>`) in two replicas under exactly the printed permissions: the first takes
/// its lease, renews it, consumes and dead-letters; the second (a process) stands by,
/// reading who holds the lease, and takes the consumer over when the first stops, then
/// consumes; the server denies neither anything.
#[tokio::test]
async fn an_ordered_worker_without_partitions_under_exactly_the_printed_permissions_does_everything(
) {
    let (inbox, consumer_lines) = (
        "_INBOX_lpo",
        r#"filter_subject = "jobs.>"
ordered_by = { subject_token = 1 }"#,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let run = PermittedWorker::start_leased(dir.path(), inbox, consumer_lines, "jobs").await;
    let js = run.js.clone();
    let leases = js
        .get_key_value("jw_leases_EVENTS_jobs")
        .await
        .expect("lease bucket");
    let key = jetworker::partition_lease_key(0);
    let ours = format!("{}-", std::process::id());
    wait_until(
        Duration::from_secs(20),
        "this process holds the lease",
        || async {
            leases
                .get(&key)
                .await
                .ok()
                .flatten()
                .is_some_and(|v| String::from_utf8_lossy(&v).starts_with(&ours))
        },
    )
    .await;
    let taken_at = leases
        .entry(&key)
        .await
        .expect("lease entry")
        .expect("held")
        .revision;

    // A second replica stands by: it reads who holds the lease and logs it.
    let path = dir.path().join("replica.toml");
    let replica_config = leased_worker_config(&run.server.url(), inbox, consumer_lines);
    std::fs::write(&path, replica_config).expect("write config");
    let path = path.to_string_lossy().into_owned();
    let standby = WorkerProcess::spawn(&["--config", &path, "run"], &[("RUST_LOG", "info")]);
    standby
        .wait_for(Duration::from_secs(30), "the stand-by", |err| {
            err.contains("standing by: another replica pulls this ordered consumer")
        })
        .await;

    common::publish_jobs(&js, &ok_then_one_permanent(4)).await;
    run.wait_handled(4, 1).await;
    wait_until(
        Duration::from_secs(10),
        "the lease renewed (every third of its 10 s)",
        || async {
            leases
                .entry(&key)
                .await
                .ok()
                .flatten()
                .is_some_and(|e| e.revision > taken_at)
        },
    )
    .await;
    let (server, js) = run.stop().await;

    // The stand-by takes the lease given back and consumes.
    standby
        .wait_for(Duration::from_secs(30), "the takeover", |err| {
            err.contains("lease taken: this replica pulls the ordered consumer")
        })
        .await;
    common::publish_jobs(&js, &[Job::ok(6), Job::ok(7)]).await;
    wait_until(
        Duration::from_secs(30),
        "the second replica settled them",
        || async {
            let info = consumer_info(&js, "EVENTS", "jobs").await;
            info.num_ack_pending == 0
                && info.num_pending == 0
                && info.ack_floor.stream_sequence == 7
        },
    )
    .await;
    let (code, stderr) = standby.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("Violation"), "{stderr}");
    let denied = violations(&server);
    assert!(
        denied.is_empty(),
        "the server denied something: {denied:#?}"
    );
}
