//! How close the two catch-up paths come to the documented read limit, which bounds them both:
//! - a snapshot of `BENCH_OBJECTS` objects (default 1,000,000: half nodes, half links) paged
//!   with `graph:get`;
//! - a history catch-up of `BENCH_BATCHES` batches (default 100,000) paged with `history:page`.
//!
//! Each is reported as wall time against the rate-limit bound measured from its own page count:
//! with 5 reads admitted per window, page k cannot be read before floor(k / 5) windows, so P
//! pages take at least floor((P - 1) / 5) windows. The window is `BENCH_READ_WINDOW_MS` (default
//! 1000 on both sides, instead of the documented 10 s, to keep the run short). The ratio does
//! depend on the window's length: the connector counts each read from its answer (the server
//! may count it any time up to then), so every window costs about one read's round trip more
//! than the bound, mostly the server's time to build a page; a 1 s window shows that ten times
//! larger than the documented 10 s one. So each is also given against the bound plus one mean
//! read round trip per window (`taskstream_read_duration_seconds`), what is left to the
//! connector itself: its start, the first window's reads one after another, and its slack.
//!
//! Run: `cargo bench --bench snapshot_history` (no broker needed: records go to /dev/null).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use taskstream::app::{self, RunOptions};
use taskstream::config::Config;
use taskstream::metrics::metrics;
use taskstream_sim::{self as sim, SimConfig};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "st_bench_snapshot_history";
const UID: &str = "2a3b4c5d-6e7f-4081-9a2b-3c4d5e6f7a8b";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn counter(c: &prometheus_client::metrics::counter::Counter) -> u64 {
    c.get()
}

/// Count and summed seconds of the reads of `event` answered so far, from the metrics
/// endpoint's text (the histogram's own getters are test-only in prometheus-client).
fn reads_of(event: &'static str) -> (u64, f64) {
    let text = metrics().render();
    let field = |name: &str| {
        let key = format!("taskstream_read_duration_seconds_{name}{{event=\"{event}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field("count") as u64, field("sum"))
}

/// The mean round trip of the reads answered since `before`, in seconds.
fn mean_read(event: &'static str, before: (u64, f64)) -> f64 {
    let (n, sum) = reads_of(event);
    (sum - before.1) / (n - before.0).max(1) as f64
}

/// The least time `pages` reads can take under 5 reads per `window`.
fn bound(pages: u64, window: Duration) -> Duration {
    window * (pages.saturating_sub(1) / 5) as u32
}

async fn http_post(port: u16, path: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

fn connector_config(url: String, window_ms: u64, dir: &std::path::Path) -> Config {
    let mut cfg = support::in_process_config(url, TOKEN, &dir.join("token"));
    cfg.source.read_window_ms = window_ms;
    cfg.source.history_interval_ms = 0;
    cfg.source.reconcile_interval_secs = 0;
    cfg.sinks.stdout.path = Some("/dev/null".into());
    cfg
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool, limit: Duration) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not finish in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    let objects = env("BENCH_OBJECTS", 1_000_000);
    let batches = env("BENCH_BATCHES", 100_000);
    let window_ms = env("BENCH_READ_WINDOW_MS", 1000);
    let window = Duration::from_millis(window_ms);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        // 1. Snapshot.
        eprintln!("starting the simulator with {objects} objects");
        let stop = CancellationToken::new();
        let handle = sim::start(
            SimConfig {
                tokens: format!("{TOKEN}:{UID}"),
                rate: 0.0,
                nodes: (objects / 2) as usize,
                links: (objects - objects / 2) as usize,
                read_window_ms: window_ms,
                ..SimConfig::default()
            },
            stop.clone(),
        )
        .await
        .expect("simulator");
        let cfg = connector_config(handle.url(), window_ms, dir.path());
        let limit = u64::from(cfg.source.page_limit - cfg.source.page_overlap);
        let app_stop = stop.child_token();
        // Snapshot pages are the only source events here (no live diffs at rate 0, no job
        // API), so this counter counts the `graph:get` pages read.
        let events_before = counter(&metrics().source_events_total);
        let graph_reads_before = reads_of("graph:get");
        let start = Instant::now();
        let app_task = tokio::spawn(app::run(cfg, RunOptions::default(), app_stop.clone()));
        wait_for(
            "the snapshot",
            || counter(&metrics().snapshots_total) >= 1,
            Duration::from_secs(3600),
        )
        .await;
        let snapshot_secs = start.elapsed();
        let pages = counter(&metrics().reads_total);
        app_stop.cancel();
        let _ = app_task.await;
        stop.cancel();
        handle.join().await;
        // The pages the graph's size asks for, and the pages read: the simulator's generator
        // may make fewer objects than asked (a 200,000-object run read its pages faster than
        // 41 pages allow), so the bound is taken from what was read.
        let computed_pages = objects.div_ceil(limit);
        let graph_pages = counter(&metrics().source_events_total) - events_before;
        let snapshot_bound = bound(graph_pages, window);
        let graph_read = mean_read("graph:get", graph_reads_before);
        eprintln!(
            "snapshot: {objects} objects, {graph_pages} pages read ({computed_pages} by the graph's size; {pages} reads in all, {} refused as rate-limited, {} pages read again) in {:.1} s; bound {:.1} s",
            counter(&metrics().reads_rate_limited_total),
            counter(&metrics().snapshot_rereads_total),
            snapshot_secs.as_secs_f64(),
            snapshot_bound.as_secs_f64()
        );

        // 2. History catch-up.
        eprintln!("starting the simulator with {batches} batches of history");
        let stop = CancellationToken::new();
        let handle = sim::start(
            SimConfig {
                tokens: format!("{TOKEN}:{UID}"),
                rate: 0.0,
                nodes: 2000,
                links: 2000,
                load: batches as usize,
                read_window_ms: window_ms,
                ..SimConfig::default()
            },
            stop.clone(),
        )
        .await
        .expect("simulator");
        // Nobody is connected: the load becomes history without a single diff delivered.
        http_post(handle.port, "/load/start").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut cfg = connector_config(handle.url(), window_ms, dir.path());
        cfg.source.history_start = taskstream::source::synaptask::HistoryStart::Earliest;
        let before = counter(&metrics().history_batches_total);
        let history_reads_before = reads_of("history:page");
        let app_stop = stop.child_token();
        // A scope starting at the earliest batch is replayed first, before the first snapshot.
        let start = Instant::now();
        let app_task = tokio::spawn(app::run(cfg, RunOptions::default(), app_stop.clone()));
        // The count moves once, when the scope's catch-up has sent every batch on.
        wait_for(
            "the catch-up",
            || counter(&metrics().history_batches_total) > before,
            Duration::from_secs(3600),
        )
        .await;
        let fetched = counter(&metrics().history_batches_total) - before;
        let secs = start.elapsed();
        let history_read = mean_read("history:page", history_reads_before);
        app_stop.cancel();
        let _ = app_task.await;
        stop.cancel();
        handle.join().await;
        let history_pages = fetched.div_ceil(1000);
        let history_bound = bound(history_pages, window);

        println!("read window {window_ms} ms, 5 reads per window and event");
        println!(
            "snapshot: {objects} objects, {graph_pages} pages in {:.2} s; rate-limit bound {:.2} s; ratio {:.3}",
            snapshot_secs.as_secs_f64(),
            snapshot_bound.as_secs_f64(),
            snapshot_secs.as_secs_f64() / snapshot_bound.as_secs_f64().max(1e-9)
        );
        println!(
            "history: {fetched} batches, {history_pages} pages in {:.2} s = {:.0} batches/s; rate-limit bound {:.2} s ({:.0} batches/s); ratio {:.3}",
            secs.as_secs_f64(),
            fetched as f64 / secs.as_secs_f64(),
            history_bound.as_secs_f64(),
            fetched as f64 / history_bound.as_secs_f64().max(1e-9),
            secs.as_secs_f64() / history_bound.as_secs_f64().max(1e-9)
        );
        // Every window also waits for the answer of the read that opened the last one, which
        // is mostly the server's time to build a page: what any client that cannot see when
        // the server counted a read must add. The mean read stands in for that one read.
        for (what, pages, read, took) in [
            ("snapshot", graph_pages, graph_read, snapshot_secs),
            ("history", history_pages, history_read, secs),
        ] {
            let windows = pages.saturating_sub(1) / 5;
            let answered = bound(pages, window).as_secs_f64() + windows as f64 * read;
            println!(
                "{what}: mean read round trip {:.0} ms; bound plus one round trip per window {answered:.2} s; ratio {:.3}",
                read * 1000.0,
                took.as_secs_f64() / answered.max(1e-9)
            );
        }
    });
}
