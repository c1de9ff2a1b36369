//! [`Cli`]: the command line a worker binary builds: the built-in subcommands, the
//! binary's own name, version and about text, and commands of its own.

use std::ffi::OsString;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use jetworker::{App, Config};

use crate::command::{self, Command, GlobalArgs, EXIT_FAILURE};
use crate::logging::{init_logging, LogFormat};

/// The command line of a binary with only the built-in subcommands: parses it, sets up
/// logging and runs the command with `app`. A worker's whole `main`.
pub async fn main<S: Send + Sync + 'static>(app: App<S>) -> ExitCode {
    Cli::new(app).main().await
}

/// What a binary's own command is given: the shared options and the app.
pub struct Invocation<S> {
    /// `--config`, `--log-format` (logging is already set up from them).
    pub global: GlobalArgs,
    /// The app the binary was built with: its handlers and state.
    pub app: App<S>,
}

impl<S: Send + Sync + 'static> std::fmt::Debug for Invocation<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation")
            .field("global", &self.global)
            .field("handlers", &self.app.handler_names())
            .finish_non_exhaustive()
    }
}

impl<S> Invocation<S> {
    /// Loads the config named by `--config`; its problems are printed to stderr and the
    /// error is the exit code the built-in commands use for them.
    pub fn load_config(&self) -> Result<Config, ExitCode> {
        command::load_config(&self.global)
    }
}

/// A binary without commands of its own: no subcommand parses into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCommands {}

impl FromArgMatches for NoCommands {
    fn from_arg_matches(_: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand))
    }

    fn update_from_arg_matches(&mut self, _: &clap::ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl Subcommand for NoCommands {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn has_subcommand(_: &str) -> bool {
        false
    }
}

/// The built-in part of every command line.
#[derive(Debug, Parser)]
struct Builtin {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

type LoggingFn<E> = Box<dyn FnOnce(LogFormat, Option<&E>) + Send>;

type OwnCommandFn<S, E> =
    Box<dyn FnOnce(E, Invocation<S>) -> Pin<Box<dyn Future<Output = ExitCode> + Send>> + Send>;

/// A worker binary's command line, built step by step; [`Cli::main`] runs it.
///
/// Without [`Cli::name`] the binary is named after its file; without [`Cli::version`],
/// `--version` prints the jetworker version it was built with.
pub struct Cli<S, E = NoCommands> {
    app: App<S>,
    name: Option<String>,
    version: Option<String>,
    about: Option<String>,
    own: Option<OwnCommandFn<S, E>>,
    logging: Option<LoggingFn<E>>,
}

impl<S, E> std::fmt::Debug for Cli<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("about", &self.about)
            .field("own_commands", &self.own.is_some())
            .field("own_logging", &self.logging.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync + 'static> Cli<S, NoCommands> {
    /// The built-in subcommands, run with `app`.
    pub fn new(app: App<S>) -> Self {
        Cli {
            app,
            name: None,
            version: None,
            about: None,
            own: None,
            logging: None,
        }
    }

    /// Adds the binary's own subcommands (a `clap::Subcommand` enum) next to the built-in
    /// ones, and the function that runs them. A name that clashes with a built-in
    /// subcommand is refused when the binary starts.
    pub fn commands<E, F, Fut>(self, run: F) -> Cli<S, E>
    where
        E: Subcommand + Send + 'static,
        F: FnOnce(E, Invocation<S>) -> Fut + Send + 'static,
        Fut: Future<Output = ExitCode> + Send + 'static,
    {
        Cli {
            app: self.app,
            name: self.name,
            version: self.version,
            about: self.about,
            own: Some(Box::new(move |command, invocation| {
                Box::pin(run(command, invocation))
            })),
            logging: None,
        }
    }
}

impl<S: Send + Sync + 'static, E: Subcommand + Send + 'static> Cli<S, E> {
    /// The binary's name in `--help`, `--version` and usage lines.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// What `--version` prints after the name (e.g. `env!("CARGO_PKG_VERSION")`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The one-paragraph description at the top of `--help`.
    pub fn about(mut self, about: impl Into<String>) -> Self {
        self.about = Some(about.into());
        self
    }

    /// Sets up logging in place of [`init_logging`](crate::init_logging): given the
    /// `--log-format` and, when one of the binary's own commands runs, that command
    /// (e.g. a long-running demo that logs only warnings).
    pub fn init_logging<F>(mut self, init: F) -> Self
    where
        F: FnOnce(LogFormat, Option<&E>) + Send + 'static,
    {
        self.logging = Some(Box::new(init));
        self
    }

    /// The whole command line as clap sees it (for completions, man pages or tests).
    pub fn command(&self) -> clap::Command {
        let name = self.name.clone().unwrap_or_else(binary_name);
        let version = self
            .version
            .clone()
            .unwrap_or_else(|| format!("(jetworker {})", env!("CARGO_PKG_VERSION")));
        let cmd = E::augment_subcommands(Builtin::command())
            .name(name.clone())
            .bin_name(name)
            .version(version);
        match &self.about {
            Some(about) => cmd.about(about.clone()),
            None => cmd.about(None::<&str>),
        }
    }

    /// Parses the process's arguments, sets up logging and runs the command.
    pub async fn main(self) -> ExitCode {
        self.run_from(std::env::args_os()).await
    }

    /// Like [`Cli::main`] with the given arguments (the first is the binary's name).
    /// `--help`, `--version` and usage errors are printed here; the exit code is clap's.
    pub async fn run_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        if let Some(clash) = clashing_command::<E>() {
            eprintln!(
                "error: this binary's own command `{clash}` has the name of a built-in jetworker command; rename it"
            );
            return ExitCode::from(EXIT_FAILURE);
        }
        let matches = match self.command().try_get_matches_from(args) {
            Ok(m) => m,
            Err(e) => return usage_error(&e),
        };
        let parsed = GlobalArgs::from_arg_matches(&matches).and_then(|global| {
            let builtin = matches
                .subcommand_name()
                .is_some_and(Command::has_subcommand);
            let which = if builtin {
                Which::Builtin(Command::from_arg_matches(&matches)?)
            } else {
                Which::Own(E::from_arg_matches(&matches)?)
            };
            Ok((global, which))
        });
        let (global, which) = match parsed {
            Ok(p) => p,
            Err(e) => return usage_error(&e),
        };
        match (self.logging, &which) {
            (Some(init), Which::Own(own)) => init(global.log_format, Some(own)),
            (Some(init), Which::Builtin(_)) => init(global.log_format, None),
            (None, _) => init_logging(global.log_format),
        }
        match which {
            Which::Builtin(command) => command::execute(&global, command, self.app).await,
            Which::Own(command) => match self.own {
                Some(run) => {
                    run(
                        command,
                        Invocation {
                            global,
                            app: self.app,
                        },
                    )
                    .await
                }
                None => ExitCode::from(EXIT_FAILURE),
            },
        }
    }
}

enum Which<E> {
    Builtin(Command),
    Own(E),
}

/// Prints clap's message (usage error, `--help`, `--version`); its exit code.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_FAILURE))
}

/// The first of `E`'s subcommand names that is also a built-in one.
fn clashing_command<E: Subcommand>() -> Option<String> {
    let own = E::augment_subcommands(clap::Command::new("own"));
    let names: Vec<String> = own
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    names.into_iter().find(|name| Command::has_subcommand(name))
}

/// The file name the process was started as, or "jetworker".
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg| {
            std::path::Path::new(&arg)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "jetworker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Subcommand)]
    enum Own {
        /// An own command.
        Hello {
            /// Whom to greet.
            #[arg(long)]
            name: String,
        },
    }

    #[derive(Debug, Subcommand)]
    enum Clashing {
        /// Has a built-in name.
        Status,
    }

    #[test]
    fn own_name_version_and_commands_next_to_the_builtin_ones() {
        let cli = Cli::new(App::new(()))
            .name("orders")
            .version("9.9.9")
            .about("Order workers")
            .commands(|_: Own, _| async { ExitCode::SUCCESS });
        let cmd = cli.command();
        assert_eq!(cmd.get_name(), "orders");
        assert_eq!(cmd.get_version(), Some("9.9.9"));
        let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
        for expected in [
            "run",
            "check",
            "provision",
            "status",
            "dlq",
            "permissions",
            "console",
            "hello",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(cmd.clone().render_version().contains("orders 9.9.9"));
    }

    #[tokio::test]
    async fn an_own_command_gets_its_arguments_and_the_global_options() {
        let (tx, rx) = std::sync::mpsc::channel();
        let code = Cli::new(App::new(()))
            .commands(move |command: Own, invocation: Invocation<()>| async move {
                let Own::Hello { name } = command;
                let _ = tx.send((name, invocation.global.config));
                ExitCode::from(7)
            })
            .run_from(["bin", "--config", "x.toml", "hello", "--name", "ada"])
            .await;
        assert_eq!(code, ExitCode::from(7));
        let (name, config) = rx.recv().unwrap_or_default();
        assert_eq!(name, "ada");
        assert_eq!(config, std::path::PathBuf::from("x.toml"));
    }

    #[test]
    fn a_command_named_like_a_builtin_one_is_found() {
        assert_eq!(clashing_command::<Clashing>().as_deref(), Some("status"));
        assert_eq!(clashing_command::<Own>(), None);
        assert_eq!(clashing_command::<NoCommands>(), None);
    }
}
