//! Connecting to NATS from the `[connection]` section, with every auth mode the server
//! offers, and errors that name the auth mode and server but never a secret.
//!
//! Credentials written into a server URL are taken out of it and given to the client as
//! user/password or token auth: the client library would otherwise ignore them, and
//! its own debug logs print server addresses in full.

use std::fmt;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use secrecy::ExposeSecret;

use crate::config::{ConnectionConfig, UrlCredentials};
use crate::error::Error;

/// Which auth mode a connection uses, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No credentials.
    None,
    /// User and password.
    UserPassword,
    /// Token.
    Token,
    /// Nkey seed file.
    Nkey,
    /// Creds file (JWT + nkey).
    Creds,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::None => "no auth",
            AuthMode::UserPassword => "user/password auth",
            AuthMode::Token => "token auth",
            AuthMode::Nkey => "nkey auth",
            AuthMode::Creds => "creds file (JWT) auth",
        })
    }
}

impl AuthMode {
    /// The auth mode a connection config selects: the configured one, else the one of
    /// credentials written into the server URLs.
    pub fn of(c: &ConnectionConfig) -> AuthMode {
        if c.creds_file.is_some() {
            AuthMode::Creds
        } else if c.nkey_seed_file.is_some() {
            AuthMode::Nkey
        } else if c.token.is_some() {
            AuthMode::Token
        } else if c.user.is_some() {
            AuthMode::UserPassword
        } else {
            match url_credentials(c) {
                Some(UrlCredentials::UserPassword { .. }) => AuthMode::UserPassword,
                Some(UrlCredentials::Token(_)) => AuthMode::Token,
                None => AuthMode::None,
            }
        }
    }
}

/// The credentials of the first server URL that carries some (validation makes sure
/// the URLs agree).
fn url_credentials(c: &ConnectionConfig) -> Option<UrlCredentials> {
    c.servers.iter().find_map(|s| s.credentials())
}

/// How a connection is secured, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// No TLS settings: TLS only if the server demands it, verified with the system roots.
    Plain,
    /// TLS: required by the config, a `tls://` URL or a configured CA.
    Tls,
    /// TLS with a client certificate.
    MutualTls,
}

impl Transport {
    /// The transport a connection config asks for.
    pub fn of(c: &ConnectionConfig) -> Transport {
        if c.tls.cert_file.is_some() && c.tls.key_file.is_some() {
            Transport::MutualTls
        } else if c.tls.required
            || c.tls.ca_file.is_some()
            || c.servers
                .iter()
                .any(|s| s.expose().trim_start().starts_with("tls://"))
        {
            Transport::Tls
        } else {
            Transport::Plain
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Plain => "no TLS settings",
            Transport::Tls => "TLS",
            Transport::MutualTls => "mutual TLS with a client certificate",
        })
    }
}

/// What kind of connection failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// A server URL does not parse.
    BadUrl,
    /// A credentials or TLS file could not be read.
    Credentials,
    /// The server refused the credentials.
    Refused,
    /// TLS could not be set up or negotiated.
    Tls,
    /// No server answered in time.
    Unreachable,
}

impl ConnectErrorKind {
    /// True when retrying cannot help (bad URL, refused or unreadable credentials, TLS).
    pub fn is_permanent(self) -> bool {
        !matches!(self, ConnectErrorKind::Unreachable)
    }
}

impl fmt::Display for ConnectErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectErrorKind::BadUrl => "not a server URL",
            ConnectErrorKind::Credentials => "the credentials cannot be used",
            ConnectErrorKind::Refused => "the server refused the credentials",
            ConnectErrorKind::Tls => "TLS failed",
            ConnectErrorKind::Unreachable => "no server answered",
        })
    }
}

/// Connecting failed. The message names the servers (userinfo redacted), the auth mode
/// and the transport, never a secret; the client's error is the source.
pub type ConnectError = Error<ConnectErrorKind>;

/// What a failed connection tried: readable from the error, for callers that decide on
/// it (and for tests).
#[derive(Debug, Clone)]
struct Tried {
    auth: AuthMode,
    transport: Transport,
    servers: String,
}

impl Tried {
    fn of(c: &ConnectionConfig) -> Tried {
        Tried {
            auth: AuthMode::of(c),
            transport: Transport::of(c),
            servers: redacted_servers(c),
        }
    }

    /// An error of `kind`, `what` saying what happened, caused by `source` if given.
    fn error(
        &self,
        kind: ConnectErrorKind,
        what: impl fmt::Display,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ConnectError {
        let error = match source {
            Some(source) => ConnectError::with_source(kind, source),
            None => ConnectError::new(kind),
        };
        error
            .with_message(format!(
                "cannot connect to {} ({}, {}): {what}",
                self.servers, self.auth, self.transport
            ))
            .with_detail(self.clone())
    }
}

impl ConnectError {
    /// The auth mode that was tried.
    pub fn auth(&self) -> Option<AuthMode> {
        self.detail::<Tried>().map(|t| t.auth)
    }

    /// Plain, TLS or mutual TLS.
    pub fn transport(&self) -> Option<Transport> {
        self.detail::<Tried>().map(|t| t.transport)
    }

    /// The servers, userinfo redacted, comma separated.
    pub fn servers(&self) -> Option<&str> {
        self.detail::<Tried>().map(|t| t.servers.as_str())
    }
}

/// Builds the client options: auth, TLS, name, timeouts, and connection event logging.
pub async fn options(c: &ConnectionConfig) -> Result<ConnectOptions, ConnectError> {
    let tried = Tried::of(c);
    let mut opts = match tried.auth {
        AuthMode::Creds => {
            let path = c.creds_file.clone().unwrap_or_default();
            warn_if_world_readable(&path, "the creds file");
            ConnectOptions::with_credentials_file(&path)
                .await
                .map_err(|e| {
                    tried.error(
                        ConnectErrorKind::Credentials,
                        format_args!("cannot use creds file {}", path.display()),
                        Some(only_the_kind(&e)),
                    )
                })?
        }
        AuthMode::Nkey => {
            let path = c.nkey_seed_file.clone().unwrap_or_default();
            warn_if_world_readable(&path, "the nkey seed file");
            let seed = std::fs::read_to_string(&path).map_err(|e| {
                tried.error(
                    ConnectErrorKind::Credentials,
                    format_args!("cannot read nkey seed file {}", path.display()),
                    Some(only_the_kind(&e)),
                )
            })?;
            let seed = seed.trim().to_string();
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                // The nkeys error is not kept: it is about the seed itself.
                return Err(tried.error(
                    ConnectErrorKind::Credentials,
                    format_args!("{} does not hold a valid nkey seed", path.display()),
                    None,
                ));
            }
            ConnectOptions::with_nkey(seed)
        }
        AuthMode::Token | AuthMode::UserPassword if c.token.is_none() && c.user.is_none() => {
            match url_credentials(c) {
                Some(UrlCredentials::UserPassword { user, password }) => {
                    ConnectOptions::with_user_and_password(
                        user,
                        password.expose_secret().to_string(),
                    )
                }
                Some(UrlCredentials::Token(token)) => {
                    ConnectOptions::with_token(token.expose_secret().to_string())
                }
                None => ConnectOptions::new(),
            }
        }
        AuthMode::Token => ConnectOptions::with_token(
            c.token
                .as_ref()
                .map(|t| t.expose_secret().to_string())
                .unwrap_or_default(),
        ),
        AuthMode::UserPassword => ConnectOptions::with_user_and_password(
            c.user.clone().unwrap_or_default(),
            c.password
                .as_ref()
                .map(|p| p.expose_secret().to_string())
                .unwrap_or_default(),
        ),
        AuthMode::None => ConnectOptions::new(),
    };
    if let Some(prefix) = &c.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    let readable = |path: &std::path::Path| {
        std::fs::metadata(path).map(|_| ()).map_err(|e| {
            tried.error(
                ConnectErrorKind::Tls,
                format_args!("cannot read {}", path.display()),
                Some(only_the_kind(&e)),
            )
        })
    };
    if let Some(ca) = &c.tls.ca_file {
        readable(ca)?;
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&c.tls.cert_file, &c.tls.key_file) {
        readable(cert)?;
        readable(key)?;
        warn_if_world_readable(key, "the TLS client key");
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if c.tls.required {
        opts = opts.require_tls(true);
    }
    Ok(opts
        .name(&c.name)
        .connection_timeout(c.connect_timeout)
        .request_timeout(Some(c.request_timeout))
        .ping_interval(c.ping_interval)
        .event_callback(|event| async move { log_event(event) }))
}

/// A secret file every local user can read is worth a warning (not an error: some
/// platforms mount secrets that way inside single-user containers).
fn warn_if_world_readable(path: &std::path::Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = %format!("{mode:o}"),
                    "{what} is readable by every user on this host: chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

/// An I/O error with nothing but its kind (`entity not found`, `permission denied`): the
/// cause kept of a failure to read a secret file, whose full error may quote from it.
fn only_the_kind(e: &std::io::Error) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(std::io::Error::from(e.kind()))
}

/// What the server says when a user lacks a permission (`-ERR 'Permissions Violation
/// for Publish to "x"'`): the denied operation is dropped, the connection stays up.
pub fn is_permission_violation(server_error: &str) -> bool {
    server_error
        .to_ascii_lowercase()
        .contains("permissions violation")
}

fn log_event(event: Event) {
    match event {
        Event::Connected => tracing::info!("connected to NATS"),
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::LameDuckMode => tracing::warn!("server entering lame duck mode"),
        Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
        Event::ServerError(async_nats::ServerError::Other(e)) if is_permission_violation(&e) => {
            // The denied publish or subscribe fails silently on the client side (a request
            // times out, a subscription stays empty): this line is where the cause shows.
            tracing::error!(
                error = %e,
                "the server denied an operation: this user lacks a permission the worker needs \
                 (the `permissions` subcommand prints every permission this config needs)"
            )
        }
        Event::ServerError(e) => tracing::warn!(error = %e, "server error"),
        Event::ClientError(e) => tracing::warn!(error = %e, "client error"),
        other => tracing::debug!(event = %other, "connection event"),
    }
}

/// True when an I/O error is a TLS handshake failure (rustls' errors travel inside
/// `io::Error`): certificates, alerts, handshakes.
fn is_tls_failure(e: &async_nats::ConnectError) -> bool {
    let text = error_chain(e).to_ascii_lowercase();
    ["certificate", "handshake", "alert", "tls"]
        .iter()
        .any(|word| text.contains(word))
}

/// An error's text and its sources', to look for what rustls said.
fn error_chain(e: &async_nats::ConnectError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push(' ');
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// What to change for the common TLS failures.
fn tls_hint(error: &str, c: &ConnectionConfig) -> &'static str {
    let has_client_cert = c.tls.cert_file.is_some();
    if error.contains("UnknownIssuer") {
        if c.tls.ca_file.is_some() {
            " (the server's certificate is not signed by the CA in connection.tls.ca_file)"
        } else {
            " (the server's certificate is not signed by a trusted CA: set connection.tls.ca_file)"
        }
    } else if error.contains("CertificateRequired")
        || (error.contains("BadCertificate") && !has_client_cert)
    {
        " (the server requires a client certificate: set connection.tls.cert_file and key_file)"
    } else if error.contains("BadCertificate") || error.contains("UnknownCA") {
        " (the server does not accept this client certificate: not signed by a CA it trusts?)"
    } else {
        ""
    }
}

/// The configured servers, userinfo redacted, comma separated.
pub fn redacted_servers(c: &ConnectionConfig) -> String {
    c.servers
        .iter()
        .map(|s| s.redacted())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JetStream context of a connection: in `jetstream_domain` or under
/// `jetstream_api_prefix` when one is configured (leaf-node setups, imported JetStream),
/// else the local JetStream. Every JetStream context the worker and the operator tools
/// use comes from here.
pub fn jetstream(
    client: async_nats::Client,
    c: &ConnectionConfig,
) -> async_nats::jetstream::Context {
    match (&c.jetstream_domain, &c.jetstream_api_prefix) {
        (Some(domain), _) => async_nats::jetstream::with_domain(client, domain),
        (None, Some(prefix)) => async_nats::jetstream::with_prefix(client, prefix),
        (None, None) => async_nats::jetstream::new(client),
    }
}

/// Connects once: for commands (`provision`, `status`) that should fail fast. The initial
/// attempt is bounded by `connect_timeout` per server, so a wrong credential or a dead
/// server is an error, never a hang.
pub async fn connect(c: &ConnectionConfig) -> Result<async_nats::Client, ConnectError> {
    let opts = options(c).await?;
    connect_with(c, opts).await
}

/// Connects with options built by [`connect_options`](crate::connect_options) (and possibly adjusted), with the same
/// bounded wait and error reporting as [`connect`].
pub async fn connect_with(
    c: &ConnectionConfig,
    opts: ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let tried = Tried::of(c);
    let addrs = c
        .servers
        .iter()
        .map(|s| {
            // Parsed without its userinfo, so the parser's error cannot quote a secret.
            s.without_userinfo().parse::<ServerAddr>().map_err(|e| {
                tried.error(
                    ConnectErrorKind::BadUrl,
                    format_args!("not a server URL: {}", s.redacted()),
                    Some(e.into()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Each server gets connect_timeout; add slack for the handshake.
    let bound = c.connect_timeout * (addrs.len() as u32).max(1) + Duration::from_secs(2);
    match tokio::time::timeout(bound, opts.connect(addrs)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => {
            use async_nats::ConnectErrorKind as K;
            let kind = match e.kind() {
                K::ServerParse | K::Dns => ConnectErrorKind::BadUrl,
                K::Authentication | K::AuthorizationViolation => ConnectErrorKind::Refused,
                K::Tls => ConnectErrorKind::Tls,
                // A failed handshake (untrusted certificate, missing client certificate)
                // reaches us as an I/O error; retrying cannot fix it.
                K::Io if is_tls_failure(&e) => ConnectErrorKind::Tls,
                K::TimedOut | K::Io | K::MaxReconnects => ConnectErrorKind::Unreachable,
            };
            let what = match kind {
                ConnectErrorKind::Refused if tried.auth == AuthMode::None => {
                    "the server requires credentials and none are configured".to_string()
                }
                ConnectErrorKind::Tls => format!("TLS failed{}", tls_hint(&error_chain(&e), c)),
                _ => kind.to_string(),
            };
            // The client was given the addresses without userinfo and the credentials
            // apart from them: its error names neither.
            Err(tried.error(kind, what, Some(e.into())))
        }
        Err(_) => Err(tried.error(
            ConnectErrorKind::Unreachable,
            format_args!("no answer within {}", humantime::format_duration(bound)),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServerUrl, TlsConfig};

    fn connection(servers: &[&str]) -> ConnectionConfig {
        ConnectionConfig {
            servers: servers.iter().map(|s| ServerUrl::new(*s)).collect(),
            ..ConnectionConfig::default()
        }
    }

    #[test]
    fn url_credentials_select_the_auth_mode() {
        assert_eq!(
            AuthMode::of(&connection(&["nats://alice:pw@127.0.0.1:4222"])),
            AuthMode::UserPassword
        );
        assert_eq!(
            AuthMode::of(&connection(&["nats://t0k3n@127.0.0.1:4222"])),
            AuthMode::Token
        );
        assert_eq!(
            AuthMode::of(&connection(&["nats://127.0.0.1:4222"])),
            AuthMode::None
        );
        let mut explicit = connection(&["nats://t0k3n@127.0.0.1:4222"]);
        explicit.creds_file = Some("/x.creds".into());
        assert_eq!(AuthMode::of(&explicit), AuthMode::Creds);
    }

    #[test]
    fn transport_follows_the_tls_settings() {
        assert_eq!(
            Transport::of(&connection(&["nats://h:4222"])),
            Transport::Plain
        );
        assert_eq!(
            Transport::of(&connection(&["tls://h:4222"])),
            Transport::Tls
        );
        let mut mutual = connection(&["nats://h:4222"]);
        mutual.tls = TlsConfig {
            cert_file: Some("c.pem".into()),
            key_file: Some("k.pem".into()),
            ..TlsConfig::default()
        };
        assert_eq!(Transport::of(&mutual), Transport::MutualTls);
    }

    #[test]
    fn permission_violations_are_recognised() {
        assert!(is_permission_violation(
            "Permissions Violation for Publish to \"dlq.jobs\""
        ));
        assert!(!is_permission_violation("Authorization Violation"));
    }
}
