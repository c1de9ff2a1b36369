//! Every NATS auth mode against a real nats-server configured for it: user and password
//! (in the config and in the URL), token (both ways), nkey seed file, creds file
//! (operator / account / user JWT chain, memory resolver), TLS and mutual TLS. Each one
//! connects and uses JetStream; each wrong credential is a prompt error that names the
//! auth mode and shows no secret.

mod common;
mod security_kit;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetworker::ServerUrl;
use jetworker::{AuthMode, ConnectError, ConnectErrorKind, Transport};
use jetworker::{ConnectionConfig, TlsConfig};
use secrecy::SecretString;
use security_kit::*;

/// Connecting works and JetStream answers (a stream is created and read back).
async fn assert_works(c: &ConnectionConfig) {
    let client = jetworker::connect(c)
        .await
        .unwrap_or_else(|e| panic!("connects: {e}"));
    let js = jetstream::new(client.clone());
    let name = format!("AUTH_{}", std::process::id());
    js.get_or_create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("auth.{name}")],
        ..Default::default()
    })
    .await
    .expect("JetStream works on this connection");
    js.publish(format!("auth.{name}"), "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    client.drain().await.expect("drain");
}

/// Connecting fails promptly with `kind`; the message names the auth mode and the
/// transport, and none of `secrets`.
async fn assert_fails(
    c: &ConnectionConfig,
    kind: ConnectErrorKind,
    auth: AuthMode,
    secrets: &[&str],
) -> ConnectError {
    let started = Instant::now();
    let err = jetworker::connect(c)
        .await
        .expect_err("the connection must be refused");
    let took = started.elapsed();
    assert!(
        took < c.connect_timeout + Duration::from_secs(3),
        "an error, not a hang: took {took:?}"
    );
    assert_eq!(err.kind(), kind, "{err}");
    assert_eq!(err.auth(), Some(auth), "{err}");
    let shown = format!("{err} / {err:?}");
    assert!(
        shown.contains(&auth.to_string()),
        "names the auth mode: {shown}"
    );
    assert!(
        shown.contains(&Transport::of(c).to_string()),
        "names the transport: {shown}"
    );
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret:?} shown in: {shown}");
    }
    err
}

fn with_user(url: &str, user: &str, password: &str) -> ConnectionConfig {
    ConnectionConfig {
        user: Some(user.to_string()),
        password: Some(SecretString::from(password.to_string())),
        ..connection(url)
    }
}

#[tokio::test]
async fn user_and_password() {
    let server = server_with(
        "authorization {\n  users: [ { user: \"worker\", password: \"pw-Correct-7f3a\" } ]\n}"
            .into(),
    );
    let url = server.url();
    assert_works(&with_user(&url, "worker", "pw-Correct-7f3a")).await;
    let err = assert_fails(
        &with_user(&url, "worker", "pw-Wrong-91bc"),
        ConnectErrorKind::Refused,
        AuthMode::UserPassword,
        &["pw-Wrong-91bc", "pw-Correct-7f3a"],
    )
    .await;
    assert!(err.kind().is_permanent());
    assert!(err.to_string().contains("refused the credentials"), "{err}");

    // No credentials at all: said so.
    let err = assert_fails(
        &connection(&url),
        ConnectErrorKind::Refused,
        AuthMode::None,
        &[],
    )
    .await;
    assert!(err.to_string().contains("none are configured"), "{err}");

    // In the URL, percent-escaped, as the NATS tools accept it.
    let port = server.port();
    let in_url = connection(&format!("nats://worker:pw-Correct-7f3a@127.0.0.1:{port}"));
    assert_eq!(AuthMode::of(&in_url), AuthMode::UserPassword);
    assert_works(&in_url).await;
    let wrong_in_url = connection(&format!("nats://worker:pw-Wr%40ng@127.0.0.1:{port}"));
    let err = assert_fails(
        &wrong_in_url,
        ConnectErrorKind::Refused,
        AuthMode::UserPassword,
        &["pw-Wr%40ng", "pw-Wr@ng"],
    )
    .await;
    assert!(
        err.servers().is_some_and(|s| s.contains("***@127.0.0.1")),
        "{err}"
    );
}

#[tokio::test]
async fn token() {
    let server = server_with("authorization {\n  token: \"tok-Correct-55e1\"\n}".into());
    let url = server.url();
    let with_token = |token: &str| ConnectionConfig {
        token: Some(SecretString::from(token.to_string())),
        ..connection(&url)
    };
    assert_works(&with_token("tok-Correct-55e1")).await;
    assert_fails(
        &with_token("tok-Wrong-0d2c"),
        ConnectErrorKind::Refused,
        AuthMode::Token,
        &["tok-Wrong-0d2c", "tok-Correct-55e1"],
    )
    .await;
    let in_url = connection(&format!(
        "nats://tok-Correct-55e1@127.0.0.1:{}",
        server.port()
    ));
    assert_eq!(AuthMode::of(&in_url), AuthMode::Token);
    assert_works(&in_url).await;
}

#[tokio::test]
async fn nkey_seed_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = nkeys::KeyPair::new_user();
    let server = server_with(format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}",
        user.public_key()
    ));
    let seed = user.seed().expect("seed");
    let seed_file = dir.path().join("worker.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
    let with_seed = |path: PathBuf| ConnectionConfig {
        nkey_seed_file: Some(path),
        ..connection(&server.url())
    };
    assert_works(&with_seed(seed_file.clone())).await;

    // A valid seed the server does not know.
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let stranger_file = dir.path().join("stranger.nk");
    std::fs::write(&stranger_file, &stranger).expect("write seed");
    assert_fails(
        &with_seed(stranger_file),
        ConnectErrorKind::Refused,
        AuthMode::Nkey,
        &[&seed, &stranger],
    )
    .await;

    // Not a seed, and no file: credential errors before any network traffic.
    let garbage = dir.path().join("garbage.nk");
    std::fs::write(&garbage, "SUAGARBAGE-not-a-seed").expect("write");
    assert_fails(
        &with_seed(garbage),
        ConnectErrorKind::Credentials,
        AuthMode::Nkey,
        &["SUAGARBAGE-not-a-seed"],
    )
    .await;
    assert_fails(
        &with_seed(dir.path().join("missing.nk")),
        ConnectErrorKind::Credentials,
        AuthMode::Nkey,
        &[],
    )
    .await;
}

#[tokio::test]
async fn creds_file_with_an_operator_account_user_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = Decentralized::create(dir.path());
    let server = server_with(chain.server_block());
    let (creds, text) = chain.creds(dir.path(), "worker", &chain.account);
    let seed = text
        .lines()
        .find(|l| l.starts_with("SU"))
        .expect("seed line")
        .to_string();
    let with_creds = |path: PathBuf| ConnectionConfig {
        creds_file: Some(path),
        ..connection(&server.url())
    };
    assert_works(&with_creds(creds)).await;

    // A user signed by an account the operator never signed.
    let rogue_account = nkeys::KeyPair::new_account();
    let (rogue, rogue_text) = chain.creds(dir.path(), "rogue", &rogue_account);
    let rogue_jwt = rogue_text.lines().nth(1).expect("jwt line").to_string();
    assert_fails(
        &with_creds(rogue),
        ConnectErrorKind::Refused,
        AuthMode::Creds,
        &[&seed, &rogue_jwt],
    )
    .await;

    // A creds file that is not one.
    let broken = dir.path().join("broken.creds");
    std::fs::write(&broken, "not a creds file").expect("write");
    assert_fails(
        &with_creds(broken),
        ConnectErrorKind::Credentials,
        AuthMode::Creds,
        &[],
    )
    .await;
}

#[tokio::test]
async fn tls_with_the_servers_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let server = server_with(pki.server_block(false));
    let tls = |ca: Option<PathBuf>| ConnectionConfig {
        tls: TlsConfig {
            required: true,
            ca_file: ca,
            ..TlsConfig::default()
        },
        ..connection(&server.url())
    };
    assert_works(&tls(Some(pki.ca.clone()))).await;
    // The same through a tls:// URL.
    let tls_url = ConnectionConfig {
        servers: vec![ServerUrl::new(format!("tls://127.0.0.1:{}", server.port()))],
        tls: TlsConfig {
            ca_file: Some(pki.ca.clone()),
            ..TlsConfig::default()
        },
        ..connection(&server.url())
    };
    assert_works(&tls_url).await;

    // Without the CA the server's certificate is not trusted: a TLS error, at once.
    let err = assert_fails(&tls(None), ConnectErrorKind::Tls, AuthMode::None, &[]).await;
    assert!(err.to_string().contains("connection.tls.ca_file"), "{err}");
    // A client with no TLS settings meets a TLS server: refused the same way.
    assert_fails(
        &connection(&server.url()),
        ConnectErrorKind::Tls,
        AuthMode::None,
        &[],
    )
    .await;
    // A missing CA file is a clear error before connecting.
    let err = assert_fails(
        &tls(Some(dir.path().join("missing-ca.pem"))),
        ConnectErrorKind::Tls,
        AuthMode::None,
        &[],
    )
    .await;
    assert!(err.to_string().contains("missing-ca.pem"), "{err}");
}

#[tokio::test]
async fn mutual_tls_with_user_and_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let server = server_with(format!(
        "{}\nauthorization {{\n  users: [ {{ user: \"worker\", password: \"pw-mTLS-c0de\" }} ]\n}}",
        pki.server_block(true)
    ));
    let mtls = |cert: Option<(PathBuf, PathBuf)>| ConnectionConfig {
        tls: TlsConfig {
            required: true,
            ca_file: Some(pki.ca.clone()),
            cert_file: cert.as_ref().map(|c| c.0.clone()),
            key_file: cert.map(|c| c.1),
        },
        ..with_user(&server.url(), "worker", "pw-mTLS-c0de")
    };
    let good = mtls(Some((pki.client_cert.clone(), pki.client_key.clone())));
    assert_eq!(Transport::of(&good), Transport::MutualTls);
    assert_works(&good).await;

    // No client certificate, or one from a CA the server does not trust: refused
    // promptly, never a hang, with the transport named.
    for (what, config) in [
        ("no client certificate", mtls(None)),
        (
            "an untrusted client certificate",
            mtls(Some((pki.rogue_cert.clone(), pki.rogue_key.clone()))),
        ),
    ] {
        let started = Instant::now();
        let err = jetworker::connect(&config)
            .await
            .expect_err("refused without a trusted client certificate");
        assert!(
            started.elapsed() < config.connect_timeout + Duration::from_secs(3),
            "{what}: took {:?}",
            started.elapsed()
        );
        let shown = format!("{err} / {err:?}");
        assert_eq!(err.kind(), ConnectErrorKind::Tls, "{what}: {shown}");
        assert!(shown.contains("TLS"), "{what}: {shown}");
        assert!(
            shown.contains("client certificate"),
            "{what}: says what: {shown}"
        );
        assert!(!shown.contains("pw-mTLS-c0de"), "{what}: {shown}");
        for key in &pki.private_keys {
            assert!(!shown.contains(key.lines().nth(1).unwrap_or("")), "{shown}");
        }
    }
    // The right certificate and the wrong password: refused, named as user/password.
    let wrong_password = ConnectionConfig {
        password: Some(SecretString::from("pw-Wrong-mTLS".to_string())),
        ..good.clone()
    };
    assert_fails(
        &wrong_password,
        ConnectErrorKind::Refused,
        AuthMode::UserPassword,
        &["pw-Wrong-mTLS", "pw-mTLS-c0de"],
    )
    .await;
}

/// The worker's own run loop (not just a one-shot connect) stops at once on refused
/// credentials instead of retrying forever.
#[tokio::test]
async fn a_worker_with_a_wrong_password_stops_with_the_error() {
    let server = server_with(
        "authorization {\n  users: [ { user: \"worker\", password: \"pw-Right-aa11\" } ]\n}".into(),
    );
    let config = parse(&config_text(&format!(
        "servers = [\"{}\"]\nuser = \"worker\"\npassword = \"pw-Wrong-bb22\"",
        server.url()
    )));
    let app = jetworker::App::new(std::sync::Arc::new(jetworker_suite::Probe::default()))
        .handler("scripted", jetworker_suite::scripted);
    let stop = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(Duration::from_secs(15), app.run_until(config, stop))
        .await
        .expect("returns, does not retry forever");
    let err = result.expect_err("refused");
    let shown = err.to_string();
    assert!(shown.contains("user/password auth"), "{shown}");
    assert!(
        !shown.contains("pw-Wrong-bb22") && !shown.contains("pw-Right-aa11"),
        "{shown}"
    );
}
