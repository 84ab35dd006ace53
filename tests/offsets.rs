//! `taskstream offsets`: positions shown, refused while a connector runs on the state file,
//! and a reset that makes the next run publish a full snapshot again.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{file_config, read_file_sink, Connector, SimProcess};

const TOKEN: &str = "st_offsets_1a2b3c4d5e6f7a8b";
const UID: &str = "5e4d3c2b-1a09-4f8e-b7d6-c5b4a3928171";

fn offsets(c: &Connector, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .arg("offsets")
        .args(args)
        .args([
            "--config",
            &c.dir().join("taskstream.toml").display().to_string(),
        ])
        .output()
        .expect("run taskstream offsets")
}

fn created(c: &Connector) -> usize {
    read_file_sink(&c.dir().join("records.jsonl"))
        .iter()
        .filter_map(|s| s.record.as_ref())
        .filter(|r| r["type"].as_str().is_some_and(|t| t.ends_with(".created")))
        .count()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn positions_are_shown_refused_while_running_and_reset_to_a_new_snapshot() {
    let sim = SimProcess::start(&[
        "--tokens",
        &format!("{TOKEN}:{UID}"),
        "--nodes",
        "30",
        "--links",
        "30",
        "--rate",
        "5",
    ]);
    let mut c = Connector::start(&file_config(&sim.url(), "history_interval_ms = 500"), TOKEN);
    wait_for("the first snapshot", Duration::from_secs(30), || {
        created(&c) >= 40 && c.metrics().get("taskstream_snapshots_total") >= Some(&1.0)
    });
    let first = created(&c);
    // A few history polls, so that the USER scope has a delivered position.
    std::thread::sleep(Duration::from_secs(3));
    let busy = offsets(&c, &["show"]);
    assert_eq!(busy.status.code(), Some(1));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use"), "{err}");

    assert!(c.stop().is_some_and(|s| s.success()), "{}", c.log());
    let shown = offsets(&c, &["show", "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let p: Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(p["snapshotComplete"], true, "{p}");
    assert!(
        p["entities"].as_u64().unwrap() as usize >= first,
        "{p} vs {first} created"
    );
    assert_eq!(p["history"][0]["scope"], format!("USER:{UID}"), "{p}");
    let table = offsets(&c, &["show"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    eprintln!("offsets show:\n{table}");
    assert!(table.contains("synaptask  history USER:"), "{table}");

    let set = offsets(
        &c,
        &["set", "--scope", &format!("USER:{UID}"), "--op-id", "1"],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let reset = offsets(&c, &["reset"]);
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let p: Value = serde_json::from_slice(&offsets(&c, &["show", "--json"]).stdout).unwrap();
    assert_eq!(p["entities"], 0, "{p}");
    assert_eq!(p["snapshotComplete"], false, "{p}");

    // The next run knows nothing: a full snapshot publishes every entity as created again.
    let before = created(&c);
    c.restart();
    wait_for("a second full snapshot", Duration::from_secs(30), || {
        created(&c) >= before + first
    });
}
