//! Signals: the first SIGTERM or SIGINT starts a graceful shutdown; a second one exits
//! at once.

use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal cuts the graceful shutdown short.
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// Cancels `stop` on the first SIGTERM or SIGINT; exits the process on the second.
pub fn on_signals(stop: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received (send another to exit at once)");
        stop.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
