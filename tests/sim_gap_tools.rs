//! The simulator options that make it deviate from the documented service (history retention
//! and order, missing events, capped pages, no `ws:ping`, `--chaos`, `POST /admin/blackout`),
//! each against its own `taskstream sim` process.
//!
//! The client is a bare Socket.IO v5 over Engine.IO v4 WebSocket client written here, so a test
//! can tell a Socket.IO DISCONNECT packet from a connection that just ends, and no client
//! library's reconnection or ack bookkeeping stands in between.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::SimProcess;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound for any single wait, so no test can hang.
const STEP: Duration = Duration::from_secs(10);

fn default_user() -> (&'static str, &'static str) {
    taskstream_sim::DEFAULT_TOKENS
        .split_once(':')
        .expect("token:uid")
}

/// What the server sent.
#[derive(Debug)]
enum Ev {
    /// An EVENT packet.
    Event(String, Value),
    /// An ACK packet, unwrapped from its argument array.
    Ack(u64, Value),
    /// A Socket.IO DISCONNECT packet.
    ServerDisconnect,
    /// The connection ended; `clean` if with a WebSocket close frame or Engine.IO close packet.
    Closed { clean: bool },
}

struct Client {
    ws: Ws,
    next_ack: u64,
}

impl Client {
    /// Opens the WebSocket transport and sends the Socket.IO CONNECT packet with the token.
    async fn open(port: u16) -> Client {
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .expect("websocket handshake in time")
            .expect("websocket handshake");
        let open = timeout(STEP, ws.next())
            .await
            .expect("engine.io open packet in time");
        match open {
            Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
            other => panic!("expected the engine.io open packet, got {other:?}"),
        }
        let (token, _) = default_user();
        ws.send(Message::text(format!("40{}", json!({"api_token": token}))))
            .await
            .expect("send CONNECT");
        Client { ws, next_ack: 0 }
    }

    /// Opens a session and waits for `connected`; `Err` with what came instead.
    async fn connect(port: u16) -> Result<(Client, Value), Ev> {
        let mut c = Client::open(port).await;
        loop {
            match c.next().await {
                Ev::Event(name, v) if name == "connected" => return Ok((c, v)),
                Ev::Event(..) | Ev::Ack(..) => {}
                other => return Err(other),
            }
        }
    }

    /// The next packet that matters; answers Engine.IO pings on the way.
    async fn next(&mut self) -> Ev {
        loop {
            let msg = match timeout(STEP * 3, self.ws.next()).await {
                Ok(m) => m,
                Err(_) => panic!("nothing from the server for {:?}", STEP * 3),
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t.to_string(),
                Some(Ok(Message::Close(_))) => return Ev::Closed { clean: true },
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ev::Closed { clean: false },
            };
            match text.as_bytes().first() {
                Some(b'2') => {
                    // A pong to a server that is gone is not this function's concern.
                    let _ = self.ws.send(Message::text("3")).await;
                    continue;
                }
                Some(b'1') => return Ev::Closed { clean: true },
                Some(b'4') => {}
                _ => continue,
            }
            let packet = &text[1..];
            match packet.as_bytes().first() {
                Some(b'1') => return Ev::ServerDisconnect,
                Some(b'2') => {
                    let body = packet[1..].trim_start_matches(|c: char| c.is_ascii_digit());
                    let v: Value = serde_json::from_str(body).expect("EVENT payload is JSON");
                    let name = v[0].as_str().unwrap_or_default().to_string();
                    return Ev::Event(name, v[1].clone());
                }
                Some(b'3') => {
                    let digits: String = packet[1..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    let v: Value = serde_json::from_str(&packet[1 + digits.len()..])
                        .expect("ACK payload is JSON");
                    return Ev::Ack(digits.parse().expect("ack id"), v[0].clone());
                }
                _ => continue,
            }
        }
    }

    /// Sends an event with an ack id; returns the id.
    async fn emit_ack(&mut self, event: &str, data: Value) -> u64 {
        let id = self.next_ack;
        self.next_ack += 1;
        let _ = self
            .ws
            .send(Message::text(format!("42{id}{}", json!([event, data]))))
            .await;
        id
    }

    /// Sends an event without an ack.
    async fn emit(&mut self, event: &str, data: Value) {
        let _ = self
            .ws
            .send(Message::text(format!("42{}", json!([event, data]))))
            .await;
    }

    /// One acked read; other events (diffs) are skipped.
    async fn call(&mut self, event: &str, data: Value) -> Value {
        let id = self.emit_ack(event, data).await;
        loop {
            match self.next().await {
                Ev::Ack(got, v) if got == id => return v,
                Ev::Event(..) | Ev::Ack(..) => {}
                other => panic!("session ended during {event}: {other:?}"),
            }
        }
    }
}

fn batch_ids(v: &Value) -> Vec<String> {
    v["batches"]
        .as_array()
        .unwrap_or_else(|| panic!("batches in {v}"))
        .iter()
        .map(|b| b["batchId"].as_str().expect("batchId").to_string())
        .collect()
}

fn history(uid: &str, limit: u64, offset: u64) -> Value {
    json!({"scopeType": "USER", "scopeId": uid, "limit": limit, "offset": offset})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_retention_serves_only_the_newest_batches() {
    let sim = SimProcess::start(&["--rate", "0", "--history-retention", "5"]);
    let all = batch_ids(&sim.truth());
    assert!(
        all.len() > 5,
        "the initial graph writes more than 5 batches"
    );
    let mut newest: Vec<String> = all[all.len() - 5..].to_vec();
    newest.reverse();

    let (mut c, connected) = Client::connect(sim.port).await.expect("connected");
    let uid = connected["uid"].as_str().expect("uid").to_string();
    let first = c.call("history:page", history(&uid, 3, 0)).await;
    assert_eq!(first["hasMore"], true, "{first}");
    let second = c.call("history:page", history(&uid, 3, 3)).await;
    assert_eq!(second["hasMore"], false, "{second}");
    let served: Vec<String> = batch_ids(&first)
        .into_iter()
        .chain(batch_ids(&second))
        .collect();
    assert_eq!(served, newest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_oldest_first_starts_at_the_first_batch() {
    let sim = SimProcess::start(&["--rate", "0", "--history-oldest-first"]);
    let all = batch_ids(&sim.truth());
    let (mut c, connected) = Client::connect(sim.port).await.expect("connected");
    let uid = connected["uid"].as_str().expect("uid").to_string();
    let page = c.call("history:page", history(&uid, 5, 0)).await;
    assert_eq!(batch_ids(&page), all[..5]);
    let page = c.call("history:page", history(&uid, 5, 5)).await;
    assert_eq!(batch_ids(&page), all[5..10]);
}

fn assert_not_implemented(v: &Value) {
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "internal.not_implemented", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let trace = v["trace_id"].as_str().unwrap_or_default();
    assert_eq!(trace.len(), 12, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_history_and_trash_events_say_not_implemented() {
    let sim = SimProcess::start(&["--rate", "0", "--no-history", "--no-trash-page"]);
    let (mut c, connected) = Client::connect(sim.port).await.expect("connected");
    let uid = connected["uid"].as_str().expect("uid").to_string();
    assert_not_implemented(&c.call("history:page", history(&uid, 10, 0)).await);
    assert_not_implemented(&c.call("trash:page", json!({"limit": 10})).await);
    let graph = c.call("graph:get", json!({"limit": 1})).await;
    assert_eq!(graph["ok"], true, "{graph}");
    let counters = &sim.truth_light()["counters"];
    assert_eq!(counters["limitViolations"]["total"], 0, "{counters}");
}

/// Waits up to `wait` for a `ws:pong`.
async fn pong_within(c: &mut Client, wait: Duration) -> bool {
    c.emit("ws:ping", json!({})).await;
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Err(_) => return false,
            Ok(Ev::Event(name, _)) if name == "ws:pong" => return true,
            Ok(Ev::Event(..) | Ev::Ack(..)) => {}
            Ok(other) => panic!("session ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ws_ping_leaves_ws_ping_unanswered() {
    let plain = SimProcess::start(&["--rate", "0"]);
    let (mut c, _) = Client::connect(plain.port).await.expect("connected");
    assert!(pong_within(&mut c, Duration::from_secs(3)).await);

    let sim = SimProcess::start(&["--rate", "0", "--no-ws-ping"]);
    let (mut c, _) = Client::connect(sim.port).await.expect("connected");
    assert!(!pong_within(&mut c, Duration::from_millis(1500)).await);
}

fn object_ids(page: &Value) -> Vec<String> {
    ["nodes", "links"]
        .iter()
        .flat_map(|k| page[*k].as_array().cloned().unwrap_or_default())
        .map(|o| o["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_cap_shortens_pages_below_limit() {
    let args = [
        "--rate", "0", "--nodes", "15", "--links", "10", "--seed", "3",
    ];
    // The same seed builds the same graph: the uncapped simulator says what paging must cover.
    let plain = SimProcess::start(&args);
    let (mut c, _) = Client::connect(plain.port).await.expect("connected");
    let whole = c.call("graph:get", json!({"limit": 5000})).await;
    let expected = object_ids(&whole);
    assert!(expected.len() > 14, "{whole}");

    let capped = SimProcess::start(&[&args[..], &["--page-cap", "7"]].concat());
    let (mut c, _) = Client::connect(capped.port).await.expect("connected");
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = c
            .call("graph:get", json!({"limit": 100, "offset": offset}))
            .await;
        let ids = object_ids(&page);
        let more = page["hasMore"].as_bool().expect("hasMore");
        if more {
            assert_eq!(ids.len(), 7, "{page}");
        } else {
            assert!(ids.len() <= 7, "{page}");
        }
        offset += ids.len();
        seen.extend(ids);
        if !more {
            break;
        }
    }
    assert_eq!(seen, expected);

    // branch:get pages are capped the same way.
    let truth = capped.truth_light();
    let root = truth["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| {
            n["inTrash"] == false && n["shareRoots"].as_array().is_some_and(|r| !r.is_empty())
        })
        .and_then(|n| n["shareRoots"][0].as_str())
        .expect("a branch root")
        .to_string();
    let page = c
        .call("branch:get", json!({"root": root, "limit": 100}))
        .await;
    assert_eq!(page["ok"], true, "{page}");
    assert!(object_ids(&page).len() <= 7, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackout_disconnects_refuses_and_counts() {
    let sim = SimProcess::start(&["--rate", "20"]);
    let (mut a, _) = Client::connect(sim.port).await.expect("connected");
    let batches_before = sim.truth_light()["stats"]["batches"]
        .as_u64()
        .expect("batches");

    let reply = sim.post("/admin/blackout", Some(&json!({"ms": 2000})));
    let started = Instant::now();
    assert_eq!(reply["sockets"], 1, "{reply}");
    loop {
        match a.next().await {
            Ev::ServerDisconnect => break,
            Ev::Event(..) | Ev::Ack(..) => {}
            other => panic!("expected a server disconnect, got {other:?}"),
        }
    }
    for _ in 0..2 {
        match Client::connect(sim.port).await {
            Err(Ev::ServerDisconnect) => {}
            Ok((_, v)) => panic!("connected during the blackout: {v}"),
            Err(other) => panic!("expected a server disconnect, got {other:?}"),
        }
    }
    let truth = sim.truth_light();
    assert_eq!(truth["blackoutRefusals"], 2, "{}", truth["counters"]);
    assert_eq!(truth["counters"]["limitViolations"]["total"], 0);
    assert_eq!(truth["counters"]["rejectedConnects"], 0);

    tokio::time::sleep_until(started + Duration::from_millis(2300)).await;
    let batches_after = sim.truth_light()["stats"]["batches"]
        .as_u64()
        .expect("batches");
    assert!(
        batches_after > batches_before,
        "the generator kept running: {batches_before} -> {batches_after}"
    );
    let (_c, connected) = Client::connect(sim.port)
        .await
        .expect("connected after the blackout");
    assert_eq!(connected["ok"], true);
    assert_eq!(sim.truth_light()["blackoutRefusals"], 2);
}

/// What the chaos client saw.
#[derive(Debug, Default)]
struct Seen {
    sessions: u64,
    server_disconnects: u64,
    transport_drops: u64,
    clean_closes: u64,
    ok_acks: u64,
    rate_limited_acks: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_misbehaves_and_counts_without_blaming_a_polite_client() {
    // Sessions end about every second, so the client reconnects often: the connect limits
    // are raised for that, the read limit stays as documented.
    let sim = SimProcess::start(&[
        "--chaos",
        "--seed",
        "5",
        "--chaos-disconnect-ms",
        "1000",
        "--chaos-delay-pct",
        "50",
        "--chaos-rate-limited-pct",
        "50",
        "--connect-per-ip",
        "1000",
        "--connect-per-user",
        "1000",
    ]);
    let (_, uid) = default_user();
    let events = ["graph:get", "trash:page", "history:page"];
    // 5 reads per 10 s per event are allowed; one every 3.1 s stays under that.
    let spacing = Duration::from_millis(3100);
    let mut last_sent: HashMap<&str, Instant> = HashMap::new();
    let mut seen = Seen::default();
    let end = Instant::now() + Duration::from_secs(11);
    while Instant::now() < end {
        let (mut c, _) = match Client::connect(sim.port).await {
            Ok(ok) => ok,
            // Chaos may end a session before its `connected` event is read.
            Err(_) => continue,
        };
        seen.sessions += 1;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            for e in events {
                if last_sent.get(e).is_none_or(|t| now >= *t + spacing) {
                    last_sent.insert(e, now);
                    let data = match e {
                        "history:page" => history(uid, 10, 0),
                        _ => json!({"limit": 20}),
                    };
                    c.emit_ack(e, data).await;
                }
            }
            let next_due = events
                .iter()
                .filter_map(|e| last_sent.get(e))
                .map(|t| *t + spacing)
                .min()
                .unwrap_or(now)
                .min(end);
            match tokio::time::timeout_at(next_due, c.next()).await {
                Err(_) => continue,
                Ok(Ev::Ack(_, v)) if v["ok"] == true => seen.ok_acks += 1,
                Ok(Ev::Ack(_, v)) if v["error"] == "rate_limited" => seen.rate_limited_acks += 1,
                Ok(Ev::Ack(_, v)) => panic!("unexpected ack {v}"),
                Ok(Ev::Event(..)) => {}
                Ok(Ev::ServerDisconnect) => {
                    seen.server_disconnects += 1;
                    break;
                }
                Ok(Ev::Closed { clean: false }) => {
                    seen.transport_drops += 1;
                    break;
                }
                Ok(Ev::Closed { clean: true }) => {
                    seen.clean_closes += 1;
                    break;
                }
            }
        }
    }
    let truth = sim.truth_light();
    let chaos = &truth["chaos"];
    let counters = &truth["counters"];
    eprintln!("client saw {seen:?}; simulator chaos {chaos}");
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("a count, got {v}"));
    assert!(n(&chaos["serverDisconnects"]) > 0, "{chaos} {seen:?}");
    assert!(n(&chaos["transportDrops"]) > 0, "{chaos} {seen:?}");
    assert!(n(&chaos["delayedAcks"]) > 0, "{chaos} {seen:?}");
    assert!(n(&chaos["spuriousRateLimited"]) > 0, "{chaos} {seen:?}");
    // The client saw both kinds of ending, told apart by the DISCONNECT packet.
    assert!(seen.server_disconnects > 0, "{seen:?}");
    assert!(seen.transport_drops > 0, "{seen:?}");
    assert_eq!(seen.clean_closes, 0, "{seen:?}");
    assert!(
        seen.transport_drops <= n(&chaos["transportDrops"]),
        "{chaos} {seen:?}"
    );
    assert!(
        seen.rate_limited_acks <= n(&chaos["spuriousRateLimited"]),
        "{chaos} {seen:?}"
    );
    // Chaos is not the client's fault: no limit was broken.
    assert_eq!(counters["limitViolations"]["total"], 0, "{counters}");
    assert_eq!(counters["rateLimitedAcks"], 0, "{counters}");
    assert_eq!(truth["blackoutRefusals"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_counters_are_zero_when_off() {
    let sim = SimProcess::start(&["--rate", "0"]);
    let truth = sim.truth_light();
    assert_eq!(
        truth["chaos"],
        json!({"serverDisconnects": 0, "transportDrops": 0, "delayedAcks": 0, "spuriousRateLimited": 0})
    );
    assert_eq!(truth["blackoutRefusals"], 0);
}
