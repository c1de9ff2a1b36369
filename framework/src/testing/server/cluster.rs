//! `n` servers clustered over loopback routes.

use std::time::{Duration, Instant};

use super::config::{free_ports, unique_suffix, ClusterSpec};
use super::probe::meta_leader;
use super::{
    wait_ready, Address, NatsServer, ServerOptions, StartFailure, TestServerError, CHECK_TIMEOUT,
    DEFAULT_READY_TIMEOUT, START_ATTEMPTS,
};

/// `n` JetStream servers clustered over loopback routes, each with its own store
/// directory. Dropping the cluster kills every member.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    name: String,
}

impl NatsCluster {
    /// Start `n` clustered JetStream servers (3 for R3 streams); returns once every
    /// member is ready and a JetStream meta leader is elected.
    pub fn start(n: usize) -> Result<Self, TestServerError> {
        Self::start_with(n, ServerOptions::default())
    }

    /// Like [`NatsCluster::start`], with `opts` applied to every member (`jetstream`
    /// should stay on: clustered JetStream is the point). The cluster chooses its members'
    /// addresses, names and temporary directories: `address`, `dir` and `name` are for
    /// one server and refused here.
    pub fn start_with(n: usize, opts: ServerOptions) -> Result<Self, TestServerError> {
        if n == 0 {
            return Err(TestServerError::start(
                "a cluster needs at least one server".to_owned(),
            ));
        }
        if opts.address.is_some() || opts.dir.is_some() || opts.name.is_some() {
            return Err(TestServerError::start(
                "a cluster chooses its members' addresses, names and directories: leave \
                 ServerOptions::address, dir and name unset"
                    .to_owned(),
            ));
        }
        let bin = opts.binary()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&bin, n, &opts) {
                Ok(cluster) => return Ok(cluster),
                Err(StartFailure::PortInUse(e)) => last = Some(e),
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| TestServerError::start("no start attempt made".to_owned())))
    }

    fn try_start(
        bin: &std::path::Path,
        n: usize,
        opts: &ServerOptions,
    ) -> Result<Self, StartFailure> {
        let ports = free_ports(3 * n).map_err(StartFailure::Fatal)?;
        let suffix = unique_suffix();
        let name = format!("jwc-{suffix}");
        let route_ports: Vec<u16> = (0..n).map(|i| ports[3 * i + 2]).collect();
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let cluster = ClusterSpec {
                name: name.clone(),
                port: route_ports[i],
                routes: route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect(),
            };
            let server = NatsServer::prepare(
                bin,
                format!("jw-{suffix}-n{i}"),
                Address::loopback(ports[3 * i]),
                ports[3 * i + 1],
                Some(cluster),
                opts,
            )
            .map_err(StartFailure::Fatal)?;
            servers.push(server);
        }
        let mut cluster = Self { servers, name };
        cluster.spawn_all_and_wait(opts.ready_timeout)?;
        Ok(cluster)
    }

    /// Spawn every member that is not running, then wait until all are ready.
    fn spawn_all_and_wait(&mut self, timeout: Duration) -> Result<(), StartFailure> {
        for server in &mut self.servers {
            if !server.is_running() {
                server.spawn()?;
            }
        }
        wait_ready(&mut self.servers, Instant::now() + timeout)
    }

    /// The client URLs of all members, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Member `i`, to kill, stop or restart it (a restart rejoins the cluster on the same
    /// ports and routes). Panics if `i >= len()`, like slice indexing.
    pub fn server(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// All members.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The cluster's name (`cluster.name` in every member's config).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current JetStream meta leader's server name, as seen by the first running
    /// member that knows one.
    pub fn meta_leader(&mut self) -> Option<String> {
        self.servers
            .iter_mut()
            .filter_map(|s| {
                if s.is_running() {
                    meta_leader(s.spec.http_port, CHECK_TIMEOUT).ok().flatten()
                } else {
                    None
                }
            })
            .next()
    }

    /// Kill every member (`kill -9`).
    pub fn kill_all(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
    }

    /// Start every member that is not running (all at once, so a quorum can form again
    /// after a full outage) and wait until all are ready.
    pub fn restart_all(&mut self) -> Result<(), TestServerError> {
        let timeout = self
            .servers
            .first()
            .map(|s| s.ready_timeout)
            .unwrap_or(DEFAULT_READY_TIMEOUT);
        self.spawn_all_and_wait(timeout)
            .map_err(StartFailure::into_error)
    }
}
