//! The SynapTask API simulator (`taskstream sim`, crate `taskstream-sim`): a faithful counterpart of the Socket.IO API
//! (seeds 000-003, `shared/api/DECISIONS.md`) and of the job-event WebSocket API (seed 004),
//! with a seeded mutation generator and HTTP ground truth. The connector's tests, demo and
//! benchmarks all run against it.
//!
//! Options that make it deviate from the documented service (history retention and order,
//! missing events, capped pages, `--chaos`) are all off by default.
//!
//! Layout: [`model`] entities and their JSON, [`world`] state and rules, [`generator`] seeded
//! mutations, [`server`] Socket.IO and HTTP, [`chaos`] random misbehaviour, [`jobs`] the job
//! API.

pub mod chaos;
pub mod generator;
pub mod jobs;
pub mod limits;
pub mod model;
pub mod registry;
pub mod server;
pub mod world;

use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::chaos::{Chaos, ChaosConfig, CutListener, Peer};
use self::generator::InitialSize;
use self::model::User;
use self::server::{lock, Faults, Limits, Sim};
use self::world::{ReadShape, World};

/// The token and user of `taskstream sim` when `--tokens` is not given.
pub const DEFAULT_TOKENS: &str = "st_sim_demo_token_0001:5f0c6a52-3b8e-4d7a-9c1e-2a4b6d8f0a11";

/// Options of `taskstream sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Port of the Socket.IO API and the HTTP truth routes (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of the job-event WebSocket API (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub jobs_port: u16,
    /// Socket.IO path (`/socket.io` as documented; some deployments use `/ext-socket.io`).
    #[arg(long, default_value = "/socket.io")]
    pub path: String,
    /// Users as `token:uid` pairs, comma separated; uid must be a UUID.
    #[arg(long, default_value = DEFAULT_TOKENS)]
    pub tokens: String,
    /// Seed of every random choice (ids, mutations, job events).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Live mutations per second (0 stops the generator).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Initial number of nodes (over all users).
    #[arg(long, default_value_t = 200)]
    pub nodes: usize,
    /// Initial number of links.
    #[arg(long, default_value_t = 260)]
    pub links: usize,
    /// Load mode: pre-generate this many mutations, pushed as fast as possible on `POST /load/start`.
    #[arg(long, default_value_t = 0)]
    pub load: usize,
    /// Job events per second sent to each connected job-API client.
    #[arg(long, default_value_t = 2.0)]
    pub jobs_rate: f64,
    /// Every Nth job event is a malformed frame (0 = never).
    #[arg(long, default_value_t = 0)]
    pub jobs_malformed_every: u64,
    /// Connect attempts allowed per IP per minute (documented: 10).
    #[arg(long, default_value_t = 10)]
    pub connect_per_ip: usize,
    /// Connect attempts allowed per user per minute (documented: 20).
    #[arg(long, default_value_t = 20)]
    pub connect_per_user: usize,
    /// Concurrent sessions allowed per user (documented: 10).
    #[arg(long, default_value_t = 10)]
    pub max_sessions: usize,
    /// Reads allowed per user per event name in each read window (documented: 5).
    #[arg(long, default_value_t = 5)]
    pub read_limit: usize,
    /// Length of the read window in milliseconds (documented: 10000).
    #[arg(long, default_value_t = 10_000)]
    pub read_window_ms: u64,
    /// Start with the generator paused (`POST /resume` starts it).
    #[arg(long)]
    pub start_paused: bool,
    /// Leave the first N read requests unanswered (no ack at all), for client timeout tests.
    #[arg(long, default_value_t = 0)]
    pub drop_reads: u64,
    /// `history:page` serves only the newest N batches of each scope, as a plan's history
    /// retention would (0 = all).
    #[arg(long, default_value_t = 0)]
    pub history_retention: usize,
    /// `history:page` lists the oldest batch first instead of the newest.
    #[arg(long)]
    pub history_oldest_first: bool,
    /// `history:page` acks `internal.not_implemented`.
    #[arg(long)]
    pub no_history: bool,
    /// `trash:page` acks `internal.not_implemented` (the documented server has no trash events).
    #[arg(long)]
    pub no_trash_page: bool,
    /// `graph:get` and `branch:get` return at most N objects per page whatever `limit` asks
    /// (0 = no cap).
    #[arg(long, default_value_t = 0)]
    pub page_cap: usize,
    /// Leave `ws:ping` unanswered (it is only in a changelog); Engine.IO's own ping still works.
    #[arg(long)]
    pub no_ws_ping: bool,
    /// Misbehave at random (seeded by --seed): disconnect sessions, cut their transport, send
    /// acks late and answer `rate_limited` under the limit; counted in `/truth` `chaos`.
    #[arg(long)]
    pub chaos: bool,
    /// With --chaos: mean lifetime of a session in milliseconds before chaos ends it, half the
    /// time by a server disconnect, half by cutting its connection.
    #[arg(long, default_value_t = 8000)]
    pub chaos_disconnect_ms: u64,
    /// With --chaos: percent of read acks sent 2-8 s late.
    #[arg(long, default_value_t = 5.0)]
    pub chaos_delay_pct: f64,
    /// With --chaos: percent of reads answered `rate_limited` although under the limit.
    #[arg(long, default_value_t = 5.0)]
    pub chaos_rate_limited_pct: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1".into(),
            port: 0,
            jobs_port: 0,
            path: "/socket.io".into(),
            tokens: DEFAULT_TOKENS.into(),
            seed: 1,
            rate: 5.0,
            nodes: 200,
            links: 260,
            load: 0,
            jobs_rate: 2.0,
            jobs_malformed_every: 0,
            connect_per_ip: 10,
            connect_per_user: 20,
            max_sessions: 10,
            read_limit: 5,
            read_window_ms: 10_000,
            start_paused: false,
            drop_reads: 0,
            history_retention: 0,
            history_oldest_first: false,
            no_history: false,
            no_trash_page: false,
            page_cap: 0,
            no_ws_ping: false,
            chaos: false,
            chaos_disconnect_ms: 8000,
            chaos_delay_pct: 5.0,
            chaos_rate_limited_pct: 5.0,
        }
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// `--tokens` is malformed.
    #[error("invalid --tokens entry {0:?}: expected token:uuid")]
    Tokens(String),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Parses `token:uid,token:uid` into users.
pub fn parse_users(spec: &str) -> Result<Vec<User>, SimError> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            let (token, uid) = entry
                .split_once(':')
                .ok_or_else(|| SimError::Tokens(redact(entry)))?;
            let uid = uuid::Uuid::parse_str(uid).map_err(|_| SimError::Tokens(redact(entry)))?;
            Ok(User {
                uid: uid.to_string(),
                token: token.to_string(),
                username: format!("user{}", i + 1),
                email: format!("user{}@example.test", i + 1),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|u| {
            if u.is_empty() {
                Err(SimError::Tokens(String::new()))
            } else {
                Ok(u)
            }
        })
}

/// Keeps the uid part of a `token:uid` entry for error messages; the token never leaves.
fn redact(entry: &str) -> String {
    match entry.split_once(':') {
        Some((_, uid)) => format!("<token>:{uid}"),
        None => "<token without :uid>".to_string(),
    }
}

/// A running simulator.
pub struct SimHandle {
    /// Port of the Socket.IO API and HTTP routes.
    pub port: u16,
    /// Port of the job-event API.
    pub jobs_port: u16,
    /// Shared state, for in-process callers (the demo).
    pub sim: Arc<Sim>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    /// `http://host:port` of the Socket.IO API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits for every server task to end (after the shutdown token fires).
    pub async fn join(self) {
        for t in self.tasks {
            t.await.ok();
        }
    }
}

/// Sends each frame as it is written, as Node's `ws` (under socket.io) does: with Nagle's
/// algorithm on, a small frame written while the previous one is unacknowledged waits for
/// the peer's delayed ACK, and `cargo bench --bench latency` saw 40-50 ms stalls of diffs.
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, SimError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })
}

/// Builds the world, binds both ports and starts serving; returns once ready.
pub async fn start(cfg: SimConfig, shutdown: CancellationToken) -> Result<SimHandle, SimError> {
    let users = parse_users(&cfg.tokens)?;
    let mut world = World::new(users.clone(), cfg.seed);
    // Set before the load copy below is taken, so it answers the same way.
    world.read_shape = ReadShape {
        history_retention: cfg.history_retention,
        history_oldest_first: cfg.history_oldest_first,
        page_cap: cfg.page_cap,
    };
    generator::build_initial(
        &mut world,
        InitialSize {
            nodes: cfg.nodes,
            links: cfg.links,
        },
    );
    // Load mutations run on a copy that becomes the truth when `POST /load/start` pushes
    // their diffs: a client that took its snapshot before sees every pushed diff as new.
    let mut load_world = (cfg.load > 0).then(|| world.clone());
    let mut load = Vec::with_capacity(cfg.load);
    for _ in 0..cfg.load {
        let Some(w) = load_world.as_mut() else { break };
        let applied = generator::step(w);
        // Serialising a serde_json::Value cannot fail: its keys are strings.
        let raw = serde_json::value::to_raw_value(&applied.diff).unwrap_or_else(|_| empty_diff());
        load.push((applied.owner, raw));
    }
    let limits = Limits {
        connect_per_ip: cfg.connect_per_ip,
        connect_per_user: cfg.connect_per_user,
        connect_window: Duration::from_secs(60),
        concurrent_per_user: cfg.max_sessions,
        reads: cfg.read_limit,
        read_window: Duration::from_millis(cfg.read_window_ms),
    };
    let chaos = cfg.chaos.then(|| {
        Chaos::new(
            ChaosConfig {
                // A zero mean would end every session the moment it connects.
                disconnect_mean: Duration::from_millis(cfg.chaos_disconnect_ms.max(1)),
                delay_pct: cfg.chaos_delay_pct,
                rate_limited_pct: cfg.chaos_rate_limited_pct,
            },
            cfg.seed,
        )
    });
    let faults = Faults {
        no_history: cfg.no_history,
        no_trash_page: cfg.no_trash_page,
        no_ws_ping: cfg.no_ws_ping,
        chaos,
    };
    let sim = Sim::with_faults(world, limits, faults);
    sim.paused.store(cfg.start_paused, Ordering::SeqCst);
    sim.drop_reads.store(cfg.drop_reads, Ordering::SeqCst);
    *lock(&sim.load) = load;
    *lock(&sim.load_world) = load_world;

    let api = bind(&cfg.bind, cfg.port).await?;
    let jobs_listener = bind(&cfg.bind, cfg.jobs_port).await?;
    let port = api.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    let jobs_port = jobs_listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(cfg.jobs_port);

    let app = sim.router(&cfg.path);
    let jobs = jobs::JobsSim::new(jobs::JobsConfig {
        tokens: users
            .iter()
            .map(|u| (u.token.clone(), u.uid.clone()))
            .collect(),
        seed: cfg.seed,
        rate: cfg.jobs_rate,
        ping_interval: Duration::from_secs(20),
        pong_timeout: Duration::from_secs(20),
        malformed_every: (cfg.jobs_malformed_every > 0).then_some(cfg.jobs_malformed_every),
    });
    let mut tasks = Vec::new();
    let sd = shutdown.clone();
    // Chaos serves through a listener whose connections it can cut; otherwise the plain one.
    let conns = sim.faults.chaos.as_ref().map(|c| c.conns.clone());
    tasks.push(tokio::spawn(async move {
        let served = match conns {
            Some(conns) => {
                let svc = app.into_make_service_with_connect_info::<Peer>();
                axum::serve(CutListener::new(api, conns), svc)
                    .with_graceful_shutdown(sd.cancelled_owned())
                    .await
            }
            None => {
                let svc = app.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(api.tap_io(no_delay), svc)
                    .with_graceful_shutdown(sd.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "simulator API server stopped");
        }
    }));
    let sd = shutdown.clone();
    let jobs_app = jobs.router();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(jobs_listener.tap_io(no_delay), jobs_app)
            .with_graceful_shutdown(sd.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "simulator job API server stopped");
        }
    }));
    // Upgraded job sockets outlive the HTTP server's graceful shutdown; close them ourselves.
    let sd = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        sd.cancelled().await;
        jobs.shutdown();
    }));
    tasks.push(tokio::spawn(generate(sim.clone(), cfg.rate, shutdown)));
    Ok(SimHandle {
        port,
        jobs_port,
        sim,
        tasks,
    })
}

fn empty_diff() -> Box<RawValue> {
    // A constant, valid JSON literal.
    RawValue::from_string(r#"{"nodes":[],"links":[]}"#.to_string())
        .unwrap_or_else(|_| unreachable!())
}

/// Runs `rate` mutations per second until shutdown, broadcasting each diff to its owner.
async fn generate(sim: Arc<Sim>, rate: f64, shutdown: CancellationToken) {
    if rate <= 0.0 || !rate.is_finite() {
        return;
    }
    let tick = Duration::from_secs_f64((1.0 / rate).clamp(0.001, 0.01));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut credit = 0.0f64;
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = tokio::time::Instant::now();
        credit = (credit + rate * (now - last).as_secs_f64()).min(rate.max(1.0));
        last = now;
        while credit >= 1.0 {
            credit -= 1.0;
            let applied = {
                let mut w = lock(&sim.world);
                if sim.paused.load(Ordering::SeqCst) {
                    credit = 0.0;
                    None
                } else {
                    Some(generator::step(&mut w))
                }
            };
            if let Some(a) = applied {
                sim.broadcast(a.owner, &a.diff);
            }
        }
    }
}

/// `taskstream sim`: starts the simulator, prints one JSON line with its ports, serves until shutdown.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> Result<(), SimError> {
    let load = cfg.load;
    let handle = start(cfg, shutdown).await?;
    let ready = serde_json::json!({
        "ready": true,
        "port": handle.port,
        "jobs_port": handle.jobs_port,
        "url": handle.url(),
        "load_events": load,
    });
    println!("{ready}");
    tracing::info!(
        port = handle.port,
        jobs_port = handle.jobs_port,
        "simulator ready"
    );
    handle.join().await;
    Ok(())
}
