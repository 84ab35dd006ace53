//! Integration tests of the job-event WebSocket simulator (`taskstream_sim::jobs`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use taskstream_sim::jobs::{JobsConfig, JobsSim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TOKEN: &str = "tok-alpha";
/// Upper bound for any single wait, so no test can hang.
const STEP: Duration = Duration::from_secs(10);
const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn cfg(seed: u64, rate: f64) -> JobsConfig {
    JobsConfig {
        tokens: vec![(TOKEN.to_owned(), "user-1".to_owned())],
        seed,
        rate,
        ping_interval: Duration::from_secs(20),
        pong_timeout: Duration::from_secs(20),
        malformed_every: None,
    }
}

struct Server {
    addr: SocketAddr,
    sim: JobsSim,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.sim.shutdown();
        self.task.abort();
    }
}

async fn start(cfg: JobsConfig) -> Server {
    let sim = JobsSim::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = sim.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    Server { addr, sim, task }
}

fn ws_url(addr: SocketAddr, client_id: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("ws://{addr}/api/v1/ws/{client_id}?token={t}"),
        None => format!("ws://{addr}/api/v1/ws/{client_id}"),
    }
}

async fn try_connect(url: String) -> Result<Ws, tungstenite::Error> {
    timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .map(|(ws, _)| ws)
}

async fn connect(addr: SocketAddr, client_id: &str) -> Ws {
    try_connect(ws_url(addr, client_id, Some(TOKEN)))
        .await
        .expect("connect failed")
}

/// Connects, retrying while the client_id is still held by a connection the server is
/// tearing down (409).
async fn connect_retry(addr: SocketAddr, client_id: &str) -> Ws {
    let deadline = Instant::now() + STEP;
    loop {
        match try_connect(ws_url(addr, client_id, Some(TOKEN))).await {
            Ok(ws) => return ws,
            Err(tungstenite::Error::Http(r)) if r.status() == 409 => {
                assert!(Instant::now() < deadline, "client_id never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }
}

/// Status of a refused WebSocket handshake.
async fn refused_status(url: String) -> u16 {
    match try_connect(url).await {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake unexpectedly accepted"),
    }
}

/// Minimal HTTP/1.1 exchange over a fresh TCP connection: returns (status, JSON body).
/// `connection` is the Connection header; the body is read by Content-Length, so an
/// `Upgrade` request answered without upgrading does not leave the read waiting for EOF.
async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    connection: &str,
) -> (u16, Value) {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
             {extra_headers}Connection: {connection}\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before headers ended");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).expect("utf8 head");
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .expect("content-length");
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before body ended");
            body.extend_from_slice(&chunk[..n]);
        }
        let body = if length == 0 {
            Value::Null
        } else {
            serde_json::from_slice(&body[..length]).expect("json body")
        };
        (status, body)
    };
    timeout(STEP, exchange).await.expect("http timed out")
}

async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    http_with(addr, method, path, "", "close").await
}

/// A WebSocket upgrade request sent by hand, to read the refusal's JSON body.
async fn raw_upgrade(addr: SocketAddr, path: &str) -> (u16, Value) {
    http_with(addr, "GET", path, UPGRADE_HEADERS, "Upgrade").await
}

async fn truth(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/truth").await;
    assert_eq!(status, 200);
    body
}

fn counter(truth: &Value, name: &str) -> u64 {
    truth["counters"][name].as_u64().expect("counter")
}

fn frames_of(truth: &Value, client_id: &str) -> Vec<Value> {
    truth["clients"][client_id]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A text frame as the truth records it: JSON, or `{"malformed": text}` when not JSON.
fn as_recorded(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!({ "malformed": text }))
}

/// Next text frame (pings and pongs skipped).
async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let msg = timeout(STEP, ws.next())
            .await
            .expect("no frame in time")
            .expect("stream ended")
            .expect("ws error");
        match msg {
            Message::Text(text) => return as_recorded(text.as_str()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

async fn next_frames(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_frame(ws).await);
    }
    out
}

/// Closes the client side and reads until the server's close arrives, returning the frames
/// the server wrote before it saw the close.
async fn close_and_drain(mut ws: Ws) -> Vec<Value> {
    let mut rest = Vec::new();
    let drain = async {
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(text)) => rest.push(as_recorded(text.as_str())),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    timeout(STEP, drain).await.expect("close drain timed out");
    rest
}

/// Polls `/truth` until `pred` holds (bounded).
async fn wait_truth(addr: SocketAddr, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        let t = truth(addr).await;
        if pred(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "condition not reached: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_documented_shape(frame: &Value) {
    let obj = frame.as_object().expect("frame is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let is_str = |k: &str| frame[k].is_string();
    let is_uint = |k: &str| frame[k].is_u64();
    match frame["type"].as_str().expect("type is a string") {
        "job_progress" => {
            assert_eq!(
                keys,
                [
                    "currentFile",
                    "jobId",
                    "processedCount",
                    "progress",
                    "totalCount",
                    "type"
                ]
            );
            assert!(is_str("jobId") && is_str("currentFile"), "{frame}");
            assert!(
                is_uint("progress") && is_uint("processedCount") && is_uint("totalCount"),
                "{frame}"
            );
            let progress = frame["progress"].as_u64().unwrap_or(u64::MAX);
            let done = frame["processedCount"].as_u64().unwrap_or(u64::MAX);
            let total = frame["totalCount"].as_u64().unwrap_or(0);
            assert!(progress <= 100 && done <= total, "{frame}");
            assert!(frame["jobId"].as_str().unwrap_or("").starts_with("job_"));
        }
        "job_complete" => {
            assert_eq!(keys, ["failed", "jobId", "organized", "status", "type"]);
            assert_eq!(frame["status"], "completed");
            assert!(
                is_str("jobId") && is_uint("organized") && is_uint("failed"),
                "{frame}"
            );
        }
        "file_uploaded" => {
            assert_eq!(keys, ["fileId", "name", "size", "type"]);
            assert!(
                is_str("fileId") && is_str("name") && is_uint("size"),
                "{frame}"
            );
            assert!(frame["fileId"].as_str().unwrap_or("").starts_with("file_"));
            assert!(frame["name"].as_str().unwrap_or("").contains('.'));
        }
        "error" => {
            assert_eq!(keys, ["code", "error", "jobId", "type"]);
            assert!(
                is_str("jobId") && is_str("error") && is_str("code"),
                "{frame}"
            );
        }
        other => panic!("undocumented type {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_or_missing_token_is_401() {
    let srv = start(cfg(1, 10.0)).await;
    assert_eq!(
        refused_status(ws_url(srv.addr, "c1", Some("wrong"))).await,
        401
    );
    assert_eq!(refused_status(ws_url(srv.addr, "c1", None)).await, 401);
    assert_eq!(refused_status(ws_url(srv.addr, "c1", Some(""))).await, 401);

    let (status, body) = raw_upgrade(srv.addr, "/api/v1/ws/c1?token=nope").await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({"ok": false, "error": "unauthorized"}));

    let t = truth(srv.addr).await;
    assert_eq!(counter(&t, "rejected_unauthorized"), 4);
    assert_eq!(counter(&t, "connects"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_connection_with_same_client_id_is_409_until_first_closes() {
    let srv = start(cfg(2, 20.0)).await;
    let first = connect(srv.addr, "dup").await;
    assert_eq!(
        refused_status(ws_url(srv.addr, "dup", Some(TOKEN))).await,
        409
    );

    let path = format!("/api/v1/ws/dup?token={TOKEN}");
    let (status, body) = raw_upgrade(srv.addr, &path).await;
    assert_eq!(status, 409);
    assert_eq!(body, json!({"ok": false, "error": "client_id_in_use"}));

    // Another client_id is unaffected.
    let other = connect(srv.addr, "other").await;
    close_and_drain(other).await;

    close_and_drain(first).await;
    // The server frees the id once it has processed the close.
    let again = connect_retry(srv.addr, "dup").await;
    close_and_drain(again).await;

    let t = truth(srv.addr).await;
    assert_eq!(counter(&t, "rejected_conflict"), 2);
    assert_eq!(counter(&t, "connects"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn received_frames_equal_truth_and_have_documented_fields() {
    let srv = start(cfg(3, 200.0)).await;
    let mut ws = connect(srv.addr, "alice").await;
    let mut got = next_frames(&mut ws, 150).await;
    got.extend(close_and_drain(ws).await);

    let t = wait_truth(srv.addr, |t| counter(t, "events_sent") >= got.len() as u64).await;
    assert_eq!(frames_of(&t, "alice"), got);
    assert_eq!(counter(&t, "events_sent"), got.len() as u64);
    for frame in &got {
        assert_documented_shape(frame);
    }
    let types: HashSet<&str> = got.iter().filter_map(|f| f["type"].as_str()).collect();
    assert!(types.contains("job_progress"), "{types:?}");
    assert!(types.contains("job_complete"), "{types:?}");
    assert!(types.contains("file_uploaded"), "{types:?}");

    // A reconnect continues the same stream: the truth stays exactly what was received.
    let mut ws = connect_retry(srv.addr, "alice").await;
    got.extend(next_frames(&mut ws, 20).await);
    got.extend(close_and_drain(ws).await);
    let t = wait_truth(srv.addr, |t| counter(t, "events_sent") >= got.len() as u64).await;
    assert_eq!(frames_of(&t, "alice"), got);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_seed_and_client_id_give_same_frames_across_servers() {
    let a = start(cfg(99, 300.0)).await;
    let b = start(cfg(99, 60.0)).await;
    let c = start(cfg(100, 300.0)).await;
    let mut wa = connect(a.addr, "same").await;
    let mut wb = connect(b.addr, "same").await;
    let mut wc = connect(c.addr, "same").await;
    let mut wd = connect(a.addr, "different").await;
    let fa = next_frames(&mut wa, 40).await;
    let fb = next_frames(&mut wb, 40).await;
    let fc = next_frames(&mut wc, 40).await;
    let fd = next_frames(&mut wd, 40).await;
    assert_eq!(fa, fb);
    assert_ne!(fa, fc, "a different seed should give a different stream");
    assert_ne!(
        fa, fd,
        "a different client_id should give a different stream"
    );

    // Splitting b's stream over two connections does not change it.
    let mut fb_all = fb;
    fb_all.extend(close_and_drain(wb).await);
    let mut wb = connect_retry(b.addr, "same").await;
    fb_all.extend(next_frames(&mut wb, 20).await);
    fb_all.extend(close_and_drain(wb).await);
    let mut fa_all = fa;
    fa_all.extend(next_frames(&mut wa, fb_all.len().saturating_sub(40)).await);
    assert_eq!(fa_all[..fb_all.len()], fb_all[..]);

    close_and_drain(wa).await;
    close_and_drain(wc).await;
    close_and_drain(wd).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_stops_frames_and_resume_restarts_them() {
    let srv = start(cfg(4, 100.0)).await;
    let mut ws = connect(srv.addr, "p").await;
    next_frames(&mut ws, 5).await;

    let (status, body) = http(srv.addr, "POST", "/pause").await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    // Let frames already in flight arrive, then expect silence.
    let mut drained = 0;
    while let Ok(Some(Ok(_))) = timeout(Duration::from_millis(100), ws.next()).await {
        drained += 1;
        assert!(drained < 20, "frames keep coming while paused");
    }
    let settled = counter(&truth(srv.addr).await, "events_sent");
    let quiet = timeout(Duration::from_millis(500), ws.next()).await;
    assert!(quiet.is_err(), "got a frame while paused: {quiet:?}");
    assert_eq!(counter(&truth(srv.addr).await, "events_sent"), settled);

    let (status, body) = http(srv.addr, "POST", "/resume").await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    let resumed = next_frames(&mut ws, 5).await;
    assert_eq!(resumed.len(), 5);
    close_and_drain(ws).await;
    assert!(counter(&truth(srv.addr).await, "events_sent") >= settled + 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_that_does_not_answer_pings_is_dropped() {
    let mut c = cfg(5, 20.0);
    c.ping_interval = Duration::from_millis(100);
    c.pong_timeout = Duration::from_millis(200);
    let srv = start(c).await;

    // A client that keeps reading auto-answers pings and must survive many intervals.
    let mut alive = connect(srv.addr, "reader").await;
    // A client that never polls its stream never sends a pong.
    let mut silent = connect(srv.addr, "silent").await;

    let keep_reading = async {
        let until = Instant::now() + Duration::from_millis(1200);
        while Instant::now() < until {
            next_frame(&mut alive).await;
        }
    };
    timeout(STEP, keep_reading).await.expect("reader starved");

    let t = wait_truth(srv.addr, |t| counter(t, "dropped_no_pong") >= 1).await;
    assert_eq!(
        counter(&t, "dropped_no_pong"),
        1,
        "only the silent client is dropped"
    );

    // The silent client's socket ends (after any frames still buffered).
    let ended = timeout(STEP, async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "dropped socket never ended");

    // The dropped client_id is free again.
    let again = connect_retry(srv.addr, "silent").await;
    close_and_drain(again).await;
    close_and_drain(alive).await;
    let t = truth(srv.addr).await;
    assert_eq!(counter(&t, "dropped_no_pong"), 1);
    assert_eq!(counter(&t, "connects"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_every_injects_non_json_frames_recorded_in_truth() {
    let mut c = cfg(6, 200.0);
    c.malformed_every = Some(4);
    let srv = start(c).await;
    let mut ws = connect(srv.addr, "bad").await;

    let mut raw = Vec::new();
    while raw.len() < 20 {
        let msg = timeout(STEP, ws.next())
            .await
            .expect("no frame in time")
            .expect("stream ended")
            .expect("ws error");
        if let Message::Text(text) = msg {
            raw.push(text.as_str().to_owned());
        }
    }
    let rest = close_and_drain(ws).await;

    for (i, text) in raw.iter().enumerate() {
        let parsed = serde_json::from_str::<Value>(text);
        if (i + 1) % 4 == 0 {
            assert!(
                parsed.is_err(),
                "frame {} should be malformed: {text}",
                i + 1
            );
        } else {
            assert_documented_shape(&parsed.expect("well-formed frame"));
        }
    }

    let total = (raw.len() + rest.len()) as u64;
    let t = wait_truth(srv.addr, |t| counter(t, "events_sent") >= total).await;
    let recorded = frames_of(&t, "bad");
    let expected: Vec<Value> = raw.iter().map(|s| as_recorded(s)).chain(rest).collect();
    assert_eq!(recorded, expected);
    assert!(recorded[3]["malformed"].is_string());
}
