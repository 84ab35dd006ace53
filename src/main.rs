//! The `taskstream` binary: parses arguments, starts telemetry, loads the configuration and
//! hands over to the library.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Ask the connector running with this configuration for a snapshot reconcile now
    /// (through its metrics endpoint; sending it SIGUSR1 does the same).
    Resnapshot {
        /// Configuration file (TOML); names `metrics.listen`.
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
    Demo(demo::DemoOptions),
    /// Run the SynapTask API simulator (Socket.IO API, job-event API, HTTP ground truth).
    Sim(taskstream_sim::SimConfig),
    /// Show or change the positions a stopped connector resumes from.
    Offsets {
        #[command(subcommand)]
        command: OffsetsCommand,
    },
    /// Run a small Confluent-compatible schema registry (for tests and the demo).
    Registry(taskstream_sim::registry::RegistryOptions),
}

#[derive(Debug, Subcommand)]
enum OffsetsCommand {
    /// Every position: snapshot state, entities, history per scope, job frames.
    Show {
        /// Configuration file (TOML); names `state.path`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Forget positions so that the next run starts them again (refused while a connector runs).
    Reset {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Which source's positions.
        #[arg(long, value_enum, default_value = "synaptask")]
        source: taskstream::offsets::Which,
        /// Only this history scope (`USER:<uid>`, `GRAPH:<root>`).
        #[arg(long)]
        scope: Option<String>,
    },
    /// Set one history position, lower than today's too (history is replayed from there).
    Set {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The history scope.
        #[arg(long)]
        scope: String,
        /// The op id to resume after.
        #[arg(long)]
        op_id: u64,
    },
}

/// The next Ctrl-C or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    tokio::signal::ctrl_c().await.ok();
}

/// Cancels the token on Ctrl-C or SIGTERM, so every task winds down the same way. A second
/// signal exits at once; and if the wind-down outlives `hard_stop` (the drain timeout plus a
/// margin), the process exits anyway, so a supervisor's SIGTERM is always obeyed in bounded time.
fn shutdown_on_signals(hard_stop: Option<Duration>) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutting down (a second signal stops at once)");
        t.cancel();
        if let Some(limit) = hard_stop {
            // A plain thread: it must fire even if the runtime is stuck.
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                eprintln!("taskstream: shutdown took longer than {limit:?}; exiting");
                std::process::exit(1);
            });
        }
        signal().await;
        eprintln!("taskstream: second signal; exiting at once");
        std::process::exit(130);
    });
    token
}

/// SIGUSR1 asks the running connector for a snapshot reconcile.
fn resnapshot_on_sigusr1() {
    #[cfg(unix)]
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            return;
        };
        while usr1.recv().await.is_some() {
            taskstream::health::request_resnapshot();
        }
    });
}

/// `POST /control/resnapshot` to the connector that runs with `cfg` (its metrics endpoint, on
/// loopback when it listens on every interface).
async fn resnapshot(cfg: &taskstream::config::Config) -> Result<String, String> {
    let listen = cfg.metrics.listen.as_deref().ok_or(
        "metrics.listen is unset: the running connector has no control endpoint (send it SIGUSR1 instead)",
    )?;
    let addr = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    let url = format!("http://{addr}/control/resnapshot");
    let response = reqwest::Client::new()
        .post(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("no connector answers at {addr}: {e}"))?;
    if response.status().is_success() {
        Ok(format!(
            "snapshot reconcile requested from the connector at {addr}"
        ))
    } else {
        Err(format!(
            "the connector at {addr} answered {}",
            response.status()
        ))
    }
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("taskstream: {e}");
    ExitCode::from(code)
}

/// Past the drain timeout, how long a shutdown may take before the process exits anyway.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(5);

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed by the snapshot's transient pages goes back to the system at once rather than
/// 10 ms later: with the delay, pages that filled up again before it ran stayed resident, and
/// `bash benches/memory.sh` measured 135-143 MB after a snapshot of 118,000 objects instead of
/// 88 MB (state.cache_mb = 8). An explicit `MIMALLOC_PURGE_DELAY` wins.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's runtime options; any value is valid for this option
        // and mimalloc reads it atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// Transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says otherwise.
/// mimalloc asks for huge pages on its first arena (`madvise(MADV_HUGEPAGE)`, reserved before
/// `main` runs), and the kernel then backs partly used 2 MB ranges whole, and keeps them
/// whole after a purge: `bash benches/memory.sh 500000 500000` peaked at 218 MB with them and
/// 186 MB with `MIMALLOC_ALLOW_THP=0` (16 MB instead of 25 one second after start). mimalloc
/// applies that variable itself with the same `prctl`, but only if it is set before `main`;
/// this makes it the default. The connector's allocations are small objects and short pages,
/// which gain nothing from huge pages.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes one integer flag and touches no memory of ours; on
        // a kernel without it the call fails with EINVAL, which changes nothing.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    without_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e, 1),
    };
    let code = runtime.block_on(async_main(cli));
    // A blocking task still running (a broker client's flush) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn async_main(cli: Cli) -> ExitCode {
    // `run` installs telemetry from its config; every other command logs in the default format.
    if !matches!(cli.command, Command::Run { .. }) {
        taskstream::telemetry::init();
    }
    match cli.command {
        Command::Sim(cfg) => match taskstream_sim::run(cfg, shutdown_on_signals(None)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        },
        Command::Registry(opts) => {
            match taskstream_sim::registry::run(opts, shutdown_on_signals(None)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e, 1),
            }
        }
        Command::Demo(opts) => match demo::run(opts, shutdown_on_signals(None)).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(demo::DemoError::App(e)) => fail(&e, e.exit_code()),
            Err(e) => fail(&e, 1),
        },
        Command::Run { config } => {
            let cfg = match taskstream::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    taskstream::telemetry::init();
                    return fail(&e, 1);
                }
            };
            if let Err(e) = taskstream::telemetry::init_with(&cfg.telemetry) {
                return fail(&e, 1);
            }
            resnapshot_on_sigusr1();
            let hard_stop = Duration::from_secs(cfg.delivery.drain_timeout_secs) + HARD_STOP_MARGIN;
            let shutdown = shutdown_on_signals(Some(hard_stop));
            let result = taskstream::app::run(cfg, Default::default(), shutdown).await;
            // Spans still batched go out before the process ends; off the runtime's threads,
            // since the exporter's HTTP client blocks.
            let _ = tokio::task::spawn_blocking(taskstream::telemetry::shutdown).await;
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Command::Offsets { command } => {
            let path = match &command {
                OffsetsCommand::Show { config, .. }
                | OffsetsCommand::Reset { config, .. }
                | OffsetsCommand::Set { config, .. } => config.clone(),
            };
            let cfg = match taskstream::config::Config::load(path.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e, 1),
            };
            let result = match command {
                OffsetsCommand::Show { json, .. } => taskstream::offsets::show(&cfg, json),
                OffsetsCommand::Reset { source, scope, .. } => {
                    taskstream::offsets::reset(&cfg, source, scope.as_deref())
                }
                OffsetsCommand::Set { scope, op_id, .. } => {
                    taskstream::offsets::set(&cfg, &scope, op_id)
                }
            };
            match result {
                Ok(text) => {
                    println!("{}", text.trim_end());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, 1),
            }
        }
        Command::Resnapshot { config } => {
            let cfg = match taskstream::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e, 1),
            };
            match resnapshot(&cfg).await {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, 1),
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
