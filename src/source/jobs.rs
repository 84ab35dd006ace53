//! The job-event WebSocket source (seed 004): one connection to
//! `ws://host/api/v1/ws/{client_id}?token=...`, each text frame a JSON object with a `type`.
//! The API replays nothing, so frames are numbered as they arrive, continuing from the
//! checkpoint, under an epoch this run took before numbering anything (so a frame id is never
//! reused after a crash); a reconnect only resumes the stream. Bad frames (not JSON, not an
//! object, too large, binary) become dead letters and the connection stays up.
//!
//! The socket is read whatever the pipeline does: frames wait in a buffer bounded in bytes
//! while the pipeline is blocked, so the server's pings are still answered (a server drops a
//! client that does not answer, and its frames with it). Frames past the bound are counted
//! and logged. At shutdown the frames still buffered go to the spool (see [`Spool`]), which
//! the next run publishes first.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceError, SourceEvent};
use crate::metrics::{inc, metrics};
use crate::secret::Secret;

/// `[jobs]`: the job-event WebSocket API, off unless `enabled`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Whether to ingest job events at all.
    pub enabled: bool,
    /// Base URL of the endpoint, without the client id: `ws://host:8000/api/v1/ws`.
    pub url: String,
    /// This connector's client id; must be unique among the API's clients.
    pub client_id: String,
    /// Environment variable that holds the job-API token.
    pub token_env: String,
    /// File that holds the job-API token, read when the variable is unset.
    pub token_file: Option<PathBuf>,
    /// Frames larger than this many bytes become dead letters.
    pub max_frame_bytes: usize,
    /// Largest reconnect delay bound, in milliseconds.
    pub backoff_max_ms: u64,
    /// Bytes of frames kept at most while the pipeline is blocked (a broker down); frames past
    /// it are dropped, counted in `taskstream_job_frames_dropped_total` and logged.
    pub buffer_bytes: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "ws://127.0.0.1:8000/api/v1/ws".into(),
            client_id: "taskstream".into(),
            token_env: "SYNAPTASK_JOBS_TOKEN".into(),
            token_file: None,
            max_frame_bytes: 1 << 20,
            backoff_max_ms: 30_000,
            buffer_bytes: 64 << 20,
        }
    }
}

/// One job frame, numbered by the run that received it: what the job source hands the
/// pipeline, and what is kept for the next run when it was not known to be delivered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobFrame {
    /// Job-API client id.
    pub client_id: String,
    /// Epoch of the run that received it.
    pub epoch: u64,
    /// Its position in that run's numbering.
    pub index: u64,
    /// The frame.
    pub frame: Map<String, Value>,
}

/// Job frames kept across a shutdown: a JSON-lines file beside the state file. The job API
/// replays nothing, so a frame received but not delivered when the connector stops would
/// otherwise be lost. Written at shutdown, read and removed at start; a kill -9 still loses
/// the frames in memory.
#[derive(Debug, Clone)]
pub struct Spool {
    path: PathBuf,
}

impl Spool {
    /// The spool of the state file `state` (`<state>.jobs-spool.jsonl`).
    pub fn beside(state: &Path) -> Self {
        let mut name = state.as_os_str().to_owned();
        name.push(".jobs-spool.jsonl");
        Self { path: name.into() }
    }

    /// Appends frames; an error means they are lost, and says how many.
    pub fn append(&self, frames: &[JobFrame]) -> Result<(), SourceError> {
        if frames.is_empty() {
            return Ok(());
        }
        let fail = |e: std::io::Error| {
            SourceError::Config(format!(
                "cannot keep {} job frames in {}: {e}",
                frames.len(),
                self.path.display()
            ))
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(fail)?;
        let mut w = std::io::BufWriter::new(file);
        for f in frames {
            serde_json::to_writer(&mut w, f).map_err(|e| fail(e.into()))?;
            w.write_all(b"\n").map_err(fail)?;
        }
        w.into_inner()
            .map_err(|e| fail(e.into_error()))?
            .sync_all()
            .map_err(fail)
    }

    /// Takes every kept frame (oldest run first, in order) and removes the file. Lines that do
    /// not parse (a write cut short) are skipped with a warning.
    pub fn take(&self) -> Result<Vec<JobFrame>, SourceError> {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(SourceError::Config(format!(
                    "cannot read the job spool {}: {e}",
                    self.path.display()
                )))
            }
        };
        let mut frames = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<JobFrame>(&line) {
                Ok(f) => frames.push(f),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable line of the job spool")
                }
            }
        }
        frames.sort_by_key(|f| (f.epoch, f.index));
        std::fs::remove_file(&self.path).map_err(|e| {
            SourceError::Config(format!(
                "cannot remove the job spool {}: {e}",
                self.path.display()
            ))
        })?;
        Ok(frames)
    }
}

/// Frames read from the socket, waiting for the pipeline; bounded in bytes.
struct Outbox {
    queue: VecDeque<(SourceEvent, usize)>,
    bytes: usize,
    cap: usize,
    dropped: u64,
}

impl Outbox {
    fn push(&mut self, ev: SourceEvent, bytes: usize) {
        if self.bytes + bytes > self.cap && !self.queue.is_empty() {
            self.dropped += 1;
            inc(&metrics().job_frames_dropped_total);
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    buffered_bytes = self.bytes,
                    "the pipeline is blocked and the job-frame buffer is full; dropping frames"
                );
            }
            return;
        }
        self.bytes += bytes;
        self.queue.push_back((ev, bytes));
    }

    /// Hands the oldest frame to the pipeline. Cancel-safe: nothing leaves the queue until the
    /// channel has room for it.
    async fn send_one(&mut self, out: &mpsc::Sender<SourceEvent>) -> Result<(), SourceError> {
        let permit = out
            .reserve()
            .await
            .map_err(|_| SourceError::PipelineClosed)?;
        if let Some((ev, bytes)) = self.queue.pop_front() {
            self.bytes -= bytes;
            permit.send(ev);
        }
        Ok(())
    }
}

/// A job frame's text as a frame: a JSON object with a string `type`; otherwise why not.
pub fn parse_frame(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(frame)) if frame.get("type").is_some_and(Value::is_string) => Ok(frame),
        Ok(_) => Err("frame is not an object with a string type".into()),
        Err(e) => Err(format!("frame is not JSON: {e}")),
    }
}

/// The source.
pub struct JobsSource {
    cfg: JobsConfig,
    token: Secret,
    next_index: u64,
    epoch: u64,
    spool: Option<Spool>,
}

impl JobsSource {
    /// A source that numbers frames from `delivered + 1` under `epoch`, which the caller has
    /// stored durably and never gave to an earlier run. Frames still buffered at shutdown go to
    /// `spool` (lost without one, with a warning).
    pub fn new(
        cfg: JobsConfig,
        delivered: u64,
        epoch: u64,
        spool: Option<Spool>,
    ) -> Result<Self, SourceError> {
        let token = Secret::load(Some(&cfg.token_env), cfg.token_file.as_deref())
            .map_err(|e| SourceError::Config(e.to_string()))?
            .ok_or_else(|| {
                SourceError::Config(format!(
                    "no job-API token: set {} or jobs.token_file",
                    cfg.token_env
                ))
            })?;
        if !(cfg.url.starts_with("ws://") || cfg.url.starts_with("wss://")) {
            return Err(SourceError::Config(format!(
                "jobs.url must start with ws:// or wss://, got {:?}",
                cfg.url
            )));
        }
        Ok(Self {
            cfg,
            token,
            next_index: delivered + 1,
            epoch,
            spool,
        })
    }

    /// Keeps the frames still buffered for the next run.
    fn keep(&self, outbox: Outbox) {
        let frames: Vec<JobFrame> = outbox
            .queue
            .into_iter()
            .filter_map(|(ev, _)| match ev {
                SourceEvent::Job(frame) => Some(frame),
                _ => None,
            })
            .collect();
        if frames.is_empty() {
            return;
        }
        match &self.spool {
            Some(spool) => match spool.append(&frames) {
                Ok(()) => tracing::info!(frames = frames.len(), "job frames kept for the next run"),
                Err(e) => tracing::error!(error = %e, "job frames lost at shutdown"),
            },
            None => tracing::warn!(
                frames = frames.len(),
                "job frames lost at shutdown: no state.path to keep them beside"
            ),
        }
    }

    fn frame_event(&mut self, text: &str) -> SourceEvent {
        inc(&metrics().job_frames_total);
        if text.len() > self.cfg.max_frame_bytes {
            let mut raw = text.as_bytes().to_vec();
            raw.truncate(4096);
            return SourceEvent::Malformed {
                event: "job_frame".into(),
                raw,
                reason: format!(
                    "frame of {} bytes exceeds jobs.max_frame_bytes ({}); first 4096 bytes kept",
                    text.len(),
                    self.cfg.max_frame_bytes
                ),
            };
        }
        match parse_frame(text) {
            Ok(frame) => {
                let index = self.next_index;
                self.next_index += 1;
                SourceEvent::Job(JobFrame {
                    client_id: self.cfg.client_id.clone(),
                    epoch: self.epoch,
                    index,
                    frame,
                })
            }
            Err(reason) => SourceEvent::Malformed {
                event: "job_frame".into(),
                raw: text.as_bytes().to_vec(),
                reason,
            },
        }
    }

    async fn run_loop(
        mut self,
        out: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let url = format!(
            "{}/{}?token={}",
            self.cfg.url.trim_end_matches('/'),
            self.cfg.client_id,
            self.token.expose()
        );
        let mut outbox = Outbox {
            queue: VecDeque::new(),
            bytes: 0,
            cap: self.cfg.buffer_bytes.max(1),
            dropped: 0,
        };
        let result = self.connect_loop(&url, &out, &mut outbox, &shutdown).await;
        self.keep(outbox);
        result
    }

    /// Connects, reads and reconnects until shutdown; every wait also hands buffered frames
    /// to the pipeline.
    async fn connect_loop(
        &mut self,
        url: &str,
        out: &mpsc::Sender<SourceEvent>,
        outbox: &mut Outbox,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                let cap = 500u64
                    .saturating_mul(1 << failures.min(10))
                    .min(self.cfg.backoff_max_ms);
                let wait = Duration::from_millis(rand::thread_rng().gen_range(0..=cap));
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = &mut sleep => break,
                        r = outbox.send_one(out), if !outbox.queue.is_empty() => r?,
                    }
                }
            }
            let connect = tokio_tungstenite::connect_async(url);
            tokio::pin!(connect);
            let conn = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    c = &mut connect => break c,
                    r = outbox.send_one(out), if !outbox.queue.is_empty() => r?,
                }
            };
            let mut ws = match conn {
                Ok((ws, _)) => ws,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                    if resp.status().as_u16() == 401 =>
                {
                    return Err(SourceError::Auth {
                        url: self.cfg.url.clone(),
                        code: "unauthorized".into(),
                        message: "job API refused the token (HTTP 401)".into(),
                    });
                }
                Err(e) => {
                    failures += 1;
                    // The error may quote the request URL, which holds the token: say only what kind it is.
                    tracing::warn!(kind = error_kind(&e), url = %self.cfg.url, "job API connection failed");
                    continue;
                }
            };
            tracing::info!(url = %self.cfg.url, client_id = %self.cfg.client_id, epoch = self.epoch, "connected to the job API");
            failures = 0;
            crate::health::set_jobs_up(true);
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                    r = outbox.send_one(out), if !outbox.queue.is_empty() => {
                        r?;
                        continue;
                    }
                    m = ws.next() => m,
                };
                let (event, bytes) = match msg {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(kind = error_kind(&e), "job API connection lost");
                        break;
                    }
                    Some(Ok(WsMessage::Text(t))) => (self.frame_event(t.as_str()), t.len()),
                    Some(Ok(WsMessage::Binary(b))) => {
                        let bytes = b.len();
                        (
                            SourceEvent::Malformed {
                                event: "job_frame".into(),
                                raw: b.to_vec(),
                                reason: "binary frame".into(),
                            },
                            bytes,
                        )
                    }
                    Some(Ok(WsMessage::Ping(p))) => {
                        // tungstenite queues the pong; flushing sends it now.
                        let _ = ws.send(WsMessage::Pong(p)).await;
                        continue;
                    }
                    Some(Ok(WsMessage::Close(_))) => break,
                    Some(Ok(_)) => continue,
                };
                inc(&metrics().source_events_total);
                outbox.push(event, bytes + 64);
            }
            crate::health::set_jobs_up(false);
            failures += 1;
        }
    }
}

fn error_kind(e: &tokio_tungstenite::tungstenite::Error) -> &'static str {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => "closed",
        E::Io(_) => "io",
        E::Tls(_) => "tls",
        E::Capacity(_) => "capacity",
        E::Protocol(_) => "protocol",
        E::Http(_) => "http status",
        E::HttpFormat(_) | E::Url(_) => "bad url",
        _ => "other",
    }
}

impl Source for JobsSource {
    fn name(&self) -> &str {
        "jobs"
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

    fn source() -> JobsSource {
        JobsSource {
            cfg: JobsConfig {
                max_frame_bytes: 100,
                ..Default::default()
            },
            token: Secret::new("t"),
            next_index: 5,
            epoch: 7,
            spool: None,
        }
    }

    #[test]
    fn frames_are_numbered_and_bad_ones_reported() {
        let mut s = source();
        match s.frame_event(r#"{"type":"job_progress","jobId":"job_1","progress":5}"#) {
            SourceEvent::Job(JobFrame { index, frame, .. }) => {
                assert_eq!(index, 5);
                assert_eq!(frame["jobId"], "job_1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.frame_event("{not json"),
            SourceEvent::Malformed { .. }
        ));
        assert!(matches!(
            s.frame_event("[1,2]"),
            SourceEvent::Malformed { .. }
        ));
        let huge = format!(r#"{{"type":"x","pad":"{}"}}"#, "a".repeat(200));
        match s.frame_event(&huge) {
            SourceEvent::Malformed { reason, .. } => assert!(reason.contains("exceeds")),
            other => panic!("{other:?}"),
        }
        match s.frame_event(r#"{"type":"file_uploaded"}"#) {
            SourceEvent::Job(JobFrame { index, .. }) => assert_eq!(index, 6),
            other => panic!("{other:?}"),
        }
    }
}
