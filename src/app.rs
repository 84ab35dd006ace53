//! The connector: wires sources → normaliser → encoder → delivery window → sinks, owns the
//! working view and shutdown. `run` is what `taskstream run` and `taskstream demo` call.
//!
//! One task applies source events in order, so the view, record ids and checkpoint ops stay
//! consistent without locks; the sources and the metrics endpoint run beside it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::{Delivery, DeliveryConfig, DeliveryError};
use crate::encode::json::JsonEncoder;
use crate::encode::{to_messages, EncodeError, Encoder};
use crate::metrics::{inc, metrics};
use crate::normalize::{self, Ctx, Group, Outcome, View};
use crate::record::{Origin, TraceContext};
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::stdout::StdoutSink;
use crate::sink::{Sink, SinkError};
use crate::source::jobs::JobsSource;
use crate::source::synaptask::SynapTaskSource;
use crate::source::{Control, Source, SourceError, SourceEvent};
use crate::state::redb_store::RedbStore;
use crate::state::{CheckpointStore, MemoryStore, StateError};

/// Why the connector stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A source failed for good (authentication, configuration).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A sink could not be built or failed fatally.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Delivery failed fatally.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The checkpoint store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A record could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The metrics endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {message}")]
    Metrics {
        /// Address.
        addr: String,
        /// Cause.
        message: String,
    },
}

impl AppError {
    /// The process exit code: 2 for a refused token, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Source(SourceError::Auth { .. }) => 2,
            _ => 1,
        }
    }

    /// Every error that stops the connector is fatal; retryable ones are retried where they occur.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Options that are not configuration: how long a run lasts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this many records (the demo's `--records`).
    pub max_records: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Records produced.
    pub records: u64,
    /// Records that were dead letters.
    pub dead_letters: u64,
}

/// Builds every enabled sink.
pub fn build_sinks(cfg: &Config) -> Result<Vec<Arc<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if cfg.sinks.stdout.enabled {
        sinks.push(Arc::new(StdoutSink::new(&cfg.sinks.stdout)?));
    }
    if cfg.sinks.kafka.enabled {
        sinks.push(Arc::new(KafkaSink::new(&cfg.sinks.kafka)?));
    }
    if cfg.sinks.nats.enabled {
        sinks.push(Arc::new(NatsSink::new(&cfg.sinks.nats)?));
    }
    Ok(sinks)
}

/// Opens the checkpoint store the config names (memory when no path).
pub fn open_store(cfg: &Config) -> Result<Box<dyn CheckpointStore>, StateError> {
    Ok(match cfg.state_path() {
        Some(p) => Box::new(RedbStore::open(p)?),
        None => Box::new(MemoryStore::default()),
    })
}

/// Prepares a sink, retrying while the broker is unreachable (a container may start before it).
async fn prepare(sink: &Arc<dyn Sink>, shutdown: &CancellationToken) -> Result<bool, SinkError> {
    let mut delay = Duration::from_millis(250);
    loop {
        match sink.prepare().await {
            Ok(desc) => {
                tracing::info!(sink = sink.name(), "{desc}");
                return Ok(true);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(sink = sink.name(), error = %e, "sink not ready; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Serves `/metrics` and `/health` until shutdown.
async fn serve_metrics(addr: &str, shutdown: CancellationToken) -> Result<(), AppError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Metrics {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async { metrics().render() }),
        )
        .route(
            "/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        );
    tracing::info!(%addr, "metrics endpoint up");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

/// The single task that applies source events in order.
struct Pipeline {
    view: View,
    ctx: Ctx,
    delivery: Delivery,
    encoder: Box<dyn Encoder>,
    control: mpsc::Sender<Control>,
    reconcile_pending: bool,
    summary: RunSummary,
    max_records: Option<u64>,
}

impl Pipeline {
    fn done(&self) -> bool {
        self.max_records.is_some_and(|m| self.summary.records >= m)
    }

    async fn submit(&mut self, group: Group) -> Result<(), AppError> {
        if self.done() {
            return Ok(());
        }
        let messages = to_messages(&group, self.encoder.as_ref())?;
        self.summary.records += group.records.len() as u64;
        metrics().records_total.fetch_add(
            group.records.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.delivery.submit(messages, group.ops).await?;
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        event: &str,
        raw: &[u8],
        reason: &str,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        inc(&metrics().dead_letters_total);
        self.summary.dead_letters += 1;
        tracing::warn!(event, %reason, bytes = raw.len(), trace_id = %trace.trace_id, "bad input sent to the dead-letter route");
        let group = normalize::dead_letter(&self.ctx, event, raw, reason, trace);
        self.submit(group).await
    }

    async fn outcome(
        &mut self,
        o: Outcome,
        event: &str,
        covered: bool,
        raw: impl FnOnce() -> Vec<u8>,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        match o {
            Outcome::Changed(g) => self.submit(g).await,
            Outcome::Stale => {
                inc(&metrics().stale_changes_total);
                Ok(())
            }
            Outcome::NeedsSnapshot if covered => {
                // The snapshot after it did not list the entity: it was purged since.
                inc(&metrics().stale_changes_total);
                Ok(())
            }
            Outcome::NeedsSnapshot => {
                if !self.reconcile_pending {
                    self.reconcile_pending = true;
                    let _ = self.control.try_send(Control::Reconcile {
                        reason: "a diff changed an entity never seen in full".into(),
                    });
                }
                Ok(())
            }
            Outcome::Invalid(reason) => self.dead_letter(event, &raw(), &reason, trace).await,
        }
    }

    async fn handle(&mut self, ev: SourceEvent) -> Result<(), AppError> {
        self.ctx.now = crate::record::now_rfc3339();
        match ev {
            SourceEvent::Session { source_uri } => self.ctx.source = source_uri,
            SourceEvent::SnapshotPage { items, trace } => {
                for (kind, entity) in items {
                    let o = normalize::apply_entity(
                        &mut self.view,
                        &self.ctx,
                        kind,
                        &entity,
                        Origin::Snapshot,
                        &trace,
                    );
                    self.outcome(
                        o,
                        "graph:get",
                        true,
                        || Value::Object(entity.clone()).to_string().into_bytes(),
                        &trace,
                    )
                    .await?;
                }
            }
            SourceEvent::SnapshotDone { seen, trash, trace } => {
                let groups = normalize::missing_after_snapshot(
                    &mut self.view,
                    &self.ctx,
                    &seen,
                    trash.as_ref(),
                    &trace,
                );
                for g in groups {
                    self.submit(g).await?;
                }
                self.reconcile_pending = false;
                self.delivery
                    .submit(
                        Vec::new(),
                        vec![crate::state::CheckpointOp::SnapshotComplete],
                    )
                    .await?;
                tracing::info!(entities = self.view.len(), "snapshot merged");
            }
            SourceEvent::Diff {
                payload,
                covered,
                trace,
            } => match normalize::diff_entries(&payload) {
                Err(reason) => {
                    self.dead_letter(
                        "graph:diff",
                        payload.to_string().as_bytes(),
                        &reason,
                        &trace,
                    )
                    .await?
                }
                Ok((entries, bad)) => {
                    for reason in bad {
                        self.dead_letter(
                            "graph:diff",
                            payload.to_string().as_bytes(),
                            &reason,
                            &trace,
                        )
                        .await?;
                    }
                    for (kind, entity) in entries {
                        let o = normalize::apply_entity(
                            &mut self.view,
                            &self.ctx,
                            kind,
                            &entity,
                            Origin::Diff,
                            &trace,
                        );
                        self.outcome(
                            o,
                            "graph:diff",
                            covered,
                            || Value::Object(entity.clone()).to_string().into_bytes(),
                            &trace,
                        )
                        .await?;
                    }
                }
            },
            SourceEvent::Job {
                client_id,
                index,
                frame,
            } => {
                let g = normalize::job_frame(
                    &self.ctx,
                    &client_id,
                    index,
                    frame,
                    &TraceContext::new_root(),
                );
                self.submit(g).await?;
            }
            SourceEvent::Malformed { event, raw, reason } => {
                self.dead_letter(&event, &raw, &reason, &TraceContext::new_root())
                    .await?;
            }
        }
        Ok(())
    }
}

/// What a finished source task means for the run: its own error, or a panic as an error.
fn source_outcome(
    joined: Result<Result<(), SourceError>, tokio::task::JoinError>,
) -> Result<(), SourceError> {
    joined.unwrap_or_else(|e| Err(SourceError::Config(format!("source task failed: {e}"))))
}

/// Runs the connector until `shutdown` fires, a fatal error, or `opts.max_records`.
pub async fn run(
    cfg: Config,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, AppError> {
    let store = open_store(&cfg)?;
    let sinks = build_sinks(&cfg)?;
    // Built before waiting on brokers, so a missing token fails at once.
    let source = SynapTaskSource::new(cfg.source.clone())?;
    if let Some(addr) = &cfg.metrics.listen {
        serve_metrics(addr, shutdown.clone()).await?;
    }
    for s in &sinks {
        if !prepare(s, &shutdown).await? {
            return Ok(RunSummary::default());
        }
    }
    let delivery = Delivery::new(
        sinks.clone(),
        store,
        DeliveryConfig {
            max_in_flight: cfg.delivery.max_in_flight,
            max_batch: cfg.delivery.max_batch,
        },
    )?;
    let checkpoint = delivery.checkpoint();
    tracing::info!(
        entities = checkpoint.entities.len(),
        snapshot_complete = checkpoint.snapshot_complete,
        "checkpoint loaded"
    );
    let view = View::from_checkpoint(checkpoint);
    let jobs = if cfg.jobs.enabled {
        let delivered = checkpoint
            .jobs
            .get(&cfg.jobs.client_id)
            .copied()
            .unwrap_or(0);
        Some(JobsSource::new(cfg.jobs.clone(), delivered)?)
    } else {
        None
    };
    // Small: the sources hold their own buffers; this only decouples them from the pipeline.
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(256);
    let (control_tx, control_rx) = mpsc::channel::<Control>(4);
    let sources_stop = shutdown.child_token();
    let mut source_task =
        tokio::spawn(Box::new(source).run(tx.clone(), control_rx, sources_stop.clone()));
    let mut jobs_task = jobs.map(|j| {
        let (_unused_tx, unused_rx) = mpsc::channel(1);
        tokio::spawn(Box::new(j).run(tx.clone(), unused_rx, sources_stop.clone()))
    });
    drop(tx);

    let mut p = Pipeline {
        view,
        ctx: Ctx {
            source: format!("synaptask://{}/users/unknown", cfg.source.host()),
            now: String::new(),
        },
        delivery,
        encoder: Box::new(JsonEncoder),
        control: control_tx,
        reconcile_pending: false,
        summary: RunSummary::default(),
        max_records: opts.max_records,
    };

    // Set once a source task has ended on its own (its result already handled).
    let mut source_done = false;
    let mut jobs_done = jobs_task.is_none();
    let result: Result<(), AppError> = async {
        loop {
            if p.done() || shutdown.is_cancelled() {
                break;
            }
            // Unbiased: a steady stream of acks must not starve input, nor input the acks.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = p.delivery.next_ack(), if p.delivery.in_flight() > 0 => { r?; }
                ev = rx.recv() => match ev {
                    Some(ev) => p.handle(ev).await?,
                    None => break,
                },
                r = &mut source_task, if !source_done => {
                    source_done = true;
                    source_outcome(r)?;
                }
                r = async { match jobs_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } }, if !jobs_done => {
                    jobs_done = true;
                    source_outcome(r)?;
                }
            }
        }
        Ok(())
    }
    .await;

    // A closed channel without shutdown means the source ended, perhaps with an error that
    // must win (a refused token exits 2); its task finishes right after dropping the channel.
    let result = match result {
        Ok(()) if !source_done && !shutdown.is_cancelled() && !p.done() => {
            match tokio::time::timeout(Duration::from_secs(5), &mut source_task).await {
                Ok(joined) => {
                    source_done = true;
                    source_outcome(joined).map_err(AppError::from)
                }
                Err(_) => Ok(()),
            }
        }
        r => r,
    };
    sources_stop.cancel();
    let drain = Duration::from_secs(cfg.delivery.drain_timeout_secs);
    let drained = match &result {
        Ok(()) => tokio::time::timeout(drain, p.delivery.drain()).await,
        // A fatal error leaves in flight what was in flight; the checkpoint says what was delivered.
        Err(_) => Ok(Ok(())),
    };
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "drain failed"),
        Err(_) => tracing::warn!(
            in_flight = p.delivery.in_flight(),
            "drain timed out; undelivered records will be sent again after restart"
        ),
    }
    for s in &sinks {
        if let Err(e) = s.flush().await {
            tracing::warn!(sink = s.name(), error = %e, "flush failed");
        }
    }
    if !source_done {
        source_task.abort();
    }
    if let (Some(j), false) = (jobs_task, jobs_done) {
        j.abort();
    }
    result?;
    tracing::info!(
        records = p.summary.records,
        dead_letters = p.summary.dead_letters,
        "stopped"
    );
    Ok(p.summary)
}
