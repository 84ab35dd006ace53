//! The delivery window: publishes groups of messages to every sink in order, keeps at most
//! `max_in_flight` of them unacknowledged, and advances the checkpoint store over the
//! contiguous prefix of groups that every sink has acknowledged.
//!
//! A *group* is a record and its companions (status record, tombstone) plus the checkpoint ops
//! they justify. Acks may arrive in any order; a group's ops are committed only once it and
//! every group submitted before it are acknowledged by every sink, so a gap holds the
//! checkpoint and commits always follow submission order.
//!
//! Counting: a message is *in flight* from its first `enqueue` until every sink has
//! acknowledged it, and counts once however many sinks there are (so each sink holds at most
//! `max_in_flight` unacknowledged messages, and the process at most `max_in_flight × sinks`
//! ack futures).
//!
//! Store writes are blocking I/O (an fsync per transaction), so they run on
//! `tokio::task::spawn_blocking` with the store behind `Arc<Mutex<_>>`; that works on both the
//! current-thread and the multi-thread runtime. Acks that are ready together, and groups that
//! complete together, are committed in one transaction of up to `max_batch` ops.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::metrics::{self, metrics};
use crate::metrics::{SinkLabels, SinkName};
use crate::sink::{AckFuture, Message, Route, Sink, SinkError};
use crate::state::{
    apply_op, Checkpoint, CheckpointOp, CheckpointStore, EntityKey, EntityReader, StateError,
};
use crate::telemetry::RecordSpan;

/// First wait before retrying an `enqueue` that failed with a retryable error.
const ENQUEUE_RETRY_MIN: Duration = Duration::from_millis(10);
/// Longest wait between `enqueue` retries.
const ENQUEUE_RETRY_MAX: Duration = Duration::from_secs(1);

/// `[delivery]` in the config file; the window itself takes the [`DeliveryConfig`] made from it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Messages in flight (sent, not yet acknowledged) at most; when a broker stalls, the
    /// connector stops taking input at this bound.
    pub max_in_flight: usize,
    /// Checkpoint ops written per store transaction at most.
    pub max_batch: usize,
    /// Seconds to wait at shutdown for in-flight messages to be acknowledged.
    pub drain_timeout_secs: u64,
}

impl Default for DeliverySection {
    fn default() -> Self {
        Self {
            max_in_flight: 20_000,
            max_batch: 5_000,
            drain_timeout_secs: 30,
        }
    }
}

/// Sizes of the delivery window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Max messages in flight (enqueued, not yet acknowledged by every sink); each message
    /// counts once, whatever the number of sinks. Values below 1 are taken as 1.
    pub max_in_flight: usize,
    /// Max checkpoint ops per store transaction. Values below 1 are taken as 1.
    pub max_batch: usize,
    /// Told of each message once every sink has acknowledged it.
    pub on_acked: Option<AckObserver>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            max_batch: 1024,
            on_acked: None,
        }
    }
}

/// A callback told of each message at the moment every sink has acknowledged it, for an
/// embedding program that measures latency end to end or reacts to deliveries (the latency
/// benchmark uses it). It runs on the delivery task: it must be quick and must not block.
#[derive(Clone)]
pub struct AckObserver(pub Arc<dyn Fn(&Message) + Send + Sync>);

impl std::fmt::Debug for AckObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckObserver")
    }
}

/// Two observers are equal when they are the same callback.
impl PartialEq for AckObserver {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for AckObserver {}

/// Why delivery stopped. Both variants are fatal for the run: the checkpoint no longer moves
/// past the failure, so the connector should stop and restart from the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A sink refused or lost a message (a fatal error, a retry loop that gave up, or a
    /// shutdown). The checkpoint stays before that message's group.
    #[error("delivery failed: {0}")]
    Sink(#[from] SinkError),
    /// The checkpoint store failed. The batch that failed stays queued: calling again retries
    /// it (ops are idempotent), but the run should normally stop.
    #[error("checkpoint commit failed: {0}")]
    State(#[from] StateError),
}

impl DeliveryError {
    /// Always false: neither a lost message nor a failing store fixes itself within the run.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A handle on the delivery window's store for writes outside the window.
#[derive(Clone)]
pub struct SharedStore(Arc<Mutex<Box<dyn CheckpointStore>>>);

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore").finish_non_exhaustive()
    }
}

impl SharedStore {
    /// Applies `ops` in one durable transaction, on the blocking pool.
    pub async fn apply(&self, ops: Vec<CheckpointOp>) -> Result<(), StateError> {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || {
            store
                .lock()
                .map_err(|_| StateError::Io("checkpoint store lock poisoned by a panic".into()))?
                .apply(&ops)
        })
        .await
        .map_err(|e| StateError::Io(format!("checkpoint writer task failed: {e}")))?
    }
}

/// One submitted group, until it is committed.
struct Group {
    /// Per message: sinks that have not acknowledged it yet (0 once acked or failed).
    waiting: Vec<usize>,
    /// Messages not yet acknowledged by every sink, counting those not yet enqueued.
    unacked: usize,
    /// `submit` handed every message to every sink. A group whose `submit` was dropped
    /// half-way stays unsealed and holds the checkpoint: its messages may be partly published.
    sealed: bool,
    /// A sink failed one of its messages: the group never completes.
    failed: bool,
    ops: Vec<CheckpointOp>,
    /// Per message: its trace span, ended when every sink acknowledged it (tracing on).
    spans: Vec<Option<RecordSpan>>,
    /// When it was submitted: the checkpoint lag is the age of the oldest group.
    submitted: Instant,
    /// The messages, kept only for an [`AckObserver`] (empty otherwise).
    observed: Vec<Arc<Message>>,
}

impl Group {
    fn complete(&self) -> bool {
        self.sealed && !self.failed && self.unacked == 0
    }
}

/// One sink's answer for one message.
struct AckOutcome {
    seq: u64,
    index: usize,
    result: Result<(), SinkError>,
}

/// One sink's metric handles, resolved once (a family lookup per message would hash labels).
struct SinkMetrics {
    sent: Vec<prometheus_client::metrics::counter::Counter>,
    acked: Vec<prometheus_client::metrics::counter::Counter>,
    latency: prometheus_client::metrics::histogram::Histogram,
}

impl SinkMetrics {
    fn of(sink: &str) -> Self {
        let m = metrics();
        let labels = |route: Route| SinkLabels {
            sink: sink.to_string(),
            route: route.as_str(),
        };
        Self {
            sent: Route::ALL
                .iter()
                .map(|r| m.sink_sent.get_or_create(&labels(*r)).clone())
                .collect(),
            acked: Route::ALL
                .iter()
                .map(|r| m.sink_acked.get_or_create(&labels(*r)).clone())
                .collect(),
            latency: m
                .publish_latency
                .get_or_create(&SinkName {
                    sink: sink.to_string(),
                })
                .clone(),
        }
    }
}

/// A store transaction running on the blocking pool. Kept in `Delivery` (not in a future's
/// locals) so that dropping `next_ack` mid-commit loses nothing: the next call awaits it.
struct Commit {
    ops: Arc<Vec<CheckpointOp>>,
    task: JoinHandle<Result<(), StateError>>,
}

/// The in-flight window and checkpoint advance (see the module docs).
pub struct Delivery {
    sinks: Vec<Arc<dyn Sink>>,
    sink_metrics: Vec<Arc<SinkMetrics>>,
    /// Messages submitted whose groups are not yet acknowledged in order (checkpoint lag).
    lagging: usize,
    store: Arc<Mutex<Box<dyn CheckpointStore>>>,
    max_in_flight: usize,
    max_batch: usize,
    on_acked: Option<AckObserver>,
    checkpoint: Checkpoint,
    /// Submitted groups not yet committed, in submission order; `groups[0]` has `first_seq`.
    groups: VecDeque<Group>,
    first_seq: u64,
    acks: FuturesUnordered<BoxFuture<'static, AckOutcome>>,
    in_flight: usize,
    /// Ops of complete groups at the head, waiting for a store transaction, in order.
    ready: VecDeque<CheckpointOp>,
    commit: Option<Commit>,
    /// Reads the delivered entities (the store's reader).
    reader: Arc<dyn EntityReader>,
    /// Entity versions (`None`: removals) committed since [`Delivery::take_committed`] last
    /// took them.
    committed: Vec<(EntityKey, Option<u64>)>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field("in_flight", &self.in_flight)
            .field("groups", &self.groups.len())
            .field("ready_ops", &self.ready.len())
            .field("committing", &self.commit.is_some())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds the window over `sinks` and loads the current checkpoint from `store` (a
    /// blocking read, done once at start-up), so [`Delivery::checkpoint`] matches the store
    /// from the start. Fails when the store cannot be read.
    pub fn new(
        sinks: Vec<Arc<dyn Sink>>,
        store: Box<dyn CheckpointStore>,
        cfg: DeliveryConfig,
    ) -> Result<Self, DeliveryError> {
        let checkpoint = store.load()?;
        let reader = store.reader();
        Ok(Self {
            reader,
            committed: Vec::new(),
            sink_metrics: sinks
                .iter()
                .map(|s| Arc::new(SinkMetrics::of(s.name())))
                .collect(),
            lagging: 0,
            sinks,
            store: Arc::new(Mutex::new(store)),
            max_in_flight: cfg.max_in_flight.max(1),
            max_batch: cfg.max_batch.max(1),
            on_acked: cfg.on_acked,
            checkpoint,
            groups: VecDeque::new(),
            first_seq: 0,
            acks: FuturesUnordered::new(),
            in_flight: 0,
            ready: VecDeque::new(),
            commit: None,
        })
    }

    /// Publishes one group of messages (a record and its companions: status record,
    /// tombstone) to every sink, in order; `ops` are applied to the store once every message
    /// of this group and of every group submitted before it is acknowledged by every sink.
    /// Waits (processing acks meanwhile) while the window is full. A group may have zero
    /// messages (ops only, e.g. `SnapshotComplete`): it still waits its turn.
    ///
    /// Retryable `enqueue` errors are retried with backoff (10 ms doubling to 1 s, no limit,
    /// acks processed meanwhile). Never waits for the store: when groups at the head have
    /// completed it starts their commit and returns; `next_ack`, `drain` or the next `submit`
    /// record it (so [`Delivery::checkpoint`] moves only then).
    ///
    /// Not cancel-safe: if this future is dropped half-way, the group may be partly published
    /// and then never completes, so the checkpoint stays before it (safe, but it no longer
    /// advances); drop it only when the run is ending.
    pub async fn submit(
        &mut self,
        msgs: Vec<Arc<Message>>,
        ops: Vec<CheckpointOp>,
    ) -> Result<(), DeliveryError> {
        self.submit_traced(msgs, ops, Vec::new()).await
    }

    /// [`Delivery::submit`] with a trace span per message (shorter is fine: the rest have
    /// none), each ended once every sink acknowledged its message.
    pub async fn submit_traced(
        &mut self,
        msgs: Vec<Arc<Message>>,
        ops: Vec<CheckpointOp>,
        mut spans: Vec<Option<RecordSpan>>,
    ) -> Result<(), DeliveryError> {
        // Acknowledged ops wait for the store, holding the states they carry; when the store
        // falls two transactions behind, input waits for it too, so that memory stays bounded
        // (a snapshot outran the store by 50,000 states before).
        while self.ready.len() >= 2 * self.max_batch {
            self.commit_one().await?;
        }
        let seq = self.first_seq + self.groups.len() as u64;
        if !spans.is_empty() {
            spans.resize_with(msgs.len(), || None);
        }
        self.lagging += msgs.len();
        let observed = if self.on_acked.is_some() {
            msgs.clone()
        } else {
            Vec::new()
        };
        self.groups.push_back(Group {
            waiting: vec![self.sinks.len(); msgs.len()],
            unacked: msgs.len(),
            sealed: false,
            failed: false,
            ops,
            spans,
            submitted: Instant::now(),
            observed,
        });
        self.update_lag();
        for (index, msg) in msgs.into_iter().enumerate() {
            while self.in_flight >= self.max_in_flight {
                if !self.wait_for_acks().await? {
                    break;
                }
            }
            self.publish(seq, index, msg).await?;
        }
        if let Some(group) = self.group_mut(seq) {
            group.sealed = true;
        }
        self.advance();
        self.kick_commit()
    }

    /// Waits for the next acknowledgement(s) and applies the checkpoint for the contiguous
    /// acked prefix. Returns `Ok(false)` at once if nothing is in flight and nothing waits to
    /// be committed; `Ok(true)` after progress (acks recorded and/or a commit done).
    ///
    /// Cancel-safe: every ack future and a running commit live in `self`, and an ack is
    /// recorded with no await in between, so dropping this future (e.g. in `tokio::select!`)
    /// loses no ack and no op; the next call carries on. In a `select!` loop, guard it with
    /// `if delivery.in_flight() > 0` (it returns at once otherwise); a commit left running then
    /// is picked up by the next `submit` or by `drain`.
    pub async fn next_ack(&mut self) -> Result<bool, DeliveryError> {
        if self.commit.is_none() && self.ready.is_empty() && !self.wait_for_acks().await? {
            return Ok(false);
        }
        self.commit_ready().await?;
        Ok(true)
    }

    /// Waits for everything in flight and applies the checkpoint (shutdown, or before a
    /// snapshot-complete marker matters). Cancel-safe like [`Delivery::next_ack`]. Groups that
    /// can never complete (a sink failed them, or their `submit` was dropped) stay uncommitted.
    pub async fn drain(&mut self) -> Result<(), DeliveryError> {
        while self.next_ack().await? {}
        Ok(())
    }

    /// Records a commit left running and commits what is ready, without waiting for acks (the
    /// last step of a shutdown whose drain timed out).
    pub async fn settle(&mut self) -> Result<(), DeliveryError> {
        self.commit_ready().await
    }

    /// The store, for the few writes that must be durable before something happens rather
    /// than after a broker acknowledged it (a job epoch, a connection attempt).
    pub fn store(&self) -> SharedStore {
        SharedStore(Arc::clone(&self.store))
    }

    /// Messages enqueued to at least one sink and not yet acknowledged by every sink.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The checkpoint as last committed (kept in memory, equal to what the store holds once
    /// the commit `submit` may have left running is recorded by `next_ack`, `drain` or the
    /// next `submit`; until then the store is at most that one transaction ahead).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Reads the delivered entities: what the store has committed.
    pub fn reader(&self) -> Arc<dyn EntityReader> {
        Arc::clone(&self.reader)
    }

    /// The entity versions committed to the store since the last call, in commit order: the
    /// working view may then let go of those states (they can be read back).
    pub fn take_committed(&mut self) -> Vec<(EntityKey, Option<u64>)> {
        std::mem::take(&mut self.committed)
    }

    fn group_mut(&mut self, seq: u64) -> Option<&mut Group> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.groups.get_mut(index)
    }

    /// Hands one message to every sink in turn and registers its ack futures.
    async fn publish(
        &mut self,
        seq: u64,
        index: usize,
        msg: Arc<Message>,
    ) -> Result<(), DeliveryError> {
        metrics::inc(&metrics().messages_enqueued_total);
        if self.sinks.is_empty() {
            // Acknowledged by every sink, vacuously.
            if let Some(group) = self.group_mut(seq) {
                group.unacked -= 1;
                if let Some(span) = group.spans.get_mut(index).and_then(Option::take) {
                    span.acked();
                }
            }
            metrics::inc(&metrics().messages_acked_total);
            return Ok(());
        }
        self.in_flight += 1;
        metrics().in_flight.inc();
        let route = msg.route.index();
        for k in 0..self.sinks.len() {
            let sink = Arc::clone(&self.sinks[k]);
            let sm = Arc::clone(&self.sink_metrics[k]);
            let sent = Instant::now();
            match self.enqueue(sink.as_ref(), &msg).await {
                Ok(ack) => {
                    sm.sent[route].inc();
                    self.acks.push(
                        ack.map(move |result| {
                            if result.is_ok() {
                                sm.acked[route].inc();
                                sm.latency.observe(sent.elapsed().as_secs_f64());
                            }
                            AckOutcome { seq, index, result }
                        })
                        .boxed(),
                    );
                }
                Err(e) => {
                    self.fail_message(seq, index);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// `Sink::enqueue`, retrying retryable errors.
    async fn enqueue(
        &mut self,
        sink: &dyn Sink,
        msg: &Arc<Message>,
    ) -> Result<AckFuture, DeliveryError> {
        let mut backoff = Backoff::new(ENQUEUE_RETRY_MIN, ENQUEUE_RETRY_MAX);
        loop {
            match sink.enqueue(Arc::clone(msg)).await {
                Ok(ack) => return Ok(ack),
                Err(e) if e.is_retryable() => {
                    metrics::inc(&metrics().sink_retries_total);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "enqueue failed; retrying");
                    self.record_acks_for(delay).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sleeps for `period` while recording acks as they come: a full client queue drains
    /// through them.
    async fn record_acks_for(&mut self, period: Duration) -> Result<(), DeliveryError> {
        let sleep = tokio::time::sleep(period);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                Some(outcome) = self.acks.next(), if !self.acks.is_empty() => self.record(outcome)?,
            }
        }
    }

    /// Waits for one ack, then records it and every ack already ready. Returns false when no
    /// ack is outstanding. Cancel-safe: `FuturesUnordered::next` keeps unfinished futures.
    async fn wait_for_acks(&mut self) -> Result<bool, DeliveryError> {
        let Some(first) = self.acks.next().await else {
            return Ok(false);
        };
        self.record(first)?;
        while let Some(Some(outcome)) = self.acks.next().now_or_never() {
            self.record(outcome)?;
        }
        Ok(true)
    }

    fn record(&mut self, outcome: AckOutcome) -> Result<(), DeliveryError> {
        let AckOutcome { seq, index, result } = outcome;
        if let Err(e) = result {
            self.fail_message(seq, index);
            return Err(e.into());
        }
        let in_flight = &mut self.in_flight;
        let index_in_groups = seq
            .checked_sub(self.first_seq)
            .and_then(|i| usize::try_from(i).ok());
        // A group with outstanding ack futures is never popped, so the lookup finds it.
        let Some(group) = index_in_groups.and_then(|i| self.groups.get_mut(i)) else {
            return Ok(());
        };
        let Some(waiting) = group.waiting.get_mut(index) else {
            return Ok(());
        };
        // 0 already: another sink failed this message; it left the window then.
        if *waiting == 0 {
            return Ok(());
        }
        *waiting -= 1;
        if *waiting == 0 {
            group.unacked -= 1;
            if let Some(span) = group.spans.get_mut(index).and_then(Option::take) {
                span.acked();
            }
            if let (Some(observer), Some(msg)) = (&self.on_acked, group.observed.get(index)) {
                (observer.0)(msg);
            }
            *in_flight -= 1;
            metrics().in_flight.dec();
            metrics::inc(&metrics().messages_acked_total);
            self.advance();
        }
        Ok(())
    }

    /// Takes a message out of the window for good and stops its group from ever completing.
    fn fail_message(&mut self, seq: u64, index: usize) {
        let Some(group) = self.group_mut(seq) else {
            return;
        };
        group.failed = true;
        if let Some(span) = group.spans.get_mut(index).and_then(Option::take) {
            span.failed("a sink refused the message");
        }
        let was_waiting = group
            .waiting
            .get_mut(index)
            .is_some_and(|w| std::mem::replace(w, 0) > 0);
        if was_waiting {
            self.in_flight -= 1;
            metrics().in_flight.dec();
        }
    }

    /// Moves the ops of complete groups at the head into `ready`.
    fn advance(&mut self) {
        while self.groups.front().is_some_and(Group::complete) {
            if let Some(group) = self.groups.pop_front() {
                self.lagging -= group.waiting.len();
                self.ready.extend(group.ops);
                self.first_seq += 1;
            }
        }
        self.update_lag();
    }

    /// Publishes the checkpoint lag: messages not yet acknowledged in order, and the age of
    /// the oldest (also refreshed by the health monitor while nothing moves).
    fn update_lag(&self) {
        let m = metrics();
        m.checkpoint_lag_records
            .set(i64::try_from(self.lagging).unwrap_or(i64::MAX));
        let since = self.groups.front().map(|g| g.submitted);
        crate::metrics::set_oldest_pending(since);
    }

    /// Finishes the running commit, or starts one with the next ready ops and finishes it.
    /// `Ok(false)`: nothing was running and nothing was ready.
    async fn finish_one_commit(&mut self) -> Result<bool, DeliveryError> {
        let commit = match self.commit {
            Some(ref mut commit) => commit,
            None => match self.start_commit() {
                Some(commit) => commit,
                None => return Ok(false),
            },
        };
        let ops = Arc::clone(&commit.ops);
        let joined = (&mut commit.task).await;
        self.commit = None;
        self.finish_commit(&ops, joined)?;
        Ok(true)
    }

    /// One transaction of progress, then the next one started: publishing goes on while the
    /// store syncs.
    async fn commit_one(&mut self) -> Result<(), DeliveryError> {
        self.finish_one_commit().await?;
        self.start_commit();
        Ok(())
    }

    /// Commits `ready` in transactions of up to `max_batch` ops, finishing first any commit
    /// already running (left by `submit` or by a dropped call).
    async fn commit_ready(&mut self) -> Result<(), DeliveryError> {
        while self.finish_one_commit().await? {}
        Ok(())
    }

    /// The non-waiting `commit_ready` of `submit`: records a commit that has ended and starts
    /// the next, so publishing goes on while the store syncs.
    fn kick_commit(&mut self) -> Result<(), DeliveryError> {
        if let Some(commit) = self.commit.as_mut() {
            if !commit.task.is_finished() {
                return Ok(());
            }
            // Finished, so this is ready unless the task's coop budget says "later"; then a
            // later call collects it.
            let Some(joined) = (&mut commit.task).now_or_never() else {
                return Ok(());
            };
            let ops = Arc::clone(&commit.ops);
            self.commit = None;
            self.finish_commit(&ops, joined)?;
        }
        self.start_commit();
        Ok(())
    }

    /// Starts a store transaction on the blocking pool with the next `max_batch` ready ops.
    fn start_commit(&mut self) -> Option<&mut Commit> {
        if self.ready.is_empty() {
            return None;
        }
        let n = self.ready.len().min(self.max_batch);
        let ops = Arc::new(self.ready.drain(..n).collect::<Vec<_>>());
        let batch = Arc::clone(&ops);
        let store = Arc::clone(&self.store);
        let task = tokio::task::spawn_blocking(move || {
            let mut store = store
                .lock()
                .map_err(|_| StateError::Io("checkpoint store lock poisoned by a panic".into()))?;
            store.apply(&batch)
        });
        Some(self.commit.insert(Commit { ops, task }))
    }

    fn finish_commit(
        &mut self,
        ops: &[CheckpointOp],
        joined: Result<Result<(), StateError>, tokio::task::JoinError>,
    ) -> Result<(), DeliveryError> {
        let result = joined.unwrap_or_else(|e| {
            Err(StateError::Io(format!(
                "checkpoint writer task failed: {e}"
            )))
        });
        if let Err(e) = result {
            // Back at the head, so a retry commits the same ops in the same order (they are
            // idempotent) and nothing after them sneaks in first.
            for op in ops.iter().rev() {
                self.ready.push_front(op.clone());
            }
            return Err(e.into());
        }
        for op in ops {
            apply_op(&mut self.checkpoint, op);
            match op {
                CheckpointOp::Upsert { key, version, .. } => {
                    self.committed.push((key.clone(), Some(*version)));
                }
                CheckpointOp::Remove { key } => self.committed.push((key.clone(), None)),
                _ => {}
            }
        }
        metrics::inc(&metrics().checkpoint_commits_total);
        tracing::debug!(ops = ops.len(), "checkpoint committed");
        Ok(())
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // The gauge is process-wide; take back what this window still counts.
        metrics().in_flight.dec_by(self.in_flight as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Route;
    use crate::state::{redb_store::RedbStore, MemoryStore};
    use serde_json::json;
    use std::collections::HashMap;
    use tokio::sync::{mpsc, oneshot};

    type Log = Arc<Mutex<Vec<String>>>;

    #[derive(Default)]
    struct FakeState {
        senders: HashMap<String, oneshot::Sender<Result<(), SinkError>>>,
        outstanding: usize,
        max_outstanding: usize,
        enqueue_errors: VecDeque<SinkError>,
    }

    /// A sink whose acks the test completes (or, with `auto_ack`, a spawned task after a
    /// short pseudo-random delay).
    struct FakeSink {
        name: String,
        log: Log,
        state: Arc<Mutex<FakeState>>,
        auto_ack: bool,
    }

    impl FakeSink {
        fn new(name: &str, log: &Log) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                log: Arc::clone(log),
                state: Arc::default(),
                auto_ack: false,
            })
        }

        fn auto(name: &str, log: &Log) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                log: Arc::clone(log),
                state: Arc::default(),
                auto_ack: true,
            })
        }

        fn complete(&self, id: &str, result: Result<(), SinkError>) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:ack:{id}", self.name));
            let tx = self.state.lock().unwrap().senders.remove(id);
            tx.unwrap_or_else(|| panic!("{}: {id} not pending", self.name))
                .send(result)
                .unwrap();
        }

        fn ack(&self, id: &str) {
            self.complete(id, Ok(()));
        }

        fn fail(&self, id: &str) {
            self.complete(id, Err(fatal(&self.name)));
        }

        fn max_outstanding(&self) -> usize {
            self.state.lock().unwrap().max_outstanding
        }
    }

    fn fatal(sink: &str) -> SinkError {
        SinkError::Fatal {
            sink: sink.into(),
            message: "refused".into(),
        }
    }

    impl Sink for FakeSink {
        fn name(&self) -> &str {
            &self.name
        }

        fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
            async move {
                let (tx, rx) = oneshot::channel();
                {
                    let mut st = self.state.lock().unwrap();
                    if let Some(e) = st.enqueue_errors.pop_front() {
                        return Err(e);
                    }
                    st.outstanding += 1;
                    st.max_outstanding = st.max_outstanding.max(st.outstanding);
                    st.senders.insert(msg.id.clone(), tx);
                }
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("{}:enq:{}", self.name, msg.id));
                if self.auto_ack {
                    let state = Arc::clone(&self.state);
                    let id = msg.id.clone();
                    let delay = id.bytes().map(u64::from).sum::<u64>() % 7;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let tx = state.lock().unwrap().senders.remove(&id);
                        let _ = tx.map(|tx| tx.send(Ok(())));
                    });
                }
                let state = Arc::clone(&self.state);
                let name = self.name.clone();
                let ack: AckFuture = async move {
                    let result = rx.await.unwrap_or(Err(SinkError::Cancelled { sink: name }));
                    state.lock().unwrap().outstanding -= 1;
                    result
                }
                .boxed();
                Ok(ack)
            }
            .boxed()
        }

        fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
            async { Ok(String::new()) }.boxed()
        }

        fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
            async { Ok(()) }.boxed()
        }
    }

    /// MemoryStore that records every `apply` call, optionally slow or failing.
    #[derive(Default, Clone)]
    struct Recorder {
        calls: Arc<Mutex<Vec<Vec<CheckpointOp>>>>,
        delay: Duration,
        fail_next: Arc<Mutex<usize>>,
    }

    struct RecordingStore {
        inner: MemoryStore,
        rec: Recorder,
    }

    impl CheckpointStore for RecordingStore {
        fn load(&self) -> Result<Checkpoint, StateError> {
            self.inner.load()
        }

        fn reader(&self) -> Arc<dyn EntityReader> {
            self.inner.reader()
        }

        fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError> {
            std::thread::sleep(self.rec.delay);
            {
                let mut fail = self.rec.fail_next.lock().unwrap();
                if *fail > 0 {
                    *fail -= 1;
                    return Err(StateError::Io("disk full".into()));
                }
            }
            self.rec.calls.lock().unwrap().push(ops.to_vec());
            self.inner.apply(ops)
        }
    }

    impl Recorder {
        fn store(&self) -> Box<dyn CheckpointStore> {
            Box::new(RecordingStore {
                inner: MemoryStore::default(),
                rec: self.clone(),
            })
        }

        fn batch_sizes(&self) -> Vec<usize> {
            self.calls.lock().unwrap().iter().map(Vec::len).collect()
        }

        fn all_ops(&self) -> Vec<CheckpointOp> {
            self.calls.lock().unwrap().concat()
        }
    }

    fn msg(id: &str) -> Arc<Message> {
        Arc::new(Message {
            avro: None,
            avro_key: None,
            route: Route::Nodes,
            event: "updated".into(),
            id: id.into(),
            key: id.into(),
            payload: Some(b"{}".to_vec()),
            headers: vec![],
        })
    }

    fn op(key: &str, version: u64) -> CheckpointOp {
        CheckpointOp::Upsert {
            key: key.into(),
            version,
            state: json!({ "v": version }).as_object().cloned().unwrap().into(),
        }
    }

    fn job(frames: u64) -> CheckpointOp {
        CheckpointOp::JobPosition {
            client_id: "c".into(),
            frames,
        }
    }

    fn sinks(list: &[&Arc<FakeSink>]) -> Vec<Arc<dyn Sink>> {
        list.iter()
            .map(|s| Arc::clone(*s) as Arc<dyn Sink>)
            .collect()
    }

    fn cfg(max_in_flight: usize, max_batch: usize) -> DeliveryConfig {
        DeliveryConfig {
            max_in_flight,
            max_batch,
            on_acked: None,
        }
    }

    /// Runs `next_ack` until it would block; returns how many calls made progress.
    async fn pump(d: &mut Delivery) -> usize {
        let mut n = 0;
        while let Some(r) = d.next_ack().now_or_never() {
            if !r.unwrap() {
                break;
            }
            n += 1;
        }
        n
    }

    /// `now_or_never` cannot see a commit on the blocking pool finish; this gives it time.
    async fn settle(d: &mut Delivery) {
        for _ in 0..3 {
            let _ = tokio::time::timeout(Duration::from_millis(20), d.next_ack()).await;
        }
    }

    #[tokio::test]
    async fn gap_holds_the_checkpoint_until_it_fills() {
        let log = Log::default();
        let (a, b) = (FakeSink::new("a", &log), FakeSink::new("b", &log));
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a, &b]), rec.store(), cfg(10, 100)).unwrap();
        d.submit(vec![msg("m1")], vec![op("node:1", 1)])
            .await
            .unwrap();
        d.submit(vec![msg("m2")], vec![op("node:2", 1)])
            .await
            .unwrap();
        assert_eq!(d.in_flight(), 2);

        a.ack("m2");
        b.ack("m2");
        assert!(d.next_ack().await.unwrap());
        a.ack("m1"); // one sink is not enough
        settle(&mut d).await;
        assert_eq!(d.in_flight(), 1);
        assert_eq!(d.reader().count().unwrap(), 0);
        assert!(d.take_committed().is_empty());
        assert!(rec.batch_sizes().is_empty());

        b.ack("m1");
        assert!(d.next_ack().await.unwrap());
        assert_eq!(rec.all_ops(), vec![op("node:1", 1), op("node:2", 1)]);
        assert_eq!(rec.batch_sizes(), vec![2]);
        assert_eq!(d.reader().count().unwrap(), 2);
        assert_eq!(
            d.take_committed(),
            vec![
                ("node:1".to_string(), Some(1)),
                ("node:2".to_string(), Some(1))
            ]
        );
        assert!(d.take_committed().is_empty());
        assert_eq!(d.in_flight(), 0);
        assert!(!d.next_ack().await.unwrap());
    }

    #[tokio::test]
    async fn acks_in_any_order_commit_in_submission_order() {
        let log = Log::default();
        let (a, b) = (FakeSink::new("a", &log), FakeSink::new("b", &log));
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a, &b]), rec.store(), cfg(100, 100)).unwrap();
        let order_sensitive = [
            op("node:1", 1),
            CheckpointOp::Remove {
                key: "node:1".into(),
            },
            op("node:1", 2),
            job(1),
            job(2),
            CheckpointOp::SnapshotComplete,
        ];
        for (i, o) in order_sensitive.iter().enumerate() {
            let msgs = vec![msg(&format!("g{i}-0")), msg(&format!("g{i}-1"))];
            d.submit(msgs, vec![o.clone()]).await.unwrap();
        }
        // Every (message, sink) ack in a scrambled order, committing whatever is ready after each.
        let mut acks = vec![];
        for g in [4, 2, 5, 0, 3, 1] {
            for m in [1, 0] {
                acks.push((g, m));
            }
        }
        for (n, (g, m)) in acks.iter().enumerate() {
            let sink = if n % 2 == 0 { &b } else { &a };
            let other = if n % 2 == 0 { &a } else { &b };
            sink.ack(&format!("g{g}-{m}"));
            other.ack(&format!("g{g}-{m}"));
            pump(&mut d).await;
            settle(&mut d).await;
        }
        d.drain().await.unwrap();
        assert_eq!(rec.all_ops(), order_sensitive.to_vec());
        let mut expected = Checkpoint::default();
        for o in &order_sensitive {
            apply_op(&mut expected, o);
        }
        assert_eq!(d.checkpoint(), &expected);
        assert_eq!(d.reader().get("node:1").unwrap().unwrap().version, 2);
    }

    #[tokio::test]
    async fn full_window_waits_for_an_ack_before_enqueuing() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let mut d = Delivery::new(sinks(&[&a]), Box::<MemoryStore>::default(), cfg(2, 10)).unwrap();
        d.submit(vec![msg("m1")], vec![]).await.unwrap();
        d.submit(vec![msg("m2")], vec![]).await.unwrap();
        let acker = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                a.ack("m2");
            })
        };
        d.submit(vec![msg("m3")], vec![]).await.unwrap();
        acker.await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["a:enq:m1", "a:enq:m2", "a:ack:m2", "a:enq:m3"]
        );
        assert_eq!(d.in_flight(), 2);
        assert_eq!(a.max_outstanding(), 2);
    }

    /// A group larger than the window still goes through, one message at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn window_bound_holds_under_load_on_multi_thread_runtime() {
        let log = Log::default();
        let (a, b) = (FakeSink::auto("a", &log), FakeSink::auto("b", &log));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        let store = Box::new(RedbStore::open(&path).unwrap());
        let max = 8;
        let mut d = Delivery::new(sinks(&[&a, &b]), store, cfg(max, 16)).unwrap();
        let commits_before = metrics().checkpoint_commits_total.get();
        let mut total = 0;
        for g in 0..200u64 {
            let n = if g == 100 { 20 } else { (g % 3) as usize };
            let msgs = (0..n).map(|m| msg(&format!("g{g}-{m}"))).collect();
            total += n;
            d.submit(msgs, vec![op(&format!("node:{}", g % 17), g), job(g)])
                .await
                .unwrap();
            assert!(d.in_flight() <= max, "{} in flight", d.in_flight());
        }
        d.drain().await.unwrap();
        assert_eq!(d.in_flight(), 0);
        assert!(a.max_outstanding() <= max && b.max_outstanding() <= max);
        assert_eq!(log.lock().unwrap().len(), 2 * total);
        assert_eq!(d.checkpoint().jobs["c"], 199);
        assert!(metrics().checkpoint_commits_total.get() > commits_before);
        drop(d);
        let reopened = RedbStore::open(&path).unwrap();
        assert_eq!(reopened.load().unwrap().jobs["c"], 199);
        let entities = reopened.reader();
        assert_eq!(entities.count().unwrap(), 17);
        assert_eq!(entities.get("node:16").unwrap().unwrap().version, 186);
    }

    #[tokio::test]
    async fn fatal_ack_error_surfaces_from_next_ack_and_holds_the_checkpoint() {
        let log = Log::default();
        let (a, b) = (FakeSink::new("a", &log), FakeSink::new("b", &log));
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a, &b]), rec.store(), cfg(10, 10)).unwrap();
        for g in 0..3 {
            d.submit(vec![msg(&format!("m{g}"))], vec![job(g)])
                .await
                .unwrap();
        }
        b.fail("m1");
        let err = d.next_ack().await.unwrap_err();
        assert!(
            matches!(err, DeliveryError::Sink(SinkError::Fatal { .. })),
            "{err}"
        );
        assert!(!err.is_retryable());
        for id in ["m0", "m1", "m2"] {
            a.ack(id);
        }
        b.ack("m0");
        b.ack("m2");
        d.drain().await.unwrap();
        assert_eq!(d.in_flight(), 0);
        assert_eq!(rec.all_ops(), vec![job(0)]);
        assert_eq!(d.checkpoint().jobs["c"], 0);
    }

    #[tokio::test]
    async fn fatal_errors_surface_from_submit_and_drain() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let mut d = Delivery::new(sinks(&[&a]), Box::<MemoryStore>::default(), cfg(1, 10)).unwrap();

        // From enqueue.
        a.state.lock().unwrap().enqueue_errors.push_back(fatal("a"));
        let err = d.submit(vec![msg("m0")], vec![job(0)]).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Sink(SinkError::Fatal { .. })));
        assert_eq!(d.in_flight(), 0);

        // From an ack processed while submit waits for room.
        let mut d = Delivery::new(sinks(&[&a]), Box::<MemoryStore>::default(), cfg(1, 10)).unwrap();
        d.submit(vec![msg("m1")], vec![job(1)]).await.unwrap();
        a.fail("m1");
        let err = d.submit(vec![msg("m2")], vec![job(2)]).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Sink(_)));

        // From drain.
        let mut d = Delivery::new(sinks(&[&a]), Box::<MemoryStore>::default(), cfg(4, 10)).unwrap();
        d.submit(vec![msg("m3")], vec![job(3)]).await.unwrap();
        a.complete("m3", Err(SinkError::Cancelled { sink: "a".into() }));
        assert!(matches!(d.drain().await, Err(DeliveryError::Sink(_))));
        assert!(d.checkpoint().jobs.is_empty());
    }

    #[tokio::test]
    async fn retryable_enqueue_errors_are_retried() {
        let log = Log::default();
        let a = FakeSink::auto("a", &log);
        let mut d = Delivery::new(sinks(&[&a]), Box::<MemoryStore>::default(), cfg(4, 10)).unwrap();
        let retryable = SinkError::Retryable {
            sink: "a".into(),
            message: "queue full".into(),
        };
        a.state
            .lock()
            .unwrap()
            .enqueue_errors
            .extend([retryable.clone(), retryable]);
        d.submit(vec![msg("m0")], vec![job(5)]).await.unwrap();
        d.drain().await.unwrap();
        assert_eq!(d.checkpoint().jobs["c"], 5);
    }

    #[tokio::test]
    async fn acked_groups_are_batched_up_to_max_batch() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(100, 3)).unwrap();
        for g in 0..4u64 {
            d.submit(vec![msg(&format!("m{g}"))], vec![op("node:x", g), job(g)])
                .await
                .unwrap();
        }
        for g in [1, 2, 3] {
            a.ack(&format!("m{g}"));
        }
        assert_eq!(pump(&mut d).await, 1, "ready acks are taken in one call");
        assert!(rec.batch_sizes().is_empty());
        a.ack("m0");
        assert!(d.next_ack().await.unwrap());
        assert_eq!(rec.batch_sizes(), vec![3, 3, 2]);
        assert_eq!(d.checkpoint().jobs["c"], 3);

        // With room, several acked groups land in one transaction.
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(100, 100)).unwrap();
        for g in 0..5u64 {
            d.submit(vec![msg(&format!("n{g}"))], vec![job(g)])
                .await
                .unwrap();
        }
        for g in 0..5 {
            a.ack(&format!("n{g}"));
        }
        assert!(d.next_ack().await.unwrap());
        assert_eq!(rec.batch_sizes(), vec![5]);
    }

    #[tokio::test]
    async fn ops_only_group_waits_its_turn() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let rec = Recorder::default();
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(10, 10)).unwrap();
        d.submit(vec![msg("m0")], vec![job(1)]).await.unwrap();
        d.submit(vec![], vec![CheckpointOp::SnapshotComplete])
            .await
            .unwrap();
        assert!(!d.checkpoint().snapshot_complete);
        a.ack("m0");
        assert!(d.next_ack().await.unwrap());
        assert!(d.checkpoint().snapshot_complete);
        assert_eq!(rec.all_ops(), vec![job(1), CheckpointOp::SnapshotComplete]);

        // With nothing ahead of it, submit starts its commit at once; drain sees it through.
        d.submit(vec![], vec![job(2)]).await.unwrap();
        // The store is written in the background, with no next_ack to drive it.
        for _ in 0..200 {
            if rec.batch_sizes().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rec.batch_sizes(), vec![2, 1]);
        d.drain().await.unwrap();
        assert_eq!(d.checkpoint().jobs["c"], 2);
        assert!(!d.next_ack().await.unwrap());
    }

    #[tokio::test]
    async fn submit_does_not_wait_for_the_store() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let rec = Recorder {
            delay: Duration::from_millis(300),
            ..Recorder::default()
        };
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(10, 10)).unwrap();
        let t = std::time::Instant::now();
        d.submit(vec![], vec![job(1)]).await.unwrap(); // starts a 300 ms commit
        for g in 0..5 {
            d.submit(vec![msg(&format!("m{g}"))], vec![job(2 + g)])
                .await
                .unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert!(d.checkpoint().jobs.is_empty());
        for g in 0..5 {
            a.ack(&format!("m{g}"));
        }
        d.drain().await.unwrap();
        assert_eq!(rec.batch_sizes(), vec![1, 5]);
        assert_eq!(d.checkpoint().jobs["c"], 6);
    }

    #[tokio::test]
    async fn acknowledged_ops_wait_for_at_most_two_transactions() {
        let rec = Recorder {
            delay: Duration::from_millis(5),
            ..Recorder::default()
        };
        // No sinks: every group is acknowledged at once, so only the store holds them back.
        let mut d = Delivery::new(vec![], rec.store(), cfg(10, 3)).unwrap();
        for g in 0..40 {
            d.submit(vec![], vec![job(g)]).await.unwrap();
            assert!(d.ready.len() <= 2 * 3, "{} ops wait", d.ready.len());
        }
        d.drain().await.unwrap();
        assert_eq!(d.checkpoint().jobs["c"], 39);
        assert!(rec.batch_sizes().iter().all(|n| *n <= 3));
    }

    #[tokio::test]
    async fn next_ack_is_cancel_safe() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let rec = Recorder {
            delay: Duration::from_millis(400),
            ..Recorder::default()
        };
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(10, 10)).unwrap();
        d.submit(vec![msg("m0")], vec![job(1)]).await.unwrap();
        d.submit(vec![msg("m1")], vec![job(2)]).await.unwrap();

        // Dropped while waiting for an ack.
        let timed_out = tokio::time::timeout(Duration::from_millis(20), d.next_ack()).await;
        assert!(timed_out.is_err());
        // Dropped while the store writes.
        a.ack("m0");
        let timed_out = tokio::time::timeout(Duration::from_millis(20), d.next_ack()).await;
        assert!(timed_out.is_err());
        assert!(d.checkpoint().jobs.is_empty());
        a.ack("m1");
        d.drain().await.unwrap();
        assert_eq!(rec.all_ops(), vec![job(1), job(2)]);
        assert_eq!(d.checkpoint().jobs["c"], 2);
    }

    /// The app's loop: `next_ack` raced against a source channel in `select!`, so it is
    /// dropped whenever a new group arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn select_loop_loses_nothing() {
        let log = Log::default();
        let a = FakeSink::auto("a", &log);
        let rec = Recorder {
            delay: Duration::from_millis(2),
            ..Recorder::default()
        };
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(4, 5)).unwrap();
        let (tx, mut rx) = mpsc::channel::<u64>(4);
        let producer = tokio::spawn(async move {
            for g in 0..300 {
                tx.send(g).await.unwrap();
                if g % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        loop {
            tokio::select! {
                g = rx.recv() => match g {
                    Some(g) => d.submit(vec![msg(&format!("m{g}"))], vec![job(g)]).await.unwrap(),
                    None => break,
                },
                r = d.next_ack(), if d.in_flight() > 0 => { r.unwrap(); }
            }
        }
        producer.await.unwrap();
        d.drain().await.unwrap();
        assert_eq!(rec.all_ops(), (0..300).map(job).collect::<Vec<_>>());
        assert_eq!(d.checkpoint().jobs["c"], 299);
    }

    #[tokio::test]
    async fn failed_commit_is_retried_in_order() {
        let log = Log::default();
        let a = FakeSink::new("a", &log);
        let rec = Recorder::default();
        *rec.fail_next.lock().unwrap() = 1;
        let mut d = Delivery::new(sinks(&[&a]), rec.store(), cfg(10, 10)).unwrap();
        d.submit(vec![msg("m0")], vec![job(1)]).await.unwrap();
        a.ack("m0");
        assert!(matches!(d.next_ack().await, Err(DeliveryError::State(_))));
        assert!(d.checkpoint().jobs.is_empty());
        d.submit(vec![msg("m1")], vec![job(2)]).await.unwrap();
        a.ack("m1");
        d.drain().await.unwrap();
        assert_eq!(rec.all_ops(), vec![job(1), job(2)]);
    }

    #[tokio::test]
    async fn new_starts_from_the_stored_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(&dir.path().join("cp.redb")).unwrap();
        store.apply(&[op("node:1", 4), job(9)]).unwrap();
        let d = Delivery::new(vec![], Box::new(store), DeliveryConfig::default()).unwrap();
        assert_eq!(d.checkpoint().jobs["c"], 9);
        assert_eq!(d.reader().get("node:1").unwrap().unwrap().version, 4);

        fn assert_send<T: Send>(_: &T) {}
        let mut d = d;
        assert_send(&d.submit(vec![], vec![]));
        assert_send(&d.next_ack());
        assert_send(&d.drain());
    }

    #[tokio::test]
    async fn a_store_that_cannot_load_fails_new() {
        struct Unreadable;
        impl CheckpointStore for Unreadable {
            fn load(&self) -> Result<Checkpoint, StateError> {
                Err(StateError::Corrupt("node:1: bad".into()))
            }
            fn reader(&self) -> Arc<dyn EntityReader> {
                MemoryStore::default().reader()
            }
            fn apply(&mut self, _: &[CheckpointOp]) -> Result<(), StateError> {
                Ok(())
            }
        }
        let err = Delivery::new(vec![], Box::new(Unreadable), cfg(4, 4)).unwrap_err();
        assert!(
            matches!(err, DeliveryError::State(StateError::Corrupt(_))),
            "{err}"
        );
    }

    #[tokio::test]
    async fn no_sinks_means_acked_at_once() {
        let mut d = Delivery::new(vec![], Box::<MemoryStore>::default(), cfg(1, 1)).unwrap();
        d.submit(vec![msg("m0"), msg("m1")], vec![job(3)])
            .await
            .unwrap();
        assert_eq!(d.in_flight(), 0);
        d.drain().await.unwrap();
        assert_eq!(d.checkpoint().jobs["c"], 3);
    }
}
