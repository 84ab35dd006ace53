//! `taskstream demo`: the whole thing in one command with nothing installed. Starts the
//! embedded simulator on free ports and the connector against it, printing records to stdout
//! (or publishing to `--sink kafka://host:port` / `nats://host:port`) until Ctrl-C or
//! `--records N`.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use taskstream::app::{self, AppError, RunOptions, RunSummary};
use taskstream::config::Config;
use taskstream_sim::{self as sim, SimConfig};

/// Options of `taskstream demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Stop after this many records.
    #[arg(long)]
    pub records: Option<u64>,
    /// Publish to `kafka://host:port` or `nats://host:port` (JetStream) instead of stdout.
    #[arg(long)]
    pub sink: Option<String>,
    /// Simulator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated mutations per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Initial nodes in the simulated graph.
    #[arg(long, default_value_t = 200)]
    pub nodes: usize,
    /// Initial links in the simulated graph.
    #[arg(long, default_value_t = 260)]
    pub links: usize,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--sink` is not `kafka://` or `nats://`.
    #[error("--sink must be kafka://host:port or nats://host:port, got {0:?}")]
    Sink(String),
    /// The simulator did not start.
    #[error(transparent)]
    Sim(#[from] sim::SimError),
    /// The token file could not be written.
    #[error("cannot write the demo token file: {0}")]
    Io(#[from] std::io::Error),
    /// The connector failed.
    #[error(transparent)]
    App(#[from] AppError),
}

/// Runs the demo until shutdown or `--records`.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<RunSummary, DemoError> {
    let mut cfg = Config::default();
    match opts.sink.as_deref() {
        None => {}
        Some(s) if s.starts_with("kafka://") => {
            cfg.sinks.stdout.enabled = false;
            cfg.sinks.kafka.enabled = true;
            cfg.sinks.kafka.brokers = s
                .trim_start_matches("kafka://")
                .trim_end_matches('/')
                .to_string();
            cfg.sinks.kafka.create_topics = true;
        }
        Some(s) if s.starts_with("nats://") => {
            cfg.sinks.stdout.enabled = false;
            cfg.sinks.nats.enabled = true;
            cfg.sinks.nats.url = s.to_string();
        }
        Some(other) => return Err(DemoError::Sink(other.to_string())),
    }
    let sim_stop = shutdown.child_token();
    let handle = sim::start(
        SimConfig {
            seed: opts.seed,
            rate: opts.rate,
            nodes: opts.nodes,
            links: opts.links,
            ..SimConfig::default()
        },
        sim_stop.clone(),
    )
    .await?;
    // The demo token is the simulator's public default; it still travels the way a real one
    // does, through a file, so the demo exercises the same path.
    let token_file = token_file_path();
    let token = sim::DEFAULT_TOKENS.split(':').next().unwrap_or_default();
    std::fs::write(&token_file, token)?;
    cfg.source.url = handle.url();
    cfg.source.token_env = String::new();
    cfg.source.token_file = Some(token_file.clone());
    eprintln!(
        "taskstream demo: simulator on {} (job API on port {}), records to {}",
        handle.url(),
        handle.jobs_port,
        opts.sink.as_deref().unwrap_or("stdout")
    );
    let result = app::run(
        cfg,
        RunOptions {
            max_records: opts.records,
            ..RunOptions::default()
        },
        shutdown.clone(),
    )
    .await;
    let _ = std::fs::remove_file(&token_file);
    sim_stop.cancel();
    handle.join().await;
    let summary = result?;
    eprintln!(
        "taskstream demo: {} records ({} dead letters)",
        summary.records, summary.dead_letters
    );
    Ok(summary)
}

fn token_file_path() -> PathBuf {
    std::env::temp_dir().join(format!("taskstream-demo-{}.token", std::process::id()))
}
