//! The connector: wires sources → normaliser → encoder → delivery window → sinks, owns the
//! working view and shutdown. `run` is what `taskstream run` and `taskstream demo` call.
//!
//! One task applies source events in order, so the view, record ids and checkpoint ops stay
//! consistent without locks; the sources and the metrics endpoint run beside it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::BodyFormat;
use crate::config::Config;
use crate::delivery::{Delivery, DeliveryConfig, DeliveryError};
use crate::encode::avro::AvroEncoder;
use crate::encode::json::JsonEncoder;
use crate::encode::registry::{self, Registry, RegistryError, SubjectStrategy};
use crate::encode::{to_messages_with, EncodeError, Encoder};
use crate::metrics::{inc, metrics};
use crate::normalize::history::RecentIds;
use crate::normalize::{self, Ctx, Group, Outcome, View};
use crate::record::{Body, EntityKind, Origin, TraceContext};
use crate::sink::{Sink, SinkError};
use crate::source::jobs::{JobFrame, JobsSource, Spool};
use crate::source::synaptask::{GraphEvent, SynapTaskSource};
use crate::source::{Control, Source, SourceError, SourceEvent};
use crate::state::journal::Journal;
use crate::state::redb_store::RedbStore;
use crate::state::{CheckpointOp, CheckpointStore, MemoryStore, StateError};
use crate::telemetry::{EventSpan, RecordSpan};
use tracing::Instrument as _;

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
    /// The schema registry could not give the Avro schema ids at start.
    #[error(transparent)]
    Registry(#[from] RegistryError),
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
    /// Told of each message once every sink acknowledged it (the latency benchmark).
    pub on_acked: Option<crate::delivery::AckObserver>,
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
    cfg.sinks
        .enabled()
        .map(|s| s.build(cfg.format_of(s)))
        .collect()
}

/// The registry subjects the enabled Avro sinks publish to, with their writer schemas.
pub fn avro_needs(cfg: &Config) -> Vec<registry::Need> {
    let strategy = cfg.schema_registry.subject_strategy;
    let mut needs: Vec<registry::Need> = Vec::new();
    for sink in cfg
        .sinks
        .enabled()
        .filter(|s| cfg.format_of(*s) == BodyFormat::Avro)
    {
        let name = |r| sink.route_name(r).unwrap_or_default();
        for need in registry::needs(strategy, name) {
            if !needs.contains(&need) {
                needs.push(need);
            }
        }
        if sink.keyed() && cfg.schema_registry.key_format == registry::KeyFormat::Avro {
            for route in crate::encode::avro::ROUTES {
                needs.push(registry::Need {
                    subject: format!("{}-key", sink.route_name(route).unwrap_or_default()),
                    writer: crate::encode::avro::Writer::Key,
                });
            }
        }
    }
    needs
}

/// The Avro encoder when an enabled sink writes Avro: every schema registered (or looked up)
/// under the subjects the Avro sinks publish to. `None` when every sink writes JSON.
pub async fn build_avro(cfg: &Config) -> Result<Option<Arc<AvroEncoder>>, AppError> {
    if !cfg.avro_needed() {
        return Ok(None);
    }
    let reg_cfg = &cfg.schema_registry;
    let registry = Registry::new(reg_cfg)?;
    let strategy = reg_cfg.subject_strategy;
    let needs = avro_needs(cfg);
    let ids = registry.prepare(&needs, reg_cfg.auto_register).await?;
    tracing::info!(
        registry = registry.url(),
        subjects = needs.len(),
        auto_register = reg_cfg.auto_register,
        "Avro schemas registered"
    );
    let encoder = AvroEncoder::new(strategy == SubjectStrategy::Topic, ids).map_err(|message| {
        EncodeError {
            id: "(schemas)".into(),
            message,
        }
    })?;
    Ok(Some(Arc::new(encoder)))
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
    let mut delays = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
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
                    _ = tokio::time::sleep(delays.next_delay()) => {}
                }
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
    let live = || async { axum::Json(serde_json::json!({"live": true})) };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics().render(),
                )
            }),
        )
        .route(
            "/control/resnapshot",
            axum::routing::post(|| async {
                crate::health::request_resnapshot();
                (
                    axum::http::StatusCode::ACCEPTED,
                    axum::Json(serde_json::json!({"resnapshot": "requested"})),
                )
            }),
        )
        .route("/health", axum::routing::get(live))
        .route("/health/live", axum::routing::get(live))
        .route(
            "/health/ready",
            axum::routing::get(|| async {
                let (ready, components) = crate::health::health().report();
                let code = if ready {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    code,
                    axum::Json(serde_json::json!({"ready": ready, "components": components})),
                )
            }),
        );
    tracing::info!(%addr, "metrics endpoint up");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

/// Time given at shutdown, past the drain timeout, to a commit and the sinks' flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Bytes of live diffs held at most for entities not known yet (see [`Pipeline::hold`]).
const PENDING_BYTES: usize = 16 * 1024 * 1024;

/// Status record ids remembered, so history does not publish again what a live diff did.
const RECENT_STATUS_IDS: usize = 200_000;

/// A live diff entry held until the entity it changes is known, or until history filled in
/// the versions it skips.
struct Held {
    kind: EntityKind,
    entity: Map<String, Value>,
    trace: TraceContext,
    bytes: usize,
    /// Catch-ups it was tried after.
    tries: u8,
}

/// A gap announced by the source, published once the snapshot that reconciles it is done.
struct PendingGap {
    scope: String,
    from_op_id: u64,
    oldest_available_op_id: Option<u64>,
    reason: String,
}

/// The pipeline's input: the sources' channel, and the events taken out of it but set aside
/// while live diffs went ahead of a long history page ([`Pipeline::let_live_diffs_ahead`]).
struct Inbox {
    rx: mpsc::Receiver<SourceEvent>,
    /// Set aside, in arrival order: handled before anything newer from the channel.
    stash: VecDeque<SourceEvent>,
}

impl Inbox {
    /// The next event. Cancel-safe: the stash is taken from without waiting, and
    /// `mpsc::Receiver::recv` is cancel-safe.
    async fn recv(&mut self) -> Option<SourceEvent> {
        if let Some(ev) = self.stash.pop_front() {
            return Some(ev);
        }
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    fn try_recv(&mut self) -> Option<SourceEvent> {
        self.stash.pop_front().or_else(|| self.rx.try_recv().ok())
    }

    /// The next waiting event if it is a live diff and nothing was set aside before it; any
    /// other event is set aside (and from then on everything waits its turn, so only diffs ever
    /// go ahead, and only of what they overtook in the channel).
    fn live_diff(&mut self) -> Option<SourceEvent> {
        if !self.stash.is_empty() {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev @ SourceEvent::Graph(GraphEvent::Diff { .. })) => Some(ev),
            Ok(other) => {
                self.stash.push_back(other);
                None
            }
            Err(_) => None,
        }
    }
}

/// Handling an event for longer than this is logged at debug level: the events behind it
/// waited that long.
const SLOW_EVENT: std::time::Duration = std::time::Duration::from_millis(10);

/// The single task that applies source events in order.
struct Pipeline {
    inbox: Inbox,
    view: View,
    ctx: Ctx,
    delivery: Delivery,
    /// Set when a sink writes JSON.
    encoder: Option<Box<dyn Encoder>>,
    /// Set when a sink writes Avro.
    avro: Option<Arc<AvroEncoder>>,
    control: mpsc::Sender<Control>,
    /// A catch-up was asked for and has not finished yet.
    catch_up_requested: bool,
    /// A snapshot was asked for and has not finished yet.
    reconcile_requested: bool,
    /// A snapshot is being read: keys changed meanwhile count as seen by it.
    snapshot_active: bool,
    touched: normalize::SeenKeys,
    /// Whether a snapshot was completed before (later ones count what they repair).
    snapshot_before: bool,
    /// Keys history changed while the view did not know them in full and that nothing has
    /// settled yet ([`Pipeline::settle_unknown`]).
    unsettled: HashSet<String>,
    /// Partial diffs of entities not known yet, oldest first, bounded by [`PENDING_BYTES`].
    held: VecDeque<Held>,
    held_bytes: usize,
    gaps: Vec<PendingGap>,
    recent_status: RecentIds,
    /// History is on: diffs that skip versions wait for it.
    history: bool,
    /// The branch root of a branch-scoped source: diffs outside it are ignored.
    scope_root: Option<String>,
    summary: RunSummary,
    max_records: Option<u64>,
    /// Job frames submitted and maybe not delivered yet, oldest first (pruned as the
    /// checkpoint passes them); kept for the next run if shutdown leaves them undelivered.
    jobs_sent: VecDeque<JobFrame>,
    /// Where undelivered job frames go at shutdown.
    spool: Option<Spool>,
    /// Upserts are journalled here before they are published (restart-exact baselines).
    journal: Option<Journal>,
    /// The span of the source event being handled (traces exported), ended after it.
    event_span: Option<EventSpan>,
    /// When the event being handled was received: its records' spans start there.
    received_at: std::time::SystemTime,
}

impl Pipeline {
    /// Makes the view hold the states of `keys` before an event touching them is normalised
    /// (reading them from the store when they are not in memory), after letting it know which
    /// of its states the store now has.
    fn prefetch<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) -> Result<(), AppError> {
        self.prefetch_page(keys, 0)
    }

    /// [`Pipeline::prefetch`] for an event that brings about `incoming` bytes of new states
    /// ([`normalize::View::prefetch_page`]).
    fn prefetch_page<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a str>,
        incoming: usize,
    ) -> Result<(), AppError> {
        self.release_delivered();
        self.view.prefetch_page(keys, incoming)?;
        Ok(())
    }

    /// At the end of a catch-up: entities history changed without the view knowing them, that
    /// neither a snapshot page nor a later removal settled since, call for a snapshot. Judged
    /// here, not per batch: an entity changed and then removed while a snapshot was read
    /// (before its page) is in no page, and only the rest of history shows it gone. Asking
    /// per batch asked, under load, for one snapshot after another.
    fn settle_unknown(&mut self) -> Result<(), AppError> {
        if self.unsettled.is_empty() || self.snapshot_active {
            return Ok(());
        }
        let keys: Vec<String> = self.unsettled.drain().collect();
        self.prefetch(keys.iter().map(String::as_str))?;
        let unknown: Vec<&String> = keys.iter().filter(|k| self.view.get(k).is_none()).collect();
        if let Some(first) = unknown.first() {
            // Cleared either way: if a snapshot cannot bring them, nothing can, and asking
            // again would ask for ever.
            self.ask(Control::Reconcile {
                reason: format!(
                    "history changed {} entities never seen in full (e.g. {first})",
                    unknown.len()
                ),
            });
        }
        Ok(())
    }

    /// Tells the view which of its states the store has committed since the last call.
    fn release_delivered(&mut self) {
        self.view.delivered(self.delivery.take_committed());
    }

    fn done(&self) -> bool {
        self.max_records.is_some_and(|m| self.summary.records >= m)
    }

    async fn submit(&mut self, group: Group) -> Result<(), AppError> {
        if self.done() {
            return Ok(());
        }
        let spans = self.record_spans(&group);
        let traceparents: Vec<Option<&str>> = spans
            .iter()
            .map(|s| s.as_ref().map(|s| s.traceparent.as_str()))
            .collect();
        let messages = to_messages_with(
            &group,
            self.encoder.as_deref(),
            self.avro.as_deref(),
            &traceparents,
        )?;
        self.summary.records += group.records.len() as u64;
        metrics().records_total.inc_by(group.records.len() as u64);
        for r in &group.records {
            if matches!(r.body, Body::StatusChanged { .. }) {
                self.recent_status.insert(&r.id);
                if r.origin == Origin::History {
                    inc(&metrics().status_from_history_total);
                }
            }
        }
        // The snapshot's own groups are in its `seen` already: a second million-key set here
        // was a fifth of the memory of a 1,000,000-object snapshot.
        let from_snapshot = group
            .records
            .first()
            .is_some_and(|r| r.origin == Origin::Snapshot);
        if self.snapshot_active && !from_snapshot {
            for op in &group.ops {
                if let CheckpointOp::Upsert { key, .. } | CheckpointOp::Remove { key } = op {
                    self.touched.insert(key);
                }
            }
        }
        if let Some(journal) = &mut self.journal {
            journal.append(&group.ops)?;
            if journal.wants_compaction() {
                let keep = self.view.undelivered();
                journal.compact(keep.iter().map(|(k, p)| (k, p)))?;
            }
        }
        self.delivery
            .submit_traced(messages, group.ops, spans)
            .await?;
        Ok(())
    }

    /// A span per record of `group` when traces are exported, under the span of the source
    /// event being handled (started here with the records' trace ids when it is the first).
    fn record_spans(&mut self, group: &Group) -> Vec<Option<RecordSpan>> {
        if !crate::telemetry::traces::enabled() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(group.records.len());
        for record in &group.records {
            if !self
                .event_span
                .as_ref()
                .is_some_and(|s| s.is_for(&record.trace))
            {
                let (name, source) = match record.origin {
                    Origin::Diff => ("graph:diff", "synaptask"),
                    Origin::Snapshot => ("graph:get", "synaptask"),
                    Origin::History => ("history:page", "synaptask"),
                    Origin::Jobs => ("job_frame", "jobs"),
                };
                self.event_span = EventSpan::start(&record.trace, name, source);
            }
            out.push(
                self.event_span
                    .as_ref()
                    .and_then(|e| e.record(&record.id, &record.event_type(), self.received_at)),
            );
        }
        out
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

    /// Publishes one job frame. It is remembered first, so a shutdown that interrupts the
    /// publish still keeps it for the next run.
    async fn job(&mut self, f: JobFrame) -> Result<(), AppError> {
        let delivered = self.jobs_delivered(&f.client_id);
        while self.jobs_sent.front().is_some_and(|s| s.index <= delivered) {
            self.jobs_sent.pop_front();
        }
        let g = normalize::job_frame(
            &self.ctx,
            &f.client_id,
            f.epoch,
            f.index,
            f.frame.clone(),
            &TraceContext::new_root(),
        );
        self.jobs_sent.push_back(f);
        self.submit(g).await
    }

    fn jobs_delivered(&self, client_id: &str) -> u64 {
        self.delivery
            .checkpoint()
            .jobs
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// At shutdown: publishes the job frames the source already handed over (other events
    /// are left: history and snapshots bring them back). Ends when the channel is quiet.
    async fn take_job_frames(&mut self) -> Result<(), AppError> {
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(200), self.inbox.recv()).await
        {
            if matches!(ev, SourceEvent::Job(_)) {
                self.handle(ev).await?;
            }
        }
        Ok(())
    }

    /// At shutdown, after the drain: keeps the job frames not known to be delivered (sent and
    /// unacknowledged, or never taken from the channel) for the next run.
    fn keep_job_frames(&mut self) {
        let mut frames: Vec<JobFrame> = Vec::new();
        for f in std::mem::take(&mut self.jobs_sent) {
            if f.index > self.jobs_delivered(&f.client_id) {
                frames.push(f);
            }
        }
        while let Some(ev) = self.inbox.try_recv() {
            if let SourceEvent::Job(frame) = ev {
                frames.push(frame);
            }
        }
        if frames.is_empty() {
            return;
        }
        metrics()
            .job_frames_spooled_total
            .inc_by(frames.len() as u64);
        match &self.spool {
            Some(spool) => match spool.append(&frames) {
                Ok(()) => tracing::info!(
                    frames = frames.len(),
                    "undelivered job frames kept for the next run"
                ),
                Err(e) => tracing::error!(error = %e, "undelivered job frames lost"),
            },
            None => tracing::warn!(
                frames = frames.len(),
                "undelivered job frames lost: no state.path to keep them beside"
            ),
        }
    }

    fn ask(&mut self, c: Control) {
        let flag = match &c {
            Control::Reconcile { .. } => &mut self.reconcile_requested,
            Control::CatchUp { .. } => &mut self.catch_up_requested,
        };
        if !*flag {
            *flag = true;
            let _ = self.control.try_send(c);
        }
    }

    /// Holds a partial diff of an entity the view does not know: the history catch-up it asks
    /// for (or the snapshot in progress) will bring the entity, and the diff is tried again.
    /// The oldest held diffs go first when the buffer is full; history brings those back too.
    fn hold(
        &mut self,
        kind: EntityKind,
        entity: Map<String, Value>,
        trace: &TraceContext,
        why: &str,
    ) {
        let bytes = entity.len() * 64 + 64;
        while self.held_bytes + bytes > PENDING_BYTES {
            let Some(old) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= old.bytes;
            inc(&metrics().pending_diffs_dropped_total);
        }
        self.keep_held(Held {
            kind,
            entity,
            trace: trace.clone(),
            bytes,
            tries: 0,
        });
        metrics().pending_diffs.set(self.held.len() as i64);
        // Before the first snapshot every entity is unknown, and that snapshot is coming (a
        // diff can reach the pipeline before its start does): it settles these.
        if !self.snapshot_active && self.snapshot_before {
            self.ask(Control::CatchUp { reason: why.into() });
        }
    }

    fn keep_held(&mut self, h: Held) {
        self.held_bytes += h.bytes;
        self.held.push_back(h);
    }

    /// After a snapshot page: the held diffs of entities it brought apply now, in arrival
    /// order, before any later diff of theirs can. A diff that reached the pipeline before the
    /// page it came after on the socket (pages wait for their slot) is held; left for the end
    /// of the snapshot, the entity's next diff merged first (`v3` onto the page's `v1`), the
    /// held `v2` was then stale, and its fields were lost.
    async fn release_held_known(&mut self) -> Result<(), AppError> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        for mut h in held {
            let known = h
                .entity
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| self.view.get(&h.kind.key(id)).is_some());
            if !known || (self.history && normalize::skips_versions(&self.view, h.kind, &h.entity))
            {
                self.keep_held(h);
                continue;
            }
            let entity = std::mem::take(&mut h.entity);
            match normalize::apply_owned(
                &mut self.view,
                &self.ctx,
                h.kind,
                entity,
                Origin::Diff,
                &h.trace,
            ) {
                (Outcome::NeedsSnapshot, back) => {
                    h.entity = back.unwrap_or_default();
                    self.keep_held(h)
                }
                (o, back) => {
                    self.outcome(o, "graph:diff", h.kind, back, &h.trace)
                        .await?
                }
            }
        }
        metrics().pending_diffs.set(self.held.len() as i64);
        Ok(())
    }

    /// Tries the held diffs again, in arrival order. What is still unknown after a snapshot was
    /// purged since (stale); after a catch-up, only a snapshot can tell. A diff that still
    /// skips versions is never merged: it waits for up to two catch-ups, then a snapshot.
    async fn retry_held(&mut self, after_snapshot: bool) -> Result<(), AppError> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let keys: Vec<String> = held
            .iter()
            .filter_map(|h| Some(h.kind.key(h.entity.get("id")?.as_str()?)))
            .collect();
        self.prefetch(keys.iter().map(String::as_str))?;
        tracing::debug!(held = held.len(), after_snapshot, "retrying held diffs");
        let (mut unknown, mut skipping, mut given_up) = (0usize, 0usize, 0usize);
        for mut h in held {
            if !after_snapshot {
                h.tries += 1;
            }
            if normalize::skips_versions(&self.view, h.kind, &h.entity) {
                // Merged now, it would leave the skipped change's fields stale under its
                // version. A catch-up that was already paging when the diff was held may not
                // have had those versions (and a snapshot only brings what it paged): wait for
                // one more catch-up; after that only a snapshot can tell, and it will.
                if h.tries < 2 {
                    skipping += 1;
                    self.keep_held(h);
                } else {
                    given_up += 1;
                    inc(&metrics().stale_changes_total);
                }
                continue;
            }
            let entity = std::mem::take(&mut h.entity);
            let (o, back) = normalize::apply_owned(
                &mut self.view,
                &self.ctx,
                h.kind,
                entity,
                Origin::Diff,
                &h.trace,
            );
            match o {
                Outcome::NeedsSnapshot if after_snapshot => {
                    inc(&metrics().stale_changes_total);
                }
                Outcome::NeedsSnapshot => {
                    if h.tries < 2 {
                        skipping += 1;
                    } else {
                        unknown += 1;
                    }
                    h.entity = back.unwrap_or_default();
                    self.keep_held(h);
                }
                o => {
                    self.outcome(o, "graph:diff", h.kind, back, &h.trace)
                        .await?
                }
            }
        }
        metrics().pending_diffs.set(self.held.len() as i64);
        if unknown > 0 || given_up > 0 {
            self.ask(Control::Reconcile {
                reason: format!(
                    "history did not bring {unknown} entities and the versions {given_up} diffs skipped"
                ),
            });
        } else if skipping > 0 {
            self.ask(Control::CatchUp {
                reason: format!("{skipping} held diffs still wait for history"),
            });
        }
        Ok(())
    }

    async fn outcome(
        &mut self,
        o: Outcome,
        event: &str,
        kind: EntityKind,
        entity: Option<Map<String, Value>>,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        // `apply_owned` hands the entry back with every outcome but `Changed`.
        let entity = entity.unwrap_or_default();
        match o {
            Outcome::Changed(g) => self.submit(g).await,
            Outcome::Stale => {
                inc(&metrics().stale_changes_total);
                Ok(())
            }
            Outcome::NeedsSnapshot if event == "graph:get" => {
                inc(&metrics().stale_changes_total);
                Ok(())
            }
            Outcome::NeedsSnapshot => {
                self.hold(
                    kind,
                    entity,
                    trace,
                    "a diff changed an entity never seen in full",
                );
                Ok(())
            }
            Outcome::Invalid(reason) => {
                let raw = Value::Object(entity).to_string().into_bytes();
                self.dead_letter(event, &raw, &reason, trace).await
            }
        }
    }

    /// Between the batches of a history page: handles the live diffs already waiting, so that
    /// a long page (hundreds of batches when the graph changes fast) does not hold them for its
    /// whole length; `cargo bench --bench latency` measured 30-80 ms stalls every history poll
    /// before. Safe to reorder: the page's remaining batches are older changes (the view keeps
    /// the newest version of each entity either way), and a diff goes ahead only of what it
    /// overtook in the channel ([`Inbox::live_diff`]). The page's span and clock are kept. Only
    /// for periodic polls, not catch-ups.
    async fn let_live_diffs_ahead(&mut self) -> Result<(), AppError> {
        // During a catch-up the page holds the versions a waiting diff skipped: that diff
        // would only be held again, so diffs wait for the page then.
        if self.catch_up_requested {
            return Ok(());
        }
        let span = self.event_span.take();
        let now = self.ctx.now.clone();
        let received_at = self.received_at;
        // Only what waits now: diffs arriving faster than they are handled would otherwise
        // keep the rest of the page waiting for as long as the stream lasts.
        for _ in 0..self.inbox.rx.len() {
            let Some(ev) = self.inbox.live_diff() else {
                break;
            };
            // Boxed: `handle` is what called this.
            Box::pin(self.handle(ev)).await?;
        }
        self.event_span = span;
        self.ctx.now = now;
        self.received_at = received_at;
        Ok(())
    }

    async fn handle(&mut self, ev: SourceEvent) -> Result<(), AppError> {
        self.ctx.now = crate::record::now_rfc3339();
        self.received_at = std::time::SystemTime::now();
        let (source, kind) = ev.labels();
        crate::metrics::event(source, kind);
        let started = std::time::Instant::now();
        let result = self.handle_event(ev).await;
        let took = started.elapsed();
        if took > SLOW_EVENT {
            tracing::debug!(
                source,
                kind,
                ms = took.as_millis() as u64,
                "slow source event"
            );
        }
        // The event's span ends with its handling; its records' spans go on until their acks.
        self.event_span = None;
        result
    }

    async fn handle_event(&mut self, ev: SourceEvent) -> Result<(), AppError> {
        match ev {
            SourceEvent::Graph(ev) => self.handle_graph(ev).await,
            SourceEvent::Job(frame) => self.job(frame).await,
            SourceEvent::Malformed { event, raw, reason } => {
                self.dead_letter(&event, &raw, &reason, &TraceContext::new_root())
                    .await
            }
        }
    }

    async fn handle_graph(&mut self, ev: GraphEvent) -> Result<(), AppError> {
        match ev {
            GraphEvent::Session { source_uri } => self.ctx.source = source_uri,
            GraphEvent::SnapshotStart => {
                self.snapshot_active = true;
                self.touched.clear();
            }
            // The slot is freed when this arm ends: the source may then send another page.
            GraphEvent::SnapshotPage {
                items,
                trace,
                slot: _slot,
            } => {
                let keys = entity_keys(&items);
                // The page's states become dirty as it is applied, while the source reads and
                // parses the next page (of about the same size): room for both is made first, so
                // that `state.cache_mb` bounds the parsed states of a snapshot, not only its cache.
                let incoming = 2 * items
                    .iter()
                    .map(|(_, e)| normalize::approx_bytes("", e))
                    .sum::<usize>();
                self.prefetch_page(keys.iter().map(String::as_str), incoming)?;
                for (kind, entity) in items {
                    let (o, back) = normalize::apply_owned(
                        &mut self.view,
                        &self.ctx,
                        kind,
                        entity,
                        Origin::Snapshot,
                        &trace,
                    );
                    if self.snapshot_before && matches!(o, Outcome::Changed(_)) {
                        inc(&metrics().snapshot_changes_total);
                    }
                    self.outcome(o, "graph:get", kind, back, &trace).await?;
                }
                if !self.held.is_empty() {
                    self.release_held_known().await?;
                }
                tracing::debug!(view = ?self.view, delivery = ?self.delivery, "snapshot page applied");
            }
            GraphEvent::SnapshotDone {
                mut seen,
                trash,
                trace,
            } => {
                self.retry_held(true).await?;
                seen.merge(&self.touched);
                self.touched.clear();
                self.snapshot_active = false;
                self.release_delivered();
                self.view.prefetch_unseen(&seen, trash.as_ref())?;
                let d = normalize::missing_after_snapshot(
                    &mut self.view,
                    &self.ctx,
                    &seen,
                    trash.as_ref(),
                    self.scope_root.is_some(),
                    &trace,
                );
                if self.snapshot_before {
                    metrics()
                        .snapshot_changes_total
                        .inc_by(d.groups.len() as u64);
                }
                for g in d.groups {
                    self.submit(g).await?;
                }
                if !d.unresolved.is_empty() {
                    tracing::warn!(
                        count = d.unresolved.len(),
                        "entities left the active graph without a trash listing to tell trash from purge; published as trashed"
                    );
                }
                for gap in std::mem::take(&mut self.gaps) {
                    let g = normalize::history::gap(
                        &self.ctx,
                        &gap.scope,
                        gap.from_op_id,
                        gap.oldest_available_op_id,
                        &gap.reason,
                        "snapshot",
                        d.unresolved.clone(),
                        &trace,
                    );
                    self.submit(g).await?;
                }
                self.reconcile_requested = false;
                self.snapshot_before = true;
                self.delivery
                    .submit(Vec::new(), vec![CheckpointOp::SnapshotComplete])
                    .await?;
                tracing::info!(view = ?self.view, "snapshot merged");
            }
            GraphEvent::Diff { mut payload, trace } => {
                match normalize::take_diff_entries(&mut payload) {
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
                        if !bad.is_empty() {
                            let payload_hash = crate::record::fnv1a(payload.to_string().as_bytes());
                            for entry in bad {
                                inc(&metrics().dead_letters_total);
                                self.summary.dead_letters += 1;
                                tracing::warn!(event = "graph:diff", reason = %entry.reason, index = entry.index, bytes = entry.raw.len(), trace_id = %trace.trace_id, "bad diff entry sent to the dead-letter route");
                                let g = normalize::dead_letter_entry(
                                    &self.ctx,
                                    "graph:diff",
                                    payload_hash,
                                    &entry,
                                    &trace,
                                );
                                self.submit(g).await?;
                            }
                        }
                        let keys = entity_keys(&entries);
                        self.prefetch(keys.iter().map(String::as_str))?;
                        for (kind, entity) in entries {
                            if self.snapshot_active {
                                if let Some(id) = entity.get("id").and_then(Value::as_str) {
                                    self.touched.insert(&kind.key(id));
                                }
                            }
                            if let Some(root) = &self.scope_root {
                                if !normalize::in_scope(&self.view, kind, &entity, root) {
                                    inc(&metrics().outside_scope_total);
                                    continue;
                                }
                            }
                            if self.history && normalize::skips_versions(&self.view, kind, &entity)
                            {
                                self.hold(kind, entity, &trace, "a diff skipped versions");
                                continue;
                            }
                            let (o, back) = normalize::apply_owned(
                                &mut self.view,
                                &self.ctx,
                                kind,
                                entity,
                                Origin::Diff,
                                &trace,
                            );
                            self.outcome(o, "graph:diff", kind, back, &trace).await?;
                        }
                    }
                }
            }
            GraphEvent::History {
                scope,
                batches,
                trace,
            } => {
                for batch in batches {
                    let keys = normalize::history::batch_keys(&batch);
                    self.prefetch(keys.iter().map(String::as_str))?;
                    match normalize::history::apply_batch(
                        &mut self.view,
                        &self.ctx,
                        &scope,
                        &batch,
                        &mut self.recent_status,
                        &trace,
                    ) {
                        Ok((groups, unknown)) => {
                            for g in groups {
                                self.submit(g).await?;
                            }
                            for k in &unknown.removed {
                                self.unsettled.remove(k);
                            }
                            // A branch's history also lists ops on entities outside it.
                            if self.scope_root.is_none() {
                                self.unsettled.extend(unknown.changed);
                            }
                            self.let_live_diffs_ahead().await?;
                        }
                        Err(reason) => {
                            let raw = Value::Object(batch).to_string().into_bytes();
                            self.dead_letter("history:page", &raw, &reason, &trace)
                                .await?;
                        }
                    }
                }
            }
            GraphEvent::CatchUpDone => {
                tracing::debug!(held = self.held.len(), "catch-up done");
                self.catch_up_requested = false;
                self.settle_unknown()?;
                if !self.held.is_empty() && !self.snapshot_active {
                    self.retry_held(false).await?;
                }
            }
            GraphEvent::Gap {
                scope,
                from_op_id,
                oldest_available_op_id,
                reason,
                snapshot: true,
            } => self.gaps.push(PendingGap {
                scope,
                from_op_id,
                oldest_available_op_id,
                reason,
            }),
            GraphEvent::Gap {
                scope,
                from_op_id,
                oldest_available_op_id,
                reason,
                snapshot: false,
            } => {
                tracing::warn!(%scope, from_op_id, ?oldest_available_op_id, "history retention outran the poll; the live stream covered the window");
                let g = normalize::history::gap(
                    &self.ctx,
                    &scope,
                    from_op_id,
                    oldest_available_op_id,
                    &reason,
                    "live_diffs",
                    Vec::new(),
                    &TraceContext::new_root(),
                );
                self.submit(g).await?;
            }
        }
        Ok(())
    }
}

/// The keys of entities (`node:<id>`, `link:<id>`); entries without an id have none.
fn entity_keys(items: &[(EntityKind, Map<String, Value>)]) -> Vec<String> {
    items
        .iter()
        .filter_map(|(kind, e)| Some(kind.key(e.get("id")?.as_str()?)))
        .collect()
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
    // Before anything waits on a broker: a registry that is down is an error now, not a hang.
    let avro = build_avro(&cfg).await?;
    // Built before waiting on brokers, so a missing token fails at once.
    let source = SynapTaskSource::new(cfg.source.clone())?;
    if let Some(addr) = &cfg.metrics.listen {
        serve_metrics(addr, shutdown.clone()).await?;
    }
    crate::health::monitor(sinks.clone(), cfg.jobs.enabled, shutdown.clone());
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
            on_acked: opts.on_acked.clone(),
        },
    )?;
    let checkpoint = delivery.checkpoint();
    let delivered = delivery.reader();
    let delivered_entities = delivered.count()?;
    tracing::info!(
        entities = delivered_entities,
        snapshot_complete = checkpoint.snapshot_complete,
        "checkpoint loaded"
    );
    let p_store = delivery.store();
    let mut view = View::new(
        Arc::clone(&delivered),
        cfg.state.cache_mb.saturating_mul(1024 * 1024),
    );
    let journal = match cfg.state_path() {
        Some(path) => {
            let (journal, published) = Journal::open(&Journal::path_beside(path), &*delivered)?;
            if !published.is_empty() {
                tracing::info!(
                    entities = published.len(),
                    "versions published but not acknowledged before the restart are the baselines of the next changes"
                );
            }
            view.remember_published(published);
            Some(journal)
        }
        None => None,
    };
    let source = source
        .expecting(delivered_entities)
        .resume_from(&checkpoint.history, checkpoint.snapshot_complete)
        .with_attempt_log(delivery.store(), &checkpoint.connects, &checkpoint.reads);
    let snapshot_before = checkpoint.snapshot_complete;
    let mut spooled = Vec::new();
    let jobs = if cfg.jobs.enabled {
        let client = &cfg.jobs.client_id;
        let spool = cfg.state_path().map(|p| Spool::beside(p));
        if let Some(spool) = &spool {
            spooled = spool.take()?;
            if !spooled.is_empty() {
                tracing::info!(
                    frames = spooled.len(),
                    "publishing job frames kept by the last run"
                );
            }
        }
        let delivered = checkpoint
            .jobs
            .get(client)
            .copied()
            .unwrap_or(0)
            .max(spooled.iter().map(|f| f.index).max().unwrap_or(0));
        // Milliseconds since the epoch keep ids unique even without a state file; the stored
        // epoch keeps them rising when the clock steps back.
        let epoch = checkpoint
            .job_epochs
            .get(client)
            .map_or(0, |e| e + 1)
            .max(crate::record::unix_millis());
        p_store
            .apply(vec![CheckpointOp::JobEpoch {
                client_id: client.clone(),
                epoch,
            }])
            .await?;
        Some(JobsSource::new(cfg.jobs.clone(), delivered, epoch, spool)?)
    } else {
        None
    };
    // Small: the sources hold their own buffers; this only decouples them from the pipeline.
    let (tx, rx) = mpsc::channel::<SourceEvent>(256);
    let control_tx = source.controller();
    let sources_stop = shutdown.child_token();
    // Each source's log lines carry its name (the span's field).
    let mut source_task = tokio::spawn(
        Box::new(source)
            .run(tx.clone(), sources_stop.clone())
            .instrument(tracing::info_span!("source", source = "synaptask")),
    );
    let mut jobs_task = jobs.map(|j| {
        tokio::spawn(
            Box::new(j)
                .run(tx.clone(), sources_stop.clone())
                .instrument(tracing::info_span!("source", source = "jobs")),
        )
    });
    drop(tx);

    let mut p = Pipeline {
        inbox: Inbox {
            rx,
            stash: VecDeque::new(),
        },
        view,
        ctx: Ctx {
            source: format!("synaptask://{}/users/unknown", cfg.source.host()),
            now: String::new(),
        },
        delivery,
        encoder: cfg
            .json_needed()
            .then(|| Box::new(JsonEncoder) as Box<dyn Encoder>),
        avro,
        control: control_tx,
        catch_up_requested: false,
        reconcile_requested: false,
        snapshot_active: false,
        touched: normalize::SeenKeys::default(),
        snapshot_before,
        unsettled: HashSet::new(),
        held: VecDeque::new(),
        held_bytes: 0,
        gaps: Vec::new(),
        recent_status: RecentIds::new(RECENT_STATUS_IDS),
        history: cfg.source.history,
        scope_root: cfg.source.root.clone(),
        summary: RunSummary::default(),
        max_records: opts.max_records,
        jobs_sent: VecDeque::new(),
        spool: cfg.state_path().map(|p| Spool::beside(p)),
        journal,
        event_span: None,
        received_at: std::time::SystemTime::now(),
    };
    for f in spooled {
        p.job(f).await?;
    }

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
                r = p.delivery.next_ack(), if p.delivery.in_flight() > 0 => {
                    r?;
                    // Between events: delivered states leave memory now, not at the next
                    // event, which may be long in coming.
                    p.release_delivered();
                    p.view.trim();
                }
                ev = p.inbox.recv() => match ev {
                    // A full window (a broker down) blocks `handle`; shutdown must not wait
                    // for it. Dropping it half-way leaves that group unsealed, which only holds
                    // the checkpoint before it (see `Delivery::submit`).
                    Some(ev) => tokio::select! {
                        r = p.handle(ev) => r?,
                        _ = shutdown.cancelled() => break,
                    },
                    None => break,
                },
                () = crate::health::resnapshot_signal().notified() => {
                    tracing::info!("snapshot reconcile requested by an operator");
                    p.ask(Control::Reconcile {
                        reason: "requested by an operator".into(),
                    });
                }
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
    // Everything from here on fits in the drain timeout (plus a short flush), whatever the
    // sinks do: a broker that is down must not keep a SIGTERM waiting.
    let drain = Duration::from_secs(cfg.delivery.drain_timeout_secs);
    let deadline = tokio::time::Instant::now() + drain;
    if result.is_ok() && !p.done() {
        // Job frames cannot be asked for again: publish what the job source already handed
        // over (graph events are skipped: history and snapshots bring them back).
        let pending = tokio::time::timeout_at(deadline, p.take_job_frames()).await;
        if let Ok(Err(e)) = pending {
            tracing::error!(error = %e, "job frames received before shutdown were not published");
        }
    }
    let drained = match &result {
        Ok(()) => tokio::time::timeout_at(deadline, p.delivery.drain()).await,
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
    // A drain that timed out may leave a commit running; a short wait lets it land.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, p.delivery.settle()).await;
    // The job source keeps its own buffer in the same spool: let it finish writing first.
    if let (Some(j), false) = (jobs_task.as_mut(), jobs_done) {
        if tokio::time::timeout(SHUTDOWN_GRACE, j).await.is_ok() {
            jobs_done = true;
        }
    }
    p.keep_job_frames();
    let flush_until = deadline.max(tokio::time::Instant::now() + SHUTDOWN_GRACE);
    for s in &sinks {
        match tokio::time::timeout_at(flush_until, s.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(sink = s.name(), error = %e, "flush failed"),
            Err(_) => tracing::warn!(sink = s.name(), "flush timed out"),
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
