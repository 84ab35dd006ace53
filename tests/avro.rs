//! Avro with a schema registry (issue 9), against real brokers and consumers written by others:
//! the connector publishes Avro to Kafka (tansu) and JetStream while writing the same records as
//! JSON lines; Python's confluent-kafka `AvroDeserializer` and `fastavro` decode what reached
//! the brokers and must read exactly the values of the JSON records. Also: a registry that is
//! down at start, `auto_register = false` naming what is missing, and the schemas' BACKWARD
//! compatibility with their released versions (`schemas/history/`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::Value;
use support::{read_file_sink, Connector, Nats, Registry, SimProcess, Tansu};

const TOKEN: &str = "st_avro_5c4b3a29f8e7d6c5";
const UID: &str = "7d6c5b4a-3921-4f8e-a7d6-c5b4a3928170";
const TOPICS: &str = "synaptask.nodes,synaptask.links,synaptask.status,synaptask.dlq,synaptask.jobs,synaptask.history";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every message of the SYNAPTASK stream as `{subject, headers, payload_hex}` lines.
async fn dump_jetstream(url: &str, to: &Path) -> usize {
    let messages = support::jetstream_messages(url).await;
    let mut lines = String::new();
    for m in &messages {
        let mut headers = serde_json::Map::new();
        if let Some(h) = &m.headers {
            for (k, v) in h.iter() {
                if let Some(v) = v.first() {
                    headers.insert(k.to_string(), Value::String(v.as_str().to_string()));
                }
            }
        }
        let hex: String = m.payload.iter().map(|b| format!("{b:02x}")).collect();
        lines.push_str(
            &serde_json::json!({"subject": m.subject.as_str(), "headers": headers, "payload_hex": hex})
                .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(to, lines).expect("write dump");
    messages.len()
}

fn avro_config(sim: &SimProcess, bootstrap: &str, nats: &str, registry: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
history_interval_ms = 2000

[jobs]
enabled = true
url = "ws://127.0.0.1:{jobs}/api/v1/ws"
client_id = "avro"
token_env = "SYNAPTASK_API_TOKEN"

[state]
path = "{{dir}}/state.redb"

[sinks.stdout]
enabled = true
path = "{{dir}}/records.jsonl"

[sinks.kafka]
enabled = true
brokers = "{bootstrap}"
format = "avro"

[sinks.nats]
enabled = true
url = "{nats}"
mode = "jetstream"
format = "avro"

[schema_registry]
url = "{registry}"
key_format = "avro"

[metrics]
listen = "127.0.0.1:{{metrics}}"
"#,
        url = sim.url(),
        jobs = sim.jobs_port,
    )
}

#[test]
fn avro_on_kafka_and_jetstream_reads_back_as_the_json_records() {
    let rt = runtime();
    let tansu = rt.block_on(Tansu::start());
    let nats = rt.block_on(Nats::start());
    let registry = Registry::start();
    let sim = SimProcess::start(&[
        "--tokens",
        &format!("{TOKEN}:{UID}"),
        "--nodes",
        "80",
        "--links",
        "90",
        "--rate",
        "20",
        "--seed",
        "9",
    ]);
    let mut c = Connector::start(
        &avro_config(&sim, &tansu.bootstrap(), &nats.url(), &registry.url()),
        TOKEN,
    );
    std::thread::sleep(Duration::from_secs(10));
    // Input the schemas cannot type: it must reach consumers too (extra map, dead letters).
    sim.post(
        "/admin/emit",
        Some(&serde_json::json!({"event": "graph:diff",
            "data": {"nodes": [42, {"id": "not a token\r\n", "version": 1}]}})),
    );
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    // Let the last records land, then stop cleanly so that everything is flushed.
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.stop().is_some_and(|s| s.success()), "{}", c.log());
    let records = read_file_sink(&c.dir().join("records.jsonl"));
    assert!(records.len() > 150, "{} records", records.len());
    let types: std::collections::HashSet<String> = records
        .iter()
        .filter_map(|s| s.record.as_ref())
        .map(|r| r["type"].as_str().unwrap_or_default().to_string())
        .collect();
    for t in [
        "synaptask.node.created",
        "synaptask.link.created",
        "synaptask.history.batch",
        "synaptask.dead_letter",
    ] {
        assert!(types.contains(t), "no {t} record in {types:?}");
    }
    let dump = c.dir().join("nats.jsonl");
    let on_nats = rt.block_on(dump_jetstream(&nats.url(), &dump));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/avro/consume.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "--json",
            &c.dir().join("records.jsonl").display().to_string(),
        ])
        .args(["--registry", &registry.url()])
        .args(["--bootstrap", &tansu.bootstrap(), "--topics", TOPICS])
        .args(["--nats-dump", &dump.display().to_string()])
        .arg("--avro-keys")
        .output()
        .expect("python3 tests/avro/consume.py (bash tests/run installs its packages)");
    assert!(
        out.status.success(),
        "consume.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("consume.py prints JSON");
    eprintln!("avro: {report}");
    assert_eq!(report["mismatch_count"], 0, "{report:#}");
    // Every record reached both brokers and was decoded (the same id may arrive twice).
    let n = records.len() as u64;
    assert!(
        report["kafka"].as_u64().unwrap() >= n,
        "{report} vs {n} JSON records"
    );
    assert!(
        on_nats as u64 >= n,
        "{on_nats} on JetStream vs {n} JSON records"
    );
    assert!(report["nats"].as_u64().unwrap() >= n, "{report}");
    // Keys in Avro: every Kafka message's key decoded by confluent-kafka, tombstones included.
    assert!(
        report["avro_keys"].as_u64().unwrap() >= n + report["tombstones"].as_u64().unwrap(),
        "{report}"
    );
}

#[test]
fn a_registry_down_at_start_is_an_error_and_exit_1() {
    let sim = SimProcess::start(&["--tokens", &format!("{TOKEN}:{UID}")]);
    let closed = support::free_port();
    let config = format!(
        r#"
[source]
url = "{url}"

[sinks.stdout]
enabled = true
path = "{{dir}}/records.jsonl"

[sinks.nats]
enabled = true
url = "nats://127.0.0.1:1"
format = "avro"

[schema_registry]
url = "http://127.0.0.1:{closed}"
timeout_ms = 2000
"#,
        url = sim.url()
    );
    let started = Instant::now();
    let mut c = Connector::start(&config, TOKEN);
    let status = c
        .wait_exit(Duration::from_secs(20))
        .expect("exits instead of hanging");
    assert_eq!(status.code(), Some(1), "{}", c.log());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        c.log().contains("schema registry") && c.log().contains("unreachable"),
        "{}",
        c.log()
    );
}

#[test]
fn without_auto_register_missing_schemas_are_named() {
    let sim = SimProcess::start(&["--tokens", &format!("{TOKEN}:{UID}")]);
    let registry = Registry::start();
    let config = format!(
        r#"
[source]
url = "{url}"

[sinks.stdout]
enabled = true
path = "{{dir}}/records.jsonl"

[sinks.nats]
enabled = true
url = "nats://127.0.0.1:1"
format = "avro"

[schema_registry]
url = "{registry}"
auto_register = false
"#,
        url = sim.url(),
        registry = registry.url()
    );
    let mut c = Connector::start(&config, TOKEN);
    let status = c.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", c.log());
    let log = c.log();
    assert!(
        log.contains("not registered") && log.contains("synaptask.nodes-value"),
        "{log}"
    );
}

/// Every schema in `schemas/` against the newest released version of it in `schemas/history/`
/// (`<name>.v<N>.avsc`): data written with the old one must be readable with the new one.
fn backward_problems(schemas: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(schemas).expect("schemas dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("avsc") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let new = Schema::parse_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut released: Vec<(u32, std::path::PathBuf)> =
            std::fs::read_dir(schemas.join("history"))
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter_map(|p| {
                            let name = p.file_name()?.to_string_lossy().to_string();
                            let v = name
                                .strip_prefix(&format!("{stem}.v"))?
                                .strip_suffix(".avsc")?;
                            Some((v.parse().ok()?, p))
                        })
                        .collect()
                })
                .unwrap_or_default();
        released.sort();
        let Some((_, old_path)) = released.last() else {
            problems.push(format!("{stem}: no released version in history/"));
            continue;
        };
        let old = Schema::parse_str(&std::fs::read_to_string(old_path).unwrap()).unwrap();
        if let Err(e) = SchemaCompatibility::can_read(&old, &new) {
            let why: String = e.to_string().chars().take(200).collect();
            problems.push(format!(
                "{stem}: not BACKWARD compatible with {}: {why}",
                old_path.display()
            ));
        }
    }
    problems
}

#[test]
fn every_schema_is_backward_compatible_with_its_released_version() {
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let problems = backward_problems(&schemas);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_breaking_change_fails_the_compatibility_check() {
    // The fixture: node_change with a new required field (no default), which old data lacks.
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir(dir.path().join("history")).unwrap();
    std::fs::copy(
        root.join("schemas/history/node_change.v1.avsc"),
        dir.path().join("history/node_change.v1.avsc"),
    )
    .unwrap();
    std::fs::copy(
        root.join("tests/fixtures/avro/node_change_breaking.avsc"),
        dir.path().join("node_change.avsc"),
    )
    .unwrap();
    let problems = backward_problems(dir.path());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("node_change"), "{problems:?}");
}

#[test]
fn the_json_schema_names_every_avro_envelope_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("schemas/record.schema.json")).unwrap(),
    )
    .unwrap();
    let props = json["properties"].as_object().unwrap();
    for (_, file, text) in taskstream::encode::avro::SCHEMA_FILES {
        let avsc: Value = serde_json::from_str(text).unwrap();
        for f in avsc["fields"].as_array().unwrap() {
            let name = f["name"].as_str().unwrap();
            assert!(
                name == "extra" || props.contains_key(name),
                "{file}: field {name} is not in record.schema.json"
            );
        }
    }
}
