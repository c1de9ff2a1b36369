//! What answers at an address: the `INFO` greeting a NATS server sends on connect (read
//! without credentials), and the monitoring endpoint. The readiness wait and [`probe`]
//! both read servers this way.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A `host:port` a NATS server listens on or a NATS URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP as written (`[...]` removed from IPv6).
    pub host: String,
    /// Port (4222 when the URL has none).
    pub port: u16,
    /// The scheme is plain NATS (`nats://` or none), not TLS or websocket. A server the
    /// launcher starts listens on the host and port only.
    pub plain: bool,
}

impl Address {
    /// `127.0.0.1:port`, plain NATS.
    pub fn loopback(port: u16) -> Address {
        Address {
            host: Ipv4Addr::LOCALHOST.to_string(),
            port,
            plain: true,
        }
    }

    /// Parses `nats://user:pass@host:port`, `host:port`, `tls://[::1]:4222`, ... The
    /// userinfo is dropped (never kept, never printed).
    pub fn parse(url: &str) -> Option<Address> {
        let (scheme, rest) = match url.find("://") {
            Some(i) => (&url[..i], &url[i + 3..]),
            None => ("nats", url),
        };
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let rest = rest.split(['/', '?']).next().unwrap_or(rest);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => 4222,
                None => return None,
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port.parse().ok()?),
                None => (rest.to_string(), 4222),
            }
        };
        if host.is_empty() {
            return None;
        }
        Some(Address {
            host,
            port,
            plain: scheme.eq_ignore_ascii_case("nats"),
        })
    }

    /// Whether the host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port`, IPv6 hosts in brackets.
    fn socket(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `nats://host:port`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.socket())
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.socket())
    }
}

/// What answered at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing listens there (refused, or no answer in time).
    Nothing,
    /// A NATS server.
    Nats {
        /// Its version.
        version: String,
        /// Whether JetStream is enabled on it.
        jetstream: bool,
    },
    /// Something listens but did not greet like a NATS server.
    NotNats(String),
}

/// Connects to `address` and reads the server's `INFO` greeting, within `timeout`:
/// whether anything answers, which version, and whether JetStream is on. Blocks the
/// calling thread for at most about `timeout`.
pub fn probe(address: &Address, timeout: Duration) -> Probe {
    match greet(address, timeout) {
        Err(_) | Ok(Greeting::Silent) => Probe::Nothing,
        Ok(Greeting::Info(info)) => Probe::Nats {
            version: info.version,
            jetstream: info.jetstream,
        },
        Ok(Greeting::Other(why)) => Probe::NotNats(why),
    }
}

/// What a server's `INFO` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerInfo {
    pub(super) name: String,
    pub(super) version: String,
    pub(super) jetstream: bool,
}

/// What came back on connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Greeting {
    /// A NATS server's `INFO`.
    Info(ServerInfo),
    /// Something else; why it is no `INFO`.
    Other(String),
    /// Nothing within the timeout (a black hole, or a server waiting for a TLS handshake).
    Silent,
}

/// Connects to `address` and reads the first line, all within `timeout`. An error means
/// no connection could be made.
pub(super) fn greet(address: &Address, timeout: Duration) -> io::Result<Greeting> {
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    let mut connected = None;
    for addr in (address.host.as_str(), address.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, remaining()) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => last_error = e,
        }
    }
    let mut stream = connected.ok_or(last_error)?;
    let mut greeting = Vec::new();
    let mut chunk = [0u8; 4096];
    // The greeting is one line; a server sends it at once, and it is small.
    while !greeting.contains(&b'\n') && greeting.len() < 64 * 1024 {
        stream.set_read_timeout(Some(remaining()))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => greeting.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Greeting::Silent)
            }
            Err(_) => break,
        }
    }
    Ok(parse_greeting(&greeting))
}

/// Reads an `INFO {json}` line.
fn parse_greeting(greeting: &[u8]) -> Greeting {
    let line = String::from_utf8_lossy(greeting);
    let line = line.lines().next().unwrap_or("").trim();
    let Some(json) = line.strip_prefix("INFO ") else {
        let shown: String = line.chars().take(60).collect();
        return Greeting::Other(format!("it greeted with {shown:?}"));
    };
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(info) => Greeting::Info(ServerInfo {
            name: info["server_name"].as_str().unwrap_or("").to_string(),
            version: info["version"].as_str().unwrap_or("unknown").to_string(),
            jetstream: info["jetstream"].as_bool().unwrap_or(false),
        }),
        Err(e) => Greeting::Other(format!("its INFO is not JSON: {e}")),
    }
}

/// A minimal HTTP/1.0 GET against `127.0.0.1:port`: (status, body).
pub(super) fn http_get(port: u16, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP response: {:?}",
                    head.lines().next().unwrap_or("")
                ),
            )
        })?;
    Ok((status, body.to_owned()))
}

/// The JetStream meta leader's name as seen by the server at `http_port`.
pub(super) fn meta_leader(http_port: u16, timeout: Duration) -> io::Result<Option<String>> {
    let (status, body) = http_get(http_port, "/jsz", timeout)?;
    if status != 200 {
        return Err(io::Error::other(format!("/jsz answered {status}")));
    }
    let jsz: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(jsz
        .pointer("/meta_cluster/leader")
        .and_then(|l| l.as_str())
        .filter(|l| !l.is_empty())
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_urls() {
        let a = Address::parse("nats://127.0.0.1:4222").expect("parses");
        assert_eq!(
            (a.host.as_str(), a.port, a.plain),
            ("127.0.0.1", 4222, true)
        );
        assert!(a.is_loopback());
        let a = Address::parse("nats://ann:secret@localhost").expect("parses");
        assert_eq!((a.host.as_str(), a.port), ("localhost", 4222));
        assert!(a.is_loopback());
        assert!(!a.to_string().contains("secret") && !a.url().contains("ann"));
        let a = Address::parse("tls://[::1]:4333").expect("parses");
        assert_eq!((a.host.as_str(), a.port, a.plain), ("::1", 4333, false));
        assert!(a.is_loopback());
        assert_eq!(a.url(), "nats://[::1]:4333");
        let a = Address::parse("nats.example.com:4222").expect("parses");
        assert!(!a.is_loopback() && a.plain);
        let a = Address::parse("10.0.0.7").expect("parses");
        assert_eq!(a.port, 4222);
        assert!(!a.is_loopback());
        assert_eq!(Address::parse("nats://:4222"), None);
        assert_eq!(Address::parse("nats://host:port"), None);
        assert_eq!(Address::loopback(4223).url(), "nats://127.0.0.1:4223");
    }

    #[test]
    fn greetings() {
        let probe_of = |greeting: &[u8]| match parse_greeting(greeting) {
            Greeting::Info(info) => Probe::Nats {
                version: info.version,
                jetstream: info.jetstream,
            },
            Greeting::Other(why) => Probe::NotNats(why),
            Greeting::Silent => Probe::Nothing,
        };
        assert_eq!(
            probe_of(b"INFO {\"version\":\"2.9.10\",\"jetstream\":true}\r\n"),
            Probe::Nats {
                version: "2.9.10".into(),
                jetstream: true
            }
        );
        assert_eq!(
            probe_of(b"INFO {\"version\":\"2.9.10\"}\r\n"),
            Probe::Nats {
                version: "2.9.10".into(),
                jetstream: false
            }
        );
        assert!(matches!(
            probe_of(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Probe::NotNats(_)
        ));
        assert!(matches!(probe_of(b"INFO {oops\r\n"), Probe::NotNats(_)));
        assert!(matches!(
            parse_greeting(b"INFO {\"server_name\":\"jw-1\",\"version\":\"2.9.10\"}\r\n"),
            Greeting::Info(ServerInfo { name, .. }) if name == "jw-1"
        ));
    }

    #[test]
    fn nothing_listening() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        assert_eq!(
            probe(&Address::loopback(port), Duration::from_secs(2)),
            Probe::Nothing
        );
    }

    #[test]
    fn a_silent_listener_is_nothing_usable() -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = Address::loopback(listener.local_addr()?.port());
        let started = Instant::now();
        assert_eq!(probe(&address, Duration::from_millis(300)), Probe::Nothing);
        assert!(started.elapsed() < Duration::from_secs(2));
        Ok(())
    }
}
