//! One Socket.IO session with rust_socketio 0.6, built around its observed pitfalls
//! (`shared/notes/crates.md`):
//! - callbacks run inline and stall the Engine.IO heartbeat when slow, so every callback only
//!   hands its payload to a channel (`try_send`; a full diff channel drops and counts instead of
//!   blocking, and the source reconciles afterwards). Both channels are bounded: diffs in count
//!   and in bytes (a few huge payloads must not hold gigabytes), control events in count, with
//!   the one that ends a session kept aside so that a flood of others cannot hide it;
//! - `connect()` returns `Ok` even when the server refuses the token, so success is decided by
//!   the `connected` event, with a timeout;
//! - ack ids are random in 0..999 and collide under concurrency, so [`Session::call`] is used by
//!   one task, one call at a time;
//! - a missing ack is silent, so every call has its own timeout;
//! - ack payloads arrive wrapped in an extra array, so they are unwrapped defensively;
//! - the client's own reconnection does not survive a server disconnect, so it is switched off
//!   and the source builds a fresh session each time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use rust_socketio::asynchronous::{Client, ClientBuilder};
use rust_socketio::{Event, Payload, TransportType};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::metrics::{inc, metrics};
use crate::secret::Secret;

/// Something the session's callbacks observed.
#[derive(Debug)]
pub enum Inbound {
    /// The `connected` event.
    Connected(Value),
    /// A `graph:diff` payload and when it arrived.
    Diff(Value, std::time::Instant),
    /// A `graph:diff` that is not a JSON value (binary, or no argument).
    BadDiff {
        /// The raw bytes, or a description of the arguments.
        raw: Vec<u8>,
        /// Why.
        reason: String,
    },
    /// A `ws:pong`.
    Pong,
    /// The server sent a `rate_limited` event instead of an error ack (DECISIONS #18 alternative).
    RateLimitedEvent,
    /// A CONNECT_ERROR packet: the namespace refused us (DECISIONS #12 alternative for auth).
    ConnectError(String),
    /// The session ended.
    Closed(String),
}

/// Why an acked call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No ack within the timeout.
    #[error("no ack for {0} within the timeout")]
    Timeout(String),
    /// The emit itself failed: the session is gone.
    #[error("emit {event} failed: {message}")]
    Emit {
        /// Event name.
        event: String,
        /// Cause.
        message: String,
    },
}

/// The acked-call half of a session, cloneable so that a read job can run beside the loop that
/// takes the pushed events. Calls must still be made one at a time (random ack ids, above).
#[derive(Clone)]
pub struct Caller {
    client: Client,
    ack_timeout: Duration,
    removals: Arc<AtomicU64>,
}

/// How many live diffs a session holds for the source before it drops them.
#[derive(Debug, Clone, Copy)]
pub struct DiffBuffer {
    /// Payloads.
    pub count: usize,
    /// Bytes, as [`approx_bytes`] counts them.
    pub bytes: usize,
}

/// Control events held at most; beyond it pongs and the like are dropped (and counted), while
/// the event that ends the session is kept aside.
const CONTROL_BUFFER: usize = 256;

/// An open session: the client plus the channels its callbacks feed.
pub struct Session {
    client: Client,
    control: mpsc::Receiver<Inbound>,
    /// The first event that ends the session when the control channel was full.
    ended: Arc<Ended>,
    diffs: mpsc::Receiver<(Inbound, usize)>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    /// Entities the diffs received so far removed from the graph (trashed or purged).
    removals: Arc<AtomicU64>,
    ack_timeout: Duration,
}

/// The event that ends a session, kept beside the control channel.
#[derive(Default)]
struct Ended {
    event: Mutex<Option<Inbound>>,
    notify: Notify,
}

impl Ended {
    fn take(&self) -> Option<Inbound> {
        self.event.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Hands a control event to the session loop without blocking the callback. When the channel
/// is full the event is dropped and counted, unless it ends the session: that one is kept.
fn send_control(tx: &mpsc::Sender<Inbound>, ended: &Ended, msg: Inbound) {
    if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
        match msg {
            Inbound::Closed(_) | Inbound::ConnectError(_) => {
                let mut slot = ended.event.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(msg);
                    ended.notify.notify_one();
                }
            }
            _ => inc(&metrics().control_events_dropped_total),
        }
    }
}

/// Roughly the memory a parsed JSON value holds: its text's length plus a little per value.
/// Parsed values are at most 128 levels deep (serde_json's limit), so the recursion is bounded.
pub fn approx_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 8,
        Value::Array(a) => a.iter().map(approx_bytes).sum::<usize>() + 8,
        Value::Object(m) => {
            m.iter()
                .map(|(k, v)| k.len() + 8 + approx_bytes(v))
                .sum::<usize>()
                + 8
        }
    }
}

fn first_value(payload: Payload) -> Result<Value, (Vec<u8>, String)> {
    match payload {
        Payload::Text(mut values) => {
            if values.is_empty() {
                Err((Vec::new(), "event without arguments".into()))
            } else {
                Ok(values.swap_remove(0))
            }
        }
        Payload::Binary(bytes) => Err((bytes.to_vec(), "binary payload".into())),
        #[allow(deprecated)]
        Payload::String(s) => {
            serde_json::from_str(&s).map_err(|e| (s.into_bytes(), format!("not JSON: {e}")))
        }
    }
}

/// Unwraps `[[{...}]]` / `[{...}]` ack payloads down to the object.
pub fn unwrap_ack(mut v: Value) -> Value {
    loop {
        match v {
            Value::Array(mut a) if a.len() == 1 => v = a.swap_remove(0),
            other => return other,
        }
    }
}

impl Session {
    /// Opens the transport and registers the callbacks. The session is usable only after
    /// [`Session::wait_connected`] says so.
    pub async fn open(
        url: &str,
        token: &Secret,
        buffer: DiffBuffer,
        ack_timeout: Duration,
    ) -> Result<Self, String> {
        let (control_tx, control) = mpsc::channel(CONTROL_BUFFER);
        let ended = Arc::new(Ended::default());
        let (diff_tx, diffs) = mpsc::channel(buffer.count.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let removals = Arc::new(AtomicU64::new(0));

        let (c, e) = (control_tx.clone(), ended.clone());
        let on_connected = move |p: Payload, _: Client| {
            let msg = match first_value(p) {
                Ok(v) => Inbound::Connected(v),
                Err((_, reason)) => {
                    Inbound::ConnectError(format!("unreadable connected event: {reason}"))
                }
            };
            send_control(&c, &e, msg);
            async {}.boxed()
        };
        let d = dropped.clone();
        let q = queued_bytes.clone();
        let rm = removals.clone();
        let on_diff = move |p: Payload, _: Client| {
            inc(&metrics().diffs_received_total);
            let (msg, size) = match first_value(p) {
                Ok(v) => {
                    // Counted here, on arrival, dropped or not: a snapshot's next page must
                    // step back over removals still waiting in the buffer too.
                    rm.fetch_add(crate::normalize::removals_in_diff(&v), Ordering::Relaxed);
                    let size = approx_bytes(&v);
                    (Inbound::Diff(v, std::time::Instant::now()), size)
                }
                Err((raw, reason)) => {
                    let size = raw.len() + reason.len();
                    (Inbound::BadDiff { raw, reason }, size)
                }
            };
            // Only this callback adds to the count, so checking then adding cannot overshoot.
            let fits = q.load(Ordering::Relaxed).saturating_add(size) <= buffer.bytes;
            if fits && diff_tx.try_send((msg, size)).is_ok() {
                q.fetch_add(size, Ordering::Relaxed);
            } else {
                d.fetch_add(1, Ordering::Relaxed);
                inc(&metrics().diffs_dropped_total);
            }
            async {}.boxed()
        };
        let (c, e) = (control_tx.clone(), ended.clone());
        let on_pong = move |_: Payload, _: Client| {
            send_control(&c, &e, Inbound::Pong);
            async {}.boxed()
        };
        let (c, e) = (control_tx.clone(), ended.clone());
        let on_rate_limited = move |_: Payload, _: Client| {
            send_control(&c, &e, Inbound::RateLimitedEvent);
            async {}.boxed()
        };
        let (c, e) = (control_tx.clone(), ended.clone());
        let on_close = move |_: Payload, _: Client| {
            send_control(&c, &e, Inbound::Closed("server disconnect".into()));
            async {}.boxed()
        };
        let (c, e) = (control_tx, ended.clone());
        let on_error = move |p: Payload, _: Client| {
            let text = match first_value(p) {
                Ok(Value::String(s)) => s,
                Ok(v) => v.to_string(),
                Err((_, r)) => r,
            };
            let msg = if text.contains("ConnectError") {
                Inbound::ConnectError(text)
            } else {
                Inbound::Closed(format!("socket error: {text}"))
            };
            send_control(&c, &e, msg);
            async {}.boxed()
        };
        let client = ClientBuilder::new(url)
            .transport_type(TransportType::Websocket)
            // Both documented auth styles at once (facts §1): header and CONNECT auth payload.
            .opening_header("Authorization", format!("Bearer {}", token.expose()))
            .auth(json!({"api_token": token.expose()}))
            .reconnect(false)
            .reconnect_on_disconnect(false)
            // Pushed events through `on_any`, not `on`: rust_socketio 0.6 hands an `on` callback
            // a deep copy of the parsed payload (and `on_any` the original), so a diff
            // registered with `on` was copied once more than it needs to be. Close and error
            // are not pushed events; `on_any` never sees them.
            .on_any(move |event: Event, p: Payload, c: Client| {
                if let Event::Custom(name) = &event {
                    match name.as_str() {
                        "graph:diff" => return on_diff(p, c),
                        "connected" => return on_connected(p, c),
                        "ws:pong" => return on_pong(p, c),
                        "rate_limited" => return on_rate_limited(p, c),
                        _ => {}
                    }
                }
                // Other pushes are documented notifications outside the graph (AI subtasks,
                // publishing); rust_socketio would drop them without a trace.
                inc(&metrics().socket_events_ignored_total);
                let name = String::from(event);
                tracing::debug!(
                    event = %name.chars().take(64).collect::<String>(),
                    "pushed event not consumed"
                );
                async {}.boxed()
            })
            .on(Event::Close, on_close)
            .on(Event::Error, on_error)
            .connect()
            .await
            // rust_socketio errors describe the transport; they never include headers.
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            control,
            ended,
            diffs,
            queued_bytes,
            dropped,
            removals,
            ack_timeout,
        })
    }

    /// The next control event: one kept aside because the channel was full comes first.
    async fn next_control(&mut self) -> Option<Inbound> {
        if let Some(m) = self.ended.take() {
            return Some(m);
        }
        tokio::select! {
            biased;
            _ = self.ended.notify.notified() => self.ended.take(),
            m = self.control.recv() => m,
        }
    }

    fn took_diff(&self, m: Option<(Inbound, usize)>) -> Option<Inbound> {
        m.map(|(m, size)| {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            m
        })
    }

    /// Waits for the `connected` event; `Ok(uid)` on success, `Err` with the refusal otherwise.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<String, Refusal> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.next_control()).await;
            match msg {
                Err(_) => return Err(Refusal::Other("no connected event in time".into())),
                Ok(None) => return Err(Refusal::Other("session closed".into())),
                Ok(Some(Inbound::Connected(v))) => {
                    let v = unwrap_ack(v);
                    if v.get("ok").and_then(Value::as_bool) == Some(true) {
                        let uid = v
                            .get("uid")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        return Ok(uid);
                    }
                    let code = v
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string();
                    let message = v
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    return Err(Refusal::Auth { code, message });
                }
                Ok(Some(Inbound::ConnectError(text))) => {
                    return Err(Refusal::Auth {
                        code: "connect_error".into(),
                        message: text,
                    })
                }
                Ok(Some(Inbound::Closed(reason))) => return Err(Refusal::Other(reason)),
                Ok(Some(_)) => {}
            }
        }
    }

    /// The next thing the callbacks saw: control messages first, then diffs in order.
    pub async fn next(&mut self) -> Option<Inbound> {
        if let Some(m) = self.ended.take() {
            return Some(m);
        }
        let m = tokio::select! {
            biased;
            _ = self.ended.notify.notified() => return self.ended.take(),
            m = self.control.recv() => return m,
            m = self.diffs.recv() => m,
        };
        self.took_diff(m)
    }

    /// A diff already received, without waiting: lets the source forward every diff that
    /// arrived before a read's ack ahead of the read's outcome.
    pub fn try_next_diff(&mut self) -> Option<Inbound> {
        let m = self.diffs.try_recv().ok();
        self.took_diff(m)
    }

    /// How many received diffs wait to be taken: the ones that arrived before this moment.
    pub fn diffs_waiting(&self) -> usize {
        self.diffs.len()
    }

    /// A handle for acked calls, usable while [`Session::next`] is awaited elsewhere.
    pub fn caller(&self) -> Caller {
        Caller {
            client: self.client.clone(),
            ack_timeout: self.ack_timeout,
            removals: Arc::clone(&self.removals),
        }
    }

    /// How many diffs were dropped since the last call (and resets the count).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Sends `ws:ping`; a `ws:pong` will show up in [`Session::next`].
    pub async fn ping(&self) -> Result<(), CallError> {
        self.client
            .emit("ws:ping", json!({}))
            .await
            .map_err(|e| CallError::Emit {
                event: "ws:ping".into(),
                message: e.to_string(),
            })
    }

    /// One acked call, with its own timeout; the reply unwrapped.
    pub async fn call(&self, event: &str, data: Value) -> Result<Value, CallError> {
        self.caller().call(event, data).await
    }

    /// Closes the session (best effort).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
    }
}

impl Caller {
    /// Entities the diffs received this session removed from the graph (trashed or purged),
    /// counted as they arrive, before the diff buffer, so dropped diffs count too: the
    /// difference between two counts is how far an offset-paged listing may have shifted.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Relaxed)
    }

    /// One acked call, with its own timeout; the reply unwrapped.
    pub async fn call(&self, event: &str, data: Value) -> Result<Value, CallError> {
        self.call_marked(event, data).await.map(|(v, _)| v)
    }

    /// [`Caller::call`], with the session's removal count ([`Caller::removals`]) as it was
    /// when the ack arrived. One socket carries diffs and acks in the server's order, and the
    /// callbacks run in that order, so the count is exactly the removals the server broadcast
    /// before it answered.
    pub async fn call_marked(&self, event: &str, data: Value) -> Result<(Value, u64), CallError> {
        let (tx, rx) = oneshot::channel::<(Payload, u64)>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let removals = Arc::clone(&self.removals);
        let callback = move |p: Payload, _: Client| {
            if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send((p, removals.load(Ordering::Relaxed)));
            }
            async {}.boxed()
        };
        self.client
            .emit_with_ack(event, data, self.ack_timeout, callback)
            .await
            .map_err(|e| CallError::Emit {
                event: event.into(),
                message: e.to_string(),
            })?;
        match tokio::time::timeout(self.ack_timeout + Duration::from_millis(500), rx).await {
            Ok(Ok((p, mark))) => match first_value(p) {
                Ok(v) => Ok((unwrap_ack(v), mark)),
                Err((_, reason)) => Ok((
                    json!({"ok": false, "error": "internal.malformed_response", "message": reason}),
                    mark,
                )),
            },
            _ => {
                inc(&metrics().reads_timed_out_total);
                Err(CallError::Timeout(event.into()))
            }
        }
    }
}

/// Why a session was not established.
#[derive(Debug)]
pub enum Refusal {
    /// The server refused the token.
    Auth {
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// Anything else (limits, network, timeouts): retry later.
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_unwrapping() {
        assert_eq!(unwrap_ack(json!([[{"ok": true}]])), json!({"ok": true}));
        assert_eq!(unwrap_ack(json!([{"ok": true}])), json!({"ok": true}));
        assert_eq!(unwrap_ack(json!({"ok": true})), json!({"ok": true}));
        assert_eq!(unwrap_ack(json!([1, 2])), json!([1, 2]));
    }

    #[test]
    fn approx_bytes_grows_with_the_text() {
        let small = json!({"id": "a", "version": 1});
        let big = json!({"id": "a", "version": 1, "title": "x".repeat(1 << 20)});
        assert!(approx_bytes(&small) < 100);
        assert!(approx_bytes(&big) > 1 << 20);
        assert!(approx_bytes(&json!([[[[]]]])) > approx_bytes(&json!([])));
    }

    #[tokio::test]
    async fn a_flood_of_control_events_never_hides_the_end_of_the_session() {
        let (tx, mut rx) = mpsc::channel(CONTROL_BUFFER);
        let ended = Ended::default();
        let dropped = metrics().control_events_dropped_total.get();
        for _ in 0..CONTROL_BUFFER + 10 {
            send_control(&tx, &ended, Inbound::Pong);
        }
        send_control(&tx, &ended, Inbound::Closed("server disconnect".into()));
        send_control(&tx, &ended, Inbound::Closed("later".into()));
        assert!(
            metrics().control_events_dropped_total.get() >= dropped + 10,
            "the pongs past the bound are counted"
        );
        assert!(matches!(ended.take(), Some(Inbound::Closed(r)) if r == "server disconnect"));
        assert!(ended.take().is_none());
        let mut held = 0;
        while rx.try_recv().is_ok() {
            held += 1;
        }
        assert_eq!(
            held, CONTROL_BUFFER,
            "the channel holds its bound and no more"
        );
    }
}
