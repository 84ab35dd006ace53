//! Deliberate misbehaviour of the simulated service (`taskstream sim --chaos`): random server
//! disconnects and transport losses of connected sessions, late acks and spurious
//! `rate_limited` acks, all drawn from one RNG seeded by `--seed` and counted for `/truth`.
//!
//! A transport loss closes a session's TCP connection without a Socket.IO DISCONNECT packet
//! (nor a WebSocket close frame). socketioxide does not expose its Engine.IO socket, so in chaos
//! mode the API port is served by [`CutListener`], whose connections can each be cut from
//! outside, and the [`track_sids`] middleware notes which connections carry which Engine.IO
//! session (the `sid` query parameter of polling requests and of a WebSocket upgrade;
//! socketioxide gives the Socket.IO socket of the default namespace that same id). A session
//! opened directly over WebSocket has no `sid` parameter: its one connection is the peer of
//! its handshake.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use futures_util::task::AtomicWaker;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::server::lock;

/// What `--chaos` does, from its options.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Mean lifetime of a session before chaos ends it (exponentially distributed).
    pub disconnect_mean: Duration,
    /// Percent of read acks sent 2-8 s late.
    pub delay_pct: f64,
    /// Percent of reads answered `rate_limited` although under the limit.
    pub rate_limited_pct: f64,
}

/// How chaos misbehaved, for `/truth` (`"chaos"`); zeros when chaos is off.
#[derive(Debug, Default)]
pub struct ChaosCounters {
    pub server_disconnects: AtomicU64,
    pub transport_drops: AtomicU64,
    pub delayed_acks: AtomicU64,
    pub spurious_rate_limited: AtomicU64,
}

impl ChaosCounters {
    /// The `/truth` object.
    pub fn json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "serverDisconnects": g(&self.server_disconnects),
            "transportDrops": g(&self.transport_drops),
            "delayedAcks": g(&self.delayed_acks),
            "spuriousRateLimited": g(&self.spurious_rate_limited),
        })
    }
}

/// The chaos of a running simulator: its options, its seeded RNG, its counters and the
/// connections it can cut.
pub struct Chaos {
    cfg: ChaosConfig,
    rng: Mutex<ChaCha8Rng>,
    pub counters: ChaosCounters,
    pub conns: Arc<ConnRegistry>,
}

/// How a session ends when chaos ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A Socket.IO DISCONNECT packet (`io server disconnect` on the client).
    ServerDisconnect,
    /// The TCP connection closes with no DISCONNECT packet (`transport close` on the client).
    TransportDrop,
}

impl Chaos {
    /// Chaos seeded from `seed`, on a stream apart from the world's so the generated
    /// mutations stay the same with or without chaos.
    pub fn new(cfg: ChaosConfig, seed: u64) -> Self {
        Self {
            cfg,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xC4A0_5C4A_05C4_A05C)),
            counters: ChaosCounters::default(),
            conns: Arc::new(ConnRegistry::default()),
        }
    }

    fn roll(&self, pct: f64) -> bool {
        pct > 0.0 && lock(&self.rng).gen_range(0.0..100.0) < pct
    }

    /// When and how chaos will end a session that just connected.
    pub fn session_end(&self) -> (Duration, Ending) {
        let mut rng = lock(&self.rng);
        // Exponential lifetimes make the disconnects a Poisson process: on average one per
        // `disconnect_mean` per session, at no predictable moment.
        let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let life = self.cfg.disconnect_mean.mul_f64(-u.ln());
        let ending = if rng.gen_bool(0.5) {
            Ending::ServerDisconnect
        } else {
            Ending::TransportDrop
        };
        (life, ending)
    }

    /// Whether this read gets a `rate_limited` ack although under the limit (and counts it).
    pub fn spurious_rate_limit(&self) -> bool {
        let hit = self.roll(self.cfg.rate_limited_pct);
        if hit {
            self.counters
                .spurious_rate_limited
                .fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// How late to send this read's ack, if late (and counts it).
    pub fn ack_delay(&self) -> Option<Duration> {
        if !self.roll(self.cfg.delay_pct) {
            return None;
        }
        self.counters.delayed_acks.fetch_add(1, Ordering::Relaxed);
        let ms = lock(&self.rng).gen_range(2_000..=8_000);
        Some(Duration::from_millis(ms))
    }
}

/// One connection's cut switch.
#[derive(Default)]
struct Cut {
    done: AtomicBool,
    // Separate wakers: an upgraded WebSocket may read and write from different tasks, and the
    // reader must wake to see the cut even when nothing is being written.
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

impl Cut {
    fn fire(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.read_waker.wake();
        self.write_waker.wake();
    }
}

/// The open connections of the API port by peer address, and which of them carry which
/// Engine.IO session.
#[derive(Default)]
pub struct ConnRegistry {
    conns: Mutex<HashMap<SocketAddr, Arc<Cut>>>,
    sids: Mutex<HashMap<String, HashSet<SocketAddr>>>,
}

impl ConnRegistry {
    /// Cuts every connection of session `sid`, plus `handshake_peer`; returns how many were open.
    pub fn cut_session(&self, sid: &str, handshake_peer: Option<SocketAddr>) -> usize {
        let mut peers: HashSet<SocketAddr> = lock(&self.sids).remove(sid).unwrap_or_default();
        peers.extend(handshake_peer);
        let conns = lock(&self.conns);
        let mut n = 0;
        for p in peers {
            if let Some(c) = conns.get(&p) {
                c.fire();
                n += 1;
            }
        }
        n
    }

    /// Forgets a session that ended.
    pub fn forget(&self, sid: &str) {
        lock(&self.sids).remove(sid);
    }

    fn note(&self, sid: &str, peer: SocketAddr) {
        lock(&self.sids)
            .entry(sid.to_string())
            .or_default()
            .insert(peer);
    }
}

/// A TCP listener whose connections [`ConnRegistry::cut_session`] can cut.
pub struct CutListener {
    inner: TcpListener,
    conns: Arc<ConnRegistry>,
}

impl CutListener {
    /// Serves `inner`'s connections, registered in `conns`.
    pub fn new(inner: TcpListener, conns: Arc<ConnRegistry>) -> Self {
        Self { inner, conns }
    }
}

impl axum::serve::Listener for CutListener {
    type Io = CuttableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((mut stream, peer)) => {
                    crate::no_delay(&mut stream);
                    let cut = Arc::new(Cut::default());
                    lock(&self.conns.conns).insert(peer, cut.clone());
                    let io = CuttableStream {
                        inner: stream,
                        cut,
                        peer,
                        conns: self.conns.clone(),
                    };
                    return (io, peer);
                }
                Err(e) => {
                    // As axum's own listener does: out of file descriptors and the like pass.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The peer address of a [`CutListener`] connection, as connect info.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, CutListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, CutListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A TCP stream that fails every read and write once cut; the server then drops it, which
/// closes the connection with no goodbye of any protocol.
pub struct CuttableStream {
    inner: TcpStream,
    cut: Arc<Cut>,
    peer: SocketAddr,
    conns: Arc<ConnRegistry>,
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "connection cut by --chaos")
}

impl AsyncRead for CuttableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Register before checking, so a cut between the check and the inner poll still wakes us.
        this.cut.read_waker.register(cx.waker());
        if this.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cut.write_waker.register(cx.waker());
        if this.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cut.write_waker.register(cx.waker());
        if this.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Drop for CuttableStream {
    fn drop(&mut self) {
        let mut conns = lock(&self.conns.conns);
        // The peer's port may already belong to a newer connection; remove only our own entry.
        if conns
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cut))
        {
            conns.remove(&self.peer);
        }
    }
}

/// Middleware of chaos mode: gives handlers the usual `ConnectInfo<SocketAddr>` (the server's
/// connect-limit code reads that) and notes the connection of every request naming a session.
pub async fn track_sids(
    State(conns): State<Arc<ConnRegistry>>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(ConnectInfo(Peer(peer))) = req.extensions().get::<ConnectInfo<Peer>>().copied() {
        req.extensions_mut().insert(ConnectInfo(peer));
        let sid = req
            .uri()
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("sid="));
        if let Some(sid) = sid {
            conns.note(sid, peer);
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chaos(pct: f64) -> Chaos {
        Chaos::new(
            ChaosConfig {
                disconnect_mean: Duration::from_millis(1000),
                delay_pct: pct,
                rate_limited_pct: pct,
            },
            7,
        )
    }

    #[test]
    fn zero_percent_never_fires_and_counts_nothing() {
        let c = chaos(0.0);
        for _ in 0..1000 {
            assert!(!c.spurious_rate_limit());
            assert!(c.ack_delay().is_none());
        }
        assert_eq!(c.counters.json()["spuriousRateLimited"], 0);
        assert_eq!(c.counters.json()["delayedAcks"], 0);
    }

    #[test]
    fn rolls_are_counted_and_delays_in_range() {
        let c = chaos(50.0);
        let mut delayed = 0;
        for _ in 0..1000 {
            if let Some(d) = c.ack_delay() {
                assert!((2000..=8000).contains(&d.as_millis()));
                delayed += 1;
            }
        }
        assert!((350..650).contains(&delayed), "{delayed}");
        assert_eq!(c.counters.json()["delayedAcks"], delayed);
    }

    #[test]
    fn session_ends_average_the_mean_and_mix_both_kinds() {
        let c = chaos(0.0);
        let ends: Vec<_> = (0..2000).map(|_| c.session_end()).collect();
        let mean = ends.iter().map(|(d, _)| d.as_secs_f64()).sum::<f64>() / ends.len() as f64;
        assert!((0.9..1.1).contains(&mean), "{mean}");
        let drops = ends
            .iter()
            .filter(|(_, e)| *e == Ending::TransportDrop)
            .count();
        assert!((900..1100).contains(&drops), "{drops}");
    }
}
