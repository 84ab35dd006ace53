//! The NATS sink: subjects per [`Route`], JetStream publishes acknowledged and de-duplicated by
//! `Nats-Msg-Id`, or core NATS publishes.
//!
//! JetStream (the default) is at-least-once: a publish whose ack does not come (timeout,
//! server down, no responders while the server restarts) is sent again with the same
//! `Nats-Msg-Id` until the stream acknowledges it, so the stream's duplicate window drops the
//! copies. Each ack is awaited on its own task, so publish permits are returned even when the
//! caller polls its [`AckFuture`] late.
//!
//! Core NATS has no acknowledgement: a message counts as delivered once the client wrote it to
//! the socket. A message written just before the server dies is lost, and subscribers miss
//! whatever is published while they are disconnected, so core mode is at-most-once.
//!
//! Tombstones (no payload) only mean something to a compacted Kafka topic and are skipped.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamErrorKind, PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectErrorKind, ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{oneshot, watch, Notify, OnceCell};
use tokio_util::sync::CancellationToken;

use super::{AckFuture, Format, Message, Route, Sink, SinkError, RECORD_HEADERS, SCHEMA_ID_HEADER};
use crate::backoff::Backoff;
use crate::metrics;
use crate::secret::Secret;

mod config;
mod core_nats;
mod js;
use config::subject_matches;
pub use config::{NatsConfig, NatsMode, NatsSubjects};

const NAME: &str = "nats";
/// Bound on one connect attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resend backoff after a failed JetStream publish.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Reconnect delay bound: short, so a restarted server is found quickly.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Retry warnings are logged at most this often; the retry counter has the full count.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// Resends after "no responders" look the stream up at most this often.
const STREAM_RECHECK: Duration = Duration::from_secs(1);
/// JetStream's duplicate window for a stream this sink creates.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A subject the server accepts for a publish: non-empty tokens, no wildcards or spaces.
fn valid_publish_subject(subject: &str) -> bool {
    subject
        .split('.')
        .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace()))
}

/// Publishes to NATS (see the module docs). Connects on first use.
pub struct NatsSink {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    mode: NatsMode,
    format: Format,
    stream: String,
    create_stream: bool,
    subjects: NatsSubjects,
    ack_timeout: Duration,
    user_password: Option<(Secret, Secret)>,
    token: Option<Secret>,
    conn: OnceCell<Conn>,
    /// One stream lookup / creation at a time; holds when the last one ran.
    stream_checked: tokio::sync::Mutex<Option<Instant>>,
    /// Ends pending resend loops when the sink is dropped.
    shutdown: CancellationToken,
    /// JetStream acks still awaited by their tasks; `flush` waits for zero.
    awaiting_acks: AtomicUsize,
    /// Core mode: messages published so far, how many of them a flush covered, the flusher
    /// task and its wake-up.
    core_published: AtomicU64,
    core_flushed: watch::Sender<u64>,
    core_flusher: OnceLock<tokio::task::JoinHandle<()>>,
    core_wake: Notify,
    /// Milliseconds since `epoch` of the last retry warning.
    last_warn_ms: AtomicU64,
    epoch: Instant,
}

#[derive(Clone)]
struct Conn {
    client: Client,
    js: jetstream::Context,
}

fn fatal(message: impl Into<String>) -> SinkError {
    SinkError::Fatal {
        sink: NAME.into(),
        message: message.into(),
    }
}

fn retryable(message: impl Into<String>) -> SinkError {
    SinkError::Retryable {
        sink: NAME.into(),
        message: message.into(),
    }
}

use crate::secret::redact_url;

fn load_secret(var: Option<&str>, what: &str) -> Result<Option<Secret>, SinkError> {
    let Some(var) = var else { return Ok(None) };
    Secret::load(Some(var), None)
        .map_err(|e| fatal(e.to_string()))?
        .map(Some)
        .ok_or_else(|| fatal(format!("{what}: variable {var} is unset or empty")))
}

/// Whether a JetStream publish error is worth a resend.
fn publish_error(e: &jetstream::context::PublishError) -> SinkError {
    let message = e.to_string();
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => fatal(message),
        PublishErrorKind::Other => {
            let api =
                std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api.map(|a| a.error_code()) {
                Some(
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                    | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                    | ErrorCode::STREAM_SEALED,
                ) => fatal(message),
                _ => retryable(message),
            }
        }
        // Timeouts, a lost connection, no stream listening yet, too many acks pending.
        _ => retryable(message),
    }
}

impl NatsSink {
    /// Checks the config and reads the credentials; the connection is made on first use
    /// (`prepare` or `enqueue`), so a server that starts later is fine.
    pub fn new(cfg: &NatsConfig) -> Result<Self, SinkError> {
        if cfg.url.trim().is_empty() {
            return Err(fatal("url is empty"));
        }
        if cfg.mode == NatsMode::JetStream && cfg.stream.trim().is_empty() {
            return Err(fatal("stream is empty"));
        }
        if cfg.ack_timeout_ms == 0 {
            return Err(fatal("ack_timeout_ms must be positive"));
        }
        for (family, subject) in [
            ("nodes", &cfg.subjects.nodes),
            ("links", &cfg.subjects.links),
            ("status", &cfg.subjects.status),
            ("dlq", &cfg.subjects.dlq),
            ("jobs", &cfg.subjects.jobs),
        ] {
            if !valid_publish_subject(subject) {
                return Err(fatal(format!(
                    "subjects.{family}: invalid subject {subject:?}"
                )));
            }
        }
        let user = load_secret(cfg.user_env.as_deref(), "user_env")?;
        let password = load_secret(cfg.password_env.as_deref(), "password_env")?;
        let user_password = match (user, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err(fatal("user_env and password_env must be set together")),
        };
        let token = load_secret(cfg.token_env.as_deref(), "token_env")?;
        Ok(Self {
            inner: Arc::new(Inner {
                url: cfg.url.clone(),
                mode: cfg.mode,
                format: cfg.format.unwrap_or_default(),
                stream: cfg.stream.clone(),
                create_stream: cfg.create_stream,
                subjects: cfg.subjects.clone(),
                ack_timeout: Duration::from_millis(cfg.ack_timeout_ms),
                user_password,
                token,
                conn: OnceCell::new(),
                stream_checked: tokio::sync::Mutex::new(None),
                shutdown: CancellationToken::new(),
                awaiting_acks: AtomicUsize::new(0),
                core_published: AtomicU64::new(0),
                core_flushed: watch::Sender::new(0),
                core_flusher: OnceLock::new(),
                core_wake: Notify::new(),
                last_warn_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        })
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    /// The connection, made on first use; a failed attempt is retried by the next call.
    async fn conn(&self) -> Result<&Conn, SinkError> {
        self.conn.get_or_try_init(|| self.connect()).await
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let url = redact_url(&self.url);
        let mut options = ConnectOptions::new()
            .name("taskstream")
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(self.ack_timeout))
            // Reconnect forever, quickly: the sink resends whatever the outage swallowed.
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                let exp = u32::try_from(attempts.min(10)).unwrap_or(10);
                (Duration::from_millis(50) * 2u32.pow(exp)).min(RECONNECT_MAX)
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(sink = NAME, "connected"),
                    async_nats::Event::Closed => tracing::info!(sink = NAME, "connection closed"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(sink = NAME, "disconnected; reconnecting")
                    }
                    other => tracing::warn!(sink = NAME, "{other}"),
                }
            });
        if let Some((user, password)) = &self.user_password {
            options =
                options.user_and_password(user.expose().to_string(), password.expose().to_string());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_string());
        }
        let client =
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(self.url.as_str()))
                .await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    let message = format!("connect {url}: {}", e.kind());
                    return Err(match e.kind() {
                        ConnectErrorKind::Authentication
                        | ConnectErrorKind::AuthorizationViolation
                        | ConnectErrorKind::ServerParse
                        | ConnectErrorKind::Tls => fatal(message),
                        _ => retryable(message),
                    });
                }
                Err(_) => return Err(retryable(format!("connect {url}: timed out"))),
            };
        let js = jetstream::ContextBuilder::new()
            .timeout(self.ack_timeout)
            .build(client.clone());
        Ok(Conn { client, js })
    }

    fn warn_throttled(&self, what: &str, error: &SinkError) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        if (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last_warn_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(sink = NAME, error = %error, "{what}; resending");
        }
    }
}

/// A message ready to publish (cheap to clone for a resend).
#[derive(Debug, Clone)]
struct Outgoing {
    subject: String,
    /// Taken by the first send (a copy per message cost more than building it); a resend
    /// builds them again from `msg`.
    headers: HeaderMap,
    payload: Bytes,
    msg: Arc<Message>,
    format: Format,
}

fn outgoing(
    subjects: &NatsSubjects,
    msg: &Arc<Message>,
    payload: &[u8],
    format: Format,
) -> Result<Outgoing, SinkError> {
    let subject = subjects.subject(msg);
    if !valid_publish_subject(&subject) {
        return Err(fatal(format!(
            "invalid subject {subject:?} (event {:?})",
            msg.event
        )));
    }
    // The body is shared with the message, not copied: a copy of every record (about 1 KB)
    // showed in the JetStream profile.
    let len = payload.len();
    let payload = Bytes::from_owner(Body {
        msg: Arc::clone(msg),
        format,
    });
    debug_assert_eq!(payload.len(), len);
    Ok(Outgoing {
        subject,
        headers: headers_of(msg, format)?,
        payload,
        msg: Arc::clone(msg),
        format,
    })
}

/// A message's body as the owner of the [`Bytes`] published, so the payload is not copied.
struct Body {
    msg: Arc<Message>,
    format: Format,
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        // `outgoing` made this from a message whose body it had just read, so the body is
        // there; empty otherwise (never published: the caller returned before).
        self.msg
            .body(self.format)
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}

/// A header name without parsing: the record header names (and the schema id) are built from
/// their static strings; parsing a name (and, for these custom names, copying it) for every
/// header of every message showed in the JetStream profile. Any other name is parsed.
fn header_name(name: &str) -> Result<HeaderName, SinkError> {
    match RECORD_HEADERS
        .iter()
        .chain([&SCHEMA_ID_HEADER])
        .find(|k| **k == name)
    {
        Some(known) => Ok(HeaderName::from_static(known)),
        None => HeaderName::from_str(name).map_err(|e| fatal(format!("header {name:?}: {e}"))),
    }
}

/// A message's NATS headers: its record headers and the record id as `Nats-Msg-Id`.
fn headers_of(msg: &Message, format: Format) -> Result<HeaderMap, SinkError> {
    let mut headers = HeaderMap::new();
    let pairs = msg.headers_for(format);
    for (i, (name, value)) in pairs.iter().enumerate() {
        let value =
            HeaderValue::from_str(value).map_err(|e| fatal(format!("header {name} value: {e}")))?;
        let repeated = pairs[..i].iter().any(|(n, _)| n == name);
        let name = header_name(name)?;
        // `insert` hashes the name once, `append` twice; a name seen before must append.
        if repeated {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
    let id = HeaderValue::from_str(&msg.id)
        .map_err(|e| fatal(format!("record id as Nats-Msg-Id: {e}")))?;
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    Ok(headers)
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        NAME
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        async move {
            let Some(payload) = msg.body(self.inner.format).map_err(fatal)? else {
                let skipped: AckFuture = futures_util::future::ready(Ok(())).boxed();
                return Ok(skipped);
            };
            let mut publish = outgoing(&self.inner.subjects, &msg, payload, self.inner.format)?;
            let inner = self.inner.clone();
            let conn = self.inner.conn().await?;
            let ack: AckFuture = match inner.mode {
                NatsMode::JetStream => {
                    // A failure here is returned, not retried inside: the caller retries
                    // enqueue in order, which keeps later messages behind this one.
                    let headers = std::mem::take(&mut publish.headers);
                    let first = inner.send_js(conn, &publish, headers).await?;
                    let (tx, rx) = oneshot::channel();
                    inner.awaiting_acks.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let result = inner.clone().confirm(publish, first).await;
                        inner.awaiting_acks.fetch_sub(1, Ordering::SeqCst);
                        // Nobody may be waiting any more; that is fine.
                        let _ = tx.send(result);
                    });
                    async move {
                        rx.await
                            .unwrap_or_else(|_| Err(SinkError::Cancelled { sink: NAME.into() }))
                    }
                    .boxed()
                }
                NatsMode::Core => {
                    inner.send_core(conn, publish).await?;
                    inner.core_flusher.get_or_init(|| {
                        tokio::spawn(inner.clone().run_core_flusher(conn.client.clone()))
                    });
                    let n = inner.core_published.fetch_add(1, Ordering::SeqCst) + 1;
                    inner.core_wake.notify_one();
                    let mut flushed = inner.core_flushed.subscribe();
                    async move {
                        match flushed.wait_for(|f| *f >= n).await {
                            Ok(_) => Ok(()),
                            // The flusher ended: the sink was dropped.
                            Err(_) => Err(SinkError::Cancelled { sink: NAME.into() }),
                        }
                    }
                    .boxed()
                }
            };
            Ok(ack)
        }
        .boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async move {
            let inner = &self.inner;
            let conn = inner.conn().await?;
            let url = redact_url(&inner.url);
            if conn.client.connection_state() != async_nats::connection::State::Connected {
                return Err(retryable(format!("{url}: not connected (reconnecting)")));
            }
            match inner.mode {
                NatsMode::Core => Ok(format!("nats {url}: core publish (at-most-once)")),
                NatsMode::JetStream => {
                    let captured = inner.ensure_stream(&conn.js, None).await?.unwrap_or_default();
                    let samples = [
                        (Route::Nodes, "updated"),
                        (Route::Links, "updated"),
                        (Route::Status, "status_changed"),
                        (Route::DeadLetter, "dead_letter"),
                        (Route::Jobs, "job_event"),
                    ];
                    for (route, event) in samples {
                        let probe = Message {
 avro: None,
 avro_key: None,
                            route,
                            event: event.into(),
                            id: String::new(),
                            key: String::new(),
                            payload: None,
                            headers: Vec::new(),
                        };
                        let subject = inner.subjects.subject(&probe);
                        if !captured.iter().any(|p| subject_matches(p, &subject)) {
                            return Err(fatal(format!(
                                "stream {} does not capture subject {subject} (it has {captured:?})",
                                inner.stream
                            )));
                        }
                    }
                    Ok(format!("nats {url}: stream {} ready (jetstream)", inner.stream))
                }
            }
        }
        .boxed()
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let inner = &self.inner;
            let Some(conn) = inner.conn.get() else {
                return Err(retryable("not connected yet"));
            };
            if conn.client.connection_state() != async_nats::connection::State::Connected {
                return Err(retryable(format!(
                    "{}: not connected (reconnecting)",
                    redact_url(&inner.url)
                )));
            }
            // A round trip: the connection state lags a server that stopped answering.
            tokio::time::timeout(Duration::from_secs(2), conn.client.flush())
                .await
                .map_err(|_| retryable("no answer within 2 s"))?
                .map_err(|e| retryable(format!("flush: {e}")))?;
            if inner.mode == NatsMode::JetStream {
                tokio::time::timeout(Duration::from_secs(2), conn.js.get_stream(&inner.stream))
                    .await
                    .map_err(|_| retryable("JetStream: no answer within 2 s"))?
                    .map_err(|e| retryable(format!("JetStream stream {}: {e}", inner.stream)))?;
            }
            Ok(())
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let inner = &self.inner;
            let Some(conn) = inner.conn.get() else {
                return Ok(());
            };
            // Pushes out what the client still buffers (core mode's whole "ack").
            tokio::time::timeout(inner.ack_timeout, conn.client.flush())
                .await
                .map_err(|_| retryable("flush timed out"))?
                .map_err(|e| retryable(format!("flush: {e}")))?;
            // JetStream acks are awaited (and resent) by their own tasks.
            while inner.awaiting_acks.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(route: Route, event: &str) -> Message {
        Message {
            avro: None,
            avro_key: None,
            route,
            event: event.into(),
            id: "node:a:1".into(),
            key: "a".into(),
            payload: Some(b"{}".to_vec()),
            headers: vec![("ce_id", "node:a:1".into())],
        }
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg: NatsConfig = serde_json::from_str("{}").unwrap();
        assert!(!cfg.enabled);
        assert_eq!(cfg.mode, NatsMode::JetStream);
        assert_eq!(cfg.url, "nats://127.0.0.1:4222");
        assert_eq!(cfg.ack_timeout_ms, 10_000);
        let core: NatsConfig = serde_json::from_str(r#"{"mode":"core"}"#).unwrap();
        assert_eq!(core.mode, NatsMode::Core);
        assert!(serde_json::from_str::<NatsConfig>(r#"{"mode":"JetStream"}"#).is_err());
        assert!(serde_json::from_str::<NatsConfig>(r#"{"urls":"x"}"#).is_err());
    }

    #[test]
    fn subjects_per_route() {
        let s = NatsSubjects::default();
        assert_eq!(
            s.subject(&msg(Route::Nodes, "updated")),
            "synaptask.nodes.updated"
        );
        assert_eq!(
            s.subject(&msg(Route::Links, "created")),
            "synaptask.links.created"
        );
        assert_eq!(
            s.subject(&msg(Route::Status, "status_changed")),
            "synaptask.status"
        );
        assert_eq!(s.subject(&msg(Route::DeadLetter, "x")), "synaptask.dlq");
        assert_eq!(
            s.subject(&msg(Route::Jobs, "job_done")),
            "synaptask.jobs.job_done"
        );
        assert_eq!(
            s.stream_subjects(),
            [
                "synaptask.nodes.>",
                "synaptask.links.>",
                "synaptask.jobs.>",
                "synaptask.history.>",
                "synaptask.status",
                "synaptask.dlq"
            ]
        );
        let overlapping = NatsSubjects {
            status: "synaptask.nodes.status".into(),
            ..NatsSubjects::default()
        };
        assert!(!overlapping
            .stream_subjects()
            .contains(&"synaptask.nodes.status".to_string()));
    }

    #[test]
    fn headers_carry_the_message_id_and_bad_input_is_fatal() {
        let s = NatsSubjects::default();
        let out = outgoing(
            &s,
            &Arc::new(msg(Route::Nodes, "updated")),
            b"{}",
            Format::Json,
        )
        .unwrap();
        assert_eq!(
            out.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("node:a:1")
        );
        assert_eq!(
            out.headers.get("ce_id").map(|v| v.as_str()),
            Some("node:a:1")
        );
        assert!(
            !outgoing(&s, &Arc::new(msg(Route::Nodes, "")), b"{}", Format::Json)
                .unwrap_err()
                .is_retryable()
        );
        assert!(
            !outgoing(&s, &Arc::new(msg(Route::Nodes, "a b")), b"{}", Format::Json)
                .unwrap_err()
                .is_retryable()
        );
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://u:pw@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("nats://h:1,nats://t@h:2"),
            "nats://h:1,nats://***@h:2"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn unset_credentials_are_fatal_and_name_only_the_variable() {
        let cfg = NatsConfig {
            token_env: Some("TASKSTREAM_TEST_UNSET_NATS_TOKEN".into()),
            ..NatsConfig::default()
        };
        let err = NatsSink::new(&cfg).err().unwrap();
        assert!(
            !err.is_retryable() && err.to_string().contains("TASKSTREAM_TEST_UNSET_NATS_TOKEN")
        );
    }
}
