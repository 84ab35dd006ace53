//! How many `graph:diff` events per second the simulator delivers to one rust_socketio client,
//! against a ceiling measured in the same run: a bare socketioxide server pushing one small
//! constant event to the same kind of client. Run with `cargo bench --bench sim_throughput`;
//! `BENCH_EVENTS` sets the event count (default 300000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rust_socketio::asynchronous::ClientBuilder;
use rust_socketio::TransportType;
use serde_json::json;
use socketioxide::extract::SocketRef;
use socketioxide::SocketIo;
use taskstream_sim::{self as sim, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

// The same allocator as the binary, so the numbers are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "st_bench_token";
const UID: &str = "0b9f4f8e-9d7c-4b6a-8e5f-1a2b3c4d5e6f";

/// Connects a client that counts `graph:diff` events and wakes `done` at `target`.
async fn counting_client(
    url: &str,
    target: u64,
    connected: Arc<Notify>,
    done: Arc<Notify>,
    count: Arc<AtomicU64>,
) -> rust_socketio::asynchronous::Client {
    let c = count.clone();
    ClientBuilder::new(url)
        .transport_type(TransportType::Websocket)
        .opening_header("Authorization", format!("Bearer {TOKEN}"))
        .on("connected", move |_, _| {
            let connected = connected.clone();
            async move { connected.notify_one() }.boxed()
        })
        .on("graph:diff", move |_, _| {
            let n = c.fetch_add(1, Ordering::Relaxed) + 1;
            let done = done.clone();
            async move {
                if n == target {
                    done.notify_one();
                }
            }
            .boxed()
        })
        .connect()
        .await
        .expect("client connects")
}

async fn http_post(port: u16, path: &str) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok();
}

/// Events/s from the simulator in load mode, the average payload size, and a payload of
/// median size (for the like-for-like ceiling).
async fn simulator_rate(events: u64) -> (f64, usize, serde_json::Value) {
    let shutdown = CancellationToken::new();
    let cfg = SimConfig {
        tokens: format!("{TOKEN}:{UID}"),
        rate: 0.0,
        nodes: 2000,
        links: 2400,
        load: events as usize,
        ..SimConfig::default()
    };
    let t = Instant::now();
    let handle = sim::start(cfg, shutdown.clone())
        .await
        .expect("simulator starts");
    eprintln!(
        "simulator pre-generated {events} mutations in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (avg_bytes, median) = {
        let load = sim::server::lock(&handle.sim.load);
        let avg = load.iter().map(|(_, r)| r.get().len()).sum::<usize>() / load.len().max(1);
        let mut sizes: Vec<(usize, usize)> = load
            .iter()
            .enumerate()
            .map(|(i, (_, r))| (r.get().len(), i))
            .collect();
        sizes.sort_unstable();
        let median = sizes
            .get(sizes.len() / 2)
            .and_then(|(_, i)| serde_json::from_str(load[*i].1.get()).ok())
            .unwrap_or_else(|| json!({}));
        (avg, median)
    };
    let (connected, done, count) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(AtomicU64::new(0)),
    );
    let client = counting_client(
        &handle.url(),
        events,
        connected.clone(),
        done.clone(),
        count.clone(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), connected.notified())
        .await
        .expect("connected event");
    let start = Instant::now();
    http_post(handle.port, "/load/start").await;
    if tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .is_err()
    {
        panic!(
            "only {} of {events} events arrived",
            count.load(Ordering::Relaxed)
        );
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    client.disconnect().await.ok();
    shutdown.cancel();
    (rate, avg_bytes, median)
}

/// Events/s from a bare socketioxide server pushing one constant event.
async fn ceiling_rate(events: u64, payload: serde_json::Value) -> f64 {
    let (layer, io) = SocketIo::builder().max_buffer_size(1 << 20).build_layer();
    io.ns("/", move |s: SocketRef| {
        let payload = payload.clone();
        async move {
            s.emit("connected", &json!({"ok": true})).ok();
            s.on("go", move |s: SocketRef| {
                let payload = payload.clone();
                async move {
                    for _ in 0..events {
                        while let Err(socketioxide::SendError::Socket(
                            socketioxide::SocketError::InternalChannelFull,
                        )) = s.emit("graph:diff", &payload)
                        {
                            tokio::time::sleep(Duration::from_micros(500)).await;
                        }
                    }
                }
            });
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().layer(layer);
    let server = tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    let (connected, done, count) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(AtomicU64::new(0)),
    );
    let client = counting_client(
        &format!("http://127.0.0.1:{port}"),
        events,
        connected.clone(),
        done.clone(),
        count.clone(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), connected.notified())
        .await
        .expect("connected event");
    let start = Instant::now();
    client.emit("go", json!({})).await.expect("emit go");
    if tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .is_err()
    {
        panic!(
            "ceiling: only {} of {events} events arrived",
            count.load(Ordering::Relaxed)
        );
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    client.disconnect().await.ok();
    server.abort();
    rate
}

fn main() {
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let small = json!({"nodes": [{"id": "3f1d2c4b-5a61-4c1e-9b0a-7d7b6a3e52f4", "status": 1, "version": 7}], "links": []});
        let small_bytes = small.to_string().len();
        let ceiling_small = ceiling_rate(events, small).await;
        let (simulated, avg_bytes, median) = simulator_rate(events).await;
        let median_bytes = median.to_string().len();
        let ceiling_same = ceiling_rate(events, median).await;
        println!("events: {events}");
        println!("ceiling, bare socketioxide -> rust_socketio, {small_bytes}-byte event: {ceiling_small:.0} events/s");
        println!("ceiling, bare socketioxide -> rust_socketio, median simulator diff ({median_bytes} bytes): {ceiling_same:.0} events/s");
        println!("simulator load mode -> rust_socketio (mean {avg_bytes}-byte graph:diff): {simulated:.0} events/s");
        println!("ratio simulator / same-size ceiling: {:.2}", simulated / ceiling_same);
        println!("ratio simulator / small-event ceiling: {:.2}", simulated / ceiling_small);
    });
}
