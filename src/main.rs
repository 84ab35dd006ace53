//! The `taskstream` binary: parses arguments, starts telemetry, loads the configuration and
//! hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

// Records are built from many small allocations (entity maps); glibc's allocator spent about
// 40% of the connector's CPU in malloc/free/consolidation in the e2e benchmark.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams a live SynapTask task graph into Kafka and NATS as versioned change records.
#[derive(Debug, Parser)]
#[command(name = "taskstream", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the connector.
    Run {
        /// Configuration file (TOML); `TASKSTREAM__SECTION__KEY` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and connect once to each source and sink.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The embedded simulator plus the connector, printing records (nothing to install).
    Demo(taskstream::demo::DemoOptions),
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
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    ctrl_c.await.ok();
                }
            }
        }
        #[cfg(not(unix))]
        ctrl_c.await.ok();
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("taskstream: {e}");
    ExitCode::from(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    taskstream::telemetry::init();
    let shutdown = shutdown_on_signals();
    match cli.command {
        Command::Sim(cfg) => match taskstream::sim::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        },
        Command::Demo(opts) => match taskstream::demo::run(opts, shutdown).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(taskstream::demo::DemoError::App(e)) => fail(&e, e.exit_code()),
            Err(e) => fail(&e, 1),
        },
        Command::Run { config } => {
            let cfg = match taskstream::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e, 1),
            };
            match taskstream::app::run(cfg, Default::default(), shutdown).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Command::Check { config } => {
            let cfg = match taskstream::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e, 1),
            };
            let (findings, error) = taskstream::check::check(&cfg).await;
            for f in &findings {
                println!(
                    "{} {:<12} {}",
                    if f.ok { "ok  " } else { "FAIL" },
                    f.what,
                    f.detail
                );
            }
            match error {
                None => ExitCode::SUCCESS,
                Some(e) => ExitCode::from(e.exit_code()),
            }
        }
    }
}
