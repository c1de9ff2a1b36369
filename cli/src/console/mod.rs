//! `console`: the web console ([`Console`]): a page over what `status` reports and the
//! dead letters as `dlq` handles them, with charts of the last minutes.
//!
//! # Layout
//! - `access`: the token ([`ConsoleToken`]) and the listen rule, sessions, the
//!   same-origin and CSRF checks (pure functions).
//! - `sampler`: the sampler, its history, the charts' series and the counts by reason.
//! - `routes`: the page and the JSON API.
//! - `assets/`: `index.html`, `console.js`, `console.css`.
//! - `error`: [`ConsoleError`] and its [`ConsoleErrorKind`].

mod access;
mod error;
mod routes;
mod sampler;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use clap::Args;
use jetworker::Config;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access::{check_listen, ConsoleToken, CONSOLE_TOKEN_ENV};
pub use error::{ConsoleError, ConsoleErrorKind};

use crate::command::{connect_for_command, EXIT_FAILURE, EXIT_USAGE};
use crate::dlq::Dlq;
use access::Sessions;
use routes::ConsoleState;
use sampler::{History, Sampler};

/// Where the console listens unless told otherwise.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:8222";

/// How long the charts reach back.
const CHART_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The `console` subcommand's options.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Address to serve on. Anything but a loopback address needs a token.
    #[arg(long, default_value = DEFAULT_CONSOLE_LISTEN)]
    pub listen: SocketAddr,
    /// Show everything, change nothing: replay and purge are refused.
    #[arg(long)]
    pub read_only: bool,
    /// File holding the token the console asks for (else JETWORKER_CONSOLE_TOKEN).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// How often the server is read for the page and its charts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
}

/// How a [`Console`] serves.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Address to serve on (port 0 picks a free one; see [`Console::local_addr`]).
    pub listen: SocketAddr,
    /// Refuse replay and purge.
    pub read_only: bool,
    /// The token every API request needs; required unless `listen` is loopback.
    pub token: Option<ConsoleToken>,
    /// How often the server is read.
    pub sample_every: Duration,
}

impl Default for ConsoleSettings {
    /// Loopback port 8222, read-write, no token, a sample every 5 s.
    fn default() -> Self {
        ConsoleSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8222)),
            read_only: false,
            token: None,
            sample_every: Duration::from_secs(5),
        }
    }
}

/// The `console` subcommand's server: a web page for the operator who would rather look
/// than type: per stream and consumer what `status` prints, charts of the last minutes, and
/// the dead letters as `dlq` handles them (list with its filters, show one decoded,
/// replay and purge of one, a selection or a filter, after a confirmation).
///
/// # What it reads
/// The same as the commands, through their code: the sampler calls
/// [`collect_status`](crate::collect_status) every `--sample-every` and keeps the last
/// minutes of reports for the charts (rates are differences between samples, so every
/// replica's work shows); the dead letters go through [`Dlq`](crate::Dlq), so a replay
/// from the page is the CLI's replay (republish, await the PubAck, then delete; letters
/// without their payload are skipped and kept).
///
/// # Safe by default
/// - It listens on `127.0.0.1:8222` unless told otherwise. Any non-loopback address
///   needs a token, from `--token-file` or `JETWORKER_CONSOLE_TOKEN` (never the config
///   text, never a log line); without one the console refuses to start. With a token,
///   every API request carries it (`Authorization: Bearer`) or a session opened by
///   logging in with it on the page (an `HttpOnly`, `SameSite=Strict` cookie); otherwise
///   it gets 401. The page itself holds no data.
/// - Without a token, only requests addressed to a loopback name are answered (a DNS
///   rebinding page gets nothing).
/// - Replay and purge are POSTs that must come from the console's own page: `Origin`
///   and `Sec-Fetch-Site`, when sent, must say same-origin, and the request must carry
///   its session's CSRF token (`X-Jetworker-Csrf`). `--read-only` refuses them outright.
/// - What the server holds (subjects, headers, payloads, error texts) is only ever put
///   into the page as text, and a strict Content-Security-Policy lets the page run its
///   own script alone: a dead letter holding `<script>` or markup shows as text.
/// - The page, its script and its style are built into the binary: no CDN, it works
///   offline.
///
/// ```no_run
/// # async fn demo(js: async_nats::jetstream::Context, config: jetworker::Config) -> Result<(), jetworker_cli::ConsoleError> {
/// use jetworker_cli::{Console, ConsoleSettings};
///
/// let console = Console::bind(js, &config, ConsoleSettings::default()).await?;
/// println!("console on http://{}/", console.local_addr());
/// console.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(()) }
/// ```
///
/// A `Console` is bound to its address, ready to [`serve`](Console::serve).
pub struct Console {
    listener: tokio::net::TcpListener,
    state: Arc<ConsoleState>,
    sampler: Sampler,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("listen", &self.listener.local_addr().ok())
            .field("read_only", &self.state.read_only)
            .field("token", &self.state.token.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Binds `settings.listen` for `config`'s streams, consumers and dead letters. Fails
    /// with [`ConsoleErrorKind::Insecure`] for a non-loopback address without a token
    /// (before binding anything), [`ConsoleErrorKind::Bind`] when the address is taken.
    pub async fn bind(
        js: jetstream::Context,
        config: &Config,
        settings: ConsoleSettings,
    ) -> Result<Console, ConsoleError> {
        check_listen(&settings.listen, settings.token.as_ref())?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|e| {
                ConsoleError::with_source(ConsoleErrorKind::Bind, e)
                    .with_message(format!("listening on {}", settings.listen))
            })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let dlq = Dlq::new(js.clone(), config);
        let every = settings.sample_every.max(Duration::from_millis(200));
        let capacity = (CHART_WINDOW.as_millis() / every.as_millis()).clamp(10, 5000) as usize;
        let history = Arc::new(RwLock::new(History::new(capacity)));
        let wake = Arc::new(Notify::new());
        let sampler = Sampler {
            js,
            config: config.clone(),
            dlq: dlq.as_ref().ok().cloned(),
            history: history.clone(),
            wake: wake.clone(),
            every,
        };
        let state = Arc::new(ConsoleState {
            dlq,
            read_only: settings.read_only,
            token: settings.token,
            sessions: Mutex::new(Sessions::new(256, Duration::from_secs(12 * 3600))),
            history,
            wake,
            cookie_name: format!("jetworker_console_{port}"),
            sample_every: every,
        });
        Ok(Console {
            listener,
            state,
            sampler,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves the page and samples the server until `shutdown` completes; then stops
    /// the sampler and finishes the requests in flight.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ConsoleError> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(self.sampler.run(stop.clone()));
        tracker.close();
        let served = axum::serve(self.listener, routes::router(self.state))
            .with_graceful_shutdown(shutdown)
            .await;
        stop.cancel();
        tracker.wait().await;
        served.map_err(|e| ConsoleError::with_source(ConsoleErrorKind::Serve, e))
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// The `console` subcommand: checks the token rule before connecting, then serves
/// until SIGTERM or SIGINT. Prints `console: http://ADDR/` on stdout once it listens.
pub(crate) async fn run(config: &Config, args: ConsoleArgs) -> ExitCode {
    let env_token = std::env::var(CONSOLE_TOKEN_ENV).ok();
    let token = match ConsoleToken::resolve(args.token_file.as_deref(), env_token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = check_listen(&args.listen, token.as_ref()) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let client = match connect_for_command(config).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let js = jetworker::jetstream(client.clone(), &config.connection);
    let settings = ConsoleSettings {
        listen: args.listen,
        read_only: args.read_only,
        token,
        sample_every: args.sample_every,
    };
    let authenticated = settings.token.is_some();
    let code = match Console::bind(js, config, settings).await {
        Ok(console) => {
            let addr = console.local_addr();
            println!(
                "console: http://{addr}/{}",
                if args.read_only { " (read-only)" } else { "" }
            );
            tracing::info!(listen = %addr, read_only = args.read_only, token = authenticated, "console serving");
            match console.serve(shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    let _ = client.drain().await;
    code
}
