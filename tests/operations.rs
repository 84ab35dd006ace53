//! Running it in production: traces exported over OTLP/HTTP and continued by the broker's
//! `traceparent`, the metrics scrape parsed by an independent OpenMetrics parser, and
//! readiness following a broker restart. Real processes throughout: `taskstream run`, the
//! simulator, nats-server, and an OTLP/HTTP receiver started by the test.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use support::{Connector, Nats, SimProcess};

const TOKEN: &str = "st_operations_7a6b5c4d3e2f";
const UID: &str = "0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d";

fn tokens() -> String {
    format!("{TOKEN}:{UID}")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn config(sim: &SimProcess, nats: &str, extra: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
backoff_initial_ms = 200

[state]
path = "{{dir}}/state.redb"

[sinks.stdout]
enabled = false

[sinks.nats]
enabled = true
url = "{nats}"
mode = "jetstream"

[metrics]
listen = "127.0.0.1:{{metrics}}"
{extra}
"#,
        url = sim.url()
    )
}

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct GotSpan {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP (protobuf) trace receiver on a free port.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<GotSpan>>>,
}

impl Receiver {
    fn start(rt: &tokio::runtime::Runtime) -> Self {
        let spans: Arc<Mutex<Vec<GotSpan>>> = Arc::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let sink = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut got = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let attributes = s
                                    .attributes
                                    .iter()
                                    .map(|kv| {
                                        let v = kv
                                            .value
                                            .as_ref()
                                            .and_then(|v| v.value.as_ref())
                                            .map(|v| format!("{v:?}"))
                                            .unwrap_or_default();
                                        (kv.key.clone(), v)
                                    })
                                    .collect();
                                got.push(GotSpan {
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent: hex(&s.parent_span_id),
                                    name: s.name,
                                    attributes,
                                });
                            }
                        }
                    }
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { port, spans }
    }

    fn spans(&self) -> Vec<GotSpan> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(record id, traceparent)` of every message on the SYNAPTASK stream.
async fn traceparents_on_jetstream(url: &str) -> Vec<(String, String)> {
    support::jetstream_messages(url)
        .await
        .iter()
        .map(|m| {
            let h = m.headers.as_ref().expect("headers");
            let get = |k: &str| h.get(k).map(|v| v.to_string()).unwrap_or_default();
            (get("Nats-Msg-Id"), get("traceparent"))
        })
        .collect()
}

fn get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn spans_reach_an_otlp_receiver_under_the_trace_ids_on_the_broker() {
    let rt = runtime();
    let nats = rt.block_on(Nats::start());
    let receiver = Receiver::start(&rt);
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "60",
        "--links",
        "60",
        "--rate",
        "20",
        "--seed",
        "5",
    ]);
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\nsample_ratio = 1.0\n",
        receiver.port
    );
    let c = Connector::start(&config(&sim, &nats.url(), &extra), TOKEN);
    // The snapshot and some live diffs.
    wait_for("records on the stream", Duration::from_secs(60), || {
        rt.block_on(traceparents_on_jetstream(&nats.url())).len() > 150
    });
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    c.wait_settled(Duration::from_secs(30));
    let on_broker = rt.block_on(traceparents_on_jetstream(&nats.url()));
    // The batch exporter sends every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (spans, by_id) = loop {
        let got = receiver.spans();
        let ids: HashSet<String> = got.iter().map(|s| s.span_id.clone()).collect();
        let missing = on_broker
            .iter()
            .filter(|(_, tp)| {
                let span = tp.split('-').nth(2).unwrap_or_default();
                !ids.contains(span)
            })
            .count();
        if missing == 0 || Instant::now() > deadline {
            let by_id = got
                .iter()
                .map(|s| (s.span_id.clone(), s.clone()))
                .collect::<HashMap<_, _>>();
            break (got, by_id);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(!on_broker.is_empty());
    let mut checked = 0;
    for (id, traceparent) in &on_broker {
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{id}: traceparent {traceparent}");
        let span = by_id
            .get(parts[2])
            .unwrap_or_else(|| panic!("{id}: no span {} was exported", parts[2]));
        assert_eq!(span.trace_id, parts[1], "{id}: the record span's trace");
        assert_eq!(span.name, "publish");
        assert!(
            span.attributes["taskstream.record_id"].contains(id.as_str()),
            "{id}: {:?}",
            span.attributes
        );
        let parent = by_id
            .get(&span.parent)
            .unwrap_or_else(|| panic!("{id}: its event span {} was not exported", span.parent));
        assert_eq!(
            parent.trace_id, span.trace_id,
            "{id}: parent in the same trace"
        );
        assert!(
            ["graph:get", "graph:diff", "history:page"].contains(&parent.name.as_str()),
            "{id}: event span {}",
            parent.name
        );
        checked += 1;
    }
    // A span tree, for the record.
    let (id, tp) = on_broker.last().expect("one record");
    let record = &by_id[tp.split('-').nth(2).unwrap_or_default()];
    let event = &by_id[&record.parent];
    eprintln!(
        "span tree of {id}:\n  {} trace={} span={} {:?}\n    └ {} span={} {:?}",
        event.name,
        event.trace_id,
        event.span_id,
        event.attributes,
        record.name,
        record.span_id,
        record.attributes
    );
    eprintln!(
        "{checked} records on JetStream, each with an exported span; {} spans received",
        spans.len()
    );
}

#[test]
fn the_metrics_scrape_parses_as_openmetrics_with_histograms_and_labels() {
    let rt = runtime();
    let nats = rt.block_on(Nats::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "40",
        "--links",
        "40",
        "--rate",
        "20",
        "--seed",
        "9",
    ]);
    let c = Connector::start(&config(&sim, &nats.url(), ""), TOKEN);
    wait_for("acknowledged diffs", Duration::from_secs(60), || {
        let m = c.metrics();
        m.get("taskstream_messages_acked_total")
            .copied()
            .unwrap_or(0.0)
            > 100.0
            && m.keys().any(|k| k.contains("kind=\"diff\""))
            // Sinks are probed every 2 s.
            && m.get("taskstream_sink_up{sink=\"nats\"}").copied() == Some(1.0)
    });
    let (code, text) = get(c.metrics_port, "/metrics");
    assert_eq!(code, 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let scrape = dir.path().join("scrape.txt");
    std::fs::write(&scrape, &text).expect("write scrape");
    // The Prometheus project's own parser, strict OpenMetrics.
    let script = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[fam.name] = {"type": fam.type, "unit": fam.unit,
                     "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;
    let parsed = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&scrape)
        .output()
        .expect("python3 (the test command installs prometheus-client)");
    assert!(
        parsed.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let families: serde_json::Value =
        serde_json::from_slice(&parsed.stdout).expect("parser output");
    let fam = |name: &str| {
        families.get(name).unwrap_or_else(|| {
            panic!(
                "no family {name} in {:?}",
                families.as_object().map(|o| o.keys().collect::<Vec<_>>())
            )
        })
    };
    assert_eq!(fam("taskstream_records")["type"], "counter");
    assert_eq!(fam("taskstream_in_flight")["type"], "gauge");
    let latency = fam("taskstream_publish_latency_seconds");
    assert_eq!(latency["type"], "histogram");
    assert_eq!(latency["unit"], "seconds");
    let samples = latency["samples"].as_array().expect("samples");
    let count = samples
        .iter()
        .find(|s| s[0] == "taskstream_publish_latency_seconds_count" && s[1]["sink"] == "nats")
        .expect("a latency count for the nats sink");
    assert!(count[2].as_f64().unwrap_or(0.0) > 100.0, "{count}");
    assert!(samples
        .iter()
        .any(|s| s[0] == "taskstream_publish_latency_seconds_bucket" && s[1]["le"] == "+Inf"));
    let acked = fam("taskstream_sink_messages_acked")["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .find(|s| s[1]["sink"] == "nats" && s[1]["route"] == "nodes")
        .cloned()
        .expect("acks of the nats sink on the nodes route");
    assert!(acked[2].as_f64().unwrap_or(0.0) > 0.0);
    let events = fam("taskstream_events_received")["samples"]
        .as_array()
        .expect("samples")
        .clone();
    assert!(events
        .iter()
        .any(|s| s[1]["source"] == "synaptask" && s[1]["kind"] == "diff"));
    assert_eq!(fam("taskstream_checkpoint_lag_seconds")["type"], "gauge");
    assert_eq!(fam("taskstream_sink_up")["samples"][0][2], 1.0);
    // Secrets never reach a metric.
    assert!(!text.contains(TOKEN));
    eprintln!("sample scrape:\n{text}");
}

#[test]
fn ready_goes_200_503_200_across_a_broker_restart() {
    let rt = runtime();
    let mut nats = rt.block_on(Nats::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "20",
        "--links",
        "20",
        "--rate",
        "5",
        "--seed",
        "2",
    ]);
    let c = Connector::start(&config(&sim, &nats.url(), ""), TOKEN);
    let port = c.metrics_port;
    wait_for("ready", Duration::from_secs(60), || {
        get(port, "/health/ready").0 == 200
    });
    let (_, body) = get(port, "/health/ready");
    assert!(body.contains("\"ready\":true"), "{body}");
    nats.kill();
    wait_for(
        "not ready while NATS is down",
        Duration::from_secs(30),
        || get(port, "/health/ready").0 == 503,
    );
    let (_, body) = get(port, "/health/ready");
    assert!(body.contains("sink nats"), "{body}");
    assert_eq!(
        get(port, "/health/live").0,
        200,
        "live while a broker is down"
    );
    rt.block_on(nats.restart());
    wait_for("ready again", Duration::from_secs(60), || {
        get(port, "/health/ready").0 == 200
    });
    // `taskstream check` runs the same probe (on a stopped connector: the state file is its
    // while it runs).
    let mut c = c;
    c.stop();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args(["check", "--config"])
        .arg(c.dir().join("taskstream.toml"))
        .env("SYNAPTASK_API_TOKEN", TOKEN)
        .output()
        .expect("taskstream check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sink nats"), "{text}");
    nats.kill();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args(["check", "--config"])
        .arg(c.dir().join("taskstream.toml"))
        .env("SYNAPTASK_API_TOKEN", TOKEN)
        .output()
        .expect("taskstream check");
    assert!(!out.status.success(), "check passes with NATS down");
    drop(c);
}

#[test]
fn resnapshot_starts_a_snapshot_without_a_restart() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "30",
        "--links",
        "30",
        "--rate",
        "5",
        "--seed",
        "4",
    ]);
    // JSON log lines, as a container gets them.
    let c = Connector::start_with_env(
        &support::file_config(&sim.url(), ""),
        TOKEN,
        &[("TASKSTREAM_LOG_FORMAT", "json")],
    );
    let snapshots = |c: &Connector| {
        c.metrics()
            .get("taskstream_snapshots_total")
            .copied()
            .unwrap_or(0.0)
    };
    wait_for("the first snapshot", Duration::from_secs(60), || {
        snapshots(&c) >= 1.0
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args(["resnapshot", "--config"])
        .arg(c.dir().join("taskstream.toml"))
        .output()
        .expect("taskstream resnapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("a second snapshot", Duration::from_secs(60), || {
        snapshots(&c) >= 2.0
    });
    assert!(
        c.log()
            .contains("snapshot reconcile requested by an operator"),
        "{}",
        c.log()
    );
    // Every line is a JSON object; the source's lines name it.
    let log = c.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    let connected = lines
        .iter()
        .find(|l| l["fields"]["message"] == "connected to SynapTask")
        .unwrap_or_else(|| panic!("no connect line in {log}"));
    assert_eq!(connected["span"]["source"], "synaptask", "{connected}");
    assert!(!log.contains(TOKEN));
    // SIGUSR1 does the same.
    let pid = c.pid();
    let status = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("a third snapshot", Duration::from_secs(60), || {
        snapshots(&c) >= 3.0
    });
}
