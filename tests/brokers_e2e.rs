//! End-to-end: `taskstream run` against the simulator and real brokers from the harness
//! (tansu for Kafka, nats-server for NATS), including broker outages mid-stream.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use support::{read_jetstream, wait_until_matches, Connector, Nats, Seen, SimProcess, Tansu};

const TOKEN: &str = "st_brokers_e2e_0a1b2c3d4e5f";
const UID: &str = "6e5d4c3b-2a19-4807-b6a5-94837261504f";
const TOPICS: [&str; 4] = [
    "synaptask.nodes",
    "synaptask.links",
    "synaptask.status",
    "synaptask.dlq",
];

fn tokens() -> String {
    format!("{TOKEN}:{UID}")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn kafka_config(sim: &SimProcess, bootstrap: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
backoff_initial_ms = 200

[state]
path = "{{dir}}/state.redb"

[sinks.stdout]
enabled = false

[sinks.kafka]
enabled = true
brokers = "{bootstrap}"
partitions = 2

[metrics]
listen = "127.0.0.1:{{metrics}}"
"#,
        url = sim.url()
    )
}

/// Every message of the topics, from the beginning, with headers.
fn read_kafka(bootstrap: &str) -> (Vec<Seen>, Vec<HashMap<String, String>>) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "e2e-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    for t in metadata
        .topics()
        .iter()
        .filter(|t| TOPICS.contains(&t.name()))
    {
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)
                .expect("partition");
        }
    }
    if tpl.count() == 0 {
        return (Vec::new(), Vec::new());
    }
    consumer.assign(&tpl).expect("assign");
    let mut seen = Vec::new();
    let mut headers = Vec::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(1500) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle = Instant::now();
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                let record = m
                    .payload()
                    .map(|p| serde_json::from_slice::<Value>(p).expect("JSON payload"));
                let mut h = HashMap::new();
                if let Some(hs) = m.headers() {
                    for i in 0..hs.count() {
                        let hd = hs.get(i);
                        h.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                        );
                    }
                }
                seen.push(Seen {
                    record,
                    key,
                    channel: m.topic().to_string(),
                });
                headers.push(h);
            }
            Some(Err(e)) => panic!("kafka read: {e}"),
            None => {}
        }
    }
    (seen, headers)
}

#[test]
fn kafka_ends_at_the_truth_with_headers_and_tombstones() {
    let rt = runtime();
    let tansu = rt.block_on(Tansu::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "300",
        "--links",
        "350",
        "--rate",
        "60",
        "--seed",
        "31",
    ]);
    let c = Connector::start(&kafka_config(&sim, &tansu.bootstrap()), TOKEN);
    std::thread::sleep(Duration::from_secs(5));
    sim.pause();
    let (latest, truth) = wait_until_matches(&sim, UID, Duration::from_secs(60), || {
        read_kafka(&tansu.bootstrap()).0
    });
    let (seen, headers) = read_kafka(&tansu.bootstrap());

    // Deletes: a delete record followed by a tombstone for the key, on the entity topic.
    let deleted: Vec<String> = truth["deleted"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("node:{}", d["id"].as_str().unwrap()))
        .filter(|k| latest.last.contains_key(k))
        .collect();
    assert!(
        !deleted.is_empty(),
        "the run deleted nodes the connector had seen"
    );
    for k in &deleted {
        assert!(
            latest.tombstoned.contains(k),
            "no tombstone after the delete of {k}"
        );
    }
    // Headers on every record message; key = entity id.
    let mut status = 0;
    for (s, h) in seen.iter().zip(&headers) {
        let Some(r) = &s.record else { continue };
        assert_eq!(h["ce_id"], r["id"].as_str().unwrap());
        assert_eq!(h["ce_type"], r["type"].as_str().unwrap());
        assert_eq!(h["ce_source"], r["source"].as_str().unwrap());
        assert_eq!(h["ce_time"], r["time"].as_str().unwrap());
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["trace_id"], r["traceId"].as_str().unwrap());
        let tp = &h["traceparent"];
        assert!(
            tp.starts_with("00-") && tp.contains(r["traceId"].as_str().unwrap()),
            "{tp}"
        );
        assert_eq!(s.key, r["subject"].as_str().unwrap());
        if s.channel == "synaptask.status" {
            status += 1;
            assert_eq!(r["type"], "synaptask.task.status_changed");
        }
    }
    assert!(status > 0, "status records on synaptask.status");
    drop(c);
}

#[test]
fn kafka_outage_mid_stream_loses_nothing_changed_meanwhile() {
    let rt = runtime();
    let mut tansu = rt.block_on(Tansu::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "200",
        "--links",
        "250",
        "--rate",
        "40",
        "--seed",
        "32",
    ]);
    let c = Connector::start(&kafka_config(&sim, &tansu.bootstrap()), TOKEN);
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    wait_until_matches(&sim, UID, Duration::from_secs(60), || {
        read_kafka(&tansu.bootstrap()).0
    });
    c.wait_settled(Duration::from_secs(30));
    let before = versions(&sim.truth_light());
    tansu.kill();
    // Changes while the broker is down: the connector holds them (bounded) and retries.
    sim.resume();
    std::thread::sleep(Duration::from_secs(4));
    rt.block_on(tansu.restart());
    std::thread::sleep(Duration::from_secs(2));
    sim.pause();
    let after = versions(&sim.truth_light());
    let changed: Vec<(&String, &u64)> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .collect();
    assert!(
        changed.len() > 10,
        "changes during the outage: {}",
        changed.len()
    );
    // tansu's memory storage forgot everything on restart; what was unacknowledged at the
    // crash, and everything after, must be there at its final version.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let latest = support::Latest::from(&read_kafka(&tansu.bootstrap()).0);
        let behind: Vec<String> = changed
            .iter()
            .filter(|(k, v)| latest.last.get(*k).and_then(|r| r["sequence"].as_u64()) != Some(**v))
            .map(|(k, v)| {
                format!(
                    "{k} v{v}: broker {:?}",
                    latest.last.get(*k).map(|r| r["sequence"].clone())
                )
            })
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the outage the broker misses {} changes: {:#?}\nconnector log:\n{}",
            behind.len(),
            &behind[..behind.len().min(10)],
            c.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let m = c.metrics();
    assert!(
        m["taskstream_sink_retries_total"] >= 1.0,
        "the outage was noticed and retried: {m:?}"
    );
}

/// Entity key -> version, for active entities of the test user.
fn versions(truth: &Value) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for (kind, list) in [("node", &truth["nodes"]), ("link", &truth["links"])] {
        for e in list
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ownerUid"] == UID && e["inTrash"] == false)
        {
            m.insert(
                format!("{kind}:{}", e["id"].as_str().unwrap()),
                e["version"].as_u64().unwrap(),
            );
        }
    }
    m
}

fn nats_config(sim: &SimProcess, url: &str, mode: &str) -> String {
    format!(
        r#"
[source]
url = "{url_sim}"
backoff_initial_ms = 200

[state]
path = "{{dir}}/state.redb"

[sinks.stdout]
enabled = false

[sinks.nats]
enabled = true
url = "{url}"
mode = "{mode}"

[metrics]
listen = "127.0.0.1:{{metrics}}"
"#,
        url_sim = sim.url()
    )
}

#[test]
fn nats_jetstream_ends_at_the_truth_across_a_server_restart() {
    let rt = runtime();
    let mut nats = rt.block_on(Nats::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "200",
        "--links",
        "250",
        "--rate",
        "40",
        "--seed",
        "33",
    ]);
    let c = Connector::start(&nats_config(&sim, &nats.url(), "jetstream"), TOKEN);
    std::thread::sleep(Duration::from_secs(3));
    nats.kill();
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(nats.restart());
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    let url = nats.url();
    let read = || {
        let rt = runtime();
        rt.block_on(read_jetstream(&url))
    };
    let (latest, _) = wait_until_matches(&sim, UID, Duration::from_secs(90), read);
    let seen = read();
    let subjects: std::collections::BTreeSet<&str> =
        seen.iter().map(|s| s.channel.as_str()).collect();
    assert!(subjects.contains("synaptask.nodes.created"), "{subjects:?}");
    assert!(subjects.contains("synaptask.status"), "{subjects:?}");
    assert!(
        subjects.iter().any(|s| s.starts_with("synaptask.links.")),
        "{subjects:?}"
    );
    assert!(!latest.status.is_empty());
    drop(c);
}

#[test]
fn nats_core_mode_delivers_to_subscribers() {
    let rt = runtime();
    let nats = rt.block_on(Nats::start());
    let received = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        client.subscribe("synaptask.>").await.expect("subscribe")
    });
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "50",
        "--links",
        "60",
        "--rate",
        "20",
    ]);
    let c = Connector::start(&nats_config(&sim, &nats.url(), "core"), TOKEN);
    let got = rt.block_on(async {
        use futures_util::StreamExt;
        let mut sub = received;
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while n < 110 {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) => {
                    let r: Value = serde_json::from_slice(&m.payload).expect("JSON");
                    assert!(m.subject.starts_with("synaptask."));
                    assert!(r["id"].is_string());
                    n += 1;
                }
                _ => break,
            }
        }
        n
    });
    assert!(
        got >= 110,
        "core subscribers got the snapshot: {got}\n{}",
        c.log()
    );
}

#[test]
fn ids_with_line_breaks_become_dead_letters_and_jetstream_goes_on() {
    // A node id with CR/LF once reached a NATS header and stopped the process (issue 8, item 6).
    let rt = runtime();
    let nats = rt.block_on(Nats::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "100",
        "--links",
        "120",
        "--rate",
        "20",
        "--seed",
        "39",
    ]);
    let mut c = Connector::start(&nats_config(&sim, &nats.url(), "jetstream"), TOKEN);
    std::thread::sleep(Duration::from_secs(2));
    for data in [
        json!({"nodes": [{"id": "bad\r\nid", "title": "t", "status": 0, "version": 1,
                          "createdTime": "2026-01-01T00:00:00Z"}], "links": []}),
        json!({"nodes": [], "links": [{"id": "x y", "source": "a", "target": "b", "version": 1}]}),
    ] {
        sim.post(
            "/admin/emit",
            Some(&json!({"event": "graph:diff", "data": data})),
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    let url = nats.url();
    let read = || {
        let rt = runtime();
        rt.block_on(read_jetstream(&url))
    };
    let (latest, _) = wait_until_matches(&sim, UID, Duration::from_secs(60), read);
    assert!(
        latest.dead_letters.len() >= 2,
        "dead letters: {:#?}",
        latest.dead_letters
    );
    assert!(
        c.wait_exit(Duration::from_millis(200)).is_none(),
        "the connector is still running:\n{}",
        c.log()
    );
}

/// Issue 8 item 5: a SIGTERM while the broker is down and the window is full ends within the
/// drain timeout plus a few seconds, cleanly, and nothing is lost once the broker is back.
#[test]
fn sigterm_while_kafka_is_down_ends_within_the_drain_timeout() {
    let rt = runtime();
    let mut tansu = rt.block_on(Tansu::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "150",
        "--links",
        "150",
        "--rate",
        "60",
        "--seed",
        "34",
    ]);
    let config = kafka_config(&sim, &tansu.bootstrap()).replace(
        "[sinks.stdout]",
        "[delivery]\nmax_in_flight = 20\ndrain_timeout_secs = 3\n\n[sinks.stdout]",
    );
    let mut c = Connector::start(&config, TOKEN);
    std::thread::sleep(Duration::from_secs(2));
    sim.pause();
    wait_until_matches(&sim, UID, Duration::from_secs(60), || {
        read_kafka(&tansu.bootstrap()).0
    });
    c.wait_settled(Duration::from_secs(30));
    let before = versions(&sim.truth_light());
    sim.resume();
    tansu.kill();
    // Changes keep coming: the window fills and the pipeline blocks in `submit`.
    std::thread::sleep(Duration::from_secs(4));
    let m = c.metrics();
    assert!(
        m["taskstream_in_flight"] >= 20.0,
        "the window is full while the broker is down: {m:?}"
    );
    let asked = Instant::now();
    let status = c.stop();
    let took = asked.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean exit, not the hard stop: {status:?}\n{}",
        c.log()
    );
    assert!(
        took < Duration::from_secs(3 + 4),
        "SIGTERM took {took:?} with drain_timeout_secs = 3\n{}",
        c.log()
    );
    assert!(c.log().contains("drain timed out"), "{}", c.log());

    // The checkpoint says what was delivered: the next run publishes the rest. tansu's memory
    // storage forgot the first run's records, so only what changed since is checked.
    rt.block_on(tansu.restart());
    c.restart();
    std::thread::sleep(Duration::from_secs(2));
    sim.pause();
    let after = versions(&sim.truth_light());
    let changed: Vec<(&String, &u64)> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .collect();
    assert!(changed.len() > 10, "{} changes", changed.len());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let latest = support::Latest::from(&read_kafka(&tansu.bootstrap()).0);
        let behind = changed
            .iter()
            .filter(|(k, v)| latest.last.get(*k).and_then(|r| r["sequence"].as_u64()) != Some(**v))
            .count();
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{behind} of {} changes missing after the restart\n{}",
            changed.len(),
            c.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Issue 8 items 1 and 5: job frames received while JetStream is down are published or kept
/// for the next run at shutdown, never lost, and no frame id is given to two frames across the
/// restart (JetStream would drop the second as a duplicate).
#[test]
fn job_frames_outlive_a_shutdown_while_jetstream_is_down() {
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
        "0",
        "--jobs-rate",
        "50",
        "--seed",
        "35",
    ]);
    let config = nats_config(&sim, &nats.url(), "jetstream")
        .replace(
            "[sinks.stdout]",
            &format!(
                "[delivery]\nmax_in_flight = 10\ndrain_timeout_secs = 2\n\n[jobs]\nenabled = true\nurl = \"ws://127.0.0.1:{}/api/v1/ws\"\nclient_id = \"spool\"\ntoken_env = \"SYNAPTASK_API_TOKEN\"\n\n[sinks.stdout]",
                sim.jobs_port
            ),
        );
    let mut c = Connector::start(&config, TOKEN);
    std::thread::sleep(Duration::from_secs(3));
    nats.kill();
    std::thread::sleep(Duration::from_secs(3));
    // No more frames: the job API replays nothing, so frames sent while no connector runs
    // would be lost by the API itself, not by the connector.
    support::http_json(sim.jobs_port, "POST", "/pause", None);
    std::thread::sleep(Duration::from_millis(500));
    let status = c.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        c.log()
    );
    assert!(
        c.dir().join("state.redb.jobs-spool.jsonl").exists(),
        "undelivered frames were kept\n{}",
        c.log()
    );
    let first_log = c.log();
    rt.block_on(nats.restart());
    c.restart();
    // New frames for the second run, numbered under its own epoch.
    std::thread::sleep(Duration::from_secs(2));
    support::http_json(sim.jobs_port, "POST", "/resume", None);
    std::thread::sleep(Duration::from_secs(2));
    support::http_json(sim.jobs_port, "POST", "/pause", None);

    let truth = support::http_json(sim.jobs_port, "GET", "/truth", None);
    let sent: Vec<Value> = truth["clients"]["spool"]
        .as_array()
        .expect("frames sent to client spool")
        .iter()
        .filter(|f| f.get("malformed").is_none())
        .cloned()
        .collect();
    assert!(sent.len() > 100, "{} frames", sent.len());
    let url = nats.url();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs: Vec<Value> = rt
            .block_on(read_jetstream(&url))
            .into_iter()
            .filter_map(|s| s.record)
            .filter(|r| r["type"].as_str().unwrap().starts_with("synaptask.job."))
            .collect();
        let mut data: Vec<&Value> = jobs.iter().map(|r| &r["data"]).collect();
        data.dedup();
        let missing = sent.iter().filter(|f| !data.contains(f)).count();
        if missing == 0 {
            // One id per frame: the stream (which drops repeated ids) holds each frame once.
            let ids: std::collections::HashSet<&str> =
                jobs.iter().map(|r| r["id"].as_str().unwrap()).collect();
            assert_eq!(ids.len(), jobs.len());
            assert_eq!(jobs.len(), sent.len(), "each frame once");
            let epochs: std::collections::BTreeSet<&str> = jobs
                .iter()
                .map(|r| r["id"].as_str().unwrap().split(':').nth(2).unwrap())
                .collect();
            assert_eq!(epochs.len(), 2, "two runs, two epochs: {epochs:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} frames never reached JetStream\nfirst run:\n{first_log}\nsecond run:\n{}",
            sent.len(),
            c.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        !c.dir().join("state.redb.jobs-spool.jsonl").exists(),
        "the spool is removed once read"
    );
}
