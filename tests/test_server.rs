//! Integration tests of the real-server test helper (`jetworker::testing::server`):
//! real `nats-server` processes, killed and restarted for real.
//!
//! Run against another server build with `NATS_SERVER_BIN=/path/to/nats-server`.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, stream};
use jetworker::testing::server::{
    probe, server_version, Address, NatsCluster, NatsServer, Probe, ServerOptions,
    TestServerErrorKind,
};

/// Retry `op` until it succeeds or `within` has passed (then return the last error).
async fn retry<T, E, F, Fut>(within: Duration, what: &str, mut op: F) -> Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                bail!("{what}: still failing after {within:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn file_stream(name: &str, subject: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// A client that fails fast instead of waiting for a server forever.
async fn connect(url: impl async_nats::ToServerAddrs) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(url)
        .await
        .context("connecting")
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still show "Z".
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn kill_9_then_restart_keeps_acknowledged_messages() -> Result<()> {
    let mut server = NatsServer::start()?;
    let url = server.url();
    let port = server.port();
    assert_eq!(url, format!("nats://127.0.0.1:{port}"));
    assert!(server.config_path().is_file());
    assert!(server.store_dir().is_dir());
    assert!(server.is_running());
    let pid = server.pid().context("a running server has a pid")?;

    let client = connect(&url).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(file_stream("ORDERS", "orders.>", 1))
        .await?;
    let ack = js.publish("orders.new", "first".into()).await?.await?;
    assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", 1));

    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(!process_alive(pid), "kill() must reap the process");
    // Nothing answers on the port while the server is down.
    let down = connect(&url).await;
    assert!(down.is_err(), "connected to a killed server");

    server.restart()?;
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart must keep the port");
    assert_eq!(server.url(), url);

    // A fresh client sees the message: same port, same store.
    let js2 = jetstream::new(connect(&url).await?);
    let stream = js2.get_stream("ORDERS").await?;
    let info = stream.get_info().await?;
    assert_eq!(info.state.messages, 1);
    let message = stream.get_raw_message(1).await?;
    assert_eq!(message.payload.as_ref(), b"first");

    // The client from before the crash reconnects to the same URL by itself.
    let ack = retry(
        Duration::from_secs(15),
        "publish on the old client",
        || async { js.publish("orders.new", "second".into()).await?.await },
    )
    .await?;
    assert_eq!(ack.sequence, 2);
    Ok(())
}

#[tokio::test]
async fn graceful_stop_then_restart() -> Result<()> {
    let mut server = NatsServer::start()?;
    let url = server.url();
    {
        let js = jetstream::new(connect(&url).await?);
        js.create_stream(file_stream("EVENTS", "events.>", 1))
            .await?;
        for i in 0..10 {
            js.publish("events.click", format!("e{i}").into())
                .await?
                .await?;
        }
    }

    let started = Instant::now();
    server.stop();
    assert!(!server.is_running());
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "SIGTERM should stop nats-server promptly, took {:?}",
        started.elapsed()
    );
    // Stopping twice, or killing a stopped server, is harmless.
    server.stop();
    server.kill();

    server.restart()?;
    let js = jetstream::new(connect(&url).await?);
    let ack = js.publish("events.click", "after".into()).await?.await?;
    assert_eq!(ack.sequence, 11);
    let info = js.get_stream("EVENTS").await?.get_info().await?;
    assert_eq!(info.state.messages, 11);

    // A restart of a running server is a kill + start.
    let pid = server.pid();
    server.restart()?;
    assert_ne!(server.pid(), pid);
    let js = jetstream::new(connect(&url).await?);
    let info = js.get_stream("EVENTS").await?.get_info().await?;
    assert_eq!(info.state.messages, 11);
    Ok(())
}

#[tokio::test]
async fn drop_kills_the_process_and_removes_the_directory() -> Result<()> {
    let server = NatsServer::start()?;
    let pid = server.pid().context("pid")?;
    let dir = server.dir().to_path_buf();
    assert!(process_alive(pid));
    let log = std::fs::read_to_string(server.log_path())?;
    assert!(log.contains("Server is ready"), "log: {log}");
    drop(server);
    assert!(!process_alive(pid), "the server outlived its NatsServer");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

#[tokio::test]
async fn extra_config_is_applied_and_jetstream_can_be_off() -> Result<()> {
    let server = NatsServer::start_with(ServerOptions {
        extra_config: Some("authorization {\n  user: alice\n  password: s3cret\n}".to_owned()),
        jetstream: false,
        ..Default::default()
    })?;
    let config = std::fs::read_to_string(server.config_path())?;
    assert!(config.contains("user: alice"), "{config}");
    assert!(!config.contains("jetstream"), "{config}");

    assert!(
        connect(server.url()).await.is_err(),
        "a client without credentials was let in"
    );
    let client =
        async_nats::ConnectOptions::with_user_and_password("alice".to_owned(), "s3cret".to_owned())
            .connection_timeout(Duration::from_secs(2))
            .connect(server.url())
            .await?;
    client.flush().await?;
    let js = jetstream::new(client);
    assert!(
        js.query_account().await.is_err(),
        "JetStream answered although jetstream: false"
    );
    Ok(())
}

#[tokio::test]
async fn a_broken_config_fails_fast_quoting_the_server() -> Result<()> {
    let started = Instant::now();
    let result = NatsServer::start_with(ServerOptions {
        extra_config: Some("this_is_not { valid".to_owned()),
        ..Default::default()
    });
    let error = match result {
        Ok(_) => bail!("a server with a broken config started"),
        Err(error) => error,
    };
    assert!(error.kind() == TestServerErrorKind::Start, "{error:?}");
    let text = error.to_string();
    assert!(text.contains("exited during startup"), "{text}");
    assert!(text.contains("extra_config starts at line"), "{text}");
    assert!(
        text.contains("stdout/stderr"),
        "the server's output is quoted: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn server_version_matches_what_the_server_announces() -> Result<()> {
    let version = server_version()?;
    assert!(
        version
            .split('.')
            .take(3)
            .all(|p| p.chars().take_while(|c| c.is_ascii_digit()).count() > 0),
        "odd version {version:?}"
    );
    let server = NatsServer::start()?;
    let client = connect(server.url()).await?;
    assert_eq!(client.server_info().version, version);
    Ok(())
}

#[tokio::test]
async fn cluster_r3_stream_survives_losing_its_leader() -> Result<()> {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3)?;
    assert_eq!(cluster.len(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    let formed = started.elapsed();

    // The meta leader exists before start() returns, so an R3 stream can be created now.
    let js = jetstream::new(connect(urls.clone()).await?);
    let stream = retry(Duration::from_secs(10), "create the R3 stream", || {
        js.create_stream(file_stream("CLICKS", "clicks.>", 3))
    })
    .await?;
    assert_eq!(stream.cached_info().config.num_replicas, 3);
    for i in 0..5 {
        js.publish("clicks.page", format!("c{i}").into())
            .await?
            .await?;
    }
    let info = js.get_stream("CLICKS").await?.get_info().await?;
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .context("an R3 stream has a leader")?;
    let victim = (0..cluster.len())
        .find(|&i| cluster.server(i).name() == leader)
        .ok_or_else(|| anyhow!("stream leader {leader} is not a member"))?;

    // kill -9 the stream leader; publish through a survivor until a new leader takes over.
    cluster.server(victim).kill();
    let survivor = (victim + 1) % cluster.len();
    let js = jetstream::new(connect(cluster.server(survivor).url()).await?);
    let killed = Instant::now();
    let ack = retry(
        Duration::from_secs(30),
        "publish after killing the leader",
        || async { js.publish("clicks.page", "after-kill".into()).await?.await },
    )
    .await?;
    let reelected = killed.elapsed();
    assert_eq!(ack.sequence, 6);
    let info = js.get_stream("CLICKS").await?.get_info().await?;
    let new_leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    assert!(new_leader.is_some() && new_leader.as_deref() != Some(leader.as_str()));

    // The killed node rejoins on its old ports and catches up.
    let port = cluster.server(victim).port();
    cluster.server(victim).restart()?;
    assert_eq!(cluster.server(victim).port(), port);
    let rejoined = retry(Duration::from_secs(20), "all replicas current", || async {
        let info = js.get_stream("CLICKS").await?.get_info().await?;
        let cluster_info = info.cluster.ok_or_else(|| anyhow!("no cluster info"))?;
        let current = cluster_info
            .replicas
            .iter()
            .filter(|r| r.current && !r.offline)
            .count();
        if cluster_info.leader.is_some() && current == 2 {
            Ok(info.state.messages)
        } else {
            Err(anyhow!("replicas: {:?}", cluster_info.replicas))
        }
    })
    .await?;
    assert_eq!(rejoined, 6);

    // The restarted node serves clients again.
    let js_victim = jetstream::new(connect(cluster.server(victim).url()).await?);
    let ack = retry(
        Duration::from_secs(10),
        "publish via the restarted node",
        || async { js_victim.publish("clicks.page", "back".into()).await?.await },
    )
    .await?;
    assert_eq!(ack.sequence, 7);
    eprintln!(
        "nats-server {}: cluster formed in {formed:?}, new stream leader after {reelected:?}, total {:?}",
        server_version()?,
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn not_ready_in_time_is_a_clear_error() -> Result<()> {
    // Clustered JetStream with its only peer unreachable (nothing listens on loopback
    // port 1): no meta leader can be elected, so /healthz never answers 200.
    let started = Instant::now();
    let result = NatsServer::start_with(ServerOptions {
        extra_config: Some(
            "cluster {\n  name: lonely\n  listen: \"127.0.0.1:-1\"\n  \
             routes: [\"nats-route://127.0.0.1:1\"]\n}"
                .to_owned(),
        ),
        ready_timeout: Duration::from_secs(1),
        ..Default::default()
    });
    let error = match result {
        Ok(server) => bail!("{} was ready without a meta leader", server.url()),
        Err(error) => error,
    };
    let text = error.to_string();
    assert!(text.contains("was not ready after 1s"), "{text}");
    assert!(
        text.contains("/healthz answered 503"),
        "the last answer is quoted: {text}"
    );
    assert!(
        text.contains("--- log"),
        "the server's log is quoted: {text}"
    );
    assert!(
        !text.contains("Healthcheck failed"),
        "polling noise is left out: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// What the demo asks for: a fixed loopback address, a directory kept across runs, a
/// name of its own; and `probe` sees what answers there.
#[tokio::test]
async fn a_fixed_address_and_a_kept_directory() -> Result<()> {
    let home = tempfile::tempdir()?;
    let data = home.path().join("nats");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = Address::loopback(port);
    assert_eq!(probe(&address, Duration::from_secs(1)), Probe::Nothing);
    let options = ServerOptions {
        address: Some(address.clone()),
        dir: Some(data.clone()),
        name: Some("jw-kept".to_owned()),
        ..Default::default()
    };
    let mut server = NatsServer::start_with(options.clone())?;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    assert_eq!(server.name(), "jw-kept");
    assert_eq!(server.version(), server_version()?);
    assert_eq!(server.dir(), data);
    assert_eq!(
        probe(&address, Duration::from_secs(1)),
        Probe::Nats {
            version: server_version()?,
            jetstream: true
        }
    );
    assert!(data.join("nats-server.pid").is_file());
    {
        let js = jetstream::new(connect(server.url()).await?);
        js.create_stream(file_stream("KEPT", "kept.>", 1)).await?;
        js.publish("kept.one", "stored".into()).await?.await?;
    }
    let pid = server.pid().context("pid")?;
    assert!(server.stop().is_some(), "a running server stops");
    assert!(!process_alive(pid));
    assert_eq!(server.stop(), None, "stopping twice is harmless");
    assert!(!data.join("nats-server.pid").exists(), "no stale pid file");
    drop(server);
    assert!(data.join("jetstream").is_dir(), "the store stays");

    // Another server on the same directory has what the first one stored.
    let server = NatsServer::start_with(options)?;
    let js = jetstream::new(connect(server.url()).await?);
    let info = js.get_stream("KEPT").await?.get_info().await?;
    assert_eq!(info.state.messages, 1);
    Ok(())
}

#[test]
fn only_loopback_addresses_are_served() {
    let result = NatsServer::start_with(ServerOptions {
        address: Address::parse("nats://10.0.0.7:4222"),
        ..Default::default()
    });
    assert!(
        result.as_ref().err().map(|e| e.kind()) == Some(TestServerErrorKind::Start),
        "{result:?}"
    );
}
