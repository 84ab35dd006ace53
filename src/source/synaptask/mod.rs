//! The SynapTask Socket.IO source: keeps one authenticated session alive (reconnecting with
//! exponential backoff and full jitter, never faster than the documented connect limits), takes
//! a snapshot with paginated `graph:get` under a client-side read budget while it buffers the
//! live `graph:diff` events, and then forwards the live stream. Any time changes may have been
//! missed (a reconnect, dropped diffs, a request from the pipeline) it takes the snapshot again.

pub mod session;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::session::{CallError, Inbound, Refusal, Session};
use super::{Control, Source, SourceError, SourceEvent};
use crate::metrics::{inc, metrics};
use crate::ratelimit::SlidingWindow;
use crate::record::{EntityKind, TraceContext};
use crate::secret::Secret;

/// `[source]`: where the SynapTask API is and how to treat it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynapTaskConfig {
    /// Server URL, `https://synaptask.space` in production.
    pub url: String,
    /// Socket.IO path: `/socket.io` as documented; some deployments use `/ext-socket.io`.
    pub path: String,
    /// Environment variable that holds the API token.
    pub token_env: String,
    /// File that holds the API token, read when the variable is unset (e.g. a mounted secret).
    pub token_file: Option<PathBuf>,
    /// Objects per `graph:get` page (1..=5000).
    pub page_limit: u32,
    /// Objects each page re-reads from the previous one, so that pages shifting under
    /// concurrent deletes (DECISIONS #6) skip nothing; repeats are merged away by version.
    pub page_overlap: u32,
    /// Reads allowed per window, all read events together (documented: 5 per 10 s).
    pub read_budget: usize,
    /// The read window in milliseconds.
    pub read_window_ms: u64,
    /// How long to wait for an ack, in milliseconds.
    pub ack_timeout_ms: u64,
    /// How long to wait for the `connected` event after connecting, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Connect attempts allowed per minute (documented limits: 10 per IP, 20 per user).
    pub connects_per_minute: usize,
    /// First reconnect delay bound, in milliseconds (full jitter below it).
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay bound, in milliseconds.
    pub backoff_max_ms: u64,
    /// `ws:ping` interval in milliseconds (0 = off); no answer or event for `heartbeat_timeout_ms` means the session is dead.
    pub heartbeat_ms: u64,
    /// Silence after which a session counts as dead, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Live diffs held while the pipeline is busy; beyond it they are dropped and a snapshot reconciles.
    pub diff_buffer: usize,
    /// List the trash after a snapshot, to tell trashed from deleted entities that disappeared.
    pub trash_listing: bool,
}

impl Default for SynapTaskConfig {
    fn default() -> Self {
        Self {
            url: "https://synaptask.space".into(),
            path: "/socket.io".into(),
            token_env: "SYNAPTASK_API_TOKEN".into(),
            token_file: None,
            page_limit: 5000,
            page_overlap: 50,
            read_budget: 5,
            read_window_ms: 10_000,
            ack_timeout_ms: 15_000,
            connect_timeout_ms: 10_000,
            connects_per_minute: 8,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            heartbeat_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            diff_buffer: 10_000,
            trash_listing: true,
        }
    }
}

impl SynapTaskConfig {
    /// Checks value ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=5000).contains(&self.page_limit) {
            return Err("source.page_limit must be between 1 and 5000".into());
        }
        if self.page_overlap >= self.page_limit {
            return Err("source.page_overlap must be smaller than source.page_limit".into());
        }
        if self.read_budget == 0 || self.connects_per_minute == 0 {
            return Err(
                "source.read_budget and source.connects_per_minute must be at least 1".into(),
            );
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!(
                "source.url must start with http:// or https://, got {:?}",
                self.url
            ));
        }
        Ok(())
    }

    /// The Engine.IO URL: server URL plus the Socket.IO path.
    pub fn endpoint(&self) -> String {
        format!(
            "{}/{}/",
            self.url.trim_end_matches('/'),
            self.path.trim_matches('/')
        )
    }

    /// The host part of the URL, for record sources.
    pub fn host(&self) -> String {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_string()
    }

    /// Reads the token from `token_env` or `token_file`.
    pub fn token(&self) -> Result<Secret, SourceError> {
        Secret::load(Some(&self.token_env), self.token_file.as_deref())
            .map_err(|e| SourceError::Config(e.to_string()))?
            .ok_or_else(|| {
                SourceError::Config(format!(
                    "no API token: set the environment variable {} or source.token_file",
                    self.token_env
                ))
            })
    }
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
    diff_buffer: usize,
) -> Result<(Session, String), Attempt> {
    let mut session = Session::open(
        &cfg.endpoint(),
        token,
        diff_buffer,
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

/// The source: config plus the token.
pub struct SynapTaskSource {
    cfg: SynapTaskConfig,
    token: Secret,
    /// When the last snapshot finished paging (diffs that arrived earlier are covered by it).
    last_snapshot_done: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Why serving a session stopped.
enum Stop {
    Shutdown,
    Lost(String),
}

impl SynapTaskSource {
    /// A source for this config; fails when no token is configured.
    pub fn new(cfg: SynapTaskConfig) -> Result<Self, SourceError> {
        cfg.validate().map_err(SourceError::Config)?;
        let token = cfg.token()?;
        Ok(Self {
            cfg,
            token,
            last_snapshot_done: std::sync::Mutex::new(None),
        })
    }

    fn backoff(&self, failures: u32) -> Duration {
        let cap = self
            .cfg
            .backoff_initial_ms
            .saturating_mul(1u64 << failures.min(20))
            .min(self.cfg.backoff_max_ms)
            .max(1);
        Duration::from_millis(rand::thread_rng().gen_range(0..=cap))
    }

    async fn run_loop(
        self,
        out: mpsc::Sender<SourceEvent>,
        mut control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut connects: SlidingWindow<()> =
            SlidingWindow::new(self.cfg.connects_per_minute, Duration::from_secs(60));
        let mut reads: SlidingWindow<()> = SlidingWindow::new(
            self.cfg.read_budget,
            Duration::from_millis(self.cfg.read_window_ms),
        );
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
            connects.try_hit(&());
            inc(&metrics().connect_attempts_total);
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                a = establish(&self.cfg, &self.token, self.cfg.diff_buffer) => a,
            };
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
            tracing::info!(%uid, url = %self.cfg.url, "connected to SynapTask");
            let source_uri = format!("synaptask://{}/users/{uid}", self.cfg.host());
            if out.send(SourceEvent::Session { source_uri }).await.is_err() {
                return Err(SourceError::PipelineClosed);
            }
            let started = tokio::time::Instant::now();
            let stop = self
                .serve(&mut session, &out, &mut control, &mut reads, &shutdown)
                .await?;
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
                    tracing::warn!(%reason, "session lost; will reconnect and reconcile");
                }
            }
        }
    }

    /// Snapshot, then the live stream, until the session is lost or shutdown.
    async fn serve(
        &self,
        session: &mut Session,
        out: &mpsc::Sender<SourceEvent>,
        control: &mut mpsc::Receiver<Control>,
        reads: &mut SlidingWindow<()>,
        shutdown: &CancellationToken,
    ) -> Result<Stop, SourceError> {
        // Every session starts with a snapshot: diffs sent while we were away are gone.
        if let Some(stop) = self.snapshot(session, out, reads, shutdown).await? {
            return Ok(stop);
        }
        let hb = if self.cfg.heartbeat_ms == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(self.cfg.heartbeat_ms)
        };
        let mut heartbeat = tokio::time::interval(hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_alive = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Stop::Shutdown),
                c = control.recv() => {
                    if let Some(Control::Reconcile { reason }) = c {
                        tracing::info!(%reason, "reconcile requested");
                        inc(&metrics().reconciles_total);
                        if let Some(stop) = self.snapshot(session, out, reads, shutdown).await? {
                            return Ok(stop);
                        }
                    }
                }
                _ = heartbeat.tick(), if self.cfg.heartbeat_ms > 0 => {
                    if last_alive.elapsed() > Duration::from_millis(self.cfg.heartbeat_timeout_ms) {
                        return Ok(Stop::Lost("no sign of life within the heartbeat timeout".into()));
                    }
                    if let Err(e) = session.ping().await {
                        return Ok(Stop::Lost(e.to_string()));
                    }
                }
                m = session.next() => {
                    last_alive = tokio::time::Instant::now();
                    match m {
                        None => return Ok(Stop::Lost("session channels closed".into())),
                        Some(Inbound::Closed(reason)) => return Ok(Stop::Lost(reason)),
                        Some(Inbound::Diff(payload, received)) => {
                            inc(&metrics().source_events_total);
                            let done = *self.last_snapshot_done.lock().unwrap_or_else(|e| e.into_inner());
                            let covered = done.is_some_and(|done| received < done);
                            let ev = SourceEvent::Diff { payload, covered, trace: TraceContext::new_root() };
                            if out.send(ev).await.is_err() {
                                return Err(SourceError::PipelineClosed);
                            }
                        }
                        Some(Inbound::BadDiff { raw, reason }) => {
                            let ev = SourceEvent::Malformed { event: "graph:diff".into(), raw, reason };
                            if out.send(ev).await.is_err() {
                                return Err(SourceError::PipelineClosed);
                            }
                        }
                        Some(Inbound::RateLimitedEvent) => inc(&metrics().reads_rate_limited_total),
                        Some(_) => {}
                    }
                    let dropped = session.take_dropped();
                    if dropped > 0 {
                        tracing::warn!(dropped, "live diffs were dropped while the pipeline was full; reconciling");
                        inc(&metrics().reconciles_total);
                        if let Some(stop) = self.snapshot(session, out, reads, shutdown).await? {
                            return Ok(stop);
                        }
                    }
                }
            }
        }
    }

    /// One read under the budget: waits for room, retries `rate_limited` (never fails on it),
    /// retries timeouts and error acks a few times. `Ok(None)` means shutdown, `Err(reason)`
    /// that the session should be considered lost.
    async fn read(
        &self,
        session: &Session,
        reads: &mut SlidingWindow<()>,
        event: &str,
        data: Value,
        shutdown: &CancellationToken,
    ) -> Result<Option<Value>, String> {
        let mut attempts = 0u32;
        loop {
            loop {
                let wait = reads.wait_time(&());
                if wait.is_zero() {
                    break;
                }
                // A little slack over the window, so our clock and the server's never disagree.
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait + Duration::from_millis(150)) => {}
                }
            }
            reads.try_hit(&());
            inc(&metrics().reads_total);
            let reply = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = session.call(event, data.clone()) => r,
            };
            match reply {
                Ok(ack) if ack.get("ok").and_then(Value::as_bool) == Some(true) => {
                    return Ok(Some(ack))
                }
                Ok(ack) => {
                    let code = ack
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string();
                    if code == "rate_limited" || code.ends_with(".rate_limited") {
                        inc(&metrics().reads_rate_limited_total);
                        tracing::info!(event, "read rate-limited by the server; waiting a window");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(None),
                            _ = tokio::time::sleep(Duration::from_millis(self.cfg.read_window_ms)) => {}
                        }
                        continue;
                    }
                    attempts += 1;
                    let trace_id = ack
                        .get("trace_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    tracing::warn!(event, %code, trace_id, "read failed");
                    if attempts >= 3 {
                        return Err(format!("{event} keeps failing: {code}"));
                    }
                    tokio::time::sleep(self.backoff(attempts)).await;
                }
                Err(CallError::Timeout(_)) => {
                    attempts += 1;
                    tracing::warn!(event, attempts, "read got no ack in time");
                    if attempts >= 3 {
                        return Err(format!("{event}: no ack after {attempts} attempts"));
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Pages the whole graph, then the trash, and sends them on. Diffs arriving meanwhile stay
    /// in the session's buffer and are forwarded after `SnapshotDone`.
    async fn snapshot(
        &self,
        session: &mut Session,
        out: &mpsc::Sender<SourceEvent>,
        reads: &mut SlidingWindow<()>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stop>, SourceError> {
        let started = std::time::Instant::now();
        let limit = self.cfg.page_limit;
        let step = u64::from(limit - self.cfg.page_overlap);
        let mut offset: u64 = 0;
        let mut seen = HashSet::new();
        let mut trace;
        let mut pages = 0u32;
        loop {
            let ack = match self
                .read(
                    session,
                    reads,
                    "graph:get",
                    json!({"limit": limit, "offset": offset}),
                    shutdown,
                )
                .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => return Ok(Some(Stop::Shutdown)),
                Err(reason) => return Ok(Some(Stop::Lost(reason))),
            };
            pages += 1;
            trace = ack
                .get("trace_id")
                .and_then(Value::as_str)
                .map_or_else(TraceContext::new_root, TraceContext::from_source);
            let items = self.page_items(&ack, out).await?;
            seen.extend(
                items
                    .iter()
                    .filter_map(|(k, m)| m.get("id").and_then(Value::as_str).map(|id| k.key(id))),
            );
            inc(&metrics().source_events_total);
            if out
                .send(SourceEvent::SnapshotPage {
                    items,
                    trace: trace.clone(),
                })
                .await
                .is_err()
            {
                return Err(SourceError::PipelineClosed);
            }
            if ack.get("hasMore").and_then(Value::as_bool) != Some(true) {
                break;
            }
            offset += step;
        }
        let trash = if self.cfg.trash_listing {
            match self.trash(session, reads, out, shutdown).await? {
                Ok(t) => t,
                Err(stop) => return Ok(Some(stop)),
            }
        } else {
            None
        };
        inc(&metrics().snapshots_total);
        tracing::info!(
            pages,
            entities = seen.len(),
            trashed = trash.as_ref().map_or(0, HashMap::len),
            secs = started.elapsed().as_secs_f64(),
            "snapshot complete"
        );
        if out
            .send(SourceEvent::SnapshotDone { seen, trash, trace })
            .await
            .is_err()
        {
            return Err(SourceError::PipelineClosed);
        }
        Ok(None)
    }

    /// `trash:page` until done; a server without the event gives an empty listing.
    async fn trash(
        &self,
        session: &Session,
        reads: &mut SlidingWindow<()>,
        out: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
    ) -> Result<Result<Option<HashMap<String, Map<String, Value>>>, Stop>, SourceError> {
        let mut trash = HashMap::new();
        let mut offset = 0u64;
        loop {
            let ack = match self
                .read(
                    session,
                    reads,
                    "trash:page",
                    json!({"limit": 1000, "offset": offset}),
                    shutdown,
                )
                .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => return Ok(Err(Stop::Shutdown)),
                Err(reason) => {
                    tracing::warn!(%reason, "trash listing unavailable; entities missing from the snapshot count as deleted");
                    return Ok(Ok(None));
                }
            };
            for (kind, m) in self.page_items(&ack, out).await? {
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    trash.insert(kind.key(id), m);
                }
            }
            if ack.get("hasMore").and_then(Value::as_bool) != Some(true) {
                return Ok(Ok(Some(trash)));
            }
            offset += 1000;
        }
    }

    /// The objects of a page ack; anything that is not an object with a string id is reported
    /// as malformed and left out.
    async fn page_items(
        &self,
        ack: &Value,
        out: &mpsc::Sender<SourceEvent>,
    ) -> Result<Vec<(EntityKind, Map<String, Value>)>, SourceError> {
        let mut items = Vec::new();
        for (field, kind) in [("nodes", EntityKind::Node), ("links", EntityKind::Link)] {
            let Some(list) = ack.get(field) else { continue };
            let Some(list) = list.as_array() else {
                let ev = SourceEvent::Malformed {
                    event: "graph:get".into(),
                    raw: list.to_string().into_bytes(),
                    reason: format!("{field} is not an array"),
                };
                out.send(ev)
                    .await
                    .map_err(|_| SourceError::PipelineClosed)?;
                continue;
            };
            for item in list {
                match item.as_object() {
                    Some(m) if m.get("id").is_some_and(Value::is_string) => {
                        items.push((kind, m.clone()))
                    }
                    _ => {
                        let ev = SourceEvent::Malformed {
                            event: "graph:get".into(),
                            raw: item.to_string().into_bytes(),
                            reason: format!("{field} entry without a string id"),
                        };
                        out.send(ev)
                            .await
                            .map_err(|_| SourceError::PipelineClosed)?;
                    }
                }
            }
        }
        Ok(items)
    }
}

impl Source for SynapTaskSource {
    fn name(&self) -> &str {
        "synaptask"
    }

    fn run(
        self: Box<Self>,
        out: mpsc::Sender<SourceEvent>,
        control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        (*self).run_loop(out, control, shutdown).boxed()
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
            cfg,
            token: Secret::new("x"),
            last_snapshot_done: std::sync::Mutex::new(None),
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
