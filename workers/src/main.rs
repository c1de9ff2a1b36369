//! `workers`: the real-time analytics platform's binary. Everything lives in the library
//! (`workers::commands`); see `workers --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    workers::commands::cli().main().await
}
