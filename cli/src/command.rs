//! The built-in subcommands (`run`, `check`, `provision`, `status`, `dlq ...`,
//! `permissions`, `console`): their arguments and what each one does, with the exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use jetworker::{App, Config, ConfigErrorKind, RunErrorKind};

use crate::dlq::{self, Dlq, DlqError, DlqErrorKind, Filter, Letter};
use crate::logging::LogFormat;
use crate::status;

/// Exit code for an invalid config (or a consumer naming an unregistered handler).
pub const EXIT_INVALID_CONFIG: u8 = 2;
/// Exit code for a provisioning plan with conflicts.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit code for a runtime failure (server unreachable, request failed), a declined
/// confirmation, or a replay that left dead letters behind.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a command line that cannot be carried out as given: no selection for
/// `dlq replay` / `purge`, an unknown stream or reason, a purge without `--yes` when
/// stdin is not a terminal (clap's own usage errors exit 2 as well).
pub const EXIT_USAGE: u8 = 2;

/// Options shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Path of the config file.
    #[arg(long, short = 'c', global = true, env = "JETWORKER_CONFIG", default_value = jetworker::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, global = true, env = "JETWORKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// The built-in subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Connect, provision, and run every consumer until SIGTERM or SIGINT.
    Run,
    /// Validate the config without a server; exit 2 when it has problems.
    Check,
    /// Create or update the streams and consumers of the config (never deletes).
    Provision {
        /// Print the plan without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Per consumer: pending, ack pending, redelivered, waiting pulls, dead letters;
    /// per stream: messages and bytes.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List, show, replay and purge dead letters.
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Print the publish and subscribe permissions `run` needs for this config, and a
    /// nats-server `permissions {}` block granting exactly those (no server needed).
    Permissions {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Leave out stream and consumer creation (an operator runs `provision`).
        #[arg(long)]
        without_provisioning: bool,
        /// A subject the handlers publish to themselves (repeatable).
        #[arg(long, value_name = "SUBJECT")]
        publish: Vec<String>,
    },
    /// Serve the web console: streams, consumers, charts and dead letters (list, show,
    /// replay, purge) on a page; loopback only unless a token is set.
    Console(crate::console::ConsoleArgs),
}

/// `dlq` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: every header, and the payload decoded with its consumer's
    /// codec when it allows (else as text or hex).
    Show {
        /// Its sequence in the dead-letter stream (the SEQ column of `dlq list`).
        seq: u64,
        /// The dead-letter stream, when the config has several.
        #[arg(long)]
        stream: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their original subject (without the dead-letter headers,
    /// with Jetworker-Replay-Count), then delete them from the dead-letter stream.
    Replay {
        /// One dead letter, by sequence.
        #[arg(conflicts_with_all = ["all", "consumer", "reason", "since", "until"])]
        seq: Option<u64>,
        /// Or every dead letter the filters select.
        #[command(flatten)]
        filter: FilterArgs,
        /// Or every dead letter (of `--stream`, or of every dead-letter stream).
        #[arg(long, conflicts_with_all = ["consumer", "reason", "since", "until"])]
        all: bool,
        /// List what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good (asks first unless --yes).
    Purge {
        /// One dead letter, by sequence.
        #[arg(conflicts_with_all = ["all", "consumer", "reason", "since", "until"])]
        seq: Option<u64>,
        /// Or every dead letter the filters select.
        #[command(flatten)]
        filter: FilterArgs,
        /// Or every dead letter (of `--stream`, or of every dead-letter stream).
        #[arg(long, conflicts_with_all = ["consumer", "reason", "since", "until"])]
        all: bool,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Which dead letters a `dlq` command applies to (the console's selections use the
/// same fields, as JSON).
#[derive(Debug, Clone, Default, Args, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterArgs {
    /// Only this dead-letter stream (needed with SEQ when the config has several).
    #[arg(long)]
    pub stream: Option<String>,
    /// Only dead letters of these consumers (comma separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub consumer: Vec<String>,
    /// Only these reasons: exhausted, permanent, decode, too_large, panic, timeout, abandoned.
    #[arg(long, value_delimiter = ',')]
    pub reason: Vec<String>,
    /// Only dead letters stored at or after this time: RFC 3339 or a duration ago ("1h").
    #[arg(long)]
    pub since: Option<String>,
    /// Only dead letters stored at or before this time: RFC 3339 or a duration ago ("10m").
    #[arg(long)]
    pub until: Option<String>,
}

impl FilterArgs {
    /// The filter these arguments describe, with times relative to now. A value that
    /// cannot be used is an error of kind [`DlqErrorKind::InvalidSelection`] naming the
    /// option.
    pub fn to_filter(&self) -> Result<Filter, DlqError> {
        let now = time::OffsetDateTime::now_utc();
        let option = |name: &str| {
            let name = name.to_string();
            move |e: DlqError| DlqError::with_source(e.kind(), e).with_message(name)
        };
        let reasons = self
            .reason
            .iter()
            .map(|r| dlq::parse_reason(r).map_err(option("--reason")))
            .collect::<Result<Vec<_>, _>>()?;
        let since = self
            .since
            .as_deref()
            .map(|t| dlq::parse_time(t, now).map_err(option("--since")))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|t| dlq::parse_time(t, now).map_err(option("--until")))
            .transpose()?;
        if let (Some(s), Some(u)) = (since, until) {
            if s > u {
                return Err(DlqError::new(DlqErrorKind::InvalidSelection)
                    .with_message("--since is after --until: nothing can match"));
            }
        }
        Ok(Filter {
            stream: self.stream.clone(),
            consumers: self.consumer.clone(),
            reasons,
            since,
            until,
        })
    }
}

/// Loads the config, printing its problems to stderr on failure.
pub fn load_config(global: &GlobalArgs) -> Result<Config, ExitCode> {
    Config::load(&global.config).map_err(|e| {
        eprintln!("{e}");
        match e.kind() {
            ConfigErrorKind::Read | ConfigErrorKind::Parse | ConfigErrorKind::Invalid => {
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        }
    })
}

/// Runs one built-in command for `app` and returns the process exit code.
pub async fn execute<S: Send + Sync + 'static>(
    global: &GlobalArgs,
    command: Command,
    app: App<S>,
) -> ExitCode {
    let config = match load_config(global) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match command {
        Command::Run => match app.run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => match (e.kind(), e.plan()) {
                (RunErrorKind::MissingHandlers | RunErrorKind::NotABatchHandler, _) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_INVALID_CONFIG)
                }
                (RunErrorKind::Conflicts, Some(plan)) => {
                    eprintln!("provisioning has conflicts; nothing was changed and no worker started:\n{plan}");
                    ExitCode::from(EXIT_CONFLICT)
                }
                _ => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            },
        },
        Command::Check => {
            if let Err(e) = app.check(&config) {
                eprintln!("{e}");
                return ExitCode::from(EXIT_INVALID_CONFIG);
            }
            println!(
                "{}: OK ({} stream{}, {} consumer{})",
                global.config.display(),
                config.streams.len(),
                plural(config.streams.len()),
                config.consumers.len(),
                plural(config.consumers.len()),
            );
            print!("{}", connection_sources(&config));
            ExitCode::SUCCESS
        }
        Command::Provision { dry_run } => run_provision(&config, dry_run).await,
        Command::Status { json } => run_status(&config, json).await,
        Command::Dlq { command } => run_dlq(&config, command).await,
        Command::Permissions {
            json,
            without_provisioning,
            publish,
        } => run_permissions(&config, json, without_provisioning, publish),
        Command::Console(args) => crate::console::run(&config, args).await,
    }
}

/// Where each connection setting came from (file, env NAME, context NAME), one per
/// line; never a value. Nothing when every setting is a default.
fn connection_sources(config: &Config) -> String {
    let sources: Vec<(&str, &jetworker::ConfigSource)> = config.connection.sources.iter().collect();
    if sources.is_empty() {
        return String::new();
    }
    let width = sources.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + "connection.".len();
    let mut out = String::from("connection settings from:\n");
    for (key, source) in sources {
        out.push_str(&format!(
            "  {:width$}  {source}\n",
            format!("connection.{key}")
        ));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

async fn run_provision(config: &Config, dry_run: bool) -> ExitCode {
    let client = match jetworker::connect(&config.connection).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let js = jetworker::jetstream(client.clone(), &config.connection);
    let result = jetworker::provision(&client, &js, config, dry_run).await;
    let code = match result {
        Ok(plan) => {
            if dry_run {
                println!("plan (dry run: nothing was changed)");
            } else if plan.has_changes() {
                println!("applied");
            } else {
                println!("nothing to do: everything is unchanged");
            }
            print!("{plan}");
            ExitCode::SUCCESS
        }
        Err(e) => match e.plan() {
            Some(plan) => {
                eprintln!("plan has conflicts: nothing was changed");
                print!("{plan}");
                ExitCode::from(EXIT_CONFLICT)
            }
            None => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    };
    let _ = client.drain().await;
    code
}

/// Prints a value as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot encode the output as JSON: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Connects for a one-shot command; the error (servers redacted) is printed.
pub(crate) async fn connect_for_command(config: &Config) -> Result<async_nats::Client, ExitCode> {
    jetworker::connect(&config.connection).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

async fn run_status(config: &Config, json: bool) -> ExitCode {
    let client = match connect_for_command(config).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let js = jetworker::jetstream(client.clone(), &config.connection);
    let code = match status::collect(&js, config).await {
        Ok(report) if json => print_json(&report),
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    let _ = client.drain().await;
    code
}

fn run_permissions(
    config: &Config,
    json: bool,
    without_provisioning: bool,
    handler_publishes: Vec<String>,
) -> ExitCode {
    use crate::permissions::{Permissions, Scope};
    let scope = Scope {
        without_provisioning,
        handler_publishes,
    };
    let permissions = Permissions::for_worker(config, &scope);
    if json {
        #[derive(serde::Serialize)]
        struct Output<'a> {
            #[serde(flatten)]
            permissions: &'a Permissions,
            server_block: String,
        }
        print_json(&Output {
            permissions: &permissions,
            server_block: permissions.server_block(),
        })
    } else {
        print!("{}", permissions.text());
        ExitCode::SUCCESS
    }
}

fn dlq_error(e: &DlqError) -> ExitCode {
    eprintln!("error: {e}");
    match e.kind() {
        DlqErrorKind::InvalidSelection | DlqErrorKind::NoDeadLetterStream => {
            ExitCode::from(EXIT_USAGE)
        }
        DlqErrorKind::NotFound
        | DlqErrorKind::NotADeadLetter
        | DlqErrorKind::PayloadMissing
        | DlqErrorKind::Request
        | DlqErrorKind::Publish => ExitCode::from(EXIT_FAILURE),
    }
}

/// The dead letters a replay or purge applies to: one by sequence, those the filters
/// select, or all with `--all`. Refuses an empty selection so that a bare
/// `dlq purge` never means "everything".
async fn select(
    dlq: &Dlq,
    seq: Option<u64>,
    filter: &FilterArgs,
    all: bool,
    verb: &str,
) -> Result<Vec<Letter>, ExitCode> {
    let parsed = filter.to_filter().map_err(|e| dlq_error(&e))?;
    if let Some(seq) = seq {
        return dlq
            .get(parsed.stream.as_deref(), seq)
            .await
            .map(|l| vec![l])
            .map_err(|e| dlq_error(&e));
    }
    if !all && !parsed.narrows() {
        eprintln!(
            "error: say which dead letters to {verb}: a SEQ, --consumer / --reason / --since / --until, or --all"
        );
        return Err(ExitCode::from(EXIT_USAGE));
    }
    dlq.list(&parsed).await.map_err(|e| dlq_error(&e))
}

/// "12 dead letters (DLQ: jobs 10, clicks 2)".
fn describe(letters: &[Letter]) -> String {
    let mut per: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for l in letters {
        *per.entry((l.stream.as_str(), l.consumer().unwrap_or("-")))
            .or_default() += 1;
    }
    let parts: Vec<String> = per
        .iter()
        .map(|((stream, consumer), n)| format!("{stream}/{consumer}: {n}"))
        .collect();
    format!(
        "{} dead letter{} ({})",
        letters.len(),
        plural(letters.len()),
        parts.join(", ")
    )
}

/// Who else receives the replays of `letters`: one line per set of other consumers, e.g.
/// "consumers archive, audit also read the original subject of 3 of the 5 selected dead
/// letters: they will handle the replays too".
pub(crate) fn replay_notes(dlq: &Dlq, letters: &[Letter]) -> Vec<String> {
    let mut per: std::collections::BTreeMap<Vec<String>, usize> = Default::default();
    for letter in letters {
        let others = dlq.other_readers(letter);
        if !others.is_empty() {
            *per.entry(others).or_default() += 1;
        }
    }
    per.into_iter()
        .map(|(others, n)| {
            format!(
                "consumer{} {} also read{} the original subject of {n} of the {} selected dead letter{}: {} will handle the replay{} too",
                plural(others.len()),
                others.join(", "),
                if others.len() == 1 { "s" } else { "" },
                letters.len(),
                plural(letters.len()),
                if others.len() == 1 { "it" } else { "they" },
                plural(n),
            )
        })
        .collect()
}

/// Asks on the terminal; true only for "y" or "yes".
async fn confirm(question: &str) -> bool {
    use tokio::io::AsyncBufReadExt;
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    match stdin.read_line(&mut line).await {
        Ok(_) => matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"),
        Err(_) => false,
    }
}

async fn run_dlq(config: &Config, command: DlqCommand) -> ExitCode {
    let client = match connect_for_command(config).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let js = jetworker::jetstream(client.clone(), &config.connection);
    let code = match Dlq::new(js, config) {
        Ok(dlq) => run_dlq_command(&dlq, command).await,
        Err(e) => dlq_error(&e),
    };
    let _ = client.drain().await;
    code
}

async fn run_dlq_command(dlq: &Dlq, command: DlqCommand) -> ExitCode {
    use std::io::IsTerminal;
    match command {
        DlqCommand::List { filter, json } => {
            let filter = match filter.to_filter() {
                Ok(f) => f,
                Err(e) => return dlq_error(&e),
            };
            match dlq.list(&filter).await {
                Ok(letters) => {
                    let summaries: Vec<dlq::Summary> =
                        letters.iter().map(Letter::summary).collect();
                    if json {
                        print_json(&summaries)
                    } else {
                        print!("{}", dlq::list_table(&summaries));
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => dlq_error(&e),
            }
        }
        DlqCommand::Show { seq, stream, json } => match dlq.get(stream.as_deref(), seq).await {
            Ok(letter) => {
                let detail = letter.detail(dlq.codec_of(&letter));
                if json {
                    print_json(&detail)
                } else {
                    print!("{}", detail.text(&letter.payload));
                    ExitCode::SUCCESS
                }
            }
            Err(e) => dlq_error(&e),
        },
        DlqCommand::Replay {
            seq,
            filter,
            all,
            dry_run,
        } => {
            let letters = match select(dlq, seq, &filter, all, "replay").await {
                Ok(l) => l,
                Err(code) => return code,
            };
            for note in replay_notes(dlq, &letters) {
                eprintln!("note: {note}");
            }
            if dry_run {
                let summaries: Vec<dlq::Summary> = letters.iter().map(Letter::summary).collect();
                print!("{}", dlq::list_table(&summaries));
                println!("dry run: nothing was replayed");
                return ExitCode::SUCCESS;
            }
            let report = dlq.replay(&letters).await;
            for r in &report.replayed {
                println!(
                    "replayed {} #{} -> {} ({} #{}{}, replay {})",
                    r.stream,
                    r.sequence,
                    r.subject,
                    r.target_stream,
                    r.target_sequence,
                    if r.duplicate {
                        ", already there: deduplicated"
                    } else {
                        ""
                    },
                    r.replay_count
                );
            }
            for (stream, seq, why) in &report.skipped {
                eprintln!("skipped {stream} #{seq}: {why}");
            }
            println!(
                "{} of {} dead letter{} replayed",
                report.replayed.len(),
                letters.len(),
                plural(letters.len())
            );
            match &report.failed {
                Some(e) => {
                    eprintln!("error: {e}; the remaining dead letters were not touched");
                    ExitCode::from(EXIT_FAILURE)
                }
                None if !report.skipped.is_empty() => ExitCode::from(EXIT_FAILURE),
                None => ExitCode::SUCCESS,
            }
        }
        DlqCommand::Purge {
            seq,
            filter,
            all,
            yes,
        } => {
            let letters = match select(dlq, seq, &filter, all, "purge").await {
                Ok(l) => l,
                Err(code) => return code,
            };
            if letters.is_empty() {
                println!("no dead letters match: nothing to purge");
                return ExitCode::SUCCESS;
            }
            let what = describe(&letters);
            if !yes {
                if !std::io::stdin().is_terminal() {
                    eprintln!(
                        "error: refusing to purge {what} without confirmation: stdin is not a terminal; pass --yes"
                    );
                    return ExitCode::from(EXIT_USAGE);
                }
                if !confirm(&format!("Delete {what} for good?")).await {
                    eprintln!("aborted: nothing was deleted");
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
            match dlq.purge(&letters).await {
                Ok(report) => {
                    println!(
                        "purged {} dead letter{}{}",
                        report.deleted,
                        plural(report.deleted as usize),
                        if report.already_gone > 0 {
                            format!(" ({} already gone)", report.already_gone)
                        } else {
                            String::new()
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => dlq_error(&e),
            }
        }
    }
}
