//! The live analytics dashboard (`workers dashboard`, and `workers demo` starts one): a
//! web page showing events per minute by kind over the last hour (an SVG chart drawn from
//! the data), revenue, active users, top products, failed logins and flagged users,
//! updated while events flow.
//!
//! The page polls `GET /api/summary`, a [`Summary`] of what [`crate::aggregates::read`]
//! returns, the same read `workers stats` does, so both show the same numbers.
//!
//! Safe by default:
//! - it listens on loopback unless told otherwise ([`listen_address`]), and a loopback
//!   dashboard answers only requests addressed to a loopback name, so a web page whose
//!   domain is made to resolve to 127.0.0.1 (DNS rebinding) cannot read it;
//! - read-only: every route is a `GET`, nothing changes state;
//! - its assets (HTML, CSS, JavaScript) are built into the binary: no CDN, it works
//!   offline;
//! - a strict Content-Security-Policy (scripts and styles from the dashboard itself only,
//!   no inline script, no frames), and the page writes every string it gets (user ids
//!   and product names come from events) as text, never as markup.
//!
//! ```no_run
//! # async fn example(kv: async_nats::jetstream::kv::Store) -> Result<(), workers::dashboard::DashboardError> {
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//! use workers::dashboard::{self, DashboardOptions};
//!
//! let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
//! let address = dashboard::serve(kv, DashboardOptions::default(), &tasks, stop.clone()).await?;
//! println!("dashboard at http://{address}/");
//! stop.cancel();
//! tasks.close();
//! tasks.wait().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

mod server;
mod summary;

pub use server::serve;
pub use summary::{
    MinuteRow, ProductRow, Summary, SummaryOptions, Totals, UserRow, FLAGGED_LISTED,
};

/// Where `workers dashboard` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// What the dashboard serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardOptions {
    /// `host:port` to listen on (port 0: a free one).
    pub listen: String,
    /// Listen on a non-loopback address too. The page shows user ids: off by default.
    pub allow_remote: bool,
    /// Minutes in the chart, counting back from now.
    pub window_minutes: u64,
    /// Products and users listed.
    pub top: usize,
    /// Failed logins after which a user is flagged (for the heading).
    pub flag_threshold: u64,
    /// How often the page asks for new numbers; the bucket is read at most about twice
    /// per period however many pages are open.
    pub refresh: Duration,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        DashboardOptions {
            listen: DEFAULT_LISTEN.to_string(),
            allow_remote: false,
            window_minutes: 60,
            top: 10,
            flag_threshold: crate::aggregates::DEFAULT_FLAG_THRESHOLD,
            refresh: Duration::from_secs(2),
        }
    }
}

/// Why the dashboard could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardErrorKind {
    /// The listen address is not `host:port` with an IP host.
    Address,
    /// The listen address is not a loopback one and remote access was not allowed.
    NotLoopback,
    /// The address cannot be bound (taken, not ours).
    Listen,
}

impl fmt::Display for DashboardErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DashboardErrorKind::Address => "not a listen address",
            DashboardErrorKind::NotLoopback => "not a loopback address",
            DashboardErrorKind::Listen => "cannot listen",
        })
    }
}

/// Why the dashboard could not start; the message names the address.
pub type DashboardError = jetworker::Error<DashboardErrorKind>;

/// Parses `listen` (`ip:port`); a non-loopback address only with `allow_remote`.
pub fn listen_address(listen: &str, allow_remote: bool) -> Result<SocketAddr, DashboardError> {
    let address: SocketAddr = listen.parse().map_err(|e| {
        DashboardError::with_source(DashboardErrorKind::Address, e)
            .with_message(format!("dashboard: not an address (ip:port): {listen:?}"))
    })?;
    if !address.ip().is_loopback() && !allow_remote {
        return Err(DashboardError::new(DashboardErrorKind::NotLoopback).with_message(format!(
            "dashboard: {address} is reachable from other machines and the page shows user ids; listen on 127.0.0.1, or serve it with `workers dashboard --allow-remote`"
        )));
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            listen_address("127.0.0.1:8080", false)
                .map(|a| a.port())
                .ok(),
            Some(8080)
        );
        assert!(listen_address("[::1]:0", false).is_ok());
        let remote = listen_address("0.0.0.0:8080", false).map(|_| ());
        assert_eq!(
            remote.map_err(|e| e.kind()),
            Err(DashboardErrorKind::NotLoopback)
        );
        assert!(listen_address("0.0.0.0:8080", true).is_ok());
        for bad in ["localhost:8080", "8080", ""] {
            let kind = listen_address(bad, false).map(|_| ()).map_err(|e| e.kind());
            assert_eq!(kind, Err(DashboardErrorKind::Address), "{bad:?}");
        }
    }
}
