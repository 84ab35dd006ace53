//! The simulator's network face: the Socket.IO v4 server (auth, connect limits, read events
//! with their rate limit, `graph:diff` broadcasts) and the HTTP control routes served on the
//! same port (`/truth`, `/pause`, `/resume`, `/load/start`, `/admin/*`), plus the deviations
//! from the documented service that [`Faults`] switches on (missing events, chaos, blackouts).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::SocketIo;

use super::chaos::{Chaos, ChaosCounters, Ending};
use super::world::{now_rfc3339, ApiError, World};
use crate::limits::SlidingWindow;

/// The documented limits (seed 000, seed 001), each overridable for tests that need it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connect attempts per IP per `connect_window`.
    pub connect_per_ip: usize,
    /// Connect attempts per user per `connect_window`.
    pub connect_per_user: usize,
    /// The connect-limit window.
    pub connect_window: Duration,
    /// Concurrent sessions per user.
    pub concurrent_per_user: usize,
    /// Reads per user per event name per `read_window`.
    pub reads: usize,
    /// The read-limit window.
    pub read_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_per_ip: 10,
            connect_per_user: 20,
            connect_window: Duration::from_secs(60),
            concurrent_per_user: 10,
            reads: 5,
            read_window: Duration::from_secs(10),
        }
    }
}

/// Counters served in `/truth`: what clients did, and which limits they ran into.
#[derive(Debug, Default)]
pub struct Counters {
    pub connect_attempts: AtomicU64,
    pub connects: AtomicU64,
    pub rejected_auth: AtomicU64,
    pub rejected_ip_limit: AtomicU64,
    pub rejected_user_limit: AtomicU64,
    pub rejected_concurrent: AtomicU64,
    pub reads_served: AtomicU64,
    pub rate_limited_acks: AtomicU64,
    pub diffs_emitted: AtomicU64,
    pub diffs_dropped: AtomicU64,
    pub load_emitted: AtomicU64,
    /// Connects refused during an `/admin/blackout` window: an outage, not a limit violation.
    pub blackout_refusals: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rejected = g(&self.rejected_auth)
            + g(&self.rejected_ip_limit)
            + g(&self.rejected_user_limit)
            + g(&self.rejected_concurrent);
        json!({
            "connectAttempts": g(&self.connect_attempts),
            "connects": g(&self.connects),
            "rejectedConnects": rejected,
            "rejectedAuth": g(&self.rejected_auth),
            "readsServed": g(&self.reads_served),
            "rateLimitedAcks": g(&self.rate_limited_acks),
            "limitViolations": {
                "connectPerIp": g(&self.rejected_ip_limit),
                "connectPerUser": g(&self.rejected_user_limit),
                "concurrentPerUser": g(&self.rejected_concurrent),
                "reads": g(&self.rate_limited_acks),
                "total": g(&self.rejected_ip_limit) + g(&self.rejected_user_limit)
                    + g(&self.rejected_concurrent) + g(&self.rate_limited_acks),
            },
            "diffsEmitted": g(&self.diffs_emitted),
            "diffsDropped": g(&self.diffs_dropped),
            "loadEmitted": g(&self.load_emitted),
        })
    }
}

/// Deviations from the documented service, all off by default (`taskstream sim` options).
#[derive(Default)]
pub struct Faults {
    /// `history:page` acks `internal.not_implemented` (`--no-history`).
    pub no_history: bool,
    /// `trash:page` acks `internal.not_implemented` (`--no-trash-page`).
    pub no_trash_page: bool,
    /// `ws:ping` goes unanswered (`--no-ws-ping`).
    pub no_ws_ping: bool,
    /// Random disconnects, late acks and spurious rate limiting (`--chaos`).
    pub chaos: Option<Chaos>,
}

/// The shared state of a running simulator.
pub struct Sim {
    pub world: Mutex<World>,
    pub counters: Counters,
    pub paused: AtomicBool,
    /// Read requests still to leave unanswered (`--drop-reads`).
    pub drop_reads: AtomicU64,
    /// Sessions whose events are registered but which `on_connect` has not admitted yet.
    admissions: Mutex<HashMap<String, tokio::sync::watch::Sender<Option<Option<usize>>>>>,
    limits: Limits,
    ip_window: Mutex<SlidingWindow<IpAddr>>,
    user_window: Mutex<SlidingWindow<usize>>,
    read_window: Mutex<SlidingWindow<(usize, &'static str)>>,
    sessions: Mutex<HashMap<usize, usize>>,
    /// Pre-generated `graph:diff` payloads of load mode, by owner, in order.
    pub load: Mutex<Vec<(usize, Box<RawValue>)>>,
    /// The world after the load mutations; it replaces the live world when the push starts,
    /// so the truth and the pushed diffs change together.
    pub load_world: Mutex<Option<World>>,
    io: Mutex<Option<SocketIo>>,
    pub faults: Faults,
    /// Until when new connections are refused (`POST /admin/blackout`).
    blackout_until: Mutex<Option<Instant>>,
    /// Told of each live `graph:diff` just before it is sent (the latency benchmark stamps
    /// send times with it).
    pub on_emit: Mutex<Option<EmitObserver>>,
}

/// A callback told of each live `graph:diff` payload just before it is sent.
pub type EmitObserver = Arc<dyn Fn(&Value) + Send + Sync>;

/// Locks a mutex, recovering the data if a panicking holder poisoned it: every critical section
/// here leaves the state consistent before anything that could panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh `trace_id`: 12 lowercase hex characters, new per request.
pub fn new_trace_id() -> String {
    let v: u64 = rand::thread_rng().gen();
    format!("{:012x}", v & 0xffff_ffff_ffff)
}

fn err_ack(e: ApiError, trace: &str) -> Value {
    json!({"ok": false, "error": e.code, "message": e.message, "trace_id": trace})
}

/// The bearer token of a connect: the `Authorization` header, else `auth.api_token` (DECISIONS #12).
fn token_of(s: &SocketRef, auth: &Value) -> Option<String> {
    let header = s
        .req_parts()
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        })
        .filter(|t| !t.is_empty());
    header.or_else(|| {
        auth.get("api_token")
            .or_else(|| auth.get("token"))
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

fn int_param(data: &Value, key: &str, default: i64) -> Result<i64, ApiError> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n.as_i64().ok_or(ApiError {
            code: "bad_request.invalid_number",
            message: "limit/offset must be integers",
        }),
        Some(_) => Err(ApiError {
            code: "bad_request.invalid_number",
            message: "limit/offset must be integers",
        }),
    }
}

const BAD_PAYLOAD: ApiError = ApiError {
    code: "bad_request",
    message: "payload must be an object",
};

impl Sim {
    /// A simulator over this world, with these limits, behaving as documented.
    pub fn new(world: World, limits: Limits) -> Arc<Self> {
        Self::with_faults(world, limits, Faults::default())
    }

    /// A simulator over this world, with these limits and deviations.
    pub fn with_faults(world: World, limits: Limits, faults: Faults) -> Arc<Self> {
        Arc::new(Self {
            world: Mutex::new(world),
            counters: Counters::default(),
            paused: AtomicBool::new(false),
            drop_reads: AtomicU64::new(0),
            admissions: Mutex::new(HashMap::new()),
            ip_window: Mutex::new(SlidingWindow::new(
                limits.connect_per_ip,
                limits.connect_window,
            )),
            user_window: Mutex::new(SlidingWindow::new(
                limits.connect_per_user,
                limits.connect_window,
            )),
            read_window: Mutex::new(SlidingWindow::new(limits.reads, limits.read_window)),
            limits,
            sessions: Mutex::new(HashMap::new()),
            load: Mutex::new(Vec::new()),
            load_world: Mutex::new(None),
            io: Mutex::new(None),
            faults,
            blackout_until: Mutex::new(None),
            on_emit: Mutex::new(None),
        })
    }

    /// The axum router: Socket.IO at `path` plus the HTTP control routes.
    pub fn router(self: &Arc<Self>, path: &str) -> Router {
        let (layer, io) = SocketIo::builder()
            .req_path(path.to_string())
            // A slow reader must not lose diffs: socket.io servers buffer without bound.
            .max_buffer_size(1 << 20)
            .max_payload(64 << 20)
            .build_layer();
        let sim = self.clone();
        let registrar = self.clone();
        let handler = move |s: SocketRef, TryData(auth): TryData<Value>| {
            let sim = sim.clone();
            async move { sim.on_connect(s, auth.unwrap_or(Value::Null)) }
        };
        io.ns(
            "/",
            handler.with(move |s: SocketRef| {
                let sim = registrar.clone();
                async move {
                    sim.register_events(&s);
                    Ok::<(), std::convert::Infallible>(())
                }
            }),
        );
        *lock(&self.io) = Some(io);
        let router = Router::new()
            .route(
                "/health",
                get(|| async { Json(json!({"ok": true, "status": "up"})) }),
            )
            .route("/truth", get(truth))
            .route("/pause", post(pause))
            .route("/resume", post(resume))
            .route("/load/start", post(load_start))
            .route("/admin/emit", post(admin_emit))
            .route("/admin/disconnect", post(admin_disconnect))
            .route("/admin/blackout", post(admin_blackout))
            .with_state(self.clone())
            .layer(layer);
        match &self.faults.chaos {
            // Outermost, so it sees every Engine.IO request before socketioxide does.
            Some(chaos) => router.layer(axum::middleware::from_fn_with_state(
                chaos.conns.clone(),
                super::chaos::track_sids,
            )),
            None => router,
        }
    }

    /// The chaos counters for `/truth`: zeros when chaos is off.
    fn chaos_json(&self) -> Value {
        match &self.faults.chaos {
            Some(c) => c.counters.json(),
            None => ChaosCounters::default().json(),
        }
    }

    fn in_blackout(&self) -> bool {
        lock(&self.blackout_until).is_some_and(|until| Instant::now() < until)
    }

    fn io(&self) -> Option<SocketIo> {
        lock(&self.io).clone()
    }

    /// Registers the session's event handlers. Runs as a connect middleware, before the CONNECT
    /// packet goes out: a client that emits a read as soon as it is connected (seed 002's
    /// example does, in its `connect` handler) must never race the registration. A read then
    /// waits for `on_connect` to admit the session (auth and limits) or refuse it.
    fn register_events(self: &Arc<Self>, s: &SocketRef) {
        let (tx, admitted) = tokio::sync::watch::channel(None::<Option<usize>>);
        lock(&self.admissions).insert(s.id.to_string(), tx);
        for event in ["graph:get", "branch:get", "history:page", "trash:page"] {
            let sim = self.clone();
            let admitted = admitted.clone();
            s.on(
                event,
                move |TryData(data): TryData<Value>, ack: AckSender| {
                    let sim = sim.clone();
                    let admitted = admitted.clone();
                    async move {
                        let dropping = sim
                            .drop_reads
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if dropping {
                            tracing::info!(event, "read left unanswered (--drop-reads)");
                            return;
                        }
                        // The read was registered before the session was admitted (see
                        // `register_events`): wait for the admission, briefly.
                        let mut admitted = admitted.clone();
                        let decided = tokio::time::timeout(Duration::from_secs(5), async {
                            admitted
                                .wait_for(Option::is_some)
                                .await
                                .map(|a| *a)
                                .ok()
                                .flatten()
                                .flatten()
                        })
                        .await;
                        let Ok(Some(user)) = decided else {
                            return;
                        };
                        let reply = sim.read(user, event, data.unwrap_or(Value::Null));
                        let delay = sim.faults.chaos.as_ref().and_then(Chaos::ack_delay);
                        if let Some(delay) = delay {
                            // socketioxide runs each async handler as its own task, so this
                            // wait holds back only this ack.
                            tracing::info!(event, ?delay, "ack sent late (--chaos)");
                            tokio::time::sleep(delay).await;
                        }
                        ack.send(&reply).ok();
                    }
                },
            );
        }
        if !self.faults.no_ws_ping {
            s.on("ws:ping", |s: SocketRef| async move {
                s.emit("ws:pong", &json!({"serverTime": now_rfc3339()}))
                    .ok();
            });
        }
        s.on_fallback(|ack: AckSender| async move {
            let trace = new_trace_id();
            let e = ApiError {
                code: "bad_request.unknown_event",
                message: "Unknown event",
            };
            ack.send(&err_ack(e, &trace)).ok();
        });
    }

    fn on_connect(self: Arc<Self>, s: SocketRef, auth: Value) {
        // A session that is refused below never gets its reads answered.
        let _refuse_reads = RefuseUnlessAdmitted {
            sim: self.clone(),
            sid: s.id.to_string(),
        };
        Counters::bump(&self.counters.connect_attempts);
        // An outage refuses before any limit sees the attempt: a client reconnecting through
        // it is not breaking the connect limits.
        if self.in_blackout() {
            Counters::bump(&self.counters.blackout_refusals);
            tracing::info!("connect refused: blackout");
            s.disconnect().ok();
            return;
        }
        let peer = s
            .req_parts()
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let ip = peer.map(|p| p.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
        if !lock(&self.ip_window).hit_always(&ip) {
            Counters::bump(&self.counters.rejected_ip_limit);
            tracing::info!(%ip, "connect refused: per-IP connect limit");
            s.disconnect().ok();
            return;
        }
        let token = token_of(&s, &auth);
        let user = token
            .as_deref()
            .and_then(|t| lock(&self.world).user_by_token(t));
        let Some(user) = user else {
            Counters::bump(&self.counters.rejected_auth);
            let (error, message) = if token.is_none() {
                ("forbidden.auth_missing", "Authentication required")
            } else {
                ("unauthorized", "Invalid or missing API token")
            };
            tracing::info!(error, "connect refused: authentication");
            s.emit(
                "connected",
                &json!({"ok": false, "error": error, "message": message}),
            )
            .ok();
            // Give the refusal a moment to reach the client before the disconnect packet.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.disconnect().ok();
            });
            return;
        };
        if !lock(&self.user_window).hit_always(&user) {
            Counters::bump(&self.counters.rejected_user_limit);
            tracing::info!(user, "connect refused: per-user connect limit");
            s.disconnect().ok();
            return;
        }
        {
            let mut sessions = lock(&self.sessions);
            let n = sessions.entry(user).or_default();
            if *n >= self.limits.concurrent_per_user {
                drop(sessions);
                Counters::bump(&self.counters.rejected_concurrent);
                tracing::info!(user, "connect refused: concurrent session limit");
                s.disconnect().ok();
                return;
            }
            *n += 1;
        }
        Counters::bump(&self.counters.connects);
        let uid = lock(&self.world).users[user].uid.clone();
        s.join(format!("user:{uid}"));
        let sim = self.clone();
        s.on_disconnect(move |s: SocketRef| {
            let sim = sim.clone();
            async move {
                if let Some(n) = lock(&sim.sessions).get_mut(&user) {
                    *n = n.saturating_sub(1);
                }
                if let Some(chaos) = &sim.faults.chaos {
                    chaos.conns.forget(&s.id.to_string());
                }
            }
        });
        if let Some(tx) = lock(&self.admissions).remove(&s.id.to_string()) {
            tx.send_replace(Some(Some(user)));
        }
        s.emit(
            "connected",
            &json!({"ok": true, "uid": uid, "client": "api", "serverTime": now_rfc3339()}),
        )
        .ok();
        if self.faults.chaos.is_some() {
            tokio::spawn(self.chaos_end(s, peer));
        }
    }

    /// Ends a session at a random moment, by a server disconnect or by cutting its transport.
    async fn chaos_end(self: Arc<Self>, s: SocketRef, peer: Option<SocketAddr>) {
        let Some(chaos) = &self.faults.chaos else {
            return;
        };
        let (life, ending) = chaos.session_end();
        tokio::time::sleep(life).await;
        if !s.connected() {
            return;
        }
        let cut =
            ending == Ending::TransportDrop && chaos.conns.cut_session(&s.id.to_string(), peer) > 0;
        if cut {
            tracing::info!(sid = %s.id, "transport cut (--chaos)");
            Counters::bump(&chaos.counters.transport_drops);
            // A polling session outlives its cut request until the heartbeat times out; end it
            // here too. Its DISCONNECT packet waits for a poll that never comes: the client's
            // next poll names a session that no longer exists.
            if s.transport_type() == socketioxide::TransportType::Polling {
                s.disconnect().ok();
            }
        } else {
            // A session whose connection is not known cannot be cut; it still ends.
            tracing::info!(sid = %s.id, ?ending, "server disconnect (--chaos)");
            Counters::bump(&chaos.counters.server_disconnects);
            s.disconnect().ok();
        }
    }

    /// Answers one read event: missing events first (no limiter stands before a handler that
    /// does not exist), then chaos, then the rate limit, then parameters, then the query.
    fn read(&self, user: usize, event: &'static str, data: Value) -> Value {
        let trace = new_trace_id();
        let missing = match event {
            "history:page" => self.faults.no_history,
            "trash:page" => self.faults.no_trash_page,
            _ => false,
        };
        if missing {
            return json!({"ok": false, "error": "internal.not_implemented",
                          "message": format!("{event} is not implemented"), "trace_id": trace});
        }
        // Counted apart from `rateLimitedAcks`: the client did nothing wrong.
        if self
            .faults
            .chaos
            .as_ref()
            .is_some_and(Chaos::spurious_rate_limit)
        {
            tracing::info!(user, event, "read refused: spurious rate limit (--chaos)");
            return json!({"ok": false, "error": "rate_limited",
                          "message": "Too many requests, please slow down", "trace_id": trace});
        }
        if !lock(&self.read_window).try_hit(&(user, event)) {
            Counters::bump(&self.counters.rate_limited_acks);
            tracing::info!(user, event, "read refused: rate limit");
            return json!({"ok": false, "error": "rate_limited",
                          "message": "Too many requests, please slow down", "trace_id": trace});
        }
        Counters::bump(&self.counters.reads_served);
        let result = self.query(user, event, &data);
        match result {
            Ok(mut v) => {
                v["trace_id"] = json!(trace);
                v
            }
            Err(e) => err_ack(e, &trace),
        }
    }

    fn query(&self, user: usize, event: &str, data: &Value) -> Result<Value, ApiError> {
        if !(data.is_object() || data.is_null()) {
            return Err(BAD_PAYLOAD);
        }
        let mut world = lock(&self.world);
        match event {
            "graph:get" => {
                let limit = int_param(data, "limit", 1000)?;
                let offset = int_param(data, "offset", 0)?;
                world.graph_page(user, limit, offset)
            }
            "branch:get" => {
                let limit = int_param(data, "limit", 1000)?;
                let offset = int_param(data, "offset", 0)?;
                let root = data.get("root").and_then(Value::as_str).ok_or(ApiError {
                    code: "bad_request.missing_params",
                    message: "root is required",
                })?;
                world.branch_page(user, root, limit, offset)
            }
            "trash:page" => {
                let limit = int_param(data, "limit", 100)?;
                let offset = int_param(data, "offset", 0)?;
                world.trash_page(user, limit, offset)
            }
            _ => {
                let limit = int_param(data, "limit", 100)?;
                let offset = int_param(data, "offset", 0)?;
                let scope_type = data.get("scopeType").and_then(Value::as_str).unwrap_or("");
                let scope_id = data.get("scopeId").and_then(Value::as_str).unwrap_or("");
                let page = world.history_select(user, scope_type, scope_id, limit, offset)?;
                // A page of 1,000 batches takes tens of milliseconds to write out; the world's
                // mutations (and the diffs they push) need not wait for that.
                drop(world);
                Ok(page.to_json())
            }
        }
    }

    /// Sends one `graph:diff` to every session of its owner. A full socket buffer drops the
    /// event for that socket and counts it: it means a client stopped reading for minutes.
    pub fn broadcast(&self, owner: usize, diff: &Value) {
        let Some(io) = self.io() else {
            return;
        };
        let uid = lock(&self.world).users[owner].uid.clone();
        if let Some(observer) = lock(&self.on_emit).clone() {
            observer(diff);
        }
        for s in io.to(format!("user:{uid}")).sockets() {
            match s.emit("graph:diff", diff) {
                Ok(()) => Counters::bump(&self.counters.diffs_emitted),
                Err(e) => {
                    Counters::bump(&self.counters.diffs_dropped);
                    tracing::warn!(error = %e, "graph:diff not delivered to a session");
                }
            }
        }
    }

    /// Pushes every pre-generated load event to its owner's sessions as fast as each socket
    /// takes them, waiting whenever a socket buffer is full rather than dropping.
    async fn push_load(self: Arc<Self>) {
        let Some(io) = self.io() else {
            return;
        };
        let events = std::mem::take(&mut *lock(&self.load));
        if let Some(after) = lock(&self.load_world).take() {
            *lock(&self.world) = after;
        }
        let uids: Vec<String> = lock(&self.world)
            .users
            .iter()
            .map(|u| u.uid.clone())
            .collect();
        let sockets: Vec<Vec<SocketRef>> = uids
            .iter()
            .map(|uid| io.to(format!("user:{uid}")).sockets())
            .collect();
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        for (owner, payload) in &events {
            for s in &sockets[*owner] {
                loop {
                    match s.emit("graph:diff", payload.as_ref()) {
                        Ok(()) => break,
                        Err(socketioxide::SendError::Socket(
                            socketioxide::SocketError::InternalChannelFull,
                        )) => {
                            tokio::time::sleep(Duration::from_micros(500)).await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "load push stopped for a session");
                            break;
                        }
                    }
                }
                sent += 1;
            }
        }
        self.counters
            .load_emitted
            .fetch_add(sent, Ordering::Relaxed);
        for list in &sockets {
            for s in list {
                s.emit("sim:load_done", &json!({"events": sent})).ok();
            }
        }
        tracing::info!(
            sent,
            secs = started.elapsed().as_secs_f64(),
            "load push done"
        );
    }
}

#[derive(Deserialize)]
struct TruthQuery {
    history: Option<u8>,
}

async fn truth(State(sim): State<Arc<Sim>>, Query(q): Query<TruthQuery>) -> Json<Value> {
    let mut v = lock(&sim.world).truth(q.history.unwrap_or(1) != 0);
    v["counters"] = sim.counters.json();
    v["paused"] = json!(sim.paused.load(Ordering::Relaxed));
    v["chaos"] = sim.chaos_json();
    v["blackoutRefusals"] = json!(sim.counters.blackout_refusals.load(Ordering::Relaxed));
    Json(v)
}

async fn pause(State(sim): State<Arc<Sim>>) -> Json<Value> {
    sim.paused.store(true, Ordering::SeqCst);
    // The generator checks the flag under the world lock, so once this lock is taken no
    // mutation is half-way: the truth read after this reply is final.
    let batches = lock(&sim.world).batch_count();
    Json(json!({"ok": true, "batches": batches}))
}

async fn resume(State(sim): State<Arc<Sim>>) -> Json<Value> {
    sim.paused.store(false, Ordering::SeqCst);
    Json(json!({"ok": true}))
}

async fn load_start(State(sim): State<Arc<Sim>>) -> Json<Value> {
    let events = lock(&sim.load).len();
    tokio::spawn(sim.clone().push_load());
    Json(json!({"ok": true, "events": events}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitRequest {
    /// Target user; all users when absent.
    uid: Option<String>,
    event: String,
    data: Value,
}

/// Emits an arbitrary event, for tests of how clients treat bad or unexpected input.
async fn admin_emit(State(sim): State<Arc<Sim>>, Json(req): Json<EmitRequest>) -> Json<Value> {
    let Some(io) = sim.io() else {
        return Json(json!({"ok": false}));
    };
    let sockets = match &req.uid {
        Some(uid) => io.to(format!("user:{uid}")).sockets(),
        None => io.sockets(),
    };
    let mut n = 0;
    for s in sockets {
        if s.emit(req.event.as_str(), &req.data).is_ok() {
            n += 1;
        }
    }
    Json(json!({"ok": true, "sockets": n}))
}

#[derive(Deserialize)]
struct DisconnectQuery {
    uid: Option<String>,
}

/// Disconnects sessions server-side, for reconnect tests.
async fn admin_disconnect(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<DisconnectQuery>,
) -> Json<Value> {
    let Some(io) = sim.io() else {
        return Json(json!({"ok": false}));
    };
    let sockets = match &q.uid {
        Some(uid) => io.to(format!("user:{uid}")).sockets(),
        None => io.sockets(),
    };
    let n = sockets.len();
    for s in sockets {
        s.disconnect().ok();
    }
    Json(json!({"ok": true, "sockets": n}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlackoutRequest {
    /// Length of the outage in milliseconds.
    ms: u64,
}

/// An outage: disconnects every session now and refuses every connect for `ms` milliseconds.
/// The generator keeps running, so a client comes back to changes it has to catch up on.
async fn admin_blackout(
    State(sim): State<Arc<Sim>>,
    Json(req): Json<BlackoutRequest>,
) -> Json<Value> {
    // Set before disconnecting, so a client reconnecting at once is already refused.
    *lock(&sim.blackout_until) = Some(Instant::now() + Duration::from_millis(req.ms));
    let sockets = sim.io().map(|io| io.sockets()).unwrap_or_default();
    let n = sockets.len();
    for s in sockets {
        s.disconnect().ok();
    }
    tracing::info!(ms = req.ms, sockets = n, "blackout");
    Json(json!({"ok": true, "sockets": n, "ms": req.ms}))
}

/// Refuses a session's pending reads when `on_connect` returns without admitting it.
struct RefuseUnlessAdmitted {
    sim: Arc<Sim>,
    sid: String,
}

impl Drop for RefuseUnlessAdmitted {
    fn drop(&mut self) {
        if let Some(tx) = lock(&self.sim.admissions).remove(&self.sid) {
            tx.send_replace(Some(None));
        }
    }
}
