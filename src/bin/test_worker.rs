//! A worker binary for process-level tests (signals, kills): the scripted handler of
//! `jetworker_suite`, with every start and finish appended to the file named by
//! `JW_TEST_LOG` as `start <id> <attempt> <consumer>` / `done <id> <attempt> <consumer>`
//! lines; and the `recorded` handler, which writes its starts and ends to a stream.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use jetworker::{App, Context, Event, HandlerError};
use jetworker_suite::{scripted, Job, Probe};

/// The `JW_TEST_LOG` file, opened once for appending (`None` when unset or unopenable).
fn log_file() -> &'static Mutex<Option<File>> {
    static FILE: OnceLock<Mutex<Option<File>>> = OnceLock::new();
    FILE.get_or_init(|| {
        let file = std::env::var_os("JW_TEST_LOG").and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        Mutex::new(file)
    })
}

/// Appends one whole line with a single `write` (no user-space buffer: a `kill -9`
/// loses nothing written). `writeln!` on a `File` would issue the text and the newline
/// as separate writes, and lines of concurrent handlers would interleave.
fn log(line: &str) {
    let mut guard = log_file().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = guard.as_mut() {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

async fn logged(job: Event<Job>, ctx: Context<Arc<Probe>>) -> Result<(), HandlerError> {
    let (id, attempt) = (job.id, ctx.attempt());
    let consumer = ctx.consumer().to_owned();
    log(&format!("start {id} {attempt} {consumer}"));
    let result = scripted(job, ctx).await;
    if result.is_ok() {
        log(&format!("done {id} {attempt} {consumer}"));
    }
    result
}

#[tokio::main]
async fn main() -> ExitCode {
    let app = App::new(Arc::new(Probe::default()))
        .handler("scripted", logged)
        .handler("recorded", jetworker_suite::recorded);
    jetworker_cli::main(app).await
}
