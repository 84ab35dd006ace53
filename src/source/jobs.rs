//! The job-event WebSocket source (seed 004): one connection to
//! `ws://host/api/v1/ws/{client_id}?token=...`, each text frame a JSON object with a `type`.
//! The API replays nothing, so frames are numbered as they arrive, continuing from the
//! checkpoint; a reconnect only resumes the stream. Bad frames (not JSON, not an object, too
//! large, binary) become dead letters and the connection stays up.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::{Control, Source, SourceError, SourceEvent};
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
        }
    }
}

/// The source.
pub struct JobsSource {
    cfg: JobsConfig,
    token: Secret,
    next_index: u64,
}

impl JobsSource {
    /// A source that numbers frames from `delivered + 1`.
    pub fn new(cfg: JobsConfig, delivered: u64) -> Result<Self, SourceError> {
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
        })
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
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(frame)) if frame.get("type").is_some_and(Value::is_string) => {
                let index = self.next_index;
                self.next_index += 1;
                SourceEvent::Job {
                    client_id: self.cfg.client_id.clone(),
                    index,
                    frame,
                }
            }
            Ok(_) => SourceEvent::Malformed {
                event: "job_frame".into(),
                raw: text.as_bytes().to_vec(),
                reason: "frame is not an object with a string type".into(),
            },
            Err(e) => SourceEvent::Malformed {
                event: "job_frame".into(),
                raw: text.as_bytes().to_vec(),
                reason: format!("frame is not JSON: {e}"),
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
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                let cap = 500u64
                    .saturating_mul(1 << failures.min(10))
                    .min(self.cfg.backoff_max_ms);
                let wait = Duration::from_millis(rand::thread_rng().gen_range(0..=cap));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = tokio_tungstenite::connect_async(url.as_str()) => c,
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
            tracing::info!(url = %self.cfg.url, client_id = %self.cfg.client_id, "connected to the job API");
            failures = 0;
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                    m = ws.next() => m,
                };
                let event = match msg {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(kind = error_kind(&e), "job API connection lost");
                        break;
                    }
                    Some(Ok(WsMessage::Text(t))) => self.frame_event(t.as_str()),
                    Some(Ok(WsMessage::Binary(b))) => SourceEvent::Malformed {
                        event: "job_frame".into(),
                        raw: b.to_vec(),
                        reason: "binary frame".into(),
                    },
                    Some(Ok(WsMessage::Ping(p))) => {
                        // tungstenite queues the pong; flushing sends it now.
                        let _ = ws.send(WsMessage::Pong(p)).await;
                        continue;
                    }
                    Some(Ok(WsMessage::Close(_))) => break,
                    Some(Ok(_)) => continue,
                };
                inc(&metrics().source_events_total);
                if out.send(event).await.is_err() {
                    return Err(SourceError::PipelineClosed);
                }
            }
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
        _control: mpsc::Receiver<Control>,
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
        }
    }

    #[test]
    fn frames_are_numbered_and_bad_ones_reported() {
        let mut s = source();
        match s.frame_event(r#"{"type":"job_progress","jobId":"job_1","progress":5}"#) {
            SourceEvent::Job { index, frame, .. } => {
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
            SourceEvent::Job { index, .. } => assert_eq!(index, 6),
            other => panic!("{other:?}"),
        }
    }
}
