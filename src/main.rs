//! The `taskstream` binary: parses arguments, starts telemetry and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Streams a live SynapTask task graph into Kafka and NATS as versioned change records.
#[derive(Debug, Parser)]
#[command(name = "taskstream", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the SynapTask API simulator (Socket.IO API, job-event API, HTTP ground truth).
    Sim(taskstream::sim::SimConfig),
}

/// Cancels the token on Ctrl-C or SIGTERM, so every task winds down the same way.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        ctrl_c.await.ok();
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        ctrl_c.await.ok();
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    taskstream::telemetry::init();
    let shutdown = shutdown_on_signals();
    let result: anyhow::Result<()> = match cli.command {
        Command::Sim(cfg) => taskstream::sim::run(cfg, shutdown)
            .await
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}
