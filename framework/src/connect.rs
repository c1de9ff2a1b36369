//! Connecting to NATS from the `[connection]` section, with every auth mode the server
//! offers, and errors that name the auth mode and server but never a secret.

use std::fmt;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use secrecy::ExposeSecret;

use crate::config::{redact_userinfo, ConnectionConfig};

/// Which auth mode a connection uses, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No credentials (or credentials inside the URL).
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
    /// The auth mode a connection config selects.
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
            AuthMode::None
        }
    }
}

/// What kind of connection failure this was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
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

impl ConnectFailure {
    /// True when retrying cannot help (bad URL, refused or unreadable credentials, TLS).
    pub fn is_permanent(self) -> bool {
        !matches!(self, ConnectFailure::Unreachable)
    }
}

/// Connecting failed. The message names the servers (userinfo redacted) and the auth mode.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {servers} with {auth}: {message}")]
pub struct ConnectError {
    /// Kind, to match on.
    pub kind: ConnectFailure,
    /// The auth mode that was tried.
    pub auth: AuthMode,
    /// The servers, redacted.
    pub servers: String,
    /// What happened, never including secrets.
    pub message: String,
}

/// Builds the client options: auth, TLS, name, timeouts, and connection event logging.
pub async fn options(c: &ConnectionConfig) -> Result<ConnectOptions, ConnectError> {
    let auth = AuthMode::of(c);
    let fail = |kind, message: String| ConnectError {
        kind,
        auth,
        servers: redacted_servers(c),
        message,
    };
    let mut opts = match auth {
        AuthMode::Creds => {
            let path = c.creds_file.clone().unwrap_or_default();
            ConnectOptions::with_credentials_file(&path)
                .await
                .map_err(|e| {
                    fail(
                        ConnectFailure::Credentials,
                        format!("cannot use creds file {}: {}", path.display(), e.kind()),
                    )
                })?
        }
        AuthMode::Nkey => {
            let path = c.nkey_seed_file.clone().unwrap_or_default();
            let seed = std::fs::read_to_string(&path).map_err(|e| {
                fail(
                    ConnectFailure::Credentials,
                    format!(
                        "cannot read nkey seed file {}: {}",
                        path.display(),
                        e.kind()
                    ),
                )
            })?;
            let seed = seed.trim().to_string();
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(fail(
                    ConnectFailure::Credentials,
                    format!("{} does not hold a valid nkey seed", path.display()),
                ));
            }
            ConnectOptions::with_nkey(seed)
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
    if let Some(ca) = &c.tls.ca_file {
        check_readable(ca).map_err(|m| fail(ConnectFailure::Tls, m))?;
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&c.tls.cert_file, &c.tls.key_file) {
        check_readable(cert).map_err(|m| fail(ConnectFailure::Tls, m))?;
        check_readable(key).map_err(|m| fail(ConnectFailure::Tls, m))?;
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if c.tls.required {
        opts = opts.require_tls(true);
    }
    Ok(opts
        .name(&c.name)
        .connection_timeout(c.connect_timeout)
        .request_timeout(Some(c.request_timeout))
        .event_callback(|event| async move { log_event(event) }))
}

fn check_readable(path: &std::path::Path) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))
}

fn log_event(event: Event) {
    match event {
        Event::Connected => tracing::info!("connected to NATS"),
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::LameDuckMode => tracing::warn!("server entering lame duck mode"),
        Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
        Event::ServerError(e) => tracing::warn!(error = %e, "server error"),
        Event::ClientError(e) => tracing::warn!(error = %e, "client error"),
        other => tracing::debug!(event = %other, "connection event"),
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

/// Connects once: for commands (`provision`, `status`) that should fail fast. The initial
/// attempt is bounded by `connect_timeout` per server, so a wrong credential or a dead
/// server is an error, never a hang.
pub async fn connect(c: &ConnectionConfig) -> Result<async_nats::Client, ConnectError> {
    let opts = options(c).await?;
    connect_with(c, opts).await
}

/// Connects with options built by [`options`] (and possibly adjusted), with the same
/// bounded wait and error reporting as [`connect`].
pub async fn connect_with(
    c: &ConnectionConfig,
    opts: ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let auth = AuthMode::of(c);
    let fail = |kind, message: String| ConnectError {
        kind,
        auth,
        servers: redacted_servers(c),
        message,
    };
    let addrs = c
        .servers
        .iter()
        .map(|s| {
            s.expose().parse::<ServerAddr>().map_err(|_| {
                fail(
                    ConnectFailure::BadUrl,
                    format!("not a server URL: {}", s.redacted()),
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
                K::ServerParse | K::Dns => ConnectFailure::BadUrl,
                K::Authentication | K::AuthorizationViolation => ConnectFailure::Refused,
                K::Tls => ConnectFailure::Tls,
                K::TimedOut | K::Io | K::MaxReconnects => ConnectFailure::Unreachable,
            };
            let detail = match kind {
                ConnectFailure::Refused => {
                    format!("the server refused the credentials ({})", e.kind())
                }
                _ => redact_userinfo(&e.to_string()),
            };
            Err(fail(kind, detail))
        }
        Err(_) => Err(fail(
            ConnectFailure::Unreachable,
            format!("no answer within {}", humantime::format_duration(bound)),
        )),
    }
}
