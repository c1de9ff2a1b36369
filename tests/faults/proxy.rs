//! A TCP proxy on loopback that a test can cut: it sits between a worker and its
//! nats-server and forwards bytes both ways until told otherwise.
//!
//! - [`Proxy::cut`]: every live connection is closed at once, and new connections are
//!   accepted and then black-holed (held open, nothing forwarded, nothing answered) until
//!   [`Proxy::restore`], when they are closed so the client dials again.
//! - [`Proxy::stall`]: a silent partition: live connections stay open but nothing is
//!   forwarded on them ever again (no FIN, no RST: the client only notices through its
//!   own timeouts); new connections are black-holed until [`Proxy::restore`].
//! - [`Proxy::restore`]: new connections are forwarded again.
//!
//! Everything runs on the test's runtime and stops when the proxy is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Open,
    /// Live connections closed; new ones black-holed.
    Cut,
    /// Live connections silently frozen; new ones black-holed.
    Stall,
}

/// A cuttable loopback TCP proxy; see the module docs.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
    stats: Arc<ProxyStats>,
}

/// Connection counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections forwarded to the upstream.
    pub forwarded: AtomicU64,
    /// Connections accepted while cut or stalled, held and never forwarded.
    pub black_holed: AtomicU64,
    /// Live connections closed by a cut.
    pub closed_by_cut: AtomicU64,
    /// Live connections frozen by a stall.
    pub stalled: AtomicU64,
}

impl Proxy {
    /// Listens on a free `127.0.0.1` port and forwards to `upstream` (a loopback address).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        assert!(upstream.ip().is_loopback(), "loopback only: {upstream}");
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Open);
        let stop = CancellationToken::new();
        let stats = Arc::new(ProxyStats::default());
        tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            stop.clone(),
            stats.clone(),
        ));
        Ok(Proxy {
            addr,
            mode,
            stop,
            stats,
        })
    }

    /// The `nats://` URL clients use to go through the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Closes every live connection and black-holes new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Freezes every live connection for good and black-holes new ones.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Forwards new connections again (frozen ones stay frozen).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// Connection counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
    stats: Arc<ProxyStats>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let rx = mode.subscribe();
        let stop = stop.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection(client, upstream, rx, stats) => {}
            }
        });
    }
}

/// Waits until `rx` shows a mode for which `pred` holds (or the sender is gone).
async fn until(rx: &mut watch::Receiver<Mode>, pred: impl Fn(Mode) -> bool) {
    let _ = rx.wait_for(|m| pred(*m)).await;
}

async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<Mode>,
    stats: Arc<ProxyStats>,
) {
    if *rx.borrow_and_update() != Mode::Open {
        // Black hole: hold the socket silently until restored, then close it.
        stats.black_holed.fetch_add(1, Ordering::Relaxed);
        until(&mut rx, |m| m == Mode::Open).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = until(&mut rx, |m| m != Mode::Open) => {
            if *rx.borrow() == Mode::Stall {
                // Keep both sockets open and unread, forever (until the proxy is dropped).
                stats.stalled.fetch_add(1, Ordering::Relaxed);
                std::future::pending::<()>().await;
            }
            stats.closed_by_cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}
