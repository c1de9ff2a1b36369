//! A worker binary for process-level tests (signals, kills): the scripted handler of
//! `jetworker_suite`, with every start and finish appended to the file named by
//! `JW_TEST_LOG` as `start <id> <attempt>` / `done <id> <attempt>` lines.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use jetworker::{App, Context, Event, HandlerError};
use jetworker_suite::{scripted, Job, Probe};

fn log(line: &str) {
    if let Ok(path) = std::env::var("JW_TEST_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

async fn logged(job: Event<Job>, ctx: Context<Arc<Probe>>) -> Result<(), HandlerError> {
    let (id, attempt) = (job.id, ctx.attempt());
    log(&format!("start {id} {attempt}"));
    let result = scripted(job, ctx).await;
    if result.is_ok() {
        log(&format!("done {id} {attempt}"));
    }
    result
}

#[tokio::main]
async fn main() -> ExitCode {
    let app = App::new(Arc::new(Probe::default())).handler("scripted", logged);
    jetworker::cli::main(app).await
}
