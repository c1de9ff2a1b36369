//! Shared by the security tests: a test PKI (CA, server and client certificates made
//! with rcgen), a decentralized-auth chain (operator, account and user JWTs signed with
//! nkeys, as `nsc` would make them), and servers configured for each auth mode.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::ConfigText;
use base64::Engine;
use jetworker::testing::server::{NatsServer, ServerOptions};
use jetworker::{Config, ConnectionConfig, ServerUrl};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Files of a test PKI: a CA, a server certificate for 127.0.0.1 / localhost, a client
/// certificate, and a second CA nobody trusts.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate signed by a CA the server does not trust.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    /// The private keys' PEM text, to prove they never show in output.
    pub private_keys: Vec<String>,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, key)
}

fn leaf(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
) -> (rcgen::Certificate, KeyPair) {
    let mut params =
        CertificateParams::new(vec!["localhost".to_string()]).expect("certificate params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().expect("key");
    let cert = params
        .signed_by(&key, issuer, issuer_key)
        .expect("signed certificate");
    (cert, key)
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        let (ca_cert, ca_key) = ca("jetworker test CA");
        let (server, server_key) = leaf(
            "nats-server",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca_cert,
            &ca_key,
        );
        let (client, client_key) = leaf(
            "jetworker-client",
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca_cert,
            &ca_key,
        );
        let (rogue_ca, rogue_ca_key) = ca("rogue CA");
        let (rogue, rogue_key) = leaf(
            "rogue-client",
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_ca,
            &rogue_ca_key,
        );
        let private_keys = vec![
            server_key.serialize_pem(),
            client_key.serialize_pem(),
            rogue_key.serialize_pem(),
        ];
        Pki {
            ca: write(dir, "ca.pem", &ca_cert.pem()),
            server_cert: write(dir, "server.pem", &server.pem()),
            server_key: write(dir, "server-key.pem", &server_key.serialize_pem()),
            client_cert: write(dir, "client.pem", &client.pem()),
            client_key: write(dir, "client-key.pem", &client_key.serialize_pem()),
            rogue_cert: write(dir, "rogue.pem", &rogue.pem()),
            rogue_key: write(dir, "rogue-key.pem", &rogue_key.serialize_pem()),
            private_keys,
        }
    }

    /// The server's `tls {}` block; `verify` asks every client for a certificate.
    pub fn server_block(&self, verify: bool) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 5\n}}",
            self.server_cert, self.server_key, self.ca
        )
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A NATS JWT (v2): `header.claims.signature`, signed by `issuer` over the first two.
pub fn jwt(subject: &str, name: &str, issuer: &nkeys::KeyPair, nats: serde_json::Value) -> String {
    let header = b64(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{}{}", name.to_uppercase(), now()),
        "iat": now(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!("{header}.{}", b64(claims.to_string()));
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64(signature))
}

/// Operator mode: an operator, a system account, a JetStream-enabled account and a
/// user in it, with the server's config for a memory resolver.
pub struct Decentralized {
    pub operator_jwt: PathBuf,
    pub system_account: String,
    pub account: nkeys::KeyPair,
    pub account_jwt: String,
    pub system_jwt: String,
}

impl Decentralized {
    pub fn create(dir: &Path) -> Decentralized {
        let operator = nkeys::KeyPair::new_operator();
        let system = nkeys::KeyPair::new_account();
        let account = nkeys::KeyPair::new_account();
        let operator_jwt = jwt(
            &operator.public_key(),
            "test-operator",
            &operator,
            serde_json::json!({
                "type": "operator", "version": 2,
                "system_account": system.public_key(),
            }),
        );
        let unlimited = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        let mut js_limits = unlimited.clone();
        for (k, v) in [
            ("mem_storage", -1),
            ("disk_storage", -1),
            ("streams", -1),
            ("consumer", -1),
        ] {
            js_limits[k] = serde_json::json!(v);
        }
        let account_jwt = jwt(
            &account.public_key(),
            "APP",
            &operator,
            serde_json::json!({
                "type": "account", "version": 2, "limits": js_limits,
                "default_permissions": {"pub": {}, "sub": {}},
            }),
        );
        let system_jwt = jwt(
            &system.public_key(),
            "SYS",
            &operator,
            serde_json::json!({
                "type": "account", "version": 2, "limits": unlimited,
                "default_permissions": {"pub": {}, "sub": {}},
            }),
        );
        Decentralized {
            operator_jwt: write(dir, "operator.jwt", &operator_jwt),
            system_account: system.public_key(),
            account,
            account_jwt,
            system_jwt,
        }
    }

    /// The server config: operator, system account, memory resolver with both accounts.
    pub fn server_block(&self) -> String {
        format!(
            "operator: {:?}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {:?}\n  {}: {:?}\n}}",
            self.operator_jwt,
            self.system_account,
            self.account.public_key(),
            self.account_jwt,
            self.system_account,
            self.system_jwt,
        )
    }

    /// A `.creds` file for a new user of the account (signed by `signer`, normally the
    /// account). Returns the path and the file's text.
    pub fn creds(&self, dir: &Path, name: &str, signer: &nkeys::KeyPair) -> (PathBuf, String) {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            &user.public_key(),
            name,
            signer,
            serde_json::json!({
                "type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1,
            }),
        );
        let seed = user.seed().expect("seed");
        let text = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        );
        (write(dir, &format!("{name}.creds"), &text), text)
    }
}

/// A JetStream server with `extra` appended to its config.
pub fn server_with(extra: String) -> NatsServer {
    NatsServer::start_with(ServerOptions {
        extra_config: Some(extra),
        ..ServerOptions::default()
    })
    .expect("nats-server starts with the auth/TLS config")
}

/// A connection config for `url` with a short connect timeout.
pub fn connection(url: &str) -> ConnectionConfig {
    ConnectionConfig {
        servers: vec![ServerUrl::new(url)],
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..ConnectionConfig::default()
    }
}

/// A valid config with the given `[connection]` lines (the servers among them) and the
/// suite's stream + consumer.
pub fn config_text(connection_lines: &str) -> String {
    ConfigText::empty()
        .connection(connection_lines)
        .connection(
            r#"request_timeout = "3s"
connect_timeout = "3s""#,
        )
        .worker(r#"shutdown_grace = "5s""#)
        .with_jobs()
        .in_consumer(
            "jobs",
            r#"max_deliver = 2
backoff = ["200ms"]"#,
        )
        .text()
}

pub fn parse(text: &str) -> Config {
    Config::from_toml_with_env(text, Path::new("streams.toml"), std::iter::empty())
        .expect("valid config")
}

/// A worker binary run as a child process, its stderr collected line by line; killed
/// on drop.
pub struct WorkerProcess {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl WorkerProcess {
    /// `test_worker ARGS...` with `envs`; stdout is discarded unless collected by
    /// [`run_to_end`].
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> WorkerProcess {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("NATS_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start test_worker");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        WorkerProcess {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until stderr satisfies `check`; panics with the output after `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, check: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let text = self.stderr();
            if check(&text) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for {what}; stderr:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits (up to `within`) for the exit; returns the exit status and
    /// the whole stderr.
    pub async fn terminate(mut self, within: Duration) -> (Option<i32>, String) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.stderr())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `test_worker ARGS...` to its end, killing it after 60 s: (exit code, stdout,
/// stderr).
pub fn run_to_end(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_test_worker"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NATS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start test_worker");
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
    let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    (
        code,
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    )
}
