//! Soak test (slow: about 3 minutes, and run by the test command like every other test, it is
//! not ignored): two minutes of the simulator with `--chaos` session drops while the Kafka
//! broker and the NATS server are each killed and restarted once and the connector is
//! SIGKILLed and started again ten times, with both sinks on (issue 8 item 10).
//!
//! At the end JetStream (whose file store outlives its restart) holds the whole `/truth`; tansu
//! (memory storage, empty after its restart) holds every entity that changed after its crash at
//! its final version, and every delete is followed by a tombstone; the simulator counted no limit
//! violation and no process panicked.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use support::{read_jetstream, Connector, Latest, Nats, Seen, SimProcess, Tansu};

const TOKEN: &str = "st_soak_9f8e7d6c5b4a3921";
const UID: &str = "3c2b1a09-f8e7-4d6c-a5b4-a39281706f5e";
const TOPICS: [&str; 4] = [
    "synaptask.nodes",
    "synaptask.links",
    "synaptask.status",
    "synaptask.dlq",
];
/// How long the simulator generates changes.
const SOAK: Duration = Duration::from_secs(120);
/// How many times the connector is SIGKILLed during the soak.
const CONNECTOR_KILLS: u32 = 10;

/// What happens at a moment of the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    KillConnector,
    KillKafka,
    RestartKafka,
    KillNats,
    RestartNats,
}

/// The soak's timeline: Kafka goes down early, so most of the soak runs on the restarted broker
/// and the final Kafka check covers most entities; NATS goes down mid-soak; the connector kills
/// are spread over the whole two minutes with jitter (seeded, so a failure can be rerun).
fn timeline() -> Vec<(Duration, Step)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(81);
    let mut steps = vec![
        (Duration::from_secs(12), Step::KillKafka),
        (Duration::from_secs(18), Step::RestartKafka),
        (Duration::from_secs(50), Step::KillNats),
        (Duration::from_secs(56), Step::RestartNats),
    ];
    let spacing = SOAK.as_millis() as u64 / u64::from(CONNECTOR_KILLS);
    for i in 0..u64::from(CONNECTOR_KILLS) {
        let at = 4_000 + i * spacing + rng.gen_range(0..spacing - 4_000);
        steps.push((Duration::from_millis(at), Step::KillConnector));
    }
    steps.sort_by_key(|(at, _)| *at);
    steps
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Both broker sinks at once, Kafka and JetStream.
fn config(sim: &SimProcess, bootstrap: &str, nats_url: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
backoff_initial_ms = 200
history_interval_ms = 3000

[state]
path = "{{dir}}/state.redb"
# A cache of about one megabyte: nearly every change reads its entity back from the store, so
# the kills and restarts below check that path against the truth too.
cache_mb = 1

[sinks.stdout]
enabled = false

[sinks.kafka]
enabled = true
brokers = "{bootstrap}"
partitions = 2

[sinks.nats]
enabled = true
url = "{nats_url}"
mode = "jetstream"

[metrics]
listen = "127.0.0.1:{{metrics}}"
"#,
        url = sim.url()
    )
}

/// Every message of the Kafka topics, from the beginning (tombstones as `record: None`).
fn read_kafka(bootstrap: &str) -> Vec<Seen> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "soak-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
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
        return Vec::new();
    }
    consumer.assign(&tpl).expect("assign");
    let mut seen = Vec::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(1500) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle = Instant::now();
                seen.push(Seen {
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                    record: m
                        .payload()
                        .map(|p| serde_json::from_slice(p).expect("JSON payload")),
                    channel: m.topic().to_string(),
                });
            }
            Some(Err(e)) => panic!("kafka read: {e}"),
            None => {}
        }
    }
    seen
}

/// Entity key -> version, for the test user's nodes and links (active or in the trash).
fn versions(truth: &Value) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for (kind, list) in [("node", &truth["nodes"]), ("link", &truth["links"])] {
        for e in list
            .as_array()
            .expect("entity list in /truth")
            .iter()
            .filter(|e| e["ownerUid"] == UID)
        {
            m.insert(
                format!("{kind}:{}", e["id"].as_str().unwrap()),
                e["version"].as_u64().unwrap(),
            );
        }
    }
    m
}

/// Keys of the test user's deleted nodes and links.
fn deleted(truth: &Value) -> HashSet<String> {
    let mut s = HashSet::new();
    for kind in ["node", "link"] {
        for d in truth["deleted"][format!("{kind}s")]
            .as_array()
            .expect("deleted list in /truth")
            .iter()
            .filter(|d| d["ownerUid"] == UID)
        {
            s.insert(format!("{kind}:{}", d["id"].as_str().unwrap()));
        }
    }
    s
}

/// What Kafka gets wrong, given the versions at the broker's crash (`at_kill`, read right after
/// the kill: a version other than those was published after the crash, so the restarted broker
/// must have it):
/// - every entity whose version differs from `at_kill` (or which is new) is there at its
///   final version (with its fields, or trashed);
/// - every entity that existed at the crash and is deleted now has its delete record;
/// - every deleted entity the broker holds ends with the delete record and a tombstone.
fn kafka_problems(latest: &Latest, truth: &Value, at_kill: &HashMap<String, u64>) -> Vec<String> {
    let mut changed = truth.clone();
    for (kind, list) in [("node", "nodes"), ("link", "links")] {
        changed[list]
            .as_array_mut()
            .expect("entity list in /truth")
            .retain(|e| {
                let key = format!("{kind}:{}", e["id"].as_str().unwrap_or_default());
                at_kill.get(&key).copied() != e["version"].as_u64()
            });
    }
    let mut out = latest.mismatches(&changed, UID);
    let mut gone: Vec<String> = deleted(truth).into_iter().collect();
    gone.sort();
    for key in gone {
        let held = latest.last.get(&key);
        if held.is_none() && at_kill.contains_key(&key) {
            out.push(format!(
                "{key}: deleted after the Kafka restart (v{} at the crash), no delete record",
                at_kill[&key]
            ));
        } else if let Some(r) = held {
            if !latest.tombstoned.contains(&key) {
                out.push(format!(
                    "{key}: deleted in truth, no tombstone after its last record {} v{}",
                    r["type"], r["sequence"]
                ));
            }
        }
    }
    out
}

/// The end of the connector's log (all runs), for failure messages.
fn log_tail(c: &Connector, lines: usize) -> String {
    let log = c.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `problems` until it returns none, or panics with the first ones and the log tail.
fn wait_clean(
    what: &str,
    c: &Connector,
    timeout: Duration,
    mut problems: impl FnMut() -> Vec<String>,
) {
    let started = Instant::now();
    loop {
        let found = problems();
        if found.is_empty() {
            eprintln!("soak: {what} matched after {:?}", started.elapsed());
            return;
        }
        if started.elapsed() > timeout {
            panic!(
                "{what}: {} differences after {timeout:?}, first: {:#?}\nconnector log (tail):\n{}",
                found.len(),
                &found[..found.len().min(20)],
                log_tail(c, 80)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn soak_chaos_broker_restarts_and_kill9s_end_at_the_truth() {
    let begun = Instant::now();
    let rt = runtime();
    let mut tansu = rt.block_on(Tansu::start());
    let mut nats = rt.block_on(Nats::start());
    let sim = SimProcess::start(&[
        "--tokens",
        &format!("{TOKEN}:{UID}"),
        "--nodes",
        "300",
        "--links",
        "350",
        "--rate",
        "40",
        "--seed",
        "81",
        "--chaos",
        // Within the documented connect limits for a connector that keeps to them.
        "--chaos-disconnect-ms",
        "12000",
    ]);
    let mut c = Connector::start(&config(&sim, &tansu.bootstrap(), &nats.url()), TOKEN);
    let start = Instant::now();
    let mut at_kafka_kill = None;
    let mut kills = 0;
    let mut pause_rng = rand_chacha::ChaCha8Rng::seed_from_u64(82);
    for (at, step) in timeline() {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        eprintln!("soak: {:>6.1?} {step:?}", start.elapsed());
        match step {
            Step::KillConnector => {
                assert!(
                    c.wait_exit(Duration::from_millis(100)).is_none(),
                    "the connector exited by itself before kill {}\nconnector log (tail):\n{}",
                    kills + 1,
                    log_tail(&c, 80)
                );
                c.kill9();
                kills += 1;
                std::thread::sleep(Duration::from_millis(pause_rng.gen_range(0..1500)));
                c.restart();
            }
            Step::KillKafka => {
                tansu.kill();
                // Read after the kill: whatever changes after this was not acknowledged by
                // the broker that is now gone, so it must reach the restarted one.
                at_kafka_kill = Some(versions(&sim.truth_light()));
            }
            Step::RestartKafka => rt.block_on(tansu.restart()),
            Step::KillNats => nats.kill(),
            Step::RestartNats => rt.block_on(nats.restart()),
        }
    }
    if let Some(wait) = SOAK.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
    sim.pause();
    eprintln!("soak: {:>6.1?} simulator paused", start.elapsed());
    assert_eq!(kills, CONNECTOR_KILLS);
    let at_kafka_kill = at_kafka_kill.expect("Kafka was killed");

    // JetStream kept its store across the restart: all of the truth is there.
    let url = nats.url();
    wait_clean("JetStream vs /truth", &c, Duration::from_secs(180), || {
        let latest = Latest::from(&rt.block_on(read_jetstream(&url)));
        latest.mismatches(&sim.truth_light(), UID)
    });
    // Kafka: whatever changed after its crash, and every delete with its tombstone.
    let bootstrap = tansu.bootstrap();
    wait_clean(
        "Kafka vs /truth (changed since its crash)",
        &c,
        Duration::from_secs(60),
        || {
            let latest = Latest::from(&read_kafka(&bootstrap));
            kafka_problems(&latest, &sim.truth_light(), &at_kafka_kill)
        },
    );

    let truth = sim.truth_light();
    let now = versions(&truth);
    let changed = now
        .iter()
        .filter(|(k, v)| at_kafka_kill.get(*k) != Some(*v))
        .count();
    let gone = deleted(&truth);
    let deleted_since = gone
        .iter()
        .filter(|k| at_kafka_kill.contains_key(*k))
        .count();
    eprintln!(
        "soak: {} entities, {changed} changed and {deleted_since} deleted since the Kafka crash, \
         {} deleted in all; chaos {}; counters {}",
        now.len(),
        gone.len(),
        truth["chaos"],
        truth["counters"]
    );
    // The check above covered a real part of the graph.
    assert!(
        changed > 100,
        "{changed} entities changed after the Kafka crash"
    );
    assert!(
        deleted_since > 10,
        "{deleted_since} entities deleted after the Kafka crash"
    );
    let chaos = &truth["chaos"];
    assert!(
        chaos["serverDisconnects"].as_u64().unwrap() + chaos["transportDrops"].as_u64().unwrap()
            >= 2,
        "chaos dropped sessions: {chaos}"
    );
    assert_eq!(
        truth["counters"]["limitViolations"]["total"],
        0,
        "the connector kept every limit across {kills} kills: {}\nconnector log (tail):\n{}",
        truth["counters"],
        log_tail(&c, 80)
    );
    assert!(
        c.wait_exit(Duration::from_millis(200)).is_none(),
        "the connector is still running\nconnector log (tail):\n{}",
        log_tail(&c, 80)
    );
    let log = c.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "connector panics: {panics:#?}");
    assert!(
        !sim.log().contains("panicked"),
        "simulator panicked:\n{}",
        sim.log()
    );
    eprintln!("soak: done in {:?}", begun.elapsed());
}
