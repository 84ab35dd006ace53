//! Simulator of the SynapTask job-event WebSocket API (`GET /api/v1/ws/{client_id}?token=…`).
//!
//! This module owns everything about that endpoint: token checks (401), the one-socket-per-
//! `client_id` rule (409), the seeded per-client event generator (`job_progress`,
//! `job_complete`, `file_uploaded`, `error` frames telling plausible job stories), pacing,
//! keep-alive pings with a pong deadline, pause/resume, deliberate malformed frames, and the
//! `/truth` record of every frame actually written to each client.
//!
//! The behaviour follows the job-event table of `shared/api/DECISIONS.md`: no replay (nothing
//! is generated for a client while it is disconnected), a ping every `ping_interval` and a drop
//! when no frame comes back within `pong_timeout`.
//!
//! Determinism: each `client_id` owns one event stream, drawn from a `ChaCha8Rng` whose 32-byte
//! key is `seed` (little endian, bytes 0..8) ++ FNV-1a-64 of the `client_id` bytes (8..16) ++
//! the `client_id` byte length (16..24) ++ zeroes. A stream advances only when a frame was
//! written successfully, so the frames a `client_id` receives over all its connections, in
//! order, are always a prefix of that stream whatever the timing, pauses or reconnects.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Configuration of the job-event WebSocket simulator.
#[derive(Clone)]
pub struct JobsConfig {
    /// Accepted API tokens as `(token, user id)` pairs; any other token (or none) gets HTTP 401.
    pub tokens: Vec<(String, String)>,
    /// Seed of every per-client event stream (combined with the `client_id`, see module doc).
    pub seed: u64,
    /// Events per second sent to each connected client; `0` (or negative, NaN, infinite) sends
    /// none, while keep-alive pings still run.
    pub rate: f64,
    /// Time between two WebSocket pings sent by the server to each client.
    pub ping_interval: Duration,
    /// How long after a ping a client may stay silent (no pong, no frame at all) before it is
    /// dropped and counted in `dropped_no_pong`.
    pub pong_timeout: Duration,
    /// Every Nth frame sent to a client (counted per `client_id`, across reconnects) is a
    /// deliberately malformed, non-JSON text frame, for the connector's bad-input tests;
    /// `None` or `Some(0)` = never. A malformed frame takes a slot but does not consume an
    /// event, so job stories stay complete.
    pub malformed_every: Option<u64>,
}

impl Default for JobsConfig {
    /// No tokens, seed 0, 10 events/s, the documented 20 s ping interval and 20 s pong timeout,
    /// no malformed frames.
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            seed: 0,
            rate: 10.0,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(20),
            malformed_every: None,
        }
    }
}

// Hand-written so that tokens can never leak through `{:?}` in a log line.
impl fmt::Debug for JobsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: Vec<&str> = self.tokens.iter().map(|(_, user)| user.as_str()).collect();
        f.debug_struct("JobsConfig")
            .field(
                "tokens",
                &format_args!("<{} redacted> for {:?}", self.tokens.len(), users),
            )
            .field("seed", &self.seed)
            .field("rate", &self.rate)
            .field("ping_interval", &self.ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("malformed_every", &self.malformed_every)
            .finish()
    }
}

/// The job-event WebSocket simulator: shared state behind an `Arc`, cheap to clone.
///
/// Serve [`JobsSim::router`] with `axum::serve`; inspect what was sent with `GET /truth`.
#[derive(Clone)]
pub struct JobsSim {
    inner: Arc<Inner>,
}

impl fmt::Debug for JobsSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsSim")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl JobsSim {
    /// Creates a simulator; nothing runs until the router is served and clients connect.
    pub fn new(cfg: JobsConfig) -> Self {
        let (paused, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(SimState::default()),
                paused,
                shutdown: CancellationToken::new(),
                next_conn: AtomicU64::new(1),
            }),
        }
    }

    /// Routes: `GET /api/v1/ws/{client_id}?token=…` (WebSocket), `GET /truth`,
    /// `POST /pause` and `POST /resume` (both answer `{"ok":true}`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/ws/{client_id}", get(ws_handler))
            .route("/truth", get(truth_handler))
            .route("/pause", post(pause_handler))
            .route("/resume", post(resume_handler))
            .with_state(Arc::clone(&self.inner))
    }

    /// Closes every open job socket with close code 1001 (and any socket opened afterwards at
    /// once). Call it when stopping the server: upgraded connections are handed off by
    /// `axum::serve`, so its graceful shutdown neither waits for nor ends them.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

struct Inner {
    cfg: JobsConfig,
    state: Mutex<SimState>,
    /// A watch rather than a flag so that paused senders sleep instead of polling.
    paused: watch::Sender<bool>,
    shutdown: CancellationToken,
    next_conn: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters to a simulator, so keep serving rather than cascading the panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn user_for(&self, token: &str) -> Option<&str> {
        self.cfg
            .tokens
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, user)| user.as_str())
    }
}

#[derive(Default)]
struct SimState {
    /// BTreeMap so `/truth` lists clients in a stable order.
    clients: BTreeMap<String, ClientRecord>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    connects: u64,
    rejected_unauthorized: u64,
    rejected_conflict: u64,
    dropped_no_pong: u64,
    events_sent: u64,
}

struct ClientRecord {
    /// Every frame successfully written to this client_id, over all its connections.
    frames: Vec<Value>,
    /// `Some(conn id)` while a socket holds the client_id.
    connected: Option<u64>,
    /// The stream is moved into the live connection's [`Claim`] and back when it ends, so the
    /// sender never takes the global lock to draw an event.
    parked: Option<ClientStream>,
}

/// Why a connection loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientGone,
    NoPong,
    Shutdown,
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn refusal(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({"ok": false, "error": error}))).into_response()
}

async fn ws_handler(
    State(inner): State<Arc<Inner>>,
    Path(client_id): Path<String>,
    query: Result<Query<TokenQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = query.ok().and_then(|Query(q)| q.token);
    let Some(user_id) = token.as_deref().and_then(|t| inner.user_for(t)) else {
        inner.lock().counters.rejected_unauthorized += 1;
        tracing::info!(%client_id, has_token = token.is_some(), "jobs ws: unauthorized");
        return refusal(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let user_id = user_id.to_owned();
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };

    let Some(claim) = Claim::take(&inner, &client_id) else {
        inner.lock().counters.rejected_conflict += 1;
        tracing::info!(%client_id, %user_id, "jobs ws: client_id already connected");
        return refusal(StatusCode::CONFLICT, "client_id_in_use");
    };

    let failed_id = client_id.clone();
    upgrade
        .on_failed_upgrade(move |err| {
            tracing::debug!(client_id = %failed_id, error = %err, "jobs ws: upgrade failed");
        })
        // If the upgrade fails the closure is dropped unrun, and dropping the claim frees
        // the client_id again.
        .on_upgrade(move |socket| run_connection(inner, claim, user_id, socket))
}

async fn truth_handler(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let state = inner.lock();
    let clients: serde_json::Map<String, Value> = state
        .clients
        .iter()
        .map(|(id, rec)| (id.clone(), Value::Array(rec.frames.clone())))
        .collect();
    let c = &state.counters;
    Json(json!({
        "clients": clients,
        "counters": {
            "connects": c.connects,
            "rejected_unauthorized": c.rejected_unauthorized,
            "rejected_conflict": c.rejected_conflict,
            "dropped_no_pong": c.dropped_no_pong,
            "events_sent": c.events_sent,
        }
    }))
}

async fn pause_handler(State(inner): State<Arc<Inner>>) -> Json<Value> {
    inner.paused.send_replace(true);
    tracing::info!("jobs ws: paused");
    Json(json!({"ok": true}))
}

async fn resume_handler(State(inner): State<Arc<Inner>>) -> Json<Value> {
    inner.paused.send_replace(false);
    tracing::info!("jobs ws: resumed");
    Json(json!({"ok": true}))
}

/// Exclusive hold on a client_id for the life of one connection; dropping it (connection over,
/// or upgrade never completed) parks the stream and frees the id atomically, so a reconnect
/// continues exactly where this connection stopped.
struct Claim {
    inner: Arc<Inner>,
    client_id: String,
    conn_id: u64,
    stream: Option<ClientStream>,
}

impl Claim {
    fn take(inner: &Arc<Inner>, client_id: &str) -> Option<Self> {
        let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut state = inner.lock();
        let rec = state
            .clients
            .entry(client_id.to_owned())
            .or_insert_with(|| ClientRecord {
                frames: Vec::new(),
                connected: None,
                parked: Some(ClientStream::new(inner.cfg.seed, client_id)),
            });
        if rec.connected.is_some() {
            return None;
        }
        rec.connected = Some(conn_id);
        let stream = rec
            .parked
            .take()
            .unwrap_or_else(|| ClientStream::new(inner.cfg.seed, client_id));
        Some(Self {
            inner: Arc::clone(inner),
            client_id: client_id.to_owned(),
            conn_id,
            stream: Some(stream),
        })
    }

    /// Writes the next frame of this client's stream, bounded by `deadline`; records it in the
    /// truth only once the write succeeded, and otherwise keeps it for the next attempt.
    async fn send_next(&mut self, socket: &mut WebSocket, deadline: Instant) -> Result<(), End> {
        let Some(stream) = self.stream.as_mut() else {
            // Only Drop empties `stream`, so a live claim always has one.
            return Err(End::ClientGone);
        };
        let frame = stream.next_frame(self.inner.cfg.malformed_every);
        let text = match &frame {
            Frame::Event(value) => value.to_string(),
            Frame::Malformed(raw) => raw.clone(),
        };
        match tokio::time::timeout_at(deadline, socket.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => {
                stream.sent += 1;
                let recorded = match frame {
                    Frame::Event(value) => value,
                    Frame::Malformed(raw) => json!({ "malformed": raw }),
                };
                let mut state = self.inner.lock();
                state.counters.events_sent += 1;
                if let Some(rec) = state.clients.get_mut(&self.client_id) {
                    rec.frames.push(recorded);
                }
                Ok(())
            }
            Ok(Err(_)) => {
                stream.unsend(frame);
                Err(End::ClientGone)
            }
            Err(_) => {
                stream.unsend(frame);
                Err(End::NoPong)
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let stream = self.stream.take();
        let mut state = self.inner.lock();
        if let Some(rec) = state.clients.get_mut(&self.client_id) {
            if rec.connected == Some(self.conn_id) {
                rec.connected = None;
                rec.parked = stream;
            }
        }
    }
}

async fn run_connection(
    inner: Arc<Inner>,
    mut claim: Claim,
    user_id: String,
    mut socket: WebSocket,
) {
    let client_id = claim.client_id.clone();
    inner.lock().counters.connects += 1;
    tracing::info!(%client_id, %user_id, "jobs ws: connected");

    let cfg = &inner.cfg;
    let mut paused_rx = inner.paused.subscribe();
    let mut paused = *paused_rx.borrow_and_update();
    let mut watch_alive = true;
    let mut pacer = Pacer::new(cfg.rate);
    let mut next_ping = Instant::now() + cfg.ping_interval;
    let mut pong_deadline: Option<Instant> = None;

    let end = loop {
        // A blocked write means the client is not reading; give it the same grace as an
        // unanswered ping, counting from the ping that is (or would have been) due.
        let send_by = pong_deadline.unwrap_or(next_ping + cfg.pong_timeout);
        tokio::select! {
            () = inner.shutdown.cancelled() => break End::Shutdown,
            () = sleep_until_opt(pong_deadline) => break End::NoPong,
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break End::ClientGone,
                Some(Ok(_)) => pong_deadline = None,
            },
            () = tokio::time::sleep_until(next_ping) => {
                let due = next_ping;
                match tokio::time::timeout_at(send_by, socket.send(Message::Ping(Bytes::new()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break End::ClientGone,
                    Err(_) => break End::NoPong,
                }
                // An older unanswered ping keeps its earlier deadline.
                pong_deadline.get_or_insert(due + cfg.pong_timeout);
                next_ping = Instant::now() + cfg.ping_interval;
            }
            changed = paused_rx.changed(), if watch_alive => {
                if changed.is_err() {
                    watch_alive = false;
                } else {
                    paused = *paused_rx.borrow_and_update();
                    pacer.restart();
                }
            }
            due = pacer.tick(), if !paused => {
                let mut outcome = Ok(());
                for _ in 0..due {
                    // Re-check between frames of a burst so /pause takes effect promptly.
                    if *paused_rx.borrow() {
                        break;
                    }
                    outcome = claim.send_next(&mut socket, send_by).await;
                    if outcome.is_err() {
                        break;
                    }
                }
                if let Err(end) = outcome {
                    break end;
                }
            }
        }
    };

    let close = match end {
        End::ClientGone => None,
        End::NoPong => {
            inner.lock().counters.dropped_no_pong += 1;
            Some((1008, "pong timeout"))
        }
        End::Shutdown => Some((1001, "server shutting down")),
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // The peer may not be reading at all, so the close frame gets a short best effort
        // before the socket is dropped, which closes the TCP connection regardless.
        let grace = cfg.pong_timeout.min(Duration::from_secs(1));
        let _ = tokio::time::timeout(grace, socket.send(Message::Close(Some(frame)))).await;
    }
    tracing::info!(%client_id, %user_id, reason = ?end, "jobs ws: disconnected");
    drop(socket);
    drop(claim);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Token-bucket pacing on top of a tokio interval, so rates above the timer resolution
/// (about 1 ms) are reached by sending small bursts instead of being capped at 1000/s.
struct Pacer {
    /// `None` when the rate is 0 or invalid: the tick never fires.
    interval: Option<Interval>,
    rate: f64,
    credit: f64,
    max_burst: f64,
    last: Instant,
}

impl Pacer {
    const MIN_PERIOD: Duration = Duration::from_millis(1);

    fn new(rate: f64) -> Self {
        let now = Instant::now();
        if !(rate.is_finite() && rate > 0.0) {
            return Self {
                interval: None,
                rate: 0.0,
                credit: 0.0,
                max_burst: 0.0,
                last: now,
            };
        }
        let period = Duration::from_secs_f64(1.0 / rate).max(Self::MIN_PERIOD);
        let mut interval = tokio::time::interval_at(now + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            interval: Some(interval),
            rate,
            credit: 0.0,
            // A stalled socket must not turn into a huge catch-up burst afterwards.
            max_burst: (rate * period.as_secs_f64() * 2.0).ceil().max(1.0),
            last: now,
        }
    }

    /// Waits for the next tick and returns how many events are due now.
    async fn tick(&mut self) -> u64 {
        let Some(interval) = self.interval.as_mut() else {
            return std::future::pending().await;
        };
        interval.tick().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.credit = (self.credit + self.rate * elapsed).min(self.max_burst);
        // The epsilon absorbs float error when exactly one period has elapsed.
        let due = (self.credit + 1e-6).floor().max(0.0);
        self.credit = (self.credit - due).max(0.0);
        due as u64
    }

    /// Forgets accumulated credit, so a resume does not start with a burst.
    fn restart(&mut self) {
        self.credit = 0.0;
        self.last = Instant::now();
        if let Some(interval) = self.interval.as_mut() {
            interval.reset();
        }
    }
}

/// One frame of a client's stream.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Event(Value),
    Malformed(String),
}

/// The per-client_id stream: the story generator plus its position.
struct ClientStream {
    events: EventGen,
    /// An event drawn but not yet written (the write failed); it goes out first next time.
    pending: Option<Value>,
    /// Frames written so far, malformed ones included; drives `malformed_every`.
    sent: u64,
}

impl ClientStream {
    fn new(seed: u64, client_id: &str) -> Self {
        Self {
            events: EventGen::new(client_rng(seed, client_id)),
            pending: None,
            sent: 0,
        }
    }

    fn next_frame(&mut self, malformed_every: Option<u64>) -> Frame {
        let slot = self.sent + 1;
        if let Some(n) = malformed_every.filter(|n| *n > 0) {
            if slot % n == 0 {
                // Truncated JSON: looks like a real frame to a sloppy parser, but is not JSON.
                return Frame::Malformed(format!(
                    "{{\"type\":\"job_progress\",\"jobId\":\"job_{slot}\",\"progress\":"
                ));
            }
        }
        let value = match self.pending.take() {
            Some(value) => value,
            None => self.events.next_event(),
        };
        Frame::Event(value)
    }

    fn unsend(&mut self, frame: Frame) {
        if let Frame::Event(value) = frame {
            self.pending = Some(value);
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn client_rng(seed: u64, client_id: &str) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&fnv1a64(client_id.as_bytes()).to_le_bytes());
    key[16..24].copy_from_slice(&(client_id.len() as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

const WORDS: &[&str] = &[
    "invoice",
    "report",
    "contract",
    "budget",
    "roadmap",
    "minutes",
    "receipt",
    "proposal",
    "summary",
    "design",
    "notes",
    "plan",
    "agenda",
    "resume",
    "statement",
    "brief",
    "draft",
    "memo",
    "forecast",
    "policy",
];
const EXTENSIONS: &[&str] = &[
    "pdf", "docx", "xlsx", "pptx", "txt", "csv", "png", "jpg", "md",
];
const ERRORS: &[(&str, &str)] = &[
    ("PERMISSION_ERROR", "Permission denied"),
    ("STORAGE_ERROR", "Storage quota exceeded"),
    ("PROCESSING_ERROR", "Failed to process file"),
];

/// Chance that an event is a `file_uploaded` instead of the next step of the current story.
const P_UPLOAD: f64 = 0.2;
/// Chance per job step that the job fails with an `error` event and ends.
const P_ERROR: f64 = 0.03;
/// Chance that one processed file counts as failed in the final `job_complete`.
const P_FILE_FAILS: f64 = 0.05;

struct Job {
    id: u64,
    total: u64,
    processed: u64,
    failed: u64,
}

/// Job stories: a job emits `job_progress` with strictly increasing `processedCount` up to
/// `totalCount`, then `job_complete` (`organized + failed = totalCount`), unless an `error`
/// ends it early; `file_uploaded` events are interleaved; one job at a time per client.
struct EventGen {
    rng: ChaCha8Rng,
    next_job: u64,
    next_file: u64,
    job: Option<Job>,
}

impl EventGen {
    fn new(mut rng: ChaCha8Rng) -> Self {
        // Random bases make ids of different clients unlikely to collide.
        let next_job = rng.gen_range(100..10_000);
        let next_file = rng.gen_range(100..100_000);
        Self {
            rng,
            next_job,
            next_file,
            job: None,
        }
    }

    fn next_event(&mut self) -> Value {
        let Some(job) = self.job.take() else {
            if self.rng.gen_bool(P_UPLOAD) {
                return self.file_uploaded();
            }
            let job = Job {
                id: self.next_job,
                total: self.rng.gen_range(3..=60),
                processed: 0,
                failed: 0,
            };
            self.next_job += 1;
            return self.progress(job);
        };
        if job.processed >= job.total {
            return json!({
                "type": "job_complete",
                "jobId": format!("job_{}", job.id),
                "status": "completed",
                "organized": job.total - job.failed,
                "failed": job.failed,
            });
        }
        if self.rng.gen_bool(P_UPLOAD) {
            self.job = Some(job);
            return self.file_uploaded();
        }
        if self.rng.gen_bool(P_ERROR) {
            let (code, message) = ERRORS[self.rng.gen_range(0..ERRORS.len())];
            return json!({
                "type": "error",
                "jobId": format!("job_{}", job.id),
                "error": message,
                "code": code,
            });
        }
        self.progress(job)
    }

    fn progress(&mut self, mut job: Job) -> Value {
        let max_step = (job.total / 4).max(1);
        let step = self
            .rng
            .gen_range(1..=max_step)
            .min(job.total - job.processed);
        for _ in 0..step {
            if self.rng.gen_bool(P_FILE_FAILS) {
                job.failed += 1;
            }
        }
        job.processed += step;
        let current_file = self.file_name();
        let event = json!({
            "type": "job_progress",
            "jobId": format!("job_{}", job.id),
            "progress": job.processed * 100 / job.total,
            "processedCount": job.processed,
            "totalCount": job.total,
            "currentFile": current_file,
        });
        self.job = Some(job);
        event
    }

    fn file_uploaded(&mut self) -> Value {
        let id = self.next_file;
        self.next_file += 1;
        let name = self.file_name();
        let size: u64 = self.rng.gen_range(1_024..=50_000_000);
        json!({
            "type": "file_uploaded",
            "fileId": format!("file_{id}"),
            "name": name,
            "size": size,
        })
    }

    fn file_name(&mut self) -> String {
        let word = WORDS[self.rng.gen_range(0..WORDS.len())];
        let ext = EXTENSIONS[self.rng.gen_range(0..EXTENSIONS.len())];
        format!("{word}.{ext}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn stream(seed: u64, id: &str, n: usize) -> Vec<Value> {
        let mut s = ClientStream::new(seed, id);
        (0..n)
            .map(|_| match s.next_frame(None) {
                Frame::Event(v) => v,
                Frame::Malformed(raw) => panic!("unexpected malformed frame {raw}"),
            })
            .collect()
    }

    #[test]
    fn streams_are_deterministic_and_distinct() {
        assert_eq!(stream(7, "a", 200), stream(7, "a", 200));
        assert_ne!(stream(7, "a", 50), stream(7, "b", 50));
        assert_ne!(stream(7, "a", 50), stream(8, "a", 50));
    }

    #[test]
    fn job_stories_are_consistent() {
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut finished = 0;
        for ev in stream(42, "client", 5_000) {
            match ev["type"].as_str() {
                Some("job_progress") => {
                    let id = ev["jobId"].as_str().unwrap_or_default().to_owned();
                    let done = ev["processedCount"].as_u64().unwrap_or_default();
                    let total = ev["totalCount"].as_u64().unwrap_or_default();
                    assert!(done > last.get(&id).copied().unwrap_or(0));
                    assert!(done <= total);
                    assert_eq!(ev["progress"].as_u64(), Some(done * 100 / total));
                    last.insert(id, done);
                }
                Some("job_complete") => {
                    let id = ev["jobId"].as_str().unwrap_or_default();
                    let done = last.remove(id).expect("complete after progress");
                    let organized = ev["organized"].as_u64().unwrap_or_default();
                    let failed = ev["failed"].as_u64().unwrap_or_default();
                    assert_eq!(organized + failed, done);
                    finished += 1;
                }
                Some("error") => {
                    assert!(last
                        .remove(ev["jobId"].as_str().unwrap_or_default())
                        .is_some());
                }
                Some("file_uploaded") => {}
                other => panic!("unexpected type {other:?}"),
            }
        }
        assert!(finished > 10);
    }

    #[test]
    fn malformed_slots_do_not_consume_events() {
        let mut s = ClientStream::new(1, "m");
        let mut events = Vec::new();
        for slot in 1..=30u64 {
            let frame = s.next_frame(Some(3));
            s.sent += 1;
            match frame {
                Frame::Malformed(raw) => {
                    assert_eq!(slot % 3, 0);
                    assert!(serde_json::from_str::<Value>(&raw).is_err());
                }
                Frame::Event(v) => events.push(v),
            }
        }
        assert_eq!(events, stream(1, "m", 20));
    }

    #[test]
    fn debug_redacts_tokens() {
        let cfg = JobsConfig {
            tokens: vec![("s3cret-token".into(), "u1".into())],
            ..JobsConfig::default()
        };
        let text = format!("{:?}", JobsSim::new(cfg));
        assert!(!text.contains("s3cret-token"));
        assert!(text.contains("u1"));
    }
}
