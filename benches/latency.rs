//! Latency end to end: from the simulator sending a `graph:diff` to the broker acknowledging
//! each record made from it, at a steady `BENCH_RATES` diffs/s (default `1000,10000`) on Kafka
//! (tansu) and NATS JetStream (nats-server), reported as p50, p99 and p99.9.
//!
//! Both ends are stamped in this process: the simulator's emit observer stamps each live diff
//! as it is sent, and the connector's ack observer ([`taskstream::delivery::AckObserver`])
//! stamps each record when every sink has acknowledged it. A record is matched to its diff by
//! entity id and version (record ids are `{kind}:{entity}:{version}`). The connector starts,
//! takes its snapshot and warms up for `BENCH_WARMUP_SECS` (default 2) before the measured
//! `BENCH_SECS` (default 20, so two periodic history polls fall inside) begin.
//! `BENCH_HISTORY_INTERVAL_MS` sets the connector's history poll interval (default 10000;
//! 0 = no periodic polls), to tell the polls' share of the tail apart;
//! `BENCH_HISTORY_PAGE_LIMIT` sets its pages' size (default 1000, the API's most).
//!
//! The simulator, the connector and the broker clients share this process and the machine's
//! cores with the brokers, as they would in a small deployment; the figures include that. The
//! simulator runs on a runtime of its own: it stands for a remote server, and its read
//! handlers, which hold its world for milliseconds, must not take the connector's workers.
//!
//! `BENCH_DEBUG=1` also prints the 40 slowest records, the 100 ms windows whose worst record
//! took over 5 ms (how long each stall lasted) and diffs of 20 entities or more;
//! `RUST_LOG=taskstream=debug` adds the connector's log (slow source events, history page
//! reads) with times since start.
//!
//! The ceiling rows measure the same brokers without the connector: the same client library,
//! with the sink's producer settings, publishing pre-encoded records of a record's size at the
//! rate the connector acknowledged, each timed from its send to its acknowledgement. The
//! connector's percentiles over the ceiling's, in the same run, are the figures to compare
//! across machines; a broker whose own p99 is above a target cannot meet it through any client.
//!
//! Run: `cargo bench --bench latency` (needs tansu and nats-server, as the tests do).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use taskstream::app::{self, RunOptions};
use taskstream::config::Config;
use taskstream::delivery::AckObserver;
use taskstream::metrics::metrics;
use taskstream_sim::{self as sim, SimConfig};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "st_bench_latency_token";
const UID: &str = "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d";

/// Send times by `{entity}:{version}`, and the latency of each acknowledged record.
#[derive(Default)]
struct Stamps {
    measuring: bool,
    /// Diffs sent while measuring.
    diffs: usize,
    sent: HashMap<String, Instant>,
    /// (when it was sent, latency) of each record, for `BENCH_DEBUG`.
    timeline: Vec<(Instant, Duration)>,
    latencies: Vec<Duration>,
    unmatched: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `{entity}:{version}` of every node and link a diff carries.
fn diff_keys(diff: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    for list in ["nodes", "links"] {
        for e in diff[list].as_array().into_iter().flatten() {
            if let (Some(id), Some(v)) = (e["id"].as_str(), e["version"].as_u64()) {
                keys.push(format!("{id}:{v}"));
            }
        }
    }
    keys
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Outcome {
    sink: &'static str,
    rate: f64,
    sent: usize,
    sorted: Vec<Duration>,
    unmatched: u64,
    secs: f64,
    /// CPU seconds of this process (simulator, connector, clients) per second measured.
    cpu: f64,
}

async fn measure(
    sim_rt: &tokio::runtime::Handle,
    sink: &'static str,
    rate: f64,
    dir: &std::path::Path,
    configure: impl FnOnce(&mut Config),
) -> Outcome {
    let stop = CancellationToken::new();
    // The simulator stands for a remote server: on its own runtime, so that its page
    // handlers (which hold the world for tens of milliseconds) do not take the connector's
    // worker threads. It still shares the machine's cores.
    let handle = sim_rt
        .spawn(sim::start(
            SimConfig {
                tokens: format!("{TOKEN}:{UID}"),
                rate,
                nodes: 2000,
                links: 2400,
                ..SimConfig::default()
            },
            stop.clone(),
        ))
        .await
        .expect("simulator task")
        .expect("simulator");
    let mut cfg = support::in_process_config(
        handle.url(),
        TOKEN,
        &dir.join(format!("{sink}-{rate}.token")),
    );
    if let Some(ms) = std::env::var("BENCH_HISTORY_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.source.history_interval_ms = ms;
    }
    if let Some(n) = std::env::var("BENCH_HISTORY_PAGE_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.source.history_page_limit = n;
    }
    configure(&mut cfg);

    let stamps = Arc::new(Mutex::new(Stamps::default()));
    let on_emit = {
        let stamps = Arc::clone(&stamps);
        Arc::new(move |diff: &Value| {
            let now = Instant::now();
            let mut s = stamps.lock().unwrap_or_else(|e| e.into_inner());
            if s.measuring {
                s.diffs += 1;
                let keys = diff_keys(diff);
                if keys.len() >= 20 && std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!("large diff: {} entities", keys.len());
                }
                for key in keys {
                    s.sent.insert(key, now);
                }
            }
        })
    };
    *handle.sim.on_emit.lock().unwrap_or_else(|e| e.into_inner()) = Some(on_emit);
    let on_acked = {
        let stamps = Arc::clone(&stamps);
        AckObserver(Arc::new(move |msg| {
            let now = Instant::now();
            // `{kind}:{entity}:{version}`: the diff's key is what follows the kind.
            let Some((_, key)) = msg.id.split_once(':') else {
                return;
            };
            let mut s = stamps.lock().unwrap_or_else(|e| e.into_inner());
            match s.sent.get(key).copied() {
                Some(at) => {
                    s.latencies.push(now - at);
                    s.timeline.push((at, now - at));
                }
                None if s.measuring => s.unmatched += 1,
                None => {}
            }
        }))
    };

    let app_stop = stop.child_token();
    let opts = RunOptions {
        on_acked: Some(on_acked),
        ..RunOptions::default()
    };
    let mut app_task = tokio::spawn(app::run(cfg, opts, app_stop.clone()));
    let snapshots = metrics().snapshots_total.get();
    while metrics().snapshots_total.get() == snapshots {
        if app_task.is_finished() {
            panic!("{sink}: connector stopped: {:?}", (&mut app_task).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(env_or("BENCH_WARMUP_SECS", 2))).await;
    let secs = env_or("BENCH_SECS", 20.0f64);
    stamps.lock().unwrap_or_else(|e| e.into_inner()).measuring = true;
    let started = Instant::now();
    let cpu0 = support::cpu_secs();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let sent = {
        let mut s = stamps.lock().unwrap_or_else(|e| e.into_inner());
        s.measuring = false;
        s.diffs
    };
    let measured = started.elapsed().as_secs_f64();
    let cpu = support::cpu_secs() - cpu0;
    // Let the records of the last diffs be acknowledged before the run stops.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app_stop.cancel();
    let _ = app_task.await;
    stop.cancel();
    handle.join().await;
    let mut s = stamps.lock().unwrap_or_else(|e| e.into_inner());
    let mut sorted = std::mem::take(&mut s.latencies);
    sorted.sort_unstable();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let mut worst = s.timeline.clone();
        worst.sort_by_key(|(_, l)| std::cmp::Reverse(*l));
        for (at, l) in worst.iter().take(40) {
            eprintln!(
                "{sink} {rate}: sent at +{:.3} s, {:.2} ms",
                at.duration_since(started).as_secs_f64(),
                l.as_secs_f64() * 1000.0
            );
        }
        // The 100 ms windows whose worst record took over 5 ms: how long each stall lasted.
        let mut windows: std::collections::BTreeMap<u64, (usize, Duration)> = Default::default();
        for (at, l) in &s.timeline {
            let w = windows
                .entry((at.duration_since(started).as_secs_f64() * 10.0) as u64)
                .or_default();
            w.0 += 1;
            w.1 = w.1.max(*l);
        }
        for (w, (n, worst)) in windows {
            if worst > Duration::from_millis(5) {
                eprintln!(
                    "{sink} {rate}: window +{:.1} s: {n} records, worst {:.2} ms",
                    w as f64 / 10.0,
                    worst.as_secs_f64() * 1000.0
                );
            }
        }
    }
    Outcome {
        sink,
        rate,
        sent,
        sorted,
        unmatched: s.unmatched,
        secs: measured,
        cpu: cpu / measured,
    }
}

/// The bytes of a typical JSON change record (`cargo bench --bench encode`: 1,244).
const RECORD_BYTES: usize = 1244;

/// Sends `records_per_sec` records a second, in millisecond ticks, for `secs` through `send`,
/// whose future resolves when the record is acknowledged; the latency of each, sorted.
async fn paced<F, Fut>(records_per_sec: f64, secs: f64, send: F) -> Vec<Duration>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut due = 0.0f64;
    let mut i = 0u64;
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let mut out = Vec::new();
    while started.elapsed().as_secs_f64() < secs {
        tick.tick().await;
        due += records_per_sec / 1000.0;
        while due >= 1.0 {
            due -= 1.0;
            let sent = Instant::now();
            let ack = send(i);
            i += 1;
            // Awaited on their own tasks, as the sinks' acknowledgements are, so a slow ack
            // delays no send.
            acks.push(tokio::spawn(async move {
                ack.await;
                sent.elapsed()
            }));
        }
        while let Some(Some(l)) = futures_util::FutureExt::now_or_never(acks.next()) {
            out.push(l.expect("ack task"));
        }
    }
    while let Some(l) = acks.next().await {
        out.push(l.expect("ack task"));
    }
    out.sort_unstable();
    out
}

/// A raw librdkafka producer with the Kafka sink's own settings
/// ([`taskstream::sink::kafka::client_config`]).
async fn kafka_ceiling(bootstrap: &str, records_per_sec: f64, secs: f64) -> Vec<Duration> {
    let sink = taskstream::sink::kafka::KafkaConfig {
        brokers: bootstrap.to_string(),
        ..Default::default()
    };
    let producer: FutureProducer = taskstream::sink::kafka::client_config(&sink)
        .expect("the Kafka sink's settings")
        .create()
        .expect("producer");
    let payload = Arc::new(vec![b'x'; RECORD_BYTES]);
    // Connected, with its producer id, before anything is timed (as the connector is after
    // its snapshot and warm-up).
    for i in 0..100 {
        let key = format!("warm{i}");
        let rec = FutureRecord::to("bench.latency")
            .key(&key)
            .payload(payload.as_slice());
        let _ = producer.send(rec, Duration::from_secs(30)).await;
    }
    paced(records_per_sec, secs, move |i| {
        let key = format!("node:k{}:{i}", i % 5000);
        let rec = FutureRecord::to("bench.latency")
            .key(&key)
            .payload(payload.as_slice());
        let ack = producer.send_result(rec).expect("ceiling producer queue");
        async move {
            ack.await.expect("ack").expect("delivered");
        }
    })
    .await
}

/// A raw async-nats JetStream publisher, one `Nats-Msg-Id` per record, as the sink publishes.
async fn nats_ceiling(url: &str, records_per_sec: f64, secs: f64) -> Vec<Duration> {
    let client = async_nats::connect(url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "LATENCY_CEILING".into(),
        subjects: vec!["latency.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let payload = bytes::Bytes::from(vec![b'x'; RECORD_BYTES]);
    paced(records_per_sec, secs, move |i| {
        let js = js.clone();
        let payload = payload.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("node:k{i}:1").as_str());
            let ack = js
                .publish_with_headers("latency.x", h, payload)
                .await
                .expect("publish");
            ack.await.expect("ack");
        }
    })
    .await
}

fn main() {
    // `RUST_LOG=taskstream=debug` shows what the connector was doing around a stall.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    let rates: Vec<f64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim")
        .enable_all()
        .build()
        .expect("simulator runtime");
    let sim_handle = sim_rt.handle().clone();
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        let tansu = support::Tansu::start().await;
        tansu.create_topic("bench.latency", 3).await;
        let nats = support::Nats::start().await;
        let mut outcomes = Vec::new();
        let secs = env_or("BENCH_SECS", 20.0f64);
        for &rate in &rates {
            let bootstrap = tansu.bootstrap();
            outcomes.push(
                measure(&sim_handle, "kafka", rate, dir.path(), |c| {
                    support::use_kafka(c, &bootstrap)
                })
                .await,
            );
            let url = nats.url();
            outcomes.push(
                measure(&sim_handle, "nats-jetstream", rate, dir.path(), |c| {
                    support::use_jetstream(c, &url)
                })
                .await,
            );
            // The ceilings at the rate of records the connector's runs acknowledged.
            let n = outcomes.len();
            let records_per_sec = (outcomes[n - 2].sorted.len() as f64
                / outcomes[n - 2].secs)
                .max(outcomes[n - 1].sorted.len() as f64 / outcomes[n - 1].secs);
            for (sink, sorted) in [
                (
                    "kafka-raw",
                    kafka_ceiling(&bootstrap, records_per_sec, secs).await,
                ),
                (
                    "jetstream-raw",
                    nats_ceiling(&url, records_per_sec, secs).await,
                ),
            ] {
                outcomes.push(Outcome {
                    sink,
                    rate,
                    sent: (records_per_sec * secs) as usize,
                    sorted,
                    unmatched: 0,
                    secs,
                    cpu: f64::NAN,
                });
            }
        }
        println!(
            "{:<15} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "sink", "target", "diffs/s", "records", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "matched", "cpu"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for o in &outcomes {
            let raw = o.sink.ends_with("-raw");
            println!(
                "{:<15} {:>8.0} {:>8} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.1}% {:>7.2}",
                o.sink,
                o.rate,
                if raw {
                    "-".to_string()
                } else {
                    format!("{:.0}", o.sent as f64 / o.secs)
                },
                o.sorted.len(),
                ms(percentile(&o.sorted, 50.0)),
                ms(percentile(&o.sorted, 99.0)),
                ms(percentile(&o.sorted, 99.9)),
                ms(o.sorted.last().copied().unwrap_or_default()),
                100.0 * o.sorted.len() as f64
                    / (o.sorted.len() as u64 + o.unmatched).max(1) as f64,
                o.cpu,
            );
        }
        println!("target: the simulator's rate; diffs/s: diffs sent per second while measuring; records: acknowledged records matched to their diff (by entity and version); matched: their share of the records acknowledged while measuring; cpu: CPU seconds per second of this process (simulator, connector, clients; not the broker); kafka-raw, jetstream-raw: the client library alone at the connector's record rate (the ceiling)");
        for o in outcomes.iter().filter(|o| !o.sink.ends_with("-raw")) {
            let raw = if o.sink == "kafka" { "kafka-raw" } else { "jetstream-raw" };
            if let Some(c) = outcomes.iter().find(|c| c.sink == raw && c.rate == o.rate) {
                let ratio = |p: f64| {
                    ms(percentile(&o.sorted, p)) / ms(percentile(&c.sorted, p)).max(0.001)
                };
                println!(
                    "{} {:.0}/s against the raw client: p50 x{:.2}, p99 x{:.2}, p99.9 x{:.2}",
                    o.sink,
                    o.rate,
                    ratio(50.0),
                    ratio(99.0),
                    ratio(99.9)
                );
            }
        }
    });
}
