//! One Socket.IO session with rust_socketio 0.6, built around its observed pitfalls
//! (`shared/notes/crates.md`):
//! - callbacks run inline and stall the Engine.IO heartbeat when slow, so every callback only
//!   hands its payload to a channel (`try_send`; a full diff channel drops and counts instead of
//!   blocking, and the source reconciles afterwards);
//! - `connect()` returns `Ok` even when the server refuses the token, so success is decided by
//!   the `connected` event, with a timeout;
//! - ack ids are random in 0..999 and collide under concurrency, so [`Session::call`] is used by
//!   one task, one call at a time;
//! - a missing ack is silent, so every call has its own timeout;
//! - ack payloads arrive wrapped in an extra array, so they are unwrapped defensively;
//! - the client's own reconnection does not survive a server disconnect, so it is switched off
//!   and the source builds a fresh session each time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use rust_socketio::asynchronous::{Client, ClientBuilder};
use rust_socketio::{Event, Payload, TransportType};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

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
}

/// An open session: the client plus the channels its callbacks feed.
pub struct Session {
    client: Client,
    control: mpsc::UnboundedReceiver<Inbound>,
    diffs: mpsc::Receiver<Inbound>,
    dropped: Arc<AtomicU64>,
    ack_timeout: Duration,
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
        diff_buffer: usize,
        ack_timeout: Duration,
    ) -> Result<Self, String> {
        let (control_tx, control) = mpsc::unbounded_channel();
        let (diff_tx, diffs) = mpsc::channel(diff_buffer.max(1));
        let dropped = Arc::new(AtomicU64::new(0));

        let c = control_tx.clone();
        let on_connected = move |p: Payload, _: Client| {
            let msg = match first_value(p) {
                Ok(v) => Inbound::Connected(v),
                Err((_, reason)) => {
                    Inbound::ConnectError(format!("unreadable connected event: {reason}"))
                }
            };
            let _ = c.send(msg);
            async {}.boxed()
        };
        let d = dropped.clone();
        let on_diff = move |p: Payload, _: Client| {
            inc(&metrics().diffs_received_total);
            let msg = match first_value(p) {
                Ok(v) => Inbound::Diff(v, std::time::Instant::now()),
                Err((raw, reason)) => Inbound::BadDiff { raw, reason },
            };
            if diff_tx.try_send(msg).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
                inc(&metrics().diffs_dropped_total);
            }
            async {}.boxed()
        };
        let c = control_tx.clone();
        let on_pong = move |_: Payload, _: Client| {
            let _ = c.send(Inbound::Pong);
            async {}.boxed()
        };
        let c = control_tx.clone();
        let on_rate_limited = move |_: Payload, _: Client| {
            let _ = c.send(Inbound::RateLimitedEvent);
            async {}.boxed()
        };
        let c = control_tx.clone();
        let on_close = move |_: Payload, _: Client| {
            let _ = c.send(Inbound::Closed("server disconnect".into()));
            async {}.boxed()
        };
        let c = control_tx;
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
            let _ = c.send(msg);
            async {}.boxed()
        };
        let client = ClientBuilder::new(url)
            .transport_type(TransportType::Websocket)
            // Both documented auth styles at once (facts §1): header and CONNECT auth payload.
            .opening_header("Authorization", format!("Bearer {}", token.expose()))
            .auth(json!({"api_token": token.expose()}))
            .reconnect(false)
            .reconnect_on_disconnect(false)
            .on("connected", on_connected)
            .on("graph:diff", on_diff)
            .on("ws:pong", on_pong)
            .on("rate_limited", on_rate_limited)
            .on(Event::Close, on_close)
            .on(Event::Error, on_error)
            .connect()
            .await
            // rust_socketio errors describe the transport; they never include headers.
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            control,
            diffs,
            dropped,
            ack_timeout,
        })
    }

    /// Waits for the `connected` event; `Ok(uid)` on success, `Err` with the refusal otherwise.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<String, Refusal> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.control.recv()).await;
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
        tokio::select! {
            biased;
            m = self.control.recv() => m,
            m = self.diffs.recv() => m,
        }
    }

    /// A diff already received, without waiting: lets the source forward every diff that
    /// arrived before a read's ack ahead of the read's outcome.
    pub fn try_next_diff(&mut self) -> Option<Inbound> {
        self.diffs.try_recv().ok()
    }

    /// A handle for acked calls, usable while [`Session::next`] is awaited elsewhere.
    pub fn caller(&self) -> Caller {
        Caller {
            client: self.client.clone(),
            ack_timeout: self.ack_timeout,
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
    /// One acked call, with its own timeout; the reply unwrapped.
    pub async fn call(&self, event: &str, data: Value) -> Result<Value, CallError> {
        let (tx, rx) = oneshot::channel::<Payload>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let callback = move |p: Payload, _: Client| {
            if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(p);
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
            Ok(Ok(p)) => match first_value(p) {
                Ok(v) => Ok(unwrap_ack(v)),
                Err((_, reason)) => Ok(
                    json!({"ok": false, "error": "internal.malformed_response", "message": reason}),
                ),
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
}
