//! End-to-end tests of `taskstream run` against the simulator, with the file sink: the broker
//! tests (`tests/brokers_e2e.rs`) repeat the main ones against Kafka and NATS.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use support::{read_file_sink, wait_until_matches, Connector, SimProcess};

const TOKEN: &str = "st_e2e_9f8e7d6c5b4a39281706";
const UID: &str = "3c6f0d2e-8b1a-4f5e-9d7c-2a1b0c9d8e7f";

fn tokens() -> String {
    format!("{TOKEN}:{UID}")
}

/// A connector config writing to `{dir}/records.jsonl`, with its state in `{dir}`.
fn file_config(sim: &SimProcess, extra_source: &str) -> String {
    support::file_config(&sim.url(), extra_source)
}

fn records_path(c: &Connector) -> std::path::PathBuf {
    c.dir().join("records.jsonl")
}

#[test]
fn live_stream_ends_at_the_truth_with_status_records() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "400",
        "--links",
        "500",
        "--rate",
        "80",
        "--seed",
        "21",
    ]);
    let c = Connector::start(&file_config(&sim, ""), TOKEN);
    std::thread::sleep(Duration::from_secs(4));
    sim.pause();
    let (latest, truth) = wait_until_matches(&sim, UID, Duration::from_secs(30), || {
        read_file_sink(&records_path(&c))
    });
    let seen = read_file_sink(&records_path(&c));
    let records: Vec<&Value> = seen.iter().filter_map(|s| s.record.as_ref()).collect();
    assert!(
        records.iter().any(|r| r["origin"] == "diff"),
        "live diffs reached the sink"
    );

    // Every status change on the live stream has its status record, with from/to as in the truth.
    let snapshot_version: HashMap<&str, u64> = records
        .iter()
        .filter(|r| r["origin"] == "snapshot" && r["type"] == "synaptask.node.created")
        .map(|r| {
            (
                r["subject"].as_str().unwrap(),
                r["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    let status_ids: HashSet<&str> = latest
        .status
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    let mut live_transitions = 0;
    for t in truth["transitions"].as_array().unwrap() {
        let node = t["nodeId"].as_str().unwrap();
        let v = t["version"].as_u64().unwrap();
        if snapshot_version.get(node).is_some_and(|sv| v > *sv) {
            live_transitions += 1;
            let id = format!("status:{node}:{v}");
            assert!(
                status_ids.contains(id.as_str()),
                "no status record {id} for transition {t}"
            );
        }
    }
    assert!(
        live_transitions > 20,
        "the run should see live status changes: {live_transitions}"
    );
    for s in &latest.status {
        let t = truth["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["nodeId"] == s["subject"] && t["version"] == s["sequence"]);
        if let Some(t) = t {
            assert_eq!(s["from"]["code"], t["from"]);
            assert_eq!(s["to"]["code"], t["to"]);
        }
        assert!(s["to"]["name"].is_string() && s["after"]["title"].is_string());
    }
    // Deterministic ids: no record id was produced twice with different content.
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for r in &records {
        if let Some(prev) = by_id.insert(r["id"].as_str().unwrap(), r) {
            assert_eq!(prev["after"], r["after"], "same id, same change");
        }
    }
    // Every record has the envelope fields, the trace id and a source naming the user.
    for r in &records {
        for f in [
            "id", "type", "source", "subject", "time", "sequence", "traceId", "origin",
        ] {
            assert!(!r[f].is_null(), "{f} missing in {r}");
        }
        assert!(r["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/users/{UID}")));
    }
    // Snapshot records carry the source trace_id of their page (12 hex), live ones a new trace.
    assert!(records
        .iter()
        .filter(|r| r["origin"] == "snapshot")
        .all(|r| r["traceId"].as_str().unwrap().len() == 12));
    assert!(records
        .iter()
        .filter(|r| r["origin"] == "diff")
        .all(|r| r["traceId"].as_str().unwrap().len() == 32));
    // Every record validates against the shipped JSON Schema.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(root.join("tests/schema_check.py"))
        .arg(root.join("schemas/record.schema.json"))
        .arg(records_path(&c))
        .output()
        .expect("python3 (the README test command installs jsonschema)");
    assert!(
        out.status.success(),
        "schema validation: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let counters = &truth["counters"];
    assert_eq!(
        counters["limitViolations"]["total"], 0,
        "the connector kept every limit: {counters}"
    );
    assert_eq!(counters["connects"], 1);
}

#[test]
fn kill9_then_restart_publishes_exactly_what_changed_while_down() {
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
        "22",
    ]);
    let mut c = Connector::start(&file_config(&sim, ""), TOKEN);
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    wait_until_matches(&sim, UID, Duration::from_secs(30), || {
        read_file_sink(&records_path(&c))
    });
    c.wait_settled(Duration::from_secs(30));
    let before = sim.truth_light();
    c.kill9();
    let lines_before = read_file_sink(&records_path(&c)).len();

    // Changes while the connector is down.
    sim.resume();
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    let after = sim.truth_light();
    c.restart();
    let (_, _) = wait_until_matches(&sim, UID, Duration::from_secs(40), || {
        read_file_sink(&records_path(&c))
    });
    c.wait_settled(Duration::from_secs(30));

    let version = |t: &Value| -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for (kind, list) in [("node", &t["nodes"]), ("link", &t["links"])] {
            for e in list.as_array().unwrap() {
                m.insert(
                    format!("{kind}:{}", e["id"].as_str().unwrap()),
                    e["version"].as_u64().unwrap(),
                );
            }
        }
        m
    };
    let (v0, v1) = (version(&before), version(&after));
    let changed: HashSet<String> = v1
        .iter()
        .filter(|(k, v)| v0.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(v0.keys().filter(|k| !v1.contains_key(*k)).cloned())
        .collect();
    assert!(
        changed.len() > 20,
        "the generator changed things while the connector was down: {}",
        changed.len()
    );
    let republished: HashSet<String> = read_file_sink(&records_path(&c))[lines_before..]
        .iter()
        .filter_map(|s| s.record.as_ref())
        .filter(|r| {
            let t = r["type"].as_str().unwrap();
            t.starts_with("synaptask.node.") || t.starts_with("synaptask.link.")
        })
        .map(|r| {
            format!(
                "{}:{}",
                r["type"].as_str().unwrap().split('.').nth(1).unwrap(),
                r["subject"].as_str().unwrap()
            )
        })
        .collect();
    // History replays entities created and purged while down too; nothing that existed before
    // and did not change is published again.
    let unchanged_again: Vec<&String> = republished
        .difference(&changed)
        .filter(|k| v0.contains_key(*k))
        .collect();
    assert!(
        unchanged_again.is_empty(),
        "unchanged entities published again after restart: {unchanged_again:?}"
    );
    let missing: Vec<&String> = changed
        .iter()
        .filter(|k| !republished.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "changed while down but not published: {missing:?}"
    );
}

#[test]
fn token_never_reaches_a_log_line_or_a_record() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "50",
        "--links",
        "60",
        "--rate",
        "30",
    ]);
    let mut c = Connector::start_with_env(&file_config(&sim, ""), TOKEN, &[("RUST_LOG", "trace")]);
    std::thread::sleep(Duration::from_secs(3));
    // A server-side disconnect makes it reconnect (and log about it) too.
    sim.post("/admin/disconnect", None);
    std::thread::sleep(Duration::from_secs(4));
    c.stop();
    let log = c.log();
    assert!(log.len() > 1000, "trace logging produced output");
    assert!(!log.contains(TOKEN), "token in the log");
    let records = std::fs::read_to_string(records_path(&c)).unwrap();
    assert!(!records.is_empty());
    assert!(!records.contains(TOKEN), "token in a record");
    assert!(!c.config().contains(TOKEN), "token in the config");
}

#[test]
fn refused_token_exits_with_code_2_without_retrying() {
    let sim = SimProcess::start(&["--tokens", &tokens(), "--rate", "0"]);
    let mut c = Connector::start(&file_config(&sim, ""), "st_wrong_token");
    let status = c
        .wait_exit(Duration::from_secs(20))
        .expect("the connector exits on a refused token");
    assert_eq!(status.code(), Some(2), "log:\n{}", c.log());
    assert!(
        c.log().contains("unauthorized"),
        "the reason is in the message:\n{}",
        c.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sim.truth_light()["counters"]["connectAttempts"],
        1,
        "no retry storm"
    );
}

#[test]
fn bad_input_becomes_dead_letters_and_the_stream_goes_on() {
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
    let c = Connector::start(&file_config(&sim, ""), TOKEN);
    std::thread::sleep(Duration::from_secs(2));
    for data in [
        json!("not a diff"),
        json!({"nodes": 5}),
        json!({"nodes": [7, {"title": "no id"}], "links": [{"id": "x", "type": 1}]}),
        json!([1, 2]),
    ] {
        sim.post(
            "/admin/emit",
            Some(&json!({"event": "graph:diff", "data": data})),
        );
    }
    // A pushed event outside the graph is counted, not published, and changes nothing.
    sim.post(
        "/admin/emit",
        Some(&json!({"event": "node:ai_subtasks_done", "data": {"nodeId": "x"}})),
    );
    std::thread::sleep(Duration::from_secs(2));
    sim.pause();
    let (latest, _) = wait_until_matches(&sim, UID, Duration::from_secs(30), || {
        read_file_sink(&records_path(&c))
    });
    assert!(
        latest.dead_letters.len() >= 4,
        "dead letters: {:#?}",
        latest.dead_letters
    );
    for d in &latest.dead_letters {
        assert!(d["reason"].is_string() && d["raw"].is_string(), "{d}");
    }
    let log = c.log();
    assert!(log.contains("dead-letter"), "a clear log line");
    let m = c.metrics();
    assert!(m["taskstream_dead_letters_total"] >= 4.0);
    assert!(m["taskstream_socket_events_ignored_total"] >= 1.0, "{m:?}");
}

#[test]
fn server_disconnect_reconnects_and_reconciles() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "200",
        "--links",
        "250",
        "--rate",
        "50",
    ]);
    let c = Connector::start(&file_config(&sim, "backoff_initial_ms = 200"), TOKEN);
    std::thread::sleep(Duration::from_secs(2));
    sim.post("/admin/disconnect", None);
    std::thread::sleep(Duration::from_secs(3));
    sim.pause();
    let (_, truth) = wait_until_matches(&sim, UID, Duration::from_secs(30), || {
        read_file_sink(&records_path(&c))
    });
    assert_eq!(truth["counters"]["connects"], 2, "{}", truth["counters"]);
    assert_eq!(truth["counters"]["limitViolations"]["total"], 0);
    // The second session catches up from history; no second snapshot.
    let m = c.metrics();
    assert_eq!(m["taskstream_snapshots_total"], 1.0, "{m:?}");
    assert!(m["taskstream_history_catchups_total"] >= 2.0, "{m:?}");
}

#[test]
fn unanswered_reads_time_out_and_are_retried() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "100",
        "--links",
        "120",
        "--rate",
        "10",
        "--drop-reads",
        "2",
    ]);
    let c = Connector::start(&file_config(&sim, "ack_timeout_ms = 800"), TOKEN);
    std::thread::sleep(Duration::from_secs(5));
    sim.pause();
    wait_until_matches(&sim, UID, Duration::from_secs(30), || {
        read_file_sink(&records_path(&c))
    });
    assert!(c.metrics()["taskstream_reads_timed_out_total"] >= 2.0);
}

#[test]
fn a_flood_of_diffs_keeps_the_session_and_ends_reconciled() {
    // A small diff buffer and window force drops; the session must survive (callbacks never
    // block the heartbeat) and a history catch-up must repair what was dropped.
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "300",
        "--links",
        "350",
        "--rate",
        "0",
        "--load",
        "10000",
    ]);
    let config = file_config(&sim, "diff_buffer = 200")
        .replace("[state]", "[delivery]\nmax_in_flight = 100\n\n[state]");
    let c = Connector::start(&config, TOKEN);
    std::thread::sleep(Duration::from_secs(2));
    sim.post("/load/start", None);
    let (_, truth) = wait_until_matches(&sim, UID, Duration::from_secs(90), || {
        read_file_sink(&records_path(&c))
    });
    assert_eq!(truth["counters"]["connects"], 1, "one session throughout");
    let m = c.metrics();
    assert!(
        m["taskstream_diffs_dropped_total"] > 0.0,
        "the flood overflowed the buffer: {m:?}"
    );
    assert!(m["taskstream_history_batches_total"] > 0.0, "{m:?}");
    // History repairs the drops; at most one more snapshot, for restores of entities known
    // only from the trash listing (a restore op carries `InTrash` alone, not the entity).
    assert!(m["taskstream_snapshots_total"] <= 2.0, "{m:?}");
}

#[test]
fn many_pages_stay_within_the_read_budget() {
    // 5 reads per 2 s on both sides keeps the test short; the logic is the same as 5 per 10 s.
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "1500",
        "--links",
        "1600",
        "--rate",
        "5",
        "--read-window-ms",
        "2000",
    ]);
    let c = Connector::start(
        &file_config(
            &sim,
            "page_limit = 200\npage_overlap = 10\nread_window_ms = 2000",
        ),
        TOKEN,
    );
    std::thread::sleep(Duration::from_secs(12));
    sim.pause();
    let (_, truth) = wait_until_matches(&sim, UID, Duration::from_secs(40), || {
        read_file_sink(&records_path(&c))
    });
    assert!(
        c.metrics()["taskstream_reads_total"] >= 16.0,
        "paged in many reads"
    );
    assert_eq!(
        truth["counters"]["rateLimitedAcks"], 0,
        "never rate-limited: {}",
        truth["counters"]
    );
}

#[test]
fn job_events_are_ingested_and_bad_frames_dead_lettered() {
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
        "40",
        "--jobs-malformed-every",
        "7",
    ]);
    let config = file_config(&sim, "").replace(
        "[state]",
        &format!(
            "[jobs]\nenabled = true\nurl = \"ws://127.0.0.1:{}/api/v1/ws\"\nclient_id = \"e2e\"\ntoken_env = \"SYNAPTASK_API_TOKEN\"\n\n[state]",
            sim.jobs_port
        ),
    );
    let mut c = Connector::start(&config, TOKEN);
    std::thread::sleep(Duration::from_secs(4));
    sim.post("/pause", None);
    support::http_json(sim.jobs_port, "POST", "/pause", None);
    std::thread::sleep(Duration::from_secs(2));
    c.stop();
    let truth = support::http_json(sim.jobs_port, "GET", "/truth", None);
    let sent = truth["clients"]["e2e"]
        .as_array()
        .expect("frames sent to client e2e");
    let (good, bad): (Vec<&Value>, Vec<&Value>) =
        sent.iter().partition(|f| f.get("malformed").is_none());
    assert!(
        good.len() > 50 && !bad.is_empty(),
        "{} good, {} malformed",
        good.len(),
        bad.len()
    );
    let records: Vec<Value> = read_file_sink(&records_path(&c))
        .into_iter()
        .filter_map(|s| s.record)
        .collect();
    let jobs: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"].as_str().unwrap().starts_with("synaptask.job."))
        .collect();
    assert_eq!(jobs.len(), good.len(), "every frame sent became a record");
    let epoch = jobs[0]["id"].as_str().unwrap().split(':').nth(2).unwrap();
    assert!(epoch.parse::<u64>().is_ok(), "{epoch}");
    for (i, (r, f)) in jobs.iter().zip(&good).enumerate() {
        assert_eq!(r["id"], format!("job:e2e:{epoch}:{}", i + 1));
        assert_eq!(&r["data"], *f);
        assert_eq!(
            r["type"],
            format!("synaptask.job.{}", f["type"].as_str().unwrap())
        );
    }
    let dead: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "synaptask.dead_letter" && r["event"] == "job_frame")
        .collect();
    assert_eq!(
        dead.len(),
        bad.len(),
        "every malformed frame became a dead letter"
    );
    assert!(
        !c.log().contains(TOKEN),
        "the job URL carries the token; the log must not"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_ack_answers_its_own_call() {
    // rust_socketio draws ack ids at random in 0..999; the session keeps one call in flight,
    // so replies can never be crossed. 300 calls, each for a different offset, each reply
    // checked against the page it asked for.
    use taskstream::secret::Secret;
    use taskstream::source::synaptask::session::{DiffBuffer, Session};
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "300",
        "--links",
        "0",
        "--rate",
        "0",
        "--read-limit",
        "100000",
    ]);
    let truth = sim.truth_light();
    let mut ordered: Vec<&Value> = truth["nodes"].as_array().unwrap().iter().collect();
    ordered.sort_by(|a, b| {
        (a["createdTime"].as_str(), a["id"].as_str())
            .cmp(&(b["createdTime"].as_str(), b["id"].as_str()))
    });
    let endpoint = format!("{}/socket.io/", sim.url());
    let mut session = Session::open(
        &endpoint,
        &Secret::new(TOKEN),
        DiffBuffer {
            count: 16,
            bytes: 1 << 20,
        },
        Duration::from_secs(5),
    )
    .await
    .expect("open");
    session
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("connected");
    for (offset, expected) in ordered.iter().enumerate().take(300) {
        let ack = session
            .call("graph:get", json!({"limit": 1, "offset": offset}))
            .await
            .expect("ack");
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(
            ack["nodes"][0]["id"], expected["id"],
            "reply to offset {offset}"
        );
    }
    session.close().await;
}

#[test]
fn check_reports_each_part_and_exits_2_on_a_refused_token() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "10",
        "--links",
        "10",
        "--rate",
        "0",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(&sim, "")
        .replace("{dir}", &dir.path().display().to_string())
        .replace("{metrics}", "0");
    let path = dir.path().join("taskstream.toml");
    std::fs::write(&path, config).unwrap();
    let run = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
            .args(["check", "--config"])
            .arg(&path)
            .env("SYNAPTASK_API_TOKEN", token)
            .output()
            .expect("run taskstream check")
    };
    let ok = run(TOKEN);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for part in ["config", "source", "state", "sink file"] {
        assert!(
            out.lines().any(|l| l.starts_with("ok") && l.contains(part)),
            "no ok line for {part}:\n{out}"
        );
    }
    assert!(out.contains(UID), "the source line names the user: {out}");
    let refused = run("st_wrong");
    let out = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(2), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("unauthorized"),
        "{out}"
    );
    assert!(!out.contains("st_wrong"), "the token is not echoed: {out}");
}

#[test]
fn refused_job_api_token_also_exits_with_code_2() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "10",
        "--links",
        "10",
        "--rate",
        "0",
    ]);
    let config = file_config(&sim, "").replace(
        "[state]",
        &format!(
            "[jobs]\nenabled = true\nurl = \"ws://127.0.0.1:{}/api/v1/ws\"\ntoken_env = \"E2E_JOBS_TOKEN\"\n\n[state]",
            sim.jobs_port
        ),
    );
    let mut c = Connector::start_with_env(&config, TOKEN, &[("E2E_JOBS_TOKEN", "st_not_for_jobs")]);
    let status = c
        .wait_exit(Duration::from_secs(20))
        .expect("the connector exits on a refused job-API token");
    assert_eq!(status.code(), Some(2), "log:\n{}", c.log());
    assert!(c.log().contains("job API refused the token"), "{}", c.log());
}

/// Issue 8 item 8: a supervisor restarting a crashing connector every second must not push it
/// over the server's connect limit (10 per minute per IP): attempts are kept in the state store
/// and a new run waits while earlier runs spent the budget, saying how long.
#[test]
fn restarts_in_a_loop_keep_to_the_connect_limit() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "20",
        "--links",
        "20",
        "--rate",
        "0",
    ]);
    let mut c = Connector::start(&file_config(&sim, ""), TOKEN);
    let count = |log: &str| {
        (
            log.matches("connected to SynapTask").count(),
            log.matches("connect budget is spent").count(),
        )
    };
    let mut seen = (0, 0);
    for _ in 0..14 {
        // Until this run connected, or said it waits for the budget.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = c.log();
            let now = count(&log);
            if now != seen {
                seen = now;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "neither connected nor waiting:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c.restart();
    }
    c.kill9();
    let counters = sim.truth_light()["counters"].clone();
    assert_eq!(
        counters["limitViolations"]["connectPerIp"], 0,
        "{counters:#}"
    );
    assert!(
        counters["connectAttempts"].as_u64().unwrap() <= 8,
        "the default budget is 8 connects a minute: {counters:#}"
    );
    assert!(seen.1 >= 6, "later runs waited for the budget: {seen:?}");
}
