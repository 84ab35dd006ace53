//! End-to-end throughput of the connector, per sink, in one run: the simulator in load mode
//! pushes `BENCH_EVENTS` `graph:diff` events (default 100000) to `taskstream run` (in process),
//! which publishes to a file, to Kafka (tansu) and to NATS JetStream (nats-server). Each is
//! reported as records/s and as a ratio against ceilings measured in the same run:
//! - the source ceiling: how fast the simulator's events reach a bare rust_socketio client
//!   (`benches/sim_throughput.rs` measures that alone);
//! - the broker ceilings: a raw librdkafka producer and a raw async-nats JetStream publisher
//!   sending the same number of messages of the same mean size.
//!
//! The Kafka sink runs with JSON and with Avro (schemas in a registry served in process). Every
//! sink runs `BENCH_ROUNDS` times (default 3), the sinks taking turns, and each sink's median
//! run is reported (and the ratio of the Kafka medians, Avro to JSON).
//!
//! CPU seconds per million records count the whole process: the connector and the simulator
//! feeding it, which runs in the same process.
//!
//! Run: `cargo bench --bench e2e_throughput` (needs tansu and nats-server, as the tests do;
//! `BENCH_ONLY=file`, `kafka` or `nats` runs the file, Kafka (JSON) or JetStream sink alone, for a profiler).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use taskstream::app::{self, RunOptions};
use taskstream::config::Config;
use taskstream::metrics::metrics;
use taskstream_sim::{self as sim, SimConfig};
use tokio_util::sync::CancellationToken;

// The same allocator as the binary, so the numbers are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "st_bench_e2e_token";
const UID: &str = "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b";

struct Run {
    sink: &'static str,
    diffs: u64,
    records: u64,
    secs: f64,
    dropped: u64,
    /// CPU seconds the whole process used during the run (connector and the in-process
    /// simulator together).
    cpu: f64,
}

fn counter(c: &prometheus_client::metrics::counter::Counter) -> u64 {
    c.get()
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

/// Waits until nothing is in flight and the acked count has not moved for a moment.
async fn settle() {
    let mut last = u64::MAX;
    let mut since = Instant::now();
    loop {
        let acked = counter(&metrics().messages_acked_total);
        let in_flight = metrics().in_flight.get();
        if acked != last || in_flight != 0 {
            last = acked;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_millis(500) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connector run with `configure` choosing the sink.
/// The line of a `BENCH_ONLY` run: one sink alone, for a profiler.
fn print_alone(run: &Run) {
    println!(
        "{}: {} records in {:.2} s = {:.0} records/s ({:.2} CPU s per second, {:.1} per million records)",
        run.sink,
        run.records,
        run.secs,
        run.records as f64 / run.secs,
        run.cpu / run.secs,
        run.cpu / run.records.max(1) as f64 * 1e6
    );
}

async fn connector_run(
    sink: &'static str,
    events: u64,
    dir: &std::path::Path,
    configure: impl FnOnce(&mut Config),
) -> Run {
    eprintln!("{sink}: starting the simulator with {events} load events");
    let stop = CancellationToken::new();
    let handle = sim::start(
        SimConfig {
            tokens: format!("{TOKEN}:{UID}"),
            rate: 0.0,
            nodes: 2000,
            links: 2400,
            load: events as usize,
            ..SimConfig::default()
        },
        stop.clone(),
    )
    .await
    .expect("simulator");
    let mut cfg =
        support::in_process_config(handle.url(), TOKEN, &dir.join(format!("{sink}.token")));
    // Hold every pushed diff: the bench measures the pipeline, not the overflow path.
    cfg.source.diff_buffer = events as usize + 1;
    configure(&mut cfg);
    let app_stop = stop.child_token();
    let mut app_task = tokio::spawn(app::run(cfg, RunOptions::default(), app_stop.clone()));
    // The snapshot first, then the load.
    let snapshots = counter(&metrics().snapshots_total);
    while counter(&metrics().snapshots_total) == snapshots {
        if app_task.is_finished() {
            panic!("{sink}: connector stopped: {:?}", (&mut app_task).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    settle().await;
    let (diffs0, records0, dropped0) = (
        counter(&metrics().diffs_received_total),
        counter(&metrics().records_total),
        counter(&metrics().diffs_dropped_total),
    );
    let start = Instant::now();
    let cpu0 = support::cpu_secs();
    http_post(handle.port, "/load/start").await;
    while counter(&metrics().diffs_received_total) - diffs0 < events {
        if app_task.is_finished() {
            panic!("{sink}: connector stopped: {:?}", (&mut app_task).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    let secs = start.elapsed().as_secs_f64() - 0.5; // settle() waits 0.5 s of quiet
    let run = Run {
        sink,
        diffs: counter(&metrics().diffs_received_total) - diffs0,
        records: counter(&metrics().records_total) - records0,
        secs,
        dropped: counter(&metrics().diffs_dropped_total) - dropped0,
        cpu: support::cpu_secs() - cpu0,
    };
    eprintln!(
        "{sink}: {} diffs -> {} records in {:.2} s ({} dropped)",
        run.diffs, run.records, run.secs, run.dropped
    );
    app_stop.cancel();
    let _ = app_task.await;
    stop.cancel();
    handle.join().await;
    run
}

/// Where each sink of a run publishes.
struct Targets {
    /// The file sink's output.
    file: std::path::PathBuf,
    /// The Kafka bootstrap address.
    kafka: String,
    /// The NATS server's URL.
    nats: String,
    /// The schema registry's URL (Kafka with Avro).
    registry: String,
}

/// [`connector_run`] publishing to `sink`: `file`, `kafka` (JSON), `kafka-avro` or
/// `nats-jetstream`.
async fn sink_run(sink: &'static str, events: u64, dir: &std::path::Path, to: &Targets) -> Run {
    connector_run(sink, events, dir, |c| match sink {
        "file" => c.sinks.stdout.path = Some(to.file.clone()),
        "kafka" => support::use_kafka(c, &to.kafka),
        "kafka-avro" => {
            support::use_kafka(c, &to.kafka);
            c.sinks.kafka.format = Some(taskstream::config::BodyFormat::Avro);
            c.schema_registry.url = Some(to.registry.clone());
        }
        "nats-jetstream" => support::use_jetstream(c, &to.nats),
        other => panic!("no sink named {other}"),
    })
    .await
}

async fn kafka_ceiling(bootstrap: &str, n: u64, size: usize) -> f64 {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let payload = vec![b'x'; size];
    let start = Instant::now();
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for i in 0..n {
        let key = format!("k{}", i % 5000);
        let rec = FutureRecord::to("bench.ceiling")
            .key(&key)
            .payload(&payload);
        match producer.send_result(rec) {
            Ok(f) => acks.push(f),
            Err((e, _)) => panic!("ceiling producer: {e}"),
        }
        while acks.len() >= 20_000 {
            acks.next().await;
        }
    }
    while acks.next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

async fn nats_ceiling(url: &str, n: u64, size: usize) -> f64 {
    let client = async_nats::connect(url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "CEILING".into(),
        subjects: vec!["ceiling.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("c{i}").as_str());
        let ack = js
            .publish_with_headers("ceiling.x", h, payload.clone())
            .await
            .expect("publish");
        // Awaited on their own tasks: the context limits publishes with unawaited acks.
        acks.push(tokio::spawn(std::future::IntoFuture::into_future(ack)));
        while acks.len() >= 20_000 {
            acks.next().await;
        }
    }
    while acks.next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        eprintln!("starting brokers");
        let tansu = support::Tansu::start().await;
        let nats = support::Nats::start().await;
        tansu.create_topic("bench.ceiling", 3).await;
        eprintln!("brokers up: kafka {} nats {}", tansu.bootstrap(), nats.url());

        let registry = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let registry_url = format!("http://{}", registry.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(registry, taskstream_sim::registry::router()).await;
        });
        let to = Targets {
            file: dir.path().join("records.jsonl"),
            kafka: tansu.bootstrap(),
            nats: nats.url(),
            registry: registry_url,
        };
        // `BENCH_ONLY=file|kafka|nats`: that sink alone (Kafka with JSON), for a profiler.
        let only = match std::env::var("BENCH_ONLY").as_deref() {
            Ok("file") => Some("file"),
            Ok("kafka") => Some("kafka"),
            Ok("nats") => Some("nats-jetstream"),
            _ => None,
        };
        if let Some(sink) = only {
            print_alone(&sink_run(sink, events, dir.path(), &to).await);
            return;
        }
        let file_run = sink_run("file", events, dir.path(), &to).await;
        let text = std::fs::read_to_string(&to.file).unwrap_or_default();
        let lines = text.lines().count().max(1);
        let mean = text.len() / lines;

        // Every sink runs `BENCH_ROUNDS` times, the sinks taking turns, and each sink's median
        // is reported: on a shared 2-core machine one run varies by more than the differences
        // measured, and the machine's speed drifts over minutes, which the turns share out.
        let rounds: usize = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
            .max(1);
        let mut file_runs = vec![file_run];
        let mut json_runs = Vec::new();
        let mut avro_runs = Vec::new();
        let mut nats_runs = Vec::new();
        for round in 0..rounds {
            if round > 0 {
                file_runs.push(sink_run("file", events, dir.path(), &to).await);
            }
            json_runs.push(sink_run("kafka", events, dir.path(), &to).await);
            avro_runs.push(sink_run("kafka-avro", events, dir.path(), &to).await);
            nats_runs.push(sink_run("nats-jetstream", events, dir.path(), &to).await);
        }
        let median = |runs: &mut Vec<Run>| {
            runs.sort_by(|a, b| (a.records as f64 / a.secs).total_cmp(&(b.records as f64 / b.secs)));
            runs.remove(runs.len() / 2)
        };
        let file_run = median(&mut file_runs);
        let kafka_run = median(&mut json_runs);
        let avro_run = median(&mut avro_runs);
        let nats_run = median(&mut nats_runs);
        let n = kafka_run.records.max(10_000);
        let kafka_max = kafka_ceiling(&tansu.bootstrap(), n, mean).await;
        eprintln!("kafka ceiling: {kafka_max:.0} msgs/s");
        let nats_max = nats_ceiling(&nats.url(), n, mean).await;
        eprintln!("nats ceiling: {nats_max:.0} msgs/s");

        println!("events pushed per run: {events}; mean record size {mean} bytes");
        for (run, ceiling) in [
            (&file_run, None),
            (&kafka_run, Some(kafka_max)),
            (&avro_run, Some(kafka_max)),
            (&nats_run, Some(nats_max)),
        ] {
            let rps = run.records as f64 / run.secs;
            print!(
                "{:<15} {:>8} diffs -> {:>8} records in {:>6.2} s = {:>8.0} records/s ({:.0} diffs/s, {} dropped, {:.1} CPU s per million records)",
                run.sink, run.diffs, run.records, run.secs, rps, run.diffs as f64 / run.secs, run.dropped,
                run.cpu / run.records.max(1) as f64 * 1e6
            );
            match ceiling {
                Some(c) => println!("; raw client ceiling {c:.0} msgs/s, ratio {:.2}", rps / c),
                None => println!(),
            }
        }
        let rate = |r: &Run| r.records as f64 / r.secs;
        println!("each sink: the median of {rounds} runs, the sinks taking turns");
        println!(
            "kafka avro / kafka json: {:.2} (Avro costs {:.0} % of JSON's throughput)",
            rate(&avro_run) / rate(&kafka_run),
            (1.0 - rate(&avro_run) / rate(&kafka_run)) * 100.0
        );
    });
}
