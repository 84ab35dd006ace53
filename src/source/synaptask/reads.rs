//! The read scheduler: every read event (`graph:get`, `branch:get`, `history:page`,
//! `trash:page`) goes through one [`Reader`], which keeps the documented budget of 5 reads per
//! 10 s per event name on the client side, waits a window on `rate_limited` (never failing on
//! it), and retries timeouts and error acks a few times.
//!
//! Priorities come from the one-job-at-a-time rule of the session loop (`super`): a repair
//! snapshot or a history catch-up runs before a periodic history poll, which runs before an
//! anti-entropy snapshot, and a job never waits behind a lower-priority one's reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::session::{CallError, Caller};
use super::SynapTaskConfig;
use crate::delivery::SharedStore;
use crate::metrics::{inc, metrics, ReadLabels};
use crate::ratelimit::SlidingWindow;
use crate::record::EntityKind;
use crate::source::{SourceError, SourceEvent};
use crate::state::CheckpointOp;

/// The read events, the keys of the read budget.
pub const READ_EVENTS: [&str; 4] = ["graph:get", "branch:get", "history:page", "trash:page"];

/// Slept beyond the budget's wait before a read. The budget already counts each read from its
/// answer, later than the server can have counted it by the server's own handling and the
/// answer's way back, so this only has to absorb timer rounding and clock-rate drift (ppm over
/// a 10 s window). Every window costs it once, on top of the read's round trip: it was 150 ms,
/// 1.5 % of the documented window and a third of the snapshot's time over its bound.
const READ_SLACK: Duration = Duration::from_millis(10);

/// Why a read gave no usable answer.
#[derive(Debug)]
pub enum ReadError {
    /// Shutdown was requested while waiting.
    Shutdown,
    /// The server does not have this event (`internal.not_implemented`, `unknown_event`).
    NotImplemented(String),
    /// The session looks dead (repeated timeouts or errors); it should be replaced.
    Lost(String),
}

/// Whether an error code says the server lacks the event altogether.
fn not_implemented(code: &str) -> bool {
    code.ends_with("not_implemented") || code.ends_with("unknown_event")
}

/// What a read job needs, cloneable so the job can run beside the session loop.
#[derive(Clone)]
pub struct Reader {
    caller: Caller,
    budget: Arc<Mutex<SlidingWindow<&'static str>>>,
    /// The source's configuration.
    pub cfg: Arc<SynapTaskConfig>,
    /// Where pages, batches and malformed input go.
    pub out: mpsc::Sender<SourceEvent>,
    /// The run's shutdown.
    pub shutdown: CancellationToken,
    /// Where read attempts are kept for the next run's budget.
    log: Option<SharedStore>,
    /// Objects the last snapshot (or the checkpoint) held: the next snapshot's expected size.
    expected: Arc<std::sync::atomic::AtomicU64>,
    /// Places for snapshot pages on their way to the pipeline ([`super::PageSlot`]).
    pages: Arc<tokio::sync::Semaphore>,
}

impl Reader {
    /// A reader over one session's caller; the budget outlives sessions (the server's window
    /// does not restart when we reconnect).
    pub fn new(
        caller: Caller,
        budget: Arc<Mutex<SlidingWindow<&'static str>>>,
        cfg: Arc<SynapTaskConfig>,
        out: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            caller,
            budget,
            cfg,
            out,
            shutdown,
            log: None,
            expected: Arc::default(),
            pages: Arc::new(tokio::sync::Semaphore::new(super::PAGES_AHEAD)),
        }
    }

    /// Entities the live stream has shown leaving the graph so far this session
    /// ([`super::session::Caller::removals`]).
    pub fn removals(&self) -> u64 {
        self.caller.removals()
    }

    /// Keeps every read attempt in `store`, so that a restarted connector counts them.
    pub fn with_log(mut self, store: Option<SharedStore>) -> Self {
        self.log = store;
        self
    }

    /// Shares the expected snapshot size with the source (it outlives sessions).
    pub fn with_expected(mut self, expected: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.expected = expected;
        self
    }

    /// Objects the next snapshot is expected to read (0: unknown).
    pub fn expected_objects(&self) -> u64 {
        self.expected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the size a snapshot found.
    pub fn set_expected_objects(&self, n: u64) {
        self.expected.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a read attempt; a store error is logged, never fatal (the budget in memory still
    /// holds for this run).
    async fn log_attempt(&self, event: &'static str, sent_ms: u64, at_ms: u64) {
        if let Some(store) = &self.log {
            let op = CheckpointOp::ReadAttempt {
                event: event.to_string(),
                sent_ms,
                at_ms,
            };
            if let Err(e) = store.apply(vec![op]).await {
                tracing::warn!(error = %e, "cannot record the read attempt in the state store");
            }
        }
    }

    fn budget_wait(&self, event: &'static str) -> Duration {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait_time(&event)
    }

    async fn sleep(&self, d: Duration) -> Result<(), ReadError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(ReadError::Shutdown),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    /// Waits until the budget allows one more `event` read. [`Reader::read`] waits too; a
    /// caller that builds its request from what happened meanwhile (snapshot offsets) waits
    /// first, so the request is built at the moment it is sent.
    pub async fn wait_budget(&self, event: &'static str) -> Result<(), ReadError> {
        let queued = std::time::Instant::now();
        let mut waited = false;
        loop {
            let wait = self.budget_wait(event);
            if wait.is_zero() {
                break;
            }
            if !waited {
                waited = true;
                metrics().reads_waiting.inc();
            }
            let slept = self.sleep(wait + READ_SLACK).await;
            if slept.is_err() {
                metrics().reads_waiting.dec();
            }
            slept?;
        }
        if waited {
            metrics().reads_waiting.dec();
            metrics()
                .read_budget_wait_seconds_total
                .inc_by(queued.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// One read under the budget. `rate_limited` waits a window and tries again, for ever;
    /// timeouts and other errors are tried three times before the session counts as lost.
    pub async fn read(&self, event: &'static str, data: Value) -> Result<Value, ReadError> {
        self.read_marked(event, data).await.map(|(v, _)| v)
    }

    /// [`Reader::read`], with the session's removal count when the ack arrived
    /// ([`super::session::Caller::call_marked`]).
    pub async fn read_marked(
        &self,
        event: &'static str,
        data: Value,
    ) -> Result<(Value, u64), ReadError> {
        let mut attempts = 0u32;
        loop {
            self.wait_budget(event).await?;
            let sent = self
                .budget
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .hit(&event);
            inc(&metrics().reads_total);
            // Before the read: a crash right after it must still count it.
            let sent_ms = crate::record::unix_millis();
            self.log_attempt(event, sent_ms, sent_ms).await;
            let reply = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(ReadError::Shutdown),
                r = self.caller.call_marked(event, data.clone()) => r,
            };
            // The server counted this read when it arrived, which may be well after we sent
            // it on a loaded machine (CI once saw a read refused with the window kept from
            // the send time): count it from the answer, the latest it can have arrived.
            let answered_at = std::time::Instant::now();
            metrics()
                .read_duration
                .get_or_create(&ReadLabels { event })
                .observe(answered_at.duration_since(sent).as_secs_f64());
            self.budget
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .moved(&event, sent, answered_at);
            self.log_attempt(event, sent_ms, crate::record::unix_millis())
                .await;
            match reply {
                Ok((ack, mark)) if ack.get("ok").and_then(Value::as_bool) == Some(true) => {
                    return Ok((ack, mark))
                }
                Ok((ack, _)) => {
                    let code = ack
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string();
                    let trace_id = ack
                        .get("trace_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if code == "rate_limited" || code.ends_with(".rate_limited") {
                        inc(&metrics().reads_rate_limited_total);
                        tracing::info!(
                            event,
                            trace_id,
                            "read rate-limited by the server; waiting a window"
                        );
                        self.sleep(Duration::from_millis(self.cfg.read_window_ms))
                            .await?;
                        continue;
                    }
                    if not_implemented(&code) {
                        tracing::warn!(event, %code, trace_id, "the server does not implement this read");
                        return Err(ReadError::NotImplemented(code));
                    }
                    attempts += 1;
                    tracing::warn!(event, %code, trace_id, attempts, "read failed");
                    if attempts >= 3 {
                        return Err(ReadError::Lost(format!("{event} keeps failing: {code}")));
                    }
                    self.sleep(self.cfg.backoff(attempts)).await?;
                }
                Err(CallError::Timeout(_)) => {
                    attempts += 1;
                    tracing::warn!(event, attempts, "read got no ack in time");
                    if attempts >= 3 {
                        return Err(ReadError::Lost(format!(
                            "{event}: no ack after {attempts} attempts"
                        )));
                    }
                }
                Err(e) => return Err(ReadError::Lost(e.to_string())),
            }
        }
    }

    /// Waits for a place for one more snapshot page in the pipeline's queue.
    pub async fn page_slot(&self) -> Result<super::PageSlot, SourceError> {
        let permit = Arc::clone(&self.pages)
            .acquire_owned()
            .await
            // Never closed: the semaphore lives as long as this reader.
            .map_err(|_| SourceError::PipelineClosed)?;
        Ok(super::PageSlot {
            _permit: Some(permit),
        })
    }

    /// Sends an event to the pipeline.
    pub async fn send(&self, ev: impl Into<SourceEvent>) -> Result<(), SourceError> {
        self.out
            .send(ev.into())
            .await
            .map_err(|_| SourceError::PipelineClosed)
    }

    /// Reports input that could not be used; it becomes a dead letter.
    pub async fn malformed(
        &self,
        event: &str,
        raw: Vec<u8>,
        reason: String,
    ) -> Result<(), SourceError> {
        self.send(SourceEvent::Malformed {
            event: event.into(),
            raw,
            reason,
        })
        .await
    }

    /// The objects of a page ack; anything that is not an object with a string id is reported
    /// as malformed and left out.
    pub async fn page_items(
        &self,
        event: &str,
        ack: &mut Value,
    ) -> Result<Vec<(EntityKind, Map<String, Value>)>, SourceError> {
        let mut items = Vec::new();
        for (field, kind) in [("nodes", EntityKind::Node), ("links", EntityKind::Link)] {
            let Some(list) = ack.get_mut(field) else {
                continue;
            };
            let Some(list) = list.as_array_mut() else {
                self.malformed(
                    event,
                    list.to_string().into_bytes(),
                    format!("{field} is not an array"),
                )
                .await?;
                continue;
            };
            // Moved out, not copied: a page of 5,000 nodes is tens of megabytes parsed, and a
            // copy beside the ack doubled the connector's peak memory during a snapshot.
            for item in list.iter_mut() {
                match item {
                    Value::Object(m) if m.get("id").is_some_and(Value::is_string) => {
                        items.push((kind, std::mem::take(m)))
                    }
                    _ => {
                        self.malformed(
                            event,
                            item.to_string().into_bytes(),
                            format!("{field} entry without a string id"),
                        )
                        .await?
                    }
                }
            }
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_of_a_missing_event() {
        assert!(not_implemented("internal.not_implemented"));
        assert!(not_implemented("bad_request.unknown_event"));
        assert!(!not_implemented("rate_limited"));
        assert!(!not_implemented("bad_request.invalid_scope"));
    }
}
