//! The SynapTask Socket.IO source: keeps one authenticated session alive (reconnecting with
//! exponential backoff and full jitter, never faster than the documented connect limits) and
//! forwards the live `graph:diff` stream, while one read job at a time runs beside it:
//!
//! - a **history catch-up** (`history`) after any gap (a reconnect, dropped diffs, a restart, a
//!   diff about an unknown entity) and every `history_interval_ms` while connected, from the
//!   position of each scope: history is the way back, and it carries the status transitions a
//!   snapshot cannot show;
//! - a **snapshot** (`snapshot`) only where history cannot help: the first start, a scope whose
//!   history no longer reaches back (the pipeline then publishes a gap record), or the periodic
//!   anti-entropy pass;
//! - all under one read budget per event name (`reads`).
//!
//! Because diffs keep flowing while a job pages, a snapshot or catch-up under load never fills
//! the diff buffer by itself; if the pipeline is slower than the input and diffs are dropped,
//! what follows is a catch-up, not another snapshot.

mod config;
pub mod history;
pub mod reads;
pub mod session;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::config::{HistoryStart, SynapTaskConfig};
use self::history::{CatchUpEnd, Scope, ScopeState};
use self::reads::{ReadError, Reader};
use self::session::{DiffBuffer, Inbound, Refusal, Session};
use self::snapshot::SnapshotEnd;
use super::{Control, Source, SourceError, SourceEvent};
use crate::delivery::SharedStore;
use crate::metrics::{inc, metrics};
use crate::ratelimit::SlidingWindow;
use crate::record::{EntityKind, TraceContext};
use crate::secret::Secret;
use crate::state::CheckpointOp;
use serde_json::{Map, Value};

/// What the SynapTask source hands the pipeline, in the order the pipeline must apply it.
/// One of the few places a snapshot page may take on its way to the pipeline ([`PAGES_AHEAD`]);
/// freed when the pipeline has handled the page, so the source reads ahead of the pipeline by
/// that many pages and no more (a page of 5,000 nodes is tens of megabytes parsed, and a
/// channel of pages filled memory with the whole snapshot when the pipeline was slower).
#[derive(Debug, Default)]
pub struct PageSlot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Clone for PageSlot {
    /// A copy holds no place: only the event the source sent frees one.
    fn clone(&self) -> Self {
        Self { _permit: None }
    }
}

/// Snapshot pages sent and not yet handled by the pipeline, at most. One is enough to keep the
/// pipeline busy: the source reads the next page while the pipeline handles this one, and
/// sends it the moment the slot frees. Each more is another page in memory.
pub const PAGES_AHEAD: usize = 1;

/// "Live diffs were dropped" is logged at most this often; the drop metric counts every one.
const DROP_WARN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum GraphEvent {
    /// A session is established: records get `source = synaptask://<host>/users/<uid>`.
    Session {
        /// The `source` attribute for records from now on.
        source_uri: String,
    },
    /// A snapshot begins: changes seen until [`GraphEvent::SnapshotDone`] count as seen by it.
    SnapshotStart,
    /// A page of a snapshot (`graph:get`): full entities.
    SnapshotPage {
        /// Entities in page order.
        items: Vec<(EntityKind, Map<String, Value>)>,
        /// Held until the pipeline has handled the page.
        slot: PageSlot,
        /// The page ack's trace.
        trace: TraceContext,
    },
    /// The snapshot is complete. Diffs that arrived meanwhile come after this event.
    SnapshotDone {
        /// Keys (`node:<id>`, `link:<id>`) every page listed.
        seen: crate::normalize::SeenKeys,
        /// Trashed entities by key, from `trash:page`; `None` when there is no listing (the
        /// server lacks the event, or `source.trash_listing` is off).
        trash: Option<HashMap<String, Map<String, Value>>>,
        /// The last page's trace.
        trace: TraceContext,
    },
    /// A pushed `graph:diff` payload.
    Diff {
        /// The payload as received.
        payload: Value,
        /// A trace started for it (pushed diffs carry no `trace_id`).
        trace: TraceContext,
    },
    /// History batches of one scope newer than its position, oldest first.
    History {
        /// `USER:<uid>` or `GRAPH:<root>`.
        scope: String,
        /// The batches as `history:page` listed them.
        batches: Vec<Map<String, Value>>,
        /// The trace of the page ack that brought the last of them.
        trace: TraceContext,
    },
    /// A history catch-up of every scope finished (diffs held for unknown entities can be
    /// tried again).
    CatchUpDone,
    /// History does not reach back to a scope's delivered position. The window is published
    /// as a gap record: after the snapshot that reconciles it, or at once when the live stream
    /// covered it (`snapshot: false`).
    Gap {
        /// The scope.
        scope: String,
        /// The delivered position.
        from_op_id: u64,
        /// The oldest op id history still listed.
        oldest_available_op_id: Option<u64>,
        /// Why (`retention`, `history_unavailable ...`, `too_far_behind`).
        reason: String,
        /// A snapshot follows and the record waits for it; otherwise (a periodic poll outran
        /// by retention while the live stream lost nothing) the graph is whole and only the
        /// window's batches are missing from the history stream.
        snapshot: bool,
    },
}

/// Why one connection attempt gave no session.
#[derive(Debug)]
pub enum Attempt {
    /// The server refused the token: fatal, never retried.
    Refused(SourceError),
    /// Anything else (network, limits, timeouts): worth another attempt later.
    Failed(String),
}

/// One connection attempt: opens the transport and waits for the `connected` event, which is
/// what decides success (rust_socketio's `connect()` returns Ok even for a refused token).
pub async fn establish(
    cfg: &SynapTaskConfig,
    token: &Secret,
    buffer: DiffBuffer,
) -> Result<(Session, String), Attempt> {
    let mut session = Session::open(
        &cfg.endpoint(),
        token,
        buffer,
        Duration::from_millis(cfg.ack_timeout_ms),
    )
    .await
    .map_err(|e| Attempt::Failed(format!("cannot reach the API: {e}")))?;
    match session
        .wait_connected(Duration::from_millis(cfg.connect_timeout_ms))
        .await
    {
        Ok(uid) => Ok((session, uid)),
        Err(refusal) => {
            session.close().await;
            Err(match refusal {
                Refusal::Auth { code, message } => Attempt::Refused(SourceError::Auth {
                    url: cfg.url.clone(),
                    code,
                    message,
                }),
                Refusal::Other(reason) => Attempt::Failed(reason),
            })
        }
    }
}

/// The source: config, token, and what it keeps across sessions.
pub struct SynapTaskSource {
    cfg: Arc<SynapTaskConfig>,
    token: Secret,
    /// History positions by scope key: the delivered ones at start, then as fetched.
    states: Arc<Mutex<HashMap<String, ScopeState>>>,
    /// Whether a complete snapshot is behind the working view (checkpoint or this run).
    snapshot_done: bool,
    /// The server answered that it has no `history:page`: every gap needs a snapshot.
    history_off: bool,
    /// Where connection and read attempts are kept, and those of earlier runs.
    connect_log: Option<AttemptLog>,
    /// Objects the last snapshot read, or the checkpoint holds: the next snapshot's expected
    /// size for its progress.
    expected_objects: Arc<std::sync::atomic::AtomicU64>,
    /// Requests from the pipeline (reconcile, catch up), taken by `run`.
    control: Option<mpsc::Receiver<Control>>,
    /// Kept so the channel stays open while the source runs, whoever holds a controller.
    control_tx: mpsc::Sender<Control>,
}

/// Where connection and read attempts are kept, and those of earlier runs.
struct AttemptLog {
    store: SharedStore,
    connects: Vec<u64>,
    reads: Vec<(String, u64)>,
}

/// Why serving a session stopped.
enum Stop {
    Shutdown,
    Lost(String),
}

/// The read job a session runs beside the live stream, one at a time.
enum Job {
    Snapshot(String),
    CatchUp { poll: bool },
}

/// What a finished job says.
enum JobDone {
    Snapshot(SnapshotEnd),
    /// A catch-up's end, and whether it was a periodic poll.
    History(CatchUpEnd, bool),
}

/// What a session still has to do, highest priority first in [`Wants::next`].
#[derive(Default)]
struct Wants {
    snapshot: Option<String>,
    catch_up: bool,
    poll: bool,
    anti_entropy: bool,
}

impl Wants {
    /// Repair before catch-up before the periodic poll before anti-entropy. Scopes without a
    /// position are positioned (a catch-up) before a first snapshot, so that nothing between
    /// the two is missed.
    fn next(&mut self, unpositioned: bool) -> Option<Job> {
        if unpositioned {
            self.catch_up = false;
            self.poll = false;
            return Some(Job::CatchUp { poll: false });
        }
        if let Some(why) = self.snapshot.take() {
            self.anti_entropy = false;
            return Some(Job::Snapshot(why));
        }
        if self.catch_up {
            self.catch_up = false;
            self.poll = false;
            return Some(Job::CatchUp { poll: false });
        }
        if self.poll {
            self.poll = false;
            return Some(Job::CatchUp { poll: true });
        }
        if self.anti_entropy {
            self.anti_entropy = false;
            return Some(Job::Snapshot("periodic anti-entropy".into()));
        }
        None
    }
}

impl SynapTaskSource {
    /// A source for this config; fails when no token is configured.
    pub fn new(cfg: SynapTaskConfig) -> Result<Self, SourceError> {
        cfg.validate().map_err(SourceError::Config)?;
        let token = cfg.token()?;
        let (control_tx, control) = mpsc::channel(4);
        Ok(Self {
            cfg: Arc::new(cfg),
            token,
            states: Arc::default(),
            snapshot_done: false,
            history_off: false,
            connect_log: None,
            expected_objects: Arc::default(),
            control: Some(control),
            control_tx,
        })
    }

    /// A handle through which the pipeline asks for a reconcile or a catch-up.
    pub fn controller(&self) -> mpsc::Sender<Control> {
        self.control_tx.clone()
    }

    /// Starts from the delivered checkpoint: its history positions and whether a complete
    /// snapshot was delivered (then a restart replays history instead of taking a snapshot).
    /// Keeps connection and read attempts in `store` and counts the `connects` and `reads`
    /// of earlier runs (Unix ms) against the budgets, so a connector restarted in a loop by a
    /// supervisor still keeps to the server's connect and read limits.
    pub fn with_attempt_log(
        mut self,
        store: SharedStore,
        connects: &[u64],
        reads: &[(String, u64)],
    ) -> Self {
        self.connect_log = Some(AttemptLog {
            store,
            connects: connects.to_vec(),
            reads: reads.to_vec(),
        });
        self
    }

    /// The size of the graph as the checkpoint knows it (the first snapshot's progress).
    pub fn expecting(self, objects: u64) -> Self {
        self.expected_objects
            .store(objects, std::sync::atomic::Ordering::Relaxed);
        self
    }

    pub fn resume_from(mut self, history: &HashMap<String, u64>, snapshot_complete: bool) -> Self {
        self.snapshot_done = snapshot_complete;
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        for (scope, op_id) in history {
            states.entry(scope.clone()).or_default().cursor = Some(*op_id);
        }
        drop(states);
        self
    }

    fn backoff(&self, failures: u32) -> Duration {
        self.cfg.backoff(failures)
    }

    fn history_on(&self) -> bool {
        self.cfg.history && !self.history_off
    }

    /// The history scopes of a session of `uid`.
    fn scopes(&self, uid: &str) -> Vec<Scope> {
        let mut out = Vec::new();
        if let Some(root) = &self.cfg.root {
            // GRAPH scope takes a node id (facts §9.2); a public token has no history scope.
            if uuid::Uuid::parse_str(root).is_ok() {
                out.push(Scope {
                    kind: "GRAPH",
                    id: root.clone(),
                });
            }
        } else if self.cfg.history_user_scope && !uid.is_empty() {
            out.push(Scope {
                kind: "USER",
                id: uid.to_string(),
            });
        }
        out.extend(self.cfg.history_roots.iter().map(|r| Scope {
            kind: "GRAPH",
            id: r.clone(),
        }));
        out
    }

    fn unpositioned(&self, scopes: &[Scope]) -> bool {
        if !self.history_on() {
            return false;
        }
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        scopes
            .iter()
            .any(|s| states.get(&s.key()).is_none_or(|st| st.cursor.is_none()))
    }

    async fn run_loop(
        mut self,
        out: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        // `run` consumes the source, so the receiver is always there; a fresh channel whose
        // sender lives in `self` would do as well.
        let mut control = match self.control.take() {
            Some(c) => c,
            None => {
                let (tx, rx) = mpsc::channel(4);
                self.control_tx = tx;
                rx
            }
        };
        let mut connects: SlidingWindow<()> =
            SlidingWindow::new(self.cfg.connects_per_minute, Duration::from_secs(60));
        // Outlives sessions: the server's read windows do not restart when we reconnect.
        let mut reads = SlidingWindow::new(
            self.cfg.read_budget,
            Duration::from_millis(self.cfg.read_window_ms),
        );
        let connect_log = self.connect_log.take().map(|log| {
            let now = crate::record::unix_millis();
            for t in log.connects {
                connects.seed(&(), Duration::from_millis(now.saturating_sub(t)));
            }
            for (event, t) in log.reads {
                if let Some(event) = reads::READ_EVENTS.iter().find(|e| **e == event) {
                    reads.seed(event, Duration::from_millis(now.saturating_sub(t)));
                }
            }
            log.store
        });
        let budget = Arc::new(Mutex::new(reads));
        let mut failures: u32 = 0;
        loop {
            // Backoff with full jitter, then the connect budget: the budget alone caps attempts
            // below the documented limits whatever the backoff says.
            let delay = if failures == 0 {
                Duration::ZERO
            } else {
                self.backoff(failures)
            };
            let budget_wait = connects.wait_time(&());
            let wait = delay.max(budget_wait);
            if budget_wait > delay {
                tracing::warn!(
                    wait_secs = budget_wait.as_secs_f64(),
                    connects_per_minute = self.cfg.connects_per_minute,
                    "the connect budget is spent by recent attempts (earlier runs' included); waiting before connecting"
                );
                metrics()
                    .connect_budget_wait_seconds_total
                    .inc_by(budget_wait.as_secs_f64());
            }
            if !wait.is_zero() {
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    failures,
                    "reconnecting after a pause"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let sent = connects.hit(&());
            inc(&metrics().connect_attempts_total);
            if let Some(store) = &connect_log {
                // Before the attempt: a crash right after it must still count it.
                let at_ms = crate::record::unix_millis();
                if let Err(e) = store
                    .apply(vec![CheckpointOp::ConnectAttempt { at_ms }])
                    .await
                {
                    tracing::warn!(error = %e, "cannot record the connection attempt in the state store");
                }
            }
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                a = establish(&self.cfg, &self.token, self.cfg.diff_buffer()) => a,
            };
            // Counted from when the handshake ended, as reads are (see `reads`).
            connects.moved(&(), sent, std::time::Instant::now());
            let (mut session, uid) = match attempt {
                Ok(established) => established,
                Err(Attempt::Refused(e)) => return Err(e),
                Err(Attempt::Failed(reason)) => {
                    failures += 1;
                    tracing::warn!(%reason, url = %self.cfg.url, "session not established");
                    continue;
                }
            };
            inc(&metrics().connects_total);
            crate::health::set_source_up(true);
            tracing::info!(%uid, url = %self.cfg.url, "connected to SynapTask");
            let source_uri = format!("synaptask://{}/users/{uid}", self.cfg.host());
            if out
                .send(GraphEvent::Session { source_uri }.into())
                .await
                .is_err()
            {
                return Err(SourceError::PipelineClosed);
            }
            let started = tokio::time::Instant::now();
            let reader = Reader::new(
                session.caller(),
                budget.clone(),
                self.cfg.clone(),
                out.clone(),
                shutdown.clone(),
            )
            .with_log(connect_log.clone())
            .with_expected(Arc::clone(&self.expected_objects));
            let stop = self.serve(&mut session, &uid, &reader, &mut control).await;
            crate::health::set_source_up(false);
            let stop = stop?;
            session.close().await;
            match stop {
                Stop::Shutdown => return Ok(()),
                Stop::Lost(reason) => {
                    // A session that lasted a while resets the backoff; a flapping one does not.
                    failures = if started.elapsed() > Duration::from_secs(60) {
                        1
                    } else {
                        failures + 1
                    };
                    tracing::warn!(%reason, "session lost; will reconnect and catch up");
                }
            }
        }
    }

    fn start(
        &self,
        job: Job,
        reader: &Reader,
        scopes: &[Scope],
    ) -> BoxFuture<'static, Result<JobDone, SourceError>> {
        let r = reader.clone();
        match job {
            Job::Snapshot(why) => {
                tracing::info!(reason = %why, "snapshot started");
                async move { Ok(JobDone::Snapshot(snapshot::run(&r).await?)) }.boxed()
            }
            Job::CatchUp { poll } => {
                let first = if poll {
                    self.cfg.history_poll_limit
                } else {
                    self.cfg.history_page_limit
                };
                let scopes = scopes.to_vec();
                let shared = self.states.clone();
                async move {
                    // Worked on a copy: a job dropped with its session leaves the positions it
                    // had not finished with, and the next catch-up fetches those batches again.
                    let mut states = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let end = history::run(&r, &scopes, &mut states, first).await?;
                    if matches!(end, CatchUpEnd::Done(_)) {
                        *shared.lock().unwrap_or_else(|e| e.into_inner()) = states;
                    }
                    Ok(JobDone::History(end, poll))
                }
                .boxed()
            }
        }
    }

    /// Forwards one thing the session's callbacks saw; `Some(stop)` when the session ended.
    async fn forward(&self, m: Option<Inbound>, r: &Reader) -> Result<Option<Stop>, SourceError> {
        let ev = match m {
            None => return Ok(Some(Stop::Lost("session channels closed".into()))),
            Some(Inbound::Closed(reason)) => return Ok(Some(Stop::Lost(reason))),
            Some(Inbound::Diff(payload, _)) => {
                inc(&metrics().source_events_total);
                GraphEvent::Diff {
                    payload,
                    trace: TraceContext::new_root(),
                }
                .into()
            }
            Some(Inbound::BadDiff { raw, reason }) => SourceEvent::Malformed {
                event: "graph:diff".into(),
                raw,
                reason,
            },
            Some(Inbound::RateLimitedEvent) => {
                inc(&metrics().reads_rate_limited_total);
                return Ok(None);
            }
            Some(_) => return Ok(None),
        };
        r.send(ev).await?;
        Ok(None)
    }

    /// The live stream with one read job at a time beside it, until the session is lost or
    /// shutdown. The reader carries the pipeline's sender and the shutdown token.
    async fn serve(
        &mut self,
        session: &mut Session,
        uid: &str,
        reader: &Reader,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<Stop, SourceError> {
        let scopes = self.scopes(uid);
        if scopes.is_empty() && self.cfg.history && !self.history_off {
            tracing::warn!("no history scope to follow (a branch given by public token, or every scope off); gaps will be reconciled with snapshots");
            self.history_off = true;
        }
        let mut wants = Wants::default();
        // Diffs sent while we were away are gone: history brings them back where it can, a
        // snapshot where it cannot.
        if self.history_on() && self.snapshot_done {
            wants.catch_up = true;
        } else {
            wants.snapshot = Some(if self.snapshot_done {
                "new session (history off)".into()
            } else {
                "first snapshot".into()
            });
        }
        let hb = if self.cfg.heartbeat_ms == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(self.cfg.heartbeat_ms)
        };
        let mut heartbeat = tokio::time::interval(hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_alive = tokio::time::Instant::now();
        // A server that never answers `ws:ping` (it is only in a changelog) is not dead for
        // that: without a first pong, liveness is left to Engine.IO's own ping and to the acks
        // of the periodic history poll.
        let mut pong_seen = false;
        let poll_every = Duration::from_millis(self.cfg.history_interval_ms.max(1));
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + poll_every, poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ae_every = Duration::from_secs(self.cfg.reconcile_interval_secs.max(1));
        let mut anti_entropy =
            tokio::time::interval_at(tokio::time::Instant::now() + ae_every, ae_every);
        anti_entropy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut job: Option<BoxFuture<'static, Result<JobDone, SourceError>>> = None;
        // Live diffs were lost (or may have been: a new session) since the last catch-up began.
        let mut diffs_lost = true;
        let mut drops_unlogged = 0u64;
        let mut last_drop_warn = None;
        loop {
            if job.is_none() {
                let unpositioned = self.unpositioned(&scopes);
                if let Some(next) = wants.next(unpositioned) {
                    job = Some(self.start(next, reader, &scopes));
                }
            }
            tokio::select! {
                _ = reader.shutdown.cancelled() => return Ok(Stop::Shutdown),
                done = async { match job.as_mut() { Some(j) => j.await, None => std::future::pending().await } }, if job.is_some() => {
                    job = None;
                    match done? {
                        JobDone::Snapshot(SnapshotEnd::Done(ev)) => {
                            // Diffs that arrived before the last ack go first: the pipeline
                            // judges disappearances with them applied. Only those: draining
                            // until the queue is empty never ends while diffs arrive faster
                            // than the pipeline takes them, and the snapshot was then never
                            // merged (seen on a loaded machine: 130 s and counting).
                            for _ in 0..session.diffs_waiting() {
                                let Some(m) = session.try_next_diff() else { break };
                                if let Some(stop) = self.forward(Some(m), reader).await? {
                                    return Ok(stop);
                                }
                            }
                            reader.send(ev).await?;
                            self.snapshot_done = true;
                            if self.history_on() {
                                // Covers what changed while the snapshot was read.
                                wants.catch_up = true;
                            }
                        }
                        JobDone::Snapshot(SnapshotEnd::Failed(e)) | JobDone::History(CatchUpEnd::Failed(e), _) => match e {
                            ReadError::Shutdown => return Ok(Stop::Shutdown),
                            ReadError::Lost(reason) => return Ok(Stop::Lost(reason)),
                            ReadError::NotImplemented(code) => {
                                tracing::warn!(%code, "history:page is not available; gaps will be reconciled with snapshots");
                                self.history_off = true;
                                if !self.snapshot_done {
                                    wants.snapshot = Some("first snapshot".into());
                                }
                            }
                        },
                        JobDone::History(CatchUpEnd::Done(gaps), poll) => {
                            if !gaps.is_empty() {
                                if gaps.iter().any(|g| g.reason.starts_with("history_unavailable")) {
                                    self.history_off = true;
                                }
                                // A poll that retention outran while the live stream lost
                                // nothing: the graph is whole, only batches are missing.
                                let snapshot = !poll || diffs_lost;
                                for g in gaps {
                                    inc(&metrics().gaps_total);
                                    let ev = GraphEvent::Gap {
                                        scope: g.scope,
                                        from_op_id: g.from_op_id,
                                        oldest_available_op_id: g.oldest_available_op_id,
                                        reason: g.reason,
                                        snapshot,
                                    };
                                    reader.send(ev).await?;
                                }
                                if snapshot {
                                    wants.snapshot = Some("history does not reach back".into());
                                }
                            }
                            diffs_lost = false;
                            if wants.snapshot.is_none() && !self.snapshot_done {
                                wants.snapshot = Some("first snapshot".into());
                            }
                        }
                    }
                }
                c = control.recv() => match c {
                    Some(Control::Reconcile { reason }) => {
                        tracing::info!(%reason, "reconcile requested");
                        inc(&metrics().reconciles_total);
                        wants.snapshot = Some(reason);
                    }
                    Some(Control::CatchUp { reason }) => {
                        tracing::debug!(%reason, "catch-up requested");
                        diffs_lost = true;
                        if self.history_on() {
                            wants.catch_up = true;
                        } else {
                            inc(&metrics().reconciles_total);
                            wants.snapshot = Some(reason);
                        }
                    }
                    None => {}
                },
                _ = poll.tick(), if self.history_on() && self.cfg.history_interval_ms > 0 => wants.poll = true,
                _ = anti_entropy.tick(), if self.cfg.reconcile_interval_secs > 0 => wants.anti_entropy = true,
                _ = heartbeat.tick(), if self.cfg.heartbeat_ms > 0 => {
                    if pong_seen && last_alive.elapsed() > Duration::from_millis(self.cfg.heartbeat_timeout_ms) {
                        return Ok(Stop::Lost("no sign of life within the heartbeat timeout".into()));
                    }
                    if !pong_seen && last_alive.elapsed() > Duration::from_millis(self.cfg.heartbeat_timeout_ms) {
                        tracing::debug!("no ws:pong yet; relying on Engine.IO's heartbeat");
                    }
                    if let Err(e) = session.ping().await {
                        return Ok(Stop::Lost(e.to_string()));
                    }
                }
                m = session.next() => {
                    last_alive = tokio::time::Instant::now();
                    if matches!(m, Some(Inbound::Pong)) {
                        pong_seen = true;
                    }
                    if let Some(stop) = self.forward(m, reader).await? {
                        return Ok(stop);
                    }
                    let dropped = session.take_dropped();
                    if dropped > 0 {
                        diffs_lost = true;
                        // While the pipeline stays full this happens after nearly every diff:
                        // one line per 5 s with the sum (the metric has every drop).
                        drops_unlogged += dropped;
                        if last_drop_warn.is_none_or(|at: tokio::time::Instant| at.elapsed() >= DROP_WARN_EVERY) {
                            tracing::warn!(dropped = drops_unlogged, "live diffs were dropped while the pipeline was full; catching up");
                            drops_unlogged = 0;
                            last_drop_warn = Some(tokio::time::Instant::now());
                        }
                        if self.history_on() {
                            wants.catch_up = true;
                        } else {
                            inc(&metrics().reconciles_total);
                            wants.snapshot = Some("live diffs were dropped".into());
                        }
                    }
                }
            }
        }
    }
}

impl Source for SynapTaskSource {
    fn name(&self) -> &str {
        "synaptask"
    }

    fn run(
        self: Box<Self>,
        out: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        (*self).run_loop(out, shutdown).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_and_host() {
        let cfg = SynapTaskConfig {
            url: "http://127.0.0.1:3000/".into(),
            ..Default::default()
        };
        assert_eq!(cfg.endpoint(), "http://127.0.0.1:3000/socket.io/");
        assert_eq!(cfg.host(), "127.0.0.1:3000");
        let cfg = SynapTaskConfig {
            path: "/ext-socket.io".into(),
            ..Default::default()
        };
        assert_eq!(cfg.endpoint(), "https://synaptask.space/ext-socket.io/");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let cfg = SynapTaskConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..Default::default()
        };
        let s = SynapTaskSource {
            cfg: Arc::new(cfg),
            token: Secret::new("x"),
            states: Arc::default(),
            snapshot_done: false,
            history_off: false,
            connect_log: None,
            expected_objects: Arc::default(),
            control: None,
            control_tx: mpsc::channel(1).0,
        };
        for f in 1..30 {
            assert!(s.backoff(f) <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = SynapTaskConfig {
            page_limit: 0,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("source.page_limit"));
    }
}
